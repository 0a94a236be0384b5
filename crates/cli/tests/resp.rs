//! The RESP front door through the real binary, with Redis's own tools and a Redis client
//! library: the real `redis-cli` (Debian `redis-tools`), the `redis` crate (pipelines), and a
//! kill -9 loop through that crate whose history must keep S1 (the same checker as the other
//! kill -9 tests, with INCRBY ranges counted as every value in them). Bad input: oversized
//! and unterminated frames, connections over the per-source limit.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use imstate_check::seq::{Outcome, SeqCall, check};
use rand::{Rng, SeedableRng, rngs::StdRng};
use support::{Server, free_port, monotonic_ns, runtime};

/// A server with the RESP front door on a free port; `envs` set configuration keys.
fn start(
    dir: &std::path::Path,
    config: Option<&std::path::Path>,
    envs: &[(&str, &str)],
) -> (Server, String) {
    let resp = format!("127.0.0.1:{}", free_port());
    let server = Server::start_with(dir, config, &["--resp-listen", &resp], envs);
    (server, resp)
}

/// Runs the real `redis-cli` with `args` (and `stdin`, one command per line, on one
/// connection); returns stdout.
fn redis_cli(resp: &str, args: &[&str], stdin: &str) -> String {
    let (host, port) = resp.split_once(':').unwrap();
    let mut child = Command::new("redis-cli")
        .args(["-h", host, "-p", port])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("redis-cli (apt-get install redis-tools; scripts/test.sh installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "redis-cli {args:?}");
    String::from_utf8(output.stdout).unwrap()
}

#[test]
fn redis_cli_allocates_ranges_reads_values_and_gets_clear_errors_on_one_connection() {
    let dir = tempfile::tempdir().unwrap();
    let (server, resp) = start(dir.path(), None, &[]);
    // A numeric namespace for `conv:` keys; `default:` keys go to the numeric `default`, and
    // every other key whole to `redis`, the keyed namespace the node created for RESP.
    let output = server.cli(&["seq", "create-namespace", "conv", "--id-hi", "1000000"]);
    assert!(output.status.success());
    let listed = String::from_utf8_lossy(&server.cli(&["seq", "namespaces"]).stdout).into_owned();
    assert!(
        listed.contains("redis\tids=[0, 65536)\tsection_size=64\tstep=10000\tkeys=string"),
        "{listed}"
    );
    assert_eq!(redis_cli(&resp, &["PING"], ""), "PONG\n");
    assert_eq!(redis_cli(&resp, &["INCR", "conv:7"], ""), "1\n");
    // INCRBY reserves a range and answers its last value, as Redis answers.
    assert_eq!(redis_cli(&resp, &["INCRBY", "conv:7", "10"], ""), "11\n");
    assert_eq!(redis_cli(&resp, &["INCR", "42"], ""), "1\n");
    assert_eq!(redis_cli(&resp, &["INCR", "default:42"], ""), "1\n");
    assert_eq!(redis_cli(&resp, &["INCR", "default:42"], ""), "2\n");
    // String keys, as OpenIM names conversations: each its own sequence.
    assert_eq!(redis_cli(&resp, &["INCR", "si_1001_1002"], ""), "1\n");
    assert_eq!(
        redis_cli(&resp, &["INCRBY", "si_1001_1002", "5"], ""),
        "6\n"
    );
    assert_eq!(redis_cli(&resp, &["INCR", "sg_42"], ""), "1\n");
    let output = server.cli(&["seq", "current", "--ns", "redis", "--keys", "si_1001_1002"]);
    assert_eq!(String::from_utf8_lossy(&output.stdout), "6\n");
    let long = "k".repeat(129);
    let reply = redis_cli(&resp, &["INCR", &long], "");
    assert!(
        reply.contains("keys are 1 to 128 bytes (KEY_BYTES_MAX)"),
        "{reply}"
    );
    // The same sequences as gRPC.
    let output = server.cli(&["seq", "next", "--ns", "conv", "7"]);
    assert_eq!(String::from_utf8_lossy(&output.stdout), "12\n");
    assert_eq!(redis_cli(&resp, &["GET", "conv:7"], ""), "12\n");
    assert_eq!(
        redis_cli(
            &resp,
            &["MGET", "conv:7", "42", "conv:8", "si_1001_1002", "nope"],
            ""
        ),
        "12\n1\n\n6\n\n",
        "an id never allocated is nil"
    );

    // Errors, each on the same connection, which stays usable.
    let script = "INCR conv:7\nDECR conv:7\nSET conv:7 1\nDEL conv:7\nINCRBY conv:7 -5\n\
                  INCRBY conv:7 0\nINCRBY conv:7 1000001\nINCRBY conv:7 x\nINCR conv:abc\n\
                  INCR default:nope\nFLUSHDB\nINCR\nINCR conv:7\n";
    // redis-cli prints a blank line after each error.
    let lines: Vec<String> = redis_cli(&resp, &[], script)
        .lines()
        .filter(|line| !line.is_empty())
        .map(str::to_owned)
        .collect();
    assert_eq!(lines.len(), 13, "{lines:?}");
    assert_eq!(lines[0], "13");
    for (line, expected) in [
        (
            1,
            "DECR is refused: imstate keys are sequences, which only move forward",
        ),
        (2, "SET is refused"),
        (3, "DEL is refused"),
        (
            4,
            "INCRBY by -5: the increment is 1 to 1000000 (RANGE_COUNT_MAX)",
        ),
        (5, "INCRBY by 0"),
        (6, "INCRBY by 1000001"),
        (7, "ERR value is not an integer or out of range"),
        (8, "namespace `conv` has numeric ids"),
        (9, "namespace `default` has numeric ids"),
        (10, "ERR unknown command 'FLUSHDB'"),
        (11, "ERR wrong number of arguments for 'incr' command"),
    ] {
        assert!(
            lines[line].contains(expected),
            "line {line}: {}",
            lines[line]
        );
    }
    // Nothing was allocated by the refused commands.
    assert_eq!(lines[12], "14");

    // A pipeline through redis-cli's own mass-insertion mode.
    let pipe = "INCR conv:100\r\nINCR conv:100\r\nINCRBY conv:100 5\r\nGET conv:100\r\n";
    let output = redis_cli(&resp, &["--pipe"], pipe);
    assert!(output.contains("errors: 0, replies: 4"), "{output}");
    assert_eq!(redis_cli(&resp, &["GET", "conv:100"], ""), "7\n");
}

#[test]
fn a_redis_client_library_pipelines_incr_and_incrby() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, resp) = start(dir.path(), None, &[]);
    runtime().block_on(async {
        let client = redis::Client::open(format!("redis://{resp}/")).unwrap();
        let mut connection = client.get_multiplexed_async_connection().await.unwrap();
        let (a, b, c, d): (u64, u64, u64, Option<u64>) = redis::pipe()
            .cmd("INCR")
            .arg("si_5_6")
            .cmd("INCRBY")
            .arg("si_5_6")
            .arg(100)
            .cmd("INCR")
            .arg("si_5_6")
            .cmd("GET")
            .arg("sg_6")
            .query_async(&mut connection)
            .await
            .unwrap();
        assert_eq!((a, b, c, d), (1, 101, 102, None));
        let values: Vec<Option<u64>> = redis::cmd("MGET")
            .arg("si_5_6")
            .arg("sg_6")
            .query_async(&mut connection)
            .await
            .unwrap();
        assert_eq!(values, vec![Some(102), None]);
        let error = redis::cmd("DECR")
            .arg("si_5_6")
            .query_async::<u64>(&mut connection)
            .await
            .unwrap_err();
        assert!(error.to_string().contains("only move forward"), "{error}");
        let value: u64 = redis::cmd("INCR")
            .arg("si_5_6")
            .query_async(&mut connection)
            .await
            .unwrap();
        assert_eq!(value, 103);
    });
}

/// Tiny sections and steps, so that raises and the crash windows around them are frequent.
const KILL_CONFIG: &str = r#"
[[seq.namespaces]]
name = "t"
id_lo = 0
id_hi = 1000
section_size = 8
step = 5

[[seq.namespaces]]
name = "k"
id_lo = 0
id_hi = 6
section_size = 2
step = 5
keys = "string"
"#;

/// The RESP key of a kill-loop id: even ids are numeric ids of `t`, odd ids string keys of the
/// keyed `k` (3 sections of 2 hash slots), so S1 is checked through both kinds.
fn kill_key(id: u64) -> String {
    if id.is_multiple_of(2) {
        format!("t:{id}")
    } else {
        format!("k:si_{id}_{}", id * 31)
    }
}

/// kill -9 of the node while workers INCR and INCRBY through the `redis` crate (pipelines of
/// up to 4 commands): no value of an id is ever handed out twice or behind a value already
/// returned (S1), ranges included. Knob: `IMSTATE_RESP_KILLS` (default 12).
#[cfg(not(feature = "planted-serve-before-durable"))]
#[test]
fn kill9_under_redis_client_load_keeps_s1() {
    let violations = kill_loop();
    assert!(
        violations.is_empty(),
        "S1 violations: {:#?}",
        &violations[..violations.len().min(10)]
    );
}

/// Negative control: with values served before their `max_seq` is durable, the same loop
/// through the RESP port finds S1 violations. Whether a kill lands between a value served and
/// its ceiling persisted is up to timing (one loop of 12 kills caught it in most runs, missed
/// it in one CI run), so the control gets up to 6 loops. It must be caught through both kinds
/// of keys: numeric ids of `t` and string keys of the keyed `k`.
#[cfg(feature = "planted-serve-before-durable")]
#[test]
fn kill9_under_redis_client_load_catches_the_planted_serve_before_durable() {
    const LOOPS_MAX: usize = 6;
    let (mut numeric, mut keyed) = (false, false);
    for attempt in 1..=LOOPS_MAX {
        for violation in kill_loop() {
            match violation.id() {
                Some(id) if id % 2 == 1 => keyed = true,
                Some(_) => numeric = true,
                None => {}
            }
        }
        if numeric && keyed {
            eprintln!(
                "caught through both kinds of keys by loop {attempt} of at most {LOOPS_MAX}"
            );
            return;
        }
    }
    panic!(
        "the planted bug went unnoticed through the RESP port in {LOOPS_MAX} kill loops \
         (numeric ids: {numeric}, string keys: {keyed})"
    );
}

/// The kill -9 loop; returns the checker's violations.
fn kill_loop() -> Vec<imstate_check::seq::Violation> {
    const WORKERS: u64 = 4;
    const IDS: u64 = 24;
    let kills: usize = std::env::var("IMSTATE_RESP_KILLS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(12);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("imstate.toml");
    std::fs::write(&config, KILL_CONFIG).unwrap();
    let (mut server, resp) = start(&dir.path().join("data"), Some(&config), &[]);
    let origin = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let rt = runtime();
    let workers: Vec<_> = (0..WORKERS)
        .map(|worker| {
            let (resp, stop) = (resp.clone(), Arc::clone(&stop));
            rt.spawn(async move {
                let mut rng = StdRng::seed_from_u64(worker);
                let mut history = Vec::new();
                let client = redis::Client::open(format!("redis://{resp}/")).unwrap();
                let mut connection = None;
                while !stop.load(Ordering::Relaxed) {
                    if connection.is_none() {
                        let connect = client.get_multiplexed_async_connection();
                        match tokio::time::timeout(Duration::from_secs(2), connect).await {
                            Ok(Ok(connected)) => connection = Some(connected),
                            _ => {
                                tokio::time::sleep(Duration::from_millis(20)).await;
                                continue;
                            }
                        }
                    }
                    // A pipeline of 1-4 commands: INCR, or INCRBY of 2-9 (the step is 5).
                    let calls: Vec<(u64, u64)> = (0..rng.gen_range(1..5))
                        .map(|_| {
                            let count = if rng.gen_bool(0.3) {
                                rng.gen_range(2..10)
                            } else {
                                1
                            };
                            (rng.gen_range(0..IDS), count)
                        })
                        .collect();
                    let mut pipe = redis::pipe();
                    for (id, count) in &calls {
                        if *count == 1 {
                            pipe.cmd("INCR").arg(kill_key(*id));
                        } else {
                            pipe.cmd("INCRBY").arg(kill_key(*id)).arg(*count);
                        }
                    }
                    let start_ns = monotonic_ns(origin);
                    let query = pipe.query_async::<Vec<u64>>(connection.as_mut().unwrap());
                    let result = tokio::time::timeout(Duration::from_secs(2), query).await;
                    let end_ns = monotonic_ns(origin);
                    let values = match result {
                        Ok(Ok(values)) if values.len() == calls.len() => Some(values),
                        _ => {
                            connection = None;
                            None
                        }
                    };
                    for (index, (id, count)) in calls.iter().enumerate() {
                        let outcome = match &values {
                            None => Outcome::Unknown,
                            Some(values) if *count == 1 => Outcome::Ok(vec![values[index]]),
                            Some(values) => Outcome::Ranges {
                                count: *count,
                                lasts: vec![values[index]],
                            },
                        };
                        history.push(SeqCall {
                            ids: vec![*id],
                            start_ns,
                            end_ns,
                            outcome,
                        });
                    }
                }
                history
            })
        })
        .collect();
    let mut rng = StdRng::seed_from_u64(0x7e59);
    for _ in 0..kills {
        std::thread::sleep(Duration::from_millis(rng.gen_range(60..300)));
        server.kill9();
        server.restart();
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let mut history = Vec::new();
    for worker in workers {
        history.extend(rt.block_on(worker).unwrap());
    }
    let ok = history
        .iter()
        .filter(|call| !matches!(call.outcome, Outcome::Unknown))
        .count();
    let ranges = history
        .iter()
        .filter(|call| matches!(call.outcome, Outcome::Ranges { .. }))
        .count();
    let violations = check(&history);
    let keyed = violations
        .iter()
        .filter(|violation| violation.id().is_some_and(|id| id % 2 == 1))
        .count();
    eprintln!(
        "resp kill9: {kills} kills, {} calls ({ok} answered, {ranges} of them INCRBY ranges), \
         {} violations ({keyed} of string keys)",
        history.len(),
        violations.len()
    );
    assert!(
        ok > 500 && ranges > 100,
        "too little load: {ok} answered, {ranges} ranges"
    );
    assert!(
        ok < history.len(),
        "no call was interrupted: the kills did not land under load"
    );
    violations
}

/// Writes `bytes` on a fresh connection and reads until the node closes (10 s at most).
fn exchange(resp: &str, bytes: &[u8]) -> String {
    let mut stream = TcpStream::connect(resp).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(bytes).unwrap();
    let mut received = Vec::new();
    let _ = stream.read_to_end(&mut received);
    String::from_utf8_lossy(&received).into_owned()
}

#[test]
fn bad_frames_and_too_many_connections_get_a_clear_error_and_others_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, resp) = start(
        dir.path(),
        None,
        &[
            ("IMSTATE_WIRE__CONNECTIONS_PER_SOURCE_MAX", "20"),
            ("IMSTATE_WIRE__IDLE_TIMEOUT_MS", "1500"),
        ],
    );
    // A bulk string claiming a gigabyte: refused from its header, and the connection closed.
    let reply = exchange(&resp, b"*2\r\n$4\r\nINCR\r\n$1000000000\r\n");
    assert!(
        reply.starts_with("-ERR Protocol error: invalid bulk length 1000000000"),
        "{reply}"
    );
    assert!(reply.contains("ARG_BYTES_MAX"), "{reply}");
    // Bad framing after a good command: the good one is answered, then the error, then close.
    let reply = exchange(&resp, b"INCR 1\r\n*1\r\n:5\r\n");
    assert_eq!(
        reply,
        ":1\r\n-ERR Protocol error: expected '$', got ':'\r\n"
    );
    // A pipelined run of INCRs is answered as one batch; one bad id in it still gets its own
    // error and the others their values, in order.
    let reply = exchange(
        &resp,
        b"INCR default:8\r\nINCR default:99999999999\r\nINCR default:8\r\nQUIT\r\n",
    );
    assert_eq!(
        reply,
        ":1\r\n-ERR id 99999999999 is out of range [0, 4294967296) of namespace `default`\r\n\
         :2\r\n+OK\r\n"
    );
    // An unterminated bulk string: the node waits for it, then closes at the idle timeout.
    let started = Instant::now();
    let reply = exchange(&resp, b"*2\r\n$4\r\nINCR\r\n$5\r\n12");
    assert!(
        reply.contains("no command for 1500 ms (wire.idle_timeout_ms)"),
        "{reply}"
    );
    assert!(started.elapsed() < Duration::from_secs(8));

    // 20 idle connections are the limit from one address: the 21st gets an error and is
    // closed; once one closes, a new one is served. (First, the connections above are let go:
    // the node counts one off just after its client saw it closed.)
    std::thread::sleep(Duration::from_millis(300));
    let mut idle: Vec<TcpStream> = (0..20)
        .map(|_| TcpStream::connect(&resp).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let reply = exchange(&resp, b"PING\r\n");
    assert!(
        reply.contains("max number of clients reached")
            && reply.contains("connections_per_source_max is 20"),
        "{reply}"
    );
    idle.pop();
    std::thread::sleep(Duration::from_millis(200));
    let mut stream = TcpStream::connect(&resp).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(b"PING\r\n").unwrap();
    let mut pong = [0u8; 7];
    stream.read_exact(&mut pong).unwrap();
    assert_eq!(&pong, b"+PONG\r\n");
}

#[test]
fn with_tokens_every_command_needs_auth_first() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "s3cret\n").unwrap();
    let config = dir.path().join("imstate.toml");
    std::fs::write(
        &config,
        format!("[auth]\ntoken_file = \"{}\"\n", tokens.display()),
    )
    .unwrap();
    let (_server, resp) = start(&dir.path().join("data"), Some(&config), &[]);
    let reply = redis_cli(&resp, &[], "INCR 1\nAUTH wrong\nAUTH s3cret\nINCR 1\n");
    let lines: Vec<&str> = reply.lines().filter(|line| !line.is_empty()).collect();
    assert!(lines[0].starts_with("NOAUTH"), "{reply}");
    assert!(lines[1].starts_with("WRONGPASS"), "{reply}");
    assert_eq!(&lines[2..], ["OK", "1"], "{reply}");
    // The client library's way: the password in the URL.
    runtime().block_on(async {
        let client = redis::Client::open(format!("redis://:s3cret@{resp}/")).unwrap();
        let mut connection = client.get_multiplexed_async_connection().await.unwrap();
        let value: u64 = redis::cmd("INCR")
            .arg("1")
            .query_async(&mut connection)
            .await
            .unwrap();
        assert_eq!(value, 2);
    });
}
