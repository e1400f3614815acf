//! Scaling policies: how many replicas to run, decided from what was observed.
//!
//! Every policy implements [`Policy`]: `decide(now, observation)` returns the desired replica
//! count. Policies are pure state machines — time comes in as `now` (seconds), never from a
//! clock — so the simulator replays them exactly and the hub runs the same code live.
//!
//! - [`Threshold`]: scale out above `up`, in below `down` utilisation, with a cooldown.
//! - [`Hpa`]: Kubernetes' horizontal pod autoscaler as its controller computes it.
//! - [`Kpa`]: Knative's pod autoscaler (stable and panic windows, scale to zero).
//! - [`Predictive`]: a reactive policy raised to what the forecast demand needs at the
//!   replicas' warm-up horizon; it never scales in on a forecast alone.
//! - [`QLearning`]: tabular Q-learning over discretised load, replicas and trend.
//!
//! [`RecentMax`], the largest count of a recent window, is the scale-in stabilisation they
//! share with the hub's scaler.

use std::collections::VecDeque;

use crate::forecast::Forecaster;

/// What a policy sees each tick.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Observation {
    /// Requests per second that arrived in the last tick.
    pub demand: f64,
    /// Replicas ready to serve.
    pub ready: usize,
    /// Replicas that exist, ready or warming up.
    pub replicas: usize,
    /// Requests per second one replica serves at full load.
    pub capacity: f64,
    /// Requests waiting.
    pub queue: f64,
    /// The reward the last decision earned (for learning policies).
    pub reward: f64,
}

impl Observation {
    /// Demand (arrival rate) over the capacity of the ready replicas (∞ with none ready and
    /// demand arriving). The backlog is not part of it: like a request-rate metric in
    /// Kubernetes or Knative, it measures what arrives, not what waits.
    pub fn utilisation(&self) -> f64 {
        let cap = self.ready as f64 * self.capacity;
        if cap > 0.0 {
            self.demand / cap
        } else if self.demand > 0.0 {
            f64::INFINITY
        } else {
            0.0
        }
    }
}

/// A scaling policy.
pub trait Policy {
    /// A short name for tables.
    fn name(&self) -> String;
    /// The desired replica count at `now` (seconds) given `obs`.
    fn decide(&mut self, now: f64, obs: &Observation) -> usize;
}

/// The largest value recorded in the last `window_secs` seconds: a scale-in stabilisation
/// window. A value exactly `window_secs` old still counts, as in Kubernetes' HPA. Kept as a
/// decreasing deque, so a tick costs amortised O(1) and only values that can still become the
/// maximum are stored.
#[derive(Debug, Clone)]
pub struct RecentMax {
    window_secs: f64,
    samples: VecDeque<(f64, usize)>,
}

impl RecentMax {
    /// A window of `window_secs` seconds (0: only the values recorded at the same instant).
    pub fn new(window_secs: f64) -> Self {
        RecentMax {
            window_secs,
            samples: VecDeque::new(),
        }
    }

    /// Records `value` at `now` and returns the largest value of the window.
    pub fn push(&mut self, now: f64, value: usize) -> usize {
        while self.samples.back().is_some_and(|(_, v)| *v <= value) {
            self.samples.pop_back();
        }
        self.samples.push_back((now, value));
        while self
            .samples
            .front()
            .is_some_and(|(t, _)| now - t > self.window_secs)
        {
            self.samples.pop_front();
        }
        self.samples.front().map_or(value, |(_, v)| *v)
    }
}

/// Scale out above `up` utilisation, in below `down`, nothing in between; at most one action
/// per `cooldown_secs`. Scaling out goes straight to the count that brings utilisation back to
/// `up`; scaling in removes one replica.
#[derive(Debug, Clone)]
pub struct Threshold {
    /// Utilisation above which to scale out.
    pub up: f64,
    /// Utilisation below which to scale in.
    pub down: f64,
    /// Seconds between two actions.
    pub cooldown_secs: f64,
    /// Never fewer replicas.
    pub min: usize,
    last_action: Option<f64>,
}

impl Threshold {
    /// A threshold policy.
    pub fn new(up: f64, down: f64, cooldown_secs: f64, min: usize) -> Self {
        Threshold {
            up,
            down,
            cooldown_secs,
            min,
            last_action: None,
        }
    }
}

impl Policy for Threshold {
    fn name(&self) -> String {
        format!("threshold ({}/{})", self.up, self.down)
    }
    fn decide(&mut self, now: f64, obs: &Observation) -> usize {
        if self
            .last_action
            .is_some_and(|t| now - t < self.cooldown_secs)
        {
            return obs.replicas;
        }
        let u = obs.utilisation();
        let desired = if u > self.up {
            let need = (obs.demand / (obs.capacity * self.up)).ceil() as usize;
            need.max(obs.replicas + 1)
        } else if u < self.down && obs.replicas > self.min {
            obs.replicas - 1
        } else {
            obs.replicas
        };
        let desired = desired.max(self.min);
        if desired != obs.replicas {
            self.last_action = Some(now);
        }
        desired
    }
}

/// Kubernetes HPA (pkg/controller/podautoscaler): every `sync_secs`, desired =
/// ceil(current · metric / target) unless the ratio is within `tolerance` of 1; scale-up is
/// limited per 15 s to the larger of +4 pods and +100 %; scale-down takes the highest
/// recommendation of the last 300 s (its default stabilisation window).
#[derive(Debug, Clone)]
pub struct Hpa {
    /// Target utilisation.
    pub target: f64,
    /// Ratio tolerance.
    pub tolerance: f64,
    /// Controller period.
    pub sync_secs: f64,
    /// minReplicas (HPA cannot scale to zero).
    pub min: usize,
    /// maxReplicas.
    pub max: usize,
    recommendations: RecentMax,
    last_sync: Option<f64>,
    current: usize,
}

impl Hpa {
    /// The HPA with Kubernetes' defaults and the given target utilisation.
    pub fn new(target: f64, min: usize, max: usize) -> Self {
        Hpa {
            target,
            tolerance: 0.1,
            sync_secs: 15.0,
            min: min.max(1),
            max,
            recommendations: RecentMax::new(300.0),
            last_sync: None,
            current: min.max(1),
        }
    }

    /// The replica calculator alone: desired for `current` replicas at `utilisation`.
    pub fn raw_desired(&self, current: usize, utilisation: f64) -> usize {
        let ratio = utilisation / self.target;
        if (ratio - 1.0).abs() <= self.tolerance {
            current
        } else {
            (current as f64 * ratio).ceil() as usize
        }
    }
}

impl Policy for Hpa {
    fn name(&self) -> String {
        "HPA".into()
    }
    fn decide(&mut self, now: f64, obs: &Observation) -> usize {
        if self.last_sync.is_some_and(|t| now - t < self.sync_secs) {
            return self.current;
        }
        self.last_sync = Some(now);
        let current = obs.replicas.max(1);
        // Pods not ready count at 0 % for scale-up decisions in the HPA; the metric here is
        // utilisation of the ready ones, measured against all replicas that exist.
        let utilisation = if obs.replicas == 0 {
            0.0
        } else {
            obs.demand / (obs.replicas as f64 * obs.capacity)
        };
        let recommendation = self
            .raw_desired(current, utilisation)
            .clamp(self.min, self.max);
        let stabilised = self.recommendations.push(now, recommendation);
        let desired = if recommendation < current {
            // Scale down only to the highest recommendation in the window.
            stabilised.min(current)
        } else {
            // Scale-up policies: max(+4 pods, +100 %) per period.
            let limit = (current + 4).max(current * 2);
            recommendation.min(limit)
        };
        self.current = desired.clamp(self.min, self.max);
        self.current
    }
}

/// Knative KPA (pkg/autoscaler/scaling/autoscaler.go) on request rate: desired =
/// ceil(average / (capacity · target utilisation)) over a 60 s stable window; panic starts when
/// the panic-window (6 s) desired is at least twice the ready pods and ends after a stable
/// window without that; while panicking the count is the larger of the stable and panic
/// desired, and never falls below the largest such count since panic began; both counts are
/// clamped to floor(ready / 2) below and 1000 × ready above per decision; with no traffic for
/// the stable window plus a 30 s grace, it scales to zero.
#[derive(Debug, Clone)]
pub struct Kpa {
    /// Target utilisation of a replica's capacity.
    pub target_utilisation: f64,
    /// Stable window.
    pub stable_secs: f64,
    /// Panic window.
    pub panic_secs: f64,
    /// Panic threshold (desired ÷ ready).
    pub panic_threshold: f64,
    /// Max scale-up rate.
    pub max_up_rate: f64,
    /// Max scale-down rate (2 → at most halve).
    pub max_down_rate: f64,
    /// Grace before the last replica goes.
    pub zero_grace_secs: f64,
    /// Upper bound.
    pub max: usize,
    samples: VecDeque<(f64, f64)>,
    panic_since: Option<f64>,
    panic_desired: usize,
    last_traffic: Option<f64>,
}

impl Kpa {
    /// The KPA with Knative's defaults.
    pub fn new(max: usize) -> Self {
        Kpa {
            target_utilisation: 0.7,
            stable_secs: 60.0,
            panic_secs: 6.0,
            panic_threshold: 2.0,
            max_up_rate: 1000.0,
            max_down_rate: 2.0,
            zero_grace_secs: 30.0,
            max,
            samples: VecDeque::new(),
            panic_since: None,
            panic_desired: 0,
            last_traffic: None,
        }
    }

    /// Whether the autoscaler is in panic mode.
    pub fn panicking(&self) -> bool {
        self.panic_since.is_some()
    }

    fn average(&self, now: f64, window: f64) -> f64 {
        let (sum, n) = self
            .samples
            .iter()
            .filter(|(t, _)| now - t < window)
            .fold((0.0, 0usize), |(s, n), (_, v)| (s + v, n + 1));
        if n == 0 { 0.0 } else { sum / n as f64 }
    }
}

impl Policy for Kpa {
    fn name(&self) -> String {
        "KPA".into()
    }
    fn decide(&mut self, now: f64, obs: &Observation) -> usize {
        let load = obs.demand;
        self.samples.push_back((now, load));
        while self
            .samples
            .front()
            .is_some_and(|(t, _)| now - t >= self.stable_secs)
        {
            self.samples.pop_front();
        }
        if load > 0.0 {
            self.last_traffic = Some(now);
        }
        let per_replica = obs.capacity * self.target_utilisation;
        let stable = self.average(now, self.stable_secs);
        let panic = self.average(now, self.panic_secs);
        let wanted_stable = (stable / per_replica).ceil();
        let wanted_panic = (panic / per_replica).ceil();
        // With no pod ready, Knative treats the ready count as one.
        let ready = obs.ready.max(1) as f64;
        // Both counts are kept within the rate limits before panic mode reads them.
        let up_limit = (self.max_up_rate * ready).ceil();
        let down_limit = (ready / self.max_down_rate).floor();
        let desired_stable = wanted_stable.clamp(down_limit, up_limit) as usize;
        let desired_panic = wanted_panic.clamp(down_limit, up_limit) as usize;
        if wanted_panic / ready >= self.panic_threshold {
            self.panic_since = Some(now);
        } else if self
            .panic_since
            .is_some_and(|t| now - t >= self.stable_secs)
        {
            self.panic_since = None;
            self.panic_desired = 0;
        }
        // In panic, the larger of the two counts, and never fewer than panic mode has asked for
        // since it began (the ratchet starts from nothing, not from the replicas running).
        let mut desired = if self.panic_since.is_some() {
            self.panic_desired = self.panic_desired.max(desired_stable.max(desired_panic));
            self.panic_desired
        } else {
            desired_stable
        };
        if desired == 0 {
            // Scale to zero only after the grace period without traffic.
            let idle_for = self.last_traffic.map_or(f64::INFINITY, |t| now - t);
            if idle_for < self.stable_secs + self.zero_grace_secs && obs.replicas > 0 {
                desired = 1;
            }
        }
        if load > 0.0 {
            desired = desired.max(1);
        }
        desired.min(self.max)
    }
}

/// A reactive policy raised to the replicas the forecast demand `horizon_secs` ahead needs.
///
/// The replicas are sized for the peak of the forecast path over the horizon, after a
/// centred moving average of `smoothing` ticks. Without it, the peak of a path whose every
/// step carries its own noise (the seasonal slots of Holt-Winters, learnt from Poisson counts)
/// sits well above the mean, and the policy pays for replicas that only that noise asked for,
/// on top of the headroom the target utilisation already leaves. The average is centred and the
/// path runs half a window past the horizon, so a rise right at the horizon is not delayed.
///
/// The policy also sizes for the backlog. A replica started now serves from the horizon on,
/// so it meets the queue the horizon will have built, not the one waiting now: the queue is
/// projected over the horizon (forecast arrivals against the capacity of the replicas that
/// exist, counted as ready), and replicas are added to clear that projected queue within
/// `drain_secs`, at full load. That count is held for the horizon, because once those
/// replicas are starting the projection (which counts them) no longer asks for them; then the
/// queue actually waiting keeps them, sized to clear it within `drain_secs` and held as long,
/// so they stay until it is cleared. Without this term, a cold start under load leaves the replicas that arrive
/// sized for the arrival rate alone, and the backlog of the warm-up drains only through their
/// headroom: for a minute, on the simulator's constant load.
pub struct Predictive {
    reactive: Box<dyn Policy + Send>,
    forecaster: Box<dyn Forecaster + Send>,
    /// Forecast horizon in ticks (the replicas' warm-up time).
    pub horizon: usize,
    /// Target utilisation for forecast demand.
    pub target_utilisation: f64,
    /// Upper bound.
    pub max: usize,
    /// Ticks the forecast path is averaged over before its peak is taken (1: not at all).
    pub smoothing: usize,
    /// Seconds within which a backlog is to be cleared (0: the backlog is not sized for).
    pub drain_secs: f64,
    last_forecast: f64,
    /// The forecast's count over the last `hold_secs` (see [`Predictive::with_hold`]).
    held: RecentMax,
    /// Replicas asked for the backlog, each with the time its hold ends.
    drain_held: VecDeque<(f64, f64)>,
}

impl Predictive {
    /// Raise `reactive` with `forecaster`'s demand `horizon` ticks ahead.
    pub fn new(
        reactive: Box<dyn Policy + Send>,
        forecaster: Box<dyn Forecaster + Send>,
        horizon: usize,
        target_utilisation: f64,
        max: usize,
    ) -> Self {
        Predictive {
            reactive,
            forecaster,
            horizon,
            target_utilisation,
            max,
            smoothing: DEFAULT_SMOOTHING,
            drain_secs: DEFAULT_DRAIN_SECS,
            last_forecast: 0.0,
            held: RecentMax::new(DEFAULT_HOLD_SECS),
            drain_held: VecDeque::new(),
        }
    }

    /// Holds the count the forecast asks for `hold_secs` seconds (0: not at all), so a forecast
    /// that dips for a tick or two does not stop replicas that are still starting for it.
    pub fn with_hold(mut self, hold_secs: f64) -> Self {
        self.held = RecentMax::new(hold_secs);
        self
    }

    /// The last forecast demand.
    pub fn last_forecast(&self) -> f64 {
        self.last_forecast
    }

    /// Replicas (fractional) for the backlog: what clears the queue projected at the horizon,
    /// held for the horizon, and what clears the queue waiting now, held for `drain_secs`
    /// (so the replicas stay until it is cleared, instead of shrinking with it), each within
    /// `drain_secs`.
    fn drain_replicas(&mut self, now: f64, obs: &Observation) -> f64 {
        if self.drain_secs <= 0.0 || obs.capacity <= 0.0 {
            return 0.0;
        }
        let horizon = self.horizon.max(1) as f64;
        let existing = obs.replicas as f64 * obs.capacity;
        let projected = projected_queue(
            |k| self.forecaster.forecast(k),
            obs.queue,
            existing,
            self.horizon.max(1),
        );
        let per_drain = self.drain_secs * obs.capacity;
        self.drain_held
            .push_back((now + horizon, projected / per_drain));
        self.drain_held
            .push_back((now + self.drain_secs, obs.queue.max(0.0) / per_drain));
        self.drain_held.retain(|(until, _)| *until >= now);
        self.drain_held.iter().map(|(_, d)| *d).fold(0.0, f64::max)
    }
}

/// Default `smoothing`: about Knative's panic window, the shortest span a reactive
/// autoscaler sizes for.
pub const DEFAULT_SMOOTHING: usize = 7;

/// Default hold of the forecast's count: none.
pub const DEFAULT_HOLD_SECS: f64 = 0.0;

/// Default `drain_secs`: off. Clearing a backlog fast costs more replica-seconds than the
/// design's budget of 1.1× KPA's allows on most workloads (see the README's sweep).
pub const DEFAULT_DRAIN_SECS: f64 = 0.0;

/// The queue `horizon` ticks from now: `queue` now, then each tick `path(k)` arrivals against
/// `capacity` served, never below empty.
fn projected_queue(path: impl Fn(usize) -> f64, queue: f64, capacity: f64, horizon: usize) -> f64 {
    (1..=horizon).fold(queue.max(0.0), |q, k| (q + path(k) - capacity).max(0.0))
}

/// The largest centred moving average (`window` ticks) of `path(1..=horizon)`; the path is read
/// half a window past the horizon so the last averages are whole.
fn peak_of_smoothed(path: impl Fn(usize) -> f64, horizon: usize, window: usize) -> f64 {
    let half = window.max(1) / 2;
    let values: Vec<f64> = (1..=horizon + half).map(path).collect();
    (0..horizon)
        .map(|k| {
            let span = &values[k.saturating_sub(half)..=k + half];
            span.iter().sum::<f64>() / span.len() as f64
        })
        .fold(0.0, f64::max)
}

impl Policy for Predictive {
    fn name(&self) -> String {
        format!(
            "predictive ({} + {})",
            self.reactive.name(),
            self.forecaster.name()
        )
    }
    fn decide(&mut self, now: f64, obs: &Observation) -> usize {
        self.forecaster.observe(now, obs.demand);
        let reactive = self.reactive.decide(now, obs);
        // The peak forecast over the warm-up horizon, so a replica started now is ready for it.
        let forecast = peak_of_smoothed(
            |k| self.forecaster.forecast(k),
            self.horizon.max(1),
            self.smoothing,
        );
        self.last_forecast = forecast;
        let drain = self.drain_replicas(now, obs);
        let ahead = (forecast / (obs.capacity * self.target_utilisation) + drain).ceil();
        let ahead = if ahead.is_finite() && ahead > 0.0 {
            ahead as usize
        } else {
            0
        };
        let ahead = self.held.push(now, ahead);
        reactive.max(ahead).min(self.max)
    }
}

/// Tabular Q-learning: Q(s,a) ← Q(s,a) + α[r + γ·max Q(s',a') − Q(s,a)], ε-greedy with decay.
///
/// State: utilisation bucket, backlog (none, one the ready replicas clear within a second,
/// or a longer one), replicas warming or not, demand trend (falling, flat, rising). A long
/// backlog is a state of its own because capacity that only matches the demand never clears
/// it: with one "backlog" state, a learner that had met only short ones held at that
/// capacity behind a backlog it had built in a cold start, and missed the SLO for the rest
/// of the run. Actions: remove one replica, hold, add one, or match the demand
/// at 70 % utilisation (what a reactive autoscaler would do), so the learner chooses *when* to
/// act rather than rediscovering how much. Q-values start at −100: below what a state that
/// meets the SLO is worth, so there an action never tried does not look better than one that
/// was. In a state of sustained overload the values fall lower (about −500 with the
/// simulator's rewards at γ = 0.98), and there an untried action does look best. Starting
/// lower (−700, −1,000, −3,000) was tried and helped on some workloads and hurt on others.
/// While learning, a decision that changes the replica count is charged `move_cost` on top
/// of the reward it earns (0 unless set), so that moves which buy nothing are unlearned
/// instead of being as good as holding. Seeded; `freeze` stops learning and exploration for
/// evaluation.
#[derive(Debug, Clone)]
pub struct QLearning {
    /// Learning rate α.
    pub alpha: f64,
    /// Discount γ.
    pub gamma: f64,
    /// Exploration rate ε.
    pub epsilon: f64,
    /// ε is multiplied by this after each decision.
    pub epsilon_decay: f64,
    /// ε never falls below this while learning.
    pub epsilon_min: f64,
    /// Upper bound on replicas.
    pub max: usize,
    /// Charged, in learning only, for a decision that changes the replica count.
    pub move_cost: f64,
    q: Vec<[f64; ACTIONS]>,
    last: Option<(usize, usize, bool)>,
    prev_demand: f64,
    frozen: bool,
    rng: SplitMix64,
}

const ACTIONS: usize = 4;
const UTIL_BUCKETS: usize = 8;
const TRENDS: usize = 3;
const BACKLOGS: usize = 3;

impl QLearning {
    /// A fresh learner with a seed.
    pub fn new(max: usize, seed: u64) -> Self {
        QLearning {
            alpha: 0.3,
            gamma: 0.98,
            epsilon: 1.0,
            epsilon_decay: 0.9995,
            epsilon_min: 0.02,
            max,
            move_cost: 0.0,
            q: vec![[-100.0; ACTIONS]; UTIL_BUCKETS * BACKLOGS * 2 * TRENDS],
            last: None,
            prev_demand: 0.0,
            frozen: false,
            rng: SplitMix64::new(seed),
        }
    }

    /// Stops learning and exploring.
    pub fn freeze(&mut self) {
        self.frozen = true;
        self.last = None;
    }

    /// Forgets the last step (between episodes), keeping what was learned.
    pub fn reset_episode(&mut self) {
        self.last = None;
        self.prev_demand = 0.0;
    }

    fn state(&self, obs: &Observation) -> usize {
        // Utilisation of the replicas that exist (warming ones included: they are the
        // capacity already paid for), whether a backlog is waiting, and the demand trend.
        let u = if obs.replicas == 0 {
            if obs.demand > 0.0 { 10.0 } else { 0.0 }
        } else {
            obs.demand / (obs.replicas as f64 * obs.capacity)
        };
        let edges = [0.05, 0.3, 0.5, 0.65, 0.8, 0.95, 1.2];
        let ub = edges.iter().take_while(|e| u >= **e).count();
        // No backlog, one the ready replicas clear within a second, or a longer one.
        let backlog = if obs.queue <= 0.0 {
            0
        } else if obs.queue <= obs.ready as f64 * obs.capacity {
            1
        } else {
            2
        };
        let warming = usize::from(obs.ready < obs.replicas);
        let change = obs.demand - self.prev_demand;
        let tb = if change > 0.05 * self.prev_demand.max(1.0) {
            2
        } else if change < -0.05 * self.prev_demand.max(1.0) {
            0
        } else {
            1
        };
        ((ub * BACKLOGS + backlog) * 2 + warming) * TRENDS + tb
    }

    fn apply(&self, action: usize, obs: &Observation) -> usize {
        let replicas = obs.replicas;
        let next = match action {
            0 => replicas.saturating_sub(1),
            1 => replicas,
            2 => replicas + 1,
            // Match the demand at 70 % utilisation, as a reactive autoscaler would.
            _ => ((obs.demand / (obs.capacity * 0.7)).ceil() as usize).max(replicas + 1),
        };
        next.min(self.max)
    }

    fn best(&self, s: usize) -> usize {
        let row = &self.q[s];
        (0..ACTIONS).fold(1, |best, a| if row[a] > row[best] { a } else { best })
    }
}

impl Policy for QLearning {
    fn name(&self) -> String {
        "Q-learning".into()
    }
    fn decide(&mut self, _now: f64, obs: &Observation) -> usize {
        let s = self.state(obs);
        if !self.frozen
            && let Some((ps, pa, moved)) = self.last
        {
            let cost = if moved { self.move_cost } else { 0.0 };
            let target =
                obs.reward - cost + self.gamma * self.q[s].iter().copied().fold(f64::MIN, f64::max);
            self.q[ps][pa] += self.alpha * (target - self.q[ps][pa]);
        }
        let explore = !self.frozen && self.rng.next_f64() < self.epsilon;
        let action = if explore {
            (self.rng.next_u64() % ACTIONS as u64) as usize
        } else {
            self.best(s)
        };
        self.prev_demand = obs.demand;
        // Like Knative's activator: demand with no replica at all always gets one.
        let floor = usize::from(obs.demand > 0.0);
        let next = self.apply(action, obs).max(floor);
        if !self.frozen {
            self.epsilon = (self.epsilon * self.epsilon_decay).max(self.epsilon_min);
            self.last = Some((s, action, next != obs.replicas));
        }
        next
    }
}

/// A small, seeded, portable random generator (SplitMix64).
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(demand: f64, ready: usize, replicas: usize) -> Observation {
        Observation {
            demand,
            ready,
            replicas,
            capacity: 10.0,
            queue: 0.0,
            reward: 0.0,
        }
    }

    #[test]
    fn hpa_computes_the_documented_example() {
        // 50 replicas at 90 % against a 75 % target → ceil(50 · 0.9 / 0.75) = 60.
        let hpa = Hpa::new(0.75, 1, 1000);
        assert_eq!(hpa.raw_desired(50, 0.90), 60);
        // Within the 10 % tolerance nothing moves.
        assert_eq!(hpa.raw_desired(50, 0.80), 50);
    }

    #[test]
    fn hpa_scale_up_is_limited_and_scale_down_is_stabilised() {
        let mut hpa = Hpa::new(0.5, 1, 1000);
        // 2 replicas at 10× target load: limited to max(2 + 4, 2 · 2) = 6.
        assert_eq!(hpa.decide(0.0, &obs(200.0, 2, 2)), 6);
        // Between syncs the decision holds.
        assert_eq!(hpa.decide(5.0, &obs(0.0, 6, 6)), 6);
        // 15 s later, 12 replicas: load falls away, but the window remembers the high
        // recommendation, so it does not scale down for 300 s.
        assert_eq!(hpa.decide(15.0, &obs(200.0, 6, 6)), 12);
        assert_eq!(hpa.decide(30.0, &obs(10.0, 12, 12)), 12);
        assert_eq!(hpa.decide(300.0, &obs(10.0, 12, 12)), 12);
        let later = hpa.decide(330.0, &obs(10.0, 12, 12));
        assert!(
            later < 12,
            "after the stabilisation window it scales down, got {later}"
        );
    }

    #[test]
    fn kpa_panics_on_a_burst_and_leaves_after_a_stable_window() {
        let mut kpa = Kpa::new(1000);
        // Steady 14 req/s on 2 replicas of capacity 10 at 0.7 target → 2 replicas.
        for t in 0..60 {
            assert_eq!(kpa.decide(t as f64, &obs(14.0, 2, 2)), 2);
        }
        assert!(!kpa.panicking());
        // A burst to 140 req/s: the panic window sees it first.
        let d = kpa.decide(60.0, &obs(140.0, 2, 2));
        assert!(kpa.panicking(), "6 s window desired ≥ 2 × ready");
        assert!(d >= 4, "{d}");
        // While panicking it never scales down, even when the burst stops.
        let mut last = d;
        for t in 61..100 {
            let d = kpa.decide(t as f64, &obs(14.0, last, last));
            assert!(d >= last);
            last = d;
        }
        // A stable window after the last over-threshold tick, panic ends.
        for t in 100..130 {
            kpa.decide(t as f64, &obs(14.0, last, last));
        }
        assert!(!kpa.panicking());
    }

    #[test]
    fn kpa_panic_ratchets_from_what_it_asked_not_from_what_runs() {
        // 50 replicas run that the KPA did not ask for (another policy started them) when a
        // burst of 140 req/s makes it panic: it asks for the burst's 20, as Knative's
        // maxPanicPods starts from zero, not 50.
        let mut kpa = Kpa::new(1000);
        for t in 0..60 {
            kpa.decide(t as f64, &obs(14.0, 2, 2));
        }
        let d = kpa.decide(60.0, &obs(140.0, 2, 50));
        assert!(kpa.panicking());
        assert_eq!(
            d, 5,
            "ceil(panic average (5 × 14 + 140) / 6 = 35, over 7 per replica)"
        );
        // In panic it takes the larger of the stable and the panic count and keeps the
        // largest it has asked for.
        let d = kpa.decide(61.0, &obs(140.0, 5, 50));
        assert_eq!(d, 8, "ceil((4 × 14 + 2 × 140) / 6 / 7)");
        for t in 62..68 {
            assert_eq!(
                kpa.decide(t as f64, &obs(0.0, 8, 50)),
                8,
                "no scale-down in panic"
            );
        }
    }

    #[test]
    fn kpa_scales_to_zero_only_after_the_grace_period() {
        let mut kpa = Kpa::new(10);
        kpa.decide(0.0, &obs(5.0, 1, 1));
        for t in 1..90 {
            assert_eq!(kpa.decide(t as f64, &obs(0.0, 1, 1)), 1, "t = {t}");
        }
        assert_eq!(kpa.decide(91.0, &obs(0.0, 1, 1)), 0);
        // Scale-down is clamped to halving.
        let mut kpa = Kpa::new(100);
        for t in 0..60 {
            kpa.decide(t as f64, &obs(700.0, 100, 100));
        }
        assert!(
            kpa.decide(60.0, &obs(7.0, 100, 100)) >= 98,
            "still averaging the old load"
        );
        for t in 61..120 {
            kpa.decide(t as f64, &obs(7.0, 100, 100));
        }
        assert_eq!(kpa.decide(121.0, &obs(7.0, 100, 100)), 50, "floor(100 / 2)");
    }

    #[test]
    fn threshold_respects_hysteresis_and_cooldown() {
        let mut p = Threshold::new(0.8, 0.3, 30.0, 1);
        assert_eq!(p.decide(0.0, &obs(30.0, 5, 5)), 5, "between the thresholds");
        assert_eq!(p.decide(1.0, &obs(90.0, 5, 5)), 12, "ceil(90 / 8)");
        assert_eq!(p.decide(2.0, &obs(5.0, 12, 12)), 12, "cooling down");
        assert_eq!(p.decide(40.0, &obs(5.0, 12, 12)), 11);
    }

    /// A learner that never explores, with learning rate `alpha` and discount `gamma`.
    fn greedy_learner(alpha: f64, gamma: f64) -> QLearning {
        let mut q = QLearning::new(100, 7);
        q.alpha = alpha;
        q.gamma = gamma;
        q.epsilon = 0.0;
        q.epsilon_min = 0.0;
        q
    }

    #[test]
    fn q_learning_applies_its_update_rule() {
        let mut q = greedy_learner(0.5, 0.9);
        let first = obs(10.0, 2, 2);
        let s = q.state(&first);
        // All values start at −100: the greedy choice is "hold" (index 1), keeping 2 replicas.
        assert_eq!(q.decide(0.0, &first), 2);
        let second = Observation {
            reward: -2.0,
            ..first
        };
        q.decide(1.0, &second);
        // Q ← −100 + 0.5 · (−2 + 0.9 · (−100) − (−100)) = −96.
        assert!((q.q[s][1] - -96.0).abs() < 1e-12, "{}", q.q[s][1]);
        q.freeze();
        let before = q.q.clone();
        q.decide(
            2.0,
            &Observation {
                reward: -50.0,
                ..first
            },
        );
        q.decide(
            3.0,
            &Observation {
                reward: -50.0,
                ..first
            },
        );
        assert_eq!(q.q, before, "a frozen learner does not learn");
    }

    #[test]
    fn q_learning_charges_its_move_cost_only_for_moves() {
        let mut q = greedy_learner(1.0, 0.0);
        q.move_cost = 0.6;
        let first = obs(10.0, 2, 2);
        let s = q.state(&first);
        // Hold (the greedy choice when all values are equal): Q ← r.
        assert_eq!(q.decide(0.0, &first), 2);
        let held = Observation {
            reward: -2.0,
            ..first
        };
        q.decide(1.0, &held);
        assert!((q.q[s][1] - -2.0).abs() < 1e-12, "{}", q.q[s][1]);
        // Make "add one" the best action in the state, take it, and pay for it: Q ← r − 0.6.
        q.q[s][2] = 0.0;
        q.reset_episode();
        assert_eq!(q.decide(2.0, &first), 3);
        q.decide(3.0, &held);
        assert!((q.q[s][2] - -2.6).abs() < 1e-12, "{}", q.q[s][2]);
    }

    #[test]
    fn q_learning_tells_a_long_backlog_from_a_short_one() {
        let q = greedy_learner(0.5, 0.9);
        let at = |queue: f64| {
            q.state(&Observation {
                queue,
                ..obs(20.0, 2, 2)
            })
        };
        // 2 ready replicas of 10 req/s clear 20 requests within a second, not 21.
        let (none, short, long) = (at(0.0), at(20.0), at(21.0));
        assert_ne!(none, short);
        assert_ne!(short, long);
        assert_ne!(none, long);
        assert!(long < q.q.len());
    }

    #[test]
    fn the_forecast_peak_ignores_one_noisy_step_but_not_a_rise_at_the_horizon() {
        let spike = |k: usize| if k == 10 { 170.0 } else { 100.0 };
        assert_eq!(peak_of_smoothed(spike, 30, 1), 170.0);
        assert!((peak_of_smoothed(spike, 30, 7) - 110.0).abs() < 1e-9);
        // A step to 200 at the last step of the horizon: the centred window there holds the
        // step and the half window past it, 4 of 7 values.
        let step = |k: usize| if k >= 30 { 200.0 } else { 100.0 };
        let peak = peak_of_smoothed(step, 30, 7);
        assert!(
            (peak - (3.0 * 100.0 + 4.0 * 200.0) / 7.0).abs() < 1e-9,
            "{peak}"
        );
        // One step earlier, the whole window is past it.
        let step = |k: usize| if k >= 27 { 200.0 } else { 100.0 };
        assert_eq!(peak_of_smoothed(step, 30, 7), 200.0);
    }

    #[test]
    fn predictive_sizes_for_the_backlog_the_warm_up_builds() {
        struct Flat(f64);
        impl Forecaster for Flat {
            fn name(&self) -> String {
                "flat".into()
            }
            fn observe(&mut self, _t: f64, _y: f64) {}
            fn forecast(&self, _h: usize) -> f64 {
                self.0
            }
        }
        struct Fixed(usize);
        impl Policy for Fixed {
            fn name(&self) -> String {
                "fixed".into()
            }
            fn decide(&mut self, _now: f64, _obs: &Observation) -> usize {
                self.0
            }
        }
        let at = |ready, replicas, queue| Observation {
            demand: 120.0,
            ready,
            replicas,
            capacity: 20.0,
            queue,
            reward: 0.0,
        };
        let mut p = Predictive::new(Box::new(Fixed(1)), Box::new(Flat(120.0)), 30, 0.7, 1000);
        p.smoothing = 1;
        assert_eq!(p.decide(0.0, &at(1, 1, 100.0)), 9, "off: ceil(120 / 14)");
        p.drain_secs = 6.0;
        // 100 waiting, then 30 ticks of 120 arriving against one replica's 20: 3,100 when a
        // replica started now is ready; cleared in 6 s by 3100 / 120 replicas at full load.
        let first = p.decide(1.0, &at(1, 1, 100.0));
        assert_eq!(first, (120.0f64 / 14.0 + 3100.0 / 120.0).ceil() as usize);
        // Once they are starting the projection no longer asks for them; the hold keeps them.
        assert_eq!(p.decide(2.0, &at(1, first, 200.0)), first);
        assert_eq!(p.decide(31.0, &at(1, first, 3000.0)), first);
        // Ready, they are kept by the queue that waits, for as long as it takes to clear it.
        assert_eq!(p.decide(32.0, &at(first, first, 3100.0)), first);
        assert_eq!(p.decide(37.0, &at(first, first, 0.0)), first);
        assert_eq!(p.decide(39.0, &at(first, first, 0.0)), 9);
    }

    #[test]
    fn predictive_never_scales_in_on_a_forecast_alone() {
        struct Zero;
        impl Forecaster for Zero {
            fn name(&self) -> String {
                "zero".into()
            }
            fn observe(&mut self, _t: f64, _y: f64) {}
            fn forecast(&self, _h: usize) -> f64 {
                0.0
            }
        }
        let mut p = Predictive::new(Box::new(Kpa::new(100)), Box::new(Zero), 30, 0.7, 100);
        let d = p.decide(0.0, &obs(70.0, 10, 10));
        assert_eq!(
            d, 10,
            "the reactive value stands when the forecast says less"
        );
        let mut p = Predictive::new(
            Box::new(Kpa::new(100)),
            Box::new(crate::forecast::Holt::new(0.5, 0.5)),
            10,
            0.7,
            100,
        );
        let mut d = 0;
        for t in 0..20 {
            d = p.decide(t as f64, &obs(7.0 * t as f64, 10, 10));
        }
        assert!(d > 20, "a rising load is met ahead of time: {d}");
    }

    #[test]
    fn predictive_holds_the_forecasts_count_for_its_hold_time() {
        // A forecast of 70/s on the first tick, then of nothing; the reactive part asks for none.
        struct Blip(u32);
        impl Forecaster for Blip {
            fn name(&self) -> String {
                "blip".into()
            }
            fn observe(&mut self, _t: f64, _y: f64) {
                self.0 += 1;
            }
            fn forecast(&self, _h: usize) -> f64 {
                if self.0 == 1 { 70.0 } else { 0.0 }
            }
        }
        struct Nothing;
        impl Policy for Nothing {
            fn name(&self) -> String {
                "nothing".into()
            }
            fn decide(&mut self, _now: f64, _obs: &Observation) -> usize {
                0
            }
        }
        let counts = |hold: f64| {
            let mut p =
                Predictive::new(Box::new(Nothing), Box::new(Blip(0)), 5, 1.0, 100).with_hold(hold);
            p.smoothing = 1;
            (0..8)
                .map(|t| p.decide(f64::from(t), &obs(0.0, 0, 0)))
                .collect::<Vec<_>>()
        };
        // 70/s at 10/s a replica and a target of 100 %: 7 replicas.
        assert_eq!(counts(0.0), [7, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(counts(3.0), [7, 7, 7, 7, 0, 0, 0, 0]);
    }

    proptest::proptest! {
        /// The deque gives what a scan of the window gives, whatever the values and gaps.
        #[test]
        fn recent_max_is_the_max_of_its_window(
            window in 0u32..20,
            steps in proptest::collection::vec((0u32..5, 0usize..50), 1..100),
        ) {
            let mut fast = RecentMax::new(f64::from(window));
            let mut seen: Vec<(f64, usize)> = Vec::new();
            let mut now = 0.0;
            for (gap, value) in steps {
                now += f64::from(gap);
                seen.push((now, value));
                let scan = seen
                    .iter()
                    .filter(|(t, _)| now - t <= f64::from(window))
                    .map(|(_, v)| *v)
                    .max();
                proptest::prop_assert_eq!(Some(fast.push(now, value)), scan);
            }
        }
    }
}
