//! The storage trait the indexer writes through. Free of RocksDB types (as TiKV's engine traits are), so the
//! indexing and query logic can be read and tested without knowing the engine.

use crate::schema::Cf;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage engine: {0}")]
    Engine(String),
    #[error("corrupt row in {cf}: {detail}")]
    Corrupt { cf: &'static str, detail: String },
    #[error("{0}")]
    Incompatible(String),
}

/// One write of a [`Batch`], borrowing its bytes.
pub enum Op<'a> {
    Put(Cf, &'a [u8], &'a [u8]),
    Delete(Cf, &'a [u8]),
    /// Combines the value with the stored one by the column family's merge rule, without reading it first.
    /// Only `history` has one, for its stats rows: a field-wise sum of `AddressStats` (the engine is given
    /// the rule).
    Merge(Cf, &'a [u8], &'a [u8]),
    /// Deletes every key in `[from, to)`: one range tombstone instead of a delete per key.
    DeleteRange(Cf, &'a [u8], &'a [u8]),
}

#[derive(Clone, Copy)]
enum Kind {
    Put,
    Delete,
    Merge,
    DeleteRange,
}

/// Where one op's key and value (or range end) lie in [`Batch::bytes`]. 16 bytes: a window holds a
/// million of them (24 with a `u32` key length).
#[derive(Clone, Copy)]
struct Entry {
    start: u64,
    value_len: u32,
    key_len: u16,
    kind: Kind,
    cf: Cf,
}
const _: () = assert!(std::mem::size_of::<Entry>() == 16);

/// Writes applied atomically: a block's rows and its checkpoint land together or not at all.
///
/// Keys and values are copied back to back into one buffer rather than kept as two allocations per row:
/// a window holds a million rows, and their allocation, freeing and scattered reads while sorting
/// (`Store::bulk_load`) were a tenth of the backfill's CPU.
#[derive(Clone, Default)]
pub struct Batch {
    bytes: Vec<u8>,
    entries: Vec<Entry>,
}

impl Batch {
    /// Room for `ops` ops of `bytes` key and value bytes in all. A window's batch grows to tens of MB:
    /// growing it by doubling copied it ~6 times into fresh pages, which the kernel zeroes first
    /// (`clear_page_erms` and `memmove` were ~10% of a worker's CPU). Room not written is never touched.
    pub fn with_capacity(ops: usize, bytes: usize) -> Batch {
        Batch {
            bytes: Vec::with_capacity(bytes),
            entries: Vec::with_capacity(ops),
        }
    }

    /// Forgets every op but keeps the memory, for the next window.
    pub fn clear(&mut self) {
        self.bytes.clear();
        self.entries.clear();
    }

    pub fn put(&mut self, cf: Cf, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) {
        self.push(Kind::Put, cf, key.as_ref(), value.as_ref());
    }

    pub fn delete(&mut self, cf: Cf, key: impl AsRef<[u8]>) {
        self.push(Kind::Delete, cf, key.as_ref(), &[]);
    }

    pub fn merge(&mut self, cf: Cf, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) {
        self.push(Kind::Merge, cf, key.as_ref(), value.as_ref());
    }

    pub fn delete_range(&mut self, cf: Cf, from: impl AsRef<[u8]>, to: impl AsRef<[u8]>) {
        self.push(Kind::DeleteRange, cf, from.as_ref(), to.as_ref());
    }

    fn push(&mut self, kind: Kind, cf: Cf, key: &[u8], value: &[u8]) {
        let start = self.bytes.len() as u64;
        self.bytes.extend_from_slice(key);
        self.bytes.extend_from_slice(value);
        self.entries.push(Entry {
            start,
            value_len: u32::try_from(value.len()).expect("a value under 4 GiB"),
            key_len: u16::try_from(key.len()).expect("a key under 64 KiB"),
            kind,
            cf,
        });
    }

    /// The ops in the order they were added.
    pub fn ops(&self) -> impl ExactSizeIterator<Item = Op<'_>> + '_ {
        (0..self.entries.len()).map(|i| self.op(i))
    }

    /// The `i`th op added.
    pub fn op(&self, i: usize) -> Op<'_> {
        let entry = self.entries[i];
        let start = entry.start as usize;
        let key_end = start + entry.key_len as usize;
        let key = &self.bytes[start..key_end];
        let value = &self.bytes[key_end..key_end + entry.value_len as usize];
        match entry.kind {
            Kind::Put => Op::Put(entry.cf, key, value),
            Kind::Delete => Op::Delete(entry.cf, key),
            Kind::Merge => Op::Merge(entry.cf, key, value),
            Kind::DeleteRange => Op::DeleteRange(entry.cf, key, value),
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Every put, grouped by column family (in declaration order) and in key order within each, the last
    /// of equal keys only: the rows of table files to ingest. Sorted in `scratch`, whose memory the caller
    /// keeps for the next batch. `Err` names the column family of an op that is not a put.
    pub fn sorted_puts<'a>(&'a self, scratch: &'a mut SortScratch) -> Result<SortedPuts<'a>, Cf> {
        // Rows are placed by column family first (a counting sort), then each family's rows are sorted
        // by key unless they already are: rows keyed by height (`prevouts`, `pending`, `tx_positions`)
        // are added in key order, about a quarter of a window's.
        let mut counts = [0usize; Cf::ALL.len()];
        for entry in &self.entries {
            if !matches!(entry.kind, Kind::Put) {
                return Err(entry.cf);
            }
            counts[entry.cf as usize] += 1;
        }
        let mut starts = [0usize; Cf::ALL.len()];
        for cf in 1..starts.len() {
            starts[cf] = starts[cf - 1] + counts[cf - 1];
        }
        let rows = &mut scratch.rows;
        rows.clear();
        rows.resize(self.entries.len(), SortRow::default());
        let mut fill = starts;
        for entry in &self.entries {
            let key = &self.bytes[entry.start as usize..][..entry.key_len as usize];
            assert!(entry.start < 1 << 56, "a batch holds under 2^56 bytes");
            rows[fill[entry.cf as usize]] = SortRow {
                prefix: key_prefix(key),
                cf_and_start: ((entry.cf as u64) << 56) | entry.start,
                key_len: u32::from(entry.key_len),
                value_len: entry.value_len,
            };
            fill[entry.cf as usize] += 1;
        }
        let key = |row: &SortRow| &self.bytes[row.start()..][..row.key_len as usize];
        // Rows start in the order they were added: on equal keys, the later one sorts last.
        let order = |a: &SortRow, b: &SortRow| {
            a.prefix
                .cmp(&b.prefix)
                .then_with(|| key(a).cmp(key(b)))
                .then(a.start().cmp(&b.start()))
        };
        for (start, count) in starts.into_iter().zip(counts) {
            let family = &mut rows[start..start + count];
            if !family.is_sorted_by(|a, b| order(a, b).is_le()) {
                family.sort_unstable_by(order);
            }
        }
        Ok(SortedPuts {
            batch: self,
            rows,
            next: 0,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// A key's first 16 bytes (zero-padded) as one integer that sorts like them: sorts compare it first and
/// read the keys only on a tie (a plain sort of keys spent most of its time in `memcmp`).
pub fn key_prefix(key: &[u8]) -> u128 {
    let mut prefix = [0u8; 16];
    let n = key.len().min(16);
    prefix[..n].copy_from_slice(&key[..n]);
    u128::from_be_bytes(prefix)
}

/// A put while its batch is sorted ([`Batch::sorted_puts`]): its first 16 key bytes as one integer that
/// sorts like them, so that most comparisons never read the keys (a plain sort spent most of its time in
/// `memcmp`; 16 bytes hold a whole `outputs` or `outspends` key, and a `history` key up to its height),
/// its column family in the top byte of where its bytes are, and their lengths. 32 bytes, no borrow: the
/// memory can outlive the batch.
#[derive(Clone, Copy, Default)]
struct SortRow {
    prefix: u128,
    cf_and_start: u64,
    key_len: u32,
    value_len: u32,
}

impl SortRow {
    fn cf(&self) -> u8 {
        (self.cf_and_start >> 56) as u8
    }

    fn start(&self) -> usize {
        (self.cf_and_start & ((1 << 56) - 1)) as usize
    }
}
const _: () = assert!(std::mem::size_of::<SortRow>() == 32);

/// Memory for [`Batch::sorted_puts`], kept from one window to the next. A window's sort takes ~30 MB;
/// allocated afresh, its pages can go back to the OS between windows and be zeroed again (with eight
/// workers on two cores, page faults were 15% of a worker's backfill CPU). With the sort rows halved to
/// 32 bytes and kept: 385 → 356 page faults per 1,000 txs for eight workers, 154 → 148 for one.
#[derive(Default)]
pub struct SortScratch {
    rows: Vec<SortRow>,
}

/// The puts of a batch in (column family, key) order; see [`Batch::sorted_puts`].
pub struct SortedPuts<'a> {
    batch: &'a Batch,
    rows: &'a [SortRow],
    next: usize,
}

impl<'a> SortedPuts<'a> {
    /// The next row to write: of equal keys only the last added.
    fn next_row(&mut self) -> Option<SortRow> {
        let bytes = &self.batch.bytes;
        let key = |row: &SortRow| &bytes[row.start()..][..row.key_len as usize];
        loop {
            let row = *self.rows.get(self.next)?;
            self.next += 1;
            // A key whose prefix differs from the next one's cannot equal it.
            let later = self.rows.get(self.next);
            if later.is_some_and(|later| {
                later.cf() == row.cf() && later.prefix == row.prefix && key(later) == key(&row)
            }) {
                continue;
            }
            return Some(row);
        }
    }

    /// Copies the next puts — up to `limit`, all of one column family, which it returns — next to each
    /// other into `into` (emptied first); `None` when none are left.
    ///
    /// Why: the sorted rows' bytes lie scattered over the batch (tens of MB), and a table writer reads
    /// each row's key first to check the order, one cache miss at a time with a whole `Put` between two
    /// of them (`memcmp` in RocksDB's key-order check was ~10% of a backfill's samples). A copy loop
    /// has several of those reads in flight at once, and the writer then reads what is in cache.
    pub fn gather(&mut self, limit: usize, into: &mut GatheredRows) -> Option<Cf> {
        into.bytes.clear();
        into.ends.clear();
        let cf = self.rows.get(self.next)?.cf();
        while into.ends.len() < limit && self.rows.get(self.next).is_some_and(|row| row.cf() == cf)
        {
            let Some(row) = self.next_row() else { break };
            let start = row.start();
            let key_len = row.key_len as usize;
            into.bytes
                .extend_from_slice(&self.batch.bytes[start..][..key_len + row.value_len as usize]);
            let end = into.bytes.len();
            into.ends.push((end - row.value_len as usize, end));
        }
        Some(Cf::ALL[cf as usize])
    }
}

impl<'a> Iterator for SortedPuts<'a> {
    type Item = (Cf, &'a [u8], &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        let row = self.next_row()?;
        let bytes = &self.batch.bytes;
        let key_end = row.start() + row.key_len as usize;
        Some((
            Cf::ALL[row.cf() as usize],
            &bytes[row.start()..key_end],
            &bytes[key_end..][..row.value_len as usize],
        ))
    }
}

/// Puts of one column family copied next to each other in key order ([`SortedPuts::gather`]); the
/// memory is kept for the next chunk.
#[derive(Default)]
pub struct GatheredRows {
    bytes: Vec<u8>,
    /// Per row: where its key ends and where its value ends in `bytes`.
    ends: Vec<(usize, usize)>,
}

impl GatheredRows {
    /// (key, value) in key order.
    pub fn rows(&self) -> impl Iterator<Item = (&[u8], &[u8])> + '_ {
        let mut start = 0;
        self.ends.iter().map(move |&(key_end, value_end)| {
            let row = (&self.bytes[start..key_end], &self.bytes[key_end..value_end]);
            start = value_end;
            row
        })
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }
}

/// An engine's memory accounting ([`Store::memory_usage`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineMemory {
    pub memtable_bytes: u64,
    pub table_reader_bytes: u64,
    /// A cache shared by every database of the process: the same figure from each of them.
    pub shared_cache_bytes: u64,
}

/// Where a scan starts and which way it goes. Keys outside `prefix` end the scan.
pub enum ScanFrom<'a> {
    /// Ascending from the first key with the prefix.
    First,
    /// Descending from the last key with the prefix.
    Last,
    /// Descending from the last key `<= key`.
    AtOrBefore(&'a [u8]),
    /// Ascending from the first key `>= key`.
    AtOrAfter(&'a [u8]),
}

/// Reading rows, from the live database or from one [`Store::snapshot`] of it: query code takes this, so
/// that a query reading several times can read one state throughout.
pub trait Reads {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;

    /// [`Reads::get`] of many keys at once (the engine can share the work of finding them). The RocksDB
    /// engine answers them from one snapshot, so a write landing meanwhile is in all of them or in none; this
    /// default, one `get` per key, does not.
    fn multi_get(&self, cf: Cf, keys: &[&[u8]]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        keys.iter().map(|key| self.get(cf, key)).collect()
    }

    /// Calls `visit(key, value)` for keys starting with `prefix`, in the order `from` says, until it returns false.
    fn scan(
        &self,
        cf: Cf,
        prefix: &[u8],
        from: ScanFrom<'_>,
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StoreError>;
}

pub trait Store: Reads + Send + Sync + 'static {
    /// The rows as they are now, unchanged by later writes, for as long as the view lives: a query that
    /// reads several rows (a page of history, then each tx's place, header and inputs' coins) answers
    /// from one state even while the tip moves or a block is rolled back beside it.
    fn snapshot(&self) -> Box<dyn Reads + '_>;

    /// Atomically applies `batch`. `sync` forces it to stable storage before returning.
    fn write(&self, batch: Batch, sync: bool) -> Result<(), StoreError>;

    /// Applies `batch` atomically but without the write-ahead log: a crash loses it unless a flush came
    /// first. Only for writes that carry their own checkpoint (a backfill block with the shard's
    /// `next_height`), in an engine whose flushes cover every column family at once, so what survives is
    /// always a prefix of the blocks and the checkpoint says which.
    fn write_unlogged(&self, batch: &Batch) -> Result<(), StoreError> {
        self.write(batch.clone(), false)
    }

    /// Writes puts around the memtable: each column family's rows sorted (the last of equal keys wins) into
    /// a table file that the engine takes over as is. Durable on return, but NOT atomic across column
    /// families: only for rows that are the same bytes when written again, whose checkpoint is written
    /// after them (a backfill window's rows). Other ops are refused.
    fn bulk_load(&self, batch: &Batch) -> Result<(), StoreError> {
        self.write(batch.clone(), true)
    }

    /// What the engine holds in memory for this database: (memtables, table readers) in bytes, and the
    /// bytes of a cache it may share with other databases. `None` if the engine does not say.
    fn memory_usage(&self) -> Option<EngineMemory> {
        None
    }

    /// Moves what is buffered in memory to disk; called when a shard finishes a phase, so a worker's
    /// memory holds the shards it is writing, not every shard it ever wrote.
    fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// Rewrites the whole database in its most compact form. Worth it once, when a shard's backfill is over:
    /// until then most of its rows sit in files written uncompressed, about twice the compacted size.
    fn compact(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// Whether the files the engine writes at the bottom of its tree are compressed. Off while a shard
    /// backfills before a full [`Store::compact`], which rewrites (and compresses) every file anyway:
    /// compressing them on the way was ~10% of a backfill's CPU. Not persisted: how an engine opens decides
    /// (RocksDB's `open_for_backfill` opens with it off).
    fn set_compression(&self, _enabled: bool) -> Result<(), StoreError> {
        Ok(())
    }

    /// Lets the engine compact on its own again once the full [`Store::compact`] after a backfill is done.
    /// Until then a backfilling shard leaves the column families the backfill never reads to that
    /// compaction (RocksDB's `open_for_backfill`). Not persisted either.
    fn resume_auto_compactions(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// [`Reads::scan`] for a pass that reads its rows once (a whole column family: `pending`, a txid
    /// filter's keys, the drop of spent coins' rows). The engine need not keep what it reads in its
    /// cache, where it would push out the blocks that lookups come back to.
    fn scan_once(
        &self,
        cf: Cf,
        prefix: &[u8],
        from: ScanFrom<'_>,
        visit: &mut dyn FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), StoreError> {
        self.scan(cf, prefix, from, visit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sorted_puts_group_by_column_family_sort_by_whole_keys_and_keep_the_last_of_equal_keys() {
        for cf in Cf::ALL {
            assert_eq!(Cf::ALL[cf as usize], cf, "ALL is in declaration order");
        }
        let long = |tail: u8| [vec![7u8; 16], vec![tail]].concat();
        let rows: Vec<(Cf, Vec<u8>)> = vec![
            (Cf::Txs, b"b".to_vec()),
            (Cf::Txs, long(2)),
            (Cf::History, b"a".to_vec()),
            (Cf::Txs, b"ab\0".to_vec()),
            (Cf::Txs, long(1)),
            (Cf::Txs, b"ab".to_vec()),
            (Cf::Txs, b"b".to_vec()),
            (Cf::Meta, b"z".to_vec()),
            (Cf::Txs, vec![7u8; 16]),
            (Cf::Txs, vec![7u8; 15]),
            (Cf::Txs, b"a".to_vec()),
            (Cf::Txs, long(1)),
            (Cf::Txs, b"".to_vec()),
        ];
        // Each row's value is its index. The reference: a stable sort that keeps the last of a run.
        let mut expected: Vec<usize> = (0..rows.len()).collect();
        expected.sort_by(|&a, &b| {
            let order = |cf: Cf| Cf::ALL.iter().position(|c| *c == cf);
            (order(rows[a].0), &rows[a].1).cmp(&(order(rows[b].0), &rows[b].1))
        });
        expected.dedup_by(|later, earlier| {
            let same = rows[*later] == rows[*earlier];
            if same {
                *earlier = *later;
            }
            same
        });
        let mut batch = Batch::default();
        for (i, (cf, key)) in rows.iter().enumerate() {
            batch.put(*cf, key, [i as u8]);
        }
        let mut scratch = SortScratch::default();
        // Twice with the same scratch: what the first sort left in it does not leak into the second.
        for _ in 0..2 {
            let got: Vec<(Cf, &[u8], &[u8])> = batch.sorted_puts(&mut scratch).unwrap().collect();
            let got_indices: Vec<usize> =
                got.iter().map(|(_, _, value)| value[0] as usize).collect();
            assert_eq!(got_indices, expected);
            assert_eq!(got.len(), rows.len() - 2, "two keys were written twice");
            for (cf, key, value) in got {
                assert_eq!(
                    (cf, key),
                    (rows[value[0] as usize].0, &rows[value[0] as usize].1[..])
                );
            }
        }
        // Gathered in chunks of 3: the same rows in the same order, no chunk mixing column families.
        let mut puts = batch.sorted_puts(&mut scratch).unwrap();
        let mut gathered = GatheredRows::default();
        let mut chunks = Vec::new();
        while let Some(cf) = puts.gather(3, &mut gathered) {
            assert!((1..=3).contains(&gathered.len()));
            for (key, value) in gathered.rows() {
                chunks.push((cf, key.to_vec(), value[0] as usize));
            }
        }
        let want: Vec<(Cf, Vec<u8>, usize)> = expected
            .iter()
            .map(|&i| (rows[i].0, rows[i].1.clone(), i))
            .collect();
        assert_eq!(chunks, want);
        batch.delete(Cf::Outputs, b"x");
        assert_eq!(batch.sorted_puts(&mut scratch).err(), Some(Cf::Outputs));
    }
}
