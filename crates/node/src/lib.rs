//! The imstate node's stores: the I/O shell around the pure cores, without the transports
//! (the front doors are `imstate-server`).
//!
//! ```text
//!  front doors (imstate-server) ──► sequences::Sequences ──► seqengine::SeqEngine ──► Allocator
//!                                         │                       │ MaxSeqStore     (pure core)
//!                                         │            ┌──────────┴───────────┐
//!                                         │   seqstore::LogMaxSeq     clusterseq::ClusterMaxSeq
//!                                         │   (imstate_log::Log)      (cluster::Cluster, etcd)
//!                                         └─► presencestore::PresenceStore ──► Registry + Log
//! ```
//!
//! Layout:
//! - [`datadir`]: the data directory, locked against a second process.
//! - [`history`]: identity and history markers: refuse to start on a log whose history went
//!   missing.
//! - [`seqengine`]: the sequence engine of both modes over a `MaxSeqStore` backend (the
//!   local log, or etcd with the ownership check).
//! - [`seqstore`]: the embedded sequence store: the engine over the local log, recovery,
//!   namespaces, checkpoints.
//! - [`clusterseq`]: the sequence store in cluster mode (`max_seq` in etcd, fenced).
//! - [`cluster`]: cluster mode's driver: the member and arbiter state machines of
//!   `imstate-cluster` run against etcd; the one ownership check and route-info source.
//! - [`sequences`]: the sequence service as the front doors see it, embedded or cluster.
//! - [`presencestore`]: the presence registry + its log, expiry and checkpoint threads.
//! - [`watch`]: the bounded fan-out of presence events to Watch subscribers.
//! - [`syncacks`]: synchronous replication: writes wait for in-sync replicas' acknowledgements.
//! - [`parts`]: checkpoint parts of this node's primary slots, built by their replicas.
//! - [`feed`]: the bounded ring of recent presence change records that replicas follow.
//! - [`autocheckpoint`]: when a store starts an automatic checkpoint (one at a time).
//! - [`clock`]: time as an input (wall clock, or a manual one in tests).
//! - [`records`]: the byte format of the sequence log records and checkpoints.
//! - [`metrics`]: Prometheus metric names, the recorder, scrape-time gauges.
//! - [`error`]: [`NodeError`], what every store returns (the front doors map it to codes).

#![deny(missing_docs)]

// Planted bugs exist only to prove that the tests catch them; they must never ship.
#[cfg(all(feature = "planted-presence-ack-before-log", not(debug_assertions)))]
compile_error!("the `planted-presence-ack-before-log` feature is for test builds only");
#[cfg(all(feature = "planted-unload-current-tenure", not(debug_assertions)))]
compile_error!("the `planted-unload-current-tenure` feature is for test builds only");
#[cfg(all(feature = "planted-load-overwrites-tenure", not(debug_assertions)))]
compile_error!("the `planted-load-overwrites-tenure` feature is for test builds only");
#[cfg(all(feature = "planted-ack-before-replica", not(debug_assertions)))]
compile_error!("the `planted-ack-before-replica` feature is for test builds only");
#[cfg(all(feature = "planted-deposed-primary-writes", not(debug_assertions)))]
compile_error!("the `planted-deposed-primary-writes` feature is for test builds only");
#[cfg(all(feature = "planted-part-covers-ahead", not(debug_assertions)))]
compile_error!("the `planted-part-covers-ahead` feature is for test builds only");
#[cfg(all(
    feature = "planted-watch-resume-without-backlog",
    not(debug_assertions)
))]
compile_error!("the `planted-watch-resume-without-backlog` feature is for test builds only");

pub mod autocheckpoint;
pub mod clock;
pub mod cluster;
pub mod clusterseq;
pub mod counted;
pub mod datadir;
pub mod error;
pub mod feed;
pub mod history;
pub mod metrics;
pub mod parts;
pub mod presencestore;
pub mod records;
pub mod seqengine;
pub mod seqstore;
pub mod sequences;
pub mod syncacks;
pub mod watch;

pub use error::NodeError;
