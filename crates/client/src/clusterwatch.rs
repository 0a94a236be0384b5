//! A Watch of some uids across a cluster that follows their slots' primaries.
//!
//! ```text
//!  watch(uids) ──► uids grouped by slot primary ──► one follow task per group:
//!    open Watch(uids) at the primary (resuming from the group's position if it has one)
//!      events ──► the caller (ClusterWatchItem::Event); the position moves with them and
//!                 with the stream's PROGRESS messages
//!      stream ends or fails (primary deposed or dead, connection cut)
//!        ──► refresh the route table ──► the group's primary (split if its uids moved apart)
//!        ──► open again with the position: the same node resumes with nothing lost;
//!            another node (a promoted replica) or a position it no longer holds refuses
//!            (OUT_OF_RANGE) ──► open without a position, look the uids up
//!            ──► ClusterWatchItem::Gap { uids, their sessions now }
//! ```
//!
//! What a caller can rely on: for every uid, the events it receives are in log order, and
//! wherever events may have been lost (a promotion: the new primary holds the sessions but
//! not the old primary's event history) it receives a `Gap` with that uid's sessions as read
//! after the new stream started, so state built from events plus gaps converges to the
//! registry's. Events already reflected in a gap's sessions may follow it (at-least-once
//! around a gap); elsewhere each event arrives once.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{mpsc, oneshot};

use crate::{ClientError, ClusterClient, Session, WatchEvent, WatchPosition};

/// Pause before opening a group's stream again after it ended or failed.
const REOPEN_PAUSE: Duration = Duration::from_millis(200);
/// Items queued towards the caller; a caller that stops reading holds the follow tasks back
/// (and, after the node's own bound, its streams are cut off and resumed from the history).
const ITEMS_QUEUED: usize = 1_024;

/// What a cluster Watch yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterWatchItem {
    /// An event of a watched uid.
    Event(WatchEvent),
    /// Events of `uids` may have been lost (their slot's primary changed, or a node could
    /// not resume the stream): `sessions` holds each uid's sessions now, in the order of
    /// `uids`, read after the new stream started.
    Gap {
        /// The uids concerned.
        uids: Vec<u64>,
        /// Their sessions now.
        sessions: Vec<Vec<Session>>,
        /// Why events may have been lost (the node's refusal, or the failure of the stream).
        reason: String,
    },
}

/// A cluster Watch; dropping it ends its streams (every follow task ends once the
/// receiver is gone).
pub struct ClusterWatch {
    items: mpsc::Receiver<ClusterWatchItem>,
}

impl ClusterWatch {
    /// The next item (`None` only after every stream's task ended, which happens only if
    /// the route table or a node refuses the uids for good).
    pub async fn next(&mut self) -> Option<ClusterWatchItem> {
        self.items.recv().await
    }
}

impl ClusterClient {
    /// Watches the events of `uids` (1 to the nodes' `presence.watch_uids_max` per
    /// primary) at their slots' primaries, following each slot to its new primary when it
    /// moves; see [`ClusterWatchItem`] for what is delivered. Returns once every primary has
    /// registered its stream (events from then on), or the first error opening one.
    pub async fn watch(&self, uids: Vec<u64>) -> Result<ClusterWatch, ClientError> {
        if uids.is_empty() {
            return Err(ClientError::Options {
                what: "watch".into(),
                reason: "a cluster Watch follows the primaries of some uids: name at least one \
                         (every event of one node: Client::watch with no uids)"
                    .into(),
            });
        }
        let (sender, items) = mpsc::channel(ITEMS_QUEUED);
        let mut groups: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        for (uid, owner) in uids.iter().zip(self.slot_owners(&uids).await) {
            groups.entry(owner).or_default().push(*uid);
        }
        let mut opened = Vec::new();
        for (address, uids) in groups {
            let (ready, ready_rx) = oneshot::channel();
            opened.push(ready_rx);
            tokio::spawn(follow(
                self.clone(),
                address,
                uids,
                None,
                sender.clone(),
                Some(ready),
            ));
        }
        let watch = ClusterWatch { items };
        for ready in opened {
            match tokio::time::timeout(crate::cluster::CALL_DEADLINE, ready).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(error))) => return Err(error),
                Ok(Err(_)) | Err(_) => {
                    return Err(ClientError::Connection {
                        reason: "no Watch stream could be opened within the call deadline".into(),
                    });
                }
            }
        }
        Ok(watch)
    }
}

/// Follows one group of uids: see the module doc. `ready` is answered once the first stream
/// is open (or with the error that made opening it hopeless). Ends when the caller drops its
/// [`ClusterWatch`].
fn follow(
    client: ClusterClient,
    address: String,
    uids: Vec<u64>,
    position: Option<WatchPosition>,
    sender: mpsc::Sender<ClusterWatchItem>,
    ready: Option<oneshot::Sender<Result<(), ClientError>>>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    Box::pin(async move {
        tokio::select! {
            () = follow_loop(client, address, uids, position, sender.clone(), ready) => {}
            () = sender.closed() => {}
        }
    })
}

async fn follow_loop(
    client: ClusterClient,
    mut address: String,
    mut uids: Vec<u64>,
    mut position: Option<WatchPosition>,
    sender: mpsc::Sender<ClusterWatchItem>,
    mut ready: Option<oneshot::Sender<Result<(), ClientError>>>,
) {
    // Why events may have been lost, to report once the next stream is open.
    let mut gap: Option<String> = None;
    loop {
        let opened = match client.client(&address).await {
            Ok(node) => node.watch_from(uids.clone(), position.as_ref()).await,
            Err(error) => Err(error),
        };
        match opened {
            Ok(mut stream) => {
                if let Some(ready) = ready.take() {
                    let _ = ready.send(Ok(()));
                }
                if let Some(reason) = gap.take() {
                    let Ok(sessions) = client.lookup_batch(uids.clone()).await else {
                        // The state could not be read: the gap stands; open again.
                        gap = Some(reason);
                        position = None;
                        tokio::time::sleep(REOPEN_PAUSE).await;
                        continue;
                    };
                    let item = ClusterWatchItem::Gap {
                        uids: uids.clone(),
                        sessions,
                        reason,
                    };
                    if sender.send(item).await.is_err() {
                        return;
                    }
                }
                // Deposed, stopped, cut off or cut: the loop ends, follow the slots' primary.
                while let Some(Ok(event)) = stream.next().await {
                    if sender.send(ClusterWatchItem::Event(event)).await.is_err() {
                        return;
                    }
                }
                position = Some(stream.position().clone());
            }
            Err(ClientError::Status {
                code: tonic::Code::OutOfRange,
                message,
            }) => {
                // This node cannot resume the position: open without one, then report the gap.
                position = None;
                gap = Some(message);
                continue;
            }
            Err(error) => {
                let routing = matches!(
                    error,
                    ClientError::Moved { .. } | ClientError::Connect { .. }
                ) || error.code() == Some(tonic::Code::Unavailable);
                if !routing && let Some(ready) = ready.take() {
                    // The first open, refused for a reason that is the caller's (bad uids).
                    let _ = ready.send(Err(error));
                    return;
                }
            }
        }
        tokio::time::sleep(REOPEN_PAUSE).await;
        client.refresh_any().await;
        let mut owners: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        for (uid, owner) in uids.iter().zip(client.slot_owners(&uids).await) {
            owners.entry(owner).or_default().push(*uid);
        }
        let mut owners = owners.into_iter();
        let (owner, group) = owners.next().expect("a group has uids");
        // The uids moved apart: every other group follows on its own, from this position
        // (which only this node's log can resume: elsewhere it reports a gap).
        for (other, group) in owners {
            tokio::spawn(follow(
                client.clone(),
                other,
                group,
                position.clone(),
                sender.clone(),
                None,
            ));
        }
        address = owner;
        uids = group;
    }
}
