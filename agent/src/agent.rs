//! The agent core: one loop that owns the agent's view of its tasks.
//!
//! It receives orders from the scheduler (over a stream a connector task keeps open, with
//! backoff), exit and OOM events from containerd, and reports from task supervisors; it sends
//! the scheduler a Register on every (re)connect, then heartbeats with usage and every status
//! change. Stopping the agent leaves containers running; on start it re-attaches to them.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use berth_model::resources::Resources;
use berth_model::task::{FinishReason, TaskState};
use berth_proto as pb;
use containerd_client::events::{TaskExit, TaskOom};
use containerd_client::services::v1::SubscribeRequest;
use futures::StreamExt;
use prost::Message;
use rand::Rng;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::host;
use crate::logs::valid_task_id;
use crate::runtime::{Containerd, LABEL_TASK, RuntimeError, TaskStatus};
use crate::store::{AgentStore, StoreError};
use crate::supervisor::{self, Context, Report, Signal};
use crate::usage;

/// How to run an agent.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// This node's id.
    pub node_id: String,
    /// Scheduler address (`http://127.0.0.1:7700`).
    pub scheduler: String,
    /// containerd's socket.
    pub containerd: PathBuf,
    /// containerd namespace for this agent's containers.
    pub namespace: String,
    /// Logs and per-task files.
    pub data_dir: PathBuf,
    /// Capacity kept for the host itself.
    pub reserved: Resources,
    /// Capacity to advertise instead of the host's (for tests and simulations).
    pub capacity: Option<Resources>,
    /// Attributes such as zone and instance type.
    pub attributes: HashMap<String, String>,
    /// Where this agent's LogService is reachable.
    pub log_address: String,
    /// On stop, kill every task gracefully and report it before exiting (a node drain),
    /// instead of leaving the containers running.
    pub drain_on_stop: bool,
    /// How long a finished task's files (its log) are kept for `berth logs`.
    pub log_retention: Duration,
}

/// An agent that cannot start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// containerd is not reachable.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// The agent's own store cannot be opened or read.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The data dir cannot be created.
    #[error("data dir {path}: {source}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A config value is invalid.
    #[error("{0}")]
    Config(String),
}

enum CoreMsg {
    Report(Box<Report>),
    Exit {
        id: String,
        status: u32,
    },
    Oom {
        id: String,
    },
    WantRegister(oneshot::Sender<pb::Register>),
    Connected {
        generation: u64,
        out: mpsc::Sender<pb::AgentMessage>,
    },
    FromScheduler {
        generation: u64,
        msg: Box<pb::scheduler_message::Msg>,
    },
    Disconnected {
        generation: u64,
    },
}

struct Core {
    cfg: AgentConfig,
    ctx: Arc<Context>,
    capacity: Resources,
    /// Latest status of every task this agent knows, with when it was last changed.
    statuses: HashMap<String, (pb::TaskStatus, tokio::time::Instant)>,
    supervisors: HashMap<String, mpsc::Sender<Signal>>,
    /// Each supervised task's kill grace period, for drains.
    grace: HashMap<String, Duration>,
    /// Finished tasks' directories, oldest first, with when they may go.
    expiring: std::collections::VecDeque<(tokio::time::Instant, String)>,
    session: Option<(u64, mpsc::Sender<pb::AgentMessage>)>,
    heartbeat: Duration,
}

/// Keeps finished statuses this long, so a reconnect reports them again.
const KEEP_FINISHED: Duration = Duration::from_secs(600);

/// Runs the agent until `cancel` fires. Running tasks are left running.
pub async fn run(cfg: AgentConfig, cancel: CancellationToken) -> Result<(), AgentError> {
    if cfg.node_id.is_empty() {
        return Err(AgentError::Config("node_id: must not be empty".into()));
    }
    tokio::fs::create_dir_all(cfg.data_dir.join("tasks"))
        .await
        .map_err(|source| AgentError::DataDir {
            path: cfg.data_dir.clone(),
            source,
        })?;
    let store = AgentStore::open(&cfg.data_dir)?;
    let rt = Containerd::connect(&cfg.containerd, &cfg.namespace).await?;
    let capacity = cfg
        .capacity
        .unwrap_or_else(|| host::capacity(&cfg.data_dir, &cfg.reserved));
    let (tx, mut rx) = mpsc::channel::<CoreMsg>(4096);
    let (report_tx, mut report_rx) = mpsc::channel::<Report>(4096);
    let ctx = Arc::new(Context {
        rt: rt.clone(),
        data_dir: cfg.data_dir.clone(),
        namespace: cfg.namespace.clone(),
        reports: report_tx,
        store,
    });
    // Reports go through the core's one inbox.
    {
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Some(r) = report_rx.recv().await {
                if tx.send(CoreMsg::Report(Box::new(r))).await.is_err() {
                    break;
                }
            }
        });
    }
    // The connection and the event feed outlive `cancel` while a drain reports its kills.
    let stop = CancellationToken::new();
    let _stop_on_exit = stop.clone().drop_guard();
    tokio::spawn(events_loop(rt.clone(), tx.clone(), stop.clone()));
    let mut core = Core {
        cfg: cfg.clone(),
        ctx,
        capacity,
        statuses: HashMap::new(),
        supervisors: HashMap::new(),
        grace: HashMap::new(),
        expiring: Default::default(),
        session: None,
        heartbeat: Duration::from_secs(2),
    };
    core.recover().await?;
    tokio::spawn(connector(cfg.scheduler.clone(), tx.clone(), stop.clone()));
    info!(node_id = %cfg.node_id, %capacity, "Agent running.");
    let mut hb = tokio::time::interval(core.heartbeat);
    let mut drain_deadline: Option<tokio::time::Instant> = None;
    loop {
        if drain_deadline.is_some() && core.supervisors.is_empty() {
            // Let the last statuses leave before the stream closes.
            tokio::time::sleep(Duration::from_millis(200)).await;
            info!("Drained: every task was stopped and reported.");
            return Ok(());
        }
        tokio::select! {
            _ = cancel.cancelled(), if drain_deadline.is_none() => {
                if !cfg.drain_on_stop {
                    break;
                }
                drain_deadline = Some(core.drain().await);
            }
            _ = tokio::time::sleep_until(drain_deadline.unwrap_or_else(tokio::time::Instant::now)), if drain_deadline.is_some() => {
                warn!(left = core.supervisors.len(), "Drain timed out; some tasks may still run.");
                return Ok(());
            }
            Some(msg) = rx.recv() => core.handle(msg, &mut hb).await,
            _ = hb.tick() => core.send_heartbeat().await,
        }
    }
    info!("Agent stopped; its tasks keep running.");
    Ok(())
}

impl Core {
    /// Re-attaches to containers left by an earlier run, settles what happened while the agent
    /// was down from its store and containerd, and cleans up half-created containers.
    async fn recover(&mut self) -> Result<(), AgentError> {
        let (records, corrupt) = self.ctx.store.load()?;
        if !corrupt.is_empty() {
            warn!(tasks = ?corrupt, "Dropping agent store records that do not decode.");
            self.ctx.store.remove(corrupt).await?;
        }
        let mut records: HashMap<String, pb::AgentTaskRecord> = records
            .into_iter()
            .filter_map(|r| Some((r.assignment.as_ref()?.task_id.clone(), r)))
            .collect();
        for (id, labels) in self.ctx.rt.berth_containers().await? {
            if labels.get(LABEL_TASK) != Some(&id) || !valid_task_id(&id) {
                continue;
            }
            let status = self.ctx.rt.status(&id).await?;
            let record = records.remove(&id);
            let said = record.as_ref().and_then(|r| r.status.clone());
            let said_finished = said
                .as_ref()
                .is_some_and(|s| s.state == pb::TaskState::Finished as i32);
            match (status, record) {
                (TaskStatus::Running, Some(r)) if !said_finished => {
                    info!(task_id = id, "Re-attached to a running task.");
                    let already = said
                        .as_ref()
                        .is_some_and(|s| s.state == pb::TaskState::Started as i32);
                    if already {
                        self.set_status(&id, TaskState::Started, "");
                    } else {
                        self.record_status(&id, TaskState::Started, "").await;
                    }
                    let a = r.assignment.unwrap_or_default();
                    let (stx, srx) = mpsc::channel(16);
                    self.supervisors.insert(id.clone(), stx);
                    self.grace.insert(id.clone(), grace_of(&a));
                    tokio::spawn(supervisor::run_attached(self.ctx.clone(), a, srx));
                }
                (_, Some(_)) if said_finished => {
                    // Its end was recorded; the agent died before the cleanup.
                    let _ = self.ctx.rt.kill(&id, 9).await;
                    let _ = self.ctx.rt.remove(&id).await;
                    self.restore_finished(said.unwrap_or_default());
                }
                (TaskStatus::Stopped(code), _) => {
                    let _ = self.ctx.rt.remove(&id).await;
                    let reason =
                        FinishReason::from_exit_code(i32::try_from(code).unwrap_or(i32::MAX));
                    info!(task_id = id, %reason, "Task exited while the agent was down.");
                    self.record_status(
                        &id,
                        TaskState::Finished(reason),
                        format!("exit status {code}"),
                    )
                    .await;
                }
                _ => {
                    warn!(task_id = id, "Removing a task the agent left half-created.");
                    let _ = self.ctx.rt.remove(&id).await;
                    self.record_status(
                        &id,
                        TaskState::Finished(FinishReason::LocalSystemError),
                        "agent restarted while creating the task",
                    )
                    .await;
                }
            }
        }
        // Records without a container: ends to report again, or assignments the agent took
        // but died before creating anything for.
        let mut old = Vec::new();
        for (id, r) in records {
            match r.status {
                Some(s) if s.state == pb::TaskState::Finished as i32 => {
                    let age = berth_model::now_unix_ms().saturating_sub(s.at_unix_ms);
                    if u64::try_from(age).is_ok_and(|a| a < KEEP_FINISHED.as_millis() as u64) {
                        self.restore_finished(s);
                    } else {
                        old.push(id);
                    }
                }
                _ => {
                    warn!(
                        task_id = id,
                        "Task was assigned but not created before a restart."
                    );
                    self.record_status(
                        &id,
                        TaskState::Finished(FinishReason::LocalSystemError),
                        "agent restarted before the container was created",
                    )
                    .await;
                }
            }
        }
        self.ctx.store.remove(old).await?;
        for key in self.ctx.rt.remove_orphan_snapshots().await? {
            warn!(
                snapshot = key,
                "Removed a snapshot an interrupted create left behind."
            );
        }
        self.schedule_old_task_dirs().await;
        Ok(())
    }

    /// Keeps a recorded end, with its age, to report on the next Register.
    fn restore_finished(&mut self, s: pb::TaskStatus) {
        let age = berth_model::now_unix_ms().saturating_sub(s.at_unix_ms);
        let age = Duration::from_millis(u64::try_from(age).unwrap_or(0));
        let at = tokio::time::Instant::now()
            .checked_sub(age)
            .unwrap_or_else(tokio::time::Instant::now);
        self.statuses.insert(s.task_id.clone(), (s, at));
    }

    /// Sets, records and returns a status the agent decided itself.
    async fn record_status(
        &mut self,
        id: &str,
        state: TaskState,
        message: impl Into<String>,
    ) -> pb::TaskStatus {
        let s = self.set_status(id, state, message);
        self.ctx.persist(&s).await;
        s
    }

    fn set_status(
        &mut self,
        id: &str,
        state: TaskState,
        message: impl Into<String>,
    ) -> pb::TaskStatus {
        let s = supervisor::task_status(id, state, message);
        self.statuses
            .insert(id.to_string(), (s.clone(), tokio::time::Instant::now()));
        s
    }

    async fn send(&mut self, msg: pb::agent_message::Msg) {
        if let Some((_, out)) = &self.session
            && out.send(pb::AgentMessage { msg: Some(msg) }).await.is_err()
        {
            self.session = None;
        }
    }

    /// Tells the scheduler, then kills every task with its grace period; returns when to give up.
    async fn drain(&mut self) -> tokio::time::Instant {
        info!(
            tasks = self.supervisors.len(),
            "Draining: stopping every task."
        );
        self.send(pb::agent_message::Msg::Drain(pb::Drain {})).await;
        let mut longest = Duration::ZERO;
        for (id, s) in &self.supervisors {
            let grace = self.grace.get(id).copied().unwrap_or(Duration::from_millis(
                berth_model::spec::DEFAULT_KILL_GRACE_MS,
            ));
            longest = longest.max(grace);
            let _ = s.send(Signal::Kill(grace)).await;
        }
        tokio::time::Instant::now() + longest + Duration::from_secs(10)
    }

    /// Forgets ends reported long enough ago, here and in the store.
    async fn prune_finished(&mut self) {
        let now = tokio::time::Instant::now();
        let old: Vec<String> = self
            .statuses
            .iter()
            .filter(|(_, (s, at))| {
                s.state == pb::TaskState::Finished as i32
                    && now.duration_since(*at) >= KEEP_FINISHED
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in &old {
            self.statuses.remove(id);
        }
        if let Err(e) = self.ctx.store.remove(old).await {
            warn!(error = %e, "Cannot forget old task records.");
        }
    }

    async fn register(&mut self) -> pb::Register {
        self.prune_finished().await;
        pb::Register {
            node_id: self.cfg.node_id.clone(),
            capacity: Some(self.capacity.into()),
            attributes: self.cfg.attributes.clone(),
            log_address: self.cfg.log_address.clone(),
            tasks: self.statuses.values().map(|(s, _)| s.clone()).collect(),
        }
    }

    async fn handle(&mut self, msg: CoreMsg, hb: &mut tokio::time::Interval) {
        match msg {
            CoreMsg::Report(r) => match *r {
                Report::Status(s) => {
                    self.statuses
                        .insert(s.task_id.clone(), (s.clone(), tokio::time::Instant::now()));
                    self.send(pb::agent_message::Msg::Status(s)).await;
                }
                Report::Done(id) => {
                    self.supervisors.remove(&id);
                    self.grace.remove(&id);
                    let at = tokio::time::Instant::now() + self.cfg.log_retention;
                    self.expiring.push_back((at, id));
                }
            },
            CoreMsg::Exit { id, status } => {
                if let Some(s) = self.supervisors.get(&id) {
                    let _ = s.send(Signal::Exited(status)).await;
                }
            }
            CoreMsg::Oom { id } => {
                if let Some(s) = self.supervisors.get(&id) {
                    let _ = s.send(Signal::Oom).await;
                }
            }
            CoreMsg::WantRegister(reply) => {
                let _ = reply.send(self.register().await);
            }
            CoreMsg::Connected { generation, out } => {
                self.session = Some((generation, out));
            }
            CoreMsg::Disconnected { generation } => {
                if self.session.as_ref().is_some_and(|(g, _)| *g == generation) {
                    self.session = None;
                }
            }
            CoreMsg::FromScheduler { generation, msg } => {
                if self.session.as_ref().is_none_or(|(g, _)| *g != generation) {
                    return;
                }
                self.on_scheduler_message(*msg, hb).await;
            }
        }
    }

    async fn on_scheduler_message(
        &mut self,
        msg: pb::scheduler_message::Msg,
        hb: &mut tokio::time::Interval,
    ) {
        match msg {
            pb::scheduler_message::Msg::Registered(r) => {
                let ms = r.heartbeat_interval_ms.clamp(100, 60_000);
                self.heartbeat = Duration::from_millis(ms);
                *hb = tokio::time::interval(self.heartbeat);
                // Statuses that changed while the Register was in flight.
                let all: Vec<pb::TaskStatus> =
                    self.statuses.values().map(|(s, _)| s.clone()).collect();
                for s in all {
                    self.send(pb::agent_message::Msg::Status(s)).await;
                }
            }
            pb::scheduler_message::Msg::Assign(a) => {
                let id = a.task_id.clone();
                if self.statuses.contains_key(&id) || self.supervisors.contains_key(&id) {
                    debug!(task_id = id, "Duplicate assignment ignored.");
                    return;
                }
                if !valid_task_id(&id) {
                    warn!(task_id = id, "Assignment with an invalid task id.");
                    let s = self.set_status(
                        &id,
                        TaskState::Finished(FinishReason::InvalidRequest),
                        "task id is not a valid container id",
                    );
                    self.send(pb::agent_message::Msg::Status(s)).await;
                    return;
                }
                let launched = self.set_status(&id, TaskState::Launched, "");
                let record = pb::AgentTaskRecord {
                    assignment: Some(a.clone()),
                    status: Some(launched),
                };
                if let Err(e) = self.ctx.store.put(record).await {
                    warn!(task_id = id, error = %e, "Cannot record an assignment; refusing it.");
                    let s = self.set_status(
                        &id,
                        TaskState::Finished(FinishReason::LocalSystemError),
                        format!("agent store: {e}"),
                    );
                    self.send(pb::agent_message::Msg::Status(s)).await;
                    return;
                }
                self.grace.insert(id.clone(), grace_of(&a));
                let (stx, srx) = mpsc::channel(16);
                self.supervisors.insert(id, stx);
                tokio::spawn(supervisor::run_new(self.ctx.clone(), a, srx));
            }
            pb::scheduler_message::Msg::Kill(k) => {
                let grace =
                    Duration::from_millis(k.grace_ms.min(berth_model::spec::MAX_KILL_GRACE_MS));
                if let Some(s) = self.supervisors.get(&k.task_id) {
                    let _ = s.send(Signal::Kill(grace)).await;
                } else if valid_task_id(&k.task_id) {
                    // Not supervised: a stray from before a restart, or already finished.
                    let rt = self.ctx.rt.clone();
                    let id = k.task_id.clone();
                    tokio::spawn(async move {
                        let _ = rt.kill(&id, 9).await;
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        let _ = rt.remove(&id).await;
                    });
                    if self
                        .statuses
                        .get(&k.task_id)
                        .is_none_or(|(s, _)| s.state != pb::TaskState::Finished as i32)
                    {
                        let s = self
                            .record_status(
                                &k.task_id,
                                TaskState::Finished(FinishReason::Killed),
                                "killed",
                            )
                            .await;
                        self.send(pb::agent_message::Msg::Status(s)).await;
                    }
                }
            }
        }
    }

    /// Removes the files of tasks finished longer ago than the retention period.
    async fn expire_task_dirs(&mut self) {
        let now = tokio::time::Instant::now();
        while self.expiring.front().is_some_and(|(at, _)| *at <= now) {
            let Some((_, id)) = self.expiring.pop_front() else {
                break;
            };
            if self.supervisors.contains_key(&id) {
                continue;
            }
            let dir = crate::logs::task_dir(&self.cfg.data_dir, &id);
            if let Err(e) = tokio::fs::remove_dir_all(&dir).await
                && e.kind() != std::io::ErrorKind::NotFound
            {
                warn!(task_id = id, error = %e, "Cannot remove a finished task's files.");
            }
        }
    }

    /// Queues the directories of tasks that finished before this start for expiry.
    async fn schedule_old_task_dirs(&mut self) {
        let Ok(mut entries) = tokio::fs::read_dir(self.cfg.data_dir.join("tasks")).await else {
            return;
        };
        let mut found = Vec::new();
        while let Ok(Some(e)) = entries.next_entry().await {
            let Some(id) = e.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if self.supervisors.contains_key(&id) {
                continue;
            }
            let age = tokio::fs::metadata(e.path().join("exit"))
                .await
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .unwrap_or_default();
            let left = self.cfg.log_retention.saturating_sub(age);
            found.push((tokio::time::Instant::now() + left, id));
        }
        found.sort();
        self.expiring.extend(found);
    }

    async fn send_heartbeat(&mut self) {
        self.prune_finished().await;
        self.expire_task_dirs().await;
        if self.session.is_none() {
            return;
        }
        let usage = self
            .supervisors
            .keys()
            .map(|id| pb::TaskUsage {
                task_id: id.clone(),
                usage: Some(usage::read(&self.ctx.cgroup(id))),
            })
            .collect();
        self.send(pb::agent_message::Msg::Heartbeat(pb::Heartbeat { usage }))
            .await;
    }
}

fn grace_of(a: &pb::TaskAssignment) -> Duration {
    Duration::from_millis(berth_model::spec::kill_grace_ms(a.container.as_ref()))
}

/// Keeps one stream open to the scheduler, reconnecting with exponential backoff and jitter.
async fn connector(scheduler: String, core: mpsc::Sender<CoreMsg>, cancel: CancellationToken) {
    let mut backoff = Duration::from_millis(200);
    let mut generation = 0u64;
    while !cancel.is_cancelled() {
        generation += 1;
        match session(&scheduler, &core, generation, &cancel).await {
            Ok(()) => backoff = Duration::from_millis(200),
            Err(e) => debug!(error = %e, "Cannot reach the scheduler."),
        }
        let _ = core.send(CoreMsg::Disconnected { generation }).await;
        let jitter = rand::rng().random_range(0..=backoff.as_millis() as u64 / 2);
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(backoff + Duration::from_millis(jitter)) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn session(
    scheduler: &str,
    core: &mpsc::Sender<CoreMsg>,
    generation: u64,
    cancel: &CancellationToken,
) -> Result<(), String> {
    let channel = tonic::transport::Endpoint::from_shared(scheduler.to_string())
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10))
        .connect()
        .await
        .map_err(|e| e.to_string())?;
    let (reg_tx, reg_rx) = oneshot::channel();
    core.send(CoreMsg::WantRegister(reg_tx))
        .await
        .map_err(|_| "agent stopping")?;
    let register = reg_rx.await.map_err(|_| "agent stopping")?;
    let (out_tx, out_rx) = mpsc::channel(4096);
    out_tx
        .send(pb::AgentMessage {
            msg: Some(pb::agent_message::Msg::Register(register)),
        })
        .await
        .map_err(|_| "stream closed")?;
    let mut inbound = pb::agent_service_client::AgentServiceClient::new(channel)
        .max_decoding_message_size(crate::MAX_MESSAGE_BYTES)
        .connect(ReceiverStream::new(out_rx))
        .await
        .map_err(|e| e.to_string())?
        .into_inner();
    core.send(CoreMsg::Connected {
        generation,
        out: out_tx,
    })
    .await
    .map_err(|_| "agent stopping")?;
    info!(scheduler, "Connected to the scheduler.");
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            m = inbound.message() => match m {
                Ok(Some(pb::SchedulerMessage { msg: Some(msg) })) => {
                    core.send(CoreMsg::FromScheduler { generation, msg: Box::new(msg) }).await.map_err(|_| "agent stopping")?;
                }
                Ok(Some(_)) => {}
                Ok(None) => return Err("scheduler closed the stream".into()),
                Err(e) => return Err(e.to_string()),
            },
        }
    }
}

/// Routes containerd's exit and OOM events for this namespace to the core.
async fn events_loop(rt: Containerd, core: mpsc::Sender<CoreMsg>, cancel: CancellationToken) {
    let ns = rt.namespace().to_string();
    while !cancel.is_cancelled() {
        let req = SubscribeRequest {
            filters: vec![
                format!("namespace=={ns},topic==\"/tasks/exit\""),
                format!("namespace=={ns},topic==\"/tasks/oom\""),
            ],
        };
        match rt.events().subscribe(req).await {
            Ok(stream) => {
                let mut stream = stream.into_inner();
                loop {
                    let env = tokio::select! {
                        _ = cancel.cancelled() => return,
                        e = stream.next() => e,
                    };
                    let Some(Ok(env)) = env else { break };
                    let Some(any) = env.event else { continue };
                    let msg = match env.topic.as_str() {
                        "/tasks/exit" => match TaskExit::decode(any.value.as_slice()) {
                            // Exits of exec'd processes carry another id.
                            Ok(e) if e.id == e.container_id => Some(CoreMsg::Exit {
                                id: e.container_id,
                                status: e.exit_status,
                            }),
                            _ => None,
                        },
                        "/tasks/oom" => TaskOom::decode(any.value.as_slice())
                            .ok()
                            .map(|e| CoreMsg::Oom { id: e.container_id }),
                        _ => None,
                    };
                    if let Some(m) = msg
                        && core.send(m).await.is_err()
                    {
                        return;
                    }
                }
            }
            Err(e) => {
                warn!(error = %e, "Cannot subscribe to containerd events; polling covers exits.")
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}
