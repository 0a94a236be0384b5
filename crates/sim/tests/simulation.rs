//! The deterministic simulation of cluster mode, many seeds per run, each with at least 10
//! faults (crash + restart, pause past the lease, partition from the coordinator, slow links,
//! early lease end) and every node's clock at its own rate within the skew bound; checked
//! for S1 (clients' history) and S3 (serve log).
//!
//! Knobs: `IMSTATE_SIM_SEEDS` (default 500), `IMSTATE_SIM_FIRST_SEED` (default 1),
//! `IMSTATE_SIM_SECONDS` (simulated seconds per seed, default 40), `IMSTATE_SIM_SEED` (run
//! only this seed, printing its fault log). A failing seed prints the command that replays it.
//!
//! Negative controls: built with `planted-serve-without-lease`, `planted-no-lock-delay`,
//! `planted-raise-without-fence` or `planted-coalesce-unsettled`, the same seeds must report
//! violations.

use imstate_sim::{Report, SimConfig, run};

fn env(name: &str) -> Option<u64> {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
}

/// Runs the configured seeds on every core; returns the reports in seed order.
fn run_seeds() -> Vec<Report> {
    let seconds = env("IMSTATE_SIM_SECONDS").unwrap_or(40);
    run_configs(seeds("IMSTATE_SIM_SEEDS", 500), |seed| {
        let mut config = SimConfig::for_seed(seed);
        config.duration_ms = seconds * 1000;
        config
    })
}

/// The seeds to run: `IMSTATE_SIM_SEED` alone, or `count_knob` (default `default`) seeds
/// from `IMSTATE_SIM_FIRST_SEED`.
fn seeds(count_knob: &str, default: u64) -> Vec<u64> {
    match env("IMSTATE_SIM_SEED") {
        Some(seed) => vec![seed],
        None => {
            let first = env("IMSTATE_SIM_FIRST_SEED").unwrap_or(1);
            (first..first + env(count_knob).unwrap_or(default)).collect()
        }
    }
}

/// Runs `config(seed)` for every seed on every core; returns the reports in seed order.
fn run_configs(seeds: Vec<u64>, config: impl Fn(u64) -> SimConfig + Sync) -> Vec<Report> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let next = std::sync::atomic::AtomicUsize::new(0);
    let reports = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                loop {
                    let index = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(&seed) = seeds.get(index) else { break };
                    let report = run(&config(seed));
                    reports.lock().unwrap().push(report);
                }
            });
        }
    });
    let mut reports = reports.into_inner().unwrap();
    reports.sort_by_key(|report| report.seed);
    reports
}

/// The `--features` flag of the planted bug this build carries, if any.
fn planted() -> &'static str {
    if cfg!(feature = "planted-serve-without-lease") {
        " --features planted-serve-without-lease"
    } else if cfg!(feature = "planted-no-lock-delay") {
        " --features planted-no-lock-delay"
    } else if cfg!(feature = "planted-raise-without-fence") {
        " --features planted-raise-without-fence"
    } else if cfg!(feature = "planted-coalesce-unsettled") {
        " --features planted-coalesce-unsettled"
    } else {
        ""
    }
}

fn replay(seed: u64, features: &str) -> String {
    format!(
        "IMSTATE_SIM_SEED={seed} cargo test -p imstate-sim{features} --test simulation -- \
         --nocapture"
    )
}

fn summary(reports: &[Report]) -> String {
    let ok: usize = reports.iter().map(|r| r.calls_ok).sum();
    let unknown: usize = reports.iter().map(|r| r.calls_unknown).sum();
    let faults: usize = reports.iter().map(|r| r.fault_events).sum();
    let fenced: u64 = reports.iter().map(|r| r.raises_fenced).sum();
    let routes: u64 = reports.iter().map(|r| r.route_writes).sum();
    let slots: usize = reports.iter().map(|r| r.slot_serves).sum();
    let handovers: usize = reports.iter().map(|r| r.slot_handovers_live).sum();
    format!(
        "{} seeds: {ok} calls served, {unknown} unknown, {faults} faults, {fenced} raises \
         refused by their fence, {routes} route tables written, {slots} slot-ticks primary, \
         {handovers} slot handovers from a running node",
        reports.len()
    )
}

#[cfg(not(any(
    feature = "planted-serve-without-lease",
    feature = "planted-no-lock-delay",
    feature = "planted-raise-without-fence",
    feature = "planted-coalesce-unsettled"
)))]
#[test]
fn s1_and_s3_hold_under_every_seeded_fault_schedule() {
    let reports = run_seeds();
    println!("{}", summary(&reports));
    if reports.len() == 1 {
        for fault in &reports[0].faults {
            println!("  {fault}");
        }
    }
    let mut failed = Vec::new();
    for report in &reports {
        assert!(
            report.fault_events >= 10,
            "seed {}: only {} faults happened",
            report.seed,
            report.fault_events
        );
        assert!(
            report.slot_serves > 1000,
            "seed {}: presence slots were taken only {} times",
            report.seed,
            report.slot_serves
        );
        assert!(
            report.calls_ok > 100,
            "seed {}: only {} calls served: the cluster hardly worked",
            report.seed,
            report.calls_ok
        );
        if !report.clean() {
            failed.push(format!(
                "seed {}: {}\n  replay: {}",
                report.seed,
                report
                    .s1
                    .iter()
                    .chain(&report.s3)
                    .take(5)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("\n  "),
                replay(report.seed, planted())
            ));
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

#[cfg(any(
    feature = "planted-serve-without-lease",
    feature = "planted-no-lock-delay",
    feature = "planted-raise-without-fence",
    feature = "planted-coalesce-unsettled"
))]
#[test]
fn the_planted_bug_is_caught() {
    let reports = run_seeds();
    println!("{}", summary(&reports));
    let caught: Vec<&Report> = reports.iter().filter(|report| !report.clean()).collect();
    for report in caught.iter().take(3) {
        println!(
            "seed {}: {}\n  replay: {}",
            report.seed,
            report.s1.iter().chain(&report.s3).next().unwrap(),
            replay(report.seed, planted())
        );
    }
    assert!(
        !caught.is_empty(),
        "no seed of {} caught the planted bug",
        reports.len()
    );
    // The ownership bugs that concern every unit a node serves must show on presence slots
    // too: the slot checks share the lease and lock-delay rules with sections.
    if cfg!(any(
        feature = "planted-serve-without-lease",
        feature = "planted-no-lock-delay"
    )) {
        let on_slots = reports
            .iter()
            .flat_map(|report| &report.s3)
            .filter(|violation| violation.contains("presence slot"))
            .count();
        println!("{on_slots} S3 violations on presence slots");
        assert!(
            on_slots > 0,
            "the slot checks did not catch the planted bug"
        );
    }
}

/// The presence simulation's seeds: odd seeds with `presence.require_replica = true`, even
/// ones without (writes then go on with one copy while a replica is cut off). Knobs:
/// `IMSTATE_SIM_PRESENCE_SEEDS` (default 60), `IMSTATE_SIM_PRESENCE_SECONDS` (default 120),
/// `IMSTATE_SIM_SEED` and `IMSTATE_SIM_FIRST_SEED` as above.
fn run_presence_seeds() -> Vec<Report> {
    let seconds = env("IMSTATE_SIM_PRESENCE_SECONDS").unwrap_or(120);
    run_configs(seeds("IMSTATE_SIM_PRESENCE_SEEDS", 60), |seed| {
        let mut config = SimConfig::presence_for_seed(seed, seed % 2 == 1);
        config.duration_ms = seconds * 1000;
        config
    })
}

fn presence_summary(reports: &[Report]) -> String {
    let sum = |f: fn(&Report) -> usize| reports.iter().map(f).sum::<usize>();
    format!(
        "{} presence seeds: {} writes and {} lookups acknowledged, {} unknown, {} faults, {} \
         replica snapshots, {} replicas cut off after the ack timeout, {} slot handovers from a \
         running node",
        reports.len(),
        sum(|r| r.presence_writes),
        sum(|r| r.presence_lookups),
        sum(|r| r.presence_unknown),
        sum(|r| r.fault_events),
        sum(|r| r.presence_snapshots),
        sum(|r| r.presence_cutoffs),
        sum(|r| r.slot_handovers_live),
    )
}

fn presence_replay(seed: u64, test: &str) -> String {
    let features = if cfg!(feature = "planted-ack-before-replica") {
        " --features planted-ack-before-replica"
    } else if cfg!(feature = "planted-deposed-primary-writes") {
        " --features planted-deposed-primary-writes"
    } else if cfg!(feature = "planted-trust-replica-report") {
        " --features planted-trust-replica-report"
    } else {
        ""
    };
    format!(
        "IMSTATE_SIM_SEED={seed} cargo test -p imstate-sim{features} --test simulation \
         {test} -- --nocapture"
    )
}

#[cfg(not(any(
    feature = "planted-ack-before-replica",
    feature = "planted-deposed-primary-writes",
    feature = "planted-trust-replica-report",
    feature = "planted-serve-without-lease",
    feature = "planted-no-lock-delay",
    feature = "planted-raise-without-fence",
    feature = "planted-coalesce-unsettled"
)))]
#[test]
fn presence_keeps_every_acknowledged_change_when_faults_come_one_at_a_time() {
    let reports = run_presence_seeds();
    println!("{}", presence_summary(&reports));
    if reports.len() == 1 {
        for fault in &reports[0].faults {
            println!("  {fault}");
        }
    }
    let mut failed = Vec::new();
    for report in &reports {
        assert!(
            report.fault_events >= 6,
            "seed {}: only {} faults happened",
            report.seed,
            report.fault_events
        );
        assert!(
            report.presence_writes > 500 && report.presence_lookups > 500,
            "seed {}: only {} writes and {} lookups acknowledged: the cluster hardly worked",
            report.seed,
            report.presence_writes,
            report.presence_lookups
        );
        if !report.clean() {
            failed.push(format!(
                "seed {}: {}\n  replay: {}",
                report.seed,
                report
                    .presence
                    .iter()
                    .chain(&report.s1)
                    .chain(&report.s3)
                    .take(5)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("\n  "),
                presence_replay(report.seed, "presence_keeps")
            ));
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

#[cfg(any(
    feature = "planted-ack-before-replica",
    feature = "planted-deposed-primary-writes",
    feature = "planted-trust-replica-report"
))]
#[test]
fn presence_catches_the_planted_replication_bug() {
    let reports = run_presence_seeds();
    println!("{}", presence_summary(&reports));
    let caught: Vec<&Report> = reports
        .iter()
        .filter(|report| !report.presence.is_empty())
        .collect();
    for report in caught.iter().take(3) {
        println!(
            "seed {}: {}\n  replay: {}",
            report.seed,
            report.presence[0],
            presence_replay(report.seed, "presence_catches")
        );
    }
    assert!(
        !caught.is_empty(),
        "no seed of {} caught the planted bug",
        reports.len()
    );
}
