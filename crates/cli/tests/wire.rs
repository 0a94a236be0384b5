//! The wire protocol through the real binary: every operation, its errors, the Hello and token
//! rules, and what a client that breaks the protocol gets (an error, then a closed connection,
//! while everyone else is served). The bytes themselves are tested in `imstate-wire`.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use imstate_client::{ClientError, WireClient};
use imstate_wire::codec::{self, Frame};
use imstate_wire::{Code, Op};
use support::{Server, login_args, runtime, wire_error_of};

fn code(error: &ClientError) -> Option<tonic::Code> {
    error.code()
}

/// Writes raw bytes to the wire port and reads until the node closes; returns the frames.
fn raw_exchange(address: &str, bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut stream = TcpStream::connect(address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(bytes).unwrap();
    let mut received = Vec::new();
    stream
        .read_to_end(&mut received)
        .expect("the node closes the connection");
    let mut frames = Vec::new();
    let mut at = 0;
    while let Some((frame, used)) = Frame::split(&received[at..]).unwrap() {
        frames.push((frame.op, frame.body.to_vec()));
        at += used;
    }
    assert_eq!(at, received.len(), "only whole frames");
    frames
}

#[test]
fn every_operation_works_over_the_wire_and_errors_carry_grpc_codes() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), None);
    runtime().block_on(async {
        let client = WireClient::connect(&server.wire_addr, "").await.unwrap();
        assert_eq!(client.route_version(), 1);

        // Sequences: strictly increasing per id, a batch in order, shared with gRPC.
        let first = client.next("", 7).await.unwrap();
        let second = client.next("default", 7).await.unwrap();
        assert!(second > first);
        let batch = client.next_batch("", &[7, 8, 7]).await.unwrap();
        assert!(batch[0] > second && batch[2] > batch[0], "{batch:?}");
        let grpc = imstate_client::Client::connect(&server.addr).await.unwrap();
        let after_batch = grpc.next("default", 7).await.unwrap();
        assert!(after_batch > batch[2]);

        // Range allocation, over the wire and over gRPC: consecutive, never overlapping.
        let ranges = client.next_range_batch("", &[7, 9, 7], 4).await.unwrap();
        assert_eq!(ranges[0].first, after_batch + 1);
        assert_eq!(ranges[0].last, after_batch + 4);
        assert_eq!((ranges[1].first, ranges[1].last), (1, 4));
        assert_eq!(ranges[2].first, ranges[0].last + 1);
        let range = grpc.next_range("", 7, 3).await.unwrap();
        assert_eq!(
            (range.first, range.last),
            (ranges[2].last + 1, ranges[2].last + 3)
        );
        for count in [0, imstate_seq::RANGE_COUNT_MAX + 1] {
            let error = client.next_range_batch("", &[7], count).await.unwrap_err();
            assert_eq!(code(&error), Some(tonic::Code::InvalidArgument), "{error}");
            assert!(error.to_string().contains("RANGE_COUNT_MAX"), "{error}");
            let error = grpc.next_range("", 7, count).await.unwrap_err();
            assert_eq!(code(&error), Some(tonic::Code::InvalidArgument), "{error}");
        }
        // Nothing was allocated by the refused ranges, and the connection is still usable.
        assert_eq!(client.next("", 7).await.unwrap(), range.last + 1);

        // String keys of a keyed namespace (NextKeys), shared with gRPC.
        grpc.create_namespace(imstate_client::Namespace {
            name: "conv".into(),
            id_lo: 0,
            id_hi: 1024,
            section_size: 64,
            step: 100,
            keys: "string".into(),
        })
        .await
        .unwrap();
        let keys = vec![b"si_1_2".to_vec(), b"sg_9".to_vec(), b"si_1_2".to_vec()];
        let ranges = client.next_keys("conv", &keys, 1).await.unwrap();
        let lasts: Vec<u64> = ranges.iter().map(|range| range.last).collect();
        assert_eq!(lasts, [1, 1, 2]);
        let ranges = client.next_keys("conv", &keys[..1], 5).await.unwrap();
        assert_eq!((ranges[0].first, ranges[0].last), (3, 7));
        let grpc_ranges = grpc.next_keys("conv", keys[..1].to_vec(), 1).await.unwrap();
        assert_eq!(grpc_ranges[0].last, 8);
        // Bad keys and the wrong kind: clear errors, nothing allocated.
        for bad in [vec![Vec::new()], vec![vec![b'k'; 129]]] {
            let error = client.next_keys("conv", &bad, 1).await.unwrap_err();
            assert_eq!(code(&error), Some(tonic::Code::InvalidArgument), "{error}");
            assert!(error.to_string().contains("KEY_BYTES_MAX"), "{error}");
        }
        let error = client.next_keys("", &keys, 1).await.unwrap_err();
        assert!(error.to_string().contains("takes numeric ids"), "{error}");
        let error = client.next("conv", 1).await.unwrap_err();
        assert!(error.to_string().contains("takes string keys"), "{error}");
        assert_eq!(
            grpc.current_keys("conv", keys.clone()).await.unwrap(),
            [8, 1, 8]
        );

        // Sequence errors.
        let error = client.next("nope", 1).await.unwrap_err();
        assert_eq!(code(&error), Some(tonic::Code::NotFound), "{error}");
        let error = client.next_batch("", &[]).await.unwrap_err();
        assert_eq!(code(&error), Some(tonic::Code::InvalidArgument), "{error}");
        let too_many: Vec<u64> = (0..10_001).collect();
        let error = client.next_batch("", &too_many).await.unwrap_err();
        assert_eq!(code(&error), Some(tonic::Code::ResourceExhausted));
        assert!(error.to_string().contains("batch_ids_max"), "{error}");

        // Presence: login, replace, lookup, heartbeats, logout.
        let stored = client.login(&login_args(42, "ios", 1)).await.unwrap();
        assert_eq!(stored.session.conn, 1);
        assert!(stored.replaced.is_none());
        let replaced = client.login(&login_args(42, "ios", 2)).await.unwrap();
        assert_eq!(replaced.replaced.unwrap().conn, 1);
        let retried = client.login(&login_args(42, "ios", 2)).await.unwrap();
        assert!(
            retried.replaced.is_none(),
            "a retried login replaced itself"
        );
        let mut with_meta = login_args(42, "web", 3);
        with_meta.meta = b"v=2".to_vec();
        client.login(&with_meta).await.unwrap();
        let found = client.lookup_batch(&[42, 43, 42]).await.unwrap();
        assert_eq!(found.len(), 3);
        assert_eq!(found[0].len(), 2);
        assert!(found[1].is_empty());
        assert_eq!(found[0], found[2]);
        let web = found[0].iter().find(|s| s.device == "web").unwrap();
        assert_eq!(web.meta, b"v=2");
        assert_eq!(web.gateway, "gw1");
        assert_eq!(client.lookup_batch_count(&[42, 43]).await.unwrap(), 2);
        assert_eq!(client.online_count().await.unwrap(), 2);
        // The same sessions through gRPC.
        assert_eq!(grpc.lookup(42).await.unwrap().len(), 2);

        client.heartbeat(42, 2).await.unwrap();
        let error = client.heartbeat(42, 99).await.unwrap_err();
        assert_eq!(code(&error), Some(tonic::Code::NotFound), "{error}");
        let unknown = client
            .heartbeat_batch("gw1", &[(42, 2), (42, 99), (5, 5)])
            .await
            .unwrap();
        assert_eq!(unknown, vec![(42, 99), (5, 5)]);

        let removed = client.logout(42, 3).await.unwrap();
        assert_eq!(removed.device, "web");
        let error = client.logout(42, 3).await.unwrap_err();
        assert_eq!(code(&error), Some(tonic::Code::NotFound));

        // Bad input: a clear error, and the connection goes on.
        let error = client
            .login(&login_args(1, &"d".repeat(65), 1))
            .await
            .unwrap_err();
        assert_eq!(code(&error), Some(tonic::Code::InvalidArgument), "{error}");
        let error = client
            .login(&login_args(1, &"d".repeat(300), 1))
            .await
            .unwrap_err();
        assert!(error.to_string().contains("device"), "{error}");
        assert!(
            client.next("", 7).await.is_ok(),
            "the connection still works"
        );
    });
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), None);
    let mut bytes = Vec::new();
    codec::hello(&mut bytes, b"").unwrap();
    for _ in 0..100 {
        codec::next(&mut bytes, "", 9).unwrap();
    }
    // A bad request in the middle of a pipeline gets its own error and nothing else changes.
    codec::next(&mut bytes, "missing", 9).unwrap();
    codec::next(&mut bytes, "", 9).unwrap();
    let mut stream = TcpStream::connect(&server.wire_addr).unwrap();
    stream.write_all(&bytes).unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let mut received = Vec::new();
    stream.read_to_end(&mut received).unwrap();
    let mut at = 0;
    let mut replies = Vec::new();
    while let Some((frame, used)) = Frame::split(&received[at..]).unwrap() {
        replies.push((frame.op, frame.body.to_vec()));
        at += used;
    }
    assert_eq!(replies.len(), 103);
    let seqs: Vec<u64> = replies[1..101]
        .iter()
        .map(|(op, body)| {
            assert_eq!(*op, Op::Next.reply());
            codec::decode_next(body).unwrap().0
        })
        .collect();
    assert!(seqs.windows(2).all(|pair| pair[1] > pair[0]), "{seqs:?}");
    assert_eq!(wire_error_of(&replies[101]).0, Code::NOT_FOUND);
    assert!(codec::decode_next(&replies[102].1).unwrap().0 > seqs[99]);
}

#[test]
fn a_client_that_breaks_the_protocol_gets_an_error_and_is_closed_while_others_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), None);

    // No Hello first.
    let mut bytes = Vec::new();
    codec::next(&mut bytes, "", 1).unwrap();
    let frames = raw_exchange(&server.wire_addr, &bytes);
    assert_eq!(frames.len(), 1);
    let (code, message) = wire_error_of(&frames[0]);
    assert_eq!(code, Code::UNAUTHENTICATED);
    assert!(message.contains("Hello"), "{message}");

    // Not the wire protocol at all (an HTTP request on the wrong port).
    let frames = raw_exchange(&server.wire_addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(frames.len(), 1);
    let (code, message) = wire_error_of(&frames[0]);
    assert!(
        code == Code::RESOURCE_EXHAUSTED || code == Code::INVALID_ARGUMENT,
        "{code:?} {message}"
    );

    // A frame longer than FRAME_BYTES_MAX, after a good Hello.
    let mut bytes = Vec::new();
    codec::hello(&mut bytes, b"").unwrap();
    bytes.extend_from_slice(&((imstate_wire::FRAME_BYTES_MAX + 1) as u32).to_le_bytes());
    let frames = raw_exchange(&server.wire_addr, &bytes);
    assert_eq!(frames.len(), 2);
    assert_eq!(frames[0].0, Op::Hello.reply());
    let (code, message) = wire_error_of(&frames[1]);
    assert_eq!(code, Code::RESOURCE_EXHAUSTED);
    assert!(message.contains("FRAME_BYTES_MAX"), "{message}");

    // A wrong protocol version.
    let mut bytes = Vec::new();
    let start = codec::begin(&mut bytes, Op::Hello as u8);
    bytes.extend_from_slice(&imstate_wire::MAGIC);
    bytes.extend_from_slice(&[9, 0, 0]);
    codec::end(&mut bytes, start);
    let frames = raw_exchange(&server.wire_addr, &bytes);
    let (_, message) = wire_error_of(&frames[0]);
    assert!(message.contains("version 9"), "{message}");

    // Everyone else is still served.
    runtime().block_on(async {
        let client = WireClient::connect(&server.wire_addr, "").await.unwrap();
        assert!(client.next("", 1).await.unwrap() > 0);
    });
}

#[test]
fn tokens_guard_the_wire_port_like_the_grpc_port() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "# gateways\ns3cret\n").unwrap();
    let server = Server::start_with(
        &dir.path().join("data"),
        None,
        &[],
        &[("IMSTATE_AUTH__TOKEN_FILE", tokens.to_str().unwrap())],
    );
    runtime().block_on(async {
        for token in ["", "wrong"] {
            let error = WireClient::connect(&server.wire_addr, token)
                .await
                .err()
                .expect("refused");
            assert!(error.to_string().contains("bearer token"), "{error}");
        }
        let client = WireClient::connect(&server.wire_addr, "s3cret")
            .await
            .unwrap();
        assert!(client.next("", 1).await.unwrap() > 0);
    });
    let metrics = support::http_get(&server.metrics_addr, "/metrics")
        .unwrap()
        .1;
    assert!(
        metrics
            .lines()
            .any(|line| line.starts_with("imstate_wire_requests_total") && line.contains("Next")),
        "{metrics}"
    );
}
