//! Operability of the real binary: `/metrics` (valid Prometheus text, counters that move),
//! `/healthz` and `/readyz` (503 while a large log recovers, 200 after), the gRPC health
//! service, and `imstate ctl status|checkpoint|namespaces`.

mod support;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

use imstate_log::{FileStorage, FsyncPolicy, Log, LogOptions};
use imstate_node::records::SeqRecord;
use imstate_seq::{NamespaceDef, Raise};
use support::{Server, http_get};

fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// One parsed sample: metric name, labels, value.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: HashMap<String, String>,
    value: f64,
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn parse_value(text: &str) -> Result<f64, String> {
    match text {
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => text.parse().map_err(|_| format!("bad value {text:?}")),
    }
}

/// Parses `{a="x",b="y"}` (with `\"`, `\\`, `\n` escapes); returns the labels and the rest.
fn parse_labels(text: &str) -> Result<(HashMap<String, String>, &str), String> {
    let mut labels = HashMap::new();
    let Some(mut rest) = text.strip_prefix('{') else {
        return Ok((labels, text));
    };
    loop {
        rest = rest.trim_start_matches(',');
        if let Some(after) = rest.strip_prefix('}') {
            return Ok((labels, after));
        }
        let (name, after) = rest.split_once("=\"").ok_or("label without =\"")?;
        if !valid_name(name) || name.contains(':') {
            return Err(format!("bad label name {name:?}"));
        }
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next().ok_or("unterminated label value")? {
                (_, '\\') => match chars.next().ok_or("dangling escape")?.1 {
                    'n' => value.push('\n'),
                    c @ ('\\' | '"') => value.push(c),
                    c => return Err(format!("bad escape \\{c}")),
                },
                (index, '"') => break index,
                (_, c) => value.push(c),
            }
        };
        if labels.insert(name.to_string(), value).is_some() {
            return Err(format!("label {name} repeated"));
        }
        rest = &after[end + 1..];
    }
}

/// A strict enough check of the text exposition format 0.0.4: comment lines, sample syntax,
/// one TYPE per family before its samples, histogram buckets cumulative and ending in +Inf
/// equal to `_count`.
fn parse_exposition(text: &str) -> Result<Vec<Sample>, String> {
    let mut types: HashMap<String, String> = HashMap::new();
    let mut samples = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let fail = |reason: String| format!("line {}: {reason}: {line:?}", number + 1);
        if line.trim().is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let mut words = comment.split_whitespace();
            match words.next() {
                Some("TYPE") => {
                    let name = words
                        .next()
                        .ok_or_else(|| fail("TYPE without name".into()))?;
                    let kind = words
                        .next()
                        .ok_or_else(|| fail("TYPE without type".into()))?;
                    if !valid_name(name) {
                        return Err(fail("bad name".into()));
                    }
                    if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                        return Err(fail(format!("bad type {kind}")));
                    }
                    if types.insert(name.to_string(), kind.to_string()).is_some() {
                        return Err(fail("second TYPE".into()));
                    }
                }
                Some("HELP") => {
                    let name = words
                        .next()
                        .ok_or_else(|| fail("HELP without name".into()))?;
                    if !valid_name(name) {
                        return Err(fail("bad name".into()));
                    }
                }
                _ => {}
            }
            continue;
        }
        let name_end = line
            .find(['{', ' '])
            .ok_or_else(|| fail("no value".into()))?;
        let name = &line[..name_end];
        if !valid_name(name) {
            return Err(fail("bad metric name".into()));
        }
        let (labels, rest) = parse_labels(&line[name_end..]).map_err(fail)?;
        let mut fields = rest.split_whitespace();
        let value =
            parse_value(fields.next().ok_or_else(|| fail("no value".into()))?).map_err(fail)?;
        if let Some(timestamp) = fields.next() {
            timestamp
                .parse::<i64>()
                .map_err(|_| fail("bad timestamp".into()))?;
        }
        if fields.next().is_some() {
            return Err(fail("trailing fields".into()));
        }
        samples.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    // Histograms: per series, buckets are cumulative and the +Inf bucket equals _count.
    for (family, kind) in &types {
        if kind != "histogram" {
            continue;
        }
        let mut series: HashMap<String, Vec<(f64, f64)>> = HashMap::new();
        let mut counts: HashMap<String, f64> = HashMap::new();
        let key = |labels: &HashMap<String, String>| {
            let mut pairs: Vec<_> = labels.iter().filter(|(k, _)| *k != "le").collect();
            pairs.sort();
            format!("{pairs:?}")
        };
        for sample in &samples {
            if sample.name == format!("{family}_bucket") {
                let le = parse_value(sample.labels.get("le").ok_or("bucket without le")?)?;
                series
                    .entry(key(&sample.labels))
                    .or_default()
                    .push((le, sample.value));
            } else if sample.name == format!("{family}_count") {
                counts.insert(key(&sample.labels), sample.value);
            }
        }
        for (labels, buckets) in series {
            for pair in buckets.windows(2) {
                if pair[0].0 >= pair[1].0 || pair[0].1 > pair[1].1 {
                    return Err(format!("{family}{labels}: buckets not cumulative"));
                }
            }
            let last = buckets.last().ok_or("empty histogram")?;
            if last.0 != f64::INFINITY || Some(&last.1) != counts.get(&labels) {
                return Err(format!("{family}{labels}: +Inf bucket must equal _count"));
            }
        }
    }
    Ok(samples)
}

/// The value of the sample `name` whose labels include `labels` (0 if absent).
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|sample| sample.name == name)
        .filter(|sample| {
            labels
                .iter()
                .all(|(k, v)| sample.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|sample| sample.value)
        .sum()
}

fn scrape(server: &Server) -> Vec<Sample> {
    let (status, body) = http_get(&server.metrics_addr, "/metrics").expect("metrics listener");
    assert_eq!(status, 200, "{body}");
    parse_exposition(&body).unwrap_or_else(|error| panic!("{error}\n{body}"))
}

#[test]
fn the_exposition_parser_rejects_malformed_text() {
    assert!(parse_exposition("# TYPE a counter\na_total 1\n").is_ok());
    for bad in [
        "a b c d\n",
        "1a 2\n",
        "a{b=\"x} 1\n",
        "a{b=\"x\"} one\n",
        "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_count 1\n",
    ] {
        assert!(parse_exposition(bad).is_err(), "{bad}");
    }
}

#[test]
fn metrics_are_valid_prometheus_text_and_counters_move_after_real_calls() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), None);
    let before = scrape(&server);
    let sequence = [("service", "imstate.v1.Sequence"), ("method", "NextBatch")];
    assert_eq!(
        value(&before, "imstate_grpc_requests_total", &sequence),
        0.0
    );

    assert!(server.cli(&["seq", "next", "1", "2", "3"]).status.success());
    assert!(server.cli(&["seq", "next", "1"]).status.success());
    assert!(
        !server
            .cli(&["seq", "next", "--ns", "nope", "1"])
            .status
            .success()
    );
    let login = [
        "presence",
        "login",
        "--uid",
        "7",
        "--device",
        "phone",
        "--gateway",
        "gw1",
    ];
    let output = server.cli(&[&login[..], &["--conn", "1"]].concat());
    assert!(output.status.success(), "{output:?}");

    let after = scrape(&server);
    let ok = [&sequence[..], &[("code", "OK")]].concat();
    assert_eq!(value(&after, "imstate_grpc_requests_total", &ok), 2.0);
    let not_found = [&sequence[..], &[("code", "NOT_FOUND")]].concat();
    assert_eq!(
        value(&after, "imstate_grpc_requests_total", &not_found),
        1.0
    );
    assert_eq!(
        value(&after, "imstate_grpc_request_duration_seconds_count", &ok),
        2.0
    );
    assert_eq!(value(&after, "imstate_seq_allocated_total", &[]), 4.0);
    assert!(value(&after, "imstate_seq_raises_total", &[]) >= 1.0);
    assert!(value(&after, "imstate_seq_sections_loaded", &[]) >= 1.0);
    assert_eq!(value(&after, "imstate_presence_logins_total", &[]), 1.0);
    assert_eq!(value(&after, "imstate_presence_sessions_online", &[]), 1.0);
    let seq_log = [("log", "seq")];
    assert!(
        value(&after, "imstate_log_appends_total", &seq_log)
            > value(&before, "imstate_log_appends_total", &seq_log)
    );
    assert!(value(&after, "imstate_log_fsync_duration_seconds_count", &seq_log) >= 1.0);
    assert!(value(&after, "imstate_log_written_bytes_total", &seq_log) > 0.0);
    assert!(value(&after, "imstate_process_resident_memory_bytes", &[]) > 1e6);
    assert!(value(&after, "imstate_process_open_fds", &[]) >= 3.0);
    assert_eq!(value(&after, "imstate_ready", &[]), 1.0);
    for sample in &after {
        assert!(sample.name.starts_with("imstate_"), "{}", sample.name);
    }
    assert_eq!(http_get(&server.metrics_addr, "/healthz").unwrap().0, 200);
}

/// Writes a sequence log of about `mib` MiB through the real log engine (as the
/// `gen_seq_log` example does): the default namespace, then raises over 1,000 sections.
fn write_large_seq_log(data_dir: &std::path::Path, mib: u64) {
    let seq_dir = data_dir.join("seq");
    std::fs::create_dir_all(&seq_dir).unwrap();
    let options = LogOptions {
        fsync: FsyncPolicy::Never,
        ..LogOptions::default()
    };
    let (log, _) = Log::open(FileStorage::new(&seq_dir).unwrap(), options, |_| Ok(())).unwrap();
    let default = NamespaceDef::default_namespace();
    log.append(SeqRecord::NamespaceCreated(default.clone()).encode())
        .unwrap();
    let sections = 1_000;
    let mut records = 0u64;
    while log.stats().bytes_written < mib * 1024 * 1024 {
        for _ in 0..100_000 {
            let raise = Raise {
                ns: 0,
                section: records % sections,
                max_seq: default.step * (1 + records / sections),
            };
            log.append(SeqRecord::Raise(raise).encode()).unwrap();
            records += 1;
        }
        log.wait_durable(log.last_lsn()).unwrap();
    }
    log.shutdown().unwrap();
}

#[test]
fn readyz_is_503_while_a_large_log_recovers_and_200_after() {
    let dir = tempfile::tempdir().unwrap();
    write_large_seq_log(dir.path(), 160);
    let mut server = Server::new(dir.path(), None, &[], &[]);
    let started = Instant::now();
    let stdout = server.spawn();
    // The listening line arrives only after recovery; read it on a thread.
    let (listening_tx, listening_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = listening_tx.send(line);
    });
    let deadline = started + Duration::from_secs(60);
    let mut saw_not_ready = None;
    let listening = loop {
        assert!(Instant::now() < deadline, "the node never became ready");
        if let Ok(line) = listening_rx.try_recv() {
            break line;
        }
        match http_get(&server.metrics_addr, "/readyz") {
            Some((503, body)) => {
                saw_not_ready.get_or_insert(body);
                assert_eq!(http_get(&server.metrics_addr, "/healthz").unwrap().0, 200);
            }
            Some((200, _)) => {}
            Some(other) => panic!("unexpected /readyz answer {other:?}"),
            None => {}
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    assert!(
        listening.starts_with("imstate listening on"),
        "{listening:?}"
    );
    let body = saw_not_ready.expect("/readyz answered 503 during recovery");
    assert!(body.contains("recovering"), "{body}");
    assert_eq!(http_get(&server.metrics_addr, "/readyz").unwrap().0, 200);
    let samples = scrape(&server);
    assert!(
        value(
            &samples,
            "imstate_recovery_duration_seconds",
            &[("log", "seq")]
        ) > 0.0
    );
    assert!(
        value(
            &samples,
            "imstate_recovery_replayed_bytes",
            &[("log", "seq")]
        ) > 100e6,
        "the whole log was replayed"
    );
    eprintln!("recovery to ready took {:?}", started.elapsed());
}

#[test]
fn ctl_status_checkpoint_and_namespaces_talk_to_a_running_node() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), None);
    assert!(server.cli(&["seq", "next", "5"]).status.success());
    let output = server.cli(&["ctl", "status"]);
    assert!(output.status.success(), "{output:?}");
    let status = stdout(&output);
    for expected in [
        "version: ",
        "uptime_s: ",
        "role: embedded",
        "route_version: 1",
        "namespaces: default",
        "sessions_online: 0",
        "log.seq: last_lsn=",
        "checkpoint_lsn=none",
        "log.presence: ",
    ] {
        assert!(status.contains(expected), "{expected}: {status}");
    }

    let output = server.cli(&["ctl", "checkpoint"]);
    assert!(output.status.success(), "{output:?}");
    let checkpoint = stdout(&output);
    assert!(checkpoint.contains("seq: covered_lsn="), "{checkpoint}");
    assert!(
        checkpoint.contains("presence: covered_lsn="),
        "{checkpoint}"
    );
    let status = stdout(&server.cli(&["ctl", "status"]));
    assert!(
        !status.contains("log.seq: last_lsn=2 durable_lsn=2 synced_lsn=2 checkpoint_lsn=none")
    );
    assert!(status.contains("checkpoint_lsn=2 "), "{status}");

    let output = server.cli(&["ctl", "namespaces"]);
    assert!(
        stdout(&output).starts_with("default\tids=[0, 4294967296)"),
        "{output:?}"
    );
    let samples = scrape(&server);
    assert_eq!(
        value(
            &samples,
            "imstate_checkpoints_total",
            &[("log", "seq"), ("outcome", "ok")]
        ),
        1.0
    );
}

#[test]
fn grpc_health_reports_serving() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), None);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", server.addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = HealthClient::new(channel);
        for service in [
            "",
            "imstate.v1.Sequence",
            "imstate.v1.Presence",
            "imstate.v1.Admin",
        ] {
            let reply = client
                .check(HealthCheckRequest {
                    service: service.into(),
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(reply.status, 1, "{service} is SERVING");
        }
    });
}
