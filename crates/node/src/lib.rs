//! The imstate node: the I/O shell around the pure cores.
//!
//! ```text
//!   gRPC (tonic) ──► grpc::SequenceService ──► seqstore::SeqStore ──► imstate_seq::Allocator
//!                      errors → Status            │  raise records        (pure core)
//!                                                 ▼
//!                                        imstate_log::Log (WAL, group commit, checkpoints)
//!                                                 │
//!                                     datadir::DataDir (locked directory, FileStorage)
//! ```
//!
//! Layout:
//! - [`config`]: the node's configuration (TOML file and flags), with defaults that run.
//! - [`datadir`]: the data directory, locked against a second process.
//! - [`history`]: identity and history markers: refuse to start on a log whose history went
//!   missing.
//! - [`seqstore`]: the sequence service's state machine: allocator + log, persist before serve.
//! - [`presencestore`]: the presence registry + its log, expiry and checkpoint threads.
//! - [`autocheckpoint`]: when a store starts an automatic checkpoint (one at a time).
//! - [`clock`]: time as an input (wall clock, or a manual one in tests).
//! - [`records`]: the byte format of the sequence log records and checkpoints.
//! - [`grpc`]: the gRPC services (Sequence, Presence, Admin), the one place where domain errors
//!   become `tonic::Status`, and the edge layer (bearer tokens, per-call metrics).
//! - [`metrics`]: Prometheus metric names, the recorder, scrape-time gauges.
//! - [`http`]: the HTTP listener (`/metrics`, `/healthz`, `/readyz`), up before recovery.
//! - [`wire`]: the wire-protocol listener (the hot path in pipelined binary frames).
//! - [`server`]: start-up (recovery), TLS, serving, and clean shutdown.
//! - [`watch`]: the bounded fan-out of presence events to Watch subscribers.
//! - [`cluster`]: cluster mode's driver: the member and arbiter state machines of
//!   `imstate-cluster` run against etcd; the one ownership check and route-info source.
//! - [`clusterseq`]: the sequence service in cluster mode (`max_seq` in etcd, fenced).
//! - [`sequences`]: the sequence service as the front doors see it, embedded or cluster.

#![deny(missing_docs)]

// Planted bugs exist only to prove that the tests catch them; they must never ship.
#[cfg(all(feature = "planted-presence-ack-before-log", not(debug_assertions)))]
compile_error!("the `planted-presence-ack-before-log` feature is for test builds only");
#[cfg(all(feature = "planted-wire-ack-before-durable", not(debug_assertions)))]
compile_error!("the `planted-wire-ack-before-durable` feature is for test builds only");

pub mod autocheckpoint;
pub mod clock;
pub mod cluster;
pub mod clusterseq;
pub mod config;
pub mod datadir;
pub mod error;
pub mod grpc;
pub mod history;
pub mod http;
pub mod metrics;
pub mod presencestore;
pub mod records;
pub mod seqstore;
pub mod sequences;
pub mod server;
pub mod watch;
pub mod wire;

pub use config::NodeConfig;
pub use error::NodeError;
pub use server::{Listening, Node, run};
