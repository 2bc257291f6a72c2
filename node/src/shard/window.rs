//! Phase 1's unit of writing: a window of blocks filled in memory, then written with its checkpoint; the
//! coins of recent windows kept for later windows' inputs.

use super::*;

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
    pub(super) fn with_capacity(txs: usize) -> WindowCoins {
        WindowCoins {
            outputs: FastMap::with_capacity_and_hasher(txs * 3, Default::default()),
            tx_at: FastMap::with_capacity_and_hasher(txs, Default::default()),
            sorted: Vec::new(),
        }
    }

    /// Empties the maps, keeping their memory.
    pub(super) fn clear(&mut self) {
        self.outputs.clear();
        self.tx_at.clear();
        self.sorted.clear();
    }

    /// Moves the coins out, packed ([`SealedCoins`]), leaving these maps empty with their memory for the
    /// next window.
    pub(super) fn seal(&mut self) -> SealedCoins {
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
pub(super) struct TxCoins {
    height: u32,
    position: u32,
    first: u32,
    count: u32,
}

pub(super) struct SealedCoin {
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
    pub(super) fn place(&self, txid: &Hash32) -> Option<(u32, u32)> {
        self.txs.get(txid).map(|tx| (tx.height, tx.position))
    }

    pub(super) fn script(&self, index: usize) -> &[u8] {
        let start = match index {
            0 => 0,
            _ => self.coins[index - 1].script_end,
        };
        &self.scripts[start..self.coins[index].script_end]
    }

    /// Every unspent coin: its outpoint's txid and vout, where its tx is, its value and script.
    pub(super) fn each(&self) -> impl Iterator<Item = (&Hash32, u32, &TxCoins, u64, &[u8])> {
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
    pub(super) fn stored_coin(
        &self,
        txid: &Hash32,
        vout: u32,
    ) -> Option<([u8; 12], Option<Vec<u8>>)> {
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
pub(super) fn map_bytes<K, V, S>(map: &HashMap<K, V, S>) -> usize {
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
    pub(super) fn bytes(&self) -> usize {
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
    pub(super) fn with_capacity(txs: usize) -> WindowBuffers {
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
pub(super) struct WindowCoin {
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
pub(super) struct StatsDelta {
    pub(super) funded_sum: u64,
    pub(super) spent_sum: u64,
    pub(super) funded_txo_count: u32,
    pub(super) spent_txo_count: u32,
    pub(super) tx_count: u32,
}

const _: () = assert!(std::mem::size_of::<([u8; KEY_HASH_LEN], StatsDelta)>() == 40);

impl StatsDelta {
    pub(super) fn add(&mut self, other: StatsDelta) {
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
pub(super) fn sum_by_address(records: &mut Vec<([u8; KEY_HASH_LEN], StatsDelta)>) {
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
pub(super) const BULK_MIN_ROWS: usize = 1_000;

/// Transactions per backfill window (`chainidx node --window-txs`): with its maps of coins and stats, a
/// window holds some 120 MB. Larger windows keep more coins from ever getting an `outputs` row (spent
/// inside their window), look fewer up and merge fewer stats: 65,536 instead of 32,768 took 1 worker on 1.98M txs from 27.3/26.6 to
/// 22.3/21.8 CPU-s per million txs (the compaction after it +2–4), for ~100 MiB more peak RSS.
pub const DEFAULT_WINDOW_TXS: usize = 65_536;
/// Room a window's batch starts with, per tx: the generated chain writes ~16 rows and ~500 bytes of keys
/// and values per tx (coins and pending inputs included).
pub(super) const WINDOW_ROWS_PER_TX: usize = 20;
pub(super) const WINDOW_BYTES_PER_TX: usize = 640;

/// A tx's size without its witness data (`Transaction::base_size`), from its whole size: the marker and
/// flag bytes and every input's witness are what the whole size adds when the tx is serialized with
/// witnesses (BIP144: some input has one, or there are no inputs).
pub(super) fn base_size(tx: &bitcoin::Transaction, total_size: usize) -> usize {
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
    /// [`Shard::window_from`].
    pub(super) fn new(
        shard: &'a Shard,
        spare: Option<SpareWindow>,
        write: Write,
        window_txs: usize,
        expected_txs: usize,
    ) -> IndexWindow<'a> {
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
            shard,
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

/// Where the coin of one input of a block (coinbases have none) is to be found, in input order: decided
/// before the block's txs are added, so that each input looks in the window's map of coins once (a cache
/// miss in a map of ~200k coins) instead of twice.
pub(super) enum InputCoin {
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
pub(super) fn locate_input_coins(
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

    /// (spent, spender height, position, vin) of each output of `txid`.
    fn outspends_of(view: &ShardView, txid: Txid) -> Vec<(bool, u32, u32, u32)> {
        let (_, outspends) = view.outspends(&txid.to_byte_array()).unwrap().unwrap();
        outspends
            .iter()
            .map(|o| (o.spent, o.height, o.position, o.vin))
            .collect()
    }

    /// (txid, vout, value) of each unspent coin paying `script`.
    fn utxos_of(view: &ShardView, script: &ScriptBuf) -> Vec<(Vec<u8>, u32, u64)> {
        let utxos = view.utxos(&scripthash(script)).unwrap();
        utxos
            .into_iter()
            .map(|u| (u.txid, u.vout, u.value))
            .collect()
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
        assert_eq!(
            utxos_of(&shard.view(), &d),
            vec![(spend_b_c_txid.to_byte_array().to_vec(), 0, 10_500)]
        );
        let spenders = |txid: Txid| outspends_of(&shard.view(), txid);
        assert_eq!(
            spenders(funding_txid),
            vec![(true, 1, 1, 0), (true, 2, 1, 0)]
        );
        assert_eq!(spenders(spend_a_txid), vec![(true, 2, 1, 1)]);
    }

    /// A query reads several rows in turn (stats, history rows, each tx's place and header, a coin's
    /// `outspends` then `outputs` row). A view taken before a rollback answers every one of them as the
    /// two blocks were, although the rollback removes block 1's rows meanwhile; a view taken after it,
    /// as block 0 alone; a view pinned to block 1 after it is refused. Checked against the blocks.
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
        let utxos = utxos_of;
        let coin = |txid: Txid, vout, value| (txid.to_byte_array().to_vec(), vout, value);

        let before = shard.view();
        assert!(shard.view_at(Some(1)).is_ok());
        shard.rollback_block(1).unwrap();
        assert_eq!(shard.state().next_height, 1);
        assert_eq!(txids(&before, &a), vec![spend_a_txid, funding_txid]);
        assert_eq!(stats(&before, &a), (5_000, 5_000, 2));
        assert_eq!(utxos(&before, &a), vec![]);
        assert_eq!(utxos(&before, &c), vec![coin(spend_a_txid, 0, 4_000)]);
        let detail = before.tx(&spend_a_txid.to_byte_array()).unwrap().unwrap();
        assert_eq!(detail.prevouts[0].value, 5_000);
        assert_eq!(detail.status.unwrap().height, 1);

        // A query pinned to block 1 (a coordinator that has not applied the tip lowered before the
        // rollback) is refused rather than answered from block 0 alone; pinned to block 0 it is answered.
        assert!(matches!(
            shard.view_at(Some(1)),
            Err(ShardError::BehindPinnedTip {
                next_height: 1,
                tip: 1,
                ..
            })
        ));
        assert_eq!(
            txids(&shard.view_at(Some(0)).unwrap(), &a),
            vec![funding_txid]
        );

        let after = shard.view();
        assert_eq!(txids(&after, &a), vec![funding_txid]);
        assert_eq!(stats(&after, &a), (5_000, 0, 1));
        assert_eq!(utxos(&after, &a), vec![coin(funding_txid, 0, 5_000)]);
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
            let utxos = |script: &ScriptBuf| utxos_of(&shard.view(), script);
            assert_eq!(
                utxos(&a),
                vec![(funding_txid.to_byte_array().to_vec(), 0, 5_000)]
            );
            assert!(utxos(&b).is_empty() && utxos(&c).is_empty());
            assert_eq!(
                utxos(&d),
                vec![(spend_txid.to_byte_array().to_vec(), 0, 9_500)]
            );
            let spenders = |txid: Txid| outspends_of(&shard.view(), txid);
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

    /// Phase 2 of `pending` (inputs of `spending`) against `owner`, as a resolution batch does it: the
    /// owner records the spends and answers the coins, which `spending` applies. Returns how many the
    /// owner held.
    fn resolve_from(owner: &Shard, spending: &Shard, pending: &[PendingSpend]) -> usize {
        let refs: Vec<pb::SpendRef> = pending.iter().map(PendingSpend::to_ref).collect();
        let resolved: Vec<(PendingSpend, pb::TxOut)> = owner
            .spend_outputs(&refs)
            .unwrap()
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
        resolved.len()
    }

    /// A coinbase paying 5,000 to `paid_back` and 7,000 to `only_spent`, and a tx spending both that pays
    /// 4,000 to `other` and 7,500 back to `paid_back`.
    fn funding_and_spender(
        paid_back: &ScriptBuf,
        only_spent: &ScriptBuf,
        other: &ScriptBuf,
    ) -> (Transaction, Transaction) {
        let funding = coinbase(0, vec![output(5_000, paid_back), output(7_000, only_spent)]);
        let funding_txid = funding.compute_txid();
        let spender = tx(
            vec![
                OutPoint::new(funding_txid, 0),
                OutPoint::new(funding_txid, 1),
            ],
            vec![output(4_000, other), output(7_500, paid_back)],
        );
        (funding, spender)
    }

    /// A tx of shard 1 spends two coins of shard 0 (resolved in phase 2) and pays back to one of their
    /// scripts. Phase 2 must not overwrite that script's phase 1 row (its funding vout, which the UTXO
    /// answer reads) and must write a row for the other script, which the tx touches only through its
    /// cross-shard input. Checked against the blocks' own inputs and outputs.
    #[test]
    fn phase_2_adds_a_history_row_only_where_phase_1_wrote_none() {
        let (paid_back, only_spent, other) = (p2wpkh(1), p2wpkh(2), p2wpkh(3));
        let (funding, spender) = funding_and_spender(&paid_back, &only_spent, &other);
        let funding_txid = funding.compute_txid();
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
        assert_eq!(resolve_from(&owner, &spending, &pending), 2);

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
        assert_eq!(
            utxos_of(&spending.view(), &paid_back),
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

    /// A summary pinned below a block counts back out only what the stats row holds of it, whatever
    /// state the block's rows are in: phase 1 written with inputs pending (another shard's coins); the
    /// rows of their resolution ingested ahead of its stats, as a bulk write leaves them for a moment
    /// (the inputs' `prevouts` rows and a row for an address only they touch, their `pending` rows
    /// still there); resolved; and a row ingested past the checkpoint, as a bulk window leaves it before
    /// its stats and checkpoint. Checked against the blocks: at the tip, the spending shard holds only
    /// block 1's coinbase outputs.
    #[test]
    fn a_pinned_summary_counts_out_only_what_the_stats_row_holds() {
        let (paid_back, only_spent, other) = (p2wpkh(1), p2wpkh(2), p2wpkh(3));
        let (funding, spender) = funding_and_spender(&paid_back, &only_spent, &other);
        let block0 = block(BlockHash::all_zeros(), vec![funding]);
        // Block 1 pays `only_spent` too, so that it has a stats row for block 2 to be counted out of.
        let block1 = block(
            block0.block_hash(),
            vec![coinbase(1, vec![output(1, &other), output(2, &only_spent)])],
        );
        let block2 = block(
            block1.block_hash(),
            vec![coinbase(2, vec![]), spender.clone()],
        );
        let dir = tempfile::tempdir().unwrap();
        let source = blk_source(dir.path(), &[&block0, &block1, &block2]);
        let open = |id: u32, start: u32, end: u32| {
            let store = RocksStore::open(&dir.path().join(format!("shard-{id}"))).unwrap();
            Shard::open(Arc::new(store), source.clone(), id, start, end).unwrap()
        };
        let (owner, spending) = (open(0, 0, 1), open(1, 1, 4));
        owner.index_block(0, &block0, None, Write::Logged).unwrap();
        spending
            .index_block(1, &block1, None, Write::Logged)
            .unwrap();
        spending
            .index_block(2, &block2, None, Write::Logged)
            .unwrap();

        let summary = |script: &ScriptBuf, tip: Option<u32>| {
            let s = spending
                .view_at(tip)
                .unwrap()
                .address_stats(&scripthash(script))
                .unwrap();
            (
                s.funded_txo_count,
                s.funded_sum,
                s.spent_txo_count,
                s.spent_sum,
                s.tx_count,
            )
        };
        let at_tip = |label: &str| {
            assert_eq!(summary(&paid_back, Some(1)), (0, 0, 0, 0, 0), "{label}");
            assert_eq!(summary(&only_spent, Some(1)), (1, 2, 0, 0, 1), "{label}");
            assert_eq!(summary(&other, Some(1)), (1, 1, 0, 0, 1), "{label}");
        };
        // Phase 1: the spender's output to `paid_back` is counted, its two inputs wait.
        assert_eq!(summary(&paid_back, None), (1, 7_500, 0, 0, 1));
        at_tip("inputs pending");

        // Their resolution's rows, ingested ahead of its stats.
        let pending = spending.next_pending(100).unwrap();
        assert_eq!(pending.len(), 2);
        let mut rows = Batch::default();
        for (vin, (value, script)) in [(5_000, &paid_back), (7_000, &only_spent)]
            .into_iter()
            .enumerate()
        {
            let input = &spender.input[vin];
            rows.put(
                Cf::Prevouts,
                schema::pending_key(2, 1, vin as u32),
                encode_prevout(
                    value,
                    spent_script::template_for(script.as_bytes(), input),
                    script.as_bytes(),
                ),
            );
        }
        rows.put(
            Cf::History,
            schema::history_key(&scripthash(&only_spent), 2, 1),
            [],
        );
        spending.store.write(rows, false).unwrap();
        assert_eq!(summary(&paid_back, None), (1, 7_500, 0, 0, 1));
        at_tip("resolution ingested, its stats not written");

        // Resolved.
        assert_eq!(resolve_from(&owner, &spending, &pending), 2);
        assert_eq!(summary(&paid_back, None), (1, 7_500, 1, 5_000, 1));
        assert_eq!(summary(&only_spent, None), (1, 2, 1, 7_000, 2));
        at_tip("resolved");

        // A row of block 3 ingested before the window's stats and checkpoint (next height 3).
        let mut rows = Batch::default();
        rows.put(
            Cf::History,
            schema::history_key(&scripthash(&other), 3, 0),
            [0],
        );
        spending.store.write(rows, false).unwrap();
        at_tip("a row past the checkpoint");
    }
}
