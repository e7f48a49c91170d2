//! Placement policy through the real scheduler: capacity group quotas, fair order across
//! groups, preemption of flex tasks for critical ones, and cordons. Nodes are simulated agents
//! (`berth-sim`) speaking the real agent protocol; no containers are needed to test placement
//! decisions.

// Test helpers outside #[test] fns unwrap like the tests do.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use berth_model::resources::Resources;
use berth_proto as pb;
use berth_scheduler::ClusterConfig;
use berth_scheduler::quota::{CapacityGroup, Tier};
use support::*;
use tokio_util::sync::CancellationToken;

const LIMIT: Duration = Duration::from_secs(30);

fn group(name: &str, tier: Tier, cpu: Option<u32>) -> CapacityGroup {
    CapacityGroup {
        name: name.into(),
        tier,
        cpu_millis: cpu,
        memory_mib: None,
        gpus: None,
    }
}

async fn scheduler(dir: &std::path::Path, groups: Vec<CapacityGroup>) -> Scheduler {
    let cfg = ClusterConfig {
        heartbeat_interval: Duration::from_millis(300),
        heartbeat_timeout: Duration::from_secs(10),
        groups,
        ..Default::default()
    };
    Scheduler::start(dir, cfg).await
}

/// `count` simulated nodes of 4 CPUs each.
async fn nodes(sched: &Scheduler, count: usize) -> CancellationToken {
    let cancel = CancellationToken::new();
    let cfg = berth_sim::SimConfig {
        scheduler: format!("http://{}", sched.addr),
        count,
        capacity: Some(Resources {
            cpu_millis: 4000,
            memory_mib: 16 * 1024,
            disk_mib: 100 * 1024,
            gpus: 0,
            network_mbps: 1000,
        }),
        ..Default::default()
    };
    berth_sim::run(cfg, cancel.clone()).await.unwrap();
    cancel
}

fn job(name: &str, group: &str, tasks: u32, cpu_millis: u32) -> pb::JobSpec {
    let mut s = spec(name, pb::JobType::Batch, tasks, "sleep 1000");
    s.capacity_group = group.into();
    if let Some(r) = s.container.as_mut().and_then(|c| c.resources.as_mut()) {
        r.cpu_millis = cpu_millis;
    }
    s
}

fn count(tasks: &[pb::Task], state: pb::TaskState) -> usize {
    tasks.iter().filter(|t| is_state(t, state)).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_never_exceeds_its_quota_and_unknown_groups_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sched = scheduler(dir.path(), vec![group("web", Tier::Critical, Some(4000))]).await;
    let sim = nodes(&sched, 2).await;
    let mut c = sched.client().await;

    let err = c
        .create_job(pb::CreateJobRequest {
            spec: Some(job("nogroup", "batchy", 1, 100)),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message()
            .contains("capacity_group: no capacity group named batchy (known: default, web)"),
        "{}",
        err.message()
    );

    let j = create(&mut c, job("web", "web", 5, 1000)).await;
    let (_, tasks) = wait_until(&mut c, &j.id, LIMIT, |_, t| {
        count(t, pb::TaskState::Started) == 4 && t.iter().any(|t| !t.pending_reason.is_empty())
    })
    .await;
    let waiting = tasks
        .iter()
        .find(|t| is_state(t, pb::TaskState::Accepted))
        .unwrap();
    assert_eq!(
        waiting.pending_reason,
        "capacity group web is at its cpu quota (4 of 4 in use)"
    );
    // The cluster has room (8 CPUs): only the quota holds the fifth task back.
    c.kill_task(pb::KillTaskRequest {
        task_id: tasks
            .iter()
            .find(|t| is_state(t, pb::TaskState::Started))
            .unwrap()
            .id
            .clone(),
    })
    .await
    .unwrap();
    wait_until(&mut c, &j.id, LIMIT, |_, t| {
        count(t, pb::TaskState::Started) == 4 && count(t, pb::TaskState::Accepted) == 0
    })
    .await;
    sim.cancel();
    sched.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_competing_for_a_full_cluster_get_even_shares() {
    let dir = tempfile::tempdir().unwrap();
    let sched = scheduler(
        dir.path(),
        vec![group("a", Tier::Flex, None), group("b", Tier::Flex, None)],
    )
    .await;
    let mut c = sched.client().await;
    // Both queue up before any node exists; then 8 CPUs appear for 20 one-CPU tasks.
    let ja = create(&mut c, job("ja", "a", 10, 1000)).await;
    let jb = create(&mut c, job("jb", "b", 10, 1000)).await;
    let sim = nodes(&sched, 2).await;
    let started = |tasks: &[pb::Task]| count(tasks, pb::TaskState::Started);
    let deadline = tokio::time::Instant::now() + LIMIT;
    let (a, b) = loop {
        let (_, ta) = get(&mut c, &ja.id).await;
        let (_, tb) = get(&mut c, &jb.id).await;
        if started(&ta) + started(&tb) == 8 {
            break (started(&ta), started(&tb));
        }
        assert!(tokio::time::Instant::now() < deadline, "never filled");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!((a, b), (4, 4), "dominant shares kept even");
    sim.cancel();
    sched.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_critical_task_preempts_the_flex_tasks_that_lose_least_work() {
    let dir = tempfile::tempdir().unwrap();
    let sched = scheduler(
        dir.path(),
        vec![
            group("web", Tier::Critical, None),
            group("batch", Tier::Flex, None),
        ],
    )
    .await;
    let sim = nodes(&sched, 2).await;
    let mut c = sched.client().await;
    // Old work fills one node; 2.5 s later, young work fills the other.
    let old = create(&mut c, job("old", "batch", 4, 1000)).await;
    wait_until(&mut c, &old.id, LIMIT, |_, t| {
        count(t, pb::TaskState::Started) == 4
    })
    .await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let young = create(&mut c, job("young", "batch", 4, 1000)).await;
    wait_until(&mut c, &young.id, LIMIT, |_, t| {
        count(t, pb::TaskState::Started) == 4
    })
    .await;

    let web = create(&mut c, job("web", "web", 1, 2000)).await;
    let (_, w) = wait_until(&mut c, &web.id, LIMIT, |_, t| {
        is_state(&t[0], pb::TaskState::Started)
    })
    .await;
    let (_, y) = get(&mut c, &young.id).await;
    let preempted: Vec<&pb::Task> = y
        .iter()
        .filter(|t| t.reason == pb::FinishReason::Preempted as i32)
        .collect();
    assert_eq!(
        preempted.len(),
        2,
        "two 1-CPU tasks make room for 2 CPUs: {y:#?}"
    );
    assert!(preempted.iter().all(|t| t.node_id == w[0].node_id));
    assert!(preempted[0].message.contains("critical capacity group web"));
    // Requeued: a new attempt of each index, waiting for room, without using a retry.
    let requeued: Vec<&pb::Task> = y
        .iter()
        .filter(|t| is_state(t, pb::TaskState::Accepted))
        .collect();
    assert_eq!(requeued.len(), 2);
    assert!(
        requeued
            .iter()
            .all(|t| t.preemptions == 1 && t.attempt == 1)
    );
    let (_, o) = get(&mut c, &old.id).await;
    assert_eq!(
        count(&o, pb::TaskState::Started),
        4,
        "the older work was kept"
    );
    sim.cancel();
    sched.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cordoned_node_takes_no_new_tasks_even_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let sched = scheduler(dir.path(), vec![]).await;
    let sim = nodes(&sched, 1).await;
    let mut c = sched.client().await;
    let running = create(&mut c, job("before", "", 1, 100)).await;
    wait_until(&mut c, &running.id, LIMIT, |_, t| {
        is_state(&t[0], pb::TaskState::Started)
    })
    .await;
    let err = c
        .cordon_node(pb::CordonNodeRequest {
            node_id: "nope".into(),
            cordon: true,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    let node = c
        .cordon_node(pb::CordonNodeRequest {
            node_id: "sim-00000".into(),
            cordon: true,
        })
        .await
        .unwrap()
        .into_inner()
        .node
        .unwrap();
    assert!(node.cordoned);
    let j = create(&mut c, job("after", "", 1, 100)).await;
    let (_, t) = wait_until(&mut c, &j.id, LIMIT, |_, t| !t[0].pending_reason.is_empty()).await;
    assert_eq!(t[0].pending_reason, "1 node: not ready");

    // The cordon is stored: a restarted scheduler keeps it.
    let (addr, data) = (sched.addr, sched.data.clone());
    sched.stop().await;
    let cfg = ClusterConfig {
        heartbeat_interval: Duration::from_millis(300),
        heartbeat_timeout: Duration::from_secs(10),
        ..Default::default()
    };
    let sched = Scheduler::start_at(&data, cfg, addr).await;
    let mut c = sched.client().await;
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let nodes = list_nodes(&mut c).await;
        let n = nodes.iter().find(|n| n.id == "sim-00000").unwrap();
        assert!(n.cordoned);
        if n.tasks == 1 && n.state == pb::NodeState::Ready as i32 && n.last_seen_unix_ms > 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{nodes:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, t) = get(&mut c, &j.id).await;
    assert!(is_state(&t[0], pb::TaskState::Accepted), "{t:#?}");
    let (_, r) = get(&mut c, &running.id).await;
    assert!(
        is_state(&r[0], pb::TaskState::Started),
        "running tasks stay"
    );

    c.cordon_node(pb::CordonNodeRequest {
        node_id: "sim-00000".into(),
        cordon: false,
    })
    .await
    .unwrap();
    wait_until(&mut c, &j.id, LIMIT, |_, t| {
        is_state(&t[0], pb::TaskState::Started)
    })
    .await;
    sim.cancel();
    sched.stop().await;
}
