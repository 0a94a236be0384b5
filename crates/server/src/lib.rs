//! The imstate front doors: everything between a client and the stores of `imstate-node`.
//!
//! ```text
//!   gRPC (tonic) ──► grpc::{SequenceService, PresenceService, AdminService} ─┐ errors → Status
//!   wire protocol ──► wire (pipelined binary frames, the hot path) ──────────┤ codes
//!   RESP (Redis clients) ──► resp (INCR, INCRBY, GET, MGET) ─────────────────┤
//!   HTTP ──► http (/metrics, /healthz, /readyz, up before recovery)          │
//!                                                                          ▼
//!                          imstate_node::sequences::Sequences, presencestore::PresenceStore
//! ```
//!
//! Layout:
//! - [`config`]: the node's configuration (TOML file, environment and flags), with defaults
//!   that run.
//! - [`grpc`]: the gRPC services, the one place where domain errors become `tonic::Status`,
//!   and the edge layer (bearer tokens, per-call metrics, limits).
//! - [`wire`]: the wire-protocol listener.
//! - [`resp`]: the RESP front door (Redis clients allocating sequences), off by default.
//! - [`follower`]: presence replication, the replica's side (the primary's side is the
//!   `Replication` gRPC service).
//! - [`http`]: the HTTP listener.
//! - [`server`]: start-up (data directory, recovery, cluster join), TLS, serving, and clean
//!   shutdown.

#![deny(missing_docs)]

// Planted bugs exist only to prove that the tests catch them; they must never ship.
#[cfg(all(feature = "planted-wire-ack-before-durable", not(debug_assertions)))]
compile_error!("the `planted-wire-ack-before-durable` feature is for test builds only");

pub mod config;
pub mod follower;
pub mod grpc;
pub mod http;
pub mod resp;
pub mod server;
pub mod wire;

pub use config::NodeConfig;
pub use server::{Listening, Node, run};
