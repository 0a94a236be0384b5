//! The Watch fan-out: presence events from the journal to every subscriber, bounded.
//!
//! ```text
//!  journal (under a shard lock) ──publish(lsn, event)──┬─► broadcast ring ──► unfiltered
//!                                                      │   (watch_buffer_events)  subscribers
//!                                                      └─► uid map ──try_send──► filtered
//!                                                          uid -> [subscriber]   subscribers
//!                                                                               (own bounded
//!                                                                                queue each)
//! ```
//!
//! Why two paths: a subscriber without a filter sees every event, so one shared ring is the
//! cheapest (one send per event, whatever the number of subscribers). A subscriber with a uid
//! filter must only be held to account for the events meant for it: fed from the shared ring,
//! it would fall behind on other uids' traffic and be cut off although it was sent nothing. So
//! filtered subscribers are found through a uid map and each gets its own bounded queue; its
//! lag counts only what it was sent.
//!
//! Invariants and limits (B1):
//! - `publish` never blocks: the ring overwrites, a full filtered queue marks its subscriber
//!   cut off (`missed` counts what it lost from then on). It is called under a shard lock.
//! - At most `subscribers_max` subscribers, each filter at most `uids_max` uids; more is a
//!   clear RESOURCE_EXHAUSTED naming the limit.
//! - [`WatchHub::stop`] ends every subscriber with [`WatchEnd::Stopping`] at once, so a node
//!   that stops never waits for a watch client to go away.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use imstate_presence::Event;
use parking_lot::RwLock;
use tokio::sync::{broadcast, mpsc, watch};

/// An event as published to watchers: the registry event and its position in the log.
#[derive(Debug, Clone)]
pub struct Published {
    /// LSN of the event's log record.
    pub lsn: u64,
    /// What happened.
    pub event: Arc<Event>,
}

/// The bounds of the hub (configuration keys `presence.watch_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WatchLimits {
    /// Events a subscriber may fall behind before it is cut off.
    pub buffer_events: usize,
    /// Subscribers at once.
    pub subscribers_max: usize,
    /// Uids in one subscriber's filter.
    pub uids_max: usize,
}

impl Default for WatchLimits {
    fn default() -> Self {
        Self {
            buffer_events: 8_192,
            subscribers_max: 1_024,
            uids_max: 10_000,
        }
    }
}

/// Why a subscription refused to start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WatchRefused {
    /// `subscribers_max` subscribers are open.
    #[error("{open} Watch subscribers are open; presence.watch_subscribers_max is {max}")]
    Subscribers {
        /// Subscribers open.
        open: usize,
        /// The limit.
        max: usize,
    },
    /// The filter names more than `uids_max` uids.
    #[error("a Watch filter of {len} uids; presence.watch_uids_max is {max}")]
    Uids {
        /// Uids asked for.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The node is stopping.
    #[error("the node is stopping")]
    Stopping,
}

/// Why a subscription ended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WatchEnd {
    /// The subscriber read too slowly: events meant for it were lost.
    #[error(
        "watch subscriber fell behind: {missed} events meant for it did not fit in its buffer \
         of presence.watch_buffer_events = {limit}; read the state again and re-subscribe"
    )]
    Lagged {
        /// Events meant for this subscriber that it will never see (at least this many).
        missed: u64,
        /// The buffer size.
        limit: usize,
    },
    /// The node is stopping: re-subscribe after it restarts, or to another node.
    #[error("the node is stopping; re-subscribe after it restarts or to another node")]
    Stopping,
    /// The hub was dropped.
    #[error("the presence store is closed")]
    Closed,
}

/// A filtered subscriber as the publisher sees it.
struct Filtered {
    queue: mpsc::Sender<Published>,
    /// Events lost since its queue first overflowed; nonzero means cut off.
    missed: AtomicU64,
}

impl Filtered {
    fn offer(&self, published: &Published) {
        if self.missed.load(Ordering::Relaxed) > 0 {
            self.missed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if let Err(mpsc::error::TrySendError::Full(_)) = self.queue.try_send(published.clone()) {
            self.missed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Filtered subscribers by uid (each subscriber once per uid of its filter).
type UidMap = HashMap<u64, Vec<Arc<Filtered>>>;

/// The fan-out of one presence store's events.
pub struct WatchHub {
    limits: WatchLimits,
    all: broadcast::Sender<Published>,
    filtered: RwLock<UidMap>,
    /// Filtered subscribers open: `publish` skips the map while there are none.
    filtered_open: AtomicUsize,
    /// Every subscriber open (filtered or not), for `subscribers_max`.
    open: AtomicUsize,
    stopping: watch::Sender<bool>,
}

impl WatchHub {
    /// An idle hub.
    pub fn new(limits: WatchLimits) -> Arc<Self> {
        let (all, _) = broadcast::channel(limits.buffer_events.max(1));
        let (stopping, _) = watch::channel(false);
        Arc::new(Self {
            limits,
            all,
            filtered: RwLock::new(HashMap::new()),
            filtered_open: AtomicUsize::new(0),
            open: AtomicUsize::new(0),
            stopping,
        })
    }

    /// The hub's limits.
    pub fn limits(&self) -> WatchLimits {
        self.limits
    }

    /// Subscribers open now.
    pub fn subscribers(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Whether anyone listens (the journal skips building events otherwise).
    pub fn has_subscribers(&self) -> bool {
        self.open.load(Ordering::Relaxed) > 0
    }

    /// Hands `event` to every subscriber it concerns. Never blocks (see the module doc).
    pub fn publish(&self, lsn: u64, event: &Event) {
        let to_all = self.all.receiver_count() > 0;
        let to_filtered = self.filtered_open.load(Ordering::Acquire) > 0;
        if !to_all && !to_filtered {
            return;
        }
        let published = Published {
            lsn,
            event: Arc::new(event.clone()),
        };
        if to_filtered {
            let map = self.filtered.read();
            let mut offered: Vec<*const Filtered> = Vec::new();
            for uid in event_uids(event) {
                for subscriber in map.get(&uid).into_iter().flatten() {
                    let key = Arc::as_ptr(subscriber);
                    // A gateway drop can name several uids of one subscriber: send it once.
                    if !offered.contains(&key) {
                        offered.push(key);
                        subscriber.offer(&published);
                    }
                }
            }
        }
        if to_all {
            let _ = self.all.send(published);
        }
    }

    /// Starts a subscription to every event (`uids` empty) or to the events of `uids`.
    pub fn subscribe(self: &Arc<Self>, uids: HashSet<u64>) -> Result<Subscriber, WatchRefused> {
        if *self.stopping.borrow() {
            return Err(WatchRefused::Stopping);
        }
        if uids.len() > self.limits.uids_max {
            return Err(WatchRefused::Uids {
                len: uids.len(),
                max: self.limits.uids_max,
            });
        }
        let open = self.open.fetch_add(1, Ordering::AcqRel) + 1;
        if open > self.limits.subscribers_max {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return Err(WatchRefused::Subscribers {
                open: open - 1,
                max: self.limits.subscribers_max,
            });
        }
        let source = if uids.is_empty() {
            Source::All(self.all.subscribe())
        } else {
            let (queue, receiver) = mpsc::channel(self.limits.buffer_events.max(1));
            let filtered = Arc::new(Filtered {
                queue,
                missed: AtomicU64::new(0),
            });
            let mut map = self.filtered.write();
            for &uid in &uids {
                map.entry(uid).or_default().push(Arc::clone(&filtered));
            }
            self.filtered_open.fetch_add(1, Ordering::AcqRel);
            Source::Filtered {
                receiver,
                filtered,
                uids,
            }
        };
        Ok(Subscriber {
            hub: Arc::clone(self),
            source,
            stopping: self.stopping.subscribe(),
        })
    }

    /// Ends every subscription with [`WatchEnd::Stopping`] and refuses new ones.
    pub fn stop(&self) {
        self.stopping.send_replace(true);
    }
}

/// The uids an event concerns.
fn event_uids(event: &Event) -> impl Iterator<Item = u64> + '_ {
    let (one, many): (Option<u64>, &[imstate_presence::Session]) = match event {
        Event::Login { session, .. } | Event::Logout { session } | Event::Expire { session } => {
            (Some(session.uid), &[])
        }
        Event::GatewayDown { sessions, .. } => (None, sessions),
        Event::GatewayUnregister { .. } => (None, &[]),
    };
    one.into_iter()
        .chain(many.iter().map(|session| session.uid))
}

enum Source {
    All(broadcast::Receiver<Published>),
    Filtered {
        receiver: mpsc::Receiver<Published>,
        filtered: Arc<Filtered>,
        uids: HashSet<u64>,
    },
}

/// One subscription. Dropping it unsubscribes.
pub struct Subscriber {
    hub: Arc<WatchHub>,
    source: Source,
    stopping: watch::Receiver<bool>,
}

impl Subscriber {
    /// The next event for this subscriber, or why the subscription ended (after which every
    /// call returns an end again).
    pub async fn recv(&mut self) -> Result<Published, WatchEnd> {
        let limit = self.hub.limits.buffer_events;
        if *self.stopping.borrow() {
            return Err(WatchEnd::Stopping);
        }
        let stopping = &mut self.stopping;
        let stopped = async {
            let _ = stopping.wait_for(|stop| *stop).await;
        };
        match &mut self.source {
            Source::All(receiver) => tokio::select! {
                biased;
                () = stopped => Err(WatchEnd::Stopping),
                received = receiver.recv() => match received {
                    Ok(published) => Ok(published),
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        Err(WatchEnd::Lagged { missed, limit })
                    }
                    Err(broadcast::error::RecvError::Closed) => Err(WatchEnd::Closed),
                },
            },
            Source::Filtered {
                receiver, filtered, ..
            } => {
                let missed = filtered.missed.load(Ordering::Relaxed);
                if missed > 0 {
                    return Err(WatchEnd::Lagged { missed, limit });
                }
                tokio::select! {
                    biased;
                    () = stopped => Err(WatchEnd::Stopping),
                    received = receiver.recv() => received.ok_or(WatchEnd::Closed),
                }
            }
        }
    }

    /// Resolves when the node stops (for waits other than [`Subscriber::recv`]).
    pub async fn stopped(&self) -> WatchEnd {
        let mut stopping = self.stopping.clone();
        let _ = stopping.wait_for(|stop| *stop).await;
        WatchEnd::Stopping
    }

    /// Whether the subscriber wants the events of `uid` (always, without a filter).
    pub fn wants(&self, uid: u64) -> bool {
        match &self.source {
            Source::All(_) => true,
            Source::Filtered { uids, .. } => uids.contains(&uid),
        }
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        if let Source::Filtered { filtered, uids, .. } = &self.source {
            let mut map = self.hub.filtered.write();
            for uid in uids {
                if let Some(list) = map.get_mut(uid) {
                    list.retain(|other| !Arc::ptr_eq(other, filtered));
                    if list.is_empty() {
                        map.remove(uid);
                    }
                }
            }
            self.hub.filtered_open.fetch_sub(1, Ordering::AcqRel);
        }
        self.hub.open.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use imstate_presence::Session;

    use super::*;

    fn login(uid: u64) -> Event {
        Event::Login {
            session: Session {
                uid,
                device: Arc::from("ios"),
                gateway: Arc::from("gw"),
                conn: uid,
                login_ms: 0,
                last_heartbeat_ms: 0,
                ttl_ms: 1_000,
                meta: None,
            },
            replaced: None,
        }
    }

    fn limits(buffer_events: usize) -> WatchLimits {
        WatchLimits {
            buffer_events,
            subscribers_max: 3,
            uids_max: 2,
        }
    }

    #[tokio::test]
    async fn a_filtered_subscriber_is_not_cut_off_by_other_uids_traffic() {
        let hub = WatchHub::new(limits(4));
        let mut mine = hub.subscribe(HashSet::from([7])).unwrap();
        for lsn in 1..=1_000 {
            hub.publish(lsn, &login(1_000 + lsn));
        }
        hub.publish(1_001, &login(7));
        let published = mine.recv().await.unwrap();
        assert_eq!(published.lsn, 1_001);
    }

    #[tokio::test]
    async fn a_slow_subscriber_is_cut_off_counting_only_its_own_events() {
        let hub = WatchHub::new(limits(4));
        let mut mine = hub.subscribe(HashSet::from([7])).unwrap();
        let mut everything = hub.subscribe(HashSet::new()).unwrap();
        for lsn in 1..=10 {
            hub.publish(lsn, &login(7));
            hub.publish(100 + lsn, &login(8));
        }
        assert_eq!(
            mine.recv().await.unwrap_err(),
            WatchEnd::Lagged {
                missed: 6,
                limit: 4
            }
        );
        assert!(matches!(
            everything.recv().await.unwrap_err(),
            WatchEnd::Lagged { missed: 16, .. }
        ));
    }

    #[tokio::test]
    async fn limits_refuse_with_their_names_and_dropping_frees_a_place() {
        let hub = WatchHub::new(limits(4));
        let error = hub.subscribe(HashSet::from([1, 2, 3])).err().unwrap();
        assert!(error.to_string().contains("watch_uids_max is 2"), "{error}");
        let first = hub.subscribe(HashSet::from([1])).unwrap();
        let _second = hub.subscribe(HashSet::new()).unwrap();
        let _third = hub.subscribe(HashSet::from([1, 2])).unwrap();
        let error = hub.subscribe(HashSet::new()).err().unwrap();
        assert!(
            error.to_string().contains("watch_subscribers_max is 3"),
            "{error}"
        );
        drop(first);
        assert_eq!(hub.subscribers(), 2);
        assert_eq!(hub.filtered.read().get(&1).map(Vec::len), Some(1));
        hub.subscribe(HashSet::new()).unwrap();
    }

    #[tokio::test]
    async fn stop_ends_every_subscriber_at_once() {
        let hub = WatchHub::new(limits(4));
        let mut all = hub.subscribe(HashSet::new()).unwrap();
        let mut some = hub.subscribe(HashSet::from([5])).unwrap();
        let waiting = tokio::spawn(async move { all.recv().await });
        tokio::task::yield_now().await;
        hub.stop();
        assert_eq!(waiting.await.unwrap().unwrap_err(), WatchEnd::Stopping);
        assert_eq!(some.recv().await.unwrap_err(), WatchEnd::Stopping);
        assert_eq!(
            hub.subscribe(HashSet::new()).err(),
            Some(WatchRefused::Stopping)
        );
    }
}
