//! Reads a directory of blk-framed files (`magic ‖ LE32 length ‖ block`, any network magic), in whatever
//! order the blocks were stored, and orders them by following header links.

use super::{BlockSource, SourceError};
use bitcoin::BlockHash;
use bitcoin::block::Header;
use bitcoin::consensus::Decodable;
use bitcoin::hashes::Hash;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

#[derive(Clone, Copy)]
pub(super) struct Location {
    pub file: usize,
    pub offset: u64,
    pub len: u32,
}

pub struct BlkDirSource {
    dir: PathBuf,
    pub(super) files: Vec<PathBuf>,
    /// The best chain, by height.
    pub(super) chain: Vec<(BlockHash, Location)>,
    /// Every block in the files, on the best chain or not.
    by_hash: HashMap<BlockHash, Location>,
    /// Files opened once and kept: tx lookups read a few hundred bytes at a time, and an open per read
    /// cost more than the read.
    open_files: Vec<std::sync::OnceLock<File>>,
    /// Bitcoin Core >= 28 XORs every byte of blocks/ with this key (`blocks/xor.dat`); zeros = plain files.
    pub(super) xor: [u8; 8],
}

impl BlkDirSource {
    pub fn open(dir: impl AsRef<Path>) -> Result<BlkDirSource, SourceError> {
        Self::open_with_xor(dir, [0; 8])
    }

    /// Opens a directory whose files are XOR-obfuscated with `xor` (as Bitcoin Core >= 28 writes them).
    pub fn open_with_xor(dir: impl AsRef<Path>, xor: [u8; 8]) -> Result<BlkDirSource, SourceError> {
        let dir = dir.as_ref().to_path_buf();
        let io_err = |source| SourceError::Io {
            path: dir.clone(),
            source,
        };
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map_err(io_err)?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|path| {
                let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
                name.ends_with(".dat") && !name.starts_with("rev") && name != "xor.dat"
            })
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(SourceError::BadFile {
                path: dir,
                detail: "no blk*.dat files in this directory".into(),
            });
        }
        let mut headers: HashMap<BlockHash, (Header, Location)> = HashMap::new();
        for (file_index, path) in files.iter().enumerate() {
            scan_file(path, file_index, &xor, &mut headers)?;
        }
        let chain = best_chain(&headers).ok_or_else(|| SourceError::BadFile {
            path: dir.clone(),
            detail: "blocks form no chain (every block's parent is missing or there is a cycle)"
                .into(),
        })?;
        tracing::info!(dir = %dir.display(), files = files.len(), blocks = headers.len(), tip = chain.len() - 1, "indexed blk files");
        let by_hash = headers
            .into_iter()
            .map(|(hash, (_, location))| (hash, location))
            .collect();
        Ok(BlkDirSource {
            dir,
            open_files: files.iter().map(|_| std::sync::OnceLock::new()).collect(),
            files,
            chain,
            by_hash,
            xor,
        })
    }

    fn location_of(&self, hash: &BlockHash) -> Result<Location, SourceError> {
        self.by_hash
            .get(hash)
            .copied()
            .ok_or_else(|| SourceError::BadHash {
                hash: *hash,
                detail: format!("not in the blk files of {}", self.dir.display()),
            })
    }

    fn read_location(
        &self,
        location: Location,
        offset: u64,
        len: usize,
    ) -> Result<Vec<u8>, SourceError> {
        let mut bytes = Vec::new();
        self.read_location_into(location, offset, len, &mut bytes)?;
        Ok(bytes)
    }

    fn read_location_into(
        &self,
        location: Location,
        offset: u64,
        len: usize,
        bytes: &mut Vec<u8>,
    ) -> Result<(), SourceError> {
        let path = &self.files[location.file];
        let slot = &self.open_files[location.file];
        let file = match slot.get() {
            Some(file) => file,
            None => {
                let file = File::open(path).map_err(|source| SourceError::Io {
                    path: path.clone(),
                    source,
                })?;
                slot.get_or_init(|| file)
            }
        };
        read_at_into(file, path, location.offset + offset, len, &self.xor, bytes)
    }

    fn location(&self, height: u32) -> Result<Location, SourceError> {
        self.chain
            .get(height as usize)
            .map(|(_, loc)| *loc)
            .ok_or(SourceError::BeyondTip {
                height,
                tip: self.chain.len() as u32 - 1,
            })
    }
}

/// Reads `len` bytes at `offset`, undoing the XOR obfuscation (key byte = position in the file mod 8).
pub(super) fn read_at(
    file: &File,
    path: &Path,
    offset: u64,
    len: usize,
    xor: &[u8; 8],
) -> Result<Vec<u8>, SourceError> {
    let mut bytes = Vec::new();
    read_at_into(file, path, offset, len, xor, &mut bytes)?;
    Ok(bytes)
}

/// [`read_at`] into `bytes`, replacing what it held.
fn read_at_into(
    file: &File,
    path: &Path,
    offset: u64,
    len: usize,
    xor: &[u8; 8],
    bytes: &mut Vec<u8>,
) -> Result<(), SourceError> {
    use std::os::unix::fs::FileExt;
    bytes.clear();
    bytes.resize(len, 0);
    file.read_exact_at(bytes, offset)
        .map_err(|source| SourceError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    if *xor != [0; 8] {
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte ^= xor[((offset + i as u64) % 8) as usize];
        }
    }
    Ok(())
}

/// The records (`magic ‖ LE32 length ‖ payload`) of a blk or rev file: (payload offset, length).
pub(super) fn records(path: &Path, xor: &[u8; 8]) -> Result<Vec<(u64, u32)>, SourceError> {
    let io_err = |source| SourceError::Io {
        path: path.to_path_buf(),
        source,
    };
    let bad = |detail: String| SourceError::BadFile {
        path: path.to_path_buf(),
        detail,
    };
    let file = File::open(path).map_err(io_err)?;
    let file_len = file.metadata().map_err(io_err)?.len();
    let mut offset = 0u64;
    let mut magic: Option<[u8; 4]> = None;
    let mut out = Vec::new();
    while offset + 8 <= file_len {
        let frame = read_at(&file, path, offset, 8, xor)?;
        let this_magic: [u8; 4] = frame[..4].try_into().expect("4 bytes");
        if this_magic == [0; 4] {
            break; // Bitcoin Core pre-allocates files with zeros.
        }
        if *magic.get_or_insert(this_magic) != this_magic {
            return Err(bad(format!(
                "record at offset {offset} has magic {} but the file started with {}",
                hex::encode(this_magic),
                hex::encode(magic.unwrap_or_default())
            )));
        }
        let len = u32::from_le_bytes(frame[4..].try_into().expect("4 bytes"));
        let body = offset + 8;
        if body + len as u64 > file_len {
            return Err(bad(format!(
                "record at offset {offset} claims {len} bytes but the file is truncated at {file_len}"
            )));
        }
        out.push((body, len));
        offset = body + len as u64;
    }
    Ok(out)
}

/// Walks one file's records, reading only the 80-byte header of each block.
fn scan_file(
    path: &Path,
    file_index: usize,
    xor: &[u8; 8],
    headers: &mut HashMap<BlockHash, (Header, Location)>,
) -> Result<(), SourceError> {
    let file = File::open(path).map_err(|source| SourceError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    for (offset, len) in records(path, xor)? {
        if len < 80 {
            return Err(SourceError::BadFile {
                path: path.to_path_buf(),
                detail: format!("{len}-byte block at offset {offset}"),
            });
        }
        let raw = read_at(&file, path, offset, 80, xor)?;
        let header =
            Header::consensus_decode(&mut raw.as_slice()).map_err(|e| SourceError::BadFile {
                path: path.to_path_buf(),
                detail: format!("block header at offset {offset}: {e}"),
            })?;
        headers.insert(
            header.block_hash(),
            (
                header,
                Location {
                    file: file_index,
                    offset,
                    len,
                },
            ),
        );
    }
    Ok(())
}

/// The longest chain of linked headers: the roots are blocks whose parent is absent.
fn best_chain(
    headers: &HashMap<BlockHash, (Header, Location)>,
) -> Option<Vec<(BlockHash, Location)>> {
    let mut children: HashMap<BlockHash, Vec<BlockHash>> = HashMap::new();
    let mut roots = Vec::new();
    for (hash, (header, _)) in headers {
        if headers.contains_key(&header.prev_blockhash) {
            children
                .entry(header.prev_blockhash)
                .or_default()
                .push(*hash);
        } else {
            roots.push(*hash);
        }
    }
    // Depth-first, iteratively (chains are long), remembering the deepest block; ties go to the lower hash
    // so the answer does not depend on HashMap order.
    let mut depth: HashMap<BlockHash, u32> = HashMap::new();
    let mut best: Option<(u32, BlockHash)> = None;
    let mut stack: Vec<(BlockHash, u32)> = roots.iter().map(|root| (*root, 0)).collect();
    while let Some((hash, d)) = stack.pop() {
        depth.insert(hash, d);
        let better = match best {
            None => true,
            Some((best_depth, best_hash)) => {
                d > best_depth || (d == best_depth && hash < best_hash)
            }
        };
        if better {
            best = Some((d, hash));
        }
        for child in children.get(&hash).into_iter().flatten() {
            stack.push((*child, d + 1));
        }
    }
    let (tip_depth, mut hash) = best?;
    let mut chain = Vec::with_capacity(tip_depth as usize + 1);
    loop {
        let (header, location) = headers[&hash];
        chain.push((hash, location));
        if depth[&hash] == 0 {
            break;
        }
        hash = header.prev_blockhash;
    }
    chain.reverse();
    Some(chain)
}

impl BlockSource for BlkDirSource {
    fn describe(&self) -> String {
        format!("blk:{}", self.dir.display())
    }

    fn tip_height(&self) -> Result<u32, SourceError> {
        Ok(self.chain.len() as u32 - 1)
    }

    fn block_hash(&self, height: u32) -> Result<BlockHash, SourceError> {
        self.location(height)?;
        Ok(self.chain[height as usize].0)
    }

    fn block_bytes(&self, height: u32) -> Result<Vec<u8>, SourceError> {
        let mut bytes = Vec::new();
        self.block_bytes_into(height, &mut bytes)?;
        Ok(bytes)
    }

    fn block_bytes_into(&self, height: u32, bytes: &mut Vec<u8>) -> Result<(), SourceError> {
        let location = self.location(height)?;
        self.read_location_into(location, 0, location.len as usize, bytes)?;
        let hash = BlockHash::hash(&bytes[..80]);
        if hash != self.chain[height as usize].0 {
            return Err(SourceError::BadBlock {
                height,
                detail: format!(
                    "{} changed on disk since it was scanned",
                    self.files[location.file].display()
                ),
            });
        }
        Ok(())
    }

    fn block_by_hash(&self, hash: &BlockHash) -> Result<Vec<u8>, SourceError> {
        let location = self.location_of(hash)?;
        let bytes = self.read_location(location, 0, location.len as usize)?;
        if BlockHash::hash(&bytes[..80]) != *hash {
            return Err(SourceError::BadHash {
                hash: *hash,
                detail: format!(
                    "{} changed on disk since it was scanned",
                    self.files[location.file].display()
                ),
            });
        }
        Ok(bytes)
    }

    /// One pread of just the tx's bytes (the caller checks the txid of what it decodes).
    fn block_slice(&self, hash: &BlockHash, offset: u32, len: u32) -> Result<Vec<u8>, SourceError> {
        let location = self.location_of(hash)?;
        if offset as u64 + len as u64 > location.len as u64 {
            return Err(SourceError::BadHash {
                hash: *hash,
                detail: format!("{} bytes, no [{offset}, +{len})", location.len),
            });
        }
        self.read_location(location, offset as u64, len as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generator::{GenConfig, generate};
    use std::io::Write;

    /// Blocks stored out of order, duplicated, under another network's magic, with zero padding: the
    /// reader still finds the chain in height order.
    #[test]
    fn orders_shuffled_duplicated_blocks_by_header_links() {
        let dir = tempfile::tempdir().unwrap();
        let chain = dir.path().join("chain");
        generate(
            &GenConfig {
                blocks: 30,
                seed: 3,
                txs_per_block: 5,
                hot_address_share: 0.05,
            },
            &chain,
            &mut |_| {},
        )
        .unwrap();
        let original = BlkDirSource::open(&chain).unwrap();
        assert_eq!(original.tip_height().unwrap(), 29);

        let shuffled = dir.path().join("shuffled");
        std::fs::create_dir(&shuffled).unwrap();
        let mainnet_magic = [0xf9, 0xbe, 0xb4, 0xd9];
        let mut order: Vec<u32> = (0..30).rev().collect();
        order.extend([5, 17, 0]); // duplicates
        for (file_index, heights) in order.chunks(11).enumerate() {
            let mut file = File::create(shuffled.join(format!("blk{file_index:05}.dat"))).unwrap();
            for &h in heights {
                let bytes = original.block_bytes(h).unwrap();
                file.write_all(&mainnet_magic).unwrap();
                file.write_all(&(bytes.len() as u32).to_le_bytes()).unwrap();
                file.write_all(&bytes).unwrap();
            }
            file.write_all(&[0u8; 4096]).unwrap();
        }
        let reread = BlkDirSource::open(&shuffled).unwrap();
        assert_eq!(reread.tip_height().unwrap(), 29);
        for h in 0..30 {
            assert_eq!(
                reread.block_hash(h).unwrap(),
                original.block_hash(h).unwrap()
            );
            assert_eq!(
                reread.block_bytes(h).unwrap(),
                original.block_bytes(h).unwrap()
            );
        }
        assert!(matches!(
            reread.block_bytes(30),
            Err(SourceError::BeyondTip { .. })
        ));
    }

    #[test]
    fn truncated_file_is_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut file = File::create(dir.path().join("blk00000.dat")).unwrap();
        file.write_all(&[0xfa, 0xbf, 0xb5, 0xda]).unwrap();
        file.write_all(&1000u32.to_le_bytes()).unwrap();
        file.write_all(&[1u8; 100]).unwrap();
        drop(file);
        let error = BlkDirSource::open(dir.path())
            .err()
            .expect("truncated file is refused")
            .to_string();
        assert!(
            error.contains("blk00000.dat") && error.contains("truncated"),
            "{error}"
        );
    }
}
