//! The sequence engine of both modes: the pure allocator, one ownership check per section,
//! and a [`MaxSeqStore`] that makes ceilings durable, fenced on ownership.
//!
//! ```text
//!  next_batch ──► Backend::tenure for every section ──► redirect / unavailable
//!       │ all owned
//!       ├─► sections not loaded under this tenure: MaxSeqStore::load (ceiling + fence)
//!       └─► Allocator::next_batch ──► Served{seqs, raises} ──► reply; raises persisted in the
//!                  │                                            background (raise-ahead)
//!                  └─► Wait{raises} ──► MaxSeqStore::persist ──► Durable / Stale / Fenced /
//!                                          Failed ──► allocator told ──► retry
//! ```
//!
//! The embedded mode is the degenerate case: its backend (the local log) owns every section
//! forever ([`Backend::PERMANENT`]), so nothing is ever loaded or checked per section and the
//! hot path is one mutex and the allocator. The cluster backend checks the lease and the
//! route table per section and keeps `max_seq` in etcd.
//!
//! Invariants:
//! - S2: a value is served only below a ceiling the store acknowledged to this node as its
//!   own (`Durable`), or that it read there (a load, or the current value of a `Stale`).
//! - S1 across owners: a section is served only while [`Backend::tenure`] says so, checked
//!   under the allocator lock right before the allocation; a section whose tenure changed is
//!   reloaded from the store, which holds every value another owner may have served below.
//! - Only the raises sent are reported back as durable: a section unloaded since its raise
//!   was requested is not in the persist, and is never marked durable by the others' success.
//! - B1: a request waits for a raise at most `raise_wait_timeout`.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use imstate_coord::maxseq::{Ceiling, MaxSeqStore, PersistOutcome, SectionRaise};
use imstate_seq::{Alloc, Allocator, Ids, NamespaceDef, NsId, Raise};
use parking_lot::Mutex;
use tokio::sync::watch;

use crate::NodeError;
use crate::seqstore::SeqStoreOptions;

/// A [`MaxSeqStore`] with the ownership check of its mode.
pub trait Backend: MaxSeqStore {
    /// Whether this node owns every section forever (embedded): then the allocator's state is
    /// never stale, nothing is loaded, and every fence is 0.
    const PERMANENT: bool;
    /// The tenure under which this node serves the section now, or the error a front door
    /// answers (a redirect naming the owner, or unavailable).
    fn tenure(&self, namespace: &str, section: u64) -> Result<u64, NodeError>;
    /// Why the store failed for good, once it has.
    fn fatal(&self) -> Option<String>;
}

/// A loaded section: its fence as last seen, and the tenure it was loaded under.
#[derive(Clone, Copy, Debug)]
struct Loaded {
    fence: i64,
    tenure: u64,
}

struct Inner {
    allocator: Allocator,
    loaded: HashMap<(NsId, u64), Loaded>,
}

/// The allocator of one node made durable and safe by a [`Backend`].
pub struct SeqEngine<B> {
    backend: B,
    /// A `parking_lot` mutex: held for a few hundred nanoseconds, never across an await.
    inner: Mutex<Inner>,
    /// Bumped whenever a persist resolves, so that waiting requests retry.
    raised: watch::Sender<u64>,
    options: SeqStoreOptions,
}

impl<B: Backend> SeqEngine<B> {
    /// An engine over `allocator` (recovered, for the embedded mode).
    pub fn new(backend: B, allocator: Allocator, options: SeqStoreOptions) -> Arc<Self> {
        Arc::new(Self {
            backend,
            inner: Mutex::new(Inner {
                allocator,
                loaded: HashMap::new(),
            }),
            raised: watch::channel(0).0,
            options,
        })
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The options.
    pub fn options(&self) -> &SeqStoreOptions {
        &self.options
    }

    /// Runs `f` on the allocator under the engine's lock (namespaces, checkpoints).
    pub fn with_allocator<R>(&self, f: impl FnOnce(&mut Allocator) -> R) -> R {
        f(&mut self.inner.lock().allocator)
    }

    /// Changes whenever a persist resolved.
    pub fn raised(&self) -> watch::Receiver<u64> {
        self.raised.subscribe()
    }

    fn check_alive(&self) -> Result<(), NodeError> {
        match self.backend.fatal() {
            Some(reason) => Err(NodeError::Unavailable(reason)),
            None => Ok(()),
        }
    }

    /// The namespace's id and definition.
    fn namespace(&self, name: &str) -> Result<(NsId, NamespaceDef), NodeError> {
        self.inner
            .lock()
            .allocator
            .namespace(name)
            .map(|(ns, def)| (ns, def.clone()))
            .ok_or_else(|| imstate_seq::SeqError::UnknownNamespace(name.to_owned()).into())
    }

    /// Checks the batch, then that this node owns every section of it and has loaded each
    /// under its current tenure; returns the sections and their tenures (none for a
    /// permanent owner).
    async fn prepare(
        &self,
        namespace: &str,
        ids: Ids<'_>,
    ) -> Result<(NsId, Vec<(u64, u64)>), NodeError> {
        if B::PERMANENT {
            return Ok((0, Vec::new()));
        }
        let (ns, def) = self.namespace(namespace)?;
        // Validates the batch size and every id, without side effects.
        self.inner.lock().allocator.current_batch(namespace, ids)?;
        let sections: BTreeSet<u64> = (0..ids.len())
            .map(|index| ids.section_at(&def, index))
            .collect();
        let mut owned = Vec::with_capacity(sections.len());
        for section in sections {
            let tenure = self.backend.tenure(namespace, section)?;
            let fresh = self
                .inner
                .lock()
                .loaded
                .get(&(ns, section))
                .is_some_and(|loaded| loaded.tenure == tenure);
            if !fresh {
                let Ceiling { max_seq, fence } = self
                    .backend
                    .load(namespace, section)
                    .await
                    .map_err(NodeError::Unavailable)?;
                let mut inner = self.inner.lock();
                // A concurrent request may have loaded this tenure meanwhile and served from
                // it: never overwrite that state with this (possibly older) read, which would
                // wipe its cur_seq and hand its values out again.
                let loaded_tenure = inner.loaded.get(&(ns, section)).map(|loaded| loaded.tenure);
                #[cfg(feature = "planted-load-overwrites-tenure")]
                let loaded_tenure = loaded_tenure.and(None::<u64>);
                if loaded_tenure != Some(tenure) {
                    // Another tenure's state (if any) goes: the store's ceiling covers it.
                    inner.allocator.unload_section(ns, section);
                    inner.allocator.load_section(ns, section, max_seq);
                    inner.loaded.insert((ns, section), Loaded { fence, tenure });
                }
            }
            owned.push((section, tenure));
        }
        Ok((ns, owned))
    }

    /// Whether every section is still owned under the tenure it was loaded with (checked
    /// under the allocator lock, right before allocating: the linearization point).
    fn still_owned(
        &self,
        inner: &Inner,
        namespace: &str,
        ns: NsId,
        sections: &[(u64, u64)],
    ) -> Result<bool, NodeError> {
        for &(section, tenure) in sections {
            if self.backend.tenure(namespace, section)? != tenure
                || inner
                    .loaded
                    .get(&(ns, section))
                    .is_none_or(|loaded| loaded.tenure != tenure)
            {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Allocates one seq per id, in order; a repeated id gets increasing values.
    pub async fn next_batch<'a>(
        self: &Arc<Self>,
        namespace: &str,
        ids: impl Into<Ids<'a>>,
    ) -> Result<Vec<u64>, NodeError> {
        self.next_range_batch(namespace, ids, 1).await
    }

    /// Reserves `count` consecutive seqs per id, in order, and returns the last of each range
    /// (see [`Allocator::next_range_batch`]); `count = 1` is [`SeqEngine::next_batch`].
    pub async fn next_range_batch<'a>(
        self: &Arc<Self>,
        namespace: &str,
        ids: impl Into<Ids<'a>>,
        count: u64,
    ) -> Result<Vec<u64>, NodeError> {
        let ids = ids.into();
        let deadline = tokio::time::Instant::now() + self.options.raise_wait_timeout;
        let mut waited = false;
        loop {
            self.check_alive()?;
            let (ns, sections) = self.prepare(namespace, ids).await?;
            let (outcome, mut raised) = {
                let mut inner = self.inner.lock();
                if !self.still_owned(&inner, namespace, ns, &sections)? {
                    continue;
                }
                let outcome = match ids {
                    Ids::Numeric([id]) if count == 1 => inner.allocator.next(namespace, *id)?,
                    _ => inner.allocator.next_range_batch(namespace, ids, count)?,
                };
                // Subscribing under the mutex: a persist that resolves after this point bumps
                // the version this receiver has not seen, so no wake-up is lost.
                let raised =
                    matches!(outcome, Alloc::Wait { .. }).then(|| self.raised.subscribe());
                (outcome, raised)
            };
            match outcome {
                Alloc::Served { seqs, raises } => {
                    // A pre-raise: persisted in the background; this request does not wait.
                    self.persist(namespace, raises);
                    metrics::counter!(crate::metrics::SEQ_ALLOCATED)
                        .increment((seqs.len() as u64).saturating_mul(count));
                    return Ok(seqs);
                }
                Alloc::Wait { raises } => {
                    if !waited {
                        waited = true;
                        metrics::counter!(crate::metrics::SEQ_RAISE_WAITS).increment(1);
                    }
                    self.persist(namespace, raises);
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

    /// Reads the current seq of each id (after a restart or a move, the section's ceiling for
    /// ids not served since).
    pub async fn current_batch<'a>(
        &self,
        namespace: &str,
        ids: impl Into<Ids<'a>>,
    ) -> Result<Vec<u64>, NodeError> {
        let ids = ids.into();
        loop {
            let (ns, sections) = self.prepare(namespace, ids).await?;
            let inner = self.inner.lock();
            if self.still_owned(&inner, namespace, ns, &sections)? {
                return Ok(inner.allocator.current_batch(namespace, ids)?);
            }
        }
    }

    /// Persists raises in the background; wakes the waiting requests when resolved.
    fn persist(self: &Arc<Self>, namespace: &str, raises: Vec<Raise>) {
        if raises.is_empty() {
            return;
        }
        metrics::counter!(crate::metrics::SEQ_RAISES).increment(raises.len() as u64);
        // Only the raises sent are reported back as durable (see the module's invariants).
        let (raises, requests): (Vec<Raise>, Vec<SectionRaise>) = {
            let mut inner = self.inner.lock();
            let mut sent = Vec::with_capacity(raises.len());
            let mut requests = Vec::with_capacity(raises.len());
            for raise in raises {
                let fence = if B::PERMANENT {
                    Some((0, 0))
                } else {
                    inner
                        .loaded
                        .get(&(raise.ns, raise.section))
                        .map(|loaded| (loaded.fence, loaded.tenure))
                };
                match fence {
                    Some((fence, tenure)) => {
                        requests.push(SectionRaise {
                            ns_id: raise.ns,
                            namespace: namespace.to_owned(),
                            section: raise.section,
                            max_seq: raise.max_seq,
                            fence,
                            tenure,
                        });
                        sent.push(raise);
                    }
                    None => inner.allocator.raise_failed(raise),
                }
            }
            (sent, requests)
        };
        let engine = Arc::clone(self);
        let started = std::time::Instant::now();
        tokio::spawn(async move {
            let outcome = if requests.is_empty() {
                PersistOutcome::Fenced
            } else {
                engine.backend.persist(requests).await
            };
            metrics::histogram!(crate::metrics::SEQ_RAISE_DURATION)
                .record(started.elapsed().as_secs_f64());
            engine.apply(raises, outcome);
            engine.raised.send_modify(|version| *version += 1);
        });
    }

    /// Tells the allocator what became of the raises sent.
    fn apply(&self, raises: Vec<Raise>, outcome: PersistOutcome) {
        let mut inner = self.inner.lock();
        let Inner { allocator, loaded } = &mut *inner;
        match outcome {
            PersistOutcome::Durable { fence } => {
                for raise in raises {
                    if B::PERMANENT {
                        allocator.raise_durable(raise);
                    } else if let Some(state) = loaded.get_mut(&(raise.ns, raise.section)) {
                        allocator.raise_durable(raise);
                        state.fence = fence;
                    }
                }
            }
            PersistOutcome::Stale { current } => {
                for raise in &raises {
                    allocator.raise_failed(*raise);
                    let Some(state) = loaded.get_mut(&(raise.ns, raise.section)) else {
                        continue;
                    };
                    if let Some((_, ceiling)) = current
                        .iter()
                        .find(|(section, _)| *section == raise.section)
                    {
                        // What the store holds is durable: serve below it.
                        allocator.raise_durable(Raise {
                            max_seq: ceiling.max_seq,
                            ..*raise
                        });
                        state.fence = ceiling.fence;
                    }
                }
            }
            PersistOutcome::Fenced | PersistOutcome::Failed { .. } => {
                for raise in raises {
                    allocator.raise_failed(raise);
                }
            }
        }
        // Left out under the planted bug, so that the bug reaches the tests' own checkers.
        #[cfg(all(debug_assertions, not(feature = "planted-serve-before-durable")))]
        if let Err(violation) = allocator.check_invariants() {
            panic!("allocator invariant violated: {violation}");
        }
    }

    /// Forgets sections this node lost (cluster mode): `Some((namespace, start, end))`, or
    /// `None` for every section.
    ///
    /// The news may come late: a section lost and owned again since (a new tenure) may already
    /// be loaded and served under its new tenure. That state is kept: dropping it would let a
    /// load read before this tenure's raises install an older ceiling and hand values out
    /// again (found by `tests/engine_sim.rs`).
    pub fn unload(&self, lost: crate::cluster::Lost) {
        let mut inner = self.inner.lock();
        let Inner { allocator, loaded } = &mut *inner;
        let names: HashMap<NsId, String> = allocator
            .namespaces()
            .map(|(ns, def)| (ns, def.name.clone()))
            .collect();
        let range = match &lost {
            Some((namespace, start, end)) => {
                let Some((ns, _)) = allocator.namespace(namespace) else {
                    return;
                };
                Some((ns, *start..*end))
            }
            None => None,
        };
        loaded.retain(|&(ns, section), state| {
            let named = range
                .as_ref()
                .is_none_or(|(lost_ns, sections)| *lost_ns == ns && sections.contains(&section));
            #[cfg(not(feature = "planted-unload-current-tenure"))]
            let current = names.get(&ns).is_some_and(|name| {
                self.backend
                    .tenure(name, section)
                    .is_ok_and(|tenure| tenure == state.tenure)
            });
            #[cfg(feature = "planted-unload-current-tenure")]
            let current = {
                let _ = (&names, &state);
                false
            };
            let gone = named && !current;
            if gone {
                allocator.unload_section(ns, section);
            }
            !gone
        });
    }

    /// Every namespace, in the order this node learnt them (`default` first).
    pub fn namespaces(&self) -> Vec<NamespaceDef> {
        self.inner
            .lock()
            .allocator
            .namespaces()
            .map(|(_, def)| def.clone())
            .collect()
    }

    /// String keys in memory and the bytes their tables hold (keyed namespaces).
    pub fn keys_loaded(&self) -> (usize, usize) {
        self.inner.lock().allocator.keys_loaded()
    }

    /// Sections with a ceiling in memory (cluster mode: loaded under a tenure).
    pub fn sections_loaded(&self) -> usize {
        let inner = self.inner.lock();
        if B::PERMANENT {
            inner.allocator.sections_loaded()
        } else {
            inner.loaded.len()
        }
    }
}
