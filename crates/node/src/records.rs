//! Byte format of the sequence service's log records and checkpoints.
//!
//! Records are redo records whose replay is idempotent (a raise takes the max; a namespace that
//! already exists with the same definition is skipped), so a checkpoint may contain effects of
//! records after its covered LSN. The log engine frames and checksums each payload; this module
//! only encodes the payload, and decoding never panics on bad bytes.
//!
//! ```text
//! record    = tag:u8 body
//!   tag 1   NamespaceCreated: name_len:u8 name lo:u64 hi:u64 section_size:u64 step:u64
//!   tag 2   Raise:            ns:u32 section:u64 max_seq:u64
//!   tag 3   MinSeqs:          ns:u32 count:u32 (id min_seq:u64)*
//!             id = 0:u8 id:u64 | 1:u8 key_len:u8 key
//! checkpoint = "SEQ1" ns_count:u32 namespace* ceiling_count:u64 (ns:u32 section:u64 max:u64)*
//!              [min_count:u64 (ns:u32 id min_seq:u64)*]
//! ```
//!
//! A namespace's name-length byte has bit 7 set when the namespace is keyed. The `min_seq`
//! part of a checkpoint is left out by nodes older than it (and when empty): it reads as none.
//! A MinSeqs record is a set (last one wins), replayed in log order.
//! Integers are little-endian.

use imstate_seq::{MinSeqEntries, NamespaceDef, NsId, OwnedId, Raise};

const TAG_NAMESPACE: u8 = 1;
const TAG_RAISE: u8 = 2;
const TAG_MIN_SEQS: u8 = 3;
const ID_NUMERIC: u8 = 0;
const ID_KEY: u8 = 1;
const CHECKPOINT_MAGIC: &[u8; 4] = b"SEQ1";

/// A change of the sequence service's durable state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SeqRecord {
    /// A namespace was created; namespaces get dense ids in creation order.
    NamespaceCreated(NamespaceDef),
    /// A section's max_seq was raised.
    Raise(Raise),
    /// `min_seq` was set for ids of a namespace (0 clears it).
    MinSeqs {
        /// The namespace.
        ns: NsId,
        /// `(id, min_seq)` in request order.
        entries: MinSeqEntries,
    },
}

/// The durable state of the sequence service, as written in a checkpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SeqSnapshot {
    /// Namespace definitions in id order.
    pub namespaces: Vec<NamespaceDef>,
    /// Every known section ceiling: (namespace id, section, max_seq).
    pub ceilings: Vec<(NsId, u64, u64)>,
    /// Every `min_seq`: (namespace id, id, min_seq).
    pub min_seqs: Vec<(NsId, OwnedId, u64)>,
}

/// A payload that is not a valid record or checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid sequence record: {0}")]
pub struct DecodeError(pub String);

impl SeqRecord {
    /// Encodes the record as a log payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(24);
        match self {
            SeqRecord::NamespaceCreated(def) => {
                out.push(TAG_NAMESPACE);
                encode_namespace(def, &mut out);
            }
            SeqRecord::Raise(raise) => {
                out.push(TAG_RAISE);
                out.extend_from_slice(&raise.ns.to_le_bytes());
                out.extend_from_slice(&raise.section.to_le_bytes());
                out.extend_from_slice(&raise.max_seq.to_le_bytes());
            }
            SeqRecord::MinSeqs { ns, entries } => {
                out.push(TAG_MIN_SEQS);
                out.extend_from_slice(&ns.to_le_bytes());
                // Entries are bounded by the batch limit, far below u32::MAX.
                out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
                for (id, value) in entries {
                    encode_id(id, &mut out);
                    out.extend_from_slice(&value.to_le_bytes());
                }
            }
        }
        out
    }

    /// Decodes a log payload.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut reader = Reader(bytes);
        let record = match reader.u8()? {
            TAG_NAMESPACE => SeqRecord::NamespaceCreated(decode_namespace(&mut reader)?),
            TAG_RAISE => SeqRecord::Raise(Raise {
                ns: reader.u32()?,
                section: reader.u64()?,
                max_seq: reader.u64()?,
            }),
            TAG_MIN_SEQS => {
                let ns = reader.u32()?;
                let count = reader.u32()? as usize;
                // Each entry is at least 10 bytes: bound the allocation by what is there.
                let mut entries = Vec::with_capacity(count.min(reader.0.len() / 10));
                for _ in 0..count {
                    entries.push((decode_id(&mut reader)?, reader.u64()?));
                }
                SeqRecord::MinSeqs { ns, entries }
            }
            tag => return Err(DecodeError(format!("unknown tag {tag}"))),
        };
        reader.finish()?;
        Ok(record)
    }
}

impl SeqSnapshot {
    /// Encodes the snapshot as checkpoint data.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + self.ceilings.len() * 20);
        out.extend_from_slice(CHECKPOINT_MAGIC);
        out.extend_from_slice(&(self.namespaces.len() as u32).to_le_bytes());
        for def in &self.namespaces {
            encode_namespace(def, &mut out);
        }
        out.extend_from_slice(&(self.ceilings.len() as u64).to_le_bytes());
        for (ns, section, max_seq) in &self.ceilings {
            out.extend_from_slice(&ns.to_le_bytes());
            out.extend_from_slice(&section.to_le_bytes());
            out.extend_from_slice(&max_seq.to_le_bytes());
        }
        if !self.min_seqs.is_empty() {
            out.extend_from_slice(&(self.min_seqs.len() as u64).to_le_bytes());
            for (ns, id, value) in &self.min_seqs {
                out.extend_from_slice(&ns.to_le_bytes());
                encode_id(id, &mut out);
                out.extend_from_slice(&value.to_le_bytes());
            }
        }
        out
    }

    /// Decodes checkpoint data.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut reader = Reader(bytes);
        if reader.take(4)? != CHECKPOINT_MAGIC {
            return Err(DecodeError("bad checkpoint magic".into()));
        }
        let namespace_count = reader.u32()?;
        let mut namespaces = Vec::new();
        for _ in 0..namespace_count {
            namespaces.push(decode_namespace(&mut reader)?);
        }
        let ceiling_count = reader.u64()?;
        // Bound the allocation by what the bytes can hold, so a bad count cannot exhaust memory.
        let mut ceilings = Vec::with_capacity((ceiling_count as usize).min(reader.0.len() / 20));
        for _ in 0..ceiling_count {
            ceilings.push((reader.u32()?, reader.u64()?, reader.u64()?));
        }
        let mut min_seqs = Vec::new();
        if !reader.0.is_empty() {
            let count = reader.u64()?;
            min_seqs.reserve((count as usize).min(reader.0.len() / 14));
            for _ in 0..count {
                min_seqs.push((reader.u32()?, decode_id(&mut reader)?, reader.u64()?));
            }
        }
        reader.finish()?;
        Ok(Self {
            namespaces,
            ceilings,
            min_seqs,
        })
    }
}

/// Bit 7 of a namespace record's name-length byte: the namespace is keyed. Names are at most 64
/// bytes, so logs and checkpoints written before keyed namespaces existed never set it.
const KEYED_FLAG: u8 = 0x80;

fn encode_namespace(def: &NamespaceDef, out: &mut Vec<u8>) {
    // Names are validated to at most 64 bytes before they reach the log.
    let name = def.name.as_bytes();
    let len = name.len().min(usize::from(!KEYED_FLAG));
    let flag = if def.is_keyed() { KEYED_FLAG } else { 0 };
    out.push(len as u8 | flag);
    out.extend_from_slice(&name[..len]);
    for value in [def.id_lo, def.id_hi, def.section_size, def.step] {
        out.extend_from_slice(&value.to_le_bytes());
    }
}

fn decode_namespace(reader: &mut Reader<'_>) -> Result<NamespaceDef, DecodeError> {
    let head = reader.u8()?;
    let len = usize::from(head & !KEYED_FLAG);
    let keys = if head & KEYED_FLAG != 0 {
        imstate_seq::KeyKind::String
    } else {
        imstate_seq::KeyKind::Numeric
    };
    let name = std::str::from_utf8(reader.take(len)?)
        .map_err(|_| DecodeError("namespace name is not UTF-8".into()))?
        .to_string();
    Ok(NamespaceDef {
        name,
        id_lo: reader.u64()?,
        id_hi: reader.u64()?,
        section_size: reader.u64()?,
        step: reader.u64()?,
        keys,
    })
}

fn encode_id(id: &OwnedId, out: &mut Vec<u8>) {
    match id {
        OwnedId::Id(id) => {
            out.push(ID_NUMERIC);
            out.extend_from_slice(&id.to_le_bytes());
        }
        OwnedId::Key(key) => {
            // Keys are validated to at most 128 bytes before they reach the log.
            let len = key.len().min(usize::from(u8::MAX));
            out.push(ID_KEY);
            out.push(len as u8);
            out.extend_from_slice(&key[..len]);
        }
    }
}

fn decode_id(reader: &mut Reader<'_>) -> Result<OwnedId, DecodeError> {
    match reader.u8()? {
        ID_NUMERIC => Ok(OwnedId::Id(reader.u64()?)),
        ID_KEY => {
            let len = reader.u8()? as usize;
            Ok(OwnedId::Key(reader.take(len)?.to_vec().into_boxed_slice()))
        }
        kind => Err(DecodeError(format!("unknown id kind {kind}"))),
    }
}

/// A cursor over a byte slice that fails instead of panicking when bytes run out.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, len: usize) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < len {
            return Err(DecodeError(format!("truncated: needs {len} more bytes")));
        }
        let (head, tail) = self.0.split_at(len);
        self.0 = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        let bytes = self.take(4)?;
        Ok(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        let mut array = [0u8; 8];
        array.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(array))
    }

    fn finish(&self) -> Result<(), DecodeError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(DecodeError(format!("{} trailing bytes", self.0.len())))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn records_round_trip() {
        let records = [
            SeqRecord::NamespaceCreated(NamespaceDef::default_namespace()),
            SeqRecord::NamespaceCreated(NamespaceDef {
                name: "c".repeat(64),
                keys: imstate_seq::KeyKind::String,
                ..NamespaceDef::default_namespace()
            }),
            SeqRecord::Raise(Raise {
                ns: 3,
                section: 42,
                max_seq: 70_000,
            }),
            SeqRecord::MinSeqs {
                ns: 2,
                entries: vec![
                    (OwnedId::Id(9), 5),
                    (OwnedId::Key(vec![b'k'; 128].into_boxed_slice()), 0),
                ],
            },
        ];
        for record in records {
            assert_eq!(SeqRecord::decode(&record.encode()).unwrap(), record);
        }
    }

    #[test]
    fn a_numeric_namespace_encodes_as_before_keyed_namespaces_existed() {
        // Name-length byte 7 ("default"), no flag: logs written by older nodes read the same.
        let bytes = SeqRecord::NamespaceCreated(NamespaceDef::default_namespace()).encode();
        assert!(bytes.windows(8).any(|window| window == b"\x07default"));
    }

    #[test]
    fn snapshot_round_trips() {
        let snapshot = SeqSnapshot {
            namespaces: vec![NamespaceDef::default_namespace()],
            ceilings: vec![(0, 1, 10_000), (0, 7, 20_000)],
            min_seqs: Vec::new(),
        };
        assert_eq!(SeqSnapshot::decode(&snapshot.encode()).unwrap(), snapshot);
        let with_min_seqs = SeqSnapshot {
            min_seqs: vec![
                (0, OwnedId::Id(3), 7),
                (1, OwnedId::Key(b"sg_1".to_vec().into()), 2),
            ],
            ..snapshot.clone()
        };
        let bytes = with_min_seqs.encode();
        assert_eq!(SeqSnapshot::decode(&bytes).unwrap(), with_min_seqs);
        // A checkpoint without min_seqs is the format older nodes wrote, byte for byte.
        assert!(bytes.starts_with(&snapshot.encode()));
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = SeqRecord::decode(&bytes);
            let _ = SeqSnapshot::decode(&bytes);
        }
    }
}
