//! The coordinator as the node sees it: an async [`Coordinator`] that carries out one
//! [`Request`] at a time, and [`LocalCoordinator`], the in-process implementation over
//! [`crate::sim::SimCoordinator`] (for tests of the node's cluster driver without etcd).
//!
//! Contract of [`Coordinator::call`]: it resolves within the implementation's request timeout,
//! with the response or [`Response::Failed`]; after a `Failed`, the request may or may not have
//! taken effect. Calls may run concurrently; each is linearizable on its own.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::sim::SimCoordinator;
use crate::{CoordError, Millis, Request, Response};

/// A boxed future, for object-safe async calls.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A coordinator the node can call.
pub trait Coordinator: Send + Sync + 'static {
    /// Carries out `request` (see the module documentation for the contract).
    fn call(&self, request: Request) -> BoxFuture<'_, Response>;

    /// What to name in errors: the endpoints.
    fn describe(&self) -> String;

    /// Resolves once `key` is deleted at a revision after `revision` (a watch, not polling,
    /// on etcd), or when the watch cannot go on (`Err`: the caller falls back to its timer).
    fn wait_deleted(&self, key: String, revision: i64) -> BoxFuture<'_, Result<(), CoordError>>;
}

/// A monotonic clock in milliseconds, for leases and lock-delays (never the wall clock).
pub trait MonotonicClock: Send + Sync + 'static {
    /// Now, in ms since an arbitrary fixed origin.
    fn now_ms(&self) -> Millis;
}

/// The process's monotonic clock (`CLOCK_MONOTONIC` through [`Instant`]).
#[derive(Debug, Clone, Copy)]
pub struct SystemMonotonic {
    origin: Instant,
}

impl Default for SystemMonotonic {
    fn default() -> Self {
        Self {
            origin: Instant::now(),
        }
    }
}

impl MonotonicClock for SystemMonotonic {
    fn now_ms(&self) -> Millis {
        // 1 s of offset: 0 means "never" in the cluster logic's timestamps.
        1_000 + self.origin.elapsed().as_millis() as Millis
    }
}

/// An in-process coordinator: the simulated store, timed by the process's monotonic clock,
/// shared by every node of a test through an `Arc`.
#[derive(Debug, Clone)]
pub struct LocalCoordinator {
    store: Arc<Mutex<SimCoordinator>>,
    clock: SystemMonotonic,
}

impl Default for LocalCoordinator {
    fn default() -> Self {
        Self {
            store: Arc::new(Mutex::new(SimCoordinator::new())),
            clock: SystemMonotonic::default(),
        }
    }
}

impl LocalCoordinator {
    /// Runs `f` on the store (for tests: inspect or inject faults).
    pub fn with_store<T>(&self, f: impl FnOnce(&mut SimCoordinator, Millis) -> T) -> T {
        let now = self.clock.now_ms();
        let mut store = self.store.lock().expect("the store lock is never poisoned");
        store.expire(now);
        f(&mut store, now)
    }
}

impl Coordinator for LocalCoordinator {
    fn call(&self, request: Request) -> BoxFuture<'_, Response> {
        let response = self.with_store(|store, now| store.handle(now, &request));
        Box::pin(async move { response })
    }

    fn describe(&self) -> String {
        "the in-process coordinator".into()
    }

    fn wait_deleted(&self, _key: String, _revision: i64) -> BoxFuture<'_, Result<(), CoordError>> {
        // The in-process model has no watches: the caller falls back to its timer.
        Box::pin(async {
            Err(CoordError::Refused(
                "the in-process coordinator has no watches".into(),
            ))
        })
    }
}
