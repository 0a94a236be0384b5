//! Workloads and key distributions of `imstate bench`.
//!
//! The same workload and the same key stream drive every target, so that results compare. Each
//! workload has a default batch size (ids or uids per request) used when `--batch` is not given.
//!
//! Presence workloads act on a fixed session layout, identical for both targets, so that the
//! sessions a heartbeat or a lookup names exist on both:
//!
//! ```text
//!  preloaded session of uid u (u < preload): device d{u%3}, gateway gw{u%16}, conn 3u + u%3
//!  login n of uid u (presence-login):        device d{n%3}, gateway gw{n%16}, conn 3u + n%3
//!                                            with u drawn from [keys, 2 keys), so logins never
//!                                            move a preloaded session to another gateway
//! ```

use clap::ValueEnum;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Zipf};

/// Number of gateways the sessions are spread over (`gw0` .. `gw15`).
pub const GATEWAYS_COUNT: u64 = 16;
/// Number of device kinds (`d0` .. `d2`); one session per (uid, device).
pub const DEVICES_COUNT: u64 = 3;

/// What each request does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Workload {
    /// One id per request (imstate Next; Redis INCR).
    SeqNext,
    /// `--batch` ids per request, default 100 (imstate NextBatch; Redis pipelined INCR or a
    /// Lua script), as for a group message fan-out.
    SeqFanout,
    /// One login per request (imstate Login; Redis HSET user:{uid} {conn} {gateway} + EXPIRE).
    PresenceLogin,
    /// A gateway's heartbeats, `--batch` sessions per request, default 1,000 (imstate
    /// HeartbeatBatch; Redis pipelined EXPIRE).
    PresenceHeartbeatBatch,
    /// `--batch` uids per request, default 500 (imstate LookupBatch; Redis pipelined HGETALL).
    PresenceLookupBatch,
    /// A message send to a group of `--batch` uids, default 100: a lookup-batch of the group,
    /// then a seq-fanout for the same ids.
    Mixed,
}

impl Workload {
    /// Every workload, in the order `--compare` runs them.
    pub const ALL: [Workload; 6] = [
        Workload::SeqNext,
        Workload::SeqFanout,
        Workload::PresenceLogin,
        Workload::PresenceHeartbeatBatch,
        Workload::PresenceLookupBatch,
        Workload::Mixed,
    ];

    /// The workload's name as on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Workload::SeqNext => "seq-next",
            Workload::SeqFanout => "seq-fanout",
            Workload::PresenceLogin => "presence-login",
            Workload::PresenceHeartbeatBatch => "presence-heartbeat-batch",
            Workload::PresenceLookupBatch => "presence-lookup-batch",
            Workload::Mixed => "mixed",
        }
    }

    /// Parses a name as on the command line.
    pub fn from_name(name: &str) -> Option<Workload> {
        Workload::ALL.into_iter().find(|w| w.name() == name)
    }

    /// Ids or uids per request when `--batch` is not given.
    pub fn default_batch(self) -> usize {
        match self {
            Workload::SeqNext | Workload::PresenceLogin => 1,
            Workload::SeqFanout | Workload::Mixed => 100,
            Workload::PresenceHeartbeatBatch => 1_000,
            Workload::PresenceLookupBatch => 500,
        }
    }

    /// Whether a request carries one id (so ops/s is the metric that compares).
    pub fn is_single(self) -> bool {
        matches!(self, Workload::SeqNext | Workload::PresenceLogin)
    }

    /// Whether the workload needs preloaded sessions.
    pub fn needs_sessions(self) -> bool {
        matches!(
            self,
            Workload::PresenceHeartbeatBatch | Workload::PresenceLookupBatch | Workload::Mixed
        )
    }

    /// The metric that compares: "ops/s" for single-id and mixed workloads, "items/s" for
    /// batch workloads.
    pub fn metric(self) -> &'static str {
        match self {
            Workload::SeqNext | Workload::PresenceLogin | Workload::Mixed => "ops/s",
            _ => "items/s",
        }
    }
}

/// How keys are drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Dist {
    /// Every key equally likely.
    Uniform,
    /// Zipf with exponent 1.0: a few hot inboxes, a long tail.
    Zipf,
}

/// One preloaded session: the layout both targets store (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionKey {
    /// User id.
    pub uid: u64,
    /// Device index in `0..DEVICES_COUNT`.
    pub device: u64,
    /// Gateway index in `0..GATEWAYS_COUNT`.
    pub gateway: u64,
    /// Connection id, unique per (uid, device).
    pub conn: u64,
}

impl SessionKey {
    /// The preloaded session of `uid`.
    pub fn preloaded(uid: u64) -> Self {
        Self::login(uid, uid)
    }

    /// The session login number `n` of `uid` creates.
    pub fn login(uid: u64, n: u64) -> Self {
        let device = n % DEVICES_COUNT;
        Self {
            uid,
            device,
            gateway: n % GATEWAYS_COUNT,
            conn: uid * DEVICES_COUNT + device,
        }
    }

    /// The device name.
    pub fn device_name(&self) -> String {
        format!("d{}", self.device)
    }

    /// The gateway name.
    pub fn gateway_name(&self) -> String {
        gateway_name(self.gateway)
    }
}

/// The name of gateway `index`.
pub fn gateway_name(index: u64) -> String {
    format!("gw{index}")
}

/// Draws keys for one task; seeded per task so runs repeat.
pub struct KeyPicker {
    rng: SmallRng,
    keys: u64,
    zipf: Option<Zipf<f64>>,
    /// How many ids one batch request holds.
    pub batch: usize,
    /// Requests drawn so far (the `n` of a login).
    pub counter: u64,
}

impl KeyPicker {
    /// A picker over `keys` keys with `dist`, `batch` keys per batch, seeded with `seed`.
    pub fn new(keys: u64, dist: Dist, batch: usize, seed: u64) -> anyhow::Result<Self> {
        let zipf = match dist {
            Dist::Zipf => Some(
                Zipf::new(keys, 1.0)
                    .map_err(|error| anyhow::anyhow!("zipf over {keys}: {error}"))?,
            ),
            Dist::Uniform => None,
        };
        Ok(Self {
            rng: SmallRng::seed_from_u64(seed),
            keys,
            zipf,
            batch,
            counter: seed.wrapping_mul(0x9E37_79B9),
        })
    }

    /// One key in [0, keys).
    pub fn key(&mut self) -> u64 {
        match &self.zipf {
            Some(zipf) => (zipf.sample(&mut self.rng) as u64).saturating_sub(1),
            None => self.rng.gen_range(0..self.keys),
        }
    }

    /// `batch` keys.
    pub fn keys(&mut self) -> Vec<u64> {
        (0..self.batch).map(|_| self.key()).collect()
    }

    /// The next login: a uid in [keys, 2 keys) and its login number.
    pub fn login(&mut self) -> SessionKey {
        let uid = self.keys + self.key();
        self.counter = self.counter.wrapping_add(1);
        SessionKey::login(uid, self.counter)
    }

    /// A gateway and `batch` preloaded sessions of it (uids below `keys`, which must be the
    /// preload count): what one gateway sends in a heartbeat batch.
    pub fn heartbeat_batch(&mut self) -> (u64, Vec<SessionKey>) {
        let gateway = self.rng.gen_range(0..GATEWAYS_COUNT);
        let per_gateway = (self.keys.saturating_sub(gateway))
            .div_ceil(GATEWAYS_COUNT)
            .max(1);
        let sessions = (0..self.batch)
            .map(|_| {
                let index = match &self.zipf {
                    Some(zipf) => (zipf.sample(&mut self.rng) as u64).saturating_sub(1),
                    None => self.rng.gen_range(0..self.keys),
                } % per_gateway;
                SessionKey::preloaded(index * GATEWAYS_COUNT + gateway)
            })
            .collect();
        (gateway, sessions)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_batches_name_sessions_of_their_gateway() {
        let mut picker = KeyPicker::new(1_000, Dist::Uniform, 100, 7).expect("picker");
        for _ in 0..50 {
            let (gateway, sessions) = picker.heartbeat_batch();
            for session in sessions {
                assert!(session.uid < 1_000);
                assert_eq!(session.gateway, gateway);
                assert_eq!(session, SessionKey::preloaded(session.uid));
            }
        }
    }

    #[test]
    fn logins_never_touch_preloaded_uids() {
        let mut picker = KeyPicker::new(1_000, Dist::Zipf, 1, 3).expect("picker");
        for _ in 0..1_000 {
            let login = picker.login();
            assert!((1_000..2_000).contains(&login.uid));
            assert_eq!(login.conn, login.uid * 3 + login.device);
        }
    }
}
