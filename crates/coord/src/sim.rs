//! A deterministic, in-memory coordinator with etcd's semantics for the subset in
//! [`crate::Request`]: revisions, leases that delete their keys when they lapse, and atomic
//! txns. The simulation drives it with its own notion of time (`now`, in the coordinator's
//! milliseconds) and can end a lease early or late, as etcd may around leader changes.
//!
//! It is single-threaded and has no I/O: the simulation decides when a request arrives and
//! when its response is delivered (or lost).

use std::collections::{BTreeMap, HashMap};

use crate::{
    CoordError, KeyValue, LeaseId, Millis, Op, Request, Response, Target, Txn, TxnResponse,
};

#[derive(Clone, Copy, Debug)]
struct Lease {
    ttl_ms: u64,
    expires_at: Millis,
}

/// The simulated coordinator.
#[derive(Debug, Default)]
pub struct SimCoordinator {
    revision: i64,
    kv: BTreeMap<String, KeyValue>,
    leases: HashMap<LeaseId, Lease>,
    next_lease: LeaseId,
    /// Writes (puts and deletes, lease expiry included) applied so far.
    writes: u64,
}

impl SimCoordinator {
    /// An empty store at revision 1 (etcd starts there too).
    pub fn new() -> Self {
        Self {
            revision: 1,
            next_lease: 0x1000,
            ..Self::default()
        }
    }

    /// The current revision.
    pub fn revision(&self) -> i64 {
        self.revision
    }

    /// Writes applied so far (each put or delete counts one).
    pub fn writes(&self) -> u64 {
        self.writes
    }

    /// Reads a key (for checkers and tests; nodes go through [`Self::handle`]).
    pub fn get(&self, key: &str) -> Option<&KeyValue> {
        self.kv.get(key)
    }

    /// Every key under `prefix`, in key order.
    pub fn range(&self, prefix: &str) -> Vec<KeyValue> {
        self.kv
            .range(prefix.to_owned()..)
            .take_while(|(key, _)| key.starts_with(prefix))
            .map(|(_, kv)| kv.clone())
            .collect()
    }

    /// Live leases, in id order, with their expiry.
    pub fn leases(&self) -> Vec<(LeaseId, Millis)> {
        let mut leases: Vec<_> = self
            .leases
            .iter()
            .map(|(id, lease)| (*id, lease.expires_at))
            .collect();
        leases.sort_unstable();
        leases
    }

    /// Moves a lease's expiry to `at` (a fault: etcd ending a lease early or late).
    pub fn set_lease_expiry(&mut self, lease: LeaseId, at: Millis) {
        if let Some(lease) = self.leases.get_mut(&lease) {
            lease.expires_at = at;
        }
    }

    /// Ends every lease whose expiry is at or before `now`, deleting its keys. Returns the
    /// leases ended.
    pub fn expire(&mut self, now: Millis) -> Vec<LeaseId> {
        let mut ended: Vec<LeaseId> = self
            .leases
            .iter()
            .filter(|(_, lease)| lease.expires_at <= now)
            .map(|(id, _)| *id)
            .collect();
        ended.sort_unstable();
        for lease in &ended {
            self.end_lease(*lease);
        }
        ended
    }

    fn end_lease(&mut self, lease: LeaseId) {
        self.leases.remove(&lease);
        let keys: Vec<String> = self
            .kv
            .iter()
            .filter(|(_, kv)| kv.lease == lease)
            .map(|(key, _)| key.clone())
            .collect();
        if !keys.is_empty() {
            // One revision for the whole revoke, as etcd does.
            self.revision += 1;
            for key in keys {
                self.kv.remove(&key);
                self.writes += 1;
            }
        }
    }

    /// Handles one request that arrived at `now`.
    pub fn handle(&mut self, now: Millis, request: &Request) -> Response {
        self.expire(now);
        match request {
            Request::LeaseGrant { ttl_ms } => {
                self.next_lease += 1;
                let lease = self.next_lease;
                self.leases.insert(
                    lease,
                    Lease {
                        ttl_ms: *ttl_ms,
                        expires_at: now + ttl_ms,
                    },
                );
                Response::Granted { lease }
            }
            Request::KeepAlive { lease } => match self.leases.get_mut(lease) {
                Some(lease) => {
                    lease.expires_at = lease.expires_at.max(now + lease.ttl_ms);
                    Response::KeptAlive { alive: true }
                }
                None => Response::KeptAlive { alive: false },
            },
            Request::Revoke { lease } => {
                self.end_lease(*lease);
                Response::Revoked
            }
            Request::Txn(txn) => match self.txn(txn) {
                Ok(response) => Response::Txn(response),
                Err(error) => Response::Failed(error),
            },
        }
    }

    fn txn(&mut self, txn: &Txn) -> Result<TxnResponse, CoordError> {
        let holds = txn.compare.iter().all(|compare| {
            let kv = self.kv.get(&compare.key);
            match &compare.target {
                Target::CreateRevision(revision) => {
                    kv.map_or(0, |kv| kv.create_revision) == *revision
                }
                Target::ModRevision(revision) => kv.map_or(0, |kv| kv.mod_revision) == *revision,
                Target::Value(value) => kv.is_some_and(|kv| kv.value == *value),
            }
        });
        let ops = if holds { &txn.success } else { &txn.failure };
        // etcd refuses the whole txn when a put names a lease that does not exist.
        if ops.iter().any(
            |op| matches!(op, Op::Put { lease: Some(id), .. } if !self.leases.contains_key(id)),
        ) {
            return Err(CoordError::Refused(
                "etcdserver: requested lease not found".into(),
            ));
        }
        let writes = ops.iter().any(|op| !matches!(op, Op::Get { .. }));
        // A txn with writes takes one revision, shared by all of them.
        let revision = if writes {
            self.revision + 1
        } else {
            self.revision
        };
        let mut gets = Vec::new();
        let mut wrote = false;
        for op in ops {
            match op {
                Op::Put { key, value, lease } => {
                    let create_revision = self
                        .kv
                        .get(key)
                        .map_or(revision, |existing| existing.create_revision);
                    self.kv.insert(
                        key.clone(),
                        KeyValue {
                            key: key.clone(),
                            value: value.clone(),
                            create_revision,
                            mod_revision: revision,
                            lease: lease.unwrap_or(0),
                        },
                    );
                    self.writes += 1;
                    wrote = true;
                }
                Op::Delete { key } => {
                    if self.kv.remove(key).is_some() {
                        self.writes += 1;
                        wrote = true;
                    }
                }
                Op::Get { key, prefix } => {
                    if *prefix {
                        gets.push(self.range(key));
                    } else {
                        gets.push(self.kv.get(key).cloned().into_iter().collect());
                    }
                }
            }
        }
        if wrote {
            self.revision = revision;
        }
        Ok(TxnResponse {
            succeeded: holds,
            revision: self.revision,
            gets,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Compare;

    fn txn(coord: &mut SimCoordinator, now: Millis, txn: Txn) -> TxnResponse {
        match coord.handle(now, &Request::Txn(txn)) {
            Response::Txn(response) => response,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_create_if_absent_txn_succeeds_once_and_revisions_grow() {
        let mut coord = SimCoordinator::new();
        let create = Txn {
            compare: vec![Compare::created("k", 0)],
            success: vec![Op::put("k", "a")],
            failure: vec![Op::get("k")],
        };
        let first = txn(&mut coord, 0, create.clone());
        assert!(first.succeeded);
        let kv = coord.get("k").unwrap().clone();
        assert_eq!((kv.create_revision, kv.mod_revision), (2, 2));
        let second = txn(&mut coord, 0, create);
        assert!(!second.succeeded);
        assert_eq!(second.got(0).unwrap().value, b"a");
        txn(
            &mut coord,
            0,
            Txn {
                success: vec![Op::put("k", "b")],
                ..Txn::default()
            },
        );
        let kv = coord.get("k").unwrap();
        assert_eq!((kv.create_revision, kv.mod_revision), (2, 3));
    }

    #[test]
    fn leased_keys_go_when_the_lease_lapses_and_keep_alive_extends_it() {
        let mut coord = SimCoordinator::new();
        let Response::Granted { lease } = coord.handle(0, &Request::LeaseGrant { ttl_ms: 100 })
        else {
            panic!()
        };
        txn(
            &mut coord,
            0,
            Txn {
                success: vec![Op::Put {
                    key: "m".into(),
                    value: b"x".to_vec(),
                    lease: Some(lease),
                }],
                ..Txn::default()
            },
        );
        assert_eq!(
            coord.handle(90, &Request::KeepAlive { lease }),
            Response::KeptAlive { alive: true }
        );
        coord.expire(150);
        assert!(coord.get("m").is_some(), "renewed at 90 until 190");
        coord.expire(190);
        assert!(coord.get("m").is_none());
        assert_eq!(
            coord.handle(191, &Request::KeepAlive { lease }),
            Response::KeptAlive { alive: false }
        );
    }
}

/// A simulated [`crate::maxseq::MaxSeqStore`]: ceilings in memory, ownership moved by the test.
///
/// Like the cluster's txn: a raise whose writer's tenure is not the section's current one (a
/// move is a route-table write) is [`PersistOutcome::Fenced`]; one whose fence (the section's
/// mod revision as the writer last saw it) moved meanwhile is [`PersistOutcome::Stale`] with
/// the current ceiling; otherwise every section of the call is written at one new revision.
/// `lose_answer` applies a persist and answers `Fenced`, like a txn whose response the network
/// lost.
#[derive(Debug, Default)]
pub struct SimMaxSeqStore {
    state: std::sync::Mutex<SimMaxSeqState>,
}

#[derive(Debug, Default)]
struct SimMaxSeqState {
    revision: i64,
    sections: HashMap<(String, u64), SimSection>,
}

#[derive(Clone, Copy, Debug)]
struct SimSection {
    max_seq: u64,
    mod_revision: i64,
    tenure: u64,
    /// Whether the node under test owns it (else "another node" does).
    mine: bool,
}

impl Default for SimSection {
    fn default() -> Self {
        Self {
            max_seq: 0,
            mod_revision: 0,
            tenure: 1,
            mine: true,
        }
    }
}

use crate::maxseq::{Ceiling, PersistOutcome, SectionRaise};

impl SimMaxSeqStore {
    /// A store where the node under test owns every section (tenure 1) at ceiling 0.
    pub fn new() -> Self {
        Self::default()
    }

    fn with<R>(
        &self,
        namespace: &str,
        section: u64,
        f: impl FnOnce(&mut SimMaxSeqState, (String, u64)) -> R,
    ) -> R {
        let mut state = self.state.lock().expect("not poisoned");
        let key = (namespace.to_owned(), section);
        state.sections.entry(key.clone()).or_default();
        f(&mut state, key)
    }

    /// The tenure under which the node under test owns the section, if it does.
    pub fn owned(&self, namespace: &str, section: u64) -> Option<u64> {
        self.with(namespace, section, |state, key| {
            let section = state.sections[&key];
            section.mine.then_some(section.tenure)
        })
    }

    /// Moves the section to another node (`mine = false`) or back to the node under test: a
    /// new tenure either way.
    pub fn move_to(&self, namespace: &str, section: u64, mine: bool) {
        self.with(namespace, section, |state, key| {
            let section = state.sections.get_mut(&key).expect("created");
            section.tenure += 1;
            section.mine = mine;
        });
    }

    /// Another node, owning the section, raises its ceiling by `by`: returns `(old, new)`; it
    /// may then serve values in `old + 1 ..= new` to each id of the section. `None` when the
    /// node under test owns the section.
    pub fn raise_by_other(&self, namespace: &str, section: u64, by: u64) -> Option<(u64, u64)> {
        self.with(namespace, section, |state, key| {
            state.revision += 1;
            let revision = state.revision;
            let section = state.sections.get_mut(&key).expect("created");
            if section.mine {
                return None;
            }
            let old = section.max_seq;
            section.max_seq += by;
            section.mod_revision = revision;
            Some((old, section.max_seq))
        })
    }

    /// Answers a load now.
    pub fn load_now(&self, namespace: &str, section: u64) -> Ceiling {
        self.with(namespace, section, |state, key| {
            let section = state.sections[&key];
            Ceiling {
                max_seq: section.max_seq,
                fence: section.mod_revision,
            }
        })
    }

    /// Answers a persist now; with `lose_answer`, what was written is answered as `Fenced`.
    pub fn persist_now(&self, raises: &[SectionRaise], lose_answer: bool) -> PersistOutcome {
        let mut state = self.state.lock().expect("not poisoned");
        let mut stale = Vec::new();
        for raise in raises {
            let section = state
                .sections
                .get(&(raise.namespace.clone(), raise.section))
                .copied()
                .unwrap_or_default();
            if !section.mine || section.tenure != raise.tenure {
                return PersistOutcome::Fenced;
            }
            if section.mod_revision != raise.fence {
                stale.push((
                    raise.section,
                    Ceiling {
                        max_seq: section.max_seq,
                        fence: section.mod_revision,
                    },
                ));
            }
        }
        if !stale.is_empty() {
            return PersistOutcome::Stale { current: stale };
        }
        state.revision += 1;
        let revision = state.revision;
        for raise in raises {
            let section = state
                .sections
                .entry((raise.namespace.clone(), raise.section))
                .or_default();
            section.max_seq = section.max_seq.max(raise.max_seq);
            section.mod_revision = revision;
        }
        if lose_answer {
            PersistOutcome::Fenced
        } else {
            PersistOutcome::Durable { fence: revision }
        }
    }
}

impl crate::maxseq::MaxSeqStore for SimMaxSeqStore {
    async fn load(&self, namespace: &str, section: u64) -> Result<Ceiling, String> {
        Ok(self.load_now(namespace, section))
    }

    async fn persist(&self, raises: Vec<SectionRaise>) -> PersistOutcome {
        self.persist_now(&raises, false)
    }
}

/// A simulated [`crate::MonotonicClock`]: the simulation's true time (in µs, advanced by its
/// scheduler through the shared `real_us`) as one node sees it, from its own origin and at
/// its own rate (the simulation keeps rates within the documented skew bound).
#[derive(Clone, Debug)]
pub struct SimClock {
    real_us: std::sync::Arc<std::sync::atomic::AtomicU64>,
    epoch_us: u64,
    offset_ms: Millis,
    rate: f64,
}

impl SimClock {
    /// A clock reading `offset_ms` at true time `epoch_us` and advancing `rate` times as fast
    /// as true time from there.
    pub fn new(
        real_us: std::sync::Arc<std::sync::atomic::AtomicU64>,
        epoch_us: u64,
        offset_ms: Millis,
        rate: f64,
    ) -> Self {
        Self {
            real_us,
            epoch_us,
            offset_ms,
            rate,
        }
    }

    /// What this clock reads at true time `real_us` (not before its epoch).
    pub fn at(&self, real_us: u64) -> Millis {
        self.offset_ms + (real_us.saturating_sub(self.epoch_us) as f64 * self.rate / 1000.0) as u64
    }

    /// The clock's rate against true time.
    pub fn rate(&self) -> f64 {
        self.rate
    }
}

impl crate::MonotonicClock for SimClock {
    fn now_ms(&self) -> Millis {
        self.at(self.real_us.load(std::sync::atomic::Ordering::Acquire))
    }
}
