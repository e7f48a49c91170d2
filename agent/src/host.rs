//! What this host offers: CPUs, memory, disk and NVIDIA GPUs, minus a reservation.

use std::path::Path;

use berth_model::resources::Resources;

/// Counts `/dev/nvidiaN` device nodes.
pub fn count_gpus(dev: &Path) -> u32 {
    let Ok(entries) = std::fs::read_dir(dev) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("nvidia"))
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        })
        .count() as u32
}

fn mem_total_mib() -> u64 {
    let Ok(info) = std::fs::read_to_string("/proc/meminfo") else {
        return 0;
    };
    info.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb / 1024)
}

fn disk_free_mib(dir: &Path) -> u64 {
    nix::sys::statvfs::statvfs(dir)
        .map(|s| s.blocks_available() * s.fragment_size() / (1 << 20))
        .unwrap_or(0)
}

/// The host's capacity minus `reserved`.
pub fn capacity(data_dir: &Path, reserved: &Resources) -> Resources {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
    Resources {
        cpu_millis: cpus * 1000,
        memory_mib: mem_total_mib(),
        disk_mib: disk_free_mib(data_dir),
        gpus: count_gpus(Path::new("/dev")),
        network_mbps: 10_000,
    }
    .saturating_sub(reserved)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_only_numbered_gpu_nodes() {
        let dir = tempfile::tempdir().expect("tempdir");
        for n in ["nvidia0", "nvidia1", "nvidiactl", "nvidia-uvm", "null"] {
            std::fs::write(dir.path().join(n), b"").expect("touch");
        }
        assert_eq!(count_gpus(dir.path()), 2);
    }

    #[test]
    fn capacity_is_real_and_reserved() {
        let dir = tempfile::tempdir().expect("tempdir");
        let full = capacity(dir.path(), &Resources::default());
        assert!(full.cpu_millis >= 1000 && full.memory_mib > 0);
        let reserved = capacity(
            dir.path(),
            &Resources {
                cpu_millis: 500,
                memory_mib: 256,
                ..Default::default()
            },
        );
        assert_eq!(reserved.cpu_millis, full.cpu_millis - 500);
    }
}
