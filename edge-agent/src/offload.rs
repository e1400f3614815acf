//! The offload client: QUIC connections to the cloud replicas and the requests sent on them.
//!
//! One task per replica keeps a mutual-TLS connection open (keep-alive) and re-establishes it
//! with doubling backoff when it drops. A window sent remote becomes one bidirectional stream:
//! an [`InferRequest`] frame out, one frame back. The replica is chosen by power of two
//! choices over a latency EWMA weighted by the requests already in flight; a replica that
//! fails, errs or times out is ejected for `eject_ms`. Every remote failure falls back to the
//! local queue inside the window's deadline, and each window is owned by exactly one place at
//! a time (the request task, then the local queue), so no window is ever answered twice: a
//! late remote answer after a fallback has nobody left to publish it.
//!
//! The endpoint, its connections and the request tasks all run on one thread of their own
//! (a current-thread runtime): a datagram that arrives wakes the endpoint, the connection
//! and the request task on the thread that read it, instead of handing each on to another
//! worker thread. On a 2-core gateway that is most of a round trip's latency.

// The offload client is a driver: it measures latencies and deadlines with the clock.
#![allow(clippy::disallowed_methods)]

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use protocol::edge::{ReplicaStatus, Route, Topics};
use protocol::frame::{
    self, Decoded, Decoder, ErrorCode, HEADER_LEN, InferRequest, Message, RequestId,
};
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Identity, OffloadSection};
use crate::pool::{Job, LocalQueue, Outgoing, finish};
use crate::serving::ModelSlots;
use crate::telemetry::{Counters, LogLimiter};

/// Largest response frame accepted from a replica.
const MAX_RESPONSE: usize = 1 << 20;
/// A request times out after this many times the replica's usual latency…
const TIMEOUT_FACTOR: u32 = 8;
/// …but never sooner than this (a lost packet on a lossy link costs a few RTTs).
const MIN_TIMEOUT: Duration = Duration::from_millis(100);
/// A replica is ejected after this many failures in a row (a broken connection at once).
const EJECT_AFTER: u32 = 3;
/// What a live replica may take to acknowledge a request beyond a round trip (QUIC's
/// default maximum ACK delay, and some scheduling).
const ACK_ALLOWANCE: Duration = Duration::from_millis(40);

/// QUIC client settings: the agent's certificate, the fleet CA as the only root, ALPN
/// `spillway/2`, TLS 1.3, keep-alive.
pub fn client_config(
    ca: &std::path::Path,
    cert: &std::path::Path,
    key: &std::path::Path,
) -> anyhow::Result<quinn::ClientConfig> {
    let mut roots = RootCertStore::empty();
    for ca in
        CertificateDer::pem_file_iter(ca).with_context(|| format!("reading {}", ca.display()))?
    {
        roots
            .add(ca.context("the CA file is not PEM")?)
            .context("the fleet CA certificate is not usable")?;
    }
    let chain = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{} is not a PEM certificate", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("{} is not a PEM private key", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .context("the agent certificate does not match its key")?;
    tls.alpn_protocols = vec![frame::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(Duration::from_secs(1)));
    transport.max_idle_timeout(Some(Duration::from_secs(5).try_into()?));
    // BBR paces by measured bandwidth and RTT instead of halving on every loss, so a lossy
    // uplink keeps its throughput.
    transport.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// Sends one request on `conn` and reads the one-frame answer.
pub async fn exchange(conn: &quinn::Connection, request: &Message) -> anyhow::Result<Message> {
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(&frame::encode(request)).await?;
    send.finish()?;
    let bytes = recv.read_to_end(HEADER_LEN + MAX_RESPONSE).await?;
    match Decoder::new(MAX_RESPONSE).decode(&bytes)? {
        Decoded::Frame { message, consumed } if consumed == bytes.len() => Ok(message),
        Decoded::Frame { .. } => anyhow::bail!("bytes after the response frame"),
        Decoded::NeedMore(_) => anyhow::bail!("truncated response frame"),
    }
}

/// One replica as the agent sees it.
#[derive(Debug)]
struct Slot {
    endpoint: String,
    /// The model it serves; `None` for replicas from the config, which serve every model.
    model: Option<String>,
    /// The model version it serves; 0 when not known (replicas from the config).
    version: u32,
    /// Ends this slot's connection keeper when the replica leaves the set.
    stop: CancellationToken,
    conn: Mutex<Option<quinn::Connection>>,
    /// Smoothed request latency, µs; 0 until measured.
    ewma_us: AtomicU64,
    in_flight: AtomicU32,
    ejected_until: Mutex<Option<Instant>>,
    /// Failures since the last success.
    failures: AtomicU32,
}

impl Slot {
    fn new(
        endpoint: String,
        model: Option<String>,
        version: u32,
        parent: &CancellationToken,
    ) -> Slot {
        Slot {
            endpoint,
            model,
            version,
            stop: parent.child_token(),
            conn: Mutex::new(None),
            ewma_us: AtomicU64::new(0),
            in_flight: AtomicU32::new(0),
            ejected_until: Mutex::new(None),
            failures: AtomicU32::new(0),
        }
    }

    fn connection(&self) -> Option<quinn::Connection> {
        self.conn.lock().ok()?.clone()
    }

    fn available(&self, now: Instant) -> bool {
        let ejected = self
            .ejected_until
            .lock()
            .ok()
            .and_then(|e| *e)
            .is_some_and(|until| now < until);
        !ejected && self.connection().is_some()
    }

    /// Expected latency of one request, alone: the measured EWMA, never below the
    /// transport's current RTT (which keep-alives refresh even when no request runs).
    fn latency(&self) -> Duration {
        let ewma = Duration::from_micros(self.ewma_us.load(Ordering::Relaxed));
        match self.connection() {
            Some(conn) if ewma.is_zero() => conn.rtt() + Duration::from_millis(1),
            Some(conn) => ewma.max(conn.rtt()),
            None => ewma,
        }
    }

    /// Load-weighted cost for choosing between replicas (latency × (requests out + 1)).
    fn expected(&self) -> Duration {
        self.latency() * (self.in_flight.load(Ordering::Relaxed) + 1)
    }

    fn observe(&self, took: Duration) {
        let x = took.as_micros().max(1) as u64;
        let old = self.ewma_us.load(Ordering::Relaxed);
        let new = if old == 0 { x } else { (old * 7 + x) / 8 };
        self.ewma_us.store(new, Ordering::Relaxed);
    }

    fn eject(&self, until: Instant) {
        if let Ok(mut e) = self.ejected_until.lock() {
            *e = Some(until);
        }
    }
}

struct Inner {
    endpoint: quinn::Endpoint,
    /// The runtime of the I/O thread, where every offload task runs.
    io: tokio::runtime::Handle,
    /// TLS and transport settings; `None` until the agent has an identity.
    client: RwLock<Option<quinn::ClientConfig>>,
    slots: RwLock<Vec<Arc<Slot>>>,
    server_name: String,
    connect_timeout: Duration,
    backoff_min: Duration,
    backoff_max: Duration,
    models: Arc<ModelSlots>,
    topics: Topics,
    results: tokio::sync::mpsc::Sender<Vec<Outgoing>>,
    local: LocalQueue,
    /// Fallbacks waiting for room in `local`.
    fallbacks: FallbackLine,
    counters: Arc<Counters>,
    in_flight: AtomicUsize,
    max_in_flight: usize,
    eject: Duration,
    rng: AtomicU64,
    limiter: Mutex<LogLimiter>,
}

impl Inner {
    /// Whether a log line of `kind` may be written now; `Some(lines suppressed since)`.
    fn log_allowed(&self, kind: &'static str) -> Option<u64> {
        self.limiter.lock().ok()?.allow(kind, Instant::now())
    }

    fn slots(&self) -> Vec<Arc<Slot>> {
        self.slots.read().map(|s| s.clone()).unwrap_or_default()
    }

    /// Replicas that can serve model `index` now: the version the agent runs, so offloaded
    /// windows are answered by the same model as local ones.
    fn available(&self, index: usize, now: Instant) -> Vec<Arc<Slot>> {
        let active = self.models.get(index);
        let slots = self.slots.read();
        let Ok(slots) = slots else { return Vec::new() };
        slots
            .iter()
            .filter(|s| s.model.as_deref().is_none_or(|m| m == &*active.name))
            .filter(|s| s.version == 0 || s.version == active.version)
            .filter(|s| s.available(now))
            .cloned()
            .collect()
    }
}

/// A handle to the running offload client for the hub session: it installs the enrolled
/// identity and replaces replica sets as the hub pushes them.
#[derive(Clone)]
pub struct OffloadHandle {
    inner: Arc<Inner>,
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl std::fmt::Debug for OffloadHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OffloadHandle").finish_non_exhaustive()
    }
}

impl OffloadHandle {
    /// Uses `identity` for every connection from now on.
    pub fn use_identity(&self, identity: &Identity) -> anyhow::Result<()> {
        let config = client_config(&identity.ca_cert, &identity.cert, &identity.key)?;
        if let Ok(mut client) = self.inner.client.write() {
            *client = Some(config);
        }
        Ok(())
    }

    /// Makes `endpoints` the replicas of `model`, serving `version`: new ones are connected,
    /// gone ones are let go (requests already sent to them finish or fall back as usual).
    pub fn set_replicas(&self, model: &str, version: u32, endpoints: &[String]) {
        let Ok(mut slots) = self.inner.slots.write() else {
            return;
        };
        slots.retain(|slot| {
            let keep = slot.model.as_deref() != Some(model)
                || (slot.version == version && endpoints.contains(&slot.endpoint));
            if !keep {
                tracing::info!(replica = %slot.endpoint, model, "replica left the set");
                slot.stop.cancel();
            }
            keep
        });
        for endpoint in endpoints {
            let known = slots
                .iter()
                .any(|s| s.model.as_deref() == Some(model) && &s.endpoint == endpoint);
            if !known {
                tracing::info!(replica = %endpoint, model, version, "replica joined the set");
                let slot = Arc::new(Slot::new(
                    endpoint.clone(),
                    Some(model.to_owned()),
                    version,
                    &self.stop,
                ));
                self.tasks.spawn_on(
                    keep_connected(Arc::clone(&self.inner), Arc::clone(&slot)),
                    &self.inner.io,
                );
                slots.push(slot);
            }
        }
    }
}

/// The running offload client.
pub struct Offload {
    inner: Arc<Inner>,
    stop: CancellationToken,
    tasks: TaskTracker,
    io: IoThread,
}

/// The thread the offload client's packets and request tasks run on. Dropping it lets the
/// thread's runtime end (its `stop` sender is gone); [`IoThread::stop`] also waits for it.
struct IoThread {
    stop: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl IoThread {
    fn start() -> anyhow::Result<(IoThread, tokio::runtime::Handle)> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the offload runtime")?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("offload-io".into())
            .spawn(move || {
                runtime.block_on(async {
                    let _ = stopped.await;
                });
            })
            .context("starting the offload thread")?;
        Ok((IoThread { stop, thread }, handle))
    }

    /// Ends the runtime (tasks still on it are dropped) and waits for the thread.
    async fn stop(self) {
        let IoThread { stop, thread } = self;
        drop(stop);
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    }
}

impl std::fmt::Debug for Offload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Offload")
            .field("replicas", &self.inner.slots().len())
            .finish()
    }
}

impl Offload {
    /// Starts connecting to every replica in `config`, with `identity` when it exists
    /// already (an agent that still has to enrol gets it later through [`OffloadHandle`]).
    pub fn start(
        config: &OffloadSection,
        identity: Option<&Identity>,
        models: Arc<ModelSlots>,
        topics: Topics,
        results: tokio::sync::mpsc::Sender<Vec<Outgoing>>,
        local: LocalQueue,
        counters: Arc<Counters>,
    ) -> anyhow::Result<Offload> {
        let (io_thread, io) = IoThread::start()?;
        // The endpoint's driver runs on the runtime it is created in.
        let endpoint = {
            let _io = io.enter();
            quinn::Endpoint::client(SocketAddr::from(([0, 0, 0, 0], 0)))?
        };
        let client = match identity {
            Some(id) if id.cert.exists() => Some(client_config(&id.ca_cert, &id.cert, &id.key)?),
            Some(_) if config.replicas.is_empty() => None,
            _ => anyhow::bail!("offload needs ca_cert, cert and key"),
        };
        let stop = CancellationToken::new();
        let slots = config
            .replicas
            .iter()
            .map(|r| Arc::new(Slot::new(r.clone(), None, 0, &stop)))
            .collect::<Vec<_>>();
        let inner = Arc::new(Inner {
            endpoint,
            io,
            client: RwLock::new(client),
            slots: RwLock::new(slots.clone()),
            server_name: config.server_name.clone(),
            connect_timeout: Duration::from_millis(config.connect_timeout_ms),
            backoff_min: Duration::from_millis(config.reconnect_min_ms),
            backoff_max: Duration::from_millis(config.reconnect_max_ms),
            models,
            topics,
            results,
            local,
            fallbacks: FallbackLine::default(),
            counters,
            in_flight: AtomicUsize::new(0),
            max_in_flight: config.max_in_flight,
            eject: Duration::from_millis(config.eject_ms),
            rng: AtomicU64::new(0x5eed),
            limiter: Mutex::new(LogLimiter::new(Duration::from_secs(5))),
        });
        let offload = Offload {
            inner,
            stop,
            tasks: TaskTracker::new(),
            io: io_thread,
        };
        for slot in slots {
            offload.tasks.spawn_on(
                keep_connected(Arc::clone(&offload.inner), slot),
                &offload.inner.io,
            );
        }
        Ok(offload)
    }

    /// A handle for the hub session.
    pub fn handle(&self) -> OffloadHandle {
        OffloadHandle {
            inner: Arc::clone(&self.inner),
            stop: self.stop.clone(),
            tasks: self.tasks.clone(),
        }
    }

    /// The expected latency of the best replica available for model `index`, `None` when
    /// none is.
    pub fn estimate(&self, index: usize, now: Instant) -> Option<Duration> {
        self.inner
            .available(index, now)
            .iter()
            .map(|s| s.latency())
            .min()
    }

    /// Sends `job` to a replica, or gives it back when no replica is available or too many
    /// requests are out. `deadline`: when the window's result is due; `reserve`: time kept
    /// back for a local fallback.
    pub fn try_send(&self, job: Job, deadline: Instant, reserve: Duration) -> Result<(), Job> {
        let inner = &self.inner;
        let now = Instant::now();
        if inner.in_flight.load(Ordering::Relaxed) >= inner.max_in_flight {
            return Err(job);
        }
        let Some(slot) = self.pick(job.model, now) else {
            return Err(job);
        };
        inner.in_flight.fetch_add(1, Ordering::Relaxed);
        slot.in_flight.fetch_add(1, Ordering::Relaxed);
        let task_inner = Arc::clone(inner);
        self.tasks.spawn_on(
            async move {
                let inner = task_inner;
                request(&inner, &slot, job, deadline, reserve).await;
                slot.in_flight.fetch_sub(1, Ordering::Relaxed);
                inner.in_flight.fetch_sub(1, Ordering::Relaxed);
            },
            &inner.io,
        );
        Ok(())
    }

    /// Power of two choices: two random available replicas, the one expected sooner wins.
    fn pick(&self, index: usize, now: Instant) -> Option<Arc<Slot>> {
        let available = self.inner.available(index, now);
        match available.len() {
            0 => None,
            1 => available.into_iter().next(),
            n => {
                let r = splitmix(self.inner.rng.fetch_add(1, Ordering::Relaxed));
                let a = (r % n as u64) as usize;
                let mut b = ((r >> 32) % (n as u64 - 1)) as usize;
                if b == a {
                    b = n - 1;
                }
                let best = if available[b].expected() < available[a].expected() {
                    b
                } else {
                    a
                };
                available.into_iter().nth(best)
            }
        }
    }

    /// Requests at the replicas now.
    pub fn in_flight(&self) -> usize {
        self.inner.in_flight.load(Ordering::Relaxed)
    }

    /// Every replica's state.
    pub fn slots(&self) -> Vec<ReplicaStatus> {
        let now = Instant::now();
        self.inner
            .slots()
            .iter()
            .map(|s| ReplicaStatus {
                endpoint: s.endpoint.clone(),
                connected: s.connection().is_some(),
                ejected: s.connection().is_some() && !s.available(now),
                latency_us: s.ewma_us.load(Ordering::Relaxed),
                in_flight: s.in_flight.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// Lets the requests out finish (they end by their deadlines), closes the connections.
    pub async fn close(self) {
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        self.inner.endpoint.close(0u32.into(), b"agent stopping");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.inner.endpoint.wait_idle()).await;
        self.io.stop().await;
    }
}

fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

async fn keep_connected(inner: Arc<Inner>, slot: Arc<Slot>) {
    let (backoff_min, backoff_max) = (inner.backoff_min, inner.backoff_max);
    let (server_name, timeout) = (inner.server_name.as_str(), inner.connect_timeout);
    let stop = slot.stop.clone();
    let mut backoff = backoff_min;
    loop {
        let attempt = async {
            let addr = slot
                .endpoint
                .to_socket_addrs()?
                .next()
                .context("the name resolves to no address")?;
            let client = inner
                .client
                .read()
                .ok()
                .and_then(|c| c.clone())
                .context("no agent certificate yet")?;
            let conn = tokio::time::timeout(
                timeout,
                inner.endpoint.connect_with(client, addr, server_name)?,
            )
            .await
            .context("handshake timed out")??;
            anyhow::Ok(conn)
        };
        let result = tokio::select! {
            _ = stop.cancelled() => return,
            result = attempt => result,
        };
        match result {
            Ok(conn) => {
                Counters::bump(&inner.counters.replica_connects);
                tracing::info!(replica = %slot.endpoint, "replica connected");
                backoff = backoff_min;
                if let Ok(mut c) = slot.conn.lock() {
                    *c = Some(conn.clone());
                }
                let reason = tokio::select! {
                    _ = stop.cancelled() => {
                        conn.close(0u32.into(), b"replica left the set");
                        return;
                    }
                    reason = conn.closed() => reason,
                };
                if let Ok(mut c) = slot.conn.lock() {
                    *c = None;
                }
                Counters::bump(&inner.counters.replica_disconnects);
                tracing::warn!(replica = %slot.endpoint, "replica connection lost: {reason}");
            }
            Err(e) => {
                Counters::bump(&inner.counters.replica_connect_errors);
                if let Some(suppressed) = inner.log_allowed("replica connect") {
                    tracing::warn!(replica = %slot.endpoint, suppressed, retry_in_ms = backoff.as_millis() as u64, "cannot reach replica: {e:#}");
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(backoff_max);
    }
}

/// Whether a replica that timed out is stalled rather than on a slow path: it sent not a
/// single datagram (not even an ACK) while we waited `patience`, and that wait was long
/// enough for a live replica to acknowledge the request over a path of `rtt`. A replica
/// that spoke, or had no time to, is no reason to eject.
fn is_stalled(silent: bool, patience: Duration, rtt: Duration) -> bool {
    silent && patience >= rtt * 2 + ACK_ALLOWANCE
}

/// How a remote attempt ended, when it did not produce a result.
enum Failure {
    /// No answer in time.
    Timeout,
    /// The replica answered with an error.
    Refused(ErrorCode, String),
    /// The connection or the stream broke, or the answer was not a response.
    Broken(String),
}

async fn request(inner: &Inner, slot: &Slot, job: Job, deadline: Instant, reserve: Duration) {
    let model = inner.models.get(job.model);
    let started = Instant::now();
    let budget = deadline
        .saturating_duration_since(started)
        .saturating_sub(reserve)
        .max(Duration::from_millis(1));
    // A replica that usually answers in 2 ms and has not answered in 40 is stalled: give up
    // on it long before the deadline.
    let patience = (slot.latency() * TIMEOUT_FACTOR)
        .max(MIN_TIMEOUT)
        .min(budget);
    let conn = slot.connection();
    let heard_before = conn.as_ref().map(|c| c.stats().udp_rx.datagrams);
    let outcome = match &conn {
        None => Err(Failure::Broken("not connected".into())),
        Some(conn) => {
            let message = Message::InferRequest(InferRequest {
                id: RequestId(job.id),
                model: model.name.to_string(),
                shape: model
                    .runner
                    .input_shape()
                    .iter()
                    .map(|&d| d as u32)
                    .collect(),
                data: job.window.clone(),
                deadline_ms: u32::try_from(budget.as_millis()).unwrap_or(u32::MAX),
            });
            match tokio::time::timeout(patience, exchange(conn, &message)).await {
                Err(_) => Err(Failure::Timeout),
                Ok(Err(e)) => Err(Failure::Broken(format!("{e:#}"))),
                Ok(Ok(Message::InferResponse(r))) if r.id.0 == job.id => Ok(r),
                Ok(Ok(Message::Error(e))) => Err(Failure::Refused(e.code, e.message)),
                Ok(Ok(other)) => Err(Failure::Broken(format!("unexpected answer {other:?}"))),
            }
        }
    };
    let counters = &inner.counters;
    match outcome {
        Ok(response) => {
            slot.observe(started.elapsed());
            slot.failures.store(0, Ordering::Relaxed);
            Counters::bump(&counters.remote_results);
            let outputs = response
                .outputs
                .into_iter()
                .map(|t| (t.name, t.data))
                .collect();
            let version = response.model_version;
            if let Some(out) = finish(
                &job,
                &model,
                version,
                Route::Remote,
                outputs,
                &inner.topics,
                counters,
            ) && inner.results.send(vec![out]).await.is_err()
            {
                Counters::bump(&counters.inference_errors);
            }
        }
        Err(failure) => {
            let failures = slot.failures.fetch_add(1, Ordering::Relaxed) + 1;
            let (what, eject) = match &failure {
                Failure::Timeout => {
                    // At least this slow: the estimate must not stay optimistic, so a slow
                    // path makes the router stand down by itself.
                    slot.observe(patience);
                    Counters::bump(&counters.remote_timeouts);
                    let heard_after = conn.as_ref().map(|c| c.stats().udp_rx.datagrams);
                    let rtt = conn.as_ref().map_or(Duration::ZERO, quinn::Connection::rtt);
                    let stalled = is_stalled(heard_after == heard_before, patience, rtt);
                    (
                        format!("no answer in {patience:?} (stalled: {stalled}, rtt {rtt:?})"),
                        stalled,
                    )
                }
                Failure::Refused(code, message) => {
                    Counters::bump(&counters.remote_errors);
                    // A replica that ran out of time is busy, not broken.
                    let eject = *code != ErrorCode::DeadlineExceeded && failures >= EJECT_AFTER;
                    (format!("{code:?}: {message}"), eject)
                }
                Failure::Broken(e) => {
                    Counters::bump(&counters.remote_errors);
                    (e.clone(), true)
                }
            };
            if eject {
                slot.failures.store(0, Ordering::Relaxed);
                slot.eject(Instant::now() + inner.eject);
                Counters::bump(&counters.replica_ejections);
            }
            if let Some(suppressed) = inner.log_allowed("remote failure") {
                tracing::warn!(replica = %slot.endpoint, suppressed, ejected = eject, "remote inference failed, running it locally: {what}");
            }
            fall_back(inner, job, deadline).await;
        }
    }
}

/// Puts a window the cloud did not serve into the local queue, waiting for room if it must.
///
/// A fallback is never shed: the number waiting here is bounded by `max_in_flight`, and a
/// late answer is better than none. One that has to wait past its deadline is counted.
async fn fall_back(inner: &Inner, job: Job, deadline: Instant) {
    Counters::bump(&inner.counters.remote_fallbacks);
    let late = inner
        .fallbacks
        .enter(job, deadline, |job| inner.local.try_submit(job))
        .await;
    if late {
        Counters::bump(&inner.counters.remote_fallbacks_late);
    }
}

/// How often the fallback at the head of the line retries a full local queue.
const FALLBACK_RETRY: Duration = Duration::from_millis(1);

/// Fallbacks waiting for room in the local queue, first come, first served.
///
/// Only the one at the head retries; the others wait on the line's lock (tokio's mutex
/// queues its waiters fairly) without waking. When the cloud fails while the local queue is
/// full, as happens when the agent spills because it is saturated, that is one timer instead
/// of one per request out (up to `max_in_flight`, 256 by default, each a thousand times a
/// second), and the windows reach the queue in the order they came back.
#[derive(Debug, Default)]
struct FallbackLine(tokio::sync::Mutex<()>);

impl FallbackLine {
    /// Hands `item` to `try_push` once every earlier one has gone in, retrying while it
    /// refuses; returns whether it had to wait and went in after `deadline`.
    async fn enter<T>(
        &self,
        mut item: T,
        deadline: Instant,
        mut try_push: impl FnMut(T) -> Result<(), T>,
    ) -> bool {
        let (_turn, mut waited) = match self.0.try_lock() {
            Ok(turn) => (turn, false),
            Err(_) => (self.0.lock().await, true),
        };
        loop {
            match try_push(item) {
                Ok(()) => return waited && Instant::now() >= deadline,
                Err(back) => item = back,
            }
            waited = true;
            tokio::time::sleep(FALLBACK_RETRY).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_silent_replica_is_stalled_only_after_a_wait_a_live_one_would_have_answered() {
        // A stopped replica on loopback: 100 ms of silence at a 1 ms RTT.
        assert!(is_stalled(true, 100 * MS, MS));
        // A path that has just turned slow: the patience came from the old latency and ended
        // before an ACK could cross the new 850 ms round trip.
        assert!(!is_stalled(true, 400 * MS, 330 * MS));
        // Exactly two round trips and the ACK allowance is long enough.
        assert!(is_stalled(true, 2 * 330 * MS + ACK_ALLOWANCE, 330 * MS));
        // A replica that sent anything is slow, not stalled, however long the wait.
        assert!(!is_stalled(false, Duration::from_secs(5), MS));
    }

    #[test]
    fn fallbacks_wait_in_line_and_only_the_head_retries() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let line = Arc::new(FallbackLine::default());
            // The local queue: full until `room` is set, then takes everything, in order.
            let room = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let queued = Arc::new(Mutex::new(Vec::new()));
            let refusals = Arc::new(AtomicUsize::new(0));
            let future = Instant::now() + Duration::from_secs(3600);
            let mut waiting = Vec::new();
            for i in 0..100 {
                let (line, room, queued, refusals) = (
                    Arc::clone(&line),
                    Arc::clone(&room),
                    Arc::clone(&queued),
                    Arc::clone(&refusals),
                );
                waiting.push(tokio::spawn(async move {
                    line.enter(i, future, |i| {
                        if room.load(Ordering::Relaxed) {
                            queued.lock().expect("lock").push(i);
                            Ok(())
                        } else {
                            refusals.fetch_add(1, Ordering::Relaxed);
                            Err(i)
                        }
                    })
                    .await
                }));
                // Each arrives while the earlier ones wait.
                tokio::task::yield_now().await;
            }
            // The head retries about once a millisecond; 100 waiters each retrying would
            // refuse about a hundred times as often.
            while refusals.load(Ordering::Relaxed) < 20 {
                tokio::time::sleep(MS).await;
            }
            room.store(true, Ordering::Relaxed);
            let mut late = 0;
            for w in waiting {
                late += usize::from(w.await.expect("fallback task"));
            }
            let refused = refusals.load(Ordering::Relaxed);
            assert!(
                refused < 40,
                "{refused} refusals: more than the head retried"
            );
            assert_eq!(*queued.lock().expect("lock"), (0..100).collect::<Vec<_>>());
            assert_eq!(late, 0, "no deadline had passed");
            // Past its deadline, one that waited is late and one that did not is not.
            let past = Instant::now();
            assert!(!line.enter(0, past, |_| Ok(())).await);
            let mut first = true;
            let mut refuse_once = |i| {
                if std::mem::take(&mut first) {
                    Err(i)
                } else {
                    Ok(())
                }
            };
            assert!(line.enter(0, past, &mut refuse_once).await);
        });
    }
}
