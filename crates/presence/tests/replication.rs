//! Replication of slots (cluster mode): a replica built from a fuzzy snapshot of some slots
//! (each shard copied at a different moment while the run goes on) plus the primary's change
//! records from before the snapshot started, restricted to those slots, equals the primary's
//! sessions in those slots; for random histories with expiry, gateway drops and lapsed
//! gateway leases. What the replica journals while it applies them rebuilds it from empty (its
//! own log replays to the same state), and never touches sessions outside its slots.
//! Every record goes through `encode`/`decode`, as it would on the wire.

mod common;

use std::sync::Arc;

use common::{Op, apply_op, op_strategy};
use imstate_presence::{
    Change, Entry, Journal, RegistryOptions, Session, ShardedRegistry, SlotSet,
};
use parking_lot::Mutex;
use proptest::prelude::*;

#[derive(Default)]
struct Recorder(Mutex<Vec<Change>>);

impl Journal for Recorder {
    fn record(&self, entry: Entry<'_>) {
        self.0.lock().push(entry.change());
    }
}

fn options(shards: usize) -> RegistryOptions {
    RegistryOptions {
        shards,
        sessions_per_uid_max: 3,
        ..Default::default()
    }
}

fn through_bytes(change: &Change) -> Change {
    Change::decode(&change.to_bytes()).unwrap()
}

fn in_slots(sessions: Vec<Session>, slots: &SlotSet) -> Vec<Session> {
    sessions
        .into_iter()
        .filter(|session| slots.contains(session.uid))
        .collect()
}

fn slot_set() -> impl Strategy<Value = SlotSet> {
    (1u32..6).prop_flat_map(|count| {
        proptest::collection::vec(any::<bool>(), count as usize).prop_map(move |chosen| {
            let mut set = SlotSet::empty(count);
            for (slot, yes) in chosen.into_iter().enumerate() {
                if yes {
                    set.insert_range(slot as u32, slot as u32 + 1);
                }
            }
            set
        })
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn a_replica_from_a_fuzzy_slot_snapshot_plus_the_following_records_equals_the_primary(
        ops in proptest::collection::vec(op_strategy(), 1..200),
        slots in slot_set(),
        snapshot_at in 0.0f64..1.0,
        spread in 0usize..6,
        back in 0usize..8,
        replica_shards in 1usize..6,
        // Sessions the replica holds as another slot range's primary: never touched.
        own in proptest::collection::vec((0u64..8, 0u64..4), 0..6),
        // The replica's clock runs this far ahead of the primary's, and it ticks its expiry
        // after every record: its copies of `slots` expire only when the primary says so.
        replica_ahead_ms in 0u64..200_000,
        // Sessions the replica holds of `slots` from before (an older copy: a resync applies
        // the snapshot over it, then sweeps what the snapshot lacked).
        stale in proptest::collection::vec((0u64..16, 0u64..4), 0..8),
    ) {
        const SHARDS: usize = 3;
        let primary = ShardedRegistry::new(options(SHARDS)).unwrap();
        let mut now_ms = 1_000_000;
        let mut log: Vec<Change> = Vec::new();
        let first = (snapshot_at * ops.len() as f64) as usize;
        // Shard i is copied before op first + i * spread; the stream position is noted first.
        let mut snapshot: Vec<Session> = Vec::new();
        let mut taken = 0;
        let mut mark = None;
        for (step, op) in ops.iter().chain(std::iter::repeat_n(&Op::Lookup { uid: 0 }, 40))
            .enumerate()
        {
            while taken < SHARDS && step >= first + taken * spread {
                if mark.is_none() {
                    mark = Some(log.len());
                }
                snapshot.extend(primary.slot_sessions(taken, &slots).unwrap());
                taken += 1;
            }
            log.extend(apply_op(&primary, op, &mut now_ms).1);
        }
        let start = mark.unwrap_or(log.len()).saturating_sub(back);

        let journal = Arc::new(Recorder::default());
        let replica = ShardedRegistry::with_journal(options(replica_shards), journal.clone())
            .unwrap();
        // The replica's own sessions, outside `slots` (uids whose slot it does not follow).
        let mut outside = Vec::new();
        for (uid, conn) in own {
            let uid = uid + 1_000;
            if !slots.contains(uid) {
                let request = common::request(uid, "ios", common::GATEWAYS[0], conn, 80_000_000);
                replica.login(&request, 1_000_000).unwrap();
                outside = replica.sessions();
            }
        }
        let outside: Vec<Session> =
            outside.into_iter().filter(|s| !slots.contains(s.uid)).collect();
        for (uid, conn) in stale {
            if slots.contains(uid) {
                let request = common::request(uid, "old", common::GATEWAYS[1], conn, 60_000);
                replica.login(&request, 500_000).unwrap();
            }
        }
        let local_before = journal.0.lock().len();
        // The replica is primary of the other slots only.
        let mut mine = SlotSet::all(slots.count());
        mine.remove_all(&slots);
        replica.set_local_scope(Some(mine));
        let replica_now = now_ms + replica_ahead_ms;
        for session in &snapshot {
            replica.apply_replicated(&through_bytes(&Change::Login(session.clone())), &slots)
                .unwrap();
            replica.tick(replica_now);
        }
        let mut kept: Vec<(u64, u64)> = snapshot.iter().map(|s| (s.uid, s.conn)).collect();
        kept.sort_unstable();
        replica.sweep_slots(&slots, &kept);
        for change in &log[start..] {
            replica.apply_replicated(&through_bytes(change), &slots).unwrap();
            replica.tick(replica_now);
        }
        prop_assert_eq!(in_slots(replica.sessions(), &slots), in_slots(primary.sessions(), &slots));
        let untouched: Vec<Session> = replica
            .sessions()
            .into_iter()
            .filter(|s| !slots.contains(s.uid))
            .collect();
        prop_assert_eq!(&untouched, &outside, "sessions outside the slots are untouched");
        prop_assert!(replica.check_invariants().is_ok(), "{:?}", replica.check_invariants());

        // The replica's log replays to the same state; nothing it journaled for the stream
        // concerns a uid outside its slots.
        let records = journal.0.lock().clone();
        for change in &records[local_before..] {
            if let Some(uid) = Change::peek_uid(&change.to_bytes()) {
                prop_assert!(slots.contains(uid), "journaled {change:?} outside the slots");
            }
        }
        let rebuilt = ShardedRegistry::new(options(2)).unwrap();
        for change in &records {
            rebuilt.apply_change(&through_bytes(change)).unwrap();
        }
        prop_assert_eq!(rebuilt.sessions(), replica.sessions());

        // Dropping the slots (the replica resyncs, or lost them) leaves only the others.
        let dropped = replica.drop_slots(&slots);
        prop_assert_eq!(dropped, in_slots(primary.sessions(), &slots).len());
        prop_assert_eq!(replica.sessions(), outside.clone());
        let records = journal.0.lock().clone();
        let rebuilt = ShardedRegistry::new(options(4)).unwrap();
        for change in &records {
            rebuilt.apply_change(&through_bytes(change)).unwrap();
        }
        prop_assert_eq!(rebuilt.sessions(), outside);
    }
}

/// Cluster mode: a gateway drop and a lapsed gateway lease remove only the sessions of the
/// slots this node is primary of (its local scope), each journaled as a logout; the copies it
/// holds as a replica stay until their primary's records remove them, and its log replays to
/// the same state.
#[test]
fn gateway_drops_and_expiry_touch_only_the_local_scope() {
    let journal = Arc::new(Recorder::default());
    let node = ShardedRegistry::with_journal(options(3), journal.clone()).unwrap();
    let mut mine = SlotSet::empty(4);
    mine.insert_range(0, 2);
    node.set_local_scope(Some(mine.clone()));
    let now = 1_000_000;
    for uid in 0..16u64 {
        let gateway = common::GATEWAYS[(uid % 2) as usize];
        let request = common::request(uid, "ios", gateway, uid, 10_000);
        node.login(&request, now).unwrap();
    }
    // gw-0 holds the even uids: slots 0 and 2; only slot 0's are local.
    let outcome = node.gateway_down(common::GATEWAYS[0]);
    assert_eq!(outcome.dropped(), 4, "uids 0, 4, 8, 12");
    assert!(node.sessions().iter().all(|s| s.uid % 4 != 0));
    assert_eq!(node.sessions().iter().filter(|s| s.uid % 4 == 2).count(), 4);
    // gw-1's lease lapses: it drops uids 1, 5, 9, 13 (slot 1), not slot 3's.
    node.gateway_register(common::GATEWAYS[1], 1_000, now)
        .unwrap();
    node.tick_gateways(now + 2_000);
    let left: Vec<u64> = node.sessions().iter().map(|s| s.uid).collect();
    assert_eq!(left, vec![2, 3, 6, 7, 10, 11, 14, 15]);
    // Past every deadline: expiry removes nothing outside the scope...
    assert!(node.tick(now + 60_000).is_empty());
    assert_eq!(node.sessions().len(), 8);
    assert!(
        node.check_invariants().is_ok(),
        "{:?}",
        node.check_invariants()
    );
    // ...until this node becomes their primary.
    node.set_local_scope(Some(SlotSet::all(4)));
    assert_eq!(node.tick(now + 62_000).len(), 8);
    // The journal replays to the same state at every step (no record drops a whole gateway).
    let rebuilt = ShardedRegistry::new(options(2)).unwrap();
    for change in journal.0.lock().iter() {
        assert!(!matches!(change, Change::GatewayDown { .. }), "{change:?}");
        rebuilt.apply_change(&through_bytes(change)).unwrap();
    }
    assert_eq!(rebuilt.sessions(), node.sessions());
}
