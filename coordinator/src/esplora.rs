//! Renders stored transactions and blocks as Esplora JSON (Blockstream's API.md field names).

use crate::error::ApiError;
use crate::router::display;
use bitcoin::block::Header;
use bitcoin::consensus::deserialize;
use bitcoin::{Network, Script, Transaction};
use chainidx_core::chain::{ScriptType, address_of};
use chainidx_proto as pb;
use serde::Serialize;
use serde_json::{Value, json};

fn hash32(bytes: &[u8]) -> Result<[u8; 32], ApiError> {
    bytes
        .try_into()
        .map_err(|_| ApiError::Internal("stored hash is not 32 bytes".into()))
}

/// An output (or an input's prevout) as Esplora shows it. Typed structs, not `serde_json::Value` maps: a
/// history page of big txs is thousands of these, and building maps was most of its rendering time.
#[derive(Serialize)]
pub struct Output {
    scriptpubkey: String,
    scriptpubkey_asm: String,
    scriptpubkey_type: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    scriptpubkey_address: Option<String>,
    value: u64,
}

pub fn output_json(script: &Script, value: u64, network: Network) -> Output {
    Output {
        scriptpubkey: hex::encode(script.as_bytes()),
        scriptpubkey_asm: script.to_asm_string(),
        scriptpubkey_type: ScriptType::of(script).esplora_name(script),
        scriptpubkey_address: address_of(script, network),
        value,
    }
}

#[derive(Serialize)]
pub struct Status {
    confirmed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    block_height: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    block_hash: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    block_time: Option<u32>,
}

pub fn status_json(status: Option<&pb::TxStatus>) -> Status {
    match status {
        Some(s) => Status {
            confirmed: true,
            block_height: Some(s.height),
            block_hash: Some(display(&hash32(&s.block_hash).unwrap_or_default())),
            block_time: Some(s.block_time),
        },
        None => Status {
            confirmed: false,
            block_height: None,
            block_hash: None,
            block_time: None,
        },
    }
}

#[derive(Serialize)]
pub struct Input {
    txid: String,
    vout: u32,
    prevout: Option<Output>,
    scriptsig: String,
    scriptsig_asm: String,
    witness: Vec<String>,
    is_coinbase: bool,
    sequence: u32,
}

#[derive(Serialize)]
pub struct Tx {
    txid: String,
    version: i32,
    locktime: u32,
    vin: Vec<Input>,
    vout: Vec<Output>,
    size: usize,
    weight: u64,
    fee: u64,
    status: Status,
}

pub fn tx_json(detail: &pb::TxDetail, network: Network) -> Result<Tx, ApiError> {
    let tx: Transaction =
        deserialize(&detail.raw).map_err(|e| ApiError::Internal(format!("stored tx: {e}")))?;
    let coinbase = tx.is_coinbase();
    let mut input_sum = 0u64;
    let vin: Vec<Input> = tx
        .input
        .iter()
        .enumerate()
        .map(|(i, input)| {
            let prevout = (!coinbase).then(|| {
                let p = detail.prevouts.get(i).cloned().unwrap_or_default();
                input_sum += p.value;
                output_json(Script::from_bytes(&p.script), p.value, network)
            });
            Input {
                txid: input.previous_output.txid.to_string(),
                vout: input.previous_output.vout,
                prevout,
                scriptsig: hex::encode(input.script_sig.as_bytes()),
                scriptsig_asm: input.script_sig.to_asm_string(),
                witness: input.witness.iter().map(hex::encode).collect(),
                is_coinbase: coinbase,
                sequence: input.sequence.0,
            }
        })
        .collect();
    let output_sum: u64 = tx.output.iter().map(|o| o.value.to_sat()).sum();
    let vout: Vec<Output> = tx
        .output
        .iter()
        .map(|o| output_json(&o.script_pubkey, o.value.to_sat(), network))
        .collect();
    Ok(Tx {
        txid: tx.compute_txid().to_string(),
        version: tx.version.0,
        locktime: tx.lock_time.to_consensus_u32(),
        vin,
        vout,
        size: detail.raw.len(),
        weight: tx.weight().to_wu(),
        fee: if coinbase {
            0
        } else {
            input_sum.saturating_sub(output_sum)
        },
        status: status_json(detail.status.as_ref()),
    })
}

pub fn block_json(block: &pb::BlockLookup) -> Result<Value, ApiError> {
    let meta = block.meta.clone().unwrap_or_default();
    let header: Header =
        deserialize(&meta.header).map_err(|e| ApiError::Internal(format!("stored header: {e}")))?;
    Ok(json!({
        "id": header.block_hash().to_string(),
        "height": block.height,
        "version": header.version.to_consensus(),
        "timestamp": header.time,
        "tx_count": meta.tx_count,
        "size": meta.size,
        "weight": meta.weight,
        "merkle_root": header.merkle_root.to_string(),
        "previousblockhash": header.prev_blockhash.to_string(),
        "nonce": header.nonce,
        "bits": header.bits.to_consensus(),
        "difficulty": header.difficulty_float(),
    }))
}

pub fn stats_json(stats: &pb::AddressStats) -> Value {
    json!({
        "funded_txo_count": stats.funded_txo_count,
        "funded_txo_sum": stats.funded_sum,
        "spent_txo_count": stats.spent_txo_count,
        "spent_txo_sum": stats.spent_sum,
        "tx_count": stats.tx_count,
    })
}

pub fn utxo_json(utxo: &pb::Utxo) -> Result<Value, ApiError> {
    Ok(json!({
        "txid": display(&hash32(&utxo.txid)?),
        "vout": utxo.vout,
        "status": status_json(utxo.status.as_ref()),
        "value": utxo.value,
    }))
}

pub fn outspend_json(outspend: &pb::Outspend) -> Result<Value, ApiError> {
    if !outspend.spent {
        return Ok(json!({"spent": false}));
    }
    Ok(json!({
        "spent": true,
        "txid": display(&hash32(&outspend.txid)?),
        "vin": outspend.vin,
        "status": {"confirmed": true, "block_height": outspend.height},
    }))
}
