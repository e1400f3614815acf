//! Spillway's wire formats, sans-IO: bytes in, values out, and back.
//!
//! Nothing here opens a socket or spawns a task. [`payload`] decodes what sensors publish
//! (SenML JSON and CBOR, and a plain `{"ts", "values"}` form) and refuses bad input with a
//! typed error that names the counter it feeds; [`edge`] holds the messages the agent
//! publishes (inference results and its retained status) and the MQTT topic scheme; [`frame`]
//! is the QUIC wire format between agents, replicas and the hub (length-prefixed CBOR frames
//! with a size limit and a decoder that asks for more bytes instead of blocking); [`manifest`]
//! is a model update's signed description and its checks. All CBOR goes
//! through this crate, so the codec can be swapped without touching its callers.

pub mod edge;
pub mod frame;
pub mod manifest;
pub mod payload;

pub use payload::{Format, Limits, PayloadError, Samples, decode_samples};
