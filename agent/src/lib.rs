//! Berth's node agent: runs the tasks the scheduler assigns through containerd, with cgroup
//! limits, and reports their state and usage back.
//!
//! - [`agent`]: the core loop and the connection to the scheduler.
//! - [`supervisor`]: one task's life, from image to exit.
//! - [`runtime`]: the containerd seam (images, snapshots, containers, tasks).
//! - [`oci`]: runtime spec and cgroup limits.
//! - [`pull`]: pulling images from OCI registries.
//! - [`logs`]: LogService over task output files.
//! - [`usage`]: cgroup usage readings.
//! - [`host`]: the host's capacity.
//! - [`store`]: the agent's durable record of its tasks.

pub mod agent;
pub mod host;
pub mod logs;
pub mod oci;
pub mod pull;
pub mod runtime;
pub mod store;
pub mod supervisor;
pub mod usage;

pub use agent::{AgentConfig, AgentError, run};

/// Largest message the agent accepts from the scheduler.
pub const MAX_MESSAGE_BYTES: usize = 4 << 20;
