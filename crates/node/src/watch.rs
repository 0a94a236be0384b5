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
//! Resume (a client that reconnects with the position it reached): the hub keeps the last
//! `history_events` events in a ring, and the journal appends and publishes every event under
//! the hub's history lock ([`WatchHub::publish_with`]), so events are published in LSN order
//! and "every event after LSN r" is a suffix of the ring. A subscription from position r
//! takes, under that same lock, the ring's events after r as its backlog and registers for
//! the live ones: it sees every event after r exactly once, or is refused with
//! [`WatchRefused::Gone`] when the ring no longer reaches back to r (then the client reads
//! the state again). A position is per log: a different node, or this node's data directory
//! restored from a backup, cannot resume it (checked by the caller, which knows the log id).
//!
//! Invariants and limits (B1):
//! - `publish` never blocks: the ring overwrites, a full filtered queue marks its subscriber
//!   cut off (`missed` counts what it lost from then on). It is called under a shard lock.
//! - At most `subscribers_max` subscribers, each filter at most `uids_max` uids; more is a
//!   clear RESOURCE_EXHAUSTED naming the limit.
//! - [`WatchHub::stop`] ends every subscriber with [`WatchEnd::Stopping`] at once, so a node
//!   that stops never waits for a watch client to go away.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use imstate_presence::Event;
use parking_lot::{Mutex, RwLock};
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
    /// Recent events kept so that a subscriber can resume from a position (0: no resume).
    pub history_events: usize,
}

impl Default for WatchLimits {
    fn default() -> Self {
        Self {
            buffer_events: 8_192,
            subscribers_max: 1_024,
            uids_max: 10_000,
            history_events: 16_384,
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
    /// The history no longer holds every event after the position asked for.
    #[error(
        "cannot resume after LSN {at}: events are kept after LSN {floor} only \
         (presence.watch_history_events = {limit}); look the uids up and watch again without \
         a position"
    )]
    Gone {
        /// The position asked for.
        at: u64,
        /// Every event after this LSN is held.
        floor: u64,
        /// The history's size.
        limit: usize,
    },
    /// The position is past every event this log published: it comes from another log
    /// (for example a data directory restored from a backup).
    #[error(
        "cannot resume after LSN {at}: this node's presence log has published events up to \
         LSN {last} only; the position comes from another log; watch again without a position"
    )]
    Ahead {
        /// The position asked for.
        at: u64,
        /// The newest event's LSN here.
        last: u64,
    },
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

/// The recent events, for resumes.
#[derive(Default)]
struct History {
    events: VecDeque<Published>,
    /// Every event published after this LSN is in `events`.
    floor: u64,
}

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
    /// Held while an event is appended to the log and published (LSN order), and while a
    /// subscription takes its backlog.
    history: Mutex<History>,
    /// The newest published event's LSN (or the floor the history started from).
    published: AtomicU64,
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
            history: Mutex::new(History::default()),
            published: AtomicU64::new(0),
        })
    }

    /// Starts the history at `lsn`, the last LSN of the recovered log: events before it
    /// (earlier runs of the node) cannot be resumed. Called once, before anything is published.
    pub fn start_history(&self, lsn: u64) {
        let mut history = self.history.lock();
        history.events.clear();
        history.floor = lsn;
        self.published.store(lsn, Ordering::Release);
    }

    /// The newest published event's LSN: a subscriber that has received every event meant
    /// for it up to here may resume from it.
    pub fn position(&self) -> u64 {
        self.published.load(Ordering::Acquire)
    }

    /// Appends `event` with `append` (which returns its LSN) and publishes it, both under the
    /// history lock so that events are published in LSN order. `append`'s error is returned
    /// and nothing is published.
    pub fn publish_with<E>(
        &self,
        event: &Event,
        append: impl FnOnce() -> Result<u64, E>,
    ) -> Result<u64, E> {
        if self.limits.history_events == 0 {
            let lsn = append()?;
            self.publish(lsn, event);
            return Ok(lsn);
        }
        let mut history = self.history.lock();
        let lsn = append()?;
        let published = Published {
            lsn,
            event: Arc::new(event.clone()),
        };
        if history.events.len() >= self.limits.history_events
            && let Some(oldest) = history.events.pop_front()
        {
            history.floor = oldest.lsn;
        }
        history.events.push_back(published.clone());
        self.offer(&published);
        self.published.store(lsn, Ordering::Release);
        drop(history);
        Ok(lsn)
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
        self.offer(&Published {
            lsn,
            event: Arc::new(event.clone()),
        });
    }

    /// Hands a published event to the live subscribers it concerns.
    fn offer(&self, published: &Published) {
        let to_all = self.all.receiver_count() > 0;
        let to_filtered = self.filtered_open.load(Ordering::Acquire) > 0;
        if to_filtered {
            let map = self.filtered.read();
            let mut offered: Vec<*const Filtered> = Vec::new();
            for uid in event_uids(&published.event) {
                for subscriber in map.get(&uid).into_iter().flatten() {
                    let key = Arc::as_ptr(subscriber);
                    // A gateway drop can name several uids of one subscriber: send it once.
                    if !offered.contains(&key) {
                        offered.push(key);
                        subscriber.offer(published);
                    }
                }
            }
        }
        if to_all {
            let _ = self.all.send(published.clone());
        }
    }

    /// Starts a subscription to every event (`uids` empty) or to the events of `uids`.
    pub fn subscribe(self: &Arc<Self>, uids: HashSet<u64>) -> Result<Subscriber, WatchRefused> {
        self.subscribe_from(uids, None)
    }

    /// Starts a subscription like [`Self::subscribe`] that first delivers every event after
    /// LSN `from` (`None`: only events from now on), or refuses with [`WatchRefused::Gone`] /
    /// [`WatchRefused::Ahead`] when the history cannot.
    pub fn subscribe_from(
        self: &Arc<Self>,
        uids: HashSet<u64>,
        from: Option<u64>,
    ) -> Result<Subscriber, WatchRefused> {
        if *self.stopping.borrow() {
            return Err(WatchRefused::Stopping);
        }
        if uids.len() > self.limits.uids_max {
            return Err(WatchRefused::Uids {
                len: uids.len(),
                max: self.limits.uids_max,
            });
        }
        // Held until the subscriber is registered: no event is published meanwhile, so the
        // backlog and the live events join without a gap or a repeat.
        let history = self.history.lock();
        let position = self.published.load(Ordering::Acquire);
        let mut backlog = VecDeque::new();
        if let Some(at) = from {
            if at > position {
                return Err(WatchRefused::Ahead { at, last: position });
            }
            // Without a history, only a subscriber already at the newest event may resume.
            let floor = if self.limits.history_events == 0 {
                position
            } else {
                history.floor
            };
            if at < floor {
                return Err(WatchRefused::Gone {
                    at,
                    floor,
                    limit: self.limits.history_events,
                });
            }
            #[cfg(not(feature = "planted-watch-resume-without-backlog"))]
            backlog.extend(
                history
                    .events
                    .iter()
                    .filter(|published| {
                        published.lsn > at
                            && (uids.is_empty()
                                || event_uids(&published.event).any(|uid| uids.contains(&uid)))
                    })
                    .cloned(),
            );
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
        drop(history);
        Ok(Subscriber {
            hub: Arc::clone(self),
            source,
            stopping: self.stopping.subscribe(),
            backlog,
            start: from.unwrap_or(position),
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
    /// Events of the history after the position it resumed from, delivered first.
    backlog: VecDeque<Published>,
    /// The position it started from: the one it resumed from, or the hub's at the start.
    start: u64,
}

impl Subscriber {
    /// The next event for this subscriber, or why the subscription ended (after which every
    /// call returns an end again).
    pub async fn recv(&mut self) -> Result<Published, WatchEnd> {
        let limit = self.hub.limits.buffer_events;
        if *self.stopping.borrow() {
            return Err(WatchEnd::Stopping);
        }
        if let Some(published) = self.backlog.pop_front() {
            return Ok(published);
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

    /// The position this subscription started from (see [`WatchHub::subscribe_from`]).
    pub fn start(&self) -> u64 {
        self.start
    }

    /// A position this subscriber may resume from later, if it has received every event
    /// meant for it so far: the hub's newest LSN, read before finding its queue empty (an
    /// event is queued before the newest LSN moves past it). `None` while events wait or
    /// after it was cut off.
    pub fn idle_position(&self) -> Option<u64> {
        let position = self.hub.position();
        if !self.backlog.is_empty() {
            return None;
        }
        let idle = match &self.source {
            Source::All(receiver) => receiver.is_empty(),
            Source::Filtered {
                receiver, filtered, ..
            } => receiver.is_empty() && filtered.missed.load(Ordering::Acquire) == 0,
        };
        idle.then_some(position)
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

    use std::time::Duration;

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
            history_events: 8,
        }
    }

    /// Publishes `login(uid)` with the next LSN of `next` (as the journal does: the append
    /// inside the hub's lock).
    fn publish_next(hub: &WatchHub, next: &AtomicU64, uid: u64) -> u64 {
        hub.publish_with(&login(uid), || {
            Ok::<_, ()>(next.fetch_add(1, Ordering::Relaxed) + 1)
        })
        .unwrap()
    }

    #[cfg(not(feature = "planted-watch-resume-without-backlog"))]
    #[tokio::test]
    async fn a_resume_delivers_every_event_after_the_position_once_then_live_ones() {
        let hub = WatchHub::new(limits(16));
        hub.start_history(100);
        let next = AtomicU64::new(100);
        for uid in [7, 8, 7, 7, 8] {
            publish_next(&hub, &next, uid);
        }
        assert_eq!(hub.position(), 105);
        let mut mine = hub.subscribe_from(HashSet::from([7]), Some(101)).unwrap();
        let mut all = hub.subscribe_from(HashSet::new(), Some(103)).unwrap();
        assert_eq!((mine.start(), all.start()), (101, 103));
        publish_next(&hub, &next, 7);
        let mut seen = Vec::new();
        for _ in 0..3 {
            seen.push(mine.recv().await.unwrap().lsn);
        }
        assert_eq!(seen, [103, 104, 106], "uid 7 after 101, then live");
        let mut seen = Vec::new();
        for _ in 0..3 {
            seen.push(all.recv().await.unwrap().lsn);
        }
        assert_eq!(seen, [104, 105, 106]);
        assert_eq!(mine.idle_position(), Some(106));
    }

    #[test]
    fn a_position_the_history_cannot_resume_is_refused_naming_why() {
        let hub = WatchHub::new(limits(16));
        hub.start_history(10);
        let next = AtomicU64::new(10);
        for _ in 0..12 {
            publish_next(&hub, &next, 1);
        }
        // 12 events, 8 kept: every event after LSN 14 is held.
        let gone = hub.subscribe_from(HashSet::new(), Some(13)).err().unwrap();
        assert_eq!(
            gone,
            WatchRefused::Gone {
                at: 13,
                floor: 14,
                limit: 8
            }
        );
        assert!(
            gone.to_string().contains("watch_history_events = 8"),
            "{gone}"
        );
        assert!(hub.subscribe_from(HashSet::new(), Some(14)).is_ok());
        let ahead = hub.subscribe_from(HashSet::new(), Some(23)).err().unwrap();
        assert_eq!(ahead, WatchRefused::Ahead { at: 23, last: 22 });
        // Before this run of the node: the history starts at the recovered log's end.
        let restarted = WatchHub::new(limits(16));
        restarted.start_history(22);
        assert!(matches!(
            restarted.subscribe_from(HashSet::new(), Some(20)),
            Err(WatchRefused::Gone { floor: 22, .. })
        ));
        assert!(restarted.subscribe_from(HashSet::new(), Some(22)).is_ok());
    }

    /// Writers publish from four threads while subscribers resume from positions taken
    /// mid-stream: each sees exactly the events after its position, in LSN order (the
    /// backlog and the live events join without a gap or a repeat).
    fn concurrent_resumes_see_each_later_event_exactly_once() -> bool {
        const WRITERS: u64 = 4;
        const EACH: u64 = 2_000;
        let hub = WatchHub::new(WatchLimits {
            buffer_events: 100_000,
            subscribers_max: 64,
            uids_max: 10,
            history_events: 100_000,
        });
        hub.start_history(0);
        let next = Arc::new(AtomicU64::new(0));
        let writers: Vec<_> = (0..WRITERS)
            .map(|writer| {
                let (hub, next) = (Arc::clone(&hub), Arc::clone(&next));
                std::thread::spawn(move || {
                    for _ in 0..EACH {
                        publish_next(&hub, &next, writer);
                    }
                })
            })
            .collect();
        let mut subscribers = Vec::new();
        let started = std::time::Instant::now();
        while hub.position() < 10 {
            assert!(started.elapsed() < Duration::from_secs(10), "no writer ran");
            std::thread::yield_now();
        }
        while subscribers.len() < 20 {
            // A few events back: each resume needs the history's backlog.
            let at = hub.position() - 5;
            subscribers.push((at, hub.subscribe_from(HashSet::new(), Some(at)).unwrap()));
            std::thread::yield_now();
        }
        for writer in writers {
            writer.join().unwrap();
        }
        let total = WRITERS * EACH;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let mut exact = true;
        for (at, mut subscriber) in subscribers {
            let seen: Vec<u64> = runtime.block_on(async {
                let mut seen = Vec::new();
                while seen.last().copied().unwrap_or(at) < total {
                    let next = tokio::time::timeout(Duration::from_secs(5), subscriber.recv());
                    match next.await {
                        Ok(published) => seen.push(published.unwrap().lsn),
                        Err(_) => break,
                    }
                }
                seen
            });
            let expected: Vec<u64> = (at + 1..=total).collect();
            let first_wrong = seen.iter().zip(&expected).position(|(a, b)| a != b);
            if seen != expected {
                eprintln!(
                    "resumed after {at}: {} events seen, {} expected, first difference at \
                     index {first_wrong:?}",
                    seen.len(),
                    expected.len()
                );
                exact = false;
            }
        }
        exact
    }

    #[cfg(not(feature = "planted-watch-resume-without-backlog"))]
    #[test]
    fn resumes_under_concurrent_publishing_see_each_later_event_exactly_once() {
        assert!(concurrent_resumes_see_each_later_event_exactly_once());
    }

    /// Negative control: a resume that skips the history's backlog loses the events between
    /// the position and the subscription, and the check above sees it.
    #[cfg(feature = "planted-watch-resume-without-backlog")]
    #[test]
    fn planted_watch_resume_without_backlog_is_caught() {
        assert!(
            !concurrent_resumes_see_each_later_event_exactly_once(),
            "the planted bug must make some resumed subscriber miss events"
        );
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
