//! The coordinator contract, run against a real etcd (Debian's etcd-server, started here on
//! loopback) and against the in-process model the simulation uses: the same requests must
//! give the same answers, so that what the simulation proves holds on etcd.

use std::time::Duration;

use imstate_coord::{
    Compare, Coordinator, LocalCoordinator, Op, Request, Response, Txn, TxnResponse,
};
use imstate_coord_etcd::{EtcdCoordinator, EtcdProcess};

async fn txn(coordinator: &dyn Coordinator, txn: Txn) -> TxnResponse {
    match coordinator.call(Request::Txn(txn)).await {
        Response::Txn(response) => response,
        other => panic!("{}: {other:?}", coordinator.describe()),
    }
}

/// The answers that matter, in a form both implementations must agree on.
async fn scenario(coordinator: &dyn Coordinator) -> Vec<String> {
    let mut seen = Vec::new();
    let base = txn(coordinator, Txn::default()).await.revision;
    let create = |key: &str, value: &str, lease: Option<i64>| Txn {
        compare: vec![Compare::created(key, 0)],
        success: vec![Op::Put {
            key: key.into(),
            value: value.into(),
            lease,
        }],
        failure: vec![Op::get(key)],
    };
    let first = txn(coordinator, create("/t/a", "1", None)).await;
    seen.push(format!(
        "create: {} at +{}",
        first.succeeded,
        first.revision - base
    ));
    let again = txn(coordinator, create("/t/a", "2", None)).await;
    let holder = again.got(0).unwrap();
    seen.push(format!(
        "create again: {}, holder {:?} created +{} modified +{}",
        again.succeeded,
        String::from_utf8_lossy(&holder.value),
        holder.create_revision - base,
        holder.mod_revision - base
    ));
    // A fenced write: compare the mod revision, stale then fresh.
    let stale = Txn {
        compare: vec![Compare::modified("/t/a", holder.mod_revision - 1)],
        success: vec![Op::put("/t/a", "x")],
        failure: vec![Op::get("/t/a")],
    };
    seen.push(format!(
        "stale fence: {}",
        txn(coordinator, stale).await.succeeded
    ));
    let fresh = Txn {
        compare: vec![Compare::modified("/t/a", holder.mod_revision)],
        success: vec![Op::put("/t/a", "3"), Op::put("/t/b", "4")],
        failure: vec![],
    };
    let fresh = txn(coordinator, fresh).await;
    seen.push(format!(
        "fresh fence: {} at +{}",
        fresh.succeeded,
        fresh.revision - base
    ));
    let listed = txn(
        coordinator,
        Txn {
            success: vec![Op::get_prefix("/t/"), Op::get("/t/missing")],
            ..Txn::default()
        },
    )
    .await;
    let keys: Vec<String> = listed.gets[0]
        .iter()
        .map(|kv| format!("{}={}", kv.key, String::from_utf8_lossy(&kv.value)))
        .collect();
    seen.push(format!(
        "prefix: {keys:?}, missing: {}",
        listed.gets[1].len()
    ));
    // A value compare on a missing key never holds.
    let missing = Txn {
        compare: vec![Compare::value("/t/missing", "")],
        ..Txn::default()
    };
    seen.push(format!(
        "value of missing: {}",
        txn(coordinator, missing).await.succeeded
    ));
    // Leases: a leased key goes when the lease lapses; keep-alive then says so.
    let Response::Granted { lease } = coordinator
        .call(Request::LeaseGrant { ttl_ms: 1_000 })
        .await
    else {
        panic!("no lease")
    };
    txn(coordinator, create("/t/leased", "m", Some(lease))).await;
    let kept = coordinator.call(Request::KeepAlive { lease }).await;
    seen.push(format!("keep-alive: {kept:?}"));
    let mut gone = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let read = txn(
            coordinator,
            Txn {
                success: vec![Op::get("/t/leased")],
                ..Txn::default()
            },
        )
        .await;
        if read.gets[0].is_empty() {
            gone = true;
            break;
        }
    }
    seen.push(format!("leased key gone after the TTL: {gone}"));
    let after = coordinator.call(Request::KeepAlive { lease }).await;
    seen.push(format!("keep-alive after: {after:?}"));
    // A put on a lapsed lease fails the whole txn, whatever else it holds.
    let on_lapsed = coordinator
        .call(Request::Txn(Txn {
            success: vec![
                Op::put("/t/other", "o"),
                Op::Put {
                    key: "/t/late".into(),
                    value: b"l".to_vec(),
                    lease: Some(lease),
                },
            ],
            ..Txn::default()
        }))
        .await;
    let refused = match &on_lapsed {
        Response::Failed(error) => error.to_string().contains("lease not found"),
        _ => false,
    };
    let other = txn(
        coordinator,
        Txn {
            success: vec![Op::get("/t/other")],
            ..Txn::default()
        },
    )
    .await;
    seen.push(format!(
        "put on a lapsed lease refused: {refused}, nothing of it applied: {}",
        other.gets[0].is_empty()
    ));
    seen
}

#[tokio::test]
async fn etcd_and_the_model_give_the_same_answers() {
    let etcd = EtcdProcess::start().expect("start etcd (apt-get install etcd-server)");
    let real = EtcdCoordinator::connect(&[etcd.address()], Duration::from_secs(5))
        .await
        .unwrap();
    let on_etcd = scenario(&real).await;
    let model = LocalCoordinator::default();
    // The model's lease lapses by its own clock; tick it while the scenario waits.
    let on_model = scenario(&model).await;
    assert_eq!(on_etcd, on_model);
    assert!(
        on_etcd
            .iter()
            .any(|line| line == "leased key gone after the TTL: true")
    );
}

#[tokio::test]
async fn an_unreachable_etcd_is_a_clear_error_naming_the_endpoint() {
    // Reserved for this process and listened on by nobody.
    let port = imstate_coord_etcd::loopback_port();
    let endpoint = format!("127.0.0.1:{port}");
    let error =
        EtcdCoordinator::connect(std::slice::from_ref(&endpoint), Duration::from_millis(500))
            .await
            .unwrap_err();
    assert!(error.to_string().contains(&endpoint), "{error}");
}

/// The watch behind the arbiter election: `wait_deleted` resolves when the key goes (its lease
/// lapses), not before.
#[tokio::test]
async fn wait_deleted_resolves_when_a_leased_key_goes() {
    let etcd = EtcdProcess::start().expect("start etcd (apt-get install etcd-server)");
    let real = EtcdCoordinator::connect(&[etcd.address()], Duration::from_secs(5))
        .await
        .unwrap();
    let Response::Granted { lease } = real.call(Request::LeaseGrant { ttl_ms: 1_000 }).await
    else {
        panic!("no lease")
    };
    let put = txn(
        &real,
        Txn {
            success: vec![Op::Put {
                key: "/w/arbiter".into(),
                value: b"n1".to_vec(),
                lease: Some(lease),
            }],
            ..Txn::default()
        },
    )
    .await;
    let watch = real.wait_deleted("/w/arbiter".into(), put.revision);
    let started = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(10), watch)
        .await
        .expect("the key goes within its TTL")
        .unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "not before the lease lapsed"
    );
}
