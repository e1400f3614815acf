//! The hub process: agent sessions, the fleet registry, the replica manager and the HTTP
//! side, wired together.
//!
//! [`run`] opens the state folder made by `cloud-hub init`, loads the registry, binds the QUIC
//! control endpoint and the HTTP listener, and runs four tasks until shutdown: the session
//! server ([`crate::session`]), the replica manager ([`crate::replicas`]), a sweeper that
//! marks silent agents offline and writes changed agent records to SQLite in batches, and the
//! API/dashboard ([`crate::api`]). They share one [`Hub`].

// The hub is a driver: it stamps sessions and sweeps with the clock.
#![allow(clippy::disallowed_methods)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use protocol::frame::{Heartbeat, Hello, Message, ModelHealth, ModelVersion, ReplicaSet};
use protocol::manifest::SignedManifest;
use tokio_util::sync::CancellationToken;

use crate::fleet::Fleet;
use crate::registry::Registry;
use crate::replica::ModelSource;
use crate::replicas::{
    self, Backend, ManagerCounters, ManagerSettings, ModelSpec, ProcessBackend, Published,
    ServedVersion, Snapshot, Versions, unix_ms,
};
use crate::rollout::{AgentReport, Order, Rollout, Settings as RolloutSettings, Stage};
use crate::state::{self, HubDir};

/// How the hub runs.
#[derive(Debug, Clone)]
pub struct HubSettings {
    /// The state folder (`cloud-hub init`).
    pub dir: HubDir,
    /// UDP address of the control endpoint.
    pub listen: SocketAddr,
    /// TCP address of the API, metrics and dashboard.
    pub http: SocketAddr,
    /// Heartbeat period asked of agents, ms.
    pub heartbeat_ms: u32,
    /// An agent silent this long is offline, ms.
    pub offline_after_ms: u64,
    /// Most agent connections at once.
    pub max_sessions: usize,
    /// Models served by replicas.
    pub models: Vec<ModelSpec>,
    /// Inference threads per replica.
    pub replica_workers: usize,
    /// The replica manager's tick.
    pub tick: Duration,
    /// The `cloud-hub` executable the process backend starts replicas with.
    pub exe: PathBuf,
    /// Model download rate per agent, bytes per second (0: as fast as QUIC goes).
    pub download_rate: u64,
    /// Model downloads served at once; more wait their turn.
    pub max_downloads: usize,
}

/// Event counts, for metrics.
#[derive(Debug, Default)]
pub struct HubCounters {
    /// Sessions opened.
    pub sessions: AtomicU64,
    /// Heartbeats received.
    pub heartbeats: AtomicU64,
    /// Frames that were malformed or out of place.
    pub bad_frames: AtomicU64,
    /// Connections refused (no certificate and no enrolment, name mismatch, version, limit).
    pub refused: AtomicU64,
    /// TLS handshakes that failed (foreign or missing certificates among them).
    pub handshake_failures: AtomicU64,
    /// Sessions that ended with an error.
    pub session_errors: AtomicU64,
    /// Agents enrolled.
    pub enrolled: AtomicU64,
    /// Enrolments with an unknown token.
    pub enrol_unknown: AtomicU64,
    /// Enrolments with an expired token.
    pub enrol_expired: AtomicU64,
    /// Enrolments with a used token.
    pub enrol_reused: AtomicU64,
    /// Enrolments with an unusable certificate request.
    pub enrol_bad_request: AtomicU64,
    /// Agents that went offline by silence.
    pub went_offline: AtomicU64,
    /// Model downloads served (whole or resumed).
    pub downloads: AtomicU64,
    /// Model bytes sent.
    pub download_bytes: AtomicU64,
    /// Model fetches refused (unknown digest, bad offset, too many at once).
    pub downloads_refused: AtomicU64,
    /// Update and rollback orders sent to agents.
    pub orders: AtomicU64,
}

/// What sessions, the manager, the sweeper and the API share.
#[derive(Debug)]
pub struct Hub {
    /// Settings.
    pub settings: HubSettings,
    /// The state folder.
    pub dir: HubDir,
    /// The live fleet.
    pub fleet: Mutex<Fleet>,
    /// The registry on disk.
    pub registry: Registry,
    /// The replica sets, as the manager publishes them.
    pub sets: tokio::sync::watch::Sender<Vec<ReplicaSet>>,
    /// What the manager shows.
    pub snapshot: Arc<Mutex<Snapshot>>,
    /// Hub counters.
    pub counters: HubCounters,
    /// Replica manager counters.
    pub manager: Arc<ManagerCounters>,
    /// The model-signing public key.
    pub public_key: Vec<u8>,
    /// Model rollouts.
    pub rollouts: Mutex<Rollouts>,
    /// The version each model's replicas serve, as the rollouts decide.
    pub versions: tokio::sync::watch::Sender<Versions>,
    /// Model downloads running or waiting, per agent: an agent that is downloading is not sent
    /// the update again.
    pub downloading: Mutex<HashMap<String, usize>>,
    /// Turns for model downloads.
    pub download_slots: Arc<tokio::sync::Semaphore>,
    /// The model files downloads read.
    pub blobs: crate::store::BlobCache,
    /// Set when something a rollout waits for changed (an agent reports other model versions,
    /// a rollout starts or is resumed): the rollouts step at the sweeper's next tick instead of
    /// the next second.
    rollouts_due: AtomicBool,
    /// Each connected agent's session id and the queue of messages to push to it.
    mailboxes: Mutex<HashMap<String, (u64, tokio::sync::mpsc::Sender<Message>)>>,
    next_session: AtomicU64,
    open: AtomicUsize,
}

/// Messages waiting for one agent's session, at most.
const MAILBOX: usize = 16;

/// An order not yet carried out is sent again after this long, ms.
const RESEND_MS: i64 = 10_000;

/// The rollouts, and which orders went out when.
#[derive(Debug, Default)]
pub struct Rollouts {
    /// Every rollout, oldest first; the newest of a model is the one that acts.
    pub list: Vec<Rollout>,
    /// (agent, model) → (order, the rollout's version, when sent).
    sent: HashMap<(String, String), (Order, u32, i64)>,
}

impl Rollouts {
    /// The newest rollout of `model`.
    pub fn current(&mut self, model: &str) -> Option<&mut Rollout> {
        self.list.iter_mut().rev().find(|r| r.model == model)
    }

    /// Rollout `id`.
    pub fn get(&mut self, id: u64) -> Option<&mut Rollout> {
        self.list.iter_mut().find(|r| r.id == id)
    }
}

impl Hub {
    /// Counts one event.
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The live fleet, locked.
    pub fn fleet(&self) -> std::sync::MutexGuard<'_, Fleet> {
        self.fleet.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The manager's snapshot, locked.
    pub fn snapshot(&self) -> std::sync::MutexGuard<'_, Snapshot> {
        self.snapshot.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sessions open now.
    pub fn sessions_open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Registers a new session for `hello`; returns its id and the messages to push to it.
    pub fn open_session(&self, hello: &Hello) -> (u64, tokio::sync::mpsc::Receiver<Message>) {
        let id = self.next_session.fetch_add(1, Ordering::Relaxed) + 1;
        self.open.fetch_add(1, Ordering::Relaxed);
        self.fleet().hello(hello, id, unix_ms());
        let (tx, rx) = tokio::sync::mpsc::channel(MAILBOX);
        self.mailboxes().insert(hello.agent.clone(), (id, tx));
        // A new session gets every order again.
        self.rollouts()
            .sent
            .retain(|(agent, _), _| agent != &hello.agent);
        (id, rx)
    }

    fn mailboxes(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, (u64, tokio::sync::mpsc::Sender<Message>)>> {
        self.mailboxes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The rollouts, locked.
    pub fn rollouts(&self) -> std::sync::MutexGuard<'_, Rollouts> {
        self.rollouts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `message` for `agent`'s session; false if it has none or its queue is full.
    pub fn push(&self, agent: &str, message: Message) -> bool {
        self.mailboxes()
            .get(agent)
            .is_some_and(|(_, tx)| tx.try_send(message).is_ok())
    }

    /// Starts rolling `version` of `model` out; returns the rollout.
    pub fn start_rollout(
        &self,
        model: &str,
        version: u32,
        settings: RolloutSettings,
    ) -> anyhow::Result<Rollout> {
        self.registry
            .model(model, version)?
            .with_context(|| format!("{model} v{version} is not published"))?;
        let now = unix_ms();
        let agents = self.fleet().health();
        let reports = reports(&agents, model);
        let mut rollouts = self.rollouts();
        if let Some(r) = rollouts.current(model)
            && matches!(r.stage, Stage::Canary | Stage::Full)
        {
            anyhow::bail!(
                "rollout {} of {model} v{} is still going; abort it first",
                r.id,
                r.version
            );
        }
        let id = rollouts.list.iter().map(|r| r.id).max().unwrap_or(0) + 1;
        let rollout = Rollout::start(id, model, version, settings, &reports, now)
            .map_err(anyhow::Error::msg)?;
        self.registry
            .save_rollout(id, model, &serde_json::to_string(&rollout)?, now)?;
        rollouts.list.push(rollout.clone());
        self.rollouts_due.store(true, Ordering::Relaxed);
        tracing::info!(model, version, id, canary = ?rollout.canary, "rollout started");
        Ok(rollout)
    }

    /// Applies an operator's `action` (pause, resume, abort) to rollout `id`.
    pub fn control_rollout(&self, id: u64, action: &str) -> anyhow::Result<Rollout> {
        let now = unix_ms();
        let mut rollouts = self.rollouts();
        let r = rollouts
            .get(id)
            .with_context(|| format!("no rollout {id}"))?;
        match action {
            "pause" => r.pause(now),
            "resume" => r.resume(now),
            "abort" => r.abort(now),
            other => anyhow::bail!("unknown action {other:?}: pause, resume or abort"),
        }
        let r = r.clone();
        self.registry
            .save_rollout(id, &r.model, &serde_json::to_string(&r)?, now)?;
        self.rollouts_due.store(true, Ordering::Relaxed);
        Ok(r)
    }

    /// Steps every model's current rollout and sends the orders that are due.
    fn step_rollouts(&self) {
        let now = unix_ms();
        let agents = self.fleet().health();
        let mut rollouts = self.rollouts();
        let models: Vec<String> = {
            let mut m: Vec<String> = rollouts.list.iter().map(|r| r.model.clone()).collect();
            m.sort();
            m.dedup();
            m
        };
        let downloading: std::collections::HashSet<String> = self
            .downloading
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect();
        let mut due = Vec::new();
        for model in models {
            let reports = reports(&agents, &model);
            let Some(r) = rollouts.current(&model) else {
                continue;
            };
            let was = r.clone();
            let orders = r.step(&reports, now);
            if *r != was {
                if r.stage != was.stage {
                    tracing::info!(model = %r.model, version = r.version, stage = ?r.stage, reason = ?r.reason, "rollout moved");
                }
                match serde_json::to_string(&*r) {
                    Ok(json) => {
                        if let Err(e) = self.registry.save_rollout(r.id, &r.model, &json, now) {
                            tracing::error!("storing rollout {}: {e:#}", r.id);
                        }
                    }
                    Err(e) => tracing::error!("rollout {} does not serialise: {e}", r.id),
                }
            }
            let version = r.version;
            for order in orders {
                let agent = match &order {
                    Order::Update { agent } | Order::Rollback { agent, .. } => agent.clone(),
                };
                if matches!(order, Order::Update { .. }) && downloading.contains(&agent) {
                    continue;
                }
                let key = (agent, model.clone());
                if rollouts
                    .sent
                    .get(&key)
                    .is_some_and(|(o, v, at)| *o == order && *v == version && now - at < RESEND_MS)
                {
                    continue;
                }
                rollouts
                    .sent
                    .insert(key.clone(), (order.clone(), version, now));
                due.push((key.0, model.clone(), version, order));
            }
        }
        let replicas = replica_versions(&rollouts.list);
        drop(rollouts);
        let mut wanted = Versions::default();
        for (model, version) in replicas {
            match self.registry.model(&model, version) {
                Ok(Some(signed)) => {
                    let path = crate::store::blob_path(&self.dir, &signed.manifest.sha256);
                    wanted.insert(
                        model,
                        ServedVersion {
                            version,
                            source: ModelSource::Path(path),
                            input_shape: signed.manifest.input_shape,
                        },
                    );
                }
                Ok(None) => {}
                Err(e) => tracing::error!("reading {model} v{version}: {e:#}"),
            }
        }
        self.versions.send_if_modified(|v| {
            let changed = *v != wanted;
            *v = wanted;
            changed
        });
        // One read of each manifest per step, however many agents get it.
        let mut manifests: HashMap<(String, u32), Option<SignedManifest>> = HashMap::new();
        for (agent, model, version, order) in due {
            let message = match order {
                Order::Update { .. } => {
                    let signed = manifests
                        .entry((model.clone(), version))
                        .or_insert_with(|| {
                            self.registry
                                .model(&model, version)
                                .map_err(|e| tracing::error!("reading {model} v{version}: {e:#}"))
                                .ok()
                                .flatten()
                        });
                    match signed {
                        Some(signed) => Message::ModelUpdate(signed.clone()),
                        None => continue,
                    }
                }
                Order::Rollback { to, .. } => Message::ModelRollback(ModelVersion {
                    name: model.clone(),
                    version: to,
                }),
            };
            if self.push(&agent, message) {
                Hub::bump(&self.counters.orders);
            }
        }
    }

    /// A heartbeat on session `id`.
    pub fn heartbeat(&self, agent: &str, id: u64, heartbeat: Heartbeat) {
        let was_offline = {
            let mut fleet = self.fleet();
            let was = !fleet.is_online(agent);
            if fleet.heartbeat(agent, id, heartbeat, unix_ms()) == Some(true) {
                self.rollouts_due.store(true, Ordering::Relaxed);
            }
            was
        };
        if was_offline {
            tracing::info!(%agent, "agent back online");
        }
    }

    /// Session `id` ended.
    pub fn close_session(&self, agent: &str, id: u64) {
        self.open.fetch_sub(1, Ordering::Relaxed);
        self.fleet().closed(agent, id);
        let mut mailboxes = self.mailboxes();
        if mailboxes.get(agent).is_some_and(|(s, _)| *s == id) {
            mailboxes.remove(agent);
        }
    }

    /// Served model names.
    pub fn served_models(&self) -> Vec<String> {
        self.settings
            .models
            .iter()
            .map(|m| m.name.clone())
            .collect()
    }

    /// Writes changed agent records; `all` also writes every "last seen" not yet stored.
    fn flush(&self, all: bool) {
        let dirty = if all {
            self.fleet().take_unsaved()
        } else {
            self.fleet().take_dirty()
        };
        if !dirty.is_empty()
            && let Err(e) = self.registry.save(&dirty)
        {
            tracing::error!("writing {} agent records failed: {e:#}", dirty.len());
        }
    }
}

/// Where a running hub listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bound {
    /// The control endpoint.
    pub control: SocketAddr,
    /// The HTTP listener.
    pub http: SocketAddr,
}

/// Runs the hub until `shutdown`; `ready` gets the bound addresses once it listens.
pub async fn run(
    settings: HubSettings,
    ready: tokio::sync::oneshot::Sender<Bound>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let dir = settings.dir.clone();
    anyhow::ensure!(
        dir.exists(),
        "{} is not a hub state folder: run `cloud-hub init --dir {}` first",
        dir.dir.display(),
        dir.dir.display()
    );
    let registry = Registry::open(&dir.database())?;
    let records = registry.agents()?;
    tracing::info!(agents = records.len(), "registry loaded");
    let fleet = Fleet::new(records, settings.offline_after_ms as i64);
    let server = crate::tls::server_config_with(&dir.server_tls(), Duration::from_secs(10), true)?;
    let endpoint = crate::tls::server_endpoint(server, settings.listen)
        .with_context(|| format!("binding the control endpoint {}", settings.listen))?;
    let http = tokio::net::TcpListener::bind(settings.http)
        .await
        .with_context(|| format!("binding the HTTP listener {}", settings.http))?;
    let bound = Bound {
        control: endpoint.local_addr()?,
        http: http.local_addr()?,
    };
    let (sets, _) = tokio::sync::watch::channel(Vec::new());
    let rollouts = load_rollouts(&registry)?;
    let hub = Arc::new(Hub {
        dir: dir.clone(),
        fleet: Mutex::new(fleet),
        registry,
        sets,
        snapshot: Arc::new(Mutex::new(Snapshot::default())),
        counters: HubCounters::default(),
        manager: Arc::new(ManagerCounters::default()),
        public_key: dir.public_key()?,
        rollouts: Mutex::new(Rollouts {
            list: rollouts,
            sent: HashMap::new(),
        }),
        mailboxes: Mutex::default(),
        downloading: Mutex::default(),
        download_slots: Arc::new(tokio::sync::Semaphore::new(settings.max_downloads.max(1))),
        blobs: crate::store::BlobCache::default(),
        rollouts_due: AtomicBool::new(false),
        versions: tokio::sync::watch::Sender::new(Versions::default()),
        next_session: AtomicU64::new(0),
        open: AtomicUsize::new(0),
        settings,
    });

    let backend: Arc<dyn Backend> = Arc::new(ProcessBackend::new(
        hub.settings.exe.clone(),
        dir.server_tls(),
        hub.settings.replica_workers,
    ));
    let demand_hub = Arc::clone(&hub);
    let served = hub.served_models();
    let predictive = hub.settings.models.iter().all(|m| m.scaler.predictive);
    let demand = Arc::new(move |model: &str| {
        let fleet = demand_hub.fleet();
        if predictive {
            fleet.offload_demand(model, &served)
        } else {
            fleet.overflow(model, &served)
        }
    });
    let manager = tokio::spawn(replicas::run(
        backend,
        hub.settings.models.clone(),
        ManagerSettings {
            tick: hub.settings.tick,
            drain: Duration::from_secs(2),
            client_tls: dir.client_tls(),
            server_name: state::SERVER_NAME.into(),
        },
        demand,
        hub.versions.subscribe(),
        Published {
            sets: hub.sets.clone(),
            snapshot: Arc::clone(&hub.snapshot),
            counters: Arc::clone(&hub.manager),
        },
        shutdown.clone(),
    ));
    let sessions = tokio::spawn(crate::session::serve(
        endpoint,
        Arc::clone(&hub),
        shutdown.clone(),
    ));
    let sweeper = tokio::spawn(sweep(Arc::clone(&hub), shutdown.clone()));
    let api = tokio::spawn(crate::api::serve(http, Arc::clone(&hub), shutdown.clone()));
    let _ = ready.send(bound);
    tracing::info!(control = %bound.control, http = %bound.http, "hub running");

    let _ = sessions.await;
    let _ = sweeper.await;
    let manager = manager.await;
    let _ = api.await;
    hub.flush(true);
    manager.context("the replica manager panicked")??;
    Ok(())
}

async fn sweep(hub: Arc<Hub>, shutdown: CancellationToken) {
    let mut ticker = tokio::time::interval(Duration::from_millis(250));
    let mut n = 0u64;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let gone = hub.fleet().sweep(unix_ms());
        for agent in gone.offline {
            Hub::bump(&hub.counters.went_offline);
            tracing::warn!(%agent, "agent offline: no heartbeat");
        }
        n += 1;
        // Agent records reach the disk every 2 s, in one transaction.
        // Rollouts advance every second, and at once when something they wait for changed.
        // The flag is cleared on every step, so a periodic step does not leave one queued.
        let due = hub.rollouts_due.swap(false, Ordering::Relaxed);
        if due || n.is_multiple_of(4) {
            let hub = Arc::clone(&hub);
            let _ = tokio::task::spawn_blocking(move || hub.step_rollouts()).await;
        }
        if n.is_multiple_of(8) {
            let hub = Arc::clone(&hub);
            let _ = tokio::task::spawn_blocking(move || hub.flush(false)).await;
        }
    }
}

/// The fleet's reports as a rollout of `model` reads them.
fn reports<'a>(
    agents: &'a [(String, String, bool, Vec<ModelHealth>)],
    model: &str,
) -> Vec<AgentReport<'a>> {
    agents
        .iter()
        .map(|(name, site, online, health)| AgentReport {
            name,
            site,
            online: *online,
            health: health.iter().find(|h| h.name == model),
        })
        .collect()
}

fn load_rollouts(registry: &Registry) -> anyhow::Result<Vec<Rollout>> {
    registry
        .rollouts()?
        .iter()
        .map(|json| serde_json::from_str(json).context("a stored rollout does not parse"))
        .collect()
}

/// The version replicas of each model serve: that of the newest rollout that reached every
/// agent (full or done). A model without one serves its configured version.
fn replica_versions(list: &[Rollout]) -> Vec<(String, u32)> {
    let mut out: Vec<(String, u32)> = Vec::new();
    for r in list.iter().rev() {
        if matches!(r.stage, Stage::Full | Stage::Done) && !out.iter().any(|(m, _)| *m == r.model) {
            out.push((r.model.clone(), r.version));
        }
    }
    out
}
