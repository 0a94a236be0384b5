//! The node's configuration: defaults that run, a TOML file, environment variables, and flags
//! on top.
//!
//! Precedence is flags > environment > file > defaults. [`NodeConfig::resolve`] merges the file
//! and the environment; the binary applies flags after it. Every key is listed with its default
//! in [`EXAMPLE_TOML`] (printed by `imstate config example`); a unit test keeps that text equal
//! to [`NodeConfig::default`], key for key.
//!
//! Environment: `IMSTATE_<KEY>` sets a top-level key (`IMSTATE_LISTEN`, `IMSTATE_DATA_DIR`,
//! `IMSTATE_METRICS_LISTEN`, `IMSTATE_LOG_FORMAT`) and `IMSTATE_<SECTION>__<KEY>` (two
//! underscores) a key of a section (`IMSTATE_PRESENCE__FSYNC=always`,
//! `IMSTATE_SEQ__BATCH_IDS_MAX=5000`, `IMSTATE_AUTH__TOKEN_FILE=/etc/imstate/tokens`). A value
//! is read as a TOML value when it parses as one (numbers, booleans) and as a string otherwise.
//! A section variable naming an unknown key is an error naming the variable; other `IMSTATE_`
//! variables (the client's `IMSTATE_ADDR`, `IMSTATE_TOKEN_FILE`, ...) are not server keys and
//! are ignored here.
//!
//! Unknown keys and invalid values are start-up errors that name the key (serde's
//! `deny_unknown_fields` plus [`NodeConfig::validate`]). The configuration holds no secret
//! values, only paths to files that hold them (the TLS key, the tokens), so it is logged whole.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use imstate_seq::NamespaceDef;
use serde::{Deserialize, Serialize};

use imstate_node::NodeError;

/// Default data directory, relative to the working directory.
pub const DATA_DIR_DEFAULT: &str = "./imstate-data";
/// Default client listen address.
pub const LISTEN_DEFAULT: &str = "127.0.0.1:7700";
/// Default address of the HTTP listener (`/metrics`, `/healthz`, `/readyz`).
pub const METRICS_LISTEN_DEFAULT: &str = "127.0.0.1:7701";
/// Default address of the wire-protocol listener (the lean binary protocol of the hot path).
pub const WIRE_LISTEN_DEFAULT: &str = "127.0.0.1:7702";
/// Prefix of the environment variables that set configuration keys.
pub const ENV_PREFIX: &str = "IMSTATE_";
pub use imstate_node::seqstore::{
    BATCH_IDS_MAX_DEFAULT, CHECKPOINT_LOG_BYTES_DEFAULT, RAISE_WAIT_TIMEOUT_MS_DEFAULT,
};

/// The whole configuration of a node.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// Directory holding the logs and checkpoints; locked while the node runs.
    pub data_dir: PathBuf,
    /// Address of the gRPC listener. Port 0 picks a free port (printed at start-up).
    pub listen: SocketAddr,
    /// Address of the HTTP listener for `/metrics`, `/healthz` and `/readyz`. It starts before
    /// recovery, so `/readyz` answers 503 while a long log replays.
    pub metrics_listen: SocketAddr,
    /// Address of the wire-protocol listener: Next, NextBatch, Login, Logout, Heartbeat,
    /// HeartbeatBatch and LookupBatch in pipelined binary frames (`imstate-wire`). Same bearer
    /// tokens as gRPC, and TLS (mTLS) with the same `[tls]` certificates when they are set.
    /// Port 0 picks a free port.
    pub wire_listen: SocketAddr,
    /// Address of the RESP front door (Redis clients: INCR, INCRBY, GET, MGET on
    /// `namespace:id` keys); empty = off, the default. It has no TLS: beyond loopback it needs
    /// `[auth]` tokens (AUTH). Port 0 picks a free port.
    pub resp_listen: String,
    /// Log output format on stderr: `human` or `json`. Levels come from `RUST_LOG`.
    pub log_format: LogFormat,
    /// TLS on the gRPC and wire ports.
    pub tls: TlsConfig,
    /// Bearer-token authentication of gRPC calls.
    pub auth: AuthConfig,
    /// The sequence service.
    pub seq: SeqConfig,
    /// The presence registry.
    pub presence: PresenceConfig,
    /// Limits of the wire-protocol listener (the RESP front door shares its idle timeout and
    /// per-source connection limit).
    pub wire: WireConfig,
    /// The RESP front door.
    pub resp: RespConfig,
    /// Cluster mode (etcd); off while `cluster.name` is empty.
    pub cluster: ClusterConfig,
}

/// Cluster mode: many nodes serve the sequence space, coordinated through etcd.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// The cluster's name (its key prefix in etcd); empty = the embedded single-node mode.
    pub name: String,
    /// etcd client endpoints, comma-separated (`host:port` or `http://host:port`).
    pub etcd: String,
    /// This node's id, unique in the cluster: 1 to 64 bytes of `[A-Za-z0-9_.-]`.
    pub node_id: String,
    /// The gRPC address other nodes and clients reach this node at; empty = `listen`.
    pub advertise: String,
    /// The wire address clients reach this node at; empty = `wire_listen`.
    pub advertise_wire: String,
    /// The membership lease's TTL: a dead node's sections move within about 2 x this.
    pub lease_ttl_ms: u64,
    /// Most sections the arbiter moves per round when draining or rebalancing.
    pub moves_max: u64,
    /// How long presence slots whose primary and replica are both gone wait for one of them
    /// to come back with its copy (a whole-cluster restart) before another node takes them
    /// empty (gateways' heartbeats then refill them). 0 = at once; at most 3600000.
    pub orphan_grace_ms: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            name: String::new(),
            etcd: String::new(),
            node_id: String::new(),
            advertise: String::new(),
            advertise_wire: String::new(),
            lease_ttl_ms: 3_000,
            moves_max: 1_024,
            orphan_grace_ms: 30_000,
        }
    }
}

impl ClusterConfig {
    /// Whether cluster mode is on.
    pub fn enabled(&self) -> bool {
        !self.name.is_empty()
    }

    /// The etcd endpoints.
    pub fn endpoints(&self) -> Vec<String> {
        self.etcd
            .split(',')
            .map(str::trim)
            .filter(|endpoint| !endpoint.is_empty())
            .map(str::to_owned)
            .collect()
    }

    fn validate(&self, listen: SocketAddr, wire_listen: SocketAddr) -> Result<(), NodeError> {
        if !self.enabled() {
            return Ok(());
        }
        let fail = |message: String| Err(NodeError::Config(message));
        let name_ok = |name: &str| {
            !name.is_empty()
                && name.len() <= 64
                && name
                    .bytes()
                    .all(|byte| byte.is_ascii_alphanumeric() || b"_.-".contains(&byte))
        };
        if !name_ok(&self.name) {
            return fail(format!(
                "cluster.name `{}` must be 1..=64 bytes of [A-Za-z0-9_.-]",
                self.name.chars().take(64).collect::<String>()
            ));
        }
        if !name_ok(&self.node_id) {
            return fail(
                "cluster.node_id (--node-id) must be 1..=64 bytes of [A-Za-z0-9_.-] in cluster \
                 mode"
                    .into(),
            );
        }
        if self.endpoints().is_empty() {
            return fail("cluster.etcd (--etcd) must name at least one endpoint".into());
        }
        if self.lease_ttl_ms < 1_000 || self.lease_ttl_ms > 60_000 {
            return fail(format!(
                "cluster.lease_ttl_ms {} must be in 1000..=60000 (etcd counts whole seconds)",
                self.lease_ttl_ms
            ));
        }
        if self.moves_max == 0 {
            return fail("cluster.moves_max must be at least 1".into());
        }
        if self.orphan_grace_ms > 3_600_000 {
            return fail(format!(
                "cluster.orphan_grace_ms {} must be at most 3600000 (an hour)",
                self.orphan_grace_ms
            ));
        }
        for (key, advertised, listening) in [
            ("cluster.advertise", &self.advertise, listen),
            ("cluster.advertise_wire", &self.advertise_wire, wire_listen),
        ] {
            if advertised.is_empty() && (listening.port() == 0 || listening.ip().is_unspecified())
            {
                return fail(format!(
                    "{key} must be set when the node listens on {listening}: other nodes and \
                     clients need an address to reach it"
                ));
            }
        }
        Ok(())
    }
}

/// Limits of the wire-protocol listener (B1): what one client, or many, can hold of the node.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct WireConfig {
    /// A connection that has not sent `Hello` this long after it was accepted is closed.
    pub hello_timeout_ms: u64,
    /// A connection that completes no frame for this long, or does not take its replies for
    /// this long, is closed; 0 = never.
    pub idle_timeout_ms: u64,
    /// Connections open at once from one IP address (the node's whole limit is
    /// `CONNECTIONS_MAX`, 10,000): one host cannot lock every other client out.
    pub connections_per_source_max: usize,
    /// Bytes that all connections together may buffer for frames larger than one read
    /// (64 KiB); a frame that would go over it is refused with RESOURCE_EXHAUSTED.
    pub input_budget_bytes: usize,
}

impl Default for WireConfig {
    fn default() -> Self {
        Self {
            hello_timeout_ms: 10_000,
            idle_timeout_ms: 300_000,
            connections_per_source_max: 1_000,
            input_budget_bytes: 256 << 20,
        }
    }
}

impl WireConfig {
    /// The listener's limits, or an error naming the bad key.
    pub fn to_limits(&self) -> Result<crate::wire::WireLimits, NodeError> {
        if self.hello_timeout_ms == 0 {
            return Err(NodeError::Config(
                "wire.hello_timeout_ms must be at least 1".into(),
            ));
        }
        if self.connections_per_source_max == 0 {
            return Err(NodeError::Config(
                "wire.connections_per_source_max must be at least 1".into(),
            ));
        }
        if self.input_budget_bytes < imstate_wire::FRAME_BYTES_MAX + 4 {
            return Err(NodeError::Config(format!(
                "wire.input_budget_bytes must be at least one largest frame ({} bytes)",
                imstate_wire::FRAME_BYTES_MAX + 4
            )));
        }
        Ok(crate::wire::WireLimits {
            hello_timeout: Duration::from_millis(self.hello_timeout_ms),
            idle_timeout: (self.idle_timeout_ms > 0)
                .then(|| Duration::from_millis(self.idle_timeout_ms)),
            connections_per_source_max: self.connections_per_source_max,
            input_budget_bytes: self.input_budget_bytes,
        })
    }
}

/// The RESP front door (`resp_listen`).
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RespConfig {
    /// The namespace of a key whose part before the first `:` is not a namespace name. The
    /// node creates it as a keyed namespace when RESP is on and it does not exist.
    pub default_namespace: String,
}

/// The default of `resp.default_namespace`: a keyed namespace for Redis keys.
pub const RESP_DEFAULT_NAMESPACE: &str = "redis";

impl Default for RespConfig {
    fn default() -> Self {
        Self {
            default_namespace: RESP_DEFAULT_NAMESPACE.to_owned(),
        }
    }
}

impl NodeConfig {
    /// The RESP front door's address, `None` when it is off; an error names a bad address or
    /// a non-loopback one without tokens.
    pub fn resp_address(&self) -> Result<Option<SocketAddr>, NodeError> {
        if self.resp_listen.is_empty() {
            return Ok(None);
        }
        let address: SocketAddr = self.resp_listen.parse().map_err(|error| {
            NodeError::Config(format!("resp_listen `{}`: {error}", self.resp_listen))
        })?;
        if !address.ip().is_loopback() && !self.auth.enabled() {
            return Err(NodeError::Config(format!(
                "resp_listen `{address}` is beyond loopback, and the RESP port has no TLS:                  set [auth] token_file so clients must AUTH, or listen on loopback"
            )));
        }
        Ok(Some(address))
    }
}

/// Format of the node's log lines.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Human,
    /// One JSON object per line.
    Json,
}

/// TLS on the gRPC and wire ports (one set of files for both). Empty paths mean "not set".
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain of the server; with `key_file`, turns TLS on.
    pub cert_file: PathBuf,
    /// PEM private key of the server.
    pub key_file: PathBuf,
    /// PEM CA bundle; when set, every client must present a certificate it signed (mTLS).
    pub client_ca_file: PathBuf,
    /// Cluster mode: PEM CA bundle that signed the other nodes' certificates. A replica
    /// connects to its primary over TLS, verifies the primary's certificate against it (for
    /// the host of the primary's advertised address), and presents this node's own
    /// certificate (which must then allow client authentication if peers require mTLS).
    /// Empty: `client_ca_file` when set; with neither, a node serving TLS does not replicate
    /// presence (it says so at start).
    pub peer_ca_file: PathBuf,
}

impl TlsConfig {
    /// Whether TLS is on.
    pub fn enabled(&self) -> bool {
        !self.cert_file.as_os_str().is_empty()
    }
}

/// Bearer-token authentication. An empty path means "off".
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// File of accepted tokens, one per line (blank lines and lines starting with `#` are
    /// skipped). When set, every call except the gRPC health check must carry
    /// `authorization: Bearer <token>`.
    pub token_file: PathBuf,
}

impl AuthConfig {
    /// Whether token authentication is on.
    pub fn enabled(&self) -> bool {
        !self.token_file.as_os_str().is_empty()
    }
}

/// Largest value of each `presence.watch_*` limit: past it one subscriber's buffer or the
/// subscriber table alone could take gigabytes.
pub const WATCH_LIMIT_CEILING: usize = 1 << 20;

/// Smallest `presence.segment_bytes`: below it, rolls (each one fsync and a directory fsync)
/// would come too often.
pub const SEGMENT_BYTES_MIN: u64 = 64 * 1024;
/// Largest `presence.segment_bytes`: recovery reads one segment at a time into memory.
pub const SEGMENT_BYTES_MAX: u64 = 1 << 30;

/// Largest `presence.slots`: the route table lists slot ranges, and a replica streams each
/// slot it follows.
pub const PRESENCE_SLOTS_MAX: u32 = 65_536;

/// Configuration of the presence registry.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PresenceConfig {
    /// When an acknowledged presence change is durable: `always` (fsync before the reply),
    /// `batch:<ms>` (written before the reply, fsynced at least every <ms>), `never`.
    pub fsync: String,
    /// ttl of a login that does not set one.
    pub ttl_ms_default: u32,
    /// Largest ttl a login or gateway may ask for.
    pub ttl_ms_max: u32,
    /// Sessions one uid may hold (B1).
    pub sessions_per_uid_max: usize,
    /// uids in one LookupBatch (B1).
    pub lookup_ids_max: usize,
    /// Sessions in one HeartbeatBatch (B1).
    pub heartbeat_batch_max: usize,
    /// Distinct gateway names (B1).
    pub gateways_max: usize,
    /// Registry shards (uid % shards); more shards, less contention.
    pub shards: usize,
    /// How often expiry runs; a session is gone within ttl + tick_ms.
    pub tick_ms: u64,
    /// Log bytes since the last checkpoint that trigger one; 0 disables automatic ones.
    pub checkpoint_log_bytes: u64,
    /// Size of a presence log segment, and of the zero-filled spare the log keeps ready
    /// (preallocation); [`SEGMENT_BYTES_MIN`] to [`SEGMENT_BYTES_MAX`].
    pub segment_bytes: u64,
    /// Under `batch:T` and `never`: a request's own task writes the queued log records when no
    /// other writer is busy (after letting the other ready requests queue theirs), instead of
    /// handing them to the flusher thread: less CPU, a third of the context switches and more
    /// peak throughput per login. On by default; off hands every write to the flusher.
    pub inline_writes: bool,
    /// Events meant for a Watch subscriber that it may fall behind by before it is cut off
    /// (B1).
    pub watch_buffer_events: usize,
    /// Watch subscribers open at once (B1).
    pub watch_subscribers_max: usize,
    /// Uids in one Watch subscriber's filter (B1).
    pub watch_uids_max: usize,
    /// Recent Watch events kept so that a client reconnecting with its position gets what
    /// it missed (B1); 0 to 1,048,576, 0 turns resuming off.
    pub watch_history_events: usize,
    /// Cluster mode: presence slots (`uid % slots`), each with a primary and a replica; 1 to
    /// [`PRESENCE_SLOTS_MAX`]. Fixed for the life of a cluster: the first arbiter writes it
    /// into the route table, and a node configured otherwise serves no presence there (every
    /// presence request gets an error naming both counts).
    pub slots: u32,
    /// Cluster mode: `sync` (a write is acknowledged once the slot's in-sync replica holds
    /// it durably too) or `async` (once the local log has it; a primary's death loses what
    /// its replica had not received yet, milliseconds of writes).
    pub replication: String,
    /// Cluster mode, `sync`: longest a write waits for a replica's acknowledgement; a replica
    /// that takes longer is cut off (it resyncs) and the write is acknowledged without it.
    /// 10 to 60000.
    pub replica_ack_timeout_ms: u64,
    /// Cluster mode: refuse writes (login, logout, heartbeats) to a slot that no in-sync
    /// replica holds, instead of serving them with one copy (degraded, counted by the metric
    /// `imstate_cluster_presence_slots_degraded`). Reads are served either way.
    pub require_replica: bool,
    /// Cluster mode: bytes of recent change records a primary keeps for its replicas (B1).
    /// A replica that falls further behind (stalled, paused, slow) resyncs by snapshot; the
    /// primary's memory never grows with it. 65536 to 4294967296; default 64 MiB.
    pub replication_feed_bytes: u64,
    /// Cluster mode: a node's checkpoints take the sessions of its primary slots from parts
    /// their replicas build from their own copies (seed 004's checkpoint node), so the
    /// primary copies only its replica slots, and its log is kept through the oldest part.
    /// On by default. Off: every node copies all it holds (what it costs either way:
    /// docs/benchmarks.md). Single-node mode always copies.
    pub replica_checkpoints: bool,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        let registry = imstate_presence::RegistryOptions::default();
        Self {
            fsync: "batch:10ms".into(),
            ttl_ms_default: 90_000,
            ttl_ms_max: registry.ttl_ms_max,
            sessions_per_uid_max: registry.sessions_per_uid_max,
            lookup_ids_max: registry.lookup_ids_max,
            heartbeat_batch_max: registry.heartbeat_batch_max,
            gateways_max: registry.gateways_max,
            shards: registry.shards,
            tick_ms: 250,
            checkpoint_log_bytes: 128 * 1024 * 1024,
            segment_bytes: 64 * 1024 * 1024,
            inline_writes: true,
            watch_buffer_events: 8_192,
            watch_subscribers_max: 1_024,
            watch_uids_max: 10_000,
            watch_history_events: 16_384,
            slots: 1024,
            replication: "sync".into(),
            replica_ack_timeout_ms: 1_000,
            require_replica: false,
            replication_feed_bytes: 64 * 1024 * 1024,
            replica_checkpoints: true,
        }
    }
}

impl PresenceConfig {
    /// The store options this section describes, or an error naming the bad key.
    pub fn to_options(
        &self,
    ) -> Result<imstate_node::presencestore::PresenceStoreOptions, NodeError> {
        let fsync = self
            .fsync
            .parse()
            .map_err(|error| NodeError::Config(format!("presence.fsync: {error}")))?;
        let registry = imstate_presence::RegistryOptions {
            shards: self.shards,
            sessions_per_uid_max: self.sessions_per_uid_max,
            heartbeat_batch_max: self.heartbeat_batch_max,
            lookup_ids_max: self.lookup_ids_max,
            gateways_max: self.gateways_max,
            ttl_ms_max: self.ttl_ms_max,
        };
        registry
            .validate()
            .map_err(|error| NodeError::Config(format!("presence: {error}")))?;
        if self.ttl_ms_default == 0 || self.ttl_ms_default > self.ttl_ms_max {
            return Err(NodeError::Config(format!(
                "presence.ttl_ms_default must be in 1..={} (presence.ttl_ms_max)",
                self.ttl_ms_max
            )));
        }
        if self.tick_ms == 0 || self.tick_ms > 1_000 {
            return Err(NodeError::Config(
                "presence.tick_ms must be in 1..=1000".into(),
            ));
        }
        if !(SEGMENT_BYTES_MIN..=SEGMENT_BYTES_MAX).contains(&self.segment_bytes) {
            return Err(NodeError::Config(format!(
                "presence.segment_bytes must be in {SEGMENT_BYTES_MIN}..={SEGMENT_BYTES_MAX}"
            )));
        }
        if self.replication != "sync" && self.replication != "async" {
            return Err(NodeError::Config(format!(
                "presence.replication must be \"sync\" or \"async\", not {:?}",
                self.replication
            )));
        }
        if !(65_536..=4_294_967_296).contains(&self.replication_feed_bytes) {
            return Err(NodeError::Config(
                "presence.replication_feed_bytes must be in 65536..=4294967296".into(),
            ));
        }
        if !(10..=60_000).contains(&self.replica_ack_timeout_ms) {
            return Err(NodeError::Config(
                "presence.replica_ack_timeout_ms must be in 10..=60000".into(),
            ));
        }
        if self.slots == 0 || self.slots > PRESENCE_SLOTS_MAX {
            return Err(NodeError::Config(format!(
                "presence.slots must be in 1..={PRESENCE_SLOTS_MAX}"
            )));
        }
        for (key, value) in [
            ("watch_buffer_events", self.watch_buffer_events),
            ("watch_subscribers_max", self.watch_subscribers_max),
            ("watch_uids_max", self.watch_uids_max),
        ] {
            if value == 0 || value > WATCH_LIMIT_CEILING {
                return Err(NodeError::Config(format!(
                    "presence.{key} must be in 1..={WATCH_LIMIT_CEILING}"
                )));
            }
        }
        if self.watch_history_events > WATCH_LIMIT_CEILING {
            return Err(NodeError::Config(format!(
                "presence.watch_history_events must be in 0..={WATCH_LIMIT_CEILING}"
            )));
        }
        Ok(imstate_node::presencestore::PresenceStoreOptions {
            registry,
            fsync,
            ttl_ms_default: self.ttl_ms_default,
            tick_ms: self.tick_ms,
            checkpoint_log_bytes: self.checkpoint_log_bytes,
            segment_bytes: self.segment_bytes,
            inline_writes: self.inline_writes,
            watch: imstate_node::watch::WatchLimits {
                buffer_events: self.watch_buffer_events,
                subscribers_max: self.watch_subscribers_max,
                uids_max: self.watch_uids_max,
                history_events: self.watch_history_events,
            },
            ..imstate_node::presencestore::PresenceStoreOptions::default()
        })
    }
}

/// Configuration of the sequence service.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SeqConfig {
    /// Limit on ids in one batch call (B1).
    pub batch_ids_max: usize,
    /// How long a request may wait for a max_seq raise to become durable (B1: no unbounded wait).
    pub raise_wait_timeout_ms: u64,
    /// Log bytes since the last checkpoint that trigger a checkpoint; 0 disables automatic ones.
    pub checkpoint_log_bytes: u64,
    /// Sections in memory over all namespaces (B1): each section a request touches costs its
    /// state, a durable raise and a checkpoint entry. Sections loaded at start always load.
    pub sections_max: usize,
    /// Namespaces created at start-up when missing. An existing namespace must match exactly:
    /// changing a namespace's layout would break S1, so a mismatch is a start-up error.
    pub namespaces: Vec<NamespaceConfig>,
}

/// A namespace declared in the configuration file.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceConfig {
    /// Name: 1 to 64 bytes of `[A-Za-z0-9_.-]`.
    pub name: String,
    /// First id of the namespace.
    pub id_lo: u64,
    /// One past the last id of the namespace.
    pub id_hi: u64,
    /// Adjacent ids sharing one persisted max_seq.
    #[serde(default = "section_size_default")]
    pub section_size: u64,
    /// How far max_seq is raised at a time.
    #[serde(default = "step_default")]
    pub step: u64,
    /// `numeric` (the default: ids are numbers) or `string` (ids are keys of 1 to 128 bytes,
    /// hashed onto `[id_lo, id_hi)`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub keys: String,
}

fn section_size_default() -> u64 {
    NamespaceDef::default_namespace().section_size
}

fn step_default() -> u64 {
    NamespaceDef::default_namespace().step
}

impl NamespaceConfig {
    /// The namespace definition this entry declares.
    pub fn to_def(&self) -> Result<NamespaceDef, imstate_seq::SeqError> {
        let def = NamespaceDef {
            name: self.name.clone(),
            id_lo: self.id_lo,
            id_hi: self.id_hi,
            section_size: self.section_size,
            step: self.step,
            keys: self.keys.parse()?,
        };
        def.validate()?;
        Ok(def)
    }
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from(DATA_DIR_DEFAULT),
            listen: LISTEN_DEFAULT.parse().expect("valid default address"),
            metrics_listen: METRICS_LISTEN_DEFAULT
                .parse()
                .expect("valid default address"),
            wire_listen: WIRE_LISTEN_DEFAULT.parse().expect("valid default address"),
            resp_listen: String::new(),
            log_format: LogFormat::Human,
            tls: TlsConfig::default(),
            auth: AuthConfig::default(),
            seq: SeqConfig::default(),
            presence: PresenceConfig::default(),
            wire: WireConfig::default(),
            resp: RespConfig::default(),
            cluster: ClusterConfig::default(),
        }
    }
}

impl Default for SeqConfig {
    fn default() -> Self {
        Self {
            batch_ids_max: BATCH_IDS_MAX_DEFAULT,
            raise_wait_timeout_ms: RAISE_WAIT_TIMEOUT_MS_DEFAULT,
            checkpoint_log_bytes: CHECKPOINT_LOG_BYTES_DEFAULT,
            sections_max: imstate_seq::SECTIONS_MAX_DEFAULT,
            namespaces: Vec::new(),
        }
    }
}

impl SeqConfig {
    /// The raise wait timeout as a duration.
    pub fn raise_wait_timeout(&self) -> Duration {
        Duration::from_millis(self.raise_wait_timeout_ms)
    }
}

impl NodeConfig {
    /// Reads a TOML file; keys it does not set keep their defaults.
    pub fn load(path: &Path) -> Result<Self, NodeError> {
        let text = std::fs::read_to_string(path).map_err(|error| {
            NodeError::Config(format!("cannot read {}: {error}", path.display()))
        })?;
        Self::parse(&text).map_err(|error| match error {
            NodeError::Config(message) => {
                NodeError::Config(format!("{}: {message}", path.display()))
            }
            other => other,
        })
    }

    /// Parses TOML text and validates it.
    pub fn parse(text: &str) -> Result<Self, NodeError> {
        let config: NodeConfig =
            toml::from_str(text).map_err(|error| NodeError::Config(error.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// The file (if any) with the `IMSTATE_...` variables of `env` on top (see the module
    /// doc), validated. Flags go on top of the result.
    pub fn resolve(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, NodeError> {
        let (text, origin) = match file {
            Some(path) => (
                std::fs::read_to_string(path).map_err(|error| {
                    NodeError::Config(format!("cannot read {}: {error}", path.display()))
                })?,
                format!("{}: ", path.display()),
            ),
            None => (String::new(), String::new()),
        };
        let mut table: toml::Table = toml::from_str(&text)
            .map_err(|error| NodeError::Config(format!("{origin}{error}")))?;
        let overrides = env_overrides(env)?;
        let from_env = !overrides.is_empty();
        for (path, value) in overrides {
            let mut target = &mut table;
            for section in &path[..path.len() - 1] {
                let entry = target
                    .entry(section.clone())
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()));
                let toml::Value::Table(inner) = entry else {
                    return Err(NodeError::Config(format!("`{section}` is not a section")));
                };
                target = inner;
            }
            target.insert(path[path.len() - 1].clone(), value);
        }
        let origin = if from_env {
            format!("{origin}(with IMSTATE_ variables) ")
        } else {
            origin
        };
        let config: NodeConfig = table
            .try_into()
            .map_err(|error: toml::de::Error| NodeError::Config(format!("{origin}{error}")))?;
        config.validate()?;
        Ok(config)
    }

    /// The configuration as TOML (for `imstate config show` and the start-up log).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|error| format!("# unprintable: {error}"))
    }

    /// Checks values that the types alone do not constrain, naming the key at fault.
    pub fn validate(&self) -> Result<(), NodeError> {
        if self.seq.batch_ids_max == 0 {
            return Err(NodeError::Config(
                "seq.batch_ids_max must be at least 1".into(),
            ));
        }
        if self.seq.sections_max == 0 {
            return Err(NodeError::Config(
                "seq.sections_max must be at least 1".into(),
            ));
        }
        if self.seq.raise_wait_timeout_ms == 0 {
            return Err(NodeError::Config(
                "seq.raise_wait_timeout_ms must be at least 1".into(),
            ));
        }
        self.presence.to_options()?;
        self.wire.to_limits()?;
        self.resp_address()?;
        if self.resp.default_namespace.is_empty() {
            return Err(NodeError::Config(
                "resp.default_namespace must name a namespace".into(),
            ));
        }
        let key_set = !self.tls.key_file.as_os_str().is_empty();
        if self.tls.enabled() != key_set {
            return Err(NodeError::Config(
                "tls.cert_file and tls.key_file must be set together".into(),
            ));
        }
        if !self.tls.enabled() && !self.tls.client_ca_file.as_os_str().is_empty() {
            return Err(NodeError::Config(
                "tls.client_ca_file needs tls.cert_file and tls.key_file".into(),
            ));
        }
        if !self.tls.enabled() && !self.tls.peer_ca_file.as_os_str().is_empty() {
            return Err(NodeError::Config(
                "tls.peer_ca_file needs tls.cert_file and tls.key_file".into(),
            ));
        }
        for namespace in &self.seq.namespaces {
            namespace.to_def().map_err(|error| {
                NodeError::Config(format!("seq.namespaces `{}`: {error}", namespace.name))
            })?;
        }
        self.cluster.validate(self.listen, self.wire_listen)?;
        Ok(())
    }
}

/// Every configuration key with its default, documented: `imstate config example` prints it,
/// and a unit test checks that it parses to exactly [`NodeConfig::default`].
pub const EXAMPLE_TOML: &str = include_str!("config_example.toml");

/// Variables of the clients that share the prefix and are never server keys.
const CLIENT_ENV: &[&str] = &[
    "ADDR",
    "CONFIG",
    "TLS_CA",
    "TLS_CERT",
    "TLS_KEY",
    "TOKEN_FILE",
];

/// The key paths and values that `IMSTATE_...` variables set. A section variable
/// (`IMSTATE_A__B`) naming an unknown section or key is an error naming the variable.
fn env_overrides(
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Vec<(Vec<String>, toml::Value)>, NodeError> {
    let known = toml::Table::try_from(NodeConfig::default())
        .map_err(|error| NodeError::Config(format!("default configuration: {error}")))?;
    let mut overrides = Vec::new();
    for (name, text) in env {
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        if CLIENT_ENV.contains(&rest) {
            continue;
        }
        let path: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
        let is_known = match path.as_slice() {
            [key] => known.get(key).is_some_and(|value| !value.is_table()),
            [section, key] => known
                .get(section)
                .and_then(toml::Value::as_table)
                .is_some_and(|table| table.contains_key(key)),
            _ => false,
        };
        if !is_known {
            if path.len() == 1 {
                // Not a server key: some other tool's or the client's variable.
                continue;
            }
            return Err(NodeError::Config(format!(
                "environment variable {name}: unknown key `{}` (see `imstate config example`)",
                path.join(".")
            )));
        }
        let default = match path.as_slice() {
            [key] => known.get(key),
            [section, key] => known.get(section).and_then(|table| table.get(key)),
            _ => None,
        };
        // A string key takes the text as it is (a data_dir of "123" stays a path).
        let value = if default.is_some_and(toml::Value::is_str) {
            toml::Value::String(text)
        } else {
            toml::from_str::<toml::Table>(&format!("value = {text}"))
                .ok()
                .and_then(|mut table| table.remove("value"))
                .filter(|value| !value.is_table() && !value.is_array())
                .unwrap_or(toml::Value::String(text))
        };
        overrides.push((path, value));
    }
    Ok(overrides)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        let config = NodeConfig::parse("").unwrap();
        assert_eq!(config.listen.to_string(), LISTEN_DEFAULT);
        assert_eq!(config.seq.batch_ids_max, BATCH_IDS_MAX_DEFAULT);
    }

    #[test]
    fn unknown_key_is_an_error_naming_it() {
        let error = NodeConfig::parse("[seq]\nbatch_id_max = 3\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("batch_id_max"), "{error}");
    }

    #[test]
    fn presence_values_are_validated_naming_the_key() {
        let error = NodeConfig::parse("[presence]\nfsync = \"sometimes\"\n").unwrap_err();
        assert!(error.to_string().contains("presence.fsync"), "{error}");
        let error = NodeConfig::parse("[presence]\ntick_ms = 0\n").unwrap_err();
        assert!(error.to_string().contains("presence.tick_ms"), "{error}");
        let config = NodeConfig::parse("[presence]\nfsync = \"always\"\n").unwrap();
        assert_eq!(
            config.presence.to_options().unwrap().fsync,
            imstate_log::FsyncPolicy::Always
        );
    }

    #[test]
    fn namespaces_parse_with_defaults_and_are_validated() {
        let config = NodeConfig::parse(
            "[[seq.namespaces]]\nname = \"conv\"\nid_lo = 0\nid_hi = 1000\nstep = 5\n",
        )
        .unwrap();
        let def = config.seq.namespaces[0].to_def().unwrap();
        assert_eq!((def.section_size, def.step), (100_000, 5));
        assert!(!def.is_keyed());
        let error = NodeConfig::parse("[[seq.namespaces]]\nname = \"x\"\nid_lo = 5\nid_hi = 5\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("seq.namespaces `x`"), "{error}");
        let keyed = NodeConfig::parse(
            "[[seq.namespaces]]\nname = \"conv\"\nid_lo = 0\nid_hi = 1024\nkeys = \"string\"\n",
        )
        .unwrap();
        assert!(keyed.seq.namespaces[0].to_def().unwrap().is_keyed());
        let error = NodeConfig::parse(
            "[[seq.namespaces]]\nname = \"conv\"\nid_lo = 0\nid_hi = 1024\nkeys = \"text\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("must be `numeric` or `string`"), "{error}");
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// Key paths of a table, nested sections joined with dots.
    fn key_paths(table: &toml::Table, prefix: &str, out: &mut Vec<String>) {
        for (key, value) in table {
            let path = format!("{prefix}{key}");
            match value {
                toml::Value::Table(inner) => key_paths(inner, &format!("{path}."), out),
                _ => out.push(path),
            }
        }
    }

    #[test]
    fn the_example_documents_every_key_with_its_default_and_round_trips() {
        let example = NodeConfig::parse(EXAMPLE_TOML).unwrap();
        assert_eq!(
            example,
            NodeConfig::default(),
            "the example's values are the defaults"
        );
        let printed = example.to_toml();
        assert_eq!(NodeConfig::parse(&printed).unwrap(), example, "{printed}");
        let mut documented = Vec::new();
        key_paths(&toml::from_str(EXAMPLE_TOML).unwrap(), "", &mut documented);
        let mut all = Vec::new();
        key_paths(
            &toml::Table::try_from(NodeConfig::default()).unwrap(),
            "",
            &mut all,
        );
        documented.sort();
        all.sort();
        assert_eq!(
            documented, all,
            "every key is in the example, and only keys"
        );
        // Every documented line explains itself.
        for line in EXAMPLE_TOML.lines() {
            let line = line.trim();
            if line.contains(" = ") && !line.starts_with('#') {
                assert!(line.contains('#'), "undocumented key: {line}");
            }
        }
    }

    #[test]
    fn every_key_round_trips_with_non_default_values() {
        let text = "data_dir = \"/d\"\nlisten = \"0.0.0.0:1\"\nmetrics_listen = \"0.0.0.0:2\"\n\
            wire_listen = \"127.0.0.1:3\"\nresp_listen = \"127.0.0.1:4\"\n\
            log_format = \"json\"\n[tls]\ncert_file = \"c\"\nkey_file = \"k\"\n\
            client_ca_file = \"ca\"\npeer_ca_file = \"pca\"\n[auth]\ntoken_file = \"t\"\n\
            [seq]\nbatch_ids_max = 3\nraise_wait_timeout_ms = 4\ncheckpoint_log_bytes = 5\n\
            sections_max = 22\n\
            [[seq.namespaces]]\nname = \"conv\"\nid_lo = 0\nid_hi = 10\n\
            [presence]\nfsync = \"always\"\nttl_ms_default = 6\nttl_ms_max = 7\n\
            sessions_per_uid_max = 8\nlookup_ids_max = 9\nheartbeat_batch_max = 10\n\
            gateways_max = 11\nshards = 12\ntick_ms = 13\ncheckpoint_log_bytes = 14\n\
            segment_bytes = 131072\ninline_writes = false\n\
            watch_buffer_events = 15\nwatch_subscribers_max = 16\nwatch_uids_max = 17\n\
            watch_history_events = 23\n\
            slots = 21\nreplication = \"async\"\nreplica_ack_timeout_ms = 22\n\
            require_replica = true\nreplication_feed_bytes = 70000\n\
            replica_checkpoints = false\n\
            [wire]\nhello_timeout_ms = 18\nidle_timeout_ms = 19\n\
            connections_per_source_max = 20\ninput_budget_bytes = 9000000\n\
            [resp]\ndefault_namespace = \"conv\"\n\
            [cluster]\nname = \"c1\"\netcd = \"127.0.0.1:2379\"\nnode_id = \"n1\"\n\
            advertise = \"10.0.0.1:7700\"\nadvertise_wire = \"10.0.0.1:7702\"\n\
            lease_ttl_ms = 2000\nmoves_max = 8\norphan_grace_ms = 9000\n";
        let config = NodeConfig::parse(text).unwrap();
        assert_ne!(config, NodeConfig::default());
        assert_eq!(NodeConfig::parse(&config.to_toml()).unwrap(), config);
        let mut set = Vec::new();
        key_paths(&toml::from_str(text).unwrap(), "", &mut set);
        let mut all = Vec::new();
        key_paths(
            &toml::Table::try_from(NodeConfig::default()).unwrap(),
            "",
            &mut all,
        );
        set.sort();
        all.sort();
        assert_eq!(set, all, "the test sets every key");
    }

    #[test]
    fn a_replication_mode_or_ack_timeout_out_of_range_is_refused_naming_the_key() {
        for (text, key) in [
            ("replication = \"maybe\"", "presence.replication"),
            (
                "replica_ack_timeout_ms = 5",
                "presence.replica_ack_timeout_ms",
            ),
            (
                "replication_feed_bytes = 1000",
                "presence.replication_feed_bytes",
            ),
        ] {
            let config = NodeConfig::parse(&format!("[presence]\n{text}\n"))
                .and_then(|config| config.presence.to_options().map(|_| config));
            let error = config.expect_err("refused").to_string();
            assert!(error.contains(key), "{error}");
        }
    }

    #[test]
    fn a_slot_count_out_of_range_is_refused_naming_the_key() {
        for slots in [0, PRESENCE_SLOTS_MAX + 1] {
            let config = NodeConfig::parse(&format!("[presence]\nslots = {slots}\n"))
                .and_then(|config| config.presence.to_options().map(|_| config));
            let error = config.expect_err("out of range").to_string();
            assert!(error.contains("presence.slots"), "{error}");
        }
    }

    #[test]
    fn a_segment_size_out_of_range_is_refused_naming_the_key() {
        for size in [SEGMENT_BYTES_MIN - 1, SEGMENT_BYTES_MAX + 1] {
            let config = NodeConfig::parse(&format!("[presence]\nsegment_bytes = {size}\n"))
                .and_then(|config| config.presence.to_options().map(|_| config));
            let error = config.expect_err("out of range").to_string();
            assert!(error.contains("presence.segment_bytes"), "{error}");
        }
    }

    #[test]
    fn environment_overrides_the_file_and_unknown_section_keys_fail() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("imstate.toml");
        std::fs::write(
            &file,
            "listen = \"127.0.0.1:1\"\n[seq]\nbatch_ids_max = 5\n",
        )
        .unwrap();
        let config = NodeConfig::resolve(
            Some(&file),
            env(&[
                ("IMSTATE_SEQ__BATCH_IDS_MAX", "7"),
                ("IMSTATE_PRESENCE__FSYNC", "always"),
                ("IMSTATE_METRICS_LISTEN", "127.0.0.1:9"),
                ("IMSTATE_ADDR", "ignored:1"),
                ("IMSTATE_PID", "123"),
                ("HOME", "/root"),
            ]),
        )
        .unwrap();
        assert_eq!(config.seq.batch_ids_max, 7);
        assert_eq!(config.presence.fsync, "always");
        assert_eq!(config.metrics_listen.to_string(), "127.0.0.1:9");
        assert_eq!(
            config.listen.to_string(),
            "127.0.0.1:1",
            "the file still counts"
        );
        let error = NodeConfig::resolve(None, env(&[("IMSTATE_SEQ__BATCH_ID_MAX", "7")]))
            .unwrap_err()
            .to_string();
        assert!(error.contains("IMSTATE_SEQ__BATCH_ID_MAX"), "{error}");
        let error = NodeConfig::resolve(None, env(&[("IMSTATE_SEQ__BATCH_IDS_MAX", "x")]))
            .unwrap_err()
            .to_string();
        assert!(error.contains("batch_ids_max"), "{error}");
    }

    #[test]
    fn tls_keys_must_come_together() {
        let error = NodeConfig::parse("[tls]\ncert_file = \"c\"\n").unwrap_err();
        assert!(error.to_string().contains("tls.key_file"), "{error}");
        let error = NodeConfig::parse("[tls]\nclient_ca_file = \"c\"\n").unwrap_err();
        assert!(error.to_string().contains("tls.client_ca_file"), "{error}");
        let error = NodeConfig::parse("[tls]\npeer_ca_file = \"c\"\n").unwrap_err();
        assert!(error.to_string().contains("tls.peer_ca_file"), "{error}");
    }

    #[test]
    fn cluster_mode_needs_a_node_id_endpoints_and_reachable_addresses() {
        let ok = "[cluster]\nname = \"c\"\netcd = \"127.0.0.1:2379\"\nnode_id = \"n1\"\n";
        assert!(NodeConfig::parse(ok).unwrap().cluster.enabled());
        for (text, key) in [
            (
                "[cluster]\nname = \"c\"\netcd = \"e:1\"\n",
                "cluster.node_id",
            ),
            ("[cluster]\nname = \"c\"\nnode_id = \"n\"\n", "cluster.etcd"),
            (
                "[cluster]\nname = \"c\"\netcd = \"e:1\"\nnode_id = \"n\"\nlease_ttl_ms = 10\n",
                "cluster.lease_ttl_ms",
            ),
            (
                "listen = \"0.0.0.0:7700\"\n[cluster]\nname = \"c\"\netcd = \"e:1\"\nnode_id = \"n\"\n",
                "cluster.advertise",
            ),
            (
                "[cluster]\nname = \"a b\"\netcd = \"e:1\"\nnode_id = \"n\"\n",
                "cluster.name",
            ),
        ] {
            let error = NodeConfig::parse(text).unwrap_err().to_string();
            assert!(error.contains(key), "{key}: {error}");
        }
    }

    #[test]
    fn with_tls_the_wire_port_may_listen_beyond_loopback() {
        let config = NodeConfig::parse(
            "wire_listen = \"0.0.0.0:7702\"\n[tls]\ncert_file = \"c\"\nkey_file = \"k\"\n",
        )
        .unwrap();
        assert!(!config.wire_listen.ip().is_loopback());
    }

    #[test]
    fn the_resp_port_is_off_by_default_and_beyond_loopback_needs_tokens() {
        assert_eq!(NodeConfig::default().resp_address().unwrap(), None);
        let error = NodeConfig::parse("resp_listen = \"0.0.0.0:6379\"\n").unwrap_err();
        assert!(error.to_string().contains("[auth] token_file"), "{error}");
        let error = NodeConfig::parse("resp_listen = \"localhost\"\n").unwrap_err();
        assert!(
            error.to_string().contains("resp_listen `localhost`"),
            "{error}"
        );
        let config =
            NodeConfig::parse("resp_listen = \"0.0.0.0:6379\"\n[auth]\ntoken_file = \"t\"\n")
                .unwrap();
        assert!(config.resp_address().unwrap().is_some());
    }
}
