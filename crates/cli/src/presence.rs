//! `imstate presence ...`: client commands of the presence registry.
//!
//! Every command but `count` and `watch` goes through the smart client: against a cluster, a
//! uid's request goes to its presence slot's primary, and gateway operations to every node;
//! against one embedded node, to that node.
//!
//! `lookup` sends ONE LookupBatch call (one per slot primary in a cluster) and prints one line per uid, in argument order:
//! `UID<TAB>DEVICE,GATEWAY,CONN<TAB>...` (sorted by device) or `UID<TAB>offline`; `--json`
//! prints a JSON array.

use clap::{Args, Subcommand};
use imstate_client::{ClusterWatchItem, LoginArgs, Session, WatchEvent, WatchKind, WatchPosition};
use tokio_stream::StreamExt;

use crate::seq::Target;

#[derive(Subcommand)]
pub enum PresenceCommand {
    /// Registers a session; prints it, and the session it replaced (same uid and device).
    Login(Login),
    /// Prints the sessions of each UID (one LookupBatch call).
    Lookup {
        #[command(flatten)]
        target: Target,
        /// JSON output.
        #[arg(long)]
        json: bool,
        /// Cluster mode: ask each slot's in-sync replica instead of its primary (falling back
        /// to the primary); under presence.replication = "async" the answer may lag.
        #[arg(long)]
        read_replica: bool,
        /// User ids.
        #[arg(required = true)]
        uids: Vec<u64>,
    },
    /// Renews a session.
    Heartbeat(SessionKey),
    /// Removes a session.
    Logout(SessionKey),
    /// Prints the number of sessions online.
    Count {
        #[command(flatten)]
        target: Target,
    },
    /// Drops every session of a gateway; prints how many.
    GatewayDown {
        #[command(flatten)]
        target: Target,
        /// Gateway name.
        gateway: String,
    },
    /// Registers a gateway lease: if not renewed within TTL, all its sessions are dropped.
    GatewayRegister {
        #[command(flatten)]
        target: Target,
        /// Gateway name.
        gateway: String,
        /// Lease in seconds.
        #[arg(long)]
        ttl: u32,
    },
    /// Renews a gateway lease.
    GatewayHeartbeat {
        #[command(flatten)]
        target: Target,
        /// Gateway name.
        gateway: String,
    },
    /// Prints login / logout / expire events as they happen (of the given uids, or all).
    ///
    /// With uids, follows their slots' primaries in a cluster: where events may have been
    /// lost (a promotion) it prints each uid's sessions now as `-<TAB>gap<TAB>UID<TAB>...`.
    /// Without uids, or with `--from`, it watches the one node at `--addr`; it prints its
    /// position (`LOG_ID:LSN`) to stderr at the start and when the stream ends, which
    /// `--from` resumes after, delivering the events in between.
    Watch {
        #[command(flatten)]
        target: Target,
        /// Only these uids.
        uids: Vec<u64>,
        /// Resume after this position of the node's log, `LOG_ID:LSN` (printed by an earlier
        /// watch); refused with OUT_OF_RANGE if the node no longer holds what followed it.
        #[arg(long, value_name = "LOG_ID:LSN")]
        from: Option<String>,
    },
}

#[derive(Args)]
pub struct Login {
    #[command(flatten)]
    target: Target,
    /// User id.
    #[arg(long)]
    uid: u64,
    /// Device (up to 64 bytes, no control characters); one session per (uid, device).
    #[arg(long)]
    device: String,
    /// Gateway holding the connection (up to 128 bytes, no control characters).
    #[arg(long)]
    gateway: String,
    /// Connection id. Unique among one uid's sessions on all gateways: logout and heartbeat
    /// name a session by (uid, conn). Gateways sharing a uid should draw conn ids from
    /// disjoint ranges (for example gateway number in the high bits).
    #[arg(long)]
    conn: u64,
    /// Seconds without heartbeat before the session expires [default: the server's, 90].
    #[arg(long)]
    ttl: Option<u32>,
    /// Metadata (up to 256 bytes).
    #[arg(long)]
    meta: Option<String>,
}

#[derive(Args)]
pub struct SessionKey {
    #[command(flatten)]
    target: Target,
    /// User id.
    #[arg(long)]
    uid: u64,
    /// Connection id.
    #[arg(long)]
    conn: u64,
}

fn print_event(event: &WatchEvent) {
    let kind = match event.kind {
        WatchKind::Login => "login",
        WatchKind::Logout => "logout",
        WatchKind::Expire => "expire",
        WatchKind::GatewayDown => "gateway-down",
    };
    println!(
        "{}\t{kind}\t{}\t{}",
        event.lsn,
        event.session.uid,
        describe(&event.session)
    );
}

/// Parses `LOG_ID:LSN` (the log id has no colon).
fn parse_position(text: &str) -> anyhow::Result<WatchPosition> {
    let (log_id, lsn) = text
        .rsplit_once(':')
        .ok_or_else(|| anyhow::anyhow!("--from takes LOG_ID:LSN, not {text:?}"))?;
    let lsn = lsn
        .parse()
        .map_err(|_| anyhow::anyhow!("--from takes LOG_ID:LSN; {lsn:?} is not an LSN"))?;
    Ok(WatchPosition {
        log_id: log_id.to_string(),
        lsn,
    })
}

fn describe(session: &Session) -> String {
    format!("{},{},{}", session.device, session.gateway, session.conn)
}

fn json(session: &Session) -> serde_json::Value {
    serde_json::json!({
        "device": session.device,
        "gateway": session.gateway,
        "conn": session.conn,
        "login_ms": session.login_ms,
        "last_heartbeat_ms": session.last_heartbeat_ms,
        "ttl_ms": session.ttl_ms,
        "meta": String::from_utf8_lossy(&session.meta),
    })
}

fn seconds_to_ms(seconds: u32) -> anyhow::Result<u32> {
    seconds
        .checked_mul(1000)
        .ok_or_else(|| anyhow::anyhow!("ttl of {seconds} s does not fit in u32 milliseconds"))
}

pub async fn run(command: PresenceCommand) -> anyhow::Result<()> {
    match command {
        PresenceCommand::Login(args) => {
            let client = args.target.connect_cluster().await?;
            let result = client
                .login(LoginArgs {
                    uid: args.uid,
                    device: args.device,
                    gateway: args.gateway,
                    conn: args.conn,
                    ttl_ms: args.ttl.map(seconds_to_ms).transpose()?.unwrap_or(0),
                    meta: args.meta.map(String::into_bytes).unwrap_or_default(),
                })
                .await?;
            println!("{}\t{}", result.session.uid, describe(&result.session));
            if let Some(replaced) = result.replaced {
                println!("replaced\t{}", describe(&replaced));
            }
        }
        PresenceCommand::Lookup {
            target,
            json: as_json,
            read_replica,
            uids,
        } => {
            let client = target.connect_cluster().await?;
            let mut found = if read_replica {
                client.lookup_batch_from_replicas(uids.clone()).await?
            } else {
                client.lookup_batch(uids.clone()).await?
            };
            // The registry keeps no order among a user's sessions; print a stable one.
            for sessions in &mut found {
                sessions.sort_by(|a, b| (&a.device, a.conn).cmp(&(&b.device, b.conn)));
            }
            if as_json {
                let users: Vec<_> = uids
                    .iter()
                    .zip(&found)
                    .map(|(uid, sessions)| {
                        serde_json::json!({
                            "uid": uid,
                            "sessions": sessions.iter().map(json).collect::<Vec<_>>(),
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string(&users)?);
            } else {
                let mut out = String::new();
                for (uid, sessions) in uids.iter().zip(&found) {
                    out.push_str(&uid.to_string());
                    if sessions.is_empty() {
                        out.push_str("\toffline");
                    }
                    for session in sessions {
                        out.push('\t');
                        out.push_str(&describe(session));
                    }
                    out.push('\n');
                }
                print!("{out}");
            }
        }
        PresenceCommand::Heartbeat(key) => {
            key.target
                .connect_cluster()
                .await?
                .heartbeat(key.uid, key.conn)
                .await?;
        }
        PresenceCommand::Logout(key) => {
            let session = key
                .target
                .connect_cluster()
                .await?
                .logout(key.uid, key.conn)
                .await?;
            println!("{}\t{}", session.uid, describe(&session));
        }
        PresenceCommand::Count { target } => {
            println!("{}", target.connect().await?.online_count().await?);
        }
        PresenceCommand::GatewayDown { target, gateway } => {
            println!(
                "{}",
                target
                    .connect_cluster()
                    .await?
                    .gateway_down(&gateway)
                    .await?
            );
        }
        PresenceCommand::GatewayRegister {
            target,
            gateway,
            ttl,
        } => {
            let client = target.connect_cluster().await?;
            client
                .gateway_register(&gateway, seconds_to_ms(ttl)?)
                .await?;
        }
        PresenceCommand::GatewayHeartbeat { target, gateway } => {
            target
                .connect_cluster()
                .await?
                .gateway_heartbeat(&gateway)
                .await?;
        }
        PresenceCommand::Watch { target, uids, from } => {
            if from.is_none() && !uids.is_empty() {
                let mut watch = target.connect_cluster().await?.watch(uids).await?;
                while let Some(item) = watch.next().await {
                    match item {
                        ClusterWatchItem::Event(event) => print_event(&event),
                        ClusterWatchItem::Gap {
                            uids,
                            sessions,
                            reason,
                        } => {
                            eprintln!("events may have been lost: {reason}");
                            for (uid, sessions) in uids.iter().zip(sessions) {
                                let now: Vec<String> = sessions.iter().map(describe).collect();
                                let now = if now.is_empty() {
                                    "offline".to_string()
                                } else {
                                    now.join("\t")
                                };
                                println!("-\tgap\t{uid}\t{now}");
                            }
                        }
                    }
                }
                return Ok(());
            }
            let from = from.as_deref().map(parse_position).transpose()?;
            let client = target.connect().await?;
            let mut events = client.watch_from(uids, from.as_ref()).await?;
            let position = |events: &imstate_client::WatchStream| {
                let at = events.position();
                format!("{}:{}", at.log_id, at.lsn)
            };
            eprintln!("watching from {}", position(&events));
            // SIGINT or SIGTERM ends the watch cleanly, printing where to resume from.
            let mut terminate =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            loop {
                let event = tokio::select! {
                    event = events.next() => event,
                    _ = tokio::signal::ctrl_c() => None,
                    _ = terminate.recv() => None,
                };
                match event {
                    Some(Ok(event)) => print_event(&event),
                    Some(Err(error)) => {
                        eprintln!("stopped at {} (resume with --from)", position(&events));
                        return Err(error.into());
                    }
                    None => break,
                }
            }
            eprintln!("stopped at {} (resume with --from)", position(&events));
        }
    }
    Ok(())
}
