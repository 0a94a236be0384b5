//! Session records and the chunked slab that stores them.
//!
//! A record is 60 bytes with 4-byte alignment: the session itself (uid, connection, last
//! heartbeat, ttl, login second, gateway id, device id) plus the `u32` links of the three
//! intrusive lists it sits in (the chain of its uid, the list of its gateway, one timing wheel
//! slot). Links are indices, not pointers: half the size, and no unsafe code.
//!
//! The slab grows in fixed chunks of [`CHUNK_RECORDS`] records and never moves a record, so
//! growth costs one 60 KB allocation instead of a doubling copy under the shard lock, and the
//! unused tail is at most one chunk (a doubling `Vec` wastes up to half). Freed records go on a
//! free list threaded through `next_in_uid` and are reused first; chunks are not returned to
//! the allocator (the high-water mark is kept, like a Redis dict that was not rehashed smaller).
//!
//! Indices at or above [`RECORDS_MAX`] are reserved for the wheel sentinels and [`NIL`].

use crate::hash::Packed64;

/// "No record": end of a list, empty head.
pub(crate) const NIL: u32 = u32::MAX;
/// Records per slab chunk.
pub(crate) const CHUNK_RECORDS: usize = 1024;
/// Indices from here up are not records (wheel sentinels, [`NIL`]).
pub(crate) const RECORDS_MAX: u32 = u32::MAX - (1 << 20);
/// `gateway` value marking a free record.
const FREE: u32 = u32::MAX;
/// Bit of `device_and_flags` saying that the session has metadata in the side map.
const META_FLAG: u32 = 1 << 31;

/// One session record. `repr(C)` with only `u32` fields keeps it at exactly 60 bytes.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub(crate) struct Rec {
    /// The user id.
    pub uid: Packed64,
    /// The connection id, unique within the uid.
    pub conn: Packed64,
    /// Last heartbeat (or login) time; expiry is at `last_heartbeat_ms + ttl_ms`.
    pub last_heartbeat_ms: Packed64,
    /// Time to live after the last heartbeat.
    pub ttl_ms: u32,
    /// Login time in whole seconds: informational, so second precision halves its size.
    pub login_s: u32,
    /// Interned gateway id, or [`FREE`] when the record is on the free list.
    pub gateway: u32,
    /// Per-shard device id in the low 31 bits; the top bit says "has metadata".
    device_and_flags: u32,
    /// Next record of the same uid, or the next free record.
    pub next_in_uid: u32,
    /// Neighbours in the list of the record's gateway.
    pub gateway_prev: u32,
    /// See `gateway_prev`.
    pub gateway_next: u32,
    /// Neighbours in the record's wheel slot (a sentinel index at the ends).
    pub wheel_prev: u32,
    /// See `wheel_prev`.
    pub wheel_next: u32,
}

const _: () = assert!(std::mem::size_of::<Rec>() == 60);

impl Rec {
    const EMPTY: Rec = Rec {
        uid: Packed64::new(0),
        conn: Packed64::new(0),
        last_heartbeat_ms: Packed64::new(0),
        ttl_ms: 0,
        login_s: 0,
        gateway: FREE,
        device_and_flags: 0,
        next_in_uid: NIL,
        gateway_prev: NIL,
        gateway_next: NIL,
        wheel_prev: NIL,
        wheel_next: NIL,
    };

    /// Creates an unlinked live record.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        uid: u64,
        conn: u64,
        last_heartbeat_ms: u64,
        ttl_ms: u32,
        login_s: u32,
        gateway: u32,
        device: u32,
        has_meta: bool,
    ) -> Self {
        Rec {
            uid: Packed64::new(uid),
            conn: Packed64::new(conn),
            last_heartbeat_ms: Packed64::new(last_heartbeat_ms),
            ttl_ms,
            login_s,
            gateway,
            device_and_flags: device | if has_meta { META_FLAG } else { 0 },
            ..Rec::EMPTY
        }
    }

    /// The per-shard device id.
    pub(crate) fn device(&self) -> u32 {
        self.device_and_flags & !META_FLAG
    }

    /// Whether the session has metadata in the side map.
    pub(crate) fn has_meta(&self) -> bool {
        self.device_and_flags & META_FLAG != 0
    }

    /// Whether the record holds a session (is not on the free list).
    pub(crate) fn is_live(&self) -> bool {
        self.gateway != FREE
    }

    /// When the session expires: `last_heartbeat_ms + ttl_ms`.
    pub(crate) fn deadline_ms(&self) -> u64 {
        self.last_heartbeat_ms
            .get()
            .saturating_add(u64::from(self.ttl_ms))
    }
}

/// Fixed-chunk storage of records addressed by `u32` index.
#[derive(Debug, Default)]
pub(crate) struct Slab {
    chunks: Vec<Box<[Rec]>>,
    /// Records ever handed out (the high-water mark); indices below it are live or free.
    high_water: u32,
    /// First free record below `high_water`, chained through `next_in_uid`.
    free_head: u32,
    /// Free records below `high_water`.
    free_len: u32,
}

impl Slab {
    /// Creates an empty slab.
    pub(crate) fn new() -> Self {
        Self {
            chunks: Vec::new(),
            high_water: 0,
            free_head: NIL,
            free_len: 0,
        }
    }

    /// Stores `rec`, returning its index, or `None` when the index space is exhausted.
    pub(crate) fn insert(&mut self, rec: Rec) -> Option<u32> {
        if self.free_head != NIL {
            let index = self.free_head;
            let slot = self.get_mut(index);
            let next_free = slot.next_in_uid;
            *slot = rec;
            self.free_head = next_free;
            self.free_len -= 1;
            return Some(index);
        }
        if self.high_water >= RECORDS_MAX {
            return None;
        }
        let index = self.high_water;
        if index as usize == self.chunks.len() * CHUNK_RECORDS {
            self.chunks
                .push(vec![Rec::EMPTY; CHUNK_RECORDS].into_boxed_slice());
        }
        self.high_water += 1;
        *self.get_mut(index) = rec;
        Some(index)
    }

    /// Puts the record at `index` on the free list.
    pub(crate) fn remove(&mut self, index: u32) {
        let free_head = self.free_head;
        let slot = self.get_mut(index);
        *slot = Rec::EMPTY;
        slot.next_in_uid = free_head;
        self.free_head = index;
        self.free_len += 1;
    }

    /// The record at `index` (live or free). Panics on an index never handed out, which would
    /// be a broken internal link.
    pub(crate) fn get(&self, index: u32) -> &Rec {
        let index = index as usize;
        &self.chunks[index / CHUNK_RECORDS][index % CHUNK_RECORDS]
    }

    /// Mutable access to the record at `index`.
    pub(crate) fn get_mut(&mut self, index: u32) -> &mut Rec {
        let index = index as usize;
        &mut self.chunks[index / CHUNK_RECORDS][index % CHUNK_RECORDS]
    }

    /// Records ever handed out.
    pub(crate) fn high_water(&self) -> u32 {
        self.high_water
    }

    /// Free records below the high-water mark.
    pub(crate) fn free_len(&self) -> u32 {
        self.free_len
    }

    /// Walks the free list, returning its length (for invariant checks).
    pub(crate) fn free_list_len(&self) -> u32 {
        let mut count = 0;
        let mut index = self.free_head;
        while index != NIL && count <= self.high_water {
            count += 1;
            index = self.get(index).next_in_uid;
        }
        count
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
        let mut slab = Slab::new();
        let a = slab.insert(Rec::new(1, 2, 3, 4, 5, 6, 7, true)).unwrap();
        let b = slab
            .insert(Rec::new(8, 9, 10, 11, 12, 13, 14, false))
            .unwrap();
        assert_eq!((a, b), (0, 1));
        assert!(slab.get(a).has_meta());
        assert_eq!(slab.get(a).device(), 7);
        assert_eq!(slab.get(b).deadline_ms(), 21);
        slab.remove(a);
        assert!(!slab.get(a).is_live());
        assert_eq!(slab.free_len(), 1);
        let c = slab.insert(Rec::new(1, 2, 3, 4, 5, 6, 7, false)).unwrap();
        assert_eq!(c, a);
        assert_eq!(slab.high_water(), 2);
        assert_eq!(slab.free_list_len(), 0);
    }
}
