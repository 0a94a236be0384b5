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
//! ```
//!
//! Invariants:
//! - P1: a mutation is acknowledged only after its record is durable under the policy: under
//!   `always` fsynced, under `batch:T` written to the OS (so kill -9 loses nothing
//!   acknowledged; power loss at most the last T), under `never` written.
//! - Log order = apply order per shard: the registry calls the journal under the shard lock.
//! - Checkpoints are fuzzy: the covered LSN is read before any shard is copied; each record up
//!   to it was appended under its shard's lock while the change was applied, so the copy taken
//!   later under that lock contains it. Replay of later records is idempotent.
//! - B1: the watch buffer is a fixed ring (`watch_buffer_events`): a subscriber that falls
//!   further behind is cut off with RESOURCE_EXHAUSTED; nothing grows without bound.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use imstate_log::{CheckpointStats, FsyncPolicy, Log, LogOptions, RecoveryStats, Replay, Storage};
use imstate_presence::{
    Change, Entry, Event, GatewayDownOutcome, HeartbeatBatchOutcome, Journal, LoginOutcome,
    LoginRequest, PresenceError, RegistryOptions, Session, ShardedRegistry, TICK_VISITS_PER_LOCK,
};
use parking_lot::Mutex;
use tokio::sync::{broadcast, watch};

use crate::NodeError;
use crate::clock::Clock;

/// Sessions one expiry step may visit under one shard lock. Smaller than the core's default
/// ([`TICK_VISITS_PER_LOCK`]) because the node also appends a log record per expiry under the
/// lock: about 256 × 1 µs per hold.
pub const EXPIRY_VISITS_PER_LOCK: usize = TICK_VISITS_PER_LOCK / 8;

/// An event as published to watchers: the registry event and its position in the log.
#[derive(Debug, Clone)]
pub struct Published {
    /// LSN of the event's log record.
    pub lsn: u64,
    /// What happened.
    pub event: Arc<Event>,
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
    /// Events a watcher may fall behind before it is cut off.
    pub watch_buffer_events: usize,
}

impl Default for PresenceStoreOptions {
    fn default() -> Self {
        Self {
            registry: RegistryOptions::default(),
            fsync: FsyncPolicy::Batch(Duration::from_millis(10)),
            ttl_ms_default: 90_000,
            tick_ms: 250,
            checkpoint_log_bytes: 128 * 1024 * 1024,
            watch_buffer_events: 8_192,
        }
    }
}

/// Appends each change to the log and publishes events, under the registry's locks.
struct NodeJournal {
    /// Set once recovery is over; replay does not journal, so it is never needed before.
    log: OnceLock<Arc<Log>>,
    events: broadcast::Sender<Published>,
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
        #[cfg(not(feature = "planted-presence-ack-before-log"))]
        match log.append(bytes) {
            Ok(lsn) => {
                if let Entry::Event(event) = &entry {
                    count_event(event);
                }
                if let Entry::Event(event) = entry
                    && self.events.receiver_count() > 0
                {
                    let _ = self.events.send(Published {
                        lsn,
                        event: Arc::new(event.clone()),
                    });
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

/// The durable presence registry of one node.
pub struct PresenceStore {
    registry: Arc<ShardedRegistry>,
    journal: Arc<NodeJournal>,
    log: Arc<Log>,
    clock: Arc<dyn Clock>,
    options: PresenceStoreOptions,
    stop: AtomicBool,
    /// Starts automatic checkpoints, one at a time.
    auto_checkpoint: crate::autocheckpoint::AutoCheckpoint,
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
        let (events, _) = broadcast::channel(options.watch_buffer_events.max(1));
        let (fatal, _) = watch::channel(None);
        let journal = Arc::new(NodeJournal {
            log: OnceLock::new(),
            events,
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
            ..LogOptions::default()
        };
        let (log, stats) = Log::open(storage, log_options, |replay| match replay {
            Replay::Checkpoint { data, .. } => registry
                .restore(&mut &data[..])
                .map(|_| ())
                .map_err(|e| e.to_string().into()),
            Replay::Record { payload, .. } => {
                let change = Change::decode(payload).map_err(|e| e.to_string())?;
                registry
                    .apply_change(&change)
                    .map_err(|e| e.to_string().into())
            }
        })?;
        let log = Arc::new(log);
        let _ = journal.log.set(Arc::clone(&log));
        let store = Arc::new(Self {
            registry,
            journal,
            log,
            clock,
            options,
            stop: AtomicBool::new(false),
            auto_checkpoint: Default::default(),
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
            while let Ok(progress) =
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
    pub fn checkpoint(&self) -> Result<CheckpointStats, NodeError> {
        let covered_lsn = self.log.last_lsn();
        let registry = &self.registry;
        Ok(self.log.checkpoint(covered_lsn, |out| {
            let mut out = out;
            for shard in 0..registry.shard_count() {
                registry
                    .snapshot_shard(shard, &mut out)
                    .map_err(std::io::Error::other)?;
            }
            registry
                .snapshot_gateways(&mut out)
                .map_err(std::io::Error::other)
        })?)
    }

    /// Waits until every change made so far is durable under the policy. Callers of the
    /// `*_applied` methods must wait here before they acknowledge.
    pub async fn durable(&self) -> Result<(), NodeError> {
        if let Some(reason) = &*self.journal.fatal.borrow() {
            return Err(NodeError::Unavailable(reason.clone()));
        }
        self.log.durable(self.log.last_lsn()).await?;
        Ok(())
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
        let ttl_ms = if ttl_ms == 0 {
            self.options.ttl_ms_default
        } else {
            ttl_ms
        };
        let request = LoginRequest {
            uid,
            device,
            gateway,
            conn,
            ttl_ms,
            meta,
        };
        let outcome = self.registry.login(&request, self.clock.now_ms())?;
        self.durable().await?;
        Ok(outcome)
    }

    /// [`PresenceStore::login`] without the wait: applied and logged, not yet durable. The
    /// wire protocol applies a whole pipelined read this way, then waits once with
    /// [`PresenceStore::durable`] before it answers any of it.
    pub fn login_applied(&self, request: &LoginRequest<'_>) -> Result<LoginOutcome, NodeError> {
        let mut request = *request;
        if request.ttl_ms == 0 {
            request.ttl_ms = self.options.ttl_ms_default;
        }
        Ok(self.registry.login(&request, self.clock.now_ms())?)
    }

    /// Removes the session of (uid, conn).
    pub async fn logout(&self, uid: u64, conn: u64) -> Result<Session, NodeError> {
        let session = self.logout_applied(uid, conn)?;
        self.durable().await?;
        Ok(session)
    }

    /// [`PresenceStore::logout`] without the wait (see [`PresenceStore::login_applied`]).
    pub fn logout_applied(&self, uid: u64, conn: u64) -> Result<Session, NodeError> {
        Ok(self.registry.logout(uid, conn)?)
    }

    /// Renews the session of (uid, conn).
    pub async fn heartbeat(&self, uid: u64, conn: u64) -> Result<(), NodeError> {
        self.heartbeat_applied(uid, conn)?;
        self.durable().await
    }

    /// [`PresenceStore::heartbeat`] without the wait (see [`PresenceStore::login_applied`]).
    pub fn heartbeat_applied(&self, uid: u64, conn: u64) -> Result<(), NodeError> {
        self.registry.heartbeat(uid, conn, self.clock.now_ms())?;
        Ok(())
    }

    /// Renews many sessions of one gateway; returns the unknown ones.
    pub async fn heartbeat_batch(
        &self,
        gateway: &str,
        sessions: &[(u64, u64)],
    ) -> Result<Vec<(u64, u64)>, NodeError> {
        let unknown = self.heartbeat_batch_applied(gateway, sessions)?;
        self.durable().await?;
        Ok(unknown)
    }

    /// [`PresenceStore::heartbeat_batch`] without the wait (see
    /// [`PresenceStore::login_applied`]).
    pub fn heartbeat_batch_applied(
        &self,
        gateway: &str,
        sessions: &[(u64, u64)],
    ) -> Result<Vec<(u64, u64)>, NodeError> {
        let HeartbeatBatchOutcome { unknown, .. } =
            self.registry
                .heartbeat_batch(gateway, sessions, self.clock.now_ms())?;
        Ok(unknown)
    }

    /// The sessions of `uid`.
    pub fn lookup(&self, uid: u64) -> Vec<Session> {
        self.registry.lookup(uid)
    }

    /// The sessions of each uid, in order.
    pub fn lookup_batch(&self, uids: &[u64]) -> Result<Vec<Vec<Session>>, NodeError> {
        Ok(self.registry.lookup_batch(uids)?)
    }

    /// Drops every session of `gateway`; returns how many.
    pub async fn gateway_down(&self, gateway: &str) -> Result<usize, NodeError> {
        let outcome: GatewayDownOutcome = self.registry.gateway_down(gateway);
        self.durable().await?;
        Ok(outcome.dropped())
    }

    /// Registers a gateway lease.
    pub async fn gateway_register(&self, gateway: &str, ttl_ms: u32) -> Result<(), NodeError> {
        self.registry
            .gateway_register(gateway, ttl_ms, self.clock.now_ms())?;
        self.durable().await
    }

    /// Renews a gateway lease.
    pub async fn gateway_heartbeat(&self, gateway: &str) -> Result<(), NodeError> {
        self.registry
            .gateway_heartbeat(gateway, self.clock.now_ms())?;
        self.durable().await
    }

    /// Sessions online.
    pub fn online_count(&self) -> u64 {
        self.registry.online_count()
    }

    /// A receiver of every event from now on (bounded: see `watch_buffer_events`).
    pub fn subscribe(&self) -> broadcast::Receiver<Published> {
        self.journal.events.subscribe()
    }

    /// The watch buffer size.
    pub fn watch_buffer_events(&self) -> usize {
        self.options.watch_buffer_events
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

    /// Stops the background threads, then flushes and fsyncs the log.
    pub fn shutdown(&self) -> Result<(), NodeError> {
        self.stop.store(true, Ordering::Release);
        for handle in self.threads.lock().drain(..) {
            handle.thread().unpark();
            let _ = handle.join();
        }
        Ok(self.log.shutdown()?)
    }
}

impl From<PresenceError> for NodeError {
    fn from(error: PresenceError) -> Self {
        NodeError::Presence(error)
    }
}
