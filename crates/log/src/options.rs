//! Configuration of the log: the fsync policy and the limits.
//!
//! Every limit is a named default here (TigerStyle: put a limit on everything). The fsync
//! policy parses from and prints to the same text form used in config files and flags:
//! `always`, `never`, `batch:10ms` (also `batch:10` meaning milliseconds, `batch:1s`,
//! `batch:500us` and `batch(10ms)`).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// Default maximum size of one segment file before the log rolls to a new one.
pub const SEGMENT_BYTES_MAX_DEFAULT: u64 = 64 * 1024 * 1024;
/// Default maximum payload size of one record.
pub const RECORD_BYTES_MAX_DEFAULT: u32 = 16 * 1024 * 1024;
/// Default maximum number of records queued for the flusher before appenders block.
pub const QUEUE_RECORDS_MAX_DEFAULT: usize = 65_536;

/// When the flusher fsyncs the segment it writes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// Fsync after every batch; a record is durable only once fsynced.
    Always,
    /// Fsync at least every given interval (an idle log still fsyncs pending data in time);
    /// a record counts as durable once written to the file.
    Batch(Duration),
    /// Never fsync except when rolling segments and on shutdown.
    Never,
}

/// The error of parsing a [`FsyncPolicy`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid fsync policy {input:?}: expected always, never or batch:<n>[ms|s|us]")]
pub struct ParseFsyncPolicyError {
    /// The text that failed to parse.
    pub input: String,
}

impl FromStr for FsyncPolicy {
    type Err = ParseFsyncPolicyError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let error = || ParseFsyncPolicyError {
            input: text.to_string(),
        };
        let lower = text.trim().to_ascii_lowercase();
        match lower.as_str() {
            "always" => return Ok(FsyncPolicy::Always),
            "never" => return Ok(FsyncPolicy::Never),
            _ => {}
        }
        let interval = if let Some(rest) = lower.strip_prefix("batch:") {
            rest
        } else if let Some(rest) = lower.strip_prefix("batch(") {
            rest.strip_suffix(')').ok_or_else(error)?
        } else {
            return Err(error());
        };
        let interval = interval.trim();
        let (digits, unit_nanos) = if let Some(number) = interval.strip_suffix("ms") {
            (number, 1_000_000)
        } else if let Some(number) = interval.strip_suffix("us") {
            (number, 1_000)
        } else if let Some(number) = interval.strip_suffix('s') {
            (number, 1_000_000_000)
        } else {
            (interval, 1_000_000)
        };
        let count: u64 = digits.trim().parse().map_err(|_| error())?;
        let nanos = count.checked_mul(unit_nanos).ok_or_else(error)?;
        Ok(FsyncPolicy::Batch(Duration::from_nanos(nanos)))
    }
}

impl fmt::Display for FsyncPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FsyncPolicy::Always => f.write_str("always"),
            FsyncPolicy::Never => f.write_str("never"),
            FsyncPolicy::Batch(interval) => {
                let micros = interval.as_micros();
                if micros % 1_000_000 == 0 && micros > 0 {
                    write!(f, "batch:{}s", micros / 1_000_000)
                } else if micros % 1_000 == 0 {
                    write!(f, "batch:{}ms", micros / 1_000)
                } else {
                    write!(f, "batch:{micros}us")
                }
            }
        }
    }
}

/// Options of [`crate::Log::open`].
#[derive(Clone, Debug)]
pub struct LogOptions {
    /// When to fsync; default [`FsyncPolicy::Always`].
    pub fsync: FsyncPolicy,
    /// The log rolls to a new segment file before a segment would grow past this (a single
    /// record larger than this gets a segment of its own); default 64 MiB. Recovery reads one
    /// segment at a time, so this also bounds recovery memory.
    pub segment_bytes_max: u64,
    /// Larger payloads are refused with `LogError::RecordTooLarge`; default 16 MiB.
    pub record_bytes_max: u32,
    /// Appenders block (backpressure) while this many records wait for the flusher; default
    /// 65,536. Values below 1 are treated as 1.
    pub queue_records_max: usize,
    /// Preallocate segments where the storage says it pays ([`crate::Storage::preallocates`]:
    /// real files): once a segment is half written, a background thread writes the next one
    /// full of zeros and fsyncs it, so the writer only overwrites blocks that exist and
    /// `fdatasync` commits no file-size change. Costs one spare segment of disk per log
    /// (kept across restarts). Default `true`.
    pub preallocate: bool,
    /// Under `Batch` and `Never`: an async waiter ([`crate::Log::durable`]) writes the queued
    /// records itself when no one else is writing, and [`crate::Log::append_deferred`] wakes
    /// nobody, instead of handing every write to the flusher thread. Before a batch of fewer
    /// than 16 records the waiter yields to its executor once, so that the other tasks ready
    /// there queue theirs and one write serves them all. Less CPU, a third of the context
    /// switches and (with the yield) more peak throughput per write on two cores. Default
    /// `false` here; the presence store turns it on.
    pub inline_writes: bool,
}

impl Default for LogOptions {
    fn default() -> Self {
        LogOptions {
            fsync: FsyncPolicy::Always,
            segment_bytes_max: SEGMENT_BYTES_MAX_DEFAULT,
            record_bytes_max: RECORD_BYTES_MAX_DEFAULT,
            queue_records_max: QUEUE_RECORDS_MAX_DEFAULT,
            preallocate: true,
            inline_writes: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fsync_policy_parses_every_documented_form() {
        let ms = Duration::from_millis;
        assert_eq!("always".parse(), Ok(FsyncPolicy::Always));
        assert_eq!(" Never ".parse(), Ok(FsyncPolicy::Never));
        assert_eq!("batch:10ms".parse(), Ok(FsyncPolicy::Batch(ms(10))));
        assert_eq!("batch:10".parse(), Ok(FsyncPolicy::Batch(ms(10))));
        assert_eq!("batch:1s".parse(), Ok(FsyncPolicy::Batch(ms(1000))));
        assert_eq!("batch(25ms)".parse(), Ok(FsyncPolicy::Batch(ms(25))));
        assert_eq!(
            "batch:500us".parse(),
            Ok(FsyncPolicy::Batch(Duration::from_micros(500)))
        );
        for bad in [
            "",
            "sometimes",
            "batch:",
            "batch:x",
            "batch:-1ms",
            "batch(10ms",
        ] {
            assert!(bad.parse::<FsyncPolicy>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn fsync_policy_display_round_trips() {
        for text in [
            "always",
            "never",
            "batch:10ms",
            "batch:2s",
            "batch:1500us",
            "batch:0ms",
        ] {
            let policy: FsyncPolicy = text.parse().expect("parses");
            assert_eq!(policy.to_string(), text);
            assert_eq!(policy.to_string().parse::<FsyncPolicy>(), Ok(policy));
        }
    }
}
