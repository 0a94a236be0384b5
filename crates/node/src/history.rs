//! History markers: a node refuses to start on a data directory whose log history went missing.
//!
//! A log cannot tell on its own that its oldest files were deleted: with `seq/*.log` removed
//! but a checkpoint kept, or with `seq/` wiped while `presence/` remains, recovery finds a
//! consistent (shorter) log and the node would hand out sequence values it had served already
//! (S1). So the data directory carries two kinds of marker:
//!
//! ```text
//!  DATA/IDENTITY            identity=<hex>            written once, when the directory is new
//!  DATA/seq/HISTORY         identity=<hex> last_lsn=N  the LSN the log had reached, recorded
//!  DATA/presence/HISTORY    identity=<hex> last_lsn=N  after recovery and at clean shutdown
//! ```
//!
//! Rules, checked before recovery ([`History::check`]) and after it
//! ([`History::check_recovered`]):
//! - a new directory (no marker, no log file) gets its identity: both `HISTORY` files are
//!   written first, `IDENTITY` last, so `IDENTITY` implies both markers;
//! - a directory with log files but no marker at all (one written before markers existed) is
//!   adopted the same way;
//! - otherwise `IDENTITY` and both `HISTORY` files must be there with one identity, and each log
//!   must recover at least to the LSN its `HISTORY` records. Anything else refuses to start
//!   and names what is missing.
//!
//! The one deliberate way to start afresh is to remove the whole data directory.
//!
//! Markers are written atomically: a temporary file, fsync, rename, fsync of the directory.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::NodeError;
use crate::datadir::{PRESENCE_DIR, SEQ_DIR};

/// The identity file at the top of the data directory.
pub const IDENTITY_FILE: &str = "IDENTITY";
/// The history marker beside each log.
pub const HISTORY_FILE: &str = "HISTORY";
/// What to do to start afresh, said in every refusal.
const START_AFRESH: &str = "if this data is meant to be discarded, remove the whole data \
                            directory to start afresh (every sequence then restarts at 1)";

/// One of the two logs of a data directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogKind {
    /// The sequence log (`seq/`).
    Seq,
    /// The presence log (`presence/`).
    Presence,
}

impl LogKind {
    fn dir(self) -> &'static str {
        match self {
            LogKind::Seq => SEQ_DIR,
            LogKind::Presence => PRESENCE_DIR,
        }
    }
}

/// A history marker as read from disk.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Marker {
    identity: String,
    last_lsn: u64,
}

/// The checked history markers of a locked data directory.
#[derive(Debug)]
pub struct History {
    root: PathBuf,
    identity: String,
    seq_lsn: u64,
    presence_lsn: u64,
}

impl History {
    /// Checks the markers before recovery: creates them for a new (or pre-marker) directory,
    /// or refuses when some are missing or belong to another directory.
    pub fn check(root: &Path) -> Result<Self, NodeError> {
        let refuse = |reason: String| NodeError::DataDir {
            dir: root.to_path_buf(),
            reason: format!("{reason}; {START_AFRESH}"),
        };
        let identity = read_identity(root)?;
        let seq = read_marker(root, LogKind::Seq)?;
        let presence = read_marker(root, LogKind::Presence)?;
        let Some(identity) = identity else {
            if seq.is_some() || presence.is_some() {
                return Err(refuse(format!(
                    "{IDENTITY_FILE} is missing, but a {HISTORY_FILE} marker is there: this \
                     directory has served before and has been tampered with"
                )));
            }
            // New, or written before markers existed: give it an identity.
            let history = Self {
                root: root.to_path_buf(),
                identity: new_identity(),
                seq_lsn: 0,
                presence_lsn: 0,
            };
            history.record(LogKind::Seq, 0)?;
            history.record(LogKind::Presence, 0)?;
            write_atomically(
                root,
                IDENTITY_FILE,
                &format!("identity={}\n", history.identity),
            )?;
            return Ok(history);
        };
        let mut lsns = [0u64; 2];
        for (index, (kind, marker)) in [(LogKind::Seq, seq), (LogKind::Presence, presence)]
            .into_iter()
            .enumerate()
        {
            let dir = kind.dir();
            let Some(marker) = marker else {
                return Err(refuse(format!(
                    "this directory has served before ({IDENTITY_FILE} {identity}), but \
                     {dir}/{HISTORY_FILE} is missing: the {dir} log's history was removed, and \
                     starting would serve from a shorter history (sequence values handed out \
                     again)"
                )));
            };
            if marker.identity != identity {
                return Err(refuse(format!(
                    "{dir}/ belongs to another data directory (identity {}, this one is \
                     {identity})",
                    marker.identity
                )));
            }
            lsns[index] = marker.last_lsn;
        }
        Ok(Self {
            root: root.to_path_buf(),
            identity,
            seq_lsn: lsns[0],
            presence_lsn: lsns[1],
        })
    }

    /// This directory's identity.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Checks that `kind`'s log recovered at least to the LSN its marker records, then records
    /// `now_lsn` (the recovered LSN, or more if opening the store appended records).
    pub fn check_recovered(
        &mut self,
        kind: LogKind,
        recovered_lsn: u64,
        now_lsn: u64,
    ) -> Result<(), NodeError> {
        let recorded = match kind {
            LogKind::Seq => self.seq_lsn,
            LogKind::Presence => self.presence_lsn,
        };
        if recovered_lsn < recorded {
            let dir = kind.dir();
            return Err(NodeError::DataDir {
                dir: self.root.clone(),
                reason: format!(
                    "the {dir} log recovered up to lsn {recovered_lsn}, but {dir}/{HISTORY_FILE} \
                     records that it had reached lsn {recorded}: log segments or checkpoints \
                     were removed or restored from an older copy, and starting would serve from \
                     a shorter history; {START_AFRESH}"
                ),
            });
        }
        self.record(kind, now_lsn.max(recovered_lsn))
    }

    /// Records that `kind`'s log has reached `last_lsn` (atomically; durable on return).
    pub fn record(&self, kind: LogKind, last_lsn: u64) -> Result<(), NodeError> {
        write_atomically(
            &self.root.join(kind.dir()),
            HISTORY_FILE,
            &format!("identity={}\nlast_lsn={last_lsn}\n", self.identity),
        )
    }
}

fn new_identity() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos());
    format!("{nanos:032x}{:08x}", std::process::id())
}

fn data_dir_error(root: &Path, reason: String) -> NodeError {
    NodeError::DataDir {
        dir: root.to_path_buf(),
        reason,
    }
}

/// The value of `key=` in a marker's text.
fn field<'t>(text: &'t str, key: &str) -> Option<&'t str> {
    text.lines()
        .find_map(|line| line.strip_prefix(key)?.strip_prefix('='))
        .map(str::trim)
}

fn read_text(root: &Path, path: &Path) -> Result<Option<String>, NodeError> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(data_dir_error(
            root,
            format!("cannot read {}: {error}", path.display()),
        )),
    }
}

fn read_identity(root: &Path) -> Result<Option<String>, NodeError> {
    let path = root.join(IDENTITY_FILE);
    let Some(text) = read_text(root, &path)? else {
        return Ok(None);
    };
    match field(&text, "identity") {
        Some(identity) if !identity.is_empty() => Ok(Some(identity.to_string())),
        _ => Err(data_dir_error(
            root,
            format!("{} holds no identity: it is damaged", path.display()),
        )),
    }
}

fn read_marker(root: &Path, kind: LogKind) -> Result<Option<Marker>, NodeError> {
    let path = root.join(kind.dir()).join(HISTORY_FILE);
    let Some(text) = read_text(root, &path)? else {
        return Ok(None);
    };
    let identity = field(&text, "identity").filter(|identity| !identity.is_empty());
    let last_lsn = field(&text, "last_lsn").and_then(|lsn| lsn.parse().ok());
    match (identity, last_lsn) {
        (Some(identity), Some(last_lsn)) => Ok(Some(Marker {
            identity: identity.to_string(),
            last_lsn,
        })),
        _ => Err(data_dir_error(
            root,
            format!("{} is damaged", path.display()),
        )),
    }
}

/// Writes `dir/name` with `text`: a temporary file, fsync, rename over, fsync of `dir`.
fn write_atomically(dir: &Path, name: &str, text: &str) -> Result<(), NodeError> {
    let fail = |error: std::io::Error| {
        data_dir_error(
            dir,
            format!("cannot write {}: {error}", dir.join(name).display()),
        )
    };
    let temp = dir.join(format!("{name}.new"));
    let mut file = fs::File::create(&temp).map_err(fail)?;
    file.write_all(text.as_bytes()).map_err(fail)?;
    file.sync_all().map_err(fail)?;
    fs::rename(&temp, dir.join(name)).map_err(fail)?;
    fs::File::open(dir)
        .and_then(|dir| dir.sync_all())
        .map_err(fail)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for sub in [SEQ_DIR, PRESENCE_DIR] {
            fs::create_dir_all(dir.path().join(sub)).unwrap();
        }
        dir
    }

    #[test]
    fn a_new_directory_gets_an_identity_and_keeps_it() {
        let dir = data_dir();
        let first = History::check(dir.path()).unwrap();
        let again = History::check(dir.path()).unwrap();
        assert_eq!(first.identity(), again.identity());
    }

    #[test]
    fn a_missing_or_foreign_marker_refuses_and_says_how_to_start_afresh() {
        let dir = data_dir();
        let mut history = History::check(dir.path()).unwrap();
        history.check_recovered(LogKind::Seq, 42, 42).unwrap();
        fs::remove_file(dir.path().join(SEQ_DIR).join(HISTORY_FILE)).unwrap();
        let error = History::check(dir.path()).unwrap_err().to_string();
        assert!(error.contains("seq/HISTORY is missing"), "{error}");
        assert!(error.contains("remove the whole data directory"), "{error}");

        history.record(LogKind::Seq, 42).unwrap();
        fs::remove_file(dir.path().join(IDENTITY_FILE)).unwrap();
        let error = History::check(dir.path()).unwrap_err().to_string();
        assert!(error.contains("IDENTITY is missing"), "{error}");

        fs::write(dir.path().join(IDENTITY_FILE), "identity=other\n").unwrap();
        let error = History::check(dir.path()).unwrap_err().to_string();
        assert!(
            error.contains("belongs to another data directory"),
            "{error}"
        );
    }

    #[test]
    fn a_log_that_recovers_short_of_its_marker_refuses() {
        let dir = data_dir();
        let mut history = History::check(dir.path()).unwrap();
        history
            .check_recovered(LogKind::Presence, 100, 100)
            .unwrap();
        let mut history = History::check(dir.path()).unwrap();
        history.check_recovered(LogKind::Seq, 0, 0).unwrap();
        let error = history
            .check_recovered(LogKind::Presence, 99, 99)
            .unwrap_err()
            .to_string();
        assert!(error.contains("recovered up to lsn 99"), "{error}");
        assert!(error.contains("reached lsn 100"), "{error}");
        history
            .check_recovered(LogKind::Presence, 100, 100)
            .unwrap();
    }
}
