//! Raft messages between coordinator replicas, over the `Raft` gRPC service. openraft's requests and
//! replies are serde types; they travel as JSON inside a protobuf `bytes` field.

use crate::raft::{CoordinatorNode, NodeId, Raft, TypeConfig};
use chainidx_proto as pb;
use chainidx_proto::raft_client::RaftClient;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

pub struct Network;

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: NodeId, node: &CoordinatorNode) -> Peer {
        let url = format!("http://{}", node.grpc);
        // Lazy: a peer that is down now is dialled again on the next message.
        let channel = tonic::transport::Endpoint::from_shared(url)
            .map(|e| {
                e.connect_timeout(std::time::Duration::from_millis(500))
                    .connect_lazy()
            })
            .ok();
        Peer {
            target,
            client: channel.map(RaftClient::new),
        }
    }
}

pub struct Peer {
    target: NodeId,
    client: Option<RaftClient<Channel>>,
}

type RpcResult<T, E> = Result<T, RPCError<NodeId, CoordinatorNode, RaftError<NodeId, E>>>;

impl Peer {
    async fn call<Req: Serialize, Resp: DeserializeOwned, E>(
        &mut self,
        kind: RpcKind,
        request: &Req,
        option: &RPCOption,
    ) -> RpcResult<Resp, E>
    where
        E: std::error::Error + DeserializeOwned,
    {
        let client = self.client.as_mut().ok_or_else(|| {
            RPCError::Unreachable(Unreachable::new(&std::io::Error::other("bad peer address")))
        })?;
        let json =
            serde_json::to_vec(request).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let mut request = Request::new(pb::RaftPayload { json });
        request.set_timeout(option.hard_ttl());
        let reply = match kind {
            RpcKind::Append => client.append_entries(request).await,
            RpcKind::Vote => client.vote(request).await,
            RpcKind::Snapshot => client.install_snapshot(request).await,
        };
        let reply = reply
            .map_err(|status| RPCError::Unreachable(Unreachable::new(&StatusError(status))))?;
        let result: Result<Resp, RaftError<NodeId, E>> =
            serde_json::from_slice(&reply.into_inner().json)
                .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

enum RpcKind {
    Append,
    Vote,
    Snapshot,
}

#[derive(Debug)]
struct StatusError(Status);

impl std::fmt::Display for StatusError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.0.code(), self.0.message())
    }
}

impl std::error::Error for StatusError {}

impl RaftNetwork<TypeConfig> for Peer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>, openraft::error::Infallible> {
        self.call(RpcKind::Append, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        self.call(RpcKind::Snapshot, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>, openraft::error::Infallible> {
        self.call(RpcKind::Vote, &rpc, &option).await
    }
}

/// The receiving side: hands each message to the local Raft node and returns its answer, error included.
pub struct RaftService {
    pub raft: Raft,
}

fn decode<T: DeserializeOwned>(request: Request<pb::RaftPayload>) -> Result<T, Status> {
    serde_json::from_slice(&request.into_inner().json)
        .map_err(|e| Status::invalid_argument(format!("raft message: {e}")))
}

fn encode<T: Serialize>(value: &T) -> Result<Response<pb::RaftPayload>, Status> {
    let json = serde_json::to_vec(value).map_err(|e| Status::internal(e.to_string()))?;
    Ok(Response::new(pb::RaftPayload { json }))
}

#[tonic::async_trait]
impl pb::raft_server::Raft for RaftService {
    async fn append_entries(
        &self,
        request: Request<pb::RaftPayload>,
    ) -> Result<Response<pb::RaftPayload>, Status> {
        let result = self.raft.append_entries(decode(request)?).await;
        encode(&result)
    }

    async fn vote(
        &self,
        request: Request<pb::RaftPayload>,
    ) -> Result<Response<pb::RaftPayload>, Status> {
        let result = self.raft.vote(decode(request)?).await;
        encode(&result)
    }

    async fn install_snapshot(
        &self,
        request: Request<pb::RaftPayload>,
    ) -> Result<Response<pb::RaftPayload>, Status> {
        let result = self.raft.install_snapshot(decode(request)?).await;
        encode(&result)
    }
}
