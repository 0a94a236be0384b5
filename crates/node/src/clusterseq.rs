//! The sequence service in cluster mode: the same pure allocator as the embedded mode, with
//! `max_seq` in the coordinator instead of the local log.
//!
//! ```text
//!  next_batch ──► ownership (Cluster::access) for every section ──► redirect / unavailable
//!       │ all owned
//!       ├─► sections not loaded here: load max_seq + its key's revision from the coordinator
//!       └─► Allocator::next_batch ──► Served{seqs, raises} ──► reply; raises persisted in the
//!                  │                                            background (raise-ahead)
//!                  └─► Wait{raises} ──► fenced raise txn ──► Durable / Stale / Fenced ──► retry
//! ```
//!
//! Invariants:
//! - S2 across nodes: a value is served only below a `max_seq` that the coordinator acknowledged
//!   to this node as its own (`Durable`), or that it read there (a load, or the current value
//!   returned by a `Stale` raise).
//! - S1 across nodes: a section is served only when [`crate::cluster::Cluster::access`] says so
//!   (lease confirmed, lock-delay over), checked under the allocator lock right before the
//!   allocation; a section whose ownership changed (another tenure) is reloaded from the
//!   coordinator, which holds every value another owner may have served below.
//! - B1: a request waits for a raise at most `raise_wait_timeout`.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use imstate_cluster::{Access, RaiseOp, RaiseOutcome};
use imstate_seq::{Alloc, Allocator, AllocatorOptions, NamespaceDef, NsId, Raise, SeqError};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::NodeError;
use crate::cluster::Cluster;
use crate::seqstore::SeqStoreOptions;

/// A namespace as stored in the coordinator (`namespaces/<name>`); `sections` is what the
/// arbiter reads.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct StoredNamespace {
    name: String,
    id_lo: u64,
    id_hi: u64,
    section_size: u64,
    step: u64,
    sections: u64,
}

impl StoredNamespace {
    fn from_def(def: &NamespaceDef) -> Self {
        Self {
            name: def.name.clone(),
            id_lo: def.id_lo,
            id_hi: def.id_hi,
            section_size: def.section_size,
            step: def.step,
            sections: def.section_count(),
        }
    }

    fn def(&self) -> NamespaceDef {
        NamespaceDef {
            name: self.name.clone(),
            id_lo: self.id_lo,
            id_hi: self.id_hi,
            section_size: self.section_size,
            step: self.step,
        }
    }
}

/// A loaded section: its key's revision as last seen, and the tenure it was loaded under.
#[derive(Clone, Copy, Debug)]
struct Loaded {
    revision: i64,
    tenure: u64,
}

struct Inner {
    allocator: Allocator,
    loaded: HashMap<(NsId, u64), Loaded>,
}

/// The cluster-mode sequence store of one node.
pub struct ClusterSeq {
    cluster: Arc<Cluster>,
    inner: Mutex<Inner>,
    raised: watch::Sender<u64>,
    options: SeqStoreOptions,
}

impl ClusterSeq {
    /// Registers the default and `declared` namespaces in the coordinator (a namespace that
    /// exists there with another layout is an error), loads every stored namespace, and starts
    /// unloading the sections this node loses.
    pub async fn open(
        cluster: Arc<Cluster>,
        options: SeqStoreOptions,
        declared: &[NamespaceDef],
    ) -> Result<Arc<Self>, NodeError> {
        let store = Arc::new(Self {
            cluster: Arc::clone(&cluster),
            inner: Mutex::new(Inner {
                allocator: Allocator::new(AllocatorOptions {
                    batch_ids_max: options.batch_ids_max,
                    sections_max: options.sections_max,
                }),
                loaded: HashMap::new(),
            }),
            raised: watch::channel(0).0,
            options,
        });
        let mut wanted = vec![NamespaceDef::default_namespace()];
        wanted.extend(declared.iter().cloned());
        for def in wanted {
            def.validate()?;
            match store.store_namespace(&def).await? {
                Ok(()) => {}
                Err(stored) if stored == def => {}
                Err(stored) => {
                    return Err(NodeError::Config(format!(
                        "namespace `{}` exists in the cluster as {stored:?}; the configuration \
                         declares {def:?}; a namespace's layout cannot change",
                        def.name
                    )));
                }
            }
        }
        store.refresh_namespaces().await?;
        let mut lost = cluster.subscribe_lost();
        let weak = Arc::downgrade(&store);
        tokio::spawn(async move {
            while let Some(lost) = lost.recv().await {
                let Some(store) = weak.upgrade() else { return };
                store.unload(lost);
            }
        });
        Ok(store)
    }

    /// Stores `def` unless the namespace exists; `Err(stored)` when it does.
    async fn store_namespace(
        &self,
        def: &NamespaceDef,
    ) -> Result<Result<(), NamespaceDef>, NodeError> {
        let value = serde_json::to_vec(&StoredNamespace::from_def(def)).expect("json");
        let stored = self
            .cluster
            .ensure_namespace(&def.name, value.clone())
            .await?;
        if stored == value {
            return Ok(Ok(()));
        }
        match serde_json::from_slice::<StoredNamespace>(&stored) {
            Ok(stored) => Ok(Err(stored.def())),
            Err(error) => Err(NodeError::Unavailable(format!(
                "namespace `{}` in the coordinator is unreadable: {error}",
                def.name
            ))),
        }
    }

    /// Adds every namespace stored in the coordinator that this node does not know yet.
    async fn refresh_namespaces(&self) -> Result<(), NodeError> {
        for (name, value) in self.cluster.stored_namespaces().await? {
            let Ok(stored) = serde_json::from_slice::<StoredNamespace>(&value) else {
                tracing::warn!(namespace = %name, "unreadable namespace in the coordinator");
                continue;
            };
            let mut inner = self.inner.lock();
            if inner.allocator.namespace(&stored.name).is_none() {
                inner.allocator.add_namespace(stored.def())?;
            }
        }
        Ok(())
    }

    fn unload(&self, lost: crate::cluster::Lost) {
        let mut inner = self.inner.lock();
        let Inner { allocator, loaded } = &mut *inner;
        match lost {
            Some((namespace, start, end)) => {
                let Some((ns, _)) = allocator.namespace(&namespace) else {
                    return;
                };
                loaded.retain(|&(loaded_ns, section), _| {
                    let gone = loaded_ns == ns && (start..end).contains(&section);
                    if gone {
                        allocator.unload_section(ns, section);
                    }
                    !gone
                });
            }
            None => {
                for (ns, section) in loaded.drain().map(|(key, _)| key) {
                    allocator.unload_section(ns, section);
                }
            }
        }
    }

    /// The namespace's id and definition, asking the coordinator once when it is unknown here.
    async fn namespace(&self, name: &str) -> Result<(NsId, NamespaceDef), NodeError> {
        if let Some((ns, def)) = self.inner.lock().allocator.namespace(name) {
            return Ok((ns, def.clone()));
        }
        self.refresh_namespaces().await?;
        self.inner
            .lock()
            .allocator
            .namespace(name)
            .map(|(ns, def)| (ns, def.clone()))
            .ok_or_else(|| SeqError::UnknownNamespace(name.to_owned()).into())
    }

    /// Checks the batch, then that this node owns every section of it and has loaded each
    /// under its current tenure; returns the sections and their tenures.
    async fn prepare(
        &self,
        namespace: &str,
        ids: &[u64],
    ) -> Result<(NsId, Vec<(u64, u64)>), NodeError> {
        let (ns, def) = self.namespace(namespace).await?;
        // Validates the batch size and every id, without side effects.
        self.inner.lock().allocator.current_batch(namespace, ids)?;
        let sections: BTreeSet<u64> = ids.iter().map(|&id| def.section_of(id)).collect();
        let mut owned = Vec::with_capacity(sections.len());
        for section in sections {
            let tenure = match self.cluster.access(namespace, section) {
                Access::Serve { tenure } => tenure,
                other => return Err(self.cluster.refusal(namespace, section, other)),
            };
            let fresh = self
                .inner
                .lock()
                .loaded
                .get(&(ns, section))
                .is_some_and(|loaded| loaded.tenure == tenure);
            if !fresh {
                let (max_seq, revision) = self.cluster.load(namespace, section).await?;
                let mut inner = self.inner.lock();
                // A concurrent request may have loaded this tenure meanwhile and served from
                // it: never overwrite that state with this (possibly older) read, which would
                // wipe its cur_seq and hand its values out again.
                let loaded_tenure = inner.loaded.get(&(ns, section)).map(|loaded| loaded.tenure);
                if loaded_tenure != Some(tenure) {
                    // Another tenure's state (if any) goes: the coordinator's ceiling covers it.
                    inner.allocator.unload_section(ns, section);
                    inner.allocator.load_section(ns, section, max_seq);
                    inner
                        .loaded
                        .insert((ns, section), Loaded { revision, tenure });
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
            match self.cluster.access(namespace, section) {
                Access::Serve { tenure: now } if now == tenure => {}
                Access::Serve { .. } => return Ok(false),
                other => return Err(self.cluster.refusal(namespace, section, other)),
            }
            if inner
                .loaded
                .get(&(ns, section))
                .is_none_or(|loaded| loaded.tenure != tenure)
            {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Allocates one seq for `id`.
    pub async fn next(self: &Arc<Self>, namespace: &str, id: u64) -> Result<u64, NodeError> {
        Ok(self.next_batch(namespace, &[id]).await?[0])
    }

    /// Allocates one seq per id, in order; a repeated id gets increasing values.
    pub async fn next_batch(
        self: &Arc<Self>,
        namespace: &str,
        ids: &[u64],
    ) -> Result<Vec<u64>, NodeError> {
        let deadline = tokio::time::Instant::now() + self.options.raise_wait_timeout;
        loop {
            let (ns, sections) = self.prepare(namespace, ids).await?;
            let (outcome, mut raised) = {
                let mut inner = self.inner.lock();
                if !self.still_owned(&inner, namespace, ns, &sections)? {
                    continue;
                }
                let outcome = inner.allocator.next_batch(namespace, ids)?;
                let raised =
                    matches!(outcome, Alloc::Wait { .. }).then(|| self.raised.subscribe());
                (outcome, raised)
            };
            match outcome {
                Alloc::Served { seqs, raises } => {
                    self.persist(namespace, raises);
                    metrics::counter!(crate::metrics::SEQ_ALLOCATED).increment(seqs.len() as u64);
                    return Ok(seqs);
                }
                Alloc::Wait { raises } => {
                    metrics::counter!(crate::metrics::SEQ_RAISE_WAITS).increment(1);
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

    /// Reads the current seq of each id (the section's ceiling for ids never served here).
    pub async fn current_batch(
        self: &Arc<Self>,
        namespace: &str,
        ids: &[u64],
    ) -> Result<Vec<u64>, NodeError> {
        loop {
            let (ns, sections) = self.prepare(namespace, ids).await?;
            let inner = self.inner.lock();
            if self.still_owned(&inner, namespace, ns, &sections)? {
                return Ok(inner.allocator.current_batch(namespace, ids)?);
            }
        }
    }

    /// Persists raises in the background, fenced on this node's ownership and on each
    /// section's revision; wakes the waiting requests when done.
    fn persist(self: &Arc<Self>, namespace: &str, raises: Vec<Raise>) {
        if raises.is_empty() {
            return;
        }
        metrics::counter!(crate::metrics::SEQ_RAISES).increment(raises.len() as u64);
        // Only the raises sent are reported back as durable: a section unloaded since its
        // raise was requested is not in the txn, and must never be marked durable by the
        // success of the others (its ceiling would then exceed the coordinator's).
        let (raises, ops): (Vec<Raise>, Vec<RaiseOp>) = {
            let mut inner = self.inner.lock();
            let mut sent = Vec::with_capacity(raises.len());
            let mut ops = Vec::with_capacity(raises.len());
            for raise in raises {
                match inner.loaded.get(&(raise.ns, raise.section)) {
                    Some(loaded) => {
                        ops.push(RaiseOp {
                            namespace: namespace.to_owned(),
                            section: raise.section,
                            max_seq: raise.max_seq,
                            revision: loaded.revision,
                        });
                        sent.push(raise);
                    }
                    None => inner.allocator.raise_failed(raise),
                }
            }
            (sent, ops)
        };
        let store = Arc::clone(self);
        let started = std::time::Instant::now();
        tokio::spawn(async move {
            let outcome = if ops.is_empty() {
                RaiseOutcome::Fenced {
                    effects: Vec::new(),
                }
            } else {
                store.cluster.raise(ops).await
            };
            metrics::histogram!(crate::metrics::SEQ_RAISE_DURATION)
                .record(started.elapsed().as_secs_f64());
            {
                let mut inner = store.inner.lock();
                let Inner { allocator, loaded } = &mut *inner;
                match outcome {
                    RaiseOutcome::Durable { revision } => {
                        for raise in raises {
                            if let Some(state) = loaded.get_mut(&(raise.ns, raise.section)) {
                                allocator.raise_durable(raise);
                                state.revision = revision;
                            }
                        }
                    }
                    RaiseOutcome::Stale { current } => {
                        for raise in &raises {
                            allocator.raise_failed(*raise);
                            let Some(state) = loaded.get_mut(&(raise.ns, raise.section)) else {
                                continue;
                            };
                            if let Some((_, _, max_seq, revision)) = current
                                .iter()
                                .find(|(_, section, _, _)| *section == raise.section)
                            {
                                // What the coordinator holds is durable: serve below it.
                                allocator.raise_durable(Raise {
                                    max_seq: *max_seq,
                                    ..*raise
                                });
                                state.revision = *revision;
                            }
                        }
                    }
                    RaiseOutcome::Fenced { .. } => {
                        for raise in raises {
                            allocator.raise_failed(raise);
                        }
                    }
                }
            }
            store.raised.send_modify(|version| *version += 1);
        });
    }

    /// Creates a namespace in the coordinator; every node learns it on first use.
    pub async fn create_namespace(&self, def: NamespaceDef) -> Result<NamespaceDef, NodeError> {
        def.validate()?;
        match self.store_namespace(&def).await? {
            Ok(()) => {
                self.refresh_namespaces().await?;
                Ok(def)
            }
            Err(_) => Err(SeqError::NamespaceExists(def.name).into()),
        }
    }

    /// Every namespace this node knows, in the order it learnt them (`default` first).
    pub fn namespaces(&self) -> Vec<NamespaceDef> {
        self.inner
            .lock()
            .allocator
            .namespaces()
            .map(|(_, def)| def.clone())
            .collect()
    }

    /// Sections loaded here.
    pub fn sections_loaded(&self) -> usize {
        self.inner.lock().loaded.len()
    }

    /// The cluster membership.
    pub fn cluster(&self) -> &Arc<Cluster> {
        &self.cluster
    }
}
