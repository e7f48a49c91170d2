//! Output: kubectl-style aligned tables, or JSON/YAML of the API objects.

use berth_model::quantity::{format_cpu_millis, format_mib};
use berth_model::task::TaskState;
use berth_proto as pb;
use serde_json::{Value, json};

/// `-o` choices.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns.
    Table,
    /// JSON.
    Json,
    /// YAML.
    Yaml,
}

/// Prints rows under headers, columns padded to the widest cell plus three spaces.
pub fn table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| {
        let n = cells.len();
        let mut s = String::new();
        for (i, c) in cells.into_iter().enumerate() {
            if i + 1 == n {
                s.push_str(&c);
            } else {
                s.push_str(&format!("{c:<w$}   ", w = widths[i]));
            }
        }
        println!("{}", s.trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r.clone());
    }
}

/// Prints a value as JSON or YAML.
pub fn structured(v: &Value, f: Format) {
    match f {
        Format::Yaml => print!("{}", serde_yaml::to_string(v).unwrap_or_default()),
        _ => println!("{}", serde_json::to_string_pretty(v).unwrap_or_default()),
    }
}

/// "3m" style age from a Unix-ms timestamp.
pub fn age(unix_ms: i64) -> String {
    let secs = ((berth_model::now_unix_ms() - unix_ms) / 1000).max(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

/// A job state's short name.
pub fn job_state(s: i32) -> &'static str {
    match pb::JobState::try_from(s).unwrap_or(pb::JobState::Unspecified) {
        pb::JobState::Active => "Active",
        pb::JobState::KillInitiated => "KillInitiated",
        pb::JobState::Succeeded => "Succeeded",
        pb::JobState::Failed => "Failed",
        pb::JobState::Killed => "Killed",
        pb::JobState::Unspecified => "Unknown",
    }
}

/// A task's state, with its reason when finished.
pub fn task_state(t: &pb::Task) -> String {
    TaskState::from_proto(t.state, t.reason, t.exit_code)
        .map(|s| s.to_string())
        .unwrap_or_else(|| "Unknown".into())
}

/// A task as JSON, with readable enums.
pub fn task_json(t: &pb::Task) -> Value {
    json!({
        "id": t.id,
        "job_id": t.job_id,
        "index": t.index,
        "attempt": t.attempt,
        "state": task_state(t),
        "exit_code": t.exit_code,
        "message": t.message,
        "node": t.node_id,
        "pending_reason": t.pending_reason,
        "usage": t.usage.as_ref().map(|u| json!({"cpu_nanos": u.cpu_nanos, "memory_bytes": u.memory_bytes})),
        "history": t.history.iter().map(|h| json!({
            "state": TaskState::from_proto(h.state, h.reason, 0).map(|s| s.to_string()).unwrap_or_default(),
            "at_unix_ms": h.at_unix_ms,
            "message": h.message,
        })).collect::<Vec<_>>(),
    })
}

/// A job as JSON, with its spec in file form.
pub fn job_json(j: &pb::Job) -> Value {
    let spec = j.spec.as_ref().map(|s| {
        serde_json::to_value(berth_model::spec::JobSpecFile::from_proto(s)).unwrap_or_default()
    });
    let c = j.counts.unwrap_or_default();
    json!({
        "id": j.id,
        "name": j.spec.as_ref().map(|s| s.name.clone()),
        "state": job_state(j.state),
        "message": j.message,
        "created_unix_ms": j.created_unix_ms,
        "counts": {"accepted": c.accepted, "launched": c.launched, "start_initiated": c.start_initiated,
                   "started": c.started, "kill_initiated": c.kill_initiated, "finished": c.finished,
                   "succeeded": c.succeeded, "failed": c.failed},
        "spec": spec,
    })
}

/// Node capacity as `used/total` per dimension.
pub fn node_row(n: &pb::Node) -> Vec<String> {
    let cap = n.capacity.unwrap_or_default();
    let used = n.allocated.unwrap_or_default();
    let state = match pb::NodeState::try_from(n.state).unwrap_or(pb::NodeState::Unspecified) {
        pb::NodeState::Ready => "Ready",
        pb::NodeState::Lost => "Lost",
        pb::NodeState::Draining => "Draining",
        pb::NodeState::Unspecified => "Unknown",
    };
    let state = if n.cordoned {
        format!("{state},Cordoned")
    } else {
        state.to_string()
    };
    vec![
        n.id.clone(),
        state,
        format!(
            "{}/{}",
            format_cpu_millis(used.cpu_millis),
            format_cpu_millis(cap.cpu_millis)
        ),
        format!(
            "{}/{}",
            format_mib(used.memory_mib),
            format_mib(cap.memory_mib)
        ),
        format!("{}/{}", used.gpus, cap.gpus),
        n.tasks.to_string(),
        age(n.last_seen_unix_ms),
    ]
}
