//! A small pipelining RESP2 client: one TCP connection, many requests in flight.
//!
//! The connection is `imstate_wire::pipeline::Pipelined`, the same code the imstate wire
//! client uses (one writer task coalescing queued requests into one write, one reader task
//! completing callers in order), with a RESP parser: both bench targets get identical client
//! machinery. Many concurrent callers sharing one connection therefore get the same coalesced
//! writes and reads that `redis-benchmark -P` gets, and one caller can send a whole pipeline
//! (K commands) as one request. This is what the `redis` crate's multiplexed connection does too, minus its
//! generic `Value` conversions and per-command boxing, so it is the faster of the two
//! (see docs/benchmarks.md).

use std::fmt::Write as _;

use anyhow::{Context, anyhow, bail};
use imstate_wire::pipeline::{Pipelined, ReplyParser};
use tokio::net::TcpStream;
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
}

/// Parses RESP2 replies for the shared pipelining connection.
struct RespParser;

impl ReplyParser for RespParser {
    type Reply = Reply;

    fn parse(&mut self, buffer: &[u8]) -> Result<Option<(Reply, usize)>, String> {
        parse(buffer, 0).map_err(|error| error.to_string())
    }
}

/// One pipelined connection to Redis; cheap to share behind an `Arc`.
pub struct Connection {
    pipe: Pipelined<Reply>,
}

impl Connection {
    /// Connects to `address` (`host:port`).
    pub async fn connect(address: &str) -> anyhow::Result<Self> {
        let stream = TcpStream::connect(address)
            .await
            .with_context(|| format!("connecting to redis at {address}"))?;
        Ok(Self {
            pipe: Pipelined::start(stream, RespParser),
        })
    }

    /// Sends a pipeline and returns its replies, one per command, in order.
    pub async fn send(&self, pipeline: Pipeline) -> anyhow::Result<Vec<Reply>> {
        self.pipe
            .send(pipeline.bytes, pipeline.commands)
            .await
            .map_err(|error| anyhow!("redis: {error}"))
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
