//! Query fan-out: asks the shards that can hold the answer, concurrently where order does not matter,
//! and merges their answers. Shards are disjoint height ranges, so "newest first" across shards is simply
//! "later shards first".

use crate::cluster::{Cluster, Replica, Route};
use crate::error::ApiError;
use crate::mempool::Mempool;
use chainidx_core::chain::ScriptHash;
use chainidx_core::schema::Hash32;
use chainidx_proto as pb;
use chainidx_proto::worker_client::WorkerClient;
use futures::future::join_all;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use tonic::transport::Channel;

/// Calls the shard's serving replicas in order until one answers: a replica that is down (refused, reset,
/// timed out) costs one failed attempt, not a failed query.
async fn on_replica<T, F, Fut>(replicas: &[Replica], call: F) -> Result<T, tonic::Status>
where
    F: Fn(WorkerClient<Channel>) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let mut last = tonic::Status::unavailable("no live replica holds this shard");
    for replica in replicas {
        match tokio::time::timeout(REPLICA_TIMEOUT, call(replica.client.clone())).await {
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

/// Asks the given shards with one call per worker: each shard goes to its first serving replica, and the
/// calls run concurrently. The shards of a worker that is down (or no longer serves one of them) are asked
/// again of their next replica, grouped the same way. Returns one answer per call that succeeded.
async fn per_worker<T, F, Fut>(routes: &[Route], call: F) -> Result<Vec<T>, tonic::Status>
where
    F: Fn(Vec<u32>, WorkerClient<Channel>) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let replicas: HashMap<u32, &[Replica]> = routes
        .iter()
        .map(|(status, replicas)| (status.shard_id, replicas.as_slice()))
        .collect();
    let mut pending: Vec<u32> = routes.iter().map(|(status, _)| status.shard_id).collect();
    let mut answers = Vec::new();
    let mut last = tonic::Status::unavailable("no live replica holds this shard");
    for attempt in 0.. {
        if pending.is_empty() {
            break;
        }
        let mut calls: BTreeMap<&str, (WorkerClient<Channel>, Vec<u32>)> = BTreeMap::new();
        for shard in pending.drain(..) {
            let Some(replica) = replicas[&shard].get(attempt) else {
                return Err(last);
            };
            calls
                .entry(&replica.worker)
                .or_insert_with(|| (replica.client.clone(), Vec::new()))
                .1
                .push(shard);
        }
        let replies = join_all(calls.into_values().map(|(client, shards)| async {
            let reply = tokio::time::timeout(REPLICA_TIMEOUT, call(shards.clone(), client)).await;
            (shards, reply)
        }))
        .await;
        for (shards, reply) in replies {
            match reply {
                Ok(Ok(reply)) => answers.push(reply.into_inner()),
                Ok(Err(status)) if replica_down(&status) => {
                    last = status;
                    pending.extend(shards);
                }
                Ok(Err(status)) => return Err(status),
                Err(_) => {
                    last = tonic::Status::deadline_exceeded("replica did not answer in time");
                    pending.extend(shards);
                }
            }
        }
    }
    Ok(answers)
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

    pub async fn address_stats(&self, sh: &ScriptHash) -> Result<pb::AddressStats, ApiError> {
        let routes = self.routes()?;
        let tip = self.cluster.pinned_tip();
        let sums = per_worker(&routes, |shard_ids, mut client| {
            let request = pb::ShardAddressRequest {
                shard_ids,
                scripthash: sh.to_vec(),
                tip,
            };
            async move { client.address_summary(request).await }
        })
        .await?;
        let mut total = pb::AddressStats::default();
        for sum in &sums {
            chainidx_node::service::add_to(&mut total, sum);
        }
        Ok(total)
    }

    /// Up to `limit` txs touching `sh`, newest first, strictly older than `before`. Returns the page and
    /// the cursor of its last tx if more may follow.
    pub async fn history(
        &self,
        sh: &ScriptHash,
        before: Option<Cursor>,
        limit: usize,
    ) -> Result<(Vec<pb::TxDetail>, Option<Cursor>), ApiError> {
        // One round: every worker is asked for its newest `limit` txs over its shards that can hold txs
        // older than the cursor (it skips shards whose stats rule the address out, and stops reading once
        // its page is full). The page is the newest `limit` of those answers.
        let all = self.routes()?;
        let tip = self.cluster.pinned_tip();
        let total = all.len();
        let routes: Vec<Route> = all
            .into_iter()
            .filter(|(status, _)| before.is_none_or(|(h, _)| status.start_height <= h))
            .collect();
        let pages = per_worker(&routes, |shard_ids, mut client| {
            let request = pb::ShardHistoryRequest {
                shard_ids,
                scripthash: sh.to_vec(),
                has_cursor: before.is_some(),
                before_height: before.map_or(0, |c| c.0),
                before_position: before.map_or(0, |c| c.1),
                limit: limit as u32,
                tip,
            };
            async move { client.address_history(request).await }
        })
        .await?;
        let scanned = pages.iter().map(|p| p.shards_scanned as usize).sum();
        self.cluster.fan_out.count(total, scanned);
        let mut page: Vec<pb::TxDetail> = pages.into_iter().flat_map(|p| p.txs).collect();
        page.sort_by_key(|tx| std::cmp::Reverse(position(tx)));
        page.truncate(limit);
        let next = if page.len() == limit {
            page.last().map(position)
        } else {
            None
        };
        Ok((page, next))
    }

    pub async fn utxos(&self, sh: &ScriptHash) -> Result<Vec<pb::Utxo>, ApiError> {
        let routes = self.routes()?;
        let tip = self.cluster.pinned_tip();
        let lists = per_worker(&routes, |shard_ids, mut client| {
            let request = pb::ShardAddressRequest {
                shard_ids,
                scripthash: sh.to_vec(),
                tip,
            };
            async move { client.address_utxos(request).await }
        })
        .await?;
        let scanned = lists.iter().map(|l| l.shards_scanned as usize).sum();
        self.cluster.fan_out.count(routes.len(), scanned);
        let mut utxos: Vec<pb::Utxo> = lists.into_iter().flat_map(|l| l.utxos).collect();
        // Newest first, like the history.
        utxos.sort_by_key(|u| {
            let s = u.status.clone().unwrap_or_default();
            std::cmp::Reverse((s.height, s.position, u.vout))
        });
        Ok(utxos)
    }

    /// Asks every worker for its shards; a txid lives in exactly one shard (for BIP30 duplicates, the
    /// newest wins). Not in any shard: the mempool, unconfirmed.
    pub async fn tx(&self, txid: &Hash32) -> Result<pb::TxDetail, ApiError> {
        let routes = self.routes()?;
        let tip = self.cluster.pinned_tip();
        let replies = per_worker(&routes, |shard_ids, mut client| {
            let request = pb::ShardTxRequest {
                shard_ids,
                txid: txid.to_vec(),
                tip,
            };
            async move { client.get_tx(request).await }
        })
        .await?;
        if let Some(found) = replies
            .into_iter()
            .filter_map(|reply| reply.tx.filter(|_| reply.found))
            .max_by_key(position)
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
        let routes = self.routes()?;
        let tip = self.cluster.pinned_tip();
        let replies = per_worker(&routes, |shard_ids, mut client| {
            let request = pb::ShardTxRequest {
                shard_ids,
                txid: txid.to_vec(),
                tip,
            };
            async move { client.outspends(request).await }
        })
        .await?;
        // Two replies only for a BIP30 duplicate: its outputs are the later tx's.
        let mut outspends = replies
            .into_iter()
            .filter(|reply| reply.found)
            .max_by_key(|reply| reply.height)
            .map(|reply| reply.outspends)
            .ok_or_else(|| {
                ApiError::NotFound(format!("transaction {} not found", display(txid)))
            })?;
        // Owners record where a spender is, not its txid: a second round asks the spenders' shards.
        let spent: Vec<(u32, &mut pb::Outspend)> = (0u32..)
            .zip(outspends.iter_mut())
            .filter(|(_, o)| o.spent)
            .collect();
        if spent.is_empty() {
            return Ok(outspends);
        }
        let spends: Vec<pb::SpendRef> = spent
            .iter()
            .map(|(vout, o)| pb::SpendRef {
                prev_txid: txid.to_vec(),
                prev_vout: *vout,
                spender_vin: o.vin,
                spender_height: o.height,
                spender_position: o.position,
            })
            .collect();
        let routes: Vec<Route> = self
            .routes()?
            .into_iter()
            .filter(|(status, _)| {
                spends.iter().any(|s| {
                    status.start_height <= s.spender_height && s.spender_height < status.end_height
                })
            })
            .collect();
        let replies = per_worker(&routes, |shard_ids, mut client| {
            let request = pb::TxidsAtRequest {
                shard_ids,
                spends: spends.clone(),
            };
            async move { client.txids_at(request).await }
        })
        .await?;
        for (index, (_, outspend)) in spent.into_iter().enumerate() {
            outspend.txid = replies
                .iter()
                .filter_map(|reply| reply.txids.get(index))
                .find(|txid| !txid.is_empty())
                .cloned()
                .ok_or_else(|| {
                    ApiError::Unavailable(format!(
                        "the spender of an output of {} (block {}, tx {}) is not indexed",
                        display(txid),
                        outspend.height,
                        outspend.position
                    ))
                })?;
        }
        Ok(outspends)
    }

    /// The block at `height`, if the served tip has reached it.
    pub async fn block_at(
        &self,
        height: u32,
        with_txids: bool,
    ) -> Result<pb::BlockLookup, ApiError> {
        self.block_as_of(height, with_txids, self.cluster.pinned_tip())
            .await
    }

    /// The block at `height` as the shards hold it, served or not: what the coordinator compares with the
    /// source to find a fork. Pinned to the served tip, blocks indexed above it (a catch-up that failed
    /// before the tip moved) would look missing and the comparison would never get past them.
    pub async fn stored_block_at(&self, height: u32) -> Result<pb::BlockLookup, ApiError> {
        self.block_as_of(height, false, None).await
    }

    async fn block_as_of(
        &self,
        height: u32,
        with_txids: bool,
        tip: Option<u32>,
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
            tip,
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
        let tip = self.cluster.pinned_tip();
        let replies = self
            .ask_every_shard(|shard_id, mut client| {
                let request = pb::ShardBlockRequest {
                    shard_id,
                    key: Some(pb::shard_block_request::Key::Hash(hash.to_vec())),
                    with_txids,
                    tip,
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
        // The served height itself, read once: pinning again could read a tip lowered meanwhile.
        self.block_as_of(height, false, None).await
    }
}

/// Display order (byte-reversed hex) of a txid or block hash.
/// Where a tx sits in the chain: pages are ordered by it, newest first.
fn position(tx: &pb::TxDetail) -> Cursor {
    tx.status
        .as_ref()
        .map_or((0, 0), |s| (s.height, s.position))
}

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
