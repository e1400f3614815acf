//! Hub benchmark: how many agent sessions one hub holds, and how much of a replica's cold
//! start the agents' forecasts hide.
//!
//! 1. **Fleet scale.** A `cloud-hub serve` process and, in this process, a load generator
//!    that opens N agent sessions — each its own QUIC connection with its own certificate
//!    from the hub's CA, a `Hello`, then a `Heartbeat` every second at a random phase. At
//!    1k, 5k and 10k sessions (added to the ones already open), once all are online in the
//!    API, the hub's CPU (from `/proc`, over a 10 s window) and resident memory are read.
//!    The generator shares the machine's two cores with the hub.
//! 2. **Cold start.** The scaling scenario of the end-to-end tests (a slow gateway's load
//!    ramps past its capacity; replicas start from zero) with the hub scaling predictively
//!    (on the agents' forecast demand and the replicas' load) and reactively (load only):
//!    time from the start of the ramp to the first ready replica, and the SLO misses.
//!    Needs root (cgroups) and mosquitto.
//!
//! Run: `cargo build --release --workspace --bins && target/release/bench-fleet`
//! (`--agents 1000,5000` to choose the sizes; `--scale-only`, `--cold-start-only`).

#![allow(clippy::disallowed_methods)] // a benchmark reads the clock

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use cloud_hub::ca::Signer;
use protocol::frame::{self, Decoded, Decoder, Heartbeat, Hello, Message, PROTOCOL_VERSION};
use spillway_tests::fleet::CpuLimit;
use spillway_tests::hub::{HubProcess, burst};
use spillway_tests::load::{agent_client, client_endpoint, cpu_secs, rss_bytes};
use spillway_tests::{Broker, mosquitto_path};

const SLO: Duration = Duration::from_millis(500);
const SESSIONS_PER_SOCKET: usize = 250;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |f: &str| args.iter().any(|a| a == f);
    let sizes: Vec<usize> = args
        .iter()
        .position(|a| a == "--agents")
        .and_then(|i| args.get(i + 1))
        .map(|s| s.split(',').filter_map(|n| n.parse().ok()).collect())
        .unwrap_or_else(|| vec![1000, 5000, 10_000]);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        if !flag("--cold-start-only") {
            scale(&sizes).await?;
        }
        if !flag("--scale-only") {
            cold_start().await?;
        }
        anyhow::Ok(())
    })
}

/// What the generator's sessions did.
#[derive(Default)]
struct Tally {
    heartbeats: AtomicU64,
    /// Sessions that failed (handshake, or lost later) and were opened again.
    lost: AtomicU64,
    /// Set when the run is over: sessions end without counting.
    stopping: std::sync::atomic::AtomicBool,
}

async fn scale(sizes: &[usize]) -> anyhow::Result<()> {
    let hub = HubProcess::start(&[
        "--max-replicas",
        "0",
        "--max-sessions",
        "20000",
        "--offline-after-ms",
        "5000",
    ])?;
    let pid = hub.pid().context("the hub is not running")?;
    let signer = Signer::open(hub.dir.path())?;
    let ca = std::fs::read(hub.dir.path().join("ca.pem"))?;
    // Gateways each have their own socket; the generator gives every 250 sessions one, so
    // that no single socket buffer or endpoint driver is what limits the run.
    let mut endpoints: Vec<quinn::Endpoint> = Vec::new();
    let tally = Arc::new(Tally::default());
    let mut open = 0usize;
    let mut rows = Vec::new();
    println!(
        "Fleet scale: one hub, N agent sessions (QUIC + mutual TLS, one certificate each), a heartbeat per second each; hub CPU over 10 s, RSS after.\n"
    );
    for &n in sizes {
        // Certificates first: making them blocks, and open sessions must keep being served.
        let configs = tokio::task::block_in_place(|| {
            (open..n)
                .map(|i| {
                    let name = format!("load-{i:05}");
                    agent_client(&signer, &ca, &name).map(|c| (name, c))
                })
                .collect::<anyhow::Result<Vec<_>>>()
        })?;
        let started = Instant::now();
        let mut batch = tokio::task::JoinSet::new();
        for (i, (name, config)) in (open..n).zip(configs) {
            if i % SESSIONS_PER_SOCKET == 0 {
                endpoints.push(client_endpoint()?);
            }
            let endpoint = endpoints[i / SESSIONS_PER_SOCKET].clone();
            let tally = Arc::clone(&tally);
            let control = hub.control;
            batch.spawn(agent(endpoint, config, control, name, tally));
            // Pace the handshakes (500/s): a fleet connects over minutes, not all at once.
            if i % 25 == 24 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        batch.detach_all();
        open = n;
        let online = wait_online(&hub, n, Duration::from_secs(120)).await;
        let ramp = started.elapsed().as_secs_f64();
        let (cpu0, at0) = (cpu_secs(pid)?, Instant::now());
        let beats0 = tally.heartbeats.load(Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(10)).await;
        let cpu = (cpu_secs(pid)? - cpu0) / at0.elapsed().as_secs_f64();
        let rate = (tally.heartbeats.load(Ordering::Relaxed) - beats0) as f64
            / at0.elapsed().as_secs_f64();
        let rss = rss_bytes(pid)?;
        let lost = tally.lost.load(Ordering::Relaxed);
        rows.push((n, online, ramp, cpu, rss, rate, lost));
        eprintln!(
            "{n} sessions: {online} online after {ramp:.1} s, hub CPU {:.1} %, RSS {:.0} MiB, {rate:.0} heartbeats/s",
            cpu * 100.0,
            rss as f64 / (1 << 20) as f64
        );
    }
    println!(
        "| sessions | online | connect all, s | heartbeats/s | hub CPU (1 core = 100 %) | hub RSS MiB | RSS per session KiB | sessions reopened so far |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    for (n, online, ramp, cpu, rss, rate, lost) in &rows {
        println!(
            "| {n} | {online} | {ramp:.1} | {rate:.0} | {:.1} % | {:.0} | {:.1} | {lost} |",
            cpu * 100.0,
            *rss as f64 / (1 << 20) as f64,
            *rss as f64 / 1024.0 / *n as f64
        );
    }
    println!(
        "\nA session that fails (handshake timeout, loss) is opened again after 0.2-5 s, as an agent does. Goal: 10,000 sessions at 1 Hz on one hub.\n"
    );
    tally.stopping.store(true, Ordering::Relaxed);
    for e in &endpoints {
        e.close(0u32.into(), b"done");
    }
    Ok(())
}

/// One agent: a session, and after it fails a new one, with backoff as the agent does
/// (0.2 s doubling to 5 s).
async fn agent(
    endpoint: quinn::Endpoint,
    config: quinn::ClientConfig,
    hub: SocketAddr,
    name: String,
    tally: Arc<Tally>,
) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let ended = session(&endpoint, config.clone(), hub, name.clone(), &tally).await;
        if tally.stopping.load(Ordering::Relaxed) {
            return;
        }
        tally.lost.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = ended {
            eprintln!("session ended: {e:#}");
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// One agent's session: hello, welcome, a heartbeat a second (random phase), until error.
async fn session(
    endpoint: &quinn::Endpoint,
    config: quinn::ClientConfig,
    hub: SocketAddr,
    name: String,
    tally: &Tally,
) -> anyhow::Result<()> {
    let conn = endpoint.connect_with(config, hub, "spillway-hub")?.await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(&frame::encode(&Message::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        agent_version: "bench".into(),
        agent: name,
        site: "load".into(),
        capabilities: vec![],
        models: vec![],
    })))
    .await?;
    // Read and drop everything the hub sends (the welcome, replica sets).
    tokio::spawn(async move {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        while let Ok(Some(n)) = recv.read(&mut chunk).await {
            buf.extend_from_slice(&chunk[..n]);
            while let Ok(Decoded::Frame { consumed, .. }) = Decoder::default().decode(&buf) {
                buf.drain(..consumed);
            }
        }
    });
    let phase = Duration::from_millis(rand::random::<u64>() % 1000);
    tokio::time::sleep(phase).await;
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    for seq in 0.. {
        ticker.tick().await;
        let beat = Heartbeat {
            seq,
            arrival_rate: 10.0,
            capacity: 100.0,
            forecast: 10.0,
            offload_demand: 0.0,
            queue_depth: 0,
            offload_share: 0.0,
            in_flight: 0,
            cpu: 0.1,
            memory_bytes: 10 << 20,
            models: vec![],
            counters: vec![("windows_enqueued".into(), seq * 10)],
            health: vec![],
        };
        send.write_all(&frame::encode(&Message::Heartbeat(beat)))
            .await?;
        tally.heartbeats.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

async fn wait_online(hub: &HubProcess, n: usize, limit: Duration) -> usize {
    let start = Instant::now();
    let mut online = 0;
    while start.elapsed() < limit {
        online = hub
            .get_text("/metrics")
            .ok()
            .and_then(|m| {
                m.lines().find_map(|l| {
                    l.strip_prefix("spillway_hub_agents_online ")?
                        .trim()
                        .parse()
                        .ok()
                })
            })
            .unwrap_or(0);
        if online >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    online
}

async fn cold_start() -> anyhow::Result<()> {
    let Some(mosquitto) = mosquitto_path() else {
        println!("Cold start skipped: mosquitto is not installed.");
        return Ok(());
    };
    let broker = Broker::shared_or_start(&mosquitto)?;
    let mut rows = Vec::new();
    for scaling in ["predictive", "reactive"] {
        let limit = match CpuLimit::new(&format!("spillway-bench-{scaling}"), 0.1) {
            Ok(l) => l,
            Err(reason) => {
                println!("Cold start skipped: {reason}");
                return Ok(());
            }
        };
        eprintln!("cold start, {scaling} scaling");
        rows.push((scaling, burst(&broker, &limit, scaling, SLO).await?));
    }
    println!(
        "Cold start: replicas from zero, a slow gateway (a tenth of a core, μ ≈ {:.0} windows/s) ramping 0.3 μ → 2.5 μ over {:.0} s, two calm agents; SLO {} ms.\n",
        rows[0].1.mu,
        rows[0].1.ramp_secs,
        SLO.as_millis()
    );
    println!(
        "| hub scaling | first replica ready, s into the ramp | peak ready | windows | offloaded | p99 ms | over SLO |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for (scaling, o) in &rows {
        let r = &o.report;
        println!(
            "| {scaling} | {} | {} | {} | {:.1} % | {:.0} | {:.2} % |",
            o.first_ready.map_or("never".into(), |t| format!("{t:.1}")),
            o.peak,
            r.sent,
            100.0 * r.remote as f64 / r.sent.max(1) as f64,
            r.quantile(0.99) * 1e3,
            100.0 * r.over(SLO)
        );
    }
    println!();
    Ok(())
}
