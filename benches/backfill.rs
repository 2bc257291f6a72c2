//! Backfill benchmark: generates a mainnet-like chain (blocks of ~2,500 txs), measures decode-only tx/s
//! (the ceiling: read + deserialize + txids, one thread) and full backfill tx/s per worker (a real cluster:
//! coordinator + worker processes over loopback gRPC, RocksDB, every input resolved).
//!
//! Run: `cargo bench --profile dev --bench backfill` (env: CHAINIDX_BENCH_BLOCKS, default 60;
//! CHAINIDX_BENCH_WORKERS, default "1,2,4,8"; CHAINIDX_BENCH_SHARDS, default 16; CHAINIDX_BENCH_KEEP=1 keeps the data and logs;
//! CHAINIDX_BENCH_CHAIN=<dir> generates the chain there once and reuses it while the settings match;
//! CHAINIDX_BENCH_BINARIES, comma-separated `chainidx` executables for the workers, each run once per worker
//! count in turn, in reverse order every other time a worker count comes round — an A/B of two builds on
//! this noisy machine, interleaved; give each worker count an even number of times). Prints figures and writes
//! target/bench-backfill.json.

use bitcoin::Block;
use bitcoin::consensus::deserialize;
use chainidx::sandbox::{
    SandboxBuilder, cpu_seconds, cpu_seconds_split, minor_faults, peak_rss_bytes,
};
use chainidx_core::generator::{GenConfig, generate};
use chainidx_core::source::{BlkDirSource, BlockSource};
use serde_json::json;
use std::path::Path;
use std::time::{Duration, Instant};

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> anyhow::Result<()> {
    let blocks: u32 = env_or("CHAINIDX_BENCH_BLOCKS", 60);
    let worker_counts: Vec<usize> = std::env::var("CHAINIDX_BENCH_WORKERS")
        .unwrap_or_else(|_| "1,2,4,8".into())
        .split(',')
        .filter_map(|w| w.trim().parse().ok())
        .collect();
    // 16 by default; fewer makes each shard larger on the same chain, so that a shard's size and the
    // chain's length can be varied apart.
    let shards: u32 = env_or("CHAINIDX_BENCH_SHARDS", 16).max(1);
    let dir = tempfile::tempdir()?;
    // CHAINIDX_BENCH_KEEP=1 keeps the clusters' directories (worker logs say how long each phase took).
    let dir = match std::env::var_os("CHAINIDX_BENCH_KEEP") {
        Some(_) => {
            let kept = dir.keep();
            println!("keeping {}", kept.display());
            Kept::Path(kept)
        }
        None => Kept::Temp(dir),
    };
    let config = GenConfig {
        blocks,
        seed: 42,
        txs_per_block: 2500,
        hot_address_share: 0.05,
    };
    // CHAINIDX_BENCH_CHAIN=<dir>: the chain is generated there once and used again by later runs with the
    // same settings (16M txs take ~4 minutes to generate).
    let chain = match std::env::var_os("CHAINIDX_BENCH_CHAIN") {
        Some(kept) => std::path::PathBuf::from(kept),
        None => dir.path().join("chain"),
    };
    let started = Instant::now();
    let summary = generated_chain(&config, &chain)?;
    println!(
        "{} {} blocks, {} txs, {} inputs, {} outputs in {:.1}s",
        if summary.reused {
            "reused"
        } else {
            "generated"
        },
        summary.blocks,
        summary.txs,
        summary.inputs,
        summary.outputs,
        started.elapsed().as_secs_f64()
    );

    // Decode only: what one thread can read and deserialize; no rows, no RocksDB.
    let source = BlkDirSource::open(&chain)?;
    let started = Instant::now();
    let mut txs = 0u64;
    for height in 0..=source.tip_height()? {
        let block: Block = deserialize(&source.block_bytes(height)?)?;
        for tx in &block.txdata {
            std::hint::black_box(tx.compute_txid());
        }
        txs += block.txdata.len() as u64;
    }
    let decode_tx_s = txs as f64 / started.elapsed().as_secs_f64();
    println!("decode-only: {decode_tx_s:.0} tx/s (one thread)");

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let binaries: Vec<String> = match std::env::var("CHAINIDX_BENCH_BINARIES") {
        Ok(list) => list.split(',').map(|b| b.trim().to_string()).collect(),
        Err(_) => vec![env!("CARGO_BIN_EXE_chainidx").to_string()],
    };
    // Every other time a worker count comes round, its builds run in reverse order (A B, then B A): a
    // run right after an 8-worker run costs ~10% less than one after a 1-worker run (the memory the
    // last run freed is still backed by the VM's host), so a fixed order favoured the second build.
    let mut seen: std::collections::HashMap<usize, usize> = Default::default();
    let runs_wanted: Vec<(usize, &str)> = worker_counts
        .iter()
        .flat_map(|&workers| {
            let time = seen.entry(workers).or_default();
            let reversed = *time % 2 == 1;
            *time += 1;
            let mut order: Vec<&str> = binaries.iter().map(String::as_str).collect();
            if reversed {
                order.reverse();
            }
            order.into_iter().map(move |binary| (workers, binary))
        })
        .collect();
    let mut runs = Vec::new();
    // (binary, workers, CPU-s per million txs) of every run, for the ratios printed at the end.
    let mut cpu_runs: Vec<(String, usize, f64)> = Vec::new();
    for (run, (workers, binary)) in runs_wanted.into_iter().enumerate() {
        if binaries.len() > 1 {
            println!("binary {binary}:");
        }
        // One directory per run: a worker count given twice ("1,8,1") must backfill again, not find
        // the first run's finished shards.
        let cluster_dir = dir.path().join(format!("cluster-{run}-{workers}"));
        // The same shards whatever the worker count, so only the distribution differs between runs.
        let shard_blocks = blocks.div_ceil(shards).max(1);
        let own_cpu_before = cpu_seconds(std::process::id());
        let own_system_before = cpu_seconds_split(std::process::id()).1;
        let backfill = runtime.block_on(async {
            // Workers compact their shards once the whole backfill is over, as they do by default
            // (`--compact-after-backfill`): the backfill's figures are taken when it completes, the
            // compaction's when the last shard is compacted.
            let sandbox =
                SandboxBuilder::new(binary, format!("blk:{}", chain.display()), &cluster_dir)
                    .workers(workers)
                    .shard_blocks(shard_blocks)
                    .start()
                    .await?;
            let started = Instant::now();
            let status = sandbox
                .wait_for_backfill(Duration::from_secs(3600), |_| {})
                .await?;
            let elapsed = started.elapsed().as_secs_f64();
            let pids = sandbox.worker_pids();
            let all_cpu = || {
                pids.iter().map(|p| cpu_seconds(*p)).sum::<f64>() + cpu_seconds(std::process::id())
            };
            let cpu_at_backfill = all_cpu();
            let system_at_backfill = pids
                .iter()
                .chain([&std::process::id()])
                .map(|p| cpu_seconds_split(*p).1)
                .sum::<f64>();
            let peak_rss = pids.iter().map(|p| peak_rss_bytes(*p)).max().unwrap_or(0);
            let worker_faults = pids.iter().map(|p| minor_faults(*p)).sum::<u64>();
            let disk = data_bytes(&cluster_dir);
            let mut peer_bytes = 0;
            // The storage engine's share of one worker's memory (the largest), after the backfill.
            let mut engine = chainidx_proto::EngineMemory::default();
            let (mut windows, mut batches) = (0, 0);
            let mut routing = Routing::default();
            for reply in sandbox.worker_statuses().await? {
                peer_bytes += reply.peer_bytes;
                routing.routed += reply.inputs_routed;
                routing.walked += reply.inputs_walked;
                routing.lookups += reply.spend_lookups_sent;
                windows += reply
                    .shards
                    .iter()
                    .map(|s| s.windows_committed)
                    .sum::<u64>();
                batches += reply
                    .shards
                    .iter()
                    .map(|s| s.resolution_batches)
                    .sum::<u64>();
                let memory = reply.engine_memory.unwrap_or_default();
                let total = |m: &chainidx_proto::EngineMemory| {
                    m.memtable_bytes + m.table_reader_bytes + m.block_cache_bytes
                };
                if total(&memory) > total(&engine) {
                    engine = memory;
                }
            }
            sandbox
                .wait_for_compactions(Duration::from_secs(3600))
                .await?;
            let compaction_cpu = all_cpu() - cpu_at_backfill;
            // The high-water mark again: the compaction after the backfill holds memory of its own.
            let peak_rss_with_compaction =
                pids.iter().map(|p| peak_rss_bytes(*p)).max().unwrap_or(0);
            sandbox.shutdown().await;
            let cross: u64 = status.shards.iter().map(|s| s.cross_shard_inputs).sum();
            anyhow::Ok(Backfill {
                elapsed,
                cross,
                // The coordinator runs in this process (with the bench's own polling): counted too.
                cpu: cpu_at_backfill - own_cpu_before,
                system_cpu: system_at_backfill - own_system_before,
                compaction_cpu,
                peak_rss,
                peak_rss_with_compaction,
                worker_faults,
                windows,
                batches,
                peer_bytes,
                routing,
                engine,
                disk,
            })
        })?;
        let Backfill {
            elapsed,
            cross,
            cpu,
            system_cpu,
            compaction_cpu,
            peak_rss,
            peak_rss_with_compaction,
            worker_faults,
            windows,
            batches,
            peer_bytes,
            routing,
            engine,
            disk,
        } = backfill;
        let cpu_per_million = cpu / (summary.txs as f64 / 1e6);
        let compaction_cpu_per_million = compaction_cpu / (summary.txs as f64 / 1e6);
        let (compacted, per_cf) = compacted_bytes(&cluster_dir)?;
        let tx_s = summary.txs as f64 / elapsed;
        let per_worker = tx_s / workers as f64;
        let per_tx = |bytes: u64| bytes as f64 / summary.txs as f64;
        println!(
            "backfill, {workers} worker(s), shards of {shard_blocks} blocks: {elapsed:.1}s, {tx_s:.0} tx/s total, \
             {per_worker:.0} tx/s per worker ({:.2} of decode-only), {cross} cross-shard inputs, \
             {:.0} bytes between workers per tx, {:.0} bytes on disk per tx as it completes ({:.0} after compaction), \
             {cpu_per_million:.1} CPU-s per million tx (all processes; {:.0}% in the kernel), worker peak RSS {:.0} MiB, \
             {:.0} page faults per 1,000 tx (workers)",
            per_worker / decode_tx_s,
            per_tx(peer_bytes),
            per_tx(disk),
            per_tx(compacted),
            100.0 * system_cpu / cpu,
            peak_rss as f64 / (1 << 20) as f64,
            1000.0 * per_tx(worker_faults)
        );
        println!(
            "  {windows} windows and {batches} resolution batches written over {} shards",
            blocks.div_ceil(shard_blocks)
        );
        let lookups_per_input =
            routing.lookups as f64 / (routing.routed + routing.walked).max(1) as f64;
        println!(
            "  cross-shard inputs: {} routed by the earlier shards' txid filters (a shard without one, past \
             --txid-filter-mib, is asked about every input on the way), {} walked back (every filter ruled \
             their coin out); {lookups_per_input:.2} lookups sent to peers per input",
            routing.routed, routing.walked
        );
        println!(
            "  then compacting every shard (what workers do by default, --compact-after-backfill): \
             {compaction_cpu_per_million:.1} CPU-s per million tx, worker peak RSS through it {:.0} MiB",
            peak_rss_with_compaction as f64 / (1 << 20) as f64
        );
        let breakdown: Vec<String> = per_cf
            .iter()
            .filter(|(_, bytes)| *bytes > 0)
            .map(|(cf, bytes)| format!("{cf} {:.1}", per_tx(*bytes)))
            .collect();
        println!(
            "  after compaction, bytes per tx by column family: {}",
            breakdown.join(", ")
        );
        let mib = |bytes: u64| bytes as f64 / (1 << 20) as f64;
        println!(
            "  RocksDB memory in the largest worker after the backfill: memtables {:.0} MiB, table readers {:.0} MiB, block cache {:.0} MiB",
            mib(engine.memtable_bytes),
            mib(engine.table_reader_bytes),
            mib(engine.block_cache_bytes)
        );
        cpu_runs.push((binary.to_string(), workers, cpu_per_million));
        runs.push(json!({
            "engine_memory_mib": {"memtables": mib(engine.memtable_bytes), "table_readers": mib(engine.table_reader_bytes), "block_cache": mib(engine.block_cache_bytes)},
            "workers": workers, "binary": binary, "shard_blocks": shard_blocks, "seconds": elapsed, "tx_per_s": tx_s,
            "cross_shard_inputs_routed": routing.routed, "cross_shard_inputs_walked": routing.walked,
            "peer_lookups_per_cross_shard_input": lookups_per_input,
            "tx_per_s_per_worker": per_worker, "ratio_to_decode_only": per_worker / decode_tx_s,
            "cross_shard_inputs": cross, "bytes_between_workers_per_tx": per_tx(peer_bytes),
            "disk_bytes_per_tx": per_tx(disk), "disk_bytes_per_tx_compacted": per_tx(compacted),
            "disk_bytes_per_tx_by_cf": per_cf.iter().map(|(cf, b)| (cf.clone(), per_tx(*b))).collect::<std::collections::BTreeMap<_, _>>(),
            "cpu_seconds_per_million_tx": cpu_per_million, "kernel_share_of_cpu": system_cpu / cpu, "worker_peak_rss_bytes": peak_rss,
            "worker_peak_rss_bytes_with_compaction": peak_rss_with_compaction,
            "worker_page_faults_per_tx": per_tx(worker_faults),
            "windows": windows, "resolution_batches": batches,
            "compaction_cpu_seconds_per_million_tx": compaction_cpu_per_million,
        }));
    }
    let ratios = cpu_ratios(&cpu_runs);
    for ratio in &ratios {
        println!("{}", ratio.line);
    }
    let report = json!({
        "chain": {"blocks": summary.blocks, "txs": summary.txs, "inputs": summary.inputs, "outputs": summary.outputs},
        "decode_only_tx_per_s": decode_tx_s,
        "backfill": runs,
        "cpu_ratio_to_one_worker": ratios.iter().map(|r| r.json.clone()).collect::<Vec<_>>(),
    });
    chainidx::sandbox::write_bench_report("backfill", &report)?;
    Ok(())
}

struct CpuRatio {
    line: String,
    json: serde_json::Value,
}

/// CPU per tx with n workers over that with 1, per build: the ratio of the means, and run by run in the
/// order given (`CHAINIDX_BENCH_WORKERS=1,8,1,8`: the first 8-worker run against the first 1-worker
/// run, and so on), since consecutive runs share the machine's mood.
fn cpu_ratios(runs: &[(String, usize, f64)]) -> Vec<CpuRatio> {
    let mut binaries: Vec<&str> = Vec::new();
    let mut counts: Vec<usize> = Vec::new();
    for (binary, workers, _) in runs {
        if !binaries.contains(&binary.as_str()) {
            binaries.push(binary);
        }
        if *workers != 1 && !counts.contains(workers) {
            counts.push(*workers);
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let several = binaries.len() > 1;
    let mut ratios = Vec::new();
    for binary in binaries {
        let label = if several {
            format!(" ({binary})")
        } else {
            String::new()
        };
        let cpu_of = |n: usize| -> Vec<f64> {
            runs.iter()
                .filter(|(b, w, _)| b == binary && *w == n)
                .map(|(_, _, cpu)| *cpu)
                .collect()
        };
        let one = cpu_of(1);
        if one.is_empty() {
            continue;
        }
        for &n in &counts {
            let many = cpu_of(n);
            if many.is_empty() {
                continue;
            }
            let pairs: Vec<f64> = one.iter().zip(&many).map(|(o, m)| m / o).collect();
            let of_means = mean(&many) / mean(&one);
            let listed: Vec<String> = pairs.iter().map(|r| format!("{r:.2}")).collect();
            ratios.push(CpuRatio {
                line: format!(
                    "CPU per tx, {n} workers / 1{label}: {of_means:.2} (run by run: {})",
                    listed.join(", ")
                ),
                json: json!({"binary": binary, "workers": n, "ratio_of_means": of_means, "run_by_run": pairs}),
            });
        }
    }
    ratios
}

/// Bytes of RocksDB data under `path`: SST files and write-ahead logs (not RocksDB's info LOG files).
fn data_bytes(path: &std::path::Path) -> u64 {
    let mut total = 0;
    if let Ok(entries) = std::fs::read_dir(path) {
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else {
                continue;
            };
            let name = entry.file_name().to_string_lossy().to_string();
            if meta.is_dir() {
                total += data_bytes(&entry.path());
            } else if name.ends_with(".sst") || name.ends_with(".log") {
                total += meta.len();
            }
        }
    }
    total
}

/// What one backfill run measured.
struct Backfill {
    elapsed: f64,
    cross: u64,
    cpu: f64,
    /// The kernel's part of `cpu`.
    system_cpu: f64,
    compaction_cpu: f64,
    /// Workers' high-water mark of RSS up to the backfill's end, and up to the end of the compaction.
    peak_rss: u64,
    peak_rss_with_compaction: u64,
    /// Minor page faults of the workers up to the backfill's end.
    worker_faults: u64,
    /// Backfill windows and resolution batches written, over all shards.
    windows: u64,
    batches: u64,
    peer_bytes: u64,
    routing: Routing,
    engine: chainidx_proto::EngineMemory,
    disk: u64,
}

/// How the workers found their cross-shard inputs' coins (`WorkerStatusReply`).
#[derive(Default)]
struct Routing {
    routed: u64,
    walked: u64,
    lookups: u64,
}

/// The data bytes of a stopped cluster whose workers compacted every shard, and the SST bytes per column
/// family (each shard database opened to ask).
fn compacted_bytes(cluster: &std::path::Path) -> anyhow::Result<(u64, Vec<(String, u64)>)> {
    let mut per_cf: std::collections::BTreeMap<String, u64> = Default::default();
    for worker in std::fs::read_dir(cluster)?.flatten() {
        let Ok(shards) = std::fs::read_dir(worker.path()) else {
            continue;
        };
        for shard in shards.flatten() {
            if shard.file_name().to_string_lossy().starts_with("shard-") {
                anyhow::ensure!(
                    shard
                        .path()
                        .join(chainidx_node::worker::COMPACTED_MARK)
                        .exists(),
                    "{} was not compacted",
                    shard.path().display()
                );
                let store = chainidx_node::rocks::RocksStore::open(&shard.path())?;
                for (cf, bytes) in store.sst_bytes_per_cf() {
                    *per_cf.entry(cf.name().to_string()).or_default() += bytes;
                }
            }
        }
    }
    Ok((data_bytes(cluster), per_cf.into_iter().collect()))
}

/// What the runs need to know of the generated chain.
struct ChainFigures {
    blocks: u32,
    txs: u64,
    inputs: u64,
    outputs: u64,
    reused: bool,
}

/// Where [`generated_chain`] records the settings and figures of the chain it generated.
const CHAIN_FIGURES: &str = "bench-chain.json";

/// Generates the chain into `dir`, or reads the figures of the one already there if it was generated with
/// the same settings. A directory holding something else is refused rather than written over.
fn generated_chain(config: &GenConfig, dir: &Path) -> anyhow::Result<ChainFigures> {
    let settings = json!({
        "blocks": config.blocks, "seed": config.seed, "txs_per_block": config.txs_per_block,
        "hot_address_share": config.hot_address_share,
    });
    let recorded = dir.join(CHAIN_FIGURES);
    if recorded.exists() {
        let figures: serde_json::Value = serde_json::from_slice(&std::fs::read(&recorded)?)?;
        anyhow::ensure!(
            figures["settings"] == settings,
            "{} holds a chain generated with {}, not {settings}: remove it or choose another directory",
            dir.display(),
            figures["settings"]
        );
        let count = |name: &str| {
            figures[name]
                .as_u64()
                .ok_or_else(|| anyhow::anyhow!("{} has no {name}", recorded.display()))
        };
        return Ok(ChainFigures {
            blocks: config.blocks,
            txs: count("txs")?,
            inputs: count("inputs")?,
            outputs: count("outputs")?,
            reused: true,
        });
    }
    anyhow::ensure!(
        !dir.exists() || std::fs::read_dir(dir)?.next().is_none(),
        "{} is neither empty nor a chain this bench generated ({CHAIN_FIGURES} missing)",
        dir.display()
    );
    let summary = generate(config, dir, &mut |_| {})?;
    std::fs::write(
        &recorded,
        serde_json::to_vec_pretty(&json!({
            "settings": settings, "txs": summary.txs, "inputs": summary.inputs, "outputs": summary.outputs,
        }))?,
    )?;
    Ok(ChainFigures {
        blocks: summary.blocks,
        txs: summary.txs,
        inputs: summary.inputs,
        outputs: summary.outputs,
        reused: false,
    })
}

/// The bench's directory: removed at the end unless CHAINIDX_BENCH_KEEP is set.
enum Kept {
    Temp(tempfile::TempDir),
    Path(std::path::PathBuf),
}

impl Kept {
    fn path(&self) -> &Path {
        match self {
            Kept::Temp(dir) => dir.path(),
            Kept::Path(path) => path,
        }
    }
}
