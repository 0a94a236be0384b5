//! The node's HTTP listener: `/metrics` (Prometheus text), `/healthz` and `/readyz`.
//!
//! ```text
//!  run(): lock data dir ─► http::start ─► recover (long) ─► Health::serving ─► serve gRPC
//!                              │                                 │
//!                              ▼                                 ▼
//!   /healthz  200 as soon as the process answers     /readyz  503 "recovering" ... 200 "ready"
//! ```
//!
//! It runs on its own thread with its own single-threaded tokio runtime, so it answers while
//! recovery keeps the main runtime busy, and it is up before recovery starts: an orchestrator
//! sees "alive, not ready" during a long replay instead of a refused connection.
//!
//! `/readyz` is 200 only when recovery is over, the gRPC listener is bound, neither log is
//! poisoned, no store has failed, and the node is not shutting down; otherwise 503 with the
//! reason in the body. Limits: requests are tiny GETs; the router has three routes and no body
//! parsing, so a request costs at most one render of the metrics.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;

use imstate_node::NodeError;
use imstate_node::presencestore::PresenceStore;
use imstate_node::sequences::Sequences;

/// How often the recorder's histogram buffers are drained when nobody scrapes.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

const PHASE_RECOVERING: u8 = 0;
const PHASE_SERVING: u8 = 1;
const PHASE_STOPPING: u8 = 2;

/// What `/readyz` and the scrape need to know about the node, shared with the server.
pub struct Health {
    started: Instant,
    phase: AtomicU8,
    /// Set once recovery is over.
    stores: OnceLock<(Sequences, Arc<PresenceStore>)>,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            phase: AtomicU8::new(PHASE_RECOVERING),
            stores: OnceLock::new(),
        }
    }
}

impl Health {
    /// Recovery is over: the stores exist (the node is not serving yet).
    pub fn recovered(&self, seq: Sequences, presence: Arc<PresenceStore>) {
        let _ = self.stores.set((seq, presence));
    }

    /// The gRPC listener is bound and serving.
    pub fn serving(&self) {
        self.phase.store(PHASE_SERVING, Ordering::Release);
    }

    /// The node is draining and will exit.
    pub fn stopping(&self) {
        self.phase.store(PHASE_STOPPING, Ordering::Release);
    }

    /// Time since this value was created (the start of the process, in practice).
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// `Ok` when ready, or why not.
    pub fn ready(&self) -> Result<(), String> {
        let Some((seq, presence)) = self.stores.get() else {
            return Err("recovering".into());
        };
        let mut logs = vec![("presence", presence.log())];
        let mut fatals = vec![presence.fatal()];
        if let Some(store) = seq.embedded() {
            logs.push(("seq", store.log()));
            fatals.push(store.fatal());
        }
        for (name, log) in logs {
            if log.is_poisoned() {
                return Err(format!("the {name} log is poisoned"));
            }
        }
        for fatal in fatals {
            if let Some(reason) = &*fatal.borrow() {
                return Err(format!("failed: {reason}"));
            }
        }
        if let Sequences::Cluster(store) = seq
            && !store.cluster().ready()
        {
            let status = store.cluster().status();
            return Err(match status.blocked_by {
                Some(holder) => format!(
                    "node id `{}` is registered by another process: {holder}",
                    status.node
                ),
                None => format!(
                    "cluster: not a confirmed member with a route table yet ({})",
                    store.cluster().coordinator().describe()
                ),
            });
        }
        match self.phase.load(Ordering::Acquire) {
            PHASE_SERVING => Ok(()),
            PHASE_STOPPING => Err("stopping".into()),
            _ => Err("recovered, not serving yet".into()),
        }
    }
}

/// The running HTTP listener; stops (and joins its thread) on drop.
pub struct HttpServer {
    address: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl HttpServer {
    /// The bound address (useful with port 0).
    pub fn address(&self) -> SocketAddr {
        self.address
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Binds `address` now (so "address in use" is a start-up error) and serves on a new thread.
pub fn start(
    address: SocketAddr,
    health: Arc<Health>,
    metrics: Option<PrometheusHandle>,
) -> Result<HttpServer, NodeError> {
    let fail = |error: std::io::Error| {
        NodeError::Io(format!(
            "cannot listen on {address} (metrics_listen): {error}"
        ))
    };
    let listener = std::net::TcpListener::bind(address).map_err(fail)?;
    listener.set_nonblocking(true).map_err(fail)?;
    let bound = listener.local_addr().map_err(fail)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|error| NodeError::Io(format!("HTTP runtime: {error}")))?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let router = router(health, metrics.clone());
    let thread = std::thread::Builder::new()
        .name("imstate-http".into())
        .spawn(move || {
            runtime.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(listener) => listener,
                    Err(error) => {
                        tracing::error!(%error, "HTTP listener");
                        return;
                    }
                };
                if let Some(handle) = metrics {
                    tokio::spawn(async move {
                        let mut interval = tokio::time::interval(UPKEEP_INTERVAL);
                        loop {
                            interval.tick().await;
                            handle.run_upkeep();
                        }
                    });
                }
                let served = axum::serve(listener, router)
                    .with_graceful_shutdown(async move {
                        let _ = stopped.await;
                    })
                    .await;
                if let Err(error) = served {
                    tracing::error!(%error, "HTTP listener stopped");
                }
            });
        })
        .map_err(|error| NodeError::Io(format!("spawning the HTTP thread: {error}")))?;
    Ok(HttpServer {
        address: bound,
        stop: Some(stop),
        thread: Some(thread),
    })
}

fn router(health: Arc<Health>, metrics: Option<PrometheusHandle>) -> Router {
    let ready_health = Arc::clone(&health);
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let health = Arc::clone(&ready_health);
                async move {
                    match health.ready() {
                        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
                        Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")),
                    }
                }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let health = Arc::clone(&health);
                let metrics = metrics.clone();
                async move { render(&health, metrics.as_ref()).into_response() }
            }),
        )
}

/// Refreshes the scrape-time gauges and renders every series.
fn render(health: &Health, metrics: Option<&PrometheusHandle>) -> impl IntoResponse {
    let Some(handle) = metrics else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            "metrics are disabled in this process\n".to_string(),
        );
    };
    if let Some((seq, presence)) = health.stores.get() {
        imstate_node::metrics::refresh(seq, presence);
    }
    imstate_node::metrics::refresh_process();
    metrics::gauge!(imstate_node::metrics::PROCESS_UPTIME).set(health.uptime().as_secs_f64());
    metrics::gauge!(imstate_node::metrics::READY).set(if health.ready().is_ok() {
        1.0
    } else {
        0.0
    });
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        handle.render(),
    )
}
