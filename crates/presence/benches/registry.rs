//! Micro-benchmarks of the registry hot paths, so regressions show: `lookup` of one uid,
//! `lookup_batch` of 500 uids (a group fan-out) and `heartbeat_batch` of 1,000 sessions of one
//! gateway, on a registry holding 1,000,000 sessions (one per uid, 16 gateways, 3 devices: the
//! layout `imstate bench` preloads).
//!
//! ```text
//! cargo bench -p imstate-presence
//! ```

use criterion::{Criterion, Throughput, black_box, criterion_group, criterion_main};
use imstate_presence::{LoginRequest, RegistryOptions, ShardedRegistry};

/// Sessions in the registry (one per uid).
const SESSIONS_COUNT: u64 = 1_000_000;
/// Gateways the sessions are spread over.
const GATEWAYS_COUNT: u64 = 16;
/// Uids per `lookup_batch`.
const LOOKUP_BATCH_UIDS: usize = 500;
/// Sessions per `heartbeat_batch`.
const HEARTBEAT_BATCH_SESSIONS: usize = 1_000;
/// Time to live, long enough that nothing expires while benchmarking.
const TTL_MS: u32 = 3_600_000;

const DEVICES: [&str; 3] = ["d0", "d1", "d2"];

fn registry(gateways: &[String]) -> ShardedRegistry {
    let registry = ShardedRegistry::new(RegistryOptions::default()).expect("default options");
    for uid in 0..SESSIONS_COUNT {
        let request = LoginRequest {
            uid,
            device: DEVICES[(uid % 3) as usize],
            gateway: &gateways[(uid % GATEWAYS_COUNT) as usize],
            conn: uid * 3 + uid % 3,
            ttl_ms: TTL_MS,
            meta: None,
        };
        registry
            .login(&request, 1_000)
            .expect("login within limits");
    }
    registry
}

/// A cheap deterministic spread of uids over the whole range (a multiplicative hash).
fn spread(index: u64) -> u64 {
    index.wrapping_mul(0x9E37_79B9_7F4A_7C15) % SESSIONS_COUNT
}

fn bench_registry(criterion: &mut Criterion) {
    let gateways: Vec<String> = (0..GATEWAYS_COUNT)
        .map(|index| format!("gw{index}"))
        .collect();
    let registry = registry(&gateways);
    let mut counter = 0u64;
    let mut group = criterion.benchmark_group("registry");

    group.throughput(Throughput::Elements(1));
    group.bench_function("lookup", |bencher| {
        bencher.iter(|| {
            counter = counter.wrapping_add(1);
            black_box(registry.lookup(black_box(spread(counter))))
        });
    });

    group.throughput(Throughput::Elements(LOOKUP_BATCH_UIDS as u64));
    group.bench_function("lookup_batch_500", |bencher| {
        bencher.iter_batched(
            || {
                counter = counter.wrapping_add(1);
                (0..LOOKUP_BATCH_UIDS as u64)
                    .map(|index| spread(counter * 1_000 + index))
                    .collect::<Vec<u64>>()
            },
            |uids| black_box(registry.lookup_batch(&uids).expect("within limits")),
            criterion::BatchSize::SmallInput,
        );
    });

    group.throughput(Throughput::Elements(HEARTBEAT_BATCH_SESSIONS as u64));
    let mut now_ms = 2_000u64;
    group.bench_function("heartbeat_batch_1000", |bencher| {
        bencher.iter_batched(
            || {
                counter = counter.wrapping_add(1);
                let gateway = counter % GATEWAYS_COUNT;
                let sessions: Vec<(u64, u64)> = (0..HEARTBEAT_BATCH_SESSIONS as u64)
                    .map(|index| {
                        let uid = spread(counter * 1_000 + index) / GATEWAYS_COUNT
                            * GATEWAYS_COUNT
                            + gateway;
                        let uid = if uid >= SESSIONS_COUNT {
                            uid - GATEWAYS_COUNT
                        } else {
                            uid
                        };
                        (uid, uid * 3 + uid % 3)
                    })
                    .collect();
                (gateway, sessions)
            },
            |(gateway, sessions)| {
                now_ms += 1;
                let outcome = registry
                    .heartbeat_batch(&gateways[gateway as usize], &sessions, now_ms)
                    .expect("within limits");
                debug_assert!(outcome.unknown.is_empty());
                black_box(outcome)
            },
            criterion::BatchSize::SmallInput,
        );
    });
    group.finish();
}

criterion_group!(benches, bench_registry);
criterion_main!(benches);
