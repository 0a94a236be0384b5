//! Namespace definitions: an independent sequence space with its own id range, section size and
//! raise step (like a Leaf `biz_tag`).
//!
//! Invariants of a valid definition (checked by [`NamespaceDef::validate`]):
//! - the name is 1..=[`NAME_BYTES_MAX`] bytes of `[A-Za-z0-9_.-]`;
//! - `id_lo < id_hi` (the range is half-open, `[id_lo, id_hi)`);
//! - `1 <= section_size <= SECTION_SIZE_MAX` (a section's dense `cur_seq` array is
//!   `section_size * 8` bytes, so the size is bounded);
//! - `1 <= step <= STEP_MAX` (so the values of an id outlast any number of restarts).
//!
//! The section of an id is `(id - id_lo) / section_size`; the last section may be partial.
//!
//! # Keyed namespaces
//!
//! A namespace created with [`KeyKind::String`] names its ids with byte strings of 1 to
//! [`KEY_BYTES_MAX`] bytes (`si_1001_1002`, `sg_42`) instead of numbers. A key maps to the
//! *hash slot* `id_lo + fnv1a64(key) % (id_hi - id_lo)` ([`key_hash`], FNV-1a 64-bit over the
//! key's bytes, no length prefix), and the slot to its section exactly as a numeric id does, so
//! sections, ceilings, placement and routing are the same for both kinds. The hash is part of
//! the protocol: every client and node computes it the same way.

use crate::SeqError;

/// Dense index of a namespace inside an [`crate::Allocator`], assigned in creation order.
///
/// It is stable across restarts as long as namespaces are re-added in the same order (the node
/// persists the definitions in order).
pub type NsId = u32;

/// Default number of ids per section (WeChat: 100,000 ids share one `max_seq`).
pub const SECTION_SIZE_DEFAULT: u64 = 100_000;

/// Default distance by which a section's `max_seq` is raised at a time.
pub const STEP_DEFAULT: u64 = 10_000;

/// Largest allowed `section_size`: 2^24 ids, so one section's `cur_seq` array is at most 128 MiB.
pub const SECTION_SIZE_MAX: u64 = 1 << 24;

/// Longest allowed namespace name, in bytes.
pub const NAME_BYTES_MAX: usize = 64;
/// Largest step. Each restart (or move of a section) skips the ids of a section to its
/// ceiling, which can be a step above the last value served, so the 2^64 values of an id last
/// at least 2^32 restarts at this step. A step near 2^64 made a namespace unusable after one
/// restart (`sequence space exhausted` after two values).
pub const STEP_MAX: u64 = 1 << 32;

/// At most `max` bytes of `text`, cut at a character boundary.
pub(crate) fn prefix(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Most namespaces one allocator holds.
pub const NAMESPACES_MAX: usize = 4_096;

/// Longest string key of a keyed namespace, in bytes (keys are 1 to 128 bytes).
pub const KEY_BYTES_MAX: usize = 128;

/// How the ids of a namespace are named.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum KeyKind {
    /// Ids are numbers in `[id_lo, id_hi)`; `cur_seq` is a dense array per section.
    #[default]
    Numeric,
    /// Ids are byte strings of 1 to [`KEY_BYTES_MAX`] bytes, hashed onto `[id_lo, id_hi)`;
    /// `cur_seq` is a compact hash table per section.
    String,
}

impl KeyKind {
    /// The name used in configuration, the CLI and the APIs: `numeric` or `string`.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyKind::Numeric => "numeric",
            KeyKind::String => "string",
        }
    }
}

impl std::str::FromStr for KeyKind {
    type Err = SeqError;

    fn from_str(text: &str) -> Result<Self, SeqError> {
        match text {
            "numeric" | "" => Ok(KeyKind::Numeric),
            "string" => Ok(KeyKind::String),
            other => Err(SeqError::InvalidNamespace(format!(
                "keys `{}` must be `numeric` or `string`",
                prefix(other, 16)
            ))),
        }
    }
}

/// The stable hash of a string key: 64-bit FNV-1a over its bytes (offset basis
/// `0xcbf29ce484222325`, prime `0x100000001b3`, no length prefix). Part of the protocol.
pub fn key_hash(key: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &byte in key {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// Definition of one namespace.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct NamespaceDef {
    /// Name used in requests: 1..=64 bytes of `[A-Za-z0-9_.-]`.
    pub name: String,
    /// First id of the range (inclusive).
    pub id_lo: u64,
    /// End of the id range (exclusive).
    pub id_hi: u64,
    /// Number of adjacent ids that share one persisted `max_seq`.
    pub section_size: u64,
    /// How far a section's `max_seq` is raised at a time.
    pub step: u64,
    /// Numeric ids or string keys (see the module documentation).
    pub keys: KeyKind,
}

impl NamespaceDef {
    /// Returns the namespace every node starts with: `default`, ids `[0, 2^32)`, sections of
    /// 100,000 ids, step 10,000.
    pub fn default_namespace() -> Self {
        Self {
            name: "default".to_owned(),
            id_lo: 0,
            id_hi: 1 << 32,
            section_size: SECTION_SIZE_DEFAULT,
            step: STEP_DEFAULT,
            keys: KeyKind::Numeric,
        }
    }

    /// Returns whether ids are string keys.
    pub fn is_keyed(&self) -> bool {
        self.keys == KeyKind::String
    }

    /// Returns the hash slot (a numeric id in `[id_lo, id_hi)`) of a string key whose
    /// [`key_hash`] is `hash`; the caller has a valid definition.
    pub fn slot_of_hash(&self, hash: u64) -> u64 {
        self.id_lo + hash % (self.id_hi - self.id_lo).max(1)
    }

    /// Returns the section of a string key whose [`key_hash`] is `hash`.
    pub fn section_of_hash(&self, hash: u64) -> u64 {
        self.section_of(self.slot_of_hash(hash))
    }

    /// Returns the section a string key belongs to.
    pub fn section_of_key(&self, key: &[u8]) -> u64 {
        self.section_of_hash(key_hash(key))
    }

    /// Checks the definition; the error says which rule is broken.
    pub fn validate(&self) -> Result<(), SeqError> {
        let invalid = |reason: String| Err(SeqError::InvalidNamespace(reason));
        if self.name.is_empty() || self.name.len() > NAME_BYTES_MAX {
            // Never echo the whole of an over-long name: only what a name may hold.
            return invalid(format!(
                "name `{}` must be 1..={NAME_BYTES_MAX} bytes, is {}",
                prefix(&self.name, NAME_BYTES_MAX),
                self.name.len()
            ));
        }
        let allowed = |byte: u8| byte.is_ascii_alphanumeric() || b"_.-".contains(&byte);
        if !self.name.bytes().all(allowed) {
            return invalid(format!("name `{}` must only use [A-Za-z0-9_.-]", self.name));
        }
        if self.id_lo >= self.id_hi {
            return invalid(format!(
                "namespace `{}`: id_lo {} must be below id_hi {}",
                self.name, self.id_lo, self.id_hi
            ));
        }
        if self.section_size == 0 || self.section_size > SECTION_SIZE_MAX {
            return invalid(format!(
                "namespace `{}`: section_size {} must be in 1..={SECTION_SIZE_MAX}",
                self.name, self.section_size
            ));
        }
        if self.step == 0 || self.step > STEP_MAX {
            return invalid(format!(
                "namespace `{}`: step {} must be in 1..={STEP_MAX} (STEP_MAX)",
                self.name, self.step
            ));
        }
        Ok(())
    }

    /// Returns the number of sections in the id range (the last one may be partial), or 0 for
    /// an invalid definition.
    pub fn section_count(&self) -> u64 {
        if self.id_lo >= self.id_hi || self.section_size == 0 {
            return 0;
        }
        (self.id_hi - self.id_lo - 1) / self.section_size + 1
    }

    /// Returns the section holding `id`; the caller has checked that `id` is in range.
    pub fn section_of(&self, id: u64) -> u64 {
        (id - self.id_lo) / self.section_size
    }

    /// Returns the offset of `id` inside its section; the caller has checked the range.
    pub(crate) fn offset_of(&self, id: u64) -> usize {
        // section_size <= SECTION_SIZE_MAX (2^24), so the remainder always fits in usize.
        ((id - self.id_lo) % self.section_size) as usize
    }

    /// Returns the number of ids in `section` (the last section may be partial).
    pub(crate) fn section_len(&self, section: u64) -> usize {
        let start = self
            .id_lo
            .saturating_add(section.saturating_mul(self.section_size));
        let len = self.id_hi.saturating_sub(start).min(self.section_size);
        // len <= section_size <= SECTION_SIZE_MAX (2^24), so it always fits in usize.
        len as usize
    }

    /// Returns whether `id` is inside `[id_lo, id_hi)`.
    pub fn contains(&self, id: u64) -> bool {
        (self.id_lo..self.id_hi).contains(&id)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn default_namespace_is_valid_with_42950_sections() {
        let def = NamespaceDef::default_namespace();
        assert_eq!(def.validate(), Ok(()));
        assert_eq!(def.section_count(), 42_950);
        assert_eq!(def.section_len(42_949), (1u64 << 32) as usize % 100_000);
        assert_eq!(def.section_len(0), 100_000);
    }

    #[test]
    fn validate_rejects_bad_names_ranges_sizes_and_steps() {
        let good = NamespaceDef::default_namespace();
        let cases = [
            NamespaceDef {
                name: String::new(),
                ..good.clone()
            },
            NamespaceDef {
                name: "x".repeat(65),
                ..good.clone()
            },
            NamespaceDef {
                name: "a b".into(),
                ..good.clone()
            },
            NamespaceDef {
                id_lo: 5,
                id_hi: 5,
                ..good.clone()
            },
            NamespaceDef {
                section_size: 0,
                ..good.clone()
            },
            NamespaceDef {
                section_size: SECTION_SIZE_MAX + 1,
                ..good.clone()
            },
            NamespaceDef {
                step: 0,
                ..good.clone()
            },
        ];
        for def in cases {
            assert!(
                matches!(def.validate(), Err(SeqError::InvalidNamespace(_))),
                "{def:?}"
            );
        }
        let edge = NamespaceDef {
            name: "a-Z_0.9".repeat(9),
            ..good
        };
        assert_eq!(edge.name.len(), 63);
        assert_eq!(edge.validate(), Ok(()));
    }

    #[test]
    fn key_hash_is_fnv1a_64_and_maps_keys_onto_the_id_range() {
        // Test vectors of the FNV reference (http://www.isthe.com/chongo/tech/comp/fnv/).
        assert_eq!(key_hash(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(key_hash(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(key_hash(b"foobar"), 0x8594_4171_f739_67e8);
        let def = NamespaceDef {
            name: "conv".into(),
            id_lo: 10,
            id_hi: 20,
            section_size: 5,
            step: 1,
            keys: KeyKind::String,
        };
        assert!(def.is_keyed());
        assert_eq!(
            def.slot_of_hash(0xaf63_dc4c_8601_ec8c),
            10 + 0xaf63_dc4c_8601_ec8c % 10
        );
        for key in [&b"si_1_2"[..], b"sg_42", &[0xff; 128]] {
            let slot = def.slot_of_hash(key_hash(key));
            assert!(def.contains(slot));
            assert_eq!(def.section_of_key(key), def.section_of(slot));
        }
        assert_eq!("string".parse::<KeyKind>(), Ok(KeyKind::String));
        assert_eq!("numeric".parse::<KeyKind>(), Ok(KeyKind::Numeric));
        assert!("strings".parse::<KeyKind>().is_err());
    }

    #[test]
    fn section_count_rounds_up_partial_last_section() {
        let def = NamespaceDef {
            name: "n".into(),
            id_lo: 10,
            id_hi: 21,
            section_size: 5,
            step: 1,
            keys: KeyKind::Numeric,
        };
        assert_eq!(def.section_count(), 3);
        assert_eq!(def.section_len(2), 1);
        assert_eq!(def.section_of(20), 2);
        assert_eq!(def.offset_of(17), 2);
        let full = NamespaceDef {
            id_lo: 0,
            id_hi: u64::MAX,
            section_size: 1 << 24,
            ..def
        };
        assert_eq!(full.section_count(), (u64::MAX - 1) / (1 << 24) + 1);
    }
}
