//! Ids as a request names them ([`Ids`]: numbers or string keys), and the compact per-section
//! table that holds the `cur_seq` of string keys ([`KeyTable`]).
//!
//! # Key table layout
//!
//! ```text
//!   arena: Vec<u8>   … [len: u8][key: len bytes][cur_seq: u64 LE] [len][key][cur] …
//!                          ^ entry = byte offset (u32)
//!   index: HashTable<u32>  entry offsets, hashed by a mix of the key's FNV-1a hash
//! ```
//!
//! A key costs `1 + len + 8` arena bytes plus 4 bytes of index and 1 control byte (over the
//! table's load factor), with no allocation of its own: about `len + 15` bytes, where a
//! `HashMap<Vec<u8>, u64>` costs a 24-byte `Vec`, an 8-byte value, a heap block for the key and
//! its allocator header. Entries are never removed (a key's `cur_seq` only grows; the whole
//! table goes when its section is unloaded), so an offset stays valid for the table's life.
//!
//! Limit (B1): at most [`KEYS_PER_SECTION_MAX`] keys per section, so offsets fit in `u32`
//! (`2^24 * (1 + 128 + 8)` bytes < 4 GiB).

use hashbrown::HashTable;

use crate::{KEY_BYTES_MAX, NamespaceDef};

/// Most distinct keys one section of a keyed namespace holds (2^24). A request that would add
/// more gets [`crate::SeqError::SectionKeysExhausted`]; spread keys over more sections (a wider
/// id range or smaller `section_size`) to hold more.
pub const KEYS_PER_SECTION_MAX: usize = 1 << 24;

/// An arena grows by `len / ARENA_GROWTH_DIVISOR` bytes (a quarter) when full.
const ARENA_GROWTH_DIVISOR: usize = 4;

/// The ids of one request: numbers of a numeric namespace or keys of a keyed one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ids<'a> {
    /// Numeric ids.
    Numeric(&'a [u64]),
    /// String keys (1 to [`KEY_BYTES_MAX`] bytes each).
    Keys(&'a [Vec<u8>]),
}

impl<'a> Ids<'a> {
    /// Returns the number of ids.
    pub fn len(&self) -> usize {
        match self {
            Ids::Numeric(ids) => ids.len(),
            Ids::Keys(keys) => keys.len(),
        }
    }

    /// Returns whether there are no ids.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Returns the section of the id at `index` in namespace `def` (the caller has validated
    /// the ids against `def`).
    pub fn section_at(&self, def: &NamespaceDef, index: usize) -> u64 {
        match self {
            Ids::Numeric(ids) => def.section_of(ids[index]),
            Ids::Keys(keys) => def.section_of_key(&keys[index]),
        }
    }

    /// Returns the id at `index` as an owned value.
    pub fn owned(&self, index: usize) -> crate::OwnedId {
        match self {
            Ids::Numeric(ids) => crate::OwnedId::Id(ids[index]),
            Ids::Keys(keys) => crate::OwnedId::Key(keys[index].clone().into_boxed_slice()),
        }
    }

    /// Describes the id at `index` for a message: the number, or the key (lossy UTF-8, at
    /// most 128 bytes, so a message stays bounded).
    pub fn describe(&self, index: usize) -> String {
        match self {
            Ids::Numeric(ids) => ids[index].to_string(),
            Ids::Keys(keys) => describe_key(&keys[index]),
        }
    }
}

/// A key for a message: lossy UTF-8 of at most [`KEY_BYTES_MAX`] bytes, quoted.
pub fn describe_key(key: &[u8]) -> String {
    format!(
        "`{}`",
        String::from_utf8_lossy(&key[..key.len().min(KEY_BYTES_MAX)])
    )
}

impl<'a> From<&'a [u64]> for Ids<'a> {
    fn from(ids: &'a [u64]) -> Self {
        Ids::Numeric(ids)
    }
}

impl<'a> From<&'a Vec<u64>> for Ids<'a> {
    fn from(ids: &'a Vec<u64>) -> Self {
        Ids::Numeric(ids)
    }
}

impl<'a, const N: usize> From<&'a [u64; N]> for Ids<'a> {
    fn from(ids: &'a [u64; N]) -> Self {
        Ids::Numeric(ids)
    }
}

impl<'a> From<&'a [Vec<u8>]> for Ids<'a> {
    fn from(keys: &'a [Vec<u8>]) -> Self {
        Ids::Keys(keys)
    }
}

impl<'a> From<&'a Vec<Vec<u8>>> for Ids<'a> {
    fn from(keys: &'a Vec<Vec<u8>>) -> Self {
        Ids::Keys(keys)
    }
}

/// The `cur_seq` of the string keys of one section (see the module documentation).
#[derive(Debug, Default)]
pub(crate) struct KeyTable {
    arena: Vec<u8>,
    index: HashTable<u32>,
}

/// Spreads the FNV hash (whose low bits chose the section, so they are alike for every key of
/// one section) over all 64 bits before the table uses it (SplitMix64's finalizer).
#[inline]
fn table_hash(hash: u64) -> u64 {
    let mut mixed = hash ^ (hash >> 30);
    mixed = mixed.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    mixed ^= mixed >> 27;
    mixed = mixed.wrapping_mul(0x94d0_49bb_1331_11eb);
    mixed ^ (mixed >> 31)
}

/// The key stored at `entry` in `arena`.
#[inline]
fn key_at(arena: &[u8], entry: u32) -> &[u8] {
    let start = entry as usize;
    let len = arena[start] as usize;
    &arena[start + 1..start + 1 + len]
}

impl KeyTable {
    /// Returns the number of keys.
    pub(crate) fn len(&self) -> usize {
        self.index.len()
    }

    /// Returns the entry of `key` (whose FNV hash is `hash`), if present.
    pub(crate) fn find(&self, key: &[u8], hash: u64) -> Option<usize> {
        self.index
            .find(table_hash(hash), |&entry| key_at(&self.arena, entry) == key)
            .map(|&entry| entry as usize)
    }

    /// Returns the entry of `key`, inserting it with `cur_seq` 0 if absent; `None` when the
    /// table already holds [`KEYS_PER_SECTION_MAX`] keys. The key is 1..=128 bytes (checked by
    /// the caller).
    pub(crate) fn find_or_insert(&mut self, key: &[u8], hash: u64) -> Option<usize> {
        if let Some(entry) = self.find(key, hash) {
            return Some(entry);
        }
        if self.index.len() >= KEYS_PER_SECTION_MAX {
            return None;
        }
        // KEYS_PER_SECTION_MAX entries of at most 137 bytes stay below 4 GiB.
        let entry = u32::try_from(self.arena.len()).ok()?;
        let needed = 1 + key.len() + 8;
        if self.arena.capacity() - self.arena.len() < needed {
            // Grow by a quarter, not the doubling `Vec` would do: the arena is most of a key's
            // cost, and a doubled arena is on average a third empty. Amortized O(1) still.
            self.arena
                .reserve_exact(needed.max(self.arena.len() / ARENA_GROWTH_DIVISOR + 64));
        }
        self.arena.push(key.len().min(KEY_BYTES_MAX) as u8);
        self.arena
            .extend_from_slice(&key[..key.len().min(KEY_BYTES_MAX)]);
        self.arena.extend_from_slice(&0u64.to_le_bytes());
        let Self { arena, index } = self;
        index.insert_unique(table_hash(hash), entry, |&entry| {
            table_hash(crate::key_hash(key_at(arena, entry)))
        });
        Some(entry as usize)
    }

    /// Position of the `cur_seq` of the entry at `entry`.
    #[inline]
    fn value_at(&self, entry: usize) -> usize {
        entry + 1 + self.arena[entry] as usize
    }

    /// Returns the stored `cur_seq` of the entry at `entry`.
    pub(crate) fn value(&self, entry: usize) -> u64 {
        let at = self.value_at(entry);
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&self.arena[at..at + 8]);
        u64::from_le_bytes(bytes)
    }

    /// Stores `value` as the `cur_seq` of the entry at `entry`.
    pub(crate) fn set(&mut self, entry: usize, value: u64) {
        let at = self.value_at(entry);
        self.arena[at..at + 8].copy_from_slice(&value.to_le_bytes());
    }

    /// Every stored `cur_seq` (for invariant checks).
    pub(crate) fn values(&self) -> impl Iterator<Item = u64> + '_ {
        self.index.iter().map(|&entry| self.value(entry as usize))
    }

    /// Bytes of memory the table holds (arena and index capacity).
    pub(crate) fn bytes(&self) -> usize {
        self.arena.capacity() + self.index.capacity() * (std::mem::size_of::<u32>() + 1)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::key_hash;

    #[test]
    fn entries_keep_their_values_across_growth_and_find_each_key() {
        let mut table = KeyTable::default();
        let keys: Vec<Vec<u8>> = (0..5_000u32)
            .map(|i| format!("si_{i}_{}", "x".repeat(i as usize % 120)).into_bytes())
            .collect();
        let entries: Vec<usize> = keys
            .iter()
            .map(|key| table.find_or_insert(key, key_hash(key)).unwrap())
            .collect();
        for (value, &entry) in (1..).zip(&entries) {
            table.set(entry, value);
        }
        assert_eq!(table.len(), keys.len());
        for ((value, key), &entry) in (1..).zip(&keys).zip(&entries) {
            assert_eq!(table.find(key, key_hash(key)), Some(entry));
            assert_eq!(table.find_or_insert(key, key_hash(key)), Some(entry));
            assert_eq!(table.value(entry), value);
        }
        assert_eq!(table.len(), keys.len());
        assert_eq!(table.find(b"absent", key_hash(b"absent")), None);
        assert_eq!(table.values().max(), Some(keys.len() as u64));
        // Keys that differ only in length or in their last byte are distinct.
        let a = table.find_or_insert(b"k", key_hash(b"k")).unwrap();
        let b = table.find_or_insert(b"k\0", key_hash(b"k\0")).unwrap();
        assert_ne!(a, b);
        assert_eq!(table.value(b), 0);
    }

    #[test]
    fn ids_describe_and_locate_numbers_and_keys() {
        let def = NamespaceDef {
            name: "conv".into(),
            id_lo: 0,
            id_hi: 100,
            section_size: 10,
            step: 1,
            keys: crate::KeyKind::String,
        };
        let keys = vec![b"sg_1".to_vec(), vec![0xff; 200]];
        let ids = Ids::from(&keys);
        assert_eq!(ids.len(), 2);
        assert_eq!(ids.section_at(&def, 0), def.section_of_key(b"sg_1"));
        assert_eq!(ids.describe(0), "`sg_1`");
        assert_eq!(ids.describe(1).chars().count(), 130);
        let numbers = [5u64, 42];
        assert_eq!(Ids::from(&numbers).section_at(&def, 1), 4);
        assert_eq!(Ids::from(&numbers).describe(1), "42");
    }
}
