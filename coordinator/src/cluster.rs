//! A coordinator replica's view of the cluster: the replicated [`pb::ClusterState`] (workers, shard map,
//! replicas, checkpoints, tip) as Raft last applied it, plus what only this process knows: gRPC clients,
//! the Raft leader and members, and on the leader the live statuses and leases of the workers.

use chainidx_proto as pb;
use chainidx_proto::worker_client::WorkerClient;
use std::collections::HashMap;
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;
use tonic::transport::Channel;

#[derive(Clone)]
pub struct WorkerEntry {
    /// Stable identity across restarts (the worker's data directory unless named otherwise).
    pub name: String,
    pub addr: String,
    pub client: WorkerClient<Channel>,
    /// Bumped each time the worker registers again (it restarted): its shards must be handed back.
    pub generation: u64,
}

/// The Raft side of the view, refreshed from openraft's metrics.
#[derive(Clone, Default)]
pub struct RaftView {
    pub this: u64,
    pub leader: Option<u64>,
    pub term: u64,
    pub members: Vec<pb::CoordinatorMember>,
}

impl RaftView {
    pub fn is_leader(&self) -> bool {
        self.leader == Some(self.this)
    }

    pub fn leader_addr(&self) -> Option<String> {
        let leader = self.leader?;
        self.members
            .iter()
            .find(|m| m.id == leader)
            .map(|m| m.grpc_addr.clone())
    }
}

#[derive(Default)]
pub struct ClusterView {
    /// Replicated: what every coordinator agrees on.
    pub state: pb::ClusterState,
    /// `state.workers` with a client each.
    pub workers: Vec<WorkerEntry>,
    pub raft: RaftView,
    /// Leader only: each (shard, worker) status from the latest poll.
    pub live: HashMap<(u32, String), pb::ShardStatus>,
    /// Leader only: when each worker's last heartbeat arrived.
    pub heartbeats: HashMap<String, Instant>,
    /// When this replica last became leader: leases granted by an earlier leader are honoured in full
    /// from then on, since their expiry is not replicated.
    pub leader_since: Option<Instant>,
}

/// How much the per-shard stats save: shards ruled out before asking for history or UTXO rows.
#[derive(Default)]
pub struct FanOutCounters {
    pub queries: AtomicU64,
    pub asked: AtomicU64,
    pub skipped: AtomicU64,
}

impl FanOutCounters {
    pub fn count(&self, total: usize, asked: usize) {
        self.queries.fetch_add(1, Ordering::Relaxed);
        self.asked.fetch_add(asked as u64, Ordering::Relaxed);
        self.skipped
            .fetch_add((total - asked) as u64, Ordering::Relaxed);
    }
}

pub struct Cluster {
    pub network: bitcoin::Network,
    pub view: RwLock<ClusterView>,
    pub fan_out: FanOutCounters,
    clients: std::sync::Mutex<HashMap<String, WorkerClient<Channel>>>,
}

/// A shard as queries see it: its checkpoint and the clients of its serving replicas, first choice first.
pub type Route = (pb::ShardStatus, Vec<Replica>);

/// One serving copy of a shard: the worker's name groups a query's shards into one call per worker.
#[derive(Clone)]
pub struct Replica {
    pub worker: String,
    pub client: WorkerClient<Channel>,
}

impl Cluster {
    pub fn new(network: bitcoin::Network) -> Cluster {
        Cluster {
            network,
            view: RwLock::new(ClusterView::default()),
            clients: Default::default(),
            fan_out: FanOutCounters::default(),
        }
    }

    pub fn read(&self) -> std::sync::RwLockReadGuard<'_, ClusterView> {
        self.view.read().expect("cluster lock")
    }

    pub fn write(&self) -> std::sync::RwLockWriteGuard<'_, ClusterView> {
        self.view.write().expect("cluster lock")
    }

    /// A lazily connecting client for a worker address, cached.
    pub fn client(&self, addr: &str) -> WorkerClient<Channel> {
        let mut clients = self.clients.lock().expect("clients lock");
        if let Some(client) = clients.get(addr) {
            return client.clone();
        }
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .expect("worker addresses are host:port")
            .connect_timeout(std::time::Duration::from_millis(500))
            .tcp_nodelay(true)
            .connect_lazy();
        let client = WorkerClient::new(channel)
            .max_decoding_message_size(chainidx_node::worker::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(chainidx_node::worker::MAX_MESSAGE_BYTES);
        clients.insert(addr.to_string(), client.clone());
        client
    }

    /// Called by the Raft state machine after each apply.
    pub fn set_state(&self, state: pb::ClusterState) {
        let workers: Vec<WorkerEntry> = state
            .workers
            .iter()
            .map(|w| WorkerEntry {
                name: w.name.clone(),
                addr: w.grpc_addr.clone(),
                client: self.client(&w.grpc_addr),
                generation: w.generation,
            })
            .collect();
        let mut view = self.write();
        view.state = state;
        view.workers = workers;
    }

    pub fn set_raft(&self, raft: RaftView) {
        let mut view = self.write();
        if raft.is_leader() && !view.raft.is_leader() {
            view.leader_since = Some(Instant::now());
            view.heartbeats.clear();
            view.live.clear();
        }
        if !raft.is_leader() {
            view.leader_since = None;
        }
        view.raft = raft;
    }

    pub fn worker(&self, name: &str) -> Option<WorkerEntry> {
        self.read().workers.iter().find(|w| w.name == name).cloned()
    }

    /// Shards in height order with their serving replicas.
    pub fn routes(&self) -> Vec<Route> {
        let view = self.read();
        view.state
            .shards
            .iter()
            .map(|s| {
                let clients = s
                    .replicas
                    .iter()
                    .filter_map(|name| view.workers.iter().find(|w| &w.name == name))
                    .map(|w| Replica {
                        worker: w.name.clone(),
                        client: w.client.clone(),
                    })
                    .collect();
                (crate::state::shard_status(s), clients)
            })
            .collect()
    }

    /// Every shard with the addresses of its replicas (serving and joining: spends must reach both).
    pub fn peers(&self) -> Vec<pb::ShardPeer> {
        let view = self.read();
        view.state
            .shards
            .iter()
            .map(|s| {
                let status = crate::state::shard_status(s);
                let addrs: Vec<String> = s
                    .replicas
                    .iter()
                    .chain(&s.joining)
                    .filter_map(|name| view.workers.iter().find(|w| &w.name == name))
                    .map(|w| w.addr.clone())
                    .collect();
                pb::ShardPeer {
                    shard_id: status.shard_id,
                    start_height: status.start_height,
                    end_height: status.end_height,
                    grpc_addr: addrs.first().cloned().unwrap_or_default(),
                    replica_addrs: addrs,
                }
            })
            .collect()
    }

    /// The tip queries see: while following, the last height whose catch-up (indexing and resolution)
    /// finished; during the backfill, the highest height below which every block is indexed.
    pub fn served_tip(&self) -> Option<u32> {
        let view = self.read();
        if view.state.following {
            return view.state.has_tip.then_some(view.state.tip);
        }
        drop(view);
        self.indexed_tip()
    }

    /// The height a query answers as of, which its every shard and replica is asked to hold to: the served
    /// tip while following the source (a block being caught up, on one replica before another, or being
    /// rolled back is left out until the tip moves). None during the backfill, whose answers hold what the
    /// shards have indexed so far (a shard then has most of its blocks above the contiguous indexed tip,
    /// and a summary would have to count all of them back out).
    pub fn pinned_tip(&self) -> Option<u32> {
        let view = self.read();
        (view.state.following && view.state.has_tip).then_some(view.state.tip)
    }

    /// The highest height below which every block is indexed (phase 1 at least), per the replicated
    /// checkpoints.
    pub fn indexed_tip(&self) -> Option<u32> {
        let view = self.read();
        let mut tip = None;
        for shard in &view.state.shards {
            let s = crate::state::shard_status(shard);
            if s.next_height > s.start_height {
                tip = Some(s.next_height - 1);
            }
            if s.next_height < s.end_height {
                break;
            }
        }
        tip
    }

    pub fn halted(&self) -> Option<String> {
        let view = self.read();
        (!view.state.halted.is_empty()).then(|| view.state.halted.clone())
    }

    pub fn status(&self) -> pb::ClusterStatusReply {
        let view = self.read();
        let addr = |name: &String| {
            view.workers
                .iter()
                .find(|w| &w.name == name)
                .map(|w| w.addr.clone())
                .unwrap_or_else(|| name.clone())
        };
        let state = &view.state;
        let live_workers = match view.leader_since {
            Some(_) => view
                .workers
                .iter()
                .filter(|w| {
                    view.heartbeats
                        .get(&w.name)
                        .is_some_and(|t| t.elapsed() < crate::lease::EXPIRED_AFTER)
                })
                .map(|w| w.addr.clone())
                .collect(),
            None => Vec::new(),
        };
        pb::ClusterStatusReply {
            tip_height: state.tip,
            backfill_complete: state.backfill_complete,
            shards: state
                .shards
                .iter()
                .map(|s| pb::ShardStatus {
                    owner: s.replicas.first().map(addr).unwrap_or_default(),
                    replicas: s.replicas.iter().map(addr).collect(),
                    joining: s.joining.iter().map(addr).collect(),
                    epoch: s.epoch,
                    ..crate::state::shard_status(s)
                })
                .collect(),
            workers: view.workers.iter().map(|w| w.addr.clone()).collect(),
            worker_names: view.workers.iter().map(|w| w.name.clone()).collect(),
            network: self.network.to_string(),
            halted: state.halted.clone(),
            source_tip: if state.source_tip > 0 {
                state.source_tip
            } else {
                state.tip
            },
            following: state.following,
            this_coordinator: view.raft.this,
            leader: view.raft.leader.unwrap_or(0),
            leader_addr: view.raft.leader_addr().unwrap_or_default(),
            raft_term: view.raft.term,
            members: view.raft.members.clone(),
            replication: state.replication,
            live_workers,
            history_queries: self.fan_out.queries.load(Ordering::Relaxed),
            shards_asked: self.fan_out.asked.load(Ordering::Relaxed),
            shards_skipped: self.fan_out.skipped.load(Ordering::Relaxed),
        }
    }
}
