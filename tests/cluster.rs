//! A real cluster (3 worker processes, gRPC on loopback, RocksDB) on a generated chain with small shards, so
//! many spends cross shards; every answer is checked against the independent reference indexer and the
//! generator's own ground truth.

mod common;

use chainidx::sandbox::SandboxBuilder;
use chainidx_core::generator::{GenConfig, generate};
use common::check::{Api, cluster_matches_reference};
use common::reference::Reference;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_answer_exactly_like_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    let chain = dir.path().join("chain");
    let config = GenConfig {
        blocks: 240,
        seed: 7,
        txs_per_block: 30,
        hot_address_share: 0.3,
    };
    let gen_dir = chain.clone();
    tokio::task::spawn_blocking(move || generate(&config, &gen_dir, &mut |_| {}))
        .await
        .unwrap()
        .unwrap();

    let sandbox = SandboxBuilder::new(
        env!("CARGO_BIN_EXE_chainidx"),
        format!("blk:{}", chain.display()),
        dir.path().join("cluster"),
    )
    .workers(3)
    .shard_blocks(20)
    // ~600 txs per shard in windows of 200: coins of earlier windows are read back from `outputs`, as
    // in large shards.
    .window_txs(200)
    // Several resolution batches per shard too.
    .resolve_batch(100)
    // The second worker's shards serve txid filters that rule out everything, as out-of-date ones could:
    // inputs spending their coins are found by walking back through every earlier shard, the others are
    // sent where the filters say.
    .worker_failpoints(1, "txid-filter:rule-out-all=on")
    // The third holds no filters at all (as past its memory budget): it asks every earlier shard about
    // every input, nearest first, until one holds the coin.
    .worker_args(2, &["--txid-filter-mib", "0"])
    // The first reads its table files through mmap (what a worker holding one large shard may be given).
    .worker_args(0, &["--mmap-reads"])
    .start()
    .await
    .unwrap();
    let status = sandbox
        .wait_for_backfill(Duration::from_secs(300), |_| {})
        .await
        .unwrap();
    assert_eq!(status.tip_height, 239);
    assert_eq!(status.shards.len(), 12);
    let owners: std::collections::BTreeSet<&str> =
        status.shards.iter().map(|s| s.owner.as_str()).collect();
    assert_eq!(
        owners.len(),
        3,
        "shards spread over all workers: {owners:?}"
    );
    let cross: u64 = status.shards.iter().map(|s| s.cross_shard_inputs).sum();
    assert!(
        cross > 1000,
        "too few cross-shard spends to test resolution: {cross}"
    );
    assert!(status.shards.iter().all(|s| s.pending_inputs == 0));
    // Workers run without transparent huge pages (zeroing 2 MiB per first touch was most of what extra
    // workers cost); the kernel reports the process's setting.
    let pids = sandbox.worker_pids();
    for pid in &pids {
        let proc_status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        if let Some(line) = proc_status.lines().find(|l| l.starts_with("THP_enabled:")) {
            assert_eq!(
                line.split_whitespace().nth(1),
                Some("0"),
                "worker {pid}: {line}"
            );
        }
    }
    // Workers limit glibc's malloc arenas, where RocksDB's freed memory piled up: each ran itself again
    // with the limit set (or kept the one it was given).
    let arenas = std::env::var("MALLOC_ARENA_MAX").unwrap_or_else(|_| "1".into());
    for pid in &pids {
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
        assert!(
            environ
                .split(|&b| b == 0)
                .any(|var| var == format!("MALLOC_ARENA_MAX={arenas}").as_bytes()),
            "worker {pid} runs without MALLOC_ARENA_MAX={arenas}"
        );
        // It ran itself again through `/proc/self/exe` (which works after an upgrade replaced the file)
        // but kept its argv[0], which is what `ps` and the logs show.
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        let arg0 = cmdline.split(|&b| b == 0).next().unwrap();
        assert_eq!(
            arg0,
            env!("CARGO_BIN_EXE_chainidx").as_bytes(),
            "worker {pid}'s argv[0]"
        );
    }
    // Only the first worker maps its table files (`--mmap-reads`); the others read them.
    let maps_tables = |pid: &u32| {
        std::fs::read_to_string(format!("/proc/{pid}/maps"))
            .unwrap()
            .lines()
            .any(|line| line.ends_with(".sst"))
    };
    assert!(maps_tables(&pids[0]), "worker 0 maps no table file");
    assert!(
        !pids[1..].iter().any(maps_tables),
        "only worker 0 maps its tables"
    );
    let workers = sandbox.worker_statuses().await.unwrap();
    let routed: u64 = workers.iter().map(|w| w.inputs_routed).sum();
    let walked: u64 = workers.iter().map(|w| w.inputs_walked).sum();
    let lookups: u64 = workers.iter().map(|w| w.spend_lookups_sent).sum();
    assert_eq!(
        routed + walked,
        cross,
        "every cross-shard input resolved once"
    );
    assert!(
        routed > cross / 4 && walked > cross / 20,
        "both ways taken: {routed} routed, {walked} walked of {cross}"
    );
    assert!(lookups >= cross, "{lookups} lookups for {cross} inputs");
    let unfiltered: Vec<_> = workers
        .iter()
        .filter(|w| w.txid_filter_bytes == 0 && w.inputs_routed + w.inputs_walked > 0)
        .collect();
    assert_eq!(
        unfiltered.len(),
        1,
        "one worker resolved inputs holding no filters"
    );
    let (inputs, asked) = (
        unfiltered[0].inputs_routed + unfiltered[0].inputs_walked,
        unfiltered[0].spend_lookups_sent,
    );
    assert!(
        asked > inputs + inputs / 10,
        "without filters, inputs are asked about shard by shard: {asked} lookups for {inputs} inputs"
    );
    // Small windows and batches, so that every shard crosses window and batch boundaries: coins of
    // earlier windows are read back, and a tx's inputs are never split between two batches.
    common::assert_shards_crossed_boundaries(
        &sandbox.worker_statuses().await.unwrap(),
        200,
        "cluster",
    );

    let reference = Reference::from_blk_dir(&chain);
    // Filters held: a worker takes its own earlier shards' filters as they are (it keeps them to serve
    // its peers, false ones included) and holds copies only of other workers' shards.
    let filter_bytes = |shard: &chainidx_proto::ShardStatus| {
        let txs = (shard.start_height..shard.end_height)
            .map(|h| reference.block_txids(h).len())
            .sum();
        chainidx_node::txid_filter::TxidFilter::with_capacity(txs).size_bytes() as u64
    };
    let holds_no_copies = sandbox.worker_addr(2).await.unwrap();
    let cluster_workers = sandbox.status().await.unwrap().workers;
    for (addr, worker) in cluster_workers.iter().zip(&workers) {
        if *addr == holds_no_copies {
            assert_eq!(
                worker.txid_filter_bytes, 0,
                "`--txid-filter-mib 0` holds none"
            );
            continue;
        }
        let own: Vec<u32> = worker.shards.iter().map(|s| s.shard_id).collect();
        let last_start = worker.shards.iter().map(|s| s.start_height).max().unwrap();
        let expected: u64 = status
            .shards
            .iter()
            .filter(|s| s.start_height < last_start)
            .filter(|s| !own.contains(&s.shard_id))
            .map(filter_bytes)
            .sum();
        assert_eq!(
            worker.txid_filter_bytes, expected,
            "worker {addr} holds copies of the filters of exactly the earlier shards it does not hold"
        );
    }
    let (scripts, txs) =
        cluster_matches_reference(&sandbox.http_url(), &reference, bitcoin::Network::Regtest).await;
    assert!(
        scripts > 1000 && txs > 5000,
        "chain too small to mean much: {scripts} scripts, {txs} txs"
    );
    eprintln!(
        "checked {scripts} scripts and {txs} txs; {cross} inputs crossed shards ({routed} routed by txid \
         filters, {walked} walked back, {lookups} lookups sent; the worker holding no filters sent \
         {asked} for its {inputs})"
    );

    // The generator's ground truth agrees too (a second, independent oracle).
    let api = Api::new(sandbox.http_url());
    let truth = std::fs::read_to_string(chain.join("truth.tsv")).unwrap();
    let mut lines = truth.lines();
    let header: Vec<&str> = lines.next().unwrap().split('\t').collect();
    assert_eq!(
        header[..6],
        [
            "address",
            "funded_txo_count",
            "funded_sum",
            "spent_txo_count",
            "spent_sum",
            "tx_count"
        ]
    );
    let mut checked = 0;
    for line in lines.step_by(7) {
        let f: Vec<&str> = line.split('\t').collect();
        let got = api.ok(&format!("/address/{}", f[0])).await;
        let s = &got["chain_stats"];
        let got: Vec<String> = [
            "funded_txo_count",
            "funded_txo_sum",
            "spent_txo_count",
            "spent_txo_sum",
            "tx_count",
        ]
        .iter()
        .map(|k| s[k].as_u64().unwrap().to_string())
        .collect();
        assert_eq!(got, f[1..6], "ground truth for {}", f[0]);
        checked += 1;
    }
    assert!(checked > 100);

    // Each worker compacts its shards once its backfill is over (the checks above may have overlapped
    // it); the compacted databases answer exactly the same.
    sandbox
        .wait_for_compactions(Duration::from_secs(120))
        .await
        .unwrap();
    let compacted: usize = (0..3)
        .map(|i| {
            std::fs::read_to_string(sandbox.worker_log(i))
                .unwrap()
                .matches("shard compacted")
                .count()
        })
        .sum();
    assert_eq!(compacted, 12, "every shard compacted once");
    let (scripts_after, txs_after) =
        cluster_matches_reference(&sandbox.http_url(), &reference, bitcoin::Network::Regtest).await;
    assert_eq!((scripts_after, txs_after), (scripts, txs));

    // Clear errors with the right status.
    let (code, body) = api.get("/address/not-an-address").await;
    assert_eq!(code, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("not a valid address"),
        "{body}"
    );
    let (code, _) = api.get("/address/14cZMQk89mRYQkDEj8Rn25AnGoBi5H6uer").await;
    assert_eq!(code, 400, "a mainnet address on a regtest cluster");
    let (code, _) = api.get(&format!("/tx/{}", "00".repeat(32))).await;
    assert_eq!(code, 404);
    let (code, _) = api.get("/tx/zz").await;
    assert_eq!(code, 400);
    let (code, _) = api.get("/block-height/100000").await;
    assert_eq!(code, 404);
    let (code, _) = api.get("/scripthash/abc").await;
    assert_eq!(code, 400);

    // Tip and blocks agree with the source.
    assert_eq!(api.ok("/blocks/tip/height").await, serde_json::json!(239));
    let tip_hash = reference.block_hash(239).to_string();
    assert_eq!(
        api.ok("/blocks/tip/hash").await.as_str(),
        Some(tip_hash.as_str())
    );
    assert_eq!(
        api.ok("/block-height/100").await.as_str(),
        Some(reference.block_hash(100).to_string().as_str())
    );
    let block = api
        .ok(&format!("/block/{}", reference.block_hash(100)))
        .await;
    assert_eq!(block["height"], 100);
    let txids = api
        .ok(&format!("/block/{}/txids", reference.block_hash(100)))
        .await;
    assert_eq!(
        txids.as_array().unwrap().len() as u64,
        block["tx_count"].as_u64().unwrap()
    );
    let want: Vec<String> = reference
        .block_txids(100)
        .iter()
        .map(|t| t.to_string())
        .collect();
    let got: Vec<String> = txids
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect();
    assert_eq!(got, want, "txids of block 100");

    // gRPC Query pages with cursors through the busiest address, like HTTP does.
    let hot = reference
        .scripts()
        .into_iter()
        .max_by_key(|s| reference.summary(s).tx_count)
        .unwrap();
    let hot_address = bitcoin::Address::from_script(&hot, bitcoin::Network::Regtest)
        .unwrap()
        .to_string();
    let mut client = chainidx_proto::query_client::QueryClient::connect(sandbox.grpc_url())
        .await
        .unwrap();
    let mut cursor = String::new();
    let mut seen = Vec::new();
    loop {
        let page = client
            .address_txs(chainidx_proto::AddressTxsQuery {
                address: hot_address.clone(),
                cursor: cursor.clone(),
                limit: 100,
            })
            .await
            .unwrap()
            .into_inner();
        for tx in &page.txs {
            let tx: bitcoin::Transaction = bitcoin::consensus::deserialize(&tx.raw).unwrap();
            seen.push(tx.compute_txid());
        }
        if page.next_cursor.is_empty() {
            break;
        }
        cursor = page.next_cursor;
    }
    assert_eq!(seen, reference.history(&hot));
    assert!(seen.len() > 500, "hot address has {} txs", seen.len());

    // The CLI queries the same API.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_chainidx"))
        .args([
            "query",
            "--server",
            &sandbox.http_url(),
            "address",
            &hot_address,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        printed["chain_stats"]["tx_count"].as_u64(),
        Some(reference.summary(&hot).tx_count)
    );
    sandbox.shutdown().await;
}
