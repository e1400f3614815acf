//! Payload decoding benchmark: what each wire form costs the agent's MQTT thread.
//!
//! The agent decodes every payload on its one MQTT thread (`protocol::payload::decode_samples`),
//! so on a gateway whose I/O is the bottleneck the form the sensors publish in sets how many
//! windows it can take. For each zoo model's reference windows (128 and 1,024 samples, real
//! vibration), one thread decodes the same window in each form over and over; the table gives
//! the payload's size and the median time per payload over 7 rounds, and the ratio to plain
//! CBOR. Plain JSON appears twice: with each `f32` sample printed as its `f64` widening
//! (`0.10000000149011612`, what `encode_plain_json` and many publishers write, a `float32`
//! array turned into Python floats among them) and in the shortest form that reads back as the
//! same `f32` (`0.1`).
//!
//! Run: `cargo build --release -p spillway-tests --bin bench-decode &&
//! target/release/bench-decode`.

#![allow(clippy::disallowed_methods)] // a benchmark reads the clock

use std::time::Instant;

use models::zoo;
use protocol::payload::{
    Limits, decode_samples, encode_plain_cbor, encode_plain_json, encode_senml_cbor,
    encode_senml_json,
};
use spillway_tests::load::median;
use spillway_tests::reference;

/// Limits no payload here reaches.
const LIMITS: Limits = Limits {
    max_payload_bytes: 1 << 20,
    max_samples: 1024,
};

/// Seconds between samples (12.8 kHz), for the SenML time offsets.
const PERIOD: f64 = 1.0 / 12_800.0;

/// Time stamp of the last sample.
const TS: f64 = 1_800_000_000.0;

/// Each round decodes for about this many samples.
const SAMPLES_PER_ROUND: usize = 4_000_000;

const ROUNDS: usize = 7;

fn main() -> anyhow::Result<()> {
    println!("\n### Decoding one payload, one thread (median of {ROUNDS} rounds)\n");
    println!(
        "| model | samples | form | payload bytes | µs a payload | ns a sample | ÷ plain CBOR |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for model in zoo::ALL {
        let window = reference(model.name)?
            .windows
            .into_iter()
            .next()
            .ok_or_else(|| anyhow::anyhow!("{} has no reference window", model.name))?;
        let forms: [(&str, Vec<u8>); 5] = [
            ("plain CBOR", encode_plain_cbor(&window, TS)),
            ("plain JSON, f64 digits", encode_plain_json(&window, TS)),
            ("plain JSON, shortest f32", shortest_plain_json(&window)?),
            ("SenML CBOR", encode_senml_cbor(&window, TS, PERIOD)),
            ("SenML JSON", encode_senml_json(&window, TS, PERIOD)),
        ];
        let mut cbor_us = None;
        for (form, payload) in &forms {
            let decoded = decode_samples(payload, &LIMITS)?;
            anyhow::ensure!(
                decoded.values.len() == window.len()
                    && decoded
                        .values
                        .iter()
                        .zip(&window)
                        .all(|(a, b)| (a - b).abs() <= 1e-6 * b.abs().max(1.0)),
                "{form} does not decode to the window it encodes"
            );
            let us = time_decode(payload, window.len());
            let base = *cbor_us.get_or_insert(us);
            println!(
                "| {} | {} | {form} | {} | {us:.1} | {:.1} | {:.2} |",
                model.name,
                window.len(),
                payload.len(),
                us * 1e3 / window.len() as f64,
                us / base
            );
        }
    }
    Ok(())
}

/// `{"ts": …, "values": [...]}` with each sample in the shortest digits that read back as
/// the same `f32`.
fn shortest_plain_json(values: &[f32]) -> anyhow::Result<Vec<u8>> {
    #[derive(serde::Serialize)]
    struct Plain<'a> {
        ts: f64,
        values: &'a [f32],
    }
    Ok(serde_json::to_vec(&Plain { ts: TS, values })?)
}

/// Median microseconds to decode `payload`.
fn time_decode(payload: &[u8], samples: usize) -> f64 {
    let per_round = (SAMPLES_PER_ROUND / samples).max(1);
    let mut times: Vec<f64> = (0..ROUNDS)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..per_round {
                let decoded = decode_samples(std::hint::black_box(payload), &LIMITS);
                std::hint::black_box(decoded.map(|s| s.values.len()).unwrap_or(0));
            }
            start.elapsed().as_secs_f64() * 1e6 / per_round as f64
        })
        .collect();
    median(&mut times)
}
