//! Benchmark 1: in-process placement throughput and decision latency.
//!
//! 10,000 nodes (four instance types, three zones), 1,000,000 tasks in jobs of 100 with the
//! constraint mix in `berth_bench::MIX`. The indexed engine and the reference (first fit by a
//! linear scan, same checks) place the same workload on fresh copies of the same cluster.
//!
//! Usage: placement [NODES] [TASKS] [TASKS_PER_JOB]   (defaults 10000 1000000 100)

use std::time::Instant;

use berth_bench::{jobs, nodes, percentile, table};
use berth_scheduler::placement::{Engine, Request, first_fit};

struct Run {
    placed: u64,
    failed: u64,
    secs: f64,
    latencies: Vec<u64>,
    /// Decision latencies per row of the constraint mix.
    by_class: Vec<Vec<u64>>,
}

fn run(
    nodes: &[berth_scheduler::placement::NodeSpec],
    jobs: &[berth_bench::Job],
    naive: bool,
) -> Run {
    let mut e = Engine::new();
    for n in nodes {
        e.upsert_node(n.clone());
    }
    let mut latencies = Vec::with_capacity(jobs.iter().map(|j| j.tasks).sum());
    let mut by_class = vec![Vec::new(); berth_bench::MIX.len()];
    let (mut placed, mut failed) = (0u64, 0u64);
    let start = Instant::now();
    for j in jobs {
        let req = Request {
            job_id: &j.id,
            resources: &j.resources,
            constraints: &j.constraints,
            strategy: j.strategy,
        };
        for i in 0..j.tasks {
            let t0 = Instant::now();
            let ok = if naive {
                first_fit(&mut e, &req).is_some()
            } else {
                e.place_job(&req, 1).1.is_none()
            };
            let ns = t0.elapsed().as_nanos() as u64;
            latencies.push(ns);
            by_class[j.class].push(ns);
            if ok {
                placed += 1;
            } else {
                // Like a real pass: the job's other tasks wait with the same reason.
                failed += (j.tasks - i) as u64;
                break;
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    latencies.sort_unstable();
    for c in &mut by_class {
        c.sort_unstable();
    }
    Run {
        placed,
        failed,
        secs,
        latencies,
        by_class,
    }
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let node_count = args.first().copied().unwrap_or(10_000);
    let tasks = args.get(1).copied().unwrap_or(1_000_000);
    let per_job = args.get(2).copied().unwrap_or(100).max(1);
    let cluster = nodes(node_count, 1);
    let work = jobs(tasks.div_ceil(per_job), per_job, 2);
    println!(
        "placement: {node_count} nodes, {} tasks in {} jobs of {per_job}",
        tasks.div_ceil(per_job) * per_job,
        work.len()
    );
    let indexed = run(&cluster, &work, false);
    let rss = berth_bench::rss_mib("self");
    let naive = run(&cluster, &work, true);
    let row = |name: &str, r: &Run| {
        vec![
            name.to_string(),
            r.placed.to_string(),
            r.failed.to_string(),
            format!("{:.2}", r.secs),
            format!("{:.0}", r.placed as f64 / r.secs),
            format!("{:.1}", percentile(&r.latencies, 50.0) as f64 / 1000.0),
            format!("{:.1}", percentile(&r.latencies, 99.0) as f64 / 1000.0),
            format!(
                "{:.1}",
                r.latencies.last().copied().unwrap_or(0) as f64 / 1000.0
            ),
        ]
    };
    table(
        &[
            "engine",
            "placed",
            "pending",
            "seconds",
            "placements/s",
            "p50 us",
            "p99 us",
            "max us",
        ],
        &[row("indexed", &indexed), row("first-fit scan", &naive)],
    );
    let ips = indexed.placed as f64 / indexed.secs;
    let nps = naive.placed as f64 / naive.secs;
    println!(
        "ratio indexed/first-fit: throughput {:.1}x, p99 latency {:.2}x (goal: >= 100000 placements/s)",
        ips / nps,
        percentile(&indexed.latencies, 99.0) as f64
            / percentile(&naive.latencies, 99.0).max(1) as f64
    );
    println!("process RSS after the indexed run: {rss} MiB");
    println!();
    let us = |v: &[u64], p: f64| format!("{:.1}", percentile(v, p) as f64 / 1000.0);
    let rows: Vec<Vec<String>> = berth_bench::MIX
        .iter()
        .enumerate()
        .map(|(i, (share, hard, soft))| {
            vec![
                format!("{share}%"),
                format!("hard {hard:?} soft {soft:?}"),
                us(&indexed.by_class[i], 50.0),
                us(&indexed.by_class[i], 99.0),
                us(&naive.by_class[i], 50.0),
                us(&naive.by_class[i], 99.0),
            ]
        })
        .collect();
    table(
        &[
            "jobs",
            "constraints",
            "p50 us",
            "p99 us",
            "first-fit p50",
            "first-fit p99",
        ],
        &rows,
    );
}
