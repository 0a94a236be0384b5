//! Presence replication, the replica's side: for every primary whose slots this node is
//! replica of (the route table says so), one task follows that primary's `Replication/Follow`
//! stream and applies what it sends.
//!
//! ```text
//!  route table changes ──► assignments (primary, slot ranges) ──► one follow task each
//!  follow task: connect ──► Follow(slots, resume from our position?)
//!     resumed ──► change records ──► PresenceStore::apply_replicated (journaled here)
//!     else: snapshot records (applied over what is here) ──► done: sweep what it lacked
//!           ──► change records
//!     stream ends (primary moved, replica behind, connection lost) ──► pause, ask again
//! ```
//!
//! A follow task keeps its position (the primary's log id and the LSN through which it has
//! applied every record of its slots) across the streams it opens, and asks to resume from
//! it: a network cut or a primary's cut-off costs no snapshot while the primary's change feed
//! still holds what follows. The position lives only as long as the task, that is as long as
//! the assignment (primary and slots) stands: nothing else changes those slots here
//! meanwhile, so the replica's copy is exactly the primary's records through it. A new
//! assignment, a restarted replica, or a position the primary refuses (one its log never
//! issued) starts from a snapshot. What a replica applies goes to its own log, so a restarted
//! replica recovers it, then resyncs anyway.
//!
//! A reply whose records do not match its crc32c is refused whole (nothing of it is
//! applied) and the stream is asked for again from the last position.
//!
//! Once in sync, the replica acknowledges every reply's position when what it applied is
//! durable in its own log; under `presence.replication = "sync"` the primary acknowledges a
//! write only after that ([`imstate_node::syncacks`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use imstate_cluster::InSyncRange;
use imstate_node::cluster::{Cluster, ReplicaAssignment};
use imstate_node::presencestore::PresenceStore;
use imstate_presence::{Change, SlotSet};
use imstate_proto::v1 as pb;
use imstate_proto::v1::replication_client::ReplicationClient;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::Stream;

/// Pause before asking a primary again after a stream ended or failed.
const RETRY_PAUSE: Duration = Duration::from_millis(300);
/// Acknowledgements queued towards the primary (the newest matters; older ones may drop).
const ACKS_QUEUED: usize = 64;
/// Longest a connection attempt to a primary may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Metric: replica snapshots fully received and applied.
pub const REPLICA_SYNCS: &str = "imstate_replica_syncs_total";
/// Metric: change records applied as a replica.
pub const REPLICA_RECORDS: &str = "imstate_replica_records_applied_total";
/// Metric: follow streams that ended or failed, by `reason`.
pub const REPLICA_STREAM_ENDS: &str = "imstate_replica_stream_ends_total";
/// Metric: the primary's log position a replica has applied through, by `primary`.
pub const REPLICA_POSITION: &str = "imstate_replica_position_lsn";
/// Metric: streams resumed from the replica's position (no snapshot).
pub const REPLICA_RESUMES: &str = "imstate_replica_resumes_total";
/// Metric: replies refused for a crc mismatch or an undecodable record.
pub const REPLICA_CORRUPT_REPLIES: &str = "imstate_replica_corrupt_replies_total";
/// Metric: checkpoint parts this node built as a replica and sent to their primary, by
/// `outcome` (`sent`, `failed`).
pub const REPLICA_CHECKPOINT_PARTS: &str = "imstate_replica_checkpoint_parts_total";
/// Bytes of a checkpoint part per chunk sent.
const PART_CHUNK_BYTES: usize = 1 << 20;
/// Chunks of a part built ahead of the network.
const PART_CHUNKS_QUEUED: usize = 4;
/// The pace a checkpoint part is built and sent at, at most: 32 MiB/s (a part of 5M
/// sessions, 75 MB, takes about 2.3 s). Spread out, its copy and its stream take a little of
/// the replica's CPU for a few seconds instead of all of it at once, while writes to the
/// primary wait for this replica's acknowledgements. The primary asks for parts when half of
/// `presence.checkpoint_log_bytes` is logged, so they still arrive before its checkpoint.
pub const PART_BYTES_PER_SEC: u64 = 32 << 20;

/// Starts the manager: it follows what the route table says this node is replica of, until
/// `stop` turns true. `token`: the bearer token to present to primaries, if they require one.
pub fn spawn(
    cluster: Arc<Cluster>,
    presence: Arc<PresenceStore>,
    token: Option<Vec<u8>>,
    tls: Option<tonic::transport::ClientTlsConfig>,
    mut stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    let mut changes = cluster.route_changes();
    tokio::spawn(async move {
        let mut running: HashMap<ReplicaAssignment, Following> = HashMap::new();
        let mut tick = tokio::time::interval(MANAGER_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut published: Option<(Vec<InSyncRange>, tokio::time::Instant)> = None;
        loop {
            let wanted = cluster.replica_assignments();
            running.retain(|assignment, following| {
                if following.task.is_finished() {
                    return false;
                }
                if wanted.contains(assignment) {
                    return true;
                }
                // A stream whose slots this node now takes over goes on, for those slots
                // only, until the lock-delay ends: what the old primary acknowledged
                // meanwhile still arrives. (A new stream would start from a snapshot, and
                // drop what this node holds of them.)
                let mut slots = following.slots.write();
                let mut taking_over = imstate_presence::SlotSet::empty(slots.count());
                for (start, end) in slots.ranges() {
                    for slot in (start..end).filter(|slot| cluster.taking_over_slot(*slot)) {
                        taking_over.insert_range(slot, slot + 1);
                    }
                }
                slots.retain_all(&taking_over);
                let keep = !slots.is_empty();
                if !keep {
                    following.task.abort();
                }
                keep
            });
            for assignment in &wanted {
                if assignment.grpc.is_empty() || running.contains_key(assignment) {
                    continue;
                }
                let synced = Arc::new(AtomicBool::new(false));
                let slots = Arc::new(parking_lot::RwLock::new(SlotSet::from_ranges(
                    assignment.slots,
                    &assignment.spans,
                )));
                let task = tokio::spawn(follow(
                    assignment.clone(),
                    cluster.status().node,
                    Arc::clone(&presence),
                    Peer {
                        token: token.clone(),
                        tls: tls.clone(),
                    },
                    Arc::clone(&synced),
                    Arc::clone(&slots),
                ));
                running.insert(
                    assignment.clone(),
                    Following {
                        task,
                        synced,
                        held: false,
                        slots,
                    },
                );
            }
            // What this node may answer reads for as a replica.
            let mut readable = imstate_presence::SlotSet::empty(
                wanted.first().map_or(1, |assignment| assignment.slots),
            );
            for (assignment, following) in &running {
                if wanted.contains(assignment)
                    && following.synced.load(Ordering::Acquire)
                    && assignment.slots == readable.count()
                {
                    for &(start, end) in &assignment.spans {
                        readable.insert_range(start, end);
                    }
                }
            }
            presence.set_replica_readable(readable);
            // What this node is an in-sync replica of, for the arbiter: on every change, and
            // again now and then (the key goes with a lapsed lease). Assignments synced
            // once and not now (the stream ended: the primary may be gone) are reported
            // lapsed: the arbiter promotes at once only a replica that synced in its tenure.
            let mut report: Vec<InSyncRange> = Vec::new();
            for (assignment, following) in &mut running {
                let now = following.synced.load(Ordering::Acquire);
                following.held |= now;
                if wanted.contains(assignment) && following.held {
                    report.extend(assignment.in_sync_ranges(!now));
                }
            }
            report.sort_by_key(|range| range.start);
            let due = published
                .as_ref()
                .is_none_or(|(last, at)| *last != report || at.elapsed() >= REPORT_REFRESH);
            if due {
                match cluster.publish_in_sync(&report).await {
                    Ok(()) => published = Some((report, tokio::time::Instant::now())),
                    Err(error) => {
                        tracing::debug!(%error, "could not publish the in-sync report; retrying")
                    }
                }
            }
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { break },
                _ = stop.changed() => break,
                _ = tick.tick() => {}
            }
        }
        for following in running.into_values() {
            following.task.abort();
        }
    })
}

/// How often the manager looks again without a table change (handovers end, streams sync).
const MANAGER_TICK: Duration = Duration::from_millis(200);
/// How often the in-sync report is written again even when unchanged.
const REPORT_REFRESH: Duration = Duration::from_secs(2);

/// One follow task, whether its replica is in sync now and whether it was seen in sync since
/// the task began (this tenure), and the slots it applies (narrowed to the slots being taken
/// over once the assignment is gone).
struct Following {
    task: JoinHandle<()>,
    synced: Arc<AtomicBool>,
    held: bool,
    slots: Arc<parking_lot::RwLock<SlotSet>>,
}

/// Where a replica is in its primary's log: every record of its slots through `lsn` of the
/// log `log_id` is applied here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Position {
    /// The primary's presence log identity.
    pub log_id: String,
    /// The LSN applied through.
    pub lsn: u64,
}

/// Why a stream ended.
struct Ended {
    /// The status code, when the primary ended it.
    code: Option<tonic::Code>,
    reason: String,
}

impl From<String> for Ended {
    fn from(reason: String) -> Self {
        Self { code: None, reason }
    }
}

impl From<tonic::Status> for Ended {
    fn from(status: tonic::Status) -> Self {
        Self {
            code: Some(status.code()),
            reason: status.to_string(),
        }
    }
}

/// How a replica reaches its primaries: the bearer token to present, and TLS.
#[derive(Clone)]
struct Peer {
    token: Option<Vec<u8>>,
    tls: Option<tonic::transport::ClientTlsConfig>,
}

/// Follows one primary until aborted, asking again after every end.
async fn follow(
    assignment: ReplicaAssignment,
    replica_id: String,
    presence: Arc<PresenceStore>,
    peer: Peer,
    synced: Arc<AtomicBool>,
    slots: Arc<parking_lot::RwLock<SlotSet>>,
) {
    let mut position: Option<Position> = None;
    let mut parts = PartSender::default();
    loop {
        let outcome = follow_once(
            &assignment,
            &replica_id,
            &slots,
            &presence,
            &peer,
            &mut position,
            &synced,
            &mut parts,
        )
        .await;
        // Between streams, writes may be acknowledged without this replica.
        synced.store(false, Ordering::Release);
        let reason = match outcome {
            Ok(()) => "closed".to_owned(),
            Err(ended) => {
                if ended.code == Some(tonic::Code::OutOfRange) {
                    // The primary refused our position, or we fell behind its feed.
                    if let Some(at) = position.take() {
                        tracing::warn!(primary = %assignment.primary, lsn = at.lsn, log_id = %at.log_id, reason = %ended.reason, "the primary will not resume from this replica's position; resyncing by snapshot");
                    }
                }
                ended.reason
            }
        };
        metrics::counter!(REPLICA_STREAM_ENDS).increment(1);
        tracing::info!(primary = %assignment.primary, %reason, "replication stream ended; asking again");
        tokio::time::sleep(RETRY_PAUSE).await;
    }
}

/// Checks a reply's crc and decodes all of its records, or refuses it whole.
pub fn decode_reply(reply: &pb::FollowReply) -> Result<Vec<Change>, String> {
    let crc = crate::grpc::records_crc(&reply.records);
    if crc != reply.crc {
        return Err(format!(
            "a reply of {} records fails its crc32c ({crc:#010x}, sent {:#010x}); refused whole",
            reply.records.len(),
            reply.crc
        ));
    }
    reply
        .records
        .iter()
        .map(|record| {
            Change::decode(record).map_err(|error| {
                format!("a record does not decode: {error}; the reply is refused whole")
            })
        })
        .collect()
}

/// A connection of its own to the primary at `grpc`.
async fn connect(
    grpc: &str,
    peer: &Peer,
) -> Result<ReplicationClient<tonic::transport::Channel>, String> {
    let scheme = if peer.tls.is_some() { "https" } else { "http" };
    let mut endpoint = tonic::transport::Endpoint::from_shared(format!("{scheme}://{grpc}"))
        .map_err(|error| error.to_string())?
        .connect_timeout(CONNECT_TIMEOUT);
    if let Some(tls) = &peer.tls {
        endpoint = endpoint
            .tls_config(tls.clone())
            .map_err(|error| format!("peer TLS: {error}"))?;
    }
    let channel = endpoint
        .connect()
        .await
        .map_err(|error| error.to_string())?;
    Ok(ReplicationClient::new(channel).max_decoding_message_size(64 * 1024 * 1024))
}

/// A follow task's checkpoint parts ([`imstate_node::parts`]): the primary's cycle the last
/// part was sent for, and the part being sent (aborted with the follow task).
#[derive(Default)]
struct PartSender {
    cycle: u64,
    task: Option<crate::grpc::AbortOnDrop>,
}

/// Adds the bearer token, if any, to a request to a primary.
fn authorize<T>(request: &mut tonic::Request<T>, token: Option<&[u8]>) -> Result<(), String> {
    if let Some(token) = token {
        let value = format!("Bearer {}", String::from_utf8_lossy(token));
        let value = value
            .parse()
            .map_err(|_| "the peer token is not a valid header".to_owned())?;
        request.metadata_mut().insert("authorization", value);
    }
    Ok(())
}

/// Builds a checkpoint part of `slots` (held here through `lsn` of the primary's log
/// `log_id`) and sends it to the primary; logs and counts the outcome.
async fn send_part(
    grpc: String,
    peer: Peer,
    presence: Arc<PresenceStore>,
    slots: SlotSet,
    replica_id: String,
    log_id: String,
    lsn: u64,
) {
    let started = std::time::Instant::now();
    let (sender, receiver) =
        tokio::sync::mpsc::channel::<pb::CheckpointPartChunk>(PART_CHUNKS_QUEUED);
    let first = pb::CheckpointPartChunk {
        replica_id,
        log_id,
        lsn,
        slots: slots.count(),
        spans: slots
            .ranges()
            .into_iter()
            .map(|(lo, hi)| pb::SlotSpan { lo, hi })
            .collect(),
        ..pb::CheckpointPartChunk::default()
    };
    // Built off the async workers, each shard under its own lock only, a few chunks ahead.
    let builder = tokio::task::spawn_blocking(move || -> Result<(), String> {
        let mut pending = Some(first);
        let mut crc = 0;
        let (paced_from, mut sent) = (std::time::Instant::now(), 0u64);
        let gone = || imstate_node::NodeError::Unavailable("the part upload ended".into());
        presence
            .write_part(&slots, |section| {
                crc = crc32c::crc32c_append(crc, &section);
                for piece in section.chunks(PART_CHUNK_BYTES) {
                    let mut chunk = pending.take().unwrap_or_default();
                    chunk.data = piece.to_vec();
                    sender.blocking_send(chunk).map_err(|_| gone())?;
                    sent += piece.len() as u64;
                    let due = std::time::Duration::from_secs_f64(
                        sent as f64 / PART_BYTES_PER_SEC as f64,
                    );
                    if let Some(early) = due.checked_sub(paced_from.elapsed()) {
                        std::thread::sleep(early);
                    }
                }
                Ok(())
            })
            .map_err(|error| error.to_string())?;
        let mut last = pending.take().unwrap_or_default();
        last.last = true;
        last.crc = crc;
        sender.blocking_send(last).map_err(|_| gone().to_string())
    });
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(receiver));
    // Its own connection: tens of megabytes queued on the follow stream's connection would
    // hold up the acknowledgements that sync writes wait for.
    let outcome = match (
        authorize(&mut request, peer.token.as_deref()),
        connect(&grpc, &peer).await,
    ) {
        (Ok(()), Ok(mut client)) => client
            .put_checkpoint_part(request)
            .await
            .map(|reply| reply.into_inner().bytes)
            .map_err(|status| status.to_string()),
        (Err(error), _) | (_, Err(error)) => Err(error),
    };
    let built = builder
        .await
        .map_err(|error| error.to_string())
        .and_then(|built| built);
    match (outcome, built) {
        (Ok(bytes), Ok(())) => {
            metrics::counter!(REPLICA_CHECKPOINT_PARTS, "outcome" => "sent").increment(1);
            tracing::info!(
                lsn,
                bytes,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "checkpoint part sent to the primary"
            );
        }
        (Err(error), _) | (_, Err(error)) => {
            metrics::counter!(REPLICA_CHECKPOINT_PARTS, "outcome" => "failed").increment(1);
            tracing::warn!(lsn, %error, "checkpoint part not sent; the primary copies those slots itself");
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn follow_once(
    assignment: &ReplicaAssignment,
    replica_id: &str,
    slots: &parking_lot::RwLock<SlotSet>,
    presence: &Arc<PresenceStore>,
    peer: &Peer,
    position: &mut Option<Position>,
    in_sync: &AtomicBool,
    parts: &mut PartSender,
) -> Result<(), Ended> {
    let mut client = connect(&assignment.grpc, peer).await?;
    let (acks, outgoing) = tokio::sync::mpsc::channel::<pb::FollowRequest>(ACKS_QUEUED);
    let first = pb::FollowRequest {
        replica_id: replica_id.to_owned(),
        slots: assignment.slots,
        spans: slots
            .read()
            .ranges()
            .into_iter()
            .map(|(lo, hi)| pb::SlotSpan { lo, hi })
            .collect(),
        acked_lsn: 0,
        resume_lsn: position.as_ref().map_or(0, |at| at.lsn),
        log_id: position
            .as_ref()
            .map_or_else(String::new, |at| at.log_id.clone()),
    };
    acks.send(first)
        .await
        .map_err(|_| "the request stream closed".to_owned())?;
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(outgoing));
    authorize(&mut request, peer.token.as_deref())?;
    let mut stream = client.follow(request).await?.into_inner();
    let mut started = false;
    let mut synced = false;
    // While a snapshot comes in: the (uid, conn) of every session it holds (the sweep at its
    // end removes the others).
    let mut snapshot: Option<Vec<(u64, u64)>> = None;
    let mut snapshot_started = std::time::Instant::now();
    let mut snapshot_sessions = 0usize;
    let gauge = metrics::gauge!(REPLICA_POSITION, "primary" => assignment.primary.clone());
    while let Some(mut reply) = next_batch(&mut stream).await? {
        let changes = std::mem::take(&mut reply.changes);
        presence.admit().await.map_err(|error| error.to_string())?;
        let fresh = !started;
        started = true;
        if fresh && reply.resumed {
            if position
                .as_ref()
                .is_none_or(|at| at.log_id != reply.log_id || at.lsn != reply.first_lsn)
            {
                return Err(format!(
                    "the primary resumed at LSN {} of log {}, not at this replica's position {position:?}",
                    reply.first_lsn, reply.log_id
                )
                .into());
            }
            synced = true;
            metrics::counter!(REPLICA_RESUMES).increment(1);
            tracing::info!(primary = %assignment.primary, lsn = reply.lsn, "replica resumed from its position");
        } else if fresh {
            // From a snapshot: the position is void until it is complete.
            *position = None;
            snapshot = Some(Vec::new());
            snapshot_started = std::time::Instant::now();
            tracing::info!(primary = %assignment.primary, "replica syncing from a snapshot");
        }
        if let Some(keys) = &mut snapshot {
            keys.extend(changes.iter().filter_map(|change| match change {
                Change::Login(session) => Some((session.uid, session.conn)),
                _ => None,
            }));
        }
        let store = Arc::clone(presence);
        let set = slots.read().clone();
        // The snapshot is applied over what this node holds (never dropped first: a replica
        // promoted while it resyncs keeps its older copy); at its end, whatever of the slots
        // it did not hold goes.
        if snapshot.is_some() {
            snapshot_sessions += changes.len();
        }
        let sweep = reply
            .snapshot_done
            .then(|| snapshot.take())
            .flatten()
            .map(|mut keys| {
                keys.sort_unstable();
                keys
            });
        let applied = tokio::task::spawn_blocking(move || -> Result<(usize, usize), String> {
            for change in &changes {
                store
                    .apply_replicated(change, &set)
                    .map_err(|error| error.to_string())?;
            }
            let swept = sweep.map_or(0, |keys| store.sweep_slots(&set, &keys));
            Ok((changes.len(), swept))
        })
        .await
        .map_err(|error| error.to_string())??;
        let (applied, swept) = applied;
        if swept > 0 {
            tracing::info!(primary = %assignment.primary, swept, "sessions the primary no longer has were removed after its snapshot");
        }
        metrics::counter!(REPLICA_RECORDS).increment(applied as u64);
        gauge.set(reply.lsn as f64);
        if reply.snapshot_done {
            synced = true;
            metrics::counter!(REPLICA_SYNCS).increment(1);
            tracing::info!(
                primary = %assignment.primary,
                lsn = reply.lsn,
                sessions = snapshot_sessions,
                elapsed_ms = snapshot_started.elapsed().as_millis() as u64,
                "replica in sync from a snapshot"
            );
        }
        if synced {
            in_sync.store(true, Ordering::Release);
            *position = Some(Position {
                log_id: reply.log_id.clone(),
                lsn: reply.lsn,
            });
            // Acknowledge once what was applied is durable here (this node's own log only:
            // waiting for its replicas as well could wait in a circle).
            presence
                .durable_local()
                .await
                .map_err(|error| error.to_string())?;
            let ack = pb::FollowRequest {
                acked_lsn: reply.lsn,
                ..pb::FollowRequest::default()
            };
            // A full queue means the primary is not reading: it will cut this stream off.
            let _ = acks.try_send(ack);
            // The primary wants checkpoint parts: one per cycle, of the whole assignment
            // (not while its slots are narrowed to a takeover), from this position.
            let whole = SlotSet::from_ranges(assignment.slots, &assignment.spans);
            if reply.parts_wanted != 0
                && reply.parts_wanted != parts.cycle
                && parts
                    .task
                    .as_ref()
                    .is_none_or(crate::grpc::AbortOnDrop::is_finished)
                && *slots.read() == whole
            {
                parts.cycle = reply.parts_wanted;
                parts.task = Some(crate::grpc::AbortOnDrop::new(tokio::spawn(send_part(
                    assignment.grpc.clone(),
                    peer.clone(),
                    Arc::clone(presence),
                    whole,
                    replica_id.to_owned(),
                    reply.log_id.clone(),
                    reply.lsn,
                ))));
            }
        }
        if let Some(status) = reply.then {
            return Err(status.into());
        }
    }
    Ok(())
}

/// Replies applied together at most (one apply, one durable wait, one acknowledgement).
const REPLIES_PER_BATCH_MAX: usize = 64;

/// Replies taken together: whatever had arrived when the first was read, so that a busy
/// stream costs one apply, one durable wait and one acknowledgement per batch, not per reply.
struct Batch {
    /// Every record of the replies, in order, decoded.
    changes: Vec<Change>,
    /// The first reply's position (a resumed stream's first reply names where it resumed).
    first_lsn: u64,
    /// The last reply's position.
    lsn: u64,
    resumed: bool,
    /// The last reply ends a snapshot (a batch never goes past one).
    snapshot_done: bool,
    log_id: String,
    /// The newest reply's wish for checkpoint parts (see `FollowReply.parts_wanted`).
    parts_wanted: u64,
    /// The stream's error right after these replies, to report once they are applied.
    then: Option<tonic::Status>,
}

/// The next batch of replies (`None`: the stream ended); a reply that fails its crc or does
/// not decode ends the stream.
async fn next_batch(
    stream: &mut tonic::Streaming<pb::FollowReply>,
) -> Result<Option<Batch>, Ended> {
    let Some(first) = stream.message().await? else {
        return Ok(None);
    };
    let decode = |reply: &pb::FollowReply| {
        decode_reply(reply).map_err(|reason| {
            metrics::counter!(REPLICA_CORRUPT_REPLIES).increment(1);
            Ended::from(reason)
        })
    };
    let mut batch = Batch {
        changes: decode(&first)?,
        first_lsn: first.lsn,
        lsn: first.lsn,
        resumed: first.resumed,
        snapshot_done: first.snapshot_done,
        log_id: first.log_id,
        parts_wanted: first.parts_wanted,
        then: None,
    };
    let mut replies = 1;
    while !batch.snapshot_done && replies < REPLIES_PER_BATCH_MAX {
        // Only what has already arrived (`Streaming` keeps its state across polls).
        let mut context = std::task::Context::from_waker(std::task::Waker::noop());
        match std::pin::Pin::new(&mut *stream).poll_next(&mut context) {
            std::task::Poll::Ready(Some(Ok(reply))) => {
                batch.changes.extend(decode(&reply)?);
                batch.lsn = reply.lsn;
                batch.snapshot_done = reply.snapshot_done;
                batch.parts_wanted = reply.parts_wanted;
                replies += 1;
            }
            std::task::Poll::Ready(Some(Err(status))) => {
                batch.then = Some(status);
                break;
            }
            std::task::Poll::Ready(None) | std::task::Poll::Pending => break,
        }
    }
    Ok(Some(batch))
}

#[cfg(test)]
mod tests {
    use super::*;
    use imstate_presence::Session;

    fn reply(records: Vec<Vec<u8>>) -> pb::FollowReply {
        pb::FollowReply {
            crc: crate::grpc::records_crc(&records),
            records,
            ..pb::FollowReply::default()
        }
    }

    #[test]
    fn a_reply_is_taken_whole_or_refused_whole() {
        let login = |uid| {
            Change::Login(Session {
                uid,
                device: "phone".into(),
                gateway: "gw".into(),
                conn: uid,
                login_ms: 1_000,
                last_heartbeat_ms: 1_000,
                ttl_ms: 60_000,
                meta: None,
            })
            .to_bytes()
        };
        let good = reply(vec![login(1), login(2), login(3)]);
        assert_eq!(decode_reply(&good).unwrap().len(), 3);
        // One flipped bit anywhere: refused, nothing decoded.
        let mut flipped = good.clone();
        flipped.records[1][0] ^= 1;
        let error = decode_reply(&flipped).unwrap_err();
        assert!(
            error.contains("crc32c") && error.contains("refused whole"),
            "{error}"
        );
        // A record that matches its crc but does not decode (a primary's bug): refused too.
        let garbage = reply(vec![login(1), vec![0xff; 5]]);
        let error = decode_reply(&garbage).unwrap_err();
        assert!(error.contains("does not decode"), "{error}");
    }
}
