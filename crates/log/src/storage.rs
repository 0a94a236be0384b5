//! The one side effect of the log: directory-scoped file access.
//!
//! [`Storage`] is the seam between the log and the disk. [`FileStorage`] is the real
//! implementation; [`crate::FaultyStorage`] models a crash for tests. Names are plain file
//! names inside one directory (no paths).
//!
//! # Durability contract (what an implementation must guarantee)
//!
//! - Bytes passed to [`StorageFile::write_all`] and a length set by [`StorageFile::truncate`]
//!   are volatile until [`StorageFile::sync`] on that file returns `Ok`: a crash may lose them
//!   (in part: a torn write keeps some prefix of the unsynced bytes).
//! - Directory entries made by [`Storage::create`], [`Storage::rename`] and
//!   [`Storage::remove`] are volatile until [`Storage::sync_dir`] returns `Ok`: a crash may
//!   undo them. A file whose entry is not durable may vanish with all its synced bytes.
//! - After a failed `sync` or `sync_dir` nothing is known about what is durable, and a later
//!   successful call does not fix that (the fsyncgate lesson): callers must not retry.
//! - `rename` atomically replaces `to` if it exists.
//!
//! - Bytes written over existing bytes by a file from [`Storage::open_write`] are volatile the
//!   same way: a crash may keep, of the bytes written since the last sync, any prefix cut at a
//!   sector, with the old bytes after it.
//!
//! The log relies on this as follows: a segment is created, then the directory is synced,
//! before any record in it is acknowledged; a checkpoint is written to a temp name, synced,
//! renamed, and the directory synced before older files are deleted. A preallocated segment
//! is zero-filled and synced under a temp name, renamed, and the directory synced, before the
//! log writes records over its zeros.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// An open file that the log appends to (or, from [`Storage::open_write`], writes over).
pub trait StorageFile: Send {
    /// Writes all of `buf` at the file's position, the end of the file unless it was opened
    /// with [`Storage::open_write`] (volatile until [`StorageFile::sync`]).
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()>;
    /// Makes every byte and the length of the file durable (`fdatasync`).
    fn sync(&mut self) -> io::Result<()>;
    /// Sets the file length to `len` (volatile until [`StorageFile::sync`]); later writes
    /// append at the new end.
    fn truncate(&mut self, len: u64) -> io::Result<()>;
    /// A handle that syncs this file from another thread while this one keeps writing: what
    /// it makes durable is at least every byte written before its `sync` was called. `None`
    /// (the default) when the implementation cannot; the log then syncs inline.
    fn sync_handle(&self) -> Option<Box<dyn SyncHandle>> {
        None
    }
}

/// Syncs a [`StorageFile`] from another thread (see [`StorageFile::sync_handle`]).
pub trait SyncHandle: Send {
    /// Makes every byte written to the file before this call durable (`fdatasync`).
    fn sync(&mut self) -> io::Result<()>;
}

/// Directory-scoped file system access; see the module documentation for the durability
/// contract.
pub trait Storage: Send + Sync + 'static {
    /// Names of all files in the directory, in no particular order.
    fn list(&self) -> io::Result<Vec<String>>;
    /// Creates `name` empty (replacing any existing file of that name) and opens it for
    /// appending. The entry is durable only after [`Storage::sync_dir`].
    fn create(&self, name: &str) -> io::Result<Box<dyn StorageFile>>;
    /// Opens an existing file for appending at its end.
    fn open_append(&self, name: &str) -> io::Result<Box<dyn StorageFile>>;
    /// Opens an existing file for writing at offset `at`, over its bytes (a preallocated
    /// segment); writes past its end extend it.
    fn open_write(&self, name: &str, at: u64) -> io::Result<Box<dyn StorageFile>>;
    /// Whether the log should preallocate segments here (write them full of zeros ahead of
    /// the writer), so that a write does not change the file's size and `fdatasync` commits
    /// no metadata. The default is `false`.
    fn preallocates(&self) -> bool {
        false
    }
    /// Reads a whole file (the log reads at most one segment at a time this way).
    fn read(&self, name: &str) -> io::Result<Vec<u8>>;
    /// Opens a file for reading from its start, so that a large file (a checkpoint) can be
    /// streamed with bounded memory. The default reads the whole file with [`Storage::read`].
    fn open_read(&self, name: &str) -> io::Result<Box<dyn io::Read + Send>> {
        Ok(Box::new(io::Cursor::new(self.read(name)?)))
    }
    /// The current length of a file.
    fn len(&self, name: &str) -> io::Result<u64>;
    /// Renames `from` to `to`, atomically replacing `to`; durable after
    /// [`Storage::sync_dir`].
    fn rename(&self, from: &str, to: &str) -> io::Result<()>;
    /// Removes a file; durable after [`Storage::sync_dir`].
    fn remove(&self, name: &str) -> io::Result<()>;
    /// Makes every directory entry change so far durable (`fsync` of the directory).
    fn sync_dir(&self) -> io::Result<()>;
    /// How errors and logs name the file `name`: its path where there is one, so an operator
    /// sees which log (say `data/seq/` or `data/presence/`) a message is about.
    fn describe(&self, name: &str) -> String {
        name.to_string()
    }
}

impl<S: Storage + ?Sized> Storage for std::sync::Arc<S> {
    fn list(&self) -> io::Result<Vec<String>> {
        (**self).list()
    }
    fn create(&self, name: &str) -> io::Result<Box<dyn StorageFile>> {
        (**self).create(name)
    }
    fn open_append(&self, name: &str) -> io::Result<Box<dyn StorageFile>> {
        (**self).open_append(name)
    }
    fn open_write(&self, name: &str, at: u64) -> io::Result<Box<dyn StorageFile>> {
        (**self).open_write(name, at)
    }
    fn preallocates(&self) -> bool {
        (**self).preallocates()
    }
    fn read(&self, name: &str) -> io::Result<Vec<u8>> {
        (**self).read(name)
    }
    fn open_read(&self, name: &str) -> io::Result<Box<dyn io::Read + Send>> {
        (**self).open_read(name)
    }
    fn len(&self, name: &str) -> io::Result<u64> {
        (**self).len(name)
    }
    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        (**self).rename(from, to)
    }
    fn remove(&self, name: &str) -> io::Result<()> {
        (**self).remove(name)
    }
    fn sync_dir(&self) -> io::Result<()> {
        (**self).sync_dir()
    }
    fn describe(&self, name: &str) -> String {
        (**self).describe(name)
    }
}

/// [`Storage`] on a real directory of the local file system.
#[derive(Debug, Clone)]
pub struct FileStorage {
    dir: PathBuf,
}

impl FileStorage {
    /// Uses the existing directory `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> io::Result<Self> {
        let dir = dir.into();
        if !fs::metadata(&dir)?.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotADirectory,
                format!("{} is not a directory", dir.display()),
            ));
        }
        Ok(FileStorage { dir })
    }

    /// The directory this storage works in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, name: &str) -> io::Result<PathBuf> {
        if name.is_empty() || name.contains(['/', '\\']) || name == "." || name == ".." {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name:?} is not a plain file name"),
            ));
        }
        Ok(self.dir.join(name))
    }
}

struct RealFile {
    file: File,
}

impl StorageFile for RealFile {
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.file.write_all(buf)
    }
    fn sync(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }
    fn truncate(&mut self, len: u64) -> io::Result<()> {
        self.file.set_len(len)?;
        // A file from `create` is not in append mode: move the cursor so the next write lands
        // at the new end instead of leaving a hole.
        self.file.seek(SeekFrom::End(0)).map(|_| ())
    }
    fn sync_handle(&self) -> Option<Box<dyn SyncHandle>> {
        // A duplicated descriptor of the same open file: fdatasync through it covers every
        // write made through either.
        let file = self.file.try_clone().ok()?;
        Some(Box::new(RealSync { file }))
    }
}

struct RealSync {
    file: File,
}

impl SyncHandle for RealSync {
    fn sync(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }
}

impl Storage for FileStorage {
    fn list(&self) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            if entry.file_type()?.is_file()
                && let Ok(name) = entry.file_name().into_string()
            {
                names.push(name);
            }
        }
        Ok(names)
    }

    fn create(&self, name: &str) -> io::Result<Box<dyn StorageFile>> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(self.path(name)?)?;
        Ok(Box::new(RealFile { file }))
    }

    fn open_append(&self, name: &str) -> io::Result<Box<dyn StorageFile>> {
        let file = OpenOptions::new().append(true).open(self.path(name)?)?;
        Ok(Box::new(RealFile { file }))
    }

    fn open_write(&self, name: &str, at: u64) -> io::Result<Box<dyn StorageFile>> {
        let mut file = OpenOptions::new().write(true).open(self.path(name)?)?;
        file.seek(SeekFrom::Start(at))?;
        Ok(Box::new(RealFile { file }))
    }

    fn preallocates(&self) -> bool {
        true
    }

    fn read(&self, name: &str) -> io::Result<Vec<u8>> {
        fs::read(self.path(name)?)
    }

    fn open_read(&self, name: &str) -> io::Result<Box<dyn io::Read + Send>> {
        Ok(Box::new(File::open(self.path(name)?)?))
    }

    fn len(&self, name: &str) -> io::Result<u64> {
        Ok(fs::metadata(self.path(name)?)?.len())
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        fs::rename(self.path(from)?, self.path(to)?)
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        fs::remove_file(self.path(name)?)
    }

    fn sync_dir(&self) -> io::Result<()> {
        File::open(&self.dir)?.sync_all()
    }
    fn describe(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
}
