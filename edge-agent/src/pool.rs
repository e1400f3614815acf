//! The local worker pool: a bounded queue in front of inference threads.
//!
//! Windows enter through [`Pool::try_submit`], which never blocks: when the queue is full the
//! window comes back to the caller to be shed and counted. Workers are plain threads (tract
//! is synchronous and CPU-bound), one per core by default; each turns a window into a
//! finished, serialised MQTT message and hands it to the publisher through a bounded tokio
//! channel, so a slow broker backs up into the queue and from there into counted shedding,
//! never into memory. Closing the pool lets the workers finish what is queued, then join.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender, TrySendError};
use protocol::edge::{InferenceResult, Route, Topics};

use crate::serving::ServedModel;
use crate::telemetry::Counters;

/// One window waiting for inference.
#[derive(Debug)]
pub struct Job {
    /// Request id.
    pub id: u64,
    /// Index into the served models.
    pub model: usize,
    /// The sensor the window came from.
    pub sensor: Arc<str>,
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

/// The running pool.
#[derive(Debug)]
pub struct Pool {
    queue: Sender<Job>,
    jobs: Receiver<Job>,
    workers: Vec<JoinHandle<()>>,
}

/// Reads the queue depth of a [`Pool`].
#[derive(Debug, Clone)]
pub struct QueueProbe(Receiver<Job>);

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
        models: Arc<[ServedModel]>,
        topics: Topics,
        results: tokio::sync::mpsc::Sender<Outgoing>,
        counters: Arc<Counters>,
    ) -> std::io::Result<Pool> {
        let (queue, jobs) = crossbeam_channel::bounded(capacity);
        let workers = (0..workers.max(1))
            .map(|i| {
                let jobs = jobs.clone();
                let models = Arc::clone(&models);
                let topics = topics.clone();
                let results = results.clone();
                let counters = Arc::clone(&counters);
                std::thread::Builder::new()
                    .name(format!("infer-{i}"))
                    .spawn(move || work(&jobs, &models, &topics, &results, &counters))
            })
            .collect::<std::io::Result<_>>()?;
        Ok(Pool {
            queue,
            jobs,
            workers,
        })
    }

    /// Queues a window, or gives it back when the queue is full.
    pub fn try_submit(&self, job: Job) -> Result<(), Job> {
        self.queue.try_send(job).map_err(|e| match e {
            TrySendError::Full(job) | TrySendError::Disconnected(job) => job,
        })
    }

    /// A handle that reads the queue depth and does not keep the pool open.
    pub fn probe(&self) -> QueueProbe {
        QueueProbe(self.jobs.clone())
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

fn work(
    jobs: &Receiver<Job>,
    models: &[ServedModel],
    topics: &Topics,
    results: &tokio::sync::mpsc::Sender<Outgoing>,
    counters: &Counters,
) {
    while let Ok(job) = jobs.recv() {
        let model = &models[job.model];
        let outputs = match model.runner.run(&job.window) {
            Ok(outputs) => outputs,
            Err(e) => {
                Counters::bump(&counters.inference_errors);
                tracing::warn!(sensor = %job.sensor, model = %model.name, "inference failed: {e}");
                continue;
            }
        };
        let score = outputs
            .get(model.score_index)
            .and_then(|o| o.data.first().copied())
            .unwrap_or(f32::NAN);
        let result = InferenceResult {
            id: job.id,
            sensor: job.sensor.to_string(),
            model: model.name.to_string(),
            version: model.version,
            route: Route::Local,
            ts: job.ts,
            latency_us: u64::try_from(job.created.elapsed().as_micros()).unwrap_or(u64::MAX),
            score,
            anomaly: score > model.anomaly_threshold,
            outputs: outputs.into_iter().map(|o| (o.name, o.data)).collect(),
        };
        Counters::bump(&counters.inferences_ok);
        let payload = match serde_json::to_vec(&result) {
            Ok(p) => p,
            Err(e) => {
                Counters::bump(&counters.inference_errors);
                tracing::warn!("cannot serialise a result: {e}");
                continue;
            }
        };
        let outgoing = Outgoing {
            topic: topics.inference(&job.sensor),
            payload,
        };
        if results.blocking_send(outgoing).is_err() {
            // The publisher is gone: the agent is stopping and nothing more can be sent.
            counters.inference_errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
    }
}
