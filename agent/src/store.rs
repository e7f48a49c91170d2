//! The agent's durable record of its tasks: `agent.redb` in the data dir.
//!
//! An assignment is written before the agent creates anything for it, and every status the
//! agent decides is written before it is reported or acted on, so that an agent killed at any
//! point knows on restart what it was given and what it last said. The database's file lock
//! also keeps a second agent off the same data dir.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use berth_proto as pb;
use prost::Message;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

const TASKS: TableDefinition<&str, &[u8]> = TableDefinition::new("tasks");

/// A failure of the agent's store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The file could not be opened: missing permissions, or another agent holds it.
    #[error("cannot open the agent store {path}: {source}")]
    Open {
        /// The database file.
        path: PathBuf,
        /// redb's reason.
        source: redb::DatabaseError,
    },
    /// A read or write failed.
    #[error("agent store {op} failed: {reason}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The reason.
        reason: String,
    },
}

fn io(op: &'static str) -> impl Fn(&dyn std::fmt::Display) -> StoreError {
    move |e| StoreError::Io {
        op,
        reason: e.to_string(),
    }
}

/// The agent's task records; cheap to clone, safe to share between tasks.
#[derive(Clone)]
pub struct AgentStore {
    db: Arc<Database>,
}

impl AgentStore {
    /// Opens (or creates) `agent.redb` in `data_dir`.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        let path = data_dir.join("agent.redb");
        let db = redb::Builder::new()
            .set_cache_size(4 << 20)
            .create(&path)
            .map_err(|source| StoreError::Open { path, source })?;
        let tx = db.begin_write().map_err(|e| io("init")(&e))?;
        tx.open_table(TASKS).map_err(|e| io("init")(&e))?;
        tx.commit().map_err(|e| io("init")(&e))?;
        Ok(Self { db: Arc::new(db) })
    }

    /// Every record, with the ids of records that no longer decode (to be dropped).
    pub fn load(&self) -> Result<(Vec<pb::AgentTaskRecord>, Vec<String>), StoreError> {
        let tx = self.db.begin_read().map_err(|e| io("load")(&e))?;
        let table = tx.open_table(TASKS).map_err(|e| io("load")(&e))?;
        let mut good = Vec::new();
        let mut bad = Vec::new();
        for row in table.iter().map_err(|e| io("load")(&e))? {
            let (k, v) = row.map_err(|e| io("load")(&e))?;
            match pb::AgentTaskRecord::decode(v.value()) {
                Ok(r)
                    if r.assignment
                        .as_ref()
                        .is_some_and(|a| a.task_id == k.value()) =>
                {
                    good.push(r)
                }
                _ => bad.push(k.value().to_string()),
            }
        }
        Ok((good, bad))
    }

    /// Writes the record of `id`, replacing what was there, and waits until it is on disk.
    pub async fn put(&self, record: pb::AgentTaskRecord) -> Result<(), StoreError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let id = record
                .assignment
                .as_ref()
                .map(|a| a.task_id.clone())
                .unwrap_or_default();
            let tx = db.begin_write().map_err(|e| io("write")(&e))?;
            {
                let mut t = tx.open_table(TASKS).map_err(|e| io("write")(&e))?;
                t.insert(id.as_str(), record.encode_to_vec().as_slice())
                    .map_err(|e| io("write")(&e))?;
            }
            tx.commit().map_err(|e| io("commit")(&e))
        })
        .await
        .map_err(|e| io("write")(&e))?
    }

    /// Replaces the status in the record of `status.task_id`; a task without a record is
    /// left alone (the agent never stored an assignment for it).
    pub async fn set_status(&self, status: pb::TaskStatus) -> Result<(), StoreError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let tx = db.begin_write().map_err(|e| io("write")(&e))?;
            {
                let mut t = tx.open_table(TASKS).map_err(|e| io("write")(&e))?;
                let old = t
                    .get(status.task_id.as_str())
                    .map_err(|e| io("read")(&e))?
                    .and_then(|v| pb::AgentTaskRecord::decode(v.value()).ok());
                let Some(mut record) = old else {
                    return Ok(());
                };
                let id = status.task_id.clone();
                record.status = Some(status);
                t.insert(id.as_str(), record.encode_to_vec().as_slice())
                    .map_err(|e| io("write")(&e))?;
            }
            tx.commit().map_err(|e| io("commit")(&e))
        })
        .await
        .map_err(|e| io("write")(&e))?
    }

    /// Forgets the records of `ids`.
    pub async fn remove(&self, ids: Vec<String>) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let tx = db.begin_write().map_err(|e| io("remove")(&e))?;
            {
                let mut t = tx.open_table(TASKS).map_err(|e| io("remove")(&e))?;
                for id in &ids {
                    t.remove(id.as_str()).map_err(|e| io("remove")(&e))?;
                }
            }
            tx.commit().map_err(|e| io("commit")(&e))
        })
        .await
        .map_err(|e| io("remove")(&e))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, state: pb::TaskState) -> pb::AgentTaskRecord {
        pb::AgentTaskRecord {
            assignment: Some(pb::TaskAssignment {
                task_id: id.into(),
                job_id: "j".into(),
                ..Default::default()
            }),
            status: Some(pb::TaskStatus {
                task_id: id.into(),
                state: state as i32,
                ..Default::default()
            }),
        }
    }

    #[tokio::test]
    async fn records_survive_reopen_and_status_updates_only_known_tasks() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = AgentStore::open(dir.path()).unwrap();
            s.put(record("a", pb::TaskState::Launched)).await.unwrap();
            s.put(record("b", pb::TaskState::Launched)).await.unwrap();
            let mut st = record("a", pb::TaskState::Started).status.unwrap();
            st.exit_code = 0;
            s.set_status(st).await.unwrap();
            // No record for c: nothing is created.
            s.set_status(record("c", pb::TaskState::Started).status.unwrap())
                .await
                .unwrap();
            s.remove(vec!["b".into()]).await.unwrap();
        }
        let s = AgentStore::open(dir.path()).unwrap();
        let (good, bad) = s.load().unwrap();
        assert!(bad.is_empty());
        assert_eq!(good.len(), 1);
        assert_eq!(good[0].assignment.as_ref().unwrap().task_id, "a");
        assert_eq!(
            good[0].status.as_ref().unwrap().state,
            pb::TaskState::Started as i32
        );
    }

    #[test]
    fn a_second_agent_cannot_open_the_same_data_dir() {
        let dir = tempfile::tempdir().unwrap();
        let _first = AgentStore::open(dir.path()).unwrap();
        let err = AgentStore::open(dir.path()).err().unwrap();
        assert!(err.to_string().contains("agent.redb"), "{err}");
    }

    #[test]
    fn corrupt_records_are_reported_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let s = AgentStore::open(dir.path()).unwrap();
        let tx = s.db.begin_write().unwrap();
        tx.open_table(TASKS)
            .unwrap()
            .insert("x", [0xffu8, 0xff, 0xff].as_slice())
            .unwrap();
        tx.commit().unwrap();
        let (good, bad) = s.load().unwrap();
        assert!(good.is_empty());
        assert_eq!(bad, ["x"]);
    }
}
