//! The `MaxSeqStore` seam: where a section's `max_seq` becomes durable, fenced on ownership.
//!
//! The sequence engine (`imstate-node`) serves values only below ceilings a store has
//! acknowledged (S2), and a store acknowledges a ceiling only while the writer still owns the
//! section (S3 for writes). Implementations:
//!
//! - embedded: the node's own sequence log (`imstate_node::seqstore`), where the node owns
//!   every section forever and the fence is always 0;
//! - cluster: a fenced txn on the coordinator (etcd), comparing the writer's membership, the
//!   route table and the section key's revision (`imstate_node::cluster`);
//! - simulated: [`crate::sim::SimMaxSeqStore`], in memory, whose answers a test scripts or
//!   randomizes (durable, stale, fenced, failed, delayed), to drive the engine through every
//!   outcome in a seeded property test.
//!
//! # Contract
//!
//! - [`MaxSeqStore::load`] answers the section's durable ceiling and the fence token the next
//!   [`MaxSeqStore::persist`] of that section must name. Every value any writer served from
//!   the section is at most that ceiling.
//! - [`MaxSeqStore::persist`] resolves [`PersistOutcome::Durable`] only when **every** raise
//!   is durable **and** the writer owned each section (its fence matched) when it was written;
//!   then every raised section's fence is the returned one.
//! - [`PersistOutcome::Stale`]: nothing was written; the writer still owns the sections, but a
//!   fence moved (an earlier raise of its own whose answer was lost, or a late one); the
//!   current ceilings and fences are returned, durable and safe to serve below.
//! - [`PersistOutcome::Fenced`]: nothing was written, or the outcome is unknown; the writer
//!   must not serve above what it already had acknowledged.
//! - [`PersistOutcome::Failed`]: the store failed for good (the log is poisoned); the engine
//!   stops serving.
//! - Raises of one call may be batched into one write (one txn, one fsync).

use std::future::Future;

/// One raise of a section's ceiling, as the engine asks a store to persist it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SectionRaise {
    /// The node-local id of the namespace (what the embedded log records).
    pub ns_id: u32,
    /// The namespace's name (what the coordinator's keys name).
    pub namespace: String,
    /// The section.
    pub section: u64,
    /// The new ceiling.
    pub max_seq: u64,
    /// The fence token as the writer last saw it (0 in the embedded store).
    pub fence: i64,
    /// The writer's tenure of the section when it built the raise (0 in the embedded store).
    /// The cluster store fences on its own membership and route-table revisions instead,
    /// which stand for the same thing; the simulated store compares this.
    pub tenure: u64,
}

/// A section's durable ceiling and the fence token a raise of it must name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ceiling {
    /// The durable ceiling.
    pub max_seq: u64,
    /// The fence token.
    pub fence: i64,
}

/// What became of a persist.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PersistOutcome {
    /// Every ceiling is durable; each section's fence is now `fence`.
    Durable {
        /// The new fence of every raised section.
        fence: i64,
    },
    /// Nothing written; the sections as they are, `(section, ceiling)` of the namespace
    /// raised.
    Stale {
        /// The current ceilings and fences.
        current: Vec<(u64, Ceiling)>,
    },
    /// Nothing written (or unknown): the ownership changed or could not be proven.
    Fenced,
    /// The store failed for good.
    Failed {
        /// Why.
        reason: String,
    },
}

/// Where `max_seq` is kept durably (see the module's contract).
pub trait MaxSeqStore: Send + Sync + 'static {
    /// The section's durable ceiling and fence.
    fn load(
        &self,
        namespace: &str,
        section: u64,
    ) -> impl Future<Output = Result<Ceiling, String>> + Send;
    /// Persists raises of sections of one namespace.
    fn persist(&self, raises: Vec<SectionRaise>) -> impl Future<Output = PersistOutcome> + Send;
}
