//! Snapshots: the sessions of one shard, or the gateway leases, as a self-describing section.
//!
//! ```text
//!  section  = magic "IMPS", version u8, kind u8, body
//!  kind 1   = scope index u32, scope count u32, n u64, n x (len u16, session bytes)
//!  kind 2   = n u64, n x (len u16, gateway (u8 len, bytes), ttl_ms u32, last_heartbeat_ms u64)
//! ```
//!
//! A checkpoint is any concatenation of sections: `snapshot_shard` for each shard (taken one
//! at a time, each under its own shard lock only, so writers of other shards never wait) and
//! `snapshot_gateways`. Such a checkpoint is fuzzy: shards are captured at different moments.
//! Recovery restores it and then replays the change log from a point at or before the moment
//! the first section was taken; [`crate::Change`] replay rules make that converge.
//!
//! Restore routes sessions by uid, so the shard count may differ from the one that wrote the
//! snapshot. Sessions keep their persisted last heartbeat: those already expired are removed
//! by the next tick (the wheel puts overdue records in the cursor's slot). The encoding of a
//! session is the one of [`crate::Change::Login`], validated the same way on the way back.

use std::io::{self, Read, Write};

use thiserror::Error;

use crate::codec::{
    DecodeError, Reader, encode_session, put_short_str, put_u16, put_u32, put_u64,
};
use crate::{GatewayLease, PresenceError, Session, ShardScope};

const MAGIC: &[u8; 4] = b"IMPS";
/// Version byte of snapshot sections.
pub const SNAPSHOT_FORMAT_VERSION: u8 = 1;
const KIND_SHARD: u8 = 1;
const KIND_GATEWAYS: u8 = 2;

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
    /// A section has an unknown version.
    #[error("snapshot section version {0} is not supported")]
    UnsupportedVersion(u8),
    /// A section has an unknown kind.
    #[error("snapshot section kind {0} is unknown")]
    UnknownSection(u8),
    /// The stream ended inside a section.
    #[error("snapshot truncated")]
    Truncated,
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

fn header(out: &mut Vec<u8>, kind: u8) {
    out.extend_from_slice(MAGIC);
    out.push(SNAPSHOT_FORMAT_VERSION);
    out.push(kind);
}

/// Appends a shard section holding `sessions` to `out`.
pub(crate) fn encode_shard_section(
    scope: ShardScope,
    sessions: usize,
    each: impl FnOnce(&mut dyn FnMut(&Session)),
    out: &mut Vec<u8>,
) {
    header(out, KIND_SHARD);
    put_u32(out, scope.index);
    put_u32(out, scope.count);
    put_u64(out, sessions as u64);
    let mut record = Vec::with_capacity(128);
    each(&mut |session: &Session| {
        record.clear();
        encode_session(session, &mut record);
        put_u16(out, record.len() as u16);
        out.extend_from_slice(&record);
    });
}

/// Appends a gateway lease section to `out`.
pub(crate) fn encode_gateway_section(leases: &[GatewayLease], out: &mut Vec<u8>) {
    header(out, KIND_GATEWAYS);
    put_u64(out, leases.len() as u64);
    let mut record = Vec::with_capacity(160);
    for lease in leases {
        record.clear();
        put_short_str(&mut record, &lease.gateway);
        put_u32(&mut record, lease.ttl_ms);
        put_u64(&mut record, lease.last_heartbeat_ms);
        put_u16(out, record.len() as u16);
        out.extend_from_slice(&record);
    }
}

/// Writes `bytes` to `writer`.
pub(crate) fn write_all(writer: &mut impl Write, bytes: &[u8]) -> Result<(), SnapshotError> {
    writer.write_all(bytes)?;
    Ok(())
}

/// One item read back from a snapshot stream.
pub(crate) enum Item {
    /// A shard section starts.
    Shard,
    /// A session.
    Session(Session),
    /// A gateway lease.
    Lease(GatewayLease),
}

/// Reads every section of `reader` until a clean end of stream, calling `apply` per item.
pub(crate) fn read_sections(
    reader: &mut impl Read,
    mut apply: impl FnMut(Item) -> Result<(), PresenceError>,
) -> Result<RestoreStats, SnapshotError> {
    let mut stats = RestoreStats::default();
    let mut magic = [0u8; 4];
    while read_or_eof(reader, &mut magic)? {
        if &magic != MAGIC {
            return Err(SnapshotError::BadMagic);
        }
        let [version, kind] = read_array::<2>(reader)?;
        if version != SNAPSHOT_FORMAT_VERSION {
            return Err(SnapshotError::UnsupportedVersion(version));
        }
        match kind {
            KIND_SHARD => {
                let _scope = read_array::<8>(reader)?;
                let count = u64::from_le_bytes(read_array::<8>(reader)?);
                apply(Item::Shard)?;
                stats.shard_sections += 1;
                for _ in 0..count {
                    let record = read_record(reader)?;
                    let mut record_reader = Reader::new(&record);
                    let session = record_reader.session()?;
                    record_reader.finish()?;
                    apply(Item::Session(session))?;
                    stats.sessions += 1;
                }
            }
            KIND_GATEWAYS => {
                let count = u64::from_le_bytes(read_array::<8>(reader)?);
                for _ in 0..count {
                    let record = read_record(reader)?;
                    let mut record_reader = Reader::new(&record);
                    let gateway = record_reader.gateway()?;
                    let ttl_ms = record_reader.u32()?;
                    let last_heartbeat_ms = record_reader.u64()?;
                    record_reader.finish()?;
                    apply(Item::Lease(GatewayLease {
                        gateway,
                        ttl_ms,
                        last_heartbeat_ms,
                    }))?;
                    stats.gateway_leases += 1;
                }
            }
            other => return Err(SnapshotError::UnknownSection(other)),
        }
    }
    Ok(stats)
}

fn read_record(reader: &mut impl Read) -> Result<Vec<u8>, SnapshotError> {
    let len = u16::from_le_bytes(read_array::<2>(reader)?);
    let mut record = vec![0u8; usize::from(len)];
    read_exact(reader, &mut record)?;
    Ok(record)
}

fn read_array<const N: usize>(reader: &mut impl Read) -> Result<[u8; N], SnapshotError> {
    let mut array = [0u8; N];
    read_exact(reader, &mut array)?;
    Ok(array)
}

fn read_exact(reader: &mut impl Read, buffer: &mut [u8]) -> Result<(), SnapshotError> {
    reader
        .read_exact(buffer)
        .map_err(|error| match error.kind() {
            io::ErrorKind::UnexpectedEof => SnapshotError::Truncated,
            _ => SnapshotError::Io(error),
        })
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
