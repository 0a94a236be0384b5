//! The Rust client of imstate.
//!
//! It speaks the gRPC protocol of `proto/imstate.proto` and hands out plain Rust values. It
//! remembers the newest route table a node has sent (every reply carries the node's version, and
//! the full table when the client's is older), so that later cluster modes can route requests to
//! the owner of an id without a lookup service.
//!
//! [`Client::connect`] speaks plaintext without credentials; [`Client::connect_with`] takes
//! [`ClientOptions`]: a CA to verify the node's TLS certificate, a client certificate for mTLS,
//! and a bearer token sent with every call.
//!
//! [`WireClient`] speaks the lean wire protocol (`imstate-wire`) of the hot path instead:
//! Next, NextBatch, Login, Logout, Heartbeat, HeartbeatBatch and LookupBatch, pipelined on one
//! TCP connection, with the same domain types and errors.

#![deny(missing_docs)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use imstate_proto::v1 as pb;
use imstate_proto::v1::admin_client::AdminClient;
use imstate_proto::v1::presence_client::PresenceClient;
use imstate_proto::v1::sequence_client::SequenceClient;
use route_cache::RouteCache;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// Largest reply the client accepts: the node's own ceiling on a gRPC reply
/// (`imstate_server::grpc::limits::GRPC_REPLY_BYTES_MAX`), so a large LookupBatch that the node
/// sends is never refused here (tonic's default is 4 MiB).
pub const REPLY_BYTES_MAX: usize = 64 << 20;

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
    /// A TLS or token file could not be read or used.
    #[error("{what}: {reason}")]
    Options {
        /// Which option.
        what: String,
        /// Why it failed.
        reason: String,
    },
    /// A wire-protocol connection failed or the node broke the protocol: the outcome of the
    /// calls in flight is unknown.
    #[error("wire connection: {reason}")]
    Connection {
        /// What happened.
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
    /// Cluster mode: another node owns the section (the smart client goes there).
    #[error("{message} (moved)")]
    Moved {
        /// The owner's node id.
        owner: String,
        /// Its gRPC address.
        grpc: String,
        /// Its wire address.
        wire: String,
        /// The route version that names it.
        version: u64,
        /// The node's message.
        message: String,
    },
}

impl From<tonic::Status> for ClientError {
    fn from(status: tonic::Status) -> Self {
        let metadata = status.metadata();
        let text = |key: &str| {
            metadata
                .get(key)
                .and_then(|value| value.to_str().ok())
                .map(str::to_owned)
        };
        if status.code() == tonic::Code::FailedPrecondition
            && let (Some(owner), Some(grpc)) = (text("imstate-owner"), text("imstate-owner-grpc"))
        {
            return ClientError::Moved {
                owner,
                grpc,
                wire: text("imstate-owner-wire").unwrap_or_default(),
                version: text("imstate-route-version")
                    .and_then(|version| version.parse().ok())
                    .unwrap_or(0),
                message: status.message().to_string(),
            };
        }
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
            ClientError::Moved { .. } => Some(tonic::Code::FailedPrecondition),
            ClientError::Connect { .. }
            | ClientError::Options { .. }
            | ClientError::Connection { .. } => None,
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
    /// `numeric` (ids are numbers) or `string` (ids are keys of 1 to 128 bytes); empty in a
    /// create request means numeric.
    pub keys: String,
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
    /// The node's gRPC address.
    pub node: String,
    /// The node's id (cluster mode; empty when embedded).
    pub node_id: String,
    /// The node's wire address.
    pub wire: String,
}

/// A node of the cluster as `Admin/Route` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRoute {
    /// Its id.
    pub node_id: String,
    /// Its gRPC address.
    pub grpc: String,
    /// Its wire address.
    pub wire: String,
    /// Whether its lease is alive.
    pub alive: bool,
    /// Whether it is asked to drain.
    pub draining: bool,
}

/// Presence slots `[slot_lo, slot_hi)` and where they live (cluster mode).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotRoute {
    /// First slot.
    pub slot_lo: u32,
    /// One past the last slot.
    pub slot_hi: u32,
    /// The primary's node id.
    pub primary_id: String,
    /// The primary's gRPC address.
    pub primary: String,
    /// The primary's wire address.
    pub primary_wire: String,
    /// The replica's node id (empty: none).
    pub replica_id: String,
    /// A node syncing to take the replica's place (empty: none).
    pub joining_id: String,
}

/// The route table as a node serves under it (`Admin/Route`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RouteTable {
    /// The cluster's name (empty when the node runs embedded).
    pub cluster: String,
    /// The table's version.
    pub version: u64,
    /// Section ranges and their owners.
    pub routes: Vec<Route>,
    /// The nodes (cluster mode).
    pub nodes: Vec<NodeRoute>,
    /// Presence slots (cluster mode; 0 when one node serves every uid).
    pub presence_slots: u32,
    /// Presence slot ranges and their primaries and replicas (cluster mode).
    pub slots: Vec<SlotRoute>,
}

impl RouteTable {
    /// The slot range of `uid`'s presence, when slots are placed.
    pub fn slot_route(&self, uid: u64) -> Option<&SlotRoute> {
        if self.presence_slots == 0 {
            return None;
        }
        let slot = (uid % u64::from(self.presence_slots)) as u32;
        let at = self.slots.partition_point(|range| range.slot_hi <= slot);
        self.slots
            .get(at)
            .filter(|range| (range.slot_lo..range.slot_hi).contains(&slot))
    }
}

/// Converts a protocol route table.
pub(crate) fn routes_from_pb(table: pb::RouteTable) -> RouteTable {
    RouteTable {
        cluster: table.cluster,
        version: table.version,
        routes: table
            .entries
            .into_iter()
            .map(|entry| Route {
                namespace: entry.namespace,
                section_lo: entry.section_lo,
                section_hi: entry.section_hi,
                node: entry.node,
                node_id: entry.node_id,
                wire: entry.wire,
            })
            .collect(),
        nodes: Vec::new(),
        presence_slots: table.presence_slots,
        slots: table
            .slots
            .into_iter()
            .map(|entry| SlotRoute {
                slot_lo: entry.slot_lo,
                slot_hi: entry.slot_hi,
                primary_id: entry.primary_id,
                primary: entry.primary,
                primary_wire: entry.primary_wire,
                replica_id: entry.replica_id,
                joining_id: entry.joining_id,
            })
            .collect(),
    }
}

/// The namespace a request names: the empty name is `default`.
pub(crate) fn default_namespace(name: &str) -> &str {
    if name.is_empty() { "default" } else { name }
}

/// Converts an `Admin/Route` reply.
pub(crate) fn route_from_reply(reply: pb::RouteReply) -> RouteTable {
    let mut table = routes_from_pb(reply.table.unwrap_or_default());
    table.nodes = reply
        .nodes
        .into_iter()
        .map(|node| NodeRoute {
            node_id: node.node_id,
            grpc: node.grpc,
            wire: node.wire,
            alive: node.alive,
            draining: node.draining,
        })
        .collect();
    table
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
                *guard = (table.version, super::routes_from_pb(table).routes);
            }
        }
    }
}

/// How to reach a node: TLS (server CA, optional client certificate) and a bearer token.
/// The default is plaintext without a token, which is what [`Client::connect`] uses.
#[derive(Clone, Default)]
pub struct ClientOptions {
    /// PEM CA bundle that signed the node's certificate; setting it turns TLS on.
    pub tls_ca_pem: Option<Vec<u8>>,
    /// PEM client certificate chain and private key, for nodes that require mTLS.
    pub tls_identity_pem: Option<(Vec<u8>, Vec<u8>)>,
    /// Name to verify in the node's certificate; defaults to the host of the address.
    pub tls_domain: Option<String>,
    /// Bearer token sent as `authorization: Bearer <token>` with every call.
    pub token: Option<String>,
}

impl std::fmt::Debug for ClientOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientOptions")
            .field("tls", &self.tls_ca_pem.is_some())
            .field("mtls", &self.tls_identity_pem.is_some())
            .field("tls_domain", &self.tls_domain)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// Longest token file the client reads, in bytes (B1).
pub const TOKEN_FILE_BYTES_MAX: u64 = 64 * 1024;

impl ClientOptions {
    /// Reads the options from files: a CA bundle, a client certificate and key (both or
    /// neither), and a token file whose first non-empty, non-`#` line is the token.
    pub fn from_files(
        tls_ca: Option<&Path>,
        tls_cert: Option<&Path>,
        tls_key: Option<&Path>,
        token_file: Option<&Path>,
    ) -> Result<Self, ClientError> {
        let read = |what: &str, path: &Path| {
            std::fs::read(path).map_err(|error| ClientError::Options {
                what: what.to_string(),
                reason: format!("cannot read {}: {error}", path.display()),
            })
        };
        let mut options = ClientOptions::default();
        if let Some(path) = tls_ca {
            options.tls_ca_pem = Some(read("--tls-ca", path)?);
        }
        match (tls_cert, tls_key) {
            (Some(cert), Some(key)) => {
                options.tls_identity_pem =
                    Some((read("--tls-cert", cert)?, read("--tls-key", key)?));
            }
            (None, None) => {}
            _ => {
                return Err(ClientError::Options {
                    what: "--tls-cert/--tls-key".into(),
                    reason: "give both or neither".into(),
                });
            }
        }
        if options.tls_identity_pem.is_some() && options.tls_ca_pem.is_none() {
            return Err(ClientError::Options {
                what: "--tls-cert".into(),
                reason: "a client certificate needs --tls-ca (TLS)".into(),
            });
        }
        if let Some(path) = token_file {
            let fail = |reason: String| ClientError::Options {
                what: "--token-file".into(),
                reason,
            };
            let length = std::fs::metadata(path)
                .map_err(|error| fail(format!("cannot read {}: {error}", path.display())))?
                .len();
            if length > TOKEN_FILE_BYTES_MAX {
                return Err(fail(format!("larger than {TOKEN_FILE_BYTES_MAX} bytes")));
            }
            let text = String::from_utf8(read("--token-file", path)?)
                .map_err(|_| fail("not UTF-8 text".into()))?;
            let token = text
                .lines()
                .map(str::trim)
                .find(|line| !line.is_empty() && !line.starts_with('#'))
                .ok_or_else(|| fail(format!("no token in {}", path.display())))?;
            options.token = Some(token.to_string());
        }
        Ok(options)
    }
}

/// Adds the bearer token (if any) to every call.
#[derive(Clone, Default)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl Interceptor for BearerToken {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// The transport of every generated client: the channel plus the token interceptor.
pub type Transport = InterceptedService<Channel, BearerToken>;

/// A connection to one node. Cheap to clone; clones share the connection and the route cache.
#[derive(Clone)]
pub struct Client {
    sequence: SequenceClient<Transport>,
    presence: PresenceClient<Transport>,
    admin: AdminClient<Transport>,
    routes: Arc<RouteCache>,
}

/// The state of one write-ahead log of a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogStatus {
    /// `seq` or `presence`.
    pub name: String,
    /// Highest LSN assigned.
    pub last_lsn: u64,
    /// Highest LSN durable under the log's policy.
    pub durable_lsn: u64,
    /// Highest LSN fsynced.
    pub synced_lsn: u64,
    /// LSN covered by the newest checkpoint, if any.
    pub checkpoint_lsn: Option<u64>,
    /// Log bytes since that checkpoint.
    pub bytes_since_checkpoint: u64,
    /// Segment files.
    pub segments: u64,
    /// Whether the log is poisoned.
    pub poisoned: bool,
    /// The fsync policy.
    pub fsync: String,
}

/// What `Admin/Status` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeStatus {
    /// The server's version.
    pub version: String,
    /// Time since the node started.
    pub uptime: Duration,
    /// `embedded` (single node), or in cluster mode `arbiter`, `member` or `joining`.
    pub role: String,
    /// Cluster mode: the cluster's name (empty when embedded).
    pub cluster: String,
    /// Cluster mode: this node's id.
    pub node_id: String,
    /// Cluster mode: how long the node's lease is still confirmed for.
    pub lease_valid: Duration,
    /// Cluster mode: sections this node owns.
    pub sections_owned: u64,
    /// Cluster mode: who holds this node's id when it cannot register.
    pub blocked_by: String,
    /// Route table version.
    pub route_version: u64,
    /// Every namespace.
    pub namespaces: Vec<Namespace>,
    /// Sessions online.
    pub sessions_online: u64,
    /// Sections with a max_seq in memory.
    pub sections_loaded: u64,
    /// Both logs.
    pub logs: Vec<LogStatus>,
    /// Cluster mode: this node's presence replica streams, as their primary sees them.
    pub replicas: Vec<ReplicaStatus>,
}

/// One presence replica stream, as its primary sees it (`Admin/Status`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaStatus {
    /// The replica's node id.
    pub replica_id: String,
    /// Slots the stream carries.
    pub slots: u32,
    /// Whether the replica holds everything up to its snapshot or resume position.
    pub in_sync: bool,
    /// The primary's LSN through which the replica holds every record durably.
    pub acked_lsn: u64,
    /// Records not acknowledged yet.
    pub lag_records: u64,
    /// How long the oldest of them has waited (`None`: the change feed no longer holds it).
    pub lag: Option<Duration>,
}

/// One checkpoint written by `Admin/Checkpoint`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointResult {
    /// `seq` or `presence`.
    pub name: String,
    /// Every record up to this LSN is in the checkpoint.
    pub covered_lsn: u64,
    /// Data bytes.
    pub bytes: u64,
    /// Wall time.
    pub elapsed: Duration,
    /// Log segments deleted.
    pub segments_removed: u64,
}

/// Consecutive seqs reserved for one id by a range allocation: `first..=last`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SeqRange {
    /// The first seq of the range.
    pub first: u64,
    /// The last seq of the range (`first + count - 1`).
    pub last: u64,
}

impl SeqRange {
    /// The range of `count` seqs that ends at `last`, as nodes answer ranges. A node that
    /// answers a last below `count` is broken: a protocol error, not an underflow.
    pub fn ending_at(last: u64, count: u64) -> Result<SeqRange, ClientError> {
        let first = last
            .checked_sub(count.saturating_sub(1))
            .filter(|&first| first >= 1 && count >= 1)
            .ok_or_else(|| broken_reply(format!("a range of {count} ending at {last}")))?;
        Ok(SeqRange { first, last })
    }
}

/// The error of a reply that breaks the protocol (the call's outcome is unknown).
pub(crate) fn broken_reply(reason: String) -> ClientError {
    ClientError::Connection {
        reason: format!("protocol error: {reason}"),
    }
}

pub mod cluster;
mod clusterwatch;
mod presence;
pub mod wire;
pub use cluster::{ClusterClient, SeqCall, SeqTransport, SmartClient, WireClusterClient};
pub use clusterwatch::{ClusterWatch, ClusterWatchItem};
pub use presence::{
    LoginArgs, LoginResult, Session, WatchEvent, WatchKind, WatchPosition, WatchStream,
};
pub use wire::WireClient;

/// Timeout for establishing a connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 PING interval on every gRPC connection, idle or not, so that a node that stopped
/// answering (paused, or cut without a reset) fails the calls and streams on it, a Watch
/// above all, instead of leaving them waiting forever.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
/// How long a PING may go unanswered before the connection is closed as dead.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(3);

impl Client {
    /// Connects to `address` (`host:port` or `http://host:port`) in plaintext, without a token.
    pub async fn connect(address: &str) -> Result<Self, ClientError> {
        Self::connect_with(address, &ClientOptions::default()).await
    }

    /// Connects to `address` with TLS and/or a token as `options` say.
    pub async fn connect_with(
        address: &str,
        options: &ClientOptions,
    ) -> Result<Self, ClientError> {
        let tls = options.tls_ca_pem.is_some();
        let uri = if address.contains("://") {
            address.to_string()
        } else if tls {
            format!("https://{address}")
        } else {
            format!("http://{address}")
        };
        let fail = |reason: String| ClientError::Connect {
            address: address.to_string(),
            reason,
        };
        let mut endpoint = Endpoint::from_shared(uri)
            .map_err(|error| fail(error.to_string()))?
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            .tcp_nodelay(true);
        if let Some(ca) = &options.tls_ca_pem {
            let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
            if let Some((cert, key)) = &options.tls_identity_pem {
                config = config.identity(Identity::from_pem(cert, key));
            }
            if let Some(domain) = &options.tls_domain {
                config = config.domain_name(domain.clone());
            }
            endpoint = endpoint
                .tls_config(config)
                .map_err(|error| fail(source_chain(&error)))?;
        }
        let token = match &options.token {
            Some(token) => Some(
                format!("Bearer {token}")
                    .parse::<MetadataValue<Ascii>>()
                    .map_err(|_| ClientError::Options {
                        what: "token".into(),
                        reason: "not printable ASCII".into(),
                    })?,
            ),
            None => None,
        };
        let channel = endpoint
            .connect()
            .await
            .map_err(|error| fail(source_chain(&error)))?;
        Ok(Self::with_token(channel, BearerToken(token)))
    }

    /// Wraps an existing channel (no token).
    pub fn from_channel(channel: Channel) -> Self {
        Self::with_token(channel, BearerToken::default())
    }

    fn with_token(channel: Channel, token: BearerToken) -> Self {
        let transport = InterceptedService::new(channel, token);
        Self {
            sequence: SequenceClient::new(transport.clone())
                .max_decoding_message_size(REPLY_BYTES_MAX),
            presence: PresenceClient::new(transport.clone())
                .max_decoding_message_size(REPLY_BYTES_MAX),
            admin: AdminClient::new(transport).max_decoding_message_size(REPLY_BYTES_MAX),
            routes: Arc::default(),
        }
    }

    /// The node's status (`Admin/Status`).
    pub async fn status(&self) -> Result<NodeStatus, ClientError> {
        let reply = self
            .admin
            .clone()
            .status(pb::StatusRequest {})
            .await?
            .into_inner();
        Ok(NodeStatus {
            version: reply.version,
            uptime: Duration::from_millis(reply.uptime_ms),
            role: reply.role,
            cluster: reply.cluster,
            node_id: reply.node_id,
            lease_valid: Duration::from_millis(reply.lease_valid_ms),
            sections_owned: reply.sections_owned,
            blocked_by: reply.blocked_by,
            route_version: reply.route_version,
            namespaces: reply
                .namespaces
                .into_iter()
                .map(namespace_from_pb)
                .collect(),
            sessions_online: reply.sessions_online,
            sections_loaded: reply.sections_loaded,
            logs: reply
                .logs
                .into_iter()
                .map(|log| LogStatus {
                    name: log.name,
                    last_lsn: log.last_lsn,
                    durable_lsn: log.durable_lsn,
                    synced_lsn: log.synced_lsn,
                    checkpoint_lsn: log.has_checkpoint.then_some(log.checkpoint_lsn),
                    bytes_since_checkpoint: log.bytes_since_checkpoint,
                    segments: log.segments,
                    poisoned: log.poisoned,
                    fsync: log.fsync,
                })
                .collect(),
            replicas: reply
                .replicas
                .into_iter()
                .map(|replica| ReplicaStatus {
                    replica_id: replica.replica_id,
                    slots: replica.slots,
                    in_sync: replica.in_sync,
                    acked_lsn: replica.acked_lsn,
                    lag_records: replica.lag_records,
                    lag: replica.lag_ms.map(Duration::from_millis),
                })
                .collect(),
        })
    }

    /// Forces a checkpoint of both stores now (`Admin/Checkpoint`).
    pub async fn checkpoint(&self) -> Result<Vec<CheckpointResult>, ClientError> {
        let reply = self
            .admin
            .clone()
            .checkpoint(pb::CheckpointRequest {})
            .await?
            .into_inner();
        Ok(reply
            .checkpoints
            .into_iter()
            .map(|checkpoint| CheckpointResult {
                name: checkpoint.name,
                covered_lsn: checkpoint.covered_lsn,
                bytes: checkpoint.bytes,
                elapsed: Duration::from_millis(checkpoint.elapsed_ms),
                segments_removed: checkpoint.segments_removed,
            })
            .collect())
    }

    /// The route table the node serves under, with the cluster's nodes (`Admin/Route`).
    pub async fn route(&self) -> Result<RouteTable, ClientError> {
        let reply = self
            .admin
            .clone()
            .route(pb::RouteRequest {})
            .await?
            .into_inner();
        Ok(route_from_reply(reply))
    }

    /// Asks the arbiter to move every section away from `node` (or, with `undo`, to stop).
    pub async fn drain(&self, node: &str, undo: bool) -> Result<(), ClientError> {
        self.admin
            .clone()
            .drain(pb::DrainRequest {
                node_id: node.to_owned(),
                undo,
            })
            .await?;
        Ok(())
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
            keys: Vec::new(),
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

    /// Reserves `count` consecutive seqs for `id` (1 to 1,000,000).
    pub async fn next_range(
        &self,
        namespace: &str,
        id: u64,
        count: u64,
    ) -> Result<SeqRange, ClientError> {
        Ok(self.next_range_batch(namespace, vec![id], count).await?[0])
    }

    /// Reserves `count` consecutive seqs for each id, in order, in one call; a repeated id gets
    /// the range after its previous one.
    pub async fn next_range_batch(
        &self,
        namespace: &str,
        ids: Vec<u64>,
        count: u64,
    ) -> Result<Vec<SeqRange>, ClientError> {
        self.next_ranges(namespace, ids, Vec::new(), count).await
    }

    /// Reserves `count` consecutive seqs for each string key of a keyed namespace, in order
    /// (keys are 1 to 128 bytes; `count = 1` is one seq per key).
    pub async fn next_keys(
        &self,
        namespace: &str,
        keys: Vec<Vec<u8>>,
        count: u64,
    ) -> Result<Vec<SeqRange>, ClientError> {
        self.next_ranges(namespace, Vec::new(), keys, count).await
    }

    async fn next_ranges(
        &self,
        namespace: &str,
        ids: Vec<u64>,
        keys: Vec<Vec<u8>>,
        count: u64,
    ) -> Result<Vec<SeqRange>, ClientError> {
        let len = ids.len() + keys.len();
        let request = pb::NextRangeRequest {
            namespace: namespace.to_string(),
            ids,
            count,
            route_version: self.routes.version(),
            keys,
        };
        let reply = self
            .sequence
            .clone()
            .next_range(request)
            .await?
            .into_inner();
        self.routes.learn(reply.route);
        if reply.first.len() != len || reply.last.len() != len {
            return Err(broken_reply(format!(
                "{} ranges answered for {len} ids",
                reply.last.len()
            )));
        }
        Ok(reply
            .first
            .into_iter()
            .zip(reply.last)
            .map(|(first, last)| SeqRange { first, last })
            .collect())
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
        self.currents(namespace, ids, Vec::new()).await
    }

    /// Sets the `min_seq` (the floor below which history is hidden; 0 clears it) of each id,
    /// one value per id, all or none; durable when this returns. Give `ids` for a numeric
    /// namespace or `keys` for a keyed one.
    pub async fn set_min_seqs(
        &self,
        namespace: &str,
        ids: Vec<u64>,
        keys: Vec<Vec<u8>>,
        min_seqs: Vec<u64>,
    ) -> Result<(), ClientError> {
        let request = pb::SetMinSeqRequest {
            namespace: namespace.to_string(),
            ids,
            keys,
            min_seqs,
            route_version: self.routes.version(),
        };
        let reply = self
            .sequence
            .clone()
            .set_min_seq(request)
            .await?
            .into_inner();
        self.routes.learn(reply.route);
        Ok(())
    }

    /// Reads the `min_seq` of each id (`ids`) or key (`keys`); 0 where none was set.
    pub async fn min_seqs(
        &self,
        namespace: &str,
        ids: Vec<u64>,
        keys: Vec<Vec<u8>>,
    ) -> Result<Vec<u64>, ClientError> {
        let request = pb::GetMinSeqRequest {
            namespace: namespace.to_string(),
            ids,
            keys,
            route_version: self.routes.version(),
        };
        let reply = self
            .sequence
            .clone()
            .get_min_seq(request)
            .await?
            .into_inner();
        self.routes.learn(reply.route);
        Ok(reply.seqs)
    }

    /// Reads the current seq of each string key of a keyed namespace in one call.
    pub async fn current_keys(
        &self,
        namespace: &str,
        keys: Vec<Vec<u8>>,
    ) -> Result<Vec<u64>, ClientError> {
        self.currents(namespace, Vec::new(), keys).await
    }

    async fn currents(
        &self,
        namespace: &str,
        ids: Vec<u64>,
        keys: Vec<Vec<u8>>,
    ) -> Result<Vec<u64>, ClientError> {
        let request = pb::CurrentBatchRequest {
            namespace: namespace.to_string(),
            ids,
            route_version: self.routes.version(),
            keys,
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
        keys: namespace.keys,
    }
}

pub(crate) fn namespace_from_pb(namespace: pb::Namespace) -> Namespace {
    Namespace {
        name: namespace.name,
        id_lo: namespace.id_lo,
        id_hi: namespace.id_hi,
        section_size: namespace.section_size,
        step: namespace.step,
        keys: namespace.keys,
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
