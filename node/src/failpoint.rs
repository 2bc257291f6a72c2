//! Failpoints for crash tests: `CHAINIDX_FAILPOINTS="name=N[,name=N]"` makes the process abort — like
//! kill -9, nothing flushed, no goodbye — the N-th time it reaches `failpoint(name)`; `name=sleep:MS`
//! delays every pass instead (a slow disk, so fault tests can act in the middle of a backfill); `name=on`
//! switches on a misbehaviour that [`failpoint_on`] asks about; `name=fail:N` makes [`failpoint_fails`]
//! say yes the N-th time (an error where the code asks). Unset, a failpoint costs one relaxed atomic load.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Where the crash tests can stop a worker.
pub const INDEX_BEFORE_WRITE: &str = "index:before-write";
pub const INDEX_AFTER_WRITE: &str = "index:after-write";
/// A backfill window's rows are ingested; its stats and checkpoint are not written yet.
pub const INDEX_AFTER_INGEST: &str = "index:after-ingest";
/// A resolution batch's rows are ingested; its stats and the removal of its `pending` rows are not.
pub const RESOLVE_AFTER_INGEST: &str = "resolve:after-ingest";
pub const RESOLVE_AFTER_LOOKUP: &str = "resolve:after-lookup";
pub const RESOLVE_AFTER_APPLY: &str = "resolve:after-apply";
pub const SPEND_AFTER_WRITE: &str = "spend:after-write";
/// A block caught up while following the tip is indexed (phase 1); its inputs are not resolved yet and
/// the coordinators' served tip has not reached it.
pub const CATCH_UP_AFTER_INDEX: &str = "catch-up:after-index";
/// With `=fail:N`: the N-th catch-up fails there (after [`CATCH_UP_AFTER_INDEX`]), its block indexed and
/// its inputs not resolved.
pub const CATCH_UP_FAILS_AFTER_INDEX: &str = "catch-up:fails-after-index";
/// With `=on`: the worker's shards answer txid filters that rule out every txid, as an out-of-date filter
/// could, so that their coins are only found by the fallback walk.
pub const TXID_FILTER_RULES_OUT_ALL: &str = "txid-filter:rule-out-all";
/// `on`: every full backfill window is written beside the next one, even with no index permit free, so
/// that tests whose workers have one index thread each still crash in the middle of such a write.
pub const INDEX_WRITE_BESIDE: &str = "index:write-beside";

enum Action {
    /// Abort on the n-th pass.
    AbortAt(usize, AtomicUsize),
    /// Sleep this many milliseconds on every pass.
    Sleep(u64),
    /// Only [`failpoint_on`] looks at it.
    On,
    /// [`failpoint_fails`] on the n-th pass.
    FailAt(usize, AtomicUsize),
}

fn armed() -> &'static HashMap<String, Action> {
    static ARMED: OnceLock<HashMap<String, Action>> = OnceLock::new();
    ARMED.get_or_init(|| {
        std::env::var("CHAINIDX_FAILPOINTS")
            .unwrap_or_default()
            .split(',')
            .filter_map(|spec| spec.split_once('='))
            .filter_map(|(name, action)| {
                let action = match action.trim() {
                    "on" => Action::On,
                    action => match (action.strip_prefix("sleep:"), action.strip_prefix("fail:")) {
                        (Some(ms), _) => Action::Sleep(ms.parse().ok()?),
                        (_, Some(at)) => Action::FailAt(at.parse().ok()?, AtomicUsize::new(0)),
                        _ => Action::AbortAt(action.parse().ok()?, AtomicUsize::new(0)),
                    },
                };
                Some((name.trim().to_string(), action))
            })
            .collect()
    })
}

pub fn failpoint(name: &str) {
    let points = armed();
    if points.is_empty() {
        return;
    }
    match points.get(name) {
        Some(Action::AbortAt(at, hits)) if hits.fetch_add(1, Ordering::Relaxed) + 1 == *at => {
            eprintln!("failpoint {name} reached {at} times: aborting");
            std::process::abort();
        }
        Some(Action::Sleep(ms)) => std::thread::sleep(std::time::Duration::from_millis(*ms)),
        _ => {}
    }
}

/// Whether `name=on` was given.
pub fn failpoint_on(name: &str) -> bool {
    matches!(armed().get(name), Some(Action::On))
}

/// Whether this pass is the one `name=fail:N` names.
pub fn failpoint_fails(name: &str) -> bool {
    match armed().get(name) {
        Some(Action::FailAt(at, hits)) => hits.fetch_add(1, Ordering::Relaxed) + 1 == *at,
        _ => false,
    }
}
