//! Synchronous replication's acknowledgements (`presence.replication = "sync"`): a presence
//! write is acknowledged only once every in-sync replica holds it durably.
//!
//! ```text
//!  write ──► local log durable(lsn) ──► SyncAcks::wait(lsn) ──► reply
//!  replica stream ──► ack(position) ──► Follower::acked ──► waiters re-check
//! ```
//!
//! A replica counts once it has acknowledged the position its snapshot was taken at (before
//! that it is still syncing, and a promotion of it could lose what it has not received: the
//! route table's replica is then "degraded", see the metric). A replica that does not
//! acknowledge within the timeout is cut off (its stream ends; it resyncs when it can), and
//! the write is acknowledged without it: a stalled replica degrades durability to one node
//! for a moment, it never stops the primary. Bounded: one entry per replica stream.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::watch;

/// Metric: writes whose replica acknowledgement timed out (the replica was cut off).
pub const REPLICATION_ACK_TIMEOUTS: &str = "imstate_replication_ack_timeouts_total";
/// Metric: replicas in sync with this primary.
pub const REPLICATION_FOLLOWERS: &str = "imstate_replication_followers_in_sync";

/// One replica stream, as the primary sees it.
#[derive(Debug)]
pub struct Follower {
    /// The primary's log position the replica's snapshot was taken at.
    since: u64,
    acked: AtomicU64,
    cut: AtomicBool,
    /// Turns true when the follower is cut off (its stream should end).
    cut_signal: watch::Sender<bool>,
}

impl Follower {
    /// Whether the replica has everything up to its snapshot's position.
    pub fn in_sync(&self) -> bool {
        !self.cut.load(Ordering::Acquire) && self.acked.load(Ordering::Acquire) >= self.since
    }

    /// Resolves when this follower is cut off for not acknowledging in time.
    pub async fn cut_off(&self) {
        let mut signal = self.cut_signal.subscribe();
        let _ = signal.wait_for(|cut| *cut).await;
    }
}

/// The replicas of one primary and what they acknowledged.
pub struct SyncAcks {
    timeout: Duration,
    followers: Mutex<HashMap<u64, Arc<Follower>>>,
    next_id: AtomicU64,
    /// Bumped on every acknowledgement or change of followers.
    changed: watch::Sender<u64>,
}

/// Removes its follower when dropped (the stream ended).
pub struct Registration {
    acks: Arc<SyncAcks>,
    id: u64,
    follower: Arc<Follower>,
}

impl Registration {
    /// The follower.
    pub fn follower(&self) -> &Arc<Follower> {
        &self.follower
    }

    /// The replica holds every record up to `lsn` durably.
    pub fn ack(&self, lsn: u64) {
        self.follower.acked.fetch_max(lsn, Ordering::AcqRel);
        self.acks.bump();
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.acks.followers.lock().remove(&self.id);
        self.acks.bump();
    }
}

impl SyncAcks {
    /// Waits at most `timeout` for a replica's acknowledgement.
    pub fn new(timeout: Duration) -> Arc<Self> {
        let (changed, _) = watch::channel(0);
        Arc::new(Self {
            timeout,
            followers: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            changed,
        })
    }

    fn bump(&self) {
        self.changed.send_modify(|generation| *generation += 1);
        let in_sync = self
            .followers
            .lock()
            .values()
            .filter(|f| f.in_sync())
            .count();
        metrics::gauge!(REPLICATION_FOLLOWERS).set(in_sync as f64);
    }

    /// A replica stream whose snapshot was taken at `since`.
    pub fn register(self: &Arc<Self>, since: u64) -> Registration {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (cut_signal, _) = watch::channel(false);
        let follower = Arc::new(Follower {
            since,
            acked: AtomicU64::new(0),
            cut: AtomicBool::new(false),
            cut_signal,
        });
        self.followers.lock().insert(id, Arc::clone(&follower));
        self.bump();
        Registration {
            acks: Arc::clone(self),
            id,
            follower,
        }
    }

    /// Resolves once every replica in sync holds every record up to `lsn`; a replica that
    /// has not acknowledged it within the timeout is cut off instead.
    pub async fn wait(&self, lsn: u64) {
        #[cfg(feature = "planted-ack-before-replica")]
        {
            let _ = lsn;
            return;
        }
        #[cfg(not(feature = "planted-ack-before-replica"))]
        {
            let mut changed = self.changed.subscribe();
            let deadline = tokio::time::Instant::now() + self.timeout;
            loop {
                let lagging: Vec<Arc<Follower>> = self
                    .followers
                    .lock()
                    .values()
                    .filter(|f| f.in_sync() && f.acked.load(Ordering::Acquire) < lsn)
                    .cloned()
                    .collect();
                if lagging.is_empty() {
                    return;
                }
                if tokio::time::timeout_at(deadline, changed.changed())
                    .await
                    .is_err()
                {
                    for follower in lagging {
                        if !follower.cut.swap(true, Ordering::AcqRel) {
                            metrics::counter!(REPLICATION_ACK_TIMEOUTS).increment(1);
                            follower.cut_signal.send_replace(true);
                        }
                    }
                    self.bump();
                    return;
                }
            }
        }
    }
}

#[cfg(all(test, not(feature = "planted-ack-before-replica")))]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_write_waits_for_in_sync_replicas_only_and_a_silent_one_is_cut_off() {
        let acks = SyncAcks::new(Duration::from_millis(200));
        // No replica: nothing to wait for.
        acks.wait(10).await;
        let syncing = acks.register(50);
        let synced = acks.register(5);
        synced.ack(5);
        assert!(synced.follower().in_sync() && !syncing.follower().in_sync());
        let waiter = {
            let acks = Arc::clone(&acks);
            tokio::spawn(async move { acks.wait(20).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "waits for the in-sync replica");
        synced.ack(20);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
        // Silent: cut off after the timeout, and the write goes on.
        let started = std::time::Instant::now();
        acks.wait(30).await;
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert!(!synced.follower().in_sync());
        tokio::time::timeout(Duration::from_secs(1), synced.follower().cut_off())
            .await
            .unwrap();
        // A dropped registration is forgotten.
        drop(synced);
        drop(syncing);
        acks.wait(1_000).await;
    }
}
