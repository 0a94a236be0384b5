//! The imstate target of `imstate bench`. Each driver owns one connection shared by its
//! `--inflight` tasks:
//!
//! - `imstate://HOST:PORT`, the wire protocol (the node's `wire_listen`): D requests in flight
//!   in one pipeline, coalesced into single writes, exactly like the Redis target;
//! - `imstate+grpc://HOST:PORT`, gRPC (the node's `listen`): one HTTP/2 channel, D streams;
//! - `imstate+cluster://HOST:PORT`, a cluster through any node, with the smart client
//!   (`ClusterClient`): each id to its owner and each uid to its slot's primary, batches
//!   split across them;
//! - `imstate+wire-cluster://HOST:PORT`, the same over the wire protocol through any node's
//!   `wire_listen` (`WireClusterClient`).

use anyhow::bail;
use imstate_client::{Client, ClusterClient, LoginArgs, WireClient, WireClusterClient};

use super::workload::{SessionKey, gateway_name};
use super::{Driver, KeyPicker, RunConfig, Target, Workload};

/// The connection of one driver.
enum Connection {
    Wire(WireClient),
    Grpc(Box<Client>),
    Cluster(Box<ClusterClient>),
    WireCluster(Box<WireClusterClient>),
}

/// Sessions found by a batch lookup.
fn sessions(found: Vec<Vec<imstate_client::Session>>) -> usize {
    found.iter().map(Vec::len).sum()
}

/// Sends the workload's requests to one imstate node over one connection.
pub struct ImstateDriver {
    connection: Connection,
    workload: Workload,
    namespace: String,
    ttl_ms: u32,
}

impl ImstateDriver {
    /// Opens a connection to the imstate `target`.
    pub async fn connect(target: &Target, config: &RunConfig) -> anyhow::Result<Self> {
        let connection = match target {
            Target::Imstate(address) => {
                Connection::Wire(config.security.connect_wire(address).await?)
            }
            Target::ImstateGrpc(address) => {
                Connection::Grpc(Box::new(config.security.connect(address).await?))
            }
            Target::ImstateCluster(address) => Connection::Cluster(Box::new(
                ClusterClient::connect(address, &config.security.options()?, None).await?,
            )),
            Target::ImstateWireCluster(address) => Connection::WireCluster(Box::new(
                WireClusterClient::connect(address, &config.security.options()?, None).await?,
            )),
            Target::Redis(_) => bail!("{} is not an imstate target", target.url()),
        };
        Ok(Self {
            connection,
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
        let args = LoginArgs {
            uid: session.uid,
            device: session.device_name(),
            gateway: session.gateway_name(),
            conn: session.conn,
            ttl_ms: self.ttl_ms,
            meta: Vec::new(),
        };
        match &self.connection {
            Connection::Wire(client) => client.login(&args).await?,
            Connection::Grpc(client) => client.login(args).await?,
            Connection::Cluster(client) => client.login(args).await?,
            Connection::WireCluster(client) => client.login(args).await?,
        };
        Ok(())
    }

    async fn next_batch(&self, ids: Vec<u64>) -> anyhow::Result<Vec<u64>> {
        Ok(match &self.connection {
            Connection::Wire(client) => client.next_batch(&self.namespace, &ids).await?,
            Connection::Grpc(client) => client.next_batch(&self.namespace, ids).await?,
            Connection::Cluster(client) => client.next_batch(&self.namespace, ids).await?,
            Connection::WireCluster(client) => client.next_batch(&self.namespace, ids).await?,
        })
    }

    /// Looks the uids up; returns the number of sessions found (the reply is validated, not
    /// converted).
    async fn lookup_batch_count(&self, uids: Vec<u64>) -> anyhow::Result<usize> {
        Ok(match &self.connection {
            Connection::Wire(client) => client.lookup_batch_count(&uids).await?,
            Connection::Grpc(client) => client.lookup_batch_count(uids).await?,
            Connection::Cluster(client) => sessions(client.lookup_batch(uids).await?),
            Connection::WireCluster(client) => sessions(client.lookup_batch(uids).await?),
        })
    }
}

impl Driver for ImstateDriver {
    async fn call(&self, keys: &mut KeyPicker) -> anyhow::Result<u64> {
        match self.workload {
            Workload::SeqNext => {
                let id = keys.key();
                match &self.connection {
                    Connection::Wire(client) => client.next(&self.namespace, id).await?,
                    Connection::Grpc(client) => client.next(&self.namespace, id).await?,
                    Connection::Cluster(client) => client.next(&self.namespace, id).await?,
                    Connection::WireCluster(client) => client.next(&self.namespace, id).await?,
                };
                Ok(1)
            }
            Workload::SeqFanout => {
                let ids = keys.keys();
                let count = ids.len() as u64;
                self.next_batch(ids).await?;
                Ok(count)
            }
            Workload::PresenceLogin => {
                self.login(&keys.login()).await?;
                Ok(1)
            }
            Workload::PresenceHeartbeatBatch => {
                let (gateway, sessions) = keys.heartbeat_batch();
                let pairs: Vec<(u64, u64)> = sessions.iter().map(|s| (s.uid, s.conn)).collect();
                let gateway = gateway_name(gateway);
                let unknown = match &self.connection {
                    Connection::Wire(client) => client.heartbeat_batch(&gateway, &pairs).await?,
                    Connection::Grpc(client) => client.heartbeat_batch(&gateway, &pairs).await?,
                    Connection::Cluster(client) => {
                        client.heartbeat_batch(&gateway, pairs.clone()).await?
                    }
                    Connection::WireCluster(client) => {
                        client.heartbeat_batch(&gateway, pairs.clone()).await?
                    }
                };
                Ok((pairs.len() - unknown.len().min(pairs.len())) as u64)
            }
            Workload::PresenceLookupBatch => {
                let uids = keys.keys();
                let count = uids.len() as u64;
                self.lookup_batch_count(uids).await?;
                Ok(count)
            }
            Workload::Mixed => {
                let uids = keys.keys();
                let count = uids.len() as u64;
                self.lookup_batch_count(uids.clone()).await?;
                let allocated = self.next_batch(uids).await?;
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
