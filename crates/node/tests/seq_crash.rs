//! S1 and S2 of the sequence store under random crashes through the fault-injecting storage.
//!
//! A sequential client runs random next / next_batch / current calls. At random points the
//! storage starts failing from a random operation on (the process "dies" there: some writes and
//! fsyncs happen, the rest never do), and at random points the node restarts from the image a
//! crash would leave (unsynced bytes dropped, or torn at 512 B). The checks:
//! - S1: the whole history passes the history checker (per id strictly increasing, no duplicate);
//! - S2: after every restart, each id's recovered `current` is at least every value ever handed
//!   out for it: nothing was served above a ceiling that was not durable.
//! - min_seq durable: after every restart, each id's `min_seq` is its last acknowledged set, or
//!   a set made after it whose outcome the client never learned (it failed with the crash).
//!   Checkpoints are taken at random points, so both recovery paths (checkpoint, log) carry it.
//!
//! With a planted bug (`--features planted-serve-before-durable` or `planted-ack-before-fsync`)
//! the same scenarios must produce violations; `planted_bug_is_caught` asserts that they do.

use std::collections::HashMap;

use imstate_check::seq::{Outcome, SeqCall, check};
use imstate_log::{CrashMode, FaultyStorage};
use imstate_node::seqstore::{SeqStore, SeqStoreOptions};
use imstate_seq::NamespaceDef;
use proptest::prelude::*;

const IDS: u64 = 24;

#[derive(Clone, Debug)]
enum Op {
    Next(u64),
    Batch(Vec<u64>),
    Current(u64),
    /// Sets the id's min_seq to its current seq (all of its history hidden).
    SetMin(u64),
    /// Writes a checkpoint.
    Checkpoint,
    /// The process dies `after_ops` storage operations from now.
    FailFrom(u64),
    /// Restart from a crash image; `Some(seed)` tears unsynced tails.
    Restart(Option<u64>),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..IDS).prop_map(Op::Next),
        4 => proptest::collection::vec(0..IDS, 1..8).prop_map(Op::Batch),
        1 => (0..IDS).prop_map(Op::Current),
        2 => (0..IDS).prop_map(Op::SetMin),
        1 => Just(Op::Checkpoint),
        1 => (0u64..6).prop_map(Op::FailFrom),
        2 => proptest::option::of(any::<u64>()).prop_map(Op::Restart),
    ]
}

fn namespace() -> NamespaceDef {
    NamespaceDef {
        name: "t".into(),
        id_lo: 0,
        id_hi: 64,
        section_size: 4,
        step: 3,
        keys: imstate_seq::KeyKind::Numeric,
    }
}

async fn open(storage: FaultyStorage) -> std::sync::Arc<SeqStore> {
    SeqStore::open(storage, SeqStoreOptions::default(), &[namespace()])
        .await
        .expect("recovers")
        .0
}

/// Runs one scenario; returns the violations found (empty = correct).
fn run(ops: &[Op]) -> Vec<String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let mut storage = FaultyStorage::new();
        let mut store = open(storage.clone()).await;
        let mut history = Vec::new();
        let mut max_returned: HashMap<u64, u64> = HashMap::new();
        let mut violations = Vec::new();
        // Per id: the min_seq values recovery may show (the last acknowledged set, then any
        // set whose outcome is unknown).
        let mut min_possible: HashMap<u64, Vec<u64>> = HashMap::new();
        for (index, op) in ops.iter().enumerate() {
            let (ids, result) = match op {
                Op::Next(id) => (vec![*id], store.next("t", *id).await.map(|v| vec![v])),
                Op::Batch(ids) => (ids.clone(), store.next_batch("t", ids).await),
                Op::Current(id) => {
                    if let Ok(current) = store.current("t", *id) {
                        let returned = max_returned.get(id).copied().unwrap_or(0);
                        if current < returned {
                            violations.push(format!(
                                "op {index}: current({id}) = {current} < {returned}"
                            ));
                        }
                    }
                    continue;
                }
                Op::SetMin(id) => {
                    let Ok(current) = store.current("t", *id) else {
                        continue;
                    };
                    let possible = min_possible.entry(*id).or_insert_with(|| vec![0]);
                    match store.set_min_seqs("t", &[*id], &[current]).await {
                        Ok(()) => *possible = vec![current],
                        Err(_) => possible.push(current),
                    }
                    continue;
                }
                Op::Checkpoint => {
                    let _ = store.checkpoint();
                    continue;
                }
                Op::FailFrom(after_ops) => {
                    storage.fail_from_op(Some(storage.ops() + after_ops));
                    continue;
                }
                Op::Restart(seed) => {
                    let mode =
                        seed.map_or(CrashMode::DropUnsynced, |seed| CrashMode::Torn { seed });
                    let image = storage.crash_image(mode);
                    let _ = store.shutdown();
                    drop(store);
                    storage = image;
                    store = open(storage.clone()).await;
                    for (id, returned) in &max_returned {
                        let recovered = store.current("t", *id).expect("current");
                        if recovered < *returned {
                            violations.push(format!(
                                "S2 op {index}: id {id} was handed {returned} but the durable \
                                 ceiling after restart is {recovered}"
                            ));
                        }
                    }
                    for (id, possible) in &mut min_possible {
                        let recovered = store.min_seqs("t", &[*id]).expect("min_seq")[0];
                        if !possible.contains(&recovered) {
                            violations.push(format!(
                                "min_seq op {index}: id {id} recovered min_seq {recovered}, \
                                 acknowledged or in flight: {possible:?}"
                            ));
                        }
                        // What recovery shows is now the acknowledged state.
                        *possible = vec![recovered];
                    }
                    continue;
                }
            };
            let at = history.len() as u64 * 2;
            let outcome = match result {
                Ok(values) => {
                    for (id, value) in ids.iter().zip(&values) {
                        let entry = max_returned.entry(*id).or_default();
                        *entry = (*entry).max(*value);
                    }
                    Outcome::Ok(values)
                }
                Err(_) => Outcome::Unknown,
            };
            history.push(SeqCall {
                ids,
                start_ns: at,
                end_ns: at + 1,
                outcome,
            });
        }
        let _ = store.shutdown();
        violations.extend(check(&history).into_iter().map(|v| format!("S1 {v}")));
        violations
    })
}

#[cfg(not(any(
    feature = "planted-serve-before-durable",
    feature = "planted-ack-before-fsync"
)))]
proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn random_crashes_never_break_s1_or_s2(ops in proptest::collection::vec(op(), 1..60)) {
        let violations = run(&ops);
        prop_assert!(violations.is_empty(), "{violations:#?}");
    }
}

#[test]
fn a_crash_right_after_serving_keeps_every_value() {
    // Deterministic version of the riskiest schedule: the first ceiling (3) is durable, then the
    // process dies on its very next storage operation, i.e. while the raise that id 1 needs
    // for its 4th value is being persisted.
    let mut ops = vec![Op::Next(1), Op::FailFrom(0)];
    ops.extend(std::iter::repeat_n(Op::Next(1), 4));
    ops.extend([Op::Restart(None), Op::Next(1)]);
    let violations = run(&ops);
    #[cfg(not(any(
        feature = "planted-serve-before-durable",
        feature = "planted-ack-before-fsync"
    )))]
    assert!(violations.is_empty(), "{violations:#?}");
    #[cfg(any(
        feature = "planted-serve-before-durable",
        feature = "planted-ack-before-fsync"
    ))]
    assert!(!violations.is_empty(), "the planted bug went unnoticed");
}

/// A min_seq acknowledged, then a crash that keeps only what was fsynced: the set survives.
/// With the log acknowledging before its fsync, the min_seq checker reports the loss.
#[test]
fn an_acknowledged_min_seq_survives_a_crash() {
    let ops = [
        Op::Next(1),
        Op::Next(1),
        Op::Checkpoint,
        Op::SetMin(1),
        Op::Restart(None),
        Op::Next(1),
        Op::SetMin(1),
        Op::Restart(Some(7)),
    ];
    let violations = run(&ops);
    #[cfg(not(any(
        feature = "planted-serve-before-durable",
        feature = "planted-ack-before-fsync"
    )))]
    assert!(violations.is_empty(), "{violations:#?}");
    #[cfg(feature = "planted-ack-before-fsync")]
    assert!(
        violations.iter().any(|v| v.starts_with("min_seq")),
        "the planted bug lost no acknowledged min_seq: {violations:#?}"
    );
}

/// Negative control: with a planted bug, random scenarios must find violations.
#[cfg(any(
    feature = "planted-serve-before-durable",
    feature = "planted-ack-before-fsync"
))]
#[test]
fn planted_bug_is_caught() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::deterministic_rng(RngAlgorithm::ChaCha),
    );
    let strategy = proptest::collection::vec(op(), 1..60);
    const SCENARIOS: usize = 500;
    let mut failing = 0;
    for _ in 0..SCENARIOS {
        let ops = strategy.new_tree(&mut runner).expect("tree").current();
        if !run(&ops).is_empty() {
            failing += 1;
        }
    }
    eprintln!("planted bug: {failing} of {SCENARIOS} random scenarios found violations");
    assert!(failing > 0, "the checkers never fired with the bug planted");
}
