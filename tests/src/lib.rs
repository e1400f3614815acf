//! Shared harness for Spillway's end-to-end tests and benchmarks: real processes only.
//!
//! [`Broker`] runs a private mosquitto on a free loopback port (and can restart it on the
//! same port); [`Agent`] runs the `edge-agent` binary as a child process with a config written
//! to a temporary folder; [`Listener`] is an independent MQTT client that collects results and
//! status messages; [`fleet`] adds the cloud side (fleet CA, replica processes, a lossy UDP
//! relay, a CPU limit that makes an agent a slow gateway, a load driver with a rate profile).
//! Nothing here is mocked: the tests see exactly what a user's broker and tools would see. When mosquitto is not installed the tests say so and skip, except in CI
//! (`CI` set), where a missing broker is a failure.

#![allow(clippy::disallowed_methods)] // test harness: waits with deadlines

use std::collections::HashMap;
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub mod fleet;
pub mod hub;
pub mod load;
pub mod tcp_relay;

use anyhow::{Context, bail};
use protocol::edge::{InferenceResult, Status, decode_results};
use protocol::payload::{encode_plain_json, encode_senml_cbor, encode_senml_json};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

/// Sample period of the test windows (12.8 kHz).
pub const SAMPLE_PERIOD: f64 = 1.0 / 12_800.0;

/// Window `i` of a run as a payload, in format `i % 3` (plain JSON, SenML JSON, SenML CBOR),
/// stamped with a time that identifies it; returns the time stamp too.
pub fn window_payload(i: usize, window: &[f32]) -> (f64, Vec<u8>) {
    let ts = 1_800_000_000.0 + i as f64;
    let bytes = match i % 3 {
        0 => encode_plain_json(window, ts),
        1 => encode_senml_json(window, ts, SAMPLE_PERIOD),
        _ => encode_senml_cbor(window, ts, SAMPLE_PERIOD),
    };
    (ts, bytes)
}

/// The data topic of `sensor` at `gateway` of the test site.
pub fn data_topic(gateway: &str, sensor: &str) -> String {
    format!("spillway/test/{gateway}/{sensor}/data")
}

/// A relay's own thread, with a runtime of its own, so a busy test cannot hold up the
/// "network". Dropping it stops the relay and joins the thread.
pub(crate) struct NetworkThread {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NetworkThread {
    /// Runs `relay` on a new thread named `name` until dropped; returns once the relay has
    /// sent, on the channel it is given, the address it serves (or why it cannot).
    pub(crate) async fn start<F, Fut>(
        name: &str,
        relay: F,
    ) -> anyhow::Result<(NetworkThread, std::net::SocketAddr)>
    where
        F: FnOnce(tokio::sync::oneshot::Sender<anyhow::Result<std::net::SocketAddr>>) -> Fut
            + Send
            + 'static,
        Fut: std::future::Future<Output = ()>,
    {
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(anyhow::Error::from(e)));
                        return;
                    }
                };
                runtime.block_on(async move {
                    tokio::select! {
                        _ = stop_rx => {}
                        () = relay(ready_tx) => {}
                    }
                });
            })?;
        let addr = ready_rx.await.context("the relay thread died")??;
        let thread = NetworkThread {
            stop: Some(stop_tx),
            thread: Some(thread),
        };
        Ok((thread, addr))
    }
}

impl Drop for NetworkThread {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A free TCP port on loopback (bound, then released).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Path of mosquitto, if installed.
pub fn mosquitto_path() -> Option<PathBuf> {
    [
        "/usr/sbin/mosquitto",
        "/usr/bin/mosquitto",
        "/usr/local/sbin/mosquitto",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
}

/// Returns the mosquitto path, or `None` after printing why the test is skipped. In CI a
/// missing mosquitto panics: `.ci/run` installs it, so its absence is a real failure.
pub fn require_mosquitto() -> Option<PathBuf> {
    let found = mosquitto_path();
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "mosquitto is not installed, and CI must have it"
        );
        eprintln!(
            "SKIPPED: mosquitto is not installed (apt-get install mosquitto mosquitto-clients)"
        );
    }
    found
}

/// A mosquitto broker: one the test owns, or the shared one CI started.
pub struct Broker {
    binary: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    owned: bool,
    persistent: bool,
    child: Option<Child>,
}

impl Broker {
    /// The broker named by `SPILLWAY_TEST_BROKER_PORT` (started by `.ci/run`), or else a
    /// private one. Tests that restart the broker use [`Broker::start`] instead.
    pub fn shared_or_start(binary: &Path) -> anyhow::Result<Broker> {
        match std::env::var("SPILLWAY_TEST_BROKER_PORT") {
            Ok(port) => {
                let port = port.parse().context("SPILLWAY_TEST_BROKER_PORT")?;
                wait_for_port(port, Duration::from_secs(5))?;
                Ok(Broker {
                    binary: binary.to_owned(),
                    dir: tempfile::tempdir()?,
                    port,
                    owned: false,
                    persistent: false,
                    child: None,
                })
            }
            Err(_) => Broker::start(binary),
        }
    }

    /// Starts mosquitto on a free loopback port.
    pub fn start(binary: &Path) -> anyhow::Result<Broker> {
        Broker::start_with(binary, false)
    }

    /// Starts mosquitto with persistence: on a clean stop it saves its sessions (clients
    /// that asked to be kept, their subscriptions and the messages queued for them) to its
    /// folder, and loads them when it starts again.
    pub fn start_persistent(binary: &Path) -> anyhow::Result<Broker> {
        Broker::start_with(binary, true)
    }

    fn start_with(binary: &Path, persistent: bool) -> anyhow::Result<Broker> {
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let mut broker = Broker {
            binary: binary.to_owned(),
            dir,
            port,
            owned: true,
            persistent,
            child: None,
        };
        broker.spawn()?;
        Ok(broker)
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The broker's process id, when this started it and it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The Unix socket it also listens on (a broker the test started; the shared one has
    /// none, and nothing will be found there).
    pub fn unix_socket(&self) -> PathBuf {
        self.dir.path().join("run").join("mqtt.sock")
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        // Started as root, mosquitto runs as the `mosquitto` user, also when it binds its Unix
        // socket: the socket's and the database's folders must be open to it (and the
        // temporary folder above them passable).
        let db = self.dir.path().join("db");
        let run = self.dir.path().join("run");
        for folder in [&run, &db] {
            if (folder == &run || self.persistent) && !folder.exists() {
                use std::os::unix::fs::PermissionsExt;
                std::fs::create_dir(folder)?;
                std::fs::set_permissions(folder, std::fs::Permissions::from_mode(0o777))?;
                std::fs::set_permissions(self.dir.path(), std::fs::Permissions::from_mode(0o711))?;
            }
        }
        let conf = self.dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {} 127.0.0.1\nlistener 0 {}\nallow_anonymous true\npersistence {}\n\
                 persistence_location {}/\n\
                 max_queued_messages 200000\nmax_inflight_messages 0\nmessage_size_limit 0\n\
                 log_dest stderr\nlog_type error\n",
                self.port,
                self.unix_socket().display(),
                self.persistent,
                db.display()
            ),
        )?;
        let log = std::fs::File::create(self.dir.path().join("mosquitto.log"))?;
        let child = Command::new(&self.binary)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {:?}", self.binary))?;
        self.child = Some(child);
        wait_for_port(self.port, Duration::from_secs(10))
    }

    /// Kills the broker (as a crash would).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port (only a broker this test started).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        if !self.owned {
            bail!("this broker is not owned by the test");
        }
        self.kill();
        self.spawn()
    }

    /// Stops it as an operator would (SIGTERM: it closes every connection and, when
    /// persistent, saves its sessions) and starts it again on the same port.
    pub fn restart_cleanly(&mut self) -> anyhow::Result<()> {
        if !self.owned {
            bail!("this broker is not owned by the test");
        }
        if let Some(mut child) = self.child.take() {
            Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status()?;
            child.wait()?;
        }
        self.spawn()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}

fn wait_for_port(port: u16, limit: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("nothing listens on port {port} after {limit:?}")
}

/// Path of a binary built from this workspace, next to the running test executable.
pub fn workspace_binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let mut dir = exe
        .parent()
        .context("test executable has no folder")?
        .to_owned();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    if !path.exists() {
        bail!("{path:?} is not built; run the tests with `cargo test --workspace`");
    }
    Ok(path)
}

/// An `edge-agent` child process.
pub struct Agent {
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl Agent {
    /// Starts the agent with `config` (TOML) and extra environment variables.
    pub fn start(config: &str, env: &[(&str, &str)]) -> anyhow::Result<Agent> {
        Agent::start_binary(&workspace_binary("edge-agent")?, config, env)
    }

    /// Starts a given `edge-agent` build (another profile or target) like [`Agent::start`].
    pub fn start_binary(
        binary: &Path,
        config: &str,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Agent> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("agent.toml");
        std::fs::File::create(&path)?.write_all(config.as_bytes())?;
        let log = std::fs::File::create(dir.path().join("agent.log"))?;
        let mut command = Command::new(binary);
        command
            .arg("--config")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(log);
        command.env("RUST_LOG", "info");
        for (k, v) in env {
            command.env(k, v);
        }
        let child = command.spawn().context("starting edge-agent")?;
        Ok(Agent {
            child: Some(child),
            dir,
        })
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Sends SIGTERM and waits for a clean exit; returns whether it exited with success.
    pub fn terminate(&mut self, limit: Duration) -> anyhow::Result<bool> {
        let Some(mut child) = self.child.take() else {
            bail!("agent already stopped")
        };
        let pid = child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status()?;
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status.success());
            }
            if start.elapsed() > limit {
                let _ = child.kill();
                bail!("agent did not stop within {limit:?}; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// What a [`Listener`] has collected.
#[derive(Debug, Default)]
pub struct Collected {
    /// Results, in arrival order.
    pub results: Vec<InferenceResult>,
    /// When each result arrived (Unix seconds), parallel to `results`.
    pub received: Vec<f64>,
    /// Connection errors of the listening client (each may lose messages in flight).
    pub errors: Vec<String>,
    /// Messages on inference topics that parsed (one result each, or a batch of them).
    pub messages: usize,
    /// Payloads on inference topics that did not parse.
    pub unparsable: usize,
    /// The last status message (None until one arrives).
    pub status: Option<Status>,
    /// Raw status payloads that were not a full status (e.g. a bare last will).
    pub raw_status: Option<String>,
}

/// An independent MQTT client that records results and status of one gateway.
pub struct Listener {
    collected: Arc<Mutex<Collected>>,
    task: tokio::task::JoinHandle<()>,
}

impl Listener {
    /// Subscribes to every inference topic and the status topic of `site`/`gateway`.
    pub async fn start(port: u16, site: &str, gateway: &str) -> anyhow::Result<Listener> {
        Listener::start_with(port, site, gateway, false).await
    }

    /// Like [`Listener::start`], with a session the broker keeps while the listener is away
    /// (clean session off), so a result published meanwhile waits for it.
    pub async fn start_persistent(
        port: u16,
        site: &str,
        gateway: &str,
    ) -> anyhow::Result<Listener> {
        Listener::start_with(port, site, gateway, true).await
    }

    async fn start_with(
        port: u16,
        site: &str,
        gateway: &str,
        persistent: bool,
    ) -> anyhow::Result<Listener> {
        let mut options = MqttOptions::new(format!("listener-{}", free_port()?), "127.0.0.1", port);
        options
            .set_keep_alive(Duration::from_secs(5))
            .set_clean_session(!persistent)
            .set_max_packet_size(4 << 20, 4 << 20);
        let (client, mut eventloop) = AsyncClient::new(options, 64);
        let prefix = format!("spillway/{site}/{gateway}");
        let collected = Arc::new(Mutex::new(Collected::default()));
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let mut ready_tx = Some(ready_tx);
        let sink = Arc::clone(&collected);
        let status_topic = format!("{prefix}/status");
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = client
                            .subscribe(format!("{prefix}/+/inference"), QoS::AtLeastOnce)
                            .await;
                        let _ = client
                            .subscribe(status_topic.clone(), QoS::AtLeastOnce)
                            .await;
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(tx) = ready_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let Ok(mut c) = sink.lock() else { return };
                        if p.topic == status_topic {
                            c.raw_status = Some(String::from_utf8_lossy(&p.payload).into_owned());
                            if let Ok(status) = serde_json::from_slice::<Status>(&p.payload) {
                                c.status = Some(status);
                            }
                        } else {
                            match decode_results(&p.payload) {
                                Ok(results) => {
                                    let now = fleet::unix_now();
                                    c.messages += 1;
                                    c.received.extend(results.iter().map(|_| now));
                                    c.results.extend(results);
                                }
                                Err(_) => c.unparsable += 1,
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        if let Ok(mut c) = sink.lock() {
                            c.errors.push(e.to_string());
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), ready_rx)
            .await
            .context("listener did not subscribe in time")?
            .ok();
        // Both subscriptions must be in place: wait for the second SUBACK's effect.
        tokio::time::sleep(Duration::from_millis(100)).await;
        Ok(Listener { collected, task })
    }

    /// Runs `f` on what has been collected.
    pub fn with<T>(&self, f: impl FnOnce(&mut Collected) -> T) -> T {
        let mut guard = self.collected.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut guard)
    }

    /// Number of results so far.
    pub fn result_count(&self) -> usize {
        self.with(|c| c.results.len())
    }

    /// Waits until `pred` holds or `limit` passes; returns whether it held.
    pub async fn wait_until(
        &self,
        limit: Duration,
        mut pred: impl FnMut(&Collected) -> bool,
    ) -> bool {
        let start = Instant::now();
        while start.elapsed() < limit {
            if self.with(|c| pred(c)) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.with(|c| pred(c))
    }

    /// Waits (up to 20 s) for the agent's first status: the agent is connected and
    /// subscribed.
    pub async fn wait_for_status(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.wait_until(Duration::from_secs(20), |c| c.status.is_some())
                .await,
            "the agent did not come online"
        );
        Ok(())
    }

    /// Waits for the status a clean stop leaves (`state: "offline"`, final counters).
    pub async fn final_status(&self, limit: Duration) -> Option<Status> {
        let arrived = self
            .wait_until(limit, |c| {
                c.status.as_ref().is_some_and(|s| s.state == "offline")
            })
            .await;
        if arrived {
            self.with(|c| c.status.clone())
        } else {
            None
        }
    }

    /// Waits for a status whose counters satisfy `pred`.
    pub async fn wait_for_counters(
        &self,
        limit: Duration,
        mut pred: impl FnMut(&std::collections::BTreeMap<String, u64>) -> bool,
    ) -> Option<Status> {
        let ok = self
            .wait_until(limit, |c| {
                c.status.as_ref().is_some_and(|s| pred(&s.counters))
            })
            .await;
        if ok {
            self.with(|c| c.status.clone())
        } else {
            None
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An MQTT client that publishes sensor payloads (QoS 1).
pub struct Publisher {
    client: AsyncClient,
    task: tokio::task::JoinHandle<()>,
    acked: Arc<std::sync::atomic::AtomicU64>,
}

impl Publisher {
    /// Connects to the broker on `port`.
    pub async fn connect(port: u16) -> anyhow::Result<Publisher> {
        Publisher::connect_with(port, false).await
    }

    /// Like [`Publisher::connect`], with a session the broker keeps (clean session off), so
    /// publishes it had not acknowledged when the connection dropped are sent again.
    pub async fn connect_persistent(port: u16) -> anyhow::Result<Publisher> {
        Publisher::connect_with(port, true).await
    }

    async fn connect_with(port: u16, persistent: bool) -> anyhow::Result<Publisher> {
        let mut options =
            MqttOptions::new(format!("publisher-{}", free_port()?), "127.0.0.1", port);
        options
            .set_keep_alive(Duration::from_secs(5))
            .set_clean_session(!persistent)
            .set_max_packet_size(4 << 20, 4 << 20)
            .set_inflight(200);
        let (client, mut eventloop) = AsyncClient::new(options, 1024);
        let acked = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = Arc::clone(&acked);
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let mut ready_tx = Some(ready_tx);
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        if let Some(tx) = ready_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), ready_rx)
            .await
            .context("publisher did not connect")?
            .ok();
        Ok(Publisher {
            client,
            task,
            acked,
        })
    }

    /// Publishes one payload.
    pub async fn publish(&self, topic: &str, payload: Vec<u8>) -> anyhow::Result<()> {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await?;
        Ok(())
    }

    /// Publishes one payload the broker keeps for later subscribers (empty clears it).
    pub async fn publish_retained(&self, topic: &str, payload: Vec<u8>) -> anyhow::Result<()> {
        self.client
            .publish(topic, QoS::AtLeastOnce, true, payload)
            .await?;
        Ok(())
    }

    /// Publishes acknowledged by the broker so far.
    pub fn acked(&self) -> u64 {
        self.acked.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// onnxruntime's reference windows and scores for a zoo model.
pub struct Reference {
    /// Probe windows.
    pub windows: Vec<Vec<f32>>,
    /// The score onnxruntime computed for each.
    pub scores: Vec<f32>,
}

/// Loads `models/zoo/<model>.reference.json`.
pub fn reference(model: &str) -> anyhow::Result<Reference> {
    #[derive(serde::Deserialize)]
    struct File {
        windows: Vec<Vec<f32>>,
        outputs: HashMap<String, Vec<Vec<f32>>>,
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../models/zoo")
        .join(format!("{model}.reference.json"));
    let file: File = serde_json::from_str(
        &std::fs::read_to_string(&path).with_context(|| format!("{path:?}"))?,
    )?;
    let scores = file
        .outputs
        .get("score")
        .context("no score output")?
        .iter()
        .map(|row| row[0])
        .collect();
    Ok(Reference {
        windows: file.windows,
        scores,
    })
}

/// A minimal agent config for tests: site `test`, the given gateway, the zoo autoencoder as
/// default model, fast status updates.
pub fn agent_config(port: u16, gateway: &str, extra_agent: &str) -> String {
    format!(
        r#"
[agent]
site = "test"
gateway = "{gateway}"
workers = 2
status_interval_secs = 1
{extra_agent}

[mqtt]
port = {port}
reconnect_min_ms = 50
reconnect_max_ms = 500

[[models]]
name = "vibration-ae"
zoo = "vibration-ae"

[sensors]
default_model = "vibration-ae"
"#
    )
}
