//! Offload benchmark: three routers through the same burst, and the QUIC round trip.
//!
//! 1. **Burst.** For each router (edge-only, reactive, predictive), in one run: mosquitto, two
//!    `cloud-hub replica` processes, and an `edge-agent` whose inference thread a cgroup holds
//!    to a tenth of a core (a gateway slower than its cloud). The load is steady at half the
//!    agent's capacity, then three times its capacity for 30 s, then back. Latency is measured
//!    from the publish to the result, as a subscriber sees it. The capacity is measured once,
//!    by the first agent, and the same rates are used for all three.
//! 2. **QUIC.** One connection to a replica, 4 KiB `Echo` requests (no inference), one at a
//!    time: p50/p99; then 32 at a time: requests per second. Two clients in interleaved
//!    rounds: one on a single I/O thread, as the agent's offload client runs, and one on a
//!    2-worker runtime.
//! 3. **Replica batching.** Two one-thread replicas of the autoencoder, one that runs every
//!    request in a call of its own (`--max-batch 1`) and one that runs the queued ones
//!    together (the default), each loaded by its own client with 64 requests out at all times,
//!    in interleaved rounds: requests per second and the replica's CPU per request.
//!
//! Run: `cargo build --release --workspace --bins && target/release/bench-offload`
//! (`--quick` shortens the burst phases; `--quic-only` skips the burst and the batching part,
//! `--batching-only` runs only that). The burst needs root (cgroups) and mosquitto.

#![allow(clippy::disallowed_methods)] // a benchmark reads the clock

use std::time::{Duration, Instant};

use anyhow::Context;
use protocol::frame::Message;
use spillway_tests::fleet::{Certs, ReplicaProcess, Report, Rig};
use spillway_tests::load::median;
use spillway_tests::mosquitto_path;

const SLO: Duration = Duration::from_millis(500);
const CPU_SHARE: f64 = 0.1;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let quic_only = args.iter().any(|a| a == "--quic-only");
    let batching_only = args.iter().any(|a| a == "--batching-only");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    if !quic_only && !batching_only {
        runtime.block_on(burst(quick))?;
    }
    drop(runtime);
    if !batching_only {
        quic()?;
    }
    if !quic_only {
        batching()?;
    }
    Ok(())
}

async fn burst(quick: bool) -> anyhow::Result<()> {
    let mosquitto = mosquitto_path().context("the burst needs mosquitto")?;
    let (steady, peak) = if quick { (5.0, 10.0) } else { (10.0, 30.0) };
    let mut mu: Option<f64> = None;
    let mut rows = Vec::new();
    for mode in ["predictive", "reactive", "off"] {
        let rig = match Rig::start(&mosquitto, &format!("bench-{mode}"), 2, CPU_SHARE)? {
            Ok(rig) => rig,
            Err(reason) => {
                println!("Burst skipped: {reason}\n");
                return Ok(());
            }
        };
        let offload = rig.certs.offload_section(mode, &rig.replica_addrs(), "");
        let gw = rig.gateway(&format!("gw-bench-{mode}"), &offload).await?;
        let capacity = match mu {
            Some(mu) => {
                // Warm up as the first agent did, at the same rate.
                gw.drive(&[(0.5 * mu, Duration::from_secs(3))]).await?;
                mu
            }
            None => {
                let (measured, _) = gw.calibrate(100.0, Duration::from_secs(3)).await?;
                mu = Some(measured);
                measured
            }
        };
        eprintln!("{mode}: driving the burst (capacity {capacity:.0} windows/s)");
        let secs = Duration::from_secs_f64;
        let sent = gw
            .drive(&[
                (0.5 * capacity, secs(steady)),
                (3.0 * capacity, secs(peak)),
                (0.5 * capacity, secs(steady)),
            ])
            .await?;
        let report = gw.collect(&sent, Duration::from_secs(120)).await;
        rows.push((mode, report, gw.counters()));
    }
    let mu = mu.unwrap_or_default();
    println!(
        "Burst: agent inference held to {CPU_SHARE} of a core (capacity μ = {mu:.0} windows/s, bearing-cnn), two replicas, \
         SLO {} ms; {:.0} s at 0.5 μ → {:.0} s at 3 μ → {:.0} s at 0.5 μ; latency from publish to result.\n",
        SLO.as_millis(),
        steady,
        peak,
        steady
    );
    println!("| router | windows | p50 ms | p99 ms | over SLO | offloaded | lost (shed) |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for (mode, r, counters) in &rows {
        let name = match *mode {
            "off" => "edge only",
            other => other,
        };
        println!(
            "| {name} | {} | {:.0} | {:.0} | {:.1} % | {:.1} % | {} ({}) |",
            r.sent,
            r.quantile(0.5) * 1e3,
            r.quantile(0.99) * 1e3,
            r.over(SLO) * 100.0,
            share(r.remote, r.sent),
            r.missing,
            counters.get("windows_shed").copied().unwrap_or(0)
        );
    }
    let over = |m: &str| rows.iter().find(|(mode, ..)| *mode == m).map(|(_, r, _)| r);
    if let (Some(p), Some(r)) = (over("predictive"), over("reactive")) {
        println!(
            "\nGoal: predictive p99 within the SLO: {:.0} ms vs {} ms ({}); predictive over-SLO at most half of reactive's: {:.2} % vs {:.2} % (ratio {:.2}, {}).\n",
            p.quantile(0.99) * 1e3,
            SLO.as_millis(),
            verdict(p.quantile(0.99) <= SLO.as_secs_f64()),
            p.over(SLO) * 100.0,
            r.over(SLO) * 100.0,
            ratio(p, r),
            verdict(p.over(SLO) <= 0.5 * r.over(SLO))
        );
    }
    Ok(())
}

fn share(part: usize, whole: usize) -> f64 {
    part as f64 * 100.0 / whole.max(1) as f64
}

fn ratio(p: &Report, r: &Report) -> f64 {
    if r.over(SLO) == 0.0 {
        if p.over(SLO) == 0.0 {
            0.0
        } else {
            f64::INFINITY
        }
    } else {
        p.over(SLO) / r.over(SLO)
    }
}

async fn serial(conn: &quinn::Connection, request: &Message, n: usize) -> anyhow::Result<Vec<f64>> {
    let mut latencies = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        edge_agent::offload::exchange(conn, request).await?;
        latencies.push(t.elapsed().as_secs_f64());
    }
    Ok(latencies)
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "not met" }
}

/// One client: its runtime and a connection made on it.
struct Client {
    runtime: tokio::runtime::Runtime,
    conn: quinn::Connection,
    handshake: Duration,
}

impl Client {
    fn connect(
        runtime: tokio::runtime::Runtime,
        certs: &Certs,
        addr: std::net::SocketAddr,
    ) -> anyhow::Result<Client> {
        let config = edge_agent::offload::client_config(
            &certs.path("ca.pem"),
            &certs.path("agent.pem"),
            &certs.path("agent.key"),
        )?;
        let (conn, handshake) = runtime.block_on(async {
            let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
            endpoint.set_default_client_config(config);
            let t = Instant::now();
            let conn = endpoint.connect(addr, "localhost")?.await?;
            anyhow::Ok((conn, t.elapsed()))
        })?;
        Ok(Client {
            runtime,
            conn,
            handshake,
        })
    }

    /// `n` requests one at a time; their latencies, seconds.
    fn serial(&self, request: &Message, n: usize) -> anyhow::Result<Vec<f64>> {
        self.runtime.block_on(serial(&self.conn, request, n))
    }

    /// Requests per second with `in_flight` requests out at all times, over `window`.
    fn parallel(
        &self,
        request: &Message,
        in_flight: usize,
        window: Duration,
    ) -> anyhow::Result<f64> {
        self.runtime.block_on(async {
            let start = Instant::now();
            let mut tasks = Vec::new();
            for _ in 0..in_flight {
                let conn = self.conn.clone();
                let request = request.clone();
                tasks.push(tokio::spawn(async move {
                    let mut n = 0u64;
                    while start.elapsed() < window {
                        if edge_agent::offload::exchange(&conn, &request).await.is_ok() {
                            n += 1;
                        }
                    }
                    n
                }));
            }
            let mut total = 0;
            for t in tasks {
                total += t.await?;
            }
            anyhow::Ok(total as f64 / start.elapsed().as_secs_f64())
        })
    }
}

/// The QUIC round trip, measured from two clients side by side: one whose endpoint runs on a
/// single thread, as the agent's offload client does, and one on a 2-worker runtime.
fn quic() -> anyhow::Result<()> {
    let certs = Certs::new()?;
    let replica = ReplicaProcess::start(&certs, "vibration-ae", 1, &[])?;
    let single = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let multi = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let clients = [
        (
            "one I/O thread (the agent)",
            Client::connect(single, &certs, replica.addr())?,
        ),
        (
            "2-worker runtime",
            Client::connect(multi, &certs, replica.addr())?,
        ),
    ];
    let request = Message::Echo((0..1024).map(|i| (i as f32 * 0.37).sin()).collect());
    let size = protocol::frame::encode(&request).len();
    for (_, client) in &clients {
        client.serial(&request, 500)?;
    }
    // Rounds interleaved, so both clients see the same machine.
    let mut latencies = [Vec::new(), Vec::new()];
    for _ in 0..10 {
        for (i, (_, client)) in clients.iter().enumerate() {
            latencies[i].extend(client.serial(&request, 500)?);
        }
    }
    let in_flight = 32;
    let mut rates = [Vec::new(), Vec::new()];
    for _ in 0..3 {
        for (i, (_, client)) in clients.iter().enumerate() {
            rates[i].push(client.parallel(&request, in_flight, Duration::from_secs(1))?);
        }
    }
    println!(
        "QUIC round trip on loopback, mutual TLS, one stream per request, {size}-byte Echo frames (no inference); handshake {:.2} ms.\n",
        clients[0].1.handshake.as_secs_f64() * 1e3
    );
    println!(
        "| measure | {} | {} | ratio | goal |",
        clients[0].0, clients[1].0
    );
    println!("| --- | --- | --- | --- | --- |");
    for l in &mut latencies {
        l.sort_by(f64::total_cmp);
    }
    let q = |l: &[f64], x: f64| l[((l.len() - 1) as f64 * x) as usize] * 1e6;
    for (name, x, goal) in [("p50", 0.5, "≤ 200 µs"), ("p99", 0.99, "≤ 1000 µs")] {
        let (a, b) = (q(&latencies[0], x), q(&latencies[1], x));
        println!(
            "| {name}, one at a time | {a:.0} µs | {b:.0} µs | {:.2} | {goal} |",
            a / b
        );
    }
    let serial_rate = |l: &[f64]| l.len() as f64 / l.iter().sum::<f64>();
    let (a, b) = (serial_rate(&latencies[0]), serial_rate(&latencies[1]));
    println!(
        "| requests/s, one at a time | {a:.0} | {b:.0} | {:.2} | |",
        a / b
    );
    let [r0, r1] = &mut rates;
    let (a, b) = (median(r0), median(r1));
    println!(
        "| requests/s, {in_flight} in flight, one connection (median of 3) | {a:.0} | {b:.0} | {:.2} | |",
        a / b
    );
    Ok(())
}

/// A replica that runs each request alone against one that runs the queued ones together:
/// the same model, one inference thread each, loaded in interleaved rounds.
fn batching() -> anyhow::Result<()> {
    use protocol::frame::{InferRequest, RequestId};
    const IN_FLIGHT: usize = 64;
    const ROUNDS: usize = 5;
    let certs = Certs::new()?;
    let alone = ReplicaProcess::start(&certs, "vibration-ae", 1, &["--max-batch", "1"])?;
    let together = ReplicaProcess::start(&certs, "vibration-ae", 1, &[])?;
    let reference = spillway_tests::reference("vibration-ae")?;
    let request = Message::InferRequest(InferRequest {
        id: RequestId(1),
        model: "vibration-ae".into(),
        shape: models::zoo::VIBRATION_AE
            .input_shape
            .iter()
            .map(|&d| d as u32)
            .collect(),
        data: reference.windows[0].clone(),
        deadline_ms: 10_000,
    });
    let client = |addr| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Client::connect(runtime, &certs, addr)
    };
    let replicas = [
        ("one request a call", &alone),
        ("queued requests together", &together),
    ];
    let clients = [client(alone.addr())?, client(together.addr())?];
    let mut rates = [Vec::new(), Vec::new()];
    let mut cpu_us = [Vec::new(), Vec::new()];
    for _ in 0..ROUNDS {
        for (i, ((_, replica), client)) in replicas.iter().zip(&clients).enumerate() {
            let cpu = spillway_tests::load::cpu_secs(replica.pid()?)?;
            let rate = client.parallel(&request, IN_FLIGHT, Duration::from_secs(1))?;
            let used = spillway_tests::load::cpu_secs(replica.pid()?)? - cpu;
            rates[i].push(rate);
            cpu_us[i].push(used / rate * 1e6);
        }
    }
    println!(
        "\nReplica batching: vibration-ae, one inference thread, {IN_FLIGHT} requests in flight on one connection, {ROUNDS} interleaved rounds of 1 s (medians).\n"
    );
    println!("| replica | requests/s | replica CPU per request (µs) |");
    println!("| --- | --- | --- |");
    for (i, (name, _)) in replicas.iter().enumerate() {
        println!(
            "| {name} | {:.0} | {:.1} |",
            median(&mut rates[i]),
            median(&mut cpu_us[i])
        );
    }
    let [a, b] = &mut rates;
    println!("\ntogether ÷ alone: {:.2}", median(b) / median(a));
    Ok(())
}
