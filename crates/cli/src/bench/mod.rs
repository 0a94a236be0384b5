//! `imstate bench`: a load generator in the spirit of redis-benchmark.
//!
//! ```text
//!  connections × inflight tasks ──► target driver (one call = one request) ──► per-task
//!  HdrHistogram + counters ──► merged at the end ──► table on stdout, JSON file
//! ```
//!
//! Each connection is its own TCP connection; `--inflight D` tasks share it, so D requests are
//! in flight per connection (HTTP/2 streams for imstate). Latency is measured per request from
//! send to reply. The first `--warmup` seconds are run but not recorded.

mod imstate;
mod workload;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use hdrhistogram::Histogram;
use serde::Serialize;

pub use workload::{Dist, KeyPicker, Workload};

#[derive(Args, Clone)]
pub struct BenchArgs {
    /// What to load: imstate://HOST:PORT (redis:// is not built yet).
    #[arg(long, default_value = "imstate://127.0.0.1:7700")]
    pub target: String,
    /// The workload.
    #[arg(long, value_enum, default_value_t = Workload::SeqNext)]
    pub workload: Workload,
    /// TCP connections.
    #[arg(long, default_value_t = 50)]
    pub connections: usize,
    /// Requests in flight per connection.
    #[arg(long, default_value_t = 1)]
    pub inflight: usize,
    /// Measured seconds (after the warm-up).
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Warm-up seconds, run but not recorded.
    #[arg(long, default_value_t = 1)]
    pub warmup: u64,
    /// Distinct ids (keys) drawn from.
    #[arg(long, default_value_t = 1_000_000)]
    pub keys: u64,
    /// Key distribution.
    #[arg(long, value_enum, default_value_t = Dist::Uniform)]
    pub dist: Dist,
    /// Ids per request for batch workloads.
    #[arg(long, default_value_t = 100)]
    pub batch: usize,
    /// Sequence namespace.
    #[arg(long, default_value = "default")]
    pub ns: String,
    /// Write the result as JSON to this file.
    #[arg(long)]
    pub json_out: Option<PathBuf>,
    /// No progress line.
    #[arg(long)]
    pub quiet: bool,
}

/// The result of one run: what the JSON file holds.
#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    pub workload: String,
    pub target: String,
    pub ops_per_sec: f64,
    pub items_per_sec: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub errors: u64,
    pub ops: u64,
    pub items: u64,
    pub connections: usize,
    pub inflight: usize,
    pub duration_s: f64,
    pub keys: u64,
    pub dist: String,
    pub batch: usize,
}

/// One request generator bound to one connection.
pub trait Driver: Send + Sync + 'static {
    /// Sends one request of the workload; returns the number of items (ids) it covered.
    fn call(
        &self,
        keys: &mut KeyPicker,
    ) -> impl std::future::Future<Output = anyhow::Result<u64>> + Send;
}

struct Counters {
    ops: AtomicU64,
    errors: AtomicU64,
}

pub async fn run(args: BenchArgs) -> anyhow::Result<BenchResult> {
    validate(&args)?;
    let Some(address) = args.target.strip_prefix("imstate://") else {
        bail!(
            "unsupported target `{}`: use imstate://HOST:PORT (the Redis target is not built yet)",
            args.target
        );
    };
    let mut drivers = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        drivers.push(Arc::new(
            imstate::ImstateDriver::connect(address, &args)
                .await
                .with_context(|| format!("connecting to {address}"))?,
        ));
    }
    drive(&args, drivers).await
}

fn validate(args: &BenchArgs) -> anyhow::Result<()> {
    if args.connections == 0 || args.inflight == 0 || args.duration == 0 || args.keys == 0 {
        bail!("--connections, --inflight, --duration and --keys must be at least 1");
    }
    if args.batch == 0 || args.batch > 10_000 {
        bail!("--batch must be between 1 and 10000 (the server's default batch_ids_max)");
    }
    Ok(())
}

async fn drive<D: Driver>(args: &BenchArgs, drivers: Vec<Arc<D>>) -> anyhow::Result<BenchResult> {
    let counters = Arc::new(Counters {
        ops: AtomicU64::new(0),
        errors: AtomicU64::new(0),
    });
    let started = Instant::now();
    let record_from = started + Duration::from_secs(args.warmup);
    let stop_at = record_from + Duration::from_secs(args.duration);
    let mut tasks = Vec::new();
    for (connection, driver) in drivers.iter().enumerate() {
        for slot in 0..args.inflight {
            let driver = Arc::clone(driver);
            let counters = Arc::clone(&counters);
            let mut keys = KeyPicker::new(args, (connection * args.inflight + slot) as u64);
            tasks.push(tokio::spawn(async move {
                let mut histogram =
                    Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
                let (mut ops, mut items, mut errors) = (0u64, 0u64, 0u64);
                loop {
                    let sent = Instant::now();
                    if sent >= stop_at {
                        break;
                    }
                    let result = driver.call(&mut keys).await;
                    let recorded = sent >= record_from;
                    match result {
                        Ok(count) if recorded => {
                            let micros = sent.elapsed().as_micros() as u64;
                            histogram.saturating_record(micros.max(1));
                            ops += 1;
                            items += count;
                            counters.ops.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(_) => {}
                        Err(_) => {
                            if recorded {
                                errors += 1;
                            }
                            counters.errors.fetch_add(1, Ordering::Relaxed);
                            // Back off a little so a dead target does not spin the CPU.
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                }
                (histogram, ops, items, errors)
            }));
        }
    }
    let done = Arc::new(AtomicBool::new(false));
    let progress = (!args.quiet).then(|| {
        let counters = Arc::clone(&counters);
        let done = Arc::clone(&done);
        let label = format!("{} {}", args.workload.name(), args.target);
        tokio::spawn(async move {
            let mut last = 0;
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            while !done.load(Ordering::Relaxed) {
                tick.tick().await;
                let ops = counters.ops.load(Ordering::Relaxed);
                eprint!(
                    "\r[{:>4.0}s] {label}: {:>10} ops/s, {} errors   ",
                    started.elapsed().as_secs_f64(),
                    ops - last,
                    counters.errors.load(Ordering::Relaxed)
                );
                last = ops;
            }
        })
    });
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
    let (mut ops, mut items, mut errors) = (0, 0, 0);
    for task in tasks {
        let (task_histogram, task_ops, task_items, task_errors) = task.await?;
        histogram
            .add(&task_histogram)
            .context("merging histograms")?;
        ops += task_ops;
        items += task_items;
        errors += task_errors;
    }
    done.store(true, Ordering::Relaxed);
    if let Some(progress) = progress {
        progress.abort();
        eprintln!();
    }
    let seconds = args.duration as f64;
    Ok(BenchResult {
        workload: args.workload.name().to_string(),
        target: args.target.clone(),
        ops_per_sec: ops as f64 / seconds,
        items_per_sec: items as f64 / seconds,
        p50_us: histogram.value_at_quantile(0.50) as f64,
        p99_us: histogram.value_at_quantile(0.99) as f64,
        p999_us: histogram.value_at_quantile(0.999) as f64,
        errors,
        ops,
        items,
        connections: args.connections,
        inflight: args.inflight,
        duration_s: seconds,
        keys: args.keys,
        dist: format!("{:?}", args.dist).to_lowercase(),
        batch: args.batch,
    })
}

/// Prints the result table.
pub fn print_table(results: &[BenchResult]) {
    println!(
        "{:<14} {:<28} {:>5} {:>4} {:>5} {:>12} {:>12} {:>8} {:>8} {:>8} {:>6}",
        "workload",
        "target",
        "conns",
        "infl",
        "batch",
        "ops/s",
        "items/s",
        "p50_us",
        "p99_us",
        "p999_us",
        "errors"
    );
    for r in results {
        println!(
            "{:<14} {:<28} {:>5} {:>4} {:>5} {:>12.0} {:>12.0} {:>8.0} {:>8.0} {:>8.0} {:>6}",
            r.workload,
            r.target,
            r.connections,
            r.inflight,
            r.batch,
            r.ops_per_sec,
            r.items_per_sec,
            r.p50_us,
            r.p99_us,
            r.p999_us,
            r.errors
        );
    }
}

/// Runs the bench command: one run, a table, and the JSON file if asked.
pub fn command(args: BenchArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(run(args.clone()))?;
    print_table(std::slice::from_ref(&result));
    if let Some(path) = &args.json_out {
        std::fs::write(path, serde_json::to_string_pretty(&[&result])?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
