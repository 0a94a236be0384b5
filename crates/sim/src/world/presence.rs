//! Presence slots with data in the simulation: each node keeps sessions and a durable change
//! log; primaries take logins, logouts and lookups; replicas follow their primaries by
//! snapshot + records and acknowledge; under sync replication a write is answered once every
//! in-sync replica acknowledged it (or was cut off after the ack timeout) and the slot check
//! still passes. The placement, leases and lock-delays are the real ones
//! ([`imstate_cluster::Member`], [`imstate_cluster::Arbiter`]); the replication protocol is
//! modelled on `crates/server/src/follower.rs`, `crates/server/src/grpc/replication.rs` and
//! `crates/node/src/syncacks.rs`, rule for rule:
//!
//! ```text
//!  client ──Login/Logout/Lookup──► node: access_slot? (Redirect | Unavailable | Serve)
//!     require_replica and no in-sync follower covers the slot ──► Unavailable
//!     apply + journal (LSN) ──► Records{rec, through} to every follower
//!     wait: every in-sync follower acked ≥ LSN, or the ack timeout cuts the laggards off
//!     recheck access_slot ──► Ok (a deposed primary answers Unavailable: outcome unknown)
//!  replica: table says replica of (primary, slots, since) ──► Follow(slots, position?)
//!     primary: primary of all of them in its table? resume (same log, feed holds it) |
//!              snapshot at its last LSN | refuse a position it never issued
//!     stream: Snapshot | Resumed, then Records, each acknowledged once applied
//!     a gap in a stream, 2 s of silence or an End ──► synced = false, ask again
//!     taking over a slot (primary in the table, not yet past the lock-delay): the stream
//!     from the old primary goes on for those slots
//! ```
//!
//! A node's log, LSN and log id survive a crash (recovery replays the log, replica records
//! included); its feed (what it can resume from) starts at the recovered LSN.

use std::collections::{BTreeMap, BTreeSet};

use imstate_cluster::Access;
use imstate_coord::Millis;
use rand::Rng;

use super::{Event, Fault, NodeMsg, World};
use crate::presence::{PresenceCall, PresenceOp, PresenceOutcome};
use crate::{SLOT_SECTIONS, Serve};

/// How long a primary waits for an in-sync replica's acknowledgement before it cuts the
/// replica off (`presence.replica_ack_timeout_ms`, default 1000).
const ACK_TIMEOUT_MS: Millis = 1_000;
/// A replica that hears nothing on its stream this long asks again (the gRPC keepalive).
const STREAM_SILENCE_MS: Millis = 2_000;
/// Pause before a replica asks again after a stream ended.
const RETRY_PAUSE_MS: Millis = 300;
/// How often a primary checks its streams (still primary?) and sends a keepalive.
const OWNERSHIP_CHECK_MS: Millis = 200;
/// A client gives up on a call after this long (its outcome is then unknown).
const CALL_GIVE_UP_US: u64 = 3_000_000;

/// What a run with presence data simulates (on top of [`crate::SimConfig`]).
#[derive(Clone, Debug)]
pub struct PresenceSim {
    /// Presence clients, each with its own uids and one call at a time.
    pub clients: usize,
    /// Uids per client.
    pub uids_per_client: u64,
    /// `presence.require_replica`: refuse writes to a slot no in-sync replica covers.
    pub require_replica: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Change {
    Login(u64),
    Logout(u64),
}

#[derive(Clone, Debug)]
pub(super) struct Rec {
    lsn: u64,
    uid: u64,
    change: Change,
}

#[derive(Debug)]
pub(super) enum StreamBody {
    Snapshot {
        log_id: u64,
        lsn: u64,
        sessions: Vec<(u64, u64)>,
    },
    Resumed {
        log_id: u64,
        lsn: u64,
    },
    Records {
        recs: Vec<Rec>,
        through: u64,
    },
    /// The stream ends; `forget`: the replica's position is one this log never issued.
    End {
        forget: bool,
    },
}

/// One replica stream, as its primary sees it.
struct Follower {
    stream: u64,
    replica: usize,
    replica_incarnation: u32,
    slots: BTreeSet<u32>,
    since: u64,
    acked: u64,
    in_sync: bool,
    next_seq: u64,
}

/// What a replica follows of one primary.
struct Following {
    primary: usize,
    primary_incarnation: u32,
    slots: BTreeSet<u32>,
    /// The assignment as the table gave it: (start, end, replica_since) per range.
    ranges: Vec<(u32, u32, u64)>,
    position: Option<(u64, u64)>,
    stream: Option<u64>,
    expect_seq: u64,
    last_heard: Millis,
    retry_at: Millis,
    synced: bool,
}

/// A write or read waiting for its replicas.
struct Wait {
    client: usize,
    call: u64,
    uid: u64,
    lsn: u64,
    deadline: Millis,
    shown: Vec<u64>,
    write: bool,
    /// The in-sync replica streams this wait counts on.
    waited: Vec<u64>,
    /// `false` once a replica it counted on went away: then answered only after the counted
    /// report of cut generation `needs_gen` is published.
    replicated: bool,
    needs_gen: u64,
}

/// A node's presence state.
pub(super) struct Pres {
    /// Durable: the log's identity, its last LSN and its records.
    log_id: u64,
    lsn: u64,
    log: Vec<Rec>,
    /// The feed holds the records after this LSN (the recovered end after a restart).
    feed_from: u64,
    sessions: BTreeMap<u64, BTreeSet<u64>>,
    followers: Vec<Follower>,
    following: Vec<Following>,
    waits: Vec<Wait>,
    last_check: Millis,
    reported: Option<Vec<imstate_cluster::InSyncRange>>,
    traced_version: Option<u64>,
    /// Replicas cut off so far (each bumps it); the counted report published covers cuts up
    /// to `counted_gen_published`.
    cut_gen: u64,
    counted_gen_published: u64,
    counted_published: Option<Vec<imstate_cluster::CountedRange>>,
    counted_in_flight: Option<Millis>,
}

impl Pres {
    pub(super) fn new(node: usize) -> Self {
        Self {
            log_id: node as u64 + 1,
            lsn: 0,
            log: Vec::new(),
            feed_from: 0,
            sessions: BTreeMap::new(),
            followers: Vec::new(),
            following: Vec::new(),
            waits: Vec::new(),
            last_check: 0,
            reported: None,
            traced_version: None,
            cut_gen: 0,
            counted_gen_published: 0,
            counted_published: None,
            counted_in_flight: None,
        }
    }

    /// What a restart keeps: the log, replayed.
    pub(super) fn recover(self) -> Self {
        let mut recovered = Self {
            log_id: self.log_id,
            lsn: self.lsn,
            feed_from: self.lsn,
            log: self.log,
            ..Self::new(0)
        };
        for rec in &recovered.log {
            apply(&mut recovered.sessions, rec.uid, rec.change);
        }
        recovered
    }

    fn journal(&mut self, uid: u64, change: Change) -> Rec {
        self.lsn += 1;
        let rec = Rec {
            lsn: self.lsn,
            uid,
            change,
        };
        apply(&mut self.sessions, uid, change);
        self.log.push(rec.clone());
        rec
    }

    fn covered(&self, slot: u32) -> bool {
        self.followers
            .iter()
            .any(|f| f.in_sync && f.slots.contains(&slot))
    }
}

fn apply(sessions: &mut BTreeMap<u64, BTreeSet<u64>>, uid: u64, change: Change) {
    match change {
        Change::Login(session) => {
            sessions.entry(uid).or_default().insert(session);
        }
        Change::Logout(session) => {
            if let Some(set) = sessions.get_mut(&uid) {
                set.remove(&session);
                if set.is_empty() {
                    sessions.remove(&uid);
                }
            }
        }
    }
}

/// A presence client: its uids, the sessions it may have online, its call in flight.
pub(super) struct PClient {
    uids: Vec<u64>,
    online: BTreeMap<u64, Vec<u64>>,
    hint: BTreeMap<u32, usize>,
    call: Option<PCallState>,
    next_call: u64,
}

struct PCallState {
    id: u64,
    uid: u64,
    op: PresenceOp,
    start_us: u64,
    attempt: u32,
    target: usize,
}

impl PClient {
    pub(super) fn new(index: usize, uids: u64) -> Self {
        Self {
            uids: (0..uids).map(|k| index as u64 * uids + k).collect(),
            online: BTreeMap::new(),
            hint: BTreeMap::new(),
            call: None,
            next_call: 0,
        }
    }
}

#[derive(Debug)]
pub(super) enum PReply {
    Ok(Vec<u64>),
    Redirect(usize),
    Unavailable,
}

fn node_index(id: &str) -> usize {
    id[1..].parse().unwrap_or(0)
}

/// `IMSTATE_SIM_TRACE_SLOT=<slot>`: print what happens to that presence slot (debugging a
/// replayed seed).
fn trace_slot() -> Option<u32> {
    static SLOT: std::sync::OnceLock<Option<u32>> = std::sync::OnceLock::new();
    *SLOT.get_or_init(|| {
        std::env::var("IMSTATE_SIM_TRACE_SLOT")
            .ok()
            .and_then(|slot| slot.parse().ok())
    })
}

impl World {
    fn slot_count(&self) -> u32 {
        self.config.slots
    }

    /// Traces the traced slot's range when `node` installed a new table.
    pub(super) fn trace_route(&mut self, node: usize) {
        let Some(slot) = trace_slot() else { return };
        let Some(table) = self.nodes[node].member.route() else {
            return;
        };
        if Some(table.version) != self.nodes[node].pres.traced_version {
            self.nodes[node].pres.traced_version = Some(table.version);
            let table = self.nodes[node].member.route().expect("read above");
            let range = table.presence.as_ref().and_then(|p| p.range(slot));
            self.trace(slot, || {
                format!("n{node} installs table {}: {range:?}", table.version)
            });
        }
    }

    fn trace(&self, slot: u32, what: impl FnOnce() -> String) {
        if trace_slot() == Some(slot) {
            println!("{:>9.3} ms  {}", self.now_us as f64 / 1000.0, what());
        }
    }

    /// The table's primary and replica of `slot`, as `node` sees it.
    fn table_roles(&self, node: usize, slot: u32) -> Option<(usize, Option<usize>)> {
        let presence = self.nodes[node].member.route()?.presence.as_ref()?;
        let range = presence.range(slot)?;
        Some((
            node_index(&range.primary),
            range.replica.as_deref().map(node_index),
        ))
    }

    fn peer_send(&mut self, from: usize, to: usize, msg: NodeMsg) {
        let pair = (from.min(to), from.max(to));
        if self.cuts.contains(&pair) {
            return;
        }
        let extra = self.nodes[from]
            .extra_delay_ms
            .max(self.nodes[to].extra_delay_ms)
            / 10;
        let delay = self.rng.gen_range(200..2_000) + extra * 1000;
        let at = (self.now_us + delay).max(self.link_last.get(&(from, to)).map_or(0, |t| t + 1));
        self.link_last.insert((from, to), at);
        let incarnation = self.nodes[to].incarnation;
        self.at(
            at - self.now_us,
            Event::AtNode {
                node: to,
                incarnation,
                msg,
            },
        );
    }

    fn stream_send(&mut self, node: usize, follower: usize, body: StreamBody) {
        let f = &mut self.nodes[node].pres.followers[follower];
        let (to, stream, seq) = (f.replica, f.stream, f.next_seq);
        f.next_seq += 1;
        self.peer_send(node, to, NodeMsg::Stream { stream, seq, body });
    }

    /// Ends and forgets follower `index` of `node`.
    fn end_follower(&mut self, node: usize, index: usize, forget: bool) {
        if let Some(slot) = trace_slot() {
            let f = &self.nodes[node].pres.followers[index];
            if f.slots.contains(&slot) {
                self.trace(slot, || {
                    format!("n{node} ends stream {} of replica n{}", f.stream, f.replica)
                });
            }
        }
        self.stream_send(node, index, StreamBody::End { forget });
        let f = self.nodes[node].pres.followers.remove(index);
        if f.in_sync {
            self.nodes[node].pres.cut_gen += 1;
        }
    }

    // ----- the node's side ---------------------------------------------------------------

    pub(super) fn presence_tick(&mut self, node: usize, now: Millis) {
        self.trace_route(node);
        self.reset_streams(node);
        self.replica_tick(node, now);
        if now >= self.nodes[node].pres.last_check + OWNERSHIP_CHECK_MS {
            self.nodes[node].pres.last_check = now;
            let mut index = 0;
            while index < self.nodes[node].pres.followers.len() {
                let slots: Vec<u32> = self.nodes[node].pres.followers[index]
                    .slots
                    .iter()
                    .copied()
                    .collect();
                if !self.primary_of_all(node, &slots) {
                    self.end_follower(node, index, false);
                    continue;
                }
                let through = self.nodes[node].pres.lsn;
                self.stream_send(
                    node,
                    index,
                    StreamBody::Records {
                        recs: Vec::new(),
                        through,
                    },
                );
                index += 1;
            }
        }
        self.process_waits(node);
        self.publish_counted(node, now);
    }

    fn primary_of_all(&self, node: usize, slots: &[u32]) -> bool {
        slots.iter().all(|slot| {
            self.table_roles(node, *slot)
                .is_some_and(|(primary, _)| primary == node)
        })
    }

    /// The replica's manager: one following per (primary, ranges) the table gives this node,
    /// plus the slots it is taking over from a following that no longer matches.
    fn replica_tick(&mut self, node: usize, now: Millis) {
        let mut wanted: BTreeMap<usize, Vec<(u32, u32, u64)>> = BTreeMap::new();
        if let Some(presence) = self.nodes[node]
            .member
            .route()
            .and_then(|table| table.presence.as_ref())
        {
            for range in &presence.ranges {
                let since = if range.replica.as_deref().map(node_index) == Some(node) {
                    range.replica_since
                } else if range.joining.as_deref().map(node_index) == Some(node) {
                    range.joining_since
                } else {
                    continue;
                };
                wanted.entry(node_index(&range.primary)).or_default().push((
                    range.start,
                    range.end,
                    since,
                ));
            }
        }
        let following = std::mem::take(&mut self.nodes[node].pres.following);
        let mut kept = Vec::new();
        let mut closed = Vec::new();
        for mut f in following {
            if wanted.get(&f.primary) == Some(&f.ranges) {
                wanted.remove(&f.primary);
                kept.push(f);
                continue;
            }
            // Keep the stream for slots this node is taking over (past them: gone).
            let taking_over: BTreeSet<u32> = f
                .slots
                .iter()
                .copied()
                .filter(|slot| {
                    self.table_roles(node, *slot)
                        .is_some_and(|(primary, _)| primary == node)
                        && !matches!(
                            self.nodes[node].member.access_slot(now, u64::from(*slot)),
                            Access::Serve { .. }
                        )
                })
                .collect();
            if !taking_over.is_empty() {
                f.slots = taking_over;
                f.ranges.clear();
                kept.push(f);
            } else if let Some(stream) = f.stream {
                closed.push((f.primary, stream));
            }
        }
        // The task ends and its connection closes: the primary drops the stream.
        for (primary, stream) in closed {
            self.peer_send(node, primary, NodeMsg::Close { stream });
        }
        for (primary, ranges) in wanted {
            if primary == node {
                continue;
            }
            let slots = ranges
                .iter()
                .flat_map(|&(start, end, _)| start..end)
                .collect();
            kept.push(Following {
                primary,
                primary_incarnation: 0,
                slots,
                ranges,
                position: None,
                stream: None,
                expect_seq: 0,
                last_heard: now,
                retry_at: now,
                synced: false,
            });
        }
        self.nodes[node].pres.following = kept;
        for index in 0..self.nodes[node].pres.following.len() {
            let f = &mut self.nodes[node].pres.following[index];
            if let Some(stream) = f.stream.filter(|_| now >= f.last_heard + STREAM_SILENCE_MS) {
                let primary = f.primary;
                f.stream = None;
                f.synced = false;
                f.retry_at = now + RETRY_PAUSE_MS;
                self.peer_send(node, primary, NodeMsg::Close { stream });
            }
            let f = &mut self.nodes[node].pres.following[index];
            if f.stream.is_none() && now >= f.retry_at && !f.ranges.is_empty() {
                let stream = self.next_stream;
                self.next_stream += 1;
                let f = &mut self.nodes[node].pres.following[index];
                f.stream = Some(stream);
                f.expect_seq = 0;
                f.last_heard = now;
                let primary = f.primary;
                let incarnation = self.nodes[primary].incarnation;
                let f = &mut self.nodes[node].pres.following[index];
                f.primary_incarnation = incarnation;
                let (primary, slots, resume) = (f.primary, f.slots.clone(), f.position);
                self.peer_send(
                    node,
                    primary,
                    NodeMsg::Follow {
                        replica: node,
                        stream,
                        slots,
                        resume,
                    },
                );
            }
        }
        // The in-sync report: what this node holds every acknowledged change of.
        let ranges: Vec<imstate_cluster::InSyncRange> = self.nodes[node]
            .pres
            .following
            .iter()
            .filter(|f| f.synced && f.stream.is_some())
            .flat_map(|f| {
                f.ranges.iter().map(
                    |&(start, end, replica_since)| imstate_cluster::InSyncRange {
                        start,
                        end,
                        primary: format!("n{}", f.primary),
                        replica_since,
                        lapsed: false,
                    },
                )
            })
            .collect();
        if self.nodes[node].pres.reported.as_ref() != Some(&ranges)
            || self.rng.gen_range(0..100) == 0
        {
            self.nodes[node].pres.reported = Some(ranges.clone());
            self.publish_in_sync(node, ranges);
        }
    }

    /// A replica asks to follow `slots` of this node.
    pub(super) fn on_follow(
        &mut self,
        node: usize,
        replica: usize,
        stream: u64,
        slots: BTreeSet<u32>,
        resume: Option<(u64, u64)>,
    ) {
        let wanted: Vec<u32> = slots.iter().copied().collect();
        let pres = &self.nodes[node].pres;
        let (log_id, last, feed_from) = (pres.log_id, pres.lsn, pres.feed_from);
        let replica_incarnation = self.nodes[replica].incarnation;
        self.nodes[node].pres.followers.push(Follower {
            stream,
            replica,
            replica_incarnation,
            slots: slots.clone(),
            since: last,
            acked: 0,
            in_sync: false,
            next_seq: 0,
        });
        let index = self.nodes[node].pres.followers.len() - 1;
        if let Some(slot) = trace_slot().filter(|slot| slots.contains(slot)) {
            self.trace(slot, || {
                format!(
                    "n{node} gets Follow {stream} from n{replica}, resume {resume:?}, last {last}, \
                     feed from {feed_from}, primary of all: {}",
                    self.primary_of_all(node, &wanted)
                )
            });
        }
        if !self.primary_of_all(node, &wanted) {
            self.end_follower(node, index, false);
            return;
        }
        match resume {
            Some((id, lsn)) if id == log_id && lsn > last => {
                self.end_follower(node, index, true);
            }
            Some((id, lsn)) if id == log_id && lsn >= feed_from => {
                self.nodes[node].pres.followers[index].since = lsn;
                self.stream_send(node, index, StreamBody::Resumed { log_id, lsn });
                let recs: Vec<Rec> = self.nodes[node]
                    .pres
                    .log
                    .iter()
                    .filter(|rec| {
                        rec.lsn > lsn
                            && slots.contains(&((rec.uid % u64::from(self.config.slots)) as u32))
                    })
                    .cloned()
                    .collect();
                self.stream_send(
                    node,
                    index,
                    StreamBody::Records {
                        recs,
                        through: last,
                    },
                );
            }
            _ => {
                let count = self.slot_count() as u64;
                let sessions = self.nodes[node]
                    .pres
                    .sessions
                    .iter()
                    .filter(|(uid, _)| slots.contains(&((*uid % count) as u32)))
                    .flat_map(|(uid, set)| set.iter().map(move |s| (*uid, *s)))
                    .collect();
                self.report.presence_snapshots += 1;
                self.stream_send(
                    node,
                    index,
                    StreamBody::Snapshot {
                        log_id,
                        lsn: last,
                        sessions,
                    },
                );
            }
        }
    }

    /// Sends a record this node journaled to its followers: the record to those of its
    /// slot, the position to the others (so they acknowledge it). A record applied as a
    /// replica goes out too: the change feed holds every record of the log, which is how a
    /// node taking over a slot passes on what the old primary acknowledged meanwhile.
    fn feed(&mut self, node: usize, rec: Rec) {
        let slot = (rec.uid % u64::from(self.slot_count())) as u32;
        let through = rec.lsn;
        for index in 0..self.nodes[node].pres.followers.len() {
            let recs = if self.nodes[node].pres.followers[index].slots.contains(&slot) {
                vec![rec.clone()]
            } else {
                Vec::new()
            };
            self.stream_send(node, index, StreamBody::Records { recs, through });
        }
    }

    /// A replica closed its stream.
    pub(super) fn on_close(&mut self, node: usize, stream: u64) {
        let pres = &mut self.nodes[node].pres;
        let lost = pres
            .followers
            .iter()
            .filter(|f| f.stream == stream && f.in_sync)
            .count();
        pres.cut_gen += lost as u64;
        pres.followers.retain(|f| f.stream != stream);
        self.process_waits(node);
    }

    /// A replica's acknowledgement.
    pub(super) fn on_ack(&mut self, node: usize, stream: u64, lsn: u64) {
        if let Some(f) = self.nodes[node]
            .pres
            .followers
            .iter_mut()
            .find(|f| f.stream == stream)
        {
            f.acked = f.acked.max(lsn);
            if f.acked >= f.since {
                f.in_sync = true;
            }
        }
        self.process_waits(node);
    }

    /// A message of a stream this node follows.
    pub(super) fn on_stream(&mut self, node: usize, stream: u64, seq: u64, body: StreamBody) {
        let now = self.nodes[node].now(self.now_us);
        let count = u64::from(self.slot_count());
        let Some(index) = self.nodes[node]
            .pres
            .following
            .iter()
            .position(|f| f.stream == Some(stream))
        else {
            return;
        };
        let pres = &mut self.nodes[node].pres;
        let f = &mut pres.following[index];
        if seq != f.expect_seq {
            // A gap: the connection broke; ask again.
            f.stream = None;
            f.synced = false;
            f.retry_at = now + RETRY_PAUSE_MS;
            let primary = f.primary;
            self.peer_send(node, primary, NodeMsg::Close { stream });
            return;
        }
        f.expect_seq += 1;
        f.last_heard = now;
        let primary = f.primary;
        let slots = f.slots.clone();
        let before = pres.log.len();
        let ack = match body {
            StreamBody::Snapshot {
                log_id,
                lsn,
                sessions,
            } => {
                let wanted: BTreeSet<(u64, u64)> = sessions.into_iter().collect();
                let held: Vec<(u64, u64)> = pres
                    .sessions
                    .iter()
                    .filter(|(uid, _)| slots.contains(&((*uid % count) as u32)))
                    .flat_map(|(uid, set)| set.iter().map(move |s| (*uid, *s)))
                    .collect();
                for &(uid, session) in &wanted {
                    if !pres
                        .sessions
                        .get(&uid)
                        .is_some_and(|set| set.contains(&session))
                    {
                        pres.journal(uid, Change::Login(session));
                    }
                }
                for (uid, session) in held {
                    if !wanted.contains(&(uid, session)) {
                        pres.journal(uid, Change::Logout(session));
                    }
                }
                let f = &mut pres.following[index];
                f.position = Some((log_id, lsn));
                f.synced = true;
                if let Some(slot) = trace_slot().filter(|slot| slots.contains(slot)) {
                    self.trace(slot, || {
                        format!(
                            "n{node} applied snapshot of n{primary} at {lsn} (stream {stream})"
                        )
                    });
                }
                Some(lsn)
            }
            StreamBody::Resumed { log_id, lsn } => {
                let f = &mut pres.following[index];
                if f.position != Some((log_id, lsn)) {
                    f.stream = None;
                    f.synced = false;
                    f.retry_at = now + RETRY_PAUSE_MS;
                    self.peer_send(node, primary, NodeMsg::Close { stream });
                    return;
                }
                f.synced = true;
                Some(lsn)
            }
            StreamBody::Records { recs, through } => {
                for rec in recs {
                    let slot = (rec.uid % count) as u32;
                    if slots.contains(&slot) {
                        let mine = pres.journal(rec.uid, rec.change);
                        if trace_slot() == Some(slot) {
                            println!(
                                "{:>9.3} ms  n{node} replica applies {rec:?} from n{primary} as {}",
                                self.now_us as f64 / 1000.0,
                                mine.lsn
                            );
                        }
                    }
                }
                let f = &mut pres.following[index];
                if f.synced {
                    if let Some(position) = &mut f.position {
                        position.1 = through;
                    }
                    Some(through)
                } else {
                    None
                }
            }
            StreamBody::End { forget } => {
                if trace_slot().is_some_and(|slot| slots.contains(&slot)) {
                    println!(
                        "{:>9.3} ms  n{node}: stream {stream} from n{primary} ended",
                        self.now_us as f64 / 1000.0
                    );
                }
                let pres = &mut self.nodes[node].pres;
                let f = &mut pres.following[index];
                f.stream = None;
                f.synced = false;
                f.retry_at = now + RETRY_PAUSE_MS;
                if forget {
                    f.position = None;
                }
                None
            }
        };
        let journaled: Vec<Rec> = self.nodes[node].pres.log[before..].to_vec();
        for rec in journaled {
            self.feed(node, rec);
        }
        if let Some(lsn) = ack {
            self.peer_send(node, primary, NodeMsg::Ack { stream, lsn });
        }
    }

    /// A client's presence call at `node`.
    pub(super) fn on_presence_call(
        &mut self,
        node: usize,
        client: usize,
        call: u64,
        uid: u64,
        op: PresenceOp,
    ) {
        let now = self.nodes[node].now(self.now_us);
        let slot = (uid % u64::from(self.slot_count())) as u32;
        let access = self.nodes[node].member.access_slot(now, uid);
        let deposed_writes = cfg!(feature = "planted-deposed-primary-writes");
        match access {
            Access::Serve { .. } => {}
            _ if deposed_writes && op != PresenceOp::Lookup => {}
            Access::Redirect { owner, .. } => {
                return self.presence_reply(client, call, PReply::Redirect(node_index(&owner)));
            }
            Access::Unavailable { .. } => {
                return self.presence_reply(client, call, PReply::Unavailable);
            }
        }
        let require = self.presence.as_ref().is_some_and(|p| p.require_replica);
        let pres = &mut self.nodes[node].pres;
        if op != PresenceOp::Lookup && require && !pres.covered(slot) {
            return self.presence_reply(client, call, PReply::Unavailable);
        }
        let shown = pres
            .sessions
            .get(&uid)
            .map(|set| set.iter().copied().collect())
            .unwrap_or_default();
        let change = match op {
            PresenceOp::Login(session) => Some(Change::Login(session)),
            PresenceOp::Logout(session) => Some(Change::Logout(session)),
            PresenceOp::Lookup => None,
        };
        let write = change.is_some();
        if let Some(change) = change {
            let rec = pres.journal(uid, change);
            self.trace(slot, || format!("n{node} primary applies {rec:?}"));
            self.feed(node, rec);
        }
        let pres = &mut self.nodes[node].pres;
        pres.waits.push(Wait {
            client,
            call,
            uid,
            lsn: pres.lsn,
            deadline: now + ACK_TIMEOUT_MS,
            shown,
            write,
            waited: Vec::new(),
            replicated: true,
            needs_gen: 0,
        });
        self.process_waits(node);
    }

    /// Answers the waits whose replicas have acknowledged (or were cut off), as
    /// `SyncAcks::wait` and `PresenceStore::durable` do.
    fn process_waits(&mut self, node: usize) {
        let now = self.nodes[node].now(self.now_us);
        let require = self.presence.as_ref().is_some_and(|p| p.require_replica);
        let waits = std::mem::take(&mut self.nodes[node].pres.waits);
        let mut still = Vec::new();
        for mut wait in waits {
            if !wait.replicated {
                // Degraded: answered once the primary's counted report without the cut
                // replica is in the coordinator (or not at all).
                if self.nodes[node].pres.counted_gen_published >= wait.needs_gen {
                    self.answer(node, now, wait);
                } else if now >= wait.deadline + ACK_TIMEOUT_MS * 2 {
                    self.presence_reply(wait.client, wait.call, PReply::Unavailable);
                } else {
                    still.push(wait);
                }
                continue;
            }
            let pres = &self.nodes[node].pres;
            // The replicas this wait counts on: one that went away before acknowledging
            // (cut off, stream closed) leaves the write on this node only.
            let mut complete = true;
            wait.waited.retain(|stream| {
                match pres.followers.iter().find(|f| f.stream == *stream) {
                    Some(f) if f.acked >= wait.lsn => false,
                    Some(_) => true,
                    None => {
                        complete = false;
                        false
                    }
                }
            });
            let lagging: Vec<u64> = pres
                .followers
                .iter()
                .filter(|f| f.in_sync && f.acked < wait.lsn)
                .map(|f| f.stream)
                .collect();
            for stream in &lagging {
                if !wait.waited.contains(stream) {
                    wait.waited.push(*stream);
                }
            }
            if cfg!(feature = "planted-ack-before-replica") {
                wait.waited.clear();
                complete = true;
            }
            if !wait.waited.is_empty() {
                if now < wait.deadline {
                    still.push(wait);
                    continue;
                }
                complete = false;
                for stream in std::mem::take(&mut wait.waited) {
                    if let Some(index) = self.nodes[node]
                        .pres
                        .followers
                        .iter()
                        .position(|f| f.stream == stream)
                    {
                        self.report.presence_cutoffs += 1;
                        self.end_follower(node, index, false);
                    }
                }
            }
            let pres = &self.nodes[node].pres;
            if !complete && require {
                self.presence_reply(wait.client, wait.call, PReply::Unavailable);
            } else if pres.counted_gen_published >= pres.cut_gen {
                self.answer(node, now, wait);
            } else {
                // A replica was lost since the last counted report (this wait's or another):
                // answered only once the coordinator knows this primary no longer counts it.
                wait.replicated = false;
                wait.needs_gen = self.nodes[node].pres.cut_gen;
                still.push(wait);
                self.publish_counted(node, now);
            }
        }
        self.nodes[node].pres.waits.extend(still);
    }

    /// The slot check again, now that the change is durable and replicated, then the answer.
    fn answer(&mut self, node: usize, now: Millis, wait: Wait) {
        let access = self.nodes[node].member.access_slot(now, wait.uid);
        let slot = (wait.uid % u64::from(self.slot_count())) as u32;
        self.trace(slot, || {
            format!(
                "n{node} answers uid {} lsn {} (write {}, replicated {}): {access:?}",
                wait.uid, wait.lsn, wait.write, wait.replicated
            )
        });
        match access {
            Access::Serve { tenure } => {
                if wait.write {
                    self.serves.push(Serve {
                        section: SLOT_SECTIONS + u64::from(slot),
                        node,
                        incarnation: self.nodes[node].incarnation,
                        tenure,
                        at_us: self.now_us,
                    });
                }
                self.presence_reply(wait.client, wait.call, PReply::Ok(wait.shown));
            }
            _ if cfg!(feature = "planted-deposed-primary-writes") => {
                self.presence_reply(wait.client, wait.call, PReply::Ok(wait.shown));
            }
            _ => self.presence_reply(wait.client, wait.call, PReply::Unavailable),
        }
    }

    /// What this primary counts in sync, per the ranges its table gives it.
    fn counted_ranges(&self, node: usize) -> Vec<imstate_cluster::CountedRange> {
        let Some(presence) = self.nodes[node]
            .member
            .route()
            .and_then(|table| table.presence.as_ref())
        else {
            return Vec::new();
        };
        let pres = &self.nodes[node].pres;
        let mut out = Vec::new();
        for range in presence
            .ranges
            .iter()
            .filter(|r| node_index(&r.primary) == node)
        {
            let roles = [
                (&range.replica, range.replica_since),
                (&range.joining, range.joining_since),
            ];
            for (replica, since) in roles {
                let Some(replica) = replica else { continue };
                let index = node_index(replica);
                let covered = (range.start..range.end).all(|slot| {
                    pres.followers
                        .iter()
                        .any(|f| f.in_sync && f.replica == index && f.slots.contains(&slot))
                });
                if covered {
                    out.push(imstate_cluster::CountedRange {
                        start: range.start,
                        end: range.end,
                        replica: replica.clone(),
                        replica_since: since,
                    });
                }
            }
        }
        out
    }

    /// Publishes `counted/<node>` when it changed (one txn in flight at a time).
    pub(super) fn publish_counted(&mut self, node: usize, now: Millis) {
        let ranges = self.counted_ranges(node);
        let pres = &self.nodes[node].pres;
        let in_flight = pres
            .counted_in_flight
            .is_some_and(|since| now < since + 1_000);
        if in_flight
            || (pres.counted_published.as_ref() == Some(&ranges)
                && pres.counted_gen_published >= pres.cut_gen)
        {
            // Nothing new to say (or a publication is on its way).
            return;
        }
        let keys = imstate_cluster::Keys::new(super::CLUSTER);
        let value = serde_json::to_vec(&ranges).expect("encodes");
        let generation = self.nodes[node].pres.cut_gen;
        let sent = self.put_leased(
            node,
            keys.counted(&format!("n{node}")),
            value,
            vec![imstate_coord::Op::get(keys.route())],
            super::Purpose::Counted(generation, ranges),
        );
        if sent {
            self.nodes[node].pres.counted_in_flight = Some(now);
        }
    }

    /// The coordinator's answer to a counted report.
    pub(super) fn counted_published(
        &mut self,
        node: usize,
        generation: u64,
        ranges: Vec<imstate_cluster::CountedRange>,
        answer: Option<&imstate_coord::TxnResponse>,
    ) {
        // The route table read in the same txn: a newer one than this node installed may
        // have moved slots to the replica it lost; then nothing degraded is acknowledged yet.
        let current = answer.is_some_and(|txn| {
            let version = txn
                .gets
                .first()
                .and_then(|kvs| kvs.first())
                .and_then(|kv| imstate_cluster::RouteTable::decode(&kv.value).ok())
                .map_or(0, |table| table.version);
            let installed = self.nodes[node].member.route().map_or(0, |t| t.version);
            txn.succeeded && (version <= installed || cfg!(feature = "planted-ack-before-replica"))
        });
        if let Some(slot) = trace_slot() {
            let installed = self.nodes[node].member.route().map_or(0, |t| t.version);
            self.trace(slot, || {
                format!(
                    "n{node} counted report of generation {generation} answered: current {current}, installed {installed}, {:?}",
                    answer.map(|txn| (txn.succeeded, txn.gets.len()))
                )
            });
        }
        let pres = &mut self.nodes[node].pres;
        pres.counted_in_flight = None;
        if answer.is_some_and(|txn| txn.succeeded) {
            pres.counted_published = Some(ranges);
        }
        if current {
            pres.counted_gen_published = pres.counted_gen_published.max(generation);
        }
        self.process_waits(node);
    }

    fn presence_reply(&mut self, client: usize, call: u64, reply: PReply) {
        let delay = self.rng.gen_range(300..3_000);
        self.at(
            delay,
            Event::AtPresenceClient {
                client,
                call,
                reply,
            },
        );
    }

    // ----- clients -----------------------------------------------------------------------

    pub(super) fn presence_client_send(&mut self, client: usize) {
        let c = &self.pclients[client];
        let uid = c.uids[self.rng.gen_range(0..c.uids.len())];
        let online = c.online.get(&uid).cloned().unwrap_or_default();
        let roll = self.rng.gen_range(0..100);
        let op = if !online.is_empty() && roll < 35 {
            PresenceOp::Logout(online[self.rng.gen_range(0..online.len())])
        } else if roll < 70 {
            PresenceOp::Lookup
        } else {
            self.next_session += 1;
            PresenceOp::Login(self.next_session)
        };
        let slot = (uid % u64::from(self.slot_count())) as u32;
        let target = match self.pclients[client].hint.get(&slot) {
            Some(node) => *node,
            None => self.rng.gen_range(0..self.nodes.len()),
        };
        let c = &mut self.pclients[client];
        let id = c.next_call;
        c.next_call += 1;
        c.call = Some(PCallState {
            id,
            uid,
            op,
            start_us: self.now_us,
            attempt: 0,
            target,
        });
        self.presence_attempt(client, id);
    }

    pub(super) fn presence_attempt(&mut self, client: usize, call: u64) {
        let Some(state) = self.pclients[client].call.as_mut() else {
            return;
        };
        if state.id != call {
            return;
        }
        state.attempt += 1;
        if self.now_us >= state.start_us + CALL_GIVE_UP_US {
            self.presence_finish(client, PresenceOutcome::Unknown);
            return;
        }
        let (node, uid, op, attempt) = (state.target, state.uid, state.op.clone(), state.attempt);
        let incarnation = self.nodes[node].incarnation;
        let delay = self.rng.gen_range(300..3_000);
        self.at(
            delay,
            Event::AtNode {
                node,
                incarnation,
                msg: NodeMsg::PresenceCall {
                    client,
                    call,
                    uid,
                    op,
                },
            },
        );
        self.at(
            1_500_000,
            Event::PresenceTimeout {
                client,
                call,
                attempt,
            },
        );
    }

    pub(super) fn presence_timeout(&mut self, client: usize, call: u64, attempt: u32) {
        let current = self.pclients[client]
            .call
            .as_ref()
            .is_some_and(|c| c.id == call && c.attempt == attempt);
        if current {
            let target = self.rng.gen_range(0..self.nodes.len());
            if let Some(c) = self.pclients[client].call.as_mut() {
                c.target = target;
            }
            self.presence_attempt(client, call);
        }
    }

    pub(super) fn presence_client_reply(&mut self, client: usize, call: u64, reply: PReply) {
        let Some(state) = self.pclients[client].call.as_mut() else {
            return;
        };
        if state.id != call {
            return;
        }
        match reply {
            PReply::Ok(shown) => self.presence_finish(client, PresenceOutcome::Ok(shown)),
            PReply::Redirect(owner) => {
                let slot = (state.uid % u64::from(self.config.slots)) as u32;
                state.target = owner;
                self.pclients[client].hint.insert(slot, owner);
                self.presence_attempt(client, call);
            }
            PReply::Unavailable => {
                if self.rng.gen_bool(0.3) {
                    state.target = self.rng.gen_range(0..self.nodes.len());
                }
                self.at(50_000, Event::PresenceRetry { client, call });
            }
        }
    }

    pub(super) fn presence_finish(&mut self, client: usize, outcome: PresenceOutcome) {
        let Some(state) = self.pclients[client].call.take() else {
            return;
        };
        let c = &mut self.pclients[client];
        match state.op {
            PresenceOp::Login(session) => c.online.entry(state.uid).or_default().push(session),
            PresenceOp::Logout(session) => {
                if let Some(list) = c.online.get_mut(&state.uid) {
                    list.retain(|s| *s != session);
                }
            }
            PresenceOp::Lookup => {}
        }
        match (&state.op, &outcome) {
            (_, PresenceOutcome::Unknown) => self.report.presence_unknown += 1,
            (PresenceOp::Lookup, _) => self.report.presence_lookups += 1,
            _ => self.report.presence_writes += 1,
        }
        self.phistory.push(PresenceCall {
            uid: state.uid,
            op: state.op,
            start_us: state.start_us,
            end_us: self.now_us,
            outcome,
        });
        let think = self.rng.gen_range(5_000..20_000);
        self.at(think, Event::PresenceSend { client });
    }

    /// Presence mode's fault schedule: one fault at a time, each injected after the cluster
    /// has settled (every node up and reachable, every slot range with a live replica that
    /// said it is in sync for this tenure) and stayed so for a random quiet time of up to
    /// 3 s. No fault in the last 15 s, so the run ends settled.
    pub(super) fn fault_poll(&mut self) {
        if self.now_us + 15_000_000 > self.config.duration_ms * 1000 {
            return;
        }
        self.at(100_000, Event::FaultPoll);
        if !self.settled() {
            self.settled_since = None;
            return;
        }
        let now = self.now_us;
        if self.settled_since.is_none() {
            self.settled_since = Some(now);
            self.quiet_us = self.rng.gen_range(0..3_000_000);
        }
        if now < self.settled_since.unwrap_or(now) + self.quiet_us {
            return;
        }
        self.settled_since = None;
        let ttl = self.config.ttl_ms;
        let node = self.rng.gen_range(0..self.nodes.len());
        let fault = match self.rng.gen_range(0..8) {
            0 | 1 => Fault::Crash {
                node,
                down_ms: self.rng.gen_range(300..2 * ttl),
            },
            2 => Fault::Pause {
                node,
                ms: self.rng.gen_range(ttl * 3 / 2..ttl * 3),
            },
            3 => Fault::Pause {
                node,
                ms: self.rng.gen_range(ttl / 4..ttl),
            },
            4 => Fault::Partition {
                node,
                ms: self.rng.gen_range(ttl / 2..ttl * 3),
            },
            5 => {
                let other = (node + self.rng.gen_range(1..self.nodes.len())) % self.nodes.len();
                Fault::Cut {
                    a: node,
                    b: other,
                    ms: self.rng.gen_range(300..ttl * 3),
                }
            }
            6 => Fault::Slow {
                node,
                extra_ms: self.rng.gen_range(50..2 * ttl),
                ms: self.rng.gen_range(1_000..5_000),
            },
            _ => Fault::EarlyLeaseEnd { node },
        };
        self.fault(fault);
    }

    /// Every node up and reachable, every slot range with a live replica in sync.
    fn settled(&self) -> bool {
        let healthy = self
            .nodes
            .iter()
            .all(|n| n.alive && !n.paused && !n.partitioned && n.extra_delay_ms == 0);
        if !healthy || !self.cuts.is_empty() {
            return false;
        }
        let keys = imstate_cluster::Keys::new(super::CLUSTER);
        let Some(table) = self
            .coord
            .get(&keys.route())
            .and_then(|kv| serde_json::from_slice::<imstate_cluster::RouteTable>(&kv.value).ok())
        else {
            return false;
        };
        let Some(presence) = table.presence else {
            return false;
        };
        let mut in_sync = imstate_cluster::InSync::new();
        for kv in self.coord.range(&keys.in_syncs()) {
            if let Ok(ranges) = serde_json::from_slice(&kv.value) {
                in_sync.insert(imstate_cluster::Keys::leaf(&kv.key).to_owned(), ranges);
            }
        }
        // And as the nodes see it: the primary counts a stream of that very replica in sync.
        presence.ranges.iter().all(|range| {
            let Some(replica) = range.replica.as_deref().map(node_index) else {
                return false;
            };
            let primary = &self.nodes[node_index(&range.primary)].pres;
            range.joining.is_none()
                && imstate_cluster::replica_in_sync(range, &in_sync)
                && (range.start..range.end).all(|slot| {
                    primary
                        .followers
                        .iter()
                        .any(|f| f.in_sync && f.replica == replica && f.slots.contains(&slot))
                })
        })
    }

    /// Streams whose other end died or restarted end at once (the kernel resets the
    /// connection); a paused or cut peer is noticed only by timeouts.
    fn reset_streams(&mut self, node: usize) {
        let alive: Vec<(bool, u32)> = self
            .nodes
            .iter()
            .map(|n| (n.alive, n.incarnation))
            .collect();
        let pres = &mut self.nodes[node].pres;
        let gone = |f: &Follower| alive[f.replica] != (true, f.replica_incarnation);
        let lost = pres
            .followers
            .iter()
            .filter(|f| gone(f) && f.in_sync)
            .count();
        pres.cut_gen += lost as u64;
        pres.followers.retain(|f| !gone(f));
        for f in &mut pres.following {
            if f.stream.is_some() && alive[f.primary] != (true, f.primary_incarnation) {
                f.stream = None;
                f.synced = false;
            }
        }
    }

    /// At the end: every uid's sessions as its slot's primary (in the coordinator's table)
    /// holds them, as a last lookup of each uid.
    pub(super) fn presence_final_reads(&mut self) {
        let Some(kv) = self
            .coord
            .get(&imstate_cluster::Keys::new(super::CLUSTER).route())
        else {
            return;
        };
        let Ok(table) = serde_json::from_slice::<imstate_cluster::RouteTable>(&kv.value) else {
            return;
        };
        let Some(presence) = table.presence else {
            return;
        };
        let at = self.now_us + 1;
        let mut calls = Vec::new();
        for client in &self.pclients {
            for &uid in &client.uids {
                let Some(range) = presence.range(presence.slot_of(uid)) else {
                    continue;
                };
                let primary = &self.nodes[node_index(&range.primary)];
                if !primary.alive {
                    continue;
                }
                let shown = primary
                    .pres
                    .sessions
                    .get(&uid)
                    .map(|set| set.iter().copied().collect())
                    .unwrap_or_default();
                calls.push(PresenceCall {
                    uid,
                    op: PresenceOp::Lookup,
                    start_us: at,
                    end_us: at,
                    outcome: PresenceOutcome::Ok(shown),
                });
            }
        }
        self.phistory.extend(calls);
    }
}
