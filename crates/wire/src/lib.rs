//! `imstate-wire`: the lean binary protocol of the hot path, beside gRPC.
//!
//! gRPC over HTTP/2 costs about 60 µs of server CPU per request on the project machine (HPACK,
//! HTTP/2 framing, one task per stream), while the work behind a `Next` is 42 ns. This protocol
//! carries only the hot-path operations in length-prefixed binary frames on a TCP connection
//! (TLS or mTLS when the node configures `[tls]`: [`tls`]), pipelined like RESP: a client writes any number of requests without waiting, and
//! the node answers each, in order. Everything else (admin, namespaces, watch, current) stays
//! on gRPC.
//!
//! # Frames
//!
//! ```text
//!  frame   = len:u32le  op:u8  body          len = 1 + body length, at most FRAME_BYTES_MAX
//!  request ops: 0x01 Hello  0x10 Next  0x11 NextBatch  0x12 Route  0x13 NextRange  0x14 NextKeys
//!               0x20 Login  0x21 Logout  0x22 Heartbeat  0x23 HeartbeatBatch  0x24 LookupBatch  0x25 OnlineCount
//!  reply op  = 0x80 | request op on success, 0xFF (ERROR) on failure:
//!              ERROR body = code:u8 (the gRPC status code number)  message:utf8
//! ```
//!
//! Integers are little-endian. Strings are UTF-8 with a `u8` length (namespace, device,
//! gateway); metadata has a `u16` length; lists have a `u32` count. The bodies are in
//! [`codec`].
//!
//! # Connection
//!
//! The first frame must be `Hello` with [`MAGIC`], [`VERSION`] and a bearer token (empty when
//! the node has no token file). The node answers with its route-table version, or with an
//! `UNAUTHENTICATED` / `INVALID_ARGUMENT` error and closes. A request whose body does not
//! decode gets an `INVALID_ARGUMENT` error reply and the connection goes on (the framing is
//! intact); a frame longer than [`FRAME_BYTES_MAX`] (before `Hello`: longer than
//! [`HELLO_FRAME_BYTES_MAX`]) gets a `RESOURCE_EXHAUSTED` error and the connection is closed,
//! since nothing after it can be trusted.
//!
//! # Durability
//!
//! The node answers a write only once it is durable under its fsync policy, as over gRPC. It
//! applies every request of one read in order and waits once for all of their writes, so a
//! pipelined burst of logins costs one log wait, not one per login.
//!
//! # Modules
//!
//! - [`codec`]: encoding and decoding of every frame; pure, tested without I/O.
//! - [`pipeline`]: a pipelined client connection (one writer task coalescing requests, one
//!   reader task completing them in order), generic over the reply parser, so the bench drives
//!   imstate and Redis with the same machinery; over TCP or over TLS.
//! - [`tls`]: rustls configurations of both ends from PEM files (TLS and mTLS).

#![deny(missing_docs)]

pub mod codec;
pub mod pipeline;
pub mod tls;

pub use codec::{
    Code, DecodeError, Frame, LoginFields, LookupReply, Op, Pairs, Request, SessionFields, U64s,
    WireSession,
};

/// First bytes of a `Hello` body: "IMW" and the protocol generation.
pub const MAGIC: [u8; 4] = *b"IMW1";
/// The protocol version this build speaks.
/// 2: seq replies carry the route version; the `Route` op.
pub const VERSION: u8 = 2;
/// Largest frame accepted, counted from the op byte (B1). 8 MiB holds a batch of a million
/// ids; the node's own batch limits (`seq.batch_ids_max`, `presence.batch_max`) are lower.
pub const FRAME_BYTES_MAX: usize = 8 << 20;
/// Longest bearer token, in bytes: the node refuses a token file with a longer line, so a
/// longer `Hello` can only be an attack.
pub const TOKEN_BYTES_MAX: usize = 4096;
/// Largest frame accepted before `Hello` has been answered (B1): a `Hello` with the longest
/// token (op, magic, version, token length, token). An unauthenticated client cannot make the
/// node buffer more than this.
pub const HELLO_FRAME_BYTES_MAX: usize = 1 + MAGIC.len() + 1 + 2 + TOKEN_BYTES_MAX;
/// Bytes before a frame's body: the length and the op.
pub const HEADER_BYTES: usize = 5;
/// The reply op of a failed request.
pub const REPLY_ERROR: u8 = 0xFF;
/// The bit set in the reply op of a successful request.
pub const REPLY_OK_BIT: u8 = 0x80;
