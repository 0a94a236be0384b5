//! The sequence engine of cluster mode against the simulated `MaxSeqStore`
//! (`imstate_coord::sim::SimMaxSeqStore`): seeded runs of concurrent clients while sections
//! move away and back, another owner serves and raises meanwhile, the news of a move reaches
//! the engine late, and loads and persists are delayed, reordered, lost or answered stale.
//! Every value served (by the engine and by the other owner) goes into one history, checked
//! for S1 by the same checker as every other test.
//!
//! This drives the node's own code paths (`SeqEngine`: load races, tenure checks, only the
//! raises sent reported durable), which the protocol simulation (`crates/sim`) does not.
//! A failing seed prints the command that replays it. Knobs: `IMSTATE_ENGINE_SEEDS` (default
//! 1000, about a second), `IMSTATE_ENGINE_SEED` (one seed; `IMSTATE_ENGINE_TRACE=1` prints the
//! moves). Negative controls: `--features planted-unload-current-tenure` (a late "section
//! lost" drops the state of the tenure that followed) and `planted-load-overwrites-tenure`
//! (an older load overwrites what the same tenure served) must report violations.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use imstate_check::seq::{Outcome, SeqCall, check};
use imstate_coord::maxseq::{Ceiling, MaxSeqStore, PersistOutcome, SectionRaise};
use imstate_coord::sim::SimMaxSeqStore;
use imstate_node::NodeError;
use imstate_node::seqengine::{Backend, SeqEngine};
use imstate_node::seqstore::SeqStoreOptions;
use imstate_seq::{Allocator, AllocatorOptions, NamespaceDef};
use parking_lot::Mutex;

const NS: &str = "t";
const IDS: u64 = 40;
const SECTION: u64 = 10;
const STEP: u64 = 4;

/// A tiny seeded generator (splitmix64): the run depends on the seed alone.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The simulated store behind delays and lost answers.
struct SimBackend {
    store: Arc<SimMaxSeqStore>,
    rng: Mutex<Rng>,
}

impl SimBackend {
    fn delay(&self) -> Duration {
        Duration::from_millis(self.rng.lock().below(20))
    }

    fn chance(&self, percent: u64) -> bool {
        self.rng.lock().below(100) < percent
    }
}

impl MaxSeqStore for SimBackend {
    async fn load(&self, namespace: &str, section: u64) -> Result<Ceiling, String> {
        // Read now and answer late, or wait and read: either way the answer may be older than
        // what a concurrent load got.
        if self.chance(50) {
            let ceiling = self.store.load_now(namespace, section);
            tokio::time::sleep(self.delay()).await;
            Ok(ceiling)
        } else {
            tokio::time::sleep(self.delay()).await;
            Ok(self.store.load_now(namespace, section))
        }
    }

    async fn persist(&self, raises: Vec<SectionRaise>) -> PersistOutcome {
        tokio::time::sleep(self.delay()).await;
        let lose = self.chance(10);
        let outcome = self.store.persist_now(&raises, lose);
        tokio::time::sleep(self.delay()).await;
        outcome
    }
}

impl Backend for SimBackend {
    const PERMANENT: bool = false;

    fn tenure(&self, namespace: &str, section: u64) -> Result<u64, NodeError> {
        self.store
            .owned(namespace, section)
            .ok_or_else(|| NodeError::Unavailable(format!("section {section} is elsewhere")))
    }

    fn fatal(&self) -> Option<String> {
        None
    }
}

/// One run: returns the history and the number of moves.
fn run(seed: u64) -> (Vec<SeqCall>, u64) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        let store = Arc::new(SimMaxSeqStore::new());
        let mut allocator = Allocator::new(AllocatorOptions {
            batch_ids_max: 16,
            sections_max: 64,
        });
        allocator
            .add_namespace(NamespaceDef {
                name: NS.into(),
                id_lo: 0,
                id_hi: IDS,
                section_size: SECTION,
                step: STEP,
                keys: imstate_seq::KeyKind::Numeric,
            })
            .unwrap();
        let engine = SeqEngine::new(
            SimBackend {
                store: Arc::clone(&store),
                rng: Mutex::new(Rng(seed ^ 0x5EED)),
            },
            allocator,
            SeqStoreOptions {
                raise_wait_timeout: Duration::from_secs(1),
                ..SeqStoreOptions::default()
            },
        );
        // Real-time order in a single-threaded run is the order of this counter.
        let ticks = Rc::new(Cell::new(0u64));
        let tick = {
            let ticks = Rc::clone(&ticks);
            move || {
                ticks.set(ticks.get() + 1);
                ticks.get()
            }
        };
        let history = Rc::new(Mutex::new(Vec::<SeqCall>::new()));
        let mut tasks = Vec::new();
        for client in 0..3u64 {
            let (engine, history, tick) = (Arc::clone(&engine), Rc::clone(&history), tick.clone());
            tasks.push(tokio::task::spawn_local(async move {
                let mut rng = Rng(seed.wrapping_mul(31).wrapping_add(client));
                for _ in 0..150 {
                    let count = 1 + rng.below(3) as usize;
                    let ids: Vec<u64> = (0..count).map(|_| rng.below(IDS)).collect();
                    let start_ns = tick();
                    let result = engine.next_batch(NS, &ids).await;
                    let end_ns = tick();
                    history.lock().push(SeqCall {
                        ids,
                        start_ns,
                        end_ns,
                        outcome: match result {
                            Ok(values) => Outcome::Ok(values),
                            Err(_) => Outcome::Unknown,
                        },
                    });
                    tokio::time::sleep(Duration::from_millis(rng.below(5))).await;
                }
            }));
        }
        // The nemesis: moves a section away (the engine hears of it late, or not at all),
        // lets another owner raise and serve, and moves it back under a new tenure.
        let nemesis = {
            let (engine, store, history, tick) = (
                Arc::clone(&engine),
                Arc::clone(&store),
                Rc::clone(&history),
                tick.clone(),
            );
            tokio::task::spawn_local(async move {
                let mut rng = Rng(seed.wrapping_mul(7919));
                let mut moves = 0;
                for _ in 0..12 {
                    tokio::time::sleep(Duration::from_millis(10 + rng.below(40))).await;
                    let section = rng.below(IDS / SECTION);
                    store.move_to(NS, section, false);
                    if std::env::var("IMSTATE_ENGINE_TRACE").is_ok() {
                        eprintln!("tick {}: section {section} moved away", tick());
                    }
                    moves += 1;
                    let engine_hears = rng.below(3);
                    if engine_hears > 0 {
                        let (engine, delay) = (Arc::clone(&engine), rng.below(30));
                        tokio::task::spawn_local(async move {
                            tokio::time::sleep(Duration::from_millis(delay)).await;
                            engine.unload(Some((NS.into(), section, section + 1)));
                        });
                    }
                    // The other owner starts every id of the section at the durable ceiling,
                    // raises it first, then serves below the new one.
                    for _ in 0..1 + rng.below(2) {
                        let Some((old, new)) = store.raise_by_other(NS, section, STEP) else {
                            break;
                        };
                        let mut served = std::collections::HashMap::new();
                        for _ in 0..rng.below(6) {
                            let id = section * SECTION + rng.below(SECTION);
                            let current = served.entry(id).or_insert(old);
                            if *current >= new {
                                continue;
                            }
                            *current += 1;
                            let start_ns = tick();
                            let end_ns = tick();
                            history.lock().push(SeqCall {
                                ids: vec![id],
                                start_ns,
                                end_ns,
                                outcome: Outcome::Ok(vec![*current]),
                            });
                        }
                        tokio::time::sleep(Duration::from_millis(rng.below(20))).await;
                    }
                    store.move_to(NS, section, true);
                    if std::env::var("IMSTATE_ENGINE_TRACE").is_ok() {
                        eprintln!("tick {}: section {section} moved back", tick());
                    }
                }
                moves
            })
        };
        for task in tasks {
            task.await.unwrap();
        }
        let moves = nemesis.await.unwrap();
        let history = std::mem::take(&mut *history.lock());
        (history, moves)
    })
}

#[test]
fn engine_keeps_s1_through_moves_races_and_lost_answers() {
    let seeds: Vec<u64> = match std::env::var("IMSTATE_ENGINE_SEED") {
        Ok(seed) => vec![seed.parse().expect("IMSTATE_ENGINE_SEED is a number")],
        Err(_) => {
            let count = std::env::var("IMSTATE_ENGINE_SEEDS")
                .ok()
                .and_then(|count| count.parse().ok())
                .unwrap_or(1000);
            (0..count).collect()
        }
    };
    let (mut calls, mut served, mut moves) = (0usize, 0usize, 0u64);
    let mut failed = Vec::new();
    for &seed in &seeds {
        let (history, seed_moves) = run(seed);
        calls += history.len();
        served += history
            .iter()
            .filter(|call| matches!(call.outcome, Outcome::Ok(_)))
            .count();
        moves += seed_moves;
        let violations = check(&history);
        if !violations.is_empty() {
            eprintln!(
                "seed {seed}: {} S1 violations, first {:?}\n  replay: IMSTATE_ENGINE_SEED={seed} \
                 cargo test -p imstate-node{} --test engine_sim -- --nocapture",
                violations.len(),
                violations[0],
                planted()
            );
            if seeds.len() == 1
                && let imstate_check::seq::Violation::Duplicate { id, .. } = &violations[0]
            {
                for call in history.iter().filter(|call| call.ids.contains(id)) {
                    eprintln!("  {call:?}");
                }
            }
            failed.push(seed);
        }
    }
    eprintln!(
        "{} seeds: {calls} calls ({served} served), {moves} moves, {} seeds with violations",
        seeds.len(),
        failed.len()
    );
    if !planted().is_empty() {
        assert!(
            !failed.is_empty(),
            "the planted bug ({}) went unnoticed over {} seeds",
            planted(),
            seeds.len()
        );
        return;
    }
    assert!(
        failed.is_empty(),
        "S1 violated for {} seeds, first {:?}",
        failed.len(),
        &failed[..failed.len().min(20)]
    );
    // The run must exercise what it claims to: most calls are served.
    assert!(served * 2 > calls, "only {served} of {calls} calls served");
}

/// The `--features` flag of the planted bug this build carries, if any.
fn planted() -> &'static str {
    if cfg!(feature = "planted-unload-current-tenure") {
        " --features planted-unload-current-tenure"
    } else if cfg!(feature = "planted-load-overwrites-tenure") {
        " --features planted-load-overwrites-tenure"
    } else {
        ""
    }
}
