//! Rollout benchmark: one model version of a few MB to a fleet of 1,000 agents, with a 10 %
//! canary stage and a short bake.
//!
//! A `cloud-hub serve` process; in this process, N − R simulated agents, each its own QUIC
//! connection and certificate, that do what an agent does with an update except run it: check
//! the manifest's signature against the hub key from the welcome, download the bytes on a
//! stream of their own, check size and SHA-256, then report the new version in their
//! heartbeats. R real `edge-agent` processes (mosquitto permitting) take part as well, with
//! windows flowing to them through the whole rollout: they download, verify, load, swap —
//! and show whether any window is lost or fails on the way.
//!
//! Printed: time from the start to every agent on the new version, the bake, the time
//! without the bake (goal ≤ 10 s), the hub's CPU and send rate, and the windows the real
//! agents lost or failed (goal 0).
//!
//! Run: `cargo build --release --workspace --bins && target/release/bench-rollout`
//! (`--agents 1000 --real 3 --size-mb 3 --bake-secs 5 --max-downloads 64`).

#![allow(clippy::disallowed_methods)] // a benchmark reads the clock

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use cloud_hub::ca::Signer;
use protocol::frame::{
    self, Decoded, Decoder, FetchModel, Heartbeat, Hello, Message, ModelHealth, ModelVersion,
    PROTOCOL_VERSION,
};
use protocol::manifest::{SignedManifest, hex};
use protocol::payload::encode_plain_json;
use spillway_tests::hub::{HubProcess, hub_agent_config, pad_model};
use spillway_tests::load::{agent_client, client_endpoint, cpu_secs};
use spillway_tests::{Agent, Broker, Listener, Publisher, mosquitto_path, reference};

const MODEL: &str = "bearing-cnn";
const SESSIONS_PER_SOCKET: usize = 250;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |flag: &str, default: f64| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let agents = value("--agents", 1000.0) as usize;
    let real = value("--real", 3.0) as usize;
    let size_mb = value("--size-mb", 3.0);
    let bake = value("--bake-secs", 5.0);
    let max_downloads = value("--max-downloads", 64.0) as usize;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(run(agents, real, size_mb, bake, max_downloads))
}

/// What the simulated agents did.
#[derive(Default)]
struct Tally {
    updated: AtomicUsize,
    /// Installs that failed (refused, or the transfer broke).
    refused: AtomicUsize,
    lost_sessions: AtomicU64,
    stopping: AtomicBool,
}

async fn run(
    agents: usize,
    real: usize,
    size_mb: f64,
    bake: f64,
    max_downloads: usize,
) -> anyhow::Result<()> {
    let hub = HubProcess::start(&[
        "--max-replicas",
        "0",
        "--offline-after-ms",
        "10000",
        "--max-sessions",
        "20000",
        "--max-downloads",
        &max_downloads.to_string(),
    ])?;
    let pid = hub.pid().context("the hub is not running")?;

    // Real agents, with windows flowing.
    let broker = match mosquitto_path() {
        Some(m) => Some(Broker::shared_or_start(&m)?),
        None => {
            println!("Real agents skipped: mosquitto is not installed.");
            None
        }
    };
    let real = if broker.is_some() {
        real.min(agents)
    } else {
        0
    };
    let mut members = Vec::new();
    if let Some(broker) = &broker {
        for i in 0..real {
            let name = format!("real-{i}");
            let token = hub.enroll(&name, 600)?;
            let state = tempfile::tempdir()?;
            let config = hub_agent_config(broker.port(), &name, hub.control, state.path(), "");
            let agent = Agent::start(&config, &[("SPILLWAY__HUB__TOKEN", &token)])?;
            let listener = Listener::start(broker.port(), "test", &name).await?;
            members.push((name, agent, state, listener));
        }
    }

    // Simulated agents.
    let signer = Signer::open(hub.dir.path())?;
    let ca = std::fs::read(hub.dir.path().join("ca.pem"))?;
    let simulated = agents - real;
    let configs = tokio::task::block_in_place(|| {
        (0..simulated)
            .map(|i| {
                let name = format!("sim-{i:05}");
                agent_client(&signer, &ca, &name).map(|c| (name, c))
            })
            .collect::<anyhow::Result<Vec<_>>>()
    })?;
    let tally = Arc::new(Tally::default());
    let mut endpoints = Vec::new();
    for (i, (name, config)) in configs.into_iter().enumerate() {
        if i % SESSIONS_PER_SOCKET == 0 {
            endpoints.push(client_endpoint()?);
        }
        let endpoint = endpoints[i / SESSIONS_PER_SOCKET].clone();
        let site = format!("site-{}", i % 10);
        tokio::spawn(sim_agent(
            endpoint,
            config,
            hub.control,
            name,
            site,
            Arc::clone(&tally),
        ));
        if i % 25 == 24 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let online = wait_for(Duration::from_secs(120), || {
        metric(&hub, "spillway_hub_agents_online") >= agents as f64
    })
    .await;
    anyhow::ensure!(
        online,
        "only {} agents came online",
        metric(&hub, "spillway_hub_agents_online")
    );
    eprintln!("{agents} agents online");

    // Windows to the real agents, all through the rollout.
    let stop = Arc::new(AtomicBool::new(false));
    let sent: Arc<HashMap<String, AtomicUsize>> = Arc::new(
        members
            .iter()
            .map(|(n, ..)| (n.clone(), AtomicUsize::new(0)))
            .collect(),
    );
    let driver = match &broker {
        Some(broker) => {
            let publisher = Publisher::connect(broker.port()).await?;
            let (stop, sent) = (Arc::clone(&stop), Arc::clone(&sent));
            Some(tokio::spawn(async move {
                let reference = reference(MODEL)?;
                let mut ticker = tokio::time::interval(Duration::from_millis(20));
                let mut i = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    ticker.tick().await;
                    let window = &reference.windows[i % reference.windows.len()];
                    for (name, count) in sent.iter() {
                        publisher
                            .publish(
                                &format!("spillway/test/{name}/s{}/data", i % 2),
                                encode_plain_json(window, 1_800_000_000.0 + i as f64),
                            )
                            .await?;
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                    i += 1;
                }
                anyhow::Ok(publisher)
            }))
        }
        None => None,
    };

    // The update: the v2 fixture padded to the asked size with a doc_string (field 6 of
    // ModelProto, appended; the last one wins and tract ignores it).
    let v2 = std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/bearing-cnn-v2.onnx"),
    )?;
    let pad = ((size_mb * 1e6) as usize).saturating_sub(v2.len() + 8);
    let bytes = pad_model(v2, pad);
    let file = hub.dir.path().join("update.onnx");
    std::fs::write(&file, &bytes)?;
    hub.cli(&[
        "model",
        "publish",
        &file.display().to_string(),
        "--name",
        MODEL,
        "--version",
        "2",
    ])?;

    let cpu0 = cpu_secs(pid)?;
    let sent0 = metric(&hub, "spillway_hub_model_download_bytes_total");
    let started = Instant::now();
    let id = hub.start_rollout(MODEL, 2, "10%", &format!("{bake}s"))?;
    let done = wait_for(Duration::from_secs(600), || {
        hub.rollout(id).is_some_and(|r| r["stage"] == "done")
    })
    .await;
    let wall = started.elapsed().as_secs_f64();
    let cpu = (cpu_secs(pid)? - cpu0) / wall;
    let bytes_sent = metric(&hub, "spillway_hub_model_download_bytes_total") - sent0;
    let rollout = hub.rollout(id).unwrap_or_default();
    anyhow::ensure!(done, "the rollout did not finish: {rollout:#}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    if let Some(d) = driver {
        // Every window sent must have reached the broker before the count means anything.
        let publisher = d.await??;
        let total: usize = sent.values().map(|c| c.load(Ordering::Relaxed)).sum();
        wait_for(Duration::from_secs(30), || {
            publisher.acked() >= total as u64
        })
        .await;
    }

    let at = |what: &str| {
        rollout["events"].as_array().and_then(|e| {
            e.iter()
                .find(|ev| ev[1].as_str().is_some_and(|s| s.starts_with(what)))
                .and_then(|ev| ev[0].as_i64())
        })
    };
    let start_ms = rollout["started_at"].as_i64().unwrap_or(0);
    let canary_ms = rollout["baked_from"].as_i64().unwrap_or(start_ms) - start_ms;
    let full_from = at("bake passed").unwrap_or(start_ms);
    let done_at = at("every online agent").unwrap_or(full_from);
    let total_ms = done_at - start_ms;
    let baking_ms = full_from - start_ms - canary_ms;
    let moving_s = (total_ms - baking_ms) as f64 / 1000.0;

    // The real agents: every window answered, none failed.
    let mut lost = 0usize;
    let mut failed = 0u64;
    let mut on_v2 = 0usize;
    for (name, agent, _state, listener) in &members {
        let want = sent[name].load(Ordering::Relaxed);
        listener
            .wait_until(Duration::from_secs(30), |c| c.results.len() >= want)
            .await;
        lost += want.saturating_sub(listener.result_count());
        let counters = listener
            .wait_for_counters(Duration::from_secs(5), |_| true)
            .await
            .map(|s| s.counters)
            .unwrap_or_default();
        failed += counters.get("inference_errors").copied().unwrap_or(0);
        eprintln!(
            "{name}: {want} sent, {} results; counters {counters:?}",
            listener.result_count()
        );
        if hub.model_version(name, MODEL) == Some(2) {
            on_v2 += 1;
        } else {
            eprintln!("{name} is not on v2; log:\n{}", agent.log());
        }
    }
    let windows: usize = sent.values().map(|c| c.load(Ordering::Relaxed)).sum();

    println!(
        "Rollout of a {:.1} MB model to {agents} agents ({real} real edge-agent processes with windows flowing, {simulated} simulated sessions that verify signature and digest), canary 10 %, bake {bake} s, at most {max_downloads} downloads at once; hub and agents on the same 2 cores.\n",
        bytes.len() as f64 / 1e6
    );
    println!(
        "| agents | canary stage, s | bake, s | rest of the fleet, s | total, s | total − bake, s | hub CPU (1 core = 100 %) | sent MB | hub send rate MB/s | real agents' windows | lost | failed |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    println!(
        "| {agents} | {:.1} | {:.1} | {:.1} | {:.1} | {moving_s:.1} | {:.0} % | {:.0} | {:.0} | {windows} | {lost} | {failed} |",
        canary_ms as f64 / 1000.0,
        baking_ms as f64 / 1000.0,
        (done_at - full_from) as f64 / 1000.0,
        total_ms as f64 / 1000.0,
        cpu * 100.0,
        bytes_sent / 1e6,
        bytes_sent / 1e6 / moving_s.max(0.001),
    );
    println!(
        "\nSimulated agents updated: {} of {simulated} (failed installs: {}, sessions lost and reopened: {}); real agents on v2: {on_v2} of {real}. Goals: total − bake ≤ 10 s, 0 windows dropped.\n",
        tally.updated.load(Ordering::Relaxed),
        tally.refused.load(Ordering::Relaxed),
        tally.lost_sessions.load(Ordering::Relaxed),
    );
    tally.stopping.store(true, Ordering::Relaxed);
    Ok(())
}

async fn wait_for(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if tokio::task::block_in_place(&mut check) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

fn metric(hub: &HubProcess, name: &str) -> f64 {
    hub.get_text("/metrics")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

/// One simulated agent: sessions again and again (with backoff) until the run stops.
async fn sim_agent(
    endpoint: quinn::Endpoint,
    config: quinn::ClientConfig,
    hub: SocketAddr,
    name: String,
    site: String,
    tally: Arc<Tally>,
) {
    let version = Arc::new(AtomicU32::new(1));
    let busy = Arc::new(AtomicBool::new(false));
    let mut backoff = Duration::from_millis(200);
    while !tally.stopping.load(Ordering::Relaxed) {
        let ended = session(
            &endpoint,
            config.clone(),
            hub,
            (&name, &site),
            (&version, &busy),
            &tally,
        )
        .await;
        if tally.stopping.load(Ordering::Relaxed) {
            return;
        }
        tally.lost_sessions.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = ended {
            eprintln!("{name}: session ended: {e:#}");
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn session(
    endpoint: &quinn::Endpoint,
    config: quinn::ClientConfig,
    hub: SocketAddr,
    (name, site): (&str, &str),
    (version, busy): (&Arc<AtomicU32>, &Arc<AtomicBool>),
    tally: &Arc<Tally>,
) -> anyhow::Result<()> {
    let conn = endpoint.connect_with(config, hub, "spillway-hub")?.await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    let models = |v: u32| {
        vec![ModelVersion {
            name: MODEL.into(),
            version: v,
        }]
    };
    send.write_all(&frame::encode(&Message::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        agent_version: env!("CARGO_PKG_VERSION").into(),
        agent: name.into(),
        site: site.into(),
        capabilities: vec![],
        models: models(version.load(Ordering::Relaxed)),
    })))
    .await?;
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 16 << 10];
    let decoder = Decoder::new(1 << 20);
    let mut next =
        async |recv: &mut quinn::RecvStream, buf: &mut Vec<u8>| -> anyhow::Result<Message> {
            loop {
                if let Decoded::Frame { message, consumed } = decoder.decode(buf)? {
                    buf.drain(..consumed);
                    return Ok(message);
                }
                match recv.read(&mut chunk).await? {
                    Some(n) => buf.extend_from_slice(&chunk[..n]),
                    None => anyhow::bail!("the hub closed the control stream"),
                }
            }
        };
    let Message::Welcome(welcome) = next(&mut recv, &mut buf).await? else {
        anyhow::bail!("no welcome");
    };
    let key = welcome.hub_public_key.clone();
    let mut ticker = tokio::time::interval(Duration::from_millis(u64::from(welcome.heartbeat_ms)));
    // As the agent does: a finished install is reported at once.
    let report_now = Arc::new(tokio::sync::Notify::new());
    let mut seq = 0;
    loop {
        tokio::select! {
            () = report_now.notified() => ticker.reset_immediately(),
            _ = ticker.tick() => {
                let v = version.load(Ordering::Relaxed);
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
                    models: models(v),
                    counters: vec![],
                    health: vec![ModelHealth {
                        name: MODEL.into(),
                        version: v,
                        ..ModelHealth::default()
                    }],
                };
                seq += 1;
                send.write_all(&frame::encode(&Message::Heartbeat(beat))).await?;
            }
            message = next(&mut recv, &mut buf) => {
                // One install at a time, as the agent does.
                if let Message::ModelUpdate(signed) = message?
                    && !busy.swap(true, Ordering::Relaxed)
                {
                    let (conn, version, tally, key, busy, report_now) = (
                        conn.clone(),
                        Arc::clone(version),
                        Arc::clone(tally),
                        key.clone(),
                        Arc::clone(busy),
                        Arc::clone(&report_now),
                    );
                    tokio::spawn(async move {
                        match install(&conn, &signed, &key, &version).await {
                            Ok(true) => { tally.updated.fetch_add(1, Ordering::Relaxed); }
                            Ok(false) => {}
                            Err(e) => {
                                tally.refused.fetch_add(1, Ordering::Relaxed);
                                eprintln!("update failed: {e:#}");
                            }
                        }
                        busy.store(false, Ordering::Relaxed);
                        report_now.notify_one();
                    });
                }
            }
        }
    }
}

/// Verifies and downloads an update as an agent does; true when it moved to the version.
async fn install(
    conn: &quinn::Connection,
    signed: &SignedManifest,
    key: &[u8],
    version: &AtomicU32,
) -> anyhow::Result<bool> {
    let m = signed.verify(key)?;
    if m.version <= version.load(Ordering::Relaxed) {
        return Ok(false);
    }
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(&frame::encode(&Message::FetchModel(FetchModel {
        sha256: m.sha256.clone(),
        offset: 0,
    })))
    .await?;
    let _ = send.finish();
    let mut chunk = vec![0u8; 64 << 10];
    let mut buf = Vec::new();
    let decoder = Decoder::new(1 << 16);
    let header = loop {
        if let Decoded::Frame { message, consumed } = decoder.decode(&buf)? {
            buf.drain(..consumed);
            break message;
        }
        match recv.read(&mut chunk).await? {
            Some(n) => buf.extend_from_slice(&chunk[..n]),
            None => anyhow::bail!("no answer to the fetch"),
        }
    };
    let Message::ModelData(data) = header else {
        anyhow::bail!("the hub answered {}", header.kind());
    };
    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
    let mut got = buf.len() as u64;
    digest.update(&buf);
    while got < data.len {
        match recv.read_chunk(usize::MAX, true).await? {
            Some(chunk) => {
                digest.update(&chunk.bytes);
                got += chunk.bytes.len() as u64;
            }
            None => break,
        }
    }
    anyhow::ensure!(got == m.size, "{got} bytes of {}", m.size);
    let sha = hex(digest.finish().as_ref());
    anyhow::ensure!(sha == m.sha256, "digest mismatch");
    version.store(m.version, Ordering::Relaxed);
    Ok(true)
}
