#![allow(dead_code)]
pub mod check;
pub mod reference;

use std::path::PathBuf;

/// `shared/data` beside the repository (tests may read it; the product never does).
pub fn shared_data() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data")
}
