//! Crash tests: real `berth agent` and `berth scheduler` processes killed with SIGKILL.
//!
//! Goal: nothing acknowledged is lost, nothing runs twice, containers survive their agent.

// Test helpers outside #[test] fns unwrap like the tests do.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_proto as pb;
use berth_scheduler::ClusterConfig;
use support::*;
use tokio::process::{Child, Command};

const LIMIT: Duration = Duration::from_secs(60);

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn spawn_agent(sched: SocketAddr, ns: &str, data: &Path) -> Child {
    spawn_agent_process("node-a", sched, ns, data, &[])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_sigkill_leaves_containers_running_and_restart_reconciles() {
    let dir = tempfile::tempdir().unwrap();
    // Longer than the agent's downtime: this test is about restarts, not node loss.
    let cfg = ClusterConfig {
        heartbeat_interval: Duration::from_millis(300),
        heartbeat_timeout: Duration::from_secs(30),
        ..Default::default()
    };
    let sched = Scheduler::start(&dir.path().join("s"), cfg).await;
    let ns = namespace("agentkill");
    import_image(&ns).await;
    let adata = dir.path().join("a");
    let mut agent = spawn_agent(sched.addr, &ns, &adata);
    let mut c = sched.client().await;

    let svc = create(
        &mut c,
        spec("svc", pb::JobType::Service, 3, "exec sleep 1000"),
    )
    .await;
    let batch = create(
        &mut c,
        spec("exits-while-down", pb::JobType::Batch, 1, "sleep 3; exit 5"),
    )
    .await;
    let (_, svc_tasks) = wait_until(&mut c, &svc.id, LIMIT, |_, t| {
        t.iter()
            .filter(|t| is_state(t, pb::TaskState::Started))
            .count()
            == 3
    })
    .await;
    wait_until(&mut c, &batch.id, LIMIT, |_, t| {
        is_state(&t[0], pb::TaskState::Started)
    })
    .await;
    let rt = berth_agent::runtime::Containerd::connect(&containerd_socket(), &ns)
        .await
        .unwrap();
    let mut pids = Vec::new();
    for t in &svc_tasks {
        pids.push(rt.pid(&t.id).await.unwrap());
    }

    agent.kill().await.unwrap();
    // While the agent is down the containers run on, and the batch task exits with 5.
    tokio::time::sleep(Duration::from_secs(4)).await;
    for (t, pid) in svc_tasks.iter().zip(&pids) {
        assert_eq!(
            rt.pid(&t.id).await.unwrap(),
            *pid,
            "container of {} changed while its agent was dead",
            t.id
        );
    }

    let restarted = Instant::now();
    let mut agent = spawn_agent(sched.addr, &ns, &adata);
    let (batch_job, batch_tasks) = wait_until(&mut c, &batch.id, LIMIT, |j, _| job_done(j)).await;
    let reconciled = restarted.elapsed();
    eprintln!("agent restart -> exit reported: {reconciled:?}");
    assert_eq!(batch_tasks.len(), 1);
    assert_eq!(
        batch_tasks[0].reason,
        pb::FinishReason::Failed as i32,
        "{:?}",
        batch_tasks[0]
    );
    assert_eq!(
        batch_tasks[0].exit_code, 5,
        "the real exit status of a task that ended while the agent was down"
    );
    assert_eq!(batch_job.state, pb::JobState::Failed as i32);

    // Same containers, same pids, no second copy, nothing lost.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (_, now) = get(&mut c, &svc.id).await;
    assert_eq!(now.len(), 3, "no task was replaced or duplicated: {now:#?}");
    for (t, pid) in svc_tasks.iter().zip(&pids) {
        assert_eq!(rt.pid(&t.id).await.unwrap(), *pid);
    }
    assert!(now.iter().all(|t| is_state(t, pb::TaskState::Started)));
    assert_eq!(rt.berth_containers().await.unwrap().len(), 3);

    // The re-attached agent still delivers exits: kill the job.
    c.kill_job(pb::KillJobRequest { id: svc.id.clone() })
        .await
        .unwrap();
    let (_, done) = wait_until(&mut c, &svc.id, LIMIT, |j, _| job_done(j)).await;
    assert!(
        done.iter()
            .all(|t| t.reason == pb::FinishReason::Killed as i32),
        "{done:#?}"
    );
    assert!(rt.berth_containers().await.unwrap().is_empty());
    agent.kill().await.unwrap();
    sched.stop().await;
}

fn spawn_scheduler(data: &Path, listen: SocketAddr) -> Child {
    Command::new(berth_bin())
        .args(["scheduler", "--listen", &listen.to_string()])
        .arg("--data-dir")
        .arg(data)
        .env("BERTH_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

async fn client_at(
    addr: SocketAddr,
) -> pb::job_service_client::JobServiceClient<tonic::transport::Channel> {
    for _ in 0..200 {
        if let Ok(ch) = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
        {
            return pb::job_service_client::JobServiceClient::new(ch);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("scheduler at {addr} never answered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduler_sigkill_under_submissions_loses_no_acknowledged_job() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("s");
    let addr = free_addr();
    let mut sched = spawn_scheduler(&data, addr);
    let c = client_at(addr).await;

    // Four submitters race the kill; each remembers what was acknowledged.
    let acked = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut submitters = Vec::new();
    for w in 0..4 {
        let mut c = c.clone();
        let acked = acked.clone();
        submitters.push(tokio::spawn(async move {
            for i in 0.. {
                let s = spec(&format!("w{w}-{i}"), pb::JobType::Batch, 2, ":");
                match c.create_job(pb::CreateJobRequest { spec: Some(s) }).await {
                    Ok(r) => acked.lock().unwrap().push(r.into_inner().job.unwrap().id),
                    Err(_) => return,
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    sched.kill().await.unwrap();
    for s in submitters {
        s.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 10,
        "only {} jobs were submitted before the kill",
        acked.len()
    );

    let restarted = Instant::now();
    let mut sched = spawn_scheduler(&data, addr);
    let mut c = client_at(addr).await;
    let mut stored = Vec::new();
    let mut req = pb::ListJobsRequest {
        page_size: 1000,
        ..Default::default()
    };
    loop {
        let page = c.list_jobs(req.clone()).await.unwrap().into_inner();
        stored.extend(page.jobs);
        if page.next_cursor.is_empty() {
            break;
        }
        req.cursor = page.next_cursor;
    }
    eprintln!(
        "{} jobs acknowledged before SIGKILL; restart to full listing: {:?}",
        acked.len(),
        restarted.elapsed()
    );
    let ids: std::collections::HashSet<&str> = stored.iter().map(|j| j.id.as_str()).collect();
    assert_eq!(ids.len(), stored.len(), "a job is listed twice");
    for id in &acked {
        assert!(ids.contains(id.as_str()), "acknowledged job {id} was lost");
    }
    let names: std::collections::HashSet<String> = stored
        .iter()
        .map(|j| j.spec.clone().unwrap().name)
        .collect();
    assert_eq!(
        names.len(),
        stored.len(),
        "a job was stored twice under one name"
    );
    for id in &acked {
        let (_, tasks) = get(&mut c, id).await;
        assert_eq!(tasks.len(), 2, "job {id} lost tasks");
    }
    sched.kill().await.unwrap();
}

/// Polls every 10 ms (finer than `wait_until`) so that reconciliation times read true.
async fn poll_until(
    c: &mut pb::job_service_client::JobServiceClient<tonic::transport::Channel>,
    id: &str,
    done: impl Fn(&[pb::Task]) -> bool,
) -> Vec<pb::Task> {
    let deadline = Instant::now() + LIMIT;
    loop {
        if let Ok(r) = c.get_job(pb::GetJobRequest { id: id.to_string() }).await {
            let tasks = r.into_inner().tasks;
            if done(&tasks) {
                return tasks;
            }
            assert!(Instant::now() < deadline, "timed out: {tasks:#?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_end_recorded_while_the_scheduler_was_away_survives_an_agent_kill() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = || ClusterConfig {
        heartbeat_interval: Duration::from_millis(300),
        heartbeat_timeout: Duration::from_secs(30),
        ..Default::default()
    };
    let sched = Scheduler::start(&dir.path().join("s"), cfg()).await;
    let (addr, sdata) = (sched.addr, sched.data.clone());
    let ns = namespace("endkept");
    import_image(&ns).await;
    let adata = dir.path().join("a");
    let mut agent = spawn_agent(addr, &ns, &adata);
    let mut c = sched.client().await;
    let job = create(
        &mut c,
        spec("ends-alone", pb::JobType::Batch, 1, "sleep 2; exit 7"),
    )
    .await;
    wait_until(&mut c, &job.id, LIMIT, |_, t| {
        is_state(&t[0], pb::TaskState::Started)
    })
    .await;
    // The scheduler goes away; the task ends and the agent cleans up with nobody to tell...
    sched.stop().await;
    let rt = berth_agent::runtime::Containerd::connect(&containerd_socket(), &ns)
        .await
        .unwrap();
    let deadline = Instant::now() + LIMIT;
    while !rt.berth_containers().await.unwrap().is_empty() {
        assert!(Instant::now() < deadline, "the task never ended");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // ...and is killed before it can.
    agent.kill().await.unwrap();

    let sched = Scheduler::start_at(&sdata, cfg(), addr).await;
    let mut c = sched.client().await;
    let mut agent = spawn_agent(addr, &ns, &adata);
    let (_, tasks) = wait_until(&mut c, &job.id, LIMIT, |j, _| job_done(j)).await;
    assert_eq!(tasks.len(), 1, "no retry, no second copy: {tasks:#?}");
    assert_eq!(
        (tasks[0].reason, tasks[0].exit_code),
        (pb::FinishReason::Failed as i32, 7),
        "the recorded end, not `lost`: {:?}",
        tasks[0]
    );
    agent.kill().await.unwrap();
    sched.stop().await;
}

/// Process ids of the tasks, in order.
async fn pids(rt: &berth_agent::runtime::Containerd, tasks: &[pb::Task]) -> Vec<u32> {
    let mut out = Vec::new();
    for t in tasks {
        out.push(rt.pid(&t.id).await.unwrap());
    }
    out
}

fn kill_pid(pid: u32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
}

/// 100 tasks through an agent SIGKILL, then a scheduler SIGKILL with the agent away for a
/// while: every running container keeps its pid, the ten killed in each outage are reported
/// with their real status, nothing is lost, duplicated or killed by the restarted scheduler.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_tasks_reconcile_after_agent_and_scheduler_kills() {
    const N: usize = 100;
    let dir = tempfile::tempdir().unwrap();
    let sdata = dir.path().join("s");
    let addr = free_addr();
    let mut sched = spawn_scheduler(&sdata, addr);
    let ns = namespace("hundred");
    import_image(&ns).await;
    let adata = dir.path().join("a");
    let mut agent = spawn_agent(addr, &ns, &adata);
    let mut c = client_at(addr).await;
    let mut s = spec("hundred", pb::JobType::Batch, N as u32, "exec sleep 1000");
    if let Some(r) = s.container.as_mut().and_then(|c| c.resources.as_mut()) {
        r.cpu_millis = 10;
        r.memory_mib = 16;
    }
    let job = create(&mut c, s).await;
    let started = |t: &[pb::Task]| {
        t.iter()
            .filter(|t| is_state(t, pb::TaskState::Started))
            .count()
    };
    let finished = |t: &[pb::Task]| {
        t.iter()
            .filter(|t| is_state(t, pb::TaskState::Finished))
            .count()
    };
    let t0 = Instant::now();
    let mut tasks = poll_until(&mut c, &job.id, |t| started(t) == N).await;
    eprintln!("{N} tasks started in {:?}", t0.elapsed());
    tasks.sort_by_key(|t| t.index);
    let rt = berth_agent::runtime::Containerd::connect(&containerd_socket(), &ns)
        .await
        .unwrap();
    let before = pids(&rt, &tasks).await;

    // Agent SIGKILL; ten tasks die while it is down.
    agent.kill().await.unwrap();
    for pid in &before[..10] {
        kill_pid(*pid);
    }
    let t0 = Instant::now();
    let mut agent = spawn_agent(addr, &ns, &adata);
    let after = poll_until(&mut c, &job.id, |t| finished(t) == 10).await;
    let agent_reconcile = t0.elapsed();
    let mut after = after;
    after.sort_by_key(|t| t.index);
    for t in &after[..10] {
        assert_eq!(
            (t.reason, t.exit_code),
            (pb::FinishReason::Failed as i32, 137),
            "{t:?}"
        );
    }
    assert_eq!(started(&after), 90);
    assert_eq!(pids(&rt, &after[10..]).await, before[10..]);

    // Scheduler SIGKILL; the agent is stopped too (its tasks run on) and comes back 3 s
    // after the new scheduler: the scheduler must wait for its report, not kill or lose.
    sched.kill().await.unwrap();
    sigterm(&agent);
    agent.wait().await.unwrap();
    let mut sched = spawn_scheduler(&sdata, addr);
    let mut c = client_at(addr).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    for pid in &before[10..20] {
        kill_pid(*pid);
    }
    let t0 = Instant::now();
    let mut agent = spawn_agent(addr, &ns, &adata);
    let mut end = poll_until(&mut c, &job.id, |t| finished(t) == 20).await;
    let sched_reconcile = t0.elapsed();
    end.sort_by_key(|t| t.index);
    assert_eq!(end.len(), N, "no task replaced or duplicated");
    assert_eq!(started(&end), 80);
    assert_eq!(pids(&rt, &end[20..]).await, before[20..]);
    assert!(end[10..20].iter().all(|t| t.exit_code == 137));
    assert_eq!(rt.berth_containers().await.unwrap().len(), 80);
    eprintln!(
        "reconciliation with {N} tasks: agent SIGKILL -> restart -> 10 exits reported: \
         {agent_reconcile:?}; scheduler SIGKILL, agent back 3 s later -> 10 exits reported: \
         {sched_reconcile:?}; 0 lost, 0 duplicated, 80 of 80 running containers kept"
    );
    c.kill_job(pb::KillJobRequest { id: job.id.clone() })
        .await
        .unwrap();
    poll_until(&mut c, &job.id, |t| finished(t) == N).await;
    agent.kill().await.unwrap();
    sched.kill().await.unwrap();
}

/// SIGTERM: the agent's orderly stop, which leaves tasks running.
fn sigterm(child: &Child) {
    let pid = child.id().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
}
