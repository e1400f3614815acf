//! Spillway's cloud side: the fleet's control plane and the replicas it runs.
//!
//! [`hub::run`] wires the pieces. [`session`] holds one QUIC connection per agent (mutual TLS
//! against the fleet CA of [`ca`], set up by [`tls`]; agents without a certificate may only
//! enrol with a one-time token from [`registry`]). [`fleet`] is the live view, a pure state
//! machine fed by hellos, heartbeats and the clock, persisted to SQLite in batches by
//! [`registry`]. [`replicas`] starts and watches replica processes through a [`replicas::Backend`]
//! and scales them with [`autoscale`], a pure scaler that raises Knative's KPA (from
//! `models::policy`) to what the agents' own forecasts ask for, so replicas warm up before a
//! burst arrives; ready sets are pushed to every session. [`api`] serves the JSON API,
//! Prometheus metrics and the dashboard. [`replica`] is the inference server agents offload to
//! (one QUIC stream per request, a bounded queue fair between agents, deadlines), [`cli`] its
//! command line, and [`simulate`] compares the scaling policies and forecasters of `models` in
//! the deterministic simulator before they are trusted with real replicas. State on disk lives in [`state`].
//!
//! Model updates: [`store`] checks a model with tract, keeps it by digest and signs its
//! manifest; [`rollout`] is the pure canary → bake → all state machine with its health gates
//! and rollback, stepped by the hub every second on the agents' heartbeats, and within a
//! quarter second when a rollout starts or an agent reports a new version (agents report an
//! install when it is done, not at their next heartbeat); sessions push its orders and serve
//! the downloads, and the replica manager moves replicas to a version once it reaches every
//! agent.

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
pub mod rollout;
pub mod session;
pub mod simulate;
pub mod state;
pub mod store;
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
