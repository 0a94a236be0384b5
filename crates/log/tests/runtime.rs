//! Scenarios of a running log: poisoning, checkpoints, fsync policies, backpressure, async
//! waiters and API edge cases.

mod support;

use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use imstate_log::{
    CheckpointStats, CrashMode, FaultyStorage, FsyncPolicy, Log, LogError, LogOptions,
};
use support::{open, payload, small_segments};

#[test]
fn fsync_failure_poisons_forever_without_retry() {
    let storage = FaultyStorage::new();
    let (log, _, _) = open(storage.clone(), LogOptions::default()).expect("open");
    let lsn = log.append(b"ok".to_vec()).expect("append");
    log.wait_durable(lsn).expect("durable before the failure");

    storage.fail_fsync(true);
    let fsyncs_before = storage.fsync_calls();
    let lsn = log.append(b"doomed".to_vec()).expect("append is queued");
    match log.wait_durable(lsn) {
        Err(LogError::Poisoned(message)) => assert!(message.contains("fsync"), "{message}"),
        other => panic!("expected poison, got {other:?}"),
    }
    assert!(log.is_poisoned());
    assert!(matches!(
        log.append(b"later".to_vec()),
        Err(LogError::Poisoned(_))
    ));
    assert!(matches!(log.wait_durable(lsn), Err(LogError::Poisoned(_))));
    assert!(matches!(
        log.checkpoint(1, |_| Ok(())),
        Err(LogError::Poisoned(_))
    ));
    // Fsyncs work again, but the log must not retry: dirty pages may already be gone.
    storage.fail_fsync(false);
    assert!(matches!(log.shutdown(), Err(LogError::Poisoned(_))));
    assert_eq!(
        storage.fsync_calls(),
        fsyncs_before + 1,
        "exactly one fsync attempt"
    );
    assert_eq!(log.durable_lsn(), 1);
    assert!(log.stats().poisoned);
}

#[test]
fn write_failure_poisons_blocked_waiters_on_other_threads() {
    let storage = FaultyStorage::new();
    let (log, _, _) = open(storage.clone(), LogOptions::default()).expect("open");
    let log = Arc::new(log);
    storage.fail_from_op(Some(storage.ops()));
    let lsn = log.append(b"never written".to_vec()).expect("queued");
    let waiter = {
        let log = Arc::clone(&log);
        std::thread::spawn(move || log.wait_durable(lsn))
    };
    assert!(matches!(
        waiter.join().expect("join"),
        Err(LogError::Poisoned(_))
    ));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    assert!(matches!(
        runtime.block_on(log.durable(lsn)),
        Err(LogError::Poisoned(_))
    ));
}

#[test]
fn checkpoint_removes_covered_segments_and_reopen_starts_from_it() {
    let storage = FaultyStorage::new();
    let options = small_segments();
    let (log, _, _) = open(storage.clone(), options.clone()).expect("open");
    for index in 1..=40 {
        log.append(payload(index)).expect("append");
    }
    log.wait_durable(40).expect("durable");
    let segments_before = log.stats().segments;
    assert!(segments_before > 3);
    assert!(log.bytes_since_checkpoint() > 0);

    let stats = log
        .checkpoint(40, |out| out.write_all(b"state at 40"))
        .expect("checkpoint");
    assert_eq!((stats.covered_lsn, stats.bytes), (40, 11));
    assert_eq!(stats.segments_removed, segments_before - 1);
    assert_eq!(log.stats().segments, 1);
    assert_eq!(log.stats().last_checkpoint_lsn, Some(40));
    let names = storage.file_names();
    assert_eq!(
        names.iter().filter(|name| name.starts_with("wal-")).count(),
        1,
        "{names:?}"
    );

    for index in 41..=45 {
        log.append(payload(index)).expect("append");
    }
    // A second checkpoint replaces the first.
    log.checkpoint(42, |out| out.write_all(b"state at 42"))
        .expect("second checkpoint");
    log.shutdown().expect("shutdown");
    let checkpoints: Vec<_> = storage
        .file_names()
        .into_iter()
        .filter(|name| name.starts_with("checkpoint-"))
        .collect();
    assert_eq!(
        checkpoints,
        vec!["checkpoint-00000000000000000042.ckpt".to_string()]
    );

    let image = storage.crash_image(CrashMode::DropUnsynced);
    let (log, replayed, stats) = open(image, options).expect("reopen");
    assert_eq!(replayed.checkpoint, Some((42, b"state at 42".to_vec())));
    let lsns: Vec<u64> = replayed.records.iter().map(|(lsn, _)| *lsn).collect();
    assert_eq!(lsns, vec![43, 44, 45]);
    assert_eq!((stats.checkpoint_lsn, stats.last_lsn), (Some(42), 45));
    assert_eq!(log.append(b"next".to_vec()).expect("append"), 46);
}

#[test]
fn appends_complete_while_a_slow_checkpoint_runs() {
    let storage = FaultyStorage::new();
    let (log, _, _) = open(storage.clone(), small_segments()).expect("open");
    let log = Arc::new(log);
    for index in 1..=10 {
        log.append(payload(index)).expect("append");
    }
    log.wait_durable(10).expect("durable");

    let (appends_done, release) = mpsc::channel::<()>();
    let (writer_started, started) = mpsc::channel::<()>();
    let checkpointer = {
        let log = Arc::clone(&log);
        std::thread::spawn(move || {
            log.checkpoint(10, move |out| {
                out.write_all(b"first half ")?;
                writer_started.send(()).map_err(std::io::Error::other)?;
                // The checkpoint only finishes once 200 appends were durable meanwhile; if
                // appenders were blocked by it this times out and the test fails.
                release
                    .recv_timeout(Duration::from_secs(20))
                    .map_err(std::io::Error::other)?;
                out.write_all(b"second half")
            })
        })
    };
    started.recv().expect("checkpoint writer started");
    for index in 11..=210 {
        let lsn = log.append(payload(index)).expect("append");
        log.wait_durable(lsn).expect("durable during checkpoint");
    }
    appends_done.send(()).expect("release checkpoint");
    let stats = checkpointer.join().expect("join").expect("checkpoint");
    assert!(stats.segments_removed > 0);
    assert_eq!(log.last_lsn(), 210);
    log.shutdown().expect("shutdown");

    let (_log, replayed, _) = open(storage, small_segments()).expect("reopen");
    assert_eq!(
        replayed.checkpoint,
        Some((10, b"first half second half".to_vec()))
    );
    assert_eq!(
        replayed.payloads(),
        (11..=210).map(payload).collect::<Vec<_>>()
    );
}

#[test]
fn failed_checkpoint_writer_leaves_the_log_usable() {
    let storage = FaultyStorage::new();
    let (log, _, _) = open(storage.clone(), LogOptions::default()).expect("open");
    log.append(payload(1)).expect("append");
    let result = log.checkpoint(1, |_| Err(std::io::Error::other("snapshot failed")));
    assert!(matches!(result, Err(LogError::Io(_))), "{result:?}");
    assert!(!log.is_poisoned());
    assert!(
        storage
            .file_names()
            .iter()
            .all(|name| !name.starts_with("checkpoint"))
    );
    let invalid_input = |result: Result<CheckpointStats, LogError>| match result {
        Err(LogError::Io(error)) => error.kind() == std::io::ErrorKind::InvalidInput,
        _ => false,
    };
    assert!(
        invalid_input(log.checkpoint(5, |_| Ok(()))),
        "beyond the last lsn"
    );
    let lsn = log.append(payload(2)).expect("append");
    log.wait_durable(lsn).expect("durable");
    log.checkpoint(2, |_| Ok(())).expect("checkpoint");
    assert!(
        invalid_input(log.checkpoint(1, |_| Ok(()))),
        "older than the newest"
    );
    log.checkpoint(2, |out| out.write_all(b"again"))
        .expect("the same lsn again is fine");
}

#[test]
fn batch_policy_syncs_an_idle_append_within_the_interval() {
    // Real time only here: the policy is about wall-clock intervals. Generous bound.
    let options = LogOptions {
        fsync: FsyncPolicy::Batch(Duration::from_millis(50)),
        ..LogOptions::default()
    };
    let (log, _, _) = open(FaultyStorage::new(), options).expect("open");
    let start = Instant::now();
    let lsn = log.append(b"one".to_vec()).expect("append");
    log.wait_durable(lsn).expect("written");
    while log.synced_lsn() < lsn {
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "not synced in time"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn batch_policy_acknowledges_written_before_synced() {
    let options = LogOptions {
        fsync: FsyncPolicy::Batch(Duration::from_secs(30)),
        ..LogOptions::default()
    };
    let storage = FaultyStorage::new();
    let (log, _, _) = open(storage.clone(), options).expect("open");
    let lsn = log.append(b"one".to_vec()).expect("append");
    log.wait_durable(lsn).expect("written");
    assert_eq!((log.durable_lsn(), log.synced_lsn()), (1, 0));
    // Written but not fsynced: a crash now loses it.
    let (_crashed, replayed, _) = open(
        storage.crash_image(CrashMode::DropUnsynced),
        LogOptions::default(),
    )
    .expect("open");
    assert!(replayed.records.is_empty());
    log.shutdown().expect("shutdown syncs");
    assert_eq!(log.synced_lsn(), 1);
}

#[test]
fn never_policy_syncs_only_on_shutdown() {
    let options = LogOptions {
        fsync: FsyncPolicy::Never,
        ..LogOptions::default()
    };
    let storage = FaultyStorage::new();
    let (log, _, _) = open(storage.clone(), options).expect("open");
    for index in 1..=5 {
        log.append(payload(index)).expect("append");
    }
    log.wait_durable(5).expect("written");
    assert_eq!(log.synced_lsn(), 0);
    log.shutdown().expect("shutdown");
    assert_eq!(log.synced_lsn(), 5);
    let (_log, replayed, _) = open(
        storage.crash_image(CrashMode::DropUnsynced),
        LogOptions::default(),
    )
    .expect("open");
    assert_eq!(replayed.records.len(), 5);
}

#[test]
fn full_queue_applies_backpressure_and_keeps_order() {
    let options = LogOptions {
        queue_records_max: 2,
        ..small_segments()
    };
    let storage = FaultyStorage::new();
    let (log, _, _) = open(storage.clone(), options.clone()).expect("open");
    let log = Arc::new(log);
    let writers: Vec<_> = (0..4)
        .map(|writer| {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                (0..50)
                    .map(|index| {
                        let body = format!("{writer}:{index}").into_bytes();
                        (log.append(body.clone()).expect("append"), body)
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut issued: Vec<(u64, Vec<u8>)> = writers
        .into_iter()
        .flat_map(|w| w.join().expect("join"))
        .collect();
    issued.sort();
    log.shutdown().expect("shutdown");
    assert_eq!(log.stats().appends, 200);
    let (_log, replayed, _) = open(storage, options).expect("reopen");
    assert_eq!(replayed.records, issued);
}

/// `admit` waits while the queue is full and resolves once the flusher takes records;
/// `append_unblocked` queues past the limit instead of waiting, in LSN order; a poisoned log
/// fails `admit` at once.
#[test]
fn admit_waits_for_room_and_unblocked_appends_never_wait() {
    let options = LogOptions {
        queue_records_max: 2,
        ..small_segments()
    };
    let storage = FaultyStorage::new();
    let (log, _, _) = open(storage.clone(), options.clone()).expect("open");
    let log = Arc::new(log);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // A stalled fsync holds the flusher, so the queue fills and stays full for a while.
    storage.stall_fsync(Duration::from_millis(300));
    let mut issued = vec![(
        log.append(b"first".to_vec()).expect("append"),
        b"first".to_vec(),
    )];
    // Let the flusher take the first record into its stalled fsync; the rest then queue.
    std::thread::sleep(Duration::from_millis(50));
    let started = Instant::now();
    for index in 0..10u32 {
        let body = index.to_le_bytes().to_vec();
        issued.push((log.append_unblocked(body.clone()).expect("queued"), body));
    }
    assert!(
        started.elapsed() < Duration::from_millis(200),
        "append_unblocked waited for the flusher"
    );
    let waited = runtime.block_on(async {
        let started = Instant::now();
        log.admit().await.expect("admitted");
        started.elapsed()
    });
    assert!(
        waited >= Duration::from_millis(100),
        "admit did not wait for room ({waited:?})"
    );
    storage.stall_fsync(Duration::ZERO);
    log.wait_durable(issued.last().unwrap().0).expect("durable");
    runtime.block_on(async { log.admit().await.expect("room at once") });
    storage.fail_fsync(true);
    let lsn = log.append(b"doomed".to_vec()).expect("queued");
    assert!(log.wait_durable(lsn).is_err());
    assert!(matches!(
        runtime.block_on(log.admit()),
        Err(LogError::Poisoned(_))
    ));
    drop(log);
    storage.fail_fsync(false);
    let (_log, replayed, _) = open(storage, options).expect("reopen");
    assert_eq!(replayed.records[..issued.len()], issued[..]);
}

#[test]
fn record_too_large_and_closed_errors() {
    let options = LogOptions {
        record_bytes_max: 8,
        ..LogOptions::default()
    };
    let (log, _, _) = open(FaultyStorage::new(), options).expect("open");
    assert!(matches!(
        log.append(vec![0; 9]),
        Err(LogError::RecordTooLarge { len: 9, max: 8 })
    ));
    assert_eq!(log.append(vec![0; 8]).expect("fits"), 1);
    log.shutdown().expect("shutdown");
    log.shutdown().expect("shutdown is idempotent");
    assert!(matches!(log.append(vec![1]), Err(LogError::Closed)));
    assert!(log.wait_durable(1).is_ok());
    assert!(matches!(log.wait_durable(2), Err(LogError::Closed)));
}

#[test]
fn async_waiters_resolve_on_durability() {
    fn assert_send<T: Send>(_: &T) {}
    let (log, _, _) = open(FaultyStorage::new(), LogOptions::default()).expect("open");
    let log = Arc::new(log);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .expect("runtime");
    let future = log.durable(1);
    assert_send(&future);
    drop(future);
    let results = runtime.block_on(async {
        let mut tasks = Vec::new();
        for index in 1..=20 {
            let log = Arc::clone(&log);
            tasks.push(tokio::spawn(async move {
                let lsn = log.append(payload(index))?;
                log.durable(lsn).await.map(|()| lsn)
            }));
        }
        let mut lsns = Vec::new();
        for task in tasks {
            lsns.push(task.await.expect("task").expect("durable"));
        }
        lsns
    });
    assert_eq!(results.len(), 20);
    assert!(log.durable_lsn() >= 20);
}

#[test]
fn dropping_the_log_flushes_queued_records() {
    let storage = FaultyStorage::new();
    {
        let options = LogOptions {
            fsync: FsyncPolicy::Never,
            ..LogOptions::default()
        };
        let (log, _, _) = open(storage.clone(), options).expect("open");
        for index in 1..=10 {
            log.append(payload(index)).expect("append");
        }
    }
    let (_log, replayed, _) = open(
        storage.crash_image(CrashMode::DropUnsynced),
        LogOptions::default(),
    )
    .expect("open");
    assert_eq!(replayed.records.len(), 10);
}

#[test]
fn log_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Log>();
}

#[test]
fn batch_policy_keeps_acknowledging_while_an_fsync_is_slow() {
    // Under Batch a record is durable once written; a slow fsync (a disk busy with a
    // checkpoint) runs on the syncer thread and must not hold acknowledgements back.
    let options = LogOptions {
        fsync: FsyncPolicy::Batch(Duration::from_millis(1)),
        ..LogOptions::default()
    };
    let storage = FaultyStorage::new();
    let (log, _, _) = open(storage.clone(), options).expect("open");
    storage.stall_fsync(Duration::from_millis(400));
    let first = log.append(b"first".to_vec()).expect("append");
    log.wait_durable(first).expect("written");
    // A sync of `first` is now due and stalls for 400 ms.
    std::thread::sleep(Duration::from_millis(20));
    let start = Instant::now();
    for index in 0..20u8 {
        let lsn = log.append(vec![index]).expect("append");
        log.wait_durable(lsn).expect("written");
    }
    assert!(
        start.elapsed() < Duration::from_millis(200),
        "acknowledgements waited for the stalled fsync: {:?}",
        start.elapsed()
    );
    // The syncs do complete, and cover everything in the end.
    let last = log.durable_lsn();
    let deadline = Instant::now() + Duration::from_secs(5);
    while log.synced_lsn() < last {
        assert!(Instant::now() < deadline, "never synced");
        std::thread::sleep(Duration::from_millis(5));
    }
    storage.stall_fsync(Duration::ZERO);
    log.shutdown().expect("clean shutdown");
}

#[test]
fn batch_policy_poisons_the_log_when_a_background_fsync_fails() {
    let options = LogOptions {
        fsync: FsyncPolicy::Batch(Duration::from_millis(1)),
        ..LogOptions::default()
    };
    let storage = FaultyStorage::new();
    let (log, _, _) = open(storage.clone(), options).expect("open");
    storage.fail_fsync(true);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let appended = log
            .append(b"x".to_vec())
            .and_then(|lsn| log.wait_durable(lsn));
        if appended.is_err() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a failed fsync never poisoned the log"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(log.is_poisoned());
}

/// Under `Batch` and `Never` an async waiter writes the deferred records itself (no flusher
/// hand-off), across many segments (the flusher rolls them), and everything reopens in order.
#[test]
fn async_waiters_write_deferred_records_inline_across_rolls() {
    for policy in [
        FsyncPolicy::Batch(Duration::from_millis(5)),
        FsyncPolicy::Never,
    ] {
        let storage = FaultyStorage::new();
        let options = LogOptions {
            fsync: policy,
            inline_writes: true,
            ..small_segments()
        };
        let (log, _, _) = open(storage.clone(), options.clone()).expect("open");
        let log = Arc::new(log);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let tasks: Vec<_> = (0..4u64)
                .map(|task| {
                    let log = Arc::clone(&log);
                    tokio::spawn(async move {
                        for index in 0..50 {
                            let lsn = log
                                .append_deferred(payload(task * 1000 + index))
                                .expect("append");
                            log.durable(lsn).await.expect("durable");
                            assert!(log.durable_lsn() >= lsn);
                        }
                    })
                })
                .collect();
            for task in tasks {
                task.await.expect("task");
            }
        });
        let stats = log.stats();
        assert_eq!(stats.last_lsn, 200, "{policy:?}");
        assert!(
            stats.inline_batches > 0,
            "{policy:?}: no batch written inline"
        );
        assert!(stats.segments > 3, "{policy:?}: rolls expected");
        drop(log);
        let (_log, replayed, _) =
            open(storage.crash_image(CrashMode::ProcessDeath), options).expect("reopen");
        assert_eq!(replayed.records.len(), 200, "{policy:?}");
    }
}

/// Requests ready together on one thread share one inline write: a waiter of a small batch
/// yields once before it writes, so the others queue their records first (one `write` per
/// pass of the executor, not one per request).
#[test]
fn waiters_ready_together_share_one_inline_write() {
    let options = LogOptions {
        fsync: FsyncPolicy::Never,
        inline_writes: true,
        ..LogOptions::default()
    };
    let (log, _, _) = open(FaultyStorage::new(), options).expect("open");
    let log = Arc::new(log);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let before = log.stats().batches;
    runtime.block_on(async {
        let tasks: Vec<_> = (0..8u64)
            .map(|task| {
                let log = Arc::clone(&log);
                tokio::spawn(async move {
                    let lsn = log.append_deferred(payload(task)).expect("append");
                    log.durable(lsn).await.expect("durable");
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("task");
        }
    });
    let stats = log.stats();
    assert_eq!(stats.last_lsn, 8);
    // One write for all of them, inline; the flusher's periodic pass (every 10 ms) may take
    // some first on a loaded machine, where a thread can be off its core for longer. Without
    // the yield it is one write per waiter, 8.
    assert!(
        stats.batches - before <= 4,
        "8 ready waiters took {} batches ({} inline)",
        stats.batches - before,
        stats.inline_batches
    );
}

/// A deferred record wakes nobody: if no one waits for it, the flusher's periodic pass writes
/// it anyway, and a thread's `wait_durable` does not wait for that pass.
#[test]
fn a_deferred_record_nobody_waits_for_is_written_by_the_flusher() {
    let storage = FaultyStorage::new();
    let options = LogOptions {
        fsync: FsyncPolicy::Never,
        inline_writes: true,
        ..LogOptions::default()
    };
    let (log, _, _) = open(storage.clone(), options).expect("open");
    let lsn = log
        .append_deferred(b"nobody waits".to_vec())
        .expect("append");
    let deadline = Instant::now() + Duration::from_secs(10);
    while log.durable_lsn() < lsn {
        assert!(
            Instant::now() < deadline,
            "the deferred record was never written"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(log.stats().inline_batches, 0);
    let lsn = log
        .append_deferred(b"a thread waits".to_vec())
        .expect("append");
    log.wait_durable(lsn).expect("durable");
    assert_eq!(log.stats().inline_batches, 0);
}

/// `Log::poisoned` resolves once, with the reason, when a write fails; it is not woken by
/// acknowledged writes before that (it waits on its own notification).
#[test]
fn poisoned_resolves_with_the_reason_of_a_failed_write() {
    let storage = FaultyStorage::new();
    let options = LogOptions {
        fsync: FsyncPolicy::Batch(Duration::from_millis(5)),
        inline_writes: true,
        ..LogOptions::default()
    };
    let (log, _, _) = open(storage.clone(), options).expect("open");
    let log = Arc::new(log);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let watcher = tokio::spawn({
            let log = Arc::clone(&log);
            async move { log.poisoned().await }
        });
        for index in 0..20 {
            let lsn = log.append_deferred(payload(index)).expect("append");
            log.durable(lsn).await.expect("durable");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            !watcher.is_finished(),
            "poisoned() resolved on a healthy log"
        );
        storage.fail_from_op(Some(storage.ops()));
        let lsn = log.append_deferred(b"doomed".to_vec()).expect("queued");
        assert!(matches!(log.durable(lsn).await, Err(LogError::Poisoned(_))));
        let reason = tokio::time::timeout(Duration::from_secs(10), watcher)
            .await
            .expect("poisoned() resolves")
            .expect("task");
        assert!(reason.contains("write"), "{reason}");
    });
}

/// Without `inline_writes` (the default) the flusher thread writes everything: a deferred
/// append is a plain one and an async waiter only waits.
#[test]
fn without_inline_writes_the_flusher_writes_everything() {
    let options = LogOptions {
        fsync: FsyncPolicy::Batch(Duration::from_millis(5)),
        ..LogOptions::default()
    };
    let (log, _, _) = open(FaultyStorage::new(), options).expect("open");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        for index in 0..20 {
            let lsn = log.append_deferred(payload(index)).expect("append");
            log.durable(lsn).await.expect("durable");
        }
    });
    let stats = log.stats();
    assert_eq!(stats.last_lsn, 20);
    assert_eq!(stats.inline_batches, 0);
}
