//! The tower layer in front of every gRPC service: bearer-token checks and per-call metrics.
//!
//! ```text
//!  HTTP/2 request ─► Edge::call ─┬─ token missing/wrong ─► UNAUTHENTICATED (+ auth metric)
//!                                └─ inner service (tonic Routes) ─► response
//!                                      └─ count + latency by service, method, grpc-status
//! ```
//!
//! Invariants:
//! - Tokens are compared in constant time (`subtle`), against every accepted token, so the
//!   time of a check does not tell which token or which prefix matched. (A token's length can
//!   still show; tokens should be long random strings of one length.)
//! - The gRPC health service (`grpc.health.v1.Health`) is exempt from tokens: load balancers
//!   and orchestrators probe it without credentials, and it reveals nothing but "serving".
//! - Metric labels come from fixed tables ([`METHODS`]); an unknown path is labelled
//!   `unknown`, so a client cannot create series at will.
//! - The status code is read from the `grpc-status` header: tonic sends errors of unary calls
//!   as trailers-only responses, so an absent header on a unary reply means OK. For a
//!   server-streaming call (Watch) the latency is the time to the start of the stream.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use subtle::ConstantTimeEq;
use tonic::Status;

use imstate_node::metrics::{AUTH_REJECTED, GRPC_DURATION, GRPC_REQUESTS};

/// Name of the gRPC health service, exempt from tokens.
const HEALTH_SERVICE: &str = "grpc.health.v1.Health";

/// Every (service, method) the node serves, for bounded metric labels.
const METHODS: &[(&str, &[&str])] = &[
    (
        "imstate.v1.Sequence",
        &[
            "Next",
            "NextBatch",
            "NextRange",
            "Current",
            "CurrentBatch",
            "SetMinSeq",
            "GetMinSeq",
            "CreateNamespace",
            "ListNamespaces",
        ],
    ),
    (
        "imstate.v1.Presence",
        &[
            "Login",
            "Logout",
            "Heartbeat",
            "HeartbeatBatch",
            "Lookup",
            "LookupBatch",
            "GatewayDown",
            "GatewayRegister",
            "GatewayHeartbeat",
            "OnlineCount",
            "Watch",
        ],
    ),
    ("imstate.v1.Admin", &["Status", "Checkpoint"]),
    ("imstate.v1.Replication", &["Follow"]),
    (HEALTH_SERVICE, &["Check", "Watch"]),
];

/// Accepted bearer tokens.
pub struct Tokens {
    tokens: Vec<Vec<u8>>,
}

/// Longest accepted token line, in bytes (B1: a token file is small). One limit with the wire
/// protocol, whose `Hello` frame is sized for it.
pub use imstate_wire::TOKEN_BYTES_MAX;
/// Most tokens in one file (B1: each check compares against all of them).
pub const TOKENS_MAX: usize = 1024;

impl Tokens {
    /// Parses a token file: one token per line; blank lines and `#` comments are skipped;
    /// surrounding whitespace is trimmed. An empty set is an error (it would lock everyone
    /// out).
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut tokens = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if line.len() > TOKEN_BYTES_MAX {
                return Err(format!(
                    "line {}: token longer than {TOKEN_BYTES_MAX} bytes",
                    index + 1
                ));
            }
            tokens.push(line.as_bytes().to_vec());
        }
        if tokens.is_empty() {
            return Err("no token in the file".into());
        }
        if tokens.len() > TOKENS_MAX {
            return Err(format!("more than {TOKENS_MAX} tokens"));
        }
        Ok(Self { tokens })
    }

    /// The token this node presents to its peers (the first of the file): nodes of one
    /// cluster share a token file.
    pub fn peer_token(&self) -> &[u8] {
        &self.tokens[0]
    }

    /// Whether `candidate` is an accepted token, in time independent of which one matches.
    pub fn accepts(&self, candidate: &[u8]) -> bool {
        let mut matched = subtle::Choice::from(0);
        for token in &self.tokens {
            matched |= token.as_slice().ct_eq(candidate);
        }
        matched.into()
    }
}

/// The layer: wraps the tonic router.
#[derive(Clone, Default)]
pub struct EdgeLayer {
    tokens: Option<Arc<Tokens>>,
}

impl EdgeLayer {
    /// A layer that requires one of `tokens` (if any) and records metrics.
    pub fn new(tokens: Option<Arc<Tokens>>) -> Self {
        Self { tokens }
    }
}

impl<S> tower::Layer<S> for EdgeLayer {
    type Service = Edge<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Edge {
            inner,
            tokens: self.tokens.clone(),
        }
    }
}

/// The service the layer produces.
#[derive(Clone)]
pub struct Edge<S> {
    inner: S,
    tokens: Option<Arc<Tokens>>,
}

/// The (service, method) labels of a request path `/package.Service/Method`.
fn labels(path: &str) -> (&'static str, &'static str) {
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let (service, method) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    for (known_service, methods) in METHODS {
        if *known_service == service {
            let method = methods
                .iter()
                .find(|known| **known == method)
                .copied()
                .unwrap_or("unknown");
            return (known_service, method);
        }
    }
    ("unknown", "unknown")
}

/// The label of a gRPC status code.
fn code_label(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

fn record(labels: (&'static str, &'static str), code: tonic::Code, started: Instant) {
    let (service, method) = labels;
    let code = code_label(code);
    metrics::counter!(GRPC_REQUESTS, "service" => service, "method" => method, "code" => code)
        .increment(1);
    metrics::histogram!(
        GRPC_DURATION, "service" => service, "method" => method, "code" => code
    )
    .record(started.elapsed().as_secs_f64());
}

/// Checks the `authorization` header; `Err(reason label)` when the call must be refused.
fn authorize<B>(tokens: &Tokens, request: &http::Request<B>) -> Result<(), &'static str> {
    let Some(value) = request.headers().get(http::header::AUTHORIZATION) else {
        return Err("missing");
    };
    let value = value.as_bytes();
    let Some(token) = value.strip_prefix(b"Bearer ") else {
        return Err("invalid");
    };
    if tokens.accepts(token) {
        Ok(())
    } else {
        Err("invalid")
    }
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for Edge<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let started = Instant::now();
        let labels = labels(request.uri().path());
        if let Some(tokens) = &self.tokens
            && labels.0 != HEALTH_SERVICE
            && let Err(reason) = authorize(tokens, &request)
        {
            metrics::counter!(AUTH_REJECTED, "reason" => reason).increment(1);
            record(labels, tonic::Code::Unauthenticated, started);
            let message = match reason {
                "missing" => "missing bearer token (authorization: Bearer <token>)",
                _ => "invalid bearer token",
            };
            let response = Status::unauthenticated(message).into_http();
            return Box::pin(async move { Ok(response) });
        }
        // The clone that was polled ready is the one that serves (tower's contract).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let response = inner.call(request).await?;
            let code = response
                .headers()
                .get("grpc-status")
                .and_then(|value| value.to_str().ok())
                .and_then(|value| value.parse::<i32>().ok())
                .map(tonic::Code::from)
                .unwrap_or(tonic::Code::Ok);
            record(labels, code, started);
            Ok(response)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_parse_skip_comments_and_compare_exactly() {
        let tokens = Tokens::parse("# ops\n\n  alpha-123  \nbeta\n").unwrap();
        assert!(tokens.accepts(b"alpha-123"));
        assert!(tokens.accepts(b"beta"));
        assert!(!tokens.accepts(b"alpha"));
        assert!(!tokens.accepts(b"beta2"));
        assert!(!tokens.accepts(b""));
        assert!(Tokens::parse("# nothing\n").is_err());
    }

    #[test]
    fn labels_are_bounded_to_known_methods() {
        assert_eq!(
            labels("/imstate.v1.Sequence/NextBatch"),
            ("imstate.v1.Sequence", "NextBatch")
        );
        assert_eq!(
            labels("/imstate.v1.Sequence/Whatever"),
            ("imstate.v1.Sequence", "unknown")
        );
        assert_eq!(labels("/evil/x"), ("unknown", "unknown"));
    }
}
