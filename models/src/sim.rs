//! A deterministic simulator that scores scaling policies on a workload.
//!
//! Time advances in ticks of one second. Each tick, requests arrive (Poisson around the
//! workload's rate, from a seeded generator), join a FIFO queue, and are served by the ready
//! replicas, each serving `capacity` requests per second; a replica is ready `warmup_secs`
//! after it is started (a cold start). A request's latency is its wait in whole ticks plus its
//! service time, so anything not served in the tick it arrived misses a sub-second SLO, and
//! requests that wait longer than `max_wait_secs` are dropped (counted over the SLO). The policy
//! sees the last tick's observation and its reward and sets the replica count for the next.
//!
//! Nothing reads a clock or touches a file: the same seed and inputs give the same
//! [`Outcome`], bit for bit.

use std::collections::VecDeque;

use crate::policy::{Observation, Policy, SplitMix64};

/// The simulated cloud.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SimConfig {
    /// Requests per second one replica serves.
    pub capacity: f64,
    /// Seconds from start to ready.
    pub warmup_secs: usize,
    /// Latency objective, seconds.
    pub slo_secs: f64,
    /// Requests waiting longer are dropped.
    pub max_wait_secs: usize,
    /// Replica bounds.
    pub min_replicas: usize,
    /// Replica bounds.
    pub max_replicas: usize,
    /// Replicas (ready) at the start.
    pub initial_replicas: usize,
    /// Reward weight of the share of a tick's requests over the SLO.
    pub slo_weight: f64,
    /// Reward weight of one replica for one second.
    pub replica_cost: f64,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            capacity: 20.0,
            warmup_secs: 30,
            slo_secs: 0.5,
            max_wait_secs: 30,
            min_replicas: 0,
            max_replicas: 200,
            initial_replicas: 1,
            slo_weight: 10.0,
            replica_cost: 0.02,
        }
    }
}

/// What one run produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// Ticks in which more than 1 % of the requests served or dropped missed the SLO.
    pub slo_violation_secs: u64,
    /// Share of all requests over the SLO (dropped ones included).
    pub over_slo_share: f64,
    /// Median latency, seconds.
    pub p50: f64,
    /// 99th percentile latency, seconds (dropped requests count as `max_wait_secs`).
    pub p99: f64,
    /// Replicas (ready or warming) summed over ticks.
    pub replica_secs: f64,
    /// Replica-seconds of ready capacity beyond what the demand needed.
    pub over_provisioned: f64,
    /// Replica-seconds of capacity missing for the demand.
    pub under_provisioned: f64,
    /// Changes of the replica count.
    pub scaling_actions: u64,
    /// Changes whose direction differs from the previous change.
    pub reversals: u64,
    /// Replicas started.
    pub cold_starts: u64,
    /// Sum of the per-tick rewards.
    pub reward: f64,
    /// Requests that arrived.
    pub requests: f64,
    /// Per tick: demand, ready capacity (req/s), replicas, mean latency of requests served.
    pub trace: Vec<TraceRow>,
}

/// One tick of a run, for plots.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TraceRow {
    /// Requests arrived.
    pub demand: f64,
    /// Ready capacity, requests per second.
    pub capacity: f64,
    /// Replicas that exist.
    pub replicas: usize,
    /// Mean latency of requests served this tick, seconds.
    pub latency: f64,
}

/// Draws a Poisson count with mean `lambda`.
pub fn poisson(rng: &mut SplitMix64, lambda: f64) -> f64 {
    if lambda <= 0.0 {
        return 0.0;
    }
    if lambda < 30.0 {
        // Knuth's method.
        let limit = (-lambda).exp();
        let mut k = 0.0;
        let mut p = 1.0;
        loop {
            p *= rng.next_f64();
            if p <= limit {
                return k;
            }
            k += 1.0;
        }
    }
    // Normal approximation (Box–Muller), good for large means.
    let u1 = rng.next_f64().max(f64::MIN_POSITIVE);
    let u2 = rng.next_f64();
    let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
    (lambda + z * lambda.sqrt()).round().max(0.0)
}

/// Runs `policy` over `rates` (mean requests per second, one per tick) with `seed`.
pub fn simulate(rates: &[f64], policy: &mut dyn Policy, config: &SimConfig, seed: u64) -> Outcome {
    let mut rng = SplitMix64::new(seed ^ 0x5EED_0F5E_ED00_0001);
    let service = 1.0 / config.capacity;
    // Start times of replicas, oldest first; the initial ones are ready.
    let ready_at_start = -(config.warmup_secs as i64);
    let mut replicas: Vec<i64> = vec![ready_at_start; config.initial_replicas];
    let mut queue: VecDeque<(usize, f64)> = VecDeque::new();
    let mut latencies: Vec<(f64, f64)> = Vec::new();
    let mut out = Outcome {
        slo_violation_secs: 0,
        over_slo_share: 0.0,
        p50: 0.0,
        p99: 0.0,
        replica_secs: 0.0,
        over_provisioned: 0.0,
        under_provisioned: 0.0,
        scaling_actions: 0,
        reversals: 0,
        cold_starts: 0,
        reward: 0.0,
        requests: 0.0,
        trace: Vec::with_capacity(rates.len()),
    };
    let mut over_slo = 0.0;
    let mut last_direction = 0i8;
    for (tick, &rate) in rates.iter().enumerate() {
        let now = tick as i64;
        let arrivals = poisson(&mut rng, rate.max(0.0));
        out.requests += arrivals;
        if arrivals > 0.0 {
            queue.push_back((tick, arrivals));
        }
        let ready = replicas
            .iter()
            .filter(|s| now - **s >= config.warmup_secs as i64)
            .count();
        let mut budget = ready as f64 * config.capacity;
        let (mut tick_total, mut tick_over, mut tick_latency) = (0.0, 0.0, 0.0);
        // Serve FIFO.
        while budget > 0.0 {
            let Some((arrived, count)) = queue.front_mut() else {
                break;
            };
            let take = count.min(budget);
            let latency = (tick - *arrived) as f64 + service;
            latencies.push((latency, take));
            tick_total += take;
            tick_latency += take * latency;
            if latency > config.slo_secs {
                tick_over += take;
            }
            budget -= take;
            *count -= take;
            if *count <= 0.0 {
                queue.pop_front();
            }
        }
        // Drop what waited too long.
        while queue
            .front()
            .is_some_and(|(a, _)| tick - a >= config.max_wait_secs)
        {
            if let Some((_, count)) = queue.pop_front() {
                latencies.push((config.max_wait_secs as f64, count));
                tick_total += count;
                tick_over += count;
            }
        }
        over_slo += tick_over;
        if tick_total > 0.0 && tick_over / tick_total > 0.01 {
            out.slo_violation_secs += 1;
        }
        let waiting: f64 = queue.iter().map(|(_, c)| c).sum();
        let needed = (arrivals / config.capacity).ceil();
        out.over_provisioned += (ready as f64 - needed).max(0.0);
        out.under_provisioned += (needed - ready as f64).max(0.0);
        out.replica_secs += replicas.len() as f64;
        let share_over = if tick_total > 0.0 {
            tick_over / tick_total
        } else {
            0.0
        };
        let reward = -config.slo_weight * share_over - config.replica_cost * replicas.len() as f64;
        out.reward += reward;
        out.trace.push(TraceRow {
            demand: arrivals,
            capacity: ready as f64 * config.capacity,
            replicas: replicas.len(),
            latency: if tick_total > 0.0 {
                tick_latency / tick_total
            } else {
                0.0
            },
        });

        let obs = Observation {
            demand: arrivals,
            ready,
            replicas: replicas.len(),
            capacity: config.capacity,
            queue: waiting,
            reward,
        };
        let desired = policy
            .decide(tick as f64, &obs)
            .clamp(config.min_replicas, config.max_replicas);
        let current = replicas.len();
        if desired != current {
            out.scaling_actions += 1;
            let direction = if desired > current { 1 } else { -1 };
            if last_direction != 0 && direction != last_direction {
                out.reversals += 1;
            }
            last_direction = direction;
        }
        if desired > current {
            out.cold_starts += (desired - current) as u64;
            replicas.extend(std::iter::repeat_n(now + 1, desired - current));
        } else {
            // Stop the youngest first: warming replicas go before ready ones.
            replicas.truncate(desired);
        }
    }
    out.over_slo_share = if out.requests > 0.0 {
        over_slo / out.requests
    } else {
        0.0
    };
    latencies.sort_by(|a, b| a.0.total_cmp(&b.0));
    out.p50 = weighted_quantile(&latencies, 0.5);
    out.p99 = weighted_quantile(&latencies, 0.99);
    out
}

fn weighted_quantile(sorted: &[(f64, f64)], q: f64) -> f64 {
    let total: f64 = sorted.iter().map(|(_, w)| w).sum();
    if total <= 0.0 {
        return 0.0;
    }
    let mut acc = 0.0;
    for (v, w) in sorted {
        acc += w;
        if acc >= q * total {
            return *v;
        }
    }
    sorted.last().map_or(0.0, |(v, _)| *v)
}

/// The synthetic workloads, each `len` ticks of mean request rates.
pub mod workloads {
    /// Constant rate.
    pub fn constant(len: usize, rate: f64) -> Vec<f64> {
        vec![rate; len]
    }

    /// `base`, then five times `base` from the middle on.
    pub fn step(len: usize, base: f64) -> Vec<f64> {
        (0..len)
            .map(|t| if t < len / 3 { base } else { 5.0 * base })
            .collect()
    }

    /// From `from` to `to`, linearly.
    pub fn ramp(len: usize, from: f64, to: f64) -> Vec<f64> {
        (0..len)
            .map(|t| from + (to - from) * t as f64 / (len.max(2) - 1) as f64)
            .collect()
    }

    /// A compressed day: mean ± amplitude over `period` ticks (noise comes from the Poisson
    /// arrivals).
    pub fn diurnal(len: usize, mean: f64, amplitude: f64, period: usize) -> Vec<f64> {
        (0..len)
            .map(|t| {
                let phase = std::f64::consts::TAU * t as f64 / period as f64;
                (mean - amplitude * phase.cos()).max(0.0)
            })
            .collect()
    }

    /// `base` with a flash spike to `peak` for `width` ticks in the middle.
    pub fn flash_spike(len: usize, base: f64, peak: f64, width: usize) -> Vec<f64> {
        let start = len / 2;
        (0..len)
            .map(|t| {
                if (start..start + width).contains(&t) {
                    peak
                } else {
                    base
                }
            })
            .collect()
    }

    /// `rate` for `on` ticks, then nothing for `off` ticks, repeated.
    pub fn on_off(len: usize, rate: f64, on: usize, off: usize) -> Vec<f64> {
        (0..len)
            .map(|t| if t % (on + off) < on { rate } else { 0.0 })
            .collect()
    }

    /// Replays a `ts,value` series: each row lasts `secs_per_row` ticks, and values are scaled
    /// so that the series' maximum becomes `peak`.
    pub fn replay(values: &[f64], secs_per_row: usize, peak: f64) -> Vec<f64> {
        let max = values.iter().copied().fold(0.0, f64::max);
        let scale = if max > 0.0 { peak / max } else { 0.0 };
        values
            .iter()
            .flat_map(|v| std::iter::repeat_n(v * scale, secs_per_row.max(1)))
            .collect()
    }

    /// Parses a `ts,value` CSV (header optional); rows whose value does not parse are errors.
    ///
    /// A row whose time stamp repeats the previous row's is the same step recorded again (some
    /// public series carry one row per event in that step): the step is kept once, with the
    /// mean of its values, so that one value stays one step of time.
    pub fn parse_csv(text: &str) -> Result<Vec<f64>, String> {
        let mut values = Vec::new();
        let mut last_ts: Option<&str> = None;
        let mut repeats = 0.0;
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let (ts, field) = match line.rsplit_once(',') {
                Some((ts, v)) => (Some(ts.trim()), v.trim()),
                None => (None, line),
            };
            let v = match field.parse::<f64>() {
                Ok(v) if v.is_finite() => v,
                _ if i == 0 => continue,
                _ => return Err(format!("line {}: {field:?} is not a number", i + 1)),
            };
            match (ts, last_ts, values.last_mut()) {
                (Some(ts), Some(prev), Some(mean)) if ts == prev => {
                    repeats += 1.0;
                    *mean += (v - *mean) / (repeats + 1.0);
                }
                _ => {
                    values.push(v);
                    repeats = 0.0;
                }
            }
            last_ts = ts;
        }
        Ok(values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Kpa, Threshold};

    #[test]
    fn enough_ready_capacity_meets_the_slo_and_none_misses_it() {
        let config = SimConfig {
            initial_replicas: 10,
            min_replicas: 10,
            ..SimConfig::default()
        };
        let mut hold = Threshold::new(10.0, 0.0, 1e9, 10);
        let out = simulate(&workloads::constant(300, 100.0), &mut hold, &config, 1);
        assert_eq!(out.slo_violation_secs, 0);
        assert_eq!(out.over_slo_share, 0.0);
        assert!((out.replica_secs - 3000.0).abs() < 1e-9);

        let config = SimConfig {
            initial_replicas: 1,
            min_replicas: 1,
            max_replicas: 1,
            ..SimConfig::default()
        };
        let out = simulate(&workloads::constant(300, 100.0), &mut hold, &config, 1);
        assert!(
            out.over_slo_share > 0.7,
            "five times over capacity: {}",
            out.over_slo_share
        );
    }

    #[test]
    fn cold_starts_delay_capacity_by_the_warmup() {
        let config = SimConfig {
            initial_replicas: 0,
            ..SimConfig::default()
        };
        let mut kpa = Kpa::new(100);
        let out = simulate(&workloads::constant(120, 50.0), &mut kpa, &config, 3);
        let first_capacity = out
            .trace
            .iter()
            .position(|r| r.capacity > 0.0)
            .expect("some capacity");
        assert_eq!(first_capacity, config.warmup_secs + 1);
        assert!(out.cold_starts >= 1);
    }

    #[test]
    fn parses_the_shared_csv_format() {
        let values =
            workloads::parse_csv("ts,value\n2020-01-01 00:00:00,12\n2020-01-01 01:00:00,7.5\n")
                .expect("csv");
        assert_eq!(values, vec![12.0, 7.5]);
        assert!(workloads::parse_csv("ts,value\nx,1\ny,oops\n").is_err());
        // A repeated time stamp is one step: its values are averaged, not replayed twice.
        assert_eq!(
            workloads::parse_csv("ts,value\n01:00,4\n01:00,6\n01:00,8\n02:00,1\n03:00,2\n")
                .expect("csv with repeated time stamps"),
            vec![6.0, 1.0, 2.0]
        );
        assert_eq!(
            workloads::parse_csv("3\n4\n").expect("values only"),
            vec![3.0, 4.0]
        );
        assert_eq!(
            workloads::replay(&[1.0, 2.0], 2, 10.0),
            vec![5.0, 5.0, 10.0, 10.0]
        );
    }
}
