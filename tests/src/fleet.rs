//! The cloud side of the harness: a fleet CA, replica processes, a lossy UDP relay, a CPU
//! limit that makes an agent a slow gateway, and a load driver with a rate profile.
//!
//! [`Certs`] runs the real `cloud-hub ca` commands. [`ReplicaProcess`] runs `cloud-hub
//! replica` on a port it picks and reads the address from its first line. [`UdpRelay`]
//! forwards QUIC datagrams with added delay and loss (this kernel has no `tc netem`).
//! [`CpuLimit`] puts a process in a cgroup with a CPU quota, so one machine can hold a gateway
//! slower than its cloud; it needs root and says why when it cannot. [`drive`] publishes
//! windows at a piecewise-constant rate, each stamped with its send time, so latencies are
//! measured from the publish to the result, as a user would see them.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};

use crate::NetworkThread;
use rand::Rng;

use crate::{Publisher, workspace_binary};

/// A fleet CA with one replica (server) certificate and one agent certificate.
pub struct Certs {
    dir: tempfile::TempDir,
}

impl Certs {
    /// Creates the CA and issues `replica` (for `localhost`, `127.0.0.1`) and `agent`.
    pub fn new() -> anyhow::Result<Certs> {
        let dir = tempfile::tempdir()?;
        let hub = workspace_binary("cloud-hub")?;
        let ca = dir.path().to_str().context("temp path is not UTF-8")?;
        for args in [
            vec!["ca", "init", "--dir", ca],
            vec![
                "ca",
                "issue",
                "--dir",
                ca,
                "--server",
                "replica",
                "--host",
                "localhost",
                "--host",
                "127.0.0.1",
            ],
            vec!["ca", "issue", "--dir", ca, "--agent", "agent"],
        ] {
            let out = Command::new(&hub).args(&args).output()?;
            if !out.status.success() {
                bail!(
                    "cloud-hub {args:?} failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        Ok(Certs { dir })
    }

    /// The CA folder.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A file in the CA folder.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The agent's `[offload]` section for `replicas` in `mode`, plus `extra` lines.
    pub fn offload_section(&self, mode: &str, replicas: &[SocketAddr], extra: &str) -> String {
        let replicas: Vec<String> = replicas.iter().map(|r| format!("\"{r}\"")).collect();
        format!(
            "[offload]\nmode = \"{mode}\"\nreplicas = [{}]\nca_cert = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n{extra}\n",
            replicas.join(", "),
            self.path("ca.pem").display(),
            self.path("agent.pem").display(),
            self.path("agent.key").display(),
        )
    }
}

/// A `cloud-hub replica` child process.
pub struct ReplicaProcess {
    child: Option<Child>,
    addr: SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl ReplicaProcess {
    /// Starts a replica serving the zoo model `model` with `workers` threads.
    pub fn start(
        certs: &Certs,
        model: &str,
        workers: usize,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let log = dir.path().join("replica.log");
        let mut child = Command::new(workspace_binary("cloud-hub")?)
            .args(["replica", "--listen", "127.0.0.1:0", "--zoo", model])
            .args(["--workers", &workers.to_string()])
            .arg("--ca")
            .arg(certs.path("ca.pem"))
            .arg("--cert")
            .arg(certs.path("replica.pem"))
            .arg("--key")
            .arg(certs.path("replica.key"))
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting cloud-hub replica")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let addr = line
            .strip_prefix("listening on ")
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|a| a.parse().ok())
            .with_context(|| {
                format!(
                    "replica did not say where it listens (got {line:?}); log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                )
            })?;
        Ok(ReplicaProcess {
            child: Some(child),
            addr,
            log,
            _dir: dir,
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Its process id.
    pub fn pid(&self) -> anyhow::Result<u32> {
        Ok(self.child.as_ref().context("replica stopped")?.id())
    }

    fn signal(&self, sig: &str) -> anyhow::Result<()> {
        let pid = self.pid()?;
        Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()?;
        Ok(())
    }

    /// Kills it at once (SIGKILL).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes it (SIGSTOP): the connection stays, answers stop.
    pub fn stall(&self) -> anyhow::Result<()> {
        self.signal("-STOP")
    }

    /// Thaws it (SIGCONT).
    pub fn resume(&self) -> anyhow::Result<()> {
        self.signal("-CONT")
    }
}

impl Drop for ReplicaProcess {
    fn drop(&mut self) {
        let _ = self.resume();
        self.kill();
    }
}

/// Delay and loss of a [`UdpRelay`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shaping {
    /// Smallest one-way delay.
    pub delay_min: Duration,
    /// Largest one-way delay.
    pub delay_max: Duration,
    /// Share of datagrams dropped, each way.
    pub loss: f64,
}

/// A UDP relay between one client and one upstream, with delay and loss.
///
/// It runs on a thread of its own, so a busy test cannot hold up the "network".
pub struct UdpRelay {
    addr: SocketAddr,
    shaping: Arc<Mutex<Shaping>>,
    _thread: NetworkThread,
}

impl UdpRelay {
    /// Relays to `upstream` with `shaping`.
    pub async fn start(upstream: SocketAddr, shaping: Shaping) -> anyhow::Result<UdpRelay> {
        let shaping = Arc::new(Mutex::new(shaping));
        let s = Arc::clone(&shaping);
        let (thread, addr) =
            NetworkThread::start("udp-relay", move |ready| relay(upstream, s, ready)).await?;
        Ok(UdpRelay {
            addr,
            shaping,
            _thread: thread,
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Changes delay and loss from now on.
    pub fn set(&self, shaping: Shaping) {
        if let Ok(mut s) = self.shaping.lock() {
            *s = shaping;
        }
    }
}

async fn relay(
    upstream: SocketAddr,
    shaping: Arc<Mutex<Shaping>>,
    ready: tokio::sync::oneshot::Sender<anyhow::Result<SocketAddr>>,
) {
    let bound = async {
        let front = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
        let back = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
        back.connect(upstream).await?;
        let addr = front.local_addr()?;
        anyhow::Ok((front, back, addr))
    };
    let (front, back) = match bound.await {
        Ok((front, back, addr)) => {
            let _ = ready.send(Ok(addr));
            (Arc::new(front), Arc::new(back))
        }
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let client: Arc<Mutex<Option<SocketAddr>>> = Arc::new(Mutex::new(None));
    // Each direction is a FIFO link: one queue, one sender, so jitter varies the delay but
    // never reorders (reordering would read as loss to QUIC).
    let (up_tx, up_rx) = tokio::sync::mpsc::channel(LINK_QUEUE);
    let (down_tx, down_rx) = tokio::sync::mpsc::channel(LINK_QUEUE);
    let up = Arc::clone(&back);
    let _up_link = link(up_rx, move |d| {
        let up = Arc::clone(&up);
        async move {
            let _ = up.send(&d).await;
        }
    });
    let down = Arc::clone(&front);
    let to_client = Arc::clone(&client);
    let _down_link = link(down_rx, move |d| {
        let down = Arc::clone(&down);
        let to = to_client.lock().ok().and_then(|c| *c);
        async move {
            if let Some(to) = to {
                let _ = down.send_to(&d, to).await;
            }
        }
    });
    let mut a = vec![0u8; 65536];
    let mut b = vec![0u8; 65536];
    let mut up_free = tokio::time::Instant::now();
    let mut down_free = tokio::time::Instant::now();
    loop {
        tokio::select! {
            Ok((n, from)) = front.recv_from(&mut a) => {
                if let Ok(mut c) = client.lock() {
                    *c = Some(from);
                }
                if let Some(at) = schedule(&shaping, &mut up_free) {
                    let _ = up_tx.try_send((at, a[..n].to_vec()));
                }
            }
            Ok(n) = back.recv(&mut b) => {
                if let Some(at) = schedule(&shaping, &mut down_free) {
                    let _ = down_tx.try_send((at, b[..n].to_vec()));
                }
            }
        }
    }
}

/// Datagrams a relay link holds before it drops (a full router queue).
const LINK_QUEUE: usize = 100_000;

/// When a datagram arriving now leaves the link, or `None` when it is lost.
fn schedule(
    shaping: &Mutex<Shaping>,
    link_free: &mut tokio::time::Instant,
) -> Option<tokio::time::Instant> {
    let s = shaping.lock().map(|s| *s).ok()?;
    let mut rng = rand::rng();
    if rng.random::<f64>() < s.loss {
        return None;
    }
    let span = s.delay_max.saturating_sub(s.delay_min);
    let delay = s.delay_min + span.mul_f64(rng.random::<f64>());
    let at = (tokio::time::Instant::now() + delay).max(*link_free);
    *link_free = at;
    Some(at)
}

/// Sends each queued datagram at its time, in order.
fn link<F, Fut>(
    mut queue: tokio::sync::mpsc::Receiver<(tokio::time::Instant, Vec<u8>)>,
    send: F,
) -> tokio::task::JoinHandle<()>
where
    F: Fn(Vec<u8>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    tokio::spawn(async move {
        while let Some((at, datagram)) = queue.recv().await {
            tokio::time::sleep_until(at).await;
            send(datagram).await;
        }
    })
}

/// A cgroup with a CPU quota: the threads in it share `share` of one core.
///
/// It limits threads, not whole processes (cgroup v1 `tasks`), so a test can make an agent's
/// inference threads as slow as a gateway's while its MQTT and QUIC I/O runs at full speed.
pub struct CpuLimit {
    dir: PathBuf,
}

impl CpuLimit {
    /// Creates the cgroup, or says why it cannot (not root, no cpu controller).
    pub fn new(name: &str, share: f64) -> Result<CpuLimit, String> {
        let period: u64 = 10_000;
        let quota = ((share * period as f64) as u64).max(1000);
        let v1 = Path::new("/sys/fs/cgroup/cpu");
        let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers");
        let write = |p: PathBuf, v: String| {
            std::fs::write(&p, v).map_err(|e| format!("cannot write {}: {e}", p.display()))
        };
        if !v1.join("cpu.cfs_quota_us").exists() {
            return Err(if v2.exists() {
                "limiting single threads needs the cgroup v1 cpu controller; this machine has cgroup v2 only".into()
            } else {
                "no cgroup cpu controller at /sys/fs/cgroup/cpu".into()
            });
        }
        let dir = v1.join(name);
        if let Err(e) = std::fs::create_dir(&dir)
            && e.kind() != std::io::ErrorKind::AlreadyExists
        {
            return Err(format!("cannot create {} (needs root): {e}", dir.display()));
        }
        write(dir.join("cpu.cfs_period_us"), period.to_string())?;
        write(dir.join("cpu.cfs_quota_us"), quota.to_string())?;
        Ok(CpuLimit { dir })
    }

    /// Moves every thread of `pid` whose name starts with `prefix` into the cgroup; returns
    /// how many it moved.
    pub fn add_threads(&self, pid: u32, prefix: &str) -> anyhow::Result<usize> {
        let mut moved = 0;
        for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
            let task = task?;
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            if comm.trim_end().starts_with(prefix) {
                let tid = task.file_name().to_string_lossy().into_owned();
                std::fs::write(self.dir.join("tasks"), &tid)
                    .with_context(|| format!("moving thread {tid} into {}", self.dir.display()))?;
                moved += 1;
            }
        }
        Ok(moved)
    }
}

impl Drop for CpuLimit {
    fn drop(&mut self) {
        // The cgroup can go once its processes have exited.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// One window sent by [`drive`].
#[derive(Debug, Clone, PartialEq)]
pub struct Sent {
    /// The sensor.
    pub sensor: String,
    /// Its send time (Unix seconds), also its `ts`.
    pub ts: f64,
    /// Which reference window it carried.
    pub probe: usize,
}

/// Publishes one window per message to `sensors` sensors of `gateway` (site `test`), at
/// `profile` rates (windows per second, for a duration), cycling through `windows`.
pub async fn drive(
    publisher: &Publisher,
    gateway: &str,
    sensors: usize,
    windows: &[Vec<f32>],
    profile: &[(f64, Duration)],
) -> anyhow::Result<Vec<Sent>> {
    let mut sent = Vec::new();
    let mut last_ts = vec![0.0f64; sensors];
    for &(rate, length) in profile {
        let start = Instant::now();
        let mut done = 0u64;
        while start.elapsed() < length {
            let due = (start.elapsed().as_secs_f64() * rate) as u64;
            while done < due {
                let i = sent.len();
                let sensor = format!("s{}", i % sensors);
                // Time stamps on a 100 µs grid survive a trip through JSON exactly.
                let ts = ticks(unix_now()).max(ticks(last_ts[i % sensors]) + 1) as f64 / TS_GRID;
                last_ts[i % sensors] = ts;
                let probe = i % windows.len();
                let payload = protocol::payload::encode_plain_cbor(&windows[probe], ts);
                publisher
                    .publish(&format!("spillway/test/{gateway}/{sensor}/data"), payload)
                    .await?;
                sent.push(Sent { sensor, ts, probe });
                done += 1;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    Ok(sent)
}

/// Steps of the time-stamp grid per second.
const TS_GRID: f64 = 1e4;

/// A time stamp in steps of the grid (unique per sensor, so it identifies a window).
fn ticks(ts: f64) -> u64 {
    (ts * TS_GRID).round() as u64
}

/// Now, Unix seconds.
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// A cloud for offload tests: a broker, a fleet CA, replicas, and a slow-gateway CPU limit.
pub struct Rig {
    /// The MQTT broker.
    pub broker: crate::Broker,
    /// The fleet CA and certificates.
    pub certs: Certs,
    /// Replica processes serving `bearing-cnn`.
    pub replicas: Vec<ReplicaProcess>,
    limit: CpuLimit,
    /// The share of one core the agent's inference threads get.
    pub cpu_share: f64,
}

/// The model offload tests run: the heavier sample model.
pub const MODEL: &str = "bearing-cnn";

impl Rig {
    /// Starts everything; `Ok(Err(reason))` when the machine cannot limit CPU (not root).
    pub fn start(
        mosquitto: &Path,
        name: &str,
        replicas: usize,
        cpu_share: f64,
    ) -> anyhow::Result<Result<Rig, String>> {
        let limit = match CpuLimit::new(&format!("spillway-{name}"), cpu_share) {
            Ok(limit) => limit,
            Err(reason) => return Ok(Err(reason)),
        };
        let broker = crate::Broker::shared_or_start(mosquitto)?;
        let certs = Certs::new()?;
        let replicas = (0..replicas)
            .map(|_| ReplicaProcess::start(&certs, MODEL, 1, &[]))
            .collect::<anyhow::Result<_>>()?;
        Ok(Ok(Rig {
            broker,
            certs,
            replicas,
            limit,
            cpu_share,
        }))
    }

    /// The replicas' addresses.
    pub fn replica_addrs(&self) -> Vec<SocketAddr> {
        self.replicas.iter().map(ReplicaProcess::addr).collect()
    }

    /// Starts an agent (one inference thread, limited to the rig's CPU share) for
    /// `gateway` with the `[offload]` section `offload`.
    pub async fn gateway(&self, gateway: &str, offload: &str) -> anyhow::Result<Gateway> {
        let config = format!(
            r#"
[agent]
site = "test"
gateway = "{gateway}"
workers = 1
queue_capacity = 4096
status_interval_secs = 1
drain_timeout_ms = 15000

[mqtt]
port = {port}

[[models]]
name = "{MODEL}"
zoo = "{MODEL}"

[sensors]
default_model = "{MODEL}"

{offload}
"#,
            port = self.broker.port()
        );
        Gateway::start(self.broker.port(), Some(&self.limit), gateway, &config, &[]).await
    }
}

/// One running agent with its MQTT clients.
pub struct Gateway {
    /// Gateway name.
    pub name: String,
    /// The agent process.
    pub agent: crate::Agent,
    /// Collects its results and status.
    pub listener: crate::Listener,
    /// Publishes its sensor data.
    pub publisher: Publisher,
    /// The model's probe windows and onnxruntime's scores for them.
    pub reference: crate::Reference,
}

/// What became of the windows sent.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Windows sent.
    pub sent: usize,
    /// Windows with no result.
    pub missing: usize,
    /// Windows answered more than once.
    pub duplicates: usize,
    /// Results whose score differs from onnxruntime's by more than 1e-4.
    pub wrong: usize,
    /// Results computed by a replica.
    pub remote: usize,
    /// Publish-to-result latency of every answered window, seconds, sorted.
    pub latencies: Vec<f64>,
}

impl Report {
    /// The `q` quantile of the latencies (0 when there are none).
    pub fn quantile(&self, q: f64) -> f64 {
        if self.latencies.is_empty() {
            return 0.0;
        }
        let i = ((self.latencies.len() - 1) as f64 * q).round() as usize;
        self.latencies[i]
    }

    /// Share of sent windows answered later than `slo` (or not at all).
    pub fn over(&self, slo: Duration) -> f64 {
        let late = self
            .latencies
            .iter()
            .filter(|&&l| l > slo.as_secs_f64())
            .count();
        (late + self.missing) as f64 / self.sent.max(1) as f64
    }
}

impl Gateway {
    /// Starts an agent for `gateway` with `config` (site `test`, model [`MODEL`]), its
    /// inference threads under `limit` when given, and the MQTT clients that feed and watch it.
    pub async fn start(
        broker_port: u16,
        limit: Option<&CpuLimit>,
        gateway: &str,
        config: &str,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Gateway> {
        let listener = crate::Listener::start(broker_port, "test", gateway).await?;
        let agent = crate::Agent::start(config, env)?;
        let pid = agent.pid().context("agent did not start")?;
        let start = Instant::now();
        while let Some(limit) = limit {
            if limit.add_threads(pid, "infer-")? > 0 {
                break;
            }
            if start.elapsed() > Duration::from_secs(20) {
                bail!(
                    "the agent started no inference thread; log:\n{}",
                    agent.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if !listener
            .wait_until(Duration::from_secs(20), |c| c.status.is_some())
            .await
        {
            bail!("the agent published no status; log:\n{}", agent.log());
        }
        let publisher = Publisher::connect(broker_port).await?;
        Ok(Gateway {
            name: gateway.to_owned(),
            agent,
            listener,
            publisher,
            reference: crate::reference(MODEL)?,
        })
    }

    /// Feeds steady load and reads the agent's own capacity estimate (windows per second).
    pub async fn calibrate(&self, rate: f64, length: Duration) -> anyhow::Result<(f64, Vec<Sent>)> {
        let sent = self.drive(&[(rate, length)]).await?;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let capacity = self
            .listener
            .with(|c| {
                c.status
                    .as_ref()
                    .and_then(|s| s.offload.as_ref())
                    .map(|o| o.capacity)
            })
            .context("the status carries no offload section")?;
        Ok((capacity, sent))
    }

    /// Publishes at the `profile` rates (8 sensors, the model's probe windows).
    pub async fn drive(&self, profile: &[(f64, Duration)]) -> anyhow::Result<Vec<Sent>> {
        drive(
            &self.publisher,
            &self.name,
            8,
            &self.reference.windows,
            profile,
        )
        .await
    }

    /// Waits (up to `limit`) until every window in `sent` is answered, then checks them.
    pub async fn collect(&self, sent: &[Sent], limit: Duration) -> Report {
        use std::collections::HashMap;
        let keys: HashMap<(String, u64), usize> = sent
            .iter()
            .map(|s| ((s.sensor.clone(), ticks(s.ts)), s.probe))
            .collect();
        let answered = |c: &crate::Collected| {
            c.results
                .iter()
                .filter(|r| keys.contains_key(&(r.sensor.clone(), ticks(r.ts))))
                .count()
        };
        // Done when every window is answered or counted as shed by the agent.
        let shed = |c: &crate::Collected| {
            c.status
                .as_ref()
                .and_then(|s| s.counters.get("windows_shed").copied())
                .unwrap_or(0) as usize
        };
        self.listener
            .wait_until(limit, |c| answered(c) + shed(c) >= keys.len())
            .await;
        // Give duplicates, if any, a moment to show up.
        tokio::time::sleep(Duration::from_millis(300)).await;
        self.listener.with(|c| {
            let mut report = Report {
                sent: keys.len(),
                ..Report::default()
            };
            let mut seen: HashMap<(String, u64), usize> = HashMap::new();
            for (r, received) in c.results.iter().zip(&c.received) {
                let key = (r.sensor.clone(), ticks(r.ts));
                let Some(&probe) = keys.get(&key) else {
                    continue;
                };
                let n = seen.entry(key).or_default();
                *n += 1;
                if *n > 1 {
                    report.duplicates += 1;
                    continue;
                }
                if (r.score - self.reference.scores[probe]).abs() > 1e-4 {
                    report.wrong += 1;
                }
                if r.route == protocol::edge::Route::Remote {
                    report.remote += 1;
                }
                report.latencies.push(received - r.ts);
            }
            report.missing = keys.len() - seen.len();
            report.latencies.sort_by(f64::total_cmp);
            report
        })
    }

    /// The latest counters the agent published.
    pub fn counters(&self) -> std::collections::BTreeMap<String, u64> {
        self.listener
            .with(|c| c.status.as_ref().map(|s| s.counters.clone()))
            .unwrap_or_default()
    }
}
