//! The shared gateway interner: gateway name <-> compact `u32` id.
//!
//! Sessions store a 2-byte id instead of a name (the public [`GatewayId`] is a `u32`). Gateways are few (hundreds to a few
//! thousand) and created rarely, so one `RwLock` shared by all shards is enough: logins take
//! the read lock on the fast path (name already known) and the write lock only for a new name.
//! Lookups never touch it: every shard keeps its own copy of the names it uses.
//!
//! Invariants: ids are dense (`0..len`), never reused and never reassigned, so an id held by a
//! session stays valid for the life of the registry; at most `gateways_max` names exist.
//! Ids are process-local: changes and snapshots carry names, never ids.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::RwLock;

use crate::PresenceError;

/// Compact id of an interned gateway name, valid for the life of one registry.
pub type GatewayId = u32;

/// Hard ceiling on interned gateway names: a session record stores the id in 16 bits, so at
/// most 65,536 names (ids `0..=65_535`) can ever exist in one registry, even on replay.
/// Beyond it, interning fails with [`PresenceError::GatewaysExceeded`] naming this maximum.
pub const GATEWAY_IDS_MAX: usize = 1 << 16;

/// The gateway name interner shared by the shards of one registry.
#[derive(Debug)]
pub struct Gateways {
    inner: RwLock<Names>,
    /// The configured `gateways_max`; checked only when a new name is interned by an op.
    gateways_max: usize,
}

#[derive(Debug, Default)]
struct Names {
    by_name: HashMap<Arc<str>, GatewayId>,
    names: Vec<Arc<str>>,
}

impl Gateways {
    /// Creates an empty interner that accepts up to `gateways_max` names from operations.
    pub fn new(gateways_max: usize) -> Self {
        Self {
            inner: RwLock::new(Names::default()),
            gateways_max,
        }
    }

    /// Returns the id of `name` if it was interned.
    pub fn get(&self, name: &str) -> Option<GatewayId> {
        self.inner.read().by_name.get(name).copied()
    }

    /// Returns the name of `id`.
    pub fn name(&self, id: GatewayId) -> Option<Arc<str>> {
        self.inner.read().names.get(id as usize).cloned()
    }

    /// Number of interned names.
    pub fn len(&self) -> usize {
        self.inner.read().names.len()
    }

    /// Whether no name was interned yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Interns `name`, refusing a new name beyond `gateways_max`.
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
        if names.names.len() >= max {
            return Err(PresenceError::GatewaysExceeded {
                gateway: name.to_owned(),
                max,
            });
        }
        let id = names.names.len() as GatewayId;
        let shared: Arc<str> = Arc::from(name);
        names.names.push(shared.clone());
        names.by_name.insert(shared, id);
        Ok(id)
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
}
