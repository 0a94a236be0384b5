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
        }
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
    fn section_count_rounds_up_partial_last_section() {
        let def = NamespaceDef {
            name: "n".into(),
            id_lo: 10,
            id_hi: 21,
            section_size: 5,
            step: 1,
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
