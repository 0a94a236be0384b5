//! Checkpoint parts (seed 004's checkpoint node): snapshots of this node's primary slots that
//! their replica built from its own copy and sent here, so that this node's checkpoints need
//! not copy those slots' sessions.
//!
//! ```text
//!  replica: position X (every record of slots S through X applied) ──► snapshot of S
//!     ──► Replication/PutCheckpointPart ──► CheckpointParts::receive (memory; crc checked)
//!  this node's checkpoint (PresenceStore::checkpoint):
//!     covered = min(last LSN, every part's X)
//!     sections = own copy of the slots no part covers + each part's bytes + gateway leases
//!     ──► Log::checkpoint(covered) ──► segments through `covered` dropped, parts dropped
//! ```
//!
//! Why that checkpoint is right: a part of slots S at LSN X holds this node's state of S at X
//! (the replica applied exactly this node's records of S through X over a snapshot of it,
//! and maybe some later ones). Recovery restores the sections and replays the log from
//! `covered`, at or before every part's X and before the own copy was taken: the same
//! overlap a fuzzy checkpoint already has, which replay converges over.
//!
//! Contract of a part, checked by the receiving service before [`CheckpointParts::receive`]:
//! it names this node's log, an LSN this log issued and that no checkpoint has passed, and
//! slots this node is primary of, sent by their replica. Nothing else trusts it: its bytes
//! are crc-checked end to end, and restore validates every section like any checkpoint's.
//!
//! Parts are kept in memory, not on disk: one lost in a crash only means the next checkpoint
//! copies those slots itself, and a file would write every part's bytes twice (once as the
//! part, once inside the checkpoint): measured on one machine, the extra writeback stalled the
//! log's writes. They are kept until a checkpoint uses them, a newer part of some of the same
//! slots replaces them, or they fall behind a checkpoint. At most one part per slot exists,
//! so their bytes are bounded by the sessions of this node's primary slots (about 14 bytes
//! each), and each part by [`PART_BYTES_MAX`].

use std::sync::Arc;

use imstate_presence::SlotSet;
use parking_lot::Mutex;

/// Longest part accepted, in bytes (about 70 M sessions at 14 bytes each), held in memory
/// until a checkpoint uses it.
pub const PART_BYTES_MAX: u64 = 1 << 30;

/// Metric: checkpoint parts received from replicas, by `outcome` (`stored`, `refused`).
pub const CHECKPOINT_PARTS: &str = "imstate_presence_checkpoint_parts_total";
/// Metric: slots whose sessions a checkpoint took from a replica's part, not its own copy.
pub const CHECKPOINT_PART_SLOTS: &str = "imstate_presence_checkpoint_part_slots_total";

/// Why a part was not stored.
#[derive(Debug, thiserror::Error)]
pub enum PartError {
    /// Longer than [`PART_BYTES_MAX`].
    #[error("a checkpoint part is longer than PART_BYTES_MAX ({PART_BYTES_MAX} bytes)")]
    TooLong,
    /// Its bytes do not match the crc32c sent with them.
    #[error(
        "a checkpoint part of {bytes} bytes fails its crc32c ({computed:#010x}, sent \
         {sent:#010x}); refused"
    )]
    BadCrc {
        /// Bytes received.
        bytes: u64,
        /// The crc of what was received.
        computed: u32,
        /// The crc the sender gave.
        sent: u32,
    },
}

/// What a part holds: `slots`' sessions as this node's log had them at `lsn`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartMeta {
    /// The replica that built it.
    pub replica: String,
    /// The LSN of this node's presence log the part reflects (at least).
    pub lsn: u64,
    /// The slots it holds.
    pub slots: SlotSet,
}

/// A stored part.
#[derive(Clone, Debug)]
pub struct Part {
    /// What it holds.
    pub meta: PartMeta,
    /// Its bytes, in the chunks they came in: snapshot sections, as a checkpoint holds them
    /// (kept as received, never copied into one buffer: a part of 5M sessions is 75 MB).
    pub data: Arc<Vec<Vec<u8>>>,
    id: u64,
}

impl Part {
    /// Its length in bytes.
    pub fn len(&self) -> u64 {
        self.data.iter().map(|chunk| chunk.len() as u64).sum()
    }

    /// Whether it holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The parts this node holds.
#[derive(Default)]
pub struct CheckpointParts {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    next_id: u64,
    parts: Vec<Part>,
}

impl CheckpointParts {
    /// No parts yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts receiving a part; its bytes are kept aside until [`PartUpload::finish`].
    pub fn receive(self: &Arc<Self>, meta: PartMeta) -> PartUpload {
        PartUpload {
            parts: Arc::clone(self),
            meta,
            data: Vec::new(),
            bytes: 0,
            crc: 0,
        }
    }

    /// The parts a checkpoint may use now: every part is at or after `checkpoint_lsn` (the
    /// last checkpoint's) and at or before `last_lsn`; parts are disjoint. Parts older than
    /// `checkpoint_lsn` can never be used again and are dropped.
    pub fn usable(&self, checkpoint_lsn: u64, last_lsn: u64) -> Vec<Part> {
        let mut state = self.state.lock();
        state.parts.retain(|part| part.meta.lsn >= checkpoint_lsn);
        state
            .parts
            .iter()
            .filter(|part| part.meta.lsn <= last_lsn)
            .cloned()
            .collect()
    }

    /// Forgets `used` (a checkpoint holds them now); a part that replaced one of them
    /// meanwhile stays.
    pub fn remove(&self, used: &[Part]) {
        self.state
            .lock()
            .parts
            .retain(|part| !used.iter().any(|used| used.id == part.id));
    }

    /// How many parts are held.
    pub fn len(&self) -> usize {
        self.state.lock().parts.len()
    }

    /// Whether no part is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of the parts held.
    pub fn bytes(&self) -> u64 {
        self.state.lock().parts.iter().map(Part::len).sum()
    }

    fn store(&self, meta: PartMeta, data: Vec<Vec<u8>>) {
        let mut state = self.state.lock();
        state.next_id += 1;
        let part = Part {
            meta,
            data: Arc::new(data),
            id: state.next_id,
        };
        // A newer part of any of the same slots replaces the older one whole.
        state.parts.retain(|old| {
            let mut overlap = old.meta.slots.clone();
            overlap.retain_all(&part.meta.slots);
            overlap.is_empty()
        });
        state.parts.push(part);
    }
}

/// A part being received.
pub struct PartUpload {
    parts: Arc<CheckpointParts>,
    meta: PartMeta,
    data: Vec<Vec<u8>>,
    bytes: u64,
    crc: u32,
}

impl PartUpload {
    /// Appends a chunk of the part (kept as it is, not copied).
    pub fn write(&mut self, data: Vec<u8>) -> Result<(), PartError> {
        if self.bytes + data.len() as u64 > PART_BYTES_MAX {
            return Err(PartError::TooLong);
        }
        self.crc = crc32c::crc32c_append(self.crc, &data);
        self.bytes += data.len() as u64;
        if !data.is_empty() {
            self.data.push(data);
        }
        Ok(())
    }

    /// Ends the part: stored if its bytes match `crc` (the crc32c of all of them), else
    /// refused and dropped. Returns the part's length.
    pub fn finish(self, crc: u32) -> Result<u64, PartError> {
        let bytes = self.bytes;
        if crc != self.crc {
            return Err(PartError::BadCrc {
                bytes,
                computed: self.crc,
                sent: crc,
            });
        }
        self.parts.store(self.meta, self.data);
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(lsn: u64, ranges: &[(u32, u32)]) -> PartMeta {
        PartMeta {
            replica: "n2".into(),
            lsn,
            slots: SlotSet::from_ranges(16, ranges),
        }
    }

    fn upload(
        parts: &Arc<CheckpointParts>,
        meta: PartMeta,
        data: &[u8],
    ) -> Result<u64, PartError> {
        let mut upload = parts.receive(meta);
        upload.write(data.to_vec())?;
        upload.finish(crc32c::crc32c(data))
    }

    #[test]
    fn parts_are_kept_until_used_or_replaced_and_a_bad_crc_keeps_nothing() {
        let parts = Arc::new(CheckpointParts::new());
        assert_eq!(upload(&parts, meta(10, &[(0, 4)]), b"abc").unwrap(), 3);
        upload(&parts, meta(12, &[(4, 8)]), b"defg").unwrap();
        assert_eq!(parts.len(), 2);
        // A newer part of slot 7 replaces the part of 4..8 whole.
        upload(&parts, meta(15, &[(7, 9)]), b"hi").unwrap();
        let usable = parts.usable(0, 100);
        assert_eq!(usable.len(), 2);
        assert_eq!(parts.bytes(), 5);
        assert_eq!(usable[1].data.concat(), b"hi");
        // Only parts between the last checkpoint and the last LSN are usable; older ones go.
        assert_eq!(parts.usable(0, 14).len(), 1);
        assert_eq!(parts.usable(11, 100).len(), 1);
        assert_eq!(parts.len(), 1);
        upload(&parts, meta(10, &[(0, 4)]), b"abc").unwrap();
        let usable = parts.usable(0, 100);

        // A part whose bytes do not match its crc is refused, and nothing of it is kept.
        let mut bad = parts.receive(meta(20, &[(0, 1)]));
        bad.write(b"xyz".to_vec()).unwrap();
        let error = bad.finish(crc32c::crc32c(b"xyy")).unwrap_err().to_string();
        assert!(
            error.contains("crc32c") && error.contains("refused"),
            "{error}"
        );
        // So is an upload given up half way.
        let mut half = parts.receive(meta(20, &[(0, 1)]));
        half.write(b"x".to_vec()).unwrap();
        drop(half);
        assert_eq!(parts.len(), 2);

        parts.remove(&usable[..1]);
        assert_eq!(parts.len(), 1);
        assert_eq!(parts.bytes(), 3);
    }
}
