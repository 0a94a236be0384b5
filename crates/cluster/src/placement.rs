//! The arbiter's planning, pure: from the current table, the live members, the draining ones
//! and the namespaces, the next table (or none when nothing should change).
//!
//! Rules, in order:
//! 1. a namespace without routes is split into contiguous ranges over the targets (live and
//!    not draining), as evenly as sections allow: no one owned them, so no lock-delay;
//! 2. every range of a node that is not live is split over the targets, least loaded first,
//!    at once (failover is not rate-limited: those sections are unavailable until moved);
//! 3. draining nodes give up to `moves_max` sections per plan, tail first, to the least loaded;
//! 4. then, with what is left of `moves_max`, the most loaded target gives sections to the
//!    least loaded while they differ by more than one section and 5% of the average load.
//!
//! 5. in a plan where nothing else changed, adjacent ranges of one owner that are all
//!    *settled* (`since <= Inputs::settled`) are coalesced into one range with `since` = the
//!    new version and `handover` = false, so repeated moves do not fragment the table without
//!    bound.
//!
//! Rules 3 and 4 run only in a plan where 1 and 2 changed nothing.
//!
//! Presence slots are planned in the same pass by their own rules ([`crate::slots`]); they
//! are first placed once the table has settled (no change for a lock-delay), so that nodes
//! started together all get primaries.
//!
//! Every moved range gets `since` = the new version and `handover` = true. Otherwise adjacent
//! ranges merge only when owner, `since` and `handover` are equal, so a node's readiness for
//! what it kept is never reset by a move of its neighbours.
//!
//! Why rule 5 is safe: `settled` is a table version the arbiter read at least a lock-delay ago
//! on its own monotonic clock, so every move at or below it was written at least a lock-delay
//! before the coalesced table, and the old owner of every part has stopped serving it (the
//! same inequality as the lock-delay itself). The owner may then serve the coalesced range at
//! once (`handover` = false); its new `since` is a new tenure, so the owner reloads each
//! section's ceiling from the coordinator (values go on from there).

use std::collections::{BTreeMap, BTreeSet};

use crate::route::{NamespaceRoute, NodeId, Range, RouteTable};

/// The arbiter's inputs besides the current table.
#[derive(Clone, Debug, Default)]
pub struct Inputs {
    /// Nodes whose lease is alive.
    pub live: BTreeSet<NodeId>,
    /// Nodes asked to give their sections away (`imstate ctl drain`).
    pub draining: BTreeSet<NodeId>,
    /// Every namespace and its section count.
    pub namespaces: BTreeMap<String, u64>,
    /// Most sections moved by rules 3 and 4 in one plan.
    pub moves_max: u64,
    /// Ranges with `since` at or below this version are settled: rule 5 may coalesce them
    /// (0: none is).
    pub settled: u64,
    /// Presence slots to place when the table has none yet (`presence.slots`; 0: do not place
    /// presence). A table that has slots keeps its count: it is fixed for the cluster's life.
    pub presence_slots: u32,
    /// Whether the current table has stood unchanged for a lock-delay (the arbiter's cooldown):
    /// presence slots are first placed only then.
    pub stable: bool,
    /// Nodes gone for less than the orphan grace ([`crate::arbiter::Arbiter::with_orphan_grace`]):
    /// a presence slot range whose primary and replica are both gone waits while either is
    /// here, keeping its roles, so that the one that comes back first serves its copy.
    pub awaited: BTreeSet<NodeId>,
    /// What each replica said it is in sync for (`insync/<node>`), confirmed by its primary
    /// ([`crate::slots::confirmed`]): a primary role moves (drain, balance) only to an
    /// in-sync replica.
    pub in_sync: crate::slots::InSync,
    /// Every live replica's own report, lapsed entries included: a dead primary's replica
    /// is promoted at once only if it synced in its tenure.
    pub reported: crate::slots::InSync,
}

/// The next table, or `None` when `current` is already right (or no node can own anything).
pub fn plan(current: &RouteTable, inputs: &Inputs) -> Option<RouteTable> {
    let mut targets: BTreeSet<&str> = inputs
        .live
        .iter()
        .filter(|node| !inputs.draining.contains(*node))
        .map(String::as_str)
        .collect();
    if targets.is_empty() {
        // Everyone drains: keep serving where we are rather than nowhere.
        targets = inputs.live.iter().map(String::as_str).collect();
    }
    if targets.is_empty() {
        return None;
    }
    let version = current.version + 1;
    let mut next = current.clone();
    next.version = version;
    let mut load: BTreeMap<String, u64> =
        targets.iter().map(|node| (node.to_string(), 0)).collect();
    for (node, sections) in current.load() {
        if let Some(entry) = load.get_mut(node) {
            *entry = sections;
        }
    }
    let mut changed = false;

    // 1. New namespaces.
    for (name, &sections) in &inputs.namespaces {
        if next.namespaces.contains_key(name) || sections == 0 {
            continue;
        }
        let owners: Vec<&str> = targets.iter().copied().collect();
        let parts = (owners.len() as u64).min(sections);
        let mut ranges = Vec::new();
        let mut start = 0;
        // Fill the least loaded first so that many namespaces spread too.
        let mut order = owners.clone();
        order.sort_by_key(|node| (load[*node], *node));
        for part in 0..parts {
            let size = sections / parts + u64::from(part < sections % parts);
            let owner = order[part as usize];
            ranges.push(Range {
                start,
                end: start + size,
                owner: owner.to_owned(),
                since: version,
                handover: false,
            });
            *load.get_mut(owner).expect("a target") += size;
            start += size;
        }
        next.namespaces
            .insert(name.clone(), NamespaceRoute { sections, ranges });
        changed = true;
    }

    // 2. Ranges of nodes that are gone: split over the targets so that their loads even out
    // (water-filling, least loaded first), so that no rebalancing has to follow.
    for route in next.namespaces.values_mut() {
        let mut ranges = Vec::with_capacity(route.ranges.len());
        let mut old = std::mem::take(&mut route.ranges).into_iter().peekable();
        while let Some(range) = old.next() {
            if inputs.live.contains(&range.owner) {
                ranges.push(range);
                continue;
            }
            changed = true;
            // The chunks first (owner, size), then placed so that a chunk going to the owner
            // of a neighbouring range lies next to it (rule 5 can then coalesce them).
            let mut chunks: Vec<(String, u64)> = Vec::new();
            let mut start = range.start;
            while start < range.end {
                let remaining = range.end - start;
                let mut order: Vec<(u64, String)> = load
                    .iter()
                    .map(|(node, sections)| (*sections, node.clone()))
                    .collect();
                order.sort();
                let (least, owner) = order[0].clone();
                // Fill up to the next-least-loaded target's level (at least one section).
                let level = order.get(1).map_or(u64::MAX, |(sections, _)| *sections);
                let share = remaining.div_ceil(order.len() as u64);
                let take = level.saturating_sub(least).max(share).max(1).min(remaining);
                *load.get_mut(&owner).expect("a target") += take;
                chunks.push((owner, take));
                start += take;
            }
            let left = ranges.last().map(|left: &Range| left.owner.clone());
            if let Some(at) = chunks
                .iter()
                .position(|(owner, _)| Some(owner) == left.as_ref())
            {
                let chunk = chunks.remove(at);
                chunks.insert(0, chunk);
            }
            let right = old
                .peek()
                .filter(|right| inputs.live.contains(&right.owner))
                .map(|right| right.owner.clone());
            if chunks.len() > 1
                && let Some(at) = chunks[1..]
                    .iter()
                    .position(|(owner, _)| Some(owner) == right.as_ref())
            {
                let chunk = chunks.remove(at + 1);
                chunks.push(chunk);
            }
            let mut start = range.start;
            for (owner, take) in chunks {
                ranges.push(Range {
                    start,
                    end: start + take,
                    owner,
                    since: version,
                    handover: true,
                });
                start += take;
            }
        }
        route.ranges = ranges;
    }

    // 3 and 4. Bounded moves: drains first, then balance; not in a plan that already
    // assigned or failed sections over (those sections should settle first).
    let mut budget = if changed { 0 } else { inputs.moves_max };
    while budget > 0 {
        let draining = next
            .load()
            .into_iter()
            .filter(|(node, sections)| {
                *sections > 0 && inputs.draining.contains(*node) && !targets.contains(node)
            })
            .map(|(node, _)| node.to_owned())
            .next();
        let (from, count) = match draining {
            Some(from) => (from, budget),
            None => {
                let (most, most_load) = load
                    .iter()
                    .max_by_key(|(node, sections)| (**sections, std::cmp::Reverse(*node)))
                    .map(|(node, sections)| (node.clone(), *sections))
                    .expect("targets are not empty");
                let least_load = load.values().copied().min().unwrap_or(0);
                // Balanced enough: within one section, or 5% of the average load.
                let total: u64 = load.values().sum();
                let tolerance = (total / load.len() as u64 / 20).max(1);
                if most_load <= least_load + tolerance {
                    break;
                }
                (most, ((most_load - least_load) / 2).min(budget))
            }
        };
        let to = least_loaded(&load);
        if to == from {
            break;
        }
        let moved = move_tail(&mut next, &from, &to, count, version);
        if moved == 0 {
            break;
        }
        if let Some(sections) = load.get_mut(&from) {
            *sections -= moved;
        }
        *load.get_mut(&to).expect("a target") += moved;
        budget -= moved;
        changed = true;
    }
    // 5. Coalesce settled neighbours, only when nothing else changed.
    if !changed && inputs.settled > 0 {
        for route in next.namespaces.values_mut() {
            changed |= coalesce(&mut route.ranges, inputs.settled, version);
        }
    }
    // Presence slots. They are first placed only over a settled table (unchanged for a
    // lock-delay), so that nodes starting one after another are all there: a primary role
    // moves to a live node only through its replica (see `crate::slots`).
    let slots = if current.presence.is_some() || current.version > 0 && inputs.stable {
        inputs.presence_slots
    } else {
        0
    };
    if let Some(presence) = crate::slots::plan_slots(
        current.presence.as_ref(),
        slots,
        &inputs.live,
        &inputs.awaited,
        &targets,
        &inputs.in_sync,
        &inputs.reported,
        inputs.moves_max,
        version,
    ) {
        next.presence = Some(presence);
        changed = true;
    }
    if !changed {
        return None;
    }
    for route in next.namespaces.values_mut() {
        merge(&mut route.ranges);
    }
    debug_assert!(next.check().is_ok(), "{:?}", next.check());
    Some(next)
}

fn least_loaded(load: &BTreeMap<String, u64>) -> NodeId {
    load.iter()
        .min_by_key(|(node, sections)| (**sections, *node))
        .map(|(node, _)| node.clone())
        .expect("targets are not empty")
}

/// Moves up to `count` sections of `from` to `to`: the end of one of `from`'s ranges that
/// touches a range of `to` (so that the table does not fragment), else the tail of `from`'s
/// largest range.
fn move_tail(table: &mut RouteTable, from: &str, to: &str, count: u64, version: u64) -> u64 {
    // (namespace, index, len, head): `head` moves the start of the range, else its end.
    let mut best: Option<(String, usize, u64, bool)> = None;
    let mut touching = false;
    for (name, route) in &table.namespaces {
        for (index, range) in route.ranges.iter().enumerate() {
            if range.owner != from {
                continue;
            }
            let right = route
                .ranges
                .get(index + 1)
                .is_some_and(|next| next.owner == to);
            let left = index > 0 && route.ranges[index - 1].owner == to;
            let edge = right || left;
            let better = match &best {
                None => true,
                Some((_, _, len, _)) => {
                    (edge && !touching) || (edge == touching && range.len() > *len)
                }
            };
            if better {
                best = Some((name.clone(), index, range.len(), left && !right));
                touching = edge;
            }
        }
    }
    let Some((name, index, len, head)) = best else {
        return 0;
    };
    let moved = count.min(len);
    let ranges = &mut table.namespaces.get_mut(&name).expect("found above").ranges;
    let range = &mut ranges[index];
    if moved == len {
        *range = Range {
            owner: to.to_owned(),
            since: version,
            handover: true,
            ..range.clone()
        };
    } else if head {
        let split = range.start + moved;
        let part = Range {
            start: range.start,
            end: split,
            owner: to.to_owned(),
            since: version,
            handover: true,
        };
        range.start = split;
        ranges.insert(index, part);
    } else {
        let split = range.end - moved;
        let part = Range {
            start: split,
            end: range.end,
            owner: to.to_owned(),
            since: version,
            handover: true,
        };
        range.end = split;
        ranges.insert(index + 1, part);
    }
    moved
}

/// Rule 5: runs of two or more adjacent ranges of one owner, all settled, become one range of
/// tenure `version` without handover. Returns whether anything changed.
fn coalesce(ranges: &mut Vec<Range>, settled: u64, version: u64) -> bool {
    let mut changed = false;
    let mut out: Vec<Range> = Vec::with_capacity(ranges.len());
    for range in ranges.drain(..) {
        match out.last_mut() {
            Some(last)
                if last.owner == range.owner
                    && range.since <= settled
                    && (last.since <= settled || last.since == version) =>
            {
                last.end = range.end;
                last.since = version;
                last.handover = false;
                changed = true;
            }
            _ => out.push(range),
        }
    }
    *ranges = out;
    changed
}

fn merge(ranges: &mut Vec<Range>) {
    let mut merged: Vec<Range> = Vec::with_capacity(ranges.len());
    for range in ranges.drain(..) {
        match merged.last_mut() {
            Some(last)
                if last.owner == range.owner
                    && last.since == range.since
                    && last.handover == range.handover =>
            {
                last.end = range.end;
            }
            _ => merged.push(range),
        }
    }
    *ranges = merged;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(live: &[&str], draining: &[&str], namespaces: &[(&str, u64)]) -> Inputs {
        Inputs {
            awaited: BTreeSet::new(),
            live: live.iter().map(|node| node.to_string()).collect(),
            draining: draining.iter().map(|node| node.to_string()).collect(),
            namespaces: namespaces
                .iter()
                .map(|(name, sections)| (name.to_string(), *sections))
                .collect(),
            moves_max: 4,
            settled: 0,
            presence_slots: 0,
            stable: false,
            in_sync: Default::default(),
            reported: Default::default(),
        }
    }

    /// Plans until nothing changes (at most 100 rounds), checking every table.
    fn settle(mut table: RouteTable, inputs: &Inputs) -> RouteTable {
        for _ in 0..100 {
            match plan(&table, inputs) {
                Some(next) => {
                    next.check().unwrap();
                    assert_eq!(next.version, table.version + 1);
                    table = next;
                }
                None => return table,
            }
        }
        panic!("the plan never settles: {table:?}");
    }

    #[test]
    fn settled_neighbours_of_one_owner_are_coalesced_and_unsettled_ones_are_not() {
        // Fragment the table: a node dies and comes back, twice, with moves of 4 at a time.
        let all = inputs(&["a", "b", "c"], &[], &[("inbox", 30)]);
        let mut table = settle(RouteTable::empty("c"), &all);
        for _ in 0..2 {
            table = settle(table, &inputs(&["a", "b"], &[], &[("inbox", 30)]));
            table = settle(table, &all);
        }
        let fragments = table.namespaces["inbox"].ranges.len();
        assert!(fragments > 3, "the moves fragmented the table: {table:?}");
        // Ranges moved after the settled version keep their tenure and handover.
        let partly = Inputs {
            settled: table.version - 1,
            ..all.clone()
        };
        if let Some(next) = plan(&table, &partly) {
            for section in 0..30 {
                let (before, after) = (
                    table.range("inbox", section).unwrap(),
                    next.range("inbox", section).unwrap(),
                );
                assert_eq!(before.owner, after.owner);
                if before.since > partly.settled {
                    assert_eq!(
                        (before.since, before.handover),
                        (after.since, after.handover),
                        "section {section}: an unsettled range was coalesced: {next:?}"
                    );
                }
            }
        }
        // Everything settled: one range per run of an owner, new tenure, no handover, same
        // owners and load.
        let settled = Inputs {
            settled: table.version,
            ..all.clone()
        };
        let next = plan(&table, &settled)
            .unwrap_or_else(|| panic!("fragments to coalesce: {:?}", table.namespaces["inbox"]));
        next.check().unwrap();
        assert_eq!(next.load(), table.load());
        let ranges = &next.namespaces["inbox"].ranges;
        assert!(ranges.len() < fragments, "{ranges:?}");
        for pair in ranges.windows(2) {
            assert_ne!(pair[0].owner, pair[1].owner, "{ranges:?}");
        }
        for section in 0..30 {
            assert_eq!(
                next.range("inbox", section).unwrap().owner,
                table.range("inbox", section).unwrap().owner
            );
        }
        // And then it is stable.
        assert_eq!(plan(&next, &settled), None);
    }

    /// 300 rounds of a random node dying, coming back or draining (seeded), each planned
    /// until settled, then (with `coalesce`) with every range settled; returns the most ranges
    /// the table had and the mean over the rounds.
    fn churn(coalesce: bool) -> (usize, usize) {
        let nodes = ["a", "b", "c", "d", "e"];
        let mut rng = 0x1234_5678_u64;
        let mut next_random = move |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        let mut live: BTreeSet<&str> = nodes.iter().copied().collect();
        let mut table = RouteTable::empty("c");
        let (mut most, mut total, rounds) = (0, 0, 300);
        for _ in 0..rounds {
            let node = nodes[next_random(nodes.len() as u64) as usize];
            if live.len() > 2 && live.contains(node) {
                live.remove(node);
            } else {
                live.insert(node);
            }
            let draining: Vec<&str> = if next_random(4) == 0 {
                live.iter().copied().take(1).collect()
            } else {
                Vec::new()
            };
            let now = Inputs {
                moves_max: 64,
                ..inputs(
                    &live.iter().copied().collect::<Vec<_>>(),
                    &draining,
                    &[("inbox", 1000), ("groups", 64)],
                )
            };
            table = settle(table, &now);
            if coalesce {
                let settled = Inputs {
                    settled: table.version,
                    ..now
                };
                table = settle(table, &settled);
            }
            let ranges: usize = table.namespaces.values().map(|r| r.ranges.len()).sum();
            most = most.max(ranges);
            total += ranges;
        }
        (most, total / rounds)
    }

    #[test]
    fn coalescing_keeps_the_table_small_through_long_churn() {
        let (most, mean) = churn(true);
        let (most_without, mean_without) = churn(false);
        eprintln!(
            "ranges over the churn: most {most}, mean {mean} (without coalescing: most \
             {most_without}, mean {mean_without})"
        );
        // Two namespaces over at most five nodes: tens of ranges, not hundreds.
        assert!(most <= 128 && mean <= 40, "most {most}, mean {mean}");
        assert!(
            mean * 3 < mean_without,
            "mean {mean} vs {mean_without} without coalescing"
        );
    }

    #[test]
    fn presence_slots_are_placed_only_over_a_settled_table_and_then_keep_their_count() {
        let mut three = inputs(&["a", "b", "c"], &[], &[("inbox", 12)]);
        three.presence_slots = 30;
        let first = plan(&RouteTable::empty("c"), &three).unwrap();
        assert_eq!(first.presence, None, "not in the first plan");
        assert!(
            plan(&first, &three).is_none(),
            "nor before the table settles"
        );
        let settled = Inputs {
            stable: true,
            ..three.clone()
        };
        let placed = plan(&first, &settled).unwrap();
        let load = placed.presence.as_ref().unwrap().load();
        assert_eq!(load.len(), 3);
        assert!(
            load.values()
                .all(|&(primary, replica)| primary == 10 && replica == 10)
        );
        // Another count configured later changes nothing: the count is the cluster's.
        let other = Inputs {
            presence_slots: 64,
            stable: true,
            ..three
        };
        assert!(plan(&placed, &other).is_none());
    }

    #[test]
    fn a_new_namespace_is_split_evenly_without_handover() {
        let table = plan(
            &RouteTable::empty("c"),
            &inputs(&["a", "b", "c"], &[], &[("inbox", 10)]),
        )
        .unwrap();
        let load = table.load();
        assert_eq!((load["a"], load["b"], load["c"]), (4, 3, 3));
        assert!(table.namespaces["inbox"].ranges.iter().all(|r| !r.handover));
        assert!(plan(&table, &inputs(&["a", "b", "c"], &[], &[("inbox", 10)])).is_none());
    }

    #[test]
    fn a_dead_nodes_ranges_move_at_once_with_handover_and_the_rest_stays() {
        let all = inputs(&["a", "b", "c"], &[], &[("inbox", 30)]);
        let table = settle(RouteTable::empty("c"), &all);
        let before = table.clone();
        let without_b = inputs(&["a", "c"], &[], &[("inbox", 30)]);
        let next = plan(&table, &without_b).unwrap();
        assert!(next.ranges_of("b").next().is_none());
        for section in 0..30 {
            let (old, new) = (
                before.range("inbox", section).unwrap(),
                next.range("inbox", section).unwrap(),
            );
            if old.owner == "b" {
                assert!(new.handover && new.since == next.version);
            } else {
                assert_eq!(old.owner, new.owner, "section {section} moved needlessly");
                assert_eq!(old.since, new.since);
            }
        }
        // Then balancing, a bounded number of sections per plan.
        let settled = settle(next, &without_b);
        let load = settled.load();
        assert!(load["a"].abs_diff(load["c"]) <= 1, "{load:?}");
    }

    #[test]
    fn draining_moves_at_most_moves_max_per_plan_until_empty() {
        let all = inputs(&["a", "b"], &[], &[("inbox", 20)]);
        let table = settle(RouteTable::empty("c"), &all);
        let drain = inputs(&["a", "b"], &["b"], &[("inbox", 20)]);
        let mut table = table;
        let mut plans = 0;
        while let Some(next) = plan(&table, &drain) {
            let moved: u64 = (0..20)
                .filter(|&s| table.owner("inbox", s) != next.owner("inbox", s))
                .count() as u64;
            assert!(moved <= drain.moves_max, "moved {moved}");
            table = next;
            plans += 1;
        }
        assert_eq!(table.ranges_of("b").count(), 0);
        assert!(plans >= 3, "10 sections at 4 per plan take 3 plans");
    }

    #[test]
    fn a_joining_node_gets_sections_and_nobody_is_planned_for_when_none_is_live() {
        let two = inputs(&["a", "b"], &[], &[("inbox", 12)]);
        let table = settle(RouteTable::empty("c"), &two);
        let three = inputs(&["a", "b", "c"], &[], &[("inbox", 12)]);
        let table = settle(table, &three);
        assert_eq!(table.load()["c"], 4);
        assert!(plan(&table, &inputs(&[], &[], &[("inbox", 12)])).is_none());
    }
}
