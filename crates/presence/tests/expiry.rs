//! Expiry with controlled time (P2): sessions go at the first tick with
//! `now >= last_heartbeat + ttl` and never before; incremental ticks make progress under any
//! budget; a lapsed gateway lease drops exactly that gateway's sessions.

mod common;

use common::{registry, request};
use imstate_presence::{Event, RegistryOptions, Shard, ShardedRegistry};

fn expired_uids(events: &[Event]) -> Vec<u64> {
    let mut uids: Vec<u64> = events
        .iter()
        .flat_map(|event| match event {
            Event::Expire { session } => vec![session.uid],
            Event::GatewayDown { sessions, .. } => sessions.iter().map(|s| s.uid).collect(),
            _ => Vec::new(),
        })
        .collect();
    uids.sort();
    uids
}

#[test]
fn session_expires_exactly_at_its_deadline_and_not_before() {
    let registry = registry(4);
    registry
        .login(&request(1, "ios", "gw", 1, 30_000), 1_234)
        .unwrap();
    assert!(registry.tick(31_233).is_empty());
    assert_eq!(registry.lookup(1).len(), 1);
    let events = registry.tick(31_234);
    assert_eq!(expired_uids(&events), vec![1]);
    assert!(registry.lookup(1).is_empty());
    registry.check_invariants().unwrap();
}

#[test]
fn heartbeat_postpones_expiry_to_the_new_deadline() {
    let registry = registry(4);
    registry
        .login(&request(1, "ios", "gw", 1, 30_000), 0)
        .unwrap();
    registry.heartbeat(1, 1, 20_000).unwrap();
    assert!(
        registry.tick(30_000).is_empty(),
        "old deadline no longer applies"
    );
    assert!(registry.tick(49_999).is_empty());
    assert_eq!(expired_uids(&registry.tick(50_000)), vec![1]);
}

#[test]
fn sessions_expire_within_ttl_plus_one_tick_under_periodic_ticks() {
    const TICK_MS: u64 = 250;
    let registry = registry(8);
    let mut deadlines = std::collections::HashMap::new();
    for uid in 0..2_000u64 {
        let login_ms = 10_000 + uid * 37 % 5_000;
        let ttl_ms = 1_000 + (uid * 7_919 % 60_000) as u32;
        registry
            .login(&request(uid, "ios", "gw", uid, ttl_ms), login_ms)
            .unwrap();
        deadlines.insert(uid, login_ms + u64::from(ttl_ms));
    }
    let mut now_ms = 10_000;
    while registry.online_count() > 0 {
        now_ms += TICK_MS;
        for event in registry.tick(now_ms) {
            let Event::Expire { session } = event else {
                panic!("unexpected {event:?}")
            };
            let deadline = deadlines[&session.uid];
            assert!(deadline <= now_ms, "uid {} expired early", session.uid);
            assert!(
                now_ms < deadline + TICK_MS,
                "uid {} expired late",
                session.uid
            );
        }
        for uid in [0u64, 999, 1_999] {
            if registry.lookup(uid).is_empty() {
                assert!(deadlines[&uid] <= now_ms);
            }
        }
        assert!(now_ms < 200_000, "expiry never finished");
    }
    registry.check_invariants().unwrap();
}

#[test]
fn ttl_longer_than_a_wheel_turn_expires_exactly() {
    let registry = registry(1);
    let ttl_ms = 3 * 3_600_000; // three turns of the 68-minute wheel
    registry
        .login(&request(1, "ios", "gw", 1, ttl_ms), 500)
        .unwrap();
    registry
        .login(&request(2, "ios", "gw", 2, 1_000), 500)
        .unwrap();
    let mut now_ms = 500;
    while now_ms < 500 + u64::from(ttl_ms) - 1 {
        now_ms = (now_ms + 60_000).min(500 + u64::from(ttl_ms) - 1);
        let events = registry.tick(now_ms);
        assert!(events.iter().all(|event| !matches!(event,
            Event::Expire { session } if session.uid == 1)));
    }
    assert_eq!(registry.lookup(1).len(), 1);
    assert_eq!(
        expired_uids(&registry.tick(500 + u64::from(ttl_ms))),
        vec![1]
    );
}

#[test]
fn a_tick_after_a_long_pause_expires_everything_due() {
    let registry = registry(2);
    for uid in 0..100u64 {
        let ttl_ms = if uid % 2 == 0 { 5_000 } else { 20_000_000 };
        registry
            .login(&request(uid, "ios", "gw", uid, ttl_ms), 1_000)
            .unwrap();
    }
    // No tick for five hours: more than four wheel turns.
    let events = registry.tick(1_000 + 5 * 3_600_000);
    assert_eq!(
        expired_uids(&events),
        (0..100).step_by(2).collect::<Vec<u64>>()
    );
    assert_eq!(registry.online_count(), 50);
    assert_eq!(expired_uids(&registry.tick(1_000 + 20_000_000)).len(), 50);
    registry.check_invariants().unwrap();
}

#[test]
fn bounded_tick_steps_make_progress_and_resume_where_they_stopped() {
    let options = RegistryOptions {
        shards: 1,
        ..Default::default()
    };
    let mut shard = Shard::new(options).unwrap();
    // 3,000 sessions due in second 10 but later than the tick, 500 due at 10_100.
    for uid in 0..3_500u64 {
        let last_heartbeat_ms = if uid < 500 { 100 } else { 900 };
        shard
            .login(&request(uid, "ios", "gw", uid, 10_000), last_heartbeat_ms)
            .unwrap();
    }
    let mut expired = 0;
    let mut steps = 0;
    loop {
        let progress = shard.tick(10_500, 7);
        assert!(progress.events.len() <= 7);
        expired += progress.events.len();
        steps += 1;
        shard.check_invariants().unwrap();
        if progress.done {
            break;
        }
        // Writers interleave between steps.
        shard.heartbeat(3_499, 3_499, 10_400).unwrap();
    }
    assert_eq!(expired, 500);
    assert!(
        steps >= 3_500 / 7,
        "the whole slot was walked in budget-sized steps"
    );
    // Later in the same second the remaining ones become due; the slot is walked again.
    let progress = shard.tick(10_900, usize::MAX);
    assert!(progress.done);
    assert_eq!(progress.events.len(), 2_999);
    assert_eq!(shard.len(), 1);
}

#[test]
fn tick_shard_spreads_a_mass_expiry_over_short_steps() {
    let registry = registry(4);
    for uid in 0..20_000u64 {
        registry
            .login(&request(uid, "ios", "gw", uid, 1_000), 0)
            .unwrap();
    }
    let mut expired = 0;
    for shard in 0..4 {
        loop {
            let progress = registry.tick_shard(shard, 1_000, 256).unwrap();
            assert!(progress.events.len() <= 256);
            expired += progress.events.len();
            if progress.done {
                break;
            }
            assert_eq!(registry.lookup_batch(&[1, 2, 3]).unwrap().len(), 3);
        }
    }
    assert_eq!(expired, 20_000);
    assert_eq!(registry.online_count(), 0);
    registry.check_invariants().unwrap();
}

#[test]
fn lapsed_gateway_lease_drops_exactly_that_gateways_sessions() {
    let registry = registry(4);
    registry.gateway_register("gw-a", 5_000, 0).unwrap();
    registry.gateway_register("gw-b", 5_000, 0).unwrap();
    for uid in 0..30u64 {
        let gateway = ["gw-a", "gw-b", "gw-unregistered"][(uid % 3) as usize];
        registry
            .login(&request(uid, "ios", gateway, uid, 60_000), 100)
            .unwrap();
    }
    registry.gateway_heartbeat("gw-b", 4_000).unwrap();
    assert!(registry.tick(4_999).is_empty());
    let events = registry.tick(5_000);
    assert!(events.contains(&Event::GatewayUnregister {
        gateway: "gw-a".into(),
        lapsed: true
    }));
    assert_eq!(
        expired_uids(&events),
        (0..30).step_by(3).collect::<Vec<u64>>()
    );
    assert!(
        registry
            .sessions()
            .iter()
            .all(|session| &*session.gateway != "gw-a")
    );
    assert_eq!(registry.online_count(), 20);
    assert_eq!(registry.gateway_leases().len(), 1);
    let events = registry.tick(9_000);
    assert_eq!(
        expired_uids(&events),
        (1..30).step_by(3).collect::<Vec<u64>>()
    );
    assert!(registry.gateway_leases().is_empty());
    registry.check_invariants().unwrap();
}

#[test]
fn clock_going_back_expires_nothing_early() {
    let registry = ShardedRegistry::new(RegistryOptions {
        shards: 1,
        ..Default::default()
    })
    .unwrap();
    registry
        .login(&request(1, "ios", "gw", 1, 10_000), 50_000)
        .unwrap();
    assert!(registry.tick(55_000).is_empty());
    assert!(registry.tick(20_000).is_empty());
    assert_eq!(expired_uids(&registry.tick(60_000)), vec![1]);
}
