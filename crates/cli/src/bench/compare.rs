//! `imstate bench --compare`: imstate and Redis alternately, the same case, N rounds.
//!
//! ```text
//!  preload sessions into both (untimed, once) ──► for each case: for each round:
//!      imstate run, Redis run (order flips every round, so drift hits both) ──►
//!  ratio per round = imstate metric / Redis metric ──► median ──► table, JSON, markdown, PNG
//!  --half-load: single-id cases again on both, paced at half of imstate's median peak ──► p99
//! ```

use std::fmt::Write as _;

use anyhow::{Context, bail};
use serde::Serialize;

use super::{BenchArgs, BenchResult, RunConfig, Target, Workload, chart, preload, preload_count};

/// One case: a workload at an in-flight depth.
#[derive(Debug, Clone, Copy)]
struct Case {
    workload: Workload,
    inflight: usize,
}

impl Case {
    fn label(&self, connections: usize) -> String {
        format!("{} {}×{}", self.workload.name(), connections, self.inflight)
    }
}

/// The summary of one case.
#[derive(Debug, Clone, Serialize)]
pub struct CaseSummary {
    pub case: String,
    pub workload: String,
    pub connections: usize,
    pub inflight: usize,
    pub batch: usize,
    /// "ops/s" or "items/s".
    pub metric: String,
    pub imstate_median: f64,
    pub redis_median: f64,
    /// Median over rounds of imstate / Redis.
    pub ratio_median: f64,
    pub ratios: Vec<f64>,
    pub imstate_p99_us_median: f64,
    pub redis_p99_us_median: f64,
    pub errors: u64,
}

/// p99 of a single-id case paced at half of imstate's median peak.
#[derive(Debug, Clone, Serialize)]
pub struct HalfLoad {
    pub case: String,
    pub rate: f64,
    pub imstate: BenchResult,
    pub redis: BenchResult,
}

#[derive(Serialize)]
struct Report<'a> {
    preload_seconds: Vec<(String, f64)>,
    summary: &'a [CaseSummary],
    half_load: &'a [HalfLoad],
    runs: &'a [BenchResult],
}

fn parse_cases(args: &BenchArgs) -> anyhow::Result<Vec<Case>> {
    let Some(text) = &args.modes.cases else {
        let mut cases: Vec<Case> = Workload::ALL
            .into_iter()
            .map(|workload| Case {
                workload,
                inflight: args.inflight,
            })
            .collect();
        if args.inflight != 16 {
            cases.insert(
                1,
                Case {
                    workload: Workload::SeqNext,
                    inflight: 16,
                },
            );
        }
        return Ok(cases);
    };
    text.split(',')
        .filter(|part| !part.trim().is_empty())
        .map(|part| {
            let part = part.trim();
            let (name, inflight) = match part.split_once(':') {
                Some((name, depth)) => {
                    let depth: usize =
                        depth.parse().ok().filter(|&d| d > 0).with_context(|| {
                            format!("case `{part}`: in-flight depth must be a positive integer")
                        })?;
                    (name, depth)
                }
                None => (part, args.inflight),
            };
            let workload = Workload::from_name(name).with_context(|| {
                let names: Vec<&str> = Workload::ALL.iter().map(|w| w.name()).collect();
                format!(
                    "case `{part}`: unknown workload `{name}` (one of {})",
                    names.join(", ")
                )
            })?;
            Ok(Case { workload, inflight })
        })
        .collect()
}

fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    if values.len() % 2 == 1 {
        values[middle]
    } else {
        (values[middle - 1] + values[middle]) / 2.0
    }
}

/// Runs compare mode.
pub async fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let (Some(imstate), Some(redis)) = (&args.modes.imstate, &args.modes.redis) else {
        bail!("--compare needs both --imstate HOST:PORT and --redis HOST:PORT");
    };
    let imstate = Target::with_scheme(imstate, "imstate")?;
    let redis = Target::with_scheme(redis, "redis")?;
    if args.modes.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    let cases = parse_cases(args)?;
    if cases.is_empty() {
        bail!("--cases names no case");
    }
    for case in &cases {
        config(args, &imstate, *case).validate()?;
    }

    // Sessions for the presence reads, into both targets, before anything is timed.
    let mut preload_seconds = Vec::new();
    let count = cases
        .iter()
        .map(|case| preload_count(args, case.workload))
        .max()
        .unwrap_or(0);
    if count > 0 {
        for target in [&imstate, &redis] {
            let setup = config(
                args,
                target,
                Case {
                    workload: Workload::PresenceLogin,
                    inflight: 1,
                },
            );
            let seconds = preload(&setup, count).await?;
            eprintln!(
                "preloaded {count} sessions into {} in {seconds:.1} s",
                target.url()
            );
            preload_seconds.push((target.url(), seconds));
        }
    }

    let mut runs = Vec::new();
    let mut summaries = Vec::new();
    for case in &cases {
        let (mut imstate_runs, mut redis_runs) = (Vec::new(), Vec::new());
        for round in 0..args.modes.rounds {
            let order = if round % 2 == 0 {
                [&imstate, &redis]
            } else {
                [&redis, &imstate]
            };
            for target in order {
                let result = super::run(&config(args, target, *case)).await?;
                match target {
                    Target::Imstate(_)
                    | Target::ImstateGrpc(_)
                    | Target::ImstateCluster(_)
                    | Target::ImstateWireCluster(_) => imstate_runs.push(result),
                    Target::Redis(_) => redis_runs.push(result),
                }
            }
        }
        let summary = summarize(args, *case, &imstate_runs, &redis_runs);
        eprintln!(
            "{}: imstate {:.0} {m}, redis {:.0} {m}, ratio {:.2}x",
            summary.case,
            summary.imstate_median,
            summary.redis_median,
            summary.ratio_median,
            m = summary.metric
        );
        summaries.push(summary);
        runs.extend(imstate_runs);
        runs.extend(redis_runs);
    }

    let mut half_loads = Vec::new();
    if args.modes.half_load {
        for summary in summaries
            .iter()
            .filter(|s| Workload::from_name(&s.workload).is_some_and(Workload::is_single))
        {
            let Some(case) = cases
                .iter()
                .find(|c| c.label(args.connections) == summary.case)
            else {
                continue;
            };
            let rate = (summary.imstate_median / 2.0).max(1.0);
            let mut imstate_config = config(args, &imstate, *case);
            imstate_config.rate = rate;
            let mut redis_config = config(args, &redis, *case);
            redis_config.rate = rate;
            let imstate_result = super::run(&imstate_config).await?;
            let redis_result = super::run(&redis_config).await?;
            eprintln!(
                "{} at {rate:.0}/s: p99 imstate {} us, redis {} us",
                summary.case, imstate_result.p99_us, redis_result.p99_us
            );
            half_loads.push(HalfLoad {
                case: summary.case.clone(),
                rate,
                imstate: imstate_result,
                redis: redis_result,
            });
        }
    }

    super::print_table(&runs);
    println!();
    print!("{}", markdown(&summaries, &half_loads));
    if let Some(path) = &args.json_out {
        super::write_json(
            path,
            &Report {
                preload_seconds,
                summary: &summaries,
                half_load: &half_loads,
                runs: &runs,
            },
        )?;
    }
    if let Some(path) = &args.modes.markdown_out {
        std::fs::write(path, markdown(&summaries, &half_loads))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.modes.chart_out {
        chart::draw(path, &args.modes.chart_font, &summaries)?;
    }
    Ok(())
}

fn config(args: &BenchArgs, target: &Target, case: Case) -> RunConfig {
    let mut config = RunConfig::from_args(args, target.clone(), case.workload);
    config.inflight = case.inflight;
    config
}

fn summarize(
    args: &BenchArgs,
    case: Case,
    imstate_runs: &[BenchResult],
    redis_runs: &[BenchResult],
) -> CaseSummary {
    let metric = case.workload.metric();
    let values =
        |runs: &[BenchResult]| -> Vec<f64> { runs.iter().map(|r| r.metric(metric)).collect() };
    let p99s = |runs: &[BenchResult]| -> Vec<f64> { runs.iter().map(|r| r.p99_us).collect() };
    let mut ratios: Vec<f64> = imstate_runs
        .iter()
        .zip(redis_runs)
        .map(|(i, r)| {
            if r.metric(metric) > 0.0 {
                i.metric(metric) / r.metric(metric)
            } else {
                0.0
            }
        })
        .collect();
    let rounds = ratios.clone();
    CaseSummary {
        case: case.label(args.connections),
        workload: case.workload.name().to_string(),
        connections: args.connections,
        inflight: case.inflight,
        batch: imstate_runs.first().map_or(0, |r| r.batch),
        metric: metric.to_string(),
        imstate_median: median(&mut values(imstate_runs)),
        redis_median: median(&mut values(redis_runs)),
        ratio_median: median(&mut ratios),
        ratios: rounds,
        imstate_p99_us_median: median(&mut p99s(imstate_runs)),
        redis_p99_us_median: median(&mut p99s(redis_runs)),
        errors: imstate_runs
            .iter()
            .chain(redis_runs)
            .map(|r| r.errors)
            .sum(),
    }
}

fn thousands(value: f64) -> String {
    let digits = format!("{:.0}", value);
    let mut out = String::new();
    for (index, ch) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// The markdown tables of a compare run.
fn markdown(summaries: &[CaseSummary], half_loads: &[HalfLoad]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| case (conns × in flight) | batch | metric | imstate | Redis | ratio (median) | \
         ratios per round | p99 imstate / Redis | errors |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|");
    for s in summaries {
        let rounds: Vec<String> = s.ratios.iter().map(|r| format!("{r:.2}")).collect();
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | **{:.2}x** | {} | {:.2} ms / {:.2} ms | {} |",
            s.case,
            s.batch,
            s.metric,
            thousands(s.imstate_median),
            thousands(s.redis_median),
            s.ratio_median,
            rounds.join(", "),
            s.imstate_p99_us_median / 1_000.0,
            s.redis_p99_us_median / 1_000.0,
            s.errors
        );
    }
    if !half_loads.is_empty() {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "| case at half of imstate's peak | rate (req/s) | p50 imstate / Redis | \
             p99 imstate / Redis | p99.9 imstate / Redis |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|");
        for h in half_loads {
            let _ = writeln!(
                out,
                "| {} | {} | {:.2} / {:.2} ms | **{:.2}** / {:.2} ms | {:.2} / {:.2} ms |",
                h.case,
                thousands(h.rate),
                h.imstate.p50_us / 1_000.0,
                h.redis.p50_us / 1_000.0,
                h.imstate.p99_us / 1_000.0,
                h.redis.p99_us / 1_000.0,
                h.imstate.p999_us / 1_000.0,
                h.redis.p999_us / 1_000.0,
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_even_and_odd_counts() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&mut []), 0.0);
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(1_234_567.4), "1,234,567");
        assert_eq!(thousands(999.0), "999");
    }
}
