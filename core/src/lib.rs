//! chainidx-core: what every process agrees on, with no RocksDB; its only networking is the `rpc:` block
//! source's HTTP client.
//!
//! # Layout
//! - [`chain`]: script classification, script hashes and address encoding (rust-bitcoin underneath).
//! - [`source`]: the [`source::BlockSource`] trait and its implementations: blk files and bitcoind RPC/REST.
//! - [`generator`] (`gen.rs`): a deterministic generator of a realistic chain, written as blk files plus its ground truth.
//! - [`spent_script`]: rebuilding a spent coin's script from the input that spends it (so `prevouts` keeps a tag).
//! - [`schema`]: column families and fixed-width big-endian key layouts (documented in `doc/schema.md`).
//! - [`store`]: the storage trait the indexer writes through; the RocksDB engine lives in `chainidx-node`.

pub mod chain;
// `gen` is a reserved word in edition 2024.
#[path = "gen.rs"]
pub mod generator;
pub mod schema;
pub mod source;
pub mod spent_script;
pub mod store;
