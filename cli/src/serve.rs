//! The server commands: `berth dev`, `berth scheduler`, `berth agent`.
//!
//! Each runs until SIGTERM or SIGINT, then drains for a grace period; a second signal exits at
//! once. Stopping an agent leaves its containers running.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use berth_agent::AgentConfig;
use berth_model::quantity;
use berth_model::resources::Resources;
use berth_scheduler::{ClusterConfig, Strategy, api, cluster, store::Store};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::{EXIT_CONFIG, config};

const DRAIN: Duration = Duration::from_secs(10);

#[derive(clap::Args)]
pub struct DevArgs {
    /// containerd socket.
    #[arg(long, default_value = "/run/containerd/containerd.sock")]
    containerd: PathBuf,
    /// Where the store, logs and task files live.
    #[arg(long, default_value = ".berth")]
    data_dir: PathBuf,
    /// API address.
    #[arg(long, default_value = "127.0.0.1:7700")]
    listen: SocketAddr,
    /// containerd namespace.
    #[arg(long, default_value = "berth")]
    namespace: String,
}

#[derive(clap::Args)]
pub struct SchedulerArgs {
    /// YAML config file; flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Where the store lives [default: /var/lib/berth/scheduler].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// API address [default: 127.0.0.1:7700].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Silence after which a node is lost [default: 10s].
    #[arg(long)]
    heartbeat_timeout: Option<String>,
    /// How often agents send heartbeats [default: 2s].
    #[arg(long)]
    heartbeat_interval: Option<String>,
    /// binpack (most-allocated first) or spread [default: binpack].
    #[arg(long)]
    strategy: Option<String>,
    /// Place by a linear first-fit scan: the reference for benchmarks only.
    #[arg(long, hide = true)]
    first_fit_reference: bool,
}

#[derive(clap::Args)]
pub struct AgentArgs {
    /// YAML config file; flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// This node's id [default: the hostname].
    #[arg(long)]
    node_id: Option<String>,
    /// Scheduler address [default: 127.0.0.1:7700].
    #[arg(long, env = "BERTH_API")]
    scheduler: Option<String>,
    /// containerd socket [default: /run/containerd/containerd.sock].
    #[arg(long)]
    containerd: Option<PathBuf>,
    /// containerd namespace [default: berth].
    #[arg(long)]
    namespace: Option<String>,
    /// Logs and per-task files [default: /var/lib/berth/agent].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Address to serve task logs on [default: 127.0.0.1:7701].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// CPU kept for the host (e.g. 500m) [default: 0].
    #[arg(long)]
    reserve_cpu: Option<String>,
    /// Memory kept for the host (e.g. 512Mi) [default: 0].
    #[arg(long)]
    reserve_memory: Option<String>,
    /// How long finished tasks' logs are kept (e.g. 1h) [default: 1h].
    #[arg(long)]
    log_retention: Option<String>,
    /// On SIGTERM, stop every task gracefully and report it before exiting, instead of
    /// leaving the containers running.
    #[arg(long)]
    drain: bool,
    /// Node attributes, KEY=VALUE (zone, instance_type, ...); added to the config file's.
    #[arg(long = "attribute", value_parser = parse_kv)]
    attributes: Vec<(String, String)>,
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("`{s}` is not KEY=VALUE"))
}

fn config_error(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("berth: {msg}");
    ExitCode::from(EXIT_CONFIG)
}

/// Cancels `token` on SIGTERM or SIGINT; a second signal exits the process.
fn on_signals(token: CancellationToken) {
    tokio::spawn(async move {
        let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        else {
            return;
        };
        for n in 0.. {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            if n == 0 {
                info!("Shutting down; send the signal again to exit now.");
                token.cancel();
            } else {
                warn!("Second signal: exiting now.");
                std::process::exit(130);
            }
        }
    });
}

async fn start_cluster(
    data_dir: &std::path::Path,
    cfg: ClusterConfig,
    cancel: CancellationToken,
) -> Result<(berth_scheduler::ClusterHandle, tokio::task::JoinHandle<()>), String> {
    std::fs::create_dir_all(data_dir)
        .map_err(|e| format!("--data-dir {}: {e}", data_dir.display()))?;
    let store = Store::open_redb(&data_dir.join("scheduler.redb")).map_err(|e| e.to_string())?;
    cluster::spawn(store, cfg, cancel).map_err(|e| e.to_string())
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, String> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| format!("--listen {addr}: {e}"))
}

/// `berth dev`: scheduler + agent + log service on one address.
pub async fn dev(a: DevArgs) -> ExitCode {
    let cancel = CancellationToken::new();
    on_signals(cancel.clone());
    let data_dir = match std::path::absolute(&a.data_dir) {
        Ok(d) => d,
        Err(e) => return config_error(format!("--data-dir: {e}")),
    };
    let cfg = ClusterConfig {
        heartbeat_interval: Duration::from_secs(1),
        heartbeat_timeout: Duration::from_secs(5),
        ..Default::default()
    };
    let (handle, actor) =
        match start_cluster(&data_dir.join("scheduler"), cfg, cancel.clone()).await {
            Ok(x) => x,
            Err(e) => return config_error(e),
        };
    let listener = match bind(a.listen).await {
        Ok(l) => l,
        Err(e) => return config_error(e),
    };
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let agent_dir = data_dir.join("agent");
    let logs = berth_agent::logs::LogApi::server(agent_dir.clone());
    let server_cancel = CancellationToken::new();
    let server = tokio::spawn(api::serve(
        api::router(handle).add_service(logs),
        listener,
        server_cancel.clone(),
    ));
    let node_id = hostname();
    let agent_cfg = AgentConfig {
        node_id: node_id.clone(),
        scheduler: format!("http://{addr}"),
        containerd: a.containerd.clone(),
        namespace: a.namespace.clone(),
        data_dir: agent_dir,
        reserved: Resources::default(),
        capacity: None,
        attributes: HashMap::from([("zone".to_string(), "local".to_string())]),
        log_address: addr.clone(),
        drain_on_stop: false,
        log_retention: Duration::from_secs(3600),
    };
    let agent = tokio::spawn(berth_agent::run(agent_cfg, cancel.clone()));
    println!(
        "Berth dev cluster: API on {addr} (node {node_id}, containerd {})",
        a.containerd.display()
    );
    println!("  export BERTH_API={addr}");
    let code = tokio::select! {
        r = agent => match r {
            Ok(Ok(())) => ExitCode::SUCCESS,
            Ok(Err(e)) => { error!(error = %e, "Agent failed."); config_error(e) }
            Err(e) => { error!(error = %e, "Agent panicked."); ExitCode::FAILURE }
        },
        _ = cancel.cancelled() => ExitCode::SUCCESS,
    };
    cancel.cancel();
    server_cancel.cancel();
    let _ = tokio::time::timeout(DRAIN, async {
        let _ = server.await;
        let _ = actor.await;
    })
    .await;
    code
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

fn duration(flag: &str, v: &str) -> Result<Duration, String> {
    quantity::parse_duration(v).map_err(|e| format!("{flag}: {e}"))
}

/// `berth scheduler`.
pub async fn scheduler(a: SchedulerArgs) -> ExitCode {
    let file: config::SchedulerFile = match config::load(a.config.as_deref()) {
        Ok(f) => f,
        Err(e) => return config_error(e),
    };
    let mut errors = Vec::new();
    let strategy = match a.strategy.or(file.strategy).as_deref().unwrap_or("binpack") {
        "binpack" => Strategy::Binpack,
        "spread" => Strategy::Spread,
        other => {
            errors.push(format!("strategy: `{other}` is not binpack or spread"));
            Strategy::Binpack
        }
    };
    let mut dur = |field: &str, v: Option<String>, default: &str| {
        duration(field, v.as_deref().unwrap_or(default)).unwrap_or_else(|e| {
            errors.push(e);
            Duration::ZERO
        })
    };
    let interval = dur(
        "heartbeat_interval",
        a.heartbeat_interval.or(file.heartbeat_interval),
        "2s",
    );
    let timeout = dur(
        "heartbeat_timeout",
        a.heartbeat_timeout.or(file.heartbeat_timeout),
        "10s",
    );
    if timeout <= interval {
        errors.push("heartbeat_timeout: must be longer than heartbeat_interval".into());
    }
    let limits = match file
        .max_task
        .as_ref()
        .map(config::MaxTask::limits)
        .transpose()
    {
        Ok(l) => l.unwrap_or_default(),
        Err(mut e) => {
            errors.append(&mut e);
            Default::default()
        }
    };
    let groups = config::capacity_groups(&file.capacity_groups).unwrap_or_else(|mut e| {
        errors.append(&mut e);
        Vec::new()
    });
    if !errors.is_empty() {
        return config_error(errors.join("; "));
    }
    let data_dir = a
        .data_dir
        .or(file.data_dir)
        .unwrap_or_else(|| "/var/lib/berth/scheduler".into());
    let listen = a
        .listen
        .or(file.listen)
        .unwrap_or_else(|| ([127, 0, 0, 1], 7700).into());
    let cancel = CancellationToken::new();
    on_signals(cancel.clone());
    let cfg = ClusterConfig {
        heartbeat_interval: interval,
        heartbeat_timeout: timeout,
        strategy,
        groups,
        first_fit: a.first_fit_reference,
        limits,
    };
    let (handle, actor) = match start_cluster(&data_dir, cfg, cancel.clone()).await {
        Ok(x) => x,
        Err(e) => return config_error(e),
    };
    let listener = match bind(listen).await {
        Ok(l) => l,
        Err(e) => return config_error(e),
    };
    info!(%listen, "Scheduler serving.");
    let r = api::serve(api::router(handle), listener, cancel.clone()).await;
    let _ = tokio::time::timeout(DRAIN, actor).await;
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!(error = %e, "Server failed.");
            ExitCode::FAILURE
        }
    }
}

/// `berth agent`.
pub async fn agent(a: AgentArgs) -> ExitCode {
    let file: config::AgentFile = match config::load(a.config.as_deref()) {
        Ok(f) => f,
        Err(e) => return config_error(e),
    };
    let mut errors = Vec::new();
    let cpu =
        quantity::parse_cpu_millis(a.reserve_cpu.or(file.reserve_cpu).as_deref().unwrap_or("0"))
            .unwrap_or_else(|e| {
                errors.push(format!("reserve_cpu: {e}"));
                0
            });
    let mem = quantity::parse_mib(
        a.reserve_memory
            .or(file.reserve_memory)
            .as_deref()
            .unwrap_or("0"),
    )
    .unwrap_or_else(|e| {
        errors.push(format!("reserve_memory: {e}"));
        0
    });
    let log_retention = duration(
        "log_retention",
        a.log_retention
            .or(file.log_retention)
            .as_deref()
            .unwrap_or("1h"),
    )
    .unwrap_or_else(|e| {
        errors.push(e);
        Duration::ZERO
    });
    if !errors.is_empty() {
        return config_error(errors.join("; "));
    }
    let listen = a
        .listen
        .or(file.listen)
        .unwrap_or_else(|| ([127, 0, 0, 1], 7701).into());
    let data_dir = a
        .data_dir
        .or(file.data_dir)
        .unwrap_or_else(|| "/var/lib/berth/agent".into());
    let scheduler = a
        .scheduler
        .or(file.scheduler)
        .unwrap_or_else(|| "127.0.0.1:7700".into());
    let mut attributes = file.attributes;
    attributes.extend(a.attributes);
    let cancel = CancellationToken::new();
    on_signals(cancel.clone());
    let listener = match bind(listen).await {
        Ok(l) => l,
        Err(e) => return config_error(e),
    };
    let log_address = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let logs = berth_agent::logs::LogApi::server(data_dir.clone());
    let server = tokio::spawn(api::serve(
        tonic::transport::Server::builder().add_service(logs),
        listener,
        cancel.clone(),
    ));
    let scheduler = if scheduler.contains("://") {
        scheduler
    } else {
        format!("http://{scheduler}")
    };
    let cfg = AgentConfig {
        node_id: a.node_id.or(file.node_id).unwrap_or_else(hostname),
        scheduler,
        containerd: a
            .containerd
            .or(file.containerd)
            .unwrap_or_else(|| "/run/containerd/containerd.sock".into()),
        namespace: a
            .namespace
            .or(file.namespace)
            .unwrap_or_else(|| "berth".into()),
        data_dir,
        reserved: Resources {
            cpu_millis: cpu,
            memory_mib: mem,
            ..Default::default()
        },
        capacity: None,
        attributes: attributes.into_iter().collect(),
        log_address,
        drain_on_stop: a.drain,
        log_retention,
    };
    let r = berth_agent::run(cfg, cancel.clone()).await;
    cancel.cancel();
    let _ = server.await;
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => config_error(e),
    }
}
