//! The Admin service (`imstate ctl`): status of the node, forced checkpoints, the route table
//! and (cluster mode) drains.
//!
//! Checkpoints run on tokio's blocking pool (they write and fsync files); each store
//! serializes its own checkpoints, so a forced one and an automatic one never overlap in the
//! same log. The sequence store is checkpointed first, then the presence registry; the first
//! error stops the call and is returned as UNAVAILABLE.

use std::sync::Arc;

use imstate_log::{CheckpointStats, Log};
use imstate_proto::v1 as pb;
use imstate_proto::v1::admin_server::Admin;
use tonic::{Request, Response, Status};

use super::status_from;
use crate::http::Health;
use imstate_node::metrics::{LOG_PRESENCE, LOG_SEQ, checkpoint_done};
use imstate_node::presencestore::PresenceStore;
use imstate_node::sequences::Sequences;

/// The Admin service.
pub struct AdminService {
    seq: Sequences,
    presence: Arc<PresenceStore>,
    health: Arc<Health>,
    /// The presence log's fsync policy as configured (the sequence log is always `always`).
    presence_fsync: String,
}

impl AdminService {
    /// Serves status and checkpoints of these stores.
    pub fn new(
        seq: Sequences,
        presence: Arc<PresenceStore>,
        health: Arc<Health>,
        presence_fsync: String,
    ) -> Self {
        Self {
            seq,
            presence,
            health,
            presence_fsync,
        }
    }
}

fn log_status(name: &str, log: &Log, fsync: &str) -> pb::LogStatus {
    let stats = log.stats();
    pb::LogStatus {
        name: name.to_string(),
        last_lsn: stats.last_lsn,
        durable_lsn: stats.durable_lsn,
        synced_lsn: stats.synced_lsn,
        has_checkpoint: stats.last_checkpoint_lsn.is_some(),
        checkpoint_lsn: stats.last_checkpoint_lsn.unwrap_or(0),
        bytes_since_checkpoint: log.bytes_since_checkpoint(),
        segments: stats.segments as u64,
        poisoned: stats.poisoned,
        fsync: fsync.to_string(),
    }
}

fn checkpoint_to_pb(name: &str, stats: CheckpointStats) -> pb::CheckpointResult {
    pb::CheckpointResult {
        name: name.to_string(),
        covered_lsn: stats.covered_lsn,
        bytes: stats.bytes,
        elapsed_ms: stats.elapsed.as_millis() as u64,
        segments_removed: stats.segments_removed as u64,
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusReply>, Status> {
        let namespaces = self
            .seq
            .namespaces()
            .into_iter()
            .map(imstate_node::sequences::namespace_to_pb)
            .collect();
        let mut logs = Vec::new();
        if let Some(seq) = self.seq.embedded() {
            logs.push(log_status(LOG_SEQ, seq.log(), "always"));
        }
        logs.push(log_status(
            LOG_PRESENCE,
            self.presence.log(),
            &self.presence_fsync,
        ));
        let mut reply = pb::StatusReply {
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_ms: self.health.uptime().as_millis() as u64,
            role: "embedded".into(),
            route_version: self.seq.route_version(),
            namespaces,
            sessions_online: self.presence.online_count_now(),
            logs,
            sections_loaded: self.seq.sections_loaded() as u64,
            ..pb::StatusReply::default()
        };
        if let Sequences::Cluster(store) = &self.seq {
            let status = store.cluster().status();
            reply.role = status.role.into();
            reply.cluster = status.cluster;
            reply.node_id = status.node;
            reply.lease_valid_ms = status.lease_valid_ms;
            reply.sections_owned = status.sections_owned;
            reply.blocked_by = status.blocked_by.unwrap_or_default();
            if let (Some(acks), Some(feed)) = (self.presence.sync_acks(), self.presence.feed()) {
                reply.replicas = acks
                    .followers()
                    .iter()
                    .map(|follower| {
                        let (lag_records, lag) = feed.lag(follower.acked());
                        pb::ReplicaStatus {
                            replica_id: follower.replica().to_owned(),
                            slots: follower.slots().len(),
                            in_sync: follower.in_sync(),
                            acked_lsn: follower.acked(),
                            lag_records,
                            lag_ms: lag.map(|lag| lag.as_millis() as u64),
                        }
                    })
                    .collect();
            }
        }
        Ok(Response::new(reply))
    }

    async fn route(
        &self,
        _request: Request<pb::RouteRequest>,
    ) -> Result<Response<pb::RouteReply>, Status> {
        Ok(Response::new(
            self.seq.route_reply().await.map_err(status_from)?,
        ))
    }

    async fn drain(
        &self,
        request: Request<pb::DrainRequest>,
    ) -> Result<Response<pb::DrainReply>, Status> {
        let request = request.into_inner();
        let Sequences::Cluster(store) = &self.seq else {
            return Err(Status::failed_precondition(
                "drain needs cluster mode: this node runs embedded",
            ));
        };
        if request.node_id.is_empty() || request.node_id.len() > 64 {
            return Err(Status::invalid_argument("node_id must be 1..=64 bytes"));
        }
        let cluster = store.cluster();
        if request.undo {
            cluster.undrain(&request.node_id).await
        } else {
            cluster.drain(&request.node_id).await
        }
        .map_err(status_from)?;
        Ok(Response::new(pb::DrainReply {}))
    }

    async fn checkpoint(
        &self,
        _request: Request<pb::CheckpointRequest>,
    ) -> Result<Response<pb::CheckpointReply>, Status> {
        // Cluster mode keeps max_seq in etcd: only the presence log is checkpointed there.
        let seq = self.seq.embedded().cloned();
        let presence = Arc::clone(&self.presence);
        let joined = tokio::task::spawn_blocking(move || {
            let mut done = Vec::new();
            if let Some(seq) = seq {
                let seq_stats = seq.checkpoint();
                checkpoint_done(LOG_SEQ, seq_stats.is_ok());
                done.push((LOG_SEQ, seq_stats?));
            }
            let presence_stats = presence.checkpoint();
            checkpoint_done(LOG_PRESENCE, presence_stats.is_ok());
            done.push((LOG_PRESENCE, presence_stats?));
            Ok::<_, imstate_node::NodeError>(done)
        })
        .await
        .map_err(|error| Status::internal(format!("checkpoint task: {error}")))?;
        let done = joined.map_err(status_from)?;
        for (name, stats) in &done {
            tracing::info!(
                log = name,
                covered_lsn = stats.covered_lsn,
                "checkpoint forced by Admin/Checkpoint"
            );
        }
        Ok(Response::new(pb::CheckpointReply {
            checkpoints: done
                .into_iter()
                .map(|(name, stats)| checkpoint_to_pb(name, stats))
                .collect(),
        }))
    }
}
