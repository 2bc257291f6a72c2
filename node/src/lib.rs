//! chainidx-node: the worker. It owns block-range shards, each in its own RocksDB, indexes them from a block
//! source, resolves cross-shard spends with its peers, and answers per-shard queries.
//!
//! # Layout
//! - [`failpoint`]: named points where crash tests abort the process.
//! - [`rocks`]: the RocksDB engine behind `chainidx_core::store::Store`.
//! - [`shard`]: one shard's rows: phase-1 indexing (`shard::window`), phase-2 attribution, lookups for peers,
//!   queries through one snapshot (`shard::view`).
//! - [`txid_filter`]: the Bloom filter of a shard's txids that routes a resolving shard's inputs.
//! - [`worker`]: the shards a worker holds and the background tasks that backfill them.
//! - [`service`]: the gRPC `Worker` service and `run(listener, shutdown)`.

pub mod failpoint;
pub mod fault;
pub mod rocks;
pub mod service;
pub mod shard;
pub mod txid_filter;
pub mod worker;

pub use worker::{WorkerNode, connect_worker};
