//! [`Log`]: appends, the group-commit flusher, durability waits and checkpoints.
//!
//! ```text
//!  appenders ──(queue lock: assign LSN, push)──► Queue ──(drain ≤ BATCH_BYTES_MAX)──► flusher
//!                                                                                    │
//!     wait_durable ◄── progress Mutex+Condvar ◄── publish(written, synced) ◄── write+fsync
//!     durable().await ◄── watch channel ◄──────────┘
//!  checkpoint ──(own lock, caller's thread)──► temp file ─► fsync ─► rename ─► sync_dir
//!             ──(brief segments lock)──► delete covered segments and older checkpoints
//! ```
//!
//! The writer role: whoever writes (the flusher thread, or with `LogOptions::inline_writes`
//! under `Batch` and `Never` an async waiter in [`Log::durable`] writing inline, without a
//! thread hand-off) first claims
//! `Queue::writer_active` under the queue lock, then locks the [`Writer`] state; it takes every
//! record queued while it holds the role, or wakes the flusher for what it leaves when it gives
//! the role back. An inline writer never fsyncs (the syncer thread does) and never rolls a
//! segment (the flusher does), so a tokio worker only ever does a `write` to the page cache.
//!
//! Invariants: LSNs are assigned and queued under one lock, so the queue order is the LSN
//! order, and the holder of the writer role (one at a time) writes in that order;
//! `synced <= written <= last_lsn` (checked on every publish); once poisoned, nothing is
//! written or fsynced again and every waiter and appender gets [`LogError::Poisoned`] (a
//! writer whose write failed poisons the log before it gives the role back, so no one writes
//! past a lost batch). Only the holder of the writer role writes to segments; the checkpoint
//! only deletes segments that are no longer the active one.

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use tokio::sync::watch;

use crate::checkpoint::CheckpointWriter;
use crate::error::LogError;
use crate::options::{FsyncPolicy, LogOptions};
use crate::record::{self, HEADER_BYTES};
use crate::recovery::{self, RecoveryStats, Replay, ReplayStream, SegmentInfo};
use crate::storage::{Storage, StorageFile, SyncHandle};
use crate::{Lsn, ReplayError};

/// The flusher writes at most this many bytes per batch (at least one record), which bounds
/// its buffer; the rest of the queue goes into the next batch.
const BATCH_BYTES_MAX: usize = 16 * 1024 * 1024;
/// A batch smaller than this makes the flusher yield once before taking it, and an inline
/// writer yield to its executor once (more records per write and per wake-up of waiters).
const GATHER_BELOW: usize = 16;
/// Segments smaller than this are not useful; smaller settings are raised to it.
const SEGMENT_BYTES_MIN: u64 = 64;

/// What `checkpoint` did.
#[derive(Debug, Clone)]
pub struct CheckpointStats {
    /// Every record up to this LSN is reflected in the checkpoint.
    pub covered_lsn: Lsn,
    /// Bytes of data the caller wrote.
    pub bytes: u64,
    /// Wall time of the whole checkpoint, deletion included.
    pub elapsed: Duration,
    /// Segment files deleted because the checkpoint covers all their records.
    pub segments_removed: usize,
}

/// Receives timings from the writer, for metrics (set with [`Log::set_observer`]).
///
/// Contract: called by the holder of the writer role (the flusher thread, or an async waiter
/// writing inline on a runtime worker) or, for fsyncs under `Batch`, the syncer thread, after
/// each fsync and each written batch; an implementation must be cheap and must never block or
/// call back into the log, because the writer is the log's bottleneck.
pub trait LogObserver: Send + Sync {
    /// One successful fsync of a segment file took `elapsed`.
    fn fsync(&self, elapsed: Duration);
    /// One group-commit batch of `records` records and `bytes` framed bytes was written.
    fn batch(&self, records: u64, bytes: u64);
}

/// Counters and gauges of a running log.
#[derive(Debug, Clone, Default)]
pub struct LogStats {
    /// Records appended by this process.
    pub appends: u64,
    /// Bytes (framed) written to segments by this process.
    pub bytes_written: u64,
    /// Successful fsyncs of segment files.
    pub fsyncs: u64,
    /// Batches written (by the flusher thread or inline, see `inline_batches`).
    pub batches: u64,
    /// Records in the most recent batch.
    pub last_batch_records: u64,
    /// Highest LSN assigned.
    pub last_lsn: Lsn,
    /// Highest LSN durable under the policy.
    pub durable_lsn: Lsn,
    /// Highest LSN fsynced.
    pub synced_lsn: Lsn,
    /// LSN covered by the newest checkpoint (recovered or written), if any.
    pub last_checkpoint_lsn: Option<Lsn>,
    /// Data bytes of the last checkpoint written by this process.
    pub last_checkpoint_bytes: u64,
    /// Duration of the last checkpoint written by this process.
    pub last_checkpoint_duration: Duration,
    /// Segment files in the log, the active one included.
    pub segments: usize,
    /// Whether the log is poisoned.
    pub poisoned: bool,
    /// Segments started from a preallocated spare.
    pub spares_used: u64,
    /// Spares that could not be made (the log then grows its segments as it writes).
    pub prealloc_failures: u64,
    /// Batches written inline by an async waiter ([`Log::durable`]) rather than the flusher
    /// thread (a subset of `batches`).
    pub inline_batches: u64,
}

/// A record waiting for the flusher. The header (with its checksum) is built by the appender
/// so the flusher, the bottleneck, only copies bytes.
struct Pending {
    header: [u8; HEADER_BYTES],
    payload: Vec<u8>,
}

impl Pending {
    fn lsn(&self) -> Lsn {
        let mut lsn = [0u8; 8];
        lsn.copy_from_slice(&self.header[8..16]);
        u64::from_le_bytes(lsn)
    }

    fn frame_bytes(&self) -> usize {
        HEADER_BYTES + self.payload.len()
    }
}

/// State shared by appenders and the flusher, under one lock so LSN order is queue order.
struct Queue {
    next_lsn: Lsn,
    pending: VecDeque<Pending>,
    closing: bool,
    poison: Option<String>,
    /// Someone (the flusher thread or an inline writer) holds the writer role: it takes every
    /// record queued before it gives the role back, and wakes the flusher for any left then.
    writer_active: bool,
}

/// What waiters observe. Cloned into the watch channel on every change.
#[derive(Clone, Debug, Default)]
struct Progress {
    written: Lsn,
    synced: Lsn,
    durable: Lsn,
    poison: Option<String>,
    closed: bool,
}

impl Progress {
    /// `Some(result)` once a waiter for `lsn` can stop waiting.
    fn outcome(&self, lsn: Lsn) -> Option<Result<(), LogError>> {
        if self.durable >= lsn {
            Some(Ok(()))
        } else if let Some(message) = &self.poison {
            Some(Err(LogError::Poisoned(message.clone())))
        } else if self.closed {
            Some(Err(LogError::Closed))
        } else {
            None
        }
    }
}

#[derive(Default)]
struct CheckpointInfo {
    last_lsn: Option<Lsn>,
    last_bytes: u64,
    last_duration: Duration,
    /// Log bytes since the checkpoint that are not in `bytes_written` (replayed at open).
    carried_bytes: u64,
    /// `bytes_written` when the last checkpoint started.
    written_base: u64,
}

struct Shared {
    storage: Arc<dyn Storage>,
    options: LogOptions,
    /// Why a `parking_lot` mutex: no poisoning to unwrap, and it is held only for pushes/pops.
    queue: Mutex<Queue>,
    /// The flusher waits here for records (or a timed wait under `Batch`).
    queue_has_work: Condvar,
    /// Appenders wait here while the queue is full (backpressure).
    queue_has_room: Condvar,
    /// Async admission ([`Log::admit`]) waits here for the flusher to take records.
    room_notify: tokio::sync::Notify,
    /// [`Log::poisoned`] waits here (woken once, when the log is poisoned).
    poison_notify: tokio::sync::Notify,
    /// Records queued for the flusher (mirrors `Queue::pending.len()` for lock-free reads).
    queued: AtomicU64,
    progress: Mutex<Progress>,
    progress_changed: Condvar,
    /// For async waiters; needs no runtime, only `tokio::sync`.
    progress_watch: watch::Sender<Progress>,
    last_lsn: AtomicU64,
    durable_lsn: AtomicU64,
    synced_lsn: AtomicU64,
    poisoned: AtomicBool,
    /// Segment files in LSN order; the last is the active one. Shared between the flusher
    /// (pushes on roll, updates the active segment's last LSN) and checkpoints (delete).
    segments: Mutex<Vec<SegmentInfo>>,
    appends: AtomicU64,
    bytes_written: AtomicU64,
    fsyncs: AtomicU64,
    batches: AtomicU64,
    last_batch_records: AtomicU64,
    checkpoint_info: Mutex<CheckpointInfo>,
    /// Set at most once, after open; read by the flusher without a lock.
    observer: std::sync::OnceLock<Arc<dyn LogObserver>>,
    /// The spare segment: asked for by the flusher, made by the preallocator thread.
    spare: Mutex<Spare>,
    spare_changed: Condvar,
    /// Spare segments that could not be made (say, the disk is full): the log then grows its
    /// segments as it writes, which is correct, only slower.
    prealloc_failures: AtomicU64,
    /// Segments started from a spare.
    spares_used: AtomicU64,
    /// Batches written by async waiters ([`LogStats::inline_batches`]).
    inline_batches: AtomicU64,
    /// The active segment and what is written and synced; locked by the holder of the writer
    /// role only (`Queue::writer_active`). Lock order: `writer`, then `queue`.
    writer: Mutex<Writer>,
}

/// The state of the spare segment ([`record::SPARE_NAME`]).
#[derive(Default)]
struct Spare {
    /// A complete spare exists.
    ready: bool,
    /// The flusher wants one (the preallocator is making it, or will).
    wanted: bool,
    /// The log is closing: the preallocator stops.
    stop: bool,
}

impl Shared {
    /// Whether async waiters write inline and deferred appends wake nobody
    /// ([`LogOptions::inline_writes`]; never under `Always`, whose writes wait for an fsync).
    fn inline_writes(&self) -> bool {
        self.options.inline_writes && !matches!(self.options.fsync, FsyncPolicy::Always)
    }

    fn durable_of(&self, written: Lsn, synced: Lsn) -> Lsn {
        match self.options.fsync {
            FsyncPolicy::Always => synced,
            FsyncPolicy::Batch(_) | FsyncPolicy::Never => written,
        }
    }

    fn update_progress(&self, change: impl FnOnce(&mut Progress)) {
        let (snapshot, outcome_changed) = {
            let mut progress = self.progress.lock();
            let before = (progress.durable, progress.poison.is_some(), progress.closed);
            change(&mut progress);
            debug_assert!(progress.synced <= progress.written);
            debug_assert!(progress.written <= self.last_lsn.load(Ordering::Acquire));
            self.durable_lsn.store(progress.durable, Ordering::Release);
            self.synced_lsn.store(progress.synced, Ordering::Release);
            let after = (progress.durable, progress.poison.is_some(), progress.closed);
            (progress.clone(), before != after)
        };
        self.progress_changed.notify_all();
        // Async waiters only care about what `Progress::outcome` reads: a change of `written`
        // or `synced` alone (the background fsync under `Batch`) wakes nobody.
        if outcome_changed {
            self.progress_watch.send_replace(snapshot);
        }
    }

    fn publish(&self, written: Lsn, synced: Lsn) {
        let durable = self.durable_of(written, synced);
        self.update_progress(|progress| {
            progress.written = progress.written.max(written);
            progress.synced = progress.synced.max(synced);
            progress.durable = progress.durable.max(durable);
        });
    }

    /// Poisons the log forever: queued records are dropped, waiters and appenders fail.
    fn poison(&self, message: String) {
        {
            let mut queue = self.queue.lock();
            if queue.poison.is_none() {
                queue.poison = Some(message.clone());
            }
            queue.pending.clear();
        }
        self.poisoned.store(true, Ordering::Release);
        self.queued.store(0, Ordering::Release);
        self.queue_has_room.notify_all();
        self.room_notify.notify_waiters();
        self.queue_has_work.notify_all();
        self.update_progress(|progress| {
            if progress.poison.is_none() {
                progress.poison = Some(message);
            }
        });
        self.poison_notify.notify_waiters();
    }

    fn poison_message(&self) -> Option<String> {
        self.progress.lock().poison.clone()
    }
}

/// The write-ahead log. `Send + Sync`; share it through `Arc<Log>`.
pub struct Log {
    shared: Arc<Shared>,
    flusher: Mutex<Option<JoinHandle<()>>>,
    /// Makes spare segments ahead of the flusher (when preallocating).
    preallocator: Mutex<Option<JoinHandle<()>>>,
    /// Serializes checkpoints; appenders and the flusher never take it.
    checkpoint_lock: Mutex<()>,
}

impl std::fmt::Debug for Log {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Log")
            .field("last_lsn", &self.last_lsn())
            .field("durable_lsn", &self.durable_lsn())
            .field("synced_lsn", &self.synced_lsn())
            .field("poisoned", &self.is_poisoned())
            .finish()
    }
}

impl Log {
    /// Recovers: newest valid checkpoint (delivered via `replay`), then every record with
    /// lsn > covered_lsn in order. A torn tail (invalid last record(s) with nothing valid
    /// after) is truncated, and the truncation fsynced, before any new append. An invalid
    /// record followed by any valid record (in the same or a later segment) is corruption:
    /// returns [`LogError::Corrupt`] naming file and offset; mid-log damage is never repaired.
    /// Leftover temp files from an interrupted checkpoint are removed. Then starts a new
    /// segment and the flusher thread.
    ///
    /// Records are delivered while they are read, so if `open` fails the caller must discard
    /// whatever it built from them.
    ///
    /// The checkpoint's data is handed over as one slice: read whole into memory. Use
    /// [`Log::open_streaming`] to read a large checkpoint with bounded memory.
    pub fn open<S: Storage>(
        storage: S,
        options: LogOptions,
        mut replay: impl FnMut(Replay<'_>) -> Result<(), ReplayError>,
    ) -> Result<(Log, RecoveryStats), LogError> {
        Self::open_streaming(storage, options, |item| match item {
            ReplayStream::Checkpoint { covered_lsn, data } => {
                let mut bytes = Vec::new();
                data.read_to_end(&mut bytes)?;
                replay(Replay::Checkpoint {
                    covered_lsn,
                    data: &bytes,
                })
            }
            ReplayStream::Record { lsn, payload } => replay(Replay::Record { lsn, payload }),
        })
    }

    /// [`Log::open`], with the checkpoint's data delivered as a reader: it is streamed from
    /// the file (after a first streaming pass has verified its checksums), so recovery memory
    /// does not grow with the checkpoint size.
    pub fn open_streaming<S: Storage>(
        storage: S,
        options: LogOptions,
        mut replay: impl FnMut(ReplayStream<'_>) -> Result<(), ReplayError>,
    ) -> Result<(Log, RecoveryStats), LogError> {
        let mut options = options;
        options.queue_records_max = options.queue_records_max.max(1);
        options.segment_bytes_max = options.segment_bytes_max.max(SEGMENT_BYTES_MIN);
        let storage: Arc<dyn Storage> = Arc::new(storage);

        let recovered = recovery::recover(storage.as_ref(), &mut replay)?;
        let stats = recovered.stats;
        let last_lsn = stats.last_lsn;

        let preallocate = options.preallocate && storage.preallocates();
        // A spare left by the previous run is complete (it was fsynced before its rename) if
        // it has the segment size; anything else is removed.
        let spare_len = storage.len(record::SPARE_NAME).ok();
        let from_spare = preallocate && spare_len == Some(options.segment_bytes_max);
        if spare_len.is_some() && !from_spare {
            storage.remove(record::SPARE_NAME).map_err(|source| {
                LogError::io(format!("removing {}", record::SPARE_NAME), source)
            })?;
        }
        let active = if from_spare {
            SegmentWriter::from_spare(storage.as_ref(), last_lsn + 1)?
        } else {
            SegmentWriter::create(storage.as_ref(), last_lsn + 1)?
        };
        let mut segments = recovered.segments;
        segments.push(SegmentInfo {
            name: active.name.clone(),
            first_lsn: active.first_lsn,
            last_lsn: None,
        });

        let progress = Progress {
            written: last_lsn,
            synced: last_lsn,
            durable: last_lsn,
            poison: None,
            closed: false,
        };
        let (progress_watch, _) = watch::channel(progress.clone());
        let shared = Arc::new(Shared {
            storage,
            options,
            queue: Mutex::new(Queue {
                next_lsn: last_lsn + 1,
                pending: VecDeque::new(),
                closing: false,
                poison: None,
                writer_active: false,
            }),
            queue_has_work: Condvar::new(),
            queue_has_room: Condvar::new(),
            room_notify: tokio::sync::Notify::new(),
            poison_notify: tokio::sync::Notify::new(),
            queued: AtomicU64::new(0),
            progress: Mutex::new(progress),
            progress_changed: Condvar::new(),
            progress_watch,
            last_lsn: AtomicU64::new(last_lsn),
            durable_lsn: AtomicU64::new(last_lsn),
            synced_lsn: AtomicU64::new(last_lsn),
            poisoned: AtomicBool::new(false),
            segments: Mutex::new(segments),
            appends: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
            fsyncs: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            last_batch_records: AtomicU64::new(0),
            checkpoint_info: Mutex::new(CheckpointInfo {
                last_lsn: stats.checkpoint_lsn,
                carried_bytes: stats.bytes_replayed,
                ..CheckpointInfo::default()
            }),
            observer: std::sync::OnceLock::new(),
            // A spare is asked for when the active segment is half written: a log that never
            // fills half a segment (a short-lived or idle node) never pays for one.
            spare: Mutex::new(Spare {
                ready: false,
                wanted: false,
                stop: false,
            }),
            spare_changed: Condvar::new(),
            prealloc_failures: AtomicU64::new(0),
            spares_used: AtomicU64::new(u64::from(from_spare)),
            inline_batches: AtomicU64::new(0),
            writer: Mutex::new(Writer::new(active, last_lsn)),
        });

        let preallocator = if preallocate {
            let preallocator_shared = Arc::clone(&shared);
            Some(
                std::thread::Builder::new()
                    .name("imstate-log-prealloc".to_string())
                    .spawn(move || preallocate_spares(&preallocator_shared))
                    .map_err(|source| {
                        LogError::io("spawning the log preallocator thread", source)
                    })?,
            )
        } else {
            None
        };

        let flusher_shared = Arc::clone(&shared);
        let handle = std::thread::Builder::new()
            .name("imstate-log-flusher".to_string())
            .spawn(move || {
                let outcome = catch_unwind(AssertUnwindSafe(|| run_flusher(&flusher_shared)));
                if outcome.is_err() {
                    flusher_shared.poison("the log flusher thread panicked".to_string());
                }
            })
            .map_err(|source| LogError::io("spawning the log flusher thread", source))?;

        let log = Log {
            shared,
            flusher: Mutex::new(Some(handle)),
            preallocator: Mutex::new(preallocator),
            checkpoint_lock: Mutex::new(()),
        };
        Ok((log, stats))
    }

    /// Assigns the next LSN and queues the record for the flusher. Does not wait for I/O
    /// (blocks only while the queue is full). Returns the assigned LSN. Fails if the log is
    /// poisoned or closed, or the payload is larger than `record_bytes_max`. LSN assignment
    /// order is on-disk order.
    pub fn append(&self, payload: Vec<u8>) -> Result<Lsn, LogError> {
        self.push(payload, true, false)
    }

    /// [`Log::append`] that never waits: when the queue is full the record is queued beyond
    /// `queue_records_max`. For appends under a lock that others (async tasks) wait for: the
    /// caller applies back-pressure before it takes the lock, with [`Log::admit`] (async) or
    /// [`Log::wait_room`] (a thread), so the queue goes over its limit by at most the records
    /// of the writers admitted at once.
    pub fn append_unblocked(&self, payload: Vec<u8>) -> Result<Lsn, LogError> {
        self.push(payload, false, false)
    }

    /// [`Log::append_unblocked`] that does not wake the flusher thread, with
    /// [`LogOptions::inline_writes`] under `Batch` and `Never` (otherwise it is
    /// `append_unblocked`): the caller is expected to wait with
    /// [`Log::durable`], which writes the queued records on its own thread when no one else
    /// is writing (one thread hand-off and one wake-up fewer per write). A record nobody
    /// waits for is written by the flusher's next pass, within `DEFERRED_WRITE_TICK` (10 ms)
    /// or `T` under `Batch(T)` if shorter; [`Log::wait_durable`] wakes the flusher at once.
    pub fn append_deferred(&self, payload: Vec<u8>) -> Result<Lsn, LogError> {
        self.push(payload, false, self.shared.inline_writes())
    }

    /// Resolves once the queue is under `queue_records_max` (at once if it is), or with the
    /// poison or closed error: back-pressure for an async writer, taken before the locks under
    /// which it will append with [`Log::append_unblocked`].
    pub async fn admit(&self) -> Result<(), LogError> {
        let max = self.shared.options.queue_records_max as u64;
        // The common case, a log that keeps up: two atomic loads.
        if self.shared.queued.load(Ordering::Acquire) < max && !self.is_poisoned() {
            return Ok(());
        }
        loop {
            let notified = self.shared.room_notify.notified();
            if let Some(error) = self.unusable() {
                return Err(error);
            }
            if self.shared.queued.load(Ordering::Acquire) < max {
                return Ok(());
            }
            notified.await;
        }
    }

    /// Blocks until the queue is under `queue_records_max` (a thread's [`Log::admit`]).
    pub fn wait_room(&self) -> Result<(), LogError> {
        let mut queue = self.shared.queue.lock();
        loop {
            if let Some(message) = &queue.poison {
                return Err(LogError::Poisoned(message.clone()));
            }
            if queue.closing {
                return Err(LogError::Closed);
            }
            if queue.pending.len() < self.shared.options.queue_records_max {
                return Ok(());
            }
            self.shared.queue_has_room.wait(&mut queue);
        }
    }

    /// The error every operation gets once the log is poisoned. (A closed log admits: the
    /// append that follows fails with [`LogError::Closed`].)
    fn unusable(&self) -> Option<LogError> {
        if self.is_poisoned() {
            return Some(LogError::Poisoned(
                self.shared.poison_message().unwrap_or_default(),
            ));
        }
        None
    }

    fn push(
        &self,
        payload: Vec<u8>,
        wait_for_room: bool,
        deferred: bool,
    ) -> Result<Lsn, LogError> {
        let max = self.shared.options.record_bytes_max;
        if payload.len() > max as usize {
            return Err(LogError::RecordTooLarge {
                len: payload.len(),
                max,
            });
        }
        // The expensive part of the checksum runs outside the lock.
        let payload_crc = crc32c::crc32c(&payload);
        let len = payload.len() as u32;
        let mut queue = self.shared.queue.lock();
        loop {
            if let Some(message) = &queue.poison {
                return Err(LogError::Poisoned(message.clone()));
            }
            if queue.closing {
                return Err(LogError::Closed);
            }
            if !wait_for_room || queue.pending.len() < self.shared.options.queue_records_max {
                break;
            }
            self.shared.queue_has_room.wait(&mut queue);
        }
        let lsn = queue.next_lsn;
        queue.next_lsn += 1;
        let header = record::header_from_payload_crc(lsn, len, payload_crc);
        queue.pending.push_back(Pending { header, payload });
        self.shared
            .queued
            .store(queue.pending.len() as u64, Ordering::Release);
        self.shared.last_lsn.store(lsn, Ordering::Release);
        // The flusher sleeps only on an empty queue, or while someone holds the writer role
        // (the holder takes this record, or wakes the flusher when it gives the role back).
        let wake = queue.pending.len() == 1 && !queue.writer_active && !deferred;
        drop(queue);
        self.shared.appends.fetch_add(1, Ordering::Relaxed);
        if wake {
            self.shared.queue_has_work.notify_one();
        }
        Ok(lsn)
    }

    /// Installs the observer of flusher timings; returns false if one was already set.
    pub fn set_observer(&self, observer: Arc<dyn LogObserver>) -> bool {
        self.shared.observer.set(observer).is_ok()
    }

    /// Highest LSN assigned so far (0 if none).
    pub fn last_lsn(&self) -> Lsn {
        self.shared.last_lsn.load(Ordering::Acquire)
    }

    /// Highest LSN that is durable under the policy: under `Always` fsynced; under `Batch` and
    /// `Never` written to the file (OS page cache); under `Batch(T)` the flusher fsyncs at
    /// least every `T`.
    pub fn durable_lsn(&self) -> Lsn {
        self.shared.durable_lsn.load(Ordering::Acquire)
    }

    /// Highest LSN fsynced.
    pub fn synced_lsn(&self) -> Lsn {
        self.shared.synced_lsn.load(Ordering::Acquire)
    }

    /// Blocks until `durable_lsn() >= lsn`, or returns the poison or closed error.
    pub fn wait_durable(&self, lsn: Lsn) -> Result<(), LogError> {
        if self.durable_lsn() >= lsn {
            return Ok(());
        }
        if self.shared.inline_writes() {
            // The record may be a deferred one that woke nobody.
            self.shared.queue_has_work.notify_one();
        }
        let mut progress = self.shared.progress.lock();
        loop {
            if let Some(outcome) = progress.outcome(lsn) {
                return outcome;
            }
            self.shared.progress_changed.wait(&mut progress);
        }
    }

    /// Resolves once `durable_lsn() >= lsn`, or with the poison or closed error. Built on
    /// `tokio::sync::watch`: works on any executor, no runtime inside the log.
    ///
    /// With [`LogOptions::inline_writes`], under `Batch` and `Never` (where a record is durable
    /// once written), a waiter first writes the queued records itself when no one else is
    /// writing: a `write` to the page cache on the caller's thread, never an fsync or a segment
    /// roll (those stay with the flusher and the syncer threads). When fewer than
    /// `GATHER_BELOW` records are queued it yields to the executor once first: the other
    /// requests ready on this thread append theirs, and one write (and no wake-up) serves
    /// them all, as an event loop writes once per pass. Without the yield each request wrote
    /// its own record, and the peak fell below the flusher's.
    pub async fn durable(&self, lsn: Lsn) -> Result<(), LogError> {
        if self.durable_lsn() >= lsn {
            return Ok(());
        }
        if self.shared.inline_writes() {
            // Records not yet written (under `Batch` and `Never`, durable = written): two
            // atomic loads, no queue lock on the request path.
            if self.last_lsn().saturating_sub(self.durable_lsn()) < GATHER_BELOW as u64 {
                YieldOnce(false).await;
                if self.durable_lsn() >= lsn {
                    return Ok(());
                }
            }
            write_inline(&self.shared);
            if self.durable_lsn() >= lsn {
                return Ok(());
            }
        }
        let mut receiver = self.shared.progress_watch.subscribe();
        match receiver
            .wait_for(|progress| progress.outcome(lsn).is_some())
            .await
        {
            Ok(progress) => progress.outcome(lsn).unwrap_or(Err(LogError::Closed)),
            Err(_) => Err(LogError::Closed),
        }
    }

    /// Resolves with the reason once the log is poisoned; never while it is healthy. A node
    /// selects on it to stop at once, whichever path (an append, the flusher, the syncer, a
    /// checkpoint) met the failure.
    ///
    /// It waits on a notification of its own, not on the progress channel: a node's task
    /// selecting on it is woken once, by the poison, instead of by every acknowledged write.
    pub async fn poisoned(&self) -> String {
        loop {
            // Registered before the check: a poison between the two still wakes it.
            let notified = self.shared.poison_notify.notified();
            if let Some(reason) = self.shared.poison_message() {
                return reason;
            }
            notified.await;
        }
    }

    /// Writes a checkpoint whose data contains the effects of every record with
    /// `lsn <= covered_lsn` (it may contain later ones too: callers' records are idempotent).
    /// `write` streams the snapshot. Temp file, fsync, rename to the final name, fsync of the
    /// directory; then deletes older checkpoints and every segment whose records are all
    /// `<= covered_lsn` (never the active segment). Runs on the caller's thread; appenders and
    /// the flusher are never blocked by it (only a brief lock on the segment list for the
    /// deletion). Concurrent checkpoint calls are serialized.
    ///
    /// `covered_lsn` must not exceed `last_lsn()` (a checkpoint past the log would make
    /// recovery skip LSNs) nor be below the newest checkpoint's; otherwise the call fails with
    /// an `InvalidInput` I/O error. A failure before the rename
    /// leaves the log unaffected; a failed directory fsync poisons it.
    pub fn checkpoint(
        &self,
        covered_lsn: Lsn,
        write: impl FnOnce(&mut dyn std::io::Write) -> std::io::Result<()>,
    ) -> Result<CheckpointStats, LogError> {
        let _serialized = self.checkpoint_lock.lock();
        let start = Instant::now();
        if let Some(message) = self.shared.poison_message() {
            return Err(LogError::Poisoned(message));
        }
        if self.shared.progress.lock().closed {
            return Err(LogError::Closed);
        }
        let last_lsn = self.last_lsn();
        if covered_lsn > last_lsn {
            return Err(LogError::io(
                format!("checkpoint at lsn {covered_lsn}"),
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("covered lsn is beyond the last assigned lsn {last_lsn}"),
                ),
            ));
        }
        let newest = self.shared.checkpoint_info.lock().last_lsn;
        if let Some(newest) = newest.filter(|&newest| covered_lsn < newest) {
            // Segments up to `newest` may already be gone: an older checkpoint would leave a
            // hole that recovery reports as corruption.
            return Err(LogError::io(
                format!("checkpoint at lsn {covered_lsn}"),
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("a newer checkpoint already covers lsn {newest}"),
                ),
            ));
        }
        let written_at_start = self.shared.bytes_written.load(Ordering::Acquire);
        let storage = self.shared.storage.as_ref();
        let final_name = record::checkpoint_name(covered_lsn);
        let temp_name = format!("{final_name}{}", record::TEMP_SUFFIX);

        let bytes = match write_checkpoint_file(storage, &temp_name, covered_lsn, write) {
            Ok(bytes) => bytes,
            Err(error) => {
                // Best effort: recovery removes leftovers anyway.
                let _ = storage.remove(&temp_name);
                return Err(error);
            }
        };
        storage
            .rename(&temp_name, &final_name)
            .map_err(|source| LogError::io(format!("renaming {temp_name}"), source))?;
        self.sync_dir_or_poison(&format!("after renaming {final_name}"))?;

        let removable: Vec<String> = {
            let mut segments = self.shared.segments.lock();
            let active = segments.len().saturating_sub(1);
            let mut removable = Vec::new();
            let mut index = 0;
            segments.retain(|segment| {
                let remove =
                    index < active && segment.last_lsn.is_none_or(|last| last <= covered_lsn);
                index += 1;
                if remove {
                    removable.push(segment.name.clone());
                }
                !remove
            });
            removable
        };
        let mut removed_any = !removable.is_empty();
        for name in &removable {
            storage
                .remove(name)
                .map_err(|source| LogError::io(format!("removing segment {name}"), source))?;
        }
        let names = storage
            .list()
            .map_err(|source| LogError::io("listing the log directory", source))?;
        for name in names {
            if record::parse_checkpoint_name(&name).is_some() && name != final_name {
                storage.remove(&name).map_err(|source| {
                    LogError::io(format!("removing old checkpoint {name}"), source)
                })?;
                removed_any = true;
            }
        }
        if removed_any {
            self.sync_dir_or_poison("after deleting covered files")?;
        }

        let elapsed = start.elapsed();
        {
            let mut info = self.shared.checkpoint_info.lock();
            info.last_lsn = Some(covered_lsn);
            info.last_bytes = bytes;
            info.last_duration = elapsed;
            info.carried_bytes = 0;
            info.written_base = written_at_start;
        }
        Ok(CheckpointStats {
            covered_lsn,
            bytes,
            elapsed,
            segments_removed: removable.len(),
        })
    }

    fn sync_dir_or_poison(&self, what: &str) -> Result<(), LogError> {
        self.shared.storage.sync_dir().map_err(|source| {
            let message = format!("fsync of the log directory {what} failed: {source}");
            self.shared.poison(message.clone());
            LogError::Poisoned(message)
        })
    }

    /// The LSN the newest checkpoint covers (`None` before the first): a later checkpoint
    /// must cover at least as much.
    pub fn checkpoint_lsn(&self) -> Option<Lsn> {
        self.shared.checkpoint_info.lock().last_lsn
    }

    /// Bytes of log written since the last checkpoint started (approximately: records
    /// appended while a checkpoint runs count as after it). Callers use it to decide when to
    /// checkpoint.
    pub fn bytes_since_checkpoint(&self) -> u64 {
        let written = self.shared.bytes_written.load(Ordering::Acquire);
        let info = self.shared.checkpoint_info.lock();
        info.carried_bytes + written.saturating_sub(info.written_base)
    }

    /// Counters and gauges.
    pub fn stats(&self) -> LogStats {
        let info = self.shared.checkpoint_info.lock();
        LogStats {
            appends: self.shared.appends.load(Ordering::Relaxed),
            bytes_written: self.shared.bytes_written.load(Ordering::Relaxed),
            fsyncs: self.shared.fsyncs.load(Ordering::Relaxed),
            batches: self.shared.batches.load(Ordering::Relaxed),
            last_batch_records: self.shared.last_batch_records.load(Ordering::Relaxed),
            last_lsn: self.last_lsn(),
            durable_lsn: self.durable_lsn(),
            synced_lsn: self.synced_lsn(),
            last_checkpoint_lsn: info.last_lsn,
            last_checkpoint_bytes: info.last_bytes,
            last_checkpoint_duration: info.last_duration,
            segments: self.shared.segments.lock().len(),
            poisoned: self.is_poisoned(),
            spares_used: self.shared.spares_used.load(Ordering::Relaxed),
            prealloc_failures: self.shared.prealloc_failures.load(Ordering::Relaxed),
            inline_batches: self.shared.inline_batches.load(Ordering::Relaxed),
        }
    }

    /// Whether a write or fsync failed (the log then refuses all work).
    pub fn is_poisoned(&self) -> bool {
        self.shared.poisoned.load(Ordering::Acquire)
    }

    /// Flushes and fsyncs everything queued, then stops the flusher thread. Later appends
    /// fail with [`LogError::Closed`]. Also done on drop (best effort). Idempotent.
    pub fn shutdown(&self) -> Result<(), LogError> {
        {
            let mut queue = self.shared.queue.lock();
            queue.closing = true;
        }
        self.shared.queue_has_work.notify_all();
        self.shared.queue_has_room.notify_all();
        self.shared.room_notify.notify_waiters();
        let handle = self.flusher.lock().take();
        if let Some(handle) = handle
            && handle.join().is_err()
        {
            self.shared
                .poison("the log flusher thread panicked".to_string());
        }
        self.shared.spare.lock().stop = true;
        self.shared.spare_changed.notify_all();
        if let Some(handle) = self.preallocator.lock().take() {
            let _ = handle.join();
        }
        self.shared
            .update_progress(|progress| progress.closed = true);
        match self.shared.poison_message() {
            Some(message) => Err(LogError::Poisoned(message)),
            None => Ok(()),
        }
    }
}

impl Drop for Log {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

fn write_checkpoint_file(
    storage: &dyn Storage,
    temp_name: &str,
    covered_lsn: Lsn,
    write: impl FnOnce(&mut dyn std::io::Write) -> std::io::Result<()>,
) -> Result<u64, LogError> {
    let context = |what: &str| format!("{what} {temp_name}");
    let file = storage
        .create(temp_name)
        .map_err(|source| LogError::io(context("creating"), source))?;
    let mut writer = CheckpointWriter::new(file, covered_lsn)
        .map_err(|source| LogError::io(context("writing"), source))?;
    write(&mut writer).map_err(|source| LogError::io(context("writing snapshot into"), source))?;
    let (mut file, bytes) = writer
        .finish()
        .map_err(|source| LogError::io(context("writing"), source))?;
    file.sync()
        .map_err(|source| LogError::io(context("fsync of"), source))?;
    Ok(bytes)
}

/// The segment the flusher appends to.
struct SegmentWriter {
    file: Box<dyn StorageFile>,
    name: String,
    first_lsn: Lsn,
    /// Bytes in the file, including those in the flusher's unwritten buffer.
    bytes: u64,
}

/// Bytes of zeros the preallocator writes per call.
const PREALLOCATE_CHUNK_BYTES: usize = 1 << 20;

/// The preallocator thread: makes a spare segment whenever the flusher wants one. Failures
/// (a full disk) are counted, the partial file removed, and the log goes on without a spare.
fn preallocate_spares(shared: &Shared) {
    loop {
        {
            let mut spare = shared.spare.lock();
            while !spare.stop && (!spare.wanted || spare.ready) {
                shared.spare_changed.wait(&mut spare);
            }
            if spare.stop {
                return;
            }
        }
        let stopping = || shared.spare.lock().stop;
        let made = make_spare(
            shared.storage.as_ref(),
            shared.options.segment_bytes_max,
            &stopping,
        );
        let mut spare = shared.spare.lock();
        spare.wanted = false;
        match made {
            Ok(()) => spare.ready = true,
            Err(_) => {
                shared.prealloc_failures.fetch_add(1, Ordering::Relaxed);
                let _ = shared.storage.remove(record::SPARE_TEMP_NAME);
            }
        }
        shared.spare_changed.notify_all();
    }
}

/// Writes [`record::SPARE_NAME`]: `bytes` zeros, fsynced under a temp name, renamed, and the
/// directory fsynced, so a spare that exists under its name is complete.
fn make_spare(
    storage: &dyn Storage,
    bytes: u64,
    stopping: &dyn Fn() -> bool,
) -> std::io::Result<()> {
    let mut file = storage.create(record::SPARE_TEMP_NAME)?;
    let zeros = vec![0u8; PREALLOCATE_CHUNK_BYTES.min(bytes as usize)];
    let mut left = bytes;
    while left > 0 {
        if stopping() {
            return Err(std::io::Error::other("the log is closing"));
        }
        let chunk = left.min(zeros.len() as u64) as usize;
        file.write_all(&zeros[..chunk])?;
        left -= chunk as u64;
    }
    file.sync()?;
    drop(file);
    storage.rename(record::SPARE_TEMP_NAME, record::SPARE_NAME)?;
    storage.sync_dir()
}

impl SegmentWriter {
    /// The segment for `first_lsn` from the spare: renamed, the directory synced, opened to
    /// write over its zeros from the start.
    fn from_spare(storage: &dyn Storage, first_lsn: Lsn) -> Result<Self, LogError> {
        let name = record::segment_name(first_lsn);
        storage
            .rename(record::SPARE_NAME, &name)
            .map_err(|source| LogError::io(format!("renaming the spare to {name}"), source))?;
        storage.sync_dir().map_err(|source| {
            LogError::io(
                format!("fsync of the log directory after renaming the spare to {name}"),
                source,
            )
        })?;
        let file = storage
            .open_write(&name, 0)
            .map_err(|source| LogError::io(format!("opening segment {name}"), source))?;
        Ok(SegmentWriter {
            file,
            name,
            first_lsn,
            bytes: 0,
        })
    }

    /// Creates the segment for `first_lsn` and makes its directory entry durable, so records
    /// acknowledged in it cannot vanish with the entry.
    fn create(storage: &dyn Storage, first_lsn: Lsn) -> Result<Self, LogError> {
        let name = record::segment_name(first_lsn);
        let file = storage
            .create(&name)
            .map_err(|source| LogError::io(format!("creating segment {name}"), source))?;
        storage.sync_dir().map_err(|source| {
            LogError::io(
                format!("fsync of the log directory after creating {name}"),
                source,
            )
        })?;
        Ok(SegmentWriter {
            file,
            name,
            first_lsn,
            bytes: 0,
        })
    }
}

/// The state of whoever writes the log: the active segment, the batch being written, and what
/// is written and synced. It lives in `Shared::writer`; only the holder of the writer role
/// (`Queue::writer_active`) locks it, so the lock is never contended for long: the flusher
/// thread, or an async waiter writing inline ([`Log::durable`]).
struct Writer {
    segment: SegmentWriter,
    batch: Vec<Pending>,
    buffer: Vec<u8>,
    written: Lsn,
    /// Highest LSN the writer has fsynced itself (the background syncer publishes its own).
    synced: Lsn,
    /// Highest LSN covered by an fsync done or handed to the background syncer.
    sync_requested: Lsn,
    last_sync: Instant,
    /// Under `Batch`, the thread that fsyncs while the writer keeps writing. Started by the
    /// flusher thread and dropped by it when it ends (the syncer holds the shared state).
    syncer: Option<Syncer>,
    /// Whether a spare was asked for since the active segment started (preallocating logs).
    spare_asked: bool,
}

/// Under `Batch(T)`, fsyncs run on this thread so the flusher keeps writing (and, since a
/// record is durable once written under `Batch`, acknowledging) while a slow fsync completes:
/// with a checkpoint flushing to the same disk, one can take hundreds of milliseconds. At most
/// one sync is in flight; a sync that fails poisons the log, exactly as an inline one does.
struct Syncer {
    requests: std::sync::mpsc::SyncSender<(Box<dyn SyncHandle>, Lsn, String)>,
    busy: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Syncer {
    fn start(shared: &Arc<Shared>) -> Option<Syncer> {
        let (requests, incoming) =
            std::sync::mpsc::sync_channel::<(Box<dyn SyncHandle>, Lsn, String)>(1);
        let busy = Arc::new(AtomicBool::new(false));
        let (thread_shared, thread_busy) = (Arc::clone(shared), Arc::clone(&busy));
        let thread = std::thread::Builder::new()
            .name("imstate-log-syncer".to_string())
            .spawn(move || {
                for (mut handle, covered, name) in incoming {
                    let started = Instant::now();
                    match handle.sync() {
                        Ok(()) => {
                            if let Some(observer) = thread_shared.observer.get() {
                                observer.fsync(started.elapsed());
                            }
                            thread_shared.fsyncs.fetch_add(1, Ordering::Relaxed);
                            // `covered` was written before the flusher asked for this sync, but
                            // the flusher may not have published that yet: publish it as
                            // written too, or a fast fsync (tmpfs) would make synced > written.
                            thread_shared.publish(covered, covered);
                        }
                        Err(error) => {
                            thread_shared.poison(format!("fsync of {name} failed: {error}"));
                            return;
                        }
                    }
                    thread_busy.store(false, Ordering::Release);
                }
            })
            .ok()?;
        Some(Syncer {
            requests,
            busy,
            thread: Some(thread),
        })
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        // Closing the channel ends the thread after the sync in flight, if any.
        let (closed, _) = std::sync::mpsc::sync_channel(0);
        drop(std::mem::replace(&mut self.requests, closed));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Writer {
    /// `last` is the LSN recovered at open: everything up to it is on disk and synced.
    fn new(segment: SegmentWriter, last: Lsn) -> Self {
        Writer {
            segment,
            batch: Vec::new(),
            buffer: Vec::new(),
            written: last,
            synced: last,
            sync_requested: last,
            last_sync: Instant::now(),
            syncer: None,
            spare_asked: false,
        }
    }

    /// Hands an fsync of everything written so far to the background syncer. Returns false
    /// when it cannot (no syncer, or the file has no sync handle): sync inline then. A sync
    /// still in flight counts as handed over; the next one is asked for when it is done.
    fn sync_in_background(&mut self, shared: &Shared) -> bool {
        let Some(syncer) = &self.syncer else {
            return false;
        };
        if syncer.busy.load(Ordering::Acquire) {
            // Ask again one interval from now (the flusher's timed wait), not at once.
            self.last_sync = Instant::now();
            return true;
        }
        let Some(handle) = self.segment.file.sync_handle() else {
            return false;
        };
        syncer.busy.store(true, Ordering::Release);
        if syncer
            .requests
            .send((
                handle,
                self.written,
                shared.storage.describe(&self.segment.name),
            ))
            .is_err()
        {
            // The syncer stopped after a failure; the log is poisoned already.
            return true;
        }
        self.sync_requested = self.written;
        self.last_sync = Instant::now();
        true
    }

    /// Moves records out of the queue into `batch`: at most `BATCH_BYTES_MAX` (at least one
    /// record), and, when `fit` is set, only those that fit in the active segment (an inline
    /// writer never rolls). Called with the queue locked, by the holder of the writer role.
    fn take_batch(&mut self, shared: &Shared, queue: &mut Queue, fit: bool) {
        let mut bytes = 0;
        let room = shared
            .options
            .segment_bytes_max
            .saturating_sub(self.segment.bytes);
        while let Some(next) = queue.pending.front() {
            let frame = next.frame_bytes();
            if !self.batch.is_empty() && bytes + frame > BATCH_BYTES_MAX {
                break;
            }
            if fit && self.segment.bytes > 0 && (bytes + frame) as u64 > room {
                break;
            }
            bytes += frame;
            if let Some(next) = queue.pending.pop_front() {
                self.batch.push(next);
            }
        }
        shared
            .queued
            .store(queue.pending.len() as u64, Ordering::Release);
    }

    /// [`Writer::take_batch`] under the queue lock, then wakes the appenders and admissions
    /// waiting for room if it took anything.
    fn take_from_queue(&mut self, shared: &Shared, fit: bool) {
        {
            let mut queue = shared.queue.lock();
            self.take_batch(shared, &mut queue, fit);
        }
        if !self.batch.is_empty() {
            shared.queue_has_room.notify_all();
            shared.room_notify.notify_waiters();
        }
    }

    /// Writes the batch with one write per segment touched, rolling segments as needed.
    fn write_batch(&mut self, shared: &Shared) -> Result<(), String> {
        if self.batch.is_empty() {
            return Ok(());
        }
        // Negative control (test builds only): acknowledge the batch before it is written or
        // fsynced. The crash-point tests must report the acknowledged records it loses.
        #[cfg(feature = "planted-ack-before-fsync")]
        if let Some(last) = self.batch.last() {
            shared.publish(last.lsn(), last.lsn());
        }
        let segment_bytes_max = shared.options.segment_bytes_max;
        let batch = std::mem::take(&mut self.batch);
        let records = batch.len() as u64;
        let bytes_before = shared.bytes_written.load(Ordering::Relaxed);
        let mut buffered_last = self.written;
        for pending in &batch {
            debug_assert!(record::header_matches(&pending.header, &pending.payload));
            debug_assert_eq!(pending.lsn(), buffered_last + 1);
            let frame = pending.frame_bytes() as u64;
            if self.segment.bytes > 0 && self.segment.bytes + frame > segment_bytes_max {
                self.flush_buffer(shared, buffered_last)?;
                self.roll(shared)?;
            }
            self.buffer.extend_from_slice(&pending.header);
            self.buffer.extend_from_slice(&pending.payload);
            self.segment.bytes += frame;
            buffered_last = pending.lsn();
        }
        self.flush_buffer(shared, buffered_last)?;
        self.batch = batch;
        self.batch.clear();
        shared.batches.fetch_add(1, Ordering::Relaxed);
        shared.last_batch_records.store(records, Ordering::Relaxed);
        if let Some(observer) = shared.observer.get() {
            // Only the writer adds to `bytes_written`, so the difference is this batch.
            let bytes = shared.bytes_written.load(Ordering::Relaxed) - bytes_before;
            observer.batch(records, bytes);
        }
        Ok(())
    }

    /// Writes the buffered records (the last of which is `last_lsn`) to the active segment.
    fn flush_buffer(&mut self, shared: &Shared, last_lsn: Lsn) -> Result<(), String> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        self.segment.file.write_all(&self.buffer).map_err(|error| {
            let path = shared.storage.describe(&self.segment.name);
            format!("write to {path} failed: {error}")
        })?;
        shared
            .bytes_written
            .fetch_add(self.buffer.len() as u64, Ordering::Relaxed);
        self.buffer.clear();
        self.written = last_lsn;
        let mut segments = shared.segments.lock();
        if let Some(active) = segments.last_mut() {
            debug_assert_eq!(active.name, self.segment.name);
            active.last_lsn = Some(last_lsn);
        }
        drop(segments);
        // Half the segment written: ask for the spare the next roll will take, so that a busy
        // log has it in time, while a log that never fills a segment never pays for one.
        if !self.spare_asked && self.segment.bytes > shared.options.segment_bytes_max / 2 {
            self.spare_asked = true;
            if shared.options.preallocate && shared.storage.preallocates() {
                shared.spare.lock().wanted = true;
                shared.spare_changed.notify_all();
            }
        }
        Ok(())
    }

    fn sync(&mut self, shared: &Shared) -> Result<(), String> {
        if self.synced == self.written {
            return Ok(());
        }
        let started = Instant::now();
        self.segment.file.sync().map_err(|error| {
            let path = shared.storage.describe(&self.segment.name);
            format!("fsync of {path} failed: {error}")
        })?;
        if let Some(observer) = shared.observer.get() {
            observer.fsync(started.elapsed());
        }
        shared.fsyncs.fetch_add(1, Ordering::Relaxed);
        self.synced = self.written;
        self.sync_requested = self.sync_requested.max(self.written);
        self.last_sync = Instant::now();
        Ok(())
    }

    /// Seals the active segment (fsynced, whatever the policy, so a crash cannot leave a hole
    /// before records of the next segment) and starts the next one.
    fn roll(&mut self, shared: &Shared) -> Result<(), String> {
        self.sync(shared)?;
        let storage = shared.storage.as_ref();
        let spare_ready = std::mem::take(&mut shared.spare.lock().ready);
        let next = if spare_ready {
            shared.spares_used.fetch_add(1, Ordering::Relaxed);
            SegmentWriter::from_spare(storage, self.written + 1)
        } else {
            SegmentWriter::create(storage, self.written + 1)
        }
        .map_err(|error| error.to_string())?;
        // The next spare is asked for when this segment is half written (`flush_buffer`).
        self.spare_asked = false;
        let mut segments = shared.segments.lock();
        debug_assert!(
            segments
                .last()
                .is_none_or(|last| last.first_lsn < next.first_lsn)
        );
        segments.push(SegmentInfo {
            name: next.name.clone(),
            first_lsn: next.first_lsn,
            last_lsn: None,
        });
        drop(segments);
        self.segment = next;
        Ok(())
    }
}

/// How long an idle flusher sleeps before it looks at the queue again under `Batch` and
/// `Never`: records appended with [`Log::append_deferred`] wake nobody, and a record nobody
/// waits for is written by this pass. (Under `Batch(T)` it sleeps at most `T`.)
const DEFERRED_WRITE_TICK: Duration = Duration::from_millis(10);

/// An async waiter writes inline at most this many batches before it hands the rest to the
/// flusher thread (so one request does not write for everyone under a sustained load).
const INLINE_BATCHES_MAX: usize = 4;

/// The flusher thread: writes whatever no inline writer took, fsyncs per policy (inline under
/// `Always`, on the syncer thread under `Batch`), rolls segments, and drains the queue at
/// shutdown.
fn run_flusher(shared: &Arc<Shared>) {
    let policy = shared.options.fsync;
    if matches!(policy, FsyncPolicy::Batch(_)) {
        shared.writer.lock().syncer = Syncer::start(shared);
    }
    while let Some(closing) = claim_for_flusher(shared, policy) {
        let mut writer = shared.writer.lock();
        let result = flusher_pass(shared, &mut writer, policy, closing);
        // Poisoned before the role is given back: a failed write may have lost its batch, and
        // no one may write the records after it.
        if let Err(message) = &result {
            shared.poison(message.clone());
        }
        drop(writer);
        release_writer_role(shared);
        if result.is_err() {
            break;
        }
        if closing {
            break;
        }
    }
    // The syncer's thread holds the shared state: end it here, not when the state drops.
    let syncer = shared.writer.lock().syncer.take();
    drop(syncer);
}

/// Waits until the flusher has something to do and takes the writer role for it. Returns
/// `Some(closing)`, where `closing` means the queue is to be drained for shutdown, or `None`
/// once the log is poisoned.
fn claim_for_flusher(shared: &Shared, policy: FsyncPolicy) -> Option<bool> {
    loop {
        match try_claim_for_flusher(shared, policy) {
            Claim::Poisoned => return None,
            Claim::Claimed { closing } => return Some(closing),
            // An inline writer took the role while the flusher yielded: wait again.
            Claim::Taken => continue,
        }
    }
}

/// What one attempt of [`claim_for_flusher`] got.
enum Claim {
    Poisoned,
    Claimed { closing: bool },
    Taken,
}

fn try_claim_for_flusher(shared: &Shared, policy: FsyncPolicy) -> Claim {
    // Deferred records wake nobody: with inline writes on, an idle flusher looks again every
    // tick. Without them, it sleeps until a record arrives or an fsync is due.
    let tick = match policy {
        _ if !shared.inline_writes() => None,
        FsyncPolicy::Batch(interval) => Some(interval.min(DEFERRED_WRITE_TICK)),
        FsyncPolicy::Never => Some(DEFERRED_WRITE_TICK),
        FsyncPolicy::Always => None,
    };
    let mut queue = shared.queue.lock();
    loop {
        if queue.poison.is_some() {
            return Claim::Poisoned;
        }
        let now = Instant::now();
        let sync_at = sync_deadline(shared, policy);
        if !queue.writer_active
            && (!queue.pending.is_empty()
                || queue.closing
                || sync_at.is_some_and(|deadline| now >= deadline))
        {
            break;
        }
        let wake = match (sync_at, tick) {
            (Some(deadline), Some(tick)) => Some(deadline.min(now + tick)),
            (Some(deadline), None) => Some(deadline),
            (None, Some(tick)) => Some(now + tick),
            (None, None) => None,
        };
        match wake {
            Some(wake) => {
                shared.queue_has_work.wait_until(&mut queue, wake);
            }
            None => shared.queue_has_work.wait(&mut queue),
        }
    }
    // Woken by the first record of a burst: give the writers that are running a moment to
    // queue theirs, so that one write and one wake-up serve them all.
    if !queue.closing && queue.pending.len() < GATHER_BELOW {
        drop(queue);
        std::thread::yield_now();
        queue = shared.queue.lock();
        if queue.poison.is_some() {
            return Claim::Poisoned;
        }
        if queue.writer_active {
            // An inline writer took the role meanwhile: it writes them.
            return Claim::Taken;
        }
    }
    queue.writer_active = true;
    Claim::Claimed {
        closing: queue.closing && queue.pending.is_empty(),
    }
}

/// Under `Batch(T)`, when the written records that no fsync covers yet are due for one (`T`
/// after the last). Called with the queue locked, so the writer's lock is only tried: an
/// inline writer holding it answers `None`, and the flusher looks again within a tick.
fn sync_deadline(shared: &Shared, policy: FsyncPolicy) -> Option<Instant> {
    let FsyncPolicy::Batch(interval) = policy else {
        return None;
    };
    let writer = shared.writer.try_lock()?;
    (writer.sync_requested < writer.written).then(|| writer.last_sync + interval)
}

/// One pass of the flusher with the writer role: writes a batch (rolling as needed), fsyncs
/// per policy, publishes.
fn flusher_pass(
    shared: &Shared,
    writer: &mut Writer,
    policy: FsyncPolicy,
    closing: bool,
) -> Result<(), String> {
    writer.take_from_queue(shared, false);
    writer.write_batch(shared)?;
    // Negative control (test builds only): besides acknowledging before the write
    // (`write_batch`), the flusher leaves its batches unsynced until a roll or the close, like a
    // disk that acknowledges from its cache. A crash right after an acknowledgement then loses
    // it every time, not only when the test's thread outruns this one to the crash image.
    let planted_no_fsync = cfg!(feature = "planted-ack-before-fsync");
    let sync_due = closing
        || !planted_no_fsync
            && match policy {
                FsyncPolicy::Always => true,
                FsyncPolicy::Batch(interval) => writer.last_sync.elapsed() >= interval,
                FsyncPolicy::Never => false,
            };
    let handed_over = sync_due && !closing && writer.sync_in_background(shared);
    if sync_due && !handed_over {
        if matches!(policy, FsyncPolicy::Batch(_)) {
            // Under `Batch` a record is durable once written: acknowledge this batch now, so
            // its writers do not wait for an inline fsync.
            shared.publish(writer.written, writer.synced);
        }
        writer.sync(shared)?;
    }
    shared.publish(writer.written, writer.synced);
    Ok(())
}

/// Gives the writer role back. Records queued meanwhile (whose appenders saw the role taken
/// and left them to its holder) go to the flusher thread; so does a shutdown.
fn release_writer_role(shared: &Shared) {
    let wake = {
        let mut queue = shared.queue.lock();
        queue.writer_active = false;
        !queue.pending.is_empty() || queue.closing
    };
    if wake {
        shared.queue_has_work.notify_one();
    }
}

/// What an async waiter does under `Batch` and `Never` before it sleeps ([`Log::durable`]):
/// if no one holds the writer role, take it and write the queued records that fit in the
/// active segment, on this thread, and publish them. No thread hand-off and no wake-up of the
/// flusher for the common case. Never fsyncs or rolls here: an fsync that is due goes to the
/// syncer thread, and records that need a roll (or more than `INLINE_BATCHES_MAX` batches)
/// are left to the flusher.
fn write_inline(shared: &Shared) {
    {
        let mut queue = shared.queue.lock();
        if queue.writer_active
            || queue.pending.is_empty()
            || queue.closing
            || queue.poison.is_some()
        {
            return;
        }
        queue.writer_active = true;
    }
    {
        let mut writer = shared.writer.lock();
        let mut result = Ok(());
        for _ in 0..INLINE_BATCHES_MAX {
            writer.take_from_queue(shared, true);
            if writer.batch.is_empty() {
                break;
            }
            result = writer.write_batch(shared);
            if result.is_err() {
                break;
            }
            shared.inline_batches.fetch_add(1, Ordering::Relaxed);
            // A due fsync goes to the syncer thread; without one (not started yet), the
            // flusher's next tick does it.
            if let FsyncPolicy::Batch(interval) = shared.options.fsync
                && writer.last_sync.elapsed() >= interval
            {
                writer.sync_in_background(shared);
            }
            shared.publish(writer.written, writer.synced);
        }
        // Poisoned before the role is given back (see `run_flusher`).
        if let Err(message) = result {
            shared.poison(message);
        }
    }
    release_writer_role(shared);
}

/// Returns `Pending` once (waking itself first), so that an executor runs the other tasks
/// that are ready before this one goes on. Any executor: tokio puts a task that woke itself
/// at the back of its worker's queue.
struct YieldOnce(bool);

impl std::future::Future for YieldOnce {
    type Output = ();

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        if self.0 {
            return std::task::Poll::Ready(());
        }
        self.0 = true;
        context.waker().wake_by_ref();
        std::task::Poll::Pending
    }
}
