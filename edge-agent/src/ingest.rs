//! From MQTT publishes to queued windows: topic → sensor → payload → window → job.
//!
//! [`Ingest`] holds the per-sensor windows and decides, for each publish, whether it is good
//! input. It does no I/O and reads no clock (the caller passes the time in), so the unit tests
//! drive it directly. Each refusal increments the counter named after its kind and logs at a
//! limited rate; nothing a sensor sends can disturb another sensor's window.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use protocol::edge::Topics;
use protocol::{Limits, decode_samples};

use crate::config::{AgentConfig, MAX_WINDOW};
use crate::pool::Job;
use crate::serving::ModelSlots;
use crate::telemetry::{Counters, LogLimiter, ShedBySensor};
use crate::window::Window;

struct Sensor {
    name: Arc<str>,
    model: usize,
    /// The sensor's lane in the local queue: its number among the sensors, in arrival order.
    lane: usize,
    window: Box<Window>,
}

/// The ingest state of one agent.
pub struct Ingest {
    topics: Topics,
    limits: Limits,
    models: Arc<ModelSlots>,
    assigned: HashMap<String, usize>,
    default_model: Option<usize>,
    max_sensors: usize,
    sensors: HashMap<String, Sensor>,
    sensor_gauge: Arc<AtomicUsize>,
    counters: Arc<Counters>,
    shed_by_sensor: Arc<ShedBySensor>,
    /// The sensors of the windows shed while handling one publish.
    shed: Vec<Arc<str>>,
    limiter: LogLimiter,
    next_id: u64,
}

impl Ingest {
    /// Ingest for `config`, serving `models` (loaded from the same config, in order).
    pub fn new(
        config: &AgentConfig,
        models: Arc<ModelSlots>,
        counters: Arc<Counters>,
        shed_by_sensor: Arc<ShedBySensor>,
        sensor_gauge: Arc<AtomicUsize>,
    ) -> Self {
        let index = |name: &str| models.index(name);
        let assigned = config
            .sensors
            .assign
            .iter()
            .filter_map(|(sensor, model)| Some((sensor.clone(), index(model)?)))
            .collect();
        let default_model = config.sensors.default_model.as_deref().and_then(index);
        Ingest {
            topics: config.topics(),
            limits: Limits {
                max_payload_bytes: config.agent.max_payload_bytes,
                max_samples: MAX_WINDOW,
            },
            models,
            assigned,
            default_model,
            max_sensors: config.sensors.max_sensors,
            sensors: HashMap::new(),
            sensor_gauge,
            counters,
            shed_by_sensor,
            shed: Vec::new(),
            limiter: LogLimiter::new(Duration::from_secs(5)),
            next_id: 0,
        }
    }

    /// Handles one publish received at `now` (`wall`: the same moment as Unix seconds),
    /// handing each completed window to `submit`, which takes it and gives back the window it
    /// shed to make room, if any (of this sensor or another).
    pub fn handle_publish(
        &mut self,
        topic: &str,
        payload: &[u8],
        now: Instant,
        wall: f64,
        mut submit: impl FnMut(Job) -> Option<Job>,
    ) {
        Counters::bump(&self.counters.messages_received);
        let Some(sensor_name) = self.topics.sensor_of(topic) else {
            self.refuse("bad_topic", now, || {
                format!("publish on {topic:?} is not a sensor data topic")
            });
            return;
        };
        let samples = match decode_samples(payload, &self.limits) {
            Ok(samples) => samples,
            Err(e) => {
                self.refuse(e.kind(), now, || format!("sensor {sensor_name:?}: {e}"));
                return;
            }
        };
        if !self.sensors.contains_key(sensor_name) {
            let Some(model) = self
                .assigned
                .get(sensor_name)
                .copied()
                .or(self.default_model)
            else {
                self.refuse("unknown_sensor", now, || {
                    format!(
                        "sensor {sensor_name:?} has no model assigned and there is no default model"
                    )
                });
                return;
            };
            if self.sensors.len() >= self.max_sensors {
                let max = self.max_sensors;
                self.refuse("sensor_limit", now, || {
                    format!("sensor {sensor_name:?} refused: already tracking the maximum of {max} sensors")
                });
                return;
            }
            let served = self.models.get(model);
            let sensor = Sensor {
                name: Arc::from(sensor_name),
                model,
                lane: self.sensors.len(),
                window: Box::new(Window::new(served.window, served.stride)),
            };
            self.sensors.insert(sensor_name.to_owned(), sensor);
            self.sensor_gauge
                .store(self.sensors.len(), Ordering::Relaxed);
        }
        let Some(sensor) = self.sensors.get_mut(sensor_name) else {
            return;
        };
        self.counters
            .samples_accepted
            .fetch_add(samples.values.len() as u64, Ordering::Relaxed);
        let ts = samples.ts.unwrap_or(wall);
        let next_id = &mut self.next_id;
        let shed = &mut self.shed;
        sensor.window.push(&samples.values, |window| {
            let job = Job {
                id: *next_id,
                model: sensor.model,
                sensor: Arc::clone(&sensor.name),
                lane: sensor.lane,
                window,
                ts,
                created: now,
            };
            *next_id += 1;
            Counters::bump(&self.counters.windows_enqueued);
            if let Some(dropped) = submit(job) {
                shed.push(dropped.sensor);
            }
        });
        if let Some(from) = self.shed.last().cloned() {
            let n = self.shed.len();
            self.counters
                .windows_shed
                .fetch_add(n as u64, Ordering::Relaxed);
            self.shed_by_sensor.add(self.shed.drain(..));
            if let Some(suppressed) = self.limiter.allow("shed", now) {
                tracing::warn!(
                    suppressed,
                    "inference queue full: shed {n} window(s), the oldest of the sensor holding \
                     the most (last {from:?})"
                );
            }
        }
    }

    fn counter(&self, kind: &str) -> &AtomicU64 {
        let c = &self.counters;
        match kind {
            "too_large" => &c.bad_too_large,
            "malformed" => &c.bad_malformed,
            "sample_count" => &c.bad_sample_count,
            "non_finite" => &c.bad_non_finite,
            "unknown_sensor" => &c.bad_unknown_sensor,
            "sensor_limit" => &c.bad_sensor_limit,
            _ => &c.bad_topic,
        }
    }

    fn refuse(&mut self, kind: &'static str, now: Instant, message: impl FnOnce() -> String) {
        Counters::bump(self.counter(kind));
        if let Some(suppressed) = self.limiter.allow(kind, now) {
            tracing::warn!(kind, suppressed, "refused input: {}", message());
        }
    }
}
