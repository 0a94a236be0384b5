//! The values that flow in and out of the registry: requests, sessions, events and changes.
//!
//! ```text
//!  LoginRequest ──► login ──► LoginOutcome ──► Event::Login ──► Change::Login (WAL)
//!  (uid, conn)  ──► logout / tick / gateway_down ──► Event::{Logout, Expire, GatewayDown}
//!  (uid, conn)  ──► heartbeat(_batch) ──► Change::Heartbeat(Batch)   (no watch event)
//! ```
//!
//! An [`Event`] is what watchers see: it carries whole sessions. A [`Change`] is what the log
//! stores: the smallest absolute record that reproduces the mutation when replayed in order,
//! even onto a fuzzy snapshot (see [`Change`]). [`Event::change`] maps one to the other, so the
//! two can never disagree.

use std::sync::Arc;

/// One connection of a user.
///
/// Names are shared `Arc<str>`s owned by the shard, so returning a session copies no string.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Session {
    /// The user id.
    pub uid: u64,
    /// The device (kind or id), at most [`crate::DEVICE_BYTES_MAX`] bytes.
    pub device: Arc<str>,
    /// The gateway holding the connection, at most [`crate::GATEWAY_NAME_BYTES_MAX`] bytes.
    pub gateway: Arc<str>,
    /// The connection id, unique within the uid.
    pub conn: u64,
    /// Login time, kept at second precision (a multiple of 1000).
    pub login_ms: u64,
    /// Last heartbeat time (the login time until the first heartbeat).
    pub last_heartbeat_ms: u64,
    /// Time to live after the last heartbeat.
    pub ttl_ms: u32,
    /// Optional metadata, at most [`crate::META_BYTES_MAX`] bytes.
    pub meta: Option<Arc<[u8]>>,
}

impl Session {
    /// The borrowed view of this session.
    pub fn as_ref(&self) -> SessionRef<'_> {
        SessionRef {
            uid: self.uid,
            device: &self.device,
            gateway: &self.gateway,
            conn: self.conn,
            login_ms: self.login_ms,
            last_heartbeat_ms: self.last_heartbeat_ms,
            ttl_ms: self.ttl_ms,
            meta: self.meta.as_deref(),
        }
    }

    /// When the session expires unless it is refreshed: `last_heartbeat_ms + ttl_ms`.
    pub fn deadline_ms(&self) -> u64 {
        self.last_heartbeat_ms
            .saturating_add(u64::from(self.ttl_ms))
    }
}

/// A session borrowed from the registry for the length of a visit
/// ([`crate::ShardedRegistry::lookup_batch_visit`]): what a [`Session`] holds, with no
/// reference count touched and nothing allocated, so a batch lookup can encode straight into a
/// reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionRef<'a> {
    /// The user id.
    pub uid: u64,
    /// The device.
    pub device: &'a str,
    /// The gateway holding the connection.
    pub gateway: &'a str,
    /// The connection id.
    pub conn: u64,
    /// Login time (second precision).
    pub login_ms: u64,
    /// Last heartbeat time.
    pub last_heartbeat_ms: u64,
    /// Time to live after the last heartbeat.
    pub ttl_ms: u32,
    /// Optional metadata.
    pub meta: Option<&'a [u8]>,
}

/// A login. Borrowed so the node can pass fields straight from a decoded request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginRequest<'a> {
    /// The user id.
    pub uid: u64,
    /// The device; a login on a device that already has a session replaces it.
    pub device: &'a str,
    /// The gateway holding the connection.
    pub gateway: &'a str,
    /// The connection id; must be unique within the uid.
    pub conn: u64,
    /// Time to live after the last heartbeat.
    pub ttl_ms: u32,
    /// Optional metadata.
    pub meta: Option<&'a [u8]>,
}

/// What a login did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginOutcome {
    /// The session as stored.
    pub session: Session,
    /// The session of the same (uid, device) that the login replaced: the gateway should kick
    /// that connection.
    pub replaced: Option<Session>,
    /// True when the login repeated the stored session's (device, gateway, conn): a retry
    /// that refreshed the session (ttl, metadata, heartbeat) instead of replacing it. Such a
    /// login is logged but emits no Watch event, like a heartbeat.
    pub refreshed: bool,
}

impl LoginOutcome {
    /// The watch event of this login.
    pub fn event(&self) -> Event {
        Event::Login {
            session: self.session.clone(),
            replaced: self.replaced.clone(),
        }
    }

    /// The log record of this login.
    pub fn change(&self) -> Change {
        Change::Login(self.session.clone())
    }
}

/// The part of the uid space a shard owns: `uid % count == index`.
///
/// Carried by [`Change::GatewayDown`] because a registry drops a gateway shard by shard while
/// other shards keep taking logins: the record must drop only what its shard dropped, whatever
/// the shard count of the registry that replays it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ShardScope {
    /// This shard's index.
    pub index: u32,
    /// The number of shards.
    pub count: u32,
}

impl ShardScope {
    /// The whole uid space (a standalone shard).
    pub const ALL: ShardScope = ShardScope { index: 0, count: 1 };

    /// Whether `uid` falls in this scope.
    pub fn contains(&self, uid: u64) -> bool {
        self.count != 0 && uid % u64::from(self.count) == u64::from(self.index)
    }
}

/// A mutation as watchers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A session logged in, possibly replacing the session of the same (uid, device).
    Login {
        /// The new session.
        session: Session,
        /// The replaced session, if any.
        replaced: Option<Session>,
    },
    /// A session logged out.
    Logout {
        /// The removed session.
        session: Session,
    },
    /// A session expired: no heartbeat for its ttl.
    Expire {
        /// The removed session.
        session: Session,
    },
    /// One shard dropped every session of a gateway (gateway down or its lease lapsed).
    GatewayDown {
        /// The gateway.
        gateway: Arc<str>,
        /// The shard that dropped them.
        scope: ShardScope,
        /// The removed sessions.
        sessions: Vec<Session>,
    },
    /// A gateway registration ended.
    GatewayUnregister {
        /// The gateway.
        gateway: Arc<str>,
        /// True when its lease lapsed, false when `gateway_down` was called.
        lapsed: bool,
    },
}

impl Event {
    /// The log record that reproduces this event on replay.
    pub fn change(&self) -> Change {
        match self {
            Event::Login { session, .. } => Change::Login(session.clone()),
            Event::Logout { session } => Change::Logout {
                uid: session.uid,
                conn: session.conn,
            },
            Event::Expire { session } => Change::Expire {
                uid: session.uid,
                conn: session.conn,
            },
            Event::GatewayDown { gateway, scope, .. } => Change::GatewayDown {
                gateway: gateway.clone(),
                scope: *scope,
            },
            Event::GatewayUnregister { gateway, .. } => Change::GatewayUnregister {
                gateway: gateway.clone(),
            },
        }
    }
}

/// A log record: one mutation in absolute terms, idempotent when replayed in order.
///
/// Replay rules (`apply_change`), chosen so that replaying a suffix of the stream onto a fuzzy
/// snapshot (taken while the stream was being produced) converges to the live state:
///
/// - `Login` carries the whole session and sets it: it first removes any session of the uid
///   with the same device or the same connection.
/// - Heartbeats carry an absolute time and raise `last_heartbeat_ms` to it (a maximum, so an
///   old heartbeat replayed onto newer state changes nothing); unknown sessions are skipped.
/// - `Logout`, `Expire` remove by (uid, conn); `GatewayDown` removes the gateway's sessions in
///   its scope; missing ones are skipped.
/// - Gateway registrations are set, raised and removed the same way.
///
/// No limit is enforced on replay: the op that produced the record was validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Set this session (replacing same device or same connection of its uid).
    Login(Session),
    /// Raise the last heartbeat of (uid, conn) to `at_ms`.
    Heartbeat {
        /// The uid.
        uid: u64,
        /// The connection.
        conn: u64,
        /// The heartbeat time.
        at_ms: u64,
    },
    /// Raise the last heartbeat of every (uid, conn) listed to `at_ms`.
    HeartbeatBatch {
        /// The heartbeat time.
        at_ms: u64,
        /// The sessions refreshed, as (uid, conn).
        sessions: Vec<(u64, u64)>,
    },
    /// Remove (uid, conn): logout.
    Logout {
        /// The uid.
        uid: u64,
        /// The connection.
        conn: u64,
    },
    /// Remove (uid, conn): expiry.
    Expire {
        /// The uid.
        uid: u64,
        /// The connection.
        conn: u64,
    },
    /// Remove every session of `gateway` whose uid is in `scope`.
    GatewayDown {
        /// The gateway.
        gateway: Arc<str>,
        /// The uids concerned.
        scope: ShardScope,
    },
    /// Register (or re-register) a gateway lease.
    GatewayRegister {
        /// The gateway.
        gateway: Arc<str>,
        /// Lease ttl.
        ttl_ms: u32,
        /// Registration time, the first heartbeat.
        at_ms: u64,
    },
    /// Raise a gateway lease's last heartbeat to `at_ms`.
    GatewayHeartbeat {
        /// The gateway.
        gateway: Arc<str>,
        /// The heartbeat time.
        at_ms: u64,
    },
    /// Remove a gateway lease.
    GatewayUnregister {
        /// The gateway.
        gateway: Arc<str>,
    },
}

/// A registered gateway and its liveness lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayLease {
    /// The gateway.
    pub gateway: Arc<str>,
    /// The lease lapses `ttl_ms` after the last heartbeat.
    pub ttl_ms: u32,
    /// The last gateway heartbeat (or the registration).
    pub last_heartbeat_ms: u64,
}

/// What a per-gateway heartbeat batch did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HeartbeatBatchOutcome {
    /// Entries with no session of this gateway, in request order: the gateway should
    /// re-register (log in) those connections.
    pub unknown: Vec<(u64, u64)>,
    /// Log records of the refreshed sessions (one per shard touched).
    pub changes: Vec<Change>,
}

/// What `gateway_down` did: an unregister event if the gateway had a lease, then one
/// [`Event::GatewayDown`] per shard that held sessions of it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GatewayDownOutcome {
    /// The events, in the order they happened.
    pub events: Vec<Event>,
}

impl GatewayDownOutcome {
    /// Number of sessions dropped.
    pub fn dropped(&self) -> usize {
        self.events
            .iter()
            .map(|event| match event {
                Event::GatewayDown { sessions, .. } => sessions.len(),
                // A gateway drop restricted to some slots (cluster mode).
                Event::Logout { .. } => 1,
                _ => 0,
            })
            .sum()
    }
}
