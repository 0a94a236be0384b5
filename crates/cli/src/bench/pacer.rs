//! Paces a load at a fixed total rate, with sub-millisecond precision.
//!
//! tokio's timer fires on a 1 ms grid, so tasks that sleep until their own send times are late
//! by up to 1 ms, and measuring latency from the scheduled time (as a paced run must, so that a
//! stall is not hidden) would add that lateness to every request of every target. Instead one
//! OS thread wakes every [`TICK`] and releases the sends that are due as semaphore permits; the
//! k-th permit taken is scheduled at `started + k / rate`. A task that finds permits waiting
//! (the client is behind) still measures from the scheduled time.
//!
//! ```text
//!  pacer thread: every TICK, permits released = ⌊elapsed × rate⌋ + 1
//!  task: acquire ──► k = taken++ ──► scheduled = started + k / rate ──► send ──► latency
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

/// How often the pacer thread releases due sends; the most a send is late because of pacing.
pub const TICK: Duration = Duration::from_micros(50);

/// Hands out send times at `rate` per second until `stop_at`.
pub struct Pacer {
    permits: Arc<Semaphore>,
    taken: AtomicU64,
    started: Instant,
    period: Duration,
}

impl Pacer {
    /// Starts the pacer thread; sends are scheduled from `started` until `stop_at`.
    pub fn start(rate: f64, started: Instant, stop_at: Instant) -> anyhow::Result<Arc<Self>> {
        let pacer = Arc::new(Self {
            permits: Arc::new(Semaphore::new(0)),
            taken: AtomicU64::new(0),
            started,
            period: Duration::from_secs_f64(1.0 / rate),
        });
        let permits = Arc::clone(&pacer.permits);
        std::thread::Builder::new()
            .name("bench-pacer".into())
            .spawn(move || {
                let mut released = 0u64;
                loop {
                    let now = Instant::now();
                    if now >= stop_at {
                        // Waiting tasks wake with an error and stop.
                        permits.close();
                        return;
                    }
                    let due = (now.duration_since(started).as_secs_f64() * rate) as u64 + 1;
                    if due > released {
                        permits.add_permits((due - released) as usize);
                        released = due;
                    }
                    std::thread::sleep(TICK);
                }
            })?;
        Ok(pacer)
    }

    /// Waits for the next send; returns its scheduled time, or `None` once the run is over.
    pub async fn next(&self) -> Option<Instant> {
        self.permits.acquire().await.ok()?.forget();
        let k = self.taken.fetch_add(1, Ordering::Relaxed);
        Some(self.started + self.period.mul_f64(k as f64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sends_follow_the_rate_and_stop_at_the_end() {
        let started = Instant::now();
        let pacer = Pacer::start(2_000.0, started, started + Duration::from_millis(200)).unwrap();
        let mut times = Vec::new();
        while let Some(at) = pacer.next().await {
            // Never handed out before its scheduled time (give or take the clock's rounding).
            assert!(Instant::now() + Duration::from_micros(1) >= at);
            times.push(at);
        }
        // 2,000/s for 0.2 s: about 400 sends, each 0.5 ms after the previous one
        // (Fewer if this task fell behind and the run closed first: the machine may be busy.)
        assert!((300..=402).contains(&times.len()), "{}", times.len());
        for pair in times.windows(2) {
            let gap = pair[1].duration_since(pair[0]);
            assert!(gap.abs_diff(Duration::from_micros(500)) < Duration::from_micros(2));
        }
    }
}
