//! Byte encoding of [`Change`] records and sessions: compact, hand-written little-endian.
//!
//! ```text
//!  tag: u8 = version << 4 | kind          (version 1; kinds below)
//!  1 Login             session
//!  2 Heartbeat         uid u64, conn u64, at_ms u64
//!  3 HeartbeatBatch    at_ms u64, n u32, n x (uid u64, conn u64)
//!  4 Logout            uid u64, conn u64
//!  5 Expire            uid u64, conn u64
//!  6 GatewayDown       gateway, scope index u32, scope count u32
//!  7 GatewayRegister   gateway, ttl_ms u32, at_ms u64
//!  8 GatewayHeartbeat  gateway, at_ms u64
//!  9 GatewayUnregister gateway
//!
//!  session = uid u64, conn u64, login_ms u64, last_heartbeat_ms u64, ttl_ms u32,
//!            device (u8 len, bytes), gateway (u8 len, bytes),
//!            meta (u16 len or 0xFFFF for none, bytes)
//! ```
//!
//! Pair check across the disk boundary: decoding validates every length against the same
//! limits the registry enforces ([`crate::DEVICE_BYTES_MAX`] and friends), checks UTF-8 and
//! refuses trailing bytes. Decoding never panics and never allocates more than the input
//! could describe.

use std::sync::Arc;

use thiserror::Error;

use crate::{
    Change, DEVICE_BYTES_MAX, GATEWAY_NAME_BYTES_MAX, META_BYTES_MAX, Session, ShardScope,
};

/// Version in the high nibble of every tag byte.
pub const CHANGE_FORMAT_VERSION: u8 = 1;

const KIND_LOGIN: u8 = 1;
const KIND_HEARTBEAT: u8 = 2;
const KIND_HEARTBEAT_BATCH: u8 = 3;
const KIND_LOGOUT: u8 = 4;
const KIND_EXPIRE: u8 = 5;
const KIND_GATEWAY_DOWN: u8 = 6;
const KIND_GATEWAY_REGISTER: u8 = 7;
const KIND_GATEWAY_HEARTBEAT: u8 = 8;
const KIND_GATEWAY_UNREGISTER: u8 = 9;
const META_NONE: u16 = u16::MAX;

/// Why bytes are not a valid record.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// The input ended inside a record.
    #[error("record truncated")]
    Truncated,
    /// The tag's version nibble is not one this build reads.
    #[error("unsupported record version {0}")]
    UnsupportedVersion(u8),
    /// The tag's kind nibble is unknown.
    #[error("unknown record kind {0}")]
    UnknownKind(u8),
    /// Bytes follow a complete record.
    #[error("{0} trailing bytes after the record")]
    TrailingBytes(usize),
    /// A field is longer than its limit or empty where it must not be.
    #[error("{field} is {len} bytes; allowed is {min}..={max}")]
    FieldLength {
        /// The field.
        field: &'static str,
        /// Its length.
        len: usize,
        /// Shortest allowed.
        min: usize,
        /// Longest allowed.
        max: usize,
    },
    /// A name is not UTF-8.
    #[error("{field} is not UTF-8")]
    InvalidUtf8 {
        /// The field.
        field: &'static str,
    },
    /// A varint longer than 10 bytes or beyond 64 bits.
    #[error("varint overflows 64 bits")]
    VarintOverflow,
    /// A shard scope with `count == 0` or `index >= count`.
    #[error("invalid shard scope {index}/{count}")]
    InvalidScope {
        /// The index.
        index: u32,
        /// The count.
        count: u32,
    },
}

impl Change {
    /// Appends the encoding of this record to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Change::Login(session) => {
                out.push(tag(KIND_LOGIN));
                encode_session(session, out);
            }
            Change::Heartbeat { uid, conn, at_ms } => {
                out.push(tag(KIND_HEARTBEAT));
                put_u64(out, *uid);
                put_u64(out, *conn);
                put_u64(out, *at_ms);
            }
            Change::HeartbeatBatch { at_ms, sessions } => {
                out.push(tag(KIND_HEARTBEAT_BATCH));
                put_u64(out, *at_ms);
                // Batches are bounded far below u32::MAX by heartbeat_batch_max.
                put_u32(out, u32::try_from(sessions.len()).unwrap_or(u32::MAX));
                for &(uid, conn) in sessions.iter().take(u32::MAX as usize) {
                    put_u64(out, uid);
                    put_u64(out, conn);
                }
            }
            Change::Logout { uid, conn } | Change::Expire { uid, conn } => {
                let kind = if matches!(self, Change::Logout { .. }) {
                    KIND_LOGOUT
                } else {
                    KIND_EXPIRE
                };
                out.push(tag(kind));
                put_u64(out, *uid);
                put_u64(out, *conn);
            }
            Change::GatewayDown { gateway, scope } => {
                out.push(tag(KIND_GATEWAY_DOWN));
                put_short_str(out, gateway);
                put_u32(out, scope.index);
                put_u32(out, scope.count);
            }
            Change::GatewayRegister {
                gateway,
                ttl_ms,
                at_ms,
            } => {
                out.push(tag(KIND_GATEWAY_REGISTER));
                put_short_str(out, gateway);
                put_u32(out, *ttl_ms);
                put_u64(out, *at_ms);
            }
            Change::GatewayHeartbeat { gateway, at_ms } => {
                out.push(tag(KIND_GATEWAY_HEARTBEAT));
                put_short_str(out, gateway);
                put_u64(out, *at_ms);
            }
            Change::GatewayUnregister { gateway } => {
                out.push(tag(KIND_GATEWAY_UNREGISTER));
                put_short_str(out, gateway);
            }
        }
    }

    /// The encoding of this record.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32);
        self.encode(&mut out);
        out
    }

    /// The uid of a login, heartbeat, logout or expiry record, read from its encoding without
    /// decoding it (recovery routes records to shards by it); `None` for other kinds and for
    /// bytes too short to hold one. The record must still be decoded (and validated) to be
    /// applied.
    pub fn peek_uid(bytes: &[u8]) -> Option<u64> {
        let (&tag, rest) = bytes.split_first()?;
        if tag >> 4 != CHANGE_FORMAT_VERSION {
            return None;
        }
        match tag & 0x0F {
            KIND_LOGIN | KIND_HEARTBEAT | KIND_LOGOUT | KIND_EXPIRE => {
                let uid: [u8; 8] = rest.get(..8)?.try_into().ok()?;
                Some(u64::from_le_bytes(uid))
            }
            _ => None,
        }
    }

    /// Decodes exactly one record from `bytes`.
    pub fn decode(bytes: &[u8]) -> Result<Change, DecodeError> {
        let mut reader = Reader::new(bytes);
        let tag = reader.u8()?;
        let (version, kind) = (tag >> 4, tag & 0x0F);
        if version != CHANGE_FORMAT_VERSION {
            return Err(DecodeError::UnsupportedVersion(version));
        }
        let change = match kind {
            KIND_LOGIN => Change::Login(reader.session()?),
            KIND_HEARTBEAT => Change::Heartbeat {
                uid: reader.u64()?,
                conn: reader.u64()?,
                at_ms: reader.u64()?,
            },
            KIND_HEARTBEAT_BATCH => {
                let at_ms = reader.u64()?;
                let count = reader.u32()? as usize;
                if count > reader.remaining() / 16 {
                    return Err(DecodeError::Truncated);
                }
                let mut sessions = Vec::with_capacity(count);
                for _ in 0..count {
                    sessions.push((reader.u64()?, reader.u64()?));
                }
                Change::HeartbeatBatch { at_ms, sessions }
            }
            KIND_LOGOUT => Change::Logout {
                uid: reader.u64()?,
                conn: reader.u64()?,
            },
            KIND_EXPIRE => Change::Expire {
                uid: reader.u64()?,
                conn: reader.u64()?,
            },
            KIND_GATEWAY_DOWN => {
                let gateway = reader.gateway()?;
                let (index, count) = (reader.u32()?, reader.u32()?);
                if count == 0 || index >= count {
                    return Err(DecodeError::InvalidScope { index, count });
                }
                Change::GatewayDown {
                    gateway,
                    scope: ShardScope { index, count },
                }
            }
            KIND_GATEWAY_REGISTER => Change::GatewayRegister {
                gateway: reader.gateway()?,
                ttl_ms: reader.u32()?,
                at_ms: reader.u64()?,
            },
            KIND_GATEWAY_HEARTBEAT => Change::GatewayHeartbeat {
                gateway: reader.gateway()?,
                at_ms: reader.u64()?,
            },
            KIND_GATEWAY_UNREGISTER => Change::GatewayUnregister {
                gateway: reader.gateway()?,
            },
            other => return Err(DecodeError::UnknownKind(other)),
        };
        reader.finish()?;
        Ok(change)
    }
}

fn tag(kind: u8) -> u8 {
    CHANGE_FORMAT_VERSION << 4 | kind
}

pub(crate) fn put_u16(out: &mut Vec<u8>, value: u16) {
    out.extend_from_slice(&value.to_le_bytes());
}

pub(crate) fn put_u32(out: &mut Vec<u8>, value: u32) {
    out.extend_from_slice(&value.to_le_bytes());
}

pub(crate) fn put_u64(out: &mut Vec<u8>, value: u64) {
    out.extend_from_slice(&value.to_le_bytes());
}

/// Writes `value` as unsigned LEB128: 7 bits per byte, low bits first, high bit set on every
/// byte but the last (1 byte below 128, at most 10).
pub(crate) fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push(value as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Writes a name of at most 255 bytes (longer names never pass validation; they are cut at
/// 255 so the encoding stays well formed and decoding reports the damage).
pub(crate) fn put_short_str(out: &mut Vec<u8>, value: &str) {
    let bytes = &value.as_bytes()[..value.len().min(255)];
    out.push(bytes.len() as u8);
    out.extend_from_slice(bytes);
}

/// Appends the encoding of a session (see the module documentation).
pub(crate) fn encode_session(session: &Session, out: &mut Vec<u8>) {
    put_u64(out, session.uid);
    put_u64(out, session.conn);
    put_u64(out, session.login_ms);
    put_u64(out, session.last_heartbeat_ms);
    put_u32(out, session.ttl_ms);
    put_short_str(out, &session.device);
    put_short_str(out, &session.gateway);
    match &session.meta {
        None => put_u16(out, META_NONE),
        Some(meta) => {
            let bytes = &meta[..meta.len().min(usize::from(META_NONE) - 1)];
            put_u16(out, bytes.len() as u16);
            out.extend_from_slice(bytes);
        }
    }
}

/// A bounds-checked little-endian reader over a byte slice.
pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
    position: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, position: 0 }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.bytes.len() - self.position
    }

    pub(crate) fn take(&mut self, len: usize) -> Result<&'a [u8], DecodeError> {
        if len > self.remaining() {
            return Err(DecodeError::Truncated);
        }
        let slice = &self.bytes[self.position..self.position + len];
        self.position += len;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut array = [0u8; N];
        array.copy_from_slice(self.take(N)?);
        Ok(array)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }

    pub(crate) fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// Reads an unsigned LEB128 integer of at most 10 bytes (see [`put_varint`]).
    pub(crate) fn varint(&mut self) -> Result<u64, DecodeError> {
        let mut value = 0u64;
        for (position, &byte) in self.bytes[self.position..].iter().enumerate().take(10) {
            let bits = u64::from(byte & 0x7F);
            if position == 9 && bits > 1 {
                return Err(DecodeError::VarintOverflow);
            }
            value |= bits << (7 * position);
            if byte & 0x80 == 0 {
                self.position += position + 1;
                return Ok(value);
            }
        }
        if self.remaining() >= 10 {
            Err(DecodeError::VarintOverflow)
        } else {
            Err(DecodeError::Truncated)
        }
    }

    /// Reads a u8-length-prefixed UTF-8 name of `min..=max` bytes.
    pub(crate) fn name(
        &mut self,
        field: &'static str,
        min: usize,
        max: usize,
    ) -> Result<Arc<str>, DecodeError> {
        let len = usize::from(self.u8()?);
        if len < min || len > max {
            return Err(DecodeError::FieldLength {
                field,
                len,
                min,
                max,
            });
        }
        let bytes = self.take(len)?;
        let text = std::str::from_utf8(bytes).map_err(|_| DecodeError::InvalidUtf8 { field })?;
        Ok(Arc::from(text))
    }

    pub(crate) fn gateway(&mut self) -> Result<Arc<str>, DecodeError> {
        self.name("gateway", 1, GATEWAY_NAME_BYTES_MAX)
    }

    pub(crate) fn session(&mut self) -> Result<Session, DecodeError> {
        let uid = self.u64()?;
        let conn = self.u64()?;
        let login_ms = self.u64()?;
        let last_heartbeat_ms = self.u64()?;
        let ttl_ms = self.u32()?;
        let device = self.name("device", 1, DEVICE_BYTES_MAX)?;
        let gateway = self.gateway()?;
        let meta = match self.u16()? {
            META_NONE => None,
            len => {
                let len = usize::from(len);
                if len > META_BYTES_MAX {
                    return Err(DecodeError::FieldLength {
                        field: "meta",
                        len,
                        min: 0,
                        max: META_BYTES_MAX,
                    });
                }
                Some(Arc::from(self.take(len)?))
            }
        };
        Ok(Session {
            uid,
            device,
            gateway,
            conn,
            login_ms,
            last_heartbeat_ms,
            ttl_ms,
            meta,
        })
    }

    pub(crate) fn finish(&self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            extra => Err(DecodeError::TrailingBytes(extra)),
        }
    }
}
