//! `imstate-sim`: a deterministic simulation of cluster mode.
//!
//! Nodes run the real cluster logic ([`imstate_cluster::Member`] and [`imstate_cluster::Arbiter`])
//! and the real allocator ([`imstate_seq::Allocator`]) against a simulated coordinator
//! ([`imstate_coord::sim::SimCoordinator`]), on one seeded discrete-event scheduler: every
//! message delay, fault and clock rate comes from the seed, so a seed replays exactly.
//!
//! ```text
//!  clients ──Next(id)──► node i ── Member::access ─► serve from the Allocator, or redirect
//!                          │  raises (fenced txns), loads, keep-alives, confirms, arbiter txns
//!                          ▼
//!                   simulated coordinator (revisions, leases, txns)
//!  faults: crash + restart, pause past the lease, partition from the coordinator, slow
//!          links (message delay), early lease end; every node's clock runs at its own rate
//!          within ±RATE_SKEW_MAX
//! ```
//!
//! Checkers: S1 over the clients' history ([`imstate_check::seq`]), and S3 over the serve
//! log: for each section, the real-time intervals in which two ownerships (node, incarnation,
//! tenure) served it never overlap ([`check_s3`]). Presence slots are checked the same way:
//! every tick each node records the slots it would take writes for, as sections from
//! [`SLOT_SECTIONS`] on (S3 for slots: a deposed primary takes no write).
//!
//! With [`SimConfig::presence`], slots hold data: clients log sessions in and out and look
//! them up, replicas follow their primaries (the replication protocol modelled in
//! `world/presence.rs`), faults come one at a time, and [`check_presence`] checks that no
//! acknowledged login is lost and no session comes back after its acknowledged logout.

#![deny(missing_docs)]

mod presence;
mod world;

pub use presence::{PresenceCall, PresenceOp, PresenceOutcome, check_presence};
pub use world::{PresenceSim, Report, SLOT_SECTIONS, SimConfig, run};

/// One serve, as the simulation saw it in real time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Serve {
    /// The section.
    pub section: u64,
    /// Node index.
    pub node: usize,
    /// The node's incarnation (restarts count up).
    pub incarnation: u32,
    /// The table version at which the node got the section.
    pub tenure: u64,
    /// Real time, µs.
    pub at_us: u64,
}

/// S3 over a serve log: for every section, no two ownerships' serve intervals overlap.
pub fn check_s3(serves: &[Serve]) -> Vec<String> {
    use std::collections::BTreeMap;
    /// (node, incarnation, tenure) and the first and last serve, µs.
    type Ownership = ((usize, u32, u64), (u64, u64));
    let mut spans: BTreeMap<(u64, usize, u32, u64), (u64, u64)> = BTreeMap::new();
    for serve in serves {
        let key = (serve.section, serve.node, serve.incarnation, serve.tenure);
        let span = spans.entry(key).or_insert((serve.at_us, serve.at_us));
        span.0 = span.0.min(serve.at_us);
        span.1 = span.1.max(serve.at_us);
    }
    let mut by_section: BTreeMap<u64, Vec<Ownership>> = BTreeMap::new();
    for ((section, node, incarnation, tenure), span) in spans {
        by_section
            .entry(section)
            .or_default()
            .push(((node, incarnation, tenure), span));
    }
    let mut violations = Vec::new();
    for (section, mut owners) in by_section {
        owners.sort_by_key(|(_, (first, _))| *first);
        for pair in owners.windows(2) {
            let ((a, (a_first, a_last)), (b, (b_first, _))) = (pair[0], pair[1]);
            if b_first <= a_last {
                let section = match section.checked_sub(SLOT_SECTIONS) {
                    Some(slot) => format!("presence slot {slot}"),
                    None => format!("section {section}"),
                };
                violations.push(format!(
                    "S3: {section} served by node {} (incarnation {}, tenure {}) in \
                     [{a_first}, {a_last}] µs and by node {} (incarnation {}, tenure {}) from \
                     {b_first} µs",
                    a.0, a.1, a.2, b.0, b.1, b.2
                ));
            }
        }
    }
    violations
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serve(section: u64, node: usize, tenure: u64, at_us: u64) -> Serve {
        Serve {
            section,
            node,
            incarnation: 0,
            tenure,
            at_us,
        }
    }

    #[test]
    fn the_s3_checker_fires_on_interleaved_owners_only() {
        let clean = [
            serve(1, 0, 1, 10),
            serve(1, 0, 1, 20),
            serve(1, 1, 2, 30),
            serve(2, 1, 1, 15),
        ];
        assert!(check_s3(&clean).is_empty());
        let mixed = [serve(1, 0, 1, 10), serve(1, 1, 2, 15), serve(1, 0, 1, 20)];
        assert_eq!(check_s3(&mixed).len(), 1);
        // The same node regaining the section later is a new tenure, not an overlap.
        let back = [serve(1, 0, 1, 10), serve(1, 1, 2, 15), serve(1, 0, 3, 20)];
        assert!(check_s3(&back).is_empty());
    }
}
