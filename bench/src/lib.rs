//! Shared pieces of Berth's benchmarks: a deterministic synthetic cluster and workload, and
//! table printing. The binaries in `src/bin` are the benchmarks.

use berth_model::constraint::Constraints;
use berth_model::resources::Resources;
use berth_scheduler::placement::{NodeSpec, Strategy};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Zones of the synthetic cluster.
pub const ZONES: [&str; 3] = ["us-east-1a", "us-east-1b", "us-east-1c"];

/// `count` nodes of four instance types spread over [`ZONES`], the same for a given seed.
pub fn nodes(count: usize, seed: u64) -> Vec<NodeSpec> {
    let mut rng = StdRng::seed_from_u64(seed);
    let types = [
        ("m5.4xlarge", 16_000, 64 * 1024),
        ("m5.8xlarge", 32_000, 128 * 1024),
        ("r5.8xlarge", 32_000, 256 * 1024),
        ("m5.24xlarge", 96_000, 384 * 1024),
    ];
    (0..count)
        .map(|i| {
            let (ty, cpu, mem) = types[rng.random_range(0..types.len())];
            NodeSpec {
                id: format!("node-{i:05}"),
                capacity: Resources {
                    cpu_millis: cpu,
                    memory_mib: mem,
                    disk_mib: 500 * 1024,
                    gpus: 0,
                    network_mbps: 10_000,
                },
                attributes: [
                    ("zone".to_string(), ZONES[i % ZONES.len()].to_string()),
                    ("instance_type".to_string(), ty.to_string()),
                ]
                .into_iter()
                .collect(),
            }
        })
        .collect()
}

/// One synthetic job.
#[derive(Debug, Clone)]
pub struct Job {
    /// Job id.
    pub id: String,
    /// Per task.
    pub resources: Resources,
    /// Its constraints.
    pub constraints: Constraints,
    /// Its strategy.
    pub strategy: Strategy,
    /// How many tasks.
    pub tasks: usize,
    /// Its row in [`MIX`].
    pub class: usize,
}

/// The constraint mix, by share of jobs (out of 100).
pub const MIX: [(u32, &[&str], &[&str]); 6] = [
    (55, &[], &[]),
    (15, &["unique_host"], &[]),
    (10, &["zone_balance"], &[]),
    (10, &["instance_type == m5.8xlarge"], &[]),
    (5, &["zone in [us-east-1a, us-east-1b]"], &["zone_balance"]),
    (5, &[], &["unique_host", "instance_type =~ ^r5"]),
];

/// `count` jobs of `tasks_per_job` tasks with [`MIX`]'s constraints, 1 in 10 spread.
pub fn jobs(count: usize, tasks_per_job: usize, seed: u64) -> Vec<Job> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..count)
        .map(|i| {
            let mut pick = rng.random_range(0..100u32);
            let class = MIX
                .iter()
                .position(|(share, _, _)| {
                    if pick < *share {
                        true
                    } else {
                        pick -= share;
                        false
                    }
                })
                .unwrap_or(0);
            let (_, hard, soft) = MIX[class];
            let constraints = Constraints::parse(&berth_proto::Constraints {
                hard: hard.iter().map(|s| s.to_string()).collect(),
                soft: soft.iter().map(|s| s.to_string()).collect(),
            })
            .unwrap_or_default();
            Job {
                id: format!("job-{i:06}"),
                resources: Resources {
                    cpu_millis: [100, 250, 500, 1000][rng.random_range(0..4)],
                    memory_mib: [128, 256, 512, 2048][rng.random_range(0..4)],
                    disk_mib: 100,
                    gpus: 0,
                    network_mbps: 10,
                },
                constraints,
                strategy: if rng.random_range(0..10) == 0 {
                    Strategy::Spread
                } else {
                    Strategy::Binpack
                },
                tasks: tasks_per_job,
                class,
            }
        })
        .collect()
}

/// Resident memory in MiB of a process (`"self"` or a pid), from /proc; 0 if unreadable.
pub fn rss_mib(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib / 1024)
}

/// The `p`th percentile (0-100) of sorted values.
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() - 1) as f64 * p / 100.0).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Prints rows as an aligned table.
pub fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
    };
    println!("{}", line(header.iter().map(|h| h.to_string()).collect()));
    for r in rows {
        println!("{}", line(r.clone()));
    }
}
