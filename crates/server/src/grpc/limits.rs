//! The gRPC server's own limits (B1), beside the wire listener's: message sizes, streams per
//! connection, header bytes, how long a call may run, and how many connections are open.
//!
//! tonic's defaults leave most of these unbounded (or bounded only on the client side), so
//! every one is set here explicitly, named, and documented in the README's limit table.
//!
//! Connections are counted by [`limit_connections`]: each accepted TCP stream holds a permit
//! of one semaphore until it closes; a connection over [`GRPC_CONNECTIONS_MAX`] is closed at
//! once (the client sees a reset and retries elsewhere or later), so the accept loop never
//! waits.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_stream::{Stream, StreamExt};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Largest request message, in bytes (a NextBatch of 10,000 ids is 80 KB).
pub const GRPC_REQUEST_BYTES_MAX: usize = 4 << 20;
/// Largest reply message, in bytes: a LookupBatch of `lookup_ids_max` uids with many sessions
/// each can be tens of MB. The Rust client accepts the same.
pub const GRPC_REPLY_BYTES_MAX: usize = 64 << 20;
/// Concurrent streams (calls) on one HTTP/2 connection.
pub const GRPC_STREAMS_PER_CONNECTION_MAX: u32 = 1_024;
/// Bytes of request headers (HTTP/2 header list size).
pub const GRPC_HEADER_LIST_BYTES_MAX: u32 = 16 * 1024;
/// Longest a unary call may run before it fails DEADLINE_EXCEEDED (a raise wait is at most
/// `raise_wait_timeout_ms`; nothing else waits). Watch streams are not cut by it: it bounds
/// the handler that opens the stream, not the stream.
pub const GRPC_CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// gRPC connections open at once.
pub const GRPC_CONNECTIONS_MAX: usize = 10_000;

/// Metric: gRPC connections closed at accept because [`GRPC_CONNECTIONS_MAX`] were open.
pub const GRPC_CONNECTIONS_REFUSED: &str = "imstate_grpc_connections_refused_total";

/// An accepted TCP stream that holds one of the connection permits until it is dropped.
pub struct LimitedStream {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
}

/// Turns a stream of accepted connections into one that holds at most `max` open at once:
/// a connection over the limit is dropped (closed) as it is accepted.
pub fn limit_connections(
    incoming: impl Stream<Item = std::io::Result<TcpStream>>,
    max: usize,
) -> impl Stream<Item = std::io::Result<LimitedStream>> {
    let permits = Arc::new(Semaphore::new(max));
    incoming.filter_map(move |accepted| {
        let stream = match accepted {
            Ok(stream) => stream,
            Err(error) => return Some(Err(error)),
        };
        match Arc::clone(&permits).try_acquire_owned() {
            Ok(permit) => Some(Ok(LimitedStream {
                stream,
                _permit: permit,
            })),
            Err(_) => {
                metrics::counter!(GRPC_CONNECTIONS_REFUSED).increment(1);
                tracing::debug!(
                    max,
                    "gRPC connection limit reached; closing a new connection"
                );
                None
            }
        }
    })
}

impl Connected for LimitedStream {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for LimitedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(context, buf)
    }
}

impl AsyncWrite for LimitedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(context, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(context, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(context)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(context)
    }
}
