//! `imstate-presence`: the online-session registry (the IM "Router") as a pure data structure.
//!
//! The registry answers "where is this user connected right now?": uid -> up to
//! [`RegistryOptions::sessions_per_uid_max`] sessions, each a (device, gateway, connection) with
//! a login time, a last heartbeat, a ttl and optional small metadata. It has no I/O, no clock and
//! no runtime: every operation takes `now_ms` as an input and returns what changed, so the node
//! can log it (WAL), publish it (watchers) and replay it (recovery, replicas).
//!
//! # Layout
//!
//! ```text
//!  ShardedRegistry ── uid % shards ──► Mutex<Shard> x 64 (no cross-shard contention)
//!     │                                  │ slab of 36-byte session records (chunked)
//!     │                                  │ uid index: open addressing, u32 record indices
//!     │                                  │ timing wheel, singly linked through the records
//!     │                                  └ profiles (device, ttl), interned per shard
//!     ├─ Gateways (RwLock): gateway name <-> 16-bit id, shared by all shards
//!     └─ gateway leases (Mutex): registered gateways and their ttl
//!
//!  op(request, now_ms) ──► Result<outcome> ──► Event (watchers) ──► Change (WAL record)
//!  Change ──► encode/decode (bytes) ──► apply_change (replay, no limits enforced)
//!  snapshot_shard(i) / snapshot_gateways ──► bytes (~14 B/session) ──► restore (2 threads)
//! ```
//!
//! # Invariants
//!
//! - **P2 expiry**: a session whose `last_heartbeat_ms + ttl_ms <= now_ms` is removed by the
//!   first `tick` at `now_ms`; tick cost is proportional to the sessions it visits in the
//!   wheel slots that are due, never to the number stored, and it can be split into bounded
//!   steps ([`ShardedRegistry::tick_shard`]) so no lock is held for long.
//! - **B1 bounded**: sessions per uid, device / gateway / metadata bytes, batch sizes, ttl and
//!   the number of gateway names each have a named limit; exceeding one returns a
//!   [`PresenceError`] naming it and changes nothing.
//! - At most one session per (uid, device) and per (uid, connection); `check_invariants`
//!   verifies that every index agrees with the records and that counts match.
//! - Replaying the [`Change`] stream in order onto any fuzzy snapshot taken during that stream
//!   yields the live state: changes carry absolute values (full session on login, absolute
//!   heartbeat time applied as a maximum, removals by key).

//!
//! # Choices
//!
//! - A login on a connection the uid already uses on *another* device is refused
//!   ([`PresenceError::ConnectionInUse`]): a connection has one device for life, so this is a
//!   gateway bug, and refusing keeps "one session per (uid, conn)" without dropping a second
//!   session behind the caller's back. Same device and same connection is a plain re-login.
//! - Lookups do not hide sessions that are due but not yet ticked; the node ticks every
//!   100-1000 ms, so a session is gone within `ttl + tick` (P2).
//! - Login time is kept at second precision (`login_ms` is a multiple of 1000); heartbeat
//!   times and deadlines are exact milliseconds up to [`TIME_MS_MAX`] (year 10889).
//! - Lookups return a uid's sessions newest login first (ties: highest connection id).
//!
//! # Memory
//!
//! Measured with a counting allocator (`cargo run --release -p imstate-presence --example
//! memory_per_session -- 1000000`), 64 shards, device kinds, 200 gateways, no metadata:
//! 42.2 B per session at 1 M sessions (one session per uid, or 1.5 per uid); 50.2 B when 10%
//! carry 32 B of metadata. Where it goes:
//!
//! - 36 B: the record (uid, connection, 48-bit heartbeat + 16-bit gateway id, login second,
//!   28-bit profile id + flags, one wheel link). No per-uid or per-gateway links: the uid
//!   index finds a uid's sessions, `gateway_down` scans its shard.
//! - about 5 B: the uid index, 4-byte buckets at a load factor kept between 0.7 and 0.875.
//! - about 1 B: the unused tail of the last 512-record slab chunk of each shard.
//!
//! Removed sessions keep their record until the expiry walk passes it (at most
//! `min(ttl, 68 min)` later; see the shard module). Chunks and index capacity are kept after
//! sessions leave (reused, not returned).
//!
//! # Limits of the compact layout (B1)
//!
//! - [`GATEWAY_IDS_MAX`]: 65,536 gateway names bound at once (ids are 16 bits). Ids of
//!   gateways with no session and no lease are reclaimed when a limit is met
//!   ([`ShardedRegistry::reclaim_gateways`]); `gateways_max` is at most half of it
//!   ([`GATEWAYS_MAX_LIMIT`]) so that replay keeps headroom. Beyond either,
//!   [`PresenceError::GatewaysExceeded`] names the limit.
//! - 33,554,431 records per shard (25-bit record indices in the uid index): beyond it,
//!   [`PresenceError::ShardFull`].
//! - [`TIME_MS_MAX`]: heartbeat times are 48-bit milliseconds; a later time is stored as
//!   that maximum (no clock reaches it before the year 10889).
//! - 2^28 distinct (device, ttl) profiles per shard: never reached, a shard holds fewer
//!   records than that.

#![deny(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

// A planted bug exists only to prove that the tests catch it; it must never ship.
#[cfg(all(feature = "planted-reclaim-frees-used-gateways", not(debug_assertions)))]
compile_error!("the `planted-reclaim-frees-used-gateways` feature is for test builds only");

mod codec;
mod error;
mod gateways;
mod hash;
mod index;
mod prefetch;
mod registry;
mod shard;
mod slab;
mod slots;
mod snapshot;
mod types;

pub use codec::{CHANGE_FORMAT_VERSION, DecodeError};
pub use error::PresenceError;
pub use gateways::{GATEWAY_IDS_MAX, GATEWAYS_MAX_LIMIT, GatewayId, Gateways};
pub use registry::{Entry, Journal, NoJournal, ShardedRegistry};
pub use registry::{RESTORE_THREADS, SNAPSHOT_SESSIONS_PER_LOCK};
pub use shard::{
    DEFERRED_EXPIRY_RECHECK_MS, Shard, TickProgress, WHEEL_SLOT_MS, WHEEL_SLOTS,
    check_gateway_name,
};
pub use slab::TIME_MS_MAX;
pub use slots::SlotSet;
pub use snapshot::{RestoreStats, SNAPSHOT_FORMAT_VERSION, SnapshotError};
pub use types::{
    Change, Event, GatewayDownOutcome, GatewayLease, HeartbeatBatchOutcome, LoginOutcome,
    LoginRequest, Session, SessionRef, ShardScope,
};

/// Longest device name in bytes: devices are kinds ("ios", "pc") or short device ids.
pub const DEVICE_BYTES_MAX: usize = 64;
/// Longest gateway name in bytes (a host:port or a pod name fits comfortably).
pub const GATEWAY_NAME_BYTES_MAX: usize = 128;
/// Largest metadata blob per session in bytes; it is stored out of line only when present.
pub const META_BYTES_MAX: usize = 256;
/// Default for [`RegistryOptions::sessions_per_uid_max`].
pub const SESSIONS_PER_UID_MAX_DEFAULT: usize = 16;
/// Default for [`RegistryOptions::heartbeat_batch_max`].
pub const HEARTBEAT_BATCH_MAX_DEFAULT: usize = 10_000;
/// Default for [`RegistryOptions::lookup_ids_max`].
pub const LOOKUP_IDS_MAX_DEFAULT: usize = 10_000;
/// Default for [`RegistryOptions::gateways_max`].
pub const GATEWAYS_MAX_DEFAULT: usize = 16_384;
/// Default for [`RegistryOptions::ttl_ms_max`]: one day.
pub const TTL_MS_MAX_DEFAULT: u32 = 86_400_000;
/// Hard ceiling for any ttl: `i32::MAX` ms, about 24.8 days.
pub const TTL_MS_MAX_LIMIT: u32 = i32::MAX as u32;
/// Default for [`RegistryOptions::shards`].
pub const SHARDS_DEFAULT: usize = 64;
/// Hard ceiling for [`RegistryOptions::shards`].
pub const SHARDS_MAX: usize = 65_536;
/// How many wheel entries [`ShardedRegistry::tick`] visits per shard lock acquisition.
///
/// Each visit costs well under a microsecond, so one lock hold stays far below the 5 ms lookup
/// p99 goal even while a million sessions expire at once.
pub const TICK_VISITS_PER_LOCK: usize = 2_048;

/// Tunable limits and sizing of a registry. Every field is a named limit (B1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegistryOptions {
    /// Number of shards (`uid % shards`); each is an independent lock.
    pub shards: usize,
    /// Sessions one uid may hold at once; a login beyond it is refused.
    pub sessions_per_uid_max: usize,
    /// Entries in one `heartbeat_batch` call.
    pub heartbeat_batch_max: usize,
    /// Ids in one `lookup_batch` call.
    pub lookup_ids_max: usize,
    /// Gateways in use at once (with a session or a lease), at most [`GATEWAYS_MAX_LIMIT`];
    /// names no longer in use are reclaimed when the limit is met.
    pub gateways_max: usize,
    /// Largest session or gateway ttl accepted (at most [`TTL_MS_MAX_LIMIT`]).
    pub ttl_ms_max: u32,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        Self {
            shards: SHARDS_DEFAULT,
            sessions_per_uid_max: SESSIONS_PER_UID_MAX_DEFAULT,
            heartbeat_batch_max: HEARTBEAT_BATCH_MAX_DEFAULT,
            lookup_ids_max: LOOKUP_IDS_MAX_DEFAULT,
            gateways_max: GATEWAYS_MAX_DEFAULT,
            ttl_ms_max: TTL_MS_MAX_DEFAULT,
        }
    }
}

impl RegistryOptions {
    /// Checks that the options are usable: every count at least 1, shards and ttl within their
    /// hard ceilings.
    pub fn validate(&self) -> Result<(), PresenceError> {
        let fields: [(&'static str, usize, usize); 5] = [
            ("shards", self.shards, SHARDS_MAX),
            (
                "sessions_per_uid_max",
                self.sessions_per_uid_max,
                u16::MAX as usize,
            ),
            (
                "heartbeat_batch_max",
                self.heartbeat_batch_max,
                u32::MAX as usize,
            ),
            ("lookup_ids_max", self.lookup_ids_max, u32::MAX as usize),
            ("gateways_max", self.gateways_max, GATEWAYS_MAX_LIMIT),
        ];
        for (name, value, max) in fields {
            if value == 0 || value > max {
                return Err(PresenceError::InvalidOption {
                    name,
                    value: value as u64,
                });
            }
        }
        if self.ttl_ms_max == 0 || self.ttl_ms_max > TTL_MS_MAX_LIMIT {
            return Err(PresenceError::InvalidOption {
                name: "ttl_ms_max",
                value: u64::from(self.ttl_ms_max),
            });
        }
        Ok(())
    }
}
