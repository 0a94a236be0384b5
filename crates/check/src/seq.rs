//! S1 (monotonic) over a concurrent history of sequence allocations.
//!
//! For every id: no value is returned twice, values within one batch call increase in call
//! order, and if call A completed before call B started (real time), B's value is greater than
//! A's. Calls that failed or timed out are *unknown*: they may or may not have allocated, and
//! since holes are allowed they constrain nothing.
//!
//! A range allocation ([`Outcome::Ranges`]) counts as every value of each range, so a range
//! that overlaps another value of its id is a duplicate and a range that starts below a value
//! returned before it began is a real-time violation. The cost is the sum of the range
//! lengths: histories keep ranges short.
//!
//! The real-time check is O(n log n) per id: walk values from the largest down, keeping the
//! earliest end time among calls with larger values; a call that started after that end time
//! received a smaller value than a call that finished before it began.

use std::collections::HashMap;
use std::fmt;

/// One allocation call as a client saw it.
#[derive(Clone, Debug)]
pub struct SeqCall {
    /// Ids in request order.
    pub ids: Vec<u64>,
    /// When the client sent it (ns, CLOCK_MONOTONIC, any fixed origin).
    pub start_ns: u64,
    /// When the client got the answer or gave up (ns).
    pub end_ns: u64,
    /// What came back.
    pub outcome: Outcome,
}

/// The result of a call.
#[derive(Clone, Debug)]
pub enum Outcome {
    /// One value per requested id, in order.
    Ok(Vec<u64>),
    /// A range allocation: `count` consecutive values per requested id, in order, given by the
    /// last of each range (`last - count + 1 ..= last`).
    Ranges {
        /// Values per id.
        count: u64,
        /// The last value of each id's range.
        lasts: Vec<u64>,
    },
    /// Failed or timed out: may or may not have taken effect.
    Unknown,
}

/// A violation of S1 found in a history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Violation {
    /// The same value was returned twice for an id.
    Duplicate {
        /// The id.
        id: u64,
        /// The value.
        value: u64,
    },
    /// A batch returned non-increasing values for a repeated id.
    BatchNotIncreasing {
        /// The id.
        id: u64,
        /// The values in batch order.
        values: Vec<u64>,
    },
    /// A call that started after another finished got a smaller value.
    RealTime {
        /// The id.
        id: u64,
        /// The value of the call that finished first.
        earlier_value: u64,
        /// The smaller value of the call that started later.
        later_value: u64,
    },
    /// A call returned a value count different from its id count, a zero value, or a range
    /// reaching below 1.
    Malformed {
        /// Index of the call in the history.
        call: usize,
    },
}

impl Violation {
    /// The id the violation is about (`None` for a malformed call).
    pub fn id(&self) -> Option<u64> {
        match self {
            Violation::Duplicate { id, .. }
            | Violation::BatchNotIncreasing { id, .. }
            | Violation::RealTime { id, .. } => Some(*id),
            Violation::Malformed { .. } => None,
        }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::Duplicate { id, value } => {
                write!(f, "id {id}: value {value} returned twice")
            }
            Violation::BatchNotIncreasing { id, values } => {
                write!(f, "id {id}: one batch returned {values:?}")
            }
            Violation::RealTime {
                id,
                earlier_value,
                later_value,
            } => write!(
                f,
                "id {id}: a call finished with {earlier_value}, a later call got {later_value}"
            ),
            Violation::Malformed { call } => write!(f, "call {call}: malformed reply"),
        }
    }
}

/// One observed value of one id.
#[derive(Clone, Copy, Debug)]
struct Observation {
    value: u64,
    start_ns: u64,
    end_ns: u64,
}

/// Checks S1 over `calls`; returns every violation (empty = the history is linearizable for
/// per-id monotonicity).
pub fn check(calls: &[SeqCall]) -> Vec<Violation> {
    let mut violations = Vec::new();
    let mut by_id: HashMap<u64, Vec<Observation>> = HashMap::new();
    for (index, call) in calls.iter().enumerate() {
        let (values, count) = match &call.outcome {
            Outcome::Ok(values) => (values, 1),
            Outcome::Ranges { count, lasts } => (lasts, *count),
            Outcome::Unknown => continue,
        };
        if values.len() != call.ids.len() || count == 0 || values.iter().any(|&last| last < count)
        {
            violations.push(Violation::Malformed { call: index });
            continue;
        }
        let mut in_batch: HashMap<u64, Vec<u64>> = HashMap::new();
        for (&id, &last) in call.ids.iter().zip(values) {
            in_batch.entry(id).or_default().push(last);
            let observations = by_id.entry(id).or_default();
            for value in last - (count - 1)..=last {
                observations.push(Observation {
                    value,
                    start_ns: call.start_ns,
                    end_ns: call.end_ns,
                });
            }
        }
        for (id, values) in in_batch {
            if values.windows(2).any(|pair| pair[0] >= pair[1]) {
                violations.push(Violation::BatchNotIncreasing { id, values });
            }
        }
    }
    let mut ids: Vec<_> = by_id.keys().copied().collect();
    ids.sort_unstable();
    for id in ids {
        let observations = by_id.get_mut(&id).expect("id from keys");
        observations.sort_unstable_by_key(|o| std::cmp::Reverse(o.value));
        for pair in observations.windows(2) {
            if pair[0].value == pair[1].value {
                violations.push(Violation::Duplicate {
                    id,
                    value: pair[0].value,
                });
            }
        }
        // Walking values downwards: `earliest` is the call with the earliest end among strictly
        // larger values seen so far.
        let mut earliest: Option<Observation> = None;
        let mut index = 0;
        while index < observations.len() {
            // Equal values are duplicates (reported above), not real-time violations.
            let value = observations[index].value;
            let group_end = observations[index..]
                .iter()
                .position(|o| o.value != value)
                .map_or(observations.len(), |offset| index + offset);
            for observation in &observations[index..group_end] {
                if let Some(larger) = earliest
                    && larger.end_ns < observation.start_ns
                {
                    violations.push(Violation::RealTime {
                        id,
                        earlier_value: larger.value,
                        later_value: observation.value,
                    });
                }
            }
            for observation in &observations[index..group_end] {
                if earliest.is_none_or(|e| observation.end_ns < e.end_ns) {
                    earliest = Some(*observation);
                }
            }
            index = group_end;
        }
    }
    violations
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(ids: &[u64], start_ns: u64, end_ns: u64, values: Option<&[u64]>) -> SeqCall {
        SeqCall {
            ids: ids.to_vec(),
            start_ns,
            end_ns,
            outcome: values.map_or(Outcome::Unknown, |v| Outcome::Ok(v.to_vec())),
        }
    }

    #[test]
    fn a_correct_sequential_history_passes() {
        let history = [
            call(&[1], 0, 1, Some(&[1])),
            call(&[1, 1], 2, 3, Some(&[2, 5])),
        ];
        assert!(check(&history).is_empty());
    }

    #[test]
    fn overlapping_calls_may_return_in_any_order() {
        let history = [call(&[1], 0, 10, Some(&[5])), call(&[1], 5, 15, Some(&[3]))];
        assert!(check(&history).is_empty());
    }

    #[test]
    fn a_rollback_after_completion_is_a_real_time_violation() {
        let history = [call(&[7], 0, 1, Some(&[10])), call(&[7], 2, 3, Some(&[9]))];
        assert_eq!(
            check(&history),
            vec![Violation::RealTime {
                id: 7,
                earlier_value: 10,
                later_value: 9
            }]
        );
    }

    #[test]
    fn a_value_returned_twice_is_a_duplicate_even_when_concurrent() {
        let history = [call(&[7], 0, 10, Some(&[4])), call(&[7], 1, 9, Some(&[4]))];
        assert_eq!(
            check(&history),
            vec![Violation::Duplicate { id: 7, value: 4 }]
        );
    }

    #[test]
    fn unknown_calls_constrain_nothing() {
        let history = [call(&[7], 0, 1, None), call(&[7], 2, 3, Some(&[1]))];
        assert!(check(&history).is_empty());
    }

    #[test]
    fn a_batch_must_increase_for_repeated_ids() {
        let history = [call(&[3, 3], 0, 1, Some(&[6, 6]))];
        let violations = check(&history);
        assert!(violations.contains(&Violation::BatchNotIncreasing {
            id: 3,
            values: vec![6, 6]
        }));
    }

    #[test]
    fn malformed_replies_are_reported() {
        assert_eq!(
            check(&[call(&[1, 2], 0, 1, Some(&[1]))]),
            vec![Violation::Malformed { call: 0 }]
        );
        assert_eq!(
            check(&[call(&[1], 0, 1, Some(&[0]))]),
            vec![Violation::Malformed { call: 0 }]
        );
    }

    fn ranges(ids: &[u64], start_ns: u64, end_ns: u64, count: u64, lasts: &[u64]) -> SeqCall {
        SeqCall {
            ids: ids.to_vec(),
            start_ns,
            end_ns,
            outcome: Outcome::Ranges {
                count,
                lasts: lasts.to_vec(),
            },
        }
    }

    #[test]
    fn ranges_count_as_every_value_they_cover() {
        // 1, then 2..=5 and 6..=9 in one batch, then 10: clean.
        let clean = [
            call(&[1], 0, 1, Some(&[1])),
            ranges(&[1, 1], 2, 3, 4, &[5, 9]),
            call(&[1], 4, 5, Some(&[10])),
        ];
        assert!(check(&clean).is_empty(), "{:?}", check(&clean));
        // A range overlapping a single value of a concurrent call: a duplicate.
        let overlap = [call(&[1], 0, 10, Some(&[3])), ranges(&[1], 1, 9, 4, &[5])];
        assert_eq!(
            check(&overlap),
            vec![Violation::Duplicate { id: 1, value: 3 }]
        );
        // A range that starts at or below a value returned before it began: a duplicate, or
        // a rollback.
        let rollback = [call(&[1], 0, 1, Some(&[7])), ranges(&[1], 2, 3, 4, &[10])];
        assert_eq!(
            check(&rollback),
            vec![Violation::Duplicate { id: 1, value: 7 }]
        );
        let rollback = [call(&[1], 0, 1, Some(&[8])), ranges(&[1], 2, 3, 4, &[10])];
        assert!(check(&rollback).contains(&Violation::RealTime {
            id: 1,
            earlier_value: 8,
            later_value: 7
        }));
        // A range reaching below 1 is malformed.
        assert_eq!(
            check(&[ranges(&[1], 0, 1, 4, &[3])]),
            vec![Violation::Malformed { call: 0 }]
        );
    }

    #[test]
    fn the_real_time_check_finds_a_violation_far_apart() {
        let mut history: Vec<_> = (0..100)
            .map(|i| call(&[1], i * 10, i * 10 + 5, Some(&[i + 1])))
            .collect();
        history.push(call(&[1], 10_000, 10_001, Some(&[50])));
        let violations = check(&history);
        assert!(violations.contains(&Violation::Duplicate { id: 1, value: 50 }));
        assert!(violations.iter().any(|v| matches!(
            v,
            Violation::RealTime {
                later_value: 50,
                ..
            }
        )));
    }
}
