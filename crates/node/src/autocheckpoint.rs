//! The trigger of automatic checkpoints, shared by both stores.
//!
//! A store asks [`AutoCheckpoint::claim`] after work that grows its log. It gets a
//! [`CheckpointClaim`] only when the log has grown past the threshold since the last
//! checkpoint and no automatic checkpoint is running. Invariant: at most one automatic
//! checkpoint per store at a time. The claim clears the running flag when dropped, so a
//! checkpoint that fails, panics or is never started cannot block later ones.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use imstate_log::Log;

/// Whether an automatic checkpoint of one store is running, and when to start one.
#[derive(Debug, Default)]
pub struct AutoCheckpoint {
    running: Arc<AtomicBool>,
}

/// The right to run one automatic checkpoint; dropping it lets the next one start.
#[derive(Debug)]
pub struct CheckpointClaim {
    running: Arc<AtomicBool>,
}

impl AutoCheckpoint {
    /// Claims a checkpoint if `log` grew by at least `threshold_bytes` since the last one
    /// (0 disables automatic checkpoints) and none is running.
    pub fn claim(&self, log: &Log, threshold_bytes: u64) -> Option<CheckpointClaim> {
        if threshold_bytes == 0 || log.bytes_since_checkpoint() < threshold_bytes {
            return None;
        }
        if self.running.swap(true, Ordering::AcqRel) {
            return None;
        }
        Some(CheckpointClaim {
            running: Arc::clone(&self.running),
        })
    }
}

impl Drop for CheckpointClaim {
    fn drop(&mut self) {
        self.running.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use imstate_log::{FaultyStorage, LogOptions};

    use super::*;

    #[test]
    fn claims_past_the_threshold_one_at_a_time_and_again_after_drop() {
        let (log, _) = Log::open(FaultyStorage::new(), LogOptions::default(), |_| Ok(())).unwrap();
        let auto = AutoCheckpoint::default();
        let lsn = log.append(vec![7; 100]).unwrap();
        log.wait_durable(lsn).unwrap();
        assert!(
            auto.claim(&log, 0).is_none(),
            "0 disables automatic checkpoints"
        );
        assert!(auto.claim(&log, 1_000_000).is_none(), "below the threshold");
        let claim = auto.claim(&log, 10).expect("past the threshold");
        assert!(
            auto.claim(&log, 10).is_none(),
            "one automatic checkpoint at a time"
        );
        drop(claim);
        assert!(
            auto.claim(&log, 10).is_some(),
            "a dropped claim lets the next one start"
        );
    }
}
