//! Test harness: a real containerd (started by `scripts/containerd.sh`, or the one named by
//! `BERTH_TEST_CONTAINERD`), the test image, and in-process schedulers and agents on loopback.

#![allow(dead_code, missing_docs, clippy::unwrap_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use berth_agent::AgentConfig;
use berth_model::resources::Resources;
use berth_proto as pb;
use berth_scheduler::{ClusterConfig, api, cluster, store::Store};
use pb::job_service_client::JobServiceClient;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

pub const IMAGE: &str = "docker.io/library/busybox:local";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

struct Env {
    socket: PathBuf,
    image: PathBuf,
    _dir: tempfile::TempDir,
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = dir.path().join("busybox.tar");
        let out = std::process::Command::new(repo().join("scripts/build-test-image.sh"))
            .arg(&image)
            .output()
            .expect("run build-test-image.sh");
        assert!(
            out.status.success(),
            "build-test-image.sh: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let socket = match std::env::var_os("BERTH_TEST_CONTAINERD") {
            Some(s) => PathBuf::from(s),
            None => {
                let out = std::process::Command::new(repo().join("scripts/containerd.sh"))
                    .arg("start")
                    .arg(dir.path().join("containerd"))
                    .env("BERTH_WATCH_PID", std::process::id().to_string())
                    .output()
                    .expect("run containerd.sh");
                assert!(
                    out.status.success(),
                    "containerd.sh start: {}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
                PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
            }
        };
        Env {
            socket,
            image,
            _dir: dir,
        }
    })
}

pub fn containerd_socket() -> PathBuf {
    env().socket.clone()
}

/// A fresh containerd namespace per agent, so tests never see each other's containers.
pub fn namespace(test: &str) -> String {
    format!("berth-test-{test}-{}", std::process::id())
}

/// Imports the test image into `ns`.
pub async fn import_image(ns: &str) {
    let rt = berth_agent::runtime::Containerd::connect(&env().socket, ns)
        .await
        .expect("connect containerd");
    let names = rt
        .import_archive(&env().image)
        .await
        .expect("import test image");
    assert_eq!(names, vec![IMAGE.to_string()]);
}

pub struct Scheduler {
    pub addr: SocketAddr,
    pub cancel: CancellationToken,
    pub data: PathBuf,
    join: tokio::task::JoinHandle<()>,
}

impl Scheduler {
    pub async fn start(data: &Path, cfg: ClusterConfig) -> Scheduler {
        Self::start_at(data, cfg, "127.0.0.1:0".parse().expect("addr")).await
    }

    /// Starts on a given address, e.g. the one an earlier scheduler had.
    pub async fn start_at(data: &Path, cfg: ClusterConfig, at: SocketAddr) -> Scheduler {
        std::fs::create_dir_all(data).expect("data dir");
        let store = Store::open_redb(&data.join("scheduler.redb")).expect("store");
        let cancel = CancellationToken::new();
        let (handle, actor) = cluster::spawn(store, cfg, cancel.clone()).expect("cluster");
        let listener = tokio::net::TcpListener::bind(at).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let c = cancel.clone();
        let join = tokio::spawn(async move {
            let _ = api::serve(api::router(handle), listener, c).await;
            let _ = actor.await;
        });
        Scheduler {
            addr,
            cancel,
            data: data.to_path_buf(),
            join,
        }
    }

    pub async fn stop(self) {
        self.cancel.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.join).await;
    }

    pub async fn client(&self) -> JobServiceClient<Channel> {
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", self.addr))
            .expect("endpoint")
            .connect()
            .await
            .expect("connect scheduler");
        JobServiceClient::new(ch)
    }
}

pub struct Agent {
    pub node_id: String,
    pub namespace: String,
    pub data: PathBuf,
    pub cancel: CancellationToken,
    join: tokio::task::JoinHandle<()>,
}

impl Agent {
    /// Starts an agent with its own data dir, containerd namespace and log service.
    pub async fn start(
        node_id: &str,
        sched: &Scheduler,
        data: &Path,
        ns: &str,
        capacity: Option<Resources>,
    ) -> Agent {
        Self::start_with(node_id, sched, data, ns, capacity, false).await
    }

    /// As `start`; with `drain`, stopping the agent drains it.
    pub async fn start_with(
        node_id: &str,
        sched: &Scheduler,
        data: &Path,
        ns: &str,
        capacity: Option<Resources>,
        drain: bool,
    ) -> Agent {
        import_image(ns).await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let log_address = listener.local_addr().expect("addr").to_string();
        let cancel = CancellationToken::new();
        let logs = berth_agent::logs::LogApi::server(data.to_path_buf());
        let c = cancel.clone();
        let server = tonic::transport::Server::builder()
            .add_service(logs)
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                async move { c.cancelled().await },
            );
        let cfg = AgentConfig {
            node_id: node_id.to_string(),
            scheduler: format!("http://{}", sched.addr),
            containerd: env().socket.clone(),
            namespace: ns.to_string(),
            data_dir: data.to_path_buf(),
            reserved: Resources::default(),
            capacity,
            attributes: HashMap::from([("zone".to_string(), "test".to_string())]),
            log_address,
            drain_on_stop: drain,
            log_retention: Duration::from_secs(3600),
        };
        let c = cancel.clone();
        let join = tokio::spawn(async move {
            let (r, _) = tokio::join!(berth_agent::run(cfg, c), server);
            r.expect("agent run");
        });
        Agent {
            node_id: node_id.to_string(),
            namespace: ns.to_string(),
            data: data.to_path_buf(),
            cancel,
            join,
        }
    }

    /// Stops the agent process; its containers keep running.
    pub async fn stop(self) {
        self.cancel.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.join).await;
    }
}

/// Kills and removes every container left in `ns`.
pub async fn clean_namespace(ns: &str) {
    let rt = berth_agent::runtime::Containerd::connect(&env().socket, ns)
        .await
        .expect("connect");
    for (id, _) in rt.berth_containers().await.expect("list") {
        let _ = rt.kill(&id, 9).await;
        for _ in 0..50 {
            if !matches!(
                rt.status(&id).await,
                Ok(berth_agent::runtime::TaskStatus::Running)
            ) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let _ = rt.remove(&id).await;
    }
}

/// A spec for the test image running `sh -c script`.
pub fn spec(name: &str, job_type: pb::JobType, tasks: u32, script: &str) -> pb::JobSpec {
    pb::JobSpec {
        name: name.to_string(),
        r#type: job_type as i32,
        tasks,
        container: Some(pb::Container {
            image: IMAGE.to_string(),
            command: vec!["sh".into(), "-c".into(), script.into()],
            resources: Some(pb::Resources {
                cpu_millis: 100,
                memory_mib: 64,
                ..Default::default()
            }),
            kill_grace_ms: 10_000,
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub async fn create(c: &mut JobServiceClient<Channel>, spec: pb::JobSpec) -> pb::Job {
    c.create_job(pb::CreateJobRequest { spec: Some(spec) })
        .await
        .expect("create job")
        .into_inner()
        .job
        .expect("job")
}

pub async fn get(c: &mut JobServiceClient<Channel>, id: &str) -> (pb::Job, Vec<pb::Task>) {
    let r = c
        .get_job(pb::GetJobRequest { id: id.to_string() })
        .await
        .expect("get job")
        .into_inner();
    (r.job.expect("job"), r.tasks)
}

/// Polls the job until `done` holds; panics with the job's state after `limit`.
pub async fn wait_until(
    c: &mut JobServiceClient<Channel>,
    id: &str,
    limit: Duration,
    done: impl Fn(&pb::Job, &[pb::Task]) -> bool,
) -> (pb::Job, Vec<pb::Task>) {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let (job, tasks) = get(c, id).await;
        if done(&job, &tasks) {
            return (job, tasks);
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting on job {id}: {job:#?}\n{tasks:#?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every node as the scheduler lists it.
pub async fn list_nodes(c: &mut JobServiceClient<Channel>) -> Vec<pb::Node> {
    c.list_nodes(pb::ListNodesRequest {})
        .await
        .expect("list nodes")
        .into_inner()
        .nodes
}

pub fn is_state(t: &pb::Task, s: pb::TaskState) -> bool {
    t.state == s as i32
}

pub fn job_done(j: &pb::Job) -> bool {
    matches!(
        pb::JobState::try_from(j.state),
        Ok(pb::JobState::Succeeded | pb::JobState::Failed | pb::JobState::Killed)
    )
}

/// The `berth` binary, built by `scripts/test.sh` (or named by BERTH_BIN).
pub fn berth_bin() -> PathBuf {
    if let Some(b) = std::env::var_os("BERTH_BIN") {
        return PathBuf::from(b);
    }
    // target/debug/deps/e2e-xxxx -> target/debug/berth
    let exe = std::env::current_exe().expect("current exe");
    let bin = exe
        .parent()
        .and_then(|p| p.parent())
        .map(|p| p.join("berth"))
        .expect("target dir");
    assert!(
        bin.exists(),
        "{} not found: run `cargo build --bin berth` or scripts/test.sh",
        bin.display()
    );
    bin
}

/// Debian's docker-registry on a loopback port, with filesystem storage under a temp dir.
pub struct Registry {
    pub addr: String,
    log: PathBuf,
    _child: tokio::process::Child,
}

impl Registry {
    pub async fn start(dir: &Path) -> Registry {
        std::fs::create_dir_all(dir).unwrap();
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let addr = format!("127.0.0.1:{port}");
        let config = dir.join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
                dir.join("data").display()
            ),
        )
        .unwrap();
        let log = dir.join("registry.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = tokio::process::Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .kill_on_drop(true)
            .spawn()
            .expect("docker-registry (apt-get install docker-registry)");
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(&addr).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Registry {
            addr,
            log,
            _child: child,
        }
    }

    /// Pushes the test image with skopeo; returns the reference to pull.
    pub async fn push_test_image(&self, repo_tag: &str) -> String {
        let reference = format!("{}/{repo_tag}", self.addr);
        let out = tokio::process::Command::new("skopeo")
            .args(["copy", "--dest-tls-verify=false"])
            .arg(format!("oci-archive:{}", env().image.display()))
            .arg(format!("docker://{reference}"))
            .output()
            .await
            .expect("skopeo (apt-get install skopeo)");
        assert!(
            out.status.success(),
            "skopeo copy: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        reference
    }

    /// GET requests for manifests the registry has served so far (from its access log).
    pub fn manifest_gets(&self) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| {
                l.contains("\"GET /v2/") && l.contains("/manifests/") && l.contains("\" 200 ")
            })
            .count()
    }
}

/// A real `berth agent` process (so that it can be SIGKILLed and its memory measured).
pub fn spawn_agent_process(
    node_id: &str,
    sched: SocketAddr,
    ns: &str,
    data: &Path,
    extra: &[&str],
) -> tokio::process::Child {
    tokio::process::Command::new(berth_bin())
        .args([
            "agent",
            "--node-id",
            node_id,
            "--scheduler",
            &sched.to_string(),
            "--namespace",
            ns,
            "--listen",
            "127.0.0.1:0",
        ])
        .arg("--containerd")
        .arg(containerd_socket())
        .arg("--data-dir")
        .arg(data)
        .args(extra)
        .env("BERTH_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}
