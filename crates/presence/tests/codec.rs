//! Change encoding: round trip for arbitrary records, and no panic on random, truncated or
//! bit-flipped input.

use std::sync::Arc;

use imstate_presence::{Change, DecodeError, Session, ShardScope};
use proptest::prelude::*;

fn name(max: usize) -> impl Strategy<Value = Arc<str>> {
    proptest::string::string_regex(&format!("[a-z0-9é:._-]{{1,{}}}", max / 2))
        .unwrap()
        .prop_filter("byte length", move |text| {
            !text.is_empty() && text.len() <= max
        })
        .prop_map(Arc::from)
}

fn session() -> impl Strategy<Value = Session> {
    (
        any::<u64>(),
        name(64),
        name(128),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        any::<u32>(),
        proptest::option::of(proptest::collection::vec(any::<u8>(), 0..=256)),
    )
        .prop_map(
            |(uid, device, gateway, conn, login_ms, last_heartbeat_ms, ttl_ms, meta)| Session {
                uid,
                device,
                gateway,
                conn,
                login_ms,
                last_heartbeat_ms,
                ttl_ms,
                meta: meta.map(Arc::from),
            },
        )
}

fn change() -> impl Strategy<Value = Change> {
    let uid_conn = (any::<u64>(), any::<u64>());
    prop_oneof![
        session().prop_map(Change::Login),
        (any::<u64>(), any::<u64>(), any::<u64>())
            .prop_map(|(uid, conn, at_ms)| Change::Heartbeat { uid, conn, at_ms }),
        (any::<u64>(), proptest::collection::vec(uid_conn, 0..50))
            .prop_map(|(at_ms, sessions)| Change::HeartbeatBatch { at_ms, sessions }),
        uid_conn.prop_map(|(uid, conn)| Change::Logout { uid, conn }),
        uid_conn.prop_map(|(uid, conn)| Change::Expire { uid, conn }),
        (name(128), 1u32..1_000, any::<u32>()).prop_map(|(gateway, count, index)| {
            Change::GatewayDown {
                gateway,
                scope: ShardScope {
                    index: index % count,
                    count,
                },
            }
        }),
        (name(128), any::<u32>(), any::<u64>()).prop_map(|(gateway, ttl_ms, at_ms)| {
            Change::GatewayRegister {
                gateway,
                ttl_ms,
                at_ms,
            }
        }),
        (name(128), any::<u64>())
            .prop_map(|(gateway, at_ms)| Change::GatewayHeartbeat { gateway, at_ms }),
        name(128).prop_map(|gateway| Change::GatewayUnregister { gateway }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1_000, ..ProptestConfig::default() })]

    #[test]
    fn every_change_round_trips_through_bytes(change in change()) {
        let bytes = change.to_bytes();
        prop_assert_eq!(Change::decode(&bytes), Ok(change));
    }

    #[test]
    fn peek_uid_names_the_uid_of_single_session_records_only(change in change()) {
        let expected = match &change {
            Change::Login(session) => Some(session.uid),
            Change::Heartbeat { uid, .. } | Change::Logout { uid, .. } | Change::Expire { uid, .. } => {
                Some(*uid)
            }
            _ => None,
        };
        prop_assert_eq!(Change::peek_uid(&change.to_bytes()), expected);
    }

    #[test]
    fn every_strict_prefix_of_an_encoding_is_refused(change in change()) {
        let bytes = change.to_bytes();
        for cut in 0..bytes.len() {
            prop_assert!(Change::decode(&bytes[..cut]).is_err(), "prefix {} accepted", cut);
        }
        let mut longer = bytes.clone();
        longer.push(0);
        prop_assert_eq!(Change::decode(&longer), Err(DecodeError::TrailingBytes(1)));
    }

    #[test]
    fn flipped_bytes_never_panic(change in change(), position in any::<usize>(), mask in 1u8..) {
        let mut bytes = change.to_bytes();
        let position = position % bytes.len();
        bytes[position] ^= mask;
        let _ = Change::decode(&bytes);
    }

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = Change::decode(&bytes);
    }
}

#[test]
fn decode_names_what_is_wrong() {
    assert_eq!(Change::decode(&[]), Err(DecodeError::Truncated));
    assert_eq!(
        Change::decode(&[0x21]),
        Err(DecodeError::UnsupportedVersion(2))
    );
    assert_eq!(Change::decode(&[0x1F]), Err(DecodeError::UnknownKind(15)));
    let mut bad_scope = Change::GatewayDown {
        gateway: Arc::from("gw"),
        scope: ShardScope { index: 0, count: 1 },
    }
    .to_bytes();
    let len = bad_scope.len();
    bad_scope[len - 4..].copy_from_slice(&0u32.to_le_bytes());
    assert_eq!(
        Change::decode(&bad_scope),
        Err(DecodeError::InvalidScope { index: 0, count: 0 })
    );
    // A batch claiming more entries than its bytes hold is refused before allocating.
    let mut huge = vec![0x13];
    huge.extend_from_slice(&0u64.to_le_bytes());
    huge.extend_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(Change::decode(&huge), Err(DecodeError::Truncated));
}

#[test]
fn encodings_are_compact() {
    let heartbeat = Change::Heartbeat {
        uid: 1,
        conn: 2,
        at_ms: 3,
    };
    assert_eq!(heartbeat.to_bytes().len(), 25);
    let login = Change::Login(Session {
        uid: 1,
        device: Arc::from("ios"),
        gateway: Arc::from("gw-01"),
        conn: 2,
        login_ms: 3,
        last_heartbeat_ms: 4,
        ttl_ms: 5,
        meta: None,
    });
    assert_eq!(login.to_bytes().len(), 1 + 36 + 4 + 6 + 2);
}
