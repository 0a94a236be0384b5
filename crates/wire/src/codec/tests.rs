//! Round trips of every frame, truncation at every byte, and the limits.

use proptest::prelude::*;

use super::*;

fn one_frame(bytes: &[u8]) -> Frame<'_> {
    let (frame, used) = Frame::split(bytes).expect("valid").expect("complete");
    assert_eq!(used, bytes.len(), "one frame, nothing after it");
    frame
}

fn ascii(max: usize) -> impl Strategy<Value = String> {
    proptest::string::string_regex(&format!("[a-z0-9:._-]{{0,{max}}}")).expect("regex")
}

fn session_strategy() -> impl Strategy<Value = WireSession> {
    (
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        any::<u32>(),
        ascii(64),
        ascii(128),
        proptest::option::of(proptest::collection::vec(any::<u8>(), 0..300)),
    )
        .prop_map(
            |(uid, conn, login_ms, last_heartbeat_ms, ttl_ms, device, gateway, meta)| {
                WireSession {
                    uid,
                    conn,
                    login_ms,
                    last_heartbeat_ms,
                    ttl_ms,
                    device,
                    gateway,
                    meta,
                }
            },
        )
}

proptest! {
    #[test]
    fn requests_round_trip(
        namespace in ascii(255),
        ids in proptest::collection::vec(any::<u64>(), 0..200),
        pairs in proptest::collection::vec((any::<u64>(), any::<u64>()), 0..200),
        session in session_strategy(),
        token in proptest::collection::vec(any::<u8>(), 0..100),
    ) {
        let mut out = Vec::new();
        hello(&mut out, &token).unwrap();
        next(&mut out, &namespace, ids.first().copied().unwrap_or(7)).unwrap();
        next_batch(&mut out, &namespace, &ids).unwrap();
        let fields = LoginFields {
            uid: session.uid,
            conn: session.conn,
            ttl_ms: session.ttl_ms,
            device: &session.device,
            gateway: &session.gateway,
            meta: session.meta.as_deref(),
        };
        login(&mut out, &fields).unwrap();
        session_op(&mut out, Op::Logout, session.uid, session.conn);
        session_op(&mut out, Op::Heartbeat, session.uid, session.conn);
        heartbeat_batch(&mut out, &session.gateway, &pairs).unwrap();
        lookup_batch(&mut out, &ids).unwrap();
        online_count(&mut out);
        next_range(&mut out, &namespace, session.conn, &ids).unwrap();
        let keys: Vec<Vec<u8>> = ids
            .iter()
            .map(|id| id.to_le_bytes()[..(*id % 9) as usize].to_vec())
            .collect();
        next_keys(&mut out, &namespace, session.uid, &keys).unwrap();

        let mut requests = Vec::new();
        let mut at = 0;
        while let Some((frame, used)) = Frame::split(&out[at..]).unwrap() {
            requests.push(Request::decode(frame).unwrap());
            at += used;
        }
        prop_assert_eq!(at, out.len());
        prop_assert_eq!(requests.len(), 11);
        match requests[10] {
            Request::NextKeys { namespace: ns, count, keys: got } => {
                prop_assert_eq!(ns, namespace.as_str());
                prop_assert_eq!(count, session.uid);
                prop_assert_eq!(got.len(), keys.len());
                prop_assert_eq!(got.iter().map(<[u8]>::to_vec).collect::<Vec<_>>(), keys.clone());
            }
            other => prop_assert!(false, "{other:?}"),
        }
        match requests[9] {
            Request::NextRange { namespace: ns, count, ids: got } => {
                prop_assert_eq!(ns, namespace.as_str());
                prop_assert_eq!(count, session.conn);
                prop_assert_eq!(got.iter().collect::<Vec<_>>(), ids.clone());
            }
            other => prop_assert!(false, "{other:?}"),
        }
        prop_assert_eq!(requests[8], Request::OnlineCount);
        prop_assert_eq!(requests[0], Request::Hello { token: &token });
        prop_assert_eq!(requests[1], Request::Next {
            namespace: &namespace,
            id: ids.first().copied().unwrap_or(7),
        });
        match requests[2] {
            Request::NextBatch { namespace: ns, ids: got } => {
                prop_assert_eq!(ns, namespace.as_str());
                prop_assert_eq!(got.iter().collect::<Vec<_>>(), ids.clone());
            }
            other => prop_assert!(false, "{other:?}"),
        }
        prop_assert_eq!(requests[3], Request::Login(fields));
        prop_assert_eq!(requests[4], Request::Logout { uid: session.uid, conn: session.conn });
        prop_assert_eq!(requests[5], Request::Heartbeat { uid: session.uid, conn: session.conn });
        match requests[6] {
            Request::HeartbeatBatch { gateway, sessions } => {
                prop_assert_eq!(gateway, session.gateway.as_str());
                prop_assert_eq!(sessions.iter().collect::<Vec<_>>(), pairs.clone());
            }
            other => prop_assert!(false, "{other:?}"),
        }
        match requests[7] {
            Request::LookupBatch { uids } => {
                let mut got = Vec::new();
                uids.read_into(&mut got);
                prop_assert_eq!(got, ids.clone());
            }
            other => prop_assert!(false, "{other:?}"),
        }
    }

    #[test]
    fn replies_round_trip(
        seqs in proptest::collection::vec(any::<u64>(), 0..100),
        sessions in proptest::collection::vec(proptest::collection::vec(session_strategy(), 0..4), 0..20),
        unknown in proptest::collection::vec((any::<u64>(), any::<u64>()), 0..50),
    ) {
        let mut out = Vec::new();
        reply_next_batch(&mut out, &seqs, 9);
        let body = one_frame(&out).reply_body(Op::NextBatch).unwrap().unwrap();
        prop_assert_eq!(decode_next_batch(body).unwrap(), (seqs.clone(), 9));

        out.clear();
        reply_next_range(&mut out, &seqs, 4);
        let body = one_frame(&out).reply_body(Op::NextRange).unwrap().unwrap();
        prop_assert_eq!(decode_next_range(body).unwrap(), (seqs.clone(), 4));

        out.clear();
        reply_next_keys(&mut out, &seqs, 5);
        let body = one_frame(&out).reply_body(Op::NextKeys).unwrap().unwrap();
        prop_assert_eq!(decode_next_range(body).unwrap(), (seqs.clone(), 5));

        out.clear();
        reply_next(&mut out, seqs.first().copied().unwrap_or(1), 3);
        let body = one_frame(&out).reply_body(Op::Next).unwrap().unwrap();
        prop_assert_eq!(decode_next(body).unwrap(), (seqs.first().copied().unwrap_or(1), 3));

        out.clear();
        let route: Vec<u8> = seqs.iter().map(|seq| *seq as u8).collect();
        reply_route(&mut out, &route, b"ns");
        let body = one_frame(&out).reply_body(Op::Route).unwrap().unwrap();
        prop_assert_eq!(decode_route(body).unwrap(), (&route[..], &b"ns"[..]));

        out.clear();
        let mut reply = LookupReply::begin(&mut out, sessions.len());
        for uid_sessions in &sessions {
            reply.uid();
            for session in uid_sessions {
                reply.session(&session.fields());
            }
        }
        reply.end();
        let body = one_frame(&out).reply_body(Op::LookupBatch).unwrap().unwrap();
        prop_assert_eq!(
            count_lookup_batch(body).unwrap(),
            (sessions.len(), sessions.iter().map(Vec::len).sum::<usize>())
        );
        prop_assert_eq!(decode_lookup_batch(body).unwrap(), sessions.clone());

        out.clear();
        let first = sessions.iter().flatten().next().cloned();
        if let Some(first) = first {
            reply_login(&mut out, &first.fields(), Some(&first.fields()));
            let body = one_frame(&out).reply_body(Op::Login).unwrap().unwrap();
            prop_assert_eq!(decode_login(body).unwrap(), (first.clone(), Some(first.clone())));
            out.clear();
            reply_logout(&mut out, &first.fields());
            let body = one_frame(&out).reply_body(Op::Logout).unwrap().unwrap();
            prop_assert_eq!(decode_logout(body).unwrap(), first);
        }

        out.clear();
        reply_heartbeat_batch(&mut out, &unknown);
        let body = one_frame(&out).reply_body(Op::HeartbeatBatch).unwrap().unwrap();
        prop_assert_eq!(decode_heartbeat_batch(body).unwrap(), unknown);
    }
}

#[test]
fn every_truncation_of_a_request_waits_or_fails_cleanly() {
    let mut out = Vec::new();
    let fields = LoginFields {
        uid: 1,
        conn: 2,
        ttl_ms: 3,
        device: "ios",
        gateway: "gw1",
        meta: Some(b"m"),
    };
    login(&mut out, &fields).unwrap();
    for cut in 0..out.len() {
        assert_eq!(Frame::split(&out[..cut]), Ok(None), "cut at {cut}");
    }
    // A body cut short inside a frame whose length says so is a decode error, not a panic.
    let body_len = out.len() - 5;
    for keep in 0..body_len {
        let mut frame = Vec::new();
        let start = begin(&mut frame, Op::Login as u8);
        frame.extend_from_slice(&out[5..5 + keep]);
        end(&mut frame, start);
        let parsed = Request::decode(one_frame(&frame));
        assert!(
            matches!(parsed, Err(DecodeError::Truncated(_))),
            "keep {keep}: {parsed:?}"
        );
    }
}

#[test]
fn a_next_keys_cut_anywhere_inside_its_keys_is_a_decode_error() {
    let mut out = Vec::new();
    let keys = vec![b"si_1_2".to_vec(), Vec::new(), vec![0xff; 200]];
    next_keys(&mut out, "conv", 3, &keys).unwrap();
    let body = out[5..].to_vec();
    for keep in 0..body.len() {
        let mut frame = Vec::new();
        let start = begin(&mut frame, Op::NextKeys as u8);
        frame.extend_from_slice(&body[..keep]);
        end(&mut frame, start);
        let parsed = Request::decode(one_frame(&frame));
        assert!(
            matches!(parsed, Err(DecodeError::Truncated(_))),
            "keep {keep}: {parsed:?}"
        );
    }
    // A key over 255 bytes cannot be framed: refused before anything is written.
    let mut refused = Vec::new();
    assert!(next_keys(&mut refused, "conv", 1, &[vec![0; 256]]).is_err());
    assert!(refused.is_empty());
}

#[test]
fn bad_frames_are_named() {
    assert_eq!(Frame::split(&[0, 0, 0, 0, 1]), Err(DecodeError::EmptyFrame));
    let huge = ((FRAME_BYTES_MAX + 1) as u32).to_le_bytes();
    assert!(matches!(
        Frame::split(&huge),
        Err(DecodeError::FrameTooLarge { .. })
    ));
    let mut out = Vec::new();
    let start = begin(&mut out, 0x7E);
    end(&mut out, start);
    assert_eq!(
        Request::decode(one_frame(&out)),
        Err(DecodeError::UnknownOp(0x7E))
    );

    out.clear();
    let start = begin(&mut out, Op::Hello as u8);
    out.extend_from_slice(b"HTTP/1.1");
    end(&mut out, start);
    assert_eq!(Request::decode(one_frame(&out)), Err(DecodeError::BadMagic));

    out.clear();
    let start = begin(&mut out, Op::Heartbeat as u8);
    out.extend_from_slice(&[0; 17]);
    end(&mut out, start);
    assert_eq!(
        Request::decode(one_frame(&out)),
        Err(DecodeError::TrailingBytes(1))
    );

    out.clear();
    let long = "x".repeat(256);
    assert!(matches!(
        next(&mut out, &long, 1),
        Err(DecodeError::FieldTooLong {
            what: "namespace",
            ..
        })
    ));
    assert!(out.is_empty(), "a refused request leaves nothing behind");
}

#[test]
fn an_oversized_batch_is_refused_before_it_is_sent() {
    let ids = vec![0u64; FRAME_BYTES_MAX / 8 + 1];
    let mut out = vec![9];
    assert!(matches!(
        next_batch(&mut out, "", &ids),
        Err(DecodeError::FrameTooLarge { .. })
    ));
    assert_eq!(out, vec![9], "the buffer is left as it was");
}

#[test]
fn error_replies_carry_code_and_message() {
    let mut out = Vec::new();
    reply_error(&mut out, Code::NOT_FOUND, "unknown namespace \"x\"");
    let frame = one_frame(&out);
    assert_eq!(
        frame.reply_body(Op::Next),
        Ok(Err((
            Code::NOT_FOUND,
            "unknown namespace \"x\"".to_string()
        )))
    );
    out.clear();
    reply_next(&mut out, 5, 1);
    assert!(matches!(
        one_frame(&out).reply_body(Op::NextBatch),
        Err(DecodeError::UnexpectedReply { .. })
    ));
}

#[test]
fn a_redirect_message_round_trips_and_other_messages_are_not_redirects() {
    let message = moved_message("n2", "10.0.0.2:7702", "10.0.0.2:7700", 7, "section 3 moved");
    assert_eq!(
        parse_moved(&message),
        Some((
            "n2".into(),
            "10.0.0.2:7702".into(),
            "10.0.0.2:7700".into(),
            7
        ))
    );
    assert_eq!(parse_moved("namespace `x` not found"), None);
    assert_eq!(parse_moved("moved n2 only-two"), None);
}
