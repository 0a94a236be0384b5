//! Regression tests for what a hostile test found on one node (issue 11), through the real
//! binary: each would page someone in production, and each fails without its fix.

mod support;

use std::time::{Duration, Instant};

use imstate_client::{Client, WireClient};
use support::{Server, login_args, runtime};
use tokio_stream::StreamExt;

/// SIGTERM with 100 Watch streams open (one of them never read) ends every stream with
/// UNAVAILABLE "stopping" and exits 0 within the drain timeout. It used to wait for the watch
/// clients to go away (49 s in the report).
#[test]
fn sigterm_ends_open_watch_streams_and_exits_promptly() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path(), None);
    let runtime = runtime();
    let (streams, reader) = runtime.block_on(async {
        let mut clients = Vec::new();
        for _ in 0..4 {
            clients.push(Client::connect(&server.addr).await.unwrap());
        }
        let mut streams = Vec::new();
        for index in 0..100u64 {
            // Four connections, 25 streams each; half filtered, half not.
            let client = clients[index as usize % 4].clone();
            let uids = if index % 2 == 0 {
                vec![index % 20]
            } else {
                Vec::new()
            };
            streams.push((client.clone(), client.watch(uids).await.unwrap()));
        }
        // One stream is read until it ends: it must end with a status naming the stop.
        let (_, mut read) = streams.pop().unwrap();
        let reader = tokio::spawn(async move {
            loop {
                match read.next().await {
                    Some(Ok(_)) => continue,
                    Some(Err(error)) => return Some(error),
                    None => return None,
                }
            }
        });
        (streams, reader)
    });
    // Traffic for the streams, so some have unread events queued.
    for uid in 0..20 {
        let output = server.login(&uid.to_string(), "d", "g", "1");
        assert!(output.status.success());
    }
    let (status, took) = server
        .terminate_within(Duration::from_secs(20))
        .expect("SIGTERM with Watch streams open must exit; it hung for 20 s");
    assert!(status.success(), "{status:?}");
    println!("shutdown with 100 Watch streams open took {took:?}");
    assert!(
        took < imstate_server::server::DRAIN_TIMEOUT + Duration::from_secs(3),
        "shutdown took {took:?}"
    );
    let ended = runtime
        .block_on(reader)
        .unwrap()
        .expect("the stream ends with a status");
    assert_eq!(ended.code(), Some(tonic::Code::Unavailable), "{ended}");
    assert!(ended.to_string().contains("stopping"), "{ended}");
    drop(streams);
}

/// A Watch subscriber filtered to one uid is held to account only for that uid's events: other
/// uids' traffic far beyond `watch_buffer_events` does not cut it off (it used to, with the
/// message "fell behind by 673 events (limit 8192)"). And a retried identical login emits no
/// second Watch event.
#[test]
fn a_one_uid_watcher_survives_other_uids_traffic_and_sees_no_retry_event() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(
        dir.path(),
        None,
        &[],
        &[("IMSTATE_PRESENCE__WATCH_BUFFER_EVENTS", "16")],
    );
    runtime().block_on(async {
        let client = Client::connect(&server.addr).await.unwrap();
        let mut mine = client.watch(vec![7]).await.unwrap();
        let wire = WireClient::connect(&server.wire_addr, "").await.unwrap();
        wire.login(&login_args(7, "ios", 1)).await.unwrap();
        // 1,000 events for other uids, none read by the subscriber meanwhile.
        for uid in 100..1_100 {
            wire.login(&login_args(uid, "ios", 1)).await.unwrap();
        }
        // The same login again (a gateway's retry), then a real change.
        let retried = wire.login(&login_args(7, "ios", 1)).await.unwrap();
        assert!(retried.replaced.is_none());
        wire.login(&login_args(7, "pc", 2)).await.unwrap();
        let mut seen = Vec::new();
        for _ in 0..2 {
            let event = tokio::time::timeout(Duration::from_secs(10), mine.next())
                .await
                .expect("an event within 10 s")
                .expect("the stream is open")
                .expect("not cut off by other uids' traffic");
            seen.push((event.session.uid, event.session.device.clone()));
        }
        assert_eq!(
            seen,
            [(7, "ios".into()), (7, "pc".into())],
            "no event for the retry"
        );
    });
}

/// A Watch on a node that stops answering (SIGSTOP: the connection stays open, nothing
/// arrives) fails within the client's keepalive (PING every `KEEPALIVE_INTERVAL`, dead after
/// `KEEPALIVE_TIMEOUT` more) instead of waiting forever, so a watcher can go elsewhere; and the
/// position it reached resumes once the node runs again. Without the keepalive the stream
/// waited for the whole pause.
#[test]
fn a_watch_on_a_paused_node_fails_within_the_keepalive_and_resumes_after() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), None);
    runtime().block_on(async {
        let client = Client::connect(&server.addr).await.unwrap();
        let mut events = client.watch(vec![7]).await.unwrap();
        let pid = server.pid().expect("running") as i32;
        // SAFETY: signals to our own child process.
        unsafe { libc::kill(pid, libc::SIGSTOP) };
        let paused = Instant::now();
        let ended = tokio::time::timeout(Duration::from_secs(20), events.next()).await;
        let waited = paused.elapsed();
        unsafe { libc::kill(pid, libc::SIGCONT) };
        match ended {
            Ok(Some(Err(_))) | Ok(None) => {}
            other => panic!("the stream on a paused node did not fail: {other:?}"),
        }
        assert!(
            waited < imstate_client::KEEPALIVE_INTERVAL + imstate_client::KEEPALIVE_TIMEOUT * 2,
            "failed only after {waited:?}"
        );
        let position = events.position().clone();
        let client = Client::connect(&server.addr).await.unwrap();
        let mut events = client.watch_from(vec![7], Some(&position)).await.unwrap();
        client.login(login_args(7, "ios", 1)).await.unwrap();
        let event = tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .expect("an event within 10 s")
            .expect("open")
            .expect("an event");
        assert_eq!(event.session.uid, 7);
    });
}

/// The wire client's side of the same: a call to a node that stops answering (SIGSTOP) fails
/// within the reply stall timeout instead of waiting for the whole pause, and a new
/// connection works once the node runs again. Before, it waited as long as the pause (the
/// wire client had a connect timeout only); `imstate_wire::pipeline`'s unit test shows the
/// call hanging without the timeout.
#[test]
fn a_wire_call_to_a_paused_node_fails_within_the_stall_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), None);
    runtime().block_on(async {
        let client = WireClient::connect(&server.wire_addr, "").await.unwrap();
        client.heartbeat(7, 1).await.unwrap_err(); // unknown session: the node answers
        let pid = server.pid().expect("running") as i32;
        // SAFETY: signals to our own child process.
        unsafe { libc::kill(pid, libc::SIGSTOP) };
        let paused = Instant::now();
        let outcome = tokio::time::timeout(Duration::from_secs(30), client.next("", 1)).await;
        let waited = paused.elapsed();
        unsafe { libc::kill(pid, libc::SIGCONT) };
        match outcome {
            Ok(Err(error)) => assert!(error.to_string().contains("no reply"), "{error}"),
            other => panic!("the call on a paused node did not fail: {other:?}"),
        }
        let stall = imstate_wire::pipeline::REPLY_STALL_TIMEOUT;
        assert!(
            waited >= stall && waited < stall + Duration::from_secs(5),
            "failed after {waited:?}"
        );
        let client = WireClient::connect(&server.wire_addr, "").await.unwrap();
        assert!(client.next("", 1).await.unwrap() >= 1);
    });
}

fn stderr_of(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Over-long names are refused before any lookup and never echoed whole: a 20 KB namespace
/// name used to come back inside the error, and the gRPC client died with `h2 protocol error`.
/// Names with control characters are refused, and a step that would exhaust an id's values
/// after a restart is refused at creation.
#[test]
fn bad_names_and_absurd_namespace_parameters_get_short_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), None);
    let long = "n".repeat(20_000);
    let output = server.cli(&["seq", "next", "--ns", &long, "1"]);
    let stderr = stderr_of(&output);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("NAME_BYTES_MAX"), "{stderr}");
    assert!(
        stderr.len() < 1_000,
        "the error echoed {} bytes",
        stderr.len()
    );
    assert!(!stderr.contains("h2 protocol error"), "{stderr}");

    let long_gateway = "g".repeat(20_000);
    for args in [
        vec!["presence", "gateway-down", &long_gateway],
        vec!["presence", "gateway-heartbeat", &long_gateway],
    ] {
        let output = server.cli(&args);
        let stderr = stderr_of(&output);
        assert_eq!(output.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains("gateway is 20000 bytes"), "{stderr}");
        assert!(
            stderr.len() < 1_000,
            "the error echoed {} bytes",
            stderr.len()
        );
    }

    let output = server.login("1", "ph\none", "gw", "1");
    let stderr = stderr_of(&output);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("control character"), "{stderr}");

    let output = server.cli(&[
        "seq",
        "create-namespace",
        "huge-step",
        "--id-hi",
        "100",
        "--step",
        "18446744073709551615",
    ]);
    let stderr = stderr_of(&output);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("STEP_MAX"), "{stderr}");

    // Two gateways reusing one conn id for one uid: the error says the rule.
    for (gateway, expect_ok) in [("gwA", true), ("gwB", false)] {
        let output = server.login("51", gateway, gateway, "7");
        assert_eq!(output.status.success(), expect_ok, "{}", stderr_of(&output));
        if !expect_ok {
            let stderr = stderr_of(&output);
            assert!(stderr.contains("gateway \"gwA\""), "{stderr}");
            assert!(
                stderr.contains("unique among one uid's sessions"),
                "{stderr}"
            );
        }
    }
}

/// Runs `serve` on `data_dir` with stderr to a file; returns the child once it listens, or the
/// exit status and stderr if it stops first.
fn serve_with_stderr(
    data_dir: &std::path::Path,
    stderr_file: &std::path::Path,
) -> Result<(std::process::Child, impl Sized), (std::process::ExitStatus, String)> {
    use std::io::BufRead;
    let stderr = std::fs::File::create(stderr_file).unwrap();
    let mut child = std::process::Command::new(support::binary())
        .arg("serve")
        .arg("--data-dir")
        .arg(data_dir)
        .args(support::FREE_PORTS)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let mut line = String::new();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    stdout.read_line(&mut line).unwrap();
    if line.starts_with("imstate listening on") {
        // The stdout pipe stays open with the child: it prints more after this line.
        return Ok((child, stdout));
    }
    let status = child.wait().unwrap();
    Err((status, std::fs::read_to_string(stderr_file).unwrap()))
}

/// The oldest or newest file of `dir` whose name starts with `prefix` (names sort by LSN).
fn file_of(dir: &std::path::Path, prefix: &str, newest: bool) -> std::path::PathBuf {
    let mut found: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| {
            path.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(prefix)
        })
        .collect();
    found.sort();
    if newest {
        found.pop()
    } else {
        found.into_iter().next()
    }
    .expect("a file")
}

fn flip_byte(path: &std::path::Path, offset: u64) {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut byte = [0u8];
    file.seek(SeekFrom::Start(offset)).unwrap();
    file.read_exact(&mut byte).unwrap();
    file.seek(SeekFrom::Start(offset)).unwrap();
    file.write_all(&[byte[0] ^ 0x5a]).unwrap();
}

/// A damaged checkpoint is passed over with one warning that names it by its path (it used to
/// be skipped silently); damage in the middle of a log stops the start with one error that
/// names the file by its path, under `seq/` or `presence/`, said once.
#[test]
fn damaged_checkpoints_and_logs_are_named_by_path_and_reported_once() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let stderr_file = dir.path().join("stderr");
    let mut server = Server::start(&data, None);
    for uid in 1..=10 {
        let output = server.login(&uid.to_string(), "d", "g", "1");
        assert!(output.status.success());
    }
    assert!(server.cli(&["ctl", "checkpoint"]).status.success());
    // Ids in three sections: three raises after the namespace record in the sequence log.
    assert!(
        server
            .cli(&["seq", "next", "1", "100001", "200001"])
            .status
            .success()
    );
    assert!(server.terminate().success());

    let checkpoint = file_of(&data.join("presence"), "checkpoint-", true);
    flip_byte(&checkpoint, 40);
    let (mut child, _stdout) = serve_with_stderr(&data, &stderr_file)
        .unwrap_or_else(|(status, stderr)| panic!("{status:?}: {stderr}"));
    let stderr = std::fs::read_to_string(&stderr_file).unwrap();
    let warnings: Vec<_> = stderr
        .lines()
        .filter(|line| line.contains("skipped an invalid checkpoint"))
        .collect();
    assert_eq!(warnings.len(), 1, "{stderr}");
    assert!(
        warnings[0].contains(&checkpoint.display().to_string()),
        "{stderr}"
    );
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    let stderr = std::fs::read_to_string(&stderr_file).unwrap();
    assert!(status.success(), "{status:?}: {stderr}");

    let segment = file_of(&data.join("seq"), "wal-", false);
    flip_byte(&segment, 30);
    let Err((status, stderr)) = serve_with_stderr(&data, &stderr_file) else {
        panic!("a node with a damaged sequence log started");
    };
    assert_eq!(status.code(), Some(1), "{stderr}");
    let path = segment.display().to_string();
    assert!(stderr.contains(&path), "the error names {path}: {stderr}");
    assert_eq!(
        stderr.matches("corrupt log").count(),
        1,
        "said once: {stderr}"
    );
}

/// Sequence history that went missing is detected: with `seq/*.log` deleted but a checkpoint
/// kept, or with `seq/` wiped while `presence/` remains, the node used to start and hand out
/// `1` again for ids it had served. It now refuses, naming what is missing; removing the whole
/// data directory is the one way to start afresh.
#[test]
fn missing_sequence_history_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let stderr_file = dir.path().join("stderr");
    let next = |server: &Server, id: &str| -> u64 {
        let output = server.cli(&["seq", "next", id]);
        assert!(output.status.success(), "{}", stderr_of(&output));
        String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .unwrap()
    };
    let mut server = Server::start(&data, None);
    assert_eq!(next(&server, "7"), 1);
    assert!(server.cli(&["ctl", "checkpoint"]).status.success());
    // A raise in another section after the checkpoint: history the checkpoint does not hold.
    assert_eq!(next(&server, "100007"), 1);
    assert!(server.terminate().success());

    // 1. The log files deleted, the checkpoint kept.
    let saved = dir.path().join("saved-seq");
    copy_dir(&data.join("seq"), &saved);
    for entry in std::fs::read_dir(data.join("seq")).unwrap() {
        let path = entry.unwrap().path();
        if path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("wal-")
        {
            std::fs::remove_file(path).unwrap();
        }
    }
    let Err((status, stderr)) = serve_with_stderr(&data, &stderr_file) else {
        panic!("started with its sequence log files deleted");
    };
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("seq/HISTORY records"), "{stderr}");
    assert!(
        stderr.contains("remove the whole data directory"),
        "{stderr}"
    );

    // 2. seq/ wiped whole while presence/ remains.
    std::fs::remove_dir_all(data.join("seq")).unwrap();
    let Err((status, stderr)) = serve_with_stderr(&data, &stderr_file) else {
        panic!("started with seq/ wiped");
    };
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("seq/HISTORY is missing"), "{stderr}");

    // The full history back: the node starts and goes on above what it served.
    std::fs::remove_dir_all(data.join("seq")).ok();
    copy_dir(&saved, &data.join("seq"));
    server.restart();
    assert!(next(&server, "7") > 1);
    assert!(server.terminate().success());

    // 3. The deliberate way to start afresh: remove the whole data directory.
    std::fs::remove_dir_all(&data).unwrap();
    server.restart();
    assert_eq!(next(&server, "7"), 1);
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}
