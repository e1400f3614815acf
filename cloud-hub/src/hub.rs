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

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use protocol::frame::{Heartbeat, Hello, ReplicaSet};
use tokio_util::sync::CancellationToken;

use crate::fleet::Fleet;
use crate::registry::Registry;
use crate::replicas::{
    self, Backend, ManagerCounters, ManagerSettings, ModelSpec, ProcessBackend, Published,
    Snapshot, unix_ms,
};
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
    next_session: AtomicU64,
    open: AtomicUsize,
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

    /// Registers a new session for `hello`; returns its id.
    pub fn open_session(&self, hello: &Hello) -> u64 {
        let id = self.next_session.fetch_add(1, Ordering::Relaxed) + 1;
        self.open.fetch_add(1, Ordering::Relaxed);
        self.fleet().hello(hello, id, unix_ms());
        id
    }

    /// A heartbeat on session `id`.
    pub fn heartbeat(&self, agent: &str, id: u64, heartbeat: Heartbeat) {
        let was_offline = {
            let mut fleet = self.fleet();
            let was = !fleet.is_online(agent);
            fleet.heartbeat(agent, id, heartbeat, unix_ms());
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
    let hub = Arc::new(Hub {
        dir: dir.clone(),
        fleet: Mutex::new(fleet),
        registry,
        sets,
        snapshot: Arc::new(Mutex::new(Snapshot::default())),
        counters: HubCounters::default(),
        manager: Arc::new(ManagerCounters::default()),
        public_key: dir.public_key()?,
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
        if n.is_multiple_of(8) {
            let hub = Arc::clone(&hub);
            let _ = tokio::task::spawn_blocking(move || hub.flush(false)).await;
        }
    }
}
