//! Recovery scenarios: round trips, torn tails, bit flips (corruption), real files.

mod support;

use imstate_log::{CrashMode, FaultyStorage, FileStorage, LogError, LogOptions, Lsn, Storage};
use support::{frame_bytes, open, payload, segment_name, small_segments};

/// Appends `count` records (payload(1)..=payload(count)), waits for them and shuts down.
fn write_records(storage: &FaultyStorage, options: &LogOptions, count: u64) {
    let (log, replayed, _) = open(storage.clone(), options.clone()).expect("open");
    let first = replayed.records.len() as u64 + 1;
    for index in first..first + count {
        let lsn = log.append(payload(index)).expect("append");
        assert_eq!(lsn, index);
    }
    log.wait_durable(log.last_lsn()).expect("durable");
    log.shutdown().expect("shutdown");
}

/// Offsets at which each record (1-based) starts, when all live in the first segment.
fn record_offsets(count: u64) -> Vec<u64> {
    let mut offsets = vec![0];
    for index in 1..=count {
        offsets.push(offsets[index as usize - 1] + frame_bytes(&payload(index)));
    }
    offsets
}

#[test]
fn round_trip_replays_every_record_and_continues_lsns() {
    let storage = FaultyStorage::new();
    let options = small_segments();
    write_records(&storage, &options, 100);
    assert!(storage.file_names().len() > 3, "small segments must roll");

    let (log, replayed, stats) = open(storage.clone(), options.clone()).expect("reopen");
    assert_eq!(replayed.checkpoint, None);
    assert_eq!(
        replayed.payloads(),
        (1..=100).map(payload).collect::<Vec<_>>()
    );
    assert_eq!(
        (
            stats.last_lsn,
            stats.records_replayed,
            stats.truncated_tail_bytes
        ),
        (100, 100, 0)
    );
    assert_eq!(log.last_lsn(), 100);
    assert_eq!(log.append(payload(101)).expect("append"), 101);
    log.shutdown().expect("shutdown");

    let (_log, replayed, _) = open(storage, options).expect("reopen again");
    assert_eq!(
        replayed.payloads(),
        (1..=101).map(payload).collect::<Vec<_>>()
    );
}

#[test]
fn empty_log_opens_and_first_lsn_is_one() {
    let storage = FaultyStorage::new();
    let (log, replayed, stats) = open(storage.clone(), LogOptions::default()).expect("open");
    assert_eq!(replayed, support::Replayed::default());
    assert_eq!(
        (stats.last_lsn, log.last_lsn(), log.durable_lsn()),
        (0, 0, 0)
    );
    assert_eq!(log.append(Vec::new()).expect("append"), 1);
    log.shutdown().expect("shutdown");
    let (_log, replayed, _) = open(storage, LogOptions::default()).expect("reopen");
    assert_eq!(replayed.records, vec![(1, Vec::new())]);
}

#[test]
fn recovery_truncates_torn_tail_at_every_offset_of_the_last_three_records() {
    let storage = FaultyStorage::new();
    let options = LogOptions::default();
    let count = 10;
    write_records(&storage, &options, count);
    let offsets = record_offsets(count);
    let segment = segment_name(1);
    assert_eq!(storage.file_len(&segment), Some(offsets[count as usize]));

    for cut in offsets[count as usize - 3]..offsets[count as usize] {
        let image = storage.crash_image(CrashMode::DropUnsynced);
        image.truncate_file(&segment, cut);
        let complete = offsets.iter().filter(|&&end| end <= cut).count() as u64 - 1;
        let (log, replayed, stats) =
            open(image.clone(), options.clone()).unwrap_or_else(|e| panic!("cut {cut}: {e}"));
        assert_eq!(
            replayed.payloads(),
            (1..=complete).map(payload).collect::<Vec<_>>()
        );
        assert_eq!(
            stats.truncated_tail_bytes,
            cut - offsets[complete as usize],
            "cut {cut}"
        );
        assert_eq!(image.file_len(&segment), Some(offsets[complete as usize]));
        assert_eq!(log.append(b"after".to_vec()).expect("append"), complete + 1);
        log.shutdown().expect("shutdown");

        let crashed = image.crash_image(CrashMode::DropUnsynced);
        let (_log, replayed, stats) = open(crashed, options.clone()).expect("reopen");
        let mut expected: Vec<Vec<u8>> = (1..=complete).map(payload).collect();
        expected.push(b"after".to_vec());
        assert_eq!(replayed.payloads(), expected, "cut {cut}");
        assert_eq!(stats.truncated_tail_bytes, 0);
    }
}

/// Opens `storage` expecting corruption at (file, offset), checking the message names both.
fn assert_corrupt_at(storage: FaultyStorage, options: LogOptions, file: &str, offset: u64) {
    match open(storage, options) {
        Err(error @ LogError::Corrupt { .. }) => {
            let LogError::Corrupt {
                file: found_file,
                offset: found_offset,
                ..
            } = &error
            else {
                unreachable!()
            };
            assert_eq!(
                (found_file.as_str(), *found_offset),
                (file, offset),
                "{error}"
            );
            let message = error.to_string();
            assert!(message.contains(file), "{message}");
            assert!(message.contains(&format!("offset {offset}")), "{message}");
        }
        Err(other) => panic!("expected corruption at {file}:{offset}, got {other}"),
        Ok((_, replayed, _)) => {
            panic!("expected corruption at {file}:{offset}, opened with {replayed:?}")
        }
    }
}

#[test]
fn bit_flip_in_a_middle_record_is_corruption_naming_file_and_offset() {
    let storage = FaultyStorage::new();
    let options = LogOptions::default();
    write_records(&storage, &options, 10);
    let offsets = record_offsets(10);
    let segment = segment_name(1);
    let fifth = offsets[4];
    // (byte within the record, bit): payload, len (huge and small), crc, lsn.
    let flips = [
        (20, 3),
        (18, 0),
        (0, 0),
        (0, 4),
        (3, 7),
        (5, 1),
        (8, 0),
        (12, 6),
    ];
    for (byte, bit) in flips {
        let image = storage.crash_image(CrashMode::DropUnsynced);
        image.flip_bit(&segment, fifth + byte, bit);
        assert_corrupt_at(image, options.clone(), &segment, fifth);
    }
    // The first record too: nothing before it is valid, yet records follow.
    let image = storage.crash_image(CrashMode::DropUnsynced);
    image.flip_bit(&segment, 17, 2);
    assert_corrupt_at(image, options, &segment, 0);
}

#[test]
fn bit_flip_in_the_last_record_of_a_sealed_segment_is_corruption() {
    let storage = FaultyStorage::new();
    let options = small_segments();
    write_records(&storage, &options, 30);
    let names: Vec<String> = storage
        .file_names()
        .into_iter()
        .filter(|name| name.starts_with("wal-"))
        .collect();
    assert!(names.len() >= 3);
    let first = &names[0];
    let len = storage.file_len(first).expect("exists");
    let image = storage.crash_image(CrashMode::DropUnsynced);
    image.flip_bit(first, len - 1, 0);
    let records_in_first: u64 = {
        let mut total = 0;
        let mut count = 0;
        while total < len {
            count += 1;
            total += frame_bytes(&payload(count));
        }
        count
    };
    let last_offset = len - frame_bytes(&payload(records_in_first));
    assert_corrupt_at(image, options, first, last_offset);
}

#[test]
fn bit_flip_in_the_last_record_is_a_torn_tail() {
    let storage = FaultyStorage::new();
    let options = LogOptions::default();
    write_records(&storage, &options, 10);
    let offsets = record_offsets(10);
    let segment = segment_name(1);
    for (byte, bit) in [(0, 0), (2, 5), (4, 0), (9, 1), (20, 7)] {
        let image = storage.crash_image(CrashMode::DropUnsynced);
        image.flip_bit(&segment, offsets[9] + byte, bit);
        let (log, replayed, stats) = open(image.clone(), options.clone()).expect("opens");
        assert_eq!(
            replayed.payloads(),
            (1..=9).map(payload).collect::<Vec<_>>()
        );
        assert_eq!(stats.truncated_tail_bytes, offsets[10] - offsets[9]);
        assert_eq!(image.file_len(&segment), Some(offsets[9]));
        assert_eq!(log.append(b"new".to_vec()).expect("append"), 10);
    }
}

#[test]
fn missing_middle_segment_is_corruption() {
    let storage = FaultyStorage::new();
    let options = small_segments();
    write_records(&storage, &options, 30);
    let names = storage.file_names();
    let image = storage.crash_image(CrashMode::DropUnsynced);
    image.remove(&names[1]).expect("remove");
    match open(image, options) {
        Err(LogError::Corrupt { file, offset, .. }) => {
            assert_eq!((file, offset), (names[2].clone(), 0));
        }
        other => panic!("expected corruption, got {:?}", other.map(|(_, r, _)| r)),
    }
}

#[test]
fn leftover_checkpoint_temp_file_is_removed_on_open() {
    let storage = FaultyStorage::new();
    write_records(&storage, &LogOptions::default(), 3);
    let mut temp = storage
        .create("checkpoint-00000000000000000002.ckpt.tmp")
        .expect("create");
    temp.write_all(b"half a checkpoint").expect("write");
    let (_log, replayed, _) = open(storage.clone(), LogOptions::default()).expect("open");
    assert_eq!(replayed.checkpoint, None);
    assert_eq!(replayed.records.len(), 3);
    assert!(
        !storage
            .file_names()
            .iter()
            .any(|name| name.ends_with(".tmp"))
    );
}

#[test]
fn replay_callback_error_fails_open() {
    let storage = FaultyStorage::new();
    write_records(&storage, &LogOptions::default(), 3);
    let result = imstate_log::Log::open(storage, LogOptions::default(), |_| {
        Err("state machine rejected the record".into())
    });
    assert!(matches!(result, Err(LogError::Replay(_))));
}

#[test]
fn file_storage_round_trip_and_torn_tail_on_real_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let options = LogOptions::default();
    let storage = || FileStorage::new(dir.path()).expect("storage");
    {
        let (log, replayed, _) = open(storage(), options.clone()).expect("open");
        assert!(replayed.records.is_empty());
        for index in 1..=20 {
            log.append(payload(index)).expect("append");
        }
        log.wait_durable(20).expect("durable");
        log.shutdown().expect("shutdown");
    }
    let (log, replayed, _) = open(storage(), options.clone()).expect("reopen");
    assert_eq!(
        replayed.payloads(),
        (1..=20).map(payload).collect::<Vec<_>>()
    );
    drop(log);

    // Tear the last record by cutting the real file in its middle.
    let offsets = record_offsets(20);
    let path = dir.path().join(segment_name(1));
    let cut = offsets[19] + 5;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .and_then(|file| file.set_len(cut))
        .expect("cut file");
    let (log, replayed, stats) = open(storage(), options.clone()).expect("reopen torn");
    assert_eq!(
        replayed.payloads(),
        (1..=19).map(payload).collect::<Vec<_>>()
    );
    assert_eq!(stats.truncated_tail_bytes, 5);
    assert_eq!(std::fs::metadata(&path).expect("stat").len(), offsets[19]);
    assert_eq!(log.append(b"again".to_vec()).expect("append"), 20);
    log.shutdown().expect("shutdown");
    drop(log);

    let (_log, replayed, _) = open(storage(), options).expect("reopen after append");
    let mut expected: Vec<Vec<u8>> = (1..=19).map(payload).collect();
    expected.push(b"again".to_vec());
    assert_eq!(replayed.payloads(), expected);
    let last: Lsn = replayed.records.last().map_or(0, |(lsn, _)| *lsn);
    assert_eq!(last, 20);
}

/// The bytes of record `lsn` (1-based) in the first segment of `storage`.
fn record_bytes(storage: &FaultyStorage, lsn: u64) -> Vec<u8> {
    let offsets = record_offsets(lsn);
    let segment = storage.read(&segment_name(1)).expect("read");
    segment[offsets[lsn as usize - 1] as usize..offsets[lsn as usize] as usize].to_vec()
}

#[test]
fn stale_valid_record_at_the_tail_is_cut_but_a_skipped_lsn_is_corruption() {
    let storage = FaultyStorage::new();
    let options = LogOptions::default();
    write_records(&storage, &options, 7);
    let offsets = record_offsets(7);
    let segment = segment_name(1);

    let stale = storage.crash_image(CrashMode::DropUnsynced);
    let mut file = stale.open_append(&segment).expect("open");
    file.write_all(&record_bytes(&storage, 2))
        .expect("append stale copy");
    let (_log, replayed, stats) = open(stale, options.clone()).expect("stale tail is cut");
    assert_eq!(replayed.records.len(), 7);
    assert_eq!(stats.truncated_tail_bytes, offsets[2] - offsets[1]);

    let gap = storage.crash_image(CrashMode::DropUnsynced);
    gap.truncate_file(&segment, offsets[5]);
    let mut file = gap.open_append(&segment).expect("open");
    file.write_all(&record_bytes(&storage, 7))
        .expect("append lsn 7 after lsn 5");
    assert_corrupt_at(gap, options, &segment, offsets[5]);
}

#[test]
fn recovery_truncates_torn_tail_after_checkpoint() {
    let storage = FaultyStorage::new();
    let options = small_segments();
    let (log, _, _) = open(storage.clone(), options.clone()).expect("open");
    for index in 1..=10 {
        log.append(payload(index)).expect("append");
    }
    log.wait_durable(10).expect("durable");
    log.checkpoint(10, |out| out.write_all(b"ten"))
        .expect("checkpoint");
    for index in 11..=15 {
        log.append(payload(index)).expect("append");
    }
    log.shutdown().expect("shutdown");
    drop(log);

    let image = storage.crash_image(CrashMode::DropUnsynced);
    let last_segment = image
        .file_names()
        .into_iter()
        .rfind(|name| name.starts_with("wal-"))
        .expect("a segment");
    let len = image.file_len(&last_segment).expect("len");
    image.truncate_file(&last_segment, len - 3);
    let (log, replayed, stats) = open(image, options).expect("open");
    assert_eq!(replayed.checkpoint, Some((10, b"ten".to_vec())));
    assert_eq!(
        replayed.payloads(),
        (11..=14).map(payload).collect::<Vec<_>>()
    );
    assert_eq!(stats.truncated_tail_bytes, frame_bytes(&payload(15)) - 3);
    assert_eq!(log.append(payload(15)).expect("append"), 15);
}

#[test]
fn damaged_checkpoint_with_its_segments_gone_is_corruption() {
    let storage = FaultyStorage::new();
    let options = small_segments();
    let (log, _, _) = open(storage.clone(), options.clone()).expect("open");
    for index in 1..=30 {
        log.append(payload(index)).expect("append");
    }
    log.wait_durable(30).expect("durable");
    log.checkpoint(30, |out| out.write_all(b"thirty"))
        .expect("checkpoint");
    log.shutdown().expect("shutdown");
    drop(log);

    let image = storage.crash_image(CrashMode::DropUnsynced);
    let first_segment = image
        .file_names()
        .into_iter()
        .find(|name| name.starts_with("wal-"))
        .expect("a segment");
    assert_ne!(
        first_segment,
        segment_name(1),
        "the checkpoint removed old segments"
    );
    let checkpoint = "checkpoint-00000000000000000030.ckpt";
    image.flip_bit(checkpoint, 17, 0);
    match open(image, options) {
        Err(LogError::Corrupt { file, offset, .. }) => {
            assert_eq!((file, offset), (first_segment, 0));
        }
        other => panic!("expected corruption, got {:?}", other.map(|(_, r, _)| r)),
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

    /// Any cut of the log's last segment recovers exactly the records wholly before the cut.
    #[test]
    fn any_cut_recovers_exactly_the_complete_records(
        lengths in proptest::collection::vec(0usize..300, 1..40),
        cut_per_mille in 0u64..=1000,
    ) {
        let storage = FaultyStorage::new();
        let options = LogOptions { segment_bytes_max: 1 << 20, ..LogOptions::default() };
        let payloads: Vec<Vec<u8>> =
            lengths.iter().enumerate().map(|(i, &len)| vec![i as u8; len]).collect();
        let (log, _, _) = open(storage.clone(), options.clone()).expect("open");
        for body in &payloads {
            log.append(body.clone()).expect("append");
        }
        log.shutdown().expect("shutdown");
        drop(log);

        let image = storage.crash_image(CrashMode::DropUnsynced);
        let segment = segment_name(1);
        let len = image.file_len(&segment).expect("segment");
        let cut = len * cut_per_mille / 1000;
        image.truncate_file(&segment, cut);
        let (_log, replayed, _) = open(image, options).expect("open after cut");
        let mut end = 0;
        let complete: Vec<Vec<u8>> = payloads
            .iter()
            .take_while(|body| {
                end += frame_bytes(body);
                end <= cut
            })
            .cloned()
            .collect();
        proptest::prop_assert_eq!(replayed.payloads(), complete);
    }
}

#[test]
fn an_invalid_tail_longer_than_one_write_is_corruption_not_truncated() {
    // What a log of another record format, or a large damaged region, looks like: valid
    // records, then far more invalid bytes than one crash can tear. Cutting them would silently
    // drop everything; recovery must refuse instead and leave the file as it is.
    let dir = tempfile::tempdir().unwrap();
    let storage = FileStorage::new(dir.path()).unwrap();
    let options = LogOptions::default();
    {
        let (log, _, _) = support::open(storage, options.clone()).unwrap();
        for index in 0..10 {
            let lsn = log.append(support::payload(index)).unwrap();
            log.wait_durable(lsn).unwrap();
        }
        log.shutdown().unwrap();
    }
    let segment = dir.path().join(support::segment_name(1));
    let mut bytes = std::fs::read(&segment).unwrap();
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    bytes.extend((0..33 * 1024 * 1024).map(|_| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state as u8
    }));
    std::fs::write(&segment, &bytes).unwrap();
    let Err(error) = support::open(FileStorage::new(dir.path()).unwrap(), options.clone()) else {
        panic!("refuses to start");
    };
    let message = error.to_string();
    assert!(message.contains("refusing to truncate"), "{message}");
    assert!(
        message.contains(&support::segment_name(1)),
        "names the file: {message}"
    );
    assert_eq!(
        std::fs::metadata(&segment).unwrap().len(),
        bytes.len() as u64,
        "untouched"
    );

    // A short invalid tail is still a torn write: cut, and the records before it recovered.
    bytes.truncate(bytes.len() - 33 * 1024 * 1024 + 100);
    std::fs::write(&segment, &bytes).unwrap();
    let (_log, replayed, stats) =
        support::open(FileStorage::new(dir.path()).unwrap(), options).unwrap();
    assert_eq!(replayed.records.len(), 10);
    assert_eq!(stats.truncated_tail_bytes, 100);
}

#[test]
fn an_empty_segment_past_missing_history_is_corruption() {
    // A log whose checkpoint covered everything and then went missing leaves only the empty
    // segment the node started after it. Starting empty would reissue every sequence value.
    let storage = FaultyStorage::new();
    let options = LogOptions::default();
    write_records(&storage, &options, 5);
    {
        // Reopened, the log appends to a new segment; the checkpoint then drops the first.
        let (log, _, _) = open(storage.clone(), options.clone()).unwrap();
        log.checkpoint(5, |out| out.write_all(b"state")).unwrap();
        log.shutdown().unwrap();
    }
    assert!(
        !storage.file_names().contains(&segment_name(1)),
        "{:?}",
        storage.file_names()
    );
    let checkpoint = storage
        .file_names()
        .into_iter()
        .find(|name| name.starts_with("checkpoint-"))
        .expect("a checkpoint");
    let image = storage.crash_image(CrashMode::DropUnsynced);
    image.remove(&checkpoint).unwrap();
    image.sync_dir().unwrap();
    let Err(error) = open(image, options) else {
        panic!("refuses to start");
    };
    assert!(matches!(error, LogError::Corrupt { .. }), "{error}");
    assert!(error.to_string().contains("missing"), "{error}");
}

// ---- preallocated segments -------------------------------------------------------------------

/// Writes `bytes` at `offset` of `file` and syncs (crafting what a crash could leave).
fn write_at(storage: &FaultyStorage, file: &str, offset: u64, bytes: &[u8]) {
    let mut handle = storage.open_write(file, offset).expect("open_write");
    handle.write_all(bytes).expect("write");
    handle.sync().expect("sync");
}

#[test]
fn a_zero_tail_after_the_last_record_is_the_end_of_the_log_and_is_trimmed() {
    let storage = FaultyStorage::new();
    let options = LogOptions::default();
    write_records(&storage, &options, 20);
    let name = segment_name(1);
    let used = storage.len(&name).expect("len");
    // The unused part of a preallocated segment: zeros after the last record.
    write_at(&storage, &name, used, &vec![0; 70_000]);
    let (log, replayed, stats) = open(storage.clone(), options.clone()).expect("reopen");
    assert_eq!(
        replayed.payloads(),
        (1..=20).map(payload).collect::<Vec<_>>()
    );
    assert_eq!(
        (stats.truncated_tail_bytes, stats.zero_tail_bytes),
        (0, 70_000)
    );
    assert_eq!(
        storage.len(&name).expect("len"),
        used,
        "the zero tail is trimmed"
    );
    assert_eq!(log.append(payload(21)).expect("append"), 21);
}

#[test]
fn a_torn_record_followed_by_zeros_is_a_torn_tail() {
    let storage = FaultyStorage::new();
    let options = LogOptions::default();
    write_records(&storage, &options, 20);
    let name = segment_name(1);
    let offsets = record_offsets(20);
    // Record 20 torn after its first 10 bytes, zeros after it (a write over a preallocated
    // segment cut by a crash).
    let torn_at = offsets[19];
    let end = offsets[20];
    write_at(
        &storage,
        &name,
        torn_at + 10,
        &vec![0; (end - torn_at - 10) as usize + 4096],
    );
    let (_log, replayed, stats) = open(storage.clone(), options).expect("reopen");
    assert_eq!(
        replayed.payloads(),
        (1..=19).map(payload).collect::<Vec<_>>()
    );
    // Cut at the torn record: its bytes and the zeros after them.
    assert_eq!(stats.truncated_tail_bytes, end - torn_at + 4096);
    assert_eq!(storage.len(&name).expect("len"), torn_at);
}

#[test]
fn a_zero_run_followed_by_a_valid_record_is_corruption() {
    let storage = FaultyStorage::new();
    let options = LogOptions::default();
    write_records(&storage, &options, 20);
    let name = segment_name(1);
    let offsets = record_offsets(20);
    // Record 11 zeroed out, records 12..=20 intact after it: acknowledged records would be
    // lost by cutting there, so recovery refuses.
    let (start, end) = (offsets[10], offsets[11]);
    write_at(&storage, &name, start, &vec![0; (end - start) as usize]);
    assert_corrupt_at(storage, options, &name, start);
}

#[test]
fn a_spare_left_half_written_or_of_the_wrong_size_is_removed_at_open() {
    let storage = FaultyStorage::preallocating();
    let options = LogOptions {
        preallocate: false,
        ..LogOptions::default()
    };
    write_records(&storage, &options, 3);
    // A crash in the middle of a preallocation leaves the temp file; an old spare of another
    // segment size is of no use.
    let mut half = storage.create("wal-spare.prealloc.tmp").expect("create");
    half.write_all(&[0; 1000]).expect("write");
    let mut spare = storage.create("wal-spare.prealloc").expect("create");
    spare.write_all(&[0; 1000]).expect("write");
    let (_log, replayed, _) = open(storage.clone(), options).expect("open");
    assert_eq!(replayed.records.len(), 3);
    let names = storage.file_names();
    assert!(
        !names.iter().any(|name| name.starts_with("wal-spare")),
        "{names:?}"
    );
}

#[test]
fn a_roll_into_a_preallocated_spare_keeps_every_record_through_crashes() {
    let storage = FaultyStorage::preallocating();
    let options = LogOptions {
        segment_bytes_max: 512,
        ..LogOptions::default()
    };
    let (log, _, _) = open(storage.clone(), options.clone()).expect("open");
    for index in 1..=300 {
        assert_eq!(log.append(payload(index)).expect("append"), index);
        // Give the preallocator a moment now and then, so that rolls find a spare ready.
        if index % 10 == 0 {
            log.wait_durable(index).expect("durable");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
    log.wait_durable(300).expect("durable");
    let stats = log.stats();
    assert!(stats.spares_used >= 5, "spares used: {}", stats.spares_used);
    assert_eq!(stats.prealloc_failures, 0);
    // A segment started from a spare was written over zeros: it still has the spare's size.
    assert!(
        storage
            .file_names()
            .iter()
            .filter(|name| name.starts_with("wal-0"))
            .any(|name| storage.len(name).expect("len") == 512),
        "{:?}",
        storage.file_names()
    );
    for mode in [
        CrashMode::DropUnsynced,
        CrashMode::Torn { seed: 1 },
        CrashMode::Torn { seed: 2 },
    ] {
        let (reopened, replayed, stats) =
            open(storage.crash_image(mode), options.clone()).expect("recovers");
        assert_eq!(
            replayed.payloads(),
            (1..=300).map(payload).collect::<Vec<_>>(),
            "{mode:?}"
        );
        assert_eq!(stats.truncated_tail_bytes, 0, "{mode:?}");
        assert_eq!(reopened.append(payload(301)).expect("append"), 301);
    }
    log.shutdown().expect("shutdown");
}
