//! The sharded registry: `uid % shards` independent [`Shard`]s, each behind its own mutex.
//!
//! ```text
//!  login / logout / heartbeat / lookup(uid) ──► shard_index(uid) ──► lock that shard only
//!  heartbeat_batch / lookup_batch ──► group by shard ──► lock each shard once
//!  gateway_down / tick ──► one shard at a time, short holds (TICK_VISITS_PER_LOCK)
//!  gateway_register / gateway_heartbeat ──► leases mutex (tiny: gateways are few)
//! ```
//!
//! Why `parking_lot::Mutex` and not a tokio one: every hold is a few microseconds of pure
//! memory work with no await inside, and parking_lot's uncontended lock is one atomic.
//!
//! Ordering for the log: operations on one shard are serialized by its lock, and every change
//! is handed to the [`Journal`] *while that lock is held*, so the journal (the node's WAL and
//! watch stream) sees each shard's changes in exactly the order they were applied. Replay
//! tolerates a reordered heartbeat (applied as a maximum), not a reordered login and logout of
//! the same connection, which is why the hand-off happens under the lock. Replay itself
//! (`apply_change`, `restore`) is not journaled.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::Mutex;

use crate::gateways::{GatewayId, Gateways};
use crate::shard::{check_batch, check_gateway_name, check_ttl};
use crate::snapshot::{self, ProfileCache, RawSection, RestoreStats, SnapshotError};
use crate::{
    Change, Event, GatewayDownOutcome, GatewayLease, HeartbeatBatchOutcome, LoginOutcome,
    LoginRequest, PresenceError, RegistryOptions, Session, SessionRef, Shard, ShardScope, SlotSet,
    TICK_VISITS_PER_LOCK, TickProgress,
};

/// Threads that decode and apply snapshot sections during [`ShardedRegistry::restore`]
/// (fewer on a machine with fewer cores). Two: restore is memory-bound work on independent
/// shards, and a node restarts on small machines too.
pub const RESTORE_THREADS: usize = 2;

/// Sessions a checkpoint copies per hold of a shard lock (about half a millisecond of
/// encoding): a writer of the shard waits for one such step at most.
pub const SNAPSHOT_SESSIONS_PER_LOCK: usize = 4_096;

/// What a mutation hands to the [`Journal`]: an event (which watchers see and whose
/// [`Event::change`] is the log record) or a bare change (heartbeats, gateway leases).
#[derive(Debug, Clone, Copy)]
pub enum Entry<'a> {
    /// A login, logout, expiry, gateway drop or gateway unregistration.
    Event(&'a Event),
    /// A heartbeat or gateway lease change: logged, not watched.
    Change(&'a Change),
}

impl Entry<'_> {
    /// The log record of this entry.
    pub fn change(&self) -> Change {
        match self {
            Entry::Event(event) => event.change(),
            Entry::Change(change) => (*change).clone(),
        }
    }
}

/// Receives every mutation of the registry as it is applied.
///
/// # Contract
///
/// `record` is called under the lock that serializes the mutation (the shard lock, or the
/// gateway lease lock), in apply order. It must be quick, must not block on I/O for long, and
/// must never call back into the registry (that would deadlock). It cannot fail the mutation:
/// the state has already changed; a journal that cannot persist must stop the node.
pub trait Journal: Send + Sync {
    /// Records one mutation.
    fn record(&self, entry: Entry<'_>);
}

/// A journal that drops everything (a registry without a log).
#[derive(Debug, Default)]
pub struct NoJournal;

impl Journal for NoJournal {
    fn record(&self, _entry: Entry<'_>) {}
}

#[derive(Debug, Clone, Copy)]
struct Lease {
    ttl_ms: u32,
    last_heartbeat_ms: u64,
}

/// The presence registry: sessions sharded by uid, a shared gateway interner, gateway leases.
pub struct ShardedRegistry {
    options: RegistryOptions,
    gateways: Arc<Gateways>,
    online: Arc<AtomicU64>,
    shards: Box<[Mutex<Shard>]>,
    leases: Mutex<HashMap<GatewayId, Lease>>,
    journal: Arc<dyn Journal>,
    /// Cluster mode: the slots whose sessions this node may remove on its own (expiry,
    /// gateway drops), the ones it is primary of; `None`: all of them (one node).
    local: parking_lot::RwLock<Option<Arc<SlotSet>>>,
}

impl std::fmt::Debug for ShardedRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardedRegistry")
            .field("options", &self.options)
            .field("online", &self.online_count())
            .finish_non_exhaustive()
    }
}

impl ShardedRegistry {
    /// Creates an empty registry after validating `options`.
    pub fn new(options: RegistryOptions) -> Result<Self, PresenceError> {
        Self::with_journal(options, Arc::new(NoJournal))
    }

    /// Creates an empty registry whose mutations are handed to `journal` (see [`Journal`]).
    pub fn with_journal(
        options: RegistryOptions,
        journal: Arc<dyn Journal>,
    ) -> Result<Self, PresenceError> {
        options.validate()?;
        let gateways = Arc::new(Gateways::new(options.gateways_max));
        let online = Arc::new(AtomicU64::new(0));
        let count = options.shards as u32;
        let shards = (0..count)
            .map(|index| {
                let scope = ShardScope { index, count };
                Mutex::new(Shard::with_parts(
                    options,
                    scope,
                    gateways.clone(),
                    online.clone(),
                ))
            })
            .collect();
        Ok(Self {
            options,
            gateways,
            online,
            shards,
            leases: Mutex::new(HashMap::new()),
            journal,
            local: parking_lot::RwLock::new(None),
        })
    }

    /// The options in force.
    pub fn options(&self) -> &RegistryOptions {
        &self.options
    }

    /// Number of shards.
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// The shard that owns `uid`.
    pub fn shard_index(&self, uid: u64) -> usize {
        (uid % self.shards.len() as u64) as usize
    }

    /// Shard `index`, for callers that must log changes under the shard lock.
    pub fn shard(&self, index: usize) -> Result<&Mutex<Shard>, PresenceError> {
        self.shards
            .get(index)
            .ok_or(PresenceError::ShardOutOfRange {
                shard: index,
                shards: self.shards.len(),
            })
    }

    fn shard_of(&self, uid: u64) -> &Mutex<Shard> {
        &self.shards[self.shard_index(uid)]
    }

    /// The gateway interner.
    pub fn gateways(&self) -> &Arc<Gateways> {
        &self.gateways
    }

    /// See [`Shard::login`].
    pub fn login(
        &self,
        request: &LoginRequest<'_>,
        now_ms: u64,
    ) -> Result<LoginOutcome, PresenceError> {
        self.retry_after_reclaim(|| self.login_once(request, now_ms))
    }

    fn login_once(
        &self,
        request: &LoginRequest<'_>,
        now_ms: u64,
    ) -> Result<LoginOutcome, PresenceError> {
        let mut shard = self.shard_of(request.uid).lock();
        let outcome = shard.login(request, now_ms)?;
        if outcome.refreshed {
            self.journal.record(Entry::Change(&outcome.change()));
        } else {
            self.journal.record(Entry::Event(&outcome.event()));
        }
        drop(shard);
        Ok(outcome)
    }

    /// See [`Shard::logout`]. The log record is `Event::Logout { session }.change()`.
    pub fn logout(&self, uid: u64, conn: u64) -> Result<Session, PresenceError> {
        let mut shard = self.shard_of(uid).lock();
        let session = shard.logout(uid, conn)?;
        let event = Event::Logout { session };
        self.journal.record(Entry::Event(&event));
        drop(shard);
        let Event::Logout { session } = event else {
            unreachable!("built above")
        };
        Ok(session)
    }

    /// See [`Shard::heartbeat`].
    pub fn heartbeat(&self, uid: u64, conn: u64, now_ms: u64) -> Result<Change, PresenceError> {
        let mut shard = self.shard_of(uid).lock();
        let change = shard.heartbeat(uid, conn, now_ms)?;
        self.journal.record(Entry::Change(&change));
        Ok(change)
    }

    /// See [`Shard::heartbeat_batch`]; locks each shard touched once and returns one change
    /// per shard touched.
    pub fn heartbeat_batch(
        &self,
        gateway: &str,
        sessions: &[(u64, u64)],
        now_ms: u64,
    ) -> Result<HeartbeatBatchOutcome, PresenceError> {
        check_gateway_name(gateway)?;
        check_batch(
            "heartbeat_batch_max",
            sessions.len(),
            self.options.heartbeat_batch_max,
        )?;
        let name = gateway;
        let mut outcome = HeartbeatBatchOutcome::default();
        let mut unknown: Vec<usize> = Vec::new();
        for group in self.group_by_shard(sessions.iter().map(|&(uid, _)| uid)) {
            let mut shard = self.shards[group.shard].lock();
            // Resolved under the shard lock: a reclaim cannot rebind the id meanwhile.
            let gateway = self.gateways.get(name);
            let mut refreshed = Vec::with_capacity(group.positions.len());
            for &position in &group.positions {
                let (uid, conn) = sessions[position];
                if shard.heartbeat_on_gateway(gateway, uid, conn, now_ms) {
                    refreshed.push((uid, conn));
                } else {
                    unknown.push(position);
                }
            }
            if !refreshed.is_empty() {
                let change = Change::HeartbeatBatch {
                    at_ms: now_ms,
                    sessions: refreshed,
                };
                self.journal.record(Entry::Change(&change));
                outcome.changes.push(change);
            }
            drop(shard);
        }
        unknown.sort_unstable();
        outcome.unknown = unknown
            .into_iter()
            .map(|position| sessions[position])
            .collect();
        Ok(outcome)
    }

    /// See [`Shard::lookup`].
    pub fn lookup(&self, uid: u64) -> Vec<Session> {
        self.shard_of(uid).lock().lookup(uid)
    }

    /// The sessions of each uid, in request order; locks each shard touched once.
    /// Between 1 and `lookup_ids_max` uids.
    pub fn lookup_batch(&self, uids: &[u64]) -> Result<Vec<Vec<Session>>, PresenceError> {
        check_batch("lookup_ids_max", uids.len(), self.options.lookup_ids_max)?;
        let mut results = vec![Vec::new(); uids.len()];
        for group in self.group_by_shard(uids.iter().copied()) {
            let shard = self.shards[group.shard].lock();
            shard.prefetch_lookups(group.positions.iter().map(|&position| uids[position]));
            for &position in &group.positions {
                shard.lookup_into(uids[position], &mut results[position]);
            }
        }
        Ok(results)
    }

    /// Like [`ShardedRegistry::lookup_batch`], but hands each session, borrowed, to
    /// `visit(position in uids, session)` instead of building `Session`s. The sessions of one
    /// uid come together, newest login first; uids come grouped by shard, not in request order.
    pub fn lookup_batch_visit(
        &self,
        uids: &[u64],
        mut visit: impl FnMut(usize, SessionRef<'_>),
    ) -> Result<(), PresenceError> {
        check_batch("lookup_ids_max", uids.len(), self.options.lookup_ids_max)?;
        for group in self.group_by_shard(uids.iter().copied()) {
            let shard = self.shards[group.shard].lock();
            shard.prefetch_lookups(group.positions.iter().map(|&position| uids[position]));
            for &position in &group.positions {
                shard.visit_sessions(uids[position], |session| visit(position, session));
            }
        }
        Ok(())
    }

    /// Sessions online in the whole registry, O(1).
    pub fn online_count(&self) -> u64 {
        self.online.load(Ordering::Relaxed)
    }

    /// Drops every session of `gateway`, shard by shard, and ends its lease if it had one.
    /// An unknown gateway drops nothing. Cost is proportional to the gateway's sessions.
    pub fn gateway_down(&self, gateway: &str) -> GatewayDownOutcome {
        let mut outcome = GatewayDownOutcome::default();
        let mut leases = self.leases.lock();
        // Resolved under the lease lock: a reclaim cannot rebind the id meanwhile.
        let Some(id) = self.gateways.get(gateway) else {
            return outcome;
        };
        if leases.remove(&id).is_some() {
            self.gateways.note_maybe_unused();
            let event = Event::GatewayUnregister {
                gateway: Arc::from(gateway),
                lapsed: false,
            };
            self.journal.record(Entry::Event(&event));
            outcome.events.push(event);
        }
        drop(leases);
        self.drop_gateway_sessions(gateway, &mut outcome.events);
        outcome
    }

    fn drop_gateway_sessions(&self, gateway: &str, events: &mut Vec<Event>) {
        let local = self.local_scope();
        for shard in self.shards.iter() {
            let mut shard = shard.lock();
            match &local {
                None => {
                    if let Some(event) = shard.gateway_down(gateway) {
                        self.journal.record(Entry::Event(&event));
                        events.push(event);
                    }
                }
                // Only the sessions of slots this node is primary of, each journaled as a
                // logout, so that neither a local replay nor a replica touches other slots.
                Some(local) => {
                    for session in shard.gateway_down_where(gateway, |uid| local.contains(uid)) {
                        let event = Event::Logout { session };
                        self.journal.record(Entry::Event(&event));
                        events.push(event);
                    }
                }
            }
        }
    }

    /// Cluster mode: from now on expiry and gateway drops remove only the sessions of
    /// `slots` (the ones this node is primary of; a replica's copies go when the primary's
    /// records say so); `None`: every session (one node, the default).
    pub fn set_local_scope(&self, slots: Option<SlotSet>) {
        *self.local.write() = slots.map(Arc::new);
    }

    /// The slots this node removes sessions of on its own (`None`: all).
    pub fn local_scope(&self) -> Option<Arc<SlotSet>> {
        self.local.read().clone()
    }

    /// Registers (or re-registers) a gateway lease: unless heartbeated, the gateway and all
    /// its sessions are dropped by the first tick at or after `now_ms + ttl_ms`.
    pub fn gateway_register(
        &self,
        gateway: &str,
        ttl_ms: u32,
        now_ms: u64,
    ) -> Result<Change, PresenceError> {
        check_gateway_name(gateway)?;
        check_ttl(ttl_ms, &self.options)?;
        self.retry_after_reclaim(|| self.gateway_register_once(gateway, ttl_ms, now_ms))
    }

    fn gateway_register_once(
        &self,
        gateway: &str,
        ttl_ms: u32,
        now_ms: u64,
    ) -> Result<Change, PresenceError> {
        // Interned under the lease lock, so that a reclaim never sees the id without its lease.
        let mut leases = self.leases.lock();
        let id = self.gateways.intern(gateway)?;
        leases.insert(
            id,
            Lease {
                ttl_ms,
                last_heartbeat_ms: now_ms,
            },
        );
        let change = Change::GatewayRegister {
            gateway: Arc::from(gateway),
            ttl_ms,
            at_ms: now_ms,
        };
        self.journal.record(Entry::Change(&change));
        Ok(change)
    }

    /// Renews a registered gateway's lease.
    pub fn gateway_heartbeat(&self, gateway: &str, now_ms: u64) -> Result<Change, PresenceError> {
        check_gateway_name(gateway)?;
        let not_registered = || PresenceError::GatewayNotRegistered {
            gateway: gateway.into(),
        };
        let mut leases = self.leases.lock();
        let id = self.gateways.get(gateway).ok_or_else(not_registered)?;
        let lease = leases.get_mut(&id).ok_or_else(not_registered)?;
        lease.last_heartbeat_ms = lease.last_heartbeat_ms.max(now_ms);
        let change = Change::GatewayHeartbeat {
            gateway: Arc::from(gateway),
            at_ms: now_ms,
        };
        self.journal.record(Entry::Change(&change));
        Ok(change)
    }

    /// Registered gateways, sorted by name.
    pub fn gateway_leases(&self) -> Vec<GatewayLease> {
        let leases: Vec<(GatewayId, Lease)> = self
            .leases
            .lock()
            .iter()
            .map(|(&id, &lease)| (id, lease))
            .collect();
        let mut leases: Vec<GatewayLease> = leases
            .into_iter()
            .filter_map(|(id, lease)| {
                Some(GatewayLease {
                    gateway: self.gateways.name(id)?,
                    ttl_ms: lease.ttl_ms,
                    last_heartbeat_ms: lease.last_heartbeat_ms,
                })
            })
            .collect();
        leases.sort_by(|a, b| a.gateway.cmp(&b.gateway));
        leases
    }

    /// Runs all expiry due at `now_ms`: lapsed gateway leases first ([`Self::tick_gateways`]),
    /// then every shard in steps of [`TICK_VISITS_PER_LOCK`] visits, releasing the shard lock
    /// between steps so lookups are never blocked for long.
    pub fn tick(&self, now_ms: u64) -> Vec<Event> {
        let mut events = self.tick_gateways(now_ms);
        for shard in self.shards.iter() {
            loop {
                let progress = self.tick_locked(shard, now_ms, TICK_VISITS_PER_LOCK);
                events.extend(progress.events);
                if progress.done {
                    break;
                }
            }
        }
        events
    }

    /// Ends every gateway lease lapsed at `now_ms` and drops that gateway's sessions.
    pub fn tick_gateways(&self, now_ms: u64) -> Vec<Event> {
        let lapsed: Vec<Arc<str>> = {
            let mut leases = self.leases.lock();
            let ids: Vec<GatewayId> = leases
                .iter()
                .filter(|(_, lease)| {
                    lease
                        .last_heartbeat_ms
                        .saturating_add(u64::from(lease.ttl_ms))
                        <= now_ms
                })
                .map(|(&id, _)| id)
                .collect();
            let mut names: Vec<Arc<str>> = Vec::with_capacity(ids.len());
            if !ids.is_empty() {
                self.gateways.note_maybe_unused();
            }
            for id in &ids {
                leases.remove(id);
                if let Some(name) = self.gateways.name(*id) {
                    names.push(name);
                }
            }
            names.sort();
            for gateway in &names {
                let event = Event::GatewayUnregister {
                    gateway: gateway.clone(),
                    lapsed: true,
                };
                self.journal.record(Entry::Event(&event));
            }
            names
        };
        let mut events = Vec::new();
        for gateway in lapsed {
            events.push(Event::GatewayUnregister {
                gateway: gateway.clone(),
                lapsed: true,
            });
            self.drop_gateway_sessions(&gateway, &mut events);
        }
        events
    }

    /// One bounded expiry step of one shard (see [`Shard::tick`]): the node can spread a mass
    /// expiry over many short lock holds and interleave it with other work.
    pub fn tick_shard(
        &self,
        shard: usize,
        now_ms: u64,
        visits_max: usize,
    ) -> Result<TickProgress, PresenceError> {
        Ok(self.tick_locked(self.shard(shard)?, now_ms, visits_max))
    }

    /// One bounded expiry step with its events journaled under the shard lock.
    fn tick_locked(&self, shard: &Mutex<Shard>, now_ms: u64, visits_max: usize) -> TickProgress {
        let local = self.local_scope();
        let mut shard = shard.lock();
        let progress = match &local {
            None => shard.tick(now_ms, visits_max),
            Some(local) => shard.tick_deferring(now_ms, visits_max, |uid| !local.contains(uid)),
        };
        for event in &progress.events {
            self.journal.record(Entry::Event(event));
        }
        progress
    }

    /// Applies a log record without enforcing limits (see [`Change`]). Meeting the gateway id
    /// ceiling, it reclaims unused ids and tries once more.
    pub fn apply_change(&self, change: &Change) -> Result<(), PresenceError> {
        self.retry_after_reclaim(|| self.apply_change_once(change))
    }

    fn apply_change_once(&self, change: &Change) -> Result<(), PresenceError> {
        match change {
            Change::Login(session) => self.shard_of(session.uid).lock().apply_login(session),
            Change::Heartbeat { uid, .. }
            | Change::Logout { uid, .. }
            | Change::Expire { uid, .. } => self.shard_of(*uid).lock().apply_change(change),
            Change::HeartbeatBatch { at_ms, sessions } => {
                for group in self.group_by_shard(sessions.iter().map(|&(uid, _)| uid)) {
                    let part = Change::HeartbeatBatch {
                        at_ms: *at_ms,
                        sessions: group.positions.iter().map(|&p| sessions[p]).collect(),
                    };
                    self.shards[group.shard].lock().apply_change(&part)?;
                }
                Ok(())
            }
            Change::GatewayDown { scope, .. } => {
                let own = scope.count as usize == self.shards.len();
                for (index, shard) in self.shards.iter().enumerate() {
                    // With the same shard count only the recorded shard is concerned.
                    if !own || index == scope.index as usize {
                        shard.lock().apply_change(change)?;
                    }
                }
                Ok(())
            }
            Change::GatewayRegister {
                gateway,
                ttl_ms,
                at_ms,
            } => {
                let mut leases = self.leases.lock();
                let id = self.gateways.intern_unbounded(gateway)?;
                let lease = Lease {
                    ttl_ms: *ttl_ms,
                    last_heartbeat_ms: *at_ms,
                };
                leases.insert(id, lease);
                Ok(())
            }
            Change::GatewayHeartbeat { gateway, at_ms } => {
                let mut leases = self.leases.lock();
                if let Some(id) = self.gateways.get(gateway)
                    && let Some(lease) = leases.get_mut(&id)
                {
                    lease.last_heartbeat_ms = lease.last_heartbeat_ms.max(*at_ms);
                }
                Ok(())
            }
            Change::GatewayUnregister { gateway } => {
                let mut leases = self.leases.lock();
                if let Some(id) = self.gateways.get(gateway)
                    && leases.remove(&id).is_some()
                {
                    self.gateways.note_maybe_unused();
                }
                Ok(())
            }
        }
    }

    /// Frees the ids of gateways that hold no session and no lease, so that `gateways_max`
    /// counts gateways in use rather than every name ever seen. Returns how many were freed.
    ///
    /// Runs only when a gateway may have become unused since the last reclaim (its last
    /// session in some shard went, or its lease ended); then it holds the lease lock and every
    /// shard lock at once for one pass over the per-shard counts (shards x ids read: about
    /// a millisecond at 64 shards and 16k gateways). Called when interning meets the limit.
    pub fn reclaim_gateways(&self) -> usize {
        if !self.gateways.maybe_unused() {
            return 0;
        }
        let leases = self.leases.lock();
        let mut shards: Vec<_> = self.shards.iter().map(|shard| shard.lock()).collect();
        if !self.gateways.take_maybe_unused() {
            return 0;
        }
        let mut in_use = vec![false; self.gateways.id_bound()];
        for &id in leases.keys() {
            in_use[id as usize] = true;
        }
        for shard in &shards {
            // The planted bug frees ids that sessions still hold: the model test must see it.
            if cfg!(feature = "planted-reclaim-frees-used-gateways") {
                break;
            }
            shard.mark_gateways_in_use(&mut in_use);
        }
        let freed = self.gateways.release_unused(&in_use);
        for shard in &mut shards {
            shard.forget_gateways(&freed);
        }
        freed.len()
    }

    /// Runs `op`; if it meets the gateway limit and a reclaim frees an id, runs it once more.
    fn retry_after_reclaim<T>(
        &self,
        op: impl Fn() -> Result<T, PresenceError>,
    ) -> Result<T, PresenceError> {
        match op() {
            Err(PresenceError::GatewaysExceeded { .. }) if self.reclaim_gateways() > 0 => op(),
            other => other,
        }
    }

    /// Writes a snapshot section of shard `index`. The shard is serialized into memory under
    /// its lock (a memory copy, no I/O) and written after the lock is released, so writers of
    /// other shards never wait and writers of this shard wait only for the copy.
    ///
    /// The section format (version [`crate::SNAPSHOT_FORMAT_VERSION`]) is described in the
    /// snapshot module: a header with the body length, the section's device/ttl and gateway
    /// name tables, then about 14 bytes per session (varints, time deltas, table indices).
    /// Gateway lease sections hold (name, ttl_ms, last heartbeat) records. A checkpoint is any
    /// concatenation of sections.
    pub fn snapshot_shard(
        &self,
        index: usize,
        writer: &mut impl Write,
    ) -> Result<(), SnapshotError> {
        self.snapshot_shard_in_steps(index, None, writer)
    }

    /// Snapshot sections of shard `index`, [`SNAPSHOT_SESSIONS_PER_LOCK`] sessions at a time,
    /// each step under the shard lock alone (see [`Shard::snapshot_range`]), so a writer of
    /// the shard waits for one step at most, not for the whole shard.
    fn snapshot_shard_in_steps(
        &self,
        index: usize,
        keep: Option<&dyn Fn(u64) -> bool>,
        writer: &mut impl Write,
    ) -> Result<(), SnapshotError> {
        let mut from = 0;
        while let Some(next) =
            self.snapshot_shard_step(index, keep, from, SNAPSHOT_SESSIONS_PER_LOCK, writer)?
        {
            from = next;
        }
        Ok(())
    }

    /// One step of a shard's snapshot: a section of at most `sessions_max` sessions that
    /// `keep` accepts (all when `None`), from record index `from` on, taken under the shard
    /// lock; returns where the next step goes on from, `None` when the shard is done (see
    /// [`Shard::snapshot_range`]).
    pub fn snapshot_shard_step(
        &self,
        index: usize,
        keep: Option<&dyn Fn(u64) -> bool>,
        from: u32,
        sessions_max: usize,
        writer: &mut impl Write,
    ) -> Result<Option<u32>, SnapshotError> {
        let mut bytes = Vec::new();
        let next = self
            .shard(index)?
            .lock()
            .snapshot_range(keep, from, sessions_max, &mut bytes);
        snapshot::write_all(writer, &bytes)?;
        Ok(next)
    }

    /// Writes a snapshot section of the sessions of shard `index` whose slot is in `slots`
    /// (a replica's checkpoint part of its primary's slots, or a primary's own copy of the
    /// slots no part covers).
    pub fn snapshot_shard_slots(
        &self,
        index: usize,
        slots: &SlotSet,
        writer: &mut impl Write,
    ) -> Result<(), SnapshotError> {
        let keep = |uid: u64| slots.contains(uid);
        self.snapshot_shard_in_steps(index, Some(&keep), writer)
    }

    /// Writes a snapshot section of the gateway leases.
    pub fn snapshot_gateways(&self, writer: &mut impl Write) -> Result<(), SnapshotError> {
        let mut bytes = Vec::new();
        snapshot::encode_gateway_section(&self.gateway_leases(), &mut bytes);
        snapshot::write_all(writer, &bytes)
    }

    /// Starts every empty shard's expiry wheel at `now_ms` (see [`Shard::start_wheel_at`]):
    /// call it before a restore so the first tick visits only what is due.
    pub fn start_wheel_at(&self, now_ms: u64) {
        for shard in self.shards.iter() {
            shard.lock().start_wheel_at(now_ms);
        }
    }

    /// Restores every section in `reader` (any shard count; sessions are routed by uid).
    ///
    /// The calling thread reads sections one at a time and [`RESTORE_THREADS`] threads decode
    /// and apply them: sections are independent (each uid is in one section), and each is
    /// applied under its target shard's lock. At most `2 x RESTORE_THREADS + 1` sections are
    /// in memory at once, whatever the snapshot size.
    ///
    /// Sessions keep their persisted last heartbeat, so those already expired go at the next
    /// tick. A checkpoint is fuzzy (shards taken at different moments): replay the change
    /// log from at or before the moment its first section was taken.
    pub fn restore(&self, reader: &mut impl Read) -> Result<RestoreStats, SnapshotError> {
        // A snapshot's tables may name gateways that no restored session uses.
        self.gateways.note_maybe_unused();
        let workers = std::thread::available_parallelism()
            .map_or(1, |cores| cores.get())
            .min(RESTORE_THREADS);
        if workers <= 1 {
            let mut stats = RestoreStats::default();
            while let Some(raw) = snapshot::read_section(reader)? {
                stats.add(self.restore_section(&raw)?);
            }
            return Ok(stats);
        }
        let (sender, receiver) = std::sync::mpsc::sync_channel::<RawSection>(workers);
        let receiver = Mutex::new(receiver);
        let failed = AtomicBool::new(false);
        std::thread::scope(|scope| {
            let (receiver, failed) = (&receiver, &failed);
            let handles: Vec<_> = (0..workers)
                .map(|_| {
                    scope.spawn(move || {
                        let mut stats = RestoreStats::default();
                        loop {
                            let Ok(raw) = receiver.lock().recv() else {
                                return Ok(stats);
                            };
                            match self.restore_section(&raw) {
                                Ok(section) => stats.add(section),
                                Err(error) => {
                                    failed.store(true, Ordering::Release);
                                    return Err(error);
                                }
                            }
                        }
                    })
                })
                .collect();
            let mut result: Result<RestoreStats, SnapshotError> = Ok(RestoreStats::default());
            while !failed.load(Ordering::Acquire) {
                match snapshot::read_section(reader) {
                    Ok(Some(raw)) => {
                        if sender.send(raw).is_err() {
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(error) => {
                        result = Err(error);
                        break;
                    }
                }
            }
            drop(sender);
            for handle in handles {
                let worker = match handle.join() {
                    Ok(worker) => worker,
                    Err(panic) => std::panic::resume_unwind(panic),
                };
                result = match (result, worker) {
                    (Ok(mut stats), Ok(more)) => {
                        stats.add(more);
                        Ok(stats)
                    }
                    (Err(error), _) | (Ok(_), Err(error)) => Err(error),
                };
            }
            result
        })
    }

    /// Applies one snapshot section: a shard section into the shard that owns it (one lock
    /// for the whole section when the shard counts match), or gateway leases.
    fn restore_section(&self, raw: &RawSection) -> Result<RestoreStats, SnapshotError> {
        let mut stats = RestoreStats::default();
        let Some(mut section) = raw.shard(&self.gateways)? else {
            for lease in raw.leases()? {
                self.apply_change(&Change::GatewayRegister {
                    gateway: lease.gateway,
                    ttl_ms: lease.ttl_ms,
                    at_ms: lease.last_heartbeat_ms,
                })?;
                stats.gateway_leases += 1;
            }
            return Ok(stats);
        };
        stats.shard_sections = 1;
        if section.scope.count as usize == self.shards.len() {
            let mut shard = self.shards[section.scope.index as usize].lock();
            stats.sessions = shard.restore_section(&mut section, true)?;
            return Ok(stats);
        }
        // Another shard count wrote it: route session by session.
        let mut caches: Vec<Option<ProfileCache>> = (0..self.shards.len()).map(|_| None).collect();
        while let Some(session) = section.next_session()? {
            let index = self.shard_index(session.uid);
            let cache = caches[index].get_or_insert_with(|| ProfileCache::new(&section.tables));
            self.shards[index]
                .lock()
                .restore_session(&section.tables, cache, &session)?;
            stats.sessions += 1;
        }
        Ok(stats)
    }

    /// The sessions of shard `index` whose slot is in `slots`, copied under its lock: one part
    /// of a replica's snapshot. A snapshot is fuzzy like a checkpoint: the primary notes the
    /// change stream's position before copying the first shard, and the replica applies the
    /// records from there on top ([`Self::apply_replicated`] is idempotent over them).
    pub fn slot_sessions(
        &self,
        index: usize,
        slots: &SlotSet,
    ) -> Result<Vec<Session>, PresenceError> {
        Ok(self
            .shard(index)?
            .lock()
            .sessions_where(|uid| slots.contains(uid)))
    }

    /// Drops every session whose slot is in `slots` (a node that stopped being their primary,
    /// or a replica about to resync). Each removal is journaled as a logout under its shard's
    /// lock (so the local log replays to the same state), and watchers see nothing. Returns
    /// how many were dropped.
    pub fn drop_slots(&self, slots: &SlotSet) -> usize {
        let mut dropped = 0;
        for shard in self.shards.iter() {
            let mut shard = shard.lock();
            for session in shard.remove_where(|uid| slots.contains(uid)) {
                self.journal.record(Entry::Change(&Change::Logout {
                    uid: session.uid,
                    conn: session.conn,
                }));
                dropped += 1;
            }
        }
        dropped
    }

    /// Ends a replica's resync from a snapshot (applied over what it held, never dropped
    /// first, so that a replica promoted mid-resync still has its older copy): removes every
    /// session of `slots` that is not in the snapshot, `kept` sorted by (uid, conn). Each
    /// removal is journaled as a logout under its shard's lock. Returns how many.
    pub fn sweep_slots(&self, slots: &SlotSet, kept: &[(u64, u64)]) -> usize {
        let mut swept = 0;
        for shard in self.shards.iter() {
            let mut shard = shard.lock();
            let removed = shard.remove_sessions_where(|uid, conn| {
                slots.contains(uid) && kept.binary_search(&(uid, conn)).is_err()
            });
            for session in removed {
                self.journal.record(Entry::Change(&Change::Logout {
                    uid: session.uid,
                    conn: session.conn,
                }));
                swept += 1;
            }
        }
        swept
    }

    /// Applies a change record streamed from the primary of `slots`, restricted to them, and
    /// journals what it changed here (not watched), under the shard lock, so that the local
    /// log replays to the same state:
    /// - a session record (login, logout, heartbeat, expiry) of a uid outside `slots` is
    ///   ignored;
    /// - a heartbeat batch keeps the sessions in `slots`;
    /// - a gateway drop removes that gateway's sessions in its shard scope and in `slots`
    ///   only, journaled as one logout each, so a local replay never touches other slots;
    /// - gateway leases are each node's own (a gateway registers with every node) and are
    ///   ignored.
    ///
    /// Idempotent over records the replica already holds (a fuzzy snapshot's overlap): a
    /// login sets the same session again, a logout of a missing session does nothing, a
    /// heartbeat is applied as a maximum.
    pub fn apply_replicated(&self, change: &Change, slots: &SlotSet) -> Result<(), PresenceError> {
        match change {
            Change::Login(session) => {
                if !slots.contains(session.uid) {
                    return Ok(());
                }
                self.retry_after_reclaim(|| {
                    let mut shard = self.shard_of(session.uid).lock();
                    shard.apply_login(session)?;
                    self.journal.record(Entry::Change(change));
                    Ok(())
                })
            }
            Change::Heartbeat { uid, .. }
            | Change::Logout { uid, .. }
            | Change::Expire { uid, .. } => {
                if slots.contains(*uid) {
                    let mut shard = self.shard_of(*uid).lock();
                    shard.apply_change(change)?;
                    self.journal.record(Entry::Change(change));
                }
                Ok(())
            }
            Change::HeartbeatBatch { at_ms, sessions } => {
                let mine: Vec<(u64, u64)> = sessions
                    .iter()
                    .filter(|(uid, _)| slots.contains(*uid))
                    .copied()
                    .collect();
                for group in self.group_by_shard(mine.iter().map(|&(uid, _)| uid)) {
                    let part = Change::HeartbeatBatch {
                        at_ms: *at_ms,
                        sessions: group.positions.iter().map(|&p| mine[p]).collect(),
                    };
                    let mut shard = self.shards[group.shard].lock();
                    shard.apply_change(&part)?;
                    self.journal.record(Entry::Change(&part));
                }
                Ok(())
            }
            Change::GatewayDown { gateway, scope } => {
                for shard in self.shards.iter() {
                    let mut shard = shard.lock();
                    let removed = shard.gateway_down_where(gateway, |uid| {
                        scope.contains(uid) && slots.contains(uid)
                    });
                    for session in removed {
                        self.journal.record(Entry::Change(&Change::Logout {
                            uid: session.uid,
                            conn: session.conn,
                        }));
                    }
                }
                Ok(())
            }
            Change::GatewayRegister { .. }
            | Change::GatewayHeartbeat { .. }
            | Change::GatewayUnregister { .. } => Ok(()),
        }
    }

    /// Every session, sorted by (uid, conn). O(n), one shard lock at a time.
    pub fn sessions(&self) -> Vec<Session> {
        let mut sessions = Vec::with_capacity(self.online_count() as usize);
        for shard in self.shards.iter() {
            shard
                .lock()
                .for_each_session(|session| sessions.push(session));
        }
        sessions.sort_by_key(|session| (session.uid, session.conn));
        sessions
    }

    /// Checks every shard's invariants and the online count (O(n); for tests).
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut total = 0u64;
        let local = self.local_scope();
        for (index, shard) in self.shards.iter().enumerate() {
            let shard = shard.lock();
            shard
                .check_invariants_deferring(|uid| local.as_ref().is_some_and(|l| !l.contains(uid)))
                .map_err(|error| format!("shard {index}: {error}"))?;
            total += shard.len() as u64;
        }
        if total != self.online_count() {
            return Err(format!(
                "online_count {} but shards hold {total}",
                self.online_count()
            ));
        }
        Ok(())
    }

    /// Bytes held by the shards' own structures (see [`Shard::approx_memory_bytes`]).
    pub fn approx_memory_bytes(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| shard.lock().approx_memory_bytes())
            .sum()
    }

    fn group_by_shard(&self, uids: impl Iterator<Item = u64>) -> Vec<ShardGroup> {
        let mut keyed: Vec<(usize, usize)> = uids
            .enumerate()
            .map(|(position, uid)| (self.shard_index(uid), position))
            .collect();
        keyed.sort_unstable();
        let mut groups: Vec<ShardGroup> = Vec::new();
        for (shard, position) in keyed {
            match groups.last_mut() {
                Some(group) if group.shard == shard => group.positions.push(position),
                _ => groups.push(ShardGroup {
                    shard,
                    positions: vec![position],
                }),
            }
        }
        groups
    }
}

/// Positions of a batch that fall in one shard.
struct ShardGroup {
    shard: usize,
    positions: Vec<usize>,
}
