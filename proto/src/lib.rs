//! Messages and gRPC services shared by the coordinator, the workers and clients.
//!
//! Generated from `proto/chainidx.proto`; the same messages are also the values stored in RocksDB.
#![allow(clippy::all)]

pub mod v1 {
    tonic::include_proto!("chainidx.v1");
}
pub use v1::*;
