//! Everything in Spillway that predicts, pure and deterministic, and the queue that feeds it.
//!
//! [`runner`] wraps tract: a model (ONNX, or NNEF converted from it) is loaded, optimised once
//! for a concrete input shape, then run many times from many threads, with plain `f32` data in
//! and out and typed errors for every way a model file can be wrong. [`zoo`] carries the
//! sample models compiled in, so demos and tests need no files. [`forecast`] predicts a load
//! series; [`policy`] turns observations into a replica count (threshold, Kubernetes HPA,
//! Knative KPA, predictive, Q-learning); [`offload`] decides how much of an agent's work to
//! spill to the cloud and which windows; [`sim`] scores policies on workloads in a
//! deterministic simulator. [`queue`] is the bounded queue, fair between sources, in front of
//! the runner's threads at the agent (a lane per sensor) and at a replica (a lane per agent).
//! Nothing here reads a clock or touches the network: time and samples are passed in, which is
//! what lets the simulator and the tests replay the same code the agent and the hub run.

pub mod forecast;
pub mod offload;
pub mod policy;
pub mod queue;
pub mod runner;
pub mod sim;
pub mod zoo;

pub use runner::{LoadedModel, ModelError, ModelFormat, Output, Runner};
