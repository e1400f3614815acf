//! The factory demo: one command, nothing to install.
//!
//! Starts an embedded MQTT broker (rumqttd) on a free loopback port, a hub (with its
//! dashboard, and replicas started on demand — this binary is its own replica executable),
//! one edge agent per production line, enrolled with the hub, and simulated machines: presses
//! that publish 128-sample vibration windows in real time (12.8 kHz) and now and then develop
//! a bearing fault, and one gearbox test rig per line whose rate jumps now and then (a burst,
//! one line at a time) past what the line's one inference thread can serve — the agent's
//! forecast asks the hub for replicas and spills to them. A listener on the results prints a
//! live summary every second and a final one on Ctrl-C or after `--duration`.

#![allow(clippy::disallowed_methods)] // a demo driver

mod machine;

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use protocol::edge::{InferenceResult, Status};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio_util::sync::CancellationToken;

/// Spillway factory demo: embedded broker, hub with dashboard, edge agents, simulated machines.
#[derive(Debug, Parser)]
#[command(args_conflicts_with_subcommands = true)]
struct Args {
    #[command(subcommand)]
    command: Option<Sub>,
    /// Stop after this many seconds (default: run until Ctrl-C).
    #[arg(long)]
    duration: Option<u64>,
    /// Simulated machines, one vibration sensor each.
    #[arg(long, default_value_t = 6)]
    machines: usize,
    /// Windows per second per machine (100 is real time at 12.8 kHz).
    #[arg(long, default_value_t = 100)]
    rate: u32,
    /// Average seconds between faults on one machine.
    #[arg(long, default_value_t = 20.0)]
    fault_every_secs: f64,
    /// Seed for the machines' signals and faults.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Production lines, one edge agent (one inference thread) each.
    #[arg(long, default_value_t = 3)]
    lines: usize,
    /// Where the hub's dashboard listens (another free port if taken).
    #[arg(long, default_value = "127.0.0.1:8080")]
    http: SocketAddr,
    /// Seconds between gearbox bursts (each on the next line).
    #[arg(long, default_value_t = 30.0)]
    burst_every_secs: f64,
    /// How long a burst lasts.
    #[arg(long, default_value_t = 12.0)]
    burst_secs: f64,
    /// Gearbox windows per second during a burst (100 otherwise); 0: a little more than one
    /// inference thread of this machine serves of the gearbox model, measured at start.
    #[arg(long, default_value_t = 0)]
    burst_rate: u32,
}

#[derive(Debug, Subcommand)]
enum Sub {
    /// Serve a model as a replica (how the demo's hub starts its replicas).
    #[command(hide = true)]
    Replica(cloud_hub::cli::ReplicaArgs),
}

/// Counts shared between the machines and the listener.
#[derive(Default)]
struct Tally {
    sent: AtomicU64,
    fault_windows: AtomicU64,
    results: AtomicU64,
    anomalies: AtomicU64,
    anomalies_on_faults: AtomicU64,
    latencies_us: Mutex<Vec<u64>>,
    /// Results computed by a replica.
    remote: AtomicU64,
    /// The latest status of each line.
    status: Mutex<std::collections::BTreeMap<String, Status>>,
    /// Faulty windows sent and not yet answered, to score what the agent flagged.
    faulty: Mutex<HashSet<(String, u64)>>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Replicas the hub starts share the demo's terminal: they too log warnings only.
    tracing_subscriber_init();
    if let Some(Sub::Replica(replica)) = args.command {
        return cloud_hub::cli::replica(replica);
    }
    let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port();
    start_embedded_broker(port)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(demo(args, port))
}

fn tracing_subscriber_init() {
    // The demo's own output is the summary; the agent logs warnings only.
    let _ = tracing::subscriber::set_global_default(
        tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,rumqttd=off")),
            )
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .finish(),
    );
}

fn start_embedded_broker(port: u16) -> anyhow::Result<()> {
    let server = rumqttd::ServerSettings {
        name: "factory".into(),
        listen: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        tls: None,
        next_connection_delay_ms: 1,
        connections: rumqttd::ConnectionSettings {
            connection_timeout_ms: 10_000,
            max_payload_size: 256 * 1024,
            max_inflight_count: 500,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let config = rumqttd::Config {
        router: rumqttd::RouterConfig {
            max_connections: 64,
            max_outgoing_packet_count: 500,
            max_segment_size: 1024 * 1024,
            max_segment_count: 4,
            ..Default::default()
        },
        v4: Some([("factory".to_owned(), server)].into_iter().collect()),
        ..Default::default()
    };
    let mut broker = rumqttd::Broker::new(config);
    std::thread::Builder::new()
        .name("broker".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                eprintln!("embedded broker stopped: {e}");
            }
        })?;
    let start = Instant::now();
    while std::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err() {
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(5),
            "the embedded broker did not start"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

fn agent_config(
    line: usize,
    port: u16,
    hub: SocketAddr,
    state: &std::path::Path,
    token: &str,
) -> String {
    format!(
        r#"
[agent]
site = "factory"
gateway = "line{line}"
workers = 1
queue_capacity = 2048
status_interval_secs = 1

[mqtt]
port = {port}

[[models]]
name = "vibration-ae"
zoo = "vibration-ae"

[[models]]
name = "bearing-cnn"
zoo = "bearing-cnn"
stride = 128

[sensors]
default_model = "vibration-ae"
assign = {{ gearbox = "bearing-cnn" }}

[offload]
mode = "predictive"

[hub]
endpoint = "{hub}"
state_dir = "{state}"
token = "{token}"
"#,
        state = state.join(format!("line{line}")).display()
    )
}

/// Starts the hub in this process: state in `dir`, `bearing-cnn` replicas from zero.
async fn start_hub(
    dir: &std::path::Path,
    http: SocketAddr,
    shutdown: CancellationToken,
) -> anyhow::Result<(
    cloud_hub::hub::Bound,
    tokio::task::JoinHandle<anyhow::Result<()>>,
)> {
    use cloud_hub::autoscale::ScalerSettings;
    use cloud_hub::replica::ModelSource;
    use cloud_hub::replicas::ModelSpec;
    let state = cloud_hub::state::HubDir::new(dir);
    state.init(&[], std::time::SystemTime::now())?;
    // The dashboard port may be taken: then any free one.
    let http = if std::net::TcpListener::bind(http).is_ok() {
        http
    } else {
        SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
    };
    let settings = cloud_hub::hub::HubSettings {
        dir: state,
        listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        http,
        heartbeat_ms: 500,
        offline_after_ms: 3000,
        max_sessions: 64,
        models: vec![ModelSpec {
            name: "bearing-cnn".into(),
            source: ModelSource::Zoo("bearing-cnn".into()),
            version: 1,
            input_shape: None,
            scaler: ScalerSettings {
                min: 0,
                max: 3,
                stable_secs: 20.0,
                idle_secs: 10.0,
                default_capacity: 2000.0,
                ..ScalerSettings::default()
            },
        }],
        replica_workers: 1,
        tick: Duration::from_millis(500),
        exe: std::env::current_exe()?,
        download_rate: 0,
        max_downloads: 16,
    };
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(cloud_hub::hub::run(settings, ready_tx, shutdown));
    let bound = ready_rx.await.context("the hub did not start")?;
    Ok((bound, task))
}

async fn demo(args: Args, port: u16) -> anyhow::Result<()> {
    let lines = args.lines.max(1);
    // A burst the line's one inference thread cannot keep up with, on any machine.
    let burst_rate = match args.burst_rate {
        0 => (BURST_OVER_CAPACITY / gearbox_window_secs()?).round() as u32,
        rate => rate,
    };
    let state = tempfile::tempdir()?;
    let hub_stop = CancellationToken::new();
    let (hub, hub_task) = start_hub(&state.path().join("hub"), args.http, hub_stop.clone()).await?;
    let registry = cloud_hub::registry::Registry::open(&state.path().join("hub/fleet.db"))?;
    let pin = cloud_hub::ca::fingerprint(&state.path().join("hub"))?;
    let shutdown = CancellationToken::new();
    let mut agents = Vec::new();
    for line in 1..=lines {
        let now = cloud_hub::replicas::unix_ms();
        let secret = registry.issue_token(&format!("line{line}"), now, now + 600_000)?;
        let toml = agent_config(
            line,
            port,
            hub.control,
            state.path(),
            &format!("{secret}.{pin}"),
        );
        let config = edge_agent::AgentConfig::from_toml_str(&toml, std::iter::empty())?;
        agents.push(tokio::spawn(edge_agent::run(config, shutdown.clone())));
    }
    let tally = Arc::new(Tally::default());
    let listen = listen(port, Arc::clone(&tally)).await?;

    println!(
        "Spillway factory demo: broker on 127.0.0.1:{port}, {lines} lines (one edge agent each), {} presses at {} windows/s each, a gearbox rig per line bursting to {}/s every {:.0} s",
        args.machines, args.rate, burst_rate, args.burst_every_secs
    );
    println!("dashboard: http://{}/", hub.http);
    println!("results on spillway/factory/+/+/inference; Ctrl-C to stop\n");
    // The machines start once every agent's status says it holds its subscription: windows
    // published before that would reach no one.
    let waited = Instant::now();
    while subscribed(&tally) < lines {
        if waited.elapsed() > Duration::from_secs(10) {
            println!("-- not every agent is subscribed after 10 s; starting the machines anyway");
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let machines_stop = CancellationToken::new();
    let mut machines = Vec::new();
    for m in 0..args.machines {
        let spec = machine::Spec {
            name: format!("press-{:02}", m + 1),
            rate: args.rate,
            fault_every_secs: args.fault_every_secs,
            seed: args.seed.wrapping_mul(1_000_003).wrapping_add(m as u64),
        };
        let line = format!("line{}", m % lines + 1);
        machines.push(tokio::spawn(run_machine(
            spec,
            line,
            port,
            Arc::new(AtomicU64::new(u64::from(args.rate))),
            Some(Arc::clone(&tally)),
            machines_stop.clone(),
        )));
    }
    let mut rigs = Vec::new();
    for line in 1..=lines {
        let rate = Arc::new(AtomicU64::new(100));
        let spec = machine::Spec {
            name: "gearbox".into(),
            rate: 100,
            fault_every_secs: 1e9,
            seed: args.seed.wrapping_add(77 * line as u64),
        };
        machines.push(tokio::spawn(run_machine(
            spec,
            format!("line{line}"),
            port,
            Arc::clone(&rate),
            None,
            machines_stop.clone(),
        )));
        rigs.push(rate);
    }

    let started = Instant::now();
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    ticks.tick().await;
    let mut last = (0u64, 0u64, 0u64);
    let mut bursting: Option<usize> = None;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            _ = &mut ctrl_c => break,
            _ = ticks.tick() => {}
        }
        // Bursts: one line at a time, in turn.
        let t = started.elapsed().as_secs_f64();
        let period = args.burst_every_secs.max(args.burst_secs + 1.0);
        let phase = t % period;
        let due = (t >= period && phase < args.burst_secs).then(|| (t / period) as usize % lines);
        if due != bursting {
            if let Some(line) = bursting {
                rigs[line].store(100, Ordering::Relaxed);
                println!("-- burst on line{} over", line + 1);
            }
            if let Some(line) = due {
                rigs[line].store(u64::from(burst_rate), Ordering::Relaxed);
                println!(
                    "-- burst on line{}: gearbox rig at {}/s",
                    line + 1,
                    burst_rate
                );
            }
            bursting = due;
        }
        let sent = tally.sent.load(Ordering::Relaxed);
        let results = tally.results.load(Ordering::Relaxed);
        let remote = tally.remote.load(Ordering::Relaxed);
        let (p50, p99) = percentiles(
            &mut tally
                .latencies_us
                .lock()
                .map(|mut l| std::mem::take(&mut *l))
                .unwrap_or_default(),
        );
        let (shed, queue, cpu, rss) = tally
            .status
            .lock()
            .map(|all| {
                all.values().fold((0, 0, 0.0f32, 0), |(sh, q, c, r), s| {
                    (
                        sh + s.counters.get("windows_shed").copied().unwrap_or(0),
                        q + s.queue_depth,
                        c.max(s.cpu_percent),
                        r.max(s.rss_bytes),
                    )
                })
            })
            .unwrap_or_default();
        let replicas = replicas_ready(hub.http).await;
        println!(
            "t={:>4}s  in {:>5}/s  out {:>5}/s  remote {:>5}/s  replicas {replicas}  p50 {:>7.3} ms  p99 {:>7.3} ms  anomalies {:>5} (fault windows {:>5})  shed {shed}  queue {queue}  cpu {cpu:>3.0}%  rss {:.1} MB",
            started.elapsed().as_secs(),
            sent - last.0,
            results - last.1,
            remote - last.2,
            p50 as f64 / 1000.0,
            p99 as f64 / 1000.0,
            tally.anomalies.load(Ordering::Relaxed),
            tally.fault_windows.load(Ordering::Relaxed),
            rss as f64 / 1e6,
        );
        last = (sent, results, remote);
        if args
            .duration
            .is_some_and(|d| started.elapsed() >= Duration::from_secs(d))
        {
            break;
        }
    }

    machines_stop.cancel();
    for m in machines {
        let _ = m.await;
    }
    shutdown.cancel();
    let mut summaries = Vec::new();
    for agent in agents {
        summaries.push(agent.await.context("agent task")??);
    }
    hub_stop.cancel();
    hub_task.await.context("hub task")??;
    // Let the last results reach the listener.
    tokio::time::sleep(Duration::from_millis(300)).await;
    listen.abort();
    let sent = tally.sent.load(Ordering::Relaxed);
    let results = tally.results.load(Ordering::Relaxed);
    let faults = tally.fault_windows.load(Ordering::Relaxed);
    let caught = tally.anomalies_on_faults.load(Ordering::Relaxed);
    let anomalies = tally.anomalies.load(Ordering::Relaxed);
    println!(
        "\nstopped after {:.1} s: {sent} windows sent, {results} results received",
        started.elapsed().as_secs_f64()
    );
    println!(
        "faults: {faults} faulty windows, {caught} flagged ({:.1}%); {} false alarms on healthy windows",
        100.0 * caught as f64 / faults.max(1) as f64,
        anomalies - caught
    );
    for (i, summary) in summaries.iter().enumerate() {
        let c = &summary.counters;
        println!(
            "line{}: {} results, {} local, {} remote; {} shed, {} bad payloads, drained cleanly: {}",
            i + 1,
            c["inferences_ok"],
            c["inferences_ok"].saturating_sub(c["remote_results"]),
            c["remote_results"],
            c["windows_shed"],
            c.iter()
                .filter(|(k, _)| k.starts_with("bad_"))
                .map(|(_, v)| v)
                .sum::<u64>(),
            summary.drained
        );
    }
    Ok(())
}

/// A default burst brings this many times what one inference thread serves: enough that the
/// line must spill, not so much that a two-core machine, which also runs the replicas, cannot
/// carry it.
const BURST_OVER_CAPACITY: f64 = 1.05;

/// What one gearbox window costs one thread of this machine, in seconds: the mean of a run of
/// calls, which like a burst pays for every hiccup of a shared machine.
fn gearbox_window_secs() -> anyhow::Result<f64> {
    const CALLS: u32 = 300;
    let zoo = models::zoo::BEARING_CNN;
    let runner = models::LoadedModel::from_bytes(zoo.bytes())?.optimize(Some(zoo.input_shape))?;
    let window = vec![0.0; runner.input_len()];
    runner.run(&window)?;
    let started = Instant::now();
    for _ in 0..CALLS {
        runner.run(&window)?;
    }
    Ok(started.elapsed().as_secs_f64() / f64::from(CALLS))
}

/// Agents whose last status says the broker granted their subscription.
fn subscribed(tally: &Tally) -> usize {
    tally.status.lock().map_or(0, |all| {
        all.values()
            .filter(|s| s.counters.get("mqtt_subscriptions").is_some_and(|&n| n > 0))
            .count()
    })
}

fn percentiles(values: &mut [u64]) -> (u64, u64) {
    if values.is_empty() {
        return (0, 0);
    }
    values.sort_unstable();
    let at = |q: f64| values[((values.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.99))
}

/// Ready replicas, as the hub's API says.
async fn replicas_ready(http: SocketAddr) -> u64 {
    tokio::task::spawn_blocking(move || {
        let body = ureq::get(&format!("http://{http}/api/v1/models"))
            .call()
            .ok()?
            .body_mut()
            .read_to_string()
            .ok()?;
        let models: serde_json::Value = serde_json::from_str(&body).ok()?;
        Some(
            models
                .as_array()?
                .iter()
                .filter_map(|m| m["ready"].as_u64())
                .sum(),
        )
    })
    .await
    .ok()
    .flatten()
    .unwrap_or(0)
}

/// Publishes `spec`'s windows on `line` at `rate` windows per second (read each 10 ms, so a
/// burst takes effect at once). With a tally, faults are counted for scoring.
async fn run_machine(
    spec: machine::Spec,
    line: String,
    port: u16,
    rate: Arc<AtomicU64>,
    tally: Option<Arc<Tally>>,
    stop: CancellationToken,
) {
    let mut options = MqttOptions::new(format!("machine-{line}-{}", spec.name), "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(10));
    let (client, mut eventloop) = AsyncClient::new(options, 256);
    let driver = tokio::spawn(async move {
        loop {
            if eventloop.poll().await.is_err() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    });
    let topic = format!("spillway/factory/{line}/{}/data", spec.name);
    let mut machine = machine::Machine::new(&spec);
    let mut ticks = tokio::time::interval(Duration::from_millis(10));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut i = 0u64;
    let mut due = 0.0f64;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = ticks.tick() => {}
        }
        due += rate.load(Ordering::Relaxed) as f64 / 100.0;
        while due >= 1.0 {
            due -= 1.0;
            let window = machine.next_window();
            let ts = 2_000_000_000.0 + i as f64;
            i += 1;
            if let Some(tally) = &tally
                && window.faulty
            {
                tally.fault_windows.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut f) = tally.faulty.lock() {
                    f.insert((spec.name.clone(), ts as u64));
                }
            }
            let payload = protocol::payload::encode_senml_cbor(
                &window.samples,
                ts,
                1.0 / machine::SAMPLE_RATE,
            );
            if client
                .publish(topic.as_str(), QoS::AtLeastOnce, false, payload)
                .await
                .is_err()
            {
                break;
            }
            if let Some(tally) = &tally {
                tally.sent.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    // Let the client flush what is queued before its connection goes.
    tokio::time::sleep(Duration::from_millis(200)).await;
    driver.abort();
}

async fn listen(port: u16, tally: Arc<Tally>) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let mut options = MqttOptions::new("factory-watch", "127.0.0.1", port);
    options
        .set_keep_alive(Duration::from_secs(10))
        .set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = AsyncClient::new(options, 64);
    client
        .subscribe("spillway/factory/+/+/inference", QoS::AtLeastOnce)
        .await?;
    client
        .subscribe("spillway/factory/+/status", QoS::AtLeastOnce)
        .await?;
    Ok(tokio::spawn(async move {
        let _client = client;
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) if p.topic.ends_with("/status") => {
                    if let (Ok(status), Ok(mut all)) = (
                        serde_json::from_slice::<Status>(&p.payload),
                        tally.status.lock(),
                    ) {
                        all.insert(p.topic.to_string(), status);
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let Ok(result) = serde_json::from_slice::<InferenceResult>(&p.payload) else {
                        continue;
                    };
                    if result.route == protocol::edge::Route::Remote {
                        tally.remote.fetch_add(1, Ordering::Relaxed);
                    }
                    if result.sensor == "gearbox" {
                        // The rigs load the lines; presses are what the fault score is about.
                        continue;
                    }
                    tally.results.fetch_add(1, Ordering::Relaxed);
                    if let Ok(mut l) = tally.latencies_us.lock() {
                        l.push(result.latency_us);
                    }
                    let key = (result.sensor.clone(), result.ts as u64);
                    let was_faulty = tally.faulty.lock().is_ok_and(|mut f| f.remove(&key));
                    if result.anomaly {
                        tally.anomalies.fetch_add(1, Ordering::Relaxed);
                        if was_faulty {
                            tally.anomalies_on_faults.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }))
}
