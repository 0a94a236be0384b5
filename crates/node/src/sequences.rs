//! The sequence service as the front doors see it, whatever the mode: the embedded store
//! (`max_seq` in the local log) or the cluster store (`max_seq` in the coordinator, ownership
//! checked per section). An enum, not a trait object: the wire hot path pays no allocation.
//!
//! Also the one route-info source ([`Sequences::route_version`], [`Sequences::route_table`]):
//! every reply's route version and the table a stale client gets come from here.

use std::sync::Arc;

use imstate_proto::v1 as pb;
use imstate_seq::{Ids, NamespaceDef};

use crate::NodeError;
use crate::clusterseq::ClusterSeq;
use crate::seqstore::SeqStore;

/// The route version of the embedded mode: one node owns everything, forever.
pub const EMBEDDED_ROUTE_VERSION: u64 = 1;

/// A namespace in its protocol form.
pub fn namespace_to_pb(def: NamespaceDef) -> pb::Namespace {
    pb::Namespace {
        name: def.name,
        id_lo: def.id_lo,
        id_hi: def.id_hi,
        section_size: def.section_size,
        step: def.step,
        keys: def.keys.as_str().to_owned(),
    }
}

/// The sequence store of this node.
#[derive(Clone)]
pub enum Sequences {
    /// One node, the local log.
    Embedded {
        /// The store.
        store: Arc<SeqStore>,
        /// The gRPC address clients reach this node at.
        advertise: String,
        /// The wire address clients reach this node at.
        advertise_wire: String,
    },
    /// A member of a cluster.
    Cluster(Arc<ClusterSeq>),
}

impl Sequences {
    /// Allocates one seq for `id`.
    pub async fn next(&self, namespace: &str, id: u64) -> Result<u64, NodeError> {
        match self {
            Sequences::Embedded { store, .. } => store.next(namespace, id).await,
            Sequences::Cluster(store) => store.next(namespace, id).await,
        }
    }

    /// Allocates one seq per id, in order.
    pub async fn next_batch<'a>(
        &self,
        namespace: &str,
        ids: impl Into<Ids<'a>>,
    ) -> Result<Vec<u64>, NodeError> {
        match self {
            Sequences::Embedded { store, .. } => store.next_batch(namespace, ids).await,
            Sequences::Cluster(store) => store.next_batch(namespace, ids).await,
        }
    }

    /// Reserves `count` consecutive seqs per id, in order; returns the last of each range
    /// (its first is `last - count + 1`).
    pub async fn next_range_batch<'a>(
        &self,
        namespace: &str,
        ids: impl Into<Ids<'a>>,
        count: u64,
    ) -> Result<Vec<u64>, NodeError> {
        match self {
            Sequences::Embedded { store, .. } => {
                store.next_range_batch(namespace, ids, count).await
            }
            Sequences::Cluster(store) => store.next_range_batch(namespace, ids, count).await,
        }
    }

    /// Reads the current seq of each id.
    pub async fn current_batch<'a>(
        &self,
        namespace: &str,
        ids: impl Into<Ids<'a>>,
    ) -> Result<Vec<u64>, NodeError> {
        match self {
            Sequences::Embedded { store, .. } => store.current_batch(namespace, ids),
            Sequences::Cluster(store) => store.current_batch(namespace, ids).await,
        }
    }

    /// Sets the `min_seq` of each id (0 clears it); durable when this returns.
    pub async fn set_min_seqs<'a>(
        &self,
        namespace: &str,
        ids: impl Into<Ids<'a>>,
        values: &[u64],
    ) -> Result<(), NodeError> {
        match self {
            Sequences::Embedded { store, .. } => store.set_min_seqs(namespace, ids, values).await,
            Sequences::Cluster(store) => store.set_min_seqs(namespace, ids, values).await,
        }
    }

    /// Reads the `min_seq` of each id (0 where none was set).
    pub async fn min_seqs<'a>(
        &self,
        namespace: &str,
        ids: impl Into<Ids<'a>>,
    ) -> Result<Vec<u64>, NodeError> {
        match self {
            Sequences::Embedded { store, .. } => store.min_seqs(namespace, ids),
            Sequences::Cluster(store) => store.min_seqs(namespace, ids).await,
        }
    }

    /// Creates a namespace.
    pub async fn create_namespace(&self, def: NamespaceDef) -> Result<NamespaceDef, NodeError> {
        match self {
            Sequences::Embedded { store, .. } => store.create_namespace(def).await,
            Sequences::Cluster(store) => store.create_namespace(def).await,
        }
    }

    /// Every namespace.
    pub fn namespaces(&self) -> Vec<NamespaceDef> {
        match self {
            Sequences::Embedded { store, .. } => store.namespaces(),
            Sequences::Cluster(store) => store.namespaces(),
        }
    }

    /// Sections with a ceiling in memory.
    pub fn sections_loaded(&self) -> usize {
        match self {
            Sequences::Embedded { store, .. } => store.sections_loaded(),
            Sequences::Cluster(store) => store.sections_loaded(),
        }
    }

    /// String keys in memory (keyed namespaces) and the bytes their tables hold.
    pub fn keys_loaded(&self) -> (usize, usize) {
        match self {
            Sequences::Embedded { store, .. } => store.keys_loaded(),
            Sequences::Cluster(store) => store.keys_loaded(),
        }
    }

    /// The embedded store, when this node runs one.
    pub fn embedded(&self) -> Option<&Arc<SeqStore>> {
        match self {
            Sequences::Embedded { store, .. } => Some(store),
            Sequences::Cluster(_) => None,
        }
    }

    /// The version of the route table this node serves under.
    pub fn route_version(&self) -> u64 {
        match self {
            Sequences::Embedded { .. } => EMBEDDED_ROUTE_VERSION,
            Sequences::Cluster(store) => store.cluster().route_version(),
        }
    }

    /// Route information for a reply: the version, and the table when the client's version
    /// is older.
    pub fn route_info(&self, client_version: u64) -> pb::RouteInfo {
        let version = self.route_version();
        pb::RouteInfo {
            version,
            table: (client_version < version).then(|| self.route_table()),
        }
    }

    /// Every namespace with the route information (`Sequence/ListNamespaces`, wire `Route`).
    pub fn namespaces_reply(&self) -> pb::ListNamespacesReply {
        pb::ListNamespacesReply {
            namespaces: self.namespaces().into_iter().map(namespace_to_pb).collect(),
            route: Some(self.route_info(0)),
        }
    }

    /// The route table with the cluster's nodes (`Admin/Route`, wire `Route`).
    pub async fn route_reply(&self) -> Result<pb::RouteReply, NodeError> {
        let table = self.route_table();
        let nodes = match self {
            Sequences::Embedded { .. } => Vec::new(),
            Sequences::Cluster(store) => {
                let cluster = store.cluster();
                let draining = cluster.draining().await?;
                let members = cluster.members();
                let mut ids: std::collections::BTreeSet<String> =
                    members.keys().cloned().collect();
                ids.extend(table.entries.iter().map(|entry| entry.node_id.clone()));
                ids.extend(table.slots.iter().map(|entry| entry.primary_id.clone()));
                ids.into_iter()
                    .map(|id| {
                        let info = members.get(&id);
                        pb::NodeState {
                            grpc: info.map(|info| info.grpc.clone()).unwrap_or_default(),
                            wire: info.map(|info| info.wire.clone()).unwrap_or_default(),
                            alive: info.is_some(),
                            draining: draining.contains(&id),
                            node_id: id,
                        }
                    })
                    .collect()
            }
        };
        Ok(pb::RouteReply {
            table: Some(table),
            nodes,
        })
    }

    /// The route table in its protocol form.
    pub fn route_table(&self) -> pb::RouteTable {
        match self {
            Sequences::Embedded {
                store,
                advertise,
                advertise_wire,
            } => pb::RouteTable {
                version: EMBEDDED_ROUTE_VERSION,
                entries: store
                    .namespaces()
                    .into_iter()
                    .map(|def| pb::RouteEntry {
                        section_lo: 0,
                        section_hi: def.section_count(),
                        namespace: def.name,
                        node: advertise.clone(),
                        node_id: String::new(),
                        wire: advertise_wire.clone(),
                    })
                    .collect(),
                cluster: String::new(),
                presence_slots: 0,
                slots: Vec::new(),
            },
            Sequences::Cluster(store) => {
                let cluster = store.cluster();
                let members = cluster.members();
                let Some(table) = cluster.route() else {
                    return pb::RouteTable::default();
                };
                let mut entries = Vec::new();
                for (namespace, route) in &table.namespaces {
                    for range in &route.ranges {
                        let info = members.get(&range.owner);
                        entries.push(pb::RouteEntry {
                            namespace: namespace.clone(),
                            section_lo: range.start,
                            section_hi: range.end,
                            node: info.map(|info| info.grpc.clone()).unwrap_or_default(),
                            node_id: range.owner.clone(),
                            wire: info.map(|info| info.wire.clone()).unwrap_or_default(),
                        });
                    }
                }
                let (presence_slots, slots) = match &table.presence {
                    None => (0, Vec::new()),
                    Some(presence) => (
                        presence.slots,
                        presence
                            .ranges
                            .iter()
                            .map(|range| {
                                let info = members.get(&range.primary);
                                pb::SlotEntry {
                                    slot_lo: range.start,
                                    slot_hi: range.end,
                                    primary_id: range.primary.clone(),
                                    primary: info.map(|i| i.grpc.clone()).unwrap_or_default(),
                                    primary_wire: info.map(|i| i.wire.clone()).unwrap_or_default(),
                                    replica_id: range.replica.clone().unwrap_or_default(),
                                    joining_id: range.joining.clone().unwrap_or_default(),
                                }
                            })
                            .collect(),
                    ),
                };
                pb::RouteTable {
                    version: table.version,
                    entries,
                    cluster: table.cluster.clone(),
                    presence_slots,
                    slots,
                }
            }
        }
    }
}
