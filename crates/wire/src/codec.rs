//! Encoding and decoding of every wire frame. Pure: bytes in, values out, no I/O.
//!
//! ```text
//!  request bodies                                   reply bodies (op | 0x80)
//!  Hello          magic[4] version:u8 token:b16     route_version:u64
//!  Next           ns:s8 id:u64                      seq:u64 route_version:u64
//!  NextBatch      ns:s8 n:u32 id:u64*n              route_version:u64 n:u32 seq:u64*n
//!  NextRange      ns:s8 count:u64 n:u32 id:u64*n    route_version:u64 n:u32 last:u64*n
//!                 (count consecutive seqs per id; the first of a range is last - count + 1)
//!  NextKeys       ns:s8 count:u64 n:u32 key:k8*n    route_version:u64 n:u32 last:u64*n
//!                 (NextRange for the string keys of a keyed namespace)
//!  Route          (empty)                           route:b32 namespaces:b32 (protobuf
//!                                                   imstate.v1 RouteReply, ListNamespacesReply)
//!  Login          uid conn ttl_ms:u32 device:s8     session  replaced:opt(session)
//!                 gateway:s8 meta:opt(b16)
//!  Logout         uid:u64 conn:u64                  session
//!  Heartbeat      uid:u64 conn:u64                  (empty)
//!  HeartbeatBatch gateway:s8 n:u32 (uid conn)*n     n:u32 (uid conn)*n   (the unknown ones)
//!  LookupBatch    n:u32 uid:u64*n                   n:u32 (k:u16 session*k)*n (in uid order)
//!  OnlineCount    (empty)                           sessions:u64
//!
//!  session = uid:u64 conn:u64 login_ms:u64 last_heartbeat_ms:u64 ttl_ms:u32
//!            device:s8 gateway:s8 meta:opt(b16)
//!  s8 = len:u8 utf8   k8 = len:u8 bytes   b16 = len:u16 bytes   opt(x) = 0 | 1 x
//! ```
//!
//! Requests decode borrowed from the read buffer ([`Request`]): a batch of ids is a
//! little-endian byte slice ([`U64s`]), never copied until the store needs it. Encoders append
//! to a `Vec<u8>` and patch the frame length at the end, so a pipeline of requests or replies
//! is built in one buffer and written with one system call.

use crate::{FRAME_BYTES_MAX, MAGIC, REPLY_ERROR, REPLY_OK_BIT, VERSION};

/// A request operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Op {
    /// Opens a connection: magic, version, token.
    Hello = 0x01,
    /// One seq for one id.
    Next = 0x10,
    /// One seq per id.
    NextBatch = 0x11,
    /// The route table and the namespaces' layouts (for smart clients).
    Route = 0x12,
    /// `count` consecutive seqs per id (range allocation).
    NextRange = 0x13,
    /// `count` consecutive seqs per string key of a keyed namespace.
    NextKeys = 0x14,
    /// Registers a session.
    Login = 0x20,
    /// Removes a session.
    Logout = 0x21,
    /// Renews a session.
    Heartbeat = 0x22,
    /// Renews many sessions of one gateway.
    HeartbeatBatch = 0x23,
    /// The sessions of many uids.
    LookupBatch = 0x24,
    /// Sessions online.
    OnlineCount = 0x25,
}

impl Op {
    /// Every op, for metrics and tests.
    pub const ALL: [Op; 12] = [
        Op::Hello,
        Op::Next,
        Op::NextBatch,
        Op::Route,
        Op::NextRange,
        Op::NextKeys,
        Op::Login,
        Op::Logout,
        Op::Heartbeat,
        Op::HeartbeatBatch,
        Op::LookupBatch,
        Op::OnlineCount,
    ];

    /// The op of a request byte.
    pub fn from_u8(byte: u8) -> Option<Op> {
        Op::ALL.into_iter().find(|op| *op as u8 == byte)
    }

    /// The op's name, as in metrics labels.
    pub fn name(self) -> &'static str {
        match self {
            Op::Hello => "Hello",
            Op::Next => "Next",
            Op::NextBatch => "NextBatch",
            Op::Route => "Route",
            Op::NextRange => "NextRange",
            Op::NextKeys => "NextKeys",
            Op::Login => "Login",
            Op::Logout => "Logout",
            Op::Heartbeat => "Heartbeat",
            Op::HeartbeatBatch => "HeartbeatBatch",
            Op::LookupBatch => "LookupBatch",
            Op::OnlineCount => "OnlineCount",
        }
    }

    /// The reply op of a success.
    pub fn reply(self) -> u8 {
        self as u8 | REPLY_OK_BIT
    }

    /// Position in [`Op::ALL`].
    pub fn index(self) -> usize {
        Op::ALL
            .iter()
            .position(|op| *op == self)
            .expect("every op is in ALL")
    }
}

/// An error code: the number of the gRPC status code with the same meaning, so both protocols
/// report a failure the same way.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Code(pub u8);

impl Code {
    /// The request is malformed or a value is out of range.
    pub const INVALID_ARGUMENT: Code = Code(3);
    /// The client was too slow: no `Hello`, or no complete frame, in the node's time limit.
    pub const DEADLINE_EXCEEDED: Code = Code(4);
    /// The id's namespace, the session or the gateway does not exist.
    pub const NOT_FOUND: Code = Code(5);
    /// A limit was exceeded (batch size, frame size, sessions per uid).
    pub const RESOURCE_EXHAUSTED: Code = Code(8);
    /// The request conflicts with the current state (connection in use).
    pub const FAILED_PRECONDITION: Code = Code(9);
    /// A sequence is exhausted.
    pub const OUT_OF_RANGE: Code = Code(11);
    /// A bug on the node.
    pub const INTERNAL: Code = Code(13);
    /// The node cannot serve now (log failed, raise timed out, shutting down).
    pub const UNAVAILABLE: Code = Code(14);
    /// The token is missing or wrong.
    pub const UNAUTHENTICATED: Code = Code(16);
}

/// Why bytes are not a valid frame or body.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// A frame announces a length of zero (no op byte).
    #[error("frame of length 0 (no op byte)")]
    EmptyFrame,
    /// A frame is longer than the limit.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge {
        /// The announced length.
        len: usize,
        /// [`FRAME_BYTES_MAX`].
        max: usize,
    },
    /// The op byte names no request.
    #[error("unknown op {0:#04x}")]
    UnknownOp(u8),
    /// The body ends before a field.
    #[error("truncated body: {0} missing")]
    Truncated(&'static str),
    /// The body has bytes after its last field.
    #[error("{0} bytes after the last field")]
    TrailingBytes(usize),
    /// A string field is not UTF-8.
    #[error("{0} is not UTF-8")]
    NotUtf8(&'static str),
    /// An optional field's flag byte is neither 0 nor 1.
    #[error("{0}: presence flag must be 0 or 1")]
    BadFlag(&'static str),
    /// `Hello` does not start with [`MAGIC`].
    #[error("not an imstate wire connection (bad magic); the first frame must be Hello")]
    BadMagic,
    /// `Hello` asks for a version this build does not speak.
    #[error("protocol version {0} is not supported (this node speaks {VERSION})")]
    Version(u8),
    /// A field is longer than its length prefix can say (encoding side).
    #[error("{what} is {len} bytes; the wire allows at most {max}")]
    FieldTooLong {
        /// The field.
        what: &'static str,
        /// Its length.
        len: usize,
        /// The most its prefix can say.
        max: usize,
    },
    /// A reply has another op than the request it answers.
    #[error("reply op {got:#04x} does not answer a {wanted} request")]
    UnexpectedReply {
        /// The request.
        wanted: &'static str,
        /// The reply op received.
        got: u8,
    },
}

/// One frame, split off the front of a buffer: the op byte and the body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    /// The op byte.
    pub op: u8,
    /// The bytes after it.
    pub body: &'a [u8],
}

impl<'a> Frame<'a> {
    /// Splits the first frame off `buffer`: `Ok(None)` until the whole frame is there, and the
    /// number of bytes it used. A bad length is an error: the stream cannot be resynchronised.
    pub fn split(buffer: &'a [u8]) -> Result<Option<(Frame<'a>, usize)>, DecodeError> {
        Self::split_limited(buffer, FRAME_BYTES_MAX)
    }

    /// [`Frame::split`] with a smaller limit than [`FRAME_BYTES_MAX`] (the node takes only
    /// [`crate::HELLO_FRAME_BYTES_MAX`] before `Hello`).
    pub fn split_limited(
        buffer: &'a [u8],
        max: usize,
    ) -> Result<Option<(Frame<'a>, usize)>, DecodeError> {
        let Some(len) = Self::declared_len(buffer) else {
            return Ok(None);
        };
        if len == 0 {
            return Err(DecodeError::EmptyFrame);
        }
        if len > max {
            return Err(DecodeError::FrameTooLarge { len, max });
        }
        let Some(frame) = buffer.get(4..4 + len) else {
            return Ok(None);
        };
        Ok(Some((
            Frame {
                op: frame[0],
                body: &frame[1..],
            },
            4 + len,
        )))
    }

    /// The length the first frame of `buffer` declares (op and body), once its prefix is there.
    pub fn declared_len(buffer: &[u8]) -> Option<usize> {
        let prefix = buffer.get(..4)?;
        Some(u32::from_le_bytes(prefix.try_into().expect("4 bytes")) as usize)
    }

    /// The body of the reply to an `op` request; an error reply becomes `Err(code, message)`.
    pub fn reply_body(self, op: Op) -> Result<Result<&'a [u8], (Code, String)>, DecodeError> {
        if self.op == REPLY_ERROR {
            let mut cursor = Cursor::new(self.body);
            let code = Code(cursor.u8("error code")?);
            let message = String::from_utf8_lossy(cursor.rest()).into_owned();
            return Ok(Err((code, message)));
        }
        if self.op != op.reply() {
            return Err(DecodeError::UnexpectedReply {
                wanted: op.name(),
                got: self.op,
            });
        }
        Ok(Ok(self.body))
    }
}

/// Reads fields off the front of a body.
pub struct Cursor<'a> {
    bytes: &'a [u8],
}

impl<'a> Cursor<'a> {
    /// A cursor at the start of `bytes`.
    pub fn new(bytes: &'a [u8]) -> Self {
        Self { bytes }
    }

    fn take(&mut self, len: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.bytes.len() < len {
            return Err(DecodeError::Truncated(what));
        }
        let (head, rest) = self.bytes.split_at(len);
        self.bytes = rest;
        Ok(head)
    }

    /// One byte.
    pub fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.take(1, what)?[0])
    }

    /// A little-endian `u16`.
    pub fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(
            self.take(2, what)?.try_into().expect("2"),
        ))
    }

    /// A little-endian `u32`.
    pub fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(
            self.take(4, what)?.try_into().expect("4"),
        ))
    }

    /// A little-endian `u64`.
    pub fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(
            self.take(8, what)?.try_into().expect("8"),
        ))
    }

    /// A string with a `u8` length.
    pub fn str8(&mut self, what: &'static str) -> Result<&'a str, DecodeError> {
        let len = usize::from(self.u8(what)?);
        std::str::from_utf8(self.take(len, what)?).map_err(|_| DecodeError::NotUtf8(what))
    }

    /// Bytes with a `u16` length.
    pub fn bytes16(&mut self, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let len = usize::from(self.u16(what)?);
        self.take(len, what)
    }

    /// An optional `u16`-length byte string: a flag byte, then the bytes if it is 1.
    pub fn opt_bytes16(&mut self, what: &'static str) -> Result<Option<&'a [u8]>, DecodeError> {
        match self.u8(what)? {
            0 => Ok(None),
            1 => Ok(Some(self.bytes16(what)?)),
            _ => Err(DecodeError::BadFlag(what)),
        }
    }

    /// A `u32` count of `width`-byte items, as one slice.
    fn items(&mut self, width: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let count = self.u32(what)? as usize;
        let len = count
            .checked_mul(width)
            .ok_or(DecodeError::Truncated(what))?;
        self.take(len, what)
    }

    /// A `u32` count of `u8`-length byte strings, checked whole and kept as one slice.
    fn keys8(&mut self, what: &'static str) -> Result<Keys8<'a>, DecodeError> {
        let count = self.u32(what)? as usize;
        let whole = self.bytes;
        let mut used = 0;
        for _ in 0..count {
            let len = usize::from(self.u8(what)?);
            self.take(len, what)?;
            used += 1 + len;
        }
        Ok(Keys8 {
            bytes: &whole[..used],
            count,
        })
    }

    /// Whatever is left.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.bytes)
    }

    /// Fails if bytes are left.
    pub fn finish(self) -> Result<(), DecodeError> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes(self.bytes.len()))
        }
    }
}

/// A list of `u64`s as it sits in the frame (little-endian, unaligned).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct U64s<'a>(&'a [u8]);

impl<'a> U64s<'a> {
    /// How many.
    pub fn len(&self) -> usize {
        self.0.len() / 8
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The values, in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = u64> + 'a {
        self.0
            .chunks_exact(8)
            .map(|chunk| u64::from_le_bytes(chunk.try_into().expect("8")))
    }

    /// Replaces `out`'s contents with the values (reusing its allocation).
    pub fn read_into(&self, out: &mut Vec<u64>) {
        out.clear();
        out.extend(self.iter());
    }
}

/// A list of `u8`-length byte strings (keys) as it sits in the frame, checked when decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keys8<'a> {
    bytes: &'a [u8],
    count: usize,
}

impl<'a> Keys8<'a> {
    /// How many.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The keys, in order.
    pub fn iter(&self) -> impl Iterator<Item = &'a [u8]> + 'a {
        let mut rest = self.bytes;
        (0..self.count).map(move |_| {
            // Checked whole by the decoder: every length fits what follows it.
            let len = usize::from(rest[0]);
            let key = &rest[1..1 + len];
            rest = &rest[1 + len..];
            key
        })
    }
}

/// A list of `(uid, conn)` pairs as it sits in the frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pairs<'a>(&'a [u8]);

impl<'a> Pairs<'a> {
    /// How many.
    pub fn len(&self) -> usize {
        self.0.len() / 16
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The pairs, in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (u64, u64)> + 'a {
        self.0.chunks_exact(16).map(|chunk| {
            (
                u64::from_le_bytes(chunk[..8].try_into().expect("8")),
                u64::from_le_bytes(chunk[8..].try_into().expect("8")),
            )
        })
    }

    /// Replaces `out`'s contents with the pairs (reusing its allocation).
    pub fn read_into(&self, out: &mut Vec<(u64, u64)>) {
        out.clear();
        out.extend(self.iter());
    }
}

/// The fields of a login request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoginFields<'a> {
    /// The user id.
    pub uid: u64,
    /// The connection id.
    pub conn: u64,
    /// Time to live after the last heartbeat; 0 asks for the node's default.
    pub ttl_ms: u32,
    /// The device.
    pub device: &'a str,
    /// The gateway.
    pub gateway: &'a str,
    /// Optional metadata.
    pub meta: Option<&'a [u8]>,
}

/// A session as the node encodes it into a reply (borrowed fields).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionFields<'a> {
    /// The user id.
    pub uid: u64,
    /// The connection id.
    pub conn: u64,
    /// Login time.
    pub login_ms: u64,
    /// Last heartbeat time.
    pub last_heartbeat_ms: u64,
    /// Time to live after the last heartbeat.
    pub ttl_ms: u32,
    /// The device.
    pub device: &'a str,
    /// The gateway.
    pub gateway: &'a str,
    /// Optional metadata.
    pub meta: Option<&'a [u8]>,
}

/// A session as a client decodes it from a reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WireSession {
    /// The user id.
    pub uid: u64,
    /// The connection id.
    pub conn: u64,
    /// Login time.
    pub login_ms: u64,
    /// Last heartbeat time.
    pub last_heartbeat_ms: u64,
    /// Time to live after the last heartbeat.
    pub ttl_ms: u32,
    /// The device.
    pub device: String,
    /// The gateway.
    pub gateway: String,
    /// Optional metadata.
    pub meta: Option<Vec<u8>>,
}

impl WireSession {
    /// The borrowed form, for encoding.
    pub fn fields(&self) -> SessionFields<'_> {
        SessionFields {
            uid: self.uid,
            conn: self.conn,
            login_ms: self.login_ms,
            last_heartbeat_ms: self.last_heartbeat_ms,
            ttl_ms: self.ttl_ms,
            device: &self.device,
            gateway: &self.gateway,
            meta: self.meta.as_deref(),
        }
    }
}

/// A decoded request, borrowing from the read buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request<'a> {
    /// Opens the connection.
    Hello {
        /// The bearer token (empty when none).
        token: &'a [u8],
    },
    /// One seq.
    Next {
        /// The namespace (empty = default).
        namespace: &'a str,
        /// The id.
        id: u64,
    },
    /// One seq per id.
    NextBatch {
        /// The namespace (empty = default).
        namespace: &'a str,
        /// The ids.
        ids: U64s<'a>,
    },
    /// `count` consecutive seqs per id.
    NextRange {
        /// The namespace (empty = default).
        namespace: &'a str,
        /// Seqs per id.
        count: u64,
        /// The ids.
        ids: U64s<'a>,
    },
    /// `count` consecutive seqs per string key.
    NextKeys {
        /// The namespace (empty = default).
        namespace: &'a str,
        /// Seqs per key.
        count: u64,
        /// The keys.
        keys: Keys8<'a>,
    },
    /// A login.
    Login(LoginFields<'a>),
    /// A logout.
    Logout {
        /// The user id.
        uid: u64,
        /// The connection id.
        conn: u64,
    },
    /// A heartbeat.
    Heartbeat {
        /// The user id.
        uid: u64,
        /// The connection id.
        conn: u64,
    },
    /// A gateway's heartbeats.
    HeartbeatBatch {
        /// The gateway.
        gateway: &'a str,
        /// The sessions.
        sessions: Pairs<'a>,
    },
    /// Lookups.
    LookupBatch {
        /// The uids.
        uids: U64s<'a>,
    },
    /// The number of sessions online.
    OnlineCount,
    /// The route table.
    Route,
}

impl<'a> Request<'a> {
    /// Decodes a request frame.
    pub fn decode(frame: Frame<'a>) -> Result<Request<'a>, DecodeError> {
        let op = Op::from_u8(frame.op).ok_or(DecodeError::UnknownOp(frame.op))?;
        let mut c = Cursor::new(frame.body);
        let request = match op {
            Op::Hello => {
                if c.take(4, "magic")? != MAGIC {
                    return Err(DecodeError::BadMagic);
                }
                let version = c.u8("version")?;
                if version != VERSION {
                    return Err(DecodeError::Version(version));
                }
                Request::Hello {
                    token: c.bytes16("token")?,
                }
            }
            Op::Next => Request::Next {
                namespace: c.str8("namespace")?,
                id: c.u64("id")?,
            },
            Op::NextBatch => Request::NextBatch {
                namespace: c.str8("namespace")?,
                ids: U64s(c.items(8, "ids")?),
            },
            Op::NextRange => Request::NextRange {
                namespace: c.str8("namespace")?,
                count: c.u64("count")?,
                ids: U64s(c.items(8, "ids")?),
            },
            Op::NextKeys => Request::NextKeys {
                namespace: c.str8("namespace")?,
                count: c.u64("count")?,
                keys: c.keys8("keys")?,
            },
            Op::Login => Request::Login(LoginFields {
                uid: c.u64("uid")?,
                conn: c.u64("conn")?,
                ttl_ms: c.u32("ttl_ms")?,
                device: c.str8("device")?,
                gateway: c.str8("gateway")?,
                meta: c.opt_bytes16("meta")?,
            }),
            Op::Logout => Request::Logout {
                uid: c.u64("uid")?,
                conn: c.u64("conn")?,
            },
            Op::Heartbeat => Request::Heartbeat {
                uid: c.u64("uid")?,
                conn: c.u64("conn")?,
            },
            Op::HeartbeatBatch => Request::HeartbeatBatch {
                gateway: c.str8("gateway")?,
                sessions: Pairs(c.items(16, "sessions")?),
            },
            Op::LookupBatch => Request::LookupBatch {
                uids: U64s(c.items(8, "uids")?),
            },
            Op::OnlineCount => Request::OnlineCount,
            Op::Route => Request::Route,
        };
        c.finish()?;
        Ok(request)
    }

    /// The request's op.
    pub fn op(&self) -> Op {
        match self {
            Request::Hello { .. } => Op::Hello,
            Request::Next { .. } => Op::Next,
            Request::NextBatch { .. } => Op::NextBatch,
            Request::NextRange { .. } => Op::NextRange,
            Request::NextKeys { .. } => Op::NextKeys,
            Request::Login(_) => Op::Login,
            Request::Logout { .. } => Op::Logout,
            Request::Heartbeat { .. } => Op::Heartbeat,
            Request::HeartbeatBatch { .. } => Op::HeartbeatBatch,
            Request::LookupBatch { .. } => Op::LookupBatch,
            Request::OnlineCount => Op::OnlineCount,
            Request::Route => Op::Route,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Encoding

/// Starts a frame with `op`; returns where it starts, for [`end`].
pub fn begin(out: &mut Vec<u8>, op: u8) -> usize {
    let start = out.len();
    out.extend_from_slice(&[0, 0, 0, 0, op]);
    start
}

/// Ends the frame started at `start` by writing its length.
pub fn end(out: &mut [u8], start: usize) {
    let len = (out.len() - start - 4) as u32;
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
}

fn check_len(what: &'static str, len: usize, max: usize) -> Result<(), DecodeError> {
    if len > max {
        Err(DecodeError::FieldTooLong { what, len, max })
    } else {
        Ok(())
    }
}

fn put_str8(out: &mut Vec<u8>, value: &str) {
    out.push(value.len() as u8);
    out.extend_from_slice(value.as_bytes());
}

fn put_opt_bytes16(out: &mut Vec<u8>, value: Option<&[u8]>) {
    match value {
        None => out.push(0),
        Some(bytes) => {
            out.push(1);
            out.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
            out.extend_from_slice(bytes);
        }
    }
}

fn put_count(out: &mut Vec<u8>, what: &'static str, count: usize) -> Result<(), DecodeError> {
    let count = u32::try_from(count).map_err(|_| DecodeError::FieldTooLong {
        what,
        len: count,
        max: u32::MAX as usize,
    })?;
    out.extend_from_slice(&count.to_le_bytes());
    Ok(())
}

/// Checks the frame started at `start` against [`FRAME_BYTES_MAX`]; on failure removes it.
fn finish(out: &mut Vec<u8>, start: usize) -> Result<(), DecodeError> {
    let len = out.len() - start - 4;
    if len > FRAME_BYTES_MAX {
        out.truncate(start);
        return Err(DecodeError::FrameTooLarge {
            len,
            max: FRAME_BYTES_MAX,
        });
    }
    end(out, start);
    Ok(())
}

/// Appends a `Hello`.
pub fn hello(out: &mut Vec<u8>, token: &[u8]) -> Result<(), DecodeError> {
    check_len("token", token.len(), u16::MAX as usize)?;
    let start = begin(out, Op::Hello as u8);
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.extend_from_slice(&(token.len() as u16).to_le_bytes());
    out.extend_from_slice(token);
    finish(out, start)
}

/// Appends a `Next`.
pub fn next(out: &mut Vec<u8>, namespace: &str, id: u64) -> Result<(), DecodeError> {
    check_len("namespace", namespace.len(), u8::MAX as usize)?;
    let start = begin(out, Op::Next as u8);
    put_str8(out, namespace);
    out.extend_from_slice(&id.to_le_bytes());
    finish(out, start)
}

/// Appends a `NextBatch`.
pub fn next_batch(out: &mut Vec<u8>, namespace: &str, ids: &[u64]) -> Result<(), DecodeError> {
    check_len("namespace", namespace.len(), u8::MAX as usize)?;
    let start = begin(out, Op::NextBatch as u8);
    put_str8(out, namespace);
    put_count(out, "ids", ids.len())?;
    for id in ids {
        out.extend_from_slice(&id.to_le_bytes());
    }
    finish(out, start)
}

/// Appends a `NextRange`: `count` consecutive seqs for each id.
pub fn next_range(
    out: &mut Vec<u8>,
    namespace: &str,
    count: u64,
    ids: &[u64],
) -> Result<(), DecodeError> {
    check_len("namespace", namespace.len(), u8::MAX as usize)?;
    let start = begin(out, Op::NextRange as u8);
    put_str8(out, namespace);
    out.extend_from_slice(&count.to_le_bytes());
    put_count(out, "ids", ids.len())?;
    for id in ids {
        out.extend_from_slice(&id.to_le_bytes());
    }
    finish(out, start)
}

/// Appends a `NextKeys`: `count` consecutive seqs for each string key (each at most 255
/// bytes here; the node takes 1 to 128).
pub fn next_keys(
    out: &mut Vec<u8>,
    namespace: &str,
    count: u64,
    keys: &[Vec<u8>],
) -> Result<(), DecodeError> {
    check_len("namespace", namespace.len(), u8::MAX as usize)?;
    for key in keys {
        check_len("key", key.len(), u8::MAX as usize)?;
    }
    let start = begin(out, Op::NextKeys as u8);
    put_str8(out, namespace);
    out.extend_from_slice(&count.to_le_bytes());
    put_count(out, "keys", keys.len())?;
    for key in keys {
        out.push(key.len() as u8);
        out.extend_from_slice(key);
    }
    finish(out, start)
}

/// Appends a `Login`.
pub fn login(out: &mut Vec<u8>, fields: &LoginFields<'_>) -> Result<(), DecodeError> {
    check_len("device", fields.device.len(), u8::MAX as usize)?;
    check_len("gateway", fields.gateway.len(), u8::MAX as usize)?;
    check_len(
        "meta",
        fields.meta.map_or(0, <[u8]>::len),
        u16::MAX as usize,
    )?;
    let start = begin(out, Op::Login as u8);
    out.extend_from_slice(&fields.uid.to_le_bytes());
    out.extend_from_slice(&fields.conn.to_le_bytes());
    out.extend_from_slice(&fields.ttl_ms.to_le_bytes());
    put_str8(out, fields.device);
    put_str8(out, fields.gateway);
    put_opt_bytes16(out, fields.meta);
    finish(out, start)
}

/// Appends a `Logout` or a `Heartbeat` (`op`) of one session.
pub fn session_op(out: &mut Vec<u8>, op: Op, uid: u64, conn: u64) {
    debug_assert!(matches!(op, Op::Logout | Op::Heartbeat));
    let start = begin(out, op as u8);
    out.extend_from_slice(&uid.to_le_bytes());
    out.extend_from_slice(&conn.to_le_bytes());
    end(out, start);
}

/// Appends a `HeartbeatBatch`.
pub fn heartbeat_batch(
    out: &mut Vec<u8>,
    gateway: &str,
    sessions: &[(u64, u64)],
) -> Result<(), DecodeError> {
    check_len("gateway", gateway.len(), u8::MAX as usize)?;
    let start = begin(out, Op::HeartbeatBatch as u8);
    put_str8(out, gateway);
    put_count(out, "sessions", sessions.len())?;
    for (uid, conn) in sessions {
        out.extend_from_slice(&uid.to_le_bytes());
        out.extend_from_slice(&conn.to_le_bytes());
    }
    finish(out, start)
}

/// Appends a `LookupBatch`.
pub fn lookup_batch(out: &mut Vec<u8>, uids: &[u64]) -> Result<(), DecodeError> {
    let start = begin(out, Op::LookupBatch as u8);
    put_count(out, "uids", uids.len())?;
    for uid in uids {
        out.extend_from_slice(&uid.to_le_bytes());
    }
    finish(out, start)
}

/// Appends an `OnlineCount`.
pub fn online_count(out: &mut Vec<u8>) {
    let start = begin(out, Op::OnlineCount as u8);
    end(out, start);
}

/// Appends a `Route`.
pub fn route(out: &mut Vec<u8>) {
    let start = begin(out, Op::Route as u8);
    end(out, start);
}

/// Appends the reply of `Route`: two opaque blobs (the node puts the protobuf encodings of
/// `imstate.v1.RouteReply` and `imstate.v1.ListNamespacesReply` in them).
pub fn reply_route(out: &mut Vec<u8>, route: &[u8], namespaces: &[u8]) {
    let start = begin(out, Op::Route.reply());
    for blob in [route, namespaces] {
        out.extend_from_slice(&(blob.len() as u32).to_le_bytes());
        out.extend_from_slice(blob);
    }
    end(out, start);
}

/// Decodes the body of a `Route` reply: (route, namespaces) blobs.
pub fn decode_route(body: &[u8]) -> Result<(&[u8], &[u8]), DecodeError> {
    let mut c = Cursor::new(body);
    let route = c.items(1, "route")?;
    let namespaces = c.items(1, "namespaces")?;
    c.finish()?;
    Ok((route, namespaces))
}

/// Appends the reply of `OnlineCount`.
pub fn reply_online_count(out: &mut Vec<u8>, sessions: u64) {
    let start = begin(out, Op::OnlineCount.reply());
    out.extend_from_slice(&sessions.to_le_bytes());
    end(out, start);
}

/// Decodes the body of an `OnlineCount` reply.
pub fn decode_online_count(body: &[u8]) -> Result<u64, DecodeError> {
    let mut c = Cursor::new(body);
    let sessions = c.u64("sessions")?;
    c.finish()?;
    Ok(sessions)
}

/// Appends an error reply.
pub fn reply_error(out: &mut Vec<u8>, code: Code, message: &str) {
    let start = begin(out, REPLY_ERROR);
    out.push(code.0);
    out.extend_from_slice(message.as_bytes());
    end(out, start);
}

/// The message of a redirect (code `FAILED_PRECONDITION`): the section is another node's.
/// The first line is machine-readable, `moved <node> <wire addr> <grpc addr> <route
/// version>`; the rest is for people.
pub fn moved_message(node: &str, wire: &str, grpc: &str, version: u64, text: &str) -> String {
    format!("moved {node} {wire} {grpc} {version}\n{text}")
}

/// A redirect read from an error message: `(node, wire addr, grpc addr, route version)`.
pub fn parse_moved(message: &str) -> Option<(String, String, String, u64)> {
    let line = message.lines().next()?;
    let mut parts = line.strip_prefix("moved ")?.split(' ');
    let node = parts.next()?.to_owned();
    let wire = parts.next()?.to_owned();
    let grpc = parts.next()?.to_owned();
    let version = parts.next()?.parse().ok()?;
    Some((node, wire, grpc, version))
}

/// Appends the reply of `Hello`.
pub fn reply_hello(out: &mut Vec<u8>, route_version: u64) {
    let start = begin(out, Op::Hello.reply());
    out.extend_from_slice(&route_version.to_le_bytes());
    end(out, start);
}

/// Appends the reply of `Next`.
pub fn reply_next(out: &mut Vec<u8>, seq: u64, route_version: u64) {
    let start = begin(out, Op::Next.reply());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&route_version.to_le_bytes());
    end(out, start);
}

/// Appends the reply of `NextBatch`.
pub fn reply_next_batch(out: &mut Vec<u8>, seqs: &[u64], route_version: u64) {
    reply_seqs(out, Op::NextBatch, seqs, route_version);
}

/// Appends the reply of `NextRange`: the last seq of each id's range.
pub fn reply_next_range(out: &mut Vec<u8>, lasts: &[u64], route_version: u64) {
    reply_seqs(out, Op::NextRange, lasts, route_version);
}

/// Appends the reply of `NextKeys`: the last seq of each key's range (as `NextRange`'s).
pub fn reply_next_keys(out: &mut Vec<u8>, lasts: &[u64], route_version: u64) {
    reply_seqs(out, Op::NextKeys, lasts, route_version);
}

fn reply_seqs(out: &mut Vec<u8>, op: Op, seqs: &[u64], route_version: u64) {
    let start = begin(out, op.reply());
    out.extend_from_slice(&route_version.to_le_bytes());
    out.extend_from_slice(&(seqs.len() as u32).to_le_bytes());
    for seq in seqs {
        out.extend_from_slice(&seq.to_le_bytes());
    }
    end(out, start);
}

/// Appends one session (inside a reply body).
pub fn put_session(out: &mut Vec<u8>, session: &SessionFields<'_>) {
    out.extend_from_slice(&session.uid.to_le_bytes());
    out.extend_from_slice(&session.conn.to_le_bytes());
    out.extend_from_slice(&session.login_ms.to_le_bytes());
    out.extend_from_slice(&session.last_heartbeat_ms.to_le_bytes());
    out.extend_from_slice(&session.ttl_ms.to_le_bytes());
    // The registry's own limits (64-byte devices, 128-byte gateways, 256-byte metadata) are
    // below what the prefixes can say; `min` only guards against a future change of them.
    let device = &session.device[..session.device.len().min(u8::MAX as usize)];
    let gateway = &session.gateway[..session.gateway.len().min(u8::MAX as usize)];
    put_str8(out, device);
    put_str8(out, gateway);
    put_opt_bytes16(
        out,
        session
            .meta
            .map(|meta| &meta[..meta.len().min(u16::MAX as usize)]),
    );
}

/// Appends the reply of `Login`: the stored session and the one it replaced.
pub fn reply_login(
    out: &mut Vec<u8>,
    session: &SessionFields<'_>,
    replaced: Option<&SessionFields<'_>>,
) {
    let start = begin(out, Op::Login.reply());
    put_session(out, session);
    match replaced {
        None => out.push(0),
        Some(replaced) => {
            out.push(1);
            put_session(out, replaced);
        }
    }
    end(out, start);
}

/// Appends the reply of `Logout`: the removed session.
pub fn reply_logout(out: &mut Vec<u8>, session: &SessionFields<'_>) {
    let start = begin(out, Op::Logout.reply());
    put_session(out, session);
    end(out, start);
}

/// Appends the (empty) reply of `Heartbeat`.
pub fn reply_heartbeat(out: &mut Vec<u8>) {
    let start = begin(out, Op::Heartbeat.reply());
    end(out, start);
}

/// Appends the reply of `HeartbeatBatch`: the sessions the node does not know.
pub fn reply_heartbeat_batch(out: &mut Vec<u8>, unknown: &[(u64, u64)]) {
    let start = begin(out, Op::HeartbeatBatch.reply());
    out.extend_from_slice(&(unknown.len() as u32).to_le_bytes());
    for (uid, conn) in unknown {
        out.extend_from_slice(&uid.to_le_bytes());
        out.extend_from_slice(&conn.to_le_bytes());
    }
    end(out, start);
}

/// Writes the reply of `LookupBatch` straight into the output buffer: [`LookupReply::uid`]
/// once per uid in request order, then [`LookupReply::session`] for each of its sessions.
pub struct LookupReply<'o> {
    out: &'o mut Vec<u8>,
    start: usize,
    /// Where the current uid's session count sits.
    count_at: Option<usize>,
}

impl<'o> LookupReply<'o> {
    /// Starts the reply for `uids` uids.
    pub fn begin(out: &'o mut Vec<u8>, uids: usize) -> Self {
        let start = begin(out, Op::LookupBatch.reply());
        out.extend_from_slice(&(uids as u32).to_le_bytes());
        Self {
            out,
            start,
            count_at: None,
        }
    }

    /// Starts the next uid.
    pub fn uid(&mut self) {
        self.count_at = Some(self.out.len());
        self.out.extend_from_slice(&0u16.to_le_bytes());
    }

    /// Adds a uid whose `count` sessions are already encoded (with [`put_session`]) in
    /// `sessions`.
    pub fn uid_encoded(&mut self, count: u16, sessions: &[u8]) {
        self.count_at = None;
        self.out.extend_from_slice(&count.to_le_bytes());
        self.out.extend_from_slice(sessions);
    }

    /// Adds a session to the current uid (at most 65,535 per uid, the registry's own
    /// ceiling for `sessions_per_uid_max`).
    pub fn session(&mut self, session: &SessionFields<'_>) {
        let at = self.count_at.expect("uid() before session()");
        let count = u16::from_le_bytes([self.out[at], self.out[at + 1]]);
        let Some(count) = count.checked_add(1) else {
            return;
        };
        self.out[at..at + 2].copy_from_slice(&count.to_le_bytes());
        put_session(self.out, session);
    }

    /// Ends the reply.
    pub fn end(self) {
        end(self.out, self.start);
    }
}

// ---------------------------------------------------------------------------------------------
// Decoding replies (the client side)

fn session(c: &mut Cursor<'_>) -> Result<WireSession, DecodeError> {
    Ok(WireSession {
        uid: c.u64("uid")?,
        conn: c.u64("conn")?,
        login_ms: c.u64("login_ms")?,
        last_heartbeat_ms: c.u64("last_heartbeat_ms")?,
        ttl_ms: c.u32("ttl_ms")?,
        device: c.str8("device")?.to_string(),
        gateway: c.str8("gateway")?.to_string(),
        meta: c.opt_bytes16("meta")?.map(<[u8]>::to_vec),
    })
}

/// Skips one session; returns whether it was there.
fn skip_session(c: &mut Cursor<'_>) -> Result<(), DecodeError> {
    c.take(36, "session")?;
    c.str8("device")?;
    c.str8("gateway")?;
    c.opt_bytes16("meta")?;
    Ok(())
}

/// Decodes the body of a `Hello` reply: the node's route-table version.
pub fn decode_hello(body: &[u8]) -> Result<u64, DecodeError> {
    let mut c = Cursor::new(body);
    let value = c.u64("route_version")?;
    c.finish()?;
    Ok(value)
}

/// Decodes the body of a `Next` reply: (seq, route version).
pub fn decode_next(body: &[u8]) -> Result<(u64, u64), DecodeError> {
    let mut c = Cursor::new(body);
    let seq = c.u64("seq")?;
    let route_version = c.u64("route_version")?;
    c.finish()?;
    Ok((seq, route_version))
}

/// Decodes the body of a `NextBatch` reply: (seqs, route version).
pub fn decode_next_batch(body: &[u8]) -> Result<(Vec<u64>, u64), DecodeError> {
    let mut c = Cursor::new(body);
    let route_version = c.u64("route_version")?;
    let seqs = U64s(c.items(8, "seqs")?).iter().collect();
    c.finish()?;
    Ok((seqs, route_version))
}

/// Decodes the body of a `NextRange` reply: (the last seq of each range, route version).
pub fn decode_next_range(body: &[u8]) -> Result<(Vec<u64>, u64), DecodeError> {
    decode_next_batch(body)
}

/// Decodes the body of a `Login` reply: the session and the one it replaced.
pub fn decode_login(body: &[u8]) -> Result<(WireSession, Option<WireSession>), DecodeError> {
    let mut c = Cursor::new(body);
    let stored = session(&mut c)?;
    let replaced = match c.u8("replaced")? {
        0 => None,
        1 => Some(session(&mut c)?),
        _ => return Err(DecodeError::BadFlag("replaced")),
    };
    c.finish()?;
    Ok((stored, replaced))
}

/// Decodes the body of a `Logout` reply.
pub fn decode_logout(body: &[u8]) -> Result<WireSession, DecodeError> {
    let mut c = Cursor::new(body);
    let removed = session(&mut c)?;
    c.finish()?;
    Ok(removed)
}

/// Decodes the body of a `Heartbeat` reply.
pub fn decode_heartbeat(body: &[u8]) -> Result<(), DecodeError> {
    Cursor::new(body).finish()
}

/// Decodes the body of a `HeartbeatBatch` reply: the unknown sessions.
pub fn decode_heartbeat_batch(body: &[u8]) -> Result<Vec<(u64, u64)>, DecodeError> {
    let mut c = Cursor::new(body);
    let unknown = Pairs(c.items(16, "unknown")?).iter().collect();
    c.finish()?;
    Ok(unknown)
}

/// Decodes the body of a `LookupBatch` reply: the sessions of each uid, in request order.
pub fn decode_lookup_batch(body: &[u8]) -> Result<Vec<Vec<WireSession>>, DecodeError> {
    let mut c = Cursor::new(body);
    let uids = c.u32("uid count")? as usize;
    let mut out = Vec::with_capacity(uids.min(body.len()));
    for _ in 0..uids {
        let count = c.u16("session count")?;
        let mut sessions = Vec::with_capacity(usize::from(count));
        for _ in 0..count {
            sessions.push(session(&mut c)?);
        }
        out.push(sessions);
    }
    c.finish()?;
    Ok(out)
}

/// Validates the body of a `LookupBatch` reply without building sessions; returns (uids,
/// sessions). For load generators that only count.
pub fn count_lookup_batch(body: &[u8]) -> Result<(usize, usize), DecodeError> {
    let mut c = Cursor::new(body);
    let uids = c.u32("uid count")? as usize;
    let mut sessions = 0;
    for _ in 0..uids {
        let count = c.u16("session count")?;
        for _ in 0..count {
            skip_session(&mut c)?;
        }
        sessions += usize::from(count);
    }
    c.finish()?;
    Ok((uids, sessions))
}

#[cfg(test)]
mod tests;
