//! Renders stored transactions and blocks as Esplora JSON (Blockstream's API.md field names).

use crate::error::ApiError;
use crate::router::display;
use bitcoin::block::Header;
use bitcoin::consensus::deserialize;
use bitcoin::{Network, Script, Transaction};
use chainidx_core::chain::{ScriptType, address_of};
use chainidx_proto as pb;
use serde_json::{Value, json};

fn hash32(bytes: &[u8]) -> Result<[u8; 32], ApiError> {
    bytes
        .try_into()
        .map_err(|_| ApiError::Internal("stored hash is not 32 bytes".into()))
}

pub fn output_json(script: &Script, value: u64, network: Network) -> Value {
    let mut out = json!({
        "scriptpubkey": hex::encode(script.as_bytes()),
        "scriptpubkey_asm": script.to_asm_string(),
        "scriptpubkey_type": ScriptType::of(script).esplora_name(script),
        "value": value,
    });
    if let Some(address) = address_of(script, network) {
        out["scriptpubkey_address"] = json!(address);
    }
    out
}

pub fn status_json(status: Option<&pb::TxStatus>) -> Value {
    match status {
        Some(s) => json!({
            "confirmed": true,
            "block_height": s.height,
            "block_hash": display(&hash32(&s.block_hash).unwrap_or_default()),
            "block_time": s.block_time,
        }),
        None => json!({"confirmed": false}),
    }
}

pub fn tx_json(detail: &pb::TxDetail, network: Network) -> Result<Value, ApiError> {
    let tx: Transaction =
        deserialize(&detail.raw).map_err(|e| ApiError::Internal(format!("stored tx: {e}")))?;
    let coinbase = tx.is_coinbase();
    let mut input_sum = 0u64;
    let vin: Vec<Value> = tx
        .input
        .iter()
        .enumerate()
        .map(|(i, input)| {
            let prevout = if coinbase {
                Value::Null
            } else {
                let p = detail.prevouts.get(i).cloned().unwrap_or_default();
                input_sum += p.value;
                output_json(Script::from_bytes(&p.script), p.value, network)
            };
            json!({
                "txid": input.previous_output.txid.to_string(),
                "vout": input.previous_output.vout,
                "prevout": prevout,
                "scriptsig": hex::encode(input.script_sig.as_bytes()),
                "scriptsig_asm": input.script_sig.to_asm_string(),
                "witness": input.witness.iter().map(hex::encode).collect::<Vec<_>>(),
                "is_coinbase": coinbase,
                "sequence": input.sequence.0,
            })
        })
        .collect();
    let output_sum: u64 = tx.output.iter().map(|o| o.value.to_sat()).sum();
    let vout: Vec<Value> = tx
        .output
        .iter()
        .map(|o| output_json(&o.script_pubkey, o.value.to_sat(), network))
        .collect();
    Ok(json!({
        "txid": tx.compute_txid().to_string(),
        "version": tx.version.0,
        "locktime": tx.lock_time.to_consensus_u32(),
        "vin": vin,
        "vout": vout,
        "size": detail.raw.len(),
        "weight": tx.weight().to_wu(),
        "fee": if coinbase { 0 } else { input_sum.saturating_sub(output_sum) },
        "status": status_json(detail.status.as_ref()),
    }))
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
