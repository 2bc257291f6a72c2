//! `chainidx gen`: a deterministic generator of a realistic-looking chain, written as Bitcoin Core blk files
//! (regtest magic) plus the generator's own ground truth (`truth.tsv`, `truth.json`).
//!
//! The chain is consensus-shaped but not consensus-valid: headers link and meet the regtest target, merkle
//! roots and witness commitments are right, every input spends an existing, unspent, earlier output and
//! values balance, but signatures are random bytes of realistic sizes.
//!
//! # Model
//! - Addresses are numbered; an address's key bytes (and a taproot output key) are a bijective mix of its
//!   number and the seed, so they are unique and need no storage. A script commits to what its spenders
//!   reveal, as on the real chain: the HASH160 of the key (P2PKH, P2WPKH) or redeem script (P2SH), the
//!   SHA256 of the witness script (P2WSH). Ids `0..5` are the "exchanges" (id 0 is the hot address),
//!   then the miners, then a pool of reused "regular" addresses, then fresh addresses made on demand.
//! - Spendable outputs live in per-height buckets (outputs of ordinary addresses and matured coinbases) or in
//!   one pool per exchange. An input is drawn by first choosing an age class (same block / 1–10 blocks old /
//!   11–200 blocks old / anywhere in history), then a height in that range, then an output at that height.
//!   So that old heights keep outputs to spend, consolidations and extra inputs only consume the UTXO set
//!   beyond half an output per transaction made so far.
//! - Coinbase outputs become spendable 100 blocks later (sooner while the chain is younger than 100 blocks,
//!   so that small chains have something to spend).
//!
//! Everything draws from one xoshiro256** stream seeded by [`GenConfig::seed`] and uses integer arithmetic
//! for values, so the same config gives byte-identical files on every platform.

use crate::chain::{address_of, subsidy};
use crate::spent_script::{Commitment, Template};
use bitcoin::absolute::LockTime;
use bitcoin::block::{Header, Version as BlockVersion};
use bitcoin::hashes::{Hash, hash160, sha256};
use bitcoin::script::Builder;
use bitcoin::transaction::Version as TxVersion;
use bitcoin::{
    Amount, Block, BlockHash, CompactTarget, Network, OutPoint, ScriptBuf, Sequence, Target,
    Transaction, TxIn, TxMerkleNode, TxOut, Txid, Witness, WitnessMerkleNode, Wtxid,
};
use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// Regtest network magic, as Bitcoin Core writes it at the start of every blk record.
pub const REGTEST_MAGIC: [u8; 4] = [0xfa, 0xbf, 0xb5, 0xda];
/// Bitcoin Core's maximum blk file size: a new file starts when a block would not fit.
const MAX_BLK_FILE_BYTES: u64 = 128 << 20;
/// Regtest's proof-of-work limit.
const REGTEST_BITS: u32 = 0x207f_ffff;
const FIRST_BLOCK_TIME: u32 = 1_600_000_000;
const BLOCK_INTERVAL: u32 = 600;
/// No output (other than OP_RETURN) is made below this value, except a last-resort sweep of dust.
const MIN_OUT: u64 = 1_000;
/// Payments put back an ordinary output below this and draw another.
const DUST_AVOID: u64 = 5_000;
/// Coinbase maturity the generator prefers to respect.
const MATURITY: u32 = 100;
const EXCHANGES: usize = 5;
const MINERS: usize = 4;
const REGULAR_POOL: u32 = 3_000;
const MAX_TXS_PER_BLOCK: u32 = 1_000_000;
const MAX_BLOCKS: u32 = 4_000_000;

#[derive(Clone, Debug, PartialEq)]
pub struct GenConfig {
    /// Total number of blocks, the generated genesis included (heights `0..blocks`).
    pub blocks: u32,
    pub seed: u64,
    /// Non-coinbase transactions per block (fewer while the chain is too young to fund them).
    pub txs_per_block: u32,
    /// Fraction of payment transactions that pay the top "exchange" address.
    pub hot_address_share: f64,
}

impl Default for GenConfig {
    fn default() -> Self {
        GenConfig {
            blocks: 3000,
            seed: 1,
            txs_per_block: 40,
            hot_address_share: 0.05,
        }
    }
}

/// Totals over the whole chain: `txs`, `inputs` and `outputs` count everything in the blocks, coinbases
/// (and their null input) and OP_RETURN / witness-commitment outputs included.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GenSummary {
    pub blocks: u32,
    pub txs: u64,
    pub inputs: u64,
    pub outputs: u64,
    pub tip_hash: BlockHash,
    /// Addresses that ever received an output (the lines of `truth.tsv`).
    pub addresses: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum GenError {
    #[error("writing {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid generator config: {0}")]
    InvalidConfig(String),
}

/// Generates `config.blocks` blocks into `out_dir` (created if missing) as `blk00000.dat`, … plus
/// `truth.tsv` and `truth.json`. Refuses a directory that already holds blk*.dat files.
/// `progress(height)` is called after each block is written.
pub fn generate(
    config: &GenConfig,
    out_dir: &Path,
    progress: &mut dyn FnMut(u32),
) -> Result<GenSummary, GenError> {
    generate_with_file_limit(config, out_dir, progress, MAX_BLK_FILE_BYTES)
}

fn generate_with_file_limit(
    config: &GenConfig,
    out_dir: &Path,
    progress: &mut dyn FnMut(u32),
    max_file_bytes: u64,
) -> Result<GenSummary, GenError> {
    validate(config)?;
    prepare_dir(out_dir)?;
    let started = std::time::Instant::now();
    let mut writer = BlkWriter::new(out_dir, max_file_bytes);
    let mut chain = ChainGen::new(config);
    let mut prev = BlockHash::all_zeros();
    let (mut txs, mut inputs, mut outputs) = (0u64, 0u64, 0u64);
    for height in 0..config.blocks {
        let block = chain.next_block(height, prev);
        txs += block.txdata.len() as u64;
        inputs += block
            .txdata
            .iter()
            .map(|tx| tx.input.len() as u64)
            .sum::<u64>();
        outputs += block
            .txdata
            .iter()
            .map(|tx| tx.output.len() as u64)
            .sum::<u64>();
        prev = block.block_hash();
        writer.write_block(&bitcoin::consensus::serialize(&block))?;
        progress(height);
    }
    writer.finish()?;

    let hot_tx_count = chain.addrs[0].tx_count;
    let hot_address = address_of(&chain.script(0), Network::Regtest).unwrap_or_default();
    let addresses = chain.write_truth_tsv(&out_dir.join("truth.tsv"))?;
    let summary = GenSummary {
        blocks: config.blocks,
        txs,
        inputs,
        outputs,
        tip_hash: prev,
        addresses,
    };
    let json = serde_json::json!({
        "blocks": summary.blocks,
        "txs": summary.txs,
        "inputs": summary.inputs,
        "outputs": summary.outputs,
        "tip_hash": summary.tip_hash.to_string(),
        "hot_address": hot_address,
        "hot_address_tx_count": hot_tx_count,
        "seed": config.seed,
        "txs_per_block": config.txs_per_block,
    });
    let json_path = out_dir.join("truth.json");
    let mut text = serde_json::to_string_pretty(&json).expect("a json! value always serializes");
    text.push('\n');
    std::fs::write(&json_path, text).map_err(io_err(&json_path))?;
    tracing::info!(
        dir = %out_dir.display(),
        blocks = summary.blocks,
        txs = summary.txs,
        addresses = summary.addresses,
        files = writer.files,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "generated chain"
    );
    Ok(summary)
}

fn validate(config: &GenConfig) -> Result<(), GenError> {
    if config.blocks == 0 {
        return Err(GenError::InvalidConfig(
            "blocks must be at least 1 (it counts the genesis block)".into(),
        ));
    }
    if config.blocks > MAX_BLOCKS {
        return Err(GenError::InvalidConfig(format!(
            "blocks {} is above the limit of {MAX_BLOCKS} (block times would overflow)",
            config.blocks
        )));
    }
    if config.txs_per_block > MAX_TXS_PER_BLOCK {
        return Err(GenError::InvalidConfig(format!(
            "txs_per_block {} is above the limit of {MAX_TXS_PER_BLOCK}",
            config.txs_per_block
        )));
    }
    let share = config.hot_address_share;
    if !share.is_finite() || !(0.0..=1.0).contains(&share) {
        return Err(GenError::InvalidConfig(format!(
            "hot_address_share must be between 0 and 1, got {share}"
        )));
    }
    Ok(())
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> GenError + '_ {
    move |source| GenError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn is_blk_name(name: &str) -> bool {
    name.starts_with("blk") && name.ends_with(".dat")
}

fn prepare_dir(out_dir: &Path) -> Result<(), GenError> {
    std::fs::create_dir_all(out_dir).map_err(io_err(out_dir))?;
    for entry in std::fs::read_dir(out_dir).map_err(io_err(out_dir))? {
        let entry = entry.map_err(io_err(out_dir))?;
        if is_blk_name(&entry.file_name().to_string_lossy()) {
            return Err(GenError::InvalidConfig(format!(
                "{} already contains blk*.dat files ({}); choose an empty directory",
                out_dir.display(),
                entry.file_name().to_string_lossy()
            )));
        }
    }
    Ok(())
}

/// Writes `magic ‖ LE32 length ‖ block` records, rolling over to the next blkNNNNN.dat when full.
struct BlkWriter {
    dir: PathBuf,
    max_file_bytes: u64,
    current: Option<(PathBuf, BufWriter<File>)>,
    size: u64,
    files: u32,
}

impl BlkWriter {
    fn new(dir: &Path, max_file_bytes: u64) -> BlkWriter {
        BlkWriter {
            dir: dir.to_path_buf(),
            max_file_bytes,
            current: None,
            size: 0,
            files: 0,
        }
    }

    fn write_block(&mut self, block: &[u8]) -> Result<(), GenError> {
        let record = 8 + block.len() as u64;
        if self.current.is_some() && self.size > 0 && self.size + record > self.max_file_bytes {
            self.finish()?;
        }
        if self.current.is_none() {
            let path = self.dir.join(format!("blk{:05}.dat", self.files));
            let file = File::create(&path).map_err(io_err(&path))?;
            self.current = Some((path, BufWriter::with_capacity(1 << 20, file)));
            self.files += 1;
            self.size = 0;
        }
        let (path, out) = self.current.as_mut().expect("opened above");
        let len = u32::try_from(block.len()).expect("a block is far below 4 GiB");
        out.write_all(&REGTEST_MAGIC)
            .and_then(|()| out.write_all(&len.to_le_bytes()))
            .and_then(|()| out.write_all(block))
            .map_err(io_err(path))?;
        self.size += record;
        Ok(())
    }

    fn finish(&mut self) -> Result<(), GenError> {
        if let Some((path, out)) = self.current.take() {
            let file = out.into_inner().map_err(|e| GenError::Io {
                path: path.clone(),
                source: e.into_error(),
            })?;
            file.sync_all().map_err(io_err(&path))?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------------------
// Randomness

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    mix64(*state)
}

/// splitmix64's finalizer: a bijection on u64.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// xoshiro256**.
struct Rng {
    s: [u64; 4],
}

impl Rng {
    fn new(seed: u64) -> Rng {
        let mut state = seed;
        let mut s = [0u64; 4];
        for word in &mut s {
            *word = splitmix64(&mut state);
        }
        Rng { s }
    }

    fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in `0..n` (n > 0), by multiply-high.
    fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    fn below_usize(&mut self, n: usize) -> usize {
        self.below(n as u64) as usize
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// Uniform in [0, 1), exactly representable.
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    /// A fraction in parts of 2^32, uniform between `lo_percent` and `hi_percent`.
    fn fraction(&mut self, lo_percent: u64, hi_percent: u64) -> u64 {
        let lo = (lo_percent << 32) / 100;
        let hi = (hi_percent << 32) / 100;
        lo + self.below(hi - lo)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let word = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
    }
}

/// `value * fraction / 2^32`.
fn scale(value: u64, fraction: u64) -> u64 {
    ((value as u128 * fraction as u128) >> 32) as u64
}

// ---------------------------------------------------------------------------------------------------------
// Addresses

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    P2pkh,
    P2sh,
    P2wpkh,
    P2wsh,
    P2tr,
}

impl Kind {
    /// Today's rough output mix: P2WPKH 45%, P2PKH 20%, P2TR 15%, P2SH 15%, P2WSH 5%.
    fn draw(rng: &mut Rng) -> Kind {
        match rng.below(100) {
            0..45 => Kind::P2wpkh,
            45..65 => Kind::P2pkh,
            65..80 => Kind::P2tr,
            80..95 => Kind::P2sh,
            _ => Kind::P2wsh,
        }
    }
}

/// Per-address ground truth, accumulated as transactions are made.
#[derive(Clone, Debug)]
struct AddrEntry {
    kind: Kind,
    funded_count: u32,
    spent_count: u32,
    tx_count: u32,
    /// Sequence number of the last transaction counted in `tx_count` (dedups a tx touching it twice).
    last_tx: u32,
    funded_sum: u64,
    spent_sum: u64,
}

impl AddrEntry {
    fn new(kind: Kind) -> AddrEntry {
        AddrEntry {
            kind,
            funded_count: 0,
            spent_count: 0,
            tx_count: 0,
            last_tx: 0,
            funded_sum: 0,
            spent_sum: 0,
        }
    }

    fn touch(&mut self, tx_seq: u32) {
        if self.last_tx != tx_seq {
            self.last_tx = tx_seq;
            self.tx_count += 1;
        }
    }
}

/// 32 pseudo-random bytes determined by `(key, id)`; the first 8 bytes are a bijection of `key ^ id`, so
/// distinct ids never collide.
fn id_bytes(key: u64, id: u32) -> [u8; 32] {
    let mut state = key ^ u64::from(id);
    let mut out = [0u8; 32];
    for chunk in out.chunks_mut(8) {
        chunk.copy_from_slice(&splitmix64(&mut state).to_le_bytes());
    }
    out
}

/// Appends a minimal data push of `data` (at most 255 bytes) to a script being built by hand.
fn push_data(script: &mut Vec<u8>, data: &[u8]) {
    match data.len() {
        0 => script.push(0x00),
        len @ 1..=75 => script.push(len as u8),
        len => {
            script.push(0x4c); // OP_PUSHDATA1
            script.push(u8::try_from(len).expect("pushes here are below 256 bytes"));
        }
    }
    script.extend_from_slice(data);
}

// ---------------------------------------------------------------------------------------------------------
// The chain

#[derive(Clone, Copy, Debug)]
struct Utxo {
    outpoint: OutPoint,
    value: u64,
    addr: u32,
}

/// Ordinary spendable outputs, one bucket per creation height, with a Fenwick tree of the bucket sizes
/// so that an output can be drawn uniformly from any height range in O(log n).
struct Buckets {
    buckets: Vec<Vec<Utxo>>,
    /// 1-based Fenwick tree over `buckets[i].len()`.
    tree: Vec<u64>,
    len: usize,
}

impl Buckets {
    fn new(heights: usize) -> Buckets {
        Buckets {
            buckets: Vec::with_capacity(heights),
            tree: vec![0; heights + 1],
            len: 0,
        }
    }

    fn len(&self) -> usize {
        self.len
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn bucket_len(&self, height: usize) -> usize {
        self.buckets[height].len()
    }

    /// Starts the bucket of the block being made.
    fn open(&mut self, height: usize) {
        debug_assert_eq!(self.buckets.len(), height);
        self.buckets.push(Vec::new());
        if self.tree.len() < height + 2 {
            self.tree.resize(height + 2, 0);
        }
    }

    fn adjust(&mut self, height: usize, add: bool) {
        let mut i = height + 1;
        while i < self.tree.len() {
            self.tree[i] = if add {
                self.tree[i] + 1
            } else {
                self.tree[i] - 1
            };
            i += i & i.wrapping_neg();
        }
    }

    /// Number of outputs at heights below `height`.
    fn prefix(&self, height: usize) -> u64 {
        let mut i = height.min(self.tree.len() - 1);
        let mut sum = 0;
        while i > 0 {
            sum += self.tree[i];
            i -= i & i.wrapping_neg();
        }
        sum
    }

    /// The height holding the `k`-th output (0-based) in height order.
    fn find(&self, mut k: u64) -> usize {
        let mut pos = 0;
        let mut step = (self.tree.len() - 1).next_power_of_two();
        while step > 0 {
            let next = pos + step;
            if next < self.tree.len() && self.tree[next] <= k {
                k -= self.tree[next];
                pos = next;
            }
            step >>= 1;
        }
        pos
    }

    fn push(&mut self, height: usize, utxo: Utxo) {
        self.buckets[height].push(utxo);
        self.adjust(height, true);
        self.len += 1;
    }

    /// A random output of the (non-empty) bucket at `height`, removed.
    fn take(&mut self, height: usize, rng: &mut Rng) -> Utxo {
        let bucket = &mut self.buckets[height];
        let utxo = bucket.swap_remove(rng.below_usize(bucket.len()));
        self.adjust(height, false);
        self.len -= 1;
        utxo
    }

    /// The height of an output drawn uniformly among those at heights `lo..=hi`, if any.
    fn sample(&self, lo: usize, hi: usize, rng: &mut Rng) -> Option<usize> {
        let below = self.prefix(lo);
        let count = self.prefix(hi + 1) - below;
        (count > 0).then(|| self.find(below + rng.below(count)))
    }
}

/// Where a transaction's inputs come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    /// Ordinary outputs, drawn by age class.
    General,
    /// One exchange's own outputs.
    Exchange(usize),
}

/// One output to make: to an address, or an OP_RETURN.
enum Out {
    Pay { addr: u32, value: u64 },
    Data(ScriptBuf),
}

struct ChainGen {
    rng: Rng,
    hot_share: f64,
    txs_per_block: u32,
    /// Keys for the per-address script hashes and public keys.
    hash_key: u64,
    pubkey_key: u64,
    addrs: Vec<AddrEntry>,
    first_miner: u32,
    first_regular: u32,
    /// Ordinary spendable outputs by creation height.
    general: Buckets,
    exchange_pools: Vec<Vec<Utxo>>,
    /// Coinbase outputs waiting to mature: (spendable from height, created at height, output).
    immature: VecDeque<(u32, u32, Utxo)>,
    tx_seq: u32,
    /// This block's fee-rate multiplier.
    fee_rate: u64,
}

/// The block being assembled.
struct BlockCtx {
    height: u32,
    txs: Vec<Transaction>,
    txids: Vec<Txid>,
    fees: u64,
    has_witness: bool,
}

impl ChainGen {
    fn new(config: &GenConfig) -> ChainGen {
        let mut rng = Rng::new(config.seed);
        let hash_key = rng.next_u64();
        let pubkey_key = rng.next_u64();
        let mut addrs = Vec::new();
        // Exchanges: the hot wallet is P2WPKH, the others cover the other kinds.
        for kind in [
            Kind::P2wpkh,
            Kind::P2pkh,
            Kind::P2sh,
            Kind::P2wsh,
            Kind::P2tr,
        ] {
            addrs.push(AddrEntry::new(kind));
        }
        let first_miner = addrs.len() as u32;
        for kind in [Kind::P2wpkh, Kind::P2pkh, Kind::P2sh, Kind::P2tr] {
            addrs.push(AddrEntry::new(kind));
        }
        let first_regular = addrs.len() as u32;
        for _ in 0..REGULAR_POOL {
            addrs.push(AddrEntry::new(Kind::draw(&mut rng)));
        }
        ChainGen {
            rng,
            hot_share: config.hot_address_share,
            txs_per_block: config.txs_per_block,
            hash_key,
            pubkey_key,
            addrs,
            first_miner,
            first_regular,
            general: Buckets::new(config.blocks as usize),
            exchange_pools: vec![Vec::new(); EXCHANGES],
            immature: VecDeque::new(),
            tx_seq: 0,
            fee_rate: 1,
        }
    }

    /// Ordinary spendable outputs beyond the UTXO set the chain should have (half an output per
    /// transaction so far). Consolidations and extra inputs only eat into this surplus, so that the set
    /// keeps growing whatever the transaction rate, and old heights keep outputs to spend.
    fn surplus(&self) -> i64 {
        self.general.len() as i64 - i64::from(self.tx_seq / 2)
    }

    fn is_exchange(addr: u32) -> bool {
        (addr as usize) < EXCHANGES
    }

    /// The address's script, built by the same templates an indexer rebuilds spent scripts with.
    fn script(&self, addr: u32) -> ScriptBuf {
        let hash160 = |data: &[u8]| Commitment::Hash160(hash160::Hash::hash(data).to_byte_array());
        let (template, commitment) = match self.addrs[addr as usize].kind {
            Kind::P2pkh => (Template::P2pkh, hash160(&self.pubkey(addr, 0))),
            Kind::P2wpkh => (Template::P2wpkh, hash160(&self.pubkey(addr, 0))),
            Kind::P2sh => (Template::P2sh, hash160(&self.p2sh_redeem_script(addr))),
            Kind::P2wsh => (
                Template::P2wsh,
                Commitment::Sha256(
                    sha256::Hash::hash(&self.multisig_script(addr, 2, 2)).to_byte_array(),
                ),
            ),
            // A taproot output key: no input data gives it back.
            Kind::P2tr => {
                let mut bytes = vec![0x51, 0x20];
                bytes.extend_from_slice(&id_bytes(self.hash_key, addr));
                return ScriptBuf::from_bytes(bytes);
            }
        };
        ScriptBuf::from_bytes(template.script(&commitment).expect("each kind's own hash"))
    }

    /// A P2SH address's redeem script: legacy 2-of-3 multisig for a quarter of them, else P2SH-P2WPKH
    /// (the v0 program of the key's hash).
    fn p2sh_redeem_script(&self, addr: u32) -> Vec<u8> {
        if id_bytes(self.hash_key, addr)[0].is_multiple_of(4) {
            self.multisig_script(addr, 2, 3)
        } else {
            let mut redeem = vec![0x00, 0x14];
            redeem.extend_from_slice(&hash160::Hash::hash(&self.pubkey(addr, 0)).to_byte_array());
            redeem
        }
    }

    fn fresh(&mut self, kind: Kind) -> u32 {
        let id = u32::try_from(self.addrs.len()).expect("fewer than 2^32 addresses");
        self.addrs.push(AddrEntry::new(kind));
        id
    }

    fn regular(&mut self) -> u32 {
        // Skewed: low indexes are reused far more than high ones.
        let u = self.rng.unit();
        let index = ((u * u) * f64::from(REGULAR_POOL)) as u32;
        self.first_regular + index.min(REGULAR_POOL - 1)
    }

    fn next_block(&mut self, height: u32, prev: BlockHash) -> Block {
        while self
            .immature
            .front()
            .is_some_and(|(at, _, _)| *at <= height)
        {
            let (_, created, utxo) = self.immature.pop_front().expect("checked");
            self.general.push(created as usize, utxo);
        }
        self.general.open(height as usize);
        self.fee_rate = self.rng.range(1, 4);

        let available =
            self.general.len() + self.exchange_pools.iter().map(Vec::len).sum::<usize>();
        let budget = if height == 0 {
            0
        } else {
            (self.txs_per_block as usize).min((2 * available).max(1))
        };
        let mut ctx = BlockCtx {
            height,
            txs: Vec::with_capacity(budget + 1),
            txids: Vec::with_capacity(budget + 1),
            fees: 0,
            has_witness: false,
        };
        for _ in 0..budget {
            if !self.make_tx(&mut ctx) {
                break;
            }
        }
        self.finish_block(ctx, prev)
    }

    /// Adds one transaction of a randomly chosen shape; false if nothing could be spent.
    fn make_tx(&mut self, ctx: &mut BlockCtx) -> bool {
        let shape = self.rng.below(1000);
        let made = match shape {
            0..30 => self.batch_payout(ctx),
            30..60 => self.consolidation(ctx),
            60..810 => self.payment(ctx, true),
            _ => self.payment(ctx, false),
        };
        made || self.payment(ctx, true)
    }

    // ----- input selection

    /// An output to spend from `source`. Payments avoid dust: a tiny ordinary output is put back and another
    /// drawn (once), leaving dust to consolidations, as wallets do.
    fn take(&mut self, source: Source, height: u32) -> Option<Utxo> {
        if source == Source::General {
            let (b, utxo) = self.take_general_from(height)?;
            if utxo.value >= DUST_AVOID {
                return Some(utxo);
            }
            let Some(other) = self.take_general(height) else {
                return Some(utxo);
            };
            self.general.push(b, utxo);
            return Some(other);
        }
        self.take_any(source, height)
    }

    fn take_any(&mut self, source: Source, height: u32) -> Option<Utxo> {
        match source {
            Source::General => self.take_general(height),
            Source::Exchange(i) => {
                let pool = &mut self.exchange_pools[i];
                if pool.is_empty() {
                    return None;
                }
                let index = self.rng.below_usize(pool.len());
                Some(pool.swap_remove(index))
            }
        }
    }

    /// The largest of a few random outputs of an exchange (for payouts that need value).
    fn take_exchange_large(&mut self, i: usize) -> Option<Utxo> {
        let len = self.exchange_pools[i].len();
        if len == 0 {
            return None;
        }
        let mut best = self.rng.below_usize(len);
        for _ in 0..7 {
            let candidate = self.rng.below_usize(len);
            if self.exchange_pools[i][candidate].value > self.exchange_pools[i][best].value {
                best = candidate;
            }
        }
        Some(self.exchange_pools[i].swap_remove(best))
    }

    /// An ordinary output: age class first (same block 10%, 1–10 blocks old 50%, 11–200 blocks old 25%,
    /// anywhere in history 15%), then a height uniformly in its range, then an output at that height. When
    /// that height has nothing left: an output uniformly among those in the range; when the range is empty,
    /// among all of them.
    fn take_general(&mut self, height: u32) -> Option<Utxo> {
        self.take_general_from(height).map(|(_, utxo)| utxo)
    }

    /// The largest of a few ordinary outputs (the others go back where they were).
    fn take_general_large(&mut self, height: u32) -> Option<Utxo> {
        let (mut best_height, mut best) = self.take_general_from(height)?;
        for _ in 0..7 {
            let Some((h, candidate)) = self.take_general_from(height) else {
                break;
            };
            if candidate.value > best.value {
                self.general.push(best_height, best);
                (best_height, best) = (h, candidate);
            } else {
                self.general.push(h, candidate);
            }
        }
        Some(best)
    }

    /// [`Self::take_general`], with the height the output was stored at.
    fn take_general_from(&mut self, height: u32) -> Option<(usize, Utxo)> {
        if self.general.is_empty() {
            return None;
        }
        let h = height as usize;
        let (lo, hi) = match self.rng.below(100) {
            0..10 => (h, h),
            10..60 => (h.saturating_sub(10), h.saturating_sub(1)),
            60..85 => (h.saturating_sub(200), h.saturating_sub(11)),
            _ => (0, h),
        };
        let mut chosen = None;
        if lo <= hi {
            let b = lo + self.rng.below_usize(hi - lo + 1);
            chosen = if self.general.bucket_len(b) > 0 {
                Some(b)
            } else {
                self.general.sample(lo, hi, &mut self.rng)
            };
        }
        let b = match chosen {
            Some(b) => b,
            None => self.general.sample(0, h, &mut self.rng)?,
        };
        Some((b, self.general.take(b, &mut self.rng)))
    }

    fn random_nonempty_exchange(&mut self) -> Option<usize> {
        let start = self.rng.below_usize(EXCHANGES);
        (0..EXCHANGES)
            .map(|i| (start + i) % EXCHANGES)
            .find(|&i| !self.exchange_pools[i].is_empty())
    }

    fn fee(&mut self, inputs: usize, outputs: usize) -> u64 {
        self.fee_rate * (100 + self.rng.below(400) + 68 * inputs as u64 + 31 * outputs as u64)
    }

    /// A payment amount: uniform within a decade, the decade uniform in `10^4..10^(max_decade+1)` sat.
    fn amount(&mut self, max_decade: u64) -> u64 {
        let base = 10u64.pow(self.rng.range(4, max_decade) as u32);
        let amount = base + self.rng.below(9 * base);
        if amount >= 200_000 && self.rng.chance(0.4) {
            amount - amount % 10_000 // a round number
        } else {
            amount
        }
    }

    fn take_n(&mut self, source: Source, n: usize, height: u32, inputs: &mut Vec<Utxo>) {
        for _ in 0..n {
            match self.take(source, height) {
                Some(utxo) => inputs.push(utxo),
                None => break,
            }
        }
    }

    /// Adds inputs from `source` while they hold less than `need` and there are fewer than `max_inputs`;
    /// then picks the fee for the final input count. Returns the value left for outputs after the fee.
    /// Only when even that cannot pay a fee plus one minimal output is the fee a fifth of the inputs.
    fn fund_inputs(
        &mut self,
        source: Source,
        inputs: &mut Vec<Utxo>,
        need: u64,
        max_inputs: usize,
        outputs: usize,
        height: u32,
    ) -> u64 {
        let mut total: u64 = inputs.iter().map(|u| u.value).sum();
        while total < need && inputs.len() < max_inputs {
            let Some(utxo) = self.take(source, height) else {
                break;
            };
            total += utxo.value;
            inputs.push(utxo);
        }
        let mut fee = self.fee(inputs.len(), outputs);
        let mut extra = 0;
        while total < fee + MIN_OUT && extra < 20 {
            extra += 1;
            let Some(utxo) = self.take(source, height) else {
                break;
            };
            total += utxo.value;
            inputs.push(utxo);
            fee = self.fee(inputs.len(), outputs);
        }
        if total < fee + MIN_OUT {
            fee = total / 5;
        }
        total - fee
    }

    /// `total` in `k` parts, each at least MIN_OUT (requires total >= k * MIN_OUT), unevenly.
    fn split(&mut self, total: u64, k: usize) -> Vec<u64> {
        let spare = total - k as u64 * MIN_OUT;
        let weights: Vec<u64> = (0..k)
            .map(|_| {
                let bits = self.rng.range(3, 9);
                1 + self.rng.below(1 << bits)
            })
            .collect();
        let sum: u64 = weights.iter().sum();
        let mut parts: Vec<u64> = weights
            .iter()
            .map(|w| MIN_OUT + (spare as u128 * *w as u128 / sum as u128) as u64)
            .collect();
        let given: u64 = parts.iter().sum();
        let lucky = self.rng.below_usize(k);
        parts[lucky] += total - given;
        parts
    }

    /// Fits the wanted payee `amounts` into `available`: returns the payee values and the change (0 for
    /// none). Without change the last payee takes the rest (an exact-amount spend). When the amounts do not
    /// fit, the available value is split instead, keeping a share as change if `with_change`.
    fn fit(&mut self, available: u64, mut amounts: Vec<u64>, with_change: bool) -> (Vec<u64>, u64) {
        let wanted: u64 = amounts.iter().sum();
        let reserve = if with_change { MIN_OUT } else { 0 };
        if wanted + reserve <= available {
            if with_change {
                return (amounts, available - wanted);
            }
            let last = amounts.len() - 1;
            amounts[last] += available - wanted;
            return (amounts, 0);
        }
        if available < 2 * MIN_OUT {
            return (vec![available], 0);
        }
        let (paid, change) = if with_change {
            let paid =
                scale(available, self.rng.fraction(10, 90)).clamp(MIN_OUT, available - MIN_OUT);
            (paid, available - paid)
        } else {
            (available, 0)
        };
        let k = amounts.len().min((paid / (20 * MIN_OUT)) as usize).max(1);
        (self.split(paid, k), change)
    }

    /// A non-exchange recipient: 20% a reused regular address, else a fresh one.
    fn customer(&mut self) -> u32 {
        if self.rng.chance(0.2) {
            self.regular()
        } else {
            let kind = Kind::draw(&mut self.rng);
            self.fresh(kind)
        }
    }

    /// The payee of a payment that does not pay the hot address: 1% each to the other exchanges (unless an
    /// exchange is paying), else a customer.
    fn payee(&mut self, sender_is_exchange: bool) -> u32 {
        if !sender_is_exchange && self.rng.chance(0.04) {
            return 1 + self.rng.below(EXCHANGES as u64 - 1) as u32;
        }
        self.customer()
    }

    /// Exchanges take change back to their own address; others mostly to a fresh address (usually of the
    /// same kind), sometimes back to the address they spent from.
    fn change(&mut self, source: Source, first_input: &Utxo) -> u32 {
        match source {
            Source::Exchange(i) => i as u32,
            Source::General => {
                if self.rng.chance(0.15) {
                    first_input.addr
                } else if self.rng.chance(0.7) {
                    let kind = self.addrs[first_input.addr as usize].kind;
                    self.fresh(kind)
                } else {
                    let kind = Kind::draw(&mut self.rng);
                    self.fresh(kind)
                }
            }
        }
    }

    fn maybe_op_return(&mut self, outs: &mut Vec<Out>) {
        if self.rng.chance(0.03) {
            let mut data = vec![0u8; self.rng.range(4, 40) as usize];
            self.rng.fill(&mut data);
            let mut script = vec![0x6a];
            push_data(&mut script, &data);
            outs.push(Out::Data(ScriptBuf::from_bytes(script)));
        }
    }

    // ----- transaction shapes

    /// A payment: `simple` is the common 1-input, payee + change shape; otherwise 1–3 inputs, 1–3 outputs.
    /// The hot address receives `hot_address_share` of these; 3% of the others are exchange withdrawals.
    fn payment(&mut self, ctx: &mut BlockCtx, simple: bool) -> bool {
        let pays_hot = self.rng.unit() < self.hot_share;
        let mut source = Source::General;
        if !pays_hot
            && self.rng.chance(0.03)
            && let Some(i) = self.random_nonempty_exchange()
        {
            source = Source::Exchange(i);
        }
        let is_exchange = matches!(source, Source::Exchange(_));
        let mut inputs = Vec::with_capacity(3);
        let first_inputs = if simple {
            1
        } else {
            self.rng.range(1, 3) as usize
        };
        self.take_n(source, first_inputs, ctx.height, &mut inputs);
        if inputs.is_empty() {
            return false;
        }
        let (payees, with_change) = if simple {
            (1, true)
        } else {
            let outputs = self.rng.range(1, 3) as usize;
            if outputs > 1 && self.rng.chance(0.6) {
                (outputs - 1, true)
            } else {
                (outputs, false)
            }
        };
        let max_decade = if self.rng.chance(0.02) { 8 } else { 7 };
        let mut amounts: Vec<u64> = (0..payees).map(|_| self.amount(max_decade)).collect();
        if self.rng.chance(0.4) {
            // Spending part of a coin rather than a set amount.
            let value: u64 = inputs.iter().map(|u| u.value).sum();
            let fraction = self.rng.fraction(5, 95);
            for amount in &mut amounts {
                *amount = (scale(value, fraction) / payees as u64).max(MIN_OUT);
            }
        }
        let outputs = payees + usize::from(with_change);
        let need = amounts.iter().sum::<u64>() + MIN_OUT + self.fee(3, outputs);
        // Sometimes a wallet short of the amount adds inputs; otherwise it pays what it has.
        let top_up = self.rng.chance(if simple { 0.2 } else { 0.3 }) && self.surplus() > 0;
        let max_inputs = match (top_up, simple) {
            (false, _) => inputs.len(),
            (true, true) => 2,
            (true, false) => 3,
        };
        let available =
            self.fund_inputs(source, &mut inputs, need, max_inputs, outputs, ctx.height);
        let (values, change) = self.fit(available, amounts, with_change);
        let mut outs = Vec::with_capacity(values.len() + 2);
        for (n, value) in values.into_iter().enumerate() {
            let addr = match n {
                0 if pays_hot => 0,
                0 => self.payee(is_exchange),
                _ => self.customer(),
            };
            outs.push(Out::Pay { addr, value });
        }
        if change > 0 {
            let addr = self.change(source, &inputs[0]);
            let position = self.rng.below_usize(outs.len() + 1);
            outs.insert(
                position,
                Out::Pay {
                    addr,
                    value: change,
                },
            );
        }
        self.maybe_op_return(&mut outs);
        self.emit(ctx, inputs, outs);
        true
    }

    /// 20–100 inputs into one output: an exchange sweeping its own deposits (back to its address), or an
    /// ordinary wallet consolidating into a fresh address (at most a tenth of the spendable outputs).
    fn consolidation(&mut self, ctx: &mut BlockCtx) -> bool {
        let wanted = self.rng.range(20, 100) as usize;
        let largest = (0..EXCHANGES)
            .max_by_key(|&i| (self.exchange_pools[i].len(), std::cmp::Reverse(i)))
            .expect("there are exchanges");
        let source = if self.exchange_pools[largest].len() >= 20 {
            Source::Exchange(largest)
        } else if self.surplus() >= 40 {
            Source::General
        } else {
            return false;
        };
        let limit = match source {
            Source::Exchange(i) => self.exchange_pools[i].len(),
            Source::General => (self.surplus() / 2) as usize,
        };
        let mut inputs = Vec::with_capacity(wanted);
        for _ in 0..wanted.min(limit) {
            match self.take_any(source, ctx.height) {
                Some(utxo) => inputs.push(utxo),
                None => break,
            }
        }
        if inputs.is_empty() {
            return false;
        }
        let value = self.fund_inputs(source, &mut inputs, 0, 0, 1, ctx.height);
        let addr = match source {
            Source::Exchange(i) => i as u32,
            Source::General => {
                let kind = self.addrs[inputs[0].addr as usize].kind;
                self.fresh(kind)
            }
        };
        self.emit(ctx, inputs, vec![Out::Pay { addr, value }]);
        true
    }

    /// 1–2 inputs paying 20–200 customers plus change, mostly from an exchange (its larger outputs).
    fn batch_payout(&mut self, ctx: &mut BlockCtx) -> bool {
        let source = match self.random_nonempty_exchange() {
            Some(i) if self.rng.chance(0.8) => Source::Exchange(i),
            _ => Source::General,
        };
        let wanted_inputs = self.rng.range(1, 2) as usize;
        let mut inputs = Vec::with_capacity(wanted_inputs);
        for _ in 0..wanted_inputs {
            let utxo = match source {
                Source::Exchange(i) => self.take_exchange_large(i),
                Source::General => self.take_general_large(ctx.height),
            };
            match utxo {
                Some(utxo) => inputs.push(utxo),
                None => break,
            }
        }
        if inputs.is_empty() {
            return false;
        }
        let wanted = self.rng.range(20, 200) as usize;
        let max_decade = if self.rng.chance(0.1) { 6 } else { 5 };
        let amounts: Vec<u64> = (0..wanted).map(|_| self.amount(max_decade)).collect();
        let need = amounts.iter().sum::<u64>() + MIN_OUT + self.fee(2, wanted + 1);
        let available = self.fund_inputs(source, &mut inputs, need, 2, wanted + 1, ctx.height);
        let (values, change) = if amounts.iter().sum::<u64>() + MIN_OUT <= available {
            self.fit(available, amounts, true)
        } else if available < 2 * MIN_OUT {
            (vec![available], 0)
        } else {
            // Not enough for the queued amounts: pay 50–95% of what there is, in as many payouts as fit.
            let paid =
                scale(available, self.rng.fraction(50, 95)).clamp(MIN_OUT, available - MIN_OUT);
            let k = wanted.min((paid / (5 * MIN_OUT)) as usize).max(1);
            (self.split(paid, k), available - paid)
        };
        let mut outs = Vec::with_capacity(values.len() + 1);
        for value in values {
            let addr = self.customer();
            outs.push(Out::Pay { addr, value });
        }
        if change > 0 {
            let addr = self.change(source, &inputs[0]);
            let position = self.rng.below_usize(outs.len() + 1);
            outs.insert(
                position,
                Out::Pay {
                    addr,
                    value: change,
                },
            );
        }
        self.emit(ctx, inputs, outs);
        true
    }

    // ----- making transactions

    fn sig(&mut self) -> [u8; 72] {
        let mut sig = [0u8; 72];
        self.rng.fill(&mut sig);
        // DER: SEQUENCE(69) { INTEGER(33) 00 r, INTEGER(32) s } ‖ SIGHASH_ALL.
        sig[..5].copy_from_slice(&[0x30, 0x45, 0x02, 0x21, 0x00]);
        sig[5] |= 0x80;
        sig[37] = 0x02;
        sig[38] = 0x20;
        sig[39] &= 0x7f;
        sig[71] = 0x01;
        sig
    }

    /// The compressed public key an address "spends with" (stable per address).
    fn pubkey(&self, addr: u32, which: u64) -> [u8; 33] {
        let bytes = id_bytes(
            self.pubkey_key
                .wrapping_add(which.wrapping_mul(0x5851_f42d)),
            addr,
        );
        let mut key = [0u8; 33];
        key[0] = 0x02 | (bytes[31] & 1);
        key[1..].copy_from_slice(&bytes);
        key
    }

    /// `OP_m <keys…> OP_n OP_CHECKMULTISIG`.
    fn multisig_script(&self, addr: u32, m: u8, n: u8) -> Vec<u8> {
        let mut script = vec![0x50 + m];
        for which in 0..n {
            push_data(&mut script, &self.pubkey(addr, u64::from(which)));
        }
        script.extend_from_slice(&[0x50 + n, 0xae]);
        script
    }

    /// Dummy unlocking data of realistic size for spending `utxo`.
    fn unlock(&mut self, utxo: &Utxo) -> (ScriptBuf, Witness) {
        let addr = utxo.addr;
        match self.addrs[addr as usize].kind {
            Kind::P2pkh => {
                let mut script = Vec::with_capacity(107);
                push_data(&mut script, &self.sig());
                push_data(&mut script, &self.pubkey(addr, 0));
                (ScriptBuf::from_bytes(script), Witness::new())
            }
            Kind::P2wpkh => {
                let witness = Witness::from_slice(&[&self.sig()[..], &self.pubkey(addr, 0)[..]]);
                (ScriptBuf::new(), witness)
            }
            Kind::P2sh => {
                let redeem = self.p2sh_redeem_script(addr);
                if redeem[0] == 0x00 {
                    // P2SH-P2WPKH: the scriptSig pushes the witness program; the witness spends it.
                    let mut script = Vec::with_capacity(23);
                    push_data(&mut script, &redeem);
                    let witness =
                        Witness::from_slice(&[&self.sig()[..], &self.pubkey(addr, 0)[..]]);
                    (ScriptBuf::from_bytes(script), witness)
                } else {
                    // Legacy 2-of-3 multisig.
                    let mut script = vec![0x00];
                    push_data(&mut script, &self.sig());
                    push_data(&mut script, &self.sig());
                    push_data(&mut script, &redeem);
                    (ScriptBuf::from_bytes(script), Witness::new())
                }
            }
            Kind::P2wsh => {
                let script = self.multisig_script(addr, 2, 2);
                let witness =
                    Witness::from_slice(&[&[][..], &self.sig()[..], &self.sig()[..], &script[..]]);
                (ScriptBuf::new(), witness)
            }
            Kind::P2tr => {
                let mut sig = [0u8; 64];
                self.rng.fill(&mut sig);
                (ScriptBuf::new(), Witness::from_slice(&[&sig[..]]))
            }
        }
    }

    /// Builds the transaction, records it in the ground truth and makes its outputs spendable.
    fn emit(&mut self, ctx: &mut BlockCtx, inputs: Vec<Utxo>, outs: Vec<Out>) {
        self.tx_seq += 1;
        let seq = self.tx_seq;
        let sequence = if self.rng.chance(0.7) {
            Sequence::ENABLE_RBF_NO_LOCKTIME
        } else {
            Sequence::MAX
        };
        let mut tx_inputs = Vec::with_capacity(inputs.len());
        let mut in_value = 0u64;
        for utxo in &inputs {
            let (script_sig, witness) = self.unlock(utxo);
            ctx.has_witness |= !witness.is_empty();
            tx_inputs.push(TxIn {
                previous_output: utxo.outpoint,
                script_sig,
                sequence,
                witness,
            });
            in_value += utxo.value;
            let entry = &mut self.addrs[utxo.addr as usize];
            entry.spent_count += 1;
            entry.spent_sum += utxo.value;
            entry.touch(seq);
        }
        let mut tx_outputs = Vec::with_capacity(outs.len());
        let mut out_value = 0u64;
        for out in &outs {
            let (script_pubkey, value) = match out {
                Out::Pay { addr, value } => (self.script(*addr), *value),
                Out::Data(script) => (script.clone(), 0),
            };
            out_value += value;
            tx_outputs.push(TxOut {
                value: Amount::from_sat(value),
                script_pubkey,
            });
        }
        debug_assert!(in_value >= out_value, "outputs exceed inputs");
        ctx.fees += in_value - out_value;
        let tx = Transaction {
            version: TxVersion::TWO,
            lock_time: LockTime::ZERO,
            input: tx_inputs,
            output: tx_outputs,
        };
        let txid = tx.compute_txid();
        for (vout, out) in outs.iter().enumerate() {
            if let Out::Pay { addr, value } = *out {
                self.fund(addr, value, seq);
                let utxo = Utxo {
                    outpoint: OutPoint::new(txid, vout as u32),
                    value,
                    addr,
                };
                if Self::is_exchange(addr) {
                    self.exchange_pools[addr as usize].push(utxo);
                } else {
                    self.general.push(ctx.height as usize, utxo);
                }
            }
        }
        ctx.txs.push(tx);
        ctx.txids.push(txid);
    }

    fn fund(&mut self, addr: u32, value: u64, seq: u32) {
        let entry = &mut self.addrs[addr as usize];
        entry.funded_count += 1;
        entry.funded_sum += value;
        entry.touch(seq);
    }

    fn finish_block(&mut self, ctx: BlockCtx, prev: BlockHash) -> Block {
        let height = ctx.height;
        let miner = self.first_miner
            + match self.rng.below(100) {
                0..40 => 0,
                40..70 => 1,
                70..90 => 2,
                _ => 3,
            };
        debug_assert!((miner - self.first_miner) < MINERS as u32);
        let reward = subsidy(height) + ctx.fees;

        let mut extranonce = [0u8; 8];
        self.rng.fill(&mut extranonce);
        let mut script_sig = Builder::new()
            .push_int(i64::from(height))
            .into_script()
            .into_bytes();
        push_data(&mut script_sig, &extranonce);

        let mut outputs = vec![TxOut {
            value: Amount::from_sat(reward),
            script_pubkey: self.script(miner),
        }];
        let mut witness = Witness::new();
        if ctx.has_witness {
            // BIP141: the coinbase's wtxid counts as zero; the reserved value is 32 zero bytes.
            let reserved = [0u8; 32];
            let wtxids = std::iter::once(Wtxid::all_zeros())
                .chain(ctx.txs.iter().map(Transaction::compute_wtxid));
            let root = bitcoin::merkle_tree::calculate_root(wtxids).expect("at least the coinbase");
            let root = WitnessMerkleNode::from_raw_hash(root.to_raw_hash());
            let commitment = Block::compute_witness_commitment(&root, &reserved);
            let mut script = vec![0x6a, 0x24, 0xaa, 0x21, 0xa9, 0xed];
            script.extend_from_slice(commitment.as_byte_array());
            outputs.push(TxOut {
                value: Amount::ZERO,
                script_pubkey: ScriptBuf::from_bytes(script),
            });
            witness.push(reserved);
        }
        let coinbase = Transaction {
            version: TxVersion::TWO,
            lock_time: LockTime::ZERO,
            input: vec![TxIn {
                previous_output: OutPoint::null(),
                script_sig: ScriptBuf::from_bytes(script_sig),
                sequence: Sequence::MAX,
                witness,
            }],
            output: outputs,
        };
        let coinbase_txid = coinbase.compute_txid();
        self.tx_seq += 1;
        self.fund(miner, reward, self.tx_seq);
        // Matures after 100 blocks; while the chain is young, after as many blocks as it is high (min 1).
        let delay = height.clamp(1, MATURITY);
        self.immature.push_back((
            height + delay,
            height,
            Utxo {
                outpoint: OutPoint::new(coinbase_txid, 0),
                value: reward,
                addr: miner,
            },
        ));

        let mut txdata = Vec::with_capacity(ctx.txs.len() + 1);
        txdata.push(coinbase);
        txdata.extend(ctx.txs);
        let txids = std::iter::once(coinbase_txid).chain(ctx.txids);
        let merkle_root =
            bitcoin::merkle_tree::calculate_root(txids).expect("at least the coinbase");
        let bits = CompactTarget::from_consensus(REGTEST_BITS);
        let target = Target::from_compact(bits);
        let mut header = Header {
            version: BlockVersion::from_consensus(0x2000_0000),
            prev_blockhash: prev,
            merkle_root: TxMerkleNode::from_raw_hash(merkle_root.to_raw_hash()),
            time: FIRST_BLOCK_TIME + height * BLOCK_INTERVAL,
            bits,
            nonce: 0,
        };
        while !target.is_met_by(header.block_hash()) {
            header.nonce += 1;
        }
        Block { header, txdata }
    }

    /// Writes `truth.tsv` (sorted by address); returns the number of addresses.
    fn write_truth_tsv(&self, path: &Path) -> Result<u64, GenError> {
        let mut rows: Vec<(String, &AddrEntry)> = self
            .addrs
            .iter()
            .enumerate()
            .filter(|(_, entry)| entry.funded_count > 0)
            .map(|(id, entry)| {
                let address = address_of(&self.script(id as u32), Network::Regtest)
                    .expect("generated scripts are standard");
                (address, entry)
            })
            .collect();
        rows.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let file = File::create(path).map_err(io_err(path))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        let mut write = || -> std::io::Result<()> {
            writeln!(
                out,
                "address\tfunded_txo_count\tfunded_sum\tspent_txo_count\tspent_sum\ttx_count\tutxo_count\tutxo_sum"
            )?;
            for (address, e) in &rows {
                writeln!(
                    out,
                    "{address}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
                    e.funded_count,
                    e.funded_sum,
                    e.spent_count,
                    e.spent_sum,
                    e.tx_count,
                    e.funded_count - e.spent_count,
                    e.funded_sum - e.spent_sum
                )?;
            }
            out.flush()
        };
        write().map_err(io_err(path))?;
        Ok(rows.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::{BlkDirSource, BlockSource};
    use std::collections::{BTreeMap, HashMap, HashSet};

    fn small() -> GenConfig {
        GenConfig {
            blocks: 60,
            seed: 7,
            txs_per_block: 30,
            hot_address_share: 0.2,
        }
    }

    fn read_blocks(dir: &Path) -> Vec<Block> {
        let source = BlkDirSource::open(dir).expect("blk files");
        (0..=source.tip_height().unwrap())
            .map(|h| {
                bitcoin::consensus::deserialize(&source.block_bytes(h).unwrap()).expect("a block")
            })
            .collect()
    }

    #[derive(Default, Debug, PartialEq, Eq)]
    struct Recount {
        funded_count: u64,
        funded_sum: u64,
        spent_count: u64,
        spent_sum: u64,
        txs: HashSet<Txid>,
    }

    #[test]
    fn generated_chain_is_consistent_and_matches_truth() {
        let dir = tempfile::TempDir::new().unwrap();
        let config = small();
        let mut heights = Vec::new();
        let summary = generate(&config, dir.path(), &mut |h| heights.push(h)).unwrap();
        assert_eq!(heights, (0..config.blocks).collect::<Vec<_>>());

        let raw = std::fs::read(dir.path().join("blk00000.dat")).unwrap();
        assert_eq!(raw[..4], REGTEST_MAGIC);

        let blocks = read_blocks(dir.path());
        assert_eq!(blocks.len(), config.blocks as usize);
        let mut utxos: HashMap<OutPoint, TxOut> = HashMap::new();
        let mut per_address: BTreeMap<String, Recount> = BTreeMap::new();
        let (mut txs, mut inputs, mut outputs) = (0u64, 0u64, 0u64);
        let mut witness_txs = 0;
        let mut prev = BlockHash::all_zeros();
        for (height, block) in blocks.iter().enumerate() {
            let header = &block.header;
            assert_eq!(header.prev_blockhash, prev, "height {height} links");
            assert_eq!(header.bits.to_consensus(), REGTEST_BITS);
            assert_eq!(header.time, FIRST_BLOCK_TIME + 600 * height as u32);
            header.validate_pow(header.target()).expect("pow");
            assert!(block.check_merkle_root(), "merkle root at {height}");
            assert!(
                block.check_witness_commitment(),
                "witness commitment at {height}"
            );
            if height > 16 {
                assert_eq!(block.bip34_block_height().unwrap(), height as u64);
            }
            prev = block.block_hash();
            let mut fees = 0u64;
            for (i, tx) in block.txdata.iter().enumerate() {
                assert_eq!(tx.is_coinbase(), i == 0);
                txs += 1;
                inputs += tx.input.len() as u64;
                outputs += tx.output.len() as u64;
                let txid = tx.compute_txid();
                if !tx.is_coinbase() {
                    let mut in_value = 0;
                    for input in &tx.input {
                        let spent = utxos
                            .remove(&input.previous_output)
                            .unwrap_or_else(|| panic!("{txid} spends a missing or spent output"));
                        in_value += spent.value.to_sat();
                        // Scripts commit to what their spenders reveal, as on the real chain.
                        let script = spent.script_pubkey.as_bytes();
                        assert_eq!(
                            crate::spent_script::template_for(script, input).is_some(),
                            !spent.script_pubkey.is_p2tr(),
                            "{txid} spends {script:x?}"
                        );
                        let address = address_of(&spent.script_pubkey, Network::Regtest).unwrap();
                        let r = per_address.entry(address).or_default();
                        r.spent_count += 1;
                        r.spent_sum += spent.value.to_sat();
                        r.txs.insert(txid);
                    }
                    let out_value: u64 = tx.output.iter().map(|o| o.value.to_sat()).sum();
                    assert!(in_value > out_value, "{txid} pays a fee");
                    fees += in_value - out_value;
                    if tx.input.iter().any(|i| !i.witness.is_empty()) {
                        witness_txs += 1;
                    }
                }
                for (vout, output) in tx.output.iter().enumerate() {
                    if let Some(address) = address_of(&output.script_pubkey, Network::Regtest) {
                        let r = per_address.entry(address).or_default();
                        r.funded_count += 1;
                        r.funded_sum += output.value.to_sat();
                        r.txs.insert(txid);
                        utxos.insert(OutPoint::new(txid, vout as u32), output.clone());
                    } else {
                        assert!(output.script_pubkey.is_op_return());
                    }
                }
            }
            let coinbase_value: u64 = block.txdata[0]
                .output
                .iter()
                .map(|o| o.value.to_sat())
                .sum();
            assert_eq!(
                coinbase_value,
                subsidy(height as u32) + fees,
                "coinbase at {height}"
            );
        }
        assert!(witness_txs > 0);
        assert_eq!(summary.txs, txs);
        assert_eq!(summary.inputs, inputs);
        assert_eq!(summary.outputs, outputs);
        assert_eq!(summary.tip_hash, prev);
        assert!(txs > 1000, "only {txs} txs");

        // truth.tsv against the recount, every line.
        let tsv = std::fs::read_to_string(dir.path().join("truth.tsv")).unwrap();
        let mut lines = tsv.lines();
        assert_eq!(
            lines.next().unwrap(),
            "address\tfunded_txo_count\tfunded_sum\tspent_txo_count\tspent_sum\ttx_count\tutxo_count\tutxo_sum"
        );
        let rows: Vec<Vec<&str>> = lines.map(|l| l.split('\t').collect()).collect();
        assert_eq!(rows.len(), per_address.len());
        assert_eq!(summary.addresses, rows.len() as u64);
        for (row, (address, r)) in rows.iter().zip(&per_address) {
            let n = |i: usize| row[i].parse::<u64>().unwrap();
            assert_eq!(row[0], address);
            assert_eq!(n(1), r.funded_count, "{address}");
            assert_eq!(n(2), r.funded_sum, "{address}");
            assert_eq!(n(3), r.spent_count, "{address}");
            assert_eq!(n(4), r.spent_sum, "{address}");
            assert_eq!(n(5), r.txs.len() as u64, "{address}");
            assert_eq!(n(6), r.funded_count - r.spent_count, "{address}");
            assert_eq!(n(7), r.funded_sum - r.spent_sum, "{address}");
        }
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("truth.json")).unwrap())
                .unwrap();
        assert_eq!(json["txs"], txs);
        assert_eq!(json["blocks"], config.blocks);
        assert_eq!(json["tip_hash"], prev.to_string());
        let hot = json["hot_address"].as_str().unwrap();
        assert!(hot.starts_with("bcrt1q"), "{hot}");
        assert_eq!(
            json["hot_address_tx_count"],
            per_address[hot].txs.len() as u64
        );
        // The hot address gets a fifth of the payments: the most used address by far.
        let busiest = per_address
            .iter()
            .max_by_key(|(_, r)| r.txs.len())
            .unwrap()
            .0;
        assert_eq!(busiest, hot);

        // A second run into the same directory is refused.
        assert!(matches!(
            generate(&config, dir.path(), &mut |_| {}),
            Err(GenError::InvalidConfig(_))
        ));
    }

    #[test]
    fn same_config_gives_identical_files() {
        let config = GenConfig {
            blocks: 40,
            seed: 3,
            txs_per_block: 25,
            hot_address_share: 0.05,
        };
        let (a, b) = (
            tempfile::TempDir::new().unwrap(),
            tempfile::TempDir::new().unwrap(),
        );
        generate(&config, a.path(), &mut |_| {}).unwrap();
        generate(&config, b.path(), &mut |_| {}).unwrap();
        for name in ["blk00000.dat", "truth.tsv", "truth.json"] {
            let x = std::fs::read(a.path().join(name)).unwrap();
            let y = std::fs::read(b.path().join(name)).unwrap();
            assert!(x == y, "{name} differs between runs");
        }
        let c = tempfile::TempDir::new().unwrap();
        let other = GenConfig { seed: 4, ..config };
        generate(&other, c.path(), &mut |_| {}).unwrap();
        assert_ne!(
            std::fs::read(a.path().join("blk00000.dat")).unwrap(),
            std::fs::read(c.path().join("blk00000.dat")).unwrap()
        );
    }

    #[test]
    fn rolls_over_to_new_files() {
        let dir = tempfile::TempDir::new().unwrap();
        let config = GenConfig {
            blocks: 30,
            seed: 9,
            txs_per_block: 20,
            hot_address_share: 0.05,
        };
        let limit = 32 * 1024;
        let summary = generate_with_file_limit(&config, dir.path(), &mut |_| {}, limit).unwrap();
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| is_blk_name(n))
            .collect();
        names.sort();
        assert!(names.len() > 1, "{names:?}");
        for (i, name) in names.iter().enumerate() {
            assert_eq!(name, &format!("blk{i:05}.dat"));
        }
        let blocks = read_blocks(dir.path());
        assert_eq!(blocks.len(), 30);
        assert_eq!(blocks.last().unwrap().block_hash(), summary.tip_hash);
    }

    #[test]
    fn shapes_ages_and_script_mix_look_realistic() {
        let config = GenConfig {
            blocks: 250,
            seed: 11,
            txs_per_block: 40,
            hot_address_share: 0.05,
        };
        let dir = tempfile::TempDir::new().unwrap();
        generate(&config, dir.path(), &mut |_| {}).unwrap();
        let blocks = read_blocks(dir.path());
        let mut created: HashMap<OutPoint, u32> = HashMap::new();
        let mut kinds: HashMap<&'static str, u64> = HashMap::new();
        let (mut same_block, mut recent, mut old, mut spends) = (0u64, 0u64, 0u64, 0u64);
        let mut oldest = 0;
        let (mut batches, mut consolidations, mut simple, mut op_returns, mut txs) =
            (0, 0, 0, 0, 0);
        for (height, block) in blocks.iter().enumerate() {
            let height = height as u32;
            for tx in &block.txdata {
                let txid = tx.compute_txid();
                if !tx.is_coinbase() {
                    txs += 1;
                    for input in &tx.input {
                        let age = height - created[&input.previous_output];
                        spends += 1;
                        match age {
                            0 => same_block += 1,
                            1..=10 => recent += 1,
                            50.. => old += 1,
                            _ => {}
                        }
                        oldest = oldest.max(age);
                    }
                    let payments = tx
                        .output
                        .iter()
                        .filter(|o| !o.script_pubkey.is_op_return())
                        .count();
                    match (tx.input.len(), payments) {
                        (_, 20..) => batches += 1,
                        (20.., 1) => consolidations += 1,
                        (1, 2) => simple += 1,
                        _ => {}
                    }
                    if tx.output.iter().any(|o| o.script_pubkey.is_op_return()) {
                        op_returns += 1;
                    }
                    for output in &tx.output {
                        let kind = crate::chain::ScriptType::of(&output.script_pubkey).as_str();
                        *kinds.entry(kind).or_default() += 1;
                    }
                }
                for vout in 0..tx.output.len() {
                    created.insert(OutPoint::new(txid, vout as u32), height);
                }
            }
        }
        assert!(oldest > 150, "oldest spend is {oldest} blocks old");
        let share = |n: u64| n as f64 / spends as f64;
        assert!(share(same_block) > 0.03, "same block {same_block}/{spends}");
        assert!(share(recent) > 0.2, "recent {recent}/{spends}");
        assert!(share(old) > 0.05, "old {old}/{spends}");
        let tx_share = |n: u64| n as f64 / txs as f64;
        assert!(tx_share(simple) > 0.5, "simple {simple}/{txs}");
        assert!(
            (0.01..0.06).contains(&tx_share(batches)),
            "batches {batches}/{txs}"
        );
        assert!(
            (0.01..0.06).contains(&tx_share(consolidations)),
            "consolidations {consolidations}/{txs}"
        );
        assert!(
            (0.01..0.06).contains(&tx_share(op_returns)),
            "op_return {op_returns}/{txs}"
        );
        let outputs: u64 = kinds
            .iter()
            .filter(|(k, _)| **k != "nulldata")
            .map(|(_, n)| n)
            .sum();
        let kind_share = |k: &str| kinds.get(k).copied().unwrap_or(0) as f64 / outputs as f64;
        assert!((0.3..0.6).contains(&kind_share("p2wpkh")), "{kinds:?}");
        assert!((0.08..0.25).contains(&kind_share("p2tr")), "{kinds:?}");
        assert!((0.1..0.3).contains(&kind_share("p2pkh")), "{kinds:?}");
        assert!((0.08..0.25).contains(&kind_share("p2sh")), "{kinds:?}");
        assert!((0.02..0.1).contains(&kind_share("p2wsh")), "{kinds:?}");
    }

    #[test]
    fn rejects_bad_configs() {
        let dir = tempfile::TempDir::new().unwrap();
        for config in [
            GenConfig {
                blocks: 0,
                ..GenConfig::default()
            },
            GenConfig {
                hot_address_share: 1.5,
                ..GenConfig::default()
            },
            GenConfig {
                hot_address_share: f64::NAN,
                ..GenConfig::default()
            },
        ] {
            assert!(matches!(
                generate(&config, dir.path(), &mut |_| {}),
                Err(GenError::InvalidConfig(_))
            ));
        }
    }
}
