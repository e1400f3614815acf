//! Counters and rate-limited logging.
//!
//! Every event the agent may need to explain later (a refused payload, a shed window, a lost
//! broker) increments a named counter; the counters travel in the retained status message. A
//! log line for the same kind of event is written at most once per interval, and says how many
//! were suppressed in between, so a flood of bad input cannot flood the log.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        /// The agent's counters, shared by its tasks and threads.
        #[derive(Debug, Default)]
        pub struct Counters {
            $($(#[$doc])* pub $name: AtomicU64,)*
        }

        impl Counters {
            /// A copy of every counter, by name.
            pub fn snapshot(&self) -> BTreeMap<String, u64> {
                let mut map = BTreeMap::new();
                $(map.insert(stringify!($name).to_owned(), self.$name.load(Ordering::Relaxed));)*
                map
            }
        }
    };
}

counters! {
    /// Publishes received on the data topics.
    messages_received,
    /// Samples accepted into windows.
    samples_accepted,
    /// Windows completed and handed to the router (local queue or cloud).
    windows_enqueued,
    /// Queued windows dropped to make room in a full queue: the oldest of the sensor holding
    /// the most. A window is served unless it is counted here.
    windows_shed,
    /// Inferences that produced a result.
    inferences_ok,
    /// Inferences that failed in the model.
    inference_errors,
    /// Results handed to the MQTT client.
    results_published,
    /// QoS 1 publishes (results and status) the broker acknowledged.
    mqtt_acks,
    /// Payloads larger than the limit.
    bad_too_large,
    /// Payloads that were not valid JSON/CBOR or not an accepted form.
    bad_malformed,
    /// Payloads with no samples or too many.
    bad_sample_count,
    /// Payloads with NaN or infinite values.
    bad_non_finite,
    /// Data from sensors with no model assigned.
    bad_unknown_sensor,
    /// Data from new sensors beyond `sensors.max_sensors`.
    bad_sensor_limit,
    /// Publishes on topics that are not a sensor's data topic.
    bad_topic,
    /// Publishes that arrived after the agent stopped taking input.
    messages_after_shutdown,
    /// Connections to the broker established.
    mqtt_connects,
    /// Subscriptions to the data topics the broker granted (one per connection).
    mqtt_subscriptions,
    /// Subscriptions to the data topics the broker refused.
    mqtt_subscriptions_refused,
    /// Connections to the broker lost or refused.
    mqtt_connection_errors,
    /// QoS 1 publishes the broker had not acknowledged when a connection dropped, published
    /// again on the next one (a subscriber may see such a result twice, never zero times).
    mqtt_republished,
    /// Results written to the outbox while the broker was away (or left at a stop).
    outbox_written,
    /// Results from the outbox handed to the MQTT client.
    outbox_sent,
    /// Results dropped because the outbox was full (`mqtt.outbox_max_bytes`) or unwritable.
    outbox_dropped,
    /// Outbox records or files that could not be read, dropped (a file is moved aside).
    outbox_unreadable,
    /// Enrolments with the hub that succeeded.
    hub_enrolments,
    /// Sessions with the hub established.
    hub_connects,
    /// Hub sessions or enrolments that failed or ended.
    hub_errors,
    /// Model updates installed.
    model_updates,
    /// Model updates refused (signature, digest, downgrade, shape) or failed to load.
    model_update_failures,
    /// Switches back to a previous model version.
    model_rollbacks,
    /// Model downloads that went on from where a dropped one stopped.
    model_download_resumes,
    /// Windows kept local with nothing to do.
    routed_local,
    /// Windows sent remote because the forecast says the agent will saturate.
    routed_remote_forecast,
    /// Windows sent remote because the local queue would make them miss the SLO.
    routed_remote_guard,
    /// Windows the full local queue shed that a replica took instead.
    routed_remote_overflow,
    /// Windows that should have gone remote but no replica was reachable.
    local_cloud_unreachable,
    /// Windows kept local because the cloud's latency did not fit or did not pay.
    local_remote_too_slow,
    /// Windows kept local because `offload.max_in_flight` requests were already out.
    local_offload_busy,
    /// Results computed by a replica.
    remote_results,
    /// Remote requests that failed (connection, stream or replica error).
    remote_errors,
    /// Remote requests that got no answer in time.
    remote_timeouts,
    /// Remote failures whose window then ran locally.
    remote_fallbacks,
    /// Fallbacks that waited for local room past their deadline.
    remote_fallbacks_late,
    /// Replicas ejected after a failure.
    replica_ejections,
    /// Connections to replicas established.
    replica_connects,
    /// Connections to replicas lost.
    replica_disconnects,
    /// Failed attempts to connect to a replica.
    replica_connect_errors,
}

impl Counters {
    /// Adds one to `counter`.
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Windows shed, by the sensor they came from: `windows_shed` says how many, this says whose.
///
/// Written by the ingest task only when it sheds, read by the status reporter. It holds one
/// entry per sensor ever shed, so `sensors.max_sensors` bounds it.
#[derive(Debug, Default)]
pub struct ShedBySensor(Mutex<HashMap<Arc<str>, u64>>);

/// Sensors the status message names in `shed_by_sensor`.
pub const SHED_SENSORS_REPORTED: usize = 8;

impl ShedBySensor {
    /// Counts windows shed from `sensors`, one entry per window.
    pub fn add(&self, sensors: impl IntoIterator<Item = Arc<str>>) {
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        for sensor in sensors {
            *map.entry(sensor).or_default() += 1;
        }
    }

    /// The `most` sensors shed most, with their counts (ties by name).
    pub fn top(&self, most: usize) -> BTreeMap<String, u64> {
        let map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let mut all: Vec<(&Arc<str>, u64)> = map.iter().map(|(s, n)| (s, *n)).collect();
        all.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
        all.into_iter()
            .take(most)
            .map(|(s, n)| (s.to_string(), n))
            .collect()
    }
}

/// Lets one log line per kind through per interval.
#[derive(Debug)]
pub struct LogLimiter {
    interval: Duration,
    last: HashMap<&'static str, (Instant, u64)>,
}

impl LogLimiter {
    /// At most one line per kind per `interval`.
    pub fn new(interval: Duration) -> Self {
        LogLimiter {
            interval,
            last: HashMap::new(),
        }
    }

    /// Whether a line of `kind` may be written at `now`; if so, how many were suppressed since
    /// the last one.
    pub fn allow(&mut self, kind: &'static str, now: Instant) -> Option<u64> {
        match self.last.get_mut(kind) {
            Some((at, suppressed)) if now.duration_since(*at) < self.interval => {
                *suppressed += 1;
                None
            }
            Some((at, suppressed)) => {
                let n = *suppressed;
                *at = now;
                *suppressed = 0;
                Some(n)
            }
            None => {
                self.last.insert(kind, (now, 0));
                Some(0)
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;

    #[test]
    fn limiter_passes_one_line_per_interval_and_counts_the_rest() {
        let mut limiter = LogLimiter::new(Duration::from_secs(1));
        let t0 = Instant::now();
        assert_eq!(limiter.allow("malformed", t0), Some(0));
        for i in 1..=5 {
            assert_eq!(
                limiter.allow("malformed", t0 + Duration::from_millis(i * 100)),
                None
            );
        }
        assert_eq!(
            limiter.allow("too_large", t0),
            Some(0),
            "kinds are limited separately"
        );
        assert_eq!(
            limiter.allow("malformed", t0 + Duration::from_secs(1)),
            Some(5)
        );
    }

    #[test]
    fn the_sensors_shed_most_are_reported_first() {
        let shed = ShedBySensor::default();
        assert!(shed.top(2).is_empty());
        let name = |s: &str| Arc::<str>::from(s);
        shed.add([name("b"), name("flood"), name("a"), name("flood")]);
        shed.add([name("flood"), name("c")]);
        let top = shed.top(2);
        assert_eq!(top.len(), 2);
        assert_eq!(top["flood"], 3);
        assert_eq!(top["a"], 1, "ties go by name");
        assert_eq!(shed.top(10).len(), 4);
    }

    #[test]
    fn snapshot_names_every_counter() {
        let c = Counters::default();
        Counters::bump(&c.windows_shed);
        let snap = c.snapshot();
        assert_eq!(snap["windows_shed"], 1);
        assert_eq!(snap["bad_malformed"], 0);
    }
}
