//! Replay: the change stream of a random run, applied in order, rebuilds the live registry,
//! both from empty and from a fuzzy snapshot (shards captured at different moments while the
//! run goes on) followed by the changes from slightly before the snapshot started.
//! Every change also goes through `encode`/`decode`, as it would through the WAL.

mod common;

use common::{Op, apply_op, op_strategy};
use imstate_presence::{Change, GatewayLease, RegistryOptions, Session, ShardedRegistry};
use proptest::prelude::*;

fn registry(shards: usize) -> ShardedRegistry {
    let options = RegistryOptions {
        shards,
        sessions_per_uid_max: 3,
        ..Default::default()
    };
    ShardedRegistry::new(options).unwrap()
}

fn through_bytes(change: &Change) -> Change {
    Change::decode(&change.to_bytes()).unwrap()
}

fn state(registry: &ShardedRegistry) -> (Vec<Session>, Vec<GatewayLease>) {
    (registry.sessions(), registry.gateway_leases())
}

fn replay(target: &ShardedRegistry, changes: &[Change]) {
    for change in changes {
        target.apply_change(&through_bytes(change)).unwrap();
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn replaying_every_change_onto_an_empty_registry_rebuilds_it(
        ops in proptest::collection::vec(op_strategy(), 1..200),
        replica_shards in 1usize..6,
    ) {
        let live = registry(3);
        let mut now_ms = 1_000_000;
        let mut log = Vec::new();
        for op in &ops {
            log.extend(apply_op(&live, op, &mut now_ms).1);
        }
        let replica = registry(replica_shards);
        replay(&replica, &log);
        prop_assert_eq!(state(&replica), state(&live));
        prop_assert!(replica.check_invariants().is_ok(), "{:?}", replica.check_invariants());
    }

    #[test]
    fn fuzzy_snapshot_plus_replay_from_before_it_rebuilds_the_registry(
        ops in proptest::collection::vec(op_strategy(), 1..200),
        snapshot_at in 0.0f64..1.0,
        spread in 0usize..6,
        back in 0usize..8,
        replica_shards in prop_oneof![Just(3usize), 1usize..6],
    ) {
        const SHARDS: usize = 3;
        let live = registry(SHARDS);
        let mut now_ms = 1_000_000;
        let mut log: Vec<Change> = Vec::new();
        let first = (snapshot_at * ops.len() as f64) as usize;
        // Section i (shards, then the leases) is taken before op first + i * spread.
        let mut snapshot = Vec::new();
        let mut sections_taken = 0;
        let mut mark = None;
        for (step, op) in ops.iter().chain(std::iter::repeat_n(&Op::Lookup { uid: 0 }, 40))
            .enumerate()
        {
            while sections_taken <= SHARDS && step >= first + sections_taken * spread {
                if mark.is_none() {
                    mark = Some(log.len());
                }
                if sections_taken < SHARDS {
                    live.snapshot_shard(sections_taken, &mut snapshot).unwrap();
                } else {
                    live.snapshot_gateways(&mut snapshot).unwrap();
                }
                sections_taken += 1;
            }
            log.extend(apply_op(&live, op, &mut now_ms).1);
        }
        let start = mark.unwrap_or(log.len()).saturating_sub(back);
        let replica = registry(replica_shards);
        replica.restore(&mut snapshot.as_slice()).unwrap();
        replay(&replica, &log[start..]);
        prop_assert_eq!(state(&replica), state(&live));
        prop_assert!(replica.check_invariants().is_ok(), "{:?}", replica.check_invariants());
    }

    /// The same with each shard copied in steps of a few sessions (as checkpoints copy, so
    /// that no shard lock is held for a whole shard), the run going on between steps, and
    /// only some slots kept (as a replica's checkpoint part keeps its primary's slots).
    #[test]
    fn stepped_snapshot_plus_replay_from_before_it_rebuilds_the_registry(
        ops in proptest::collection::vec(op_strategy(), 1..200),
        snapshot_at in 0.0f64..1.0,
        step_sessions in 1usize..4,
        ops_per_step in 0usize..3,
        only_even_slots in any::<bool>(),
    ) {
        const SHARDS: usize = 3;
        let live = registry(SHARDS);
        let mut now_ms = 1_000_000;
        let mut log: Vec<Change> = Vec::new();
        let first = (snapshot_at * ops.len() as f64) as usize;
        let mut ops = ops.iter().chain(std::iter::repeat_n(&Op::Lookup { uid: 0 }, 400));
        for op in ops.by_ref().take(first) {
            log.extend(apply_op(&live, op, &mut now_ms).1);
        }
        let mark = log.len();
        let even = |uid: u64| uid.is_multiple_of(2);
        let keep: Option<&dyn Fn(u64) -> bool> = if only_even_slots { Some(&even) } else { None };
        let mut snapshot = Vec::new();
        for shard in 0..SHARDS {
            let mut from = 0;
            loop {
                let next = live
                    .snapshot_shard_step(shard, keep, from, step_sessions, &mut snapshot)
                    .unwrap();
                for op in ops.by_ref().take(ops_per_step) {
                    log.extend(apply_op(&live, op, &mut now_ms).1);
                }
                match next {
                    Some(next) => from = next,
                    None => break,
                }
            }
        }
        live.snapshot_gateways(&mut snapshot).unwrap();
        for op in ops {
            log.extend(apply_op(&live, op, &mut now_ms).1);
        }
        let replica = registry(SHARDS);
        replica.restore(&mut snapshot.as_slice()).unwrap();
        replay(&replica, &log[mark..]);
        let (mut sessions, leases) = state(&live);
        if only_even_slots {
            // The replica holds the kept uids from the snapshot; the others only from the
            // replayed changes: compare the kept ones.
            sessions.retain(|session| even(session.uid));
        }
        let (mut restored, restored_leases) = state(&replica);
        if only_even_slots {
            restored.retain(|session| even(session.uid));
        }
        prop_assert_eq!(restored, sessions);
        prop_assert_eq!(restored_leases, leases);
        prop_assert!(replica.check_invariants().is_ok(), "{:?}", replica.check_invariants());
    }
}

#[test]
fn restored_sessions_expire_from_their_persisted_heartbeat() {
    let live = registry(4);
    for uid in 0..100u64 {
        let request = common::request(uid, "ios", "gw", uid, 10_000 + (uid as u32) * 100);
        live.login(&request, 1_000_000).unwrap();
    }
    let mut snapshot = Vec::new();
    for shard in 0..4 {
        live.snapshot_shard(shard, &mut snapshot).unwrap();
    }
    live.snapshot_gateways(&mut snapshot).unwrap();
    let restored = registry(8);
    let stats = restored.restore(&mut snapshot.as_slice()).unwrap();
    assert_eq!((stats.shard_sections, stats.sessions), (4, 100));
    assert_eq!(state(&restored), state(&live));
    // Restart 15 s later: sessions with ttl <= 15 s (uids 0..=50) are already due.
    let expired = restored.tick(1_015_000);
    assert_eq!(expired.len(), 51);
    assert_eq!(restored.online_count(), 49);
    let late = restored.tick(1_000_000 + 10_000 + 99 * 100);
    assert_eq!(late.len(), 49);
    restored.check_invariants().unwrap();
}

#[test]
fn restore_refuses_damaged_snapshots_without_panicking() {
    let live = registry(2);
    for uid in 0..10u64 {
        live.login(&common::request(uid, "ios", "gw", uid, 10_000), 0)
            .unwrap();
    }
    live.gateway_register("gw", 5_000, 0).unwrap();
    let mut snapshot = Vec::new();
    live.snapshot_shard(0, &mut snapshot).unwrap();
    let boundary_1 = snapshot.len();
    live.snapshot_shard(1, &mut snapshot).unwrap();
    let boundary_2 = snapshot.len();
    live.snapshot_gateways(&mut snapshot).unwrap();
    // Sections are self-contained, so a cut between two of them is a shorter valid stream;
    // the checkpoint file's own framing (the log engine) guards whole-file completeness.
    for cut in (1..snapshot.len()).filter(|cut| ![boundary_1, boundary_2].contains(cut)) {
        let target = registry(2);
        assert!(
            target.restore(&mut &snapshot[..cut]).is_err(),
            "cut at {cut} accepted"
        );
    }
    for position in 0..snapshot.len() {
        let mut damaged = snapshot.clone();
        damaged[position] ^= 0xA5;
        let _ = registry(2).restore(&mut damaged.as_slice());
    }
    let target = registry(2);
    target.restore(&mut snapshot.as_slice()).unwrap();
    assert_eq!(state(&target), state(&live));
}

#[test]
fn gateway_down_records_stay_scoped_when_logins_interleave_between_shards() {
    // The node drops a gateway shard by shard; a login through that gateway can land on a
    // shard already dropped before the next shard is dropped. Replay must keep it.
    let live = registry(2);
    let mut log = Vec::new();
    for uid in 0..4u64 {
        log.push(
            live.login(&common::request(uid, "ios", "gw", uid, 60_000), 0)
                .unwrap()
                .change(),
        );
    }
    let shard_0 = live.shard(0).unwrap().lock().gateway_down("gw").unwrap();
    log.push(shard_0.change());
    let late = live
        .login(&common::request(10, "ios", "gw", 10, 60_000), 5)
        .unwrap();
    log.push(late.change());
    let shard_1 = live.shard(1).unwrap().lock().gateway_down("gw").unwrap();
    log.push(shard_1.change());
    assert_eq!(live.sessions(), vec![late.session.clone()]);
    for replica_shards in [1, 2, 3] {
        let replica = registry(replica_shards);
        replay(&replica, &log);
        assert_eq!(state(&replica), state(&live), "{replica_shards} shards");
    }
}
