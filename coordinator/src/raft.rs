//! Raft for the coordinator state, with openraft: the log, vote and snapshots in a RocksDB database (through
//! the engine-free `Store` trait), the state machine in memory (it is small) and rebuilt at start from the
//! last snapshot plus the committed log, and the peer transport over our gRPC (`Raft` service).
//!
//! Why openraft and not tikv's raft-rs: openraft is async on tokio like the rest of the coordinator, and
//! drives elections, replication, snapshots and joint-consensus membership changes itself; raft-rs leaves
//! the Ready loop, the transport and the timers to the application and brings slog and rust-protobuf 2.

// openraft's traits fix the error type (`StorageError`, large); the helpers here return it too.
#![allow(clippy::result_large_err)]

use crate::cluster::Cluster;
use chainidx_core::schema::Cf;
use chainidx_core::store::{Batch, ScanFrom, Store};
use chainidx_proto as pb;
use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    Entry, EntryPayload, LogId, OptionalSend, RaftLogReader, RaftSnapshotBuilder, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership, Vote,
};
use serde::{Deserialize, Serialize};
use std::fmt::Debug;
use std::io::Cursor;
use std::ops::RangeBounds;
use std::sync::{Arc, Mutex};

/// A coordinator replica as Raft knows it: where its gRPC (workers, Raft peers) and HTTP (clients) listen.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoordinatorNode {
    pub grpc: String,
    pub http: String,
}

/// What applying a command answers; the driver only needs to know it was applied.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Applied;

openraft::declare_raft_types!(
    pub TypeConfig:
        D = pb::ClusterCommand,
        R = Applied,
        Node = CoordinatorNode,
);

pub type NodeId = u64;
pub type Raft = openraft::Raft<TypeConfig>;
type StorageResult<T> = Result<T, StorageError<NodeId>>;

const VOTE_KEY: &[u8] = b"raft/vote";
const COMMITTED_KEY: &[u8] = b"raft/committed";
const PURGED_KEY: &[u8] = b"raft/purged";
const SNAPSHOT_KEY: &[u8] = b"raft/snapshot";

fn read_err(e: impl std::fmt::Display) -> StorageError<NodeId> {
    StorageIOError::read(&std::io::Error::other(e.to_string())).into()
}

fn write_err(e: impl std::fmt::Display) -> StorageError<NodeId> {
    StorageIOError::write(&std::io::Error::other(e.to_string())).into()
}

fn get_json<T: for<'a> Deserialize<'a>>(store: &dyn Store, key: &[u8]) -> StorageResult<Option<T>> {
    match store.get(Cf::Meta, key).map_err(read_err)? {
        Some(bytes) => Ok(Some(serde_json::from_slice(&bytes).map_err(read_err)?)),
        None => Ok(None),
    }
}

fn put_json<T: Serialize>(store: &dyn Store, key: &[u8], value: &T) -> StorageResult<()> {
    let mut batch = Batch::default();
    batch.put(Cf::Meta, key, serde_json::to_vec(value).map_err(write_err)?);
    store.write(batch, true).map_err(write_err)
}

/// The Raft log and vote. Cloned as its own reader.
#[derive(Clone)]
pub struct LogStore {
    store: Arc<dyn Store>,
}

impl LogStore {
    pub fn new(store: Arc<dyn Store>) -> LogStore {
        LogStore { store }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry<TypeConfig>>> {
        use std::ops::Bound;
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i + 1,
            Bound::Unbounded => 0,
        };
        let mut entries = Vec::new();
        let mut failed = None;
        self.store
            .scan(
                Cf::RaftLog,
                &[],
                ScanFrom::AtOrAfter(&start.to_be_bytes()),
                &mut |key, value| {
                    let index = u64::from_be_bytes(key.try_into().unwrap_or([0xff; 8]));
                    if !range.contains(&index) {
                        return false;
                    }
                    match serde_json::from_slice(value) {
                        Ok(entry) => entries.push(entry),
                        Err(e) => {
                            failed = Some(e);
                            return false;
                        }
                    }
                    true
                },
            )
            .map_err(read_err)?;
        match failed {
            Some(e) => Err(read_err(e)),
            None => Ok(entries),
        }
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> StorageResult<LogState<TypeConfig>> {
        let purged: Option<LogId<NodeId>> = get_json(self.store.as_ref(), PURGED_KEY)?;
        let mut last = None;
        let mut failed = None;
        self.store
            .scan(Cf::RaftLog, &[], ScanFrom::Last, &mut |_, value| {
                match serde_json::from_slice::<Entry<TypeConfig>>(value) {
                    Ok(entry) => last = Some(entry.log_id),
                    Err(e) => failed = Some(e),
                }
                false
            })
            .map_err(read_err)?;
        if let Some(e) = failed {
            return Err(read_err(e));
        }
        Ok(LogState {
            last_purged_log_id: purged,
            last_log_id: last.or(purged),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> StorageResult<()> {
        put_json(self.store.as_ref(), VOTE_KEY, vote)
    }

    async fn read_vote(&mut self) -> StorageResult<Option<Vote<NodeId>>> {
        get_json(self.store.as_ref(), VOTE_KEY)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> StorageResult<()> {
        put_json(self.store.as_ref(), COMMITTED_KEY, &committed)
    }

    async fn read_committed(&mut self) -> StorageResult<Option<LogId<NodeId>>> {
        Ok(get_json::<Option<LogId<NodeId>>>(self.store.as_ref(), COMMITTED_KEY)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = Batch::default();
        for entry in entries {
            let value = serde_json::to_vec(&entry).map_err(write_err)?;
            batch.put(Cf::RaftLog, entry.log_id.index.to_be_bytes(), value);
        }
        // Synced: an entry acknowledged to the leader must survive a crash.
        let result = self.store.write(batch, true);
        callback.log_io_completed(
            result
                .as_ref()
                .map(|_| ())
                .map_err(|e| std::io::Error::other(e.to_string())),
        );
        result.map_err(write_err)
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        self.delete_from(log_id.index, u64::MAX)
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        put_json(self.store.as_ref(), PURGED_KEY, &log_id)?;
        self.delete_from(0, log_id.index + 1)
    }
}

impl LogStore {
    /// Deletes entries with index in `[from, to)`.
    fn delete_from(&self, from: u64, to: u64) -> StorageResult<()> {
        let mut batch = Batch::default();
        self.store
            .scan(
                Cf::RaftLog,
                &[],
                ScanFrom::AtOrAfter(&from.to_be_bytes()),
                &mut |key, _| {
                    let index = u64::from_be_bytes(key.try_into().unwrap_or([0xff; 8]));
                    if index >= to {
                        return false;
                    }
                    batch.delete(Cf::RaftLog, key);
                    true
                },
            )
            .map_err(read_err)?;
        self.store.write(batch, true).map_err(write_err)
    }
}

/// A snapshot as stored: openraft's metadata and our state, prost-encoded.
#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, CoordinatorNode>,
    state: Vec<u8>,
}

struct MachineState {
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, CoordinatorNode>,
    state: pb::ClusterState,
}

/// The state machine: [`pb::ClusterState`] in memory, mirrored into the [`Cluster`] view after every apply.
#[derive(Clone)]
pub struct StateMachine {
    inner: Arc<Mutex<MachineState>>,
    store: Arc<dyn Store>,
    cluster: Arc<Cluster>,
}

impl StateMachine {
    /// Starts from the last snapshot, if any; openraft re-applies the committed log after it.
    pub fn open(store: Arc<dyn Store>, cluster: Arc<Cluster>) -> StorageResult<StateMachine> {
        let mut applied = MachineState {
            last_applied: None,
            membership: StoredMembership::default(),
            state: pb::ClusterState::default(),
        };
        if let Some(snapshot) = get_json::<StoredSnapshot>(store.as_ref(), SNAPSHOT_KEY)? {
            applied.last_applied = snapshot.meta.last_log_id;
            applied.membership = snapshot.meta.last_membership.clone();
            applied.state = prost::Message::decode(snapshot.state.as_slice()).map_err(read_err)?;
        }
        cluster.set_state(applied.state.clone());
        Ok(StateMachine {
            inner: Arc::new(Mutex::new(applied)),
            store,
            cluster,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MachineState> {
        self.inner.lock().expect("state machine lock")
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot<TypeConfig>> {
        let (meta, state) = {
            let applied = self.lock();
            let id = match applied.last_applied {
                Some(log_id) => format!("{}-{}", log_id.leader_id.term, log_id.index),
                None => "empty".into(),
            };
            let meta = SnapshotMeta {
                last_log_id: applied.last_applied,
                last_membership: applied.membership.clone(),
                snapshot_id: id,
            };
            (meta, prost::Message::encode_to_vec(&applied.state))
        };
        let stored = StoredSnapshot {
            meta: meta.clone(),
            state: state.clone(),
        };
        put_json(self.store.as_ref(), SNAPSHOT_KEY, &stored)?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(state)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(
        &mut self,
    ) -> StorageResult<(
        Option<LogId<NodeId>>,
        StoredMembership<NodeId, CoordinatorNode>,
    )> {
        let applied = self.lock();
        Ok((applied.last_applied, applied.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> StorageResult<Vec<Applied>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut replies = Vec::new();
        let state = {
            let mut applied = self.lock();
            for entry in entries {
                applied.last_applied = Some(entry.log_id);
                match entry.payload {
                    EntryPayload::Blank => {}
                    EntryPayload::Normal(command) => {
                        crate::state::apply(&mut applied.state, &command)
                    }
                    EntryPayload::Membership(membership) => {
                        applied.membership = StoredMembership::new(Some(entry.log_id), membership)
                    }
                }
                replies.push(Applied);
            }
            applied.state.clone()
        };
        self.cluster.set_state(state);
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, CoordinatorNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StorageResult<()> {
        let bytes = snapshot.into_inner();
        let state: pb::ClusterState = prost::Message::decode(bytes.as_slice()).map_err(read_err)?;
        put_json(
            self.store.as_ref(),
            SNAPSHOT_KEY,
            &StoredSnapshot {
                meta: meta.clone(),
                state: bytes,
            },
        )?;
        {
            let mut applied = self.lock();
            applied.last_applied = meta.last_log_id;
            applied.membership = meta.last_membership.clone();
            applied.state = state.clone();
        }
        self.cluster.set_state(state);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        Ok(
            get_json::<StoredSnapshot>(self.store.as_ref(), SNAPSHOT_KEY)?.map(|stored| Snapshot {
                meta: stored.meta,
                snapshot: Box::new(Cursor::new(stored.state)),
            }),
        )
    }
}
