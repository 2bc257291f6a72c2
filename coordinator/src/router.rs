//! Query fan-out: asks the shards that can hold the answer, concurrently where order does not matter,
//! and merges their answers. Shards are disjoint height ranges, so "newest first" across shards is simply
//! "later shards first".

use crate::cluster::{Cluster, Route};
use crate::error::ApiError;
use crate::mempool::Mempool;
use chainidx_core::chain::ScriptHash;
use chainidx_core::schema::Hash32;
use chainidx_proto as pb;
use chainidx_proto::worker_client::WorkerClient;
use futures::future::join_all;
use std::sync::Arc;
use tonic::transport::Channel;

/// Calls the shard's serving replicas in order until one answers: a replica that is down (refused, reset,
/// timed out) costs one failed attempt, not a failed query.
async fn on_replica<T, F, Fut>(
    replicas: &[WorkerClient<Channel>],
    call: F,
) -> Result<T, tonic::Status>
where
    F: Fn(WorkerClient<Channel>) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let mut last = tonic::Status::unavailable("no live replica holds this shard");
    for client in replicas {
        match tokio::time::timeout(REPLICA_TIMEOUT, call(client.clone())).await {
            Ok(Ok(reply)) => return Ok(reply.into_inner()),
            Ok(Err(status)) if replica_down(&status) => last = status,
            Ok(Err(status)) => return Err(status),
            Err(_) => last = tonic::Status::deadline_exceeded("replica did not answer in time"),
        }
    }
    Err(last)
}

/// Long enough for a deep history page, short enough that a hung replica does not stall queries.
const REPLICA_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Errors that mean "this copy is unreachable or not serving", so another copy should be asked.
fn replica_down(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::Cancelled
            | tonic::Code::DeadlineExceeded
            | tonic::Code::NotFound
    )
}

/// A history position: (height, position in block). Pages continue strictly below it.
pub type Cursor = (u32, u32);

#[derive(Clone)]
pub struct QueryRouter {
    cluster: Arc<Cluster>,
    mempool: Arc<std::sync::RwLock<Mempool>>,
}

impl QueryRouter {
    pub fn new(cluster: Arc<Cluster>) -> QueryRouter {
        QueryRouter {
            cluster,
            mempool: Arc::default(),
        }
    }

    pub fn mempool(&self) -> &Arc<std::sync::RwLock<Mempool>> {
        &self.mempool
    }

    pub fn cluster(&self) -> &Arc<Cluster> {
        &self.cluster
    }

    fn routes(&self) -> Result<Vec<Route>, ApiError> {
        if let Some(why) = self.cluster.halted() {
            return Err(ApiError::Unavailable(format!("index halted: {why}")));
        }
        let routes = self.cluster.routes();
        if routes.is_empty() {
            return Err(ApiError::Unavailable(
                "no shards assigned yet: the cluster is starting".into(),
            ));
        }
        Ok(routes)
    }

    /// Calls every shard concurrently; answers come back in height order.
    async fn ask_every_shard<T, F, Fut>(&self, call: F) -> Result<Vec<(Route, T)>, ApiError>
    where
        F: Fn(u32, WorkerClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let routes = self.routes()?;
        let call = &call;
        let replies = join_all(routes.iter().map(|(status, replicas)| {
            let id = status.shard_id;
            on_replica(replicas, move |client| call(id, client))
        }))
        .await;
        routes
            .into_iter()
            .zip(replies)
            .map(|(route, reply)| Ok((route, reply?)))
            .collect()
    }

    /// Per-shard stats of every shard, in height order.
    async fn shard_stats(
        &self,
        sh: &ScriptHash,
    ) -> Result<Vec<(Route, pb::AddressStats)>, ApiError> {
        self.ask_every_shard(|shard_id, mut client| {
            let request = pb::ShardAddressRequest {
                shard_id,
                scripthash: sh.to_vec(),
            };
            async move { client.address_summary(request).await }
        })
        .await
    }

    pub async fn address_stats(&self, sh: &ScriptHash) -> Result<pb::AddressStats, ApiError> {
        let mut total = pb::AddressStats::default();
        for (_, stats) in self.shard_stats(sh).await? {
            total.funded_txo_count += stats.funded_txo_count;
            total.funded_sum += stats.funded_sum;
            total.spent_txo_count += stats.spent_txo_count;
            total.spent_sum += stats.spent_sum;
            total.tx_count += stats.tx_count;
        }
        Ok(total)
    }

    /// Up to `limit` txs touching `sh`, newest first, strictly older than `before`. Shards whose stats say
    /// the address never appears there are skipped. Returns the page and the cursor of its last tx if more
    /// may follow.
    pub async fn history(
        &self,
        sh: &ScriptHash,
        before: Option<Cursor>,
        limit: usize,
    ) -> Result<(Vec<pb::TxDetail>, Option<Cursor>), ApiError> {
        // One round: every shard that can hold txs older than the cursor is asked for a page at once; each
        // checks its own stats first and answers "absent" without scanning when the address never
        // appears there. Shards are disjoint height ranges, so newest-first is later shards first.
        let all = self.routes()?;
        let total = all.len();
        let routes: Vec<Route> = all
            .into_iter()
            .filter(|(status, _)| before.is_none_or(|(h, _)| status.start_height <= h))
            .collect();
        let replies = join_all(routes.iter().map(|(status, replicas)| {
            let request = pb::ShardHistoryRequest {
                shard_id: status.shard_id,
                scripthash: sh.to_vec(),
                has_cursor: before.is_some(),
                before_height: before.map_or(0, |c| c.0),
                before_position: before.map_or(0, |c| c.1),
                limit: limit as u32,
            };
            on_replica(replicas, move |mut client| {
                let request = request.clone();
                async move { client.address_history(request).await }
            })
        }))
        .await;
        let mut page = Vec::new();
        let mut asked = 0;
        for reply in replies.into_iter().rev() {
            let reply = reply?;
            if !reply.absent {
                asked += 1;
            }
            let room = limit - page.len();
            page.extend(reply.txs.into_iter().take(room));
        }
        self.cluster.fan_out.count(total, asked);
        let next = if page.len() == limit {
            page.last()
                .and_then(|tx| tx.status.as_ref())
                .map(|s| (s.height, s.position))
        } else {
            None
        };
        Ok((page, next))
    }

    pub async fn utxos(&self, sh: &ScriptHash) -> Result<Vec<pb::Utxo>, ApiError> {
        let all = self.shard_stats(sh).await?;
        let total = all.len();
        let candidates: Vec<Route> = all
            .into_iter()
            .filter(|(_, stats)| stats.funded_txo_count > 0)
            .map(|(route, _)| route)
            .collect();
        self.cluster.fan_out.count(total, candidates.len());
        let calls = candidates.into_iter().map(|(status, replicas)| {
            let request = pb::ShardAddressRequest {
                shard_id: status.shard_id,
                scripthash: sh.to_vec(),
            };
            async move {
                on_replica(&replicas, |mut client| {
                    let request = request.clone();
                    async move { client.address_utxos(request).await }
                })
                .await
                .map(|r| r.utxos)
            }
        });
        let mut utxos = Vec::new();
        for reply in join_all(calls).await {
            utxos.extend(reply?);
        }
        // Newest first, like the history.
        utxos.sort_by_key(|u| {
            let s = u.status.clone().unwrap_or_default();
            std::cmp::Reverse((s.height, s.position, u.vout))
        });
        Ok(utxos)
    }

    /// Asks every shard; a txid lives in exactly one (for BIP30 duplicates, the newest wins). Not in any
    /// shard: the mempool, unconfirmed.
    pub async fn tx(&self, txid: &Hash32) -> Result<pb::TxDetail, ApiError> {
        let replies = self
            .ask_every_shard(|shard_id, mut client| {
                let request = pb::ShardTxRequest {
                    shard_id,
                    txid: txid.to_vec(),
                };
                async move { client.get_tx(request).await }
            })
            .await?;
        if let Some(found) = replies
            .into_iter()
            .filter_map(|(_, reply)| reply.tx.filter(|_| reply.found))
            .next_back()
        {
            return Ok(found);
        }
        use bitcoin::hashes::Hash;
        self.mempool
            .read()
            .expect("mempool lock")
            .tx(&bitcoin::Txid::from_byte_array(*txid))
            .ok_or_else(|| ApiError::NotFound(format!("transaction {} not found", display(txid))))
    }

    pub async fn outspends(&self, txid: &Hash32) -> Result<Vec<pb::Outspend>, ApiError> {
        let replies = self
            .ask_every_shard(|shard_id, mut client| {
                let request = pb::ShardTxRequest {
                    shard_id,
                    txid: txid.to_vec(),
                };
                async move { client.outspends(request).await }
            })
            .await?;
        replies
            .into_iter()
            .filter(|(_, reply)| reply.found)
            .map(|(_, reply)| reply.outspends)
            .next_back()
            .ok_or_else(|| ApiError::NotFound(format!("transaction {} not found", display(txid))))
    }

    pub async fn block_at(
        &self,
        height: u32,
        with_txids: bool,
    ) -> Result<pb::BlockLookup, ApiError> {
        let route = self
            .routes()?
            .into_iter()
            .find(|(s, _)| s.start_height <= height && height < s.end_height)
            .ok_or_else(|| ApiError::NotFound(format!("block height {height} not found")))?;
        let (status, replicas) = route;
        let request = pb::ShardBlockRequest {
            shard_id: status.shard_id,
            key: Some(pb::shard_block_request::Key::Height(height)),
            with_txids,
        };
        let reply = on_replica(&replicas, |mut client| {
            let request = request.clone();
            async move { client.get_block(request).await }
        })
        .await?;
        if !reply.found {
            return Err(ApiError::NotFound(format!(
                "block height {height} not indexed yet"
            )));
        }
        Ok(reply)
    }

    pub async fn block_by_hash(
        &self,
        hash: &Hash32,
        with_txids: bool,
    ) -> Result<pb::BlockLookup, ApiError> {
        let replies = self
            .ask_every_shard(|shard_id, mut client| {
                let request = pb::ShardBlockRequest {
                    shard_id,
                    key: Some(pb::shard_block_request::Key::Hash(hash.to_vec())),
                    with_txids,
                };
                async move { client.get_block(request).await }
            })
            .await?;
        replies
            .into_iter()
            .map(|(_, reply)| reply)
            .find(|reply| reply.found)
            .ok_or_else(|| ApiError::NotFound(format!("block {} not found", display(hash))))
    }

    /// The tip that queries can see: the highest height with every block below it indexed.
    pub async fn tip(&self) -> Result<pb::BlockLookup, ApiError> {
        let height = self
            .cluster
            .served_tip()
            .ok_or_else(|| ApiError::Unavailable("no block indexed yet".into()))?;
        self.block_at(height, false).await
    }
}

/// Display order (byte-reversed hex) of a txid or block hash.
pub fn display(hash: &Hash32) -> String {
    let mut reversed = *hash;
    reversed.reverse();
    hex::encode(reversed)
}

/// Parses a displayed txid/block hash into internal byte order.
pub fn parse_hash(text: &str, what: &str) -> Result<Hash32, ApiError> {
    let bad = || ApiError::BadRequest(format!("'{text}' is not a valid {what} (64 hex digits)"));
    let mut bytes: Hash32 = hex::decode(text)
        .map_err(|_| bad())?
        .try_into()
        .map_err(|_| bad())?;
    bytes.reverse();
    Ok(bytes)
}
