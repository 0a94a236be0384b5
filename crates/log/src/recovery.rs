//! Recovery: rebuilds the caller's state from the newest valid checkpoint and the records
//! after it, and decides what on disk is a torn tail (repaired) and what is corruption
//! (refused).
//!
//! ```text
//!  list dir ─► remove *.tmp ─► newest valid checkpoint (checksums verified by streaming it
//!           once) ─► ReplayStream::Checkpoint (a reader over the file, bounded memory)
//!           ─► segments in LSN order, one in memory at a time
//!           ─► ReplayStream::Record (lsn > covered)
//!           ─► first invalid record at (file, offset):
//!                 only zeros from there to the end? ─► a zero tail (the unused part of a
//!                   preallocated segment): the segment ends there, trimmed; go on
//!                 anything valid after it (same or later segment)? ─► LogError::Corrupt
//!                   (a zero run followed by a valid record is damage too)
//!                 otherwise: torn tail ─► truncate + fsync (later segments emptied)
//!           ─► empty segments removed, directory fsynced
//! ```
//!
//! Invariants checked here: records inside a segment carry consecutive LSNs starting at the
//! LSN in the segment's name; across segments the chain continues without a gap, except for
//! gaps wholly covered by the checkpoint (segments a checkpoint made redundant may be deleted,
//! and a checkpoint may cover records that never became durable). Records are delivered to the
//! callback as they are read: if `open` then fails, the caller must discard what it built.

use std::io::Read;
use std::time::{Duration, Instant};

use crate::error::LogError;
use crate::record::{self, HEADER_BYTES};
use crate::storage::Storage;
use crate::{Lsn, ReplayError, checkpoint};

/// One item delivered to the replay callback of [`crate::Log::open`].
#[derive(Debug)]
pub enum Replay<'a> {
    /// The newest valid checkpoint; delivered first, at most once.
    Checkpoint {
        /// Every record with an LSN up to this one is reflected in `data`.
        covered_lsn: Lsn,
        /// The bytes the checkpoint's writer produced.
        data: &'a [u8],
    },
    /// A record after the checkpoint; delivered in LSN order without holes.
    Record {
        /// The record's LSN.
        lsn: Lsn,
        /// The record's payload, as appended.
        payload: &'a [u8],
    },
}

/// One item delivered to the replay callback of [`crate::Log::open_streaming`]: as
/// [`Replay`], but the checkpoint's data is a reader over the file, so that recovery memory
/// does not grow with the checkpoint. Its checksums were verified by a first pass before it is
/// delivered.
pub enum ReplayStream<'a> {
    /// The newest valid checkpoint; delivered first, at most once.
    Checkpoint {
        /// Every record with an LSN up to this one is reflected in `data`.
        covered_lsn: Lsn,
        /// The bytes the checkpoint's writer produced (buffered; need not be read to the end).
        data: &'a mut dyn std::io::Read,
    },
    /// A record after the checkpoint; delivered in LSN order without holes.
    Record {
        /// The record's LSN.
        lsn: Lsn,
        /// The record's payload, as appended.
        payload: &'a [u8],
    },
}

impl std::fmt::Debug for ReplayStream<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReplayStream::Checkpoint { covered_lsn, .. } => f
                .debug_struct("Checkpoint")
                .field("covered_lsn", covered_lsn)
                .finish_non_exhaustive(),
            ReplayStream::Record { lsn, payload } => f
                .debug_struct("Record")
                .field("lsn", lsn)
                .field("payload_len", &payload.len())
                .finish(),
        }
    }
}

/// Buffer of the reader handed over with a streamed checkpoint.
const CHECKPOINT_READ_BUFFER_BYTES: usize = 256 * 1024;

/// What recovery found and did.
#[derive(Debug, Clone)]
pub struct RecoveryStats {
    /// The LSN covered by the checkpoint delivered, if any.
    pub checkpoint_lsn: Option<Lsn>,
    /// Records delivered after the checkpoint.
    pub records_replayed: u64,
    /// Bytes (framed, as on disk) of the records delivered.
    pub bytes_replayed: u64,
    /// Bytes of torn tail removed.
    pub truncated_tail_bytes: u64,
    /// Bytes of zero tail (unused preallocation) trimmed from segments.
    pub zero_tail_bytes: u64,
    /// The highest LSN recovered (from the checkpoint or a record); the next append gets
    /// `last_lsn + 1`.
    pub last_lsn: Lsn,
    /// Wall time recovery took.
    pub elapsed: Duration,
    /// Checkpoints found invalid and passed over for an older one (or for the log alone),
    /// newest first, each as "path: reason". The node warns about each: a damaged checkpoint
    /// is survivable, but an operator must hear of it.
    pub skipped_checkpoints: Vec<String>,
}

/// A segment file of the log and the LSNs it holds.
#[derive(Debug, Clone)]
pub(crate) struct SegmentInfo {
    pub name: String,
    pub first_lsn: Lsn,
    /// The LSN of its last record; `None` while it holds none.
    pub last_lsn: Option<Lsn>,
}

/// The outcome of [`recover`], for [`crate::Log::open`].
pub(crate) struct Recovered {
    pub stats: RecoveryStats,
    /// Non-empty segments in LSN order (empty ones were removed).
    pub segments: Vec<SegmentInfo>,
}

fn io_error(context: String) -> impl FnOnce(std::io::Error) -> LogError {
    move |source| LogError::io(context, source)
}

/// The longest invalid region at the end of a segment that recovery treats as a torn tail and
/// cuts. A crash can tear only the flusher's last write, which is at most one batch (16 MiB) or
/// one record (at most `record_bytes_max`, 16 MiB by default), so twice that leaves room for a
/// write split across a segment roll. Anything longer is corruption.
pub(crate) const TORN_TAIL_BYTES_MAX: u64 = 32 * 1024 * 1024;

/// Recovers the log in `storage`, delivering the checkpoint and records to `replay`.
pub(crate) fn recover(
    storage: &dyn Storage,
    replay: &mut dyn FnMut(ReplayStream<'_>) -> Result<(), ReplayError>,
) -> Result<Recovered, LogError> {
    let start = Instant::now();
    let names = storage
        .list()
        .map_err(io_error("listing the log directory".to_string()))?;
    let mut directory_changed = false;

    for name in names
        .iter()
        .filter(|name| name.ends_with(record::TEMP_SUFFIX))
    {
        storage
            .remove(name)
            .map_err(io_error(format!("removing leftover temp file {name}")))?;
        directory_changed = true;
    }

    let mut checkpoints: Vec<(Lsn, &String)> = names
        .iter()
        .filter_map(|name| Some((record::parse_checkpoint_name(name)?, name)))
        .collect();
    checkpoints.sort_unstable_by_key(|&(covered_lsn, _)| std::cmp::Reverse(covered_lsn));
    let mut checkpoint_lsn = None;
    let mut skipped_checkpoints = Vec::new();
    for (covered_lsn, name) in checkpoints {
        let context = || format!("reading checkpoint {}", storage.describe(name));
        let file_len = storage.len(name).map_err(io_error(context()))?;
        let file = storage.open_read(name).map_err(io_error(context()))?;
        // An invalid checkpoint is skipped in favour of an older one: if the records between
        // them are gone, the segment chain check below reports it.
        let data_len = match checkpoint::verify_stream(file, file_len, covered_lsn) {
            Ok(data_len) => data_len,
            Err(reason) => {
                skipped_checkpoints.push(format!("{}: {reason}", storage.describe(name)));
                continue;
            }
        };
        {
            let mut file = storage.open_read(name).map_err(io_error(context()))?;
            std::io::copy(
                &mut (&mut file).take(checkpoint::DATA_OFFSET),
                &mut std::io::sink(),
            )
            .map_err(io_error(context()))?;
            let mut data = std::io::BufReader::with_capacity(
                CHECKPOINT_READ_BUFFER_BYTES,
                file.take(data_len),
            );
            replay(ReplayStream::Checkpoint {
                covered_lsn,
                data: &mut data,
            })
            .map_err(LogError::Replay)?;
            checkpoint_lsn = Some(covered_lsn);
            break;
        }
    }
    let covered = checkpoint_lsn.unwrap_or(0);

    let mut segment_names: Vec<(Lsn, &String)> = names
        .iter()
        .filter_map(|name| Some((record::parse_segment_name(name)?, name)))
        .collect();
    segment_names.sort_unstable();

    let mut stats = RecoveryStats {
        checkpoint_lsn,
        records_replayed: 0,
        bytes_replayed: 0,
        truncated_tail_bytes: 0,
        zero_tail_bytes: 0,
        last_lsn: covered,
        elapsed: Duration::ZERO,
        skipped_checkpoints,
    };
    // The highest LSN read from any segment so far (0: none).
    let mut chain_end: Lsn = 0;
    let mut segments = Vec::new();
    let mut torn_from: Option<usize> = None;

    for (index, &(first_lsn, name)) in segment_names.iter().enumerate() {
        let buf = storage.read(name).map_err(io_error(format!(
            "reading segment {}",
            storage.describe(name)
        )))?;
        let mut offset = 0;
        let mut expected = first_lsn;
        let mut last_lsn = None;
        while offset < buf.len() {
            let decoded = match record::decode(&buf, offset) {
                Ok(found) if found.lsn > expected => {
                    // A valid checksum cannot come from a torn write: records are missing.
                    return Err(LogError::Corrupt {
                        file: storage.describe(name),
                        offset: offset as u64,
                        reason: format!(
                            "record carries lsn {} but lsn {expected} was expected",
                            found.lsn
                        ),
                    });
                }
                // An older, valid record here is stale data (e.g. reused blocks), not part of
                // this log: judge it like any invalid record.
                Ok(found) if found.lsn < expected => Err(format!(
                    "stale record with lsn {} where lsn {expected} was expected",
                    found.lsn
                )),
                Ok(found) => Ok(found),
                Err(invalid) => Err(invalid.to_string()),
            };
            match decoded {
                Ok(found) => {
                    if last_lsn.is_none() {
                        check_chain(&storage.describe(name), first_lsn, chain_end, covered)?;
                    }
                    if found.lsn > covered {
                        replay(ReplayStream::Record {
                            lsn: found.lsn,
                            payload: found.payload,
                        })
                        .map_err(LogError::Replay)?;
                        stats.records_replayed += 1;
                        stats.bytes_replayed += (HEADER_BYTES + found.payload.len()) as u64;
                    }
                    last_lsn = Some(found.lsn);
                    expected += 1;
                    offset = found.end;
                }
                Err(invalid) => {
                    let written_end = nonzero_end(&buf, offset);
                    if written_end == offset {
                        // Zeros to the end: the unused part of a preallocated segment (the
                        // writer fills it in order). Trimmed, so that the disk space returns
                        // and the next recovery reads less.
                        stats.zero_tail_bytes += cut(storage, name, offset as u64)?;
                        break;
                    }
                    let buf = &buf[..written_end];
                    let tail_bytes = (buf.len() - offset) as u64;
                    if tail_bytes > TORN_TAIL_BYTES_MAX {
                        // One crash tears at most the flusher's last write; a longer invalid
                        // region is damage (or another format), and cutting it would silently
                        // drop everything after it.
                        return Err(LogError::Corrupt {
                            file: storage.describe(name),
                            offset: offset as u64,
                            reason: format!(
                                "{invalid}, and the invalid region is {tail_bytes} bytes, more \
                                 than one write can leave torn ({TORN_TAIL_BYTES_MAX}): refusing \
                                 to truncate it"
                            ),
                        });
                    }
                    let last_good = last_lsn.unwrap_or(chain_end);
                    if let Some((at, lsn)) = record::find_valid_record(buf, offset + 1, last_good)
                    {
                        return Err(LogError::Corrupt {
                            file: storage.describe(name),
                            offset: offset as u64,
                            reason: format!(
                                "{invalid}, yet a valid record (lsn {lsn}) follows at offset {at}"
                            ),
                        });
                    }
                    for &(_, later) in &segment_names[index + 1..] {
                        let later_buf = storage.read(later).map_err(io_error(format!(
                            "reading segment {}",
                            storage.describe(later)
                        )))?;
                        let later_end = nonzero_end(&later_buf, 0);
                        let found =
                            record::find_valid_record(&later_buf[..later_end], 0, last_good);
                        if let Some((at, lsn)) = found {
                            return Err(LogError::Corrupt {
                                file: storage.describe(name),
                                offset: offset as u64,
                                reason: format!(
                                    "{invalid}, yet a valid record (lsn {lsn}) follows in \
                                     {} at offset {at}",
                                    storage.describe(later)
                                ),
                            });
                        }
                    }
                    stats.truncated_tail_bytes += cut(storage, name, offset as u64)?;
                    torn_from = Some(index);
                    break;
                }
            }
        }
        match last_lsn {
            Some(last) => chain_end = last,
            // An empty segment still proves, by its name, that every LSN below its first
            // existed: if neither a checkpoint nor an earlier segment holds them, history is
            // missing (say, a checkpoint deleted by hand), and starting empty would hand out
            // sequence values again.
            None if torn_from.is_none() => {
                check_chain(&storage.describe(name), first_lsn, chain_end, covered)?
            }
            None => {}
        }
        segments.push(SegmentInfo {
            name: name.clone(),
            first_lsn,
            last_lsn,
        });
        if torn_from.is_some() {
            break;
        }
    }
    if let Some(index) = torn_from {
        // Nothing valid follows the torn record: later segments only hold garbage.
        for &(first_lsn, name) in &segment_names[index + 1..] {
            stats.truncated_tail_bytes += cut(storage, name, 0)?;
            segments.push(SegmentInfo {
                name: name.clone(),
                first_lsn,
                last_lsn: None,
            });
        }
    }

    // Empty segments would confuse the "segment i ends where segment i + 1 starts" reasoning
    // of later runs; the log starts a fresh one anyway.
    let mut kept = Vec::with_capacity(segments.len());
    for segment in segments {
        if segment.last_lsn.is_some() {
            kept.push(segment);
        } else {
            storage
                .remove(&segment.name)
                .map_err(io_error(format!("removing empty segment {}", segment.name)))?;
            directory_changed = true;
        }
    }
    if directory_changed {
        storage.sync_dir().map_err(io_error(
            "fsync of the log directory after cleanup".to_string(),
        ))?;
    }

    stats.last_lsn = chain_end.max(covered);
    stats.elapsed = start.elapsed();
    Ok(Recovered {
        stats,
        segments: kept,
    })
}

/// Checks that a segment whose first record has `first_lsn` continues the chain.
fn check_chain(name: &str, first_lsn: Lsn, chain_end: Lsn, covered: Lsn) -> Result<(), LogError> {
    if chain_end != 0 && first_lsn <= chain_end {
        return Err(LogError::Corrupt {
            file: name.to_string(),
            offset: 0,
            reason: format!(
                "segment starts at lsn {first_lsn} but lsn {chain_end} was already read"
            ),
        });
    }
    if first_lsn > chain_end + 1 && first_lsn > covered + 1 {
        return Err(LogError::Corrupt {
            file: name.to_string(),
            offset: 0,
            reason: format!(
                "segment starts at lsn {first_lsn}: lsns {}..={} are missing (checkpoint \
                 covers up to {covered})",
                chain_end.max(covered) + 1,
                first_lsn - 1
            ),
        });
    }
    Ok(())
}

/// The offset just past the last non-zero byte of `buf` at or after `from` (`from` when there
/// is none). Compares 4 KiB blocks with a zero block, so a 64 MiB zero tail costs a few ms.
fn nonzero_end(buf: &[u8], from: usize) -> usize {
    const BLOCK: usize = 4096;
    static ZEROS: [u8; BLOCK] = [0; BLOCK];
    let mut end = buf.len();
    while end > from {
        let start = end.saturating_sub(BLOCK).max(from);
        let block = &buf[start..end];
        if block != &ZEROS[..block.len()] {
            let last = block
                .iter()
                .rposition(|&byte| byte != 0)
                .expect("a non-zero byte");
            return start + last + 1;
        }
        end = start;
    }
    from
}

/// Durably truncates a segment (a torn tail, or a zero tail) to `len` bytes; returns the
/// bytes removed.
fn cut(storage: &dyn Storage, name: &str, len: u64) -> Result<u64, LogError> {
    let size = storage.len(name).map_err(io_error(format!(
        "stat of segment {}",
        storage.describe(name)
    )))?;
    if size <= len {
        return Ok(0);
    }
    let mut file = storage.open_append(name).map_err(io_error(format!(
        "opening segment {} to cut its tail",
        storage.describe(name)
    )))?;
    file.truncate(len).map_err(io_error(format!(
        "truncating segment {} to {len} bytes",
        storage.describe(name)
    )))?;
    file.sync().map_err(io_error(format!(
        "fsync of segment {} after truncation",
        storage.describe(name)
    )))?;
    Ok(size - len)
}
