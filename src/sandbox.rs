//! A real cluster on loopback: the coordinator in this process, each worker a child process of the
//! `chainidx` binary, all gRPC on port 0. Used by `chainidx up`, the tests and the benches.

use anyhow::{Context, bail};
use chainidx_proto::coordinator_client::CoordinatorClient;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

pub struct SandboxBuilder {
    binary: PathBuf,
    source: String,
    data_dir: PathBuf,
    workers: usize,
    shard_blocks: u32,
    network: bitcoin::Network,
    grpc_addr: String,
    http_addr: String,
    reorg_limit: u32,
    /// `CHAINIDX_FAILPOINTS` for a worker's first start (crash tests); restarts run without.
    failpoints: Vec<(usize, String)>,
}

impl SandboxBuilder {
    /// `binary` is the `chainidx` executable the workers run (`env!("CARGO_BIN_EXE_chainidx")` in tests).
    pub fn new(
        binary: impl Into<PathBuf>,
        source: impl Into<String>,
        data_dir: impl Into<PathBuf>,
    ) -> SandboxBuilder {
        SandboxBuilder {
            binary: binary.into(),
            source: source.into(),
            data_dir: data_dir.into(),
            workers: 2,
            shard_blocks: 500,
            network: bitcoin::Network::Regtest,
            grpc_addr: "127.0.0.1:0".into(),
            http_addr: "127.0.0.1:0".into(),
            reorg_limit: 100,
            failpoints: Vec::new(),
        }
    }

    pub fn workers(mut self, workers: usize) -> Self {
        self.workers = workers;
        self
    }

    pub fn shard_blocks(mut self, shard_blocks: u32) -> Self {
        self.shard_blocks = shard_blocks;
        self
    }

    pub fn network(mut self, network: bitcoin::Network) -> Self {
        self.network = network;
        self
    }

    /// Arms failpoints (`name=N,...`, see `chainidx_node::failpoint`) in worker `i`'s first process.
    pub fn worker_failpoints(mut self, i: usize, spec: impl Into<String>) -> Self {
        self.failpoints.push((i, spec.into()));
        self
    }

    /// Deepest reorg rolled back while following the tip (default 100).
    pub fn reorg_limit(mut self, blocks: u32) -> Self {
        self.reorg_limit = blocks;
        self
    }

    pub fn grpc_addr(mut self, addr: impl Into<String>) -> Self {
        self.grpc_addr = addr.into();
        self
    }

    pub fn http_addr(mut self, addr: impl Into<String>) -> Self {
        self.http_addr = addr.into();
        self
    }

    /// Starts the coordinator and the workers, and returns once every worker has registered.
    pub async fn start(self) -> anyhow::Result<Sandbox> {
        std::fs::create_dir_all(&self.data_dir)
            .with_context(|| format!("creating {}", self.data_dir.display()))?;
        let source_spec = self.source.clone();
        let source = tokio::task::spawn_blocking(move || chainidx_core::source::open(&source_spec))
            .await?
            .with_context(|| format!("opening source {}", self.source))?;
        let grpc = tokio::net::TcpListener::bind(&self.grpc_addr)
            .await
            .with_context(|| format!("binding gRPC {}", self.grpc_addr))?;
        let http = tokio::net::TcpListener::bind(&self.http_addr)
            .await
            .with_context(|| format!("binding HTTP {}", self.http_addr))?;
        let grpc_addr = grpc.local_addr()?;
        let http_addr = http.local_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let config = chainidx_coordinator::CoordinatorConfig {
            network: self.network,
            shard_blocks: self.shard_blocks,
            min_workers: self.workers,
            reorg_limit: self.reorg_limit,
        };
        let coordinator = tokio::spawn(chainidx_coordinator::run(
            config,
            source,
            grpc,
            http,
            async {
                let _ = stopped.await;
            },
        ));

        let mut sandbox = Sandbox {
            grpc_addr,
            http_addr,
            data_dir: self.data_dir,
            binary: self.binary,
            source: self.source,
            children: Vec::new(),
            stop: Some(stop),
            coordinator: Some(coordinator),
        };
        for i in 0..self.workers {
            let failpoints = self
                .failpoints
                .iter()
                .find(|(w, _)| *w == i)
                .map(|(_, spec)| spec.as_str());
            let child = sandbox.spawn_worker(i, failpoints)?;
            sandbox.children.push(child);
        }
        sandbox
            .wait_for_workers(self.workers, Duration::from_secs(60))
            .await?;
        Ok(sandbox)
    }
}

pub struct Sandbox {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub data_dir: PathBuf,
    binary: PathBuf,
    source: String,
    children: Vec<Child>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    coordinator:
        Option<tokio::task::JoinHandle<Result<(), chainidx_coordinator::CoordinatorError>>>,
}

impl Sandbox {
    /// Starts worker `i` as a child process, logging to `worker-i/worker.log` (appended across restarts).
    fn spawn_worker(&self, i: usize, failpoints: Option<&str>) -> anyhow::Result<Child> {
        let dir = self.data_dir.join(format!("worker-{i}"));
        std::fs::create_dir_all(&dir)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("worker.log"))?;
        Command::new(&self.binary)
            .arg("node")
            .args(["--coordinator", &format!("http://{}", self.grpc_addr)])
            .args(["--source", &self.source])
            .arg("--data")
            .arg(&dir)
            .args(["--listen", "127.0.0.1:0"])
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("CHAINIDX_FAILPOINTS", failpoints.unwrap_or(""))
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting worker {}", self.binary.display()))
    }

    /// Kills worker `i` with SIGKILL (no chance to flush or say goodbye), as a crash would.
    pub async fn kill_worker(&mut self, i: usize) -> anyhow::Result<()> {
        let child = &mut self.children[i];
        child.start_kill()?;
        child.wait().await?;
        Ok(())
    }

    /// Waits up to `timeout` for worker `i` to exit by itself (a failpoint); true if it did.
    pub async fn wait_worker_exit(&mut self, i: usize, timeout: Duration) -> bool {
        tokio::time::timeout(timeout, self.children[i].wait())
            .await
            .is_ok()
    }

    /// Starts worker `i` again on its data directory and waits until it has registered again (under the
    /// same identity, at a new address).
    pub async fn restart_worker(&mut self, i: usize) -> anyhow::Result<()> {
        let before = self.status().await?.workers;
        self.children[i] = self.spawn_worker(i, None)?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.status().await?.workers == before {
            if Instant::now() > deadline {
                bail!(
                    "worker {i} did not register again; see {}",
                    self.worker_log(i).display()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    pub fn http_url(&self) -> String {
        format!("http://{}", self.http_addr)
    }

    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.grpc_addr)
    }

    pub async fn status(&self) -> anyhow::Result<chainidx_proto::ClusterStatusReply> {
        let mut client = CoordinatorClient::connect(self.grpc_url()).await?;
        Ok(client
            .cluster_status(chainidx_proto::ClusterStatusRequest {})
            .await?
            .into_inner())
    }

    async fn wait_for_workers(&self, workers: usize, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(status) = self.status().await
                && status.workers.len() >= workers
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "workers did not register within {timeout:?}; see {}/worker-*/worker.log",
                    self.data_dir.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits for `backfill_complete`, calling `progress` with each status; fails on a failed shard or time-out.
    pub async fn wait_for_backfill(
        &self,
        timeout: Duration,
        mut progress: impl FnMut(&chainidx_proto::ClusterStatusReply),
    ) -> anyhow::Result<chainidx_proto::ClusterStatusReply> {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.status().await?;
            progress(&status);
            if let Some(failed) = status
                .shards
                .iter()
                .find(|s| s.phase == chainidx_proto::ShardPhase::Failed as i32)
            {
                bail!(
                    "shard {} failed: {} (logs: {}/worker-*/worker.log)",
                    failed.shard_id,
                    failed.error,
                    self.data_dir.display()
                );
            }
            if status.backfill_complete {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("backfill not complete after {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops the coordinator and the workers.
    pub async fn shutdown(mut self) {
        self.stop_all().await;
    }

    async fn stop_all(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        for child in &mut self.children {
            let _ = child.kill().await;
        }
        if let Some(coordinator) = self.coordinator.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), coordinator).await;
        }
    }

    /// Process ids of the running workers (for CPU and memory figures in benches).
    pub fn worker_pids(&self) -> Vec<u32> {
        self.children.iter().filter_map(|c| c.id()).collect()
    }

    pub fn worker_log(&self, i: usize) -> PathBuf {
        self.data_dir.join(format!("worker-{i}")).join("worker.log")
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.start_kill();
        }
    }
}

/// Generates the default demo chain into `dir` unless the same chain (blocks, seed, txs per block) is
/// already there. Returns whether it generated a new one.
pub fn ensure_generated(
    dir: &Path,
    config: &chainidx_core::generator::GenConfig,
    progress: &mut dyn FnMut(u32),
) -> anyhow::Result<bool> {
    if let Ok(text) = std::fs::read_to_string(dir.join("truth.json"))
        && let Ok(truth) = serde_json::from_str::<serde_json::Value>(&text)
        && truth["blocks"] == config.blocks
        && truth["seed"] == config.seed
        && truth["txs_per_block"] == config.txs_per_block
    {
        return Ok(false);
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    chainidx_core::generator::generate(config, dir, progress)
        .with_context(|| format!("generating a chain into {}", dir.display()))?;
    Ok(true)
}

/// Writes a benchmark's JSON report as `$CARGO_TARGET_DIR/bench-<name>.json` and says where.
pub fn write_bench_report(name: &str, report: &serde_json::Value) -> anyhow::Result<PathBuf> {
    let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
    let path = Path::new(&target).join(format!("bench-{name}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(report)?)?;
    println!("report: {}", path.display());
    Ok(path)
}

/// CPU seconds (user + system) a process has used so far, from /proc (Linux; 0 elsewhere).
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th of those.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0 // USER_HZ is 100 on Linux
}

/// Peak resident memory of a process in bytes (VmHWM), from /proc (Linux; 0 elsewhere).
pub fn peak_rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}
