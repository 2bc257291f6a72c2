//! A fault filter in the worker's transport, as TiKV's test cluster has: while the worker is "isolated",
//! every call except the peer calls between workers (and the switch itself) is answered UNAVAILABLE, and
//! its heartbeats are not sent — a partition between this worker and the coordinators, with the process
//! still running and still believing it owns its shards until its lease runs out.

use crate::worker::WorkerNode;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

/// Calls that cross between workers, not to or from a coordinator: they pass the filter.
const PEER_CALLS: [&str; 3] = [
    "/chainidx.v1.Worker/SpendOutputs",
    "/chainidx.v1.Worker/UnspendOutputs",
    "/chainidx.v1.Worker/SetFaults",
];

#[derive(Clone)]
pub struct FaultLayer {
    pub node: Arc<WorkerNode>,
}

impl<S> tower::Layer<S> for FaultLayer {
    type Service = FaultFilter<S>;

    fn layer(&self, inner: S) -> FaultFilter<S> {
        FaultFilter {
            inner,
            node: self.node.clone(),
        }
    }
}

#[derive(Clone)]
pub struct FaultFilter<S> {
    inner: S,
    node: Arc<WorkerNode>,
}

impl<S, B> tower::Service<http::Request<B>> for FaultFilter<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if self.node.isolated() && !PEER_CALLS.contains(&request.uri().path()) {
            let dropped = tonic::Status::unavailable("dropped by the fault filter (partition)");
            return Box::pin(async move { Ok(dropped.into_http()) });
        }
        Box::pin(self.inner.call(request))
    }
}
