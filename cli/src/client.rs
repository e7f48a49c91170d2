//! The API client commands: jobs, tasks, nodes, logs and image import.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use berth_model::spec;
use berth_proto as pb;
use pb::job_service_client::JobServiceClient;
use serde_json::json;
use tonic::transport::Channel;

use crate::EXIT_INVALID;
use crate::output::{self, Format, job_state, table, task_state};

#[derive(clap::Subcommand)]
pub enum JobCmd {
    /// Submit a job from a YAML or JSON file.
    Run {
        /// The job spec (`-` for stdin).
        #[arg(short, long)]
        file: String,
        /// Show progress and exit with the job's result.
        #[arg(long)]
        wait: bool,
    },
    /// List jobs.
    Ls {
        /// Only jobs in this state (active, succeeded, failed, killed).
        #[arg(long)]
        state: Option<String>,
        /// Only jobs with this label, KEY=VALUE.
        #[arg(short = 'l', long = "label")]
        labels: Vec<String>,
    },
    /// Show a job and its tasks.
    Get {
        /// Job id or name.
        job: String,
    },
    /// Kill a job's tasks.
    Kill {
        /// Job id or name.
        job: String,
    },
    /// Stream job changes.
    Watch,
    /// Change a service job's desired task count.
    Scale {
        /// Job id or name.
        job: String,
        /// Desired count.
        tasks: u32,
    },
}

#[derive(clap::Subcommand)]
pub enum TaskCmd {
    /// List tasks.
    Ls {
        /// Only this job's tasks (id or name).
        #[arg(long)]
        job: Option<String>,
    },
    /// Kill a task.
    Kill {
        /// Task id.
        task: String,
    },
}

#[derive(clap::Subcommand)]
pub enum NodeCmd {
    /// List nodes.
    Ls,
    /// Place no new tasks on a node (its running tasks stay).
    Cordon {
        /// Node id.
        node: String,
    },
    /// Place tasks on a cordoned node again.
    Uncordon {
        /// Node id.
        node: String,
    },
}

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("berth: {msg}");
    ExitCode::FAILURE
}

fn status_exit(s: &tonic::Status) -> ExitCode {
    eprintln!("berth: {}", s.message());
    match s.code() {
        tonic::Code::InvalidArgument | tonic::Code::AlreadyExists | tonic::Code::NotFound => {
            ExitCode::from(EXIT_INVALID)
        }
        _ => ExitCode::FAILURE,
    }
}

async fn connect(api: &str) -> Result<JobServiceClient<Channel>, ExitCode> {
    let url = if api.contains("://") {
        api.to_string()
    } else {
        format!("http://{api}")
    };
    let ch = tonic::transport::Endpoint::from_shared(url)
        .map_err(|e| fail(format!("--api {api}: {e}")))?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| {
            fail(format!(
                "cannot reach the scheduler at {api} ({e}); is `berth dev` running?"
            ))
        })?;
    Ok(JobServiceClient::new(ch))
}

macro_rules! try_exit {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(code) => return code,
        }
    };
}

macro_rules! rpc {
    ($e:expr) => {
        match $e.await {
            Ok(r) => r.into_inner(),
            Err(s) => return status_exit(&s),
        }
    };
}

pub async fn job(cmd: JobCmd, api: &str, fmt: Format) -> ExitCode {
    // Validate a spec before dialing, so a bad file fails fast even with no scheduler.
    if let JobCmd::Run { file, wait } = cmd {
        let text = if file == "-" {
            let mut s = String::new();
            if let Err(e) = std::io::Read::read_to_string(&mut std::io::stdin(), &mut s) {
                return fail(format!("stdin: {e}"));
            }
            s
        } else {
            match std::fs::read_to_string(&file) {
                Ok(s) => s,
                Err(e) => return fail(format!("{file}: {e}")),
            }
        };
        let spec = match spec::parse_and_validate(&text) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("berth: {file}: {e}");
                return ExitCode::from(EXIT_INVALID);
            }
        };
        let mut c = try_exit!(connect(api).await);
        let job = rpc!(c.create_job(pb::CreateJobRequest { spec: Some(spec) }))
            .job
            .unwrap_or_default();
        if !wait {
            match fmt {
                Format::Table => println!("{}", job.id),
                f => output::structured(&output::job_json(&job), f),
            }
            return ExitCode::SUCCESS;
        }
        return wait_for(&mut c, &job.id).await;
    }
    let mut c = try_exit!(connect(api).await);
    match cmd {
        JobCmd::Run { .. } => ExitCode::SUCCESS,
        JobCmd::Ls { state, labels } => {
            let mut req = pb::ListJobsRequest::default();
            if let Some(s) = state {
                let st = match s.to_ascii_lowercase().as_str() {
                    "active" => pb::JobState::Active,
                    "killinitiated" | "kill_initiated" => pb::JobState::KillInitiated,
                    "succeeded" => pb::JobState::Succeeded,
                    "failed" => pb::JobState::Failed,
                    "killed" => pb::JobState::Killed,
                    other => {
                        eprintln!(
                            "berth: --state: `{other}` is not active, succeeded, failed or killed"
                        );
                        return ExitCode::from(EXIT_INVALID);
                    }
                };
                req.states.push(st as i32);
            }
            for l in labels {
                let Some((k, v)) = l.split_once('=') else {
                    eprintln!("berth: --label: `{l}` is not KEY=VALUE");
                    return ExitCode::from(EXIT_INVALID);
                };
                req.labels.insert(k.into(), v.into());
            }
            let mut jobs = Vec::new();
            loop {
                let page = rpc!(c.list_jobs(req.clone()));
                jobs.extend(page.jobs);
                if page.next_cursor.is_empty() {
                    break;
                }
                req.cursor = page.next_cursor;
            }
            match fmt {
                Format::Table => {
                    let rows: Vec<Vec<String>> = jobs
                        .iter()
                        .map(|j| {
                            let s = j.spec.clone().unwrap_or_default();
                            let c = j.counts.unwrap_or_default();
                            vec![
                                j.id.clone(),
                                s.name,
                                if s.r#type == pb::JobType::Service as i32 {
                                    "service"
                                } else {
                                    "batch"
                                }
                                .into(),
                                job_state(j.state).into(),
                                format!("{}/{}", c.succeeded, s.tasks),
                                c.started.to_string(),
                                output::age(j.created_unix_ms),
                            ]
                        })
                        .collect();
                    table(
                        &["ID", "NAME", "TYPE", "STATE", "SUCCEEDED", "RUNNING", "AGE"],
                        &rows,
                    );
                }
                f => output::structured(
                    &json!(jobs.iter().map(output::job_json).collect::<Vec<_>>()),
                    f,
                ),
            }
            ExitCode::SUCCESS
        }
        JobCmd::Get { job } => {
            let r = rpc!(c.get_job(pb::GetJobRequest { id: job }));
            let j = r.job.unwrap_or_default();
            match fmt {
                Format::Table => {
                    let s = j.spec.clone().unwrap_or_default();
                    println!("ID:      {}", j.id);
                    println!("Name:    {}", s.name);
                    println!("State:   {}", job_state(j.state));
                    if !j.message.is_empty() {
                        println!("Message: {}", j.message);
                    }
                    println!();
                    print_tasks(&r.tasks);
                }
                f => {
                    let mut v = output::job_json(&j);
                    v["tasks"] = json!(r.tasks.iter().map(output::task_json).collect::<Vec<_>>());
                    output::structured(&v, f);
                }
            }
            ExitCode::SUCCESS
        }
        JobCmd::Kill { job } => {
            let j = rpc!(c.kill_job(pb::KillJobRequest { id: job }))
                .job
                .unwrap_or_default();
            println!("{} {}", j.id, job_state(j.state));
            ExitCode::SUCCESS
        }
        JobCmd::Scale { job, tasks } => {
            let j = rpc!(c.update_job_capacity(pb::UpdateJobCapacityRequest { id: job, tasks }))
                .job
                .unwrap_or_default();
            println!("{} scaled to {tasks}", j.id);
            ExitCode::SUCCESS
        }
        JobCmd::Watch => {
            let mut stream = rpc!(c.watch_jobs(pb::WatchJobsRequest {}));
            loop {
                match stream.message().await {
                    Ok(Some(ev)) => match ev.event {
                        Some(pb::watch_jobs_response::Event::Job(j)) => {
                            let name = j.spec.as_ref().map(|s| s.name.clone()).unwrap_or_default();
                            println!("job  {}  {name}  {}", j.id, job_state(j.state));
                        }
                        Some(pb::watch_jobs_response::Event::Task(t)) => {
                            println!("task {}  {}  {}", t.id, task_state(&t), t.node_id);
                        }
                        Some(pb::watch_jobs_response::Event::SnapshotEnd(_)) => {
                            println!("-- snapshot end --")
                        }
                        None => {}
                    },
                    Ok(None) => return ExitCode::SUCCESS,
                    Err(s) => return status_exit(&s),
                }
            }
        }
    }
}

fn print_tasks(tasks: &[pb::Task]) {
    let rows: Vec<Vec<String>> = tasks
        .iter()
        .map(|t| {
            let info = if !t.pending_reason.is_empty() {
                t.pending_reason.clone()
            } else {
                t.message.clone()
            };
            vec![
                t.id.clone(),
                t.index.to_string(),
                t.attempt.to_string(),
                task_state(t),
                t.node_id.clone(),
                info,
            ]
        })
        .collect();
    table(
        &["TASK", "INDEX", "ATTEMPT", "STATE", "NODE", "INFO"],
        &rows,
    );
}

/// Follows a job through the watch stream until it ends; exit code 0 only if it succeeded.
async fn wait_for(c: &mut JobServiceClient<Channel>, job_id: &str) -> ExitCode {
    let interactive = std::io::IsTerminal::is_terminal(&std::io::stderr());
    // Watching after the create is gap-free: the snapshot holds the job as it is now.
    let mut stream = rpc!(c.watch_jobs(pb::WatchJobsRequest {}));
    let mut pending: std::collections::BTreeMap<String, String> = Default::default();
    let mut last = String::new();
    loop {
        let ev = match stream.message().await {
            Ok(Some(ev)) => ev,
            Ok(None) => return fail("the scheduler ended the watch"),
            Err(s) => return status_exit(&s),
        };
        let j = match ev.event {
            Some(pb::watch_jobs_response::Event::Job(j)) if j.id == job_id => j,
            Some(pb::watch_jobs_response::Event::Task(t)) if t.job_id == job_id => {
                if t.pending_reason.is_empty() {
                    pending.remove(&t.id);
                } else {
                    pending.insert(t.id.clone(), t.pending_reason.clone());
                }
                continue;
            }
            _ => continue,
        };
        let cnt = j.counts.unwrap_or_default();
        let total = j.spec.as_ref().map_or(0, |s| s.tasks);
        let waiting = pending
            .values()
            .next()
            .map(|r| format!(" (pending: {r})"))
            .unwrap_or_default();
        let line = format!(
            "{}: {} - {} running, {}/{total} succeeded, {} failed{waiting}",
            j.spec.as_ref().map(|s| s.name.as_str()).unwrap_or(""),
            job_state(j.state),
            cnt.started,
            cnt.succeeded,
            cnt.failed
        );
        if line != last {
            if interactive {
                eprint!("\r\x1b[2K{line}");
            } else {
                eprintln!("{line}");
            }
            let _ = std::io::stderr().flush();
            last = line;
        }
        let state = pb::JobState::try_from(j.state).unwrap_or(pb::JobState::Unspecified);
        if matches!(
            state,
            pb::JobState::Succeeded | pb::JobState::Failed | pb::JobState::Killed
        ) {
            if interactive {
                eprintln!();
            }
            let msg = if j.message.is_empty() {
                String::new()
            } else {
                format!(": {}", j.message)
            };
            println!("{} {}{msg}", j.id, job_state(j.state));
            return if state == pb::JobState::Succeeded {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            };
        }
    }
}

pub async fn task(cmd: TaskCmd, api: &str, fmt: Format) -> ExitCode {
    let mut c = try_exit!(connect(api).await);
    match cmd {
        TaskCmd::Ls { job } => {
            let tasks = rpc!(c.list_tasks(pb::ListTasksRequest {
                job_id: job.unwrap_or_default(),
                states: vec![]
            }))
            .tasks;
            match fmt {
                Format::Table => print_tasks(&tasks),
                f => output::structured(
                    &json!(tasks.iter().map(output::task_json).collect::<Vec<_>>()),
                    f,
                ),
            }
            ExitCode::SUCCESS
        }
        TaskCmd::Kill { task } => {
            let t = rpc!(c.kill_task(pb::KillTaskRequest { task_id: task }))
                .task
                .unwrap_or_default();
            println!("{} {}", t.id, task_state(&t));
            ExitCode::SUCCESS
        }
    }
}

pub async fn node(cmd: NodeCmd, api: &str, fmt: Format) -> ExitCode {
    let mut c = try_exit!(connect(api).await);
    match cmd {
        NodeCmd::Ls => {
            let nodes = rpc!(c.list_nodes(pb::ListNodesRequest {})).nodes;
            match fmt {
                Format::Table => {
                    let rows: Vec<Vec<String>> = nodes.iter().map(output::node_row).collect();
                    table(&["NODE", "STATE", "CPU", "MEMORY", "GPUS", "TASKS", "LAST SEEN"], &rows);
                }
                f => output::structured(
                    &json!(nodes.iter().map(|n| json!({"id": n.id, "row": output::node_row(n), "attributes": n.attributes, "cordoned": n.cordoned})).collect::<Vec<_>>()),
                    f,
                ),
            }
            ExitCode::SUCCESS
        }
        NodeCmd::Cordon { node } => cordon(&mut c, node, true).await,
        NodeCmd::Uncordon { node } => cordon(&mut c, node, false).await,
    }
}

async fn cordon(
    c: &mut pb::job_service_client::JobServiceClient<tonic::transport::Channel>,
    node_id: String,
    cordon: bool,
) -> ExitCode {
    let node = rpc!(c.cordon_node(pb::CordonNodeRequest { node_id, cordon })).node;
    let id = node.map(|n| n.id).unwrap_or_default();
    println!("{id} {}", if cordon { "cordoned" } else { "uncordoned" });
    ExitCode::SUCCESS
}

pub async fn logs(task: &str, follow: bool, api: &str) -> ExitCode {
    let mut c = try_exit!(connect(api).await);
    let mut stream = rpc!(c.task_logs(pb::TaskLogsRequest {
        task_id: task.to_string(),
        follow
    }));
    let mut out = std::io::stdout().lock();
    loop {
        match stream.message().await {
            Ok(Some(chunk)) => {
                if out
                    .write_all(&chunk.data)
                    .and_then(|()| out.flush())
                    .is_err()
                {
                    return ExitCode::SUCCESS;
                }
            }
            Ok(None) => return ExitCode::SUCCESS,
            Err(s) => return status_exit(&s),
        }
    }
}

pub async fn image_import(file: &Path, containerd: &Path, namespace: &str) -> ExitCode {
    let rt = match berth_agent::runtime::Containerd::connect(containerd, namespace).await {
        Ok(rt) => rt,
        Err(e) => return fail(e),
    };
    match rt.import_archive(file).await {
        Ok(names) if names.is_empty() => fail(format!(
            "{}: no named images in the archive",
            file.display()
        )),
        Ok(names) => {
            for n in names {
                println!("imported {n}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}
