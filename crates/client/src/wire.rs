//! The wire-protocol client: the hot path (Next, NextBatch, Login, Logout, Heartbeat,
//! HeartbeatBatch, LookupBatch) in pipelined binary frames on one TCP connection, or one TLS
//! connection when [`ClientOptions`] carry a CA ([`WireClient::connect_with`]).
//!
//! A [`WireClient`] is one connection; share it behind an `Arc` (or clone it: clones share the
//! connection). Calls made concurrently are coalesced into single writes and are in flight
//! together, so D tasks calling at once keep D requests in the pipe. Errors are the same
//! [`ClientError`]s as over gRPC: the node's code numbers are gRPC status codes.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use imstate_wire::codec::{self, Frame};
use imstate_wire::pipeline::{PipelineError, Pipelined, ReplyParser};
use imstate_wire::tls::{self, TlsConnector, rustls::pki_types::ServerName};
use imstate_wire::{LoginFields, Op, WireSession};
use tokio::net::TcpStream;

use imstate_proto::v1 as pb;
use prost::Message;

use crate::presence::{LoginArgs, LoginResult, Session};
use crate::{
    CONNECT_TIMEOUT, ClientError, ClientOptions, Namespace, RouteTable, SeqRange, broken_reply,
};

/// A reply frame, owned.
pub struct OwnedFrame {
    op: u8,
    body: Vec<u8>,
}

/// Splits wire frames off the read buffer.
struct FrameParser;

impl ReplyParser for FrameParser {
    type Reply = OwnedFrame;

    fn parse(&mut self, buffer: &[u8]) -> Result<Option<(OwnedFrame, usize)>, String> {
        match Frame::split(buffer) {
            Ok(Some((frame, used))) => Ok(Some((
                OwnedFrame {
                    op: frame.op,
                    body: frame.body.to_vec(),
                },
                used,
            ))),
            Ok(None) => Ok(None),
            Err(error) => Err(error.to_string()),
        }
    }
}

fn lost(error: PipelineError) -> ClientError {
    ClientError::Connection {
        reason: error.to_string(),
    }
}

fn protocol(error: imstate_wire::DecodeError) -> ClientError {
    ClientError::Connection {
        reason: format!("protocol error: {error}"),
    }
}

fn session(wire: WireSession) -> Session {
    Session {
        uid: wire.uid,
        device: wire.device,
        gateway: wire.gateway,
        conn: wire.conn,
        login_ms: wire.login_ms,
        last_heartbeat_ms: wire.last_heartbeat_ms,
        ttl_ms: wire.ttl_ms,
        meta: wire.meta.unwrap_or_default(),
    }
}

/// One wire-protocol connection to a node.
#[derive(Clone)]
pub struct WireClient {
    connection: Arc<Pipelined<OwnedFrame>>,
    /// The newest route version the node's replies carried (Hello, Next, NextBatch).
    route_version: Arc<AtomicU64>,
}

impl WireClient {
    /// Connects to a node's wire listener (`host:port`) and says Hello with `token` (empty
    /// when the node has no token file).
    pub async fn connect(address: &str, token: &str) -> Result<Self, ClientError> {
        let options = ClientOptions {
            token: (!token.is_empty()).then(|| token.to_owned()),
            ..ClientOptions::default()
        };
        Self::connect_with(address, &options).await
    }

    /// Connects as `options` say: TLS when they carry a CA (mTLS with a client certificate;
    /// the node's certificate must name `tls_domain`, else the host of `address`), and Hello
    /// with their token. Connecting and the TLS handshake together get `CONNECT_TIMEOUT`.
    pub async fn connect_with(
        address: &str,
        options: &ClientOptions,
    ) -> Result<Self, ClientError> {
        let connect_error = |reason: String| ClientError::Connect {
            address: address.to_string(),
            reason,
        };
        let token = options.token.as_deref().unwrap_or_default();
        let connected = tokio::time::timeout(CONNECT_TIMEOUT, async {
            let stream = TcpStream::connect(address)
                .await
                .map_err(|error| connect_error(error.to_string()))?;
            let _ = stream.set_nodelay(true);
            let Some(ca) = &options.tls_ca_pem else {
                return Ok::<_, ClientError>(Pipelined::start(stream, FrameParser));
            };
            let identity = options
                .tls_identity_pem
                .as_ref()
                .map(|(cert, key)| (&cert[..], &key[..]));
            let config =
                tls::client_config(ca, identity).map_err(|error| ClientError::Options {
                    what: error.what,
                    reason: error.reason,
                })?;
            let name =
                server_name(address, options.tls_domain.as_deref()).map_err(&connect_error)?;
            let stream = TlsConnector::from(config)
                .connect(name, stream)
                .await
                .map_err(|error| connect_error(format!("TLS handshake: {error}")))?;
            Ok(Pipelined::start_stream(stream, FrameParser))
        })
        .await
        .map_err(|_| {
            connect_error(format!(
                "no connection within {} s",
                CONNECT_TIMEOUT.as_secs()
            ))
        })??;
        let connection = Arc::new(connected);
        let mut hello = Vec::new();
        codec::hello(&mut hello, token.as_bytes()).map_err(|error| ClientError::Options {
            what: "token".into(),
            reason: error.to_string(),
        })?;
        let reply = connection
            .send_one(hello)
            .await
            .map_err(|error| match error {
                PipelineError::Protocol(_) => connect_error(format!(
                    "{error} (is {address} a wire port, the node's `wire_listen`? gRPC is on \
                 `listen`)"
                )),
                PipelineError::Connection(_) => connect_error(error.to_string()),
            })?;
        let body = Self::body(reply, Op::Hello)?;
        let route_version = codec::decode_hello(&body).map_err(protocol)?;
        Ok(Self {
            connection,
            route_version: Arc::new(AtomicU64::new(route_version)),
        })
    }

    /// The newest route-table version the node's replies carried (its Hello, then every
    /// Next and NextBatch).
    pub fn route_version(&self) -> u64 {
        self.route_version.load(Ordering::Relaxed)
    }

    fn learn(&self, version: u64) {
        self.route_version.fetch_max(version, Ordering::Relaxed);
    }

    fn body(reply: OwnedFrame, op: Op) -> Result<Vec<u8>, ClientError> {
        let frame = Frame {
            op: reply.op,
            body: &reply.body,
        };
        match frame.reply_body(op).map_err(protocol)? {
            Ok(_) => Ok(reply.body),
            Err((code, message)) => {
                if code == imstate_wire::Code::FAILED_PRECONDITION
                    && let Some((owner, wire, grpc, version)) = codec::parse_moved(&message)
                {
                    return Err(ClientError::Moved {
                        owner,
                        grpc,
                        wire,
                        version,
                        message,
                    });
                }
                Err(ClientError::Status {
                    code: tonic::Code::from_i32(i32::from(code.0)),
                    message,
                })
            }
        }
    }

    async fn call(
        &self,
        op: Op,
        encode: impl FnOnce(&mut Vec<u8>) -> Result<(), imstate_wire::DecodeError>,
    ) -> Result<Vec<u8>, ClientError> {
        let mut request = Vec::with_capacity(64);
        encode(&mut request).map_err(|error| ClientError::Status {
            code: tonic::Code::InvalidArgument,
            message: error.to_string(),
        })?;
        let reply = self.connection.send_one(request).await.map_err(lost)?;
        Self::body(reply, op)
    }

    /// Allocates one seq for `id` in `namespace` ("" = default).
    pub async fn next(&self, namespace: &str, id: u64) -> Result<u64, ClientError> {
        let body = self
            .call(Op::Next, |out| codec::next(out, namespace, id))
            .await?;
        let (seq, version) = codec::decode_next(&body).map_err(protocol)?;
        self.learn(version);
        Ok(seq)
    }

    /// Allocates one seq per id, in order.
    pub async fn next_batch(&self, namespace: &str, ids: &[u64]) -> Result<Vec<u64>, ClientError> {
        let body = self
            .call(Op::NextBatch, |out| codec::next_batch(out, namespace, ids))
            .await?;
        let (seqs, version) = codec::decode_next_batch(&body).map_err(protocol)?;
        self.learn(version);
        Ok(seqs)
    }

    /// Reserves `count` consecutive seqs for each id, in order; answers the last of each range.
    pub async fn next_range_lasts(
        &self,
        namespace: &str,
        ids: &[u64],
        count: u64,
    ) -> Result<Vec<u64>, ClientError> {
        let body = self
            .call(Op::NextRange, |out| {
                codec::next_range(out, namespace, count, ids)
            })
            .await?;
        let (lasts, version) = codec::decode_next_range(&body).map_err(protocol)?;
        self.learn(version);
        if lasts.len() != ids.len() {
            return Err(broken_reply(format!(
                "{} ranges answered for {} ids",
                lasts.len(),
                ids.len()
            )));
        }
        Ok(lasts)
    }

    /// Reserves `count` consecutive seqs for each string key of a keyed namespace, in order
    /// (`count = 1`: one seq per key); answers the last of each key's range.
    pub async fn next_keys_lasts(
        &self,
        namespace: &str,
        keys: &[Vec<u8>],
        count: u64,
    ) -> Result<Vec<u64>, ClientError> {
        let body = self
            .call(Op::NextKeys, |out| {
                codec::next_keys(out, namespace, count, keys)
            })
            .await?;
        let (lasts, version) = codec::decode_next_range(&body).map_err(protocol)?;
        self.learn(version);
        if lasts.len() != keys.len() {
            return Err(broken_reply(format!(
                "{} ranges answered for {} keys",
                lasts.len(),
                keys.len()
            )));
        }
        Ok(lasts)
    }

    /// Reserves `count` consecutive seqs for each string key, as [`SeqRange`]s.
    pub async fn next_keys(
        &self,
        namespace: &str,
        keys: &[Vec<u8>],
        count: u64,
    ) -> Result<Vec<SeqRange>, ClientError> {
        self.next_keys_lasts(namespace, keys, count)
            .await?
            .into_iter()
            .map(|last| SeqRange::ending_at(last, count))
            .collect()
    }

    /// Reserves `count` consecutive seqs for each id, in order (1 to 1,000,000 per id).
    pub async fn next_range_batch(
        &self,
        namespace: &str,
        ids: &[u64],
        count: u64,
    ) -> Result<Vec<SeqRange>, ClientError> {
        self.next_range_lasts(namespace, ids, count)
            .await?
            .into_iter()
            .map(|last| SeqRange::ending_at(last, count))
            .collect()
    }

    /// Registers a session; returns it and the session it replaced.
    pub async fn login(&self, args: &LoginArgs) -> Result<LoginResult, ClientError> {
        let fields = LoginFields {
            uid: args.uid,
            conn: args.conn,
            ttl_ms: args.ttl_ms,
            device: &args.device,
            gateway: &args.gateway,
            meta: (!args.meta.is_empty()).then_some(args.meta.as_slice()),
        };
        let body = self
            .call(Op::Login, |out| codec::login(out, &fields))
            .await?;
        let (stored, replaced) = codec::decode_login(&body).map_err(protocol)?;
        Ok(LoginResult {
            session: session(stored),
            replaced: replaced.map(session),
        })
    }

    /// Removes the session of (uid, conn); returns it.
    pub async fn logout(&self, uid: u64, conn: u64) -> Result<Session, ClientError> {
        let body = self
            .call(Op::Logout, |out| {
                codec::session_op(out, Op::Logout, uid, conn);
                Ok(())
            })
            .await?;
        codec::decode_logout(&body).map(session).map_err(protocol)
    }

    /// Renews the session of (uid, conn).
    pub async fn heartbeat(&self, uid: u64, conn: u64) -> Result<(), ClientError> {
        let body = self
            .call(Op::Heartbeat, |out| {
                codec::session_op(out, Op::Heartbeat, uid, conn);
                Ok(())
            })
            .await?;
        codec::decode_heartbeat(&body).map_err(protocol)
    }

    /// Renews sessions of `gateway`; returns the (uid, conn) pairs the node does not know.
    pub async fn heartbeat_batch(
        &self,
        gateway: &str,
        sessions: &[(u64, u64)],
    ) -> Result<Vec<(u64, u64)>, ClientError> {
        let body = self
            .call(Op::HeartbeatBatch, |out| {
                codec::heartbeat_batch(out, gateway, sessions)
            })
            .await?;
        codec::decode_heartbeat_batch(&body).map_err(protocol)
    }

    /// The sessions of each uid, in order.
    pub async fn lookup_batch(&self, uids: &[u64]) -> Result<Vec<Vec<Session>>, ClientError> {
        let body = self
            .call(Op::LookupBatch, |out| codec::lookup_batch(out, uids))
            .await?;
        let found = codec::decode_lookup_batch(&body).map_err(protocol)?;
        Ok(found
            .into_iter()
            .map(|sessions| sessions.into_iter().map(session).collect())
            .collect())
    }

    /// The number of sessions online.
    pub async fn online_count(&self) -> Result<u64, ClientError> {
        let body = self
            .call(Op::OnlineCount, |out| {
                codec::online_count(out);
                Ok(())
            })
            .await?;
        codec::decode_online_count(&body).map_err(protocol)
    }

    /// The route table the node serves under, with the cluster's nodes, and the namespaces'
    /// layouts (what a smart client needs to route ids; the same messages as gRPC's
    /// `Admin/Route` and `Sequence/ListNamespaces`).
    pub async fn route(&self) -> Result<(RouteTable, Vec<Namespace>), ClientError> {
        let body = self
            .call(Op::Route, |out| {
                codec::route(out);
                Ok(())
            })
            .await?;
        let (route, namespaces) = codec::decode_route(&body).map_err(protocol)?;
        let bad = |error: prost::DecodeError| ClientError::Connection {
            reason: format!("protocol error: route reply: {error}"),
        };
        let route = pb::RouteReply::decode(route).map_err(bad)?;
        let namespaces = pb::ListNamespacesReply::decode(namespaces).map_err(bad)?;
        let table = crate::route_from_reply(route);
        self.learn(table.version);
        Ok((
            table,
            namespaces
                .namespaces
                .into_iter()
                .map(crate::namespace_from_pb)
                .collect(),
        ))
    }

    /// Like [`WireClient::lookup_batch`], but validates the reply and returns only the
    /// number of sessions found (for load generators).
    pub async fn lookup_batch_count(&self, uids: &[u64]) -> Result<usize, ClientError> {
        let body = self
            .call(Op::LookupBatch, |out| codec::lookup_batch(out, uids))
            .await?;
        let (_, sessions) = codec::count_lookup_batch(&body).map_err(protocol)?;
        Ok(sessions)
    }
}

/// The name the node's certificate must carry: `domain` if given, else the host of `address`
/// (`host:port`, `[v6]:port`); an IP address is checked as one.
fn server_name(address: &str, domain: Option<&str>) -> Result<ServerName<'static>, String> {
    let host = match domain {
        Some(domain) => domain,
        None => {
            let host = address.rsplit_once(':').map_or(address, |(host, _)| host);
            host.trim_start_matches('[').trim_end_matches(']')
        }
    };
    ServerName::try_from(host.to_owned()).map_err(|error| {
        format!("{host:?} is not a name to check a certificate against ({error})")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_server_name_is_the_domain_or_the_host_of_the_address() {
        let name = |address, domain| server_name(address, domain).unwrap().to_str().into_owned();
        assert_eq!(name("127.0.0.1:7702", None), "127.0.0.1");
        assert_eq!(name("[::1]:7702", None), "::1");
        assert_eq!(name("node-1.example:7702", None), "node-1.example");
        assert_eq!(name("127.0.0.1:7702", Some("localhost")), "localhost");
        assert!(server_name("bad name:1", None).is_err());
    }
}
