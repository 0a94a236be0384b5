//! [`FaultyStorage`]: an in-memory [`Storage`] that models what a crash leaves behind.
//!
//! Files are inodes (`FileData`) referenced by directory entries, like a real file system, so
//! an unlinked or replaced file keeps working through open handles. Each inode keeps two
//! images: `current` (what reads see) and `durable` (what survives a crash), and the directory
//! has a current and a durable map of entries:
//!
//! ```text
//!  write / truncate ──► current bytes ──sync──► durable bytes
//!  create / rename / remove ──► current entries ──sync_dir──► durable entries
//!  crash_image(mode) = durable entries -> durable bytes
//!     Torn: + a seeded subset of the unsynced directory changes
//!           + a seeded prefix (512-byte aligned) of each file's unsynced writes, from the
//!             first byte they changed (appended, or written over a preallocated file's
//!             zeros), with the durable bytes after the cut
//! ```
//!
//! Failure injection: every mutating operation is numbered; from number `n` on
//! ([`FaultyStorage::fail_from_op`]) every operation fails, modelling the process dying right
//! there, and fsyncs can be made to fail on their own ([`FaultyStorage::fail_fsync`]). A
//! failed operation changes nothing.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::storage::{Storage, StorageFile};

/// Torn writes keep a prefix of the unsynced bytes cut at a multiple of this (a disk sector).
const SECTOR_BYTES: usize = 512;

/// What a crash does to data that was written but not fsynced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashMode {
    /// Every unsynced byte and directory change is lost.
    DropUnsynced,
    /// Each file keeps a prefix of its unsynced tail, cut at a 512-byte boundary of the file
    /// offset (possibly nothing, possibly everything), chosen per file from `seed`; and any
    /// subset (chosen from `seed`) of the directory changes since the last `sync_dir` survives,
    /// since a file system may persist those in any order.
    Torn {
        /// Chooses the cut points; the same seed gives the same image.
        seed: u64,
    },
    /// The process died (kill -9) and the machine did not: everything written survives,
    /// synced or not, and so does every directory change (the kernel keeps the page cache).
    ProcessDeath,
}

#[derive(Default)]
struct FileData {
    current: Vec<u8>,
    durable: Vec<u8>,
}

/// A directory change not yet made durable by `sync_dir`.
enum DirectoryChange {
    Create { name: String, id: u64 },
    Rename { from: String, to: String },
    Remove { name: String },
}

#[derive(Default)]
struct Inner {
    files: HashMap<u64, FileData>,
    next_file_id: u64,
    entries: BTreeMap<String, u64>,
    durable_entries: BTreeMap<String, u64>,
    /// Changes since the last `sync_dir`, in order; `Torn` images persist a subset of them.
    pending_changes: Vec<DirectoryChange>,
    ops: u64,
    fail_from_op: Option<u64>,
    fail_fsync: bool,
    /// How long each file sync takes, spent outside the lock (writes go on meanwhile).
    fsync_stall: std::time::Duration,
    fsync_calls: u64,
    /// Whether the log should preallocate segments here ([`FaultyStorage::preallocating`]).
    preallocates: bool,
}

impl Inner {
    /// Numbers a mutating operation and fails it if the process "died" before it.
    fn mutate(&mut self, what: &str) -> io::Result<()> {
        let op = self.ops;
        self.ops += 1;
        match self.fail_from_op {
            Some(first_failing) if op >= first_failing => Err(io::Error::other(format!(
                "injected failure: op {op} ({what}) after the process died at op {first_failing}"
            ))),
            _ => Ok(()),
        }
    }

    /// Fails reads once the process "died".
    fn check_alive(&self) -> io::Result<()> {
        match self.fail_from_op {
            Some(first_failing) if self.ops >= first_failing => Err(io::Error::other(
                "injected failure: the process died".to_string(),
            )),
            _ => Ok(()),
        }
    }

    fn fsync(&mut self, what: &str) -> io::Result<()> {
        self.mutate(what)?;
        self.fsync_calls += 1;
        if self.fail_fsync {
            return Err(io::Error::other(format!("injected fsync failure ({what})")));
        }
        Ok(())
    }

    fn id(&self, name: &str) -> io::Result<u64> {
        let missing = || io::Error::new(io::ErrorKind::NotFound, format!("no such file: {name}"));
        self.entries.get(name).copied().ok_or_else(missing)
    }

    fn file(&mut self, id: u64) -> &mut FileData {
        self.files.entry(id).or_default()
    }

    fn new_file(&mut self, data: FileData) -> u64 {
        let id = self.next_file_id;
        self.next_file_id += 1;
        self.files.insert(id, data);
        id
    }
}

/// In-memory storage that models a crash: per file, bytes written but not fsynced are
/// volatile; directory entries (create/rename/remove) are volatile until `sync_dir`. Cheap to
/// clone (`Arc` inside; clones share the same state).
#[derive(Clone, Default)]
pub struct FaultyStorage {
    inner: Arc<Mutex<Inner>>,
}

impl FaultyStorage {
    /// Opens an existing file: appending (`None`) or writing over its bytes from an offset.
    fn open_at(&self, name: &str, position: Option<usize>) -> io::Result<Box<dyn StorageFile>> {
        let inner = self.inner.lock();
        inner.check_alive()?;
        let id = inner.id(name)?;
        Ok(Box::new(FaultyFile {
            inner: Arc::clone(&self.inner),
            id,
            name: name.to_string(),
            position,
        }))
    }

    /// An empty directory.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty directory where the log preallocates its segments (as on a real disk), so
    /// that crash tests cover writes over zero-filled files.
    pub fn preallocating() -> Self {
        let storage = Self::default();
        storage.inner.lock().preallocates = true;
        storage
    }

    /// Counts every mutating operation (write, sync, truncate, rename, remove, sync_dir,
    /// create), including failed ones.
    pub fn ops(&self) -> u64 {
        self.inner.lock().ops
    }

    /// From mutating op number `n` on (0-based count of ops so far), every operation fails with
    /// an `io::Error` (the process "died" there). `None` disables.
    pub fn fail_from_op(&self, n: Option<u64>) {
        self.inner.lock().fail_from_op = n;
    }

    /// Makes every subsequent fsync (file sync and sync_dir) fail (for poison tests).
    pub fn fail_fsync(&self, on: bool) {
        self.inner.lock().fail_fsync = on;
    }

    /// Makes every subsequent file sync take `stall` (spent without blocking writes), like a
    /// disk busy with a checkpoint.
    pub fn stall_fsync(&self, stall: std::time::Duration) {
        self.inner.lock().fsync_stall = stall;
    }

    /// How many fsyncs (file sync and sync_dir) were attempted, failed ones included.
    pub fn fsync_calls(&self) -> u64 {
        self.inner.lock().fsync_calls
    }

    /// The image a crash would leave: only durable bytes and durable directory entries; with
    /// [`CrashMode::Torn`] the volatile tail of each file keeps a prefix cut at a 512-byte
    /// boundary of the file offset (possibly some, possibly none, chosen by `seed`), and a
    /// seeded subset of the unsynced directory changes survives. Returns a new, independent
    /// storage with no failures armed.
    pub fn crash_image(&self, mode: CrashMode) -> FaultyStorage {
        let inner = self.inner.lock();
        let mut image = Inner::default();
        let entries = match mode {
            CrashMode::DropUnsynced => inner.durable_entries.clone(),
            CrashMode::ProcessDeath => inner.entries.clone(),
            CrashMode::Torn { seed } => {
                // Some unsynced directory changes may have reached the disk, in any
                // combination: keep each with probability 1/2.
                let mut entries = inner.durable_entries.clone();
                for (index, change) in inner.pending_changes.iter().enumerate() {
                    if splitmix64(seed ^ 0xd1b5_4a32_d192_ed03 ^ index as u64) & 1 == 0 {
                        continue;
                    }
                    match change {
                        DirectoryChange::Create { name, id } => {
                            entries.insert(name.clone(), *id);
                        }
                        DirectoryChange::Rename { from, to } => {
                            if let Some(id) = entries.remove(from) {
                                entries.insert(to.clone(), id);
                            }
                        }
                        DirectoryChange::Remove { name } => {
                            entries.remove(name);
                        }
                    }
                }
                entries
            }
        };
        for (name, id) in &entries {
            let empty = FileData::default();
            let data = inner.files.get(id).unwrap_or(&empty);
            let bytes = match mode {
                CrashMode::DropUnsynced => data.durable.clone(),
                CrashMode::ProcessDeath => data.current.clone(),
                CrashMode::Torn { seed } => torn(data, seed, name),
            };
            let id = image.new_file(FileData {
                current: bytes.clone(),
                durable: bytes,
            });
            image.entries.insert(name.clone(), id);
        }
        image.durable_entries = image.entries.clone();
        image.preallocates = inner.preallocates;
        FaultyStorage {
            inner: Arc::new(Mutex::new(image)),
        }
    }

    /// Flips one bit in the named file (durable and volatile content).
    ///
    /// # Panics
    ///
    /// If the file does not exist or `byte_offset` is past its end (a test bug).
    pub fn flip_bit(&self, file: &str, byte_offset: u64, bit: u8) {
        let mut inner = self.inner.lock();
        let id = inner.entries.get(file).copied();
        let Some(id) = id else {
            panic!("flip_bit: no such file {file}");
        };
        let data = inner.file(id);
        let offset = byte_offset as usize;
        assert!(
            offset < data.current.len(),
            "flip_bit: offset {offset} past end of {file}"
        );
        data.current[offset] ^= 1 << (bit % 8);
        if let Some(byte) = data.durable.get_mut(offset) {
            *byte ^= 1 << (bit % 8);
        }
    }

    /// Test helper: durably cuts a file to `len` bytes (no effect if it is shorter).
    ///
    /// # Panics
    ///
    /// If the file does not exist (a test bug).
    pub fn truncate_file(&self, file: &str, len: u64) {
        let mut inner = self.inner.lock();
        let id = inner.entries.get(file).copied();
        let Some(id) = id else {
            panic!("truncate_file: no such file {file}");
        };
        let data = inner.file(id);
        data.current.truncate(len as usize);
        data.durable.truncate(len as usize);
    }

    /// Names of the files in the (current) directory, sorted.
    pub fn file_names(&self) -> Vec<String> {
        self.inner.lock().entries.keys().cloned().collect()
    }

    /// The current length of a file, if it exists.
    pub fn file_len(&self, file: &str) -> Option<u64> {
        let inner = self.inner.lock();
        let id = inner.entries.get(file)?;
        Some(
            inner
                .files
                .get(id)
                .map_or(0, |data| data.current.len() as u64),
        )
    }
}

/// The crash image of one file under [`CrashMode::Torn`].
fn torn(data: &FileData, seed: u64, name: &str) -> Vec<u8> {
    let (durable, current) = (&data.durable, &data.current);
    // Where the unsynced changes start: the first byte where the images differ (writes over a
    // preallocated file change bytes inside the durable length; appends extend it).
    let common = durable
        .iter()
        .zip(current.iter())
        .position(|(old, new)| old != new)
        .unwrap_or_else(|| durable.len().min(current.len()));
    // Only unsynced writes can be torn; an unsynced truncation falls back to the durable image.
    if current.len() < durable.len() || common == current.len() {
        return durable.clone();
    }
    let mut cuts = vec![common];
    let mut boundary = (common / SECTOR_BYTES + 1) * SECTOR_BYTES;
    while boundary < current.len() {
        cuts.push(boundary);
        boundary += SECTOR_BYTES;
    }
    cuts.push(current.len());
    let name_hash = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    let pick = splitmix64(seed ^ name_hash) % cuts.len() as u64;
    let cut = cuts[pick as usize];
    // The written prefix, then what was durable after it (zeros of a preallocated file).
    let mut image = current[..cut].to_vec();
    if cut < durable.len() {
        image.extend_from_slice(&durable[cut..]);
    }
    image
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

struct FaultyFile {
    inner: Arc<Mutex<Inner>>,
    id: u64,
    name: String,
    /// Where the next write goes: `None` appends (the end), `Some` writes over the bytes at
    /// that offset (a file from `open_write`).
    position: Option<usize>,
}

/// Makes what was written to file `id` so far durable (or fails as the plan says).
fn sync_file(inner: &Mutex<Inner>, id: u64, name: &str) -> io::Result<()> {
    let stall = inner.lock().fsync_stall;
    if !stall.is_zero() {
        std::thread::sleep(stall);
    }
    let mut inner = inner.lock();
    inner.fsync(&format!("sync {name}"))?;
    let data = inner.file(id);
    data.durable = data.current.clone();
    Ok(())
}

/// A [`FaultyFile`]'s sync, usable from another thread.
struct FaultySync {
    inner: Arc<Mutex<Inner>>,
    id: u64,
    name: String,
}

impl crate::storage::SyncHandle for FaultySync {
    fn sync(&mut self) -> io::Result<()> {
        sync_file(&self.inner, self.id, &self.name)
    }
}

impl StorageFile for FaultyFile {
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        let mut inner = self.inner.lock();
        inner.mutate(&format!("write {}", self.name))?;
        let current = &mut inner.file(self.id).current;
        match &mut self.position {
            None => current.extend_from_slice(buf),
            Some(position) => {
                let end = *position + buf.len();
                if current.len() < end {
                    current.resize(end, 0);
                }
                current[*position..end].copy_from_slice(buf);
                *position = end;
            }
        }
        Ok(())
    }

    fn sync(&mut self) -> io::Result<()> {
        sync_file(&self.inner, self.id, &self.name)
    }

    fn sync_handle(&self) -> Option<Box<dyn crate::storage::SyncHandle>> {
        Some(Box::new(FaultySync {
            inner: Arc::clone(&self.inner),
            id: self.id,
            name: self.name.clone(),
        }))
    }

    fn truncate(&mut self, len: u64) -> io::Result<()> {
        let mut inner = self.inner.lock();
        inner.mutate(&format!("truncate {}", self.name))?;
        inner.file(self.id).current.resize(len as usize, 0);
        if let Some(position) = &mut self.position {
            *position = len as usize;
        }
        Ok(())
    }
}

impl Storage for FaultyStorage {
    fn list(&self) -> io::Result<Vec<String>> {
        let inner = self.inner.lock();
        inner.check_alive()?;
        Ok(inner.entries.keys().cloned().collect())
    }

    fn create(&self, name: &str) -> io::Result<Box<dyn StorageFile>> {
        let mut inner = self.inner.lock();
        inner.mutate(&format!("create {name}"))?;
        let id = inner.new_file(FileData::default());
        inner.entries.insert(name.to_string(), id);
        inner.pending_changes.push(DirectoryChange::Create {
            name: name.to_string(),
            id,
        });
        Ok(Box::new(FaultyFile {
            inner: Arc::clone(&self.inner),
            id,
            name: name.to_string(),
            position: None,
        }))
    }

    fn open_append(&self, name: &str) -> io::Result<Box<dyn StorageFile>> {
        self.open_at(name, None)
    }

    fn open_write(&self, name: &str, at: u64) -> io::Result<Box<dyn StorageFile>> {
        self.open_at(name, Some(at as usize))
    }

    fn preallocates(&self) -> bool {
        self.inner.lock().preallocates
    }

    fn read(&self, name: &str) -> io::Result<Vec<u8>> {
        let inner = self.inner.lock();
        inner.check_alive()?;
        let id = inner.id(name)?;
        Ok(inner
            .files
            .get(&id)
            .map(|data| data.current.clone())
            .unwrap_or_default())
    }

    fn len(&self, name: &str) -> io::Result<u64> {
        let inner = self.inner.lock();
        inner.check_alive()?;
        let id = inner.id(name)?;
        Ok(inner
            .files
            .get(&id)
            .map_or(0, |data| data.current.len() as u64))
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let mut inner = self.inner.lock();
        inner.mutate(&format!("rename {from} -> {to}"))?;
        let id = inner.id(from)?;
        inner.entries.remove(from);
        inner.entries.insert(to.to_string(), id);
        inner.pending_changes.push(DirectoryChange::Rename {
            from: from.to_string(),
            to: to.to_string(),
        });
        Ok(())
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        let mut inner = self.inner.lock();
        inner.mutate(&format!("remove {name}"))?;
        inner.id(name)?;
        inner.entries.remove(name);
        inner.pending_changes.push(DirectoryChange::Remove {
            name: name.to_string(),
        });
        Ok(())
    }

    fn sync_dir(&self) -> io::Result<()> {
        let mut inner = self.inner.lock();
        inner.fsync("sync_dir")?;
        inner.durable_entries = inner.entries.clone();
        inner.pending_changes.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crash_keeps_only_synced_bytes_and_entries() {
        let storage = FaultyStorage::new();
        let mut a = storage.create("a").expect("create");
        a.write_all(b"durable").expect("write");
        a.sync().expect("sync");
        a.write_all(b" volatile").expect("write");
        let _b = storage.create("b").expect("create");
        assert!(
            storage
                .crash_image(CrashMode::DropUnsynced)
                .file_names()
                .is_empty()
        );
        storage.sync_dir().expect("sync_dir");
        storage.rename("a", "c").expect("rename");
        let image = storage.crash_image(CrashMode::DropUnsynced);
        assert_eq!(image.file_names(), vec!["a".to_string(), "b".to_string()]);
        assert_eq!(image.read("a").expect("read"), b"durable");
        assert_eq!(storage.read("c").expect("read"), b"durable volatile");
    }

    #[test]
    fn torn_image_cuts_at_sector_boundaries() {
        let storage = FaultyStorage::new();
        let mut file = storage.create("f").expect("create");
        storage.sync_dir().expect("sync_dir");
        file.write_all(&[1; 100]).expect("write");
        file.sync().expect("sync");
        file.write_all(&[2; 2000]).expect("write");
        let mut lengths = std::collections::BTreeSet::new();
        for seed in 0..200 {
            let image = storage.crash_image(CrashMode::Torn { seed });
            lengths.insert(image.file_len("f").expect("exists"));
        }
        let expected: std::collections::BTreeSet<u64> = [100, 512, 1024, 1536, 2048, 2100].into();
        assert_eq!(lengths, expected);
    }

    #[test]
    fn operations_fail_from_the_armed_op_on() {
        let storage = FaultyStorage::new();
        storage.fail_from_op(Some(1));
        let mut file = storage.create("f").expect("op 0 succeeds");
        assert!(file.write_all(b"x").is_err());
        assert!(storage.list().is_err());
        assert_eq!(storage.ops(), 2);
        storage.fail_from_op(None);
        assert_eq!(storage.read("f").expect("read"), b"");
    }
}
