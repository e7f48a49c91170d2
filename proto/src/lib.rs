//! Berth's gRPC API (`berth.v1`), generated from `proto/berth/v1/berth.proto`.
//!
//! Re-exports the generated messages and the tonic clients and servers. Domain logic lives
//! elsewhere; this crate only carries the wire format.

#![allow(missing_docs, clippy::derive_partial_eq_without_eq)]

/// `berth.v1`: jobs, tasks, nodes and the agent protocol.
pub mod v1 {
    tonic::include_proto!("berth.v1");
}

pub use v1::*;
