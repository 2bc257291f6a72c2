//! A real cluster on loopback: one coordinator in this process (or a Raft group of coordinator child
//! processes), each worker a child process of the `chainidx` binary, all on port 0. Used by `chainidx up`,
//! the tests and the benches.

use anyhow::{Context, bail};
use chainidx_proto::coordinator_client::CoordinatorClient;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

#[derive(Clone)]
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
    coordinators: usize,
    replication: u32,
    compact_after_backfill: bool,
    /// `--window-txs` for every worker; `None`: the default.
    window_txs: Option<usize>,
    /// `--resolve-batch` for every worker; `None`: the default.
    resolve_batch: Option<usize>,
    /// More `chainidx node` arguments for worker `i` (every start of it).
    worker_args: Vec<(usize, Vec<String>)>,
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
            coordinators: 1,
            replication: 1,
            compact_after_backfill: true,
            window_txs: None,
            resolve_batch: None,
            worker_args: Vec::new(),
        }
    }

    /// Inputs per resolution batch in every worker (`--resolve-batch`): small ones make a small test
    /// chain's shards resolve in several batches, as a real chain's do.
    pub fn resolve_batch(mut self, inputs: usize) -> Self {
        self.resolve_batch = Some(inputs);
        self
    }

    /// Txs per backfill window in every worker (`--window-txs`): small ones make a small test chain's
    /// shards go through several windows, as a real chain's do.
    pub fn window_txs(mut self, window_txs: usize) -> Self {
        self.window_txs = Some(window_txs);
        self
    }

    /// Coordinator replicas: 1 runs in this process; more run as child processes forming a Raft group.
    pub fn coordinators(mut self, coordinators: usize) -> Self {
        self.coordinators = coordinators.max(1);
        self
    }

    /// Whether workers compact a shard once its backfill is over (`--compact-after-backfill`).
    pub fn compact_after_backfill(mut self, on: bool) -> Self {
        self.compact_after_backfill = on;
        self
    }

    /// Workers holding each shard.
    pub fn replication(mut self, replication: u32) -> Self {
        self.replication = replication;
        self
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

    /// More `chainidx node` arguments for worker `i`, on every start of it (e.g. `--txid-filter-mib 0`).
    pub fn worker_args(mut self, i: usize, args: &[&str]) -> Self {
        self.worker_args
            .push((i, args.iter().map(|a| a.to_string()).collect()));
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

    /// Starts the coordinator(s) and the workers, and returns once every worker has registered.
    pub async fn start(self) -> anyhow::Result<Sandbox> {
        std::fs::create_dir_all(&self.data_dir)
            .with_context(|| format!("creating {}", self.data_dir.display()))?;
        let mut sandbox = Sandbox {
            grpc_addr: "127.0.0.1:0".parse()?,
            http_addr: "127.0.0.1:0".parse()?,
            data_dir: self.data_dir.clone(),
            binary: self.binary.clone(),
            source: self.source.clone(),
            children: Vec::new(),
            stop: None,
            coordinator: None,
            coordinators: Vec::new(),
            config: self.clone(),
        };
        if self.coordinators == 1 {
            self.start_embedded_coordinator(&mut sandbox).await?;
        } else {
            for i in 0..self.coordinators {
                let join = sandbox.coordinators.first().map(|c| c.grpc.to_string());
                let process = self.spawn_coordinator(i, join).await?;
                sandbox.coordinators.push(process);
            }
            sandbox.grpc_addr = sandbox.coordinators[0].grpc;
            sandbox.http_addr = sandbox.coordinators[0].http;
            // Generous: with the whole suite running on two cores (and shards compacting), forming the
            // group once took over 30 s in CI; alone it takes ~2 s.
            sandbox
                .wait_for_members(self.coordinators, Duration::from_secs(90))
                .await?;
        }
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

    async fn start_embedded_coordinator(&self, sandbox: &mut Sandbox) -> anyhow::Result<()> {
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
        sandbox.grpc_addr = grpc.local_addr()?;
        sandbox.http_addr = http.local_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let config = chainidx_coordinator::CoordinatorConfig {
            network: self.network,
            shard_blocks: self.shard_blocks,
            min_workers: self.workers,
            replication: self.replication,
            reorg_limit: self.reorg_limit,
            id: 1,
            data_dir: self.data_dir.join("coordinator-1"),
            join: None,
        };
        sandbox.coordinator = Some(tokio::spawn(chainidx_coordinator::run(
            config,
            source,
            grpc,
            http,
            async {
                let _ = stopped.await;
            },
        )));
        sandbox.stop = Some(stop);
        Ok(())
    }

    /// Starts coordinator `i` (Raft id i + 1) as a child process and reads its bound ports from its log.
    async fn spawn_coordinator(
        &self,
        i: usize,
        join: Option<String>,
    ) -> anyhow::Result<CoordinatorProcess> {
        let dir = self.data_dir.join(format!("coordinator-{}", i + 1));
        std::fs::create_dir_all(&dir)?;
        let log_path = dir.join("coordinator.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        let start_len = std::fs::metadata(&log_path)?.len() as usize;
        let mut command = Command::new(&self.binary);
        command
            .arg("coordinator")
            .args(["--id", &(i + 1).to_string()])
            .arg("--data")
            .arg(&dir)
            .args(["--source", &self.source])
            .args(["--network", &self.network.to_string()])
            .args(["--grpc", "127.0.0.1:0", "--http", "127.0.0.1:0"])
            .args(["--shard-blocks", &self.shard_blocks.to_string()])
            .args(["--min-workers", &self.workers.to_string()])
            .args(["--replication", &self.replication.to_string()])
            .args(["--reorg-limit", &self.reorg_limit.to_string()]);
        if let Some(join) = &join {
            command.args(["--join", join]);
        }
        let child = command
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting coordinator {}", self.binary.display()))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            if let Some(line) = text[start_len.min(text.len())..]
                .lines()
                .find(|l| l.starts_with("coordinator: gRPC "))
            {
                let parts: Vec<&str> = line.split_whitespace().collect();
                return Ok(CoordinatorProcess {
                    id: i as u64 + 1,
                    grpc: parts[2].parse()?,
                    http: parts[4].parse()?,
                    child: Some(child),
                });
            }
            if Instant::now() > deadline {
                bail!(
                    "coordinator {} did not start; see {}",
                    i + 1,
                    log_path.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A coordinator replica running as a child process.
pub struct CoordinatorProcess {
    pub id: u64,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    child: Option<Child>,
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
    /// Coordinator child processes (empty when the one coordinator runs in this process).
    pub coordinators: Vec<CoordinatorProcess>,
    config: SandboxBuilder,
}

impl Sandbox {
    /// Starts worker `i` as a child process, logging to `worker-i/worker.log` (appended across restarts).
    /// This machine's cores divided among the workers started on it (at least one each).
    fn index_threads(&self) -> usize {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        (cores / self.config.workers.max(1)).max(1)
    }

    fn spawn_worker(&self, i: usize, failpoints: Option<&str>) -> anyhow::Result<Child> {
        let dir = self.data_dir.join(format!("worker-{i}"));
        std::fs::create_dir_all(&dir)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("worker.log"))?;
        let mut sizes = Vec::new();
        if let Some(txs) = self.config.window_txs {
            sizes.extend(["--window-txs".to_string(), txs.to_string()]);
        }
        if let Some(inputs) = self.config.resolve_batch {
            sizes.extend(["--resolve-batch".to_string(), inputs.to_string()]);
        }
        for (_, args) in self.config.worker_args.iter().filter(|(w, _)| *w == i) {
            sizes.extend(args.iter().cloned());
        }
        Command::new(&self.binary)
            .arg("node")
            .args(["--coordinator", &self.coordinator_list()])
            .args(["--source", &self.source])
            .arg("--data")
            .arg(&dir)
            .args(["--listen", "127.0.0.1:0"])
            // The sandbox packs every worker onto this machine: they share its cores, as separate
            // machines would not.
            .args(["--index-threads", &self.index_threads().to_string()])
            .args([
                "--compact-after-backfill",
                &self.config.compact_after_backfill.to_string(),
            ])
            .args(sizes)
            // The async runtime too: eight workers with two runtime threads each on two cores spent
            // their CPU switching between them.
            .env("TOKIO_WORKER_THREADS", self.index_threads().to_string())
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

    /// Starts one more worker process (index `workers`) and waits until it has registered.
    pub async fn add_worker(&mut self) -> anyhow::Result<usize> {
        let before = self.status().await?.workers.len();
        let i = self.children.len();
        let child = self.spawn_worker(i, None)?;
        self.children.push(child);
        self.wait_for_workers(before + 1, Duration::from_secs(60))
            .await?;
        Ok(i)
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

    /// HTTP base URL of the first live coordinator (every replica serves queries).
    pub fn http_url(&self) -> String {
        match self.coordinators.iter().find(|c| c.child.is_some()) {
            Some(live) => format!("http://{}", live.http),
            None => format!("http://{}", self.http_addr),
        }
    }

    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.grpc_addr)
    }

    /// Every coordinator's gRPC address, comma-separated (what workers are given).
    fn coordinator_list(&self) -> String {
        if self.coordinators.is_empty() {
            return self.grpc_addr.to_string();
        }
        self.coordinators
            .iter()
            .map(|c| c.grpc.to_string())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Live coordinators' gRPC addresses, the leader's first when known.
    fn live_coordinators(&self) -> Vec<SocketAddr> {
        if self.coordinators.is_empty() {
            return vec![self.grpc_addr];
        }
        self.coordinators
            .iter()
            .filter(|c| c.child.is_some())
            .map(|c| c.grpc)
            .collect()
    }

    /// Cluster status from the first live coordinator that answers, preferring one that knows a leader
    /// (any replica answers; its shard map is the replicated one).
    pub async fn status(&self) -> anyhow::Result<chainidx_proto::ClusterStatusReply> {
        let mut last_error = anyhow::anyhow!("no live coordinator");
        let mut leaderless = None;
        for addr in self.live_coordinators() {
            let reply = async {
                let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
                    .connect_timeout(Duration::from_millis(500))
                    .timeout(Duration::from_secs(5))
                    .connect()
                    .await?;
                let mut client = CoordinatorClient::new(channel);
                anyhow::Ok(
                    client
                        .cluster_status(chainidx_proto::ClusterStatusRequest {})
                        .await?
                        .into_inner(),
                )
            }
            .await;
            match reply {
                Ok(status) if status.leader != 0 => return Ok(status),
                Ok(status) => leaderless = Some(status),
                Err(error) => last_error = error,
            }
        }
        leaderless.ok_or(last_error)
    }

    /// Status as one particular coordinator replica sees it.
    pub async fn status_of(&self, i: usize) -> anyhow::Result<chainidx_proto::ClusterStatusReply> {
        let mut client =
            CoordinatorClient::connect(format!("http://{}", self.coordinators[i].grpc)).await?;
        Ok(client
            .cluster_status(chainidx_proto::ClusterStatusRequest {})
            .await?
            .into_inner())
    }

    /// Index (into `coordinators`) of the current Raft leader.
    pub async fn leader(&self) -> anyhow::Result<usize> {
        let status = self.status().await?;
        self.coordinators
            .iter()
            .position(|c| c.id == status.leader && c.child.is_some())
            .ok_or_else(|| anyhow::anyhow!("no live leader (status says {})", status.leader))
    }

    /// Kills coordinator `i` with SIGKILL.
    pub async fn kill_coordinator(&mut self, i: usize) -> anyhow::Result<()> {
        if let Some(mut child) = self.coordinators[i].child.take() {
            child.start_kill()?;
            child.wait().await?;
        }
        Ok(())
    }

    /// Starts one more coordinator process and has it join the group through a live member (an online
    /// membership change); returns its index.
    pub async fn add_coordinator(&mut self) -> anyhow::Result<usize> {
        let via = self.live_coordinators()[0].to_string();
        let i = self.coordinators.len();
        let process = self.config.spawn_coordinator(i, Some(via)).await?;
        self.coordinators.push(process);
        Ok(i)
    }

    /// Removes coordinator `id` from the Raft group (asking the leader).
    pub async fn remove_coordinator(&self, id: u64) -> anyhow::Result<()> {
        let leader = self.leader().await?;
        let mut client =
            CoordinatorClient::connect(format!("http://{}", self.coordinators[leader].grpc))
                .await?;
        client
            .remove_coordinator(chainidx_proto::RemoveCoordinatorRequest { id })
            .await?;
        Ok(())
    }

    /// HTTP base URL of a live coordinator (any replica serves queries).
    pub fn http_url_of(&self, i: usize) -> String {
        format!("http://{}", self.coordinators[i].http)
    }

    async fn wait_for_members(&self, members: usize, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(status) = self.status().await
                && status.members.iter().filter(|m| m.voter).count() >= members
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "coordinators did not form a group of {members} within {timeout:?}; see {}/coordinator-*/coordinator.log",
                    self.data_dir.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The current gRPC address of worker process `i` (as registered under its data directory).
    pub async fn worker_addr(&self, i: usize) -> anyhow::Result<String> {
        let dir = self.data_dir.join(format!("worker-{i}"));
        let name = std::fs::canonicalize(&dir)?.display().to_string();
        let status = self.status().await?;
        status
            .worker_names
            .iter()
            .position(|n| *n == name)
            .map(|at| status.workers[at].clone())
            .ok_or_else(|| anyhow::anyhow!("worker {i} ({name}) is not registered"))
    }

    /// Cuts worker `i` off from the coordinators (or heals it) with its transport fault filter.
    pub async fn isolate_worker(&self, addr: &str, isolated: bool) -> anyhow::Result<()> {
        let mut client = chainidx_node::connect_worker(addr).await?;
        client
            .set_faults(chainidx_proto::FaultFilter {
                isolate_from_coordinators: isolated,
            })
            .await?;
        Ok(())
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

    /// Every registered worker's own status (`Worker.Status`).
    pub async fn worker_statuses(&self) -> anyhow::Result<Vec<chainidx_proto::WorkerStatusReply>> {
        let mut replies = Vec::new();
        for addr in &self.status().await?.workers {
            let mut client = chainidx_node::connect_worker(addr).await?;
            let request = chainidx_proto::WorkerStatusRequest {};
            replies.push(client.status(request).await?.into_inner());
        }
        Ok(replies)
    }

    /// Waits until no worker has an after-backfill compaction queued or running, so that what is measured
    /// next sees the databases as they stay.
    pub async fn wait_for_compactions(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let queued: u32 = self
                .worker_statuses()
                .await?
                .iter()
                .map(|w| w.compactions_queued)
                .sum();
            if queued == 0 {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{queued} shard compactions still queued after {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
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
        for coordinator in &mut self.coordinators {
            if let Some(mut child) = coordinator.child.take() {
                let _ = child.kill().await;
            }
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
        for coordinator in &mut self.coordinators {
            if let Some(child) = coordinator.child.as_mut() {
                let _ = child.start_kill();
            }
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
    let (user, system) = cpu_seconds_split(pid);
    user + system
}

/// [`cpu_seconds`] as (user, system): the kernel's share shows, for example, the cost of each process
/// faulting in its own memory.
pub fn cpu_seconds_split(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th of those.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let seconds = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 100.0 // USER_HZ is 100 on Linux
    };
    (seconds(11), seconds(12))
}

/// Minor page faults of a process so far, from /proc (Linux; 0 elsewhere): each is a page the kernel
/// zeroed and mapped, so they show memory a process touched afresh (a transparent huge page counts once).
pub fn minor_faults(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // minflt is the 8th field after the parenthesised command name.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    rest.split_whitespace()
        .nth(7)
        .and_then(|f| f.parse().ok())
        .unwrap_or(0)
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
