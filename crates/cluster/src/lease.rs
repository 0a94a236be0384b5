//! The timing rules of ownership (S3), all on a node's own monotonic clock.
//!
//! ```text
//!  node A (owner)   confirm sent at T ──► coordinator: my member key is alive and the
//!                   route table is still version R  ──► A may serve R's sections until T + window
//!                   (window = 2/3 TTL: two confirm periods)
//!  arbiter          A's lease lapses, or A is drained: writes version R' moving A's sections
//!  node B           reads R' at T_B ──► serves the moved sections from T_B + lock_delay
//! ```
//!
//! Why two nodes never serve one section at once: every confirm that A sends after R' was
//! written returns R' (A then drops the sections), so A's last window is anchored at a send
//! time before R' existed, hence before T_B. With every node's clock within
//! [`RATE_SKEW_MAX`] of true time, A's window ends at most `window / (1 - ρ)` after its
//! anchor, and B waits at least `lock_delay / (1 + ρ)` after T_B; `lock_delay >= window ×
//! (1 + ρ) / (1 - ρ)` closes the gap. Nothing here depends on when the coordinator ends a
//! lease: the lease only decides when the arbiter moves sections (liveness), the confirm and
//! the lock-delay decide who may serve (safety), and the fence on raises
//! ([`crate::member::Member::raise_txn`]) keeps a deposed owner's late write out of the store.

use imstate_coord::Millis;

/// The bound on clock-rate error this design tolerates: each node's monotonic clock runs
/// within ±3% of true time (NTP slews at most 0.05%; a VM's clock is far better than 3%).
pub const RATE_SKEW_MAX: f64 = 0.03;

/// Timing of leases and ownership, derived from the lease TTL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseRules {
    /// The coordinator lease's time to live (`cluster.lease_ttl_ms`).
    pub ttl_ms: u64,
}

impl LeaseRules {
    /// Rules for a lease of `ttl_ms` (at least 30 ms, so every derived time is non-zero).
    pub fn new(ttl_ms: u64) -> Self {
        Self {
            ttl_ms: ttl_ms.max(30),
        }
    }

    /// How often a node sends a keep-alive and a confirm: three chances per TTL.
    pub fn renew_every_ms(&self) -> Millis {
        self.ttl_ms / 3
    }

    /// How long a request to the coordinator may go unanswered before another is sent.
    pub fn request_timeout_ms(&self) -> Millis {
        self.ttl_ms / 3
    }

    /// How long after sending a successful confirm a node may serve: two thirds of the TTL,
    /// two confirm periods (one failed confirm does not stop a node; two in a row do). Safety
    /// does not depend on it matching the lease; failover time does (it adds a lock-delay).
    pub fn window_ms(&self) -> Millis {
        self.ttl_ms * 2 / 3
    }

    /// How long a node waits after reading a table that hands it sections from another owner
    /// (or after it starts) before it serves them: `window × 17/16`, which covers a rate skew
    /// of up to [`RATE_SKEW_MAX`] on both clocks.
    pub fn lock_delay_ms(&self) -> Millis {
        #[cfg(feature = "planted-no-lock-delay")]
        {
            0
        }
        #[cfg(not(feature = "planted-no-lock-delay"))]
        {
            self.window_ms() + self.window_ms().div_ceil(16)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(not(feature = "planted-no-lock-delay"))]
    #[test]
    fn the_lock_delay_covers_the_window_under_the_skew_bound() {
        for ttl in [30u64, 100, 1_000, 3_000, 10_000] {
            let rules = LeaseRules::new(ttl);
            let rho = RATE_SKEW_MAX;
            let old_owner_until = rules.window_ms() as f64 / (1.0 - rho);
            let new_owner_from = rules.lock_delay_ms() as f64 / (1.0 + rho);
            assert!(new_owner_from >= old_owner_until, "ttl {ttl}");
            assert!(rules.renew_every_ms() > 0 && rules.renew_every_ms() < rules.window_ms());
        }
    }
}
