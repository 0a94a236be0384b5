//! The imstate target of `imstate bench`: each driver owns one connection (one HTTP/2 channel)
//! shared by its `--inflight` tasks (that many HTTP/2 streams in flight).

use anyhow::bail;
use imstate_client::{Client, LoginArgs};

use super::workload::{SessionKey, gateway_name};
use super::{Driver, KeyPicker, RunConfig, Workload};

/// Sends the workload's requests to one imstate node over one connection.
pub struct ImstateDriver {
    client: Client,
    workload: Workload,
    namespace: String,
    ttl_ms: u32,
}

impl ImstateDriver {
    /// Opens a connection to `address`.
    pub async fn connect(address: &str, config: &RunConfig) -> anyhow::Result<Self> {
        Ok(Self {
            client: config.security.connect(address).await?,
            workload: config.workload,
            namespace: config.ns.clone(),
            ttl_ms: config
                .ttl_s
                .saturating_mul(1_000)
                .try_into()
                .unwrap_or(u32::MAX),
        })
    }

    /// Logs in one session.
    pub async fn login(&self, session: &SessionKey) -> anyhow::Result<()> {
        self.client
            .login(LoginArgs {
                uid: session.uid,
                device: session.device_name(),
                gateway: session.gateway_name(),
                conn: session.conn,
                ttl_ms: self.ttl_ms,
                meta: Vec::new(),
            })
            .await?;
        Ok(())
    }
}

impl Driver for ImstateDriver {
    async fn call(&self, keys: &mut KeyPicker) -> anyhow::Result<u64> {
        match self.workload {
            Workload::SeqNext => {
                self.client.next(&self.namespace, keys.key()).await?;
                Ok(1)
            }
            Workload::SeqFanout => {
                let ids = keys.keys();
                let count = ids.len() as u64;
                self.client.next_batch(&self.namespace, ids).await?;
                Ok(count)
            }
            Workload::PresenceLogin => {
                self.login(&keys.login()).await?;
                Ok(1)
            }
            Workload::PresenceHeartbeatBatch => {
                let (gateway, sessions) = keys.heartbeat_batch();
                let pairs: Vec<(u64, u64)> = sessions.iter().map(|s| (s.uid, s.conn)).collect();
                let unknown = self
                    .client
                    .heartbeat_batch(&gateway_name(gateway), &pairs)
                    .await?;
                Ok((pairs.len() - unknown.len().min(pairs.len())) as u64)
            }
            Workload::PresenceLookupBatch => {
                let uids = keys.keys();
                let count = uids.len() as u64;
                self.client.lookup_batch_count(uids).await?;
                Ok(count)
            }
            Workload::Mixed => {
                let uids = keys.keys();
                let count = uids.len() as u64;
                self.client.lookup_batch_count(uids.clone()).await?;
                let allocated = self.client.next_batch(&self.namespace, uids).await?;
                if allocated.len() as u64 != count {
                    bail!(
                        "NextBatch returned {} seqs for {count} ids",
                        allocated.len()
                    );
                }
                Ok(count)
            }
        }
    }
}
