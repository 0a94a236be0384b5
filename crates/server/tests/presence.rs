//! The presence store end to end in one process: durable restart (P1), expiry across restarts
//! (P2), Watch ordering and the cut-off of a stalled subscriber (B1).

use std::sync::Arc;
use std::time::Duration;

use imstate_client::{Client, LoginArgs, WatchKind};
use imstate_log::{CrashMode, FaultyStorage, FsyncPolicy};
use imstate_node::clock::ManualClock;
use imstate_node::presencestore::{PresenceStore, PresenceStoreOptions};
use imstate_server::{Node, NodeConfig};
use tokio_stream::StreamExt;

const T0: u64 = 1_700_000_000_000;

fn options(fsync: FsyncPolicy) -> PresenceStoreOptions {
    // A huge tick: these tests drive expiry by hand with expire_once().
    PresenceStoreOptions {
        fsync,
        tick_ms: 1_000,
        ..PresenceStoreOptions::default()
    }
}

fn open(
    storage: &FaultyStorage,
    clock: &Arc<ManualClock>,
    fsync: FsyncPolicy,
) -> Arc<PresenceStore> {
    PresenceStore::open(storage.clone(), options(fsync), clock.clone())
        .expect("recovers")
        .0
}

#[tokio::test]
async fn restart_restores_unexpired_sessions_and_drops_expired_ones() {
    let storage = FaultyStorage::new();
    let clock = Arc::new(ManualClock::new(T0));
    let store = open(&storage, &clock, FsyncPolicy::Always);
    for uid in 0..50 {
        store
            .login(uid, "phone", "gw-a", uid * 10, 60_000, Some(b"m"))
            .await
            .unwrap();
    }
    for uid in 50..100 {
        store
            .login(uid, "pad", "gw-b", uid * 10, 5_000, None)
            .await
            .unwrap();
    }
    // Half of the short ones are kept alive by a heartbeat at +4 s.
    clock.advance(4_000);
    for uid in 50..75 {
        store.heartbeat(uid, uid * 10).await.unwrap();
    }
    store.shutdown().unwrap();
    drop(store);

    // Down for 3 s: 50..75 are due at +9 s, 75..100 were due at +5 s.
    clock.advance(3_000);
    let store = open(
        &storage.crash_image(CrashMode::DropUnsynced),
        &clock,
        FsyncPolicy::Always,
    );
    assert_eq!(store.online_count().await.unwrap(), 75);
    for uid in 0..75 {
        let sessions = store.lookup(uid).await.unwrap();
        assert_eq!(sessions.len(), 1, "uid {uid}");
        assert_eq!(sessions[0].conn, uid * 10);
    }
    assert_eq!(
        &*store.lookup(0).await.unwrap()[0].meta.clone().unwrap(),
        b"m"
    );
    for uid in 75..100 {
        assert!(
            store.lookup(uid).await.unwrap().is_empty(),
            "uid {uid} expired while the node was down"
        );
    }
    // Expiry continues from the persisted heartbeat: 50..75 go at +9 s, not before.
    clock.advance(1_999);
    store.expire_once();
    assert_eq!(store.online_count().await.unwrap(), 75);
    clock.advance(1);
    store.expire_once();
    assert_eq!(store.online_count().await.unwrap(), 50);
    store.registry().check_invariants().unwrap();
}

#[tokio::test]
async fn every_acknowledged_change_survives_a_crash_under_fsync_always() {
    let storage = FaultyStorage::new();
    let clock = Arc::new(ManualClock::new(T0));
    let store = open(&storage, &clock, FsyncPolicy::Always);
    for uid in 0..200 {
        store
            .login(uid, "d", "gw", uid, 60_000, None)
            .await
            .unwrap();
    }
    for uid in 0..50 {
        store.logout(uid, uid).await.unwrap();
    }
    // The crash image keeps only what was fsynced: every acknowledged change must be there.
    let store2 = open(
        &storage.crash_image(CrashMode::DropUnsynced),
        &clock,
        FsyncPolicy::Always,
    );
    assert_eq!(store2.online_count().await.unwrap(), 150);
    assert!(store2.lookup(10).await.unwrap().is_empty());
    assert_eq!(store2.lookup(100).await.unwrap().len(), 1);
    drop(store);
}

#[tokio::test]
async fn a_checkpoint_then_more_changes_recovers_the_same_state() {
    let storage = FaultyStorage::new();
    let clock = Arc::new(ManualClock::new(T0));
    let store = open(&storage, &clock, FsyncPolicy::Always);
    for uid in 0..300 {
        store
            .login(uid, "d", "gw", uid, 60_000, None)
            .await
            .unwrap();
    }
    store.checkpoint().unwrap();
    for uid in 0..100 {
        store.logout(uid, uid).await.unwrap();
    }
    store.gateway_register("gw2", 30_000).await.unwrap();
    store
        .login(1_000, "d", "gw2", 1, 60_000, None)
        .await
        .unwrap();
    let before = store.registry().sessions();
    let store2 = open(
        &storage.crash_image(CrashMode::DropUnsynced),
        &clock,
        FsyncPolicy::Always,
    );
    assert_eq!(store2.registry().sessions(), before);
    assert_eq!(store2.registry().gateway_leases().len(), 1);
    drop(store);
}

#[tokio::test]
async fn limits_are_clear_errors_and_change_nothing() {
    let storage = FaultyStorage::new();
    let clock = Arc::new(ManualClock::new(T0));
    let store = open(&storage, &clock, FsyncPolicy::Never);
    let device = "x".repeat(65);
    let error = store
        .login(1, &device, "gw", 1, 0, None)
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("64"), "{error}");
    let error = store.heartbeat(1, 1).await.unwrap_err().to_string();
    assert!(error.contains("uid 1 conn 1"), "{error}");
    let error = store.lookup_batch(&[]).await.unwrap_err().to_string();
    assert!(error.contains("lookup_ids_max"), "{error}");
    assert_eq!(store.online_count().await.unwrap(), 0);
}

/// Starts a real node (gRPC) on a temporary directory; returns its address.
async fn serve(
    config_text: &str,
) -> (tempfile::TempDir, String, tokio::sync::oneshot::Sender<()>) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = NodeConfig::parse(config_text).unwrap();
    config.data_dir = dir.path().to_path_buf();
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.wire_listen = "127.0.0.1:0".parse().unwrap();
    let node = Node::open(config).await.unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
    let (address_tx, address_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        node.serve(
            async {
                let _ = stop_rx.await;
            },
            |listening| {
                let _ = address_tx.send(listening.grpc.to_string());
            },
        )
        .await
        .unwrap();
    });
    (dir, address_rx.await.unwrap(), stop_tx)
}

fn login(uid: u64, device: &str, conn: u64) -> LoginArgs {
    LoginArgs {
        uid,
        device: device.into(),
        gateway: "gw".into(),
        conn,
        ttl_ms: 60_000,
        meta: Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_delivers_filtered_events_in_order() {
    let (_dir, address, _stop) = serve("").await;
    let client = Client::connect(&address).await.unwrap();
    let mut events = std::pin::pin!(client.watch(vec![7]).await.unwrap());
    client.login(login(8, "phone", 1)).await.unwrap(); // filtered out
    client.login(login(7, "phone", 1)).await.unwrap();
    client.login(login(7, "phone", 2)).await.unwrap(); // replaces conn 1
    client.logout(7, 2).await.unwrap();
    let mut seen = Vec::new();
    for _ in 0..3 {
        let event = tokio::time::timeout(Duration::from_secs(5), events.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        seen.push((
            event.kind,
            event.session.conn,
            event.replaced.map(|r| r.conn),
            event.lsn,
        ));
    }
    assert_eq!(
        seen.iter()
            .map(|(kind, conn, replaced, _)| (*kind, *conn, *replaced))
            .collect::<Vec<_>>(),
        vec![
            (WatchKind::Login, 1, None),
            (WatchKind::Login, 2, Some(1)),
            (WatchKind::Logout, 2, None)
        ]
    );
    assert!(
        seen.windows(2).all(|pair| pair[0].3 < pair[1].3),
        "lsn increases: {seen:?}"
    );
}

async fn next_event(events: &mut imstate_client::WatchStream) -> imstate_client::WatchEvent {
    tokio::time::timeout(Duration::from_secs(5), events.next())
        .await
        .expect("an event within 5 s")
        .expect("the stream is open")
        .expect("an event, not an error")
}

/// A watcher that reconnects with its position gets exactly the events of its uids that
/// happened while it was away, then live ones; a position of another log, or one older than
/// the history, is refused with OUT_OF_RANGE; and an idle filtered watcher's position keeps
/// up through PROGRESS messages, so other uids' traffic does not push it out of the history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_resumes_after_a_reconnect_with_every_missed_event() {
    let (_dir, address, _stop) = serve("[presence]\nwatch_history_events = 16\n").await;
    let client = Client::connect(&address).await.unwrap();
    let mut events = client.watch(vec![7]).await.unwrap();
    let started = events.position().clone();
    assert!(!started.log_id.is_empty());
    client.login(login(7, "phone", 1)).await.unwrap();
    assert_eq!(next_event(&mut events).await.session.conn, 1);
    let away = events.position().clone();
    assert!(away.lsn > started.lsn);
    drop(events);

    client.login(login(7, "pad", 2)).await.unwrap();
    client.login(login(8, "phone", 3)).await.unwrap(); // not watched
    client.logout(7, 1).await.unwrap();
    let mut events = client.watch_from(vec![7], Some(&away)).await.unwrap();
    let first = next_event(&mut events).await;
    let second = next_event(&mut events).await;
    assert_eq!(
        [
            (first.kind, first.session.conn),
            (second.kind, second.session.conn)
        ],
        [(WatchKind::Login, 2), (WatchKind::Logout, 1)],
        "the events missed while away, in order"
    );
    client.login(login(7, "phone", 4)).await.unwrap();
    let live = next_event(&mut events).await;
    assert_eq!((live.kind, live.session.conn), (WatchKind::Login, 4));
    assert!(first.lsn < second.lsn && second.lsn < live.lsn);

    // Idle while 40 events of other uids pass (more than the history holds): PROGRESS keeps
    // the position recent, so a resume from it is still possible and delivers nothing old.
    let before = events.position().lsn;
    for uid in 100..140 {
        client.login(login(uid, "phone", uid)).await.unwrap();
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while events.position().lsn < before + 40 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no PROGRESS moved the position past {before}"
        );
        let waited = tokio::time::timeout(Duration::from_millis(300), events.next()).await;
        assert!(waited.is_err(), "no event of uid 7 happened: {waited:?}");
    }
    let idle = events.position().clone();
    drop(events);
    let mut events = client.watch_from(vec![7], Some(&idle)).await.unwrap();
    client.logout(7, 4).await.unwrap();
    let after = next_event(&mut events).await;
    assert_eq!((after.kind, after.session.conn), (WatchKind::Logout, 4));

    // What cannot be resumed is refused, naming why.
    let old = client.watch_from(vec![7], Some(&away)).await.err().unwrap();
    assert_eq!(old.code(), Some(tonic::Code::OutOfRange), "{old}");
    assert!(
        old.to_string().contains("watch_history_events = 16"),
        "{old}"
    );
    let other_log = imstate_client::WatchPosition {
        log_id: "another-node".into(),
        lsn: away.lsn,
    };
    let other = client
        .watch_from(vec![7], Some(&other_log))
        .await
        .err()
        .unwrap();
    assert_eq!(other.code(), Some(tonic::Code::OutOfRange), "{other}");
    assert!(other.to_string().contains("another-node"), "{other}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_watcher_is_cut_off_with_resource_exhausted() {
    let (_dir, address, _stop) = serve("[presence]\nwatch_buffer_events = 64\n").await;
    let watcher = Client::connect(&address).await.unwrap();
    let mut events = std::pin::pin!(watcher.watch(Vec::new()).await.unwrap());
    // The subscriber reads nothing while far more events than the ring holds, and more bytes
    // than HTTP/2 flow control lets the server buffer, happen (logins on their own connection,
    // so the unread stream cannot block them).
    const LOGINS: u64 = 40_000;
    let writer = Client::connect(&address).await.unwrap();
    let tasks: Vec<_> = (0..8u64)
        .map(|task| {
            let writer = writer.clone();
            tokio::spawn(async move {
                for uid in (task..LOGINS).step_by(8) {
                    let mut args = login(uid, "d", uid);
                    args.meta = vec![b'm'; 250];
                    writer.login(args).await.unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let mut delivered = 0;
    let status = loop {
        let next = tokio::time::timeout(Duration::from_secs(5), events.next()).await;
        let next = next.unwrap_or_else(|_| panic!("stalled after {delivered} events"));
        match next {
            Some(Ok(_)) => delivered += 1,
            Some(Err(error)) => break error,
            None => panic!("stream ended without a status after {delivered} events"),
        }
    };
    assert_eq!(
        status.code(),
        Some(tonic::Code::ResourceExhausted),
        "{status}"
    );
    assert!(
        status.to_string().contains("watch_buffer_events = 64"),
        "{status}"
    );
    assert!(
        delivered < LOGINS,
        "a stalled subscriber got everything: nothing was bounded"
    );
    assert!(
        events.next().await.is_none(),
        "the stream ends after the status"
    );
}

/// A read never shows a change that is not durable: with the fsync failing (under `always`), a
/// login applied in memory is never shown by a lookup, a batch lookup or the online count;
/// they fail UNAVAILABLE instead (the log is poisoned and the node stops).
#[tokio::test]
async fn reads_never_show_a_change_whose_record_did_not_become_durable() {
    let storage = FaultyStorage::new();
    let clock = Arc::new(ManualClock::new(T0));
    let store = open(&storage, &clock, FsyncPolicy::Always);
    store
        .login(1, "phone", "gw", 1, 60_000, None)
        .await
        .unwrap();
    storage.fail_fsync(true);
    let request = imstate_presence::LoginRequest {
        uid: 2,
        device: "phone",
        gateway: "gw",
        conn: 2,
        ttl_ms: 60_000,
        meta: None,
    };
    store.login_applied(&request).unwrap();
    assert!(
        store.lookup(2).await.is_err(),
        "lookup showed a login that is not durable"
    );
    assert!(store.lookup_batch(&[1, 2]).await.is_err());
    assert!(store.online_count().await.is_err());
    assert!(store.log().is_poisoned());
}

/// A full log queue makes writers wait before they take a shard lock, never under it: with the
/// flusher held up by slow fsyncs and a queue of 4 records, 12 logins on a one-thread runtime
/// leave that thread free (a 10 ms timer fires at once). An append that blocked under the shard
/// lock used to stop the whole worker until the disk caught up.
#[tokio::test(flavor = "current_thread")]
async fn a_full_log_queue_applies_back_pressure_before_the_shard_lock() {
    let storage = FaultyStorage::new();
    let options = PresenceStoreOptions {
        log_queue_records_max: 4,
        ..options(FsyncPolicy::Always)
    };
    let clock = Arc::new(ManualClock::new(T0));
    let store = PresenceStore::open(storage.clone(), options, clock)
        .unwrap()
        .0;
    storage.stall_fsync(Duration::from_millis(300));
    let logins: Vec<_> = (0..12u64)
        .map(|uid| {
            let store = Arc::clone(&store);
            tokio::spawn(async move { store.login(uid, "phone", "gw", uid, 60_000, None).await })
        })
        .collect();
    let started = std::time::Instant::now();
    tokio::time::sleep(Duration::from_millis(10)).await;
    let timer = started.elapsed();
    storage.stall_fsync(Duration::ZERO);
    for login in logins {
        login.await.unwrap().unwrap();
    }
    assert!(
        timer < Duration::from_millis(250),
        "the runtime thread was blocked for {timer:?} behind a full log queue"
    );
    assert_eq!(store.online_count().await.unwrap(), 12);
}
