//! Job specs: the file users write (YAML or JSON), its conversion to the wire form, and the
//! validation the scheduler applies to every spec it receives.
//!
//! Validation collects every problem, each with the path of the field it concerns
//! (`container.resources.memory: must be > 0`), so one round trip fixes a whole spec.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::image_ref::ImageRef;
use crate::proto as pb;
use crate::quantity::{self, QuantityError};
use crate::resources::{Dimension, Resources};

/// Default SIGTERM-to-SIGKILL delay when a spec gives none.
pub const DEFAULT_KILL_GRACE_MS: u64 = 10_000;

/// The most a kill grace period may be; validation enforces it and agents clamp to it.
pub const MAX_KILL_GRACE_MS: u64 = 600_000;

/// A container's SIGTERM-to-SIGKILL delay in ms: its own, or the default when it gives none.
pub fn kill_grace_ms(container: Option<&pb::Container>) -> u64 {
    container
        .map(|c| c.kill_grace_ms)
        .filter(|&g| g > 0)
        .unwrap_or(DEFAULT_KILL_GRACE_MS)
        .min(MAX_KILL_GRACE_MS)
}

/// A problem with one field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Dotted path of the field, e.g. `container.resources.cpu`.
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

/// Every problem found in a spec.
#[derive(Debug, Clone, Default, PartialEq, Eq, thiserror::Error)]
pub struct ValidationErrors(pub Vec<FieldError>);

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{}: {}", e.field, e.reason)?;
        }
        Ok(())
    }
}

impl ValidationErrors {
    fn push(&mut self, field: impl Into<String>, reason: impl fmt::Display) {
        self.0.push(FieldError {
            field: field.into(),
            reason: reason.to_string(),
        });
    }

    fn into_result(self) -> Result<(), ValidationErrors> {
        if self.0.is_empty() { Ok(()) } else { Err(self) }
    }
}

/// Why a spec file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// Not YAML/JSON of the right shape (unknown field, wrong type, ...).
    #[error("{0}")]
    Parse(String),
    /// Well-formed, but some fields are invalid.
    #[error("{0}")]
    Invalid(#[from] ValidationErrors),
}

/// Scheduler-wide limits that specs are checked against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// The most one task may ask for.
    pub max_task: Resources,
    /// Most tasks in one job.
    pub max_tasks: u32,
    /// Most bytes of env keys and values together.
    pub max_env_bytes: usize,
    /// Most labels on a job or container.
    pub max_labels: usize,
    /// Most command + args entries.
    pub max_args: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_task: Resources {
                cpu_millis: 256_000,
                memory_mib: 4 << 20,
                disk_mib: 16 << 20,
                gpus: 16,
                network_mbps: 100_000,
            },
            max_tasks: 10_000,
            max_env_bytes: 128 << 10,
            max_labels: 64,
            max_args: 1024,
        }
    }
}

/// `batch` or `service`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobTypeFile {
    /// Run to completion.
    Batch,
    /// Keep running.
    Service,
}

/// A quantity as written: `500m`, `"64Mi"`, `0.5` or `2`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum QuantityText {
    /// `500m`, `64Mi`.
    Text(String),
    /// `2`.
    Int(i64),
    /// `0.5`.
    Float(f64),
}

impl QuantityText {
    fn as_text(&self) -> String {
        match self {
            QuantityText::Text(s) => s.clone(),
            QuantityText::Int(i) => i.to_string(),
            QuantityText::Float(f) => format!("{f}"),
        }
    }
}

/// The job spec as users write it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpecFile {
    /// Unique among active jobs.
    pub name: String,
    /// `batch` or `service`.
    #[serde(rename = "type")]
    pub job_type: JobTypeFile,
    /// Batch: how many tasks; service: desired count. Defaults to 1.
    #[serde(default = "default_tasks")]
    pub tasks: u32,
    /// What each task runs.
    pub container: ContainerFile,
    /// Batch retry policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryFile>,
    /// Batch: kill a task that runs longer than this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_limit: Option<String>,
    /// Free-form labels, used to filter jobs.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Placement constraints (see [`crate::constraint`]).
    #[serde(default, skip_serializing_if = "ConstraintsFile::is_empty")]
    pub constraints: ConstraintsFile,
    /// `binpack` or `spread`; the scheduler's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy: Option<String>,
    /// The capacity group whose quota the job's tasks count against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity_group: Option<String>,
}

/// Constraint lines as written.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConstraintsFile {
    /// Nodes failing any of these are not used.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hard: Vec<String>,
    /// Nodes failing these are used last.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub soft: Vec<String>,
}

impl ConstraintsFile {
    fn is_empty(&self) -> bool {
        self.hard.is_empty() && self.soft.is_empty()
    }
}

/// The placement strategies a job may name.
pub const STRATEGIES: [&str; 2] = ["binpack", "spread"];

fn default_tasks() -> u32 {
    1
}

/// The container part of a spec file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerFile {
    /// Image reference.
    pub image: String,
    /// Entrypoint override.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// Cmd override.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Extra environment.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Absolute working directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    /// Container labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// What one task needs.
    pub resources: ResourcesFile,
    /// SIGTERM-to-SIGKILL delay (`10s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kill_grace: Option<String>,
}

/// Resources as written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourcesFile {
    /// CPU (`500m`, `0.5`, `2`).
    pub cpu: QuantityText,
    /// Memory (`64Mi`, `1Gi`).
    pub memory: QuantityText,
    /// Scratch disk (`100Mi`); none by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<QuantityText>,
    /// Whole GPUs.
    #[serde(default)]
    pub gpus: i64,
    /// Network bandwidth.
    #[serde(default)]
    pub network_mbps: i64,
}

/// Retry policy as written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryFile {
    /// Retries after the first attempt.
    #[serde(default)]
    pub max_retries: i64,
    /// First retry delay (`1s`), doubled each attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<String>,
}

impl JobSpecFile {
    /// Reads a spec from YAML or JSON (JSON is YAML).
    pub fn parse(text: &str) -> Result<JobSpecFile, SpecError> {
        serde_yaml::from_str(text).map_err(|e| SpecError::Parse(e.to_string()))
    }

    /// Converts to the wire form, checking quantities and durations on the way.
    pub fn to_proto(&self) -> Result<pb::JobSpec, ValidationErrors> {
        let (spec, errs) = self.to_proto_lossy();
        errs.into_result().map(|()| spec)
    }

    /// The wire form with zero for every unreadable quantity, and the errors for those.
    fn to_proto_lossy(&self) -> (pb::JobSpec, ValidationErrors) {
        let mut errs = ValidationErrors::default();
        let c = &self.container;
        let r = &c.resources;
        let mut cpu = 0;
        match quantity::parse_cpu_millis(&r.cpu.as_text()) {
            Ok(v) => cpu = v,
            Err(e) => errs.push("container.resources.cpu", e),
        }
        let mib = |field: &str, q: &QuantityText, errs: &mut ValidationErrors| {
            quantity::parse_mib(&q.as_text())
                .map_err(|e| errs.push(field.to_string(), e))
                .unwrap_or(0)
        };
        let memory = mib("container.resources.memory", &r.memory, &mut errs);
        let disk = r
            .disk
            .as_ref()
            .map_or(0, |d| mib("container.resources.disk", d, &mut errs));
        let count = |field: &str, v: i64, errs: &mut ValidationErrors| -> u32 {
            match u32::try_from(v) {
                Ok(v) => v,
                Err(_) if v < 0 => {
                    errs.push(field.to_string(), QuantityError::Negative);
                    0
                }
                Err(_) => {
                    errs.push(field.to_string(), QuantityError::TooLarge(v.to_string()));
                    0
                }
            }
        };
        let gpus = count("container.resources.gpus", r.gpus, &mut errs);
        let network_mbps = count(
            "container.resources.network_mbps",
            r.network_mbps,
            &mut errs,
        );
        let dur = |field: &str, s: &Option<String>, errs: &mut ValidationErrors| -> u64 {
            s.as_deref()
                .map_or(0, |s| match quantity::parse_duration(s) {
                    Ok(d) => u64::try_from(d.as_millis()).unwrap_or(u64::MAX),
                    Err(e) => {
                        errs.push(field.to_string(), e);
                        0
                    }
                })
        };
        let kill_grace_ms = dur("container.kill_grace", &c.kill_grace, &mut errs);
        let runtime_limit_ms = dur("runtime_limit", &self.runtime_limit, &mut errs);
        let retry = self.retry.as_ref().map(|r| pb::RetryPolicy {
            max_retries: count("retry.max_retries", r.max_retries, &mut errs),
            backoff_ms: dur("retry.backoff", &r.backoff, &mut errs),
        });
        let spec = pb::JobSpec {
            name: self.name.clone(),
            r#type: match self.job_type {
                JobTypeFile::Batch => pb::JobType::Batch,
                JobTypeFile::Service => pb::JobType::Service,
            } as i32,
            tasks: self.tasks,
            container: Some(pb::Container {
                image: c.image.clone(),
                command: c.command.clone(),
                args: c.args.clone(),
                env: c.env.clone().into_iter().collect(),
                working_dir: c.working_dir.clone().unwrap_or_default(),
                labels: c.labels.clone().into_iter().collect(),
                resources: Some(pb::Resources {
                    cpu_millis: cpu,
                    memory_mib: memory,
                    disk_mib: disk,
                    gpus,
                    network_mbps,
                }),
                kill_grace_ms,
            }),
            retry,
            runtime_limit_ms,
            labels: self.labels.clone().into_iter().collect(),
            constraints: (!self.constraints.is_empty()).then(|| pb::Constraints {
                hard: self.constraints.hard.clone(),
                soft: self.constraints.soft.clone(),
            }),
            strategy: self.strategy.clone().unwrap_or_default(),
            capacity_group: self.capacity_group.clone().unwrap_or_default(),
        };
        (spec, errs)
    }

    /// The file form of a wire spec (for `berth job get -o yaml`).
    pub fn from_proto(spec: &pb::JobSpec) -> JobSpecFile {
        let c = spec.container.clone().unwrap_or_default();
        let r = c.resources.unwrap_or_default();
        let ms = |ms: u64| (ms > 0).then(|| quantity::format_duration_ms(ms));
        JobSpecFile {
            name: spec.name.clone(),
            job_type: if spec.r#type == pb::JobType::Service as i32 {
                JobTypeFile::Service
            } else {
                JobTypeFile::Batch
            },
            tasks: spec.tasks,
            container: ContainerFile {
                image: c.image,
                command: c.command,
                args: c.args,
                env: c.env.into_iter().collect(),
                working_dir: (!c.working_dir.is_empty()).then_some(c.working_dir),
                labels: c.labels.into_iter().collect(),
                resources: ResourcesFile {
                    cpu: QuantityText::Text(quantity::format_cpu_millis(r.cpu_millis)),
                    memory: QuantityText::Text(quantity::format_mib(r.memory_mib)),
                    disk: (r.disk_mib > 0)
                        .then(|| QuantityText::Text(quantity::format_mib(r.disk_mib))),
                    gpus: i64::from(r.gpus),
                    network_mbps: i64::from(r.network_mbps),
                },
                kill_grace: ms(c.kill_grace_ms),
            },
            retry: spec.retry.as_ref().map(|r| RetryFile {
                max_retries: i64::from(r.max_retries),
                backoff: ms(r.backoff_ms),
            }),
            runtime_limit: ms(spec.runtime_limit_ms),
            labels: spec.labels.clone().into_iter().collect(),
            constraints: spec
                .constraints
                .as_ref()
                .map(|c| ConstraintsFile {
                    hard: c.hard.clone(),
                    soft: c.soft.clone(),
                })
                .unwrap_or_default(),
            strategy: (!spec.strategy.is_empty()).then(|| spec.strategy.clone()),
            capacity_group: (!spec.capacity_group.is_empty()).then(|| spec.capacity_group.clone()),
        }
    }
}

/// Reads a spec file and checks it completely, as the scheduler would with default limits.
pub fn parse_and_validate(text: &str) -> Result<pb::JobSpec, SpecError> {
    let file = JobSpecFile::parse(text)?;
    let (spec, mut errs) = file.to_proto_lossy();
    if let Err(more) = validate(&spec, &Limits::default()) {
        // A quantity that did not parse is zero in `spec`; report it once, as unparsable.
        for e in more.0 {
            if !errs.0.iter().any(|seen| seen.field == e.field) {
                errs.0.push(e);
            }
        }
    }
    errs.into_result()?;
    Ok(spec)
}

fn is_name(s: &str) -> bool {
    s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn is_env_key(s: &str) -> bool {
    s.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn check_labels(
    field: &str,
    labels: &HashMap<String, String>,
    limits: &Limits,
    errs: &mut ValidationErrors,
) {
    if labels.len() > limits.max_labels {
        errs.push(field, format!("at most {} labels", limits.max_labels));
    }
    let mut keys: Vec<&String> = labels.keys().collect();
    keys.sort();
    for k in keys {
        if k.is_empty() || k.len() > 63 || !is_name(k) && !k.contains('/') {
            errs.push(
                format!("{field}.{k}"),
                "keys are 1-63 characters: letters, digits, `-`, `_`, `.`, `/`",
            );
        }
        if labels[k].len() > 256 {
            errs.push(format!("{field}.{k}"), "values are at most 256 bytes");
        }
    }
}

/// Checks a wire spec completely; every problem is reported.
pub fn validate(spec: &pb::JobSpec, limits: &Limits) -> Result<(), ValidationErrors> {
    let mut errs = ValidationErrors::default();
    if spec.name.is_empty() {
        errs.push("name", "must not be empty");
    } else if spec.name.len() > 63 || !is_name(&spec.name) {
        errs.push(
            "name",
            "1-63 characters: letters, digits, `-`, `_`, `.`, starting with a letter or digit",
        );
    }
    let job_type = pb::JobType::try_from(spec.r#type).unwrap_or(pb::JobType::Unspecified);
    match job_type {
        pb::JobType::Unspecified => errs.push("type", "must be batch or service"),
        pb::JobType::Batch if spec.tasks == 0 => {
            errs.push("tasks", "a batch job needs at least 1 task")
        }
        _ => {}
    }
    if spec.tasks > limits.max_tasks {
        errs.push("tasks", format!("at most {}", limits.max_tasks));
    }
    if job_type == pb::JobType::Service && spec.runtime_limit_ms > 0 {
        errs.push("runtime_limit", "only batch jobs have a runtime limit");
    }
    check_labels("labels", &spec.labels, limits, &mut errs);
    if let Some(c) = &spec.constraints
        && let Err(bad) = crate::constraint::Constraints::parse(c)
    {
        for (field, reason) in bad {
            errs.push(field, reason);
        }
    }
    if !spec.capacity_group.is_empty()
        && (spec.capacity_group.len() > 63 || !is_name(&spec.capacity_group))
    {
        errs.push(
            "capacity_group",
            "1-63 characters: letters, digits, `-`, `_`, `.`, starting with a letter or digit",
        );
    }
    if !spec.strategy.is_empty() && !STRATEGIES.contains(&spec.strategy.as_str()) {
        errs.push("strategy", "must be binpack or spread");
    }
    if let Some(retry) = &spec.retry {
        if retry.max_retries > 1000 {
            errs.push("retry.max_retries", "at most 1000");
        }
        if retry.backoff_ms > 3_600_000 {
            errs.push("retry.backoff", "at most 1h");
        }
    }
    match &spec.container {
        None => errs.push("container", "is required"),
        Some(c) => {
            if let Err(reason) = ImageRef::parse(&c.image) {
                errs.push("container.image", reason);
            }
            if c.command.len() + c.args.len() > limits.max_args {
                errs.push(
                    "container.command",
                    format!("command and args have at most {} entries", limits.max_args),
                );
            }
            for (i, a) in c.command.iter().chain(&c.args).enumerate() {
                if a.contains('\0') {
                    errs.push(format!("container.command[{i}]"), "must not contain NUL");
                }
            }
            let mut env_bytes = 0;
            let mut keys: Vec<&String> = c.env.keys().collect();
            keys.sort();
            for k in keys {
                env_bytes += k.len() + c.env[k].len();
                if !is_env_key(k) {
                    errs.push(
                        format!("container.env.{k}"),
                        "names are letters, digits and `_`, not starting with a digit",
                    );
                } else if k.starts_with("BERTH_") {
                    errs.push(
                        format!("container.env.{k}"),
                        "BERTH_ variables are set by Berth",
                    );
                }
                if c.env[k].contains('\0') {
                    errs.push(format!("container.env.{k}"), "must not contain NUL");
                }
            }
            if env_bytes > limits.max_env_bytes {
                errs.push(
                    "container.env",
                    format!("at most {} bytes in all", limits.max_env_bytes),
                );
            }
            if !c.working_dir.is_empty() && !c.working_dir.starts_with('/') {
                errs.push("container.working_dir", "must be an absolute path");
            }
            check_labels("container.labels", &c.labels, limits, &mut errs);
            if c.kill_grace_ms > MAX_KILL_GRACE_MS {
                errs.push("container.kill_grace", "at most 10m");
            }
            match &c.resources {
                None => errs.push("container.resources", "is required"),
                Some(r) => {
                    let r = Resources::from(r);
                    for d in [Dimension::Cpu, Dimension::Memory] {
                        if r.get(d) == 0 {
                            errs.push(format!("container.resources.{}", d.name()), "must be > 0");
                        }
                    }
                    for d in Dimension::ALL {
                        let max = limits.max_task.get(d);
                        if r.get(d) > max {
                            errs.push(
                                format!("container.resources.{}", d.name()),
                                format!(
                                    "{} is over the per-task maximum of {}",
                                    Resources::format(d, r.get(d)),
                                    Resources::format(d, max)
                                ),
                            );
                        }
                    }
                }
            }
        }
    }
    errs.into_result()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const HELLO: &str = r#"
name: hello
type: batch
tasks: 3
container:
  image: docker.io/library/busybox:local
  command: ["sh", "-c", "echo hello from $BERTH_TASK_ID"]
  env: {GREETING: hi}
  resources: {cpu: 500m, memory: 64Mi, disk: 100Mi, gpus: 0, network_mbps: 0}
  kill_grace: 10s
retry: {max_retries: 2, backoff: 1s}
labels: {team: demo}
"#;

    #[test]
    fn hello_parses() {
        let spec = parse_and_validate(HELLO).expect("valid");
        assert_eq!(spec.tasks, 3);
        let c = spec.container.expect("container");
        let r = c.resources.expect("resources");
        assert_eq!((r.cpu_millis, r.memory_mib, r.disk_mib), (500, 64, 100));
        assert_eq!(c.kill_grace_ms, 10_000);
        assert_eq!(
            spec.retry.map(|r| (r.max_retries, r.backoff_ms)),
            Some((2, 1000))
        );
    }

    #[test]
    fn json_parses_too() {
        let json = r#"{"name":"j","type":"service","tasks":2,"container":{"image":"busybox","resources":{"cpu":0.5,"memory":"1Gi"}}}"#;
        let spec = parse_and_validate(json).expect("valid");
        let r = spec.container.and_then(|c| c.resources).expect("resources");
        assert_eq!((r.cpu_millis, r.memory_mib), (500, 1024));
    }

    #[test]
    fn unknown_field_is_named() {
        let err = parse_and_validate(&HELLO.replace("kill_grace", "kill_grase")).unwrap_err();
        assert!(err.to_string().contains("kill_grase"), "{err}");
    }

    #[test]
    fn all_problems_at_once() {
        let bad = HELLO
            .replace("cpu: 500m", "cpu: -1")
            .replace("memory: 64Mi", "memory: 0")
            .replace("docker.io/library/busybox:local", "Bad Image")
            .replace("10s", "ten seconds");
        let err = parse_and_validate(&bad).unwrap_err().to_string();
        for field in [
            "container.resources.cpu: must not be negative",
            "container.resources.memory: must be > 0",
            "container.image:",
            "container.kill_grace:",
        ] {
            assert!(err.contains(field), "missing {field:?} in {err}");
        }
    }

    #[test]
    fn over_the_limit_names_the_maximum() {
        let bad = HELLO.replace("memory: 64Mi", "memory: 8Pi");
        let err = parse_and_validate(&bad).unwrap_err().to_string();
        assert!(
            err.contains(
                "container.resources.memory: 8388608Gi is over the per-task maximum of 4096Gi"
            ),
            "{err}"
        );
    }

    #[test]
    fn reserved_env_and_bad_names() {
        let bad = HELLO
            .replace("GREETING: hi", "BERTH_TASK_ID: x, 1X: y")
            .replace("name: hello", "name: -x");
        let err = parse_and_validate(&bad).unwrap_err().to_string();
        assert!(err.contains("container.env.BERTH_TASK_ID"), "{err}");
        assert!(err.contains("container.env.1X"), "{err}");
        assert!(err.contains("name:"), "{err}");
    }

    fn arb_spec() -> impl Strategy<Value = JobSpecFile> {
        (
            "[a-z][a-z0-9-]{0,20}",
            prop_oneof![Just(JobTypeFile::Batch), Just(JobTypeFile::Service)],
            0u32..20,
            prop_oneof![
                Just("busybox"),
                Just("docker.io/library/busybox:local"),
                Just("Bad!"),
                Just("")
            ],
            0u32..4000,
            0u64..4096,
            proptest::collection::btree_map("[A-Z_]{1,8}", "[ -~]{0,16}", 0..4),
            proptest::option::of(0i64..5),
            proptest::collection::vec(proptest::sample::select(&CONSTRAINT_LINES[..]), 0..3),
            proptest::option::of(proptest::sample::select(&["binpack", "spread", "fast"][..])),
        )
            .prop_map(
                |(name, job_type, tasks, image, cpu, mem, env, retries, lines, strategy)| {
                    JobSpecFile {
                        name,
                        job_type,
                        tasks,
                        container: ContainerFile {
                            image: image.to_string(),
                            command: vec!["sh".into(), "-c".into(), ":".into()],
                            args: vec![],
                            env,
                            working_dir: None,
                            labels: BTreeMap::new(),
                            resources: ResourcesFile {
                                cpu: QuantityText::Text(format!("{cpu}m")),
                                memory: QuantityText::Text(format!("{mem}Mi")),
                                disk: None,
                                gpus: 0,
                                network_mbps: 0,
                            },
                            kill_grace: None,
                        },
                        retry: retries.map(|r| RetryFile {
                            max_retries: r,
                            backoff: Some("1s".into()),
                        }),
                        runtime_limit: None,
                        labels: BTreeMap::new(),
                        constraints: ConstraintsFile {
                            soft: lines.iter().skip(1).map(|l| l.to_string()).collect(),
                            hard: lines.into_iter().take(1).map(str::to_string).collect(),
                        },
                        strategy: strategy.map(str::to_string),
                        capacity_group: None,
                    }
                },
            )
    }

    /// Constraint lines for generated specs; the last two are invalid.
    const CONSTRAINT_LINES: [&str; 6] = [
        "unique_host",
        "zone_balance",
        "zone in [a, b]",
        "instance_type =~ ^m5",
        "zone >> a",
        "rack in a",
    ];

    fn expected_valid(f: &JobSpecFile) -> bool {
        let image_ok = matches!(
            f.container.image.as_str(),
            "busybox" | "docker.io/library/busybox:local"
        );
        let env_ok = f.container.env.keys().all(|k| !k.starts_with("BERTH_"));
        let cpu = matches!(&f.container.resources.cpu, QuantityText::Text(t) if t != "0m");
        let mem = matches!(&f.container.resources.memory, QuantityText::Text(t) if t != "0Mi");
        let tasks = f.job_type == JobTypeFile::Service || f.tasks > 0;
        let constraints_ok = f
            .constraints
            .hard
            .iter()
            .chain(&f.constraints.soft)
            .all(|l| CONSTRAINT_LINES[..4].contains(&l.as_str()));
        let strategy_ok = f.strategy.as_deref() != Some("fast");
        image_ok && env_ok && cpu && mem && tasks && constraints_ok && strategy_ok
    }

    proptest! {
        #[test]
        fn yaml_json_proto_round_trip_and_validation(f in arb_spec()) {
            let yaml = serde_yaml::to_string(&f).expect("yaml");
            let json = serde_json::to_string(&f).expect("json");
            let from_yaml = JobSpecFile::parse(&yaml).expect("own yaml parses");
            let from_json = JobSpecFile::parse(&json).expect("own json parses");
            prop_assert_eq!(&from_yaml, &f);
            prop_assert_eq!(&from_json, &f);
            let proto = f.to_proto().expect("quantities are well-formed");
            let back = JobSpecFile::from_proto(&proto).to_proto().expect("round trip");
            prop_assert_eq!(&back, &proto);
            prop_assert_eq!(validate(&proto, &Limits::default()).is_ok(), expected_valid(&f));
        }

        #[test]
        fn parser_never_panics(s in "\\PC{0,200}") {
            let _ = parse_and_validate(&s);
        }
    }
}
