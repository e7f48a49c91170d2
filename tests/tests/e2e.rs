//! End-to-end tests: in-process schedulers and agents driving a real containerd.
//!
//! No part of containerd is faked. Each test uses its own containerd namespace(s) and data
//! dirs, so tests run in parallel against one containerd.

mod support;

use std::time::Duration;

use berth_model::resources::Resources;
use berth_proto as pb;
use berth_scheduler::{ClusterConfig, Strategy};
use support::*;

const LIMIT: Duration = Duration::from_secs(60);

fn fast() -> ClusterConfig {
    ClusterConfig {
        heartbeat_interval: Duration::from_millis(300),
        heartbeat_timeout: Duration::from_secs(3),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_of_three_echoes_and_logs_show_output() {
    let dir = tempfile::tempdir().unwrap();
    let sched = Scheduler::start(&dir.path().join("s"), fast()).await;
    let ns = namespace("echo");
    let agent = Agent::start("node-a", &sched, &dir.path().join("a"), &ns, None).await;
    let mut c = sched.client().await;

    let job = create(
        &mut c,
        spec(
            "echo",
            pb::JobType::Batch,
            3,
            "echo hello from $BERTH_TASK_ID index $BERTH_TASK_INDEX",
        ),
    )
    .await;
    let (job, tasks) = wait_until(&mut c, &job.id, LIMIT, |j, _| job_done(j)).await;
    assert_eq!(job.state, pb::JobState::Succeeded as i32, "{job:?}");
    assert_eq!(tasks.len(), 3);
    for t in &tasks {
        assert!(is_state(t, pb::TaskState::Finished));
        assert_eq!(t.reason, pb::FinishReason::Normal as i32);
        assert_eq!(t.node_id, "node-a");
        // Every state was passed through, in order, with timestamps.
        let states: Vec<i32> = t.history.iter().map(|h| h.state).collect();
        use pb::TaskState as S;
        assert_eq!(
            states,
            [
                S::Accepted,
                S::Launched,
                S::StartInitiated,
                S::Started,
                S::Finished
            ]
            .map(|s| s as i32),
            "{t:?}"
        );
        assert!(
            t.history
                .windows(2)
                .all(|w| w[0].at_unix_ms <= w[1].at_unix_ms)
        );

        // `berth logs` through the scheduler's proxy to the agent's log service.
        let out = tokio::process::Command::new(berth_bin())
            .args(["logs", &t.id, "--api", &sched.addr.to_string()])
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("hello from {} index {}\n", t.id, t.index)
        );
    }
    // Nothing left behind in containerd.
    let rt = berth_agent::runtime::Containerd::connect(&containerd_socket(), &ns)
        .await
        .unwrap();
    assert!(rt.berth_containers().await.unwrap().is_empty());
    agent.stop().await;
    sched.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_task_is_retried_then_the_job_fails() {
    let dir = tempfile::tempdir().unwrap();
    let sched = Scheduler::start(&dir.path().join("s"), fast()).await;
    let ns = namespace("exit3");
    let agent = Agent::start("node-a", &sched, &dir.path().join("a"), &ns, None).await;
    let mut c = sched.client().await;

    let mut s = spec("exit3", pb::JobType::Batch, 1, "exit 3");
    s.retry = Some(pb::RetryPolicy {
        max_retries: 2,
        backoff_ms: 100,
    });
    let job = create(&mut c, s).await;
    let (job, tasks) = wait_until(&mut c, &job.id, LIMIT, |j, _| job_done(j)).await;
    assert_eq!(job.state, pb::JobState::Failed as i32, "{job:?}");
    assert_eq!(tasks.len(), 3, "one run and two retries: {tasks:?}");
    let mut attempts: Vec<u32> = tasks.iter().map(|t| t.attempt).collect();
    attempts.sort();
    assert_eq!(attempts, [0, 1, 2]);
    for t in &tasks {
        assert_eq!(t.reason, pb::FinishReason::Failed as i32, "{t:?}");
        assert_eq!(t.exit_code, 3);
    }
    // Retries wait for their backoff: each attempt is accepted no earlier than the last ended.
    let mut by_attempt = tasks.clone();
    by_attempt.sort_by_key(|t| t.attempt);
    for w in by_attempt.windows(2) {
        let ended = w[0].history.last().unwrap().at_unix_ms;
        let launched = w[1]
            .history
            .iter()
            .find(|h| h.state == pb::TaskState::Launched as i32)
            .unwrap()
            .at_unix_ms;
        assert!(
            launched >= ended + 100,
            "retry launched {}ms after the failure",
            launched - ended
        );
    }
    assert!(job.message.contains("exit code 3"), "{}", job.message);
    agent.stop().await;
    sched.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_hog_is_oom_killed() {
    let dir = tempfile::tempdir().unwrap();
    let sched = Scheduler::start(&dir.path().join("s"), fast()).await;
    let ns = namespace("oom");
    let agent = Agent::start("node-a", &sched, &dir.path().join("a"), &ns, None).await;
    let mut c = sched.client().await;

    // dd's 64 MiB block buffer is filled from /dev/zero: 64 MiB resident in a 16 MiB cgroup.
    let mut s = spec(
        "oom",
        pb::JobType::Batch,
        1,
        "dd if=/dev/zero of=/dev/null bs=64M count=4",
    );
    if let Some(r) = s.container.as_mut().and_then(|c| c.resources.as_mut()) {
        r.memory_mib = 16;
    }
    let job = create(&mut c, s).await;
    let (job, tasks) = wait_until(&mut c, &job.id, LIMIT, |j, _| job_done(j)).await;
    assert_eq!(job.state, pb::JobState::Failed as i32);
    assert_eq!(
        tasks[0].reason,
        pb::FinishReason::OomKilled as i32,
        "{:?}",
        tasks[0]
    );
    agent.stop().await;
    sched.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_loop_is_held_to_its_cpu_quota() {
    let dir = tempfile::tempdir().unwrap();
    let sched = Scheduler::start(&dir.path().join("s"), fast()).await;
    let ns = namespace("cpu");
    let agent = Agent::start("node-a", &sched, &dir.path().join("a"), &ns, None).await;
    let mut c = sched.client().await;

    let mut s = spec("spin", pb::JobType::Batch, 1, "while :; do :; done");
    if let Some(r) = s.container.as_mut().and_then(|c| c.resources.as_mut()) {
        r.cpu_millis = 500;
    }
    let job = create(&mut c, s).await;
    let (_, tasks) = wait_until(&mut c, &job.id, LIMIT, |_, t| {
        t.iter().any(|t| is_state(t, pb::TaskState::Started))
    })
    .await;
    let cgroup = std::path::PathBuf::from(format!("/berth/{ns}/{}", tasks[0].id));
    let before = berth_agent::usage::read(&cgroup);
    let t0 = std::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = berth_agent::usage::read(&cgroup);
    let rate = (after.cpu_nanos - before.cpu_nanos) as f64 / t0.elapsed().as_nanos() as f64;
    assert!(
        rate <= 0.6,
        "a 500m task used {rate:.2} CPU-seconds per second"
    );
    assert!(
        rate >= 0.1,
        "the busy loop barely ran ({rate:.2}); is the cgroup read right?"
    );

    // Usage also reaches the scheduler through heartbeats.
    let (_, tasks) = wait_until(&mut c, &job.id, LIMIT, |_, t| {
        t[0].usage.is_some_and(|u| u.cpu_nanos > 0)
    })
    .await;
    assert!(tasks[0].usage.unwrap().memory_bytes > 0);

    c.kill_job(pb::KillJobRequest { id: job.id.clone() })
        .await
        .unwrap();
    wait_until(&mut c, &job.id, LIMIT, |j, _| job_done(j)).await;
    agent.stop().await;
    sched.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_sends_sigterm_then_sigkill_after_the_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let sched = Scheduler::start(&dir.path().join("s"), fast()).await;
    let ns = namespace("kill");
    let agent = Agent::start("node-a", &sched, &dir.path().join("a"), &ns, None).await;
    let mut c = sched.client().await;

    // A task that exits on SIGTERM, with a grace period far longer than the test's limit:
    // finishing at all proves SIGTERM was delivered.
    let mut polite = spec(
        "polite",
        pb::JobType::Batch,
        1,
        "trap 'echo bye; exit 0' TERM; while :; do sleep 0.1; done",
    );
    polite.container.as_mut().unwrap().kill_grace_ms = 300_000;
    // A task that ignores SIGTERM (PID 1 has no default handler) is SIGKILLed after 1s.
    let mut stubborn = spec("stubborn", pb::JobType::Batch, 1, "exec sleep 1000");
    stubborn.container.as_mut().unwrap().kill_grace_ms = 1000;

    for s in [polite, stubborn] {
        let job = create(&mut c, s).await;
        let (_, tasks) = wait_until(&mut c, &job.id, LIMIT, |_, t| {
            t.iter().any(|t| is_state(t, pb::TaskState::Started))
        })
        .await;
        let killed = c
            .kill_task(pb::KillTaskRequest {
                task_id: tasks[0].id.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .task
            .unwrap();
        assert!(
            is_state(&killed, pb::TaskState::KillInitiated),
            "{killed:?}"
        );
        let (job, tasks) = wait_until(&mut c, &job.id, LIMIT, |j, _| job_done(j)).await;
        let t = &tasks[0];
        assert_eq!(t.reason, pb::FinishReason::Killed as i32, "{t:?}");
        let states: Vec<i32> = t.history.iter().map(|h| h.state).collect();
        assert_eq!(
            &states[states.len() - 2..],
            [
                pb::TaskState::KillInitiated as i32,
                pb::TaskState::Finished as i32
            ]
        );
        assert_eq!(tasks.len(), 1, "a killed batch task is not retried");
        assert_eq!(job.state, pb::JobState::Failed as i32);
    }
    agent.stop().await;
    sched.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_agent_tasks_are_replaced_on_another_node() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = fast();
    cfg.strategy = Strategy::Spread;
    let sched = Scheduler::start(&dir.path().join("s"), cfg).await;
    let small = Resources {
        cpu_millis: 1000,
        memory_mib: 1024,
        disk_mib: 1024,
        gpus: 0,
        network_mbps: 1000,
    };
    let big = Resources {
        cpu_millis: 2000,
        ..small
    };
    let (ns_a, ns_b) = (namespace("lost-a"), namespace("lost-b"));
    let a = Agent::start("node-a", &sched, &dir.path().join("a"), &ns_a, Some(small)).await;
    let b = Agent::start("node-b", &sched, &dir.path().join("b"), &ns_b, Some(big)).await;
    let mut c = sched.client().await;

    let mut s = spec("svc", pb::JobType::Service, 2, "exec sleep 1000");
    s.container
        .as_mut()
        .unwrap()
        .resources
        .as_mut()
        .unwrap()
        .cpu_millis = 1000;
    let job = create(&mut c, s).await;
    let (_, tasks) = wait_until(&mut c, &job.id, LIMIT, |_, t| {
        t.iter()
            .filter(|t| is_state(t, pb::TaskState::Started))
            .count()
            == 2
    })
    .await;
    let mut nodes: Vec<&str> = tasks.iter().map(|t| t.node_id.as_str()).collect();
    nodes.sort();
    assert_eq!(
        nodes,
        ["node-a", "node-b"],
        "spread puts one task on each node"
    );

    a.stop().await;
    let (_, tasks) = wait_until(&mut c, &job.id, LIMIT, |_, t| {
        let lost = t
            .iter()
            .any(|t| t.node_id == "node-a" && t.reason == pb::FinishReason::Lost as i32);
        let on_b = t
            .iter()
            .filter(|t| t.node_id == "node-b" && is_state(t, pb::TaskState::Started))
            .count();
        lost && on_b == 2
    })
    .await;
    let replacement = tasks
        .iter()
        .find(|t| t.attempt == 1)
        .expect("a replacement");
    assert_eq!(replacement.node_id, "node-b");

    c.kill_job(pb::KillJobRequest { id: job.id.clone() })
        .await
        .unwrap();
    wait_until(&mut c, &job.id, LIMIT, |j, _| job_done(j)).await;
    b.stop().await;
    sched.stop().await;
    // node-a's container outlived its agent, as it should; clean it up.
    clean_namespace(&ns_a).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_rejected_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let sched = Scheduler::start(&dir.path().join("s"), fast()).await;
    let mut c = sched.client().await;

    let mut zero = spec("zero", pb::JobType::Batch, 1, ":");
    zero.container
        .as_mut()
        .unwrap()
        .resources
        .as_mut()
        .unwrap()
        .memory_mib = 0;
    let mut huge = spec("huge", pb::JobType::Batch, 1, ":");
    huge.container
        .as_mut()
        .unwrap()
        .resources
        .as_mut()
        .unwrap()
        .cpu_millis = 10_000_000;
    let mut image = spec("image", pb::JobType::Batch, 1, ":");
    image.container.as_mut().unwrap().image = "Not An Image".into();
    let mut empty = spec("empty", pb::JobType::Batch, 1, ":");
    empty.container.as_mut().unwrap().image = String::new();
    let cases = [
        (zero, "container.resources.memory: must be > 0"),
        (
            huge,
            "container.resources.cpu: 10000 is over the per-task maximum of 256",
        ),
        (image, "container.image:"),
        (empty, "container.image: must not be empty"),
        (
            spec("", pb::JobType::Batch, 1, ":"),
            "name: must not be empty",
        ),
        (
            spec("t", pb::JobType::Unspecified, 1, ":"),
            "type: must be batch or service",
        ),
    ];
    for (s, want) in cases {
        let err = c
            .create_job(pb::CreateJobRequest { spec: Some(s) })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(
            err.message().contains(want),
            "{:?} does not contain {want:?}",
            err.message()
        );
    }
    let err = c
        .create_job(pb::CreateJobRequest { spec: None })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let listed = c
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(
        listed.jobs.is_empty(),
        "rejected jobs were stored: {:?}",
        listed.jobs
    );

    // A second active job with the same name.
    create(&mut c, spec("twice", pb::JobType::Service, 0, ":")).await;
    let err = c
        .create_job(pb::CreateJobRequest {
            spec: Some(spec("twice", pb::JobType::Service, 0, ":")),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::AlreadyExists);

    // The CLI reports a bad file with exit code 2, naming the field, before dialing anything.
    let file = dir.path().join("bad.yaml");
    std::fs::write(&file, "name: x\ntype: batch\ncontainer:\n  image: busybox\n  resources: {cpu: lots, memory: 64Mi}\n").unwrap();
    let out = tokio::process::Command::new(berth_bin())
        .args(["job", "run", "-f"])
        .arg(&file)
        .args(["--api", "127.0.0.1:1"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("container.resources.cpu"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    sched.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_task_waits_with_a_reason_and_missing_image_fails_fast() {
    let dir = tempfile::tempdir().unwrap();
    let sched = Scheduler::start(&dir.path().join("s"), fast()).await;
    let ns = namespace("pending");
    let small = Resources {
        cpu_millis: 2000,
        memory_mib: 20 * 1024,
        disk_mib: 1024,
        gpus: 0,
        network_mbps: 1000,
    };
    let agent = Agent::start("node-a", &sched, &dir.path().join("a"), &ns, Some(small)).await;
    let mut c = sched.client().await;

    let mut big = spec("big", pb::JobType::Batch, 1, ":");
    big.container
        .as_mut()
        .unwrap()
        .resources
        .as_mut()
        .unwrap()
        .memory_mib = 64 * 1024;
    let job = create(&mut c, big).await;
    let (_, tasks) = wait_until(&mut c, &job.id, LIMIT, |_, t| {
        !t[0].pending_reason.is_empty()
    })
    .await;
    assert!(is_state(&tasks[0], pb::TaskState::Accepted));
    assert_eq!(
        tasks[0].pending_reason,
        "no node has 64Gi memory free (largest: 20Gi on node-a)"
    );

    let mut missing = spec("missing", pb::JobType::Batch, 1, ":");
    missing.container.as_mut().unwrap().image = "docker.io/library/nothere:1".into();
    let job = create(&mut c, missing).await;
    let (_, tasks) = wait_until(&mut c, &job.id, LIMIT, |j, _| job_done(j)).await;
    assert_eq!(tasks[0].reason, pb::FinishReason::ImageError as i32);
    assert!(tasks[0].message.contains("nothere"), "{}", tasks[0].message);
    agent.stop().await;
    sched.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduler_restart_keeps_every_acknowledged_job() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("s");
    let sched = Scheduler::start(&data, fast()).await;
    let mut c = sched.client().await;
    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(
            create(
                &mut c,
                spec(&format!("keep-{i}"), pb::JobType::Batch, 2, ":"),
            )
            .await
            .id,
        );
    }
    sched.stop().await;

    let sched = Scheduler::start(&data, fast()).await;
    let mut c = sched.client().await;
    let mut seen = Vec::new();
    let mut req = pb::ListJobsRequest {
        page_size: 7,
        ..Default::default()
    };
    loop {
        let page = c.list_jobs(req.clone()).await.unwrap().into_inner();
        assert!(page.jobs.len() <= 7);
        seen.extend(page.jobs.into_iter().map(|j| j.id));
        if page.next_cursor.is_empty() {
            break;
        }
        req.cursor = page.next_cursor;
    }
    assert_eq!(seen, ids, "all jobs, once each, in creation order");
    let (_, tasks) = get(&mut c, &ids[0]).await;
    assert_eq!(tasks.len(), 2);
    // Names stay taken across the restart.
    let err = c
        .create_job(pb::CreateJobRequest {
            spec: Some(spec("keep-0", pb::JobType::Batch, 1, ":")),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::AlreadyExists);
    sched.stop().await;
}
