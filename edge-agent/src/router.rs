//! The router: every completed window goes local or remote; what a full queue sheds gets a
//! last chance in the cloud.
//!
//! [`Router`] joins the pure decision of [`models::offload::OffloadPolicy`] to the agent's
//! two ways of serving a window: the local [`Pool`] and the [`Offload`] client. It feeds the
//! policy what it measures — arrivals, the workers' inference times, the queue depth, the
//! replicas' latency — and counts every decision under its reason, so the status message can
//! explain where work went and why. Without an offload client every window goes local.

use std::sync::Arc;
use std::time::{Duration, Instant};

use models::offload::{Mode, OffloadPolicy, Reason, Route, Settings};
use protocol::edge::OffloadStatus;

use crate::config::AgentConfig;
use crate::offload::Offload;
use crate::pool::{Job, Pool, ServiceMeter, ServiceTotals};
use crate::telemetry::Counters;

/// Routes windows for one agent.
#[derive(Debug)]
pub struct Router {
    policy: OffloadPolicy,
    offload: Option<Offload>,
    meter: Arc<ServiceMeter>,
    measured: ServiceTotals,
    slo: Duration,
    counters: Arc<Counters>,
}

impl Router {
    /// A router for `config`; `initial_service` is the models' measured inference time.
    pub fn new(
        config: &AgentConfig,
        workers: usize,
        initial_service: Duration,
        offload: Option<Offload>,
        meter: Arc<ServiceMeter>,
        counters: Arc<Counters>,
    ) -> Self {
        let o = &config.offload;
        let mode = if offload.is_some() {
            config.offload_mode()
        } else {
            Mode::Off
        };
        let settings = Settings {
            mode,
            workers,
            slo: Duration::from_millis(o.slo_ms),
            tick: Duration::from_millis(o.tick_ms),
            horizon: Duration::from_millis(o.horizon_ms),
            rho_max: o.rho_max,
            rho_target: o.rho_target,
            rho_exit: o.rho_exit,
            guard_share: o.guard_share,
            initial_service,
        };
        Router {
            slo: settings.slo,
            policy: OffloadPolicy::new(settings),
            offload,
            meter,
            measured: ServiceTotals::default(),
            counters,
        }
    }

    /// Routes one window completed at `now`. Returns the window shed to make room for it, if
    /// any: the local queue takes every window, giving up the oldest of its fullest sensor
    /// when full, and that one goes to the cloud instead when a replica can still answer it
    /// in time.
    pub fn submit(&mut self, job: Job, pool: &Pool, now: Instant) -> Option<Job> {
        self.policy.arrival(now);
        self.pull_service();
        let Some(offload) = &self.offload else {
            Counters::bump(&self.counters.routed_local);
            return pool.submit(job);
        };
        let queued = pool.queue_len();
        let snapshot = self.policy.snapshot();
        // Keep back enough time to run the window locally should the cloud fail: the wait
        // behind today's queue plus its own service, twice over for safety.
        let waiting = Duration::from_secs_f64(queued as f64 / snapshot.capacity.max(1e-3));
        let reserve = |slack: Duration| ((snapshot.service_time + waiting) * 2).min(slack / 2);
        let deadline = job.created + self.slo;
        let slack = deadline.saturating_duration_since(now);
        let estimate = offload.estimate(job.model, now);
        let c = &self.counters;
        let job = match self.policy.route(queued, slack, estimate) {
            Route::Remote(reason) => match offload.try_send(job, deadline, reserve(slack)) {
                Ok(()) => {
                    Counters::bump(if reason == Reason::Forecast {
                        &c.routed_remote_forecast
                    } else {
                        &c.routed_remote_guard
                    });
                    return None;
                }
                Err(job) => {
                    Counters::bump(&c.local_offload_busy);
                    job
                }
            },
            Route::Local(reason) => {
                Counters::bump(match reason {
                    Reason::CloudUnreachable => &c.local_cloud_unreachable,
                    Reason::RemoteTooSlow => &c.local_remote_too_slow,
                    _ => &c.routed_local,
                });
                job
            }
        };
        // The local queue was full: the cloud is the last place before shedding.
        let shed = pool.submit(job)?;
        let deadline = shed.created + self.slo;
        let slack = deadline.saturating_duration_since(now);
        if offload.estimate(shed.model, now).is_none_or(|e| e >= slack) {
            return Some(shed);
        }
        match offload.try_send(shed, deadline, reserve(slack)) {
            Ok(()) => {
                Counters::bump(&c.routed_remote_overflow);
                None
            }
            Err(shed) => Some(shed),
        }
    }

    /// Brings the forecast up to `now` without an arrival (so idleness is seen).
    pub fn advance(&mut self, now: Instant) {
        self.policy.advance(now);
        self.pull_service();
    }

    fn pull_service(&mut self) {
        self.policy.set_cpu_limit(self.meter.cpu_limit());
        let now = self.meter.totals();
        let seen = self.measured;
        if now.count > seen.count {
            self.policy
                .record_service(now.wall.saturating_sub(seen.wall), now.count - seen.count);
        }
        if now.cpu_windows > seen.cpu_windows {
            self.policy.record_cpu(
                now.cpu.saturating_sub(seen.cpu),
                now.cpu_windows - seen.cpu_windows,
            );
        }
        self.measured = now;
    }

    /// The router's state for the status message; `None` when offload is not configured.
    pub fn status(&self) -> Option<OffloadStatus> {
        let offload = self.offload.as_ref()?;
        let s = self.policy.snapshot();
        Some(OffloadStatus {
            mode: self.policy.settings().mode.name().into(),
            arrival_rate: s.arrival_rate,
            forecast: s.forecast,
            capacity: s.capacity,
            service_time_us: s.service_time.as_micros() as u64,
            cpu_limit: s.cpu_limit,
            spill_fraction: s.fraction,
            spilling: s.spilling,
            in_flight: offload.in_flight(),
            replicas: offload.slots(),
        })
    }

    /// What the hub hears each heartbeat: the policy's state, the windows per second this
    /// agent expects to send to replicas, and the requests out now.
    pub fn heartbeat_figures(&self) -> (models::offload::Snapshot, f64, usize) {
        (
            self.policy.snapshot(),
            self.policy.offload_demand(),
            self.offload.as_ref().map_or(0, Offload::in_flight),
        )
    }

    /// A handle to the offload client, for the hub session.
    pub fn offload_handle(&self) -> Option<crate::offload::OffloadHandle> {
        self.offload.as_ref().map(Offload::handle)
    }

    /// Takes the offload client out, to close it before the pool.
    pub fn take_offload(&mut self) -> Option<Offload> {
        self.offload.take()
    }
}
