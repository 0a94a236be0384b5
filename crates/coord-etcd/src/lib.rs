//! `imstate-coord-etcd`: [`imstate_coord::Coordinator`] on a real etcd (v3 API, through the
//! `etcd-client` crate, the maintained tonic-based client).
//!
//! Each [`Request`] maps to one etcd call: a lease grant, one keep-alive on a short-lived
//! keep-alive stream, a revoke, or a txn whose compares and operations translate one to one
//! (revisions, lease ids and byte values are etcd's own). Every call is bounded by the
//! request timeout; a timeout or a transport error is [`Response::Failed`] naming the
//! endpoints, with the outcome unknown, as the contract says.
//!
//! Also here: [`EtcdProcess`], which starts a throwaway etcd on loopback with free ports and
//! a temporary data directory, for tests and `scripts/cluster.sh`-style demos, and
//! [`loopback_port`], the free port such tests give their own servers.

#![deny(missing_docs)]

mod process;

use std::time::Duration;

use etcd_client::{
    Client, Compare as EtcdCompare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions,
    Txn as EtcdTxn, TxnOp, TxnOpResponse, WatchOptions,
};
use imstate_coord::{
    BoxFuture, CoordError, Coordinator, KeyValue, Op, Request, Response, Target, Txn, TxnResponse,
};

pub use process::{EtcdProcess, loopback_port};

/// A coordinator on an etcd cluster.
#[derive(Clone)]
pub struct EtcdCoordinator {
    client: Client,
    endpoints: Vec<String>,
    timeout: Duration,
}

impl std::fmt::Debug for EtcdCoordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdCoordinator")
            .field("endpoints", &self.endpoints)
            .finish()
    }
}

impl EtcdCoordinator {
    /// Connects to `endpoints` (`host:port` or `http://host:port`); every later call is
    /// bounded by `timeout`. Fails with the endpoints named when none answers in `timeout`.
    pub async fn connect(endpoints: &[String], timeout: Duration) -> Result<Self, CoordError> {
        let options = ConnectOptions::new()
            .with_connect_timeout(timeout)
            .with_timeout(timeout)
            .with_keep_alive(Duration::from_secs(2), timeout);
        let connect = Client::connect(endpoints.to_vec(), Some(options));
        let client = match tokio::time::timeout(timeout, connect).await {
            Ok(Ok(client)) => client,
            Ok(Err(error)) => {
                return Err(CoordError::Unreachable(format!(
                    "etcd at {}: {error}",
                    endpoints.join(",")
                )));
            }
            Err(_) => {
                return Err(CoordError::Unreachable(format!(
                    "etcd at {}: no answer in {} ms",
                    endpoints.join(","),
                    timeout.as_millis()
                )));
            }
        };
        let coordinator = Self {
            client,
            endpoints: endpoints.to_vec(),
            timeout,
        };
        // A round trip now, so that a wrong address fails at start, not at first use.
        match coordinator
            .call(Request::Txn(Txn {
                success: vec![Op::get("/imstate/")],
                ..Txn::default()
            }))
            .await
        {
            Response::Failed(error) => Err(error),
            _ => Ok(coordinator),
        }
    }

    fn unreachable(&self, error: impl std::fmt::Display) -> Response {
        Response::Failed(CoordError::Unreachable(format!(
            "etcd at {}: {error}",
            self.endpoints.join(",")
        )))
    }

    async fn run(&self, request: Request) -> Result<Response, etcd_client::Error> {
        let mut client = self.client.clone();
        Ok(match request {
            Request::LeaseGrant { ttl_ms } => {
                // etcd counts whole seconds.
                let ttl = ttl_ms.div_ceil(1000).max(1) as i64;
                let granted = client.lease_grant(ttl, None).await?;
                Response::Granted {
                    lease: granted.id(),
                }
            }
            Request::KeepAlive { lease } => {
                let kept = async {
                    let (mut keeper, mut stream) = client.lease_keep_alive(lease).await?;
                    keeper.keep_alive().await?;
                    Ok::<_, etcd_client::Error>(match stream.message().await? {
                        Some(response) => response.ttl() > 0,
                        None => false,
                    })
                };
                match kept.await {
                    Ok(alive) => Response::KeptAlive { alive },
                    // etcd answers a keep-alive of a lapsed lease with an error, not a TTL of 0.
                    Err(error) if error.to_string().contains("lease not found") => {
                        Response::KeptAlive { alive: false }
                    }
                    Err(error) => return Err(error),
                }
            }
            Request::Revoke { lease } => {
                match client.lease_revoke(lease).await {
                    Ok(_) => {}
                    // Already gone: what a revoke wants.
                    Err(error) if error.to_string().contains("not found") => {}
                    Err(error) => return Err(error),
                }
                Response::Revoked
            }
            Request::Txn(txn) => {
                let response = client.txn(translate(&txn)).await?;
                let mut gets = Vec::new();
                for op in response.op_responses() {
                    if let TxnOpResponse::Get(get) = op {
                        gets.push(
                            get.kvs()
                                .iter()
                                .map(|kv| KeyValue {
                                    key: String::from_utf8_lossy(kv.key()).into_owned(),
                                    value: kv.value().to_vec(),
                                    create_revision: kv.create_revision(),
                                    mod_revision: kv.mod_revision(),
                                    lease: kv.lease(),
                                })
                                .collect(),
                        );
                    }
                }
                Response::Txn(TxnResponse {
                    succeeded: response.succeeded(),
                    revision: response.header().map_or(0, |header| header.revision()),
                    gets,
                })
            }
        })
    }
}

fn translate(txn: &Txn) -> EtcdTxn {
    let compare: Vec<EtcdCompare> = txn
        .compare
        .iter()
        .map(|compare| match &compare.target {
            Target::CreateRevision(revision) => {
                EtcdCompare::create_revision(compare.key.as_str(), CompareOp::Equal, *revision)
            }
            Target::ModRevision(revision) => {
                EtcdCompare::mod_revision(compare.key.as_str(), CompareOp::Equal, *revision)
            }
            Target::Value(value) => {
                EtcdCompare::value(compare.key.as_str(), CompareOp::Equal, value.clone())
            }
        })
        .collect();
    let ops = |ops: &[Op]| -> Vec<TxnOp> {
        ops.iter()
            .map(|op| match op {
                Op::Put { key, value, lease } => TxnOp::put(
                    key.as_str(),
                    value.clone(),
                    lease.map(|lease| PutOptions::new().with_lease(lease)),
                ),
                Op::Get { key, prefix } => TxnOp::get(
                    key.as_str(),
                    prefix.then(|| GetOptions::new().with_prefix()),
                ),
                Op::Delete { key } => TxnOp::delete(key.as_str(), None),
            })
            .collect()
    };
    EtcdTxn::new()
        .when(compare)
        .and_then(ops(&txn.success))
        .or_else(ops(&txn.failure))
}

impl Coordinator for EtcdCoordinator {
    fn call(&self, request: Request) -> BoxFuture<'_, Response> {
        Box::pin(async move {
            match tokio::time::timeout(self.timeout, self.run(request)).await {
                Ok(Ok(response)) => response,
                Ok(Err(error)) => self.unreachable(error),
                Err(_) => {
                    self.unreachable(format!("no answer in {} ms", self.timeout.as_millis()))
                }
            }
        })
    }

    fn describe(&self) -> String {
        format!("etcd at {}", self.endpoints.join(","))
    }

    fn wait_deleted(&self, key: String, revision: i64) -> BoxFuture<'_, Result<(), CoordError>> {
        Box::pin(async move {
            let fail = |error: etcd_client::Error| {
                CoordError::Unreachable(format!(
                    "etcd at {}: watch: {error}",
                    self.endpoints.join(",")
                ))
            };
            let mut client = self.client.clone();
            let options = WatchOptions::new().with_start_revision(revision + 1);
            let mut stream = client.watch(key, Some(options)).await.map_err(fail)?;
            while let Some(response) = stream.message().await.map_err(fail)? {
                if response
                    .events()
                    .iter()
                    .any(|event| event.event_type() == EventType::Delete)
                {
                    return Ok(());
                }
                if response.canceled() {
                    break;
                }
            }
            Err(CoordError::Unreachable(format!(
                "etcd at {}: the watch ended",
                self.endpoints.join(",")
            )))
        })
    }
}
