//! The gRPC services: protobuf in, domain calls, protobuf out.
//!
//! This is the edge: generated types are converted here, once per message, and
//! [`status_from`] is the one place where domain errors become `tonic::Status`:
//!
//! | error | code |
//! |---|---|
//! | bad id, bad namespace definition, empty batch, oversized field, bad ttl | INVALID_ARGUMENT (message names the range or limit) |
//! | unknown namespace, unknown session, unregistered gateway | NOT_FOUND |
//! | namespace exists | ALREADY_EXISTS |
//! | connection already used by another device | FAILED_PRECONDITION |
//! | batch over its limit, sessions per uid, gateways, shard full | RESOURCE_EXHAUSTED (names the limit) |
//! | a sequence at u64::MAX | OUT_OF_RANGE |
//! | log failure, raise timeout, node stopping | UNAVAILABLE |
//! | missing or wrong bearer token ([`edge`]) | UNAUTHENTICATED |

mod admin;
pub mod edge;
pub mod limits;
mod presence;
pub mod replication;
mod sequence;

pub use admin::AdminService;
pub use presence::PresenceService;
pub(crate) use replication::AbortOnDrop;
pub use replication::{ReplicationService, records_crc};
pub use sequence::SequenceService;

use imstate_presence::PresenceError;
use imstate_proto::v1 as pb;
use imstate_seq::SeqError;
use tonic::Status;

use imstate_node::NodeError;

/// The route table version of a node in embedded mode: there is one node and it owns every
/// section, so the table never changes.
pub use imstate_node::sequences::EMBEDDED_ROUTE_VERSION;

/// Maps a domain error to a gRPC status.
pub fn status_from(error: NodeError) -> Status {
    let mut status = Status::new(error_code(&error), bounded_message(error.to_string()));
    if let NodeError::Moved {
        owner,
        grpc,
        wire,
        version,
        ..
    } = &error
    {
        // The redirect, machine-readable: the smart client goes to the owner.
        let metadata = status.metadata_mut();
        for (key, value) in [
            (OWNER_METADATA, owner.as_str()),
            (OWNER_GRPC_METADATA, grpc.as_str()),
            (OWNER_WIRE_METADATA, wire.as_str()),
            (ROUTE_VERSION_METADATA, &version.to_string()),
        ] {
            if let Ok(value) = value.parse() {
                metadata.insert(key, value);
            }
        }
    }
    status
}

/// Metadata of a redirect (FAILED_PRECONDITION): the owner's node id.
pub const OWNER_METADATA: &str = "imstate-owner";
/// Metadata of a redirect: the owner's gRPC address.
pub const OWNER_GRPC_METADATA: &str = "imstate-owner-grpc";
/// Metadata of a redirect: the owner's wire address.
pub const OWNER_WIRE_METADATA: &str = "imstate-owner-wire";
/// Metadata of a redirect: the route table version that names the owner.
pub const ROUTE_VERSION_METADATA: &str = "imstate-route-version";

/// Longest error message sent to a client, in bytes. The cores never echo an unbounded input,
/// but a message travels in an HTTP/2 header (gRPC) or a frame (wire): past a few KB a gRPC
/// client fails the whole connection (`h2 protocol error`), so this is the last guard.
pub const ERROR_MESSAGE_BYTES_MAX: usize = 1024;

/// `message`, cut to [`ERROR_MESSAGE_BYTES_MAX`] at a character boundary, marked when cut.
pub fn bounded_message(mut message: String) -> String {
    if message.len() > ERROR_MESSAGE_BYTES_MAX {
        let mut end = ERROR_MESSAGE_BYTES_MAX - 16;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push_str("... (cut)");
    }
    message
}

/// The status code of an error: one mapping for gRPC and the wire protocol.
pub fn error_code(error: &NodeError) -> tonic::Code {
    use tonic::Code;
    match error {
        NodeError::Seq(error) => match error {
            SeqError::UnknownNamespace(_) => Code::NotFound,
            SeqError::NamespaceExists(_) => Code::AlreadyExists,
            SeqError::BatchTooLarge { .. }
            | SeqError::SectionsExhausted { .. }
            | SeqError::SectionKeysExhausted { .. }
            | SeqError::MinSeqsExhausted { .. } => Code::ResourceExhausted,
            SeqError::MinSeqAboveCurrent { .. } => Code::FailedPrecondition,
            SeqError::SequenceExhausted { .. } => Code::OutOfRange,
            SeqError::IdOutOfRange { .. }
            | SeqError::WrongIdKind { .. }
            | SeqError::InvalidKey { .. }
            | SeqError::EmptyBatch
            | SeqError::InvalidCount { .. }
            | SeqError::MinSeqCount { .. }
            | SeqError::InvalidNamespace(_) => Code::InvalidArgument,
        },
        NodeError::Presence(error) => match error {
            PresenceError::FieldLength { .. }
            | PresenceError::ControlCharacter { .. }
            | PresenceError::TtlOutOfRange { .. }
            | PresenceError::InvalidOption { .. } => Code::InvalidArgument,
            PresenceError::BatchSize { len: 0, .. } => Code::InvalidArgument,
            PresenceError::SessionsPerUidExceeded { .. }
            | PresenceError::GatewaysExceeded { .. }
            | PresenceError::BatchSize { .. }
            | PresenceError::ShardFull { .. } => Code::ResourceExhausted,
            PresenceError::ConnectionInUse { .. } => Code::FailedPrecondition,
            PresenceError::SessionNotFound { .. } | PresenceError::GatewayNotRegistered { .. } => {
                Code::NotFound
            }
            PresenceError::ShardOutOfRange { .. } => Code::Internal,
        },
        NodeError::Limit(_) => Code::ResourceExhausted,
        NodeError::Moved { .. } => Code::FailedPrecondition,
        NodeError::RaiseTimeout(_) | NodeError::Unavailable(_) | NodeError::Log(_) => {
            Code::Unavailable
        }
        _ => Code::Internal,
    }
}

/// Route information for replies of the presence service (no table: presence routes by uid
/// slot, which the cluster mode adds).
pub(crate) fn presence_route() -> Option<pb::RouteInfo> {
    Some(pb::RouteInfo {
        version: EMBEDDED_ROUTE_VERSION,
        table: None,
    })
}
