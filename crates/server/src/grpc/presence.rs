//! The presence service over gRPC, including the Watch stream.
//!
//! Watch streams read from the store's [`imstate_node::watch::WatchHub`] through one forwarding task
//! each: tonic takes messages only as fast as HTTP/2 flow control lets it send, so a stalled
//! subscriber falls behind in the hub (memory bounded by `watch_buffer_events` per
//! subscriber) and then receives RESOURCE_EXHAUSTED and the stream ends. When the node stops,
//! every stream ends at once with UNAVAILABLE, read or not.
//!
//! Positions: every stream starts with a PROGRESS message (its start LSN and the node's
//! presence log id) and sends another about once a second ([`WATCH_PROGRESS_INTERVAL`]) when
//! its subscriber has received everything meant for it, so that even a subscriber whose uids
//! are quiet holds a recent position. A client that reconnects names the newest position it
//! saw and gets every event after it from the hub's history, or OUT_OF_RANGE when those
//! events are gone (another log, or older than `watch_history_events`).
//!
//! Cluster mode: a Watch of uids is served by the primary of their slots only (anything else
//! is refused like a write, with a redirect), and ends once this node no longer may serve
//! them (checked with each PROGRESS), so a smart client follows the primary. An unfiltered
//! Watch shows the events of this node's primary slots.

use std::collections::HashSet;
use std::sync::Arc;

use imstate_presence::{Event, Session};
use imstate_proto::v1 as pb;
use imstate_proto::v1::presence_server::Presence;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::{presence_route, status_from};
use imstate_node::NodeError;
use imstate_node::presencestore::PresenceStore;
use imstate_node::watch::{Subscriber, WatchEnd, WatchRefused};

/// The presence service.
pub struct PresenceService {
    store: Arc<PresenceStore>,
    /// The presence log's id (`presence/LOG_ID`), which Watch positions name.
    log_id: Arc<str>,
}

impl PresenceService {
    /// Serves `store`, whose log is `log_id`.
    pub fn new(store: Arc<PresenceStore>, log_id: &str) -> Self {
        Self {
            store,
            log_id: Arc::from(log_id),
        }
    }
}

fn session_to_pb(session: &Session) -> pb::Session {
    pb::Session {
        uid: session.uid,
        device: session.device.to_string(),
        gateway: session.gateway.to_string(),
        conn: session.conn,
        login_ms: session.login_ms,
        last_heartbeat_ms: session.last_heartbeat_ms,
        ttl_ms: session.ttl_ms,
        meta: session
            .meta
            .as_deref()
            .map(<[u8]>::to_vec)
            .unwrap_or_default(),
    }
}

fn invalid(message: &str) -> Status {
    Status::invalid_argument(message.to_string())
}

#[tonic::async_trait]
impl Presence for PresenceService {
    async fn login(
        &self,
        request: Request<pb::LoginRequest>,
    ) -> Result<Response<pb::LoginReply>, Status> {
        let request = request.into_inner();
        let meta = (!request.meta.is_empty()).then_some(request.meta.as_slice());
        let outcome = self
            .store
            .login(
                request.uid,
                &request.device,
                &request.gateway,
                request.conn,
                request.ttl_ms,
                meta,
            )
            .await
            .map_err(status_from)?;
        Ok(Response::new(pb::LoginReply {
            session: Some(session_to_pb(&outcome.session)),
            replaced: outcome.replaced.as_ref().map(session_to_pb),
            route: presence_route(),
        }))
    }

    async fn logout(
        &self,
        request: Request<pb::LogoutRequest>,
    ) -> Result<Response<pb::LogoutReply>, Status> {
        let request = request.into_inner();
        let session = self
            .store
            .logout(request.uid, request.conn)
            .await
            .map_err(status_from)?;
        Ok(Response::new(pb::LogoutReply {
            session: Some(session_to_pb(&session)),
            route: presence_route(),
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatReply>, Status> {
        let request = request.into_inner();
        self.store
            .heartbeat(request.uid, request.conn)
            .await
            .map_err(status_from)?;
        Ok(Response::new(pb::HeartbeatReply {
            route: presence_route(),
        }))
    }

    async fn heartbeat_batch(
        &self,
        request: Request<pb::HeartbeatBatchRequest>,
    ) -> Result<Response<pb::HeartbeatBatchReply>, Status> {
        let request = request.into_inner();
        if request.uids.len() != request.conns.len() {
            return Err(invalid("uids and conns must have the same length"));
        }
        let sessions: Vec<(u64, u64)> = request.uids.into_iter().zip(request.conns).collect();
        let unknown = self
            .store
            .heartbeat_batch(&request.gateway, &sessions)
            .await
            .map_err(status_from)?;
        Ok(Response::new(pb::HeartbeatBatchReply {
            unknown_uids: unknown.iter().map(|&(uid, _)| uid).collect(),
            unknown_conns: unknown.iter().map(|&(_, conn)| conn).collect(),
            route: presence_route(),
        }))
    }

    async fn lookup(
        &self,
        request: Request<pb::LookupRequest>,
    ) -> Result<Response<pb::LookupReply>, Status> {
        let sessions = self
            .store
            .lookup(request.into_inner().uid)
            .await
            .map_err(status_from)?;
        Ok(Response::new(pb::LookupReply {
            sessions: sessions.iter().map(session_to_pb).collect(),
            route: presence_route(),
        }))
    }

    async fn lookup_batch(
        &self,
        request: Request<pb::LookupBatchRequest>,
    ) -> Result<Response<pb::LookupBatchReply>, Status> {
        let request = request.into_inner();
        let uids = request.uids;
        let found = if request.read_replica {
            self.store.lookup_batch_replica(&uids).await
        } else {
            self.store.lookup_batch(&uids).await
        }
        .map_err(status_from)?;
        let users = uids
            .iter()
            .zip(found)
            .map(|(&uid, sessions)| pb::UserSessions {
                uid,
                sessions: sessions.iter().map(session_to_pb).collect(),
            })
            .collect();
        Ok(Response::new(pb::LookupBatchReply {
            users,
            route: presence_route(),
        }))
    }

    async fn gateway_down(
        &self,
        request: Request<pb::GatewayDownRequest>,
    ) -> Result<Response<pb::GatewayDownReply>, Status> {
        let gateway = request.into_inner().gateway;
        let dropped = self
            .store
            .gateway_down(&gateway)
            .await
            .map_err(status_from)?;
        Ok(Response::new(pb::GatewayDownReply {
            dropped: dropped as u64,
            route: presence_route(),
        }))
    }

    async fn gateway_register(
        &self,
        request: Request<pb::GatewayRegisterRequest>,
    ) -> Result<Response<pb::GatewayReply>, Status> {
        let request = request.into_inner();
        self.store
            .gateway_register(&request.gateway, request.ttl_ms)
            .await
            .map_err(status_from)?;
        Ok(Response::new(pb::GatewayReply {
            route: presence_route(),
        }))
    }

    async fn gateway_heartbeat(
        &self,
        request: Request<pb::GatewayHeartbeatRequest>,
    ) -> Result<Response<pb::GatewayReply>, Status> {
        let gateway = request.into_inner().gateway;
        self.store
            .gateway_heartbeat(&gateway)
            .await
            .map_err(status_from)?;
        Ok(Response::new(pb::GatewayReply {
            route: presence_route(),
        }))
    }

    async fn online_count(
        &self,
        _request: Request<pb::OnlineCountRequest>,
    ) -> Result<Response<pb::OnlineCountReply>, Status> {
        Ok(Response::new(pb::OnlineCountReply {
            sessions: self.store.online_count().await.map_err(status_from)?,
            route: presence_route(),
        }))
    }

    type WatchStream = ReceiverStream<Result<pb::WatchEvent, Status>>;

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let request = request.into_inner();
        let uids: HashSet<u64> = request.uids.iter().copied().collect();
        if let Some(reason) = &*self.store.fatal().borrow() {
            return Err(status_from(NodeError::Unavailable(reason.clone())));
        }
        self.store
            .recheck(request.uids.iter().copied())
            .map_err(status_from)?;
        if request.resume_lsn.is_some() && request.log_id != *self.log_id {
            return Err(Status::out_of_range(format!(
                "cannot resume a Watch position of presence log {:?} here: this node's log is \
                 {:?} (another node, or a restored data directory); events after it are not \
                 held here: look the uids up and watch again without a position",
                request.log_id, self.log_id
            )));
        }
        let subscriber = self
            .store
            .watch()
            .subscribe_from(uids, request.resume_lsn)
            .map_err(|refused| match refused {
                WatchRefused::Stopping => Status::unavailable(refused.to_string()),
                WatchRefused::Gone { .. } | WatchRefused::Ahead { .. } => {
                    Status::out_of_range(refused.to_string())
                }
                _ => Status::resource_exhausted(refused.to_string()),
            })?;
        // A forwarding task per subscriber: it waits on the hub and on the client's flow
        // control at once, so a stop reaches a subscriber whose client does not read.
        let (sender, receiver) = mpsc::channel(WATCH_FORWARD_EVENTS);
        let first = progress(subscriber.start(), &self.log_id);
        sender
            .try_send(Ok(first))
            .expect("a new channel has room for its first message");
        tokio::spawn(forward(
            Arc::clone(&self.store),
            subscriber,
            request.uids,
            Arc::clone(&self.log_id),
            sender,
        ));
        Ok(Response::new(ReceiverStream::new(receiver)))
    }
}

/// Messages queued between a subscriber's forwarding task and its gRPC stream.
const WATCH_FORWARD_EVENTS: usize = 64;

/// How often an idle Watch stream gets a PROGRESS message (and, in cluster mode, checks that
/// this node still serves its uids).
pub const WATCH_PROGRESS_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

fn progress(lsn: u64, log_id: &str) -> pb::WatchEvent {
    pb::WatchEvent {
        kind: pb::watch_event::Kind::Progress as i32,
        session: None,
        replaced: None,
        lsn,
        log_id: log_id.to_string(),
        more: false,
    }
}

/// Moves one subscriber's events to its stream, one message per session, until the
/// subscription ends (then a final status: RESOURCE_EXHAUSTED when it fell behind,
/// UNAVAILABLE when the node stops or its log fails) or the client goes away. An event is
/// sent only once its record is durable: a subscriber never sees a change that a crash or a
/// failed log could take back.
async fn forward(
    store: Arc<PresenceStore>,
    mut subscriber: Subscriber,
    uids: Vec<u64>,
    log_id: Arc<str>,
    sender: mpsc::Sender<Result<pb::WatchEvent, Status>>,
) {
    use pb::watch_event::Kind;
    let mut position = subscriber.start();
    let mut tick = tokio::time::interval(WATCH_PROGRESS_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.reset();
    loop {
        let published = tokio::select! {
            received = subscriber.recv() => received,
            () = sender.closed() => return,
            _ = tick.tick() => {
                if let Err(error) = store.recheck(uids.iter().copied()) {
                    let _ = sender.try_send(Err(status_from(error)));
                    return;
                }
                let Some(idle) = subscriber.idle_position().filter(|idle| *idle > position)
                else {
                    continue;
                };
                // A position is only handed out once durable: after a crash the log never
                // issues an LSN at or below it again.
                if let Err(error) = store.log().durable(idle).await {
                    let _ = sender.try_send(Err(status_from(NodeError::Log(error))));
                    return;
                }
                position = idle;
                if sender.send(Ok(progress(idle, &log_id))).await.is_err() {
                    return;
                }
                continue;
            }
        };
        let published = match published {
            Ok(published) => published,
            Err(end) => {
                let status = match end {
                    WatchEnd::Lagged { .. } => Status::resource_exhausted(end.to_string()),
                    WatchEnd::Stopping | WatchEnd::Closed => Status::unavailable(end.to_string()),
                };
                // The client may not be reading: never wait for it past the stop.
                let _ = sender.try_send(Err(status));
                return;
            }
        };
        let (kind, sessions, replaced): (Kind, &[Session], Option<&Session>) =
            match &*published.event {
                Event::Login { session, replaced } => (
                    Kind::Login,
                    std::slice::from_ref(session),
                    replaced.as_ref(),
                ),
                Event::Logout { session } => (Kind::Logout, std::slice::from_ref(session), None),
                Event::Expire { session } => (Kind::Expire, std::slice::from_ref(session), None),
                Event::GatewayDown { sessions, .. } => (Kind::GatewayDown, sessions, None),
                Event::GatewayUnregister { .. } => continue,
            };
        if let Err(error) = store.log().durable(published.lsn).await {
            let _ = sender.try_send(Err(status_from(NodeError::Log(error))));
            return;
        }
        position = published.lsn;
        let wanted: Vec<&Session> = sessions
            .iter()
            .filter(|session| subscriber.wants(session.uid))
            .collect();
        for (index, session) in wanted.iter().enumerate() {
            let event = pb::WatchEvent {
                kind: kind as i32,
                session: Some(session_to_pb(session)),
                replaced: replaced.map(session_to_pb),
                lsn: published.lsn,
                log_id: String::new(),
                more: index + 1 < wanted.len(),
            };
            let sent = tokio::select! {
                sent = sender.send(Ok(event)) => sent.is_ok(),
                end = subscriber.stopped() => {
                    let _ = sender.try_send(Err(Status::unavailable(end.to_string())));
                    false
                }
            };
            if !sent {
                return;
            }
        }
    }
}
