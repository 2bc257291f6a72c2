//! Against a real bitcoind (regtest, wallet, txindex): wallet activity of hundreds of transactions over many
//! blocks, backfilled through `rpc:`, must equal the node's own answers for every address.

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
}

/// An amount the node's RPC accepts (the shortest decimal form of sats / 1e8).
fn btc(sats: u64) -> Value {
    json!(sats as f64 / 1e8)
}

async fn make_wallet_activity(node: &Bitcoind, miner: &str) {
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
    for _round in 0..25 {
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
                entry.txs.insert(txid.clone());
            }
        }
    }
    (view, tx_count)
}

/// Backfills `source` in a 3-worker cluster and checks every answer against the node's own.
async fn check_cluster(source: String, node_answers: &NodeAnswers, tip: u32) -> u64 {
    let dir = tempfile::tempdir().unwrap();
    let sandbox = SandboxBuilder::new(env!("CARGO_BIN_EXE_chainidx"), source.clone(), dir.path())
        .workers(3)
        .shard_blocks(15)
        .start()
        .await
        .unwrap();
    let status = sandbox
        .wait_for_backfill(Duration::from_secs(300), |_| {})
        .await
        .unwrap();
    assert_eq!(status.tip_height, tip, "{source}");
    let cross: u64 = status.shards.iter().map(|s| s.cross_shard_inputs).sum();
    let api = Api::new(sandbox.http_url());

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
            txs: full_history(&api, &format!("/scripthash/{sh}"))
                .await
                .iter()
                .map(|t| t.to_string())
                .collect(),
        };
        assert_eq!(&got_view, want, "{source}: script {script}");
        assert_eq!(s["tx_count"].as_u64().unwrap(), want.txs.len() as u64);
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
            "received by {address}"
        );
        let history: BTreeSet<String> = full_history(&api, &format!("/address/{address}"))
            .await
            .iter()
            .map(|t| t.to_string())
            .collect();
        for txid in entry["txids"].as_array().unwrap() {
            assert!(
                history.contains(txid.as_str().unwrap()),
                "{address} history lacks {txid}"
            );
        }
        checked += 1;
    }
    assert!(checked >= 25, "only {checked} wallet addresses");
    for (address, want) in &node_answers.wallet_utxos {
        if *address == node_answers.miner {
            continue; // immature coinbases are not listed by the wallet but are unspent outputs
        }
        let got: BTreeSet<(String, u64, u64)> = api
            .ok(&format!("/address/{address}/utxo"))
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
            .collect();
        assert_eq!(&got, want, "{source}: UTXOs of {address}");
        let stats = api.ok(&format!("/address/{address}")).await;
        let balance = stats["chain_stats"]["funded_txo_sum"].as_u64().unwrap()
            - stats["chain_stats"]["spent_txo_sum"].as_u64().unwrap();
        assert_eq!(
            balance,
            want.iter().map(|u| u.2).sum::<u64>(),
            "balance of {address}"
        );
    }

    // 3. Each wallet transaction as the node describes it: outputs and block.
    for (txid, theirs) in &node_answers.wallet_txs {
        let ours = api.ok(&format!("/tx/{txid}")).await;
        let values = |v: &Value, key: &str| -> Vec<u64> {
            v["vout"]
                .as_array()
                .unwrap()
                .iter()
                .map(|o| {
                    if key == "value" {
                        sats(&o["value"])
                    } else {
                        o["value"].as_u64().unwrap()
                    }
                })
                .collect()
        };
        assert_eq!(
            values(&ours, "sat"),
            values(theirs, "value"),
            "{source}: outputs of {txid}"
        );
        assert_eq!(
            ours["status"]["block_hash"], theirs["blockhash"],
            "{source}: block of {txid}"
        );
    }
    sandbox.shutdown().await;
    cross
}

struct NodeAnswers {
    miner: String,
    view: HashMap<String, NodeView>,
    received: Value,
    wallet_utxos: BTreeMap<String, BTreeSet<(String, u64, u64)>>,
    wallet_txs: Vec<(String, Value)>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_and_datadir_backfills_equal_the_nodes_own_answers() {
    let mut node = Bitcoind::start().await;
    let miner = node
        .rpc("getnewaddress", json!([]))
        .await
        .as_str()
        .unwrap()
        .to_string();
    node.rpc("generatetoaddress", json!([110, miner])).await;
    make_wallet_activity(&node, &miner).await;
    let tip = node.rpc("getblockcount", json!([])).await.as_u64().unwrap() as u32;

    let (view, tx_count) = node_view(&node).await;
    assert!(tx_count > 300, "only {tx_count} txs");
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
    let answers = NodeAnswers {
        miner,
        view,
        received,
        wallet_utxos,
        wallet_txs,
    };

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
