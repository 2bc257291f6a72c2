//! Where blocks come from. One trait, several implementations, chosen by a `--source` spec:
//! - `blk:DIR`: a directory of Bitcoin Core blk-framed files (also what `chainidx gen` writes);
//! - `rpc:http://user:pass@host:port`: a bitcoind over JSON-RPC, blocks over REST;
//! - `datadir:DIR`: a node's blocks directory read directly, with rev*.dat undo data for spent coins.
//!
//! Sources are blocking: workers call them from a blocking thread, one shard at a time.

mod blk;
mod datadir;
mod rpc;
pub mod undo;

pub use blk::BlkDirSource;
pub use datadir::DatadirSource;
pub use rpc::RpcSource;

use bitcoin::BlockHash;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("bad source spec '{0}': use blk:DIR, datadir:DIR or rpc:http://user:pass@host:port")]
    BadSpec(String),
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {detail}")]
    BadFile { path: PathBuf, detail: String },
    #[error("height {height} is beyond the source's tip {tip}")]
    BeyondTip { height: u32, tip: u32 },
    #[error("block at height {height}: {detail}")]
    BadBlock { height: u32, detail: String },
    #[error("block {hash}: {detail}")]
    BadHash { hash: BlockHash, detail: String },
    #[error("node RPC {method}: {detail}")]
    Rpc { method: String, detail: String },
}

pub trait BlockSource: Send + Sync {
    /// For logs and errors: where the blocks come from.
    fn describe(&self) -> String;
    fn tip_height(&self) -> Result<u32, SourceError>;
    fn block_hash(&self, height: u32) -> Result<BlockHash, SourceError>;
    /// The consensus-serialized block at `height` of the source's best chain.
    fn block_bytes(&self, height: u32) -> Result<Vec<u8>, SourceError>;
    /// [`BlockSource::block_bytes`] into `bytes`, whose memory a reader of many blocks keeps: a fresh
    /// buffer per block was a tenth of a backfilling worker's page faults.
    fn block_bytes_into(&self, height: u32, bytes: &mut Vec<u8>) -> Result<(), SourceError> {
        *bytes = self.block_bytes(height)?;
        Ok(())
    }
    /// The block with this hash, on the best chain or not: rolling a reorged block back needs the old branch.
    fn block_by_hash(&self, hash: &BlockHash) -> Result<Vec<u8>, SourceError>;
    /// Bytes `[offset, offset + len)` of block `hash`: one transaction. Shards keep only where each tx is,
    /// not its bytes (most of a tx is signatures nobody queries by), and read bodies from here.
    fn block_slice(&self, hash: &BlockHash, offset: u32, len: u32) -> Result<Vec<u8>, SourceError> {
        let block = self.block_by_hash(hash)?;
        slice_of(&block, hash, offset, len)
    }
    /// The coins the block's inputs spend (one list per non-coinbase tx, in input order), when the source
    /// has them (undo data); `None` means the indexer must resolve inputs itself.
    fn spent_coins(&self, _height: u32) -> Result<Option<Vec<Vec<SpentCoin>>>, SourceError> {
        Ok(None)
    }
    /// Txids in the node's mempool; `None` for sources without one (files).
    fn mempool_txids(&self) -> Result<Option<Vec<bitcoin::Txid>>, SourceError> {
        Ok(None)
    }
    /// A mempool transaction's bytes, if it is still there.
    fn mempool_tx(&self, _txid: &bitcoin::Txid) -> Result<Option<Vec<u8>>, SourceError> {
        Ok(None)
    }
}

/// `[offset, offset + len)` of a block's bytes, or an error naming the block if it is shorter.
pub(crate) fn slice_of(
    block: &[u8],
    hash: &BlockHash,
    offset: u32,
    len: u32,
) -> Result<Vec<u8>, SourceError> {
    let (start, end) = (offset as usize, offset as usize + len as usize);
    block
        .get(start..end)
        .map(<[u8]>::to_vec)
        .ok_or_else(|| SourceError::BadHash {
            hash: *hash,
            detail: format!("{} bytes, no [{start}, {end})", block.len()),
        })
}

/// A coin an input spends, as undo data records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpentCoin {
    pub height: u32,
    pub coinbase: bool,
    pub value: u64,
    pub script: bitcoin::ScriptBuf,
}

/// Opens the source a `--source` spec names.
pub fn open(spec: &str) -> Result<Arc<dyn BlockSource>, SourceError> {
    if let Some(dir) = spec.strip_prefix("blk:") {
        Ok(Arc::new(BlkDirSource::open(dir)?))
    } else if let Some(dir) = spec.strip_prefix("datadir:") {
        Ok(Arc::new(DatadirSource::open(dir)?))
    } else if let Some(url) = spec.strip_prefix("rpc:") {
        Ok(Arc::new(RpcSource::new(url)?))
    } else {
        Err(SourceError::BadSpec(spec.into()))
    }
}
