//! The coordinator keys of one cluster, all under `/imstate/<cluster>/`:
//!
//! | key | value | written by |
//! |---|---|---|
//! | `members/<node>` | the node's [`crate::MemberInfo`] (JSON), bound to its lease | the node |
//! | `arbiter` | the arbiter's node id, bound to its lease | the elected node |
//! | `route` | the [`crate::RouteTable`] (JSON) | the arbiter only |
//! | `namespaces/<name>` | the namespace's definition (JSON with at least `sections`) | any node |
//! | `drain/<node>` | empty: the node should give its sections away | `imstate ctl drain` |
//! | `insync/<node>` | the presence slots the node is an in-sync replica of, and (`lapsed`) those it synced in their tenure whose stream has ended since ([`crate::InSyncRange`] list, JSON), bound to its lease | the node |
//! | `counted/<node>` | the replicas this primary counts in sync for its slots ([`crate::CountedRange`] list, JSON), bound to its lease; rewritten before the primary acknowledges a write without a replica it cut off | the node |
//! | `maxseq/<namespace>/<section>` | the section's `max_seq` ([`imstate_coord::encode_u64`]) | the owner, fenced |
//! | `minseq/<namespace>/<section>/<id>` | an id's `min_seq` ([`imstate_coord::encode_u64`]; absent = 0); `<id>` is `n<decimal>` or `k<hex of the key>` | the section's owner, fenced |

/// Builds the keys of one cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// The keys of cluster `cluster`.
    pub fn new(cluster: &str) -> Self {
        Self {
            prefix: format!("/imstate/{cluster}/"),
        }
    }

    /// The cluster's prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// A member's key.
    pub fn member(&self, node: &str) -> String {
        format!("{}members/{node}", self.prefix)
    }

    /// The prefix of every member key.
    pub fn members(&self) -> String {
        format!("{}members/", self.prefix)
    }

    /// The arbiter election key.
    pub fn arbiter(&self) -> String {
        format!("{}arbiter", self.prefix)
    }

    /// The route table key.
    pub fn route(&self) -> String {
        format!("{}route", self.prefix)
    }

    /// A namespace's key.
    pub fn namespace(&self, name: &str) -> String {
        format!("{}namespaces/{name}", self.prefix)
    }

    /// The prefix of every namespace key.
    pub fn namespaces(&self) -> String {
        format!("{}namespaces/", self.prefix)
    }

    /// A drain request's key.
    pub fn drain(&self, node: &str) -> String {
        format!("{}drain/{node}", self.prefix)
    }

    /// The prefix of every drain key.
    pub fn drains(&self) -> String {
        format!("{}drain/", self.prefix)
    }

    /// A node's in-sync replica report.
    pub fn in_sync(&self, node: &str) -> String {
        format!("{}insync/{node}", self.prefix)
    }

    /// The prefix of every in-sync report.
    pub fn in_syncs(&self) -> String {
        format!("{}insync/", self.prefix)
    }

    /// A primary's report of the replicas it counts in sync.
    pub fn counted(&self, node: &str) -> String {
        format!("{}counted/{node}", self.prefix)
    }

    /// The prefix of every primary's counted report.
    pub fn counteds(&self) -> String {
        format!("{}counted/", self.prefix)
    }

    /// A section's `max_seq` key (the section in 16 hex digits, so keys sort by section).
    pub fn max_seq(&self, namespace: &str, section: u64) -> String {
        format!("{}maxseq/{namespace}/{section:016x}", self.prefix)
    }

    /// An id's `min_seq` key; `id` is `n<decimal>` for a number, `k<hex>` for a string key.
    pub fn min_seq(&self, namespace: &str, section: u64, id: &str) -> String {
        format!("{}minseq/{namespace}/{section:016x}/{id}", self.prefix)
    }

    /// The last path element of `key` (a node or namespace name).
    pub fn leaf(key: &str) -> &str {
        key.rsplit('/').next().unwrap_or(key)
    }
}
