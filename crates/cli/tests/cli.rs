//! The binary as a user runs it: `serve`, `seq next|current|namespaces|create-namespace`, exit
//! codes, one-line errors, and start-up failures on bad data directories.

mod support;

use std::process::{Command, Stdio};

use support::{Server, binary};

fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn seq_next_prints_one_value_per_id_in_order_and_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), None);
    let output = server.cli(&["seq", "next", "5", "6", "5"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(stdout(&output), "1\n1\n2\n");
    let output = server.cli(&["seq", "current", "5", "6", "7"]);
    assert_eq!(stdout(&output), "2\n1\n0\n");

    // A clean stop exits 0; after the restart, values continue above the persisted ceiling.
    assert!(server.terminate().success());
    server.restart();
    let output = server.cli(&["seq", "next", "5"]);
    let value: u64 = stdout(&output).trim().parse().unwrap();
    assert!(value > 2, "restart must not roll back: got {value}");
    assert_eq!(value, 10_001, "restart resumes at the section ceiling + 1");
}

/// Range allocation through the binary: `seq next --count N` reserves N consecutive seqs per
/// id (a repeated id gets the next range), ranges never overlap single allocations, and a
/// kill -9 after a range that crossed several steps resumes above all of it (S1, S2).
#[test]
fn seq_next_count_reserves_consecutive_ranges_that_survive_kill9() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), None);
    let output = server.cli(&["seq", "next", "--count", "5", "7", "8", "7"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(stdout(&output), "1\t5\n1\t5\n6\t10\n");
    let output = server.cli(&["seq", "next", "7"]);
    assert_eq!(stdout(&output), "11\n");
    // 25,000 values from a step of 10,000: the node raises past several steps before serving.
    let output = server.cli(&["seq", "next", "--count", "25000", "7"]);
    assert_eq!(stdout(&output), "12\t25011\n");
    let output = server.cli(&["seq", "current", "7", "8"]);
    assert_eq!(stdout(&output), "25011\n5\n");
    server.kill9();
    server.restart();
    let output = server.cli(&["seq", "next", "--count", "2", "7"]);
    let first: u64 = stdout(&output).split('\t').next().unwrap().parse().unwrap();
    assert!(
        first > 25_011,
        "a range after kill -9 must start above every value served: {first}"
    );
    // Bad counts: a clear error naming the limit, and nothing allocated.
    for count in ["0", "1000001"] {
        let output = server.cli(&["seq", "next", "--count", count, "7"]);
        assert_eq!(output.status.code(), Some(1), "--count {count}");
        let message = stderr(&output);
        assert!(message.contains("RANGE_COUNT_MAX"), "{message}");
    }
    let output = server.cli(&["seq", "current", "7"]);
    assert_eq!(stdout(&output).trim(), (first + 1).to_string());
}

/// A keyed namespace through the binary: `create-namespace --keys string`, `seq next --keys`
/// (single, repeated, ranges), `seq current --keys`, the errors for bad keys and the wrong id
/// kind (nothing allocated), and kill -9: every key, seen before or never, resumes above the
/// values served (S1), because recovery skips each key of a section to its ceiling.
#[test]
fn keyed_namespaces_take_string_keys_that_survive_kill9() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), None);
    let output = server.cli(&[
        "seq",
        "create-namespace",
        "conv",
        "--id-hi",
        "16",
        "--section-size",
        "4",
        "--step",
        "50",
        "--keys",
        "string",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(
        stdout(&output).contains("keys=string"),
        "{}",
        stdout(&output)
    );
    let next = |server: &Server, args: &[&str]| {
        let mut all = vec!["seq", "next", "--ns", "conv", "--keys"];
        all.extend(args);
        let output = server.cli(&all);
        assert!(output.status.success(), "{args:?}: {}", stderr(&output));
        stdout(&output)
    };
    assert_eq!(
        next(&server, &["si_1001_1002", "sg_7", "si_1001_1002"]),
        "1\n1\n2\n"
    );
    assert_eq!(next(&server, &["--count", "40", "sg_7"]), "2\t41\n");
    let long = "k".repeat(128);
    assert_eq!(next(&server, &[&long]), "1\n");
    let output = server.cli(&["seq", "current", "--ns", "conv", "--keys", "sg_7", "absent"]);
    assert_eq!(stdout(&output), "41\n0\n");
    // Bad input: a clear error, nothing allocated.
    let too_long = "k".repeat(129);
    let cases: [(&[&str], &str); 4] = [
        (&["--keys", &too_long], "KEY_BYTES_MAX"),
        (&["--keys", ""], "KEY_BYTES_MAX"),
        (&["7"], "takes string keys"),
        (&["sg_7"], "pass --keys"),
    ];
    for (args, expected) in cases {
        let mut all = vec!["seq", "next", "--ns", "conv"];
        all.extend(args);
        let output = server.cli(&all);
        assert_eq!(output.status.code(), Some(1), "{args:?}");
        assert!(
            stderr(&output).contains(expected),
            "{args:?}: {}",
            stderr(&output)
        );
    }
    let output = server.cli(&["seq", "next", "--keys", "sg_7"]);
    assert!(
        stderr(&output).contains("takes numeric ids"),
        "{}",
        stderr(&output)
    );
    assert_eq!(
        stdout(&server.cli(&["seq", "current", "--ns", "conv", "--keys", "sg_7"])),
        "41\n"
    );

    server.kill9();
    server.restart();
    let served = [("si_1001_1002", 2u64), ("sg_7", 41), (long.as_str(), 1)];
    for (key, last) in served {
        let value: u64 = next(&server, &[key]).trim().parse().unwrap();
        assert!(value > last, "{key}: {value} after {last} before the kill");
    }
    // The namespace's kind survived too.
    let output = server.cli(&["seq", "namespaces"]);
    assert!(
        stdout(&output).contains("keys=string"),
        "{}",
        stdout(&output)
    );
}

/// min_seq through the binary: set (batch, all or none, never above the current seq, 0
/// clears), read, and durable across kill -9, a checkpoint and a restart; for numeric ids and
/// string keys.
#[test]
fn min_seq_is_bounded_by_the_current_seq_and_survives_kill9_and_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), None);
    let ok = |server: &Server, args: &[&str]| {
        let output = server.cli(args);
        assert!(output.status.success(), "{args:?}: {}", stderr(&output));
        stdout(&output)
    };
    ok(&server, &["seq", "next", "5", "5", "5", "6"]);
    ok(&server, &["seq", "set-min-seq", "5=2", "6=1"]);
    assert_eq!(ok(&server, &["seq", "min-seq", "5", "6", "7"]), "2\n1\n0\n");
    // Above the current seq: refused, and nothing of the batch is set.
    let output = server.cli(&["seq", "set-min-seq", "5=3", "6=2"]);
    assert_eq!(output.status.code(), Some(1));
    let message = stderr(&output);
    assert!(
        message.contains("min_seq 2 of id 6") && message.contains("above its current seq 1"),
        "{message}"
    );
    assert!(message.contains("FailedPrecondition"), "{message}");
    assert_eq!(ok(&server, &["seq", "min-seq", "5", "6"]), "2\n1\n");
    let output = server.cli(&["seq", "set-min-seq", "5"]);
    assert!(
        stderr(&output).contains("is not ID=MIN_SEQ"),
        "{}",
        stderr(&output)
    );
    // A keyed namespace.
    ok(
        &server,
        &[
            "seq",
            "create-namespace",
            "conv",
            "--id-hi",
            "64",
            "--keys",
            "string",
        ],
    );
    ok(
        &server,
        &[
            "seq", "next", "--ns", "conv", "--keys", "--count", "9", "si_1_2",
        ],
    );
    ok(
        &server,
        &["seq", "set-min-seq", "--ns", "conv", "--keys", "si_1_2=9"],
    );

    server.kill9();
    server.restart();
    assert_eq!(ok(&server, &["seq", "min-seq", "5", "6"]), "2\n1\n");
    let keyed = [
        "seq", "min-seq", "--ns", "conv", "--keys", "si_1_2", "absent",
    ];
    assert_eq!(ok(&server, &keyed), "9\n0\n");
    // Into a checkpoint, then a set after it, 0 clearing one: both survive kill -9.
    ok(&server, &["ctl", "checkpoint"]);
    ok(&server, &["seq", "set-min-seq", "5=3", "6=0"]);
    server.kill9();
    server.restart();
    assert_eq!(ok(&server, &["seq", "min-seq", "5", "6"]), "3\n0\n");
    assert_eq!(ok(&server, &keyed), "9\n0\n");
}

#[test]
fn bad_input_gets_a_one_line_error_and_nonzero_exit() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), None);
    let cases: [(&[&str], &str); 3] = [
        (&["seq", "next", "4294967296"], "[0, 4294967296)"),
        (&["seq", "next", "--ns", "nope", "1"], "unknown namespace"),
        (&["seq", "current", "--ns", "nope", "1"], "NotFound"),
    ];
    for (args, expected) in cases {
        let output = server.cli(args);
        assert_eq!(output.status.code(), Some(1), "{args:?}");
        let message = stderr(&output);
        assert!(message.starts_with("error: "), "{message}");
        assert_eq!(message.trim_end().lines().count(), 1, "one line: {message}");
        assert!(message.contains(expected), "{args:?}: {message}");
        assert!(stdout(&output).is_empty());
    }
}

#[test]
fn oversized_batch_names_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), None);
    let ids: Vec<String> = (0..10_001).map(|i| i.to_string()).collect();
    let mut args = vec!["seq", "next"];
    args.extend(ids.iter().map(String::as_str));
    let output = server.cli(&args);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("10000"), "{}", stderr(&output));
    // Nothing was allocated.
    assert_eq!(stdout(&server.cli(&["seq", "current", "0"])), "0\n");
}

#[test]
fn namespaces_can_be_created_listed_and_used() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), None);
    let output = server.cli(&[
        "seq",
        "create-namespace",
        "conv",
        "--id-lo",
        "100",
        "--id-hi",
        "200",
        "--section-size",
        "10",
        "--step",
        "3",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let listing = stdout(&server.cli(&["seq", "namespaces"]));
    assert!(
        listing.contains("default\tids=[0, 4294967296)"),
        "{listing}"
    );
    assert!(
        listing.contains("conv\tids=[100, 200)\tsection_size=10\tstep=3"),
        "{listing}"
    );
    assert_eq!(
        stdout(&server.cli(&["seq", "next", "--ns", "conv", "150", "150"])),
        "1\n2\n"
    );
    let output = server.cli(&["seq", "next", "--ns", "conv", "99"]);
    assert!(
        stderr(&output).contains("[100, 200)"),
        "{}",
        stderr(&output)
    );
    let again = server.cli(&["seq", "create-namespace", "conv", "--id-hi", "5"]);
    assert_eq!(again.status.code(), Some(1));
    assert!(
        stderr(&again).contains("AlreadyExists"),
        "{}",
        stderr(&again)
    );
}

#[test]
fn no_server_is_a_clear_connect_error() {
    let port = support::free_port();
    let output = Command::new(binary())
        .args(["seq", "next", "--addr", &format!("127.0.0.1:{port}"), "1"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("cannot connect"),
        "{}",
        stderr(&output)
    );
}

fn serve_fails(data_dir: &std::path::Path) -> String {
    let output = Command::new(binary())
        .arg("serve")
        .args(support::FREE_PORTS)
        .arg("--data-dir")
        .arg(data_dir)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    stderr(&output)
}

#[test]
fn a_locked_data_directory_names_the_holder_pid() {
    let dir = tempfile::tempdir().unwrap();
    let _server = Server::start(dir.path(), None);
    let message = serve_fails(dir.path());
    assert!(
        message.contains("locked by another imstate process (pid "),
        "{message}"
    );
}

#[test]
fn an_unusable_data_directory_is_a_clear_startup_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("file");
    std::fs::write(&file, b"not a directory").unwrap();
    let message = serve_fails(&file.join("data"));
    assert!(
        message.contains("data directory") && message.contains("cannot create"),
        "{message}"
    );
}

#[test]
fn mid_log_corruption_refuses_to_start_naming_file_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), None);
    // Many sections => many raise records in the log.
    let ids: Vec<String> = (0..50).map(|i| (i * 100_000).to_string()).collect();
    let mut args = vec!["seq", "next"];
    args.extend(ids.iter().map(String::as_str));
    assert!(server.cli(&args).status.success());
    assert!(server.terminate().success());
    drop(server);

    let seq_dir = dir.path().join("seq");
    let mut segments: Vec<_> = std::fs::read_dir(&seq_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log") && p.metadata().unwrap().len() > 0)
        .collect();
    segments.sort();
    let segment = segments.first().expect("a non-empty segment");
    let mut bytes = std::fs::read(segment).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x10;
    std::fs::write(segment, &bytes).unwrap();

    let message = serve_fails(dir.path());
    let name = segment.file_name().unwrap().to_string_lossy().into_owned();
    assert!(message.contains(&name), "names the file: {message}");
    assert!(message.contains("offset"), "names the offset: {message}");
}

#[test]
fn help_lists_the_commands_the_readme_documents() {
    let output = Command::new(binary()).arg("--help").output().unwrap();
    let help = stdout(&output);
    for command in ["serve", "seq", "presence", "ctl", "config"] {
        assert!(help.contains(command), "{help}");
    }
    let output = Command::new(binary())
        .args(["seq", "--help"])
        .output()
        .unwrap();
    let help = stdout(&output);
    for command in [
        "next",
        "current",
        "set-min-seq",
        "min-seq",
        "namespaces",
        "create-namespace",
    ] {
        assert!(help.contains(command), "{help}");
    }
}
