//! The arbiter's planning for presence slots, pure: from the current slot routes, the live
//! members and the draining ones, the next slot routes.
//!
//! Rules, in order:
//! 1. no slot routes yet (and the caller says it is time: [`crate::placement`] waits for a
//!    settled table): `[0, slots)` is split into contiguous ranges over the targets (live
//!    and not draining); the replica of each range is the next target in name order, so every
//!    node is primary for some slots and replica for others (master-master with disjoint
//!    writers), and no node is both for one slot;
//! 2. **promotion**: a range whose primary is not live gets its replica as primary when the
//!    replica is live (it holds the acknowledged changes), with `handover` so that it takes
//!    writes only after the lock-delay; with no live replica, the target with the fewest
//!    primary slots takes it (its sessions are gone; gateways' heartbeats refill them);
//! 3. a replica that is not live, or that drains while another target could replace it, is
//!    dropped; every range without a replica gets the target (not its primary) with the fewest
//!    replica slots (a draining node when no target is left), `replica_since` = the new
//!    version (it syncs from a snapshot);
//! 4. only in a plan where 1 to 3 changed nothing: replica roles move from the node with the
//!    most replica slots to the one with the fewest, up to `moves_max` slots, while they differ
//!    by more than one slot and 5% of the average.
//!
//! A primary role moves only by promotion. Moving one to a node that is live (a drain, or
//! rebalancing onto a node that joined) needs the replica to say it is in sync, which it can
//! only say once replication exists; until then a draining node keeps its primaries and gives
//! up its replicas.
//!
//! Adjacent ranges merge when primary, `since`, `handover`, replica and `replica_since` are all
//! equal, so one node's move never resets another's readiness.

use std::collections::{BTreeMap, BTreeSet};

use crate::route::{NodeId, PresenceRoute, SlotRange};

/// Plans the slot routes of table version `version`. `targets` are the live, not draining
/// nodes (or every live one when all drain); never empty. Returns the next routes when
/// anything changed.
pub(crate) fn plan_slots(
    current: Option<&PresenceRoute>,
    slots: u32,
    live: &BTreeSet<NodeId>,
    targets: &BTreeSet<&str>,
    moves_max: u64,
    version: u64,
) -> Option<PresenceRoute> {
    let mut next = match current {
        Some(route) => route.clone(),
        None if slots == 0 => return None,
        None => return Some(initial(slots, targets, version)),
    };
    let mut changed = false;

    // 2. Promotion, or a new primary when no replica is left.
    let mut primaries = primary_load(&next, targets);
    for range in &mut next.ranges {
        if live.contains(&range.primary) {
            continue;
        }
        changed = true;
        let promoted = range
            .replica
            .take()
            .filter(|replica| live.contains(replica));
        let primary = promoted.unwrap_or_else(|| least(&primaries, None));
        *primaries.entry(primary.clone()).or_default() += range.len();
        range.primary = primary;
        range.since = version;
        range.handover = true;
        range.replica_since = 0;
    }

    // 3. Replicas that are gone or draining, then a replica for every range without one.
    let mut replicas = replica_load(&next, targets);
    for range in &mut next.ranges {
        let Some(replica) = &range.replica else {
            continue;
        };
        let replaceable = targets.iter().any(|node| *node != range.primary);
        if !live.contains(replica) || (!targets.contains(replica.as_str()) && replaceable) {
            range.replica = None;
            range.replica_since = 0;
            changed = true;
        }
    }
    for range in &mut next.ranges {
        if range.replica.is_some() {
            continue;
        }
        let replica = if targets.iter().any(|node| *node != range.primary) {
            least(&replicas, Some(&range.primary))
        } else if let Some(draining) = live.iter().find(|node| **node != range.primary) {
            // Only draining nodes are left besides the primary: a replica there still keeps
            // the slots' changes on two nodes.
            draining.clone()
        } else {
            continue;
        };
        *replicas.entry(replica.clone()).or_default() += range.len();
        range.replica = Some(replica);
        range.replica_since = version;
        changed = true;
    }

    // 4. Balance replica roles, bounded.
    let mut budget = if changed { 0 } else { moves_max };
    while budget > 0 && replicas.len() > 1 {
        let (most, most_load) = replicas
            .iter()
            .max_by_key(|(node, load)| (**load, std::cmp::Reverse(*node)))
            .map(|(node, load)| (node.clone(), *load))
            .expect("two or more targets");
        let least_load = replicas.values().copied().min().unwrap_or(0);
        let total: u32 = replicas.values().sum();
        let tolerance = (total / replicas.len() as u32 / 20).max(1);
        if most_load <= least_load + tolerance {
            break;
        }
        let want = ((most_load - least_load) / 2).max(1);
        // The largest range of `most` whose primary is not a least-loaded node.
        let candidate = next
            .ranges
            .iter()
            .enumerate()
            .filter(|(_, range)| range.replica.as_deref() == Some(most.as_str()))
            .filter_map(|(index, range)| {
                let to = least(&replicas, Some(&range.primary));
                (replicas[&to] == least_load && to != most).then_some((index, to, range.len()))
            })
            .max_by_key(|(_, _, len)| *len);
        let Some((index, to, len)) = candidate else {
            break;
        };
        let moved = want.min(len).min(budget.min(u64::from(u32::MAX)) as u32);
        let range = &mut next.ranges[index];
        let mut part = range.clone();
        part.start = range.end - moved;
        part.replica = Some(to.clone());
        part.replica_since = version;
        range.end = part.start;
        if range.is_empty() {
            next.ranges[index] = part;
        } else {
            next.ranges.insert(index + 1, part);
        }
        *replicas.get_mut(&most).expect("counted") -= moved;
        *replicas.get_mut(&to).expect("a target") += moved;
        budget -= u64::from(moved);
        changed = true;
    }

    if !changed {
        return None;
    }
    merge(&mut next.ranges);
    Some(next)
}

/// Rule 1.
fn initial(slots: u32, targets: &BTreeSet<&str>, version: u64) -> PresenceRoute {
    let order: Vec<&str> = targets.iter().copied().collect();
    let parts = (order.len() as u32).min(slots);
    let mut ranges = Vec::with_capacity(parts as usize);
    let mut start = 0;
    for part in 0..parts {
        let size = slots / parts + u32::from(part < slots % parts);
        let replica = (order.len() > 1).then(|| order[(part as usize + 1) % order.len()]);
        ranges.push(SlotRange {
            start,
            end: start + size,
            primary: order[part as usize].to_owned(),
            since: version,
            handover: false,
            replica: replica.map(str::to_owned),
            replica_since: if replica.is_some() { version } else { 0 },
        });
        start += size;
    }
    PresenceRoute { slots, ranges }
}

fn primary_load(route: &PresenceRoute, targets: &BTreeSet<&str>) -> BTreeMap<NodeId, u32> {
    let mut load: BTreeMap<NodeId, u32> =
        targets.iter().map(|node| (node.to_string(), 0)).collect();
    for range in &route.ranges {
        if let Some(entry) = load.get_mut(&range.primary) {
            *entry += range.len();
        }
    }
    load
}

fn replica_load(route: &PresenceRoute, targets: &BTreeSet<&str>) -> BTreeMap<NodeId, u32> {
    let mut load: BTreeMap<NodeId, u32> =
        targets.iter().map(|node| (node.to_string(), 0)).collect();
    for range in &route.ranges {
        if let Some(entry) = range.replica.as_ref().and_then(|node| load.get_mut(node)) {
            *entry += range.len();
        }
    }
    load
}

/// The least loaded node of `load` other than `except` (ties by name).
fn least(load: &BTreeMap<NodeId, u32>, except: Option<&str>) -> NodeId {
    load.iter()
        .filter(|(node, _)| Some(node.as_str()) != except)
        .min_by_key(|(node, slots)| (**slots, *node))
        .map(|(node, _)| node.clone())
        .expect("a target other than the primary")
}

fn merge(ranges: &mut Vec<SlotRange>) {
    let mut merged: Vec<SlotRange> = Vec::with_capacity(ranges.len());
    for range in ranges.drain(..) {
        match merged.last_mut() {
            Some(last)
                if last.primary == range.primary
                    && last.since == range.since
                    && last.handover == range.handover
                    && last.replica == range.replica
                    && last.replica_since == range.replica_since =>
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
    use proptest::prelude::*;

    use super::*;
    use crate::route::RouteTable;

    fn set(nodes: &[&str]) -> BTreeSet<NodeId> {
        nodes.iter().map(|node| node.to_string()).collect()
    }

    /// Plans slot routes until nothing changes (at most 50 rounds), checking every table.
    fn settle(
        mut route: Option<PresenceRoute>,
        live: &[&str],
        draining: &[&str],
        version: &mut u64,
    ) -> PresenceRoute {
        let live = set(live);
        let mut targets: BTreeSet<&str> = live
            .iter()
            .filter(|node| !draining.contains(&node.as_str()))
            .map(String::as_str)
            .collect();
        if targets.is_empty() {
            targets = live.iter().map(String::as_str).collect();
        }
        for _ in 0..50 {
            *version += 1;
            match plan_slots(route.as_ref(), 64, &live, &targets, 8, *version) {
                Some(next) => {
                    let mut table = RouteTable::empty("c");
                    table.version = *version;
                    table.presence = Some(next.clone());
                    table.check().unwrap();
                    route = Some(next);
                }
                None => return route.expect("placed"),
            }
        }
        panic!("slot placement did not settle in 50 plans");
    }

    #[test]
    fn first_placement_gives_every_node_primary_and_replica_roles() {
        let mut version = 0;
        let route = settle(None, &["a", "b", "c"], &[], &mut version);
        let load = route.load();
        for node in ["a", "b", "c"] {
            let (primary, replica) = load[node];
            assert!(
                (21..=22).contains(&primary),
                "{node}: {primary} primary slots"
            );
            assert!(
                (21..=22).contains(&replica),
                "{node}: {replica} replica slots"
            );
        }
        assert!(route.ranges.iter().all(|range| !range.handover));
        // One node: primary of everything, no replica.
        let alone = settle(None, &["a"], &[], &mut version);
        assert_eq!(alone.ranges.len(), 1);
        assert_eq!(alone.ranges[0].replica, None);
    }

    #[test]
    fn a_dead_primarys_replica_is_promoted_with_handover_and_gets_a_new_replica() {
        let mut version = 0;
        let route = settle(None, &["a", "b", "c"], &[], &mut version);
        let before: Vec<SlotRange> = route.ranges.clone();
        let after = settle(Some(route), &["b", "c"], &[], &mut version);
        for slot in 0..64 {
            let old = before.iter().find(|range| range.contains(slot)).unwrap();
            let new = after.range(slot).unwrap();
            if old.primary == "a" {
                assert_eq!(Some(&new.primary), old.replica.as_ref(), "slot {slot}");
                assert!(new.handover);
            } else {
                assert_eq!(new.primary, old.primary, "a live primary keeps slot {slot}");
            }
            assert!(new.replica.is_some(), "slot {slot} has a replica again");
            assert_ne!(new.replica.as_deref(), Some("a"));
        }
    }

    #[test]
    fn a_draining_node_gives_up_its_replicas_but_keeps_its_primaries() {
        let mut version = 0;
        let route = settle(None, &["a", "b", "c"], &[], &mut version);
        let after = settle(Some(route), &["a", "b", "c"], &["c"], &mut version);
        assert_eq!(after.load()["c"].1, 0);
        assert!(after.load()["c"].0 > 0);
    }

    #[derive(Clone, Debug)]
    enum Step {
        Kill(usize),
        Start(usize),
        Drain(usize),
        Undrain(usize),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (0..5usize).prop_map(Step::Kill),
            (0..5usize).prop_map(Step::Start),
            (0..5usize).prop_map(Step::Drain),
            (0..5usize).prop_map(Step::Undrain),
        ]
    }

    proptest! {
        /// Through any sequence of deaths, joins and drains: every slot has a primary; a live
        /// primary keeps its slots; a dead primary's live replica is the one promoted; with two
        /// or more live nodes every slot has a live replica other than its primary.
        #[test]
        fn slots_stay_placed_and_promotion_picks_the_replica(
            steps in proptest::collection::vec(step(), 1..30)
        ) {
            let names = ["n0", "n1", "n2", "n3", "n4"];
            let mut live: BTreeSet<&str> = ["n0", "n1", "n2"].into_iter().collect();
            let mut draining: BTreeSet<&str> = BTreeSet::new();
            let mut version = 0;
            let mut route = settle(None, &Vec::from_iter(live.iter().copied()), &[], &mut version);
            for step in steps {
                match step {
                    Step::Kill(n) if live.len() > 1 => { live.remove(names[n]); }
                    Step::Start(n) => { live.insert(names[n]); }
                    Step::Drain(n) => { draining.insert(names[n]); }
                    Step::Undrain(n) => { draining.remove(names[n]); }
                    _ => {}
                }
                let before = route.clone();
                let live_list: Vec<&str> = live.iter().copied().collect();
                let draining_list: Vec<&str> = draining.iter().copied().collect();
                route = settle(Some(route), &live_list, &draining_list, &mut version);
                for slot in 0..64 {
                    let old = before.range(slot).unwrap();
                    let new = route.range(slot).unwrap();
                    prop_assert!(live.contains(new.primary.as_str()));
                    if live.contains(old.primary.as_str()) {
                        prop_assert_eq!(&new.primary, &old.primary);
                    } else if let Some(replica) = old.replica.as_deref().filter(|r| live.contains(r)) {
                        prop_assert_eq!(new.primary.as_str(), replica);
                    }
                    if live.len() > 1 {
                        let replica = new.replica.as_deref();
                        prop_assert!(replica.is_some_and(|r| live.contains(r) && r != new.primary));
                    }
                }
            }
        }
    }
}
