//! The Rust client of imstate.
//!
//! It speaks the gRPC protocol of `proto/imstate.proto` and hands out plain Rust values. It
//! remembers the newest route table a node has sent (every reply carries the node's version, and
//! the full table when the client's is older), so that later cluster modes can route requests to
//! the owner of an id without a lookup service.

#![deny(missing_docs)]

use std::sync::Arc;
use std::time::Duration;

use imstate_proto::v1 as pb;
use imstate_proto::v1::presence_client::PresenceClient;
use imstate_proto::v1::sequence_client::SequenceClient;
use route_cache::RouteCache;
use tonic::transport::{Channel, Endpoint};

/// An error talking to a node.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// The address is invalid or the node could not be reached.
    #[error("cannot connect to {address}: {reason}")]
    Connect {
        /// The address tried.
        address: String,
        /// Why it failed.
        reason: String,
    },
    /// The node answered with an error.
    #[error("{message} ({code:?})")]
    Status {
        /// The gRPC status code.
        code: tonic::Code,
        /// The node's message.
        message: String,
    },
}

impl From<tonic::Status> for ClientError {
    fn from(status: tonic::Status) -> Self {
        ClientError::Status {
            code: status.code(),
            message: status.message().to_string(),
        }
    }
}

impl ClientError {
    /// The gRPC code, if the node answered.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            ClientError::Status { code, .. } => Some(*code),
            ClientError::Connect { .. } => None,
        }
    }
}

/// A namespace definition as the node reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    /// Name.
    pub name: String,
    /// First id.
    pub id_lo: u64,
    /// One past the last id.
    pub id_hi: u64,
    /// Ids per section (0 in a create request: the default).
    pub section_size: u64,
    /// Raise step (0 in a create request: the default).
    pub step: u64,
}

/// One route table entry: which node serves sections of a namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Namespace.
    pub namespace: String,
    /// First section.
    pub section_lo: u64,
    /// One past the last section.
    pub section_hi: u64,
    /// The node's address.
    pub node: String,
}

mod route_cache {
    //! A tiny cache of the newest route table seen, shared by clones of a client.

    use std::sync::Mutex;

    use super::{Route, pb};

    /// The newest route table seen; `std::sync::Mutex` because it is touched once per reply
    /// for a few nanoseconds and never across an await.
    #[derive(Debug, Default)]
    pub struct RouteCache {
        inner: Mutex<(u64, Vec<Route>)>,
    }

    impl RouteCache {
        pub fn version(&self) -> u64 {
            self.inner.lock().map(|guard| guard.0).unwrap_or(0)
        }

        pub fn routes(&self) -> (u64, Vec<Route>) {
            self.inner
                .lock()
                .map(|guard| guard.clone())
                .unwrap_or_default()
        }

        pub fn learn(&self, route: Option<pb::RouteInfo>) {
            let Some(pb::RouteInfo {
                table: Some(table), ..
            }) = route
            else {
                return;
            };
            if let Ok(mut guard) = self.inner.lock()
                && table.version > guard.0
            {
                let routes = table
                    .entries
                    .into_iter()
                    .map(|entry| Route {
                        namespace: entry.namespace,
                        section_lo: entry.section_lo,
                        section_hi: entry.section_hi,
                        node: entry.node,
                    })
                    .collect();
                *guard = (table.version, routes);
            }
        }
    }
}

/// A connection to one node. Cheap to clone; clones share the connection and the route cache.
#[derive(Clone)]
pub struct Client {
    sequence: SequenceClient<Channel>,
    presence: PresenceClient<Channel>,
    routes: Arc<RouteCache>,
}

mod presence;
pub use presence::{LoginArgs, LoginResult, Session, WatchEvent, WatchKind};

/// Timeout for establishing a connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

impl Client {
    /// Connects to `address` (`host:port` or `http://host:port`).
    pub async fn connect(address: &str) -> Result<Self, ClientError> {
        let uri = if address.contains("://") {
            address.to_string()
        } else {
            format!("http://{address}")
        };
        let fail = |reason: String| ClientError::Connect {
            address: address.to_string(),
            reason,
        };
        let channel = Endpoint::from_shared(uri)
            .map_err(|error| fail(error.to_string()))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(|error| fail(source_chain(&error)))?;
        Ok(Self::from_channel(channel))
    }

    /// Wraps an existing channel.
    pub fn from_channel(channel: Channel) -> Self {
        Self {
            sequence: SequenceClient::new(channel.clone()),
            presence: PresenceClient::new(channel),
            routes: Arc::default(),
        }
    }

    /// The newest route table this client has seen: (version, entries).
    pub fn routes(&self) -> (u64, Vec<Route>) {
        self.routes.routes()
    }

    /// Allocates the next seq of `id` in `namespace` ("" = default).
    pub async fn next(&self, namespace: &str, id: u64) -> Result<u64, ClientError> {
        let request = pb::NextRequest {
            namespace: namespace.to_string(),
            id,
            route_version: self.routes.version(),
        };
        let reply = self.sequence.clone().next(request).await?.into_inner();
        self.routes.learn(reply.route);
        Ok(reply.seq)
    }

    /// Allocates one seq per id in one call; a repeated id gets increasing values.
    pub async fn next_batch(
        &self,
        namespace: &str,
        ids: Vec<u64>,
    ) -> Result<Vec<u64>, ClientError> {
        let request = pb::NextBatchRequest {
            namespace: namespace.to_string(),
            ids,
            route_version: self.routes.version(),
        };
        let reply = self
            .sequence
            .clone()
            .next_batch(request)
            .await?
            .into_inner();
        self.routes.learn(reply.route);
        Ok(reply.seqs)
    }

    /// Reads the current seq of `id` without allocating.
    pub async fn current(&self, namespace: &str, id: u64) -> Result<u64, ClientError> {
        let request = pb::CurrentRequest {
            namespace: namespace.to_string(),
            id,
            route_version: self.routes.version(),
        };
        let reply = self.sequence.clone().current(request).await?.into_inner();
        self.routes.learn(reply.route);
        Ok(reply.seq)
    }

    /// Reads the current seq of each id in one call.
    pub async fn current_batch(
        &self,
        namespace: &str,
        ids: Vec<u64>,
    ) -> Result<Vec<u64>, ClientError> {
        let request = pb::CurrentBatchRequest {
            namespace: namespace.to_string(),
            ids,
            route_version: self.routes.version(),
        };
        let reply = self
            .sequence
            .clone()
            .current_batch(request)
            .await?
            .into_inner();
        self.routes.learn(reply.route);
        Ok(reply.seqs)
    }

    /// Creates a namespace (durable when this returns).
    pub async fn create_namespace(&self, namespace: Namespace) -> Result<Namespace, ClientError> {
        let request = pb::CreateNamespaceRequest {
            namespace: Some(namespace_to_pb(namespace)),
        };
        let reply = self
            .sequence
            .clone()
            .create_namespace(request)
            .await?
            .into_inner();
        self.routes.learn(reply.route);
        reply
            .namespace
            .map(namespace_from_pb)
            .ok_or_else(|| ClientError::Status {
                code: tonic::Code::Internal,
                message: "reply without namespace".into(),
            })
    }

    /// Lists every namespace.
    pub async fn list_namespaces(&self) -> Result<Vec<Namespace>, ClientError> {
        let reply = self
            .sequence
            .clone()
            .list_namespaces(pb::ListNamespacesRequest {})
            .await?
            .into_inner();
        self.routes.learn(reply.route);
        Ok(reply
            .namespaces
            .into_iter()
            .map(namespace_from_pb)
            .collect())
    }
}

fn namespace_to_pb(namespace: Namespace) -> pb::Namespace {
    pb::Namespace {
        name: namespace.name,
        id_lo: namespace.id_lo,
        id_hi: namespace.id_hi,
        section_size: namespace.section_size,
        step: namespace.step,
    }
}

fn namespace_from_pb(namespace: pb::Namespace) -> Namespace {
    Namespace {
        name: namespace.name,
        id_lo: namespace.id_lo,
        id_hi: namespace.id_hi,
        section_size: namespace.section_size,
        step: namespace.step,
    }
}

/// Joins an error with its sources: tonic's transport errors hide the useful part in a source.
fn source_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}
