//! Berth's scheduler: accepts jobs over gRPC, keeps them durable, and places their tasks onto
//! agents' nodes.
//!
//! - [`cluster`]: the actor that owns all cluster state.
//! - [`placement`]: the placement engine: indexed multi-resource bin-packing under constraints.
//! - [`quota`]: capacity groups, tiers and fair (DRF) ordering.
//! - [`preempt`]: choosing flex tasks to preempt for a critical one.
//! - [`store`]: the durable store (embedded redb).
//! - [`api`]: the gRPC services (JobService, AgentService).

pub mod api;
pub mod cluster;
pub mod error;
pub mod placement;
pub mod preempt;
pub mod quota;
pub mod store;

pub use cluster::{ClusterConfig, ClusterHandle};
pub use error::SchedulerError;
pub use placement::Strategy;
