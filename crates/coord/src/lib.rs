//! `imstate-coord`: the seam between imstate's cluster logic and its coordinator.
//!
//! Cluster mode keeps membership leases, the arbiter, the route table and every section's
//! `max_seq` in etcd, and never runs a consensus of its own. The cluster logic
//! (`imstate-cluster`) is written sans-I/O against the small, etcd-shaped model of this crate:
//!
//! - [`Request`] / [`Response`]: lease grant, keep-alive and revoke, and [`Txn`]s whose
//!   [`Compare`]s read create/mod revisions and values (fencing is a compare), with put, get
//!   and delete operations. This is a subset of etcd's v3 API with the same semantics, so the
//!   etcd adapter is a translation, and [`sim::SimCoordinator`] is a faithful model for the
//!   deterministic simulation.
//! - [`Coordinator`]: the async seam the node calls, with [`LocalCoordinator`] in process and
//!   the etcd implementation in `imstate-coord-etcd`; [`MonotonicClock`] is the clock of
//!   leases.
//! - [`Millis`]: the monotonic time the cluster logic is given. Leases and lock-delays are
//!   measured only on a node's monotonic clock, never on the wall clock.
//!
//! # Contract of a coordinator (what etcd guarantees and the simulator models)
//!
//! - Every successful write increments the store's revision by one; a key's `create_revision`
//!   is the revision of the put that created it, its `mod_revision` that of its last put.
//! - A txn is atomic and linearizable: its compares and operations see every write acknowledged
//!   before it was received, and nothing of a write that is not acknowledged yet.
//! - A key put with a lease is deleted (a write) when the lease ends: at the coordinator's
//!   own judgement of its TTL, which may be early or late against any node's clock (etcd
//!   extends leases across its leader changes). The cluster logic relies on it only for
//!   liveness, never for safety.
//! - A request may be lost, delayed or duplicated by the network, and its response likewise;
//!   a lost response leaves the outcome unknown.

#![deny(missing_docs)]

pub mod local;
pub mod maxseq;
pub mod sim;

pub use local::{BoxFuture, Coordinator, LocalCoordinator, MonotonicClock, SystemMonotonic};

use std::fmt;

/// Monotonic milliseconds of one node (any origin). Never compared across nodes.
pub type Millis = u64;

/// A coordinator lease id.
pub type LeaseId = i64;

/// What a compare reads of a key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// The revision that created the key; 0 when the key does not exist.
    CreateRevision(i64),
    /// The revision of the key's last write; 0 when the key does not exist.
    ModRevision(i64),
    /// The value; a missing key never equals any value.
    Value(Vec<u8>),
}

/// One condition of a txn: `key`'s target equals the given value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Compare {
    /// The key.
    pub key: String,
    /// What must be equal.
    pub target: Target,
}

impl Compare {
    /// `create_revision(key) == revision` (0: the key does not exist).
    pub fn created(key: impl Into<String>, revision: i64) -> Self {
        Self {
            key: key.into(),
            target: Target::CreateRevision(revision),
        }
    }

    /// `mod_revision(key) == revision` (0: the key does not exist).
    pub fn modified(key: impl Into<String>, revision: i64) -> Self {
        Self {
            key: key.into(),
            target: Target::ModRevision(revision),
        }
    }

    /// `value(key) == value`.
    pub fn value(key: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        Self {
            key: key.into(),
            target: Target::Value(value.into()),
        }
    }
}

/// One operation of a txn branch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Writes `value` at `key`, attached to `lease` when given.
    Put {
        /// The key.
        key: String,
        /// The value.
        value: Vec<u8>,
        /// The lease the key lives by.
        lease: Option<LeaseId>,
    },
    /// Reads `key`, or every key starting with it when `prefix`.
    Get {
        /// The key or prefix.
        key: String,
        /// Whether `key` is a prefix.
        prefix: bool,
    },
    /// Deletes `key`.
    Delete {
        /// The key.
        key: String,
    },
}

impl Op {
    /// A put without a lease.
    pub fn put(key: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        Op::Put {
            key: key.into(),
            value: value.into(),
            lease: None,
        }
    }

    /// A get of one key.
    pub fn get(key: impl Into<String>) -> Self {
        Op::Get {
            key: key.into(),
            prefix: false,
        }
    }

    /// A get of every key under a prefix.
    pub fn get_prefix(prefix: impl Into<String>) -> Self {
        Op::Get {
            key: prefix.into(),
            prefix: true,
        }
    }
}

/// An atomic transaction: if every compare holds, `success` runs, else `failure`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Txn {
    /// Conditions, all of which must hold.
    pub compare: Vec<Compare>,
    /// Operations when they hold.
    pub success: Vec<Op>,
    /// Operations when one does not.
    pub failure: Vec<Op>,
}

/// A key as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    /// The key.
    pub key: String,
    /// The value.
    pub value: Vec<u8>,
    /// Revision that created it.
    pub create_revision: i64,
    /// Revision of its last write.
    pub mod_revision: i64,
    /// Its lease, 0 for none.
    pub lease: LeaseId,
}

/// The outcome of a txn.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TxnResponse {
    /// Whether every compare held (the success branch ran).
    pub succeeded: bool,
    /// The store's revision after the txn.
    pub revision: i64,
    /// The keys read by each `Get` of the branch that ran, in order.
    pub gets: Vec<Vec<KeyValue>>,
}

impl TxnResponse {
    /// The single key read by the `index`-th get, if it exists.
    pub fn got(&self, index: usize) -> Option<&KeyValue> {
        self.gets.get(index).and_then(|keys| keys.first())
    }
}

/// A request to the coordinator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// Grants a lease of `ttl_ms`.
    LeaseGrant {
        /// Its time to live.
        ttl_ms: u64,
    },
    /// Renews a lease for its whole TTL.
    KeepAlive {
        /// The lease.
        lease: LeaseId,
    },
    /// Ends a lease now, deleting its keys.
    Revoke {
        /// The lease.
        lease: LeaseId,
    },
    /// A transaction.
    Txn(Txn),
}

/// The coordinator's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Response {
    /// A lease was granted.
    Granted {
        /// Its id.
        lease: LeaseId,
    },
    /// A keep-alive renewed the lease (`alive`), or found it gone.
    KeptAlive {
        /// Whether the lease still exists.
        alive: bool,
    },
    /// The lease is revoked (or did not exist).
    Revoked,
    /// A txn ran.
    Txn(TxnResponse),
    /// The request failed (timeout, connection lost, no leader): its outcome is unknown.
    Failed(CoordError),
}

/// Why a request failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CoordError {
    /// No answer in time, or the connection dropped: the request may or may not have run.
    #[error("coordinator unreachable ({0})")]
    Unreachable(String),
    /// The coordinator refused the request.
    #[error("coordinator refused the request: {0}")]
    Refused(String),
}

/// Encodes a u64 so that byte order is numeric order (16 hex digits).
pub fn encode_u64(value: u64) -> Vec<u8> {
    format!("{value:016x}").into_bytes()
}

/// Decodes what [`encode_u64`] wrote.
pub fn decode_u64(bytes: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(bytes).ok()?;
    (text.len() == 16).then_some(())?;
    u64::from_str_radix(text, 16).ok()
}

impl fmt::Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Request::LeaseGrant { ttl_ms } => write!(f, "lease grant ({ttl_ms} ms)"),
            Request::KeepAlive { lease } => write!(f, "keep-alive of lease {lease:x}"),
            Request::Revoke { lease } => write!(f, "revoke of lease {lease:x}"),
            Request::Txn(txn) => write!(
                f,
                "txn ({} compares, {}/{} ops)",
                txn.compare.len(),
                txn.success.len(),
                txn.failure.len()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn u64_encoding_orders_like_numbers_and_round_trips() {
        for (a, b) in [(0u64, 1u64), (9, 10), (255, 256), (u64::MAX - 1, u64::MAX)] {
            assert!(encode_u64(a) < encode_u64(b));
            assert_eq!(decode_u64(&encode_u64(a)), Some(a));
        }
        assert_eq!(decode_u64(b"12"), None);
    }
}
