//! Cluster mode's driver: runs the pure [`Member`] and [`Arbiter`] state machines of
//! `imstate-cluster` against a [`Coordinator`] (etcd in production), on the process's
//! monotonic clock.
//!
//! ```text
//!  every TICK ──► Member::poll + Arbiter::poll ──► requests, each in its own task
//!                                                     │ response
//!  responses channel ◄────────────────────────────────┘
//!        └──► Member/Arbiter::on_response ──► effects: sections lost ──► listeners (ClusterSeq)
//! ```
//!
//! The front doors ask [`Cluster::access`] before serving a section (the one ownership check),
//! and take the route version and owners' addresses from here (the one route-info source).
//! Raises and loads go through [`Cluster::raise`] and [`Cluster::load`]: fenced txns whose
//! answers also update the member (a fenced raise means the ownership changed).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use imstate_cluster::arbiter::ARBITER_TOKENS;
use imstate_cluster::{
    Access, Arbiter, Effect, LeaseRules, Member, MemberInfo, NodeId, RaiseOp, RaiseOutcome,
    RouteTable, Token,
};
use imstate_coord::{
    Compare, Coordinator, MonotonicClock, Op, Request, Response, SystemMonotonic, Txn,
};
use parking_lot::Mutex;
use tokio::sync::{mpsc, watch};

use crate::NodeError;

/// How often the driver polls the state machines.
const TICK: Duration = Duration::from_millis(10);

/// Metric: lease renewals (keep-alives) answered, by `outcome` (`alive`, `lost`).
pub const CLUSTER_RENEWALS: &str = "imstate_cluster_lease_renewals_total";
/// Metric: times this node lost its lease (every section lost at once).
pub const CLUSTER_LEASE_LAPSES: &str = "imstate_cluster_lease_lapses_total";
/// Metric: sections this node owns under its route table.
pub const CLUSTER_SECTIONS_OWNED: &str = "imstate_cluster_sections_owned";
/// Metric: section ranges this node lost to a move.
pub const CLUSTER_MOVES: &str = "imstate_cluster_sections_lost_total";
/// Metric: presence slot ranges this node stopped being primary of.
pub const CLUSTER_SLOTS_LOST: &str = "imstate_cluster_presence_slots_lost_total";
/// Metric: presence slots this node was replica of and became primary of (promotions).
pub const CLUSTER_PRESENCE_PROMOTIONS: &str = "imstate_cluster_presence_promotions_total";
/// Metric: presence slots this node is primary of that no in-sync replica holds.
pub const CLUSTER_PRESENCE_SLOTS_DEGRADED: &str = "imstate_cluster_presence_slots_degraded";
/// Metric: sessions dropped because their slot is neither primary nor replica here.
pub const CLUSTER_SLOT_SESSIONS_DROPPED: &str =
    "imstate_cluster_presence_slot_sessions_dropped_total";
/// Metric: presence slots this node is primary of under its route table.
pub const CLUSTER_SLOTS_PRIMARY: &str = "imstate_cluster_presence_slots_primary";
/// Metric: presence slots this node is replica of under its route table.
pub const CLUSTER_SLOTS_REPLICA: &str = "imstate_cluster_presence_slots_replica";
/// Metric: requests answered with a redirect to the owner.
pub const CLUSTER_REDIRECTS: &str = "imstate_cluster_redirects_total";
/// Metric: coordinator request latency, seconds, by `kind` (`txn`, `lease`).
pub const CLUSTER_COORD_SECONDS: &str = "imstate_cluster_coordinator_seconds";
/// Metric: coordinator requests that failed (timeout, unreachable).
pub const CLUSTER_COORD_FAILURES: &str = "imstate_cluster_coordinator_failures_total";
/// Metric: raise txns refused by their fence (`ownership`, `stale`).
pub const CLUSTER_RAISES_FENCED: &str = "imstate_cluster_raises_fenced_total";

/// What a node needs to join a cluster.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// The cluster's name (its key prefix in etcd).
    pub name: String,
    /// This node's id, unique in the cluster.
    pub node: NodeId,
    /// The gRPC address clients reach this node at.
    pub advertise: String,
    /// The wire-protocol address clients reach this node at.
    pub advertise_wire: String,
    /// The lease TTL.
    pub lease_ttl_ms: u64,
    /// Most sections the arbiter moves per round when draining or rebalancing.
    pub moves_max: u64,
    /// Presence slots the arbiter places when the table has none (`presence.slots`).
    pub presence_slots: u32,
    /// How long slots whose copies are all gone wait for one to come back
    /// ([`imstate_cluster::Arbiter::with_orphan_grace`]).
    pub orphan_grace_ms: u64,
}

/// Presence slots this node follows as replica of one primary.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ReplicaAssignment {
    /// The primary's node id.
    pub primary: NodeId,
    /// Its gRPC address (empty while it is not a live member).
    pub grpc: String,
    /// The cluster's slot count.
    pub slots: u32,
    /// The slot ranges `[start, end)`.
    pub spans: Vec<(u32, u32)>,
    /// The table version at which this node became replica of each span (`replica_since`).
    pub since: Vec<u64>,
}

impl ReplicaAssignment {
    /// What this node says once it is in sync for the assignment, or, `lapsed`, once it was
    /// in sync in this tenure and its stream has ended since (see
    /// [`imstate_cluster::InSyncRange`]).
    pub fn in_sync_ranges(&self, lapsed: bool) -> Vec<imstate_cluster::InSyncRange> {
        self.spans
            .iter()
            .zip(&self.since)
            .map(
                |(&(start, end), &replica_since)| imstate_cluster::InSyncRange {
                    start,
                    end,
                    primary: self.primary.clone(),
                    replica_since,
                    lapsed,
                },
            )
            .collect()
    }
}

/// A section range lost by this node: `(namespace, start, end)`, or `None` for everything.
pub type Lost = Option<(String, u64, u64)>;

struct State {
    member: Member,
    arbiter: Arbiter,
}

/// Where this node stands in the cluster, for `ctl status` and `/readyz`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterStatus {
    /// The cluster's name.
    pub cluster: String,
    /// This node.
    pub node: NodeId,
    /// `arbiter` or `member` (or `joining`).
    pub role: &'static str,
    /// Whether the member key is registered.
    pub registered: bool,
    /// How long the lease is still confirmed for, ms (0 when not).
    pub lease_valid_ms: u64,
    /// The route table's version (0 before the first).
    pub route_version: u64,
    /// Sections owned under it.
    pub sections_owned: u64,
    /// Why registration waits, when another process holds the node id.
    pub blocked_by: Option<String>,
}

/// A node's membership in a cluster.
pub struct Cluster {
    options: ClusterOptions,
    coordinator: Arc<dyn Coordinator>,
    clock: SystemMonotonic,
    state: Mutex<State>,
    lost: Mutex<Vec<mpsc::UnboundedSender<Lost>>>,
    /// Bumped whenever the installed route table changes.
    route_changed: watch::Sender<u64>,
    stop: watch::Sender<bool>,
}

impl Cluster {
    /// Joins the cluster through `coordinator` and starts the driver task.
    pub fn start(options: ClusterOptions, coordinator: Arc<dyn Coordinator>) -> Arc<Self> {
        let info = MemberInfo {
            node: options.node.clone(),
            grpc: options.advertise.clone(),
            wire: options.advertise_wire.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
        };
        let rules = LeaseRules::new(options.lease_ttl_ms);
        let state = State {
            member: Member::new(&options.name, &info, rules),
            arbiter: Arbiter::new(
                &options.name,
                &options.node,
                (options.lease_ttl_ms / 10).max(10),
                options.moves_max,
            )
            .with_cooldown(rules.lock_delay_ms())
            .with_presence_slots(options.presence_slots)
            .with_orphan_grace(options.orphan_grace_ms)
            // A watch on the leader's key triggers the campaign; polling is only a fallback.
            .with_campaign_every(options.lease_ttl_ms),
        };
        let (route_changed, _) = watch::channel(0);
        let (stop, _) = watch::channel(false);
        let cluster = Arc::new(Self {
            options,
            coordinator,
            clock: SystemMonotonic::default(),
            state: Mutex::new(state),
            lost: Mutex::new(Vec::new()),
            route_changed,
            stop,
        });
        tokio::spawn(Arc::clone(&cluster).drive());
        cluster
    }

    /// The options the node joined with.
    pub fn options(&self) -> &ClusterOptions {
        &self.options
    }

    /// What the coordinator is, for messages.
    pub fn coordinator(&self) -> &Arc<dyn Coordinator> {
        &self.coordinator
    }

    /// Monotonic now, ms.
    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// Receives every range this node loses (and `None` when it loses all).
    pub fn subscribe_lost(&self) -> mpsc::UnboundedReceiver<Lost> {
        let (sender, receiver) = mpsc::unbounded_channel();
        self.lost.lock().push(sender);
        receiver
    }

    /// A receiver that changes whenever the route table does.
    pub fn route_changes(&self) -> watch::Receiver<u64> {
        self.route_changed.subscribe()
    }

    /// The one ownership check: may this node serve `section` of `namespace` now?
    pub fn access(&self, namespace: &str, section: u64) -> Access {
        let now = self.clock.now_ms();
        self.state.lock().member.access(now, namespace, section)
    }

    /// Whether a presence write for `uid` may be taken here now ([`Member::access_slot`]).
    pub fn access_slot(&self, uid: u64) -> Access {
        let now = self.clock.now_ms();
        self.state.lock().member.access_slot(now, uid)
    }

    /// The first uid of `uids` this node may not take presence requests for now, with why.
    fn first_refused(&self, uids: &mut dyn Iterator<Item = u64>) -> Option<(u64, Access)> {
        let now = self.clock.now_ms();
        let state = self.state.lock();
        if let Some(slots) = state
            .member
            .route()
            .and_then(|table| table.presence.as_ref())
            .map(|presence| presence.slots)
            .filter(|slots| *slots != self.options.presence_slots)
        {
            let reason = format!(
                "presence.slots is {} on this node but {slots} in the cluster (fixed for its \
                 life): this node serves no presence until its configuration says {slots}",
                self.options.presence_slots
            );
            return uids.next().map(|uid| (uid, Access::Unavailable { reason }));
        }
        uids.map(|uid| (uid, state.member.access_slot(now, uid)))
            .find(|(_, access)| !matches!(access, Access::Serve { .. }))
    }

    /// The presence slots this node is primary of under the installed table (`None` before
    /// slots are placed).
    pub fn primary_slots(&self) -> Option<imstate_presence::SlotSet> {
        let state = self.state.lock();
        let presence = state.member.route()?.presence.as_ref()?;
        let mut slots = imstate_presence::SlotSet::empty(presence.slots);
        for range in &presence.ranges {
            if range.primary == self.options.node {
                slots.insert_range(range.start, range.end);
            }
        }
        Some(slots)
    }

    /// The presence slots this node is replica of, by primary: `(primary id, its gRPC
    /// address, slot count, ranges)`, under the installed table.
    pub fn replica_assignments(&self) -> Vec<ReplicaAssignment> {
        let state = self.state.lock();
        let Some(presence) = state.member.route().and_then(|t| t.presence.as_ref()) else {
            return Vec::new();
        };
        let mut by_primary: BTreeMap<NodeId, Vec<(u32, u32, u64)>> = BTreeMap::new();
        // A joining replica follows like the replica, under its own tenure.
        let me = Some(self.options.node.as_str());
        for range in &presence.ranges {
            let since = if range.replica.as_deref() == me {
                range.replica_since
            } else if range.joining.as_deref() == me {
                range.joining_since
            } else {
                continue;
            };
            by_primary.entry(range.primary.clone()).or_default().push((
                range.start,
                range.end,
                since,
            ));
        }
        let members = state.member.members();
        by_primary
            .into_iter()
            .map(|(primary, spans)| ReplicaAssignment {
                grpc: members
                    .get(&primary)
                    .map(|info| info.grpc.clone())
                    .unwrap_or_default(),
                primary,
                slots: presence.slots,
                since: spans.iter().map(|span| span.2).collect(),
                spans: spans.iter().map(|span| (span.0, span.1)).collect(),
            })
            .collect()
    }

    /// The presence slot of `uid` under the installed table (`None` before slots are placed).
    pub fn slot_of(&self, uid: u64) -> Option<u32> {
        let state = self.state.lock();
        let presence = state.member.route()?.presence.as_ref()?;
        Some(presence.slot_of(uid))
    }

    /// The error a front door returns for a presence access of `uid` that is not `Serve`.
    pub fn slot_refusal(&self, uid: u64, access: Access) -> NodeError {
        let what = match self.slot_of(uid) {
            Some(slot) => format!("presence slot {slot} (uid {uid})"),
            None => format!("the presence slot of uid {uid}"),
        };
        self.refusal_of(what, access)
    }

    /// The error a front door returns for an access that is not `Serve`.
    pub fn refusal(&self, namespace: &str, section: u64, access: Access) -> NodeError {
        self.refusal_of(format!("section {section} of `{namespace}`"), access)
    }

    fn refusal_of(&self, what: String, access: Access) -> NodeError {
        match access {
            Access::Serve { .. } => NodeError::Unavailable("no refusal".into()),
            Access::Redirect { owner, version } => {
                metrics::counter!(CLUSTER_REDIRECTS).increment(1);
                let info = self.state.lock().member.members().get(&owner).cloned();
                let info = info.unwrap_or_else(|| MemberInfo {
                    node: owner.clone(),
                    ..MemberInfo::default()
                });
                NodeError::Moved {
                    what,
                    owner,
                    grpc: info.grpc,
                    wire: info.wire,
                    version,
                }
            }
            Access::Unavailable { reason } => NodeError::Unavailable(reason),
        }
    }

    /// The installed route table.
    pub fn route(&self) -> Option<RouteTable> {
        self.state.lock().member.route().cloned()
    }

    /// The installed route table's version (0 before the first).
    pub fn route_version(&self) -> u64 {
        self.state
            .lock()
            .member
            .route()
            .map_or(0, |table| table.version)
    }

    /// The members as last read.
    pub fn members(&self) -> BTreeMap<NodeId, MemberInfo> {
        self.state.lock().member.members().clone()
    }

    /// This node's standing.
    pub fn status(&self) -> ClusterStatus {
        let now = self.clock.now_ms();
        let state = self.state.lock();
        let member = &state.member;
        let route_version = member.route().map_or(0, |table| table.version);
        let sections_owned = member.route().map_or(0, |table| {
            table
                .load()
                .get(self.options.node.as_str())
                .copied()
                .unwrap_or(0)
        });
        ClusterStatus {
            cluster: self.options.name.clone(),
            node: self.options.node.clone(),
            role: if !member.registered() {
                "joining"
            } else if state.arbiter.is_leader() {
                "arbiter"
            } else {
                "member"
            },
            registered: member.registered(),
            lease_valid_ms: member.confirmed_until().saturating_sub(now),
            route_version,
            sections_owned,
            blocked_by: member.blocked_by().map(str::to_owned),
        }
    }

    /// Whether the node is registered and holds a confirmed lease and a route table.
    pub fn ready(&self) -> bool {
        let now = self.clock.now_ms();
        let state = self.state.lock();
        state.member.registered()
            && state.member.route().is_some()
            && state.member.confirmed_until() > now
    }

    /// Persists `raises` with the fence of the current ownership.
    pub async fn raise(&self, raises: Vec<RaiseOp>) -> RaiseOutcome {
        let txn = {
            let state = self.state.lock();
            let Some(fence) = state.member.fence() else {
                return RaiseOutcome::Fenced {
                    effects: Vec::new(),
                };
            };
            state.member.raise_txn(fence, &raises)
        };
        let response = self.timed("txn", Request::Txn(txn)).await;
        let Response::Txn(txn) = response else {
            // Unknown outcome: treated as not durable (a later raise goes higher).
            return RaiseOutcome::Fenced {
                effects: Vec::new(),
            };
        };
        let now = self.clock.now_ms();
        let outcome = self
            .state
            .lock()
            .member
            .on_raise_response(now, &raises, &txn);
        match &outcome {
            RaiseOutcome::Durable { .. } => {}
            RaiseOutcome::Stale { .. } => {
                metrics::counter!(CLUSTER_RAISES_FENCED, "fence" => "stale").increment(1);
            }
            RaiseOutcome::Fenced { effects } => {
                metrics::counter!(CLUSTER_RAISES_FENCED, "fence" => "ownership").increment(1);
                self.apply(effects.clone());
            }
        }
        outcome
    }

    /// The coordinator keys of this cluster.
    pub fn keys(&self) -> imstate_cluster::Keys {
        self.state.lock().member.keys().clone()
    }

    /// Runs `ops` in one txn fenced by this node's ownership ([`Member::fenced_txn`]): they
    /// land only while its registration and the route table it holds are current.
    pub async fn fenced_write(&self, ops: Vec<Op>) -> Result<(), NodeError> {
        let txn = {
            let state = self.state.lock();
            let Some(fence) = state.member.fence() else {
                return Err(NodeError::Unavailable(
                    "this node holds no ownership to write under (not registered or no route)"
                        .into(),
                ));
            };
            state.member.fenced_txn(fence, ops)
        };
        match self.txn(txn).await? {
            response if response.succeeded => Ok(()),
            _ => Err(NodeError::Unavailable(
                "the route table changed during the write; nothing was written, retry".into(),
            )),
        }
    }

    /// Reads a section's `max_seq` and its key's revision.
    pub async fn load(&self, namespace: &str, section: u64) -> Result<(u64, i64), NodeError> {
        let txn = self.state.lock().member.load_txn(namespace, section);
        match self.timed("txn", Request::Txn(txn)).await {
            Response::Txn(txn) => Member::loaded_max_seq(&txn).map_err(NodeError::Unavailable),
            Response::Failed(error) => Err(NodeError::Unavailable(error.to_string())),
            other => Err(NodeError::Unavailable(format!(
                "unexpected answer {other:?}"
            ))),
        }
    }

    /// Runs a txn (namespaces, drains, status reads) and returns its answer.
    pub async fn txn(&self, txn: Txn) -> Result<imstate_coord::TxnResponse, NodeError> {
        match self.timed("txn", Request::Txn(txn)).await {
            Response::Txn(txn) => Ok(txn),
            Response::Failed(error) => Err(NodeError::Unavailable(error.to_string())),
            other => Err(NodeError::Unavailable(format!(
                "unexpected answer {other:?}"
            ))),
        }
    }

    /// Whether this node is primary of `slot` under the installed table but may not take its
    /// writes yet (the lock-delay of a handover): its replica stream from the previous
    /// primary goes on meanwhile, so that nothing that primary acknowledged is left behind.
    pub fn taking_over_slot(&self, slot: u32) -> bool {
        let now = self.clock.now_ms();
        let state = self.state.lock();
        let primary_here = state
            .member
            .route()
            .and_then(|table| table.presence.as_ref())
            .and_then(|presence| presence.range(slot))
            .is_some_and(|range| range.primary == self.options.node);
        primary_here
            && !matches!(
                state.member.access_slot(now, u64::from(slot)),
                Access::Serve { .. }
            )
    }

    /// Publishes what this node is an in-sync replica of, under `insync/<node>` bound to its
    /// lease (so it vanishes with the node): the arbiter moves a primary role only to an
    /// in-sync replica. Fails while the node has no lease, or when etcd does not answer.
    pub async fn publish_in_sync(
        &self,
        ranges: &[imstate_cluster::InSyncRange],
    ) -> Result<(), NodeError> {
        let key = imstate_cluster::Keys::new(&self.options.name).in_sync(&self.options.node);
        self.put_leased(key, ranges).await.map(|_| ())
    }

    /// Publishes the replicas this node counts in sync as a primary, under `counted/<node>`
    /// bound to its lease ([`crate::counted`]), and reads the route table's version in the
    /// same txn. Returns the lease it was written under and that version.
    pub async fn publish_counted(
        &self,
        ranges: &[imstate_cluster::CountedRange],
    ) -> Result<(imstate_coord::LeaseId, u64), NodeError> {
        let keys = imstate_cluster::Keys::new(&self.options.name);
        let Some(lease) = self.lease() else {
            return Err(NodeError::Unavailable("no lease yet".into()));
        };
        let value = serde_json::to_vec(ranges)
            .map_err(|error| NodeError::Io(format!("encoding the counted report: {error}")))?;
        let answer = self
            .txn(Txn {
                success: vec![
                    Op::Put {
                        key: keys.counted(&self.options.node),
                        value,
                        lease: Some(lease),
                    },
                    Op::get(keys.route()),
                ],
                ..Txn::default()
            })
            .await?;
        let version = answer
            .gets
            .first()
            .and_then(|kvs| kvs.first())
            .and_then(|kv| RouteTable::decode(&kv.value).ok())
            .map_or(0, |table| table.version);
        Ok((lease, version))
    }

    /// Turns true when the cluster stops.
    pub fn stop_signal(&self) -> watch::Receiver<bool> {
        self.stop.subscribe()
    }

    /// The node's lease now, if it has one.
    pub fn lease(&self) -> Option<imstate_coord::LeaseId> {
        self.state.lock().member.lease()
    }

    /// The presence slot routes of the installed table.
    pub fn presence_route(&self) -> Option<imstate_cluster::PresenceRoute> {
        self.state.lock().member.route()?.presence.clone()
    }

    async fn put_leased(
        &self,
        key: String,
        value: &(impl serde::Serialize + ?Sized),
    ) -> Result<imstate_coord::LeaseId, NodeError> {
        let Some(lease) = self.lease() else {
            return Err(NodeError::Unavailable("no lease yet".into()));
        };
        let value = serde_json::to_vec(value)
            .map_err(|error| NodeError::Io(format!("encoding {key}: {error}")))?;
        let answer = self
            .txn(Txn {
                success: vec![Op::Put {
                    key,
                    value,
                    lease: Some(lease),
                }],
                ..Txn::default()
            })
            .await?;
        if !answer.succeeded {
            return Err(NodeError::Unavailable("the put was refused".into()));
        }
        Ok(lease)
    }

    /// Asks the arbiter to move every section away from `node` (`ctl drain`).
    pub async fn drain(&self, node: &str) -> Result<(), NodeError> {
        let keys = imstate_cluster::Keys::new(&self.options.name);
        self.txn(Txn {
            success: vec![Op::put(keys.drain(node), Vec::new())],
            ..Txn::default()
        })
        .await
        .map(|_| ())
    }

    /// Every key under `prefix` (a path of the cluster's keys), as `(leaf, value)`.
    async fn under(&self, prefix: String) -> Result<Vec<(String, Vec<u8>)>, NodeError> {
        let response = self
            .txn(Txn {
                success: vec![Op::get_prefix(prefix)],
                ..Txn::default()
            })
            .await?;
        Ok(response
            .gets
            .first()
            .into_iter()
            .flatten()
            .map(|kv| {
                (
                    imstate_cluster::Keys::leaf(&kv.key).to_owned(),
                    kv.value.clone(),
                )
            })
            .collect())
    }

    /// The nodes asked to drain.
    pub async fn draining(&self) -> Result<std::collections::BTreeSet<String>, NodeError> {
        let keys = imstate_cluster::Keys::new(&self.options.name);
        let drains = self.under(keys.drains()).await?;
        Ok(drains.into_iter().map(|(node, _)| node).collect())
    }

    /// Withdraws a drain request.
    pub async fn undrain(&self, node: &str) -> Result<(), NodeError> {
        let keys = imstate_cluster::Keys::new(&self.options.name);
        self.txn(Txn {
            success: vec![Op::Delete {
                key: keys.drain(node),
            }],
            ..Txn::default()
        })
        .await
        .map(|_| ())
    }

    /// Creates the namespace `name` with `value` (JSON) unless it exists; returns the stored
    /// value (which may differ: the caller compares).
    pub async fn ensure_namespace(
        &self,
        name: &str,
        value: Vec<u8>,
    ) -> Result<Vec<u8>, NodeError> {
        let key = imstate_cluster::Keys::new(&self.options.name).namespace(name);
        let response = self
            .txn(Txn {
                compare: vec![Compare::created(key.clone(), 0)],
                success: vec![Op::put(key.clone(), value.clone())],
                failure: vec![Op::get(key)],
            })
            .await?;
        if response.succeeded {
            Ok(value)
        } else {
            Ok(response
                .got(0)
                .map(|kv| kv.value.clone())
                .unwrap_or_default())
        }
    }

    /// Every namespace stored in the coordinator, as `(name, JSON value)`.
    pub async fn stored_namespaces(&self) -> Result<Vec<(String, Vec<u8>)>, NodeError> {
        let keys = imstate_cluster::Keys::new(&self.options.name);
        self.under(keys.namespaces()).await
    }

    /// Leaves the cluster: stops the driver and revokes the lease, so the arbiter moves this
    /// node's sections at once rather than after the TTL.
    pub async fn leave(&self) {
        self.stop.send_replace(true);
        let lease = self.state.lock().member.lease();
        if let Some(lease) = lease {
            let _ = self.coordinator.call(Request::Revoke { lease }).await;
        }
    }

    async fn timed(&self, kind: &'static str, request: Request) -> Response {
        let started = std::time::Instant::now();
        let response = self.coordinator.call(request).await;
        metrics::histogram!(CLUSTER_COORD_SECONDS, "kind" => kind)
            .record(started.elapsed().as_secs_f64());
        if matches!(response, Response::Failed(_)) {
            metrics::counter!(CLUSTER_COORD_FAILURES).increment(1);
        }
        response
    }

    fn apply(&self, effects: Vec<Effect>) {
        let mut lost = Vec::new();
        for effect in effects {
            match effect {
                Effect::Lost {
                    namespace,
                    start,
                    end,
                } => {
                    metrics::counter!(CLUSTER_MOVES).increment(1);
                    lost.push(Some((namespace, start, end)));
                }
                Effect::LostSlots { start, end } => {
                    metrics::counter!(CLUSTER_SLOTS_LOST).increment(1);
                    tracing::info!(node = %self.options.node, start, end, "no longer primary of these presence slots");
                }
                Effect::LostAll => {
                    metrics::counter!(CLUSTER_LEASE_LAPSES).increment(1);
                    tracing::warn!(node = %self.options.node, "lease lost: every section is dropped until it is registered again");
                    lost.push(None);
                }
                Effect::Send { .. } => {}
            }
        }
        if !lost.is_empty() {
            let mut listeners = self.lost.lock();
            listeners
                .retain(|listener| lost.iter().all(|item| listener.send(item.clone()).is_ok()));
        }
    }

    async fn drive(self: Arc<Self>) {
        let (responses, mut incoming) = mpsc::unbounded_channel::<(Token, Response)>();
        let mut stop = self.stop.subscribe();
        let mut ticker = tokio::time::interval(TICK);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut version = 0;
        let (vacant, mut vacancies) = mpsc::unbounded_channel::<()>();
        let mut watching: Option<i64> = None;
        loop {
            let effects = tokio::select! {
                _ = ticker.tick() => {
                    let now = self.clock.now_ms();
                    let mut state = self.state.lock();
                    let mut effects = state.member.poll(now);
                    let lease = state.member.registered().then(|| state.member.lease()).flatten();
                    effects.extend(state.arbiter.poll(now, lease));
                    effects
                }
                Some((token, response)) = incoming.recv() => {
                    let now = self.clock.now_ms();
                    let mut state = self.state.lock();
                    if let Response::KeptAlive { alive } = &response {
                        let outcome = if *alive { "alive" } else { "lost" };
                        metrics::counter!(CLUSTER_RENEWALS, "outcome" => outcome).increment(1);
                    }
                    if token >= ARBITER_TOKENS {
                        state.arbiter.on_response(now, token, &response)
                    } else {
                        state.member.on_response(now, token, &response)
                    }
                }
                Some(()) = vacancies.recv() => {
                    watching = None;
                    self.state.lock().arbiter.vacant();
                    Vec::new()
                }
                _ = stop.wait_for(|stop| *stop) => return,
            };
            // A follower watches the leader's key and campaigns the moment it goes.
            let follower_of = self.state.lock().arbiter.follower_of();
            if let Some(revision) = follower_of
                && watching != Some(revision)
            {
                watching = Some(revision);
                let (cluster, vacant) = (Arc::clone(&self), vacant.clone());
                let key = self.state.lock().arbiter.key();
                tokio::spawn(async move {
                    if cluster
                        .coordinator
                        .wait_deleted(key, revision)
                        .await
                        .is_ok()
                    {
                        let _ = vacant.send(());
                    }
                });
            }
            let mut rest = Vec::new();
            for effect in effects {
                match effect {
                    Effect::Send { token, request } => {
                        let cluster = Arc::clone(&self);
                        let responses = responses.clone();
                        tokio::spawn(async move {
                            let kind = if matches!(request, Request::Txn(_)) {
                                "txn"
                            } else {
                                "lease"
                            };
                            let response = cluster.timed(kind, request).await;
                            let _ = responses.send((token, response));
                        });
                    }
                    other => rest.push(other),
                }
            }
            self.apply(rest);
            let (now_version, owned, (primary, replica)) = {
                let state = self.state.lock();
                let table = state.member.route();
                let node = self.options.node.as_str();
                (
                    table.map_or(0, |table| table.version),
                    table.map_or(0, |table| table.load().get(node).copied().unwrap_or(0)),
                    table
                        .and_then(|table| table.presence.as_ref())
                        .and_then(|presence| presence.load().get(node).copied())
                        .unwrap_or_default(),
                )
            };
            if now_version != version {
                version = now_version;
                metrics::gauge!(CLUSTER_SECTIONS_OWNED).set(owned as f64);
                metrics::gauge!(CLUSTER_SLOTS_PRIMARY).set(f64::from(primary));
                metrics::gauge!(CLUSTER_SLOTS_REPLICA).set(f64::from(replica));
                self.route_changed.send_replace(version);
            }
        }
    }
}

/// Presence in cluster mode: a node takes requests only for the uids whose slot it is primary
/// of (one lock of the member state per request or batch).
impl crate::presencestore::SlotGate for Cluster {
    fn check(&self, uids: &mut dyn Iterator<Item = u64>) -> Result<(), NodeError> {
        // Negative control: every request passes, so a primary whose lease lapsed or whose
        // slots moved keeps accepting (and acknowledging) writes.
        if cfg!(feature = "planted-deposed-primary-writes") {
            return Ok(());
        }
        match self.first_refused(uids) {
            None => Ok(()),
            Some((uid, access)) => Err(self.slot_refusal(uid, access)),
        }
    }
}

/// Keeps `presence` to the slots this node is primary or replica of: whenever the route
/// table changes, the sessions of every other slot are dropped (journaled, so a restart agrees). A node that
/// lost slots (a move, a lapsed lease, a restart while another node took them over) would
/// otherwise keep stale sessions that a later promotion back to it would resurrect after
/// their logout elsewhere. It also keeps the registry's local scope (what expiry and
/// gateway drops may remove here) to the slots this node is primary of. Runs until the
/// cluster stops.
///
/// Known gap: a write that passed the slot check just before the table changed can be
/// applied after the drop; it stays until the next table change.
pub fn spawn_slot_keeper(
    cluster: Arc<Cluster>,
    presence: Arc<crate::presencestore::PresenceStore>,
) -> tokio::task::JoinHandle<()> {
    let mut changes = cluster.route_changes();
    let mut stop = cluster.stop.subscribe();
    tokio::spawn(async move {
        let mut kept: Option<imstate_presence::SlotSet> = None;
        let mut was_replica: Option<imstate_presence::SlotSet> = None;
        let mut degraded_check = tokio::time::interval(DEGRADED_CHECK);
        degraded_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Expiry and gateway drops here remove only the sessions of primary slots; a
            // replica's copies go when its primary's records say so.
            let primary = cluster
                .primary_slots()
                .unwrap_or_else(|| imstate_presence::SlotSet::empty(1));
            presence.registry().set_local_scope(Some(primary.clone()));
            let replica = imstate_presence::SlotSet::from_ranges(
                primary.count(),
                &cluster
                    .replica_assignments()
                    .into_iter()
                    .flat_map(|assignment| assignment.spans)
                    .collect::<Vec<_>>(),
            );
            if let Some(was_replica) = &was_replica
                && was_replica.count() == primary.count()
            {
                let mut promoted = was_replica.clone();
                promoted.remove_all(&replica);
                let mut lost = promoted.clone();
                lost.remove_all(&primary);
                promoted.remove_all(&lost);
                if !promoted.is_empty() {
                    metrics::counter!(CLUSTER_PRESENCE_PROMOTIONS)
                        .increment(u64::from(promoted.len()));
                    tracing::info!(
                        slots = promoted.len(),
                        "promoted to primary of presence slots this node was replica of"
                    );
                }
            }
            was_replica = Some(replica);
            // The slots this node holds: primary of, and replica of (the follower keeps those
            // in step with their primary).
            let held = cluster.primary_slots().map(|mut held| {
                for assignment in cluster.replica_assignments() {
                    for (start, end) in assignment.spans {
                        held.insert_range(start, end);
                    }
                }
                held
            });
            if let Some(primary) = held
                && kept.as_ref() != Some(&primary)
            {
                let mut others = imstate_presence::SlotSet::all(primary.count());
                others.remove_all(&primary);
                let presence = Arc::clone(&presence);
                let dropped =
                    tokio::task::spawn_blocking(move || presence.drop_slots(&others)).await;
                if let Ok(dropped) = dropped
                    && dropped > 0
                {
                    metrics::counter!(CLUSTER_SLOT_SESSIONS_DROPPED).increment(dropped as u64);
                    tracing::info!(
                        dropped,
                        "dropped the sessions of presence slots this node is not primary of"
                    );
                }
                kept = Some(primary);
            }
            loop {
                tokio::select! {
                    changed = changes.changed() => if changed.is_err() { return } else { break },
                    _ = stop.changed() => return,
                    _ = degraded_check.tick() => report_degraded(&cluster, &presence),
                }
            }
        }
    })
}

/// How often the slot keeper counts the primary slots with no replica in sync.
const DEGRADED_CHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// Sets [`CLUSTER_PRESENCE_SLOTS_DEGRADED`]: the slots this node is primary of that no
/// in-sync replica holds (one copy only: a crash of this node loses their recent changes).
fn report_degraded(cluster: &Cluster, presence: &crate::presencestore::PresenceStore) {
    let Some(mut degraded) = cluster.primary_slots() else {
        metrics::gauge!(CLUSTER_PRESENCE_SLOTS_DEGRADED).set(0.0);
        return;
    };
    if let Some(acks) = presence.sync_acks() {
        degraded.remove_all(&acks.in_sync_slots(degraded.count()));
    }
    metrics::gauge!(CLUSTER_PRESENCE_SLOTS_DEGRADED).set(f64::from(degraded.len()));
}
