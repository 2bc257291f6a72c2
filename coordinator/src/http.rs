//! The Esplora-compatible HTTP API (plus `/cluster/status`), served by the coordinator.

use crate::error::ApiError;
use crate::esplora;
use crate::router::{Cursor, QueryRouter, display, parse_hash};
use axum::Router;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use chainidx_core::chain::{ScriptHash, parse_scripthash, script_for_address, scripthash};
use serde_json::{Value, json};

/// Esplora's page size for confirmed history.
pub const PAGE_SIZE: usize = 25;

type ApiResult<T> = Result<T, ApiError>;

pub fn routes(router: QueryRouter) -> Router {
    Router::new()
        .route("/blocks/tip/height", get(tip_height))
        .route("/blocks/tip/hash", get(tip_hash))
        .route("/block-height/{height}", get(block_height))
        .route("/block/{hash}", get(block))
        .route("/block/{hash}/txids", get(block_txids))
        .route("/tx/{txid}", get(tx))
        .route("/tx/{txid}/outspends", get(outspends))
        .route("/address/{address}", get(address))
        .route(
            "/address/{address}/txs",
            get(|r: State<QueryRouter>, p: Path<String>| address_txs(r, p, Which::All)),
        )
        .route(
            "/address/{address}/txs/chain",
            get(|r: State<QueryRouter>, p: Path<String>| address_txs(r, p, Which::Chain)),
        )
        .route(
            "/address/{address}/txs/mempool",
            get(|r: State<QueryRouter>, p: Path<String>| address_txs(r, p, Which::Mempool)),
        )
        .route(
            "/address/{address}/txs/chain/{last_seen}",
            get(address_txs_after),
        )
        .route("/address/{address}/utxo", get(address_utxo))
        .route("/scripthash/{hash}", get(scripthash_summary))
        .route(
            "/scripthash/{hash}/txs",
            get(|r: State<QueryRouter>, p: Path<String>| scripthash_txs(r, p, Which::All)),
        )
        .route(
            "/scripthash/{hash}/txs/chain",
            get(|r: State<QueryRouter>, p: Path<String>| scripthash_txs(r, p, Which::Chain)),
        )
        .route(
            "/scripthash/{hash}/txs/mempool",
            get(|r: State<QueryRouter>, p: Path<String>| scripthash_txs(r, p, Which::Mempool)),
        )
        .route(
            "/scripthash/{hash}/txs/chain/{last_seen}",
            get(scripthash_txs_after),
        )
        .route("/scripthash/{hash}/utxo", get(scripthash_utxo))
        .route("/cluster/status", get(cluster_status))
        .fallback(|| async { ApiError::NotFound("no such endpoint".into()) })
        .with_state(router)
}

async fn tip_height(State(router): State<QueryRouter>) -> ApiResult<String> {
    Ok(router.tip().await?.height.to_string())
}

async fn tip_hash(State(router): State<QueryRouter>) -> ApiResult<String> {
    let tip = router.tip().await?;
    Ok(display(&hash_of(&tip)?))
}

fn hash_of(block: &chainidx_proto::BlockLookup) -> ApiResult<[u8; 32]> {
    block
        .meta
        .as_ref()
        .and_then(|m| m.hash.as_slice().try_into().ok())
        .ok_or_else(|| ApiError::Internal("stored block has no hash".into()))
}

async fn block_height(
    State(router): State<QueryRouter>,
    Path(height): Path<String>,
) -> ApiResult<String> {
    let height: u32 = height
        .parse()
        .map_err(|_| ApiError::BadRequest(format!("'{height}' is not a block height")))?;
    Ok(display(&hash_of(&router.block_at(height, false).await?)?))
}

async fn block(
    State(router): State<QueryRouter>,
    Path(hash): Path<String>,
) -> ApiResult<Json<Value>> {
    let hash = parse_hash(&hash, "block hash")?;
    Ok(Json(esplora::block_json(
        &router.block_by_hash(&hash, false).await?,
    )?))
}

async fn block_txids(
    State(router): State<QueryRouter>,
    Path(hash): Path<String>,
) -> ApiResult<Json<Value>> {
    let hash = parse_hash(&hash, "block hash")?;
    let block = router.block_by_hash(&hash, true).await?;
    let txids: Vec<String> = block
        .txids
        .iter()
        .filter_map(|t| <[u8; 32]>::try_from(t.as_slice()).ok())
        .map(|t| display(&t))
        .collect();
    Ok(Json(json!(txids)))
}

async fn tx(
    State(router): State<QueryRouter>,
    Path(txid): Path<String>,
) -> ApiResult<Json<esplora::Tx>> {
    let txid = parse_hash(&txid, "txid")?;
    let network = router.cluster().network;
    Ok(Json(esplora::tx_json(&router.tx(&txid).await?, network)?))
}

async fn outspends(
    State(router): State<QueryRouter>,
    Path(txid): Path<String>,
) -> ApiResult<Json<Value>> {
    let txid = parse_hash(&txid, "txid")?;
    let list = router.outspends(&txid).await?;
    Ok(Json(Value::Array(
        list.iter()
            .map(esplora::outspend_json)
            .collect::<ApiResult<_>>()?,
    )))
}

fn address_target(router: &QueryRouter, address: &str) -> ApiResult<ScriptHash> {
    Ok(scripthash(&script_for_address(
        address,
        router.cluster().network,
    )?))
}

async fn summary(
    router: &QueryRouter,
    sh: &ScriptHash,
    label: (&str, &str),
) -> ApiResult<Json<Value>> {
    let stats = router.address_stats(sh).await?;
    Ok(Json(json!({
        label.0: label.1,
        "chain_stats": esplora::stats_json(&stats),
        "mempool_stats": esplora::stats_json(&router.mempool().read().expect("mempool lock").stats(sh)),
    })))
}

/// Which part of an address's history a page shows (Esplora: `/txs` is up to 50 unconfirmed then the
/// first 25 confirmed; `/txs/chain` confirmed only; `/txs/mempool` unconfirmed only).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Which {
    All,
    Chain,
    Mempool,
}

/// Esplora's cap on unconfirmed txs in a listing.
const MEMPOOL_PAGE: usize = 50;

async fn txs_page(
    router: &QueryRouter,
    sh: &ScriptHash,
    last_seen: Option<&str>,
    which: Which,
) -> ApiResult<Response> {
    let network = router.cluster().network;
    let mut txs: Vec<esplora::Tx> = Vec::new();
    if which != Which::Chain {
        let unconfirmed = router
            .mempool()
            .read()
            .expect("mempool lock")
            .history(sh, MEMPOOL_PAGE);
        for tx in &unconfirmed {
            txs.push(esplora::tx_json(tx, network)?);
        }
    }
    if which == Which::Mempool {
        return Ok(Json(txs).into_response());
    }
    let before: Option<Cursor> = match last_seen {
        None => None,
        Some(txid) => {
            let txid = parse_hash(txid, "txid")?;
            let status = router.tx(&txid).await?.status.unwrap_or_default();
            Some((status.height, status.position))
        }
    };
    let (page, _) = router.history(sh, before, PAGE_SIZE).await?;
    for tx in &page {
        txs.push(esplora::tx_json(tx, network)?);
    }
    Ok(Json(txs).into_response())
}

async fn utxo_list(router: &QueryRouter, sh: &ScriptHash) -> ApiResult<Json<Value>> {
    let utxos = router.utxos(sh).await?;
    Ok(Json(Value::Array(
        utxos
            .iter()
            .map(esplora::utxo_json)
            .collect::<ApiResult<_>>()?,
    )))
}

async fn address(
    State(router): State<QueryRouter>,
    Path(address): Path<String>,
) -> ApiResult<Json<Value>> {
    let sh = address_target(&router, &address)?;
    summary(&router, &sh, ("address", &address)).await
}

async fn address_txs(
    State(router): State<QueryRouter>,
    Path(address): Path<String>,
    which: Which,
) -> ApiResult<Response> {
    let sh = address_target(&router, &address)?;
    txs_page(&router, &sh, None, which).await
}

async fn address_txs_after(
    State(router): State<QueryRouter>,
    Path((address, last_seen)): Path<(String, String)>,
) -> ApiResult<Response> {
    let sh = address_target(&router, &address)?;
    txs_page(&router, &sh, Some(&last_seen), Which::Chain).await
}

async fn address_utxo(
    State(router): State<QueryRouter>,
    Path(address): Path<String>,
) -> ApiResult<Json<Value>> {
    let sh = address_target(&router, &address)?;
    utxo_list(&router, &sh).await
}

async fn scripthash_summary(
    State(router): State<QueryRouter>,
    Path(hash): Path<String>,
) -> ApiResult<Json<Value>> {
    let sh = parse_scripthash(&hash)?;
    summary(&router, &sh, ("scripthash", &hash)).await
}

async fn scripthash_txs(
    State(router): State<QueryRouter>,
    Path(hash): Path<String>,
    which: Which,
) -> ApiResult<Response> {
    let sh = parse_scripthash(&hash)?;
    txs_page(&router, &sh, None, which).await
}

async fn scripthash_txs_after(
    State(router): State<QueryRouter>,
    Path((hash, last_seen)): Path<(String, String)>,
) -> ApiResult<Response> {
    let sh = parse_scripthash(&hash)?;
    txs_page(&router, &sh, Some(&last_seen), Which::Chain).await
}

async fn scripthash_utxo(
    State(router): State<QueryRouter>,
    Path(hash): Path<String>,
) -> ApiResult<Json<Value>> {
    let sh = parse_scripthash(&hash)?;
    utxo_list(&router, &sh).await
}

async fn cluster_status(State(router): State<QueryRouter>) -> Json<Value> {
    let status = router.cluster().status();
    let shards: Vec<Value> = status
        .shards
        .iter()
        .map(|s| {
            json!({
                "shard": s.shard_id,
                "start_height": s.start_height,
                "end_height": s.end_height,
                "owner": s.owner,
                "replicas": s.replicas,
                "joining": s.joining,
                "epoch": s.epoch,
                "lag_blocks": s.end_height.min(status.tip_height + 1).saturating_sub(s.next_height),
                "phase": chainidx_proto::ShardPhase::try_from(s.phase).map(|p| p.as_str_name()).unwrap_or("UNKNOWN"),
                "indexed_blocks": s.next_height.saturating_sub(s.start_height),
                "pending_inputs": s.pending_inputs,
                "cross_shard_inputs": s.cross_shard_inputs,
                "error": if s.error.is_empty() { Value::Null } else { json!(s.error) },
            })
        })
        .collect();
    Json(json!({
        "network": status.network,
        "tip_height": status.tip_height,
        "source_tip_height": status.source_tip,
        "lag_blocks": status.source_tip.saturating_sub(status.tip_height),
        "following": status.following,
        "halted": if status.halted.is_empty() { Value::Null } else { json!(status.halted) },
        "backfill_complete": status.backfill_complete,
        "workers": status.workers,
        "live_workers": status.live_workers,
        "fan_out": {
            "history_and_utxo_queries": status.history_queries,
            "shards_asked": status.shards_asked,
            "shards_skipped": status.shards_skipped,
        },
        "replication": status.replication,
        "coordinator": {
            "this": status.this_coordinator,
            "leader": if status.leader == 0 { Value::Null } else { json!(status.leader) },
            "leader_addr": status.leader_addr,
            "term": status.raft_term,
            "members": status.members.iter().map(|m| json!({
                "id": m.id, "grpc": m.grpc_addr, "http": m.http_addr, "voter": m.voter,
            })).collect::<Vec<_>>(),
        },
        "shards": shards,
    }))
}
