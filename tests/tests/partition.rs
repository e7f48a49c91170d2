//! Partition test: an agent cut off by a network link going down, then coming back.
//!
//! The test builds its own network: namespace S holds the scheduler, the test client and
//! agent B; namespace P holds agent A (a real `berth agent` process); a veth pair joins them.
//! Dropping P's end of the link cuts A off without stopping it. After the heartbeat timeout
//! A's tasks are lost and replaced on B; when the link returns, A's stale copies are killed
//! and the scheduler's view wins. Needs root (network namespaces), as the whole suite does.

// Test helpers outside #[test] fns unwrap like the tests do.
#![allow(clippy::unwrap_used)]

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use berth_proto as pb;
use berth_scheduler::ClusterConfig;
use support::*;

const LIMIT: Duration = Duration::from_secs(60);
const S_ADDR: &str = "10.254.0.1";
const P_ADDR: &str = "10.254.0.2";

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Two network namespaces joined by a veth pair; removed on drop.
struct Net {
    s: String,
    p: String,
    p_link: String,
}

impl Net {
    fn create() -> Net {
        let id = std::process::id();
        let net = Net {
            s: format!("berth-s-{id}"),
            p: format!("berth-p-{id}"),
            p_link: format!("bp{id}"),
        };
        let s_link = format!("bs{id}");
        ip(&["netns", "add", &net.s]);
        ip(&["netns", "add", &net.p]);
        ip(&["-n", &net.s, "link", "set", "lo", "up"]);
        ip(&["-n", &net.p, "link", "set", "lo", "up"]);
        ip(&[
            "-n",
            &net.s,
            "link",
            "add",
            &s_link,
            "type",
            "veth",
            "peer",
            "name",
            &net.p_link,
            "netns",
            &net.p,
        ]);
        ip(&[
            "-n",
            &net.s,
            "addr",
            "add",
            &format!("{S_ADDR}/30"),
            "dev",
            &s_link,
        ]);
        ip(&[
            "-n",
            &net.p,
            "addr",
            "add",
            &format!("{P_ADDR}/30"),
            "dev",
            &net.p_link,
        ]);
        ip(&["-n", &net.s, "link", "set", &s_link, "up"]);
        net.set_link(true);
        net
    }

    /// Brings agent A's end of the link up or down.
    fn set_link(&self, up: bool) {
        let state = if up { "up" } else { "down" };
        ip(&["-n", &self.p, "link", "set", &self.p_link, state]);
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in [&self.s, &self.p] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

#[test]
fn a_cut_off_agent_loses_its_tasks_and_its_stale_copies_are_killed_on_return() {
    // containerd (shared by the suite) starts from the host's network namespace.
    let socket = containerd_socket();
    let net = Net::create();
    let s_ns = format!("/run/netns/{}", net.s);
    let body = std::thread::spawn(move || {
        // This thread, and every thread its runtime starts, lives in namespace S.
        let f = std::fs::File::open(&s_ns).unwrap();
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
            .block_on(partition(socket, &net))
    });
    body.join().unwrap();
}

async fn partition(socket: std::path::PathBuf, net: &Net) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = ClusterConfig {
        heartbeat_interval: Duration::from_millis(300),
        heartbeat_timeout: Duration::from_secs(2),
        ..Default::default()
    };
    let sched = Scheduler::start_at(
        &dir.path().join("s"),
        cfg,
        format!("{S_ADDR}:0").parse().unwrap(),
    )
    .await;
    let mut c = sched.client().await;
    let (ns_a, ns_b) = (namespace("part-a"), namespace("part-b"));
    import_image(&ns_a).await;

    // Agent A, a real process in namespace P, is the only node when the job is placed.
    let mut agent_a = tokio::process::Command::new("ip")
        .args(["netns", "exec", &net.p])
        .arg(berth_bin())
        .args(["agent", "--node-id", "node-a", "--scheduler"])
        .arg(sched.addr.to_string())
        .args(["--namespace", &ns_a, "--listen", "127.0.0.1:0"])
        .arg("--containerd")
        .arg(&socket)
        .arg("--data-dir")
        .arg(dir.path().join("a"))
        .env("BERTH_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let job = create(
        &mut c,
        spec("part-svc", pb::JobType::Service, 2, "exec sleep 1000"),
    )
    .await;
    let (_, on_a) = wait_until(&mut c, &job.id, LIMIT, |_, t| {
        t.iter()
            .filter(|t| is_state(t, pb::TaskState::Started))
            .count()
            == 2
    })
    .await;
    assert!(on_a.iter().all(|t| t.node_id == "node-a"));
    let rt_a = berth_agent::runtime::Containerd::connect(&socket, &ns_a)
        .await
        .unwrap();
    let mut pids = Vec::new();
    for t in &on_a {
        pids.push(rt_a.pid(&t.id).await.unwrap());
    }
    let agent_b = Agent::start("node-b", &sched, &dir.path().join("b"), &ns_b, None).await;

    // Cut A off. It keeps running, and so do its containers.
    let cut = Instant::now();
    net.set_link(false);
    let (_, tasks) = wait_until(&mut c, &job.id, LIMIT, |_, t| {
        t.iter()
            .filter(|t| t.node_id == "node-b" && is_state(t, pb::TaskState::Started))
            .count()
            == 2
    })
    .await;
    let replaced = cut.elapsed();
    for old in &on_a {
        let now = tasks.iter().find(|t| t.id == old.id).unwrap();
        assert_eq!(
            (now.state, now.reason),
            (
                pb::TaskState::Finished as i32,
                pb::FinishReason::Lost as i32
            ),
            "{now:?}"
        );
    }
    for (t, pid) in on_a.iter().zip(&pids) {
        assert_eq!(
            rt_a.pid(&t.id).await.unwrap(),
            *pid,
            "A's containers run on while it is cut off"
        );
    }
    let nodes = list_nodes(&mut c).await;
    let a = nodes.iter().find(|n| n.id == "node-a").unwrap();
    assert_eq!(a.state, pb::NodeState::Lost as i32);

    // The link returns: A reconnects, reports its copies, and the scheduler kills them.
    let healed = Instant::now();
    net.set_link(true);
    let deadline = Instant::now() + LIMIT;
    while !rt_a.berth_containers().await.unwrap().is_empty() {
        assert!(
            Instant::now() < deadline,
            "A's stale copies still run after the link came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stale_killed = healed.elapsed();
    // The scheduler's view stands: the lost tasks stay lost, B's copies are the job's.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, end) = get(&mut c, &job.id).await;
    assert_eq!(end.len(), 4, "{end:#?}");
    let running: Vec<&pb::Task> = end
        .iter()
        .filter(|t| is_state(t, pb::TaskState::Started))
        .collect();
    assert_eq!(running.len(), 2);
    assert!(running.iter().all(|t| t.node_id == "node-b"));
    for old in &on_a {
        let now = end.iter().find(|t| t.id == old.id).unwrap();
        assert_eq!(now.reason, pb::FinishReason::Lost as i32, "{now:?}");
    }
    let deadline = Instant::now() + LIMIT;
    loop {
        let nodes = list_nodes(&mut c).await;
        if nodes
            .iter()
            .any(|n| n.id == "node-a" && n.state == pb::NodeState::Ready as i32)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node-a never came back: {nodes:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "partition: 2 tasks on the cut-off node; replaced on the other node {replaced:?} after \
         the cut; stale copies killed {stale_killed:?} after the link returned; 0 duplicates \
         left running"
    );

    c.kill_job(pb::KillJobRequest { id: job.id.clone() })
        .await
        .unwrap();
    wait_until(&mut c, &job.id, LIMIT, |j, _| job_done(j)).await;
    agent_a.kill().await.unwrap();
    agent_b.stop().await;
    sched.stop().await;
    clean_namespace(&ns_a).await;
    clean_namespace(&ns_b).await;
}
