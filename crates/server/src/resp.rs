//! The RESP front door (`resp_listen`, off by default): enough of the Redis protocol that an
//! unmodified Redis client allocates sequences here by changing an address.
//!
//! ```text
//!  read whatever arrived ──► parse every complete command (codec) ──► run each, in order,
//!        ▲                                                           replies into one buffer
//!        └────────────── one write() of all replies ◄────────────────────────┘
//! ```
//!
//! Commands: `INCR key`, `INCRBY key n` (a range of `n` values, 1 to `RANGE_COUNT_MAX`; the
//! reply is the last of the range, as Redis replies), `GET key` and `MGET key...` (current
//! values; nil for an id never allocated), `PING`, `ECHO`, `QUIT`, `SELECT 0`, `AUTH`, `HELLO
//! [2] [AUTH user pass] [SETNAME name]`, `CLIENT SETNAME|GETNAME|SETINFO|ID`, `COMMAND` (an
//! empty table: enough for `redis-cli`), `CONFIG GET save|appendonly` (what
//! `redis-benchmark` asks), `INFO`. A command that would
//! move a sequence back or overwrite it (`DECR`, `DECRBY`, `SET`, `DEL`, ...) gets an error
//! saying so; any other gets Redis's `-ERR unknown command`. The connection stays usable after
//! every such error; only a protocol error (bad framing) closes it, as Redis does.
//!
//! Keys are `namespace:id`: a key whose part before the first `:` names a namespace goes to
//! it, any other key goes whole to `resp.default_namespace` (`redis`, a keyed namespace the
//! node creates when RESP is on). In a keyed namespace the rest of the key is the string key
//! (1 to 128 bytes, any bytes); in a numeric one it must be a u64 (leading zeros allowed), and a
//! key whose id is not a number gets an error naming the namespace.
//!
//! A run of pipelined `INCR`s of one namespace is answered by one batch allocation (as many
//! INCRs one after another would be: a repeated key gets increasing values).
//!
//! Sequence values need no durability wait: the store never hands out a value above a durable
//! `max_seq` (S2), so an `INCR` reply is as safe as a `Next` over gRPC.
//!
//! With a token file configured (`[auth]`) every command but `AUTH`, `HELLO` and `QUIT` gets
//! `-NOAUTH` until `AUTH <token>` (or `AUTH default <token>`, or `HELLO 2 AUTH default
//! <token>`) succeeds. The port has no TLS; config validation refuses a non-loopback
//! `resp_listen` without tokens.
//!
//! Bounded (B1): [`RESP_CONNECTIONS_MAX`] connections in all and the wire listener's
//! `connections_per_source_max` per address (over either: an error, then closed); a connection
//! silent for the wire listener's `idle_timeout_ms` is closed; a command is at most
//! [`codec::COMMAND_BYTES_MAX`] bytes and the node never buffers more for one (sizes are
//! checked from the headers, before the bytes arrive); an idle connection holds a few KiB.

pub mod codec;

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use imstate_node::NodeError;
use imstate_node::sequences::Sequences;
use imstate_seq::{KeyKind, NamespaceDef, RANGE_COUNT_MAX};
use parking_lot::RwLock;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::grpc::edge::Tokens;
use crate::wire::{SourceCounts, WireLimits};

/// Most RESP connections open at once (B1).
pub const RESP_CONNECTIONS_MAX: usize = 10_000;
/// Bytes asked of each read. Small, so that many idle connections hold little; a larger
/// command grows the buffer up to [`codec::COMMAND_BYTES_MAX`].
const READ_BYTES_CHUNK: usize = 4 * 1024;
/// A buffer larger than this after its burst is given back.
const BUFFER_KEEP_BYTES: usize = 64 * 1024;
/// Reply bytes after which a burst stops running commands and writes what it has.
const REPLY_BYTES_FLUSH: usize = 1 << 20;
/// Longest a closing connection waits to hand its last error to the kernel.
const CLOSE_WRITE_TIMEOUT: Duration = Duration::from_secs(1);
/// Most pipelined INCRs answered by one batch (far below `seq.batch_ids_max`).
const INCR_RUN_MAX: usize = 1_024;
/// Shortest time between two reloads of the namespace names when a key's prefix is unknown.
const NAMESPACES_RELOAD_MIN: Duration = Duration::from_secs(1);

/// Metric: RESP commands, by `command` (a fixed set; `other` for the rest) and `result`
/// (`ok` or `error`).
pub const RESP_REQUESTS: &str = "imstate_resp_requests_total";
/// Metric: open RESP connections.
pub const RESP_CONNECTIONS: &str = "imstate_resp_connections";

/// Hash slots of the keyed namespace the node creates for RESP keys without a namespace
/// prefix (`resp.default_namespace`): keys hash onto `[0, 65536)`, 64 slots per section, so
/// the namespace has 1,024 sections (its unit of persistence and, in a cluster, of placement).
pub const RESP_NAMESPACE_SLOTS: u64 = 1 << 16;
/// Hash slots per section of the RESP default namespace.
pub const RESP_NAMESPACE_SECTION_SIZE: u64 = 64;

/// The definition the node gives `resp.default_namespace` when it does not exist yet: keyed,
/// [`RESP_NAMESPACE_SLOTS`] slots in sections of [`RESP_NAMESPACE_SECTION_SIZE`], the default
/// step.
pub fn default_namespace_def(name: &str) -> NamespaceDef {
    NamespaceDef {
        name: name.to_owned(),
        id_lo: 0,
        id_hi: RESP_NAMESPACE_SLOTS,
        section_size: RESP_NAMESPACE_SECTION_SIZE,
        step: imstate_seq::STEP_DEFAULT,
        keys: KeyKind::String,
    }
}

/// Creates `resp.default_namespace` as a keyed namespace ([`default_namespace_def`]) unless a
/// namespace of that name exists (of either kind: an existing one is used as it is).
pub async fn ensure_default_namespace(seq: &Sequences, name: &str) -> Result<(), NodeError> {
    if seq.namespaces().iter().any(|def| def.name == name) {
        return Ok(());
    }
    match seq.create_namespace(default_namespace_def(name)).await {
        Ok(_) | Err(NodeError::Seq(imstate_seq::SeqError::NamespaceExists(_))) => Ok(()),
        Err(error) => Err(error),
    }
}

/// Namespace names with whether each is keyed, and when they were loaded.
type KnownNamespaces = (Vec<(String, bool)>, Option<Instant>);

/// What every RESP connection shares.
pub struct RespContext {
    seq: Sequences,
    tokens: Option<Arc<Tokens>>,
    limits: WireLimits,
    default_namespace: String,
    connections: AtomicUsize,
    per_source: SourceCounts,
    /// Namespace names and whether each is keyed, to tell a `namespace:` prefix from part of
    /// a default-namespace key, and when they were loaded.
    names: RwLock<KnownNamespaces>,
    next_client_id: AtomicU64,
}

impl RespContext {
    /// The context of a node's RESP listener.
    pub fn new(
        seq: Sequences,
        tokens: Option<Arc<Tokens>>,
        limits: WireLimits,
        default_namespace: String,
    ) -> Arc<Self> {
        Arc::new(Self {
            seq,
            tokens,
            limits,
            default_namespace,
            connections: AtomicUsize::new(0),
            per_source: SourceCounts::default(),
            names: RwLock::new((Vec::new(), None)),
            next_client_id: AtomicU64::new(1),
        })
    }

    /// Whether `name` is a namespace, and if so whether it is keyed; reloads the names (at
    /// most once per [`NAMESPACES_RELOAD_MIN`]) when it is not among the loaded ones.
    fn kind_of(&self, name: &str) -> Option<bool> {
        let find = |names: &[(String, bool)]| {
            names
                .iter()
                .find(|(known, _)| known == name)
                .map(|&(_, keyed)| keyed)
        };
        if let Some(keyed) = find(&self.names.read().0) {
            return Some(keyed);
        }
        let mut names = self.names.write();
        if let Some(keyed) = find(&names.0) {
            return Some(keyed);
        }
        if names
            .1
            .is_some_and(|loaded| loaded.elapsed() < NAMESPACES_RELOAD_MIN)
        {
            return None;
        }
        names.0 = self
            .seq
            .namespaces()
            .into_iter()
            .map(|def| {
                let keyed = def.is_keyed();
                (def.name, keyed)
            })
            .collect();
        names.1 = Some(Instant::now());
        find(&names.0)
    }

    /// The namespace and id (or string key) of a key (see the module documentation).
    fn resolve<'a>(&'a self, key: &'a [u8]) -> Result<(&'a str, KeyId<'a>), String> {
        let prefixed = key.iter().position(|&byte| byte == b':').and_then(|colon| {
            let prefix = std::str::from_utf8(&key[..colon]).ok()?;
            let keyed = self.kind_of(prefix)?;
            Some((prefix, &key[colon + 1..], keyed))
        });
        let (namespace, rest, keyed) = match prefixed {
            Some(found) => found,
            None => {
                let namespace = self.default_namespace.as_str();
                let Some(keyed) = self.kind_of(namespace) else {
                    return Err(format!(
                        "ERR key '{}' has no namespace prefix and resp.default_namespace \
                         `{namespace}` does not exist",
                        printable(key)
                    ));
                };
                (namespace, key, keyed)
            }
        };
        if keyed {
            return Ok((namespace, KeyId::Key(rest)));
        }
        match std::str::from_utf8(rest)
            .ok()
            .and_then(|id| id.parse::<u64>().ok())
        {
            Some(id) => Ok((namespace, KeyId::Id(id))),
            None => Err(format!(
                "ERR key '{}': namespace `{namespace}` has numeric ids (a u64 after \
                 `{namespace}:`); string keys go to a keyed namespace (`seq create-namespace \
                 NAME --keys string`)",
                printable(key)
            )),
        }
    }
}

/// The id of a resolved key, by its namespace's kind.
#[derive(Clone, Copy)]
enum KeyId<'a> {
    /// A numeric namespace's id.
    Id(u64),
    /// A keyed namespace's string key.
    Key(&'a [u8]),
}

/// Accepts connections until `stop` turns true; each connection stops at its next read then.
pub async fn serve(listener: TcpListener, context: Arc<RespContext>, stop: watch::Receiver<bool>) {
    let mut accept_stop = stop.clone();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = accept_stop.wait_for(|stop| *stop) => return,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "resp accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let context = Arc::clone(&context);
        let stop = stop.clone();
        tokio::spawn(async move {
            let open = context.connections.fetch_add(1, Ordering::Relaxed) + 1;
            metrics::gauge!(RESP_CONNECTIONS).increment(1.0);
            let result = if open > RESP_CONNECTIONS_MAX {
                refuse(
                    stream,
                    &format!(
                        "ERR max number of clients reached: {open} RESP connections open; \
                         RESP_CONNECTIONS_MAX is {RESP_CONNECTIONS_MAX}"
                    ),
                )
                .await
            } else {
                match context
                    .per_source
                    .admit(peer.ip(), context.limits.connections_per_source_max)
                {
                    Ok(()) => {
                        let result = Connection::new(&context).run(stream, stop).await;
                        context.per_source.release(peer.ip());
                        result
                    }
                    Err(open) => {
                        let max = context.limits.connections_per_source_max;
                        let message = format!(
                            "ERR max number of clients reached: {open} RESP connections open \
                             from {}; wire.connections_per_source_max is {max}",
                            peer.ip()
                        );
                        refuse(stream, &message).await
                    }
                }
            };
            if let Err(error) = result {
                tracing::debug!(%error, "resp connection ended");
            }
            context.connections.fetch_sub(1, Ordering::Relaxed);
            metrics::gauge!(RESP_CONNECTIONS).decrement(1.0);
        });
    }
}

async fn refuse(stream: TcpStream, message: &str) -> std::io::Result<()> {
    let mut out = Vec::new();
    codec::error(&mut out, message);
    write_before_close(stream, &out).await
}

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

/// Commands counted under their own name in [`RESP_REQUESTS`]; the rest count as `other`.
const COUNTED: [&str; 6] = ["INCR", "INCRBY", "GET", "MGET", "PING", "AUTH"];

/// The [`RESP_REQUESTS`] counters, `[command][ok, error]` with `other` last, registered once:
/// looking a labelled counter up costs more than an INCR.
fn counters() -> &'static [[metrics::Counter; 2]; COUNTED.len() + 1] {
    static COUNTERS: std::sync::OnceLock<[[metrics::Counter; 2]; COUNTED.len() + 1]> =
        std::sync::OnceLock::new();
    COUNTERS.get_or_init(|| {
        std::array::from_fn(|index| {
            let command = COUNTED.get(index).copied().unwrap_or("other");
            ["ok", "error"].map(|result| {
                metrics::counter!(RESP_REQUESTS, "command" => command, "result" => result)
            })
        })
    })
}

/// Commands refused because they would move a sequence back or overwrite it.
const ROLLBACKS: [&str; 20] = [
    "DECR",
    "DECRBY",
    "SET",
    "SETNX",
    "SETEX",
    "PSETEX",
    "GETSET",
    "GETDEL",
    "GETEX",
    "MSET",
    "MSETNX",
    "DEL",
    "UNLINK",
    "INCRBYFLOAT",
    "APPEND",
    "SETRANGE",
    "EXPIRE",
    "PEXPIRE",
    "EXPIREAT",
    "FLUSHALL",
];

/// What to do after a command.
enum After {
    Continue,
    /// Write what is buffered, then close.
    Close,
}

struct Connection<'c> {
    context: &'c RespContext,
    authenticated: bool,
    id: u64,
    name: Vec<u8>,
    out: Vec<u8>,
    /// Scratch of MGET: the keys resolved (namespace, id or key).
    keys: Vec<(String, Result<u64, Vec<u8>>)>,
    /// A run of INCRs of one namespace, answered together ([`Connection::flush_incrs`]):
    /// numeric ids, or the keys of a keyed namespace (never both).
    run_namespace: String,
    run_ids: Vec<u64>,
    run_keys: Vec<Vec<u8>>,
}

impl<'c> Connection<'c> {
    fn new(context: &'c RespContext) -> Self {
        Self {
            context,
            authenticated: context.tokens.is_none(),
            id: context.next_client_id.fetch_add(1, Ordering::Relaxed),
            name: Vec::new(),
            out: Vec::new(),
            keys: Vec::new(),
            run_namespace: String::new(),
            run_ids: Vec::new(),
            run_keys: Vec::new(),
        }
    }

    async fn run<S: AsyncRead + AsyncWrite + Unpin>(
        mut self,
        mut stream: S,
        mut stop: watch::Receiver<bool>,
    ) -> std::io::Result<()> {
        let idle = self.context.limits.idle_timeout;
        let stopped = async move {
            let _ = stop.wait_for(|stop| *stop).await;
        };
        tokio::pin!(stopped);
        let mut input: Vec<u8> = Vec::new();
        let mut args: Vec<Range<usize>> = Vec::new();
        let mut deadline = idle.map(|idle| tokio::time::Instant::now() + idle);
        loop {
            let mut start = 0;
            let mut close = false;
            while self.out.len() < REPLY_BYTES_FLUSH {
                match codec::parse_command(&input[start..], &mut args) {
                    Ok(Some(used)) => {
                        let command = &input[start..start + used];
                        start += used;
                        deadline = idle.map(|idle| tokio::time::Instant::now() + idle);
                        if args.is_empty() {
                            continue;
                        }
                        let argv: Vec<&[u8]> =
                            args.iter().map(|range| &command[range.clone()]).collect();
                        // A run of pipelined INCRs of one namespace becomes one batch.
                        if self.authenticated
                            && argv.len() == 2
                            && argv[0].eq_ignore_ascii_case(b"INCR")
                            && let Ok((namespace, id)) = self.context.resolve(argv[1])
                        {
                            if self.run_namespace != namespace {
                                self.flush_incrs().await;
                                self.run_namespace.clear();
                                self.run_namespace.push_str(namespace);
                            }
                            match id {
                                KeyId::Id(id) => self.run_ids.push(id),
                                KeyId::Key(key) => self.run_keys.push(key.to_vec()),
                            }
                            if self.run_ids.len() + self.run_keys.len() >= INCR_RUN_MAX {
                                self.flush_incrs().await;
                            }
                            continue;
                        }
                        self.flush_incrs().await;
                        if let After::Close = self.command(&argv).await {
                            close = true;
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(reason) => {
                        self.flush_incrs().await;
                        codec::error(&mut self.out, &format!("ERR Protocol error: {reason}"));
                        close = true;
                        break;
                    }
                }
            }
            self.flush_incrs().await;
            input.drain(..start);
            if !self.out.is_empty() {
                let written = match idle {
                    Some(idle) => tokio::time::timeout(idle, write_all(&mut stream, &self.out))
                        .await
                        .unwrap_or_else(|_| {
                            Err(std::io::Error::new(
                                std::io::ErrorKind::TimedOut,
                                "replies not taken",
                            ))
                        }),
                    None => write_all(&mut stream, &self.out).await,
                };
                written?;
                self.out.clear();
            }
            if close {
                return write_before_close(&mut stream, &[]).await;
            }
            if self.out.capacity() > BUFFER_KEEP_BYTES {
                self.out = Vec::new();
            }
            if input.capacity() > BUFFER_KEEP_BYTES && input.len() < READ_BYTES_CHUNK {
                input.shrink_to(READ_BYTES_CHUNK);
            }
            if matches!(codec::parse_command(&input, &mut args), Ok(Some(_))) {
                continue;
            }
            input.reserve(READ_BYTES_CHUNK);
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
                    let idle_ms = idle.unwrap_or_default().as_millis();
                    codec::error(
                        &mut self.out,
                        &format!("ERR no command for {idle_ms} ms (wire.idle_timeout_ms); closing"),
                    );
                    return write_before_close(&mut stream, &self.out).await;
                }
            };
            if read == 0 {
                return Ok(());
            }
        }
    }

    /// Answers the run of INCRs gathered from the burst, in order: one NextBatch (a repeated
    /// id gets increasing values, as one INCR after another would). A batch refused as a whole
    /// is run again one INCR at a time, so each gets its own reply or error.
    async fn flush_incrs(&mut self) {
        if self.run_ids.is_empty() && self.run_keys.is_empty() {
            return;
        }
        let ids = std::mem::take(&mut self.run_ids);
        let keys = std::mem::take(&mut self.run_keys);
        let seq = &self.context.seq;
        let run_namespace = std::mem::take(&mut self.run_namespace);
        let namespace = run_namespace.as_str();
        let result = match ids.as_slice() {
            _ if !keys.is_empty() => seq.next_batch(namespace, &keys).await,
            [id] => seq.next(namespace, *id).await.map(|value| vec![value]),
            _ => seq.next_batch(namespace, &ids).await,
        };
        match result {
            Ok(values) => {
                for value in values {
                    codec::integer(&mut self.out, value);
                }
                counters()[0][0].increment((ids.len() + keys.len()) as u64);
            }
            Err(_) => {
                for index in 0..ids.len() + keys.len() {
                    let one = if keys.is_empty() {
                        seq.next(namespace, ids[index]).await
                    } else {
                        seq.next_batch(namespace, &keys[index..=index])
                            .await
                            .map(|values| values[0])
                    };
                    match one {
                        Ok(value) => {
                            codec::integer(&mut self.out, value);
                            counters()[0][0].increment(1);
                        }
                        Err(error) => {
                            self.node_error(&error);
                            counters()[0][1].increment(1);
                        }
                    }
                }
            }
        }
        self.run_namespace = run_namespace;
        self.run_ids = ids;
        self.run_ids.clear();
        self.run_keys = keys;
        self.run_keys.clear();
    }

    /// Runs one command; its reply goes to `self.out`.
    async fn command(&mut self, argv: &[&[u8]]) -> After {
        // The hot commands are matched without allocating; the rest are uppercased.
        let counted = COUNTED
            .iter()
            .position(|name| argv[0].eq_ignore_ascii_case(name.as_bytes()));
        let other;
        let name = match counted {
            Some(index) => COUNTED[index],
            None => {
                other = String::from_utf8_lossy(argv[0]).to_ascii_uppercase();
                other.as_str()
            }
        };
        let before = self.out.len();
        let after = self.dispatch(name, argv).await;
        let failed = self.out.get(before) == Some(&b'-');
        counters()[counted.unwrap_or(COUNTED.len())][usize::from(failed)].increment(1);
        after
    }

    async fn dispatch(&mut self, name: &str, argv: &[&[u8]]) -> After {
        let args = &argv[1..];
        if !self.authenticated && !matches!(name, "AUTH" | "HELLO" | "QUIT") {
            codec::error(&mut self.out, "NOAUTH Authentication required.");
            return After::Continue;
        }
        match (name, args.len()) {
            ("INCR", 1) => self.incr(args[0], 1).await,
            ("INCRBY", 2) => match parse_increment(args[1]) {
                Ok(count) => self.incr(args[0], count).await,
                Err(message) => codec::error(&mut self.out, &message),
            },
            ("GET", 1) => self.mget(&args[..1], false).await,
            ("MGET", 1..) => self.mget(args, true).await,
            ("PING", 0) => codec::simple(&mut self.out, "PONG"),
            ("PING", 1) | ("ECHO", 1) => codec::bulk(&mut self.out, args[0]),
            ("QUIT", _) => {
                codec::simple(&mut self.out, "OK");
                return After::Close;
            }
            ("SELECT", 1) => {
                if args[0] == b"0" {
                    codec::simple(&mut self.out, "OK");
                } else {
                    codec::error(&mut self.out, "ERR DB index is out of range");
                }
            }
            ("AUTH", 1) => self.auth(args[0]),
            ("AUTH", 2) => self.auth(args[1]),
            ("HELLO", _) => self.hello(args),
            ("CLIENT", 1..) => self.client(args),
            ("COMMAND", 0) => codec::array(&mut self.out, 0),
            ("COMMAND", _) => {
                if args[0].eq_ignore_ascii_case(b"COUNT") {
                    codec::integer(&mut self.out, 0);
                } else {
                    codec::array(&mut self.out, 0);
                }
            }
            ("CONFIG", 2) if args[0].eq_ignore_ascii_case(b"GET") => {
                // What `redis-benchmark` asks at start. imstate always persists: there are no
                // RDB snapshots, and every value is covered by a durable max_seq.
                let value: Option<&[u8]> = match String::from_utf8_lossy(args[1])
                    .to_ascii_lowercase()
                    .as_str()
                {
                    "save" => Some(b""),
                    "appendonly" => Some(b"yes"),
                    _ => None,
                };
                match value {
                    Some(value) => {
                        codec::array(&mut self.out, 2);
                        codec::bulk(&mut self.out, &args[1].to_ascii_lowercase());
                        codec::bulk(&mut self.out, value);
                    }
                    None => codec::array(&mut self.out, 0),
                }
            }
            ("INFO", _) => {
                let info = format!(
                    "# Server\r\nredis_version:7.0.0\r\nimstate_version:{}\r\n\
                     redis_mode:standalone\r\n",
                    env!("CARGO_PKG_VERSION")
                );
                codec::bulk(&mut self.out, info.as_bytes());
            }
            (
                "INCR" | "INCRBY" | "GET" | "MGET" | "PING" | "ECHO" | "SELECT" | "AUTH"
                | "CLIENT",
                _,
            ) => codec::error(
                &mut self.out,
                &format!(
                    "ERR wrong number of arguments for '{}' command",
                    name.to_ascii_lowercase()
                ),
            ),
            (rollback, _) if ROLLBACKS.contains(&rollback) => codec::error(
                &mut self.out,
                &format!(
                    "ERR {rollback} is refused: imstate keys are sequences, which only move \
                     forward (INCR, INCRBY); moving one back or overwriting it would hand out \
                     values again"
                ),
            ),
            _ => {
                let mut message = format!(
                    "ERR unknown command '{}', with args beginning with: ",
                    printable(argv[0])
                );
                for arg in args.iter().take(4) {
                    message.push_str(&format!("'{}' ", printable(arg)));
                }
                codec::error(&mut self.out, &message);
            }
        }
        After::Continue
    }

    async fn incr(&mut self, key: &[u8], count: u64) {
        let (namespace, id) = match self.context.resolve(key) {
            Ok(resolved) => resolved,
            Err(message) => return codec::error(&mut self.out, &message),
        };
        let seq = &self.context.seq;
        let result = match id {
            KeyId::Id(id) if count == 1 => seq.next(namespace, id).await,
            KeyId::Id(id) => seq
                .next_range_batch(namespace, &[id], count)
                .await
                .map(|lasts| lasts[0]),
            KeyId::Key(key) => seq
                .next_range_batch(namespace, std::slice::from_ref(&key.to_vec()), count)
                .await
                .map(|lasts| lasts[0]),
        };
        match result {
            Ok(value) => codec::integer(&mut self.out, value),
            Err(error) => self.node_error(&error),
        }
    }

    /// GET (one key, a bulk reply) or MGET (an array): current values, nil for 0.
    async fn mget(&mut self, keys: &[&[u8]], array: bool) {
        self.keys.clear();
        for key in keys {
            match self.context.resolve(key) {
                Ok((namespace, KeyId::Id(id))) => self.keys.push((namespace.to_owned(), Ok(id))),
                Ok((namespace, KeyId::Key(key))) => {
                    self.keys.push((namespace.to_owned(), Err(key.to_vec())));
                }
                Err(message) => return codec::error(&mut self.out, &message),
            }
        }
        // One CurrentBatch per namespace, the values put back in key order.
        let mut values = vec![0u64; self.keys.len()];
        let mut namespaces: Vec<&str> = self.keys.iter().map(|(ns, _)| ns.as_str()).collect();
        namespaces.sort_unstable();
        namespaces.dedup();
        for namespace in namespaces {
            let positions: Vec<usize> = (0..self.keys.len())
                .filter(|&position| self.keys[position].0 == namespace)
                .collect();
            // One namespace is of one kind: its ids are all numbers or all keys.
            let ids: Vec<u64> = positions
                .iter()
                .filter_map(|&position| self.keys[position].1.as_ref().ok().copied())
                .collect();
            let keys: Vec<Vec<u8>> = positions
                .iter()
                .filter_map(|&position| self.keys[position].1.as_ref().err().cloned())
                .collect();
            let current = if keys.is_empty() {
                self.context.seq.current_batch(namespace, &ids).await
            } else {
                self.context.seq.current_batch(namespace, &keys).await
            };
            match current {
                Ok(current) => {
                    for (position, value) in positions.into_iter().zip(current) {
                        values[position] = value;
                    }
                }
                Err(error) => return self.node_error(&error),
            }
        }
        if array {
            codec::array(&mut self.out, values.len());
        }
        for value in values {
            if value == 0 {
                codec::nil(&mut self.out);
            } else {
                codec::bulk(&mut self.out, value.to_string().as_bytes());
            }
        }
    }

    fn node_error(&mut self, error: &NodeError) {
        codec::error(
            &mut self.out,
            &crate::grpc::bounded_message(format!("ERR {error}")),
        );
    }

    fn auth(&mut self, token: &[u8]) {
        match &self.context.tokens {
            None => codec::error(
                &mut self.out,
                "ERR AUTH <password> called without any password configured for the default \
                 user. Are you sure your configuration is correct?",
            ),
            Some(tokens) if tokens.accepts(token) => {
                self.authenticated = true;
                codec::simple(&mut self.out, "OK");
            }
            Some(_) => {
                metrics::counter!(imstate_node::metrics::AUTH_REJECTED, "reason" => "invalid")
                    .increment(1);
                codec::error(
                    &mut self.out,
                    "WRONGPASS invalid username-password pair or user is disabled.",
                );
            }
        }
    }

    /// `HELLO [protover [AUTH username password] [SETNAME clientname]]`, RESP2 only.
    fn hello(&mut self, args: &[&[u8]]) {
        if let Some(version) = args.first()
            && *version != b"2"
        {
            return codec::error(
                &mut self.out,
                "NOPROTO sorry, this protocol version is not supported (imstate speaks RESP2)",
            );
        }
        let mut at = 1;
        while at < args.len() {
            if args[at].eq_ignore_ascii_case(b"AUTH") && at + 2 < args.len() {
                let token = args[at + 2];
                let before = self.out.len();
                self.auth(token);
                if self.out.get(before) == Some(&b'-') {
                    return;
                }
                self.out.truncate(before);
                at += 3;
            } else if args[at].eq_ignore_ascii_case(b"SETNAME") && at + 1 < args.len() {
                self.name = args[at + 1].to_vec();
                at += 2;
            } else {
                return codec::error(
                    &mut self.out,
                    &format!("ERR Syntax error in HELLO option '{}'", printable(args[at])),
                );
            }
        }
        if !self.authenticated {
            return codec::error(
                &mut self.out,
                "NOAUTH HELLO must be called with the client already authenticated, otherwise \
                 the HELLO <proto> AUTH <user> <pass> option can be used to authenticate",
            );
        }
        let fields: [(&str, &[u8]); 5] = [
            ("server", b"imstate"),
            ("version", env!("CARGO_PKG_VERSION").as_bytes()),
            ("mode", b"standalone"),
            ("role", b"master"),
            ("modules", b""),
        ];
        codec::array(&mut self.out, 14);
        for (key, value) in &fields[..2] {
            codec::bulk(&mut self.out, key.as_bytes());
            codec::bulk(&mut self.out, value);
        }
        codec::bulk(&mut self.out, b"proto");
        codec::integer(&mut self.out, 2);
        codec::bulk(&mut self.out, b"id");
        codec::integer(&mut self.out, self.id);
        for (key, value) in &fields[2..4] {
            codec::bulk(&mut self.out, key.as_bytes());
            codec::bulk(&mut self.out, value);
        }
        codec::bulk(&mut self.out, fields[4].0.as_bytes());
        codec::array(&mut self.out, 0);
    }

    fn client(&mut self, args: &[&[u8]]) {
        let sub = String::from_utf8_lossy(args[0]).to_ascii_uppercase();
        match (sub.as_str(), args.len()) {
            ("SETNAME", 2) => {
                if args[1].iter().any(|byte| !byte.is_ascii_graphic()) {
                    codec::error(
                        &mut self.out,
                        "ERR Client names cannot contain spaces, newlines or special characters.",
                    );
                } else {
                    self.name = args[1].to_vec();
                    codec::simple(&mut self.out, "OK");
                }
            }
            ("GETNAME", 1) => {
                if self.name.is_empty() {
                    codec::nil(&mut self.out);
                } else {
                    codec::bulk(&mut self.out, &self.name.clone());
                }
            }
            ("ID", 1) => codec::integer(&mut self.out, self.id),
            // Client libraries announce themselves (redis-py 5, go-redis 9); nothing to keep.
            ("SETINFO", 3) => codec::simple(&mut self.out, "OK"),
            _ => codec::error(
                &mut self.out,
                &format!(
                    "ERR unknown subcommand '{}'. Try CLIENT HELP.",
                    printable(args[0])
                ),
            ),
        }
    }
}

async fn write_all<S: AsyncWrite + Unpin>(stream: &mut S, bytes: &[u8]) -> std::io::Result<()> {
    stream.write_all(bytes).await?;
    stream.flush().await
}

/// The increment of `INCRBY`: 1 to [`RANGE_COUNT_MAX`] (a range of that many values).
fn parse_increment(arg: &[u8]) -> Result<u64, String> {
    let value: i64 = std::str::from_utf8(arg)
        .ok()
        .and_then(|text| text.parse().ok())
        .ok_or_else(|| "ERR value is not an integer or out of range".to_owned())?;
    if value < 1 || value as u64 > RANGE_COUNT_MAX {
        return Err(format!(
            "ERR INCRBY by {value}: the increment is 1 to {RANGE_COUNT_MAX} (RANGE_COUNT_MAX); \
             a sequence only moves forward"
        ));
    }
    Ok(value as u64)
}

/// At most 64 bytes of an argument, for an error message.
fn printable(arg: &[u8]) -> String {
    String::from_utf8_lossy(&arg[..arg.len().min(64)])
        .escape_debug()
        .to_string()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn an_increment_is_a_positive_integer_within_the_range_limit() {
        assert_eq!(parse_increment(b"1"), Ok(1));
        assert_eq!(parse_increment(b"1000000"), Ok(RANGE_COUNT_MAX));
        for bad in [&b"0"[..], b"-3", b"1000001"] {
            assert!(
                parse_increment(bad)
                    .unwrap_err()
                    .contains("RANGE_COUNT_MAX")
            );
        }
        for bad in [&b"x"[..], b"1.5", b"", b"99999999999999999999"] {
            assert_eq!(
                parse_increment(bad).unwrap_err(),
                "ERR value is not an integer or out of range"
            );
        }
    }
}
