//! Spillway's cloud side.
//!
//! The hub grows into the fleet's control plane (agent sessions, replicas, model rollouts,
//! dashboard). Today it carries the pieces the fleet's data path needs: [`ca`], the fleet's
//! certificate authority (every QUIC connection is mutual TLS against it, set up by [`tls`]);
//! [`replica`], the inference server agents offload to, one QUIC stream per request with a
//! bounded queue and deadlines; a check that the sample models load and run with the same
//! runner the agents use; and [`simulate`], which compares the scaling policies and
//! forecasters of `models` in the deterministic simulator before they are trusted with real
//! replicas.

pub mod api;
pub mod autoscale;
pub mod ca;
pub mod cli;
pub mod client;
pub mod fleet;
pub mod hub;
pub mod registry;
pub mod replica;
pub mod replicas;
pub mod session;
pub mod simulate;
pub mod state;
pub mod tls;

use std::sync::atomic::{AtomicU64, Ordering};

use models::{LoadedModel, zoo};

/// One line of `cloud-hub zoo`: a sample model, checked by loading and running it.
#[derive(Debug, Clone, PartialEq)]
pub struct ZooCheck {
    /// Model name.
    pub name: &'static str,
    /// Its input shape.
    pub input_shape: Vec<usize>,
    /// Its outputs.
    pub outputs: Vec<String>,
    /// The score for an all-zero window.
    pub zero_score: f32,
}

/// Loads, optimises and runs every sample model on a zero window.
pub fn check_zoo() -> Result<Vec<ZooCheck>, models::ModelError> {
    zoo::ALL
        .iter()
        .map(|m| {
            let runner = LoadedModel::from_bytes(m.onnx)?.optimize(Some(m.input_shape))?;
            let outputs = runner.run(&vec![0.0; runner.input_len()])?;
            let score = outputs
                .iter()
                .find(|o| o.name == m.score_output)
                .and_then(|o| o.data.first().copied())
                .unwrap_or(f32::NAN);
            Ok(ZooCheck {
                name: m.name,
                input_shape: runner.input_shape().to_vec(),
                outputs: runner.output_names().to_vec(),
                zero_score: score,
            })
        })
        .collect()
}

/// Counts an event and says whether to log it: the 1st, 8th, 64th, 512th, 4096th of its
/// kind, then every 10,000th — bad input is always counted, its log lines are not a flood.
pub fn sampled(counter: &AtomicU64) -> bool {
    let n = counter.fetch_add(1, Ordering::Relaxed) + 1;
    (n.is_power_of_two() && n.trailing_zeros().is_multiple_of(3) && n <= 4096)
        || n.is_multiple_of(10_000)
}
