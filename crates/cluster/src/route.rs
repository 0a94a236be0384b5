//! The route table: which node owns which sections of each namespace, as ranges.
//!
//! Written only by the arbiter, stored in the coordinator as JSON under one key, read by every
//! node and piggybacked (its version) on every reply. A range records when its owner got it
//! (`since`, the table version of that move) and whether someone owned it before (`handover`):
//! a node serves a range it gained from another owner only after the lock-delay.
//!
//! Invariants ([`RouteTable::check`]): per namespace, ranges are sorted, non-empty, contiguous
//! and cover `[0, sections)` exactly; `since <= version`.

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

/// The versioned route table of one cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteTable {
    /// The cluster's name: a client or node holding another cluster's table refuses it.
    pub cluster: String,
    /// Bumped by every change.
    pub version: u64,
    /// Routes by namespace name.
    pub namespaces: BTreeMap<String, NamespaceRoute>,
}

impl RouteTable {
    /// An empty table of `cluster` at version 0.
    pub fn empty(cluster: &str) -> Self {
        Self {
            cluster: cluster.to_owned(),
            version: 0,
            namespaces: BTreeMap::new(),
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
}
