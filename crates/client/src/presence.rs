//! Presence calls of the client: login, heartbeats, lookups, gateways, watch.

use futures_core::Stream;
use imstate_proto::v1 as pb;

use crate::{Client, ClientError};

/// One session as the node reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// User id.
    pub uid: u64,
    /// Device name.
    pub device: String,
    /// Gateway name.
    pub gateway: String,
    /// Connection id on the gateway.
    pub conn: u64,
    /// Login time, ms since the Unix epoch (second precision).
    pub login_ms: u64,
    /// Last heartbeat, ms since the Unix epoch.
    pub last_heartbeat_ms: u64,
    /// Time to live without a heartbeat.
    pub ttl_ms: u32,
    /// Opaque metadata (empty = none).
    pub meta: Vec<u8>,
}

/// A login request.
#[derive(Debug, Clone, Default)]
pub struct LoginArgs {
    /// User id.
    pub uid: u64,
    /// Device name (up to 64 bytes).
    pub device: String,
    /// Gateway name (up to 128 bytes).
    pub gateway: String,
    /// Connection id.
    pub conn: u64,
    /// 0 = the server's default ttl.
    pub ttl_ms: u32,
    /// Opaque metadata (up to 256 bytes).
    pub meta: Vec<u8>,
}

/// The answer to a login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginResult {
    /// The session as stored.
    pub session: Session,
    /// The session it replaced (same uid and device): the gateway should kick it.
    pub replaced: Option<Session>,
}

/// What happened to a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchKind {
    /// Logged in.
    Login,
    /// Logged out.
    Logout,
    /// Expired (no heartbeat within its ttl).
    Expire,
    /// Dropped with its gateway.
    GatewayDown,
}

/// One event of a watch stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchEvent {
    /// What happened.
    pub kind: WatchKind,
    /// The session it happened to.
    pub session: Session,
    /// For a login: the session it replaced.
    pub replaced: Option<Session>,
    /// Position in the node's change log.
    pub lsn: u64,
}

fn session_from(session: pb::Session) -> Session {
    Session {
        uid: session.uid,
        device: session.device,
        gateway: session.gateway,
        conn: session.conn,
        login_ms: session.login_ms,
        last_heartbeat_ms: session.last_heartbeat_ms,
        ttl_ms: session.ttl_ms,
        meta: session.meta,
    }
}

fn missing(what: &str) -> ClientError {
    ClientError::Status {
        code: tonic::Code::Internal,
        message: format!("reply without {what}"),
    }
}

impl Client {
    /// Registers a session.
    pub async fn login(&self, args: LoginArgs) -> Result<LoginResult, ClientError> {
        let request = pb::LoginRequest {
            uid: args.uid,
            device: args.device,
            gateway: args.gateway,
            conn: args.conn,
            ttl_ms: args.ttl_ms,
            meta: args.meta,
        };
        let reply = self.presence.clone().login(request).await?.into_inner();
        self.routes.learn(reply.route);
        Ok(LoginResult {
            session: reply
                .session
                .map(session_from)
                .ok_or_else(|| missing("session"))?,
            replaced: reply.replaced.map(session_from),
        })
    }

    /// Removes the session of (uid, conn) and returns it.
    pub async fn logout(&self, uid: u64, conn: u64) -> Result<Session, ClientError> {
        let reply = self
            .presence
            .clone()
            .logout(pb::LogoutRequest { uid, conn })
            .await?
            .into_inner();
        self.routes.learn(reply.route);
        reply
            .session
            .map(session_from)
            .ok_or_else(|| missing("session"))
    }

    /// Renews the session of (uid, conn).
    pub async fn heartbeat(&self, uid: u64, conn: u64) -> Result<(), ClientError> {
        let reply = self
            .presence
            .clone()
            .heartbeat(pb::HeartbeatRequest { uid, conn })
            .await?
            .into_inner();
        self.routes.learn(reply.route);
        Ok(())
    }

    /// Renews many sessions of `gateway`; returns those the node does not know.
    pub async fn heartbeat_batch(
        &self,
        gateway: &str,
        sessions: &[(u64, u64)],
    ) -> Result<Vec<(u64, u64)>, ClientError> {
        let request = pb::HeartbeatBatchRequest {
            gateway: gateway.to_string(),
            uids: sessions.iter().map(|&(uid, _)| uid).collect(),
            conns: sessions.iter().map(|&(_, conn)| conn).collect(),
        };
        let reply = self
            .presence
            .clone()
            .heartbeat_batch(request)
            .await?
            .into_inner();
        self.routes.learn(reply.route);
        Ok(reply
            .unknown_uids
            .into_iter()
            .zip(reply.unknown_conns)
            .collect())
    }

    /// The sessions of `uid`.
    pub async fn lookup(&self, uid: u64) -> Result<Vec<Session>, ClientError> {
        let reply = self
            .presence
            .clone()
            .lookup(pb::LookupRequest { uid })
            .await?
            .into_inner();
        self.routes.learn(reply.route);
        Ok(reply.sessions.into_iter().map(session_from).collect())
    }

    /// The sessions of each uid, in request order.
    pub async fn lookup_batch(&self, uids: Vec<u64>) -> Result<Vec<Vec<Session>>, ClientError> {
        self.lookup_batch_as(uids, false).await
    }

    /// `LookupBatch`, with `read_replica` as given.
    async fn lookup_batch_as(
        &self,
        uids: Vec<u64>,
        read_replica: bool,
    ) -> Result<Vec<Vec<Session>>, ClientError> {
        let reply = self
            .presence
            .clone()
            .lookup_batch(pb::LookupBatchRequest { uids, read_replica })
            .await?
            .into_inner();
        self.routes.learn(reply.route);
        Ok(reply
            .users
            .into_iter()
            .map(|user| user.sessions.into_iter().map(session_from).collect())
            .collect())
    }

    /// Like [`Self::lookup_batch`] but only counts the sessions found (no conversion), for
    /// load generators.
    pub async fn lookup_batch_count(&self, uids: Vec<u64>) -> Result<usize, ClientError> {
        let reply = self
            .presence
            .clone()
            .lookup_batch(pb::LookupBatchRequest {
                uids,
                read_replica: false,
            })
            .await?
            .into_inner();
        Ok(reply.users.iter().map(|user| user.sessions.len()).sum())
    }

    /// Like [`Self::lookup_batch`], answered by this node also as the in-sync replica of the
    /// uids' slots (cluster mode; see `LookupBatchRequest.read_replica`).
    pub async fn lookup_batch_replica(
        &self,
        uids: Vec<u64>,
    ) -> Result<Vec<Vec<Session>>, ClientError> {
        self.lookup_batch_as(uids, true).await
    }

    /// Drops every session of `gateway`; returns how many.
    pub async fn gateway_down(&self, gateway: &str) -> Result<u64, ClientError> {
        let request = pb::GatewayDownRequest {
            gateway: gateway.to_string(),
        };
        let reply = self
            .presence
            .clone()
            .gateway_down(request)
            .await?
            .into_inner();
        self.routes.learn(reply.route);
        Ok(reply.dropped)
    }

    /// Registers `gateway` with a lease of `ttl_ms`.
    pub async fn gateway_register(&self, gateway: &str, ttl_ms: u32) -> Result<(), ClientError> {
        let request = pb::GatewayRegisterRequest {
            gateway: gateway.to_string(),
            ttl_ms,
        };
        let reply = self
            .presence
            .clone()
            .gateway_register(request)
            .await?
            .into_inner();
        self.routes.learn(reply.route);
        Ok(())
    }

    /// Renews the lease of `gateway`.
    pub async fn gateway_heartbeat(&self, gateway: &str) -> Result<(), ClientError> {
        let request = pb::GatewayHeartbeatRequest {
            gateway: gateway.to_string(),
        };
        let reply = self
            .presence
            .clone()
            .gateway_heartbeat(request)
            .await?
            .into_inner();
        self.routes.learn(reply.route);
        Ok(())
    }

    /// Sessions online.
    pub async fn online_count(&self) -> Result<u64, ClientError> {
        let reply = self
            .presence
            .clone()
            .online_count(pb::OnlineCountRequest {})
            .await?
            .into_inner();
        self.routes.learn(reply.route);
        Ok(reply.sessions)
    }

    /// Streams login / logout / expire events, only of `uids` if not empty, from now on.
    pub async fn watch(&self, uids: Vec<u64>) -> Result<WatchStream, ClientError> {
        self.watch_from(uids, None).await
    }

    /// Streams events like [`Self::watch`], first every event after `from` (a position of an
    /// earlier stream: [`WatchStream::position`]). Returns once the node has registered the
    /// subscription. Refused with `OUT_OF_RANGE` when the node no longer holds those events
    /// (another node's log, or older than its `presence.watch_history_events`): then look
    /// the uids up and watch again without a position.
    pub async fn watch_from(
        &self,
        uids: Vec<u64>,
        from: Option<&WatchPosition>,
    ) -> Result<WatchStream, ClientError> {
        let mut inner = self
            .presence
            .clone()
            .watch(pb::WatchRequest {
                uids,
                resume_lsn: from.map(|from| from.lsn),
                log_id: from.map_or_else(String::new, |from| from.log_id.clone()),
            })
            .await?
            .into_inner();
        let first = inner
            .message()
            .await?
            .ok_or_else(|| missing("the Watch stream's first PROGRESS message"))?;
        if first.kind != pb::watch_event::Kind::Progress as i32 {
            return Err(missing("the Watch stream's first PROGRESS message"));
        }
        Ok(WatchStream {
            inner,
            position: WatchPosition {
                log_id: first.log_id,
                lsn: first.lsn,
            },
        })
    }
}

/// A position in one node's presence log, from which a Watch can resume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchPosition {
    /// The node's presence log id.
    pub log_id: String,
    /// Every event meant for the stream up to this LSN was received.
    pub lsn: u64,
}

/// A Watch stream: domain events, and the position reached (PROGRESS messages move it and are
/// not yielded).
pub struct WatchStream {
    inner: tonic::Streaming<pb::WatchEvent>,
    position: WatchPosition,
}

impl WatchStream {
    /// The newest position this stream reached: resume from it with [`Client::watch_from`].
    pub fn position(&self) -> &WatchPosition {
        &self.position
    }
}

impl Stream for WatchStream {
    type Item = Result<WatchEvent, ClientError>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        loop {
            return match std::pin::Pin::new(&mut self.inner).poll_next(context) {
                Poll::Ready(Some(Ok(event))) => {
                    if event.kind == pb::watch_event::Kind::Progress as i32 {
                        self.position.lsn = self.position.lsn.max(event.lsn);
                        continue;
                    }
                    // Mid-event (more parts follow), the event is not yet wholly received.
                    let through = event.lsn.saturating_sub(u64::from(event.more));
                    let event = convert(event);
                    if event.is_ok() {
                        self.position.lsn = self.position.lsn.max(through);
                    }
                    Poll::Ready(Some(event))
                }
                Poll::Ready(Some(Err(status))) => Poll::Ready(Some(Err(status.into()))),
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            };
        }
    }
}

fn convert(event: pb::WatchEvent) -> Result<WatchEvent, ClientError> {
    let kind = match pb::watch_event::Kind::try_from(event.kind) {
        Ok(pb::watch_event::Kind::Login) => WatchKind::Login,
        Ok(pb::watch_event::Kind::Logout) => WatchKind::Logout,
        Ok(pb::watch_event::Kind::Expire) => WatchKind::Expire,
        Ok(pb::watch_event::Kind::GatewayDown) => WatchKind::GatewayDown,
        _ => return Err(missing("a known event kind")),
    };
    Ok(WatchEvent {
        kind,
        session: event
            .session
            .map(session_from)
            .ok_or_else(|| missing("session"))?,
        replaced: event.replaced.map(session_from),
        lsn: event.lsn,
    })
}
