//! The node's configuration: defaults that run, a TOML file, and flags on top.
//!
//! Precedence is flags > file > defaults; the binary applies flags after [`NodeConfig::load`].
//! Unknown keys and invalid values are start-up errors that name the key (serde's
//! `deny_unknown_fields` plus [`NodeConfig::validate`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use imstate_seq::NamespaceDef;
use serde::Deserialize;

use crate::NodeError;

/// Default data directory, relative to the working directory.
pub const DATA_DIR_DEFAULT: &str = "./imstate-data";
/// Default client listen address.
pub const LISTEN_DEFAULT: &str = "127.0.0.1:7700";
/// Default limit on ids in one NextBatch / CurrentBatch call.
pub const BATCH_IDS_MAX_DEFAULT: usize = 10_000;
/// Default time a request waits for a max_seq raise to become durable before it fails.
pub const RAISE_WAIT_TIMEOUT_MS_DEFAULT: u64 = 5_000;
/// Default log bytes written since the last checkpoint that trigger a new checkpoint.
pub const CHECKPOINT_LOG_BYTES_DEFAULT: u64 = 64 * 1024 * 1024;

/// The whole configuration of a node.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// Directory holding the logs and checkpoints; locked while the node runs.
    pub data_dir: PathBuf,
    /// Address of the gRPC listener. Port 0 picks a free port (printed at start-up).
    pub listen: SocketAddr,
    /// The sequence service.
    pub seq: SeqConfig,
    /// The presence registry.
    pub presence: PresenceConfig,
}

/// Configuration of the presence registry.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PresenceConfig {
    /// When an acknowledged presence change is durable: `always` (fsync before the reply),
    /// `batch:<ms>` (written before the reply, fsynced at least every <ms>), `never`.
    pub fsync: String,
    /// ttl of a login that does not set one.
    pub ttl_ms_default: u32,
    /// Largest ttl a login or gateway may ask for.
    pub ttl_ms_max: u32,
    /// Sessions one uid may hold (B1).
    pub sessions_per_uid_max: usize,
    /// uids in one LookupBatch (B1).
    pub lookup_ids_max: usize,
    /// Sessions in one HeartbeatBatch (B1).
    pub heartbeat_batch_max: usize,
    /// Distinct gateway names (B1).
    pub gateways_max: usize,
    /// Registry shards (uid % shards); more shards, less contention.
    pub shards: usize,
    /// How often expiry runs; a session is gone within ttl + tick_ms.
    pub tick_ms: u64,
    /// Log bytes since the last checkpoint that trigger one; 0 disables automatic ones.
    pub checkpoint_log_bytes: u64,
    /// Events a Watch subscriber may fall behind before it is cut off (B1).
    pub watch_buffer_events: usize,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        let registry = imstate_presence::RegistryOptions::default();
        Self {
            fsync: "batch:10ms".into(),
            ttl_ms_default: 90_000,
            ttl_ms_max: registry.ttl_ms_max,
            sessions_per_uid_max: registry.sessions_per_uid_max,
            lookup_ids_max: registry.lookup_ids_max,
            heartbeat_batch_max: registry.heartbeat_batch_max,
            gateways_max: registry.gateways_max,
            shards: registry.shards,
            tick_ms: 250,
            checkpoint_log_bytes: 128 * 1024 * 1024,
            watch_buffer_events: 8_192,
        }
    }
}

impl PresenceConfig {
    /// The store options this section describes, or an error naming the bad key.
    pub fn to_options(&self) -> Result<crate::presencestore::PresenceStoreOptions, NodeError> {
        let fsync = self
            .fsync
            .parse()
            .map_err(|error| NodeError::Config(format!("presence.fsync: {error}")))?;
        let registry = imstate_presence::RegistryOptions {
            shards: self.shards,
            sessions_per_uid_max: self.sessions_per_uid_max,
            heartbeat_batch_max: self.heartbeat_batch_max,
            lookup_ids_max: self.lookup_ids_max,
            gateways_max: self.gateways_max,
            ttl_ms_max: self.ttl_ms_max,
        };
        registry
            .validate()
            .map_err(|error| NodeError::Config(format!("presence: {error}")))?;
        if self.ttl_ms_default == 0 || self.ttl_ms_default > self.ttl_ms_max {
            return Err(NodeError::Config(format!(
                "presence.ttl_ms_default must be in 1..={} (presence.ttl_ms_max)",
                self.ttl_ms_max
            )));
        }
        if self.tick_ms == 0 || self.tick_ms > 1_000 {
            return Err(NodeError::Config(
                "presence.tick_ms must be in 1..=1000".into(),
            ));
        }
        if self.watch_buffer_events == 0 {
            return Err(NodeError::Config(
                "presence.watch_buffer_events must be >= 1".into(),
            ));
        }
        Ok(crate::presencestore::PresenceStoreOptions {
            registry,
            fsync,
            ttl_ms_default: self.ttl_ms_default,
            tick_ms: self.tick_ms,
            checkpoint_log_bytes: self.checkpoint_log_bytes,
            watch_buffer_events: self.watch_buffer_events,
        })
    }
}

/// Configuration of the sequence service.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SeqConfig {
    /// Limit on ids in one batch call (B1).
    pub batch_ids_max: usize,
    /// How long a request may wait for a max_seq raise to become durable (B1: no unbounded wait).
    pub raise_wait_timeout_ms: u64,
    /// Log bytes since the last checkpoint that trigger a checkpoint; 0 disables automatic ones.
    pub checkpoint_log_bytes: u64,
    /// Namespaces created at start-up when missing. An existing namespace must match exactly:
    /// changing a namespace's layout would break S1, so a mismatch is a start-up error.
    pub namespaces: Vec<NamespaceConfig>,
}

/// A namespace declared in the configuration file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceConfig {
    /// Name: 1 to 64 bytes of `[A-Za-z0-9_.-]`.
    pub name: String,
    /// First id of the namespace.
    pub id_lo: u64,
    /// One past the last id of the namespace.
    pub id_hi: u64,
    /// Adjacent ids sharing one persisted max_seq.
    #[serde(default = "section_size_default")]
    pub section_size: u64,
    /// How far max_seq is raised at a time.
    #[serde(default = "step_default")]
    pub step: u64,
}

fn section_size_default() -> u64 {
    NamespaceDef::default_namespace().section_size
}

fn step_default() -> u64 {
    NamespaceDef::default_namespace().step
}

impl NamespaceConfig {
    /// The namespace definition this entry declares.
    pub fn to_def(&self) -> NamespaceDef {
        NamespaceDef {
            name: self.name.clone(),
            id_lo: self.id_lo,
            id_hi: self.id_hi,
            section_size: self.section_size,
            step: self.step,
        }
    }
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from(DATA_DIR_DEFAULT),
            listen: LISTEN_DEFAULT.parse().expect("valid default address"),
            seq: SeqConfig::default(),
            presence: PresenceConfig::default(),
        }
    }
}

impl Default for SeqConfig {
    fn default() -> Self {
        Self {
            batch_ids_max: BATCH_IDS_MAX_DEFAULT,
            raise_wait_timeout_ms: RAISE_WAIT_TIMEOUT_MS_DEFAULT,
            checkpoint_log_bytes: CHECKPOINT_LOG_BYTES_DEFAULT,
            namespaces: Vec::new(),
        }
    }
}

impl SeqConfig {
    /// The raise wait timeout as a duration.
    pub fn raise_wait_timeout(&self) -> Duration {
        Duration::from_millis(self.raise_wait_timeout_ms)
    }
}

impl NodeConfig {
    /// Reads a TOML file; keys it does not set keep their defaults.
    pub fn load(path: &Path) -> Result<Self, NodeError> {
        let text = std::fs::read_to_string(path).map_err(|error| {
            NodeError::Config(format!("cannot read {}: {error}", path.display()))
        })?;
        Self::parse(&text).map_err(|error| match error {
            NodeError::Config(message) => {
                NodeError::Config(format!("{}: {message}", path.display()))
            }
            other => other,
        })
    }

    /// Parses TOML text and validates it.
    pub fn parse(text: &str) -> Result<Self, NodeError> {
        let config: NodeConfig =
            toml::from_str(text).map_err(|error| NodeError::Config(error.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks values that the types alone do not constrain, naming the key at fault.
    pub fn validate(&self) -> Result<(), NodeError> {
        if self.seq.batch_ids_max == 0 {
            return Err(NodeError::Config(
                "seq.batch_ids_max must be at least 1".into(),
            ));
        }
        if self.seq.raise_wait_timeout_ms == 0 {
            return Err(NodeError::Config(
                "seq.raise_wait_timeout_ms must be at least 1".into(),
            ));
        }
        self.presence.to_options()?;
        for namespace in &self.seq.namespaces {
            namespace.to_def().validate().map_err(|error| {
                NodeError::Config(format!("seq.namespaces `{}`: {error}", namespace.name))
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        let config = NodeConfig::parse("").unwrap();
        assert_eq!(config.listen.to_string(), LISTEN_DEFAULT);
        assert_eq!(config.seq.batch_ids_max, BATCH_IDS_MAX_DEFAULT);
    }

    #[test]
    fn unknown_key_is_an_error_naming_it() {
        let error = NodeConfig::parse("[seq]\nbatch_id_max = 3\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("batch_id_max"), "{error}");
    }

    #[test]
    fn presence_values_are_validated_naming_the_key() {
        let error = NodeConfig::parse("[presence]\nfsync = \"sometimes\"\n").unwrap_err();
        assert!(error.to_string().contains("presence.fsync"), "{error}");
        let error = NodeConfig::parse("[presence]\ntick_ms = 0\n").unwrap_err();
        assert!(error.to_string().contains("presence.tick_ms"), "{error}");
        let config = NodeConfig::parse("[presence]\nfsync = \"always\"\n").unwrap();
        assert_eq!(
            config.presence.to_options().unwrap().fsync,
            imstate_log::FsyncPolicy::Always
        );
    }

    #[test]
    fn namespaces_parse_with_defaults_and_are_validated() {
        let config = NodeConfig::parse(
            "[[seq.namespaces]]\nname = \"conv\"\nid_lo = 0\nid_hi = 1000\nstep = 5\n",
        )
        .unwrap();
        let def = config.seq.namespaces[0].to_def();
        assert_eq!((def.section_size, def.step), (100_000, 5));
        let error = NodeConfig::parse("[[seq.namespaces]]\nname = \"x\"\nid_lo = 5\nid_hi = 5\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("seq.namespaces `x`"), "{error}");
    }
}
