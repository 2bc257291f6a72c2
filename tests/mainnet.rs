//! Real mainnet data from shared/data: each block's rows equal its expected decoding; inputs of blocks 277647
//! and 300025 resolve to the recorded spent outputs; the blk-framed files index end to end in a cluster.

mod common;

use bitcoin::consensus::deserialize;
use bitcoin::hashes::Hash;
use bitcoin::{Block, Network, ScriptBuf, Txid};
use chainidx::sandbox::SandboxBuilder;
use chainidx_core::chain::{ScriptType, address_of, script_for_address, scripthash};
use chainidx_core::schema::{Cf, Hash32, SpentScript, decode_prevout};
use chainidx_core::store::{Reads, ScanFrom};
use chainidx_node::rocks::RocksStore;
use chainidx_node::shard::{Shard, Write};
use chainidx_proto as pb;
use common::reference::Reference;
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

fn mainnet_dir() -> PathBuf {
    common::shared_data().join("bitcoin-mainnet")
}

fn raw_blocks() -> Vec<(u32, PathBuf)> {
    let mut blocks: Vec<(u32, PathBuf)> = std::fs::read_dir(mainnet_dir())
        .expect("shared/data/bitcoin-mainnet")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "raw"))
        .map(|p| {
            let name = p.file_name().unwrap().to_str().unwrap().to_string();
            (name.split('_').next().unwrap().parse().unwrap(), p)
        })
        .collect();
    blocks.sort();
    blocks
}

fn read_tsv(path: &Path) -> Vec<Vec<String>> {
    let mut text = String::new();
    if path.extension().is_some_and(|x| x == "gz") {
        flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap())
            .read_to_string(&mut text)
            .unwrap();
    } else {
        text = std::fs::read_to_string(path).unwrap();
    }
    text.lines()
        .skip(1)
        .map(|l| l.split('\t').map(str::to_string).collect())
        .collect()
}

/// A one-block shard in a fresh RocksDB, indexed through the production path. Tx bodies are read back from
/// the block written as a blk file (mainnet magic), as a worker reads them from its source.
fn index_single_block(dir: &Path, height: u32, block: &Block) -> Shard {
    index_single_block_with_store(dir, height, block).0
}

/// [`index_single_block`], also handing out the shard's store, to look at its rows directly.
fn index_single_block_with_store(
    dir: &Path,
    height: u32,
    block: &Block,
) -> (Shard, Arc<RocksStore>) {
    let blocks = dir.join("blocks");
    std::fs::create_dir_all(&blocks).unwrap();
    let raw = bitcoin::consensus::serialize(block);
    let mut framed = vec![0xf9, 0xbe, 0xb4, 0xd9];
    framed.extend_from_slice(&(raw.len() as u32).to_le_bytes());
    framed.extend_from_slice(&raw);
    std::fs::write(blocks.join("blk00000.dat"), framed).unwrap();
    let source = Arc::new(chainidx_core::source::BlkDirSource::open(&blocks).unwrap());
    let store = Arc::new(RocksStore::open(&dir.join("shard")).unwrap());
    let shard = Shard::open(store.clone(), source, 0, height, height + 1).unwrap();
    shard
        .index_block(height, block, None, Write::Logged)
        .unwrap();
    (shard, store)
}

fn txid_bytes(txid: &Txid) -> Hash32 {
    txid.to_byte_array()
}

#[test]
fn every_mainnet_block_decodes_to_its_expected_rows() {
    let blocks = raw_blocks();
    assert_eq!(blocks.len(), 31);
    let mut total = 0;
    let mut checked_by_core = 0;
    for (height, path) in blocks {
        let block: Block = deserialize(&std::fs::read(&path).unwrap()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let shard = index_single_block(dir.path(), height, &block);
        checked_by_core += usize::from(check_block_meta(&shard, height, &block));
        let expected =
            read_tsv(&mainnet_dir().join(format!("expected/{height:07}.outputs.tsv.gz")));
        let outputs: usize = block.txdata.iter().map(|tx| tx.output.len()).sum();
        assert_eq!(outputs, expected.len(), "output count of block {height}");

        let mut funded: HashMap<Hash32, (u64, u64)> = HashMap::new();
        let mut stored_txs: HashMap<Txid, bitcoin::Transaction> = HashMap::new();
        for row in &expected {
            let txid: Txid = row[0].parse().unwrap();
            let vout: usize = row[1].parse().unwrap();
            let value: u64 = row[2].parse().unwrap();
            let script = ScriptBuf::from_hex(&row[5]).unwrap();
            assert_eq!(
                ScriptType::of(&script).as_str(),
                row[3],
                "type of {txid}:{vout}"
            );
            assert_eq!(
                address_of(&script, Network::Bitcoin).unwrap_or_default(),
                row[4],
                "address of {txid}:{vout}"
            );
            // The stored transaction carries exactly this output.
            let tx = stored_txs.entry(txid).or_insert_with(|| {
                let detail = shard
                    .view()
                    .tx(&txid_bytes(&txid))
                    .unwrap()
                    .unwrap_or_else(|| panic!("tx {txid} not stored"));
                assert_eq!(detail.status.as_ref().unwrap().height, height);
                // Keys hold a 12-byte txid prefix: a txid sharing it but not the rest is not this tx.
                let mut twin = txid_bytes(&txid);
                twin[31] ^= 1;
                assert!(
                    shard.view().tx(&twin).unwrap().is_none(),
                    "{txid}'s prefix twin"
                );
                deserialize(&detail.raw).unwrap()
            });
            assert_eq!(tx.output[vout].value.to_sat(), value, "{txid}:{vout}");
            assert_eq!(tx.output[vout].script_pubkey, script, "{txid}:{vout}");
            if row[3] != "nulldata" {
                let entry = funded.entry(scripthash(&script)).or_default();
                entry.0 += 1;
                entry.1 += value;
            }
        }
        // Per-address funding rows equal the expected outputs, script by script.
        for (sh, (count, sum)) in &funded {
            let stats = shard.view().address_stats(sh).unwrap();
            assert_eq!(
                (stats.funded_txo_count, stats.funded_sum),
                (*count, *sum),
                "funding of a script in block {height}"
            );
        }
        total += expected.len();
    }
    assert_eq!(total, 106_004);
    assert_eq!(checked_by_core, 2, "blocks of corejson/ among the raw ones");
}

/// The block's `headers` row: its size and weight (summed while indexing, not asked of rust-bitcoin) equal
/// rust-bitcoin's and, for the blocks Bitcoin Core decoded in `corejson/`, Core's own. Says whether Core's
/// decoding was there.
fn check_block_meta(shard: &Shard, height: u32, block: &Block) -> bool {
    let lookup = shard
        .view()
        .block(&pb::shard_block_request::Key::Height(height), false)
        .unwrap();
    assert!(lookup.found, "block {height}");
    let meta = lookup.meta.unwrap();
    let expected = (
        block.total_size() as u64,
        block.weight().to_wu(),
        block.txdata.len() as u64,
    );
    let core = mainnet_dir()
        .join("corejson")
        .join(format!("{}.json", block.block_hash()));
    let in_core = core.exists();
    if in_core {
        let text = std::fs::read_to_string(&core).unwrap();
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        let field = |name: &str| json[name].as_u64().unwrap();
        assert_eq!(field("height"), height as u64);
        let core_says = (field("size"), field("weight"), field("nTx"));
        assert_eq!(
            core_says, expected,
            "rust-bitcoin and Core on block {height}"
        );
    }
    assert_eq!(
        (meta.size as u64, meta.weight as u64, meta.tx_count as u64),
        expected,
        "size, weight and tx count of block {height}"
    );
    assert_eq!(meta.hash, block.block_hash().to_byte_array().to_vec());
    in_core
}

/// Indexes the block, answers its parked inputs from `prevouts/<height>.prevouts.tsv` (standing in for the
/// earlier shards), and checks the attribution against the recorded values and per-address activity.
fn check_prevouts(height: u32) {
    let (_, path) = raw_blocks()
        .into_iter()
        .find(|(h, _)| *h == height)
        .unwrap();
    let block: Block = deserialize(&std::fs::read(path).unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (shard, store) = index_single_block_with_store(dir.path(), height, &block);

    let rows = read_tsv(&mainnet_dir().join(format!("prevouts/{height:07}.prevouts.tsv")));
    let recorded: HashMap<(Txid, u32), (u64, ScriptBuf)> = rows
        .iter()
        .map(|r| {
            (
                (r[0].parse().unwrap(), r[1].parse().unwrap()),
                (r[4].parse().unwrap(), ScriptBuf::from_hex(&r[7]).unwrap()),
            )
        })
        .collect();
    let inputs: usize = block.txdata.iter().skip(1).map(|tx| tx.input.len()).sum();
    assert_eq!(
        recorded.len(),
        inputs,
        "prevouts.tsv covers every input of {height}"
    );

    let pending = shard.next_pending(usize::MAX).unwrap();
    assert!(!pending.is_empty());
    let resolved: Vec<_> = pending
        .into_iter()
        .map(|p| {
            let txid = Txid::from_byte_array(p.input.spender_txid);
            let (value, script) = recorded[&(txid, p.vin)].clone();
            (
                p,
                pb::TxOut {
                    value,
                    script: script.to_bytes(),
                },
            )
        })
        .collect();
    shard.apply_resolved(&resolved, Write::Bulk).unwrap();
    assert_eq!(shard.state().pending_inputs, 0);

    // Spent P2PKH and P2SH scripts are rebuilt from their inputs' pushes rather than stored; the rest
    // (P2PK here) keep them. The answers below are checked against the recorded scripts either way.
    let (mut kept, mut rebuilt) = (0, 0);
    store
        .scan(Cf::Prevouts, &[], ScanFrom::First, &mut |_, value| {
            match decode_prevout(value).expect("a prevouts value") {
                (_, SpentScript::Whole(_)) => kept += 1,
                (_, SpentScript::Rebuilt(_)) => rebuilt += 1,
            }
            true
        })
        .unwrap();
    let templated = recorded
        .values()
        .filter(|(_, script)| {
            script.is_p2pkh() || script.is_p2sh() || script.is_p2wpkh() || script.is_p2wsh()
        })
        .count();
    println!("block {height}: {rebuilt} spent scripts rebuilt, {kept} kept; {templated} templated");
    assert_eq!(kept + rebuilt, inputs);
    assert_eq!(rebuilt, templated, "templated scripts rebuilt");

    for tx in block.txdata.iter().skip(1) {
        let txid = tx.compute_txid();
        let detail = shard.view().tx(&txid_bytes(&txid)).unwrap().unwrap();
        for (vin, prevout) in detail.prevouts.iter().enumerate() {
            let (value, script) = &recorded[&(txid, vin as u32)];
            assert_eq!(prevout.value, *value, "value spent by {txid}:{vin}");
            assert_eq!(
                &prevout.script,
                script.as_bytes(),
                "script spent by {txid}:{vin}"
            );
        }
    }
    let activity =
        read_tsv(&mainnet_dir().join(format!("prevouts/{height:07}.address_activity.tsv")));
    assert!(activity.len() > 900);
    for row in activity {
        let script = script_for_address(&row[0], Network::Bitcoin).unwrap();
        let stats = shard.view().address_stats(&scripthash(&script)).unwrap();
        let want: Vec<u64> = row[1..5].iter().map(|v| v.parse().unwrap()).collect();
        assert_eq!(
            vec![
                stats.funded_txo_count,
                stats.funded_sum,
                stats.spent_txo_count,
                stats.spent_sum
            ],
            want,
            "activity of {} in block {height}",
            row[0]
        );
    }
}

#[test]
fn block_277647_inputs_resolve_to_recorded_prevouts() {
    check_prevouts(277_647);
}

#[test]
fn block_300025_inputs_resolve_to_recorded_prevouts() {
    check_prevouts(300_025);
}

/// After the backfill a shard drops the `outputs` rows of coins later shards spent; the coin is still
/// answered to its recorded spender asking again (read back from the tx body) and gets its row back when a
/// reorg unspends it. Checked against the block's own outputs.
#[test]
fn a_spent_coin_is_answered_from_its_tx_body_once_its_row_is_dropped() {
    let (height, path) = raw_blocks()
        .into_iter()
        .find(|(h, _)| *h == 277647)
        .unwrap();
    let block: Block = deserialize(&std::fs::read(&path).unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (shard, store) = index_single_block_with_store(dir.path(), height, &block);
    // An output of this block that no tx of the block spends, with an address.
    let spent_here: std::collections::HashSet<bitcoin::OutPoint> = block
        .txdata
        .iter()
        .flat_map(|tx| tx.input.iter().map(|i| i.previous_output))
        .collect();
    let (position, txid, vout, output) = block
        .txdata
        .iter()
        .enumerate()
        .skip(1)
        .flat_map(|(position, tx)| {
            let txid = tx.compute_txid();
            tx.output
                .iter()
                .enumerate()
                .map(move |(vout, out)| (position as u32, txid, vout as u32, out.clone()))
        })
        .find(|(_, txid, vout, out)| {
            !spent_here.contains(&bitcoin::OutPoint::new(*txid, *vout))
                && address_of(&out.script_pubkey, Network::Bitcoin).is_some()
        })
        .unwrap();
    let sh = scripthash(&output.script_pubkey);
    let unspent = |shard: &Shard| -> Vec<(Vec<u8>, u32, u64)> {
        let mut utxos: Vec<_> = shard
            .view()
            .utxos(&sh)
            .unwrap()
            .into_iter()
            .map(|u| (u.txid, u.vout, u.value))
            .collect();
        utxos.sort();
        utxos
    };
    let coin = (txid_bytes(&txid).to_vec(), vout, output.value.to_sat());
    assert!(unspent(&shard).contains(&coin));

    let spend = |spender_position: u32| pb::SpendRef {
        prev_txid: txid_bytes(&txid).to_vec(),
        prev_vout: vout,
        spender_vin: 0,
        spender_height: height + 5,
        spender_position,
    };
    let answer = |found: Vec<pb::SpentOutput>| -> Vec<(u64, Vec<u8>)> {
        found.into_iter().map(|f| (f.value, f.script)).collect()
    };
    let expected = vec![(output.value.to_sat(), output.script_pubkey.to_bytes())];
    assert_eq!(answer(shard.spend_outputs(&[spend(3)]).unwrap()), expected);
    assert!(!unspent(&shard).contains(&coin), "spent by a later shard");

    let key = chainidx_core::schema::coin_key(height, position, vout);
    let outputs = chainidx_core::schema::Cf::Outputs;
    assert!(store.get(outputs, &key).unwrap().is_some());
    // Until the drop, the shard knows every coin of its own has its row, so a miss needs no second look.
    let all_coin_rows = || {
        store
            .get(
                chainidx_core::schema::Cf::Meta,
                chainidx_core::schema::ALL_COIN_ROWS_KEY,
            )
            .unwrap()
            .is_some()
    };
    assert!(all_coin_rows());
    shard.compact().unwrap();
    assert!(!all_coin_rows(), "the drop says so before any row goes");
    assert!(store.get(outputs, &key).unwrap().is_none(), "row dropped");
    assert!(!unspent(&shard).contains(&coin));

    // Its spender asking again is answered from the tx body; another spender is not (a double spend).
    assert_eq!(answer(shard.spend_outputs(&[spend(3)]).unwrap()), expected);
    assert!(shard.spend_outputs(&[spend(4)]).unwrap().is_empty());

    // A reorg removes the spend: the coin is unspent again, with its row back.
    assert!(
        shard.unspend_outputs(&[spend(4)]).unwrap().is_empty(),
        "not that spender's"
    );
    assert_eq!(shard.unspend_outputs(&[spend(3)]).unwrap(), vec![0]);
    assert!(store.get(outputs, &key).unwrap().is_some(), "row restored");
    assert!(unspent(&shard).contains(&coin));
    assert_eq!(answer(shard.spend_outputs(&[spend(4)]).unwrap()), expected);

    // Unspent again: compacting keeps its row (only coins spent when the drop looks lose theirs).
    assert_eq!(shard.unspend_outputs(&[spend(4)]).unwrap(), vec![0]);
    shard.compact().unwrap();
    assert!(
        store.get(outputs, &key).unwrap().is_some(),
        "unspent row kept"
    );
    assert!(unspent(&shard).contains(&coin));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mainnet_blk_files_index_end_to_end() {
    let blkfiles = mainnet_dir().join("blkfiles");
    let dir = tempfile::tempdir().unwrap();
    let sandbox = SandboxBuilder::new(
        env!("CARGO_BIN_EXE_chainidx"),
        format!("blk:{}", blkfiles.display()),
        dir.path(),
    )
    .workers(2)
    .shard_blocks(50)
    .network(Network::Bitcoin)
    .start()
    .await
    .unwrap();
    let status = sandbox
        .wait_for_backfill(Duration::from_secs(120), |_| {})
        .await
        .unwrap();
    assert_eq!(status.tip_height, 438);
    let reference = Reference::from_blk_dir(&blkfiles);
    let (scripts, txs) =
        common::check::cluster_matches_reference(&sandbox.http_url(), &reference, Network::Bitcoin)
            .await;
    assert!(scripts > 400 && txs > 400);
    let api = common::check::Api::new(sandbox.http_url());
    // Block 170: the first payment between people (Satoshi to Hal Finney), spending block 9's coinbase.
    let tx = api
        .ok("/tx/f4184fc596403b9d638783cf57adfe4c75c605f6356fbc91338530e9831e9e16")
        .await;
    assert_eq!(tx["status"]["block_height"], 170);
    assert_eq!(tx["vin"][0]["prevout"]["value"], 5_000_000_000u64);
    assert_eq!(tx["vin"][0]["prevout"]["scriptpubkey_type"], "p2pk");
    assert_eq!(tx["fee"], 0);
    sandbox.shutdown().await;
}
