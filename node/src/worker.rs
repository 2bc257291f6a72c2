//! A worker's shards and the two backfill phases that run on them.
//!
//! Phase 1 (index) runs one shard at a time per worker, with block fetch + decode on one thread and row
//! writing on another. Phase 2 (resolve) sends a shard's pending inputs, in batches, to the earlier shards
//! whose txid filters may hold their coins, nearest first (most coins are spent young), until each is
//! found.

use crate::failpoint::{self, failpoint};
use crate::rocks::RocksStore;
use crate::shard::{
    IndexWindow, PendingSpend, SealedWindow, Shard, ShardError, SpareWindow, WindowBuffers, Write,
    request_txid,
};
use crate::txid_filter::{TxidFilter, next_candidate};
use bitcoin::Block;
use bitcoin::consensus::deserialize;
use chainidx_core::schema::txid_key;
use chainidx_core::source::{BlockSource, SourceError, SpentCoin};
use chainidx_proto as pb;
use chainidx_proto::worker_client::WorkerClient;
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use tonic::transport::Channel;

/// What a peer is asked to do with spends of its coins.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Spends {
    Record,
    Forget,
}

/// A file in a shard's directory saying its after-backfill compaction finished: a worker restarted before
/// that compacts the shard again.
pub const COMPACTED_MARK: &str = "compacted";

/// Inputs resolved per round trip to a peer shard (`chainidx node --resolve-batch`). Each batch is a
/// table file per column family in the shard and its owners, and one stats merge per address: 60,000
/// instead of 20,000 took 1 worker on 1.98M txs from 23.1/23.5 to 22.2/21.9 CPU-s per million txs
/// (interleaved pairs); a batch holds ~15 MB.
pub const DEFAULT_RESOLVE_BATCH: usize = 60_000;
/// The most a worker holds of its peers' txid filters (1.5 bytes per tx: ~90M txs of earlier shards).
/// Memory stays flat however long the chain; shards past it, fetched last (the farthest from the shard
/// resolving then), are asked about every input, i.e. walked.
pub const TXID_FILTER_BUDGET_BYTES: usize = 128 << 20;
/// Generous: a history page can carry 1 MB transactions.
pub const MAX_MESSAGE_BYTES: usize = 256 << 20;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Shard(#[from] ShardError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("fetching block {height}: {source}")]
    Fetch { height: u32, source: SourceError },
    #[error("block at height {height} does not decode: {detail}")]
    Decode { height: u32, detail: String },
    #[error("shard {0} is not on this worker")]
    UnknownShard(u32),
    #[error("peer {addr}: {detail}")]
    Peer { addr: String, detail: String },
    #[error("input {txid}:{vin} at height {height} spends {prev}, which no earlier shard holds")]
    Unresolved {
        txid: String,
        vin: u32,
        height: u32,
        prev: String,
    },
    #[error("worker task failed: {0}")]
    Task(String),
    #[error("shard {0} was given to another worker")]
    Moved(u32),
    #[error("no lease for shard {0}: cut off from the coordinators, writing nothing")]
    NoLease(u32),
}

pub struct ShardSlot {
    pub shard: Arc<Shard>,
    error: Mutex<Option<String>>,
    /// Set while a phase-2 task runs, so a repeated request does not start a second one.
    resolving: AtomicBool,
    /// Held from reading a batch of `pending` rows to writing its attribution, and by rollbacks: a
    /// background resolution and a catch-up's must not both apply the same rows (stats added twice), nor a
    /// rollback remove rows between the read and the write.
    resolve_lock: tokio::sync::Mutex<()>,
}

impl ShardSlot {
    pub fn status(&self) -> pb::ShardStatus {
        let state = self.shard.state();
        let error = self.error.lock().expect("error lock").clone();
        // A failed resolution is retried by the coordinator (a peer may have restarted); other failures stop
        // the shard.
        let phase = if error.is_some() && state.phase != pb::ShardPhase::Resolving as i32 {
            pb::ShardPhase::Failed as i32
        } else {
            state.phase
        };
        pb::ShardStatus {
            shard_id: state.shard_id,
            start_height: state.start_height,
            end_height: state.end_height,
            owner: String::new(),
            phase,
            next_height: state.next_height,
            pending_inputs: state.pending_inputs,
            error: error.unwrap_or_default(),
            cross_shard_inputs: state.cross_shard_inputs,
            windows_committed: state.windows_committed,
            resolution_batches: state.resolution_batches,
            ..Default::default()
        }
    }

    fn fail(&self, error: &WorkerError) {
        tracing::error!(shard = self.shard.id, %error, "shard failed");
        *self.error.lock().expect("error lock") = Some(error.to_string());
    }
}

/// What the Raft leader last granted: until when this worker may write, and which shards.
#[derive(Default)]
struct Lease {
    /// Off for a worker run without coordinators (unit tests): every write is allowed.
    enforced: bool,
    until: Option<Instant>,
    shards: HashSet<u32>,
}

/// A shard that stays off a valid lease this long was given to another worker: stop trying.
const MOVED_AFTER: Duration = Duration::from_secs(3);

pub struct WorkerNode {
    source: Arc<dyn BlockSource>,
    data_dir: PathBuf,
    shards: RwLock<HashMap<u32, Arc<ShardSlot>>>,
    index_permits: Semaphore,
    /// Shards indexed at once.
    index_threads: usize,
    spare_windows: Mutex<SpareWindows>,
    /// Resolution batches in flight at once (as many as indexing threads): each holds ~60k inputs and
    /// their answers, and with every shard of a worker resolving together, memory grew with shard size.
    resolve_permits: Semaphore,
    peers: Mutex<HashMap<String, WorkerClient<Channel>>>,
    lease: Mutex<Lease>,
    /// Fault filter: drop everything to and from the coordinators (peers still pass).
    isolated: AtomicBool,
    spans: Mutex<HashMap<u32, pb::WriteSpan>>,
    peer_bytes: std::sync::atomic::AtomicU64,
    /// Whether a shard whose backfill is over is compacted (see [`WorkerNode::compact_in_background`]).
    compact_after_backfill: AtomicBool,
    /// One compaction at a time: each takes a core, and queries go on meanwhile.
    compactions: Arc<Semaphore>,
    compactions_queued: Arc<std::sync::atomic::AtomicU32>,
    /// What the coordinators last said (heartbeats); a worker run without them only knows its own shards.
    cluster_backfill_complete: AtomicBool,
    /// Txs per backfill window ([`WorkerNode::set_window_txs`]).
    window_txs: std::sync::atomic::AtomicUsize,
    /// Inputs per resolution batch ([`WorkerNode::set_resolve_batch`]).
    resolve_batch: std::sync::atomic::AtomicUsize,
    /// Memory for the coins of recent windows, shared by the shards being indexed
    /// ([`WorkerNode::set_recent_coins_bytes`]).
    recent_coins: Arc<crate::shard::RecentCoinsBudget>,
    /// Earlier shards' txid filters by shard id.
    txid_filters: Mutex<HashMap<u32, FetchedFilter>>,
    /// Bytes of peers' txid filters held at most ([`WorkerNode::set_txid_filter_budget`]).
    txid_filter_budget: std::sync::atomic::AtomicUsize,
    pub resolve_counts: ResolveCounts,
}

/// A peer shard's txid filter and the range (start, end) it was fetched for.
type FetchedFilter = ((u32, u32), Arc<TxidFilter>);

/// How this worker's shards found the coins of their cross-shard inputs (`Worker.Status`).
#[derive(Default)]
pub struct ResolveCounts {
    /// Inputs sent by txid filters.
    pub routed: std::sync::atomic::AtomicU64,
    /// Inputs every filter ruled out, walked back through every earlier shard.
    pub walked: std::sync::atomic::AtomicU64,
    /// Lookups sent to peers (one per shard asked per input).
    pub lookups: std::sync::atomic::AtomicU64,
}

impl WorkerNode {
    pub fn new(source: Arc<dyn BlockSource>, data_dir: PathBuf) -> Arc<WorkerNode> {
        WorkerNode::with_index_threads(source, data_dir, 2)
    }

    /// `index_threads`: how many shards are indexed at once (phase 1 keeps one core busy per shard).
    pub fn with_index_threads(
        source: Arc<dyn BlockSource>,
        data_dir: PathBuf,
        index_threads: usize,
    ) -> Arc<WorkerNode> {
        Arc::new(WorkerNode {
            source,
            data_dir,
            shards: RwLock::new(HashMap::new()),
            index_permits: Semaphore::new(index_threads.max(1)),
            index_threads: index_threads.max(1),
            spare_windows: Mutex::new(SpareWindows::default()),
            resolve_permits: Semaphore::new(index_threads.max(1)),
            peers: Mutex::new(HashMap::new()),
            lease: Mutex::new(Lease::default()),
            isolated: AtomicBool::new(false),
            spans: Mutex::new(HashMap::new()),
            peer_bytes: std::sync::atomic::AtomicU64::new(0),
            compact_after_backfill: AtomicBool::new(true),
            compactions: Arc::new(Semaphore::new(1)),
            compactions_queued: Arc::new(std::sync::atomic::AtomicU32::new(0)),
            cluster_backfill_complete: AtomicBool::new(false),
            window_txs: std::sync::atomic::AtomicUsize::new(crate::shard::DEFAULT_WINDOW_TXS),
            resolve_batch: std::sync::atomic::AtomicUsize::new(DEFAULT_RESOLVE_BATCH),
            recent_coins: crate::shard::RecentCoinsBudget::new(
                crate::shard::DEFAULT_RECENT_COINS_BYTES,
            ),
            txid_filters: Mutex::new(HashMap::new()),
            txid_filter_budget: std::sync::atomic::AtomicUsize::new(TXID_FILTER_BUDGET_BYTES),
            resolve_counts: ResolveCounts::default(),
        })
    }

    /// Keeps a finished shard's window memory for the next shard to be indexed, up to what the indexing
    /// threads use at once (a window being filled and one being written each).
    fn keep_spare_windows(&self, window: Option<SpareWindow>, buffers: Option<WindowBuffers>) {
        let mut spares = self.spare_windows.lock().expect("spare windows");
        if spares.windows.len() < self.index_threads {
            spares.windows.extend(window);
        }
        if spares.buffers.len() < self.index_threads {
            spares.buffers.extend(buffers);
        }
    }

    /// Gives the spare window memory back once no shard of this worker is left to index: phase 2 and
    /// queries have no use for it.
    fn drop_spare_windows_if_done(&self) {
        let indexing = self
            .shards
            .read()
            .expect("shards lock")
            .values()
            .any(|slot| slot.shard.state().phase == pb::ShardPhase::Indexing as i32);
        if !indexing {
            let spares = std::mem::take(&mut *self.spare_windows.lock().expect("spare windows"));
            drop(spares);
        }
    }

    fn shard_dir(&self, shard_id: u32) -> PathBuf {
        self.data_dir.join(format!("shard-{shard_id:05}"))
    }

    /// Txs per backfill window (default [`crate::shard::DEFAULT_WINDOW_TXS`]). Tests make them small, so
    /// that shards of a small chain are indexed in several windows, as large shards are.
    pub fn set_window_txs(&self, window_txs: usize) {
        self.window_txs.store(window_txs.max(1), Ordering::Relaxed);
    }

    /// Inputs per resolution batch (default [`DEFAULT_RESOLVE_BATCH`]). Tests make them small, so that
    /// shards of a small chain resolve in several batches, as large shards do.
    pub fn set_resolve_batch(&self, inputs: usize) {
        self.resolve_batch.store(inputs.max(1), Ordering::Relaxed);
    }

    /// Memory for the coins of the windows the shards being indexed wrote last, shared evenly by them
    /// (default [`crate::shard::DEFAULT_RECENT_COINS_BYTES`]; see
    /// [`crate::shard::IndexWindow::keep_recent_coins`]).
    pub fn set_recent_coins_bytes(&self, bytes: usize) {
        self.recent_coins.set_bytes(bytes);
    }

    /// Bytes of earlier shards' txid filters this worker holds at most (default
    /// [`TXID_FILTER_BUDGET_BYTES`]); shards whose filter does not fit are asked about every input.
    pub fn set_txid_filter_budget(&self, bytes: usize) {
        self.txid_filter_budget.store(bytes, Ordering::Relaxed);
    }

    /// Bytes of earlier shards' txid filters held.
    pub fn txid_filter_bytes(&self) -> usize {
        self.txid_filters
            .lock()
            .expect("txid filters lock")
            .values()
            .map(|(_, f)| f.size_bytes())
            .sum()
    }

    fn window_txs(&self) -> usize {
        self.window_txs.load(Ordering::Relaxed)
    }

    fn resolve_batch(&self) -> usize {
        self.resolve_batch.load(Ordering::Relaxed)
    }

    /// On by default; benchmarks turn it off to measure the backfill and the compaction apart.
    pub fn set_compact_after_backfill(&self, on: bool) {
        self.compact_after_backfill.store(on, Ordering::Relaxed);
    }

    /// Rewrites a shard whose backfill is over into its compact form, in the background: ingested and
    /// flushed files are written uncompressed to save the backfill's CPU, so without this a live database
    /// stays about twice its compacted size (`doc/schema.md`, Compression). It waits until the backfill is
    /// over ([`WorkerNode::backfilling`]; compacting meanwhile slowed the backfill by half), and queries and
    /// writes go on during it.
    fn compact_in_background(self: &Arc<Self>, shard: Arc<Shard>) {
        if !self.compact_after_backfill.load(Ordering::Relaxed) {
            return;
        }
        let compactions = self.compactions.clone();
        let queued = self.compactions_queued.clone();
        queued.fetch_add(1, Ordering::SeqCst);
        let node = Arc::downgrade(self);
        let mark = self.shard_dir(shard.id).join(COMPACTED_MARK);
        // Written again once this compaction is done: a restart before then compacts the shard again.
        if let Err(error) = std::fs::remove_file(&mark)
            && error.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(shard = shard.id, %error, "removing the compacted mark");
        }
        tokio::spawn(async move {
            let permit = compactions.acquire_owned().await;
            while node.upgrade().is_some_and(|node| node.backfilling()) {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            let started = Instant::now();
            let id = shard.id;
            let compacted = tokio::task::spawn_blocking(move || {
                shard.compact()?;
                std::fs::write(&mark, b"").map_err(|e| {
                    ShardError::Store(chainidx_core::store::StoreError::Engine(format!(
                        "{}: {e}",
                        mark.display()
                    )))
                })
            });
            match compacted.await {
                Ok(Ok(())) => tracing::info!(
                    shard = id,
                    seconds = started.elapsed().as_secs_f64(),
                    "shard compacted"
                ),
                Ok(Err(error)) => tracing::warn!(shard = id, %error, "compaction failed"),
                Err(error) => tracing::warn!(shard = id, %error, "compaction task failed"),
            }
            drop(permit);
            queued.fetch_sub(1, Ordering::SeqCst);
        });
    }

    /// What the coordinators' heartbeat replies say. Latched once true: afterwards their flag turns off
    /// again while a shard copy is being built or the tip shard catches up (every block), and neither is
    /// worth holding compactions back for.
    pub fn set_cluster_backfill_complete(&self, complete: bool) {
        if complete {
            self.cluster_backfill_complete
                .store(true, Ordering::Relaxed);
        }
    }

    /// Whether the backfill is still going on: a shard of this worker is in phase 1 or 2, or (under the
    /// coordinators) one of another worker's is, which compacting here would slow down on a shared machine.
    fn backfilling(&self) -> bool {
        let mine = self.statuses().iter().any(|s| {
            s.phase != pb::ShardPhase::Ready as i32 && s.phase != pb::ShardPhase::Failed as i32
        });
        let enforced = self.lease.lock().expect("lease lock").enforced;
        mine || (enforced && !self.cluster_backfill_complete.load(Ordering::Relaxed))
    }

    /// Shards waiting for or in their after-backfill compaction (benchmarks wait for none).
    pub fn compactions_queued(&self) -> u32 {
        self.compactions_queued.load(Ordering::SeqCst)
    }

    /// From now on every write needs a lease from the coordinators' leader ([`WorkerNode::grant`]).
    pub fn enforce_leases(&self) {
        self.lease.lock().expect("lease lock").enforced = true;
    }

    /// A heartbeat reply: writes to `shards` are allowed until `sent_at + lease`, where `sent_at` is when
    /// the heartbeat left (so this worker's lease always ends before the leader's view of it).
    pub fn grant(&self, sent_at: Instant, lease: Duration, shards: impl IntoIterator<Item = u32>) {
        let mut current = self.lease.lock().expect("lease lock");
        current.until = Some(sent_at + lease);
        current.shards = shards.into_iter().collect();
    }

    /// Time left on the lease (negative once expired); `None` if leases are not enforced.
    pub fn lease_remaining_ms(&self) -> Option<i64> {
        let lease = self.lease.lock().expect("lease lock");
        if !lease.enforced {
            return None;
        }
        let now = Instant::now();
        Some(match lease.until {
            Some(until) if until > now => (until - now).as_millis() as i64,
            Some(until) => -((now - until).as_millis() as i64),
            None => -1,
        })
    }

    /// Whether this worker may write `shard_id` now: `Err(NoLease)` while the lease is expired (wait),
    /// `Err(Moved)` if a valid lease leaves it out.
    pub fn check_write(&self, shard_id: u32) -> Result<(), WorkerError> {
        let lease = self.lease.lock().expect("lease lock");
        if !lease.enforced {
            return Ok(());
        }
        if lease.until.is_none_or(|until| until <= Instant::now()) {
            return Err(WorkerError::NoLease(shard_id));
        }
        if !lease.shards.contains(&shard_id) {
            return Err(WorkerError::Moved(shard_id));
        }
        Ok(())
    }

    /// Blocks (a blocking thread) until `shard_id` may be written; gives up once a valid lease has left the
    /// shard out for `MOVED_AFTER`.
    pub fn wait_write(&self, shard_id: u32) -> Result<(), WorkerError> {
        let mut moved_since: Option<Instant> = None;
        let mut logged = false;
        loop {
            match self.check_write(shard_id) {
                Ok(()) => return Ok(()),
                Err(WorkerError::Moved(_)) => {
                    let since = *moved_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > MOVED_AFTER {
                        return Err(WorkerError::Moved(shard_id));
                    }
                }
                Err(_) => {
                    moved_since = None;
                    if !logged {
                        tracing::warn!(shard = shard_id, "lease expired: writes paused");
                        logged = true;
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    async fn wait_write_async(self: &Arc<Self>, shard_id: u32) -> Result<(), WorkerError> {
        let node = self.clone();
        tokio::task::spawn_blocking(move || node.wait_write(shard_id))
            .await
            .map_err(|e| WorkerError::Task(e.to_string()))?
    }

    fn wrote_blocks(&self, shard_id: u32, blocks: u64) {
        if blocks == 0 {
            return;
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or_default();
        let mut spans = self.spans.lock().expect("spans lock");
        let span = spans.entry(shard_id).or_insert_with(|| pb::WriteSpan {
            shard_id,
            first_write_us: now,
            ..Default::default()
        });
        span.last_write_us = now;
        span.blocks_written += blocks;
    }

    /// When this process wrote each shard's blocks.
    pub fn write_spans(&self) -> Vec<pb::WriteSpan> {
        let mut spans: Vec<_> = self
            .spans
            .lock()
            .expect("spans lock")
            .values()
            .cloned()
            .collect();
        spans.sort_by_key(|s| s.shard_id);
        spans
    }

    /// Protobuf bytes of the spend calls made to peers so far (what crosses between workers).
    pub fn peer_bytes(&self) -> u64 {
        self.peer_bytes.load(Ordering::Relaxed)
    }

    /// The storage engine's memory over this worker's shards (the shared cache counted once).
    pub fn engine_memory(&self) -> pb::EngineMemory {
        let mut total = pb::EngineMemory::default();
        for slot in self.shards.read().expect("shards lock").values() {
            if let Some(memory) = slot.shard.engine_memory() {
                total.memtable_bytes += memory.memtable_bytes;
                total.table_reader_bytes += memory.table_reader_bytes;
                total.block_cache_bytes = memory.shared_cache_bytes;
            }
        }
        total
    }

    pub fn set_isolated(&self, isolated: bool) {
        self.isolated.store(isolated, Ordering::SeqCst);
        tracing::warn!(isolated, "fault filter: cut off from the coordinators");
    }

    pub fn isolated(&self) -> bool {
        self.isolated.load(Ordering::SeqCst)
    }

    pub fn slot(&self, shard_id: u32) -> Result<Arc<ShardSlot>, WorkerError> {
        self.shards
            .read()
            .expect("shards lock")
            .get(&shard_id)
            .cloned()
            .ok_or(WorkerError::UnknownShard(shard_id))
    }

    pub fn statuses(&self) -> Vec<pb::ShardStatus> {
        let mut statuses: Vec<_> = self
            .shards
            .read()
            .expect("shards lock")
            .values()
            .map(|s| s.status())
            .collect();
        statuses.sort_by_key(|s| s.shard_id);
        statuses
    }

    /// Opens (or reopens) the shard's database and starts phase 1 in the background. Idempotent: a shard
    /// already here is left alone; a reopened one resumes from its checkpoint.
    pub fn assign(
        self: &Arc<Self>,
        shard_id: u32,
        start: u32,
        end: u32,
    ) -> Result<(), WorkerError> {
        let mut shards = self.shards.write().expect("shards lock");
        if shards.contains_key(&shard_id) {
            return Ok(());
        }
        let path = self.shard_dir(shard_id);
        std::fs::create_dir_all(&path).map_err(|e| {
            ShardError::Store(chainidx_core::store::StoreError::Engine(format!(
                "{}: {e}",
                path.display()
            )))
        })?;
        let will_compact = self.compact_after_backfill.load(Ordering::Relaxed)
            && !path.join(COMPACTED_MARK).exists();
        // A shard that will be compacted fully writes uncompressed, and leaves `history` and `outspends`
        // uncompacted, until then: that compaction rewrites, and compresses, every file anyway.
        let store = if will_compact {
            RocksStore::open_for_backfill(&path)
        } else {
            RocksStore::open(&path)
        };
        let store = Arc::new(store.map_err(ShardError::from)?);
        let shard = Arc::new(Shard::open(
            store,
            self.source.clone(),
            shard_id,
            start,
            end,
        )?);
        let slot = Arc::new(ShardSlot {
            shard,
            error: Mutex::new(None),
            resolving: AtomicBool::new(false),
            resolve_lock: tokio::sync::Mutex::new(()),
        });
        shards.insert(shard_id, slot.clone());
        drop(shards);
        if will_compact {
            // Ready from an earlier run whose compaction did not finish (or never ran).
            if slot.shard.state().phase == pb::ShardPhase::Ready as i32 {
                self.compact_in_background(slot.shard.clone());
            }
        }
        let node = self.clone();
        tokio::spawn(async move {
            if let Err(error) = node.index_phase(&slot).await {
                slot.fail(&error);
            }
        });
        Ok(())
    }

    async fn index_phase(self: &Arc<Self>, slot: &Arc<ShardSlot>) -> Result<(), WorkerError> {
        let _permit = self
            .index_permits
            .acquire()
            .await
            .map_err(|e| WorkerError::Task(e.to_string()))?;
        let shard = slot.shard.clone();
        if shard.state().phase != pb::ShardPhase::Indexing as i32 {
            return Ok(());
        }
        let started = std::time::Instant::now();
        let source = self.source.clone();
        let span = tracing::info_span!("index", shard = shard.id);
        let node = self.clone();
        let indexed = tokio::task::spawn_blocking(move || {
            span.in_scope(|| index_range(source.as_ref(), &shard, &node, Write::Bulk))
        })
        .await
        .map_err(|e| WorkerError::Task(e.to_string()))?;
        if let Err(WorkerError::Moved(id)) = indexed {
            tracing::warn!(shard = id, "shard given to another worker: closing it here");
            self.shards.write().expect("shards lock").remove(&id);
            self.drop_spare_windows_if_done();
            return Ok(());
        }
        indexed?;
        slot.shard.set_phase(pb::ShardPhase::Indexed)?;
        self.drop_spare_windows_if_done();
        tracing::info!(
            shard = slot.shard.id,
            pending = slot.shard.state().pending_inputs,
            seconds = started.elapsed().as_secs_f64(),
            "shard indexed"
        );
        Ok(())
    }

    /// Starts phase 2 for a shard in the background.
    pub fn resolve(
        self: &Arc<Self>,
        shard_id: u32,
        peers: Vec<pb::ShardPeer>,
    ) -> Result<(), WorkerError> {
        let slot = self.slot(shard_id)?;
        let phase = slot.shard.state().phase;
        if phase != pb::ShardPhase::Indexed as i32 && phase != pb::ShardPhase::Resolving as i32 {
            return Ok(()); // still indexing (the coordinator asks again) or already ready
        }
        if slot.resolving.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        *slot.error.lock().expect("error lock") = None;
        slot.shard.set_phase(pb::ShardPhase::Resolving)?;
        let node = self.clone();
        tokio::spawn(async move {
            if let Err(error) = node.resolve_phase(&slot, peers, Write::Bulk).await {
                slot.fail(&error);
            }
            slot.resolving.store(false, Ordering::SeqCst);
        });
        Ok(())
    }

    async fn resolve_phase(
        self: &Arc<Self>,
        slot: &Arc<ShardSlot>,
        peers: Vec<pb::ShardPeer>,
        write: Write,
    ) -> Result<(), WorkerError> {
        let shard = slot.shard.clone();
        let started = std::time::Instant::now();
        let mut earlier: Vec<pb::ShardPeer> = peers
            .into_iter()
            .filter(|p| p.end_height <= shard.start)
            .collect();
        earlier.sort_by_key(|p| std::cmp::Reverse(p.start_height));
        loop {
            let _permit = self
                .resolve_permits
                .acquire()
                .await
                .map_err(|e| WorkerError::Task(e.to_string()))?;
            let _resolving = slot.resolve_lock.lock().await;
            let reader = shard.clone();
            let limit = self.resolve_batch();
            let batch = tokio::task::spawn_blocking(move || reader.next_pending(limit))
                .await
                .map_err(|e| WorkerError::Task(e.to_string()))??;
            if batch.is_empty() {
                break;
            }
            let outputs = self.lookup_spent(&batch, &earlier).await?;
            failpoint(failpoint::RESOLVE_AFTER_LOOKUP);
            let resolved: Vec<(PendingSpend, pb::TxOut)> = batch.into_iter().zip(outputs).collect();
            self.wait_write_async(shard.id).await?;
            let writer = shard.clone();
            tokio::task::spawn_blocking(move || writer.apply_resolved(&resolved, write))
                .await
                .map_err(|e| WorkerError::Task(e.to_string()))??;
            failpoint(failpoint::RESOLVE_AFTER_APPLY);
        }
        self.deliver_notices(&shard, &earlier).await?;
        self.wait_write_async(shard.id).await?;
        if write == Write::Bulk {
            // Queued before the shard reports ready, so whoever sees the backfill complete also sees it.
            self.compact_in_background(shard.clone());
        }
        shard.set_phase(pb::ShardPhase::Ready)?;
        tracing::info!(
            shard = shard.id,
            seconds = started.elapsed().as_secs_f64(),
            "shard ready"
        );
        Ok(())
    }

    /// Undo data already told this shard what its inputs spend; the owners of those coins (found by the
    /// coin's height, no search) must still record who spent them, for their UTXO and outspend answers.
    async fn deliver_notices(
        self: &Arc<Self>,
        shard: &Arc<Shard>,
        earlier: &[pb::ShardPeer],
    ) -> Result<(), WorkerError> {
        loop {
            let _permit = self
                .resolve_permits
                .acquire()
                .await
                .map_err(|e| WorkerError::Task(e.to_string()))?;
            let reader = shard.clone();
            let limit = self.resolve_batch();
            let batch = tokio::task::spawn_blocking(move || reader.next_notices(limit))
                .await
                .map_err(|e| WorkerError::Task(e.to_string()))??;
            if batch.is_empty() {
                return Ok(());
            }
            let mut by_owner: HashMap<u32, (pb::ShardPeer, Vec<pb::SpendRef>)> = HashMap::new();
            for (spend, coin_height) in &batch {
                let owner = earlier
                    .iter()
                    .find(|p| p.start_height <= *coin_height && *coin_height < p.end_height)
                    .ok_or_else(|| WorkerError::Unresolved {
                        txid: display_hash(&spend.input.spender_txid),
                        vin: spend.vin,
                        height: spend.height,
                        prev: format!(
                            "{}:{} (height {coin_height} per undo data)",
                            display_hash(&spend.input.prev_txid),
                            spend.input.prev_vout
                        ),
                    })?;
                by_owner
                    .entry(owner.shard_id)
                    .or_insert_with(|| (owner.clone(), Vec::new()))
                    .1
                    .push(spend.to_ref());
            }
            for (_, (peer, spends)) in by_owner {
                let sent = spends.len();
                let reply = self.send_spends(&peer, spends, Spends::Record).await?;
                if reply.found.len() != sent {
                    return Err(WorkerError::Peer {
                        addr: peer.grpc_addr.clone(),
                        detail: format!(
                            "shard {} holds {} of {sent} coins the undo data places there",
                            peer.shard_id,
                            reply.found.len()
                        ),
                    });
                }
            }
            let done: Vec<PendingSpend> = batch.into_iter().map(|(spend, _)| spend).collect();
            self.wait_write_async(shard.id).await?;
            let writer = shard.clone();
            tokio::task::spawn_blocking(move || writer.clear_notices(&done))
                .await
                .map_err(|e| WorkerError::Task(e.to_string()))??;
        }
    }

    /// Following the tip: removes every block at or above `from` from this shard, newest first. Each
    /// block's spends of other shards' coins are undone at their owners before its rows go.
    pub async fn rollback(
        self: &Arc<Self>,
        shard_id: u32,
        from: u32,
        peers: Vec<pb::ShardPeer>,
    ) -> Result<(), WorkerError> {
        let slot = self.slot(shard_id)?;
        let shard = slot.shard.clone();
        self.check_write(shard_id)?;
        let earlier = earlier_peers(&shard, peers);
        let _resolving = slot.resolve_lock.lock().await;
        while shard.state().next_height > from.max(shard.start) {
            let height = shard.state().next_height - 1;
            let reader = shard.clone();
            let remote = tokio::task::spawn_blocking(move || reader.remote_spends_of_block(height))
                .await
                .map_err(|e| WorkerError::Task(e.to_string()))??;
            // Routed by txid filters like a resolution: a block's spends of old coins no longer walk
            // back through every earlier shard. A coin no earlier shard holds has no spend to forget.
            self.route_spends(&remote, &earlier, Spends::Forget).await?;
            let writer = shard.clone();
            tokio::task::spawn_blocking(move || writer.rollback_block(height))
                .await
                .map_err(|e| WorkerError::Task(e.to_string()))??;
            tracing::info!(shard = shard_id, height, "rolled back block");
        }
        Ok(())
    }

    /// Following the tip: indexes this shard up to `tip` (growing its range if it is the last shard) and
    /// resolves the new blocks' inputs; returns when the shard is ready again.
    pub async fn catch_up(
        self: &Arc<Self>,
        shard_id: u32,
        tip: u32,
        extend: bool,
        peers: Vec<pb::ShardPeer>,
    ) -> Result<(), WorkerError> {
        let slot = self.slot(shard_id)?;
        let shard = slot.shard.clone();
        self.check_write(shard_id)?;
        if extend {
            shard.extend_to(tip + 1)?;
        }
        shard.set_phase(pb::ShardPhase::Indexing)?;
        let source = self.source.clone();
        let indexer = shard.clone();
        let node = self.clone();
        tokio::task::spawn_blocking(move || {
            index_range(source.as_ref(), &indexer, &node, Write::Logged)?;
            crate::failpoint::failpoint(crate::failpoint::CATCH_UP_AFTER_INDEX);
            if crate::failpoint::failpoint_fails(crate::failpoint::CATCH_UP_FAILS_AFTER_INDEX) {
                return Err(WorkerError::Task(
                    "failpoint: catch-up fails after indexing".into(),
                ));
            }
            Ok::<_, WorkerError>(())
        })
        .await
        .map_err(|e| WorkerError::Task(e.to_string()))??;
        shard.set_phase(pb::ShardPhase::Resolving)?;
        self.resolve_phase(&slot, peers, Write::Logged).await
    }

    /// Sends every spend this shard's blocks make of other shards' coins to `to` (a shard rebuilt on another
    /// worker), which records those it holds. Returns (sent, recorded).
    pub async fn resend_spends(
        self: &Arc<Self>,
        shard_id: u32,
        to: pb::ShardPeer,
    ) -> Result<(u64, u64), WorkerError> {
        let shard = self.slot(shard_id)?.shard.clone();
        let (mut sent, mut recorded) = (0, 0);
        let mut batch = Vec::new();
        let state = shard.state();
        for height in state.start_height..state.next_height {
            let reader = shard.clone();
            let spends = tokio::task::spawn_blocking(move || reader.remote_spends_of_block(height))
                .await
                .map_err(|e| WorkerError::Task(e.to_string()))??;
            batch.extend(spends);
            if batch.len() >= self.resolve_batch() || height + 1 == state.next_height {
                sent += batch.len() as u64;
                let reply = self
                    .send_spends(&to, std::mem::take(&mut batch), Spends::Record)
                    .await?;
                recorded += reply.found.len() as u64;
            }
        }
        Ok((sent, recorded))
    }

    /// Finds the outputs `batch` spends in the earlier shards ([`WorkerNode::route_spends`]), recording
    /// the spends there.
    async fn lookup_spent(
        &self,
        batch: &[PendingSpend],
        earlier: &[pb::ShardPeer],
    ) -> Result<Vec<pb::TxOut>, WorkerError> {
        let spends: Vec<pb::SpendRef> = batch.iter().map(PendingSpend::to_ref).collect();
        let found = self.route_spends(&spends, earlier, Spends::Record).await?;
        if let Some(i) = found.iter().position(Option::is_none) {
            let s = &batch[i];
            return Err(WorkerError::Unresolved {
                txid: display_hash(&s.input.spender_txid),
                vin: s.vin,
                height: s.height,
                prev: format!("{}:{}", display_hash(&s.input.prev_txid), s.input.prev_vout),
            });
        }
        Ok(found
            .into_iter()
            .map(|hit| {
                let hit = hit.expect("all found");
                pb::TxOut {
                    value: hit.value,
                    script: hit.script,
                }
            })
            .collect())
    }

    /// Sends each spend to the shards before this one that hold its coin, recording or forgetting it
    /// there, and returns each one's answer (`None`: no earlier shard holds the coin). Each spend goes to
    /// the nearest shard whose txid filter may hold its coin's tx, and what that shard does not hold to the
    /// next such shard; spends that every filter rules out (a filter out of date after a reorg; in a
    /// consistent cluster, none) walk back through every earlier shard, as they did before filters.
    async fn route_spends(
        &self,
        spends: &[pb::SpendRef],
        earlier: &[pb::ShardPeer],
        what: Spends,
    ) -> Result<Vec<Option<pb::SpentOutput>>, WorkerError> {
        let filters = self.txid_filters(earlier).await;
        let mut found: Vec<Option<pb::SpentOutput>> = vec![None; spends.len()];
        // Per spend: the earlier shards before this one (nearest first) were asked or ruled out.
        let mut next = vec![0usize; spends.len()];
        let mut remaining: Vec<usize> = (0..spends.len()).collect();
        let mut unrouted = Vec::new();
        while !remaining.is_empty() {
            let mut by_peer: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
            for &i in &remaining {
                let key = txid_key(&request_txid(&spends[i].prev_txid, "spend")?);
                match next_candidate(&filters, next[i], &key) {
                    Some(j) => by_peer.entry(j).or_default().push(i),
                    None => unrouted.push(i),
                }
            }
            remaining.clear();
            for (j, asked) in by_peer {
                self.ask_peer(&earlier[j], spends, &asked, what, &mut found)
                    .await?;
                for i in asked {
                    if found[i].is_none() {
                        next[i] = j + 1;
                        remaining.push(i);
                    }
                }
            }
        }
        if what == Spends::Record {
            let routed = spends.len() - unrouted.len();
            self.resolve_counts
                .routed
                .fetch_add(routed as u64, Ordering::Relaxed);
            self.resolve_counts
                .walked
                .fetch_add(unrouted.len() as u64, Ordering::Relaxed);
        }
        if !unrouted.is_empty() {
            tracing::warn!(
                spends = unrouted.len(),
                ?what,
                "txid filters ruled out every shard holding these spends' coins; walking back"
            );
            for peer in earlier {
                unrouted.retain(|&i| found[i].is_none());
                if unrouted.is_empty() {
                    break;
                }
                self.ask_peer(peer, spends, &unrouted, what, &mut found)
                    .await?;
            }
        }
        Ok(found)
    }

    /// Sends `spends[asked]` to `peer` (to record or forget) and fills in `found` with what it holds.
    async fn ask_peer(
        &self,
        peer: &pb::ShardPeer,
        spends: &[pb::SpendRef],
        asked: &[usize],
        what: Spends,
        found: &mut [Option<pb::SpentOutput>],
    ) -> Result<(), WorkerError> {
        let request = asked.iter().map(|&i| spends[i].clone()).collect();
        if what == Spends::Record {
            self.resolve_counts
                .lookups
                .fetch_add(asked.len() as u64, Ordering::Relaxed);
        }
        let reply = self.send_spends(peer, request, what).await?;
        for hit in reply.found {
            let i = asked
                .get(hit.index as usize)
                .copied()
                .ok_or_else(|| WorkerError::Peer {
                    addr: peer.grpc_addr.clone(),
                    detail: format!("answered index {} of {}", hit.index, asked.len()),
                })?;
            found[i] = Some(hit);
        }
        Ok(())
    }

    /// The txid filters of `earlier` (same order), fetched once per shard and range and kept: the shards
    /// before a resolving one no longer change (a reorg may make one out of date, which only costs
    /// walks). `None` where a peer gave none (still indexing, unreachable, an older build) or once the
    /// worker holds its budget of them ([`WorkerNode::set_txid_filter_budget`]): that shard is asked about
    /// every input.
    async fn txid_filters(&self, earlier: &[pb::ShardPeer]) -> Vec<Option<Arc<TxidFilter>>> {
        let mut filters = Vec::with_capacity(earlier.len());
        let mut held = self.txid_filter_bytes();
        for peer in earlier {
            let range = (peer.start_height, peer.end_height);
            let cached = self
                .txid_filters
                .lock()
                .expect("txid filters lock")
                .get(&peer.shard_id)
                .filter(|(r, _)| *r == range)
                .map(|(_, f)| f.clone());
            if let Some(filter) = cached {
                filters.push(Some(filter));
                continue;
            }
            if let Some(filter) = self.own_txid_filter(peer).await {
                filters.push(Some(filter));
                continue;
            }
            if held >= self.txid_filter_budget.load(Ordering::Relaxed) {
                filters.push(None);
                continue;
            }
            let fetched = match self.peer(&peer.grpc_addr).await {
                Ok(mut client) => client
                    .txid_filter(pb::TxidFilterRequest {
                        shard_id: peer.shard_id,
                    })
                    .await
                    .map_err(|status| status.message().to_string())
                    .and_then(|reply| {
                        let reply = reply.into_inner();
                        self.peer_bytes.fetch_add(
                            prost::Message::encoded_len(&reply) as u64,
                            Ordering::Relaxed,
                        );
                        TxidFilter::from_proto(&reply)
                    }),
                Err(error) => Err(error.to_string()),
            };
            match fetched {
                Ok(filter) => {
                    held += filter.size_bytes();
                    let filter = Arc::new(filter);
                    self.txid_filters
                        .lock()
                        .expect("txid filters lock")
                        .insert(peer.shard_id, (range, filter.clone()));
                    filters.push(Some(filter));
                }
                Err(detail) => {
                    tracing::warn!(shard = peer.shard_id, %detail, "no txid filter; asking that shard about every input");
                    filters.push(None);
                }
            }
        }
        filters
    }

    /// The filter of an earlier shard this worker holds itself (same id and range, indexed): the one it
    /// serves its peers, taken as it is rather than fetched from itself and decoded into a second copy
    /// (with one worker, that copy had doubled what filters took: 1.5 bytes per tx held).
    async fn own_txid_filter(&self, peer: &pb::ShardPeer) -> Option<Arc<TxidFilter>> {
        let shard = self.slot(peer.shard_id).ok()?.shard.clone();
        let state = shard.state();
        if (state.start_height, state.end_height) != (peer.start_height, peer.end_height)
            || state.phase == pb::ShardPhase::Indexing as i32
        {
            return None;
        }
        tokio::task::spawn_blocking(move || shard.served_txid_filter())
            .await
            .ok()?
            .ok()
    }

    /// Sends spends to the shard `peer`: to record them (answering the outputs it holds) or to forget them
    /// after a rollback (answering which outpoints it holds).
    async fn send_spends(
        &self,
        peer: &pb::ShardPeer,
        spends: Vec<pb::SpendRef>,
        what: Spends,
    ) -> Result<pb::SpendOutputsReply, WorkerError> {
        // Every copy of the shard records (or forgets) the spends; the first copy's answer is used.
        let mut addrs = peer.replica_addrs.clone();
        if addrs.is_empty() {
            addrs.push(peer.grpc_addr.clone());
        }
        let request = pb::SpendOutputsRequest {
            shard_id: peer.shard_id,
            spends,
        };
        let mut first = None;
        for addr in &addrs {
            let mut client = self.peer(addr).await?;
            let reply = match what {
                Spends::Record => client.spend_outputs(request.clone()).await,
                Spends::Forget => client.unspend_outputs(request.clone()).await,
            };
            let reply = reply
                .map(|r| r.into_inner())
                .map_err(|status| WorkerError::Peer {
                    addr: addr.clone(),
                    detail: status.message().to_string(),
                })?;
            self.peer_bytes.fetch_add(
                (prost::Message::encoded_len(&request) + prost::Message::encoded_len(&reply))
                    as u64,
                Ordering::Relaxed,
            );
            first.get_or_insert(reply);
        }
        Ok(first.unwrap_or_default())
    }

    async fn peer(&self, addr: &str) -> Result<WorkerClient<Channel>, WorkerError> {
        if let Some(client) = self.peers.lock().expect("peers lock").get(addr) {
            return Ok(client.clone());
        }
        let client = connect_worker(addr).await.map_err(|e| WorkerError::Peer {
            addr: addr.into(),
            detail: e.to_string(),
        })?;
        self.peers
            .lock()
            .expect("peers lock")
            .insert(addr.into(), client.clone());
        Ok(client)
    }
}

/// The shards before `shard`, nearest first: where its inputs' coins can be.
fn earlier_peers(shard: &Shard, peers: Vec<pb::ShardPeer>) -> Vec<pb::ShardPeer> {
    let mut earlier: Vec<pb::ShardPeer> = peers
        .into_iter()
        .filter(|p| p.start_height < shard.start)
        .collect();
    earlier.sort_by_key(|p| std::cmp::Reverse(p.start_height));
    earlier
}

/// A gRPC client for a worker at `addr` (`host:port` or a full URL).
pub async fn connect_worker(addr: &str) -> Result<WorkerClient<Channel>, tonic::transport::Error> {
    let url = if addr.starts_with("http") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    let channel = tonic::transport::Endpoint::from_shared(url)?
        .connect()
        .await?;
    Ok(WorkerClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

/// Txids and block hashes are displayed byte-reversed.
pub fn display_hash(hash: &[u8; 32]) -> String {
    let mut reversed = *hash;
    reversed.reverse();
    hex::encode(reversed)
}

/// Attempts per block before a source error fails the shard (transient errors: node restarting, a garbled
/// reply); each retry waits twice as long, from 250 ms.
const FETCH_ATTEMPTS: u32 = 5;

/// A block and, if the source has undo data, the coins its inputs spend.
type Fetched = (u32, Block, Option<Vec<Vec<SpentCoin>>>);

/// `bytes`: the fetcher's buffer, kept from one block to the next.
fn fetch(
    source: &dyn BlockSource,
    height: u32,
    bytes: &mut Vec<u8>,
) -> Result<Fetched, WorkerError> {
    let mut attempt = 1;
    loop {
        let result = source
            .block_bytes_into(height, bytes)
            .and_then(|()| source.spent_coins(height));
        match result {
            Ok(spent) => {
                let block = deserialize::<Block>(bytes).map_err(|e| WorkerError::Decode {
                    height,
                    detail: e.to_string(),
                })?;
                return Ok((height, block, spent));
            }
            Err(
                error @ (SourceError::BadFile { .. }
                | SourceError::BeyondTip { .. }
                | SourceError::BadSpec(_)),
            ) => {
                return Err(WorkerError::Fetch {
                    height,
                    source: error,
                });
            }
            Err(error) if attempt < FETCH_ATTEMPTS => {
                let wait = std::time::Duration::from_millis(250 << (attempt - 1));
                tracing::warn!(height, attempt, %error, ?wait, "fetching block failed; retrying");
                std::thread::sleep(wait);
                attempt += 1;
            }
            Err(error) => {
                return Err(WorkerError::Fetch {
                    height,
                    source: error,
                });
            }
        }
    }
}

/// Phase 1 over the rest of the shard's range: a fetcher thread reads and decodes blocks ahead of the
/// writer (bounded, so memory stays flat), the calling thread adds them to windows in height order. A
/// full window is written on a thread of its own beside the next one's blocks when an index permit is
/// free (no other shard is using the second core), else in turn. Windows land in order, each with its
/// checkpoint; a block is written whole or not at all, so a failed fetch leaves nothing half-written.
fn index_range(
    source: &dyn BlockSource,
    shard: &Shard,
    node: &WorkerNode,
    write: Write,
) -> Result<(), WorkerError> {
    let from = shard.state().next_height;
    let end = shard.end();
    std::thread::scope(|scope| {
        // Two blocks ahead: decoding is ~20x faster than indexing, so a deeper queue only held more
        // decoded blocks (several MB each) in fresh memory. 8 instead of 2 cost 8 workers ~7% more CPU per
        // tx on 584k txs (`CHAINIDX_BENCH_BINARIES`, 4 interleaved pairs; the kernel's share 31–32% vs
        // 20–27%), one worker the same.
        let (sender, receiver) = std::sync::mpsc::sync_channel::<Result<Fetched, WorkerError>>(2);
        scope.spawn(move || {
            let mut bytes = Vec::new();
            for height in from..end {
                let fetched = fetch(source, height, &mut bytes);
                let failed = fetched.is_err();
                if sender.send(fetched).is_err() || failed {
                    return;
                }
            }
        });
        // Made at the first block, whose size says about how many txs the shard has left.
        let mut window: Option<IndexWindow> = None;
        let mut blocks = 0;
        // The window being written beside this thread, if any: its memory comes back when it is done.
        let mut writing: Option<std::thread::ScopedJoinHandle<'_, WriteResult>> = None;
        for item in receiver {
            let (height, block, spent) = match item {
                Ok(fetched) => fetched,
                Err(error) => {
                    // Keep the whole blocks already read: a retry resumes after them.
                    written(&mut writing)?;
                    if let Some(window) = window.as_mut() {
                        write_window(node, shard, window.seal(false), blocks)?;
                    }
                    return Err(error);
                }
            };
            node.wait_write(shard.id)?;
            let window = window.get_or_insert_with(|| {
                let expected = expected_txs(end - height, block.txdata.len(), node.window_txs());
                let spare = (write == Write::Bulk)
                    .then(|| {
                        node.spare_windows
                            .lock()
                            .expect("spare windows")
                            .windows
                            .pop()
                    })
                    .flatten();
                shard
                    .window_from(spare, write, node.window_txs(), expected)
                    .keep_recent_coins(node.recent_coins.share())
            });
            window.add(height, &block, spent.as_deref())?;
            blocks += 1;
            if !window.is_full() {
                continue;
            }
            // Windows land in order: the one before first.
            let spare = written(&mut writing)?;
            // `Some`: written beside, holding a permit if one was free.
            let beside = match write {
                Write::Bulk if height + 1 < end => match node.index_permits.try_acquire() {
                    Ok(permit) => Some(Some(permit)),
                    Err(_) if failpoint::failpoint_on(failpoint::INDEX_WRITE_BESIDE) => Some(None),
                    Err(_) => None,
                },
                _ => None,
            };
            let blocks = std::mem::take(&mut blocks);
            match beside {
                Some(permit) => {
                    let sealed = window.seal(true);
                    let spare = spare.or_else(|| {
                        let mut spares = node.spare_windows.lock().expect("spare windows");
                        spares.buffers.pop()
                    });
                    window.reuse(spare.unwrap_or_else(|| window.fresh_buffers()));
                    writing = Some(scope.spawn(move || {
                        let _permit = permit;
                        write_window(node, shard, sealed, blocks)
                    }));
                }
                None => {
                    drop(spare);
                    let sealed = window.seal(false);
                    if let Some(buffers) = write_window(node, shard, sealed, blocks)? {
                        window.reuse(buffers);
                    }
                }
            }
        }
        let spare = written(&mut writing)?;
        let Some(mut window) = window.take() else {
            return Ok(());
        };
        let (kept_windows, kept_bytes) = window.recent_coins();
        if let Some(buffers) = write_window(node, shard, window.seal(false), blocks)? {
            window.reuse(buffers);
        }
        let lookups = window.coin_lookups();
        node.keep_spare_windows(window.into_spare(), spare);
        tracing::info!(
            in_window = lookups.in_window,
            in_recent_windows = lookups.in_recent,
            in_database = lookups.in_database,
            kept_windows,
            kept_mib = kept_bytes >> 20,
            "where the inputs' coins were found"
        );
        Ok(())
    })
}

/// Window memory of shards indexed before, for the next shards ([`crate::shard::SpareWindow`]): at most
/// what the indexing threads use at once, and none once no shard is left to index.
#[derive(Default)]
struct SpareWindows {
    windows: Vec<SpareWindow>,
    /// Buffers of windows written beside the one being filled.
    buffers: Vec<WindowBuffers>,
}

/// What a window's write gives back: its memory, for the next window (`None`: it was empty).
type WriteResult = Result<Option<WindowBuffers>, WorkerError>;

/// Writes a sealed window, only under a lease: a worker cut off from the coordinators stops here before
/// anyone else may take the shard over.
fn write_window(
    node: &WorkerNode,
    shard: &Shard,
    sealed: Option<SealedWindow>,
    blocks: u64,
) -> WriteResult {
    let Some(sealed) = sealed else {
        return Ok(None);
    };
    node.wait_write(shard.id)?;
    let buffers = sealed.write()?;
    node.wrote_blocks(shard.id, blocks);
    Ok(Some(buffers))
}

/// Waits for the window being written beside, if any.
fn written(writing: &mut Option<std::thread::ScopedJoinHandle<'_, WriteResult>>) -> WriteResult {
    match writing.take() {
        Some(handle) => handle
            .join()
            .map_err(|_| WorkerError::Task("a window's writer panicked".into()))?,
        None => Ok(None),
    }
}

/// About how many txs a shard has left, from its first block indexed now: a quarter more, for blocks
/// that grow, and no fewer than a quarter window, for a shard that starts with tiny blocks (growing a
/// window's buffers by doubling costs more than the memory it saves).
fn expected_txs(blocks_left: u32, first_block_txs: usize, window_txs: usize) -> usize {
    let estimate = (blocks_left as usize).saturating_mul(first_block_txs);
    estimate.saturating_add(estimate / 4).max(window_txs / 4)
}

#[cfg(test)]
mod tests {
    use super::expected_txs;

    #[test]
    fn a_window_is_sized_by_what_is_left_of_its_shard_within_bounds() {
        // 15 blocks of 2,400 txs left: a quarter more than 36,000.
        assert_eq!(expected_txs(15, 2_400, 65_536), 45_000);
        // A shard starting with tiny blocks still gets a quarter window.
        assert_eq!(expected_txs(1_000, 1, 65_536), 16_384);
        // No overflow for absurd sizes; the window caps it (`Shard::window`).
        assert_eq!(expected_txs(u32::MAX, usize::MAX, 65_536), usize::MAX);
    }
}
