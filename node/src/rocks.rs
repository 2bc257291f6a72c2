//! The RocksDB engine behind [`chainidx_core::store::Store`]: one database per shard, one column family per
//! row kind (see `doc/schema.md`).

use chainidx_core::schema::{Cf, KEY_HASH_LEN, RETIRED_CFS};
use chainidx_core::store::{
    Batch, EngineMemory, GatheredRows, Op, Reads, ScanFrom, SortScratch, Store, StoreError,
    key_prefix,
};
use rocksdb::{BlockBasedOptions, ColumnFamilyDescriptor, DB, Options, WriteOptions};
use std::path::Path;

pub struct RocksStore {
    db: DB,
}

fn engine(e: rocksdb::Error) -> StoreError {
    StoreError::Engine(e.to_string())
}

/// One block cache for every shard and column family of this process: by default each column family of
/// each database gets its own 8 MiB cache, so a worker's memory grew with the number of shards it held.
fn shared_block_cache() -> &'static rocksdb::Cache {
    static CACHE: std::sync::OnceLock<rocksdb::Cache> = std::sync::OnceLock::new();
    CACHE.get_or_init(|| {
        rocksdb::Cache::new_lru_cache(BLOCK_CACHE_BYTES.load(std::sync::atomic::Ordering::Relaxed))
    })
}

static BLOCK_CACHE_BYTES: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(DEFAULT_BLOCK_CACHE_BYTES);

const DEFAULT_BLOCK_CACHE_BYTES: usize = 64 << 20;

/// Sizes the block cache every database of this process shares; only before the first is opened (it is
/// created then). Filters take ~8 bytes per tx a worker holds, so a worker holding tens of millions of txs
/// wants more than the default for queries to find them cached.
pub fn set_block_cache_bytes(bytes: usize) {
    BLOCK_CACHE_BYTES.store(bytes, std::sync::atomic::Ordering::Relaxed);
}

/// Whether this process's databases read table files through `mmap` (`--mmap-reads`): a backfill's
/// lookups that miss the block cache then neither copy nor cache a block, which in a shard much larger
/// than the cache was a quarter of a worker's CPU (one 3.99M-tx shard: 40–44k -> 50–55k tx/s;
/// doc/performance.md). Off by default: the mapped pages count in the process's RSS (page cache,
/// reclaimable) and grow with its databases. Set before the first database is opened.
pub fn set_mmap_reads(enabled: bool) {
    MMAP_READS.store(enabled, std::sync::atomic::Ordering::Relaxed);
}

static MMAP_READS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// One memtable budget for every shard of this process. Each shard has a memtable per column family (stats
/// merges, spends recorded for peers, rows of the tip), so without a cap a worker's memory grew with the
/// number of shards it held. Past the budget the database being written flushes; an idle one never does,
/// so shards are also flushed at the end of each phase.
fn shared_write_buffers() -> &'static rocksdb::WriteBufferManager {
    static MANAGER: std::sync::OnceLock<rocksdb::WriteBufferManager> = std::sync::OnceLock::new();
    MANAGER.get_or_init(|| {
        rocksdb::WriteBufferManager::new_write_buffer_manager(WRITE_BUFFER_BYTES, false)
    })
}

const WRITE_BUFFER_BYTES: usize = 64 << 20;

/// Sort memory for `bulk_load`, kept for the next window (see [`SortScratch`]): as many as bulk loads ever
/// ran at once (windows, resolution batches, spends recorded for peers), each as large as its largest use.
static SORT_SCRATCH: std::sync::Mutex<Vec<SortScratch>> = std::sync::Mutex::new(Vec::new());

/// Rows copied together before a table writer takes them (`SortedPuts::gather`): some 200 KB, which
/// stay in cache while the writer reads them.
const GATHER_ROWS: usize = 4_096;
/// Where `bulk_load` writes table files before the database takes them over (moves them in). Files left
/// there by a crash are removed when the database is opened.
const BULK_DIR: &str = "bulk";
static BULK_FILES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn merge_stats(
    _key: &[u8],
    existing: Option<&[u8]>,
    operands: &rocksdb::MergeOperands,
) -> Option<Vec<u8>> {
    crate::shard::add_stats(existing.into_iter().chain(operands))
}

/// Who writes the table files these options make: the database itself (flushes, compactions) or
/// `bulk_load` (ingested files).
#[derive(Clone, Copy, PartialEq, Eq)]
enum TableWriter {
    Database,
    Ingestion,
}

/// How a database writes from the moment it opens (see [`RocksStore::open_for_backfill`]): a backfilling
/// shard, which a full compaction will rewrite, compresses nothing and leaves `history` to that compaction.
#[derive(Clone, Copy, PartialEq, Eq)]
enum WriteMode {
    Backfill,
    Settled,
}

/// Column families a backfill only writes (its resolutions look in `outspends` only once a shard has
/// dropped spent coins' rows, after its own backfill; queries and rollbacks still read both, just from
/// more files): their automatic compactions wait for the full compaction after the backfill, which
/// rewrites everything anyway.
const LEFT_TO_FULL_COMPACTION: [Cf; 2] = [Cf::History, Cf::Outspends];

fn cf_options(cf: Cf, writer: TableWriter, mode: WriteMode) -> Options {
    let mut options = Options::default();
    // Hashes, which most keys and values are, do not compress; what zstd gains (~40%: the zeroed sequence
    // numbers of compacted rows, repeated key bytes, script templates; LZ4 gained ~30%) is worth its CPU
    // only once, in the bottommost level. Compressing every file on the way in cost ~15% of backfill CPU
    // (`--bench backfill`).
    options.set_compression_type(rocksdb::DBCompressionType::None);
    options.set_bottommost_compression_type(match mode {
        WriteMode::Settled => rocksdb::DBCompressionType::Zstd,
        WriteMode::Backfill => rocksdb::DBCompressionType::None,
    });
    // A backfill never reads `history` (its rows are put, its stats merged), yet a shard of 8 windows had
    // ingested and flushed past the L0 trigger, and compacting them was 2–3 CPU-s per 500k-tx shard
    // (~4 CPU-s per million txs, from RocksDB's log), work the full compaction after the backfill
    // redoes. Without automatic compactions RocksDB also skips its L0-count write stalls.
    if LEFT_TO_FULL_COMPACTION.contains(&cf) && mode == WriteMode::Backfill {
        options.set_disable_auto_compactions(true);
    }
    // zstd level 6 instead of 3 where it pays (`--bench backfill`, 584k txs, bytes/tx compacted): history
    // 103.8 -> 95.5, txs 18.8 -> 17.9, the other families < 1 byte; 267 -> 256 bytes/tx in all for ~6 more
    // CPU-s per million txs in the compaction after the backfill (level 9: 254 for ~11 more; a 16 KiB
    // dictionary: 263 for three times the compaction CPU).
    if matches!(cf, Cf::History | Cf::Txs) {
        // Window bits and strategy are RocksDB's defaults; no dictionary.
        options.set_bottommost_compression_options(-14, 6, 0, 0, true);
    }
    let mut table = BlockBasedOptions::default();
    table.set_block_cache(shared_block_cache());
    // Index and filter blocks live in the (bounded) block cache rather than beside every open table file,
    // where they grew with the data; L0's, read by every lookup, stay pinned. Not those of the column
    // families a backfill leaves to the full compaction: their L0 files pile up unread, and their pinned
    // blocks had pushed the cache past its size (86 MiB of 64 after 7.99M txs), so that the filters of
    // `outputs` (it had one before format 10), which every lookup read, were read in again and again
    // (RocksDB's statistics, 7.99M txs: 114 GB of filter blocks brought into the cache during the
    // backfill, 35 GB unpinned).
    table.set_cache_index_and_filter_blocks(true);
    table.set_cache_index_and_filter_blocks_with_high_priority(true);
    table.set_pin_l0_filter_and_index_blocks_in_cache(
        !(mode == WriteMode::Backfill && LEFT_TO_FULL_COMPACTION.contains(&cf)),
    );
    // Point lookups (txs, outspends, stats) mostly miss in shards that do not hold the row.
    // Ribbon filters take ~30% less space than Bloom filters for the same false positives but ~4x the CPU
    // to build: they are for files that stay (compactions below L0); flushed and ingested files, which
    // the after-backfill compaction rewrites, get Bloom filters. `outputs`, `prevouts` and the other
    // height-keyed families need none: a lookup reads only files whose height range covers it, and
    // `outputs` is only looked up where `txs` says the coin is.
    if matches!(cf, Cf::Txs | Cf::Outspends | Cf::History) {
        match writer {
            TableWriter::Database => table.set_hybrid_ribbon_filter(10.0, 1),
            TableWriter::Ingestion => table.set_bloom_filter(10.0, false),
        }
    }
    // `history` is read by address: a scan of one address's rows or a point lookup of its stats row (the
    // address key alone). Its filter is on the 12-byte address key, which answers both where the shard
    // lacks the address, with one entry per address rather than per row.
    if cf == Cf::History {
        options.set_prefix_extractor(rocksdb::SliceTransform::create_fixed_prefix(KEY_HASH_LEN));
        table.set_whole_key_filtering(false);
    }
    // Larger blocks than the 4 KiB default compress better and need fewer index entries: 469 -> 443
    // bytes/tx at 16 KiB, 432 at 64 KiB (`--bench backfill`, LZ4 then).
    table.set_block_size(32 << 10);
    // A block stores every 16th key whole by default (a restart point for binary search); a history row
    // that follows its address's stats row shares 12 bytes with it, which a restart point stores again.
    // Every 64th: history 95.5 -> 92.6 bytes per tx, 257 -> 252 in all (`--bench backfill`, 584k txs);
    // a lookup then scans up to 64 keys instead of 16 in the block it lands in (`--bench queries`
    // unchanged within its noise).
    table.set_block_restart_interval(64);
    options.set_block_based_table_factory(&table);
    if cf == Cf::History {
        // Blocks add to an address's stats row without reading it first (history rows are only ever put).
        options.set_merge_operator_associative("add_address_stats", merge_stats);
    }
    // Smaller memtables (shallower skiplists) flushed in the background: half of a backfill's time is
    // memtable inserts of random keys. ~8% more tx/s than 32 MiB in `--bench backfill` (28.5k -> 30.8k).
    options.set_write_buffer_size(8 << 20);

    options.set_max_write_buffer_number(6);
    // A backfill ingests a table file per window and per resolution batch; compacting every 4 of them
    // rewrote the growing lower level again and again. 16 halves that work; reads that must merge L0
    // files are scans (`history`), point lookups check each file's filter first.
    options.set_level_zero_file_num_compaction_trigger(16);
    options.set_level_zero_slowdown_writes_trigger(48);
    options.set_level_zero_stop_writes_trigger(64);
    options
}

/// Reads at `snapshot`, or at the latest state without one.
fn read_options(snapshot: Option<&rocksdb::Snapshot<'_>>) -> rocksdb::ReadOptions {
    let mut read = rocksdb::ReadOptions::default();
    if let Some(snapshot) = snapshot {
        read.set_snapshot(snapshot);
    }
    read
}

impl RocksStore {
    /// [`Reads::get`], at `snapshot` if given.
    fn get_at(
        &self,
        cf: Cf,
        key: &[u8],
        snapshot: Option<&rocksdb::Snapshot<'_>>,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        self.db
            .get_cf_opt(self.handle(cf), key, &read_options(snapshot))
            .map_err(engine)
    }

    /// [`Reads::scan`], at `snapshot` if given; `fill_cache: false` reads blocks around the block cache
    /// (RocksDB still caches the index and filter blocks it needs to find them).
    fn scan_with(
        &self,
        cf: Cf,
        prefix: &[u8],
        from: ScanFrom<'_>,
        fill_cache: bool,
        snapshot: Option<&rocksdb::Snapshot<'_>>,
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StoreError> {
        let mut read = read_options(snapshot);
        read.fill_cache(fill_cache);
        let mut iter = self.db.raw_iterator_cf_opt(self.handle(cf), read);
        let reverse = match from {
            ScanFrom::First => {
                iter.seek(prefix);
                false
            }
            ScanFrom::Last => {
                // Larger than every key with this prefix (our keys are at most 45 bytes).
                let mut upper = prefix.to_vec();
                upper.extend_from_slice(&[0xff; 64]);
                iter.seek_for_prev(&upper);
                true
            }
            ScanFrom::AtOrBefore(key) => {
                iter.seek_for_prev(key);
                true
            }
            ScanFrom::AtOrAfter(key) => {
                iter.seek(key);
                false
            }
        };
        while let (Some(key), Some(value)) = (iter.key(), iter.value()) {
            if !key.starts_with(prefix) || !visit(key, value) {
                break;
            }
            if reverse {
                iter.prev();
            } else {
                iter.next();
            }
        }
        iter.status().map_err(engine)
    }

    /// [`Reads::multi_get`], at `snapshot` if given, calling `between_chunks` after every chunk but the
    /// last (a test writes there).
    fn multi_get_chunked(
        &self,
        cf: Cf,
        keys: &[&[u8]],
        snapshot: Option<&rocksdb::Snapshot<'_>>,
        mut between_chunks: impl FnMut(),
    ) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        // RocksDB sorts the keys itself unless told they are sorted, with a comparator that goes through a
        // virtual call and `memcmp` per comparison (~3% of a backfill's CPU); sorted here by prefix first.
        let sorted = sort_by_key(keys.iter().copied().zip(0..));
        let mut values: Vec<Option<Vec<u8>>> = vec![None; keys.len()];
        // Each answer pins the block it lies in until it is copied out, and blocks pinned go past the
        // cache's capacity: one call for a peer's whole `SpendOutputs` (thousands of coins spread over a
        // shard's blocks) held up to one 32 KiB block per key at once, and the freed blocks stayed in
        // glibc's heap as holes (446 MiB of heap on 32M txs, ~75 of it RocksDB's accounting). So a call
        // reads 256 keys at a time, all of them at one snapshot, so that it stays one view of the
        // database, as one `MultiGet` is (a write landing between two chunks is in neither).
        let handle = self.handle(cf);
        let own_snapshot =
            (snapshot.is_none() && sorted.len() > MULTI_GET_CHUNK).then(|| self.db.snapshot());
        let read = read_options(snapshot.or(own_snapshot.as_ref()));
        let mut chunks = sorted.chunks(MULTI_GET_CHUNK).peekable();
        while let Some(chunk) = chunks.next() {
            let answers = self.db.batched_multi_get_cf_opt(
                handle,
                chunk.iter().map(|&(_, key, _)| key),
                true,
                &read,
            );
            for (&(_, _, i), value) in chunk.iter().zip(answers) {
                values[i] = value.map_err(engine)?.map(|v| v.to_vec());
            }
            if chunks.peek().is_some() {
                between_chunks();
            }
        }
        Ok(values)
    }

    pub fn open(path: &Path) -> Result<RocksStore, StoreError> {
        RocksStore::open_with(path, WriteMode::Settled)
    }

    /// Opens the database for a shard that a full compaction will rewrite anyway: no compression until
    /// [`Store::set_compression`] turns it on, no automatic compaction of `history` and `outspends` until
    /// [`Store::resume_auto_compactions`]. Switching after opening instead was ~3% of a backfill's CPU:
    /// every `SetOptions` call, one per column family and shard, writes RocksDB's options file and parses
    /// it back to check it.
    pub fn open_for_backfill(path: &Path) -> Result<RocksStore, StoreError> {
        RocksStore::open_with(path, WriteMode::Backfill)
    }

    fn open_with(path: &Path, mode: WriteMode) -> Result<RocksStore, StoreError> {
        let mut options = Options::default();
        options.create_if_missing(true);
        options.create_missing_column_families(true);
        options.set_max_background_jobs(2);
        options.set_write_buffer_manager(shared_write_buffers());
        options.set_max_open_files(256);
        options.set_allow_mmap_reads(MMAP_READS.load(std::sync::atomic::Ordering::Relaxed));
        // One writer per shard: the plain (non-CAS) skiplist insert is cheaper.
        options.set_allow_concurrent_memtable_write(false);
        // Backfill blocks are written without the WAL (`write_unlogged`): every flush must then take all
        // column families together, or a crash could keep a block's history rows but not its checkpoint.
        options.set_atomic_flush(true);
        // A diagnostic: RocksDB's counters (block cache hits, misses and bytes by block kind, ...) written
        // to each shard's `LOG` every 5 s. How the README's figures of what a backfill reads were taken.
        if std::env::var_os("CHAINIDX_ROCKS_STATS").is_some() {
            options.enable_statistics();
            options.set_stats_dump_period_sec(5);
        }
        let on_disk = DB::list_cf(&options, path).unwrap_or_default();
        let retired = RETIRED_CFS
            .iter()
            .filter(|name| on_disk.iter().any(|cf| cf == *name))
            .map(|name| ColumnFamilyDescriptor::new(*name, Options::default()));
        let descriptors = Cf::ALL
            .iter()
            .map(|cf| {
                ColumnFamilyDescriptor::new(cf.name(), cf_options(*cf, TableWriter::Database, mode))
            })
            .chain(retired);
        let db = DB::open_cf_descriptors(&options, path, descriptors).map_err(engine)?;
        let bulk = path.join(BULK_DIR);
        if bulk.exists() {
            std::fs::remove_dir_all(&bulk).map_err(|e| StoreError::Engine(e.to_string()))?;
        }
        std::fs::create_dir_all(&bulk).map_err(|e| StoreError::Engine(e.to_string()))?;
        Ok(RocksStore { db })
    }

    /// Bytes of SST files per column family (benchmarks print where the bytes on disk go).
    pub fn sst_bytes_per_cf(&self) -> Vec<(Cf, u64)> {
        Cf::ALL
            .iter()
            .map(|cf| {
                let bytes = self
                    .db
                    .property_int_value_cf(self.handle(*cf), "rocksdb.total-sst-files-size")
                    .ok()
                    .flatten()
                    .unwrap_or(0);
                (*cf, bytes)
            })
            .collect()
    }

    fn rocks_batch(&self, batch: &Batch) -> rocksdb::WriteBatch {
        // Each column family looked up once per batch, not once per row: `cf_handle` searches a map by
        // name, which was ~1 in 8 of a backfill's `memcmp` calls (a window's stats are a merge per address).
        // Indexed by `cf as usize`: `Cf::ALL` is in declaration order (a test in `chainidx_core::store` checks).
        let handles = Cf::ALL.map(|cf| self.handle(cf));
        let handle = |cf: Cf| handles[cf as usize];
        let mut rocks_batch = rocksdb::WriteBatch::default();
        for op in batch.ops() {
            match op {
                Op::Put(cf, key, value) => rocks_batch.put_cf(handle(cf), key, value),
                Op::Delete(cf, key) => rocks_batch.delete_cf(handle(cf), key),
                Op::Merge(cf, key, value) => rocks_batch.merge_cf(handle(cf), key, value),
                Op::DeleteRange(cf, from, to) => rocks_batch.delete_range_cf(handle(cf), from, to),
            }
        }
        rocks_batch
    }

    /// RocksDB's count of failed flushes and compactions since the database opened.
    fn background_errors(&self) -> Result<u64, StoreError> {
        Ok(self
            .db
            .property_int_value("rocksdb.background-errors")
            .map_err(engine)?
            .unwrap_or(0))
    }

    /// [`Store::bulk_load`]: one table file per column family, ingested in turn.
    fn ingest_sorted(&self, batch: &Batch, scratch: &mut SortScratch) -> Result<(), StoreError> {
        let mut puts = batch.sorted_puts(scratch).map_err(|cf| {
            StoreError::Engine(format!("bulk load into {} takes puts only", cf.name()))
        })?;
        let mut gathered = GatheredRows::default();
        let mut next = puts.gather(GATHER_ROWS, &mut gathered);
        while let Some(cf) = next {
            let path = self.db.path().join(BULK_DIR).join(format!(
                "{}-{}.sst",
                cf.name(),
                BULK_FILES.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            ));
            // The table format of the column family (filter, block size), uncompressed: the writer would
            // use the bottommost level's compression, but these files go to upper levels and are
            // compressed when compaction brings them down.
            let options = cf_options(cf, TableWriter::Ingestion, WriteMode::Backfill);
            let mut writer = rocksdb::SstFileWriter::create(&options);
            writer.open(&path).map_err(engine)?;
            while next == Some(cf) {
                for (key, value) in gathered.rows() {
                    writer.put(key, value).map_err(engine)?;
                }
                next = puts.gather(GATHER_ROWS, &mut gathered);
            }
            writer.finish().map_err(engine)?;
            let mut ingest = rocksdb::IngestExternalFileOptions::default();
            ingest.set_move_files(true);
            self.db
                .ingest_external_file_cf_opts(self.handle(cf), &ingest, vec![&path])
                .map_err(engine)?;
        }
        Ok(())
    }

    fn handle(&self, cf: Cf) -> &rocksdb::ColumnFamily {
        self.db
            .cf_handle(cf.name())
            .expect("every column family is created at open")
    }
}

/// Keys per `MultiGet` call: at most this many blocks pinned at once (8 MiB of 32 KiB blocks); RocksDB
/// batches its reads 32 keys at a time anyway.
const MULTI_GET_CHUNK: usize = 256;

/// `items` in the order of their keys, equal keys in the order given, each with its key's 16-byte prefix.
/// Keys start with 8–16 random or height bytes, so comparing that prefix as one integer settles almost
/// every comparison without touching the keys (a plain sort spent most of its time in `memcmp`). For
/// `multi_get`'s keys; bulk loads sort the same way in `Batch::sorted_puts`, in memory they keep.
fn sort_by_key<'a, T>(items: impl Iterator<Item = (&'a [u8], T)>) -> Vec<(u128, &'a [u8], T)> {
    let mut sorted: Vec<(u128, usize, &[u8], T)> = items
        .enumerate()
        .map(|(i, (key, item))| (key_prefix(key), i, key, item))
        .collect();
    sorted.sort_unstable_by(|a, b| a.0.cmp(&b.0).then_with(|| a.2.cmp(b.2)).then(a.1.cmp(&b.1)));
    sorted
        .into_iter()
        .map(|(prefix, _, key, item)| (prefix, key, item))
        .collect()
}

impl Reads for RocksStore {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.get_at(cf, key, None)
    }

    fn multi_get(&self, cf: Cf, keys: &[&[u8]]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        self.multi_get_chunked(cf, keys, None, || {})
    }

    fn scan(
        &self,
        cf: Cf,
        prefix: &[u8],
        from: ScanFrom<'_>,
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StoreError> {
        self.scan_with(cf, prefix, from, true, None, visit)
    }
}

/// A RocksDB snapshot of a shard's database: what [`Store::snapshot`] hands a query.
struct RocksSnapshot<'a> {
    store: &'a RocksStore,
    snapshot: rocksdb::Snapshot<'a>,
}

impl Reads for RocksSnapshot<'_> {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.store.get_at(cf, key, Some(&self.snapshot))
    }

    fn multi_get(&self, cf: Cf, keys: &[&[u8]]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        self.store
            .multi_get_chunked(cf, keys, Some(&self.snapshot), || {})
    }

    fn scan(
        &self,
        cf: Cf,
        prefix: &[u8],
        from: ScanFrom<'_>,
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StoreError> {
        self.store
            .scan_with(cf, prefix, from, true, Some(&self.snapshot), visit)
    }
}

impl Store for RocksStore {
    fn snapshot(&self) -> Box<dyn Reads + '_> {
        Box::new(RocksSnapshot {
            store: self,
            snapshot: self.db.snapshot(),
        })
    }

    fn write(&self, batch: Batch, sync: bool) -> Result<(), StoreError> {
        let mut options = WriteOptions::default();
        options.set_sync(sync);
        self.db
            .write_opt(self.rocks_batch(&batch), &options)
            .map_err(engine)
    }

    fn write_unlogged(&self, batch: &Batch) -> Result<(), StoreError> {
        let mut options = WriteOptions::default();
        options.disable_wal(true);
        self.db
            .write_opt(self.rocks_batch(batch), &options)
            .map_err(engine)
    }

    fn bulk_load(&self, batch: &Batch) -> Result<(), StoreError> {
        let mut scratch = SORT_SCRATCH
            .lock()
            .expect("sort scratch lock")
            .pop()
            .unwrap_or_default();
        let written = self.ingest_sorted(batch, &mut scratch);
        SORT_SCRATCH
            .lock()
            .expect("sort scratch lock")
            .push(scratch);
        written
    }

    fn memory_usage(&self) -> Option<EngineMemory> {
        let stats =
            rocksdb::perf::get_memory_usage_stats(Some(&[&self.db]), Some(&[shared_block_cache()]))
                .ok()?;
        Some(EngineMemory {
            memtable_bytes: stats.mem_table_total,
            table_reader_bytes: stats.mem_table_readers_total,
            shared_cache_bytes: stats.cache_total,
        })
    }

    fn flush(&self) -> Result<(), StoreError> {
        let handles: Vec<_> = Cf::ALL.iter().map(|cf| self.handle(*cf)).collect();
        self.db
            .flush_cfs_opt(&handles, &rocksdb::FlushOptions::default())
            .map_err(engine)
    }

    /// Every column family fully, bottommost files too: files ingested straight into the bottommost level
    /// were written uncompressed, and only a forced rewrite compresses them.
    fn compact(&self) -> Result<(), StoreError> {
        // The count is cumulative since the database opened: only errors this compaction adds fail it.
        let errors_before = self.background_errors()?;
        let mut options = rocksdb::CompactOptions::default();
        options.set_bottommost_level_compaction(rocksdb::BottommostLevelCompaction::Force);
        // It can take minutes; meanwhile the shard may be following the tip, whose flushes still need
        // RocksDB's own compactions.
        options.set_exclusive_manual_compaction(false);
        for cf in Cf::ALL {
            self.db
                .compact_range_cf_opt(self.handle(cf), None::<&[u8]>, None::<&[u8]>, &options);
        }
        // `compact_range` returns no error here; a failed compaction (disk full) leaves one behind.
        let errors = self.background_errors()? - errors_before;
        if errors > 0 {
            return Err(StoreError::Engine(format!(
                "{errors} background errors during compaction (see the RocksDB LOG in {})",
                self.db.path().display()
            )));
        }
        Ok(())
    }

    fn set_compression(&self, enabled: bool) -> Result<(), StoreError> {
        let compression = if enabled { "kZSTD" } else { "kNoCompression" };
        for cf in Cf::ALL {
            self.db
                .set_options_cf(self.handle(cf), &[("bottommost_compression", compression)])
                .map_err(engine)?;
        }
        Ok(())
    }

    fn resume_auto_compactions(&self) -> Result<(), StoreError> {
        for cf in LEFT_TO_FULL_COMPACTION {
            self.db
                .set_options_cf(self.handle(cf), &[("disable_auto_compactions", "false")])
                .map_err(engine)?;
        }
        Ok(())
    }

    fn scan_once(
        &self,
        cf: Cf,
        prefix: &[u8],
        from: ScanFrom<'_>,
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StoreError> {
        self.scan_with(cf, prefix, from, false, None, visit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_rows_live_beside_history_rows_and_the_address_filter_keeps_them_apart() {
        use chainidx_core::schema::{history_key, parse_history_key, stats_key};
        use chainidx_proto::AddressStats;
        use prost::Message;
        let dir = tempfile::tempdir().unwrap();
        let store = RocksStore::open(dir.path()).unwrap();
        let (a, b, absent) = ([1u8; 32], [2u8; 32], [3u8; 32]);
        let mut rows = Batch::default();
        for (sh, height) in [(a, 5), (a, 7), (b, 6)] {
            rows.put(Cf::History, history_key(&sh, height, 0), [0]);
        }
        store.bulk_load(&rows).unwrap();
        for funded in [10, 32] {
            let mut batch = Batch::default();
            let delta = AddressStats {
                funded_sum: funded,
                funded_txo_count: 1,
                ..Default::default()
            };
            batch.merge(Cf::History, stats_key(&a), delta.encode_to_vec());
            store.write(batch, false).unwrap();
        }
        for compacted in [false, true] {
            if compacted {
                store.compact().unwrap();
            }
            let stats = store.get(Cf::History, &stats_key(&a)).unwrap().unwrap();
            let stats = AddressStats::decode(stats.as_slice()).unwrap();
            assert_eq!((stats.funded_sum, stats.funded_txo_count), (42, 2));
            assert_eq!(store.get(Cf::History, &stats_key(&b)).unwrap(), None);
            assert_eq!(store.get(Cf::History, &stats_key(&absent)).unwrap(), None);
            for from in [ScanFrom::First, ScanFrom::Last] {
                let mut heights = Vec::new();
                let mut keys = 0;
                store
                    .scan(Cf::History, &stats_key(&a), from, &mut |key, _| {
                        keys += 1;
                        heights.extend(parse_history_key(key).map(|(height, _)| height));
                        true
                    })
                    .unwrap();
                heights.sort_unstable();
                // The stats row and a's two history rows; never b's.
                assert_eq!((keys, heights), (3, vec![5, 7]));
            }
        }
    }

    #[test]
    fn a_database_with_a_retired_column_family_still_opens() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut options = Options::default();
            options.create_if_missing(true);
            options.create_missing_column_families(true);
            let families = Cf::ALL
                .iter()
                .map(|cf| cf.name())
                .chain(RETIRED_CFS.iter().copied())
                .map(|name| ColumnFamilyDescriptor::new(name, Options::default()));
            let db = DB::open_cf_descriptors(&options, dir.path(), families).unwrap();
            db.put_cf(&db.cf_handle("stats").unwrap(), [7u8; 12], b"old")
                .unwrap();
        }
        // Without the retired family among the descriptors RocksDB refuses to open the database at all.
        let store = RocksStore::open(dir.path()).unwrap();
        assert_eq!(store.get(Cf::History, &[7u8; 12]).unwrap(), None);
    }

    #[test]
    fn multi_get_answers_in_the_order_asked() {
        let dir = tempfile::tempdir().unwrap();
        let store = RocksStore::open(dir.path()).unwrap();
        let mut batch = Batch::default();
        // Keys longer than the 16 bytes compared as one integer, differing only after them.
        let long = |tail: u8| [vec![9u8; 16], vec![tail]].concat();
        for (key, value) in [
            (long(2), b"two"),
            (long(1), b"one"),
            (b"a".to_vec(), b"aaa"),
        ] {
            batch.put(Cf::Outputs, key, value);
        }
        store.write(batch, false).unwrap();
        let (one, two) = (long(1), long(2));
        let keys: Vec<&[u8]> = vec![&two, b"zz", &one, b"a", &two, b""];
        let got = store.multi_get(Cf::Outputs, &keys).unwrap();
        let expected: Vec<Option<Vec<u8>>> = keys
            .iter()
            .map(|key| store.get(Cf::Outputs, key).unwrap())
            .collect();
        assert_eq!(got, expected);
        assert_eq!(got[0].as_deref(), Some(&b"two"[..]));
        assert_eq!(got[2].as_deref(), Some(&b"one"[..]));
        assert_eq!(got[1], None);
    }

    #[test]
    fn multi_get_answers_in_the_order_asked_across_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let store = RocksStore::open(dir.path()).unwrap();
        let mut batch = Batch::default();
        // Every third key present; asked in an order unlike the keys' own.
        let key = |n: u32| n.wrapping_mul(2_654_435_761).to_be_bytes();
        let asked: Vec<[u8; 4]> = (0..3 * MULTI_GET_CHUNK as u32 + 7).map(key).collect();
        for (n, key) in asked.iter().enumerate().filter(|(n, _)| n % 3 == 0) {
            batch.put(Cf::Outputs, key, n.to_string().into_bytes());
        }
        store.write(batch, false).unwrap();
        let refs: Vec<&[u8]> = asked.iter().map(|key| key.as_slice()).collect();
        let got = store.multi_get(Cf::Outputs, &refs).unwrap();
        assert_eq!(got.len(), asked.len());
        for (n, value) in got.iter().enumerate() {
            let expected = (n % 3 == 0).then(|| n.to_string().into_bytes());
            assert_eq!(value, &expected, "key {n}");
        }
    }

    #[test]
    fn multi_get_is_one_view_across_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let store = RocksStore::open(dir.path()).unwrap();
        let keys: Vec<[u8; 4]> = (0..2 * MULTI_GET_CHUNK as u32)
            .map(u32::to_be_bytes)
            .collect();
        let mut batch = Batch::default();
        for key in &keys {
            batch.put(Cf::Outputs, key, b"before");
        }
        store.write(batch, false).unwrap();
        let refs: Vec<&[u8]> = keys.iter().map(|key| key.as_slice()).collect();
        // Between the two chunks, a write to the last key and a delete of the one before it.
        let got = store
            .multi_get_chunked(Cf::Outputs, &refs, None, || {
                let mut batch = Batch::default();
                batch.put(Cf::Outputs, keys[keys.len() - 1], b"after");
                batch.delete(Cf::Outputs, keys[keys.len() - 2]);
                store.write(batch, false).unwrap();
            })
            .unwrap();
        assert!(
            got.iter()
                .all(|value| value.as_deref() == Some(&b"before"[..]))
        );
        // The write did land.
        let now = store.multi_get(Cf::Outputs, &refs).unwrap();
        assert_eq!(now[keys.len() - 1].as_deref(), Some(&b"after"[..]));
        assert_eq!(now[keys.len() - 2], None);
    }

    #[test]
    fn a_snapshot_reads_the_rows_as_they_were_when_it_was_taken() {
        let dir = tempfile::tempdir().unwrap();
        let store = RocksStore::open(dir.path()).unwrap();
        let mut batch = Batch::default();
        for key in [b"a1", b"a2", b"a3"] {
            batch.put(Cf::History, key, b"before");
        }
        store.write(batch, false).unwrap();
        let snapshot = store.snapshot();
        let mut batch = Batch::default();
        batch.put(Cf::History, b"a1", b"after");
        batch.delete(Cf::History, b"a2");
        batch.put(Cf::History, b"a4", b"new");
        store.write(batch, false).unwrap();
        // A flush moves the rows into a table file: the snapshot must still hold the old ones.
        store.flush().unwrap();

        let rows = |reads: &dyn Reads| {
            let mut rows = Vec::new();
            reads
                .scan(Cf::History, b"a", ScanFrom::First, &mut |key, value| {
                    rows.push((key.to_vec(), value.to_vec()));
                    true
                })
                .unwrap();
            rows
        };
        let row = |key: &[u8], value: &[u8]| (key.to_vec(), value.to_vec());
        assert_eq!(
            rows(&*snapshot),
            [
                row(b"a1", b"before"),
                row(b"a2", b"before"),
                row(b"a3", b"before")
            ]
        );
        assert_eq!(
            rows(&store),
            [
                row(b"a1", b"after"),
                row(b"a3", b"before"),
                row(b"a4", b"new")
            ]
        );
        let keys: [&[u8]; 3] = [b"a1", b"a2", b"a4"];
        assert_eq!(
            snapshot.multi_get(Cf::History, &keys).unwrap(),
            [Some(b"before".to_vec()), Some(b"before".to_vec()), None]
        );
        assert_eq!(
            store.multi_get(Cf::History, &keys).unwrap(),
            [Some(b"after".to_vec()), None, Some(b"new".to_vec())]
        );
        assert_eq!(
            snapshot.get(Cf::History, b"a2").unwrap().as_deref(),
            Some(&b"before"[..])
        );
        assert_eq!(store.get(Cf::History, b"a2").unwrap(), None);
    }

    #[test]
    fn a_compaction_with_compression_off_leaves_the_files_uncompressed() {
        let dir = tempfile::tempdir().unwrap();
        let store = RocksStore::open_for_backfill(dir.path()).unwrap();
        let sst_bytes = |store: &RocksStore| {
            store
                .sst_bytes_per_cf()
                .iter()
                .find(|(cf, _)| *cf == Cf::History)
                .unwrap()
                .1
        };
        // Compressible rows: a counter and a run of zeros.
        let rows = |batch: &mut Batch, pass: u32| {
            for i in 0..20_000u32 {
                batch.put(
                    Cf::History,
                    [pass.to_be_bytes(), i.to_be_bytes()].concat(),
                    [0u8; 64],
                );
            }
        };
        let write_and_compact = |compression: Option<bool>, pass: u32| {
            if let Some(compression) = compression {
                store.set_compression(compression).unwrap();
            }
            let mut batch = Batch::default();
            rows(&mut batch, pass);
            store.write(batch, false).unwrap();
            store.compact().unwrap();
            sst_bytes(&store)
        };
        // As opened: off.
        let uncompressed = write_and_compact(None, 0);
        assert!(uncompressed > 20_000 * 64, "{uncompressed} bytes");
        // Twice the rows, now all rewritten compressed.
        let compressed = write_and_compact(Some(true), 1);
        assert!(
            compressed < uncompressed / 4,
            "{compressed} vs {uncompressed} bytes"
        );
    }

    #[test]
    fn a_backfilling_store_leaves_history_and_outspends_to_the_full_compaction() {
        let l0_files = |store: &RocksStore, cf: Cf| {
            let mut wait = rocksdb::WaitForCompactOptions::default();
            wait.set_timeout(30_000_000);
            store.db.wait_for_compact(&wait).unwrap();
            store
                .db
                .property_int_value_cf(store.handle(cf), "rocksdb.num-files-at-level0")
                .unwrap()
                .unwrap()
        };
        // Files whose keys interleave, as windows' rows do: each lands in L0 (but the first,
        // overlapping nothing, which goes straight to the bottom).
        let ingest_files = |store: &RocksStore, files: std::ops::Range<u32>| {
            for file in files {
                let mut batch = Batch::default();
                for cf in [Cf::History, Cf::Outspends, Cf::Outputs] {
                    for i in 0..100u32 {
                        batch.put(cf, [i.to_be_bytes(), file.to_be_bytes()].concat(), []);
                    }
                }
                store.bulk_load(&batch).unwrap();
            }
        };
        // Past the L0 trigger (16): left alone while backfilling, compacted once resumed; `outputs`,
        // which a backfill reads, is compacted all along.
        let dir = tempfile::tempdir().unwrap();
        let store = RocksStore::open_for_backfill(dir.path()).unwrap();
        ingest_files(&store, 0..20);
        assert_eq!(l0_files(&store, Cf::History), 19);
        assert_eq!(l0_files(&store, Cf::Outspends), 19);
        assert!(l0_files(&store, Cf::Outputs) < 16);
        store.resume_auto_compactions().unwrap();
        ingest_files(&store, 20..21);
        assert!(l0_files(&store, Cf::History) < 16);
        assert!(l0_files(&store, Cf::Outspends) < 16);
        // A settled database compacts them on its own from the start.
        let dir = tempfile::tempdir().unwrap();
        let store = RocksStore::open(dir.path()).unwrap();
        ingest_files(&store, 0..20);
        assert!(l0_files(&store, Cf::History) < 16);
        assert!(l0_files(&store, Cf::Outspends) < 16);
    }

    #[test]
    fn bulk_load_keeps_the_last_of_equal_keys_and_refuses_anything_but_puts() {
        let dir = tempfile::tempdir().unwrap();
        let store = RocksStore::open(dir.path()).unwrap();
        let mut batch = Batch::default();
        batch.put(Cf::Txs, b"b", b"first");
        batch.put(Cf::Txs, b"a", b"only");
        batch.put(Cf::Txs, b"b", b"second");
        batch.put(Cf::History, b"h", b"row");
        store.bulk_load(&batch).unwrap();
        assert_eq!(store.get(Cf::Txs, b"a").unwrap().unwrap(), b"only");
        assert_eq!(store.get(Cf::Txs, b"b").unwrap().unwrap(), b"second");
        assert_eq!(store.get(Cf::History, b"h").unwrap().unwrap(), b"row");
        // The files were moved into the database: nothing is left behind to clean up.
        assert_eq!(
            std::fs::read_dir(dir.path().join(BULK_DIR))
                .unwrap()
                .count(),
            0
        );

        let mut batch = Batch::default();
        batch.delete(Cf::Txs, b"a");
        assert!(store.bulk_load(&batch).is_err());
        assert!(store.get(Cf::Txs, b"a").unwrap().is_some());
    }

    #[test]
    fn scan_once_reads_around_the_block_cache_and_scan_fills_it() {
        use rocksdb::perf::{PerfContext, PerfMetric, PerfStatsLevel, set_perf_stats};
        let dir = tempfile::tempdir().unwrap();
        let store = RocksStore::open(dir.path()).unwrap();
        // ~2 MB of rows in one table file: some 60 blocks of 32 KiB.
        let mut batch = Batch::default();
        for i in 0u32..20_000 {
            batch.put(Cf::Pending, i.to_be_bytes(), [i as u8; 100]);
        }
        store.bulk_load(&batch).unwrap();
        // The perf context is per thread, so other tests' reads do not count here.
        set_perf_stats(PerfStatsLevel::EnableCount);
        let mut perf = PerfContext::default();
        let mut blocks_read = |once: bool| {
            perf.reset();
            let mut rows = 0;
            let visit = &mut |_: &[u8], _: &[u8]| {
                rows += 1;
                true
            };
            if once {
                store.scan_once(Cf::Pending, &[], ScanFrom::First, visit)
            } else {
                store.scan(Cf::Pending, &[], ScanFrom::First, visit)
            }
            .unwrap();
            assert_eq!(rows, 20_000);
            perf.metric(PerfMetric::BlockReadCount)
        };
        let first = blocks_read(true);
        assert!(first > 50, "{first} blocks read");
        // Nothing the first pass read was kept: the second reads every data block again.
        assert!(blocks_read(true) + 5 >= first);
        assert!(blocks_read(false) + 5 >= first);
        // A cached scan kept them.
        assert_eq!(blocks_read(false), 0);
        set_perf_stats(PerfStatsLevel::Disable);
    }
}
