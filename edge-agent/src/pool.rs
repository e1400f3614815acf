//! The local worker pool: a bounded queue in front of inference threads.
//!
//! Windows enter through [`Pool::submit`], which never blocks, into a [`FairQueue`] with a
//! lane per sensor: when the queue is full, the sensor holding the most windows gives up its
//! oldest, which comes back to the caller to be shed and counted. Workers are plain threads
//! (tract is synchronous and CPU-bound), one per core by default; each turns a window into a
//! finished, serialised MQTT message and hands it to the publisher through a bounded tokio
//! channel, so a slow broker backs up into the queue and from there into counted shedding,
//! never into memory. Under load a worker hands over up to [`HANDOFF_MAX`] results at once
//! and reads its thread's CPU clock once per [`CPU_SPAN`] windows, not twice per window: for
//! a model of a few microseconds, a wake-up of the publisher and a clock read per window
//! cost as much as the inference. For the same reason a worker takes the windows already
//! queued behind the one it picks up, up to the model's largest batch, and runs those of one
//! model in one call ([`models::Runner::run_batch`]); it never waits for a batch to fill, so
//! a lone window is served at once, as before. Closing the pool lets the workers finish what
//! is queued, then join.

// The workers time each inference for the router's capacity estimate.
#![allow(clippy::disallowed_methods)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use protocol::edge::{InferenceResult, Route, Topics};

use crate::serving::{ModelSlots, ServedModel};
use crate::telemetry::Counters;
use models::queue::{FairQueue, QueueSender, Taken};

/// One window waiting for inference.
#[derive(Debug)]
pub struct Job {
    /// Request id.
    pub id: u64,
    /// Index into the served models.
    pub model: usize,
    /// The sensor the window came from.
    pub sensor: Arc<str>,
    /// The sensor's lane in the queue (its number among the agent's sensors).
    pub lane: usize,
    /// The samples.
    pub window: Vec<f32>,
    /// Time of the window's last sample, Unix seconds.
    pub ts: f64,
    /// When the window was completed.
    pub created: Instant,
}

/// A result ready to publish.
#[derive(Debug)]
pub struct Outgoing {
    /// MQTT topic.
    pub topic: String,
    /// JSON payload.
    pub payload: Vec<u8>,
}

/// Total time the workers spent in inference, the CPU time their threads used, and the CPU
/// quota they run under, for the router's capacity estimate.
#[derive(Debug, Default)]
pub struct ServiceMeter {
    nanos: AtomicU64,
    count: AtomicU64,
    cpu_nanos: AtomicU64,
    cpu_windows: AtomicU64,
    /// The workers' CPU quota in thousandths of a core; 0 when there is none.
    quota_millicores: AtomicU64,
}

/// How often a worker rereads its CPU quota (a container's limit can change while it runs).
const QUOTA_REFRESH: Duration = Duration::from_secs(1);

impl ServiceMeter {
    /// The CPU quota of the workers, in cores, if one applies.
    pub fn cpu_limit(&self) -> Option<f64> {
        match self.quota_millicores.load(Ordering::Relaxed) {
            0 => None,
            m => Some(m as f64 / 1000.0),
        }
    }

    fn refresh_quota(&self) {
        let millicores =
            crate::cpu_quota::current_thread().map_or(0, |c| (c * 1000.0).round().max(1.0) as u64);
        self.quota_millicores.store(millicores, Ordering::Relaxed);
    }

    fn record_wall(&self, wall: Duration, windows: u64) {
        self.nanos
            .fetch_add(wall.as_nanos() as u64, Ordering::Relaxed);
        self.count.fetch_add(windows, Ordering::Relaxed);
    }

    fn record_cpu(&self, cpu: Duration, windows: u64) {
        self.cpu_nanos
            .fetch_add(cpu.as_nanos() as u64, Ordering::Relaxed);
        self.cpu_windows.fetch_add(windows, Ordering::Relaxed);
    }

    /// What has been measured so far.
    pub fn totals(&self) -> ServiceTotals {
        ServiceTotals {
            count: self.count.load(Ordering::Relaxed),
            wall: Duration::from_nanos(self.nanos.load(Ordering::Relaxed)),
            cpu_windows: self.cpu_windows.load(Ordering::Relaxed),
            cpu: Duration::from_nanos(self.cpu_nanos.load(Ordering::Relaxed)),
        }
    }
}

/// Running totals of a [`ServiceMeter`]. The CPU time lags the wall time: it is added a span
/// of windows at a time, so it has its own count.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ServiceTotals {
    /// Inferences timed.
    pub count: u64,
    /// The wall time those inferences took together.
    pub wall: Duration,
    /// Windows the CPU time covers.
    pub cpu_windows: u64,
    /// The CPU time the workers' threads used for those windows, inference and the rest.
    pub cpu: Duration,
}

/// The running pool.
#[derive(Debug)]
pub struct Pool {
    queue: QueueSender<Job>,
    jobs: Arc<FairQueue<Job>>,
    workers: Vec<JoinHandle<()>>,
    meter: Arc<ServiceMeter>,
}

/// A way into the pool's queue that other tasks can hold (the offload fallback).
///
/// The workers stop only when every handle is gone, so a holder's queued work is served.
#[derive(Debug, Clone)]
pub struct LocalQueue(QueueSender<Job>);

impl LocalQueue {
    /// Queues a window if there is room, or gives it back; it never sheds another.
    pub fn try_submit(&self, job: Job) -> Result<(), Job> {
        self.0.try_push(job.lane, job)
    }
}

/// Reads the queue depth of a [`Pool`].
#[derive(Debug, Clone)]
pub struct QueueProbe(Arc<FairQueue<Job>>);

impl QueueProbe {
    /// Windows waiting for a worker.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether no window is waiting.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Pool {
    /// Starts `workers` threads behind a queue of `capacity` windows.
    pub fn start(
        workers: usize,
        capacity: usize,
        models: Arc<ModelSlots>,
        topics: Topics,
        results: tokio::sync::mpsc::Sender<Vec<Outgoing>>,
        counters: Arc<Counters>,
    ) -> std::io::Result<Pool> {
        let (jobs, queue) = FairQueue::new(capacity);
        let meter = Arc::new(ServiceMeter::default());
        let workers = (0..workers.max(1))
            .map(|i| {
                let jobs = Arc::clone(&jobs);
                let models = Arc::clone(&models);
                let topics = topics.clone();
                let results = results.clone();
                let counters = Arc::clone(&counters);
                let meter = Arc::clone(&meter);
                std::thread::Builder::new()
                    .name(format!("infer-{i}"))
                    .spawn(move || work(&jobs, &models, &topics, &results, &counters, &meter))
            })
            .collect::<std::io::Result<_>>()?;
        Ok(Pool {
            queue,
            jobs,
            workers,
            meter,
        })
    }

    /// A handle on the queue for other tasks.
    pub fn local_queue(&self) -> LocalQueue {
        LocalQueue(self.queue.clone())
    }

    /// The workers' inference time meter.
    pub fn meter(&self) -> Arc<ServiceMeter> {
        Arc::clone(&self.meter)
    }

    /// Queues a window; when the queue is full, returns the window shed to make room: the
    /// oldest of the sensor holding the most, which may be this window's sensor.
    pub fn submit(&self, job: Job) -> Option<Job> {
        self.queue.push(job.lane, job)
    }

    /// Windows waiting for a worker.
    pub fn queue_len(&self) -> usize {
        self.jobs.len()
    }

    /// A handle that reads the queue depth and does not keep the pool open.
    pub fn probe(&self) -> QueueProbe {
        QueueProbe(Arc::clone(&self.jobs))
    }

    /// Stops taking work, lets the workers finish the queue, and waits for them.
    pub fn close(self) {
        drop(self.queue);
        for worker in self.workers {
            if worker.join().is_err() {
                tracing::error!("an inference worker panicked");
            }
        }
    }
}

/// Most results a worker hands the publisher at once.
pub const HANDOFF_MAX: usize = 32;

/// Longest a finished result waits in a worker for later ones to go with it. It waits only
/// while more windows are queued: a worker about to wait for work hands over what it has.
const HANDOFF_LINGER: Duration = Duration::from_millis(1);

/// Windows a worker serves between two readings of its thread's CPU clock (a system call,
/// dearer than a small model's inference is long). A worker about to wait for work reads it
/// too, so a span never covers an idle gap's end and the start of the next burst apart.
pub const CPU_SPAN: u64 = 16;

/// The CPU time one worker thread has used since its last reading, and for how many windows.
struct CpuSpan {
    /// The thread clock at the last reading; `None` when the platform has none.
    mark: Option<Duration>,
    windows: u64,
    /// Wall time of the span's inferences, taken as its CPU time without a thread clock.
    wall: Duration,
}

impl CpuSpan {
    fn start() -> CpuSpan {
        CpuSpan {
            mark: thread_clock(),
            windows: 0,
            wall: Duration::ZERO,
        }
    }

    fn add(&mut self, wall: Duration, windows: u64, meter: &ServiceMeter) {
        self.windows += windows;
        self.wall += wall;
        if self.windows >= CPU_SPAN {
            self.close(meter);
        }
    }

    /// Records the span's CPU time and starts the next span.
    fn close(&mut self, meter: &ServiceMeter) {
        if self.windows == 0 {
            return;
        }
        let now = thread_clock();
        let cpu = match (self.mark, now) {
            (Some(then), Some(now)) => now.saturating_sub(then),
            _ => self.wall,
        };
        meter.record_cpu(cpu, self.windows);
        *self = CpuSpan {
            mark: now,
            windows: 0,
            wall: Duration::ZERO,
        };
    }
}

fn thread_clock() -> Option<Duration> {
    cpu_time::ThreadTime::try_now()
        .ok()
        .map(|t| t.as_duration())
}

fn work(
    jobs: &FairQueue<Job>,
    models: &ModelSlots,
    topics: &Topics,
    results: &tokio::sync::mpsc::Sender<Vec<Outgoing>>,
    counters: &Counters,
    meter: &ServiceMeter,
) {
    meter.refresh_quota();
    let mut worker = Worker {
        models,
        topics,
        counters,
        meter,
        quota_read: Instant::now(),
        ready: Vec::with_capacity(HANDOFF_MAX),
        first_ready: Instant::now(),
        span: CpuSpan::start(),
    };
    let mut taken: Vec<Job> = Vec::new();
    // Whatever else is queued already, up to what the first window's model runs in one call:
    // serving it together costs a small model hardly more than serving the first window alone.
    let most = |first: &Job| models.get(first.model).runner.max_batch();
    loop {
        match jobs.take(&mut taken, most, false) {
            Taken::Some => {}
            Taken::Closed => break,
            Taken::Empty => {
                if !hand_off(results, &mut worker.ready, counters) {
                    return;
                }
                worker.span.close(meter);
                if jobs.take(&mut taken, most, true) == Taken::Closed {
                    break;
                }
            }
        }
        // One group per model; a sensor has one model, so each sensor's windows keep their order.
        taken.sort_by_key(|job| job.model);
        for group in taken.chunk_by(|a, b| a.model == b.model) {
            if !worker.serve(group, results) {
                return;
            }
        }
        taken.clear();
    }
    hand_off(results, &mut worker.ready, counters);
}

/// What one inference thread keeps between windows.
struct Worker<'a> {
    models: &'a ModelSlots,
    topics: &'a Topics,
    counters: &'a Counters,
    meter: &'a ServiceMeter,
    quota_read: Instant,
    /// Finished results not yet handed to the publisher.
    ready: Vec<Outgoing>,
    first_ready: Instant,
    span: CpuSpan,
}

impl Worker<'_> {
    /// Runs windows of one model in one call, and queues their results for the publisher;
    /// false when the publisher is gone.
    fn serve(&mut self, group: &[Job], results: &tokio::sync::mpsc::Sender<Vec<Outgoing>>) -> bool {
        let index = group[0].model;
        // The version active now serves the whole group, even if a swap comes meanwhile.
        let model = self.models.get(index);
        let started = Instant::now();
        if started.duration_since(self.quota_read) >= QUOTA_REFRESH {
            self.meter.refresh_quota();
            self.quota_read = started;
        }
        let inputs: Vec<&[f32]> = group.iter().map(|j| j.window.as_slice()).collect();
        let outputs = model.runner.run_batch(&inputs);
        let wall = started.elapsed();
        let windows = group.len() as u64;
        self.meter.record_wall(wall, windows);
        self.span.add(wall, windows, self.meter);
        let each = wall / group.len() as u32;
        self.models
            .record(index, model.version, each, windows, outputs.is_ok());
        let outputs = match outputs {
            Ok(outputs) => outputs,
            Err(e) => {
                self.counters
                    .inference_errors
                    .fetch_add(windows, Ordering::Relaxed);
                tracing::warn!(
                    sensor = %group[0].sensor, model = %model.name, windows,
                    "inference failed: {e}"
                );
                return true;
            }
        };
        for (job, outputs) in group.iter().zip(outputs) {
            if let Some(shadow) = self.models.shadow_for(index) {
                compare(self.models, index, &job.window, &model, &outputs, &shadow);
            }
            let outputs = outputs.into_iter().map(|o| (o.name, o.data)).collect();
            let Some(outgoing) = finish(
                job,
                &model,
                model.version,
                Route::Local,
                outputs,
                self.topics,
                self.counters,
            ) else {
                continue;
            };
            if self.ready.is_empty() {
                self.first_ready = started;
            }
            self.ready.push(outgoing);
            if (self.ready.len() >= HANDOFF_MAX
                || started.duration_since(self.first_ready) >= HANDOFF_LINGER)
                && !hand_off(results, &mut self.ready, self.counters)
            {
                return false;
            }
        }
        true
    }
}

/// Hands the finished results to the publisher in one message (one wake-up of its task, not
/// one per result); false when the publisher is gone.
fn hand_off(
    results: &tokio::sync::mpsc::Sender<Vec<Outgoing>>,
    ready: &mut Vec<Outgoing>,
    counters: &Counters,
) -> bool {
    if ready.is_empty() {
        return true;
    }
    let lost = ready.len() as u64;
    let handed = std::mem::replace(ready, Vec::with_capacity(HANDOFF_MAX));
    if results.blocking_send(handed).is_err() {
        // The publisher is gone: the agent is stopping and nothing more can be sent.
        counters.inference_errors.fetch_add(lost, Ordering::Relaxed);
        return false;
    }
    true
}

/// Runs `window` on the previous version too and records how far the scores differ.
fn compare(
    models: &ModelSlots,
    index: usize,
    window: &[f32],
    active: &ServedModel,
    outputs: &[models::Output],
    shadow: &ServedModel,
) {
    match shadow.runner.run(window) {
        Ok(theirs) => models.record_shadow(
            index,
            active,
            active.score(outputs),
            shadow,
            shadow.score(&theirs),
        ),
        Err(e) => {
            tracing::debug!(model = %shadow.name, version = shadow.version, "shadow run failed: {e}")
        }
    }
}

/// Turns a finished window into the message that publishes its result.
pub fn finish(
    job: &Job,
    model: &ServedModel,
    version: u32,
    route: Route,
    outputs: std::collections::BTreeMap<String, Vec<f32>>,
    topics: &Topics,
    counters: &Counters,
) -> Option<Outgoing> {
    let score = outputs
        .get(model.score_name.as_ref())
        .and_then(|o| o.first().copied())
        .unwrap_or(f32::NAN);
    let result = InferenceResult {
        id: job.id,
        sensor: job.sensor.to_string(),
        model: model.name.to_string(),
        version,
        route,
        ts: job.ts,
        latency_us: u64::try_from(job.created.elapsed().as_micros()).unwrap_or(u64::MAX),
        score,
        anomaly: score > model.anomaly_threshold,
        outputs,
    };
    Counters::bump(&counters.inferences_ok);
    match serde_json::to_vec(&result) {
        Ok(payload) => Some(Outgoing {
            topic: topics.inference(&job.sensor),
            payload,
        }),
        Err(e) => {
            Counters::bump(&counters.inference_errors);
            tracing::warn!("cannot serialise a result: {e}");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Busy work of about `d` on this thread.
    fn spin(d: Duration) -> Duration {
        let start = Instant::now();
        let mut x = 0u64;
        while start.elapsed() < d {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
        start.elapsed()
    }

    #[test]
    fn cpu_spans_count_every_window_once() {
        let meter = ServiceMeter::default();
        let mut span = CpuSpan::start();
        let mut wall = Duration::ZERO;
        // Serves `n` windows of about 200 µs of busy work each.
        let mut serve = |span: &mut CpuSpan, n: u64| {
            for _ in 0..n {
                let w = spin(Duration::from_micros(200));
                wall += w;
                meter.record_wall(w, 1);
                span.add(w, 1, &meter);
            }
        };
        serve(&mut span, CPU_SPAN - 1);
        // Nothing is read until the span is full.
        assert_eq!(meter.totals().cpu_windows, 0);
        serve(&mut span, 1);
        assert_eq!(meter.totals().cpu_windows, CPU_SPAN);
        // A worker going idle closes a part-filled span; closing an empty one adds nothing.
        serve(&mut span, 3);
        span.close(&meter);
        span.close(&meter);
        let t = meter.totals();
        assert_eq!(t.count, CPU_SPAN + 3);
        assert_eq!(t.cpu_windows, CPU_SPAN + 3);
        assert_eq!(t.wall, wall);
        // Busy work uses CPU, and no more than the wall time it took (plus the loop around it).
        assert!(t.cpu > Duration::ZERO);
        assert!(t.cpu <= wall + Duration::from_millis(5), "{t:?}");
    }
}
