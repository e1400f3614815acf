//! What the edge agent publishes, and the MQTT topic scheme it follows.
//!
//! Topics: sensors publish to `spillway/<site>/<gateway>/<sensor>/data`; the agent answers each
//! window on `…/<sensor>/inference` and keeps a retained status on
//! `spillway/<site>/<gateway>/status`, whose last will is [`OFFLINE`].
//!
//! A result message is one [`InferenceResult`] as a JSON object, or, where the agent batches
//! its results, a JSON array of them for one sensor, oldest first; [`decode_results`] reads
//! both.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The status payload the broker publishes when the agent vanishes.
pub const OFFLINE: &str = r#"{"state":"offline"}"#;

/// The topic scheme of one gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    prefix: String,
}

impl Topics {
    /// Topics of the gateway `gateway` at site `site`.
    pub fn new(site: &str, gateway: &str) -> Self {
        Topics {
            prefix: format!("spillway/{site}/{gateway}"),
        }
    }

    /// The subscription filter for every sensor's data.
    pub fn data_filter(&self) -> String {
        format!("{}/+/data", self.prefix)
    }

    /// Where `sensor` publishes its samples.
    pub fn data(&self, sensor: &str) -> String {
        format!("{}/{sensor}/data", self.prefix)
    }

    /// Where results for `sensor` are published.
    pub fn inference(&self, sensor: &str) -> String {
        format!("{}/{sensor}/inference", self.prefix)
    }

    /// The retained status topic.
    pub fn status(&self) -> String {
        format!("{}/status", self.prefix)
    }

    /// The sensor named by a data topic of this gateway, if it is one.
    pub fn sensor_of<'a>(&self, topic: &'a str) -> Option<&'a str> {
        let rest = topic
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix('/')?;
        let sensor = rest.strip_suffix("/data")?;
        (!sensor.is_empty() && !sensor.contains('/')).then_some(sensor)
    }
}

/// Where a request was served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Route {
    /// On the gateway's own workers.
    Local,
    /// On a cloud replica.
    Remote,
}

/// One inference result, published QoS 1 on the sensor's `inference` topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InferenceResult {
    /// The request id, unique within one agent run.
    pub id: u64,
    /// The sensor whose window this was.
    pub sensor: String,
    /// Model name.
    pub model: String,
    /// Model version.
    pub version: u32,
    /// Where it ran.
    #[serde(rename = "where")]
    pub route: Route,
    /// Time of the window's last sample (from the payload, else arrival time), Unix seconds.
    pub ts: f64,
    /// Time from the window's completion to the result, microseconds.
    pub latency_us: u64,
    /// The anomaly score.
    pub score: f32,
    /// Whether the score crossed the model's anomaly threshold.
    pub anomaly: bool,
    /// Every output of the model, by name, flattened.
    pub outputs: BTreeMap<String, Vec<f32>>,
}

/// Joins results already encoded as JSON objects into one batch message: a JSON array of
/// them, in the order given.
pub fn encode_result_batch<'a>(encoded: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut out = vec![b'['];
    for (i, result) in encoded.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(result);
    }
    out.push(b']');
    out
}

/// The results one message on an `inference` topic carries: one for a JSON object, each
/// element's for a JSON array.
pub fn decode_results(payload: &[u8]) -> Result<Vec<InferenceResult>, serde_json::Error> {
    let first = payload.iter().find(|b| !b.is_ascii_whitespace());
    if first == Some(&b'[') {
        serde_json::from_slice(payload)
    } else {
        serde_json::from_slice(payload).map(|one| vec![one])
    }
}

/// The agent's retained status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// `"online"` (the last will says `"offline"`).
    pub state: String,
    /// Agent version.
    pub version: String,
    /// Seconds since the agent started.
    pub uptime_secs: u64,
    /// Whole-machine CPU use, percent.
    pub cpu_percent: f32,
    /// The agent process's resident memory, bytes.
    pub rss_bytes: u64,
    /// Machine memory in use, bytes.
    pub mem_used_bytes: u64,
    /// Machine memory, bytes.
    pub mem_total_bytes: u64,
    /// Windows waiting for a worker.
    pub queue_depth: usize,
    /// The queue's capacity.
    pub queue_capacity: usize,
    /// Worker threads.
    pub workers: usize,
    /// Sensors with a window.
    pub sensors: usize,
    /// Counters since start, by name.
    pub counters: BTreeMap<String, u64>,
    /// Windows shed since start, by sensor: the sensors shed most (at most eight).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub shed_by_sensor: BTreeMap<String, u64>,
    /// The offload router's view, when offload is configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offload: Option<OffloadStatus>,
}

/// What the offload router believes and does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OffloadStatus {
    /// `off`, `reactive` or `predictive`.
    pub mode: String,
    /// Measured arrivals, windows per second.
    pub arrival_rate: f64,
    /// Forecast arrivals at the horizon, windows per second.
    pub forecast: f64,
    /// Local capacity, windows per second.
    pub capacity: f64,
    /// Smoothed local inference time, microseconds.
    pub service_time_us: u64,
    /// The CPU quota the inference threads run under, in cores (none: no quota).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_limit: Option<f64>,
    /// Share of windows the forecast spill sends to the cloud.
    pub spill_fraction: f64,
    /// Whether the forecast spill is on.
    pub spilling: bool,
    /// Requests at the replicas now.
    pub in_flight: usize,
    /// Every configured replica.
    pub replicas: Vec<ReplicaStatus>,
}

/// One replica as an agent sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicaStatus {
    /// `host:port`.
    pub endpoint: String,
    /// Whether a connection is up.
    pub connected: bool,
    /// Whether it is ejected after a failure.
    pub ejected: bool,
    /// Smoothed request latency, microseconds (0: not measured yet).
    pub latency_us: u64,
    /// Requests waiting on it.
    pub in_flight: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(id: u64) -> InferenceResult {
        InferenceResult {
            id,
            sensor: "s1".into(),
            model: "m".into(),
            version: 2,
            route: Route::Local,
            ts: 1.5,
            latency_us: 40,
            score: 0.25,
            anomaly: false,
            outputs: BTreeMap::from([("score".to_owned(), vec![0.25])]),
        }
    }

    #[test]
    fn a_single_result_and_a_batch_decode_to_the_results_in_order() {
        let one = serde_json::to_vec(&result(7)).expect("encodes");
        assert_eq!(decode_results(&one).expect("decodes"), vec![result(7)]);

        let parts: Vec<Vec<u8>> = (1..=3)
            .map(|id| serde_json::to_vec(&result(id)).expect("encodes"))
            .collect();
        let batch = encode_result_batch(parts.iter().map(Vec::as_slice));
        assert_eq!(batch.first(), Some(&b'['));
        let ids: Vec<u64> = decode_results(&batch)
            .expect("decodes")
            .iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(ids, [1, 2, 3]);
        assert_eq!(
            decode_results(&encode_result_batch([])).expect("decodes"),
            vec![]
        );
    }

    #[test]
    fn a_batch_with_one_bad_element_is_refused_whole() {
        let good = serde_json::to_vec(&result(1)).expect("encodes");
        let batch = encode_result_batch([good.as_slice(), br#"{"id":2}"#.as_slice()]);
        assert!(decode_results(&batch).is_err());
        assert!(decode_results(b"not json").is_err());
    }
}
