//! Errors of the node layer.
//!
//! Callers match on what they can handle: bad input comes from the cores (`Seq`), storage
//! failures from the log (`Log`), and start-up failures name the file, key or process at fault.

use std::path::PathBuf;
use std::time::Duration;

use imstate_log::LogError;
use imstate_seq::SeqError;

/// An error of the node.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The request was invalid for the sequence core (bad id, namespace, batch).
    #[error(transparent)]
    Seq(#[from] SeqError),
    /// The request was invalid for the presence registry (limits, unknown session).
    #[error(transparent)]
    Presence(imstate_presence::PresenceError),
    /// The log engine failed: I/O, corruption at start-up, or poisoned after an fsync error.
    /// Transparent: the log's own message says what failed and where, once.
    #[error(transparent)]
    Log(#[from] LogError),
    /// Another process holds the data directory.
    #[error("data directory {dir} is locked by another imstate process (pid {pid})")]
    Locked {
        /// The data directory.
        dir: PathBuf,
        /// The holder's pid as written in the lock file, or `unknown`.
        pid: String,
    },
    /// The data directory cannot be created, opened or written.
    #[error("data directory {dir}: {reason}")]
    DataDir {
        /// The data directory.
        dir: PathBuf,
        /// What failed.
        reason: String,
    },
    /// The configuration is invalid.
    #[error("config: {0}")]
    Config(String),
    /// A max_seq raise did not become durable in time; nothing was allocated.
    #[error("max_seq raise not durable within {0:?}; nothing was allocated, retry")]
    RaiseTimeout(Duration),
    /// A request would go over a named limit that its own fields do not show (a reply too
    /// large for a frame, a buffer budget); the message names the limit.
    #[error("{0}")]
    Limit(String),
    /// The node is stopping or has stopped after a fatal error.
    #[error("node unavailable: {0}")]
    Unavailable(String),
    /// Cluster mode: another node owns the section (or is the primary of the presence slot);
    /// the client should go there.
    #[error("{what} is owned by node {owner} (gRPC {grpc}, wire {wire}; route version {version})")]
    Moved {
        /// What was asked for: "section 3 of `inbox`", "presence slot 17".
        what: String,
        /// The owner's node id.
        owner: String,
        /// Its gRPC address.
        grpc: String,
        /// Its wire address.
        wire: String,
        /// The route table version that says so.
        version: u64,
    },
    /// Network I/O (binding the listener).
    #[error("{0}")]
    Io(String),
}
