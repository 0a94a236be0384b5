//! The primary's side of "in sync": which replicas this node counts in sync for the slots
//! it is primary of, published under `counted/<node>` ([`imstate_cluster::CountedRange`]).
//!
//! ```text
//!  SyncAcks followers (in sync, not cut) × the table's replica / joining of each primary range
//!     ──► counted ranges ──► counted/<node> (bound to the lease) when they changed
//!  a replica cut off or its stream ended (SyncAcks::lost_generation moved)
//!     ──► publish again *before* any write is acknowledged (PresenceStore::durable)
//! ```
//!
//! Why: a replica's own in-sync report (`insync/<node>`) can be stale. A primary that cut a
//! replica off (a paused replica, a cut link) acknowledges writes without it; if the
//! arbiter then moved the primary role to that replica on its word alone, those writes were
//! lost (the presence simulation found it). The arbiter keeps a replica's report only where
//! the primary counts it too, and fences its table write on these keys, so a withdrawal that
//! lands before the write makes the arbiter plan again.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use imstate_cluster::{CountedRange, PresenceRoute};

use crate::cluster::Cluster;
use crate::error::NodeError;
use crate::syncacks::{Follower, SyncAcks};

/// How often the publisher looks again without being asked.
const PUBLISH_TICK: std::time::Duration = std::time::Duration::from_millis(200);

/// The ranges of `presence` that `me` is primary of, with each replica (or joining replica)
/// that some in-sync follower stream of that node covers whole. Pure.
pub fn counted_ranges(
    presence: &PresenceRoute,
    me: &str,
    followers: &[Arc<Follower>],
) -> Vec<CountedRange> {
    let mut out = Vec::new();
    for range in presence.ranges.iter().filter(|range| range.primary == me) {
        let roles = [
            (&range.replica, range.replica_since),
            (&range.joining, range.joining_since),
        ];
        for (replica, since) in roles {
            let Some(replica) = replica else { continue };
            let covered = (range.start..range.end).all(|slot| {
                followers.iter().any(|f| {
                    f.in_sync()
                        && f.replica() == replica
                        && f.slots().count() == presence.slots
                        && f.slots().contains(u64::from(slot))
                })
            });
            if covered {
                out.push(CountedRange {
                    start: range.start,
                    end: range.end,
                    replica: replica.clone(),
                    replica_since: since,
                });
            }
        }
    }
    out
}

/// Publishes this primary's counted report.
pub struct CountedPublisher {
    cluster: Arc<Cluster>,
    acks: Arc<SyncAcks>,
    node: String,
    /// What was last published, and under which lease.
    published: tokio::sync::Mutex<Option<(Vec<CountedRange>, imstate_coord::LeaseId)>>,
    /// The lost generation the last publication covers.
    covered: AtomicU64,
}

impl CountedPublisher {
    /// A publisher for `node`'s followers in `acks`.
    pub fn new(cluster: Arc<Cluster>, acks: Arc<SyncAcks>, node: String) -> Arc<Self> {
        Arc::new(Self {
            cluster,
            acks,
            node,
            published: tokio::sync::Mutex::new(None),
            covered: AtomicU64::new(0),
        })
    }

    /// Publishes the report if it changed (or the lease did); `force`: write it anyway.
    /// Returns whether the route table in the coordinator, read in the same txn, is the one
    /// this node has installed (always `true` when nothing was written).
    async fn publish_with(&self, force: bool) -> Result<bool, NodeError> {
        let mut published = self.published.lock().await;
        let lost = self.acks.lost_generation();
        // Writers that waited for the lock behind the one that published for them.
        if force && self.covered.load(Ordering::Acquire) >= lost {
            return Ok(true);
        }
        let ranges = match self.cluster.presence_route() {
            Some(presence) => counted_ranges(&presence, &self.node, &self.acks.followers()),
            None => Vec::new(),
        };
        let lease = self.cluster.lease();
        let same = published
            .as_ref()
            .is_some_and(|(last, at)| *last == ranges && Some(*at) == lease);
        if same && !force {
            return Ok(true);
        }
        let installed = self.cluster.route_version();
        let (lease, version) = self.cluster.publish_counted(&ranges).await?;
        *published = Some((ranges, lease));
        // A table written before this report may have moved slots to the replica lost: what
        // this node acknowledges without it is safe only if no such table exists yet.
        let current = version <= installed;
        if current {
            self.covered.fetch_max(lost, Ordering::AcqRel);
        }
        Ok(current)
    }

    /// Publishes the report if it changed (or the lease did).
    pub async fn publish(&self) -> Result<(), NodeError> {
        self.publish_with(false).await.map(|_| ())
    }

    /// Before a write is acknowledged: if a replica was cut off or its stream ended since
    /// the last publication, publish first, and refuse while the coordinator holds a newer
    /// route table than this node has installed (two atomic loads when nothing was lost).
    pub async fn before_ack(&self) -> Result<(), NodeError> {
        if self.covered.load(Ordering::Acquire) >= self.acks.lost_generation() {
            return Ok(());
        }
        match self.publish_with(true).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(NodeError::Unavailable(
                "a replica was lost while the route table changed; the change is not \
                 acknowledged; retry"
                    .into(),
            )),
            Err(error) => Err(NodeError::Unavailable(format!(
                "a replica was lost and this primary could not tell the coordinator ({error}); \
                 the change is not acknowledged; retry"
            ))),
        }
    }
}

/// Starts publishing `node`'s counted report on every table change and every
/// [`PUBLISH_TICK`], until the cluster stops; hands the publisher to `presence`.
pub fn spawn(
    cluster: Arc<Cluster>,
    acks: Arc<SyncAcks>,
    presence: &crate::presencestore::PresenceStore,
) -> tokio::task::JoinHandle<()> {
    let node = cluster.status().node;
    let publisher = CountedPublisher::new(Arc::clone(&cluster), acks, node);
    presence.set_counted(Arc::clone(&publisher));
    let mut changes = cluster.route_changes();
    let mut stop = cluster.stop_signal();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(PUBLISH_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if let Err(error) = publisher.publish().await {
                tracing::debug!(%error, "could not publish the counted report; retrying");
            }
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { break },
                _ = stop.changed() => break,
                _ = tick.tick() => {}
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use imstate_cluster::SlotRange;
    use imstate_presence::SlotSet;

    #[test]
    fn only_replicas_with_an_in_sync_stream_over_the_whole_range_count() {
        let range = |start, end, primary: &str, replica: &str, joining: Option<&str>| SlotRange {
            start,
            end,
            primary: primary.into(),
            since: 1,
            handover: false,
            replica: Some(replica.into()),
            replica_since: 3,
            joining: joining.map(Into::into),
            joining_since: if joining.is_some() { 4 } else { 0 },
        };
        let presence = PresenceRoute {
            slots: 8,
            ranges: vec![
                range(0, 4, "a", "b", Some("c")),
                range(4, 6, "a", "c", None),
                range(6, 8, "b", "a", None),
            ],
        };
        let acks = SyncAcks::new(std::time::Duration::from_secs(1), true);
        let mut first = SlotSet::empty(8);
        first.insert_range(0, 6);
        let b = acks.register(1, "b", first);
        b.ack(1);
        let mut part = SlotSet::empty(8);
        part.insert_range(0, 3);
        let c = acks.register(1, "c", part);
        c.ack(1);
        let counted = counted_ranges(&presence, "a", &acks.followers());
        // b counts for 0..4; c covers only 0..3 of its joining range and none of 4..6.
        assert_eq!(
            counted,
            vec![CountedRange {
                start: 0,
                end: 4,
                replica: "b".into(),
                replica_since: 3,
            }]
        );
        // A follower that has not acknowledged its snapshot does not count.
        drop(b);
        let _b = acks.register(9, "b", SlotSet::all(8));
        assert!(counted_ranges(&presence, "a", &acks.followers()).is_empty());
    }
}
