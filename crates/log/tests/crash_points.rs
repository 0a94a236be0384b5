//! Crash-point enumeration: the process dies at every mutating storage operation of a
//! concurrent workload (rolls and a checkpoint included); every crash image must recover to a
//! prefix of the issued records that contains every acknowledged one.
//!
//! Property checked per image: "recovered == issued[1..=k] for some k >= max acknowledged".

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use imstate_log::{CrashMode, FaultyStorage, FsyncPolicy, Log, LogOptions, Lsn};
use parking_lot::Mutex;
use support::open;

const WRITERS: u64 = 3;
const RECORDS_PER_WRITER: u64 = 20;
const CHECKPOINT_AFTER: u64 = 10;
const TORN_SEEDS: u64 = 6;

fn options() -> LogOptions {
    LogOptions {
        fsync: FsyncPolicy::Always,
        segment_bytes_max: 1500,
        ..LogOptions::default()
    }
}

#[derive(Default)]
struct Outcome {
    issued: BTreeMap<Lsn, Vec<u8>>,
    acknowledged: BTreeSet<Lsn>,
    /// Segments the run started from a preallocated spare.
    spares_used: u64,
    /// Batches written by async waiters rather than the flusher thread.
    inline_batches: u64,
}

/// A fresh directory: segments grown by appends, or preallocated (written over zeros).
fn storage(preallocated: bool) -> FaultyStorage {
    if preallocated {
        FaultyStorage::preallocating()
    } else {
        FaultyStorage::new()
    }
}

/// Payloads of varied length (up to ~400 bytes) so batches cross 512-byte boundaries and torn
/// images cut records in the middle.
fn record_body(writer: u64, index: u64) -> Vec<u8> {
    let mut body = format!("w{writer}-{index:02}-").into_bytes();
    let filler = (writer * 37 + index * 53) % 400;
    body.extend(std::iter::repeat_n(
        b'a' + (index % 26) as u8,
        filler as usize,
    ));
    body
}

fn encode_checkpoint(payloads: &[Vec<u8>]) -> Vec<u8> {
    payloads.join(&b'\n')
}

fn decode_checkpoint(data: &[u8]) -> Vec<Vec<u8>> {
    if data.is_empty() {
        return Vec::new();
    }
    data.split(|&byte| byte == b'\n')
        .map(<[u8]>::to_vec)
        .collect()
}

/// Who writes the records and what an acknowledgement promises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Writers {
    /// Threads: `append` then `wait_durable` under `Always` (the flusher writes and fsyncs).
    Threads,
    /// Async tasks on two workers: `append_deferred` then `durable().await` under `Batch`, so
    /// the waiters write inline and the flusher only rolls, fsyncs and writes what is left.
    /// An acknowledgement promises survival of a process death (kill -9), not of a power cut.
    Inline,
}

impl Writers {
    fn options(self) -> LogOptions {
        match self {
            Writers::Threads => options(),
            Writers::Inline => LogOptions {
                fsync: FsyncPolicy::Batch(std::time::Duration::from_millis(1)),
                inline_writes: true,
                ..options()
            },
        }
    }
}

/// Runs the workload on `storage` until it ends or the storage "dies".
fn run_workload_with(storage: &FaultyStorage, writers: Writers) -> Outcome {
    let Ok((log, _)) = Log::open(storage.clone(), writers.options(), |_| Ok(())) else {
        return Outcome::default();
    };
    if writers == Writers::Inline {
        return run_inline_workload(log);
    }
    let log = Arc::new(log);
    let outcome = Arc::new(Mutex::new(Outcome::default()));
    let writers: Vec<_> = (0..WRITERS)
        .map(|writer| {
            let log = Arc::clone(&log);
            let outcome = Arc::clone(&outcome);
            std::thread::spawn(move || {
                for index in 0..RECORDS_PER_WRITER {
                    let body = record_body(writer, index);
                    let Ok(lsn) = log.append(body.clone()) else {
                        return;
                    };
                    outcome.lock().issued.insert(lsn, body);
                    if log.wait_durable(lsn).is_err() {
                        return;
                    }
                    outcome.lock().acknowledged.insert(lsn);
                    if writer == 0 && index == CHECKPOINT_AFTER {
                        checkpoint(&log, &outcome);
                    }
                }
            })
        })
        .collect();
    for writer in writers {
        writer.join().expect("writer thread");
    }
    let stats = log.stats();
    drop(log);
    let mut outcome = outcome.lock();
    outcome.spares_used = stats.spares_used;
    outcome.inline_batches = stats.inline_batches;
    std::mem::take(&mut *outcome)
}

/// The `Writers::Inline` workload: the same records from async tasks.
fn run_inline_workload(log: Log) -> Outcome {
    let log = Arc::new(log);
    let outcome = Arc::new(Mutex::new(Outcome::default()));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let tasks: Vec<_> = (0..WRITERS)
            .map(|writer| {
                let log = Arc::clone(&log);
                let outcome = Arc::clone(&outcome);
                tokio::spawn(async move {
                    for index in 0..RECORDS_PER_WRITER {
                        let body = record_body(writer, index);
                        let Ok(lsn) = log.append_deferred(body.clone()) else {
                            return;
                        };
                        outcome.lock().issued.insert(lsn, body);
                        if log.durable(lsn).await.is_err() {
                            return;
                        }
                        outcome.lock().acknowledged.insert(lsn);
                        if writer == 0 && index == CHECKPOINT_AFTER {
                            let log = Arc::clone(&log);
                            let outcome = Arc::clone(&outcome);
                            tokio::task::spawn_blocking(move || checkpoint(&log, &outcome))
                                .await
                                .expect("checkpoint task");
                        }
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("writer task");
        }
    });
    let stats = log.stats();
    drop(log);
    let mut outcome = outcome.lock();
    outcome.spares_used = stats.spares_used;
    outcome.inline_batches = stats.inline_batches;
    std::mem::take(&mut *outcome)
}

/// Checkpoints every durable record; the data is the list of covered payloads.
fn checkpoint(log: &Log, outcome: &Mutex<Outcome>) {
    let covered = log.durable_lsn();
    // Every LSN up to `covered` was returned by an append; wait until its writer recorded it.
    let payloads = loop {
        let outcome = outcome.lock();
        let payloads: Vec<Vec<u8>> = (1..=covered)
            .filter_map(|lsn| outcome.issued.get(&lsn).cloned())
            .collect();
        if payloads.len() as u64 == covered {
            break payloads;
        }
        drop(outcome);
        std::thread::yield_now();
    };
    let _ = log.checkpoint(covered, |out| out.write_all(&encode_checkpoint(&payloads)));
}

/// Recovers `image` and checks the prefix property; returns the recovered length.
fn check_image(image: FaultyStorage, outcome: &Outcome, context: &str) -> u64 {
    check_image_with(image, outcome, context, true)
}

/// [`check_image`], where `acknowledged_survive` says whether the image must hold every
/// acknowledged record (not so for a power cut under `Batch`: its window may be lost).
fn check_image_with(
    image: FaultyStorage,
    outcome: &Outcome,
    context: &str,
    acknowledged_survive: bool,
) -> u64 {
    let (log, replayed, stats) =
        open(image.clone(), options()).unwrap_or_else(|e| panic!("{context}: open failed: {e}"));
    let mut recovered = Vec::new();
    if let Some((covered, data)) = &replayed.checkpoint {
        recovered = decode_checkpoint(data);
        assert_eq!(
            recovered.len() as u64,
            *covered,
            "{context}: checkpoint size"
        );
    }
    recovered.extend(replayed.payloads());
    for (index, body) in recovered.iter().enumerate() {
        let lsn = index as Lsn + 1;
        assert_eq!(
            outcome.issued.get(&lsn),
            Some(body),
            "{context}: recovered lsn {lsn} is not the issued record"
        );
    }
    let length = recovered.len() as Lsn;
    if let Some(&acknowledged) = outcome.acknowledged.last()
        && acknowledged_survive
    {
        assert!(
            acknowledged <= length,
            "{context}: acknowledged lsn {acknowledged} lost (recovered {length})"
        );
    }
    assert_eq!(stats.last_lsn, length, "{context}: last lsn");
    // The recovered log keeps working and continues the LSNs without a hole.
    let next = log
        .append(b"after crash".to_vec())
        .expect("append after recovery");
    assert_eq!(next, length + 1, "{context}");
    log.wait_durable(next).expect("durable after recovery");
    drop(log);
    let (_log, again, _) = open(image.crash_image(CrashMode::DropUnsynced), options())
        .unwrap_or_else(|e| panic!("{context}: second recovery failed: {e}"));
    assert_eq!(
        again.records.last().map(|(lsn, body)| (*lsn, body.clone())),
        Some((next, b"after crash".to_vec())),
        "{context}: second recovery"
    );
    length
}

#[cfg(not(feature = "planted-ack-before-fsync"))]
#[test]
fn crash_at_every_storage_operation_recovers_a_prefix_with_every_acknowledged_record() {
    enumerate_crashes(false, Writers::Threads);
}

/// The same over preallocated segments: rolls rename a zero-filled spare and write over its
/// zeros, so crashes land in the middle of a preallocation, between a spare's rename and its
/// first record, and in writes over zeros whose torn images leave zeros after a record.
#[cfg(not(feature = "planted-ack-before-fsync"))]
#[test]
fn crash_at_every_storage_operation_with_preallocated_segments() {
    enumerate_crashes(true, Writers::Threads);
}

/// The same with async waiters writing inline (`append_deferred`, `durable().await`) under
/// `Batch`: a process death at any storage operation keeps every acknowledged record, and
/// every image (power cuts, torn writes included) recovers a prefix of the issued records.
#[cfg(not(feature = "planted-ack-before-fsync"))]
#[test]
fn crash_at_every_storage_operation_with_inline_writers() {
    enumerate_crashes(true, Writers::Inline);
}

#[cfg(not(feature = "planted-ack-before-fsync"))]
fn enumerate_crashes(preallocated: bool, writers: Writers) {
    // Whether a roll finds its spare ready depends on the preallocator thread's timing: the
    // dry run (which sets the number of crash points) is retried until rolls used spares.
    let (dry_run, complete) = (0..20)
        .map(|_| {
            let dry_run = storage(preallocated);
            let complete = run_workload_with(&dry_run, writers);
            (dry_run, complete)
        })
        .find(|(_, complete)| {
            (!preallocated || complete.spares_used >= 2)
                && (writers == Writers::Threads || complete.inline_batches >= 5)
        })
        .expect("rolls into preallocated spares (and batches written inline) in some dry run");
    assert_eq!(
        complete.acknowledged.len() as u64,
        WRITERS * RECORDS_PER_WRITER
    );
    let total_ops = dry_run.ops();
    // The workload must exercise rolls, a checkpoint and the deletion of covered segments.
    let names = dry_run.file_names();
    let segments = names
        .iter()
        .filter(|name| name.starts_with("wal-0"))
        .count();
    assert!(segments >= 3, "{names:?}");
    assert!(
        names.iter().any(|name| name.starts_with("checkpoint-")),
        "{names:?}"
    );
    assert!(!names.contains(&support::segment_name(1)), "{names:?}");
    check_image(
        dry_run.crash_image(CrashMode::DropUnsynced),
        &complete,
        "dry run",
    );

    let mut lengths = BTreeSet::new();
    // Thread interleavings vary, so enumerate a little past the dry run's count.
    for crash_op in 0..total_ops + 10 {
        let storage = storage(preallocated);
        storage.fail_from_op(Some(crash_op));
        let outcome = run_workload_with(&storage, writers);
        let mut modes = vec![CrashMode::DropUnsynced, CrashMode::ProcessDeath];
        modes.extend((0..TORN_SEEDS).map(|seed| CrashMode::Torn {
            seed: seed ^ (crash_op << 8),
        }));
        for mode in modes {
            let context = format!(
                "crash at op {crash_op} with {mode:?}, preallocated: {preallocated}, \
                 {writers:?} writers (reproduce: cargo test -p imstate-log --test crash_points)"
            );
            // Under `Always` every image keeps what was acknowledged; under `Batch` only a
            // process death must.
            let acknowledged_survive =
                writers == Writers::Threads || mode == CrashMode::ProcessDeath;
            lengths.insert(check_image_with(
                storage.crash_image(mode),
                &outcome,
                &context,
                acknowledged_survive,
            ));
        }
    }
    // The enumeration must actually have explored crashes at many points of the workload.
    eprintln!(
        "preallocated: {preallocated}, {writers:?} writers, crash points: {total_ops}, \
         distinct recovered lengths: {}",
        lengths.len()
    );
    assert!(lengths.len() > 20, "too few distinct outcomes: {lengths:?}");
}

/// Negative control: with acknowledgements published before the write and the fsync, crashing
/// at the storage operations of the workload must lose acknowledged records, and the same
/// recovery check as above must see it.
#[cfg(feature = "planted-ack-before-fsync")]
#[test]
fn planted_ack_before_fsync_is_caught_by_the_recovery_check() {
    // Threads under `Always`, power cuts; inline writers under `Batch`, process deaths.
    for (writers, mode) in [
        (Writers::Threads, CrashMode::DropUnsynced),
        (Writers::Inline, CrashMode::ProcessDeath),
    ] {
        let total_ops = run_workload_ops();
        let mut lost = 0;
        for crash_op in 0..total_ops {
            let storage = storage(crash_op % 2 == 1);
            storage.fail_from_op(Some(crash_op));
            let outcome = run_workload_with(&storage, writers);
            let image = storage.crash_image(mode);
            let (_log, _replayed, stats) = open(image, options()).expect("recovers");
            if outcome
                .acknowledged
                .last()
                .is_some_and(|&acked| acked > stats.last_lsn)
            {
                lost += 1;
            }
        }
        eprintln!(
            "planted ack-before-fsync, {writers:?} writers, {mode:?}: {lost} of {total_ops} \
             crash points lost acknowledged records"
        );
        assert!(
            lost > 0,
            "the recovery check never saw the planted bug ({writers:?} writers)"
        );
    }
}

#[cfg(feature = "planted-ack-before-fsync")]
fn run_workload_ops() -> u64 {
    let dry_run = FaultyStorage::new();
    run_workload_with(&dry_run, Writers::Threads);
    dry_run.ops()
}
