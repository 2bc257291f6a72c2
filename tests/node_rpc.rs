//! Against a real bitcoind (regtest, wallet, txindex): wallet activity of hundreds of transactions over many
//! blocks, backfilled through `rpc:` and `datadir:`, and followed live through reorgs, must equal the node's
//! own answers for every address.

mod common;

use chainidx::regtest_node::{Bitcoind, sats};
use chainidx::sandbox::SandboxBuilder;
use common::check::{Api, full_history, scripthash_hex};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

/// What the node itself says, per script (hex), from `getblock` + `getrawtransaction` (txindex).
#[derive(Default, Debug, PartialEq)]
struct NodeView {
    received: u64,
    funded_count: u64,
    spent: u64,
    spent_count: u64,
    txs: BTreeSet<String>,
    /// Unspent outputs paying the script: (txid, vout, value).
    utxos: BTreeSet<(String, u64, u64)>,
}

/// An amount the node's RPC accepts (the shortest decimal form of sats / 1e8).
fn btc(sats: u64) -> Value {
    json!(sats as f64 / 1e8)
}

async fn make_wallet_activity(node: &Bitcoind, miner: &str, rounds: usize) {
    let mut addresses = Vec::new();
    for _ in 0..30 {
        addresses.push(
            node.rpc("getnewaddress", json!([]))
                .await
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    let mut seed = 7u64;
    let mut next = move |n: usize| {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((seed >> 33) as usize) % n
    };
    for _round in 0..rounds {
        for op in 0..10 {
            if op % 4 == 3 {
                // A batch payout to several (often reused) addresses.
                let mut outputs = serde_json::Map::new();
                for _ in 0..(3 + next(5)) {
                    let to = &addresses[next(addresses.len())];
                    outputs.insert(to.clone(), btc(1_000_000 * (1 + next(50)) as u64));
                }
                node.rpc("sendmany", json!(["", outputs])).await;
            } else {
                let to = &addresses[next(addresses.len())];
                node.rpc(
                    "sendtoaddress",
                    json!([to, btc(5_000_000 * (1 + next(40)) as u64)]),
                )
                .await;
            }
        }
        node.rpc("generatetoaddress", json!([1, miner])).await;
    }
}

async fn node_view(node: &Bitcoind) -> (HashMap<String, NodeView>, usize) {
    let tip = node.rpc("getblockcount", json!([])).await.as_u64().unwrap();
    let mut outputs: HashMap<(String, u64), (String, u64)> = HashMap::new();
    let mut view: HashMap<String, NodeView> = HashMap::new();
    let mut tx_count = 0;
    for height in 0..=tip {
        let hash = node.rpc("getblockhash", json!([height])).await;
        let block = node.rpc("getblock", json!([hash, 1])).await;
        for txid in block["tx"].as_array().unwrap() {
            let txid = txid.as_str().unwrap().to_string();
            if height == 0 {
                continue; // the genesis coinbase is not in txindex
            }
            tx_count += 1;
            let tx = node.rpc("getrawtransaction", json!([txid, 1])).await;
            for input in tx["vin"].as_array().unwrap() {
                if input.get("coinbase").is_some() {
                    continue;
                }
                let prev = (
                    input["txid"].as_str().unwrap().to_string(),
                    input["vout"].as_u64().unwrap(),
                );
                let (script, value) = outputs
                    .get(&prev)
                    .cloned()
                    .expect("spent output seen earlier");
                view.entry(script.clone()).or_default().utxos.remove(&(
                    prev.0.clone(),
                    prev.1,
                    value,
                ));
                let entry = view.entry(script).or_default();
                entry.spent += value;
                entry.spent_count += 1;
                entry.txs.insert(txid.clone());
            }
            for output in tx["vout"].as_array().unwrap() {
                let script = output["scriptPubKey"]["hex"].as_str().unwrap().to_string();
                let value = sats(&output["value"]);
                outputs.insert(
                    (txid.clone(), output["n"].as_u64().unwrap()),
                    (script.clone(), value),
                );
                if script.starts_with("6a") {
                    continue;
                }
                let entry = view.entry(script).or_default();
                entry.received += value;
                entry.funded_count += 1;
                entry
                    .utxos
                    .insert((txid.clone(), output["n"].as_u64().unwrap(), value));
                entry.txs.insert(txid.clone());
            }
        }
    }
    (view, tx_count)
}

struct NodeAnswers {
    miner: String,
    view: HashMap<String, NodeView>,
    tx_count: usize,
    received: Value,
    wallet_utxos: BTreeMap<String, BTreeSet<(String, u64, u64)>>,
    wallet_txs: Vec<(String, Value)>,
}

/// The node's answers: its own decoding of every block (txindex) and its wallet's view.
async fn collect_answers(node: &Bitcoind, miner: &str) -> NodeAnswers {
    let (view, tx_count) = node_view(node).await;
    let received = node.rpc("listreceivedbyaddress", json!([1, false])).await;
    let unspent = node.rpc("listunspent", json!([1, 9_999_999])).await;
    let mut wallet_utxos: BTreeMap<String, BTreeSet<(String, u64, u64)>> = BTreeMap::new();
    for u in unspent.as_array().unwrap() {
        wallet_utxos
            .entry(u["address"].as_str().unwrap().to_string())
            .or_default()
            .insert((
                u["txid"].as_str().unwrap().to_string(),
                u["vout"].as_u64().unwrap(),
                sats(&u["amount"]),
            ));
    }
    let mut wallet_txs = Vec::new();
    for entry in received.as_array().unwrap().iter().take(10) {
        for txid in entry["txids"].as_array().unwrap().iter().take(3) {
            let tx = node.rpc("getrawtransaction", json!([txid, 1])).await;
            wallet_txs.push((txid.as_str().unwrap().to_string(), tx));
        }
    }
    NodeAnswers {
        miner: miner.to_string(),
        view,
        tx_count,
        received,
        wallet_utxos,
        wallet_txs,
    }
}

async fn start_cluster(source: &str, dir: &std::path::Path) -> chainidx::sandbox::Sandbox {
    SandboxBuilder::new(env!("CARGO_BIN_EXE_chainidx"), source, dir)
        .workers(3)
        .shard_blocks(10)
        .start()
        .await
        .unwrap()
}

/// The (txid, vout, value) set of a `/utxo` answer.
async fn utxo_set(api: &Api, path: &str) -> BTreeSet<(String, u64, u64)> {
    api.ok(path)
        .await
        .as_array()
        .unwrap()
        .iter()
        .map(|u: &Value| {
            (
                u["txid"].as_str().unwrap().to_string(),
                u["vout"].as_u64().unwrap(),
                u["value"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Every answer of the cluster behind `api` against the node's own.
async fn check_answers(
    api: &Api,
    node_answers: &NodeAnswers,
    label: &str,
    min_wallet_addresses: usize,
) {
    // 1. Every script the chain touches: totals and tx list equal the node's own decoding (txindex).
    for (script, want) in &node_answers.view {
        let sh = scripthash_hex(&bitcoin::ScriptBuf::from_hex(script).unwrap());
        let got = api.ok(&format!("/scripthash/{sh}")).await;
        let s = &got["chain_stats"];
        let got_view = NodeView {
            received: s["funded_txo_sum"].as_u64().unwrap(),
            funded_count: s["funded_txo_count"].as_u64().unwrap(),
            spent: s["spent_txo_sum"].as_u64().unwrap(),
            spent_count: s["spent_txo_count"].as_u64().unwrap(),
            utxos: utxo_set(api, &format!("/scripthash/{sh}/utxo")).await,
            txs: full_history(api, &format!("/scripthash/{sh}"))
                .await
                .iter()
                .map(|t| t.to_string())
                .collect(),
        };
        assert_eq!(&got_view, want, "{label}: script {script}");
        assert_eq!(
            s["tx_count"].as_u64().unwrap(),
            want.txs.len() as u64,
            "{label}: tx_count of {script}"
        );
    }

    // 2. The wallet's view: received per address, and every unspent output.
    let mut checked = 0;
    for entry in node_answers.received.as_array().unwrap() {
        let address = entry["address"].as_str().unwrap();
        if address == node_answers.miner {
            continue; // coinbase receipts are left out of listreceivedbyaddress
        }
        let got = api.ok(&format!("/address/{address}")).await;
        assert_eq!(
            got["chain_stats"]["funded_txo_sum"].as_u64().unwrap(),
            sats(&entry["amount"]),
            "{label}: received by {address}"
        );
        let history: BTreeSet<String> = full_history(api, &format!("/address/{address}"))
            .await
            .iter()
            .map(|t| t.to_string())
            .collect();
        for txid in entry["txids"].as_array().unwrap() {
            assert!(
                history.contains(txid.as_str().unwrap()),
                "{label}: {address} history lacks {txid}"
            );
        }
        checked += 1;
    }
    assert!(
        checked >= min_wallet_addresses,
        "{label}: only {checked} wallet addresses"
    );
    for (address, want) in &node_answers.wallet_utxos {
        if *address == node_answers.miner {
            continue; // immature coinbases are not listed by the wallet but are unspent outputs
        }
        // Every output the wallet lists as its own and unspent is unspent in the index. (The exact UTXO
        // set of every script was compared above with the node's own decoding of the chain; the wallet
        // can list less, e.g. after a reorg it treats some of its outputs as conflicted.)
        let got = utxo_set(api, &format!("/address/{address}/utxo")).await;
        assert!(
            want.is_subset(&got),
            "{label}: wallet UTXOs of {address} {want:?} not all in {got:?}"
        );
    }

    // 3. Wallet transactions as the node describes them: outputs and block.
    for (txid, theirs) in &node_answers.wallet_txs {
        let ours = api.ok(&format!("/tx/{txid}")).await;
        let ours_values: Vec<u64> = ours["vout"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["value"].as_u64().unwrap())
            .collect();
        let their_values: Vec<u64> = theirs["vout"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| sats(&o["value"]))
            .collect();
        assert_eq!(ours_values, their_values, "{label}: outputs of {txid}");
        assert_eq!(
            ours["status"]["block_hash"], theirs["blockhash"],
            "{label}: block of {txid}"
        );
    }
}

/// Backfills `source` in a 3-worker cluster, checks every answer, returns the cross-shard input count.
async fn check_cluster(source: String, answers: &NodeAnswers, tip: u32) -> u64 {
    let dir = tempfile::tempdir().unwrap();
    let sandbox = start_cluster(&source, dir.path()).await;
    let status = sandbox
        .wait_for_backfill(Duration::from_secs(300), |_| {})
        .await
        .unwrap();
    assert_eq!(status.tip_height, tip, "{source}");
    check_answers(&Api::new(sandbox.http_url()), answers, &source, 25).await;
    sandbox.shutdown().await;
    status.shards.iter().map(|s| s.cross_shard_inputs).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_and_datadir_backfills_equal_the_nodes_own_answers() {
    let mut node = Bitcoind::start().await;
    let miner = new_address(&node).await;
    node.rpc("generatetoaddress", json!([110, miner])).await;
    make_wallet_activity(&node, &miner, 25).await;
    let tip = node.rpc("getblockcount", json!([])).await.as_u64().unwrap() as u32;
    let answers = collect_answers(&node, &miner).await;
    assert!(answers.tx_count > 300, "only {} txs", answers.tx_count);

    let rpc_cross = check_cluster(node.source_spec(), &answers, tip).await;
    assert!(
        rpc_cross > 50,
        "few cross-shard inputs via rpc: {rpc_cross}"
    );

    // The same chain read straight from the node's blocks/ (blk + rev undo data); stop the node first so
    // every block is flushed to disk.
    let _ = node.try_rpc("stop", json!([])).await;
    node.wait_for_exit(Duration::from_secs(30));
    let datadir_cross = check_cluster(
        format!("datadir:{}", node.datadir_path().display()),
        &answers,
        tip,
    )
    .await;
    assert_eq!(
        datadir_cross, rpc_cross,
        "undo data sends the same cross-shard spends to their owners"
    );
}

async fn new_address(node: &Bitcoind) -> String {
    let address = node.rpc("getnewaddress", json!([])).await;
    address.as_str().unwrap().to_string()
}

/// 110 blocks mined to `miner`, backfilled by two workers (shards of 50 blocks) with `failpoints` armed in
/// both, and followed up to the node's tip.
async fn following(
    node: &Bitcoind,
    miner: &str,
    dir: &std::path::Path,
    failpoints: &str,
) -> (chainidx::sandbox::Sandbox, Api) {
    node.rpc("generatetoaddress", json!([110, miner])).await;
    let mut builder = SandboxBuilder::new(env!("CARGO_BIN_EXE_chainidx"), node.source_spec(), dir)
        .workers(2)
        .shard_blocks(50);
    for worker in 0..2 {
        builder = builder.worker_failpoints(worker, failpoints);
    }
    let sandbox = builder.start().await.unwrap();
    sandbox
        .wait_for_backfill(Duration::from_secs(120), |_| {})
        .await
        .unwrap();
    let api = Api::new(sandbox.http_url());
    wait_for_tip(&api, node, Duration::from_secs(30)).await;
    (sandbox, api)
}

/// Polls the cluster until its tip is the node's best block; returns how long that took.
async fn wait_for_tip(api: &Api, node: &Bitcoind, timeout: Duration) -> Duration {
    let best = node.rpc("getbestblockhash", json!([])).await;
    let started = std::time::Instant::now();
    loop {
        let (code, hash) = api.get("/blocks/tip/hash").await;
        if code == 200 && hash == best {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < timeout,
            "cluster tip {hash} is not the node's {best} after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The cluster follows the node: new blocks become queryable, and reorgs 1, 6 and 30 blocks deep (across
/// shards of 10 blocks) roll back exactly and index the new branch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_the_tip_through_reorgs() {
    let node = Bitcoind::start().await;
    let miner = new_address(&node).await;
    // Enough mature coins that the wallet can still pay after 30 blocks are orphaned.
    node.rpc("generatetoaddress", json!([180, miner])).await;
    make_wallet_activity(&node, &miner, 8).await;
    let dir = tempfile::tempdir().unwrap();
    let sandbox = start_cluster(&node.source_spec(), dir.path()).await;
    sandbox
        .wait_for_backfill(Duration::from_secs(300), |_| {})
        .await
        .unwrap();
    let api = Api::new(sandbox.http_url());

    // An unconfirmed payment shows up in the mempool views, then turns confirmed when mined.
    let payee = node.rpc("getnewaddress", json!([])).await;
    let payee_str = payee.as_str().unwrap().to_string();
    let unconfirmed = node.rpc("sendtoaddress", json!([payee, 0.3])).await;
    let txid = unconfirmed.as_str().unwrap().to_string();
    let started = std::time::Instant::now();
    loop {
        let (code, tx) = api.get(&format!("/tx/{txid}")).await;
        if code == 200 {
            assert_eq!(tx["status"]["confirmed"], false, "{tx}");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "unconfirmed tx not visible after 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("unconfirmed tx visible after {:?}", started.elapsed());
    let mempool_txs = api.ok(&format!("/address/{payee_str}/txs/mempool")).await;
    assert_eq!(mempool_txs[0]["txid"].as_str(), Some(txid.as_str()));
    let summary = api.ok(&format!("/address/{payee_str}")).await;
    assert_eq!(summary["mempool_stats"]["funded_txo_sum"], 30_000_000u64);
    assert_eq!(summary["mempool_stats"]["tx_count"], 1);
    assert_eq!(summary["chain_stats"]["tx_count"], 0);
    let first_page = api.ok(&format!("/address/{payee_str}/txs")).await;
    assert_eq!(
        first_page[0]["txid"].as_str(),
        Some(txid.as_str()),
        "unconfirmed first in /txs"
    );

    // New blocks while the cluster runs.
    for _ in 0..4 {
        node.rpc("sendtoaddress", json!([payee, 0.3])).await;
    }
    node.rpc("generatetoaddress", json!([2, miner])).await;
    let latency = wait_for_tip(&api, &node, Duration::from_secs(30)).await;
    eprintln!("new block queryable after {latency:?}");
    let tx = api.ok(&format!("/tx/{txid}")).await;
    assert_eq!(
        tx["status"]["confirmed"], true,
        "mined tx is confirmed: {tx}"
    );
    let started = std::time::Instant::now();
    while !api
        .ok(&format!("/address/{payee_str}/txs/mempool"))
        .await
        .as_array()
        .unwrap()
        .is_empty()
    {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "mined txs still listed as unconfirmed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    check_answers(&api, &collect_answers(&node, &miner).await, "live", 10).await;

    let other_miner = node.rpc("getnewaddress", json!([])).await;
    for depth in [1u64, 6, 30] {
        let tip = node.rpc("getblockcount", json!([])).await.as_u64().unwrap();
        let first_orphan = node.rpc("getblockhash", json!([tip + 1 - depth])).await;
        node.rpc("invalidateblock", json!([first_orphan])).await;
        // Transactions of the orphaned blocks return to the mempool and are re-mined; add new ones too.
        for _ in 0..3 {
            node.rpc("sendtoaddress", json!([payee, 0.2])).await;
        }
        node.rpc("generatetoaddress", json!([depth + 1, other_miner]))
            .await;
        // The wallet counts outputs spent by its unconfirmed txs as spent; mine until none are left so its
        // listunspent speaks of the chain alone.
        for _ in 0..5 {
            if node
                .rpc("getrawmempool", json!([]))
                .await
                .as_array()
                .unwrap()
                .is_empty()
            {
                break;
            }
            node.rpc("generatetoaddress", json!([1, other_miner])).await;
        }
        let latency = wait_for_tip(&api, &node, Duration::from_secs(60)).await;
        eprintln!("reorg of {depth}: new branch queryable after {latency:?}");
        // A 30-deep invalidation leaves most wallet receipts orphaned (this node does not re-mine them), so
        // the wallet part may shrink; the per-script comparison covers the whole chain either way.
        check_answers(
            &api,
            &collect_answers(&node, &miner).await,
            &format!("after a reorg of {depth}"),
            1,
        )
        .await;
    }
    let status = sandbox.status().await.unwrap();
    assert!(status.halted.is_empty(), "{}", status.halted);
    sandbox.shutdown().await;
}

/// A block is in no answer until the served tip reaches it. Each worker waits 2 s after indexing a block
/// it catches up (a failpoint), before its inputs are resolved and the coordinator's tip moves. The worker
/// says it holds the block meanwhile (`Worker.Status`), and every query in that window answers as of the
/// tip before it: the new tx is unconfirmed (from the mempool), its payee has no confirmed tx. Once the tip
/// moves, the tx is confirmed in that block.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_being_caught_up_is_in_no_answer_until_the_tip_moves() {
    let node = Bitcoind::start().await;
    let miner = new_address(&node).await;
    let dir = tempfile::tempdir().unwrap();
    let (sandbox, api) =
        following(&node, &miner, dir.path(), "catch-up:after-index=sleep:2000").await;
    let tip = api.ok("/blocks/tip/height").await.as_u64().unwrap();

    let payee = new_address(&node).await;
    let txid = node.rpc("sendtoaddress", json!([payee, 0.5])).await;
    let txid = txid.as_str().unwrap().to_string();
    let started = std::time::Instant::now();
    while api.get(&format!("/tx/{txid}")).await.0 != 200 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "tx not in the mempool view"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mined = node.rpc("generatetoaddress", json!([1, miner])).await;
    let mined = mined[0].as_str().unwrap().to_string();

    // Until the served tip moves: whenever a worker already holds the new block and the tip read before
    // and after the queries is the old one, the answers are the old tip's.
    let mut checked_while_held = 0;
    let started = std::time::Instant::now();
    loop {
        let tip_before = api.ok("/blocks/tip/height").await.as_u64().unwrap();
        let held = sandbox
            .worker_statuses()
            .await
            .unwrap()
            .iter()
            .flat_map(|worker| &worker.shards)
            .any(|shard| u64::from(shard.next_height) > tip + 1);
        let tx = api.ok(&format!("/tx/{txid}")).await;
        let summary = api.ok(&format!("/address/{payee}")).await;
        let history = api.ok(&format!("/address/{payee}/txs/chain")).await;
        // By hash, which asks every shard (by height, the coordinator's own range may rule it out).
        let (code, block) = api.get(&format!("/block/{mined}")).await;
        let tip_after = api.ok("/blocks/tip/height").await.as_u64().unwrap();
        if tip_after > tip {
            break;
        }
        if held && tip_before == tip {
            assert_eq!(tx["status"]["confirmed"], false, "{tx}");
            assert_eq!(summary["chain_stats"]["tx_count"], 0, "{summary}");
            assert_eq!(history, json!([]));
            assert_eq!(code, 404, "{block}");
            checked_while_held += 1;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the tip did not move"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        checked_while_held > 0,
        "no query ran while a worker held the block and the tip had not moved"
    );
    eprintln!("{checked_while_held} rounds of queries while the block was held above the tip");
    let tx = api.ok(&format!("/tx/{txid}")).await;
    assert_eq!(tx["status"]["confirmed"], true, "{tx}");
    assert_eq!(tx["status"]["block_height"], tip + 1, "{tx}");
    let summary = api.ok(&format!("/address/{payee}")).await;
    assert_eq!(summary["chain_stats"]["tx_count"], 1, "{summary}");
    assert_eq!(
        summary["chain_stats"]["funded_txo_sum"], 50_000_000u64,
        "{summary}"
    );
    sandbox.shutdown().await;
}

/// A catch-up that fails after indexing its block (a failpoint: the worker holds the block for a second,
/// then answers an error, its inputs not resolved) leaves the block above the served tip. The next round
/// of following must catch that shard up again and move the tip, without waiting for another block.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_catch_up_is_caught_up_again_without_a_new_block() {
    let node = Bitcoind::start().await;
    let miner = new_address(&node).await;
    let dir = tempfile::tempdir().unwrap();
    let failpoints = "catch-up:after-index=sleep:1000,catch-up:fails-after-index=fail:1";
    let (sandbox, api) = following(&node, &miner, dir.path(), failpoints).await;
    let payee = new_address(&node).await;
    let txid = node.rpc("sendtoaddress", json!([payee, 0.5])).await;
    node.rpc("generatetoaddress", json!([1, miner])).await;
    let latency = wait_for_tip(&api, &node, Duration::from_secs(60)).await;
    eprintln!("block queryable {latency:?} after it was mined, its first catch-up failed");
    let tx = api.ok(&format!("/tx/{}", txid.as_str().unwrap())).await;
    assert_eq!(tx["status"]["confirmed"], true, "{tx}");
    let summary = api.ok(&format!("/address/{payee}")).await;
    assert_eq!(
        summary["chain_stats"]["funded_txo_sum"], 50_000_000u64,
        "{summary}"
    );
    sandbox.shutdown().await;
}

/// A reorg deeper than the limit stops the index loudly instead of serving a mixed chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reorg_beyond_the_limit_halts_instead_of_serving_a_mixed_chain() {
    let node = Bitcoind::start().await;
    let miner = new_address(&node).await;
    node.rpc("generatetoaddress", json!([40, miner])).await;
    let dir = tempfile::tempdir().unwrap();
    let sandbox = SandboxBuilder::new(
        env!("CARGO_BIN_EXE_chainidx"),
        node.source_spec(),
        dir.path(),
    )
    .workers(2)
    .shard_blocks(10)
    .reorg_limit(3)
    .start()
    .await
    .unwrap();
    sandbox
        .wait_for_backfill(Duration::from_secs(120), |_| {})
        .await
        .unwrap();
    let api = Api::new(sandbox.http_url());
    let first_orphan = node.rpc("getblockhash", json!([36])).await;
    node.rpc("invalidateblock", json!([first_orphan])).await;
    let other = node.rpc("getnewaddress", json!([])).await;
    node.rpc("generatetoaddress", json!([6, other])).await;
    let started = std::time::Instant::now();
    let halted = loop {
        let status = sandbox.status().await.unwrap();
        if !status.halted.is_empty() {
            break status.halted;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "a 5-deep reorg with limit 3 did not halt the index"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(halted.contains("deeper than the limit of 3"), "{halted}");
    let (code, body) = api.get(&format!("/address/{miner}")).await;
    assert_eq!(code, 503, "{body}");
    assert!(body["error"].as_str().unwrap().contains("halted"), "{body}");
    sandbox.shutdown().await;
}

/// A source that stops having blocks mid-range (here: the shard reaches past the node's tip, as when a node
/// is stopped or pruned under a running backfill) fails the shard after retries with an error naming the
/// height, and leaves only whole blocks behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_source_names_the_height_and_leaves_whole_blocks() {
    let node = Bitcoind::start().await;
    let miner = node.rpc("getnewaddress", json!([])).await;
    node.rpc("generatetoaddress", json!([30, miner])).await;
    // The blocking RPC client owns a runtime: create and drop it off the async threads.
    let spec = node.source_spec();
    let source = tokio::task::spawn_blocking(move || chainidx_core::source::open(&spec).unwrap())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let worker = chainidx_node::WorkerNode::new(source, dir.path().to_path_buf());
    worker.assign(0, 0, 40).unwrap();
    let started = std::time::Instant::now();
    let status = loop {
        let status = worker.statuses().remove(0);
        if status.phase == chainidx_proto::ShardPhase::Failed as i32 {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "shard did not fail: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        status.error.contains("fetching block 31"),
        "{}",
        status.error
    );
    assert!(status.error.contains("getblockhash"), "{}", status.error);
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "gave up without retrying"
    );
    assert_eq!(
        status.next_height, 31,
        "blocks 0..=30 written whole, nothing of 31"
    );
    let shard = worker.slot(0).unwrap().shard.clone();
    let tip_hash = node.rpc("getblockhash", json!([30])).await;
    let block = shard
        .view()
        .block(&chainidx_proto::shard_block_request::Key::Height(30), false)
        .unwrap();
    assert!(block.found);
    let mut stored = block.meta.unwrap().hash;
    stored.reverse();
    assert_eq!(hex::encode(stored), tip_hash.as_str().unwrap());
    assert!(
        !shard
            .view()
            .block(&chainidx_proto::shard_block_request::Key::Height(31), false)
            .unwrap()
            .found
    );
    drop(shard);
    tokio::task::spawn_blocking(move || drop(worker))
        .await
        .unwrap();
}
