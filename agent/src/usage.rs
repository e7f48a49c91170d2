//! Per-task CPU and memory usage, and OOM kills, read from the task's cgroup with cgroups-rs.

use std::path::Path;

use berth_proto as pb;
use cgroups_rs::fs::cpu::CpuController;
use cgroups_rs::fs::cpuacct::CpuAcctController;
use cgroups_rs::fs::memory::MemController;
use cgroups_rs::fs::{Cgroup, hierarchies};

/// Usage of the cgroup at `path` (relative to the hierarchy roots); zeros if it is gone.
pub fn read(path: &Path) -> pb::Usage {
    let rel = path.strip_prefix("/").unwrap_or(path);
    let cg = Cgroup::load(hierarchies::auto(), rel);
    let cpu_nanos = if cg.v2() {
        cg.controller_of::<CpuController>()
            .and_then(|c| {
                c.cpu()
                    .stat
                    .lines()
                    .find_map(|l| l.strip_prefix("usage_usec "))
                    .and_then(|v| v.trim().parse::<u64>().ok())
            })
            .map_or(0, |us| us * 1000)
    } else {
        cg.controller_of::<CpuAcctController>()
            .map_or(0, |c| c.cpuacct().usage)
    };
    let memory_bytes = cg
        .controller_of::<MemController>()
        .map_or(0, |m| m.memory_stat().usage_in_bytes);
    pb::Usage {
        cpu_nanos,
        memory_bytes,
    }
}

/// How many processes the kernel OOM-killed in the cgroup at `path`; 0 if it is gone.
///
/// Read before the task is deleted, this catches OOM kills whose containerd event was missed.
pub fn oom_kills(path: &Path) -> u64 {
    let rel = path.strip_prefix("/").unwrap_or(path);
    let cg = Cgroup::load(hierarchies::auto(), rel);
    if cg.v2() {
        // cgroups-rs does not parse memory.events; it is a flat "key value" file.
        let events = Path::new("/sys/fs/cgroup").join(rel).join("memory.events");
        return std::fs::read_to_string(events)
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
    }
    cg.controller_of::<MemController>()
        .map_or(0, |m| m.memory_stat().oom_control.oom_kill)
}
