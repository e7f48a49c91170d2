//! Builds a task's OCI runtime spec: process, rootfs and cgroup limits.
//!
//! CPU: shares proportional to millicores and a CFS quota of `millicores / 1000` CPUs per
//! 100 ms period. Memory: a hard limit with swap equal to it (no swap). PIDs: a fixed cap.

use std::path::PathBuf;

use berth_model::resources::Resources;
use oci_spec::runtime::{
    LinuxBuilder, LinuxCpuBuilder, LinuxMemoryBuilder, LinuxPidsBuilder, LinuxResourcesBuilder,
    RootBuilder, Spec,
};

/// CFS period in microseconds.
pub const CFS_PERIOD_US: u64 = 100_000;
/// Most processes one task may have.
pub const PIDS_LIMIT: i64 = 4096;

/// What goes into one task's spec.
#[derive(Debug, Clone)]
pub struct ProcessSpec {
    /// argv.
    pub args: Vec<String>,
    /// `KEY=value` pairs.
    pub env: Vec<String>,
    /// Absolute working directory.
    pub cwd: String,
    /// Hostname inside the container.
    pub hostname: String,
    /// Limits.
    pub resources: Resources,
    /// cgroup path, relative to each hierarchy's root.
    pub cgroups_path: PathBuf,
}

/// A spec build failure (only from inconsistent builder input).
#[derive(Debug, thiserror::Error)]
#[error("cannot build runtime spec: {0}")]
pub struct SpecError(#[from] oci_spec::OciSpecError);

/// The runtime spec for one task, from oci-spec's defaults (namespaces, mounts, masked paths,
/// a minimal capability set) plus Berth's process and limits.
pub fn build(p: &ProcessSpec) -> Result<Spec, SpecError> {
    let mut spec = Spec::default();
    let mut process = spec.process().clone().unwrap_or_default();
    process.set_args(Some(p.args.clone()));
    process.set_env(Some(p.env.clone()));
    process.set_cwd(PathBuf::from(if p.cwd.is_empty() { "/" } else { &p.cwd }));
    process.set_terminal(Some(false));
    spec.set_process(Some(process));
    spec.set_root(Some(
        RootBuilder::default()
            .path("rootfs")
            .readonly(false)
            .build()?,
    ));
    spec.set_hostname(Some(p.hostname.clone()));

    let millis = u64::from(p.resources.cpu_millis.max(1));
    let memory = i64::try_from(p.resources.memory_mib.saturating_mul(1 << 20)).unwrap_or(i64::MAX);
    let resources = LinuxResourcesBuilder::default()
        .cpu(
            LinuxCpuBuilder::default()
                .shares((millis * 1024 / 1000).max(2))
                .quota(
                    i64::try_from(millis * CFS_PERIOD_US / 1000)
                        .unwrap_or(i64::MAX)
                        .max(1000),
                )
                .period(CFS_PERIOD_US)
                .build()?,
        )
        .memory(
            LinuxMemoryBuilder::default()
                .limit(memory)
                .swap(memory)
                .build()?,
        )
        .pids(LinuxPidsBuilder::default().limit(PIDS_LIMIT).build()?)
        .build()?;
    let base = spec.linux().clone().unwrap_or_default();
    let linux = LinuxBuilder::default()
        .namespaces(base.namespaces().clone().unwrap_or_default())
        .masked_paths(base.masked_paths().clone().unwrap_or_default())
        .readonly_paths(base.readonly_paths().clone().unwrap_or_default())
        .resources(resources)
        .cgroups_path(p.cgroups_path.clone())
        .build()?;
    spec.set_linux(Some(linux));
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_follow_resources() {
        let spec = build(&ProcessSpec {
            args: vec!["sh".into()],
            env: vec!["A=1".into()],
            cwd: String::new(),
            hostname: "t".into(),
            resources: Resources {
                cpu_millis: 500,
                memory_mib: 16,
                ..Default::default()
            },
            cgroups_path: "/berth/ns/t".into(),
        })
        .expect("spec");
        let json = serde_json::to_value(&spec).expect("json");
        let r = &json["linux"]["resources"];
        assert_eq!(r["cpu"]["quota"], 50_000);
        assert_eq!(r["cpu"]["period"], 100_000);
        assert_eq!(r["cpu"]["shares"], 512);
        assert_eq!(r["memory"]["limit"], 16 << 20);
        assert_eq!(r["memory"]["swap"], 16 << 20);
        assert_eq!(json["root"]["readonly"], false);
        assert_eq!(json["process"]["cwd"], "/");
        assert_eq!(json["linux"]["cgroupsPath"], "/berth/ns/t");
    }
}
