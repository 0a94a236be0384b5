//! The imstate target of `imstate bench`: each driver owns one connection (one HTTP/2 channel).

use imstate_client::Client;

use super::{BenchArgs, Driver, KeyPicker, Workload};

/// Sends the workload's requests to one imstate node over one connection.
pub struct ImstateDriver {
    client: Client,
    workload: Workload,
    namespace: String,
}

impl ImstateDriver {
    /// Opens a connection to `address`.
    pub async fn connect(address: &str, args: &BenchArgs) -> anyhow::Result<Self> {
        Ok(Self {
            client: Client::connect(address).await?,
            workload: args.workload,
            namespace: args.ns.clone(),
        })
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
        }
    }
}
