//! Errors of the presence registry.
//!
//! Every refused operation names the rule or limit it hit, so the node can map it to a gRPC
//! status with a useful message (limits to RESOURCE_EXHAUSTED, bad input to INVALID_ARGUMENT,
//! unknown sessions to NOT_FOUND). A refused operation never changes the registry.

use thiserror::Error;

/// Why an operation was refused. The registry is unchanged whenever one is returned.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PresenceError {
    /// A string or blob is longer than its named limit, or empty where it must not be.
    #[error("{field} is {len} bytes; allowed is {min}..={max} bytes")]
    FieldLength {
        /// The field: `device`, `gateway` or `meta`.
        field: &'static str,
        /// The length given.
        len: usize,
        /// Shortest allowed length.
        min: usize,
        /// Longest allowed length (the named limit).
        max: usize,
    },
    /// A device or gateway name holds a control character (they would break every text
    /// output that shows the name: the CLI, logs, metrics labels).
    #[error("{field} holds a control character at byte {position}; names must be printable")]
    ControlCharacter {
        /// The field: `device` or `gateway`.
        field: &'static str,
        /// Byte offset of the first control character.
        position: usize,
    },
    /// A ttl of zero or above `ttl_ms_max`.
    #[error("ttl_ms {ttl_ms} is out of range 1..={ttl_ms_max} (limit ttl_ms_max)")]
    TtlOutOfRange {
        /// The ttl given.
        ttl_ms: u32,
        /// The configured `ttl_ms_max`.
        ttl_ms_max: u32,
    },
    /// A login would give the uid more than `sessions_per_uid_max` sessions.
    #[error("uid {uid} already has {max} sessions (limit sessions_per_uid_max)")]
    SessionsPerUidExceeded {
        /// The uid.
        uid: u64,
        /// The configured `sessions_per_uid_max`.
        max: usize,
    },
    /// A new gateway name would exceed `gateways_max` gateways in use (after a reclaim of
    /// those with no session and no lease).
    #[error(
        "gateway {gateway:?} is new and {max} gateways have sessions or leases (limit gateways_max)"
    )]
    GatewaysExceeded {
        /// The gateway name refused.
        gateway: String,
        /// The configured `gateways_max`.
        max: usize,
    },
    /// A batch is empty or longer than its named limit.
    #[error("{limit} batch has {len} entries; allowed is 1..={max}")]
    BatchSize {
        /// The limit: `heartbeat_batch_max` or `lookup_ids_max`.
        limit: &'static str,
        /// Entries given.
        len: usize,
        /// The configured maximum.
        max: usize,
    },
    /// The connection already carries a session of this uid on another device.
    ///
    /// A connection belongs to one device for its whole life, so this is a gateway bug rather
    /// than a re-login; refusing keeps "one session per (uid, connection)" without silently
    /// dropping a second session.
    #[error(
        "uid {uid} conn {conn} is already used by its session on device {device:?}, gateway \
         {gateway:?}; a conn must be unique among one uid's sessions on all gateways, because \
         logout and heartbeat name a session by (uid, conn)"
    )]
    ConnectionInUse {
        /// The uid.
        uid: u64,
        /// The connection id.
        conn: u64,
        /// The device the connection is logged in on.
        device: String,
        /// The gateway of that session.
        gateway: String,
    },
    /// No session with this uid and connection id.
    #[error("no session for uid {uid} conn {conn}")]
    SessionNotFound {
        /// The uid.
        uid: u64,
        /// The connection id.
        conn: u64,
    },
    /// The gateway is not registered (for gateway heartbeats).
    #[error("gateway {gateway:?} is not registered")]
    GatewayNotRegistered {
        /// The gateway name.
        gateway: String,
    },
    /// A shard index beyond the configured shard count.
    #[error("shard {shard} does not exist; shards is {shards}")]
    ShardOutOfRange {
        /// The index given.
        shard: usize,
        /// The configured shard count.
        shards: usize,
    },
    /// One shard holds as many records as its 32-bit index space allows.
    #[error("shard holds {max} sessions, the most one shard can index (limit shard_sessions_max)")]
    ShardFull {
        /// The per-shard ceiling.
        max: usize,
    },
    /// A registry option is zero or above its hard ceiling.
    #[error("option {name} = {value} is out of range")]
    InvalidOption {
        /// The option name.
        name: &'static str,
        /// The value given.
        value: u64,
    },
}
