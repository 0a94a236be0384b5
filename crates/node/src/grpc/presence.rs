//! The presence service over gRPC, including the Watch stream.
//!
//! Watch streams read straight from the store's fixed-size broadcast ring: tonic polls the
//! stream only as fast as HTTP/2 flow control lets it send, so a stalled subscriber simply falls
//! behind in the ring (memory stays bounded by `watch_buffer_events`, whatever the number of
//! subscribers) and, when it next reads, receives RESOURCE_EXHAUSTED and the stream ends.

use std::collections::{HashSet, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use imstate_presence::{Event, Session};
use imstate_proto::v1 as pb;
use imstate_proto::v1::presence_server::Presence;
use tokio_stream::Stream;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tonic::{Request, Response, Status};

use super::{presence_route, status_from};
use crate::NodeError;
use crate::presencestore::{PresenceStore, Published};

/// The presence service.
pub struct PresenceService {
    store: Arc<PresenceStore>,
}

impl PresenceService {
    /// Serves `store`.
    pub fn new(store: Arc<PresenceStore>) -> Self {
        Self { store }
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
        let sessions = self.store.lookup(request.into_inner().uid);
        Ok(Response::new(pb::LookupReply {
            sessions: sessions.iter().map(session_to_pb).collect(),
            route: presence_route(),
        }))
    }

    async fn lookup_batch(
        &self,
        request: Request<pb::LookupBatchRequest>,
    ) -> Result<Response<pb::LookupBatchReply>, Status> {
        let uids = request.into_inner().uids;
        let found = self.store.lookup_batch(&uids).map_err(status_from)?;
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
            sessions: self.store.online_count(),
            route: presence_route(),
        }))
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let uids: HashSet<u64> = request.into_inner().uids.into_iter().collect();
        if let Some(reason) = &*self.store.fatal().borrow() {
            return Err(status_from(NodeError::Unavailable(reason.clone())));
        }
        Ok(Response::new(WatchStream {
            inner: BroadcastStream::new(self.store.subscribe()),
            uids,
            pending: VecDeque::new(),
            buffer: self.store.watch_buffer_events(),
            done: false,
        }))
    }
}

/// A subscriber's stream: events from the broadcast ring, filtered, flattened to one message
/// per session.
pub struct WatchStream {
    inner: BroadcastStream<Published>,
    uids: HashSet<u64>,
    pending: VecDeque<pb::WatchEvent>,
    buffer: usize,
    done: bool,
}

impl WatchStream {
    fn push(&mut self, published: &Published) {
        use pb::watch_event::Kind;
        let mut add = |kind: Kind, session: &Session, replaced: Option<&Session>| {
            if self.uids.is_empty() || self.uids.contains(&session.uid) {
                self.pending.push_back(pb::WatchEvent {
                    kind: kind as i32,
                    session: Some(session_to_pb(session)),
                    replaced: replaced.map(session_to_pb),
                    lsn: published.lsn,
                });
            }
        };
        match &*published.event {
            Event::Login { session, replaced } => add(Kind::Login, session, replaced.as_ref()),
            Event::Logout { session } => add(Kind::Logout, session, None),
            Event::Expire { session } => add(Kind::Expire, session, None),
            Event::GatewayDown { sessions, .. } => {
                for session in sessions {
                    add(Kind::GatewayDown, session, None);
                }
            }
            Event::GatewayUnregister { .. } => {}
        }
    }
}

impl Stream for WatchStream {
    type Item = Result<pb::WatchEvent, Status>;

    fn poll_next(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Poll::Ready(Some(Ok(event)));
            }
            if self.done {
                return Poll::Ready(None);
            }
            match Pin::new(&mut self.inner).poll_next(context) {
                Poll::Ready(Some(Ok(published))) => self.push(&published),
                Poll::Ready(Some(Err(BroadcastStreamRecvError::Lagged(missed)))) => {
                    self.done = true;
                    let message = format!(
                        "watch subscriber fell behind by {missed} events (limit \
                         watch_buffer_events = {}); read the state again and re-subscribe",
                        self.buffer
                    );
                    return Poll::Ready(Some(Err(Status::resource_exhausted(message))));
                }
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}
