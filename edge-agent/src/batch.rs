//! Results grouped per sensor into batch messages, where `mqtt.result_batch` asks for it.
//!
//! One MQTT message per window costs the broker, the network and every subscriber as much as
//! the inference of a small model does. A [`Batcher`] collects the encoded results of each
//! sensor's topic and hands out a [`Batch`] (one JSON array, oldest result first) when the
//! sensor has `max` results waiting, when one more would make the message larger than the
//! broker connection allows, or when the oldest has waited `linger`. It does no I/O and reads
//! no clock: the publisher passes the time in. Memory is bounded by the number of sensors
//! times `max` results.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use protocol::edge::encode_result_batch;

use crate::pool::Outgoing;

/// One message ready to publish.
#[derive(Debug, PartialEq, Eq)]
pub struct Batch {
    /// The sensor's `inference` topic.
    pub topic: String,
    /// A JSON array of the results.
    pub payload: Vec<u8>,
    /// How many results it holds.
    pub results: usize,
}

struct Group {
    serial: u64,
    parts: Vec<Vec<u8>>,
    bytes: usize,
}

/// Pending results, grouped by topic.
pub struct Batcher {
    max: usize,
    max_bytes: usize,
    linger: Duration,
    groups: HashMap<String, Group>,
    /// When each group was opened, oldest first; entries of groups flushed since are stale
    /// (their serial no longer matches) and are skipped.
    opened: VecDeque<(Instant, u64, String)>,
    next_serial: u64,
}

impl Batcher {
    /// At most `max` results and `max_bytes` of payload per batch; a result waits at most
    /// `linger` for others.
    pub fn new(max: usize, max_bytes: usize, linger: Duration) -> Self {
        Batcher {
            max: max.max(1),
            max_bytes,
            linger,
            groups: HashMap::new(),
            opened: VecDeque::new(),
            next_serial: 0,
        }
    }

    /// Adds one encoded result at `now`; returns the batch it completes, or the batch it
    /// would have made too large (the result then opens the next one).
    pub fn push(&mut self, result: Outgoing, now: Instant) -> Option<Batch> {
        let Outgoing { topic, payload } = result;
        let mut done = None;
        if let Some(group) = self.groups.get(&topic)
            && group.bytes + payload.len() + 1 > self.max_bytes
        {
            done = self.flush(&topic);
        }
        let group = match self.groups.get_mut(&topic) {
            Some(group) => group,
            None => {
                let serial = self.next_serial;
                self.next_serial += 1;
                self.opened.push_back((now, serial, topic.clone()));
                self.groups.entry(topic.clone()).or_insert(Group {
                    serial,
                    parts: Vec::with_capacity(self.max.min(64)),
                    bytes: 2,
                })
            }
        };
        group.bytes += payload.len() + 1;
        group.parts.push(payload);
        if group.parts.len() >= self.max {
            // A full batch and an oversized one cannot both happen in one push: the oversized
            // group was flushed, so this one holds a single result, and max > 1 here.
            return done.or_else(|| self.flush(&topic));
        }
        done
    }

    /// When the oldest pending result has waited `linger`, if any result is pending.
    pub fn next_due(&mut self) -> Option<Instant> {
        self.drop_stale();
        self.opened
            .front()
            .map(|(opened, ..)| *opened + self.linger)
    }

    /// The batches whose oldest result has waited `linger` by `now`, oldest first.
    pub fn take_due(&mut self, now: Instant) -> Vec<Batch> {
        let mut due = Vec::new();
        while let Some(at) = self.next_due()
            && at <= now
        {
            if let Some((_, _, topic)) = self.opened.pop_front()
                && let Some(batch) = self.flush(&topic)
            {
                due.push(batch);
            }
        }
        due
    }

    /// Every pending batch, oldest first.
    pub fn take_all(&mut self) -> Vec<Batch> {
        let mut all = Vec::new();
        while self.next_due().is_some() {
            if let Some((_, _, topic)) = self.opened.pop_front()
                && let Some(batch) = self.flush(&topic)
            {
                all.push(batch);
            }
        }
        all
    }

    /// Results waiting.
    pub fn pending(&self) -> usize {
        self.groups.values().map(|g| g.parts.len()).sum()
    }

    fn flush(&mut self, topic: &str) -> Option<Batch> {
        let group = self.groups.remove(topic)?;
        Some(Batch {
            topic: topic.to_owned(),
            payload: encode_result_batch(group.parts.iter().map(Vec::as_slice)),
            results: group.parts.len(),
        })
    }

    fn drop_stale(&mut self) {
        while let Some((_, serial, topic)) = self.opened.front() {
            if self.groups.get(topic).is_some_and(|g| g.serial == *serial) {
                break;
            }
            self.opened.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use protocol::edge::decode_results;

    use super::*;

    const LINGER: Duration = Duration::from_millis(5);

    #[allow(clippy::disallowed_methods)] // one fixed origin; every other time is derived
    fn origin() -> Instant {
        Instant::now()
    }

    fn result(sensor: &str, id: u64) -> Outgoing {
        Outgoing {
            topic: format!("spillway/p/g/{sensor}/inference"),
            payload: format!(
                r#"{{"id":{id},"sensor":"{sensor}","model":"m","version":1,"where":"local","ts":0.0,"latency_us":1,"score":0.5,"anomaly":false,"outputs":{{}}}}"#
            )
            .into_bytes(),
        }
    }

    fn ids(batch: &Batch) -> Vec<u64> {
        let results = decode_results(&batch.payload).expect("a valid batch");
        assert_eq!(results.len(), batch.results);
        results.iter().map(|r| r.id).collect()
    }

    #[test]
    fn a_sensor_s_batch_goes_out_when_full_in_order() {
        let t0 = origin();
        let mut b = Batcher::new(3, 1 << 20, LINGER);
        assert_eq!(b.push(result("a", 1), t0), None);
        assert_eq!(b.push(result("b", 2), t0), None);
        assert_eq!(b.push(result("a", 3), t0), None);
        let full = b.push(result("a", 4), t0).expect("a is full");
        assert_eq!(full.topic, "spillway/p/g/a/inference");
        assert_eq!(ids(&full), [1, 3, 4]);
        assert_eq!(b.pending(), 1, "b's result still waits");
    }

    #[test]
    fn a_result_waits_at_most_the_linger_time() {
        let t0 = origin();
        let mut b = Batcher::new(100, 1 << 20, LINGER);
        b.push(result("a", 1), t0);
        b.push(result("b", 2), t0 + Duration::from_millis(2));
        b.push(result("a", 3), t0 + Duration::from_millis(3));
        assert_eq!(b.next_due(), Some(t0 + LINGER));
        assert!(b.take_due(t0 + Duration::from_millis(4)).is_empty());
        let due = b.take_due(t0 + LINGER);
        assert_eq!(due.len(), 1);
        assert_eq!(ids(&due[0]), [1, 3]);
        assert_eq!(b.next_due(), Some(t0 + Duration::from_millis(2) + LINGER));
        let rest = b.take_all();
        assert_eq!(rest.len(), 1);
        assert_eq!(ids(&rest[0]), [2]);
        assert_eq!((b.next_due(), b.pending()), (None, 0));
    }

    #[test]
    fn a_group_flushed_when_full_restarts_its_linger() {
        let t0 = origin();
        let mut b = Batcher::new(2, 1 << 20, LINGER);
        b.push(result("a", 1), t0);
        assert!(b.push(result("a", 2), t0).is_some());
        let later = t0 + Duration::from_millis(4);
        b.push(result("a", 3), later);
        assert_eq!(
            b.next_due(),
            Some(later + LINGER),
            "the flushed group's entry is stale"
        );
        assert!(b.take_due(t0 + LINGER).is_empty());
    }

    #[test]
    fn no_batch_exceeds_the_byte_limit() {
        let t0 = origin();
        let one = result("a", 1).payload.len();
        // Room for two results and the brackets and commas, not three.
        let mut b = Batcher::new(100, 2 * one + 3, LINGER);
        let mut out = Vec::new();
        for id in 1..=7 {
            out.extend(b.push(result("a", id), t0));
        }
        out.extend(b.take_all());
        let sent: Vec<u64> = out.iter().flat_map(ids).collect();
        assert_eq!(sent, (1..=7).collect::<Vec<_>>());
        for batch in &out {
            assert!(
                batch.payload.len() <= 2 * one + 3,
                "{} bytes",
                batch.payload.len()
            );
        }
    }
}
