//! The sequence service of the embedded mode: the [`SeqEngine`] over the node's own sequence
//! log ([`LogMaxSeq`], the embedded [`MaxSeqStore`]), with recovery, namespaces and
//! checkpoints.
//!
//! ```text
//!  open ──► newest checkpoint + log replay ──► Allocator (every section at its ceiling)
//!  next_batch ──► SeqEngine (one mutex, the allocator) ──► raises ──► LogMaxSeq::persist:
//!        append Raise records ──► wait until the log says durable ──► Durable / Failed
//! ```
//!
//! Invariants:
//! - S2 (persist before serve): the engine serves only below *durable* ceilings, and a ceiling
//!   becomes durable only after the log has fsynced its Raise record (the sequence log always
//!   runs with `fsync=always`, whatever the presence log does).
//! - S1 (monotonic) across restarts follows: recovery loads every section at its durable ceiling
//!   (the highest recorded, whatever the order of the records) and the allocator resumes
//!   above it.
//! - Checkpoints never block allocation: the snapshot is copied under the engine's mutex (a few
//!   bytes per section) and written outside it. The covered LSN is read *before* the copy, and
//!   every record is appended after its effect (a pending ceiling or a namespace) is in the
//!   allocator, so the snapshot contains every record up to the covered LSN.
//! - B1: a request waits for a raise at most `raise_wait_timeout`, then fails having allocated
//!   nothing.

use std::sync::Arc;
use std::time::Duration;

use imstate_coord::maxseq::{Ceiling, MaxSeqStore, PersistOutcome, SectionRaise};
use imstate_log::{CheckpointStats, FsyncPolicy, Log, LogOptions, RecoveryStats, Replay, Storage};
use imstate_seq::{Allocator, AllocatorOptions, Ids, NamespaceDef, Raise, SeqError};
use tokio::sync::watch;

use crate::NodeError;
use crate::records::{DecodeError, SeqRecord, SeqSnapshot};
use crate::seqengine::{Backend, SeqEngine};

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

/// Default limit on ids in one NextBatch / CurrentBatch call.
pub const BATCH_IDS_MAX_DEFAULT: usize = 10_000;
/// Default time a request waits for a max_seq raise to become durable before it fails.
pub const RAISE_WAIT_TIMEOUT_MS_DEFAULT: u64 = 5_000;
/// Default log bytes written since the last checkpoint that trigger a new checkpoint.
pub const CHECKPOINT_LOG_BYTES_DEFAULT: u64 = 64 * 1024 * 1024;

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
            batch_ids_max: BATCH_IDS_MAX_DEFAULT,
            raise_wait_timeout: Duration::from_millis(RAISE_WAIT_TIMEOUT_MS_DEFAULT),
            checkpoint_log_bytes: CHECKPOINT_LOG_BYTES_DEFAULT,
            sections_max: imstate_seq::SECTIONS_MAX_DEFAULT,
        }
    }
}

/// The embedded [`MaxSeqStore`]: the node's sequence log. The node owns every section
/// forever, so every fence is 0 and nothing is loaded (recovery loaded every section).
pub struct LogMaxSeq {
    log: Arc<Log>,
    /// Set once when the log fails; the server watches it and stops the node.
    fatal: watch::Sender<Option<String>>,
}

impl LogMaxSeq {
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
}

impl MaxSeqStore for LogMaxSeq {
    async fn load(&self, _namespace: &str, _section: u64) -> Result<Ceiling, String> {
        Err("the embedded store loads every section at recovery".into())
    }

    async fn persist(&self, raises: Vec<SectionRaise>) -> PersistOutcome {
        let mut last_lsn = 0;
        for raise in &raises {
            let record = SeqRecord::Raise(Raise {
                ns: raise.ns_id,
                section: raise.section,
                max_seq: raise.max_seq,
            });
            match self.log.append(record.encode()) {
                Ok(lsn) => last_lsn = lsn,
                Err(error) => {
                    // Records appended before the failure may still become durable: reported
                    // as failed, they are only raised again (higher), never served above.
                    self.set_fatal(&error.to_string());
                    return PersistOutcome::Failed {
                        reason: error.to_string(),
                    };
                }
            }
        }
        // The log makes records durable in LSN order, so the last one covers them all.
        match self.log.durable(last_lsn).await {
            Ok(()) => PersistOutcome::Durable { fence: 0 },
            Err(error) => {
                self.set_fatal(&error.to_string());
                PersistOutcome::Failed {
                    reason: error.to_string(),
                }
            }
        }
    }
}

impl Backend for LogMaxSeq {
    const PERMANENT: bool = true;

    fn tenure(&self, _namespace: &str, _section: u64) -> Result<u64, NodeError> {
        Ok(0)
    }

    fn fatal(&self) -> Option<String> {
        self.fatal.borrow().clone()
    }
}

/// The durable sequence allocator of one embedded node.
pub struct SeqStore {
    engine: Arc<SeqEngine<LogMaxSeq>>,
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
        let backend = LogMaxSeq {
            log: Arc::new(log),
            fatal: watch::channel(None).0,
        };
        let store = Arc::new(Self {
            engine: SeqEngine::new(backend, allocator, options),
            auto_checkpoint: Default::default(),
        });
        let mut wanted = vec![NamespaceDef::default_namespace()];
        wanted.extend(declared.iter().cloned());
        for def in wanted {
            let existing = store.engine.with_allocator(|allocator| {
                allocator.namespace(&def.name).map(|(_, d)| d.clone())
            });
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
        // Raises grow the log: look for a checkpoint after each one resolves.
        let mut raised = store.engine.raised();
        let weak = Arc::downgrade(&store);
        tokio::spawn(async move {
            while raised.changed().await.is_ok() {
                let Some(store) = weak.upgrade() else { return };
                store.maybe_checkpoint();
            }
        });
        // A long replay means a long next start-up: compact right away when the log is big.
        store.maybe_checkpoint();
        Ok((store, stats))
    }

    /// Allocates one seq for `id`.
    pub async fn next(&self, namespace: &str, id: u64) -> Result<u64, NodeError> {
        Ok(self.engine.next_batch(namespace, &[id]).await?[0])
    }

    /// Allocates one seq per id, in order; a repeated id gets increasing values.
    pub async fn next_batch<'a>(
        &self,
        namespace: &str,
        ids: impl Into<Ids<'a>>,
    ) -> Result<Vec<u64>, NodeError> {
        self.engine.next_batch(namespace, ids).await
    }

    /// Reserves `count` consecutive seqs per id; returns the last of each range.
    pub async fn next_range_batch<'a>(
        &self,
        namespace: &str,
        ids: impl Into<Ids<'a>>,
        count: u64,
    ) -> Result<Vec<u64>, NodeError> {
        self.engine.next_range_batch(namespace, ids, count).await
    }

    /// Reads the current seq of `id` (0 if never allocated; after a restart, the section's
    /// ceiling, which is at least every value handed out).
    pub fn current(&self, namespace: &str, id: u64) -> Result<u64, NodeError> {
        Ok(self
            .engine
            .with_allocator(|allocator| allocator.current(namespace, id))?)
    }

    /// Reads the current seq of each id, in order.
    pub fn current_batch<'a>(
        &self,
        namespace: &str,
        ids: impl Into<Ids<'a>>,
    ) -> Result<Vec<u64>, NodeError> {
        Ok(self
            .engine
            .with_allocator(|allocator| allocator.current_batch(namespace, ids))?)
    }

    /// Creates a namespace; returns once its definition is durable.
    pub async fn create_namespace(&self, def: NamespaceDef) -> Result<NamespaceDef, NodeError> {
        let backend = self.engine.backend();
        if let Some(reason) = backend.fatal() {
            return Err(NodeError::Unavailable(reason));
        }
        let lsn = self.engine.with_allocator(|allocator| {
            def.validate()?;
            if allocator.namespace(&def.name).is_some() {
                return Err(NodeError::from(SeqError::NamespaceExists(def.name.clone())));
            }
            // Appended before the namespace enters the allocator, both under the mutex: no
            // seq of it can be served before this record is durable, because serving needs a
            // Raise record, which the log makes durable after this one.
            let lsn = backend
                .log
                .append(SeqRecord::NamespaceCreated(def.clone()).encode())?;
            allocator.add_namespace(def.clone())?;
            Ok(lsn)
        })?;
        if let Err(error) = backend.log.durable(lsn).await {
            backend.set_fatal(&error.to_string());
            return Err(error.into());
        }
        Ok(def)
    }

    /// Sets the `min_seq` of each id (one value per id; 0 clears it), all or none; returns
    /// once the set is durable. A value above the id's current seq is refused
    /// ([`SeqError::MinSeqAboveCurrent`]) and nothing is set.
    pub async fn set_min_seqs<'a>(
        &self,
        namespace: &str,
        ids: impl Into<Ids<'a>>,
        values: &[u64],
    ) -> Result<(), NodeError> {
        let backend = self.engine.backend();
        if let Some(reason) = backend.fatal() {
            return Err(NodeError::Unavailable(reason));
        }
        let ids = ids.into();
        // Validated, appended and staged under the allocator's mutex: LSN order is the order
        // sets become visible, and a checkpoint copied meanwhile carries the staged set.
        let lsn = self.engine.with_allocator(|allocator| {
            let (ns, entries) = allocator.prepare_min_seqs(namespace, ids, values)?;
            let record = SeqRecord::MinSeqs {
                ns,
                entries: entries.clone(),
            };
            let lsn = backend.log.append(record.encode())?;
            allocator.min_seqs_mut().stage(lsn, ns, entries);
            Ok::<_, NodeError>(lsn)
        })?;
        if let Err(error) = backend.log.durable(lsn).await {
            backend.set_fatal(&error.to_string());
            self.engine
                .with_allocator(|allocator| allocator.min_seqs_mut().abandon());
            return Err(error.into());
        }
        self.engine
            .with_allocator(|allocator| allocator.min_seqs_mut().commit(lsn));
        Ok(())
    }

    /// Reads the `min_seq` of each id (0 where none was set); only durable sets are seen.
    pub fn min_seqs<'a>(
        &self,
        namespace: &str,
        ids: impl Into<Ids<'a>>,
    ) -> Result<Vec<u64>, NodeError> {
        let ids = ids.into();
        Ok(self
            .engine
            .with_allocator(|allocator| allocator.min_seq_batch(namespace, ids))?)
    }

    /// Every namespace, in creation order.
    pub fn namespaces(&self) -> Vec<NamespaceDef> {
        self.engine.namespaces()
    }

    /// How many sections have a ceiling in memory.
    pub fn sections_loaded(&self) -> usize {
        self.engine.sections_loaded()
    }

    /// String keys in memory and the bytes their tables hold.
    pub fn keys_loaded(&self) -> (usize, usize) {
        self.engine.keys_loaded()
    }

    /// Writes a checkpoint now and drops the log segments it covers.
    pub fn checkpoint(&self) -> Result<CheckpointStats, NodeError> {
        let log = &self.engine.backend().log;
        let covered_lsn = log.last_lsn();
        let data = self
            .engine
            .with_allocator(|allocator| SeqSnapshot {
                namespaces: allocator.namespaces().map(|(_, def)| def.clone()).collect(),
                ceilings: allocator.ceilings(),
                min_seqs: allocator.min_seqs().snapshot(),
            })
            .encode();
        Ok(log.checkpoint(covered_lsn, |out| out.write_all(&data))?)
    }

    fn maybe_checkpoint(self: &Arc<Self>) {
        let Some(claim) = self
            .auto_checkpoint
            .claim(self.log(), self.engine.options().checkpoint_log_bytes)
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
        &self.engine.backend().log
    }

    /// Receives the reason once the store has failed for good (the log is poisoned).
    pub fn fatal(&self) -> watch::Receiver<Option<String>> {
        self.engine.backend().fatal.subscribe()
    }

    /// Flushes and fsyncs the log and stops its flusher.
    pub fn shutdown(&self) -> Result<(), NodeError> {
        Ok(self.log().shutdown()?)
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
            for (ns, id, value) in snapshot.min_seqs {
                load_min_seqs(allocator, ns, vec![(id, value)])?;
            }
        }
        Replay::Record { payload, .. } => match SeqRecord::decode(payload)? {
            SeqRecord::NamespaceCreated(def) => add_or_match(allocator, def)?,
            SeqRecord::Raise(raise) => load(allocator, raise.ns, raise.section, raise.max_seq)?,
            SeqRecord::MinSeqs { ns, entries } => load_min_seqs(allocator, ns, entries)?,
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

/// Applies a recovered `min_seq` set (validated when it was made; its namespace must exist).
fn load_min_seqs(
    allocator: &mut Allocator,
    ns: u32,
    entries: imstate_seq::MinSeqEntries,
) -> Result<(), DecodeError> {
    if allocator.namespace_by_id(ns).is_none() {
        return Err(DecodeError(format!(
            "min_seq for unknown namespace id {ns}"
        )));
    }
    allocator.min_seqs_mut().apply(ns, entries);
    Ok(())
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
