#![allow(dead_code)]
pub mod check;
pub mod reference;

use std::path::PathBuf;

/// `shared/data` beside the repository (tests may read it; the product never does). The manifest directory
/// is taken at run time (cargo and nextest set it): a test binary reused from a build in another clone
/// sharing `CARGO_TARGET_DIR` would otherwise look beside that clone.
pub fn shared_data() -> PathBuf {
    let manifest_dir =
        std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into());
    PathBuf::from(manifest_dir).join("../shared/data")
}

/// Asserts that every shard the workers report went through several backfill windows, and that every
/// shard with more than `batch_inputs` cross-shard inputs through several resolution batches: tests set
/// small windows and batches so that coins of earlier windows are read back and batch boundaries are
/// crossed (counted with each checkpoint, so work redone after a crash counts once).
pub fn assert_shards_crossed_boundaries(
    workers: &[chainidx_proto::WorkerStatusReply],
    batch_inputs: u64,
    context: &str,
) {
    for shard in workers.iter().flat_map(|w| &w.shards) {
        assert!(
            shard.windows_committed >= 2,
            "{context}: shard {} committed {} window(s)",
            shard.shard_id,
            shard.windows_committed
        );
        if shard.cross_shard_inputs > batch_inputs {
            assert!(
                shard.resolution_batches >= 2,
                "{context}: shard {}: {} cross-shard inputs in {} batch(es)",
                shard.shard_id,
                shard.cross_shard_inputs,
                shard.resolution_batches
            );
        }
    }
}
