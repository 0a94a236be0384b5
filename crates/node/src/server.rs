//! Start-up, serving and shutdown of a node.
//!
//! Order matters: lock the data directory, recover (nothing is served before recovery ends),
//! bind the listener (so "address in use" is reported before anything else), announce the
//! address on stdout, serve until a shutdown signal or a fatal log error, then drain in-flight
//! requests and flush + fsync the log. A fatal error (the log is poisoned) stops the node with an
//! error: it never retries an fsync.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use imstate_log::FileStorage;
use imstate_proto::v1::presence_server::PresenceServer;
use imstate_proto::v1::sequence_server::SequenceServer;
use tokio::net::TcpListener;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::TcpListenerStream;

use crate::NodeError;
use crate::clock::SystemClock;
use crate::config::NodeConfig;
use crate::datadir::DataDir;
use crate::grpc::{PresenceService, SequenceService};
use crate::presencestore::PresenceStore;
use crate::seqstore::{SeqStore, SeqStoreOptions};

/// A recovered node, ready to serve.
pub struct Node {
    config: NodeConfig,
    /// Held for the life of the node: the data directory lock.
    _data_dir: DataDir,
    seq: Arc<SeqStore>,
    presence: Arc<PresenceStore>,
}

impl Node {
    /// Locks the data directory and recovers every store from it.
    pub async fn open(config: NodeConfig) -> Result<Self, NodeError> {
        config.validate()?;
        let data_dir = DataDir::open(&config.data_dir)?;
        let started = Instant::now();
        let storage =
            FileStorage::new(data_dir.seq_dir()).map_err(|error| NodeError::DataDir {
                dir: data_dir.seq_dir(),
                reason: error.to_string(),
            })?;
        let options = SeqStoreOptions {
            batch_ids_max: config.seq.batch_ids_max,
            raise_wait_timeout: config.seq.raise_wait_timeout(),
            checkpoint_log_bytes: config.seq.checkpoint_log_bytes,
        };
        let declared: Vec<_> = config.seq.namespaces.iter().map(|n| n.to_def()).collect();
        let (seq, stats) = SeqStore::open(storage, options, &declared).await?;
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
        let started = Instant::now();
        let storage =
            FileStorage::new(data_dir.presence_dir()).map_err(|error| NodeError::DataDir {
                dir: data_dir.presence_dir(),
                reason: error.to_string(),
            })?;
        let options = config.presence.to_options()?;
        let (presence, stats) = PresenceStore::open(storage, options, Arc::new(SystemClock))?;
        tracing::info!(
            checkpoint_lsn = ?stats.checkpoint_lsn,
            records_replayed = stats.records_replayed,
            bytes_replayed = stats.bytes_replayed,
            truncated_tail_bytes = stats.truncated_tail_bytes,
            sessions = presence.online_count(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "recovered presence registry"
        );
        Ok(Self {
            config,
            _data_dir: data_dir,
            seq,
            presence,
        })
    }

    /// The presence store.
    pub fn presence(&self) -> &Arc<PresenceStore> {
        &self.presence
    }

    /// The sequence store.
    pub fn seq(&self) -> &Arc<SeqStore> {
        &self.seq
    }

    /// Serves on the configured address until `shutdown` resolves or the log fails; then
    /// flushes the log. `on_listening` is told the bound address (useful with port 0).
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send,
        on_listening: impl FnOnce(SocketAddr),
    ) -> Result<(), NodeError> {
        let listener = TcpListener::bind(self.config.listen)
            .await
            .map_err(|error| {
                NodeError::Io(format!("cannot listen on {}: {error}", self.config.listen))
            })?;
        let address = listener
            .local_addr()
            .map_err(|error| NodeError::Io(format!("listener address: {error}")))?;
        on_listening(address);
        let incoming = TcpListenerStream::new(listener).map(|stream| {
            let stream = stream?;
            // Replies are small and latency-bound: never wait for Nagle.
            stream.set_nodelay(true)?;
            Ok::<_, std::io::Error>(stream)
        });
        let sequence = SequenceService::new(Arc::clone(&self.seq), address.to_string());
        let presence = PresenceService::new(Arc::clone(&self.presence));
        let mut seq_fatal = self.seq.fatal();
        let mut presence_fatal = self.presence.fatal();
        let stop = async move {
            tokio::select! {
                () = shutdown => None,
                reason = seq_fatal.wait_for(|reason| reason.is_some()) => {
                    reason.ok().and_then(|reason| reason.clone())
                }
                reason = presence_fatal.wait_for(|reason| reason.is_some()) => {
                    reason.ok().and_then(|reason| reason.clone())
                }
            }
        };
        let (stopped_tx, stopped_rx) = tokio::sync::oneshot::channel();
        let serve = tonic::transport::Server::builder()
            .add_service(SequenceServer::new(sequence))
            .add_service(PresenceServer::new(presence))
            .serve_with_incoming_shutdown(incoming, async move {
                let reason = stop.await;
                let _ = stopped_tx.send(reason);
            });
        serve
            .await
            .map_err(|error| NodeError::Io(format!("server: {error}")))?;
        let reason = stopped_rx.await.ok().flatten();
        if let Some(reason) = reason {
            tracing::error!(%reason, "stopping: the log failed");
            return Err(NodeError::Unavailable(reason));
        }
        self.seq.shutdown()?;
        self.presence.shutdown()?;
        tracing::info!("stopped cleanly; the log is flushed");
        Ok(())
    }
}

/// Opens a node with `config` and serves until `shutdown` resolves.
pub async fn run(
    config: NodeConfig,
    shutdown: impl Future<Output = ()> + Send,
    on_listening: impl FnOnce(SocketAddr),
) -> Result<(), NodeError> {
    Node::open(config)
        .await?
        .serve(shutdown, on_listening)
        .await
}
