//! `imstate serve`: opens the data directory, recovers, serves until SIGTERM/SIGINT; and
//! `imstate config example|show`, which print the documented defaults and the configuration a
//! `serve` with the same flags and environment would run with.
//!
//! Configuration precedence is flags > environment (`IMSTATE_...`, see
//! `imstate_server::config`) > file (`--config`) > defaults.
//!
//! The bound addresses are printed on stdout once the node is ready (after recovery), so
//! scripts and tests can wait for them: `imstate listening on ADDR` (gRPC), then
//! `imstate wire listening on ADDR`. Logs go to stderr.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Subcommand};
use imstate_server::NodeConfig;
use imstate_server::config::LogFormat;
use tokio::signal::unix::{SignalKind, signal};
use tracing_subscriber::EnvFilter;

#[derive(Args)]
pub struct ServeArgs {
    /// Data directory (logs, checkpoints); created if missing, locked while running.
    /// Env: IMSTATE_DATA_DIR. [default: ./imstate-data]
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// gRPC listen address; port 0 picks a free port. Env: IMSTATE_LISTEN.
    /// [default: 127.0.0.1:7700]
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// HTTP listen address for /metrics, /healthz and /readyz (up before recovery).
    /// Env: IMSTATE_METRICS_LISTEN. [default: 127.0.0.1:7701]
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Wire-protocol listen address (the lean, pipelined binary protocol of the hot path:
    /// Next, NextBatch, Login, Logout, Heartbeat, HeartbeatBatch, LookupBatch, OnlineCount); port 0 picks a
    /// free port. Env: IMSTATE_WIRE_LISTEN. [default: 127.0.0.1:7702]
    #[arg(long)]
    wire_listen: Option<SocketAddr>,
    /// RESP front door listen address (Redis clients: INCR, INCRBY, GET, MGET on
    /// `namespace:id` keys; other keys go whole to the keyed namespace `redis`); off unless
    /// set. No TLS: beyond loopback it needs [auth] tokens.
    /// Env: IMSTATE_RESP_LISTEN. [default: off]
    #[arg(long, value_name = "ADDR")]
    resp_listen: Option<SocketAddr>,
    /// Log format on stderr; levels come from RUST_LOG. Env: IMSTATE_LOG_FORMAT.
    /// [default: human]
    #[arg(long, value_enum)]
    log_format: Option<LogFormatArg>,
    /// TOML configuration file (`imstate config example` prints every key); the environment
    /// and flags override its values.
    #[arg(long, env = "IMSTATE_CONFIG")]
    config: Option<PathBuf>,
    /// Cluster mode: the cluster's name (its prefix in etcd). Without it the node runs
    /// embedded, alone. Env: IMSTATE_CLUSTER__NAME.
    #[arg(long)]
    cluster: Option<String>,
    /// etcd endpoints, comma-separated (cluster mode). Env: IMSTATE_CLUSTER__ETCD.
    #[arg(long, value_name = "URL[,URL...]")]
    etcd: Option<String>,
    /// This node's id in the cluster, unique. Env: IMSTATE_CLUSTER__NODE_ID.
    #[arg(long)]
    node_id: Option<String>,
    /// gRPC address other nodes and clients reach this node at. Env:
    /// IMSTATE_CLUSTER__ADVERTISE. [default: the --listen address]
    #[arg(long, value_name = "ADDR")]
    advertise: Option<String>,
    /// Wire address clients reach this node at. Env: IMSTATE_CLUSTER__ADVERTISE_WIRE.
    /// [default: the --wire-listen address]
    #[arg(long, value_name = "ADDR")]
    advertise_wire: Option<String>,
}

/// Allocations from this size up are served by their own mapping and unmapped when freed.
const MMAP_THRESHOLD_BYTES: i32 = 256 * 1024;

/// Makes glibc give large buffers back to the system when they are freed.
///
/// Why: glibc raises its mmap threshold each time a mapped block is freed (up to 32 MiB), so
/// after the first large wire frame every later one came from the heap and stayed resident
/// after its connection closed (about 480 MB after 60 connections of 8 MiB frames). Fixing the
/// threshold turns that adaptation off: a buffer of a large frame or reply is always mapped
/// and unmapped. Allocations that large are rare on the hot path (frames over 64 KiB, table
/// growth), so the system calls cost nothing measurable.
fn fix_mmap_threshold() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning; it is called before any other thread runs.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES);
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormatArg {
    Human,
    Json,
}

#[derive(Subcommand)]
pub enum ConfigCommand {
    /// Prints every configuration key with its default and what it does.
    Example,
    /// Prints the configuration `serve` would run with, given the same flags and environment.
    Show(Box<ServeArgs>),
}

/// Resolves the configuration: defaults, file, environment, flags (later wins).
fn resolve(args: &ServeArgs) -> anyhow::Result<NodeConfig> {
    let mut config = NodeConfig::resolve(args.config.as_deref(), std::env::vars())?;
    if let Some(data_dir) = &args.data_dir {
        config.data_dir = data_dir.clone();
    }
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(metrics_listen) = args.metrics_listen {
        config.metrics_listen = metrics_listen;
    }
    if let Some(wire_listen) = args.wire_listen {
        config.wire_listen = wire_listen;
    }
    if let Some(resp_listen) = args.resp_listen {
        config.resp_listen = resp_listen.to_string();
    }
    if let Some(name) = &args.cluster {
        config.cluster.name = name.clone();
    }
    if let Some(etcd) = &args.etcd {
        config.cluster.etcd = etcd.clone();
    }
    if let Some(node_id) = &args.node_id {
        config.cluster.node_id = node_id.clone();
    }
    if let Some(advertise) = &args.advertise {
        config.cluster.advertise = advertise.clone();
    }
    if let Some(advertise_wire) = &args.advertise_wire {
        config.cluster.advertise_wire = advertise_wire.clone();
    }
    if let Some(format) = args.log_format {
        config.log_format = match format {
            LogFormatArg::Human => LogFormat::Human,
            LogFormatArg::Json => LogFormat::Json,
        };
    }
    config.validate()?;
    Ok(config)
}

pub fn config_command(command: ConfigCommand) -> anyhow::Result<()> {
    match command {
        ConfigCommand::Example => print!("{}", imstate_server::config::EXAMPLE_TOML),
        ConfigCommand::Show(args) => print!("{}", resolve(&args)?.to_toml()),
    }
    Ok(())
}

fn init_logs(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let config = resolve(&args)?;
    init_logs(config.log_format);
    fix_mmap_threshold();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        // Registered now, before anything is announced: registered on the first poll of the
        // shutdown future (after `listening` was printed), a SIGTERM sent right after the
        // announcement killed the process without a clean shutdown.
        let (Ok(mut terminate), Ok(mut interrupt)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            anyhow::bail!("cannot install the SIGTERM and SIGINT handlers");
        };
        let shutdown = async move {
            tokio::select! {
                _ = terminate.recv() => tracing::info!("SIGTERM: shutting down"),
                _ = interrupt.recv() => tracing::info!("SIGINT: shutting down"),
            }
        };
        imstate_server::run(config, shutdown, |listening| {
            let mut stdout = std::io::stdout();
            let _ = writeln!(stdout, "imstate listening on {}", listening.grpc);
            let _ = writeln!(stdout, "imstate wire listening on {}", listening.wire);
            if let Some(resp) = listening.resp {
                let _ = writeln!(stdout, "imstate resp listening on {resp}");
            }
            let _ = stdout.flush();
        })
        .await?;
        Ok(())
    })
}
