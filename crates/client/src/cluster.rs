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
//! A table of another cluster than the one the client was pointed at (or told to expect) is
//! refused: mixing two clusters' sequences would break monotonicity.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;

use crate::{Client, ClientError, ClientOptions, Namespace, NodeRoute, Route, RouteTable};
use crate::{WireClient, default_namespace};

/// Tries per call (redirects and retries of unavailable owners together); the deadline
/// usually ends a call first.
pub const ATTEMPTS_MAX: usize = 400;
/// Longest a call keeps retrying while a section moves or its owner fails over.
pub const CALL_DEADLINE: Duration = Duration::from_secs(15);
/// Wait between retries when the owner is unavailable (failing over, lock-delay).
const RETRY_PAUSE: Duration = Duration::from_millis(100);

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
    /// Allocates one seq per id (`allocate`), or reads the current ones.
    fn call(
        &self,
        namespace: &str,
        ids: Vec<u64>,
        allocate: bool,
    ) -> impl Future<Output = Result<Vec<u64>, ClientError>> + Send;
    /// The newest route version the node's replies carried.
    fn route_version(&self) -> u64;
    /// The address of a route's owner in this protocol.
    fn address_of(route: &Route) -> &str;
    /// The address of a node in this protocol.
    fn node_address(node: &NodeRoute) -> &str;
    /// The owner's address in a redirect, `(grpc, wire)`.
    fn moved_address<'a>(grpc: &'a str, wire: &'a str) -> &'a str;
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
        allocate: bool,
    ) -> Result<Vec<u64>, ClientError> {
        if allocate {
            self.next_batch(namespace, ids).await
        } else {
            self.current_batch(namespace, ids).await
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
        allocate: bool,
    ) -> Result<Vec<u64>, ClientError> {
        if !allocate {
            return Err(ClientError::Status {
                code: tonic::Code::Unimplemented,
                message: "the wire protocol reads no current values; use gRPC".into(),
            });
        }
        match ids.as_slice() {
            [id] => Ok(vec![self.next(namespace, *id).await?]),
            _ => self.next_batch(namespace, &ids).await,
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

    async fn client(&self, address: &str) -> Result<T, ClientError> {
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
    async fn owners(&self, namespace: &str, ids: &[u64]) -> Result<Vec<String>, ClientError> {
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
                    .filter(|layout| layout.section_size > 0 && id >= layout.id_lo)
                    .and_then(|layout| {
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
        self.routed(namespace, ids, true).await
    }

    /// Learns the table again from any node that answers.
    async fn refresh_any(&self) {
        let addresses: Vec<String> = {
            let state = self.state.lock().await;
            let mut addresses: Vec<String> = state
                .table
                .nodes
                .iter()
                .filter(|node| node.alive)
                .map(|node| T::node_address(node).to_owned())
                .filter(|address| !address.is_empty())
                .collect();
            addresses.push(self.seed.clone());
            addresses
        };
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
        allocate: bool,
    ) -> Result<Vec<u64>, ClientError> {
        let deadline = tokio::time::Instant::now() + CALL_DEADLINE;
        let mut values: Vec<Option<u64>> = vec![None; ids.len()];
        let mut last_error = None;
        for _ in 0..ATTEMPTS_MAX {
            let pending: Vec<usize> = (0..ids.len()).filter(|&i| values[i].is_none()).collect();
            if pending.is_empty() {
                return Ok(values.into_iter().map(|value| value.unwrap_or(0)).collect());
            }
            if tokio::time::Instant::now() >= deadline {
                break;
            }
            let pending_ids: Vec<u64> = pending.iter().map(|&i| ids[i]).collect();
            let owners = self.owners(namespace, &pending_ids).await?;
            let mut groups: BTreeMap<String, Vec<usize>> = BTreeMap::new();
            for (position, owner) in pending.iter().zip(owners) {
                groups.entry(owner).or_default().push(*position);
            }
            let calls = groups.into_iter().map(|(owner, positions)| {
                let group: Vec<u64> = positions.iter().map(|&i| ids[i]).collect();
                async move {
                    let client = self.client(&owner).await?;
                    let result = client.call(namespace, group, allocate).await;
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
                    Ok(seqs) => {
                        for (position, seq) in positions.into_iter().zip(seqs) {
                            values[position] = Some(seq);
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
}

impl SmartClient<Client> {
    /// Reads the current seq of each id, routed like [`Self::next_batch`] (gRPC only).
    pub async fn current_batch(
        &self,
        namespace: &str,
        ids: Vec<u64>,
    ) -> Result<Vec<u64>, ClientError> {
        self.routed(namespace, ids, false).await
    }
}
