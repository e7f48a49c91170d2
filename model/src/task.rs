//! The task lifecycle, as a pure state machine.
//!
//! ```text
//!  Accepted ──Placed──> Launched ──Starting──> StartInitiated ──Running──> Started
//!     │                    │  └────────────Running──────────────────────────┘ │
//!     │                    └──────────┬─────────────┬───────────────────────┘
//!     │                          KillRequested   Exited / NodeLost
//!     │                               v             │
//!     │                         KillInitiated ──Exited / NodeLost──┐
//!     │                                                            v
//!     └──────────────KillRequested─────────────────────────> Finished(reason)
//! ```
//!
//! [`step`] only decides; the scheduler runs the [`Effect`]s it returns (send an assignment or
//! a kill order, release the node's resources) and persists the new state.

use std::fmt;

use berth_proto as pb;

/// Why a task finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FinishReason {
    /// Exited with code 0.
    Normal,
    /// Exited with a non-zero code.
    Failed {
        /// The container's exit code.
        exit_code: i32,
    },
    /// Killed on request.
    Killed,
    /// Its node stopped answering.
    Lost,
    /// Killed by the kernel for exceeding its memory limit.
    OomKilled,
    /// Ran longer than the job's runtime limit.
    RuntimeLimitExceeded,
    /// The agent could not run it as specified.
    InvalidRequest,
    /// The image could not be found or unpacked.
    ImageError,
    /// The node failed (containerd, disk, cgroups).
    LocalSystemError,
    /// Killed to make room for a critical task; requeued without using up a retry.
    Preempted,
}

/// A task's lifecycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TaskState {
    /// Stored, waiting for a node.
    Accepted,
    /// Assigned to a node; the agent has not confirmed yet.
    Launched,
    /// The agent is preparing the image and container.
    StartInitiated,
    /// The container's process runs.
    Started,
    /// A kill order was sent; waiting for the exit.
    KillInitiated,
    /// Terminal.
    Finished(FinishReason),
}

/// Something that happened to a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TaskEvent {
    /// The scheduler picked a node.
    Placed,
    /// The agent began preparing the task.
    Starting,
    /// The agent started the container.
    Running,
    /// A user, a job kill or the scheduler asked for the task to end.
    KillRequested,
    /// The agent reports the task ended (or could not start) for this reason.
    Exited(FinishReason),
    /// The node was declared lost.
    NodeLost,
}

/// What the caller must do after a transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Effect {
    /// Send the assignment to the task's node.
    SendAssignment,
    /// Send a kill order to the task's node.
    SendKill,
    /// Give the task's resources back to its node.
    ReleaseResources,
}

/// An event that is not legal in the current state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("task in state {from} cannot take event {event:?}")]
pub struct TransitionError {
    /// The state the task was in; it is unchanged.
    pub from: TaskState,
    /// The rejected event.
    pub event: TaskEvent,
}

impl TaskState {
    /// Whether the task reached a terminal state.
    pub fn is_finished(self) -> bool {
        matches!(self, TaskState::Finished(_))
    }

    /// Whether the task holds resources on a node.
    pub fn is_on_node(self) -> bool {
        matches!(
            self,
            TaskState::Launched
                | TaskState::StartInitiated
                | TaskState::Started
                | TaskState::KillInitiated
        )
    }

    /// The wire form: (state, reason, exit code).
    pub fn to_proto(self) -> (pb::TaskState, pb::FinishReason, i32) {
        use pb::FinishReason as R;
        match self {
            TaskState::Accepted => (pb::TaskState::Accepted, R::Unspecified, 0),
            TaskState::Launched => (pb::TaskState::Launched, R::Unspecified, 0),
            TaskState::StartInitiated => (pb::TaskState::StartInitiated, R::Unspecified, 0),
            TaskState::Started => (pb::TaskState::Started, R::Unspecified, 0),
            TaskState::KillInitiated => (pb::TaskState::KillInitiated, R::Unspecified, 0),
            TaskState::Finished(reason) => {
                let (r, code) = reason.to_proto();
                (pb::TaskState::Finished, r, code)
            }
        }
    }

    /// Reads the wire form; `None` for unspecified or unknown values.
    pub fn from_proto(state: i32, reason: i32, exit_code: i32) -> Option<TaskState> {
        Some(match pb::TaskState::try_from(state).ok()? {
            pb::TaskState::Unspecified => return None,
            pb::TaskState::Accepted => TaskState::Accepted,
            pb::TaskState::Launched => TaskState::Launched,
            pb::TaskState::StartInitiated => TaskState::StartInitiated,
            pb::TaskState::Started => TaskState::Started,
            pb::TaskState::KillInitiated => TaskState::KillInitiated,
            pb::TaskState::Finished => {
                TaskState::Finished(FinishReason::from_proto(reason, exit_code)?)
            }
        })
    }
}

impl FinishReason {
    /// Whether the task did what it was asked to.
    pub fn is_success(self) -> bool {
        self == FinishReason::Normal
    }

    /// The wire form: (reason, exit code).
    pub fn to_proto(self) -> (pb::FinishReason, i32) {
        use pb::FinishReason as R;
        match self {
            FinishReason::Normal => (R::Normal, 0),
            FinishReason::Failed { exit_code } => (R::Failed, exit_code),
            FinishReason::Killed => (R::Killed, 0),
            FinishReason::Lost => (R::Lost, 0),
            FinishReason::OomKilled => (R::OomKilled, 137),
            FinishReason::RuntimeLimitExceeded => (R::RuntimeLimitExceeded, 0),
            FinishReason::InvalidRequest => (R::InvalidRequest, 0),
            FinishReason::ImageError => (R::ImageError, 0),
            FinishReason::LocalSystemError => (R::LocalSystemError, 0),
            FinishReason::Preempted => (R::Preempted, 0),
        }
    }

    /// Reads the wire form; `None` for unspecified or unknown values.
    pub fn from_proto(reason: i32, exit_code: i32) -> Option<FinishReason> {
        use pb::FinishReason as R;
        Some(match R::try_from(reason).ok()? {
            R::Unspecified => return None,
            R::Normal => FinishReason::Normal,
            R::Failed => FinishReason::Failed { exit_code },
            R::Killed => FinishReason::Killed,
            R::Lost => FinishReason::Lost,
            R::OomKilled => FinishReason::OomKilled,
            R::RuntimeLimitExceeded => FinishReason::RuntimeLimitExceeded,
            R::InvalidRequest => FinishReason::InvalidRequest,
            R::ImageError => FinishReason::ImageError,
            R::LocalSystemError => FinishReason::LocalSystemError,
            R::Preempted => FinishReason::Preempted,
        })
    }

    /// From a container's exit code.
    pub fn from_exit_code(exit_code: i32) -> FinishReason {
        if exit_code == 0 {
            FinishReason::Normal
        } else {
            FinishReason::Failed { exit_code }
        }
    }
}

impl fmt::Display for FinishReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FinishReason::Normal => f.write_str("normal"),
            FinishReason::Failed { exit_code } => write!(f, "failed, exit code {exit_code}"),
            FinishReason::Killed => f.write_str("killed"),
            FinishReason::Lost => f.write_str("lost"),
            FinishReason::OomKilled => f.write_str("oom_killed"),
            FinishReason::RuntimeLimitExceeded => f.write_str("runtime_limit_exceeded"),
            FinishReason::InvalidRequest => f.write_str("invalid_request"),
            FinishReason::ImageError => f.write_str("image_error"),
            FinishReason::LocalSystemError => f.write_str("local_system_error"),
            FinishReason::Preempted => f.write_str("preempted"),
        }
    }
}

impl fmt::Display for TaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TaskState::Accepted => f.write_str("Accepted"),
            TaskState::Launched => f.write_str("Launched"),
            TaskState::StartInitiated => f.write_str("StartInitiated"),
            TaskState::Started => f.write_str("Started"),
            TaskState::KillInitiated => f.write_str("KillInitiated"),
            TaskState::Finished(r) => write!(f, "Finished({r})"),
        }
    }
}

/// The transition function: the next state and the effects to run, or why the event is illegal.
pub fn step(
    state: TaskState,
    event: TaskEvent,
) -> Result<(TaskState, Vec<Effect>), TransitionError> {
    use TaskEvent as E;
    use TaskState as S;
    let illegal = Err(TransitionError { from: state, event });
    match (state, event) {
        (S::Accepted, E::Placed) => Ok((S::Launched, vec![Effect::SendAssignment])),
        (S::Accepted, E::KillRequested) => Ok((S::Finished(FinishReason::Killed), vec![])),
        (S::Launched, E::Starting) => Ok((S::StartInitiated, vec![])),
        (S::Launched | S::StartInitiated, E::Running) => Ok((S::Started, vec![])),
        (S::Launched | S::StartInitiated | S::Started, E::KillRequested) => {
            Ok((S::KillInitiated, vec![Effect::SendKill]))
        }
        (S::Launched | S::StartInitiated | S::Started, E::Exited(reason)) => {
            Ok((S::Finished(reason), vec![Effect::ReleaseResources]))
        }
        // A task we asked to stop ended: that is a kill, unless the kernel or the runtime
        // limit got there first.
        (S::KillInitiated, E::Exited(reason)) => {
            let reason = match reason {
                FinishReason::OomKilled | FinishReason::RuntimeLimitExceeded => reason,
                _ => FinishReason::Killed,
            };
            Ok((S::Finished(reason), vec![Effect::ReleaseResources]))
        }
        (S::Launched | S::StartInitiated | S::Started | S::KillInitiated, E::NodeLost) => Ok((
            S::Finished(FinishReason::Lost),
            vec![Effect::ReleaseResources],
        )),
        _ => illegal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_states() -> Vec<TaskState> {
        let mut v = vec![
            TaskState::Accepted,
            TaskState::Launched,
            TaskState::StartInitiated,
            TaskState::Started,
            TaskState::KillInitiated,
        ];
        v.extend(all_reasons().into_iter().map(TaskState::Finished));
        v
    }

    fn all_reasons() -> Vec<FinishReason> {
        vec![
            FinishReason::Normal,
            FinishReason::Failed { exit_code: 3 },
            FinishReason::Killed,
            FinishReason::Lost,
            FinishReason::OomKilled,
            FinishReason::RuntimeLimitExceeded,
            FinishReason::InvalidRequest,
            FinishReason::ImageError,
            FinishReason::LocalSystemError,
        ]
    }

    fn all_events() -> Vec<TaskEvent> {
        let mut v = vec![
            TaskEvent::Placed,
            TaskEvent::Starting,
            TaskEvent::Running,
            TaskEvent::KillRequested,
            TaskEvent::NodeLost,
        ];
        v.extend(all_reasons().into_iter().map(TaskEvent::Exited));
        v
    }

    /// The table written out by hand, independently of `step`'s match arms.
    fn expected(state: TaskState, event: TaskEvent) -> Option<(TaskState, Vec<Effect>)> {
        use TaskEvent as E;
        use TaskState as S;
        let release = vec![Effect::ReleaseResources];
        match state {
            S::Accepted => match event {
                E::Placed => Some((S::Launched, vec![Effect::SendAssignment])),
                E::KillRequested => Some((S::Finished(FinishReason::Killed), vec![])),
                _ => None,
            },
            S::Launched => match event {
                E::Starting => Some((S::StartInitiated, vec![])),
                E::Running => Some((S::Started, vec![])),
                E::KillRequested => Some((S::KillInitiated, vec![Effect::SendKill])),
                E::Exited(r) => Some((S::Finished(r), release)),
                E::NodeLost => Some((S::Finished(FinishReason::Lost), release)),
                E::Placed => None,
            },
            S::StartInitiated => match event {
                E::Running => Some((S::Started, vec![])),
                E::KillRequested => Some((S::KillInitiated, vec![Effect::SendKill])),
                E::Exited(r) => Some((S::Finished(r), release)),
                E::NodeLost => Some((S::Finished(FinishReason::Lost), release)),
                E::Placed | E::Starting => None,
            },
            S::Started => match event {
                E::KillRequested => Some((S::KillInitiated, vec![Effect::SendKill])),
                E::Exited(r) => Some((S::Finished(r), release)),
                E::NodeLost => Some((S::Finished(FinishReason::Lost), release)),
                E::Placed | E::Starting | E::Running => None,
            },
            S::KillInitiated => match event {
                E::Exited(FinishReason::OomKilled) => {
                    Some((S::Finished(FinishReason::OomKilled), release))
                }
                E::Exited(FinishReason::RuntimeLimitExceeded) => {
                    Some((S::Finished(FinishReason::RuntimeLimitExceeded), release))
                }
                E::Exited(_) => Some((S::Finished(FinishReason::Killed), release)),
                E::NodeLost => Some((S::Finished(FinishReason::Lost), release)),
                E::Placed | E::Starting | E::Running | E::KillRequested => None,
            },
            S::Finished(_) => None,
        }
    }

    #[test]
    fn every_state_event_pair() {
        let mut legal = 0;
        for s in all_states() {
            for e in all_events() {
                match (step(s, e), expected(s, e)) {
                    (Ok(got), Some(want)) => {
                        assert_eq!(got, want, "{s} + {e:?}");
                        legal += 1;
                    }
                    (Err(err), None) => assert_eq!(err, TransitionError { from: s, event: e }),
                    (got, want) => panic!("{s} + {e:?}: got {got:?}, want {want:?}"),
                }
            }
        }
        // 2 from Accepted, 4 x 14 from the four live states minus the illegal ones.
        assert_eq!(legal, 2 + (3 + 9 + 1) + (2 + 9 + 1) + (1 + 9 + 1) + (9 + 1));
    }

    #[test]
    fn proto_round_trip() {
        for s in all_states() {
            let (st, r, code) = s.to_proto();
            assert_eq!(TaskState::from_proto(st as i32, r as i32, code), Some(s));
        }
        assert_eq!(TaskState::from_proto(0, 0, 0), None);
        assert_eq!(TaskState::from_proto(99, 0, 0), None);
        assert_eq!(
            TaskState::from_proto(pb::TaskState::Finished as i32, 0, 0),
            None,
            "a finished task needs a reason"
        );
    }
}
