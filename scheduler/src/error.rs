//! Scheduler errors and their one mapping to gRPC status codes.

use berth_model::spec::ValidationErrors;

use crate::store::StoreError;

/// What can go wrong serving a request.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    /// The caller sent something invalid; nothing changed.
    #[error("{0}")]
    Invalid(#[from] ValidationErrors),
    /// The caller sent a malformed field outside a job spec.
    #[error("{field}: {reason}")]
    BadField {
        /// The request field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// An active job already has this name.
    #[error("an active job named `{0}` already exists")]
    NameTaken(String),
    /// No such job, task or node.
    #[error("{kind} `{id}` not found")]
    NotFound {
        /// `job`, `task` or `node`.
        kind: &'static str,
        /// What was asked for.
        id: String,
    },
    /// The request does not apply in the current state.
    #[error("{0}")]
    Precondition(String),
    /// The store failed; the change was not made.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The batch this request was in could not be stored; retry.
    #[error("the change could not be stored ({0}); retry")]
    CommitFailed(String),
    /// The scheduler is shutting down.
    #[error("scheduler is shutting down")]
    ShuttingDown,
}

impl From<SchedulerError> for tonic::Status {
    fn from(e: SchedulerError) -> Self {
        let msg = e.to_string();
        match e {
            SchedulerError::Invalid(_) | SchedulerError::BadField { .. } => {
                tonic::Status::invalid_argument(msg)
            }
            SchedulerError::NameTaken(_) => tonic::Status::already_exists(msg),
            SchedulerError::NotFound { .. } => tonic::Status::not_found(msg),
            SchedulerError::Precondition(_) => tonic::Status::failed_precondition(msg),
            SchedulerError::Store(_) => tonic::Status::internal(msg),
            SchedulerError::CommitFailed(_) | SchedulerError::ShuttingDown => {
                tonic::Status::unavailable(msg)
            }
        }
    }
}
