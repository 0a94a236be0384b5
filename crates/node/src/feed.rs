//! The presence change feed: the most recent change records, in LSN order, for replicas.
//!
//! ```text
//!  shard lock held ──► NodeJournal::record ──► feed lock ──► Log::append (LSN) ──► ring push
//!  replica stream  ──► Cursor::next_batch(from LSN) ──► records after it, or "too old"
//! ```
//!
//! One format, many consumers (DESIGN.md): the records are the WAL's own change records. The
//! feed is a bounded ring ([`FeedLimits::bytes_max`], B1): appending never waits for a reader,
//! and a reader that falls behind the ring's oldest record gets [`Behind`] and must resync
//! from a snapshot; a slow or stalled replica never grows the primary's memory.
//!
//! Invariant: records in the ring are in LSN order with no gap, because the log append and
//! the ring push happen under the feed's lock. So "every record up to LSN n" is a prefix of
//! the ring, which is what a replica's position means.

use std::collections::VecDeque;
use std::sync::Arc;

use std::time::Instant;

use parking_lot::Mutex;
use tokio::sync::watch;

/// Bounds of the feed.
#[derive(Clone, Copy, Debug)]
pub struct FeedLimits {
    /// Bytes of records the ring keeps (at least the newest record is always kept).
    pub bytes_max: usize,
}

impl Default for FeedLimits {
    fn default() -> Self {
        Self {
            bytes_max: 64 * 1024 * 1024,
        }
    }
}

/// The reader asked for records the ring no longer holds: resync from a snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the change feed holds LSNs from {oldest} on; a reader at {at} must resync by snapshot")]
pub struct Behind {
    /// The reader's position (the last LSN it has).
    pub at: u64,
    /// The oldest LSN the ring holds.
    pub oldest: u64,
}

/// One record of the feed: its LSN and its bytes (a WAL record's payload).
pub type FeedRecord = (u64, Arc<[u8]>);

struct Ring {
    records: VecDeque<FeedRecord>,
    /// When each record of `records` was appended (same order), for replicas' lag.
    appended: VecDeque<Instant>,
    bytes: usize,
    /// The newest LSN appended (0 before any).
    last: u64,
}

/// The feed of one node's presence log.
pub struct ChangeFeed {
    limits: FeedLimits,
    ring: Mutex<Ring>,
    last: watch::Sender<u64>,
}

impl ChangeFeed {
    /// An empty feed whose next record follows `last_lsn` (the log's last LSN at start).
    pub fn new(limits: FeedLimits, last_lsn: u64) -> Arc<Self> {
        let (last, _) = watch::channel(last_lsn);
        Arc::new(Self {
            limits,
            ring: Mutex::new(Ring {
                records: VecDeque::new(),
                appended: VecDeque::new(),
                bytes: 0,
                last: last_lsn,
            }),
            last,
        })
    }

    /// Appends `bytes` through `append` (the log append, which assigns the LSN) and keeps the
    /// record, both under the feed's lock so the ring stays in LSN order. Returns what
    /// `append` returned.
    pub fn append<E>(
        &self,
        bytes: Vec<u8>,
        append: impl FnOnce(Vec<u8>) -> Result<u64, E>,
    ) -> Result<u64, E> {
        let record: Arc<[u8]> = Arc::from(&bytes[..]);
        let mut ring = self.ring.lock();
        let lsn = append(bytes)?;
        ring.bytes += record.len();
        ring.records.push_back((lsn, record));
        ring.appended.push_back(Instant::now());
        ring.last = lsn;
        while ring.bytes > self.limits.bytes_max && ring.records.len() > 1 {
            if let Some((_, old)) = ring.records.pop_front() {
                ring.bytes -= old.len();
                ring.appended.pop_front();
            }
        }
        drop(ring);
        self.last.send_replace(lsn);
        Ok(lsn)
    }

    /// The newest LSN appended.
    pub fn last_lsn(&self) -> u64 {
        self.ring.lock().last
    }

    /// Records after `at`, at most `max_records` of them, in LSN order (empty when `at` is the
    /// newest), or [`Behind`] when the ring no longer holds the one after `at`.
    pub fn read_after(&self, at: u64, max_records: usize) -> Result<Vec<FeedRecord>, Behind> {
        let ring = self.ring.lock();
        if at >= ring.last {
            return Ok(Vec::new());
        }
        let oldest = ring.records.front().map_or(ring.last + 1, |(lsn, _)| *lsn);
        if at + 1 < oldest {
            return Err(Behind { at, oldest });
        }
        let start = ring.records.partition_point(|(lsn, _)| *lsn <= at);
        // Records appended before the feed existed are not in it: never skip over them.
        if let Some((first, _)) = ring.records.get(start)
            && *first != at + 1
        {
            return Err(Behind { at, oldest: *first });
        }
        Ok(ring
            .records
            .range(start..)
            .take(max_records.max(1))
            .cloned()
            .collect())
    }

    /// Resolves once a record after `at` exists (at once if one does).
    pub async fn wait_after(&self, at: u64) {
        let mut last = self.last.subscribe();
        let _ = last.wait_for(|last| *last > at).await;
    }

    /// How far a reader that holds every record through `at` is behind: the records after
    /// it, and how long ago the first of them was appended (`None` when the ring no longer
    /// holds it: that reader must resync). `(0, Some(0))` when it has everything.
    pub fn lag(&self, at: u64) -> (u64, Option<std::time::Duration>) {
        let ring = self.ring.lock();
        if at >= ring.last {
            return (0, Some(std::time::Duration::ZERO));
        }
        let records = ring.last - at;
        let start = ring.records.partition_point(|(lsn, _)| *lsn <= at);
        let since = match ring.records.get(start) {
            Some((lsn, _)) if *lsn == at + 1 => ring.appended.get(start).map(Instant::elapsed),
            _ => None,
        };
        (records, since)
    }

    /// Bytes held by the ring.
    pub fn bytes(&self) -> usize {
        self.ring.lock().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(bytes_max: usize) -> (Arc<ChangeFeed>, impl FnMut(Vec<u8>) -> Result<u64, ()>) {
        let mut next = 10;
        let append = move |_bytes: Vec<u8>| {
            next += 1;
            Ok::<u64, ()>(next)
        };
        (ChangeFeed::new(FeedLimits { bytes_max }, 10), append)
    }

    #[test]
    fn readers_get_records_in_order_and_a_reader_behind_the_ring_is_told_to_resync() {
        let (feed, mut append) = feed(40);
        assert_eq!(feed.read_after(10, 10), Ok(Vec::new()));
        for value in 0..10u8 {
            feed.append(vec![value; 10], &mut append).unwrap();
        }
        // Bounded: 4 records of 10 bytes fit in 40.
        assert_eq!(feed.bytes(), 40);
        assert_eq!(feed.last_lsn(), 20);
        let got = feed.read_after(17, 10).unwrap();
        assert_eq!(
            got.iter().map(|(lsn, _)| *lsn).collect::<Vec<_>>(),
            vec![18, 19, 20]
        );
        assert_eq!(&got[0].1[..], &[7u8; 10][..]);
        assert_eq!(feed.read_after(16, 2).unwrap().len(), 2);
        assert_eq!(feed.read_after(20, 10), Ok(Vec::new()));
        assert_eq!(feed.read_after(15, 10), Err(Behind { at: 15, oldest: 17 }));
        // Lag: records after the reader's position, and since when.
        assert_eq!(feed.lag(20), (0, Some(std::time::Duration::ZERO)));
        let (records, since) = feed.lag(18);
        assert_eq!(records, 2);
        assert!(since.is_some());
        assert_eq!(feed.lag(10), (10, None), "behind the ring");
        // A record larger than the whole budget is still kept (the newest always is).
        feed.append(vec![0; 100], &mut append).unwrap();
        assert_eq!(feed.read_after(20, 10).unwrap().len(), 1);
    }

    #[test]
    fn a_failed_append_keeps_nothing() {
        let feed = ChangeFeed::new(FeedLimits::default(), 5);
        assert_eq!(
            feed.append(vec![1], |_| Err::<u64, &str>("disk")),
            Err("disk")
        );
        assert_eq!(feed.last_lsn(), 5);
        assert_eq!(feed.bytes(), 0);
    }

    #[tokio::test]
    async fn waiting_resolves_when_a_record_arrives() {
        let feed = ChangeFeed::new(FeedLimits::default(), 0);
        let waiter = {
            let feed = Arc::clone(&feed);
            tokio::spawn(async move { feed.wait_after(0).await })
        };
        tokio::task::yield_now().await;
        feed.append(vec![1], |_| Ok::<u64, ()>(1)).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
    }
}
