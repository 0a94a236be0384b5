//! One shard of the registry: all the session logic, single-threaded and pure.
//!
//! # Layout
//!
//! ```text
//!  index:  open-addressing table of u32 record indices, keyed by the record's uid (~5 B)
//!  slab:   [Rec; 36 B] in 512-record chunks; free list through `next`
//!  wheel:  slot heads and tails ──► record ─next─► record ─next─► ... (singly linked)
//!  profiles: per-shard ref-counted interner, (device name, ttl_ms) <-> 28-bit id
//!  meta:   record index ──► Arc<[u8]>, only for sessions that have metadata
//!  gateway_names: shard-local copies of the names of gateway ids seen here
//! ```
//!
//! A session costs its 36-byte record plus about 5 bytes of index: there is no per-uid chain
//! (the index is a multimap: every session of a uid has its own bucket in the uid's probe run)
//! and no per-gateway list: `gateway_down` scans the shard's records, which is O(records in
//! the shard) per shard (about 0.1 ms per 100 k records) and acceptable because a gateway
//! going down is rare, and done shard by shard so no lock is held for long.
//!
//! # Expiry: a hashed timing wheel with lazy re-filing
//!
//! A session is filed in slot `(deadline_s) % WHEEL_SLOTS` (one-second slots, 4096 of them:
//! 68 minutes per turn) when it is inserted, by appending it to that slot's singly linked
//! list. A heartbeat only raises `last_heartbeat_ms` in the record: the record stays where it
//! is, *at or before* its new deadline. `tick(now_ms)` walks the slots from `wheel_cursor_s`
//! up to the current second; for each record visited it either
//!
//! - expires it (exact `deadline_ms <= now_ms`): unlinks it and frees it;
//! - frees it if it is a tombstone (a session removed by logout, replacement or
//!   `gateway_down`: removal cannot unlink from the middle of a singly linked list, so the
//!   record stays linked, invisible, until the walk passes it);
//! - re-files it in its current deadline's slot (a heartbeat moved the deadline), or keeps it
//!   when that is this very slot (a deadline one or more turns ahead, for a ttl above 68
//!   minutes).
//!
//! So tick cost is proportional to what it visits: records that expire, tombstones, and at
//! most one re-filing per record per ttl (however many heartbeats it received): never to the
//! number of sessions stored (P2). A heartbeat costs no list surgery at all. The slot of the
//! current second is walked again on the next tick because more of it becomes due. The walk
//! keeps its place (`wheel_walk_prev`) between calls, so `tick` can stop after `visits_max`
//! records and resume: expiring a million sessions is many short lock holds.
//!
//! Tombstones hold their 36 bytes until the walk reaches the slot they were filed in, which is
//! at most `min(ttl, 68 min)` after the removal: the records of a shard are the sessions
//! online plus those removed within the last ttl. With the usual ttl of 90 s this is noise;
//! it is reported by [`Shard::tombstones`].
//!
//! A record whose deadline is already behind the cursor (replay, restore, a clock step) goes
//! into the cursor's slot, so the next tick meets it. If ticks stopped for more than a turn,
//! the cursor jumps to one turn before now: one pass over all slots then covers everything.
//!
//! # Invariants (checked by [`Shard::check_invariants`])
//!
//! - The uid index holds exactly the live records, each reachable from its uid's home bucket;
//!   `len` counts them.
//! - Every live record and every tombstone sits in exactly one wheel slot list, no free record
//!   does; each slot's tail is its last record; `tombstones` counts the tombstones.
//! - A live record sits in a slot the walk reaches no later than its deadline's slot: its
//!   slot distance from the cursor is at most its deadline's distance.
//! - A uid has at most one record per device and per connection.
//! - Profile reference counts equal the live records using them; metadata exists iff flagged.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::gateways::{GatewayId, Gateways};
use crate::hash::IntHashBuilder;
use crate::index::{RECORDS_MAX, UidIndex};
use crate::slab::{NIL, PROFILE_ID_MAX, Rec, Slab};
use crate::snapshot::{
    ProfileCache, RestoreStats, RestoredSession, SectionTables, ShardSection, SnapshotError,
};
use crate::{
    Change, DEVICE_BYTES_MAX, Event, GATEWAY_NAME_BYTES_MAX, HeartbeatBatchOutcome, LoginOutcome,
    LoginRequest, META_BYTES_MAX, PresenceError, RegistryOptions, Session, SessionRef, ShardScope,
};

/// Width of one wheel slot. One second: the node ticks every 100-1000 ms, and a session is
/// compared against its exact deadline, so the slot width costs no precision.
pub const WHEEL_SLOT_MS: u64 = 1_000;
/// Slots in the wheel: 4096 one-second slots turn once per 68 minutes, longer than any usual
/// session ttl, at 32 KB of heads and tails per shard.
pub const WHEEL_SLOTS: u32 = 4_096;

/// How much later a deferred expiry is looked at again (see [`Shard::tick_deferring`]).
pub const DEFERRED_EXPIRY_RECHECK_MS: u64 = 1_000;

/// Result of one bounded expiry step.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TickProgress {
    /// The expirations, as [`Event::Expire`].
    pub events: Vec<Event>,
    /// False when `visits_max` stopped the walk early: call again with the same `now_ms`.
    pub done: bool,
}

/// Per-shard interner of session profiles, the pair (device name, ttl_ms), with reference
/// counts: device kinds ("ios") and the few configured ttls cost 4 bytes per session together,
/// and unique device ids are freed when their last session goes.
#[derive(Debug, Default)]
pub(crate) struct ProfileTable {
    entries: Vec<Profile>,
    /// Profile ids by device name: one per distinct ttl, so almost always a single one.
    by_device: HashMap<Arc<str>, Vec<u32>>,
    free: Vec<u32>,
}

#[derive(Debug)]
struct Profile {
    device: Arc<str>,
    ttl_ms: u32,
    refs: u32,
}

impl ProfileTable {
    fn device(&self, id: u32) -> &Arc<str> {
        &self.entries[id as usize].device
    }

    fn ttl_ms(&self, id: u32) -> u32 {
        self.entries[id as usize].ttl_ms
    }

    /// Takes a reference to the profile (device, ttl_ms), creating it if needed.
    pub(crate) fn acquire(&mut self, device: &str, ttl_ms: u32) -> u32 {
        if let Some(ids) = self.by_device.get(device)
            && let Some(&id) = ids
                .iter()
                .find(|&&id| self.entries[id as usize].ttl_ms == ttl_ms)
        {
            self.entries[id as usize].refs += 1;
            return id;
        }
        let shared: Arc<str> = match self.by_device.get_key_value(device) {
            Some((name, _)) => name.clone(),
            None => Arc::from(device),
        };
        let profile = Profile {
            device: shared.clone(),
            ttl_ms,
            refs: 1,
        };
        let id = match self.free.pop() {
            Some(id) => {
                self.entries[id as usize] = profile;
                id
            }
            None => {
                self.entries.push(profile);
                (self.entries.len() - 1) as u32
            }
        };
        debug_assert!(id <= PROFILE_ID_MAX, "profiles never outnumber records");
        self.by_device.entry(shared).or_default().push(id);
        id
    }

    /// Takes one more reference to a profile already held.
    pub(crate) fn acquire_id(&mut self, id: u32) {
        self.entries[id as usize].refs += 1;
    }

    fn release(&mut self, id: u32) {
        let entry = &mut self.entries[id as usize];
        entry.refs -= 1;
        if entry.refs == 0 {
            let device = std::mem::replace(&mut entry.device, Arc::from(""));
            if let Some(ids) = self.by_device.get_mut(&device) {
                ids.retain(|&other| other != id);
                if ids.is_empty() {
                    self.by_device.remove(&device);
                }
            }
            self.free.push(id);
        }
    }
}

/// One shard of the presence registry. See the module documentation.
#[derive(Debug)]
pub struct Shard {
    options: RegistryOptions,
    scope: ShardScope,
    /// Shared with the other shards; consulted on login and gateway_down, never on lookup.
    gateways: Arc<Gateways>,
    /// Registry-wide online count, updated on every insert and removal so that
    /// `online_count` is O(1) however the shard is driven.
    online: Arc<AtomicU64>,
    slab: Slab,
    index: UidIndex,
    /// Live records.
    len: usize,
    /// Removed records still linked in the wheel (see the module documentation).
    tombstones: usize,
    profiles: ProfileTable,
    /// Out-of-line metadata: most sessions have none, so it costs nothing in the record.
    meta: HashMap<u32, Arc<[u8]>, IntHashBuilder>,
    /// Shard-local copies of gateway names, by gateway id, for the gateways of sessions ever
    /// stored here: lookups clone these `Arc`s, whose reference counts no other shard touches
    /// (no cache-line ping-pong between cores). `None` also tells `gateway_down` that this
    /// shard never held a session of that gateway.
    gateway_names: Vec<Option<Arc<str>>>,
    /// Live sessions in this shard by gateway id (as long as `gateway_names`): tells a
    /// reclaim which ids are unused ([`crate::ShardedRegistry::reclaim_gateways`]).
    gateway_sessions: Vec<u32>,
    /// Whether `gateways` is this shard's own (a standalone shard): then the shard alone
    /// decides which gateway ids are unused, and reclaims them itself.
    owns_gateways: bool,
    /// Per slot: first record, or [`NIL`].
    wheel_heads: Box<[u32]>,
    /// Per slot: last record, or [`NIL`] (appends go to the tail so a walk in progress still
    /// meets them).
    wheel_tails: Box<[u32]>,
    /// First second whose slot is not fully expired.
    wheel_cursor_s: u64,
    /// Last record visited and kept in the cursor's slot, or [`NIL`] for its head: where the
    /// walk resumes. Stays valid because only the walk unlinks records.
    wheel_walk_prev: u32,
}

fn check_length(
    field: &'static str,
    len: usize,
    min: usize,
    max: usize,
) -> Result<(), PresenceError> {
    if len < min || len > max {
        return Err(PresenceError::FieldLength {
            field,
            len,
            min,
            max,
        });
    }
    Ok(())
}

pub(crate) fn check_ttl(ttl_ms: u32, options: &RegistryOptions) -> Result<(), PresenceError> {
    if ttl_ms == 0 || ttl_ms > options.ttl_ms_max {
        return Err(PresenceError::TtlOutOfRange {
            ttl_ms,
            ttl_ms_max: options.ttl_ms_max,
        });
    }
    Ok(())
}

/// Checks a device or gateway name: its length, then that it holds no control character.
fn check_name(field: &'static str, name: &str, max: usize) -> Result<(), PresenceError> {
    check_length(field, name.len(), 1, max)?;
    if let Some((position, _)) = name.char_indices().find(|(_, c)| c.is_control()) {
        return Err(PresenceError::ControlCharacter { field, position });
    }
    Ok(())
}

/// Checks a gateway name (length, no control character) before it is looked up or stored.
pub fn check_gateway_name(name: &str) -> Result<(), PresenceError> {
    check_name("gateway", name, GATEWAY_NAME_BYTES_MAX)
}

pub(crate) fn check_batch(
    limit: &'static str,
    len: usize,
    max: usize,
) -> Result<(), PresenceError> {
    if len == 0 || len > max {
        return Err(PresenceError::BatchSize { limit, len, max });
    }
    Ok(())
}

fn login_s(now_ms: u64) -> u32 {
    u32::try_from(now_ms / 1000).unwrap_or(u32::MAX)
}

impl Shard {
    /// Creates a standalone shard owning the whole uid space, with its own gateway interner.
    pub fn new(options: RegistryOptions) -> Result<Self, PresenceError> {
        options.validate()?;
        let gateways = Arc::new(Gateways::new(options.gateways_max));
        let mut shard = Self::with_parts(
            options,
            ShardScope::ALL,
            gateways,
            Arc::new(AtomicU64::new(0)),
        );
        shard.owns_gateways = true;
        Ok(shard)
    }

    /// Creates a shard of a sharded registry.
    pub(crate) fn with_parts(
        options: RegistryOptions,
        scope: ShardScope,
        gateways: Arc<Gateways>,
        online: Arc<AtomicU64>,
    ) -> Self {
        Self {
            options,
            scope,
            gateways,
            online,
            slab: Slab::new(RECORDS_MAX),
            index: UidIndex::default(),
            len: 0,
            tombstones: 0,
            profiles: ProfileTable::default(),
            meta: HashMap::with_hasher(IntHashBuilder),
            gateway_names: Vec::new(),
            gateway_sessions: Vec::new(),
            owns_gateways: false,
            wheel_heads: vec![NIL; WHEEL_SLOTS as usize].into_boxed_slice(),
            wheel_tails: vec![NIL; WHEEL_SLOTS as usize].into_boxed_slice(),
            wheel_cursor_s: 0,
            wheel_walk_prev: NIL,
        }
    }

    /// The uids this shard owns.
    pub fn scope(&self) -> ShardScope {
        self.scope
    }

    /// The options in force.
    pub fn options(&self) -> &RegistryOptions {
        &self.options
    }

    /// The gateway interner (shared with the other shards of a registry).
    pub fn gateways(&self) -> &Arc<Gateways> {
        &self.gateways
    }

    /// Sessions in this shard.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the shard holds no session.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Removed sessions whose records wait for the expiry walk to free them.
    pub fn tombstones(&self) -> usize {
        self.tombstones
    }

    /// Starts the expiry wheel at `now_ms` if the shard never held a record, so that the first
    /// tick after a restore visits only what is due instead of a whole turn of slots. Does
    /// nothing otherwise.
    pub fn start_wheel_at(&mut self, now_ms: u64) {
        if self.slab.high_water() == 0 {
            self.wheel_cursor_s = now_ms / WHEEL_SLOT_MS;
            self.wheel_walk_prev = NIL;
        }
    }

    /// Bytes held by the shard's own structures (records, uid index, metadata index, wheel),
    /// estimated from capacities; names and metadata blobs are not counted.
    pub fn approx_memory_bytes(&self) -> usize {
        let meta_entry = std::mem::size_of::<(u32, Arc<[u8]>)>() + 1;
        self.slab.allocated_bytes()
            + self.index.capacity() * 4
            + self.meta.capacity() * 8 / 7 * meta_entry
            + self.wheel_heads.len() * 8
    }

    // ----- operations -------------------------------------------------------------------

    /// Logs a session in, replacing the session of the same (uid, device) if there is one.
    ///
    /// A login that repeats the stored session's (uid, device, gateway, conn) is a retry of
    /// the same login, not a replacement: the session keeps its login time, takes the new ttl
    /// and metadata, and its heartbeat is refreshed; the outcome has `refreshed` set and no
    /// `replaced`, so a gateway never kicks its own live connection.
    ///
    /// Errors (nothing changes): a field out of its length limit, ttl out of range, the
    /// connection already used by the uid on another device, `sessions_per_uid_max` reached
    /// (a replacement does not count), the shard's record space full, a new gateway beyond
    /// `gateways_max`.
    pub fn login(
        &mut self,
        request: &LoginRequest<'_>,
        now_ms: u64,
    ) -> Result<LoginOutcome, PresenceError> {
        check_name("device", request.device, DEVICE_BYTES_MAX)?;
        check_gateway_name(request.gateway)?;
        if let Some(meta) = request.meta {
            check_length("meta", meta.len(), 0, META_BYTES_MAX)?;
        }
        check_ttl(request.ttl_ms, &self.options)?;
        let mut count = 0usize;
        let mut same_device = NIL;
        for index in self.uid_records(request.uid) {
            let rec = self.slab.get(index);
            let device = self.profiles.device(rec.profile());
            let is_same_device = **device == *request.device;
            if rec.conn.get() == request.conn && !is_same_device {
                return Err(PresenceError::ConnectionInUse {
                    uid: request.uid,
                    conn: request.conn,
                    device: device.to_string(),
                    gateway: self
                        .gateway_name(GatewayId::from(rec.gateway()))
                        .to_string(),
                });
            }
            if is_same_device {
                same_device = index;
            }
            count += 1;
        }
        if same_device == NIL && count >= self.options.sessions_per_uid_max {
            return Err(PresenceError::SessionsPerUidExceeded {
                uid: request.uid,
                max: self.options.sessions_per_uid_max,
            });
        }
        // A replaced session leaves a tombstone: the new one needs a record either way.
        if !self.slab.has_room() {
            return Err(PresenceError::ShardFull {
                max: RECORDS_MAX as usize,
            });
        }
        // Last check: interning is the only step with an effect outside this shard, and a
        // name interned for a login that then fails is freed by the next reclaim.
        let gateway = self.intern(request.gateway, false)?;
        let mut login_s = login_s(now_ms);
        let mut refreshed = false;
        let mut replaced = None;
        if same_device != NIL {
            let rec = self.slab.get(same_device);
            refreshed =
                rec.conn.get() == request.conn && GatewayId::from(rec.gateway()) == gateway;
            if refreshed {
                login_s = rec.login_s;
                let _ = self.remove(same_device);
            } else {
                replaced = Some(self.remove(same_device));
            }
        }
        let profile = self.profiles.acquire(request.device, request.ttl_ms);
        let index = self.insert(
            request.uid,
            request.conn,
            profile,
            gateway,
            login_s,
            now_ms,
            request.meta.map(Arc::from),
        )?;
        Ok(LoginOutcome {
            session: self.session_at(index),
            replaced,
            refreshed,
        })
    }

    /// Logs (uid, conn) out, returning the removed session.
    pub fn logout(&mut self, uid: u64, conn: u64) -> Result<Session, PresenceError> {
        match self.find(uid, conn) {
            Some(index) => Ok(self.remove(index)),
            None => Err(PresenceError::SessionNotFound { uid, conn }),
        }
    }

    /// Refreshes (uid, conn): its deadline becomes `now_ms + ttl_ms` (never earlier than it
    /// was). Returns the log record.
    pub fn heartbeat(
        &mut self,
        uid: u64,
        conn: u64,
        now_ms: u64,
    ) -> Result<Change, PresenceError> {
        match self.find(uid, conn) {
            Some(index) => {
                self.refresh(index, now_ms);
                Ok(Change::Heartbeat {
                    uid,
                    conn,
                    at_ms: now_ms,
                })
            }
            None => Err(PresenceError::SessionNotFound { uid, conn }),
        }
    }

    /// Refreshes every listed session that exists on `gateway`; the others are returned as
    /// unknown so the gateway can log them in again. Between 1 and `heartbeat_batch_max`
    /// entries.
    pub fn heartbeat_batch(
        &mut self,
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
        let gateway = self.gateways.get(gateway);
        let mut outcome = HeartbeatBatchOutcome::default();
        let mut refreshed = Vec::with_capacity(sessions.len());
        for &(uid, conn) in sessions {
            if self.heartbeat_on_gateway(gateway, uid, conn, now_ms) {
                refreshed.push((uid, conn));
            } else {
                outcome.unknown.push((uid, conn));
            }
        }
        if !refreshed.is_empty() {
            outcome.changes.push(Change::HeartbeatBatch {
                at_ms: now_ms,
                sessions: refreshed,
            });
        }
        Ok(outcome)
    }

    /// Refreshes (uid, conn) if it exists on `gateway`; returns whether it did.
    pub(crate) fn heartbeat_on_gateway(
        &mut self,
        gateway: Option<GatewayId>,
        uid: u64,
        conn: u64,
        now_ms: u64,
    ) -> bool {
        let Some(gateway) = gateway else { return false };
        match self.find(uid, conn) {
            Some(index) if GatewayId::from(self.slab.get(index).gateway()) == gateway => {
                self.refresh(index, now_ms);
                true
            }
            _ => false,
        }
    }

    /// The sessions of `uid`, newest login first (ties by connection id, highest first).
    pub fn lookup(&self, uid: u64) -> Vec<Session> {
        let mut sessions = Vec::new();
        self.lookup_into(uid, &mut sessions);
        sessions
    }

    /// Appends the sessions of `uid` to `out`, newest login first.
    pub fn lookup_into(&self, uid: u64, out: &mut Vec<Session>) {
        let start = out.len();
        for index in self.uid_records(uid) {
            out.push(self.session_at(index));
        }
        out[start..]
            .sort_unstable_by_key(|session| std::cmp::Reverse((session.login_ms, session.conn)));
    }

    /// Visits the sessions of `uid` in the order of [`Shard::lookup_into`] (newest login
    /// first), borrowed: no `Session` is built and no reference count is touched.
    pub fn visit_sessions(&self, uid: u64, mut visit: impl FnMut(SessionRef<'_>)) {
        // Sessions of one uid are few (`sessions_per_uid_max`, 16 by default): sort their
        // indices on the stack, spilling to the heap only past that.
        let mut stack = [0u32; 16];
        let mut heap = Vec::new();
        let mut count = 0;
        for index in self.uid_records(uid) {
            if count < stack.len() {
                stack[count] = index;
            } else {
                if heap.is_empty() {
                    heap.extend_from_slice(&stack);
                }
                heap.push(index);
            }
            count += 1;
        }
        let indices: &mut [u32] = if heap.is_empty() {
            &mut stack[..count]
        } else {
            &mut heap
        };
        indices.sort_unstable_by_key(|&index| {
            let rec = self.slab.get(index);
            std::cmp::Reverse((rec.login_s, rec.conn.get()))
        });
        for &index in indices.iter() {
            let rec = self.slab.get(index);
            let profile = &self.profiles.entries[rec.profile() as usize];
            let id = GatewayId::from(rec.gateway());
            // Every live record's gateway has a shard-local name; the shared table is the
            // fallback should that ever not hold.
            let shared;
            let gateway: &str = match self.gateway_names.get(id as usize) {
                Some(Some(name)) => name,
                _ => {
                    shared = self.gateway_name(id);
                    &shared
                }
            };
            let meta = if rec.has_meta() {
                self.meta.get(&index).map(|meta| &meta[..])
            } else {
                None
            };
            visit(SessionRef {
                uid: rec.uid.get(),
                device: &profile.device,
                gateway,
                conn: rec.conn.get(),
                login_ms: u64::from(rec.login_s) * 1000,
                last_heartbeat_ms: rec.last_heartbeat_ms(),
                ttl_ms: profile.ttl_ms,
                meta,
            });
        }
    }

    /// Hints the CPU to load what looking `uids` up will read, in two steps that each overlap
    /// the cache misses of every uid: first their index buckets, then (reading those buckets,
    /// now in cache) their first records. Call right before looking the same uids up.
    pub fn prefetch_lookups(&self, uids: impl Iterator<Item = u64> + Clone) {
        for uid in uids.clone() {
            self.index.prefetch(uid);
        }
        for uid in uids {
            if let Some(index) = self.index.candidates(uid).next() {
                self.slab.prefetch(index);
            }
        }
    }

    /// The sessions of each uid, in request order. Between 1 and `lookup_ids_max` uids.
    pub fn lookup_batch(&self, uids: &[u64]) -> Result<Vec<Vec<Session>>, PresenceError> {
        check_batch("lookup_ids_max", uids.len(), self.options.lookup_ids_max)?;
        Ok(uids.iter().map(|&uid| self.lookup(uid)).collect())
    }

    /// Drops every session of `gateway` in this shard. `None` when it had none.
    ///
    /// Cost: nothing for a shard that never held a session of the gateway; otherwise one scan
    /// of the shard's records (there is no per-gateway list: it would cost 8 bytes in every
    /// record for an operation that is rare).
    pub fn gateway_down(&mut self, gateway: &str) -> Option<Event> {
        let id = self.gateways.get(gateway)?;
        let sessions = self.remove_gateway_sessions(id, |_| true);
        if sessions.is_empty() {
            return None;
        }
        Some(Event::GatewayDown {
            gateway: self.gateway_name(id),
            scope: self.scope,
            sessions,
        })
    }

    /// Removes the live sessions of gateway `id` whose uid passes `keep_uid`, in storage order.
    fn remove_gateway_sessions(
        &mut self,
        id: GatewayId,
        in_scope: impl Fn(u64) -> bool,
    ) -> Vec<Session> {
        let mut sessions = Vec::new();
        if self.gateway_sessions.get(id as usize).copied().unwrap_or(0) == 0 {
            return sessions;
        }
        for index in 0..self.slab.high_water() {
            let rec = self.slab.get(index);
            if rec.is_live() && GatewayId::from(rec.gateway()) == id && in_scope(rec.uid.get()) {
                sessions.push(self.remove(index));
            }
        }
        sessions
    }

    /// Expires sessions whose deadline is at or before `now_ms`, visiting at most
    /// `visits_max` wheel entries (at least one). See the module documentation.
    pub fn tick(&mut self, now_ms: u64, visits_max: usize) -> TickProgress {
        self.tick_deferring(now_ms, visits_max, |_| false)
    }

    /// [`Self::tick`], except that a due session whose uid passes `defer` is not expired: it
    /// is filed again [`DEFERRED_EXPIRY_RECHECK_MS`] later (a replica's copy, which expires
    /// when its primary says so, or here once this node has become its primary).
    pub fn tick_deferring(
        &mut self,
        now_ms: u64,
        visits_max: usize,
        defer: impl Fn(u64) -> bool,
    ) -> TickProgress {
        let visits_max = visits_max.max(1);
        let mut progress = TickProgress::default();
        let now_s = now_ms / WHEEL_SLOT_MS;
        if now_s < self.wheel_cursor_s {
            // The clock went back; nothing new can be due.
            progress.done = true;
            return progress;
        }
        let turn_start_s = now_s - u64::from(WHEEL_SLOTS - 1).min(now_s);
        if self.wheel_cursor_s < turn_start_s {
            // More than one turn behind: one pass over every slot covers all deadlines.
            self.wheel_cursor_s = turn_start_s;
            self.wheel_walk_prev = NIL;
        }
        let mut visits = 0usize;
        loop {
            let slot = self.cursor_slot();
            loop {
                let next = self.wheel_next(slot, self.wheel_walk_prev);
                if next == NIL {
                    break;
                }
                if visits == visits_max {
                    return progress;
                }
                visits += 1;
                let rec = *self.slab.get(next);
                if rec.is_tombstone() {
                    self.wheel_unlink_next(slot);
                    self.slab.free(next);
                    self.tombstones -= 1;
                    continue;
                }
                let mut deadline_ms = rec.deadline_ms(self.profiles.ttl_ms(rec.profile()));
                if deadline_ms <= now_ms && defer(rec.uid.get()) {
                    deadline_ms = now_ms + DEFERRED_EXPIRY_RECHECK_MS;
                }
                if deadline_ms <= now_ms {
                    let session = self.unindex(next);
                    self.wheel_unlink_next(slot);
                    self.slab.free(next);
                    progress.events.push(Event::Expire { session });
                    continue;
                }
                let target = self.slot_for(deadline_ms);
                if target == slot {
                    self.wheel_walk_prev = next;
                } else {
                    // A heartbeat moved the deadline since the record was filed.
                    self.wheel_unlink_next(slot);
                    self.wheel_append(target, next);
                }
            }
            if self.wheel_cursor_s >= now_s {
                // The current second's slot may gain due records as time passes: walk it
                // again from the start next time.
                self.wheel_walk_prev = NIL;
                progress.done = true;
                return progress;
            }
            self.wheel_cursor_s += 1;
            self.wheel_walk_prev = NIL;
        }
    }

    /// Applies a log record without enforcing limits (see [`Change`] for the rules).
    /// Gateway lease records do not concern a shard and are ignored.
    ///
    /// Fails only when the shard's record index space or the gateway id space is exhausted.
    pub fn apply_change(&mut self, change: &Change) -> Result<(), PresenceError> {
        match change {
            Change::Login(session) => self.apply_login(session)?,
            Change::Heartbeat { uid, conn, at_ms } => {
                if let Some(index) = self.find(*uid, *conn) {
                    self.refresh(index, *at_ms);
                }
            }
            Change::HeartbeatBatch { at_ms, sessions } => {
                for &(uid, conn) in sessions {
                    if let Some(index) = self.find(uid, conn) {
                        self.refresh(index, *at_ms);
                    }
                }
            }
            Change::Logout { uid, conn } | Change::Expire { uid, conn } => {
                if let Some(index) = self.find(*uid, *conn) {
                    self.remove(index);
                }
            }
            Change::GatewayDown { gateway, scope } => {
                if let Some(id) = self.gateways.get(gateway) {
                    let scope = *scope;
                    self.remove_gateway_sessions(id, |uid| scope.contains(uid));
                }
            }
            Change::GatewayRegister { .. }
            | Change::GatewayHeartbeat { .. }
            | Change::GatewayUnregister { .. } => {}
        }
        Ok(())
    }

    /// Sets `session`, first removing sessions of its uid with the same device or connection.
    pub(crate) fn apply_login(&mut self, session: &Session) -> Result<(), PresenceError> {
        self.remove_conflicts(session.uid, session.conn, &session.device);
        if !self.slab.has_room() {
            return Err(PresenceError::ShardFull {
                max: RECORDS_MAX as usize,
            });
        }
        let gateway = self.intern(&session.gateway, true)?;
        let profile = self.profiles.acquire(&session.device, session.ttl_ms);
        self.insert(
            session.uid,
            session.conn,
            profile,
            gateway,
            login_s(session.login_ms),
            session.last_heartbeat_ms,
            session.meta.clone(),
        )?;
        Ok(())
    }

    /// Removes the sessions of `uid` on connection `conn` or on `device` (replay rules).
    fn remove_conflicts(&mut self, uid: u64, conn: u64, device: &str) {
        loop {
            let conflict = self.uid_records(uid).find(|&index| {
                let rec = self.slab.get(index);
                rec.conn.get() == conn || **self.profiles.device(rec.profile()) == *device
            });
            match conflict {
                Some(index) => {
                    self.remove(index);
                }
                None => break,
            }
        }
    }

    /// Sets one session read from a snapshot section, as [`Self::apply_login`] would.
    /// `profiles` caches the section's profiles resolved in this shard (pass a fresh cache per
    /// section); gateway ids were resolved by the caller.
    pub(crate) fn restore_session(
        &mut self,
        tables: &SectionTables,
        profiles: &mut ProfileCache,
        session: &RestoredSession<'_>,
    ) -> Result<(), PresenceError> {
        let (device, ttl_ms) = &tables.profiles[session.profile as usize];
        if self.uid_records(session.uid).next().is_some() {
            self.remove_conflicts(session.uid, session.conn, device);
        }
        if !self.slab.has_room() {
            return Err(PresenceError::ShardFull {
                max: RECORDS_MAX as usize,
            });
        }
        let cached = &mut profiles.ids[session.profile as usize];
        let profile = if *cached == NIL {
            *cached = self.profiles.acquire(device, *ttl_ms);
            *cached
        } else {
            self.profiles.acquire_id(*cached);
            *cached
        };
        let gateway = tables.gateway_ids[session.gateway as usize];
        self.insert(
            session.uid,
            session.conn,
            profile,
            gateway,
            session.login_s,
            session.last_heartbeat_ms,
            session.meta.map(Arc::from),
        )?;
        Ok(())
    }

    /// Makes room in the uid index for `additional` more sessions (restore knows the count).
    pub(crate) fn reserve(&mut self, additional: usize) {
        if let Some(capacity) = self.index.growth_for(additional) {
            self.index.rebuild(capacity, self.slab.live_uids());
        }
    }

    /// Every session, sorted by (uid, conn). O(n): for tests, tools and comparisons.
    pub fn sessions(&self) -> Vec<Session> {
        let mut sessions = Vec::with_capacity(self.len);
        self.for_each_session(|session| sessions.push(session));
        sessions.sort_by_key(|session| (session.uid, session.conn));
        sessions
    }

    /// Calls `visit` with every session, in storage order.
    pub fn for_each_session(&self, mut visit: impl FnMut(Session)) {
        for index in 0..self.slab.high_water() {
            if self.slab.get(index).is_live() {
                visit(self.session_at(index));
            }
        }
    }

    /// The sessions whose uid passes `keep`, in storage order.
    pub fn sessions_where(&self, keep: impl Fn(u64) -> bool) -> Vec<Session> {
        let mut sessions = Vec::new();
        for index in 0..self.slab.high_water() {
            let rec = self.slab.get(index);
            if rec.is_live() && keep(rec.uid.get()) {
                sessions.push(self.session_at(index));
            }
        }
        sessions
    }

    /// Removes the sessions whose uid passes `drop`; returns them.
    pub fn remove_where(&mut self, drop: impl Fn(u64) -> bool) -> Vec<Session> {
        self.remove_sessions_where(|uid, _| drop(uid))
    }

    /// Removes the sessions whose (uid, conn) passes `drop`; returns them.
    pub fn remove_sessions_where(&mut self, drop: impl Fn(u64, u64) -> bool) -> Vec<Session> {
        let mut removed = Vec::new();
        for index in 0..self.slab.high_water() {
            let rec = self.slab.get(index);
            if rec.is_live() && drop(rec.uid.get(), rec.conn.get()) {
                removed.push(self.remove(index));
            }
        }
        removed
    }

    /// Removes the sessions of `gateway` whose uid passes `drop`; returns them.
    pub fn gateway_down_where(
        &mut self,
        gateway: &str,
        drop: impl Fn(u64) -> bool,
    ) -> Vec<Session> {
        match self.gateways.get(gateway) {
            Some(id) => self.remove_gateway_sessions(id, drop),
            None => Vec::new(),
        }
    }

    /// Appends a snapshot section of every session of this shard to `out`.
    pub fn snapshot(&self, out: &mut Vec<u8>) {
        self.snapshot_range(None, 0, usize::MAX, out);
    }

    /// Appends a snapshot section of at most `sessions_max` sessions whose uid `keep` accepts
    /// (all when `None`) from record index `from` on; returns the index to go on from,
    /// or `None` when the shard is done. A caller may release the shard lock between calls
    /// (so that no lock is held for a whole shard): records never move in the slab, so every
    /// session that stays live from the first call to the last is in exactly one section, and
    /// the others are changes that a replay from before the first call brings back.
    /// The section's name tables may list names no kept session uses; restore accepts that.
    pub fn snapshot_range(
        &self,
        keep: Option<&dyn Fn(u64) -> bool>,
        from: u32,
        sessions_max: usize,
        out: &mut Vec<u8>,
    ) -> Option<u32> {
        let kept = |rec: &Rec| rec.is_live() && keep.is_none_or(|keep| keep(rec.uid.get()));
        // The records of this section: [from, end), holding `sessions` kept sessions.
        let high_water = self.slab.high_water();
        let mut end = from;
        let mut sessions = 0;
        let mut base_ms = None;
        while end < high_water && sessions < sessions_max {
            let rec = self.slab.get(end);
            if kept(rec) {
                sessions += 1;
                base_ms.get_or_insert(rec.last_heartbeat_ms());
            }
            end += 1;
        }
        // Dense section-local numbering of the profiles and gateways in use.
        let mut profile_local = vec![NIL; self.profiles.entries.len()];
        let mut profiles = Vec::new();
        for (id, entry) in self.profiles.entries.iter().enumerate() {
            if entry.refs > 0 {
                profile_local[id] = profiles.len() as u32;
                profiles.push((entry.device.clone(), entry.ttl_ms));
            }
        }
        let mut gateway_local = vec![NIL; self.gateway_names.len()];
        let mut gateways = Vec::new();
        for (id, name) in self.gateway_names.iter().enumerate() {
            if let Some(name) = name
                && self.gateway_sessions[id] > 0
            {
                gateway_local[id] = gateways.len() as u32;
                gateways.push(name.clone());
            }
        }
        let mut section = crate::snapshot::ShardSectionWriter::new(
            out,
            self.scope,
            base_ms.unwrap_or(0),
            &profiles,
            &gateways,
            sessions,
        );
        for index in from..end {
            let rec = self.slab.get(index);
            if !kept(rec) {
                continue;
            }
            let meta = if rec.has_meta() {
                self.meta.get(&index).map(|meta| &meta[..])
            } else {
                None
            };
            section.session(&RestoredSession {
                uid: rec.uid.get(),
                conn: rec.conn.get(),
                last_heartbeat_ms: rec.last_heartbeat_ms(),
                login_s: rec.login_s,
                profile: profile_local[rec.profile() as usize],
                gateway: gateway_local[usize::from(rec.gateway())],
                meta,
            });
        }
        section.finish();
        (end < high_water).then_some(end)
    }

    /// Restores every session of the snapshot sections in `reader`, as
    /// [`crate::ShardedRegistry::restore`] does; gateway lease sections are validated and
    /// skipped, a standalone shard has no leases.
    pub fn restore(
        &mut self,
        reader: &mut impl std::io::Read,
    ) -> Result<RestoreStats, SnapshotError> {
        let gateways = Arc::clone(&self.gateways);
        // A snapshot's tables may name gateways that no restored session uses.
        gateways.note_maybe_unused();
        let mut stats = RestoreStats::default();
        while let Some(raw) = crate::snapshot::read_section(reader)? {
            match raw.shard(&gateways)? {
                Some(mut section) => {
                    stats.shard_sections += 1;
                    stats.sessions += self.restore_section(&mut section, false)?;
                }
                None => stats.gateway_leases += raw.leases()?.len(),
            }
        }
        Ok(stats)
    }

    /// Restores every session of one shard section; with `own_scope`, a session whose uid
    /// this shard does not own is refused (the section claims to be this shard's).
    pub(crate) fn restore_section(
        &mut self,
        section: &mut ShardSection<'_>,
        own_scope: bool,
    ) -> Result<usize, SnapshotError> {
        let mut cache = ProfileCache::new(&section.tables);
        self.reserve(section.remaining());
        let mut restored = 0;
        while let Some(session) = section.next_session()? {
            if own_scope && !self.scope.contains(session.uid) {
                return Err(SnapshotError::OutOfScope {
                    uid: session.uid,
                    index: section.scope.index,
                    count: section.scope.count,
                });
            }
            self.restore_session(&section.tables, &mut cache, &session)?;
            restored += 1;
        }
        Ok(restored)
    }

    // ----- records and indexes ----------------------------------------------------------

    /// The live records of `uid`, in index probe order.
    fn uid_records(&self, uid: u64) -> impl Iterator<Item = u32> + '_ {
        self.index
            .candidates(uid)
            .filter(move |&index| self.slab.get(index).uid.get() == uid)
    }

    fn find(&self, uid: u64, conn: u64) -> Option<u32> {
        self.uid_records(uid)
            .find(|&index| self.slab.get(index).conn.get() == conn)
    }

    fn gateway_name(&self, id: GatewayId) -> Arc<str> {
        match self.gateway_names.get(id as usize) {
            Some(Some(name)) => name.clone(),
            _ => self.gateways.name(id).unwrap_or_else(|| Arc::from("")),
        }
    }

    fn session_at(&self, index: u32) -> Session {
        let rec = self.slab.get(index);
        let profile = &self.profiles.entries[rec.profile() as usize];
        Session {
            uid: rec.uid.get(),
            device: profile.device.clone(),
            gateway: self.gateway_name(GatewayId::from(rec.gateway())),
            conn: rec.conn.get(),
            login_ms: u64::from(rec.login_s) * 1000,
            last_heartbeat_ms: rec.last_heartbeat_ms(),
            ttl_ms: profile.ttl_ms,
            meta: if rec.has_meta() {
                self.meta.get(&index).cloned()
            } else {
                None
            },
        }
    }

    /// Stores a live record holding a reference to `profile` (released again on failure),
    /// indexes it and files it in the wheel.
    #[allow(clippy::too_many_arguments)]
    fn insert(
        &mut self,
        uid: u64,
        conn: u64,
        profile: u32,
        gateway: GatewayId,
        login_s: u32,
        last_heartbeat_ms: u64,
        meta: Option<Arc<[u8]>>,
    ) -> Result<u32, PresenceError> {
        // Interning hands out ids below GATEWAY_IDS_MAX = 2^16 only.
        debug_assert!((gateway as usize) < crate::gateways::GATEWAY_IDS_MAX);
        let gateway_id = gateway as u16;
        let rec = Rec::new(
            uid,
            conn,
            last_heartbeat_ms,
            login_s,
            gateway_id,
            profile,
            meta.is_some(),
        );
        // Grow the index before the record exists, so the rebuild does not meet it.
        self.reserve(1);
        let Some(index) = self.slab.insert(rec) else {
            self.profiles.release(profile);
            // The gateway may have been interned for this record alone.
            self.gateways.note_maybe_unused();
            return Err(PresenceError::ShardFull {
                max: RECORDS_MAX as usize,
            });
        };
        self.index.insert(uid, index);
        self.note_gateway(gateway);
        let deadline_ms = rec.deadline_ms(self.profiles.ttl_ms(profile));
        self.wheel_append(self.slot_for(deadline_ms), index);
        if let Some(meta) = meta {
            self.meta.insert(index, meta);
        }
        self.len += 1;
        self.online.fetch_add(1, Ordering::Relaxed);
        Ok(index)
    }

    /// Counts a new session of `gateway` and keeps a shard-local copy of its name (see the
    /// `gateway_names` field).
    fn note_gateway(&mut self, gateway: GatewayId) {
        let slot = gateway as usize;
        if self.gateway_names.len() <= slot {
            self.gateway_names.resize(slot + 1, None);
            self.gateway_sessions.resize(slot + 1, 0);
        }
        if self.gateway_names[slot].is_none() {
            self.gateway_names[slot] = self.gateways.name(gateway).map(|name| Arc::from(&*name));
        }
        self.gateway_sessions[slot] += 1;
    }

    /// Counts a session of `gateway` gone; the last one hints that the id may be reclaimed.
    fn forget_session_of(&mut self, gateway: GatewayId) {
        let count = &mut self.gateway_sessions[gateway as usize];
        *count -= 1;
        if *count == 0 {
            self.gateways.note_maybe_unused();
        }
    }

    /// Interns a gateway name (for replay with only the hard ceiling). A standalone shard
    /// that meets the limit reclaims its unused ids and tries once more.
    fn intern(&mut self, name: &str, replay: bool) -> Result<GatewayId, PresenceError> {
        let intern = |gateways: &Gateways| {
            if replay {
                gateways.intern_unbounded(name)
            } else {
                gateways.intern(name)
            }
        };
        match intern(&self.gateways) {
            Err(PresenceError::GatewaysExceeded { .. })
                if self.owns_gateways && self.reclaim_own_gateways() > 0 =>
            {
                intern(&self.gateways)
            }
            other => other,
        }
    }

    /// Frees the ids of gateways with no session here, when the interner is this shard's own.
    fn reclaim_own_gateways(&mut self) -> usize {
        debug_assert!(self.owns_gateways);
        if !self.gateways.take_maybe_unused() {
            return 0;
        }
        let mut in_use = vec![false; self.gateways.id_bound()];
        self.mark_gateways_in_use(&mut in_use);
        let freed = self.gateways.release_unused(&in_use);
        self.forget_gateways(&freed);
        freed.len()
    }

    /// Sets `in_use[id]` for every gateway id with a live session in this shard.
    pub(crate) fn mark_gateways_in_use(&self, in_use: &mut [bool]) {
        for (id, &count) in self.gateway_sessions.iter().enumerate() {
            if count > 0 {
                in_use[id] = true;
            }
        }
    }

    /// Drops the shard-local names of freed gateway ids (none has a session here).
    pub(crate) fn forget_gateways(&mut self, freed: &[GatewayId]) {
        for &id in freed {
            if let Some(name) = self.gateway_names.get_mut(id as usize) {
                debug_assert_eq!(self.gateway_sessions[id as usize], 0);
                *name = None;
            }
        }
    }

    /// Takes a live record out of the uid index, the profile and metadata tables and the
    /// counts, returning its session; the record itself is left to the caller.
    fn unindex(&mut self, index: u32) -> Session {
        let session = self.session_at(index);
        let rec = *self.slab.get(index);
        let slab = &self.slab;
        let found = self.index.remove(
            rec.uid.get(),
            index,
            |other| slab.get(other).uid.get(),
            |other| slab.prefetch(other),
        );
        debug_assert!(found, "a live record is indexed");
        self.profiles.release(rec.profile());
        self.forget_session_of(GatewayId::from(rec.gateway()));
        if rec.has_meta() {
            self.meta.remove(&index);
        }
        self.len -= 1;
        self.online.fetch_sub(1, Ordering::Relaxed);
        session
    }

    /// Removes a live session; its record becomes a tombstone until the wheel walk frees it.
    fn remove(&mut self, index: u32) -> Session {
        let session = self.unindex(index);
        self.slab.get_mut(index).bury();
        self.tombstones += 1;
        session
    }

    /// Raises the last heartbeat to `at_ms`. The record stays in its wheel slot, which is
    /// then earlier than its deadline's: the walk re-files it when it gets there.
    fn refresh(&mut self, index: u32, at_ms: u64) {
        let rec = self.slab.get_mut(index);
        if at_ms > rec.last_heartbeat_ms() {
            rec.set_last_heartbeat_ms(at_ms);
        }
    }

    fn cursor_slot(&self) -> u32 {
        (self.wheel_cursor_s % u64::from(WHEEL_SLOTS)) as u32
    }

    /// The slot a record with this deadline is filed in (overdue ones in the cursor's).
    fn slot_for(&self, deadline_ms: u64) -> u32 {
        let second = (deadline_ms / WHEEL_SLOT_MS).max(self.wheel_cursor_s);
        (second % u64::from(WHEEL_SLOTS)) as u32
    }

    /// The record after `prev` in `slot` (`prev == NIL`: the slot's first).
    fn wheel_next(&self, slot: u32, prev: u32) -> u32 {
        if prev == NIL {
            self.wheel_heads[slot as usize]
        } else {
            self.slab.get(prev).next
        }
    }

    /// Appends `index` at the tail of `slot`.
    fn wheel_append(&mut self, slot: u32, index: u32) {
        let tail = self.wheel_tails[slot as usize];
        if tail == NIL {
            self.wheel_heads[slot as usize] = index;
        } else {
            self.slab.get_mut(tail).next = index;
        }
        self.wheel_tails[slot as usize] = index;
        self.slab.get_mut(index).next = NIL;
    }

    /// Unlinks the record after the walk position in `slot` (the only unlink there is).
    fn wheel_unlink_next(&mut self, slot: u32) {
        let prev = self.wheel_walk_prev;
        let index = self.wheel_next(slot, prev);
        let after = self.slab.get(index).next;
        if prev == NIL {
            self.wheel_heads[slot as usize] = after;
        } else {
            self.slab.get_mut(prev).next = after;
        }
        if self.wheel_tails[slot as usize] == index {
            self.wheel_tails[slot as usize] = prev;
        }
        self.slab.get_mut(index).next = NIL;
    }

    // ----- invariants -------------------------------------------------------------------

    /// Verifies every index against the records (O(n)); describes the first violation.
    pub fn check_invariants(&self) -> Result<(), String> {
        self.check_invariants_deferring(|_| false)
    }

    /// [`Self::check_invariants`] for a shard ticked with [`Self::tick_deferring`]: a session
    /// whose uid passes `deferred` may be filed after its deadline.
    pub fn check_invariants_deferring(
        &self,
        deferred: impl Fn(u64) -> bool,
    ) -> Result<(), String> {
        let high_water = self.slab.high_water();
        let (mut live, mut buried) = (0usize, 0usize);
        for index in 0..high_water {
            let rec = self.slab.get(index);
            live += usize::from(rec.is_live());
            buried += usize::from(rec.is_tombstone());
        }
        if live != self.len || buried != self.tombstones {
            return Err(format!(
                "len {} and {} tombstones, but {live} live and {buried} buried records",
                self.len, self.tombstones
            ));
        }
        let free = high_water as usize - live - buried;
        if self.slab.free_len() as usize != free
            || self.slab.free_list_len() != Some(self.slab.free_len())
        {
            return Err("free list does not match the free records".into());
        }
        self.check_uid_index(high_water)?;
        self.check_wheel(high_water, &deferred)?;
        self.check_profiles_and_meta(high_water)
    }

    fn check_uid_index(&self, high_water: u32) -> Result<(), String> {
        let slab = &self.slab;
        self.index.check(|index| slab.get(index).uid.get())?;
        if self.index.len() != self.len {
            return Err(format!(
                "uid index holds {} records, len is {}",
                self.index.len(),
                self.len
            ));
        }
        let mut per_uid: HashMap<u64, Vec<(&str, u64)>> = HashMap::new();
        for index in self.index.indices() {
            if index >= high_water || !self.slab.get(index).is_live() {
                return Err(format!("uid index holds a dead record {index}"));
            }
            let rec = self.slab.get(index);
            let uid = rec.uid.get();
            if !self.scope.contains(uid) {
                return Err(format!("uid {uid} outside scope {:?}", self.scope));
            }
            let device: &str = self.profiles.device(rec.profile());
            let seen = per_uid.entry(uid).or_default();
            if seen
                .iter()
                .any(|&(d, c)| d == device || c == rec.conn.get())
            {
                return Err(format!("uid {uid} has a duplicate device or conn"));
            }
            seen.push((device, rec.conn.get()));
        }
        if let Some((uid, seen)) = per_uid
            .iter()
            .find(|(_, seen)| seen.len() > self.options.sessions_per_uid_max)
        {
            return Err(format!("uid {uid} has {} sessions", seen.len()));
        }
        Ok(())
    }

    fn check_wheel(&self, high_water: u32, deferred: &dyn Fn(u64) -> bool) -> Result<(), String> {
        let slots = u64::from(WHEEL_SLOTS);
        let cursor_slot = self.cursor_slot();
        let mut linked = vec![false; high_water as usize];
        let mut walk_prev_found = self.wheel_walk_prev == NIL;
        for slot in 0..WHEEL_SLOTS {
            let mut previous = NIL;
            let mut index = self.wheel_heads[slot as usize];
            while index != NIL {
                if index >= high_water || linked[index as usize] {
                    return Err(format!("wheel slot {slot} is broken at {index}"));
                }
                linked[index as usize] = true;
                let rec = self.slab.get(index);
                if !rec.is_live() && !rec.is_tombstone() {
                    return Err(format!("wheel slot {slot} links free record {index}"));
                }
                if rec.is_live() {
                    // The walk must reach the record no later than its deadline's slot.
                    let deadline_s =
                        rec.deadline_ms(self.profiles.ttl_ms(rec.profile())) / WHEEL_SLOT_MS;
                    let deadline_distance = deadline_s.saturating_sub(self.wheel_cursor_s);
                    let slot_distance = (u64::from(slot) + slots - u64::from(cursor_slot)) % slots;
                    if slot_distance > deadline_distance && !deferred(rec.uid.get()) {
                        return Err(format!(
                            "record {index} is in slot {slot}, after its deadline's"
                        ));
                    }
                }
                if index == self.wheel_walk_prev && slot == cursor_slot {
                    walk_prev_found = true;
                }
                previous = index;
                index = rec.next;
            }
            if self.wheel_tails[slot as usize] != previous {
                return Err(format!("wheel slot {slot} tail is wrong"));
            }
        }
        for index in 0..high_water {
            let rec = self.slab.get(index);
            if (rec.is_live() || rec.is_tombstone()) && !linked[index as usize] {
                return Err(format!("record {index} is in no wheel slot"));
            }
        }
        if !walk_prev_found {
            return Err("wheel walk position is not in the cursor slot".into());
        }
        Ok(())
    }

    fn check_profiles_and_meta(&self, high_water: u32) -> Result<(), String> {
        let mut refs = vec![0u32; self.profiles.entries.len()];
        let mut per_gateway = vec![0u32; self.gateway_sessions.len()];
        let mut with_meta = 0usize;
        for index in 0..high_water {
            let rec = self.slab.get(index);
            if !rec.is_live() {
                continue;
            }
            match per_gateway.get_mut(usize::from(rec.gateway())) {
                Some(count) => *count += 1,
                None => return Err(format!("record {index} has an uncounted gateway")),
            }
            match refs.get_mut(rec.profile() as usize) {
                Some(count) => *count += 1,
                None => return Err(format!("record {index} has an unknown profile")),
            }
            if rec.has_meta() {
                with_meta += 1;
                if !self.meta.contains_key(&index) {
                    return Err(format!("record {index} lost its metadata"));
                }
            }
            if !matches!(
                self.gateway_names.get(usize::from(rec.gateway())),
                Some(Some(_))
            ) {
                return Err(format!("record {index} has a gateway with no local name"));
            }
        }
        if per_gateway != self.gateway_sessions {
            return Err("per-gateway session counts do not match the records".into());
        }
        for (id, name) in self.gateway_names.iter().enumerate() {
            if let Some(name) = name
                && per_gateway[id] > 0
                && self.gateways.name(id as GatewayId).as_deref() != Some(&**name)
            {
                return Err(format!(
                    "gateway {id} is {name:?} here and not in the interner"
                ));
            }
        }
        let mut indexed = 0usize;
        for (id, entry) in self.profiles.entries.iter().enumerate() {
            if entry.refs != refs[id] {
                return Err(format!(
                    "profile {id} has {} refs, {} users",
                    entry.refs, refs[id]
                ));
            }
            if entry.refs > 0 {
                indexed += 1;
                let listed = self.profiles.by_device.get(&*entry.device);
                if !listed.is_some_and(|ids| ids.contains(&(id as u32))) {
                    return Err(format!("profile {id} is not indexed by device"));
                }
            }
        }
        let listed: usize = self.profiles.by_device.values().map(Vec::len).sum();
        if listed != indexed || indexed + self.profiles.free.len() != self.profiles.entries.len() {
            return Err("profile free list does not match".into());
        }
        if with_meta != self.meta.len() {
            return Err(format!(
                "{} metadata blobs for {with_meta} flagged",
                self.meta.len()
            ));
        }
        Ok(())
    }
}
