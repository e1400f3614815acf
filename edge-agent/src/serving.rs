//! The models the agent serves: loaded at start from config, swapped later by updates.
//!
//! Loading fixes each model's input shape, optimises it, and derives what the hot path needs:
//! the window length (the input's element count), the stride, and which output carries the
//! anomaly score. A model that cannot be served is an error at start, with its name.
//!
//! [`ModelSlots`] holds one slot per configured model. A slot's active version is an
//! `Arc` behind an atomic pointer: a worker takes the `Arc` when it starts a window, so a swap
//! never blocks or fails a request — windows already started finish on the version they
//! began with. After an update the replaced version stays loaded for a while as the slot's
//! *shadow*: a share of windows also run on it, and the difference of the two versions'
//! scores is the drift the hub's rollout gates read ([`ModelHealth`]).

// Loading measures the model once, as the router's first capacity estimate.
#![allow(clippy::disallowed_methods)]

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use arc_swap::{ArcSwap, ArcSwapOption};
use models::{LoadedModel, Runner};
use protocol::frame::{ModelHealth, ModelVersion};

use crate::config::{AgentConfig, MAX_WINDOW, ModelSection};

/// One model ready to serve.
#[derive(Debug, Clone)]
pub struct ServedModel {
    /// Name from config.
    pub name: Arc<str>,
    /// Version from config.
    pub version: u32,
    /// The optimised model.
    pub runner: Runner,
    /// Samples per window.
    pub window: usize,
    /// Samples between two inferences.
    pub stride: usize,
    /// Name of the score output.
    pub score_name: Arc<str>,
    /// Scores above this are anomalies.
    pub anomaly_threshold: f32,
    /// Time one inference took at load (the median of a few warm-up runs).
    pub probe_time: Duration,
    /// The configured cap on windows per inference call.
    pub max_batch: usize,
}

impl ServedModel {
    /// Loads and optimises the model a config section describes.
    pub fn load(section: &ModelSection) -> anyhow::Result<Self> {
        let name = &section.name;
        let (loaded, zoo) = match (&section.path, &section.zoo) {
            (Some(path), _) => (LoadedModel::from_path(path), None),
            (None, Some(zoo)) => {
                let zoo = models::zoo::by_name(zoo)
                    .with_context(|| format!("model {name:?}: unknown zoo model {zoo:?}"))?;
                (LoadedModel::from_bytes(zoo.bytes()), Some(zoo))
            }
            (None, None) => bail!("model {name:?}: no path and no zoo name"),
        };
        let shape = section
            .input_shape
            .as_deref()
            .or(zoo.map(|z| z.input_shape));
        let runner = loaded
            .and_then(|m| {
                m.optimize_batched(shape, &models::runner::batch_ladder(section.max_batch))
            })
            .with_context(|| format!("loading model {name:?}"))?;
        let score_name = section
            .score_output
            .as_deref()
            .or(zoo.map(|z| z.score_output));
        let anomaly_threshold = match (section.anomaly_threshold, zoo) {
            (t, Some(zoo)) if t.is_infinite() => zoo.anomaly_threshold,
            (t, _) => t,
        };
        Self::serve(
            section,
            section.version,
            runner,
            score_name,
            anomaly_threshold,
        )
    }

    /// Loads version `version` of `current`'s model from ONNX bytes, with `shape`: the
    /// same window, stride, score output and threshold. Refuses a model whose input does not
    /// hold exactly one window or that lacks the score output.
    pub fn load_version(
        current: &ServedModel,
        version: u32,
        bytes: &[u8],
        shape: &[usize],
    ) -> anyhow::Result<Self> {
        let name = &current.name;
        let runner = LoadedModel::from_bytes(bytes)
            .and_then(|m| {
                m.optimize_batched(
                    Some(shape),
                    &models::runner::batch_ladder(current.max_batch),
                )
            })
            .with_context(|| format!("loading {name} v{version}"))?;
        if runner.input_len() != current.window {
            bail!(
                "{name} v{version} takes {} values per input, the windows hold {}",
                runner.input_len(),
                current.window
            );
        }
        let section = ModelSection {
            name: name.to_string(),
            path: None,
            zoo: None,
            version,
            input_shape: Some(shape.to_vec()),
            stride: Some(current.stride),
            score_output: Some(current.score_name.to_string()),
            anomaly_threshold: current.anomaly_threshold,
            max_batch: current.max_batch,
        };
        Self::serve(
            &section,
            version,
            runner,
            Some(&current.score_name),
            current.anomaly_threshold,
        )
    }

    fn serve(
        section: &ModelSection,
        version: u32,
        runner: Runner,
        score_name: Option<&str>,
        anomaly_threshold: f32,
    ) -> anyhow::Result<Self> {
        let name = &section.name;
        let window = runner.input_len();
        if window > MAX_WINDOW {
            bail!(
                "model {name:?}: its input holds {window} values, windows hold at most {MAX_WINDOW}"
            );
        }
        let stride = section.stride.unwrap_or(window);
        let score_index = match score_name {
            None => 0,
            Some(score) => runner
                .output_names()
                .iter()
                .position(|n| n == score)
                .with_context(|| {
                    format!(
                        "model {name:?} has no output {score:?} (outputs: {:?})",
                        runner.output_names()
                    )
                })?,
        };
        let score_name: Arc<str> = Arc::from(
            runner
                .output_names()
                .get(score_index)
                .map_or("", String::as_str),
        );
        let probe_time = runner
            .time_one_window(Instant::now)
            .with_context(|| format!("model {name:?} fails on a zero window"))?;
        let built = runner.batch_sizes();
        let runner = runner
            .keep_batches_that_pay(probe_time, Instant::now)
            .with_context(|| format!("model {name:?} fails on a batch of windows"))?;
        tracing::info!(
            model = %name,
            version,
            one_window_us = probe_time.as_micros() as u64,
            optimised_for = ?built,
            batches = ?runner.batch_sizes(),
            "model ready"
        );
        Ok(ServedModel {
            name: Arc::from(name.as_str()),
            version,
            runner,
            window,
            stride,
            score_name,
            anomaly_threshold,
            probe_time,
            max_batch: section.max_batch,
        })
    }

    /// The score in `outputs`, NaN when it is missing.
    pub fn score(&self, outputs: &[models::Output]) -> f32 {
        outputs
            .iter()
            .find(|o| o.name == *self.score_name)
            .and_then(|o| o.data.first().copied())
            .unwrap_or(f32::NAN)
    }

    /// Loads every model in the config, in order.
    pub fn load_all(config: &AgentConfig) -> anyhow::Result<Vec<ServedModel>> {
        config.models.iter().map(ServedModel::load).collect()
    }
}

/// Inference times kept per model for its p99.
const LATENCY_SAMPLES: usize = 1024;

/// One model's record since its active version started.
#[derive(Debug, Default)]
struct Health {
    inferences: u64,
    errors: u64,
    latencies_us: VecDeque<u32>,
    shadow_runs: u64,
    drift_sum: f64,
    flips: u64,
    update_failures: u64,
    last_failure: String,
}

/// One configured model.
#[derive(Debug)]
struct Slot {
    active: ArcSwap<ServedModel>,
    shadow: ArcSwapOption<ServedModel>,
    health: Mutex<Health>,
    /// Windows seen, for picking every n-th one for the shadow.
    windows: AtomicU64,
}

/// The served models, one slot each, in config order; see the module docs.
#[derive(Debug)]
pub struct ModelSlots {
    slots: Box<[Slot]>,
    /// Run the shadow on one window in this many (0: never).
    shadow_every: u64,
}

impl ModelSlots {
    /// Slots for `models`; the shadow runs on one window in `shadow_every`.
    pub fn new(models: Vec<ServedModel>, shadow_every: u64) -> Self {
        let slots = models
            .into_iter()
            .map(|m| Slot {
                active: ArcSwap::from_pointee(m),
                shadow: ArcSwapOption::empty(),
                health: Mutex::default(),
                windows: AtomicU64::new(0),
            })
            .collect();
        ModelSlots {
            slots,
            shadow_every,
        }
    }

    /// How many models.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The active version of model `index`.
    pub fn get(&self, index: usize) -> Arc<ServedModel> {
        self.slots[index].active.load_full()
    }

    /// The active versions, in order.
    pub fn all(&self) -> Vec<Arc<ServedModel>> {
        self.slots.iter().map(|s| s.active.load_full()).collect()
    }

    /// The index of model `name`.
    pub fn index(&self, name: &str) -> Option<usize> {
        self.slots
            .iter()
            .position(|s| &*s.active.load().name == name)
    }

    /// Names and active versions.
    pub fn versions(&self) -> Vec<ModelVersion> {
        self.slots
            .iter()
            .map(|s| {
                let m = s.active.load();
                ModelVersion {
                    name: m.name.to_string(),
                    version: m.version,
                }
            })
            .collect()
    }

    /// Makes `model` the active version of slot `index`; the one it replaces becomes the
    /// shadow when `keep_shadow`. The record starts over. Returns the replaced version.
    pub fn swap(&self, index: usize, model: ServedModel, keep_shadow: bool) -> Arc<ServedModel> {
        let slot = &self.slots[index];
        let old = slot.active.swap(Arc::new(model));
        slot.shadow.store(keep_shadow.then(|| Arc::clone(&old)));
        let mut health = lock(&slot.health);
        let (failures, last) = (
            health.update_failures,
            std::mem::take(&mut health.last_failure),
        );
        *health = Health {
            update_failures: failures,
            last_failure: last,
            ..Health::default()
        };
        old
    }

    /// The shadow of slot `index` if the window with this sequence number should also run on
    /// it.
    pub fn shadow_for(&self, index: usize) -> Option<Arc<ServedModel>> {
        let slot = &self.slots[index];
        let n = slot.windows.fetch_add(1, Ordering::Relaxed);
        if self.shadow_every == 0 || !n.is_multiple_of(self.shadow_every) {
            return None;
        }
        slot.shadow.load_full()
    }

    /// The version kept as shadow of slot `index`.
    pub fn shadow(&self, index: usize) -> Option<Arc<ServedModel>> {
        self.slots[index].shadow.load_full()
    }

    /// Stops comparing slot `index` with its shadow and unloads it.
    pub fn drop_shadow(&self, index: usize) {
        self.slots[index].shadow.store(None);
    }

    /// Records `windows` windows that `version` of model `index` answered in one call, `took`
    /// a window (one latency sample per call).
    pub fn record(&self, index: usize, version: u32, took: Duration, windows: u64, ok: bool) {
        let slot = &self.slots[index];
        if slot.active.load().version != version {
            return; // finished on a version swapped out meanwhile
        }
        let mut h = lock(&slot.health);
        if ok {
            h.inferences += windows;
        } else {
            h.errors += windows;
        }
        if h.latencies_us.len() == LATENCY_SAMPLES {
            h.latencies_us.pop_front();
        }
        h.latencies_us
            .push_back(u32::try_from(took.as_micros()).unwrap_or(u32::MAX));
    }

    /// Records one window run on both the active version (`score`) and the shadow.
    pub fn record_shadow(
        &self,
        index: usize,
        active: &ServedModel,
        score: f32,
        shadow: &ServedModel,
        shadow_score: f32,
    ) {
        let slot = &self.slots[index];
        let mut h = lock(&slot.health);
        h.shadow_runs += 1;
        let d = f64::from((score - shadow_score).abs());
        h.drift_sum += if d.is_finite() {
            d
        } else {
            f64::from(f32::MAX)
        };
        if (score > active.anomaly_threshold) != (shadow_score > shadow.anomaly_threshold) {
            h.flips += 1;
        }
    }

    /// Records an update of model `index` that was refused or failed.
    pub fn record_failure(&self, index: usize, why: String) {
        let mut h = lock(&self.slots[index].health);
        h.update_failures += 1;
        h.last_failure = why;
    }

    /// Every model's record, for the heartbeat.
    pub fn health(&self) -> Vec<ModelHealth> {
        self.slots
            .iter()
            .map(|s| {
                let m = s.active.load();
                let h = lock(&s.health);
                let mut sorted: Vec<u32> = h.latencies_us.iter().copied().collect();
                sorted.sort_unstable();
                let p99 = sorted
                    .get((sorted.len() * 99).div_ceil(100).saturating_sub(1))
                    .copied()
                    .unwrap_or(0);
                ModelHealth {
                    name: m.name.to_string(),
                    version: m.version,
                    inferences: h.inferences,
                    errors: h.errors,
                    p99_us: u64::from(p99),
                    shadow_version: s.shadow.load().as_ref().map_or(0, |m| m.version),
                    shadow_runs: h.shadow_runs,
                    drift_mean_abs: if h.shadow_runs == 0 {
                        0.0
                    } else {
                        (h.drift_sum / h.shadow_runs as f64) as f32
                    },
                    decision_flips: h.flips,
                    update_failures: h.update_failures,
                    last_failure: h.last_failure.clone(),
                }
            })
            .collect()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
