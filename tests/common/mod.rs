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
