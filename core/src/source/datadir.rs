//! Reads a node's `blocks/` directory directly: blk*.dat for blocks and rev*.dat undo data for the coins each
//! block's inputs spend (value, script, creating height), so a worker attributes every input without asking
//! other shards. Handles Bitcoin Core >= 28 obfuscation (`blocks/xor.dat`) and blocks stored out of order.
//!
//! Undo records carry no block hash; each is matched to its block by its checksum, SHA256d(prev block hash ‖
//! undo data), among the blocks of the blk file with the same number.

use super::blk::{BlkDirSource, read_at};
use super::{BlockSource, SourceError, SpentCoin, undo};
use bitcoin::BlockHash;
use bitcoin::hashes::{Hash, sha256d};
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

pub struct DatadirSource {
    blocks: BlkDirSource,
    dir: PathBuf,
    /// Block hash → (rev file, undo data offset, length).
    undo: HashMap<BlockHash, (PathBuf, u64, u32)>,
}

/// `path` may be the blocks directory itself or a datadir (network subdirectories are tried too).
fn blocks_dir(path: &Path) -> Option<PathBuf> {
    [
        path.to_path_buf(),
        path.join("blocks"),
        path.join("regtest/blocks"),
        path.join("testnet3/blocks"),
        path.join("testnet4/blocks"),
        path.join("signet/blocks"),
    ]
    .into_iter()
    .find(|dir| dir.join("blk00000.dat").exists())
}

impl DatadirSource {
    pub fn open(path: impl AsRef<Path>) -> Result<DatadirSource, SourceError> {
        let path = path.as_ref();
        let dir = blocks_dir(path).ok_or_else(|| SourceError::BadFile {
            path: path.to_path_buf(),
            detail: "no blocks/blk00000.dat here: give a node's datadir or its blocks directory"
                .into(),
        })?;
        let xor = match std::fs::read(dir.join("xor.dat")) {
            Ok(key) => key
                .as_slice()
                .try_into()
                .map_err(|_| SourceError::BadFile {
                    path: dir.join("xor.dat"),
                    detail: format!("obfuscation key must be 8 bytes, found {}", key.len()),
                })?,
            Err(_) => [0u8; 8],
        };
        let blocks = BlkDirSource::open_with_xor(&dir, xor)?;
        let undo = index_undo(&blocks)?;
        tracing::info!(dir = %dir.display(), blocks = blocks.chain.len(), undo = undo.len(), "indexed datadir");
        Ok(DatadirSource { blocks, dir, undo })
    }
}

/// rev*.dat records: magic ‖ LE32 size ‖ undo data ‖ 32-byte checksum (not counted in size).
fn rev_records(path: &Path, xor: &[u8; 8]) -> Result<Vec<(u64, u32)>, SourceError> {
    let file = File::open(path).map_err(|source| SourceError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let file_len = file
        .metadata()
        .map_err(|source| SourceError::Io {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    let mut records = Vec::new();
    let mut offset = 0u64;
    while offset + 8 <= file_len {
        let frame = read_at(&file, path, offset, 8, xor)?;
        if frame[..4] == [0; 4] {
            break;
        }
        let len = u32::from_le_bytes(frame[4..].try_into().expect("4 bytes"));
        let end = offset + 8 + len as u64 + 32;
        if end > file_len {
            return Err(SourceError::BadFile {
                path: path.to_path_buf(),
                detail: format!(
                    "undo record at offset {offset} runs past the end of the file ({file_len} bytes)"
                ),
            });
        }
        records.push((offset + 8, len));
        offset = end;
    }
    Ok(records)
}

fn index_undo(
    blocks: &BlkDirSource,
) -> Result<HashMap<BlockHash, (PathBuf, u64, u32)>, SourceError> {
    // Blocks of the best chain by blk file, in height order, with their parent hash.
    let mut by_file: HashMap<usize, Vec<(BlockHash, BlockHash)>> = HashMap::new();
    for height in 1..blocks.chain.len() {
        let (hash, location) = blocks.chain[height];
        by_file
            .entry(location.file)
            .or_default()
            .push((hash, blocks.chain[height - 1].0));
    }
    let mut undo = HashMap::new();
    for (file_index, blk_path) in blocks.files.iter().enumerate() {
        let name = blk_path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let Some(number) = name.strip_prefix("blk") else {
            continue;
        };
        let rev_path = blk_path.with_file_name(format!("rev{number}"));
        let Some(candidates) = by_file.get(&file_index) else {
            continue;
        };
        if !rev_path.exists() {
            continue;
        }
        let file = File::open(&rev_path).map_err(|source| SourceError::Io {
            path: rev_path.clone(),
            source,
        })?;
        let mut next = 0;
        for (offset, len) in rev_records(&rev_path, &blocks.xor)? {
            let data = read_at(&file, &rev_path, offset, len as usize + 32, &blocks.xor)?;
            let (body, checksum) = data.split_at(len as usize);
            let matches = |prev: &BlockHash| {
                let mut preimage = prev.to_byte_array().to_vec();
                preimage.extend_from_slice(body);
                sha256d::Hash::hash(&preimage).to_byte_array() == checksum
            };
            // Records are usually in the order blocks were connected: try the next block first.
            let found = (next..candidates.len())
                .chain(0..next)
                .find(|&i| matches(&candidates[i].1));
            if let Some(i) = found {
                undo.insert(candidates[i].0, (rev_path.clone(), offset, len));
                next = i + 1;
            }
        }
    }
    Ok(undo)
}

impl BlockSource for DatadirSource {
    fn describe(&self) -> String {
        format!("datadir:{}", self.dir.display())
    }

    fn tip_height(&self) -> Result<u32, SourceError> {
        self.blocks.tip_height()
    }

    fn block_hash(&self, height: u32) -> Result<BlockHash, SourceError> {
        self.blocks.block_hash(height)
    }

    fn block_bytes(&self, height: u32) -> Result<Vec<u8>, SourceError> {
        self.blocks.block_bytes(height)
    }

    fn block_bytes_into(&self, height: u32, bytes: &mut Vec<u8>) -> Result<(), SourceError> {
        self.blocks.block_bytes_into(height, bytes)
    }

    fn block_by_hash(&self, hash: &BlockHash) -> Result<Vec<u8>, SourceError> {
        self.blocks.block_by_hash(hash)
    }

    fn block_slice(&self, hash: &BlockHash, offset: u32, len: u32) -> Result<Vec<u8>, SourceError> {
        self.blocks.block_slice(hash, offset, len)
    }

    fn spent_coins(&self, height: u32) -> Result<Option<Vec<Vec<SpentCoin>>>, SourceError> {
        let hash = self.blocks.block_hash(height)?;
        let Some((path, offset, len)) = self.undo.get(&hash) else {
            return Ok(None);
        };
        let file = File::open(path).map_err(|source| SourceError::Io {
            path: path.clone(),
            source,
        })?;
        let data = read_at(&file, path, *offset, *len as usize, &self.blocks.xor)?;
        undo::parse_block_undo(&data)
            .map(Some)
            .map_err(|detail| SourceError::BadBlock {
                height,
                detail: format!("{}: {detail}", path.display()),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generator::{GenConfig, generate};

    /// A Bitcoin Core >= 28 blocks/ directory: every byte XORed with the key in xor.dat.
    #[test]
    fn reads_xor_obfuscated_block_files() {
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("plain");
        generate(
            &GenConfig {
                blocks: 20,
                seed: 9,
                txs_per_block: 5,
                hot_address_share: 0.05,
            },
            &plain,
            &mut |_| {},
        )
        .unwrap();
        let blocks = dir.path().join("datadir/blocks");
        std::fs::create_dir_all(&blocks).unwrap();
        let key = [0x5a, 0x01, 0xff, 0x00, 0x13, 0x37, 0xc0, 0xde];
        std::fs::write(blocks.join("xor.dat"), key).unwrap();
        let bytes = std::fs::read(plain.join("blk00000.dat")).unwrap();
        let obfuscated: Vec<u8> = bytes
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ key[i % 8])
            .collect();
        std::fs::write(blocks.join("blk00000.dat"), obfuscated).unwrap();

        let source = DatadirSource::open(dir.path().join("datadir")).unwrap();
        let reference = BlkDirSource::open(&plain).unwrap();
        assert_eq!(source.tip_height().unwrap(), 19);
        for h in 0..20 {
            assert_eq!(
                source.block_bytes(h).unwrap(),
                reference.block_bytes(h).unwrap()
            );
            assert_eq!(
                source.spent_coins(h).unwrap(),
                None,
                "no rev files, no undo data"
            );
        }
        // A wrong key is caught: the blocks no longer form a chain.
        std::fs::write(blocks.join("xor.dat"), [1u8; 8]).unwrap();
        assert!(DatadirSource::open(dir.path().join("datadir")).is_err());
    }
}
