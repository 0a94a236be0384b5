//! The route table: which node owns which sections of each namespace, as ranges.
//!
//! Written only by the arbiter, stored in the coordinator as JSON under one key, read by every
//! node and piggybacked (its version) on every reply. A range records when its owner got it
//! (`since`, the table version of that move) and whether someone owned it before (`handover`):
//! a node serves a range it gained from another owner only after the lock-delay.
//!
//! The table also places presence ([`PresenceRoute`]): sessions are split into a fixed number
//! of slots (`uid % slots`), and every slot range has a primary (which takes its writes) and,
//! when a second node exists, a replica on another node (which follows the primary's changes
//! and is promoted when the primary dies).
//!
//! Invariants ([`RouteTable::check`]): per namespace, ranges are sorted, non-empty, contiguous
//! and cover `[0, sections)` exactly; `since <= version`. The same for slot ranges over
//! `[0, slots)`, and a slot's replica is never its primary.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A node's id in the cluster (`--node-id`).
pub type NodeId = String;

/// Sections `[start, end)` of one namespace and their owner.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Range {
    /// First section.
    pub start: u64,
    /// One past the last section.
    pub end: u64,
    /// The owning node.
    pub owner: NodeId,
    /// The table version at which `owner` got these sections.
    pub since: u64,
    /// Whether another node owned them before (then the new owner waits the lock-delay).
    pub handover: bool,
}

impl Range {
    /// Sections in the range.
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    /// Whether the range is empty (never in a valid table).
    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }

    /// Whether `section` is in the range.
    pub fn contains(&self, section: u64) -> bool {
        (self.start..self.end).contains(&section)
    }
}

/// The routes of one namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamespaceRoute {
    /// Sections in the namespace.
    pub sections: u64,
    /// Ranges covering `[0, sections)`, sorted.
    pub ranges: Vec<Range>,
}

/// Slots `[start, end)` of presence, their primary and their replica.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotRange {
    /// First slot.
    pub start: u32,
    /// One past the last slot.
    pub end: u32,
    /// The node that takes the slots' writes.
    pub primary: NodeId,
    /// The table version at which `primary` got them.
    pub since: u64,
    /// Whether another node was primary before (then the new one waits the lock-delay before
    /// it takes a write, so the old one has stopped).
    pub handover: bool,
    /// The node that follows the primary's changes, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<NodeId>,
    /// The table version at which `replica` got them (it syncs from a snapshot then).
    #[serde(default)]
    pub replica_since: u64,
    /// A node syncing to take `replica`'s place (a planned replica move): it follows the
    /// primary like a replica, and becomes the replica once it has said it is in sync for
    /// `joining_since`. Until then `replica` stays, so that a promotion always finds a copy of
    /// every acknowledged change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub joining: Option<NodeId>,
    /// The table version at which `joining` got the slots.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub joining_since: u64,
}

fn is_zero(value: &u64) -> bool {
    *value == 0
}

impl SlotRange {
    /// Slots in the range.
    pub fn len(&self) -> u32 {
        self.end - self.start
    }

    /// Whether the range is empty (never in a valid table).
    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }

    /// Whether `slot` is in the range.
    pub fn contains(&self, slot: u32) -> bool {
        (self.start..self.end).contains(&slot)
    }
}

/// Where presence lives: `slots` slots, as ranges.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceRoute {
    /// Slots in the cluster (`presence.slots`, fixed for the life of the cluster).
    pub slots: u32,
    /// Ranges covering `[0, slots)`, sorted.
    pub ranges: Vec<SlotRange>,
}

impl PresenceRoute {
    /// The slot of `uid`: `uid % slots`. Every client and node computes it the same way.
    pub fn slot_of(&self, uid: u64) -> u32 {
        slot_of(uid, self.slots)
    }

    /// The range holding `slot`.
    pub fn range(&self, slot: u32) -> Option<&SlotRange> {
        let at = self.ranges.partition_point(|range| range.end <= slot);
        self.ranges.get(at).filter(|range| range.contains(slot))
    }

    /// Slots held as primary and as replica, per node.
    pub fn load(&self) -> BTreeMap<&str, (u32, u32)> {
        let mut load: BTreeMap<&str, (u32, u32)> = BTreeMap::new();
        for range in &self.ranges {
            load.entry(range.primary.as_str()).or_default().0 += range.len();
            if let Some(replica) = &range.replica {
                load.entry(replica.as_str()).or_default().1 += range.len();
            }
        }
        load
    }
}

/// The presence slot of `uid` among `slots` (`uid % slots`; 0 when `slots` is 0).
pub fn slot_of(uid: u64, slots: u32) -> u32 {
    if slots == 0 {
        0
    } else {
        (uid % u64::from(slots)) as u32
    }
}

/// The versioned route table of one cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteTable {
    /// The cluster's name: a client or node holding another cluster's table refuses it.
    pub cluster: String,
    /// Bumped by every change.
    pub version: u64,
    /// Routes by namespace name.
    pub namespaces: BTreeMap<String, NamespaceRoute>,
    /// Where presence slots live (absent until the arbiter first places them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presence: Option<PresenceRoute>,
}

impl RouteTable {
    /// An empty table of `cluster` at version 0.
    pub fn empty(cluster: &str) -> Self {
        Self {
            cluster: cluster.to_owned(),
            version: 0,
            namespaces: BTreeMap::new(),
            presence: None,
        }
    }

    /// The range holding `section` of `namespace`.
    pub fn range(&self, namespace: &str, section: u64) -> Option<&Range> {
        let route = self.namespaces.get(namespace)?;
        let at = route.ranges.partition_point(|range| range.end <= section);
        route.ranges.get(at).filter(|range| range.contains(section))
    }

    /// The owner of `section` of `namespace`.
    pub fn owner(&self, namespace: &str, section: u64) -> Option<&NodeId> {
        self.range(namespace, section).map(|range| &range.owner)
    }

    /// Every range owned by `node`, with its namespace.
    pub fn ranges_of<'t>(&'t self, node: &'t str) -> impl Iterator<Item = (&'t str, &'t Range)> {
        self.namespaces.iter().flat_map(move |(name, route)| {
            route
                .ranges
                .iter()
                .filter(move |range| range.owner == node)
                .map(move |range| (name.as_str(), range))
        })
    }

    /// The slot range holding `uid`'s sessions.
    pub fn slot_range(&self, uid: u64) -> Option<&SlotRange> {
        let presence = self.presence.as_ref()?;
        presence.range(presence.slot_of(uid))
    }

    /// Sections owned per node.
    pub fn load(&self) -> BTreeMap<&str, u64> {
        let mut load = BTreeMap::new();
        for route in self.namespaces.values() {
            for range in &route.ranges {
                *load.entry(range.owner.as_str()).or_default() += range.len();
            }
        }
        load
    }

    /// The table as stored in the coordinator.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a route table always serializes")
    }

    /// Reads a stored table and checks it.
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let table: Self =
            serde_json::from_slice(bytes).map_err(|error| format!("route table: {error}"))?;
        table.check()?;
        Ok(table)
    }

    /// Checks the invariants of the module documentation.
    pub fn check(&self) -> Result<(), String> {
        for (name, route) in &self.namespaces {
            let mut next = 0;
            for range in &route.ranges {
                if range.start != next || range.is_empty() {
                    return Err(format!(
                        "namespace `{name}`: range {}..{} does not continue at {next}",
                        range.start, range.end
                    ));
                }
                if range.since > self.version {
                    return Err(format!(
                        "namespace `{name}`: range {}..{} moved at version {} after {}",
                        range.start, range.end, range.since, self.version
                    ));
                }
                next = range.end;
            }
            if next != route.sections {
                return Err(format!(
                    "namespace `{name}`: ranges end at {next}, sections are {}",
                    route.sections
                ));
            }
        }
        if let Some(presence) = &self.presence {
            let mut next = 0;
            for range in &presence.ranges {
                let name = format!("presence slots {}..{}", range.start, range.end);
                if range.start != next || range.is_empty() {
                    return Err(format!("{name} do not continue at {next}"));
                }
                if range.since > self.version
                    || range.replica_since > self.version
                    || range.joining_since > self.version
                {
                    return Err(format!("{name} moved after version {}", self.version));
                }
                if range.replica.as_ref() == Some(&range.primary) {
                    return Err(format!(
                        "{name}: `{}` is primary and replica",
                        range.primary
                    ));
                }
                if range.joining.is_some()
                    && (range.joining.as_ref() == Some(&range.primary)
                        || range.joining == range.replica)
                {
                    return Err(format!(
                        "{name}: the joining replica is already primary or replica"
                    ));
                }
                next = range.end;
            }
            if next != presence.slots {
                return Err(format!(
                    "presence slot ranges end at {next}, slots are {}",
                    presence.slots
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(start: u64, end: u64, owner: &str) -> Range {
        Range {
            start,
            end,
            owner: owner.into(),
            since: 1,
            handover: false,
        }
    }

    #[test]
    fn lookups_find_the_owner_and_round_trip_through_json() {
        let mut table = RouteTable::empty("c");
        table.version = 3;
        table.namespaces.insert(
            "inbox".into(),
            NamespaceRoute {
                sections: 10,
                ranges: vec![range(0, 4, "a"), range(4, 9, "b"), range(9, 10, "a")],
            },
        );
        table.check().unwrap();
        assert_eq!(table.owner("inbox", 0).unwrap(), "a");
        assert_eq!(table.owner("inbox", 4).unwrap(), "b");
        assert_eq!(table.owner("inbox", 9).unwrap(), "a");
        assert_eq!(table.owner("inbox", 10), None);
        assert_eq!(table.owner("conv", 0), None);
        assert_eq!(table.load()["a"], 5);
        assert_eq!(RouteTable::decode(&table.encode()).unwrap(), table);
        table.namespaces.get_mut("inbox").unwrap().ranges[1].start = 5;
        assert!(RouteTable::decode(&table.encode()).is_err());
    }

    fn slots(start: u32, end: u32, primary: &str, replica: Option<&str>) -> SlotRange {
        SlotRange {
            start,
            end,
            primary: primary.into(),
            since: 1,
            handover: false,
            replica: replica.map(Into::into),
            replica_since: 1,
            joining: None,
            joining_since: 0,
        }
    }

    #[test]
    fn slot_lookups_find_primary_and_replica_and_bad_slot_tables_are_refused() {
        let mut table = RouteTable::empty("c");
        table.version = 2;
        table.presence = Some(PresenceRoute {
            slots: 8,
            ranges: vec![slots(0, 5, "a", Some("b")), slots(5, 8, "b", None)],
        });
        table.check().unwrap();
        assert_eq!(table.slot_range(4).unwrap().primary, "a");
        assert_eq!(table.slot_range(12).unwrap().replica.as_deref(), Some("b"));
        assert_eq!(table.slot_range(13).unwrap().primary, "b");
        assert_eq!(table.presence.as_ref().unwrap().load()["b"], (3, 5));
        assert_eq!(RouteTable::decode(&table.encode()).unwrap(), table);

        let mut gap = table.clone();
        gap.presence.as_mut().unwrap().ranges[1].start = 6;
        assert!(gap.check().unwrap_err().contains("do not continue at 5"));
        let mut short = table.clone();
        short.presence.as_mut().unwrap().slots = 9;
        assert!(short.check().unwrap_err().contains("slots are 9"));
        let mut same = table.clone();
        same.presence.as_mut().unwrap().ranges[1].replica = Some("b".into());
        assert!(same.check().unwrap_err().contains("primary and replica"));
        // A table written before presence was placed still reads.
        let old = br#"{"cluster":"c","version":1,"namespaces":{}}"#;
        assert_eq!(RouteTable::decode(old).unwrap().presence, None);
    }
}
