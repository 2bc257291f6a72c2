//! Unconfirmed transactions, kept by the coordinator (the mempool is small and belongs to no height range).
//! Synced from the source every follow tick: new txs are fetched and their inputs attributed (from a parent
//! in the mempool or from the shards); txs that left (mined or evicted) are dropped once the served tip has
//! caught up with the source's.

use crate::router::QueryRouter;
use bitcoin::consensus::deserialize;
use bitcoin::hashes::Hash;
use bitcoin::{Transaction, Txid};
use chainidx_core::chain::{ScriptHash, scripthash};
use chainidx_core::source::BlockSource;
use chainidx_proto as pb;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};

pub struct MempoolTx {
    pub detail: pb::TxDetail,
    /// Scripts the tx funds or spends from.
    scripts: HashSet<ScriptHash>,
    /// Arrival order, for newest-first listings.
    seq: u64,
}

#[derive(Default)]
pub struct Mempool {
    txs: HashMap<Txid, MempoolTx>,
    next_seq: u64,
}

impl Mempool {
    pub fn tx(&self, txid: &Txid) -> Option<pb::TxDetail> {
        self.txs.get(txid).map(|t| t.detail.clone())
    }

    /// Unconfirmed txs touching `sh`, newest first.
    pub fn history(&self, sh: &ScriptHash, limit: usize) -> Vec<pb::TxDetail> {
        let mut txs: Vec<&MempoolTx> = self
            .txs
            .values()
            .filter(|t| t.scripts.contains(sh))
            .collect();
        txs.sort_by_key(|t| std::cmp::Reverse(t.seq));
        txs.into_iter()
            .take(limit)
            .map(|t| t.detail.clone())
            .collect()
    }

    pub fn stats(&self, sh: &ScriptHash) -> pb::AddressStats {
        let mut stats = pb::AddressStats::default();
        for entry in self.txs.values().filter(|t| t.scripts.contains(sh)) {
            stats.tx_count += 1;
            let Ok(tx) = deserialize::<Transaction>(&entry.detail.raw) else {
                continue;
            };
            for out in &tx.output {
                if scripthash(&out.script_pubkey) == *sh {
                    stats.funded_txo_count += 1;
                    stats.funded_sum += out.value.to_sat();
                }
            }
            for prevout in &entry.detail.prevouts {
                if scripthash(bitcoin::Script::from_bytes(&prevout.script)) == *sh {
                    stats.spent_txo_count += 1;
                    stats.spent_sum += prevout.value;
                }
            }
        }
        stats
    }

    pub fn len(&self) -> usize {
        self.txs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.txs.is_empty()
    }
}

/// One sync with the source's mempool. Sources without a mempool leave it empty.
pub async fn sync(
    mempool: &Arc<RwLock<Mempool>>,
    router: &QueryRouter,
    source: &Arc<dyn BlockSource>,
) -> Result<(), String> {
    let lister = source.clone();
    let Some(txids) = tokio::task::spawn_blocking(move || lister.mempool_txids())
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?
    else {
        return Ok(());
    };
    // A tx that left the source's mempool was mined or evicted. Mined in a block queries do not see yet
    // (the served tip is behind the source's), it stays listed as unconfirmed until they do, so that it
    // is never in neither place; evicted, it goes at the first sync with the tips level.
    let lister = source.clone();
    let source_tip = tokio::task::spawn_blocking(move || lister.tip_height())
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    if router.cluster().served_tip() >= Some(source_tip) {
        let current: HashSet<Txid> = txids.iter().copied().collect();
        mempool
            .write()
            .expect("mempool lock")
            .txs
            .retain(|txid, _| current.contains(txid));
    }
    for txid in txids {
        if mempool
            .read()
            .expect("mempool lock")
            .txs
            .contains_key(&txid)
        {
            continue;
        }
        let fetcher = source.clone();
        let Some(raw) = tokio::task::spawn_blocking(move || fetcher.mempool_tx(&txid))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?
        else {
            continue;
        };
        let tx: Transaction = deserialize(&raw).map_err(|e| format!("mempool tx {txid}: {e}"))?;
        let mut prevouts = Vec::with_capacity(tx.input.len());
        let mut scripts: HashSet<ScriptHash> = tx
            .output
            .iter()
            .filter(|o| !o.script_pubkey.is_op_return())
            .map(|o| scripthash(&o.script_pubkey))
            .collect();
        let mut complete = true;
        for input in &tx.input {
            let parent = input.previous_output.txid;
            let parent_raw = match mempool.read().expect("mempool lock").tx(&parent) {
                Some(detail) => Some(detail.raw),
                None => None,
            };
            let parent_raw = match parent_raw {
                Some(raw) => raw,
                None => match router.tx(&parent.to_byte_array()).await {
                    Ok(detail) => detail.raw,
                    Err(_) => {
                        complete = false; // parent not indexed yet (a block in flight): try next tick
                        break;
                    }
                },
            };
            let parent_tx: Transaction = deserialize(&parent_raw).map_err(|e| e.to_string())?;
            let Some(out) = parent_tx.output.get(input.previous_output.vout as usize) else {
                complete = false;
                break;
            };
            scripts.insert(scripthash(&out.script_pubkey));
            prevouts.push(pb::TxOut {
                value: out.value.to_sat(),
                script: out.script_pubkey.to_bytes(),
            });
        }
        if !complete {
            continue;
        }
        let mut pool = mempool.write().expect("mempool lock");
        let seq = pool.next_seq;
        pool.next_seq += 1;
        pool.txs.insert(
            txid,
            MempoolTx {
                detail: pb::TxDetail {
                    raw,
                    prevouts,
                    status: None,
                },
                scripts,
                seq,
            },
        );
    }
    Ok(())
}
