//! The smart clients of the sequence service: given any one node, they route each id to the
//! node that owns its section, split a NextBatch across owners, follow redirects and refresh
//! their route table; against an embedded node they simply talk to that node.
//!
//! ```text
//!  next_batch(ns, ids) ──► section of each id (namespace layout, cached)
//!        ──► owner of each section (route table, cached) ──► one NextBatch per owner, at once
//!        ──► reassembled in request order
//!  a redirect (FAILED_PRECONDITION + owner) or UNAVAILABLE ──► refresh the table, retry
//!  (bounded: ATTEMPTS_MAX tries within the call's deadline)
//!  a reply carrying a newer route version than the table ──► refresh the table from that node
//! ```
//!
//! One routing core, [`SmartClient`], over a [`SeqTransport`]: gRPC ([`ClusterClient`], which
//! also reads current values) or the wire protocol ([`WireClusterClient`], the hot path).
//!
//! Presence goes the same way by slot: a uid's requests go to the primary of its slot
//! (`uid % presence_slots`, from the route table); a HeartbeatBatch or LookupBatch is split
//! by primary and merged back in request order; gateway operations (gRPC) go to every live
//! node.
//!
//! A table of another cluster than the one the client was pointed at (or told to expect) is
//! refused: mixing two clusters' sequences would break monotonicity.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;

use crate::{
    Client, ClientError, ClientOptions, Namespace, NodeRoute, Route, RouteTable, SeqRange,
};
use crate::{LoginArgs, LoginResult, Session, SlotRoute};
use crate::{WireClient, default_namespace};

/// Tries per call (redirects and retries of unavailable owners together); the deadline
/// usually ends a call first.
pub const ATTEMPTS_MAX: usize = 400;
/// Longest a call keeps retrying while a section moves or its owner fails over.
pub const CALL_DEADLINE: Duration = Duration::from_secs(15);
/// Wait between retries when the owner is unavailable (failing over, lock-delay).
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// What a routed sequence call does to each of its ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeqCall {
    /// Reserve `count` consecutive seqs (1 = NextBatch); answers the last of each range.
    Next {
        /// Seqs per id.
        count: u64,
    },
    /// Read the current seq.
    Current,
}

/// One protocol a smart client speaks to each node.
///
/// Contract: `connect` dials the address this transport uses (`address_of` a route,
/// `node_address` of a node, `moved_address` of a redirect); `route` answers the node's route
/// table with its nodes and the namespaces' layouts; `route_version` is the newest route
/// version the node's replies on this connection carried.
pub trait SeqTransport: Clone + Send + Sync + Sized + 'static {
    /// Dials one node.
    fn connect(
        address: &str,
        options: &ClientOptions,
    ) -> impl Future<Output = Result<Self, ClientError>> + Send;
    /// The node's route table, nodes and namespaces.
    fn route(
        &self,
    ) -> impl Future<Output = Result<(RouteTable, Vec<Namespace>), ClientError>> + Send;
    /// Allocates seqs per id (answering the last of each id's range), or reads the current
    /// ones.
    fn call(
        &self,
        namespace: &str,
        ids: Vec<u64>,
        what: SeqCall,
    ) -> impl Future<Output = Result<Vec<u64>, ClientError>> + Send;
    /// [`SeqTransport::call`] for the string keys of a keyed namespace.
    fn call_keys(
        &self,
        namespace: &str,
        keys: Vec<Vec<u8>>,
        what: SeqCall,
    ) -> impl Future<Output = Result<Vec<u64>, ClientError>> + Send;
    /// The newest route version the node's replies carried.
    fn route_version(&self) -> u64;
    /// The address of a route's owner in this protocol.
    fn address_of(route: &Route) -> &str;
    /// The address of a node in this protocol.
    fn node_address(node: &NodeRoute) -> &str;
    /// The owner's address in a redirect, `(grpc, wire)`.
    fn moved_address<'a>(grpc: &'a str, wire: &'a str) -> &'a str;
    /// The address of a presence slot range's primary in this protocol.
    fn slot_address(slots: &SlotRoute) -> &str;
    /// Registers a session.
    fn login(
        &self,
        args: &LoginArgs,
    ) -> impl Future<Output = Result<LoginResult, ClientError>> + Send;
    /// Removes the session of (uid, conn).
    fn logout(
        &self,
        uid: u64,
        conn: u64,
    ) -> impl Future<Output = Result<Session, ClientError>> + Send;
    /// Renews the session of (uid, conn); an unknown session is an error.
    fn heartbeat(
        &self,
        uid: u64,
        conn: u64,
    ) -> impl Future<Output = Result<(), ClientError>> + Send;
    /// Renews sessions of `gateway`; answers the unknown ones.
    fn heartbeat_batch(
        &self,
        gateway: &str,
        sessions: &[(u64, u64)],
    ) -> impl Future<Output = Result<Vec<(u64, u64)>, ClientError>> + Send;
    /// The sessions of each uid, in order.
    fn lookup_batch(
        &self,
        uids: &[u64],
    ) -> impl Future<Output = Result<Vec<Vec<Session>>, ClientError>> + Send;
}

impl SeqTransport for Client {
    async fn connect(address: &str, options: &ClientOptions) -> Result<Self, ClientError> {
        Client::connect_with(address, options).await
    }

    async fn route(&self) -> Result<(RouteTable, Vec<Namespace>), ClientError> {
        let table = Client::route(self).await?;
        Ok((table, self.list_namespaces().await?))
    }

    async fn call(
        &self,
        namespace: &str,
        ids: Vec<u64>,
        what: SeqCall,
    ) -> Result<Vec<u64>, ClientError> {
        match what {
            SeqCall::Next { count: 1 } => self.next_batch(namespace, ids).await,
            SeqCall::Next { count } => Ok(self
                .next_range_batch(namespace, ids, count)
                .await?
                .into_iter()
                .map(|range| range.last)
                .collect()),
            SeqCall::Current => self.current_batch(namespace, ids).await,
        }
    }

    async fn call_keys(
        &self,
        namespace: &str,
        keys: Vec<Vec<u8>>,
        what: SeqCall,
    ) -> Result<Vec<u64>, ClientError> {
        match what {
            SeqCall::Next { count } => Ok(self
                .next_keys(namespace, keys, count)
                .await?
                .into_iter()
                .map(|range| range.last)
                .collect()),
            SeqCall::Current => self.current_keys(namespace, keys).await,
        }
    }

    fn route_version(&self) -> u64 {
        self.routes().0
    }

    fn address_of(route: &Route) -> &str {
        &route.node
    }

    fn node_address(node: &NodeRoute) -> &str {
        &node.grpc
    }

    fn moved_address<'a>(grpc: &'a str, _wire: &'a str) -> &'a str {
        grpc
    }

    fn slot_address(slots: &SlotRoute) -> &str {
        &slots.primary
    }

    async fn login(&self, args: &LoginArgs) -> Result<LoginResult, ClientError> {
        Client::login(self, args.clone()).await
    }

    async fn logout(&self, uid: u64, conn: u64) -> Result<Session, ClientError> {
        Client::logout(self, uid, conn).await
    }

    async fn heartbeat(&self, uid: u64, conn: u64) -> Result<(), ClientError> {
        Client::heartbeat(self, uid, conn).await
    }

    async fn heartbeat_batch(
        &self,
        gateway: &str,
        sessions: &[(u64, u64)],
    ) -> Result<Vec<(u64, u64)>, ClientError> {
        Client::heartbeat_batch(self, gateway, sessions).await
    }

    async fn lookup_batch(&self, uids: &[u64]) -> Result<Vec<Vec<Session>>, ClientError> {
        Client::lookup_batch(self, uids.to_vec()).await
    }
}

impl SeqTransport for WireClient {
    async fn connect(address: &str, options: &ClientOptions) -> Result<Self, ClientError> {
        WireClient::connect_with(address, options).await
    }

    async fn route(&self) -> Result<(RouteTable, Vec<Namespace>), ClientError> {
        WireClient::route(self).await
    }

    async fn call(
        &self,
        namespace: &str,
        ids: Vec<u64>,
        what: SeqCall,
    ) -> Result<Vec<u64>, ClientError> {
        match (what, ids.as_slice()) {
            (SeqCall::Current, _) => Err(ClientError::Status {
                code: tonic::Code::Unimplemented,
                message: "the wire protocol reads no current values; use gRPC".into(),
            }),
            (SeqCall::Next { count: 1 }, [id]) => Ok(vec![self.next(namespace, *id).await?]),
            (SeqCall::Next { count: 1 }, _) => self.next_batch(namespace, &ids).await,
            (SeqCall::Next { count }, _) => self.next_range_lasts(namespace, &ids, count).await,
        }
    }

    async fn call_keys(
        &self,
        namespace: &str,
        keys: Vec<Vec<u8>>,
        what: SeqCall,
    ) -> Result<Vec<u64>, ClientError> {
        match what {
            SeqCall::Current => Err(ClientError::Status {
                code: tonic::Code::Unimplemented,
                message: "the wire protocol reads no current values; use gRPC".into(),
            }),
            SeqCall::Next { count } => self.next_keys_lasts(namespace, &keys, count).await,
        }
    }

    fn route_version(&self) -> u64 {
        WireClient::route_version(self)
    }

    fn address_of(route: &Route) -> &str {
        &route.wire
    }

    fn node_address(node: &NodeRoute) -> &str {
        &node.wire
    }

    fn moved_address<'a>(_grpc: &'a str, wire: &'a str) -> &'a str {
        wire
    }

    fn slot_address(slots: &SlotRoute) -> &str {
        &slots.primary_wire
    }

    async fn login(&self, args: &LoginArgs) -> Result<LoginResult, ClientError> {
        WireClient::login(self, args).await
    }

    async fn logout(&self, uid: u64, conn: u64) -> Result<Session, ClientError> {
        WireClient::logout(self, uid, conn).await
    }

    async fn heartbeat(&self, uid: u64, conn: u64) -> Result<(), ClientError> {
        WireClient::heartbeat(self, uid, conn).await
    }

    async fn heartbeat_batch(
        &self,
        gateway: &str,
        sessions: &[(u64, u64)],
    ) -> Result<Vec<(u64, u64)>, ClientError> {
        WireClient::heartbeat_batch(self, gateway, sessions).await
    }

    async fn lookup_batch(&self, uids: &[u64]) -> Result<Vec<Vec<Session>>, ClientError> {
        WireClient::lookup_batch(self, uids).await
    }
}

struct State<T> {
    table: RouteTable,
    namespaces: HashMap<String, Namespace>,
    clients: HashMap<String, T>,
}

/// A client of a whole cluster (or of one embedded node) over one [`SeqTransport`].
pub struct SmartClient<T> {
    seed: String,
    options: ClientOptions,
    expected_cluster: Option<String>,
    state: Arc<Mutex<State<T>>>,
}

impl<T> Clone for SmartClient<T> {
    fn clone(&self) -> Self {
        Self {
            seed: self.seed.clone(),
            options: self.options.clone(),
            expected_cluster: self.expected_cluster.clone(),
            state: Arc::clone(&self.state),
        }
    }
}

/// The smart client over gRPC (`listen` addresses).
pub type ClusterClient = SmartClient<Client>;
/// The smart client over the wire protocol (`wire_listen` addresses): the hot path.
pub type WireClusterClient = SmartClient<WireClient>;

impl<T: SeqTransport> SmartClient<T> {
    /// Connects to any node at `address` and reads its route table. With
    /// `expected_cluster`, a node of another cluster is refused.
    pub async fn connect(
        address: &str,
        options: &ClientOptions,
        expected_cluster: Option<&str>,
    ) -> Result<Self, ClientError> {
        let seed = T::connect(address, options).await?;
        let client = Self {
            seed: address.to_owned(),
            options: options.clone(),
            expected_cluster: expected_cluster.map(str::to_owned),
            state: Arc::new(Mutex::new(State {
                table: RouteTable::default(),
                namespaces: HashMap::new(),
                clients: HashMap::from([(address.to_owned(), seed.clone())]),
            })),
        };
        client.refresh(&seed).await?;
        Ok(client)
    }

    /// The route table in use.
    pub async fn table(&self) -> RouteTable {
        self.state.lock().await.table.clone()
    }

    /// Reads the table from `from` (and the namespaces), checking the cluster's name.
    async fn refresh(&self, from: &T) -> Result<(), ClientError> {
        let (table, namespaces) = from.route().await?;
        let expected = match &self.expected_cluster {
            Some(expected) => Some(expected.clone()),
            None => {
                let state = self.state.lock().await;
                (!state.table.cluster.is_empty()).then(|| state.table.cluster.clone())
            }
        };
        if let Some(expected) = expected
            && table.cluster != expected
        {
            return Err(ClientError::Options {
                what: "cluster".into(),
                reason: format!(
                    "the node serves cluster `{}`, not `{expected}`: refusing its route table",
                    table.cluster
                ),
            });
        }
        let mut state = self.state.lock().await;
        if table.version >= state.table.version || table.cluster != state.table.cluster {
            state.table = table;
        }
        for namespace in namespaces {
            state.namespaces.insert(namespace.name.clone(), namespace);
        }
        Ok(())
    }

    pub(crate) async fn client(&self, address: &str) -> Result<T, ClientError> {
        if let Some(client) = self.state.lock().await.clients.get(address) {
            return Ok(client.clone());
        }
        let client = T::connect(address, &self.options).await?;
        self.state
            .lock()
            .await
            .clients
            .insert(address.to_owned(), client.clone());
        Ok(client)
    }

    /// The address serving each id's section (the seed for an embedded node or when the
    /// table does not know the section yet).
    ///
    /// With `hashed`, each "id" is the [`imstate_seq::key_hash`] of a keyed namespace's key,
    /// mapped onto the namespace's id range first (the node does the same).
    async fn owners(
        &self,
        namespace: &str,
        ids: &[u64],
        hashed: bool,
    ) -> Result<Vec<String>, ClientError> {
        let name = default_namespace(namespace);
        let mut state = self.state.lock().await;
        if !state.namespaces.contains_key(name) {
            drop(state);
            let seed = self.client(&self.seed).await?;
            self.refresh(&seed).await?;
            state = self.state.lock().await;
        }
        let embedded = state.table.cluster.is_empty();
        let layout = state.namespaces.get(name).cloned();
        Ok(ids
            .iter()
            .map(|&id| {
                let owner = (!embedded)
                    .then_some(())
                    .and(layout.as_ref())
                    .filter(|layout| layout.section_size > 0 && layout.id_hi > layout.id_lo)
                    .map(|layout| {
                        let id = if hashed {
                            layout.id_lo + id % (layout.id_hi - layout.id_lo)
                        } else {
                            id
                        };
                        (layout, id)
                    })
                    .filter(|(layout, id)| *id >= layout.id_lo)
                    .and_then(|(layout, id)| {
                        let section = (id - layout.id_lo) / layout.section_size;
                        state.table.routes.iter().find(|route| {
                            route.namespace == name
                                && (route.section_lo..route.section_hi).contains(&section)
                        })
                    })
                    .map(T::address_of)
                    .filter(|node| !node.is_empty());
                owner.map_or_else(|| self.seed.clone(), str::to_owned)
            })
            .collect())
    }

    /// Allocates the next seq of `id`.
    pub async fn next(&self, namespace: &str, id: u64) -> Result<u64, ClientError> {
        Ok(self.next_batch(namespace, vec![id]).await?[0])
    }

    /// Allocates one seq per id, in request order; ids of different owners go to each owner
    /// at once. A repeated id gets increasing values (its occurrences go to one owner, in
    /// order).
    pub async fn next_batch(
        &self,
        namespace: &str,
        ids: Vec<u64>,
    ) -> Result<Vec<u64>, ClientError> {
        self.routed(namespace, ids, SeqCall::Next { count: 1 })
            .await
    }

    /// Reserves `count` consecutive seqs for `id` (1 to 1,000,000).
    pub async fn next_range(
        &self,
        namespace: &str,
        id: u64,
        count: u64,
    ) -> Result<SeqRange, ClientError> {
        Ok(self.next_range_batch(namespace, vec![id], count).await?[0])
    }

    /// Reserves `count` consecutive seqs for each id, in request order, routed like
    /// [`Self::next_batch`]; a repeated id gets the range after its previous one.
    pub async fn next_range_batch(
        &self,
        namespace: &str,
        ids: Vec<u64>,
        count: u64,
    ) -> Result<Vec<SeqRange>, ClientError> {
        self.routed(namespace, ids, SeqCall::Next { count })
            .await?
            .into_iter()
            .map(|last| SeqRange::ending_at(last, count))
            .collect()
    }

    /// The address, in this protocol, of every node the table lists as alive.
    async fn live_addresses(&self) -> Vec<String> {
        let state = self.state.lock().await;
        state
            .table
            .nodes
            .iter()
            .filter(|node| node.alive)
            .map(|node| T::node_address(node).to_owned())
            .filter(|address| !address.is_empty())
            .collect()
    }

    /// Learns the table again from any node that answers.
    pub(crate) async fn refresh_any(&self) {
        let mut addresses = self.live_addresses().await;
        addresses.push(self.seed.clone());
        for address in addresses {
            if let Ok(client) = self.client(&address).await
                && self.refresh(&client).await.is_ok()
            {
                break;
            }
        }
    }

    async fn routed(
        &self,
        namespace: &str,
        ids: Vec<u64>,
        what: SeqCall,
    ) -> Result<Vec<u64>, ClientError> {
        self.routed_with(
            ids,
            Routing::Section(namespace),
            |id| *id,
            |client, group| async move { client.call(namespace, group, what).await },
        )
        .await
    }

    /// [`Self::routed`] for the string keys of a keyed namespace: each key goes to the owner
    /// of its section (by its FNV-1a hash, as the node computes it).
    async fn routed_keys(
        &self,
        namespace: &str,
        keys: Vec<Vec<u8>>,
        what: SeqCall,
    ) -> Result<Vec<u64>, ClientError> {
        self.routed_with(
            keys,
            Routing::KeyedSection(namespace),
            |key| imstate_seq::key_hash(key),
            |client, group| async move { client.call_keys(namespace, group, what).await },
        )
        .await
    }

    /// Reserves `count` consecutive seqs for each string key of a keyed namespace, in
    /// request order (`count = 1`: one seq per key); a repeated key gets the range after its
    /// previous one.
    pub async fn next_keys(
        &self,
        namespace: &str,
        keys: Vec<Vec<u8>>,
        count: u64,
    ) -> Result<Vec<SeqRange>, ClientError> {
        self.routed_keys(namespace, keys, SeqCall::Next { count })
            .await?
            .into_iter()
            .map(|last| SeqRange::ending_at(last, count))
            .collect()
    }

    /// Reads the current seq of each string key of a keyed namespace (gRPC only).
    pub async fn current_keys(
        &self,
        namespace: &str,
        keys: Vec<Vec<u8>>,
    ) -> Result<Vec<u64>, ClientError> {
        self.routed_keys(namespace, keys, SeqCall::Current).await
    }

    /// The address of each uid's presence slot primary (the seed for an embedded node or when
    /// the table has no slots yet).
    pub(crate) async fn slot_owners(&self, uids: &[u64]) -> Vec<String> {
        let state = self.state.lock().await;
        uids.iter()
            .map(|&uid| {
                state
                    .table
                    .slot_route(uid)
                    .map(T::slot_address)
                    .filter(|address| !address.is_empty())
                    .map_or_else(|| self.seed.clone(), str::to_owned)
            })
            .collect()
    }

    /// The routing core: sends each item to the node that serves its key (a section of a
    /// namespace, or a presence slot), all nodes at once, and retries what was redirected or
    /// unavailable after learning the newer table, within [`CALL_DEADLINE`] and
    /// [`ATTEMPTS_MAX`]. `call` answers one result per item, in order.
    async fn routed_with<I, R, F, Fut>(
        &self,
        items: Vec<I>,
        routing: Routing<'_>,
        key: impl Fn(&I) -> u64,
        call: F,
    ) -> Result<Vec<R>, ClientError>
    where
        I: Clone,
        F: Fn(T, Vec<I>) -> Fut,
        Fut: Future<Output = Result<Vec<R>, ClientError>>,
    {
        let deadline = tokio::time::Instant::now() + CALL_DEADLINE;
        let mut values: Vec<Option<R>> = items.iter().map(|_| None).collect();
        let mut last_error = None;
        for _ in 0..ATTEMPTS_MAX {
            let pending: Vec<usize> = (0..items.len()).filter(|&i| values[i].is_none()).collect();
            if pending.is_empty() {
                return Ok(values.into_iter().flatten().collect());
            }
            if tokio::time::Instant::now() >= deadline {
                break;
            }
            let pending_keys: Vec<u64> = pending.iter().map(|&i| key(&items[i])).collect();
            let owners = match routing {
                Routing::Section(namespace) => {
                    self.owners(namespace, &pending_keys, false).await?
                }
                Routing::KeyedSection(namespace) => {
                    self.owners(namespace, &pending_keys, true).await?
                }
                Routing::Slot => self.slot_owners(&pending_keys).await,
            };
            let mut groups: BTreeMap<String, Vec<usize>> = BTreeMap::new();
            for (position, owner) in pending.iter().zip(owners) {
                groups.entry(owner).or_default().push(*position);
            }
            let call = &call;
            let calls = groups.into_iter().map(|(owner, positions)| {
                let group: Vec<I> = positions.iter().map(|&i| items[i].clone()).collect();
                async move {
                    let client = self.client(&owner).await?;
                    let result = call(client.clone(), group).await;
                    Ok::<_, ClientError>((client, positions, result))
                }
            });
            let mut retry_pause = false;
            let mut newer: Option<T> = None;
            for outcome in futures::future::join_all(calls).await {
                let (client, positions, result) = match outcome {
                    Ok(done) => done,
                    Err(error) => {
                        // The owner cannot be reached: it may be failing over.
                        last_error = Some(error);
                        retry_pause = true;
                        continue;
                    }
                };
                match result {
                    Ok(results) => {
                        for (position, result) in positions.into_iter().zip(results) {
                            values[position] = Some(result);
                        }
                        if newer
                            .as_ref()
                            .is_none_or(|best| client.route_version() > best.route_version())
                        {
                            newer = Some(client);
                        }
                    }
                    Err(ClientError::Moved { grpc, wire, .. }) => {
                        // The owner's table is newer than ours: learn it there.
                        let owner = self.client(T::moved_address(&grpc, &wire)).await?;
                        if self.refresh(&owner).await.is_err() {
                            retry_pause = true;
                        }
                    }
                    Err(error)
                        if matches!(error.code(), Some(tonic::Code::Unavailable) | None) =>
                    {
                        last_error = Some(error);
                        retry_pause = true;
                    }
                    Err(error) => return Err(error),
                }
            }
            // A reply named a newer route version than ours: the table moved on (seed 002:
            // the version rides on every reply); learn it before the next call routes by it.
            if let Some(client) = newer
                && client.route_version() > self.state.lock().await.table.version
            {
                let _ = self.refresh(&client).await;
            }
            if retry_pause {
                tokio::time::sleep(RETRY_PAUSE).await;
                self.refresh_any().await;
            }
        }
        Err(last_error.unwrap_or(ClientError::Connection {
            reason: format!(
                "no owner answered within {} s ({ATTEMPTS_MAX} tries)",
                CALL_DEADLINE.as_secs()
            ),
        }))
    }

    /// Registers a session at the primary of the uid's presence slot.
    pub async fn login(&self, args: LoginArgs) -> Result<LoginResult, ClientError> {
        let uid = args.uid;
        let mut results = self
            .routed_with(
                vec![uid],
                Routing::Slot,
                |uid| *uid,
                |client, _| {
                    let args = args.clone();
                    async move { Ok(vec![client.login(&args).await?]) }
                },
            )
            .await?;
        Ok(results.remove(0))
    }

    /// Removes the session of (uid, conn) at its slot's primary.
    pub async fn logout(&self, uid: u64, conn: u64) -> Result<Session, ClientError> {
        let mut results = self
            .routed_with(
                vec![uid],
                Routing::Slot,
                |uid| *uid,
                |client, _| async move { Ok(vec![client.logout(uid, conn).await?]) },
            )
            .await?;
        Ok(results.remove(0))
    }

    /// Renews the session of (uid, conn) at its slot's primary.
    pub async fn heartbeat(&self, uid: u64, conn: u64) -> Result<(), ClientError> {
        self.routed_with(
            vec![uid],
            Routing::Slot,
            |uid| *uid,
            |client, _| async move { client.heartbeat(uid, conn).await.map(|()| vec![()]) },
        )
        .await
        .map(|_| ())
    }

    /// Renews sessions of `gateway`, each at its slot's primary (one batch per primary, at
    /// once); returns the (uid, conn) pairs that no primary knows (re-register them).
    pub async fn heartbeat_batch(
        &self,
        gateway: &str,
        sessions: Vec<(u64, u64)>,
    ) -> Result<Vec<(u64, u64)>, ClientError> {
        let known = self
            .routed_with(
                sessions.clone(),
                Routing::Slot,
                |(uid, _)| *uid,
                |client, group| async move {
                    let unknown = client.heartbeat_batch(gateway, &group).await?;
                    let unknown: std::collections::HashSet<(u64, u64)> =
                        unknown.into_iter().collect();
                    Ok(group.iter().map(|pair| !unknown.contains(pair)).collect())
                },
            )
            .await?;
        Ok(sessions
            .into_iter()
            .zip(known)
            .filter(|(_, known)| !known)
            .map(|(pair, _)| pair)
            .collect())
    }

    /// The sessions of each uid, in request order: one LookupBatch per slot primary, at once
    /// (group fan-out).
    pub async fn lookup_batch(&self, uids: Vec<u64>) -> Result<Vec<Vec<Session>>, ClientError> {
        self.routed_with(
            uids,
            Routing::Slot,
            |uid| *uid,
            |client, group| async move { client.lookup_batch(&group).await },
        )
        .await
    }
}

/// What the routing core routes by.
#[derive(Clone, Copy)]
enum Routing<'a> {
    /// The section of an id in this namespace.
    Section(&'a str),
    /// The section of a string key (routed by its hash) in this keyed namespace.
    KeyedSection(&'a str),
    /// The presence slot of a uid.
    Slot,
}

impl SmartClient<Client> {
    /// Sets the `min_seq` of each id (`ids` of a numeric namespace, or `keys` of a keyed one;
    /// one value per id, 0 clears), each part at its section's owner: all or none per owner
    /// (a batch over several owners is split; in cluster mode at most 128 ids per owner).
    pub async fn set_min_seqs(
        &self,
        namespace: &str,
        ids: Vec<u64>,
        keys: Vec<Vec<u8>>,
        values: Vec<u64>,
    ) -> Result<(), ClientError> {
        if ids.len() + keys.len() != values.len() {
            return Err(ClientError::Status {
                code: tonic::Code::InvalidArgument,
                message: format!(
                    "{} ids and {} min_seq values; one value per id",
                    ids.len() + keys.len(),
                    values.len()
                ),
            });
        }
        if keys.is_empty() {
            let items: Vec<(u64, u64)> = ids.into_iter().zip(values).collect();
            self.routed_with(
                items,
                Routing::Section(namespace),
                |(id, _)| *id,
                |client, group| async move {
                    let len = group.len();
                    let (ids, values) = group.into_iter().unzip();
                    client
                        .set_min_seqs(namespace, ids, Vec::new(), values)
                        .await?;
                    Ok(vec![(); len])
                },
            )
            .await?;
        } else {
            let items: Vec<(Vec<u8>, u64)> = keys.into_iter().zip(values).collect();
            self.routed_with(
                items,
                Routing::KeyedSection(namespace),
                |(key, _)| imstate_seq::key_hash(key),
                |client, group| async move {
                    let len = group.len();
                    let (keys, values) = group.into_iter().unzip();
                    client
                        .set_min_seqs(namespace, Vec::new(), keys, values)
                        .await?;
                    Ok(vec![(); len])
                },
            )
            .await?;
        }
        Ok(())
    }

    /// Reads the `min_seq` of each id (`ids`) or key (`keys`), routed like
    /// [`Self::set_min_seqs`]; 0 where none was set.
    pub async fn min_seqs(
        &self,
        namespace: &str,
        ids: Vec<u64>,
        keys: Vec<Vec<u8>>,
    ) -> Result<Vec<u64>, ClientError> {
        if keys.is_empty() {
            self.routed_with(
                ids,
                Routing::Section(namespace),
                |id| *id,
                |client, group| async move { client.min_seqs(namespace, group, Vec::new()).await },
            )
            .await
        } else {
            self.routed_with(
                keys,
                Routing::KeyedSection(namespace),
                |key| imstate_seq::key_hash(key),
                |client, group| async move { client.min_seqs(namespace, Vec::new(), group).await },
            )
            .await
        }
    }
    /// The gRPC address of the live replica of each uid's slot (`None`: no replica, or no
    /// slots placed).
    async fn slot_replicas(&self, uids: &[u64]) -> Vec<Option<String>> {
        let state = self.state.lock().await;
        let table = &state.table;
        uids.iter()
            .map(|&uid| {
                let replica = &table.slot_route(uid)?.replica_id;
                table
                    .nodes
                    .iter()
                    .find(|node| node.node_id == *replica && node.alive && !node.grpc.is_empty())
                    .map(|node| node.grpc.clone())
            })
            .collect()
    }

    /// [`Self::lookup_batch`] answered by the slots' replicas where they can (group fan-out
    /// off the primaries): split by replica and merged back in request order. A uid whose
    /// slot has no live replica, or whose replica refuses (not in sync, the table moved) or
    /// cannot be reached, is looked up on its primary instead. Under
    /// `presence.replication = "sync"` the answer shows every acknowledged write, as from
    /// the primary; under `"async"` it may lag by the replica's lag (`imstate ctl route`).
    pub async fn lookup_batch_from_replicas(
        &self,
        uids: Vec<u64>,
    ) -> Result<Vec<Vec<Session>>, ClientError> {
        let mut found: Vec<Option<Vec<Session>>> = vec![None; uids.len()];
        let mut groups: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (position, replica) in self.slot_replicas(&uids).await.into_iter().enumerate() {
            if let Some(address) = replica {
                groups.entry(address).or_default().push(position);
            }
        }
        let uids_ref = &uids;
        let calls = groups.into_iter().map(|(address, positions)| async move {
            let group: Vec<u64> = positions.iter().map(|&i| uids_ref[i]).collect();
            let result = match self.client(&address).await {
                Ok(client) => client.lookup_batch_replica(group).await,
                Err(error) => Err(error),
            };
            (positions, result)
        });
        for (positions, result) in futures::future::join_all(calls).await {
            if let Ok(sessions) = result {
                for (position, sessions) in positions.into_iter().zip(sessions) {
                    found[position] = Some(sessions);
                }
            }
        }
        let rest: Vec<usize> = (0..uids.len()).filter(|&i| found[i].is_none()).collect();
        if !rest.is_empty() {
            let sessions = self
                .lookup_batch(rest.iter().map(|&i| uids[i]).collect())
                .await?;
            for (position, sessions) in rest.into_iter().zip(sessions) {
                found[position] = Some(sessions);
            }
        }
        Ok(found.into_iter().map(Option::unwrap_or_default).collect())
    }

    /// The gRPC address of every live node (the seed when the table lists none: embedded).
    async fn every_node(&self) -> Vec<String> {
        let mut addresses = self.live_addresses().await;
        if addresses.is_empty() {
            addresses.push(self.seed.clone());
        }
        addresses
    }

    /// Drops every session of `gateway` on every node (each holds the slots it is primary
    /// of); returns how many in all. Fails if a live node cannot be reached: the caller
    /// retries (dropping is idempotent).
    pub async fn gateway_down(&self, gateway: &str) -> Result<u64, ClientError> {
        let mut dropped = 0;
        for address in self.every_node().await {
            dropped += self.client(&address).await?.gateway_down(gateway).await?;
        }
        Ok(dropped)
    }

    /// Gives `gateway` a lease on every node: if it lapses, each node drops the gateway's
    /// sessions it holds.
    pub async fn gateway_register(&self, gateway: &str, ttl_ms: u32) -> Result<(), ClientError> {
        for address in self.every_node().await {
            self.client(&address)
                .await?
                .gateway_register(gateway, ttl_ms)
                .await?;
        }
        Ok(())
    }

    /// Renews `gateway`'s lease on every node.
    pub async fn gateway_heartbeat(&self, gateway: &str) -> Result<(), ClientError> {
        for address in self.every_node().await {
            self.client(&address)
                .await?
                .gateway_heartbeat(gateway)
                .await?;
        }
        Ok(())
    }

    /// Reads the current seq of each id, routed like [`Self::next_batch`] (gRPC only).
    pub async fn current_batch(
        &self,
        namespace: &str,
        ids: Vec<u64>,
    ) -> Result<Vec<u64>, ClientError> {
        self.routed(namespace, ids, SeqCall::Current).await
    }
}
