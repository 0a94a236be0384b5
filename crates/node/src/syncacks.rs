//! Replicas' acknowledgements, as their primary sees them: which replica streams are in
//! sync, for which slots, how far behind; and, under `presence.replication = "sync"`, a
//! presence write is acknowledged only once every in-sync replica holds it durably.
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
//!
//! Under `"async"` the same bookkeeping runs (for lag, `presence.require_replica` and the
//! degraded-slot metric) but writes never wait.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use imstate_presence::SlotSet;
use parking_lot::Mutex;
use tokio::sync::watch;

/// Metric: writes whose replica acknowledgement timed out (the replica was cut off).
pub const REPLICATION_ACK_TIMEOUTS: &str = "imstate_replication_ack_timeouts_total";
/// Metric: replicas in sync with this primary.
pub const REPLICATION_FOLLOWERS: &str = "imstate_replication_followers_in_sync";

/// One replica stream, as the primary sees it.
#[derive(Debug)]
pub struct Follower {
    /// The replica's node id.
    replica: String,
    /// The slots the stream carries.
    slots: SlotSet,
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

    /// The primary's log position through which the replica holds every record durably.
    pub fn acked(&self) -> u64 {
        self.acked.load(Ordering::Acquire)
    }

    /// The replica's node id.
    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// The slots the stream carries.
    pub fn slots(&self) -> &SlotSet {
        &self.slots
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
    /// `presence.replication = "sync"`: writes wait for in-sync replicas.
    sync: bool,
    followers: Mutex<HashMap<u64, Arc<Follower>>>,
    next_id: AtomicU64,
    /// Bumped on every acknowledgement or change of followers.
    changed: watch::Sender<u64>,
    /// [`Self::in_sync_slots`] as of the last change (`None` before any replica).
    in_sync: parking_lot::RwLock<Option<Arc<SlotSet>>>,
    /// Bumped whenever an in-sync replica is cut off or its stream ends
    /// ([`crate::counted`] publishes again before the next acknowledgement).
    lost: AtomicU64,
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
        if self.follower.in_sync() {
            self.acks.lost.fetch_add(1, Ordering::AcqRel);
        }
        self.acks.followers.lock().remove(&self.id);
        self.acks.bump();
    }
}

impl SyncAcks {
    /// Writes wait (when `sync`) at most `timeout` for a replica's acknowledgement.
    pub fn new(timeout: Duration, sync: bool) -> Arc<Self> {
        let (changed, _) = watch::channel(0);
        Arc::new(Self {
            timeout,
            sync,
            followers: Mutex::new(HashMap::new()),
            in_sync: parking_lot::RwLock::new(None),
            next_id: AtomicU64::new(1),
            changed,
            lost: AtomicU64::new(0),
        })
    }

    /// How many times an in-sync replica was cut off or its stream ended, so far.
    pub fn lost_generation(&self) -> u64 {
        self.lost.load(Ordering::Acquire)
    }

    fn bump(&self) {
        self.changed.send_modify(|generation| *generation += 1);
        let followers = self.followers.lock();
        let in_sync = followers.values().filter(|f| f.in_sync()).count();
        let count = followers.values().map(|f| f.slots.count()).max();
        drop(followers);
        let covered = count.map(|count| Arc::new(self.in_sync_slots(count)));
        *self.in_sync.write() = covered;
        metrics::gauge!(REPLICATION_FOLLOWERS).set(in_sync as f64);
    }

    /// The slots some in-sync replica holds, as of the last acknowledgement or change of
    /// replicas (cheap: for every write under `presence.require_replica`).
    pub fn in_sync_cached(&self) -> Option<Arc<SlotSet>> {
        self.in_sync.read().clone()
    }

    /// Whether writes wait for replicas (`presence.replication = "sync"`).
    pub fn is_sync(&self) -> bool {
        self.sync
    }

    /// A stream of `slots` to `replica`, which holds everything up to `since` once it
    /// acknowledges that position (its snapshot's, or the one it resumed from).
    pub fn register(self: &Arc<Self>, since: u64, replica: &str, slots: SlotSet) -> Registration {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (cut_signal, _) = watch::channel(false);
        let follower = Arc::new(Follower {
            replica: replica.to_owned(),
            slots,
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

    /// Every replica stream now, in sync or not.
    pub fn followers(&self) -> Vec<Arc<Follower>> {
        let mut followers: Vec<Arc<Follower>> = self.followers.lock().values().cloned().collect();
        followers.sort_by(|a, b| a.replica.cmp(&b.replica));
        followers
    }

    /// The slots (of `count`) some in-sync replica holds.
    pub fn in_sync_slots(&self, count: u32) -> SlotSet {
        let mut covered = SlotSet::empty(count);
        for follower in self.followers.lock().values() {
            if follower.in_sync() && follower.slots.count() == count {
                covered.insert_all(&follower.slots);
            }
        }
        covered
    }

    /// Resolves once every replica in sync holds every record up to `lsn`; a replica that
    /// has not acknowledged it within the timeout is cut off instead. At once under async
    /// replication.
    ///
    /// Returns whether every replica this wait counted on acknowledged `lsn`: `false` when
    /// one was cut off (by this wait's timeout or another's) or its stream ended first, so
    /// that the record may be on this node only. (Before, a write whose replica another
    /// write had just cut off was answered as if replicated; the presence simulation found
    /// it, under `presence.require_replica`.)
    pub async fn wait(&self, lsn: u64) -> bool {
        if !self.sync {
            return true;
        }
        #[cfg(feature = "planted-ack-before-replica")]
        {
            let _ = lsn;
            return true;
        }
        #[cfg(not(feature = "planted-ack-before-replica"))]
        {
            let mut changed = self.changed.subscribe();
            let deadline = tokio::time::Instant::now() + self.timeout;
            let mut complete = true;
            // The replicas this wait counts on, until each acknowledged `lsn` or was lost.
            let mut waited: Vec<Arc<Follower>> = Vec::new();
            loop {
                let lagging: Vec<Arc<Follower>> = {
                    let followers = self.followers.lock();
                    waited.retain(|follower| {
                        if follower.acked.load(Ordering::Acquire) >= lsn {
                            return false;
                        }
                        let present = followers.values().any(|f| Arc::ptr_eq(f, follower));
                        if follower.cut.load(Ordering::Acquire) || !present {
                            complete = false;
                            return false;
                        }
                        true
                    });
                    followers
                        .values()
                        .filter(|f| f.in_sync() && f.acked.load(Ordering::Acquire) < lsn)
                        .cloned()
                        .collect()
                };
                for follower in &lagging {
                    if !waited.iter().any(|f| Arc::ptr_eq(f, follower)) {
                        waited.push(Arc::clone(follower));
                    }
                }
                if lagging.is_empty() && waited.is_empty() {
                    return complete;
                }
                if tokio::time::timeout_at(deadline, changed.changed())
                    .await
                    .is_err()
                {
                    for follower in lagging.iter().chain(&waited) {
                        if !follower.cut.swap(true, Ordering::AcqRel) {
                            self.lost.fetch_add(1, Ordering::AcqRel);
                            metrics::counter!(REPLICATION_ACK_TIMEOUTS).increment(1);
                            follower.cut_signal.send_replace(true);
                        }
                    }
                    self.bump();
                    return false;
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
        let acks = SyncAcks::new(Duration::from_millis(200), true);
        // No replica: nothing to wait for.
        assert!(acks.wait(10).await);
        let mut first = SlotSet::empty(4);
        first.insert_range(0, 2);
        let mut second = SlotSet::empty(4);
        second.insert_range(2, 3);
        let syncing = acks.register(50, "n2", second);
        let synced = acks.register(5, "n1", first.clone());
        assert!(acks.in_sync_slots(4).is_empty());
        synced.ack(5);
        assert!(synced.follower().in_sync() && !syncing.follower().in_sync());
        assert_eq!(
            acks.in_sync_slots(4),
            first,
            "only the in-sync replica's slots"
        );
        assert_eq!(
            acks.followers()
                .iter()
                .map(|f| (f.replica().to_owned(), f.acked()))
                .collect::<Vec<_>>(),
            vec![("n1".to_owned(), 5), ("n2".to_owned(), 0)]
        );
        let waiter = {
            let acks = Arc::clone(&acks);
            tokio::spawn(async move { acks.wait(20).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "waits for the in-sync replica");
        synced.ack(20);
        assert!(
            tokio::time::timeout(Duration::from_secs(5), waiter)
                .await
                .unwrap()
                .unwrap(),
            "acknowledged by the in-sync replica"
        );
        // Silent: cut off after the timeout, and the write goes on, without its replica.
        let started = std::time::Instant::now();
        assert!(!acks.wait(30).await);
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert!(!synced.follower().in_sync());
        tokio::time::timeout(Duration::from_secs(1), synced.follower().cut_off())
            .await
            .unwrap();
        // A dropped registration is forgotten.
        drop(synced);
        drop(syncing);
        assert!(acks.wait(1_000).await);
    }

    #[tokio::test]
    async fn a_write_whose_replica_another_write_cut_off_is_not_counted_as_replicated() {
        let acks = SyncAcks::new(Duration::from_millis(300), true);
        let replica = acks.register(1, "n1", SlotSet::all(2));
        replica.ack(1);
        // Two writes wait for the same silent replica; the first one's timeout cuts it off,
        // the second sees no lagging replica left: it must still say the replica lacks it.
        let first = {
            let acks = Arc::clone(&acks);
            tokio::spawn(async move { acks.wait(10).await })
        };
        tokio::time::sleep(Duration::from_millis(150)).await;
        let second = {
            let acks = Arc::clone(&acks);
            tokio::spawn(async move { acks.wait(11).await })
        };
        let first = tokio::time::timeout(Duration::from_secs(5), first).await;
        let second = tokio::time::timeout(Duration::from_secs(5), second).await;
        assert!(!first.unwrap().unwrap(), "cut off by its own timeout");
        assert!(
            !second.unwrap().unwrap(),
            "cut off by the other write's timeout"
        );
        // A stream that ends before it acknowledges counts the same.
        let again = acks.register(11, "n1", SlotSet::all(2));
        again.ack(11);
        let third = {
            let acks = Arc::clone(&acks);
            tokio::spawn(async move { acks.wait(12).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(again);
        drop(replica);
        let third = tokio::time::timeout(Duration::from_secs(5), third).await;
        assert!(!third.unwrap().unwrap(), "its replica's stream ended first");
    }

    #[tokio::test]
    async fn async_replication_keeps_the_books_but_never_waits() {
        let acks = SyncAcks::new(Duration::from_secs(60), false);
        let replica = acks.register(1, "n1", SlotSet::all(2));
        replica.ack(1);
        assert_eq!(acks.in_sync_slots(2), SlotSet::all(2));
        tokio::time::timeout(Duration::from_secs(1), acks.wait(100))
            .await
            .expect("async: writes do not wait for the replica");
        assert!(replica.follower().in_sync(), "nor is it cut off");
    }
}
