//! One shard: a block range [start, end) in its own database. Phase 1 ([`IndexWindow`]) writes the rows of
//! a window of blocks, then the checkpoint after them; inputs spending outputs of earlier shards are parked
//! in `pending`. Phase 2 ([`Shard::next_pending`], [`Shard::apply_resolved`]) attributes them once the owning
//! shards have answered. [`Shard::spend_outputs`] answers those questions for other shards.
//!
//! # Layout
//! - this module: [`Shard`] (its state, phase 2, answering other shards, rollbacks), the drop of spent
//!   coins' rows and the full compaction after a backfill, helpers shared by the two below;
//! - `window`: phase 1's windows ([`IndexWindow`]) and the coins of recent windows kept in memory;
//! - `view`: the read side, [`ShardView`], through which queries read one snapshot.

mod view;
mod window;

pub use view::ShardView;
pub use window::*;

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
    /// The shard no longer holds every block up to the tip a query was pinned to: it is rolling them
    /// back, and the query's coordinator has not yet applied the lowered tip its leader committed first.
    #[error(
        "shard {shard} holds blocks below {next_height} only, not up to the tip {tip} this query was pinned to \
         (a rollback is under way): ask again"
    )]
    BehindPinnedTip {
        shard: u32,
        next_height: u32,
        tip: u32,
    },
}

/// The shard's state as `rows` hold it (`meta/"shard"`), if it has been written.
fn stored_state(rows: &(impl Reads + ?Sized)) -> Result<Option<pb::ShardState>, ShardError> {
    rows.get(Cf::Meta, SHARD_STATE_KEY)?
        .map(|bytes| {
            pb::ShardState::decode(bytes.as_slice()).map_err(|e| corrupt("shard state", e))
        })
        .transpose()
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
        let state = match stored_state(&*store)? {
            Some(state) => {
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
        IndexWindow::new(self, spare, write, window_txs, expected_txs)
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
