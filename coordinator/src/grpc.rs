//! The coordinator's gRPC services: `Coordinator` (workers register, anyone reads status) and `Query`
//! (the client-facing twin of the HTTP API).

use crate::cluster::{Cluster, WorkerEntry};
use crate::error::ApiError;
use crate::router::{Cursor, QueryRouter, parse_hash};
use chainidx_core::chain::{ScriptHash, parse_scripthash, script_for_address, scripthash};
use chainidx_proto as pb;
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub struct CoordinatorService {
    pub cluster: Arc<Cluster>,
}

#[tonic::async_trait]
impl pb::coordinator_server::Coordinator for CoordinatorService {
    async fn register_worker(
        &self,
        request: Request<pb::RegisterWorkerRequest>,
    ) -> Result<Response<pb::RegisterWorkerReply>, Status> {
        let r = request.into_inner();
        let name = if r.name.is_empty() {
            r.grpc_addr.clone()
        } else {
            r.name.clone()
        };
        let client = chainidx_node::connect_worker(&r.grpc_addr)
            .await
            .map_err(|e| {
                Status::unavailable(format!("cannot reach worker at {}: {e}", r.grpc_addr))
            })?;
        let mut view = self.cluster.write();
        if let Some(index) = view.workers.iter().position(|w| w.name == name) {
            // A restarted worker: same data, new address. The driver hands its shards back; until they
            // report ready again the cluster is not complete.
            view.backfill_complete = false;
            let existing = &mut view.workers[index];
            existing.addr = r.grpc_addr.clone();
            existing.client = client;
            existing.generation += 1;
            tracing::info!(worker = existing.id, addr = %r.grpc_addr, %name, "worker registered again");
            return Ok(Response::new(pb::RegisterWorkerReply {
                worker_id: existing.id,
            }));
        }
        let id = view.workers.len() as u32;
        view.workers.push(WorkerEntry {
            id,
            name: name.clone(),
            addr: r.grpc_addr.clone(),
            client,
            generation: 0,
        });
        tracing::info!(worker = id, addr = %r.grpc_addr, %name, "worker registered");
        Ok(Response::new(pb::RegisterWorkerReply { worker_id: id }))
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
        let lookup = match request.into_inner().key {
            Some(pb::block_query::Key::Height(h)) => self.router.block_at(h, true).await?,
            Some(pb::block_query::Key::Hash(hash)) => {
                self.router
                    .block_by_hash(&parse_hash(&hash, "block hash")?, true)
                    .await?
            }
            None => return Err(Status::invalid_argument("give a block height or hash")),
        };
        Ok(Response::new(lookup))
    }
}
