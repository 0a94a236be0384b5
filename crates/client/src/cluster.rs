//! The smart client of the sequence service: given any one node, it routes each id to the
//! node that owns its section, splits a NextBatch across owners, follows redirects and
//! refreshes its route table; against an embedded node it simply talks to that node.
//!
//! ```text
//!  next_batch(ns, ids) ──► section of each id (namespace layout, cached)
//!        ──► owner of each section (route table, cached) ──► one NextBatch per owner, at once
//!        ──► reassembled in request order
//!  a redirect (FAILED_PRECONDITION + owner) or UNAVAILABLE ──► refresh the table, retry
//!  (bounded: ATTEMPTS_MAX tries within the call's deadline)
//! ```
//!
//! A table of another cluster than the one the client was pointed at (or told to expect) is
//! refused: mixing two clusters' sequences would break monotonicity.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;

use crate::{Client, ClientError, ClientOptions, Namespace, RouteTable};

/// Tries per call (redirects and retries of unavailable owners together); the deadline
/// usually ends a call first.
pub const ATTEMPTS_MAX: usize = 400;
/// Longest a call keeps retrying while a section moves or its owner fails over.
pub const CALL_DEADLINE: Duration = Duration::from_secs(15);
/// Wait between retries when the owner is unavailable (failing over, lock-delay).
const RETRY_PAUSE: Duration = Duration::from_millis(100);

struct State {
    table: RouteTable,
    namespaces: HashMap<String, Namespace>,
    clients: HashMap<String, Client>,
}

/// A client of a whole cluster (or of one embedded node).
#[derive(Clone)]
pub struct ClusterClient {
    seed: String,
    options: ClientOptions,
    expected_cluster: Option<String>,
    state: Arc<Mutex<State>>,
}

impl ClusterClient {
    /// Connects to any node at `address` and reads its route table. With
    /// `expected_cluster`, a node of another cluster is refused.
    pub async fn connect(
        address: &str,
        options: &ClientOptions,
        expected_cluster: Option<&str>,
    ) -> Result<Self, ClientError> {
        let seed = Client::connect_with(address, options).await?;
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
    async fn refresh(&self, from: &Client) -> Result<(), ClientError> {
        let table = from.route().await?;
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
        let namespaces = from.list_namespaces().await?;
        let mut state = self.state.lock().await;
        if table.version >= state.table.version || table.cluster != state.table.cluster {
            state.table = table;
        }
        for namespace in namespaces {
            state.namespaces.insert(namespace.name.clone(), namespace);
        }
        Ok(())
    }

    async fn client(&self, address: &str) -> Result<Client, ClientError> {
        if let Some(client) = self.state.lock().await.clients.get(address) {
            return Ok(client.clone());
        }
        let client = Client::connect_with(address, &self.options).await?;
        self.state
            .lock()
            .await
            .clients
            .insert(address.to_owned(), client.clone());
        Ok(client)
    }

    /// The gRPC address serving each id's section (the seed for an embedded node or when the
    /// table does not know the section yet).
    async fn owners(&self, namespace: &str, ids: &[u64]) -> Result<Vec<String>, ClientError> {
        let name = if namespace.is_empty() {
            "default"
        } else {
            namespace
        };
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
                    .map(|route| route.node.clone())
                    .filter(|node| !node.is_empty());
                owner.unwrap_or_else(|| self.seed.clone())
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

    /// Reads the current seq of each id, routed like [`Self::next_batch`].
    pub async fn current_batch(
        &self,
        namespace: &str,
        ids: Vec<u64>,
    ) -> Result<Vec<u64>, ClientError> {
        self.routed(namespace, ids, false).await
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
                    let result = if allocate {
                        client.next_batch(namespace, group).await
                    } else {
                        client.current_batch(namespace, group).await
                    };
                    Ok::<_, ClientError>((positions, result))
                }
            });
            let mut retry_pause = false;
            for outcome in futures_join(calls).await {
                let (positions, result) = match outcome {
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
                    }
                    Err(ClientError::Moved { grpc, .. }) => {
                        // The owner's table is newer than ours: learn it there.
                        let owner = self.client(&grpc).await?;
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
            if retry_pause {
                tokio::time::sleep(RETRY_PAUSE).await;
                // Learn the table again from any node that answers.
                let addresses: Vec<String> = {
                    let state = self.state.lock().await;
                    let mut addresses: Vec<String> = state
                        .table
                        .nodes
                        .iter()
                        .filter(|node| node.alive)
                        .map(|node| node.grpc.clone())
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
        }
        Err(last_error.unwrap_or(ClientError::Connection {
            reason: format!(
                "no owner answered within {} s ({ATTEMPTS_MAX} tries)",
                CALL_DEADLINE.as_secs()
            ),
        }))
    }
}

/// Runs futures concurrently and returns their outputs in order.
async fn futures_join<F: std::future::Future>(calls: impl Iterator<Item = F>) -> Vec<F::Output> {
    let handles: Vec<_> = calls.map(Box::pin).collect();
    let mut outputs = Vec::with_capacity(handles.len());
    // Few owners per call (at most the cluster's size): polling them in turn is enough.
    let mut pending: Vec<Option<std::pin::Pin<Box<F>>>> = handles.into_iter().map(Some).collect();
    let mut results: Vec<Option<F::Output>> = (0..pending.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut done = true;
        for (index, slot) in pending.iter_mut().enumerate() {
            if let Some(future) = slot {
                match future.as_mut().poll(cx) {
                    std::task::Poll::Ready(output) => {
                        results[index] = Some(output);
                        *slot = None;
                    }
                    std::task::Poll::Pending => done = false,
                }
            }
        }
        if done {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    outputs.extend(
        results
            .into_iter()
            .map(|output| output.expect("every future finished")),
    );
    outputs
}
