//! The wire-protocol abuse suite against the real binary (issue 11): oversized and slow
//! clients, idle floods, one host taking every connection, replies larger than a frame, and
//! random bytes. After each, a normal client is served and the node's RSS stays under a stated
//! bound. Every loop here is bounded in count and time and talks only to loopback.
//!
//! Figures (RSS before, during and after each case) are printed; run with `--no-capture`.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use imstate_client::{LoginArgs, WireClient};
use imstate_wire::codec::{self, Frame};
use imstate_wire::{Code, Op};
use rand::{Rng, SeedableRng};
use support::{Server, runtime, wire_error_of};

/// Resident set size of a process, in MiB.
fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|line| line.starts_with("VmRSS:"))
        .unwrap();
    let kib: f64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib / 1024.0
}

/// A TCP connection to `to` from the loopback address `from` (the node counts connections per
/// source address, and all of 127.0.0.0/8 is loopback).
fn connect_from(from: &str, to: &str) -> std::io::Result<TcpStream> {
    let socket = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    assert!(socket >= 0);
    // SAFETY: `socket` is a fresh descriptor owned by the TcpStream from here on.
    let stream = unsafe {
        use std::os::fd::FromRawFd;
        TcpStream::from_raw_fd(socket)
    };
    let from: std::net::Ipv4Addr = from.parse().unwrap();
    let address = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(from).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: a valid sockaddr_in of the right length.
    let bound = unsafe {
        libc::bind(
            socket,
            (&address as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if bound != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let to: SocketAddr = to.parse().unwrap();
    let SocketAddr::V4(to) = to else {
        panic!("IPv4 only")
    };
    let address = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: to.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*to.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: as above.
    let connected = unsafe {
        libc::connect(
            socket,
            (&address as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if connected != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(stream)
}

fn hello_bytes(token: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::new();
    codec::hello(&mut bytes, token).unwrap();
    bytes
}

/// Reads frames until the node closes the connection or `limit` passes.
fn read_frames(stream: &mut TcpStream, limit: Duration) -> (Vec<(u8, Vec<u8>)>, bool) {
    let deadline = Instant::now() + limit;
    let mut received = Vec::new();
    let mut closed = false;
    let mut chunk = [0u8; 64 * 1024];
    while Instant::now() < deadline {
        stream
            .set_read_timeout(Some(
                deadline
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1)),
            ))
            .unwrap();
        match stream.read(&mut chunk) {
            Ok(0) => {
                closed = true;
                break;
            }
            Ok(read) => received.extend_from_slice(&chunk[..read]),
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                break;
            }
            Err(_) => {
                closed = true;
                break;
            }
        }
    }
    let mut frames = Vec::new();
    let mut at = 0;
    while let Ok(Some((frame, used))) = Frame::split(&received[at..]) {
        frames.push((frame.op, frame.body.to_vec()));
        at += used;
    }
    (frames, closed)
}

/// A normal client still gets served.
fn served(server: &Server, token: &str) {
    runtime().block_on(async {
        let client = WireClient::connect(&server.wire_addr, token).await.unwrap();
        assert!(client.next("", 1).await.unwrap() > 0);
    });
}

/// Sends a frame header declaring `declared` bytes and then `payload` bytes of it, ignoring
/// write errors (the node may close first).
fn send_partial_frame(stream: &mut TcpStream, prefix: &[u8], declared: usize, payload: usize) {
    stream
        .set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let _ = stream.write_all(prefix);
    let _ = stream.write_all(&(declared as u32).to_le_bytes());
    let chunk = vec![0x42u8; 256 * 1024];
    let mut sent = 0;
    while sent < payload {
        let len = chunk.len().min(payload - sent);
        if stream.write_all(&chunk[..len]).is_err() {
            return;
        }
        sent += len;
    }
}

/// 60 unauthenticated connections each announce a frame of 8 MiB - 1 and send it: before
/// Hello the node takes at most HELLO_FRAME_BYTES_MAX, so each is refused at its first read
/// and RSS barely moves (it grew by about 500 MB before the fix).
#[test]
fn unauthenticated_clients_cannot_make_the_node_buffer_large_frames() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "s3cret\n").unwrap();
    let server = Server::start_with(
        &dir.path().join("data"),
        None,
        &[],
        &[("IMSTATE_AUTH__TOKEN_FILE", tokens.to_str().unwrap())],
    );
    let pid = server.pid().unwrap();
    let before = rss_mib(pid);
    let threads: Vec<_> = (0..60)
        .map(|_| {
            let address = server.wire_addr.clone();
            std::thread::spawn(move || {
                let mut stream = TcpStream::connect(&address).unwrap();
                send_partial_frame(
                    &mut stream,
                    &[],
                    imstate_wire::FRAME_BYTES_MAX - 1,
                    imstate_wire::FRAME_BYTES_MAX - 1,
                );
                let (frames, _) = read_frames(&mut stream, Duration::from_secs(10));
                (stream, frames)
            })
        })
        .collect();
    let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let during = rss_mib(pid);
    for (_, frames) in &results {
        // The refusal may be lost when the node closes on unread bytes (a TCP reset); if it
        // arrives, it names the limit.
        if let Some(frame) = frames.first() {
            let (code, message) = wire_error_of(frame);
            assert_eq!(code, Code::RESOURCE_EXHAUSTED, "{message}");
            assert!(message.contains("HELLO_FRAME_BYTES_MAX"), "{message}");
        }
    }
    drop(results);
    std::thread::sleep(Duration::from_millis(200));
    let after = rss_mib(pid);
    println!(
        "60 unauthenticated 8 MiB frames: RSS {before:.1} MiB before, {during:.1} MiB with the \
         connections open, {after:.1} MiB after they closed"
    );
    assert!(
        during - before < 32.0,
        "RSS grew by {:.1} MiB",
        during - before
    );
    served(&server, "s3cret");
}

/// Authenticated clients may send frames up to FRAME_BYTES_MAX, but all connections together
/// buffer at most `wire.input_budget_bytes`: the rest are refused with a message naming the
/// budget, and the memory goes back when the frames are done.
#[test]
fn large_frames_of_many_clients_stay_within_the_input_budget() {
    let dir = tempfile::tempdir().unwrap();
    let budget = 2 * (imstate_wire::FRAME_BYTES_MAX + 4);
    let server = Server::start_with(
        dir.path(),
        None,
        &[],
        &[("IMSTATE_WIRE__INPUT_BUDGET_BYTES", &budget.to_string())],
    );
    let pid = server.pid().unwrap();
    let before = rss_mib(pid);
    let threads: Vec<_> = (0..30)
        .map(|_| {
            let address = server.wire_addr.clone();
            std::thread::spawn(move || {
                let mut stream = TcpStream::connect(&address).unwrap();
                // Most of a frame, never its end: the node must hold it or refuse it.
                send_partial_frame(
                    &mut stream,
                    &hello_bytes(b""),
                    imstate_wire::FRAME_BYTES_MAX - 1,
                    imstate_wire::FRAME_BYTES_MAX / 2,
                );
                let (frames, closed) = read_frames(&mut stream, Duration::from_secs(2));
                (stream, frames, closed)
            })
        })
        .collect();
    let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let during = rss_mib(pid);
    let refused = results
        .iter()
        .filter(|(_, frames, _)| {
            frames.get(1).is_some_and(|frame| {
                let (code, message) = wire_error_of(frame);
                code == Code::RESOURCE_EXHAUSTED && message.contains("wire.input_budget_bytes")
            })
        })
        .count();
    drop(results);
    std::thread::sleep(Duration::from_millis(300));
    let after = rss_mib(pid);
    println!(
        "30 authenticated half-sent 8 MiB frames, budget {budget} B: {refused} refused; RSS \
         {before:.1} MiB before, {during:.1} MiB during, {after:.1} MiB after"
    );
    assert!(
        refused >= 28,
        "only {refused} of 30 refused with a budget of two frames"
    );
    assert!(
        during - before < 48.0,
        "RSS grew by {:.1} MiB",
        during - before
    );
    assert!(
        after - before < 24.0,
        "RSS stayed {:.1} MiB up",
        after - before
    );
    served(&server, "");
}

/// A client that never says Hello, one that goes silent after it, and one that sends a frame
/// a byte at a time are each closed with DEADLINE_EXCEEDED naming the setting.
#[test]
fn slow_and_silent_clients_are_closed_by_deadlines() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(
        dir.path(),
        None,
        &[],
        &[
            ("IMSTATE_WIRE__HELLO_TIMEOUT_MS", "300"),
            ("IMSTATE_WIRE__IDLE_TIMEOUT_MS", "600"),
        ],
    );
    let mut silent = TcpStream::connect(&server.wire_addr).unwrap();
    let (frames, closed) = read_frames(&mut silent, Duration::from_secs(10));
    assert!(closed, "a client without Hello was not closed");
    let (code, message) = wire_error_of(&frames[0]);
    assert_eq!(code, Code::DEADLINE_EXCEEDED);
    assert!(message.contains("wire.hello_timeout_ms"), "{message}");

    let mut idle = TcpStream::connect(&server.wire_addr).unwrap();
    idle.write_all(&hello_bytes(b"")).unwrap();
    let (frames, closed) = read_frames(&mut idle, Duration::from_secs(10));
    assert!(closed, "an idle client was not closed");
    assert_eq!(frames[0].0, Op::Hello.reply());
    let (code, message) = wire_error_of(&frames[1]);
    assert_eq!(code, Code::DEADLINE_EXCEEDED);
    assert!(message.contains("wire.idle_timeout_ms"), "{message}");

    // A byte every 100 ms: the connection is busy, but it never completes a frame.
    let mut slow = TcpStream::connect(&server.wire_addr).unwrap();
    slow.write_all(&hello_bytes(b"")).unwrap();
    let mut frame = Vec::new();
    codec::next(&mut frame, "", 1).unwrap();
    frame.extend(std::iter::repeat_n(0u8, 64));
    let started = Instant::now();
    let mut cut = false;
    for byte in &frame[..4] {
        let _ = slow.write_all(&[*byte]);
    }
    // Declare a frame longer than what follows, then trickle.
    for _ in 0..50 {
        if slow.write_all(&[0]).is_err() {
            cut = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let (frames, closed) = read_frames(&mut slow, Duration::from_secs(5));
    assert!(cut || closed, "a trickling client was not closed");
    assert!(started.elapsed() < Duration::from_secs(10));
    if let Some(frame) = frames.get(1) {
        assert_eq!(wire_error_of(frame).0, Code::DEADLINE_EXCEEDED);
    }
    served(&server, "");
}

/// One host opening connections until the limit cannot lock out the others: past
/// `wire.connections_per_source_max` its connections are refused with a message naming the
/// setting, and a client from another address is served. A flood of silent connections is
/// closed by the Hello deadline.
#[test]
fn one_source_cannot_take_every_connection() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(
        dir.path(),
        None,
        &[],
        &[
            ("IMSTATE_WIRE__CONNECTIONS_PER_SOURCE_MAX", "20"),
            ("IMSTATE_WIRE__HELLO_TIMEOUT_MS", "1000"),
        ],
    );
    let pid = server.pid().unwrap();
    let before = rss_mib(pid);
    // 500 silent connections from 127.0.0.3.
    let mut flood = Vec::new();
    for _ in 0..500 {
        flood.push(connect_from("127.0.0.3", &server.wire_addr).unwrap());
    }
    // Another source is served while the flood is open.
    let mut other = connect_from("127.0.0.2", &server.wire_addr).unwrap();
    let mut bytes = hello_bytes(b"");
    codec::next(&mut bytes, "", 5).unwrap();
    other.write_all(&bytes).unwrap();
    let (frames, _) = read_frames(&mut other, Duration::from_millis(500));
    assert_eq!(
        frames.len(),
        2,
        "a client from another address was not served"
    );
    assert_eq!(frames[1].0, Op::Next.reply());
    // Each flood connection ends: refused at once past the limit, or (the admitted ones, in
    // whatever order the node accepted them) at the Hello deadline.
    let (mut refused, mut timed_out) = (0, 0);
    for stream in &mut flood {
        let (frames, closed) = read_frames(stream, Duration::from_secs(5));
        assert!(closed, "a flood connection outlived wire.hello_timeout_ms");
        let (code, message) = wire_error_of(frames.first().expect("a reason before closing"));
        match code {
            Code::RESOURCE_EXHAUSTED => {
                assert!(
                    message.contains("wire.connections_per_source_max is 20"),
                    "{message}"
                );
                refused += 1;
            }
            Code::DEADLINE_EXCEEDED => timed_out += 1,
            other => panic!("unexpected {other:?}: {message}"),
        }
    }
    // At most 20 at a time: once admitted ones are closed by the deadline, later ones of the
    // flood that the node had not accepted yet may be admitted in their place.
    assert_eq!(refused + timed_out, 500);
    assert!(
        refused >= 400 && timed_out >= 20,
        "{refused} refused, {timed_out} admitted"
    );
    let during = rss_mib(pid);
    drop(flood);
    let mut again = connect_from("127.0.0.3", &server.wire_addr).unwrap();
    let mut bytes = hello_bytes(b"");
    codec::next(&mut bytes, "", 5).unwrap();
    again.write_all(&bytes).unwrap();
    let (frames, _) = read_frames(&mut again, Duration::from_millis(500));
    assert_eq!(
        frames.len(),
        2,
        "the source was not admitted again after its flood closed"
    );
    println!(
        "500-connection flood from one source: RSS {before:.1} MiB before, {during:.1} MiB after"
    );
    assert!(during - before < 32.0);
    served(&server, "");
}

/// A LookupBatch whose reply would exceed FRAME_BYTES_MAX is refused with RESOURCE_EXHAUSTED
/// before it is built, and the connection goes on (it used to fail the whole connection on
/// the client side).
#[test]
fn a_lookup_reply_larger_than_a_frame_is_refused_and_the_connection_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), None);
    runtime().block_on(async {
        let client = WireClient::connect(&server.wire_addr, "").await.unwrap();
        // 2,000 uids x 16 sessions x about 300 bytes is about 9.6 MB of reply.
        let uids: Vec<u64> = (1..=2_000).collect();
        let mut calls = Vec::new();
        for &uid in &uids {
            for device in 0..16u64 {
                let args = LoginArgs {
                    uid,
                    device: format!("device-{device}"),
                    gateway: "gateway-with-a-long-name-for-the-reply".into(),
                    conn: device,
                    ttl_ms: 3_600_000,
                    meta: vec![b'm'; 200],
                };
                calls.push(args);
            }
        }
        for chunk in calls.chunks(512) {
            let logins = chunk.iter().map(|args| client.login(args));
            for result in futures::future::join_all(logins).await {
                result.unwrap();
            }
        }
        let error = client.lookup_batch(&uids).await.unwrap_err();
        assert_eq!(
            error.code(),
            Some(tonic::Code::ResourceExhausted),
            "{error}"
        );
        assert!(error.to_string().contains("FRAME_BYTES_MAX"), "{error}");
        let found = client.lookup_batch(&uids[..100]).await.unwrap();
        assert_eq!(found[0].len(), 16, "the same connection goes on");

        // gRPC carries the same reply (about 10 MB): its reply limit is GRPC_REPLY_BYTES_MAX
        // on both sides (tonic's client refused anything over 4 MiB).
        let grpc = imstate_client::Client::connect(&server.addr).await.unwrap();
        let found = grpc.lookup_batch(uids.clone()).await.unwrap();
        assert!(found.iter().all(|sessions| sessions.len() == 16));
        // A request over GRPC_REQUEST_BYTES_MAX (4 MiB) is refused, and the client goes on.
        let huge: Vec<u64> = (0..600_000).map(|id| (1 << 62) + id).collect();
        let error = grpc.next_batch("", huge).await.unwrap_err();
        assert!(
            error.to_string().contains("message length too large"),
            "{error}"
        );
        assert!(grpc.next_batch("", vec![1]).await.is_ok());
    });
}

/// Random bytes, with and without a Hello first, in random chunk sizes: the node answers with
/// errors or closes, never crashes, and serves a normal client after every round. Seeded: a
/// failure prints the seed; `IMSTATE_ABUSE_SEED=S IMSTATE_ABUSE_ROUNDS=N` replays or extends.
#[test]
fn random_bytes_never_take_the_node_down() {
    let seed: u64 = std::env::var("IMSTATE_ABUSE_SEED")
        .ok()
        .and_then(|seed| seed.parse().ok())
        .unwrap_or_else(rand::random);
    let rounds: usize = std::env::var("IMSTATE_ABUSE_ROUNDS")
        .ok()
        .and_then(|rounds| rounds.parse().ok())
        .unwrap_or(150);
    println!(
        "random_bytes seed {seed}: replay with IMSTATE_ABUSE_SEED={seed} cargo nextest run -p \
         imstate --test abuse random_bytes"
    );
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(
        dir.path(),
        None,
        &[],
        &[("IMSTATE_WIRE__IDLE_TIMEOUT_MS", "2000")],
    );
    let pid = server.pid().unwrap();
    let before = rss_mib(pid);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for round in 0..rounds {
        let mut bytes = Vec::new();
        if rng.gen_bool(0.7) {
            bytes.extend(hello_bytes(b""));
        }
        // Mostly well-framed garbage (a valid length, a random op and body), sometimes raw.
        for _ in 0..rng.gen_range(1..6) {
            if rng.gen_bool(0.8) {
                let body_len = rng.gen_range(0..300);
                let start = codec::begin(&mut bytes, rng.r#gen());
                bytes.extend((0..body_len).map(|_| rng.r#gen::<u8>()));
                codec::end(&mut bytes, start);
            } else {
                bytes.extend((0..rng.gen_range(1..64)).map(|_| rng.r#gen::<u8>()));
            }
        }
        let mut stream = TcpStream::connect(&server.wire_addr).unwrap();
        let mut at = 0;
        while at < bytes.len() {
            let len = rng.gen_range(1..=bytes.len() - at);
            if stream.write_all(&bytes[at..at + len]).is_err() {
                break;
            }
            at += len;
        }
        let _ = stream.shutdown(std::net::Shutdown::Write);
        let (frames, _) = read_frames(&mut stream, Duration::from_secs(3));
        for frame in &frames {
            assert!(
                frame.0 == imstate_wire::REPLY_ERROR || frame.0 & imstate_wire::REPLY_OK_BIT != 0,
                "seed {seed} round {round}: not a reply: {frame:?}"
            );
        }
        if round % 25 == 0 {
            served(&server, "");
        }
    }
    served(&server, "");
    let after = rss_mib(pid);
    println!("{rounds} random rounds: RSS {before:.1} MiB before, {after:.1} MiB after");
    assert!(
        after - before < 32.0,
        "seed {seed}: RSS grew by {:.1} MiB",
        after - before
    );
}

/// The TLS wire port under garbage: 100 unauthenticated connections each declare a full
/// 16 KiB TLS record, send half of it and hold on. rustls buffers at most one record per
/// connection before the handshake, the Hello deadline (1 s here) closes them all, and a TLS
/// client is served throughout; plain random bytes are refused at once.
#[test]
fn garbage_on_the_tls_wire_port_is_bounded_and_closed() {
    let dir = tempfile::tempdir().unwrap();
    let pki = support::make_pki(dir.path(), "abuse");
    let config = support::write(
        dir.path(),
        "imstate.toml",
        &format!(
            "[tls]\ncert_file = {:?}\nkey_file = {:?}\n[wire]\nhello_timeout_ms = 1000\n",
            pki.server_cert, pki.server_key
        ),
    );
    let server = Server::start(&dir.path().join("data"), Some(&config));
    let pid = server.pid().unwrap();
    let options =
        imstate_client::ClientOptions::from_files(Some(&pki.ca), None, None, None).unwrap();
    let tls_served = || {
        runtime().block_on(async {
            let client = WireClient::connect_with(&server.wire_addr, &options)
                .await
                .expect("a TLS client is served");
            client.next("default", 1).await.unwrap();
        })
    };
    tls_served();
    let before = rss_mib(pid);
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut held = Vec::new();
    for _ in 0..100 {
        let mut stream = TcpStream::connect(&server.wire_addr).unwrap();
        // A handshake record header declaring 16,384 bytes, then half of them at random.
        let mut bytes = vec![0x16, 0x03, 0x01, 0x40, 0x00];
        bytes.extend((0..8_192).map(|_| rng.r#gen::<u8>()));
        let _ = stream.write_all(&bytes);
        held.push(stream);
    }
    std::thread::sleep(Duration::from_millis(300));
    let during = rss_mib(pid);
    tls_served();
    // Raw random bytes (not a TLS record) are refused at once, well before the deadline.
    for _ in 0..20 {
        let mut stream = TcpStream::connect(&server.wire_addr).unwrap();
        let bytes: Vec<u8> = (0..512).map(|_| rng.r#gen::<u8>() | 0x80).collect();
        let _ = stream.write_all(&bytes);
        // The node answers with a TLS alert, never a frame, and closes.
        let (_, closed) = read_frames(&mut stream, Duration::from_millis(900));
        assert!(closed, "garbage must be closed at once");
    }
    // The Hello deadline closes every held connection.
    for stream in &mut held {
        let (_, closed) = read_frames(stream, Duration::from_secs(5));
        assert!(
            closed,
            "the Hello deadline must close a held TLS connection"
        );
    }
    drop(held);
    std::thread::sleep(Duration::from_millis(200));
    tls_served();
    let after = rss_mib(pid);
    println!(
        "100 held half TLS records: RSS {before:.1} MiB before, {during:.1} MiB during, \
         {after:.1} MiB after"
    );
    assert!(
        during - before < 32.0,
        "RSS grew by {:.1} MiB",
        during - before
    );
    assert!(after - before < 16.0, "RSS kept {:.1} MiB", after - before);
}

/// The gRPC port under abuse: a header list over `GRPC_HEADER_LIST_BYTES_MAX` (a 32 KiB
/// bearer token), raw random bytes instead of HTTP/2, and a connection that sends the HTTP/2
/// preface and then nothing. Each fails alone; the node's RSS stays flat and it serves.
#[test]
fn grpc_abuse_fails_alone_and_the_node_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), None);
    let pid = server.pid().unwrap();
    let before = rss_mib(pid);
    runtime().block_on(async {
        let options = imstate_client::ClientOptions {
            token: Some("t".repeat(32 * 1024)),
            ..Default::default()
        };
        let client = imstate_client::Client::connect_with(&server.addr, &options)
            .await
            .unwrap();
        assert!(
            client.next_batch("", vec![1]).await.is_err(),
            "a 32 KiB header list must be refused"
        );
    });
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for _ in 0..50 {
        let mut stream = TcpStream::connect(&server.addr).unwrap();
        let bytes: Vec<u8> = (0..rng.gen_range(1..4096)).map(|_| rng.r#gen()).collect();
        let _ = stream.write_all(&bytes);
        let (_, closed) = read_frames(&mut stream, Duration::from_secs(3));
        assert!(closed, "random bytes on the gRPC port must be closed");
    }
    let mut silent = Vec::new();
    for _ in 0..50 {
        let mut stream = TcpStream::connect(&server.addr).unwrap();
        stream
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .unwrap();
        silent.push(stream);
    }
    runtime().block_on(async {
        let client = imstate_client::Client::connect(&server.addr).await.unwrap();
        assert_eq!(client.next_batch("", vec![1]).await.unwrap(), vec![1]);
    });
    drop(silent);
    let after = rss_mib(pid);
    println!("gRPC abuse: RSS {before:.1} MiB before, {after:.1} MiB after");
    assert!(
        after - before < 16.0,
        "RSS grew by {:.1} MiB",
        after - before
    );
}
