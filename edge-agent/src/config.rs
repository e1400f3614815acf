//! The agent's configuration: one TOML file plus `SPILLWAY__SECTION__KEY` overrides.
//!
//! Loading goes through the `config` crate; every struct denies unknown keys, so a typo is an
//! error at start rather than a silently ignored setting. Units are in the names (`_ms`,
//! `_secs`, `_bytes`). [`AgentConfig::validate`] checks what serde cannot (ranges, references
//! between sections) and reports every problem at once. Tests build configs from strings with
//! an explicit environment map; nothing here reads the process environment unless asked to.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Largest window any model may use, in samples (the per-sensor buffers are this big).
pub const MAX_WINDOW: usize = 1024;

/// The whole agent configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Identity and limits of this agent.
    pub agent: AgentSection,
    /// The MQTT broker.
    #[serde(default)]
    pub mqtt: MqttSection,
    /// The models the agent runs.
    pub models: Vec<ModelSection>,
    /// Which sensor feeds which model.
    #[serde(default)]
    pub sensors: SensorsSection,
    /// Spilling work to cloud replicas.
    #[serde(default)]
    pub offload: OffloadSection,
    /// The hub this agent reports to.
    #[serde(default)]
    pub hub: HubSection,
}

/// `[hub]`: the fleet's control plane. Without `endpoint` the agent runs on its own.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HubSection {
    /// The hub's control endpoint, `host:port` (UDP).
    #[serde(default)]
    pub endpoint: Option<String>,
    /// The name the hub's certificate carries.
    #[serde(default = "default_hub_server_name")]
    pub server_name: String,
    /// Where the agent keeps its enrolled identity (key, certificate, fleet CA, hub key);
    /// relative paths are taken from the config file's folder.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// The one-time token from `cloud-hub enroll`, used once when the state folder holds no
    /// certificate yet (best passed as `SPILLWAY__HUB__TOKEN`).
    #[serde(default)]
    pub token: Option<String>,
    /// Time allowed for a QUIC handshake.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// First reconnection delay; it doubles up to `reconnect_max_ms`.
    #[serde(default = "default_hub_reconnect_min_ms")]
    pub reconnect_min_ms: u64,
    /// Longest reconnection delay.
    #[serde(default = "default_reconnect_max_ms")]
    pub reconnect_max_ms: u64,
    /// After a model update, one window in this many also runs on the previous version and
    /// the difference is reported (0: never).
    #[serde(default = "default_shadow_every")]
    pub shadow_every: u64,
    /// How long the previous version stays loaded after an update, for the comparison and an
    /// instant rollback (it stays on disk after that).
    #[serde(default = "default_shadow_secs")]
    pub shadow_secs: u64,
    /// Largest model download accepted.
    #[serde(default = "default_max_model_bytes")]
    pub max_model_bytes: u64,
    /// Which of a model version's files to download: `onnx` (the published file; the default
    /// where the build reads ONNX) or `nnef` (the hub's checked conversion; the only choice of
    /// a gateway build without ONNX). A version without the chosen file falls back to the
    /// other where this build reads it.
    #[serde(default = "default_model_format")]
    pub model_format: ModelFileFormat,
}

/// A model file format, as the config names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelFileFormat {
    /// ONNX.
    Onnx,
    /// NNEF.
    Nnef,
}

impl ModelFileFormat {
    /// The runner's name for it.
    pub fn format(self) -> models::ModelFormat {
        match self {
            ModelFileFormat::Onnx => models::ModelFormat::Onnx,
            ModelFileFormat::Nnef => models::ModelFormat::Nnef,
        }
    }
}

fn default_model_format() -> ModelFileFormat {
    if models::ModelFormat::Onnx.is_readable() {
        ModelFileFormat::Onnx
    } else {
        ModelFileFormat::Nnef
    }
}

impl Default for HubSection {
    fn default() -> Self {
        HubSection {
            endpoint: None,
            server_name: default_hub_server_name(),
            state_dir: default_state_dir(),
            token: None,
            connect_timeout_ms: default_connect_timeout_ms(),
            reconnect_min_ms: default_hub_reconnect_min_ms(),
            reconnect_max_ms: default_reconnect_max_ms(),
            shadow_every: default_shadow_every(),
            shadow_secs: default_shadow_secs(),
            max_model_bytes: default_max_model_bytes(),
            model_format: default_model_format(),
        }
    }
}

fn default_shadow_every() -> u64 {
    10
}
fn default_shadow_secs() -> u64 {
    900
}
fn default_max_model_bytes() -> u64 {
    256 << 20
}

/// Where an agent's mutual-TLS identity is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The fleet CA certificate.
    pub ca_cert: PathBuf,
    /// The agent's certificate.
    pub cert: PathBuf,
    /// The agent's key.
    pub key: PathBuf,
}

impl HubSection {
    /// The identity files in the state folder (they exist once the agent has enrolled).
    pub fn identity(&self) -> Identity {
        Identity {
            ca_cert: self.state_dir.join("ca.pem"),
            cert: self.state_dir.join("agent.pem"),
            key: self.state_dir.join("agent.key"),
        }
    }

    /// The pinned model-signing key of the hub.
    pub fn hub_key_path(&self) -> PathBuf {
        self.state_dir.join("hub.pub")
    }

    /// Where model updates are kept.
    pub fn models_dir(&self) -> PathBuf {
        self.state_dir.join("models")
    }
}

fn default_hub_server_name() -> String {
    "spillway-hub".into()
}
fn default_state_dir() -> PathBuf {
    "state".into()
}
fn default_hub_reconnect_min_ms() -> u64 {
    200
}

/// `[agent]`: identity, worker pool and limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSection {
    /// Site name, the second level of every topic.
    pub site: String,
    /// Gateway name, the third level of every topic.
    pub gateway: String,
    /// Inference worker threads; 0 means one per core.
    #[serde(default)]
    pub workers: usize,
    /// Windows that may wait for a worker, all sensors together; when the queue is full, the
    /// sensor holding the most windows gives up its oldest, counted as shed.
    #[serde(default = "default_queue_capacity")]
    pub queue_capacity: usize,
    /// Largest sensor payload accepted.
    #[serde(default = "default_max_payload_bytes")]
    pub max_payload_bytes: usize,
    /// How often the retained status is refreshed.
    #[serde(default = "default_status_interval_secs")]
    pub status_interval_secs: u64,
    /// How long a shutdown waits for in-flight work and acknowledgements.
    #[serde(default = "default_drain_timeout_ms")]
    pub drain_timeout_ms: u64,
}

/// `[mqtt]`: the broker and reconnection.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttSection {
    /// Broker host.
    #[serde(default = "default_host")]
    pub host: String,
    /// Broker port.
    #[serde(default = "default_port")]
    pub port: u16,
    /// The broker's Unix socket (relative paths from the config file's folder), for a broker
    /// on the gateway itself: the agent connects there instead of to `host` and `port`, and
    /// each message skips the TCP stack.
    #[serde(default)]
    pub unix_socket: Option<PathBuf>,
    /// Client id; empty means `spillway-<site>-<gateway>`.
    #[serde(default)]
    pub client_id: String,
    /// User name, if the broker wants one.
    #[serde(default)]
    pub username: Option<String>,
    /// Password, if the broker wants one.
    #[serde(default)]
    pub password: Option<String>,
    /// MQTT keep-alive.
    #[serde(default = "default_keep_alive_secs")]
    pub keep_alive_secs: u64,
    /// Asks the broker to keep the agent's session while it is away (clean session off): its
    /// subscription, and the windows published to it meanwhile, up to the broker's own queue
    /// limit; through a broker restart too, where the broker persists sessions. Off: windows
    /// published while the agent is disconnected are not kept for it.
    #[serde(default)]
    pub persistent_session: bool,
    /// First reconnection delay; it doubles up to `reconnect_max_ms`.
    #[serde(default = "default_reconnect_min_ms")]
    pub reconnect_min_ms: u64,
    /// Longest reconnection delay.
    #[serde(default = "default_reconnect_max_ms")]
    pub reconnect_max_ms: u64,
    /// Largest MQTT packet the client reads; bigger packets break the connection, so keep it
    /// well above `agent.max_payload_bytes`.
    #[serde(default = "default_max_packet_bytes")]
    pub max_packet_bytes: usize,
    /// Requests buffered towards the broker while it is slow or away.
    #[serde(default = "default_request_capacity")]
    pub request_capacity: usize,
    /// Results per message on a sensor's `inference` topic. 1 (the default) publishes each
    /// result as its own JSON object; above 1, every message is a JSON array of one to this
    /// many results of that sensor, oldest first.
    #[serde(default = "default_result_batch")]
    pub result_batch: usize,
    /// With `result_batch` above 1, how long a result may wait for others of its sensor
    /// before its batch is published anyway (0: publish what is ready, never wait).
    #[serde(default = "default_result_linger_ms")]
    pub result_linger_ms: u64,
    /// File that keeps results while the broker is away, and through a stop (relative paths
    /// from the config file's folder); none: results wait in memory only, and those the
    /// broker has not taken at a stop are lost.
    #[serde(default)]
    pub outbox_path: Option<PathBuf>,
    /// Largest used size of the outbox file (its 8 KiB header included); past it, results
    /// are dropped and counted. The file grows by doubling: on disk, up to twice this.
    #[serde(default = "default_outbox_max_bytes")]
    pub outbox_max_bytes: u64,
}

impl Default for MqttSection {
    fn default() -> Self {
        MqttSection {
            host: default_host(),
            port: default_port(),
            unix_socket: None,
            client_id: String::new(),
            username: None,
            password: None,
            keep_alive_secs: default_keep_alive_secs(),
            persistent_session: false,
            reconnect_min_ms: default_reconnect_min_ms(),
            reconnect_max_ms: default_reconnect_max_ms(),
            max_packet_bytes: default_max_packet_bytes(),
            request_capacity: default_request_capacity(),
            result_batch: default_result_batch(),
            result_linger_ms: default_result_linger_ms(),
            outbox_path: None,
            outbox_max_bytes: default_outbox_max_bytes(),
        }
    }
}

/// `[[models]]`: one model the agent serves.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// The name sensors refer to and results carry.
    pub name: String,
    /// Path to the ONNX file; relative paths are taken from the config file's folder.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// A sample model compiled into the agent, instead of `path`.
    #[serde(default)]
    pub zoo: Option<String>,
    /// Version reported with results.
    #[serde(default = "default_version")]
    pub version: u32,
    /// Input shape, where the model leaves dimensions open.
    #[serde(default)]
    pub input_shape: Option<Vec<usize>>,
    /// Samples between two inferences on one sensor; defaults to the window length.
    #[serde(default)]
    pub stride: Option<usize>,
    /// The output holding the anomaly score; defaults to the first output.
    #[serde(default)]
    pub score_output: Option<String>,
    /// Scores above this are reported as anomalies.
    #[serde(default = "default_threshold")]
    pub anomaly_threshold: f32,
    /// Most queued windows one inference call may serve. Where the model leaves its batch
    /// dimension open, windows waiting in the queue run together (never waiting for more to
    /// arrive), in powers of two up to this; at load each size is timed against one window
    /// at a time and kept only where it pays. 1 runs one window per call.
    #[serde(default = "default_max_batch")]
    pub max_batch: usize,
}

/// `[sensors]`: the sensor → model assignment.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SensorsSection {
    /// Model for sensors not listed in `assign`; without it such sensors are refused.
    #[serde(default)]
    pub default_model: Option<String>,
    /// Most sensors tracked at once; more are refused and counted.
    #[serde(default = "default_max_sensors")]
    pub max_sensors: usize,
    /// Sensor name → model name.
    #[serde(default)]
    pub assign: BTreeMap<String, String>,
}

impl Default for SensorsSection {
    fn default() -> Self {
        SensorsSection {
            default_model: None,
            max_sensors: default_max_sensors(),
            assign: BTreeMap::new(),
        }
    }
}

/// `[offload]`: when and where windows go to cloud replicas.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OffloadSection {
    /// `off`, `reactive` (only when the local queue would miss the SLO) or `predictive`
    /// (forecast spill plus the reactive guard).
    #[serde(default = "default_offload_mode")]
    pub mode: String,
    /// Replica endpoints, `host:port` (UDP).
    #[serde(default)]
    pub replicas: Vec<String>,
    /// The name the replicas' certificates carry.
    #[serde(default = "default_server_name")]
    pub server_name: String,
    /// The fleet CA certificate (PEM); relative paths are taken from the config file's folder.
    #[serde(default)]
    pub ca_cert: Option<PathBuf>,
    /// This agent's certificate (PEM).
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// This agent's private key (PEM).
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// Time a window may take from completion to result.
    #[serde(default = "default_slo_ms")]
    pub slo_ms: u64,
    /// Arrival counting interval of the forecaster.
    #[serde(default = "default_tick_ms")]
    pub tick_ms: u64,
    /// Forecast horizon: how far ahead the agent looks (the cloud's lead time).
    #[serde(default = "default_horizon_ms")]
    pub horizon_ms: u64,
    /// Start spilling when the forecast exceeds this share of local capacity.
    #[serde(default = "default_rho_max")]
    pub rho_max: f64,
    /// While spilling, keep this share of local capacity busy.
    #[serde(default = "default_rho_target")]
    pub rho_target: f64,
    /// Stop spilling when load and forecast fall below this share of local capacity.
    #[serde(default = "default_rho_exit")]
    pub rho_exit: f64,
    /// Send a window remote when its local completion would use more than this share of
    /// the SLO.
    #[serde(default = "default_guard_share")]
    pub guard_share: f64,
    /// Most requests at the replicas at once; beyond it windows stay local.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// How long a replica that failed or timed out is left alone.
    #[serde(default = "default_eject_ms")]
    pub eject_ms: u64,
    /// Time allowed for a QUIC handshake.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// First reconnection delay; it doubles up to `reconnect_max_ms`.
    #[serde(default = "default_reconnect_min_ms")]
    pub reconnect_min_ms: u64,
    /// Longest reconnection delay.
    #[serde(default = "default_reconnect_max_ms")]
    pub reconnect_max_ms: u64,
}

impl Default for OffloadSection {
    fn default() -> Self {
        OffloadSection {
            mode: default_offload_mode(),
            replicas: Vec::new(),
            server_name: default_server_name(),
            ca_cert: None,
            cert: None,
            key: None,
            slo_ms: default_slo_ms(),
            tick_ms: default_tick_ms(),
            horizon_ms: default_horizon_ms(),
            rho_max: default_rho_max(),
            rho_target: default_rho_target(),
            rho_exit: default_rho_exit(),
            guard_share: default_guard_share(),
            max_in_flight: default_max_in_flight(),
            eject_ms: default_eject_ms(),
            connect_timeout_ms: default_connect_timeout_ms(),
            reconnect_min_ms: default_reconnect_min_ms(),
            reconnect_max_ms: default_reconnect_max_ms(),
        }
    }
}

fn default_offload_mode() -> String {
    "off".into()
}
fn default_server_name() -> String {
    "localhost".into()
}
fn default_slo_ms() -> u64 {
    500
}
fn default_tick_ms() -> u64 {
    250
}
fn default_horizon_ms() -> u64 {
    1_000
}
fn default_rho_max() -> f64 {
    0.85
}
fn default_rho_target() -> f64 {
    0.7
}
fn default_rho_exit() -> f64 {
    0.6
}
fn default_guard_share() -> f64 {
    0.5
}
fn default_max_in_flight() -> usize {
    256
}
fn default_eject_ms() -> u64 {
    5_000
}
fn default_connect_timeout_ms() -> u64 {
    2_000
}

fn default_queue_capacity() -> usize {
    256
}
fn default_max_payload_bytes() -> usize {
    64 * 1024
}
fn default_status_interval_secs() -> u64 {
    5
}
fn default_drain_timeout_ms() -> u64 {
    5_000
}
fn default_host() -> String {
    "127.0.0.1".into()
}
fn default_port() -> u16 {
    1883
}
fn default_keep_alive_secs() -> u64 {
    10
}
fn default_reconnect_min_ms() -> u64 {
    100
}
fn default_reconnect_max_ms() -> u64 {
    5_000
}
fn default_max_packet_bytes() -> usize {
    1024 * 1024
}
fn default_request_capacity() -> usize {
    1024
}
fn default_outbox_max_bytes() -> u64 {
    64 << 20
}
fn default_result_batch() -> usize {
    1
}
fn default_result_linger_ms() -> u64 {
    5
}
/// Most results one batch message may carry.
pub const MAX_RESULT_BATCH: usize = 1024;
fn default_version() -> u32 {
    1
}
fn default_threshold() -> f32 {
    f32::INFINITY
}
fn default_max_batch() -> usize {
    32
}
/// Largest `max_batch` a model may be given.
pub const MAX_BATCH: usize = 256;
fn default_max_sensors() -> usize {
    256
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file or an override could not be read or parsed.
    #[error("{0}")]
    Load(#[from] config::ConfigError),
    /// The values parsed but do not make sense together.
    #[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
    Invalid(Vec<String>),
}

impl MqttSection {
    /// Where the broker is, for logs: `unix:PATH` or `HOST:PORT`.
    pub fn broker(&self) -> String {
        match &self.unix_socket {
            Some(path) => format!("unix:{}", path.display()),
            None => format!("{}:{}", self.host, self.port),
        }
    }
}

impl AgentConfig {
    /// Loads `path` (TOML) and applies `SPILLWAY__…` overrides from `env`.
    pub fn load(
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let file = config::File::from(path).format(config::FileFormat::Toml);
        let mut config = Self::build(file, env)?;
        if let Some(dir) = path.parent() {
            let o = &mut config.offload;
            if config.hub.state_dir.is_relative() {
                config.hub.state_dir = dir.join(&config.hub.state_dir);
            }
            let paths = config.models.iter_mut().map(|m| &mut m.path).chain([
                &mut o.ca_cert,
                &mut o.cert,
                &mut o.key,
                &mut config.mqtt.outbox_path,
                &mut config.mqtt.unix_socket,
            ]);
            for path in paths {
                if let Some(p) = path
                    && p.is_relative()
                {
                    *p = dir.join(&*p);
                }
            }
        }
        config.validate()?;
        Ok(config)
    }

    /// Parses a TOML string and applies `SPILLWAY__…` overrides from `env`.
    pub fn from_toml_str(
        toml: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let config = Self::build(config::File::from_str(toml, config::FileFormat::Toml), env)?;
        config.validate()?;
        Ok(config)
    }

    fn build<S>(
        source: S,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError>
    where
        S: config::Source + Send + Sync + 'static,
    {
        let env: HashMap<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("SPILLWAY__"))
            .collect();
        let config = config::Config::builder()
            .add_source(source)
            .add_source(
                config::Environment::with_prefix("SPILLWAY")
                    .prefix_separator("__")
                    .separator("__")
                    .try_parsing(true)
                    .source(Some(env)),
            )
            .build()?;
        Ok(config.try_deserialize()?)
    }

    /// Checks ranges and cross-references; lists every problem found.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        let a = &self.agent;
        for (what, name) in [("agent.site", &a.site), ("agent.gateway", &a.gateway)] {
            if name.is_empty() || name.contains(['/', '+', '#']) {
                problems.push(format!(
                    "{what} must be a non-empty topic level without / + #"
                ));
            }
        }
        if a.queue_capacity == 0 {
            problems.push("agent.queue_capacity must be at least 1".into());
        }
        if a.max_payload_bytes == 0 {
            problems.push("agent.max_payload_bytes must be at least 1".into());
        }
        if a.status_interval_secs == 0 {
            problems.push("agent.status_interval_secs must be at least 1".into());
        }
        let m = &self.mqtt;
        if m.max_packet_bytes < a.max_payload_bytes + 1024 {
            problems.push(format!(
                "mqtt.max_packet_bytes ({}) must exceed agent.max_payload_bytes ({}) by at least 1 KiB, \
                 or an oversized payload would break the connection instead of being refused",
                m.max_packet_bytes, a.max_payload_bytes
            ));
        }
        if m.reconnect_min_ms == 0 || m.reconnect_min_ms > m.reconnect_max_ms {
            problems.push("mqtt.reconnect_min_ms must be in 1..=mqtt.reconnect_max_ms".into());
        }
        if m.keep_alive_secs == 0 {
            problems.push("mqtt.keep_alive_secs must be at least 1".into());
        }
        if m.request_capacity == 0 {
            problems.push("mqtt.request_capacity must be at least 1".into());
        }
        if !(1..=MAX_RESULT_BATCH).contains(&m.result_batch) {
            problems.push(format!(
                "mqtt.result_batch must be in 1..={MAX_RESULT_BATCH}"
            ));
        }
        if m.outbox_path.is_some() && m.outbox_max_bytes < 64 << 10 {
            problems.push("mqtt.outbox_max_bytes must be at least 65536".into());
        }
        if m.result_linger_ms > 1000 {
            problems.push("mqtt.result_linger_ms must be at most 1000".into());
        }
        if self.models.is_empty() {
            problems.push("at least one [[models]] entry is needed".into());
        }
        let mut names = std::collections::BTreeSet::new();
        for model in &self.models {
            if !names.insert(model.name.as_str()) {
                problems.push(format!("model {:?} is defined twice", model.name));
            }
            match (&model.path, &model.zoo) {
                (Some(_), Some(_)) => problems.push(format!(
                    "model {:?}: give path or zoo, not both",
                    model.name
                )),
                (None, None) => problems.push(format!("model {:?}: give path or zoo", model.name)),
                (None, Some(zoo)) if models::zoo::by_name(zoo).is_none() => {
                    let known: Vec<_> = models::zoo::ALL.iter().map(|m| m.name).collect();
                    problems.push(format!(
                        "model {:?}: no zoo model {zoo:?} (known: {known:?})",
                        model.name
                    ));
                }
                _ => {}
            }
            if model.stride == Some(0) {
                problems.push(format!("model {:?}: stride must be at least 1", model.name));
            }
            if model.anomaly_threshold.is_nan() {
                problems.push(format!("model {:?}: anomaly_threshold is NaN", model.name));
            }
            if !(1..=MAX_BATCH).contains(&model.max_batch) {
                problems.push(format!(
                    "model {:?}: max_batch must be in 1..={MAX_BATCH}, not {}",
                    model.name, model.max_batch
                ));
            }
        }
        self.validate_offload(&mut problems);
        self.validate_hub(&mut problems);
        let s = &self.sensors;
        if s.max_sensors == 0 {
            problems.push("sensors.max_sensors must be at least 1".into());
        }
        for (sensor, model) in s
            .assign
            .iter()
            .map(|(k, v)| (Some(k), v))
            .chain(s.default_model.iter().map(|m| (None, m)))
        {
            if !names.contains(model.as_str()) {
                let whom = sensor.map_or_else(
                    || "sensors.default_model".to_owned(),
                    |s| format!("sensor {s:?}"),
                );
                problems.push(format!(
                    "{whom} names model {model:?}, which is not in [[models]]"
                ));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    fn validate_offload(&self, problems: &mut Vec<String>) {
        let o = &self.offload;
        let Some(mode) = models::offload::Mode::parse(&o.mode) else {
            problems.push(format!(
                "offload.mode {:?} is not one of off, reactive, predictive",
                o.mode
            ));
            return;
        };
        if mode == models::offload::Mode::Off {
            return;
        }
        let hub = self.hub.endpoint.is_some();
        if o.replicas.is_empty() && !hub {
            problems.push(
                "offload.replicas is empty and there is no [hub] to name them, so there is nowhere to offload to"
                    .into(),
            );
        }
        for r in &o.replicas {
            if r.rsplit_once(':')
                .is_none_or(|(host, port)| host.is_empty() || port.parse::<u16>().is_err())
            {
                problems.push(format!("offload.replicas: {r:?} is not host:port"));
            }
        }
        for (what, path) in [("ca_cert", &o.ca_cert), ("cert", &o.cert), ("key", &o.key)] {
            if path.is_none() && !hub {
                problems.push(format!(
                    "offload.{what} is needed (mutual TLS), or a [hub] that issues it"
                ));
            }
        }
        if o.slo_ms == 0 || o.tick_ms == 0 || o.horizon_ms == 0 {
            problems.push("offload.slo_ms, tick_ms and horizon_ms must be at least 1".into());
        }
        if !(0.0 < o.rho_exit
            && o.rho_exit < o.rho_max
            && o.rho_target <= o.rho_max
            && o.rho_target > 0.0)
        {
            problems.push(format!(
                "offload needs 0 < rho_exit < rho_max and 0 < rho_target <= rho_max (got exit {}, target {}, max {})",
                o.rho_exit, o.rho_target, o.rho_max
            ));
        }
        if !(o.guard_share > 0.0 && o.guard_share <= 1.0) {
            problems.push("offload.guard_share must be in (0, 1]".into());
        }
        if o.max_in_flight == 0 {
            problems.push("offload.max_in_flight must be at least 1".into());
        }
        if o.reconnect_min_ms == 0 || o.reconnect_min_ms > o.reconnect_max_ms {
            problems
                .push("offload.reconnect_min_ms must be in 1..=offload.reconnect_max_ms".into());
        }
    }

    fn validate_hub(&self, problems: &mut Vec<String>) {
        let h = &self.hub;
        if !h.model_format.format().is_readable() {
            problems.push(format!(
                "hub.model_format: this agent was built without {} support; use \"nnef\"",
                h.model_format.format()
            ));
        }
        if let Some(e) = &h.endpoint
            && e.rsplit_once(':')
                .is_none_or(|(host, port)| host.is_empty() || port.parse::<u16>().is_err())
        {
            problems.push(format!("hub.endpoint: {e:?} is not host:port"));
        }
        if h.reconnect_min_ms == 0 || h.reconnect_min_ms > h.reconnect_max_ms {
            problems.push("hub.reconnect_min_ms must be in 1..=hub.reconnect_max_ms".into());
        }
        if h.connect_timeout_ms == 0 {
            problems.push("hub.connect_timeout_ms must be at least 1".into());
        }
    }

    /// The identity offload connections use: `[offload]`'s files when given, else the one
    /// enrolled through the hub.
    pub fn offload_identity(&self) -> Option<Identity> {
        let o = &self.offload;
        match (&o.ca_cert, &o.cert, &o.key) {
            (Some(ca_cert), Some(cert), Some(key)) => Some(Identity {
                ca_cert: ca_cert.clone(),
                cert: cert.clone(),
                key: key.clone(),
            }),
            _ if self.hub.endpoint.is_some() => Some(self.hub.identity()),
            _ => None,
        }
    }

    /// The offload mode (validated at load).
    pub fn offload_mode(&self) -> models::offload::Mode {
        models::offload::Mode::parse(&self.offload.mode).unwrap_or(models::offload::Mode::Off)
    }

    /// This gateway's MQTT topics.
    pub fn topics(&self) -> protocol::edge::Topics {
        protocol::edge::Topics::new(&self.agent.site, &self.agent.gateway)
    }

    /// The MQTT client id to use.
    pub fn client_id(&self) -> String {
        if self.mqtt.client_id.is_empty() {
            format!("spillway-{}-{}", self.agent.site, self.agent.gateway)
        } else {
            self.mqtt.client_id.clone()
        }
    }

    /// Worker threads to start.
    pub fn worker_count(&self) -> usize {
        match self.agent.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [agent]
        site = "plant"
        gateway = "gw1"
        [[models]]
        name = "vib"
        zoo = "vibration-ae"
        [sensors]
        default_model = "vib"
    "#;

    fn no_env() -> Vec<(String, String)> {
        Vec::new()
    }

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let c = AgentConfig::from_toml_str(MINIMAL, no_env()).expect("valid");
        assert_eq!(c.mqtt.port, 1883);
        assert_eq!(c.agent.queue_capacity, 256);
        assert_eq!(c.client_id(), "spillway-plant-gw1");
    }

    #[test]
    fn a_missing_section_gets_the_same_defaults_as_an_empty_one() {
        let toml = "[agent]\nsite = \"a\"\ngateway = \"b\"\n[[models]]\nname = \"m\"\nzoo = \"vibration-ae\"\n";
        let c = AgentConfig::from_toml_str(toml, no_env()).expect("valid");
        assert_eq!(c.sensors.max_sensors, 256);
        assert_eq!(c.mqtt.reconnect_max_ms, 5_000);
    }

    #[test]
    fn environment_overrides_the_file() {
        let env = vec![
            ("SPILLWAY__MQTT__PORT".to_owned(), "1884".to_owned()),
            ("SPILLWAY__AGENT__GATEWAY".to_owned(), "gw9".to_owned()),
            ("OTHER__MQTT__PORT".to_owned(), "1".to_owned()),
        ];
        let c = AgentConfig::from_toml_str(MINIMAL, env).expect("valid");
        assert_eq!(c.mqtt.port, 1884);
        assert_eq!(c.agent.gateway, "gw9");
    }

    #[test]
    fn unknown_keys_are_refused_with_their_name() {
        let toml = MINIMAL.replace("[sensors]", "[sensors]\nmax_sensor = 3");
        let err = AgentConfig::from_toml_str(&toml, no_env()).expect_err("typo");
        assert!(err.to_string().contains("max_sensor"), "{err}");
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let toml = r#"
            [agent]
            site = "a/b"
            gateway = "gw"
            queue_capacity = 0
            [[models]]
            name = "vib"
            zoo = "no-such-model"
            stride = 0
            max_batch = 0
            [sensors]
            default_model = "other"
        "#;
        let err = AgentConfig::from_toml_str(toml, no_env()).expect_err("invalid");
        let text = err.to_string();
        for needle in [
            "agent.site",
            "queue_capacity",
            "no-such-model",
            "stride",
            "max_batch",
            "\"other\"",
        ] {
            assert!(text.contains(needle), "{needle} missing from: {text}");
        }
    }

    #[test]
    fn offload_needs_replicas_and_certificates() {
        let toml = format!(
            "{MINIMAL}\n[offload]\nmode = \"predictive\"\nreplicas = [\"nohost\"]\nrho_exit = 0.9\n"
        );
        let text = AgentConfig::from_toml_str(&toml, no_env())
            .expect_err("invalid")
            .to_string();
        for needle in ["\"nohost\"", "offload.ca_cert", "offload.key", "rho_exit"] {
            assert!(text.contains(needle), "{needle} missing from: {text}");
        }
        let off = AgentConfig::from_toml_str(MINIMAL, no_env()).expect("valid");
        assert_eq!(off.offload_mode(), models::offload::Mode::Off);
        let bad_mode = format!("{MINIMAL}\n[offload]\nmode = \"sometimes\"\n");
        assert!(AgentConfig::from_toml_str(&bad_mode, no_env()).is_err());
    }

    #[test]
    fn results_go_one_per_message_unless_batching_is_asked_for() {
        let c = AgentConfig::from_toml_str(MINIMAL, no_env()).expect("valid");
        assert_eq!(c.mqtt.result_batch, 1);
        let batched = format!("{MINIMAL}\n[mqtt]\nresult_batch = 64\nresult_linger_ms = 2\n");
        let c = AgentConfig::from_toml_str(&batched, no_env()).expect("valid");
        assert_eq!((c.mqtt.result_batch, c.mqtt.result_linger_ms), (64, 2));
        for bad in [
            "result_batch = 0",
            "result_batch = 1025",
            "result_linger_ms = 1001",
        ] {
            let toml = format!("{MINIMAL}\n[mqtt]\n{bad}\n");
            let err = AgentConfig::from_toml_str(&toml, no_env()).expect_err(bad);
            let key = bad.split(' ').next().unwrap_or_default();
            assert!(err.to_string().contains(key), "{bad}: {err}");
        }
    }

    #[test]
    fn a_unix_socket_replaces_host_and_port_and_is_found_from_the_config_folder()
    -> anyhow::Result<()> {
        let c = AgentConfig::from_toml_str(MINIMAL, no_env())?;
        assert_eq!(c.mqtt.broker(), "127.0.0.1:1883");
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("agent.toml");
        std::fs::write(
            &path,
            format!("{MINIMAL}\n[mqtt]\nunix_socket = \"run/mqtt.sock\"\n"),
        )?;
        let c = AgentConfig::load(&path, no_env())?;
        let socket = dir.path().join("run/mqtt.sock");
        assert_eq!(c.mqtt.unix_socket.as_deref(), Some(socket.as_path()));
        assert_eq!(c.mqtt.broker(), format!("unix:{}", socket.display()));
        Ok(())
    }

    #[test]
    fn a_bad_env_value_is_an_error_not_a_default() {
        let env = vec![("SPILLWAY__MQTT__PORT".to_owned(), "not-a-port".to_owned())];
        assert!(AgentConfig::from_toml_str(MINIMAL, env).is_err());
    }
}
