//! Prometheus metrics of a node: the names, the recorder, and the gauges read at scrape time.
//!
//! ```text
//!  hot paths (seqstore, presencestore, grpc::edge, log flusher via LogObserver)
//!      └─ metrics::counter!/histogram! ──► global PrometheusRecorder (lock-free atomics)
//!  GET /metrics ──► refresh(stores): gauges and log counters copied from LogStats, /proc/self
//!               ──► PrometheusHandle::render() ──► text exposition format 0.0.4
//! ```
//!
//! Invariants: every name starts with `imstate_`, counters end in `_total`, durations are in
//! seconds (`_seconds`) and sizes in bytes (`_bytes`). Label values come from fixed sets (the
//! known gRPC methods, the two log names, status codes), never from request data, so the
//! number of series is bounded. Without an installed recorder (unit tests, embedded use) every
//! call is a cheap no-op.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use imstate_log::{Log, LogObserver, RecoveryStats};
use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::presencestore::PresenceStore;

/// gRPC calls, by `service`, `method` and `code`.
pub const GRPC_REQUESTS: &str = "imstate_grpc_requests_total";
/// gRPC call latency (to the response headers; for a stream, to its start), same labels.
pub const GRPC_DURATION: &str = "imstate_grpc_request_duration_seconds";
/// Calls rejected with UNAUTHENTICATED, by `reason` (`missing` or `invalid`).
pub const AUTH_REJECTED: &str = "imstate_auth_rejected_total";
/// Sequence values handed out.
pub const SEQ_ALLOCATED: &str = "imstate_seq_allocated_total";
/// max_seq raises appended to the log (background pre-raises and blocking ones).
pub const SEQ_RAISES: &str = "imstate_seq_raises_total";
/// Time from appending a raise to its being durable (fsynced).
pub const SEQ_RAISE_DURATION: &str = "imstate_seq_raise_duration_seconds";
/// Requests that had to wait for a raise (they outran the background pre-raise).
pub const SEQ_RAISE_WAITS: &str = "imstate_seq_raise_waits_total";
/// Requests that failed because a raise did not become durable within the timeout.
pub const SEQ_RAISE_TIMEOUTS: &str = "imstate_seq_raise_timeouts_total";
/// Sections whose max_seq is loaded in memory.
pub const SEQ_SECTIONS_LOADED: &str = "imstate_seq_sections_loaded";
/// Namespaces.
pub const SEQ_NAMESPACES: &str = "imstate_seq_namespaces";
/// Gauge: string keys of keyed namespaces in memory.
pub const SEQ_KEYS: &str = "imstate_seq_keys";
/// Gauge: bytes the key tables of keyed namespaces hold.
pub const SEQ_KEY_BYTES: &str = "imstate_seq_key_table_bytes";
/// Sessions online.
pub const PRESENCE_SESSIONS: &str = "imstate_presence_sessions_online";
/// Logins (a login replacing a session counts once).
pub const PRESENCE_LOGINS: &str = "imstate_presence_logins_total";
/// Logouts.
pub const PRESENCE_LOGOUTS: &str = "imstate_presence_logouts_total";
/// Sessions expired for lack of heartbeats.
pub const PRESENCE_EXPIRATIONS: &str = "imstate_presence_expirations_total";
/// Sessions dropped because their gateway went down or its lease lapsed.
pub const PRESENCE_GATEWAY_DROPS: &str = "imstate_presence_gateway_dropped_sessions_total";
/// Gateway names known to the registry (interned).
pub const PRESENCE_GATEWAYS: &str = "imstate_presence_gateways";
/// Gateways holding a lease (GatewayRegister).
pub const PRESENCE_GATEWAY_LEASES: &str = "imstate_presence_gateway_leases";
/// Records appended, by `log`.
pub const LOG_APPENDS: &str = "imstate_log_appends_total";
/// Framed bytes written to segments, by `log`.
pub const LOG_WRITTEN_BYTES: &str = "imstate_log_written_bytes_total";
/// fsyncs of segment files, by `log`.
pub const LOG_FSYNCS: &str = "imstate_log_fsyncs_total";
/// fsync latency, by `log`.
pub const LOG_FSYNC_DURATION: &str = "imstate_log_fsync_duration_seconds";
/// Records per group-commit batch, by `log`.
pub const LOG_BATCH_RECORDS: &str = "imstate_log_batch_records";
/// Highest LSN assigned, by `log`.
pub const LOG_LAST_LSN: &str = "imstate_log_last_lsn";
/// Highest LSN durable under the log's fsync policy, by `log`.
pub const LOG_DURABLE_LSN: &str = "imstate_log_durable_lsn";
/// Segment files, by `log`.
pub const LOG_SEGMENTS: &str = "imstate_log_segments";
/// Segments started from a preallocated spare, by `log`.
pub const LOG_SPARES_USED: &str = "imstate_log_preallocated_segments_total";
/// Spare segments that could not be made (a full disk): writes then grow the file, by `log`.
pub const LOG_PREALLOC_FAILURES: &str = "imstate_log_preallocation_failures_total";
/// Group-commit batches written, by `log` and `writer` (`flusher`: the flusher thread;
/// `inline`: an async waiter under `batch` or `never`, without a thread hand-off).
pub const LOG_BATCHES: &str = "imstate_log_batches_total";
/// Log bytes since the last checkpoint: what the next start-up replays, by `log`.
pub const LOG_BYTES_SINCE_CHECKPOINT: &str = "imstate_log_since_checkpoint_bytes";
/// 1 when the log is poisoned (a write or fsync failed; the node stops), by `log`.
pub const LOG_POISONED: &str = "imstate_log_poisoned";
/// LSN covered by the newest checkpoint, by `log`.
pub const CHECKPOINT_LSN: &str = "imstate_checkpoint_last_lsn";
/// Size of the last checkpoint written by this process, by `log`.
pub const CHECKPOINT_BYTES: &str = "imstate_checkpoint_last_bytes";
/// Duration of the last checkpoint written by this process, by `log`.
pub const CHECKPOINT_DURATION: &str = "imstate_checkpoint_last_duration_seconds";
/// Checkpoints written, by `log` and `outcome` (`ok` or `error`).
pub const CHECKPOINTS: &str = "imstate_checkpoints_total";
/// Time the start-up recovery of a log took, by `log`.
pub const RECOVERY_DURATION: &str = "imstate_recovery_duration_seconds";
/// Bytes of log replayed by the start-up recovery, by `log`.
pub const RECOVERY_REPLAYED_BYTES: &str = "imstate_recovery_replayed_bytes";
/// 1 when `/readyz` would answer 200.
pub const READY: &str = "imstate_ready";
/// Process resident set size.
pub const PROCESS_RSS: &str = "imstate_process_resident_memory_bytes";
/// Open file descriptors of the process.
pub const PROCESS_FDS: &str = "imstate_process_open_fds";
/// Seconds since the process started serving its HTTP listener.
pub const PROCESS_UPTIME: &str = "imstate_process_uptime_seconds";
/// Always 1; the `version` label carries the build's version.
pub const BUILD_INFO: &str = "imstate_build_info";

/// Name of the sequence log in the `log` label.
pub const LOG_SEQ: &str = "seq";
/// Name of the presence log in the `log` label.
pub const LOG_PRESENCE: &str = "presence";

/// Bucket bounds of every `_seconds` histogram: 10 µs to 10 s.
const SECONDS_BUCKETS: &[f64] = &[
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Bucket bounds of the batch-size histogram, in records.
const RECORDS_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0,
];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process-wide Prometheus recorder (once) and returns its handle; `None` if
/// another recorder was installed first (then metrics go there and `/metrics` is empty).
pub fn install() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
                .and_then(|builder| {
                    builder.set_buckets_for_metric(
                        Matcher::Full(LOG_BATCH_RECORDS.into()),
                        RECORDS_BUCKETS,
                    )
                });
            let recorder = match builder {
                Ok(builder) => builder.build_recorder(),
                Err(error) => {
                    tracing::warn!(%error, "metrics disabled: bad histogram buckets");
                    return None;
                }
            };
            let handle = recorder.handle();
            match metrics::set_global_recorder(recorder) {
                Ok(()) => {
                    describe();
                    gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
                    Some(handle)
                }
                Err(_) => None,
            }
        })
        .clone()
}

/// HELP lines for the main series.
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        GRPC_REQUESTS,
        "gRPC calls by service, method and status code."
    );
    describe_histogram!(GRPC_DURATION, "gRPC call latency in seconds.");
    describe_counter!(AUTH_REJECTED, "Calls rejected with UNAUTHENTICATED.");
    describe_counter!(SEQ_ALLOCATED, "Sequence values handed out.");
    describe_counter!(SEQ_RAISES, "max_seq raises appended to the log.");
    describe_histogram!(
        SEQ_RAISE_DURATION,
        "Seconds from a raise's append to durable."
    );
    describe_counter!(SEQ_RAISE_WAITS, "Requests that waited for a raise.");
    describe_counter!(SEQ_RAISE_TIMEOUTS, "Requests failed by a raise timeout.");
    describe_gauge!(SEQ_SECTIONS_LOADED, "Sections with a max_seq in memory.");
    describe_gauge!(SEQ_KEYS, "String keys of keyed namespaces in memory.");
    describe_gauge!(
        SEQ_KEY_BYTES,
        "Bytes held by the key tables of keyed namespaces (arena and index capacity)."
    );
    describe_gauge!(PRESENCE_SESSIONS, "Sessions online.");
    describe_counter!(PRESENCE_LOGINS, "Logins.");
    describe_counter!(PRESENCE_LOGOUTS, "Logouts.");
    describe_counter!(
        PRESENCE_EXPIRATIONS,
        "Sessions expired for lack of heartbeats."
    );
    describe_histogram!(
        LOG_FSYNC_DURATION,
        "fsync latency of log segments in seconds."
    );
    describe_histogram!(LOG_BATCH_RECORDS, "Records per group-commit batch.");
    describe_gauge!(
        RECOVERY_DURATION,
        "Seconds the start-up recovery of a log took."
    );
    describe_gauge!(PROCESS_RSS, "Resident set size in bytes.");
    describe_gauge!(PROCESS_FDS, "Open file descriptors.");
}

/// Feeds a log's flusher timings into the histograms of one `log` label.
pub struct FlusherMetrics {
    /// The `log` label: [`LOG_SEQ`] or [`LOG_PRESENCE`].
    pub log: &'static str,
}

impl LogObserver for FlusherMetrics {
    fn fsync(&self, elapsed: Duration) {
        histogram!(LOG_FSYNC_DURATION, "log" => self.log).record(elapsed.as_secs_f64());
    }

    fn batch(&self, records: u64, _bytes: u64) {
        histogram!(LOG_BATCH_RECORDS, "log" => self.log).record(records as f64);
    }
}

/// Installs [`FlusherMetrics`] on `log`.
pub fn observe_log(log: &Log, name: &'static str) {
    log.set_observer(Arc::new(FlusherMetrics { log: name }));
}

/// Records the figures of a start-up recovery.
pub fn recovered(name: &'static str, stats: &RecoveryStats, elapsed: Duration) {
    gauge!(RECOVERY_DURATION, "log" => name).set(elapsed.as_secs_f64());
    gauge!(RECOVERY_REPLAYED_BYTES, "log" => name).set(stats.bytes_replayed as f64);
}

/// Records a checkpoint's outcome.
pub fn checkpoint_done(name: &'static str, ok: bool) {
    let outcome = if ok { "ok" } else { "error" };
    counter!(CHECKPOINTS, "log" => name, "outcome" => outcome).increment(1);
}

/// Counts and logs the outcome of an automatic checkpoint of log `name`.
pub fn report_checkpoint(
    name: &'static str,
    result: &Result<imstate_log::CheckpointStats, crate::NodeError>,
) {
    checkpoint_done(name, result.is_ok());
    match result {
        Ok(stats) => tracing::info!(
            log = name,
            covered_lsn = stats.covered_lsn,
            bytes = stats.bytes,
            elapsed_ms = stats.elapsed.as_millis() as u64,
            "checkpoint written"
        ),
        Err(error) => tracing::error!(log = name, %error, "checkpoint failed"),
    }
}

/// Copies the gauges and log counters of the stores into the recorder; called per scrape.
pub fn refresh(seq: &crate::sequences::Sequences, presence: &PresenceStore) {
    gauge!(SEQ_SECTIONS_LOADED).set(seq.sections_loaded() as f64);
    gauge!(SEQ_NAMESPACES).set(seq.namespaces().len() as f64);
    let (keys, key_bytes) = seq.keys_loaded();
    gauge!(SEQ_KEYS).set(keys as f64);
    gauge!(SEQ_KEY_BYTES).set(key_bytes as f64);
    gauge!(PRESENCE_SESSIONS).set(presence.online_count_now() as f64);
    gauge!(PRESENCE_GATEWAYS).set(presence.registry().gateways().len() as f64);
    gauge!(PRESENCE_GATEWAY_LEASES).set(presence.registry().gateway_leases().len() as f64);
    let mut logs = vec![(LOG_PRESENCE, presence.log())];
    if let Some(store) = seq.embedded() {
        logs.push((LOG_SEQ, store.log()));
    }
    for (name, log) in logs {
        let stats = log.stats();
        counter!(LOG_APPENDS, "log" => name).absolute(stats.appends);
        counter!(LOG_WRITTEN_BYTES, "log" => name).absolute(stats.bytes_written);
        counter!(LOG_FSYNCS, "log" => name).absolute(stats.fsyncs);
        gauge!(LOG_LAST_LSN, "log" => name).set(stats.last_lsn as f64);
        gauge!(LOG_DURABLE_LSN, "log" => name).set(stats.durable_lsn as f64);
        gauge!(LOG_SEGMENTS, "log" => name).set(stats.segments as f64);
        counter!(LOG_SPARES_USED, "log" => name).absolute(stats.spares_used);
        counter!(LOG_PREALLOC_FAILURES, "log" => name).absolute(stats.prealloc_failures);
        counter!(LOG_BATCHES, "log" => name, "writer" => "inline").absolute(stats.inline_batches);
        counter!(LOG_BATCHES, "log" => name, "writer" => "flusher")
            .absolute(stats.batches.saturating_sub(stats.inline_batches));
        gauge!(LOG_BYTES_SINCE_CHECKPOINT, "log" => name).set(log.bytes_since_checkpoint() as f64);
        gauge!(LOG_POISONED, "log" => name).set(if stats.poisoned { 1.0 } else { 0.0 });
        gauge!(CHECKPOINT_LSN, "log" => name).set(stats.last_checkpoint_lsn.unwrap_or(0) as f64);
        gauge!(CHECKPOINT_BYTES, "log" => name).set(stats.last_checkpoint_bytes as f64);
        gauge!(CHECKPOINT_DURATION, "log" => name)
            .set(stats.last_checkpoint_duration.as_secs_f64());
    }
}

/// Sets the process gauges from `/proc/self` (Linux; elsewhere they are left alone).
pub fn refresh_process() {
    if let Some(rss) = resident_bytes() {
        gauge!(PROCESS_RSS).set(rss as f64);
    }
    if let Ok(entries) = std::fs::read_dir("/proc/self/fd") {
        gauge!(PROCESS_FDS).set(entries.count() as f64);
    }
}

/// Resident set size from the `VmRSS` line of `/proc/self/status` (in kB there).
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
