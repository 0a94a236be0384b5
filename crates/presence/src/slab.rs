//! Session records and the chunked slab that stores them.
//!
//! A record is 36 bytes with 4-byte alignment and holds only the session itself plus one link:
//!
//! ```text
//!  uid u64 | conn u64 | last_heartbeat_ms (48 bits) + gateway id (16 bits)
//!  | login_s u32 | profile id (28 bits) + has-meta bit + state (2 bits) | next u32
//! ```
//!
//! - The profile is the shard-interned pair (device, ttl_ms): devices are kinds ("ios") or
//!   short ids, ttls are a handful of configured values, so one 28-bit id replaces a 4-byte
//!   device id and a 4-byte ttl.
//! - The last heartbeat is exact milliseconds in 48 bits: times up to [`TIME_MS_MAX`]
//!   (year 10889); a later time is stored as [`TIME_MS_MAX`] (see its documentation).
//! - `next` links the record into one timing wheel slot (live and tombstone records) or into
//!   the free list (free records). There are no uid chain or gateway links: the uid index
//!   ([`crate::index`]) finds the records of a uid, and `gateway_down` scans the shard.
//!
//! A record is in one of three states: **live** (a session, in the uid index and in the
//! wheel), **tombstone** (its session was removed, but it still sits in a wheel slot until the
//! expiry walk passes it and frees it: a singly linked slot list cannot unlink from the middle)
//! and **free** (on the free list, reused first).
//!
//! The slab grows in fixed chunks of [`CHUNK_RECORDS`] records and never moves a record, so
//! growth costs one 18 KB allocation instead of a doubling copy under the shard lock, and the
//! unused tail is at most one chunk. Chunks are not returned to the allocator (the high-water
//! mark is kept, like a Redis dict that was not rehashed smaller).

use crate::hash::Packed64;

/// "No record": end of a list, empty head.
pub(crate) const NIL: u32 = u32::MAX;
/// Records per slab chunk.
pub(crate) const CHUNK_RECORDS: usize = 512;
/// Latest time a record can hold: 2^48 - 1 ms after the Unix epoch, in the year 10889.
///
/// Heartbeat times are stored in 48 bits. A later time (no real clock gets there) is stored
/// as this value, so such a session's deadline is computed from this time instead.
pub const TIME_MS_MAX: u64 = (1 << 48) - 1;
/// Largest profile id a record can hold (28 bits); more than the record index space.
pub(crate) const PROFILE_ID_MAX: u32 = (1 << 28) - 1;

const TIME_MASK: u64 = TIME_MS_MAX;
const GATEWAY_SHIFT: u32 = 48;
const META_FLAG: u32 = 1 << 28;
const STATE_SHIFT: u32 = 30;
const STATE_LIVE: u32 = 0;
const STATE_TOMBSTONE: u32 = 1;
const STATE_FREE: u32 = 2;

/// One session record. `repr(C)` with 4-byte fields keeps it at exactly 36 bytes.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub(crate) struct Rec {
    /// The user id.
    pub uid: Packed64,
    /// The connection id, unique within the uid.
    pub conn: Packed64,
    /// Last heartbeat (low 48 bits) and gateway id (high 16 bits).
    heartbeat_and_gateway: Packed64,
    /// Login time in whole seconds: informational, so second precision halves its size.
    pub login_s: u32,
    /// Profile id (low 28 bits), has-metadata bit, state (top 2 bits).
    profile_and_flags: u32,
    /// Next record in the wheel slot (live, tombstone) or in the free list (free).
    pub next: u32,
}

const _: () = assert!(std::mem::size_of::<Rec>() == 36);

impl Rec {
    const FREE: Rec = Rec {
        uid: Packed64::new(0),
        conn: Packed64::new(0),
        heartbeat_and_gateway: Packed64::new(0),
        login_s: 0,
        profile_and_flags: STATE_FREE << STATE_SHIFT,
        next: NIL,
    };

    /// Creates an unlinked live record. `profile` must be at most [`PROFILE_ID_MAX`].
    pub(crate) fn new(
        uid: u64,
        conn: u64,
        last_heartbeat_ms: u64,
        login_s: u32,
        gateway: u16,
        profile: u32,
        has_meta: bool,
    ) -> Self {
        debug_assert!(profile <= PROFILE_ID_MAX);
        let mut rec = Rec {
            uid: Packed64::new(uid),
            conn: Packed64::new(conn),
            heartbeat_and_gateway: Packed64::new(u64::from(gateway) << GATEWAY_SHIFT),
            login_s,
            profile_and_flags: (profile & PROFILE_ID_MAX) | if has_meta { META_FLAG } else { 0 },
            next: NIL,
        };
        rec.set_last_heartbeat_ms(last_heartbeat_ms);
        rec
    }

    /// The last heartbeat time.
    pub(crate) fn last_heartbeat_ms(&self) -> u64 {
        self.heartbeat_and_gateway.get() & TIME_MASK
    }

    /// Sets the last heartbeat time, stored as at most [`TIME_MS_MAX`].
    pub(crate) fn set_last_heartbeat_ms(&mut self, at_ms: u64) {
        let word = self.heartbeat_and_gateway.get();
        self.heartbeat_and_gateway = Packed64::new((word & !TIME_MASK) | at_ms.min(TIME_MS_MAX));
    }

    /// The interned gateway id.
    pub(crate) fn gateway(&self) -> u16 {
        (self.heartbeat_and_gateway.get() >> GATEWAY_SHIFT) as u16
    }

    /// The per-shard profile id (device and ttl).
    pub(crate) fn profile(&self) -> u32 {
        self.profile_and_flags & PROFILE_ID_MAX
    }

    /// Whether the session has metadata in the side map.
    pub(crate) fn has_meta(&self) -> bool {
        self.profile_and_flags & META_FLAG != 0
    }

    /// Whether the record holds a session.
    pub(crate) fn is_live(&self) -> bool {
        self.profile_and_flags >> STATE_SHIFT == STATE_LIVE
    }

    /// Whether the record is a removed session still linked in the wheel.
    pub(crate) fn is_tombstone(&self) -> bool {
        self.profile_and_flags >> STATE_SHIFT == STATE_TOMBSTONE
    }

    /// Turns a live record into a tombstone; its wheel link is kept.
    pub(crate) fn bury(&mut self) {
        self.profile_and_flags = STATE_TOMBSTONE << STATE_SHIFT;
    }

    /// When the session expires, given its ttl: `last_heartbeat_ms + ttl_ms`.
    pub(crate) fn deadline_ms(&self, ttl_ms: u32) -> u64 {
        self.last_heartbeat_ms() + u64::from(ttl_ms)
    }
}

/// Fixed-chunk storage of records addressed by `u32` index.
#[derive(Debug)]
pub(crate) struct Slab {
    chunks: Vec<Box<[Rec]>>,
    /// Records ever handed out (the high-water mark); indices below it are in use or free.
    high_water: u32,
    /// Largest number of records (the index space; see [`crate::index::RECORDS_MAX`]).
    records_max: u32,
    /// First free record below `high_water`, chained through `next`.
    free_head: u32,
    /// Free records below `high_water`.
    free_len: u32,
}

impl Slab {
    /// Creates an empty slab holding at most `records_max` records.
    pub(crate) fn new(records_max: u32) -> Self {
        Self {
            chunks: Vec::new(),
            high_water: 0,
            records_max,
            free_head: NIL,
            free_len: 0,
        }
    }

    /// Whether one more record fits.
    pub(crate) fn has_room(&self) -> bool {
        self.free_len > 0 || self.high_water < self.records_max
    }

    /// Stores `rec`, returning its index, or `None` when the index space is exhausted.
    pub(crate) fn insert(&mut self, rec: Rec) -> Option<u32> {
        if self.free_head != NIL {
            let index = self.free_head;
            let slot = self.get_mut(index);
            let next_free = slot.next;
            *slot = rec;
            self.free_head = next_free;
            self.free_len -= 1;
            return Some(index);
        }
        if self.high_water >= self.records_max {
            return None;
        }
        let index = self.high_water;
        if index as usize == self.chunks.len() * CHUNK_RECORDS {
            self.chunks
                .push(vec![Rec::FREE; CHUNK_RECORDS].into_boxed_slice());
        }
        self.high_water += 1;
        *self.get_mut(index) = rec;
        Some(index)
    }

    /// Puts the record at `index` on the free list (it must be unlinked from the wheel).
    pub(crate) fn free(&mut self, index: u32) {
        let free_head = self.free_head;
        let slot = self.get_mut(index);
        *slot = Rec::FREE;
        slot.next = free_head;
        self.free_head = index;
        self.free_len += 1;
    }

    /// The record at `index` (in any state). Panics on an index never handed out, which would
    /// be a broken internal link.
    pub(crate) fn get(&self, index: u32) -> &Rec {
        let index = index as usize;
        &self.chunks[index / CHUNK_RECORDS][index % CHUNK_RECORDS]
    }

    /// Hints the CPU to load the record at `index`; nothing for an index never handed out.
    pub(crate) fn prefetch(&self, index: u32) {
        let index = index as usize;
        if let Some(chunk) = self.chunks.get(index / CHUNK_RECORDS) {
            crate::prefetch::prefetch(chunk.as_ptr().wrapping_add(index % CHUNK_RECORDS));
        }
    }

    /// Mutable access to the record at `index`.
    pub(crate) fn get_mut(&mut self, index: u32) -> &mut Rec {
        let index = index as usize;
        &mut self.chunks[index / CHUNK_RECORDS][index % CHUNK_RECORDS]
    }

    /// (index, uid) of every live record, in index order: a sequential scan of the chunks.
    pub(crate) fn live_uids(&self) -> impl Iterator<Item = (u32, u64)> + '_ {
        self.chunks
            .iter()
            .flat_map(|chunk| chunk.iter())
            .take(self.high_water as usize)
            .enumerate()
            .filter(|(_, rec)| rec.is_live())
            .map(|(index, rec)| (index as u32, rec.uid.get()))
    }

    /// Records ever handed out.
    pub(crate) fn high_water(&self) -> u32 {
        self.high_water
    }

    /// Free records below the high-water mark.
    pub(crate) fn free_len(&self) -> u32 {
        self.free_len
    }

    /// Walks the free list, returning its length if every member is free (invariant checks).
    pub(crate) fn free_list_len(&self) -> Option<u32> {
        let mut count = 0;
        let mut index = self.free_head;
        while index != NIL {
            if count > self.high_water || index >= self.high_water {
                return None;
            }
            let rec = self.get(index);
            if rec.profile_and_flags >> STATE_SHIFT != STATE_FREE {
                return None;
            }
            count += 1;
            index = rec.next;
        }
        Some(count)
    }

    /// Bytes held by the chunks.
    pub(crate) fn allocated_bytes(&self) -> usize {
        self.chunks.len() * CHUNK_RECORDS * std::mem::size_of::<Rec>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reuses_freed_records_before_growing() {
        let mut slab = Slab::new(1_000);
        let a = slab.insert(Rec::new(1, 2, 3, 5, 6, 7, true)).unwrap();
        let b = slab.insert(Rec::new(8, 9, 10, 12, 13, 14, false)).unwrap();
        assert_eq!((a, b), (0, 1));
        assert!(slab.get(a).has_meta());
        assert_eq!(slab.get(a).profile(), 7);
        assert_eq!(slab.get(a).gateway(), 6);
        assert_eq!(slab.get(b).deadline_ms(11), 21);
        slab.get_mut(a).bury();
        assert!(slab.get(a).is_tombstone() && !slab.get(a).is_live());
        slab.free(a);
        assert!(!slab.get(a).is_live() && !slab.get(a).is_tombstone());
        assert_eq!(slab.free_len(), 1);
        let c = slab.insert(Rec::new(1, 2, 3, 5, 6, 7, false)).unwrap();
        assert_eq!(c, a);
        assert_eq!(slab.high_water(), 2);
        assert_eq!(slab.free_list_len(), Some(0));
    }

    #[test]
    fn packed_fields_keep_their_full_range() {
        let mut rec = Rec::new(
            u64::MAX,
            u64::MAX,
            TIME_MS_MAX,
            u32::MAX,
            u16::MAX,
            5,
            false,
        );
        assert_eq!(rec.last_heartbeat_ms(), TIME_MS_MAX);
        assert_eq!(rec.gateway(), u16::MAX);
        rec.set_last_heartbeat_ms(u64::MAX);
        assert_eq!(rec.last_heartbeat_ms(), TIME_MS_MAX, "saturates");
        assert_eq!(rec.gateway(), u16::MAX, "untouched by the time");
        rec.set_last_heartbeat_ms(1_700_000_000_123);
        assert_eq!(rec.last_heartbeat_ms(), 1_700_000_000_123);
        let rec = Rec::new(1, 2, 3, 4, 0, PROFILE_ID_MAX, true);
        assert_eq!(rec.profile(), PROFILE_ID_MAX);
        assert!(rec.has_meta() && rec.is_live());
    }
}
