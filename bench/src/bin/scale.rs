//! Benchmarks 2-4: a real `berth scheduler` process, simulated agents speaking the real agent
//! protocol (berth-sim), and jobs submitted through the real gRPC API.
//!
//! 2. time from the first CreateJob to every task Started, as the scheduler reports it;
//! 3. the scheduler's RSS with every node and task in memory;
//! 4. the time for a SIGKILLed scheduler to reload its store and serve every job again, and
//!    for all simulated agents to re-register.
//!
//! Usage: scale [NODES] [TASKS] [TASKS_PER_JOB]   (defaults 10000 1000000 100)
//! The scheduler binary is `$BERTH_BIN` (default target/release/berth).

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use berth_bench::{MIX, table};
use berth_proto as pb;
use pb::job_service_client::JobServiceClient;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

type Error = Box<dyn std::error::Error + Send + Sync>;

fn spawn_scheduler(
    bin: &str,
    data: &std::path::Path,
    addr: &str,
    reference: bool,
) -> Result<Child, Error> {
    let mut cmd = Command::new(bin);
    cmd.arg("scheduler");
    if reference {
        cmd.arg("--first-fit-reference");
    }
    Ok(cmd
        .args(["--listen", addr, "--heartbeat-interval", "5s"])
        .args(["--heartbeat-timeout", "120s", "--data-dir"])
        .arg(data)
        .env("BERTH_LOG", "error")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()?)
}

async fn client(addr: &str) -> Result<JobServiceClient<Channel>, Error> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let ep = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?;
        if let Ok(ch) = ep.connect().await {
            return Ok(JobServiceClient::new(ch)
                .max_decoding_message_size(256 << 20)
                .max_encoding_message_size(64 << 20));
        }
        if Instant::now() > deadline {
            return Err("scheduler never answered".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every job, page by page; with the sum of Started tasks.
async fn list_all(c: &mut JobServiceClient<Channel>) -> Result<(usize, u64), Error> {
    let mut req = pb::ListJobsRequest {
        page_size: 1000,
        ..Default::default()
    };
    let (mut jobs, mut started) = (0, 0u64);
    loop {
        let page = c.list_jobs(req.clone()).await?.into_inner();
        jobs += page.jobs.len();
        started += page
            .jobs
            .iter()
            .map(|j| u64::from(j.counts.unwrap_or_default().started))
            .sum::<u64>();
        if page.next_cursor.is_empty() {
            return Ok((jobs, started));
        }
        req.cursor = page.next_cursor;
    }
}

fn job_spec(j: &berth_bench::Job) -> pb::JobSpec {
    let (_, hard, soft) = MIX[j.class];
    pb::JobSpec {
        name: j.id.clone(),
        r#type: pb::JobType::Batch as i32,
        tasks: j.tasks as u32,
        container: Some(pb::Container {
            image: "docker.io/library/busybox:local".into(),
            command: vec!["sleep".into(), "3600".into()],
            resources: Some(j.resources.into()),
            ..Default::default()
        }),
        constraints: Some(pb::Constraints {
            // One node type alone cannot hold a tenth of the tasks once others fill it.
            hard: hard
                .iter()
                .map(|s| match *s {
                    "instance_type == m5.8xlarge" => {
                        "instance_type in [m5.8xlarge, r5.8xlarge, m5.24xlarge]".to_string()
                    }
                    other => other.to_string(),
                })
                .collect(),
            soft: soft.iter().map(|s| s.to_string()).collect(),
        }),
        strategy: match j.strategy {
            berth_scheduler::placement::Strategy::Spread => "spread".into(),
            berth_scheduler::placement::Strategy::Binpack => "binpack".into(),
        },
        ..Default::default()
    }
}

/// One run's figures.
struct Figures {
    all_started: Duration,
    submitted: Duration,
    agents_saw: Duration,
    total: usize,
    jobs: usize,
    started: u64,
    rss: u64,
    served: Duration,
    jobs_after: usize,
    started_after: u64,
    rejoined: Duration,
}

async fn measure(
    bin: &str,
    nodes: usize,
    tasks: usize,
    per_job: usize,
    reference: bool,
) -> Result<Figures, Error> {
    let dir = std::env::temp_dir().join(format!("berth-scale-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr = format!("127.0.0.1:{port}");
    let data = dir.join("scheduler");

    let mut sched = spawn_scheduler(bin, &data, &addr, reference)?;
    let c = client(&addr).await?;
    let cancel = CancellationToken::new();
    let t = Instant::now();
    let stats = berth_sim::run(
        berth_sim::SimConfig {
            scheduler: format!("http://{addr}"),
            count: nodes,
            zones: berth_bench::ZONES.iter().map(|z| z.to_string()).collect(),
            ..Default::default()
        },
        cancel.clone(),
    )
    .await?;
    while (stats.registered.load(Ordering::Relaxed) as usize) < nodes {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let registered = t.elapsed();

    // Smaller tasks than bench 1, so that all of them fit: ~62% of the simulated CPUs.
    let mut work = berth_bench::jobs(tasks.div_ceil(per_job), per_job, 2);
    for (i, j) in work.iter_mut().enumerate() {
        j.resources.cpu_millis = [100, 200, 300, 500][i % 4];
        j.resources.memory_mib = [128, 256, 512, 1024][(i / 4) % 4];
    }
    let total: usize = work.iter().map(|j| j.tasks).sum();
    println!(
        "scale: {nodes} simulated nodes registered in {:.2}s; submitting {total} tasks in {} jobs of {per_job}",
        registered.as_secs_f64(),
        work.len()
    );
    let t0 = Instant::now();
    let queue = Arc::new(tokio::sync::Mutex::new(work.into_iter()));
    let mut submitters = Vec::new();
    for _ in 0..32 {
        let queue = queue.clone();
        let mut c = c.clone();
        submitters.push(tokio::spawn(async move {
            loop {
                let Some(j) = queue.lock().await.next() else {
                    return Ok::<(), tonic::Status>(());
                };
                c.create_job(pb::CreateJobRequest {
                    spec: Some(job_spec(&j)),
                })
                .await?;
            }
        }));
    }
    for s in submitters {
        s.await??;
    }
    let submitted = t0.elapsed();
    let mut last_report = Instant::now();
    let mut last_count = 0;
    while (stats.started.load(Ordering::Relaxed) as usize) < total {
        if last_report.elapsed() > Duration::from_secs(10) {
            last_report = Instant::now();
            let now = stats.started.load(Ordering::Relaxed);
            eprintln!(
                "  {:.0}s: {now} of {total} tasks started",
                t0.elapsed().as_secs_f64(),
            );
            if now == last_count {
                let mut c = c.clone();
                let pending = c
                    .list_tasks(pb::ListTasksRequest {
                        states: vec![pb::TaskState::Accepted as i32],
                        ..Default::default()
                    })
                    .await?
                    .into_inner()
                    .tasks;
                let mut reasons: std::collections::BTreeMap<String, usize> = Default::default();
                for t in &pending {
                    *reasons.entry(t.pending_reason.clone()).or_default() += 1;
                }
                for (r, n) in reasons.iter().take(10) {
                    eprintln!("    {n} pending: {r}");
                }
                return Err(format!("{} tasks stay pending", pending.len()).into());
            }
            last_count = now;
        }
        if t0.elapsed() > Duration::from_secs(1800) {
            return Err(format!(
                "only {} of {total} tasks started after 1800 s",
                stats.started.load(Ordering::Relaxed)
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let agents_saw = t0.elapsed();
    let mut c2 = c.clone();
    let (jobs, started) = loop {
        let (jobs, started) = list_all(&mut c2).await?;
        if started as usize >= total {
            break (jobs, started);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let all_started = t0.elapsed();
    let pid = sched.id().unwrap_or(0);
    let rss = berth_bench::rss_mib(&pid.to_string());

    // Restart: SIGKILL, then time until every job is listed again and every node is back.
    sched.kill().await?;
    let reg_before = stats.registered.load(Ordering::Relaxed) as usize;
    let t1 = Instant::now();
    let mut sched2 = spawn_scheduler(bin, &data, &addr, reference)?;
    let mut c3 = client(&addr).await?;
    let (jobs_after, started_after) = list_all(&mut c3).await?;
    let served = t1.elapsed();
    while (stats.registered.load(Ordering::Relaxed) as usize) < reg_before + nodes {
        if t1.elapsed() > Duration::from_secs(300) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rejoined = t1.elapsed();
    cancel.cancel();
    sched2.kill().await?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Figures {
        all_started,
        submitted,
        agents_saw,
        total,
        jobs,
        started,
        rss,
        served,
        jobs_after,
        started_after,
        rejoined,
    })
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let nodes = args.first().copied().unwrap_or(10_000);
    let tasks = args.get(1).copied().unwrap_or(1_000_000);
    let per_job = args.get(2).copied().unwrap_or(100).max(1);
    let bin = std::env::var("BERTH_BIN").unwrap_or_else(|_| "target/release/berth".into());
    let with_reference = std::env::var("BERTH_SCALE_REFERENCE").as_deref() != Ok("0");
    let f = measure(&bin, nodes, tasks, per_job, false).await?;
    let r = if with_reference {
        println!("reference run: the same, placing by first-fit linear scan");
        Some(measure(&bin, nodes, tasks, per_job, true).await?)
    } else {
        None
    };
    let secs = |d: Duration| format!("{:.1} s", d.as_secs_f64());
    let refd = |g: &dyn Fn(&Figures) -> String| r.as_ref().map_or("-".to_string(), g);
    let ratio = |a: Duration, g: &dyn Fn(&Figures) -> Duration| {
        r.as_ref().map_or("-".to_string(), |r| {
            format!("{:.2}x", a.as_secs_f64() / g(r).as_secs_f64().max(1e-9))
        })
    };
    table(
        &["measure", "indexed", "first-fit reference", "ratio", "goal"],
        &[
            vec![
                "2. first submit -> all tasks Started (scheduler's counts)".into(),
                secs(f.all_started),
                refd(&|r| secs(r.all_started)),
                ratio(f.all_started, &|r| r.all_started),
                "< 120 s".into(),
            ],
            vec![
                "   all CreateJob calls answered".into(),
                secs(f.submitted),
                refd(&|r| secs(r.submitted)),
                ratio(f.submitted, &|r| r.submitted),
                String::new(),
            ],
            vec![
                "   every task reported Started by its agent".into(),
                secs(f.agents_saw),
                refd(&|r| secs(r.agents_saw)),
                ratio(f.agents_saw, &|r| r.agents_saw),
                String::new(),
            ],
            vec![
                "   tasks placed per second, end to end".into(),
                format!("{:.0}", f.total as f64 / f.all_started.as_secs_f64()),
                refd(&|r| format!("{:.0}", r.total as f64 / r.all_started.as_secs_f64())),
                String::new(),
                String::new(),
            ],
            vec![
                format!(
                    "3. scheduler RSS, {nodes} nodes, {} tasks, {} jobs",
                    f.started, f.jobs
                ),
                format!("{} MiB", f.rss),
                refd(&|r| format!("{} MiB", r.rss)),
                String::new(),
                "< 2048 MiB".into(),
            ],
            vec![
                "4. SIGKILL -> restart -> every job listed again".into(),
                secs(f.served),
                refd(&|r| secs(r.served)),
                ratio(f.served, &|r| r.served),
                "< 10 s".into(),
            ],
            vec![
                "   jobs / Started tasks after restart".into(),
                format!("{} / {}", f.jobs_after, f.started_after),
                refd(&|r| format!("{} / {}", r.jobs_after, r.started_after)),
                String::new(),
                format!("{} / {}", f.jobs, f.started),
            ],
            vec![
                "   SIGKILL -> every simulated agent registered again".into(),
                secs(f.rejoined),
                refd(&|r| secs(r.rejoined)),
                ratio(f.rejoined, &|r| r.rejoined),
                String::new(),
            ],
        ],
    );
    Ok(())
}
