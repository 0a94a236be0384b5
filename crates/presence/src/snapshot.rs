//! Snapshots: the sessions of one shard, or the gateway leases, as a self-describing section.
//!
//! ```text
//!  section = magic "IMPS", version u8 (2), kind u8, body_len u64, body
//!  kind 1  = scope index u32, scope count u32, base_ms u64,
//!            profiles: n u32, n x (device (u8 len, bytes), ttl_ms u32)
//!            gateways: n u32, n x (u8 len, bytes)
//!            sessions: n u64, n x session
//!  session = uid varint, conn varint,
//!            heartbeat zigzag varint (last_heartbeat_ms - base_ms),
//!            login zigzag varint (last_heartbeat_ms / 1000 - login_s),
//!            profile varint, gateway varint (indices into the tables above),
//!            meta varint (0: none, else len + 1), meta bytes
//!  kind 2  = n u32, n x (gateway (u8 len, bytes), ttl_ms u32, last_heartbeat_ms u64)
//! ```
//!
//! Version 2 is compact: names are written once per section and sessions refer to them by
//! index, integers are LEB128 varints and times are deltas, so a session takes about 14 bytes
//! (version 1 repeated names and fixed-width fields: about 56). Restoring it allocates nothing
//! per session. Other versions are refused with [`SnapshotError::UnsupportedVersion`].
//!
//! A checkpoint is any concatenation of sections: `snapshot_shard` for each shard (taken one
//! at a time, in steps of `SNAPSHOT_SESSIONS_PER_LOCK` sessions, a section each, each step
//! under its own shard lock only, so writers of other shards never wait and a writer of the
//! shard waits one step at most) and `snapshot_gateways`. Such a checkpoint is fuzzy: shards
//! and steps are captured at different moments.
//! Recovery restores it and then replays the change log from a point at or before the moment
//! the first section was taken; [`crate::Change`] replay rules make that converge.
//!
//! Restore reads one section at a time (its `body_len` lets a reader take it whole and hand it
//! to another thread) and routes sessions by uid, so the shard count may differ from the one
//! that wrote the snapshot. Sessions keep their persisted last heartbeat: those already expired
//! are removed by the next tick. Pair check across the disk boundary: every name is validated
//! against the registry's limits, every index against its table, every time against overflow,
//! and a body must be consumed exactly.

use std::io::{self, Read, Write};
use std::sync::Arc;

use thiserror::Error;

use crate::codec::{DecodeError, Reader, put_short_str, put_u32, put_u64, put_varint};
use crate::gateways::{GatewayId, Gateways};
use crate::slab::NIL;
use crate::{DEVICE_BYTES_MAX, GatewayLease, META_BYTES_MAX, PresenceError, ShardScope};

const MAGIC: &[u8; 4] = b"IMPS";
/// Version byte of snapshot sections.
pub const SNAPSHOT_FORMAT_VERSION: u8 = 2;
const KIND_SHARD: u8 = 1;
const KIND_GATEWAYS: u8 = 2;
const HEADER_BYTES: usize = 14;
/// The fewest bytes one encoded session takes (six one-byte varints).
const SESSION_BYTES_MIN: usize = 7;

/// Why a snapshot could not be written or restored.
#[derive(Debug, Error)]
pub enum SnapshotError {
    /// Reading or writing failed.
    #[error("snapshot I/O: {0}")]
    Io(#[from] io::Error),
    /// A record inside a section is invalid.
    #[error("snapshot record: {0}")]
    Decode(#[from] DecodeError),
    /// A section does not start with the magic bytes.
    #[error("snapshot section has bad magic")]
    BadMagic,
    /// A section has a version this build does not read (an older or foreign format).
    #[error(
        "snapshot section version {0} is not supported (this build reads version \
         {SNAPSHOT_FORMAT_VERSION})"
    )]
    UnsupportedVersion(u8),
    /// A section has an unknown kind.
    #[error("snapshot section kind {0} is unknown")]
    UnknownSection(u8),
    /// The stream ended inside a section.
    #[error("snapshot truncated")]
    Truncated,
    /// A session refers past the end of one of its section's tables.
    #[error("snapshot session refers to {table} {index}, but the section has {len}")]
    BadReference {
        /// `profile` or `gateway`.
        table: &'static str,
        /// The index given.
        index: u64,
        /// Entries in the table.
        len: usize,
    },
    /// A time field does not fit its range.
    #[error("snapshot session has an out-of-range {field}")]
    TimeOutOfRange {
        /// The field.
        field: &'static str,
    },
    /// A session's uid is not in the scope of the shard section holding it.
    #[error("snapshot session uid {uid} is outside its section's shard {index}/{count}")]
    OutOfScope {
        /// The uid.
        uid: u64,
        /// The section's shard index.
        index: u32,
        /// The section's shard count.
        count: u32,
    },
    /// Applying a restored record failed.
    #[error("snapshot apply: {0}")]
    Apply(#[from] PresenceError),
}

/// What a restore loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RestoreStats {
    /// Shard sections read.
    pub shard_sections: usize,
    /// Sessions applied.
    pub sessions: usize,
    /// Gateway leases applied.
    pub gateway_leases: usize,
}

impl RestoreStats {
    pub(crate) fn add(&mut self, other: RestoreStats) {
        self.shard_sections += other.shard_sections;
        self.sessions += other.sessions;
        self.gateway_leases += other.gateway_leases;
    }
}

/// One session as a snapshot stores it: names are indices into its section's tables.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RestoredSession<'a> {
    pub uid: u64,
    pub conn: u64,
    pub last_heartbeat_ms: u64,
    pub login_s: u32,
    /// Index into the section's profiles.
    pub profile: u32,
    /// Index into the section's gateways.
    pub gateway: u32,
    pub meta: Option<&'a [u8]>,
}

/// The name tables of a shard section, with gateway names already interned.
#[derive(Debug)]
pub(crate) struct SectionTables {
    /// (device, ttl_ms) pairs.
    pub profiles: Vec<(Arc<str>, u32)>,
    /// Registry gateway ids of the section's gateway names.
    pub gateway_ids: Vec<GatewayId>,
}

/// The shard-local profile ids of a section's profiles, resolved on first use.
pub(crate) struct ProfileCache {
    pub ids: Vec<u32>,
}

impl ProfileCache {
    pub(crate) fn new(tables: &SectionTables) -> Self {
        Self {
            ids: vec![NIL; tables.profiles.len()],
        }
    }
}

/// Writes a shard section: tables first, then one [`Self::session`] call per session.
pub(crate) struct ShardSectionWriter<'a> {
    out: &'a mut Vec<u8>,
    start: usize,
    base_ms: u64,
    sessions_left: usize,
}

impl<'a> ShardSectionWriter<'a> {
    /// Starts a section of `sessions` sessions whose names are in `profiles` and `gateways`.
    pub(crate) fn new(
        out: &'a mut Vec<u8>,
        scope: ShardScope,
        base_ms: u64,
        profiles: &[(Arc<str>, u32)],
        gateways: &[Arc<str>],
        sessions: usize,
    ) -> Self {
        let start = header(out, KIND_SHARD);
        put_u32(out, scope.index);
        put_u32(out, scope.count);
        put_u64(out, base_ms);
        put_u32(out, profiles.len() as u32);
        for (device, ttl_ms) in profiles {
            put_short_str(out, device);
            put_u32(out, *ttl_ms);
        }
        put_u32(out, gateways.len() as u32);
        for gateway in gateways {
            put_short_str(out, gateway);
        }
        put_u64(out, sessions as u64);
        Self {
            out,
            start,
            base_ms,
            sessions_left: sessions,
        }
    }

    /// Appends one session; `profile` and `gateway` index the tables given to [`Self::new`].
    pub(crate) fn session(&mut self, session: &RestoredSession<'_>) {
        debug_assert!(self.sessions_left > 0, "more sessions than announced");
        self.sessions_left = self.sessions_left.saturating_sub(1);
        let out = &mut *self.out;
        put_varint(out, session.uid);
        put_varint(out, session.conn);
        let heartbeat = session.last_heartbeat_ms as i64 - self.base_ms as i64;
        put_varint(out, zigzag(heartbeat));
        let login_back = (session.last_heartbeat_ms / 1000) as i64 - i64::from(session.login_s);
        put_varint(out, zigzag(login_back));
        put_varint(out, u64::from(session.profile));
        put_varint(out, u64::from(session.gateway));
        match session.meta {
            None => put_varint(out, 0),
            Some(meta) => {
                put_varint(out, meta.len() as u64 + 1);
                out.extend_from_slice(meta);
            }
        }
    }

    /// Writes the body length into the header.
    pub(crate) fn finish(self) {
        debug_assert_eq!(self.sessions_left, 0, "fewer sessions than announced");
        finish_body(self.out, self.start);
    }
}

fn zigzag(value: i64) -> u64 {
    ((value << 1) ^ (value >> 63)) as u64
}

fn unzigzag(value: u64) -> i64 {
    ((value >> 1) as i64) ^ -((value & 1) as i64)
}

/// Writes a section header with a placeholder body length; returns where the header starts.
fn header(out: &mut Vec<u8>, kind: u8) -> usize {
    let start = out.len();
    out.extend_from_slice(MAGIC);
    out.push(SNAPSHOT_FORMAT_VERSION);
    out.push(kind);
    put_u64(out, 0);
    start
}

fn finish_body(out: &mut [u8], start: usize) {
    let body_len = (out.len() - start - HEADER_BYTES) as u64;
    out[start + 6..start + HEADER_BYTES].copy_from_slice(&body_len.to_le_bytes());
}

/// Appends a gateway lease section to `out`.
pub(crate) fn encode_gateway_section(leases: &[GatewayLease], out: &mut Vec<u8>) {
    let start = header(out, KIND_GATEWAYS);
    put_u32(out, leases.len() as u32);
    for lease in leases {
        put_short_str(out, &lease.gateway);
        put_u32(out, lease.ttl_ms);
        put_u64(out, lease.last_heartbeat_ms);
    }
    finish_body(out, start);
}

/// Writes `bytes` to `writer`.
pub(crate) fn write_all(writer: &mut impl Write, bytes: &[u8]) -> Result<(), SnapshotError> {
    writer.write_all(bytes)?;
    Ok(())
}

/// One section read whole from a snapshot stream.
pub(crate) struct RawSection {
    kind: u8,
    body: Vec<u8>,
}

/// Reads the next section of `reader`, or `None` at a clean end of stream. Memory is bounded
/// by the section's actual size (a damaged length cannot make it allocate more).
pub(crate) fn read_section(reader: &mut impl Read) -> Result<Option<RawSection>, SnapshotError> {
    let mut header = [0u8; HEADER_BYTES];
    if !read_or_eof(reader, &mut header)? {
        return Ok(None);
    }
    if &header[..4] != MAGIC {
        return Err(SnapshotError::BadMagic);
    }
    let (version, kind) = (header[4], header[5]);
    if version != SNAPSHOT_FORMAT_VERSION {
        return Err(SnapshotError::UnsupportedVersion(version));
    }
    if kind != KIND_SHARD && kind != KIND_GATEWAYS {
        return Err(SnapshotError::UnknownSection(kind));
    }
    let mut body_len = [0u8; 8];
    body_len.copy_from_slice(&header[6..]);
    let body_len = u64::from_le_bytes(body_len);
    let mut body = Vec::with_capacity(body_len.min(1 << 20) as usize);
    reader.take(body_len).read_to_end(&mut body)?;
    if body.len() as u64 != body_len {
        return Err(SnapshotError::Truncated);
    }
    Ok(Some(RawSection { kind, body }))
}

impl RawSection {
    /// Opens a shard section, interning its gateway names into `gateways`; `None` for a
    /// gateway lease section.
    pub(crate) fn shard(
        &self,
        gateways: &Gateways,
    ) -> Result<Option<ShardSection<'_>>, SnapshotError> {
        if self.kind != KIND_SHARD {
            return Ok(None);
        }
        let mut reader = Reader::new(&self.body);
        let index = reader.u32()?;
        let count = reader.u32()?;
        if count == 0 || index >= count {
            return Err(DecodeError::InvalidScope { index, count }.into());
        }
        let base_ms = reader.u64()?;
        let profile_count = reader.u32()? as usize;
        let mut profiles = Vec::with_capacity(profile_count.min(reader.remaining() / 6));
        for _ in 0..profile_count {
            let device = reader.name("device", 1, DEVICE_BYTES_MAX)?;
            profiles.push((device, reader.u32()?));
        }
        let gateway_count = reader.u32()? as usize;
        let mut gateway_ids = Vec::with_capacity(gateway_count.min(reader.remaining() / 2));
        for _ in 0..gateway_count {
            gateway_ids.push(gateways.intern_unbounded(&reader.gateway()?)?);
        }
        let sessions = reader.u64()?;
        Ok(Some(ShardSection {
            scope: ShardScope { index, count },
            tables: SectionTables {
                profiles,
                gateway_ids,
            },
            base_ms,
            sessions_left: sessions,
            reader,
        }))
    }

    /// The leases of a gateway lease section (empty for a shard section).
    pub(crate) fn leases(&self) -> Result<Vec<GatewayLease>, SnapshotError> {
        if self.kind != KIND_GATEWAYS {
            return Ok(Vec::new());
        }
        let mut reader = Reader::new(&self.body);
        let count = reader.u32()? as usize;
        let mut leases = Vec::with_capacity(count.min(reader.remaining() / 14));
        for _ in 0..count {
            leases.push(GatewayLease {
                gateway: reader.gateway()?,
                ttl_ms: reader.u32()?,
                last_heartbeat_ms: reader.u64()?,
            });
        }
        reader.finish()?;
        Ok(leases)
    }
}

/// A shard section being decoded, session by session.
pub(crate) struct ShardSection<'a> {
    /// The shard that wrote it.
    pub scope: ShardScope,
    /// Its name tables.
    pub tables: SectionTables,
    base_ms: u64,
    sessions_left: u64,
    reader: Reader<'a>,
}

impl<'a> ShardSection<'a> {
    /// Sessions still to read (bounded by what the remaining bytes can hold).
    pub(crate) fn remaining(&self) -> usize {
        (self.sessions_left as usize).min(self.reader.remaining() / SESSION_BYTES_MIN)
    }

    /// The next session, validated; `None` after the last one (the body must end there).
    pub(crate) fn next_session(&mut self) -> Result<Option<RestoredSession<'a>>, SnapshotError> {
        if self.sessions_left == 0 {
            self.reader.finish()?;
            return Ok(None);
        }
        self.sessions_left -= 1;
        let reader = &mut self.reader;
        let uid = reader.varint()?;
        let conn = reader.varint()?;
        let last_heartbeat_ms = self
            .base_ms
            .checked_add_signed(unzigzag(reader.varint()?))
            .ok_or(SnapshotError::TimeOutOfRange {
                field: "last_heartbeat_ms",
            })?;
        let login_s = ((last_heartbeat_ms / 1000) as i64)
            .checked_sub(unzigzag(reader.varint()?))
            .and_then(|login_s| u32::try_from(login_s).ok())
            .ok_or(SnapshotError::TimeOutOfRange { field: "login_ms" })?;
        let profile = Self::reference(reader.varint()?, "profile", self.tables.profiles.len())?;
        let gateway = Self::reference(reader.varint()?, "gateway", self.tables.gateway_ids.len())?;
        let meta = match reader.varint()? {
            0 => None,
            len_plus_one => {
                let len = len_plus_one - 1;
                if len > META_BYTES_MAX as u64 {
                    return Err(DecodeError::FieldLength {
                        field: "meta",
                        len: len as usize,
                        min: 0,
                        max: META_BYTES_MAX,
                    }
                    .into());
                }
                Some(reader.take(len as usize)?)
            }
        };
        Ok(Some(RestoredSession {
            uid,
            conn,
            last_heartbeat_ms,
            login_s,
            profile,
            gateway,
            meta,
        }))
    }

    fn reference(index: u64, table: &'static str, len: usize) -> Result<u32, SnapshotError> {
        if index < len as u64 {
            Ok(index as u32)
        } else {
            Err(SnapshotError::BadReference { table, index, len })
        }
    }
}

/// Fills `buffer`, or returns false if the stream ends before its first byte.
fn read_or_eof(reader: &mut impl Read, buffer: &mut [u8]) -> Result<bool, SnapshotError> {
    let mut filled = 0;
    while filled < buffer.len() {
        match reader.read(&mut buffer[filled..]) {
            Ok(0) if filled == 0 => return Ok(false),
            Ok(0) => return Err(SnapshotError::Truncated),
            Ok(read) => filled += read,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(SnapshotError::Io(error)),
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zigzag_round_trips() {
        for value in [0i64, 1, -1, 63, -64, i64::MAX, i64::MIN, 1 << 40] {
            assert_eq!(unzigzag(zigzag(value)), value);
        }
        assert_eq!(zigzag(-1), 1);
        assert_eq!(zigzag(1), 2);
    }

    #[test]
    fn varints_round_trip_and_refuse_overflow() {
        for value in [0u64, 1, 127, 128, 300, u64::from(u32::MAX), u64::MAX] {
            let mut out = Vec::new();
            put_varint(&mut out, value);
            let mut reader = Reader::new(&out);
            assert_eq!(reader.varint(), Ok(value));
            assert_eq!(reader.remaining(), 0);
        }
        let too_long = [0xFFu8; 10];
        assert_eq!(
            Reader::new(&too_long).varint(),
            Err(DecodeError::VarintOverflow)
        );
        assert_eq!(Reader::new(&[0x80]).varint(), Err(DecodeError::Truncated));
    }

    #[test]
    fn a_section_of_another_version_is_refused_naming_it() {
        let mut section = Vec::new();
        encode_gateway_section(&[], &mut section);
        section[4] = 1;
        let error = match read_section(&mut section.as_slice()) {
            Err(error) => error,
            Ok(_) => panic!("version 1 accepted"),
        };
        assert!(matches!(error, SnapshotError::UnsupportedVersion(1)));
        let message = error.to_string();
        assert!(message.contains("version 1") && message.contains("reads version 2"));
    }
}
