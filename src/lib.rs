//! chainidx: the command-line tool and the cluster sandbox.
//!
//! # Layout
//! - [`sandbox`]: starts a real cluster (in-process coordinator, worker *processes*, gRPC on loopback port 0)
//!   and waits until it is ready. One harness for `chainidx up`, the tests and the benches.
//! - [`regtest_node`]: a real bitcoind (regtest) for the source tests and benches.
//! - [`worker_main`]: what `chainidx node` runs: serve the Worker gRPC API and register with a coordinator.
//!
//! The crates underneath: `chainidx-core` (chain model, sources, schema, storage trait), `chainidx-proto`
//! (messages), `chainidx-node` (worker, RocksDB), `chainidx-coordinator` (shard map, fan-out, HTTP).

pub mod regtest_node;
pub mod sandbox;
pub mod worker_main;
