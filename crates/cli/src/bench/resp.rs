//! A small pipelining RESP2 client: one TCP connection, many requests in flight.
//!
//! ```text
//!  callers ──Request{bytes, replies, done}──► bounded queue ──► writer task
//!     ▲                                                         │ drains what is queued,
//!     │                                                         │ one write() for all of it,
//!     │                                                         ▼ hands `done` to the reader
//!     └──────── oneshot(Vec<Reply>) ◄── reader task: parses replies in order
//! ```
//!
//! Redis answers in request order, so a FIFO of waiting callers is all the bookkeeping needed.
//! Many concurrent callers sharing one connection therefore get the same coalesced writes and
//! reads that `redis-benchmark -P` gets, and one caller can send a whole pipeline (K commands)
//! as one request. This is what the `redis` crate's multiplexed connection does too, minus its
//! generic `Value` conversions and per-command boxing, so it is the faster of the two
//! (see docs/benchmarks.md).

use std::fmt::Write as _;

use anyhow::{Context, anyhow, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

/// Requests queued for the writer of one connection; callers wait when it is full (B1).
const QUEUE_REQUESTS_MAX: usize = 4_096;
/// Largest buffer the writer coalesces before one write.
const WRITE_BYTES_MAX: usize = 1 << 20;
/// Bytes read per read call (the buffer grows if one reply is larger).
const READ_BYTES_CHUNK: usize = 64 * 1024;
/// Deepest nesting of arrays accepted in a reply.
const REPLY_DEPTH_MAX: usize = 8;

/// One RESP2 reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `+OK`
    Simple(String),
    /// `-ERR ...`
    Error(String),
    /// `:n`
    Integer(i64),
    /// `$n` (None for `$-1`).
    Bulk(Option<Vec<u8>>),
    /// `*n` (None for `*-1`).
    Array(Option<Vec<Reply>>),
}

impl Reply {
    /// The integer of an `:n` reply.
    pub fn integer(&self) -> anyhow::Result<i64> {
        match self {
            Reply::Integer(value) => Ok(*value),
            other => Err(unexpected("an integer", other)),
        }
    }

    /// The elements of an array reply (a nil array is empty).
    pub fn array(&self) -> anyhow::Result<&[Reply]> {
        match self {
            Reply::Array(Some(items)) => Ok(items),
            Reply::Array(None) => Ok(&[]),
            other => Err(unexpected("an array", other)),
        }
    }

    /// The text of a bulk or simple string reply.
    pub fn text(&self) -> anyhow::Result<String> {
        match self {
            Reply::Simple(text) => Ok(text.clone()),
            Reply::Bulk(Some(bytes)) => Ok(String::from_utf8_lossy(bytes).into_owned()),
            other => Err(unexpected("a string", other)),
        }
    }
}

fn unexpected(wanted: &str, reply: &Reply) -> anyhow::Error {
    match reply {
        Reply::Error(message) => anyhow!("redis error: {message}"),
        other => anyhow!("expected {wanted} from redis, got {other:?}"),
    }
}

/// Appends one command in RESP array form to `out`.
pub fn encode(out: &mut Vec<u8>, args: &[&[u8]]) {
    let mut header = String::with_capacity(16);
    let _ = write!(header, "*{}\r\n", args.len());
    out.extend_from_slice(header.as_bytes());
    for arg in args {
        header.clear();
        let _ = write!(header, "${}\r\n", arg.len());
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
}

/// Builds a pipeline: commands appended with [`Pipeline::command`], sent as one request.
#[derive(Default)]
pub struct Pipeline {
    bytes: Vec<u8>,
    commands: usize,
}

impl Pipeline {
    /// An empty pipeline.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends one command.
    pub fn command(&mut self, args: &[&[u8]]) -> &mut Self {
        encode(&mut self.bytes, args);
        self.commands += 1;
        self
    }

    /// Whether no command was appended.
    pub fn is_empty(&self) -> bool {
        self.commands == 0
    }
}

struct Request {
    bytes: Vec<u8>,
    replies: usize,
    done: oneshot::Sender<anyhow::Result<Vec<Reply>>>,
}

struct Waiter {
    replies: usize,
    done: oneshot::Sender<anyhow::Result<Vec<Reply>>>,
}

/// One pipelined connection to Redis; cheap to share behind an `Arc`.
pub struct Connection {
    queue: mpsc::Sender<Request>,
}

impl Connection {
    /// Connects to `address` (`host:port`).
    pub async fn connect(address: &str) -> anyhow::Result<Self> {
        let stream = TcpStream::connect(address)
            .await
            .with_context(|| format!("connecting to redis at {address}"))?;
        stream.set_nodelay(true)?;
        let (reader, writer) = stream.into_split();
        let (queue, requests) = mpsc::channel(QUEUE_REQUESTS_MAX);
        let (waiters_in, waiters) = mpsc::unbounded_channel();
        tokio::spawn(write_loop(writer, requests, waiters_in));
        tokio::spawn(read_loop(reader, waiters));
        Ok(Self { queue })
    }

    /// Sends a pipeline and returns its replies, one per command, in order.
    pub async fn send(&self, pipeline: Pipeline) -> anyhow::Result<Vec<Reply>> {
        if pipeline.is_empty() {
            return Ok(Vec::new());
        }
        let (done, reply) = oneshot::channel();
        self.queue
            .send(Request {
                bytes: pipeline.bytes,
                replies: pipeline.commands,
                done,
            })
            .await
            .map_err(|_| anyhow!("redis connection closed"))?;
        reply
            .await
            .map_err(|_| anyhow!("redis connection closed"))?
    }

    /// Sends one command and returns its reply.
    pub async fn command(&self, args: &[&[u8]]) -> anyhow::Result<Reply> {
        let mut pipeline = Pipeline::new();
        pipeline.command(args);
        self.send(pipeline)
            .await?
            .pop()
            .ok_or_else(|| anyhow!("redis sent no reply"))
    }
}

/// Coalesces queued requests into single writes; hands each caller to the reader before its
/// bytes leave, so the reader always knows who the next reply belongs to.
async fn write_loop(
    mut writer: tokio::net::tcp::OwnedWriteHalf,
    mut requests: mpsc::Receiver<Request>,
    waiters: mpsc::UnboundedSender<Waiter>,
) {
    let mut buffer = Vec::with_capacity(READ_BYTES_CHUNK);
    while let Some(first) = requests.recv().await {
        buffer.clear();
        let mut next = Some(first);
        while let Some(request) = next.take() {
            buffer.extend_from_slice(&request.bytes);
            let waiter = Waiter {
                replies: request.replies,
                done: request.done,
            };
            if waiters.send(waiter).is_err() {
                return;
            }
            if buffer.len() < WRITE_BYTES_MAX {
                next = requests.try_recv().ok();
            }
        }
        if writer.write_all(&buffer).await.is_err() {
            return;
        }
    }
}

/// Parses replies in order and completes each waiter once all of its replies arrived.
async fn read_loop(
    mut reader: tokio::net::tcp::OwnedReadHalf,
    mut waiters: mpsc::UnboundedReceiver<Waiter>,
) {
    let mut buffer: Vec<u8> = Vec::with_capacity(READ_BYTES_CHUNK);
    let mut start = 0;
    while let Some(waiter) = waiters.recv().await {
        let mut replies = Vec::with_capacity(waiter.replies);
        let mut failure = None;
        while replies.len() < waiter.replies {
            match parse(&buffer[start..], 0) {
                Ok(Some((reply, used))) => {
                    start += used;
                    replies.push(reply);
                }
                Ok(None) => {
                    buffer.drain(..start);
                    start = 0;
                    buffer.reserve(READ_BYTES_CHUNK);
                    match reader.read_buf(&mut buffer).await {
                        Ok(0) => {
                            failure = Some(anyhow!("redis closed the connection"));
                            break;
                        }
                        Ok(_) => {}
                        Err(error) => {
                            failure = Some(anyhow!("reading from redis: {error}"));
                            break;
                        }
                    }
                }
                Err(error) => {
                    failure = Some(error);
                    break;
                }
            }
        }
        match failure {
            None => {
                let _ = waiter.done.send(Ok(replies));
            }
            Some(error) => {
                let _ = waiter.done.send(Err(error));
                // The stream position is lost: fail everyone else and stop.
                waiters.close();
                while let Some(waiter) = waiters.recv().await {
                    let _ = waiter.done.send(Err(anyhow!("redis connection failed")));
                }
                return;
            }
        }
    }
}

/// Finds the end of the line starting at `buffer[0]`; returns (line, bytes including CRLF).
fn line(buffer: &[u8]) -> Option<(&[u8], usize)> {
    let end = buffer.windows(2).position(|pair| pair == b"\r\n")?;
    Some((&buffer[..end], end + 2))
}

fn number(text: &[u8]) -> anyhow::Result<i64> {
    std::str::from_utf8(text)
        .ok()
        .and_then(|text| text.parse().ok())
        .ok_or_else(|| {
            anyhow!(
                "bad number in redis reply: {:?}",
                String::from_utf8_lossy(text)
            )
        })
}

/// Parses one reply from the start of `buffer`: `Ok(None)` if it is not complete yet.
fn parse(buffer: &[u8], depth: usize) -> anyhow::Result<Option<(Reply, usize)>> {
    if depth > REPLY_DEPTH_MAX {
        bail!("redis reply nested deeper than {REPLY_DEPTH_MAX}");
    }
    let Some(&kind) = buffer.first() else {
        return Ok(None);
    };
    let Some((head, head_len)) = line(&buffer[1..]) else {
        return Ok(None);
    };
    let used = 1 + head_len;
    let text = || String::from_utf8_lossy(head).into_owned();
    match kind {
        b'+' => Ok(Some((Reply::Simple(text()), used))),
        b'-' => Ok(Some((Reply::Error(text()), used))),
        b':' => Ok(Some((Reply::Integer(number(head)?), used))),
        b'$' => {
            let length = number(head)?;
            if length < 0 {
                return Ok(Some((Reply::Bulk(None), used)));
            }
            let length = length as usize;
            if buffer.len() < used + length + 2 {
                return Ok(None);
            }
            let bytes = buffer[used..used + length].to_vec();
            Ok(Some((Reply::Bulk(Some(bytes)), used + length + 2)))
        }
        b'*' => {
            let count = number(head)?;
            if count < 0 {
                return Ok(Some((Reply::Array(None), used)));
            }
            let mut items = Vec::with_capacity((count as usize).min(1_024));
            let mut offset = used;
            for _ in 0..count {
                match parse(&buffer[offset..], depth + 1)? {
                    Some((item, item_len)) => {
                        items.push(item);
                        offset += item_len;
                    }
                    None => return Ok(None),
                }
            }
            Ok(Some((Reply::Array(Some(items)), offset)))
        }
        other => bail!("unknown redis reply type byte {other:#04x}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_reply_kind_and_waits_for_partial_ones() {
        let wire = b"+OK\r\n-ERR x\r\n:42\r\n$3\r\nabc\r\n$-1\r\n*2\r\n:1\r\n$1\r\nz\r\n";
        let mut offset = 0;
        let mut replies = Vec::new();
        while let Some((reply, used)) = parse(&wire[offset..], 0).expect("valid") {
            replies.push(reply);
            offset += used;
        }
        assert_eq!(offset, wire.len());
        assert_eq!(replies[2], Reply::Integer(42));
        assert_eq!(replies[4], Reply::Bulk(None));
        assert_eq!(replies[5].array().expect("array").len(), 2);
        for cut in 0..wire.len() {
            let partial = &wire[..cut];
            // Whatever parses from a prefix must be a prefix of the full parse.
            let mut at = 0;
            let mut index = 0;
            while let Some((reply, used)) = parse(&partial[at..], 0).expect("valid") {
                assert_eq!(reply, replies[index]);
                at += used;
                index += 1;
            }
        }
    }

    #[test]
    fn encodes_commands_as_resp_arrays() {
        let mut out = Vec::new();
        encode(&mut out, &[b"INCR", b"seq:7"]);
        assert_eq!(out, b"*2\r\n$4\r\nINCR\r\n$5\r\nseq:7\r\n");
    }
}
