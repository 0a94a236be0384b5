//! The presence checker: over the clients' history of logins, logouts and lookups (each uid
//! used by one client, one call at a time), the two promises of `presence.replication =
//! "sync"` (issue #10, DESIGN.md P1):
//!
//! - **no acknowledged login lost**: a lookup that began after a login of session `s` was
//!   acknowledged, and ended before any logout of `s` was sent, shows `s`;
//! - **no session resurrected after its acknowledged logout**: a lookup that began after a
//!   logout of `s` was acknowledged does not show `s`;
//!
//! and a sanity rule: a lookup shows only sessions whose login had been sent. Calls whose
//! outcome is unknown (timed out, or refused after they may have been applied) may or may
//! not have happened: they never make a violation by themselves. The last lookup of every
//! uid is the simulation's read of the final primaries, after the faults.

use std::collections::BTreeMap;

/// What a presence call did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PresenceOp {
    /// Log session `session` in.
    Login(u64),
    /// Log session `session` out.
    Logout(u64),
    /// Read the uid's sessions.
    Lookup,
}

/// How a presence call ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PresenceOutcome {
    /// Acknowledged; a lookup carries the sessions it showed.
    Ok(Vec<u64>),
    /// Not known: it may or may not have been applied.
    Unknown,
}

/// One presence call of the history.
#[derive(Clone, Debug)]
pub struct PresenceCall {
    /// The uid.
    pub uid: u64,
    /// The operation.
    pub op: PresenceOp,
    /// When the client sent it (first attempt), µs.
    pub start_us: u64,
    /// When the client had its answer or gave up, µs.
    pub end_us: u64,
    /// Its outcome.
    pub outcome: PresenceOutcome,
}

/// Violations of the rules above, at most a few per uid.
pub fn check_presence(calls: &[PresenceCall]) -> Vec<String> {
    let mut by_uid: BTreeMap<u64, Vec<&PresenceCall>> = BTreeMap::new();
    for call in calls {
        by_uid.entry(call.uid).or_default().push(call);
    }
    let mut violations = Vec::new();
    for (uid, calls) in by_uid {
        let mut found = 0;
        for lookup in &calls {
            let (PresenceOp::Lookup, PresenceOutcome::Ok(shown)) = (&lookup.op, &lookup.outcome)
            else {
                continue;
            };
            for call in &calls {
                let acked_before =
                    call.outcome != PresenceOutcome::Unknown && call.end_us < lookup.start_us;
                match call.op {
                    PresenceOp::Login(session) if acked_before && !shown.contains(&session) => {
                        let logout_sent = calls.iter().any(|other| {
                            other.op == PresenceOp::Logout(session)
                                && other.start_us < lookup.end_us
                        });
                        if !logout_sent {
                            found += 1;
                            violations.push(format!(
                                "lost: uid {uid} session {session} was logged in (acknowledged \
                                 at {} µs) and never logged out, but a lookup in [{}, {}] µs \
                                 shows {shown:?}",
                                call.end_us, lookup.start_us, lookup.end_us
                            ));
                        }
                    }
                    PresenceOp::Logout(session) if acked_before && shown.contains(&session) => {
                        found += 1;
                        violations.push(format!(
                            "resurrected: uid {uid} session {session} was logged out \
                             (acknowledged at {} µs), but a lookup in [{}, {}] µs shows it",
                            call.end_us, lookup.start_us, lookup.end_us
                        ));
                    }
                    _ => {}
                }
            }
            for session in shown {
                let sent = calls.iter().any(|call| {
                    call.op == PresenceOp::Login(*session) && call.start_us < lookup.end_us
                });
                if !sent {
                    found += 1;
                    violations.push(format!(
                        "phantom: uid {uid} shows session {session} in a lookup in [{}, {}] µs, \
                         but no login of it was sent before",
                        lookup.start_us, lookup.end_us
                    ));
                }
            }
            if found >= 3 {
                break;
            }
        }
    }
    violations
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(op: PresenceOp, start_us: u64, end_us: u64, outcome: PresenceOutcome) -> PresenceCall {
        PresenceCall {
            uid: 7,
            op,
            start_us,
            end_us,
            outcome,
        }
    }

    fn ok() -> PresenceOutcome {
        PresenceOutcome::Ok(Vec::new())
    }

    fn shows(sessions: &[u64]) -> PresenceOutcome {
        PresenceOutcome::Ok(sessions.to_vec())
    }

    #[test]
    fn a_history_that_keeps_the_promises_is_clean() {
        let history = [
            call(PresenceOp::Login(1), 0, 10, ok()),
            call(PresenceOp::Lookup, 20, 30, shows(&[1])),
            // Unknown login: either answer is right.
            call(PresenceOp::Login(2), 40, 50, PresenceOutcome::Unknown),
            call(PresenceOp::Lookup, 60, 70, shows(&[1])),
            call(PresenceOp::Lookup, 61, 71, shows(&[1, 2])),
            // A logout sent before the lookup ended may or may not show.
            call(PresenceOp::Logout(1), 80, 120, ok()),
            call(PresenceOp::Lookup, 90, 100, shows(&[2])),
            call(PresenceOp::Lookup, 130, 140, shows(&[2])),
        ];
        assert_eq!(check_presence(&history), Vec::<String>::new());
    }

    #[test]
    fn a_lost_login_a_resurrection_and_a_phantom_are_each_reported() {
        let lost = [
            call(PresenceOp::Login(1), 0, 10, ok()),
            call(PresenceOp::Lookup, 20, 30, shows(&[])),
        ];
        let found = check_presence(&lost);
        assert!(
            found.len() == 1 && found[0].starts_with("lost: uid 7 session 1"),
            "{found:?}"
        );

        let resurrected = [
            call(PresenceOp::Login(1), 0, 10, ok()),
            call(PresenceOp::Logout(1), 20, 30, ok()),
            call(PresenceOp::Lookup, 40, 50, shows(&[1])),
        ];
        let found = check_presence(&resurrected);
        assert!(
            found.len() == 1 && found[0].starts_with("resurrected"),
            "{found:?}"
        );

        let phantom = [
            call(PresenceOp::Lookup, 0, 10, shows(&[5])),
            call(PresenceOp::Login(5), 20, 30, ok()),
        ];
        let found = check_presence(&phantom);
        assert!(
            found.len() == 1 && found[0].starts_with("phantom"),
            "{found:?}"
        );
    }
}
