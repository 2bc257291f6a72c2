//! `chainidx node`: one worker process.

use anyhow::Context;
use chainidx_node::WorkerNode;
use chainidx_proto::coordinator_client::CoordinatorClient;
use std::path::PathBuf;
use std::time::Duration;

pub struct WorkerArgs {
    /// One or more coordinator gRPC addresses, comma-separated; the leader is found from any of them.
    pub coordinator: String,
    pub source: String,
    pub data: PathBuf,
    pub listen: String,
    /// Address other processes use to reach this worker; defaults to the bound address.
    pub advertise: Option<String>,
    /// Identity kept across restarts, so the coordinator hands the same shards back; defaults to the
    /// data directory.
    pub name: Option<String>,
    /// Shards indexed at once; default: the machine's cores.
    pub index_threads: Option<usize>,
    /// Compact each shard once its backfill is over.
    pub compact_after_backfill: bool,
    /// Txs per backfill window.
    pub window_txs: usize,
    /// Inputs per resolution batch.
    pub resolve_batch: usize,
    /// Bytes for the coins of recent windows, shared by the shards being indexed.
    pub recent_coins_bytes: usize,
    /// Bytes of peers' txid filters held at most.
    pub txid_filter_bytes: usize,
}

pub async fn run_worker(
    args: WorkerArgs,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let source_spec = args.source.clone();
    let source = tokio::task::spawn_blocking(move || chainidx_core::source::open(&source_spec))
        .await?
        .with_context(|| format!("opening source {}", args.source))?;
    std::fs::create_dir_all(&args.data)
        .with_context(|| format!("creating {}", args.data.display()))?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let bound = listener.local_addr()?;
    let advertise = args.advertise.clone().unwrap_or_else(|| bound.to_string());
    let name = args.name.clone().unwrap_or_else(|| {
        std::fs::canonicalize(&args.data)
            .unwrap_or_else(|_| args.data.clone())
            .display()
            .to_string()
    });
    let index_threads = args
        .index_threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    let node = WorkerNode::with_index_threads(source, args.data.clone(), index_threads);
    node.set_compact_after_backfill(args.compact_after_backfill);
    node.set_window_txs(args.window_txs);
    node.set_resolve_batch(args.resolve_batch);
    node.set_recent_coins_bytes(args.recent_coins_bytes);
    node.set_txid_filter_budget(args.txid_filter_bytes);
    let server = tokio::spawn(chainidx_node::service::run(
        node.clone(),
        listener,
        shutdown,
    ));
    tracing::info!(%bound, %advertise, data = %args.data.display(), "worker listening");

    node.enforce_leases();
    let coordinators: Vec<String> = args
        .coordinator
        .split(',')
        .map(|c| c.trim())
        .filter(|c| !c.is_empty())
        .map(|c| c.trim_start_matches("http://").to_string())
        .collect();
    if coordinators.is_empty() {
        anyhow::bail!("--coordinator needs at least one address");
    }
    let heartbeats = tokio::spawn(keep_lease(node.clone(), coordinators, advertise, name));
    tokio::select! {
        result = server => result??,
        result = heartbeats => result??,
    }
    Ok(())
}

/// Registers with the coordinators' Raft leader and renews the lease every [`HEARTBEAT`], finding the
/// leader again whenever it changes (followers name it; otherwise the next known coordinator is tried).
async fn keep_lease(
    node: std::sync::Arc<WorkerNode>,
    mut coordinators: Vec<String>,
    advertise: String,
    name: String,
) -> anyhow::Result<()> {
    let mut current = 0;
    let mut registered = false;
    let mut failures = 0u32;
    let started = std::time::Instant::now();
    loop {
        if node.isolated() {
            // The fault filter drops this heartbeat, as a partition would.
            tokio::time::sleep(HEARTBEAT).await;
            continue;
        }
        let target = coordinators[current % coordinators.len()].clone();
        let sent_at = std::time::Instant::now();
        let result = async {
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{target}"))?
                .connect_timeout(Duration::from_millis(300))
                .timeout(Duration::from_millis(800))
                .connect()
                .await?;
            let mut client = CoordinatorClient::new(channel);
            if !registered {
                client
                    .register_worker(chainidx_proto::RegisterWorkerRequest {
                        grpc_addr: advertise.clone(),
                        name: name.clone(),
                    })
                    .await?;
                tracing::info!(coordinator = %target, "registered with the coordinators' leader");
            }
            let reply = client
                .heartbeat(chainidx_proto::HeartbeatRequest {
                    name: name.clone(),
                    grpc_addr: advertise.clone(),
                })
                .await?
                .into_inner();
            anyhow::Ok((client, reply))
        }
        .await;
        match result {
            Ok((_, reply)) => {
                registered = true;
                failures = 0;
                node.grant(
                    sent_at,
                    Duration::from_millis(reply.lease_ms as u64),
                    reply.shards.iter().map(|s| s.shard_id),
                );
                node.set_cluster_backfill_complete(reply.backfill_complete);
                for member in reply.coordinators {
                    if !coordinators.contains(&member) {
                        coordinators.push(member);
                    }
                }
                tokio::time::sleep(HEARTBEAT).await;
            }
            Err(error) => {
                failures += 1;
                let status = error.downcast_ref::<tonic::Status>();
                let leader = status.and_then(|s| {
                    s.metadata()
                        .get(chainidx_coordinator::grpc::LEADER_KEY)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string)
                });
                if status.is_some_and(|s| s.code() == tonic::Code::NotFound) {
                    registered = false; // the leader does not know us (or knows an old address)
                }
                match leader {
                    Some(leader) => {
                        if !coordinators.contains(&leader) {
                            coordinators.push(leader.clone());
                        }
                        current = coordinators.iter().position(|c| *c == leader).unwrap_or(0);
                    }
                    None => current += 1,
                }
                if failures % 20 == 1 {
                    tracing::warn!(coordinator = %target, %error, "no lease renewal; trying the coordinators");
                }
                if !registered && started.elapsed() > REGISTER_DEADLINE && failures > 100 {
                    anyhow::bail!(
                        "could not register with any coordinator of {coordinators:?}: {error}"
                    );
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// How often the lease is renewed: several renewals per lease, so one lost heartbeat costs nothing.
const HEARTBEAT: Duration = Duration::from_millis(300);
/// A worker that never manages to register gives up after this long.
const REGISTER_DEADLINE: Duration = Duration::from_secs(60);
