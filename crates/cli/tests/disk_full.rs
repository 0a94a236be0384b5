//! A full disk through both front doors (gRPC and the wire protocol), on a small tmpfs (needs
//! root, as CI has): the write that meets ENOSPC poisons the presence log, and then
//!
//! - the node stops at once, whichever front door or thread met the failure (it used to go on
//!   answering lookups for as long as no gRPC write arrived);
//! - nothing acknowledged is lost (P1): after the disk is grown and the node restarted, every
//!   acknowledged login is there;
//! - no read showed a change that was not durable: every session a lookup returned before the
//!   stop is there after the restart too.

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use imstate_client::{Client, LoginArgs, WireClient};
use parking_lot::Mutex;
use support::Server;

/// A tmpfs mounted on a temporary directory, unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "mounting a tmpfs failed: this test needs root (CI runs as root)"
        );
        Self { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn grow(&self, size: &str) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(self.path())
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.path()).status();
    }
}

fn login(uid: u64) -> LoginArgs {
    LoginArgs {
        uid,
        device: "phone".into(),
        gateway: "gw-disk".into(),
        conn: uid,
        ttl_ms: 3_600_000,
        meta: vec![b'm'; 200],
    }
}

#[derive(Clone, Copy, Debug)]
enum Door {
    Grpc,
    Wire,
}

/// Logs in until the node refuses or goes away; returns the acknowledged uids. A reader looks
/// up the uids just past the acknowledged ones meanwhile and keeps every one it saw.
fn fill_until_full(server: &Server, door: Door) -> (BTreeSet<u64>, BTreeSet<u64>) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let acked = Arc::new(Mutex::new(BTreeSet::new()));
        let seen = Arc::new(Mutex::new(BTreeSet::new()));
        let next = Arc::new(std::sync::atomic::AtomicU64::new(1));
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let (seen, next, done) = (seen.clone(), next.clone(), done.clone());
            let wire_addr = server.wire_addr.clone();
            tokio::spawn(async move {
                let Ok(client) = WireClient::connect(&wire_addr, "").await else {
                    return;
                };
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    let from = next.load(std::sync::atomic::Ordering::Relaxed);
                    let uids: Vec<u64> = (from.saturating_sub(50)..from + 200).collect();
                    let Ok(found) = client.lookup_batch(&uids).await else {
                        return;
                    };
                    let mut seen = seen.lock();
                    for (uid, sessions) in uids.iter().zip(found) {
                        if !sessions.is_empty() {
                            seen.insert(*uid);
                        }
                    }
                }
            })
        };
        let started = Instant::now();
        // Bounded: the tmpfs fills long before this many logins or this long.
        let mut uid = 1;
        'fill: while uid < 2_000_000 && started.elapsed() < Duration::from_secs(60) {
            // 16 logins in flight at a time, so several are applied when the write fails.
            let batch: Vec<u64> = (uid..uid + 16).collect();
            uid += 16;
            next.store(uid, std::sync::atomic::Ordering::Relaxed);
            let results = match door {
                Door::Wire => {
                    let Ok(client) = WireClient::connect(&server.wire_addr, "").await else {
                        break 'fill;
                    };
                    let client = Arc::new(client);
                    let calls = batch.iter().map(|&uid| {
                        let client = client.clone();
                        async move { client.login(&login(uid)).await.is_ok() }
                    });
                    futures::future::join_all(calls).await
                }
                Door::Grpc => {
                    let Ok(client) = Client::connect(&server.addr).await else {
                        break 'fill;
                    };
                    let calls = batch.iter().map(|&uid| {
                        let client = client.clone();
                        async move { client.login(login(uid)).await.is_ok() }
                    });
                    futures::future::join_all(calls).await
                }
            };
            let mut acked = acked.lock();
            for (&uid, ok) in batch.iter().zip(&results) {
                if *ok {
                    acked.insert(uid);
                }
            }
            if results.iter().any(|ok| !ok) {
                break;
            }
        }
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = tokio::time::timeout(Duration::from_secs(10), reader).await;
        let acked = acked.lock().clone();
        let seen = seen.lock().clone();
        (acked, seen)
    })
}

fn full_disk_stops_the_node_and_loses_nothing_acknowledged(door: Door) {
    let tmpfs = Tmpfs::mount("3m");
    let data_dir: PathBuf = tmpfs.path().join("data");
    let mut server = Server::start_with(&data_dir, None, &[], &[]);
    let (acked, seen) = fill_until_full(&server, door);
    assert!(
        acked.len() > 100,
        "{door:?}: only {} logins before the disk filled",
        acked.len()
    );
    let status = server
        .wait_exit_within(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("{door:?}: the node kept running with a poisoned log"));
    assert!(
        !status.success(),
        "{door:?}: a poisoned log must exit non-zero"
    );
    tmpfs.grow("64m");
    server.restart();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let recovered: BTreeSet<u64> = runtime.block_on(async {
        let client = WireClient::connect(&server.wire_addr, "").await.unwrap();
        let last = acked.iter().chain(&seen).max().copied().unwrap_or(0) + 500;
        let mut recovered = BTreeSet::new();
        let uids: Vec<u64> = (1..=last).collect();
        for chunk in uids.chunks(5_000) {
            let found = client.lookup_batch(chunk).await.unwrap();
            for (uid, sessions) in chunk.iter().zip(found) {
                if !sessions.is_empty() {
                    recovered.insert(*uid);
                }
            }
        }
        recovered
    });
    let lost: Vec<_> = acked.difference(&recovered).collect();
    assert!(
        lost.is_empty(),
        "{door:?}: acknowledged logins lost: {lost:?}"
    );
    let unacknowledged_reads: Vec<_> = seen.difference(&recovered).collect();
    assert!(
        unacknowledged_reads.is_empty(),
        "{door:?}: lookups showed sessions that were never durable: {unacknowledged_reads:?}"
    );
    println!(
        "{door:?}: {} logins acknowledged, {} seen by lookups, {} recovered",
        acked.len(),
        seen.len(),
        recovered.len()
    );
}

#[test]
fn full_disk_through_the_wire_protocol() {
    full_disk_stops_the_node_and_loses_nothing_acknowledged(Door::Wire);
}

#[test]
fn full_disk_through_grpc() {
    full_disk_stops_the_node_and_loses_nothing_acknowledged(Door::Grpc);
}
