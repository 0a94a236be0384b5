//! The Redis target of `imstate bench`: each driver owns one TCP connection ([`resp`]) shared
//! by its `--inflight` tasks, and a request of a batch workload is one pipeline (or one EVALSHA).
//!
//! Key layout, as open-source IM servers keep it in Redis:
//!
//! ```text
//!  seq:{id}      string counter (INCR)
//!  user:{uid}    hash conn -> gateway (HSET), with a ttl (EXPIRE), read with HGETALL
//! ```
//!
//! [`resp`]: super::resp

use anyhow::anyhow;
use clap::ValueEnum;

use super::resp::{Connection, Pipeline};
use super::workload::SessionKey;
use super::{Driver, KeyPicker, RunConfig, Workload};

/// Increments every key given and returns the new values; one round trip for K counters.
pub const FANOUT_SCRIPT: &str =
    "local r = {} for i, k in ipairs(KEYS) do r[i] = redis.call('INCR', k) end return r";

/// How Redis serves a seq fan-out (K counters in one request).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum RedisFanout {
    /// K pipelined INCR commands.
    Pipeline,
    /// One EVALSHA of [`FANOUT_SCRIPT`] over K keys.
    Lua,
}

/// Sends the workload's requests to Redis over one connection.
pub struct RedisDriver {
    connection: Connection,
    workload: Workload,
    fanout: RedisFanout,
    /// The SHA1 of [`FANOUT_SCRIPT`] as loaded on this server.
    script_sha: String,
    ttl_s: String,
}

fn seq_key(id: u64) -> String {
    format!("seq:{id}")
}

fn user_key(uid: u64) -> String {
    format!("user:{uid}")
}

impl RedisDriver {
    /// Opens a connection to `address` and loads the fan-out script.
    pub async fn connect(address: &str, config: &RunConfig) -> anyhow::Result<Self> {
        let connection = Connection::connect(address).await?;
        let script_sha = connection
            .command(&[b"SCRIPT", b"LOAD", FANOUT_SCRIPT.as_bytes()])
            .await?
            .text()?;
        Ok(Self {
            connection,
            workload: config.workload,
            fanout: config.redis_fanout,
            script_sha,
            ttl_s: config.ttl_s.to_string(),
        })
    }

    /// Appends the login of `session` (HSET + EXPIRE) to `pipeline`.
    fn push_login(&self, pipeline: &mut Pipeline, session: &SessionKey) {
        let key = user_key(session.uid);
        let conn = session.conn.to_string();
        let gateway = session.gateway_name();
        pipeline.command(&[b"HSET", key.as_bytes(), conn.as_bytes(), gateway.as_bytes()]);
        pipeline.command(&[b"EXPIRE", key.as_bytes(), self.ttl_s.as_bytes()]);
    }

    /// Logs in `sessions` in one pipeline (preload and memory loading).
    pub async fn login_many(&self, sessions: &[SessionKey]) -> anyhow::Result<()> {
        let mut pipeline = Pipeline::new();
        for session in sessions {
            self.push_login(&mut pipeline, session);
        }
        for reply in self.connection.send(pipeline).await? {
            reply.integer()?;
        }
        Ok(())
    }

    /// Allocates the next value of each id; returns how many were allocated.
    async fn fanout(&self, ids: &[u64]) -> anyhow::Result<u64> {
        let keys: Vec<String> = ids.iter().map(|&id| seq_key(id)).collect();
        match self.fanout {
            RedisFanout::Pipeline => {
                let mut pipeline = Pipeline::new();
                for key in &keys {
                    pipeline.command(&[b"INCR", key.as_bytes()]);
                }
                let replies = self.connection.send(pipeline).await?;
                for reply in &replies {
                    reply.integer()?;
                }
                Ok(replies.len() as u64)
            }
            RedisFanout::Lua => {
                let count = keys.len().to_string();
                let mut args: Vec<&[u8]> = Vec::with_capacity(keys.len() + 3);
                args.push(b"EVALSHA");
                args.push(self.script_sha.as_bytes());
                args.push(count.as_bytes());
                args.extend(keys.iter().map(|key| key.as_bytes()));
                let reply = self.connection.command(&args).await?;
                let values = reply.array()?;
                for value in values {
                    value.integer()?;
                }
                Ok(values.len() as u64)
            }
        }
    }

    /// Reads the sessions of each uid; returns the number of sessions found.
    async fn lookup(&self, uids: &[u64]) -> anyhow::Result<u64> {
        let mut pipeline = Pipeline::new();
        for &uid in uids {
            pipeline.command(&[b"HGETALL", user_key(uid).as_bytes()]);
        }
        let mut sessions = 0;
        for reply in self.connection.send(pipeline).await? {
            sessions += reply.array()?.len() as u64 / 2;
        }
        Ok(sessions)
    }
}

impl Driver for RedisDriver {
    async fn call(&self, keys: &mut KeyPicker) -> anyhow::Result<u64> {
        match self.workload {
            Workload::SeqNext => {
                let key = seq_key(keys.key());
                self.connection
                    .command(&[b"INCR", key.as_bytes()])
                    .await?
                    .integer()?;
                Ok(1)
            }
            Workload::SeqFanout => self.fanout(&keys.keys()).await,
            Workload::PresenceLogin => {
                let session = keys.login();
                self.login_many(std::slice::from_ref(&session)).await?;
                Ok(1)
            }
            Workload::PresenceHeartbeatBatch => {
                let (_, sessions) = keys.heartbeat_batch();
                let mut pipeline = Pipeline::new();
                for session in &sessions {
                    pipeline.command(&[
                        b"EXPIRE",
                        user_key(session.uid).as_bytes(),
                        self.ttl_s.as_bytes(),
                    ]);
                }
                let mut refreshed = 0;
                for reply in self.connection.send(pipeline).await? {
                    // 0 = the key does not exist: the session is unknown, as imstate reports.
                    refreshed += reply.integer()? as u64;
                }
                Ok(refreshed)
            }
            Workload::PresenceLookupBatch => {
                let uids = keys.keys();
                self.lookup(&uids).await?;
                Ok(uids.len() as u64)
            }
            Workload::Mixed => {
                let uids = keys.keys();
                self.lookup(&uids).await?;
                self.fanout(&uids).await?;
                Ok(uids.len() as u64)
            }
        }
    }
}

/// Reads one field of `INFO section` as an integer.
pub async fn info_field(
    connection: &Connection,
    section: &str,
    field: &str,
) -> anyhow::Result<u64> {
    let text = connection
        .command(&[b"INFO", section.as_bytes()])
        .await?
        .text()?;
    let prefix = format!("{field}:");
    text.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .ok_or_else(|| anyhow!("redis INFO {section} has no field {field}"))?
        .trim()
        .parse()
        .map_err(|error| anyhow!("redis INFO {section} {field}: {error}"))
}
