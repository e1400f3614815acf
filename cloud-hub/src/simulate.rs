//! `cloud-hub simulate` and `cloud-hub forecast-eval`: policies and forecasters side by side.
//!
//! The scenarios are the synthetic workloads of `models::sim::workloads` plus the shared
//! demand series replayed with time compression. Each (policy, workload, seed) is one
//! deterministic simulator run; the runs are spread over the machine's cores and summarised as
//! mean ± 95 % confidence interval over seeds (Student's t). Q-learning is trained on the first
//! 70 % of a workload (its own seeds; the best of [`Q_RESTARTS`] learners, see [`train_q`]),
//! frozen, and then run like the others; a separate table evaluates it and the threshold
//! policy on the held-out last 30 % only.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use models::forecast::{
    self, Bucketed, Direct, Forecaster, Holt, HoltWinters, Naive, OnlineLinear, SeasonalNaive, Ses,
};
use models::policy::{
    DEFAULT_DRAIN_SECS, DEFAULT_HOLD_SECS, DEFAULT_SMOOTHING, Hpa, Kpa, Policy, Predictive,
    QLearning, Threshold,
};
use models::sim::{Outcome, SimConfig, simulate, workloads};

/// A workload to run policies on.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// Name for tables and file names.
    pub name: String,
    /// Mean request rate per tick.
    pub rates: Vec<f64>,
    /// Its seasonal period in ticks, where it has one.
    pub period: Option<usize>,
    /// Ticks one recorded value of the source series lasts (1 for the synthetic workloads).
    pub bucket: usize,
}

/// Seconds of simulated time one row of a shared hourly series lasts.
pub const SECS_PER_ROW: usize = 10;
/// Rows (hours) of a shared series replayed: the last 14 days.
pub const ROWS: usize = 14 * 24;
const LEN: usize = 3600;

/// The six synthetic workloads.
pub fn synthetic() -> Vec<Scenario> {
    let s = |name: &str, rates, period| Scenario {
        name: name.into(),
        rates,
        period,
        bucket: 1,
    };
    vec![
        s("constant", workloads::constant(LEN, 120.0), None),
        s("step-x5", workloads::step(LEN, 60.0), None),
        s("ramp", workloads::ramp(LEN, 20.0, 400.0), None),
        s(
            "diurnal",
            workloads::diurnal(LEN, 200.0, 160.0, 900),
            Some(900),
        ),
        s(
            "flash-spike",
            workloads::flash_spike(LEN, 60.0, 500.0, 90),
            None,
        ),
        s("on-off", workloads::on_off(LEN, 150.0, 300, 300), Some(600)),
    ]
}

/// How a `ts,value` CSV is replayed.
#[derive(Debug, Clone, PartialEq)]
pub struct Replay {
    /// Simulated seconds one row (one step of the series) lasts.
    pub secs_per_row: usize,
    /// Only the last this many rows are replayed (all of them when fewer).
    pub rows: usize,
    /// The largest replayed value becomes this many requests per second.
    pub peak: f64,
    /// The series' season in rows (24 for hourly data with a daily cycle), if it has one.
    pub season_rows: Option<usize>,
}

impl Default for Replay {
    /// The shared series: the last 14 days, an hour in [`SECS_PER_ROW`] s, a daily season.
    fn default() -> Self {
        Replay {
            secs_per_row: SECS_PER_ROW,
            rows: ROWS,
            peak: 400.0,
            season_rows: Some(24),
        }
    }
}

/// A scenario from the `ts,value` CSV at `path`, named `name`.
pub fn from_csv(path: &Path, name: &str, replay: &Replay) -> anyhow::Result<Scenario> {
    let values = read_series(path)?;
    anyhow::ensure!(!values.is_empty(), "{path:?} holds no values");
    anyhow::ensure!(replay.secs_per_row >= 1, "a row must last at least 1 s");
    let tail = &values[values.len().saturating_sub(replay.rows)..];
    Ok(Scenario {
        name: name.into(),
        rates: workloads::replay(tail, replay.secs_per_row, replay.peak),
        period: replay
            .season_rows
            .filter(|m| *m > 1)
            .map(|m| m * replay.secs_per_row),
        bucket: replay.secs_per_row,
    })
}

/// The shared hourly series in `dir`, replayed as [`Replay::default`] says.
pub fn shared(dir: &Path) -> anyhow::Result<Vec<Scenario>> {
    ["bikesharing", "traffic_volume"]
        .into_iter()
        .map(|name| {
            from_csv(
                &dir.join(format!("{name}_hourly.csv")),
                name,
                &Replay::default(),
            )
        })
        .collect()
}

/// The name a series read from `path` goes by in tables and plot files: its file stem.
pub fn series_name(path: &Path) -> String {
    path.file_stem()
        .map_or_else(|| "csv".into(), |s| s.to_string_lossy().into_owned())
}

/// Reads a `ts,value` series.
pub fn read_series(path: &Path) -> anyhow::Result<Vec<f64>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path:?}"))?;
    workloads::parse_csv(&text).map_err(|e| anyhow::anyhow!("{path:?}: {e}"))
}

/// The policies compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyKind {
    /// Threshold with hysteresis and cooldown.
    Threshold,
    /// Kubernetes HPA.
    Hpa,
    /// Knative KPA.
    Kpa,
    /// KPA raised to the forecast demand at the warm-up horizon.
    Predictive,
    /// Tabular Q-learning, trained on the first 70 %.
    QLearning,
    /// The predictive policy given the workload's own mean rate as its forecast: not a policy
    /// anyone can run (it reads the future), but the bound on what a forecast can buy.
    Clairvoyant,
}

impl PolicyKind {
    /// Every policy.
    pub const ALL: [PolicyKind; 6] = [
        PolicyKind::Hpa,
        PolicyKind::Kpa,
        PolicyKind::Threshold,
        PolicyKind::QLearning,
        PolicyKind::Predictive,
        PolicyKind::Clairvoyant,
    ];

    /// Its name in tables.
    pub fn label(self) -> &'static str {
        match self {
            PolicyKind::Threshold => "threshold",
            PolicyKind::Hpa => "HPA",
            PolicyKind::Kpa => "KPA",
            PolicyKind::Predictive => "predictive",
            PolicyKind::QLearning => "Q-learning",
            PolicyKind::Clairvoyant => "clairvoyant",
        }
    }

    /// Parses a name as given on the command line.
    pub fn parse(name: &str) -> Option<PolicyKind> {
        PolicyKind::ALL
            .into_iter()
            .find(|k| k.label().eq_ignore_ascii_case(name))
    }
}

/// The forecaster the predictive policy uses on a scenario, to see `horizon` ticks ahead.
///
/// A replayed series is forecast per recorded value (one hour of the source, [`SECS_PER_ROW`]
/// ticks), since bucket means take the arrival noise of the single ticks out: the online
/// linear regression on the last two hours and on the same hour a day before the target, one
/// model per hour ahead. It is `forecast-eval`'s regression without the lag of a week, which
/// a 14-day replay cannot fill for its first week. Elsewhere, where the season is known:
/// Holt-Winters on the means of [`SECS_PER_ROW`] ticks (with `forecast-eval`'s smoothing
/// constants), because a seasonal slot learnt per tick sees one Poisson draw a cycle and
/// the policy then sizes for that noise; per tick if the season is no multiple of it.
/// Otherwise Holt (level and trend) per tick.
pub fn forecaster_for(scenario: &Scenario, horizon: usize) -> Box<dyn Forecaster + Send> {
    match scenario.period {
        Some(m) if scenario.bucket > 1 && m % scenario.bucket == 0 => {
            let width = scenario.bucket;
            let day = m / width;
            // The policy reads the path up to half its smoothing window past the horizon,
            // starting inside the current bucket.
            let reach = width - 1 + horizon + DEFAULT_SMOOTHING / 2;
            let direct = Direct::new(reach.div_ceil(width), move |h| {
                Box::new(OnlineLinear::new(&[1, 2, day + 1 - h.min(day)], h, 0.01))
            });
            Box::new(Bucketed::new(width, direct))
        }
        Some(m) if m % SECS_PER_ROW == 0 && m > SECS_PER_ROW => Box::new(Bucketed::new(
            SECS_PER_ROW,
            HoltWinters::new(0.3, 0.01, 0.3, m / SECS_PER_ROW),
        )),
        Some(m) => Box::new(HoltWinters::new(0.05, 0.001, 0.3, m)),
        None => Box::new(Holt::new(0.1, 0.01)),
    }
}

/// A forecast that is the scenario's mean rate itself: what the arrivals will average `h`
/// ticks on. The arrivals are Poisson draws around it, so no forecaster does better on
/// average; the predictive policy run on it bounds what forecasting can buy.
struct Clairvoyant {
    rates: std::sync::Arc<[f64]>,
    now: usize,
}

impl Forecaster for Clairvoyant {
    fn name(&self) -> String {
        "the true mean rate".into()
    }
    fn observe(&mut self, t: f64, _y: f64) {
        self.now = t.max(0.0) as usize;
    }
    fn forecast(&self, h: usize) -> f64 {
        // Past the end the workload stops; its last rate stands in.
        let last = self.rates.last().copied().unwrap_or(0.0);
        self.rates.get(self.now + h).copied().unwrap_or(last)
    }
}

fn threshold() -> Threshold {
    Threshold::new(0.8, 0.4, 30.0, 0)
}

/// Settings of the policies that the command line can change.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PolicyOptions {
    /// The predictive policy's `drain_secs` (0: it does not size for the backlog).
    pub drain_secs: f64,
    /// How long the predictive policy holds the count its forecast asks for.
    pub hold_secs: f64,
}

impl Default for PolicyOptions {
    fn default() -> Self {
        PolicyOptions {
            drain_secs: DEFAULT_DRAIN_SECS,
            hold_secs: DEFAULT_HOLD_SECS,
        }
    }
}

/// Builds a policy for a scenario; Q-learning is trained first.
pub fn build(
    kind: PolicyKind,
    scenario: &Scenario,
    config: &SimConfig,
    options: &PolicyOptions,
    seed: u64,
) -> Box<dyn Policy> {
    match kind {
        PolicyKind::Threshold => Box::new(threshold()),
        PolicyKind::Hpa => Box::new(Hpa::new(0.7, 1, config.max_replicas)),
        PolicyKind::Kpa => Box::new(Kpa::new(config.max_replicas)),
        PolicyKind::Predictive | PolicyKind::Clairvoyant => {
            // A replica asked for at the end of tick t starts in tick t + 1 and serves from
            // tick t + 1 + warm-up: the forecast has to reach that far.
            let horizon = config.warmup_secs + 1;
            let forecaster: Box<dyn Forecaster + Send> = if kind == PolicyKind::Clairvoyant {
                Box::new(Clairvoyant {
                    rates: scenario.rates.as_slice().into(),
                    now: 0,
                })
            } else {
                forecaster_for(scenario, horizon)
            };
            let mut p = Predictive::new(
                Box::new(Kpa::new(config.max_replicas)),
                forecaster,
                horizon,
                0.7,
                config.max_replicas,
            )
            .with_hold(options.hold_secs);
            p.drain_secs = options.drain_secs;
            Box::new(p)
        }
        PolicyKind::QLearning => {
            let split = scenario.rates.len() * 7 / 10;
            Box::new(train_q(&scenario.rates[..split], config, seed))
        }
    }
}

/// Learners trained from different seeds, of which [`train_q`] keeps one.
pub const Q_RESTARTS: u64 = 5;

/// Trains [`Q_RESTARTS`] learners on `rates`, each from its own seed, freezes them, and keeps
/// the one whose frozen policy earns the most replaying `rates` (two runs).
///
/// A learner trained ε-greedily is used greedily, and from some seeds the greedy policy of an
/// otherwise good table holds far too many replicas or far too few for long stretches: on
/// the last 30 % of a series, single seeds lost two to three times the reward of the others.
/// Scoring each learner as it will be used, on the data it was trained on, finds those before
/// they are used; the series to come is never read.
pub fn train_q(rates: &[f64], config: &SimConfig, seed: u64) -> QLearning {
    let scored = |restart: u64| {
        let learner = train_one_q(rates, config, restart_seed(seed, restart));
        (replay_score(rates, &learner, config, seed), learner)
    };
    let (_, best) =
        (1..Q_RESTARTS).map(scored).fold(
            scored(0),
            |best, next| {
                if next.0 > best.0 { next } else { best }
            },
        );
    best
}

/// The seed of restart `restart` of a learner seeded `seed`.
fn restart_seed(seed: u64, restart: u64) -> u64 {
    seed.wrapping_add(restart * 7919)
}

/// What a frozen learner earns replaying `rates`: the reward of two runs, summed.
fn replay_score(rates: &[f64], learner: &QLearning, config: &SimConfig, seed: u64) -> f64 {
    (0..2)
        .map(|run| simulate(rates, &mut learner.clone(), config, seed * 31 + run).reward)
        .sum()
}

/// One learner: 200 episodes over `rates`, then frozen.
fn train_one_q(rates: &[f64], config: &SimConfig, seed: u64) -> QLearning {
    let mut q = QLearning::new(config.max_replicas, seed);
    q.epsilon_decay = 0.9997;
    // What a scaling move wastes in this simulator: a new replica is paid for through its
    // warm-up before it serves anything, and a removal undone later pays that again.
    q.move_cost = config.replica_cost * config.warmup_secs as f64;
    for episode in 0..200 {
        q.reset_episode();
        simulate(
            rates,
            &mut q,
            config,
            seed.wrapping_mul(1000).wrapping_add(episode + 17),
        );
    }
    q.freeze();
    q
}

/// The runs of one policy on one scenario.
#[derive(Debug, Clone)]
pub struct Cell {
    /// Policy.
    pub policy: PolicyKind,
    /// Scenario name.
    pub workload: String,
    /// One outcome per seed.
    pub outcomes: Vec<Outcome>,
}

/// Runs every policy on every scenario for `seeds` seeds, on all cores.
pub fn run_matrix(
    scenarios: &[Scenario],
    kinds: &[PolicyKind],
    seeds: u64,
    config: &SimConfig,
    options: &PolicyOptions,
) -> Vec<Cell> {
    let jobs: Vec<(usize, PolicyKind)> = (0..scenarios.len())
        .flat_map(|s| kinds.iter().map(move |k| (s, *k)))
        .collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(&(s, kind)) = jobs.get(i) else { break };
                    let scenario = &scenarios[s];
                    let outcomes = (0..seeds)
                        .map(|seed| {
                            let mut policy = build(kind, scenario, config, options, seed + 1);
                            simulate(&scenario.rates, policy.as_mut(), config, seed + 1)
                        })
                        .collect();
                    let cell = Cell {
                        policy: kind,
                        workload: scenario.name.clone(),
                        outcomes,
                    };
                    results
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((i, cell));
                }
            });
        }
    });
    let mut results = results.into_inner().unwrap_or_else(|e| e.into_inner());
    results.sort_by_key(|(i, _)| *i);
    results.into_iter().map(|(_, c)| c).collect()
}

/// Mean and the half-width of its 95 % confidence interval (Student's t).
pub fn mean_ci(values: &[f64]) -> (f64, f64) {
    let n = values.len();
    if n == 0 {
        return (f64::NAN, f64::NAN);
    }
    let mean = values.iter().sum::<f64>() / n as f64;
    if n == 1 {
        return (mean, 0.0);
    }
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    // Two-sided 97.5 % quantiles of Student's t for 1..=10 degrees of freedom, then ~normal.
    const T: [f64; 10] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    ];
    let t = T.get(n - 2).copied().unwrap_or(1.96);
    (mean, t * (var / n as f64).sqrt())
}

fn cell_stat(cell: &Cell, f: impl Fn(&Outcome) -> f64) -> (f64, f64) {
    mean_ci(&cell.outcomes.iter().map(f).collect::<Vec<_>>())
}

/// The comparison as a markdown table.
pub fn markdown(cells: &[Cell]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| workload | policy | SLO-violation s | requests over SLO | p50 ms | p99 ms | replica-s | over-prov. | under-prov. | actions | reversals | cold starts | reward |"
    );
    let _ = writeln!(
        s,
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    );
    for cell in cells {
        let fmt = |(m, ci): (f64, f64), digits: usize| format!("{m:.digits$} ± {ci:.digits$}");
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} % | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            cell.workload,
            cell.policy.label(),
            fmt(cell_stat(cell, |o| o.slo_violation_secs as f64), 0),
            fmt(cell_stat(cell, |o| 100.0 * o.over_slo_share), 2),
            fmt(cell_stat(cell, |o| 1000.0 * o.p50), 0),
            fmt(cell_stat(cell, |o| 1000.0 * o.p99), 0),
            fmt(cell_stat(cell, |o| o.replica_secs), 0),
            fmt(cell_stat(cell, |o| o.over_provisioned), 0),
            fmt(cell_stat(cell, |o| o.under_provisioned), 0),
            fmt(cell_stat(cell, |o| o.scaling_actions as f64), 0),
            fmt(cell_stat(cell, |o| o.reversals as f64), 0),
            fmt(cell_stat(cell, |o| o.cold_starts as f64), 0),
            fmt(cell_stat(cell, |o| o.reward), 0),
        );
    }
    s
}

/// Predictive against KPA per workload: the ratios the design's goal is stated in; with the
/// clairvoyant bound beside it where that was run.
pub fn goal_table(cells: &[Cell]) -> String {
    let bound = cells.iter().any(|c| c.policy == PolicyKind::Clairvoyant);
    let mut s = String::new();
    let _ = write!(
        s,
        "| workload | KPA SLO-violation s | predictive SLO-violation s | ratio (goal ≤ 0.5) | replica-s ratio (goal ≤ 1.1) | met |"
    );
    let _ = writeln!(
        s,
        "{}",
        if bound {
            " clairvoyant SLO-violation s | ratio | replica-s ratio | met |"
        } else {
            ""
        }
    );
    let _ = writeln!(
        s,
        "| --- | --- | --- | --- | --- | ---{}",
        if bound {
            " | --- | --- | --- | --- |"
        } else {
            " |"
        }
    );
    let workloads: Vec<&str> =
        cells
            .iter()
            .map(|c| c.workload.as_str())
            .fold(Vec::new(), |mut v, w| {
                if !v.contains(&w) {
                    v.push(w);
                }
                v
            });
    let violations = |c: &Cell| cell_stat(c, |o| o.slo_violation_secs as f64).0;
    let replica_secs = |c: &Cell| cell_stat(c, |o| o.replica_secs).0;
    for w in workloads {
        let find = |k| cells.iter().find(|c| c.workload == w && c.policy == k);
        let (Some(kpa), Some(pred)) = (find(PolicyKind::Kpa), find(PolicyKind::Predictive)) else {
            continue;
        };
        let kv = violations(kpa);
        let kr = replica_secs(kpa);
        // Violations and replica-seconds as shares of KPA's, and whether the goal holds.
        let against_kpa = |c: &Cell| {
            let v = violations(c);
            let ratio = if kv > 0.0 {
                v / kv
            } else if v > 0.0 {
                f64::INFINITY
            } else {
                0.0
            };
            let cost = replica_secs(c) / kr;
            let met = if ratio <= 0.5 && cost <= 1.1 {
                "yes"
            } else {
                "no"
            };
            (v, ratio, cost, met)
        };
        let (pv, ratio, cost, met) = against_kpa(pred);
        let _ = write!(
            s,
            "| {w} | {kv:.1} | {pv:.1} | {ratio:.2} | {cost:.2} | {met} |"
        );
        match find(PolicyKind::Clairvoyant) {
            Some(c) => {
                let (cv, ratio, cost, met) = against_kpa(c);
                let _ = writeln!(s, " {cv:.1} | {ratio:.2} | {cost:.2} | {met} |");
            }
            None if bound => {
                let _ = writeln!(s, " | | | |");
            }
            None => {
                let _ = writeln!(s);
            }
        }
    }
    s
}

/// Q-learning trained on the first 70 % of each scenario, frozen, against the threshold
/// policy on the last 30 %: cumulative reward, mean ± CI over `seeds`.
pub fn q_holdout(scenarios: &[Scenario], seeds: u64, config: &SimConfig) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| workload | threshold reward (last 30 %) | Q-learning reward (last 30 %) | Q-learning better |"
    );
    let _ = writeln!(s, "| --- | --- | --- | --- |");
    for scenario in scenarios {
        let split = scenario.rates.len() * 7 / 10;
        let (train, test) = scenario.rates.split_at(split);
        let mut th = Vec::new();
        let mut ql = Vec::new();
        for seed in 1..=seeds {
            th.push(simulate(test, &mut threshold(), config, seed + 100).reward);
            let mut q = train_q(train, config, seed);
            ql.push(simulate(test, &mut q, config, seed + 100).reward);
        }
        let (tm, tci) = mean_ci(&th);
        let (qm, qci) = mean_ci(&ql);
        let _ = writeln!(
            s,
            "| {} | {tm:.0} ± {tci:.0} | {qm:.0} ± {qci:.0} | {} |",
            scenario.name,
            if qm > tm { "yes" } else { "no" }
        );
    }
    s
}

/// The forecasters `forecast-eval` compares, for a season of `period` steps at `horizon`.
pub fn forecasters(period: usize, horizon: usize) -> Vec<Box<dyn Forecaster>> {
    vec![
        Box::new(Naive::default()),
        Box::new(SeasonalNaive::new(period)),
        Box::new(Ses::new(0.5)),
        Box::new(Holt::new(0.5, 0.1)),
        Box::new(HoltWinters::new(0.3, 0.01, 0.3, period)),
        // Lags aligned with the target step: the same hour a day before it (what the
        // predictive policy uses on a replay), and also a week before it.
        Box::new(OnlineLinear::new(
            &[1, 2, period + 1 - horizon.min(period)],
            horizon,
            0.01,
        )),
        Box::new(OnlineLinear::new(
            &[
                1,
                2,
                period + 1 - horizon.min(period),
                7 * period + 1 - horizon.min(period),
            ],
            horizon,
            0.01,
        )),
    ]
}

/// Forecast accuracy of every forecaster on `series` (period `period`) at `horizon`.
pub fn forecast_table(series: &[(String, Vec<f64>)], period: usize, horizon: usize) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| series | forecaster | MAE | RMSE | MASE | sMAPE % | under-forecast |"
    );
    let _ = writeln!(s, "| --- | --- | --- | --- | --- | --- | --- |");
    for (name, values) in series {
        let mut best: Option<(String, f64)> = None;
        for mut f in forecasters(period, horizon) {
            let scores = forecast::evaluate(f.as_mut(), values, horizon, period, period * 7);
            let _ = writeln!(
                s,
                "| {name} | {} | {:.1} | {:.1} | {:.3} | {:.1} | {:.2} |",
                f.name(),
                scores.mae,
                scores.rmse,
                scores.mase,
                scores.smape,
                scores.under_share
            );
            if best.as_ref().is_none_or(|(_, m)| scores.mase < *m) {
                best = Some((f.name(), scores.mase));
            }
        }
        if let Some((f, m)) = best {
            let _ = writeln!(s, "| {name} | **best: {f}** | | | **{m:.3}** | | |");
        }
    }
    s
}

/// A chart of the plots here: an SVG with seconds or steps against a value.
type Chart<'a, 'b> = plotters::chart::ChartContext<
    'a,
    plotters::backend::SVGBackend<'b>,
    plotters::coord::cartesian::Cartesian2d<
        plotters::coord::types::RangedCoordf64,
        plotters::coord::types::RangedCoordf64,
    >,
>;

/// Draws one labelled line on `chart`.
fn labelled_line(
    chart: &mut Chart<'_, '_>,
    points: impl IntoIterator<Item = (f64, f64)>,
    colour: plotters::style::RGBColor,
    label: &str,
) -> anyhow::Result<()> {
    use plotters::prelude::*;
    chart
        .draw_series(LineSeries::new(points, colour))
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .label(label)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 15, y)], colour));
    Ok(())
}

/// Draws the legend of `chart`'s labelled lines.
fn legend<'a, 'b: 'a>(chart: &mut Chart<'a, 'b>) -> anyhow::Result<()> {
    use plotters::prelude::*;
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))
}

/// Draws the last `shown` steps of `values` and what each forecaster said of them `horizon`
/// steps before.
pub fn plot_forecasts(
    name: &str,
    values: &[f64],
    period: usize,
    horizon: usize,
    shown: usize,
    path: &Path,
) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let from = values.len().saturating_sub(shown);
    let root = SVGBackend::new(path, (1200, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let ymax = values[from..].iter().copied().fold(1.0, f64::max) * 1.3;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{name}: actual and forecast {horizon} steps ahead"),
            ("sans-serif", 18),
        )
        .margin(8)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(from as f64..values.len() as f64, 0.0..ymax)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let actual = values.iter().enumerate().skip(from);
    labelled_line(
        &mut chart,
        actual.map(|(t, v)| (t as f64, *v)),
        BLACK,
        "actual",
    )?;
    let colours = [
        RED,
        BLUE,
        GREEN,
        MAGENTA,
        CYAN,
        RGBColor(230, 140, 0),
        RGBColor(120, 60, 0),
    ];
    for (mut f, colour) in forecasters(period, horizon).into_iter().zip(colours) {
        let mut points = Vec::new();
        for (t, y) in values.iter().enumerate() {
            f.observe(t as f64, *y);
            if t + horizon >= from && t + horizon < values.len() {
                points.push(((t + horizon) as f64, f.forecast(horizon)));
            }
        }
        labelled_line(&mut chart, points, colour, &f.name())?;
    }
    legend(&mut chart)?;
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

/// Draws demand, capacity, replicas and latency over time for each policy on one scenario.
pub fn plot(scenario: &Scenario, cells: &[Cell], path: &Path) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let cells: Vec<&Cell> = cells
        .iter()
        .filter(|c| c.workload == scenario.name)
        .collect();
    let root = SVGBackend::new(path, (1200, 900)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let panels = root.split_evenly((2, 1));
    let len = scenario.rates.len() as f64;
    let colours = [RED, BLUE, GREEN, MAGENTA, CYAN, RGBColor(230, 140, 0)];
    let max_rate = cells
        .iter()
        .filter_map(|c| c.outcomes.first())
        .flat_map(|o| o.trace.iter().map(|r| r.capacity))
        .chain(scenario.rates.iter().copied())
        .fold(1.0, f64::max)
        * 1.1;
    let draw = |area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
                caption: &str,
                ymax: f64,
                series: &dyn Fn(&Outcome) -> Vec<(f64, f64)>|
     -> anyhow::Result<()> {
        let mut chart = ChartBuilder::on(area)
            .caption(caption, ("sans-serif", 18))
            .margin(8)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(0.0..len, 0.0..ymax)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        chart
            .configure_mesh()
            .x_desc("seconds")
            .draw()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        if caption.starts_with("demand") {
            labelled_line(
                &mut chart,
                scenario
                    .rates
                    .iter()
                    .enumerate()
                    .map(|(t, r)| (t as f64, *r)),
                BLACK,
                "demand (mean rate)",
            )?;
        }
        for (cell, colour) in cells.iter().zip(colours) {
            let Some(first) = cell.outcomes.first() else {
                continue;
            };
            labelled_line(&mut chart, series(first), colour, cell.policy.label())?;
        }
        legend(&mut chart)
    };
    draw(
        &panels[0],
        &format!("demand and ready capacity (req/s): {}", scenario.name),
        max_rate,
        &|o| {
            o.trace
                .iter()
                .enumerate()
                .map(|(t, r)| (t as f64, r.capacity))
                .collect()
        },
    )?;
    draw(
        &panels[1],
        "mean latency of requests served (s), seed 1",
        31.0,
        &|o| {
            o.trace
                .iter()
                .enumerate()
                .map(|(t, r)| (t as f64, r.latency))
                .collect()
        },
    )?;
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confidence_interval_uses_students_t() {
        let (mean, ci) = mean_ci(&[1.0, 2.0, 3.0, 4.0, 5.0]);
        assert_eq!(mean, 3.0);
        // t(0.975, 4) · s / √n = 2.776 · √2.5 / √5.
        assert!((ci - 2.776 * (2.5f64 / 5.0).sqrt()).abs() < 1e-9);
        assert_eq!(mean_ci(&[7.0]), (7.0, 0.0));
    }

    #[test]
    fn q_learning_keeps_the_restart_whose_frozen_policy_replays_its_training_best() {
        let rates: Vec<f64> = (0..600)
            .map(|t| if (t / 100) % 2 == 0 { 20.0 } else { 120.0 })
            .collect();
        let config = SimConfig::default();
        let kept = replay_score(&rates, &train_q(&rates, &config, 3), &config, 3);
        let each: Vec<f64> = (0..Q_RESTARTS)
            .map(|r| {
                let learner = train_one_q(&rates, &config, restart_seed(3, r));
                replay_score(&rates, &learner, &config, 3)
            })
            .collect();
        assert!(each.contains(&kept), "{kept} is none of {each:?}");
        assert!(each.iter().all(|&s| kept >= s), "{kept} < one of {each:?}");
        assert!(
            each.iter().any(|&s| s != kept),
            "the restarts learn different policies: {each:?}"
        );
    }

    #[test]
    fn the_clairvoyant_bound_is_ready_for_a_step_no_one_else_sees_coming() {
        let step = synthetic()
            .into_iter()
            .find(|s| s.name == "step-x5")
            .expect("the step workload");
        let step_at = step.rates.len() / 3;
        let after = step.rates[step_at];
        // The centred average of the forecast path spreads the step over its window, so the
        // last replicas for it are ready half a window late.
        let at = step_at + DEFAULT_SMOOTHING / 2;
        let config = SimConfig::default();
        let options = PolicyOptions::default();
        let capacity_at_step = |kind| {
            let mut policy = build(kind, &step, &config, &options, 1);
            simulate(&step.rates, policy.as_mut(), &config, 1).trace[at].capacity
        };
        assert!(capacity_at_step(PolicyKind::Clairvoyant) >= after);
        assert!(capacity_at_step(PolicyKind::Kpa) < after);
        assert!(capacity_at_step(PolicyKind::Predictive) < after);
    }

    #[test]
    fn the_comparison_is_reproducible_and_ordered() {
        let scenarios: Vec<Scenario> = synthetic().into_iter().take(2).collect();
        let config = SimConfig::default();
        let kinds = [PolicyKind::Kpa, PolicyKind::Predictive];
        let a = run_matrix(&scenarios, &kinds, 2, &config, &PolicyOptions::default());
        let b = run_matrix(&scenarios, &kinds, 2, &config, &PolicyOptions::default());
        assert_eq!(a.len(), 4);
        let names: Vec<_> = a.iter().map(|c| (c.workload.as_str(), c.policy)).collect();
        assert_eq!(
            names,
            vec![
                ("constant", PolicyKind::Kpa),
                ("constant", PolicyKind::Predictive),
                ("step-x5", PolicyKind::Kpa),
                ("step-x5", PolicyKind::Predictive)
            ]
        );
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x.outcomes, y.outcomes);
        }
        let table = markdown(&a);
        assert_eq!(table.lines().count(), 2 + 4);
    }

    #[test]
    fn a_replayed_series_is_forecast_per_row_from_the_day_before() {
        // Three weeks of rows: 20 req/s, and 300 from 08:00 to 18:00 every day.
        let rows: Vec<f64> = (0..21 * 24)
            .map(|h| {
                if (8..18).contains(&(h % 24)) {
                    300.0
                } else {
                    20.0
                }
            })
            .collect();
        let scenario = Scenario {
            name: "office".into(),
            rates: workloads::replay(&rows, SECS_PER_ROW, 300.0),
            period: Some(24 * SECS_PER_ROW),
            bucket: SECS_PER_ROW,
        };
        let warmup = SimConfig::default().warmup_secs;
        let mut f = forecaster_for(&scenario, warmup);
        // Feed everything up to 20 s before the last day's 08:00 row.
        let rise = (20 * 24 + 8) * SECS_PER_ROW;
        for (t, y) in scenario.rates[..rise - 20].iter().enumerate() {
            f.observe(t as f64, *y);
        }
        let quiet = f.forecast(5);
        let busy = f.forecast(25);
        assert!(quiet < 100.0, "before the rise: {quiet}");
        assert!(busy > 200.0, "after the rise, within the warm-up: {busy}");
    }

    #[test]
    fn a_csv_is_replayed_as_asked() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("load.csv");
        // Four hours, the second recorded twice; the last three are replayed.
        std::fs::write(&path, "ts,value\nh0,9\nh1,5\nh1,5\nh2,10\nh3,0\n")?;
        let replay = Replay {
            secs_per_row: 2,
            rows: 3,
            peak: 100.0,
            season_rows: Some(24),
        };
        let s = from_csv(&path, "load", &replay)?;
        assert_eq!(s.rates, vec![50.0, 50.0, 100.0, 100.0, 0.0, 0.0]);
        assert_eq!((s.period, s.bucket), (Some(48), 2));
        let none = Replay {
            season_rows: None,
            ..replay.clone()
        };
        assert_eq!(from_csv(&path, "load", &none)?.period, None);

        std::fs::write(&path, "ts,value\n")?;
        let empty = from_csv(&path, "load", &replay).expect_err("no values");
        assert!(format!("{empty:#}").contains("no values"), "{empty:#}");
        let bad = from_csv(&dir.path().join("absent.csv"), "x", &replay).expect_err("no file");
        assert!(format!("{bad:#}").contains("absent.csv"), "{bad:#}");
        Ok(())
    }

    #[test]
    fn policy_names_parse_back() {
        for kind in PolicyKind::ALL {
            assert_eq!(PolicyKind::parse(kind.label()), Some(kind));
        }
        assert_eq!(PolicyKind::parse("hpa"), Some(PolicyKind::Hpa));
        assert_eq!(PolicyKind::parse("nope"), None);
    }
}
