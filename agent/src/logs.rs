//! LogService: streams a task's output file, following it until the task has finished.
//!
//! The shim writes stdout and stderr of a task to `<data>/tasks/<id>/output.log`; the task's
//! supervisor writes `exit` beside it once the task ended, which is where `follow` stops.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use berth_proto as pb;
use futures::Stream;
use pb::log_service_server::{LogService, LogServiceServer};
use tokio::io::AsyncReadExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

const CHUNK: usize = 64 << 10;
const POLL: Duration = Duration::from_millis(100);

/// Where a task's files live.
pub fn task_dir(data_dir: &Path, task_id: &str) -> PathBuf {
    data_dir.join("tasks").join(task_id)
}

/// Task ids are containerd ids; anything else never names a file.
pub fn valid_task_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// LogService over the agent's data dir.
#[derive(Clone)]
pub struct LogApi {
    data_dir: PathBuf,
}

impl LogApi {
    /// The service for a tonic server.
    pub fn server(data_dir: PathBuf) -> LogServiceServer<LogApi> {
        LogServiceServer::new(LogApi { data_dir })
    }
}

#[tonic::async_trait]
impl LogService for LogApi {
    type TaskLogsStream = Pin<Box<dyn Stream<Item = Result<pb::LogChunk, Status>> + Send>>;

    async fn task_logs(
        &self,
        req: Request<pb::TaskLogsRequest>,
    ) -> Result<Response<Self::TaskLogsStream>, Status> {
        let req = req.into_inner();
        if !valid_task_id(&req.task_id) {
            return Err(Status::invalid_argument("task_id: not a valid task id"));
        }
        let dir = task_dir(&self.data_dir, &req.task_id);
        let log = dir.join("output.log");
        let exit = dir.join("exit");
        let mut file = tokio::fs::File::open(&log).await.map_err(|_| {
            Status::not_found(format!("no logs for task {} on this node", req.task_id))
        })?;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            let mut buf = vec![0u8; CHUNK];
            loop {
                // Check for the end marker before reading, so that output written just before
                // the task ended is still read once more.
                let done = !req.follow || tokio::fs::try_exists(&exit).await.unwrap_or(true);
                loop {
                    match file.read(&mut buf).await {
                        Ok(0) => break,
                        Ok(n) => {
                            let chunk = pb::LogChunk {
                                stream: pb::LogStream::Stdout as i32,
                                data: buf[..n].to_vec(),
                            };
                            if tx.send(Ok(chunk)).await.is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            let _ = tx
                                .send(Err(Status::internal(format!("reading log: {e}"))))
                                .await;
                            return;
                        }
                    }
                }
                if done || tx.is_closed() {
                    return;
                }
                tokio::time::sleep(POLL).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
