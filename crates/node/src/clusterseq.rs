//! The sequence service in cluster mode: the [`SeqEngine`] of the embedded mode over the
//! cluster backend ([`ClusterMaxSeq`]): `max_seq` in the coordinator, raised by fenced txns,
//! and each section served only while [`Cluster::access`] says so (the one ownership check).
//! Namespaces live in the coordinator too; every node learns them on first use.
//!
//! ```text
//!  next_batch ──► namespace known? (else read the coordinator's) ──► SeqEngine::next_batch
//!      ──► ClusterMaxSeq::tenure (lease confirmed, lock-delay over, route table) per section
//!      ──► ClusterMaxSeq::load / persist: fenced txns (member create-rev, route mod-rev,
//!          section key mod-rev) ──► Durable / Stale / Fenced
//!  sections lost (Cluster effects) ──► SeqEngine::unload
//! ```

use std::sync::Arc;

use imstate_cluster::{Access, RaiseOp, RaiseOutcome};
use imstate_coord::Op;
use imstate_coord::maxseq::{Ceiling, MaxSeqStore, PersistOutcome, SectionRaise};
use imstate_seq::{Allocator, AllocatorOptions, Ids, NamespaceDef, SeqError};
use serde::{Deserialize, Serialize};

use crate::NodeError;
use crate::cluster::Cluster;
use crate::seqengine::{Backend, SeqEngine};
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
    /// `string` for a keyed namespace; left out for a numeric one, so definitions stored
    /// before keyed namespaces existed read (and compare) unchanged.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    keys: String,
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
            keys: if def.is_keyed() {
                def.keys.as_str().to_owned()
            } else {
                String::new()
            },
        }
    }

    fn def(&self) -> NamespaceDef {
        NamespaceDef {
            name: self.name.clone(),
            id_lo: self.id_lo,
            id_hi: self.id_hi,
            section_size: self.section_size,
            step: self.step,
            // An unknown kind (from a newer node) reads as numeric; its keyed requests are
            // then refused with WrongIdKind rather than misrouted.
            keys: self.keys.parse().unwrap_or_default(),
        }
    }
}

/// The cluster [`MaxSeqStore`]: fenced txns on the coordinator, and the lease + route-table
/// ownership check.
pub struct ClusterMaxSeq(Arc<Cluster>);

impl MaxSeqStore for ClusterMaxSeq {
    async fn load(&self, namespace: &str, section: u64) -> Result<Ceiling, String> {
        match self.0.load(namespace, section).await {
            Ok((max_seq, revision)) => Ok(Ceiling {
                max_seq,
                fence: revision,
            }),
            Err(error) => Err(error.to_string()),
        }
    }

    async fn persist(&self, raises: Vec<SectionRaise>) -> PersistOutcome {
        let ops = raises
            .into_iter()
            .map(|raise| RaiseOp {
                namespace: raise.namespace,
                section: raise.section,
                max_seq: raise.max_seq,
                revision: raise.fence,
            })
            .collect();
        match self.0.raise(ops).await {
            RaiseOutcome::Durable { revision } => PersistOutcome::Durable { fence: revision },
            RaiseOutcome::Stale { current } => PersistOutcome::Stale {
                current: current
                    .into_iter()
                    .map(|(_, section, max_seq, revision)| {
                        (
                            section,
                            Ceiling {
                                max_seq,
                                fence: revision,
                            },
                        )
                    })
                    .collect(),
            },
            RaiseOutcome::Fenced { .. } => PersistOutcome::Fenced,
        }
    }
}

impl Backend for ClusterMaxSeq {
    const PERMANENT: bool = false;

    fn tenure(&self, namespace: &str, section: u64) -> Result<u64, NodeError> {
        match self.0.access(namespace, section) {
            Access::Serve { tenure } => Ok(tenure),
            other => Err(self.0.refusal(namespace, section, other)),
        }
    }

    fn fatal(&self) -> Option<String> {
        None
    }
}

/// The cluster-mode sequence store of one node.
pub struct ClusterSeq {
    cluster: Arc<Cluster>,
    engine: Arc<SeqEngine<ClusterMaxSeq>>,
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
        let allocator = Allocator::new(AllocatorOptions {
            batch_ids_max: options.batch_ids_max,
            sections_max: options.sections_max,
        });
        let store = Arc::new(Self {
            cluster: Arc::clone(&cluster),
            engine: SeqEngine::new(ClusterMaxSeq(Arc::clone(&cluster)), allocator, options),
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
                store.engine.unload(lost);
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
            self.engine.with_allocator(|allocator| {
                if allocator.namespace(&stored.name).is_none() {
                    allocator.add_namespace(stored.def())?;
                }
                Ok::<_, NodeError>(())
            })?;
        }
        Ok(())
    }

    /// Makes sure this node knows the namespace, asking the coordinator once when it does
    /// not.
    async fn know(&self, name: &str) -> Result<(), NodeError> {
        let known = |engine: &SeqEngine<ClusterMaxSeq>| {
            engine.with_allocator(|allocator| allocator.namespace(name).is_some())
        };
        if known(&self.engine) {
            return Ok(());
        }
        self.refresh_namespaces().await?;
        if known(&self.engine) {
            Ok(())
        } else {
            Err(SeqError::UnknownNamespace(name.to_owned()).into())
        }
    }

    /// Allocates one seq for `id`.
    pub async fn next(&self, namespace: &str, id: u64) -> Result<u64, NodeError> {
        Ok(self.next_batch(namespace, &[id]).await?[0])
    }

    /// Allocates one seq per id, in order; a repeated id gets increasing values.
    pub async fn next_batch<'a>(
        &self,
        namespace: &str,
        ids: impl Into<Ids<'a>>,
    ) -> Result<Vec<u64>, NodeError> {
        self.know(namespace).await?;
        self.engine.next_batch(namespace, ids).await
    }

    /// Reserves `count` consecutive seqs per id; returns the last of each range.
    pub async fn next_range_batch<'a>(
        &self,
        namespace: &str,
        ids: impl Into<Ids<'a>>,
        count: u64,
    ) -> Result<Vec<u64>, NodeError> {
        self.know(namespace).await?;
        self.engine.next_range_batch(namespace, ids, count).await
    }

    /// Reads the current seq of each id (the section's ceiling for ids never served here).
    pub async fn current_batch<'a>(
        &self,
        namespace: &str,
        ids: impl Into<Ids<'a>>,
    ) -> Result<Vec<u64>, NodeError> {
        self.know(namespace).await?;
        self.engine.current_batch(namespace, ids).await
    }

    /// Sets the `min_seq` of each id (0 clears it) in the coordinator, in one txn fenced by
    /// this node's ownership of their sections; at most [`CLUSTER_MIN_SEQ_BATCH_MAX`] ids.
    /// Each value is checked against the id's current seq here, at its section's owner.
    pub async fn set_min_seqs<'a>(
        &self,
        namespace: &str,
        ids: impl Into<Ids<'a>>,
        values: &[u64],
    ) -> Result<(), NodeError> {
        let ids = ids.into();
        self.know(namespace).await?;
        if ids.len() > CLUSTER_MIN_SEQ_BATCH_MAX {
            return Err(NodeError::Limit(format!(
                "a SetMinSeq of {} ids; in cluster mode a call sets at most \
                 {CLUSTER_MIN_SEQ_BATCH_MAX} (CLUSTER_MIN_SEQ_BATCH_MAX, etcd's operations per txn)",
                ids.len()
            )));
        }
        // Owned, loaded under the current tenure: the allocator's current values are the
        // section's (at least its ceiling), which the check below compares against.
        self.engine.current_batch(namespace, ids).await?;
        let (entries, def) = self.engine.with_allocator(|allocator| {
            let (ns, entries) = allocator.prepare_min_seqs(namespace, ids, values)?;
            let def = allocator.namespace_by_id(ns).cloned();
            Ok::<_, NodeError>((entries, def))
        })?;
        let def = def.ok_or_else(|| SeqError::UnknownNamespace(namespace.to_owned()))?;
        let keys = self.cluster.keys();
        let ops = entries
            .into_iter()
            .enumerate()
            .map(|(index, (id, value))| {
                let key = keys.min_seq(namespace, ids.section_at(&def, index), &min_seq_leaf(&id));
                if value == 0 {
                    Op::Delete { key }
                } else {
                    Op::put(key, imstate_coord::encode_u64(value))
                }
            })
            .collect();
        self.cluster.fenced_write(ops).await
    }

    /// Reads the `min_seq` of each id from the coordinator (0 where none was set).
    pub async fn min_seqs<'a>(
        &self,
        namespace: &str,
        ids: impl Into<Ids<'a>>,
    ) -> Result<Vec<u64>, NodeError> {
        let ids = ids.into();
        self.know(namespace).await?;
        let (owned, def) = self.engine.with_allocator(|allocator| {
            // Validates the batch and every id, without side effects.
            allocator.min_seq_batch(namespace, ids)?;
            let (_, def) = allocator
                .namespace(namespace)
                .ok_or_else(|| SeqError::UnknownNamespace(namespace.to_owned()))?;
            let owned: Vec<imstate_seq::OwnedId> =
                (0..ids.len()).map(|index| ids.owned(index)).collect();
            Ok::<_, NodeError>((owned, def.clone()))
        })?;
        let keys = self.cluster.keys();
        let mut values = Vec::with_capacity(owned.len());
        let mut index = 0;
        for chunk in owned.chunks(CLUSTER_MIN_SEQ_BATCH_MAX) {
            let gets = chunk
                .iter()
                .enumerate()
                .map(|(offset, id)| {
                    let section = ids.section_at(&def, index + offset);
                    Op::get(keys.min_seq(namespace, section, &min_seq_leaf(id)))
                })
                .collect();
            let response = self
                .cluster
                .txn(imstate_coord::Txn {
                    compare: Vec::new(),
                    success: gets,
                    failure: Vec::new(),
                })
                .await?;
            for offset in 0..chunk.len() {
                let value = response
                    .got(offset)
                    .and_then(|kv| imstate_coord::decode_u64(&kv.value))
                    .unwrap_or(0);
                values.push(value);
            }
            index += chunk.len();
        }
        Ok(values)
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
        self.engine.namespaces()
    }

    /// Sections loaded here.
    pub fn sections_loaded(&self) -> usize {
        self.engine.sections_loaded()
    }

    /// String keys in memory and the bytes their tables hold.
    pub fn keys_loaded(&self) -> (usize, usize) {
        self.engine.keys_loaded()
    }

    /// The cluster membership.
    pub fn cluster(&self) -> &Arc<Cluster> {
        &self.cluster
    }
}

/// Most ids one SetMinSeq sets in cluster mode, and ids read per coordinator txn by GetMinSeq:
/// etcd's default `--max-txn-ops` (128 operations per txn).
pub const CLUSTER_MIN_SEQ_BATCH_MAX: usize = 128;

/// The last element of an id's `min_seq` key: `n<decimal>` or `k<hex of the key>`.
fn min_seq_leaf(id: &imstate_seq::OwnedId) -> String {
    match id {
        imstate_seq::OwnedId::Id(id) => format!("n{id}"),
        imstate_seq::OwnedId::Key(key) => {
            let mut leaf = String::with_capacity(1 + key.len() * 2);
            leaf.push('k');
            for byte in key.iter() {
                leaf.push_str(&format!("{byte:02x}"));
            }
            leaf
        }
    }
}
