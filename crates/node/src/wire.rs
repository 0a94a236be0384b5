//! The wire-protocol listener: the hot path in pipelined binary frames (`imstate-wire`).
//!
//! One task per connection runs a loop without per-request tasks or channels:
//!
//! ```text
//!  read whatever arrived ──► decode every complete frame ──► apply each, in order,
//!        ▲                                                   replies into one buffer
//!        │                                                          │
//!        └── one write() of all replies ◄── one durability wait if any presence write
//! ```
//!
//! A client that pipelines D requests therefore costs one read, one write and at most one log
//! wait per burst, which is where gRPC spends its time (HTTP/2 framing and a task per stream).
//! Replies are in request order. A write is acknowledged only once it is durable under the
//! store's fsync policy, as over gRPC: the durability wait comes before the write of the
//! replies, and if it fails the connection is closed without them (the client sees a lost
//! connection, as after a crash). Reads (LookupBatch, OnlineCount) wait too: a change is
//! visible in the registry before its record is durable, and a reply must never show what a
//! crash or a failed log could take back. Sequence values need no wait here: `SeqStore` never
//! hands out a value above a durable `max_seq` (S2).
//!
//! The first frame must be `Hello` (magic, version, token). With a token file configured, the
//! token must be one of it, as for gRPC; a wrong one gets `UNAUTHENTICATED` and the connection
//! is closed. Connections are limited to [`CONNECTIONS_MAX`] (B1); one over it gets
//! `RESOURCE_EXHAUSTED` and is closed.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use imstate_presence::{LoginRequest, SessionRef};
use imstate_wire::codec::{self, LookupReply};
use imstate_wire::{Code, DecodeError, Frame, Request, SessionFields};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::NodeError;
use crate::grpc::edge::Tokens;
use crate::grpc::{EMBEDDED_ROUTE_VERSION, error_code};
use crate::presencestore::PresenceStore;
use crate::seqstore::{SeqStore, namespace_name};

/// Most wire connections open at once (B1).
pub const CONNECTIONS_MAX: usize = 10_000;
/// Bytes asked of each read; the buffer grows beyond it only for a larger frame.
const READ_BYTES_CHUNK: usize = 64 * 1024;
/// Reply bytes after which a burst stops decoding and writes what it has (B1: a burst of
/// large lookups cannot grow the reply buffer without bound).
const REPLY_BYTES_FLUSH: usize = 4 << 20;

/// Metric: wire requests, by `op` and `code` (`OK` or the error code's number).
pub const WIRE_REQUESTS: &str = "imstate_wire_requests_total";
/// Metric: open wire connections.
pub const WIRE_CONNECTIONS: &str = "imstate_wire_connections";

/// What every connection shares.
pub struct WireContext {
    seq: Arc<SeqStore>,
    presence: Arc<PresenceStore>,
    tokens: Option<Arc<Tokens>>,
    connections: AtomicUsize,
}

impl WireContext {
    /// The context of a node's wire listener.
    pub fn new(
        seq: Arc<SeqStore>,
        presence: Arc<PresenceStore>,
        tokens: Option<Arc<Tokens>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            seq,
            presence,
            tokens,
            connections: AtomicUsize::new(0),
        })
    }
}

/// Accepts connections until `stop` turns true; each connection stops at its next read then.
pub async fn serve(listener: TcpListener, context: Arc<WireContext>, stop: watch::Receiver<bool>) {
    let mut accept_stop = stop.clone();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = accept_stop.wait_for(|stop| *stop) => return,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(error) => {
                // EMFILE and friends: log, back off a little, keep serving the others.
                tracing::warn!(%error, "wire accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let context = Arc::clone(&context);
        let stop = stop.clone();
        tokio::spawn(async move {
            let open = context.connections.fetch_add(1, Ordering::Relaxed) + 1;
            metrics::gauge!(WIRE_CONNECTIONS).increment(1.0);
            let result = if open > CONNECTIONS_MAX {
                refuse(stream, open).await
            } else {
                Connection::new(&context).run(stream, stop).await
            };
            if let Err(error) = result {
                tracing::debug!(%error, "wire connection ended");
            }
            context.connections.fetch_sub(1, Ordering::Relaxed);
            metrics::gauge!(WIRE_CONNECTIONS).decrement(1.0);
        });
    }
}

async fn refuse(mut stream: TcpStream, open: usize) -> std::io::Result<()> {
    let mut out = Vec::new();
    codec::reply_error(
        &mut out,
        Code::RESOURCE_EXHAUSTED,
        &format!("{open} wire connections open; CONNECTIONS_MAX is {CONNECTIONS_MAX}"),
    );
    stream.write_all(&out).await
}

/// Counts of one burst, flushed to the metrics once per burst (a metrics call per request
/// would cost more than the request).
#[derive(Default)]
struct Tally {
    ok: [u64; codec::Op::ALL.len()],
    errors: Vec<(codec::Op, Code)>,
}

/// The `code="OK"` counter of each op, registered once: looking a labelled counter up costs
/// more than a `Next`.
fn ok_counters() -> &'static [metrics::Counter; codec::Op::ALL.len()] {
    static COUNTERS: OnceLock<[metrics::Counter; codec::Op::ALL.len()]> = OnceLock::new();
    COUNTERS.get_or_init(|| {
        codec::Op::ALL
            .map(|op| metrics::counter!(WIRE_REQUESTS, "op" => op.name(), "code" => "OK"))
    })
}

impl Tally {
    fn flush(&mut self) {
        let counters = ok_counters();
        for op in codec::Op::ALL {
            let count = std::mem::take(&mut self.ok[op.index()]);
            if count > 0 {
                counters[op.index()].increment(count);
            }
        }
        for (op, code) in self.errors.drain(..) {
            metrics::counter!(WIRE_REQUESTS, "op" => op.name(), "code" => code.0.to_string())
                .increment(1);
        }
    }
}

/// What to do after a request.
enum After {
    Continue,
    /// Write what is buffered, then close (bad Hello, bad framing).
    Close,
}

struct Connection<'c> {
    context: &'c WireContext,
    hello: bool,
    /// Whether a presence write was applied, or presence state read, since the last
    /// durability wait: either must not be answered before what it did or saw is durable.
    unsynced: bool,
    ids: Vec<u64>,
    pairs: Vec<(u64, u64)>,
    /// LookupBatch: sessions encoded in shard order, and where each uid's are.
    scratch: Vec<u8>,
    spans: Vec<Span>,
    out: Vec<u8>,
    tally: Tally,
}

/// Where one uid's encoded sessions sit in the scratch buffer of a LookupBatch.
#[derive(Clone, Copy, Default)]
struct Span {
    start: usize,
    end: usize,
    count: u16,
}

/// A registry session as the codec encodes it.
fn session_fields<'s>(session: &SessionRef<'s>) -> SessionFields<'s> {
    SessionFields {
        uid: session.uid,
        conn: session.conn,
        login_ms: session.login_ms,
        last_heartbeat_ms: session.last_heartbeat_ms,
        ttl_ms: session.ttl_ms,
        device: session.device,
        gateway: session.gateway,
        meta: session.meta,
    }
}

impl<'c> Connection<'c> {
    fn new(context: &'c WireContext) -> Self {
        Self {
            context,
            hello: false,
            unsynced: false,
            ids: Vec::new(),
            pairs: Vec::new(),
            scratch: Vec::new(),
            spans: Vec::new(),
            out: Vec::with_capacity(READ_BYTES_CHUNK),
            tally: Tally::default(),
        }
    }

    async fn run(
        mut self,
        mut stream: TcpStream,
        mut stop: watch::Receiver<bool>,
    ) -> std::io::Result<()> {
        stream.set_nodelay(true)?;
        // One wait for the whole connection: a new one per read would register with the
        // channel every time.
        let stopped = async move {
            let _ = stop.wait_for(|stop| *stop).await;
        };
        tokio::pin!(stopped);
        let mut input: Vec<u8> = Vec::with_capacity(READ_BYTES_CHUNK);
        loop {
            let mut start = 0;
            let mut close = false;
            while self.out.len() < REPLY_BYTES_FLUSH {
                match Frame::split(&input[start..]) {
                    Ok(Some((frame, used))) => {
                        start += used;
                        if let After::Close = self.handle(frame).await {
                            close = true;
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(error) => {
                        let code = match error {
                            DecodeError::FrameTooLarge { .. } => Code::RESOURCE_EXHAUSTED,
                            _ => Code::INVALID_ARGUMENT,
                        };
                        codec::reply_error(&mut self.out, code, &format!("{error}; closing"));
                        close = true;
                        break;
                    }
                }
            }
            input.drain(..start);
            if self.unsynced {
                self.unsynced = false;
                // Negative control: answer before the writes are durable.
                #[cfg(not(feature = "planted-wire-ack-before-durable"))]
                if let Err(error) = self.context.presence.durable().await {
                    // Nothing of this burst may be acknowledged: drop the replies and close.
                    tracing::warn!(%error, "wire: a write did not become durable; closing");
                    return Ok(());
                }
            }
            self.tally.flush();
            if !self.out.is_empty() {
                stream.write_all(&self.out).await?;
                self.out.clear();
            }
            if close {
                return Ok(());
            }
            if Frame::split(&input).ok().flatten().is_some() {
                // The reply buffer filled up before the input was done: go on without reading.
                continue;
            }
            input.reserve(READ_BYTES_CHUNK);
            let read = tokio::select! {
                read = stream.read_buf(&mut input) => read?,
                () = &mut stopped => return Ok(()),
            };
            if read == 0 {
                return Ok(());
            }
        }
    }

    fn error(&mut self, op: codec::Op, error: &NodeError) {
        let code = Code(error_code(error) as u8);
        self.tally.errors.push((op, code));
        codec::reply_error(&mut self.out, code, &error.to_string());
    }

    async fn handle(&mut self, frame: Frame<'_>) -> After {
        let request = match Request::decode(frame) {
            Ok(request) => request,
            Err(error) => {
                let close = !self.hello;
                let message = if close {
                    format!("{error}; closing")
                } else {
                    error.to_string()
                };
                codec::reply_error(&mut self.out, Code::INVALID_ARGUMENT, &message);
                return if close { After::Close } else { After::Continue };
            }
        };
        let op = request.op();
        match request {
            Request::Hello { token } => return self.hello(token),
            _ if !self.hello => {
                codec::reply_error(
                    &mut self.out,
                    Code::UNAUTHENTICATED,
                    "the first frame must be Hello; closing",
                );
                return After::Close;
            }
            Request::Next { namespace, id } => {
                match self.context.seq.next(namespace_name(namespace), id).await {
                    Ok(seq) => codec::reply_next(&mut self.out, seq),
                    Err(error) => return self.failed(op, &error),
                }
            }
            Request::NextBatch { namespace, ids } => {
                ids.read_into(&mut self.ids);
                match self
                    .context
                    .seq
                    .next_batch(namespace_name(namespace), &self.ids)
                    .await
                {
                    Ok(seqs) => codec::reply_next_batch(&mut self.out, &seqs),
                    Err(error) => return self.failed(op, &error),
                }
            }
            Request::Login(fields) => {
                let request = LoginRequest {
                    uid: fields.uid,
                    device: fields.device,
                    gateway: fields.gateway,
                    conn: fields.conn,
                    ttl_ms: fields.ttl_ms,
                    meta: fields.meta,
                };
                match self.context.presence.login_applied(&request) {
                    Ok(outcome) => {
                        self.unsynced = true;
                        codec::reply_login(
                            &mut self.out,
                            &session_fields(&outcome.session.as_ref()),
                            outcome
                                .replaced
                                .as_ref()
                                .map(|replaced| session_fields(&replaced.as_ref()))
                                .as_ref(),
                        );
                    }
                    Err(error) => return self.failed(op, &error),
                }
            }
            Request::Logout { uid, conn } => {
                match self.context.presence.logout_applied(uid, conn) {
                    Ok(session) => {
                        self.unsynced = true;
                        codec::reply_logout(&mut self.out, &session_fields(&session.as_ref()));
                    }
                    Err(error) => return self.failed(op, &error),
                }
            }
            Request::Heartbeat { uid, conn } => {
                match self.context.presence.heartbeat_applied(uid, conn) {
                    Ok(()) => {
                        self.unsynced = true;
                        codec::reply_heartbeat(&mut self.out);
                    }
                    Err(error) => return self.failed(op, &error),
                }
            }
            Request::HeartbeatBatch { gateway, sessions } => {
                sessions.read_into(&mut self.pairs);
                match self
                    .context
                    .presence
                    .heartbeat_batch_applied(gateway, &self.pairs)
                {
                    Ok(unknown) => {
                        self.unsynced = true;
                        codec::reply_heartbeat_batch(&mut self.out, &unknown);
                    }
                    Err(error) => return self.failed(op, &error),
                }
            }
            Request::LookupBatch { uids } => {
                uids.read_into(&mut self.ids);
                // Sessions arrive borrowed and grouped by shard: encode each uid's into the
                // scratch buffer, note where they went, then copy them out in request order.
                let (scratch, spans) = (&mut self.scratch, &mut self.spans);
                scratch.clear();
                spans.clear();
                spans.resize(self.ids.len(), Span::default());
                let visited =
                    self.context
                        .presence
                        .lookup_batch_visit(&self.ids, |position, session| {
                            let span = &mut spans[position];
                            if span.count == 0 {
                                span.start = scratch.len();
                            } else if span.count == u16::MAX {
                                // The frame counts sessions per uid in a u16, which is also the
                                // registry's ceiling for `sessions_per_uid_max`.
                                return;
                            }
                            span.count += 1;
                            codec::put_session(scratch, &session_fields(&session));
                            span.end = scratch.len();
                        });
                if let Err(error) = visited {
                    return self.failed(op, &error);
                }
                // Answered only once what it shows is durable (the burst's one wait).
                self.unsynced = true;
                let mut reply = LookupReply::begin(&mut self.out, self.ids.len());
                for span in &self.spans {
                    reply.uid_encoded(span.count, &self.scratch[span.start..span.end]);
                }
                reply.end();
            }
            Request::OnlineCount => {
                codec::reply_online_count(&mut self.out, self.context.presence.online_count_now());
                // Answered only once what it counted is durable (the burst's one wait).
                self.unsynced = true;
            }
        }
        self.tally.ok[op.index()] += 1;
        After::Continue
    }

    fn failed(&mut self, op: codec::Op, error: &NodeError) -> After {
        self.error(op, error);
        After::Continue
    }

    fn hello(&mut self, token: &[u8]) -> After {
        if self.hello {
            codec::reply_error(
                &mut self.out,
                Code::INVALID_ARGUMENT,
                "Hello was already sent on this connection",
            );
            return After::Continue;
        }
        if let Some(tokens) = &self.context.tokens
            && !tokens.accepts(token)
        {
            let reason = if token.is_empty() {
                "missing"
            } else {
                "invalid"
            };
            metrics::counter!(crate::metrics::AUTH_REJECTED, "reason" => reason).increment(1);
            self.tally
                .errors
                .push((codec::Op::Hello, Code::UNAUTHENTICATED));
            codec::reply_error(
                &mut self.out,
                Code::UNAUTHENTICATED,
                &format!("{reason} bearer token; closing"),
            );
            return After::Close;
        }
        self.hello = true;
        self.tally.ok[codec::Op::Hello.index()] += 1;
        codec::reply_hello(&mut self.out, EMBEDDED_ROUTE_VERSION);
        After::Continue
    }
}
