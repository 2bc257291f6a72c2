//! The worker's gRPC service: backfill control from the coordinator, spent-output lookups from peers, and
//! per-shard queries fanned out by the coordinator.

use crate::shard::ShardError;

use crate::worker::{MAX_MESSAGE_BYTES, WorkerError, WorkerNode};
use chainidx_core::chain::ScriptHash;
use chainidx_core::schema::Hash32;
use chainidx_proto as pb;
use chainidx_proto::worker_server::{Worker, WorkerServer};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

impl From<WorkerError> for Status {
    fn from(error: WorkerError) -> Status {
        match error {
            WorkerError::UnknownShard(_) | WorkerError::Moved(_) => {
                Status::not_found(error.to_string())
            }
            WorkerError::NoLease(_) => Status::unavailable(error.to_string()),
            WorkerError::Shard(ShardError::OutOfRange { .. }) => {
                Status::invalid_argument(error.to_string())
            }
            // Tx bodies are read from the source: a node that is down or restarting is worth a retry.
            WorkerError::Shard(ShardError::Source(_) | ShardError::BehindPinnedTip { .. }) => {
                Status::unavailable(error.to_string())
            }
            _ => Status::internal(error.to_string()),
        }
    }
}

fn hash32(bytes: &[u8], what: &str) -> Result<Hash32, Status> {
    bytes
        .try_into()
        .map_err(|_| Status::invalid_argument(format!("{what} must be 32 bytes")))
}

/// Runs blocking shard work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, WorkerError> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(Status::from)
}

pub struct WorkerService {
    node: Arc<WorkerNode>,
}

impl WorkerService {
    pub fn new(node: Arc<WorkerNode>) -> WorkerService {
        WorkerService { node }
    }

    fn shard(&self, id: u32) -> Result<Arc<crate::shard::Shard>, Status> {
        Ok(self.node.slot(id)?.shard.clone())
    }

    /// A shard that peers may ask for its coins or txids: one still indexing here (a copy being built)
    /// cannot answer for them yet, and the asker retries later.
    fn indexed_shard(&self, id: u32) -> Result<Arc<crate::shard::Shard>, Status> {
        let shard = self.shard(id)?;
        if shard.state().phase == pb::ShardPhase::Indexing as i32 {
            return Err(Status::unavailable(format!(
                "shard {id} is still indexing here"
            )));
        }
        Ok(shard)
    }

    /// The shards a query names, later heights first; a shard this worker does not serve fails the call
    /// (NOT_FOUND), so the coordinator asks another replica.
    fn shards_newest_first(&self, ids: &[u32]) -> Result<Vec<Arc<crate::shard::Shard>>, Status> {
        let mut shards = ids
            .iter()
            .map(|id| self.shard(*id))
            .collect::<Result<Vec<_>, _>>()?;
        shards.sort_by_key(|shard| std::cmp::Reverse(shard.start));
        Ok(shards)
    }
}

#[tonic::async_trait]
impl Worker for WorkerService {
    async fn assign_shard(
        &self,
        request: Request<pb::AssignShardRequest>,
    ) -> Result<Response<pb::AssignShardReply>, Status> {
        let r = request.into_inner();
        if r.end_height <= r.start_height {
            return Err(Status::invalid_argument("empty shard range"));
        }
        let node = self.node.clone();
        // Opening RocksDB does file I/O; keep it off the async threads.
        let handle = tokio::runtime::Handle::current();
        blocking(move || {
            let _guard = handle.enter();
            node.assign(r.shard_id, r.start_height, r.end_height)
        })
        .await?;
        Ok(Response::new(pb::AssignShardReply {}))
    }

    async fn resolve_shard(
        &self,
        request: Request<pb::ResolveShardRequest>,
    ) -> Result<Response<pb::ResolveShardReply>, Status> {
        let r = request.into_inner();
        self.node.resolve(r.shard_id, r.peers)?;
        Ok(Response::new(pb::ResolveShardReply {}))
    }

    async fn status(
        &self,
        _: Request<pb::WorkerStatusRequest>,
    ) -> Result<Response<pb::WorkerStatusReply>, Status> {
        Ok(Response::new(pb::WorkerStatusReply {
            shards: self.node.statuses(),
            write_spans: self.node.write_spans(),
            lease_remaining_ms: self.node.lease_remaining_ms().unwrap_or(i64::MAX),
            peer_bytes: self.node.peer_bytes(),
            engine_memory: Some(self.node.engine_memory()),
            compactions_queued: self.node.compactions_queued(),
            inputs_routed: self.node.resolve_counts.routed.load(Ordering::Relaxed),
            inputs_walked: self.node.resolve_counts.walked.load(Ordering::Relaxed),
            spend_lookups_sent: self.node.resolve_counts.lookups.load(Ordering::Relaxed),
            txid_filter_bytes: self.node.txid_filter_bytes() as u64,
        }))
    }

    async fn txid_filter(
        &self,
        request: Request<pb::TxidFilterRequest>,
    ) -> Result<Response<pb::TxidFilterReply>, Status> {
        let shard_id = request.into_inner().shard_id;
        let shard = self.indexed_shard(shard_id)?;
        let filter = blocking(move || Ok(shard.served_txid_filter()?)).await?;
        Ok(Response::new(filter.to_proto(shard_id)))
    }

    async fn spend_outputs(
        &self,
        request: Request<pb::SpendOutputsRequest>,
    ) -> Result<Response<pb::SpendOutputsReply>, Status> {
        let r = request.into_inner();
        let shard = self.indexed_shard(r.shard_id)?;
        self.node.check_write(r.shard_id)?;
        let found = blocking(move || Ok(shard.spend_outputs(&r.spends)?)).await?;
        Ok(Response::new(pb::SpendOutputsReply { found }))
    }

    async fn resend_spends(
        &self,
        request: Request<pb::ResendSpendsRequest>,
    ) -> Result<Response<pb::ResendSpendsReply>, Status> {
        let r = request.into_inner();
        let to =
            r.to.ok_or_else(|| Status::invalid_argument("resend needs a target shard"))?;
        let (sent, recorded) = self.node.resend_spends(r.shard_id, to).await?;
        Ok(Response::new(pb::ResendSpendsReply { sent, recorded }))
    }

    async fn set_faults(
        &self,
        request: Request<pb::FaultFilter>,
    ) -> Result<Response<pb::FaultFilter>, Status> {
        let filter = request.into_inner();
        self.node.set_isolated(filter.isolate_from_coordinators);
        Ok(Response::new(filter))
    }

    async fn unspend_outputs(
        &self,
        request: Request<pb::SpendOutputsRequest>,
    ) -> Result<Response<pb::SpendOutputsReply>, Status> {
        let r = request.into_inner();
        let shard = self.shard(r.shard_id)?;
        let held = blocking(move || Ok(shard.unspend_outputs(&r.spends)?)).await?;
        let found = held
            .into_iter()
            .map(|index| pb::SpentOutput {
                index,
                ..Default::default()
            })
            .collect();
        Ok(Response::new(pb::SpendOutputsReply { found }))
    }

    async fn rollback(
        &self,
        request: Request<pb::RollbackRequest>,
    ) -> Result<Response<pb::RollbackReply>, Status> {
        let r = request.into_inner();
        self.node
            .rollback(r.shard_id, r.from_height, r.peers)
            .await?;
        Ok(Response::new(pb::RollbackReply {}))
    }

    async fn catch_up(
        &self,
        request: Request<pb::CatchUpRequest>,
    ) -> Result<Response<pb::CatchUpReply>, Status> {
        let r = request.into_inner();
        self.node
            .catch_up(r.shard_id, r.tip_height, r.extend, r.peers)
            .await?;
        Ok(Response::new(pb::CatchUpReply {}))
    }

    async fn address_summary(
        &self,
        request: Request<pb::ShardAddressRequest>,
    ) -> Result<Response<pb::AddressStats>, Status> {
        let r = request.into_inner();
        let shards = self.shards_newest_first(&r.shard_ids)?;
        let sh: ScriptHash = hash32(&r.scripthash, "scripthash")?;
        let tip = r.tip;
        let total = blocking(move || {
            let mut total = pb::AddressStats::default();
            for shard in shards {
                add_to(&mut total, &shard.view_at(tip)?.address_stats(&sh)?);
            }
            Ok(total)
        })
        .await?;
        Ok(Response::new(total))
    }

    async fn address_history(
        &self,
        request: Request<pb::ShardHistoryRequest>,
    ) -> Result<Response<pb::TxPage>, Status> {
        let r = request.into_inner();
        let shards = self.shards_newest_first(&r.shard_ids)?;
        let sh: ScriptHash = hash32(&r.scripthash, "scripthash")?;
        let before = r.has_cursor.then_some((r.before_height, r.before_position));
        let limit = r.limit.clamp(1, 1000) as usize;
        let tip = r.tip;
        // Shards are disjoint height ranges: newest shard first, and stop once the page is full, so only
        // the txs on the page have their bodies read. No stats row (a filtered point lookup) means no
        // history rows: the per-shard filter that spares the scan.
        let page = blocking(move || {
            let mut page = pb::TxPage::default();
            for shard in shards {
                let room = limit - page.txs.len();
                if room == 0 {
                    break;
                }
                // One snapshot for the shard's stats row, history rows and txs: a block rolled back
                // meanwhile is missing from all of them, not only from some.
                let view = shard.view_at(tip)?;
                if view.address_stats(&sh)?.tx_count == 0 {
                    continue;
                }
                page.shards_scanned += 1;
                page.txs.extend(view.history(&sh, before, room)?);
            }
            Ok(page)
        })
        .await?;
        Ok(Response::new(page))
    }

    async fn address_utxos(
        &self,
        request: Request<pb::ShardAddressRequest>,
    ) -> Result<Response<pb::ShardUtxoList>, Status> {
        let r = request.into_inner();
        let shards = self.shards_newest_first(&r.shard_ids)?;
        let sh: ScriptHash = hash32(&r.scripthash, "scripthash")?;
        let tip = r.tip;
        let list = blocking(move || {
            let mut list = pb::ShardUtxoList::default();
            for shard in shards {
                let view = shard.view_at(tip)?;
                if view.address_stats(&sh)?.funded_txo_count == 0 {
                    continue;
                }
                list.shards_scanned += 1;
                list.utxos.extend(view.utxos(&sh)?);
            }
            Ok(list)
        })
        .await?;
        Ok(Response::new(list))
    }

    async fn get_tx(
        &self,
        request: Request<pb::ShardTxRequest>,
    ) -> Result<Response<pb::TxLookup>, Status> {
        let r = request.into_inner();
        let shards = self.shards_newest_first(&r.shard_ids)?;
        let txid = hash32(&r.txid, "txid")?;
        let tip = r.tip;
        // Newest first: of two BIP30 duplicates, the later one is the tx.
        let tx = blocking(move || {
            for shard in shards {
                if let Some(tx) = shard.view_at(tip)?.tx(&txid)? {
                    return Ok(Some(tx));
                }
            }
            Ok(None)
        })
        .await?;
        Ok(Response::new(pb::TxLookup {
            found: tx.is_some(),
            tx,
        }))
    }

    async fn get_block(
        &self,
        request: Request<pb::ShardBlockRequest>,
    ) -> Result<Response<pb::BlockLookup>, Status> {
        let r = request.into_inner();
        let shard = self.shard(r.shard_id)?;
        let key = r
            .key
            .ok_or_else(|| Status::invalid_argument("block key missing"))?;
        let (with_txids, tip) = (r.with_txids, r.tip);
        Ok(Response::new(
            blocking(move || Ok(shard.view_at(tip)?.block(&key, with_txids)?)).await?,
        ))
    }

    async fn outspends(
        &self,
        request: Request<pb::ShardTxRequest>,
    ) -> Result<Response<pb::OutspendList>, Status> {
        let r = request.into_inner();
        let shards = self.shards_newest_first(&r.shard_ids)?;
        let txid = hash32(&r.txid, "txid")?;
        let tip = r.tip;
        let outspends = blocking(move || {
            for shard in shards {
                if let Some(outspends) = shard.view_at(tip)?.outspends(&txid)? {
                    return Ok(Some(outspends));
                }
            }
            Ok(None)
        })
        .await?;
        let (height, outspends) = outspends.unzip();
        Ok(Response::new(pb::OutspendList {
            found: height.is_some(),
            outspends: outspends.unwrap_or_default(),
            height: height.unwrap_or_default(),
        }))
    }

    async fn txids_at(
        &self,
        request: Request<pb::TxidsAtRequest>,
    ) -> Result<Response<pb::TxidsAtReply>, Status> {
        let r = request.into_inner();
        let shards = self.shards_newest_first(&r.shard_ids)?;
        let spends = r.spends;
        let txids = blocking(move || {
            let mut txids = vec![Vec::new(); spends.len()];
            for shard in shards {
                for (slot, txid) in txids.iter_mut().zip(shard.view().spender_txids(&spends)?) {
                    if let Some(txid) = txid {
                        *slot = txid.to_vec();
                    }
                }
            }
            Ok(txids)
        })
        .await?;
        Ok(Response::new(pb::TxidsAtReply { txids }))
    }
}

/// Adds one shard's totals for an address to the sum over shards.
pub fn add_to(total: &mut pb::AddressStats, stats: &pb::AddressStats) {
    total.funded_txo_count += stats.funded_txo_count;
    total.funded_sum += stats.funded_sum;
    total.spent_txo_count += stats.spent_txo_count;
    total.spent_sum += stats.spent_sum;
    total.tx_count += stats.tx_count;
}

/// Serves the worker's gRPC API on `listener` until `shutdown` completes (mini-redis style).
pub async fn run(
    node: Arc<WorkerNode>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let service = WorkerServer::new(WorkerService::new(node.clone()))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    tonic::transport::Server::builder()
        .layer(crate::fault::FaultLayer { node })
        .add_service(service)
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await
}
