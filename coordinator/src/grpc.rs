//! The coordinator's gRPC services: `Coordinator` (workers register, anyone reads status) and `Query`
//! (the client-facing twin of the HTTP API).

use crate::cluster::Cluster;
use crate::error::ApiError;
use crate::raft::{CoordinatorNode, Raft};
use crate::router::{Cursor, QueryRouter, parse_hash};
use chainidx_core::chain::{ScriptHash, parse_scripthash, script_for_address, scripthash};
use chainidx_proto as pb;
use openraft::error::{ChangeMembershipError, ClientWriteError, RaftError};
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub struct CoordinatorService {
    pub cluster: Arc<Cluster>,
    pub raft: Raft,
}

/// Metadata key carrying the leader's gRPC address when a follower refuses a write.
pub const LEADER_KEY: &str = "chainidx-leader";

impl CoordinatorService {
    /// Writes go to the leader: a follower says who that is, so callers can find it by themselves.
    fn not_leader(&self) -> Status {
        let leader = self.cluster.read().raft.leader_addr();
        let mut status = Status::failed_precondition(match &leader {
            Some(addr) => format!("not the Raft leader; the leader is {addr}"),
            None => "not the Raft leader; no leader elected yet".to_string(),
        });
        if let Some(addr) = leader
            && let Ok(value) = addr.parse()
        {
            status.metadata_mut().insert(LEADER_KEY, value);
        }
        status
    }

    fn require_leader(&self) -> Result<(), Status> {
        if self.cluster.read().raft.is_leader() {
            Ok(())
        } else {
            Err(self.not_leader())
        }
    }

    async fn commit(&self, command: pb::cluster_command::Command) -> Result<(), Status> {
        self.raft
            .client_write(pb::ClusterCommand {
                command: Some(command),
            })
            .await
            .map(|_| ())
            .map_err(|e| match e {
                RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => self.not_leader(),
                e => Status::unavailable(format!("raft: {e}")),
            })
    }

    /// Sets the voters, waiting out a membership change still finishing (openraft allows one at a time:
    /// joint consensus, then the final config).
    async fn change_voters(&self, voters: std::collections::BTreeSet<u64>) -> Result<(), Status> {
        for _ in 0..50 {
            match self.raft.change_membership(voters.clone(), false).await {
                Ok(_) => return Ok(()),
                Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(
                    ChangeMembershipError::InProgress(_),
                ))) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {
                    return Err(self.not_leader());
                }
                Err(e) => return Err(Status::unavailable(format!("membership change: {e}"))),
            }
        }
        Err(Status::unavailable(
            "membership change: another change is still in progress after 5 s",
        ))
    }

    fn voters(&self) -> std::collections::BTreeSet<u64> {
        self.raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .collect()
    }

    /// After a membership change: refresh the view and answer with the members.
    fn membership_reply(&self) -> Response<pb::MembershipReply> {
        crate::refresh_raft_view(&self.raft, &self.cluster);
        Response::new(pb::MembershipReply {
            members: self.members(),
        })
    }

    fn members(&self) -> Vec<pb::CoordinatorMember> {
        self.cluster.read().raft.members.clone()
    }
}

#[tonic::async_trait]
impl pb::coordinator_server::Coordinator for CoordinatorService {
    async fn register_worker(
        &self,
        request: Request<pb::RegisterWorkerRequest>,
    ) -> Result<Response<pb::RegisterWorkerReply>, Status> {
        self.require_leader()?;
        let r = request.into_inner();
        let name = if r.name.is_empty() {
            r.grpc_addr.clone()
        } else {
            r.name.clone()
        };
        self.commit(pb::cluster_command::Command::RegisterWorker(
            pb::WorkerRecord {
                name: name.clone(),
                grpc_addr: r.grpc_addr.clone(),
                generation: 0,
            },
        ))
        .await?;
        let view = self.cluster.read();
        let id = view
            .workers
            .iter()
            .position(|w| w.name == name)
            .unwrap_or_default() as u32;
        tracing::info!(worker = id, addr = %r.grpc_addr, %name, "worker registered");
        Ok(Response::new(pb::RegisterWorkerReply { worker_id: id }))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatReply>, Status> {
        self.require_leader()?;
        // A deposed leader that has not noticed yet must not grant leases: confirm with a quorum first.
        self.raft
            .ensure_linearizable()
            .await
            .map_err(|_| self.not_leader())?;
        let r = request.into_inner();
        let mut view = self.cluster.write();
        let Some(worker) = view.workers.iter().find(|w| w.name == r.name) else {
            return Err(Status::not_found(format!(
                "worker {} is not registered; register first",
                r.name
            )));
        };
        if worker.addr != r.grpc_addr {
            return Err(Status::not_found(format!(
                "worker {} is registered at {}, not {}; register again",
                r.name, worker.addr, r.grpc_addr
            )));
        }
        view.heartbeats
            .insert(r.name.clone(), std::time::Instant::now());
        let shards = view
            .state
            .shards
            .iter()
            .filter(|s| s.replicas.iter().chain(&s.joining).any(|h| h == &r.name))
            .map(|s| pb::ShardLease {
                shard_id: crate::state::shard_status(s).shard_id,
                epoch: s.epoch,
            })
            .collect();
        let coordinators = view
            .raft
            .members
            .iter()
            .map(|m| m.grpc_addr.clone())
            .collect();
        Ok(Response::new(pb::HeartbeatReply {
            lease_ms: crate::lease::GRANTED.as_millis() as u32,
            shards,
            coordinators,
            backfill_complete: view.state.backfill_complete,
        }))
    }

    async fn add_coordinator(
        &self,
        request: Request<pb::AddCoordinatorRequest>,
    ) -> Result<Response<pb::MembershipReply>, Status> {
        self.require_leader()?;
        let r = request.into_inner();
        let node = CoordinatorNode {
            grpc: r.grpc_addr,
            http: r.http_addr,
        };
        let map = |e: RaftError<u64, ClientWriteError<u64, CoordinatorNode>>| match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => self.not_leader(),
            e => Status::unavailable(format!("membership change: {e}")),
        };
        // Catch up as a learner first, then become a voter (joint consensus inside openraft).
        self.raft.add_learner(r.id, node, true).await.map_err(map)?;
        let mut voters = self.voters();
        voters.insert(r.id);
        self.change_voters(voters).await?;
        tracing::info!(id = r.id, "coordinator added");
        Ok(self.membership_reply())
    }

    async fn remove_coordinator(
        &self,
        request: Request<pb::RemoveCoordinatorRequest>,
    ) -> Result<Response<pb::MembershipReply>, Status> {
        self.require_leader()?;
        let id = request.into_inner().id;
        let mut voters = self.voters();
        voters.remove(&id);
        if voters.is_empty() {
            return Err(Status::invalid_argument(
                "cannot remove the last coordinator",
            ));
        }
        self.change_voters(voters).await?;
        tracing::info!(id, "coordinator removed");
        Ok(self.membership_reply())
    }

    async fn cluster_status(
        &self,
        _: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusReply>, Status> {
        Ok(Response::new(self.cluster.status()))
    }
}

pub struct QueryService {
    pub router: QueryRouter,
}

impl QueryService {
    fn target(&self, address: &str) -> Result<ScriptHash, ApiError> {
        match address.strip_prefix("scripthash:") {
            Some(hash) => Ok(parse_scripthash(hash)?),
            None => Ok(scripthash(&script_for_address(
                address,
                self.router.cluster().network,
            )?)),
        }
    }
}

fn parse_cursor(cursor: &str) -> Result<Option<Cursor>, ApiError> {
    if cursor.is_empty() {
        return Ok(None);
    }
    let bad = || ApiError::BadRequest(format!("bad cursor '{cursor}'"));
    let (height, position) = cursor.split_once(':').ok_or_else(bad)?;
    Ok(Some((
        height.parse().map_err(|_| bad())?,
        position.parse().map_err(|_| bad())?,
    )))
}

#[tonic::async_trait]
impl pb::query_server::Query for QueryService {
    async fn address(
        &self,
        request: Request<pb::AddressQuery>,
    ) -> Result<Response<pb::AddressStats>, Status> {
        let sh = self.target(&request.into_inner().address)?;
        Ok(Response::new(self.router.address_stats(&sh).await?))
    }

    async fn address_txs(
        &self,
        request: Request<pb::AddressTxsQuery>,
    ) -> Result<Response<pb::AddressTxsPage>, Status> {
        let r = request.into_inner();
        let sh = self.target(&r.address)?;
        let limit = if r.limit == 0 { 25 } else { r.limit.min(100) } as usize;
        let (txs, next) = self
            .router
            .history(&sh, parse_cursor(&r.cursor)?, limit)
            .await?;
        let next_cursor = next.map(|(h, p)| format!("{h}:{p}")).unwrap_or_default();
        Ok(Response::new(pb::AddressTxsPage { txs, next_cursor }))
    }

    async fn address_utxos(
        &self,
        request: Request<pb::AddressQuery>,
    ) -> Result<Response<pb::UtxoList>, Status> {
        let sh = self.target(&request.into_inner().address)?;
        Ok(Response::new(pb::UtxoList {
            utxos: self.router.utxos(&sh).await?,
        }))
    }

    async fn tx(&self, request: Request<pb::TxQuery>) -> Result<Response<pb::TxDetail>, Status> {
        let txid = parse_hash(&request.into_inner().txid, "txid")?;
        Ok(Response::new(self.router.tx(&txid).await?))
    }

    async fn block(
        &self,
        request: Request<pb::BlockQuery>,
    ) -> Result<Response<pb::BlockLookup>, Status> {
        let query = request.into_inner();
        let lookup = match query.key {
            Some(pb::block_query::Key::Height(h)) => {
                self.router.block_at(h, query.with_txids).await?
            }
            Some(pb::block_query::Key::Hash(hash)) => {
                self.router
                    .block_by_hash(&parse_hash(&hash, "block hash")?, query.with_txids)
                    .await?
            }
            None => return Err(Status::invalid_argument("give a block height or hash")),
        };
        Ok(Response::new(lookup))
    }
}
