//! Errors of the log engine.
//!
//! One enum, [`LogError`], for every public operation. Callers match on what they can handle:
//! [`LogError::Poisoned`] and [`LogError::Corrupt`] mean "stop the node"; the others describe
//! a single failed call. I/O errors always carry the file or operation that failed.

use std::io;

/// An I/O error together with what the log was doing (which file, which operation).
#[derive(Debug, thiserror::Error)]
#[error("{context}: {source}")]
pub struct LogIoError {
    /// What failed, e.g. "fsync wal-00000000000000000001.log".
    pub context: String,
    /// The underlying error.
    #[source]
    pub source: io::Error,
}

impl LogIoError {
    /// The kind of the underlying I/O error.
    pub fn kind(&self) -> io::ErrorKind {
        self.source.kind()
    }
}

/// Everything that can go wrong in the log.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// An I/O operation failed; the context names the file and the operation.
    #[error("log i/o error: {0}")]
    Io(#[from] LogIoError),
    /// The log on disk is damaged in a way recovery must not repair (an invalid record is
    /// followed by a valid one, a segment is missing, ...).
    #[error("corrupt log: file {file} at offset {offset}: {reason}")]
    Corrupt {
        /// The file holding the damage.
        file: String,
        /// The byte offset of the damage inside `file`.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// A write or fsync failed earlier; the log never retries and refuses all further work.
    #[error("log is poisoned: {0}")]
    Poisoned(String),
    /// The payload is larger than `LogOptions::record_bytes_max`.
    #[error("record of {len} bytes exceeds the maximum of {max} bytes")]
    RecordTooLarge {
        /// The payload length.
        len: usize,
        /// The configured maximum.
        max: u32,
    },
    /// The log was shut down.
    #[error("log is closed")]
    Closed,
    /// The caller's replay callback failed during [`crate::Log::open`].
    #[error("replay callback failed: {0}")]
    Replay(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl LogError {
    /// Wraps an I/O error with the operation that failed.
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        LogError::Io(LogIoError {
            context: context.into(),
            source,
        })
    }
}
