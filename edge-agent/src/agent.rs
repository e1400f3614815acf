//! The agent's driver: one task moves MQTT events, the rest is plain state and threads.
//!
//! [`run`] loads the models, starts the worker pool, a publisher task (results → MQTT QoS 1)
//! and a status task (retained status every few seconds), then polls the MQTT event loop,
//! handing publishes to [`Ingest`]. Connection loss is retried with doubling backoff; every
//! (re)connection resubscribes and republishes the online status, and publishes again what the
//! broker had not acknowledged ([`Connection`]). With a `[hub]`, a session
//! task ([`crate::hub`]) enrols if needed, heartbeats and feeds the hub's replica sets to the
//! offload client. On shutdown the agent
//! unsubscribes, lets the workers finish the queue, publishes every result, waits (bounded)
//! for the broker's acknowledgements, marks itself offline and disconnects.

// The driver: it reads the clock and passes the time to everything else.
#![allow(clippy::disallowed_methods)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use protocol::edge::{OFFLINE, Status};
use protocol::frame::Heartbeat;
use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, QoS, SubscribeReasonCode};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::batch::Batcher;
use crate::config::AgentConfig;
use crate::connection::Connection;
use crate::hub::HubContext;
use crate::ingest::Ingest;
use crate::offload::Offload;
use crate::outbox::{Message, Outbox};
use crate::pool::{self, Pool, QueueProbe};
use crate::publisher::{Sink, drain_outbox, publish_results};
use crate::router::Router;
use crate::serving::{ModelSlots, ServedModel};
use crate::status::Sampler;
use crate::telemetry::{Counters, LogLimiter};
use crate::update::Updater;

/// What a finished run did, for the caller's last word.
#[derive(Debug, Clone)]
pub struct RunSummary {
    /// Every counter at the end.
    pub counters: std::collections::BTreeMap<String, u64>,
    /// Whether every QoS 1 publish was acknowledged before the drain timeout.
    pub drained: bool,
}

struct Shared {
    counters: Arc<Counters>,
    shed_by_sensor: Arc<crate::telemetry::ShedBySensor>,
    sensors: Arc<AtomicUsize>,
    /// QoS 1 publishes handed to the client (results and status).
    qos1_sent: Arc<AtomicU64>,
}

/// Runs the agent until `shutdown` is cancelled, then drains and returns.
///
/// Cancel-safe in the sense that matters: cancelling `shutdown` (not dropping the future)
/// is the way to stop it, and it then finishes in-flight work before returning.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> anyhow::Result<RunSummary> {
    let models = Arc::new(ModelSlots::new(
        ServedModel::load_all(&config)?,
        config.hub.shadow_every,
    ));
    let shared = Arc::new(Shared {
        counters: Arc::new(Counters::default()),
        shed_by_sensor: Arc::default(),
        sensors: Arc::new(AtomicUsize::new(0)),
        qos1_sent: Arc::default(),
    });
    let updater = config.hub.endpoint.is_some().then(|| {
        let updater = Arc::new(Updater::new(
            &config,
            Arc::clone(&models),
            Arc::clone(&shared.counters),
        ));
        updater.restore();
        updater
    });
    for m in models.all() {
        tracing::info!(model = %m.name, version = m.version, window = m.window, stride = m.stride, "model ready");
    }
    let topics = config.topics();

    let mut options = match &config.mqtt.unix_socket {
        Some(path) => {
            let mut options =
                MqttOptions::new(config.client_id(), path.to_string_lossy().into_owned(), 0);
            options.set_transport(rumqttc::Transport::Unix);
            options
        }
        None => MqttOptions::new(
            config.client_id(),
            config.mqtt.host.clone(),
            config.mqtt.port,
        ),
    };
    options
        .set_keep_alive(Duration::from_secs(config.mqtt.keep_alive_secs))
        .set_clean_session(!config.mqtt.persistent_session)
        .set_max_packet_size(config.mqtt.max_packet_bytes, config.mqtt.max_packet_bytes)
        .set_last_will(LastWill::new(
            topics.status(),
            OFFLINE,
            QoS::AtLeastOnce,
            true,
        ));
    if let (Some(user), Some(pass)) = (&config.mqtt.username, &config.mqtt.password) {
        options.set_credentials(user.clone(), pass.clone());
    }
    let (client, mut eventloop) = AsyncClient::new(options, config.mqtt.request_capacity);
    // Results and acknowledgements are small packets: without TCP_NODELAY, Nagle's algorithm
    // holds one back until the broker's delayed ACK (40 ms) after the previous one. The event
    // loop writes the acknowledgements of all it read at once, but each publish with a write
    // of its own (rumqttc 0.25 flushes after every request: about one `writev` per result
    // under load); `mqtt.result_batch` is what puts several results in one write.
    let mut network = rumqttc::NetworkOptions::new();
    network.set_tcp_nodelay(true);
    eventloop.set_network_options(network);
    let mut connection = Connection::new(eventloop, Arc::clone(&shared.counters));

    // Hand-offs of up to `HANDOFF_MAX` results each: a bound of about a queue's worth of
    // results under load, and room for 64 single results when the load is light.
    let (results_tx, results_rx) = tokio::sync::mpsc::channel(
        config
            .agent
            .queue_capacity
            .div_ceil(pool::HANDOFF_MAX)
            .max(64),
    );
    let workers = config.worker_count();
    let pool = Pool::start(
        workers,
        config.agent.queue_capacity,
        Arc::clone(&models),
        topics.clone(),
        results_tx.clone(),
        Arc::clone(&shared.counters),
    )?;
    let queue_probe = pool.probe();
    tracing::info!(
        workers,
        queue = config.agent.queue_capacity,
        "worker pool started"
    );
    let offload = match config.offload_mode() {
        models::offload::Mode::Off => None,
        mode => {
            tracing::info!(mode = mode.name(), replicas = ?config.offload.replicas, "offload on");
            Some(Offload::start(
                &config.offload,
                config.offload_identity().as_ref(),
                Arc::clone(&models),
                topics.clone(),
                results_tx.clone(),
                pool.local_queue(),
                Arc::clone(&shared.counters),
            )?)
        }
    };
    // Until the workers have measured themselves, the models' warm-up runs tell the speed.
    let initial_service = models
        .all()
        .iter()
        .map(|m| m.probe_time)
        .max()
        .unwrap_or(Duration::from_millis(1));
    let router = Arc::new(std::sync::Mutex::new(Router::new(
        &config,
        workers,
        initial_service,
        offload,
        pool.meter(),
        Arc::clone(&shared.counters),
    )));
    drop(results_tx);
    // Room in each message for the topic and the MQTT header.
    let batching = (config.mqtt.result_batch > 1).then(|| {
        Batcher::new(
            config.mqtt.result_batch,
            config.mqtt.max_packet_bytes.saturating_sub(1024),
            Duration::from_millis(config.mqtt.result_linger_ms),
        )
    });
    let outbox = match &config.mqtt.outbox_path {
        Some(path) => Some(Arc::new(std::sync::Mutex::new(open_outbox(
            path,
            config.mqtt.outbox_max_bytes,
            &shared.counters,
        )?))),
        None => None,
    };
    let sink = Sink::new(
        client.clone(),
        Arc::clone(&shared.counters),
        Arc::clone(&shared.qos1_sent),
        connection.connected(),
        outbox,
    );
    let publisher = tokio::spawn(publish_results(sink.clone(), results_rx, batching));
    let drainer_stop = CancellationToken::new();
    let drainer = sink
        .has_outbox()
        .then(|| tokio::spawn(drain_outbox(sink.clone(), drainer_stop.clone())));

    let status_stop = CancellationToken::new();
    let status_task = {
        let client = client.clone();
        let topic = topics.status();
        let interval = Duration::from_secs(config.agent.status_interval_secs);
        let mut reporter = StatusReporter {
            started: Instant::now(),
            sampler: Sampler::new(),
            queue: queue_probe,
            queue_capacity: config.agent.queue_capacity,
            workers,
            shared: Arc::clone(&shared),
            router: Arc::clone(&router),
        };
        let stop = status_stop.clone();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(interval);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = ticks.tick() => {}
                }
                let payload = reporter.encode("online");
                if client
                    .publish(topic.as_str(), QoS::AtLeastOnce, true, payload)
                    .await
                    .is_ok()
                {
                    reporter.shared.qos1_sent.fetch_add(1, Ordering::Relaxed);
                }
            }
            reporter
        })
    };

    let hub_task = config.hub.endpoint.as_ref().map(|hub| {
        tracing::info!(%hub, "reporting to the hub");
        let offload = lock(&router).offload_handle();
        let context = HubContext {
            config: config.hub.clone(),
            agent: config.agent.gateway.clone(),
            site: config.agent.site.clone(),
            models: Arc::clone(&models),
            updater: updater.clone(),
            offload,
            report: Box::new(
                HeartbeatSource {
                    sampler: Sampler::new(),
                    queue: pool.probe(),
                    shared: Arc::clone(&shared),
                    router: Arc::clone(&router),
                    models: Arc::clone(&models),
                    updater: updater.clone(),
                    last: (0, 0),
                }
                .into_fn(),
            ),
            counters: Arc::clone(&shared.counters),
        };
        tokio::spawn(crate::hub::run(context, status_stop.clone()))
    });

    let watchdog_stop = CancellationToken::new();
    let watchdog = tokio::spawn(crate::systemd::watchdog(
        pool.probe(),
        Arc::clone(&shared.counters),
        watchdog_stop.clone(),
    ));
    crate::systemd::ready();

    let mut ingest = Ingest::new(
        &config,
        Arc::clone(&models),
        Arc::clone(&shared.counters),
        Arc::clone(&shared.shed_by_sensor),
        Arc::clone(&shared.sensors),
    );
    let mut limiter = LogLimiter::new(Duration::from_secs(5));
    let backoff_min = Duration::from_millis(config.mqtt.reconnect_min_ms);
    let backoff_max = Duration::from_millis(config.mqtt.reconnect_max_ms);
    let mut backoff = backoff_min;
    let filter = topics.data_filter();

    // Phase 1: serve until asked to stop.
    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => break,
            event = connection.poll() => event,
        };
        match event {
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                let now = Instant::now();
                let mut router = lock(&router);
                ingest.handle_publish(&publish.topic, &publish.payload, now, unix_now(), |job| {
                    router.submit(job, &pool, now)
                });
            }
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff = backoff_min;
                Counters::bump(&shared.counters.mqtt_connects);
                tracing::info!(broker = %config.mqtt.broker(), "connected to the broker");
                // The request channel may be full of results after an outage; subscribing
                // must not wait behind them in this task, which is the one that drains it.
                let client = client.clone();
                let filter = filter.clone();
                tokio::spawn(async move {
                    if let Err(e) = client.subscribe(filter, QoS::AtLeastOnce).await {
                        tracing::warn!("cannot subscribe: {e}");
                    }
                });
            }
            Ok(Event::Incoming(Packet::PubAck(_))) => {
                Counters::bump(&shared.counters.mqtt_acks);
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                if ack
                    .return_codes
                    .iter()
                    .all(|c| matches!(c, SubscribeReasonCode::Success(_)))
                {
                    Counters::bump(&shared.counters.mqtt_subscriptions);
                    tracing::info!(filter = %filter, "subscribed");
                } else {
                    // The broker's access rules refuse it: nothing arrives until they change.
                    Counters::bump(&shared.counters.mqtt_subscriptions_refused);
                    tracing::error!(filter = %filter, "the broker refused the subscription");
                }
            }
            Ok(_) => {}
            Err(e) => {
                Counters::bump(&shared.counters.mqtt_connection_errors);
                if let Some(suppressed) = limiter.allow("mqtt", Instant::now()) {
                    tracing::warn!(
                        suppressed,
                        retry_in_ms = backoff.as_millis() as u64,
                        "broker connection: {e}"
                    );
                }
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(backoff_max);
            }
        }
    }

    // Phase 2: stop taking input. Windows that arrive before the broker confirms the
    // unsubscribe are still served.
    tracing::info!("shutting down: draining in-flight work");
    crate::systemd::stopping();
    let deadline =
        tokio::time::Instant::now() + Duration::from_millis(config.agent.drain_timeout_ms);
    status_stop.cancel();
    if client.try_unsubscribe(filter).is_ok() {
        let unsubscribed = tokio::time::Instant::now() + Duration::from_secs(1);
        while let Ok(event) =
            tokio::time::timeout_at(unsubscribed.min(deadline), connection.poll()).await
        {
            match event {
                Ok(Event::Incoming(Packet::UnsubAck(_))) => break,
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    let now = Instant::now();
                    let mut router = lock(&router);
                    ingest.handle_publish(
                        &publish.topic,
                        &publish.payload,
                        now,
                        unix_now(),
                        |job| router.submit(job, &pool, now),
                    );
                }
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    Counters::bump(&shared.counters.mqtt_acks);
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    }

    // Phase 3: finish the queue, publish every result and await the acknowledgements.
    // Remote requests end first (each by its deadline, falling back to the local queue),
    // then the workers finish the queue.
    let offload = lock(&router).take_offload();
    let closing = tokio::spawn(async move {
        if let Some(offload) = offload {
            offload.close().await;
        }
        tokio::task::spawn_blocking(move || pool.close()).await
    });
    let mut publisher: Option<JoinHandle<()>> = Some(publisher);
    let mut closing = Some(closing);
    let drained = loop {
        if closing.as_ref().is_some_and(JoinHandle::is_finished) {
            closing = None;
        }
        if closing.is_none() && publisher.as_ref().is_some_and(JoinHandle::is_finished) {
            publisher = None;
        }
        let all_acked = shared.counters.mqtt_acks.load(Ordering::Relaxed)
            >= shared.qos1_sent.load(Ordering::Relaxed);
        if publisher.is_none() && all_acked && sink.outbox_is_empty() {
            break true;
        }
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        if remaining.is_zero() {
            break false;
        }
        // Poll in short slices so the pool and the publisher are checked often.
        match tokio::time::timeout(remaining.min(Duration::from_millis(20)), connection.poll())
            .await
        {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => {
                Counters::bump(&shared.counters.mqtt_acks);
            }
            Ok(Ok(Event::Incoming(Packet::Publish(_)))) => {
                Counters::bump(&shared.counters.messages_after_shutdown);
            }
            Ok(Ok(_)) | Err(_) => {}
            Ok(Err(e)) => {
                Counters::bump(&shared.counters.mqtt_connection_errors);
                tracing::debug!("broker connection while draining: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    drainer_stop.cancel();
    if let Some(drainer) = drainer {
        let _ = drainer.await;
    }
    if !drained {
        tracing::warn!(
            sent = shared.qos1_sent.load(Ordering::Relaxed),
            acked = shared.counters.mqtt_acks.load(Ordering::Relaxed),
            waiting_for_the_broker = connection.carried(),
            "drain timeout: not every result was acknowledged"
        );
    }
    if !drained && sink.has_outbox() {
        // What the client still holds goes to the outbox for the next start (the status
        // is republished anyway). Taking it drops the connection, so only with an outbox.
        let status_topic = topics.status();
        let unacknowledged = connection
            .take_unacknowledged()
            .into_iter()
            .filter(|p| p.topic != status_topic)
            .map(|p| Message {
                results: result_count(&p.payload),
                topic: p.topic,
                payload: p.payload.to_vec(),
            });
        let kept = sink.keep(unacknowledged);
        if kept > 0 {
            tracing::info!(kept, "unacknowledged result messages kept in the outbox");
        }
    }
    // A clean stop says so itself, with the final counters; the last will is only for an
    // agent that vanished.
    if let Some(task) = hub_task {
        let _ = task.await;
    }
    let last_word = match status_task.await {
        Ok(mut reporter) => reporter.encode("offline"),
        Err(_) => OFFLINE.as_bytes().to_vec(),
    };
    let _ = client.try_publish(topics.status(), QoS::AtLeastOnce, true, last_word);
    let _ = client.try_disconnect();
    let bye = tokio::time::Instant::now() + Duration::from_millis(500);
    while let Ok(Ok(event)) = tokio::time::timeout_at(bye, connection.poll()).await {
        if matches!(event, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
            break;
        }
    }
    watchdog_stop.cancel();
    let _ = watchdog.await;
    let counters = shared.counters.snapshot();
    tracing::info!(?counters, drained, "stopped");
    Ok(RunSummary { counters, drained })
}

fn lock(router: &std::sync::Mutex<Router>) -> std::sync::MutexGuard<'_, Router> {
    // A panic while routing cannot leave the router inconsistent in a way that matters
    // more than stopping would: keep serving.
    router
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Builds the retained status message.
struct StatusReporter {
    started: Instant,
    sampler: Sampler,
    queue: QueueProbe,
    queue_capacity: usize,
    workers: usize,
    shared: Arc<Shared>,
    router: Arc<std::sync::Mutex<Router>>,
}

impl StatusReporter {
    fn encode(&mut self, state: &str) -> Vec<u8> {
        let load = self.sampler.sample();
        let offload = {
            let mut router = lock(&self.router);
            router.advance(Instant::now());
            router.status()
        };
        let status = Status {
            state: state.into(),
            version: env!("CARGO_PKG_VERSION").into(),
            uptime_secs: self.started.elapsed().as_secs(),
            cpu_percent: load.cpu_percent,
            rss_bytes: load.rss_bytes,
            mem_used_bytes: load.mem_used_bytes,
            mem_total_bytes: load.mem_total_bytes,
            queue_depth: self.queue.len(),
            queue_capacity: self.queue_capacity,
            workers: self.workers,
            sensors: self.shared.sensors.load(Ordering::Relaxed),
            counters: self.shared.counters.snapshot(),
            shed_by_sensor: self
                .shared
                .shed_by_sensor
                .top(crate::telemetry::SHED_SENSORS_REPORTED),
            offload,
        };
        serde_json::to_vec(&status).unwrap_or_default()
    }
}

/// Builds the hub heartbeats.
struct HeartbeatSource {
    sampler: Sampler,
    queue: QueueProbe,
    shared: Arc<Shared>,
    router: Arc<std::sync::Mutex<Router>>,
    models: Arc<ModelSlots>,
    updater: Option<Arc<Updater>>,
    /// Windows routed remote and in all, at the last heartbeat.
    last: (u64, u64),
}

impl HeartbeatSource {
    fn into_fn(mut self) -> impl FnMut() -> Heartbeat + Send + Sync {
        move || self.heartbeat()
    }

    fn heartbeat(&mut self) -> Heartbeat {
        if let Some(updater) = &self.updater {
            updater.check();
        }
        let load = self.sampler.sample();
        let (policy, demand, in_flight) = {
            let mut router = lock(&self.router);
            router.advance(Instant::now());
            router.heartbeat_figures()
        };
        let counters = self.shared.counters.snapshot();
        let get = |k: &str| counters.get(k).copied().unwrap_or(0);
        let remote = get("routed_remote_forecast")
            + get("routed_remote_guard")
            + get("routed_remote_overflow");
        let total = remote
            + get("routed_local")
            + get("local_cloud_unreachable")
            + get("local_remote_too_slow")
            + get("local_offload_busy");
        let (last_remote, last_total) = self.last;
        self.last = (remote, total);
        let share = if total > last_total {
            (remote - last_remote) as f32 / (total - last_total) as f32
        } else {
            0.0
        };
        Heartbeat {
            seq: 0,
            arrival_rate: policy.arrival_rate as f32,
            capacity: policy.capacity as f32,
            forecast: policy.forecast as f32,
            offload_demand: demand as f32,
            queue_depth: self.queue.len() as u32,
            offload_share: share,
            in_flight: in_flight as u32,
            cpu: load.cpu_percent / 100.0,
            memory_bytes: load.rss_bytes,
            models: self.models.versions(),
            counters: counters.into_iter().collect(),
            health: self.models.health(),
        }
    }
}

/// Opens the outbox; a damaged file is set aside (and counted), an unusable path is an error.
fn open_outbox(
    path: &std::path::Path,
    max_bytes: u64,
    counters: &Counters,
) -> anyhow::Result<Outbox> {
    let (outbox, set_aside) = Outbox::open(path, max_bytes)?;
    if let Some(why) = set_aside {
        Counters::bump(&counters.outbox_unreadable);
        tracing::error!("outbox unreadable, started a new one: {why}");
    }
    if !outbox.is_empty() {
        tracing::info!(
            messages = outbox.len(),
            path = %path.display(),
            "result messages from an earlier run wait in the outbox"
        );
    }
    Ok(outbox)
}

/// Results in a result message: one object, or an array of them.
fn result_count(payload: &[u8]) -> u32 {
    protocol::edge::decode_results(payload).map_or(1, |r| u32::try_from(r.len()).unwrap_or(1))
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
