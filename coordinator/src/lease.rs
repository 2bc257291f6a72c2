//! Worker leases. A worker may write a shard only while it holds a lease from the Raft leader, renewed by
//! its heartbeats; a worker that stops renewing (dead, or cut off) loses its shards to others.
//!
//! Why two writers cannot overlap: the worker counts its lease from when it *sent* the heartbeat and stops
//! [`SAFETY`] early, the leader counts from when it *received* it and waits [`SAFETY`] longer, so the worker
//! has stopped at least 2 × [`SAFETY`] before the leader reassigns. The leader confirms its leadership with a
//! quorum before granting (a deposed leader grants nothing), and a new leader counts every lease from its
//! election, since an earlier leader's grants are not replicated.

use std::time::Duration;

/// How long a heartbeat's grant lasts.
pub const LEASE: Duration = Duration::from_millis(2_000);
/// Margin for clock rate differences and the time one block write takes.
pub const SAFETY: Duration = Duration::from_millis(500);
/// What a worker is told: it must stop writing this long after sending its heartbeat.
pub const GRANTED: Duration = Duration::from_millis(2_000 - 500);
/// No heartbeat for this long (since the last one, or since this leader's election): the worker is gone.
pub const EXPIRED_AFTER: Duration = Duration::from_millis(2_000 + 500);
