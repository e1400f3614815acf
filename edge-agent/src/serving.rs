//! The models the agent serves, loaded once at start from config.
//!
//! Loading fixes each model's input shape, optimises it, and derives what the hot path needs:
//! the window length (the input's element count), the stride, and which output carries the
//! anomaly score. A model that cannot be served is an error at start, with its name.

// Loading measures the model once, as the router's first capacity estimate.
#![allow(clippy::disallowed_methods)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use models::{LoadedModel, Runner};

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
}

/// Runs a zero window a few times: warms the model up and measures it.
fn probe(runner: &Runner) -> Result<Duration, models::ModelError> {
    let zeros = vec![0.0; runner.input_len()];
    let mut times = Vec::with_capacity(PROBE_RUNS);
    for _ in 0..PROBE_RUNS {
        let started = Instant::now();
        runner.run(&zeros)?;
        times.push(started.elapsed());
    }
    times.sort();
    Ok(times[PROBE_RUNS / 2])
}

const PROBE_RUNS: usize = 5;

impl ServedModel {
    /// Loads and optimises the model a config section describes.
    pub fn load(section: &ModelSection) -> anyhow::Result<Self> {
        let name = &section.name;
        let (loaded, zoo) = match (&section.path, &section.zoo) {
            (Some(path), _) => (LoadedModel::from_path(path), None),
            (None, Some(zoo)) => {
                let zoo = models::zoo::by_name(zoo)
                    .with_context(|| format!("model {name:?}: unknown zoo model {zoo:?}"))?;
                (LoadedModel::from_bytes(zoo.onnx), Some(zoo))
            }
            (None, None) => bail!("model {name:?}: no path and no zoo name"),
        };
        let shape = section
            .input_shape
            .as_deref()
            .or(zoo.map(|z| z.input_shape));
        let runner = loaded
            .and_then(|m| m.optimize(shape))
            .with_context(|| format!("loading model {name:?}"))?;
        let window = runner.input_len();
        if window > MAX_WINDOW {
            bail!(
                "model {name:?}: its input holds {window} values, windows hold at most {MAX_WINDOW}"
            );
        }
        let stride = section.stride.unwrap_or(window);
        let score_name = section
            .score_output
            .as_deref()
            .or(zoo.map(|z| z.score_output));
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
        let anomaly_threshold = match (section.anomaly_threshold, zoo) {
            (t, Some(zoo)) if t.is_infinite() => zoo.anomaly_threshold,
            (t, _) => t,
        };
        let score_name: Arc<str> = Arc::from(
            runner
                .output_names()
                .get(score_index)
                .map_or("", String::as_str),
        );
        let probe_time =
            probe(&runner).with_context(|| format!("model {name:?} fails on a zero window"))?;
        Ok(ServedModel {
            name: Arc::from(name.as_str()),
            version: section.version,
            runner,
            window,
            stride,
            score_name,
            anomaly_threshold,
            probe_time,
        })
    }

    /// Loads every model in the config, in order.
    pub fn load_all(config: &AgentConfig) -> anyhow::Result<Vec<ServedModel>> {
        config.models.iter().map(ServedModel::load).collect()
    }
}
