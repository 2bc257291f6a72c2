//! `chainidx`: generate a chain, run a cluster, query it. `chainidx --help` explains each command.

use anyhow::{Context, bail};
use chainidx::sandbox::{SandboxBuilder, ensure_generated};
use chainidx::worker_main::{WorkerArgs, run_worker};
use chainidx_core::generator::GenConfig;
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Indexing allocates and frees millions of small rows per window; glibc's allocator spent ~18% of a
/// worker's CPU in `--bench backfill` on that (consolidating, and returning pages the next window faults
/// back in).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "chainidx",
    version,
    about = "A distributed Bitcoin address-activity index.",
    long_about = "A distributed Bitcoin address-activity index: a coordinator splits the chain into block-range \
shards, worker processes index them into RocksDB (every input attributed to the address and value it spends, \
also across shards), and queries fan out over gRPC and an Esplora-compatible HTTP API.\n\n\
Quick start: `chainidx up` generates a chain, starts a 2-worker cluster and serves queries."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a deterministic, realistic chain as Bitcoin Core blk*.dat files, plus its ground truth.
    Gen {
        /// Output directory (must not already hold blk files).
        #[arg(long)]
        out: PathBuf,
        /// Number of blocks, including block 0.
        #[arg(long, default_value_t = 3000)]
        blocks: u32,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Transactions per block (fewer in the first blocks, while there are few coins to spend).
        #[arg(long, default_value_t = 40)]
        txs_per_block: u32,
        /// Share of payments that go to the top "exchange" address (1.0 makes it touch nearly every tx).
        #[arg(long, default_value_t = 0.05)]
        hot_address_share: f64,
    },
    /// Run a whole cluster here: coordinator + worker processes on loopback, backfill, then serve queries.
    Up(UpArgs),
    /// Run a coordinator replica. Three form a Raft group: start one with `--id 1`, then the others with
    /// `--id N --join <first's gRPC address>`; a restarted replica rejoins from its `--data`.
    Coordinator {
        #[arg(long)]
        source: String,
        /// Raft id of this replica, unique in the group and never reused.
        #[arg(long, default_value_t = 1)]
        id: u64,
        /// Where the Raft log and snapshots are kept.
        #[arg(long, default_value = "chainidx-coordinator")]
        data: PathBuf,
        /// gRPC address of a running coordinator whose group this one joins (first start only).
        #[arg(long)]
        join: Option<String>,
        /// Workers holding each shard; with 2 or more, losing a worker does not fail queries.
        #[arg(long, default_value_t = 1)]
        replication: u32,
        #[arg(long, default_value = "127.0.0.1:50051")]
        grpc: String,
        #[arg(long, default_value = "127.0.0.1:3000")]
        http: String,
        #[arg(long, default_value = "mainnet")]
        network: String,
        #[arg(long, default_value_t = 10_000)]
        shard_blocks: u32,
        /// Workers to wait for before assigning shards.
        #[arg(long, default_value_t = 1)]
        min_workers: usize,
        /// Deepest reorg rolled back while following the tip; a deeper one halts the index.
        #[arg(long, default_value_t = 100)]
        reorg_limit: u32,
    },
    /// Run a worker node that registers with the coordinators' leader and holds a lease on its shards.
    Node {
        /// Coordinator gRPC addresses, comma-separated (any member; the leader is found from there).
        #[arg(long)]
        coordinator: String,
        #[arg(long)]
        source: String,
        /// Where this worker keeps its shard databases.
        #[arg(long)]
        data: PathBuf,
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: String,
        /// Address peers and the coordinator use to reach this worker (default: the bound address).
        #[arg(long)]
        advertise: Option<String>,
        /// Identity kept across restarts (default: the data directory).
        #[arg(long)]
        name: Option<String>,
        /// Shards indexed at once (default: the machine's cores). Lower it when several workers share a
        /// machine, so they do not fight over its cores and caches.
        #[arg(long)]
        index_threads: Option<usize>,
        /// Once the cluster's backfill is over, rewrite each shard's database compactly in the background
        /// (spent coins' rows dropped, zstd: ~40% of its size right after the backfill; ~19 CPU-s per
        /// million txs).
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
        compact_after_backfill: bool,
        /// Block cache shared by all of this worker's shards, in MiB (index and filter blocks included).
        /// Filters take ~8 bytes per tx the worker holds: raise it for workers holding tens of millions.
        #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
        cache_mib: u64,
        /// Read table files through mmap: for a worker holding a shard much larger than its block cache,
        /// whose lookups mostly miss it (one 3.99M-tx shard: ~25% more tx/s). The mapped pages count in
        /// the worker's RSS and grow with its databases (page cache, which the kernel can reclaim).
        #[arg(long)]
        mmap_reads: bool,
        /// Transactions indexed in memory before they are written as one window of table files, with the
        /// checkpoint after it. Larger windows write and look up fewer coins (most are spent young) but
        /// hold more memory: ~120 MB per shard being indexed at the default.
        #[arg(long, default_value_t = chainidx_node::shard::DEFAULT_WINDOW_TXS as u64,
              value_parser = clap::value_parser!(u64).range(1..=1 << 24))]
        window_txs: u64,
        /// Memory, in MiB, for the unspent coins of the windows the shards being indexed wrote last, so
        /// that inputs spending coins a few windows old find them without a database lookup. Shared
        /// evenly by the shards indexed at once: a window of the default size keeps ~11 MiB, so the
        /// default holds 11 windows for a lone shard (one 3.99M-tx shard: 55k tx/s keeping none, ~90k
        /// keeping 8) and 5–6 for each of two. 0 keeps none.
        #[arg(long, default_value_t = (chainidx_node::shard::DEFAULT_RECENT_COINS_BYTES >> 20) as u64,
              value_parser = clap::value_parser!(u64).range(0..=1 << 16))]
        recent_coins_mib: u64,
        /// Inputs whose coins are looked for in other shards per round trip (phase 2). Larger batches write
        /// fewer, larger table files but hold more memory: ~15 MB per shard resolving at the default.
        #[arg(long, default_value_t = chainidx_node::worker::DEFAULT_RESOLVE_BATCH as u64,
              value_parser = clap::value_parser!(u64).range(1..=1 << 24))]
        resolve_batch: u64,
        /// Memory for other workers' shards' txid filters, in MiB (1.5 bytes per tx: the default holds
        /// ~90M txs). Each cross-shard input goes straight to the shard whose filter may hold its coin; a
        /// shard whose filter does not fit is asked about every input, which costs bytes between workers
        /// and lookups instead of memory. This worker's own shards use the filters they keep for their
        /// peers, outside this budget.
        #[arg(long, default_value_t = (chainidx_node::worker::TXID_FILTER_BUDGET_BYTES >> 20) as u64,
              value_parser = clap::value_parser!(u64).range(0..=1 << 20))]
        txid_filter_mib: u64,
    },
    /// Query a running cluster over its HTTP API.
    Query {
        /// The cluster's HTTP address.
        #[arg(long, default_value = "http://127.0.0.1:3000")]
        server: String,
        #[command(subcommand)]
        what: QueryWhat,
    },
    /// Show or change the coordinator Raft group online. Adding happens when a new coordinator starts with
    /// `--join`; removing is this command with `--remove ID` (sent to the leader, found from any member).
    Members {
        /// gRPC address of any coordinator.
        #[arg(long, default_value = "127.0.0.1:50051")]
        coordinator: String,
        /// Raft id of a coordinator to remove from the group.
        #[arg(long)]
        remove: Option<u64>,
    },
    /// Show the cluster: Raft leader and members, workers holding leases, shards with replicas and lag.
    Status {
        #[arg(long, default_value = "http://127.0.0.1:3000")]
        server: String,
    },
}

#[derive(clap::Args)]
struct UpArgs {
    /// Block source: blk:DIR, datadir:DIR or rpc:http://user:pass@host:port. Default: a chain generated
    /// into DATA/chain.
    #[arg(long)]
    source: Option<String>,
    /// Worker processes to start.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Data directory (shard databases, logs, the generated chain).
    #[arg(long, default_value = "chainidx-data")]
    data: PathBuf,
    /// HTTP (Esplora API) listen address.
    #[arg(long, default_value = "127.0.0.1:3000")]
    http: String,
    /// gRPC (Query and Coordinator services) listen address.
    #[arg(long, default_value = "127.0.0.1:50051")]
    grpc: String,
    /// Address encoding: mainnet, testnet, signet or regtest. Default: regtest for the generated chain, else mainnet.
    #[arg(long)]
    network: Option<String>,
    /// Blocks per shard. Default: the chain split into 4 shards per worker.
    #[arg(long)]
    shard_blocks: Option<u32>,
    /// Blocks of the generated default chain.
    #[arg(long, default_value_t = 3000)]
    blocks: u32,
    /// Backfill, print a summary and exit instead of serving.
    #[arg(long)]
    exit_after_backfill: bool,
    /// Deepest reorg rolled back while following the tip; a deeper one halts the index.
    #[arg(long, default_value_t = 100)]
    reorg_limit: u32,
    /// Coordinator replicas: 1 runs in this process; 3 run as a Raft group of child processes (on
    /// ephemeral ports; the first one's HTTP address is printed).
    #[arg(long, default_value_t = 1)]
    coordinators: usize,
    /// Workers holding each shard; 2 or more keep queries answered when a worker dies.
    #[arg(long, default_value_t = 1)]
    replication: u32,
}

#[derive(Subcommand)]
enum QueryWhat {
    /// Summary of an address (or `scripthash:<hex>`).
    Address { address: String },
    /// Transactions of an address, newest first, 25 a page.
    Txs {
        address: String,
        /// Continue after this txid (the last of the previous page).
        #[arg(long)]
        after: Option<String>,
    },
    /// Unspent outputs of an address.
    Utxo { address: String },
    /// A transaction, with each input's spent output.
    Tx { txid: String },
    /// A block by hash or height.
    Block { id: String },
}

fn bar(len: u64, message: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{msg:>10} [{bar:40}] {pos}/{len} ({per_sec}, eta {eta})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(message.to_string());
    bar
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("signal handler");
        tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// mimalloc asks for transparent huge pages, so the first touch of any 2 MiB of a worker's memory
/// zeroes all of it. Every worker process touches its windows' memory afresh, so with eight workers on
/// small shards that zeroing was the main cost they add over one (`clear_page_erms`, 75% of the extra
/// CPU in `perf`). With 4 KiB pages: 584k txs, 8 workers / 1 worker 1.29 → 1.17 CPU per tx; one
/// worker's CPU and one large shard's unchanged (doc/performance.md).
fn disable_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    if let Err(error) = rustix::thread::disable_transparent_huge_pages(true) {
        tracing::warn!(%error, "could not disable transparent huge pages");
    }
}

/// RocksDB allocates through glibc's malloc (our own code goes through mimalloc). glibc gives a thread
/// that allocates an arena of its own, up to 8 per core, and an arena keeps what is freed in it (it gives
/// back only what lies at its top). A worker's blocking threads come and go, so over a 7.99M-tx backfill
/// its arenas grew to 13–15 holding ~510 MiB, of which RocksDB was using ~80 (memtables, table readers,
/// block cache), and that peak grew with the chain. One arena for all threads: the worker's peak RSS on
/// 32M txs 1,276 MiB, against 1,552 with two arenas; with two, 16M txs 1,190 MiB against 1,639 with
/// glibc's default (doc/performance.md). glibc reads the limit only as a process starts, so the worker
/// runs itself again with it set, same process id and arguments; a `MALLOC_ARENA_MAX` already set, by
/// anyone, is left as it is.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::os::unix::process::CommandExt;
        const ARENAS: &str = "MALLOC_ARENA_MAX";
        if std::env::var_os(ARENAS).is_some() {
            return;
        }
        // `/proc/self/exe` is the running binary's inode, so this works even after the file on disk
        // was replaced or deleted (an upgrade under a running worker); argv[0] stays as it was.
        let mut args = std::env::args_os();
        let mut command = std::process::Command::new("/proc/self/exe");
        if let Some(arg0) = args.next() {
            command.arg0(arg0);
        }
        let error = command.args(args).env(ARENAS, "1").exec();
        tracing::warn!(%error, "could not start again with {ARENAS}=1: glibc may keep more freed memory");
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            // The cause chain, one line, without a backtrace: this is for people, not for debugging.
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Gen {
            out,
            blocks,
            seed,
            txs_per_block,
            hot_address_share,
        } => {
            let config = GenConfig {
                blocks,
                seed,
                txs_per_block,
                hot_address_share,
            };
            let progress = bar(blocks as u64, "generate");
            let summary = tokio::task::spawn_blocking(move || {
                chainidx_core::generator::generate(&config, &out, &mut |h| {
                    progress.set_position(h as u64 + 1)
                })
                .map(|s| (s, out))
            })
            .await??;
            let (summary, out) = summary;
            println!(
                "wrote {} blocks, {} txs, {} inputs, {} outputs, {} addresses to {} (tip {})",
                summary.blocks,
                summary.txs,
                summary.inputs,
                summary.outputs,
                summary.addresses,
                out.display(),
                summary.tip_hash
            );
        }
        Command::Up(args) => up(args).await?,
        Command::Coordinator {
            source,
            id,
            data,
            join,
            replication,
            grpc,
            http,
            network,
            shard_blocks,
            min_workers,
            reorg_limit,
        } => {
            let network =
                chainidx_core::chain::parse_network(&network).map_err(anyhow::Error::msg)?;
            let spec = source.clone();
            let source =
                tokio::task::spawn_blocking(move || chainidx_core::source::open(&spec)).await??;
            let grpc_listener = tokio::net::TcpListener::bind(&grpc)
                .await
                .with_context(|| format!("binding {grpc}"))?;
            let http_listener = tokio::net::TcpListener::bind(&http)
                .await
                .with_context(|| format!("binding {http}"))?;
            // One line for scripts (and the sandbox) to learn the bound ports.
            eprintln!(
                "coordinator: gRPC {} HTTP {}",
                grpc_listener.local_addr()?,
                http_listener.local_addr()?
            );
            let config = chainidx_coordinator::CoordinatorConfig {
                network,
                shard_blocks,
                min_workers,
                replication,
                reorg_limit,
                id,
                data_dir: data,
                join,
            };
            chainidx_coordinator::run(
                config,
                source,
                grpc_listener,
                http_listener,
                shutdown_signal(),
            )
            .await?;
        }
        Command::Node {
            coordinator,
            source,
            data,
            listen,
            advertise,
            name,
            index_threads,
            compact_after_backfill,
            cache_mib,
            mmap_reads,
            window_txs,
            recent_coins_mib,
            resolve_batch,
            txid_filter_mib,
        } => {
            // First: it may run the process again, and nothing set before would survive that.
            limit_malloc_arenas();
            chainidx_node::rocks::set_block_cache_bytes((cache_mib as usize) << 20);
            chainidx_node::rocks::set_mmap_reads(mmap_reads);
            disable_transparent_huge_pages();
            run_worker(
                WorkerArgs {
                    coordinator,
                    source,
                    data,
                    listen,
                    advertise,
                    name,
                    index_threads,
                    compact_after_backfill,
                    window_txs: window_txs as usize,
                    recent_coins_bytes: (recent_coins_mib as usize) << 20,
                    resolve_batch: resolve_batch as usize,
                    txid_filter_bytes: (txid_filter_mib as usize) << 20,
                },
                shutdown_signal(),
            )
            .await?;
        }
        Command::Query { server, what } => {
            let path = match what {
                QueryWhat::Address { address } => match address.strip_prefix("scripthash:") {
                    Some(hash) => format!("/scripthash/{hash}"),
                    None => format!("/address/{address}"),
                },
                QueryWhat::Txs { address, after } => match after {
                    Some(txid) => format!("/address/{address}/txs/chain/{txid}"),
                    None => format!("/address/{address}/txs"),
                },
                QueryWhat::Utxo { address } => format!("/address/{address}/utxo"),
                QueryWhat::Tx { txid } => format!("/tx/{txid}"),
                QueryWhat::Block { id } if id.len() < 64 => {
                    let hash = http_get(&server, &format!("/block-height/{id}")).await?;
                    format!("/block/{}", hash.as_str().unwrap_or_default())
                }
                QueryWhat::Block { id } => format!("/block/{id}"),
            };
            println!(
                "{}",
                serde_json::to_string_pretty(&http_get(&server, &path).await?)?
            );
        }
        Command::Members {
            coordinator,
            remove,
        } => {
            let mut target = coordinator.trim_start_matches("http://").to_string();
            let status = loop {
                let mut client = chainidx_proto::coordinator_client::CoordinatorClient::connect(
                    format!("http://{target}"),
                )
                .await
                .with_context(|| format!("connecting to coordinator {target}"))?;
                let Some(id) = remove else {
                    break client
                        .cluster_status(chainidx_proto::ClusterStatusRequest {})
                        .await?
                        .into_inner()
                        .members;
                };
                match client
                    .remove_coordinator(chainidx_proto::RemoveCoordinatorRequest { id })
                    .await
                {
                    Ok(reply) => break reply.into_inner().members,
                    Err(status) => match status
                        .metadata()
                        .get(chainidx_coordinator::grpc::LEADER_KEY)
                        .and_then(|v| v.to_str().ok())
                    {
                        Some(leader) if leader != target => target = leader.to_string(),
                        _ => bail!("removing coordinator {id}: {}", status.message()),
                    },
                }
            };
            for member in status {
                println!(
                    "{}\t{}\tgrpc {}\thttp {}",
                    member.id,
                    if member.voter { "voter" } else { "learner" },
                    member.grpc_addr,
                    member.http_addr
                );
            }
        }
        Command::Status { server } => {
            println!(
                "{}",
                serde_json::to_string_pretty(&http_get(&server, "/cluster/status").await?)?
            );
        }
    }
    Ok(())
}

/// GETs a path; JSON bodies are parsed, plain-text bodies come back as a JSON string. Errors carry the
/// server's message.
async fn http_get(server: &str, path: &str) -> anyhow::Result<serde_json::Value> {
    let url = format!("{}{path}", server.trim_end_matches('/'));
    let reply = reqwest::get(&url)
        .await
        .with_context(|| format!("GET {url}"))?;
    let status = reply.status();
    let text = reply.text().await?;
    let body = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
    if !status.is_success() {
        let message = body
            .get("error")
            .and_then(|e| e.as_str())
            .map(str::to_string)
            .unwrap_or_else(|| body.to_string());
        bail!("{status}: {message}");
    }
    Ok(body)
}

async fn up(args: UpArgs) -> anyhow::Result<()> {
    let UpArgs {
        source,
        workers,
        data,
        http,
        grpc,
        network,
        shard_blocks,
        blocks,
        exit_after_backfill,
        reorg_limit,
        coordinators,
        replication,
    } = args;
    if workers == 0 {
        bail!("--workers must be at least 1");
    }
    let (source, default_network) = match source {
        Some(source) => (source, "mainnet"),
        None => {
            let dir = data.join("chain");
            let config = GenConfig {
                blocks,
                ..GenConfig::default()
            };
            let progress = bar(blocks as u64, "generate");
            let gen_dir = dir.clone();
            let gen_progress = progress.clone();
            let generated = tokio::task::spawn_blocking(move || {
                ensure_generated(&gen_dir, &config, &mut |h| {
                    gen_progress.set_position(h as u64 + 1)
                })
            })
            .await??;
            let cluster_dir = data.join("cluster");
            if generated && cluster_dir.exists() {
                // Shard databases of a previous chain would be refused; they index a chain that is gone.
                std::fs::remove_dir_all(&cluster_dir)
                    .with_context(|| format!("clearing {}", cluster_dir.display()))?;
            }
            progress.finish_and_clear();
            eprintln!("chain: {} ({} blocks)", dir.display(), blocks);
            (format!("blk:{}", dir.display()), "regtest")
        }
    };
    let network =
        chainidx_core::chain::parse_network(network.as_deref().unwrap_or(default_network))
            .map_err(anyhow::Error::msg)?;
    let spec = source.clone();
    let tip = tokio::task::spawn_blocking(move || chainidx_core::source::open(&spec)?.tip_height())
        .await??;
    let shard_blocks = shard_blocks.unwrap_or_else(|| ((tip + 1) / (workers as u32 * 4)).max(1));
    let binary = std::env::current_exe()?;
    let sandbox = SandboxBuilder::new(binary, source.clone(), data.join("cluster"))
        .workers(workers)
        .shard_blocks(shard_blocks)
        .reorg_limit(reorg_limit)
        .coordinators(coordinators)
        .replication(replication)
        .network(network)
        .grpc_addr(grpc)
        .http_addr(http)
        .start()
        .await?;
    eprintln!("cluster: {workers} workers, shards of {shard_blocks} blocks, source {source}");
    let started = Instant::now();
    let index_bar = bar(tip as u64 + 1, "index");
    let resolve_bar = bar(0, "resolve");
    let status = sandbox
        .wait_for_backfill(Duration::from_secs(24 * 3600), |status| {
            let indexed: u64 = status
                .shards
                .iter()
                .map(|s| (s.next_height - s.start_height) as u64)
                .sum();
            index_bar.set_position(indexed);
            let pending: u64 = status.shards.iter().map(|s| s.pending_inputs).sum();
            if indexed > tip as u64 {
                resolve_bar.set_length(resolve_bar.length().unwrap_or(0).max(pending));
                resolve_bar.set_position(resolve_bar.length().unwrap_or(0) - pending);
            }
        })
        .await?;
    index_bar.finish();
    resolve_bar.finish();
    eprintln!(
        "backfill complete: {} blocks in {} shards in {:.1}s",
        status.tip_height + 1,
        status.shards.len(),
        started.elapsed().as_secs_f64()
    );
    println!(
        "HTTP (Esplora API): {}   e.g. curl {}/blocks/tip/height",
        sandbox.http_url(),
        sandbox.http_url()
    );
    println!("gRPC (Query):       {}", sandbox.grpc_url());
    println!("status:             {}/cluster/status", sandbox.http_url());
    if exit_after_backfill {
        sandbox.shutdown().await;
        return Ok(());
    }
    println!("serving; Ctrl-C to stop");
    shutdown_signal().await;
    sandbox.shutdown().await;
    Ok(())
}
