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
    // A 10 MB env is refused by validation, naming the field, not by the transport.
    let mut big_env = spec("bigenv", pb::JobType::Batch, 1, ":");
    big_env
        .container
        .as_mut()
        .unwrap()
        .env
        .insert("BLOB".into(), "x".repeat(10 << 20));
    let err = c
        .create_job(pb::CreateJobRequest {
            spec: Some(big_env),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message()
            .contains("container.env: at most 131072 bytes"),
        "{}",
        err.message()
    );
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
    // Before the agent registers the reason is "no ready nodes".
    let (_, tasks) = wait_until(&mut c, &job.id, LIMIT, |_, t| {
        t[0].pending_reason.contains("memory")
    })
    .await;
    assert!(is_state(&tasks[0], pb::TaskState::Accepted));
    assert_eq!(
        tasks[0].pending_reason,
        "1 node: memory (needs 64Gi; largest free: 20Gi on node-a)"
    );

    let mut missing = spec("missing", pb::JobType::Batch, 1, ":");
    // A registry on loopback that is not there: the pull fails at once, never hangs.
    missing.container.as_mut().unwrap().image = "127.0.0.1:1/test/nothere:1".into();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_is_pulled_once_from_a_registry_on_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::start(&dir.path().join("registry")).await;
    let image = registry.push_test_image("test/busybox:v1").await;
    let sched = Scheduler::start(&dir.path().join("s"), fast()).await;
    let ns = namespace("pull");
    let agent = Agent::start("node-a", &sched, &dir.path().join("a"), &ns, None).await;
    let mut c = sched.client().await;

    // Three tasks need the image at once; they share one pull.
    let gets_before = registry.manifest_gets();
    let mut s = spec("pulled", pb::JobType::Batch, 3, "echo pulled");
    s.container.as_mut().unwrap().image = image.clone();
    let job = create(&mut c, s).await;
    let (job, tasks) = wait_until(&mut c, &job.id, LIMIT, |j, _| job_done(j)).await;
    assert_eq!(job.state, pb::JobState::Succeeded as i32, "{tasks:#?}");
    assert_eq!(
        registry.manifest_gets() - gets_before,
        1,
        "one pull for three tasks"
    );

    // A tag the registry does not have.
    let mut s = spec("absent", pb::JobType::Batch, 1, ":");
    s.container.as_mut().unwrap().image = format!("{}/test/busybox:nope", registry.addr);
    let job = create(&mut c, s).await;
    let (_, tasks) = wait_until(&mut c, &job.id, LIMIT, |j, _| job_done(j)).await;
    assert_eq!(
        tasks[0].reason,
        pb::FinishReason::ImageError as i32,
        "{:?}",
        tasks[0]
    );
    agent.stop().await;
    sched.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_scales_and_watch_sees_every_change() {
    let dir = tempfile::tempdir().unwrap();
    let sched = Scheduler::start(&dir.path().join("s"), fast()).await;
    let ns = namespace("scale");
    let agent = Agent::start("node-a", &sched, &dir.path().join("a"), &ns, None).await;
    let mut c = sched.client().await;

    let mut labelled = spec("other", pb::JobType::Service, 0, ":");
    labelled.labels.insert("team".into(), "blue".into());
    create(&mut c, labelled).await;

    let mut watch = c
        .watch_jobs(pb::WatchJobsRequest {})
        .await
        .unwrap()
        .into_inner();
    let mut snapshot = Vec::new();
    loop {
        match watch.message().await.unwrap().unwrap().event.unwrap() {
            pb::watch_jobs_response::Event::Job(j) => snapshot.push(j.spec.unwrap().name),
            pb::watch_jobs_response::Event::SnapshotEnd(_) => break,
            pb::watch_jobs_response::Event::Task(t) => panic!("task before snapshot end: {t:?}"),
        }
    }
    assert_eq!(snapshot, ["other"]);

    let mut s = spec("web", pb::JobType::Service, 1, "exec sleep 1000");
    s.labels.insert("team".into(), "red".into());
    let job = create(&mut c, s).await;
    let started = |n: usize| {
        move |_: &pb::Job, t: &[pb::Task]| {
            t.iter()
                .filter(|t| is_state(t, pb::TaskState::Started))
                .count()
                == n
        }
    };
    wait_until(&mut c, &job.id, LIMIT, started(1)).await;
    c.update_job_capacity(pb::UpdateJobCapacityRequest {
        id: "web".into(),
        tasks: 3,
    })
    .await
    .unwrap();
    wait_until(&mut c, &job.id, LIMIT, started(3)).await;
    c.update_job_capacity(pb::UpdateJobCapacityRequest {
        id: job.id.clone(),
        tasks: 1,
    })
    .await
    .unwrap();
    let (_, tasks) = wait_until(&mut c, &job.id, LIMIT, |_, t| {
        t.iter()
            .filter(|t| is_state(t, pb::TaskState::Started))
            .count()
            == 1
            && t.iter()
                .filter(|t| t.reason == pb::FinishReason::Killed as i32)
                .count()
                == 2
    })
    .await;
    assert_eq!(tasks.len(), 3, "scaling down is not replaced: {tasks:#?}");
    // Batch jobs have no capacity.
    let b = create(&mut c, spec("batchy", pb::JobType::Batch, 1, ":")).await;
    let err = c
        .update_job_capacity(pb::UpdateJobCapacityRequest { id: b.id, tasks: 2 })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);

    // Label and state filters.
    let red = c
        .list_jobs(pb::ListJobsRequest {
            labels: [("team".to_string(), "red".to_string())].into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        red.jobs.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(),
        [job.id.as_str()]
    );

    // The watch saw the new job and its tasks go through their states.
    let mut saw_job = false;
    let mut started_tasks = std::collections::HashSet::new();
    while !(saw_job && started_tasks.len() >= 3) {
        let ev = tokio::time::timeout(Duration::from_secs(10), watch.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        match ev.event.unwrap() {
            pb::watch_jobs_response::Event::Job(j) if j.id == job.id => saw_job = true,
            pb::watch_jobs_response::Event::Task(t)
                if t.job_id == job.id && is_state(&t, pb::TaskState::Started) =>
            {
                started_tasks.insert(t.id);
            }
            _ => {}
        }
    }
    c.kill_job(pb::KillJobRequest { id: job.id.clone() })
        .await
        .unwrap();
    wait_until(&mut c, &job.id, LIMIT, |j, _| job_done(j)).await;
    agent.stop().await;
    sched.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_limit_kills_and_cli_wait_reports_the_result() {
    let dir = tempfile::tempdir().unwrap();
    let sched = Scheduler::start(&dir.path().join("s"), fast()).await;
    let ns = namespace("limit");
    let agent = Agent::start("node-a", &sched, &dir.path().join("a"), &ns, None).await;
    let mut c = sched.client().await;

    let mut s = spec("slow", pb::JobType::Batch, 1, "exec sleep 1000");
    s.runtime_limit_ms = 1000;
    s.container.as_mut().unwrap().kill_grace_ms = 500;
    let job = create(&mut c, s).await;
    let (job, tasks) = wait_until(&mut c, &job.id, LIMIT, |j, _| job_done(j)).await;
    assert_eq!(
        tasks[0].reason,
        pb::FinishReason::RuntimeLimitExceeded as i32,
        "{:?}",
        tasks[0]
    );
    assert_eq!(job.state, pb::JobState::Failed as i32);

    // `berth job run --wait`: exit 0 for a job that succeeds, 1 for one that fails.
    for (name, script, code) in [("ok", ":", 0), ("bad", "exit 7", 1)] {
        let file = dir.path().join(format!("{name}.yaml"));
        std::fs::write(
            &file,
            format!("name: {name}\ntype: batch\ncontainer:\n  image: {IMAGE}\n  command: [sh, -c, '{script}']\n  resources: {{cpu: 100m, memory: 32Mi}}\n"),
        )
        .unwrap();
        let out = tokio::process::Command::new(berth_bin())
            .args(["job", "run", "--wait", "-f"])
            .arg(&file)
            .args(["--api", &sched.addr.to_string()])
            .output()
            .await
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(code),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains(if code == 0 {
                "Succeeded"
            } else {
                "exit code 7"
            }),
            "{stdout}"
        );
    }
    agent.stop().await;
    sched.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_of_agent_and_scheduler_keep_the_running_task() {
    let dir = tempfile::tempdir().unwrap();
    let sdata = dir.path().join("s");
    let adata = dir.path().join("a");
    let sched = Scheduler::start(&sdata, fast()).await;
    let ns = namespace("restart");
    let agent = Agent::start("node-a", &sched, &adata, &ns, None).await;
    let mut c = sched.client().await;

    let job = create(
        &mut c,
        spec("keep", pb::JobType::Service, 1, "exec sleep 1000"),
    )
    .await;
    let (_, tasks) = wait_until(&mut c, &job.id, LIMIT, |_, t| {
        is_state(&t[0], pb::TaskState::Started)
    })
    .await;
    let task_id = tasks[0].id.clone();
    let rt = berth_agent::runtime::Containerd::connect(&containerd_socket(), &ns)
        .await
        .unwrap();
    let pid_of = || async { rt.pid(&task_id).await.unwrap() };
    let pid = pid_of().await;
    assert!(pid > 0);

    // The agent stops and comes back: the container is untouched and re-attached.
    agent.stop().await;
    let agent = Agent::start("node-a", &sched, &adata, &ns, None).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        pid_of().await,
        pid,
        "the agent restart touched the container"
    );

    // The scheduler restarts: the agent reconnects by itself and the task stays as it was.
    let addr = sched.addr;
    sched.stop().await;
    let sched = Scheduler::start_at(&sdata, fast(), addr).await;
    let mut c = sched.client().await;
    let deadline = tokio::time::Instant::now() + LIMIT;
    while !list_nodes(&mut c)
        .await
        .iter()
        .any(|n| n.capacity.is_some_and(|r| r.cpu_millis > 0))
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "agent never reconnected"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Longer than the heartbeat timeout: had reconciliation failed, the task would be lost.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (_, tasks) = get(&mut c, &job.id).await;
    assert_eq!(tasks.len(), 1, "no duplicate or replacement: {tasks:#?}");
    assert!(
        is_state(&tasks[0], pb::TaskState::Started),
        "{:?}",
        tasks[0]
    );
    assert_eq!(pid_of().await, pid);

    // And it still obeys orders after all that.
    c.kill_job(pb::KillJobRequest { id: job.id.clone() })
        .await
        .unwrap();
    let (_, tasks) = wait_until(&mut c, &job.id, LIMIT, |j, _| job_done(j)).await;
    assert_eq!(tasks[0].reason, pb::FinishReason::Killed as i32);
    agent.stop().await;
    sched.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_follow_until_the_task_ends_and_nothing_is_left_behind() {
    let dir = tempfile::tempdir().unwrap();
    let sched = Scheduler::start(&dir.path().join("s"), fast()).await;
    let ns = namespace("follow");
    let agent = Agent::start("node-a", &sched, &dir.path().join("a"), &ns, None).await;
    let mut c = sched.client().await;

    let job = create(
        &mut c,
        spec(
            "follow",
            pb::JobType::Batch,
            1,
            "echo one; sleep 1; echo two >&2; sleep 1; echo three",
        ),
    )
    .await;
    let (_, tasks) = wait_until(&mut c, &job.id, LIMIT, |_, t| {
        is_state(&t[0], pb::TaskState::Started)
    })
    .await;
    let out = tokio::process::Command::new(berth_bin())
        .args(["logs", "-f", &tasks[0].id, "--api", &sched.addr.to_string()])
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
        "one\ntwo\nthree\n",
        "stdout and stderr, in order"
    );
    let (job, _) = get(&mut c, &job.id).await;
    assert!(job_done(&job), "logs -f returned before the task ended");

    // No container, shim task or active snapshot remains; only the image's layers.
    let ctr = |args: &[&str]| {
        let out = std::process::Command::new("ctr")
            .arg("--address")
            .arg(containerd_socket())
            .args(["-n", &ns])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    assert_eq!(ctr(&["containers", "ls", "-q"]).trim(), "");
    assert_eq!(ctr(&["tasks", "ls", "-q"]).trim(), "");
    let snapshots = ctr(&["snapshots", "ls"]);
    assert!(!snapshots.contains("Active"), "{snapshots}");
    agent.stop().await;
    sched.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_files_are_checked_and_used() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "listen: 127.0.0.1:0\nstrategy: random\nheartbeat_timeout: soon\nmax_task: {memory: lots}\n").unwrap();
    let out = tokio::process::Command::new(berth_bin())
        .args(["scheduler", "--config"])
        .arg(&bad)
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    for field in ["strategy:", "heartbeat_timeout:", "max_task.memory:"] {
        assert!(err.contains(field), "{field} not in {err}");
    }
    let unknown = dir.path().join("unknown.yaml");
    std::fs::write(&unknown, "listne: 127.0.0.1:0\n").unwrap();
    let out = tokio::process::Command::new(berth_bin())
        .args(["agent", "--config"])
        .arg(&unknown)
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("listne"));

    // A good file is used: the per-task maximum it sets is enforced.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let good = dir.path().join("good.yaml");
    std::fs::write(
        &good,
        format!(
            "data_dir: {}\nlisten: 127.0.0.1:{port}\nmax_task: {{cpu: 2, memory: 1Gi}}\n",
            dir.path().join("s").display()
        ),
    )
    .unwrap();
    let mut child = tokio::process::Command::new(berth_bin())
        .args(["scheduler", "--config"])
        .arg(&good)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut client = None;
    for _ in 0..100 {
        if let Ok(ch) = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
            .unwrap()
            .connect()
            .await
        {
            client = Some(pb::job_service_client::JobServiceClient::new(ch));
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut c = client.expect("scheduler from config file is listening");
    let mut s = spec("big", pb::JobType::Batch, 1, ":");
    s.container
        .as_mut()
        .unwrap()
        .resources
        .as_mut()
        .unwrap()
        .memory_mib = 2048;
    let err = c
        .create_job(pb::CreateJobRequest { spec: Some(s) })
        .await
        .unwrap_err();
    assert!(
        err.message().contains("over the per-task maximum of 1Gi"),
        "{}",
        err.message()
    );
    child.kill().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_start_undoes_half_created_tasks() {
    let dir = tempfile::tempdir().unwrap();
    let sched = Scheduler::start(&dir.path().join("s"), fast()).await;
    let ns = namespace("half");
    import_image(&ns).await;
    let ctr = |args: &[&str]| {
        let out = std::process::Command::new("ctr")
            .arg("--address")
            .arg(containerd_socket())
            .args(["-n", &ns])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success() || args[0] == "snapshots" && args[1] == "ls",
            "ctr {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    // What an agent killed mid-create leaves: a container with no task, and a snapshot with
    // no container.
    ctr(&[
        "containers",
        "create",
        "--label",
        "berth.task-id=half-1",
        IMAGE,
        "half-1",
        "sh",
    ]);
    ctr(&["snapshots", "prepare", "orphan-1"]);
    assert!(ctr(&["snapshots", "ls"]).contains("Active"));

    // And an assignment the agent recorded but had created nothing for yet.
    let adata = dir.path().join("a");
    std::fs::create_dir_all(&adata).unwrap();
    {
        let store = berth_agent::store::AgentStore::open(&adata).unwrap();
        let launched = pb::TaskStatus {
            task_id: "half-2".into(),
            state: pb::TaskState::Launched as i32,
            at_unix_ms: berth_model::now_unix_ms(),
            ..Default::default()
        };
        store
            .put(pb::AgentTaskRecord {
                assignment: Some(pb::TaskAssignment {
                    task_id: "half-2".into(),
                    job_id: "j".into(),
                    ..Default::default()
                }),
                status: Some(launched),
            })
            .await
            .unwrap();
    }

    let agent = Agent::start("node-a", &sched, &adata, &ns, None).await;
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let containers = ctr(&["containers", "ls", "-q"]);
        let snapshots = ctr(&["snapshots", "ls"]);
        if containers.trim().is_empty() && !snapshots.contains("Active") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "left behind:\n{containers}\n{snapshots}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    agent.stop().await;
    let (records, _) = berth_agent::store::AgentStore::open(&adata)
        .unwrap()
        .load()
        .unwrap();
    let half2 = records
        .iter()
        .find_map(|r| r.status.as_ref().filter(|s| s.task_id == "half-2"))
        .expect("half-2 is still recorded");
    assert_eq!(
        (half2.state, half2.reason),
        (
            pb::TaskState::Finished as i32,
            pb::FinishReason::LocalSystemError as i32
        ),
        "{half2:?}"
    );
    sched.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_agent_stops_its_tasks_gracefully_and_they_move() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = fast();
    cfg.heartbeat_timeout = Duration::from_secs(30);
    let sched = Scheduler::start(&dir.path().join("s"), cfg).await;
    let one = Resources {
        cpu_millis: 1000,
        memory_mib: 1024,
        disk_mib: 1024,
        gpus: 0,
        network_mbps: 1000,
    };
    let (ns_a, ns_b) = (namespace("drain-a"), namespace("drain-b"));
    let a = Agent::start_with(
        "node-a",
        &sched,
        &dir.path().join("a"),
        &ns_a,
        Some(one),
        true,
    )
    .await;
    let mut c = sched.client().await;

    let mut s = spec(
        "web",
        pb::JobType::Service,
        1,
        "trap 'exit 0' TERM; while :; do sleep 0.1; done",
    );
    s.container
        .as_mut()
        .unwrap()
        .resources
        .as_mut()
        .unwrap()
        .cpu_millis = 1000;
    s.container.as_mut().unwrap().kill_grace_ms = 20_000;
    let job = create(&mut c, s).await;
    wait_until(&mut c, &job.id, LIMIT, |_, t| {
        is_state(&t[0], pb::TaskState::Started)
    })
    .await;
    let b = Agent::start("node-b", &sched, &dir.path().join("b"), &ns_b, Some(one)).await;

    a.stop().await;
    // The task was killed (SIGTERM, well within its grace), not lost, and moved to node-b.
    let (_, tasks) = wait_until(&mut c, &job.id, LIMIT, |_, t| {
        t.iter()
            .any(|t| t.node_id == "node-b" && is_state(t, pb::TaskState::Started))
    })
    .await;
    let first = tasks.iter().find(|t| t.attempt == 0).unwrap();
    assert_eq!(first.reason, pb::FinishReason::Killed as i32, "{first:?}");
    let rt = berth_agent::runtime::Containerd::connect(&containerd_socket(), &ns_a)
        .await
        .unwrap();
    assert!(
        rt.berth_containers().await.unwrap().is_empty(),
        "the drained node kept containers"
    );
    let nodes = list_nodes(&mut c).await;
    let node_a = nodes.iter().find(|n| n.id == "node-a").unwrap();
    assert_eq!(node_a.state, pb::NodeState::Draining as i32);

    c.kill_job(pb::KillJobRequest { id: job.id.clone() })
        .await
        .unwrap();
    wait_until(&mut c, &job.id, LIMIT, |j, _| job_done(j)).await;
    b.stop().await;
    sched.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unique_host_spreads_a_job_and_says_why_the_rest_waits() {
    let dir = tempfile::tempdir().unwrap();
    let sched = Scheduler::start(&dir.path().join("s"), fast()).await;
    let (ns_a, ns_b) = (namespace("uniq-a"), namespace("uniq-b"));
    let a = Agent::start("node-a", &sched, &dir.path().join("a"), &ns_a, None).await;
    let b = Agent::start("node-b", &sched, &dir.path().join("b"), &ns_b, None).await;
    let mut c = sched.client().await;

    let mut bad = spec("bad-constraint", pb::JobType::Batch, 1, ":");
    bad.constraints = Some(pb::Constraints {
        hard: vec!["zone >= a".into()],
        soft: vec![],
    });
    let err = c
        .create_job(pb::CreateJobRequest { spec: Some(bad) })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message()
            .contains("constraints.hard[0]: unknown operator"),
        "{}",
        err.message()
    );

    let mut s = spec("uniq", pb::JobType::Service, 3, "exec sleep 1000");
    s.constraints = Some(pb::Constraints {
        hard: vec!["unique_host".into(), "zone == test".into()],
        soft: vec![],
    });
    let job = create(&mut c, s).await;
    let (_, tasks) = wait_until(&mut c, &job.id, LIMIT, |_, t| {
        t.iter()
            .filter(|t| is_state(t, pb::TaskState::Started))
            .count()
            == 2
            && t.iter().any(|t| !t.pending_reason.is_empty())
    })
    .await;
    let mut nodes: Vec<&str> = tasks
        .iter()
        .filter(|t| is_state(t, pb::TaskState::Started))
        .map(|t| t.node_id.as_str())
        .collect();
    nodes.sort();
    assert_eq!(nodes, ["node-a", "node-b"]);
    let waiting = tasks
        .iter()
        .find(|t| is_state(t, pb::TaskState::Accepted))
        .unwrap();
    assert_eq!(waiting.pending_reason, "2 nodes: unique host");

    c.kill_job(pb::KillJobRequest { id: job.id.clone() })
        .await
        .unwrap();
    wait_until(&mut c, &job.id, LIMIT, |j, _| job_done(j)).await;
    a.stop().await;
    b.stop().await;
    sched.stop().await;
}
