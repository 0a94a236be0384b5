//! Helpers shared by the integration tests.
#![allow(dead_code)]

use imstate_presence::{LoginRequest, RegistryOptions, ShardedRegistry};

/// A registry with `shards` shards and otherwise default options.
pub fn registry(shards: usize) -> ShardedRegistry {
    ShardedRegistry::new(RegistryOptions {
        shards,
        ..RegistryOptions::default()
    })
    .unwrap()
}

/// A login request with no metadata.
pub fn request<'a>(
    uid: u64,
    device: &'a str,
    gateway: &'a str,
    conn: u64,
    ttl_ms: u32,
) -> LoginRequest<'a> {
    LoginRequest {
        uid,
        device,
        gateway,
        conn,
        ttl_ms,
        meta: None,
    }
}

use imstate_presence::{Change, Event, LoginOutcome, PresenceError, Session};
use proptest::prelude::*;

/// Devices, gateways and id ranges are small so that random operations collide often.
pub const DEVICES: [&str; 3] = ["ios", "android", "pc"];
/// Gateway names used by the generators.
pub const GATEWAYS: [&str; 4] = ["gw-0", "gw-1", "gw-2", "gw-3"];
/// Uids used by the generators: `0..UIDS`.
pub const UIDS: u64 = 8;

/// One random registry operation.
#[derive(Debug, Clone)]
pub enum Op {
    /// Login.
    Login {
        uid: u64,
        device: usize,
        gateway: usize,
        conn: u64,
        ttl_ms: u32,
        meta: Option<u8>,
    },
    /// Logout.
    Logout { uid: u64, conn: u64 },
    /// Single heartbeat.
    Heartbeat { uid: u64, conn: u64 },
    /// Per-gateway heartbeat batch (possibly empty: an error).
    HeartbeatBatch {
        gateway: usize,
        sessions: Vec<(u64, u64)>,
    },
    /// Drop a gateway.
    GatewayDown { gateway: usize },
    /// Register a gateway lease.
    GatewayRegister { gateway: usize, ttl_ms: u32 },
    /// Renew a gateway lease.
    GatewayHeartbeat { gateway: usize },
    /// Advance the clock, then tick.
    Advance { ms: u64 },
    /// Single lookup.
    Lookup { uid: u64 },
    /// Batch lookup (possibly empty: an error).
    LookupBatch { uids: Vec<u64> },
}

/// Generates operations, weighted towards logins, heartbeats and time passing.
pub fn op_strategy() -> impl Strategy<Value = Op> {
    let uid = 0..UIDS;
    let conn = 0..6u64;
    prop_oneof![
        6 => (uid.clone(), 0..DEVICES.len(), 0..GATEWAYS.len(), conn.clone(), 1..4_000u32,
              proptest::option::of(any::<u8>()))
            .prop_map(|(uid, device, gateway, conn, ttl_ms, meta)| Op::Login {
                uid, device, gateway, conn, ttl_ms, meta
            }),
        2 => (uid.clone(), conn.clone()).prop_map(|(uid, conn)| Op::Logout { uid, conn }),
        4 => (uid.clone(), conn.clone()).prop_map(|(uid, conn)| Op::Heartbeat { uid, conn }),
        2 => (0..GATEWAYS.len(), proptest::collection::vec((uid.clone(), conn), 0..5))
            .prop_map(|(gateway, sessions)| Op::HeartbeatBatch { gateway, sessions }),
        1 => (0..GATEWAYS.len()).prop_map(|gateway| Op::GatewayDown { gateway }),
        1 => (0..GATEWAYS.len(), 1..6_000u32)
            .prop_map(|(gateway, ttl_ms)| Op::GatewayRegister { gateway, ttl_ms }),
        2 => (0..GATEWAYS.len()).prop_map(|gateway| Op::GatewayHeartbeat { gateway }),
        5 => (0..2_500u64).prop_map(|ms| Op::Advance { ms }),
        2 => uid.clone().prop_map(|uid| Op::Lookup { uid }),
        1 => proptest::collection::vec(uid, 0..4).prop_map(|uids| Op::LookupBatch { uids }),
    ]
}

/// What an operation returned, reduced to what a model can predict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Login result.
    Login(Result<LoginOutcome, PresenceError>),
    /// Logout result.
    Logout(Result<Session, PresenceError>),
    /// Heartbeat result (the change is checked elsewhere).
    Heartbeat(Result<(), PresenceError>),
    /// Unknown sessions of a heartbeat batch.
    HeartbeatBatch(Result<Vec<(u64, u64)>, PresenceError>),
    /// Sessions dropped by gateway_down.
    GatewayDown(usize),
    /// Register / gateway heartbeat result.
    Gateway(Result<(), PresenceError>),
    /// Sessions removed by the tick, sorted by (uid, conn).
    Tick(Vec<Session>),
    /// Lookup result, sorted by conn.
    Lookup(Vec<Session>),
    /// Batch lookup result, each sorted by conn.
    LookupBatch(Result<Vec<Vec<Session>>, PresenceError>),
}

/// Sorts sessions by (uid, conn) for comparisons (lookup order is storage order).
pub fn sorted(mut sessions: Vec<Session>) -> Vec<Session> {
    sessions.sort_by_key(|session| (session.uid, session.conn));
    sessions
}

/// Runs `op` on `registry` at `*now_ms` (advancing it for `Advance`), returning what it
/// returned and the log records it produced.
pub fn apply_op(
    registry: &imstate_presence::ShardedRegistry,
    op: &Op,
    now_ms: &mut u64,
) -> (Outcome, Vec<Change>) {
    let now = *now_ms;
    let mut changes = Vec::new();
    let outcome = match op {
        Op::Login {
            uid,
            device,
            gateway,
            conn,
            ttl_ms,
            meta,
        } => {
            let meta_bytes = meta.map(|byte| vec![byte; usize::from(byte % 4)]);
            let request = imstate_presence::LoginRequest {
                uid: *uid,
                device: DEVICES[*device],
                gateway: GATEWAYS[*gateway],
                conn: *conn,
                ttl_ms: *ttl_ms,
                meta: meta_bytes.as_deref(),
            };
            let result = registry.login(&request, now);
            if let Ok(outcome) = &result {
                changes.push(outcome.event().change());
            }
            Outcome::Login(result)
        }
        Op::Logout { uid, conn } => {
            let result = registry.logout(*uid, *conn);
            if let Ok(session) = &result {
                changes.push(
                    Event::Logout {
                        session: session.clone(),
                    }
                    .change(),
                );
            }
            Outcome::Logout(result)
        }
        Op::Heartbeat { uid, conn } => {
            let result = registry.heartbeat(*uid, *conn, now);
            Outcome::Heartbeat(result.map(|change| changes.push(change)))
        }
        Op::HeartbeatBatch { gateway, sessions } => {
            let result = registry.heartbeat_batch(GATEWAYS[*gateway], sessions, now);
            Outcome::HeartbeatBatch(result.map(|outcome| {
                changes.extend(outcome.changes);
                outcome.unknown
            }))
        }
        Op::GatewayDown { gateway } => {
            let outcome = registry.gateway_down(GATEWAYS[*gateway]);
            changes.extend(outcome.events.iter().map(Event::change));
            Outcome::GatewayDown(outcome.dropped())
        }
        Op::GatewayRegister { gateway, ttl_ms } => {
            let result = registry.gateway_register(GATEWAYS[*gateway], *ttl_ms, now);
            Outcome::Gateway(result.map(|change| changes.push(change)))
        }
        Op::GatewayHeartbeat { gateway } => {
            let result = registry.gateway_heartbeat(GATEWAYS[*gateway], now);
            Outcome::Gateway(result.map(|change| changes.push(change)))
        }
        Op::Advance { ms } => {
            *now_ms += ms;
            let events = registry.tick(*now_ms);
            changes.extend(events.iter().map(Event::change));
            let mut removed = Vec::new();
            for event in events {
                match event {
                    Event::Expire { session } => removed.push(session),
                    Event::GatewayDown { sessions, .. } => removed.extend(sessions),
                    Event::GatewayUnregister { .. } => {}
                    other => panic!("tick produced {other:?}"),
                }
            }
            Outcome::Tick(sorted(removed))
        }
        Op::Lookup { uid } => Outcome::Lookup(sorted(registry.lookup(*uid))),
        Op::LookupBatch { uids } => Outcome::LookupBatch(
            registry
                .lookup_batch(uids)
                .map(|found| found.into_iter().map(sorted).collect()),
        ),
    };
    (outcome, changes)
}
