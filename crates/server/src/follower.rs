//! Presence replication, the replica's side: for every primary whose slots this node is
//! replica of (the route table says so), one task follows that primary's `Replication/Follow`
//! stream and applies what it sends.
//!
//! ```text
//!  route table changes ──► assignments (primary, slot ranges) ──► one follow task each
//!  follow task: connect ──► Follow(slots) ──► first reply: drop the slots' sessions here
//!     snapshot records + change records ──► PresenceStore::apply_replicated (journaled here)
//!     stream ends (primary moved, replica behind, connection lost) ──► pause, ask again
//! ```
//!
//! Every (re)start of a stream resyncs from a snapshot: simple and always right; a stream
//! resumed from a position is an optimisation for later. What a replica applies goes to its
//! own log, so a restarted replica recovers it, then resyncs anyway.
//!
//! Once in sync, the replica acknowledges every reply's position when what it applied is
//! durable in its own log; under `presence.replication = "sync"` the primary acknowledges a
//! write only after that ([`imstate_node::syncacks`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use imstate_node::cluster::{Cluster, ReplicaAssignment};
use imstate_node::presencestore::PresenceStore;
use imstate_presence::{Change, SlotSet};
use imstate_proto::v1 as pb;
use imstate_proto::v1::replication_client::ReplicationClient;
use tokio::sync::watch;
use tokio::task::JoinHandle;

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

/// Starts the manager: it follows what the route table says this node is replica of, until
/// `stop` turns true. `token`: the bearer token to present to primaries, if they require one.
pub fn spawn(
    cluster: Arc<Cluster>,
    presence: Arc<PresenceStore>,
    token: Option<Vec<u8>>,
    mut stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    let mut changes = cluster.route_changes();
    tokio::spawn(async move {
        let mut running: HashMap<ReplicaAssignment, JoinHandle<()>> = HashMap::new();
        loop {
            let wanted = cluster.replica_assignments();
            running.retain(|assignment, task| {
                let keep = wanted.contains(assignment) && !task.is_finished();
                if !keep {
                    task.abort();
                }
                keep
            });
            for assignment in wanted {
                if assignment.grpc.is_empty() || running.contains_key(&assignment) {
                    continue;
                }
                let task = tokio::spawn(follow(
                    assignment.clone(),
                    Arc::clone(&presence),
                    token.clone(),
                ));
                running.insert(assignment, task);
            }
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { break },
                _ = stop.changed() => break,
            }
        }
        for task in running.into_values() {
            task.abort();
        }
    })
}

/// Follows one primary until aborted, asking again after every end.
async fn follow(
    assignment: ReplicaAssignment,
    presence: Arc<PresenceStore>,
    token: Option<Vec<u8>>,
) {
    let slots = SlotSet::from_ranges(assignment.slots, &assignment.spans);
    loop {
        let reason = match follow_once(&assignment, &slots, &presence, token.as_deref()).await {
            Ok(()) => "closed".to_owned(),
            Err(error) => error,
        };
        metrics::counter!(REPLICA_STREAM_ENDS).increment(1);
        tracing::info!(primary = %assignment.primary, %reason, "replication stream ended; asking again");
        tokio::time::sleep(RETRY_PAUSE).await;
    }
}

async fn follow_once(
    assignment: &ReplicaAssignment,
    slots: &SlotSet,
    presence: &Arc<PresenceStore>,
    token: Option<&[u8]>,
) -> Result<(), String> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", assignment.grpc))
        .map_err(|error| error.to_string())?
        .connect_timeout(CONNECT_TIMEOUT);
    let channel = endpoint
        .connect()
        .await
        .map_err(|error| error.to_string())?;
    let mut client = ReplicationClient::new(channel).max_decoding_message_size(64 * 1024 * 1024);
    let (acks, outgoing) = tokio::sync::mpsc::channel::<pb::FollowRequest>(ACKS_QUEUED);
    let first = pb::FollowRequest {
        replica_id: String::new(),
        slots: assignment.slots,
        spans: assignment
            .spans
            .iter()
            .map(|&(lo, hi)| pb::SlotSpan { lo, hi })
            .collect(),
        acked_lsn: 0,
    };
    acks.send(first)
        .await
        .map_err(|_| "the request stream closed".to_owned())?;
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(outgoing));
    if let Some(token) = token {
        let value = format!("Bearer {}", String::from_utf8_lossy(token));
        let value = value
            .parse()
            .map_err(|_| "the peer token is not a valid header".to_owned())?;
        request.metadata_mut().insert("authorization", value);
    }
    let mut stream = client
        .follow(request)
        .await
        .map_err(|status| status.to_string())?
        .into_inner();
    let mut started = false;
    let mut synced = false;
    let gauge = metrics::gauge!(REPLICA_POSITION, "primary" => assignment.primary.clone());
    while let Some(reply) = stream
        .message()
        .await
        .map_err(|status| status.to_string())?
    {
        presence.admit().await.map_err(|error| error.to_string())?;
        let store = Arc::clone(presence);
        let set = slots.clone();
        let fresh = !started;
        started = true;
        let applied = tokio::task::spawn_blocking(move || -> Result<usize, String> {
            if fresh {
                // A new stream starts from a snapshot: what this node held of the slots
                // is replaced by it.
                store.drop_slots(&set);
            }
            for record in &reply.records {
                let change = Change::decode(record).map_err(|error| error.to_string())?;
                store
                    .apply_replicated(&change, &set)
                    .map_err(|error| error.to_string())?;
            }
            Ok(reply.records.len())
        })
        .await
        .map_err(|error| error.to_string())??;
        metrics::counter!(REPLICA_RECORDS).increment(applied as u64);
        gauge.set(reply.lsn as f64);
        if reply.snapshot_done {
            synced = true;
            metrics::counter!(REPLICA_SYNCS).increment(1);
            tracing::info!(primary = %assignment.primary, lsn = reply.lsn, "replica in sync from a snapshot");
        }
        if synced {
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
        }
    }
    Ok(())
}
