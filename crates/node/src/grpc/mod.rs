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
mod presence;
mod sequence;

pub use admin::AdminService;
pub use presence::PresenceService;
pub use sequence::SequenceService;

use imstate_presence::PresenceError;
use imstate_proto::v1 as pb;
use imstate_seq::SeqError;
use tonic::Status;

use crate::NodeError;

/// The route table version of a node in embedded mode: there is one node and it owns every
/// section, so the table never changes.
pub const EMBEDDED_ROUTE_VERSION: u64 = 1;

/// Maps a domain error to a gRPC status.
pub fn status_from(error: NodeError) -> Status {
    match error {
        NodeError::Seq(error) => {
            let message = error.to_string();
            match error {
                SeqError::UnknownNamespace(_) => Status::not_found(message),
                SeqError::NamespaceExists(_) => Status::already_exists(message),
                SeqError::BatchTooLarge { .. } => Status::resource_exhausted(message),
                SeqError::SequenceExhausted { .. } => Status::out_of_range(message),
                SeqError::IdOutOfRange { .. }
                | SeqError::EmptyBatch
                | SeqError::InvalidNamespace(_) => Status::invalid_argument(message),
            }
        }
        NodeError::Presence(error) => {
            let message = error.to_string();
            match error {
                PresenceError::FieldLength { .. }
                | PresenceError::TtlOutOfRange { .. }
                | PresenceError::InvalidOption { .. } => Status::invalid_argument(message),
                PresenceError::BatchSize { len: 0, .. } => Status::invalid_argument(message),
                PresenceError::SessionsPerUidExceeded { .. }
                | PresenceError::GatewaysExceeded { .. }
                | PresenceError::BatchSize { .. }
                | PresenceError::ShardFull { .. } => Status::resource_exhausted(message),
                PresenceError::ConnectionInUse { .. } => Status::failed_precondition(message),
                PresenceError::SessionNotFound { .. }
                | PresenceError::GatewayNotRegistered { .. } => Status::not_found(message),
                PresenceError::ShardOutOfRange { .. } => Status::internal(message),
            }
        }
        NodeError::RaiseTimeout(_) | NodeError::Unavailable(_) | NodeError::Log(_) => {
            Status::unavailable(error.to_string())
        }
        other => Status::internal(other.to_string()),
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
