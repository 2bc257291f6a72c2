//! chainidx-coordinator: splits the chain into block-range shards, hands them to workers, tracks their
//! progress, and answers queries by fanning out to the shards (gRPC `Query`, Esplora HTTP).
//!
//! # Layout
//! - [`cluster`]: the shard map, workers and progress.
//! - [`backfill`]: the driver that plans, assigns and sequences the two backfill phases.
//! - [`router`]: query fan-out and merge.
//! - [`mempool`]: unconfirmed transactions, synced from the source while following the tip.
//! - [`http`] / [`esplora`]: the Esplora HTTP API and its JSON.
//! - [`grpc`]: the `Coordinator` and `Query` gRPC services.
//! - [`error`]: the one mapping from query errors to HTTP statuses and gRPC codes.

pub mod backfill;
pub mod cluster;
pub mod error;
pub mod esplora;
pub mod grpc;
pub mod http;
pub mod mempool;
pub mod router;

use chainidx_core::source::BlockSource;
use std::future::Future;
use std::sync::Arc;
use tokio::net::TcpListener;

pub struct CoordinatorConfig {
    pub network: bitcoin::Network,
    /// Blocks per shard.
    pub shard_blocks: u32,
    /// Workers to wait for before assigning shards.
    pub min_workers: usize,
    /// Deepest reorg rolled back while following the tip; a deeper one halts the index (default 100).
    pub reorg_limit: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error("gRPC server: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("HTTP server: {0}")]
    Http(#[from] std::io::Error),
}

/// Serves gRPC on `grpc` and HTTP on `http`, and drives the backfill, until `shutdown` completes.
pub async fn run(
    config: CoordinatorConfig,
    source: Arc<dyn BlockSource>,
    grpc: TcpListener,
    http: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), CoordinatorError> {
    let cluster = Arc::new(cluster::Cluster::new(config.network));
    let router = router::QueryRouter::new(cluster.clone());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };

    let driver = tokio::spawn(backfill::drive(
        cluster.clone(),
        router.clone(),
        source,
        backfill::BackfillPlan {
            shard_blocks: config.shard_blocks,
            min_workers: config.min_workers,
            reorg_limit: config.reorg_limit,
            follow_every: std::time::Duration::from_millis(250),
        },
    ));

    let grpc_server = tonic::transport::Server::builder()
        .add_service(pb_coordinator(cluster.clone()))
        .add_service(
            chainidx_proto::query_server::QueryServer::new(grpc::QueryService {
                router: router.clone(),
            })
            .max_encoding_message_size(chainidx_node::worker::MAX_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(grpc).with_nodelay(Some(true)),
            stopped(stop_rx.clone()),
        );
    let http_server =
        axum::serve(http, http::routes(router)).with_graceful_shutdown(stopped(stop_rx));
    let (grpc_result, http_result) = tokio::join!(grpc_server, http_server);
    driver.abort();
    grpc_result?;
    http_result?;
    Ok(())
}

fn pb_coordinator(
    cluster: Arc<cluster::Cluster>,
) -> chainidx_proto::coordinator_server::CoordinatorServer<grpc::CoordinatorService> {
    chainidx_proto::coordinator_server::CoordinatorServer::new(grpc::CoordinatorService { cluster })
}
