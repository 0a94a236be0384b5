//! Unit tests of the allocator rules, one scenario per test, asserting on the outputs (values,
//! raises, errors) and on `check_invariants` after every step.

use super::*;
use crate::KeyKind;

const NS: &str = "inbox";

/// Namespace `inbox`: ids [100, 200), sections of 10 ids, step 10 (headroom_min 5).
fn small_def() -> NamespaceDef {
    NamespaceDef {
        name: NS.to_owned(),
        id_lo: 100,
        id_hi: 200,
        section_size: 10,
        step: 10,
        keys: KeyKind::Numeric,
    }
}

fn allocator() -> (Allocator, NsId) {
    let mut allocator = Allocator::new(AllocatorOptions::default());
    let ns = allocator.add_namespace(small_def()).unwrap();
    (allocator, ns)
}

fn raise(ns: NsId, section: u64, max_seq: u64) -> Raise {
    Raise {
        ns,
        section,
        max_seq,
    }
}

/// Allocates one id, completing every raise requested on the way; returns the value.
fn next_settled(allocator: &mut Allocator, id: u64) -> u64 {
    for _ in 0..4 {
        match allocator.next(NS, id).unwrap() {
            Alloc::Served { seqs, raises } => {
                raises.into_iter().for_each(|r| allocator.raise_durable(r));
                allocator.check_invariants().unwrap();
                return seqs[0];
            }
            Alloc::Wait { raises } => raises.into_iter().for_each(|r| allocator.raise_durable(r)),
        }
    }
    panic!("id {id} never served");
}

#[test]
fn first_next_of_a_new_section_waits_for_a_raise_to_step() {
    let (mut allocator, ns) = allocator();
    let alloc = allocator.next(NS, 123).unwrap();
    assert_eq!(
        alloc,
        Alloc::Wait {
            raises: vec![raise(ns, 2, 10)]
        }
    );
    assert_eq!(allocator.current(NS, 123).unwrap(), 0);
    assert_eq!(allocator.durable_max(ns, 2), 0);
    allocator.check_invariants().unwrap();
}

#[cfg(not(feature = "planted-serve-before-durable"))]
#[test]
fn waits_until_the_raise_is_durable_then_values_start_at_1() {
    let (mut allocator, ns) = allocator();
    let alloc = allocator.next(NS, 100).unwrap();
    assert!(matches!(alloc, Alloc::Wait { .. }));
    // The raise is pending, not durable: the retry still waits and asks for nothing new.
    assert_eq!(
        allocator.next(NS, 100).unwrap(),
        Alloc::Wait { raises: vec![] }
    );
    allocator.raise_durable(raise(ns, 0, 10));
    assert_eq!(
        allocator.next(NS, 100).unwrap(),
        Alloc::Served {
            seqs: vec![1],
            raises: vec![]
        }
    );
    assert_eq!(next_settled(&mut allocator, 100), 2);
    assert_eq!(next_settled(&mut allocator, 101), 1);
    assert_eq!(allocator.current(NS, 100).unwrap(), 2);
    assert_eq!(allocator.current(NS, 102).unwrap(), 0);
}

#[test]
fn repeated_ids_in_a_batch_get_increasing_values() {
    let (mut allocator, ns) = allocator();
    allocator.load_section(ns, 0, 0);
    allocator.raise_durable(raise(ns, 0, 100));
    let alloc = allocator
        .next_batch(NS, &[100, 101, 100, 100, 109])
        .unwrap();
    let Alloc::Served { seqs, .. } = alloc else {
        panic!("expected Served, got {alloc:?}");
    };
    assert_eq!(seqs, vec![1, 1, 2, 3, 1]);
    assert_eq!(allocator.current(NS, 100).unwrap(), 3);
    allocator.check_invariants().unwrap();
}

#[cfg(not(feature = "planted-serve-before-durable"))]
#[test]
fn batch_that_outruns_a_ceiling_allocates_nothing() {
    let (mut allocator, ns) = allocator();
    allocator.raise_durable(raise(ns, 0, 10));
    allocator.raise_durable(raise(ns, 1, 10));
    next_settled(&mut allocator, 110);
    let before = allocator.current_batch(NS, &[100, 110, 111]).unwrap();
    // Section 0 fits; section 1 needs 12 values for id 111 (ceiling 10): nothing is served.
    let ids: Vec<u64> = [100, 110].into_iter().chain([111; 12]).collect();
    let alloc = allocator.next_batch(NS, &ids).unwrap();
    // Rounded up to a multiple of step above durable (12 -> 20).
    assert_eq!(
        alloc,
        Alloc::Wait {
            raises: vec![raise(ns, 1, 20)]
        }
    );
    assert_eq!(
        allocator.current_batch(NS, &[100, 110, 111]).unwrap(),
        before
    );
    allocator.check_invariants().unwrap();
    allocator.raise_durable(raise(ns, 1, 20));
    let Alloc::Served { seqs, .. } = allocator.next_batch(NS, &ids).unwrap() else {
        panic!("expected Served after the raise");
    };
    assert_eq!(seqs[..3], [1, 2, 1]);
    assert_eq!(seqs[13], 12);
}

#[cfg(not(feature = "planted-serve-before-durable"))]
#[test]
fn wait_on_a_never_touched_section_allocates_no_array_and_sizes_the_raise() {
    let (mut allocator, ns) = allocator();
    let alloc = allocator.next_batch(NS, &[150; 25]).unwrap();
    assert_eq!(
        alloc,
        Alloc::Wait {
            raises: vec![raise(ns, 5, 30)]
        }
    );
    let section = &allocator.namespaces[0].sections[0];
    assert!(section.cur.is_empty());
    // A pending raise too small for a bigger need is replaced by a bigger one.
    let alloc = allocator.next_batch(NS, &[150; 45]).unwrap();
    assert_eq!(
        alloc,
        Alloc::Wait {
            raises: vec![raise(ns, 5, 50)]
        }
    );
    allocator.check_invariants().unwrap();
}

#[test]
fn pre_raise_is_emitted_once_when_headroom_falls_under_half_a_step() {
    let (mut allocator, ns) = allocator();
    allocator.raise_durable(raise(ns, 0, 10));
    let mut raises_seen = Vec::new();
    for expected in 1..=8 {
        let alloc = allocator.next(NS, 100).unwrap();
        let Alloc::Served { seqs, raises } = alloc else {
            panic!("expected Served at {expected}");
        };
        assert_eq!(seqs, vec![expected]);
        raises_seen.push((expected, raises));
        allocator.check_invariants().unwrap();
    }
    // headroom = 10 - high < 5 first at high = 6; the raise is not repeated while pending.
    for (value, raises) in &raises_seen {
        let expected = if *value == 6 {
            vec![raise(ns, 0, 20)]
        } else {
            vec![]
        };
        assert_eq!(raises, &expected, "after value {value}");
    }
    allocator.raise_durable(raise(ns, 0, 20));
    // Headroom is 12 again: serving continues without a wait and without a new raise.
    assert_eq!(
        allocator.next(NS, 100).unwrap(),
        Alloc::Served {
            seqs: vec![9],
            raises: vec![]
        }
    );
}

#[test]
fn failed_raise_is_requested_again_by_the_next_call() {
    let (mut allocator, ns) = allocator();
    let Alloc::Wait { raises } = allocator.next(NS, 100).unwrap() else {
        panic!("expected Wait");
    };
    assert_eq!(raises, vec![raise(ns, 0, 10)]);
    allocator.raise_failed(raises[0]);
    assert_eq!(
        allocator.next(NS, 100).unwrap(),
        Alloc::Wait {
            raises: vec![raise(ns, 0, 10)]
        }
    );
    allocator.check_invariants().unwrap();
}

#[test]
fn stale_durable_report_of_a_smaller_raise_keeps_the_bigger_pending() {
    let (mut allocator, ns) = allocator();
    let _ = allocator.next_batch(NS, &[100; 5]).unwrap();
    let _ = allocator.next_batch(NS, &[100; 25]).unwrap();
    assert_eq!(allocator.ceilings(), vec![(ns, 0, 30)]);
    allocator.raise_durable(raise(ns, 0, 10));
    assert_eq!(allocator.durable_max(ns, 0), 10);
    // The bigger raise is still pending: a failure of the smaller one does not clear it.
    allocator.raise_failed(raise(ns, 0, 10));
    assert_eq!(allocator.ceilings(), vec![(ns, 0, 30)]);
    allocator.raise_durable(raise(ns, 0, 30));
    allocator.raise_durable(raise(ns, 0, 10));
    assert_eq!(allocator.durable_max(ns, 0), 30);
    allocator.check_invariants().unwrap();
}

#[test]
fn load_section_makes_next_return_max_seq_plus_one() {
    let (mut allocator, ns) = allocator();
    allocator.load_section(ns, 3, 40);
    assert_eq!(allocator.current(NS, 135).unwrap(), 40);
    assert_eq!(
        allocator.current_batch(NS, &[130, 139]).unwrap(),
        vec![40, 40]
    );
    // Loaded ceiling 40 has no headroom: the first next waits for 50, then serves 41.
    assert_eq!(
        allocator.next(NS, 135).unwrap(),
        Alloc::Wait {
            raises: vec![raise(ns, 3, 50)]
        }
    );
    allocator.raise_durable(raise(ns, 3, 50));
    assert_eq!(next_settled(&mut allocator, 135), 41);
    assert_eq!(allocator.current(NS, 136).unwrap(), 40);
    assert_eq!(allocator.sections_loaded(), 1);
}

#[test]
fn load_section_after_use_skips_every_id_and_is_idempotent() {
    let (mut allocator, ns) = allocator();
    allocator.raise_durable(raise(ns, 0, 100));
    assert_eq!(next_settled(&mut allocator, 100), 1);
    assert_eq!(next_settled(&mut allocator, 100), 2);
    allocator.load_section(ns, 0, 60);
    allocator.load_section(ns, 0, 60);
    // A smaller report never lowers the ceiling.
    allocator.load_section(ns, 0, 7);
    assert_eq!(allocator.durable_max(ns, 0), 100);
    assert_eq!(allocator.current(NS, 100).unwrap(), 100);
    allocator.check_invariants().unwrap();
}

#[test]
fn ceilings_include_pending_targets_in_ns_section_order() {
    let mut allocator = Allocator::new(AllocatorOptions::default());
    let ns_a = allocator.add_namespace(small_def()).unwrap();
    let ns_b = allocator
        .add_namespace(NamespaceDef {
            name: "conv".into(),
            ..small_def()
        })
        .unwrap();
    allocator.load_section(ns_b, 1, 5);
    allocator.raise_durable(raise(ns_a, 7, 10));
    let _ = allocator.next(NS, 120).unwrap();
    assert_eq!(
        allocator.ceilings(),
        vec![(ns_a, 2, 10), (ns_a, 7, 10), (ns_b, 1, 5)]
    );
}

#[test]
fn reports_for_unknown_namespaces_or_sections_are_ignored() {
    let (mut allocator, ns) = allocator();
    allocator.raise_durable(raise(ns + 1, 0, 10));
    allocator.raise_durable(raise(ns, 10, 10));
    allocator.load_section(ns, 99, 10);
    allocator.raise_failed(raise(ns, 0, 10));
    assert_eq!(allocator.sections_loaded(), 1);
    assert_eq!(allocator.ceilings(), vec![]);
}

#[test]
fn errors_name_the_range_and_the_limit() {
    let mut allocator = Allocator::new(AllocatorOptions {
        batch_ids_max: 3,
        ..AllocatorOptions::default()
    });
    allocator.add_namespace(small_def()).unwrap();
    let error = allocator.next(NS, 200).unwrap_err();
    assert_eq!(
        error,
        SeqError::IdOutOfRange {
            ns: NS.into(),
            id: 200,
            lo: 100,
            hi: 200
        }
    );
    assert_eq!(
        error.to_string(),
        "id 200 is out of range [100, 200) of namespace `inbox`"
    );
    let error = allocator.next_batch(NS, &[100, 101, 102, 103]).unwrap_err();
    assert_eq!(error, SeqError::BatchTooLarge { len: 4, max: 3 });
    assert!(error.to_string().contains("batch_ids_max = 3"), "{error}");
    assert_eq!(
        allocator.current_batch(NS, &[1; 4]).unwrap_err(),
        SeqError::BatchTooLarge { len: 4, max: 3 }
    );
    assert_eq!(
        allocator.next_batch(NS, &[]).unwrap_err(),
        SeqError::EmptyBatch
    );
    assert_eq!(
        allocator.current_batch(NS, &[]).unwrap_err(),
        SeqError::EmptyBatch
    );
    let error = allocator.current("nope", 1).unwrap_err();
    assert_eq!(error.to_string(), "unknown namespace `nope`");
    // A bad id anywhere in a batch rejects it before anything is touched.
    assert!(matches!(
        allocator.next_batch(NS, &[100, 99]),
        Err(SeqError::IdOutOfRange { id: 99, .. })
    ));
    assert_eq!(allocator.sections_loaded(), 0);
    assert_eq!(
        allocator
            .add_namespace(small_def())
            .unwrap_err()
            .to_string(),
        "namespace `inbox` already exists"
    );
    let bad = NamespaceDef {
        step: 0,
        ..NamespaceDef::default_namespace()
    };
    assert!(matches!(
        allocator.add_namespace(bad),
        Err(SeqError::InvalidNamespace(_))
    ));
}

#[test]
fn namespaces_are_listed_in_id_order() {
    let mut allocator = Allocator::new(AllocatorOptions::default());
    let names = ["default", "inbox", "conv"];
    for name in names {
        let def = NamespaceDef {
            name: name.into(),
            ..NamespaceDef::default_namespace()
        };
        allocator.add_namespace(def).unwrap();
    }
    let listed: Vec<(NsId, &str)> = allocator
        .namespaces()
        .map(|(ns, def)| (ns, def.name.as_str()))
        .collect();
    assert_eq!(listed, vec![(0, "default"), (1, "inbox"), (2, "conv")]);
    assert_eq!(allocator.namespace("conv").map(|(ns, _)| ns), Some(2));
    assert_eq!(allocator.namespace_by_id(1).unwrap().name, "inbox");
    assert!(allocator.namespace("missing").is_none());
    assert!(allocator.namespace_by_id(3).is_none());
}

#[test]
fn partial_last_section_allocates_only_its_ids() {
    let mut allocator = Allocator::new(AllocatorOptions::default());
    let def = NamespaceDef {
        id_hi: 203,
        ..small_def()
    };
    let ns = allocator.add_namespace(def).unwrap();
    allocator.raise_durable(raise(ns, 10, 10));
    assert_eq!(next_settled(&mut allocator, 202), 1);
    assert_eq!(allocator.namespaces[0].sections[0].cur.len(), 3);
}

#[test]
fn exhausted_sequence_is_an_error_not_a_wrap() {
    let (mut allocator, ns) = allocator();
    allocator.load_section(ns, 0, u64::MAX);
    let error = allocator.next(NS, 100).unwrap_err();
    assert_eq!(
        error,
        SeqError::SequenceExhausted {
            ns: NS.into(),
            id: "100".into()
        }
    );
    assert!(allocator.next_batch(NS, &[100]).is_err());
    allocator.check_invariants().unwrap();
}

#[test]
fn headroom_min_is_half_a_step_and_at_least_one() {
    assert_eq!(headroom_min(10_000), 5_000);
    assert_eq!(headroom_min(3), 1);
    assert_eq!(headroom_min(1), 1);
}

#[cfg(not(feature = "planted-serve-before-durable"))]
#[test]
fn step_of_one_raises_ahead_after_every_value() {
    let mut allocator = Allocator::new(AllocatorOptions::default());
    let ns = allocator
        .add_namespace(NamespaceDef {
            step: 1,
            ..small_def()
        })
        .unwrap();
    for expected in 1..=5 {
        let Alloc::Wait { raises } = allocator.next(NS, 100).unwrap() else {
            panic!("expected Wait");
        };
        assert_eq!(raises, vec![raise(ns, 0, expected)]);
        allocator.raise_durable(raises[0]);
        let Alloc::Served { seqs, raises } = allocator.next(NS, 100).unwrap() else {
            panic!("expected Served");
        };
        assert_eq!(seqs, vec![expected]);
        assert_eq!(raises, vec![raise(ns, 0, expected + 1)]);
        allocator.raise_failed(raises[0]);
    }
}

/// Negative control: with the planted bug, a value above the durable ceiling is served and
/// `check_invariants` reports the S2 violation.
#[cfg(feature = "planted-serve-before-durable")]
#[test]
fn planted_bug_serves_before_durable_and_check_invariants_reports_s2() {
    let (mut allocator, ns) = allocator();
    let alloc = allocator.next(NS, 100).unwrap();
    assert_eq!(
        alloc,
        Alloc::Wait {
            raises: vec![raise(ns, 0, 10)]
        }
    );
    // The raise was never reported durable, yet the planted bug serves from it.
    let alloc = allocator.next(NS, 100).unwrap();
    assert!(matches!(alloc, Alloc::Served { .. }), "{alloc:?}");
    assert_eq!(allocator.durable_max(ns, 0), 0);
    let error = allocator.check_invariants().unwrap_err();
    assert!(error.contains("S2"), "{error}");
}

#[test]
fn requests_never_create_sections_beyond_sections_max_but_loads_always_load() {
    let mut allocator = Allocator::new(AllocatorOptions {
        sections_max: 3,
        ..AllocatorOptions::default()
    });
    let ns = allocator.add_namespace(small_def()).unwrap();
    next_settled(&mut allocator, 100);
    next_settled(&mut allocator, 110);
    // A batch that would create two more sections is refused whole; one more fits.
    assert_eq!(
        allocator.next_batch(NS, &[120, 130, 101]),
        Err(SeqError::SectionsExhausted { max: 3 })
    );
    assert_eq!(allocator.sections_loaded(), 2);
    assert!(matches!(
        allocator.next_batch(NS, &[120, 121, 101]).unwrap(),
        Alloc::Wait { .. } | Alloc::Served { .. }
    ));
    assert_eq!(allocator.sections_loaded(), 3);
    assert_eq!(
        allocator.next(NS, 130),
        Err(SeqError::SectionsExhausted { max: 3 })
    );
    // Sections already in memory keep serving.
    assert!(next_settled(&mut allocator, 111) > 0);
    // Durable history always loads, and counts.
    allocator.load_section(ns, 5, 40);
    assert_eq!(allocator.sections_loaded(), 4);
    assert!(next_settled(&mut allocator, 150) > 40);
    allocator.check_invariants().unwrap();
}

#[test]
fn an_unloaded_section_continues_only_above_the_ceiling_loaded_again() {
    let (mut allocator, ns) = allocator();
    for _ in 0..3 {
        next_settled(&mut allocator, 105);
    }
    next_settled(&mut allocator, 115);
    let other = allocator.durable_max(ns, 1);
    assert!(allocator.unload_section(ns, 0));
    assert!(!allocator.unload_section(ns, 0), "already gone");
    assert_eq!(allocator.durable_max(ns, 0), 0);
    assert_eq!(
        allocator.durable_max(ns, 1),
        other,
        "the other section stays"
    );
    assert_eq!(allocator.sections_loaded(), 1);
    // Another node raised the section to 40 meanwhile; this one loads that ceiling.
    allocator.load_section(ns, 0, 40);
    assert_eq!(next_settled(&mut allocator, 105), 41);
    allocator.check_invariants().unwrap();
}

#[test]
fn a_range_reserves_consecutive_values_and_raises_past_several_steps() {
    let (mut allocator, ns) = allocator();
    assert_eq!(next_settled(&mut allocator, 150), 1);
    // 25 values from a ceiling of 10: nothing is allocated until 2..=26 is durable.
    let alloc = allocator.next_range_batch(NS, &[150], 25).unwrap();
    assert_eq!(
        alloc,
        Alloc::Wait {
            raises: vec![raise(ns, 5, 30)]
        }
    );
    assert_eq!(allocator.current(NS, 150).unwrap(), 1);
    allocator.raise_durable(raise(ns, 5, 30));
    let Alloc::Served { seqs, .. } = allocator.next_range_batch(NS, &[150, 151, 150], 2).unwrap()
    else {
        panic!("not served");
    };
    // The last value of each range: 150 gets 2..=3 then 4..=5; 151 gets 1..=2.
    assert_eq!(seqs, vec![3, 2, 5]);
    assert_eq!(allocator.current(NS, 150).unwrap(), 5);
    assert_eq!(next_settled(&mut allocator, 150), 6);
    allocator.check_invariants().unwrap();
}

#[test]
fn a_range_of_zero_or_over_the_limit_is_refused_and_changes_nothing() {
    let (mut allocator, _) = allocator();
    assert_eq!(next_settled(&mut allocator, 150), 1);
    for count in [0, RANGE_COUNT_MAX + 1, u64::MAX] {
        assert_eq!(
            allocator.next_range_batch(NS, &[150], count),
            Err(SeqError::InvalidCount {
                count,
                max: RANGE_COUNT_MAX
            })
        );
    }
    assert_eq!(allocator.current(NS, 150).unwrap(), 1);
    allocator.check_invariants().unwrap();
}

/// Namespace `conv`: string keys hashed onto [0, 4), sections of 2 slots, step 10.
fn keyed_allocator() -> (Allocator, NsId) {
    let mut allocator = Allocator::new(AllocatorOptions::default());
    let ns = allocator
        .add_namespace(NamespaceDef {
            name: "conv".into(),
            id_lo: 0,
            id_hi: 4,
            section_size: 2,
            step: 10,
            keys: KeyKind::String,
        })
        .unwrap();
    (allocator, ns)
}

/// Runs `next_range_batch` on keys until served, completing raises; returns the values.
fn keys_settled(allocator: &mut Allocator, keys: &[&str], count: u64) -> Vec<u64> {
    let keys: Vec<Vec<u8>> = keys.iter().map(|key| key.as_bytes().to_vec()).collect();
    for _ in 0..8 {
        match allocator.next_range_batch("conv", &keys, count).unwrap() {
            Alloc::Served { seqs, raises } => {
                raises.into_iter().for_each(|r| allocator.raise_durable(r));
                allocator.check_invariants().unwrap();
                return seqs;
            }
            Alloc::Wait { raises } => raises.into_iter().for_each(|r| allocator.raise_durable(r)),
        }
    }
    panic!("keys {keys:?} never served");
}

fn key_current(allocator: &Allocator, key: &str) -> u64 {
    allocator
        .current_batch("conv", &vec![key.as_bytes().to_vec()])
        .unwrap()[0]
}

#[test]
fn keys_get_their_own_sequences_inside_shared_sections() {
    let (mut allocator, _) = keyed_allocator();
    assert_eq!(
        keys_settled(&mut allocator, &["si_1_2", "sg_7", "si_1_2"], 1),
        [1, 1, 2]
    );
    assert_eq!(keys_settled(&mut allocator, &["si_1_2"], 5), [7]);
    assert_eq!(key_current(&allocator, "si_1_2"), 7);
    assert_eq!(key_current(&allocator, "sg_7"), 1);
    assert_eq!(key_current(&allocator, "never"), 0);
    let (keys, bytes) = allocator.keys_loaded();
    assert_eq!(keys, 2);
    assert!(bytes > 0);
    // The totals follow an unload (a section that moved away) exactly.
    let ns = allocator.namespace("conv").unwrap().0;
    let section = allocator
        .namespace_by_id(ns)
        .unwrap()
        .section_of_key(b"sg_7");
    allocator.unload_section(ns, section);
    let (left, left_bytes) = allocator.keys_loaded();
    assert!(
        left < 2 && left_bytes < bytes,
        "{left} keys, {left_bytes} bytes"
    );
    let walked: usize = allocator.namespaces[0]
        .sections
        .iter()
        .filter_map(|state| state.keyed.as_ref())
        .map(|table| table.len())
        .sum();
    assert_eq!(left, walked);
}

#[test]
fn a_loaded_keyed_section_starts_every_key_above_its_ceiling_known_or_not() {
    let (mut allocator, ns) = keyed_allocator();
    keys_settled(&mut allocator, &["a", "b", "c", "d", "e", "f"], 3);
    // A restart: a new allocator learns only the ceilings, never the keys.
    let ceilings = allocator.ceilings();
    let (mut restarted, _) = keyed_allocator();
    for &(ns_id, section, max_seq) in &ceilings {
        assert_eq!(ns_id, ns);
        restarted.load_section(ns_id, section, max_seq);
    }
    let def = restarted.namespace_by_id(ns).unwrap().clone();
    for key in ["a", "b", "never-seen", "zz"] {
        let section = def.section_of_key(key.as_bytes());
        let ceiling = ceilings.iter().find(|c| c.1 == section).map_or(0, |c| c.2);
        let value = keys_settled(&mut restarted, &[key], 1)[0];
        assert!(
            value > ceiling,
            "{key}: {value} not above the ceiling {ceiling}"
        );
    }
}

#[test]
fn keys_are_refused_when_empty_too_long_or_of_the_wrong_kind_and_nothing_changes() {
    let (mut allocator, _) = keyed_allocator();
    keys_settled(&mut allocator, &["ok"], 1);
    let long = vec![b'x'; KEY_BYTES_MAX + 1];
    for keys in [vec![b"ok".to_vec(), Vec::new()], vec![b"ok".to_vec(), long]] {
        let error = allocator.next_batch("conv", &keys).unwrap_err();
        assert!(
            matches!(error, SeqError::InvalidKey { max: 128, .. }),
            "{error}"
        );
        assert!(allocator.current_batch("conv", &keys).is_err());
    }
    let edge = vec![vec![b'y'; KEY_BYTES_MAX]];
    assert!(allocator.next_batch("conv", &edge).is_ok());
    let error = allocator.next("conv", 1).unwrap_err();
    assert!(error.to_string().contains("takes string keys"), "{error}");
    assert!(allocator.next_batch("conv", &[1]).is_err());
    assert!(allocator.current("conv", 1).is_err());
    let (mut numeric, _) = allocator_with_default();
    let error = numeric
        .next_batch("default", &vec![b"k".to_vec()])
        .unwrap_err();
    assert!(error.to_string().contains("takes numeric ids"), "{error}");
    assert_eq!(key_current(&allocator, "ok"), 1);
    allocator.check_invariants().unwrap();
}

fn allocator_with_default() -> (Allocator, NsId) {
    let mut allocator = Allocator::new(AllocatorOptions::default());
    let ns = allocator
        .add_namespace(NamespaceDef::default_namespace())
        .unwrap();
    (allocator, ns)
}

#[cfg(not(feature = "planted-serve-before-durable"))]
#[test]
fn a_keyed_batch_that_must_wait_changes_no_key() {
    let (mut allocator, _) = keyed_allocator();
    keys_settled(&mut allocator, &["a"], 1);
    let keys: Vec<Vec<u8>> = vec![b"a".to_vec(), b"new".to_vec()];
    // A range far past the ceiling: the batch waits and allocates nothing.
    let alloc = allocator.next_range_batch("conv", &keys, 1_000).unwrap();
    assert!(matches!(alloc, Alloc::Wait { .. }), "{alloc:?}");
    assert_eq!(key_current(&allocator, "a"), 1);
    assert_eq!(key_current(&allocator, "new"), 0);
    allocator.check_invariants().unwrap();
}

#[test]
fn a_min_seq_is_at_most_the_current_seq_and_a_refused_set_changes_nothing() {
    let (mut allocator, _) = allocator();
    next_settled(&mut allocator, 100);
    next_settled(&mut allocator, 100);
    let (ns, entries) = allocator
        .prepare_min_seqs(NS, &[100, 100], &[1, 2])
        .unwrap();
    allocator.min_seqs_mut().stage(1, ns, entries);
    assert_eq!(
        allocator.min_seq_batch(NS, &[100]).unwrap(),
        [0],
        "staged, not durable"
    );
    allocator.min_seqs_mut().commit(1);
    assert_eq!(allocator.min_seq_batch(NS, &[100, 101]).unwrap(), [2, 0]);
    let error = allocator
        .prepare_min_seqs(NS, &[100, 101], &[2, 1])
        .unwrap_err();
    assert_eq!(
        error,
        SeqError::MinSeqAboveCurrent {
            ns: NS.into(),
            id: "101".into(),
            min_seq: 1,
            current: 0
        }
    );
    assert!(
        error.to_string().contains("at most the current seq"),
        "{error}"
    );
    let error = allocator.prepare_min_seqs(NS, &[100], &[1, 2]).unwrap_err();
    assert_eq!(error, SeqError::MinSeqCount { ids: 1, values: 2 });
    assert!(matches!(
        allocator.prepare_min_seqs(NS, &[5], &[0]),
        Err(SeqError::IdOutOfRange { .. })
    ));
    assert_eq!(allocator.min_seq_batch(NS, &[100]).unwrap(), [2]);
    // Keys: the same rule through a keyed namespace.
    let (mut keyed, _) = keyed_allocator();
    keys_settled(&mut keyed, &["sg_1"], 5);
    let keys = vec![b"sg_1".to_vec()];
    assert!(keyed.prepare_min_seqs("conv", &keys, &[5]).is_ok());
    assert!(matches!(
        keyed.prepare_min_seqs("conv", &keys, &[6]),
        Err(SeqError::MinSeqAboveCurrent { current: 5, .. })
    ));
}
