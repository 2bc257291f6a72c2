//! `chainidx node`: one worker process.

use anyhow::Context;
use chainidx_node::WorkerNode;
use chainidx_proto::coordinator_client::CoordinatorClient;
use std::path::PathBuf;
use std::time::Duration;

pub struct WorkerArgs {
    pub coordinator: String,
    pub source: String,
    pub data: PathBuf,
    pub listen: String,
    /// Address other processes use to reach this worker; defaults to the bound address.
    pub advertise: Option<String>,
    /// Identity kept across restarts, so the coordinator hands the same shards back; defaults to the
    /// data directory.
    pub name: Option<String>,
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
    let node = WorkerNode::new(source, args.data.clone());
    let server = tokio::spawn(chainidx_node::service::run(node, listener, shutdown));
    tracing::info!(%bound, %advertise, data = %args.data.display(), "worker listening");

    let coordinator_url = if args.coordinator.starts_with("http") {
        args.coordinator.clone()
    } else {
        format!("http://{}", args.coordinator)
    };
    let mut attempt = 0;
    loop {
        attempt += 1;
        let registered = async {
            let mut client = CoordinatorClient::connect(coordinator_url.clone()).await?;
            let request = chainidx_proto::RegisterWorkerRequest {
                grpc_addr: advertise.clone(),
                name: name.clone(),
            };
            anyhow::Ok(
                client
                    .register_worker(request)
                    .await?
                    .into_inner()
                    .worker_id,
            )
        }
        .await;
        match registered {
            Ok(id) => {
                tracing::info!(id, coordinator = %coordinator_url, "registered with coordinator");
                break;
            }
            Err(error) if attempt < 120 => {
                tracing::warn!(%error, coordinator = %coordinator_url, "cannot register yet; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(error) => {
                return Err(
                    error.context(format!("registering with coordinator {coordinator_url}"))
                );
            }
        }
    }
    server.await??;
    Ok(())
}
