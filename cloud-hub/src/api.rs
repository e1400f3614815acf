//! The hub's HTTP side: a JSON API, Prometheus metrics and the dashboard page.
//!
//! | route | what |
//! | --- | --- |
//! | `GET /` | the dashboard (one page, no build step; it polls the API every second) |
//! | `GET /healthz` | `ok` while the hub runs |
//! | `GET /api/v1/agents` | every agent: online, site, version, models, last heartbeat |
//! | `GET /api/v1/agents/{id}` | one agent (404 if unknown) |
//! | `GET /api/v1/replicas` | every replica: model, endpoint, state, load |
//! | `GET /api/v1/models` | served models: replicas ready / existing / desired, bounds |
//! | `GET /api/v1/decisions` | recent scaling decisions with their inputs |
//! | `GET /api/v1/history` | replica count, measured rate and forecast demand over time |
//! | `GET /api/v1/published` | published model versions (signed manifests) |
//! | `GET /api/v1/rollouts` | every rollout: stage, canary, gates' verdict, events |
//! | `POST /api/v1/rollouts` | start one: `{"model", "version", "canary_share", "bake_secs", …}` |
//! | `POST /api/v1/rollouts/{id}/{pause,resume,abort}` | an operator's action |
//! | `GET /metrics` | Prometheus text format |
//!
//! Metrics are built from the hub's state at each scrape (the `prometheus` crate's registry
//! and text encoder), so nothing needs to be kept in sync between the state and its metrics.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use tokio_util::sync::CancellationToken;

use crate::hub::Hub;
use crate::rollout::Settings as RolloutSettings;

const DASHBOARD: &str = include_str!("dashboard.html");

/// The routes, over `hub`.
pub fn router(hub: Arc<Hub>) -> Router {
    Router::new()
        .route("/", get(|| async { Html(DASHBOARD) }))
        .route("/healthz", get(|| async { "ok" }))
        .route("/api/v1/agents", get(agents))
        .route("/api/v1/agents/{id}", get(agent))
        .route("/api/v1/replicas", get(replicas))
        .route("/api/v1/models", get(models))
        .route("/api/v1/decisions", get(decisions))
        .route("/api/v1/history", get(history))
        .route("/api/v1/published", get(published))
        .route("/api/v1/rollouts", get(rollouts).post(start_rollout))
        .route("/api/v1/rollouts/{id}/{action}", post(control_rollout))
        .route("/metrics", get(metrics))
        .with_state(hub)
}

/// Serves the routes on `listener` until `shutdown`.
pub async fn serve(listener: tokio::net::TcpListener, hub: Arc<Hub>, shutdown: CancellationToken) {
    let result = axum::serve(listener, router(hub))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await;
    if let Err(e) = result {
        tracing::error!("the HTTP server stopped: {e}");
    }
}

async fn agents(State(hub): State<Arc<Hub>>) -> Response {
    axum::Json(hub.fleet().views()).into_response()
}

async fn agent(State(hub): State<Arc<Hub>>, Path(id): Path<String>) -> Response {
    match hub.fleet().view(&id) {
        Some(view) => axum::Json(view).into_response(),
        None => (StatusCode::NOT_FOUND, format!("no agent {id:?}\n")).into_response(),
    }
}

async fn replicas(State(hub): State<Arc<Hub>>) -> Response {
    axum::Json(hub.snapshot().replicas.clone()).into_response()
}

async fn models(State(hub): State<Arc<Hub>>) -> Response {
    axum::Json(hub.snapshot().models.clone()).into_response()
}

async fn published(State(hub): State<Arc<Hub>>) -> Response {
    match hub.registry.models(None) {
        Ok(list) => axum::Json(list).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}\n")).into_response(),
    }
}

async fn rollouts(State(hub): State<Arc<Hub>>) -> Response {
    axum::Json(hub.rollouts().list.clone()).into_response()
}

/// A rollout request; what is left out takes [`RolloutSettings::default`].
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct StartRollout {
    model: String,
    version: u32,
    canary_share: Option<f64>,
    bake_secs: Option<f64>,
    max_error_rate: Option<f64>,
    max_p99_ratio: Option<f64>,
    max_drift: Option<f32>,
    max_flip_share: Option<f64>,
    min_shadow_runs: Option<u64>,
}

async fn start_rollout(
    State(hub): State<Arc<Hub>>,
    axum::Json(ask): axum::Json<StartRollout>,
) -> Response {
    let d = RolloutSettings::default();
    let settings = RolloutSettings {
        canary_share: ask.canary_share.unwrap_or(d.canary_share),
        bake_ms: ask.bake_secs.map_or(d.bake_ms, |s| (s * 1000.0) as i64),
        max_error_rate: ask.max_error_rate.unwrap_or(d.max_error_rate),
        max_p99_ratio: ask.max_p99_ratio.unwrap_or(d.max_p99_ratio),
        p99_slack_us: d.p99_slack_us,
        max_drift: ask.max_drift.unwrap_or(d.max_drift),
        max_flip_share: ask.max_flip_share.unwrap_or(d.max_flip_share),
        min_shadow_runs: ask.min_shadow_runs.unwrap_or(d.min_shadow_runs),
        min_inferences: d.min_inferences,
    };
    let hub2 = Arc::clone(&hub);
    let started =
        tokio::task::spawn_blocking(move || hub2.start_rollout(&ask.model, ask.version, settings))
            .await;
    match started {
        Ok(Ok(rollout)) => (StatusCode::CREATED, axum::Json(rollout)).into_response(),
        Ok(Err(e)) => (StatusCode::CONFLICT, format!("{e:#}\n")).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}

async fn control_rollout(
    State(hub): State<Arc<Hub>>,
    Path((id, action)): Path<(u64, String)>,
) -> Response {
    let done = tokio::task::spawn_blocking(move || hub.control_rollout(id, &action)).await;
    match done {
        Ok(Ok(rollout)) => axum::Json(rollout).into_response(),
        Ok(Err(e)) => (StatusCode::NOT_FOUND, format!("{e:#}\n")).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}

async fn decisions(State(hub): State<Arc<Hub>>) -> Response {
    axum::Json(hub.snapshot().decisions.clone()).into_response()
}

async fn history(State(hub): State<Arc<Hub>>) -> Response {
    axum::Json(hub.snapshot().history.clone()).into_response()
}

/// Builds one scrape's metrics; every metric is created with a valid name, so a failure
/// here is a bug and is logged, never a crash.
struct Scrape {
    registry: prometheus::Registry,
}

impl Scrape {
    fn add<M: prometheus::core::Collector + Clone + 'static>(
        &self,
        metric: prometheus::Result<M>,
    ) -> Option<M> {
        let metric = metric
            .map_err(|e| tracing::error!("bad metric: {e}"))
            .ok()?;
        self.registry
            .register(Box::new(metric.clone()))
            .map_err(|e| tracing::error!("bad metric: {e}"))
            .ok()?;
        Some(metric)
    }

    fn counter(&self, name: &str, help: &str, value: &AtomicU64) {
        if let Some(c) = self.add(prometheus::IntCounter::new(name, help)) {
            c.inc_by(value.load(Ordering::Relaxed));
        }
    }

    fn gauge(&self, name: &str, help: &str, value: i64) {
        if let Some(g) = self.add(prometheus::IntGauge::new(name, help)) {
            g.set(value);
        }
    }
}

/// The metrics text (Prometheus text format 0.0.4) for the hub's state now.
pub fn render_metrics(hub: &Hub) -> String {
    use prometheus::{GaugeVec, IntCounterVec, IntGaugeVec, Opts};
    let scrape = Scrape {
        registry: prometheus::Registry::new(),
    };
    let (online, known) = hub.fleet().counts();
    scrape.gauge(
        "spillway_hub_agents_online",
        "Agents with an open session and a recent heartbeat",
        online as i64,
    );
    scrape.gauge(
        "spillway_hub_agents_known",
        "Agents in the registry",
        known as i64,
    );
    scrape.gauge(
        "spillway_hub_sessions_open",
        "Agent control connections open",
        hub.sessions_open() as i64,
    );
    let c = &hub.counters;
    for (name, help, value) in [
        (
            "spillway_hub_sessions_total",
            "Agent sessions opened",
            &c.sessions,
        ),
        (
            "spillway_hub_heartbeats_total",
            "Heartbeats received",
            &c.heartbeats,
        ),
        (
            "spillway_hub_bad_frames_total",
            "Malformed or out-of-place control frames",
            &c.bad_frames,
        ),
        (
            "spillway_hub_refused_connections_total",
            "Control connections refused",
            &c.refused,
        ),
        (
            "spillway_hub_handshake_failures_total",
            "Control TLS handshakes that failed",
            &c.handshake_failures,
        ),
        (
            "spillway_hub_agents_went_offline_total",
            "Agents marked offline after missed heartbeats",
            &c.went_offline,
        ),
        (
            "spillway_hub_model_downloads_total",
            "Model downloads served, whole or resumed",
            &c.downloads,
        ),
        (
            "spillway_hub_model_download_bytes_total",
            "Model bytes sent to agents",
            &c.download_bytes,
        ),
        (
            "spillway_hub_model_downloads_refused_total",
            "Model fetches refused or failed",
            &c.downloads_refused,
        ),
        (
            "spillway_hub_rollout_orders_total",
            "Update and rollback orders sent to agents",
            &c.orders,
        ),
    ] {
        scrape.counter(name, help, value);
    }
    if let Some(enrolments) = scrape.add(IntCounterVec::new(
        Opts::new(
            "spillway_hub_enrolments_total",
            "Enrolment attempts by result",
        ),
        &["result"],
    )) {
        for (result, value) in [
            ("enrolled", &c.enrolled),
            ("unknown_token", &c.enrol_unknown),
            ("expired_token", &c.enrol_expired),
            ("used_token", &c.enrol_reused),
            ("bad_request", &c.enrol_bad_request),
        ] {
            enrolments
                .with_label_values(&[result])
                .inc_by(value.load(Ordering::Relaxed));
        }
    }
    let m = &hub.manager;
    for (name, help, value) in [
        (
            "spillway_hub_replicas_started_total",
            "Replicas started",
            &m.started,
        ),
        (
            "spillway_hub_replicas_stopped_total",
            "Replicas stopped by a scale-in",
            &m.stopped,
        ),
        (
            "spillway_hub_replica_restarts_total",
            "Replicas replaced after exiting or going silent",
            &m.restarts,
        ),
        (
            "spillway_hub_scaling_decisions_total",
            "Scaling decisions that changed a replica count",
            &m.decisions,
        ),
        (
            "spillway_hub_replica_health_failures_total",
            "Replica load queries that failed",
            &m.health_failures,
        ),
    ] {
        scrape.counter(name, help, value);
    }
    let replicas = scrape.add(IntGaugeVec::new(
        Opts::new("spillway_hub_replicas", "Replicas by model and state"),
        &["model", "state"],
    ));
    let desired = scrape.add(IntGaugeVec::new(
        Opts::new(
            "spillway_hub_replicas_desired",
            "Replicas the autoscaler wants",
        ),
        &["model"],
    ));
    let demand = scrape.add(GaugeVec::new(
        Opts::new(
            "spillway_hub_forecast_offload_demand",
            "Windows per second the agents forecast they will send to replicas",
        ),
        &["model"],
    ));
    let rate = scrape.add(GaugeVec::new(
        Opts::new(
            "spillway_hub_replica_request_rate",
            "Requests per second the replicas received",
        ),
        &["model"],
    ));
    {
        let snap = hub.snapshot();
        for model in &snap.models {
            let name = model.name.as_str();
            if let Some(r) = &replicas {
                r.with_label_values(&[name, "ready"])
                    .set(model.ready as i64);
                r.with_label_values(&[name, "starting"])
                    .set((model.replicas - model.ready) as i64);
            }
            if let Some(d) = &desired {
                d.with_label_values(&[name]).set(model.desired as i64);
            }
            if let Some(point) = snap.history.iter().rev().find(|p| p.model == model.name) {
                if let Some(d) = &demand {
                    d.with_label_values(&[name]).set(point.forecast_demand);
                }
                if let Some(r) = &rate {
                    r.with_label_values(&[name]).set(point.measured_rate);
                }
            }
        }
    }
    prometheus::TextEncoder::new()
        .encode_to_string(&scrape.registry.gather())
        .unwrap_or_else(|e| {
            tracing::error!("encoding metrics: {e}");
            String::new()
        })
}

async fn metrics(State(hub): State<Arc<Hub>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        render_metrics(&hub),
    )
        .into_response()
}
