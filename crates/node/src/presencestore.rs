//! The presence service's state machine: the pure registry made durable by its own log.
//!
//! ```text
//!  login ──► ShardedRegistry (shard lock) ──► Journal::record (same lock held)
//!                                               ├─► Log::append (WAL record, LSN)
//!                                               └─► broadcast (Watch subscribers)
//!        ◄── reply after Log::durable(lsn) (fsync policy: always | batch:T | never)
//!
//!  expiry thread: every tick_ms, tick gateways then every shard in bounded steps
//!  checkpoint thread: fuzzy snapshot shard by shard, never stopping writers
//!  open: checkpoint streamed from disk, sections restored on 2 threads, then the log tail
//!  shutdown: threads stopped, checkpoint if the log since the last one is long, log fsynced
//! ```
//!
//! Invariants:
//! - P1: a mutation is acknowledged only after its record is durable under the policy: under
//!   `always` fsynced, under `batch:T` written to the OS (so kill -9 loses nothing
//!   acknowledged; power loss at most the last T), under `never` written.
//! - Log order = apply order per shard: the registry calls the journal under the shard lock.
//! - Checkpoints are fuzzy: the covered LSN is read before any shard is copied; each record up
//!   to it was appended under its shard's lock while the change was applied, so the copy taken
//!   later under that lock contains it (a shard is copied in steps, each under the lock;
//!   records never move in a shard's slab, so a session live throughout is in exactly one
//!   step). Replay of later records is idempotent.
//! - B1: Watch is bounded ([`crate::watch`]): a subscriber that falls further behind than
//!   `watch_buffer_events` of its own events is cut off; nothing grows without bound.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use imstate_log::{
    CheckpointStats, FsyncPolicy, Log, LogOptions, RecoveryStats, ReplayStream, Storage,
};
use imstate_presence::{
    Change, Entry, Event, GatewayDownOutcome, HeartbeatBatchOutcome, Journal, LoginOutcome,
    LoginRequest, PresenceError, RegistryOptions, Session, ShardedRegistry, TICK_VISITS_PER_LOCK,
};
use parking_lot::Mutex;
use tokio::sync::watch;

use crate::NodeError;
use crate::clock::Clock;
use crate::feed::{ChangeFeed, FeedLimits};
use crate::watch::{WatchHub, WatchLimits};

/// Sessions one expiry step may visit under one shard lock. Smaller than the core's default
/// ([`TICK_VISITS_PER_LOCK`]) because the node also appends a log record per expiry under the
/// lock: about 256 × 1 µs per hold.
pub const EXPIRY_VISITS_PER_LOCK: usize = TICK_VISITS_PER_LOCK / 8;

/// Log bytes since the last checkpoint from which a clean shutdown writes a checkpoint
/// (or `checkpoint_log_bytes` if smaller; never when that is 0).
///
/// Why at shutdown: a restart then restores a compact checkpoint (1 M sessions: about 14 MB,
/// a fraction of a second) instead of replaying the log (1 M logins: about 70 MB). Why only
/// past a threshold: a short log replays as fast as a checkpoint loads, and writing one costs
/// time in every shutdown (about 0.1 s per million sessions). 8 MiB is about 100 k records.
pub const SHUTDOWN_CHECKPOINT_LOG_BYTES: u64 = 8 * 1024 * 1024;

/// Bytes of log records buffered per replay batch at recovery (see [`ReplayBatch`]). One
/// buffer, allocated once: at 8 MiB about 115 k logins per batch.
pub const REPLAY_BATCH_BYTES: usize = 8 * 1024 * 1024;

/// Log replay in batches grouped by shard.
///
/// The log delivers records in order; each is routed by its uid ([`Change::peek_uid`], no
/// decoding) and its bytes are copied into one buffer, with its shard noted. A full batch is
/// then sorted by shard, decoded and applied shard by shard, on two threads that each take
/// half of the shards ([`imstate_presence::RESTORE_THREADS`]). Replaying in log order would touch a different
/// shard's memory on every record (uids are spread over the shards), missing the cache each
/// time; grouped, each shard's records and index stay in cache while its part of the batch
/// is applied, and decoding runs in parallel too.
///
/// Why this gives the state that replaying in log order gives: the records of one shard keep
/// their log order, and records of different shards commute (they touch disjoint sessions).
/// A heartbeat batch is split into one heartbeat per session (each applied as a maximum). A
/// gateway drop recorded under another shard count may concern every shard: everything
/// queued before it is applied first, then it. Gateway lease records commute with session
/// records (replay never links the two), so they apply at once.
struct ReplayBatch<'r> {
    registry: &'r ShardedRegistry,
    /// Buffer size that triggers a flush ([`REPLAY_BATCH_BYTES`]; tests use tiny batches).
    bytes_max: usize,
    /// The queued records, each as (length u32 LE, payload), in log order.
    bytes: Vec<u8>,
    /// (shard, offset in `bytes`) of each queued record, in log order until sorted by shard.
    entries: Vec<(u32, u32)>,
}

impl<'r> ReplayBatch<'r> {
    fn new(registry: &'r ShardedRegistry, bytes_max: usize) -> Self {
        Self {
            registry,
            bytes_max,
            bytes: Vec::new(),
            entries: Vec::new(),
        }
    }

    /// Queues one log record for its shard, or applies it now if it is not a single shard's.
    fn push(&mut self, payload: &[u8]) -> Result<(), String> {
        let registry = self.registry;
        if let Some(uid) = Change::peek_uid(payload) {
            return self.queue(registry.shard_index(uid), payload);
        }
        let change = Change::decode(payload).map_err(|error| error.to_string())?;
        match &change {
            Change::HeartbeatBatch { at_ms, sessions } => {
                for &(uid, conn) in sessions {
                    let at_ms = *at_ms;
                    let heartbeat = Change::Heartbeat { uid, conn, at_ms }.to_bytes();
                    self.queue(registry.shard_index(uid), &heartbeat)?;
                }
                Ok(())
            }
            Change::GatewayDown { scope, .. }
                if scope.count as usize == registry.shard_count() =>
            {
                self.queue(scope.index as usize, payload)
            }
            Change::GatewayDown { .. } => {
                self.flush()?;
                registry.apply_change(&change).map_err(|e| e.to_string())
            }
            _ => registry.apply_change(&change).map_err(|e| e.to_string()),
        }
    }

    fn queue(&mut self, shard: usize, payload: &[u8]) -> Result<(), String> {
        if self.bytes.len() + 4 + payload.len() > self.bytes_max {
            self.flush()?;
        }
        if self.bytes.capacity() == 0 {
            // Allocated once, and large enough to be mapped apart from the heap: returned to
            // the system when recovery ends instead of leaving holes in it.
            self.bytes.reserve_exact(self.bytes_max);
            self.entries.reserve_exact(self.bytes_max / 16);
        }
        self.entries.push((shard as u32, self.bytes.len() as u32));
        self.bytes
            .extend_from_slice(&(payload.len() as u32).to_le_bytes());
        self.bytes.extend_from_slice(payload);
        Ok(())
    }

    /// Decodes and applies everything queued, each shard's records in log order.
    ///
    /// A thread that meets the gateway id ceiling stops where it is; once both have stopped,
    /// unused gateway ids are reclaimed (no shard lock is held then) and each resumes at the
    /// record it stopped at. Only a reclaim that frees nothing makes the ceiling an error.
    fn flush(&mut self) -> Result<(), String> {
        if self.entries.is_empty() {
            return Ok(());
        }
        // Offsets grow in log order, so sorting by (shard, offset) keeps each shard's order.
        self.entries.sort_unstable();
        let registry = self.registry;
        let bytes = &self.bytes;
        // Applies `entries` in order; on error, how many were applied and the error.
        let apply = |entries: &[(u32, u32)]| -> Result<(), (usize, String, bool)> {
            let fail = |applied: usize, error: PresenceError| {
                let exceeded = matches!(error, PresenceError::GatewaysExceeded { .. });
                (applied, error.to_string(), exceeded)
            };
            let mut applied = 0;
            for run in entries.chunk_by(|a, b| a.0 == b.0) {
                let mut shard = registry
                    .shard(run[0].0 as usize)
                    .map_err(|e| fail(applied, e))?
                    .lock();
                for &(_, offset) in run {
                    let start = offset as usize + 4;
                    let mut len = [0u8; 4];
                    len.copy_from_slice(&bytes[offset as usize..start]);
                    let payload = &bytes[start..start + u32::from_le_bytes(len) as usize];
                    let change = Change::decode(payload)
                        .map_err(|error| (applied, error.to_string(), false))?;
                    shard.apply_change(&change).map_err(|e| fail(applied, e))?;
                    applied += 1;
                }
            }
            Ok(())
        };
        // Split at a shard boundary near the middle: each thread owns whole shards.
        let entries = &self.entries[..];
        let middle_shard = (registry.shard_count() / 2) as u32;
        let split = if imstate_presence::RESTORE_THREADS > 1 {
            entries.partition_point(|&(shard, _)| shard < middle_shard)
        } else {
            entries.len()
        };
        let (first, second) = entries.split_at(split);
        let mut pending = [first, second];
        let result = loop {
            let [first, second] = pending;
            let (one, two) = std::thread::scope(|scope| {
                let other = (!second.is_empty()).then(|| scope.spawn(|| apply(second)));
                let one = apply(first);
                let two = match other {
                    Some(handle) => match handle.join() {
                        Ok(outcome) => outcome,
                        Err(panic) => std::panic::resume_unwind(panic),
                    },
                    None => Ok(()),
                };
                (one, two)
            });
            let mut exceeded = None;
            for (part, outcome) in pending.iter_mut().zip([one, two]) {
                match outcome {
                    Ok(()) => *part = &[],
                    Err((applied, error, true)) => {
                        *part = &part[applied..];
                        exceeded = Some(error);
                    }
                    Err((_, error, false)) => return self.cleared(Err(error)),
                }
            }
            match exceeded {
                None => break Ok(()),
                Some(error) if registry.reclaim_gateways() == 0 => break Err(error),
                Some(_) => {}
            }
        };
        self.cleared(result)
    }

    /// Empties the batch and passes `result` on.
    fn cleared(&mut self, result: Result<(), String>) -> Result<(), String> {
        self.bytes.clear();
        self.entries.clear();
        result
    }
}

/// Tunables of the presence store.
#[derive(Clone, Debug)]
pub struct PresenceStoreOptions {
    /// Limits and sharding of the registry.
    pub registry: RegistryOptions,
    /// When acknowledged changes are durable.
    pub fsync: FsyncPolicy,
    /// ttl of a login that does not set one.
    pub ttl_ms_default: u32,
    /// How often expiry runs.
    pub tick_ms: u64,
    /// Log bytes since the last checkpoint that trigger one; 0 disables automatic checkpoints.
    pub checkpoint_log_bytes: u64,
    /// Bounds of Watch: buffer, subscribers, filter size.
    pub watch: WatchLimits,
    /// Records queued for the log's flusher before writers wait (before their shard lock).
    pub log_queue_records_max: usize,
    /// Size of a log segment (and of the preallocated spare).
    pub segment_bytes: u64,
    /// [`LogOptions::inline_writes`] for the presence log.
    pub inline_writes: bool,
}

impl Default for PresenceStoreOptions {
    fn default() -> Self {
        Self {
            registry: RegistryOptions::default(),
            fsync: FsyncPolicy::Batch(Duration::from_millis(10)),
            ttl_ms_default: 90_000,
            tick_ms: 250,
            checkpoint_log_bytes: 128 * 1024 * 1024,
            watch: WatchLimits::default(),
            log_queue_records_max: LogOptions::default().queue_records_max,
            segment_bytes: LogOptions::default().segment_bytes_max,
            inline_writes: true,
        }
    }
}

/// Appends each change to the log and publishes events, under the registry's locks.
struct NodeJournal {
    /// Set once recovery is over; replay does not journal, so it is never needed before.
    log: OnceLock<Arc<Log>>,
    /// Cluster mode: the change feed that replicas read ([`crate::feed`]).
    feed: OnceLock<Arc<ChangeFeed>>,
    watch: Arc<WatchHub>,
    fatal: watch::Sender<Option<String>>,
    /// Negative control: changes wait here (acknowledged, not yet in the log) until a
    /// background thread appends them.
    #[cfg(feature = "planted-presence-ack-before-log")]
    delayed: Mutex<Vec<Vec<u8>>>,
}

impl Journal for NodeJournal {
    fn record(&self, entry: Entry<'_>) {
        let Some(log) = self.log.get() else { return };
        let mut bytes = Vec::with_capacity(64);
        entry.change().encode(&mut bytes);
        #[cfg(feature = "planted-presence-ack-before-log")]
        {
            self.delayed.lock().push(bytes);
            let _ = log;
            return;
        }
        // Never waits under the shard lock: writers were admitted (back-pressure) before they
        // took it, so a full queue only grows by the records of writers already admitted.
        #[cfg(not(feature = "planted-presence-ack-before-log"))]
        let append = || match self.feed.get() {
            Some(feed) => feed.append(bytes, |bytes| log.append_deferred(bytes)),
            None => log.append_deferred(bytes),
        };
        // An event is appended and published under the Watch hub's lock (LSN order, for
        // resumes); a bare change (heartbeats, gateway leases) needs neither.
        #[cfg(not(feature = "planted-presence-ack-before-log"))]
        let appended = match entry {
            Entry::Event(event) => self.watch.publish_with(event, append),
            Entry::Change(_) => append(),
        };
        #[cfg(not(feature = "planted-presence-ack-before-log"))]
        match appended {
            Ok(_) => {
                if let Entry::Event(event) = &entry {
                    count_event(event);
                }
            }
            Err(error) => {
                let reason = format!("presence log: {error}");
                self.fatal.send_if_modified(|fatal| {
                    fatal
                        .is_none()
                        .then(|| *fatal = Some(reason.clone()))
                        .is_some()
                });
            }
        }
    }
}

/// Counts a registry event in the presence metrics (cheap: one atomic add).
#[cfg_attr(feature = "planted-presence-ack-before-log", allow(dead_code))]
fn count_event(event: &Event) {
    use crate::metrics::{
        PRESENCE_EXPIRATIONS, PRESENCE_GATEWAY_DROPS, PRESENCE_LOGINS, PRESENCE_LOGOUTS,
    };
    match event {
        Event::Login { .. } => metrics::counter!(PRESENCE_LOGINS).increment(1),
        Event::Logout { .. } => metrics::counter!(PRESENCE_LOGOUTS).increment(1),
        Event::Expire { .. } => metrics::counter!(PRESENCE_EXPIRATIONS).increment(1),
        Event::GatewayDown { sessions, .. } => {
            metrics::counter!(PRESENCE_GATEWAY_DROPS).increment(sessions.len() as u64)
        }
        _ => {}
    }
}

/// Cluster mode's ownership check for presence (S3 for slots), called by the store itself so
/// that every front door goes through it.
///
/// Contract: `check` returns `Ok` only if this node may take requests for every uid of `uids`
/// now (it is the primary of each one's slot, its lease is confirmed, a takeover's lock-delay
/// has passed); otherwise the refusal for the first uid it may not serve (a redirect to the
/// primary, or unavailable with the reason). It takes no lock that a store operation holds.
pub trait SlotGate: Send + Sync {
    /// Whether every uid may be served here now.
    fn check(&self, uids: &mut dyn Iterator<Item = u64>) -> Result<(), NodeError>;
}

/// The durable presence registry of one node.
pub struct PresenceStore {
    /// Cluster mode: the slot ownership check (unset in embedded mode: one node owns all).
    gate: OnceLock<Arc<dyn SlotGate>>,
    /// Cluster mode: the replicas' acknowledgements (writes wait for them under sync
    /// replication).
    sync: OnceLock<Arc<crate::syncacks::SyncAcks>>,
    /// Cluster mode: refuse writes to slots with no replica in sync.
    require_replica: AtomicBool,
    counted: OnceLock<Arc<crate::counted::CountedPublisher>>,
    /// Cluster mode: the slots this node is an in-sync replica of (reads may be served).
    replica_readable: parking_lot::RwLock<Option<Arc<imstate_presence::SlotSet>>>,
    registry: Arc<ShardedRegistry>,
    journal: Arc<NodeJournal>,
    log: Arc<Log>,
    clock: Arc<dyn Clock>,
    options: PresenceStoreOptions,
    stop: AtomicBool,
    /// Starts automatic checkpoints, one at a time.
    auto_checkpoint: crate::autocheckpoint::AutoCheckpoint,
    /// Cluster mode: checkpoint parts replicas sent of this node's primary slots.
    parts: OnceLock<Arc<crate::parts::CheckpointParts>>,
    /// The background threads, joined on shutdown.
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl PresenceStore {
    /// Recovers the registry from `storage` (newest checkpoint, then the log), drops what
    /// expired while the node was down, and starts the expiry thread.
    pub fn open<S: Storage>(
        storage: S,
        options: PresenceStoreOptions,
        clock: Arc<dyn Clock>,
    ) -> Result<(Arc<Self>, RecoveryStats), NodeError> {
        let (fatal, _) = watch::channel(None);
        let journal = Arc::new(NodeJournal {
            log: OnceLock::new(),
            feed: OnceLock::new(),
            watch: WatchHub::new(options.watch),
            fatal,
            #[cfg(feature = "planted-presence-ack-before-log")]
            delayed: Mutex::new(Vec::new()),
        });
        let registry = Arc::new(
            ShardedRegistry::with_journal(options.registry, journal.clone())
                .map_err(|error| NodeError::Config(format!("presence: {error}")))?,
        );
        let log_options = LogOptions {
            fsync: options.fsync,
            queue_records_max: options.log_queue_records_max,
            segment_bytes_max: options.segment_bytes,
            inline_writes: options.inline_writes,
            ..LogOptions::default()
        };
        // Sessions restored already overdue then wait in the wheel slot of now, so the first
        // tick visits only what is due rather than a whole turn of slots.
        registry.start_wheel_at(clock.now_ms());
        let mut batch = ReplayBatch::new(&registry, REPLAY_BATCH_BYTES);
        let (log, stats) = Log::open_streaming(storage, log_options, |replay| match replay {
            ReplayStream::Checkpoint { mut data, .. } => registry
                .restore(&mut data)
                .map(|_| ())
                .map_err(|e| e.to_string().into()),
            ReplayStream::Record { payload, .. } => batch.push(payload).map_err(Into::into),
        })?;
        batch
            .flush()
            .map_err(|error| NodeError::Io(format!("presence log replay: {error}")))?;
        drop(batch);
        let log = Arc::new(log);
        let _ = journal.log.set(Arc::clone(&log));
        journal.watch.start_history(log.last_lsn());
        let store = Arc::new(Self {
            gate: OnceLock::new(),
            require_replica: AtomicBool::new(false),
            counted: OnceLock::new(),
            replica_readable: parking_lot::RwLock::new(None),
            sync: OnceLock::new(),
            registry,
            journal,
            log,
            clock,
            options,
            stop: AtomicBool::new(false),
            auto_checkpoint: Default::default(),
            parts: OnceLock::new(),
            threads: Mutex::new(Vec::new()),
        });
        // Sessions that expired while the node was down go before anything is served.
        store.registry.tick(store.clock.now_ms());
        store.start_expiry_thread()?;
        #[cfg(feature = "planted-presence-ack-before-log")]
        store.start_planted_flusher()?;
        Ok((store, stats))
    }

    fn start_expiry_thread(self: &Arc<Self>) -> Result<(), NodeError> {
        let store = Arc::clone(self);
        let handle = std::thread::Builder::new()
            .name("imstate-expiry".into())
            .spawn(move || {
                let tick = Duration::from_millis(store.options.tick_ms.max(1));
                while !store.stop.load(Ordering::Acquire) {
                    std::thread::park_timeout(tick);
                    if store.stop.load(Ordering::Acquire) {
                        break;
                    }
                    store.expire_once();
                    store.maybe_checkpoint();
                }
            })
            .map_err(|error| NodeError::Io(format!("spawning the expiry thread: {error}")))?;
        self.threads.lock().push(handle);
        Ok(())
    }

    #[cfg(feature = "planted-presence-ack-before-log")]
    fn start_planted_flusher(self: &Arc<Self>) -> Result<(), NodeError> {
        let store = Arc::clone(self);
        let handle = std::thread::Builder::new()
            .name("imstate-planted".into())
            .spawn(move || {
                while !store.stop.load(Ordering::Acquire) {
                    std::thread::sleep(Duration::from_millis(100));
                    let delayed = std::mem::take(&mut *store.journal.delayed.lock());
                    for bytes in delayed {
                        let _ = store.log.append(bytes);
                    }
                }
            })
            .map_err(|error| NodeError::Io(format!("spawning: {error}")))?;
        self.threads.lock().push(handle);
        Ok(())
    }

    /// One expiry pass: lapsed gateways, then every shard in bounded steps. Each step holds one
    /// shard lock for at most [`EXPIRY_VISITS_PER_LOCK`] visits (an expiry plus its log append
    /// each) and yields between steps, so a mass expiry never keeps lookups waiting long, even
    /// with fewer cores than runnable threads. Returns how many sessions and gateways expired.
    pub fn expire_once(&self) -> usize {
        let started = std::time::Instant::now();
        let now_ms = self.clock.now_ms();
        let mut expired = self.registry.tick_gateways(now_ms).len();
        for shard in 0..self.registry.shard_count() {
            // Back-pressure between steps, never under a shard lock (see `admit`).
            while self.log.wait_room().is_ok()
                && let Ok(progress) =
                    self.registry
                        .tick_shard(shard, now_ms, EXPIRY_VISITS_PER_LOCK)
            {
                expired += progress.events.len();
                if progress.done {
                    break;
                }
                std::thread::yield_now();
            }
        }
        if expired > 0 {
            tracing::debug!(
                expired,
                elapsed_us = started.elapsed().as_micros() as u64,
                "expiry pass"
            );
        }
        expired
    }

    fn maybe_checkpoint(self: &Arc<Self>) {
        let Some(claim) = self
            .auto_checkpoint
            .claim(&self.log, self.options.checkpoint_log_bytes)
        else {
            return;
        };
        let store = Arc::clone(self);
        // If the thread cannot be spawned, the closure (and the claim) is dropped: the next
        // tick tries again.
        let _ = std::thread::Builder::new()
            .name("imstate-checkpoint".into())
            .spawn(move || {
                let _claim = claim;
                crate::metrics::report_checkpoint(
                    crate::metrics::LOG_PRESENCE,
                    &store.checkpoint(),
                );
            });
    }

    /// Writes a checkpoint now (shard by shard; writers of other shards never wait) and drops
    /// the log segments it covers.
    ///
    /// In cluster mode the sessions of slots that a replica sent a part of
    /// ([`crate::parts`]) are taken from the part, not copied here, and the checkpoint covers
    /// the log only through the oldest part's LSN.
    pub fn checkpoint(&self) -> Result<CheckpointStats, NodeError> {
        let last_lsn = self.log.last_lsn();
        let parts = self.parts.get().map_or_else(Vec::new, |parts| {
            parts.usable(self.log.checkpoint_lsn().unwrap_or(0), last_lsn)
        });
        let covered_lsn = if cfg!(feature = "planted-part-covers-ahead") {
            // Negative control: cover the log through the last LSN, as if the parts were as
            // new as the own copy.
            last_lsn
        } else {
            parts
                .iter()
                .map(|part| part.meta.lsn)
                .fold(last_lsn, u64::min)
        };
        let registry = &self.registry;
        let mut own = imstate_presence::SlotSet::all(
            parts.first().map_or(1, |part| part.meta.slots.count()),
        );
        for part in &parts {
            own.remove_all(&part.meta.slots);
        }
        let stats = self.log.checkpoint(covered_lsn, |out| {
            let mut out = out;
            for shard in 0..registry.shard_count() {
                if parts.is_empty() {
                    registry.snapshot_shard(shard, &mut out)
                } else {
                    registry.snapshot_shard_slots(shard, &own, &mut out)
                }
                .map_err(std::io::Error::other)?;
            }
            for chunk in parts.iter().flat_map(|part| part.data.iter()) {
                out.write_all(chunk)?;
            }
            registry
                .snapshot_gateways(&mut out)
                .map_err(std::io::Error::other)
        })?;
        if let Some(store) = self.parts.get()
            && !parts.is_empty()
        {
            store.remove(&parts);
            let slots: u32 = parts.iter().map(|part| part.meta.slots.len()).sum();
            metrics::counter!(crate::parts::CHECKPOINT_PART_SLOTS).increment(u64::from(slots));
            tracing::info!(
                parts = parts.len(),
                slots,
                covered_lsn,
                "presence checkpoint took the sessions of slots from their replicas' parts"
            );
        }
        Ok(stats)
    }

    /// Cluster mode: where parts that replicas send of this node's primary slots are kept
    /// until a checkpoint uses them.
    pub fn set_parts(&self, parts: Arc<crate::parts::CheckpointParts>) {
        let _ = self.parts.set(parts);
    }

    /// The parts replicas sent (cluster mode).
    pub fn parts(&self) -> Option<&Arc<crate::parts::CheckpointParts>> {
        self.parts.get()
    }

    /// Cluster mode: whether this node wants its replicas to send parts now, and for which
    /// checkpoint cycle (`Some(n)`, where `n` changes with every checkpoint): when half of
    /// the log that triggers an automatic checkpoint has been written, so that parts have
    /// arrived when it starts. `None` when parts are off or not due.
    pub fn parts_wanted(&self) -> Option<u64> {
        self.parts.get()?;
        let threshold = self.options.checkpoint_log_bytes;
        (threshold > 0 && self.log.bytes_since_checkpoint() >= threshold / 2)
            .then(|| self.log.checkpoint_lsn().map_or(1, |lsn| lsn + 1))
    }

    /// The replica's side of [`crate::parts`]: snapshot sections of the sessions of `slots`
    /// held here, one shard at a time (each copied under its lock only), each handed to
    /// `sink`. Blocking work proportional to the sessions held: call it off the async
    /// workers.
    pub fn write_part(
        &self,
        slots: &imstate_presence::SlotSet,
        mut sink: impl FnMut(Vec<u8>) -> Result<(), NodeError>,
    ) -> Result<(), NodeError> {
        for shard in 0..self.registry.shard_count() {
            let mut section = Vec::new();
            self.registry
                .snapshot_shard_slots(shard, slots, &mut section)
                .map_err(|error| NodeError::Io(format!("checkpoint part: {error}")))?;
            sink(section)?;
        }
        Ok(())
    }

    /// Back-pressure, taken before any shard lock: resolves once the log's queue has room
    /// (`queue_records_max`), so an append under a shard lock never has to wait for the
    /// flusher and an async worker never blocks there. Every write path calls it first.
    pub async fn admit(&self) -> Result<(), NodeError> {
        Ok(self.log.admit().await?)
    }

    /// Waits until every change made so far is durable under the policy. Callers of the
    /// `*_applied` methods must wait here before they acknowledge, and readers before they
    /// answer: a change is applied (visible) before its record is durable, and a read must
    /// never show a change that a crash or a failed log could still take back. When
    /// everything is durable already (no writes in flight) this costs two atomic loads.
    ///
    /// Cluster mode under `presence.replication = "sync"`: also until every in-sync replica
    /// holds them ([`crate::syncacks`]).
    pub async fn durable(&self) -> Result<(), NodeError> {
        let lsn = self.log.last_lsn();
        self.durable_local_at(lsn).await?;
        if let Some(sync) = self.sync.get() {
            let replicated = sync.wait(lsn).await;
            if !replicated && self.require_replica.load(Ordering::Relaxed) {
                // The change may be on this node only: not acknowledged (its outcome is
                // unknown to the client, which retries).
                return Err(NodeError::Unavailable(
                    "a replica was cut off before it held this change and \
                     presence.require_replica is on; retry"
                        .into(),
                ));
            }
            // A replica lost since the last counted report: the coordinator hears it before
            // anything is acknowledged without that replica.
            if let Some(counted) = self.counted.get() {
                counted.before_ack().await?;
            }
        }
        Ok(())
    }

    /// [`Self::durable`] without waiting for replicas: what a replica waits for before it
    /// acknowledges what it applied (waiting for its own replicas there could wait in a
    /// circle).
    pub async fn durable_local(&self) -> Result<(), NodeError> {
        self.durable_local_at(self.log.last_lsn()).await
    }

    async fn durable_local_at(&self, lsn: u64) -> Result<(), NodeError> {
        if let Some(reason) = &*self.journal.fatal.borrow() {
            return Err(NodeError::Unavailable(reason.clone()));
        }
        self.log.durable(lsn).await?;
        Ok(())
    }

    /// The replicas' acknowledgements (cluster mode).
    pub fn sync_acks(&self) -> Option<&Arc<crate::syncacks::SyncAcks>> {
        self.sync.get()
    }

    /// Cluster mode: from now on replica streams are booked in `acks`, and writes wait for
    /// them if `acks` is sync.
    pub fn set_sync(&self, acks: Arc<crate::syncacks::SyncAcks>) {
        let _ = self.sync.set(acks);
    }

    /// Cluster mode: the counted report's publisher ([`crate::counted`]). Set once.
    pub fn set_counted(&self, counted: Arc<crate::counted::CountedPublisher>) {
        let _ = self.counted.set(counted);
    }

    /// Cluster mode: from now on every request for a uid passes `gate` first. Set once.
    pub fn set_gate(&self, gate: Arc<dyn SlotGate>) {
        let _ = self.gate.set(gate);
    }

    fn admit_uids(&self, uids: impl IntoIterator<Item = u64>) -> Result<(), NodeError> {
        match self.gate.get() {
            None => Ok(()),
            Some(gate) => gate.check(&mut uids.into_iter()),
        }
    }

    /// [`Self::admit_uids`] for a write: also, under `presence.require_replica`, refuses a
    /// uid whose slot no in-sync replica holds.
    fn admit_writes(&self, uids: impl IntoIterator<Item = u64> + Clone) -> Result<(), NodeError> {
        self.admit_uids(uids.clone())?;
        if !self.require_replica.load(Ordering::Relaxed) {
            return Ok(());
        }
        let covered = self.sync.get().and_then(|acks| acks.in_sync_cached());
        for uid in uids {
            if !covered
                .as_ref()
                .is_some_and(|covered| covered.contains(uid))
            {
                let slot = covered.as_ref().map_or(String::new(), |set| {
                    format!(" {}", uid % u64::from(set.count()))
                });
                return Err(NodeError::Unavailable(format!(
                    "presence slot{slot} of uid {uid} has no replica in sync and \
                     presence.require_replica is on; retry once its replica has synced"
                )));
            }
        }
        Ok(())
    }

    /// Cluster mode: after a write became durable (and replicated), whether this node may
    /// still acknowledge it: the slot check again, now. A primary deposed while the write was
    /// in flight (its lease lapsed during a pause, or the table moved the slot) must not
    /// acknowledge it: its replica may have been promoted without it (its stream was cut).
    /// The caller answers the check's error instead (the outcome is unknown to the client,
    /// which retries at the new primary).
    pub fn recheck(&self, uids: impl IntoIterator<Item = u64>) -> Result<(), NodeError> {
        self.admit_uids(uids)
    }

    /// Cluster mode, `presence.require_replica = true`: writes to a slot that no in-sync
    /// replica holds are refused (instead of served with one copy).
    pub fn set_require_replica(&self, require: bool) {
        self.require_replica.store(require, Ordering::Relaxed);
    }

    /// Cluster mode: starts keeping recent change records for replicas (once; later calls
    /// return the same feed). Records appended before it are not in it, so a replica that
    /// needs them resyncs from a snapshot.
    pub fn enable_feed(&self, limits: FeedLimits) -> Arc<ChangeFeed> {
        Arc::clone(
            self.journal
                .feed
                .get_or_init(|| ChangeFeed::new(limits, self.log.last_lsn())),
        )
    }

    /// The change feed, when enabled.
    pub fn feed(&self) -> Option<&Arc<ChangeFeed>> {
        self.journal.feed.get()
    }

    /// Applies a record streamed from the primary of `slots` (see
    /// [`imstate_presence::ShardedRegistry::apply_replicated`]); not yet durable: wait with
    /// [`Self::durable`].
    pub fn apply_replicated(
        &self,
        change: &Change,
        slots: &imstate_presence::SlotSet,
    ) -> Result<(), NodeError> {
        Ok(self.registry.apply_replicated(change, slots)?)
    }

    /// The sessions of every shard in `slots`, shard by shard (a replica's snapshot; see
    /// [`imstate_presence::ShardedRegistry::slot_sessions`]).
    pub fn slot_sessions(
        &self,
        shard: usize,
        slots: &imstate_presence::SlotSet,
    ) -> Result<Vec<Session>, NodeError> {
        Ok(self.registry.slot_sessions(shard, slots)?)
    }

    /// Cluster mode: drops every session of `slots` (see
    /// [`imstate_presence::ShardedRegistry::drop_slots`]); returns how many. Blocking work
    /// proportional to the sessions held: call it off the async workers.
    pub fn drop_slots(&self, slots: &imstate_presence::SlotSet) -> usize {
        if slots.is_empty() {
            return 0;
        }
        self.registry.drop_slots(slots)
    }

    /// Cluster mode: ends a replica's resync from a snapshot (see
    /// [`imstate_presence::ShardedRegistry::sweep_slots`]); blocking work proportional to
    /// the sessions held: call it off the async workers.
    pub fn sweep_slots(&self, slots: &imstate_presence::SlotSet, kept: &[(u64, u64)]) -> usize {
        self.registry.sweep_slots(slots, kept)
    }

    /// Registers a session (ttl 0 = the default); returns it and the session it replaced.
    pub async fn login(
        &self,
        uid: u64,
        device: &str,
        gateway: &str,
        conn: u64,
        ttl_ms: u32,
        meta: Option<&[u8]>,
    ) -> Result<LoginOutcome, NodeError> {
        self.admit().await?;
        let outcome = self.login_applied(&LoginRequest {
            uid,
            device,
            gateway,
            conn,
            ttl_ms,
            meta,
        })?;
        self.durable().await?;
        self.recheck([uid])?;
        Ok(outcome)
    }

    /// [`PresenceStore::login`] without the wait: applied and logged, not yet durable. The
    /// wire protocol applies a whole pipelined read this way, then waits once with
    /// [`PresenceStore::durable`] before it answers any of it.
    pub fn login_applied(&self, request: &LoginRequest<'_>) -> Result<LoginOutcome, NodeError> {
        self.admit_writes([request.uid])?;
        let mut request = *request;
        if request.ttl_ms == 0 {
            request.ttl_ms = self.options.ttl_ms_default;
        }
        Ok(self.registry.login(&request, self.clock.now_ms())?)
    }

    /// Removes the session of (uid, conn).
    pub async fn logout(&self, uid: u64, conn: u64) -> Result<Session, NodeError> {
        self.admit().await?;
        let session = self.logout_applied(uid, conn)?;
        self.durable().await?;
        self.recheck([uid])?;
        Ok(session)
    }

    /// [`PresenceStore::logout`] without the wait (see [`PresenceStore::login_applied`]).
    pub fn logout_applied(&self, uid: u64, conn: u64) -> Result<Session, NodeError> {
        self.admit_writes([uid])?;
        Ok(self.registry.logout(uid, conn)?)
    }

    /// Renews the session of (uid, conn).
    pub async fn heartbeat(&self, uid: u64, conn: u64) -> Result<(), NodeError> {
        self.admit().await?;
        self.heartbeat_applied(uid, conn)?;
        self.durable().await?;
        self.recheck([uid])
    }

    /// [`PresenceStore::heartbeat`] without the wait (see [`PresenceStore::login_applied`]).
    pub fn heartbeat_applied(&self, uid: u64, conn: u64) -> Result<(), NodeError> {
        self.admit_writes([uid])?;
        self.registry.heartbeat(uid, conn, self.clock.now_ms())?;
        Ok(())
    }

    /// Renews many sessions of one gateway; returns the unknown ones.
    pub async fn heartbeat_batch(
        &self,
        gateway: &str,
        sessions: &[(u64, u64)],
    ) -> Result<Vec<(u64, u64)>, NodeError> {
        self.admit().await?;
        let unknown = self.heartbeat_batch_applied(gateway, sessions)?;
        self.durable().await?;
        self.recheck(sessions.iter().map(|(uid, _)| *uid))?;
        Ok(unknown)
    }

    /// [`PresenceStore::heartbeat_batch`] without the wait (see
    /// [`PresenceStore::login_applied`]).
    pub fn heartbeat_batch_applied(
        &self,
        gateway: &str,
        sessions: &[(u64, u64)],
    ) -> Result<Vec<(u64, u64)>, NodeError> {
        self.admit_writes(sessions.iter().map(|(uid, _)| *uid))?;
        let HeartbeatBatchOutcome { unknown, .. } =
            self.registry
                .heartbeat_batch(gateway, sessions, self.clock.now_ms())?;
        Ok(unknown)
    }

    /// The sessions of `uid`, once every change they may show is durable.
    pub async fn lookup(&self, uid: u64) -> Result<Vec<Session>, NodeError> {
        self.admit_uids([uid])?;
        let sessions = self.registry.lookup(uid);
        self.durable().await?;
        Ok(sessions)
    }

    /// Cluster mode: the slots this node may answer reads for as their in-sync replica (set
    /// by the replication follower whenever that changes).
    pub fn set_replica_readable(&self, slots: imstate_presence::SlotSet) {
        *self.replica_readable.write() = Some(Arc::new(slots));
    }

    /// [`Self::lookup_batch`], answered also for uids of slots this node is the in-sync
    /// replica of (a read off the primary; see `LookupBatchRequest.read_replica`).
    pub async fn lookup_batch_replica(
        &self,
        uids: &[u64],
    ) -> Result<Vec<Vec<Session>>, NodeError> {
        let readable = self.replica_readable.read().clone();
        let elsewhere = uids
            .iter()
            .copied()
            .filter(|uid| !readable.as_ref().is_some_and(|slots| slots.contains(*uid)));
        self.admit_uids(elsewhere)?;
        let found = self.registry.lookup_batch(uids)?;
        self.durable_local().await?;
        Ok(found)
    }

    /// The sessions of each uid, in order, once every change they may show is durable.
    pub async fn lookup_batch(&self, uids: &[u64]) -> Result<Vec<Vec<Session>>, NodeError> {
        self.admit_uids(uids.iter().copied())?;
        let found = self.registry.lookup_batch(uids)?;
        self.durable().await?;
        Ok(found)
    }

    /// The sessions of each uid, borrowed, handed to `visit(position, session)` grouped by
    /// shard (see [`ShardedRegistry::lookup_batch_visit`]). The caller must wait with
    /// [`PresenceStore::durable`] before it answers (see there).
    pub fn lookup_batch_visit(
        &self,
        uids: &[u64],
        visit: impl FnMut(usize, imstate_presence::SessionRef<'_>),
    ) -> Result<(), NodeError> {
        self.admit_uids(uids.iter().copied())?;
        Ok(self.registry.lookup_batch_visit(uids, visit)?)
    }

    /// Drops every session of `gateway`; returns how many.
    pub async fn gateway_down(&self, gateway: &str) -> Result<usize, NodeError> {
        imstate_presence::check_gateway_name(gateway)?;
        self.admit().await?;
        let outcome: GatewayDownOutcome = self.registry.gateway_down(gateway);
        self.durable().await?;
        Ok(outcome.dropped())
    }

    /// Registers a gateway lease.
    pub async fn gateway_register(&self, gateway: &str, ttl_ms: u32) -> Result<(), NodeError> {
        self.admit().await?;
        self.registry
            .gateway_register(gateway, ttl_ms, self.clock.now_ms())?;
        self.durable().await
    }

    /// Renews a gateway lease.
    pub async fn gateway_heartbeat(&self, gateway: &str) -> Result<(), NodeError> {
        self.admit().await?;
        self.registry
            .gateway_heartbeat(gateway, self.clock.now_ms())?;
        self.durable().await
    }

    /// Sessions online, once every change counted is durable.
    pub async fn online_count(&self) -> Result<u64, NodeError> {
        let count = self.registry.online_count();
        self.durable().await?;
        Ok(count)
    }

    /// Sessions online now, durable or not: for metrics and logs, never for a reply.
    pub fn online_count_now(&self) -> u64 {
        self.registry.online_count()
    }

    /// The Watch fan-out: subscribe to every event from now on, or to some uids' (bounded:
    /// see [`WatchLimits`]).
    pub fn watch(&self) -> &Arc<WatchHub> {
        &self.journal.watch
    }

    /// Receives the reason once the store has failed for good (its log failed).
    pub fn fatal(&self) -> watch::Receiver<Option<String>> {
        self.journal.fatal.subscribe()
    }

    /// The registry (read-only uses: invariants in tests, counts).
    pub fn registry(&self) -> &ShardedRegistry {
        &self.registry
    }

    /// The log, for statistics.
    pub fn log(&self) -> &Log {
        &self.log
    }

    /// Stops the background threads, writes a checkpoint if the log since the last one is
    /// long (see [`SHUTDOWN_CHECKPOINT_LOG_BYTES`]), then flushes and fsyncs the log.
    ///
    /// The shutdown checkpoint is an optimization only: it never replaces the log flush, and
    /// if it fails the log still holds every change (the failure is logged, shutdown goes
    /// on). It is skipped when automatic checkpoints are disabled (`checkpoint_log_bytes` 0):
    /// an operator who turned checkpoints off gets none behind their back.
    pub fn shutdown(&self) -> Result<(), NodeError> {
        self.stop.store(true, Ordering::Release);
        for handle in self.threads.lock().drain(..) {
            handle.thread().unpark();
            let _ = handle.join();
        }
        if self.wants_shutdown_checkpoint() {
            let started = std::time::Instant::now();
            match self.checkpoint() {
                Ok(stats) => tracing::info!(
                    bytes = stats.bytes,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "presence checkpoint at shutdown"
                ),
                Err(error) => tracing::warn!(
                    %error,
                    "presence checkpoint at shutdown failed; the log still holds every change"
                ),
            }
        }
        Ok(self.log.shutdown()?)
    }

    /// Whether shutdown should write a checkpoint: automatic checkpoints are on, the log is
    /// healthy, and replaying what was logged since the last checkpoint would take longer
    /// than restoring a checkpoint.
    fn wants_shutdown_checkpoint(&self) -> bool {
        let threshold = self
            .options
            .checkpoint_log_bytes
            .min(SHUTDOWN_CHECKPOINT_LOG_BYTES);
        threshold > 0 && !self.log.is_poisoned() && self.log.bytes_since_checkpoint() >= threshold
    }
}

impl From<PresenceError> for NodeError {
    fn from(error: PresenceError) -> Self {
        NodeError::Presence(error)
    }
}

#[cfg(test)]
mod tests {
    use imstate_log::FaultyStorage;
    use imstate_presence::{ShardScope, ShardedRegistry};

    use super::*;
    use crate::clock::ManualClock;

    const T0: u64 = 1_700_000_000_000;

    /// Keeps every change the registry journals, in order.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<Change>>);

    impl Journal for Recorder {
        fn record(&self, entry: Entry<'_>) {
            self.0.lock().push(entry.change());
        }
    }

    fn registry(shards: usize) -> ShardedRegistry {
        let options = RegistryOptions {
            shards,
            ..RegistryOptions::default()
        };
        ShardedRegistry::new(options).unwrap()
    }

    /// A run mixing every kind of record, spread over the shards.
    fn recorded_run() -> (ShardedRegistry, Vec<Change>) {
        let recorder = Arc::new(Recorder::default());
        let options = RegistryOptions {
            shards: 4,
            ..RegistryOptions::default()
        };
        let live = ShardedRegistry::with_journal(options, recorder.clone()).unwrap();
        let gateways = ["gw-a", "gw-b", "gw-c"];
        let mut now = T0;
        live.gateway_register("gw-c", 60_000, now).unwrap();
        for round in 0..6u64 {
            for uid in 0..40u64 {
                let request = LoginRequest {
                    uid,
                    device: ["ios", "pc"][(uid % 2) as usize],
                    gateway: gateways[((uid + round) % 3) as usize],
                    conn: uid * 100 + round % 3,
                    ttl_ms: 2_000 + (uid as u32 % 3) * 1_000,
                    meta: (uid % 5 == 0).then_some(&b"meta"[..]),
                };
                let _ = live.login(&request, now);
            }
            now += 700;
            let batch: Vec<(u64, u64)> = (0..40).map(|uid| (uid, uid * 100 + round % 3)).collect();
            let _ = live.heartbeat_batch(gateways[(round % 3) as usize], &batch, now);
            let _ = live.logout(round * 3, round * 300 + round % 3);
            if round == 3 {
                live.gateway_down("gw-a");
            }
            live.gateway_heartbeat("gw-c", now).unwrap();
            now += 1_500;
            live.tick(now);
        }
        let changes = recorder.0.lock().clone();
        // Replayed under another shard count, a gateway drop concerns every shard.
        let mut changes = changes;
        changes.push(Change::GatewayDown {
            gateway: Arc::from("gw-b"),
            scope: ShardScope { index: 1, count: 7 },
        });
        live.apply_change(changes.last().unwrap()).unwrap();
        (live, changes)
    }

    #[test]
    fn replay_in_shard_batches_rebuilds_what_log_order_replay_builds() {
        let (live, changes) = recorded_run();
        assert!(live.online_count() > 0);
        for (shards, bytes_max) in [(4, 64), (4, REPLAY_BATCH_BYTES), (3, 200), (1, 1_000)] {
            let replica = registry(shards);
            let mut batch = ReplayBatch::new(&replica, bytes_max);
            for change in &changes {
                batch.push(&change.to_bytes()).unwrap();
            }
            batch.flush().unwrap();
            assert_eq!(replica.sessions(), live.sessions(), "{shards} shards");
            assert_eq!(replica.gateway_leases(), live.gateway_leases());
            replica.check_invariants().unwrap();
        }
    }

    /// More gateway names over a history than the 16-bit id space holds: replay reclaims ids
    /// between and within batches (one thread may stop while the other goes on).
    #[test]
    fn replay_of_more_gateways_than_ids_reclaims_and_rebuilds() {
        let recorder = Arc::new(Recorder::default());
        let live = ShardedRegistry::with_journal(
            RegistryOptions {
                shards: 4,
                ..RegistryOptions::default()
            },
            recorder.clone(),
        )
        .unwrap();
        live.gateway_register("gw-leased", 600_000, T0).unwrap();
        let names = imstate_presence::GATEWAY_IDS_MAX as u64 + 10_000;
        for n in 0..names {
            let gateway = format!("gw-{n}");
            let request = LoginRequest {
                uid: n % 500,
                device: "pc",
                gateway: &gateway,
                conn: n,
                ttl_ms: 600_000,
                meta: None,
            };
            live.login(&request, T0).unwrap();
            // One in a thousand stays logged in.
            if n % 1_000 != 0 {
                live.logout(n % 500, n).unwrap();
            }
        }
        let changes = recorder.0.lock().clone();
        for (shards, bytes_max) in [(4, REPLAY_BATCH_BYTES), (3, 4_096)] {
            let replica = registry(shards);
            let mut batch = ReplayBatch::new(&replica, bytes_max);
            for change in &changes {
                batch.push(&change.to_bytes()).unwrap();
            }
            batch.flush().unwrap();
            assert_eq!(replica.sessions(), live.sessions(), "{shards} shards");
            assert_eq!(replica.gateway_leases(), live.gateway_leases());
            replica.check_invariants().unwrap();
        }
    }

    #[test]
    fn replay_refuses_a_damaged_record() {
        let replica = registry(2);
        let mut batch = ReplayBatch::new(&replica, 1_000);
        let mut bytes = Change::Logout { uid: 1, conn: 2 }.to_bytes();
        bytes.push(0);
        batch.push(&bytes).unwrap();
        assert!(batch.flush().unwrap_err().contains("trailing"));
    }

    fn open(
        storage: &FaultyStorage,
        checkpoint_log_bytes: u64,
    ) -> (Arc<PresenceStore>, RecoveryStats) {
        let options = PresenceStoreOptions {
            fsync: FsyncPolicy::Always,
            tick_ms: 1_000,
            checkpoint_log_bytes,
            ..PresenceStoreOptions::default()
        };
        PresenceStore::open(storage.clone(), options, Arc::new(ManualClock::new(T0))).unwrap()
    }

    #[tokio::test]
    async fn clean_shutdown_checkpoints_a_long_log_unless_checkpoints_are_off() {
        for (checkpoint_log_bytes, expect_checkpoint) in [(1, true), (0, false)] {
            let storage = FaultyStorage::new();
            let (store, _) = open(&storage, checkpoint_log_bytes);
            for uid in 0..30 {
                store
                    .login(uid, "phone", "gw", uid, 60_000, None)
                    .await
                    .unwrap();
            }
            store.logout(3, 3).await.unwrap();
            let before = store.registry().sessions();
            store.shutdown().unwrap();
            drop(store);
            let (store, stats) = open(&storage, checkpoint_log_bytes);
            assert_eq!(stats.checkpoint_lsn.is_some(), expect_checkpoint);
            assert_eq!(stats.records_replayed == 0, expect_checkpoint);
            assert_eq!(store.registry().sessions(), before);
            store.shutdown().unwrap();
        }
    }

    /// Replica-built checkpoint parts ([`crate::parts`]) against a random history: a primary
    /// (with parts) and a replica built as replication builds it (a fuzzy snapshot of the
    /// part's slots, then the primary's records after it). At a random point the replica
    /// sends a part of its slots; the primary goes on, checkpoints (its own copy of the other
    /// slots plus the part) and restarts. Returns the seeds whose restarted primary does not
    /// hold exactly what it held before.
    async fn parts_checkpoint_mismatches(seeds: std::ops::Range<u64>) -> Vec<u64> {
        const SLOTS: u32 = 16;
        let mut mismatches = Vec::new();
        for seed in seeds {
            let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            let mut next = move |below: u64| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng % below
            };
            let options = PresenceStoreOptions {
                fsync: FsyncPolicy::Always,
                tick_ms: 1_000,
                checkpoint_log_bytes: 0,
                ..PresenceStoreOptions::default()
            };
            let clock = Arc::new(ManualClock::new(T0));
            let storage = FaultyStorage::new();
            let (primary, _) =
                PresenceStore::open(storage.clone(), options.clone(), clock.clone()).unwrap();
            primary.set_parts(Arc::new(crate::parts::CheckpointParts::new()));
            let feed = primary.enable_feed(FeedLimits {
                bytes_max: 64 << 20,
            });
            let (replica, _) =
                PresenceStore::open(FaultyStorage::new(), options.clone(), clock.clone()).unwrap();
            // The replica's slots: every other one.
            let mut slots = imstate_presence::SlotSet::empty(SLOTS);
            for slot in (0..SLOTS).step_by(2) {
                slots.insert_range(slot, slot + 1);
            }
            let ops = |count: u64, next: &mut dyn FnMut(u64) -> u64| {
                (0..count)
                    .map(|_| (next(6), next(48), next(3), next(2)))
                    .collect::<Vec<_>>()
            };
            let conns = Arc::new(std::sync::atomic::AtomicU64::new(1));
            let run = |ops: Vec<(u64, u64, u64, u64)>| {
                let primary = Arc::clone(&primary);
                let clock = Arc::clone(&clock);
                let conns = Arc::clone(&conns);
                async move {
                    for (kind, uid, device, gateway) in ops {
                        let gateway = format!("gw{gateway}");
                        let device = format!("d{device}");
                        let conn = conns.fetch_add(1, Ordering::Relaxed);
                        match kind {
                            0 | 1 => {
                                let ttl = if kind == 0 { 60_000 } else { 3_000 };
                                primary
                                    .login(uid, &device, &gateway, conn, ttl, None)
                                    .await
                                    .unwrap();
                            }
                            2 => {
                                if let Some(session) = primary.lookup(uid).await.unwrap().first() {
                                    primary.logout(uid, session.conn).await.unwrap();
                                }
                            }
                            3 => {
                                if let Some(session) = primary.lookup(uid).await.unwrap().first() {
                                    primary.heartbeat(uid, session.conn).await.unwrap();
                                }
                            }
                            4 => {
                                clock.advance(2_000);
                                primary.expire_once();
                            }
                            _ => {
                                if uid % 8 == 0 {
                                    primary.gateway_down(&gateway).await.unwrap();
                                }
                            }
                        }
                    }
                }
            };
            run(ops(40 + next(60), &mut next)).await;
            // The replica's snapshot: the position first, then the sessions (fuzzy).
            let snapshot_at = feed.last_lsn();
            for shard in 0..primary.registry().shard_count() {
                for session in primary.slot_sessions(shard, &slots).unwrap() {
                    replica
                        .apply_replicated(&Change::Login(session), &slots)
                        .unwrap();
                }
            }
            run(ops(next(80), &mut next)).await;
            // The replica applies the records through a point, and sends its part there.
            let records = feed.read_after(snapshot_at, usize::MAX).unwrap();
            let applied = next(records.len() as u64 + 1) as usize;
            let mut part_lsn = snapshot_at;
            for (lsn, record) in &records[..applied] {
                replica
                    .apply_replicated(&Change::decode(record).unwrap(), &slots)
                    .unwrap();
                part_lsn = *lsn;
            }
            let parts = primary.parts().unwrap();
            let mut upload = parts.receive(crate::parts::PartMeta {
                replica: "replica".into(),
                lsn: part_lsn,
                slots: slots.clone(),
            });
            let mut crc = 0;
            replica
                .write_part(&slots, |section| {
                    crc = crc32c::crc32c_append(crc, &section);
                    upload
                        .write(section)
                        .map_err(|e| NodeError::Io(e.to_string()))
                })
                .unwrap();
            upload.finish(crc).unwrap();
            run(ops(1 + next(80), &mut next)).await;
            let stats = primary.checkpoint().unwrap();
            assert!(
                parts.is_empty(),
                "seed {seed}: the checkpoint used the part"
            );
            #[cfg(not(feature = "planted-part-covers-ahead"))]
            assert_eq!(stats.covered_lsn, part_lsn, "seed {seed}");
            let _ = stats;
            run(ops(next(40), &mut next)).await;
            primary.expire_once();
            let sorted = |mut sessions: Vec<Session>| {
                sessions.sort_by_key(|session| (session.uid, session.conn));
                sessions
            };
            let before = sorted(primary.registry().sessions());
            primary.shutdown().unwrap();
            replica.shutdown().unwrap();
            drop(primary);
            let (restarted, _) = PresenceStore::open(storage, options, clock).unwrap();
            if sorted(restarted.registry().sessions()) != before {
                mismatches.push(seed);
            }
            restarted.shutdown().unwrap();
        }
        mismatches
    }

    /// Seeds of [`parts_checkpoint_mismatches`] (`IMSTATE_PARTS_SEEDS` runs more by hand).
    fn parts_seeds() -> std::ops::Range<u64> {
        let count = std::env::var("IMSTATE_PARTS_SEEDS")
            .ok()
            .and_then(|count| count.parse().ok())
            .unwrap_or(40);
        0..count
    }

    #[cfg(not(feature = "planted-part-covers-ahead"))]
    #[tokio::test]
    async fn a_checkpoint_with_replica_parts_recovers_every_change() {
        let mismatches = parts_checkpoint_mismatches(parts_seeds()).await;
        assert!(
            mismatches.is_empty(),
            "restarts differ for seeds {mismatches:?}; replay one with \
             IMSTATE_PARTS_SEEDS=<seed + 1> cargo test -p imstate-node parts_recovers"
        );
    }

    /// Negative control: a checkpoint that covers the log past its parts' LSN loses what the
    /// part's slots changed in between, and the check above sees it.
    #[cfg(feature = "planted-part-covers-ahead")]
    #[tokio::test]
    async fn planted_part_covers_ahead_is_caught() {
        let mismatches = parts_checkpoint_mismatches(parts_seeds()).await;
        assert!(
            mismatches.len() * 2 > parts_seeds().count(),
            "the planted bug must lose changes in most runs, lost in {mismatches:?}"
        );
    }

    /// Whether a login waits for an in-sync replica's acknowledgement before it completes
    /// (P1 across nodes under `presence.replication = "sync"`).
    async fn a_login_waits_for_the_replica() -> bool {
        let storage = FaultyStorage::new();
        let (store, _) = open(&storage, 0);
        let acks = crate::syncacks::SyncAcks::new(Duration::from_secs(5), true);
        store.set_sync(Arc::clone(&acks));
        let replica = acks.register(
            store.log().last_lsn(),
            "n2",
            imstate_presence::SlotSet::all(1),
        );
        replica.ack(store.log().last_lsn());
        let login = {
            let store = Arc::clone(&store);
            tokio::spawn(async move { store.login(7, "phone", "gw", 1, 60_000, None).await })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        let waited = !login.is_finished();
        replica.ack(store.log().last_lsn());
        let outcome = tokio::time::timeout(Duration::from_secs(5), login).await;
        outcome.unwrap().unwrap().unwrap();
        // Reads do not wait once everything is acknowledged.
        store.lookup(7).await.unwrap();
        store.shutdown().unwrap();
        waited
    }

    #[cfg(not(feature = "planted-ack-before-replica"))]
    #[tokio::test]
    async fn under_sync_a_login_is_acknowledged_only_after_the_replica_has_it() {
        assert!(a_login_waits_for_the_replica().await);
    }

    /// Negative control: with the planted bug the login completes before the replica
    /// acknowledged it, and the check above sees it.
    #[cfg(feature = "planted-ack-before-replica")]
    #[tokio::test]
    async fn planted_ack_before_replica_is_caught() {
        assert!(
            !a_login_waits_for_the_replica().await,
            "the planted bug must make the login complete without the replica"
        );
    }
}
