//! Churn soak: tasks launched and killed continuously across two real `berth agent`
//! processes; afterwards nothing may be left behind and the agents must not have grown.
//!
//! Bounded: 40 s by default; set BERTH_SOAK_SECS for longer runs.

// Test helpers outside #[test] fns unwrap like the tests do.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use berth_proto as pb;
use berth_scheduler::ClusterConfig;
use support::*;

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Task cgroups left under `/berth/<ns>` in any hierarchy.
fn leftover_cgroups(ns: &str) -> Vec<String> {
    let mut left = Vec::new();
    let Ok(roots) = std::fs::read_dir("/sys/fs/cgroup") else {
        return left;
    };
    for root in roots.flatten() {
        let dir = root.path().join("berth").join(ns);
        if let Ok(entries) = std::fs::read_dir(&dir) {
            left.extend(
                entries
                    .flatten()
                    .filter(|e| e.path().is_dir())
                    .map(|e| e.path().display().to_string()),
            );
        }
    }
    left
}

fn shims_of(ns: &str) -> usize {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return 0;
    };
    procs
        .flatten()
        .filter_map(|p| std::fs::read(p.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains("containerd-shim") && c.contains(&format!("-namespace {ns} ")))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_leaves_nothing_behind() {
    let secs: u64 = std::env::var("BERTH_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);
    let dir = tempfile::tempdir().unwrap();
    let cfg = ClusterConfig {
        heartbeat_interval: Duration::from_millis(500),
        heartbeat_timeout: Duration::from_secs(30),
        ..Default::default()
    };
    let sched = Scheduler::start(&dir.path().join("s"), cfg).await;
    let namespaces = [namespace("soak-a"), namespace("soak-b")];
    let mut agents = Vec::new();
    for (i, ns) in namespaces.iter().enumerate() {
        import_image(ns).await;
        let data = dir.path().join(format!("agent-{i}"));
        agents.push(spawn_agent_process(
            &format!("soak-{i}"),
            sched.addr,
            ns,
            &data,
            &["--log-retention", "1s"],
        ));
    }
    let mut c = sched.client().await;
    let pids: Vec<u32> = agents.iter().map(|a| a.id().unwrap()).collect();

    // 5 launches per second; every other job is killed right away, at whatever stage it is.
    let start = Instant::now();
    let mut warm: Option<Vec<u64>> = None;
    let mut jobs = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let mut i = 0u64;
    while start.elapsed() < Duration::from_secs(secs) {
        tick.tick().await;
        let mut s = spec(&format!("churn-{i}"), pb::JobType::Batch, 1, "sleep 0.5");
        s.container.as_mut().unwrap().kill_grace_ms = 1000;
        let job = create(&mut c, s).await;
        if i % 2 == 1 {
            c.kill_job(pb::KillJobRequest { id: job.id.clone() })
                .await
                .unwrap();
        }
        jobs.push(job.id);
        i += 1;
        if warm.is_none() && start.elapsed() > Duration::from_secs(10) {
            warm = Some(pids.iter().map(|&p| rss_kib(p)).collect());
        }
    }

    // Every task reaches a terminal state.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut states: HashMap<i32, usize> = HashMap::new();
    for id in &jobs {
        loop {
            let (job, tasks) = get(&mut c, id).await;
            if job_done(&job) && tasks.iter().all(|t| is_state(t, pb::TaskState::Finished)) {
                *states.entry(job.state).or_default() += 1;
                break;
            }
            assert!(
                Instant::now() < deadline,
                "job {id} never finished: {job:?} {tasks:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let end: Vec<u64> = pids.iter().map(|&p| rss_kib(p)).collect();
    let warm = warm.unwrap();
    eprintln!(
        "soak: {} jobs in {secs}s, final states {states:?}; agent RSS KiB warm {warm:?} -> end {end:?}",
        jobs.len()
    );
    for (w, e) in warm.iter().zip(&end) {
        assert!(
            *e as f64 <= *w as f64 * 1.10,
            "agent RSS grew from {w} KiB to {e} KiB"
        );
    }

    // Nothing left in containerd, the kernel or the agents' data dirs (logs expire after 1s).
    tokio::time::sleep(Duration::from_secs(3)).await;
    for (i, ns) in namespaces.iter().enumerate() {
        let rt = berth_agent::runtime::Containerd::connect(&containerd_socket(), ns)
            .await
            .unwrap();
        assert!(
            rt.berth_containers().await.unwrap().is_empty(),
            "containers left in {ns}"
        );
        let ctr = |args: &[&str]| {
            let out = std::process::Command::new("ctr")
                .arg("--address")
                .arg(containerd_socket())
                .args(["-n", ns])
                .args(args)
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).to_string()
        };
        assert_eq!(ctr(&["tasks", "ls", "-q"]).trim(), "", "tasks left in {ns}");
        assert!(
            !ctr(&["snapshots", "ls"]).contains("Active"),
            "snapshots left in {ns}"
        );
        assert_eq!(shims_of(ns), 0, "shims left for {ns}");
        assert_eq!(
            leftover_cgroups(ns),
            Vec::<String>::new(),
            "cgroups left for {ns}"
        );
        let tasks_dir = dir.path().join(format!("agent-{i}")).join("tasks");
        let left: Vec<_> = std::fs::read_dir(&tasks_dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert!(
            left.is_empty(),
            "task files left in {}: {left:?}",
            tasks_dir.display()
        );
    }
    for mut a in agents {
        a.kill().await.unwrap();
    }
    sched.stop().await;
}
