//! Dumps a shard database's rows, one file per column family, for offline layout experiments:
//! `scripts/rocksdb_bytes.py` sizes them as RocksDB's compacted tables would be, so that a change of row
//! layout can be priced in bytes per tx before it is built (doc/performance.md, "Where the bytes go").
//!
//! Usage: `cargo run --profile dev --example dump_rows -- <shard dir> <out dir>` (keep a bench's shards
//! with `CHAINIDX_BENCH_KEEP=1`). Each file holds, in key order, `u32 LE key length ‖ key ‖ u32 LE value
//! length ‖ value`; `sizes` holds the table bytes RocksDB reports per column family.

use anyhow::Context;
use chainidx_core::schema::Cf;
use chainidx_core::store::{Reads, ScanFrom};
use chainidx_node::rocks::RocksStore;
use std::io::Write;
use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args_os().skip(1);
    let (Some(shard), Some(out)) = (
        args.next().map(PathBuf::from),
        args.next().map(PathBuf::from),
    ) else {
        anyhow::bail!("usage: dump_rows <shard dir> <out dir>");
    };
    anyhow::ensure!(
        shard.join("CURRENT").exists(),
        "{} is not a RocksDB directory",
        shard.display()
    );
    let store = RocksStore::open(&shard).with_context(|| format!("opening {}", shard.display()))?;
    std::fs::create_dir_all(&out)?;
    for cf in Cf::ALL {
        let mut file = std::io::BufWriter::new(std::fs::File::create(out.join(cf.name()))?);
        let mut failed = None;
        store.scan(cf, &[], ScanFrom::First, &mut |key, value| {
            let written = [&(key.len() as u32).to_le_bytes()[..], key]
                .into_iter()
                .chain([&(value.len() as u32).to_le_bytes()[..], value])
                .try_for_each(|part| file.write_all(part));
            failed = written.err();
            failed.is_none()
        })?;
        if let Some(e) = failed {
            return Err(e.into());
        }
        file.flush()?;
    }
    let sizes: String = store
        .sst_bytes_per_cf()
        .into_iter()
        .map(|(cf, bytes)| format!("{} {bytes}\n", cf.name()))
        .collect();
    std::fs::write(out.join("sizes"), sizes)?;
    Ok(())
}
