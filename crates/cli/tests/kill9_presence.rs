//! P1 under kill -9 of the real binary: concurrent gateways log sessions in while the server is
//! killed at random moments and restarted; after every restart every acknowledged login must be
//! there. Run under `fsync=always` and under the default `batch:10ms` (which acknowledges after
//! write(2), so kill -9, unlike power loss, must lose nothing either), over gRPC and over the
//! wire protocol with pipelined logins (where one durability wait covers a whole burst).
//!
//! Negative controls: built with `--features planted-presence-ack-before-log` (acknowledge before
//! the log write), the same loop must report lost logins; built with `--features
//! planted-wire-ack-before-durable` (the wire listener answers a burst before its durability
//! wait), the wire loop must.

mod support;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use imstate_client::{Client, LoginArgs, WireClient};
use parking_lot::Mutex;
use rand::{Rng, SeedableRng, rngs::StdRng};
use support::Server;

const KILLS: usize = 8;
const WORKERS: u64 = 6;

/// Logins in flight per wire connection.
const WIRE_PIPELINE: u64 = 8;

type Acked = Arc<Mutex<HashSet<(u64, u64)>>>;

/// How the gateways talk to the node.
#[derive(Clone, Copy, Debug)]
enum Protocol {
    Grpc,
    /// The wire protocol, [`WIRE_PIPELINE`] logins in flight.
    Wire,
}

fn login_args(worker: u64, n: u64) -> LoginArgs {
    LoginArgs {
        uid: worker * 1_000_000 + n,
        device: "phone".into(),
        gateway: format!("gw{worker}"),
        conn: n,
        ttl_ms: 600_000,
        meta: Vec::new(),
    }
}

/// Sends bursts of pipelined logins over the wire protocol, reconnecting after each kill.
async fn wire_gateway(addr: String, worker: u64, acked: Acked, stop: Arc<AtomicBool>) {
    let mut next = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let Ok(client) = WireClient::connect(&addr, "").await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        while !stop.load(Ordering::Relaxed) {
            let mut burst = tokio::task::JoinSet::new();
            for _ in 0..WIRE_PIPELINE {
                let (client, args) = (client.clone(), login_args(worker, next));
                next += 1;
                burst.spawn(async move {
                    let key = (args.uid, args.conn);
                    let result =
                        tokio::time::timeout(Duration::from_secs(2), client.login(&args)).await;
                    matches!(result, Ok(Ok(_))).then_some(key)
                });
            }
            let mut failed = false;
            while let Some(outcome) = burst.join_next().await {
                match outcome.unwrap() {
                    Some(key) => {
                        acked.lock().insert(key);
                    }
                    None => failed = true,
                }
            }
            if failed {
                break;
            }
        }
    }
}

async fn gateway(addr: String, worker: u64, acked: Acked, stop: Arc<AtomicBool>) {
    let mut client: Option<Client> = None;
    let mut next = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let Some(connected) = support::reconnect(&mut client, &addr).await else {
            continue;
        };
        let login = login_args(worker, next);
        let (uid, conn) = (login.uid, login.conn);
        next += 1;
        match tokio::time::timeout(Duration::from_secs(2), connected.login(login)).await {
            Ok(Ok(_)) => {
                acked.lock().insert((uid, conn));
            }
            _ => client = None,
        }
    }
}

/// Returns (acknowledged logins, lost after restarts).
fn kill_loop(fsync: &str, seed: u64, protocol: Protocol) -> (usize, usize) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("imstate.toml");
    // Small segments: the log rolls many times between kills, into preallocated spares once
    // a segment is half written, so kill -9 lands in writes over zeros, in the middle of
    // preallocations and around rolls.
    std::fs::write(
        &config,
        format!("[presence]\nfsync = \"{fsync}\"\nsegment_bytes = 65536\n"),
    )
    .unwrap();
    let mut server = Server::start(&dir.path().join("data"), Some(&config));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let acked: Acked = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..WORKERS)
        .map(|w| match protocol {
            Protocol::Grpc => {
                runtime.spawn(gateway(server.addr.clone(), w, acked.clone(), stop.clone()))
            }
            Protocol::Wire => runtime.spawn(wire_gateway(
                server.wire_addr.clone(),
                w,
                acked.clone(),
                stop.clone(),
            )),
        })
        .collect();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut lost = HashSet::new();
    for _ in 0..KILLS {
        std::thread::sleep(Duration::from_millis(rng.gen_range(100..400)));
        server.kill9();
        // What was acknowledged before the kill is what must survive it.
        let before: Vec<(u64, u64)> = acked.lock().iter().copied().collect();
        server.restart();
        let found = runtime.block_on(async {
            let client = Client::connect(&server.addr).await.unwrap();
            let mut found = HashSet::new();
            for chunk in before.chunks(5_000) {
                let uids = chunk.iter().map(|&(uid, _)| uid).collect();
                for sessions in client.lookup_batch(uids).await.unwrap() {
                    found.extend(sessions.iter().map(|s| (s.uid, s.conn)));
                }
            }
            found
        });
        lost.extend(before.iter().filter(|key| !found.contains(key)).copied());
    }
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        runtime.block_on(worker).unwrap();
    }
    let acked = acked.lock().len();
    eprintln!(
        "presence kill9 fsync={fsync} {protocol:?}: {KILLS} kills, {acked} logins acknowledged, \
         {} lost",
        lost.len()
    );
    (acked, lost.len())
}

#[cfg(not(feature = "planted-presence-ack-before-log"))]
#[test]
fn kill9_loses_no_acknowledged_login_under_fsync_always() {
    let (acked, lost) = kill_loop("always", 1, Protocol::Grpc);
    assert!(
        acked > 500,
        "too few logins ({acked}) for the test to mean anything"
    );
    assert_eq!(lost, 0, "P1: acknowledged logins lost under fsync=always");
}

#[cfg(not(feature = "planted-presence-ack-before-log"))]
#[test]
fn kill9_loses_no_acknowledged_login_under_batch_10ms() {
    let (acked, lost) = kill_loop("batch:10ms", 2, Protocol::Grpc);
    assert!(
        acked > 500,
        "too few logins ({acked}) for the test to mean anything"
    );
    // Acknowledgements wait for write(2): only power loss can take the unsynced window.
    assert_eq!(
        lost, 0,
        "acknowledged logins lost to kill -9 under batch:10ms"
    );
}

#[cfg(not(any(
    feature = "planted-presence-ack-before-log",
    feature = "planted-wire-ack-before-durable"
)))]
#[test]
fn kill9_loses_no_acknowledged_pipelined_wire_login_under_fsync_always() {
    let (acked, lost) = kill_loop("always", 4, Protocol::Wire);
    assert!(
        acked > 500,
        "too few logins ({acked}) for the test to mean anything"
    );
    assert_eq!(
        lost, 0,
        "P1: acknowledged wire logins lost under fsync=always"
    );
}

#[cfg(feature = "planted-presence-ack-before-log")]
#[test]
fn planted_ack_before_log_write_is_caught() {
    let (acked, lost) = kill_loop("always", 3, Protocol::Grpc);
    assert!(acked > 500);
    assert!(
        lost > 0,
        "the planted bug lost nothing: the kill -9 check cannot fail"
    );
}

#[cfg(feature = "planted-presence-ack-before-log")]
#[test]
fn planted_ack_before_log_write_is_caught_over_the_wire() {
    let (acked, lost) = kill_loop("always", 5, Protocol::Wire);
    assert!(acked > 500);
    assert!(
        lost > 0,
        "the planted bug lost nothing over the wire: the kill -9 check cannot fail"
    );
}

#[cfg(feature = "planted-wire-ack-before-durable")]
#[test]
fn planted_wire_ack_before_durable_is_caught() {
    let (acked, lost) = kill_loop("always", 6, Protocol::Wire);
    assert!(acked > 500);
    assert!(
        lost > 0,
        "the planted wire bug lost nothing: the kill -9 check cannot fail"
    );
}
