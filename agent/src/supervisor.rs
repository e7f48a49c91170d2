//! One supervisor per task: prepares the image, creates and starts the container, watches it
//! until it exits (or is killed), cleans up, and reports each step to the agent core.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use berth_model::now_unix_ms;
use berth_model::resources::Resources;
use berth_model::task::{FinishReason, TaskState};
use berth_proto as pb;
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};
use tracing::{info, instrument, warn};

use crate::logs::task_dir;
use crate::oci::{self, ProcessSpec};
use crate::runtime::{Containerd, LABEL_JOB, LABEL_TASK, RuntimeError, TaskStatus};
use crate::store::AgentStore;

const POLL: Duration = Duration::from_secs(2);
const SIGTERM: u32 = 15;
const SIGKILL: u32 = 9;

/// What the core tells a supervisor.
#[derive(Debug)]
pub enum Signal {
    /// containerd reported the task's exit.
    Exited(u32),
    /// containerd reported an OOM kill in the task's cgroup.
    Oom,
    /// Stop the task: SIGTERM, then SIGKILL after the grace period.
    Kill(Duration),
}

/// What a supervisor tells the core.
#[derive(Debug)]
pub enum Report {
    /// A new state for the task.
    Status(pb::TaskStatus),
    /// The supervisor ended; the task needs nothing more.
    Done(String),
}

/// Shared by all supervisors of one agent.
pub struct Context {
    /// containerd in the agent's namespace.
    pub rt: Containerd,
    /// The agent's data dir.
    pub data_dir: PathBuf,
    /// The agent's containerd namespace, part of each cgroup path.
    pub namespace: String,
    /// Where reports go.
    pub reports: mpsc::Sender<Report>,
    /// The agent's durable task records.
    pub store: AgentStore,
}

impl Context {
    /// The cgroup path of a task.
    pub fn cgroup(&self, task_id: &str) -> PathBuf {
        PathBuf::from(format!("/berth/{}/{task_id}", self.namespace))
    }

    async fn report(&self, id: &str, state: TaskState, message: impl Into<String>) {
        let s = task_status(id, state, message);
        self.persist(&s).await;
        self.send(s).await;
    }

    /// Writes a status to the agent's store before anyone hears of it.
    pub async fn persist(&self, s: &pb::TaskStatus) {
        if let Err(e) = self.store.set_status(s.clone()).await {
            warn!(task_id = %s.task_id, error = %e, "Cannot record a task status.");
        }
    }

    async fn send(&self, s: pb::TaskStatus) {
        let _ = self.reports.send(Report::Status(s)).await;
    }
}

/// A status report for `id`, stamped now.
pub fn task_status(id: &str, state: TaskState, message: impl Into<String>) -> pb::TaskStatus {
    let (st, reason, exit_code) = state.to_proto();
    pb::TaskStatus {
        task_id: id.to_string(),
        state: st as i32,
        reason: reason as i32,
        exit_code,
        message: message.into(),
        at_unix_ms: now_unix_ms(),
    }
}

fn image_error(e: &RuntimeError) -> FinishReason {
    match e {
        RuntimeError::ImageNotFound(_)
        | RuntimeError::BadImage { .. }
        | RuntimeError::Pull { .. } => FinishReason::ImageError,
        _ => FinishReason::LocalSystemError,
    }
}

/// argv from the spec's command/args and the image's entrypoint/cmd, as Docker combines them.
fn argv(c: &pb::Container, entrypoint: &[String], cmd: &[String]) -> Vec<String> {
    if !c.command.is_empty() {
        return c.command.iter().chain(&c.args).cloned().collect();
    }
    let tail = if c.args.is_empty() { cmd } else { &c.args };
    entrypoint.iter().chain(tail).cloned().collect()
}

/// Runs a newly assigned task from start to finish.
#[instrument(skip_all, fields(task_id = %a.task_id))]
pub async fn run_new(
    ctx: Arc<Context>,
    a: pb::TaskAssignment,
    mut signals: mpsc::Receiver<Signal>,
) {
    let id = a.task_id.clone();
    ctx.report(&id, TaskState::StartInitiated, "").await;
    match start(&ctx, &a).await {
        Ok(pid) => {
            info!(pid, "Task started.");
            ctx.report(&id, TaskState::Started, "").await;
            watch(&ctx, &a, &mut signals).await;
        }
        Err((reason, message)) => {
            warn!(%reason, message, "Task could not start.");
            if let Err(e) = ctx.rt.remove(&id).await {
                warn!(error = %e, "Cleanup after a failed start failed.");
            }
            finish(&ctx, &id, reason, message).await;
        }
    }
    let _ = ctx.reports.send(Report::Done(id)).await;
}

/// Takes over a task that was running before the agent restarted.
#[instrument(skip_all, fields(task_id = %a.task_id))]
pub async fn run_attached(
    ctx: Arc<Context>,
    a: pb::TaskAssignment,
    mut signals: mpsc::Receiver<Signal>,
) {
    let id = a.task_id.clone();
    watch(&ctx, &a, &mut signals).await;
    let _ = ctx.reports.send(Report::Done(id)).await;
}

async fn start(ctx: &Context, a: &pb::TaskAssignment) -> Result<u32, (FinishReason, String)> {
    let c = a.container.clone().unwrap_or_default();
    let image = ctx
        .rt
        .resolve_image(&c.image)
        .await
        .map_err(|e| (image_error(&e), e.to_string()))?;
    let args = argv(&c, &image.entrypoint, &image.cmd);
    if args.is_empty() {
        return Err((
            FinishReason::InvalidRequest,
            "no command: the spec and the image give none".into(),
        ));
    }
    let mut env: Vec<String> = image.env.clone();
    let mut extra: Vec<(String, String)> = c.env.clone().into_iter().collect();
    extra.sort();
    extra.push(("BERTH_TASK_ID".into(), a.task_id.clone()));
    extra.push(("BERTH_JOB_ID".into(), a.job_id.clone()));
    extra.push(("BERTH_TASK_INDEX".into(), a.index.to_string()));
    for (k, v) in extra {
        env.retain(|e| e.split_once('=').map(|(ek, _)| ek) != Some(k.as_str()));
        env.push(format!("{k}={v}"));
    }
    let cwd = if c.working_dir.is_empty() {
        image.working_dir.clone()
    } else {
        c.working_dir.clone()
    };
    let spec = oci::build(&ProcessSpec {
        args,
        env,
        cwd,
        hostname: a.task_id.chars().take(63).collect(),
        resources: c
            .resources
            .as_ref()
            .map(Resources::from)
            .unwrap_or_default(),
        cgroups_path: ctx.cgroup(&a.task_id),
    })
    .map_err(|e| (FinishReason::InvalidRequest, e.to_string()))?;
    let dir = task_dir(&ctx.data_dir, &a.task_id);
    let local = |e: std::io::Error| {
        (
            FinishReason::LocalSystemError,
            format!("{}: {e}", dir.display()),
        )
    };
    tokio::fs::create_dir_all(&dir).await.map_err(local)?;
    let mut labels = HashMap::new();
    labels.insert(LABEL_TASK.to_string(), a.task_id.clone());
    labels.insert(LABEL_JOB.to_string(), a.job_id.clone());
    ctx.rt
        .create_and_start(&a.task_id, &image, &spec, labels, &dir.join("output.log"))
        .await
        .map_err(|e| (FinishReason::LocalSystemError, e.to_string()))
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400 * 365)
}

/// Waits for the task to end, enforcing kills and the runtime limit, then cleans up.
async fn watch(ctx: &Context, a: &pb::TaskAssignment, signals: &mut mpsc::Receiver<Signal>) {
    let id = a.task_id.as_str();
    let default_grace = berth_model::spec::kill_grace_ms(a.container.as_ref());
    let mut oom = false;
    let mut killed = false;
    let mut limit_hit = false;
    let mut kill_deadline: Option<Instant> = None;
    let mut runtime_deadline = (a.runtime_limit_ms > 0)
        .then(|| Instant::now() + Duration::from_millis(a.runtime_limit_ms));
    let mut poll = tokio::time::interval(POLL);
    let exit = loop {
        tokio::select! {
            s = signals.recv() => match s {
                Some(Signal::Exited(code)) => break Some(code),
                Some(Signal::Oom) => oom = true,
                Some(Signal::Kill(grace)) => {
                    if !killed {
                        killed = true;
                        info!(grace_ms = grace.as_millis() as u64, "Killing task.");
                        if let Err(e) = ctx.rt.kill(id, SIGTERM).await {
                            warn!(error = %e, "SIGTERM failed.");
                        }
                        kill_deadline = Some(Instant::now() + grace);
                    }
                }
                // The agent is shutting down: leave the task running.
                None => return,
            },
            _ = sleep_until(kill_deadline.unwrap_or_else(far_future)), if kill_deadline.is_some() => {
                if let Err(e) = ctx.rt.kill(id, SIGKILL).await {
                    warn!(error = %e, "SIGKILL failed.");
                }
                kill_deadline = None;
            }
            _ = sleep_until(runtime_deadline.unwrap_or_else(far_future)), if runtime_deadline.is_some() => {
                runtime_deadline = None;
                if !killed {
                    info!("Runtime limit reached; killing task.");
                    limit_hit = true;
                    killed = true;
                    let _ = ctx.rt.kill(id, SIGTERM).await;
                    kill_deadline = Some(Instant::now() + Duration::from_millis(default_grace));
                }
            }
            _ = poll.tick() => match ctx.rt.status(id).await {
                Ok(TaskStatus::Stopped(code)) => break Some(code),
                Ok(TaskStatus::Missing) => break None,
                Ok(_) => {}
                Err(e) => warn!(error = %e, "Cannot poll task status."),
            },
        }
    };
    // The cgroup, still there until the task is deleted, counts OOM kills even when
    // containerd's event was missed.
    if !oom && crate::usage::oom_kills(&ctx.cgroup(id)) > 0 {
        oom = true;
    }
    // An OOM kill is reported just before the exit; give a late notice a moment.
    if !oom && exit == Some(137) {
        let until = Instant::now() + Duration::from_millis(300);
        while let Ok(Some(s)) = tokio::time::timeout_at(until, signals.recv()).await {
            if matches!(s, Signal::Oom) {
                oom = true;
            }
        }
    }
    // With an exit status in hand, the outcome is recorded before the container (and with it
    // containerd's copy of the status) goes, so that an agent killed in between still knows it.
    let deleted = if exit.is_none() {
        remove(ctx, id).await
    } else {
        None
    };
    let code = exit.or(deleted);
    let reason = if oom {
        FinishReason::OomKilled
    } else if limit_hit {
        FinishReason::RuntimeLimitExceeded
    } else if killed {
        FinishReason::Killed
    } else {
        match code {
            Some(c) => FinishReason::from_exit_code(i32::try_from(c).unwrap_or(i32::MAX)),
            None => FinishReason::LocalSystemError,
        }
    };
    let message = match code {
        Some(c) => format!("exit status {c}"),
        None => "the container's task vanished".to_string(),
    };
    let status = finished(ctx, id, reason, message).await;
    if exit.is_some() {
        remove(ctx, id).await;
    }
    ctx.send(status).await;
    mark_exit(ctx, id, reason).await;
}

/// Deletes the task and its container; returns the exit status containerd reported.
async fn remove(ctx: &Context, id: &str) -> Option<u32> {
    match ctx.rt.remove(id).await {
        Ok(code) => code,
        Err(e) => {
            warn!(error = %e, "Cleanup failed; the task's container may linger.");
            None
        }
    }
}

/// Records a task's end in the store and returns the status to report.
async fn finished(
    ctx: &Context,
    id: &str,
    reason: FinishReason,
    message: String,
) -> pb::TaskStatus {
    info!(task_id = id, %reason, message, "Task finished.");
    let s = task_status(id, TaskState::Finished(reason), message);
    ctx.persist(&s).await;
    s
}

/// Writes the `exit` marker, which ends `logs -f` and dates the task's files for expiry;
/// last, so that followers end after the scheduler has been told.
async fn mark_exit(ctx: &Context, id: &str, reason: FinishReason) {
    let dir = task_dir(&ctx.data_dir, id);
    if tokio::fs::create_dir_all(&dir).await.is_ok() {
        let _ = tokio::fs::write(dir.join("exit"), reason.to_string()).await;
    }
}

async fn finish(ctx: &Context, id: &str, reason: FinishReason, message: String) {
    let s = finished(ctx, id, reason, message).await;
    ctx.send(s).await;
    mark_exit(ctx, id, reason).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(command: &[&str], args: &[&str]) -> pb::Container {
        pb::Container {
            command: command.iter().map(|s| s.to_string()).collect(),
            args: args.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn argv_follows_docker_rules() {
        let ep = vec!["/entry".to_string()];
        let cmd = vec!["default".to_string()];
        assert_eq!(
            argv(&c(&["sh"], &["-c", ":"]), &ep, &cmd),
            ["sh", "-c", ":"]
        );
        assert_eq!(argv(&c(&[], &["x"]), &ep, &cmd), ["/entry", "x"]);
        assert_eq!(argv(&c(&[], &[]), &ep, &cmd), ["/entry", "default"]);
        assert!(argv(&c(&[], &[]), &[], &[]).is_empty());
    }
}
