//! The arbiter, sans I/O: every member campaigns; the one whose lease-bound `arbiter` key the
//! coordinator created leads, and alone writes the route table.
//!
//! While it leads, every `period_ms` (and at once when elected) it reads the members, the
//! drain requests, the namespaces and the table in one txn fenced on its election (the create
//! revision of the `arbiter` key), plans ([`crate::placement::plan`]) and writes the next
//! table with a txn fenced on the same election and on the table's revision, so that a
//! deposed arbiter's write fails and two arbiters never interleave. A follower watches the
//! leader's key ([`Arbiter::follower_of`]): the node's driver calls [`Arbiter::vacant`] when
//! the key goes, and the follower campaigns at once; it also campaigns every
//! `campaign_every_ms` as a fallback (the simulation, which has no watches, polls).

use std::collections::{BTreeMap, BTreeSet};

use imstate_coord::{Compare, LeaseId, Millis, Op, Request, Response, Txn, TxnResponse};

use crate::keys::Keys;
use crate::member::{Effect, Token};
use crate::placement::{Inputs, plan};
use crate::route::{NodeId, RouteTable};

/// Tokens of the arbiter start here, apart from the member's.
pub const ARBITER_TOKENS: Token = 1 << 62;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Candidate,
    Leader { election: i64 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Campaign,
    Read,
    Write,
}

/// The arbiter state machine of one node.
#[derive(Debug)]
pub struct Arbiter {
    keys: Keys,
    node: NodeId,
    period_ms: Millis,
    moves_max: u64,
    phase: Phase,
    lease: Option<LeaseId>,
    inflight: Option<(Token, Kind, Millis)>,
    next_token: Token,
    last_round: Option<Millis>,
    /// Drains and rebalancing move sections at most once per this long (the lock-delay:
    /// the sections of one move are served again before the next move starts).
    cooldown_ms: Millis,
    last_write: Option<Millis>,
    /// Table versions this leader read, with when it first read each: a version read a
    /// cooldown ago is settled (placement rule 5). Cleared when leadership ends.
    seen: Vec<(Millis, u64)>,
    /// The campaign period while another node leads and a watch on its key is in place (the
    /// driver calls [`Arbiter::vacant`] when the key goes); `period_ms` without a watch.
    campaign_every_ms: Millis,
    /// The `arbiter` key's mod revision when a campaign found it held by another node.
    follower_of: Option<i64>,
    /// Presence slots to place in a table that has none ([`Inputs::presence_slots`]).
    presence_slots: u32,
    /// How long a presence slot range whose primary and replica are both gone waits for one
    /// of them to return before another node takes it, empty ([`Inputs::awaited`]).
    orphan_grace_ms: Millis,
    /// Nodes the presence table names that were not live, with when this leader first saw
    /// that (cleared when it wins an election: a new leader waits the whole grace again).
    not_live_since: BTreeMap<NodeId, Millis>,
    /// Tables written by this node while it led (for status and metrics).
    pub writes: u64,
}

impl Arbiter {
    /// The arbiter of `node` in `cluster`: a round every `period_ms`, at most `moves_max`
    /// sections moved by drains and balancing per round.
    pub fn new(cluster: &str, node: &str, period_ms: Millis, moves_max: u64) -> Self {
        Self {
            keys: Keys::new(cluster),
            node: node.to_owned(),
            period_ms: period_ms.max(1),
            moves_max,
            phase: Phase::Candidate,
            lease: None,
            inflight: None,
            next_token: ARBITER_TOKENS,
            last_round: None,
            cooldown_ms: 0,
            seen: Vec::new(),
            last_write: None,
            campaign_every_ms: period_ms.max(1),
            follower_of: None,
            presence_slots: 0,
            orphan_grace_ms: 0,
            not_live_since: BTreeMap::new(),
            writes: 0,
        }
    }

    /// Places `slots` presence slots when the table has none (0, the default: presence is not
    /// placed). The count in the table wins once written: it is fixed for the cluster's life.
    pub fn with_presence_slots(mut self, slots: u32) -> Self {
        self.presence_slots = slots;
        self
    }

    /// A presence slot range whose primary and replica both stopped being live waits up to
    /// `grace_ms` (from when this leader first saw each gone) for one of them to come back
    /// with its copy, instead of going at once to an empty node (0, the default: at once).
    pub fn with_orphan_grace(mut self, grace_ms: Millis) -> Self {
        self.orphan_grace_ms = grace_ms;
        self
    }

    /// With a watch on the arbiter key, campaigns again only every `every_ms` as a fallback.
    pub fn with_campaign_every(mut self, every_ms: Millis) -> Self {
        self.campaign_every_ms = every_ms.max(1);
        self
    }

    /// When another node leads: the revision of its `arbiter` key, to watch for its deletion.
    pub fn follower_of(&self) -> Option<i64> {
        self.follower_of
    }

    /// The key to watch.
    pub fn key(&self) -> String {
        self.keys.arbiter()
    }

    /// Spaces drain and rebalance moves by `cooldown_ms` (failover is never delayed).
    pub fn with_cooldown(mut self, cooldown_ms: Millis) -> Self {
        self.cooldown_ms = cooldown_ms;
        self
    }

    /// Whether this node leads.
    pub fn is_leader(&self) -> bool {
        matches!(self.phase, Phase::Leader { .. })
    }

    /// The `arbiter` key is gone: campaign at the next poll.
    pub fn vacant(&mut self) {
        self.last_round = None;
        self.follower_of = None;
    }

    fn send(&mut self, now: Millis, kind: Kind, txn: Txn) -> Vec<Effect> {
        let token = self.next_token;
        self.next_token += 1;
        self.inflight = Some((token, kind, now));
        vec![Effect::Send {
            token,
            request: Request::Txn(txn),
        }]
    }

    /// Runs a round when due. `lease` is the member's current lease (`None` while it has none:
    /// then the arbiter steps down).
    pub fn poll(&mut self, now: Millis, lease: Option<LeaseId>) -> Vec<Effect> {
        if lease != self.lease {
            self.lease = lease;
            self.phase = Phase::Candidate;
            self.inflight = None;
            self.last_round = None;
        }
        let Some(lease) = lease else {
            return Vec::new();
        };
        if let Some((_, _, sent_at)) = self.inflight {
            if now < sent_at + 4 * self.period_ms {
                return Vec::new();
            }
            self.inflight = None;
        }
        let every = match (self.phase, self.follower_of) {
            (Phase::Candidate, Some(_)) => self.campaign_every_ms,
            _ => self.period_ms,
        };
        if self.last_round.is_some_and(|at| now < at + every) {
            return Vec::new();
        }
        self.last_round = Some(now);
        let arbiter = self.keys.arbiter();
        match self.phase {
            Phase::Candidate => {
                let txn = Txn {
                    compare: vec![Compare::created(arbiter.clone(), 0)],
                    success: vec![Op::Put {
                        key: arbiter.clone(),
                        value: self.node.clone().into_bytes(),
                        lease: Some(lease),
                    }],
                    failure: vec![Op::get(arbiter)],
                };
                self.send(now, Kind::Campaign, txn)
            }
            Phase::Leader { election } => {
                let txn = Txn {
                    compare: vec![Compare::created(arbiter.clone(), election)],
                    success: vec![
                        Op::get(self.keys.route()),
                        Op::get_prefix(self.keys.members()),
                        Op::get_prefix(self.keys.drains()),
                        Op::get_prefix(self.keys.namespaces()),
                        Op::get_prefix(self.keys.in_syncs()),
                        Op::get_prefix(self.keys.counteds()),
                    ],
                    failure: vec![Op::get(arbiter)],
                };
                self.send(now, Kind::Read, txn)
            }
        }
    }

    /// Handles the response to `token`.
    pub fn on_response(&mut self, now: Millis, token: Token, response: &Response) -> Vec<Effect> {
        let Some((expected, kind, _)) = self.inflight else {
            return Vec::new();
        };
        if expected != token {
            return Vec::new();
        }
        self.inflight = None;
        let Response::Txn(txn) = response else {
            return Vec::new();
        };
        match kind {
            Kind::Campaign => {
                self.follower_of = None;
                if txn.succeeded {
                    self.phase = Phase::Leader {
                        election: txn.revision,
                    };
                    self.not_live_since.clear();
                    self.last_round = None;
                } else if let Some(holder) = txn.got(0) {
                    if Some(holder.lease) == self.lease {
                        // Our earlier campaign won; its answer was lost.
                        self.phase = Phase::Leader {
                            election: holder.create_revision,
                        };
                        self.not_live_since.clear();
                        self.last_round = None;
                    } else {
                        self.follower_of = Some(holder.mod_revision);
                    }
                }
                Vec::new()
            }
            Kind::Read => {
                if !txn.succeeded {
                    self.phase = Phase::Candidate;
                    return Vec::new();
                }
                self.plan_from(now, txn)
            }
            Kind::Write => {
                if txn.succeeded {
                    self.writes += 1;
                    self.last_write = Some(now);
                    // Go on at once: a drain or a rebalance takes several bounded rounds.
                    self.last_round = None;
                } else if txn.got(0).is_none_or(|kv| Some(kv.lease) != self.lease) {
                    self.phase = Phase::Candidate;
                }
                Vec::new()
            }
        }
    }

    fn plan_from(&mut self, now: Millis, txn: &TxnResponse) -> Vec<Effect> {
        let Phase::Leader { election } = self.phase else {
            return Vec::new();
        };
        let cluster = self.cluster();
        let (current, revision) = match txn.got(0) {
            None => (RouteTable::empty(&cluster), 0),
            Some(kv) => match RouteTable::decode(&kv.value) {
                Ok(table) => (table, kv.mod_revision),
                // Never overwrite a table this version cannot read.
                Err(_) => return Vec::new(),
            },
        };
        let names = |index: usize| -> BTreeSet<NodeId> {
            txn.gets
                .get(index)
                .into_iter()
                .flatten()
                .map(|kv| Keys::leaf(&kv.key).to_owned())
                .collect()
        };
        let mut namespaces = BTreeMap::new();
        for kv in txn.gets.get(3).into_iter().flatten() {
            if let Ok(value) = serde_json::from_slice::<serde_json::Value>(&kv.value)
                && let Some(sections) = value.get("sections").and_then(|v| v.as_u64())
            {
                namespaces.insert(Keys::leaf(&kv.key).to_owned(), sections);
            }
        }
        // Reports of live nodes only (a lapsed lease deletes its key anyway).
        let live = names(1);
        let mut in_sync = crate::slots::InSync::new();
        for kv in txn.gets.get(4).into_iter().flatten() {
            let node = Keys::leaf(&kv.key);
            if let (true, Ok(ranges)) = (
                live.contains(node),
                serde_json::from_slice::<Vec<crate::slots::InSyncRange>>(&kv.value),
            ) {
                in_sync.insert(node.to_owned(), ranges);
            }
        }
        // A replica counts as in sync only where its primary counts it too; the table write
        // below is fenced on those reports, so a primary that withdraws one (it cut the
        // replica off) before the write lands makes the write fail and the plan run again.
        let mut counted = crate::slots::Counted::new();
        let mut fences = Vec::new();
        for kv in txn.gets.get(5).into_iter().flatten() {
            let node = Keys::leaf(&kv.key);
            if let (true, Ok(ranges)) = (
                live.contains(node),
                serde_json::from_slice::<Vec<crate::slots::CountedRange>>(&kv.value),
            ) {
                counted.insert(node.to_owned(), ranges);
                fences.push(Compare::modified(kv.key.clone(), kv.mod_revision));
            }
        }
        let reported = in_sync;
        let in_sync = crate::slots::confirmed(&reported, &counted);
        // Settled: the newest version first read at least a cooldown (the lock-delay) ago.
        if self
            .seen
            .last()
            .is_none_or(|(_, version)| *version < current.version)
        {
            self.seen.push((now, current.version));
        }
        let settled_index = self
            .seen
            .iter()
            .rposition(|(at, _)| self.cooldown_ms > 0 && now >= at + self.cooldown_ms);
        let settled = settled_index.map_or(0, |index| self.seen[index].1);
        // The planted bug: coalesce what was just moved, without waiting a lock-delay.
        #[cfg(feature = "planted-coalesce-unsettled")]
        let settled = settled.max(current.version);
        if let Some(index) = settled_index {
            self.seen.drain(..index);
        }
        // Stable: the table read now was first read at least a cooldown ago (at once with no
        // cooldown).
        let stable = self.seen.last().is_some_and(|(at, version)| {
            *version == current.version && now >= at + self.cooldown_ms
        });
        // Holders of presence slots that are gone, and since when; those gone for less than
        // the grace are awaited.
        let named: BTreeSet<&str> = current
            .presence
            .iter()
            .flat_map(|presence| &presence.ranges)
            .flat_map(|range| std::iter::once(&range.primary).chain(&range.replica))
            .map(String::as_str)
            .filter(|node| !live.contains(*node))
            .collect();
        self.not_live_since
            .retain(|node, _| named.contains(node.as_str()));
        for node in named {
            self.not_live_since.entry(node.to_owned()).or_insert(now);
        }
        let awaited = self
            .not_live_since
            .iter()
            .filter(|(_, since)| now < **since + self.orphan_grace_ms)
            .map(|(node, _)| node.clone())
            .collect();
        let inputs = Inputs {
            presence_slots: self.presence_slots,
            awaited,
            stable,
            settled,
            in_sync,
            reported,
            live,
            draining: names(2),
            namespaces,
            moves_max: if self
                .last_write
                .is_some_and(|at| now < at + self.cooldown_ms)
            {
                0
            } else {
                self.moves_max
            },
        };
        let Some(next) = plan(&current, &inputs) else {
            return Vec::new();
        };
        let write = Txn {
            compare: [
                Compare::created(self.keys.arbiter(), election),
                Compare::modified(self.keys.route(), revision),
            ]
            .into_iter()
            .chain(fences)
            .collect(),
            success: vec![Op::put(self.keys.route(), next.encode())],
            failure: vec![Op::get(self.keys.arbiter())],
        };
        self.send(now, Kind::Write, write)
    }

    fn cluster(&self) -> String {
        let prefix = self.keys.prefix();
        prefix["/imstate/".len()..prefix.len() - 1].to_owned()
    }
}
