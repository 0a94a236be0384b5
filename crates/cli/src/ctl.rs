//! `imstate ctl ...`: operations on a running node through its Admin service.
//!
//! `status` prints one `key: value` line per fact (stable, greppable); `checkpoint` prints one
//! line per log checkpointed; `namespaces` prints one line per namespace, like
//! `imstate seq namespaces`.

use clap::Subcommand;

use crate::seq::{Target, print_namespace};

#[derive(Subcommand)]
pub enum CtlCommand {
    /// Version, uptime, role, route table version, namespaces, sessions online, both logs'
    /// LSNs and last checkpoints.
    Status {
        #[command(flatten)]
        target: Target,
    },
    /// Writes a checkpoint of both stores now and drops the log segments it covers.
    Checkpoint {
        #[command(flatten)]
        target: Target,
    },
    /// Lists namespaces: name, id range, section size, step.
    Namespaces {
        #[command(flatten)]
        target: Target,
    },
}

pub async fn run(command: CtlCommand) -> anyhow::Result<()> {
    match command {
        CtlCommand::Status { target } => {
            let status = target.connect().await?.status().await?;
            let mut out = String::new();
            out.push_str(&format!("version: {}\n", status.version));
            out.push_str(&format!("uptime_s: {}\n", status.uptime.as_secs()));
            out.push_str(&format!("role: {}\n", status.role));
            out.push_str(&format!("route_version: {}\n", status.route_version));
            let names: Vec<&str> = status.namespaces.iter().map(|n| n.name.as_str()).collect();
            out.push_str(&format!("namespaces: {}\n", names.join(",")));
            out.push_str(&format!("sections_loaded: {}\n", status.sections_loaded));
            out.push_str(&format!("sessions_online: {}\n", status.sessions_online));
            for log in &status.logs {
                let checkpoint = log
                    .checkpoint_lsn
                    .map_or_else(|| "none".to_string(), |lsn| lsn.to_string());
                out.push_str(&format!(
                    "log.{}: last_lsn={} durable_lsn={} synced_lsn={} checkpoint_lsn={} \
                     bytes_since_checkpoint={} segments={} fsync={} poisoned={}\n",
                    log.name,
                    log.last_lsn,
                    log.durable_lsn,
                    log.synced_lsn,
                    checkpoint,
                    log.bytes_since_checkpoint,
                    log.segments,
                    log.fsync,
                    log.poisoned
                ));
            }
            print!("{out}");
        }
        CtlCommand::Checkpoint { target } => {
            for checkpoint in target.connect().await?.checkpoint().await? {
                println!(
                    "{}: covered_lsn={} bytes={} elapsed_ms={} segments_removed={}",
                    checkpoint.name,
                    checkpoint.covered_lsn,
                    checkpoint.bytes,
                    checkpoint.elapsed.as_millis(),
                    checkpoint.segments_removed
                );
            }
        }
        CtlCommand::Namespaces { target } => {
            for namespace in target.connect().await?.list_namespaces().await? {
                print_namespace(&namespace);
            }
        }
    }
    Ok(())
}
