//! The `Replication` gRPC service, the primary's side: a replica asks to follow some presence
//! slots and gets a snapshot of their sessions, then their change records as they happen.
//!
//! ```text
//!  Follow(slots, resume?) ──► this node primary of all of them? else FAILED_PRECONDITION
//!     resume (same log id, the feed still holds the next record) ──► reply { resumed, lsn }
//!     a resume position this log never issued ──► OUT_OF_RANGE naming both LSNs
//!     otherwise a snapshot:
//!       position = feed.last_lsn()            (noted before the first shard is copied)
//!       shard by shard, the slots' sessions as login records, FOLLOW_BATCH_RECORDS a reply
//!       reply { snapshot_done, lsn: position }
//!     loop: feed.read_after(position) ──► the slots' records, once durable here ──► reply
//!           still primary? else FAILED_PRECONDITION; fell behind the feed? OUT_OF_RANGE
//! ```
//!
//! Every reply carries a crc32c of its records ([`records_crc`]): a replica refuses a reply
//! that does not match, whole, and asks again.
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
use imstate_node::feed::{Behind, ChangeFeed};
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
/// Metric: replica streams resumed from the replica's position (no snapshot).
pub const REPLICATION_RESUMES: &str = "imstate_replication_resumes_total";
/// Metric: records a replica has not acknowledged, by `replica`.
pub const REPLICATION_LAG_RECORDS: &str = "imstate_replication_lag_records";
/// Metric: how long the oldest record a replica has not acknowledged has waited, by `replica`
/// (+Inf once the change feed no longer holds it).
pub const REPLICATION_LAG_MS: &str = "imstate_replication_lag_ms";
/// Metric: change records sent to replicas.
pub const REPLICATION_RECORDS_SENT: &str = "imstate_replication_records_sent_total";

/// The primary's side of presence replication.
pub struct ReplicationService {
    presence: Arc<PresenceStore>,
    /// The identity of this node's presence log (positions refer to it).
    log_id: String,
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
        log_id: String,
        cluster: Arc<Cluster>,
        feed: Arc<ChangeFeed>,
        acks: Option<Arc<SyncAcks>>,
        stopping: watch::Receiver<bool>,
    ) -> Self {
        Self {
            presence,
            log_id,
            cluster,
            feed,
            acks,
            stopping,
        }
    }
}

/// Whether this node is primary of every slot of `wanted` now.
fn primary_of(cluster: &Cluster, wanted: &SlotSet) -> bool {
    cluster
        .primary_slots()
        .is_some_and(|primary| wanted.is_subset_of(&primary))
}

/// Whether `replica` follows this node for every slot of `slots` now (as their replica, or
/// as the node joining to replace it), and this node is their primary.
fn replica_of(cluster: &Cluster, replica: &str, slots: &SlotSet) -> bool {
    let Some(route) = cluster.presence_route() else {
        return false;
    };
    let me = cluster.status().node;
    slots.ranges().into_iter().all(|(start, end)| {
        (start..end).all(|slot| {
            route.range(slot).is_some_and(|range| {
                range.primary == me
                    && (range.replica.as_deref() == Some(replica)
                        || range.joining.as_deref() == Some(replica))
            })
        })
    })
}

/// The slots a replica's request names (`slots`: its slot count, `spans`: the ranges), or
/// why they are not this cluster's: slots not placed yet, another slot count, a bad span.
fn asked_slots(cluster: &Cluster, slots: u32, spans: &[pb::SlotSpan]) -> Result<SlotSet, Status> {
    let count = cluster
        .primary_slots()
        .map(|slots| slots.count())
        .ok_or_else(|| Status::failed_precondition("presence slots are not placed yet"))?;
    if slots != count {
        return Err(Status::invalid_argument(format!(
            "the replica counts {slots} presence slots, this node {count}"
        )));
    }
    spans_to_slots(count, spans)
}

/// The slot set of a request's spans, or why they are invalid.
fn spans_to_slots(count: u32, spans: &[pb::SlotSpan]) -> Result<SlotSet, Status> {
    if spans.is_empty() {
        return Err(Status::invalid_argument("no slot span"));
    }
    let mut slots = SlotSet::empty(count);
    for span in spans {
        if span.lo >= span.hi || span.hi > count {
            return Err(Status::invalid_argument(format!(
                "slot span [{}, {}) is not within [0, {count})",
                span.lo, span.hi
            )));
        }
        slots.insert_range(span.lo, span.hi);
    }
    Ok(slots)
}

/// How a replica's stream starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// From the replica's position: it holds every record through it.
    Resume(u64),
    /// From a snapshot, for the reason given.
    Snapshot(String),
    /// Refused: the replica names a position this log never issued (it must forget it).
    Refuse(String),
}

/// Decides how a stream starts for a replica that asks to resume after `resume_lsn` of the
/// log `asked_log_id` (`0`: it asks for a snapshot), when this node's log is `log_id` and its
/// change feed is `feed`.
pub fn start_of(asked_log_id: &str, resume_lsn: u64, log_id: &str, feed: &ChangeFeed) -> Start {
    if resume_lsn == 0 || asked_log_id.is_empty() {
        return Start::Snapshot("the replica holds no position".into());
    }
    if asked_log_id != log_id {
        return Start::Snapshot(format!(
            "the replica's position is in log {asked_log_id}, this node's log is {log_id}"
        ));
    }
    let last = feed.last_lsn();
    if resume_lsn > last {
        return Start::Refuse(format!(
            "the replica asks to resume after LSN {resume_lsn} of log {log_id}, which this \
             primary never issued (its last LSN is {last}; was its disk restored from a \
             backup?): the replica must resync by snapshot"
        ));
    }
    match feed.read_after(resume_lsn, 1) {
        Ok(_) => Start::Resume(resume_lsn),
        Err(Behind { oldest, .. }) => Start::Snapshot(format!(
            "the change feed holds LSNs from {oldest} on, the replica is at {resume_lsn}"
        )),
    }
}

/// The crc32c of a reply's records, each preceded by its length (4 bytes little-endian).
pub fn records_crc(records: &[Vec<u8>]) -> u32 {
    records.iter().fold(0, |crc, record| {
        let crc = crc32c::crc32c_append(crc, &(record.len() as u32).to_le_bytes());
        crc32c::crc32c_append(crc, record)
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
        let wanted = asked_slots(&self.cluster, request.slots, &request.spans)?;
        if !primary_of(&self.cluster, &wanted) {
            return Err(Status::failed_precondition(
                "this node is not the primary of every slot asked for",
            ));
        }
        let start = start_of(
            &request.log_id,
            request.resume_lsn,
            &self.log_id,
            &self.feed,
        );
        if let Start::Refuse(reason) = &start {
            tracing::warn!(replica = %request.replica_id, %reason, "replication stream refused");
            metrics::counter!(REPLICATION_STREAMS, "outcome" => "refused").increment(1);
            return Err(Status::out_of_range(reason.clone()));
        }
        let (sender, receiver) = mpsc::channel(FOLLOW_QUEUE_REPLIES);
        let stream = Stream {
            presence: Arc::clone(&self.presence),
            cluster: Arc::clone(&self.cluster),
            feed: Arc::clone(&self.feed),
            slots: wanted,
            replica: request.replica_id,
            log_id: self.log_id.clone(),
            start,
            sender,
            stopping: self.stopping.clone(),
            acks: self.acks.clone(),
            incoming: Some(incoming),
        };
        tokio::spawn(stream.run());
        Ok(Response::new(ReceiverStream::new(receiver)))
    }

    async fn put_checkpoint_part(
        &self,
        request: Request<Streaming<pb::CheckpointPartChunk>>,
    ) -> Result<Response<pb::CheckpointPartReply>, Status> {
        let mut incoming = request.into_inner();
        let first = incoming
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("no checkpoint part"))?;
        let outcome = self.store_part(first, &mut incoming).await;
        let label = if outcome.is_ok() { "stored" } else { "refused" };
        metrics::counter!(imstate_node::parts::CHECKPOINT_PARTS, "outcome" => label).increment(1);
        match outcome {
            Ok(bytes) => Ok(Response::new(pb::CheckpointPartReply { bytes })),
            Err(status) => {
                tracing::warn!(%status, "checkpoint part refused");
                Err(status)
            }
        }
    }
}

impl ReplicationService {
    /// Checks a part's first chunk against this node's log and route table, then stores the
    /// part's bytes (written off the async workers); returns how many.
    async fn store_part(
        &self,
        first: pb::CheckpointPartChunk,
        incoming: &mut Streaming<pb::CheckpointPartChunk>,
    ) -> Result<u64, Status> {
        let parts =
            self.presence.parts().cloned().ok_or_else(|| {
                Status::failed_precondition("this node takes no checkpoint parts")
            })?;
        let slots = asked_slots(&self.cluster, first.slots, &first.spans)?;
        if first.log_id != self.log_id {
            return Err(Status::failed_precondition(format!(
                "the part is of log {}, this node's log is {}",
                first.log_id, self.log_id
            )));
        }
        let log = self.presence.log();
        let last = log.last_lsn();
        if first.lsn > last {
            return Err(Status::out_of_range(format!(
                "the part holds the slots through LSN {} of log {}, which this node never \
                 issued (its last LSN is {last})",
                first.lsn, self.log_id
            )));
        }
        let checkpointed = log.checkpoint_lsn().unwrap_or(0);
        if first.lsn < checkpointed {
            return Err(Status::out_of_range(format!(
                "the part holds the slots through LSN {}, and a checkpoint already covers LSN \
                 {checkpointed}",
                first.lsn
            )));
        }
        if !replica_of(&self.cluster, &first.replica_id, &slots) {
            return Err(Status::failed_precondition(format!(
                "{} is not the replica of every slot of the part, or this node not their \
                 primary",
                first.replica_id
            )));
        }
        let meta = imstate_node::parts::PartMeta {
            replica: first.replica_id.clone(),
            lsn: first.lsn,
            slots,
        };
        let (replica, lsn) = (first.replica_id.clone(), first.lsn);
        let mut upload = parts.receive(meta);
        let refused =
            |error: imstate_node::parts::PartError| Status::invalid_argument(error.to_string());
        let mut chunk = first;
        loop {
            upload
                .write(std::mem::take(&mut chunk.data))
                .map_err(refused)?;
            if chunk.last {
                let bytes = upload.finish(chunk.crc).map_err(refused)?;
                tracing::info!(%replica, lsn, bytes, "checkpoint part stored");
                return Ok(bytes);
            }
            chunk = incoming.message().await?.ok_or_else(|| {
                Status::invalid_argument("the checkpoint part ended without its last chunk")
            })?;
        }
    }
}

/// One replica's stream.
struct Stream {
    presence: Arc<PresenceStore>,
    cluster: Arc<Cluster>,
    feed: Arc<ChangeFeed>,
    slots: SlotSet,
    replica: String,
    log_id: String,
    start: Start,
    sender: mpsc::Sender<Result<pb::FollowReply, Status>>,
    stopping: watch::Receiver<bool>,
    acks: Option<Arc<SyncAcks>>,
    /// The replica's acknowledgements (taken by the task that reads them).
    incoming: Option<Streaming<pb::FollowRequest>>,
}

/// Reads a replica's acknowledgements into its registration until the replica goes away,
/// and reports its lag (also while it is silent).
async fn read_acks(
    mut incoming: Streaming<pb::FollowRequest>,
    registration: Arc<Registration>,
    feed: Arc<ChangeFeed>,
) {
    let follower = registration.follower();
    let replica = follower.replica().to_owned();
    let records = metrics::gauge!(REPLICATION_LAG_RECORDS, "replica" => replica.clone());
    let millis = metrics::gauge!(REPLICATION_LAG_MS, "replica" => replica);
    let mut report = tokio::time::interval(LAG_REPORT);
    loop {
        tokio::select! {
            message = incoming.message() => match message {
                Ok(Some(message)) => registration.ack(message.acked_lsn),
                _ => return,
            },
            _ = report.tick() => {
                let (behind, since) = feed.lag(follower.acked());
                records.set(behind as f64);
                // Behind the feed: as far as the metric can tell, the whole ring's age.
                millis.set(since.map_or(f64::INFINITY, |since| since.as_millis() as f64));
            }
        }
    }
}

/// How often a stream's lag gauges are set.
const LAG_REPORT: Duration = Duration::from_millis(500);

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

    /// Sends one reply (with its crc and this log's id); `false` when the replica went away.
    async fn send(&self, mut reply: pb::FollowReply) -> bool {
        reply.crc = records_crc(&reply.records);
        reply.log_id.clone_from(&self.log_id);
        self.sender.send(Ok(reply)).await.is_ok()
    }

    async fn serve(&mut self) -> Result<(), Status> {
        let (position, resumed) = match &self.start {
            Start::Resume(at) => (*at, true),
            Start::Snapshot(_) | Start::Refuse(_) => (self.feed.last_lsn(), false),
        };
        // This replica counts (for sync writes, `presence.require_replica` and the degraded
        // metric) once it acknowledges `position` (the snapshot and everything before it, or
        // where it resumed); its acknowledgements arrive on the request stream.
        let registration = self
            .acks
            .as_ref()
            .map(|acks| Arc::new(acks.register(position, &self.replica, self.slots.clone())));
        let reader = match (&registration, self.incoming.take()) {
            (Some(registration), Some(incoming)) => Some(tokio::spawn(read_acks(
                incoming,
                Arc::clone(registration),
                Arc::clone(&self.feed),
            ))),
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
        if resumed {
            tracing::info!(replica = %self.replica, lsn = position, "replica resumed; streaming changes");
            metrics::counter!(REPLICATION_RESUMES).increment(1);
            let reply = pb::FollowReply {
                resumed: true,
                lsn: position,
                ..pb::FollowReply::default()
            };
            if !self.send(reply).await {
                return Ok(());
            }
            return self.stream_from(position, &mut cut_off).await;
        }
        if let Start::Snapshot(reason) = &self.start {
            tracing::info!(replica = %self.replica, %reason, "replica syncs by snapshot");
        }
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
                    lsn: position,
                    ..pb::FollowReply::default()
                };
                if !self.send(reply).await {
                    return Ok(());
                }
            }
        }
        metrics::counter!(REPLICATION_SNAPSHOT_SESSIONS).increment(sessions_sent);
        let done = pb::FollowReply {
            snapshot_done: true,
            lsn: position,
            ..pb::FollowReply::default()
        };
        if !self.send(done).await {
            return Ok(());
        }
        tracing::info!(replica = %self.replica, sessions = sessions_sent, lsn = position, "replica snapshot sent; streaming changes");
        self.stream_from(position, &mut cut_off).await
    }

    /// Streams the slots' records after `position` until the stream ends.
    async fn stream_from(
        &mut self,
        position: u64,
        cut_off: &mut std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
    ) -> Result<(), Status> {
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
                    _ = cut_off.as_mut() => return Err(cut_status()),
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
                lsn: last,
                parts_wanted: self.presence.parts_wanted().unwrap_or(0),
                ..pb::FollowReply::default()
            };
            tokio::select! {
                sent = self.send(reply) => if !sent { return Ok(()) },
                _ = cut_off.as_mut() => return Err(cut_status()),
            }
        }
    }
}

fn cut_status() -> Status {
    Status::deadline_exceeded("the replica did not acknowledge in time; resync")
}

/// Aborts the task when dropped (a stream's acknowledgement reader ends with the stream; a
/// replica's part upload with its follow task).
pub(crate) struct AbortOnDrop(Option<tokio::task::JoinHandle<()>>);

impl AbortOnDrop {
    /// Owns `task`.
    pub(crate) fn new(task: tokio::task::JoinHandle<()>) -> Self {
        Self(Some(task))
    }

    /// Whether the task has ended.
    pub(crate) fn is_finished(&self) -> bool {
        self.0
            .as_ref()
            .is_none_or(tokio::task::JoinHandle::is_finished)
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use imstate_node::feed::FeedLimits;

    #[test]
    fn a_stream_resumes_only_from_a_position_of_this_log_that_the_feed_still_holds() {
        // The feed starts after LSN 100 and holds 101..=110.
        let feed = ChangeFeed::new(FeedLimits::default(), 100);
        let mut next = 100;
        for _ in 0..10 {
            feed.append(vec![1], |_| {
                next += 1;
                Ok::<u64, ()>(next)
            })
            .unwrap();
        }
        assert_eq!(start_of("L", 105, "L", &feed), Start::Resume(105));
        assert_eq!(
            start_of("L", 110, "L", &feed),
            Start::Resume(110),
            "nothing new yet"
        );
        assert_eq!(start_of("L", 100, "L", &feed), Start::Resume(100));
        assert!(matches!(start_of("L", 0, "L", &feed), Start::Snapshot(_)));
        assert!(matches!(start_of("", 105, "L", &feed), Start::Snapshot(_)));
        assert!(
            matches!(start_of("M", 105, "L", &feed), Start::Snapshot(_)),
            "another log"
        );
        match start_of("L", 99, "L", &feed) {
            Start::Snapshot(reason) => assert!(reason.contains("from 101"), "{reason}"),
            other => panic!("{other:?}"),
        }
        // A position this log never issued (its disk restored from an old backup): refused,
        // naming both LSNs.
        match start_of("L", 500, "L", &feed) {
            Start::Refuse(reason) => {
                assert!(reason.contains("500") && reason.contains("110"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_records_crc_covers_their_bytes_and_their_boundaries() {
        let records = vec![b"ab".to_vec(), b"c".to_vec()];
        let crc = records_crc(&records);
        assert_eq!(records_crc(&records.clone()), crc);
        assert_ne!(records_crc(&[b"a".to_vec(), b"bc".to_vec()]), crc);
        assert_ne!(records_crc(&[b"ab".to_vec(), b"d".to_vec()]), crc);
        assert_ne!(records_crc(&[]), crc);
    }
}
