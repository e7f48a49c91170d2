//! The agent protocol under hostile input: a test client speaks AgentService directly and
//! tries to corrupt the scheduler's state. No containerd is involved; the "agents" here are
//! protocol peers, not fakes of a seam.

// Test helpers outside #[test] fns unwrap like the tests do.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use berth_proto as pb;
use berth_scheduler::ClusterConfig;
use pb::agent_message::Msg;
use support::*;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

struct Peer {
    out: mpsc::Sender<pb::AgentMessage>,
    inbound: Streaming<pb::SchedulerMessage>,
}

async fn connect(sched: &Scheduler, register: pb::Register) -> Result<Peer, tonic::Status> {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", sched.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let (out, rx) = mpsc::channel(64);
    out.send(pb::AgentMessage {
        msg: Some(Msg::Register(register)),
    })
    .await
    .unwrap();
    let inbound = pb::agent_service_client::AgentServiceClient::new(ch)
        .connect(ReceiverStream::new(rx))
        .await?
        .into_inner();
    Ok(Peer { out, inbound })
}

fn register(node_id: &str, cpu: u32) -> pb::Register {
    pb::Register {
        node_id: node_id.into(),
        capacity: Some(pb::Resources {
            cpu_millis: cpu,
            memory_mib: 4096,
            disk_mib: 4096,
            gpus: 0,
            network_mbps: 100,
        }),
        ..Default::default()
    }
}

fn status(task_id: &str, state: pb::TaskState, reason: pb::FinishReason) -> pb::AgentMessage {
    pb::AgentMessage {
        msg: Some(Msg::Status(pb::TaskStatus {
            task_id: task_id.into(),
            state: state as i32,
            reason: reason as i32,
            ..Default::default()
        })),
    }
}

impl Peer {
    /// The next order, skipping Registered.
    async fn next_order(&mut self) -> pb::scheduler_message::Msg {
        loop {
            let m = tokio::time::timeout(Duration::from_secs(10), self.inbound.message())
                .await
                .expect("an order within 10s")
                .expect("stream ok")
                .expect("stream open");
            match m.msg.expect("a message") {
                pb::scheduler_message::Msg::Registered(_) => continue,
                other => return other,
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malicious_agent_cannot_corrupt_scheduler_state() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = ClusterConfig {
        heartbeat_timeout: Duration::from_secs(30),
        ..Default::default()
    };
    let sched = Scheduler::start(&dir.path().join("s"), cfg).await;
    let mut c = sched.client().await;

    // Malformed registrations are refused.
    let e = connect(&sched, register("../../etc", 1000))
        .await
        .err()
        .expect("bad node id refused");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    let e = connect(
        &sched,
        pb::Register {
            node_id: "x".into(),
            capacity: None,
            ..Default::default()
        },
    )
    .await
    .err()
    .expect("no capacity refused");
    assert!(e.message().contains("capacity"), "{}", e.message());

    let mut good = connect(&sched, register("good", 4000)).await.unwrap();
    let mut evil = connect(&sched, register("evil", 0)).await.unwrap();
    let job = create(
        &mut c,
        spec("victim", pb::JobType::Service, 1, "exec sleep 1000"),
    )
    .await;
    let assign = match good.next_order().await {
        pb::scheduler_message::Msg::Assign(a) => a,
        other => panic!("expected an assignment, got {other:?}"),
    };
    good.out
        .send(status(
            &assign.task_id,
            pb::TaskState::Started,
            pb::FinishReason::Unspecified,
        ))
        .await
        .unwrap();
    wait_until(&mut c, &job.id, Duration::from_secs(10), |_, t| {
        is_state(&t[0], pb::TaskState::Started)
    })
    .await;

    // The evil node claims the good node's task finished, runs it, and reports usage for it.
    evil.out
        .send(status(
            &assign.task_id,
            pb::TaskState::Finished,
            pb::FinishReason::Normal,
        ))
        .await
        .unwrap();
    evil.out
        .send(status(
            &assign.task_id,
            pb::TaskState::Started,
            pb::FinishReason::Unspecified,
        ))
        .await
        .unwrap();
    evil.out
        .send(pb::AgentMessage {
            msg: Some(Msg::Heartbeat(pb::Heartbeat {
                usage: vec![pb::TaskUsage {
                    task_id: assign.task_id.clone(),
                    usage: Some(pb::Usage {
                        cpu_nanos: u64::MAX,
                        memory_bytes: u64::MAX,
                    }),
                }],
            })),
        })
        .await
        .unwrap();
    // ...and reports tasks nobody assigned, and statuses with states that do not exist.
    evil.out
        .send(status(
            "made-up-task",
            pb::TaskState::Started,
            pb::FinishReason::Unspecified,
        ))
        .await
        .unwrap();
    evil.out
        .send(pb::AgentMessage {
            msg: Some(Msg::Status(pb::TaskStatus {
                task_id: assign.task_id.clone(),
                state: 99,
                reason: -5,
                ..Default::default()
            })),
        })
        .await
        .unwrap();
    evil.out.send(pb::AgentMessage { msg: None }).await.unwrap();
    evil.out
        .send(pb::AgentMessage {
            msg: Some(Msg::Register(register("good", 1))),
        })
        .await
        .unwrap();

    // The scheduler answers copies it did not place with kill orders to the evil node only.
    let mut killed = std::collections::BTreeSet::new();
    while killed.len() < 2 {
        match evil.next_order().await {
            pb::scheduler_message::Msg::Kill(k) => {
                killed.insert(k.task_id);
            }
            other => panic!("evil got {other:?}"),
        }
    }
    assert_eq!(
        killed,
        [assign.task_id.clone(), "made-up-task".to_string()].into()
    );

    // The real task is untouched: still Started on the good node, usage not taken from evil.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (job_now, tasks) = get(&mut c, &job.id).await;
    assert_eq!(job_now.state, pb::JobState::Active as i32);
    assert_eq!(tasks.len(), 1, "{tasks:#?}");
    assert!(is_state(&tasks[0], pb::TaskState::Started));
    assert_eq!(tasks[0].node_id, "good");
    assert!(tasks[0].usage.is_none_or(|u| u.cpu_nanos != u64::MAX));
    let nodes = list_nodes(&mut c).await;
    let good_node = nodes.iter().find(|n| n.id == "good").unwrap();
    assert_eq!(
        good_node.capacity.unwrap().cpu_millis,
        4000,
        "a second Register on a stream is ignored"
    );

    // The good node still drives its task.
    good.out
        .send(status(
            &assign.task_id,
            pb::TaskState::Finished,
            pb::FinishReason::Failed,
        ))
        .await
        .unwrap();
    let (_, tasks) = wait_until(&mut c, &job.id, Duration::from_secs(10), |_, t| {
        t.len() == 2
    })
    .await;
    assert!(
        tasks
            .iter()
            .any(|t| t.reason == pb::FinishReason::Failed as i32 && t.node_id == "good")
    );

    // A message over the size limit is refused without harm.
    let huge = pb::AgentMessage {
        msg: Some(Msg::Heartbeat(pb::Heartbeat {
            usage: vec![pb::TaskUsage {
                task_id: "x".repeat(5 << 20),
                usage: None,
            }],
        })),
    };
    let _ = evil.out.send(huge).await;
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match evil.inbound.message().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the oversized stream is closed");
    assert!(
        end.is_err() || end.as_ref().is_ok_and(|m| m.is_none()),
        "{end:?}"
    );
    let (job_now, _) = get(&mut c, &job.id).await;
    assert_eq!(job_now.state, pb::JobState::Active as i32);
    sched.stop().await;
}
