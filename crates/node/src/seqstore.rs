//! The sequence service's state machine: the pure allocator made durable by the log.
//!
//! ```text
//!  next_batch ──► Allocator::next_batch ──► Served{seqs, raises} ──► reply (raises persisted
//!                      (under a mutex)                                in the background)
//!                           │
//!                           └─► Wait{raises} ──► append Raise records ──► wait until the log
//!                                  says durable ──► Allocator::raise_durable ──► retry
//! ```
//!
//! Invariants:
//! - S2 (persist before serve): the allocator serves only below *durable* ceilings, and a ceiling
//!   becomes durable in the allocator only after the log has fsynced its Raise record (the
//!   sequence log always runs with `fsync=always`, whatever the presence log does).
//! - S1 (monotonic) across restarts follows: recovery loads every section at its durable ceiling
//!   and the allocator resumes above it.
//! - Checkpoints never block allocation: the snapshot is copied under the mutex (a few bytes per
//!   section) and written outside it. The covered LSN is read *before* the copy, and every record
//!   is appended after its effect (a pending ceiling or a namespace) is in the allocator, so the
//!   snapshot contains every record up to the covered LSN.
//! - B1: a request waits for a raise at most `raise_wait_timeout`, then fails having allocated
//!   nothing.

use std::sync::Arc;
use std::time::Duration;

use imstate_log::{CheckpointStats, FsyncPolicy, Log, LogOptions, RecoveryStats, Replay, Storage};
use imstate_seq::{Alloc, Allocator, AllocatorOptions, NamespaceDef, Raise, SeqError};
use parking_lot::Mutex;
use tokio::sync::watch;

use crate::NodeError;
use crate::records::{DecodeError, SeqRecord, SeqSnapshot};

/// Name of the namespace that exists out of the box.
pub const DEFAULT_NAMESPACE: &str = "default";

/// The namespace a request names: the empty name means [`DEFAULT_NAMESPACE`].
pub fn namespace_name(name: &str) -> &str {
    if name.is_empty() {
        DEFAULT_NAMESPACE
    } else {
        name
    }
}

/// Tunables of the sequence store.
#[derive(Clone, Debug)]
pub struct SeqStoreOptions {
    /// Limit on ids per batch call.
    pub batch_ids_max: usize,
    /// How long a request may wait for a raise to become durable.
    pub raise_wait_timeout: Duration,
    /// Log bytes since the last checkpoint that trigger one; 0 disables automatic checkpoints.
    pub checkpoint_log_bytes: u64,
    /// Sections in memory over all namespaces (B1).
    pub sections_max: usize,
}

impl Default for SeqStoreOptions {
    fn default() -> Self {
        Self {
            batch_ids_max: crate::config::BATCH_IDS_MAX_DEFAULT,
            raise_wait_timeout: Duration::from_millis(
                crate::config::RAISE_WAIT_TIMEOUT_MS_DEFAULT,
            ),
            checkpoint_log_bytes: crate::config::CHECKPOINT_LOG_BYTES_DEFAULT,
            sections_max: imstate_seq::SECTIONS_MAX_DEFAULT,
        }
    }
}

/// The durable sequence allocator of one node.
pub struct SeqStore {
    /// A `parking_lot` mutex, not a tokio one: it is held for a few hundred nanoseconds and never
    /// across an await.
    allocator: Mutex<Allocator>,
    log: Arc<Log>,
    /// Bumped whenever a raise becomes durable or fails, so that waiting requests retry.
    raised: watch::Sender<u64>,
    /// Set once when the log fails; the server watches it and stops the node.
    fatal: watch::Sender<Option<String>>,
    options: SeqStoreOptions,
    /// Starts automatic checkpoints, one at a time.
    auto_checkpoint: crate::autocheckpoint::AutoCheckpoint,
}

impl SeqStore {
    /// Recovers the store from `storage` (newest checkpoint, then the log) and makes sure the
    /// default namespace and every namespace in `declared` exist. A declared namespace that
    /// exists with another layout is an error: changing it would break S1.
    pub async fn open<S: Storage>(
        storage: S,
        options: SeqStoreOptions,
        declared: &[NamespaceDef],
    ) -> Result<(Arc<Self>, RecoveryStats), NodeError> {
        let mut allocator = Allocator::new(AllocatorOptions {
            batch_ids_max: options.batch_ids_max,
            sections_max: options.sections_max,
        });
        let log_options = LogOptions {
            fsync: FsyncPolicy::Always,
            ..LogOptions::default()
        };
        let (log, stats) = Log::open(storage, log_options, |replay| {
            replay_one(&mut allocator, replay).map_err(|error| error.to_string().into())
        })?;
        let (raised, _) = watch::channel(0);
        let (fatal, _) = watch::channel(None);
        let store = Arc::new(Self {
            allocator: Mutex::new(allocator),
            log: Arc::new(log),
            raised,
            fatal,
            options,
            auto_checkpoint: Default::default(),
        });
        let mut wanted = vec![NamespaceDef::default_namespace()];
        wanted.extend(declared.iter().cloned());
        for def in wanted {
            let existing = store
                .allocator
                .lock()
                .namespace(&def.name)
                .map(|(_, d)| d.clone());
            match existing {
                Some(existing) if existing == def => {}
                Some(existing) => {
                    return Err(NodeError::Config(format!(
                        "namespace `{}` exists as {existing:?}; the configuration declares \
                         {def:?}; a namespace's layout cannot change",
                        def.name
                    )));
                }
                None => {
                    store.create_namespace(def).await?;
                }
            }
        }
        // A long replay means a long next start-up: compact right away when the log is big.
        store.maybe_checkpoint();
        Ok((store, stats))
    }

    /// Allocates one seq for `id`.
    pub async fn next(self: &Arc<Self>, namespace: &str, id: u64) -> Result<u64, NodeError> {
        let seqs = self
            .allocate(|allocator| allocator.next(namespace, id))
            .await?;
        Ok(seqs[0])
    }

    /// Allocates one seq per id, in order; a repeated id gets increasing values.
    pub async fn next_batch(
        self: &Arc<Self>,
        namespace: &str,
        ids: &[u64],
    ) -> Result<Vec<u64>, NodeError> {
        self.allocate(|allocator| allocator.next_batch(namespace, ids))
            .await
    }

    /// Runs an allocation, persisting and waiting for raises until it is served or times out.
    async fn allocate(
        self: &Arc<Self>,
        attempt: impl Fn(&mut Allocator) -> Result<Alloc, SeqError>,
    ) -> Result<Vec<u64>, NodeError> {
        let deadline = tokio::time::Instant::now() + self.options.raise_wait_timeout;
        let mut waited = false;
        loop {
            self.check_alive()?;
            let (outcome, mut raised) = {
                let mut allocator = self.allocator.lock();
                let outcome = attempt(&mut allocator)?;
                // Subscribing under the mutex: a raise that completes after this point bumps
                // the version this receiver has not seen, so no wake-up is lost.
                let raised =
                    matches!(outcome, Alloc::Wait { .. }).then(|| self.raised.subscribe());
                (outcome, raised)
            };
            match outcome {
                Alloc::Served { seqs, raises } => {
                    if !raises.is_empty() {
                        // A pre-raise: persisted in the background; this request does not wait.
                        self.persist(raises)?;
                    }
                    metrics::counter!(crate::metrics::SEQ_ALLOCATED).increment(seqs.len() as u64);
                    return Ok(seqs);
                }
                Alloc::Wait { raises } => {
                    if !waited {
                        waited = true;
                        metrics::counter!(crate::metrics::SEQ_RAISE_WAITS).increment(1);
                    }
                    if !raises.is_empty() {
                        self.persist(raises)?;
                    }
                    let Some(raised) = raised.as_mut() else {
                        continue;
                    };
                    if tokio::time::timeout_at(deadline, raised.changed())
                        .await
                        .is_err()
                    {
                        metrics::counter!(crate::metrics::SEQ_RAISE_TIMEOUTS).increment(1);
                        return Err(NodeError::RaiseTimeout(self.options.raise_wait_timeout));
                    }
                }
            }
        }
    }

    /// Appends Raise records and, in the background, applies them once they are durable.
    fn persist(self: &Arc<Self>, raises: Vec<Raise>) -> Result<(), NodeError> {
        let mut last_lsn = 0;
        metrics::counter!(crate::metrics::SEQ_RAISES).increment(raises.len() as u64);
        for (index, raise) in raises.iter().enumerate() {
            match self.log.append(SeqRecord::Raise(*raise).encode()) {
                Ok(lsn) => last_lsn = lsn,
                Err(error) => {
                    let mut allocator = self.allocator.lock();
                    for failed in &raises[index..] {
                        allocator.raise_failed(*failed);
                    }
                    drop(allocator);
                    self.set_fatal(&error.to_string());
                    // Records appended before the failure still resolve in the task below.
                    self.spawn_apply(raises[..index].to_vec(), last_lsn);
                    return Err(error.into());
                }
            }
        }
        self.spawn_apply(raises, last_lsn);
        Ok(())
    }

    fn spawn_apply(self: &Arc<Self>, raises: Vec<Raise>, last_lsn: u64) {
        if raises.is_empty() {
            return;
        }
        let store = Arc::clone(self);
        let appended = std::time::Instant::now();
        tokio::spawn(async move {
            // The log makes records durable in LSN order, so the last one covers them all.
            let result = store.log.durable(last_lsn).await;
            metrics::histogram!(crate::metrics::SEQ_RAISE_DURATION)
                .record(appended.elapsed().as_secs_f64());
            {
                let mut allocator = store.allocator.lock();
                for raise in &raises {
                    match result {
                        Ok(()) => allocator.raise_durable(*raise),
                        Err(_) => allocator.raise_failed(*raise),
                    }
                }
                // Left out under the planted bug, so that the bug reaches the tests' own checkers.
                #[cfg(all(debug_assertions, not(feature = "planted-serve-before-durable")))]
                if let Err(violation) = allocator.check_invariants() {
                    panic!("allocator invariant violated: {violation}");
                }
            }
            if let Err(error) = result {
                store.set_fatal(&error.to_string());
            }
            store.raised.send_modify(|version| *version += 1);
            store.maybe_checkpoint();
        });
    }

    /// Reads the current seq of `id` (0 if never allocated; after a restart, the section's
    /// ceiling, which is at least every value handed out).
    pub fn current(&self, namespace: &str, id: u64) -> Result<u64, NodeError> {
        Ok(self.allocator.lock().current(namespace, id)?)
    }

    /// Reads the current seq of each id, in order.
    pub fn current_batch(&self, namespace: &str, ids: &[u64]) -> Result<Vec<u64>, NodeError> {
        Ok(self.allocator.lock().current_batch(namespace, ids)?)
    }

    /// Creates a namespace; returns once its definition is durable.
    pub async fn create_namespace(&self, def: NamespaceDef) -> Result<NamespaceDef, NodeError> {
        self.check_alive()?;
        let lsn = {
            let mut allocator = self.allocator.lock();
            def.validate()?;
            if allocator.namespace(&def.name).is_some() {
                return Err(SeqError::NamespaceExists(def.name).into());
            }
            // Appended before the namespace enters the allocator, both under the mutex: no
            // seq of it can be served before this record is durable, because serving needs a
            // Raise record, which the log makes durable after this one.
            let lsn = self
                .log
                .append(SeqRecord::NamespaceCreated(def.clone()).encode())?;
            allocator.add_namespace(def.clone())?;
            lsn
        };
        if let Err(error) = self.log.durable(lsn).await {
            self.set_fatal(&error.to_string());
            return Err(error.into());
        }
        Ok(def)
    }

    /// Every namespace, in creation order.
    pub fn namespaces(&self) -> Vec<NamespaceDef> {
        self.allocator
            .lock()
            .namespaces()
            .map(|(_, def)| def.clone())
            .collect()
    }

    /// How many sections have a ceiling in memory.
    pub fn sections_loaded(&self) -> usize {
        self.allocator.lock().sections_loaded()
    }

    /// Writes a checkpoint now and drops the log segments it covers.
    pub fn checkpoint(&self) -> Result<CheckpointStats, NodeError> {
        let covered_lsn = self.log.last_lsn();
        let data = {
            let allocator = self.allocator.lock();
            SeqSnapshot {
                namespaces: allocator.namespaces().map(|(_, def)| def.clone()).collect(),
                ceilings: allocator.ceilings(),
            }
        }
        .encode();
        Ok(self
            .log
            .checkpoint(covered_lsn, |out| out.write_all(&data))?)
    }

    fn maybe_checkpoint(self: &Arc<Self>) {
        let Some(claim) = self
            .auto_checkpoint
            .claim(&self.log, self.options.checkpoint_log_bytes)
        else {
            return;
        };
        let store = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            let _claim = claim;
            crate::metrics::report_checkpoint(crate::metrics::LOG_SEQ, &store.checkpoint());
        });
    }

    /// The log, for statistics.
    pub fn log(&self) -> &Log {
        &self.log
    }

    /// Receives the reason once the store has failed for good (the log is poisoned).
    pub fn fatal(&self) -> watch::Receiver<Option<String>> {
        self.fatal.subscribe()
    }

    fn set_fatal(&self, reason: &str) {
        self.fatal.send_if_modified(|fatal| {
            if fatal.is_none() {
                *fatal = Some(reason.to_string());
                true
            } else {
                false
            }
        });
    }

    fn check_alive(&self) -> Result<(), NodeError> {
        match &*self.fatal.borrow() {
            Some(reason) => Err(NodeError::Unavailable(reason.clone())),
            None => Ok(()),
        }
    }

    /// Flushes and fsyncs the log and stops its flusher.
    pub fn shutdown(&self) -> Result<(), NodeError> {
        Ok(self.log.shutdown()?)
    }
}

/// Applies one recovered item to the allocator.
fn replay_one(allocator: &mut Allocator, replay: Replay<'_>) -> Result<(), DecodeError> {
    match replay {
        Replay::Checkpoint { data, .. } => {
            let snapshot = SeqSnapshot::decode(data)?;
            for def in snapshot.namespaces {
                add_or_match(allocator, def)?;
            }
            for (ns, section, max_seq) in snapshot.ceilings {
                load(allocator, ns, section, max_seq)?;
            }
        }
        Replay::Record { payload, .. } => match SeqRecord::decode(payload)? {
            SeqRecord::NamespaceCreated(def) => add_or_match(allocator, def)?,
            SeqRecord::Raise(raise) => load(allocator, raise.ns, raise.section, raise.max_seq)?,
        },
    }
    Ok(())
}

/// Adds a recovered namespace; one already present (from a fuzzy checkpoint) must match.
fn add_or_match(allocator: &mut Allocator, def: NamespaceDef) -> Result<(), DecodeError> {
    match allocator.namespace(&def.name) {
        Some((_, existing)) if *existing == def => Ok(()),
        Some((_, existing)) => Err(DecodeError(format!(
            "namespace `{}` recorded twice with different layouts: {existing:?} and {def:?}",
            def.name
        ))),
        None => allocator
            .add_namespace(def)
            .map(|_| ())
            .map_err(|e| DecodeError(e.to_string())),
    }
}

fn load(
    allocator: &mut Allocator,
    ns: u32,
    section: u64,
    max_seq: u64,
) -> Result<(), DecodeError> {
    let Some(def) = allocator.namespace_by_id(ns) else {
        return Err(DecodeError(format!("raise for unknown namespace id {ns}")));
    };
    if section >= def.section_count() {
        return Err(DecodeError(format!(
            "raise for section {section} outside `{}`",
            def.name
        )));
    }
    allocator.load_section(ns, section, max_seq);
    Ok(())
}
