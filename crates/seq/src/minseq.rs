//! `min_seq`: the per-id floor below which a conversation's history is hidden (OpenIM's
//! `SetMinSeq`/`GetMinSeq`), kept durable by the caller's log.
//!
//! ```text
//!  set: Allocator::prepare_min_seqs (validate: kind, limits, min_seq <= current seq)
//!         └─► caller appends the record (LSN) ──► stage(lsn, …) ──► log durable ──► commit(lsn)
//!  get: visible values only (committed)          checkpoint: snapshot() = visible + staged
//! ```
//!
//! Invariants:
//! - A value is visible to readers only after its record is durable (`commit`), so a reader
//!   never sees a `min_seq` that a crash could take back.
//! - Staged batches commit in LSN order, so the visible state is the log's order of sets.
//! - `snapshot` includes staged batches: a checkpoint may carry a set whose record is after its
//!   covered LSN, which replay then applies again in order (last set wins), as for raises.
//! - Sparse: only ids with a non-zero `min_seq` are held; setting 0 removes the entry. At most
//!   [`MIN_SEQS_MAX`] entries (B1).

use std::collections::VecDeque;

use rustc_hash::FxHashMap;

use crate::NsId;

/// Most ids with a non-zero `min_seq` held by one node (B1). A set that would hold more gets
/// [`crate::SeqError::MinSeqsExhausted`].
pub const MIN_SEQS_MAX: usize = 1 << 24;

/// An id of a `min_seq` entry: a numeric id or a string key.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum OwnedId {
    /// A numeric namespace's id.
    Id(u64),
    /// A keyed namespace's key.
    Key(Box<[u8]>),
}

/// The `min_seq` entries of one set: `(id, min_seq)` in request order.
pub type MinSeqEntries = Vec<(OwnedId, u64)>;

/// The `min_seq` state (see the module documentation).
#[derive(Debug, Default)]
pub struct MinSeqs {
    visible: FxHashMap<(NsId, OwnedId), u64>,
    /// Sets whose record is appended but not yet durable, in LSN order.
    staged: VecDeque<(u64, NsId, MinSeqEntries)>,
}

impl MinSeqs {
    /// Returns the visible `min_seq` of an id (0 if none).
    pub fn get(&self, ns: NsId, id: &OwnedId) -> u64 {
        // A lookup needs an owned key; ids are small, so the clone is cheap.
        self.visible.get(&(ns, id.clone())).copied().unwrap_or(0)
    }

    /// Returns the number of ids with a visible non-zero `min_seq`.
    pub fn len(&self) -> usize {
        self.visible.len()
    }

    /// Returns whether no id has a visible `min_seq`.
    pub fn is_empty(&self) -> bool {
        self.visible.is_empty()
    }

    /// Holds a set whose record was appended at `lsn` until [`MinSeqs::commit`].
    pub fn stage(&mut self, lsn: u64, ns: NsId, entries: MinSeqEntries) {
        self.staged.push_back((lsn, ns, entries));
    }

    /// Makes every set staged at or below `durable_lsn` visible, in LSN order.
    pub fn commit(&mut self, durable_lsn: u64) {
        while self
            .staged
            .front()
            .is_some_and(|(lsn, _, _)| *lsn <= durable_lsn)
        {
            if let Some((_, ns, entries)) = self.staged.pop_front() {
                self.apply(ns, entries);
            }
        }
    }

    /// Drops every staged set (its record never became durable: the log failed).
    pub fn abandon(&mut self) {
        self.staged.clear();
    }

    /// Applies a set at once (recovery).
    pub fn apply(&mut self, ns: NsId, entries: MinSeqEntries) {
        for (id, value) in entries {
            if value == 0 {
                self.visible.remove(&(ns, id));
            } else {
                self.visible.insert((ns, id), value);
            }
        }
    }

    /// Returns whether `new_entries` more ids could be held (counting staged ones).
    pub(crate) fn has_room(&self, new_entries: usize) -> bool {
        let staged: usize = self
            .staged
            .iter()
            .map(|(_, _, entries)| entries.len())
            .sum();
        self.visible.len() + staged + new_entries <= MIN_SEQS_MAX
    }

    /// Every entry to persist in a checkpoint: the visible ones with the staged sets applied
    /// in order, sorted.
    pub fn snapshot(&self) -> Vec<(NsId, OwnedId, u64)> {
        let mut all = self.visible.clone();
        for (_, ns, entries) in &self.staged {
            for (id, value) in entries {
                if *value == 0 {
                    all.remove(&(*ns, id.clone()));
                } else {
                    all.insert((*ns, id.clone()), *value);
                }
            }
        }
        let mut entries: Vec<(NsId, OwnedId, u64)> = all
            .into_iter()
            .map(|((ns, id), value)| (ns, id, value))
            .collect();
        entries.sort_unstable();
        entries
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn staged_sets_become_visible_in_lsn_order_and_only_when_durable() {
        let mut min = MinSeqs::default();
        let a = OwnedId::Id(7);
        let k = OwnedId::Key(b"si_1_2".to_vec().into_boxed_slice());
        min.stage(5, 0, vec![(a.clone(), 10), (k.clone(), 3)]);
        min.stage(6, 0, vec![(a.clone(), 20)]);
        assert_eq!(min.get(0, &a), 0, "nothing visible before it is durable");
        assert_eq!(min.snapshot().len(), 2, "a checkpoint carries staged sets");
        assert_eq!(min.snapshot()[0], (0, a.clone(), 20));
        min.commit(5);
        assert_eq!((min.get(0, &a), min.get(0, &k)), (10, 3));
        min.commit(9);
        assert_eq!(min.get(0, &a), 20);
        // Setting 0 removes the entry.
        min.stage(10, 0, vec![(k.clone(), 0)]);
        min.commit(10);
        assert_eq!(min.get(0, &k), 0);
        assert_eq!(min.len(), 1);
        min.stage(11, 0, vec![(a.clone(), 30)]);
        min.abandon();
        min.commit(11);
        assert_eq!(min.get(0, &a), 20);
        assert_eq!(min.get(1, &a), 0, "namespaces are separate");
    }
}
