//! Workloads and key distributions of `imstate bench`.
//!
//! The same workload and the same key stream drive every target, so that results compare.

use clap::ValueEnum;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Zipf};

use super::BenchArgs;

/// What each request does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Workload {
    /// One id per request (imstate Next).
    SeqNext,
    /// `--batch` ids per request (imstate NextBatch), as for a group message fan-out.
    SeqFanout,
}

impl Workload {
    /// The workload's name as on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Workload::SeqNext => "seq-next",
            Workload::SeqFanout => "seq-fanout",
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

/// Draws keys for one task; seeded per task so runs repeat.
pub struct KeyPicker {
    rng: SmallRng,
    keys: u64,
    zipf: Option<Zipf<f64>>,
    /// How many ids one batch request holds.
    pub batch: usize,
}

impl KeyPicker {
    /// A picker for `args`, seeded with `seed`.
    pub fn new(args: &BenchArgs, seed: u64) -> Self {
        let zipf = (args.dist == Dist::Zipf)
            .then(|| Zipf::new(args.keys, 1.0).expect("keys >= 1 and exponent > 0"));
        Self {
            rng: SmallRng::seed_from_u64(seed),
            keys: args.keys,
            zipf,
            batch: args.batch,
        }
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
}
