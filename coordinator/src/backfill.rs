//! The driver, run by the Raft leader only: plans shards over [0, tip], places each on `replication`
//! workers, polls progress, starts each shard's cross-shard resolution once every earlier shard has
//! finished phase 1, takes shards away from workers whose lease expired and rebuilds them elsewhere, then
//! follows the source's tip.
//!
//! Every decision others must survive (the plan, who holds which shard, checkpoints, the tip) is committed
//! through Raft *before* it is acted on, so a new leader picks up where the old one stopped: it hands every
//! shard to its recorded replicas again (idempotent on the workers) and carries on.

use crate::cluster::Cluster;
use crate::lease;
use crate::raft::Raft;
use crate::router::QueryRouter;
use bitcoin::BlockHash;
use bitcoin::hashes::Hash;
use chainidx_core::source::BlockSource;
use chainidx_proto as pb;
use pb::cluster_command::Command;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

const POLL: Duration = Duration::from_millis(200);

pub struct BackfillPlan {
    pub shard_blocks: u32,
    pub min_workers: usize,
    /// Workers holding each shard (default 1).
    pub replication: u32,
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

/// Runs the driver whenever this replica is the Raft leader, and stops it when it is not.
pub async fn drive(
    cluster: Arc<Cluster>,
    router: QueryRouter,
    source: Arc<dyn BlockSource>,
    raft: Raft,
    plan: BackfillPlan,
) {
    let plan = Arc::new(plan);
    loop {
        while !cluster.read().raft.is_leader() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tracing::info!(
            term = cluster.read().raft.term,
            "leading: driving the cluster"
        );
        let mut driver = Driver {
            cluster: cluster.clone(),
            router: router.clone(),
            source: source.clone(),
            raft: raft.clone(),
            plan: plan.clone(),
            generations: HashMap::new(),
            resolve_sent: HashSet::new(),
        };
        let lost = async {
            while cluster.read().raft.is_leader() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        tokio::select! {
            result = driver.lead() => {
                if let Err(error) = result {
                    tracing::warn!(%error, "driver stopped");
                }
            }
            _ = lost => tracing::warn!("no longer the leader: driver stopped"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

struct Driver {
    cluster: Arc<Cluster>,
    router: QueryRouter,
    source: Arc<dyn BlockSource>,
    raft: Raft,
    plan: Arc<BackfillPlan>,
    /// Worker generations this term has handed shards to.
    generations: HashMap<String, u64>,
    /// (shard, worker) pairs asked to resolve.
    resolve_sent: HashSet<(u32, String)>,
}

/// The workers that hold a copy of the shard: serving replicas, then joining ones.
fn holders(shard: &pb::ShardRecord) -> impl Iterator<Item = &String> {
    shard.replicas.iter().chain(&shard.joining)
}

fn indexed(phase: i32) -> bool {
    phase == pb::ShardPhase::Indexed as i32
        || phase == pb::ShardPhase::Resolving as i32
        || phase == pb::ShardPhase::Ready as i32
}

impl Driver {
    async fn commit(&self, command: Command) -> Result<(), String> {
        self.raft
            .client_write(pb::ClusterCommand {
                command: Some(command),
            })
            .await
            .map(|_| ())
            .map_err(|e| format!("raft write: {e}"))
    }

    fn state(&self) -> pb::ClusterState {
        self.cluster.read().state.clone()
    }

    async fn lead(&mut self) -> Result<(), String> {
        if !self.state().planned {
            let tip = loop {
                match blocking_source(&self.source, |s| s.tip_height()).await {
                    Ok(tip) => break tip,
                    Err(error) => tracing::warn!(%error, "source tip unavailable; retrying"),
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            };
            tracing::info!(tip, source = %self.source.describe(), "planning backfill");
            while self.state().workers.len() < self.plan.min_workers.max(1) {
                tokio::time::sleep(POLL).await;
            }
            let names: Vec<String> = self
                .state()
                .workers
                .iter()
                .map(|w| w.name.clone())
                .collect();
            let replication = (self.plan.replication.max(1) as usize).min(names.len());
            let shards = plan_shards(tip, self.plan.shard_blocks)
                .into_iter()
                .enumerate()
                .map(|(i, (start, end))| pb::ShardRecord {
                    status: Some(pb::ShardStatus {
                        shard_id: i as u32,
                        start_height: start,
                        end_height: end,
                        phase: pb::ShardPhase::Indexing as i32,
                        next_height: start,
                        ..Default::default()
                    }),
                    replicas: (0..replication)
                        .map(|k| names[(i + k) % names.len()].clone())
                        .collect(),
                    joining: Vec::new(),
                    epoch: 1,
                })
                .collect::<Vec<_>>();
            tracing::info!(
                shards = shards.len(),
                workers = names.len(),
                replication,
                "assigning shards"
            );
            self.commit(Command::Plan(pb::PlanShards {
                shards,
                tip,
                replication: replication as u32,
            }))
            .await?;
        }
        loop {
            self.maintain().await?;
            let state = self.state();
            if !state.halted.is_empty() {
                tokio::time::sleep(self.plan.follow_every).await;
                continue;
            }
            if state.following {
                if let Err(error) = self.follow_once().await {
                    tracing::warn!(%error, "following the tip failed; will retry");
                }
                if let Err(error) =
                    crate::mempool::sync(self.router.mempool(), &self.router, &self.source).await
                {
                    tracing::warn!(%error, "mempool sync failed; will retry");
                }
                tokio::time::sleep(self.plan.follow_every).await;
            } else {
                tokio::time::sleep(POLL).await;
            }
        }
    }

    /// One round of upkeep: hand shards to restarted workers, take shards from expired ones, keep every
    /// shard at its replication factor, refresh progress, start resolutions, promote rebuilt copies.
    async fn maintain(&mut self) -> Result<(), String> {
        self.hand_back().await;
        self.expire_leases().await?;
        self.replicate().await?;
        let all_answered = self.poll_workers().await;
        self.record_progress().await?;
        self.start_ready_resolutions().await;
        self.promote_rebuilt().await?;
        let state = self.state();
        let complete = all_answered
            && state.shards.iter().all(|s| {
                s.joining.is_empty()
                    && !s.replicas.is_empty()
                    && s.replicas.iter().all(|r| {
                        self.live(s, r)
                            .is_some_and(|l| l.phase == pb::ShardPhase::Ready as i32)
                    })
            });
        if !state.following && complete {
            tracing::info!(
                tip = state.tip,
                "backfill complete; following the source's tip"
            );
            self.commit(Command::Tip(pb::TipUpdate {
                tip: state.tip,
                following: true,
                backfill_complete: true,
                source_tip: state.source_tip.max(state.tip),
            }))
            .await?;
        } else if state.following && complete != state.backfill_complete {
            self.commit(Command::Tip(pb::TipUpdate {
                backfill_complete: complete,
                ..tip_update(&state)
            }))
            .await?;
        }
        Ok(())
    }

    fn live(&self, shard: &pb::ShardRecord, worker: &str) -> Option<pb::ShardStatus> {
        let id = crate::state::shard_status(shard).shard_id;
        self.cluster
            .read()
            .live
            .get(&(id, worker.to_string()))
            .cloned()
    }

    /// Hands a shard to one worker; it opens (or reopens) it and resumes from its checkpoint.
    async fn assign(&self, shard: &pb::ShardRecord, worker: &str) -> bool {
        let Some(entry) = self.cluster.worker(worker) else {
            return false;
        };
        let status = crate::state::shard_status(shard);
        let request = pb::AssignShardRequest {
            shard_id: status.shard_id,
            start_height: status.start_height,
            end_height: status.end_height,
            epoch: shard.epoch,
        };
        match entry.client.clone().assign_shard(request).await {
            Ok(_) => true,
            Err(error) => {
                tracing::warn!(shard = status.shard_id, worker = %entry.addr, %error, "assign failed; will retry");
                false
            }
        }
    }

    /// Workers this term has not handed their shards to yet (all of them when it starts, and any that
    /// registered again after a restart) get them now.
    async fn hand_back(&mut self) {
        let workers = self.cluster.read().workers.clone();
        let live = self.live_workers();
        for worker in workers {
            // Only workers holding a lease: the others are dead or have not found this leader yet.
            if self.generations.get(&worker.name) == Some(&worker.generation)
                || !live.contains(&worker.name)
            {
                continue;
            }
            if self.generations.contains_key(&worker.name) {
                tracing::warn!(worker = %worker.name, addr = %worker.addr, "worker restarted; handing its shards back");
            }
            let state = self.state();
            let mut all = true;
            for shard in state
                .shards
                .iter()
                .filter(|s| holders(s).any(|h| h == &worker.name))
            {
                all &= self.assign(shard, &worker.name).await;
                let id = crate::state::shard_status(shard).shard_id;
                self.resolve_sent.remove(&(id, worker.name.clone()));
            }
            if all {
                self.generations
                    .insert(worker.name.clone(), worker.generation);
            }
        }
    }

    /// Workers whose lease ran out lose their shards (see [`crate::lease`] for why no two writers overlap).
    async fn expire_leases(&mut self) -> Result<(), String> {
        let expired: Vec<String> = {
            let view = self.cluster.read();
            let Some(since) = view.leader_since else {
                return Ok(());
            };
            // A new leader gives everyone a second lease period to find it.
            if since.elapsed() < 2 * lease::EXPIRED_AFTER {
                return Ok(());
            }
            view.workers
                .iter()
                .filter(|w| {
                    let last = view.heartbeats.get(&w.name).copied().unwrap_or(since);
                    last.elapsed() > lease::EXPIRED_AFTER
                })
                .map(|w| w.name.clone())
                .collect()
        };
        if expired.is_empty() {
            return Ok(());
        }
        let state = self.state();
        for shard in &state.shards {
            if !holders(shard).any(|h| expired.contains(h)) {
                continue;
            }
            let id = crate::state::shard_status(shard).shard_id;
            let keep = |list: &Vec<String>| -> Vec<String> {
                list.iter()
                    .filter(|h| !expired.contains(h))
                    .cloned()
                    .collect()
            };
            tracing::warn!(shard = id, expired = ?expired, "lease expired: taking the shard away");
            self.commit(Command::SetReplicas(pb::ShardReplicas {
                shard_id: id,
                replicas: keep(&shard.replicas),
                joining: keep(&shard.joining),
            }))
            .await?;
        }
        Ok(())
    }

    /// Live workers: heartbeat within the lease.
    fn live_workers(&self) -> Vec<String> {
        let view = self.cluster.read();
        view.workers
            .iter()
            .filter(|w| {
                view.heartbeats
                    .get(&w.name)
                    .is_some_and(|t| t.elapsed() < lease::EXPIRED_AFTER)
            })
            .map(|w| w.name.clone())
            .collect()
    }

    /// Shards held by fewer workers than the replication factor get a new copy on the least-loaded live
    /// worker that lacks one; it builds the copy from the source ("joining") and serves once promoted.
    async fn replicate(&mut self) -> Result<(), String> {
        let state = self.state();
        let live = self.live_workers();
        let mut load: HashMap<&String, usize> = live.iter().map(|w| (w, 0)).collect();
        for shard in &state.shards {
            for h in holders(shard) {
                if let Some(n) = load.get_mut(h) {
                    *n += 1;
                }
            }
        }
        let want = state.replication.max(1) as usize;
        for shard in &state.shards {
            if holders(shard).count() >= want {
                continue;
            }
            let Some(target) = live
                .iter()
                .filter(|w| !holders(shard).any(|h| h == *w))
                .min_by_key(|w| load.get(w).copied().unwrap_or(0))
                .cloned()
            else {
                continue;
            };
            *load
                .entry(live.iter().find(|w| **w == target).expect("live"))
                .or_default() += 1;
            let id = crate::state::shard_status(shard).shard_id;
            let mut joining = shard.joining.clone();
            joining.push(target.clone());
            tracing::warn!(shard = id, worker = %target, "placing a new copy of the shard");
            self.commit(Command::SetReplicas(pb::ShardReplicas {
                shard_id: id,
                replicas: shard.replicas.clone(),
                joining,
            }))
            .await?;
            let updated = self.state().shards[id as usize].clone();
            self.assign(&updated, &target).await;
            self.resolve_sent.remove(&(id, target.clone()));
        }
        self.rebalance(&live).await
    }

    /// Once the backfill is done and no copy is being built, a live worker holding at least two copies fewer
    /// than another (one that just joined, say) gets one of its shards: built as a joining copy while the
    /// old one serves, then promoted, and only then the old copy is dropped ([`Driver::promote_rebuilt`]).
    /// One move at a time, so queries never lose a serving copy.
    async fn rebalance(&mut self, live: &[String]) -> Result<(), String> {
        let state = self.state();
        if !state.following || live.len() < 2 || state.shards.iter().any(|s| !s.joining.is_empty())
        {
            return Ok(());
        }
        let mut load: HashMap<&String, usize> = live.iter().map(|w| (w, 0)).collect();
        for shard in &state.shards {
            for h in holders(shard) {
                if let Some(n) = load.get_mut(h) {
                    *n += 1;
                }
            }
        }
        let (Some((&most, &high)), Some((&least, &low))) = (
            load.iter().max_by_key(|(w, n)| (**n, *w)),
            load.iter().min_by_key(|(w, n)| (**n, *w)),
        ) else {
            return Ok(());
        };
        if high < low + 2 {
            return Ok(());
        }
        let Some(shard) = state
            .shards
            .iter()
            .rev()
            .find(|s| s.replicas.contains(most) && !holders(s).any(|h| h == least))
        else {
            return Ok(());
        };
        let id = crate::state::shard_status(shard).shard_id;
        tracing::info!(shard = id, from = %most, to = %least, "rebalancing: moving a copy");
        self.commit(Command::SetReplicas(pb::ShardReplicas {
            shard_id: id,
            replicas: shard.replicas.clone(),
            joining: vec![least.clone()],
        }))
        .await?;
        let updated = self.state().shards[id as usize].clone();
        let least = least.clone();
        self.assign(&updated, &least).await;
        self.resolve_sent.remove(&(id, least));
        Ok(())
    }

    /// Refreshes every holder's status; false if some holder did not answer.
    async fn poll_workers(&mut self) -> bool {
        let workers = self.cluster.read().workers.clone();
        let state = self.state();
        let polls = workers.iter().map(|w| {
            let mut client = w.client.clone();
            async move {
                tokio::time::timeout(
                    Duration::from_secs(2),
                    client.status(pb::WorkerStatusRequest {}),
                )
                .await
                .map_err(|_| tonic::Status::deadline_exceeded("status poll timed out"))
                .and_then(|r| r.map(|r| r.into_inner()))
            }
        });
        let replies = futures::future::join_all(polls).await;
        let mut all_answered = true;
        let mut view = self.cluster.write();
        for (worker, reply) in workers.iter().zip(replies) {
            let holds: Vec<u32> = state
                .shards
                .iter()
                .filter(|s| holders(s).any(|h| h == &worker.name))
                .map(|s| crate::state::shard_status(s).shard_id)
                .collect();
            match reply {
                Ok(reply) => {
                    for status in reply.shards {
                        if !holds.contains(&status.shard_id) {
                            continue;
                        }
                        let key = (status.shard_id, worker.name.clone());
                        let before = view.live.get(&key).map(|s| s.phase);
                        if status.phase == pb::ShardPhase::Failed as i32
                            && before != Some(status.phase)
                        {
                            tracing::error!(shard = status.shard_id, worker = %worker.addr, error = %status.error, "shard failed");
                        }
                        // Resolution failed (a peer went away): ask again, with fresh peer addresses.
                        if status.phase == pb::ShardPhase::Resolving as i32
                            && !status.error.is_empty()
                            && self.resolve_sent.remove(&key)
                        {
                            tracing::warn!(shard = status.shard_id, error = %status.error, "resolution failed; retrying");
                        }
                        view.live.insert(key, status);
                    }
                }
                Err(error) => {
                    if !holds.is_empty() {
                        all_answered = false;
                        tracing::debug!(worker = %worker.addr, %error, "status poll failed");
                    }
                }
            }
        }
        all_answered
    }

    /// Commits checkpoints that moved, as reported by each shard's first serving replica (or, for a shard
    /// being rebuilt with no serving copy, its first joining one).
    async fn record_progress(&self) -> Result<(), String> {
        let state = self.state();
        let mut changed = Vec::new();
        for shard in &state.shards {
            let Some(live) = holders(shard).find_map(|h| self.live(shard, h)) else {
                continue;
            };
            let recorded = crate::state::shard_status(shard);
            let live = pb::ShardStatus {
                owner: String::new(),
                ..live
            };
            if live != recorded {
                changed.push(live);
            }
        }
        if changed.is_empty() {
            return Ok(());
        }
        self.commit(Command::Progress(pb::ShardProgress { statuses: changed }))
            .await
    }

    /// Phase 2 of shard k may start on a holder when every copy of shards 0..=k has finished phase 1:
    /// everything its inputs can spend exists wherever it will be asked.
    async fn start_ready_resolutions(&mut self) {
        let peers = self.cluster.peers();
        let state = self.state();
        for shard in &state.shards {
            let copies: Vec<(String, Option<pb::ShardStatus>)> = holders(shard)
                .map(|h| (h.clone(), self.live(shard, h)))
                .collect();
            if copies.is_empty()
                || copies
                    .iter()
                    .any(|(_, l)| !l.as_ref().is_some_and(|l| indexed(l.phase)))
            {
                break;
            }
            let id = crate::state::shard_status(shard).shard_id;
            for (worker, live) in copies {
                let phase = live.expect("checked").phase;
                let waiting = phase == pb::ShardPhase::Indexed as i32
                    || phase == pb::ShardPhase::Resolving as i32;
                if !waiting || self.resolve_sent.contains(&(id, worker.clone())) {
                    continue;
                }
                let Some(entry) = self.cluster.worker(&worker) else {
                    continue;
                };
                let request = pb::ResolveShardRequest {
                    shard_id: id,
                    peers: peers.clone(),
                };
                match entry.client.clone().resolve_shard(request).await {
                    Ok(_) => {
                        self.resolve_sent.insert((id, worker));
                    }
                    Err(error) => {
                        tracing::warn!(shard = id, %error, "resolve request failed; will retry")
                    }
                }
            }
        }
    }

    /// A rebuilt copy that is ready gets, from every later shard, the spends of its coins that the lost
    /// copy had recorded; then it serves.
    async fn promote_rebuilt(&mut self) -> Result<(), String> {
        let state = self.state();
        for shard in &state.shards {
            for joiner in &shard.joining {
                let ready = self
                    .live(shard, joiner)
                    .is_some_and(|l| l.phase == pb::ShardPhase::Ready as i32);
                let Some(entry) = self.cluster.worker(joiner) else {
                    continue;
                };
                if !ready {
                    continue;
                }
                let status = crate::state::shard_status(shard);
                let to = pb::ShardPeer {
                    shard_id: status.shard_id,
                    start_height: status.start_height,
                    end_height: status.end_height,
                    grpc_addr: entry.addr.clone(),
                    replica_addrs: vec![entry.addr.clone()],
                };
                let mut resent = 0;
                for later in state
                    .shards
                    .iter()
                    .filter(|l| crate::state::shard_status(l).start_height >= status.end_height)
                {
                    let later_id = crate::state::shard_status(later).shard_id;
                    // One serving copy that has resolved is enough; copies that have not will send to
                    // every holder when they resolve.
                    let Some(sender) = later.replicas.iter().find(|r| {
                        self.live(later, r).is_some_and(|l| {
                            l.phase == pb::ShardPhase::Ready as i32
                                || l.phase == pb::ShardPhase::Resolving as i32
                        })
                    }) else {
                        continue;
                    };
                    let Some(sender) = self.cluster.worker(sender) else {
                        continue;
                    };
                    let reply = sender
                        .client
                        .clone()
                        .resend_spends(pb::ResendSpendsRequest {
                            shard_id: later_id,
                            to: Some(to.clone()),
                        })
                        .await
                        .map_err(|e| {
                            format!("resending spends of shard {later_id}: {}", e.message())
                        });
                    match reply {
                        Ok(reply) => resent += reply.into_inner().recorded,
                        Err(error) => {
                            tracing::warn!(%error, "will retry the promotion");
                            return Ok(());
                        }
                    }
                }
                tracing::info!(shard = status.shard_id, worker = %joiner, resent, "rebuilt copy ready: serving");
                let mut replicas = shard.replicas.clone();
                replicas.push(joiner.clone());
                // A move (rebalancing) leaves one copy too many: drop the oldest, which stops writing as
                // soon as its lease no longer lists the shard.
                while replicas.len() > state.replication.max(1) as usize {
                    let dropped = replicas.remove(0);
                    tracing::info!(shard = status.shard_id, worker = %dropped, "copy moved away");
                }
                self.commit(Command::SetReplicas(pb::ShardReplicas {
                    shard_id: status.shard_id,
                    replicas,
                    joining: shard
                        .joining
                        .iter()
                        .filter(|j| *j != joiner)
                        .cloned()
                        .collect(),
                }))
                .await?;
                return Ok(()); // state changed: next round looks again
            }
        }
        Ok(())
    }

    /// One step of following the source: roll back blocks the source no longer has (up to `reorg_limit`
    /// deep; deeper halts the index), then index the new blocks shard by shard, the last shard growing.
    async fn follow_once(&mut self) -> Result<(), String> {
        let source_tip = blocking_source(&self.source, |s| s.tip_height()).await?;
        let ours = self.cluster.indexed_tip().ok_or("nothing indexed")?;
        let state = self.state();
        if source_tip != state.source_tip {
            self.commit(Command::Tip(pb::TipUpdate {
                source_tip,
                ..tip_update(&state)
            }))
            .await?;
        }
        // The highest height where our chain and the source's agree.
        let mut fork = ours.min(source_tip);
        loop {
            let theirs = blocking_source(&self.source, move |s| s.block_hash(fork)).await?;
            if stored_hash(&self.router, fork).await? == theirs {
                break;
            }
            if fork == 0 || ours - fork >= self.plan.reorg_limit {
                let why = format!(
                    "the source replaced blocks below height {fork}: a reorg deeper than the limit of {}; \
                     re-index from a fresh data directory",
                    self.plan.reorg_limit
                );
                tracing::error!(ours, source_tip, "{why}");
                return self.commit(Command::Halt(why)).await;
            }
            fork -= 1;
        }
        // Blocks indexed above the served tip: a catch-up that failed after indexing them, before their
        // inputs were resolved everywhere and the tip moved. Caught up again below (a catch-up with nothing
        // left to index resolves what is pending), or they would stay out of every answer.
        let unserved = state.has_tip && state.tip < ours;
        if fork == ours && source_tip == ours && !unserved {
            return Ok(());
        }
        let peers = self.cluster.peers();
        if fork < ours {
            // Queries stop seeing the blocks being removed before they go.
            let state = self.state();
            self.commit(Command::Tip(pb::TipUpdate {
                tip: fork,
                ..tip_update(&state)
            }))
            .await?;
            tracing::warn!(depth = ours - fork, fork, "reorg: rolling back");
            for shard in state.shards.iter().rev() {
                let status = crate::state::shard_status(shard);
                if status.next_height <= fork + 1 {
                    continue;
                }
                for holder in holders(shard) {
                    let client = self.cluster.worker(holder).ok_or("unknown worker")?.client;
                    let request = pb::RollbackRequest {
                        shard_id: status.shard_id,
                        from_height: fork + 1,
                        peers: peers.clone(),
                    };
                    client
                        .clone()
                        .rollback(request)
                        .await
                        .map_err(|e| e.message().to_string())?;
                }
            }
            self.poll_workers().await;
            self.record_progress().await?;
        }
        let state = self.state();
        let last = state.shards.len() - 1;
        for (i, shard) in state.shards.iter().enumerate() {
            let status = crate::state::shard_status(shard);
            let behind = if i == last {
                status.next_height <= source_tip
            } else {
                status.next_height < status.end_height
            };
            let unserved_here = unserved && status.next_height > state.tip + 1;
            let behind = behind || unserved_here;
            if status.start_height > source_tip || !behind {
                continue;
            }
            for holder in holders(shard) {
                let client = self.cluster.worker(holder).ok_or("unknown worker")?.client;
                let request = pb::CatchUpRequest {
                    shard_id: status.shard_id,
                    tip_height: source_tip,
                    extend: i == last,
                    peers: peers.clone(),
                };
                client
                    .clone()
                    .catch_up(request)
                    .await
                    .map_err(|e| e.message().to_string())?;
            }
        }
        self.poll_workers().await;
        self.record_progress().await?;
        let state = self.state();
        self.commit(Command::Tip(pb::TipUpdate {
            tip: source_tip,
            source_tip,
            ..tip_update(&state)
        }))
        .await?;
        tracing::info!(tip = source_tip, "followed the tip");
        Ok(())
    }
}

fn tip_update(state: &pb::ClusterState) -> pb::TipUpdate {
    pb::TipUpdate {
        tip: state.tip,
        following: state.following,
        backfill_complete: state.backfill_complete,
        source_tip: state.source_tip,
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
        .stored_block_at(height)
        .await
        .map_err(|e| e.to_string())?;
    let hash = block.meta.map(|m| m.hash).unwrap_or_default();
    let hash: [u8; 32] = hash
        .as_slice()
        .try_into()
        .map_err(|_| format!("no stored hash at {height}"))?;
    Ok(BlockHash::from_byte_array(hash))
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
