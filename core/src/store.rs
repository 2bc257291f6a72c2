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

pub enum Op {
    Put(Cf, Vec<u8>, Vec<u8>),
    Delete(Cf, Vec<u8>),
    /// Combines the value with the stored one by the column family's merge rule, without reading it first.
    /// Only `stats` has one: a field-wise sum of `AddressStats` (the engine is given the rule).
    Merge(Cf, Vec<u8>, Vec<u8>),
    /// Deletes every key in `[from, to)`: one range tombstone instead of a delete per key.
    DeleteRange(Cf, Vec<u8>, Vec<u8>),
}

/// Writes applied atomically: a block's rows and its checkpoint land together or not at all.
#[derive(Default)]
pub struct Batch {
    pub ops: Vec<Op>,
}

impl Batch {
    pub fn put(&mut self, cf: Cf, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.ops.push(Op::Put(cf, key.into(), value.into()));
    }

    pub fn delete(&mut self, cf: Cf, key: impl Into<Vec<u8>>) {
        self.ops.push(Op::Delete(cf, key.into()));
    }

    pub fn merge(&mut self, cf: Cf, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.ops.push(Op::Merge(cf, key.into(), value.into()));
    }

    pub fn delete_range(&mut self, cf: Cf, from: impl Into<Vec<u8>>, to: impl Into<Vec<u8>>) {
        self.ops.push(Op::DeleteRange(cf, from.into(), to.into()));
    }

    pub fn len(&self) -> usize {
        self.ops.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
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

pub trait Store: Send + Sync + 'static {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;

    /// [`Store::get`] of many keys at once (the engine can share the work of finding them).
    fn multi_get(&self, cf: Cf, keys: &[&[u8]]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        keys.iter().map(|key| self.get(cf, key)).collect()
    }

    /// Atomically applies `batch`. `sync` forces it to stable storage before returning.
    fn write(&self, batch: Batch, sync: bool) -> Result<(), StoreError>;

    /// Applies `batch` atomically but without the write-ahead log: a crash loses it unless a flush came
    /// first. Only for writes that carry their own checkpoint (a backfill block with the shard's
    /// `next_height`), in an engine whose flushes cover every column family at once, so what survives is
    /// always a prefix of the blocks and the checkpoint says which.
    fn write_unlogged(&self, batch: Batch) -> Result<(), StoreError> {
        self.write(batch, false)
    }

    /// Writes puts around the memtable: each column family's rows sorted (the last of equal keys wins) into
    /// a table file that the engine takes over as is. Durable on return, but NOT atomic across column
    /// families: only for rows that are the same bytes when written again, whose checkpoint is written
    /// after them (a backfill window's rows). Other ops are refused.
    fn bulk_load(&self, batch: Batch) -> Result<(), StoreError> {
        self.write(batch, true)
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
    /// compressing them on the way was ~10% of a backfill's CPU. Not persisted: an engine opens with it on.
    fn set_compression(&self, _enabled: bool) -> Result<(), StoreError> {
        Ok(())
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
