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
//! With `[tls]` configured the listener speaks TLS (mTLS with `tls.client_ca_file`), with the
//! same certificates as gRPC; the handshake counts against the Hello deadline, and a client
//! that fails it is closed without a reply (a TLS alert says why).
//!
//! The first frame must be `Hello` (magic, version, token). With a token file configured, the
//! token must be one of it, as for gRPC; a wrong one gets `UNAUTHENTICATED` and the connection
//! is closed.
//!
//! What a client can hold of the node is bounded (B1, [`WireLimits`]):
//! - connections: [`CONNECTIONS_MAX`] in all and `connections_per_source_max` per IP address;
//!   one over either gets `RESOURCE_EXHAUSTED` and is closed;
//! - time: `Hello` within `hello_timeout`, then a complete frame (and replies taken) at least
//!   every `idle_timeout`; a slower client gets `DEADLINE_EXCEEDED` and is closed;
//! - memory: before `Hello`, reads are small and a frame may be at most
//!   [`HELLO_FRAME_BYTES_MAX`] (an unauthenticated client cannot make the node buffer 8 MiB);
//!   a frame larger than one read is buffered only within `input_budget_bytes` shared by all
//!   connections; large buffers are given back once their frame or reply is done;
//! - replies: a LookupBatch whose reply would not fit in a frame is refused with
//!   `RESOURCE_EXHAUSTED` before it is built.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use imstate_presence::{LoginRequest, SessionRef};
use imstate_wire::codec::{self, LookupReply};
use imstate_wire::tls::TlsAcceptor;
use imstate_wire::{
    Code, DecodeError, FRAME_BYTES_MAX, Frame, HELLO_FRAME_BYTES_MAX, Request, SessionFields,
};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::grpc::edge::Tokens;
use crate::grpc::error_code;
use imstate_node::NodeError;
use imstate_node::presencestore::PresenceStore;
use imstate_node::seqstore::namespace_name;
use imstate_node::sequences::Sequences;

/// Most wire connections open at once (B1).
pub const CONNECTIONS_MAX: usize = 10_000;
/// Bytes asked of each read; the buffer grows beyond it only for a larger frame.
const READ_BYTES_CHUNK: usize = 64 * 1024;
/// Bytes asked of each read before `Hello`: one whole `Hello` and its length prefix.
const HELLO_READ_BYTES: usize = HELLO_FRAME_BYTES_MAX + 4;
/// A buffer (input, replies, scratch) larger than this after its burst is given back, so one
/// large request does not pin megabytes for the life of the connection.
const BUFFER_KEEP_BYTES: usize = 1 << 20;
/// Longest a closing connection waits to hand its last error frame to the kernel.
const CLOSE_WRITE_TIMEOUT: Duration = Duration::from_secs(1);
/// Reply bytes after which a burst stops decoding and writes what it has (B1: a burst of
/// large lookups cannot grow the reply buffer without bound).
const REPLY_BYTES_FLUSH: usize = 4 << 20;

/// Metric: wire requests, by `op` and `code` (`OK` or the error code's number).
pub const WIRE_REQUESTS: &str = "imstate_wire_requests_total";
/// Metric: open wire connections.
pub const WIRE_CONNECTIONS: &str = "imstate_wire_connections";
/// Metric: wire connections refused or closed by a limit, by `reason` (`connections`,
/// `hello_timeout`, `idle_timeout`, `input_budget`, `tls`: a failed TLS handshake).
pub const WIRE_REFUSED: &str = "imstate_wire_refused_total";

/// The listener's limits, from the configuration section `[wire]` (`WireConfig::to_limits`,
/// which holds the defaults).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WireLimits {
    /// Time from accept to a complete `Hello`.
    pub hello_timeout: Duration,
    /// Longest time without a complete frame, or with replies not taken; `None` = no limit.
    pub idle_timeout: Option<Duration>,
    /// Connections from one IP address.
    pub connections_per_source_max: usize,
    /// Bytes all connections may buffer for frames larger than one read.
    pub input_budget_bytes: usize,
}

/// Open connections by source address, for a per-source limit (shared by the wire and RESP
/// listeners). A mutex, not atomics per address: it is taken once per connect and once per
/// close, never per request.
#[derive(Default)]
pub(crate) struct SourceCounts(Mutex<HashMap<IpAddr, usize>>);

impl SourceCounts {
    /// Counts a connection from `source`, or returns how many are open from it if `max` is
    /// reached (and counts nothing).
    pub(crate) fn admit(&self, source: IpAddr, max: usize) -> Result<(), usize> {
        let mut per_source = self.0.lock();
        let open = per_source.entry(source).or_insert(0);
        if *open >= max {
            return Err(*open);
        }
        *open += 1;
        Ok(())
    }

    /// Counts off a connection [`SourceCounts::admit`] counted.
    pub(crate) fn release(&self, source: IpAddr) {
        let mut per_source = self.0.lock();
        if let Some(open) = per_source.get_mut(&source) {
            *open -= 1;
            if *open == 0 {
                per_source.remove(&source);
            }
        }
    }
}

/// What every connection shares.
pub struct WireContext {
    seq: Sequences,
    presence: Arc<PresenceStore>,
    tokens: Option<Arc<Tokens>>,
    limits: WireLimits,
    /// TLS (and mTLS) of the listener; `None` for plain TCP.
    tls: Option<TlsAcceptor>,
    connections: AtomicUsize,
    per_source: SourceCounts,
    /// Bytes of `input_budget_bytes` held by connections buffering a large frame.
    budget_used: AtomicUsize,
}

impl WireContext {
    /// The context of a node's wire listener.
    pub fn new(
        seq: Sequences,
        presence: Arc<PresenceStore>,
        tokens: Option<Arc<Tokens>>,
        limits: WireLimits,
        tls: Option<TlsAcceptor>,
    ) -> Arc<Self> {
        Arc::new(Self {
            seq,
            presence,
            tokens,
            limits,
            tls,
            connections: AtomicUsize::new(0),
            per_source: SourceCounts::default(),
            budget_used: AtomicUsize::new(0),
        })
    }

    /// Takes `bytes` of the input budget, or returns false if that would go over it.
    fn take_budget(&self, bytes: usize) -> bool {
        let max = self.limits.input_budget_bytes;
        self.budget_used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                (used + bytes <= max).then_some(used + bytes)
            })
            .is_ok()
    }

    fn release_budget(&self, bytes: usize) {
        self.budget_used.fetch_sub(bytes, Ordering::AcqRel);
    }

    /// Serves one admitted connection, after the TLS handshake when TLS is on. `deadline` is
    /// the Hello deadline, which the handshake counts against.
    async fn serve_connection(
        &self,
        stream: TcpStream,
        deadline: tokio::time::Instant,
        mut stop: watch::Receiver<bool>,
    ) -> std::io::Result<()> {
        let Some(acceptor) = &self.tls else {
            return Connection::new(self).run(stream, deadline, stop).await;
        };
        let accepted = tokio::select! {
            accepted = tokio::time::timeout_at(deadline, acceptor.accept(stream)) => accepted,
            _ = stop.wait_for(|stop| *stop) => return Ok(()),
        };
        match accepted {
            Ok(Ok(stream)) => Connection::new(self).run(stream, deadline, stop).await,
            Ok(Err(error)) => {
                metrics::counter!(WIRE_REFUSED, "reason" => "tls").increment(1);
                tracing::debug!(%error, "wire: TLS handshake failed");
                Ok(())
            }
            Err(_) => {
                metrics::counter!(WIRE_REFUSED, "reason" => "hello_timeout").increment(1);
                Ok(())
            }
        }
    }

    /// Refuses a connection over a limit with a `RESOURCE_EXHAUSTED` frame (after a handshake
    /// of at most [`CLOSE_WRITE_TIMEOUT`] when TLS is on, so the client can read it).
    async fn refuse(&self, stream: TcpStream, reason: &str) -> std::io::Result<()> {
        metrics::counter!(WIRE_REFUSED, "reason" => "connections").increment(1);
        let mut out = Vec::new();
        codec::reply_error(
            &mut out,
            Code::RESOURCE_EXHAUSTED,
            &format!("{reason}; closing"),
        );
        match &self.tls {
            None => write_before_close(stream, &out).await,
            Some(acceptor) => {
                match tokio::time::timeout(CLOSE_WRITE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => write_before_close(stream, &out).await,
                    _ => Ok(()),
                }
            }
        }
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
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // EMFILE and friends: log, back off a little, keep serving the others.
                tracing::warn!(%error, "wire accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let context = Arc::clone(&context);
        let stop = stop.clone();
        let deadline = tokio::time::Instant::now() + context.limits.hello_timeout;
        // Requests are small and latency-bound: never wait for Nagle.
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let open = context.connections.fetch_add(1, Ordering::Relaxed) + 1;
            metrics::gauge!(WIRE_CONNECTIONS).increment(1.0);
            let result = if open > CONNECTIONS_MAX {
                context
                    .refuse(
                        stream,
                        &format!(
                            "{open} wire connections open; CONNECTIONS_MAX is {CONNECTIONS_MAX}"
                        ),
                    )
                    .await
            } else {
                match context
                    .per_source
                    .admit(peer.ip(), context.limits.connections_per_source_max)
                {
                    Ok(()) => {
                        let result = context.serve_connection(stream, deadline, stop).await;
                        context.per_source.release(peer.ip());
                        result
                    }
                    Err(open) => {
                        let max = context.limits.connections_per_source_max;
                        let reason = format!(
                            "{open} wire connections open from {}; \
                             wire.connections_per_source_max is {max}",
                            peer.ip()
                        );
                        context.refuse(stream, &reason).await
                    }
                }
            };
            if let Err(error) = result {
                tracing::debug!(%error, "wire connection ended");
            }
            context.connections.fetch_sub(1, Ordering::Relaxed);
            metrics::gauge!(WIRE_CONNECTIONS).decrement(1.0);
        });
    }
}

/// Writes replies. The flush is a no-op on TCP; TLS may hold encrypted records until it.
async fn write_out<S: AsyncWrite + Unpin>(stream: &mut S, bytes: &[u8]) -> std::io::Result<()> {
    stream.write_all(bytes).await?;
    stream.flush().await
}

/// Writes a last frame, waiting at most [`CLOSE_WRITE_TIMEOUT`] for a client that does not
/// read; on TLS, also closes the session (close_notify) so the client reads the frame.
async fn write_before_close<S: AsyncWrite + Unpin>(
    mut stream: S,
    bytes: &[u8],
) -> std::io::Result<()> {
    let write = async {
        stream.write_all(bytes).await?;
        stream.shutdown().await
    };
    match tokio::time::timeout(CLOSE_WRITE_TIMEOUT, write).await {
        Ok(written) => written,
        Err(_) => Ok(()),
    }
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
    /// Uids written since the last durability wait: rechecked after it (cluster mode: a
    /// primary deposed meanwhile acknowledges none of them).
    written: Vec<u64>,
    ids: Vec<u64>,
    pairs: Vec<(u64, u64)>,
    /// LookupBatch: sessions encoded in shard order, and where each uid's are.
    scratch: Vec<u8>,
    spans: Vec<Span>,
    out: Vec<u8>,
    tally: Tally,
    /// Bytes of the shared input budget this connection holds for a frame larger than a read.
    budget_held: usize,
}

impl Drop for Connection<'_> {
    fn drop(&mut self) {
        self.context.release_budget(self.budget_held);
    }
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
            written: Vec::new(),
            ids: Vec::new(),
            pairs: Vec::new(),
            scratch: Vec::new(),
            spans: Vec::new(),
            out: Vec::new(),
            tally: Tally::default(),
            budget_held: 0,
        }
    }

    /// Serves the connection on `stream` (TCP or TLS) until it closes, fails a limit or
    /// `stop` turns true; `hello_deadline` is when a complete Hello must have arrived.
    async fn run<S: AsyncRead + AsyncWrite + Unpin>(
        mut self,
        mut stream: S,
        hello_deadline: tokio::time::Instant,
        mut stop: watch::Receiver<bool>,
    ) -> std::io::Result<()> {
        let limits = self.context.limits;
        // One wait for the whole connection: a new one per read would register with the
        // channel every time.
        let stopped = async move {
            let _ = stop.wait_for(|stop| *stop).await;
        };
        tokio::pin!(stopped);
        let mut input: Vec<u8> = Vec::new();
        // Before Hello: the hello deadline; after it, the idle deadline from the last frame.
        let mut deadline = Some(hello_deadline);
        loop {
            let mut start = 0;
            let mut close = false;
            while self.out.len() < REPLY_BYTES_FLUSH {
                let (max, limit_name) = if self.hello {
                    (FRAME_BYTES_MAX, "FRAME_BYTES_MAX")
                } else {
                    (
                        HELLO_FRAME_BYTES_MAX,
                        "HELLO_FRAME_BYTES_MAX, until Hello is answered",
                    )
                };
                match Frame::split_limited(&input[start..], max) {
                    Ok(Some((frame, used))) => {
                        start += used;
                        if let After::Close = self.handle(frame).await {
                            close = true;
                            break;
                        }
                        if self.hello {
                            deadline = limits
                                .idle_timeout
                                .map(|idle| tokio::time::Instant::now() + idle);
                        }
                    }
                    Ok(None) => break,
                    Err(error) => {
                        let (code, message) = match error {
                            DecodeError::FrameTooLarge { .. } => (
                                Code::RESOURCE_EXHAUSTED,
                                format!("{error} ({limit_name}); closing"),
                            ),
                            _ => (Code::INVALID_ARGUMENT, format!("{error}; closing")),
                        };
                        codec::reply_error(&mut self.out, code, &message);
                        close = true;
                        break;
                    }
                }
            }
            input.drain(..start);
            self.release_input(&mut input);
            if self.unsynced {
                self.unsynced = false;
                // Negative control: answer before the writes are durable.
                #[cfg(not(feature = "planted-wire-ack-before-durable"))]
                if let Err(error) = self.context.presence.durable().await {
                    // Nothing of this burst may be acknowledged: drop the replies and close.
                    // The node logs the log's failure once, as it stops; not once per connection.
                    tracing::debug!(%error, "wire: a write did not become durable; closing");
                    return Ok(());
                }
                // Deposed while the burst was in flight: its writes' outcome is unknown.
                if let Err(error) = self.context.presence.recheck(self.written.drain(..)) {
                    tracing::info!(%error, "wire: this node lost presence slots while writes were in flight; closing without answering them");
                    return Ok(());
                }
            }
            self.tally.flush();
            if !self.out.is_empty() {
                // A client that does not take its replies is as idle as one that sends nothing.
                match limits.idle_timeout {
                    Some(idle) => {
                        match tokio::time::timeout(idle, write_out(&mut stream, &self.out)).await {
                            Ok(written) => written?,
                            Err(_) => {
                                metrics::counter!(WIRE_REFUSED, "reason" => "idle_timeout")
                                    .increment(1);
                                return Ok(());
                            }
                        }
                    }
                    None => write_out(&mut stream, &self.out).await?,
                }
                self.out.clear();
            }
            self.give_back();
            if close {
                return Ok(());
            }
            if Frame::split(&input).ok().flatten().is_some() {
                // The reply buffer filled up before the input was done: go on without reading.
                continue;
            }
            if let Err(reason) = self.make_room(&mut input) {
                metrics::counter!(WIRE_REFUSED, "reason" => "input_budget").increment(1);
                codec::reply_error(&mut self.out, Code::RESOURCE_EXHAUSTED, &reason);
                return write_before_close(&mut stream, &self.out).await;
            }
            let expired = async {
                match deadline {
                    Some(deadline) => tokio::time::sleep_until(deadline).await,
                    None => std::future::pending().await,
                }
            };
            let read = tokio::select! {
                read = stream.read_buf(&mut input) => read?,
                () = &mut stopped => return Ok(()),
                () = expired => {
                    let (reason, message) = self.expired_message();
                    metrics::counter!(WIRE_REFUSED, "reason" => reason).increment(1);
                    codec::reply_error(&mut self.out, Code::DEADLINE_EXCEEDED, &message);
                    return write_before_close(&mut stream, &self.out).await;
                }
            };
            if read == 0 {
                return Ok(());
            }
        }
    }

    /// The metric reason and the message of a connection closed by its deadline.
    fn expired_message(&self) -> (&'static str, String) {
        let limits = self.context.limits;
        if self.hello {
            let idle_ms = limits.idle_timeout.unwrap_or_default().as_millis();
            (
                "idle_timeout",
                format!("no complete frame for {idle_ms} ms (wire.idle_timeout_ms); closing"),
            )
        } else {
            let hello_ms = limits.hello_timeout.as_millis();
            (
                "hello_timeout",
                format!(
                    "no Hello within {hello_ms} ms of connecting (wire.hello_timeout_ms); closing"
                ),
            )
        }
    }

    /// Makes room in `input` for the next read: a small read before `Hello`, one chunk after
    /// it, or the rest of a frame larger than a chunk, which must fit in the input budget
    /// shared by all connections (held until the frame is done).
    fn make_room(&mut self, input: &mut Vec<u8>) -> Result<(), String> {
        if !self.hello {
            input.reserve_exact(HELLO_READ_BYTES.saturating_sub(input.len()).max(1));
            return Ok(());
        }
        let frame_bytes = Frame::declared_len(input).map_or(0, |len| len + 4);
        if frame_bytes <= READ_BYTES_CHUNK {
            input.reserve(READ_BYTES_CHUNK);
            return Ok(());
        }
        if self.budget_held < frame_bytes {
            let more = frame_bytes - self.budget_held;
            if !self.context.take_budget(more) {
                return Err(format!(
                    "a frame of {frame_bytes} bytes does not fit in what is left of the node's \
                     wire input budget (wire.input_budget_bytes = {}); retry later; closing",
                    self.context.limits.input_budget_bytes
                ));
            }
            self.budget_held = frame_bytes;
        }
        input.reserve_exact(frame_bytes - input.len());
        Ok(())
    }

    /// Releases the budget of a large frame once it has been consumed, and shrinks the input.
    fn release_input(&mut self, input: &mut Vec<u8>) {
        let frame_bytes = Frame::declared_len(input).map_or(0, |len| len + 4);
        if self.budget_held > 0 && frame_bytes <= READ_BYTES_CHUNK {
            self.context
                .release_budget(std::mem::take(&mut self.budget_held));
            input.shrink_to(READ_BYTES_CHUNK);
        }
    }

    /// Gives back the buffers that one large request or reply grew.
    fn give_back(&mut self) {
        // Both are empty here: `out` was just written, `scratch` serves one request at a time.
        for buffer in [&mut self.out, &mut self.scratch] {
            if buffer.capacity() > BUFFER_KEEP_BYTES {
                *buffer = Vec::new();
            }
        }
        if self.ids.capacity() * 8 > BUFFER_KEEP_BYTES {
            self.ids = Vec::new();
        }
        if self.pairs.capacity() * 16 > BUFFER_KEEP_BYTES {
            self.pairs = Vec::new();
        }
        if self.spans.capacity() * std::mem::size_of::<Span>() > BUFFER_KEEP_BYTES {
            self.spans = Vec::new();
        }
    }

    fn error(&mut self, op: codec::Op, error: &NodeError) {
        let code = Code(error_code(error) as u8);
        self.tally.errors.push((op, code));
        let message = match error {
            // The redirect, machine-readable (imstate_wire::codec::moved_message).
            NodeError::Moved {
                owner,
                grpc,
                wire,
                version,
                ..
            } => codec::moved_message(owner, wire, grpc, *version, &error.to_string()),
            _ => error.to_string(),
        };
        codec::reply_error(&mut self.out, code, &crate::grpc::bounded_message(message));
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
        if matches!(
            request,
            Request::Login(_)
                | Request::Logout { .. }
                | Request::Heartbeat { .. }
                | Request::HeartbeatBatch { .. }
        ) && self.hello
            && let Err(error) = self.context.presence.admit().await
        {
            // Back-pressure before the shard lock (an atomic load while the log keeps up).
            return self.failed(op, &error);
        }
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
                    Ok(seq) => {
                        codec::reply_next(&mut self.out, seq, self.context.seq.route_version())
                    }
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
                    Ok(seqs) => codec::reply_next_batch(
                        &mut self.out,
                        &seqs,
                        self.context.seq.route_version(),
                    ),
                    Err(error) => return self.failed(op, &error),
                }
            }
            Request::NextRange {
                namespace,
                count,
                ids,
            } => {
                ids.read_into(&mut self.ids);
                match self
                    .context
                    .seq
                    .next_range_batch(namespace_name(namespace), &self.ids, count)
                    .await
                {
                    Ok(lasts) => codec::reply_next_range(
                        &mut self.out,
                        &lasts,
                        self.context.seq.route_version(),
                    ),
                    Err(error) => return self.failed(op, &error),
                }
            }
            Request::NextKeys {
                namespace,
                count,
                keys,
            } => {
                let keys: Vec<Vec<u8>> = keys.iter().map(<[u8]>::to_vec).collect();
                match self
                    .context
                    .seq
                    .next_range_batch(namespace_name(namespace), &keys, count)
                    .await
                {
                    Ok(lasts) => codec::reply_next_keys(
                        &mut self.out,
                        &lasts,
                        self.context.seq.route_version(),
                    ),
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
                        self.written.push(request.uid);
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
                        self.written.push(uid);
                        codec::reply_logout(&mut self.out, &session_fields(&session.as_ref()));
                    }
                    Err(error) => return self.failed(op, &error),
                }
            }
            Request::Heartbeat { uid, conn } => {
                match self.context.presence.heartbeat_applied(uid, conn) {
                    Ok(()) => {
                        self.unsynced = true;
                        self.written.push(uid);
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
                        self.written.extend(self.pairs.iter().map(|(uid, _)| *uid));
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
                // The reply must fit in one frame: stop encoding (and growing the scratch
                // buffer) as soon as it cannot, and refuse the request.
                let reply_fixed_bytes = 1 + 4 + 2 * self.ids.len();
                let mut too_large = reply_fixed_bytes > FRAME_BYTES_MAX;
                let visited =
                    self.context
                        .presence
                        .lookup_batch_visit(&self.ids, |position, session| {
                            if too_large {
                                return;
                            }
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
                            too_large = reply_fixed_bytes + scratch.len() > FRAME_BYTES_MAX;
                        });
                if let Err(error) = visited {
                    return self.failed(op, &error);
                }
                if too_large {
                    self.scratch.clear();
                    let error = NodeError::Limit(format!(
                        "the LookupBatch reply for {} uids would exceed FRAME_BYTES_MAX ({} \
                         bytes); ask for fewer uids per call",
                        self.ids.len(),
                        FRAME_BYTES_MAX
                    ));
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
            Request::Route => match self.context.seq.route_reply().await {
                Ok(route) => {
                    use prost::Message;
                    let namespaces = self.context.seq.namespaces_reply().encode_to_vec();
                    codec::reply_route(&mut self.out, &route.encode_to_vec(), &namespaces);
                }
                Err(error) => return self.failed(op, &error),
            },
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
            metrics::counter!(imstate_node::metrics::AUTH_REJECTED, "reason" => reason)
                .increment(1);
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
        codec::reply_hello(&mut self.out, self.context.seq.route_version());
        After::Continue
    }
}
