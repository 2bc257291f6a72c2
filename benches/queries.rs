//! Query benchmark: a 16-shard cluster (2 worker processes) on a generated chain whose top "exchange"
//! address touches nearly every transaction; p50/p99 latency over HTTP for address summaries, first and
//! deep history pages, UTXOs and tx lookups, and summary throughput with 8 clients.
//!
//! Run: `cargo bench --profile dev --bench queries` (env CHAINIDX_BENCH_BLOCKS, default 128 blocks of
//! ~2,500 txs: ~300k txs on the hot address; 416 gives 1.01M). Writes target/bench-queries.json.

use chainidx::sandbox::SandboxBuilder;
use chainidx_core::generator::{GenConfig, generate};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

const SAMPLES: usize = 300;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn measure(
    client: &reqwest::Client,
    base: &str,
    paths: &[String],
) -> anyhow::Result<(f64, f64)> {
    let mut ms = Vec::with_capacity(paths.len());
    for path in paths {
        let started = Instant::now();
        let reply = client.get(format!("{base}{path}")).send().await?;
        anyhow::ensure!(
            reply.status().is_success(),
            "GET {path}: {}",
            reply.status()
        );
        reply.bytes().await?;
        ms.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    ms.sort_by(|a, b| a.total_cmp(b));
    Ok((percentile(&ms, 0.5), percentile(&ms, 0.99)))
}

fn main() -> anyhow::Result<()> {
    let blocks: u32 = std::env::var("CHAINIDX_BENCH_BLOCKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(128);
    let dir = tempfile::tempdir()?;
    let chain = dir.path().join("chain");
    let started = Instant::now();
    generate(
        &GenConfig {
            blocks,
            seed: 5,
            txs_per_block: 2500,
            hot_address_share: 1.0,
        },
        &chain,
        &mut |_| {},
    )?;
    let truth: Value = serde_json::from_str(&std::fs::read_to_string(chain.join("truth.json"))?)?;
    let hot = truth["hot_address"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    println!(
        "chain: {} txs; hot address {hot} with {} txs (generated in {:.1}s)",
        truth["txs"],
        truth["hot_address_tx_count"],
        started.elapsed().as_secs_f64()
    );
    // Ordinary addresses to query: every 997th line of the ground truth.
    let truth_tsv = std::fs::read_to_string(chain.join("truth.tsv"))?;
    let addresses: Vec<String> = truth_tsv
        .lines()
        .skip(1)
        .step_by(997)
        .filter_map(|l| l.split('\t').next().map(str::to_string))
        .collect();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let sandbox = SandboxBuilder::new(
            env!("CARGO_BIN_EXE_chainidx"),
            format!("blk:{}", chain.display()),
            dir.path().join("cluster"),
        )
        .workers(2)
        .shard_blocks(blocks.div_ceil(16))
        .start()
        .await?;
        let started = Instant::now();
        let status = sandbox
            .wait_for_backfill(Duration::from_secs(3600), |_| {})
            .await?;
        println!(
            "backfill: {} shards in {:.1}s",
            status.shards.len(),
            started.elapsed().as_secs_f64()
        );
        // Queries are measured on the databases as they stay: compacted once the backfill is over.
        let started = Instant::now();
        sandbox
            .wait_for_compactions(Duration::from_secs(3600))
            .await?;
        println!(
            "compaction after the backfill: {:.1}s",
            started.elapsed().as_secs_f64()
        );
        let base = sandbox.http_url();
        let client = reqwest::Client::new();
        let pick = |f: &dyn Fn(&str) -> String| -> Vec<String> {
            (0..SAMPLES)
                .map(|i| f(&addresses[i % addresses.len()]))
                .collect()
        };
        let hot_txs: Value = client
            .get(format!("{base}/address/{hot}/txs/chain"))
            .send()
            .await?
            .json()
            .await?;
        let some_txids: Vec<String> = hot_txs
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|t| t["txid"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        // A cursor deep in the hot address's history: a tx from the middle of the chain.
        let middle_block: String = client
            .get(format!("{base}/block-height/{}", blocks / 2))
            .send()
            .await?
            .text()
            .await?;
        let middle_txids: Value = client
            .get(format!("{base}/block/{middle_block}/txids"))
            .send()
            .await?
            .json()
            .await?;
        let deep_cursor = middle_txids[1].as_str().unwrap_or_default().to_string();

        let cases: Vec<(&str, Vec<String>)> = vec![
            ("address summary", pick(&|a| format!("/address/{a}"))),
            (
                "hot address summary",
                (0..SAMPLES).map(|_| format!("/address/{hot}")).collect(),
            ),
            (
                "history first page",
                pick(&|a| format!("/address/{a}/txs/chain")),
            ),
            (
                "hot history first page",
                (0..SAMPLES)
                    .map(|_| format!("/address/{hot}/txs/chain"))
                    .collect(),
            ),
            (
                "hot history deep page",
                (0..SAMPLES)
                    .map(|_| format!("/address/{hot}/txs/chain/{deep_cursor}"))
                    .collect(),
            ),
            ("utxos", pick(&|a| format!("/address/{a}/utxo"))),
            (
                "tx lookup",
                (0..SAMPLES)
                    .map(|i| format!("/tx/{}", some_txids[i % some_txids.len().max(1)]))
                    .collect(),
            ),
        ];
        let mut report = serde_json::Map::new();
        for (name, paths) in &cases {
            let before = sandbox.status().await?;
            let (p50, p99) = measure(&client, &base, paths).await?;
            let after = sandbox.status().await?;
            // Shards ruled out by their per-shard stats, per history/UTXO query of this kind.
            let queries = after.history_queries - before.history_queries;
            let skipped = match queries {
                0 => String::new(),
                q => format!(
                    "  shards skipped {:.1} of {} per query",
                    (after.shards_skipped - before.shards_skipped) as f64 / q as f64,
                    after.shards.len()
                ),
            };
            println!("{name:>24}: p50 {p50:6.2} ms  p99 {p99:6.2} ms{skipped}");
            report.insert(
                name.to_string(),
                json!({
                    "p50_ms": p50, "p99_ms": p99,
                    "shards": after.shards.len(),
                    "shards_skipped_per_query": if queries == 0 { Value::Null } else {
                        json!((after.shards_skipped - before.shards_skipped) as f64 / queries as f64)
                    },
                }),
            );
        }
        // Throughput: 8 clients, 2,000 summaries in all.
        let paths = pick(&|a| format!("/address/{a}"));
        let started = Instant::now();
        let mut tasks = Vec::new();
        for c in 0..8 {
            let (client, base, paths) = (client.clone(), base.clone(), paths.clone());
            tasks.push(tokio::spawn(async move {
                for i in 0..250 {
                    let _ = client
                        .get(format!("{base}{}", paths[(c * 250 + i) % paths.len()]))
                        .send()
                        .await?
                        .bytes()
                        .await?;
                }
                anyhow::Ok(())
            }));
        }
        for task in tasks {
            task.await??;
        }
        let qps = 2000.0 / started.elapsed().as_secs_f64();
        println!("summary throughput, 8 clients: {qps:.0} queries/s");
        report.insert("summary_qps_8_clients".into(), json!(qps));
        report.insert(
            "hot_address_tx_count".into(),
            truth["hot_address_tx_count"].clone(),
        );
        chainidx::sandbox::write_bench_report("queries", &Value::Object(report))?;
        sandbox.shutdown().await;
        anyhow::Ok(())
    })
}
