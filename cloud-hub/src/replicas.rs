//! The replica manager: starts, watches, scales and stops the replicas of every model.
//!
//! Replicas come from a [`Backend`]; the default [`ProcessBackend`] runs `cloud-hub replica`
//! processes on free loopback ports and learns each one's address from the line it prints.
//! Once a tick the manager reaps replicas that exited (the scaler's next decision replaces
//! them), asks every ready replica for its load over QUIC (a replica that does not answer
//! three times in a row is replaced), feeds the measured request rate and the agents'
//! forecast demand to the model's [`Scaler`], and starts or stops replicas to match. When the
//! set of ready endpoints changes it publishes the new sets, which the hub pushes to every
//! agent. Everything the dashboard shows (replicas, decisions, count over time) is kept in a
//! bounded [`Snapshot`].

// The manager is a driver: it times replica start-up and load rates with the clock.
#![allow(clippy::disallowed_methods)]

use std::collections::VecDeque;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use protocol::frame::{Message, ReplicaLoad, ReplicaSet};
use serde::Serialize;
use tokio::io::AsyncBufReadExt;
use tokio_util::sync::CancellationToken;

use crate::autoscale::{Decision, ScaleInput, Scaler, ScalerSettings};
use crate::replica::ModelSource;
use crate::tls::{self, TlsFiles};

/// A model the hub serves with replicas.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    /// Name agents use.
    pub name: String,
    /// Where the replicas load it from.
    pub source: ModelSource,
    /// Version the replicas report.
    pub version: u32,
    /// Input shape, where the model leaves dimensions open.
    pub input_shape: Option<Vec<usize>>,
    /// Scaling bounds and timings.
    pub scaler: ScalerSettings,
}

/// A started replica.
pub trait Instance: Send {
    /// A short id for logs and the API.
    fn id(&self) -> &str;
    /// The operating-system process, where there is one.
    fn pid(&self) -> Option<u32> {
        None
    }
    /// The `host:port` it serves on, once it says so.
    fn endpoint(&mut self) -> Option<String>;
    /// Why it ended, once it has.
    fn exited(&mut self) -> Option<String>;
    /// Asks it to finish its requests and stop; forces it after `grace`.
    fn stop(self: Box<Self>, grace: Duration) -> Pin<Box<dyn Future<Output = ()> + Send>>;
}

/// Where replicas run.
pub trait Backend: Send + Sync {
    /// Name for logs.
    fn name(&self) -> &'static str;
    /// Starts one replica of `model`.
    fn start(&self, model: &ModelSpec) -> anyhow::Result<Box<dyn Instance>>;
}

/// Runs replicas as local `cloud-hub replica` processes on free loopback ports.
#[derive(Debug)]
pub struct ProcessBackend {
    /// The `cloud-hub` executable.
    pub exe: PathBuf,
    /// The replicas' server certificate.
    pub tls: TlsFiles,
    /// Inference threads per replica.
    pub workers: usize,
    /// Address to bind (port 0).
    pub host: String,
    next: AtomicU64,
}

impl ProcessBackend {
    /// A backend that runs `exe replica …` with `tls`.
    pub fn new(exe: PathBuf, tls: TlsFiles, workers: usize) -> ProcessBackend {
        ProcessBackend {
            exe,
            tls,
            workers,
            host: "127.0.0.1".into(),
            next: AtomicU64::new(1),
        }
    }
}

struct Process {
    id: String,
    child: tokio::process::Child,
    endpoint: Arc<Mutex<Option<String>>>,
}

impl Backend for ProcessBackend {
    fn name(&self) -> &'static str {
        "process"
    }

    fn start(&self, model: &ModelSpec) -> anyhow::Result<Box<dyn Instance>> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let mut cmd = tokio::process::Command::new(&self.exe);
        cmd.arg("replica")
            .arg("--listen")
            .arg(format!("{}:0", self.host))
            .arg("--name")
            .arg(&model.name)
            .arg("--version")
            .arg(model.version.to_string())
            .arg("--workers")
            .arg(self.workers.to_string())
            .arg("--ca")
            .arg(&self.tls.ca)
            .arg("--cert")
            .arg(&self.tls.cert)
            .arg("--key")
            .arg(&self.tls.key);
        match &model.source {
            ModelSource::Zoo(name) => cmd.arg("--zoo").arg(name),
            ModelSource::Path(path) => cmd.arg("--model").arg(path),
        };
        if let Some(shape) = &model.input_shape {
            let dims: Vec<String> = shape.iter().map(ToString::to_string).collect();
            cmd.arg("--input-shape").arg(dims.join(","));
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", self.exe.display()))?;
        let endpoint = Arc::new(Mutex::new(None));
        if let Some(stdout) = child.stdout.take() {
            let slot = Arc::clone(&endpoint);
            tokio::spawn(async move {
                let mut lines = tokio::io::BufReader::new(stdout).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    // "listening on ADDR model NAME"
                    if let Some(addr) = line
                        .strip_prefix("listening on ")
                        .and_then(|rest| rest.split_whitespace().next())
                        && let Ok(mut e) = slot.lock()
                    {
                        *e = Some(addr.to_owned());
                    }
                }
            });
        }
        Ok(Box::new(Process {
            id: format!("{}-{n}", model.name),
            child,
            endpoint,
        }))
    }
}

impl Instance for Process {
    fn id(&self) -> &str {
        &self.id
    }

    fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    fn endpoint(&mut self) -> Option<String> {
        self.endpoint.lock().ok()?.clone()
    }

    fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(status.to_string()),
            Ok(None) => None,
            Err(e) => Some(e.to_string()),
        }
    }

    fn stop(mut self: Box<Self>, grace: Duration) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(async move {
            if let Some(pid) = self.child.id() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            if tokio::time::timeout(grace, self.child.wait())
                .await
                .is_err()
            {
                let _ = self.child.kill().await;
            }
        })
    }
}

/// A replica as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReplicaView {
    /// Id.
    pub id: String,
    /// Model served.
    pub model: String,
    /// Version served.
    pub version: u32,
    /// `host:port`, once known.
    pub endpoint: Option<String>,
    /// Its process, for the process backend.
    pub pid: Option<u32>,
    /// `starting` or `ready`.
    pub state: &'static str,
    /// Seconds since it was started.
    pub age_secs: f64,
    /// Seconds from start to ready, once ready.
    pub startup_secs: Option<f64>,
    /// Requests per second it answered in the last tick.
    pub rate: f64,
    /// Its last load report.
    pub load: Option<LoadView>,
}

/// The load figures of a replica.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LoadView {
    /// Requests running.
    pub in_flight: u32,
    /// Requests waiting.
    pub queued: u32,
    /// Inference threads.
    pub workers: u32,
    /// Smoothed service time, µs.
    pub service_time_us: u64,
    /// Requests answered since start.
    pub served: u64,
    /// Dropped past their deadline.
    pub expired: u64,
    /// Refused, queue full.
    pub overloaded: u64,
}

/// A model as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelView {
    /// Name.
    pub name: String,
    /// Version replicas serve.
    pub version: u32,
    /// Replicas existing.
    pub replicas: usize,
    /// Replicas ready.
    pub ready: usize,
    /// Last desired count.
    pub desired: usize,
    /// Bounds.
    pub min: usize,
    /// Bounds.
    pub max: usize,
    /// Replicas that exited or stopped answering and were replaced.
    pub restarts: u64,
}

/// A scaling decision that changed something.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DecisionView {
    /// Unix ms.
    pub at_ms: i64,
    /// Model.
    pub model: String,
    /// Replicas before.
    pub from: usize,
    /// Replicas after.
    pub to: usize,
    /// The decision and its inputs.
    pub decision: Decision,
}

/// One point of the replica-count history.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HistoryPoint {
    /// Unix ms.
    pub at_ms: i64,
    /// Model.
    pub model: String,
    /// Replicas ready.
    pub ready: usize,
    /// Replicas existing.
    pub replicas: usize,
    /// Agents' forecast demand.
    pub forecast_demand: f64,
    /// Measured request rate at the replicas.
    pub measured_rate: f64,
}

/// What the manager shows to the API, bounded.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Snapshot {
    /// Models.
    pub models: Vec<ModelView>,
    /// Replicas.
    pub replicas: Vec<ReplicaView>,
    /// Recent decisions that changed a count, newest last.
    pub decisions: VecDeque<DecisionView>,
    /// Replica count over time, oldest first.
    pub history: VecDeque<HistoryPoint>,
}

const MAX_DECISIONS: usize = 200;
const MAX_HISTORY: usize = 3600;
/// A replica that has not announced its address by then is replaced.
const STARTUP_LIMIT: Duration = Duration::from_secs(30);
/// Load queries that may fail in a row before a replica is replaced.
const HEALTH_FAILURES: u32 = 3;

/// The manager's settings.
#[derive(Debug, Clone)]
pub struct ManagerSettings {
    /// Tick.
    pub tick: Duration,
    /// How long a stopping replica may drain.
    pub drain: Duration,
    /// The hub's client certificate, for load queries.
    pub client_tls: TlsFiles,
    /// The name replicas' certificates carry.
    pub server_name: String,
}

/// Counts the manager keeps for metrics.
#[derive(Debug, Default)]
pub struct ManagerCounters {
    /// Replicas started.
    pub started: AtomicU64,
    /// Replicas stopped by a scale-in.
    pub stopped: AtomicU64,
    /// Replicas replaced after exiting or going silent.
    pub restarts: AtomicU64,
    /// Decisions that changed a count.
    pub decisions: AtomicU64,
    /// Load queries that failed.
    pub health_failures: AtomicU64,
}

struct Running {
    instance: Box<dyn Instance>,
    /// The model version it serves.
    version: u32,
    started: Instant,
    ready_at: Option<Instant>,
    endpoint: Option<String>,
    conn: Option<quinn::Connection>,
    load: Option<ReplicaLoad>,
    last_total: Option<(u64, Instant)>,
    rate: f64,
    failures: u32,
}

struct Pool {
    spec: ModelSpec,
    /// The spec from the hub's settings, served when no rollout says otherwise.
    base: ModelSpec,
    scaler: Scaler,
    running: Vec<Running>,
    desired: usize,
    restarts: u64,
    published: Option<(Vec<String>, u32)>,
}

/// Where the manager reads the agents' forecast demand of a model.
pub type DemandFn = dyn Fn(&str) -> f64 + Send + Sync;

/// The version each model's replicas should serve (from rollouts); a model not listed serves
/// the version it was configured with.
pub type Versions = std::collections::HashMap<String, ServedVersion>;

/// A published version for replicas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServedVersion {
    /// Version.
    pub version: u32,
    /// Where its bytes are.
    pub source: ModelSource,
    /// Its input shape.
    pub input_shape: Vec<usize>,
}

/// What the manager publishes for the rest of the hub.
#[derive(Debug, Clone)]
pub struct Published {
    /// The ready replica sets, pushed to agents on change.
    pub sets: tokio::sync::watch::Sender<Vec<ReplicaSet>>,
    /// What the API shows.
    pub snapshot: Arc<Mutex<Snapshot>>,
    /// Counters for metrics.
    pub counters: Arc<ManagerCounters>,
}

/// Runs the manager until `shutdown`, then stops every replica.
pub async fn run(
    backend: Arc<dyn Backend>,
    models: Vec<ModelSpec>,
    settings: ManagerSettings,
    demand: Arc<DemandFn>,
    versions: tokio::sync::watch::Receiver<Versions>,
    published: Published,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut client = quinn::Endpoint::client(std::net::SocketAddr::from(([127, 0, 0, 1], 0)))?;
    client.set_default_client_config(tls::client_config(&settings.client_tls)?);
    let origin = Instant::now();
    let mut pools: Vec<Pool> = models
        .into_iter()
        .map(|spec| Pool {
            scaler: Scaler::new(spec.scaler.clone()),
            base: spec.clone(),
            spec,
            running: Vec::new(),
            desired: 0,
            restarts: 0,
            published: None,
        })
        .collect();
    let mut ticker = tokio::time::interval(settings.tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = ticker.tick() => {}
        }
        let wanted = versions.borrow().clone();
        for pool in &mut pools {
            let next = match wanted.get(&pool.spec.name) {
                Some(v) => (v.version, v.source.clone(), Some(v.input_shape.clone())),
                None => (
                    pool.base.version,
                    pool.base.source.clone(),
                    pool.base.input_shape.clone(),
                ),
            };
            if next.0 != pool.spec.version {
                tracing::info!(model = %pool.spec.name, from = pool.spec.version, to = next.0, "replicas move to another version");
                (pool.spec.version, pool.spec.source, pool.spec.input_shape) = next;
            }
            tick(
                pool,
                backend.as_ref(),
                &client,
                &settings,
                demand.as_ref(),
                origin,
                &published,
            )
            .await;
        }
        let sets_now: Vec<ReplicaSet> = pools
            .iter()
            .map(|p| {
                let (endpoints, version) = ready_endpoints(p);
                ReplicaSet {
                    model: p.spec.name.clone(),
                    endpoints,
                    version,
                }
            })
            .collect();
        let changed = pools.iter_mut().fold(false, |changed, p| {
            let now = ready_endpoints(p);
            let c = p.published.as_ref() != Some(&now);
            p.published = Some(now);
            changed || c
        });
        if changed {
            published.sets.send_replace(sets_now);
        }
        publish_views(&pools, &published.snapshot);
    }
    // Stop everything; replicas drain their open requests.
    let mut stops = Vec::new();
    for pool in &mut pools {
        for r in pool.running.drain(..) {
            stops.push(r.instance.stop(settings.drain));
        }
    }
    for stop in stops {
        stop.await;
    }
    client.close(0u32.into(), b"hub stopping");
    Ok(())
}

/// The endpoints agents may use: ready replicas of the current version (of any version
/// while none of the current one is ready, so a version change never leaves a gap).
fn ready_endpoints(pool: &Pool) -> (Vec<String>, u32) {
    let ready = || pool.running.iter().filter(|r| r.conn.is_some());
    let version = if ready().any(|r| r.version == pool.spec.version) {
        pool.spec.version
    } else {
        ready()
            .map(|r| r.version)
            .max()
            .unwrap_or(pool.spec.version)
    };
    let mut v: Vec<String> = ready()
        .filter(|r| r.version == version)
        .filter_map(|r| r.endpoint.clone())
        .collect();
    v.sort();
    (v, version)
}

async fn tick(
    pool: &mut Pool,
    backend: &dyn Backend,
    client: &quinn::Endpoint,
    settings: &ManagerSettings,
    demand: &DemandFn,
    origin: Instant,
    published: &Published,
) {
    let counters = &published.counters;
    let model = pool.spec.name.clone();
    // Reap what ended; a scale-in removes its replicas before stopping them, so whatever is
    // reaped here crashed.
    let mut i = 0;
    while i < pool.running.len() {
        let r = &mut pool.running[i];
        let startup_over = r.ready_at.is_none() && r.started.elapsed() > STARTUP_LIMIT;
        let silent = r.failures >= HEALTH_FAILURES;
        if let Some(reason) = r.instance.exited() {
            tracing::warn!(%model, replica = r.instance.id(), "replica exited ({reason}); replacing it");
        } else if startup_over || silent {
            tracing::warn!(%model, replica = r.instance.id(), startup_over, silent, "replica unhealthy; replacing it");
        } else {
            i += 1;
            continue;
        }
        let r = pool.running.swap_remove(i);
        pool.restarts += 1;
        counters.restarts.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(r.instance.stop(settings.drain));
    }
    // Connect to replicas that announced their address; ask the ready ones for their load.
    let mut queries = tokio::task::JoinSet::new();
    for (index, r) in pool.running.iter_mut().enumerate() {
        if r.endpoint.is_none() {
            r.endpoint = r.instance.endpoint();
        }
        let Some(endpoint) = r.endpoint.clone() else {
            continue;
        };
        let conn = r.conn.clone().filter(|c| c.close_reason().is_none());
        let client = client.clone();
        let server_name = settings.server_name.clone();
        let timeout = settings.tick.max(Duration::from_millis(500));
        queries.spawn(async move {
            let result = tokio::time::timeout(timeout, async {
                let conn = match conn {
                    Some(c) => c,
                    None => {
                        let addr: std::net::SocketAddr = endpoint.parse()?;
                        client.connect(addr, &server_name)?.await?
                    }
                };
                let answer = tls::exchange(&conn, &Message::LoadQuery).await?;
                match answer {
                    Message::Load(load) => anyhow::Ok((conn, load)),
                    other => anyhow::bail!("answered {} to a load query", other.kind()),
                }
            })
            .await;
            (
                index,
                result.unwrap_or_else(|_| Err(anyhow::anyhow!("no answer in time"))),
            )
        });
    }
    while let Some(joined) = queries.join_next().await {
        let Ok((index, result)) = joined else {
            continue;
        };
        let r = &mut pool.running[index];
        match result {
            Ok((conn, load)) => {
                let now = Instant::now();
                let total = load.served + load.expired + load.overloaded;
                if let Some((before, at)) = r.last_total {
                    let dt = now.duration_since(at).as_secs_f64();
                    if dt > 0.0 {
                        r.rate = total.saturating_sub(before) as f64 / dt;
                    }
                }
                r.last_total = Some((total, now));
                if r.ready_at.is_none() {
                    r.ready_at = Some(now);
                    tracing::info!(%model, replica = r.instance.id(), endpoint = ?r.endpoint, startup_ms = r.started.elapsed().as_millis() as u64, "replica ready");
                }
                r.conn = Some(conn);
                r.load = Some(load);
                r.failures = 0;
            }
            Err(e) => {
                counters.health_failures.fetch_add(1, Ordering::Relaxed);
                if r.ready_at.is_some() {
                    r.failures += 1;
                    r.conn = None;
                    tracing::warn!(%model, replica = r.instance.id(), failures = r.failures, "load query failed: {e:#}");
                }
            }
        }
    }
    // Decide, on the replicas of the current version; older ones serve until enough of
    // those are ready, then stop.
    let version = pool.spec.version;
    let ready = pool
        .running
        .iter()
        .filter(|r| r.conn.is_some() && r.version == version)
        .count();
    let fresh = pool.running.iter().filter(|r| r.version == version).count();
    let capacities: Vec<f64> = pool
        .running
        .iter()
        .filter_map(|r| r.load.as_ref())
        .filter(|l| l.service_time_us > 0)
        .map(|l| f64::from(l.workers.max(1)) * 1e6 / l.service_time_us as f64)
        .collect();
    let input = ScaleInput {
        measured_rate: pool.running.iter().map(|r| r.rate).sum(),
        queued: pool
            .running
            .iter()
            .filter_map(|r| r.load.as_ref())
            .map(|l| f64::from(l.queued))
            .sum(),
        forecast_demand: demand(&model),
        ready,
        replicas: fresh,
        capacity: (!capacities.is_empty())
            .then(|| capacities.iter().sum::<f64>() / capacities.len() as f64),
    };
    let decision = pool.scaler.decide(origin.elapsed().as_secs_f64(), input);
    let from = fresh;
    let to = decision.desired;
    pool.desired = to;
    if to != from {
        tracing::info!(
            %model, from, to,
            measured_rate = input.measured_rate,
            forecast_demand = input.forecast_demand,
            queued = input.queued,
            ready,
            capacity = decision.capacity,
            reactive = decision.reactive,
            predictive = decision.predictive,
            reason = %decision.reason,
            "scaling"
        );
        counters.decisions.fetch_add(1, Ordering::Relaxed);
    }
    for _ in from..to {
        match backend.start(&pool.spec) {
            Ok(instance) => {
                counters.started.fetch_add(1, Ordering::Relaxed);
                pool.running.push(Running {
                    instance,
                    version,
                    started: Instant::now(),
                    ready_at: None,
                    endpoint: None,
                    conn: None,
                    load: None,
                    last_total: None,
                    rate: 0.0,
                    failures: 0,
                });
            }
            Err(e) => {
                tracing::error!(%model, backend = backend.name(), "cannot start a replica: {e:#}");
                break;
            }
        }
    }
    if to < from {
        // Stop the youngest first: those still starting serve nobody yet.
        pool.running
            .sort_by_key(|r| (r.version != version, std::cmp::Reverse(r.started)));
        for r in pool.running.drain(..from - to) {
            counters.stopped.fetch_add(1, Ordering::Relaxed);
            tracing::info!(%model, replica = r.instance.id(), "stopping replica");
            tokio::spawn(r.instance.stop(settings.drain));
        }
    }
    let stale = pool.running.iter().filter(|r| r.version != version).count();
    if stale > 0 && (to == 0 || ready >= stale.min(to)) {
        let (old, keep): (Vec<Running>, Vec<Running>) = std::mem::take(&mut pool.running)
            .into_iter()
            .partition(|r| r.version != version);
        pool.running = keep;
        for r in old {
            counters.stopped.fetch_add(1, Ordering::Relaxed);
            tracing::info!(%model, replica = r.instance.id(), version = r.version, "stopping a replica of the previous version");
            tokio::spawn(r.instance.stop(settings.drain));
        }
    }
    let now_ms = unix_ms();
    let mut snap = published.snapshot.lock().unwrap_or_else(|e| e.into_inner());
    if to != from {
        snap.decisions.push_back(DecisionView {
            at_ms: now_ms,
            model: model.clone(),
            from,
            to,
            decision: decision.clone(),
        });
        while snap.decisions.len() > MAX_DECISIONS {
            snap.decisions.pop_front();
        }
    }
    snap.history.push_back(HistoryPoint {
        at_ms: now_ms,
        model,
        ready: pool.running.iter().filter(|r| r.conn.is_some()).count(),
        replicas: pool.running.len(),
        forecast_demand: input.forecast_demand,
        measured_rate: input.measured_rate,
    });
    while snap.history.len() > MAX_HISTORY {
        snap.history.pop_front();
    }
}

fn publish_views(pools: &[Pool], snapshot: &Mutex<Snapshot>) {
    let mut models = Vec::new();
    let mut replicas = Vec::new();
    for p in pools {
        models.push(ModelView {
            name: p.spec.name.clone(),
            version: p.spec.version,
            replicas: p.running.len(),
            ready: p.running.iter().filter(|r| r.conn.is_some()).count(),
            desired: p.desired,
            min: p.scaler.settings().min,
            max: p.scaler.settings().max,
            restarts: p.restarts,
        });
        for r in &p.running {
            replicas.push(ReplicaView {
                id: r.instance.id().to_owned(),
                model: p.spec.name.clone(),
                version: r.version,
                endpoint: r.endpoint.clone(),
                pid: r.instance.pid(),
                state: if r.conn.is_some() {
                    "ready"
                } else {
                    "starting"
                },
                age_secs: r.started.elapsed().as_secs_f64(),
                startup_secs: r
                    .ready_at
                    .map(|t| t.duration_since(r.started).as_secs_f64()),
                rate: r.rate,
                load: r.load.as_ref().map(|l| LoadView {
                    in_flight: l.in_flight,
                    queued: l.queued,
                    workers: l.workers,
                    service_time_us: l.service_time_us,
                    served: l.served,
                    expired: l.expired,
                    overloaded: l.overloaded,
                }),
            });
        }
    }
    let mut snap = snapshot.lock().unwrap_or_else(|e| e.into_inner());
    snap.models = models;
    snap.replicas = replicas;
}

/// Now, Unix milliseconds.
pub fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
