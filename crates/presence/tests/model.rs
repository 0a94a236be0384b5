//! Model test: random operation sequences with time advancing, checked step by step against a
//! plain `BTreeMap` model with explicit expiry (a session is gone at the first tick with
//! `now >= last_heartbeat + ttl`; a gateway lease likewise takes its sessions with it).
//!
//! After every step: the operation's result equals the model's, every uid's lookup equals the
//! model's, `online_count` matches, and `check_invariants` passes.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use common::{DEVICES, GATEWAYS, Op, Outcome, UIDS, apply_op, op_strategy, sorted};
use imstate_presence::{LoginOutcome, PresenceError, RegistryOptions, Session, ShardedRegistry};
use proptest::prelude::*;

const SESSIONS_PER_UID_MAX: usize = 3;
const HEARTBEAT_BATCH_MAX: usize = 3;
const LOOKUP_IDS_MAX: usize = 2;
/// Fewer than the generators' gateways: logins and registrations meet the limit, and ids of
/// gateways no longer in use are reclaimed and rebound to other names.
const GATEWAYS_MAX: usize = 2;

fn options() -> RegistryOptions {
    RegistryOptions {
        shards: 3,
        sessions_per_uid_max: SESSIONS_PER_UID_MAX,
        heartbeat_batch_max: HEARTBEAT_BATCH_MAX,
        lookup_ids_max: LOOKUP_IDS_MAX,
        gateways_max: GATEWAYS_MAX,
        ..RegistryOptions::default()
    }
}

#[derive(Default)]
struct Model {
    sessions: BTreeMap<u64, Vec<Session>>,
    leases: BTreeMap<&'static str, (u32, u64)>,
}

impl Model {
    fn lookup(&self, uid: u64) -> Vec<Session> {
        sorted(self.sessions.get(&uid).cloned().unwrap_or_default())
    }

    fn remove_where(&mut self, mut drop: impl FnMut(&Session) -> bool) -> Vec<Session> {
        let mut removed = Vec::new();
        for list in self.sessions.values_mut() {
            let (gone, kept): (Vec<Session>, Vec<Session>) = list.drain(..).partition(&mut drop);
            removed.extend(gone);
            *list = kept;
        }
        self.sessions.retain(|_, list| !list.is_empty());
        removed
    }

    /// The gateway limit: a gateway with no session and no lease is new, and refused when
    /// `GATEWAYS_MAX` others have sessions or leases.
    fn gateway_limit(&self, gateway: &str) -> Option<PresenceError> {
        let mut in_use: BTreeSet<&str> = self.leases.keys().copied().collect();
        in_use.extend(self.sessions.values().flatten().map(|s| &*s.gateway));
        (!in_use.contains(gateway) && in_use.len() >= GATEWAYS_MAX).then(|| {
            PresenceError::GatewaysExceeded {
                gateway: gateway.to_owned(),
                max: GATEWAYS_MAX,
            }
        })
    }

    fn find(&mut self, uid: u64, conn: u64) -> Option<&mut Session> {
        self.sessions
            .get_mut(&uid)?
            .iter_mut()
            .find(|session| session.conn == conn)
    }

    fn apply(&mut self, op: &Op, now_ms: &mut u64) -> Outcome {
        let now = *now_ms;
        match op {
            Op::Login {
                uid,
                device,
                gateway,
                conn,
                ttl_ms,
                meta,
            } => {
                let device: Arc<str> = Arc::from(DEVICES[*device]);
                let limit = self.gateway_limit(GATEWAYS[*gateway]);
                let list = self.sessions.entry(*uid).or_default();
                if let Some(other) = list.iter().find(|s| s.conn == *conn && s.device != device) {
                    let error = PresenceError::ConnectionInUse {
                        uid: *uid,
                        conn: *conn,
                        device: other.device.to_string(),
                        gateway: other.gateway.to_string(),
                    };
                    self.sessions.retain(|_, list| !list.is_empty());
                    return Outcome::Login(Err(error));
                }
                let same = list.iter().position(|s| s.device == device);
                if same.is_none() && list.len() >= SESSIONS_PER_UID_MAX {
                    return Outcome::Login(Err(PresenceError::SessionsPerUidExceeded {
                        uid: *uid,
                        max: SESSIONS_PER_UID_MAX,
                    }));
                }
                if let Some(error) = limit {
                    self.sessions.retain(|_, list| !list.is_empty());
                    return Outcome::Login(Err(error));
                }
                let mut replaced = same.map(|position| list.remove(position));
                // A retry of the stored session (same device, gateway and conn) refreshes it:
                // it keeps its login time and replaces nothing.
                let refreshed = replaced
                    .as_ref()
                    .is_some_and(|old| old.conn == *conn && &*old.gateway == GATEWAYS[*gateway]);
                let login_ms = match (&replaced, refreshed) {
                    (Some(old), true) => old.login_ms,
                    _ => now / 1000 * 1000,
                };
                if refreshed {
                    replaced = None;
                }
                let session = Session {
                    uid: *uid,
                    device,
                    gateway: Arc::from(GATEWAYS[*gateway]),
                    conn: *conn,
                    login_ms,
                    last_heartbeat_ms: now,
                    ttl_ms: *ttl_ms,
                    meta: meta.map(|byte| Arc::from(vec![byte; usize::from(byte % 4)])),
                };
                list.push(session.clone());
                Outcome::Login(Ok(LoginOutcome {
                    session,
                    replaced,
                    refreshed,
                }))
            }
            Op::Logout { uid, conn } => {
                let removed = self.remove_where(|s| s.uid == *uid && s.conn == *conn);
                Outcome::Logout(
                    removed
                        .into_iter()
                        .next()
                        .ok_or(PresenceError::SessionNotFound {
                            uid: *uid,
                            conn: *conn,
                        }),
                )
            }
            Op::Heartbeat { uid, conn } => Outcome::Heartbeat(match self.find(*uid, *conn) {
                Some(session) => {
                    session.last_heartbeat_ms = session.last_heartbeat_ms.max(now);
                    Ok(())
                }
                None => Err(PresenceError::SessionNotFound {
                    uid: *uid,
                    conn: *conn,
                }),
            }),
            Op::HeartbeatBatch { gateway, sessions } => {
                if sessions.is_empty() || sessions.len() > HEARTBEAT_BATCH_MAX {
                    return Outcome::HeartbeatBatch(Err(PresenceError::BatchSize {
                        limit: "heartbeat_batch_max",
                        len: sessions.len(),
                        max: HEARTBEAT_BATCH_MAX,
                    }));
                }
                let mut unknown = Vec::new();
                for &(uid, conn) in sessions {
                    match self.find(uid, conn) {
                        Some(session) if &*session.gateway == GATEWAYS[*gateway] => {
                            session.last_heartbeat_ms = session.last_heartbeat_ms.max(now);
                        }
                        _ => unknown.push((uid, conn)),
                    }
                }
                Outcome::HeartbeatBatch(Ok(unknown))
            }
            Op::GatewayDown { gateway } => {
                let name = GATEWAYS[*gateway];
                self.leases.remove(name);
                Outcome::GatewayDown(self.remove_where(|s| &*s.gateway == name).len())
            }
            Op::GatewayRegister { gateway, ttl_ms } => {
                if let Some(error) = self.gateway_limit(GATEWAYS[*gateway]) {
                    return Outcome::Gateway(Err(error));
                }
                self.leases.insert(GATEWAYS[*gateway], (*ttl_ms, now));
                Outcome::Gateway(Ok(()))
            }
            Op::GatewayHeartbeat { gateway } => {
                let name = GATEWAYS[*gateway];
                Outcome::Gateway(match self.leases.get_mut(name) {
                    Some((_, last)) => {
                        *last = (*last).max(now);
                        Ok(())
                    }
                    None => Err(PresenceError::GatewayNotRegistered {
                        gateway: name.into(),
                    }),
                })
            }
            Op::Advance { ms } => {
                *now_ms += ms;
                let now = *now_ms;
                let lapsed: Vec<&str> = self
                    .leases
                    .iter()
                    .filter(|(_, (ttl, last))| last + u64::from(*ttl) <= now)
                    .map(|(name, _)| *name)
                    .collect();
                for name in &lapsed {
                    self.leases.remove(name);
                }
                let removed =
                    self.remove_where(|s| s.deadline_ms() <= now || lapsed.contains(&&*s.gateway));
                Outcome::Tick(sorted(removed))
            }
            Op::Lookup { uid } => Outcome::Lookup(self.lookup(*uid)),
            Op::LookupBatch { uids } => {
                if uids.is_empty() || uids.len() > LOOKUP_IDS_MAX {
                    return Outcome::LookupBatch(Err(PresenceError::BatchSize {
                        limit: "lookup_ids_max",
                        len: uids.len(),
                        max: LOOKUP_IDS_MAX,
                    }));
                }
                Outcome::LookupBatch(Ok(uids.iter().map(|uid| self.lookup(*uid)).collect()))
            }
        }
    }
}

fn run(ops: &[Op], start_ms: u64) -> Result<(), TestCaseError> {
    let registry = ShardedRegistry::new(options()).unwrap();
    let mut model = Model::default();
    let (mut now_registry, mut now_model) = (start_ms, start_ms);
    for (step, op) in ops.iter().enumerate() {
        let (got, _changes) = apply_op(&registry, op, &mut now_registry);
        let want = model.apply(op, &mut now_model);
        prop_assert_eq!(&got, &want, "step {} op {:?}", step, op);
        for uid in 0..UIDS {
            prop_assert_eq!(
                sorted(registry.lookup(uid)),
                model.lookup(uid),
                "uid {}",
                uid
            );
        }
        let online: usize = model.sessions.values().map(Vec::len).sum();
        prop_assert_eq!(registry.online_count(), online as u64);
        let leases: Vec<(String, u32, u64)> = registry
            .gateway_leases()
            .into_iter()
            .map(|lease| {
                (
                    lease.gateway.to_string(),
                    lease.ttl_ms,
                    lease.last_heartbeat_ms,
                )
            })
            .collect();
        let model_leases: Vec<(String, u32, u64)> = model
            .leases
            .iter()
            .map(|(name, (ttl, last))| (name.to_string(), *ttl, *last))
            .collect();
        prop_assert_eq!(leases, model_leases);
        if let Err(error) = registry.check_invariants() {
            return Err(TestCaseError::fail(format!("step {step}: {error}")));
        }
    }
    Ok(())
}

fn ops_strategy() -> impl Strategy<Value = (Vec<Op>, u64)> {
    (
        proptest::collection::vec(op_strategy(), 1..150),
        prop_oneof![Just(0u64), 1_000_000u64..2_000_000, Just(1_700_000_000_000)],
    )
}

#[cfg(not(feature = "planted-reclaim-frees-used-gateways"))]
proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn registry_matches_model_under_random_operations((ops, start_ms) in ops_strategy()) {
        run(&ops, start_ms)?;
    }
}

/// Negative control: with a reclaim that frees ids sessions still hold, the same model test
/// must fail (sessions then show another gateway's name, or the invariants break).
#[cfg(feature = "planted-reclaim-frees-used-gateways")]
#[test]
fn planted_reclaim_of_used_gateway_ids_is_caught() {
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 512,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let result = runner.run(&ops_strategy(), |(ops, start_ms)| run(&ops, start_ms));
    assert!(
        result.is_err(),
        "the model test missed a reclaim that frees gateway ids in use"
    );
}
