//! Offload benchmark: three routers through the same burst, and the QUIC round trip.
//!
//! 1. **Burst.** For each router (edge-only, reactive, predictive), in one run: mosquitto, two
//!    `cloud-hub replica` processes, and an `edge-agent` whose inference thread a cgroup holds
//!    to a tenth of a core (a gateway slower than its cloud). The load is steady at half the
//!    agent's capacity, then three times its capacity for 30 s, then back. Latency is measured
//!    from the publish to the result, as a subscriber sees it. The capacity is measured once,
//!    by the first agent, and the same rates are used for all three.
//! 2. **QUIC.** One connection to a replica, 4 KiB `Echo` requests (no inference), one at a
//!    time: p50/p99; then 32 at a time: requests per second.
//!
//! Run: `cargo build --release --workspace --bins && target/release/bench-offload`
//! (`--quick` shortens the burst phases; `--quic-only` skips the burst). The burst needs root
//! (cgroups) and mosquitto.

#![allow(clippy::disallowed_methods)] // a benchmark reads the clock

use std::time::{Duration, Instant};

use anyhow::Context;
use protocol::frame::Message;
use spillway_tests::fleet::{Certs, ReplicaProcess, Report, Rig};
use spillway_tests::mosquitto_path;

const SLO: Duration = Duration::from_millis(500);
const CPU_SHARE: f64 = 0.1;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let quic_only = args.iter().any(|a| a == "--quic-only");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        if !quic_only {
            burst(quick).await?;
        }
        quic().await
    })
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

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "not met" }
}

async fn quic() -> anyhow::Result<()> {
    let certs = Certs::new()?;
    let replica = ReplicaProcess::start(&certs, "vibration-ae", 1, &[])?;
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    endpoint.set_default_client_config(edge_agent::offload::client_config(
        &certs.path("ca.pem"),
        &certs.path("agent.pem"),
        &certs.path("agent.key"),
    )?);
    let handshake = Instant::now();
    let conn = endpoint.connect(replica.addr(), "localhost")?.await?;
    let handshake = handshake.elapsed();
    let request = Message::Echo((0..1024).map(|i| (i as f32 * 0.37).sin()).collect());
    let size = protocol::frame::encode(&request).len();
    for _ in 0..500 {
        edge_agent::offload::exchange(&conn, &request).await?;
    }
    let mut latencies = Vec::with_capacity(5000);
    for _ in 0..5000 {
        let t = Instant::now();
        edge_agent::offload::exchange(&conn, &request).await?;
        latencies.push(t.elapsed().as_secs_f64());
    }
    latencies.sort_by(f64::total_cmp);
    let q = |x: f64| latencies[((latencies.len() - 1) as f64 * x) as usize] * 1e6;
    let serial_rate = latencies.len() as f64 / latencies.iter().sum::<f64>();

    let in_flight = 32;
    let window = Duration::from_secs(3);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..in_flight {
        let conn = conn.clone();
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
    let parallel_rate = total as f64 / start.elapsed().as_secs_f64();
    println!(
        "QUIC round trip on loopback, mutual TLS, one stream per request, {size}-byte Echo frames (no inference); handshake {:.2} ms.\n",
        handshake.as_secs_f64() * 1e3
    );
    println!("| measure | result | goal |");
    println!("| --- | --- | --- |");
    println!("| p50, one at a time | {:.0} µs | ≤ 200 µs |", q(0.5));
    println!("| p99, one at a time | {:.0} µs | ≤ 1000 µs |", q(0.99));
    println!("| requests/s, one at a time | {serial_rate:.0} | |");
    println!("| requests/s, {in_flight} in flight, one connection | {parallel_rate:.0} | |");
    Ok(())
}
