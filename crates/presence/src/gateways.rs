//! The shared gateway interner: gateway name <-> compact `u32` id, with ids reclaimed.
//!
//! Sessions store a 2-byte id instead of a name (the public [`GatewayId`] is a `u32`). Gateways are few (hundreds to a few
//! thousand) and created rarely, so one `RwLock` shared by all shards is enough: logins take
//! the read lock on the fast path (name already known) and the write lock only for a new name.
//! Lookups never touch it: every shard keeps its own copy of the names it uses.
//!
//! Invariants:
//! - an id is bound to one name from [`Gateways::intern`] until [`Gateways::release_unused`]
//!   frees it, and it is freed only when no session and no lease holds it (the caller proves
//!   that by holding every shard lock and the lease lock, see
//!   [`crate::ShardedRegistry::reclaim_gateways`]); a freed id may then be bound to another
//!   name, so an id held by a live record is always the id of that record's gateway;
//! - at most `gateways_max` names are bound through operations, at most [`GATEWAY_IDS_MAX`]
//!   through replay; both count names bound now, not names ever seen.
//!
//! Ids are process-local: changes and snapshots carry names, never ids.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::RwLock;

use crate::PresenceError;

/// Compact id of an interned gateway name, valid while a session or lease holds it.
pub type GatewayId = u32;

/// Hard ceiling on gateway names bound at once: a session record stores the id in 16 bits, so
/// at most 65,536 names (ids `0..=65_535`) can be bound in one registry, even on replay.
/// Beyond it, interning fails with [`PresenceError::GatewaysExceeded`] naming this maximum.
pub const GATEWAY_IDS_MAX: usize = 1 << 16;

/// Ceiling of the configurable `gateways_max`: half the id space, so that replay, which may
/// hold a few more names at once than the live node did (shards replay at their own pace),
/// always has room.
pub const GATEWAYS_MAX_LIMIT: usize = GATEWAY_IDS_MAX / 2;

/// The gateway name interner shared by the shards of one registry.
#[derive(Debug)]
pub struct Gateways {
    inner: RwLock<Names>,
    /// The configured `gateways_max`; checked only when a new name is interned by an op.
    gateways_max: usize,
    /// Set when a gateway may have become unused (a shard's last session of it went, or its
    /// lease ended): a reclaim scan is worth its cost only then.
    maybe_unused: AtomicBool,
}

#[derive(Debug, Default)]
struct Names {
    by_name: HashMap<Arc<str>, GatewayId>,
    /// By id; `None` for a freed id (then also in `free`).
    names: Vec<Option<Arc<str>>>,
    free: Vec<GatewayId>,
}

impl Gateways {
    /// Creates an empty interner that accepts up to `gateways_max` names from operations.
    pub fn new(gateways_max: usize) -> Self {
        Self {
            inner: RwLock::new(Names::default()),
            gateways_max,
            maybe_unused: AtomicBool::new(false),
        }
    }

    /// Returns the id of `name` if it is interned.
    pub fn get(&self, name: &str) -> Option<GatewayId> {
        self.inner.read().by_name.get(name).copied()
    }

    /// Returns the name of `id`, `None` when the id is free or was never handed out.
    pub fn name(&self, id: GatewayId) -> Option<Arc<str>> {
        self.inner.read().names.get(id as usize).cloned().flatten()
    }

    /// Number of names bound now.
    pub fn len(&self) -> usize {
        self.inner.read().by_name.len()
    }

    /// Whether no name is bound.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// One past the highest id ever handed out: the size of a per-id table.
    pub fn id_bound(&self) -> usize {
        self.inner.read().names.len()
    }

    /// Interns `name`, refusing a new name beyond `gateways_max` names bound.
    pub fn intern(&self, name: &str) -> Result<GatewayId, PresenceError> {
        self.intern_with_limit(name, self.gateways_max)
    }

    /// Interns `name` for replay: only the hard ceiling applies, because the op that produced
    /// the change was validated when it ran.
    pub(crate) fn intern_unbounded(&self, name: &str) -> Result<GatewayId, PresenceError> {
        self.intern_with_limit(name, GATEWAY_IDS_MAX)
    }

    fn intern_with_limit(&self, name: &str, max: usize) -> Result<GatewayId, PresenceError> {
        if let Some(id) = self.get(name) {
            return Ok(id);
        }
        let mut names = self.inner.write();
        if let Some(id) = names.by_name.get(name) {
            return Ok(*id);
        }
        if names.by_name.len() >= max {
            return Err(PresenceError::GatewaysExceeded {
                gateway: name.to_owned(),
                max,
            });
        }
        let shared: Arc<str> = Arc::from(name);
        let id = match names.free.pop() {
            Some(id) => {
                names.names[id as usize] = Some(shared.clone());
                id
            }
            None => {
                names.names.push(Some(shared.clone()));
                (names.names.len() - 1) as GatewayId
            }
        };
        names.by_name.insert(shared, id);
        Ok(id)
    }

    /// Notes that a gateway may have become unused (see [`Self::take_maybe_unused`]).
    pub(crate) fn note_maybe_unused(&self) {
        if !self.maybe_unused.load(Ordering::Relaxed) {
            self.maybe_unused.store(true, Ordering::Relaxed);
        }
    }

    /// Whether a gateway may have become unused since the last [`Self::take_maybe_unused`].
    pub fn maybe_unused(&self) -> bool {
        self.maybe_unused.load(Ordering::Relaxed)
    }

    /// Clears the hint and returns whether it was set.
    pub(crate) fn take_maybe_unused(&self) -> bool {
        self.maybe_unused.swap(false, Ordering::Relaxed)
    }

    /// Frees every bound id whose entry in `in_use` (indexed by id, at least
    /// [`Self::id_bound`] long) is false, returning the freed ids.
    ///
    /// Contract: the caller guarantees that no session or lease holds a freed id and that
    /// none can be created meanwhile (it holds every shard lock and the lease lock).
    pub(crate) fn release_unused(&self, in_use: &[bool]) -> Vec<GatewayId> {
        let mut names = self.inner.write();
        let Names {
            by_name,
            names,
            free,
        } = &mut *names;
        let mut freed = Vec::new();
        for (id, slot) in names.iter_mut().enumerate() {
            if slot.is_some() && !in_use.get(id).copied().unwrap_or(true) {
                let name = slot.take().expect("checked above");
                by_name.remove(&name);
                free.push(id as GatewayId);
                freed.push(id as GatewayId);
            }
        }
        freed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interning_is_stable_and_bounded() {
        let gateways = Gateways::new(2);
        let a = gateways.intern("gw-a").unwrap();
        assert_eq!(gateways.intern("gw-a").unwrap(), a);
        let b = gateways.intern("gw-b").unwrap();
        assert_ne!(a, b);
        let err = gateways.intern("gw-c").unwrap_err();
        assert!(matches!(
            err,
            PresenceError::GatewaysExceeded { max: 2, .. }
        ));
        assert_eq!(gateways.len(), 2);
        assert_eq!(gateways.intern_unbounded("gw-c").unwrap(), 2);
        assert_eq!(gateways.name(b).as_deref(), Some("gw-b"));
    }

    #[test]
    fn released_ids_are_unbound_and_reused_for_new_names() {
        let gateways = Gateways::new(2);
        let a = gateways.intern("gw-a").unwrap();
        let b = gateways.intern("gw-b").unwrap();
        let mut in_use = vec![true; gateways.id_bound()];
        in_use[a as usize] = false;
        assert_eq!(gateways.release_unused(&in_use), vec![a]);
        assert_eq!(gateways.get("gw-a"), None);
        assert_eq!(gateways.name(a), None);
        assert_eq!(gateways.len(), 1);
        // The limit counts names bound now: a third name fits, and takes the freed id.
        assert_eq!(gateways.intern("gw-c").unwrap(), a);
        assert_eq!(gateways.name(a).as_deref(), Some("gw-c"));
        assert_eq!(gateways.name(b).as_deref(), Some("gw-b"));
        assert_eq!(gateways.id_bound(), 2);
    }
}
