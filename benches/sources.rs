//! Source benchmark against a real bitcoind (regtest): how fast `rpc:` fetches blocks despite the node's
//! slow keep-alive RPC replies, how fast `datadir:` reads the same chain (blk + rev undo data), and what the
//! undo data saves in a backfill (no search for the shard that owns each spent coin).
//!
//! Run: `cargo bench --profile dev --bench sources` (needs ./scripts/install-deps.sh for bitcoind;
//! env CHAINIDX_BENCH_TXS, default 1500 wallet txs). Prints figures and writes target/bench-sources.json.

use chainidx::regtest_node::Bitcoind;
use chainidx::sandbox::SandboxBuilder;
use chainidx_core::source;
use serde_json::json;
use std::time::{Duration, Instant};

fn main() -> anyhow::Result<()> {
    let txs: usize = std::env::var("CHAINIDX_BENCH_TXS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1500);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(run(txs))
}

async fn run(txs: usize) -> anyhow::Result<()> {
    let mut node = Bitcoind::start().await;
    let miner = node
        .rpc("getnewaddress", json!([]))
        .await
        .as_str()
        .unwrap_or_default()
        .to_string();
    node.rpc("generatetoaddress", json!([120, miner])).await;
    let mut payees = Vec::new();
    for _ in 0..50 {
        payees.push(node.rpc("getnewaddress", json!([])).await);
    }
    let started = Instant::now();
    for i in 0..txs {
        node.rpc("sendtoaddress", json!([payees[i % payees.len()], 0.001]))
            .await;
        if i % 50 == 49 {
            node.rpc("generatetoaddress", json!([1, miner])).await;
        }
    }
    node.rpc("generatetoaddress", json!([1, miner])).await;
    let tip = node
        .rpc("getblockcount", json!([]))
        .await
        .as_u64()
        .unwrap_or(0) as u32;
    println!(
        "chain: {tip} blocks, {txs} wallet txs made in {:.1}s",
        started.elapsed().as_secs_f64()
    );

    // The quirk: a call on a reused keep-alive connection vs a fresh connection per call, for RPC
    // (getblockcount) and REST (/rest/block/<tip>.bin).
    let url = format!("http://127.0.0.1:{}/", node.rpc_port);
    let tip_hash = node.rpc("getbestblockhash", json!([])).await;
    let rest_url = format!(
        "{url}rest/block/{}.bin",
        tip_hash.as_str().unwrap_or_default()
    );
    let body = json!({"jsonrpc": "1.0", "id": "b", "method": "getblockcount", "params": []});
    let mut per_call = serde_json::Map::new();
    for (kind, idle) in [("keepalive", 8usize), ("fresh", 0)] {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(idle)
            .build()?;
        let started = Instant::now();
        for _ in 0..20 {
            client
                .post(&url)
                .basic_auth("chainidx", Some("test"))
                .json(&body)
                .send()
                .await?
                .bytes()
                .await?;
        }
        let rpc_ms = started.elapsed().as_secs_f64() * 1000.0 / 20.0;
        let started = Instant::now();
        for _ in 0..20 {
            client.get(&rest_url).send().await?.bytes().await?;
        }
        let rest_ms = started.elapsed().as_secs_f64() * 1000.0 / 20.0;
        println!("{kind:>9} connection: RPC {rpc_ms:.1} ms/call, REST block {rest_ms:.1} ms/call");
        per_call.insert(format!("rpc_ms_{kind}"), json!(rpc_ms));
        per_call.insert(format!("rest_ms_{kind}"), json!(rest_ms));
    }

    // Fetch throughput: every block through each source, one thread.
    let fetch = move |spec: String| -> anyhow::Result<(f64, u64, u64)> {
        let source = source::open(&spec)?;
        let started = Instant::now();
        let (mut bytes, mut coins) = (0u64, 0u64);
        for height in 0..=tip {
            bytes += source.block_bytes(height)?.len() as u64;
            coins += source
                .spent_coins(height)?
                .map_or(0, |s| s.iter().map(|t| t.len() as u64).sum());
        }
        Ok((started.elapsed().as_secs_f64(), bytes, coins))
    };
    let rpc_spec = node.source_spec();
    let (rpc_s, rpc_bytes, _) = tokio::task::spawn_blocking(move || fetch(rpc_spec)).await??;
    println!(
        "rpc: fetch {} blocks ({rpc_bytes} bytes): {rpc_s:.2}s, {:.0} blocks/s",
        tip + 1,
        (tip + 1) as f64 / rpc_s
    );

    // Backfill through rpc: while the node runs, then through datadir: after a clean stop (flushes files).
    let rpc_backfill = backfill(node.source_spec(), tip).await?;
    let _ = node.try_rpc("stop", json!([])).await;
    node.wait_for_exit(Duration::from_secs(30));
    let datadir_spec = format!("datadir:{}", node.datadir_path().display());
    let spec = datadir_spec.clone();
    let (dd_s, dd_bytes, dd_coins) = tokio::task::spawn_blocking(move || fetch(spec)).await??;
    println!(
        "datadir: fetch {} blocks ({dd_bytes} bytes) + {dd_coins} undo coins: {dd_s:.2}s, {:.0} blocks/s ({:.1}x rpc)",
        tip + 1,
        (tip + 1) as f64 / dd_s,
        rpc_s / dd_s
    );
    let datadir_backfill = backfill(datadir_spec, tip).await?;
    println!(
        "backfill (2 workers): rpc {:.2}s, datadir {:.2}s; cross-shard inputs {} — rpc searches earlier shards for each, \
         datadir knows value, script and owner from undo data and only notifies the owner",
        rpc_backfill.0, datadir_backfill.0, rpc_backfill.1
    );
    let report = json!({
        "blocks": tip + 1, "wallet_txs": txs,
        "per_call": per_call,
        "rpc_fetch_blocks_per_s": (tip + 1) as f64 / rpc_s, "datadir_fetch_blocks_per_s": (tip + 1) as f64 / dd_s,
        "backfill_seconds_rpc": rpc_backfill.0, "backfill_seconds_datadir": datadir_backfill.0,
        "cross_shard_inputs": rpc_backfill.1,
    });
    chainidx::sandbox::write_bench_report("sources", &report)?;
    Ok(())
}

async fn backfill(spec: String, tip: u32) -> anyhow::Result<(f64, u64)> {
    let dir = tempfile::tempdir()?;
    let sandbox = SandboxBuilder::new(env!("CARGO_BIN_EXE_chainidx"), spec, dir.path())
        .workers(2)
        .shard_blocks((tip + 1).div_ceil(8))
        .start()
        .await?;
    let started = Instant::now();
    let status = sandbox
        .wait_for_backfill(Duration::from_secs(600), |_| {})
        .await?;
    let elapsed = started.elapsed().as_secs_f64();
    sandbox.shutdown().await;
    Ok((
        elapsed,
        status.shards.iter().map(|s| s.cross_shard_inputs).sum(),
    ))
}
