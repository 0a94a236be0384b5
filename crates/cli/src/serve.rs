//! `imstate serve`: opens the data directory, recovers, serves until SIGTERM/SIGINT.
//!
//! The bound address is printed on stdout as `imstate listening on ADDR` once the node is ready
//! (after recovery), so scripts and tests can wait for it; logs go to stderr.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;
use imstate_node::NodeConfig;
use tokio::signal::unix::{SignalKind, signal};
use tracing_subscriber::EnvFilter;

#[derive(Args)]
pub struct ServeArgs {
    /// Data directory (logs, checkpoints); created if missing, locked while running.
    /// [default: ./imstate-data]
    #[arg(long, env = "IMSTATE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// gRPC listen address; port 0 picks a free port. [default: 127.0.0.1:7700]
    #[arg(long, env = "IMSTATE_LISTEN")]
    listen: Option<SocketAddr>,
    /// TOML configuration file; flags override its values.
    #[arg(long, env = "IMSTATE_CONFIG")]
    config: Option<PathBuf>,
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut config = match &args.config {
        Some(path) => NodeConfig::load(path)?,
        None => NodeConfig::default(),
    };
    if let Some(data_dir) = args.data_dir {
        config.data_dir = data_dir;
    }
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let shutdown = async {
            let (Ok(mut terminate), Ok(mut interrupt)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) else {
                return std::future::pending().await;
            };
            tokio::select! {
                _ = terminate.recv() => tracing::info!("SIGTERM: shutting down"),
                _ = interrupt.recv() => tracing::info!("SIGINT: shutting down"),
            }
        };
        imstate_node::run(config, shutdown, |address| {
            let mut stdout = std::io::stdout();
            let _ = writeln!(stdout, "imstate listening on {address}");
            let _ = stdout.flush();
        })
        .await
    })?;
    Ok(())
}
