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
        let local_before = journal.0.lock().len();
        for session in &snapshot {
            replica.apply_replicated(&through_bytes(&Change::Login(session.clone())), &slots)
                .unwrap();
        }
        for change in &log[start..] {
            replica.apply_replicated(&through_bytes(change), &slots).unwrap();
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
