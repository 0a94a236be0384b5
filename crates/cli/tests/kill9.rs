//! S1 under kill -9 of the real binary: concurrent clients allocate on overlapping ids while the
//! server is killed at random moments and restarted; the history checker must find no violation.
//! A quarter of the calls reserve ranges longer than the namespace's step (NextRange), so a
//! range's raise spans several steps and a crash can land in the middle of it.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use imstate_check::seq::{Outcome, SeqCall, check};
use imstate_client::Client;
use rand::{Rng, SeedableRng, rngs::StdRng};
use support::{Server, monotonic_ns};

const KILLS: usize = 24;
const WORKERS: usize = 6;
const IDS: u64 = 40;
/// Tiny sections and steps so that raises, and the crash windows around them, are frequent.
const CONFIG: &str = r#"
[[seq.namespaces]]
name = "t"
id_lo = 0
id_hi = 1000
section_size = 8
step = 5
"#;

async fn worker(addr: String, seed: u64, origin: Instant, stop: Arc<AtomicBool>) -> Vec<SeqCall> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut history = Vec::new();
    let mut client: Option<Client> = None;
    while !stop.load(Ordering::Relaxed) {
        let Some(connected) = support::reconnect(&mut client, &addr).await else {
            continue;
        };
        let ids: Vec<u64> = if rng.gen_bool(0.5) {
            vec![rng.gen_range(0..IDS)]
        } else {
            (0..rng.gen_range(2..12))
                .map(|_| rng.gen_range(0..IDS))
                .collect()
        };
        // A range of 2 to 11 seqs per id (the step is 5), for a quarter of the calls.
        let count = if rng.gen_bool(0.25) {
            rng.gen_range(2..12)
        } else {
            1
        };
        let start_ns = monotonic_ns(origin);
        let result = if count > 1 {
            tokio::time::timeout(
                Duration::from_secs(2),
                connected.next_range_batch("t", ids.clone(), count),
            )
            .await
            .map(|r| r.map(|ranges| ranges.into_iter().map(|range| range.last).collect()))
        } else if ids.len() == 1 {
            tokio::time::timeout(Duration::from_secs(2), connected.next("t", ids[0]))
                .await
                .map(|r| r.map(|seq| vec![seq]))
        } else {
            tokio::time::timeout(
                Duration::from_secs(2),
                connected.next_batch("t", ids.clone()),
            )
            .await
        };
        let end_ns = monotonic_ns(origin);
        let outcome = match result {
            Ok(Ok(values)) if count == 1 => Outcome::Ok(values),
            Ok(Ok(lasts)) => Outcome::Ranges { count, lasts },
            Ok(Err(_)) | Err(_) => {
                client = None;
                Outcome::Unknown
            }
        };
        history.push(SeqCall {
            ids,
            start_ns,
            end_ns,
            outcome,
        });
    }
    history
}

#[test]
fn kill9_at_random_moments_never_breaks_s1() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("imstate.toml");
    std::fs::write(&config, CONFIG).unwrap();
    let mut server = Server::start(&dir.path().join("data"), Some(&config));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let origin = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..WORKERS)
        .map(|i| {
            runtime.spawn(worker(
                server.addr.clone(),
                i as u64,
                origin,
                Arc::clone(&stop),
            ))
        })
        .collect();
    let mut rng = StdRng::seed_from_u64(0x5eed);
    for _ in 0..KILLS {
        std::thread::sleep(Duration::from_millis(rng.gen_range(40..250)));
        server.kill9();
        server.restart();
    }
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    let mut history = Vec::new();
    for handle in workers {
        history.extend(runtime.block_on(handle).unwrap());
    }
    // One last sequential pass after everything settled: every id must still move forward.
    let last = runtime.block_on(async {
        let client = Client::connect(&server.addr).await.unwrap();
        let start_ns = monotonic_ns(origin);
        let ids: Vec<u64> = (0..IDS).collect();
        let values = client.next_batch("t", ids.clone()).await.unwrap();
        SeqCall {
            ids,
            start_ns,
            end_ns: monotonic_ns(origin),
            outcome: Outcome::Ok(values),
        }
    });
    history.push(last);

    let ok = history
        .iter()
        .filter(|c| !matches!(c.outcome, Outcome::Unknown))
        .count();
    let unknown = history.len() - ok;
    let violations = check(&history);
    eprintln!(
        "kill9: {KILLS} kills, {} calls ({ok} ok, {unknown} unknown), {} violations, \
         restart wait total {:?}",
        history.len(),
        violations.len(),
        server.restart_wait
    );
    assert!(
        ok > 500,
        "too few successful calls ({ok}) for the test to mean anything"
    );
    assert!(
        unknown > 0,
        "no call was interrupted: the kills did not land under load"
    );
    assert!(
        violations.is_empty(),
        "S1 violations: {:#?}",
        &violations[..violations.len().min(10)]
    );
}
