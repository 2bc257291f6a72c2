//! chainidx-coordinator: splits the chain into block-range shards, hands them to workers, tracks their
//! progress, and answers queries by fanning out to the shards (gRPC `Query`, Esplora HTTP).
//!
//! # Layout
//! - [`cluster`]: the shard map, workers and progress.
//! - [`backfill`]: the driver that plans, assigns and sequences the two backfill phases.
//! - [`router`]: query fan-out and merge.
//! - [`mempool`]: unconfirmed transactions, synced from the source while following the tip.
//! - [`http`] / [`esplora`]: the Esplora HTTP API and its JSON.
//! - [`grpc`]: the `Coordinator` and `Query` gRPC services.
//! - [`error`]: the one mapping from query errors to HTTP statuses and gRPC codes.

pub mod backfill;
pub mod cluster;
pub mod error;
pub mod esplora;
pub mod grpc;
pub mod http;
pub mod lease;
pub mod mempool;
pub mod raft;
pub mod raft_net;
pub mod router;
pub mod state;

use chainidx_core::source::BlockSource;
use chainidx_proto as pb;
use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

pub struct CoordinatorConfig {
    pub network: bitcoin::Network,
    /// Blocks per shard.
    pub shard_blocks: u32,
    /// Workers to wait for before assigning shards.
    pub min_workers: usize,
    /// Workers holding each shard (default 1).
    pub replication: u32,
    /// Deepest reorg rolled back while following the tip; a deeper one halts the index (default 100).
    pub reorg_limit: u32,
    /// This coordinator's Raft id (unique in the group, never reused).
    pub id: u64,
    /// Where the Raft log and snapshots live.
    pub data_dir: PathBuf,
    /// gRPC address of a running coordinator to join; none: start a new group with this one as its only
    /// member (or rejoin the group recorded in `data_dir`).
    pub join: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error("gRPC server: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("HTTP server: {0}")]
    Http(#[from] std::io::Error),
    #[error("raft storage at {path}: {detail}")]
    Storage { path: String, detail: String },
    #[error("raft: {0}")]
    Raft(String),
}

/// Copies openraft's view (leader, term, members) into the cluster view, where status and request
/// handlers read it.
pub fn refresh_raft_view(raft: &raft::Raft, cluster: &cluster::Cluster) {
    let metrics = raft.metrics().borrow().clone();
    let membership = metrics.membership_config.membership();
    let voters: Vec<u64> = membership.voter_ids().collect();
    let members = membership
        .nodes()
        .map(|(id, node)| pb::CoordinatorMember {
            id: *id,
            grpc_addr: node.grpc.clone(),
            http_addr: node.http.clone(),
            voter: voters.contains(id),
        })
        .collect();
    cluster.set_raft(cluster::RaftView {
        this: metrics.id,
        leader: metrics.current_leader,
        term: metrics.current_term,
        members,
    });
}

/// Serves gRPC on `grpc` and HTTP on `http`, takes part in the coordinator Raft group and, while leader,
/// drives the cluster, until `shutdown` completes.
pub async fn run(
    config: CoordinatorConfig,
    source: Arc<dyn BlockSource>,
    grpc: TcpListener,
    http: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), CoordinatorError> {
    let cluster = Arc::new(cluster::Cluster::new(config.network));
    let router = router::QueryRouter::new(cluster.clone());
    let raft_dir = config.data_dir.join("raft");
    let storage_error = |detail: String| CoordinatorError::Storage {
        path: raft_dir.display().to_string(),
        detail,
    };
    std::fs::create_dir_all(&raft_dir).map_err(|e| storage_error(e.to_string()))?;
    let store: Arc<dyn chainidx_core::store::Store> = Arc::new(
        chainidx_node::rocks::RocksStore::open(&raft_dir)
            .map_err(|e| storage_error(e.to_string()))?,
    );
    let state_machine = raft::StateMachine::open(store.clone(), cluster.clone())
        .map_err(|e| storage_error(e.to_string()))?;
    let raft_config = openraft::Config {
        cluster_name: "chainidx".into(),
        heartbeat_interval: 150,
        election_timeout_min: 750,
        election_timeout_max: 1500,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(1000),
        max_in_snapshot_log_to_keep: 200,
        ..Default::default()
    }
    .validate()
    .map_err(|e| CoordinatorError::Raft(e.to_string()))?;
    let raft = raft::Raft::new(
        config.id,
        Arc::new(raft_config),
        raft_net::Network,
        raft::LogStore::new(store.clone()),
        state_machine,
    )
    .await
    .map_err(|e| CoordinatorError::Raft(e.to_string()))?;
    let me = raft::CoordinatorNode {
        grpc: grpc.local_addr()?.to_string(),
        http: http.local_addr()?.to_string(),
    };
    let initialized = raft
        .is_initialized()
        .await
        .map_err(|e| CoordinatorError::Raft(e.to_string()))?;
    if !initialized {
        match &config.join {
            None => {
                raft.initialize(BTreeMap::from([(config.id, me.clone())]))
                    .await
                    .map_err(|e| CoordinatorError::Raft(e.to_string()))?;
                tracing::info!(id = config.id, "started a new coordinator group");
            }
            Some(target) => {
                tokio::spawn(join_group(target.clone(), config.id, me.clone()));
            }
        }
    }
    {
        let raft = raft.clone();
        let cluster = cluster.clone();
        tokio::spawn(async move {
            let mut metrics = raft.metrics();
            refresh_raft_view(&raft, &cluster);
            while metrics.changed().await.is_ok() {
                refresh_raft_view(&raft, &cluster);
            }
        });
    }

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };

    let driver = tokio::spawn(backfill::drive(
        cluster.clone(),
        router.clone(),
        source,
        raft.clone(),
        backfill::BackfillPlan {
            shard_blocks: config.shard_blocks,
            min_workers: config.min_workers,
            replication: config.replication,
            reorg_limit: config.reorg_limit,
            follow_every: Duration::from_millis(250),
        },
    ));

    let grpc_server = tonic::transport::Server::builder()
        .add_service(pb::coordinator_server::CoordinatorServer::new(
            grpc::CoordinatorService {
                cluster: cluster.clone(),
                raft: raft.clone(),
            },
        ))
        .add_service(
            pb::raft_server::RaftServer::new(raft_net::RaftService { raft: raft.clone() })
                .max_decoding_message_size(chainidx_node::worker::MAX_MESSAGE_BYTES),
        )
        .add_service(
            pb::query_server::QueryServer::new(grpc::QueryService {
                router: router.clone(),
            })
            .max_encoding_message_size(chainidx_node::worker::MAX_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(grpc).with_nodelay(Some(true)),
            stopped(stop_rx.clone()),
        );
    let http_server =
        axum::serve(http, http::routes(router)).with_graceful_shutdown(stopped(stop_rx));
    let (grpc_result, http_result) = tokio::join!(grpc_server, http_server);
    driver.abort();
    let _ = raft.shutdown().await;
    grpc_result?;
    http_result?;
    Ok(())
}

/// Asks a running coordinator (following leader hints) to add this one to the group, until it does.
async fn join_group(target: String, id: u64, me: raft::CoordinatorNode) {
    let mut target = target;
    for attempt in 1.. {
        let url = if target.starts_with("http") {
            target.clone()
        } else {
            format!("http://{target}")
        };
        let result = async {
            let mut client = pb::coordinator_client::CoordinatorClient::connect(url).await?;
            let reply = client
                .add_coordinator(pb::AddCoordinatorRequest {
                    id,
                    grpc_addr: me.grpc.clone(),
                    http_addr: me.http.clone(),
                })
                .await;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(reply)
        }
        .await;
        match result {
            Ok(Ok(_)) => {
                tracing::info!(id, via = %target, "joined the coordinator group");
                return;
            }
            Ok(Err(status)) => {
                if let Some(leader) = status
                    .metadata()
                    .get(grpc::LEADER_KEY)
                    .and_then(|v| v.to_str().ok())
                {
                    target = leader.to_string();
                }
                tracing::warn!(attempt, error = %status.message(), "joining the coordinator group; retrying");
            }
            Err(error) => {
                tracing::warn!(attempt, %error, "joining the coordinator group; retrying")
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
