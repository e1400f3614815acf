//! The hub side of the harness: a `cloud-hub serve` process with its state folder, enrolment
//! tokens, agents that report to it, and the hub's HTTP API read as JSON.
//!
//! [`HubProcess`] runs `cloud-hub init` once and `cloud-hub serve` on ports it reads from the
//! hub's first lines (port 0), or on fixed ports for a restart; it can be stopped and started
//! again on the same state folder. [`hub_agent_config`] writes an agent config with a
//! `[hub]` section and its own state folder.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::workspace_binary;

/// A running hub.
pub struct HubProcess {
    child: Option<Child>,
    /// The state folder.
    pub dir: tempfile::TempDir,
    /// The control endpoint.
    pub control: SocketAddr,
    /// The HTTP base URL (`http://host:port`).
    pub http: String,
    http_addr: SocketAddr,
    args: Vec<String>,
    log: PathBuf,
}

impl HubProcess {
    /// Initialises a state folder and starts the hub with `args` after `serve`.
    pub fn start(args: &[&str]) -> anyhow::Result<HubProcess> {
        let dir = tempfile::tempdir()?;
        let out = Command::new(workspace_binary("cloud-hub")?)
            .arg("init")
            .arg("--dir")
            .arg(dir.path())
            .output()?;
        if !out.status.success() {
            bail!("cloud-hub init: {}", String::from_utf8_lossy(&out.stderr));
        }
        let log = dir.path().join("hub.log");
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let (child, control, http_addr) = spawn(
            dir.path(),
            &log,
            "127.0.0.1:0".parse()?,
            "127.0.0.1:0".parse()?,
            &args,
        )?;
        Ok(HubProcess {
            child: Some(child),
            dir,
            control,
            http: format!("http://{http_addr}"),
            http_addr,
            args,
            log,
        })
    }

    /// The hub's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The hub's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A one-time enrolment token for `agent`, valid `ttl_secs`.
    pub fn enroll(&self, agent: &str, ttl_secs: u64) -> anyhow::Result<String> {
        let out = Command::new(workspace_binary("cloud-hub")?)
            .arg("enroll")
            .arg("--dir")
            .arg(self.dir.path())
            .args(["--agent", agent, "--ttl-secs", &ttl_secs.to_string()])
            .output()?;
        if !out.status.success() {
            bail!("cloud-hub enroll: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8(out.stdout)?.trim().to_owned())
    }

    /// Runs `cloud-hub ARGS…` against this hub: `--dir` after `model` commands, `--hub`
    /// after `rollout` commands. Returns stdout, or fails with stderr.
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut command = Command::new(workspace_binary("cloud-hub")?);
        command.args(args);
        match args.first() {
            Some(&"model") => {
                command.arg("--dir").arg(self.dir.path());
            }
            Some(&"rollout") => {
                command.args(["--hub", &self.http]);
            }
            _ => {}
        }
        let out = command.output()?;
        if !out.status.success() {
            bail!(
                "cloud-hub {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8(out.stdout)?)
    }

    /// `cloud-hub rollout start MODEL --version V --canary C --bake B`; returns the id.
    pub fn start_rollout(
        &self,
        model: &str,
        version: u32,
        canary: &str,
        bake: &str,
    ) -> anyhow::Result<u64> {
        self.start_rollout_with(model, version, canary, bake, &[])
    }

    /// [`HubProcess::start_rollout`] with more flags (`--max-drift 0.2` …).
    pub fn start_rollout_with(
        &self,
        model: &str,
        version: u32,
        canary: &str,
        bake: &str,
        flags: &[&str],
    ) -> anyhow::Result<u64> {
        let version = version.to_string();
        let mut args = vec![
            "rollout",
            "start",
            model,
            "--version",
            &version,
            "--canary",
            canary,
            "--bake",
            bake,
        ];
        args.extend_from_slice(flags);
        let out = self.cli(&args)?;
        // "rollout N started: …"
        out.split_whitespace()
            .nth(1)
            .and_then(|n| n.trim_end_matches(':').parse().ok())
            .ok_or_else(|| anyhow::anyhow!("unexpected output {out:?}"))
    }

    /// The version of `model` that `agent` reports running.
    pub fn model_version(&self, agent: &str, model: &str) -> Option<u32> {
        let view = self.agent(agent)?;
        view["models"].as_str()?.split(',').find_map(|m| {
            let (name, version) = m.split_once('@')?;
            (name == model).then(|| version.parse().ok())?
        })
    }

    /// Rollout `id` as the API shows it.
    pub fn rollout(&self, id: u64) -> Option<serde_json::Value> {
        self.get("/api/v1/rollouts")
            .ok()?
            .as_array()?
            .iter()
            .find(|r| r["id"].as_u64() == Some(id))
            .cloned()
    }

    /// Stops the hub with SIGTERM (bounded wait).
    pub fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status()?;
            let start = Instant::now();
            while child.try_wait()?.is_none() {
                if start.elapsed() > Duration::from_secs(15) {
                    let _ = child.kill();
                    bail!("the hub did not stop in 15 s; log:\n{}", self.log());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    /// Starts the hub again on the same state folder and ports.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop()?;
        let (child, _, _) = spawn(
            self.dir.path(),
            &self.log,
            self.control,
            self.http_addr,
            &self.args,
        )?;
        self.child = Some(child);
        Ok(())
    }

    /// GETs `path` from the API as JSON.
    pub fn get(&self, path: &str) -> anyhow::Result<serde_json::Value> {
        Ok(serde_json::from_str(&self.get_text(path)?)?)
    }

    /// GETs `path` as text.
    pub fn get_text(&self, path: &str) -> anyhow::Result<String> {
        http_get(self.http_addr, path)
    }

    /// The API's view of `agent`, if the hub knows it.
    pub fn agent(&self, agent: &str) -> Option<serde_json::Value> {
        self.get(&format!("/api/v1/agents/{agent}")).ok()
    }

    /// Whether the hub shows `agent` online.
    pub fn online(&self, agent: &str) -> bool {
        self.agent(agent)
            .is_some_and(|a| a["online"].as_bool() == Some(true))
    }

    /// Polls `check` every 100 ms for up to `limit`; returns when it held (with the time it
    /// took) or `None`.
    pub fn wait(
        &self,
        limit: Duration,
        mut check: impl FnMut(&HubProcess) -> bool,
    ) -> Option<Duration> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if check(self) {
                return Some(start.elapsed());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    }
}

impl Drop for HubProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGTERM first so the hub stops its replica processes.
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let start = Instant::now();
            while matches!(child.try_wait(), Ok(None)) && start.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn spawn(
    dir: &Path,
    log: &Path,
    control: SocketAddr,
    http: SocketAddr,
    args: &[String],
) -> anyhow::Result<(Child, SocketAddr, SocketAddr)> {
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let mut child = Command::new(workspace_binary("cloud-hub")?)
        .arg("serve")
        .arg("--dir")
        .arg(dir)
        .arg("--listen")
        .arg(control.to_string())
        .arg("--http")
        .arg(http.to_string())
        .args(args)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(log_file)
        .spawn()
        .context("starting cloud-hub serve")?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut reader = BufReader::new(stdout);
    let mut read = |prefix: &str| -> anyhow::Result<String> {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        line.trim()
            .strip_prefix(prefix)
            .map(str::to_owned)
            .with_context(|| {
                format!(
                    "the hub printed {line:?}, not {prefix:?}; log:\n{}",
                    std::fs::read_to_string(log).unwrap_or_default()
                )
            })
    };
    let control: SocketAddr = read("control on ")?.parse()?;
    let http: SocketAddr = read("dashboard on http://")?
        .trim_end_matches('/')
        .parse()?;
    Ok((child, control, http))
}

/// GETs `path` from `addr`; an error unless the answer is 200.
pub fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let url = format!("http://{addr}{path}");
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .into();
    let mut response = agent
        .get(&url)
        .call()
        .map_err(|e| anyhow::anyhow!("GET {url}: {e}"))?;
    response
        .body_mut()
        .read_to_string()
        .map_err(|e| anyhow::anyhow!("GET {url}: {e}"))
}

/// An agent config reporting to `hub` with state in `state_dir` and `extra` appended.
pub fn hub_agent_config(
    broker_port: u16,
    gateway: &str,
    hub: SocketAddr,
    state_dir: &Path,
    extra: &str,
) -> String {
    format!(
        r#"
[agent]
site = "test"
gateway = "{gateway}"
workers = 1
queue_capacity = 4096
status_interval_secs = 1
drain_timeout_ms = 15000

[mqtt]
port = {broker_port}

[[models]]
name = "{model}"
zoo = "{model}"

[sensors]
default_model = "{model}"

[hub]
endpoint = "{hub}"
state_dir = "{state}"
reconnect_max_ms = 1000

{extra}
"#,
        model = crate::fleet::MODEL,
        state = state_dir.display()
    )
}

/// What a [`burst`] run showed.
#[derive(Debug)]
pub struct BurstOutcome {
    /// The slow gateway's capacity, windows per second.
    pub mu: f64,
    /// Every window of the slow gateway, checked.
    pub report: crate::fleet::Report,
    /// The slow gateway's counters at the end.
    pub counters: std::collections::BTreeMap<String, u64>,
    /// Replicas ready while there was no burst yet (steady load below capacity).
    pub ready_before: u64,
    /// Whether the calibration load was itself past the gateway's spill point (a slow
    /// machine): then `ready_before` may be a replica rightly started for it.
    pub calibration_spilled: bool,
    /// Seconds from the start of the ramp to the first replica started (the hub's first
    /// scale-out).
    pub first_started: Option<f64>,
    /// Seconds from the start of the ramp to the first ready replica.
    pub first_ready: Option<f64>,
    /// Most replicas ready at once.
    pub peak: u64,
    /// The hub's scaling decisions.
    pub decisions: serde_json::Value,
    /// Seconds after the burst until no replica was left (`None`: not within 30 s).
    pub back_to_zero: Option<f64>,
    /// The ramp's length: seconds from its start to its peak rate.
    pub ramp_secs: f64,
}

/// Seconds of the burst profile: calm, ramp, peak, calm.
const CALM: f64 = 2.0;
/// Windows per second the slow gateway's capacity is measured at.
const CALIBRATION_RATE: f64 = 40.0;
/// The agents' default `offload.rho_max`: the share of capacity past which they spill.
const RHO_MAX: f64 = 0.85;
const RAMP: f64 = 8.0;
const PEAK: f64 = 8.0;

/// The hub scaling scenario: a hub scaling `bearing-cnn` replicas from zero (`scaling`:
/// `predictive` or `reactive`), three agents reporting to it with predictive offload, one of
/// them a slow gateway under `limit`. The slow gateway's load ramps from 0.3 μ to 2.5 μ
/// over 8 s, holds 8 s and falls to 0.2 μ; the other two send 20 windows/s each.
pub async fn burst(
    broker: &crate::Broker,
    limit: &crate::fleet::CpuLimit,
    scaling: &str,
    slo: Duration,
) -> anyhow::Result<BurstOutcome> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use crate::fleet::Gateway;

    let secs = Duration::from_secs_f64;
    let hub = Arc::new(HubProcess::start(&[
        "--model",
        "bearing-cnn",
        "--scaling",
        scaling,
        "--min-replicas",
        "0",
        "--max-replicas",
        "4",
        "--stable-secs",
        "6",
        "--idle-secs",
        "3",
        "--tick-ms",
        "500",
        "--heartbeat-ms",
        "250",
        "--replica-capacity",
        "1000",
    ])?);
    let offload = format!(
        "[offload]\nmode = \"predictive\"\nslo_ms = {}\n",
        slo.as_millis()
    );
    let names = ["gw-burst", "gw-calm-1", "gw-calm-2"];
    let mut gateways = Vec::new();
    let mut states = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let token = hub.enroll(name, 600)?;
        let state = tempfile::tempdir()?;
        let config = hub_agent_config(broker.port(), name, hub.control, state.path(), &offload);
        let gw = Gateway::start(
            broker.port(),
            (i == 0).then_some(limit),
            name,
            &config,
            &[("SPILLWAY__HUB__TOKEN", token.as_str())],
        )
        .await?;
        gateways.push(gw);
        states.push(state);
    }
    let online = {
        let hub = Arc::clone(&hub);
        tokio::task::spawn_blocking(move || {
            hub.wait(secs(20.0), |h| names.iter().all(|n| h.online(n)))
        })
        .await?
    };
    if online.is_none() {
        bail!("agents did not come online:\n{}", hub.log());
    }
    let burst = &gateways[0];
    let (mu, warm) = burst.calibrate(CALIBRATION_RATE, secs(3.0)).await?;
    let ready_before = models(&hub).0;
    // On a machine slow enough that the calibration load is past the point where the agent
    // spills (ρ_max·μ), a replica rightly starts for it; the burst then waits until it has
    // gone, so that it starts from no replica, as on a faster machine.
    let calibration_spilled = CALIBRATION_RATE >= RHO_MAX * mu;
    if calibration_spilled {
        let hub = Arc::clone(&hub);
        tokio::task::spawn_blocking(move || hub.wait(secs(30.0), |h| models(h) == (0, 0)))
            .await?
            .with_context(|| format!("the calibration's replica did not go (μ {mu:.0}/s)"))?;
    }

    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let hub = Arc::clone(&hub);
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let start = Instant::now();
            let mut samples = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let (ready, existing) = models(&hub);
                samples.push((start.elapsed().as_secs_f64(), ready, existing));
                std::thread::sleep(Duration::from_millis(100));
            }
            samples
        })
    };
    let mut profile = vec![(0.3 * mu, secs(CALM))];
    for step in 1..=16 {
        profile.push(((0.3 + 2.2 * f64::from(step) / 16.0) * mu, secs(RAMP / 16.0)));
    }
    profile.push((2.5 * mu, secs(PEAK)));
    profile.push((0.2 * mu, secs(3.0)));
    let calm = [(20.0, secs(CALM + RAMP + PEAK + 3.0))];
    let (burst_sent, calm1, calm2) = tokio::join!(
        burst.drive(&profile),
        gateways[1].drive(&calm),
        gateways[2].drive(&calm)
    );
    let mut sent = warm;
    sent.extend(burst_sent?);
    calm1?;
    calm2?;
    let report = burst.collect(&sent, secs(60.0)).await;
    let ended = Instant::now();
    stop.store(true, Ordering::Relaxed);
    let samples = watcher
        .join()
        .map_err(|_| anyhow::anyhow!("the watcher panicked"))?;
    let first_started = samples.iter().find(|s| s.2 > 0).map(|s| s.0 - CALM);
    let first_ready = samples.iter().find(|s| s.1 > 0).map(|s| s.0 - CALM);
    let peak = samples.iter().map(|s| s.1).max().unwrap_or(0);
    let decisions = hub.get("/api/v1/decisions")?;
    let back = {
        let hub = Arc::clone(&hub);
        tokio::task::spawn_blocking(move || hub.wait(secs(30.0), |h| models(h) == (0, 0))).await?
    };
    Ok(BurstOutcome {
        mu,
        counters: burst.counters(),
        report,
        ready_before,
        calibration_spilled,
        first_started,
        first_ready,
        peak,
        decisions,
        back_to_zero: back.map(|_| ended.elapsed().as_secs_f64()),
        ramp_secs: RAMP,
    })
}

/// (ready, existing) replicas of the hub's first model.
pub fn models(hub: &HubProcess) -> (u64, u64) {
    hub.get("/api/v1/models")
        .ok()
        .and_then(|m| {
            let m = m.as_array()?.first()?.clone();
            Some((m["ready"].as_u64()?, m["replicas"].as_u64()?))
        })
        .unwrap_or((0, 0))
}

/// `onnx` grown by `extra` bytes: a doc_string (field 6 of ModelProto) appended, which
/// protobuf readers take as the last value of the field and tract ignores. Gives a model of
/// any size with the same behaviour.
pub fn pad_model(mut onnx: Vec<u8>, extra: usize) -> Vec<u8> {
    onnx.push(0x32);
    let mut len = extra;
    while len >= 0x80 {
        onnx.push((len as u8 & 0x7f) | 0x80);
        len >>= 7;
    }
    onnx.push(len as u8);
    onnx.resize(onnx.len() + extra, b' ');
    onnx
}
