//! One shard: a block range [start, end) in its own database. Phase 1 ([`IndexWindow`]) writes the rows of
//! a window of blocks, then the checkpoint after them; inputs spending outputs of earlier shards are parked
//! in `pending`. Phase 2 ([`Shard::next_pending`], [`Shard::apply_resolved`]) attributes them once the owning
//! shards have answered. [`Shard::spend_outputs`] answers those questions for other shards.

use crate::failpoint::{self, failpoint};
use crate::txid_filter::TxidFilter;
use bitcoin::consensus::{deserialize, serialize};
use bitcoin::hashes::Hash;
use bitcoin::{Block, BlockHash, Transaction, TxIn};
use chainidx_core::chain::{ScriptHash, scripthash};
use chainidx_core::schema::{
    self, ALL_COIN_ROWS_KEY, Cf, FORMAT_VERSION, Hash32, KEY_HASH_LEN, PendingInput,
    SHARD_STATE_KEY, SpentBy, SpentScript, TxSlot, addr_key, coin_key, decode_funding_vouts,
    decode_output, decode_pending, decode_prevout, encode_funding_vouts, encode_output,
    encode_pending, encode_prevout, history_key, parse_history_key, pending_key, position_key,
    txid_key,
};
use chainidx_core::source::{BlockSource, SourceError, SpentCoin};
use chainidx_core::spent_script::{self, Commitment};
use chainidx_core::store::{Batch, Reads, ScanFrom, Store, StoreError};
use chainidx_proto as pb;
use prost::Message;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Maps keyed by txids, scripthashes and outpoints, filled for every row of a window: foldhash is several
/// times cheaper than the default SipHash on these keys (which were ~6% of indexing) and still seeded per
/// process, so keys ground by a miner do not pile into one bucket.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
type FastSet<K> = HashSet<K, foldhash::fast::RandomState>;

#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("shard {shard}: {detail}")]
    Incompatible { shard: u32, detail: String },
    #[error("height {height} is outside shard {shard} [{start}, {end})")]
    OutOfRange {
        shard: u32,
        height: u32,
        start: u32,
        end: u32,
    },
    #[error("corrupt {what}: {detail}")]
    Corrupt { what: &'static str, detail: String },
    #[error("reading tx bodies from the source: {0}")]
    Source(#[from] SourceError),
}

fn corrupt(what: &'static str, detail: impl ToString) -> ShardError {
    ShardError::Corrupt {
        what,
        detail: detail.to_string(),
    }
}

/// An input waiting for another shard to say what it spends.
#[derive(Clone, Debug)]
pub struct PendingSpend {
    pub height: u32,
    pub position: u32,
    pub vin: u32,
    pub input: PendingInput,
    /// What the input's data commits its coin's script to: with it, the coin's `prevouts` row need not
    /// keep the script (`spent_script`).
    pub commitment: Option<Commitment>,
    /// Address keys whose `tx_count` already counts the spending tx (from phase 1).
    pub counted: Vec<[u8; KEY_HASH_LEN]>,
}

impl PendingSpend {
    /// The wire form, for the shard that holds the coin.
    pub fn to_ref(&self) -> pb::SpendRef {
        pb::SpendRef {
            prev_txid: self.input.prev_txid.to_vec(),
            prev_vout: self.input.prev_vout,
            spender_position: self.position,
            spender_vin: self.vin,
            spender_height: self.height,
        }
    }
}

/// How a block's batch is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Write {
    /// Backfill phase 1: a window's rows are ingested as table files, its stats and checkpoint written
    /// without WAL. A crash loses the checkpoints since the last flush, so the shard re-indexes from the
    /// last one that reached disk, rewriting the same rows. Nobody else reads or
    /// writes the shard until it reports `Indexed`, which [`Shard::set_phase`] flushes first.
    Bulk,
    /// Following the tip: every block in one WAL batch with its checkpoint (the coordinator counts on a
    /// block once reported).
    Logged,
}

pub struct Shard {
    pub id: u32,
    pub start: u32,
    store: Arc<dyn Store>,
    /// Where tx bodies are read from: the shard stores each tx's location in its block, not its bytes.
    source: Arc<dyn BlockSource>,
    state: Mutex<pb::ShardState>,
    /// Held by whatever can make a coin unspent or give it a new row (a window's commit, a rollback,
    /// `unspend_outputs`) and by each step of [`drop_spent_outputs`], which must not delete a row
    /// whose coin became unspent between its scan and its delete.
    coin_rows: Mutex<()>,
    /// [`Shard::txid_filter`]'s last filter, dropped whenever a block's rows are written or removed.
    txid_filter: Mutex<CachedTxidFilter>,
}

/// The generation counts writes of `txs` rows, so a filter built from a scan that a write overtook is
/// not kept.
#[derive(Default)]
struct CachedTxidFilter {
    generation: u64,
    filter: Option<Arc<TxidFilter>>,
}

impl Shard {
    /// Opens the shard's database, creating its state on first use. A database written by another format
    /// version, or for another shard or range, is refused.
    pub fn open(
        store: Arc<dyn Store>,
        source: Arc<dyn BlockSource>,
        id: u32,
        start: u32,
        end: u32,
    ) -> Result<Shard, ShardError> {
        let state = match store.get(Cf::Meta, SHARD_STATE_KEY)? {
            Some(bytes) => {
                let state = pb::ShardState::decode(bytes.as_slice())
                    .map_err(|e| corrupt("shard state", e))?;
                if state.format_version != FORMAT_VERSION {
                    return Err(ShardError::Incompatible {
                        shard: id,
                        detail: format!(
                            "database has format version {} but this build reads version {FORMAT_VERSION}; \
                             delete the shard directory to re-index it",
                            state.format_version
                        ),
                    });
                }
                // The tip shard's range grows while following the chain, so a longer range is the same shard.
                if (state.shard_id, state.start_height) != (id, start) || state.end_height < end {
                    return Err(ShardError::Incompatible {
                        shard: id,
                        detail: format!(
                            "database holds shard {} [{}, {}), not shard {id} [{start}, {end})",
                            state.shard_id, state.start_height, state.end_height
                        ),
                    });
                }
                state
            }
            None => {
                let state = pb::ShardState {
                    format_version: FORMAT_VERSION,
                    shard_id: id,
                    start_height: start,
                    end_height: end,
                    next_height: start,
                    phase: pb::ShardPhase::Indexing as i32,
                    pending_inputs: 0,
                    cross_shard_inputs: 0,
                    windows_committed: 0,
                    resolution_batches: 0,
                };
                let mut batch = Batch::default();
                batch.put(Cf::Meta, SHARD_STATE_KEY, state.encode_to_vec());
                batch.put(Cf::Meta, ALL_COIN_ROWS_KEY, []);
                store.write(batch, true)?;
                state
            }
        };
        Ok(Shard {
            id,
            start,
            store,
            source,
            state: Mutex::new(state),
            coin_rows: Mutex::new(()),
            txid_filter: Mutex::default(),
        })
    }

    /// A Bloom filter of the txids this shard holds (a scan of `txs`, kept until a block is written or
    /// removed), for shards resolving their inputs: they send an input only to the shards whose filter
    /// may hold its coin's tx.
    pub fn txid_filter(&self) -> Result<Arc<TxidFilter>, ShardError> {
        let generation = {
            let cached = self.txid_filter.lock().expect("txid filter lock");
            if let Some(filter) = &cached.filter {
                return Ok(filter.clone());
            }
            cached.generation
        };
        let mut keys: Vec<[u8; KEY_HASH_LEN]> = Vec::new();
        self.store
            .scan_once(Cf::Txs, &[], ScanFrom::First, &mut |key, _| {
                if let Ok(key) = key.try_into() {
                    keys.push(key);
                }
                true
            })?;
        let mut filter = TxidFilter::with_capacity(keys.len());
        keys.iter().for_each(|key| filter.insert(key));
        let filter = Arc::new(filter);
        let mut cached = self.txid_filter.lock().expect("txid filter lock");
        if cached.generation == generation {
            cached.filter = Some(filter.clone());
        }
        Ok(filter)
    }

    /// The filter this shard gives whoever resolves against it, peers and its own worker alike: its
    /// [`Shard::txid_filter`], or one that rules out every txid while the `txid-filter:rule-out-all`
    /// failpoint is on (an out-of-date filter, as tests need; same size).
    pub fn served_txid_filter(&self) -> Result<Arc<TxidFilter>, ShardError> {
        let filter = self.txid_filter()?;
        if failpoint::failpoint_on(failpoint::TXID_FILTER_RULES_OUT_ALL) {
            let txs = filter.size_bytes() * 8 / crate::txid_filter::BITS_PER_TX;
            return Ok(Arc::new(TxidFilter::with_capacity(txs)));
        }
        Ok(filter)
    }

    /// After `txs` rows were written or removed.
    fn forget_txid_filter(&self) {
        let mut cached = self.txid_filter.lock().expect("txid filter lock");
        cached.generation += 1;
        cached.filter = None;
    }

    /// End of the range (exclusive); the tip shard's grows as the chain does.
    pub fn end(&self) -> u32 {
        self.state().end_height
    }

    /// Grows the range to `end` (never shrinks it), durably.
    pub fn extend_to(&self, end: u32) -> Result<(), ShardError> {
        let mut state = self.state();
        if end <= state.end_height {
            return Ok(());
        }
        state.end_height = end;
        self.save_state(state)
    }

    fn save_state(&self, state: pb::ShardState) -> Result<(), ShardError> {
        let mut batch = Batch::default();
        batch.put(Cf::Meta, SHARD_STATE_KEY, state.encode_to_vec());
        self.store.write(batch, true)?;
        *self.state.lock().expect("state lock") = state;
        Ok(())
    }

    /// Once the backfill is over: [`drop_spent_outputs`], then the engine's full compaction
    /// ([`chainidx_core::store::Store::compact`]).
    pub fn compact(&self) -> Result<(), ShardError> {
        compact_store(self.store.as_ref(), &self.coin_rows)
    }

    pub fn engine_memory(&self) -> Option<chainidx_core::store::EngineMemory> {
        self.store.memory_usage()
    }

    /// One snapshot of this shard's rows for a whole query ([`ShardView`]).
    pub fn view(&self) -> ShardView<'_> {
        ShardView {
            shard: self,
            rows: self.store.snapshot(),
        }
    }

    /// This shard's live rows, read through the same code as queries' views.
    fn live(&self) -> ShardView<'_> {
        let rows: &dyn Reads = &*self.store;
        ShardView {
            shard: self,
            rows: Box::new(rows),
        }
    }

    pub fn state(&self) -> pb::ShardState {
        *self.state.lock().expect("state lock")
    }

    /// Persists a phase change (with the rest of the state) durably.
    pub fn set_phase(&self, phase: pb::ShardPhase) -> Result<(), ShardError> {
        // Phase 1's blocks were written without the WAL ([`Write::Bulk`]): they reach disk before anything
        // logged says the phase is done. It also frees their memtables while other shards run; so does the
        // flush at Ready (phase 2's stats merges), since the write-buffer budget only ever flushes the
        // database being written, never an idle one.
        if phase == pb::ShardPhase::Indexed || phase == pb::ShardPhase::Ready {
            self.store.flush()?;
        }
        let mut state = self.state();
        state.phase = phase as i32;
        self.save_state(state)
    }

    /// Adds this batch's per-address deltas to the stored totals (a merge: no read). In key order: the
    /// memtable's skiplist starts each insert from where the last one went, so a sorted batch walks it
    /// once instead of searching it from the top per row (in hash order these inserts took 2.4 CPU-s per
    /// million txs on a 3.99M-tx backfill, the cost that grew most with a shard; sorted, 0.13).
    /// `deltas` may hold several records of one address (one per tx): they are summed into one merge.
    /// Emptied, its memory kept.
    fn merge_stats(&self, batch: &mut Batch, deltas: &mut Vec<([u8; KEY_HASH_LEN], StatsDelta)>) {
        sum_by_address(deltas);
        let mut value = Vec::new();
        for (key, delta) in deltas.drain(..) {
            value.clear();
            pb::AddressStats::from(delta)
                .encode(&mut value)
                .expect("a Vec grows");
            batch.merge(Cf::History, key, &value);
        }
    }

    /// One block as its own window: its rows and the checkpoint in one write (tests, and the tip).
    pub fn index_block(
        &self,
        height: u32,
        block: &Block,
        spent: Option<&[Vec<SpentCoin>]>,
        write: Write,
    ) -> Result<(), ShardError> {
        let mut window = self.window(write, DEFAULT_WINDOW_TXS, block.txdata.len());
        window.add(height, block, spent)?;
        window.commit()
    }

    /// Phase 1 goes through a window: consecutive blocks' rows built in memory and written with the
    /// checkpoint after the last of them, once it holds `window_txs` txs (a backfill's; the tip's
    /// windows are one block). `expected_txs`: about how many txs the shard has left to index.
    pub fn window(&self, write: Write, window_txs: usize, expected_txs: usize) -> IndexWindow<'_> {
        self.window_from(None, write, window_txs, expected_txs)
    }

    /// [`Shard::window`] in the memory an earlier shard's windows left (`spare`), if any.
    pub fn window_from(
        &self,
        spare: Option<SpareWindow>,
        write: Write,
        window_txs: usize,
        expected_txs: usize,
    ) -> IndexWindow<'_> {
        // A backfill window is sized up front (see `Batch::with_capacity`), for a full window or what is
        // left of the shard if that is less ([`WindowBuffers::with_capacity`]), and keeps its memory from
        // one commit to the next; a block following the tip is one small batch. Memory already faulted
        // in is taken as it is, larger or smaller: it grows where it must.
        let capacity = window_txs.min(expected_txs);
        let (mut buffers, mut coins) = match (write, spare) {
            (Write::Bulk, Some(spare)) => (spare.buffers, spare.coins),
            (Write::Bulk, None) => (
                WindowBuffers::with_capacity(capacity),
                WindowCoins::with_capacity(capacity),
            ),
            (Write::Logged, _) => (WindowBuffers::default(), WindowCoins::default()),
        };
        buffers.rows.clear();
        buffers.deltas.clear();
        buffers.stats.clear();
        coins.clear();
        IndexWindow {
            shard: self,
            write,
            rows: buffers.rows,
            stats: buffers.stats,
            coins,
            recent: VecDeque::new(),
            recent_share: None,
            coin_lookups: CoinLookups::default(),
            deltas: buffers.deltas,
            pending: 0,
            next_height: None,
            txs: 0,
            window_txs,
            capacity,
        }
    }

    /// Inputs still waiting for cross-shard resolution, oldest first: `limit` of them, plus the rest of the
    /// last one's tx (a tx is never split between two calls, so [`Shard::apply_resolved`] sees all of a
    /// tx's pending inputs together and counts the tx once per address).
    pub fn next_pending(&self, limit: usize) -> Result<Vec<PendingSpend>, ShardError> {
        // Sized up front: grown by doubling, its copies were about a tenth of a worker's page faults.
        let mut out: Vec<PendingSpend> = Vec::with_capacity(limit.saturating_add(64).min(1 << 20));
        let mut bad = None;
        self.store
            .scan_once(Cf::Pending, &[], ScanFrom::First, &mut |key, value| {
                match (key.len() == 12, decode_pending(value)) {
                    (true, Some(row)) => {
                        let (height, position) =
                            (schema::be_u32(&key[0..4]), schema::be_u32(&key[4..8]));
                        if out.len() >= limit
                            && out.last().is_some_and(|last| {
                                (last.height, last.position) != (height, position)
                            })
                        {
                            return false;
                        }
                        out.push(PendingSpend {
                            height,
                            position,
                            vin: schema::be_u32(&key[8..12]),
                            input: row.input,
                            commitment: row.commitment,
                            counted: row.counted,
                        });
                    }
                    _ => bad = Some(hex::encode(key)),
                }
                bad.is_none()
            })?;
        match bad {
            Some(key) => Err(corrupt("pending input", key)),
            None => Ok(out),
        }
    }

    /// Spends of other shards' coins already attributed from undo data, with each coin's creating height.
    pub fn next_notices(&self, limit: usize) -> Result<Vec<(PendingSpend, u32)>, ShardError> {
        let mut out = Vec::new();
        let mut bad = None;
        self.store
            .scan_once(Cf::Notices, &[], ScanFrom::First, &mut |key, value| {
                match (
                    key.len() == 12 && value.len() == 72,
                    PendingInput::decode(value.get(..68).unwrap_or_default()),
                ) {
                    (true, Some(input)) => out.push((
                        PendingSpend {
                            height: schema::be_u32(&key[0..4]),
                            position: schema::be_u32(&key[4..8]),
                            vin: schema::be_u32(&key[8..12]),
                            input,
                            commitment: None,
                            counted: Vec::new(),
                        },
                        schema::be_u32(&value[68..72]),
                    )),
                    _ => bad = Some(hex::encode(key)),
                }
                out.len() < limit && bad.is_none()
            })?;
        match bad {
            Some(key) => Err(corrupt("notice", key)),
            None => Ok(out),
        }
    }

    /// The owners have recorded these spends: drop the notices.
    pub fn clear_notices(&self, done: &[PendingSpend]) -> Result<(), ShardError> {
        let mut batch = Batch::default();
        for spend in done {
            batch.delete(
                Cf::Notices,
                pending_key(spend.height, spend.position, spend.vin),
            );
        }
        let mut state = self.state();
        state.pending_inputs = state.pending_inputs.saturating_sub(done.len() as u64);
        batch.put(Cf::Meta, SHARD_STATE_KEY, state.encode_to_vec());
        self.store.write(batch, false)?;
        *self.state.lock().expect("state lock") = state;
        Ok(())
    }

    /// Phase 2: writes the attribution of resolved inputs and drops them from `pending`. `resolved` must be
    /// what [`Shard::next_pending`] returned, in its order: whole txs, a contiguous run of `pending` keys.
    ///
    /// `Write::Bulk` (backfill): the rows are ingested as table files, then the stats, one range deletion of
    /// the `pending` rows and the state go in one batch. A crash between the two leaves the `pending` rows,
    /// so the inputs are resolved again and the same rows rewritten; stats ride only with the deletion, and
    /// the tx count never reads `history` (which could hold the first attempt's rows). `Write::Logged`
    /// (following the tip): everything in one batch.
    pub fn apply_resolved(
        &self,
        resolved: &[(PendingSpend, pb::TxOut)],
        write: Write,
    ) -> Result<(), ShardError> {
        let mut rows = Batch::default();
        let mut batch = Batch::default();
        let mut deltas = Vec::with_capacity(resolved.len());
        // (address key, height, position) whose tx this batch has counted already.
        let mut counted: FastSet<([u8; KEY_HASH_LEN], u32, u32)> = FastSet::default();
        for (spend, out) in resolved {
            let sh = scripthash(bitcoin::Script::from_bytes(&out.script));
            let key = addr_key(&sh);
            let new_tx = !spend.counted.contains(&key)
                && counted.insert((key, spend.height, spend.position));
            // The tx's row for this address, unless phase 1 (or this batch) wrote it: a row that only
            // spends funds nothing, so its value is empty, and a phase 1 row is never overwritten.
            if new_tx {
                rows.put(
                    Cf::History,
                    history_key(&sh, spend.height, spend.position),
                    Vec::new(),
                );
            }
            deltas.push((
                key,
                StatsDelta {
                    spent_sum: out.value,
                    spent_txo_count: 1,
                    tx_count: u32::from(new_tx),
                    ..StatsDelta::default()
                },
            ));
            let template = spend
                .commitment
                .and_then(|c| spent_script::template_matching(&out.script, &c));
            rows.put(
                Cf::Prevouts,
                pending_key(spend.height, spend.position, spend.vin),
                encode_prevout(out.value, template, &out.script),
            );
        }
        let key_of = |spend: &PendingSpend| pending_key(spend.height, spend.position, spend.vin);
        match write {
            Write::Bulk => {
                if let (Some((first, _)), Some((last, _))) = (resolved.first(), resolved.last()) {
                    debug_assert!(
                        resolved
                            .windows(2)
                            .all(|pair| key_of(&pair[0].0) < key_of(&pair[1].0))
                    );
                    let (first, last) = (key_of(first), key_of(last));
                    // [first, last ‖ 0): exactly the keys from first to last.
                    let mut end = last.to_vec();
                    end.push(0);
                    batch.delete_range(Cf::Pending, first, end);
                }
                self.store.bulk_load(&rows)?;
                failpoint(failpoint::RESOLVE_AFTER_INGEST);
            }
            Write::Logged => {
                batch = rows;
                for (spend, _) in resolved {
                    batch.delete(Cf::Pending, key_of(spend));
                }
            }
        }
        self.merge_stats(&mut batch, &mut deltas);
        let mut state = self.state();
        state.pending_inputs = state.pending_inputs.saturating_sub(resolved.len() as u64);
        state.resolution_batches += 1;
        batch.put(Cf::Meta, SHARD_STATE_KEY, state.encode_to_vec());
        self.store.write(batch, false)?;
        *self.state.lock().expect("state lock") = state;
        Ok(())
    }

    /// Another shard's inputs spend these outpoints: return the outputs this shard holds and record who
    /// spends them. Outpoints this shard does not hold are left out of the answer.
    pub fn spend_outputs(
        &self,
        spends: &[pb::SpendRef],
    ) -> Result<Vec<pb::SpentOutput>, ShardError> {
        let prev_txids = spends
            .iter()
            .map(|spend| request_txid(&spend.prev_txid, "spend request"))
            .collect::<Result<Vec<_>, ShardError>>()?;
        // Where each coin's tx is, if it is this shard's (one `MultiGet` of `txs`, whose filter answers
        // most outpoints of other shards), then the rows of those coins (one `MultiGet` of `outputs`).
        let txid_refs: Vec<&Hash32> = prev_txids.iter().collect();
        let mut ours = Vec::new();
        for (index, at) in self
            .live()
            .key_positions(&txid_refs)?
            .into_iter()
            .enumerate()
        {
            if let Some((height, position)) = at {
                ours.push((index, coin_key(height, position, spends[index].prev_vout)));
            }
        }
        let key_refs: Vec<&[u8]> = ours.iter().map(|(_, key)| key.as_slice()).collect();
        let outputs = self.store.multi_get(Cf::Outputs, &key_refs)?;
        let mut found = Vec::new();
        let mut spent = Batch::default();
        // Asked again by the same spender (it crashed before recording the answer, or it is re-indexed
        // elsewhere) once the coin's row was dropped ([`drop_spent_outputs`]): the recorded spend says
        // it was this spender's.
        let mut asked_again = Vec::new();
        for ((index, key), output) in ours.into_iter().zip(outputs) {
            let Some(out) = output_of(output.as_deref(), &prev_txids[index], &key)? else {
                if output.is_none() {
                    asked_again.push((index, key));
                }
                continue;
            };
            spent.put(Cf::Outspends, key, spent_by(&spends[index]).encode());
            found.push(pb::SpentOutput {
                index: index as u32,
                value: out.value,
                script: out.script,
            });
        }
        // Until this shard drops spent coins' rows, a coin of its own without one was spent inside its
        // window by a tx of this shard: asked for by another, it is a double spend, not asked again.
        // Read after the `outputs` lookup: the drop removes the key before any row.
        if !asked_again.is_empty() && self.store.get(Cf::Meta, ALL_COIN_ROWS_KEY)?.is_some() {
            asked_again.clear();
        }
        if !asked_again.is_empty() {
            let again_keys: Vec<&[u8]> =
                asked_again.iter().map(|(_, key)| key.as_slice()).collect();
            let recorded = self.store.multi_get(Cf::Outspends, &again_keys)?;
            // Keys are in block order, so that a source fetching whole blocks (`rpc:`) fetches each once.
            let mut from_bodies = Vec::new();
            for ((index, key), recorded) in asked_again.iter().zip(recorded) {
                if recorded.and_then(|by| SpentBy::decode(&by)) == Some(spent_by(&spends[*index])) {
                    from_bodies.push((*key, *index));
                }
            }
            from_bodies.sort_unstable();
            for (key, index) in from_bodies {
                let (height, position) = (schema::be_u32(&key[..4]), schema::be_u32(&key[4..8]));
                let (txid, vout) = (&prev_txids[index], spends[index].prev_vout);
                if let Some(out) = self.live().coin_in_body(height, position, txid, vout)? {
                    found.push(pb::SpentOutput {
                        index: index as u32,
                        value: out.value,
                        script: out.script,
                    });
                }
            }
            found.sort_by_key(|f| f.index);
        }
        if spent.is_empty() {
            return Ok(found);
        }
        // A backfill's batches (thousands of spends) go around the memtable; `outspends` rows are the same
        // bytes however often they are written, so ingestion's lack of atomicity does not matter here.
        if spent.len() >= BULK_MIN_ROWS {
            self.store.bulk_load(&spent)?;
        } else {
            self.store.write(spent, false)?;
        }
        failpoint(failpoint::SPEND_AFTER_WRITE);
        Ok(found)
    }

    /// Spends by block `height` of coins other shards hold: their owners must forget them on rollback.
    pub fn remote_spends_of_block(&self, height: u32) -> Result<Vec<pb::SpendRef>, ShardError> {
        let mut remote = Vec::new();
        let live = self.live();
        for (position, _, tx) in live.block_txs(height)? {
            if tx.is_coinbase() {
                continue;
            }
            for (vin, input) in tx.input.iter().enumerate() {
                let prev_txid = input.previous_output.txid.to_byte_array();
                if !live.holds_tx(&prev_txid)? {
                    remote.push(pb::SpendRef {
                        prev_txid: prev_txid.to_vec(),
                        prev_vout: input.previous_output.vout,
                        spender_vin: vin as u32,
                        spender_height: height,
                        spender_position: position,
                    });
                }
            }
        }
        Ok(remote)
    }

    /// Removes the newest block (`height` must be `next_height - 1`) and everything it wrote here, in one
    /// atomic batch with the checkpoint. Spends it made of other shards' coins are undone by the caller
    /// first ([`Shard::remote_spends_of_block`]).
    pub fn rollback_block(&self, height: u32) -> Result<(), ShardError> {
        let mut state = self.state();
        if state.next_height != height + 1 {
            return Err(corrupt(
                "rollback",
                format!(
                    "block {height} is not this shard's newest (next is {})",
                    state.next_height
                ),
            ));
        }
        let _coin_rows = self.coin_rows.lock().expect("coin rows lock");
        let mut batch = Batch::default();
        let mut minus: HashMap<ScriptHash, pb::AddressStats> = HashMap::new();
        let live = self.live();
        for (position, txid, tx) in live.block_txs(height)?.into_iter().rev() {
            let mut touched: Vec<ScriptHash> = Vec::new();
            if !tx.is_coinbase() {
                for (vin, input) in tx.input.iter().enumerate() {
                    let vin = vin as u32;
                    let input_key = pending_key(height, position, vin);
                    let prevout = self
                        .store
                        .get(Cf::Prevouts, &input_key)?
                        .map(|bytes| prevout(&bytes, &input_key, input))
                        .transpose()?;
                    if let Some(out) = &prevout {
                        let sh = scripthash(bitcoin::Script::from_bytes(&out.script));
                        let m = minus.entry(sh).or_default();
                        m.spent_txo_count += 1;
                        m.spent_sum += out.value;
                        touched.push(sh);
                        batch.delete(Cf::Prevouts, input_key);
                    }
                    let prev_txid = input.previous_output.txid.to_byte_array();
                    if let Some((coin_height, coin_position)) = live.key_position(&prev_txid)? {
                        // The coin is unspent again. A coin spent in the window that created it never
                        // had an `outputs` row: it gets one now (a rollback of its creator removes it).
                        let coin = coin_key(coin_height, coin_position, input.previous_output.vout);
                        batch.delete(Cf::Outspends, coin);
                        if let Some(out) = &prevout {
                            batch.put(
                                Cf::Outputs,
                                coin,
                                encode_output(&prev_txid, out.value, &out.script),
                            );
                        }
                    }
                    batch.delete(Cf::Pending, pending_key(height, position, vin));
                    batch.delete(Cf::Notices, pending_key(height, position, vin));
                }
            }
            for (vout, output) in tx.output.iter().enumerate() {
                if output.script_pubkey.is_op_return() {
                    continue;
                }
                let vout = vout as u32;
                let sh = scripthash(&output.script_pubkey);
                batch.delete(Cf::Outputs, coin_key(height, position, vout));
                batch.delete(Cf::Outspends, coin_key(height, position, vout));
                let m = minus.entry(sh).or_default();
                m.funded_txo_count += 1;
                m.funded_sum += output.value.to_sat();
                touched.push(sh);
            }
            sort_dedup_scripthashes(&mut touched);
            for sh in touched {
                batch.delete(Cf::History, history_key(&sh, height, position));
                minus.entry(sh).or_default().tx_count += 1;
            }
            batch.delete(Cf::Txs, txid_key(&txid));
        }
        batch.delete_range(
            Cf::TxPositions,
            position_key(height, 0),
            position_key(height + 1, 0),
        );
        if let Some(meta) = live.block_meta(height)? {
            batch.delete(Cf::BlockHashes, meta.hash);
        }
        batch.delete(Cf::Headers, schema::height_key(height));
        for (sh, m) in minus {
            let mut stats = live.load_stats(&sh)?;
            let sub = |a: u64, b: u64| {
                a.checked_sub(b)
                    .ok_or_else(|| corrupt("address stats", "rollback below zero"))
            };
            stats.funded_txo_count = sub(stats.funded_txo_count, m.funded_txo_count)?;
            stats.funded_sum = sub(stats.funded_sum, m.funded_sum)?;
            stats.spent_txo_count = sub(stats.spent_txo_count, m.spent_txo_count)?;
            stats.spent_sum = sub(stats.spent_sum, m.spent_sum)?;
            stats.tx_count = sub(stats.tx_count, m.tx_count)?;
            if stats == pb::AddressStats::default() {
                batch.delete(Cf::History, schema::stats_key(&sh));
            } else {
                batch.put(Cf::History, schema::stats_key(&sh), stats.encode_to_vec());
            }
        }
        state.next_height = height;
        batch.put(Cf::Meta, SHARD_STATE_KEY, state.encode_to_vec());
        self.store.write(batch, true)?;
        self.forget_txid_filter();
        *self.state.lock().expect("state lock") = state;
        Ok(())
    }

    /// A reorg removed these spends: forget them where this shard holds the coin (and the recorded spender
    /// is the one removed). Returns the indexes of the outpoints this shard holds.
    pub fn unspend_outputs(&self, spends: &[pb::SpendRef]) -> Result<Vec<u32>, ShardError> {
        let _coin_rows = self.coin_rows.lock().expect("coin rows lock");
        let mut held = Vec::new();
        let mut batch = Batch::default();
        let live = self.live();
        for (index, spend) in spends.iter().enumerate() {
            let prev_txid = request_txid(&spend.prev_txid, "unspend request")?;
            let Some((coin_height, coin_position)) = live.key_position(&prev_txid)? else {
                continue; // not this shard's coin
            };
            let key = coin_key(coin_height, coin_position, spend.prev_vout);
            let output = self.store.get(Cf::Outputs, &key)?;
            let has_row = output_of(output.as_deref(), &prev_txid, &key)?.is_some();
            let spent_by_this = self
                .store
                .get(Cf::Outspends, &key)?
                .is_some_and(|value| SpentBy::decode(&value) == Some(spent_by(spend)));
            if !has_row && !spent_by_this {
                continue;
            }
            if !has_row {
                // A later shard's spend removed the coin's row: it is unspent again, so it gets it back.
                let body =
                    live.coin_in_body(coin_height, coin_position, &prev_txid, spend.prev_vout);
                let Some(out) = body? else {
                    continue;
                };
                batch.put(
                    Cf::Outputs,
                    key,
                    encode_output(&prev_txid, out.value, &out.script),
                );
            }
            held.push(index as u32);
            if spent_by_this {
                batch.delete(Cf::Outspends, key);
            }
        }
        if !batch.is_empty() {
            self.store.write(batch, true)?;
        }
        Ok(held)
    }

    // ------------------------------------------------------------------ queries
}

/// A shard's rows as one query reads them: [`Shard::view`] holds one snapshot for the whole query, so that a
/// block written or rolled back beside it is in all of its reads or in none (a history page's rows, then
/// each tx's place, header and spent coins; a UTXO's `outspends` then `outputs` row). [`Shard::live`]
/// reads the live rows, for indexing work that must see what was just written.
pub struct ShardView<'a> {
    shard: &'a Shard,
    rows: Box<dyn Reads + 'a>,
}

impl ShardView<'_> {
    fn load_stats(&self, sh: &ScriptHash) -> Result<pb::AddressStats, ShardError> {
        match self.rows.get(Cf::History, &schema::stats_key(sh))? {
            Some(bytes) => {
                pb::AddressStats::decode(bytes.as_slice()).map_err(|e| corrupt("address stats", e))
            }
            None => Ok(pb::AddressStats::default()),
        }
    }

    /// Output `vout` of the tx at (height, position), read from the source, if that tx is `txid`.
    fn coin_in_body(
        &self,
        height: u32,
        position: u32,
        txid: &Hash32,
        vout: u32,
    ) -> Result<Option<pb::TxOut>, ShardError> {
        let body = self.tx_body(height, position)?;
        if body.txid != *txid {
            return Ok(None);
        }
        Ok(body
            .tx
            .output
            .get(vout as usize)
            .map(|out| tx_out(out.value.to_sat(), out.script_pubkey.as_bytes())))
    }

    /// The txs of block `height`, in block order, read back from the source by the hash this shard indexed
    /// (so a block a reorg took off the best chain is still found).
    fn block_txs(&self, height: u32) -> Result<Vec<(u32, Hash32, Transaction)>, ShardError> {
        let meta = self
            .block_meta(height)?
            .ok_or_else(|| corrupt("block", format!("no header at height {height}")))?;
        let hash = block_hash(&meta.hash)?;
        let block: Block = deserialize(&self.shard.source.block_by_hash(&hash)?)
            .map_err(|e| corrupt("block", e))?;
        Ok(block
            .txdata
            .into_iter()
            .enumerate()
            .map(|(position, tx)| (position as u32, tx.compute_txid().to_byte_array(), tx))
            .collect())
    }

    pub fn address_stats(&self, sh: &ScriptHash) -> Result<pb::AddressStats, ShardError> {
        self.load_stats(sh)
    }

    fn block_meta(&self, height: u32) -> Result<Option<pb::BlockMeta>, ShardError> {
        self.rows
            .get(Cf::Headers, &schema::height_key(height))?
            .map(|bytes| {
                pb::BlockMeta::decode(bytes.as_slice()).map_err(|e| corrupt("block meta", e))
            })
            .transpose()
    }

    fn tx_status(&self, height: u32, position: u32) -> Result<pb::TxStatus, ShardError> {
        let meta = self
            .block_meta(height)?
            .ok_or_else(|| corrupt("tx status", format!("no header at height {height}")))?;
        Ok(pb::TxStatus {
            height,
            position,
            block_hash: meta.hash,
            block_time: header_time(&meta.header),
        })
    }

    fn slot_at(&self, height: u32, position: u32) -> Result<TxSlot, ShardError> {
        let no_tx = || corrupt("tx position", format!("no tx at {height}:{position}"));
        let bytes = self
            .rows
            .get(Cf::TxPositions, &schema::tx_slots_key(height, position))?
            .ok_or_else(no_tx)?;
        schema::tx_slot(&bytes, position).ok_or_else(no_tx)
    }

    /// Whether `txid` is one of this shard's txs: then this shard holds its coins. By its 12-byte key only
    /// (a rollback asks this for every input of a block, and reading each coin's tx back from the source
    /// would be a fetch per input): see "Hashes in keys" in doc/schema.md for what grinding can do.
    fn holds_tx(&self, txid: &Hash32) -> Result<bool, ShardError> {
        Ok(self.key_position(txid)?.is_some())
    }

    /// Where the tx with `txid`'s 12-byte key is in this shard, if any.
    fn key_position(&self, txid: &Hash32) -> Result<Option<(u32, u32)>, ShardError> {
        self.rows
            .get(Cf::Txs, &txid_key(txid))?
            .map(|bytes| tx_position(&bytes))
            .transpose()
    }

    /// [`Shard::key_position`] of each txid, with one `MultiGet`.
    fn key_positions(&self, txids: &[&Hash32]) -> Result<Vec<Option<(u32, u32)>>, ShardError> {
        let keys: Vec<_> = txids.iter().map(|txid| txid_key(txid)).collect();
        let refs: Vec<&[u8]> = keys.iter().map(|key| key.as_slice()).collect();
        self.rows
            .multi_get(Cf::Txs, &refs)?
            .into_iter()
            .map(|row| row.map(|bytes| tx_position(&bytes)).transpose())
            .collect()
    }

    /// `txid` in this shard: where it is and its body, read from the source and compared whole (the key
    /// has only 12 bytes of it).
    fn find_tx(&self, txid: &Hash32) -> Result<Option<TxBody>, ShardError> {
        let Some((height, position)) = self.key_position(txid)? else {
            return Ok(None);
        };
        let body = self.tx_body(height, position)?;
        Ok((body.txid == *txid).then_some(body))
    }

    /// The tx at (height, position), its bytes read from the source and checked against the stored txid check.
    fn tx_body(&self, height: u32, position: u32) -> Result<TxBody, ShardError> {
        let slot = self.slot_at(height, position)?;
        let status = self.tx_status(height, position)?;
        let hash = block_hash(&status.block_hash)?;
        let raw = self
            .shard
            .source
            .block_slice(&hash, slot.offset, slot.len)?;
        let tx: Transaction =
            deserialize(&raw).map_err(|e| corrupt("tx body from the source", e))?;
        let txid = tx.compute_txid().to_byte_array();
        if txid[..schema::TXID_CHECK_LEN] != slot.txid_check {
            return Err(corrupt(
                "tx body from the source",
                format!("block {hash} has another tx at {height}:{position}"),
            ));
        }
        Ok(TxBody {
            height,
            position,
            raw,
            tx,
            txid,
            status,
        })
    }

    pub fn tx(&self, txid: &Hash32) -> Result<Option<pb::TxDetail>, ShardError> {
        match self.find_tx(txid)? {
            Some(body) => self.tx_detail(body).map(Some),
            None => Ok(None),
        }
    }

    fn tx_detail_at(&self, height: u32, position: u32) -> Result<pb::TxDetail, ShardError> {
        self.tx_detail(self.tx_body(height, position)?)
    }

    fn tx_detail(&self, body: TxBody) -> Result<pb::TxDetail, ShardError> {
        let TxBody {
            height,
            position,
            raw,
            tx,
            status,
            ..
        } = body;
        // Inputs not yet resolved (shard still in phase 1 or 2) stay empty. Point lookups, not a scan:
        // they read only the files whose height range covers them (one, once the shard is compacted).
        let mut prevouts = vec![pb::TxOut::default(); tx.input.len()];
        if !tx.is_coinbase() {
            let keys: Vec<[u8; 12]> = (0..tx.input.len() as u32)
                .map(|vin| pending_key(height, position, vin))
                .collect();
            let key_refs: Vec<&[u8]> = keys.iter().map(|key| key.as_slice()).collect();
            let values = self.rows.multi_get(Cf::Prevouts, &key_refs)?;
            for (((slot, key), value), input) in
                prevouts.iter_mut().zip(&keys).zip(values).zip(&tx.input)
            {
                if let Some(bytes) = value {
                    *slot = prevout(&bytes, key, input)?;
                }
            }
        }
        Ok(pb::TxDetail {
            raw,
            prevouts,
            status: Some(status),
        })
    }

    /// Distinct txs touching `sh`, newest first, strictly before `before` (height, position) if given.
    pub fn history(
        &self,
        sh: &ScriptHash,
        before: Option<(u32, u32)>,
        limit: usize,
    ) -> Result<Vec<pb::TxDetail>, ShardError> {
        let mut positions: Vec<(u32, u32)> = Vec::new();
        let start = before.map(|(h, p)| history_key(sh, h, p));
        let from = match &start {
            Some(key) => ScanFrom::AtOrBefore(key),
            None => ScanFrom::Last,
        };
        self.rows
            .scan(Cf::History, &addr_key(sh), from, &mut |key, _| {
                // One row per tx; the scan starts at the cursor's own row if the address has one.
                if let Some(at) = parse_history_key(key)
                    && before.is_none_or(|b| at < b)
                {
                    if positions.len() == limit {
                        return false;
                    }
                    positions.push(at);
                }
                true
            })?;
        positions
            .into_iter()
            .map(|(height, position)| self.tx_detail_at(height, position))
            .collect()
    }

    /// Outputs paying `sh` that nobody has spent (as far as resolution has got). An unspent coin always
    /// has its `outputs` row (only coins spent in the window that created them never get one), which
    /// gives its value.
    pub fn utxos(&self, sh: &ScriptHash) -> Result<Vec<pb::Utxo>, ShardError> {
        // (height, position, vout) of every output paying `sh`, in key order.
        let mut funding: Vec<(u32, u32, u32)> = Vec::new();
        let mut malformed = None;
        self.rows.scan(
            Cf::History,
            &addr_key(sh),
            ScanFrom::First,
            &mut |key, value| {
                if let Some((height, position)) = parse_history_key(key) {
                    match decode_funding_vouts(value) {
                        Some(vouts) => {
                            funding.extend(vouts.into_iter().map(|vout| (height, position, vout)))
                        }
                        None => {
                            malformed = Some(hex::encode(key));
                            return false;
                        }
                    }
                }
                true
            },
        )?;
        if let Some(key) = malformed {
            return Err(corrupt("history row", key));
        }
        let mut utxos = Vec::new();
        for (height, position, vout) in funding {
            let key = coin_key(height, position, vout);
            if self.rows.get(Cf::Outspends, &key)?.is_some() {
                continue;
            }
            let missing = || {
                corrupt(
                    "unspent output",
                    format!("no outputs row paying this address at {height}:{position}:{vout}"),
                )
            };
            let bytes = self.rows.get(Cf::Outputs, &key)?.ok_or_else(missing)?;
            let (txid, value, script) =
                decode_output(&bytes).ok_or_else(|| corrupt("output", hex::encode(key)))?;
            // A ground txid pair sharing a 12-byte key can have one's coin row written where the other's
            // was looked up: it must be a coin of this address, or this fails rather than answer it.
            if scripthash(bitcoin::Script::from_bytes(script)) != *sh {
                return Err(missing());
            }
            utxos.push(pb::Utxo {
                txid: txid.to_vec(),
                vout,
                value,
                status: Some(self.tx_status(height, position)?),
            });
        }
        Ok(utxos)
    }

    /// The txid of each spender this shard holds; `None` for heights outside it. Each is hashed from the
    /// tx's body, read in block order so that a source fetching whole blocks (`rpc:`, 16 kept) fetches
    /// each block once, and the body's input must spend the outpoint named with it ([`check_spender`]).
    pub fn spender_txids(
        &self,
        spends: &[pb::SpendRef],
    ) -> Result<Vec<Option<Hash32>>, ShardError> {
        let next_height = self.shard.state().next_height;
        let mut order: Vec<usize> = (0..spends.len()).collect();
        order.sort_unstable_by_key(|&i| (spends[i].spender_height, spends[i].spender_position));
        let mut txids = vec![None; spends.len()];
        for i in order {
            let spend = &spends[i];
            let height = spend.spender_height;
            if height >= self.shard.start && height < next_height {
                let body = self.tx_body(height, spend.spender_position)?;
                check_spender(&body.tx, spend)?;
                txids[i] = Some(body.txid);
            }
        }
        Ok(txids)
    }

    pub fn block(
        &self,
        key: &pb::shard_block_request::Key,
        with_txids: bool,
    ) -> Result<pb::BlockLookup, ShardError> {
        let height = match key {
            pb::shard_block_request::Key::Height(h) => Some(*h),
            pb::shard_block_request::Key::Hash(hash) => self
                .rows
                .get(Cf::BlockHashes, hash)?
                .map(|v| schema::be_u32(&v)),
        };
        let Some(height) = height else {
            return Ok(pb::BlockLookup::default());
        };
        let Some(meta) = self.block_meta(height)? else {
            return Ok(pb::BlockLookup::default());
        };
        let mut txids = Vec::new();
        if with_txids {
            // Only the block's body has whole txids.
            for (_, txid, _) in self.block_txs(height)? {
                txids.push(txid.to_vec());
            }
        }
        Ok(pb::BlockLookup {
            found: true,
            height,
            meta: Some(meta),
            txids,
            median_time: 0,
        })
    }

    /// Who spends each output of `txid`, with the height of the tx. A spender is named by where it is
    /// (height, position, vin); the coordinator asks the spender's shard for its txid (`txids_at`).
    pub fn outspends(&self, txid: &Hash32) -> Result<Option<(u32, Vec<pb::Outspend>)>, ShardError> {
        let Some(TxBody {
            height,
            position,
            tx,
            ..
        }) = self.find_tx(txid)?
        else {
            return Ok(None);
        };
        let mut outspends = Vec::with_capacity(tx.output.len());
        for vout in 0..tx.output.len() as u32 {
            let spend = match self
                .rows
                .get(Cf::Outspends, &coin_key(height, position, vout))?
            {
                Some(value) => {
                    let by =
                        SpentBy::decode(&value).ok_or_else(|| corrupt("outspend", "malformed"))?;
                    pb::Outspend {
                        spent: true,
                        txid: Vec::new(),
                        vin: by.vin,
                        height: by.height,
                        position: by.position,
                    }
                }
                None => pb::Outspend::default(),
            };
            outspends.push(spend);
        }
        Ok(Some((height, outspends)))
    }
}

/// [`drop_spent_outputs`], then a full compaction of the engine: what a shard's database is rewritten to once
/// its backfill is over (benchmarks call this on stopped clusters' databases, with a lock of their own).
pub fn compact_store(store: &dyn Store, coin_rows: &Mutex<()>) -> Result<(), ShardError> {
    // A backfilling shard's database was opened with compression off (`RocksStore::open_for_backfill`);
    // the rewrite below compresses. Automatic compactions resume only after it: resumed before, they
    // would first compact `history`'s many L0 files on their own, which the rewrite then redoes.
    store.set_compression(true)?;
    drop_spent_outputs(store, coin_rows)?;
    store.compact()?;
    Ok(store.resume_auto_compactions()?)
}

/// Deletes the `outputs` row of every coin that has an `outspends` row: only unspent coins need theirs
/// (UTXO answers, spends not indexed yet). During the backfill they are kept, since phase 1 reads them
/// back and a later shard's resolution may ask again after a crash; after it, a coin asked for again by
/// its recorded spender is read back from its tx's body, and one a reorg unspends gets its row back the
/// same way ([`Shard::unspend_outputs`]). Runs while the shard follows the tip: each chunk checks again,
/// under `coin_rows`, that the coin is still spent and still has a row, and deletes only those.
pub fn drop_spent_outputs(store: &dyn Store, coin_rows: &Mutex<()>) -> Result<u64, ShardError> {
    const CHUNK: usize = 20_000;
    // Durably, before any row goes: from now on a spender asking again may find its coin's row gone.
    let mut batch = Batch::default();
    batch.delete(Cf::Meta, ALL_COIN_ROWS_KEY);
    store.write(batch, true)?;
    let mut after: Option<Vec<u8>> = None;
    let mut dropped = 0u64;
    loop {
        // Both scans and the deletes under the lock: what they see of a coin is what it is.
        let _rows = coin_rows.lock().expect("coin rows lock");
        let mut spent: Vec<Vec<u8>> = Vec::with_capacity(CHUNK);
        let from = match &after {
            Some(key) => ScanFrom::AtOrAfter(key),
            None => ScanFrom::First,
        };
        store.scan_once(Cf::Outspends, &[], from, &mut |key, _| {
            if after.as_deref() != Some(key) {
                spent.push(key.to_vec());
            }
            spent.len() < CHUNK
        })?;
        let (Some(first), Some(last)) = (spent.first().cloned(), spent.last().cloned()) else {
            return Ok(dropped);
        };
        // The rows between the chunk's first and last spent key (both families are keyed by where the
        // coin is), matched against it in key order: two sorted scans instead of a lookup per coin.
        let mut batch = Batch::default();
        let mut next_spent = spent.iter().peekable();
        store.scan_once(
            Cf::Outputs,
            &[],
            ScanFrom::AtOrAfter(&first),
            &mut |key, _| {
                if key > last.as_slice() {
                    return false;
                }
                while next_spent.next_if(|s| s.as_slice() < key).is_some() {}
                if next_spent.peek().is_some_and(|s| s.as_slice() == key) {
                    batch.delete(Cf::Outputs, key);
                }
                true
            },
        )?;
        dropped += batch.len() as u64;
        if !batch.is_empty() {
            store.write(batch, false)?;
        }
        after = Some(last);
    }
}

/// Phase 1's unit of writing: the rows of consecutive blocks, kept in memory and written in one atomic
/// batch with the checkpoint after the last of them. Coins created and spent inside the window never reach
/// `outputs` (most coins are spent young), and an address gets one stats merge per window, not per block.
/// A crash loses the window in progress and the shard re-indexes it from the checkpoint; every row it
/// writes again is the same bytes, and stats are only ever written with the checkpoint.
pub struct IndexWindow<'a> {
    shard: &'a Shard,
    write: Write,
    rows: Batch,
    /// Memory for the window's stats merges when it is written ([`SealedWindow::write`]), kept from one
    /// window to the next.
    stats: Batch,
    /// Sized for a whole window and kept from one window to the next: [`IndexWindow::seal`] moves what
    /// is left of it into a map sized for that.
    coins: WindowCoins,
    /// The coins of the windows sealed before this one, newest first: this window's inputs find them
    /// here before looking in the database. The newest may still be being written beside this one
    /// ([`IndexWindow::seal`]), so not in the database yet; every older window is.
    recent: VecDeque<Arc<SealedCoins>>,
    /// What `recent` may hold ([`IndexWindow::keep_recent_coins`]); none without.
    recent_share: Option<RecentCoinsShare>,
    coin_lookups: CoinLookups,
    /// What each tx adds to the stats of each address it touches, one record per (tx, address) by the
    /// stats row's key, appended: summed per address at commit ([`sum_by_address`]). A map of the
    /// window's ~300k addresses took a cache miss per lookup (~5% of a worker's samples).
    deltas: Vec<([u8; KEY_HASH_LEN], StatsDelta)>,
    pending: u64,
    /// The checkpoint after the last block added.
    next_height: Option<u32>,
    txs: usize,
    /// Full at this many txs.
    window_txs: usize,
    /// Txs its buffers are sized for.
    capacity: usize,
}

/// The coins a window being filled created and did not spend itself, and where its txs are.
#[derive(Default)]
pub struct WindowCoins {
    /// Keyed by the whole outpoint: two txids sharing their 12-byte key (ground on purpose) stay apart.
    outputs: FastMap<([u8; 32], u32), WindowCoin>,
    /// Where each of the window's txs is: an `outspends` row is keyed by its coin's (height, position).
    tx_at: FastMap<Hash32, (u32, u32)>,
    /// [`WindowCoins::seal`]'s sort buffer, kept from one window to the next.
    sorted: Vec<((Hash32, u32), WindowCoin)>,
}

impl WindowCoins {
    fn with_capacity(txs: usize) -> WindowCoins {
        WindowCoins {
            outputs: FastMap::with_capacity_and_hasher(txs * 3, Default::default()),
            tx_at: FastMap::with_capacity_and_hasher(txs, Default::default()),
            sorted: Vec::new(),
        }
    }

    /// Empties the maps, keeping their memory.
    fn clear(&mut self) {
        self.outputs.clear();
        self.tx_at.clear();
        self.sorted.clear();
    }

    /// Moves the coins out, packed ([`SealedCoins`]), leaving these maps empty with their memory for the
    /// next window.
    fn seal(&mut self) -> SealedCoins {
        let sorted = &mut self.sorted;
        sorted.extend(self.outputs.drain());
        sorted.sort_unstable_by_key(|(outpoint, _)| *outpoint);
        let mut txs: FastMap<Hash32, TxCoins> =
            FastMap::with_capacity_and_hasher(self.tx_at.len(), Default::default());
        txs.extend(self.tx_at.drain().map(|(txid, (height, position))| {
            let tx = TxCoins {
                height,
                position,
                first: 0,
                count: 0,
            };
            (txid, tx)
        }));
        let mut coins = Vec::with_capacity(sorted.len());
        let mut scripts = Vec::with_capacity(sorted.iter().map(|(_, c)| c.script.len()).sum());
        // Sorted by outpoint, a tx's coins are together: one map lookup per tx that has any.
        for tx_coins in sorted.chunk_by(|((a, _), _), ((b, _), _)| a == b) {
            let ((txid, _), _) = &tx_coins[0];
            let tx = txs
                .get_mut(txid)
                .expect("a window's coins are its own txs'");
            tx.first = coins.len() as u32;
            tx.count = tx_coins.len() as u32;
            for ((_, vout), coin) in tx_coins {
                scripts.extend_from_slice(&coin.script);
                coins.push(SealedCoin {
                    value: coin.value,
                    vout: *vout,
                    script_end: scripts.len(),
                });
            }
        }
        sorted.clear();
        let bytes = map_bytes(&txs)
            + coins.capacity() * std::mem::size_of::<SealedCoin>()
            + scripts.capacity();
        SealedCoins {
            txs,
            coins,
            scripts,
            bytes,
        }
    }
}

/// A sealed window's coins, packed for the windows after it: its txs' places in one map, their unspent
/// coins in one array and the coins' scripts end to end in another. ~11 MiB for a window of 65,536 txs
/// (the worker log's figures), where a map of outpoints to coins, as the window being filled keeps
/// them, took ~16.
pub struct SealedCoins {
    txs: FastMap<Hash32, TxCoins>,
    /// Grouped by tx, each tx's in vout order.
    coins: Vec<SealedCoin>,
    scripts: Vec<u8>,
    /// Memory held.
    bytes: usize,
}

/// Where a sealed window's tx is, and its unspent coins in [`SealedCoins::coins`].
struct TxCoins {
    height: u32,
    position: u32,
    first: u32,
    count: u32,
}

struct SealedCoin {
    value: u64,
    vout: u32,
    /// Where its script ends in [`SealedCoins::scripts`]; it starts where the coin before it ends.
    script_end: usize,
}

impl SealedCoins {
    /// Memory held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Where the window's tx is (height, position in its block).
    fn place(&self, txid: &Hash32) -> Option<(u32, u32)> {
        self.txs.get(txid).map(|tx| (tx.height, tx.position))
    }

    fn script(&self, index: usize) -> &[u8] {
        let start = match index {
            0 => 0,
            _ => self.coins[index - 1].script_end,
        };
        &self.scripts[start..self.coins[index].script_end]
    }

    /// Every unspent coin: its outpoint's txid and vout, where its tx is, its value and script.
    fn each(&self) -> impl Iterator<Item = (&Hash32, u32, &TxCoins, u64, &[u8])> {
        self.txs.iter().flat_map(move |(txid, tx)| {
            let first = tx.first as usize;
            (first..first + tx.count as usize).map(move |i| {
                let coin = &self.coins[i];
                (txid, coin.vout, tx, coin.value, self.script(i))
            })
        })
    }

    /// The coin's `outputs` key, and its row as [`SealedWindow::write`] writes it (`None`: the window
    /// has the tx but not that coin), if the window has the tx.
    fn stored_coin(&self, txid: &Hash32, vout: u32) -> Option<([u8; 12], Option<Vec<u8>>)> {
        let tx = self.txs.get(txid)?;
        let first = tx.first as usize;
        let row = (first..first + tx.count as usize)
            .find(|&i| self.coins[i].vout == vout)
            .map(|i| encode_output(txid, self.coins[i].value, self.script(i)));
        Some((coin_key(tx.height, tx.position, vout), row))
    }
}

/// What a map's table takes: a power of two of slots, each an entry and a control byte, 7 in 8 of them
/// usable (hashbrown's layout, which `std`'s map is).
fn map_bytes<K, V, S>(map: &HashMap<K, V, S>) -> usize {
    if map.capacity() == 0 {
        return 0;
    }
    let slots = (map.capacity() * 8).div_ceil(7).next_power_of_two();
    slots * (std::mem::size_of::<(K, V)>() + 1)
}

/// Memory a worker gives to the coins of recent windows (`chainidx node --recent-coins-mib`), shared
/// evenly by the shards it indexes at once: a lone shard keeps twice the windows each of two shards
/// keeps, and the worker's memory stays within the budget however many shards it is given.
#[derive(Debug)]
pub struct RecentCoinsBudget {
    bytes: AtomicUsize,
    shards: AtomicUsize,
}

impl RecentCoinsBudget {
    pub fn new(bytes: usize) -> Arc<RecentCoinsBudget> {
        Arc::new(RecentCoinsBudget {
            bytes: AtomicUsize::new(bytes),
            shards: AtomicUsize::new(0),
        })
    }

    pub fn set_bytes(&self, bytes: usize) {
        self.bytes.store(bytes, Ordering::Relaxed);
    }

    /// A shard's part of the budget while the share lives.
    pub fn share(self: &Arc<Self>) -> RecentCoinsShare {
        self.shards.fetch_add(1, Ordering::Relaxed);
        RecentCoinsShare(self.clone())
    }
}

/// One shard's part of a [`RecentCoinsBudget`]: the budget over the shards holding a share now.
#[derive(Debug)]
pub struct RecentCoinsShare(Arc<RecentCoinsBudget>);

impl RecentCoinsShare {
    fn bytes(&self) -> usize {
        let budget = &self.0;
        budget.bytes.load(Ordering::Relaxed) / budget.shards.load(Ordering::Relaxed).max(1)
    }
}

impl Drop for RecentCoinsShare {
    fn drop(&mut self) {
        self.0.shards.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Where the coins of a shard's inputs were found while indexing, over all its windows: what keeping
/// recent windows saves.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CoinLookups {
    /// In the window itself (the same block included).
    pub in_window: u64,
    /// In a recent window still in memory.
    pub in_recent: u64,
    /// Looked up in the database: an earlier window's coin, or none (another shard's).
    pub in_database: u64,
}

/// A window's memory, handed from a written window to the next one to be filled: a backfill's windows
/// reuse the memory of those written before them (fresh pages cost the kernel's zeroing).
#[derive(Default)]
pub struct WindowBuffers {
    rows: Batch,
    deltas: Vec<([u8; KEY_HASH_LEN], StatsDelta)>,
    /// The window's stats merges, one per address (the rows go around it, as a table file).
    stats: Batch,
}

impl WindowBuffers {
    /// A map fills all of its memory however few entries it holds (hashes land anywhere), and every
    /// worker touches its windows' memory afresh: with eight workers on small shards, zeroing those
    /// pages was a quarter of their CPU. So a window is sized for `txs`, not more.
    fn with_capacity(txs: usize) -> WindowBuffers {
        WindowBuffers {
            rows: Batch::with_capacity(txs * WINDOW_ROWS_PER_TX, txs * WINDOW_BYTES_PER_TX),
            deltas: Vec::with_capacity(txs * 4),
            stats: Batch::default(),
        }
    }
}

/// A shard's window memory once the shard is indexed, for the next shard its worker indexes: each shard's
/// windows faulted in and zeroed ~100 MB afresh (the allocator hands memory free for about a second back
/// to the kernel); with the other reuses of that change, 16% fewer page faults with 16 shards in one
/// worker (doc/performance.md).
pub struct SpareWindow {
    buffers: WindowBuffers,
    coins: WindowCoins,
}

/// A window's rows on their way to the database: see [`IndexWindow::seal`].
pub struct SealedWindow<'a> {
    shard: &'a Shard,
    write: Write,
    rows: Batch,
    coins: Arc<SealedCoins>,
    deltas: Vec<([u8; KEY_HASH_LEN], StatsDelta)>,
    stats: Batch,
    pending: u64,
    next_height: u32,
}

/// A coin in a window's map: 64 bytes with its outpoint, so that each of the map's entries lies in one
/// cache line (a `TxOut`, whose script is a `Vec`, made them 72: two lines per lookup, each a miss).
struct WindowCoin {
    value: u64,
    script: Box<[u8]>,
}

const _: () = assert!(std::mem::size_of::<(([u8; 32], u32), WindowCoin)>() == 64);

impl From<WindowCoin> for pb::TxOut {
    fn from(coin: WindowCoin) -> pb::TxOut {
        pb::TxOut {
            value: coin.value,
            script: coin.script.into_vec(),
        }
    }
}

/// What a tx adds to an address's stats, in a window or a resolution batch: 40 bytes with its key
/// instead of 56 for an `AddressStats` (packed to 4-byte alignment, so that no padding follows the
/// 12-byte key), in records sorted and summed per address before they are written. A window's or a
/// batch's counts fit in 32 bits: it would take billions of outputs, tens of GB, in one.
#[derive(Default, Clone, Copy)]
#[repr(C, packed(4))]
struct StatsDelta {
    funded_sum: u64,
    spent_sum: u64,
    funded_txo_count: u32,
    spent_txo_count: u32,
    tx_count: u32,
}

const _: () = assert!(std::mem::size_of::<([u8; KEY_HASH_LEN], StatsDelta)>() == 40);

impl StatsDelta {
    fn add(&mut self, other: StatsDelta) {
        self.funded_sum += other.funded_sum;
        self.spent_sum += other.spent_sum;
        self.funded_txo_count += other.funded_txo_count;
        self.spent_txo_count += other.spent_txo_count;
        self.tx_count += other.tx_count;
    }
}

const _: () = assert!(
    KEY_HASH_LEN == 12,
    "sum_by_address sorts keys as a u64 and a u32"
);

/// Sorts stats records by address key and sums each address's into one, in place.
fn sum_by_address(records: &mut Vec<([u8; KEY_HASH_LEN], StatsDelta)>) {
    // Integer keys compare faster than 12-byte slices.
    records.sort_unstable_by_key(|(key, _)| {
        let (high, low) = key.split_at(8);
        (
            u64::from_be_bytes(high.try_into().expect("8 bytes")),
            u32::from_be_bytes(low.try_into().expect("4 bytes")),
        )
    });
    records.dedup_by(|later, kept| {
        let same = later.0 == kept.0;
        if same {
            kept.1.add(later.1);
        }
        same
    });
}

impl From<StatsDelta> for pb::AddressStats {
    fn from(stats: StatsDelta) -> pb::AddressStats {
        pb::AddressStats {
            funded_txo_count: stats.funded_txo_count.into(),
            funded_sum: stats.funded_sum,
            spent_txo_count: stats.spent_txo_count.into(),
            spent_sum: stats.spent_sum,
            tx_count: stats.tx_count.into(),
        }
    }
}

/// Memory for the coins of recent windows, per worker ([`RecentCoinsBudget`]): a window of 65,536 txs
/// keeps ~11 MiB of them, packed. One 3.99M-tx shard ran at 55k tx/s keeping no window, 72k with 4, 90k
/// with 8 and 99k with 16 (a fast hour); 4 per shard put a worker indexing 16 shards of 500k txs two at a
/// time at 1.2–1.3 GiB, and 8 at 1,414 MiB, near the 1.5 GiB workers are held to. 128 MiB is 11 windows
/// for a lone shard and 5–6 for each of two (the same worker: 1,284–1,325 MiB).
pub const DEFAULT_RECENT_COINS_BYTES: usize = 128 << 20;

/// Writes of at least this many rows are worth a table file of their own rather than memtable inserts.
const BULK_MIN_ROWS: usize = 1_000;

/// Transactions per backfill window (`chainidx node --window-txs`): with its maps of coins and stats, a
/// window holds some 120 MB. Larger windows keep more coins from ever getting an `outputs` row (spent
/// inside their window), look fewer up and merge fewer stats: 65,536 instead of 32,768 took 1 worker on 1.98M txs from 27.3/26.6 to
/// 22.3/21.8 CPU-s per million txs (the compaction after it +2–4), for ~100 MiB more peak RSS.
pub const DEFAULT_WINDOW_TXS: usize = 65_536;
/// Room a window's batch starts with, per tx: the generated chain writes ~16 rows and ~500 bytes of keys
/// and values per tx (coins and pending inputs included).
const WINDOW_ROWS_PER_TX: usize = 20;
const WINDOW_BYTES_PER_TX: usize = 640;

/// A tx's size without its witness data (`Transaction::base_size`), from its whole size: the marker and
/// flag bytes and every input's witness are what the whole size adds when the tx is serialized with
/// witnesses (BIP144: some input has one, or there are no inputs).
fn base_size(tx: &bitcoin::Transaction, total_size: usize) -> usize {
    let with_witnesses =
        tx.input.is_empty() || tx.input.iter().any(|input| !input.witness.is_empty());
    if with_witnesses {
        total_size
            - 2
            - tx.input
                .iter()
                .map(|input| input.witness.size())
                .sum::<usize>()
    } else {
        total_size
    }
}

impl<'a> IndexWindow<'a> {
    /// Adds one block's rows. Inputs whose coin was created in this shard (in the window, or in an earlier
    /// window already written) are attributed now; the others are parked in `pending`. With undo data
    /// (`spent`, from a datadir source) every input is attributed now, and spends of other shards' coins
    /// are parked in `notices` only so that their owners can record who spent them.
    pub fn add(
        &mut self,
        height: u32,
        block: &Block,
        spent: Option<&[Vec<SpentCoin>]>,
    ) -> Result<(), ShardError> {
        let shard = self.shard;
        let end = shard.end();
        if height < shard.start || height >= end {
            return Err(ShardError::OutOfRange {
                shard: shard.id,
                height,
                start: shard.start,
                end,
            });
        }
        if let Some(spent) = spent {
            let shapes_match = spent.len() + 1 == block.txdata.len()
                && spent
                    .iter()
                    .zip(block.txdata.iter().skip(1))
                    .all(|(coins, tx)| coins.len() == tx.input.len());
            if !shapes_match {
                return Err(corrupt(
                    "undo data",
                    format!("does not match the inputs of block {height}"),
                ));
            }
        }
        let batch = &mut self.rows;
        let deltas = &mut self.deltas;
        let recent = &self.recent;
        let coins = &mut self.coins;
        let window_outputs = &mut coins.outputs;
        let mut pending = 0u64;
        let block_hash = block.block_hash().to_byte_array();
        failpoint(failpoint::INDEX_BEFORE_WRITE);

        batch.put(Cf::BlockHashes, block_hash, schema::height_key(height));

        let txids: Vec<Hash32> = block
            .txdata
            .iter()
            .map(|tx| tx.compute_txid().to_byte_array())
            .collect();
        let (mut input_coins, earlier_coins) = match spent {
            Some(_) => Default::default(),
            None => locate_input_coins(
                shard,
                block,
                &txids,
                window_outputs,
                recent,
                &mut self.coin_lookups,
            )?,
        };
        let tx_at = &mut coins.tx_at;
        let mut input_coins = input_coins.drain(..);
        // Byte offset of each tx in the block: after the header and the tx count.
        let mut offset = 80 + bitcoin::consensus::encode::VarInt(block.txdata.len() as u64).size();
        // (txid, length) of the txs of the `tx_positions` row being filled, and its first tx's offset.
        let mut slots: Vec<(Hash32, usize)> = Vec::new();
        let mut slots_offset = offset;
        // The block's weight, summed from what the loop measures anyway (`headers`, after it):
        // `Block::total_size` and `Block::weight` walked every tx twice more (~0.7% of a worker's CPU).
        let mut weight = 4 * offset;
        // Per tx, kept for the next one. What each input and output adds to its script's stats,
        // applied once per script; inputs whose coin no shard here has yet, parked in `pending`.
        let mut touched: Vec<(ScriptHash, Touch)> = Vec::new();
        let mut parked: Vec<(u32, PendingInput, Option<Commitment>)> = Vec::new();
        let mut funding_vouts: Vec<u32> = Vec::new();
        let mut funding_value: Vec<u8> = Vec::new();
        for (position, tx) in block.txdata.iter().enumerate() {
            let txid = txids[position];
            let position = position as u32;
            let len = tx.total_size();
            weight += 3 * base_size(tx, len) + len;
            slots.push((txid, len));
            offset += len;
            if slots.len() as u32 == schema::TXS_PER_SLOT_ROW
                || position as usize + 1 == block.txdata.len()
            {
                batch.put(
                    Cf::TxPositions,
                    schema::tx_slots_key(height, position),
                    schema::encode_tx_slots(
                        slots_offset as u32,
                        slots.iter().map(|(txid, len)| (txid, *len)),
                    ),
                );
                slots.clear();
                slots_offset = offset;
            }
            batch.put(Cf::Txs, txid_key(&txid), position_key(height, position));
            tx_at.insert(txid, (height, position));
            touched.clear();

            if !tx.is_coinbase() {
                for (vin, input) in tx.input.iter().enumerate() {
                    let vin = vin as u32;
                    let prev_txid = input.previous_output.txid.to_byte_array();
                    let prev_vout = input.previous_output.vout;
                    let undo = spent.map(|s| &s[position as usize - 1][vin as usize]);
                    if let Some(coin) = undo.filter(|c| c.height < shard.start) {
                        let parked = PendingInput {
                            prev_txid,
                            prev_vout: input.previous_output.vout,
                            spender_txid: txid,
                        };
                        let mut notice = parked.encode().to_vec();
                        notice.extend_from_slice(&coin.height.to_be_bytes());
                        batch.put(Cf::Notices, pending_key(height, position, vin), notice);
                        pending += 1;
                    }
                    // The coin, if this shard has it yet, and where it is: its `outspends` key.
                    // Looked up in the window's places only where the coin is the window's: a map of
                    // ~65k txs, each lookup a cache miss.
                    let window_coin = || {
                        tx_at
                            .get(&prev_txid)
                            .map(|&(h, p)| coin_key(h, p, prev_vout))
                    };
                    let (spent, coin_at) = match undo {
                        Some(coin) => {
                            let at = match window_coin() {
                                _ if coin.height < shard.start => None,
                                Some(key) => Some(key),
                                None => match recent.iter().find_map(|w| w.place(&prev_txid)) {
                                    Some(place) => Some(place),
                                    None => shard.live().key_position(&prev_txid)?,
                                }
                                .map(|(h, p)| coin_key(h, p, prev_vout)),
                            };
                            let out = pb::TxOut {
                                value: coin.value,
                                script: coin.script.to_bytes(),
                            };
                            (Some(out), at)
                        }
                        // Spent inside the window: the coin never reaches `outputs`.
                        None => match input_coins.next() {
                            Some(InputCoin::Window(coin)) => (Some(coin.into()), window_coin()),
                            Some(InputCoin::InBlock) => {
                                match (
                                    window_outputs.remove(&(prev_txid, prev_vout)),
                                    window_coin(),
                                ) {
                                    (Some(coin), at) => (Some(coin.into()), at),
                                    (None, Some(key)) => {
                                        let row = shard.store.get(Cf::Outputs, &key)?;
                                        (output_of(row.as_deref(), &prev_txid, &key)?, Some(key))
                                    }
                                    (None, None) => (None, None),
                                }
                            }
                            Some(InputCoin::Stored) => {
                                match earlier_coins.get(&(prev_txid, prev_vout)) {
                                    Some((key, row)) => {
                                        (output_of(row.as_deref(), &prev_txid, key)?, Some(*key))
                                    }
                                    None => (None, None),
                                }
                            }
                            None => return Err(corrupt("block", "inputs changed while indexed")),
                        },
                    };
                    match spent {
                        Some(out) => {
                            let sh = scripthash(bitcoin::Script::from_bytes(&out.script));
                            touched.push((sh, Touch::Spends(out.value)));
                            if undo.is_none_or(|c| c.height >= shard.start) {
                                let coin_at = coin_at.ok_or_else(|| {
                                    corrupt(
                                        "coin",
                                        format!(
                                            "no txs row for {}",
                                            hex::encode(&prev_txid[..KEY_HASH_LEN])
                                        ),
                                    )
                                })?;
                                batch.put(
                                    Cf::Outspends,
                                    coin_at,
                                    SpentBy {
                                        height,
                                        position,
                                        vin,
                                    }
                                    .encode(),
                                );
                            }
                            batch.put(
                                Cf::Prevouts,
                                pending_key(height, position, vin),
                                encode_prevout(
                                    out.value,
                                    spent_script::template_for(&out.script, input),
                                    &out.script,
                                ),
                            );
                        }
                        // Written below, once the tx's addresses are known.
                        None => parked.push((
                            vin,
                            PendingInput {
                                prev_txid,
                                prev_vout: input.previous_output.vout,
                                spender_txid: txid,
                            },
                            spent_script::commitment(input),
                        )),
                    }
                }
            }

            for (vout, output) in tx.output.iter().enumerate() {
                if output.script_pubkey.is_op_return() {
                    continue; // provably unspendable: never funds an address, never spent
                }
                let vout = vout as u32;
                let value = output.value.to_sat();
                let sh = scripthash(&output.script_pubkey);
                let coin = WindowCoin {
                    value,
                    script: output.script_pubkey.as_bytes().into(),
                };
                // Written at commit unless spent inside the window.
                window_outputs.insert((txid, vout), coin);
                touched.push((sh, Touch::Funds { value, vout }));
            }
            // One history row and one stats record per script the tx touches, not one per input and
            // output plus one for its tx count.
            touched.sort_unstable_by(|(a, _), (b, _)| scripthash_order(a, b));
            let mut counted = Vec::new();
            for script in touched.chunk_by(|(a, _), (b, _)| a == b) {
                funding_vouts.clear();
                deltas.push((schema::stats_key(&script[0].0), StatsDelta::default()));
                let delta = &mut deltas.last_mut().expect("just pushed").1;
                delta.tx_count += 1;
                for (_, touch) in script {
                    match *touch {
                        Touch::Funds { value, vout } => {
                            delta.funded_txo_count += 1;
                            delta.funded_sum += value;
                            funding_vouts.push(vout);
                        }
                        Touch::Spends(value) => {
                            delta.spent_txo_count += 1;
                            delta.spent_sum += value;
                        }
                    }
                }
                funding_vouts.sort_unstable();
                encode_funding_vouts(&funding_vouts, &mut funding_value);
                batch.put(
                    Cf::History,
                    history_key(&script[0].0, height, position),
                    &funding_value,
                );
                if !parked.is_empty() {
                    counted.push(addr_key(&script[0].0));
                }
            }
            if !parked.is_empty() {
                for (vin, input, commitment) in parked.drain(..) {
                    batch.put(
                        Cf::Pending,
                        pending_key(height, position, vin),
                        encode_pending(&input, commitment.as_ref(), &counted),
                    );
                    pending += 1;
                }
            }
        }
        // `offset` is now the block's size.
        let meta = pb::BlockMeta {
            hash: block_hash.to_vec(),
            header: serialize(&block.header),
            size: offset as u32,
            weight: weight as u32,
            tx_count: block.txdata.len() as u32,
        };
        batch.put(
            Cf::Headers,
            schema::height_key(height),
            meta.encode_to_vec(),
        );
        self.pending += pending;
        self.txs += block.txdata.len();
        self.next_height = Some(height + 1);
        failpoint(failpoint::INDEX_AFTER_WRITE);
        Ok(())
    }

    /// Enough rows held in memory: time to [`IndexWindow::commit`]. Blocks following the tip are
    /// committed one by one.
    pub fn is_full(&self) -> bool {
        self.write == Write::Logged || self.txs >= self.window_txs
    }

    /// Writes the window's rows, the coins it created and nobody in it spent, its stats (one merge per
    /// address) and the checkpoint after its last block, in one atomic write. Empty windows write nothing.
    pub fn commit(&mut self) -> Result<(), ShardError> {
        let Some(sealed) = self.seal(false) else {
            return Ok(());
        };
        let written = sealed.write()?;
        self.reuse(written);
        Ok(())
    }

    /// Takes the window's blocks out to be written ([`SealedWindow::write`]) and leaves it empty for the
    /// next ones, without memory until [`IndexWindow::reuse`] gives it some. `written_beside`: the write
    /// runs beside the next blocks (on another core), whose inputs then find this window's coins in it
    /// until the next seal, as they are not in the database yet. `None` for an empty window.
    pub fn seal(&mut self, written_beside: bool) -> Option<SealedWindow<'a>> {
        let next_height = self.next_height.take()?;
        let coins = Arc::new(self.coins.seal());
        // A window written beside must stay until the next seal, whatever the budget: it is not in the
        // database yet. Tip windows hold no share ([`IndexWindow::keep_recent_coins`]), so keep none.
        let limit = self
            .recent_share
            .as_ref()
            .map_or(0, RecentCoinsShare::bytes);
        let must_keep = usize::from(written_beside);
        self.recent.push_front(coins.clone());
        while self.recent.len() > must_keep && self.recent_coins().1 > limit {
            self.recent.pop_back();
        }
        self.txs = 0;
        Some(SealedWindow {
            shard: self.shard,
            write: self.write,
            rows: std::mem::take(&mut self.rows),
            coins,
            deltas: std::mem::take(&mut self.deltas),
            stats: std::mem::take(&mut self.stats),
            pending: std::mem::take(&mut self.pending),
            next_height,
        })
    }

    /// Gives a sealed (empty) window the memory of a written one, emptied.
    pub fn reuse(&mut self, mut buffers: WindowBuffers) {
        debug_assert!(self.next_height.is_none(), "reuse is for an empty window");
        buffers.rows.clear();
        buffers.deltas.clear();
        buffers.stats.clear();
        self.rows = buffers.rows;
        self.deltas = buffers.deltas;
        self.stats = buffers.stats;
    }

    /// The window's memory, for the next shard to be indexed ([`Shard::window_from`]); `None` for a tip
    /// window, which has little. Call it once the last window is written.
    pub fn into_spare(mut self) -> Option<SpareWindow> {
        (self.write == Write::Bulk).then(|| SpareWindow {
            buffers: WindowBuffers {
                rows: std::mem::take(&mut self.rows),
                deltas: std::mem::take(&mut self.deltas),
                stats: std::mem::take(&mut self.stats),
            },
            coins: std::mem::take(&mut self.coins),
        })
    }

    /// Keeps the coins of the last sealed windows in memory, as many as fit in `share`, where later
    /// windows' inputs find them without a database lookup (most coins are spent young). Each costs the
    /// memory of the coins a window leaves unspent and of its txs' places (~11 MiB at the default
    /// window size).
    /// Tip windows (one block each, written through the memtable) keep none: their share is dropped,
    /// so a shard following the tip takes no part of the budget.
    pub fn keep_recent_coins(mut self, share: RecentCoinsShare) -> Self {
        if self.write == Write::Bulk {
            self.recent_share = Some(share);
        }
        self
    }

    /// Sealed windows whose coins are kept now, and their bytes.
    pub fn recent_coins(&self) -> (usize, usize) {
        let bytes = self.recent.iter().map(|coins| coins.bytes()).sum();
        (self.recent.len(), bytes)
    }

    /// Where this window's inputs have found their coins so far.
    pub fn coin_lookups(&self) -> CoinLookups {
        self.coin_lookups
    }

    /// Memory for a window of the size this one was made for.
    pub fn fresh_buffers(&self) -> WindowBuffers {
        match self.write {
            Write::Bulk => WindowBuffers::with_capacity(self.capacity),
            Write::Logged => WindowBuffers::default(),
        }
    }
}

impl SealedWindow<'_> {
    /// See [`IndexWindow::commit`]. Gives the window's memory back for [`IndexWindow::reuse`].
    pub fn write(mut self) -> Result<WindowBuffers, ShardError> {
        let shard = self.shard;
        let _coin_rows = shard.coin_rows.lock().expect("coin rows lock");
        for (txid, vout, tx, value, script) in self.coins.each() {
            self.rows.put(
                Cf::Outputs,
                coin_key(tx.height, tx.position, vout),
                encode_output(txid, value, script),
            );
        }
        // Backfill: the rows go around the memtable as sorted table files (half of indexing was skiplist
        // inserts of random keys); the stats and the checkpoint follow in a batch. A crash between the two
        // re-indexes the window, rewriting the same rows.
        let mut batch = match self.write {
            Write::Bulk => {
                shard.store.bulk_load(&self.rows)?;
                self.rows.clear();
                failpoint(failpoint::INDEX_AFTER_INGEST);
                std::mem::take(&mut self.stats)
            }
            Write::Logged => std::mem::take(&mut self.rows),
        };
        shard.merge_stats(&mut batch, &mut self.deltas);
        let mut state = shard.state();
        state.next_height = self.next_height;
        state.pending_inputs += self.pending;
        state.cross_shard_inputs += self.pending;
        state.windows_committed += 1;
        batch.put(Cf::Meta, SHARD_STATE_KEY, state.encode_to_vec());
        // A bulk window's stats batch goes back with the window's memory, emptied.
        let stats = match self.write {
            Write::Bulk => {
                shard.store.write_unlogged(&batch)?;
                batch.clear();
                batch
            }
            Write::Logged => {
                shard.store.write(batch, false)?;
                Batch::default()
            }
        };
        shard.forget_txid_filter();
        *shard.state.lock().expect("state lock") = state;
        Ok(WindowBuffers {
            rows: self.rows,
            deltas: self.deltas,
            stats,
        })
    }
}

/// A `prevouts` value as a `TxOut`; `input` is the spending input, which rebuilds a script the row does
/// not keep.
fn prevout(bytes: &[u8], key: &[u8], input: &TxIn) -> Result<pb::TxOut, ShardError> {
    let (value, script) =
        decode_prevout(bytes).ok_or_else(|| corrupt("prevout", hex::encode(key)))?;
    match script {
        SpentScript::Whole(script) => Ok(tx_out(value, script)),
        SpentScript::Rebuilt(template) => match spent_script::rebuild(template, input) {
            Some(script) => Ok(pb::TxOut { value, script }),
            None => Err(corrupt(
                "prevout",
                format!(
                    "{}: the spending input no longer gives its coin's script",
                    hex::encode(key)
                ),
            )),
        },
    }
}

fn tx_out(value: u64, script: &[u8]) -> pb::TxOut {
    pb::TxOut {
        value,
        script: script.to_vec(),
    }
}

/// A tx read back from the source, checked against the txid check stored for its position.
struct TxBody {
    height: u32,
    position: u32,
    raw: Vec<u8>,
    tx: Transaction,
    txid: Hash32,
    status: pb::TxStatus,
}

/// Where the coin of one input of a block (coinbases have none) is to be found, in input order: decided
/// before the block's txs are added, so that each input looks in the window's map of coins once (a cache
/// miss in a map of ~200k coins) instead of twice.
enum InputCoin {
    /// Created earlier in the window: taken out of its map already.
    Window(WindowCoin),
    /// Created by a tx of the same block, which puts it in the window's map on the way.
    InBlock,
    /// Not the window's: an `outputs` row of an earlier window, or another shard's coin.
    Stored,
}

/// The coins of `block`'s inputs ([`InputCoin`], in input order), and for those neither this window nor
/// the block itself created, where they are and their `outputs` rows if this shard holds them: coins of
/// recent windows (`recent`, the newest perhaps still being written), or of earlier windows (absent: other
/// shards' coins), read with one `MultiGet` of `txs` (the coins' places) and one of `outputs` per block
/// rather than lookups per input.
#[allow(clippy::type_complexity)]
fn locate_input_coins(
    shard: &Shard,
    block: &Block,
    txids: &[Hash32],
    window_outputs: &mut FastMap<(Hash32, u32), WindowCoin>,
    recent: &VecDeque<Arc<SealedCoins>>,
    lookups: &mut CoinLookups,
) -> Result<
    (
        Vec<InputCoin>,
        FastMap<(Hash32, u32), ([u8; 12], Option<Vec<u8>>)>,
    ),
    ShardError,
> {
    let in_block: std::collections::HashSet<&Hash32> = txids.iter().collect();
    let mut coins = Vec::new();
    let mut stored: Vec<(Hash32, u32)> = Vec::new();
    let mut found = FastMap::default();
    for tx in block.txdata.iter().filter(|tx| !tx.is_coinbase()) {
        for input in &tx.input {
            let prev_txid = input.previous_output.txid.to_byte_array();
            let vout = input.previous_output.vout;
            coins.push(if in_block.contains(&prev_txid) {
                lookups.in_window += 1;
                InputCoin::InBlock
            } else if let Some(out) = window_outputs.remove(&(prev_txid, vout)) {
                lookups.in_window += 1;
                InputCoin::Window(out)
            } else {
                // A recent window's coin, as its `outputs` row is (or will be, if still being written).
                match recent.iter().find_map(|w| w.stored_coin(&prev_txid, vout)) {
                    Some(coin) => {
                        lookups.in_recent += 1;
                        found.insert((prev_txid, vout), coin);
                    }
                    None => {
                        lookups.in_database += 1;
                        stored.push((prev_txid, vout));
                    }
                }
                InputCoin::Stored
            });
        }
    }
    // Sorted by txid key, so that `txs` is read in key order and each tx looked up once.
    stored.sort_unstable();
    stored.dedup();
    let mut txs: Vec<&Hash32> = stored.iter().map(|(txid, _)| txid).collect();
    txs.dedup();
    let mut places = FastMap::default();
    for (txid, at) in txs.iter().zip(shard.live().key_positions(&txs)?) {
        if let Some(at) = at {
            places.insert(**txid, at);
        }
    }
    let ours: Vec<((Hash32, u32), [u8; 12])> = stored
        .iter()
        .filter_map(|&(txid, vout)| {
            let &(height, position) = places.get(&txid)?;
            Some(((txid, vout), coin_key(height, position, vout)))
        })
        .collect();
    let refs: Vec<&[u8]> = ours.iter().map(|(_, key)| key.as_slice()).collect();
    let rows = shard.store.multi_get(Cf::Outputs, &refs)?;
    found.extend(
        ours.into_iter()
            .zip(rows)
            .map(|((outpoint, key), row)| (outpoint, (key, row))),
    );
    Ok((coins, found))
}

/// The coin of `txid` in an `outputs` value, if it is that tx's: a coin found through a 12-byte txid key
/// may be another tx's sharing them. `None` for no row or another tx's row.
fn output_of(
    bytes: Option<&[u8]>,
    txid: &Hash32,
    key: &[u8],
) -> Result<Option<pb::TxOut>, ShardError> {
    let Some(bytes) = bytes else {
        return Ok(None);
    };
    let (coin_txid, value, script) =
        decode_output(bytes).ok_or_else(|| corrupt("output", hex::encode(key)))?;
    Ok((coin_txid == txid).then(|| tx_out(value, script)))
}

/// (height, position) of a `txs` value.
fn tx_position(bytes: &[u8]) -> Result<(u32, u32), ShardError> {
    if bytes.len() != 8 {
        return Err(corrupt("tx", "position is not 8 bytes"));
    }
    Ok((schema::be_u32(&bytes[..4]), schema::be_u32(&bytes[4..])))
}

/// What an owner records in `outspends` for a spend request.
fn spent_by(spend: &pb::SpendRef) -> SpentBy {
    SpentBy {
        height: spend.spender_height,
        position: spend.spender_position,
        vin: spend.spender_vin,
    }
}

/// An `outspends` row is found through its tx's 12-byte txid key (`txs`), so it can name the spender of
/// another tx sharing those bytes (a ground pair, doc/schema.md "Hashes in keys"): an outspend is only answered if
/// the spender's input really spends the outpoint asked about; otherwise the query fails loudly rather
/// than send an investigator down the other tx's trail.
fn check_spender(spender: &Transaction, spend: &pb::SpendRef) -> Result<(), ShardError> {
    let prev_txid = request_txid(&spend.prev_txid, "spent txid")?;
    let spent = spender
        .input
        .get(spend.spender_vin as usize)
        .map(|input| input.previous_output);
    match spent {
        Some(out) if out.txid.to_byte_array() == prev_txid && out.vout == spend.prev_vout => Ok(()),
        _ => Err(corrupt(
            "outspend",
            format!(
                "the row of {}:{} names input {} of the tx at {}:{}, which spends {}: another tx shares \
                 this txid's first {KEY_HASH_LEN} bytes (or a reorg is rewriting that block)",
                bitcoin::Txid::from_byte_array(prev_txid),
                spend.prev_vout,
                spend.spender_vin,
                spend.spender_height,
                spend.spender_position,
                spent.map_or("nothing".to_string(), |out| out.to_string()),
            ),
        )),
    }
}

fn block_hash(hash: &[u8]) -> Result<BlockHash, ShardError> {
    BlockHash::from_slice(hash).map_err(|e| corrupt("block meta", e))
}

/// The merge rule of the `stats` column family: `AddressStats` summed field by field. A value that does not
/// decode fails the merge (the engine then reports the row corrupt) rather than being dropped.
pub fn add_stats<'a>(values: impl Iterator<Item = &'a [u8]>) -> Option<Vec<u8>> {
    let mut total = pb::AddressStats::default();
    for value in values {
        let stats = pb::AddressStats::decode(value).ok()?;
        total.funded_txo_count += stats.funded_txo_count;
        total.funded_sum += stats.funded_sum;
        total.spent_txo_count += stats.spent_txo_count;
        total.spent_sum += stats.spent_sum;
        total.tx_count += stats.tx_count;
    }
    Some(total.encode_to_vec())
}

/// A txid in a peer's request (or a spend this worker sends one), which must be 32 bytes.
pub(crate) fn request_txid(bytes: &[u8], what: &'static str) -> Result<Hash32, ShardError> {
    bytes
        .try_into()
        .map_err(|_| corrupt(what, "txid is not 32 bytes"))
}

/// The block time field of an 80-byte header.
pub fn header_time(header: &[u8]) -> u32 {
    header
        .get(68..72)
        .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
        .unwrap_or(0)
}

/// What one input or output of a tx adds to its script's stats in a window.
enum Touch {
    Funds { value: u64, vout: u32 },
    Spends(u64),
}

/// Sorts and deduplicates a tx's scripthashes (a few per tx, every tx); see [`scripthash_order`].
fn sort_dedup_scripthashes(hashes: &mut Vec<ScriptHash>) {
    hashes.sort_unstable_by(scripthash_order);
    hashes.dedup();
}

/// The order of scripthashes compared whole, by their first 8 bytes as an integer first: whole
/// comparisons call `memcmp` (~1 in 12 of a backfill's `memcmp` calls were the sorts of a tx's scripts).
fn scripthash_order(a: &ScriptHash, b: &ScriptHash) -> std::cmp::Ordering {
    let head = |hash: &ScriptHash| u64::from_be_bytes(hash[..8].try_into().expect("8 bytes"));
    head(a).cmp(&head(b)).then_with(|| a.cmp(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_stats_records_sum_to_one_per_address_in_key_order() {
        let record = |key: u8, last: u8, funded: u64, spent: u64| {
            let mut k = [key; KEY_HASH_LEN];
            k[KEY_HASH_LEN - 1] = last;
            let stats = StatsDelta {
                funded_sum: funded,
                spent_sum: spent,
                funded_txo_count: u32::from(funded > 0),
                spent_txo_count: u32::from(spent > 0),
                tx_count: 1,
            };
            (k, stats)
        };
        // Keys 7..1 and 7..0 share their first 11 bytes: the last decides.
        let mut records = vec![
            record(7, 1, 5, 0),
            record(3, 3, 0, 2),
            record(7, 0, 1, 0),
            record(7, 1, 0, 4),
            record(3, 3, 6, 0),
            record(7, 1, 10, 0),
        ];
        sum_by_address(&mut records);
        let summed: Vec<_> = records
            .iter()
            .map(|(k, s)| {
                let s = *s;
                (
                    (k[0], k[KEY_HASH_LEN - 1]),
                    (
                        s.funded_sum,
                        s.spent_sum,
                        s.funded_txo_count,
                        s.spent_txo_count,
                        s.tx_count,
                    ),
                )
            })
            .collect();
        assert_eq!(
            summed,
            vec![
                ((3, 3), (6, 2, 1, 1, 2)),
                ((7, 0), (1, 0, 1, 0, 1)),
                ((7, 1), (15, 4, 2, 1, 3)),
            ]
        );
    }

    #[test]
    fn scripthashes_sort_and_dedup_like_whole_comparisons() {
        // Pairs share their first 8 bytes, so the tie-break on the whole hash decides their order.
        let hash = |head: u8, tail: u8| {
            let mut h = [head; 32];
            h[31] = tail;
            h
        };
        let mut hashes = vec![
            hash(9, 1),
            hash(2, 7),
            hash(9, 0),
            hash(2, 7),
            hash(0, 5),
            hash(9, 1),
        ];
        let mut expected = hashes.clone();
        expected.sort_unstable();
        expected.dedup();
        sort_dedup_scripthashes(&mut hashes);
        assert_eq!(hashes, expected);
        assert_eq!(hashes.len(), 4);
    }

    #[test]
    fn an_outspend_is_only_answered_if_the_spender_spends_that_very_outpoint() {
        let ours = [7u8; 32];
        let mut ground = ours;
        ground[31] ^= 1; // same 12-byte key, another tx
        let spender = Transaction {
            version: bitcoin::transaction::Version::TWO,
            lock_time: bitcoin::absolute::LockTime::ZERO,
            input: vec![bitcoin::TxIn {
                previous_output: bitcoin::OutPoint::new(bitcoin::Txid::from_byte_array(ground), 3),
                ..Default::default()
            }],
            output: Vec::new(),
        };
        let spend = |txid: [u8; 32], vout: u32, vin: u32| pb::SpendRef {
            prev_txid: txid.to_vec(),
            prev_vout: vout,
            spender_vin: vin,
            spender_height: 9,
            spender_position: 1,
        };
        assert!(check_spender(&spender, &spend(ground, 3, 0)).is_ok());
        let err = check_spender(&spender, &spend(ours, 3, 0)).unwrap_err();
        assert!(
            err.to_string().contains("another tx shares"),
            "the twin's spender is refused: {err}"
        );
        assert!(
            check_spender(&spender, &spend(ground, 2, 0)).is_err(),
            "another vout"
        );
        assert!(
            check_spender(&spender, &spend(ground, 3, 1)).is_err(),
            "no such input"
        );
    }

    #[test]
    fn an_outputs_row_is_only_taken_for_the_tx_whose_whole_txid_it_keeps() {
        let ours = [7u8; 32];
        let mut ground = ours;
        ground[31] ^= 1; // same 12-byte key, another tx
        assert_eq!(txid_key(&ours), txid_key(&ground));
        // Where `txs` says the tx with that key is: the other's coin is there.
        let key = coin_key(100, 7, 0);
        let row = encode_output(&ground, 5_000, &[0x51]);
        assert_eq!(output_of(Some(&row), &ours, &key).unwrap(), None);
        let found = output_of(Some(&row), &ground, &key).unwrap().unwrap();
        assert_eq!(
            (found.value, found.script.as_slice()),
            (5_000, [0x51].as_slice())
        );
        assert_eq!(output_of(None, &ours, &key).unwrap(), None);
        assert!(
            output_of(Some(&row[..10]), &ours, &key).is_err(),
            "a cut row is corrupt"
        );
    }
}

#[cfg(test)]
mod cross_shard_tests {
    use super::*;
    use crate::rocks::RocksStore;
    use bitcoin::absolute::LockTime;
    use bitcoin::block::{Header, Version as BlockVersion};
    use bitcoin::hashes::Hash;
    use bitcoin::transaction::Version;
    use bitcoin::{
        Amount, CompactTarget, OutPoint, ScriptBuf, Sequence, TxMerkleNode, TxOut, Txid, Witness,
    };
    use chainidx_core::source::BlkDirSource;
    use std::path::Path;

    fn output(value: u64, script: &ScriptBuf) -> TxOut {
        TxOut {
            value: Amount::from_sat(value),
            script_pubkey: script.clone(),
        }
    }

    fn tx(inputs: Vec<OutPoint>, outputs: Vec<TxOut>) -> Transaction {
        Transaction {
            version: Version::TWO,
            lock_time: LockTime::ZERO,
            input: inputs
                .into_iter()
                .map(|previous_output| TxIn {
                    previous_output,
                    script_sig: ScriptBuf::new(),
                    sequence: Sequence::MAX,
                    witness: Witness::new(),
                })
                .collect(),
            output: outputs,
        }
    }

    fn block(prev: BlockHash, txdata: Vec<Transaction>) -> Block {
        let header = Header {
            version: BlockVersion::TWO,
            prev_blockhash: prev,
            merkle_root: TxMerkleNode::all_zeros(),
            time: 1_600_000_000,
            bits: CompactTarget::from_consensus(0x207f_ffff),
            nonce: 0,
        };
        Block { header, txdata }
    }

    /// The blocks in a blk file of a directory under `dir`, as a source.
    fn blk_source(dir: &Path, blocks: &[&Block]) -> Arc<dyn BlockSource> {
        let dir = dir.join("blocks");
        std::fs::create_dir_all(&dir).unwrap();
        let mut blk = Vec::new();
        for b in blocks {
            let raw = serialize(b);
            blk.extend_from_slice(&[0xfa, 0xbf, 0xb5, 0xda]);
            blk.extend_from_slice(&(raw.len() as u32).to_le_bytes());
            blk.extend_from_slice(&raw);
        }
        std::fs::write(dir.join("blk00000.dat"), blk).unwrap();
        Arc::new(BlkDirSource::open(&dir).unwrap())
    }

    fn coinbase(height: u8, outputs: Vec<TxOut>) -> Transaction {
        let mut cb = tx(vec![OutPoint::null()], outputs);
        cb.input[0].script_sig = ScriptBuf::from_bytes(vec![1, height]);
        cb
    }

    /// The txids of `script`'s first history page, newest first.
    fn history_txids(view: &ShardView, script: &ScriptBuf) -> Vec<Txid> {
        let page = view.history(&scripthash(script), None, 10).unwrap();
        page.iter()
            .map(|d| deserialize::<Transaction>(&d.raw).unwrap().compute_txid())
            .collect()
    }

    fn p2wpkh(byte: u8) -> ScriptBuf {
        ScriptBuf::from_bytes([&[0x00, 0x14][..], &[byte; 20]].concat())
    }

    /// A window is written on another thread while the next one is filled (`seal(true)`): the next
    /// window's inputs must find its coins though they are not in the database yet, and each window
    /// lands whole. Three one-block windows; block 1 spends a coin of block 0 before block 0 is written,
    /// block 2 one of block 0 (written by then) and one of block 1 (not yet). Checked against the blocks.
    #[test]
    fn a_window_spends_the_coins_of_the_one_still_being_written() {
        let (a, b, c, d) = (p2wpkh(1), p2wpkh(2), p2wpkh(3), p2wpkh(4));
        let funding = coinbase(0, vec![output(5_000, &a), output(7_000, &b)]);
        let funding_txid = funding.compute_txid();
        let spend_a = tx(
            vec![OutPoint::new(funding_txid, 0)],
            vec![output(4_000, &c)],
        );
        let spend_a_txid = spend_a.compute_txid();
        let spend_b_c = tx(
            vec![
                OutPoint::new(funding_txid, 1),
                OutPoint::new(spend_a_txid, 0),
            ],
            vec![output(10_500, &d)],
        );
        let spend_b_c_txid = spend_b_c.compute_txid();
        let block0 = block(BlockHash::all_zeros(), vec![funding]);
        let block1 = block(block0.block_hash(), vec![coinbase(1, vec![]), spend_a]);
        let block2 = block(block1.block_hash(), vec![coinbase(2, vec![]), spend_b_c]);
        let dir = tempfile::tempdir().unwrap();
        let source = blk_source(dir.path(), &[&block0, &block1, &block2]);
        let store = RocksStore::open(&dir.path().join("shard-0")).unwrap();
        let shard = Shard::open(Arc::new(store), source, 0, 0, 3).unwrap();

        let mut window = shard.window(Write::Bulk, 1, 3);
        window.add(0, &block0, None).unwrap();
        let sealed0 = window.seal(true).unwrap();
        window.reuse(window.fresh_buffers());
        window.add(1, &block1, None).unwrap();
        let spare = sealed0.write().unwrap();
        let sealed1 = window.seal(true).unwrap();
        window.reuse(spare);
        window.add(2, &block2, None).unwrap();
        sealed1.write().unwrap();
        window.commit().unwrap();

        let state = shard.state();
        assert_eq!(state.next_height, 3);
        assert_eq!(state.windows_committed, 3);
        assert_eq!(state.pending_inputs, 0, "every coin spent is this shard's");
        let sh = |script: &ScriptBuf| scripthash(script);
        let txids = |script: &ScriptBuf| history_txids(&shard.view(), script);
        let stats = |script: &ScriptBuf| {
            let s = shard.view().address_stats(&sh(script)).unwrap();
            (s.funded_sum, s.spent_sum, s.tx_count)
        };
        assert_eq!(txids(&a), vec![spend_a_txid, funding_txid]);
        assert_eq!(stats(&a), (5_000, 5_000, 2));
        assert_eq!(stats(&b), (7_000, 7_000, 2));
        assert_eq!(txids(&c), vec![spend_b_c_txid, spend_a_txid]);
        assert_eq!(stats(&c), (4_000, 4_000, 2));
        for spent in [&a, &b, &c] {
            assert!(shard.view().utxos(&sh(spent)).unwrap().is_empty());
        }
        let utxos: Vec<_> = shard
            .view()
            .utxos(&sh(&d))
            .unwrap()
            .into_iter()
            .map(|u| (u.txid, u.vout, u.value))
            .collect();
        assert_eq!(
            utxos,
            vec![(spend_b_c_txid.to_byte_array().to_vec(), 0, 10_500)]
        );
        let spenders = |txid: Txid| -> Vec<_> {
            let (_, outspends) = shard
                .view()
                .outspends(&txid.to_byte_array())
                .unwrap()
                .unwrap();
            outspends
                .iter()
                .map(|o| (o.spent, o.height, o.position, o.vin))
                .collect()
        };
        assert_eq!(
            spenders(funding_txid),
            vec![(true, 1, 1, 0), (true, 2, 1, 0)]
        );
        assert_eq!(spenders(spend_a_txid), vec![(true, 2, 1, 1)]);
    }

    /// A query reads several rows in turn (stats, history rows, each tx's place and header, a coin's
    /// `outspends` then `outputs` row). A view taken before a rollback answers every one of them as the
    /// two blocks were, although the rollback removes block 1's rows meanwhile; a view taken after it,
    /// as block 0 alone. Checked against the blocks.
    #[test]
    fn a_view_answers_from_one_state_while_a_block_is_rolled_back_beside_it() {
        let (a, b, c) = (p2wpkh(1), p2wpkh(2), p2wpkh(3));
        let funding = coinbase(0, vec![output(5_000, &a), output(7_000, &b)]);
        let funding_txid = funding.compute_txid();
        let spend_a = tx(
            vec![OutPoint::new(funding_txid, 0)],
            vec![output(4_000, &c)],
        );
        let spend_a_txid = spend_a.compute_txid();
        let block0 = block(BlockHash::all_zeros(), vec![funding]);
        let block1 = block(block0.block_hash(), vec![coinbase(1, vec![]), spend_a]);
        let dir = tempfile::tempdir().unwrap();
        let source = blk_source(dir.path(), &[&block0, &block1]);
        let store = RocksStore::open(&dir.path().join("shard-0")).unwrap();
        let shard = Shard::open(Arc::new(store), source, 0, 0, 2).unwrap();
        // As the tip is followed: one block per write.
        let mut window = shard.window(Write::Logged, 1, 2);
        for (height, block) in [&block0, &block1].into_iter().enumerate() {
            window.add(height as u32, block, None).unwrap();
            window.commit().unwrap();
        }

        let sh = |script: &ScriptBuf| scripthash(script);
        let txids = history_txids;
        let stats = |view: &ShardView, script: &ScriptBuf| {
            let s = view.address_stats(&sh(script)).unwrap();
            (s.funded_sum, s.spent_sum, s.tx_count)
        };
        let utxos = |view: &ShardView, script: &ScriptBuf| -> Vec<(Txid, u32, u64)> {
            view.utxos(&sh(script))
                .unwrap()
                .into_iter()
                .map(|u| (Txid::from_slice(&u.txid).unwrap(), u.vout, u.value))
                .collect()
        };

        let before = shard.view();
        shard.rollback_block(1).unwrap();
        assert_eq!(shard.state().next_height, 1);
        assert_eq!(txids(&before, &a), vec![spend_a_txid, funding_txid]);
        assert_eq!(stats(&before, &a), (5_000, 5_000, 2));
        assert_eq!(utxos(&before, &a), vec![]);
        assert_eq!(utxos(&before, &c), vec![(spend_a_txid, 0, 4_000)]);
        let detail = before.tx(&spend_a_txid.to_byte_array()).unwrap().unwrap();
        assert_eq!(detail.prevouts[0].value, 5_000);
        assert_eq!(detail.status.unwrap().height, 1);

        let after = shard.view();
        assert_eq!(txids(&after, &a), vec![funding_txid]);
        assert_eq!(stats(&after, &a), (5_000, 0, 1));
        assert_eq!(utxos(&after, &a), vec![(funding_txid, 0, 5_000)]);
        assert_eq!(utxos(&after, &c), vec![]);
        assert!(after.tx(&spend_a_txid.to_byte_array()).unwrap().is_none());
    }

    /// Five one-block windows written in turn; block 4 spends a coin of block 0 (four windows back)
    /// and one of block 3 (the window before). However many windows are kept, the answers are the
    /// blocks' own; what changes is where the coins were found.
    #[test]
    fn coins_of_recent_windows_are_found_in_memory_with_the_same_answers() {
        let (a, b, c, d) = (p2wpkh(1), p2wpkh(2), p2wpkh(3), p2wpkh(4));
        let funding = coinbase(0, vec![output(5_000, &a), output(7_000, &b)]);
        let funding_txid = funding.compute_txid();
        let pay_c = coinbase(3, vec![output(3_000, &c)]);
        let pay_c_txid = pay_c.compute_txid();
        let spend = tx(
            vec![OutPoint::new(funding_txid, 1), OutPoint::new(pay_c_txid, 0)],
            vec![output(9_500, &d)],
        );
        let spend_txid = spend.compute_txid();
        let mut blocks = vec![block(BlockHash::all_zeros(), vec![funding])];
        for height in 1..5u8 {
            let txs = match height {
                3 => vec![pay_c.clone()],
                4 => vec![coinbase(4, vec![]), spend.clone()],
                _ => vec![coinbase(height, vec![])],
            };
            blocks.push(block(blocks.last().unwrap().block_hash(), txs));
        }
        let sh = |script: &ScriptBuf| scripthash(script);
        // Budgets: none; the newest window's coins alone (block 3's, which are sized below); every
        // window's.
        let newest = {
            let mut coins = WindowCoins::with_capacity(1);
            coins.tx_at.insert(pay_c_txid.to_byte_array(), (3, 0));
            let script = c.as_bytes().into();
            coins.outputs.insert(
                (pay_c_txid.to_byte_array(), 0),
                WindowCoin {
                    value: 3_000,
                    script,
                },
            );
            coins.seal().bytes()
        };
        for (budget, expected) in [(0, (0, 2)), (newest, (1, 1)), (usize::MAX, (2, 0))] {
            let dir = tempfile::tempdir().unwrap();
            let source = blk_source(dir.path(), &blocks.iter().collect::<Vec<_>>());
            let store = RocksStore::open(&dir.path().join("shard-0")).unwrap();
            let shard = Shard::open(Arc::new(store), source, 0, 0, 5).unwrap();
            let mut window = shard
                .window(Write::Bulk, 1, 5)
                .keep_recent_coins(RecentCoinsBudget::new(budget).share());
            for (height, block) in blocks.iter().enumerate() {
                window.add(height as u32, block, None).unwrap();
                window.commit().unwrap();
            }
            let lookups = window.coin_lookups();
            assert_eq!(
                (lookups.in_recent, lookups.in_database),
                expected,
                "a budget of {budget} bytes"
            );
            assert_eq!(
                shard.state().pending_inputs,
                0,
                "every coin spent is this shard's"
            );
            let stats = |script: &ScriptBuf| {
                let s = shard.view().address_stats(&sh(script)).unwrap();
                (s.funded_sum, s.spent_sum, s.tx_count)
            };
            assert_eq!(stats(&a), (5_000, 0, 1));
            assert_eq!(stats(&b), (7_000, 7_000, 2));
            assert_eq!(stats(&c), (3_000, 3_000, 2));
            assert_eq!(stats(&d), (9_500, 0, 1));
            let utxos = |script: &ScriptBuf| -> Vec<_> {
                let utxos = shard.view().utxos(&sh(script)).unwrap();
                utxos
                    .into_iter()
                    .map(|u| (u.txid, u.vout, u.value))
                    .collect()
            };
            assert_eq!(
                utxos(&a),
                vec![(funding_txid.to_byte_array().to_vec(), 0, 5_000)]
            );
            assert!(utxos(&b).is_empty() && utxos(&c).is_empty());
            assert_eq!(
                utxos(&d),
                vec![(spend_txid.to_byte_array().to_vec(), 0, 9_500)]
            );
            let spenders = |txid: Txid| -> Vec<_> {
                let (_, outspends) = shard
                    .view()
                    .outspends(&txid.to_byte_array())
                    .unwrap()
                    .unwrap();
                outspends
                    .iter()
                    .map(|o| (o.spent, o.height, o.position, o.vin))
                    .collect()
            };
            assert_eq!(
                spenders(funding_txid),
                vec![(false, 0, 0, 0), (true, 4, 1, 0)]
            );
            assert_eq!(spenders(pay_c_txid), vec![(true, 4, 1, 1)]);
            let detail = shard
                .view()
                .tx(&spend_txid.to_byte_array())
                .unwrap()
                .unwrap();
            let spent: Vec<_> = detail.prevouts.iter().map(|p| p.value).collect();
            assert_eq!(spent, vec![7_000, 3_000]);
        }
    }

    /// A window in the memory of another shard's window writes the same rows as one in fresh memory, even
    /// when that window was given up with blocks in it (rows, coins and stats of another chain).
    #[test]
    fn a_window_in_another_shards_memory_writes_the_same_rows() {
        let (a, b, c) = (p2wpkh(1), p2wpkh(2), p2wpkh(3));
        let funding = coinbase(0, vec![output(5_000, &a), output(7_000, &b)]);
        let spend = tx(
            vec![OutPoint::new(funding.compute_txid(), 1)],
            vec![output(6_500, &c)],
        );
        let first = block(BlockHash::all_zeros(), vec![funding]);
        let second = block(first.block_hash(), vec![coinbase(1, vec![]), spend]);
        let blocks = [first, second];
        let other = block(
            BlockHash::all_zeros(),
            vec![coinbase(9, vec![output(1_000, &p2wpkh(9))])],
        );
        let dir = tempfile::tempdir().unwrap();
        let rows_of = |name: &str, spare: Option<SpareWindow>| {
            let path = dir.path().join(name);
            std::fs::create_dir_all(&path).unwrap();
            let source = blk_source(&path, &blocks.iter().collect::<Vec<_>>());
            let store = Arc::new(RocksStore::open(&path.join("shard-0")).unwrap());
            let shard = Shard::open(store.clone(), source, 0, 0, 2).unwrap();
            let mut window = shard.window_from(spare, Write::Bulk, 1, 2);
            for (height, block) in blocks.iter().enumerate() {
                window.add(height as u32, block, None).unwrap();
                window.commit().unwrap();
            }
            let mut rows = Vec::new();
            for cf in Cf::ALL {
                store
                    .scan(cf, &[], ScanFrom::First, &mut |key, value| {
                        rows.push((cf, key.to_vec(), value.to_vec()));
                        true
                    })
                    .unwrap();
            }
            rows
        };
        let fresh = rows_of("fresh", None);
        assert!(fresh.iter().any(|(cf, _, _)| *cf == Cf::History));
        // Another shard's window, given up after a block of another chain, not written.
        let spare = {
            let path = dir.path().join("other");
            std::fs::create_dir_all(&path).unwrap();
            let source = blk_source(&path, &[&other]);
            let store = RocksStore::open(&path.join("shard-0")).unwrap();
            let shard = Shard::open(Arc::new(store), source, 0, 0, 1).unwrap();
            let mut window = shard.window(Write::Bulk, 1, 1);
            window.add(0, &other, None).unwrap();
            window
                .into_spare()
                .expect("a backfill window has memory to spare")
        };
        assert_eq!(rows_of("reused", Some(spare)), fresh);
    }

    /// A shard keeps the newest windows whose coins fit in its share of the worker's budget, and its
    /// share shrinks while another shard is being indexed beside it.
    #[test]
    fn recent_windows_stay_within_their_share_of_the_budget() {
        let mut blocks: Vec<Block> = Vec::new();
        for height in 0..8u8 {
            let outputs = (0..20)
                .map(|i| output(1_000 + i, &p2wpkh(height)))
                .collect();
            let prev = blocks
                .last()
                .map_or(BlockHash::all_zeros(), Block::block_hash);
            blocks.push(block(prev, vec![coinbase(height, outputs)]));
        }
        let dir = tempfile::tempdir().unwrap();
        let source = blk_source(dir.path(), &blocks.iter().collect::<Vec<_>>());
        let store = RocksStore::open(&dir.path().join("shard-0")).unwrap();
        let shard = Shard::open(Arc::new(store), source, 0, 0, 8).unwrap();
        let budget = RecentCoinsBudget::new(usize::MAX);
        let mut window = shard
            .window(Write::Bulk, 1, 8)
            .keep_recent_coins(budget.share());
        let mut blocks = blocks.iter().enumerate();
        let mut commit_next = |window: &mut IndexWindow| {
            let (height, block) = blocks.next().unwrap();
            window.add(height as u32, block, None).unwrap();
            window.commit().unwrap();
            window.recent_coins()
        };
        // Every window holds 20 unspent coins of one script: all the same size.
        let (windows, one) = commit_next(&mut window);
        assert_eq!(windows, 1);
        let coins_and_scripts = 20 * (std::mem::size_of::<SealedCoin>() + p2wpkh(0).len());
        assert!(one > coins_and_scripts, "{one} bytes for 20 coins");
        budget.set_bytes(3 * one);
        assert_eq!(commit_next(&mut window), (2, 2 * one));
        assert_eq!(commit_next(&mut window), (3, 3 * one));
        assert_eq!(commit_next(&mut window), (3, 3 * one));
        let other = budget.share();
        assert_eq!(commit_next(&mut window), (1, one), "half of 3 windows each");
        drop(other);
        assert_eq!(commit_next(&mut window), (2, 2 * one));
        budget.set_bytes(0);
        assert_eq!(commit_next(&mut window), (0, 0));
    }

    /// A tx of shard 1 spends two coins of shard 0 (resolved in phase 2) and pays back to one of their
    /// scripts. Phase 2 must not overwrite that script's phase 1 row (its funding vout, which the UTXO
    /// answer reads) and must write a row for the other script, which the tx touches only through its
    /// cross-shard input. Checked against the blocks' own inputs and outputs.
    #[test]
    fn phase_2_adds_a_history_row_only_where_phase_1_wrote_none() {
        let (paid_back, only_spent, other) = (p2wpkh(1), p2wpkh(2), p2wpkh(3));
        let funding = coinbase(
            0,
            vec![output(5_000, &paid_back), output(7_000, &only_spent)],
        );
        let funding_txid = funding.compute_txid();
        let spender = tx(
            vec![
                OutPoint::new(funding_txid, 0),
                OutPoint::new(funding_txid, 1),
            ],
            vec![output(4_000, &other), output(7_500, &paid_back)],
        );
        let spender_txid = spender.compute_txid();
        let block0 = block(BlockHash::all_zeros(), vec![funding]);
        let block1 = block(
            block0.block_hash(),
            vec![coinbase(1, vec![output(1, &other)]), spender],
        );

        let dir = tempfile::tempdir().unwrap();
        let source = blk_source(dir.path(), &[&block0, &block1]);
        let open = |id: u32| {
            let store = RocksStore::open(&dir.path().join(format!("shard-{id}"))).unwrap();
            Shard::open(Arc::new(store), source.clone(), id, id, id + 1).unwrap()
        };
        let (owner, spending) = (open(0), open(1));
        owner.index_block(0, &block0, None, Write::Logged).unwrap();
        spending
            .index_block(1, &block1, None, Write::Logged)
            .unwrap();

        let pending = spending.next_pending(100).unwrap();
        assert_eq!(pending.len(), 2, "both inputs wait for shard 0");
        let refs: Vec<pb::SpendRef> = pending.iter().map(PendingSpend::to_ref).collect();
        let found = owner.spend_outputs(&refs).unwrap();
        assert_eq!(found.len(), 2);
        let resolved: Vec<(PendingSpend, pb::TxOut)> = found
            .into_iter()
            .map(|f| {
                let out = pb::TxOut {
                    value: f.value,
                    script: f.script,
                };
                (pending[f.index as usize].clone(), out)
            })
            .collect();
        spending.apply_resolved(&resolved, Write::Logged).unwrap();

        let sh = |script: &ScriptBuf| scripthash(script);
        let txids = |shard: &Shard, script: &ScriptBuf| history_txids(&shard.view(), script);
        let stats = |shard: &Shard, script: &ScriptBuf| {
            let s = shard.view().address_stats(&sh(script)).unwrap();
            (
                s.funded_txo_count,
                s.funded_sum,
                s.spent_txo_count,
                s.spent_sum,
                s.tx_count,
            )
        };
        // Funded by the spender's vout 1 (phase 1) and spent by its vin 0 (phase 2): one row, its coin
        // still listed as unspent.
        assert_eq!(txids(&spending, &paid_back), vec![spender_txid]);
        let utxos: Vec<_> = spending
            .view()
            .utxos(&sh(&paid_back))
            .unwrap()
            .into_iter()
            .map(|u| (u.txid, u.vout, u.value))
            .collect();
        assert_eq!(
            utxos,
            vec![(spender_txid.to_byte_array().to_vec(), 1, 7_500)]
        );
        assert_eq!(stats(&spending, &paid_back), (1, 7_500, 1, 5_000, 1));
        // Touched only by the cross-shard input vin 1: its row comes from phase 2.
        assert_eq!(txids(&spending, &only_spent), vec![spender_txid]);
        assert!(spending.view().utxos(&sh(&only_spent)).unwrap().is_empty());
        assert_eq!(stats(&spending, &only_spent), (0, 0, 1, 7_000, 1));
        // The owner recorded both spends: nothing of its coins is unspent.
        assert!(owner.view().utxos(&sh(&paid_back)).unwrap().is_empty());
        assert!(owner.view().utxos(&sh(&only_spent)).unwrap().is_empty());
        let (_, outspends) = owner
            .view()
            .outspends(&funding_txid.to_byte_array())
            .unwrap()
            .unwrap();
        let spent_by: Vec<_> = outspends
            .iter()
            .map(|o| (o.spent, o.height, o.position, o.vin))
            .collect();
        assert_eq!(spent_by, vec![(true, 1, 1, 0), (true, 1, 1, 1)]);
    }
}
