//! The publisher task: results from the workers to MQTT QoS 1, through the outbox while the
//! broker is away.
//!
//! [`publish_results`] takes the workers' hand-offs (batching them per sensor when
//! `mqtt.result_batch` asks) and gives each message to a [`Sink`]. Without an outbox the sink
//! waits for room in the MQTT client's channel, as a slow broker asks. With one, it waits only
//! while connected: while the broker is away and the client holds all it may, the message goes
//! to the [`Outbox`] instead, so the workers keep serving; and while the outbox holds anything,
//! new messages queue behind it, so results leave oldest first. [`drain_outbox`] hands the
//! outbox back to the client whenever the connection is up and the client has room.

// A driver: it reads the clock for the batcher, the outbox's syncs and its log limiter.
#![allow(clippy::disallowed_methods)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, ClientError, QoS, Request};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::batch::Batcher;
use crate::outbox::{Message, Outbox, OutboxError};
use crate::pool::Outgoing;
use crate::telemetry::{Counters, LogLimiter};

/// Most hand-offs from the workers the publisher takes before it publishes what is full.
const READY_PER_PASS: usize = 64;

/// How often the outbox is offered to the client while it holds anything.
const DRAIN_EVERY: Duration = Duration::from_millis(20);

/// Where result messages go: the MQTT client, or the outbox while the broker is away.
#[derive(Clone)]
pub struct Sink {
    client: AsyncClient,
    counters: Arc<Counters>,
    /// QoS 1 publishes handed to the client, for the drain at a stop.
    qos1_sent: Arc<AtomicU64>,
    connected: watch::Receiver<bool>,
    outbox: Option<Arc<Mutex<Outbox>>>,
    limiter: Arc<Mutex<LogLimiter>>,
}

impl Sink {
    /// A sink into `client`; `connected` is the connection's state, `outbox` the file that
    /// keeps messages while the broker is away (none: wait for the client, always).
    pub fn new(
        client: AsyncClient,
        counters: Arc<Counters>,
        qos1_sent: Arc<AtomicU64>,
        connected: watch::Receiver<bool>,
        outbox: Option<Arc<Mutex<Outbox>>>,
    ) -> Sink {
        Sink {
            client,
            counters,
            qos1_sent,
            connected,
            outbox,
            limiter: Arc::new(Mutex::new(LogLimiter::new(Duration::from_secs(5)))),
        }
    }

    /// Sends one message carrying `results` results.
    pub async fn send(&self, topic: String, payload: Vec<u8>, results: usize) {
        let Some(outbox) = &self.outbox else {
            return self.publish(topic, payload, results).await;
        };
        // Oldest first: while the outbox holds messages, new ones queue behind them.
        if !lock(outbox).is_empty() {
            return self.spill(outbox, topic, payload, results);
        }
        match self
            .client
            .try_publish(topic, QoS::AtLeastOnce, false, payload)
        {
            Ok(()) => self.count_sent(results),
            Err(ClientError::TryRequest(Request::Publish(p))) => {
                let (topic, payload) = (p.topic, p.payload.to_vec());
                // A slow broker, not an absent one: wait for it, as without an outbox, but
                // only while it stays connected. (Dropped as it went, the publish may have
                // reached the client's channel too: then it goes twice, never zero times.)
                let mut connected = self.connected.clone();
                tokio::select! {
                    biased;
                    _ = connected.wait_for(|up| !*up) => {
                        self.spill(outbox, topic, payload, results);
                    }
                    sent = self.client.publish(topic.clone(), QoS::AtLeastOnce, false, payload.clone()) => {
                        match sent {
                            Ok(()) => self.count_sent(results),
                            Err(e) => self.lost(results, &e.to_string()),
                        }
                    }
                }
            }
            Err(e) => self.lost(results, &e.to_string()),
        }
    }

    /// Hands the client as much of the outbox as it takes now, oldest first, if connected.
    pub fn drain(&self) {
        let Some(outbox) = &self.outbox else { return };
        let mut outbox = lock(outbox);
        while *self.connected.borrow() {
            let message = match outbox.peek() {
                Ok(Some(message)) => message,
                Ok(None) => break,
                Err(OutboxError::Record(why)) => {
                    Counters::bump(&self.counters.outbox_unreadable);
                    self.warn("outbox-record", &format!("outbox record dropped: {why}"));
                    if outbox.pop().is_err() {
                        break;
                    }
                    continue;
                }
                Err(e) => {
                    self.warn("outbox-file", &e.to_string());
                    break;
                }
            };
            let results = message.results as usize;
            match self
                .client
                .try_publish(message.topic, QoS::AtLeastOnce, false, message.payload)
            {
                Ok(()) => {
                    if let Err(e) = outbox.pop() {
                        // Sent, but still first in the file: it will go again (at least once).
                        self.warn("outbox-file", &e.to_string());
                        break;
                    }
                    self.count_sent(results);
                    self.counters
                        .outbox_sent
                        .fetch_add(results as u64, Ordering::Relaxed);
                }
                Err(_) => break,
            }
        }
        if let Err(e) = outbox.sync_if_due(Instant::now()) {
            self.warn("outbox-file", &e.to_string());
        }
    }

    /// Appends what the client still held at a stop (results only) and syncs; returns how
    /// many messages were kept.
    pub fn keep(&self, messages: impl IntoIterator<Item = Message>) -> usize {
        let Some(outbox) = &self.outbox else { return 0 };
        let mut kept = 0;
        for m in messages {
            let results = m.results as usize;
            if self.push(outbox, &m) {
                kept += 1;
            } else {
                self.counters
                    .outbox_dropped
                    .fetch_add(results as u64, Ordering::Relaxed);
            }
        }
        if let Err(e) = lock(outbox).sync() {
            self.warn("outbox-file", &e.to_string());
        }
        kept
    }

    /// Whether there is an outbox.
    pub fn has_outbox(&self) -> bool {
        self.outbox.is_some()
    }

    /// Whether the outbox (if any) is empty.
    pub fn outbox_is_empty(&self) -> bool {
        self.outbox.as_ref().is_none_or(|o| lock(o).is_empty())
    }

    async fn publish(&self, topic: String, payload: Vec<u8>, results: usize) {
        match self
            .client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
        {
            Ok(()) => self.count_sent(results),
            Err(e) => self.lost(results, &e.to_string()),
        }
    }

    fn spill(&self, outbox: &Mutex<Outbox>, topic: String, payload: Vec<u8>, results: usize) {
        let message = Message {
            topic,
            payload,
            results: u32::try_from(results).unwrap_or(u32::MAX),
        };
        if !self.push(outbox, &message) {
            self.counters
                .outbox_dropped
                .fetch_add(results as u64, Ordering::Relaxed);
            self.warn("outbox-full", "outbox full or unwritable: results dropped");
        }
    }

    /// Appends one message; counts it as written when it was.
    fn push(&self, outbox: &Mutex<Outbox>, message: &Message) -> bool {
        let mut outbox = lock(outbox);
        let now = Instant::now();
        match outbox.push(message, now) {
            Ok(true) => {
                self.counters
                    .outbox_written
                    .fetch_add(u64::from(message.results), Ordering::Relaxed);
                if let Err(e) = outbox.sync_if_due(now) {
                    self.warn("outbox-file", &e.to_string());
                }
                true
            }
            Ok(false) => false,
            Err(e) => {
                self.warn("outbox-file", &e.to_string());
                false
            }
        }
    }

    fn count_sent(&self, results: usize) {
        self.qos1_sent.fetch_add(1, Ordering::Relaxed);
        self.counters
            .results_published
            .fetch_add(results as u64, Ordering::Relaxed);
    }

    fn lost(&self, results: usize, why: &str) {
        tracing::error!("MQTT client closed, {results} result(s) lost: {why}");
    }

    fn warn(&self, kind: &'static str, what: &str) {
        let allowed = lock(&self.limiter).allow(kind, Instant::now());
        if let Some(suppressed) = allowed {
            tracing::warn!(suppressed, "{what}");
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the outbox leaves it as consistent as the file is: keep going.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Offers the outbox to the client every 20 ms until `stop`.
pub async fn drain_outbox(sink: Sink, stop: CancellationToken) {
    let mut ticks = tokio::time::interval(DRAIN_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = ticks.tick() => sink.drain(),
        }
    }
}

/// Publishes the workers' results until every hand-off channel sender is gone.
pub async fn publish_results(
    sink: Sink,
    mut results: tokio::sync::mpsc::Receiver<Vec<Outgoing>>,
    batching: Option<Batcher>,
) {
    let Some(mut batcher) = batching else {
        while let Some(handed) = results.recv().await {
            for Outgoing { topic, payload } in handed {
                sink.send(topic, payload, 1).await;
            }
        }
        return;
    };
    loop {
        let next = match batcher.next_due() {
            None => results.recv().await,
            Some(due) => tokio::select! {
                next = results.recv() => next,
                () = tokio::time::sleep_until(due.into()) => {
                    for b in batcher.take_due(Instant::now()) {
                        sink.send(b.topic, b.payload, b.results).await;
                    }
                    continue;
                }
            },
        };
        let Some(first) = next else { break };
        // Take what is ready before publishing, so batches fill under load; a bounded
        // amount, so a full batch never waits long for the publisher to look up.
        let now = Instant::now();
        let mut ready = Vec::new();
        let mut handed = vec![first];
        while handed.len() < READY_PER_PASS
            && let Ok(more) = results.try_recv()
        {
            handed.push(more);
        }
        for result in handed.into_iter().flatten() {
            ready.extend(batcher.push(result, now));
        }
        ready.extend(batcher.take_due(now));
        for b in ready {
            sink.send(b.topic, b.payload, b.results).await;
        }
    }
    for b in batcher.take_all() {
        sink.send(b.topic, b.payload, b.results).await;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use rumqttc::{EventLoop, MqttOptions};

    use super::*;

    fn topics(pending: &VecDeque<Request>) -> Vec<String> {
        pending
            .iter()
            .filter_map(|r| match r {
                Request::Publish(p) => Some(p.topic.clone()),
                _ => None,
            })
            .collect()
    }

    /// A sink on a client whose channel holds 4 requests and whose event loop is never
    /// polled; `EventLoop::clean` empties the channel into `pending`, as a dropped
    /// connection would.
    fn sink_on_a_small_channel(
        dir: &std::path::Path,
    ) -> anyhow::Result<(Sink, EventLoop, watch::Sender<bool>)> {
        let (client, eventloop) = AsyncClient::new(MqttOptions::new("t", "127.0.0.1", 1), 4);
        let (outbox, _) = Outbox::open(&dir.join("outbox"), 1 << 20)?;
        let connected = watch::Sender::new(false);
        let sink = Sink::new(
            client,
            Arc::default(),
            Arc::default(),
            connected.subscribe(),
            Some(Arc::new(Mutex::new(outbox))),
        );
        Ok((sink, eventloop, connected))
    }

    #[tokio::test]
    async fn while_the_broker_is_away_results_spill_to_the_outbox_and_leave_it_first_in_order()
    -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let (sink, mut eventloop, connected) = sink_on_a_small_channel(dir.path())?;
        for i in 1..=6 {
            sink.send(format!("r{i}"), vec![], 1).await;
        }
        assert_eq!(sink.counters.outbox_written.load(Ordering::Relaxed), 2);
        eventloop.clean();
        // The channel has room again, but r7 queues behind what the outbox holds.
        sink.send("r7".into(), vec![], 1).await;
        assert_eq!(sink.counters.outbox_written.load(Ordering::Relaxed), 3);
        sink.drain();
        assert!(!sink.outbox_is_empty(), "nothing leaves while disconnected");

        connected.send_replace(true);
        sink.drain();
        assert!(sink.outbox_is_empty());
        assert_eq!(sink.counters.outbox_sent.load(Ordering::Relaxed), 3);
        assert_eq!(sink.counters.results_published.load(Ordering::Relaxed), 7);
        eventloop.clean();
        assert_eq!(
            topics(&eventloop.pending),
            ["r1", "r2", "r3", "r4", "r5", "r6", "r7"]
        );
        Ok(())
    }

    #[tokio::test]
    async fn a_result_waiting_for_a_slow_broker_spills_once_the_connection_drops()
    -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let (sink, _eventloop, connected) = sink_on_a_small_channel(dir.path())?;
        connected.send_replace(true);
        for i in 1..=4 {
            sink.send(format!("r{i}"), vec![], 1).await;
        }
        let waiting = tokio::spawn({
            let sink = sink.clone();
            async move { sink.send("r5".into(), vec![], 1).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "connected: it waits for room");
        assert!(sink.outbox_is_empty());
        connected.send_replace(false);
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the drop releases it")?;
        assert_eq!(sink.counters.outbox_written.load(Ordering::Relaxed), 1);
        Ok(())
    }

    #[tokio::test]
    async fn what_the_client_held_at_a_stop_is_kept_for_the_next_start() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let (sink, _eventloop, _) = sink_on_a_small_channel(dir.path())?;
        let held = (1..=3).map(|i| Message {
            topic: format!("r{i}"),
            payload: vec![],
            results: 2,
        });
        assert_eq!(sink.keep(held), 3);
        assert_eq!(sink.counters.outbox_written.load(Ordering::Relaxed), 6);
        drop(sink);
        let (outbox, _) = Outbox::open(&dir.path().join("outbox"), 1 << 20)?;
        assert_eq!(outbox.len(), 3);
        assert_eq!(outbox.peek()?.map(|m| m.topic), Some("r1".into()));
        Ok(())
    }
}
