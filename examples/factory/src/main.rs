//! The factory demo: one command, nothing to install.
//!
//! Starts an embedded MQTT broker (rumqttd) on a free loopback port, an edge agent serving the
//! zoo's vibration autoencoder, and a set of simulated machines that publish 128-sample
//! vibration windows in real time (12.8 kHz), each now and then developing a bearing fault for
//! a few seconds. A listener on the results prints a live summary every second and a final
//! one on Ctrl-C or after `--duration`.

#![allow(clippy::disallowed_methods)] // a demo driver

mod machine;

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use protocol::edge::{InferenceResult, Status};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio_util::sync::CancellationToken;

/// Spillway factory demo: embedded broker, simulated machines, one edge agent.
#[derive(Debug, Parser)]
struct Args {
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
    status: Mutex<Option<Status>>,
    /// Faulty windows sent and not yet answered, to score what the agent flagged.
    faulty: Mutex<HashSet<(String, u64)>>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber_init();
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

const AGENT_CONFIG: &str = r#"
[agent]
site = "factory"
gateway = "line1"
status_interval_secs = 1

[[models]]
name = "vibration-ae"
zoo = "vibration-ae"

[sensors]
default_model = "vibration-ae"
"#;

async fn demo(args: Args, port: u16) -> anyhow::Result<()> {
    let mut config = edge_agent::AgentConfig::from_toml_str(AGENT_CONFIG, std::iter::empty())?;
    config.mqtt.port = port;
    let shutdown = CancellationToken::new();
    let agent = tokio::spawn(edge_agent::run(config, shutdown.clone()));
    let tally = Arc::new(Tally::default());
    let listen = listen(port, Arc::clone(&tally)).await?;

    println!(
        "Spillway factory demo: broker on 127.0.0.1:{port}, {} machines at {} windows/s each",
        args.machines, args.rate
    );
    println!("results on spillway/factory/line1/+/inference; Ctrl-C to stop\n");
    let machines_stop = CancellationToken::new();
    let mut machines = Vec::new();
    for m in 0..args.machines {
        let spec = machine::Spec {
            name: format!("press-{:02}", m + 1),
            rate: args.rate,
            fault_every_secs: args.fault_every_secs,
            seed: args.seed.wrapping_mul(1_000_003).wrapping_add(m as u64),
        };
        machines.push(tokio::spawn(run_machine(
            spec,
            port,
            Arc::clone(&tally),
            machines_stop.clone(),
        )));
    }

    let started = Instant::now();
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    ticks.tick().await;
    let mut last = (0u64, 0u64);
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            _ = &mut ctrl_c => break,
            _ = ticks.tick() => {}
        }
        let sent = tally.sent.load(Ordering::Relaxed);
        let results = tally.results.load(Ordering::Relaxed);
        let (p50, p99) = percentiles(
            &mut tally
                .latencies_us
                .lock()
                .map(|mut l| std::mem::take(&mut *l))
                .unwrap_or_default(),
        );
        let status = tally.status.lock().ok().and_then(|s| s.clone());
        let (shed, queue, cpu, rss) = status.map_or((0, 0, 0.0, 0), |s| {
            (
                s.counters.get("windows_shed").copied().unwrap_or(0),
                s.queue_depth,
                s.cpu_percent,
                s.rss_bytes,
            )
        });
        println!(
            "t={:>4}s  in {:>5}/s  out {:>5}/s  latency p50 {:>7.3} ms  p99 {:>7.3} ms  anomalies {:>5} (fault windows {:>5})  shed {shed}  queue {queue}  cpu {cpu:>3.0}%  rss {:.1} MB",
            started.elapsed().as_secs(),
            sent - last.0,
            results - last.1,
            p50 as f64 / 1000.0,
            p99 as f64 / 1000.0,
            tally.anomalies.load(Ordering::Relaxed),
            tally.fault_windows.load(Ordering::Relaxed),
            rss as f64 / 1e6,
        );
        last = (sent, results);
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
    let summary = agent.await.context("agent task")??;
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
    let c = &summary.counters;
    println!(
        "agent: {} inferences, {} shed, {} bad payloads, drained cleanly: {}",
        c["inferences_ok"],
        c["windows_shed"],
        c.iter()
            .filter(|(k, _)| k.starts_with("bad_"))
            .map(|(_, v)| v)
            .sum::<u64>(),
        summary.drained
    );
    Ok(())
}

fn percentiles(values: &mut [u64]) -> (u64, u64) {
    if values.is_empty() {
        return (0, 0);
    }
    values.sort_unstable();
    let at = |q: f64| values[((values.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.99))
}

async fn run_machine(spec: machine::Spec, port: u16, tally: Arc<Tally>, stop: CancellationToken) {
    let mut options = MqttOptions::new(format!("machine-{}", spec.name), "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(10));
    let (client, mut eventloop) = AsyncClient::new(options, 256);
    let driver = tokio::spawn(async move {
        loop {
            if eventloop.poll().await.is_err() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    });
    let topic = format!("spillway/factory/line1/{}/data", spec.name);
    let mut machine = machine::Machine::new(&spec);
    let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(spec.rate)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut i = 0u64;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = ticks.tick() => {}
        }
        let window = machine.next_window();
        let ts = 2_000_000_000.0 + i as f64;
        i += 1;
        if window.faulty {
            tally.fault_windows.fetch_add(1, Ordering::Relaxed);
            if let Ok(mut f) = tally.faulty.lock() {
                f.insert((spec.name.clone(), ts as u64));
            }
        }
        let payload =
            protocol::payload::encode_senml_cbor(&window.samples, ts, 1.0 / machine::SAMPLE_RATE);
        if client
            .publish(topic.as_str(), QoS::AtLeastOnce, false, payload)
            .await
            .is_ok()
        {
            tally.sent.fetch_add(1, Ordering::Relaxed);
        }
    }
    // Let the client flush what is queued before its connection goes.
    tokio::time::sleep(Duration::from_millis(200)).await;
    driver.abort();
}

async fn listen(port: u16, tally: Arc<Tally>) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let mut options = MqttOptions::new("factory-dashboard", "127.0.0.1", port);
    options
        .set_keep_alive(Duration::from_secs(10))
        .set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = AsyncClient::new(options, 64);
    client
        .subscribe("spillway/factory/line1/+/inference", QoS::AtLeastOnce)
        .await?;
    client
        .subscribe("spillway/factory/line1/status", QoS::AtLeastOnce)
        .await?;
    Ok(tokio::spawn(async move {
        let _client = client;
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) if p.topic.ends_with("/status") => {
                    if let (Ok(status), Ok(mut slot)) = (
                        serde_json::from_slice::<Status>(&p.payload),
                        tally.status.lock(),
                    ) {
                        *slot = Some(status);
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let Ok(result) = serde_json::from_slice::<InferenceResult>(&p.payload) else {
                        continue;
                    };
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
