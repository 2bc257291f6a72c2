//! Drives a backfill: plan shards over [0, tip], hand them to workers, poll progress, and start each
//! shard's cross-shard resolution once every earlier shard has finished phase 1.

use crate::cluster::{Cluster, ShardEntry, WorkerEntry};
use crate::router::QueryRouter;
use bitcoin::BlockHash;
use bitcoin::hashes::Hash;
use chainidx_core::source::BlockSource;
use chainidx_proto as pb;
use std::sync::Arc;
use std::time::Duration;

const POLL: Duration = Duration::from_millis(200);

pub struct BackfillPlan {
    pub shard_blocks: u32,
    pub min_workers: usize,
    /// Deepest reorg rolled back; a deeper one halts the index.
    pub reorg_limit: u32,
    /// How often the source's tip is checked once the backfill is complete.
    pub follow_every: Duration,
}

/// Splits [0, tip] into ranges of `shard_blocks` blocks.
pub fn plan_shards(tip: u32, shard_blocks: u32) -> Vec<(u32, u32)> {
    let shard_blocks = shard_blocks.max(1);
    (0..=tip / shard_blocks)
        .map(|i| (i * shard_blocks, ((i + 1) * shard_blocks).min(tip + 1)))
        .collect()
}

pub async fn drive(
    cluster: Arc<Cluster>,
    router: QueryRouter,
    source: Arc<dyn BlockSource>,
    plan: BackfillPlan,
) {
    let tip = loop {
        let source = source.clone();
        match tokio::task::spawn_blocking(move || source.tip_height()).await {
            Ok(Ok(tip)) => break tip,
            Ok(Err(error)) => tracing::warn!(%error, "source tip unavailable; retrying"),
            Err(error) => tracing::warn!(%error, "tip task failed; retrying"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    cluster.write().tip = Some(tip);
    tracing::info!(tip, source = %source.describe(), "planning backfill");

    while cluster.read().workers.len() < plan.min_workers.max(1) {
        tokio::time::sleep(POLL).await;
    }
    let workers: Vec<WorkerEntry> = cluster.read().workers.clone();
    let mut generations: Vec<u64> = workers.iter().map(|w| w.generation).collect();
    {
        let mut view = cluster.write();
        view.shards = plan_shards(tip, plan.shard_blocks)
            .into_iter()
            .enumerate()
            .map(|(i, (start, end))| ShardEntry {
                status: pb::ShardStatus {
                    shard_id: i as u32,
                    start_height: start,
                    end_height: end,
                    phase: pb::ShardPhase::Indexing as i32,
                    next_height: start,
                    ..Default::default()
                },
                owner: i % workers.len(),
                resolve_sent: false,
            })
            .collect();
    }
    tracing::info!(
        shards = cluster.read().shards.len(),
        workers = workers.len(),
        "assigning shards"
    );

    let assignments: Vec<(pb::ShardStatus, usize)> = cluster.shard_owners();
    for (status, owner) in assignments {
        assign(&cluster, &status, owner).await;
    }

    loop {
        hand_back_after_restarts(&cluster, &mut generations).await;
        // Complete only on fresh news from every worker: a dead worker's last report may say "ready".
        let all_answered = poll_workers(&cluster).await;
        start_ready_resolutions(&cluster).await;
        let complete = all_answered
            && cluster
                .read()
                .shards
                .iter()
                .all(|s| s.status.phase == pb::ShardPhase::Ready as i32);
        if complete {
            let mut view = cluster.write();
            view.backfill_complete = true;
            view.following = true;
            drop(view);
            tracing::info!(tip, "backfill complete; following the source's tip");
            break;
        }
        tokio::time::sleep(POLL).await;
    }

    loop {
        tokio::time::sleep(plan.follow_every).await;
        if cluster.read().halted.is_some() {
            continue;
        }
        hand_back_after_restarts(&cluster, &mut generations).await;
        if let Err(error) = follow_once(&cluster, &router, &source, plan.reorg_limit).await {
            tracing::warn!(%error, "following the tip failed; will retry");
        }
        let all_answered = poll_workers(&cluster).await;
        let complete = all_answered
            && cluster
                .read()
                .shards
                .iter()
                .all(|s| s.status.phase == pb::ShardPhase::Ready as i32);
        cluster.write().backfill_complete = complete;
        if let Err(error) = crate::mempool::sync(router.mempool(), &router, &source).await {
            tracing::warn!(%error, "mempool sync failed; will retry");
        }
    }
}

async fn blocking_source<T: Send + 'static>(
    source: &Arc<dyn BlockSource>,
    f: impl FnOnce(&dyn BlockSource) -> Result<T, chainidx_core::source::SourceError> + Send + 'static,
) -> Result<T, String> {
    let source = source.clone();
    tokio::task::spawn_blocking(move || f(source.as_ref()))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
}

/// The hash of our block at `height`, as the shard holding it stored it.
async fn stored_hash(router: &QueryRouter, height: u32) -> Result<BlockHash, String> {
    let block = router
        .block_at(height, false)
        .await
        .map_err(|e| e.to_string())?;
    let hash = block.meta.map(|m| m.hash).unwrap_or_default();
    let hash: [u8; 32] = hash
        .as_slice()
        .try_into()
        .map_err(|_| format!("no stored hash at {height}"))?;
    Ok(BlockHash::from_byte_array(hash))
}

/// One step of following the source: roll back blocks the source no longer has (up to `reorg_limit`
/// deep; deeper halts the index), then index the new blocks shard by shard, the last shard growing.
async fn follow_once(
    cluster: &Arc<Cluster>,
    router: &QueryRouter,
    source: &Arc<dyn BlockSource>,
    reorg_limit: u32,
) -> Result<(), String> {
    let workers = cluster.read().workers.clone();
    let source_tip = blocking_source(source, |s| s.tip_height()).await?;
    cluster.write().source_tip = Some(source_tip);
    let ours = cluster.indexed_tip().ok_or("nothing indexed")?;
    // The highest height where our chain and the source's agree.
    let mut fork = ours.min(source_tip);
    loop {
        let theirs = blocking_source(source, move |s| s.block_hash(fork)).await?;
        if stored_hash(router, fork).await? == theirs {
            break;
        }
        if fork == 0 || ours - fork >= reorg_limit {
            let why = format!(
                "the source replaced blocks below height {fork}: a reorg deeper than the limit of {reorg_limit}; \
                 re-index from a fresh data directory"
            );
            tracing::error!(ours, source_tip, "{why}");
            cluster.write().halted = Some(why);
            return Ok(());
        }
        fork -= 1;
    }
    if fork == ours && source_tip == ours {
        return Ok(());
    }
    let peers = cluster.peers();
    let shards: Vec<(pb::ShardStatus, usize)> = cluster.shard_owners();
    if fork < ours {
        // Queries stop seeing the blocks being removed before they go.
        cluster.write().tip = Some(fork);
        tracing::warn!(depth = ours - fork, fork, "reorg: rolling back");
        for (status, owner) in shards.iter().rev() {
            if status.next_height > fork + 1 {
                let request = pb::RollbackRequest {
                    shard_id: status.shard_id,
                    from_height: fork + 1,
                    peers: peers.clone(),
                };
                workers[*owner]
                    .client
                    .clone()
                    .rollback(request)
                    .await
                    .map_err(|e| e.message().to_string())?;
            }
        }
        let _ = poll_workers(cluster).await;
    }
    // Fresh statuses: a rollback moved checkpoints back.
    let shards: Vec<(pb::ShardStatus, usize)> = cluster.shard_owners();
    let last = shards.len() - 1;
    for (i, (status, owner)) in shards.iter().enumerate() {
        let behind = if i == last {
            status.next_height <= source_tip
        } else {
            status.next_height < status.end_height
        };
        if status.start_height > source_tip || !behind {
            continue;
        }
        let request = pb::CatchUpRequest {
            shard_id: status.shard_id,
            tip_height: source_tip,
            extend: i == last,
            peers: peers.clone(),
        };
        workers[*owner]
            .client
            .clone()
            .catch_up(request)
            .await
            .map_err(|e| e.message().to_string())?;
    }
    let _ = poll_workers(cluster).await;
    cluster.write().tip = Some(source_tip);
    tracing::info!(tip = source_tip, "followed the tip");
    Ok(())
}

/// Hands a shard to its owner; the worker opens (or reopens) it and resumes from its checkpoint.
async fn assign(cluster: &Cluster, status: &pb::ShardStatus, owner: usize) {
    let request = pb::AssignShardRequest {
        shard_id: status.shard_id,
        start_height: status.start_height,
        end_height: status.end_height,
    };
    loop {
        // Fresh each try: the worker may have restarted at another address.
        let worker = cluster.read().workers[owner].clone();
        match worker.client.clone().assign_shard(request).await {
            Ok(_) => return,
            Err(error) => {
                tracing::warn!(shard = status.shard_id, worker = %worker.addr, %error, "assign failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// A worker that registered again (restarted, e.g. after kill -9) gets its shards back; the ones not yet
/// ready are resolved again once their turn comes.
async fn hand_back_after_restarts(cluster: &Cluster, generations: &mut [u64]) {
    let workers = cluster.read().workers.clone();
    for (owner, worker) in workers.iter().enumerate().take(generations.len()) {
        if worker.generation == generations[owner] {
            continue;
        }
        generations[owner] = worker.generation;
        tracing::warn!(worker = %worker.name, addr = %worker.addr, "worker restarted; handing its shards back");
        let shards: Vec<pb::ShardStatus> = cluster
            .read()
            .shards
            .iter()
            .filter(|s| s.owner == owner)
            .map(|s| s.status.clone())
            .collect();
        for status in &shards {
            assign(cluster, status, owner).await;
        }
        let mut view = cluster.write();
        for shard in view.shards.iter_mut().filter(|s| s.owner == owner) {
            shard.resolve_sent = false;
        }
    }
}

/// Refreshes shard statuses from every worker; false if some worker did not answer.
async fn poll_workers(cluster: &Cluster) -> bool {
    let workers = cluster.read().workers.clone();
    let polls = workers.iter().map(|w| {
        let mut client = w.client.clone();
        async move {
            client
                .status(pb::WorkerStatusRequest {})
                .await
                .map(|r| r.into_inner())
        }
    });
    let replies = futures::future::join_all(polls).await;
    let all_answered = replies.iter().all(|r| r.is_ok());
    let mut view = cluster.write();
    for (worker, reply) in replies.into_iter().enumerate() {
        match reply {
            Ok(reply) => {
                for status in reply.shards {
                    if let Some(entry) = view.shards.get_mut(status.shard_id as usize)
                        && entry.owner == worker
                    {
                        if status.phase == pb::ShardPhase::Failed as i32
                            && entry.status.phase != status.phase
                        {
                            tracing::error!(shard = status.shard_id, error = %status.error, "shard failed");
                        }
                        // Resolution failed (a peer went away): ask again, with fresh peer addresses.
                        if status.phase == pb::ShardPhase::Resolving as i32
                            && !status.error.is_empty()
                            && entry.resolve_sent
                        {
                            tracing::warn!(shard = status.shard_id, error = %status.error, "resolution failed; retrying");
                            entry.resolve_sent = false;
                        }
                        entry.status = status;
                    }
                }
            }
            Err(error) => {
                tracing::warn!(worker = %workers[worker].addr, %error, "status poll failed")
            }
        }
    }
    all_answered
}

/// Phase 2 of shard k may start when shards 0..=k have all finished phase 1: everything it can spend exists.
async fn start_ready_resolutions(cluster: &Cluster) {
    let peers = cluster.peers();
    let to_start = {
        let view = cluster.read();
        let mut to_start = Vec::new();
        for shard in &view.shards {
            let phase = shard.status.phase;
            let indexed = phase == pb::ShardPhase::Indexed as i32
                || phase == pb::ShardPhase::Resolving as i32
                || phase == pb::ShardPhase::Ready as i32;
            if !indexed {
                break;
            }
            if (phase == pb::ShardPhase::Indexed as i32
                || phase == pb::ShardPhase::Resolving as i32)
                && !shard.resolve_sent
            {
                to_start.push((
                    shard.status.shard_id,
                    view.workers[shard.owner].client.clone(),
                ));
            }
        }
        to_start
    };
    for (shard_id, mut client) in to_start {
        let request = pb::ResolveShardRequest {
            shard_id,
            peers: peers.clone(),
        };
        match client.resolve_shard(request).await {
            Ok(_) => cluster.write().shards[shard_id as usize].resolve_sent = true,
            Err(error) => {
                tracing::warn!(shard = shard_id, %error, "resolve request failed; will retry")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_the_chain_exactly() {
        assert_eq!(plan_shards(9, 4), vec![(0, 4), (4, 8), (8, 10)]);
        assert_eq!(plan_shards(7, 4), vec![(0, 4), (4, 8)]);
        assert_eq!(plan_shards(0, 100), vec![(0, 1)]);
    }
}
