//! Spillway's edge agent: MQTT in → per-sensor windows → ONNX inference → MQTT out.
//!
//! The hot path is split so that only one thin task does I/O. [`agent::run`] polls the MQTT
//! event loop and hands each publish to [`ingest::Ingest`], a plain state machine that decodes
//! the payload (through `protocol`), appends it to the sensor's fixed-capacity
//! [`window::Window`] and turns every completed window into a job. The [`router::Router`]
//! sends each job to the [`pool::Pool`] — a bounded queue with a lane per sensor
//! ([`models::queue::FairQueue`], so one flooding sensor neither starves nor delays the others) in
//! front of one inference thread per core, each running a shared, already optimised tract
//! plan from `models` — or, when
//! the forecast says the gateway will saturate or the queue would miss the SLO, to a cloud
//! replica through [`offload::Offload`] (QUIC, mutual TLS, power of two choices, fallback to
//! local on any failure). Results go back through a bounded channel to the
//! [`publisher`] task (MQTT QoS 1), one message per result or, with `mqtt.result_batch`, one
//! per sensor's [`batch::Batch`] of them. Results are delivered at least once:
//! [`connection::Connection`] carries the publishes the broker had not acknowledged across a
//! dropped connection, and while the broker is out of reach the [`outbox::Outbox`] keeps
//! results on disk, through a restart too. Every bound is explicit, so overload turns into counted
//! shedding ([`telemetry::Counters`]) instead of memory growth, and bad input is refused with
//! a counter and a rate-limited log line while every other sensor keeps flowing.
//!
//! Models live in [`serving::ModelSlots`]: one atomically swappable version per configured
//! model, taken by a worker for the whole window, so [`update::Updater`] can install a version
//! the hub sends ([`hub`] session: verify the signed manifest against the pinned key, resume
//! the download, check the digest, load and probe, swap) without a window waiting or failing,
//! compare it with the version it replaced on a share of windows, and switch back at once.
//! Under systemd the agent reports readiness and pings the watchdog only while inference makes
//! progress ([`systemd`]).
//!
//! The default `onnx` feature reads ONNX models; gateway builds leave it out and read NNEF
//! (tract's own format, which the hub converts every published model to), which keeps
//! tract-onnx and tract-hir out of the binary. `hub.model_format` says which file of an update
//! to fetch.

pub mod agent;
pub mod batch;
pub mod config;
pub mod connection;
pub mod cpu_quota;
pub mod hub;
pub mod ingest;
pub mod offload;
pub mod outbox;
pub mod pool;
pub mod publisher;
pub mod router;
pub mod serving;
pub mod status;
pub mod systemd;
pub mod telemetry;
pub mod update;
pub mod window;

pub use agent::{RunSummary, run};
pub use config::AgentConfig;
