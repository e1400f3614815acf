//! Fuzzes the sensor payload decoder: any bytes give samples or a typed refusal.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spillway_protocol::{Limits, decode_samples};

fuzz_target!(|data: &[u8]| {
    let limits = Limits { max_payload_bytes: 64 * 1024, max_samples: 1024 };
    if let Ok(samples) = decode_samples(data, &limits) {
        assert!(!samples.values.is_empty() && samples.values.len() <= 1024);
        assert!(samples.values.iter().all(|v| v.is_finite()));
    }
});
