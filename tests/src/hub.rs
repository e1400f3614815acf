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
