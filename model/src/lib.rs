//! Berth's domain types, shared by the scheduler, the agent and the CLI.
//!
//! - [`quantity`]: Kubernetes-style quantities (`500m`, `64Mi`) and durations (`10s`).
//! - [`constraint`]: placement constraints (`unique_host`, `zone in [a, b]`, ...).
//! - [`image_ref`]: parsing and normalising OCI image references.
//! - [`resources`]: multi-resource vectors for requests and capacity.
//! - [`spec`]: the job spec as users write it (YAML/JSON) and its validation.
//! - [`task`]: the task lifecycle state machine, a pure transition function.

pub mod constraint;
pub mod image_ref;
pub mod quantity;
pub mod resources;
pub mod spec;
pub mod task;

pub use berth_proto as proto;

/// Milliseconds since the Unix epoch, the timestamp unit of the API.
pub fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
