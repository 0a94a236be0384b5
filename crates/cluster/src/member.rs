//! A node's side of cluster mode, sans I/O: its lease, its registration, the route table it
//! serves under, which sections it may serve right now ([`Member::access`]), and the fenced
//! txns of its raises.
//!
//! The driver (the node, or the simulation) calls [`Member::poll`] on a timer and hands every
//! coordinator response to [`Member::on_response`]; both return [`Effect`]s: requests to send
//! and sections to unload. Time is the node's monotonic clock, in ms.
//!
//! ```text
//!  Granting ──lease──► Registering ──member key created──► Registered
//!      ▲                    │ key held by another lease: wait (it may be our previous run)
//!      └──── keep-alive says the lease is gone, or a confirm finds the member key gone
//!            (every section is lost: Effect::LostAll)
//! ```
//!
//! While registered, every [`LeaseRules::renew_every_ms`] the member sends a keep-alive (which
//! keeps the lease, for liveness) and a confirm txn (which proves the member key alive and
//! reads the route table, for safety: see [`crate::lease`]).

use std::collections::BTreeMap;

use imstate_coord::{
    Compare, KeyValue, LeaseId, Millis, Op, Request, Response, Txn, TxnResponse, decode_u64,
};
use serde::{Deserialize, Serialize};

use crate::keys::Keys;
use crate::lease::LeaseRules;
use crate::route::{NodeId, RouteTable};

/// What a node publishes about itself under its member key.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberInfo {
    /// The node id.
    pub node: NodeId,
    /// Its gRPC address (`--advertise`).
    pub grpc: String,
    /// Its wire-protocol address.
    pub wire: String,
    /// Its software version.
    pub version: String,
}

/// A request id, unique per member.
pub type Token = u64;

/// What the driver must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Send `request` to the coordinator; hand its response (or a failure) back with `token`.
    Send {
        /// Identifies the response.
        token: Token,
        /// The request.
        request: Request,
    },
    /// Sections `[start, end)` of `namespace` are no longer this node's: forget their state
    /// (a later gain reloads their `max_seq` from the coordinator).
    Lost {
        /// The namespace.
        namespace: String,
        /// First section.
        start: u64,
        /// One past the last.
        end: u64,
    },
    /// Presence slots `[start, end)` are no longer this node's as primary: it takes no write
    /// for them any more (what it holds of them is stale once another primary serves them).
    LostSlots {
        /// First slot.
        start: u32,
        /// One past the last.
        end: u32,
    },
    /// The lease is gone: every section and slot is lost.
    LostAll,
}

/// Whether a request for a section may be served here now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Access {
    /// Serve it. `tenure` identifies this node's current ownership of the section (the table
    /// version at which it got it).
    Serve {
        /// The version at which the owner got the section.
        tenure: u64,
    },
    /// Another node owns it.
    Redirect {
        /// The owner.
        owner: NodeId,
        /// The version of the table that says so.
        version: u64,
    },
    /// Nobody can serve it here now; try again (here or elsewhere) later.
    Unavailable {
        /// Why, for the client.
        reason: String,
    },
}

/// One section's raise: persist `max_seq` if the section's key is still at `revision` (the
/// mod revision this node last saw it at: from its load, or its own last raise; 0 when the
/// key did not exist).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RaiseOp {
    /// The namespace.
    pub namespace: String,
    /// The section.
    pub section: u64,
    /// The new ceiling.
    pub max_seq: u64,
    /// The key's mod revision as this node last saw it.
    pub revision: i64,
}

/// What became of a raise txn.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RaiseOutcome {
    /// Every ceiling is durable; the keys' new mod revision is `revision`.
    Durable {
        /// The mod revision of every written key.
        revision: i64,
    },
    /// This node still owns what it raised, but a section's key moved since it was read (an
    /// earlier raise of this node whose answer was lost, or a late one): here is what the
    /// coordinator holds, `(namespace, section, max_seq, revision)`, durable and safe to
    /// serve below; raise again from there.
    Stale {
        /// The keys as they are.
        current: Vec<(String, u64, u64, i64)>,
    },
    /// The ownership changed: the effects say what was lost.
    Fenced {
        /// Sections to unload.
        effects: Vec<Effect>,
    },
}

/// The ownership a raise is fenced on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fence {
    /// The create revision of this node's member key (its lease is alive while it exists).
    pub member_revision: i64,
    /// The mod revision of the route table this node serves under.
    pub route_revision: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Grant,
    Register,
    KeepAlive,
    Confirm,
}

const KINDS: usize = 4;

#[derive(Clone, Copy, Debug)]
struct Inflight {
    kind: Kind,
    sent_at: Millis,
}

/// The span namespace of this node's presence slots as primary: not a valid namespace name,
/// so the sections' and the slots' spans never mix.
const SLOTS: &str = "/presence-slots";

/// Sections (or, under [`SLOTS`], presence slots as primary) this node owns under the
/// installed table, and when it may serve them.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Span {
    namespace: String,
    start: u64,
    end: u64,
    since: u64,
    ready_at: Millis,
}

/// A node's membership state machine.
#[derive(Debug)]
pub struct Member {
    keys: Keys,
    node: NodeId,
    info: Vec<u8>,
    rules: LeaseRules,
    lease: Option<LeaseId>,
    member_revision: Option<i64>,
    inflight: BTreeMap<Token, Inflight>,
    next_token: Token,
    last_sent: [Option<Millis>; KINDS],
    confirmed_until: Millis,
    route: Option<(RouteTable, i64)>,
    route_error: Option<String>,
    spans: Vec<Span>,
    /// The members as the last confirm read them (for the owners' addresses).
    members: BTreeMap<NodeId, MemberInfo>,
    /// No table installed since this registration: every owned range waits the lock-delay.
    fresh: bool,
    blocked_by: Option<String>,
}

impl Member {
    /// A member of `cluster` for node `info.node`.
    pub fn new(cluster: &str, info: &MemberInfo, rules: LeaseRules) -> Self {
        Self {
            keys: Keys::new(cluster),
            node: info.node.clone(),
            info: serde_json::to_vec(info).expect("member info serializes"),
            rules,
            lease: None,
            member_revision: None,
            inflight: BTreeMap::new(),
            next_token: 1,
            last_sent: [None; KINDS],
            confirmed_until: 0,
            route: None,
            route_error: None,
            spans: Vec::new(),
            members: BTreeMap::new(),
            fresh: true,
            blocked_by: None,
        }
    }

    /// The members as last read (id to published info).
    pub fn members(&self) -> &BTreeMap<NodeId, MemberInfo> {
        &self.members
    }

    /// The node id.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The cluster's keys.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// The timing rules.
    pub fn rules(&self) -> LeaseRules {
        self.rules
    }

    /// The lease, once granted.
    pub fn lease(&self) -> Option<LeaseId> {
        self.lease
    }

    /// Whether the member key is registered.
    pub fn registered(&self) -> bool {
        self.member_revision.is_some()
    }

    /// The member key's holder when registration is refused because the id is taken.
    pub fn blocked_by(&self) -> Option<&str> {
        self.blocked_by.as_deref()
    }

    /// The installed route table.
    pub fn route(&self) -> Option<&RouteTable> {
        self.route.as_ref().map(|(table, _)| table)
    }

    /// Until when (this node's clock) the lease and the table are confirmed.
    pub fn confirmed_until(&self) -> Millis {
        self.confirmed_until
    }

    fn token(&mut self, kind: Kind, now: Millis) -> Token {
        let token = self.next_token;
        self.next_token += 1;
        self.inflight.insert(token, Inflight { kind, sent_at: now });
        self.last_sent[kind as usize] = Some(now);
        token
    }

    /// Whether a request of `kind` should go out now: none in flight younger than the request
    /// timeout, and none sent in the last `every` ms.
    fn due(&self, kind: Kind, now: Millis, every: Millis) -> bool {
        let timeout = self.rules.request_timeout_ms();
        let waiting = self
            .inflight
            .values()
            .any(|inflight| inflight.kind == kind && now < inflight.sent_at + timeout);
        !waiting && self.last_sent[kind as usize].is_none_or(|at| now >= at + every)
    }

    /// Sends what is due at `now`.
    pub fn poll(&mut self, now: Millis) -> Vec<Effect> {
        // Responses that never came (lost requests) stop counting after a while.
        let horizon = 20 * self.rules.ttl_ms;
        self.inflight
            .retain(|_, inflight| now < inflight.sent_at.saturating_add(horizon));
        let every = self.rules.renew_every_ms();
        let mut effects = Vec::new();
        match (self.lease, self.member_revision) {
            (None, _) => {
                if self.due(Kind::Grant, now, 0) {
                    let token = self.token(Kind::Grant, now);
                    let request = Request::LeaseGrant {
                        ttl_ms: self.rules.ttl_ms,
                    };
                    effects.push(Effect::Send { token, request });
                }
            }
            (Some(lease), None) => {
                // The lease must live while registration waits (another holder's lease may
                // take a TTL to lapse): a put on a lapsed lease fails.
                if self.due(Kind::KeepAlive, now, every) {
                    let token = self.token(Kind::KeepAlive, now);
                    let request = Request::KeepAlive { lease };
                    effects.push(Effect::Send { token, request });
                }
                if self.due(Kind::Register, now, every) {
                    let token = self.token(Kind::Register, now);
                    let key = self.keys.member(&self.node);
                    let txn = Txn {
                        compare: vec![Compare::created(key.clone(), 0)],
                        success: vec![Op::Put {
                            key: key.clone(),
                            value: self.info.clone(),
                            lease: Some(lease),
                        }],
                        failure: vec![Op::get(key)],
                    };
                    effects.push(Effect::Send {
                        token,
                        request: Request::Txn(txn),
                    });
                }
            }
            (Some(lease), Some(member_revision)) => {
                if self.due(Kind::KeepAlive, now, every) {
                    let token = self.token(Kind::KeepAlive, now);
                    let request = Request::KeepAlive { lease };
                    effects.push(Effect::Send { token, request });
                }
                if self.due(Kind::Confirm, now, every) {
                    let token = self.token(Kind::Confirm, now);
                    let member = self.keys.member(&self.node);
                    let txn = Txn {
                        compare: vec![Compare::created(member.clone(), member_revision)],
                        success: vec![
                            Op::get(self.keys.route()),
                            Op::get_prefix(self.keys.members()),
                        ],
                        failure: vec![Op::get(member)],
                    };
                    effects.push(Effect::Send {
                        token,
                        request: Request::Txn(txn),
                    });
                }
            }
        }
        effects
    }

    /// Handles the response to `token`, received at `now`.
    pub fn on_response(&mut self, now: Millis, token: Token, response: &Response) -> Vec<Effect> {
        let Some(inflight) = self.inflight.remove(&token) else {
            return Vec::new();
        };
        if let Response::Failed(error) = response {
            if inflight.kind == Kind::Register && error.to_string().contains("lease not found") {
                // Our lease lapsed while registration waited: start over with a new one.
                return self.restart();
            }
            // Sent again at the next poll; a failed confirm is not a lost lease (a lapse is).
            self.last_sent[inflight.kind as usize] = None;
            return Vec::new();
        }
        match (inflight.kind, response) {
            (Kind::Grant, Response::Granted { lease }) => {
                if self.lease.is_none() {
                    self.lease = Some(*lease);
                }
                Vec::new()
            }
            (Kind::Register, Response::Txn(txn)) => {
                if self.member_revision.is_some() {
                    return Vec::new();
                }
                let holder = txn.got(0);
                if txn.succeeded {
                    self.registered_at(txn.revision);
                } else if let Some(holder) = holder.filter(|kv| Some(kv.lease) == self.lease) {
                    // Our own earlier attempt won; its response was lost.
                    self.registered_at(holder.create_revision);
                } else {
                    self.blocked_by = Some(match holder {
                        Some(kv) => String::from_utf8_lossy(&kv.value).into_owned(),
                        None => "an unknown holder".into(),
                    });
                }
                Vec::new()
            }
            (Kind::KeepAlive, Response::KeptAlive { alive: false }) => self.restart(),
            (Kind::KeepAlive, _) => Vec::new(),
            (Kind::Confirm, Response::Txn(txn)) => {
                if txn.succeeded {
                    if let Some(members) = txn.gets.get(1) {
                        self.members = members
                            .iter()
                            .filter_map(|kv| serde_json::from_slice::<MemberInfo>(&kv.value).ok())
                            .map(|info| (info.node.clone(), info))
                            .collect();
                    }
                    self.install(now, txn.got(0), Some(inflight.sent_at))
                } else {
                    self.restart()
                }
            }
            _ => Vec::new(),
        }
    }

    fn registered_at(&mut self, revision: i64) {
        self.member_revision = Some(revision);
        self.blocked_by = None;
        self.fresh = true;
        self.last_sent[Kind::Confirm as usize] = None;
    }

    /// The lease is gone: start over with a new one.
    fn restart(&mut self) -> Vec<Effect> {
        self.lease = None;
        self.member_revision = None;
        self.inflight.clear();
        self.last_sent = [None; KINDS];
        self.confirmed_until = 0;
        self.route = None;
        self.spans.clear();
        self.fresh = true;
        vec![Effect::LostAll]
    }

    /// Installs the route table read at `now` (`kv` is the route key, `None` when absent). With
    /// `confirmed_at`, the read was a confirm sent then: the node may serve until
    /// `confirmed_at + window`.
    fn install(
        &mut self,
        now: Millis,
        kv: Option<&KeyValue>,
        confirmed_at: Option<Millis>,
    ) -> Vec<Effect> {
        let revision = kv.map_or(0, |kv| kv.mod_revision);
        let installed = self.route.as_ref().map(|(_, revision)| *revision);
        if installed.is_some_and(|installed| revision < installed) {
            // A late answer about an older table: it confirms nothing current.
            return Vec::new();
        }
        let mut effects = Vec::new();
        if installed != Some(revision) {
            let table = match kv {
                None => Ok(RouteTable::empty(self.cluster())),
                Some(kv) => RouteTable::decode(&kv.value).and_then(|table| {
                    if table.cluster == self.cluster() {
                        Ok(table)
                    } else {
                        Err(format!(
                            "the route table belongs to cluster `{}`, not `{}`",
                            table.cluster,
                            self.cluster()
                        ))
                    }
                }),
            };
            let table = match table {
                Ok(table) => {
                    self.route_error = None;
                    table
                }
                Err(error) => {
                    // Serve nothing rather than guess.
                    self.route_error = Some(error);
                    RouteTable::empty(self.cluster())
                }
            };
            effects = self.take_table(now, table, revision);
        }
        if let Some(sent_at) = confirmed_at {
            self.confirmed_until = self.confirmed_until.max(sent_at + self.rules.window_ms());
        }
        effects
    }

    fn cluster(&self) -> &str {
        let prefix = self.keys.prefix();
        &prefix["/imstate/".len()..prefix.len() - 1]
    }

    /// Replaces the spans with the new table's, emitting what was lost.
    fn take_table(&mut self, now: Millis, table: RouteTable, revision: i64) -> Vec<Effect> {
        let lock_delay = self.rules.lock_delay_ms();
        let mut spans = Vec::new();
        for (namespace, range) in table.ranges_of(&self.node) {
            let carried = if self.fresh {
                None
            } else {
                carry(&self.spans, namespace, range.start, range.end, range.since)
            };
            let ready_at = carried.unwrap_or(if self.fresh || range.handover {
                now + lock_delay
            } else {
                now
            });
            spans.push(Span {
                namespace: namespace.to_owned(),
                start: range.start,
                end: range.end,
                since: range.since,
                ready_at,
            });
        }
        if let Some(presence) = &table.presence {
            for range in presence
                .ranges
                .iter()
                .filter(|range| range.primary == self.node)
            {
                let (start, end) = (u64::from(range.start), u64::from(range.end));
                let carried = if self.fresh {
                    None
                } else {
                    carry(&self.spans, SLOTS, start, end, range.since)
                };
                let ready_at = carried.unwrap_or(if self.fresh || range.handover {
                    now + lock_delay
                } else {
                    now
                });
                spans.push(Span {
                    namespace: SLOTS.to_owned(),
                    start,
                    end,
                    since: range.since,
                    ready_at,
                });
            }
        }
        let mut effects = Vec::new();
        for old in self.spans.iter().filter(|span| span.namespace == SLOTS) {
            // Slots this node was primary of under the same tenure stay; the rest are lost.
            let mut slot = old.start as u32;
            while u64::from(slot) < old.end {
                let range = table.presence.as_ref().and_then(|p| p.range(slot));
                let end = range.map_or(old.end as u32, |range| range.end.min(old.end as u32));
                let keep = range.is_some_and(|r| r.primary == self.node && r.since == old.since);
                if !keep {
                    match effects.last_mut() {
                        Some(Effect::LostSlots { end: last, .. }) if *last == slot => *last = end,
                        _ => effects.push(Effect::LostSlots { start: slot, end }),
                    }
                }
                slot = end;
            }
        }
        for old in self.spans.iter().filter(|span| span.namespace != SLOTS) {
            let mut section = old.start;
            while section < old.end {
                let kept = table
                    .range(&old.namespace, section)
                    .filter(|range| range.owner == self.node && range.since == old.since);
                let (end, keep) = match (kept, table.range(&old.namespace, section)) {
                    (Some(range), _) => (range.end.min(old.end), true),
                    (None, Some(range)) => (range.end.min(old.end), false),
                    (None, None) => (old.end, false),
                };
                if !keep {
                    push_lost(&mut effects, &old.namespace, section, end);
                }
                section = end;
            }
        }
        self.spans = spans;
        self.route = Some((table, revision));
        self.fresh = false;
        effects
    }

    /// Whether a presence write for `uid` may be taken at `now`: this node is the primary of
    /// its slot, its lease is confirmed and the lock-delay of a takeover has passed. The same
    /// rules as [`Member::access`] (S3 for slots); `tenure` is the version at which this node
    /// became the slot's primary.
    pub fn access_slot(&self, now: Millis, uid: u64) -> Access {
        let table = match self.table_for_access() {
            Ok(table) => table,
            Err(refused) => return refused,
        };
        let Some(presence) = &table.presence else {
            return Access::Unavailable {
                reason: format!(
                    "presence slots are not placed in route table version {}",
                    table.version
                ),
            };
        };
        let slot = presence.slot_of(uid);
        let Some(range) = presence.range(slot) else {
            return Access::Unavailable {
                reason: format!("no route for presence slot {slot}"),
            };
        };
        if range.primary != self.node {
            return Access::Redirect {
                owner: range.primary.clone(),
                version: table.version,
            };
        }
        self.serve_span(now, SLOTS, u64::from(slot), range.since)
    }

    /// The installed table when this node may serve anything from it.
    fn table_for_access(&self) -> Result<&RouteTable, Access> {
        if self.member_revision.is_none() {
            let reason = match &self.blocked_by {
                Some(holder) => format!(
                    "node id `{}` is registered by another process ({holder}); waiting for it \
                     to leave",
                    self.node
                ),
                None => "joining the cluster".into(),
            };
            return Err(Access::Unavailable { reason });
        }
        let Some((table, _)) = &self.route else {
            return Err(Access::Unavailable {
                reason: "no route table read yet".into(),
            });
        };
        if let Some(error) = &self.route_error {
            return Err(Access::Unavailable {
                reason: error.clone(),
            });
        }
        Ok(table)
    }

    /// Serve or wait, for a unit this node owns in the table: its lease must be confirmed and
    /// its span ready (past the lock-delay).
    fn serve_span(&self, now: Millis, namespace: &str, at: u64, tenure: u64) -> Access {
        if !cfg!(feature = "planted-serve-without-lease") && now >= self.confirmed_until {
            return Access::Unavailable {
                reason: "this node's lease is not confirmed by the coordinator; it serves \
                         nothing until it is"
                    .into(),
            };
        }
        let span = self
            .spans
            .iter()
            .find(|span| span.namespace == namespace && (span.start..span.end).contains(&at));
        match span {
            Some(span) if now >= span.ready_at => Access::Serve { tenure },
            Some(span) => Access::Unavailable {
                reason: format!(
                    "taking over: serving in {} ms (lock-delay)",
                    span.ready_at - now
                ),
            },
            None => Access::Unavailable {
                reason: "the route table is being installed".into(),
            },
        }
    }

    /// Whether `section` of `namespace` may be served at `now`.
    pub fn access(&self, now: Millis, namespace: &str, section: u64) -> Access {
        let table = match self.table_for_access() {
            Ok(table) => table,
            Err(refused) => return refused,
        };
        let Some(range) = table.range(namespace, section) else {
            return Access::Unavailable {
                reason: format!(
                    "namespace `{namespace}` has no route for section {section} in table version {}",
                    table.version
                ),
            };
        };
        if range.owner != self.node {
            return Access::Redirect {
                owner: range.owner.clone(),
                version: table.version,
            };
        }
        self.serve_span(now, namespace, section, range.since)
    }

    /// The ownership a raise must be fenced on, when registered with a table.
    pub fn fence(&self) -> Option<Fence> {
        Some(Fence {
            member_revision: self.member_revision?,
            route_revision: self.route.as_ref()?.1,
        })
    }

    /// A txn that runs `success` only if this node still owns what `fence` says (its member key
    /// is the one it registered, the route table has not changed since it read it): the write
    /// of a section's owner, as for raises, without a per-key revision.
    pub fn fenced_txn(&self, fence: Fence, success: Vec<Op>) -> Txn {
        Txn {
            compare: vec![
                Compare::created(self.keys.member(&self.node), fence.member_revision),
                Compare::modified(self.keys.route(), fence.route_revision),
            ],
            success,
            failure: Vec::new(),
        }
    }

    /// The txn that persists `raises` if this node still owns what `fence` says (its member
    /// key is the one it registered, the route table has not changed since it read it) and
    /// every section's key is still at the revision this node last saw. The last compare is
    /// what keeps a raise that the network delayed from landing after a later one and
    /// lowering `max_seq`; the first two keep a deposed owner out.
    pub fn raise_txn(&self, fence: Fence, raises: &[RaiseOp]) -> Txn {
        let mut compare = Vec::new();
        if !cfg!(feature = "planted-raise-without-fence") {
            compare.push(Compare::created(
                self.keys.member(&self.node),
                fence.member_revision,
            ));
            compare.push(Compare::modified(self.keys.route(), fence.route_revision));
            for raise in raises {
                compare.push(Compare::modified(
                    self.keys.max_seq(&raise.namespace, raise.section),
                    raise.revision,
                ));
            }
        }
        let mut failure = vec![
            Op::get(self.keys.route()),
            Op::get(self.keys.member(&self.node)),
        ];
        failure.extend(
            raises
                .iter()
                .map(|raise| Op::get(self.keys.max_seq(&raise.namespace, raise.section))),
        );
        Txn {
            compare,
            success: raises
                .iter()
                .map(|raise| {
                    Op::put(
                        self.keys.max_seq(&raise.namespace, raise.section),
                        imstate_coord::encode_u64(raise.max_seq),
                    )
                })
                .collect(),
            failure,
        }
    }

    /// Handles the answer to the raise txn of `raises`, received at `now`.
    pub fn on_raise_response(
        &mut self,
        now: Millis,
        raises: &[RaiseOp],
        txn: &TxnResponse,
    ) -> RaiseOutcome {
        if txn.succeeded {
            return RaiseOutcome::Durable {
                revision: txn.revision,
            };
        }
        let member_alive = txn.got(1).is_some_and(|kv| {
            Some(kv.create_revision) == self.member_revision && Some(kv.lease) == self.lease
        });
        if !member_alive {
            return RaiseOutcome::Fenced {
                effects: self.restart(),
            };
        }
        let route_revision = txn.got(0).map_or(0, |kv| kv.mod_revision);
        if self.route.as_ref().map(|(_, revision)| *revision) != Some(route_revision) {
            return RaiseOutcome::Fenced {
                effects: self.install(now, txn.got(0), None),
            };
        }
        let current = raises
            .iter()
            .enumerate()
            .map(|(index, raise)| {
                let kv = txn.got(2 + index);
                (
                    raise.namespace.clone(),
                    raise.section,
                    kv.and_then(|kv| decode_u64(&kv.value)).unwrap_or(0),
                    kv.map_or(0, |kv| kv.mod_revision),
                )
            })
            .collect();
        RaiseOutcome::Stale { current }
    }

    /// The txn that reads a section's `max_seq`.
    pub fn load_txn(&self, namespace: &str, section: u64) -> Txn {
        Txn {
            success: vec![Op::get(self.keys.max_seq(namespace, section))],
            ..Txn::default()
        }
    }

    /// The `max_seq` and the key's mod revision in the answer to [`Self::load_txn`]
    /// (`(0, 0)` when never raised).
    pub fn loaded_max_seq(txn: &TxnResponse) -> Result<(u64, i64), String> {
        match txn.got(0) {
            None => Ok((0, 0)),
            Some(kv) => decode_u64(&kv.value)
                .map(|max_seq| (max_seq, kv.mod_revision))
                .ok_or_else(|| format!("{}: not a max_seq: {:?}", kv.key, kv.value)),
        }
    }
}

/// The readiness carried from the old spans when they cover `[start, end)` of `namespace`
/// with the same tenure; `None` otherwise.
fn carry(spans: &[Span], namespace: &str, start: u64, end: u64, since: u64) -> Option<Millis> {
    let mut covered = start;
    let mut ready_at = 0;
    let mut overlapping: Vec<&Span> = spans
        .iter()
        .filter(|span| span.namespace == namespace && span.start < end && span.end > start)
        .collect();
    overlapping.sort_by_key(|span| span.start);
    for span in overlapping {
        if span.since != since || span.start > covered {
            return None;
        }
        covered = covered.max(span.end);
        ready_at = ready_at.max(span.ready_at);
    }
    (covered >= end).then_some(ready_at)
}

fn push_lost(effects: &mut Vec<Effect>, namespace: &str, start: u64, end: u64) {
    if let Some(Effect::Lost {
        namespace: last_namespace,
        end: last_end,
        ..
    }) = effects.last_mut()
        && last_namespace == namespace
        && *last_end == start
    {
        *last_end = end;
        return;
    }
    effects.push(Effect::Lost {
        namespace: namespace.to_owned(),
        start,
        end,
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use imstate_coord::sim::SimCoordinator;

    const TTL: u64 = 3_000;

    fn info(node: &str) -> MemberInfo {
        MemberInfo {
            node: node.into(),
            ..MemberInfo::default()
        }
    }

    /// Polls `member` at `now` and answers every request at once; returns the effects that
    /// were not sends.
    fn step(member: &mut Member, coord: &mut SimCoordinator, now: Millis) -> Vec<Effect> {
        let mut out = Vec::new();
        let mut effects = member.poll(now);
        while let Some(effect) = effects.pop() {
            match effect {
                Effect::Send { token, request } => {
                    let response = coord.handle(now, &request);
                    effects.extend(member.on_response(now, token, &response));
                }
                other => out.push(other),
            }
        }
        out
    }

    fn put_route(coord: &mut SimCoordinator, table: &RouteTable) {
        let keys = Keys::new(&table.cluster);
        let txn = Txn {
            success: vec![Op::put(keys.route(), table.encode())],
            ..Txn::default()
        };
        coord.handle(0, &Request::Txn(txn));
    }

    fn table(version: u64, owner: &str, handover: bool) -> RouteTable {
        let mut table = RouteTable::empty("c");
        table.version = version;
        table.namespaces.insert(
            "ns".into(),
            crate::route::NamespaceRoute {
                sections: 4,
                ranges: vec![crate::Range {
                    start: 0,
                    end: 4,
                    owner: owner.into(),
                    since: version,
                    handover,
                }],
            },
        );
        table
    }

    #[test]
    fn a_node_serves_after_its_first_lock_delay_and_only_while_confirmed() {
        let mut coord = SimCoordinator::new();
        put_route(&mut coord, &table(1, "a", false));
        let mut member = Member::new("c", &info("a"), LeaseRules::new(TTL));
        assert!(matches!(
            member.access(0, "ns", 0),
            Access::Unavailable { .. }
        ));
        // Grant, register, confirm: three polls (each answered at once).
        for now in [0, 1, 2] {
            step(&mut member, &mut coord, now);
        }
        assert!(member.registered());
        let lock_delay = member.rules().lock_delay_ms();
        let Access::Unavailable { reason } = member.access(10, "ns", 0) else {
            panic!("the first table of a run waits the lock-delay")
        };
        assert!(reason.contains("lock-delay"), "{reason}");
        // Keep confirming every renew period until past the lock-delay.
        let mut now = 2;
        while now < lock_delay + 10 {
            now += member.rules().renew_every_ms();
            step(&mut member, &mut coord, now);
        }
        assert_eq!(member.access(now, "ns", 0), Access::Serve { tenure: 1 });
        // No confirm for a whole window: the node stops serving by its own clock.
        let last_confirm = now;
        assert!(matches!(
            member.access(last_confirm + TTL, "ns", 0),
            Access::Unavailable { .. }
        ));
    }

    #[test]
    fn a_moved_range_is_lost_at_once_and_gained_only_after_the_lock_delay() {
        let mut coord = SimCoordinator::new();
        put_route(&mut coord, &table(1, "a", false));
        let mut a = Member::new("c", &info("a"), LeaseRules::new(TTL));
        let mut b = Member::new("c", &info("b"), LeaseRules::new(TTL));
        let every = a.rules().renew_every_ms();
        let mut now = 0;
        while now < 2 * TTL {
            step(&mut a, &mut coord, now);
            step(&mut b, &mut coord, now);
            now += every;
        }
        assert!(matches!(a.access(now, "ns", 1), Access::Serve { .. }));
        assert!(matches!(b.access(now, "ns", 1), Access::Redirect { .. }));
        put_route(&mut coord, &table(2, "b", true));
        now += every;
        let lost = step(&mut a, &mut coord, now);
        assert_eq!(
            lost,
            vec![Effect::Lost {
                namespace: "ns".into(),
                start: 0,
                end: 4
            }]
        );
        step(&mut b, &mut coord, now);
        assert!(matches!(a.access(now, "ns", 1), Access::Redirect { .. }));
        assert!(matches!(b.access(now, "ns", 1), Access::Unavailable { .. }));
        let ready = now + b.rules().lock_delay_ms();
        while now < ready {
            now += every;
            step(&mut b, &mut coord, now);
        }
        assert_eq!(b.access(now, "ns", 1), Access::Serve { tenure: 2 });
    }

    fn slot_table(version: u64, primary: &str, replica: &str, handover: bool) -> RouteTable {
        let mut table = table(version, "a", false);
        table.namespaces.clear();
        table.presence = Some(crate::PresenceRoute {
            slots: 8,
            ranges: vec![crate::SlotRange {
                start: 0,
                end: 8,
                primary: primary.into(),
                since: version,
                handover,
                replica: Some(replica.into()),
                replica_since: version,
                joining: None,
                joining_since: 0,
            }],
        });
        table
    }

    #[test]
    fn a_promoted_replica_takes_slot_writes_only_after_the_lock_delay_and_the_old_primary_stops() {
        let mut coord = SimCoordinator::new();
        put_route(&mut coord, &slot_table(1, "a", "b", false));
        let mut a = Member::new("c", &info("a"), LeaseRules::new(TTL));
        let mut b = Member::new("c", &info("b"), LeaseRules::new(TTL));
        let every = a.rules().renew_every_ms();
        let mut now = 0;
        while now < 2 * TTL {
            step(&mut a, &mut coord, now);
            step(&mut b, &mut coord, now);
            now += every;
        }
        // uid 13 is in slot 5.
        assert_eq!(a.access_slot(now, 13), Access::Serve { tenure: 1 });
        let Access::Redirect { owner, .. } = b.access_slot(now, 13) else {
            panic!("the replica redirects writes to the primary")
        };
        assert_eq!(owner, "a");
        // b is promoted.
        put_route(&mut coord, &slot_table(2, "b", "a", true));
        now += every;
        assert_eq!(
            step(&mut a, &mut coord, now),
            vec![Effect::LostSlots { start: 0, end: 8 }]
        );
        step(&mut b, &mut coord, now);
        assert!(matches!(a.access_slot(now, 13), Access::Redirect { .. }));
        let Access::Unavailable { reason } = b.access_slot(now, 13) else {
            panic!("a promoted replica waits the lock-delay")
        };
        assert!(reason.contains("lock-delay"), "{reason}");
        let ready = now + b.rules().lock_delay_ms();
        while now < ready {
            now += every;
            step(&mut b, &mut coord, now);
        }
        assert_eq!(b.access_slot(now, 13), Access::Serve { tenure: 2 });
        // A table without slots placed refuses presence writes with the reason.
        put_route(&mut coord, &table(3, "b", false));
        now += every;
        step(&mut b, &mut coord, now);
        let Access::Unavailable { reason } = b.access_slot(now, 13) else {
            panic!("no slots, no presence writes")
        };
        assert!(reason.contains("not placed"), "{reason}");
    }

    #[test]
    fn raises_are_fenced_on_membership_route_and_the_sections_revision() {
        let mut coord = SimCoordinator::new();
        put_route(&mut coord, &table(1, "a", false));
        let mut a = Member::new("c", &info("a"), LeaseRules::new(TTL));
        for now in [0, 1, 2] {
            step(&mut a, &mut coord, now);
        }
        let fence = a.fence().unwrap();
        let raise = |max_seq, revision| RaiseOp {
            namespace: "ns".into(),
            section: 1,
            max_seq,
            revision,
        };
        let run = |coord: &mut SimCoordinator, txn: Txn| match coord.handle(3, &Request::Txn(txn))
        {
            Response::Txn(response) => response,
            other => panic!("{other:?}"),
        };
        let first = run(&mut coord, a.raise_txn(fence, &[raise(10, 0)]));
        let RaiseOutcome::Durable { revision } = a.on_raise_response(3, &[raise(10, 0)], &first)
        else {
            panic!("the first raise is durable")
        };
        // A second raise still carrying revision 0 (sent before the first was answered) must
        // not land: it would lower max_seq after a later raise.
        let late = run(&mut coord, a.raise_txn(fence, &[raise(10, 0)]));
        assert_eq!(
            a.on_raise_response(3, &[raise(10, 0)], &late),
            RaiseOutcome::Stale {
                current: vec![("ns".into(), 1, 10, revision)]
            }
        );
        // The route moves: the old fence fails, and the answer carries the new table.
        put_route(&mut coord, &table(2, "b", true));
        let fenced = run(&mut coord, a.raise_txn(fence, &[raise(20, revision)]));
        assert!(matches!(
            a.on_raise_response(4, &[raise(20, revision)], &fenced),
            RaiseOutcome::Fenced { effects } if !effects.is_empty()
        ));
        assert!(matches!(a.access(4, "ns", 1), Access::Redirect { .. }));
    }
}
