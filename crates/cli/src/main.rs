//! The `imstate` binary: runs a node (`serve`), talks to one (`seq ...`, `presence ...`,
//! `ctl ...`, `bench`), and prints its configuration (`config example|show`).
//!
//! Every client command exits 0 on success and otherwise prints one line `error: ...` on stderr
//! and exits 1 (usage errors exit 2, as clap does).

mod bench;
mod ctl;
mod presence;
mod seq;
mod serve;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// imstate: the state plane of an instant-messaging backend.
///
/// Strictly monotonic per-id sequence numbers (seqsvr) and an online-session registry,
/// made durable by a write-ahead log.
#[derive(Parser)]
#[command(name = "imstate", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs a node on a data directory: embedded by default (no etcd, no Redis), or as a
    /// member of a cluster with --cluster, --etcd and --node-id.
    Serve(serve::ServeArgs),
    /// Sequence numbers: next, current, min_seq, namespaces.
    #[command(subcommand)]
    Seq(seq::SeqCommand),
    /// Online sessions: login, lookup, heartbeat, logout, gateways, watch.
    #[command(subcommand)]
    Presence(presence::PresenceCommand),
    /// Operations on a running node: status, checkpoint, namespaces.
    #[command(subcommand)]
    Ctl(ctl::CtlCommand),
    /// Configuration: `example` prints every key with its default; `show` the merged result.
    #[command(subcommand)]
    Config(serve::ConfigCommand),
    /// Load generator: throughput and latency of a workload against a node.
    Bench(bench::BenchArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::Seq(command) => client_runtime().and_then(|rt| rt.block_on(seq::run(command))),
        Command::Presence(command) => {
            client_runtime().and_then(|rt| rt.block_on(presence::run(command)))
        }
        Command::Ctl(command) => client_runtime().and_then(|rt| rt.block_on(ctl::run(command))),
        Command::Config(command) => serve::config_command(command),
        Command::Bench(args) => bench::command(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {}", one_line(&error));
            ExitCode::FAILURE
        }
    }
}

/// A small runtime for client commands: one call, no need for many threads.
fn client_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// Joins an error chain on one line, as the CLI contract promises. A cause whose text its
/// parent already shows (some libraries print their source in their own message) is left out,
/// so nothing is said twice.
fn one_line(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let cause = cause.to_string().replace('\n', " ");
        if text.ends_with(&cause) || text.contains(&format!("{cause}: ")) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&cause);
    }
    text
}
