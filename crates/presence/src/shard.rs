//! One shard of the registry: all the session logic, single-threaded and pure.
//!
//! # Layout
//!
//! ```text
//!  uids: uid ──► first record ──next_in_uid──► ... (at most sessions_per_uid_max)
//!  slab: [Rec; 60 B] in 1024-record chunks, free list through next_in_uid
//!  gateway_heads[gateway id] ──► record ⇄ record ⇄ ...   (doubly linked, gateway_down)
//!  wheel[slot] = sentinel ⇄ record ⇄ record ⇄ sentinel    (circular, expiry)
//!  devices: per-shard ref-counted interner, device name <-> 31-bit id
//!  meta: record index ──► Arc<[u8]>, only for sessions that have metadata
//! ```
//!
//! # Expiry: a hashed timing wheel with exact deadlines
//!
//! A session sits in slot `(deadline_ms / WHEEL_SLOT_MS) % WHEEL_SLOTS` (one-second slots,
//! 4096 of them: 68 minutes per turn). A heartbeat moves the record to its new slot in O(1)
//! (unlink, append), so the wheel holds exactly one entry per session and no stale ones.
//! `tick(now_ms)` walks the slots from `wheel_cursor_s` up to the current second and removes
//! every visited record whose exact `deadline_ms <= now_ms`; a record of a later turn (ttl
//! above 68 minutes) is skipped and met again one turn later. The slot of the current second
//! is walked again on the next tick because more of it becomes due. The walk keeps its place
//! (`wheel_walk_prev`) between calls, so `tick` can stop after `visits_max` records and resume:
//! expiring a million sessions is many short lock holds, never one long one.
//!
//! A record whose deadline is already behind the cursor (replay, restore, a clock step) goes
//! into the cursor's slot, so the next tick meets it. If ticks stopped for more than a turn,
//! the cursor jumps to one turn before now: one pass over all slots then covers everything.
//!
//! # Invariants (checked by [`Shard::check_invariants`])
//!
//! - Every live record is in exactly one uid chain, one gateway list and one wheel slot, and
//!   `len` counts them; the uid map holds exactly the uids that have records.
//! - A uid has at most one record per device and per connection.
//! - A record whose deadline second is at or past the cursor sits in its deadline's slot.
//! - Device reference counts equal the records using them; metadata exists iff flagged.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::gateways::{GatewayId, Gateways};
use crate::hash::{IntHashBuilder, UidKey};
use crate::slab::{NIL, RECORDS_MAX, Rec, Slab};
use crate::snapshot::{Item, RestoreStats, SnapshotError};
use crate::{
    Change, DEVICE_BYTES_MAX, Event, GATEWAY_NAME_BYTES_MAX, HeartbeatBatchOutcome, LoginOutcome,
    LoginRequest, META_BYTES_MAX, PresenceError, RegistryOptions, Session, ShardScope,
};

/// Width of one wheel slot. One second: the node ticks every 100-1000 ms, and a session is
/// compared against its exact deadline, so the slot width costs no precision.
pub const WHEEL_SLOT_MS: u64 = 1_000;
/// Slots in the wheel: 4096 one-second slots turn once per 68 minutes, longer than any usual
/// session ttl, at 32 KB of sentinels per shard.
pub const WHEEL_SLOTS: u32 = 4_096;
/// Index of the sentinel of slot 0; sentinels occupy `SENTINEL_BASE..SENTINEL_BASE + SLOTS`.
const SENTINEL_BASE: u32 = RECORDS_MAX;

/// Result of one bounded expiry step.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TickProgress {
    /// The expirations, as [`Event::Expire`].
    pub events: Vec<Event>,
    /// False when `visits_max` stopped the walk early: call again with the same `now_ms`.
    pub done: bool,
}

/// Per-shard device interner with reference counts, so that unique device ids are freed when
/// their last session goes and device kinds ("ios") cost 4 bytes per session.
#[derive(Debug, Default)]
struct DeviceTable {
    entries: Vec<DeviceEntry>,
    by_name: HashMap<Arc<str>, u32>,
    free: Vec<u32>,
}

#[derive(Debug)]
struct DeviceEntry {
    name: Arc<str>,
    refs: u32,
}

impl DeviceTable {
    fn get(&self, name: &str) -> Option<u32> {
        self.by_name.get(name).copied()
    }

    fn name(&self, id: u32) -> &Arc<str> {
        &self.entries[id as usize].name
    }

    fn acquire(&mut self, name: &str) -> u32 {
        if let Some(&id) = self.by_name.get(name) {
            self.entries[id as usize].refs += 1;
            return id;
        }
        let shared: Arc<str> = Arc::from(name);
        let id = match self.free.pop() {
            Some(id) => {
                self.entries[id as usize] = DeviceEntry {
                    name: shared.clone(),
                    refs: 1,
                };
                id
            }
            None => {
                self.entries.push(DeviceEntry {
                    name: shared.clone(),
                    refs: 1,
                });
                (self.entries.len() - 1) as u32
            }
        };
        self.by_name.insert(shared, id);
        id
    }

    fn release(&mut self, id: u32) {
        let entry = &mut self.entries[id as usize];
        entry.refs -= 1;
        if entry.refs == 0 {
            self.by_name.remove(&*entry.name);
            entry.name = Arc::from("");
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
    uids: HashMap<UidKey, u32, IntHashBuilder>,
    len: usize,
    devices: DeviceTable,
    /// Out-of-line metadata: most sessions have none, so it costs nothing in the record.
    meta: HashMap<u32, Arc<[u8]>, IntHashBuilder>,
    gateway_heads: Vec<u32>,
    /// Shard-local copies of gateway names: lookups clone these `Arc`s, whose reference
    /// counts no other shard touches (no cache-line ping-pong between cores).
    gateway_names: Vec<Option<Arc<str>>>,
    /// Per slot: the sentinel's [next, prev].
    wheel: Box<[[u32; 2]]>,
    /// First second whose slot is not fully expired.
    wheel_cursor_s: u64,
    /// Last record visited and kept in the cursor's slot (or its sentinel): where the walk
    /// resumes. Kept valid when that record is unlinked.
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

pub(crate) fn check_gateway_name(name: &str) -> Result<(), PresenceError> {
    check_length("gateway", name.len(), 1, GATEWAY_NAME_BYTES_MAX)
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
        Ok(Self::with_parts(
            options,
            ShardScope::ALL,
            gateways,
            Arc::new(AtomicU64::new(0)),
        ))
    }

    /// Creates a shard of a sharded registry.
    pub(crate) fn with_parts(
        options: RegistryOptions,
        scope: ShardScope,
        gateways: Arc<Gateways>,
        online: Arc<AtomicU64>,
    ) -> Self {
        let wheel = (0..WHEEL_SLOTS)
            .map(|slot| [SENTINEL_BASE + slot; 2])
            .collect();
        Self {
            options,
            scope,
            gateways,
            online,
            slab: Slab::new(),
            uids: HashMap::with_hasher(IntHashBuilder),
            len: 0,
            devices: DeviceTable::default(),
            meta: HashMap::with_hasher(IntHashBuilder),
            gateway_heads: Vec::new(),
            gateway_names: Vec::new(),
            wheel,
            wheel_cursor_s: 0,
            wheel_walk_prev: SENTINEL_BASE,
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

    /// Bytes held by the shard's own structures (records, uid map, metadata index, wheel),
    /// estimated from capacities; names and metadata blobs are not counted.
    pub fn approx_memory_bytes(&self) -> usize {
        let uid_entry = std::mem::size_of::<(UidKey, u32)>() + 1;
        let meta_entry = std::mem::size_of::<(u32, Arc<[u8]>)>() + 1;
        self.slab.allocated_bytes()
            + self.uids.capacity() * 8 / 7 * uid_entry
            + self.meta.capacity() * 8 / 7 * meta_entry
            + self.wheel.len() * 8
            + self.gateway_heads.capacity() * 4
    }

    // ----- operations -------------------------------------------------------------------

    /// Logs a session in, replacing the session of the same (uid, device) if there is one.
    ///
    /// Errors (nothing changes): a field out of its length limit, ttl out of range, the
    /// connection already used by the uid on another device, `sessions_per_uid_max` reached
    /// (a replacement does not count), a new gateway beyond `gateways_max`.
    pub fn login(
        &mut self,
        request: &LoginRequest<'_>,
        now_ms: u64,
    ) -> Result<LoginOutcome, PresenceError> {
        check_length("device", request.device.len(), 1, DEVICE_BYTES_MAX)?;
        check_gateway_name(request.gateway)?;
        if let Some(meta) = request.meta {
            check_length("meta", meta.len(), 0, META_BYTES_MAX)?;
        }
        check_ttl(request.ttl_ms, &self.options)?;
        let device = self.devices.get(request.device);
        let mut count = 0usize;
        let mut same_device = NIL;
        let mut index = self.head(request.uid);
        while index != NIL {
            let rec = self.slab.get(index);
            let is_same_device = Some(rec.device()) == device;
            if rec.conn.get() == request.conn && !is_same_device {
                return Err(PresenceError::ConnectionInUse {
                    uid: request.uid,
                    conn: request.conn,
                    device: self.devices.name(rec.device()).to_string(),
                });
            }
            if is_same_device {
                same_device = index;
            }
            count += 1;
            index = rec.next_in_uid;
        }
        if same_device == NIL && count >= self.options.sessions_per_uid_max {
            return Err(PresenceError::SessionsPerUidExceeded {
                uid: request.uid,
                max: self.options.sessions_per_uid_max,
            });
        }
        if same_device == NIL && self.slab.free_len() == 0 && self.slab.high_water() >= RECORDS_MAX
        {
            return Err(PresenceError::ShardFull {
                max: RECORDS_MAX as usize,
            });
        }
        // Last check: interning is the only step with an effect outside this shard, and a
        // name interned for a login that then fails would be harmless anyway.
        let gateway = self.gateways.intern(request.gateway)?;
        let replaced = (same_device != NIL).then(|| self.remove(same_device));
        let index = self.insert(
            request.uid,
            request.device,
            gateway,
            request.conn,
            login_s(now_ms),
            now_ms,
            request.ttl_ms,
            request.meta.map(Arc::from),
        )?;
        Ok(LoginOutcome {
            session: self.session_at(index),
            replaced,
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
            Some(index) if self.slab.get(index).gateway == gateway => {
                self.refresh(index, now_ms);
                true
            }
            _ => false,
        }
    }

    /// The sessions of `uid`, newest login first.
    pub fn lookup(&self, uid: u64) -> Vec<Session> {
        let mut sessions = Vec::new();
        self.lookup_into(uid, &mut sessions);
        sessions
    }

    /// Appends the sessions of `uid` to `out`.
    pub fn lookup_into(&self, uid: u64, out: &mut Vec<Session>) {
        let mut index = self.head(uid);
        while index != NIL {
            out.push(self.session_at(index));
            index = self.slab.get(index).next_in_uid;
        }
    }

    /// The sessions of each uid, in request order. Between 1 and `lookup_ids_max` uids.
    pub fn lookup_batch(&self, uids: &[u64]) -> Result<Vec<Vec<Session>>, PresenceError> {
        check_batch("lookup_ids_max", uids.len(), self.options.lookup_ids_max)?;
        Ok(uids.iter().map(|&uid| self.lookup(uid)).collect())
    }

    /// Drops every session of `gateway` in this shard. `None` when it had none.
    ///
    /// Cost is proportional to that gateway's sessions here (its intrusive list), not to the
    /// shard size.
    pub fn gateway_down(&mut self, gateway: &str) -> Option<Event> {
        let id = self.gateways.get(gateway)?;
        let mut sessions = Vec::new();
        let mut index = self.gateway_heads.get(id as usize).copied().unwrap_or(NIL);
        while index != NIL {
            let next = self.slab.get(index).gateway_next;
            sessions.push(self.remove(index));
            index = next;
        }
        if sessions.is_empty() {
            return None;
        }
        Some(Event::GatewayDown {
            gateway: self.gateway_name(id),
            scope: self.scope,
            sessions,
        })
    }

    /// Expires sessions whose deadline is at or before `now_ms`, visiting at most
    /// `visits_max` wheel entries (at least one). See the module documentation.
    pub fn tick(&mut self, now_ms: u64, visits_max: usize) -> TickProgress {
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
            self.wheel_walk_prev = self.cursor_sentinel();
        }
        let mut visits = 0usize;
        loop {
            let sentinel = self.cursor_sentinel();
            loop {
                let next = self.wheel_next(self.wheel_walk_prev);
                if next == sentinel {
                    break;
                }
                if visits == visits_max {
                    return progress;
                }
                visits += 1;
                if self.slab.get(next).deadline_ms() <= now_ms {
                    let session = self.remove(next);
                    progress.events.push(Event::Expire { session });
                } else {
                    self.wheel_walk_prev = next;
                }
            }
            if self.wheel_cursor_s >= now_s {
                // The current second's slot may gain due records as time passes: walk it
                // again from the start next time.
                self.wheel_walk_prev = sentinel;
                progress.done = true;
                return progress;
            }
            self.wheel_cursor_s += 1;
            self.wheel_walk_prev = self.cursor_sentinel();
        }
    }

    /// Applies a log record without enforcing limits (see [`Change`] for the rules).
    /// Gateway lease records do not concern a shard and are ignored.
    ///
    /// Fails only when the shard's record index space is exhausted.
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
            Change::GatewayDown { gateway, scope } => self.apply_gateway_down(gateway, *scope),
            Change::GatewayRegister { .. }
            | Change::GatewayHeartbeat { .. }
            | Change::GatewayUnregister { .. } => {}
        }
        Ok(())
    }

    /// Sets `session`, first removing sessions of its uid with the same device or connection.
    pub(crate) fn apply_login(&mut self, session: &Session) -> Result<(), PresenceError> {
        let device = self.devices.get(&session.device);
        let mut index = self.head(session.uid);
        while index != NIL {
            let rec = *self.slab.get(index);
            if rec.conn.get() == session.conn || Some(rec.device()) == device {
                self.remove(index);
            }
            index = rec.next_in_uid;
        }
        let gateway = self.gateways.intern_unbounded(&session.gateway)?;
        self.insert(
            session.uid,
            &session.device,
            gateway,
            session.conn,
            login_s(session.login_ms),
            session.last_heartbeat_ms,
            session.ttl_ms,
            session.meta.clone(),
        )?;
        Ok(())
    }

    fn apply_gateway_down(&mut self, gateway: &str, scope: ShardScope) {
        let Some(id) = self.gateways.get(gateway) else {
            return;
        };
        let mut index = self.gateway_heads.get(id as usize).copied().unwrap_or(NIL);
        while index != NIL {
            let rec = *self.slab.get(index);
            if scope.contains(rec.uid.get()) {
                self.remove(index);
            }
            index = rec.gateway_next;
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

    /// Appends a snapshot section of every session of this shard to `out`.
    pub fn snapshot(&self, out: &mut Vec<u8>) {
        crate::snapshot::encode_shard_section(
            self.scope,
            self.len,
            |write| self.for_each_session(|session| write(&session)),
            out,
        );
    }

    /// Restores every session of the snapshot sections in `reader`, as
    /// [`crate::ShardedRegistry::restore`] does; gateway lease sections are skipped, a
    /// standalone shard has no leases.
    pub fn restore(
        &mut self,
        reader: &mut impl std::io::Read,
    ) -> Result<RestoreStats, SnapshotError> {
        crate::snapshot::read_sections(reader, |item| match item {
            Item::Session(session) => self.apply_login(&session),
            Item::Shard | Item::Lease(_) => Ok(()),
        })
    }

    // ----- records and indexes ----------------------------------------------------------

    fn head(&self, uid: u64) -> u32 {
        self.uids.get(&UidKey::new(uid)).copied().unwrap_or(NIL)
    }

    fn find(&self, uid: u64, conn: u64) -> Option<u32> {
        let mut index = self.head(uid);
        while index != NIL {
            let rec = self.slab.get(index);
            if rec.conn.get() == conn {
                return Some(index);
            }
            index = rec.next_in_uid;
        }
        None
    }

    fn gateway_name(&self, id: GatewayId) -> Arc<str> {
        match self.gateway_names.get(id as usize) {
            Some(Some(name)) => name.clone(),
            _ => self.gateways.name(id).unwrap_or_else(|| Arc::from("")),
        }
    }

    fn session_at(&self, index: u32) -> Session {
        let rec = self.slab.get(index);
        Session {
            uid: rec.uid.get(),
            device: self.devices.name(rec.device()).clone(),
            gateway: self.gateway_name(rec.gateway),
            conn: rec.conn.get(),
            login_ms: u64::from(rec.login_s) * 1000,
            last_heartbeat_ms: rec.last_heartbeat_ms.get(),
            ttl_ms: rec.ttl_ms,
            meta: if rec.has_meta() {
                self.meta.get(&index).cloned()
            } else {
                None
            },
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn insert(
        &mut self,
        uid: u64,
        device: &str,
        gateway: GatewayId,
        conn: u64,
        login_s: u32,
        last_heartbeat_ms: u64,
        ttl_ms: u32,
        meta: Option<Arc<[u8]>>,
    ) -> Result<u32, PresenceError> {
        let device = self.devices.acquire(device);
        let rec = Rec::new(
            uid,
            conn,
            last_heartbeat_ms,
            ttl_ms,
            login_s,
            gateway,
            device,
            meta.is_some(),
        );
        let Some(index) = self.slab.insert(rec) else {
            self.devices.release(device);
            return Err(PresenceError::ShardFull {
                max: RECORDS_MAX as usize,
            });
        };
        let previous_head = self.uids.insert(UidKey::new(uid), index).unwrap_or(NIL);
        self.slab.get_mut(index).next_in_uid = previous_head;
        self.gateway_link(index, gateway);
        self.wheel_link(index);
        if let Some(meta) = meta {
            self.meta.insert(index, meta);
        }
        self.len += 1;
        self.online.fetch_add(1, Ordering::Relaxed);
        Ok(index)
    }

    fn remove(&mut self, index: u32) -> Session {
        let session = self.session_at(index);
        let rec = *self.slab.get(index);
        let key = UidKey::new(rec.uid.get());
        let head = self.head(rec.uid.get());
        if head == index {
            if rec.next_in_uid == NIL {
                self.uids.remove(&key);
            } else {
                self.uids.insert(key, rec.next_in_uid);
            }
        } else {
            let mut previous = head;
            while previous != NIL {
                let next = self.slab.get(previous).next_in_uid;
                if next == index {
                    self.slab.get_mut(previous).next_in_uid = rec.next_in_uid;
                    break;
                }
                previous = next;
            }
        }
        self.gateway_unlink(index, &rec);
        self.wheel_unlink(index);
        self.devices.release(rec.device());
        if rec.has_meta() {
            self.meta.remove(&index);
        }
        self.slab.remove(index);
        self.len -= 1;
        self.online.fetch_sub(1, Ordering::Relaxed);
        session
    }

    /// Raises the last heartbeat to `at_ms` and moves the record to its new wheel slot.
    fn refresh(&mut self, index: u32, at_ms: u64) {
        let rec = self.slab.get_mut(index);
        if at_ms <= rec.last_heartbeat_ms.get() {
            return;
        }
        rec.last_heartbeat_ms = crate::hash::Packed64::new(at_ms);
        self.wheel_unlink(index);
        self.wheel_link(index);
    }

    fn gateway_link(&mut self, index: u32, gateway: GatewayId) {
        let slot = gateway as usize;
        if self.gateway_heads.len() <= slot {
            self.gateway_heads.resize(slot + 1, NIL);
            self.gateway_names.resize(slot + 1, None);
        }
        if self.gateway_names[slot].is_none() {
            // A private copy: see the `gateway_names` field.
            self.gateway_names[slot] = self.gateways.name(gateway).map(|name| Arc::from(&*name));
        }
        let head = self.gateway_heads[slot];
        let rec = self.slab.get_mut(index);
        rec.gateway_prev = NIL;
        rec.gateway_next = head;
        if head != NIL {
            self.slab.get_mut(head).gateway_prev = index;
        }
        self.gateway_heads[slot] = index;
    }

    fn gateway_unlink(&mut self, index: u32, rec: &Rec) {
        if rec.gateway_prev == NIL {
            self.gateway_heads[rec.gateway as usize] = rec.gateway_next;
        } else {
            self.slab.get_mut(rec.gateway_prev).gateway_next = rec.gateway_next;
        }
        if rec.gateway_next != NIL {
            self.slab.get_mut(rec.gateway_next).gateway_prev = rec.gateway_prev;
        }
        let _ = index;
    }

    fn cursor_sentinel(&self) -> u32 {
        SENTINEL_BASE + (self.wheel_cursor_s % u64::from(WHEEL_SLOTS)) as u32
    }

    fn wheel_next(&self, index: u32) -> u32 {
        if index >= SENTINEL_BASE {
            self.wheel[(index - SENTINEL_BASE) as usize][0]
        } else {
            self.slab.get(index).wheel_next
        }
    }

    fn wheel_prev(&self, index: u32) -> u32 {
        if index >= SENTINEL_BASE {
            self.wheel[(index - SENTINEL_BASE) as usize][1]
        } else {
            self.slab.get(index).wheel_prev
        }
    }

    fn set_wheel_next(&mut self, index: u32, next: u32) {
        if index >= SENTINEL_BASE {
            self.wheel[(index - SENTINEL_BASE) as usize][0] = next;
        } else {
            self.slab.get_mut(index).wheel_next = next;
        }
    }

    fn set_wheel_prev(&mut self, index: u32, prev: u32) {
        if index >= SENTINEL_BASE {
            self.wheel[(index - SENTINEL_BASE) as usize][1] = prev;
        } else {
            self.slab.get_mut(index).wheel_prev = prev;
        }
    }

    /// The sentinel of the slot a record with this deadline belongs in.
    fn wheel_sentinel_for(&self, deadline_ms: u64) -> u32 {
        let second = (deadline_ms / WHEEL_SLOT_MS).max(self.wheel_cursor_s);
        SENTINEL_BASE + (second % u64::from(WHEEL_SLOTS)) as u32
    }

    /// Appends the record at the tail of its slot, so that a walk in progress still meets it.
    fn wheel_link(&mut self, index: u32) {
        let sentinel = self.wheel_sentinel_for(self.slab.get(index).deadline_ms());
        let tail = self.wheel_prev(sentinel);
        self.set_wheel_next(tail, index);
        self.set_wheel_prev(index, tail);
        self.set_wheel_next(index, sentinel);
        self.set_wheel_prev(sentinel, index);
    }

    fn wheel_unlink(&mut self, index: u32) {
        let prev = self.wheel_prev(index);
        let next = self.wheel_next(index);
        self.set_wheel_next(prev, next);
        self.set_wheel_prev(next, prev);
        if self.wheel_walk_prev == index {
            self.wheel_walk_prev = prev;
        }
        let rec = self.slab.get_mut(index);
        rec.wheel_prev = NIL;
        rec.wheel_next = NIL;
    }

    // ----- invariants -------------------------------------------------------------------

    /// Verifies every index against the records (O(n)); describes the first violation.
    pub fn check_invariants(&self) -> Result<(), String> {
        let high_water = self.slab.high_water();
        let live = (0..high_water)
            .filter(|&index| self.slab.get(index).is_live())
            .count();
        if live != self.len {
            return Err(format!("len {} but {live} live records", self.len));
        }
        if self.slab.free_len() as usize != high_water as usize - live
            || self.slab.free_list_len() != self.slab.free_len()
        {
            return Err("free list does not match the free records".into());
        }
        self.check_uid_chains(high_water)?;
        self.check_gateway_lists(high_water)?;
        self.check_wheel(high_water)?;
        self.check_devices_and_meta(high_water)
    }

    fn check_uid_chains(&self, high_water: u32) -> Result<(), String> {
        let mut total = 0usize;
        for (key, &head) in &self.uids {
            let uid = key.get();
            if !self.scope.contains(uid) {
                return Err(format!("uid {uid} outside scope {:?}", self.scope));
            }
            let mut seen: Vec<(u32, u64)> = Vec::new();
            let mut index = head;
            while index != NIL {
                if index >= high_water || seen.len() > high_water as usize {
                    return Err(format!("uid {uid} chain is broken"));
                }
                let rec = self.slab.get(index);
                if !rec.is_live() || rec.uid.get() != uid {
                    return Err(format!("uid {uid} chain holds a foreign record {index}"));
                }
                let (device, conn) = (rec.device(), rec.conn.get());
                if seen.iter().any(|&(d, c)| d == device || c == conn) {
                    return Err(format!("uid {uid} has a duplicate device or conn"));
                }
                seen.push((device, conn));
                index = rec.next_in_uid;
            }
            if seen.is_empty() {
                return Err(format!("uid {uid} maps to no record"));
            }
            if seen.len() > self.options.sessions_per_uid_max {
                return Err(format!("uid {uid} has {} sessions", seen.len()));
            }
            total += seen.len();
        }
        if total != self.len {
            return Err(format!(
                "uid chains hold {total} records, len is {}",
                self.len
            ));
        }
        Ok(())
    }

    fn check_gateway_lists(&self, high_water: u32) -> Result<(), String> {
        let mut total = 0usize;
        for (gateway, &head) in self.gateway_heads.iter().enumerate() {
            let mut previous = NIL;
            let mut index = head;
            while index != NIL {
                if index >= high_water || total > self.len {
                    return Err(format!("gateway {gateway} list is broken"));
                }
                let rec = self.slab.get(index);
                let linked = rec.gateway as usize == gateway && rec.gateway_prev == previous;
                if !rec.is_live() || !linked {
                    return Err(format!("gateway {gateway} list is inconsistent at {index}"));
                }
                total += 1;
                previous = index;
                index = rec.gateway_next;
            }
        }
        if total != self.len {
            return Err(format!(
                "gateway lists hold {total} records, len is {}",
                self.len
            ));
        }
        Ok(())
    }

    fn check_wheel(&self, high_water: u32) -> Result<(), String> {
        let mut total = 0usize;
        let mut walk_prev_found = self.wheel_walk_prev == self.cursor_sentinel();
        for slot in 0..WHEEL_SLOTS {
            let sentinel = SENTINEL_BASE + slot;
            let mut previous = sentinel;
            let mut index = self.wheel_next(sentinel);
            while index != sentinel {
                if index >= high_water || total > self.len {
                    return Err(format!("wheel slot {slot} is broken"));
                }
                let rec = self.slab.get(index);
                if !rec.is_live() || rec.wheel_prev != previous {
                    return Err(format!("wheel slot {slot} is inconsistent at {index}"));
                }
                let deadline_s = rec.deadline_ms() / WHEEL_SLOT_MS;
                if deadline_s >= self.wheel_cursor_s
                    && (deadline_s % u64::from(WHEEL_SLOTS)) as u32 != slot
                {
                    return Err(format!(
                        "record {index} is in slot {slot}, not its deadline's"
                    ));
                }
                if index == self.wheel_walk_prev && sentinel == self.cursor_sentinel() {
                    walk_prev_found = true;
                }
                total += 1;
                previous = index;
                index = rec.wheel_next;
            }
            if self.wheel_prev(sentinel) != previous {
                return Err(format!("wheel slot {slot} tail is wrong"));
            }
        }
        if total != self.len {
            return Err(format!("wheel holds {total} records, len is {}", self.len));
        }
        if !walk_prev_found {
            return Err("wheel walk position is not in the cursor slot".into());
        }
        Ok(())
    }

    fn check_devices_and_meta(&self, high_water: u32) -> Result<(), String> {
        let mut refs = vec![0u32; self.devices.entries.len()];
        let mut with_meta = 0usize;
        for index in 0..high_water {
            let rec = self.slab.get(index);
            if !rec.is_live() {
                continue;
            }
            match refs.get_mut(rec.device() as usize) {
                Some(count) => *count += 1,
                None => return Err(format!("record {index} has an unknown device")),
            }
            if rec.has_meta() {
                with_meta += 1;
                if !self.meta.contains_key(&index) {
                    return Err(format!("record {index} lost its metadata"));
                }
            }
        }
        for (id, entry) in self.devices.entries.iter().enumerate() {
            if entry.refs != refs[id] {
                return Err(format!(
                    "device {id} has {} refs, {} users",
                    entry.refs, refs[id]
                ));
            }
            if entry.refs > 0 && self.devices.by_name.get(&*entry.name) != Some(&(id as u32)) {
                return Err(format!("device {id} is not indexed by name"));
            }
        }
        if self.devices.by_name.len() + self.devices.free.len() != self.devices.entries.len() {
            return Err("device free list does not match".into());
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
