//! `imstate bench`: a load generator in the spirit of redis-benchmark, for imstate and Redis.
//!
//! ```text
//!  connections × inflight tasks ──► target driver (one call = one request) ──► per-task
//!  HdrHistogram + counters ──► merged at the end ──► table on stdout, JSON file
//!
//!  modes:  (default)   one run of --workload against --target
//!          --compare   imstate and Redis alternately, --rounds per case, median ratios,
//!                      half-load p99, JSON + markdown + PNG chart        (compare.rs)
//!          --memory    --sessions into each target, bytes per session    (memory.rs)
//! ```
//!
//! Each connection is its own TCP connection; `--inflight D` tasks share it, so D requests are
//! in flight per connection: a pipeline of wire frames for imstate (`imstate://`, the node's
//! wire listener), HTTP/2 streams for imstate over gRPC (`imstate+grpc://`), a RESP pipeline
//! for Redis. The wire and RESP clients are the same pipelining code
//! (`imstate_wire::pipeline`) with a different parser. Latency is
//! measured per request from send to reply (from the scheduled send time when `--rate` paces
//! the load, so a stall is not hidden). The first `--warmup` seconds are run but not recorded;
//! both targets get the same warm-up. Presence workloads that read sessions first log in
//! `--preload` sessions (untimed), with the same layout on both targets (see workload.rs).

mod chart;
mod compare;
mod imstate;
mod memory;
mod pacer;
mod redis;
mod resp;
mod workload;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use hdrhistogram::Histogram;
use serde::Serialize;

pub use redis::RedisFanout;
pub use workload::{Dist, KeyPicker, SessionKey, Workload};

/// Sessions one preload request carries (a Redis pipeline; imstate logs them in one by one).
const PRELOAD_CHUNK_SESSIONS: u64 = 1_000;
/// Concurrent preload requests per connection.
const PRELOAD_INFLIGHT: usize = 16;

#[derive(Args, Clone)]
#[command(after_help = "\
Modes:
  (default)  one run:    imstate bench --target redis://127.0.0.1:6379 --workload seq-fanout
  --compare  imstate and Redis alternately, --rounds per case, median ratio imstate/Redis:
             imstate bench --compare --imstate 127.0.0.1:7702 --redis 127.0.0.1:6379 \\
                 --cases seq-next,seq-next:16,presence-lookup-batch --rounds 3 --duration 5
             A case is WORKLOAD or WORKLOAD:INFLIGHT. The metric is ops/s for single-id
             workloads and mixed, items/s (ids, uids, sessions) for batch workloads.
  --memory   load --sessions sessions into each target, report bytes per session
             (imstate: VmRSS delta of --imstate-pid; Redis: INFO memory used_memory delta):
             imstate bench --memory --sessions 1000000 --imstate 127.0.0.1:7702 \\
                 --imstate-pid 1234 --redis 127.0.0.1:6379")]
pub struct BenchArgs {
    /// TLS and token options for an imstate target (as for every client command).
    #[command(flatten)]
    pub security: crate::seq::Security,
    /// What to load: imstate://HOST:PORT (the node's wire protocol, `wire_listen`),
    /// imstate+grpc://HOST:PORT (its gRPC port, `listen`), a cluster through any node with
    /// the smart client: imstate+cluster://HOST:PORT (gRPC) or imstate+wire-cluster://HOST:PORT
    /// (wire), or redis://HOST:PORT.
    #[arg(long, default_value = "imstate://127.0.0.1:7702")]
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
    /// Distinct ids (keys) drawn from; for presence reads, the preloaded uids.
    #[arg(long, default_value_t = 1_000_000)]
    pub keys: u64,
    /// Key distribution.
    #[arg(long, value_enum, default_value_t = Dist::Uniform)]
    pub dist: Dist,
    /// Ids per request for batch workloads [default: seq-fanout 100, heartbeat 1000,
    /// lookup 500, mixed 100].
    #[arg(long)]
    pub batch: Option<usize>,
    /// Sessions logged in (untimed) before a presence workload [default: --keys for
    /// presence-heartbeat-batch, presence-lookup-batch and mixed; 0 otherwise].
    #[arg(long)]
    pub preload: Option<u64>,
    /// Session ttl in seconds, the same on both targets (imstate ttl_ms; Redis EXPIRE). Long
    /// enough by default that no preloaded session expires during a run.
    #[arg(long, default_value_t = 3_600)]
    pub ttl: u64,
    /// Total requests per second to pace the load at (0 = as fast as possible).
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// How Redis serves seq-fanout and mixed: pipelined INCRs or one EVALSHA.
    #[arg(long, value_enum, default_value_t = RedisFanout::Pipeline)]
    pub redis_fanout: RedisFanout,
    /// Sequence namespace (imstate).
    #[arg(long, default_value = "default")]
    pub ns: String,
    /// Write the results as JSON to this file.
    #[arg(long)]
    pub json_out: Option<PathBuf>,
    /// No progress line.
    #[arg(long)]
    pub quiet: bool,

    /// Compare and memory mode flags, boxed so the `Command` enum of main.rs stays small.
    #[command(flatten)]
    pub modes: Box<ModeArgs>,
}

/// The flags of compare and memory modes.
#[derive(Args, Clone)]
pub struct ModeArgs {
    /// Compare mode: run every case against --imstate and --redis alternately.
    #[arg(long, conflicts_with = "memory")]
    pub compare: bool,
    /// Compare mode: rounds per case.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Compare mode: comma-separated cases, WORKLOAD or WORKLOAD:INFLIGHT [default: every
    /// workload at --inflight, plus seq-next at 16 in flight].
    #[arg(long)]
    pub cases: Option<String>,
    /// Compare mode: after the rounds, run single-id cases on both targets at half of
    /// imstate's median peak and report p99.
    #[arg(long)]
    pub half_load: bool,
    /// Compare mode: write a markdown table of the results to this file.
    #[arg(long)]
    pub markdown_out: Option<PathBuf>,
    /// Compare mode: draw the ratios as a PNG chart to this file.
    #[arg(long)]
    pub chart_out: Option<PathBuf>,
    /// TrueType font for the chart's text.
    #[arg(
        long,
        default_value = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
    )]
    pub chart_font: PathBuf,
    /// Compare and memory modes: the imstate node's wire listener, HOST:PORT or
    /// imstate://HOST:PORT (imstate+grpc://HOST:PORT to measure its gRPC port instead).
    #[arg(long)]
    pub imstate: Option<String>,
    /// Compare and memory modes: the Redis server, HOST:PORT or redis://HOST:PORT.
    #[arg(long)]
    pub redis: Option<String>,

    /// Memory mode: load --sessions into each target and report bytes per session.
    #[arg(long)]
    pub memory: bool,
    /// Memory mode: sessions to load.
    #[arg(long, default_value_t = 1_000_000)]
    pub sessions: u64,
    /// Memory mode: pid of the imstate server, whose VmRSS is read from /proc.
    #[arg(long)]
    pub imstate_pid: Option<u32>,
}

/// Where requests go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// An imstate node's wire listener at HOST:PORT (`imstate://`).
    Imstate(String),
    /// An imstate node's gRPC listener at HOST:PORT (`imstate+grpc://`).
    ImstateGrpc(String),
    /// A cluster reached through any node's gRPC listener, with the smart client that
    /// routes each id to its owner and each uid to its slot's primary (`imstate+cluster://`).
    ImstateCluster(String),
    /// The same through any node's wire listener, with the wire smart client
    /// (`imstate+wire-cluster://`).
    ImstateWireCluster(String),
    /// A Redis server at HOST:PORT.
    Redis(String),
}

impl Target {
    /// Parses `imstate://HOST:PORT`, `imstate+grpc://HOST:PORT` or `redis://HOST:PORT`.
    pub fn parse(text: &str) -> anyhow::Result<Target> {
        let target = if let Some(address) = text.strip_prefix("imstate://") {
            Target::Imstate(address.to_string())
        } else if let Some(address) = text.strip_prefix("imstate+grpc://") {
            Target::ImstateGrpc(address.to_string())
        } else if let Some(address) = text.strip_prefix("imstate+cluster://") {
            Target::ImstateCluster(address.to_string())
        } else if let Some(address) = text.strip_prefix("imstate+wire-cluster://") {
            Target::ImstateWireCluster(address.to_string())
        } else if let Some(address) = text.strip_prefix("redis://") {
            Target::Redis(address.to_string())
        } else {
            bail!(
                "unsupported target `{text}`: use imstate://HOST:PORT (wire protocol), \
                 imstate+grpc://HOST:PORT, imstate+cluster://HOST:PORT (gRPC), \
                 imstate+wire-cluster://HOST:PORT or redis://HOST:PORT"
            );
        };
        let address = target.address();
        if address.is_empty() || !address.contains(':') {
            bail!("target `{text}` has no HOST:PORT");
        }
        Ok(target)
    }

    /// Parses an address given to --imstate or --redis, with or without its scheme
    /// (`imstate+grpc://` counts as imstate).
    pub fn with_scheme(text: &str, scheme: &str) -> anyhow::Result<Target> {
        if text.contains("://") {
            let target = Target::parse(text)?;
            if !target.scheme().starts_with(scheme) {
                bail!("--{scheme} expects {scheme}://HOST:PORT or HOST:PORT, got `{text}`");
            }
            Ok(target)
        } else {
            Target::parse(&format!("{scheme}://{text}"))
        }
    }

    /// HOST:PORT.
    pub fn address(&self) -> &str {
        match self {
            Target::Imstate(address)
            | Target::ImstateGrpc(address)
            | Target::ImstateCluster(address)
            | Target::ImstateWireCluster(address)
            | Target::Redis(address) => address,
        }
    }

    /// "imstate", "imstate+grpc" or "redis".
    pub fn scheme(&self) -> &'static str {
        match self {
            Target::Imstate(_) => "imstate",
            Target::ImstateGrpc(_) => "imstate+grpc",
            Target::ImstateCluster(_) => "imstate+cluster",
            Target::ImstateWireCluster(_) => "imstate+wire-cluster",
            Target::Redis(_) => "redis",
        }
    }

    /// The URL form.
    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme(), self.address())
    }
}

/// The parameters of one run, resolved from the flags (compare mode varies them per case).
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub target: Target,
    pub workload: Workload,
    pub connections: usize,
    pub inflight: usize,
    pub duration_s: u64,
    pub warmup_s: u64,
    pub keys: u64,
    pub dist: Dist,
    pub batch: usize,
    pub ttl_s: u64,
    pub rate: f64,
    pub redis_fanout: RedisFanout,
    pub ns: String,
    pub quiet: bool,
    pub security: crate::seq::Security,
}

impl RunConfig {
    /// The configuration of `workload` on `target` from the flags.
    pub fn from_args(args: &BenchArgs, target: Target, workload: Workload) -> Self {
        Self {
            target,
            workload,
            connections: args.connections,
            inflight: args.inflight,
            duration_s: args.duration,
            warmup_s: args.warmup,
            keys: args.keys,
            dist: args.dist,
            batch: args.batch.unwrap_or(workload.default_batch()),
            ttl_s: args.ttl,
            rate: args.rate,
            redis_fanout: args.redis_fanout,
            ns: args.ns.clone(),
            quiet: args.quiet,
            security: args.security.clone(),
        }
    }

    fn validate(&self) -> anyhow::Result<()> {
        if self.connections == 0 || self.inflight == 0 || self.duration_s == 0 || self.keys == 0 {
            bail!("--connections, --inflight, --duration and --keys must be at least 1");
        }
        if self.batch == 0 || self.batch > 10_000 {
            bail!("--batch must be between 1 and 10000 (the server's default batch limits)");
        }
        if self.workload.needs_sessions() && self.keys < workload::GATEWAYS_COUNT {
            bail!(
                "--keys must be at least {} for {} (sessions are spread over that many gateways)",
                workload::GATEWAYS_COUNT,
                self.workload.name()
            );
        }
        if !self.rate.is_finite() || self.rate < 0.0 {
            bail!("--rate must be a non-negative number of requests per second");
        }
        if self.ttl_s == 0 || self.ttl_s > 86_400 {
            bail!("--ttl must be between 1 and 86400 seconds (imstate's default ttl limit)");
        }
        Ok(())
    }
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
    /// Requested total rate (0 = unpaced).
    pub rate: f64,
    /// How Redis served fan-outs ("pipeline" or "lua"; empty for imstate).
    pub redis_fanout: String,
    /// First error message seen, if any.
    pub first_error: Option<String>,
}

impl BenchResult {
    /// The value of `metric` ("ops/s" or "items/s").
    pub fn metric(&self, metric: &str) -> f64 {
        if metric == "ops/s" {
            self.ops_per_sec
        } else {
            self.items_per_sec
        }
    }
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

/// Runs one configuration: connects, then drives the load.
pub async fn run(config: &RunConfig) -> anyhow::Result<BenchResult> {
    config.validate()?;
    match &config.target {
        Target::Imstate(address)
        | Target::ImstateGrpc(address)
        | Target::ImstateCluster(address)
        | Target::ImstateWireCluster(address) => {
            let mut drivers = Vec::with_capacity(config.connections);
            for _ in 0..config.connections {
                drivers.push(Arc::new(
                    imstate::ImstateDriver::connect(&config.target, config)
                        .await
                        .with_context(|| format!("connecting to imstate at {address}"))?,
                ));
            }
            drive(config, drivers).await
        }
        Target::Redis(address) => {
            let mut drivers = Vec::with_capacity(config.connections);
            for _ in 0..config.connections {
                drivers.push(Arc::new(
                    redis::RedisDriver::connect(address, config).await?,
                ));
            }
            drive(config, drivers).await
        }
    }
}

/// Logs in the sessions of uids `[0, count)` (untimed), `connections` × 16 requests at a time.
/// Returns the seconds it took.
pub async fn preload(config: &RunConfig, count: u64) -> anyhow::Result<f64> {
    let started = Instant::now();
    if count == 0 {
        return Ok(0.0);
    }
    let next_chunk = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..config.connections {
        match &config.target {
            Target::Imstate(_)
            | Target::ImstateGrpc(_)
            | Target::ImstateCluster(_)
            | Target::ImstateWireCluster(_) => {
                let driver =
                    Arc::new(imstate::ImstateDriver::connect(&config.target, config).await?);
                for _ in 0..PRELOAD_INFLIGHT {
                    let (driver, next_chunk) = (Arc::clone(&driver), Arc::clone(&next_chunk));
                    tasks.spawn(async move {
                        while let Some(uids) = take_chunk(&next_chunk, count) {
                            for uid in uids {
                                driver.login(&SessionKey::preloaded(uid)).await?;
                            }
                        }
                        anyhow::Ok(())
                    });
                }
            }
            Target::Redis(address) => {
                let driver = Arc::new(redis::RedisDriver::connect(address, config).await?);
                for _ in 0..PRELOAD_INFLIGHT {
                    let (driver, next_chunk) = (Arc::clone(&driver), Arc::clone(&next_chunk));
                    tasks.spawn(async move {
                        while let Some(uids) = take_chunk(&next_chunk, count) {
                            let sessions: Vec<SessionKey> =
                                uids.map(SessionKey::preloaded).collect();
                            driver.login_many(&sessions).await?;
                        }
                        anyhow::Ok(())
                    });
                }
            }
        }
    }
    while let Some(outcome) = tasks.join_next().await {
        outcome
            .context("preload task panicked")?
            .with_context(|| format!("preloading sessions into {}", config.target.url()))?;
    }
    Ok(started.elapsed().as_secs_f64())
}

fn take_chunk(next_chunk: &AtomicU64, count: u64) -> Option<std::ops::Range<u64>> {
    let chunk = next_chunk.fetch_add(1, Ordering::Relaxed);
    let start = chunk.checked_mul(PRELOAD_CHUNK_SESSIONS)?;
    (start < count).then(|| start..(start + PRELOAD_CHUNK_SESSIONS).min(count))
}

fn new_histogram() -> anyhow::Result<Histogram<u64>> {
    Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).context("histogram bounds")
}

async fn drive<D: Driver>(
    config: &RunConfig,
    drivers: Vec<Arc<D>>,
) -> anyhow::Result<BenchResult> {
    let counters = Arc::new(Counters {
        ops: AtomicU64::new(0),
        errors: AtomicU64::new(0),
    });
    let first_error = Arc::new(std::sync::Mutex::new(None::<String>));
    let started = Instant::now();
    let record_from = started + Duration::from_secs(config.warmup_s);
    let stop_at = record_from + Duration::from_secs(config.duration_s);
    // With --rate, every task takes its send times from one pacer (see pacer.rs).
    let pacer = if config.rate > 0.0 {
        Some(pacer::Pacer::start(config.rate, started, stop_at)?)
    } else {
        None
    };
    let mut tasks = Vec::new();
    for (connection, driver) in drivers.iter().enumerate() {
        for slot in 0..config.inflight {
            let driver = Arc::clone(driver);
            let counters = Arc::clone(&counters);
            let first_error = Arc::clone(&first_error);
            let task_index = connection * config.inflight + slot;
            let mut keys =
                KeyPicker::new(config.keys, config.dist, config.batch, task_index as u64)?;
            let mut histogram = new_histogram()?;
            let pacer = pacer.clone();
            tasks.push(tokio::spawn(async move {
                let (mut ops, mut items, mut errors) = (0u64, 0u64, 0u64);
                loop {
                    let sent = match &pacer {
                        Some(pacer) => match pacer.next().await {
                            Some(scheduled) => scheduled,
                            None => break,
                        },
                        None => Instant::now(),
                    };
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
                        Err(error) => {
                            if recorded {
                                errors += 1;
                            }
                            counters.errors.fetch_add(1, Ordering::Relaxed);
                            if let Ok(mut first) = first_error.lock()
                                && first.is_none()
                            {
                                *first = Some(format!("{error:#}"));
                            }
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
    let progress = (!config.quiet).then(|| {
        let counters = Arc::clone(&counters);
        let done = Arc::clone(&done);
        let label = format!("{} {}", config.workload.name(), config.target.url());
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
    let mut histogram = new_histogram()?;
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
    let seconds = config.duration_s as f64;
    let first_error = first_error.lock().ok().and_then(|first| first.clone());
    Ok(BenchResult {
        workload: config.workload.name().to_string(),
        target: config.target.url(),
        ops_per_sec: ops as f64 / seconds,
        items_per_sec: items as f64 / seconds,
        p50_us: histogram.value_at_quantile(0.50) as f64,
        p99_us: histogram.value_at_quantile(0.99) as f64,
        p999_us: histogram.value_at_quantile(0.999) as f64,
        errors,
        ops,
        items,
        connections: config.connections,
        inflight: config.inflight,
        duration_s: seconds,
        keys: config.keys,
        dist: format!("{:?}", config.dist).to_lowercase(),
        batch: config.batch,
        rate: config.rate,
        redis_fanout: match config.target {
            Target::Redis(_) => format!("{:?}", config.redis_fanout).to_lowercase(),
            Target::Imstate(_)
            | Target::ImstateGrpc(_)
            | Target::ImstateCluster(_)
            | Target::ImstateWireCluster(_) => String::new(),
        },
        first_error,
    })
}

/// Prints the result table.
pub fn print_table(results: &[BenchResult]) {
    println!(
        "{:<24} {:<28} {:>5} {:>4} {:>5} {:>12} {:>12} {:>8} {:>8} {:>8} {:>6}",
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
            "{:<24} {:<28} {:>5} {:>4} {:>5} {:>12.0} {:>12.0} {:>8.0} {:>8.0} {:>8.0} {:>6}",
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
        if let Some(error) = &r.first_error {
            println!("  first error: {error}");
        }
    }
}

/// Writes `value` as pretty JSON to `path`.
pub fn write_json(path: &std::path::Path, value: &impl Serialize) -> anyhow::Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(value)?)
        .with_context(|| format!("writing {}", path.display()))
}

/// The preload count of `workload` from the flags.
pub fn preload_count(args: &BenchArgs, workload: Workload) -> u64 {
    args.preload.unwrap_or(if workload.needs_sessions() {
        args.keys
    } else {
        0
    })
}

/// Runs the bench command in the mode the flags select.
pub fn command(args: BenchArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if args.modes.memory {
        return runtime.block_on(memory::run(&args));
    }
    if args.modes.compare {
        return runtime.block_on(compare::run(&args));
    }
    if args.modes.imstate.is_some() || args.modes.redis.is_some() {
        bail!("--imstate and --redis are for --compare and --memory; one run uses --target");
    }
    let config = RunConfig::from_args(&args, Target::parse(&args.target)?, args.workload);
    config.validate()?;
    let result = runtime.block_on(async {
        let count = preload_count(&args, args.workload);
        if count > 0 {
            let seconds = preload(&config, count).await?;
            eprintln!(
                "preloaded {count} sessions into {} in {seconds:.1} s",
                config.target.url()
            );
        }
        run(&config).await
    })?;
    print_table(std::slice::from_ref(&result));
    if let Some(path) = &args.json_out {
        write_json(path, &[&result])?;
    }
    Ok(())
}
