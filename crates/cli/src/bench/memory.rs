//! `imstate bench --memory`: bytes per session in each target.
//!
//! ```text
//!  baseline ──► log in --sessions sessions (the preload layout, the same on both) ──►
//!  settle 2 s ──► delta / sessions
//!  imstate: VmRSS of --imstate-pid from /proc (the whole process: registry, indexes, log buffers)
//!  Redis:   INFO memory used_memory (its allocator's live bytes, as Redis reports them)
//! ```
//!
//! Run it on freshly started servers: sessions already present are not counted twice, and a
//! server that served other load holds caches that would blur the delta.

use std::time::Duration;

use anyhow::{Context, bail};
use serde::Serialize;

use super::{BenchArgs, RunConfig, Target, Workload, preload, redis, resp};

/// How long the servers get to settle (flushers, allocator caches) before the second reading.
const SETTLE: Duration = Duration::from_secs(2);

/// The memory cost of sessions in one target.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryResult {
    pub target: String,
    /// What was measured: "VmRSS" or "used_memory".
    pub measure: String,
    pub sessions: u64,
    pub before_bytes: u64,
    pub after_bytes: u64,
    pub bytes_per_session: f64,
    /// Sessions the target reports holding after the load.
    pub reported_sessions: u64,
    pub load_seconds: f64,
}

fn vm_rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let kilobytes: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .with_context(|| format!("{path} has no VmRSS line"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .with_context(|| format!("parsing VmRSS of {path}"))?;
    Ok(kilobytes * 1_024)
}

/// Runs memory mode.
pub async fn run(args: &BenchArgs) -> anyhow::Result<()> {
    if args.modes.imstate.is_none() && args.modes.redis.is_none() {
        bail!("--memory needs --imstate HOST:PORT (with --imstate-pid) and/or --redis HOST:PORT");
    }
    if args.modes.sessions == 0 {
        bail!("--sessions must be at least 1");
    }
    let mut results = Vec::new();
    if let Some(address) = &args.modes.imstate {
        let Some(pid) = args.modes.imstate_pid else {
            bail!("--memory with --imstate needs --imstate-pid PID (the server's VmRSS is read)");
        };
        let target = Target::with_scheme(address, "imstate")?;
        let config = RunConfig::from_args(args, target.clone(), Workload::PresenceLogin);
        let online = || async {
            anyhow::Ok(match &target {
                Target::ImstateGrpc(address) => {
                    config
                        .security
                        .connect(address)
                        .await?
                        .online_count()
                        .await?
                }
                _ => {
                    let client = config.security.connect_wire(target.address()).await?;
                    client.online_count().await?
                }
            })
        };
        let sessions_before = online().await?;
        let before = vm_rss_bytes(pid)?;
        let load_seconds = preload(&config, args.modes.sessions).await?;
        tokio::time::sleep(SETTLE).await;
        let after = vm_rss_bytes(pid)?;
        let reported = online().await?;
        results.push(result(
            &target,
            "VmRSS",
            args.modes.sessions,
            before,
            after,
            reported - sessions_before,
            load_seconds,
        ));
    }
    if let Some(address) = &args.modes.redis {
        let target = Target::with_scheme(address, "redis")?;
        let config = RunConfig::from_args(args, target.clone(), Workload::PresenceLogin);
        let connection = resp::Connection::connect(target.address()).await?;
        let keys_before = connection.command(&[b"DBSIZE"]).await?.integer()? as u64;
        let before = redis::info_field(&connection, "memory", "used_memory").await?;
        let load_seconds = preload(&config, args.modes.sessions).await?;
        tokio::time::sleep(SETTLE).await;
        let after = redis::info_field(&connection, "memory", "used_memory").await?;
        let keys_after = connection.command(&[b"DBSIZE"]).await?.integer()? as u64;
        results.push(result(
            &target,
            "used_memory",
            args.modes.sessions,
            before,
            after,
            keys_after - keys_before,
            load_seconds,
        ));
    }
    println!(
        "{:<28} {:>12} {:>10} {:>14} {:>14} {:>12} {:>10}",
        "target", "measure", "sessions", "before", "after", "B/session", "load_s"
    );
    for r in &results {
        println!(
            "{:<28} {:>12} {:>10} {:>14} {:>14} {:>12.1} {:>10.1}",
            r.target,
            r.measure,
            r.sessions,
            r.before_bytes,
            r.after_bytes,
            r.bytes_per_session,
            r.load_seconds
        );
        if r.reported_sessions != r.sessions {
            eprintln!(
                "warning: {} reports {} new sessions (keys), expected {}",
                r.target, r.reported_sessions, r.sessions
            );
        }
    }
    if let [imstate, redis] = results.as_slice() {
        println!(
            "ratio imstate / Redis: {:.2}",
            imstate.bytes_per_session / redis.bytes_per_session
        );
    }
    if let Some(path) = &args.json_out {
        super::write_json(path, &results)?;
    }
    Ok(())
}

fn result(
    target: &Target,
    measure: &str,
    sessions: u64,
    before: u64,
    after: u64,
    reported: u64,
    load_seconds: f64,
) -> MemoryResult {
    MemoryResult {
        target: target.url(),
        measure: measure.to_string(),
        sessions,
        before_bytes: before,
        after_bytes: after,
        bytes_per_session: after.saturating_sub(before) as f64 / sessions as f64,
        reported_sessions: reported,
        load_seconds,
    }
}
