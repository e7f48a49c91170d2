//! Config files for `berth scheduler` and `berth agent`: YAML, unknown keys rejected, every
//! key optional; a flag given on the command line wins over the file.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use berth_model::quantity;
use berth_model::resources::Resources;
use berth_model::spec::Limits;
use serde::Deserialize;

/// `berth scheduler --config`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchedulerFile {
    pub data_dir: Option<PathBuf>,
    pub listen: Option<SocketAddr>,
    pub heartbeat_interval: Option<String>,
    pub heartbeat_timeout: Option<String>,
    pub strategy: Option<String>,
    /// The most one task may ask for.
    pub max_task: Option<MaxTask>,
    /// Capacity groups: quotas and tiers.
    #[serde(default)]
    pub capacity_groups: Vec<GroupFile>,
}

/// One capacity group as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupFile {
    pub name: String,
    /// `critical` or `flex`.
    pub tier: String,
    pub cpu: Option<String>,
    pub memory: Option<String>,
    pub gpus: Option<u32>,
}

/// The groups, every bad field reported with its position.
pub fn capacity_groups(
    groups: &[GroupFile],
) -> Result<Vec<berth_scheduler::quota::CapacityGroup>, Vec<String>> {
    use berth_scheduler::quota::{CapacityGroup, Tier};
    let mut out = Vec::new();
    let mut errors = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (i, g) in groups.iter().enumerate() {
        let at = format!("capacity_groups[{i}]");
        let name_ok = !g.name.is_empty()
            && g.name.len() <= 63
            && g.name.starts_with(|c: char| c.is_ascii_alphanumeric())
            && g.name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !name_ok {
            errors.push(format!("{at}.name: 1-63 letters, digits, `-`, `_`, `.`"));
        } else if !seen.insert(g.name.clone()) {
            errors.push(format!("{at}.name: `{}` is defined twice", g.name));
        }
        let tier = Tier::parse(&g.tier).unwrap_or_else(|| {
            errors.push(format!("{at}.tier: `{}` is not critical or flex", g.tier));
            Tier::Flex
        });
        let cpu = g.cpu.as_deref().and_then(|c| {
            quantity::parse_cpu_millis(c)
                .map_err(|e| errors.push(format!("{at}.cpu: {e}")))
                .ok()
        });
        let memory = g.memory.as_deref().and_then(|m| {
            quantity::parse_mib(m)
                .map_err(|e| errors.push(format!("{at}.memory: {e}")))
                .ok()
        });
        out.push(CapacityGroup {
            name: g.name.clone(),
            tier,
            cpu_millis: cpu,
            memory_mib: memory,
            gpus: g.gpus,
        });
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

/// Per-task maximum resources.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaxTask {
    pub cpu: Option<String>,
    pub memory: Option<String>,
    pub disk: Option<String>,
    pub gpus: Option<u32>,
}

impl MaxTask {
    /// The limits, with defaults for what is unset; every bad field is reported.
    pub fn limits(&self) -> Result<Limits, Vec<String>> {
        let mut limits = Limits::default();
        let mut errors = Vec::new();
        let max: &mut Resources = &mut limits.max_task;
        if let Some(c) = &self.cpu {
            match quantity::parse_cpu_millis(c) {
                Ok(v) => max.cpu_millis = v,
                Err(e) => errors.push(format!("max_task.cpu: {e}")),
            }
        }
        for (field, value, slot) in [
            ("max_task.memory", &self.memory, &mut max.memory_mib),
            ("max_task.disk", &self.disk, &mut max.disk_mib),
        ] {
            if let Some(v) = value {
                match quantity::parse_mib(v) {
                    Ok(v) => *slot = v,
                    Err(e) => errors.push(format!("{field}: {e}")),
                }
            }
        }
        if let Some(g) = self.gpus {
            max.gpus = g;
        }
        if errors.is_empty() {
            Ok(limits)
        } else {
            Err(errors)
        }
    }
}

/// `berth agent --config`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentFile {
    pub node_id: Option<String>,
    pub scheduler: Option<String>,
    pub containerd: Option<PathBuf>,
    pub namespace: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub listen: Option<SocketAddr>,
    pub reserve_cpu: Option<String>,
    pub reserve_memory: Option<String>,
    pub log_retention: Option<String>,
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
}

/// Reads a config file, or the defaults when there is none.
pub fn load<T: for<'de> Deserialize<'de> + Default>(path: Option<&Path>) -> Result<T, String> {
    let Some(path) = path else {
        return Ok(T::default());
    };
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_yaml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}
