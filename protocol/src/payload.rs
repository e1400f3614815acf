//! Sensor payloads as they arrive over MQTT, decoded without I/O.
//!
//! Three forms are accepted on `spillway/<site>/<gateway>/<sensor>/data`, told apart by their
//! first byte: SenML JSON (RFC 8428, a JSON array of records), SenML CBOR (a CBOR array of
//! records with the RFC's integer labels), and a plain object `{"ts": …, "values": [...]}` in
//! JSON or CBOR. Every limit is checked before work is done on the bytes: the payload size
//! first, then the number of samples; values must be finite as `f32`. Each failure is a
//! [`PayloadError`] whose [`PayloadError::kind`] names the counter it feeds.

use serde::Deserialize;
use serde_cbor::Value;

/// Bounds a payload must respect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest payload accepted, in bytes.
    pub max_payload_bytes: usize,
    /// Most samples one payload may carry.
    pub max_samples: usize,
}

/// The samples one payload carried, oldest first.
#[derive(Debug, Clone, PartialEq)]
pub struct Samples {
    /// Sample values.
    pub values: Vec<f32>,
    /// Time of the last sample, seconds since the Unix epoch, when the payload gave one.
    pub ts: Option<f64>,
}

/// The wire form a payload arrived in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// RFC 8428 JSON.
    SenmlJson,
    /// RFC 8428 CBOR.
    SenmlCbor,
    /// `{"ts": …, "values": [...]}` as JSON.
    PlainJson,
    /// `{"ts": …, "values": [...]}` as CBOR.
    PlainCbor,
}

/// Why a payload was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PayloadError {
    /// Larger than [`Limits::max_payload_bytes`].
    #[error("payload of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Payload size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Not valid JSON or CBOR, or not one of the accepted shapes.
    #[error("malformed {format:?} payload: {reason}")]
    Malformed {
        /// The form the first byte announced.
        format: Format,
        /// What was wrong.
        reason: String,
    },
    /// No samples, or more than [`Limits::max_samples`].
    #[error("payload carries {got} samples, accepted are 1 to {max}")]
    SampleCount {
        /// Samples found.
        got: usize,
        /// The limit.
        max: usize,
    },
    /// A value is NaN or infinite (as `f32`).
    #[error("sample {index} is not a finite number")]
    NonFinite {
        /// Position of the first offending sample.
        index: usize,
    },
}

impl PayloadError {
    /// A short stable name for counters and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            PayloadError::TooLarge { .. } => "too_large",
            PayloadError::Malformed { .. } => "malformed",
            PayloadError::SampleCount { .. } => "sample_count",
            PayloadError::NonFinite { .. } => "non_finite",
        }
    }
}

// SenML CBOR labels (RFC 8428, section 6).
const BASE_TIME: i64 = -3;
const BASE_VALUE: i64 = -5;
const VALUE: i64 = 2;
const TIME: i64 = 6;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Plain {
    #[serde(default)]
    ts: Option<f64>,
    values: Vec<f64>,
}

#[derive(Deserialize)]
struct SenmlRecord {
    #[serde(default)]
    bt: Option<f64>,
    #[serde(default)]
    bv: Option<f64>,
    #[serde(default)]
    t: Option<f64>,
    #[serde(default)]
    v: Option<f64>,
}

/// Decodes one sensor payload, checking every limit.
pub fn decode_samples(bytes: &[u8], limits: &Limits) -> Result<Samples, PayloadError> {
    if bytes.len() > limits.max_payload_bytes {
        return Err(PayloadError::TooLarge {
            len: bytes.len(),
            max: limits.max_payload_bytes,
        });
    }
    let format = sniff(bytes);
    let malformed = |reason: String| PayloadError::Malformed { format, reason };
    let (raw, ts) = match format {
        Format::PlainJson => {
            let plain: Plain =
                serde_json::from_slice(bytes).map_err(|e| malformed(e.to_string()))?;
            (plain.values, plain.ts)
        }
        Format::SenmlJson => {
            let records: Vec<SenmlRecord> =
                serde_json::from_slice(bytes).map_err(|e| malformed(e.to_string()))?;
            senml_values(records.into_iter().map(|r| (r.bt, r.bv, r.t, r.v))).map_err(malformed)?
        }
        Format::PlainCbor => {
            // Straight into the struct: no intermediate value per sample.
            let plain: Plain =
                serde_cbor::from_slice(bytes).map_err(|e| malformed(e.to_string()))?;
            (plain.values, plain.ts)
        }
        Format::SenmlCbor => {
            let records: Vec<CborRecord> =
                serde_cbor::from_slice(bytes).map_err(|e| malformed(e.to_string()))?;
            senml_values(records.into_iter().map(|r| r.0)).map_err(malformed)?
        }
    };
    if raw.is_empty() || raw.len() > limits.max_samples {
        return Err(PayloadError::SampleCount {
            got: raw.len(),
            max: limits.max_samples,
        });
    }
    let mut values = Vec::with_capacity(raw.len());
    for (index, v) in raw.into_iter().enumerate() {
        let v = v as f32;
        if !v.is_finite() {
            return Err(PayloadError::NonFinite { index });
        }
        values.push(v);
    }
    Ok(Samples { values, ts })
}

fn sniff(bytes: &[u8]) -> Format {
    match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => Format::PlainJson,
        Some(b'[') => Format::SenmlJson,
        // CBOR major type 5 (map) is the plain form; anything else is read as SenML CBOR.
        Some(b) if b >> 5 == 5 => Format::PlainCbor,
        _ => Format::SenmlCbor,
    }
}

type Record = (Option<f64>, Option<f64>, Option<f64>, Option<f64>);

/// One SenML CBOR record, read straight from the bytes (no tree of values in between): the
/// labels this agent uses are kept, every other label is skipped unread, and a label that is
/// not an integer or a kept label whose value is not a number is an error.
struct CborRecord(Record);

impl<'de> Deserialize<'de> for CborRecord {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct RecordVisitor;

        impl<'de> serde::de::Visitor<'de> for RecordVisitor {
            type Value = CborRecord;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a SenML record: a map with integer labels")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<CborRecord, A::Error> {
                let mut record: Record = (None, None, None, None);
                while let Some(label) = map.next_key::<i64>()? {
                    let slot = match label {
                        BASE_TIME => &mut record.0,
                        BASE_VALUE => &mut record.1,
                        TIME => &mut record.2,
                        VALUE => &mut record.3,
                        _ => {
                            map.next_value::<serde::de::IgnoredAny>()?;
                            continue;
                        }
                    };
                    let value = map.next_value::<f64>().map_err(|e| {
                        serde::de::Error::custom(format!(
                            "SenML label {label} must be a number: {e}"
                        ))
                    })?;
                    *slot = Some(value);
                }
                Ok(CborRecord(record))
            }
        }

        deserializer.deserialize_map(RecordVisitor)
    }
}

/// Resolves SenML base fields: value = bv + v, time = bt + t (RFC 8428, section 4.6).
fn senml_values(
    records: impl IntoIterator<Item = Record>,
) -> Result<(Vec<f64>, Option<f64>), String> {
    let (mut base_time, mut base_value) = (None::<f64>, 0.0);
    let mut values = Vec::new();
    let mut last_ts = None;
    for (i, (bt, bv, t, v)) in records.into_iter().enumerate() {
        if let Some(bt) = bt {
            base_time = Some(bt);
        }
        if let Some(bv) = bv {
            base_value = bv;
        }
        let Some(v) = v else {
            return Err(format!("record {i} has no numeric value (\"v\")"));
        };
        values.push(base_value + v);
        if base_time.is_some() || t.is_some() {
            last_ts = Some(base_time.unwrap_or(0.0) + t.unwrap_or(0.0));
        }
    }
    Ok((values, last_ts))
}

/// Encodes samples as SenML CBOR (one record per sample, base time on the first).
pub fn encode_senml_cbor(values: &[f32], ts: f64, period_secs: f64) -> Vec<u8> {
    let records: Vec<Value> = values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let mut map = std::collections::BTreeMap::new();
            if i == 0 {
                map.insert(Value::Integer(BASE_TIME.into()), Value::Float(ts));
            }
            let offset = (i as f64 + 1.0 - values.len() as f64) * period_secs;
            map.insert(Value::Integer(TIME.into()), Value::Float(offset));
            map.insert(Value::Integer(VALUE.into()), Value::Float(f64::from(*v)));
            Value::Map(map)
        })
        .collect();
    // Serialising an in-memory Value into a Vec cannot fail.
    serde_cbor::to_vec(&Value::Array(records)).unwrap_or_default()
}

/// Encodes samples as SenML JSON (one record per sample, base time on the first).
pub fn encode_senml_json(values: &[f32], ts: f64, period_secs: f64) -> Vec<u8> {
    let records: Vec<serde_json::Value> = values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let offset = (i as f64 + 1.0 - values.len() as f64) * period_secs;
            if i == 0 {
                serde_json::json!({"bn": "", "bt": ts, "t": offset, "v": v})
            } else {
                serde_json::json!({"t": offset, "v": v})
            }
        })
        .collect();
    serde_json::to_vec(&records).unwrap_or_default()
}

/// Encodes samples in the plain form as CBOR (a map with `ts` and `values`, `f32` values).
pub fn encode_plain_cbor(values: &[f32], ts: f64) -> Vec<u8> {
    #[derive(serde::Serialize)]
    struct PlainOut<'a> {
        ts: f64,
        values: &'a [f32],
    }
    serde_cbor::to_vec(&PlainOut { ts, values }).unwrap_or_default()
}

/// Encodes samples in the plain JSON form.
pub fn encode_plain_json(values: &[f32], ts: f64) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({"ts": ts, "values": values})).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_payload_bytes: 64 * 1024,
        max_samples: 256,
    };

    #[test]
    fn all_three_forms_decode_to_the_same_samples() {
        let values = [0.5f32, -1.25, 3.0, 0.1];
        let ts = 1_700_000_000.5;
        for bytes in [
            encode_plain_json(&values, ts),
            encode_plain_cbor(&values, ts),
            encode_senml_json(&values, ts, 0.001),
            encode_senml_cbor(&values, ts, 0.001),
        ] {
            let samples = decode_samples(&bytes, &LIMITS).expect("decodes");
            assert_eq!(samples.values, values);
            assert_eq!(samples.ts, Some(ts));
        }
    }

    #[test]
    fn senml_base_value_and_base_time_are_applied() {
        let bytes = br#"[{"bn":"urn:dev:x","bt":100,"bv":10,"v":1,"t":-1},{"v":2,"t":0}]"#;
        let samples = decode_samples(bytes, &LIMITS).expect("decodes");
        assert_eq!(samples.values, vec![11.0, 12.0]);
        assert_eq!(samples.ts, Some(100.0));
    }

    /// A SenML CBOR payload of the given records, each a list of (label, value).
    fn senml_cbor(records: &[&[(Value, Value)]]) -> Vec<u8> {
        let records = records
            .iter()
            .map(|r| Value::Map(r.iter().cloned().collect()))
            .collect();
        serde_cbor::to_vec(&Value::Array(records)).expect("encode")
    }

    #[test]
    fn senml_cbor_skips_labels_it_does_not_use_and_applies_the_base_fields() {
        let label = |l: i64| Value::Integer(l.into());
        let bytes = senml_cbor(&[
            &[
                (label(-2), Value::Text("urn:dev:x".into())), // bn
                (label(-3), Value::Integer(100)),             // bt
                (label(-5), Value::Float(10.0)),              // bv
                (label(1), Value::Text("m/s2".into())),       // u
                (label(2), Value::Integer(1)),                // v
                (label(6), Value::Float(-1.0)),               // t
            ],
            &[
                (label(2), Value::Float(2.5)),
                (label(4), Value::Bool(true)), // vb
                (label(6), Value::Integer(0)),
            ],
        ]);
        let samples = decode_samples(&bytes, &LIMITS).expect("decodes");
        assert_eq!(samples.values, vec![11.0, 12.5]);
        assert_eq!(samples.ts, Some(100.0));

        for bad in [
            // A text label, as in SenML JSON.
            senml_cbor(&[&[(Value::Text("v".into()), Value::Float(1.0))]]),
            // A value that is not a number.
            senml_cbor(&[&[(label(2), Value::Text("1.0".into()))]]),
            // A record that is not a map.
            serde_cbor::to_vec(&Value::Array(vec![Value::Float(1.0)])).expect("encode"),
            // No value.
            senml_cbor(&[&[(label(6), Value::Float(0.0))]]),
        ] {
            let err = decode_samples(&bad, &LIMITS).expect_err("must be refused");
            assert_eq!(err.kind(), "malformed", "{err}");
        }
    }

    #[test]
    fn plain_cbor_map_is_accepted() {
        let mut map = std::collections::BTreeMap::new();
        map.insert(Value::Text("ts".into()), Value::Float(5.0));
        map.insert(
            Value::Text("values".into()),
            Value::Array(vec![Value::Float(1.5), Value::Integer(2)]),
        );
        let bytes = serde_cbor::to_vec(&Value::Map(map)).expect("encode");
        let samples = decode_samples(&bytes, &LIMITS).expect("decodes");
        assert_eq!(samples.values, vec![1.5, 2.0]);
    }

    #[test]
    fn each_bad_payload_gets_its_own_kind() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"{\"values\": [1, 2".to_vec(), "malformed"),
            (b"[{\"vs\": \"text\"}]".to_vec(), "malformed"),
            (b"{\"values\": [1], \"extra\": 1}".to_vec(), "malformed"),
            (vec![0xff, 0x00, 0x13], "malformed"),
            (b"\"just a string\"".to_vec(), "malformed"),
            (b"{\"values\": []}".to_vec(), "sample_count"),
            (encode_plain_json(&[0.0; 300], 0.0), "sample_count"),
            (b"{\"values\": [1, 1e39]}".to_vec(), "non_finite"),
            (encode_senml_cbor(&[1.0, f32::NAN], 0.0, 0.1), "non_finite"),
            (encode_senml_cbor(&[f32::INFINITY], 0.0, 0.1), "non_finite"),
            (vec![b' '; 70 * 1024], "too_large"),
        ];
        for (bytes, kind) in cases {
            let err = decode_samples(&bytes, &LIMITS).expect_err("must be refused");
            assert_eq!(err.kind(), kind, "{err}");
        }
    }
}
