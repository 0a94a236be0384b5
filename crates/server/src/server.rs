//! Start-up, serving and shutdown of a node.
//!
//! Order matters: lock the data directory, read the TLS and token files (a bad file fails
//! before a long recovery), start the HTTP listener (`/healthz` answers and `/readyz` says 503
//! from here on), recover (nothing is served before recovery ends), bind the gRPC listener (so
//! "address in use" is reported before anything else), announce the address on stdout, serve
//! until a shutdown signal or a fatal log error, then drain in-flight requests and flush + fsync
//! the log. A fatal error (the log is poisoned) stops the node with an error: it never retries
//! an fsync.
//!
//! The wire port (`wire_listen`) carries the hot path in the lean binary protocol of
//! [`crate::wire`], with the same tokens and the same TLS certificates (rustls directly);
//! it is stopped before the gRPC server drains.
//!
//! The gRPC port carries Sequence, Presence, Admin and the standard `grpc.health.v1.Health`
//! service, all behind [`EdgeLayer`] (bearer tokens when configured, per-call metrics), over
//! TLS when configured (mTLS when a client CA is configured). Listening beyond loopback with
//! neither TLS nor tokens logs a loud warning.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use imstate_log::FileStorage;
use imstate_proto::v1::admin_server::AdminServer;
use imstate_proto::v1::presence_server::PresenceServer;
use imstate_proto::v1::replication_server::ReplicationServer;
use imstate_proto::v1::sequence_server::SequenceServer;
use tokio::net::TcpListener;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use crate::config::NodeConfig;
use crate::grpc::edge::{EdgeLayer, Tokens};
use crate::grpc::limits;
use crate::grpc::{AdminService, PresenceService, ReplicationService, SequenceService};
use crate::http::Health;
use crate::wire::WireContext;
use imstate_node::NodeError;
use imstate_node::clock::SystemClock;
use imstate_node::cluster::{Cluster, ClusterOptions};
use imstate_node::clusterseq::ClusterSeq;
use imstate_node::datadir::DataDir;
use imstate_node::history::{History, LogKind};
use imstate_node::metrics::{LOG_PRESENCE, LOG_SEQ};
use imstate_node::presencestore::PresenceStore;
use imstate_node::seqstore::{SeqStore, SeqStoreOptions};
use imstate_node::sequences::Sequences;

/// Longest a stopping node waits for in-flight gRPC calls before it flushes the log and exits.
/// Watch streams are ended at once (UNAVAILABLE, "the node is stopping"), so only a call that
/// is still running, or a client that stopped reading its replies, takes this long.
pub const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The TLS and token material of the client ports, read from the files the configuration
/// names: one set of certificates for gRPC (tonic) and the wire port (rustls directly).
#[derive(Clone, Default)]
struct Security {
    tls: Option<ServerTlsConfig>,
    /// Cluster mode with TLS: how a replica connects to its primary (`None` without a peer
    /// CA: no replication, said at start).
    peer_tls: Option<tonic::transport::ClientTlsConfig>,
    wire_tls: Option<imstate_wire::tls::TlsAcceptor>,
    tokens: Option<Arc<Tokens>>,
}

/// An error with its sources on one line (tonic hides the useful part in a source).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

fn read_file(key: &str, path: &std::path::Path) -> Result<Vec<u8>, NodeError> {
    std::fs::read(path).map_err(|error| {
        NodeError::Config(format!("{key}: cannot read {}: {error}", path.display()))
    })
}

impl Security {
    fn load(config: &NodeConfig) -> Result<Self, NodeError> {
        let (tls, wire_tls, peer_tls) = if config.tls.enabled() {
            let cert = read_file("tls.cert_file", &config.tls.cert_file)?;
            let key = read_file("tls.key_file", &config.tls.key_file)?;
            let client_ca = if config.tls.client_ca_file.as_os_str().is_empty() {
                None
            } else {
                Some(read_file("tls.client_ca_file", &config.tls.client_ca_file)?)
            };
            let peer_ca = if config.tls.peer_ca_file.as_os_str().is_empty() {
                client_ca.clone()
            } else {
                Some(read_file("tls.peer_ca_file", &config.tls.peer_ca_file)?)
            };
            let peer_tls = peer_ca.map(|ca| {
                tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(ca))
                    .identity(Identity::from_pem(cert.clone(), key.clone()))
            });
            // Parse the PEM now, so bad material fails before a long recovery, not after.
            let wire = imstate_wire::tls::server_config(&cert, &key, client_ca.as_deref())
                .map_err(|error| NodeError::Config(error.to_string()))?;
            let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(cert, key));
            if let Some(ca) = client_ca {
                tls = tls.client_ca_root(Certificate::from_pem(ca));
            }
            tonic::transport::Server::builder()
                .tls_config(tls.clone())
                .map_err(|error| NodeError::Config(format!("tls: {}", error_chain(&error))))?;
            (
                Some(tls),
                Some(imstate_wire::tls::TlsAcceptor::from(wire)),
                peer_tls,
            )
        } else {
            (None, None, None)
        };
        let tokens = if config.auth.enabled() {
            let text = read_file("auth.token_file", &config.auth.token_file)?;
            let text = String::from_utf8(text).map_err(|_| {
                NodeError::Config("auth.token_file: the file is not UTF-8 text".into())
            })?;
            let tokens = Tokens::parse(&text).map_err(|reason| {
                NodeError::Config(format!(
                    "auth.token_file {}: {reason}",
                    config.auth.token_file.display()
                ))
            })?;
            Some(Arc::new(tokens))
        } else {
            None
        };
        Ok(Self {
            tls,
            peer_tls,
            wire_tls,
            tokens,
        })
    }
}

/// A recovered node, ready to serve.
pub struct Node {
    config: NodeConfig,
    /// Held for the life of the node: the data directory lock.
    _data_dir: DataDir,
    /// The identity of the presence log (replicas' positions refer to it).
    presence_log_id: String,
    /// The history markers, recorded again at clean shutdown.
    history: History,
    seq: Sequences,
    presence: Arc<PresenceStore>,
    health: Arc<Health>,
    security: Security,
}

impl Node {
    /// Locks the data directory and recovers every store from it.
    pub async fn open(config: NodeConfig) -> Result<Self, NodeError> {
        config.validate()?;
        let data_dir = DataDir::open(&config.data_dir)?;
        let security = Security::load(&config)?;
        Self::recover(config, data_dir, security, Arc::new(Health::default())).await
    }

    /// Recovers every store from a locked data directory, reporting to `health`.
    async fn recover(
        config: NodeConfig,
        data_dir: DataDir,
        security: Security,
        health: Arc<Health>,
    ) -> Result<Self, NodeError> {
        let mut history = History::check(data_dir.root())?;
        let presence_log_id = data_dir.presence_log_id()?;
        let options = SeqStoreOptions {
            batch_ids_max: config.seq.batch_ids_max,
            raise_wait_timeout: config.seq.raise_wait_timeout(),
            checkpoint_log_bytes: config.seq.checkpoint_log_bytes,
            sections_max: config.seq.sections_max,
        };
        let declared = config
            .seq
            .namespaces
            .iter()
            .map(|namespace| {
                namespace.to_def().map_err(|error| {
                    NodeError::Config(format!("seq.namespaces `{}`: {error}", namespace.name))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let seq = if config.cluster.enabled() {
            let cluster = join_cluster(&config).await?;
            Sequences::Cluster(ClusterSeq::open(cluster, options, &declared).await?)
        } else {
            let started = Instant::now();
            let storage =
                FileStorage::new(data_dir.seq_dir()).map_err(|error| NodeError::DataDir {
                    dir: data_dir.seq_dir(),
                    reason: error.to_string(),
                })?;
            let (seq, stats) = SeqStore::open(storage, options, &declared).await?;
            warn_skipped_checkpoints("sequence", &stats);
            history.check_recovered(LogKind::Seq, stats.last_lsn, seq.log().last_lsn())?;
            imstate_node::metrics::recovered(LOG_SEQ, &stats, started.elapsed());
            imstate_node::metrics::observe_log(seq.log(), LOG_SEQ);
            tracing::info!(
                data_dir = %config.data_dir.display(),
                checkpoint_lsn = ?stats.checkpoint_lsn,
                records_replayed = stats.records_replayed,
                bytes_replayed = stats.bytes_replayed,
                truncated_tail_bytes = stats.truncated_tail_bytes,
                sections_loaded = seq.sections_loaded(),
                elapsed_ms = started.elapsed().as_millis() as u64,
                "recovered sequence store"
            );
            Sequences::Embedded {
                store: seq,
                advertise: config.listen.to_string(),
                advertise_wire: config.wire_listen.to_string(),
            }
        };
        let started = Instant::now();
        let storage =
            FileStorage::new(data_dir.presence_dir()).map_err(|error| NodeError::DataDir {
                dir: data_dir.presence_dir(),
                reason: error.to_string(),
            })?;
        let options = config.presence.to_options()?;
        let (presence, stats) = PresenceStore::open(storage, options, Arc::new(SystemClock))?;
        warn_skipped_checkpoints("presence", &stats);
        history.check_recovered(LogKind::Presence, stats.last_lsn, presence.log().last_lsn())?;
        imstate_node::metrics::recovered(LOG_PRESENCE, &stats, started.elapsed());
        imstate_node::metrics::observe_log(presence.log(), LOG_PRESENCE);
        tracing::info!(
            checkpoint_lsn = ?stats.checkpoint_lsn,
            records_replayed = stats.records_replayed,
            bytes_replayed = stats.bytes_replayed,
            truncated_tail_bytes = stats.truncated_tail_bytes,
            sessions = presence.online_count_now(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "recovered presence registry"
        );
        if let Sequences::Cluster(cluster_seq) = &seq {
            // Presence requests go through the slot ownership check from now on.
            presence.set_gate(Arc::clone(cluster_seq.cluster()) as _);
            // Replicas read this node's recent changes from the feed.
            presence.enable_feed(imstate_node::feed::FeedLimits {
                bytes_max: usize::try_from(config.presence.replication_feed_bytes)
                    .unwrap_or(usize::MAX),
            });
            // Replica streams are booked in both modes; writes wait for them under "sync".
            presence.set_sync(imstate_node::syncacks::SyncAcks::new(
                std::time::Duration::from_millis(config.presence.replica_ack_timeout_ms),
                config.presence.replication == "sync",
            ));
            presence.set_require_replica(config.presence.require_replica);
            if config.presence.replica_checkpoints {
                presence.set_parts(Arc::new(imstate_node::parts::CheckpointParts::new()));
            }
            if let Some(acks) = presence.sync_acks() {
                imstate_node::counted::spawn(
                    Arc::clone(cluster_seq.cluster()),
                    Arc::clone(acks),
                    &presence,
                );
            }
            // ... and the node keeps only the sessions of slots it is primary of.
            imstate_node::cluster::spawn_slot_keeper(
                Arc::clone(cluster_seq.cluster()),
                Arc::clone(&presence),
            );
        }
        health.recovered(seq.clone(), Arc::clone(&presence));
        Ok(Self {
            config,
            presence_log_id,
            _data_dir: data_dir,
            history,
            seq,
            presence,
            health,
            security,
        })
    }

    /// Readiness and uptime of this node, as `/readyz` sees them.
    pub fn health(&self) -> &Arc<Health> {
        &self.health
    }

    /// The presence store.
    pub fn presence(&self) -> &Arc<PresenceStore> {
        &self.presence
    }

    /// The sequence store (embedded or cluster).
    pub fn seq(&self) -> &Sequences {
        &self.seq
    }

    /// Serves on the configured addresses until `shutdown` resolves or the log fails; then
    /// flushes the log. `on_listening` is told the bound addresses (useful with port 0).
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send,
        on_listening: impl FnOnce(Listening),
    ) -> Result<(), NodeError> {
        let (listener, address) = bind(self.config.listen, "listen").await?;
        let (wire_listener, wire_address) = bind(self.config.wire_listen, "wire_listen").await?;
        warn_if_exposed(&self.config, address);
        warn_if_exposed(&self.config, wire_address);
        let resp_listener = match self.config.resp_address()? {
            Some(address) => {
                let bound = bind(address, "resp_listen").await?;
                crate::resp::ensure_default_namespace(
                    &self.seq,
                    &self.config.resp.default_namespace,
                )
                .await?;
                Some(bound)
            }
            None => None,
        };
        let incoming = TcpListenerStream::new(listener).map(|stream| {
            let stream = stream?;
            // Replies are small and latency-bound: never wait for Nagle.
            stream.set_nodelay(true)?;
            Ok::<_, std::io::Error>(stream)
        });
        let incoming = limits::limit_connections(incoming, limits::GRPC_CONNECTIONS_MAX);
        let seq = match &self.seq {
            // The route table names the address actually bound (port 0 picks one).
            Sequences::Embedded { store, .. } => Sequences::Embedded {
                store: Arc::clone(store),
                advertise: address.to_string(),
                advertise_wire: wire_address.to_string(),
            },
            cluster => cluster.clone(),
        };
        let sequence = SequenceService::new(seq.clone());
        let presence = PresenceService::new(Arc::clone(&self.presence), &self.presence_log_id);
        let admin = AdminService::new(
            seq.clone(),
            Arc::clone(&self.presence),
            Arc::clone(&self.health),
            self.config.presence.fsync.clone(),
        );
        let (reporter, health_service) = tonic_health::server::health_reporter();
        reporter
            .set_serving::<SequenceServer<SequenceService>>()
            .await;
        reporter
            .set_serving::<PresenceServer<PresenceService>>()
            .await;
        reporter.set_serving::<AdminServer<AdminService>>().await;
        let (wire_stop, wire_stopped) = tokio::sync::watch::channel(false);
        let wire_limits = self.config.wire.to_limits()?;
        let wire = tokio::spawn(crate::wire::serve(
            wire_listener,
            WireContext::new(
                seq.clone(),
                Arc::clone(&self.presence),
                self.security.tokens.clone(),
                wire_limits,
                self.security.wire_tls.clone(),
            ),
            wire_stopped.clone(),
        ));
        let resp_address = resp_listener.as_ref().map(|(_, address)| *address);
        let resp = resp_listener.map(|(listener, _)| {
            tokio::spawn(crate::resp::serve(
                listener,
                crate::resp::RespContext::new(
                    seq.clone(),
                    self.security.tokens.clone(),
                    wire_limits,
                    self.config.resp.default_namespace.clone(),
                ),
                wire_stopped,
            ))
        });
        let health = Arc::clone(&self.health);
        let watch_hub = Arc::clone(self.presence.watch());
        let (draining_tx, draining_rx) = tokio::sync::oneshot::channel::<()>();
        let embedded = self.seq.embedded().cloned();
        // Cluster mode has no sequence log: a channel that never fires (its sender lives in
        // the stop future), not a closed one, which would stop the node at once.
        let (never_fatal, never) = tokio::sync::watch::channel(None);
        let mut seq_fatal = match &embedded {
            Some(store) => store.fatal(),
            None => never,
        };
        let presence_store = Arc::clone(&self.presence);
        let mut presence_fatal = self.presence.fatal();
        let seq_poisoned = async move {
            match embedded {
                Some(store) => store.log().poisoned().await,
                None => std::future::pending().await,
            }
        };
        let stop = async move {
            let _never_fatal = never_fatal;
            tokio::select! {
                () = shutdown => None,
                // Whichever path met the failure (a request, the flusher, the syncer, a
                // checkpoint), a poisoned log stops the node at once.
                reason = seq_poisoned => Some(format!("sequence log: {reason}")),
                reason = presence_store.log().poisoned() => {
                    Some(format!("presence log: {reason}"))
                }
                reason = seq_fatal.wait_for(|reason| reason.is_some()) => {
                    reason.ok().and_then(|reason| reason.clone())
                }
                reason = presence_fatal.wait_for(|reason| reason.is_some()) => {
                    reason.ok().and_then(|reason| reason.clone())
                }
            }
        };
        // Cluster mode: presence replication, both sides (see `crate::follower`).
        let (replication_stop, replication_stopping) = tokio::sync::watch::channel(false);
        let replication = match (&seq, self.presence.feed()) {
            (Sequences::Cluster(cluster_seq), Some(feed)) => {
                let cluster = Arc::clone(cluster_seq.cluster());
                if self.security.tls.is_some() && self.security.peer_tls.is_none() {
                    tracing::warn!(
                        "presence replication is off: this node serves TLS and has no CA to \
                         verify its peers (set tls.peer_ca_file, or tls.client_ca_file); a \
                         promoted replica starts without the sessions"
                    );
                } else {
                    crate::follower::spawn(
                        Arc::clone(&cluster),
                        Arc::clone(&self.presence),
                        self.security
                            .tokens
                            .as_ref()
                            .map(|tokens| tokens.peer_token().to_vec()),
                        self.security.peer_tls.clone(),
                        replication_stopping.clone(),
                    );
                }
                Some(
                    ReplicationServer::new(ReplicationService::new(
                        Arc::clone(&self.presence),
                        self.presence_log_id.clone(),
                        cluster,
                        Arc::clone(feed),
                        self.presence.sync_acks().cloned(),
                        replication_stopping,
                    ))
                    .max_decoding_message_size(limits::GRPC_REQUEST_BYTES_MAX),
                )
            }
            _ => None,
        };
        let (stopped_tx, stopped_rx) = tokio::sync::oneshot::channel();
        let mut builder = tonic::transport::Server::builder()
            .max_concurrent_streams(limits::GRPC_STREAMS_PER_CONNECTION_MAX)
            .http2_max_header_list_size(limits::GRPC_HEADER_LIST_BYTES_MAX)
            .timeout(limits::GRPC_CALL_TIMEOUT);
        if let Some(tls) = self.security.tls.clone() {
            builder = builder
                .tls_config(tls)
                .map_err(|error| NodeError::Config(format!("tls: {}", error_chain(&error))))?;
        }
        let serve = builder
            .layer(EdgeLayer::new(self.security.tokens.clone()))
            .add_service(health_service)
            .add_service(
                SequenceServer::new(sequence)
                    .max_decoding_message_size(limits::GRPC_REQUEST_BYTES_MAX)
                    .max_encoding_message_size(limits::GRPC_REPLY_BYTES_MAX),
            )
            .add_service(
                PresenceServer::new(presence)
                    .max_decoding_message_size(limits::GRPC_REQUEST_BYTES_MAX)
                    .max_encoding_message_size(limits::GRPC_REPLY_BYTES_MAX),
            )
            .add_service(
                AdminServer::new(admin)
                    .max_decoding_message_size(limits::GRPC_REQUEST_BYTES_MAX)
                    .max_encoding_message_size(limits::GRPC_REPLY_BYTES_MAX),
            )
            .add_optional_service(replication)
            .serve_with_incoming_shutdown(incoming, async move {
                let reason = stop.await;
                health.stopping();
                let _ = draining_tx.send(());
                // Streams never end by themselves: end them now, so draining can finish.
                watch_hub.stop();
                let _ = replication_stop.send(true);
                let _ = wire_stop.send(true);
                reporter
                    .set_not_serving::<SequenceServer<SequenceService>>()
                    .await;
                reporter
                    .set_not_serving::<PresenceServer<PresenceService>>()
                    .await;
                reporter
                    .set_not_serving::<AdminServer<AdminService>>()
                    .await;
                reporter
                    .set_service_status("", tonic_health::ServingStatus::NotServing)
                    .await;
                let _ = stopped_tx.send(reason);
            });
        self.health.serving();
        on_listening(Listening {
            grpc: address,
            wire: wire_address,
            resp: resp_address,
        });
        // Draining waits for in-flight calls, but never longer than DRAIN_TIMEOUT: a client
        // that stopped reading must not keep the node from stopping.
        let drain_deadline = async move {
            if draining_rx.await.is_ok() {
                tokio::time::sleep(DRAIN_TIMEOUT).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            served = serve => {
                served.map_err(|error| NodeError::Io(format!("server: {error}")))?;
            }
            () = drain_deadline => {
                tracing::warn!(
                    timeout_ms = DRAIN_TIMEOUT.as_millis() as u64,
                    "gRPC calls still in flight at the drain timeout; stopping without them"
                );
            }
        }
        let _ = wire.await;
        if let Some(resp) = resp {
            let _ = resp.await;
        }
        let reason = stopped_rx.await.ok().flatten();
        if let Some(reason) = reason {
            tracing::error!(%reason, "stopping: the log failed");
            return Err(NodeError::Unavailable(reason));
        }
        match &self.seq {
            Sequences::Embedded { store, .. } => {
                store.shutdown()?;
                self.history.record(LogKind::Seq, store.log().last_lsn())?;
            }
            // Revoking the lease moves this node's sections at once, not after the TTL.
            Sequences::Cluster(store) => store.cluster().leave().await,
        }
        self.presence.shutdown()?;
        self.history
            .record(LogKind::Presence, self.presence.log().last_lsn())?;
        tracing::info!("stopped cleanly; the log is flushed");
        Ok(())
    }
}

/// Connects to etcd (retrying with backoff while it is unreachable: `/readyz` says why) and
/// joins the cluster.
async fn join_cluster(config: &NodeConfig) -> Result<Arc<Cluster>, NodeError> {
    let endpoints = config.cluster.endpoints();
    let timeout = std::time::Duration::from_millis((config.cluster.lease_ttl_ms / 3).max(300));
    let mut backoff = std::time::Duration::from_millis(200);
    let coordinator = loop {
        match imstate_coord_etcd::EtcdCoordinator::connect(&endpoints, timeout).await {
            Ok(coordinator) => break coordinator,
            Err(error) => {
                tracing::warn!(%error, retry_ms = backoff.as_millis() as u64, "etcd unreachable; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(std::time::Duration::from_secs(5));
            }
        }
    };
    let advertise = if config.cluster.advertise.is_empty() {
        config.listen.to_string()
    } else {
        config.cluster.advertise.clone()
    };
    let advertise_wire = if config.cluster.advertise_wire.is_empty() {
        config.wire_listen.to_string()
    } else {
        config.cluster.advertise_wire.clone()
    };
    let cluster = Cluster::start(
        ClusterOptions {
            name: config.cluster.name.clone(),
            node: config.cluster.node_id.clone(),
            advertise,
            advertise_wire,
            lease_ttl_ms: config.cluster.lease_ttl_ms,
            moves_max: config.cluster.moves_max,
            presence_slots: config.presence.slots,
            orphan_grace_ms: config.cluster.orphan_grace_ms,
        },
        Arc::new(coordinator),
    );
    // Registration: a node id held by a live lease of another process is refused, after
    // waiting long enough for this node's own previous run to lapse.
    let deadline =
        Instant::now() + std::time::Duration::from_millis(3 * config.cluster.lease_ttl_ms);
    loop {
        let status = cluster.status();
        if status.registered {
            break;
        }
        if Instant::now() > deadline {
            let reason = match status.blocked_by {
                Some(holder) => format!(
                    "node id `{}` is already registered in cluster `{}` by another live \
                     process ({holder}); give this node another --node-id",
                    status.node, status.cluster
                ),
                None => format!(
                    "could not register in cluster `{}` through {}",
                    status.cluster,
                    cluster.coordinator().describe()
                ),
            };
            cluster.leave().await;
            return Err(NodeError::Config(reason));
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    tracing::info!(
        cluster = %config.cluster.name,
        node = %config.cluster.node_id,
        etcd = %endpoints.join(","),
        "joined the cluster"
    );
    Ok(cluster)
}

/// Warns once per checkpoint that recovery found invalid and passed over.
fn warn_skipped_checkpoints(store: &str, stats: &imstate_log::RecoveryStats) {
    for skipped in &stats.skipped_checkpoints {
        tracing::warn!(
            store,
            checkpoint = %skipped,
            "skipped an invalid checkpoint; recovered from an older checkpoint and the log"
        );
    }
}

/// The addresses a serving node is bound to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Listening {
    /// The gRPC listener.
    pub grpc: SocketAddr,
    /// The wire-protocol listener.
    pub wire: SocketAddr,
    /// The RESP front door, when `resp_listen` is set.
    pub resp: Option<SocketAddr>,
}

/// Binds a listener for the configuration key `key`; "address in use" names the key.
async fn bind(address: SocketAddr, key: &str) -> Result<(TcpListener, SocketAddr), NodeError> {
    let listener = TcpListener::bind(address)
        .await
        .map_err(|error| NodeError::Io(format!("cannot listen on {address} ({key}): {error}")))?;
    let bound = listener
        .local_addr()
        .map_err(|error| NodeError::Io(format!("listener address: {error}")))?;
    Ok((listener, bound))
}

/// Logs a loud warning when a client port is reachable beyond loopback without TLS or tokens.
fn warn_if_exposed(config: &NodeConfig, address: SocketAddr) {
    if is_exposed(config, address) {
        tracing::warn!(
            %address,
            "SECURITY: a client port is listening beyond loopback with NEITHER TLS NOR token \
             auth; anyone who can reach this address can read and change state. Set [tls] \
             and/or [auth] (see `imstate config example`)."
        );
    }
}

/// Whether the gRPC port is reachable beyond loopback with neither TLS nor tokens.
fn is_exposed(config: &NodeConfig, address: SocketAddr) -> bool {
    !address.ip().is_loopback() && !config.tls.enabled() && !config.auth.enabled()
}

/// Opens a node with `config` and serves until `shutdown` resolves: the start-up order of the
/// module doc, with the HTTP listener (metrics and health) up before recovery.
pub async fn run(
    config: NodeConfig,
    shutdown: impl Future<Output = ()> + Send,
    on_listening: impl FnOnce(Listening),
) -> Result<(), NodeError> {
    config.validate()?;
    let effective: Vec<String> = config
        .to_toml()
        .lines()
        .filter(|line| !line.is_empty())
        .map(str::to_string)
        .collect();
    // The configuration holds paths to secrets, never secrets, so it is logged whole.
    tracing::info!(config = %effective.join("; "), "effective configuration");
    let data_dir = DataDir::open(&config.data_dir)?;
    let security = Security::load(&config)?;
    let health = Arc::new(Health::default());
    let http = crate::http::start(
        config.metrics_listen,
        Arc::clone(&health),
        imstate_node::metrics::install(),
    )?;
    tracing::info!(address = %http.address(), "HTTP listening: /metrics /healthz /readyz");
    let node = Node::recover(config, data_dir, security, health).await?;
    let result = node.serve(shutdown, on_listening).await;
    drop(http);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_non_loopback_without_tls_or_tokens_is_exposed() {
        let mut config = NodeConfig::default();
        let public: SocketAddr = "0.0.0.0:7700".parse().unwrap();
        let loopback: SocketAddr = "127.0.0.1:7700".parse().unwrap();
        let loopback_v6: SocketAddr = "[::1]:7700".parse().unwrap();
        assert!(is_exposed(&config, public));
        assert!(!is_exposed(&config, loopback));
        assert!(!is_exposed(&config, loopback_v6));
        config.auth.token_file = "tokens".into();
        assert!(!is_exposed(&config, public));
        config.auth.token_file = Default::default();
        config.tls.cert_file = "cert.pem".into();
        assert!(!is_exposed(&config, public));
    }
}
