//! `berth`: the one binary. Parses the command line, installs tracing, and calls the
//! libraries: `dev`, `scheduler` and `agent` run servers; the rest are API clients.

mod client;
mod config;
mod output;
mod serve;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Exit code for bad configuration (EX_USAGE).
pub const EXIT_CONFIG: u8 = 64;
/// Exit code for invalid user input such as a bad job spec.
pub const EXIT_INVALID: u8 = 2;

#[derive(Parser)]
#[command(
    name = "berth",
    version,
    about = "Berth: a container platform. Jobs in, containers out."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Clone)]
struct ApiArgs {
    /// Scheduler API address.
    #[arg(
        long,
        env = "BERTH_API",
        default_value = "127.0.0.1:7700",
        global = true
    )]
    api: String,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = output::Format::Table, global = true)]
    output: output::Format,
}

#[derive(Subcommand)]
enum Cmd {
    /// A one-node cluster on this machine: scheduler and agent in one process.
    Dev(serve::DevArgs),
    /// Run the scheduler.
    Scheduler(serve::SchedulerArgs),
    /// Run a node agent.
    Agent(serve::AgentArgs),
    /// Jobs: run, list, inspect, kill, watch.
    Job {
        #[command(subcommand)]
        cmd: client::JobCmd,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Tasks: list and kill.
    Task {
        #[command(subcommand)]
        cmd: client::TaskCmd,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Nodes.
    Node {
        #[command(subcommand)]
        cmd: client::NodeCmd,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Print a task's output.
    Logs {
        /// Task id.
        task: String,
        /// Keep printing new output until the task finishes.
        #[arg(short, long)]
        follow: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Images in the local containerd.
    Image {
        #[command(subcommand)]
        cmd: ImageCmd,
    },
    /// Load generation against a scheduler.
    Sim {
        #[command(subcommand)]
        cmd: SimCmd,
    },
}

#[derive(Subcommand)]
enum SimCmd {
    /// Simulated agents: real agent protocol, no containers; tasks report Started at once.
    Agents {
        /// How many nodes.
        #[arg(long, default_value_t = 100)]
        count: usize,
        /// Scheduler address.
        #[arg(long, env = "BERTH_API", default_value = "127.0.0.1:7700")]
        scheduler: String,
        /// Node id prefix.
        #[arg(long, default_value = "sim-")]
        prefix: String,
        /// Zones, comma-separated, assigned round robin.
        #[arg(long, default_value = "a,b,c", value_delimiter = ',')]
        zones: Vec<String>,
        /// Report tasks finished this long after they start (e.g. 30s); default: never.
        #[arg(long)]
        task_runtime: Option<String>,
    },
}

#[derive(Subcommand)]
enum ImageCmd {
    /// Import an OCI image archive into containerd.
    Import {
        /// The archive (.tar).
        file: PathBuf,
        /// containerd socket.
        #[arg(long, default_value = "/run/containerd/containerd.sock")]
        containerd: PathBuf,
        /// containerd namespace.
        #[arg(long, default_value = "berth")]
        namespace: String,
    },
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BERTH_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,h2=warn,tower=warn,hyper=warn")
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

async fn sim_agents(
    count: usize,
    scheduler: String,
    prefix: String,
    zones: Vec<String>,
    task_runtime: Option<String>,
) -> ExitCode {
    let task_runtime = match task_runtime
        .as_deref()
        .map(berth_model::quantity::parse_duration)
        .transpose()
    {
        Ok(d) => d,
        Err(e) => {
            eprintln!("berth: --task-runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let scheduler = if scheduler.contains("://") {
        scheduler
    } else {
        format!("http://{scheduler}")
    };
    let cancel = tokio_util::sync::CancellationToken::new();
    let cfg = berth_sim::SimConfig {
        scheduler,
        count,
        prefix,
        zones,
        capacity: None,
        task_runtime,
        streams_per_connection: 100,
    };
    let stats = match berth_sim::run(cfg, cancel.clone()).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("berth: cannot reach the scheduler: {e}");
            return ExitCode::from(69);
        }
    };
    let mut every = tokio::time::interval(std::time::Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = every.tick() => {
                use std::sync::atomic::Ordering::Relaxed;
                println!(
                    "{count} nodes: {} registrations, {} tasks started, {} finished, {} reconnects",
                    stats.registered.load(Relaxed),
                    stats.started.load(Relaxed),
                    stats.finished.load(Relaxed),
                    stats.reconnects.load(Relaxed),
                );
            }
        }
    }
    cancel.cancel();
    ExitCode::SUCCESS
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Dev(a) => {
            init_tracing();
            serve::dev(a).await
        }
        Cmd::Scheduler(a) => {
            init_tracing();
            serve::scheduler(a).await
        }
        Cmd::Agent(a) => {
            init_tracing();
            serve::agent(a).await
        }
        Cmd::Job { cmd, api } => client::job(cmd, &api.api, api.output).await,
        Cmd::Task { cmd, api } => client::task(cmd, &api.api, api.output).await,
        Cmd::Node { cmd, api } => client::node(cmd, &api.api, api.output).await,
        Cmd::Logs { task, follow, api } => client::logs(&task, follow, &api.api).await,
        Cmd::Sim {
            cmd:
                SimCmd::Agents {
                    count,
                    scheduler,
                    prefix,
                    zones,
                    task_runtime,
                },
        } => sim_agents(count, scheduler, prefix, zones, task_runtime).await,
        Cmd::Image {
            cmd:
                ImageCmd::Import {
                    file,
                    containerd,
                    namespace,
                },
        } => client::image_import(&file, &containerd, &namespace).await,
    }
}
