//! Compares a running cluster's HTTP answers with the reference indexer, for every script and every tx.

use super::reference::Reference;
use bitcoin::hashes::{Hash, sha256};
use bitcoin::{Network, ScriptBuf, Txid};
use futures::stream::{self, StreamExt};
use serde_json::Value;
use std::collections::BTreeSet;

/// Requests in flight at once: enough to keep 2 cores busy, bounded so the test stays polite.
const CONCURRENCY: usize = 8;

pub struct Api {
    base: String,
    client: reqwest::Client,
}

impl Api {
    pub fn new(base: String) -> Api {
        Api {
            base,
            client: reqwest::Client::new(),
        }
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let url = format!("{}{path}", self.base);
        let reply = self
            .client
            .get(&url)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
        let status = reply.status().as_u16();
        let text = reply.text().await.expect("body");
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, body)
    }

    pub async fn ok(&self, path: &str) -> Value {
        let (status, body) = self.get(path).await;
        assert_eq!(status, 200, "GET {path} -> {status} {body}");
        body
    }
}

pub fn scripthash_hex(script: &ScriptBuf) -> String {
    hex::encode(sha256::Hash::hash(script.as_bytes()).to_byte_array())
}

/// Every confirmed history page: `/txs/chain`, then `/txs/chain/:last_seen_txid` until a short page.
pub async fn full_history(api: &Api, base_path: &str) -> Vec<Txid> {
    let mut txids: Vec<Txid> = Vec::new();
    let mut path = format!("{base_path}/txs/chain");
    loop {
        let page = api.ok(&path).await;
        let page = page.as_array().expect("array of txs");
        for tx in page {
            txids.push(
                tx["txid"]
                    .as_str()
                    .expect("txid")
                    .parse()
                    .expect("txid hex"),
            );
        }
        if page.len() < 25 {
            break;
        }
        path = format!("{base_path}/txs/chain/{}", txids.last().expect("non-empty"));
    }
    txids
}

pub async fn check_script(api: &Api, reference: &Reference, script: ScriptBuf, network: Network) {
    let sh = scripthash_hex(&script);
    // Scripts with an address are queried by address, the others by scripthash: both paths are exercised.
    let base = match bitcoin::Address::from_script(&script, network) {
        Ok(address) => format!("/address/{address}"),
        Err(_) => format!("/scripthash/{sh}"),
    };
    let want = reference.summary(&script);
    let got = api.ok(&base).await;
    let stats = &got["chain_stats"];
    let field = |name: &str| {
        stats[name]
            .as_u64()
            .unwrap_or_else(|| panic!("{base}: no {name} in {got}"))
    };
    assert_eq!(
        (
            field("funded_txo_count"),
            field("funded_txo_sum"),
            field("spent_txo_count"),
            field("spent_txo_sum"),
            field("tx_count")
        ),
        (
            want.funded_txo_count,
            want.funded_sum,
            want.spent_txo_count,
            want.spent_sum,
            want.tx_count
        ),
        "summary of {base}"
    );
    assert_eq!(
        full_history(api, &base).await,
        reference.history(&script),
        "history of {base}"
    );
    let utxos = api.ok(&format!("{base}/utxo")).await;
    let got_utxos: BTreeSet<(Txid, u32, u64, u32)> = utxos
        .as_array()
        .expect("utxo array")
        .iter()
        .map(|u| {
            (
                u["txid"].as_str().unwrap().parse().unwrap(),
                u["vout"].as_u64().unwrap() as u32,
                u["value"].as_u64().unwrap(),
                u["status"]["block_height"].as_u64().unwrap() as u32,
            )
        })
        .collect();
    let want_utxos: BTreeSet<(Txid, u32, u64, u32)> = reference
        .utxos(&script)
        .into_iter()
        .map(|u| (u.txid, u.vout, u.value, u.height))
        .collect();
    assert_eq!(got_utxos, want_utxos, "utxos of {base}");
}

pub async fn check_tx(api: &Api, reference: &Reference, txid: Txid) {
    let tx = api.ok(&format!("/tx/{txid}")).await;
    let want = reference.prevouts(&txid);
    let vin = tx["vin"].as_array().expect("vin");
    assert_eq!(vin.len(), want.len(), "inputs of {txid}");
    for (i, (input, expected)) in vin.iter().zip(want).enumerate() {
        match expected {
            None => assert!(input["prevout"].is_null(), "{txid}:{i} is a coinbase input"),
            Some((value, script)) => {
                assert_eq!(
                    input["prevout"]["value"].as_u64(),
                    Some(value),
                    "prevout value of {txid}:{i}"
                );
                assert_eq!(
                    input["prevout"]["scriptpubkey"].as_str(),
                    Some(hex::encode(script.as_bytes()).as_str()),
                    "prevout script of {txid}:{i}"
                );
            }
        }
    }
    let outspends = api.ok(&format!("/tx/{txid}/outspends")).await;
    for (vout, outspend) in outspends.as_array().expect("outspends").iter().enumerate() {
        let want = reference.outspend(&txid, vout as u32);
        let got = outspend["spent"].as_bool().unwrap().then(|| {
            (
                outspend["txid"].as_str().unwrap().parse::<Txid>().unwrap(),
                outspend["vin"].as_u64().unwrap() as u32,
                outspend["status"]["block_height"].as_u64().unwrap() as u32,
            )
        });
        assert_eq!(got, want, "outspend of {txid}:{vout}");
    }
}

/// Checks every script's summary, full paged history and UTXOs, and every tx's prevouts and outspends.
pub async fn cluster_matches_reference(
    base_url: &str,
    reference: &Reference,
    network: Network,
) -> (usize, usize) {
    let api = Api::new(base_url.to_string());
    let scripts = reference.scripts();
    let script_count = scripts.len();
    stream::iter(scripts)
        .for_each_concurrent(CONCURRENCY, |script| {
            check_script(&api, reference, script, network)
        })
        .await;
    let txids = reference.txids();
    let tx_count = txids.len();
    stream::iter(txids)
        .for_each_concurrent(CONCURRENCY, |txid| check_tx(&api, reference, txid))
        .await;
    (script_count, tx_count)
}
