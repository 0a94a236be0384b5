//! The data directory: created if missing, locked so that two processes never share it.
//!
//! The lock is an advisory `flock` on `LOCK`, held for the life of the process and released by
//! the kernel when the process dies (even by kill -9). The holder writes its pid into the file so
//! that a second process can name it in its error.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::NodeError;

/// Name of the lock file inside the data directory.
pub const LOCK_FILE: &str = "LOCK";
/// Subdirectory of the sequence service's log and checkpoints.
pub const SEQ_DIR: &str = "seq";
/// Subdirectory of the presence registry's log and checkpoints.
pub const PRESENCE_DIR: &str = "presence";

/// A locked data directory. Dropping it releases the lock.
#[derive(Debug)]
pub struct DataDir {
    root: PathBuf,
    /// Kept open: closing the file would release the lock.
    _lock: File,
}

impl DataDir {
    /// Creates (if needed) and locks the directory, failing with the holder's pid when another
    /// process has it, or with the reason when it is not a writable directory.
    pub fn open(root: &Path) -> Result<Self, NodeError> {
        let fail = |reason: String| NodeError::DataDir {
            dir: root.to_path_buf(),
            reason,
        };
        std::fs::create_dir_all(root).map_err(|error| fail(format!("cannot create: {error}")))?;
        let mut lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(root.join(LOCK_FILE))
            .map_err(|error| fail(format!("cannot open {LOCK_FILE}: {error}")))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut pid = String::new();
                let _ = lock.read_to_string(&mut pid);
                let pid = pid.trim();
                let pid = if pid.is_empty() {
                    "unknown".to_string()
                } else {
                    pid.to_string()
                };
                return Err(NodeError::Locked {
                    dir: root.to_path_buf(),
                    pid,
                });
            }
            Err(std::fs::TryLockError::Error(error)) => {
                return Err(fail(format!("cannot lock {LOCK_FILE}: {error}")));
            }
        }
        let write_pid = |lock: &mut File| -> std::io::Result<()> {
            lock.set_len(0)?;
            lock.seek(SeekFrom::Start(0))?;
            writeln!(lock, "{}", std::process::id())?;
            lock.sync_all()
        };
        write_pid(&mut lock).map_err(|error| fail(format!("not writable: {error}")))?;
        let dir = Self {
            root: root.to_path_buf(),
            _lock: lock,
        };
        for sub in [SEQ_DIR, PRESENCE_DIR] {
            std::fs::create_dir_all(root.join(sub))
                .map_err(|error| fail(format!("cannot create {sub}/: {error}")))?;
        }
        Ok(dir)
    }

    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the sequence log and its checkpoints live.
    pub fn seq_dir(&self) -> PathBuf {
        self.root.join(SEQ_DIR)
    }

    /// Where the presence log and its checkpoints live.
    pub fn presence_dir(&self) -> PathBuf {
        self.root.join(PRESENCE_DIR)
    }

    /// The identity of the presence log: random, made the first time it is asked for and
    /// kept in `presence/LOG_ID`, so it lasts as long as the log's LSNs do. A replica's
    /// position names it: a position in another log (a wiped and re-created directory) is
    /// never resumed.
    pub fn presence_log_id(&self) -> Result<String, NodeError> {
        let path = self.presence_dir().join(LOG_ID_FILE);
        let fail = |reason: String| NodeError::DataDir {
            dir: self.root.clone(),
            reason,
        };
        match std::fs::read_to_string(&path) {
            Ok(id) if !id.trim().is_empty() => return Ok(id.trim().to_owned()),
            Ok(_) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(fail(format!("cannot read {LOG_ID_FILE}: {error}"))),
        }
        use std::hash::{BuildHasher, Hasher};
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |since| since.as_nanos()),
        );
        hasher.write_u32(std::process::id());
        let id = format!("{:016x}", hasher.finish());
        let temporary = path.with_extension("tmp");
        let write = || -> std::io::Result<()> {
            let mut file = File::create(&temporary)?;
            writeln!(file, "{id}")?;
            file.sync_all()?;
            std::fs::rename(&temporary, &path)?;
            File::open(self.presence_dir())?.sync_all()
        };
        write().map_err(|error| fail(format!("cannot write {LOG_ID_FILE}: {error}")))?;
        Ok(id)
    }
}

/// The file holding the presence log's identity (see [`DataDir::presence_log_id`]).
pub const LOG_ID_FILE: &str = "LOG_ID";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_open_names_the_holder_pid() {
        let dir = tempfile::tempdir().unwrap();
        let _held = DataDir::open(dir.path()).unwrap();
        let error = DataDir::open(dir.path()).unwrap_err().to_string();
        assert!(
            error.contains(&format!("pid {}", std::process::id())),
            "{error}"
        );
    }

    #[test]
    fn the_presence_log_id_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let first = DataDir::open(dir.path()).unwrap();
        let id = first.presence_log_id().unwrap();
        assert_eq!(id.len(), 16);
        assert_eq!(first.presence_log_id().unwrap(), id);
        drop(first);
        assert_eq!(
            DataDir::open(dir.path())
                .unwrap()
                .presence_log_id()
                .unwrap(),
            id
        );
        let other = tempfile::tempdir().unwrap();
        assert_ne!(
            DataDir::open(other.path())
                .unwrap()
                .presence_log_id()
                .unwrap(),
            id
        );
    }

    #[test]
    fn lock_is_released_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        drop(DataDir::open(dir.path()).unwrap());
        DataDir::open(dir.path()).unwrap();
    }

    #[test]
    fn a_path_under_a_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("plain-file");
        std::fs::write(&file, b"x").unwrap();
        let error = DataDir::open(&file.join("data")).unwrap_err().to_string();
        assert!(error.contains("cannot create"), "{error}");
    }
}
