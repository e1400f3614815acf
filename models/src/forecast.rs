//! Forecasters of a load series, and the scores that compare them.
//!
//! Every forecaster implements [`Forecaster`]: `observe(t, y)` feeds the value of step `t`
//! (steps are consecutive; time is passed in, never read), `forecast(h)` predicts the value `h`
//! steps after the last observation. They are small, allocation-free after construction
//! (except the seasonal buffers sized at construction) and deterministic, so the agent, the
//! hub and the simulator run the very same code. [`evaluate`] scores a forecaster on a series
//! by rolling origin at a fixed horizon: MAE, RMSE, MASE (scaled by the in-sample seasonal-naive
//! MAE at the same horizon), sMAPE and the share of steps that under-forecast. Two
//! combinators build on the others: [`Bucketed`] runs a forecaster on the means of coarser
//! buckets of steps (a series recorded per hour, observed per second), [`Direct`] keeps one
//! forecaster per horizon for those that learn a single one.

use std::collections::VecDeque;

/// A one-series forecaster.
pub trait Forecaster {
    /// A short name for tables.
    fn name(&self) -> String;
    /// Feeds the value `y` observed at step `t`.
    fn observe(&mut self, t: f64, y: f64);
    /// Predicts the value `h ≥ 1` steps after the last observation.
    fn forecast(&self, h: usize) -> f64;
}

/// Naive: the last value.
#[derive(Debug, Clone, Default)]
pub struct Naive {
    last: f64,
}

impl Forecaster for Naive {
    fn name(&self) -> String {
        "naive".into()
    }
    fn observe(&mut self, _t: f64, y: f64) {
        self.last = y;
    }
    fn forecast(&self, _h: usize) -> f64 {
        self.last
    }
}

/// Seasonal naive: the value one season before the forecast step.
#[derive(Debug, Clone)]
pub struct SeasonalNaive {
    period: usize,
    history: VecDeque<f64>,
}

impl SeasonalNaive {
    /// Seasonal naive with a season of `period` steps.
    pub fn new(period: usize) -> Self {
        let period = period.max(1);
        SeasonalNaive {
            period,
            history: VecDeque::with_capacity(period),
        }
    }
}

impl Forecaster for SeasonalNaive {
    fn name(&self) -> String {
        format!("seasonal naive (m={})", self.period)
    }
    fn observe(&mut self, _t: f64, y: f64) {
        if self.history.len() == self.period {
            self.history.pop_front();
        }
        self.history.push_back(y);
    }
    fn forecast(&self, h: usize) -> f64 {
        let n = self.history.len();
        if n < self.period {
            return self.history.back().copied().unwrap_or(0.0);
        }
        // The step h ahead repeats the step k seasons earlier, inside the kept season:
        // index 0 is the oldest value (T − m + 1), index m − 1 the newest (T).
        let h = h.max(1);
        let k = h.div_ceil(self.period);
        self.history[h + self.period - 1 - k * self.period]
    }
}

/// Simple exponential smoothing: ŷ(t+1) = α·y(t) + (1−α)·ŷ(t).
#[derive(Debug, Clone)]
pub struct Ses {
    alpha: f64,
    level: Option<f64>,
}

impl Ses {
    /// SES with smoothing factor `alpha` in (0, 1].
    pub fn new(alpha: f64) -> Self {
        Ses {
            alpha: alpha.clamp(1e-6, 1.0),
            level: None,
        }
    }
}

impl Forecaster for Ses {
    fn name(&self) -> String {
        format!("SES (α={})", self.alpha)
    }
    fn observe(&mut self, _t: f64, y: f64) {
        self.level = Some(match self.level {
            None => y,
            Some(prev) => self.alpha * y + (1.0 - self.alpha) * prev,
        });
    }
    fn forecast(&self, _h: usize) -> f64 {
        self.level.unwrap_or(0.0)
    }
}

/// Holt's linear method: level and trend, optionally with a damped trend.
#[derive(Debug, Clone)]
pub struct Holt {
    alpha: f64,
    beta: f64,
    /// Trend damping φ (Gardner & McKenzie); 1 is the undamped method.
    phi: f64,
    state: Option<(f64, f64)>,
    damped_floor: bool,
}

impl Holt {
    /// Holt with level smoothing `alpha` and trend smoothing `beta`.
    pub fn new(alpha: f64, beta: f64) -> Self {
        Holt::damped(alpha, beta, 1.0)
    }

    /// Holt with a trend damped by `phi` per step: the h-step forecast is
    /// ℓ + (φ + φ² + … + φʰ)·b, so a short burst of growth is not extrapolated far.
    pub fn damped(alpha: f64, beta: f64, phi: f64) -> Self {
        Holt {
            alpha: alpha.clamp(1e-6, 1.0),
            beta: beta.clamp(0.0, 1.0),
            phi: phi.clamp(0.0, 1.0),
            state: None,
            damped_floor: true,
        }
    }
}

impl Forecaster for Holt {
    fn name(&self) -> String {
        format!("Holt (α={}, β={})", self.alpha, self.beta)
    }
    fn observe(&mut self, _t: f64, y: f64) {
        self.state = Some(match self.state {
            None => (y, 0.0),
            Some((level, trend)) => {
                let damped = self.phi * trend;
                let new_level = self.alpha * y + (1.0 - self.alpha) * (level + damped);
                let new_trend = self.beta * (new_level - level) + (1.0 - self.beta) * damped;
                (new_level, new_trend)
            }
        });
    }
    fn forecast(&self, h: usize) -> f64 {
        let (level, trend) = self.state.unwrap_or((0.0, 0.0));
        let steps: f64 = if self.phi >= 1.0 {
            h as f64
        } else {
            (1..=h).map(|k| self.phi.powi(k as i32)).sum()
        };
        let f = level + steps * trend;
        // Load cannot be negative.
        if self.damped_floor { f.max(0.0) } else { f }
    }
}

/// Additive Holt-Winters: level, trend and a season of `period` steps.
#[derive(Debug, Clone)]
pub struct HoltWinters {
    alpha: f64,
    beta: f64,
    gamma: f64,
    period: usize,
    /// The first season, collected to initialise the state.
    warmup: Vec<f64>,
    level: f64,
    trend: f64,
    season: Vec<f64>,
    /// Seasonal index of the next observation.
    phase: usize,
}

impl HoltWinters {
    /// Additive Holt-Winters with smoothing `alpha`, `beta`, `gamma` and season `period`.
    pub fn new(alpha: f64, beta: f64, gamma: f64, period: usize) -> Self {
        let period = period.max(2);
        HoltWinters {
            alpha: alpha.clamp(1e-6, 1.0),
            beta: beta.clamp(0.0, 1.0),
            gamma: gamma.clamp(0.0, 1.0),
            period,
            warmup: Vec::with_capacity(period),
            level: 0.0,
            trend: 0.0,
            season: Vec::new(),
            phase: 0,
        }
    }
}

impl Forecaster for HoltWinters {
    fn name(&self) -> String {
        format!(
            "Holt-Winters (α={}, β={}, γ={}, m={})",
            self.alpha, self.beta, self.gamma, self.period
        )
    }
    fn observe(&mut self, _t: f64, y: f64) {
        if self.season.is_empty() {
            self.warmup.push(y);
            if self.warmup.len() == self.period {
                let mean = self.warmup.iter().sum::<f64>() / self.period as f64;
                self.level = mean;
                self.trend = 0.0;
                self.season = self.warmup.iter().map(|v| v - mean).collect();
                self.phase = 0;
            }
            return;
        }
        let s = self.season[self.phase];
        let prev_level = self.level;
        self.level = self.alpha * (y - s) + (1.0 - self.alpha) * (self.level + self.trend);
        self.trend = self.beta * (self.level - prev_level) + (1.0 - self.beta) * self.trend;
        self.season[self.phase] = self.gamma * (y - self.level) + (1.0 - self.gamma) * s;
        self.phase = (self.phase + 1) % self.period;
    }
    fn forecast(&self, h: usize) -> f64 {
        if self.season.is_empty() {
            return self.warmup.last().copied().unwrap_or(0.0);
        }
        let idx = (self.phase + h - 1) % self.period;
        (self.level + h as f64 * self.trend + self.season[idx]).max(0.0)
    }
}

/// Linear regression on lagged values and time, h(x) = θ0 + Σ θi·xi, trained online by
/// stochastic gradient descent on J(θ) = 1/(2m)·Σ (h(x) − y)².
///
/// Features are standardised with running means and variances; the target is predicted
/// `horizon` steps ahead directly (one model per horizon). The learning rate cannot diverge
/// silently: an update that would make the loss non-finite or grow it a hundredfold is refused,
/// the rate halves, and [`OnlineLinear::rate_cuts`] counts it.
#[derive(Debug, Clone)]
pub struct OnlineLinear {
    lags: Vec<usize>,
    horizon: usize,
    rate: f64,
    theta: Vec<f64>,
    history: VecDeque<f64>,
    stats: Vec<Welford>,
    target: Welford,
    pending: VecDeque<Vec<f64>>,
    last_t: f64,
    rate_cuts: u64,
    loss_ewma: Option<f64>,
}

#[derive(Debug, Clone, Copy, Default)]
struct Welford {
    n: f64,
    mean: f64,
    m2: f64,
}

impl Welford {
    fn push(&mut self, x: f64) {
        self.n += 1.0;
        let d = x - self.mean;
        self.mean += d / self.n;
        self.m2 += d * (x - self.mean);
    }
    fn std(&self) -> f64 {
        if self.n < 2.0 {
            1.0
        } else {
            (self.m2 / (self.n - 1.0)).sqrt().max(1e-9)
        }
    }
    fn scale(&self, x: f64) -> f64 {
        (x - self.mean) / self.std()
    }
}

impl OnlineLinear {
    /// Regression on the values `lags` steps back (1 = the last value) and on time, predicting
    /// `horizon` steps ahead, with learning rate `rate`.
    pub fn new(lags: &[usize], horizon: usize, rate: f64) -> Self {
        let features = lags.len() + 1;
        OnlineLinear {
            lags: lags.to_vec(),
            horizon: horizon.max(1),
            rate,
            theta: vec![0.0; features + 1],
            history: VecDeque::with_capacity(lags.iter().copied().max().unwrap_or(1)),
            stats: vec![Welford::default(); features],
            target: Welford::default(),
            pending: VecDeque::new(),
            last_t: 0.0,
            rate_cuts: 0,
            loss_ewma: None,
        }
    }

    /// How often the learning rate was halved to stop divergence.
    pub fn rate_cuts(&self) -> u64 {
        self.rate_cuts
    }

    /// The current learning rate.
    pub fn rate(&self) -> f64 {
        self.rate
    }

    fn raw_features(&self, t: f64) -> Option<Vec<f64>> {
        let n = self.history.len();
        let mut x = Vec::with_capacity(self.lags.len() + 1);
        for &lag in &self.lags {
            if lag == 0 || lag > n {
                return None;
            }
            x.push(self.history[n - lag]);
        }
        x.push(t);
        Some(x)
    }

    fn predict_scaled(&self, raw: &[f64]) -> f64 {
        let mut y = self.theta[0];
        for (i, (x, s)) in raw.iter().zip(&self.stats).enumerate() {
            y += self.theta[i + 1] * s.scale(*x);
        }
        y
    }
}

impl Forecaster for OnlineLinear {
    fn name(&self) -> String {
        format!("linear SGD (lags {:?}, h={})", self.lags, self.horizon)
    }

    fn observe(&mut self, t: f64, y: f64) {
        // Train on the example whose target arrives now: features from `horizon` steps ago.
        self.target.push(y);
        if self.pending.len() == self.horizon
            && let Some(raw) = self.pending.pop_front()
        {
            let target = self.target.scale(y);
            let err = self.predict_scaled(&raw) - target;
            let loss = 0.5 * err * err;
            let diverging =
                !loss.is_finite() || self.loss_ewma.is_some_and(|l| loss > 100.0 * l.max(1.0));
            if diverging {
                self.rate *= 0.5;
                self.rate_cuts += 1;
            } else {
                self.loss_ewma = Some(self.loss_ewma.map_or(loss, |l| 0.99 * l + 0.01 * loss));
                let mut grad = Vec::with_capacity(self.theta.len());
                grad.push(err);
                for (x, s) in raw.iter().zip(&self.stats) {
                    grad.push(err * s.scale(*x));
                }
                for (theta, g) in self.theta.iter_mut().zip(grad) {
                    *theta -= self.rate * g;
                }
            }
        }
        let keep = self.lags.iter().copied().max().unwrap_or(1);
        if self.history.len() == keep {
            self.history.pop_front();
        }
        self.history.push_back(y);
        self.last_t = t;
        if let Some(raw) = self.raw_features(t) {
            for (s, x) in self.stats.iter_mut().zip(&raw) {
                s.push(*x);
            }
            self.pending.push_back(raw);
            // Only the example `horizon` steps old is ever trained on.
            while self.pending.len() > self.horizon {
                self.pending.pop_front();
            }
        }
    }

    fn forecast(&self, _h: usize) -> f64 {
        let Some(raw) = self.raw_features(self.last_t) else {
            return self.history.back().copied().unwrap_or(0.0);
        };
        let scaled = self.predict_scaled(&raw);
        (self.target.mean + scaled * self.target.std()).max(0.0)
    }
}

/// A forecaster run on a coarser step: the mean of every `width` observations is one
/// observation of `inner`, and `forecast(h)` asks `inner` for the bucket that the step `h`
/// ahead falls in.
///
/// A demand series that is recorded per bucket (an hourly count, a per-minute rate) is best
/// forecast at that resolution: its seasons and lags are whole buckets, and the averaging
/// removes the arrival noise of the fine steps the policies observe.
#[derive(Debug, Clone)]
pub struct Bucketed<F> {
    width: usize,
    inner: F,
    sum: f64,
    count: usize,
    /// Step of the first observation of the current bucket.
    start: f64,
}

impl<F: Forecaster> Bucketed<F> {
    /// Feeds `inner` the mean of every `width` consecutive observations.
    pub fn new(width: usize, inner: F) -> Self {
        Bucketed {
            width: width.max(1),
            inner,
            sum: 0.0,
            count: 0,
            start: 0.0,
        }
    }
}

impl<F> Bucketed<F> {
    /// The bucket the step `h` ahead lies in, counted from the last complete one.
    fn ahead(&self, h: usize) -> usize {
        (self.count + h.max(1) - 1) / self.width + 1
    }
}

impl<F: Forecaster> Forecaster for Bucketed<F> {
    fn name(&self) -> String {
        format!("{} per {} steps", self.inner.name(), self.width)
    }
    fn observe(&mut self, t: f64, y: f64) {
        if self.count == 0 {
            self.start = t;
        }
        self.sum += y;
        self.count += 1;
        if self.count == self.width {
            let bucket = (self.start / self.width as f64).floor();
            self.inner.observe(bucket, self.sum / self.width as f64);
            self.sum = 0.0;
            self.count = 0;
        }
    }
    fn forecast(&self, h: usize) -> f64 {
        self.inner.forecast(self.ahead(h))
    }
}

/// Direct multi-step forecasting: one forecaster per horizon, `forecast(h)` asks the one
/// trained for `h` (the last one beyond their count). Suits forecasters that, like
/// [`OnlineLinear`], learn a single horizon.
pub struct Direct {
    per_horizon: Vec<Box<dyn Forecaster + Send>>,
}

impl Direct {
    /// `make(h)` builds the forecaster for horizon `h`, for `h` in `1..=horizons`.
    pub fn new(horizons: usize, make: impl Fn(usize) -> Box<dyn Forecaster + Send>) -> Self {
        Direct {
            per_horizon: (1..=horizons.max(1)).map(make).collect(),
        }
    }

    fn for_horizon(&self, h: usize) -> &(dyn Forecaster + Send) {
        self.per_horizon[h.clamp(1, self.per_horizon.len()) - 1].as_ref()
    }
}

impl Forecaster for Direct {
    fn name(&self) -> String {
        let first = self
            .per_horizon
            .first()
            .map(|f| f.name())
            .unwrap_or_default();
        format!("direct ×{} ({first}, …)", self.per_horizon.len())
    }
    fn observe(&mut self, t: f64, y: f64) {
        for f in &mut self.per_horizon {
            f.observe(t, y);
        }
    }
    fn forecast(&self, h: usize) -> f64 {
        self.for_horizon(h).forecast(h)
    }
}

/// Forecast accuracy on one series at one horizon.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scores {
    /// Mean absolute error.
    pub mae: f64,
    /// Root mean squared error.
    pub rmse: f64,
    /// MAE divided by the in-sample MAE of seasonal naive at the same horizon.
    pub mase: f64,
    /// Symmetric mean absolute percentage error, percent.
    pub smape: f64,
    /// Share of steps where the forecast was below the actual value.
    pub under_share: f64,
}

/// Scores `forecaster` on `series` by rolling origin: after each observation from step
/// `warmup` on, forecast `horizon` steps ahead and compare with what came.
pub fn evaluate(
    forecaster: &mut dyn Forecaster,
    series: &[f64],
    horizon: usize,
    period: usize,
    warmup: usize,
) -> Scores {
    let horizon = horizon.max(1);
    let (mut abs, mut sq, mut smape, mut under, mut n) = (0.0, 0.0, 0.0, 0usize, 0usize);
    for (t, &y) in series.iter().enumerate() {
        forecaster.observe(t as f64, y);
        if t < warmup || t + horizon >= series.len() {
            continue;
        }
        let f = forecaster.forecast(horizon);
        let actual = series[t + horizon];
        let e = f - actual;
        abs += e.abs();
        sq += e * e;
        let denom = f.abs() + actual.abs();
        if denom > 0.0 {
            smape += 2.0 * e.abs() / denom;
        }
        if f < actual {
            under += 1;
        }
        n += 1;
    }
    let n_f = n.max(1) as f64;
    let mae = abs / n_f;
    Scores {
        mae,
        rmse: (sq / n_f).sqrt(),
        mase: mae / seasonal_naive_mae(series, period, horizon),
        smape: 100.0 * smape / n_f,
        under_share: under as f64 / n_f,
    }
}

/// In-sample MAE of the seasonal naive forecast at `horizon`: the mean of |y(t) − y(t − k)| with
/// k the smallest multiple of `period` that is at least `horizon`.
pub fn seasonal_naive_mae(series: &[f64], period: usize, horizon: usize) -> f64 {
    let period = period.max(1);
    let k = horizon.div_ceil(period).max(1) * period;
    if series.len() <= k {
        return f64::NAN;
    }
    let sum: f64 = series.windows(k + 1).map(|w| (w[k] - w[0]).abs()).sum();
    sum / (series.len() - k) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ses_follows_its_recurrence_step_by_step() {
        let mut f = Ses::new(0.5);
        f.observe(0.0, 10.0);
        assert_eq!(f.forecast(1), 10.0);
        f.observe(1.0, 20.0);
        assert_eq!(f.forecast(1), 15.0); // 0.5·20 + 0.5·10
        f.observe(2.0, 5.0);
        assert_eq!(f.forecast(1), 10.0); // 0.5·5 + 0.5·15
        assert_eq!(f.forecast(7), 10.0, "SES is flat beyond one step");
    }

    #[test]
    fn a_damped_trend_extrapolates_less_and_phi_one_is_plain_holt() {
        let mut plain = Holt::new(0.5, 0.3);
        let mut one = Holt::damped(0.5, 0.3, 1.0);
        let mut damped = Holt::damped(0.5, 0.3, 0.8);
        for t in 0..50 {
            let y = 10.0 + 2.0 * t as f64;
            plain.observe(t as f64, y);
            one.observe(t as f64, y);
            damped.observe(t as f64, y);
        }
        assert_eq!(plain.forecast(4), one.forecast(4));
        let last = 10.0 + 2.0 * 49.0;
        assert!(damped.forecast(4) > last && damped.forecast(4) < plain.forecast(4));
        // The damped trend levels off: far horizons add less and less.
        let gain = |h: usize| damped.forecast(h + 1) - damped.forecast(h);
        assert!(gain(20) < 0.1 * gain(1));
    }

    #[test]
    fn holt_extrapolates_a_clean_trend() {
        let mut f = Holt::new(0.8, 0.5);
        for t in 0..50 {
            f.observe(t as f64, 2.0 * t as f64 + 3.0);
        }
        let want = 2.0 * 53.0 + 3.0;
        assert!((f.forecast(4) - want).abs() < 1e-3, "{}", f.forecast(4));
    }

    #[test]
    fn holt_winters_learns_a_pure_season() {
        let season = [1.0, 5.0, 9.0, 5.0];
        let mut f = HoltWinters::new(0.3, 0.05, 0.3, 4);
        for t in 0..80 {
            f.observe(t as f64, 10.0 + season[t % 4]);
        }
        // Next step is t = 80, phase 0.
        for h in 1..=4 {
            let want = 10.0 + season[(79 + h) % 4];
            assert!(
                (f.forecast(h) - want).abs() < 1e-6,
                "h={h}: {} vs {want}",
                f.forecast(h)
            );
        }
    }

    #[test]
    fn seasonal_naive_repeats_the_last_season() {
        let mut f = SeasonalNaive::new(3);
        for (t, y) in [1.0, 2.0, 3.0, 4.0, 5.0, 6.0].iter().enumerate() {
            f.observe(t as f64, *y);
        }
        assert_eq!(f.forecast(1), 4.0);
        assert_eq!(f.forecast(2), 5.0);
        assert_eq!(f.forecast(3), 6.0);
        assert_eq!(f.forecast(4), 4.0);
    }

    #[test]
    fn online_regression_learns_a_linear_law_and_survives_a_wild_rate() {
        // y(t) = 0.5·y(t-1) + 10: the fixed point is 20.
        let mut f = OnlineLinear::new(&[1], 1, 0.05);
        let mut y = 0.0;
        for t in 0..3000 {
            f.observe(t as f64, y);
            y = 0.5 * y + 10.0 + if t % 2 == 0 { 1.0 } else { -1.0 };
        }
        assert!((f.forecast(1) - 20.0).abs() < 1.5, "{}", f.forecast(1));

        let mut wild = OnlineLinear::new(&[1, 2], 1, 1e6);
        for t in 0..500 {
            wild.observe(t as f64, (t % 7) as f64);
        }
        assert!(wild.forecast(1).is_finite());
        assert!(wild.rate_cuts() > 0, "a diverging rate is cut, and counted");
    }

    #[test]
    fn scores_match_hand_computed_values() {
        // Naive at horizon 1 on 1,2,4,8: forecasts 1,2,4 for 2,4,8.
        let series = [1.0, 2.0, 4.0, 8.0];
        let s = evaluate(&mut Naive::default(), &series, 1, 1, 0);
        assert!((s.mae - (1.0 + 2.0 + 4.0) / 3.0).abs() < 1e-12);
        assert!((s.rmse - ((1.0 + 4.0 + 16.0) / 3.0f64).sqrt()).abs() < 1e-12);
        assert_eq!(s.under_share, 1.0);
        // Naive is seasonal naive with m = 1, so its MASE is 1.
        assert!((s.mase - 1.0).abs() < 1e-12);
        let smape = 100.0 * (2.0 / 3.0 + 4.0 / 6.0 + 8.0 / 12.0) / 3.0;
        assert!((s.smape - smape).abs() < 1e-9);
    }

    /// Remembers what it was fed; forecasts `100·h + the last value`, so a test can read which
    /// inner horizon a wrapper asked for.
    #[derive(Default)]
    struct Probe {
        seen: Vec<(f64, f64)>,
    }

    impl Forecaster for Probe {
        fn name(&self) -> String {
            "probe".into()
        }
        fn observe(&mut self, t: f64, y: f64) {
            self.seen.push((t, y));
        }
        fn forecast(&self, h: usize) -> f64 {
            100.0 * h as f64 + self.seen.last().map_or(0.0, |s| s.1)
        }
    }

    #[test]
    fn bucketed_feeds_bucket_means_and_maps_the_horizon_to_buckets() {
        let mut f = Bucketed::new(3, Probe::default());
        for (t, y) in [1.0, 2.0, 3.0, 10.0, 20.0, 30.0, 7.0]
            .into_iter()
            .enumerate()
        {
            f.observe(t as f64, y);
        }
        // Two whole buckets (means 2 and 20, bucket steps 0 and 1); 7 waits in the third.
        assert_eq!(f.inner.seen, vec![(0.0, 2.0), (1.0, 20.0)]);
        // One step of the third bucket seen: steps 1–2 ahead finish it, 3–5 are the next one.
        assert_eq!(f.forecast(1), 120.0);
        assert_eq!(f.forecast(2), 120.0);
        assert_eq!(f.forecast(3), 220.0);
        assert_eq!(f.forecast(5), 220.0);
        assert_eq!(f.forecast(6), 320.0);
    }

    #[test]
    fn direct_asks_the_forecaster_of_each_horizon() {
        let mut f = Direct::new(2, |h| {
            Box::new(OnlineLinear::new(&[1], h, 0.05)) as Box<dyn Forecaster + Send>
        });
        // y alternates 0, 10: one step ahead is the other value, two steps ahead the same one.
        for t in 0..4000 {
            f.observe(t as f64, if t % 2 == 0 { 0.0 } else { 10.0 });
        }
        // The last value was 10.
        assert!(f.forecast(1) < 1.0, "{}", f.forecast(1));
        assert!(f.forecast(2) > 9.0, "{}", f.forecast(2));
        assert!(
            f.forecast(7) > 9.0,
            "beyond the last horizon the last model answers"
        );
    }
}
