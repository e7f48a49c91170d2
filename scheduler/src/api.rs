//! The scheduler's gRPC services: JobService for users, AgentService for agents.
//!
//! Handlers check request shapes and forward to the cluster actor; they hold no state.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use berth_proto as pb;
use futures::{Stream, StreamExt};
use pb::agent_service_server::{AgentService, AgentServiceServer};
use pb::job_service_server::{JobService, JobServiceServer};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, warn};

use crate::cluster::{ClusterHandle, Command};
use crate::error::SchedulerError;

/// Largest job request accepted. Larger than any valid spec, so that an oversized field is
/// reported by validation, naming it, rather than refused by the transport.
pub const MAX_JOB_MESSAGE_BYTES: usize = 16 << 20;
/// Largest agent message accepted.
pub const MAX_AGENT_MESSAGE_BYTES: usize = 4 << 20;
const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// JobService, backed by the cluster actor.
#[derive(Clone)]
pub struct JobApi {
    cluster: ClusterHandle,
}

/// AgentService, backed by the cluster actor.
#[derive(Clone)]
pub struct AgentApi {
    cluster: ClusterHandle,
}

/// Both services, ready to add to a tonic server.
pub fn services(
    cluster: ClusterHandle,
) -> (JobServiceServer<JobApi>, AgentServiceServer<AgentApi>) {
    (
        JobServiceServer::new(JobApi {
            cluster: cluster.clone(),
        })
        .max_decoding_message_size(MAX_JOB_MESSAGE_BYTES),
        AgentServiceServer::new(AgentApi { cluster })
            .max_decoding_message_size(MAX_AGENT_MESSAGE_BYTES),
    )
}

/// A tonic router serving both services; callers may add more (e.g. an agent's LogService)
/// before serving.
pub fn router(cluster: ClusterHandle) -> tonic::transport::server::Router {
    let (jobs, agents) = services(cluster);
    tonic::transport::Server::builder()
        .add_service(jobs)
        .add_service(agents)
}

/// Serves `router` on `listener` until `cancel` fires.
pub async fn serve(
    router: tonic::transport::server::Router,
    listener: tokio::net::TcpListener,
    cancel: tokio_util::sync::CancellationToken,
) -> Result<(), tonic::transport::Error> {
    router
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            async move { cancel.cancelled().await },
        )
        .await
}

fn required(field: &'static str, v: &str) -> Result<(), Status> {
    if v.is_empty() {
        return Err(SchedulerError::BadField {
            field,
            reason: "is required".into(),
        }
        .into());
    }
    Ok(())
}

#[tonic::async_trait]
impl JobService for JobApi {
    async fn create_job(
        &self,
        req: Request<pb::CreateJobRequest>,
    ) -> Result<Response<pb::CreateJobResponse>, Status> {
        let spec = req.into_inner().spec.ok_or_else(|| {
            Status::from(SchedulerError::BadField {
                field: "spec",
                reason: "is required".into(),
            })
        })?;
        let job = self
            .cluster
            .call(|r| Command::CreateJob(Box::new(spec), r))
            .await?;
        Ok(Response::new(pb::CreateJobResponse { job: Some(job) }))
    }

    async fn get_job(
        &self,
        req: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::GetJobResponse>, Status> {
        let id = req.into_inner().id;
        required("id", &id)?;
        let (job, tasks) = self.cluster.call(|r| Command::GetJob(id, r)).await?;
        Ok(Response::new(pb::GetJobResponse {
            job: Some(job),
            tasks,
        }))
    }

    async fn list_jobs(
        &self,
        req: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let req = req.into_inner();
        Ok(Response::new(
            self.cluster.call(|r| Command::ListJobs(req, r)).await?,
        ))
    }

    async fn kill_job(
        &self,
        req: Request<pb::KillJobRequest>,
    ) -> Result<Response<pb::KillJobResponse>, Status> {
        let id = req.into_inner().id;
        required("id", &id)?;
        let job = self.cluster.call(|r| Command::KillJob(id, r)).await?;
        Ok(Response::new(pb::KillJobResponse { job: Some(job) }))
    }

    async fn kill_task(
        &self,
        req: Request<pb::KillTaskRequest>,
    ) -> Result<Response<pb::KillTaskResponse>, Status> {
        let id = req.into_inner().task_id;
        required("task_id", &id)?;
        let task = self.cluster.call(|r| Command::KillTask(id, r)).await?;
        Ok(Response::new(pb::KillTaskResponse { task: Some(task) }))
    }

    async fn update_job_capacity(
        &self,
        req: Request<pb::UpdateJobCapacityRequest>,
    ) -> Result<Response<pb::UpdateJobCapacityResponse>, Status> {
        let req = req.into_inner();
        required("id", &req.id)?;
        let job = self
            .cluster
            .call(|r| Command::UpdateCapacity(req.id, req.tasks, r))
            .await?;
        Ok(Response::new(pb::UpdateJobCapacityResponse {
            job: Some(job),
        }))
    }

    type WatchJobsStream = BoxStream<pb::WatchJobsResponse>;

    async fn watch_jobs(
        &self,
        _req: Request<pb::WatchJobsRequest>,
    ) -> Result<Response<Self::WatchJobsStream>, Status> {
        let (jobs, mut rx) = self.cluster.call(Command::Watch).await?;
        let (tx, out) = mpsc::channel(256);
        tokio::spawn(async move {
            for job in jobs {
                let ev = pb::watch_jobs_response::Event::Job(job);
                if tx
                    .send(Ok(pb::WatchJobsResponse { event: Some(ev) }))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            let end = pb::watch_jobs_response::Event::SnapshotEnd(pb::SnapshotEnd {});
            if tx
                .send(Ok(pb::WatchJobsResponse { event: Some(end) }))
                .await
                .is_err()
            {
                return;
            }
            loop {
                match rx.recv().await {
                    Ok(ev) => {
                        if tx.send(Ok(ev)).await.is_err() {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        let _ = tx
                            .send(Err(Status::data_loss(format!(
                                "watcher fell {n} events behind; watch again for a fresh snapshot"
                            ))))
                            .await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out))))
    }

    async fn list_tasks(
        &self,
        req: Request<pb::ListTasksRequest>,
    ) -> Result<Response<pb::ListTasksResponse>, Status> {
        let req = req.into_inner();
        let tasks = self.cluster.call(|r| Command::ListTasks(req, r)).await?;
        Ok(Response::new(pb::ListTasksResponse { tasks }))
    }

    async fn get_task(
        &self,
        req: Request<pb::GetTaskRequest>,
    ) -> Result<Response<pb::GetTaskResponse>, Status> {
        let id = req.into_inner().task_id;
        required("task_id", &id)?;
        let task = self.cluster.call(|r| Command::GetTask(id, r)).await?;
        Ok(Response::new(pb::GetTaskResponse { task: Some(task) }))
    }

    async fn list_nodes(
        &self,
        _req: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        let nodes = self.cluster.call(Command::ListNodes).await?;
        Ok(Response::new(pb::ListNodesResponse { nodes }))
    }

    async fn cordon_node(
        &self,
        req: Request<pb::CordonNodeRequest>,
    ) -> Result<Response<pb::CordonNodeResponse>, Status> {
        let r = req.into_inner();
        let node = self
            .cluster
            .call(|reply| Command::CordonNode(r.node_id, r.cordon, reply))
            .await?;
        Ok(Response::new(pb::CordonNodeResponse { node: Some(node) }))
    }

    type TaskLogsStream = BoxStream<pb::LogChunk>;

    async fn task_logs(
        &self,
        req: Request<pb::TaskLogsRequest>,
    ) -> Result<Response<Self::TaskLogsStream>, Status> {
        let req = req.into_inner();
        required("task_id", &req.task_id)?;
        let id = req.task_id.clone();
        let task = self.cluster.call(|r| Command::GetTask(id, r)).await?;
        if task.node_id.is_empty() {
            return Err(Status::failed_precondition(format!(
                "task {} never ran on a node, so it has no logs",
                task.id
            )));
        }
        let nodes = self.cluster.call(Command::ListNodes).await?;
        let addr = nodes
            .into_iter()
            .find(|n| n.id == task.node_id)
            .map(|n| n.log_address)
            .filter(|a| !a.is_empty())
            .ok_or_else(|| {
                Status::unavailable(format!("node {} serves no logs right now", task.node_id))
            })?;
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| Status::internal(format!("node log address {addr}: {e}")))?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .map_err(|e| Status::unavailable(format!("node {} at {addr}: {e}", task.node_id)))?;
        let stream = pb::log_service_client::LogServiceClient::new(channel)
            .task_logs(req)
            .await?
            .into_inner();
        Ok(Response::new(Box::pin(stream)))
    }
}

static NEXT_CONN: AtomicU64 = AtomicU64::new(1);

#[tonic::async_trait]
impl AgentService for AgentApi {
    type ConnectStream = BoxStream<pb::SchedulerMessage>;

    async fn connect(
        &self,
        req: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let mut inbound = req.into_inner();
        let first = tokio::time::timeout(REGISTER_TIMEOUT, inbound.next())
            .await
            .map_err(|_| Status::deadline_exceeded("no Register within 10s"))?
            .ok_or_else(|| Status::invalid_argument("stream ended before Register"))??;
        let Some(pb::agent_message::Msg::Register(register)) = first.msg else {
            return Err(Status::invalid_argument(
                "the first message must be Register",
            ));
        };
        let node_id = register.node_id.clone();
        let conn_id = NEXT_CONN.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(crate::cluster::AGENT_QUEUE_LEN);
        self.cluster
            .call(|reply| Command::Register {
                register,
                conn_id,
                tx,
                reply,
            })
            .await?;
        let cluster = self.cluster.clone();
        tokio::spawn(async move {
            loop {
                match inbound.next().await {
                    Some(Ok(pb::AgentMessage { msg: Some(msg) })) => {
                        cluster
                            .tell(Command::FromAgent {
                                node_id: node_id.clone(),
                                conn_id,
                                msg,
                            })
                            .await;
                    }
                    Some(Ok(_)) => debug!(node_id, "Empty agent message ignored."),
                    Some(Err(e)) => {
                        warn!(node_id, error = %e, "Agent stream failed.");
                        break;
                    }
                    None => break,
                }
            }
            cluster
                .tell(Command::Disconnected { node_id, conn_id })
                .await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx).map(Ok))))
    }
}
