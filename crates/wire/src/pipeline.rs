//! A pipelined client connection: one TCP connection, many requests in flight, replies in
//! order. Generic over the reply parser, so the imstate wire client and the bench's Redis
//! (RESP) client share this machinery and differ only in bytes.
//!
//! ```text
//!  callers ──Queued{bytes, replies, done}──► bounded queue ──► writer task
//!     ▲                                                         │ drains what is queued,
//!     │                                                         │ one write() for all of it,
//!     │                                                         ▼ hands `done` to the reader
//!     └──────── oneshot(Vec<Reply>) ◄── reader task: parses replies in order
//! ```
//!
//! The server answers in request order, so a FIFO of waiting callers is all the bookkeeping
//! needed. Many callers sharing one connection get coalesced writes and reads (what
//! `redis-benchmark -P` does), and one caller can send a whole pipeline (K requests) as one
//! `send`. When the connection fails, every waiting caller gets the error and later calls fail
//! at once.
//!
//! A connection whose server sends nothing for [`REPLY_STALL_TIMEOUT`] while a reply is
//! awaited is failed the same way (a paused node, or a link cut without a reset, would
//! otherwise keep its callers waiting for as long as it lasts; the gRPC client's HTTP/2
//! keepalive does this for gRPC).

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

/// Requests queued for the writer of one connection; callers wait when it is full (B1).
pub const QUEUE_REQUESTS_MAX: usize = 4_096;
/// Largest buffer the writer coalesces before one write.
pub const WRITE_BYTES_MAX: usize = 1 << 20;
/// Bytes read per read call (the buffer grows when one reply is larger).
pub const READ_BYTES_CHUNK: usize = 64 * 1024;
/// Longest the server may send nothing while a reply is awaited before the connection is
/// failed as dead (every waiting call then gets a connection error: its outcome is unknown).
/// Well above a node's slowest normal answer (a sync write waits at most
/// `presence.replica_ack_timeout_ms`, 1 s by default, for its replica).
pub const REPLY_STALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Parses the replies of one protocol.
pub trait ReplyParser: Send + 'static {
    /// One parsed reply.
    type Reply: Send + 'static;

    /// Parses one reply from the start of `buffer`: `Ok(None)` while it is incomplete, else
    /// the reply and the bytes it used. An error means the stream can no longer be read.
    fn parse(&mut self, buffer: &[u8]) -> Result<Option<(Self::Reply, usize)>, String>;
}

/// Why a pipelined request failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PipelineError {
    /// The connection is closed or failed; the request may or may not have been applied.
    #[error("connection lost: {0}")]
    Connection(String),
    /// The server sent bytes that do not parse.
    #[error("protocol error: {0}")]
    Protocol(String),
}

struct Queued<R> {
    bytes: Vec<u8>,
    replies: usize,
    done: oneshot::Sender<Result<Vec<R>, PipelineError>>,
}

struct Waiter<R> {
    replies: usize,
    done: oneshot::Sender<Result<Vec<R>, PipelineError>>,
}

/// One pipelined connection; share it behind an `Arc`.
pub struct Pipelined<R> {
    queue: mpsc::Sender<Queued<R>>,
}

impl<R: Send + 'static> Pipelined<R> {
    /// Starts the writer and reader tasks on `stream` (on the current tokio runtime).
    pub fn start<P: ReplyParser<Reply = R>>(stream: TcpStream, parser: P) -> Self {
        // Requests are small and latency-bound: never wait for Nagle.
        let _ = stream.set_nodelay(true);
        let (reader, writer) = stream.into_split();
        Self::start_halves(reader, writer, parser)
    }

    /// Starts on any byte stream, e.g. a TLS connection (whose halves share a lock, so a
    /// plain TCP stream goes through [`Self::start`]). Set `TCP_NODELAY` before wrapping.
    pub fn start_stream<S, P>(stream: S, parser: P) -> Self
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
        P: ReplyParser<Reply = R>,
    {
        let (reader, writer) = tokio::io::split(stream);
        Self::start_halves(reader, writer, parser)
    }

    fn start_halves<Rd, Wr, P>(reader: Rd, writer: Wr, parser: P) -> Self
    where
        Rd: AsyncRead + Unpin + Send + 'static,
        Wr: AsyncWrite + Unpin + Send + 'static,
        P: ReplyParser<Reply = R>,
    {
        let (queue, requests) = mpsc::channel(QUEUE_REQUESTS_MAX);
        let (waiters_in, waiters) = mpsc::unbounded_channel();
        tokio::spawn(write_loop(writer, requests, waiters_in));
        tokio::spawn(read_loop(reader, parser, waiters));
        Self { queue }
    }

    /// Sends `bytes` (which hold `replies` requests) and returns their replies, in order.
    pub async fn send(&self, bytes: Vec<u8>, replies: usize) -> Result<Vec<R>, PipelineError> {
        if replies == 0 {
            return Ok(Vec::new());
        }
        let (done, reply) = oneshot::channel();
        let closed = || PipelineError::Connection("the connection is closed".into());
        self.queue
            .send(Queued {
                bytes,
                replies,
                done,
            })
            .await
            .map_err(|_| closed())?;
        reply.await.map_err(|_| closed())?
    }

    /// Sends one request and returns its reply.
    pub async fn send_one(&self, bytes: Vec<u8>) -> Result<R, PipelineError> {
        self.send(bytes, 1)
            .await?
            .pop()
            .ok_or_else(|| PipelineError::Protocol("no reply".into()))
    }
}

/// Coalesces queued requests into single writes; hands each caller to the reader before its
/// bytes leave, so the reader always knows whose reply comes next.
async fn write_loop<R, Wr: AsyncWrite + Unpin>(
    mut writer: Wr,
    mut requests: mpsc::Receiver<Queued<R>>,
    waiters: mpsc::UnboundedSender<Waiter<R>>,
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
        // The flush is a no-op on TCP; TLS may hold encrypted records until it.
        let written = match writer.write_all(&buffer).await {
            Ok(()) => writer.flush().await,
            Err(error) => Err(error),
        };
        if written.is_err() {
            // The reader sees the connection end and fails the waiters.
            return;
        }
    }
}

/// Parses replies in order and completes each waiter once all of its replies arrived.
async fn read_loop<P: ReplyParser, Rd: AsyncRead + Unpin>(
    mut reader: Rd,
    mut parser: P,
    mut waiters: mpsc::UnboundedReceiver<Waiter<P::Reply>>,
) {
    let mut buffer: Vec<u8> = Vec::with_capacity(READ_BYTES_CHUNK);
    let mut start = 0;
    while let Some(waiter) = waiters.recv().await {
        let mut replies = Vec::with_capacity(waiter.replies);
        let mut failure = None;
        while replies.len() < waiter.replies {
            match parser.parse(&buffer[start..]) {
                Ok(Some((reply, used))) => {
                    start += used;
                    replies.push(reply);
                }
                Ok(None) => {
                    buffer.drain(..start);
                    start = 0;
                    buffer.reserve(READ_BYTES_CHUNK);
                    let read =
                        tokio::time::timeout(REPLY_STALL_TIMEOUT, reader.read_buf(&mut buffer))
                            .await;
                    let Ok(read) = read else {
                        failure = Some(PipelineError::Connection(format!(
                            "no reply for {} s (the node may be paused or cut off)",
                            REPLY_STALL_TIMEOUT.as_secs()
                        )));
                        break;
                    };
                    match read {
                        Ok(0) => {
                            failure = Some(PipelineError::Connection(
                                "the server closed the connection".into(),
                            ));
                            break;
                        }
                        Ok(_) => {}
                        Err(error) => {
                            failure = Some(PipelineError::Connection(format!("read: {error}")));
                            break;
                        }
                    }
                }
                Err(error) => {
                    failure = Some(PipelineError::Protocol(error));
                    break;
                }
            }
        }
        match failure {
            None => {
                let _ = waiter.done.send(Ok(replies));
            }
            Some(error) => {
                let _ = waiter.done.send(Err(error.clone()));
                // The stream position is lost: fail everyone else and stop.
                waiters.close();
                while let Some(waiter) = waiters.recv().await {
                    let _ = waiter.done.send(Err(error.clone()));
                }
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// Replies are single bytes.
    struct Bytes;

    impl ReplyParser for Bytes {
        type Reply = u8;
        fn parse(&mut self, buffer: &[u8]) -> Result<Option<(u8, usize)>, String> {
            match buffer.first() {
                Some(b'!') => Err("bang".into()),
                Some(&byte) => Ok(Some((byte, 1))),
                None => Ok(None),
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_server_that_stops_answering_fails_the_waiting_calls_after_the_stall_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        // Accepts, reads, never answers (a paused node, as far as the client can tell).
        let server = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut buffer = [0u8; 64];
            let _ = socket.read(&mut buffer).await;
            std::future::pending::<()>().await;
        });
        let stream = TcpStream::connect(address).await.unwrap();
        let connection: Pipelined<u8> = Pipelined::start(stream, Bytes);
        let started = tokio::time::Instant::now();
        let error = connection.send_one(vec![b'a']).await.unwrap_err();
        assert!(
            matches!(&error, PipelineError::Connection(reason) if reason.contains("no reply")),
            "{error:?}"
        );
        assert!(started.elapsed() >= REPLY_STALL_TIMEOUT);
        // Later calls fail at once.
        assert!(connection.send_one(vec![b'b']).await.is_err());
        server.abort();
    }

    #[tokio::test]
    async fn replies_come_back_in_order_to_their_callers_and_failures_reach_everyone() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut seen = Vec::new();
            let mut buffer = [0u8; 64];
            // Echo each byte, in order, until a '!' which is echoed and ends the stream.
            loop {
                let n = socket.read(&mut buffer).await.unwrap();
                if n == 0 {
                    break;
                }
                seen.extend_from_slice(&buffer[..n]);
                socket.write_all(&buffer[..n]).await.unwrap();
                if buffer[..n].contains(&b'!') {
                    break;
                }
            }
            seen
        });
        let stream = TcpStream::connect(address).await.unwrap();
        let connection = std::sync::Arc::new(Pipelined::start(stream, Bytes));
        let mut tasks = Vec::new();
        for index in 0..20u8 {
            let connection = connection.clone();
            tasks.push(tokio::spawn(async move {
                let first = b'a' + index;
                let replies = connection.send(vec![first, first], 2).await.unwrap();
                assert_eq!(replies, vec![first, first]);
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        let error = connection.send_one(b"!".to_vec()).await.unwrap_err();
        assert_eq!(error, PipelineError::Protocol("bang".into()));
        assert!(connection.send_one(b"x".to_vec()).await.is_err());
        assert_eq!(server.await.unwrap().len(), 41);
    }
}
