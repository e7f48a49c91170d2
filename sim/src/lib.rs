//! Simulated agents: a load generator for the scheduler, not a stand-in for the agent.
//!
//! Each simulated node opens the real AgentService stream, registers with a capacity and
//! attributes, heartbeats at the interval the scheduler asks for, reports every assigned task
//! `Started` at once (or `Finished(normal)` after a set run time), and answers kill orders with
//! `Finished(killed)`. No containers are involved. Streams are spread over a few HTTP/2
//! connections, so thousands of nodes fit in one process; a node whose stream breaks
//! re-registers with the tasks it holds.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use berth_model::resources::Resources;
use berth_proto as pb;
use pb::agent_message::Msg;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

/// The instance types simulated nodes cycle through: (name, cpu millis, memory MiB).
pub const INSTANCE_TYPES: [(&str, u32, u64); 4] = [
    ("m5.4xlarge", 16_000, 64 * 1024),
    ("m5.8xlarge", 32_000, 128 * 1024),
    ("r5.8xlarge", 32_000, 256 * 1024),
    ("m5.24xlarge", 96_000, 384 * 1024),
];

/// How to simulate.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Scheduler address (`http://127.0.0.1:7700`).
    pub scheduler: String,
    /// How many nodes.
    pub count: usize,
    /// Node ids are `{prefix}{n:05}`.
    pub prefix: String,
    /// Zones, assigned round robin.
    pub zones: Vec<String>,
    /// A fixed capacity for every node, or `None` to cycle through [`INSTANCE_TYPES`].
    pub capacity: Option<Resources>,
    /// Report tasks `Finished(normal)` this long after they start; `None` to keep them running.
    pub task_runtime: Option<Duration>,
    /// Agent streams per HTTP/2 connection.
    pub streams_per_connection: usize,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            scheduler: "http://127.0.0.1:7700".into(),
            count: 100,
            prefix: "sim-".into(),
            zones: vec!["a".into(), "b".into(), "c".into()],
            capacity: None,
            task_runtime: None,
            streams_per_connection: 100,
        }
    }
}

/// Counters shared by all simulated nodes.
#[derive(Debug, Default)]
pub struct SimStats {
    /// Nodes whose Register was accepted (counting re-registrations).
    pub registered: AtomicU64,
    /// Tasks reported Started.
    pub started: AtomicU64,
    /// Tasks reported finished (normal or killed).
    pub finished: AtomicU64,
    /// Streams that failed and were reopened.
    pub reconnects: AtomicU64,
}

/// The capacity and attributes of node `i`.
pub fn node_shape(cfg: &SimConfig, i: usize) -> (Resources, HashMap<String, String>) {
    let (ty, cpu, mem) = INSTANCE_TYPES[i % INSTANCE_TYPES.len()];
    let capacity = cfg.capacity.unwrap_or(Resources {
        cpu_millis: cpu,
        memory_mib: mem,
        disk_mib: 500 * 1024,
        gpus: 0,
        network_mbps: 10_000,
    });
    let mut attrs = HashMap::new();
    if !cfg.zones.is_empty() {
        attrs.insert("zone".to_string(), cfg.zones[i % cfg.zones.len()].clone());
    }
    attrs.insert("instance_type".to_string(), ty.to_string());
    (capacity, attrs)
}

/// Starts every simulated node; they run until `cancel` fires.
pub async fn run(
    cfg: SimConfig,
    cancel: CancellationToken,
) -> Result<Arc<SimStats>, tonic::transport::Error> {
    let stats = Arc::new(SimStats::default());
    let per = cfg.streams_per_connection.max(1);
    let mut channels = Vec::new();
    for _ in 0..cfg.count.div_ceil(per) {
        channels.push(
            Endpoint::from_shared(cfg.scheduler.clone())?
                .http2_adaptive_window(true)
                .connect()
                .await?,
        );
    }
    for i in 0..cfg.count {
        let (capacity, attributes) = node_shape(&cfg, i);
        let node = SimNode {
            id: format!("{}{i:05}", cfg.prefix),
            capacity,
            attributes,
            runtime: cfg.task_runtime,
            channel: channels[i / per].clone(),
            stats: stats.clone(),
            tasks: HashMap::new(),
        };
        tokio::spawn(node.run(cancel.clone()));
    }
    Ok(stats)
}

struct SimNode {
    id: String,
    capacity: Resources,
    attributes: HashMap<String, String>,
    runtime: Option<Duration>,
    channel: Channel,
    stats: Arc<SimStats>,
    /// Tasks it holds, with their last status.
    tasks: HashMap<String, pb::TaskStatus>,
}

fn status(id: &str, state: pb::TaskState, reason: pb::FinishReason) -> pb::TaskStatus {
    pb::TaskStatus {
        task_id: id.to_string(),
        state: state as i32,
        reason: reason as i32,
        at_unix_ms: berth_model::now_unix_ms(),
        ..Default::default()
    }
}

impl SimNode {
    async fn run(mut self, cancel: CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        while !cancel.is_cancelled() {
            if self.session(&cancel).await.is_ok() {
                return;
            }
            self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
            let jitter = rand::random_range(0..=backoff.as_millis() as u64);
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(backoff + Duration::from_millis(jitter)) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// One stream's life; Ok when cancelled, Err when the stream broke.
    async fn session(&mut self, cancel: &CancellationToken) -> Result<(), ()> {
        // Unbounded, so that sending never stops this loop from reading its orders.
        let (out, rx) = mpsc::unbounded_channel();
        let register = pb::Register {
            node_id: self.id.clone(),
            capacity: Some(self.capacity.into()),
            attributes: self.attributes.clone(),
            log_address: String::new(),
            tasks: self.tasks.values().cloned().collect(),
        };
        out.send(pb::AgentMessage {
            msg: Some(Msg::Register(register)),
        })
        .map_err(|_| ())?;
        let mut inbound = pb::agent_service_client::AgentServiceClient::new(self.channel.clone())
            .connect(UnboundedReceiverStream::new(rx))
            .await
            .map_err(|_| ())?
            .into_inner();
        self.stats.registered.fetch_add(1, Ordering::Relaxed);
        let mut heartbeat = tokio::time::interval(Duration::from_secs(2));
        // Tasks to finish on their own, by when.
        let mut ends: std::collections::BTreeMap<tokio::time::Instant, Vec<String>> =
            Default::default();
        loop {
            let next_end = ends.keys().next().copied();
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                _ = heartbeat.tick() => {
                    let hb = pb::AgentMessage { msg: Some(Msg::Heartbeat(pb::Heartbeat::default())) };
                    out.send(hb).map_err(|_| ())?;
                }
                _ = tokio::time::sleep_until(next_end.unwrap_or_else(far)), if next_end.is_some() => {
                    let due = next_end.and_then(|at| ends.remove(&at)).unwrap_or_default();
                    for id in due {
                        if self.tasks.contains_key(&id) {
                            let s = status(&id, pb::TaskState::Finished, pb::FinishReason::Normal);
                            self.tasks.remove(&id);
                            self.stats.finished.fetch_add(1, Ordering::Relaxed);
                            out.send(pb::AgentMessage { msg: Some(Msg::Status(s)) }).map_err(|_| ())?;
                        }
                    }
                }
                m = inbound.message() => {
                    let Ok(Some(m)) = m else { return Err(()) };
                    let Some(msg) = m.msg else { continue };
                    match msg {
                        pb::scheduler_message::Msg::Registered(r) => {
                            let ms = r.heartbeat_interval_ms.clamp(100, 60_000);
                            heartbeat = tokio::time::interval(Duration::from_millis(ms));
                        }
                        pb::scheduler_message::Msg::Assign(a) => {
                            if self.tasks.contains_key(&a.task_id) {
                                continue;
                            }
                            let s = status(&a.task_id, pb::TaskState::Started, pb::FinishReason::Unspecified);
                            self.tasks.insert(a.task_id.clone(), s.clone());
                            self.stats.started.fetch_add(1, Ordering::Relaxed);
                            if let Some(rt) = self.runtime {
                                ends.entry(tokio::time::Instant::now() + rt).or_default().push(a.task_id);
                            }
                            out.send(pb::AgentMessage { msg: Some(Msg::Status(s)) }).map_err(|_| ())?;
                        }
                        pb::scheduler_message::Msg::Kill(k) => {
                            self.tasks.remove(&k.task_id);
                            self.stats.finished.fetch_add(1, Ordering::Relaxed);
                            let s = status(&k.task_id, pb::TaskState::Finished, pb::FinishReason::Killed);
                            out.send(pb::AgentMessage { msg: Some(Msg::Status(s)) }).map_err(|_| ())?;
                        }
                    }
                }
            }
        }
    }
}

fn far() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(86_400)
}
