//! The `Replication` gRPC service, the primary's side: a replica asks to follow some presence
//! slots and gets a snapshot of their sessions, then their change records as they happen.
//!
//! ```text
//!  Follow(slots) ──► this node primary of all of them? else FAILED_PRECONDITION
//!     position = feed.last_lsn()            (noted before the first shard is copied)
//!     snapshot: shard by shard, the slots' sessions as login records, SNAPSHOT_BATCH a reply
//!     reply { snapshot_done, lsn: position }
//!     loop: feed.read_after(position) ──► the slots' records, once durable here ──► reply
//!           still primary? else FAILED_PRECONDITION; fell behind the feed? OUT_OF_RANGE
//! ```
//!
//! Why the snapshot plus the records after `position` rebuild the slots: the snapshot is
//! fuzzy like a checkpoint (each shard copied under its lock, after `position` was read), and
//! a replica's apply is idempotent over the overlap ([`imstate_presence::ShardedRegistry::apply_replicated`]).
//!
//! Bounded (B1): at most [`FOLLOW_QUEUE_REPLIES`] replies wait per stream; a replica that does
//! not read stalls only its own stream, and one that falls behind the feed is cut off.

use std::sync::Arc;
use std::time::Duration;

use imstate_node::cluster::Cluster;
use imstate_node::feed::ChangeFeed;
use imstate_node::presencestore::PresenceStore;
use imstate_node::syncacks::{Registration, SyncAcks};
use imstate_presence::{Change, SlotSet};
use imstate_proto::v1 as pb;
use imstate_proto::v1::replication_server::Replication;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

/// Records per reply (snapshot and stream alike).
pub const FOLLOW_BATCH_RECORDS: usize = 1024;
/// Replies queued per stream before the sender waits for the replica to read.
pub const FOLLOW_QUEUE_REPLIES: usize = 8;
/// How often an idle stream checks that this node is still the slots' primary.
const OWNERSHIP_CHECK: Duration = Duration::from_millis(200);

/// Metric: replication streams served (as primary), by `outcome` at their end.
pub const REPLICATION_STREAMS: &str = "imstate_replication_streams_total";
/// Metric: sessions sent in replica snapshots.
pub const REPLICATION_SNAPSHOT_SESSIONS: &str = "imstate_replication_snapshot_sessions_total";
/// Metric: change records sent to replicas.
pub const REPLICATION_RECORDS_SENT: &str = "imstate_replication_records_sent_total";

/// The primary's side of presence replication.
pub struct ReplicationService {
    presence: Arc<PresenceStore>,
    cluster: Arc<Cluster>,
    feed: Arc<ChangeFeed>,
    /// Sync replication: where replicas' acknowledgements go (`None`: async).
    acks: Option<Arc<SyncAcks>>,
    stopping: watch::Receiver<bool>,
}

impl ReplicationService {
    /// Serves `presence`'s slots that `cluster` says this node is primary of, from `feed`;
    /// every stream ends when `stopping` turns true.
    pub fn new(
        presence: Arc<PresenceStore>,
        cluster: Arc<Cluster>,
        feed: Arc<ChangeFeed>,
        acks: Option<Arc<SyncAcks>>,
        stopping: watch::Receiver<bool>,
    ) -> Self {
        Self {
            presence,
            cluster,
            feed,
            acks,
            stopping,
        }
    }
}

/// Whether this node is primary of every slot of `wanted` now.
fn primary_of(cluster: &Cluster, wanted: &SlotSet) -> bool {
    cluster.primary_slots().is_some_and(|primary| {
        let mut rest = wanted.clone();
        rest.remove_all(&primary);
        primary.count() == wanted.count() && rest.is_empty()
    })
}

#[tonic::async_trait]
impl Replication for ReplicationService {
    type FollowStream = ReceiverStream<Result<pb::FollowReply, Status>>;

    async fn follow(
        &self,
        request: Request<Streaming<pb::FollowRequest>>,
    ) -> Result<Response<Self::FollowStream>, Status> {
        let mut incoming = request.into_inner();
        let request = incoming
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("no follow request"))?;
        let count = self
            .cluster
            .primary_slots()
            .map(|slots| slots.count())
            .ok_or_else(|| Status::failed_precondition("presence slots are not placed yet"))?;
        if request.slots != count {
            return Err(Status::invalid_argument(format!(
                "the replica counts {} presence slots, this node {count}",
                request.slots
            )));
        }
        if request.spans.is_empty() {
            return Err(Status::invalid_argument("no slot span to follow"));
        }
        let mut wanted = SlotSet::empty(count);
        for span in &request.spans {
            if span.lo >= span.hi || span.hi > count {
                return Err(Status::invalid_argument(format!(
                    "slot span [{}, {}) is not within [0, {count})",
                    span.lo, span.hi
                )));
            }
            wanted.insert_range(span.lo, span.hi);
        }
        if !primary_of(&self.cluster, &wanted) {
            return Err(Status::failed_precondition(
                "this node is not the primary of every slot asked for",
            ));
        }
        let (sender, receiver) = mpsc::channel(FOLLOW_QUEUE_REPLIES);
        let stream = Stream {
            presence: Arc::clone(&self.presence),
            cluster: Arc::clone(&self.cluster),
            feed: Arc::clone(&self.feed),
            slots: wanted,
            replica: request.replica_id,
            sender,
            stopping: self.stopping.clone(),
            acks: self.acks.clone(),
            incoming: Some(incoming),
        };
        tokio::spawn(stream.run());
        Ok(Response::new(ReceiverStream::new(receiver)))
    }
}

/// One replica's stream.
struct Stream {
    presence: Arc<PresenceStore>,
    cluster: Arc<Cluster>,
    feed: Arc<ChangeFeed>,
    slots: SlotSet,
    replica: String,
    sender: mpsc::Sender<Result<pb::FollowReply, Status>>,
    stopping: watch::Receiver<bool>,
    acks: Option<Arc<SyncAcks>>,
    /// The replica's acknowledgements (taken by the task that reads them).
    incoming: Option<Streaming<pb::FollowRequest>>,
}

/// Reads a replica's acknowledgements into its registration until the replica goes away.
async fn read_acks(mut incoming: Streaming<pb::FollowRequest>, registration: Arc<Registration>) {
    while let Ok(Some(message)) = incoming.message().await {
        registration.ack(message.acked_lsn);
    }
}

impl Stream {
    async fn run(mut self) {
        let outcome = match self.serve().await {
            Ok(()) => "closed",
            Err(status) => {
                let outcome = match status.code() {
                    tonic::Code::FailedPrecondition => "moved",
                    tonic::Code::OutOfRange => "behind",
                    tonic::Code::DeadlineExceeded => "cut",
                    _ => "failed",
                };
                tracing::info!(replica = %self.replica, %status, "replication stream ended");
                let _ = self.sender.send(Err(status)).await;
                outcome
            }
        };
        metrics::counter!(REPLICATION_STREAMS, "outcome" => outcome).increment(1);
    }

    /// Sends one reply; `Ok(false)` when the replica went away.
    async fn send(&self, reply: pb::FollowReply) -> bool {
        self.sender.send(Ok(reply)).await.is_ok()
    }

    async fn serve(&mut self) -> Result<(), Status> {
        let position = self.feed.last_lsn();
        // Sync: this replica counts for writes once it acknowledges `position` (the snapshot
        // and everything before it); its acknowledgements arrive on the request stream.
        let registration = self
            .acks
            .as_ref()
            .map(|acks| Arc::new(acks.register(position)));
        let reader = match (&registration, self.incoming.take()) {
            (Some(registration), Some(incoming)) => {
                Some(tokio::spawn(read_acks(incoming, Arc::clone(registration))))
            }
            _ => None,
        };
        let _reader = AbortOnDrop(reader);
        let follower = registration.as_ref().map(|r| Arc::clone(r.follower()));
        let cut_off = async move {
            match follower {
                Some(follower) => follower.cut_off().await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(cut_off);
        // The snapshot, shard by shard (each copied under its lock, off the async workers).
        let shards = self.presence.registry().shard_count();
        let mut sessions_sent = 0u64;
        for shard in 0..shards {
            let presence = Arc::clone(&self.presence);
            let slots = self.slots.clone();
            let sessions =
                tokio::task::spawn_blocking(move || presence.slot_sessions(shard, &slots))
                    .await
                    .map_err(|error| Status::internal(error.to_string()))?
                    .map_err(super::status_from)?;
            for chunk in sessions.chunks(FOLLOW_BATCH_RECORDS) {
                let records = chunk
                    .iter()
                    .map(|session| Change::Login(session.clone()).to_bytes())
                    .collect();
                sessions_sent += chunk.len() as u64;
                let reply = pb::FollowReply {
                    records,
                    snapshot_done: false,
                    lsn: position,
                };
                if !self.send(reply).await {
                    return Ok(());
                }
            }
        }
        metrics::counter!(REPLICATION_SNAPSHOT_SESSIONS).increment(sessions_sent);
        let done = pb::FollowReply {
            records: Vec::new(),
            snapshot_done: true,
            lsn: position,
        };
        if !self.send(done).await {
            return Ok(());
        }
        tracing::info!(replica = %self.replica, sessions = sessions_sent, lsn = position, "replica snapshot sent; streaming changes");
        let mut at = position;
        loop {
            if *self.stopping.borrow() {
                return Err(Status::unavailable("the node is stopping"));
            }
            if !primary_of(&self.cluster, &self.slots) {
                return Err(Status::failed_precondition(
                    "this node is no longer the primary of these slots",
                ));
            }
            let batch = self
                .feed
                .read_after(at, FOLLOW_BATCH_RECORDS)
                .map_err(|behind| Status::out_of_range(behind.to_string()))?;
            let Some(&(last, _)) = batch.last() else {
                tokio::select! {
                    _ = self.feed.wait_after(at) => {}
                    _ = tokio::time::sleep(OWNERSHIP_CHECK) => {}
                    _ = self.stopping.changed() => {}
                    _ = self.sender.closed() => return Ok(()),
                    _ = &mut cut_off => return Err(cut_status()),
                }
                continue;
            };
            // Only what is durable here: a replica never holds a change a crash of this node
            // could still take back from its own log.
            self.presence
                .log()
                .durable(last)
                .await
                .map_err(|error| Status::unavailable(error.to_string()))?;
            let records: Vec<Vec<u8>> = batch
                .iter()
                .filter(|(_, record)| {
                    Change::peek_uid(record).is_none_or(|uid| self.slots.contains(uid))
                })
                .map(|(_, record)| record.to_vec())
                .collect();
            metrics::counter!(REPLICATION_RECORDS_SENT).increment(records.len() as u64);
            at = last;
            let reply = pb::FollowReply {
                records,
                snapshot_done: false,
                lsn: last,
            };
            tokio::select! {
                sent = self.send(reply) => if !sent { return Ok(()) },
                _ = &mut cut_off => return Err(cut_status()),
            }
        }
    }
}

fn cut_status() -> Status {
    Status::deadline_exceeded("the replica did not acknowledge in time; resync")
}

/// Aborts the task when dropped (a stream's acknowledgement reader ends with the stream).
struct AbortOnDrop(Option<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}
