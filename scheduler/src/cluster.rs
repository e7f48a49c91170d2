//! The cluster state actor: the one owner of jobs, tasks and nodes.
//!
//! gRPC handlers validate what they can, then send a [`Command`] and await the reply. The actor
//! applies the change, commits it to the store, and only then replies, notifies watchers and
//! sends orders to agents: nothing is acknowledged or acted on before it is durable.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use berth_model::constraint::Constraints;
use berth_model::now_unix_ms;
use berth_model::resources::Resources;
use berth_model::spec::{self, DEFAULT_KILL_GRACE_MS, Limits};
use berth_model::task::{Effect, FinishReason, TaskEvent, TaskState, step};
use berth_proto as pb;
use rand::Rng;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::error::SchedulerError;
use crate::placement::{Engine, NodeSpec, Request, Strategy};
use crate::preempt::{self, Candidate, NodeCandidates};
use crate::quota::{CapacityGroup, Groups, Tier};
use crate::store::{Store, Write};

/// Outbound buffer per agent; an agent this far behind is disconnected and must re-register.
pub(crate) const AGENT_QUEUE_LEN: usize = 4096;
/// Most commands handled before one scheduling pass and commit.
const BATCH: usize = 2048;

/// A reply held until the commit it depends on is done; gets the commit's error, if any.
type Deferred = Box<dyn FnOnce(Option<String>) + Send>;
const WATCH_QUEUE: usize = 8192;
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// Tunables of the cluster actor.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// How often agents send heartbeats.
    pub heartbeat_interval: Duration,
    /// Silence after which a node is lost.
    pub heartbeat_timeout: Duration,
    /// Node choice among those that fit.
    pub strategy: Strategy,
    /// Capacity groups (quotas and tiers); the default group is added if absent.
    pub groups: Vec<CapacityGroup>,
    /// Place by linear first-fit scan instead of the indexed engine: a reference for
    /// benchmarks, never for production.
    pub first_fit: bool,
    /// Limits every job spec is checked against.
    pub limits: Limits,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            heartbeat_interval: Duration::from_secs(2),
            heartbeat_timeout: Duration::from_secs(10),
            strategy: Strategy::Binpack,
            groups: Vec::new(),
            first_fit: false,
            limits: Limits::default(),
        }
    }
}

type Reply<T> = oneshot::Sender<Result<T, SchedulerError>>;

/// A request to the actor.
pub enum Command {
    /// Validate, store and schedule a job.
    CreateJob(Box<pb::JobSpec>, Reply<pb::Job>),
    /// A job and its tasks, by id or active name.
    GetJob(String, Reply<(pb::Job, Vec<pb::Task>)>),
    /// A page of jobs.
    ListJobs(pb::ListJobsRequest, Reply<pb::ListJobsResponse>),
    /// Kill every task of a job.
    KillJob(String, Reply<pb::Job>),
    /// Kill one task.
    KillTask(String, Reply<pb::Task>),
    /// Change a service job's desired count.
    UpdateCapacity(String, u32, Reply<pb::Job>),
    /// All jobs now, and every change from this point on.
    Watch(Reply<(Vec<pb::Job>, broadcast::Receiver<pb::WatchJobsResponse>)>),
    /// Tasks, optionally of one job and in some states.
    ListTasks(pb::ListTasksRequest, Reply<Vec<pb::Task>>),
    /// One task.
    GetTask(String, Reply<pb::Task>),
    /// Cordon or uncordon a node.
    CordonNode(String, bool, Reply<pb::Node>),
    /// All nodes.
    ListNodes(Reply<Vec<pb::Node>>),
    /// An agent opened its stream and registered.
    Register {
        /// What it said.
        register: pb::Register,
        /// Distinguishes this stream from the node's earlier ones.
        conn_id: u64,
        /// Where to send orders.
        tx: mpsc::Sender<pb::SchedulerMessage>,
        /// Ok once reconciled.
        reply: Reply<()>,
    },
    /// A message on an agent's stream after Register.
    FromAgent {
        /// The registered node.
        node_id: String,
        /// Its stream.
        conn_id: u64,
        /// The message.
        msg: pb::agent_message::Msg,
    },
    /// An agent's stream ended.
    Disconnected {
        /// The registered node.
        node_id: String,
        /// The stream that ended.
        conn_id: u64,
    },
}

/// A cheap, cloneable way to talk to the actor.
#[derive(Clone)]
pub struct ClusterHandle {
    tx: mpsc::Sender<Command>,
}

impl ClusterHandle {
    /// Sends a command built around a reply channel and waits for the answer.
    pub async fn call<T>(
        &self,
        make: impl FnOnce(Reply<T>) -> Command,
    ) -> Result<T, SchedulerError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(make(tx))
            .await
            .map_err(|_| SchedulerError::ShuttingDown)?;
        rx.await.map_err(|_| SchedulerError::ShuttingDown)?
    }

    /// Sends a command that has no reply.
    pub async fn tell(&self, cmd: Command) {
        // Only fails when the actor is gone, i.e. during shutdown.
        let _ = self.tx.send(cmd).await;
    }
}

struct AgentConn {
    id: u64,
    tx: mpsc::Sender<pb::SchedulerMessage>,
}

struct NodeEntry {
    info: pb::Node,
    conn: Option<AgentConn>,
    last_seen: Instant,
}

/// A job checked and built, waiting for its batch's commit.
struct Staged {
    job: pb::Job,
    tasks: Vec<pb::Task>,
}

struct Cluster {
    cfg: ClusterConfig,
    store: Store,
    jobs: BTreeMap<String, pb::Job>,
    tasks: HashMap<String, pb::Task>,
    job_tasks: HashMap<String, Vec<String>>,
    active_names: HashMap<String, String>,
    nodes: BTreeMap<String, NodeEntry>,
    /// Free capacity and each job's spread, indexed for placement.
    engine: Engine,
    /// Each job's parsed constraints.
    constraints: HashMap<String, Constraints>,
    /// Jobs whose tasks fit nowhere, with the engine epoch of that finding: not retried until
    /// the epoch moves.
    blocked: HashMap<String, (u64, String)>,
    /// Capacity groups and their usage.
    groups: Groups,
    /// Critical jobs waiting for the flex tasks preempted for them to end.
    preempting: HashMap<String, BTreeSet<String>>,
    /// The node each preempting job has reserved for itself.
    reservations: HashMap<String, String>,
    watch: broadcast::Sender<pb::WatchJobsResponse>,
    dirty_jobs: BTreeSet<String>,
    dirty_tasks: BTreeSet<String>,
    outbox: Vec<(String, pb::SchedulerMessage)>,
    /// Replies waiting for the next commit.
    replies: Vec<Deferred>,
    /// New jobs of this batch, not committed yet.
    staged: Vec<(Staged, Reply<pb::Job>)>,
    /// Accepted tasks by (job, index, attempt), the scheduling queue.
    pending: BTreeSet<(String, u32, u32, String)>,
    /// Whether anything since the last pass could let a task be placed.
    sched_dirty: bool,
    /// The engine epoch at the last pass.
    sched_epoch: u64,
    /// Jobs whose counts and state need recomputing before the next commit.
    stale_jobs: BTreeSet<String>,
    /// The tasks holding resources on each node.
    node_tasks: HashMap<String, BTreeSet<String>>,
}

/// Loads the store and starts the actor; it stops when `cancel` fires.
pub fn spawn(
    store: Store,
    cfg: ClusterConfig,
    cancel: CancellationToken,
) -> Result<(ClusterHandle, tokio::task::JoinHandle<()>), SchedulerError> {
    let snap = store.load()?;
    let (watch, _) = broadcast::channel(WATCH_QUEUE);
    let groups = Groups::new(&cfg.groups);
    let mut c = Cluster {
        cfg,
        store,
        jobs: BTreeMap::new(),
        tasks: HashMap::new(),
        job_tasks: HashMap::new(),
        active_names: HashMap::new(),
        nodes: BTreeMap::new(),
        engine: Engine::new(),
        constraints: HashMap::new(),
        blocked: HashMap::new(),
        groups,
        preempting: HashMap::new(),
        reservations: HashMap::new(),
        watch,
        dirty_jobs: BTreeSet::new(),
        dirty_tasks: BTreeSet::new(),
        outbox: Vec::new(),
        replies: Vec::new(),
        staged: Vec::new(),
        pending: BTreeSet::new(),
        sched_dirty: true,
        sched_epoch: 0,
        stale_jobs: BTreeSet::new(),
        node_tasks: HashMap::new(),
    };
    c.restore(snap);
    let (tx, mut rx) = mpsc::channel(1024);
    let join = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                cmd = rx.recv() => match cmd {
                    Some(cmd) => {
                        // Group commit: whatever else is queued joins this batch, then one
                        // scheduling pass and one store commit serve all of it.
                        c.handle(cmd);
                        for _ in 1..BATCH {
                            let Ok(cmd) = rx.try_recv() else { break };
                            c.handle(cmd);
                        }
                        c.settle();
                    }
                    None => break,
                },
                _ = tick.tick() => c.tick(),
            }
        }
        debug!("Cluster actor stopped.");
    });
    Ok((ClusterHandle { tx }, join))
}

/// A new task, Accepted now, not to be placed before `not_before` (Unix ms).
fn accepted_task(job_id: &str, index: u32, attempt: u32, not_before: i64) -> pb::Task {
    pb::Task {
        id: format!("{job_id}-{index}-{attempt}"),
        job_id: job_id.to_string(),
        index,
        attempt,
        state: pb::TaskState::Accepted as i32,
        history: vec![pb::TaskTransition {
            state: pb::TaskState::Accepted as i32,
            at_unix_ms: now_unix_ms(),
            ..Default::default()
        }],
        not_before_unix_ms: not_before,
        ..Default::default()
    }
}

/// The capacity group a job's tasks count against.
fn group_of(job: &pb::Job) -> &str {
    Groups::resolve(job.spec.as_ref().map_or("", |s| s.capacity_group.as_str()))
}

fn job_type(job: &pb::Job) -> pb::JobType {
    job.spec
        .as_ref()
        .and_then(|s| pb::JobType::try_from(s.r#type).ok())
        .unwrap_or(pb::JobType::Unspecified)
}

fn task_resources(job: &pb::Job) -> Resources {
    job.spec
        .as_ref()
        .and_then(|s| s.container.as_ref())
        .and_then(|c| c.resources.as_ref())
        .map(Resources::from)
        .unwrap_or_default()
}

fn state_of(t: &pb::Task) -> Option<TaskState> {
    TaskState::from_proto(t.state, t.reason, t.exit_code)
}

fn is_live(t: &pb::Task) -> bool {
    state_of(t).is_some_and(|s| !s.is_finished())
}

fn job_is_active(job: &pb::Job) -> bool {
    matches!(
        pb::JobState::try_from(job.state),
        Ok(pb::JobState::Active | pb::JobState::KillInitiated)
    )
}

fn valid_node_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl Cluster {
    fn restore(&mut self, snap: crate::store::Snapshot) {
        for node_id in snap.cordoned {
            // Known by its cordon until its agent registers.
            self.nodes.insert(
                node_id.clone(),
                NodeEntry {
                    info: pb::Node {
                        id: node_id,
                        state: pb::NodeState::Ready as i32,
                        cordoned: true,
                        ..Default::default()
                    },
                    conn: None,
                    last_seen: Instant::now(),
                },
            );
        }
        for job in snap.jobs {
            if job_is_active(&job)
                && let Some(spec) = &job.spec
            {
                self.active_names.insert(spec.name.clone(), job.id.clone());
            }
            self.jobs.insert(job.id.clone(), job);
        }
        let now = Instant::now();
        let mut tasks = snap.tasks;
        tasks.sort_by_key(|t| (t.index, t.attempt));
        for t in tasks {
            if state_of(&t).is_some_and(|s| s.is_on_node()) {
                // Until the agent reconnects, its node is known only by the tasks on it; if it
                // stays silent for the heartbeat timeout, those tasks are lost.
                let res = self
                    .jobs
                    .get(&t.job_id)
                    .map(task_resources)
                    .unwrap_or_default();
                self.nodes
                    .entry(t.node_id.clone())
                    .or_insert_with(|| NodeEntry {
                        info: pb::Node {
                            id: t.node_id.clone(),
                            state: pb::NodeState::Ready as i32,
                            ..Default::default()
                        },
                        conn: None,
                        last_seen: now,
                    });
                self.engine.allocate(&t.node_id, &t.job_id, &res);
                self.node_tasks
                    .entry(t.node_id.clone())
                    .or_default()
                    .insert(t.id.clone());
                if let Some(job) = self.jobs.get(&t.job_id) {
                    self.groups.add(group_of(job), &res);
                }
                if !t.preempted_for.is_empty() {
                    self.preempting
                        .entry(t.preempted_for.clone())
                        .or_default()
                        .insert(t.id.clone());
                }
            }
            self.job_tasks
                .entry(t.job_id.clone())
                .or_default()
                .push(t.id.clone());
            if t.state == pb::TaskState::Accepted as i32 {
                self.pending
                    .insert((t.job_id.clone(), t.index, t.attempt, t.id.clone()));
            }
            self.tasks.insert(t.id.clone(), t);
        }
        info!(
            jobs = self.jobs.len(),
            tasks = self.tasks.len(),
            nodes = self.nodes.len(),
            "Restored cluster state."
        );
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::CreateJob(spec, reply) => match self.stage_job(*spec) {
                Ok(staged) => self.staged.push((staged, reply)),
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            Command::GetJob(id, reply) => {
                let r = self.find_job(&id).map(|job| {
                    let tasks = self.tasks_of(&job.id);
                    (job.clone(), tasks)
                });
                let _ = reply.send(r);
            }
            Command::ListJobs(req, reply) => {
                let _ = reply.send(self.list_jobs(&req));
            }
            Command::KillJob(id, reply) => {
                let r = self.kill_job(&id);
                self.finish(reply, r);
            }
            Command::KillTask(id, reply) => {
                let r = self.kill_task(&id);
                self.finish(reply, r);
            }
            Command::UpdateCapacity(id, n, reply) => {
                let r = self.update_capacity(&id, n);
                self.finish(reply, r);
            }
            Command::Watch(reply) => {
                let rx = self.watch.subscribe();
                let _ = reply.send(Ok((self.jobs.values().cloned().collect(), rx)));
            }
            Command::ListTasks(req, reply) => {
                let mut tasks: Vec<pb::Task> = if req.job_id.is_empty() {
                    self.tasks.values().cloned().collect()
                } else {
                    match self.find_job(&req.job_id) {
                        Ok(job) => self.tasks_of(&job.id.clone()),
                        Err(e) => {
                            let _ = reply.send(Err(e));
                            return;
                        }
                    }
                };
                if !req.states.is_empty() {
                    tasks.retain(|t| req.states.contains(&t.state));
                }
                tasks.sort_by(|a, b| {
                    (&a.job_id, a.index, a.attempt).cmp(&(&b.job_id, b.index, b.attempt))
                });
                let _ = reply.send(Ok(tasks));
            }
            Command::GetTask(id, reply) => {
                let r = self
                    .tasks
                    .get(&id)
                    .cloned()
                    .ok_or(SchedulerError::NotFound { kind: "task", id });
                let _ = reply.send(r);
            }
            Command::CordonNode(node_id, cordon, reply) => {
                let r = self.cordon(&node_id, cordon);
                self.finish(reply, r);
            }
            Command::ListNodes(reply) => {
                let nodes = self
                    .nodes
                    .values()
                    .map(|n| {
                        let mut info = n.info.clone();
                        let (allocated, tasks) = self.engine.usage(&n.info.id).unwrap_or_default();
                        info.allocated = Some(allocated.into());
                        info.tasks = tasks;
                        info
                    })
                    .collect();
                let _ = reply.send(Ok(nodes));
            }
            Command::Register {
                register,
                conn_id,
                tx,
                reply,
            } => {
                let r = self.register(register, conn_id, tx);
                self.finish(reply, r);
            }
            Command::FromAgent {
                node_id,
                conn_id,
                msg,
            } => {
                self.on_agent_message(&node_id, conn_id, msg);
            }
            Command::Disconnected { node_id, conn_id } => {
                if let Some(n) = self.nodes.get_mut(&node_id)
                    && n.conn.as_ref().is_some_and(|c| c.id == conn_id)
                {
                    info!(
                        node_id,
                        "Agent disconnected; its tasks are kept until the heartbeat timeout."
                    );
                    n.conn = None;
                    self.engine.set_schedulable(&node_id, false);
                }
            }
        }
    }

    /// Replies once the batch is scheduled and committed: the caller hears back only about
    /// durable state.
    fn finish<T: Send + 'static>(&mut self, reply: Reply<T>, r: Result<T, SchedulerError>) {
        self.replies.push(Box::new(move |err| {
            let _ = reply.send(match err {
                Some(e) => Err(SchedulerError::CommitFailed(e)),
                None => r,
            });
        }));
    }

    /// Ends a batch: one scheduling pass if anything could have changed, one commit, then the
    /// replies that waited for it.
    fn settle(&mut self) {
        self.commit_staged();
        if self.sched_dirty || self.engine.epoch() != self.sched_epoch {
            self.schedule();
        }
        let err = self.flush().err().map(|e| e.to_string());
        for reply in std::mem::take(&mut self.replies) {
            reply(err.clone());
        }
    }

    fn tick(&mut self) {
        let now = Instant::now();
        let timeout = self.cfg.heartbeat_timeout;
        let lost: Vec<String> = self
            .nodes
            .values()
            .filter(|n| {
                n.info.state != pb::NodeState::Lost as i32
                    && now.duration_since(n.last_seen) > timeout
            })
            .map(|n| n.info.id.clone())
            .collect();
        for node_id in lost {
            self.node_lost(&node_id);
        }
        let jobs = &self.jobs;
        self.constraints
            .retain(|id, _| jobs.get(id).is_some_and(job_is_active));
        // Retry backoffs end with time, not with events.
        self.sched_dirty = true;
        self.schedule();
        let _ = self.flush();
    }

    fn node_lost(&mut self, node_id: &str) {
        warn!(node_id, "Node missed heartbeats; its tasks are lost.");
        if let Some(n) = self.nodes.get_mut(node_id) {
            n.info.state = pb::NodeState::Lost as i32;
            n.conn = None;
        }
        self.engine.set_schedulable(node_id, false);
        let ids: Vec<String> = self
            .node_tasks
            .get(node_id)
            .into_iter()
            .flatten()
            .cloned()
            .collect();
        for id in ids {
            let _ = self.transition(&id, TaskEvent::NodeLost, "node stopped sending heartbeats");
        }
    }

    /// Commits dirty records, then tells watchers and agents.
    fn flush(&mut self) -> Result<(), SchedulerError> {
        for job_id in std::mem::take(&mut self.stale_jobs) {
            self.refresh_job(&job_id);
        }
        if self.dirty_jobs.is_empty() && self.dirty_tasks.is_empty() && self.outbox.is_empty() {
            return Ok(());
        }
        // Encoded straight from memory: no copy of a batch's records is made unless someone
        // watches.
        let tasks: Vec<&pb::Task> = self
            .dirty_tasks
            .iter()
            .filter_map(|id| self.tasks.get(id))
            .collect();
        let jobs: Vec<&pb::Job> = self
            .dirty_jobs
            .iter()
            .filter_map(|id| self.jobs.get(id))
            .collect();
        if let Err(e) = self.store.commit_records(&jobs, &tasks) {
            // Memory is ahead of the store; the changes stay dirty and are retried on the next
            // flush. Orders to agents wait too, so nothing acts on unstored state.
            error!(error = %e, "Cannot commit cluster state; will retry.");
            return Err(e.into());
        }
        if self.watch.receiver_count() > 0 {
            let writes = tasks
                .iter()
                .map(|t| Write::Task(Box::new((*t).clone())))
                .chain(jobs.iter().map(|j| Write::Job(Box::new((*j).clone()))))
                .collect();
            self.announce(writes);
        }
        self.dirty_jobs.clear();
        self.dirty_tasks.clear();
        for (node_id, msg) in std::mem::take(&mut self.outbox) {
            let Some(n) = self.nodes.get_mut(&node_id) else {
                continue;
            };
            let Some(conn) = &n.conn else {
                debug!(node_id, "Agent not connected; it reconciles on reconnect.");
                continue;
            };
            if conn.tx.try_send(msg).is_err() {
                warn!(
                    node_id,
                    "Agent stream is full or closed; dropping it so the agent re-registers."
                );
                n.conn = None;
            }
        }
        Ok(())
    }

    /// Tells watchers about records that were just committed.
    fn announce(&self, writes: Vec<Write>) {
        if self.watch.receiver_count() == 0 {
            return;
        }
        for w in writes {
            let ev = match w {
                Write::Job(j) => pb::watch_jobs_response::Event::Job(*j),
                Write::Task(t) => pb::watch_jobs_response::Event::Task(*t),
                Write::Cordon(..) => continue,
            };
            let _ = self.watch.send(pb::WatchJobsResponse { event: Some(ev) });
        }
    }

    fn find_job(&self, id: &str) -> Result<&pb::Job, SchedulerError> {
        // An id, else the active job of that name, else the newest finished one (ids sort by time).
        self.jobs
            .get(id)
            .or_else(|| self.active_names.get(id).and_then(|jid| self.jobs.get(jid)))
            .or_else(|| {
                self.jobs
                    .values()
                    .rev()
                    .find(|j| j.spec.as_ref().is_some_and(|s| s.name == id))
            })
            .ok_or_else(|| SchedulerError::NotFound {
                kind: "job",
                id: id.to_string(),
            })
    }

    fn tasks_of(&self, job_id: &str) -> Vec<pb::Task> {
        self.job_tasks
            .get(job_id)
            .map(|ids| {
                ids.iter()
                    .filter_map(|id| self.tasks.get(id).cloned())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn new_task(&mut self, job_id: &str, index: u32, attempt: u32, not_before: i64) -> String {
        let t = accepted_task(job_id, index, attempt, not_before);
        let id = t.id.clone();
        self.pending
            .insert((job_id.to_string(), index, attempt, id.clone()));
        self.sched_dirty = true;
        self.job_tasks
            .entry(job_id.to_string())
            .or_default()
            .push(id.clone());
        self.tasks.insert(id.clone(), t);
        self.dirty_tasks.insert(id.clone());
        id
    }

    /// Checks a new job and builds its records; they are committed with the rest of the batch
    /// in [`Cluster::commit_staged`] before anything else sees them.
    fn stage_job(&mut self, spec: pb::JobSpec) -> Result<Staged, SchedulerError> {
        spec::validate(&spec, &self.cfg.limits)?;
        if !self.groups.exists(&spec.capacity_group) {
            return Err(SchedulerError::BadField {
                field: "capacity_group",
                reason: format!(
                    "no capacity group named {} (known: {})",
                    spec.capacity_group,
                    self.groups.names().join(", ")
                ),
            });
        }
        if self.active_names.contains_key(&spec.name)
            || self
                .staged
                .iter()
                .any(|(s, _)| s.job.spec.as_ref().is_some_and(|x| x.name == spec.name))
        {
            return Err(SchedulerError::NameTaken(spec.name));
        }
        let now = now_unix_ms();
        let job = pb::Job {
            id: uuid::Uuid::now_v7().to_string(),
            state: pb::JobState::Active as i32,
            created_unix_ms: now,
            updated_unix_ms: now,
            spec: Some(spec),
            counts: None,
            ..Default::default()
        };
        let n = job.spec.as_ref().map_or(0, |s| s.tasks);
        let tasks: Vec<pb::Task> = (0..n).map(|i| accepted_task(&job.id, i, 0, 0)).collect();
        Ok(Staged { job, tasks })
    }

    /// Commits the batch's new jobs in one transaction, then lets them into memory and answers
    /// their callers; a failed commit leaves no trace of any of them.
    fn commit_staged(&mut self) {
        if self.staged.is_empty() {
            return;
        }
        let staged = std::mem::take(&mut self.staged);
        let mut writes = Vec::new();
        for (s, _) in &staged {
            writes.push(Write::Job(Box::new(s.job.clone())));
            writes.extend(s.tasks.iter().cloned().map(|t| Write::Task(Box::new(t))));
        }
        if let Err(e) = self.store.commit(&writes) {
            error!(error = %e, jobs = staged.len(), "Cannot commit new jobs; none was accepted.");
            for (_, reply) in staged {
                let _ = reply.send(Err(SchedulerError::CommitFailed(e.to_string())));
            }
            return;
        }
        self.announce(writes);
        for (Staged { job, tasks }, reply) in staged {
            let name = job
                .spec
                .as_ref()
                .map(|s| s.name.clone())
                .unwrap_or_default();
            self.active_names.insert(name.clone(), job.id.clone());
            let ids = self.job_tasks.entry(job.id.clone()).or_default();
            let n = tasks.len();
            for t in tasks {
                ids.push(t.id.clone());
                self.pending
                    .insert((t.job_id.clone(), t.index, t.attempt, t.id.clone()));
                self.tasks.insert(t.id.clone(), t);
            }
            self.sched_dirty = true;
            self.jobs.insert(job.id.clone(), job.clone());
            self.refresh_job(&job.id);
            info!(job_id = %job.id, name, tasks = n, "Job accepted.");
            let job = self.jobs.get(&job.id).cloned().unwrap_or(job);
            // Committed: the reply does not wait for the rest of the batch.
            let _ = reply.send(Ok(job));
        }
    }

    fn list_jobs(&self, req: &pb::ListJobsRequest) -> Result<pb::ListJobsResponse, SchedulerError> {
        let size = match req.page_size {
            0 => 100,
            n if n > 1000 => {
                return Err(SchedulerError::BadField {
                    field: "page_size",
                    reason: "at most 1000".into(),
                });
            }
            n => n as usize,
        };
        let mut jobs = Vec::new();
        let mut next_cursor = String::new();
        let start = if req.cursor.is_empty() {
            std::ops::Bound::Unbounded
        } else {
            std::ops::Bound::Excluded(req.cursor.clone())
        };
        for job in self
            .jobs
            .range((start, std::ops::Bound::Unbounded))
            .map(|(_, j)| j)
        {
            if !req.states.is_empty() && !req.states.contains(&job.state) {
                continue;
            }
            let labels = job.spec.as_ref().map(|s| &s.labels);
            if !req
                .labels
                .iter()
                .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
            {
                continue;
            }
            if jobs.len() == size {
                next_cursor = jobs
                    .last()
                    .map(|j: &pb::Job| j.id.clone())
                    .unwrap_or_default();
                break;
            }
            jobs.push(job.clone());
        }
        Ok(pb::ListJobsResponse { jobs, next_cursor })
    }

    fn kill_job(&mut self, id: &str) -> Result<pb::Job, SchedulerError> {
        let job_id = self.find_job(id)?.id.clone();
        let job = self
            .jobs
            .get_mut(&job_id)
            .ok_or(SchedulerError::ShuttingDown)?;
        if job.state != pb::JobState::Active as i32 {
            return Ok(job.clone());
        }
        job.state = pb::JobState::KillInitiated as i32;
        job.message = "killed on request".into();
        self.dirty_jobs.insert(job_id.clone());
        let live: Vec<String> = self
            .tasks_of(&job_id)
            .into_iter()
            .filter(is_live)
            .map(|t| t.id)
            .collect();
        for t in live {
            let _ = self.transition(&t, TaskEvent::KillRequested, "job killed");
        }
        self.refresh_job(&job_id);
        info!(job_id, "Job kill initiated.");
        self.jobs
            .get(&job_id)
            .cloned()
            .ok_or(SchedulerError::ShuttingDown)
    }

    fn kill_task(&mut self, id: &str) -> Result<pb::Task, SchedulerError> {
        let t = self.tasks.get(id).ok_or_else(|| SchedulerError::NotFound {
            kind: "task",
            id: id.to_string(),
        })?;
        match state_of(t) {
            Some(TaskState::KillInitiated) => {}
            Some(TaskState::Finished(r)) => {
                return Err(SchedulerError::Precondition(format!(
                    "task {id} already finished ({r})"
                )));
            }
            _ => {
                self.transition(id, TaskEvent::KillRequested, "killed on request")
                    .map_err(|e| SchedulerError::Precondition(e.to_string()))?;
            }
        }
        self.tasks
            .get(id)
            .cloned()
            .ok_or(SchedulerError::ShuttingDown)
    }

    fn update_capacity(&mut self, id: &str, n: u32) -> Result<pb::Job, SchedulerError> {
        let job = self.find_job(id)?.clone();
        if job_type(&job) != pb::JobType::Service {
            return Err(SchedulerError::Precondition(
                "only service jobs have a capacity".into(),
            ));
        }
        if job.state != pb::JobState::Active as i32 {
            return Err(SchedulerError::Precondition(format!(
                "job {} is not active",
                job.id
            )));
        }
        if n > self.cfg.limits.max_tasks {
            return Err(SchedulerError::BadField {
                field: "tasks",
                reason: format!("at most {}", self.cfg.limits.max_tasks),
            });
        }
        if let Some(j) = self.jobs.get_mut(&job.id)
            && let Some(spec) = j.spec.as_mut()
        {
            spec.tasks = n;
        }
        self.dirty_jobs.insert(job.id.clone());
        let mut live: Vec<pb::Task> = self.tasks_of(&job.id).into_iter().filter(is_live).collect();
        live.sort_by_key(|t| t.index);
        if live.len() > n as usize {
            for t in &live[n as usize..] {
                let _ = self.transition(&t.id, TaskEvent::KillRequested, "scaled down");
            }
        } else {
            let used: BTreeSet<u32> = live.iter().map(|t| t.index).collect();
            let mut next = 0;
            for _ in live.len()..n as usize {
                while used.contains(&next) {
                    next += 1;
                }
                let attempt = self
                    .tasks_of(&job.id)
                    .iter()
                    .filter(|t| t.index == next)
                    .map(|t| t.attempt + 1)
                    .max()
                    .unwrap_or(0);
                self.new_task(&job.id, next, attempt, 0);
                next += 1;
            }
        }
        self.refresh_job(&job.id);
        self.jobs
            .get(&job.id)
            .cloned()
            .ok_or(SchedulerError::ShuttingDown)
    }

    /// Applies one event to one task and runs the resulting effects.
    fn transition(
        &mut self,
        task_id: &str,
        event: TaskEvent,
        message: &str,
    ) -> Result<TaskState, berth_model::task::TransitionError> {
        let Some(t) = self.tasks.get_mut(task_id) else {
            return Err(berth_model::task::TransitionError {
                from: TaskState::Accepted,
                event,
            });
        };
        let from = state_of(t).unwrap_or(TaskState::Accepted);
        let (mut next, effects) = step(from, event)?;
        if from == TaskState::Accepted {
            self.pending
                .remove(&(t.job_id.clone(), t.index, t.attempt, t.id.clone()));
        }
        self.stale_jobs.insert(t.job_id.clone());
        if next == TaskState::Finished(FinishReason::Killed) && !t.preempted_for.is_empty() {
            next = TaskState::Finished(FinishReason::Preempted);
        }
        if next.is_finished()
            && !t.preempted_for.is_empty()
            && let Some(victims) = self.preempting.get_mut(&t.preempted_for)
        {
            victims.remove(&t.id);
            if victims.is_empty() {
                self.preempting.remove(&t.preempted_for);
            }
        }
        let (st, reason, code) = next.to_proto();
        t.state = st as i32;
        t.reason = reason as i32;
        t.exit_code = code;
        if !message.is_empty() {
            t.message = message.to_string();
        }
        if next != TaskState::Accepted {
            t.pending_reason.clear();
        }
        t.history.push(pb::TaskTransition {
            state: st as i32,
            reason: reason as i32,
            at_unix_ms: now_unix_ms(),
            message: message.to_string(),
        });
        let t = t.clone();
        self.dirty_tasks.insert(t.id.clone());
        debug!(task_id, %from, to = %next, "Task transition.");
        let job = self.jobs.get(&t.job_id);
        for e in effects {
            match e {
                Effect::SendAssignment => {
                    let Some(spec) = job.and_then(|j| j.spec.as_ref()) else {
                        continue;
                    };
                    let msg = pb::scheduler_message::Msg::Assign(pb::TaskAssignment {
                        task_id: t.id.clone(),
                        job_id: t.job_id.clone(),
                        index: t.index,
                        attempt: t.attempt,
                        container: spec.container.clone(),
                        runtime_limit_ms: spec.runtime_limit_ms,
                    });
                    self.outbox
                        .push((t.node_id.clone(), pb::SchedulerMessage { msg: Some(msg) }));
                }
                Effect::SendKill => {
                    let grace = spec::kill_grace_ms(
                        job.and_then(|j| j.spec.as_ref())
                            .and_then(|s| s.container.as_ref()),
                    );
                    let msg = pb::scheduler_message::Msg::Kill(pb::KillOrder {
                        task_id: t.id.clone(),
                        grace_ms: grace,
                    });
                    self.outbox
                        .push((t.node_id.clone(), pb::SchedulerMessage { msg: Some(msg) }));
                }
                Effect::ReleaseResources => {
                    let res = job.map(task_resources).unwrap_or_default();
                    self.engine.release(&t.node_id, &t.job_id, &res);
                    if let Some(set) = self.node_tasks.get_mut(&t.node_id) {
                        set.remove(&t.id);
                    }
                    if let Some(job) = job {
                        self.groups.sub(group_of(job), &res);
                    }
                }
            }
        }
        if let TaskState::Finished(reason) = next {
            info!(task_id, job_id = %t.job_id, %reason, "Task finished.");
            self.on_task_finished(&t, reason);
        }
        Ok(next)
    }

    fn backoff_ms(&self, job: &pb::Job, attempt: u32) -> i64 {
        let base = job
            .spec
            .as_ref()
            .and_then(|s| s.retry.as_ref())
            .map(|r| r.backoff_ms)
            .filter(|&b| b > 0)
            .unwrap_or(1000);
        let exp = base.saturating_mul(1u64 << attempt.min(16));
        let capped = exp.min(MAX_BACKOFF.as_millis() as u64);
        // Up to 20% jitter so that tasks failing together do not retry together.
        let jitter = rand::rng().random_range(0..=capped / 5);
        i64::try_from(capped + jitter).unwrap_or(i64::MAX)
    }

    fn on_task_finished(&mut self, t: &pb::Task, reason: FinishReason) {
        let Some(job) = self.jobs.get(&t.job_id).cloned() else {
            return;
        };
        let active = job.state == pb::JobState::Active as i32;
        match job_type(&job) {
            pb::JobType::Batch => {
                let max = job
                    .spec
                    .as_ref()
                    .and_then(|s| s.retry.as_ref())
                    .map_or(0, |r| r.max_retries);
                let retryable = !reason.is_success() && reason != FinishReason::Killed;
                if active && reason == FinishReason::Preempted {
                    // Requeued at once, without using up a retry.
                    let id = self.new_task(&job.id, t.index, t.attempt + 1, now_unix_ms());
                    if let Some(n) = self.tasks.get_mut(&id) {
                        n.preemptions = t.preemptions + 1;
                    }
                } else if active && retryable && t.attempt.saturating_sub(t.preemptions) < max {
                    let at = now_unix_ms() + self.backoff_ms(&job, t.attempt);
                    let id = self.new_task(&job.id, t.index, t.attempt + 1, at);
                    if let Some(n) = self.tasks.get_mut(&id) {
                        n.preemptions = t.preemptions;
                    }
                }
            }
            pb::JobType::Service => {
                let desired = job.spec.as_ref().map_or(0, |s| s.tasks) as usize;
                let live = self.tasks_of(&job.id).iter().filter(|x| is_live(x)).count();
                if active && live < desired {
                    let delay = match reason {
                        FinishReason::Lost
                        | FinishReason::Killed
                        | FinishReason::Normal
                        | FinishReason::Preempted => 0,
                        _ => self.backoff_ms(&job, t.attempt),
                    };
                    self.new_task(&job.id, t.index, t.attempt + 1, now_unix_ms() + delay);
                }
            }
            pb::JobType::Unspecified => {}
        }
        self.refresh_job(&job.id);
    }

    /// Recomputes a job's counts and, when all its work is done, its final state.
    fn refresh_job(&mut self, job_id: &str) {
        let tasks: Vec<&pb::Task> = self
            .job_tasks
            .get(job_id)
            .map(|ids| ids.iter().filter_map(|id| self.tasks.get(id)).collect())
            .unwrap_or_default();
        let Some(job) = self.jobs.get_mut(job_id) else {
            return;
        };
        let mut counts = pb::TaskCounts::default();
        for t in &tasks {
            match state_of(t) {
                Some(TaskState::Accepted) => counts.accepted += 1,
                Some(TaskState::Launched) => counts.launched += 1,
                Some(TaskState::StartInitiated) => counts.start_initiated += 1,
                Some(TaskState::Started) => counts.started += 1,
                Some(TaskState::KillInitiated) => counts.kill_initiated += 1,
                Some(TaskState::Finished(r)) => {
                    counts.finished += 1;
                    if r.is_success() {
                        counts.succeeded += 1;
                    } else {
                        counts.failed += 1;
                    }
                }
                None => {}
            }
        }
        let live = tasks.iter().any(|t| is_live(t));
        let old_state = job.state;
        if job.state == pb::JobState::KillInitiated as i32 && !live {
            job.state = pb::JobState::Killed as i32;
        } else if job.state == pb::JobState::Active as i32
            && !live
            && job
                .spec
                .as_ref()
                .is_some_and(|s| s.r#type == pb::JobType::Batch as i32)
        {
            // Every index's latest attempt is final (a retry would be live or pending).
            let mut latest: BTreeMap<u32, &pb::Task> = BTreeMap::new();
            for t in tasks.iter().copied() {
                if latest.get(&t.index).is_none_or(|l| l.attempt < t.attempt) {
                    latest.insert(t.index, t);
                }
            }
            let failed: Vec<&&pb::Task> = latest
                .values()
                .filter(|t| !matches!(state_of(t), Some(TaskState::Finished(FinishReason::Normal))))
                .collect();
            if failed.is_empty() {
                job.state = pb::JobState::Succeeded as i32;
                job.message = format!("all {} tasks succeeded", latest.len());
            } else {
                job.state = pb::JobState::Failed as i32;
                let first = failed[0];
                let why = state_of(first).map(|s| s.to_string()).unwrap_or_default();
                job.message = format!(
                    "{} of {} tasks failed; task {} (index {}, {} attempts): {why}",
                    failed.len(),
                    latest.len(),
                    first.id,
                    first.index,
                    first.attempt + 1
                );
            }
        }
        if job.counts.as_ref() != Some(&counts) || job.state != old_state {
            job.counts = Some(counts);
            job.updated_unix_ms = now_unix_ms();
            self.dirty_jobs.insert(job_id.to_string());
        }
        if job.state != old_state && !job_is_active(job) {
            if let Some(spec) = &job.spec
                && self
                    .active_names
                    .get(&spec.name)
                    .is_some_and(|id| id == job_id)
            {
                self.active_names.remove(&spec.name);
            }
            info!(job_id, state = ?pb::JobState::try_from(job.state), message = %job.message, "Job finished.");
        }
    }

    /// Places every pending task whose backoff has passed, one job at a time so that a job's
    /// tasks are placed in one pass. Critical capacity groups go first; among groups of a tier
    /// the one with the smallest dominant share goes next (DRF); within a group, jobs go in
    /// submission order.
    fn schedule(&mut self) {
        self.sched_dirty = false;
        self.sched_epoch = self.engine.epoch();
        let now = now_unix_ms();
        let mut pending: Vec<(String, u32, u32, String)> = self
            .pending
            .iter()
            .filter(|p| {
                self.tasks
                    .get(&p.3)
                    .is_some_and(|t| t.not_before_unix_ms <= now)
            })
            .cloned()
            .collect();
        if pending.is_empty() {
            self.blocked.clear();
            let done: Vec<String> = self.reservations.keys().cloned().collect();
            for j in done {
                self.end_reservation(&j);
            }
            return;
        }
        pending.sort();
        let is_pending = |j: &String| pending.binary_search_by(|p| p.0.as_str().cmp(j)).is_ok();
        self.blocked.retain(|j, _| is_pending(j));
        let done: Vec<String> = self
            .reservations
            .keys()
            .filter(|j| !is_pending(j))
            .cloned()
            .collect();
        for j in done {
            self.end_reservation(&j);
        }
        let mut queues: BTreeMap<String, std::collections::VecDeque<(String, Vec<String>)>> =
            BTreeMap::new();
        for group in pending.chunk_by(|a, b| a.0 == b.0) {
            let job_id = group[0].0.clone();
            let Some(job) = self.jobs.get(&job_id) else {
                continue;
            };
            let ids = group.iter().map(|p| p.3.clone()).collect();
            queues
                .entry(group_of(job).to_string())
                .or_default()
                .push_back((job_id, ids));
        }
        let total = self.engine.total_capacity();
        loop {
            let next = queues
                .keys()
                .map(|g| {
                    (
                        self.groups.tier(g),
                        self.groups.dominant_share(g, &total),
                        g.clone(),
                    )
                })
                .min_by(|a, b| {
                    (a.0, a.1)
                        .partial_cmp(&(b.0, b.1))
                        .unwrap_or(std::cmp::Ordering::Equal)
                        .then_with(|| a.2.cmp(&b.2))
                });
            let Some((_, _, group)) = next else { break };
            let Some(queue) = queues.get_mut(&group) else {
                break;
            };
            let Some((job_id, task_ids)) = queue.pop_front() else {
                queues.remove(&group);
                continue;
            };
            // Alone, a group places whole jobs; competing, one task per turn, so that shares
            // stay even.
            let limit = if queues.len() == 1 { task_ids.len() } else { 1 };
            // Placements mark their jobs stale; `flush` recounts each once.
            let placed = self.place_tasks(&job_id, &task_ids, limit);
            let Some(queue) = queues.get_mut(&group) else {
                break;
            };
            if placed == limit && placed < task_ids.len() {
                queue.push_front((job_id, task_ids[placed..].to_vec()));
            }
            if queue.is_empty() {
                queues.remove(&group);
            }
        }
    }

    /// Places up to `limit` of one job's pending tasks within its group's quota; when one
    /// does not fit, sets every unplaced task's pending reason and, for a critical job,
    /// preempts flex tasks. Returns how many were placed.
    fn place_tasks(&mut self, job_id: &str, task_ids: &[String], limit: usize) -> usize {
        if let Some((epoch, reason)) = self.blocked.get(job_id)
            && *epoch == self.engine.epoch()
        {
            // Nothing freed since: the same answer, also for tasks added meanwhile.
            let reason = reason.clone();
            self.set_pending_reason(task_ids, &reason);
            return 0;
        }
        let Some(job) = self.jobs.get(job_id) else {
            return 0;
        };
        let req = task_resources(job);
        let spec = job.spec.as_ref();
        let strategy = spec
            .and_then(|s| Strategy::parse(&s.strategy))
            .unwrap_or(self.cfg.strategy);
        let group = group_of(job).to_string();
        if !self.constraints.contains_key(job_id) {
            let parsed = spec
                .and_then(|s| s.constraints.as_ref())
                .and_then(|c| Constraints::parse(c).ok())
                .unwrap_or_default();
            self.constraints.insert(job_id.to_string(), parsed);
        }
        let Some(constraints) = self.constraints.get(job_id) else {
            return 0;
        };
        let (allowed, over_quota) = self.groups.room(&group, &req, limit.min(task_ids.len()));
        let request = Request {
            job_id,
            resources: &req,
            constraints,
            strategy,
        };
        let (nodes, no_room) = if allowed == 0 {
            (Vec::new(), None)
        } else if self.cfg.first_fit {
            let mut placed = Vec::new();
            let mut why = None;
            for _ in 0..allowed {
                match crate::placement::first_fit(&mut self.engine, &request) {
                    Some(node) => placed.push(node),
                    None => {
                        why = Some(self.engine.explain(&request));
                        break;
                    }
                }
            }
            (placed, why)
        } else {
            self.engine.place_job(&request, allowed)
        };
        let plan = match &no_room {
            Some(_) if self.groups.tier(&group) == Tier::Critical => {
                self.plan_preemption(job_id, &request)
            }
            _ => None,
        };
        if !nodes.is_empty() {
            self.end_reservation(job_id);
        }
        for (task_id, node_id) in task_ids.iter().zip(&nodes) {
            self.groups.add(&group, &req);
            if let Some(t) = self.tasks.get_mut(task_id) {
                t.node_id = node_id.clone();
                self.node_tasks
                    .entry(node_id.clone())
                    .or_default()
                    .insert(task_id.clone());
            }
            let _ = self.transition(task_id, TaskEvent::Placed, "");
            debug!(task_id, node_id, "Task placed.");
        }
        let why = no_room.or_else(|| over_quota.map(|d| self.groups.quota_reason(&group, d)));
        match &why {
            Some(reason) => {
                self.blocked
                    .insert(job_id.to_string(), (self.engine.epoch(), reason.clone()));
                self.set_pending_reason(&task_ids[nodes.len()..], reason);
            }
            None => {
                self.blocked.remove(job_id);
            }
        }
        if let Some(plan) = plan {
            self.preempt(job_id, &group, plan);
        }
        nodes.len()
    }

    /// Records the cordon durably and takes the node out of (or back into) placement.
    fn cordon(&mut self, node_id: &str, cordon: bool) -> Result<pb::Node, SchedulerError> {
        let Some(n) = self.nodes.get_mut(node_id) else {
            return Err(SchedulerError::NotFound {
                kind: "node",
                id: node_id.to_string(),
            });
        };
        if n.info.cordoned != cordon {
            self.store
                .commit(&[Write::Cordon(node_id.to_string(), cordon)])?;
            n.info.cordoned = cordon;
            info!(node_id, cordon, "Node cordon changed.");
        }
        let ready = n.conn.is_some() && n.info.state == pb::NodeState::Ready as i32;
        let info = n.info.clone();
        self.engine.set_schedulable(node_id, ready && !cordon);
        Ok(info)
    }

    fn end_reservation(&mut self, job_id: &str) {
        if let Some(node_id) = self.reservations.remove(job_id) {
            self.engine.unreserve(&node_id);
        }
    }

    fn set_pending_reason(&mut self, task_ids: &[String], reason: &str) {
        for task_id in task_ids {
            if let Some(t) = self.tasks.get_mut(task_id)
                && t.pending_reason != reason
            {
                t.pending_reason = reason.to_string();
                self.dirty_tasks.insert(task_id.clone());
            }
        }
    }

    /// Which flex tasks to preempt so that one task of a critical job fits, unless earlier
    /// victims are still on their way out.
    fn plan_preemption(&self, job_id: &str, req: &Request<'_>) -> Option<preempt::Plan> {
        if self.preempting.contains_key(job_id) {
            return None;
        }
        let now = now_unix_ms();
        let mut by_node: HashMap<&str, Vec<Candidate>> = HashMap::new();
        for t in self.tasks.values() {
            let on_node = matches!(
                pb::TaskState::try_from(t.state),
                Ok(pb::TaskState::Launched
                    | pb::TaskState::StartInitiated
                    | pb::TaskState::Started)
            );
            let Some(job) = self.jobs.get(&t.job_id) else {
                continue;
            };
            if !on_node || self.groups.tier(group_of(job)) != Tier::Flex {
                continue;
            }
            let res = task_resources(job);
            let started = t
                .history
                .iter()
                .rev()
                .find(|h| h.state == pb::TaskState::Started as i32)
                .map(|h| h.at_unix_ms);
            let secs = started.map_or(0, |at| u64::try_from(now - at).unwrap_or(0) / 1000);
            by_node.entry(&t.node_id).or_default().push(Candidate {
                task_id: t.id.clone(),
                resources: res,
                work: secs.saturating_mul(u64::from(res.cpu_millis)),
            });
        }
        let nodes = by_node
            .into_iter()
            .filter(|(node_id, _)| self.engine.admits(node_id, req))
            .filter_map(|(node_id, victims)| {
                Some(NodeCandidates {
                    node_id: node_id.to_string(),
                    free: self.engine.free(node_id)?,
                    victims,
                })
            })
            .collect();
        preempt::plan(req.resources, nodes)
    }

    fn preempt(&mut self, job_id: &str, group: &str, plan: preempt::Plan) {
        info!(
            job_id,
            node_id = plan.node_id,
            victims = plan.victims.len(),
            work = plan.work,
            "Preempting flex tasks for a critical job."
        );
        let why = format!("preempted for job {job_id} of critical capacity group {group}");
        // The room the victims leave is kept for this job.
        self.end_reservation(job_id);
        self.engine.reserve(&plan.node_id, job_id);
        self.reservations
            .insert(job_id.to_string(), plan.node_id.clone());
        for id in plan.victims {
            if let Some(t) = self.tasks.get_mut(&id) {
                t.preempted_for = job_id.to_string();
            }
            if self.transition(&id, TaskEvent::KillRequested, &why).is_ok() {
                self.preempting
                    .entry(job_id.to_string())
                    .or_default()
                    .insert(id);
            }
        }
    }

    fn register(
        &mut self,
        reg: pb::Register,
        conn_id: u64,
        tx: mpsc::Sender<pb::SchedulerMessage>,
    ) -> Result<(), SchedulerError> {
        if !valid_node_id(&reg.node_id) {
            return Err(SchedulerError::BadField {
                field: "register.node_id",
                reason: "1-128 characters: letters, digits, `-`, `_`, `.`".into(),
            });
        }
        let Some(capacity) = reg.capacity.as_ref().map(Resources::from) else {
            return Err(SchedulerError::BadField {
                field: "register.capacity",
                reason: "is required".into(),
            });
        };
        if reg.tasks.len() > 100_000 || reg.attributes.len() > 64 {
            return Err(SchedulerError::BadField {
                field: "register",
                reason: "too many tasks or attributes".into(),
            });
        }
        let node_id = reg.node_id.clone();
        let registered = pb::SchedulerMessage {
            msg: Some(pb::scheduler_message::Msg::Registered(pb::Registered {
                heartbeat_interval_ms: self.cfg.heartbeat_interval.as_millis() as u64,
            })),
        };
        // Queue Registered first so that the agent hears it before any order.
        tx.try_send(registered)
            .map_err(|_| SchedulerError::ShuttingDown)?;
        let entry = self
            .nodes
            .entry(node_id.clone())
            .or_insert_with(|| NodeEntry {
                info: pb::Node::default(),
                conn: None,
                last_seen: Instant::now(),
            });
        entry.info = pb::Node {
            id: node_id.clone(),
            state: pb::NodeState::Ready as i32,
            capacity: Some(capacity.into()),
            attributes: reg.attributes.clone(),
            log_address: reg.log_address.clone(),
            last_seen_unix_ms: now_unix_ms(),
            cordoned: entry.info.cordoned,
            ..Default::default()
        };
        entry.conn = Some(AgentConn { id: conn_id, tx });
        entry.last_seen = Instant::now();
        info!(node_id, %capacity, tasks = reg.tasks.len(), "Agent registered.");

        // Reconcile: the scheduler's view wins. The agent's report is complete, so a task the
        // store places here that the agent does not know of is lost.
        let reported: BTreeSet<String> = reg.tasks.iter().map(|s| s.task_id.clone()).collect();
        for status in reg.tasks {
            self.apply_status(&node_id, status);
        }
        let missing: Vec<String> = self
            .node_tasks
            .get(&node_id)
            .into_iter()
            .flatten()
            .filter(|id| !reported.contains(*id))
            .cloned()
            .collect();
        for id in missing {
            let _ = self.transition(
                &id,
                TaskEvent::NodeLost,
                "agent restarted without this task",
            );
        }
        let cordoned = self.nodes.get(&node_id).is_some_and(|n| n.info.cordoned);
        self.engine.upsert_node(NodeSpec {
            id: node_id.clone(),
            capacity,
            attributes: reg.attributes,
        });
        if cordoned {
            self.engine.set_schedulable(&node_id, false);
        }
        Ok(())
    }

    fn kill_stray(&mut self, node_id: &str, task_id: &str, why: &str) {
        warn!(
            node_id,
            task_id, why, "Killing a task the scheduler does not expect on this node."
        );
        self.outbox.push((
            node_id.to_string(),
            pb::SchedulerMessage {
                msg: Some(pb::scheduler_message::Msg::Kill(pb::KillOrder {
                    task_id: task_id.to_string(),
                    grace_ms: DEFAULT_KILL_GRACE_MS,
                })),
            },
        ));
    }

    fn apply_status(&mut self, node_id: &str, s: pb::TaskStatus) {
        let Some(reported) = TaskState::from_proto(s.state, s.reason, s.exit_code) else {
            warn!(node_id, task_id = %s.task_id, "Ignoring a status with an unknown state.");
            return;
        };
        let Some(t) = self.tasks.get(&s.task_id) else {
            if !reported.is_finished() {
                self.kill_stray(node_id, &s.task_id, "unknown task");
            }
            return;
        };
        if t.node_id != node_id {
            if !reported.is_finished() {
                self.kill_stray(node_id, &s.task_id, "task belongs to another node");
            }
            return;
        }
        let current = state_of(t);
        if current.is_some_and(|c| c.is_finished()) {
            if !reported.is_finished() {
                self.kill_stray(node_id, &s.task_id, "task already finished");
            }
            return;
        }
        let event = match reported {
            TaskState::StartInitiated => TaskEvent::Starting,
            TaskState::Started => TaskEvent::Running,
            TaskState::Finished(r) => TaskEvent::Exited(r),
            // Launched and KillInitiated are the scheduler's own states; nothing to learn.
            _ => return,
        };
        if current == Some(reported) {
            return;
        }
        if let Err(e) = self.transition(&s.task_id, event, &s.message) {
            debug!(node_id, error = %e, "Stale task status ignored.");
        }
    }

    fn on_agent_message(&mut self, node_id: &str, conn_id: u64, msg: pb::agent_message::Msg) {
        let Some(n) = self.nodes.get_mut(node_id) else {
            return;
        };
        if n.conn.as_ref().is_none_or(|c| c.id != conn_id) {
            // A stream the node has since replaced; its news is old.
            return;
        }
        n.last_seen = Instant::now();
        n.info.last_seen_unix_ms = now_unix_ms();
        match msg {
            pb::agent_message::Msg::Register(_) => {
                warn!(node_id, "Ignoring a second Register on one stream.");
            }
            pb::agent_message::Msg::Heartbeat(hb) => {
                for u in hb.usage {
                    if let Some(t) = self.tasks.get_mut(&u.task_id)
                        && t.node_id == node_id
                    {
                        t.usage = u.usage;
                    }
                }
            }
            pb::agent_message::Msg::Status(s) => self.apply_status(node_id, s),
            pb::agent_message::Msg::Drain(_) => {
                info!(node_id, "Node draining; it takes no new tasks.");
                if let Some(n) = self.nodes.get_mut(node_id) {
                    n.info.state = pb::NodeState::Draining as i32;
                }
                self.engine.set_schedulable(node_id, false);
            }
        }
    }
}
