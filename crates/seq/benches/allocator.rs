//! Micro-benchmarks of the allocator hot path, so regressions show: `next` on a hot id set of
//! an already-durable section set, `next_batch` of 100 ids spread over sections, and
//! `next_batch` of 100 ids drawn at random from 1M (what `imstate bench --workload seq-fanout`
//! sends: every id misses the cache).
//!
//! Raises are completed inline (no storage), so the numbers are the pure core's cost.

use criterion::{Criterion, Throughput, black_box, criterion_group, criterion_main};
use imstate_seq::{Alloc, Allocator, AllocatorOptions, NamespaceDef};

/// Number of distinct ids the hot set cycles through.
const HOT_IDS_COUNT: u64 = 4_096;

/// Ids per `next_batch` call (a group fan-out).
const BATCH_IDS_COUNT: u64 = 100;

/// Ids the random batches are drawn from (the bench's default `--keys`).
const RANDOM_IDS_COUNT: u64 = 1_000_000;

fn allocator() -> Allocator {
    let mut allocator = Allocator::new(AllocatorOptions::default());
    allocator
        .add_namespace(NamespaceDef::default_namespace())
        .expect("default namespace is valid");
    allocator
}

/// Completes every raise at once, as if storage were instant.
fn settle(allocator: &mut Allocator, alloc: Alloc) -> bool {
    let (raises, served) = match alloc {
        Alloc::Served { raises, .. } => (raises, true),
        Alloc::Wait { raises } => (raises, false),
    };
    for raise in raises {
        allocator.raise_durable(raise);
    }
    served
}

fn bench_next(criterion: &mut Criterion) {
    let mut allocator = allocator();
    let mut counter = 0u64;
    let mut group = criterion.benchmark_group("allocator");
    group.throughput(Throughput::Elements(1));
    group.bench_function("next_hot_ids", |bencher| {
        bencher.iter(|| {
            // Ids spread over 4 sections, 1,024 ids each.
            let id = (counter % HOT_IDS_COUNT) * 97 % 400_000;
            counter = counter.wrapping_add(1);
            loop {
                let alloc = allocator.next("default", black_box(id)).expect("valid id");
                if settle(&mut allocator, alloc) {
                    break;
                }
            }
        });
    });
    let ids: Vec<u64> = (0..BATCH_IDS_COUNT)
        .map(|index| index * 42_949_672)
        .collect();
    group.throughput(Throughput::Elements(BATCH_IDS_COUNT));
    group.bench_function("next_batch_100", |bencher| {
        bencher.iter(|| {
            loop {
                let alloc = allocator
                    .next_batch("default", black_box(&ids))
                    .expect("valid ids");
                if settle(&mut allocator, alloc) {
                    break;
                }
            }
        });
    });
    // 1,000 batches of 100 ids uniform over 1M ids (a splitmix sequence: no rand dependency).
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let random: Vec<Vec<u64>> = (0..1_000)
        .map(|_| {
            (0..BATCH_IDS_COUNT)
                .map(|_| {
                    state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
                    let mut z = state;
                    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                    (z ^ (z >> 31)) % RANDOM_IDS_COUNT
                })
                .collect()
        })
        .collect();
    // Touch every id once so the sections exist and their arrays are allocated.
    for batch in &random {
        loop {
            let alloc = allocator.next_batch("default", batch).expect("valid ids");
            if settle(&mut allocator, alloc) {
                break;
            }
        }
    }
    let mut turn = 0;
    group.bench_function("next_batch_100_random_of_1m", |bencher| {
        bencher.iter(|| {
            turn = (turn + 1) % random.len();
            loop {
                let alloc = allocator
                    .next_batch("default", black_box(&random[turn]))
                    .expect("valid ids");
                if settle(&mut allocator, alloc) {
                    break;
                }
            }
        });
    });
    group.finish();
}

criterion_group!(benches, bench_next);
criterion_main!(benches);
