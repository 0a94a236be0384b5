//! Test harness shared by the integration tests: open a log and collect what it replays.

#![allow(dead_code)]

use imstate_log::{Log, LogError, LogOptions, Lsn, RecoveryStats, Replay, Storage};

/// What a recovery delivered.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Replayed {
    pub checkpoint: Option<(Lsn, Vec<u8>)>,
    pub records: Vec<(Lsn, Vec<u8>)>,
}

impl Replayed {
    pub fn payloads(&self) -> Vec<Vec<u8>> {
        self.records
            .iter()
            .map(|(_, payload)| payload.clone())
            .collect()
    }
}

/// Opens a log, collecting the checkpoint and records it replays, and checks the replay
/// contract (checkpoint first, at most once; records consecutive after it).
pub fn open<S: Storage>(
    storage: S,
    options: LogOptions,
) -> Result<(Log, Replayed, RecoveryStats), LogError> {
    let mut replayed = Replayed::default();
    let (log, stats) = Log::open(storage, options, |item| {
        match item {
            Replay::Checkpoint { covered_lsn, data } => {
                assert!(replayed.checkpoint.is_none(), "two checkpoints delivered");
                assert!(replayed.records.is_empty(), "checkpoint after records");
                replayed.checkpoint = Some((covered_lsn, data.to_vec()));
            }
            Replay::Record { lsn, payload } => {
                let expected = match replayed.records.last() {
                    Some((last, _)) => last + 1,
                    None => replayed
                        .checkpoint
                        .as_ref()
                        .map_or(1, |(covered, _)| covered + 1),
                };
                assert_eq!(lsn, expected, "records out of order or with a hole");
                replayed.records.push((lsn, payload.to_vec()));
            }
        }
        Ok(())
    })?;
    Ok((log, replayed, stats))
}

/// A payload that names its record, of varying length.
pub fn payload(index: u64) -> Vec<u8> {
    let mut bytes = format!("record-{index}-").into_bytes();
    bytes.extend(std::iter::repeat_n(b'x', (index as usize * 7) % 23));
    bytes
}

/// Bytes of a framed record with this payload.
pub fn frame_bytes(payload: &[u8]) -> u64 {
    16 + payload.len() as u64
}

pub fn segment_name(first_lsn: Lsn) -> String {
    format!("wal-{first_lsn:020}.log")
}

pub fn small_segments() -> LogOptions {
    LogOptions {
        segment_bytes_max: 200,
        ..LogOptions::default()
    }
}
