//! `imstate-log`: the write-ahead log of an imstate node.
//!
//! The log turns opaque payloads (callers encode their own change records) into a durable,
//! totally ordered stream identified by log sequence numbers ([`Lsn`]), with group commit,
//! checkpoints and crash recovery.
//!
//! # Layout
//!
//! ```text
//!  append(payload) ──► queue (bounded) ──► writer ──► Storage (segment files)
//!     │ assigns LSN        │ one batch       │ the flusher thread, or under batch/never an
//!     ▼                    ▼                 │ async waiter writing inline (no hand-off);
//!  returns LSN        backpressure           │ one write per batch, fsync per policy
//!                                            ▼ (syncer thread under batch)
//!                             publishes written / synced / durable LSNs
//!                             (Mutex+Condvar for threads, watch for async)
//!
//!  checkpoint(lsn, write) ─► checkpoint-{lsn}.ckpt.tmp ─► fsync ─► rename ─► fsync dir
//!                           ─► delete older checkpoints and fully covered segments
//!
//!  open(storage, options, replay) ─► newest valid checkpoint ─► later records in order
//!                                    (streamed: verified in one pass, delivered in another)
//!                                 ─► torn tail truncated ─► new active segment ─► flusher
//! ```
//!
//! # Invariants
//!
//! - The first record ever appended has LSN 1 and LSNs have no holes; the order in which
//!   LSNs are assigned is the order of the records on disk.
//! - `synced_lsn <= written_lsn <= last_lsn`, and `durable_lsn` is `synced_lsn` under
//!   [`FsyncPolicy::Always`] and `written_lsn` otherwise.
//! - After any write or fsync failure the log is poisoned forever: it never retries.
//! - Recovery never repairs damage that is followed by a valid record: that is corruption
//!   and [`Log::open`] refuses to start, naming the file and offset.

#![deny(missing_docs)]
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

// Planted bugs exist only to prove that the tests catch them; they must never ship.
#[cfg(all(feature = "planted-ack-before-fsync", not(debug_assertions)))]
compile_error!(
    "the `planted-ack-before-fsync` feature is a negative control for test builds only"
);

mod checkpoint;
mod error;
mod faulty;
mod log;
mod options;
mod record;
mod recovery;
mod storage;

pub use error::{LogError, LogIoError};
pub use faulty::{CrashMode, FaultyStorage};
pub use log::{CheckpointStats, Log, LogObserver, LogStats};
pub use options::{
    FsyncPolicy, LogOptions, ParseFsyncPolicyError, QUEUE_RECORDS_MAX_DEFAULT,
    RECORD_BYTES_MAX_DEFAULT, SEGMENT_BYTES_MAX_DEFAULT,
};
pub use recovery::{RecoveryStats, Replay, ReplayStream};
pub use storage::{FileStorage, Storage, StorageFile, SyncHandle};

/// A log sequence number. The first record ever appended has LSN 1; LSNs have no holes.
/// LSN 0 means "no record".
pub type Lsn = u64;

/// The error a caller's replay callback may return; it is wrapped in [`LogError::Replay`].
pub type ReplayError = Box<dyn std::error::Error + Send + Sync>;
