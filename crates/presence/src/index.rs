//! The uid index of a shard: an open-addressing hash table that stores only record indices.
//!
//! A bucket is one `u32`: the record index in the low [`INDEX_BITS`] bits and a 7-bit
//! fingerprint of the uid's hash in the high bits ([`EMPTY`] marks a free bucket). The key is
//! not stored: it is the `uid` of the record the bucket points to, read back when a
//! fingerprint matches (1 in 128 for a foreign uid, so a lookup that finds nothing reads about
//! 0.1 records on average). That is 4 bytes per bucket, against 13 for a
//! `HashMap<u64-ish, u32>` entry and its control byte.
//!
//! ```text
//!  uid ──mix64──► hash ──high bits (fastrange)──► home bucket ──linear probe──► EMPTY
//!                     └──low 7 bits──► fingerprint, compared before touching a record
//! ```
//!
//! - **Multimap**: every session of a uid has its own bucket; they sit in the probe run that
//!   starts at the uid's home bucket, so the sessions of a uid are found by one probe to the
//!   next empty bucket. There is no per-uid chain.
//! - **Load factor**: at most 7/8, and the table grows by 1/4 (not 2x; the fastrange home
//!   computation allows any size), so the load stays between 0.7 and 0.875 and an index
//!   costs about 5 bytes per session. A probe to the next empty bucket reads about 16
//!   contiguous `u32`s at that load: one or two cache lines.
//! - **Growth** rebuilds the table from the shard's live records in slab order (a sequential
//!   scan), not from the old buckets (one random record read per entry to recover its key).
//! - **Deletion** shifts the following entries of the run back (no tombstones), so probe runs
//!   never degrade under churn.
//! - Capacity is kept when sessions leave (reused, not returned).

use crate::hash::mix64;

/// Bits of a bucket that hold the record index; the other 7 hold the fingerprint.
pub(crate) const INDEX_BITS: u32 = 25;
/// Records one shard can hold (its record index space), including removed records still
/// waiting in the timing wheel: 2^25 - 1, about 33.5 million (2.1 billion with the default
/// 64 shards). The named limit behind [`crate::PresenceError::ShardFull`].
pub(crate) const RECORDS_MAX: u32 = (1 << INDEX_BITS) - 1;
/// A free bucket (index bits all ones: never a record index).
pub(crate) const EMPTY: u32 = u32::MAX;
const INDEX_MASK: u32 = (1 << INDEX_BITS) - 1;
const FINGERPRINT_MASK: u64 = (1 << (32 - INDEX_BITS)) - 1;
const CAPACITY_MIN: usize = 16;

/// The hash of a uid (splitmix64: every bit of the uid reaches every bit of the hash).
pub(crate) fn uid_hash(uid: u64) -> u64 {
    mix64(uid)
}

fn fingerprint(hash: u64) -> u32 {
    ((hash & FINGERPRINT_MASK) as u32) << INDEX_BITS
}

fn home(hash: u64, capacity: usize) -> usize {
    ((u128::from(hash) * capacity as u128) >> 64) as usize
}

/// Record indices by uid. Methods that need the key of a stored index take `uid_of`, which
/// returns the uid of a record.
#[derive(Debug, Default)]
pub(crate) struct UidIndex {
    buckets: Box<[u32]>,
    len: usize,
}

/// The record indices whose fingerprint matches a uid, in probe order; the caller checks the
/// record's uid.
pub(crate) struct Candidates<'a> {
    buckets: &'a [u32],
    position: usize,
    fingerprint: u32,
    probed: usize,
}

impl Iterator for Candidates<'_> {
    type Item = u32;

    fn next(&mut self) -> Option<u32> {
        while self.probed < self.buckets.len() {
            let bucket = self.buckets[self.position];
            if bucket == EMPTY {
                return None;
            }
            self.probed += 1;
            self.position += 1;
            if self.position == self.buckets.len() {
                self.position = 0;
            }
            if bucket & !INDEX_MASK == self.fingerprint {
                return Some(bucket & INDEX_MASK);
            }
        }
        None
    }
}

impl UidIndex {
    /// Entries stored.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Buckets allocated.
    pub(crate) fn capacity(&self) -> usize {
        self.buckets.len()
    }

    /// Record indices that may belong to `uid` (see [`Candidates`]).
    pub(crate) fn candidates(&self, uid: u64) -> Candidates<'_> {
        let hash = uid_hash(uid);
        let position = if self.buckets.is_empty() {
            0
        } else {
            home(hash, self.buckets.len())
        };
        Candidates {
            buckets: &self.buckets,
            position,
            fingerprint: fingerprint(hash),
            probed: 0,
        }
    }

    /// Hints the CPU to load the home bucket of `uid` (see [`crate::prefetch`]).
    pub(crate) fn prefetch(&self, uid: u64) {
        if !self.buckets.is_empty() {
            let home = home(uid_hash(uid), self.buckets.len());
            crate::prefetch::prefetch(self.buckets.as_ptr().wrapping_add(home));
        }
    }

    /// Every stored record index, in bucket order.
    pub(crate) fn indices(&self) -> impl Iterator<Item = u32> + '_ {
        self.buckets
            .iter()
            .filter(|&&bucket| bucket != EMPTY)
            .map(|&bucket| bucket & INDEX_MASK)
    }

    /// The capacity to grow to before `additional` more entries are inserted, if the load
    /// factor requires growth: by a quarter, or more if `additional` needs it.
    pub(crate) fn growth_for(&self, additional: usize) -> Option<usize> {
        let needed = self.len + additional;
        if needed * 8 <= self.buckets.len() * 7 {
            return None;
        }
        let grown = (self.buckets.len() + self.buckets.len() / 4).max(CAPACITY_MIN);
        Some(grown.max(needed * 8 / 7 + 1))
    }

    /// Replaces the table by one of `capacity` buckets holding exactly `entries`, given as
    /// (record index, uid). The shard passes its live records in slab order: a sequential
    /// scan, instead of one random record read per entry to recover its key.
    pub(crate) fn rebuild(&mut self, capacity: usize, entries: impl Iterator<Item = (u32, u64)>) {
        let mut buckets = vec![EMPTY; capacity].into_boxed_slice();
        let mut len = 0;
        for (index, uid) in entries {
            let hash = uid_hash(uid);
            Self::place(&mut buckets, hash, fingerprint(hash) | index);
            len += 1;
        }
        debug_assert!(len * 8 <= capacity * 7);
        self.buckets = buckets;
        self.len = len;
    }

    /// Adds `index`, a record of `uid`. The caller guarantees `index < RECORDS_MAX` and made
    /// room first ([`Self::growth_for`] returned `None`).
    pub(crate) fn insert(&mut self, uid: u64, index: u32) {
        debug_assert!(index < RECORDS_MAX);
        debug_assert!(self.growth_for(1).is_none(), "insert without room");
        let hash = uid_hash(uid);
        Self::place(&mut self.buckets, hash, fingerprint(hash) | index);
        self.len += 1;
    }

    /// Removes `index`, a record of `uid`; returns whether it was present. `prefetch` is
    /// called with the record index of every entry after it in its probe run before any of
    /// their uids is read (`uid_of`): the backward shift needs each one's home, and issuing
    /// those cache misses together instead of one after the other made removal (a login that
    /// replaces a session) 10% of a login-heavy node's CPU.
    pub(crate) fn remove(
        &mut self,
        uid: u64,
        index: u32,
        uid_of: impl Fn(u32) -> u64,
        prefetch: impl Fn(u32),
    ) -> bool {
        let capacity = self.buckets.len();
        if capacity == 0 {
            return false;
        }
        let hash = uid_hash(uid);
        let wanted = fingerprint(hash) | index;
        let mut hole = home(hash, capacity);
        let mut probed = 0;
        loop {
            let bucket = self.buckets[hole];
            if bucket == EMPTY || probed == capacity {
                return false;
            }
            if bucket == wanted {
                break;
            }
            hole = (hole + 1) % capacity;
            probed += 1;
        }
        // The rest of the run, whose records the shift reads: ask for them all at once.
        let mut ahead = (hole + 1) % capacity;
        for _ in 0..capacity {
            let bucket = self.buckets[ahead];
            if bucket == EMPTY {
                break;
            }
            prefetch(bucket & INDEX_MASK);
            ahead = (ahead + 1) % capacity;
        }
        // Backward shift: move later entries of the run into the hole when their home allows.
        let mut next = (hole + 1) % capacity;
        loop {
            let bucket = self.buckets[next];
            if bucket == EMPTY {
                break;
            }
            let entry_home = home(uid_hash(uid_of(bucket & INDEX_MASK)), capacity);
            let distance_home = (next + capacity - entry_home) % capacity;
            let distance_hole = (next + capacity - hole) % capacity;
            if distance_home >= distance_hole {
                self.buckets[hole] = bucket;
                hole = next;
            }
            next = (next + 1) % capacity;
        }
        self.buckets[hole] = EMPTY;
        self.len -= 1;
        true
    }

    fn place(buckets: &mut [u32], hash: u64, bucket: u32) {
        let capacity = buckets.len();
        let mut position = home(hash, capacity);
        while buckets[position] != EMPTY {
            position += 1;
            if position == capacity {
                position = 0;
            }
        }
        buckets[position] = bucket;
    }

    /// Checks that every entry is reachable from its home bucket with the right fingerprint
    /// (invariant checks; O(capacity)).
    pub(crate) fn check(&self, uid_of: impl Fn(u32) -> u64) -> Result<(), String> {
        let stored = self.indices().count();
        if stored != self.len {
            return Err(format!("uid index counts {} but holds {stored}", self.len));
        }
        if self.len * 8 > self.buckets.len() * 7 {
            return Err("uid index is over its load factor".into());
        }
        for index in self.indices() {
            let uid = uid_of(index);
            if !self.candidates(uid).any(|found| found == index) {
                return Err(format!(
                    "uid index cannot reach record {index} of uid {uid}"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn finds_every_entry_through_growth_and_backward_shift_deletion() {
        // uid of record i: i / 3, so every uid has up to three records.
        let uid_of = |index: u32| u64::from(index / 3);
        let mut index = UidIndex::default();
        for record in 0..3_000u32 {
            if let Some(capacity) = index.growth_for(1) {
                index.rebuild(capacity, (0..record).map(|other| (other, uid_of(other))));
            }
            index.insert(uid_of(record), record);
        }
        index.check(uid_of).unwrap();
        let found = |index: &UidIndex, uid: u64| {
            let mut found: Vec<u32> = index
                .candidates(uid)
                .filter(|&record| uid_of(record) == uid)
                .collect();
            found.sort();
            found
        };
        assert_eq!(found(&index, 7), vec![21, 22, 23]);
        let mut live: HashMap<u64, Vec<u32>> = HashMap::new();
        for record in 0..3_000u32 {
            if record % 2 == 0 {
                assert!(index.remove(uid_of(record), record, uid_of, |_| {}));
            } else {
                live.entry(uid_of(record)).or_default().push(record);
            }
        }
        assert!(
            !index.remove(uid_of(4), 4, uid_of, |_| {}),
            "already removed"
        );
        index.check(uid_of).unwrap();
        assert_eq!(index.len(), 1_500);
        for uid in 0..1_000 {
            let expected = live.get(&uid).cloned().unwrap_or_default();
            assert_eq!(found(&index, uid), expected, "uid {uid}");
        }
        // Load stays within [0.7, 0.875] after growth by a quarter.
        assert!(index.capacity() * 7 >= 3_000 * 8 && index.capacity() * 7 <= 3_000 * 8 * 5 / 4);
        let capacity = index.capacity();
        index.rebuild(
            capacity,
            (0..3_000).filter(|r| r % 2 == 1).map(|r| (r, uid_of(r))),
        );
        index.check(uid_of).unwrap();
        assert_eq!(found(&index, 7), vec![21, 23]);
    }
}
