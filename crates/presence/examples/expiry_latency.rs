//! Lookup latency while a million sessions expire at once (P2: expiry never stalls requests).
//!
//! ```text
//! cargo run --release -p imstate-presence --example expiry_latency -- [sessions]
//! ```
//!
//! One thread runs `tick` over a registry where every session is due; another thread looks
//! up random uids (present and expired) and records each lookup's latency. Prints the tick
//! duration and lookup p50 / p99 / max measured during it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use imstate_presence::{LoginRequest, RegistryOptions, ShardedRegistry};

fn main() {
    let sessions: u64 = std::env::args()
        .nth(1)
        .and_then(|arg| arg.parse().ok())
        .unwrap_or(1_000_000);
    let registry = Arc::new(ShardedRegistry::new(RegistryOptions::default()).expect("options"));
    for uid in 0..sessions {
        let request = LoginRequest {
            uid,
            device: "ios",
            gateway: "gateway-1",
            conn: uid,
            ttl_ms: 30_000,
            meta: None,
        };
        registry.login(&request, 1_000 + uid % 900).expect("login");
    }
    let ticking = Arc::new(AtomicBool::new(true));
    let reader = {
        let (registry, ticking) = (registry.clone(), ticking.clone());
        std::thread::spawn(move || {
            let mut latencies: Vec<Duration> = Vec::new();
            let mut uid = 12_345u64;
            while ticking.load(Ordering::Relaxed) {
                uid = uid.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                let start = Instant::now();
                let found = registry.lookup(uid % sessions);
                latencies.push(start.elapsed());
                std::hint::black_box(found);
            }
            latencies
        })
    };
    std::thread::sleep(Duration::from_millis(20));
    let start = Instant::now();
    let events = registry.tick(60_000);
    let tick_duration = start.elapsed();
    ticking.store(false, Ordering::Relaxed);
    let mut latencies = reader.join().expect("reader thread");
    latencies.sort();
    let percentile = |p: f64| latencies[((latencies.len() - 1) as f64 * p) as usize];
    println!(
        "expired {} sessions in {:?} ({:.0} ns each)",
        events.len(),
        tick_duration,
        tick_duration.as_nanos() as f64 / events.len().max(1) as f64
    );
    println!(
        "{} lookups during the tick: p50 {:?}, p99 {:?}, p99.9 {:?}, max {:?}",
        latencies.len(),
        percentile(0.50),
        percentile(0.99),
        percentile(0.999),
        latencies[latencies.len() - 1]
    );
}
