//! The agent's offload decision: how much work to spill to the cloud, and which requests.
//!
//! [`OffloadPolicy`] keeps two measured quantities: the arrival rate λ (windows per second,
//! counted per tick) and the local capacity μ = workers ÷ service time (the service time is a
//! moving average of measured inference times, and a CPU quota caps μ further). A Holt
//! forecaster with a damped trend predicts λ̂ at the horizon h (the time the cloud needs to be
//! useful). The policy is a small state machine:
//!
//! - **Forecast spill** (predictive mode): when λ̂ > ρ_max·μ for two ticks in a row the
//!   agent starts offloading the fraction 1 − ρ_target·μ / max(λ, λ̂)
//!   of its windows, spread evenly by a credit counter; it stops only when both λ and λ̂ fall
//!   below ρ_exit·μ (hysteresis, ρ_exit < ρ_max).
//! - **Guard** (both modes; the whole of reactive mode): a window whose local completion —
//!   queue wait plus its own service — would use more than `guard_share` of the SLO goes
//!   remote at once.
//! - **Only when it pays**: a window goes remote only if the cloud's measured latency (RTT +
//!   remote service, from the replicas' EWMA) fits the window's remaining slack and beats the
//!   predicted local completion; otherwise it stays local and the reason says why.
//!
//! Every decision carries a [`Reason`], so an operator can see why work went where. Time is
//! passed in; nothing here reads a clock, so tests replay exact scenarios.

use std::time::{Duration, Instant};

use crate::forecast::{Forecaster, Holt};

/// Which router runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Everything local.
    Off,
    /// Offload only when the local queue would make a window miss its deadline.
    Reactive,
    /// Forecast spill plus the reactive guard.
    Predictive,
}

impl Mode {
    /// Parses `off`, `reactive` or `predictive`.
    pub fn parse(s: &str) -> Option<Mode> {
        match s {
            "off" => Some(Mode::Off),
            "reactive" => Some(Mode::Reactive),
            "predictive" => Some(Mode::Predictive),
            _ => None,
        }
    }

    /// The name [`Mode::parse`] reads.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Off => "off",
            Mode::Reactive => "reactive",
            Mode::Predictive => "predictive",
        }
    }
}

/// Tuning of an [`OffloadPolicy`].
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Which router.
    pub mode: Mode,
    /// Local worker threads.
    pub workers: usize,
    /// Time a window may take from completion to result.
    pub slo: Duration,
    /// Arrival counting interval.
    pub tick: Duration,
    /// Forecast horizon (the cloud's lead time).
    pub horizon: Duration,
    /// Start spilling when λ̂ exceeds this share of μ.
    pub rho_max: f64,
    /// While spilling, keep the local load at this share of μ.
    pub rho_target: f64,
    /// Stop spilling when λ and λ̂ fall below this share of μ.
    pub rho_exit: f64,
    /// Go remote when the local completion would use more than this share of the SLO.
    pub guard_share: f64,
    /// Service time assumed before the first measurement.
    pub initial_service: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            mode: Mode::Predictive,
            workers: 1,
            slo: Duration::from_millis(500),
            tick: Duration::from_millis(250),
            horizon: Duration::from_secs(1),
            rho_max: 0.85,
            rho_target: 0.7,
            rho_exit: 0.6,
            guard_share: 0.5,
            initial_service: Duration::from_millis(1),
        }
    }
}

/// Why a window went where it went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Local, nothing to do.
    Normal,
    /// Remote: the forecast says the agent will saturate.
    Forecast,
    /// Remote: the local queue would make it miss its deadline.
    Guard,
    /// Local: it should have gone remote, but no replica is reachable.
    CloudUnreachable,
    /// Local: the cloud's latency does not fit the slack or does not beat local.
    RemoteTooSlow,
}

impl Reason {
    /// A short name for counters and logs.
    pub fn name(self) -> &'static str {
        match self {
            Reason::Normal => "normal",
            Reason::Forecast => "forecast",
            Reason::Guard => "guard",
            Reason::CloudUnreachable => "cloud_unreachable",
            Reason::RemoteTooSlow => "remote_too_slow",
        }
    }
}

/// Where a window goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// The local queue.
    Local(Reason),
    /// A replica.
    Remote(Reason),
}

/// What the policy currently believes, for status reports.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Snapshot {
    /// Measured arrivals, windows per second (last tick).
    pub arrival_rate: f64,
    /// Forecast arrivals at the horizon.
    pub forecast: f64,
    /// Local capacity μ, windows per second.
    pub capacity: f64,
    /// Smoothed local service time.
    pub service_time: Duration,
    /// Share of windows the forecast spill sends remote.
    pub fraction: f64,
    /// Whether the forecast spill is on.
    pub spilling: bool,
    /// The CPU quota the workers run under, in cores.
    pub cpu_limit: Option<f64>,
}

/// The offload state of one agent.
#[derive(Debug, Clone)]
pub struct OffloadPolicy {
    settings: Settings,
    forecaster: Holt,
    tick_start: Option<Instant>,
    arrivals: u64,
    lambda: f64,
    lambda_hat: f64,
    /// Seconds per window, smoothed.
    service: f64,
    spilling: bool,
    fraction: f64,
    credit: f64,
    /// CPU seconds per window, smoothed.
    cpu: f64,
    /// Consecutive ticks whose forecast was above ρ_max·μ.
    ticks_above: u32,
    /// Cores a CPU quota allows the workers, if one applies.
    cpu_limit: Option<f64>,
}

/// Weight of a new service-time measurement batch.
const SERVICE_SMOOTHING: f64 = 0.2;

/// Moves `estimate` (seconds per window) toward `total ÷ count`; a batch of many
/// measurements moves it more than a single one.
fn smooth(estimate: &mut f64, total: Duration, count: u64) {
    if count == 0 {
        return;
    }
    let weight = 1.0 - (1.0 - SERVICE_SMOOTHING).powf((count as f64).min(50.0));
    let per = (total.as_secs_f64() / count as f64).max(1e-6);
    *estimate += weight * (per - *estimate);
}

/// Per-tick damping of the forecast trend: a load that steps up (a burst, or traffic
/// returning after a pause) is not extrapolated into the sky.
const TREND_DAMPING: f64 = 0.8;
/// Ticks in a row the forecast must stay above ρ_max·μ before it starts a spill.
const ENTER_TICKS: u32 = 2;
/// Most idle ticks fed to the forecaster after a silence.
const MAX_IDLE_TICKS: u32 = 64;

impl OffloadPolicy {
    /// A policy with `settings`, before any arrival.
    pub fn new(settings: Settings) -> Self {
        let service = settings.initial_service.as_secs_f64().max(1e-6);
        OffloadPolicy {
            cpu: service,
            ticks_above: 0,
            cpu_limit: None,
            settings,
            forecaster: Holt::damped(0.5, 0.3, TREND_DAMPING),
            tick_start: None,
            arrivals: 0,
            lambda: 0.0,
            lambda_hat: 0.0,
            service,
            spilling: false,
            fraction: 0.0,
            credit: 0.0,
        }
    }

    /// The settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Feeds `count` local inferences that took `wall` together.
    pub fn record_service(&mut self, wall: Duration, count: u64) {
        smooth(&mut self.service, wall, count);
    }

    /// Feeds the CPU time the workers' threads used for `count` windows: the inference and
    /// the work around it (a quota is spent on both).
    pub fn record_cpu(&mut self, cpu: Duration, count: u64) {
        smooth(&mut self.cpu, cpu, count);
    }

    /// Local capacity μ, windows per second: the workers at their measured pace, and no more
    /// than a CPU quota lets through.
    pub fn capacity(&self) -> f64 {
        let workers = self.settings.workers.max(1) as f64 / self.service;
        // Under a quota, wall times include throttled pauses too: taking the lower of both
        // bounds errs on the side of spilling early.
        self.cpu_limit
            .map_or(workers, |cores| workers.min(cores / self.cpu))
    }

    /// Sets the CPU quota the workers run under, in cores (`None`: no quota).
    ///
    /// Under a quota one inference still runs at full speed until the quota is spent, so
    /// measured service times alone overstate the capacity; the quota divided by the CPU
    /// time per window bounds it.
    pub fn set_cpu_limit(&mut self, cores: Option<f64>) {
        self.cpu_limit = cores.map(|c| c.max(0.001));
    }

    /// Counts one arrival at `now`, closing ticks that have ended.
    pub fn arrival(&mut self, now: Instant) {
        self.advance(now);
        self.arrivals += 1;
    }

    /// Closes every tick that ended by `now` (also called without arrivals, to see idleness).
    pub fn advance(&mut self, now: Instant) {
        let tick = self.settings.tick.max(Duration::from_millis(1));
        let Some(start) = self.tick_start else {
            self.tick_start = Some(now);
            return;
        };
        let elapsed = now.saturating_duration_since(start);
        if elapsed < tick {
            return;
        }
        let ticks = (elapsed.as_nanos() / tick.as_nanos()).min(u128::from(MAX_IDLE_TICKS)) as u32;
        // The arrivals counted belong to the first closed tick; later ones were idle.
        self.close_tick(self.arrivals as f64 / tick.as_secs_f64());
        for _ in 1..ticks {
            self.close_tick(0.0);
        }
        self.arrivals = 0;
        self.tick_start = Some(if elapsed >= tick * MAX_IDLE_TICKS {
            now
        } else {
            start + tick * ticks
        });
    }

    fn close_tick(&mut self, rate: f64) {
        self.lambda = rate;
        self.forecaster.observe(0.0, rate);
        let steps = (self.settings.horizon.as_secs_f64() / self.settings.tick.as_secs_f64())
            .ceil()
            .max(1.0) as usize;
        self.lambda_hat = self.forecaster.forecast(steps).max(0.0);
        self.update_spill();
    }

    fn update_spill(&mut self) {
        let s = &self.settings;
        let mu = self.capacity();
        if s.mode != Mode::Predictive {
            self.spilling = false;
            self.fraction = 0.0;
            return;
        }
        let peak = self.lambda.max(self.lambda_hat);
        // One noisy tick (a clump of messages) can throw the trend far ahead: the forecast
        // must stay above ρ_max·μ for two ticks in a row; the guard covers the wait.
        self.ticks_above = if self.lambda_hat > s.rho_max * mu {
            self.ticks_above.saturating_add(1)
        } else {
            0
        };
        if !self.spilling && self.ticks_above >= ENTER_TICKS {
            self.spilling = true;
        } else if self.spilling && peak < s.rho_exit * mu {
            self.spilling = false;
            self.credit = 0.0;
        }
        self.fraction = if self.spilling && peak > 0.0 {
            (1.0 - s.rho_target * mu / peak).clamp(0.0, 1.0)
        } else {
            0.0
        };
    }

    /// Decides where a window goes.
    ///
    /// `queued`: windows waiting locally; `slack`: time left before the window's deadline;
    /// `remote`: the best replica's expected latency, `None` when none is reachable.
    pub fn route(&mut self, queued: usize, slack: Duration, remote: Option<Duration>) -> Route {
        let s = &self.settings;
        if s.mode == Mode::Off {
            return Route::Local(Reason::Normal);
        }
        let local = Duration::from_secs_f64(queued as f64 / self.capacity() + self.service);
        let guard = local.as_secs_f64() > s.guard_share * s.slo.as_secs_f64();
        let forecast = !guard && self.spilling && {
            self.credit += self.fraction;
            if self.credit >= 1.0 {
                self.credit -= 1.0;
                true
            } else {
                false
            }
        };
        let reason = match (guard, forecast) {
            (true, _) => Reason::Guard,
            (false, true) => Reason::Forecast,
            (false, false) => return Route::Local(Reason::Normal),
        };
        let Some(remote) = remote else {
            return Route::Local(Reason::CloudUnreachable);
        };
        if remote >= slack || remote >= self.predicted_local(local) {
            return Route::Local(Reason::RemoteTooSlow);
        }
        Route::Remote(reason)
    }

    /// What a window kept local should expect: the wait behind the current queue, or, when
    /// the forecast load is near or above capacity, the wait that load builds up.
    fn predicted_local(&self, now_local: Duration) -> Duration {
        let rho = self.lambda.max(self.lambda_hat) / self.capacity();
        if rho >= 1.0 {
            return Duration::MAX;
        }
        let queueing = self.service * rho / (1.0 - rho);
        now_local.max(Duration::from_secs_f64(self.service + queueing))
    }

    /// What the policy believes now.
    /// Windows per second this agent expects to send to replicas at the horizon: what the
    /// forecast (or, while spilling, the measured rate) puts above ρ_target·μ, once the
    /// forecast crosses ρ_max·μ; zero otherwise and with offload off. The hub warms replicas
    /// for the sum of these over its agents.
    pub fn offload_demand(&self) -> f64 {
        if self.settings.mode == Mode::Off {
            return 0.0;
        }
        let mu = self.capacity();
        let peak = self.lambda.max(self.lambda_hat);
        if self.spilling || self.lambda_hat > self.settings.rho_max * mu {
            (peak - self.settings.rho_target * mu).max(0.0)
        } else {
            0.0
        }
    }

    /// The state now, for status reports.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            arrival_rate: self.lambda,
            forecast: self.lambda_hat,
            capacity: self.capacity(),
            service_time: Duration::from_secs_f64(self.service),
            fraction: self.fraction,
            spilling: self.spilling,
            cpu_limit: self.cpu_limit,
        }
    }
}

#[cfg(test)]
// The tests need an origin for time; only offsets from it matter.
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn policy(mode: Mode) -> OffloadPolicy {
        // 1 worker at 10 ms a window: μ = 100 windows/s.
        let mut p = OffloadPolicy::new(Settings {
            mode,
            initial_service: 10 * MS,
            ..Settings::default()
        });
        p.record_service(10 * MS, 1);
        p.record_cpu(10 * MS, 1);
        p
    }

    /// Feeds `rate` windows/s for `secs` seconds from `*t`, routing each with an empty queue
    /// and a 2 ms cloud; returns how many went remote.
    fn drive(p: &mut OffloadPolicy, t: &mut Instant, rate: f64, secs: f64) -> (u64, u64) {
        let n = (rate * secs) as u64;
        let gap = Duration::from_secs_f64(1.0 / rate);
        let mut remote = 0;
        for _ in 0..n {
            *t += gap;
            p.arrival(*t);
            if let Route::Remote(_) = p.route(0, 500 * MS, Some(2 * MS)) {
                remote += 1;
            }
        }
        (remote, n)
    }

    #[test]
    fn below_capacity_everything_stays_local() {
        let mut p = policy(Mode::Predictive);
        let mut t = Instant::now();
        let (remote, _) = drive(&mut p, &mut t, 50.0, 20.0);
        assert_eq!(remote, 0);
        assert!((p.snapshot().arrival_rate - 50.0).abs() < 5.0);
    }

    #[test]
    fn offload_demand_is_what_the_burst_puts_above_the_target() {
        let mut p = policy(Mode::Predictive);
        let mut t = Instant::now();
        drive(&mut p, &mut t, 50.0, 10.0);
        assert_eq!(
            p.offload_demand(),
            0.0,
            "below capacity nothing is asked of the hub"
        );
        drive(&mut p, &mut t, 300.0, 5.0);
        // μ = 100, ρ_target = 0.7: 300 − 70 = 230 windows/s for the replicas.
        let demand = p.offload_demand();
        assert!((demand - 230.0).abs() < 25.0, "{demand}");
        drive(&mut p, &mut t, 50.0, 5.0);
        assert_eq!(p.offload_demand(), 0.0);
        let mut off = policy(Mode::Off);
        drive(&mut off, &mut t, 300.0, 5.0);
        assert_eq!(off.offload_demand(), 0.0);
    }

    #[test]
    fn a_burst_spills_the_excess_and_stops_after_it() {
        let mut p = policy(Mode::Predictive);
        let mut t = Instant::now();
        drive(&mut p, &mut t, 50.0, 10.0);
        // The first second of the burst: the forecast spill starts after two ticks (in the
        // agent, the guard covers those).
        let (first, n_first) = drive(&mut p, &mut t, 300.0, 1.0);
        assert!(first as f64 > 0.3 * n_first as f64, "{first} of {n_first}");
        let (remote, n) = drive(&mut p, &mut t, 300.0, 20.0);
        let share = remote as f64 / n as f64;
        let expected = 1.0 - 0.7 * 100.0 / 300.0;
        assert!(
            (share - expected).abs() < 0.05,
            "share {share}, expected {expected}"
        );
        assert!(p.snapshot().spilling);
        drive(&mut p, &mut t, 50.0, 5.0);
        assert!(!p.snapshot().spilling);
        let (after, _) = drive(&mut p, &mut t, 50.0, 5.0);
        assert_eq!(after, 0);
    }

    #[test]
    fn hysteresis_keeps_spilling_between_the_thresholds() {
        let mut p = policy(Mode::Predictive);
        let mut t = Instant::now();
        drive(&mut p, &mut t, 300.0, 5.0);
        assert!(p.snapshot().spilling);
        // 75/s: below ρ_max·μ = 85, above ρ_exit·μ = 60: stays on (sending little).
        drive(&mut p, &mut t, 75.0, 10.0);
        assert!(p.snapshot().spilling);
        drive(&mut p, &mut t, 40.0, 10.0);
        assert!(!p.snapshot().spilling);
    }

    #[test]
    fn a_single_noisy_tick_does_not_start_a_spill() {
        let mut p = policy(Mode::Predictive);
        let mut t = Instant::now();
        drive(&mut p, &mut t, 50.0, 10.0);
        // One tick's worth of arrivals at 95/s, then back to 50/s.
        drive(&mut p, &mut t, 95.0, 0.25);
        assert!(!p.snapshot().spilling);
        let (remote, _) = drive(&mut p, &mut t, 50.0, 5.0);
        assert_eq!(remote, 0);
    }

    #[test]
    fn traffic_returning_after_a_pause_does_not_start_a_spill() {
        let mut p = policy(Mode::Predictive);
        let mut t = Instant::now();
        drive(&mut p, &mut t, 50.0, 10.0);
        t += Duration::from_secs(2);
        p.advance(t);
        let (remote, _) = drive(&mut p, &mut t, 50.0, 5.0);
        assert_eq!(remote, 0);
        assert!(!p.snapshot().spilling);
    }

    #[test]
    fn reactive_mode_waits_for_the_queue() {
        let mut p = policy(Mode::Reactive);
        let mut t = Instant::now();
        let (remote, _) = drive(&mut p, &mut t, 300.0, 5.0);
        assert_eq!(remote, 0, "an empty queue never spills in reactive mode");
        // 30 queued × 10 ms = 310 ms > half of the 500 ms SLO.
        assert_eq!(
            p.route(30, 500 * MS, Some(2 * MS)),
            Route::Remote(Reason::Guard)
        );
        assert_eq!(
            p.route(10, 500 * MS, Some(2 * MS)),
            Route::Local(Reason::Normal)
        );
    }

    #[test]
    fn no_cloud_or_a_slow_cloud_keeps_work_local_and_says_why() {
        let mut p = policy(Mode::Predictive);
        assert_eq!(
            p.route(40, 500 * MS, None),
            Route::Local(Reason::CloudUnreachable)
        );
        // The cloud takes longer than the window has left.
        assert_eq!(
            p.route(40, 100 * MS, Some(150 * MS)),
            Route::Local(Reason::RemoteTooSlow)
        );
        assert_eq!(
            p.route(40, 500 * MS, Some(150 * MS)),
            Route::Remote(Reason::Guard)
        );
    }

    #[test]
    fn a_forecast_spill_stands_down_when_the_cloud_is_slower_than_local() {
        let mut p = policy(Mode::Predictive);
        let mut t = Instant::now();
        // 90/s: spilling (λ̂ > 85) but local still keeps up: ρ = 0.9, predicted local 100 ms.
        drive(&mut p, &mut t, 90.0, 10.0);
        assert!(p.snapshot().spilling);
        let routes: Vec<Route> = (0..50)
            .map(|_| p.route(0, 500 * MS, Some(300 * MS)))
            .collect();
        assert!(routes.contains(&Route::Local(Reason::RemoteTooSlow)));
        assert!(!routes.iter().any(|r| matches!(r, Route::Remote(_))));
    }

    #[test]
    fn silence_decays_the_rate() {
        let mut p = policy(Mode::Predictive);
        let mut t = Instant::now();
        drive(&mut p, &mut t, 300.0, 5.0);
        p.advance(t + Duration::from_secs(30));
        assert_eq!(p.snapshot().arrival_rate, 0.0);
        assert!(!p.snapshot().spilling);
    }

    #[test]
    fn off_never_spills() {
        let mut p = policy(Mode::Off);
        let mut t = Instant::now();
        let (remote, _) = drive(&mut p, &mut t, 300.0, 5.0);
        assert_eq!(remote, 0);
        assert_eq!(
            p.route(1000, 500 * MS, Some(MS)),
            Route::Local(Reason::Normal)
        );
    }

    #[test]
    fn a_cpu_quota_caps_the_capacity() {
        let mut p = OffloadPolicy::new(Settings {
            workers: 2,
            initial_service: 10 * MS,
            ..Settings::default()
        });
        assert!((p.capacity() - 200.0).abs() < 1e-6);
        p.set_cpu_limit(Some(0.1));
        assert!((p.capacity() - 10.0).abs() < 1e-6);
        // Throttled: each window takes 100 ms of wall time for its 10 ms of CPU.
        p.record_service(Duration::from_secs(100), 1000);
        p.record_cpu(Duration::from_secs(10), 1000);
        assert!((p.capacity() - 10.0).abs() < 0.1, "{}", p.capacity());
        // A generous quota: the workers' own pace (100 ms a window, 2 workers) is the limit.
        p.set_cpu_limit(Some(8.0));
        assert!((p.capacity() - 20.0).abs() < 0.1, "{}", p.capacity());
        p.set_cpu_limit(None);
        assert!((p.capacity() - 20.0).abs() < 0.1, "{}", p.capacity());
    }

    #[test]
    fn service_measurements_set_the_capacity() {
        let mut p = policy(Mode::Predictive);
        p.record_service(Duration::from_millis(200), 100);
        assert!((p.capacity() - 500.0).abs() < 50.0, "{}", p.capacity());
    }
}
