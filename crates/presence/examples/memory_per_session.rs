//! Measures heap bytes per session with a counting global allocator.
//!
//! ```text
//! cargo run --release -p imstate-presence --example memory_per_session -- [sessions]
//! ```
//!
//! Scenarios: one session per uid (the common case), 1.5 sessions per uid, and 10% of the
//! sessions carrying 32 bytes of metadata. Bytes are live heap bytes requested from the
//! allocator (allocator bookkeeping not included), divided by the number of sessions, after
//! subtracting the empty registry (its fixed cost is printed separately).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use imstate_presence::{LoginRequest, RegistryOptions, ShardedRegistry};

struct Counting;

static LIVE_BYTES: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator; only counters are added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: same layout contract as the caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: `ptr` was allocated by `System` with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE_BYTES.fetch_add(new_size, Ordering::Relaxed);
        LIVE_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: `ptr` was allocated by `System` with `layout`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const DEVICES: [&str; 4] = ["ios", "android", "pc", "web"];

fn live_bytes() -> usize {
    LIVE_BYTES.load(Ordering::Relaxed)
}

/// Fills a fresh registry and returns (fixed bytes, bytes per session).
fn measure(sessions: u64, sessions_per_uid: f64, meta_every: u64) -> (usize, f64) {
    let gateways: Vec<String> = (0..200)
        .map(|index| format!("gateway-{index:03}:9000"))
        .collect();
    let meta = [0xABu8; 32];
    let before = live_bytes();
    let registry = ShardedRegistry::new(RegistryOptions::default()).expect("default options");
    let fixed = live_bytes() - before;
    let uids = (sessions as f64 / sessions_per_uid) as u64;
    for index in 0..sessions {
        let uid_index = index % uids;
        // Spread uids like real ids: large, sparse, in every shard.
        let uid = uid_index.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 20;
        let device = DEVICES[(index / uids) as usize % DEVICES.len()];
        let request = LoginRequest {
            uid,
            device,
            gateway: &gateways[(index % 200) as usize],
            conn: index,
            ttl_ms: 90_000,
            meta: (meta_every != 0 && index % meta_every == 0).then_some(&meta[..]),
        };
        registry
            .login(&request, 1_700_000_000_000 + index)
            .expect("login");
    }
    assert_eq!(registry.online_count(), sessions);
    let per_session = (live_bytes() - before - fixed) as f64 / sessions as f64;
    drop(registry);
    (fixed, per_session)
}

fn main() {
    let sessions: u64 = std::env::args()
        .nth(1)
        .and_then(|arg| arg.parse().ok())
        .unwrap_or(1_000_000);
    println!("sessions: {sessions}, shards: 64, record: 36 B");
    for (label, per_uid, meta_every) in [
        ("1 session per uid, no metadata", 1.0, 0),
        ("1.5 sessions per uid, no metadata", 1.5, 0),
        ("1 session per uid, 10% with 32 B metadata", 1.0, 10),
    ] {
        let (fixed, per_session) = measure(sessions, per_uid, meta_every);
        println!("{label}: {per_session:.1} bytes/session (+ {fixed} B fixed registry cost)");
    }
}
