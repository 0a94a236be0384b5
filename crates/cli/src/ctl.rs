//! `imstate ctl ...`: operations on a running node through its Admin service.
//!
//! `status` prints one `key: value` line per fact (stable, greppable); `checkpoint` prints one
//! line per log checkpointed; `namespaces` prints one line per namespace, like
//! `imstate seq namespaces`; `route` prints one line per section range and one per node;
//! `drain` asks the arbiter to move a node's sections away and waits until it owns none.

use std::time::{Duration, Instant};

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
    /// The route table: one line per section range (namespace, sections, owner, its
    /// address), one per presence slot range (primary, replica, the replica's lag as its primary
    /// reports it), then one per node (alive or not, draining or not, sections and slots held).
    Route {
        #[command(flatten)]
        target: Target,
    },
    /// Cluster mode: moves every section away from NODE (before maintenance) and waits until
    /// it owns none; `--undo` lets it take sections again.
    Drain {
        #[command(flatten)]
        target: Target,
        /// The node id to drain.
        node: String,
        /// Withdraw the drain request instead.
        #[arg(long)]
        undo: bool,
        /// Longest wait for the node to be empty, seconds.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
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
            if !status.cluster.is_empty() {
                out.push_str(&format!("cluster: {}\n", status.cluster));
                out.push_str(&format!("node_id: {}\n", status.node_id));
                out.push_str(&format!(
                    "lease_valid_ms: {}\n",
                    status.lease_valid.as_millis()
                ));
                out.push_str(&format!("sections_owned: {}\n", status.sections_owned));
                if !status.blocked_by.is_empty() {
                    out.push_str(&format!("blocked_by: {}\n", status.blocked_by));
                }
            }
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
        CtlCommand::Route { target } => {
            let table = target.connect().await?.route().await?;
            // Replica lag, as each live primary sees its replica streams.
            let mut lags: std::collections::HashMap<(String, String), String> =
                std::collections::HashMap::new();
            for node in table.nodes.iter().filter(|node| node.alive) {
                let Ok(client) = target.connect_to(&node.grpc).await else {
                    continue;
                };
                let Ok(status) = client.status().await else {
                    continue;
                };
                for replica in status.replicas {
                    let lag = match (replica.in_sync, replica.lag) {
                        (false, _) => "syncing".to_owned(),
                        (true, Some(lag)) => {
                            format!("{}rec/{}ms", replica.lag_records, lag.as_millis())
                        }
                        (true, None) => format!("{}rec/behind-feed", replica.lag_records),
                    };
                    lags.insert((node.node_id.clone(), replica.replica_id), lag);
                }
            }
            let cluster = if table.cluster.is_empty() {
                "(embedded)"
            } else {
                &table.cluster
            };
            let mut out = format!("cluster: {cluster}\nversion: {}\n", table.version);
            for route in &table.routes {
                let owner = if route.node_id.is_empty() {
                    "this-node"
                } else {
                    &route.node_id
                };
                out.push_str(&format!(
                    "route\t{}\tsections=[{}, {})\towner={owner}\tgrpc={}\twire={}\n",
                    route.namespace, route.section_lo, route.section_hi, route.node, route.wire
                ));
            }
            if table.presence_slots > 0 {
                out.push_str(&format!("presence_slots: {}\n", table.presence_slots));
            }
            for slots in &table.slots {
                let replica = if slots.replica_id.is_empty() {
                    "-"
                } else {
                    &slots.replica_id
                };
                let lag = if slots.replica_id.is_empty() {
                    "-"
                } else {
                    lags.get(&(slots.primary_id.clone(), slots.replica_id.clone()))
                        .map_or("no-stream", String::as_str)
                };
                // A planned replica move in progress: the joining node and its lag.
                let joining = if slots.joining_id.is_empty() {
                    String::new()
                } else {
                    let lag = lags
                        .get(&(slots.primary_id.clone(), slots.joining_id.clone()))
                        .map_or("no-stream", String::as_str);
                    format!("\tjoining={}\tjoining_lag={lag}", slots.joining_id)
                };
                out.push_str(&format!(
                    "slots\t[{}, {})\tprimary={}\treplica={replica}\tlag={lag}{joining}\tgrpc={}\twire={}\n",
                    slots.slot_lo,
                    slots.slot_hi,
                    slots.primary_id,
                    slots.primary,
                    slots.primary_wire
                ));
            }
            for node in &table.nodes {
                let sections: u64 = table
                    .routes
                    .iter()
                    .filter(|route| route.node_id == node.node_id)
                    .map(|route| route.section_hi - route.section_lo)
                    .sum();
                let slots = |replica: bool| -> u32 {
                    table
                        .slots
                        .iter()
                        .filter(|slots| {
                            let holder = if replica {
                                &slots.replica_id
                            } else {
                                &slots.primary_id
                            };
                            *holder == node.node_id
                        })
                        .map(|slots| slots.slot_hi - slots.slot_lo)
                        .sum()
                };
                out.push_str(&format!(
                    "node\t{}\tlease={}\tdraining={}\tsections={sections}\tprimary_slots={}\t\
                     replica_slots={}\tgrpc={}\twire={}\n",
                    node.node_id,
                    if node.alive { "alive" } else { "lapsed" },
                    node.draining,
                    slots(false),
                    slots(true),
                    node.grpc,
                    node.wire
                ));
            }
            print!("{out}");
        }
        CtlCommand::Drain {
            target,
            node,
            undo,
            timeout,
        } => {
            let client = target.connect().await?;
            client.drain(&node, undo).await?;
            if undo {
                println!("{node}: may take sections again");
                return Ok(());
            }
            let deadline = Instant::now() + Duration::from_secs(timeout);
            loop {
                let table = client.route().await?;
                let owned: u64 = table
                    .routes
                    .iter()
                    .filter(|route| route.node_id == node)
                    .map(|route| route.section_hi - route.section_lo)
                    .sum();
                if owned == 0 {
                    println!("{node}: drained (route version {})", table.version);
                    return Ok(());
                }
                if Instant::now() > deadline {
                    anyhow::bail!(
                        "{node} still owns {owned} sections after {timeout} s; the drain goes on"
                    );
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    Ok(())
}
