//! Generated types of the imstate wire protocol (`proto/imstate.proto`).
//!
//! These types stay at the edge: the node converts them to domain types in one place per message
//! and the cores never see them.

#![allow(missing_docs, clippy::all)]

/// Version 1 of the protocol.
pub mod v1 {
    tonic::include_proto!("imstate.v1");
}
