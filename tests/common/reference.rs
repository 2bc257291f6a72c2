//! Reference indexer: the correctness oracle for the integration tests.
//!
//! A plain, single-process, in-memory indexer over a directory of Bitcoin Core blk-framed files, written
//! independently of the production code and as straightforwardly as possible. It depends only on
//! `bitcoin` (0.32) and `std`; it must never use any chainidx crate.
//!
//! How it works:
//! 1. Read every block from the directory (see [`Reference::from_blk_dir`]), dedupe them by block hash.
//! 2. Find the chain: the single block whose parent is not present is height 0; follow the children and
//!    keep the longest chain (most blocks). Equal-length forks are broken by first appearance (files in name
//!    order, then by position in the file), like Bitcoin Core's first-seen rule.
//! 3. Replay the chain block by block, transaction by transaction, inputs before outputs, keeping a plain
//!    UTXO set in a `HashMap<OutPoint, Coin>` and per-script statistics.
//!
//! Conventions (the things an index could reasonably do differently):
//! - OP_RETURN outputs: a scriptPubKey whose first byte is OP_RETURN (`Script::is_op_return`) is never
//!   indexed as a script: it is not in `scripts()`, and has no summary, history or UTXOs. Its outputs still
//!   exist (so `prevouts` would show them if something spent one, which a valid chain never does).
//! - Every other scriptPubKey, including an empty one and non-standard ones, is indexed by its exact bytes.
//! - The first block's transactions are indexed like any other (the mainnet genesis coinbase output counts
//!   as funded and unspent, although Bitcoin Core never adds it to its UTXO set).
//! - No validation beyond that: no proof of work, merkle root, script, value or subsidy checks.
//! - Duplicate txids (BIP30; mainnet blocks 91812 and 91842 repeat the coinbase txid d5d27987…8599 of
//!   blocks 91722 and 91880): a transaction with the same txid is the same transaction (same outputs). Its
//!   second creation replaces the first one's unspent outputs: the UTXO then has the later height, and
//!   any `outspend` recorded for the earlier output is dropped. Each creation still counts as a funding
//!   event in `summary` (`funded_txo_count`/`funded_sum` count both), so for such a script
//!   `funded_sum - spent_sum` exceeds the sum of its UTXOs by the overwritten (lost) outputs. In `history`
//!   the txid appears once, at its newest position; `summary().tx_count` counts distinct txids.
//!   `tx_count()` and `txids()` count every confirmed transaction, so a duplicate txid is counted twice;
//!   `prevouts(txid)` describes the later one (identical anyway for the mainnet coinbase duplicates).
//! - Orderings use the types' own `Ord`: `Txid` compares its internal (not display) byte order, `ScriptBuf`
//!   compares bytes.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};

use bitcoin::{Block, BlockHash, OutPoint, Script, ScriptBuf, Txid};

/// Per-script totals, as an address-activity API reports them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Number of outputs paying the script.
    pub funded_txo_count: u64,
    /// Sum of the values (satoshis) of those outputs.
    pub funded_sum: u64,
    /// Number of inputs spending an output that paid the script.
    pub spent_txo_count: u64,
    /// Sum of the values (satoshis) of the outputs those inputs spend.
    pub spent_sum: u64,
    /// Number of distinct txids that fund or spend the script.
    pub tx_count: u64,
}

/// An unspent output of a script.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Utxo {
    pub txid: Txid,
    pub vout: u32,
    /// Satoshis.
    pub value: u64,
    /// Height of the block that created it (the later one for a BIP30 duplicate).
    pub height: u32,
}

/// An output in the UTXO set.
struct Coin {
    value: u64,
    script: ScriptBuf,
}

/// Everything known about one (non-OP_RETURN) scriptPubKey.
#[derive(Default)]
struct ScriptData {
    funded_txo_count: u64,
    funded_sum: u64,
    spent_txo_count: u64,
    spent_sum: u64,
    /// (height, position in block, txid) of every funding output and every spending input, in chain order;
    /// a tx appears once per output/input that touches the script.
    events: Vec<(u32, u32, Txid)>,
    /// The script's unspent outputs: (txid, vout) -> (value, height).
    utxos: BTreeMap<(Txid, u32), (u64, u32)>,
}

/// The reference index. Build it with [`Reference::from_blk_dir`].
pub struct Reference {
    /// Block hashes of the chain, index = height.
    chain: Vec<BlockHash>,
    /// Every confirmed txid in chain order (a BIP30 duplicate appears twice).
    txids: Vec<Txid>,
    /// Index in `txids` of each block's first tx, index = height.
    block_starts: Vec<usize>,
    /// txid -> the outputs its inputs spend (the later tx for a duplicate txid).
    prevouts: HashMap<Txid, Vec<Option<(u64, ScriptBuf)>>>,
    /// Spent output -> (spending txid, vin, height of the spending block).
    outspends: HashMap<OutPoint, (Txid, u32, u32)>,
    /// Indexed scripts.
    scripts: HashMap<ScriptBuf, ScriptData>,
}

impl Reference {
    /// Reads every blk-framed file of `dir` and indexes the longest chain found in them.
    ///
    /// Files: if the directory holds any `blk*.dat` file, exactly those are read (so a Bitcoin Core
    /// `blocks/` directory works: its `rev*.dat` undo files and `xor.dat` are skipped); otherwise every
    /// `*.dat` file is read. Files are read in name order. Each file is a sequence of records
    /// `magic (4 bytes, any non-zero value: any network) + u32 LE length + consensus-serialized block`;
    /// a zero magic (Bitcoin Core's preallocated padding) ends the file.
    ///
    /// Panics, with a message naming the file/offset, block or txid:vin, on: an unreadable directory or file,
    /// a truncated record, a block that does not deserialize (exactly) from its record, two different blocks
    /// with the same hash, no blocks at all, more than one block whose parent is missing (a gap), and an
    /// input that does not spend an output created earlier in the chain and not yet spent.
    pub fn from_blk_dir(dir: &Path) -> Reference {
        let files = list_block_files(dir);

        // 1. Read and dedupe. `order` is the first-seen position of each block, for tie-breaking.
        let mut blocks: HashMap<BlockHash, (Block, usize)> = HashMap::new();
        let mut order = 0usize;
        for file in &files {
            for (offset, block) in read_blk_file(file) {
                let hash = block.block_hash();
                match blocks.get(&hash) {
                    Some((existing, _)) => {
                        assert!(
                            *existing == block,
                            "reference: block {hash} appears twice with different contents (second copy in {} at offset {offset})",
                            file.display()
                        );
                    }
                    None => {
                        blocks.insert(hash, (block, order));
                        order += 1;
                    }
                }
            }
        }
        assert!(
            !blocks.is_empty(),
            "reference: no blocks found in {} (files: {:?})",
            dir.display(),
            files
        );

        // 2. Choose the chain.
        let chain = choose_chain(&blocks);

        // 3. Replay it.
        let mut reference = Reference {
            chain: chain.clone(),
            txids: Vec::new(),
            block_starts: Vec::new(),
            prevouts: HashMap::new(),
            outspends: HashMap::new(),
            scripts: HashMap::new(),
        };
        let mut utxo_set: HashMap<OutPoint, Coin> = HashMap::new();
        for (height, hash) in chain.iter().enumerate() {
            let height = height as u32;
            let block = &blocks[hash].0;
            reference.connect_block(height, block, &mut utxo_set);
        }
        reference
    }

    /// Applies one block of the chain at `height`.
    fn connect_block(
        &mut self,
        height: u32,
        block: &Block,
        utxo_set: &mut HashMap<OutPoint, Coin>,
    ) {
        self.block_starts.push(self.txids.len());
        for (pos, tx) in block.txdata.iter().enumerate() {
            let pos = pos as u32;
            let txid = tx.compute_txid();
            self.txids.push(txid);
            let is_coinbase = pos == 0 && tx.is_coinbase();

            // Inputs first: a tx cannot spend its own outputs.
            let mut spent = Vec::with_capacity(tx.input.len());
            for (vin, input) in tx.input.iter().enumerate() {
                let vin = vin as u32;
                if is_coinbase {
                    spent.push(None);
                    continue;
                }
                let prevout = input.previous_output;
                let coin = utxo_set.remove(&prevout).unwrap_or_else(|| {
                    panic!(
                        "reference: input {txid}:{vin} (block height {height}, tx position {pos}) spends {prevout}, \
                         which is not an unspent output created earlier in the chain (missing or already spent)"
                    )
                });
                self.outspends.insert(prevout, (txid, vin, height));
                if !coin.script.is_op_return() {
                    let data = self.scripts.get_mut(&coin.script).expect(
                        "reference: internal error: a spent coin's script was never indexed",
                    );
                    data.spent_txo_count += 1;
                    data.spent_sum += coin.value;
                    data.events.push((height, pos, txid));
                    data.utxos.remove(&(prevout.txid, prevout.vout));
                }
                spent.push(Some((coin.value, coin.script)));
            }
            // A later tx with the same txid (BIP30 duplicate) replaces the earlier entry.
            self.prevouts.insert(txid, spent);

            // Then outputs.
            for (vout, output) in tx.output.iter().enumerate() {
                let vout = vout as u32;
                let outpoint = OutPoint { txid, vout };
                let value = output.value.to_sat();
                let script = output.script_pubkey.clone();
                // The later creation wins: an earlier identical outpoint (BIP30 duplicate) is overwritten,
                // and a spend recorded for an earlier output with this outpoint no longer applies.
                self.outspends.remove(&outpoint);
                if !script.is_op_return() {
                    let data = self.scripts.entry(script.clone()).or_default();
                    data.funded_txo_count += 1;
                    data.funded_sum += value;
                    data.events.push((height, pos, txid));
                    data.utxos.insert((txid, vout), (value, height));
                }
                utxo_set.insert(outpoint, Coin { value, script });
            }
        }
    }

    /// Height of the last block of the chain (the first block found is height 0).
    pub fn tip_height(&self) -> u32 {
        (self.chain.len() - 1) as u32
    }

    /// Hash of the chain's block at `height`. Panics if `height > tip_height()`.
    pub fn block_hash(&self, height: u32) -> BlockHash {
        *self.chain.get(height as usize).unwrap_or_else(|| {
            panic!(
                "reference: block_hash({height}): no such height, tip is {}",
                self.tip_height()
            )
        })
    }

    /// Number of transactions in the chain (a BIP30 duplicate txid counts twice).
    pub fn tx_count(&self) -> usize {
        self.txids.len()
    }

    /// Every scriptPubKey that received at least one output, except OP_RETURN (nulldata) scripts. Sorted.
    pub fn scripts(&self) -> Vec<ScriptBuf> {
        let mut scripts: Vec<ScriptBuf> = self.scripts.keys().cloned().collect();
        scripts.sort();
        scripts
    }

    /// Totals for `script`; `Summary::default()` if the script is unknown (or OP_RETURN).
    pub fn summary(&self, script: &Script) -> Summary {
        match self.scripts.get(script) {
            None => Summary::default(),
            Some(data) => {
                let distinct: HashSet<Txid> =
                    data.events.iter().map(|&(_, _, txid)| txid).collect();
                Summary {
                    funded_txo_count: data.funded_txo_count,
                    funded_sum: data.funded_sum,
                    spent_txo_count: data.spent_txo_count,
                    spent_sum: data.spent_sum,
                    tx_count: distinct.len() as u64,
                }
            }
        }
    }

    /// Confirmed txs that fund or spend the script, newest first: by (height desc, position-in-block desc),
    /// each txid once (at its newest position). Empty if the script is unknown.
    pub fn history(&self, script: &Script) -> Vec<Txid> {
        let Some(data) = self.scripts.get(script) else {
            return Vec::new();
        };
        let mut events = data.events.clone();
        events.sort_by_key(|&(height, pos, _)| std::cmp::Reverse((height, pos)));
        let mut seen = HashSet::new();
        events
            .into_iter()
            .filter(|&(_, _, txid)| seen.insert(txid))
            .map(|(_, _, txid)| txid)
            .collect()
    }

    /// The script's unspent outputs, sorted by (txid, vout). Empty if the script is unknown.
    pub fn utxos(&self, script: &Script) -> Vec<Utxo> {
        let Some(data) = self.scripts.get(script) else {
            return Vec::new();
        };
        // A BTreeMap keyed by (txid, vout) iterates in the required order.
        data.utxos
            .iter()
            .map(|(&(txid, vout), &(value, height))| Utxo {
                txid,
                vout,
                value,
                height,
            })
            .collect()
    }

    /// For each input of `txid`, the output it spends as (value, scriptPubKey); `None` for a coinbase
    /// input. Panics if `txid` is not a confirmed transaction of the chain.
    pub fn prevouts(&self, txid: &Txid) -> Vec<Option<(u64, ScriptBuf)>> {
        self.prevouts
            .get(txid)
            .unwrap_or_else(|| {
                panic!("reference: prevouts({txid}): no such transaction in the chain")
            })
            .clone()
    }

    /// Every confirmed txid, in chain order (height, then position in block). A BIP30 duplicate txid
    /// appears twice, so `txids().len() == tx_count()`.
    pub fn txids(&self) -> Vec<Txid> {
        self.txids.clone()
    }

    /// The txids of the block at `height`, in block order.
    pub fn block_txids(&self, height: u32) -> Vec<Txid> {
        let start = self.block_starts[height as usize];
        let end = self
            .block_starts
            .get(height as usize + 1)
            .copied()
            .unwrap_or(self.txids.len());
        self.txids[start..end].to_vec()
    }

    /// (spending txid, vin, height of the spending block) for output `txid:vout`, if it is spent;
    /// `None` if it is unspent or does not exist.
    pub fn outspend(&self, txid: &Txid, vout: u32) -> Option<(Txid, u32, u32)> {
        self.outspends.get(&OutPoint { txid: *txid, vout }).copied()
    }
}

/// The files to read, in name order: the `blk*.dat` files if there are any, otherwise all `*.dat` files.
fn list_block_files(dir: &Path) -> Vec<PathBuf> {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| {
        panic!(
            "reference: cannot read block directory {}: {e}",
            dir.display()
        )
    });
    let mut dat_files = Vec::new();
    for entry in entries {
        let entry =
            entry.unwrap_or_else(|e| panic!("reference: cannot list {}: {e}", dir.display()));
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".dat") && path.is_file() {
            dat_files.push((name, path));
        }
    }
    dat_files.sort();
    let has_blk = dat_files.iter().any(|(name, _)| name.starts_with("blk"));
    let files: Vec<PathBuf> = dat_files
        .into_iter()
        .filter(|(name, _)| !has_blk || name.starts_with("blk"))
        .map(|(_, path)| path)
        .collect();
    assert!(
        !files.is_empty(),
        "reference: no *.dat files in {}",
        dir.display()
    );
    files
}

/// Every block of one blk-framed file, with the byte offset of its record.
fn read_blk_file(path: &Path) -> Vec<(usize, Block)> {
    let data = std::fs::read(path)
        .unwrap_or_else(|e| panic!("reference: cannot read {}: {e}", path.display()));
    let mut blocks = Vec::new();
    let mut pos = 0usize;
    while pos < data.len() {
        let rest = &data[pos..];
        // A zero magic (or trailing zero bytes) is padding: the rest of the file is unused.
        if rest.iter().take(4).all(|&b| b == 0) {
            break;
        }
        assert!(
            rest.len() >= 8,
            "reference: {}: truncated record header at offset {pos} ({} bytes left)",
            path.display(),
            rest.len()
        );
        let len = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]) as usize;
        assert!(
            rest.len() - 8 >= len,
            "reference: {}: record at offset {pos} (magic {:02x}{:02x}{:02x}{:02x}) says {len} bytes but only {} remain \
             (not a blk-framed file, or truncated; XOR-obfuscated Bitcoin Core 28+ files are not supported)",
            path.display(),
            rest[0],
            rest[1],
            rest[2],
            rest[3],
            rest.len() - 8
        );
        let block: Block = bitcoin::consensus::deserialize(&rest[8..8 + len]).unwrap_or_else(|e| {
            panic!(
                "reference: {}: record at offset {pos} ({len} bytes) is not a valid block: {e}",
                path.display()
            )
        });
        blocks.push((pos, block));
        pos += 8 + len;
    }
    blocks
}

/// The block hashes of the longest chain, from the single block whose parent is missing (height 0) to the tip.
fn choose_chain(blocks: &HashMap<BlockHash, (Block, usize)>) -> Vec<BlockHash> {
    let mut roots: Vec<(usize, BlockHash)> = Vec::new();
    let mut children: HashMap<BlockHash, Vec<BlockHash>> = HashMap::new();
    for (hash, (block, order)) in blocks {
        let prev = block.header.prev_blockhash;
        if blocks.contains_key(&prev) {
            children.entry(prev).or_default().push(*hash);
        } else {
            roots.push((*order, *hash));
        }
    }
    roots.sort();
    assert!(
        roots.len() == 1,
        "reference: expected exactly one block whose parent is missing, found {}: {:?} (a gap in the blocks?)",
        roots.len(),
        roots
            .iter()
            .take(10)
            .map(|(_, h)| format!("{h} (parent {})", blocks[h].0.header.prev_blockhash))
            .collect::<Vec<_>>()
    );
    let root = roots[0].1;

    // Breadth-first from the root: every block gets height = parent's height + 1. The best tip is the
    // highest block; among equally high ones, the one seen first.
    let mut best = (0u32, blocks[&root].1, root);
    let mut queue = VecDeque::from([(root, 0u32)]);
    while let Some((hash, height)) = queue.pop_front() {
        let order = blocks[&hash].1;
        if height > best.0 || (height == best.0 && order < best.1) {
            best = (height, order, hash);
        }
        for child in children.get(&hash).into_iter().flatten() {
            queue.push_back((*child, height + 1));
        }
    }

    // Walk back from the tip to the root.
    let mut chain = vec![best.2];
    let mut current = best.2;
    while current != root {
        current = blocks[&current].0.header.prev_blockhash;
        chain.push(current);
    }
    chain.reverse();
    chain
}
