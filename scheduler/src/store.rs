//! The scheduler's durable state: every job and task, as protobuf records.
//!
//! A closed set of backends, so an enum: the embedded redb store now, etcd for HA later. A
//! write batch is committed (fsync'd) in one transaction before anything is acknowledged.

use std::path::{Path, PathBuf};

use berth_proto as pb;
use prost::Message;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");
const TASKS: TableDefinition<&str, &[u8]> = TableDefinition::new("tasks");
const CORDONS: TableDefinition<&str, &[u8]> = TableDefinition::new("cordons");
/// redb's page cache (its default is 1 GiB).
const CACHE_BYTES: usize = 64 << 20;

/// A failure of the state store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database file could not be opened or created.
    #[error("cannot open store at {path}: {source}")]
    Open {
        /// The database file.
        path: PathBuf,
        /// redb's reason.
        source: redb::DatabaseError,
    },
    /// A read or write failed.
    #[error("store {op} failed: {reason}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// redb's reason.
        reason: String,
    },
    /// A stored record does not decode.
    #[error("stored {kind} {key} is corrupt: {source}")]
    Corrupt {
        /// `job` or `task`.
        kind: &'static str,
        /// Its key.
        key: String,
        /// prost's reason.
        source: prost::DecodeError,
    },
}

fn io(op: &'static str) -> impl Fn(&dyn std::fmt::Display) -> StoreError {
    move |e| StoreError::Io {
        op,
        reason: e.to_string(),
    }
}

/// One record to write.
#[derive(Debug, Clone)]
pub enum Write {
    /// Insert or replace a job.
    Job(Box<pb::Job>),
    /// Insert or replace a task.
    Task(Box<pb::Task>),
    /// Cordon (true) or uncordon (false) a node.
    Cordon(String, bool),
}

/// Everything the store holds, as loaded at start.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// All jobs.
    pub jobs: Vec<pb::Job>,
    /// All tasks.
    pub tasks: Vec<pb::Task>,
    /// Cordoned nodes.
    pub cordoned: Vec<String>,
}

/// The embedded store: one redb file under the scheduler's data dir.
pub struct RedbStore {
    db: Database,
}

/// The scheduler's state store.
pub enum Store {
    /// Embedded, single-node (default).
    Redb(RedbStore),
}

impl Store {
    /// Opens (or creates) the embedded store at `path`.
    pub fn open_redb(path: &Path) -> Result<Store, StoreError> {
        // Every record also lives in memory, decoded; a large page cache would hold it twice.
        let db = redb::Builder::new()
            .set_cache_size(CACHE_BYTES)
            .create(path)
            .map_err(|source| StoreError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        let tx = db.begin_write().map_err(|e| io("begin")(&e))?;
        tx.open_table(JOBS).map_err(|e| io("create table")(&e))?;
        tx.open_table(TASKS).map_err(|e| io("create table")(&e))?;
        tx.open_table(CORDONS).map_err(|e| io("create table")(&e))?;
        tx.commit().map_err(|e| io("commit")(&e))?;
        Ok(Store::Redb(RedbStore { db }))
    }

    /// Reads every job and task.
    pub fn load(&self) -> Result<Snapshot, StoreError> {
        let Store::Redb(s) = self;
        let tx = s.db.begin_read().map_err(|e| io("begin read")(&e))?;
        let cordons = tx.open_table(CORDONS).map_err(|e| io("open cordons")(&e))?;
        let mut cordoned = Vec::new();
        for row in cordons.iter().map_err(|e| io("read cordons")(&e))? {
            let (k, _) = row.map_err(|e| io("read cordons")(&e))?;
            cordoned.push(k.value().to_string());
        }
        Ok(Snapshot {
            jobs: scan(&tx, JOBS, "job")?,
            tasks: scan(&tx, TASKS, "task")?,
            cordoned,
        })
    }

    /// Writes these jobs and tasks atomically and durably, encoding them in place.
    pub fn commit_records(&self, jobs: &[&pb::Job], tasks: &[&pb::Task]) -> Result<(), StoreError> {
        if jobs.is_empty() && tasks.is_empty() {
            return Ok(());
        }
        let Store::Redb(s) = self;
        let tx = s.db.begin_write().map_err(|e| io("begin write")(&e))?;
        {
            let mut buf = Vec::with_capacity(1024);
            let mut job_table = tx.open_table(JOBS).map_err(|e| io("open jobs")(&e))?;
            for j in jobs {
                buf.clear();
                j.encode(&mut buf).map_err(|e| io("encode job")(&e))?;
                job_table
                    .insert(j.id.as_str(), buf.as_slice())
                    .map_err(|e| io("write job")(&e))?;
            }
            let mut task_table = tx.open_table(TASKS).map_err(|e| io("open tasks")(&e))?;
            for t in tasks {
                buf.clear();
                t.encode(&mut buf).map_err(|e| io("encode task")(&e))?;
                task_table
                    .insert(t.id.as_str(), buf.as_slice())
                    .map_err(|e| io("write task")(&e))?;
            }
        }
        tx.commit().map_err(|e| io("commit")(&e))?;
        Ok(())
    }

    /// Writes a batch atomically and durably.
    pub fn commit(&self, writes: &[Write]) -> Result<(), StoreError> {
        if writes.is_empty() {
            return Ok(());
        }
        let Store::Redb(s) = self;
        let tx = s.db.begin_write().map_err(|e| io("begin write")(&e))?;
        {
            let mut jobs = tx.open_table(JOBS).map_err(|e| io("open jobs")(&e))?;
            let mut tasks = tx.open_table(TASKS).map_err(|e| io("open tasks")(&e))?;
            let mut cordons = tx.open_table(CORDONS).map_err(|e| io("open cordons")(&e))?;
            for w in writes {
                match w {
                    Write::Job(j) => {
                        jobs.insert(j.id.as_str(), j.encode_to_vec().as_slice())
                            .map_err(|e| io("write job")(&e))?;
                    }
                    Write::Task(t) => {
                        tasks
                            .insert(t.id.as_str(), t.encode_to_vec().as_slice())
                            .map_err(|e| io("write task")(&e))?;
                    }
                    Write::Cordon(node, true) => {
                        cordons
                            .insert(node.as_str(), [].as_slice())
                            .map_err(|e| io("write cordon")(&e))?;
                    }
                    Write::Cordon(node, false) => {
                        cordons
                            .remove(node.as_str())
                            .map_err(|e| io("write cordon")(&e))?;
                    }
                }
            }
        }
        tx.commit().map_err(|e| io("commit")(&e))?;
        Ok(())
    }
}

/// Decodes every record of one table.
fn scan<M: Message + Default>(
    tx: &redb::ReadTransaction,
    table: TableDefinition<&str, &[u8]>,
    kind: &'static str,
) -> Result<Vec<M>, StoreError> {
    let t = tx.open_table(table).map_err(|e| io("open table")(&e))?;
    let mut out = Vec::new();
    for row in t.iter().map_err(|e| io("scan")(&e))? {
        let (k, v) = row.map_err(|e| io("scan")(&e))?;
        out.push(M::decode(v.value()).map_err(|source| StoreError::Corrupt {
            kind,
            key: k.value().to_string(),
            source,
        })?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committed_records_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.redb");
        {
            let store = Store::open_redb(&path).expect("open");
            let job = pb::Job {
                id: "j1".into(),
                state: pb::JobState::Active as i32,
                ..Default::default()
            };
            let task = pb::Task {
                id: "j1-0-0".into(),
                job_id: "j1".into(),
                ..Default::default()
            };
            store
                .commit(&[Write::Job(Box::new(job)), Write::Task(Box::new(task))])
                .expect("commit");
        }
        let store = Store::open_redb(&path).expect("reopen");
        let snap = store.load().expect("load");
        assert_eq!(snap.jobs.len(), 1);
        assert_eq!(snap.jobs[0].id, "j1");
        assert_eq!(snap.tasks.len(), 1);
        assert_eq!(snap.tasks[0].job_id, "j1");
    }
}
