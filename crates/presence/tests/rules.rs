//! One test per registry rule: replacement, limits, unknown sessions, batches, gateway_down,
//! online_count. Each refused operation is checked to change nothing.

mod common;

use common::{registry, request};
use std::sync::Arc;

use imstate_presence::{
    Change, Entry, Event, Journal, LoginRequest, PresenceError, RegistryOptions, Session, Shard,
    ShardedRegistry,
};

#[test]
fn login_on_same_device_replaces_and_returns_the_old_session() {
    let registry = registry(4);
    let first = registry
        .login(&request(7, "ios", "gw-1", 100, 30_000), 1_000)
        .unwrap();
    assert!(first.replaced.is_none());
    let second = registry
        .login(&request(7, "ios", "gw-2", 200, 30_000), 2_500)
        .unwrap();
    let replaced = second.replaced.clone().unwrap();
    assert_eq!(replaced, first.session);
    assert_eq!(&*replaced.gateway, "gw-1");
    assert_eq!(
        second.session.login_ms, 2_000,
        "login time is kept at second precision"
    );
    assert_eq!(second.session.last_heartbeat_ms, 2_500);
    assert_eq!(registry.lookup(7), vec![second.session.clone()]);
    assert_eq!(registry.online_count(), 1);
    assert_eq!(second.change(), Change::Login(second.session.clone()));
    registry.check_invariants().unwrap();
}

#[test]
fn login_on_another_device_adds_a_session() {
    let registry = registry(4);
    registry
        .login(&request(7, "ios", "gw-1", 100, 30_000), 0)
        .unwrap();
    registry
        .login(&request(7, "pc", "gw-1", 101, 30_000), 0)
        .unwrap();
    let mut devices: Vec<String> = registry
        .lookup(7)
        .iter()
        .map(|session| session.device.to_string())
        .collect();
    devices.sort();
    assert_eq!(devices, ["ios", "pc"]);
    registry.check_invariants().unwrap();
}

/// Keeps whether each journalled entry was a Watch event or a plain change.
#[derive(Default)]
struct Kinds(std::sync::Mutex<Vec<&'static str>>);

impl Journal for Kinds {
    fn record(&self, entry: Entry<'_>) {
        let kind = match entry {
            Entry::Event(_) => "event",
            Entry::Change(_) => "change",
        };
        self.0.lock().unwrap().push(kind);
    }
}

#[test]
fn repeated_identical_login_refreshes_the_session_and_replaces_nothing() {
    let kinds = Arc::new(Kinds::default());
    let options = RegistryOptions {
        shards: 1,
        ..RegistryOptions::default()
    };
    let registry = ShardedRegistry::with_journal(options, kinds.clone()).unwrap();
    let first = registry
        .login(&request(1, "ios", "gw", 5, 1_000), 0)
        .unwrap();
    assert!(!first.refreshed);
    let again = registry
        .login(&request(1, "ios", "gw", 5, 2_000), 1_500)
        .unwrap();
    assert_eq!(
        again.replaced, None,
        "a retry must not report that it replaced itself"
    );
    assert!(again.refreshed);
    assert_eq!(
        again.session.login_ms, first.session.login_ms,
        "same session"
    );
    assert_eq!(
        again.session.last_heartbeat_ms, 1_500,
        "heartbeat refreshed"
    );
    assert_eq!(again.session.ttl_ms, 2_000, "ttl refreshed");
    assert_eq!(registry.lookup(1), vec![again.session.clone()]);
    assert_eq!(
        *kinds.0.lock().unwrap(),
        ["event", "change"],
        "logged, but no second Watch event"
    );
    // The same connection on another gateway is a new connection: a replacement.
    let moved = registry
        .login(&request(1, "ios", "gw-2", 5, 2_000), 2_000)
        .unwrap();
    assert_eq!(moved.replaced, Some(again.session));
    assert!(!moved.refreshed);
    registry.check_invariants().unwrap();
}

#[test]
fn login_of_a_connection_in_use_on_another_device_is_refused() {
    let registry = registry(1);
    registry
        .login(&request(1, "ios", "gw", 5, 1_000), 0)
        .unwrap();
    let before = registry.sessions();
    let error = registry
        .login(&request(1, "pc", "gw", 5, 1_000), 10)
        .unwrap_err();
    assert_eq!(
        error,
        PresenceError::ConnectionInUse {
            uid: 1,
            conn: 5,
            device: "ios".into(),
            gateway: "gw".into(),
        }
    );
    assert!(
        error
            .to_string()
            .contains("unique among one uid's sessions on all gateways")
    );
    assert_eq!(registry.sessions(), before);
}

#[test]
fn names_with_control_characters_are_refused_before_anything_changes() {
    let registry = registry(2);
    for (device, gateway, field) in [
        ("ph\none", "gw", "device"),
        ("phone", "gw\u{1b}[31m", "gateway"),
        ("phone", "gw\u{7f}", "gateway"),
    ] {
        let error = registry
            .login(&request(1, device, gateway, 5, 1_000), 0)
            .unwrap_err();
        assert!(
            matches!(error, PresenceError::ControlCharacter { field: f, .. } if f == field),
            "{error}"
        );
    }
    assert!(matches!(
        registry.heartbeat_batch("g\tw", &[(1, 1)], 0),
        Err(PresenceError::ControlCharacter { .. })
    ));
    assert!(matches!(
        registry.gateway_register("g\0w", 1_000, 0),
        Err(PresenceError::ControlCharacter { .. })
    ));
    assert_eq!(registry.online_count(), 0);
    // Printable non-ASCII names are fine.
    registry
        .login(&request(1, "téléphone", "网关-1", 5, 1_000), 0)
        .unwrap();
}

#[test]
fn sessions_per_uid_limit_refuses_and_changes_nothing() {
    let options = RegistryOptions {
        shards: 2,
        sessions_per_uid_max: 2,
        ..Default::default()
    };
    let registry = ShardedRegistry::new(options).unwrap();
    registry.login(&request(3, "a", "gw", 1, 1_000), 0).unwrap();
    registry.login(&request(3, "b", "gw", 2, 1_000), 0).unwrap();
    let before = registry.sessions();
    let error = registry
        .login(&request(3, "c", "gw", 3, 1_000), 0)
        .unwrap_err();
    assert_eq!(
        error,
        PresenceError::SessionsPerUidExceeded { uid: 3, max: 2 }
    );
    assert!(error.to_string().contains("sessions_per_uid_max"));
    assert_eq!(registry.sessions(), before);
    // A replacement at the limit is allowed: it does not grow the uid.
    registry.login(&request(3, "a", "gw", 4, 1_000), 0).unwrap();
    assert_eq!(registry.lookup(3).len(), 2);
    registry.check_invariants().unwrap();
}

#[test]
fn field_limits_refuse_and_change_nothing() {
    let registry = registry(2);
    registry
        .login(&request(1, "ios", "gw", 1, 1_000), 0)
        .unwrap();
    let before = registry.sessions();
    let long_device = "d".repeat(65);
    let long_gateway = "g".repeat(129);
    let big_meta = vec![0u8; 257];
    let cases: Vec<(LoginRequest<'_>, &str)> = vec![
        (request(1, &long_device, "gw", 2, 1_000), "device"),
        (request(1, "", "gw", 2, 1_000), "device"),
        (request(1, "pc", &long_gateway, 2, 1_000), "gateway"),
        (
            LoginRequest {
                meta: Some(&big_meta),
                ..request(1, "pc", "gw", 2, 1_000)
            },
            "meta",
        ),
    ];
    for (login, field) in cases {
        match registry.login(&login, 0) {
            Err(PresenceError::FieldLength { field: got, .. }) => assert_eq!(got, field),
            other => panic!("expected a {field} length error, got {other:?}"),
        }
    }
    for ttl_ms in [0, 86_400_001] {
        let error = registry
            .login(&request(1, "pc", "gw", 2, ttl_ms), 0)
            .unwrap_err();
        assert!(
            matches!(error, PresenceError::TtlOutOfRange { .. }),
            "{error}"
        );
    }
    assert_eq!(registry.sessions(), before);
    assert_eq!(
        registry.gateways().len(),
        1,
        "a refused login interns no gateway"
    );
}

#[test]
fn metadata_round_trips_and_limits_hold_at_the_edge() {
    let registry = registry(2);
    let meta = vec![7u8; 256];
    let device = "d".repeat(64);
    let login = LoginRequest {
        meta: Some(&meta),
        ..request(9, &device, "gw", 1, 10)
    };
    let outcome = registry.login(&login, 0).unwrap();
    assert_eq!(outcome.session.meta.as_deref(), Some(&meta[..]));
    assert_eq!(registry.lookup(9)[0].meta.as_deref(), Some(&meta[..]));
    registry.logout(9, 1).unwrap();
    registry.check_invariants().unwrap();
}

#[test]
fn gateways_max_refuses_a_new_gateway() {
    let options = RegistryOptions {
        shards: 1,
        gateways_max: 1,
        ..Default::default()
    };
    let registry = ShardedRegistry::new(options).unwrap();
    registry
        .login(&request(1, "ios", "gw-a", 1, 1_000), 0)
        .unwrap();
    let error = registry
        .login(&request(2, "ios", "gw-b", 2, 1_000), 0)
        .unwrap_err();
    assert!(matches!(
        error,
        PresenceError::GatewaysExceeded { max: 1, .. }
    ));
    assert!(registry.lookup(2).is_empty());
    let error = registry.gateway_register("gw-c", 1_000, 0).unwrap_err();
    assert!(matches!(error, PresenceError::GatewaysExceeded { .. }));
}

#[test]
fn gateways_max_counts_gateways_in_use_and_reclaims_the_others() {
    let options = RegistryOptions {
        shards: 3,
        gateways_max: 1,
        ..Default::default()
    };
    let registry = ShardedRegistry::new(options).unwrap();
    registry
        .login(&request(1, "ios", "gw-a", 1, 1_000), 0)
        .unwrap();
    registry.logout(1, 1).unwrap();
    // gw-a has no session and no lease any more: its id goes to gw-b.
    registry
        .login(&request(2, "ios", "gw-b", 2, 1_000), 0)
        .unwrap();
    let error = registry.gateway_register("gw-c", 1_000, 0).unwrap_err();
    assert!(matches!(
        error,
        PresenceError::GatewaysExceeded { max: 1, .. }
    ));
    registry.logout(2, 2).unwrap();
    registry.gateway_register("gw-c", 1_000, 0).unwrap();
    // A lease holds its gateway as a session does.
    let error = registry
        .login(&request(3, "ios", "gw-d", 3, 1_000), 0)
        .unwrap_err();
    assert!(matches!(
        error,
        PresenceError::GatewaysExceeded { max: 1, .. }
    ));
    registry.gateway_down("gw-c");
    registry
        .login(&request(3, "ios", "gw-d", 3, 1_000), 0)
        .unwrap();
    assert_eq!(&*registry.lookup(3)[0].gateway, "gw-d");
    registry.check_invariants().unwrap();
}

/// The 16-bit id space is no limit on names over time: far more gateways than ids come and
/// go, while a gateway with a session and one with only a lease keep theirs.
#[test]
fn gateway_churn_beyond_the_id_space_keeps_every_name_right() {
    let registry = registry(4);
    registry
        .login(&request(1, "ios", "gw-stays", 1, 60_000), 0)
        .unwrap();
    registry.gateway_register("gw-leased", 60_000, 0).unwrap();
    let names = imstate_presence::GATEWAY_IDS_MAX as u64 + 20_000;
    for n in 0..names {
        let gateway = format!("gw-{n}");
        let uid = 10 + n % 1_000;
        registry
            .login(&request(uid, "pc", &gateway, n, 60_000), 0)
            .unwrap();
        if n % 997 == 0 {
            assert_eq!(&*registry.lookup(uid)[0].gateway, gateway);
            assert_eq!(&*registry.lookup(1)[0].gateway, "gw-stays");
        }
        registry.logout(uid, n).unwrap();
    }
    assert_eq!(&*registry.lookup(1)[0].gateway, "gw-stays");
    let leases = registry.gateway_leases();
    assert_eq!(leases.len(), 1);
    assert_eq!(&*leases[0].gateway, "gw-leased");
    assert!(registry.gateways().len() <= imstate_presence::GATEWAYS_MAX_DEFAULT);
    registry.check_invariants().unwrap();
}

#[test]
fn a_standalone_shard_reclaims_its_own_gateway_ids() {
    let mut shard = Shard::new(RegistryOptions {
        gateways_max: 2,
        ..Default::default()
    })
    .unwrap();
    shard
        .login(&request(1, "ios", "gw-stays", 1, 60_000), 0)
        .unwrap();
    for n in 0..100u64 {
        let gateway = format!("gw-{n}");
        shard
            .login(&request(2, "ios", &gateway, n, 60_000), 0)
            .unwrap();
        assert_eq!(&*shard.lookup(2)[0].gateway, gateway);
        shard.logout(2, n).unwrap();
    }
    assert_eq!(&*shard.lookup(1)[0].gateway, "gw-stays");
    shard.check_invariants().unwrap();
}

#[test]
fn unknown_logout_and_heartbeat_are_not_found_errors() {
    let registry = registry(2);
    registry
        .login(&request(1, "ios", "gw", 10, 1_000), 0)
        .unwrap();
    let before = registry.sessions();
    assert_eq!(
        registry.logout(1, 11).unwrap_err(),
        PresenceError::SessionNotFound { uid: 1, conn: 11 }
    );
    assert_eq!(
        registry.heartbeat(2, 10, 5).unwrap_err(),
        PresenceError::SessionNotFound { uid: 2, conn: 10 }
    );
    let message = registry.logout(2, 10).unwrap_err().to_string();
    assert!(
        message.contains("uid 2") && message.contains("conn 10"),
        "{message}"
    );
    assert_eq!(registry.sessions(), before);
}

#[test]
fn logout_returns_the_session_and_heartbeat_moves_the_deadline() {
    let registry = registry(2);
    registry
        .login(&request(1, "ios", "gw", 10, 1_000), 0)
        .unwrap();
    let change = registry.heartbeat(1, 10, 400).unwrap();
    assert_eq!(
        change,
        Change::Heartbeat {
            uid: 1,
            conn: 10,
            at_ms: 400
        }
    );
    // An older heartbeat never moves the deadline back.
    registry.heartbeat(1, 10, 300).unwrap();
    let session = registry.logout(1, 10).unwrap();
    assert_eq!(session.last_heartbeat_ms, 400);
    assert_eq!(session.deadline_ms(), 1_400);
    assert!(registry.lookup(1).is_empty());
    assert_eq!(
        Event::Logout { session }.change(),
        Change::Logout { uid: 1, conn: 10 }
    );
    assert_eq!(registry.online_count(), 0);
}

#[test]
fn heartbeat_batch_reports_unknown_and_foreign_sessions_in_request_order() {
    let registry = registry(4);
    for uid in 0..6 {
        let gateway = if uid == 3 { "gw-other" } else { "gw" };
        registry
            .login(&request(uid, "ios", gateway, uid + 100, 1_000), 0)
            .unwrap();
    }
    let batch = [(5, 105), (9, 109), (3, 103), (0, 100), (1, 999), (2, 102)];
    let outcome = registry.heartbeat_batch("gw", &batch, 500).unwrap();
    assert_eq!(outcome.unknown, vec![(9, 109), (3, 103), (1, 999)]);
    let mut refreshed: Vec<(u64, u64)> = outcome
        .changes
        .iter()
        .flat_map(|change| match change {
            Change::HeartbeatBatch {
                at_ms: 500,
                sessions,
            } => sessions.clone(),
            other => panic!("unexpected change {other:?}"),
        })
        .collect();
    refreshed.sort();
    assert_eq!(refreshed, vec![(0, 100), (2, 102), (5, 105)]);
    assert_eq!(registry.lookup(5)[0].last_heartbeat_ms, 500);
    assert_eq!(
        registry.lookup(3)[0].last_heartbeat_ms,
        0,
        "other gateway's session kept"
    );
    let unknown_gateway = registry.heartbeat_batch("nope", &[(0, 100)], 600).unwrap();
    assert_eq!(unknown_gateway.unknown, vec![(0, 100)]);
}

#[test]
fn batch_limits_refuse_empty_and_oversized_batches() {
    let options = RegistryOptions {
        shards: 2,
        heartbeat_batch_max: 3,
        lookup_ids_max: 2,
        ..Default::default()
    };
    let registry = ShardedRegistry::new(options).unwrap();
    registry
        .login(&request(1, "ios", "gw", 1, 1_000), 0)
        .unwrap();
    let error = registry.heartbeat_batch("gw", &[], 1).unwrap_err();
    assert_eq!(
        error,
        PresenceError::BatchSize {
            limit: "heartbeat_batch_max",
            len: 0,
            max: 3
        }
    );
    let error = registry.heartbeat_batch("gw", &[(1, 1); 4], 1).unwrap_err();
    assert_eq!(
        error,
        PresenceError::BatchSize {
            limit: "heartbeat_batch_max",
            len: 4,
            max: 3
        }
    );
    assert_eq!(
        registry.lookup(1)[0].last_heartbeat_ms,
        0,
        "refused batch refreshed nothing"
    );
    assert!(registry.lookup_batch(&[]).is_err());
    let error = registry.lookup_batch(&[1, 2, 3]).unwrap_err();
    assert_eq!(
        error,
        PresenceError::BatchSize {
            limit: "lookup_ids_max",
            len: 3,
            max: 2
        }
    );
    let found = registry.lookup_batch(&[2, 1]).unwrap();
    assert!(found[0].is_empty());
    assert_eq!(found[1].len(), 1);
}

#[test]
fn lookup_batch_answers_in_request_order_with_repeats() {
    let registry = registry(8);
    for uid in 0..20 {
        registry
            .login(&request(uid, "ios", "gw", uid, 1_000), 0)
            .unwrap();
    }
    let uids = [19, 3, 3, 100, 0];
    let found = registry.lookup_batch(&uids).unwrap();
    for (uid, sessions) in uids.iter().zip(&found) {
        assert_eq!(sessions, &registry.lookup(*uid));
    }
    assert!(found[3].is_empty());
}

#[test]
fn gateway_down_drops_exactly_that_gateways_sessions_and_counts_them() {
    let registry = registry(8);
    for uid in 0..50u64 {
        let gateway = ["gw-a", "gw-b", "gw-c"][(uid % 3) as usize];
        registry
            .login(&request(uid, "ios", gateway, uid, 60_000), 0)
            .unwrap();
        registry
            .login(&request(uid, "pc", "gw-c", uid + 1_000, 60_000), 0)
            .unwrap();
    }
    let outcome = registry.gateway_down("gw-b");
    assert_eq!(outcome.dropped(), 17, "uids 1, 4, ..., 49");
    for event in &outcome.events {
        let Event::GatewayDown {
            gateway,
            sessions,
            scope,
        } = event
        else {
            panic!("unexpected {event:?}");
        };
        assert_eq!(&**gateway, "gw-b");
        assert!(
            sessions
                .iter()
                .all(|s| &*s.gateway == "gw-b" && scope.contains(s.uid))
        );
    }
    assert_eq!(registry.online_count(), 100 - 17);
    assert!(
        registry
            .sessions()
            .iter()
            .all(|session| &*session.gateway != "gw-b")
    );
    assert_eq!(registry.gateway_down("gw-b").dropped(), 0);
    assert_eq!(registry.gateway_down("never-seen").dropped(), 0);
    registry.check_invariants().unwrap();
}

#[test]
fn online_count_follows_every_mutation() {
    let registry = registry(4);
    assert_eq!(registry.online_count(), 0);
    for uid in 0..10 {
        registry
            .login(&request(uid, "ios", "gw", uid, 1_000), 0)
            .unwrap();
    }
    registry
        .login(&request(0, "ios", "gw", 77, 1_000), 0)
        .unwrap();
    assert_eq!(registry.online_count(), 10);
    registry.logout(1, 1).unwrap();
    assert_eq!(registry.online_count(), 9);
    registry.heartbeat(2, 2, 900).unwrap();
    let expired = registry.tick(1_000);
    assert_eq!(expired.len(), 8);
    assert_eq!(registry.online_count(), 1);
    registry.check_invariants().unwrap();
}

#[test]
fn gateway_heartbeat_requires_registration() {
    let registry = registry(2);
    let error = registry.gateway_heartbeat("gw", 0).unwrap_err();
    assert_eq!(
        error,
        PresenceError::GatewayNotRegistered {
            gateway: "gw".into()
        }
    );
    registry.gateway_register("gw", 5_000, 0).unwrap();
    assert_eq!(
        registry.gateway_heartbeat("gw", 100).unwrap(),
        Change::GatewayHeartbeat {
            gateway: "gw".into(),
            at_ms: 100
        }
    );
    assert_eq!(registry.gateway_leases()[0].last_heartbeat_ms, 100);
    assert!(registry.gateway_register("gw", 0, 0).is_err());
}

#[test]
fn invalid_options_are_refused() {
    for options in [
        RegistryOptions {
            shards: 0,
            ..Default::default()
        },
        RegistryOptions {
            sessions_per_uid_max: 0,
            ..Default::default()
        },
        RegistryOptions {
            ttl_ms_max: u32::MAX,
            ..Default::default()
        },
    ] {
        assert!(matches!(
            ShardedRegistry::new(options),
            Err(PresenceError::InvalidOption { .. })
        ));
    }
    assert!(matches!(
        ShardedRegistry::new(RegistryOptions::default())
            .unwrap()
            .tick_shard(64, 0, 1),
        Err(PresenceError::ShardOutOfRange {
            shard: 64,
            shards: 64
        })
    ));
}

#[test]
fn standalone_shard_has_the_same_rules() {
    let mut shard = Shard::new(RegistryOptions::default()).unwrap();
    let first = shard.login(&request(1, "ios", "gw", 1, 100), 0).unwrap();
    let second = shard.login(&request(1, "ios", "gw", 2, 100), 0).unwrap();
    assert_eq!(second.replaced, Some(first.session));
    assert_eq!(
        shard
            .heartbeat_batch("gw", &[(1, 2), (1, 1)], 50)
            .unwrap()
            .unknown,
        [(1, 1)]
    );
    let progress = shard.tick(150, 10);
    assert!(progress.done);
    assert_eq!(progress.events.len(), 1);
    assert!(shard.is_empty());
    shard.check_invariants().unwrap();
}

#[test]
fn a_visiting_batch_lookup_sees_exactly_what_a_batch_lookup_returns() {
    let registry = registry(4);
    let devices = ["ios", "android", "web"];
    for uid in 0..200u64 {
        for (n, device) in devices.iter().enumerate().take((uid % 4) as usize) {
            let gateway = format!("gw{}", (uid + n as u64) % 5);
            let mut login = request(uid, device, &gateway, uid * 10 + n as u64, 60_000);
            let meta = [uid as u8; 3];
            if uid % 7 == 0 {
                login.meta = Some(&meta);
            }
            registry.login(&login, 1_000 * (n as u64 + 1)).unwrap();
        }
    }
    let uids: Vec<u64> = (0..250).rev().chain([5, 5, 199]).collect();
    let expected = registry.lookup_batch(&uids).unwrap();
    let mut visited = vec![Vec::new(); uids.len()];
    registry
        .lookup_batch_visit(&uids, |position, session| {
            visited[position].push(Session {
                uid: session.uid,
                device: session.device.into(),
                gateway: session.gateway.into(),
                conn: session.conn,
                login_ms: session.login_ms,
                last_heartbeat_ms: session.last_heartbeat_ms,
                ttl_ms: session.ttl_ms,
                meta: session.meta.map(Into::into),
            });
        })
        .unwrap();
    assert_eq!(visited, expected, "same sessions, same order per uid");
    assert!(expected.iter().any(|sessions| sessions.len() == 3));
    let too_many = vec![1; RegistryOptions::default().lookup_ids_max + 1];
    assert!(registry.lookup_batch_visit(&too_many, |_, _| {}).is_err());
}
