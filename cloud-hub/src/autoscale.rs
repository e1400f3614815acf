//! How many replicas a model gets: the replicas' measured load, raised to what the agents'
//! own forecasts say is coming.
//!
//! Pure: each tick the replica manager passes in the time and what it measured, and gets a
//! [`Decision`] with every input that led to it. The reactive part is Knative's KPA from
//! `models::policy` on the request rate the replicas see (stable and panic windows, scale-down
//! clamped to half, scale to zero after `stable + grace` seconds without traffic). The
//! predictive part is the sum of the agents' forecast offload demand: replicas for it start
//! before the burst reaches the cloud, so the cold start is hidden. As in
//! `models::policy::Predictive`, the forecast only ever raises the count, and it holds off the
//! scale to zero while any agent still expects to spill.

use models::policy::{Kpa, Observation, Policy, RecentMax};
use serde::Serialize;

/// Bounds and timings of one model's scaling.
#[derive(Debug, Clone, PartialEq)]
pub struct ScalerSettings {
    /// Fewest replicas (0 allows scale to zero).
    pub min: usize,
    /// Most replicas.
    pub max: usize,
    /// Share of a replica's capacity the count aims at.
    pub target_utilisation: f64,
    /// The KPA's stable window, seconds (its panic window is a tenth of it).
    pub stable_secs: f64,
    /// Seconds without traffic or forecast demand, after the stable window, before the last
    /// replica goes.
    pub idle_secs: f64,
    /// Requests per second one replica serves until it has been measured.
    pub default_capacity: f64,
    /// Whether the agents' demand input is their forecast (true) or only the load they cannot
    /// serve now (false: a reactive autoscaler whose activator sees the overflow, as Knative's
    /// does; without it nothing would ever scale from zero).
    pub predictive: bool,
}

impl Default for ScalerSettings {
    fn default() -> Self {
        ScalerSettings {
            min: 0,
            max: 8,
            target_utilisation: 0.7,
            stable_secs: 60.0,
            idle_secs: 30.0,
            default_capacity: 100.0,
            predictive: true,
        }
    }
}

/// What the manager measured this tick.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ScaleInput {
    /// Requests per second that reached the model's replicas.
    pub measured_rate: f64,
    /// Requests waiting at the replicas.
    pub queued: f64,
    /// Windows per second the agents want from the replicas: at their forecast horizon
    /// (predictive) or now (reactive).
    pub forecast_demand: f64,
    /// Replicas ready to serve.
    pub ready: usize,
    /// Replicas that exist, ready or starting.
    pub replicas: usize,
    /// Measured requests per second one replica serves, if known.
    pub capacity: Option<f64>,
}

/// One decision, with what led to it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    /// Seconds since the scaler started.
    pub at_secs: f64,
    /// The inputs.
    pub input: ScaleInput,
    /// Capacity per replica used.
    pub capacity: f64,
    /// What the KPA wants from the measured rate.
    pub reactive: usize,
    /// What the forecast demand needs.
    pub predictive: usize,
    /// The count to run.
    pub desired: usize,
    /// Why, in words.
    pub reason: String,
}

/// One model's scaler.
#[derive(Debug, Clone)]
pub struct Scaler {
    settings: ScalerSettings,
    kpa: Kpa,
    /// Last time any demand (measured or forecast) was seen.
    last_demand: Option<f64>,
    /// Recent forecast-driven counts, for the scale-in stabilisation.
    recent: RecentMax,
}

impl Scaler {
    /// A scaler with `settings`.
    pub fn new(settings: ScalerSettings) -> Scaler {
        let mut kpa = Kpa::new(settings.max);
        kpa.target_utilisation = settings.target_utilisation;
        kpa.stable_secs = settings.stable_secs;
        kpa.panic_secs = (settings.stable_secs / 10.0).max(1.0);
        kpa.zero_grace_secs = settings.idle_secs;
        Scaler {
            kpa,
            last_demand: None,
            recent: RecentMax::new(settings.stable_secs),
            settings,
        }
    }

    /// The settings.
    pub fn settings(&self) -> &ScalerSettings {
        &self.settings
    }

    /// The count to run at `now` (seconds) given `input`.
    pub fn decide(&mut self, now: f64, input: ScaleInput) -> Decision {
        let s = &self.settings;
        let capacity = input
            .capacity
            .filter(|c| c.is_finite() && *c > 0.0)
            .unwrap_or(s.default_capacity);
        let reactive = self.kpa.decide(
            now,
            &Observation {
                demand: input.measured_rate,
                ready: input.ready,
                replicas: input.replicas,
                capacity,
                queue: input.queued,
                reward: 0.0,
            },
        );
        let per_replica = capacity * s.target_utilisation;
        let forecast = input.forecast_demand;
        let predictive = if forecast > 0.0 {
            (forecast / per_replica).ceil() as usize
        } else {
            0
        };
        if input.measured_rate > 0.0 || forecast > 0.0 || input.queued > 0.0 {
            self.last_demand = Some(now);
        }
        // The forecast's count holds for the stable window (as Kubernetes' scale-down
        // stabilisation does): a forecast that dips for a tick must not stop replicas that
        // are still starting for it. The KPA has its own windows for the measured load.
        let held = self.recent.push(now, predictive);
        let mut desired = reactive.max(held);
        let idle_for = self.last_demand.map_or(f64::INFINITY, |t| now - t);
        let reason = if predictive > reactive {
            format!(
                "agents {} {:.1}/s for the replicas: {predictive} at {:.0} % of {capacity:.0}/s each",
                if s.predictive { "forecast" } else { "overflow" },
                input.forecast_demand,
                s.target_utilisation * 100.0
            )
        } else if held > reactive {
            format!(
                "holding {held} for the agents' forecast of the last {:.0} s",
                s.stable_secs
            )
        } else if desired == 0 && input.replicas > 0 {
            format!("no demand for {idle_for:.0} s: scale to zero")
        } else {
            format!(
                "replicas see {:.1}/s: {reactive} at {:.0} % of {capacity:.0}/s each",
                input.measured_rate,
                s.target_utilisation * 100.0
            )
        };
        // While anyone expects to spill, keep at least one replica warm.
        if forecast > 0.0 {
            desired = desired.max(1);
        }
        desired = desired.clamp(s.min, s.max.max(s.min));
        Decision {
            at_secs: now,
            input,
            capacity,
            reactive,
            predictive,
            desired,
            reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> ScalerSettings {
        ScalerSettings {
            min: 0,
            max: 6,
            target_utilisation: 0.7,
            stable_secs: 10.0,
            idle_secs: 5.0,
            default_capacity: 100.0,
            predictive: true,
        }
    }

    fn input(measured: f64, forecast: f64, ready: usize) -> ScaleInput {
        ScaleInput {
            measured_rate: measured,
            queued: 0.0,
            forecast_demand: forecast,
            ready,
            replicas: ready,
            capacity: None,
        }
    }

    #[test]
    fn a_forecast_starts_replicas_before_any_request_reaches_the_cloud() {
        let mut scaler = Scaler::new(settings());
        assert_eq!(scaler.decide(0.0, input(0.0, 0.0, 0)).desired, 0);
        let d = scaler.decide(1.0, input(0.0, 150.0, 0));
        assert_eq!(d.predictive, 3, "150/s at 70 % of 100/s");
        assert_eq!(d.desired, 3);
        assert!(d.reason.contains("forecast"), "{}", d.reason);
        // The forecast dips for a tick: the replicas starting for it stay.
        assert_eq!(scaler.decide(2.0, input(0.0, 0.0, 0)).desired, 3);
    }

    #[test]
    fn measured_load_scales_out_and_silence_scales_to_zero_after_the_idle_time() {
        let mut scaler = Scaler::new(settings());
        let mut t = 0.0;
        let mut desired = 0;
        for _ in 0..5 {
            desired = scaler.decide(t, input(200.0, 0.0, desired.max(1))).desired;
            t += 1.0;
        }
        assert!(desired >= 3, "200/s needs 3 at 70 %: {desired}");
        let mut zero_at = None;
        for _ in 0..40 {
            let d = scaler.decide(t, input(0.0, 0.0, desired));
            desired = d.desired;
            if desired == 0 && zero_at.is_none() {
                zero_at = Some(t);
            }
            t += 1.0;
        }
        let zero_at = zero_at.expect("scaled to zero");
        // The last request was at t = 4; the KPA waits its stable window plus the grace.
        assert!(
            (4.0 + 10.0..=4.0 + 10.0 + 5.0 + 1.0).contains(&zero_at),
            "{zero_at}"
        );
    }

    #[test]
    fn the_forecast_never_lowers_and_bounds_hold() {
        let mut scaler = Scaler::new(settings());
        for t in 0..5 {
            let d = scaler.decide(f64::from(t), input(400.0, 10.0, 6));
            assert!(d.desired >= d.reactive.min(6));
            assert!(d.desired <= 6);
        }
        let d = scaler.decide(6.0, input(0.0, 10_000.0, 6));
        assert_eq!(d.desired, 6, "max holds");
    }

    #[test]
    fn a_reactive_scaler_says_it_scales_on_overflow() {
        let mut scaler = Scaler::new(ScalerSettings {
            predictive: false,
            ..settings()
        });
        let d = scaler.decide(1.0, input(0.0, 150.0, 0));
        assert_eq!(d.desired, 3);
        assert!(d.reason.contains("overflow"), "{}", d.reason);
    }
}
