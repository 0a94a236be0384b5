//! Presence slots as a replica sees them: which uids a replication stream concerns.
//!
//! In cluster mode a uid belongs to slot `uid % count` (`presence.slots`); a replica follows
//! some slot ranges of a primary. [`SlotSet`] is that set of slots, as a bitmap (at most
//! 65,536 slots: 8 KiB), so testing a uid is a division and a bit test.

/// A set of presence slots out of `count`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotSet {
    count: u32,
    bits: Vec<u64>,
}

impl SlotSet {
    /// No slot of `count`.
    pub fn empty(count: u32) -> Self {
        Self {
            count,
            bits: vec![0; (count as usize).div_ceil(64)],
        }
    }

    /// Every slot of `count`.
    pub fn all(count: u32) -> Self {
        let mut set = Self::empty(count);
        set.insert_range(0, count);
        set
    }

    /// The slots of `ranges` (`[start, end)` each, clamped to `count`).
    pub fn from_ranges(count: u32, ranges: &[(u32, u32)]) -> Self {
        let mut set = Self::empty(count);
        for &(start, end) in ranges {
            set.insert_range(start, end);
        }
        set
    }

    /// Adds slots `[start, end)` (clamped to the count).
    pub fn insert_range(&mut self, start: u32, end: u32) {
        for slot in start..end.min(self.count) {
            self.bits[slot as usize / 64] |= 1 << (slot % 64);
        }
    }

    /// Removes every slot of `other` (out of the same count) from this set.
    pub fn remove_all(&mut self, other: &SlotSet) {
        for (word, theirs) in self.bits.iter_mut().zip(&other.bits) {
            *word &= !theirs;
        }
    }

    /// Adds every slot of `other` (out of the same count) to this set.
    pub fn insert_all(&mut self, other: &SlotSet) {
        for (word, theirs) in self.bits.iter_mut().zip(&other.bits) {
            *word |= theirs;
        }
    }

    /// Whether every slot of this set is in `other` (and both count the same slots).
    pub fn is_subset_of(&self, other: &SlotSet) -> bool {
        self.count == other.count
            && self
                .bits
                .iter()
                .zip(&other.bits)
                .all(|(mine, theirs)| mine & !theirs == 0)
    }

    /// The set as ranges `[start, end)`, in order.
    pub fn ranges(&self) -> Vec<(u32, u32)> {
        let mut ranges: Vec<(u32, u32)> = Vec::new();
        for slot in (0..self.count).filter(|slot| self.has_slot(*slot)) {
            match ranges.last_mut() {
                Some(last) if last.1 == slot => last.1 = slot + 1,
                _ => ranges.push((slot, slot + 1)),
            }
        }
        ranges
    }

    /// Keeps only the slots also in `other` (out of the same count).
    pub fn retain_all(&mut self, other: &SlotSet) {
        for (word, theirs) in self.bits.iter_mut().zip(&other.bits) {
            *word &= theirs;
        }
    }

    /// The slot count this set is out of.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// Whether slot `slot` is in the set.
    pub fn has_slot(&self, slot: u32) -> bool {
        slot < self.count && self.bits[slot as usize / 64] & (1 << (slot % 64)) != 0
    }

    /// Whether `uid`'s slot (`uid % count`) is in the set.
    pub fn contains(&self, uid: u64) -> bool {
        self.count != 0 && self.has_slot((uid % u64::from(self.count)) as u32)
    }

    /// Slots in the set.
    pub fn len(&self) -> u32 {
        self.bits.iter().map(|word| word.count_ones()).sum()
    }

    /// Whether the set has no slot.
    pub fn is_empty(&self) -> bool {
        self.bits.iter().all(|word| *word == 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_select_uids_by_their_slot() {
        let set = SlotSet::from_ranges(10, &[(2, 4), (9, 12)]);
        assert_eq!(set.len(), 3);
        assert!(set.contains(2) && set.contains(13) && set.contains(29));
        assert!(!set.contains(4) && !set.contains(10));
        assert!(SlotSet::all(70).contains(u64::MAX));
        assert!(SlotSet::empty(70).is_empty());
        let mut union = SlotSet::from_ranges(10, &[(0, 1)]);
        union.insert_all(&set);
        assert_eq!(union.len(), 4);
        assert!(set.is_subset_of(&union) && !union.is_subset_of(&set));
        assert!(!set.is_subset_of(&SlotSet::all(11)), "another count");
        assert_eq!(union.ranges(), vec![(0, 1), (2, 4), (9, 10)]);
        union.retain_all(&SlotSet::from_ranges(10, &[(3, 10)]));
        assert_eq!(union.ranges(), vec![(3, 4), (9, 10)]);
        assert!(!SlotSet::empty(0).contains(0));
        let mut rest = SlotSet::all(10);
        rest.remove_all(&set);
        assert_eq!(rest.len(), 7);
        assert!(!rest.contains(3) && rest.contains(4));
    }
}
