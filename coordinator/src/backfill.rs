//! Drives a backfill: plan shards over [0, tip], hand them to workers, poll progress, and start each
//! shard's cross-shard resolution once every earlier shard has finished phase 1.

use crate::cluster::{Cluster, ShardEntry, WorkerEntry};
use chainidx_core::source::BlockSource;
use chainidx_proto as pb;
use std::sync::Arc;
use std::time::Duration;

const POLL: Duration = Duration::from_millis(200);

pub struct BackfillPlan {
    pub shard_blocks: u32,
    pub min_workers: usize,
}

/// Splits [0, tip] into ranges of `shard_blocks` blocks.
pub fn plan_shards(tip: u32, shard_blocks: u32) -> Vec<(u32, u32)> {
    let shard_blocks = shard_blocks.max(1);
    (0..=tip / shard_blocks)
        .map(|i| (i * shard_blocks, ((i + 1) * shard_blocks).min(tip + 1)))
        .collect()
}

pub async fn drive(cluster: Arc<Cluster>, source: Arc<dyn BlockSource>, plan: BackfillPlan) {
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

    let assignments: Vec<(pb::ShardStatus, usize)> = cluster
        .read()
        .shards
        .iter()
        .map(|s| (s.status.clone(), s.owner))
        .collect();
    for (status, owner) in assignments {
        let request = pb::AssignShardRequest {
            shard_id: status.shard_id,
            start_height: status.start_height,
            end_height: status.end_height,
        };
        let mut client = workers[owner].client.clone();
        // Assignment is idempotent on the worker; retry until it lands.
        while let Err(error) = client.assign_shard(request).await {
            tracing::warn!(shard = status.shard_id, worker = %workers[owner].addr, %error, "assign failed; retrying");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    loop {
        poll_workers(&cluster, &workers).await;
        start_ready_resolutions(&cluster).await;
        let complete = {
            let mut view = cluster.write();
            let complete = view
                .shards
                .iter()
                .all(|s| s.status.phase == pb::ShardPhase::Ready as i32);
            if complete && !view.backfill_complete {
                tracing::info!(tip, "backfill complete");
            }
            view.backfill_complete = complete;
            complete
        };
        tokio::time::sleep(if complete { POLL * 5 } else { POLL }).await;
    }
}

async fn poll_workers(cluster: &Cluster, workers: &[WorkerEntry]) {
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
                        entry.status = status;
                    }
                }
            }
            Err(error) => {
                tracing::warn!(worker = %workers[worker].addr, %error, "status poll failed")
            }
        }
    }
}

/// Phase 2 of shard k may start when shards 0..=k have all finished phase 1: everything it can spend exists.
async fn start_ready_resolutions(cluster: &Cluster) {
    let (to_start, peers) = {
        let view = cluster.read();
        let peers: Vec<pb::ShardPeer> = view
            .shards
            .iter()
            .map(|s| pb::ShardPeer {
                shard_id: s.status.shard_id,
                start_height: s.status.start_height,
                end_height: s.status.end_height,
                grpc_addr: view.workers[s.owner].addr.clone(),
            })
            .collect();
        let mut to_start = Vec::new();
        for shard in &view.shards {
            let phase = shard.status.phase;
            let indexed = phase == pb::ShardPhase::Indexed as i32
                || phase == pb::ShardPhase::Resolving as i32
                || phase == pb::ShardPhase::Ready as i32;
            if !indexed {
                break;
            }
            if phase == pb::ShardPhase::Indexed as i32 && !shard.resolve_sent {
                to_start.push((
                    shard.status.shard_id,
                    view.workers[shard.owner].client.clone(),
                ));
            }
        }
        (to_start, peers)
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
