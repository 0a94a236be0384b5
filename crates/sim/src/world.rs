//! The simulated world: a scheduler of timed events over nodes, clients, the coordinator and
//! the fault schedule. Everything random comes from one `SmallRng` seeded by the config.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use imstate_check::seq::{Outcome, SeqCall};
use imstate_cluster::{
    Access, Arbiter, Effect, LeaseRules, Member, MemberInfo, RATE_SKEW_MAX, RaiseOp, RaiseOutcome,
    Token,
};
use imstate_coord::sim::{SimClock, SimCoordinator};
use imstate_coord::{Millis, Op, Request, Response, Txn};
use imstate_seq::{Alloc, Allocator, AllocatorOptions, NamespaceDef, NsId, Raise};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::Serve;
use crate::presence::PresenceCall;

mod presence;

pub use presence::PresenceSim;
use presence::{PClient, PReply, Pres, StreamBody};

const NAMESPACE: &str = "default";
const CLUSTER: &str = "sim";

/// What one run simulates.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// The seed: the same seed replays the same run.
    pub seed: u64,
    /// Nodes in the cluster.
    pub nodes: usize,
    /// Clients, each with one call in flight at a time.
    pub clients: usize,
    /// Simulated time, ms.
    pub duration_ms: u64,
    /// The lease TTL, ms.
    pub ttl_ms: u64,
    /// Fault events over the run (at least this many).
    pub faults: usize,
    /// Sections of the namespace.
    pub sections: u64,
    /// Ids per section.
    pub section_size: u64,
    /// The namespace's step: small, so raises (and their fence) are frequent.
    pub step: u64,
    /// Presence slots the arbiter places. Every tick, each node records which slots it would
    /// take a write for; the S3 checker sees them as sections from [`SLOT_SECTIONS`] on.
    pub slots: u32,
    /// Presence data: clients log sessions in and out and look them up, replicas follow
    /// their primaries, and faults come one at a time once every slot has an in-sync
    /// replica (`None`: slots keep no data, faults as scheduled by the seed).
    pub presence: Option<PresenceSim>,
}

/// Where presence slots start in the serve log's section numbers (apart from real sections).
pub const SLOT_SECTIONS: u64 = 1 << 40;

impl SimConfig {
    /// The CI configuration for `seed`: 3 nodes, 3 clients, 40 simulated seconds, a 3 s lease,
    /// 16 fault events scheduled (a few fall on a node already down and do nothing), 12
    /// sections of 4 ids, step 5.
    pub fn for_seed(seed: u64) -> Self {
        Self {
            seed,
            nodes: 3,
            clients: 3,
            duration_ms: 40_000,
            ttl_ms: 3_000,
            faults: 16,
            sections: 12,
            section_size: 4,
            step: 5,
            slots: 6,
            presence: None,
        }
    }

    /// The CI configuration of the presence simulation for `seed`: 3 nodes, a 1.5 s lease,
    /// 8 presence slots, 4 presence clients of 6 uids each, one seq client, 120 simulated
    /// seconds; faults one at a time, each once every slot has an in-sync replica again.
    pub fn presence_for_seed(seed: u64, require_replica: bool) -> Self {
        Self {
            clients: 1,
            duration_ms: 120_000,
            ttl_ms: 1_500,
            slots: 8,
            presence: Some(PresenceSim {
                clients: 4,
                uids_per_client: 6,
                require_replica,
            }),
            ..Self::for_seed(seed)
        }
    }
}

/// What a run found.
#[derive(Debug, Default)]
pub struct Report {
    /// The seed.
    pub seed: u64,
    /// S1 violations in the clients' history.
    pub s1: Vec<String>,
    /// S3 violations in the serve log.
    pub s3: Vec<String>,
    /// Calls that returned a value.
    pub calls_ok: usize,
    /// Calls that failed or timed out (outcome unknown).
    pub calls_unknown: usize,
    /// The faults injected (and restarts), in order, for the replay log.
    pub faults: Vec<String>,
    /// Fault events injected (restarts and heals not counted).
    pub fault_events: usize,
    /// Coordinator writes over the run.
    pub coordinator_writes: u64,
    /// Raise txns that the coordinator refused on their fence.
    pub raises_fenced: u64,
    /// Route tables written by arbiters.
    pub route_writes: u64,
    /// Node ticks at which a node would take presence writes for a slot (one per slot).
    pub slot_serves: usize,
    /// Times a slot's writes passed to another node while the node that took them before
    /// was still running (a planned handover: a drain or a balancing move to an in-sync
    /// replica), which the S3 checker watches like any other.
    pub slot_handovers_live: usize,
    /// Presence violations: acknowledged logins lost, sessions resurrected after their
    /// acknowledged logout, sessions shown that were never sent ([`crate::check_presence`]).
    pub presence: Vec<String>,
    /// Presence writes (logins and logouts) acknowledged.
    pub presence_writes: usize,
    /// Presence lookups answered.
    pub presence_lookups: usize,
    /// Presence calls whose outcome is unknown.
    pub presence_unknown: usize,
    /// Snapshots primaries sent to replicas.
    pub presence_snapshots: usize,
    /// Replicas cut off by a primary after the ack timeout.
    pub presence_cutoffs: usize,
}

impl Report {
    /// Whether no invariant was violated.
    pub fn clean(&self) -> bool {
        self.s1.is_empty() && self.s3.is_empty() && self.presence.is_empty()
    }
}

#[derive(Debug)]
enum NodeMsg {
    Coord {
        token: Token,
        response: Response,
    },
    Call {
        client: usize,
        call: u64,
        id: u64,
    },
    PresenceCall {
        client: usize,
        call: u64,
        uid: u64,
        op: crate::presence::PresenceOp,
    },
    Follow {
        replica: usize,
        stream: u64,
        slots: std::collections::BTreeSet<u32>,
        resume: Option<(u64, u64)>,
    },
    Stream {
        stream: u64,
        seq: u64,
        body: StreamBody,
    },
    Ack {
        stream: u64,
        lsn: u64,
    },
    /// The replica closed the stream (its connection ends).
    Close {
        stream: u64,
    },
}

#[derive(Debug)]
enum Reply {
    Ok(u64),
    Redirect(usize),
    Unavailable,
}

#[derive(Debug)]
enum Fault {
    Crash {
        node: usize,
        down_ms: u64,
    },
    Restart {
        node: usize,
    },
    Pause {
        node: usize,
        ms: u64,
    },
    Resume {
        node: usize,
    },
    Partition {
        node: usize,
        ms: u64,
    },
    Heal {
        node: usize,
    },
    Slow {
        node: usize,
        extra_ms: u64,
        ms: u64,
    },
    Fast {
        node: usize,
    },
    Stall {
        node: usize,
        ms: u64,
    },
    EarlyLeaseEnd {
        node: usize,
    },
    /// The link between two nodes drops everything for a while.
    Cut {
        a: usize,
        b: usize,
        ms: u64,
    },
    Uncut {
        a: usize,
        b: usize,
    },
}

#[derive(Debug)]
enum Event {
    Tick {
        node: usize,
    },
    CoordExpire,
    AtCoord {
        node: usize,
        incarnation: u32,
        token: Token,
        request: Request,
    },
    AtNode {
        node: usize,
        incarnation: u32,
        msg: NodeMsg,
    },
    AtClient {
        client: usize,
        call: u64,
        reply: Reply,
    },
    ClientSend {
        client: usize,
    },
    ClientRetry {
        client: usize,
        call: u64,
    },
    ClientTimeout {
        client: usize,
        call: u64,
        attempt: u32,
    },
    RequestTimeout {
        node: usize,
        incarnation: u32,
        token: Token,
    },
    Fault(Fault),
    /// Presence mode: inject the next fault once the cluster has settled.
    FaultPoll,
    AtPresenceClient {
        client: usize,
        call: u64,
        reply: PReply,
    },
    PresenceSend {
        client: usize,
    },
    PresenceRetry {
        client: usize,
        call: u64,
    },
    PresenceTimeout {
        client: usize,
        call: u64,
        attempt: u32,
    },
}

/// Why a node sent a coordinator request.
#[derive(Debug)]
enum Purpose {
    Member,
    Arbiter,
    /// An in-sync report (its answer is not needed).
    Report,
    /// A primary's counted report: the cut generation it covers, and what it says.
    Counted(u64, Vec<imstate_cluster::CountedRange>),
    Raise(Vec<Raise>, Vec<RaiseOp>),
    Load(u64),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LoadState {
    Loading,
    /// Loaded; the section key's mod revision as this node last saw it.
    Loaded(i64),
}

struct Pending {
    client: usize,
    call: u64,
    id: u64,
    section: u64,
    deadline: Millis,
}

struct Node {
    incarnation: u32,
    alive: bool,
    paused: bool,
    deferred: Vec<NodeMsg>,
    partitioned: bool,
    extra_delay_ms: u64,
    /// The next raise sent is held this long on its way (a stalled request).
    stall_next_raise_ms: Option<u64>,
    /// The node's monotonic clock: true time from its own origin, at its own rate.
    clock: SimClock,
    member: Member,
    arbiter: Arbiter,
    allocator: Allocator,
    ns: NsId,
    loaded: BTreeMap<u64, LoadState>,
    pending: Vec<Pending>,
    purposes: BTreeMap<Token, Purpose>,
    next_token: Token,
    pres: Pres,
}

impl Node {
    fn new(
        index: usize,
        incarnation: u32,
        config: &SimConfig,
        now_us: u64,
        true_time: &Arc<AtomicU64>,
        rng: &mut SmallRng,
    ) -> Self {
        let rules = LeaseRules::new(config.ttl_ms);
        let info = MemberInfo {
            node: format!("n{index}"),
            grpc: format!("10.0.0.{index}:7700"),
            wire: format!("10.0.0.{index}:7702"),
            version: "sim".into(),
        };
        let mut allocator = Allocator::new(AllocatorOptions::default());
        let ns = allocator
            .add_namespace(namespace_def(config))
            .expect("valid namespace");
        Self {
            incarnation,
            alive: true,
            paused: false,
            deferred: Vec::new(),
            partitioned: false,
            extra_delay_ms: 0,
            stall_next_raise_ms: None,
            clock: SimClock::new(
                Arc::clone(true_time),
                now_us,
                rng.gen_range(1_000_000..2_000_000),
                1.0 + rng.gen_range(-RATE_SKEW_MAX..=RATE_SKEW_MAX),
            ),
            member: Member::new(CLUSTER, &info, rules),
            arbiter: Arbiter::new(CLUSTER, &info.node, config.ttl_ms / 10, 4)
                .with_cooldown(rules.lock_delay_ms())
                .with_presence_slots(config.slots),
            allocator,
            ns,
            loaded: BTreeMap::new(),
            pending: Vec::new(),
            purposes: BTreeMap::new(),
            next_token: 1 << 60,
            pres: Pres::new(index),
        }
    }

    fn now(&self, real_us: u64) -> Millis {
        self.clock.at(real_us)
    }
}

fn namespace_def(config: &SimConfig) -> NamespaceDef {
    NamespaceDef {
        name: NAMESPACE.into(),
        id_lo: 0,
        id_hi: config.sections * config.section_size,
        section_size: config.section_size,
        step: config.step,
        keys: imstate_seq::KeyKind::Numeric,
    }
}

struct Call {
    id: u64,
    start_us: u64,
    attempt: u32,
    target: usize,
}

struct Client {
    hint: BTreeMap<u64, usize>,
    call: Option<(u64, Call)>,
    next_call: u64,
}

struct World {
    config: SimConfig,
    rng: SmallRng,
    now_us: u64,
    /// `now_us`, shared with the nodes' clocks ([`SimClock`] reads it).
    true_time: Arc<AtomicU64>,
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    events: BTreeMap<u64, Event>,
    next_event: u64,
    coord: SimCoordinator,
    nodes: Vec<Node>,
    clients: Vec<Client>,
    history: Vec<SeqCall>,
    serves: Vec<Serve>,
    /// The node (and its incarnation) that last took writes for each presence slot.
    slot_takers: Vec<Option<(usize, u32)>>,
    report: Report,
    presence: Option<PresenceSim>,
    pclients: Vec<PClient>,
    phistory: Vec<PresenceCall>,
    /// Node pairs (low, high) whose link drops everything.
    cuts: std::collections::BTreeSet<(usize, usize)>,
    /// When the last message on each directed node link arrives (links are FIFO, like TCP).
    link_last: BTreeMap<(usize, usize), u64>,
    next_stream: u64,
    next_session: u64,
    /// Presence mode: when the cluster was first seen settled since the last fault, and the
    /// quiet time to wait after that.
    settled_since: Option<u64>,
    quiet_us: u64,
}

/// Runs one simulation and checks it.
pub fn run(config: &SimConfig) -> Report {
    let mut rng = SmallRng::seed_from_u64(config.seed);
    let true_time = Arc::new(AtomicU64::new(0));
    let mut coord = SimCoordinator::new();
    let spec = serde_json::json!({ "sections": config.sections, "section_size": config.section_size, "step": config.step });
    coord.handle(
        0,
        &Request::Txn(Txn {
            success: vec![Op::put(
                imstate_cluster::Keys::new(CLUSTER).namespace(NAMESPACE),
                serde_json::to_vec(&spec).expect("json"),
            )],
            ..Txn::default()
        }),
    );
    let nodes = (0..config.nodes)
        .map(|index| Node::new(index, 0, config, 0, &true_time, &mut rng))
        .collect();
    let clients = (0..config.clients)
        .map(|_| Client {
            hint: BTreeMap::new(),
            call: None,
            next_call: 0,
        })
        .collect();
    let mut world = World {
        config: config.clone(),
        rng,
        now_us: 0,
        true_time,
        queue: BinaryHeap::new(),
        events: BTreeMap::new(),
        next_event: 0,
        coord,
        nodes,
        clients,
        history: Vec::new(),
        serves: Vec::new(),
        slot_takers: vec![None; config.slots as usize],
        report: Report {
            seed: config.seed,
            ..Report::default()
        },
        presence: config.presence.clone(),
        pclients: config.presence.as_ref().map_or(Vec::new(), |p| {
            (0..p.clients)
                .map(|index| PClient::new(index, p.uids_per_client))
                .collect()
        }),
        phistory: Vec::new(),
        cuts: Default::default(),
        link_last: BTreeMap::new(),
        next_stream: 1,
        next_session: 0,
        settled_since: None,
        quiet_us: 0,
    };
    world.start();
    world.run();
    world.finish()
}

impl World {
    fn at(&mut self, delay_us: u64, event: Event) {
        let id = self.next_event;
        self.next_event += 1;
        self.queue.push(Reverse((self.now_us + delay_us, id)));
        self.events.insert(id, event);
    }

    fn start(&mut self) {
        for node in 0..self.nodes.len() {
            let jitter = self.rng.gen_range(0..10_000);
            self.at(jitter, Event::Tick { node });
        }
        self.at(10_000, Event::CoordExpire);
        // Clients start once the cluster had time to form; faults after that.
        for client in 0..self.clients.len() {
            let start = 4_000_000 + self.rng.gen_range(0..100_000);
            self.at(start, Event::ClientSend { client });
        }
        for client in 0..self.pclients.len() {
            let start = 4_000_000 + self.rng.gen_range(0..100_000);
            self.at(start, Event::PresenceSend { client });
        }
        if self.presence.is_some() {
            self.at(8_000_000, Event::FaultPoll);
            return;
        }
        let duration_us = self.config.duration_ms * 1000;
        let first = 8_000_000u64.min(duration_us / 4);
        let last = duration_us.saturating_sub(8_000_000).max(first + 1);
        let ttl = self.config.ttl_ms;
        for _ in 0..self.config.faults {
            let when = self.rng.gen_range(first..last);
            let node = self.rng.gen_range(0..self.nodes.len());
            let fault = match self.rng.gen_range(0..7) {
                0 => Fault::Crash {
                    node,
                    down_ms: self.rng.gen_range(500..2 * ttl),
                },
                1 => Fault::Pause {
                    node,
                    ms: self.rng.gen_range(ttl * 3 / 2..ttl * 3),
                },
                2 => Fault::Partition {
                    node,
                    ms: self.rng.gen_range(ttl / 2..ttl * 3),
                },
                3 => Fault::Slow {
                    node,
                    extra_ms: self.rng.gen_range(50..2 * ttl),
                    ms: self.rng.gen_range(1_000..5_000),
                },
                4 => Fault::EarlyLeaseEnd { node },
                5 => Fault::Stall {
                    node,
                    ms: self.rng.gen_range(ttl..4 * ttl),
                },
                _ => Fault::Pause {
                    node,
                    ms: self.rng.gen_range(ttl / 4..ttl),
                },
            };
            self.at(when, Event::Fault(fault));
        }
    }

    fn run(&mut self) {
        let end_us = self.config.duration_ms * 1000;
        while let Some(Reverse((at, id))) = self.queue.pop() {
            if at > end_us {
                break;
            }
            self.now_us = at;
            self.true_time.store(at, Ordering::Release);
            let event = self.events.remove(&id).expect("scheduled");
            self.handle(event);
        }
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Tick { node } => self.tick(node),
            Event::CoordExpire => {
                self.coord.expire(self.now_us / 1000);
                self.at(10_000, Event::CoordExpire);
            }
            Event::AtCoord {
                node,
                incarnation,
                token,
                request,
            } => {
                let response = self.coord.handle(self.now_us / 1000, &request);
                let delay = self.link_delay(node);
                if let Some(delay) = delay {
                    self.at(
                        delay,
                        Event::AtNode {
                            node,
                            incarnation,
                            msg: NodeMsg::Coord { token, response },
                        },
                    );
                }
            }
            Event::AtNode {
                node,
                incarnation,
                msg,
            } => {
                let target = &mut self.nodes[node];
                if !target.alive || target.incarnation != incarnation {
                    return;
                }
                if target.paused {
                    target.deferred.push(msg);
                    return;
                }
                self.deliver(node, msg);
            }
            Event::AtClient {
                client,
                call,
                reply,
            } => self.client_reply(client, call, reply),
            Event::ClientSend { client } => self.client_send(client),
            Event::ClientRetry { client, call } => self.client_attempt(client, call),
            Event::ClientTimeout {
                client,
                call,
                attempt,
            } => {
                let current = self.clients[client]
                    .call
                    .as_ref()
                    .is_some_and(|(id, c)| *id == call && c.attempt == attempt);
                if current {
                    // No answer: try another node.
                    let target = self.rng.gen_range(0..self.nodes.len());
                    if let Some((_, c)) = self.clients[client].call.as_mut() {
                        c.target = target;
                    }
                    self.client_attempt(client, call);
                }
            }
            Event::RequestTimeout {
                node,
                incarnation,
                token,
            } => {
                let target = &mut self.nodes[node];
                if !target.alive || target.incarnation != incarnation || target.paused {
                    return;
                }
                match target.purposes.remove(&token) {
                    Some(Purpose::Raise(raises, _)) => {
                        for raise in raises {
                            target.allocator.raise_failed(raise);
                        }
                    }
                    Some(Purpose::Load(section))
                        if target.loaded.get(&section) == Some(&LoadState::Loading) =>
                    {
                        target.loaded.remove(&section);
                    }
                    Some(Purpose::Load(_)) => {}
                    Some(other) => {
                        target.purposes.insert(token, other);
                    }
                    None => {}
                }
            }
            Event::Fault(fault) => self.fault(fault),
            Event::FaultPoll => self.fault_poll(),
            Event::AtPresenceClient {
                client,
                call,
                reply,
            } => self.presence_client_reply(client, call, reply),
            Event::PresenceSend { client } => self.presence_client_send(client),
            Event::PresenceRetry { client, call } => self.presence_attempt(client, call),
            Event::PresenceTimeout {
                client,
                call,
                attempt,
            } => self.presence_timeout(client, call, attempt),
        }
    }

    /// Delay of one message between node `node` and the coordinator, `None` when dropped.
    fn link_delay(&mut self, node: usize) -> Option<u64> {
        let target = &self.nodes[node];
        if target.partitioned {
            return None;
        }
        let base = self.rng.gen_range(500..4_000);
        Some(base + target.extra_delay_ms * 1000)
    }

    fn tick(&mut self, node: usize) {
        let target = &self.nodes[node];
        if !target.alive || target.paused {
            return;
        }
        let now = target.now(self.now_us);
        let effects = self.nodes[node].member.poll(now);
        self.apply(node, effects, Purpose::Member);
        let lease = self.nodes[node]
            .member
            .registered()
            .then(|| self.nodes[node].member.lease())
            .flatten();
        let effects = self.nodes[node].arbiter.poll(now, lease);
        self.apply(node, effects, Purpose::Arbiter);
        self.retry_pending(node);
        self.probe_slots(node, now);
        if self.presence.is_some() {
            self.presence_tick(node, now);
        } else if self.rng.gen_range(0..100) == 0 {
            self.report_in_sync(node);
        }
        self.at(10_000, Event::Tick { node });
    }

    /// Presence slots keep no state in the simulation, so a replica is in sync as soon as it
    /// has its table: it says so for every range it is replica of (about once a second), and
    /// the arbiter moves primary roles to it (balance after restarts) through handovers that
    /// the S3 checker watches.
    fn report_in_sync(&mut self, node: usize) {
        let member = &self.nodes[node].member;
        let me = member.node().to_owned();
        let mut ranges = Vec::new();
        let mut counted = Vec::new();
        let presence = member.route().and_then(|table| table.presence.as_ref());
        for range in presence.into_iter().flat_map(|presence| &presence.ranges) {
            let roles = [
                (&range.replica, range.replica_since),
                (&range.joining, range.joining_since),
            ];
            for (replica, since) in roles {
                let Some(replica) = replica else { continue };
                if *replica == me {
                    ranges.push(imstate_cluster::InSyncRange {
                        start: range.start,
                        end: range.end,
                        primary: range.primary.clone(),
                        replica_since: since,
                        lapsed: false,
                    });
                }
                // As primary it counts every replica in sync too.
                if range.primary == me {
                    counted.push(imstate_cluster::CountedRange {
                        start: range.start,
                        end: range.end,
                        replica: replica.clone(),
                        replica_since: since,
                    });
                }
            }
        }
        self.publish_in_sync(node, ranges);
        let key = imstate_cluster::Keys::new(CLUSTER).counted(&me);
        let value = serde_json::to_vec(&counted).expect("encodes");
        self.put_leased(node, key, value, Vec::new(), Purpose::Report);
    }

    /// Publishes `insync/<node>` (bound to the node's lease), as a node's follower manager does.
    fn publish_in_sync(&mut self, node: usize, ranges: Vec<imstate_cluster::InSyncRange>) {
        let key = imstate_cluster::Keys::new(CLUSTER).in_sync(self.nodes[node].member.node());
        let value = serde_json::to_vec(&ranges).expect("encodes");
        self.put_leased(node, key, value, Vec::new(), Purpose::Report);
    }

    /// Sends a txn that puts `value` at `key` bound to the node's lease, then runs `then`;
    /// `false` (nothing sent) while the node has no lease.
    fn put_leased(
        &mut self,
        node: usize,
        key: String,
        value: Vec<u8>,
        then: Vec<imstate_coord::Op>,
        purpose: Purpose,
    ) -> bool {
        let member = &self.nodes[node].member;
        let Some(lease) = member.registered().then(|| member.lease()).flatten() else {
            return false;
        };
        let mut success = vec![imstate_coord::Op::Put {
            key,
            value,
            lease: Some(lease),
        }];
        success.extend(then);
        let txn = Txn {
            success,
            ..Txn::default()
        };
        let target = &mut self.nodes[node];
        let token = target.next_token;
        target.next_token += 1;
        self.send(node, token, Request::Txn(txn), purpose);
        true
    }

    /// Records every presence slot this node would take a write for now (S3 for slots: a
    /// deposed primary must not).
    fn probe_slots(&mut self, node: usize, now: Millis) {
        for slot in 0..self.config.slots {
            if let Access::Serve { tenure } =
                self.nodes[node].member.access_slot(now, u64::from(slot))
            {
                self.serves.push(Serve {
                    section: SLOT_SECTIONS + u64::from(slot),
                    node,
                    incarnation: self.nodes[node].incarnation,
                    tenure,
                    at_us: self.now_us,
                });
                self.report.slot_serves += 1;
                let incarnation = self.nodes[node].incarnation;
                if let Some((before, before_incarnation)) = self.slot_takers[slot as usize]
                    && before != node
                    && self.nodes[before].alive
                    && self.nodes[before].incarnation == before_incarnation
                {
                    self.report.slot_handovers_live += 1;
                }
                self.slot_takers[slot as usize] = Some((node, incarnation));
            }
        }
    }

    /// Sends requests and unloads lost sections.
    fn apply(&mut self, node: usize, effects: Vec<Effect>, purpose: Purpose) {
        let mut purpose = Some(purpose);
        for effect in effects {
            match effect {
                Effect::Send { token, request } => {
                    let purpose = match purpose.take() {
                        Some(purpose) => purpose,
                        None => Purpose::Member,
                    };
                    self.send(node, token, request, purpose);
                }
                Effect::Lost { start, end, .. } => {
                    for section in start..end {
                        self.unload(node, section);
                    }
                }
                // Presence slots keep no state in the simulation: only who takes writes.
                Effect::LostSlots { .. } => {}
                Effect::LostAll => {
                    let sections: Vec<u64> = (0..self.config.sections).collect();
                    for section in sections {
                        self.unload(node, section);
                    }
                }
            }
        }
    }

    fn send(&mut self, node: usize, token: Token, request: Request, purpose: Purpose) {
        let target = &mut self.nodes[node];
        let mut stall = 0;
        if matches!(purpose, Purpose::Raise(..) | Purpose::Load(_)) {
            if matches!(purpose, Purpose::Raise(..)) {
                stall = target.stall_next_raise_ms.take().unwrap_or(0) * 1000;
            }
            // A node gives up on a raise or a load after a second (its own clock, roughly).
            let incarnation = target.incarnation;
            self.at(
                1_000_000,
                Event::RequestTimeout {
                    node,
                    incarnation,
                    token,
                },
            );
        }
        let target = &mut self.nodes[node];
        target.purposes.insert(token, purpose);
        let incarnation = target.incarnation;
        if let Some(delay) = self.link_delay(node) {
            let delay = delay + stall;
            self.at(
                delay,
                Event::AtCoord {
                    node,
                    incarnation,
                    token,
                    request,
                },
            );
        }
    }

    fn unload(&mut self, node: usize, section: u64) {
        let target = &mut self.nodes[node];
        let ns = target.ns;
        target.allocator.unload_section(ns, section);
        target.loaded.remove(&section);
        let (lost, kept): (Vec<Pending>, Vec<Pending>) = std::mem::take(&mut target.pending)
            .into_iter()
            .partition(|pending| pending.section == section);
        target.pending = kept;
        for pending in lost {
            self.reply(pending.client, pending.call, Reply::Unavailable);
        }
    }

    fn deliver(&mut self, node: usize, msg: NodeMsg) {
        let now = self.nodes[node].now(self.now_us);
        match msg {
            NodeMsg::Call { client, call, id } => {
                let section = id / self.config.section_size;
                let deadline = now + 1_000;
                self.nodes[node].pending.push(Pending {
                    client,
                    call,
                    id,
                    section,
                    deadline,
                });
                self.retry_pending(node);
            }
            NodeMsg::PresenceCall {
                client,
                call,
                uid,
                op,
            } => self.on_presence_call(node, client, call, uid, op),
            NodeMsg::Follow {
                replica,
                stream,
                slots,
                resume,
            } => self.on_follow(node, replica, stream, slots, resume),
            NodeMsg::Stream { stream, seq, body } => self.on_stream(node, stream, seq, body),
            NodeMsg::Ack { stream, lsn } => self.on_ack(node, stream, lsn),
            NodeMsg::Close { stream } => self.on_close(node, stream),
            NodeMsg::Coord { token, response } => {
                let Some(purpose) = self.nodes[node].purposes.remove(&token) else {
                    return;
                };
                match purpose {
                    Purpose::Member => {
                        let effects = self.nodes[node].member.on_response(now, token, &response);
                        self.apply(node, effects, Purpose::Member);
                    }
                    Purpose::Arbiter => {
                        let before = self.nodes[node].arbiter.writes;
                        let effects = self.nodes[node].arbiter.on_response(now, token, &response);
                        self.report.route_writes += self.nodes[node].arbiter.writes - before;
                        self.apply(node, effects, Purpose::Arbiter);
                    }
                    Purpose::Report => {}
                    Purpose::Counted(generation, ranges) => {
                        let answer = match &response {
                            Response::Txn(txn) => Some(txn),
                            _ => None,
                        };
                        self.counted_published(node, generation, ranges, answer);
                    }
                    Purpose::Raise(raises, ops) => self.raised(node, now, raises, ops, &response),
                    Purpose::Load(section) => {
                        let target = &mut self.nodes[node];
                        if target.loaded.get(&section) != Some(&LoadState::Loading) {
                            return;
                        }
                        match &response {
                            Response::Txn(txn) => match Member::loaded_max_seq(txn) {
                                Ok((max_seq, revision)) => {
                                    let ns = target.ns;
                                    target.allocator.load_section(ns, section, max_seq);
                                    target.loaded.insert(section, LoadState::Loaded(revision));
                                }
                                Err(_) => {
                                    target.loaded.remove(&section);
                                }
                            },
                            _ => {
                                target.loaded.remove(&section);
                            }
                        }
                        self.retry_pending(node);
                    }
                }
            }
        }
    }

    fn raised(
        &mut self,
        node: usize,
        now: Millis,
        raises: Vec<Raise>,
        ops: Vec<RaiseOp>,
        response: &Response,
    ) {
        let outcome = match response {
            Response::Txn(txn) => self.nodes[node].member.on_raise_response(now, &ops, txn),
            _ => RaiseOutcome::Fenced {
                effects: Vec::new(),
            },
        };
        let target = &mut self.nodes[node];
        let ns = target.ns;
        match outcome {
            RaiseOutcome::Durable { revision } => {
                for raise in raises {
                    if matches!(
                        target.loaded.get(&raise.section),
                        Some(LoadState::Loaded(_))
                    ) {
                        target.allocator.raise_durable(raise);
                        target
                            .loaded
                            .insert(raise.section, LoadState::Loaded(revision));
                    }
                }
            }
            RaiseOutcome::Stale { current } => {
                self.report.raises_fenced += 1;
                for raise in &raises {
                    target.allocator.raise_failed(*raise);
                }
                for (_, section, max_seq, revision) in current {
                    if matches!(target.loaded.get(&section), Some(LoadState::Loaded(_))) {
                        // What the coordinator holds is durable: serve below it, raise above.
                        target.allocator.raise_durable(Raise {
                            ns,
                            section,
                            max_seq,
                        });
                        target.loaded.insert(section, LoadState::Loaded(revision));
                    }
                }
            }
            RaiseOutcome::Fenced { effects } => {
                if matches!(response, Response::Txn(_)) {
                    self.report.raises_fenced += 1;
                }
                for raise in &raises {
                    target.allocator.raise_failed(*raise);
                }
                self.apply(node, effects, Purpose::Member);
            }
        }
        self.retry_pending(node);
    }

    /// Serves what can be served of the node's waiting calls.
    fn retry_pending(&mut self, node: usize) {
        let now = self.nodes[node].now(self.now_us);
        let pending = std::mem::take(&mut self.nodes[node].pending);
        let mut waiting = Vec::new();
        let mut raises = Vec::new();
        for call in pending {
            if now >= call.deadline {
                self.reply(call.client, call.call, Reply::Unavailable);
                continue;
            }
            let access = self.nodes[node].member.access(now, NAMESPACE, call.section);
            let tenure = match access {
                Access::Redirect { owner, .. } => {
                    let owner = owner[1..].parse().unwrap_or(0);
                    self.reply(call.client, call.call, Reply::Redirect(owner));
                    continue;
                }
                Access::Unavailable { .. } => {
                    self.reply(call.client, call.call, Reply::Unavailable);
                    continue;
                }
                Access::Serve { tenure } => tenure,
            };
            let target = &mut self.nodes[node];
            match target.loaded.get(&call.section) {
                Some(LoadState::Loaded(_)) => {}
                Some(LoadState::Loading) => {
                    waiting.push(call);
                    continue;
                }
                None => {
                    target.loaded.insert(call.section, LoadState::Loading);
                    let txn = target.member.load_txn(NAMESPACE, call.section);
                    let token = target.next_token;
                    target.next_token += 1;
                    let section = call.section;
                    waiting.push(call);
                    self.send(node, token, Request::Txn(txn), Purpose::Load(section));
                    continue;
                }
            }
            match target.allocator.next(NAMESPACE, call.id) {
                Ok(Alloc::Served {
                    seqs,
                    raises: ahead,
                }) => {
                    raises.extend(ahead);
                    let incarnation = target.incarnation;
                    self.serves.push(Serve {
                        section: call.section,
                        node,
                        incarnation,
                        tenure,
                        at_us: self.now_us,
                    });
                    self.reply(call.client, call.call, Reply::Ok(seqs[0]));
                }
                Ok(Alloc::Wait { raises: needed }) => {
                    raises.extend(needed);
                    waiting.push(call);
                }
                Err(_) => self.reply(call.client, call.call, Reply::Unavailable),
            }
        }
        self.nodes[node].pending.extend(waiting);
        if !raises.is_empty() {
            self.send_raises(node, raises);
        }
    }

    fn send_raises(&mut self, node: usize, raises: Vec<Raise>) {
        let target = &mut self.nodes[node];
        let Some(fence) = target.member.fence() else {
            for raise in raises {
                target.allocator.raise_failed(raise);
            }
            return;
        };
        let mut ops = Vec::new();
        let mut sent = Vec::new();
        for raise in raises {
            match target.loaded.get(&raise.section) {
                Some(LoadState::Loaded(revision)) => {
                    ops.push(RaiseOp {
                        namespace: NAMESPACE.into(),
                        section: raise.section,
                        max_seq: raise.max_seq,
                        revision: *revision,
                    });
                    sent.push(raise);
                }
                _ => target.allocator.raise_failed(raise),
            }
        }
        if ops.is_empty() {
            return;
        }
        let txn = target.member.raise_txn(fence, &ops);
        let token = target.next_token;
        target.next_token += 1;
        self.send(node, token, Request::Txn(txn), Purpose::Raise(sent, ops));
    }

    fn reply(&mut self, client: usize, call: u64, reply: Reply) {
        let delay = self.rng.gen_range(300..3_000);
        self.at(
            delay,
            Event::AtClient {
                client,
                call,
                reply,
            },
        );
    }

    // ----- clients -----------------------------------------------------------------------

    fn client_send(&mut self, client: usize) {
        let ids = self.config.sections * self.config.section_size;
        let id = self.rng.gen_range(0..ids);
        let section = id / self.config.section_size;
        let target = match self.clients[client].hint.get(&section) {
            Some(node) => *node,
            None => self.rng.gen_range(0..self.nodes.len()),
        };
        let state = &mut self.clients[client];
        let call = state.next_call;
        state.next_call += 1;
        state.call = Some((
            call,
            Call {
                id,
                start_us: self.now_us,
                attempt: 0,
                target,
            },
        ));
        self.client_attempt(client, call);
    }

    fn client_attempt(&mut self, client: usize, call: u64) {
        let Some((current, state)) = self.clients[client].call.as_mut() else {
            return;
        };
        if *current != call {
            return;
        }
        state.attempt += 1;
        // Give up after 3 s: the outcome is unknown (an attempt may have been served).
        if self.now_us >= state.start_us + 3_000_000 {
            self.finish_call(client, Outcome::Unknown);
            return;
        }
        let (node, id, attempt) = (state.target, state.id, state.attempt);
        let incarnation = self.nodes[node].incarnation;
        let delay = self.rng.gen_range(300..3_000);
        self.at(
            delay,
            Event::AtNode {
                node,
                incarnation,
                msg: NodeMsg::Call { client, call, id },
            },
        );
        self.at(
            500_000,
            Event::ClientTimeout {
                client,
                call,
                attempt,
            },
        );
    }

    fn client_reply(&mut self, client: usize, call: u64, reply: Reply) {
        let Some((current, state)) = self.clients[client].call.as_mut() else {
            return;
        };
        if *current != call {
            return;
        }
        match reply {
            Reply::Ok(value) => self.finish_call(client, Outcome::Ok(vec![value])),
            Reply::Redirect(owner) => {
                let section = state.id / self.config.section_size;
                state.target = owner;
                self.clients[client].hint.insert(section, owner);
                self.client_attempt(client, call);
            }
            Reply::Unavailable => {
                if self.rng.gen_bool(0.3) {
                    state.target = self.rng.gen_range(0..self.nodes.len());
                }
                self.at(50_000, Event::ClientRetry { client, call });
            }
        }
    }

    fn finish_call(&mut self, client: usize, outcome: Outcome) {
        let Some((_, state)) = self.clients[client].call.take() else {
            return;
        };
        match outcome {
            Outcome::Ok(_) | Outcome::Ranges { .. } => self.report.calls_ok += 1,
            Outcome::Unknown => self.report.calls_unknown += 1,
        }
        self.history.push(SeqCall {
            ids: vec![state.id],
            start_ns: state.start_us * 1000,
            end_ns: self.now_us * 1000,
            outcome,
        });
        let think = self.rng.gen_range(1_000..5_000);
        self.at(think, Event::ClientSend { client });
    }

    // ----- faults ------------------------------------------------------------------------

    fn fault(&mut self, fault: Fault) {
        let at_ms = self.now_us / 1000;
        let before = self.report.faults.len();
        let injected = !matches!(
            fault,
            Fault::Restart { .. }
                | Fault::Resume { .. }
                | Fault::Heal { .. }
                | Fault::Fast { .. }
                | Fault::Uncut { .. }
        );
        self.fault_inner(fault, at_ms);
        if injected && self.report.faults.len() > before {
            self.report.fault_events += 1;
        }
    }

    fn fault_inner(&mut self, fault: Fault, at_ms: u64) {
        match fault {
            Fault::Crash { node, down_ms } => {
                if !self.nodes[node].alive {
                    return;
                }
                self.report
                    .faults
                    .push(format!("{at_ms} ms: kill -9 n{node} for {down_ms} ms"));
                self.nodes[node].alive = false;
                self.at(down_ms * 1000, Event::Fault(Fault::Restart { node }));
            }
            Fault::Restart { node } => {
                let incarnation = self.nodes[node].incarnation + 1;
                let pres = std::mem::replace(&mut self.nodes[node].pres, Pres::new(node));
                self.nodes[node] = Node::new(
                    node,
                    incarnation,
                    &self.config,
                    self.now_us,
                    &self.true_time,
                    &mut self.rng,
                );
                // What the log holds survives: recovery replays it.
                self.nodes[node].pres = pres.recover();
                self.report
                    .faults
                    .push(format!("{at_ms} ms: n{node} restarts"));
                self.at(0, Event::Tick { node });
            }
            Fault::Pause { node, ms } => {
                let target = &mut self.nodes[node];
                if !target.alive || target.paused {
                    return;
                }
                target.paused = true;
                self.report
                    .faults
                    .push(format!("{at_ms} ms: SIGSTOP n{node} for {ms} ms"));
                self.at(ms * 1000, Event::Fault(Fault::Resume { node }));
            }
            Fault::Resume { node } => {
                let target = &mut self.nodes[node];
                if !target.alive || !target.paused {
                    return;
                }
                target.paused = false;
                let deferred = std::mem::take(&mut target.deferred);
                for msg in deferred {
                    self.deliver(node, msg);
                }
                self.at(0, Event::Tick { node });
            }
            Fault::Partition { node, ms } => {
                self.nodes[node].partitioned = true;
                self.report.faults.push(format!(
                    "{at_ms} ms: n{node} cut from the coordinator for {ms} ms"
                ));
                self.at(ms * 1000, Event::Fault(Fault::Heal { node }));
            }
            Fault::Heal { node } => self.nodes[node].partitioned = false,
            Fault::Slow { node, extra_ms, ms } => {
                self.nodes[node].extra_delay_ms = extra_ms;
                self.report.faults.push(format!(
                    "{at_ms} ms: n{node}'s coordinator link delayed {extra_ms} ms for {ms} ms"
                ));
                self.at(ms * 1000, Event::Fault(Fault::Fast { node }));
            }
            Fault::Fast { node } => self.nodes[node].extra_delay_ms = 0,
            Fault::Stall { node, ms } => {
                if !self.nodes[node].alive {
                    return;
                }
                self.nodes[node].stall_next_raise_ms = Some(ms);
                self.report.faults.push(format!(
                    "{at_ms} ms: n{node}'s next raise is held {ms} ms on its way"
                ));
            }
            Fault::Cut { a, b, ms } => {
                self.cuts.insert((a.min(b), a.max(b)));
                self.report.faults.push(format!(
                    "{at_ms} ms: the link between n{a} and n{b} drops everything for {ms} ms"
                ));
                self.at(ms * 1000, Event::Fault(Fault::Uncut { a, b }));
            }
            Fault::Uncut { a, b } => {
                self.cuts.remove(&(a.min(b), a.max(b)));
            }
            Fault::EarlyLeaseEnd { node } => {
                if let Some(lease) = self.nodes[node].member.lease() {
                    self.coord.set_lease_expiry(lease, at_ms);
                    self.coord.expire(at_ms);
                    self.report.faults.push(format!(
                        "{at_ms} ms: the coordinator ends n{node}'s lease early"
                    ));
                }
            }
        }
    }

    fn finish(mut self) -> Report {
        // Calls still open at the end are unknown.
        for client in 0..self.clients.len() {
            if self.clients[client].call.is_some() {
                self.finish_call(client, Outcome::Unknown);
            }
        }
        for client in 0..self.pclients.len() {
            self.presence_finish(client, crate::presence::PresenceOutcome::Unknown);
        }
        self.report.s1 = imstate_check::seq::check(&self.history)
            .iter()
            .map(|violation| format!("S1: {violation}"))
            .collect();
        self.report.s3 = crate::check_s3(&self.serves);
        if self.presence.is_some() {
            self.presence_final_reads();
            self.report.presence = crate::presence::check_presence(&self.phistory);
        }
        self.report.coordinator_writes = self.coord.writes();
        self.report
    }
}
