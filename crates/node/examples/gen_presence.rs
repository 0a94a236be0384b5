//! Writes a presence data directory for restart and expiry measurements, through the real
//! presence store (registry + journal + log engine), exactly as a running node would.
//!
//! `cargo run --release -p imstate-node --example gen_presence -- DATA_DIR SESSIONS TTL_S
//! EXPIRE_IN_S [checkpoint|log-only]` logs in SESSIONS sessions (uid = 0..SESSIONS, one per
//! uid, 3 device kinds, 200 gateways) whose last heartbeat is set so that they all expire
//! EXPIRE_IN_S seconds after the generator finishes, then shuts the store down cleanly.
//!
//! - By default the store runs with the node's default checkpoint settings, so the clean
//!   shutdown writes a checkpoint when the log is long (as a node stopped by SIGTERM does).
//! - `checkpoint` also writes one explicitly before shutting down (same result, reported).
//! - `log-only` disables checkpoints: the restart replays the whole log, as after a kill -9
//!   of a node that never checkpointed.

use std::sync::Arc;

use imstate_log::{FileStorage, FsyncPolicy};
use imstate_node::clock::{Clock, ManualClock, SystemClock};
use imstate_node::presencestore::{PresenceStore, PresenceStoreOptions};
use imstate_presence::LoginRequest;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: gen_presence DATA_DIR SESSIONS TTL_S EXPIRE_IN_S [checkpoint|log-only]";
    if args.len() < 5 {
        return Err(usage.into());
    }
    let sessions: u64 = args[2].parse()?;
    let ttl_ms: u64 = args[3].parse::<u64>()? * 1000;
    let expire_in_ms: u64 = args[4].parse::<u64>()? * 1000;
    let checkpoint = args.get(5).is_some_and(|a| a == "checkpoint");
    let log_only = args.get(5).is_some_and(|a| a == "log-only");
    let dir = std::path::Path::new(&args[1]).join("presence");
    std::fs::create_dir_all(&dir)?;
    // The clock is set back so that every session's deadline lands EXPIRE_IN_S from now.
    let clock = Arc::new(ManualClock::new(
        SystemClock.now_ms() + expire_in_ms - ttl_ms,
    ));
    let defaults = PresenceStoreOptions::default();
    let options = PresenceStoreOptions {
        fsync: FsyncPolicy::Never,
        tick_ms: 1_000,
        checkpoint_log_bytes: if log_only {
            0
        } else {
            defaults.checkpoint_log_bytes
        },
        ..defaults
    };
    let (store, _) = PresenceStore::open(FileStorage::new(&dir)?, options, clock.clone())?;
    let devices = ["phone", "pad", "web"];
    let gateways: Vec<String> = (0..200).map(|i| format!("gateway-{i:03}")).collect();
    let started = std::time::Instant::now();
    for uid in 0..sessions {
        let request = LoginRequest {
            uid,
            device: devices[(uid % 3) as usize],
            gateway: &gateways[(uid % 200) as usize],
            conn: uid,
            ttl_ms: ttl_ms as u32,
            meta: None,
        };
        store.registry().login(&request, clock.now_ms())?;
    }
    store.log().wait_durable(store.log().last_lsn())?;
    if checkpoint {
        let stats = store.checkpoint()?;
        println!("checkpoint: {} bytes in {:?}", stats.bytes, stats.elapsed);
    }
    store.shutdown()?;
    println!(
        "{sessions} sessions in {:?}; log {} bytes; they expire {}s from now",
        started.elapsed(),
        store.log().stats().bytes_written,
        expire_in_ms / 1000
    );
    Ok(())
}
