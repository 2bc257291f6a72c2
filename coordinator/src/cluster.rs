//! The coordinator's view of the cluster: workers, the shard map and each shard's progress.
//!
//! Held in memory for now; everything here is small and rebuilt from worker status polls.

use chainidx_proto as pb;
use chainidx_proto::worker_client::WorkerClient;
use std::sync::RwLock;
use tonic::transport::Channel;

#[derive(Clone)]
pub struct WorkerEntry {
    pub id: u32,
    /// Stable identity across restarts (the worker's data directory unless named otherwise).
    pub name: String,
    pub addr: String,
    pub client: WorkerClient<Channel>,
    /// Bumped each time the worker registers again (it restarted): its shards must be handed back.
    pub generation: u64,
}

#[derive(Clone)]
pub struct ShardEntry {
    pub status: pb::ShardStatus,
    /// Index into `workers`.
    pub owner: usize,
    pub resolve_sent: bool,
}

#[derive(Default)]
pub struct ClusterView {
    pub tip: Option<u32>,
    pub workers: Vec<WorkerEntry>,
    pub shards: Vec<ShardEntry>,
    pub backfill_complete: bool,
    /// Set once the backfill is done: from then on `tip` is the last height whose blocks are fully
    /// attributed (catch-up finished), which is what queries see.
    pub following: bool,
    /// The source's tip height at the last check.
    pub source_tip: Option<u32>,
    /// Set when the source reorganised deeper than the limit: queries are refused rather than answered
    /// from a chain the source no longer has.
    pub halted: Option<String>,
}

pub struct Cluster {
    pub network: bitcoin::Network,
    pub view: RwLock<ClusterView>,
}

impl Cluster {
    pub fn new(network: bitcoin::Network) -> Cluster {
        Cluster {
            network,
            view: RwLock::new(ClusterView::default()),
        }
    }

    pub fn read(&self) -> std::sync::RwLockReadGuard<'_, ClusterView> {
        self.view.read().expect("cluster lock")
    }

    pub fn write(&self) -> std::sync::RwLockWriteGuard<'_, ClusterView> {
        self.view.write().expect("cluster lock")
    }

    /// Shards with their owner's client, in height order.
    pub fn routes(&self) -> Vec<(pb::ShardStatus, WorkerClient<Channel>)> {
        let view = self.read();
        view.shards
            .iter()
            .map(|s| (s.status.clone(), view.workers[s.owner].client.clone()))
            .collect()
    }

    /// Each shard's last reported status and its owner (an index into `workers`), in height order.
    pub fn shard_owners(&self) -> Vec<(pb::ShardStatus, usize)> {
        self.read()
            .shards
            .iter()
            .map(|s| (s.status.clone(), s.owner))
            .collect()
    }

    /// Every shard as a peer address, for workers that must reach the others.
    pub fn peers(&self) -> Vec<pb::ShardPeer> {
        let view = self.read();
        view.shards
            .iter()
            .map(|s| pb::ShardPeer {
                shard_id: s.status.shard_id,
                start_height: s.status.start_height,
                end_height: s.status.end_height,
                grpc_addr: view.workers[s.owner].addr.clone(),
            })
            .collect()
    }

    /// The tip queries see: while following, the last height whose catch-up (indexing and resolution)
    /// finished; during the backfill, the highest height below which every block is indexed.
    pub fn served_tip(&self) -> Option<u32> {
        let view = self.read();
        if view.following {
            return view.tip;
        }
        drop(view);
        self.indexed_tip()
    }

    /// The highest height below which every block is indexed (phase 1 at least).
    pub fn indexed_tip(&self) -> Option<u32> {
        let view = self.read();
        let mut tip = None;
        for shard in &view.shards {
            let s = &shard.status;
            if s.next_height > s.start_height {
                tip = Some(s.next_height - 1);
            }
            if s.next_height < s.end_height {
                break;
            }
        }
        tip
    }

    pub fn status(&self) -> pb::ClusterStatusReply {
        let view = self.read();
        pb::ClusterStatusReply {
            tip_height: view.tip.unwrap_or(0),
            backfill_complete: view.backfill_complete,
            shards: view
                .shards
                .iter()
                .map(|s| pb::ShardStatus {
                    owner: view.workers[s.owner].addr.clone(),
                    ..s.status.clone()
                })
                .collect(),
            workers: view.workers.iter().map(|w| w.addr.clone()).collect(),
            network: self.network.to_string(),
            halted: view.halted.clone().unwrap_or_default(),
            source_tip: view.source_tip.or(view.tip).unwrap_or(0),
            following: view.following,
        }
    }
}
