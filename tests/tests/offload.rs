//! Offload end to end: mosquitto, the `edge-agent` process with its inference thread held to
//! a slow gateway's CPU share, `cloud-hub replica` processes, real QUIC with mutual TLS.
//!
//! These tests need root (a cgroup limits the agent's inference thread); without it they
//! print why and pass without running.

use std::time::Duration;

use spillway_tests::fleet::{Certs, Gateway, ReplicaProcess, Report, Rig, Shaping, UdpRelay};
use spillway_tests::require_mosquitto;

/// The agent's inference thread gets this share of one core.
const CPU_SHARE: f64 = 0.1;
const SLO: Duration = Duration::from_millis(500);

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

/// The tests share two cores: one burst at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Starts a rig, or prints why it cannot and returns `None`.
fn rig(name: &str, replicas: usize) -> anyhow::Result<Option<Rig>> {
    let Some(mosquitto) = require_mosquitto() else {
        return Ok(None);
    };
    match Rig::start(&mosquitto, name, replicas, CPU_SHARE)? {
        Ok(rig) => Ok(Some(rig)),
        Err(reason) => {
            eprintln!("skipped: a slow gateway cannot be made here: {reason}");
            Ok(None)
        }
    }
}

fn assert_every_window_answered_once(report: &Report, gateway: &Gateway) {
    assert_eq!(
        report.missing,
        0,
        "{} of {} windows got no result; listener errors {:?}; counters {:?}; agent log:\n{}",
        report.missing,
        report.sent,
        gateway.listener.with(|c| c.errors.clone()),
        gateway.counters(),
        gateway.agent.log()
    );
    assert_eq!(report.duplicates, 0, "windows answered twice");
    assert_eq!(report.wrong, 0, "scores differ from onnxruntime's");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_spills_to_two_replicas_and_stops_after_it() -> anyhow::Result<()> {
    let _turn = ONE_AT_A_TIME.lock().await;
    let Some(rig) = rig("burst", 2)? else {
        return Ok(());
    };
    let offload = rig
        .certs
        .offload_section("predictive", &rig.replica_addrs(), "");
    let gw = rig.gateway("gw-burst", &offload).await?;
    let (mu, warm) = gw.calibrate(100.0, secs(3.0)).await?;
    eprintln!("local capacity {mu:.0} windows/s");
    assert!(mu > 20.0, "implausible capacity {mu}");
    let mut sent = warm;
    sent.extend(
        gw.drive(&[
            (0.5 * mu, secs(2.0)),
            (3.0 * mu, secs(6.0)),
            (0.3 * mu, secs(3.0)),
        ])
        .await?,
    );
    // Back below the exit threshold (ρ_exit = 0.6, and μ as measured at light load is on the
    // high side): after a short hysteresis, nothing more goes remote.
    tokio::time::sleep(secs(1.5)).await;
    let settled = gw.counters();
    sent.extend(gw.drive(&[(0.3 * mu, secs(4.0))]).await?);
    let report = gw.collect(&sent, secs(60.0)).await;
    assert_every_window_answered_once(&report, &gw);
    eprintln!(
        "{} windows, {} remote, p50 {:.1} ms, p99 {:.1} ms",
        report.sent,
        report.remote,
        report.quantile(0.5) * 1e3,
        report.quantile(0.99) * 1e3
    );
    assert!(
        report.remote as f64 > 0.3 * report.sent as f64,
        "a 3× burst should send well over a third remote; got {} of {}",
        report.remote,
        report.sent
    );
    // After the burst the offload stands down.
    tokio::time::sleep(secs(1.5)).await;
    let end = gw.counters();
    let remote = |c: &std::collections::BTreeMap<String, u64>| {
        c["routed_remote_forecast"] + c["routed_remote_guard"] + c["routed_remote_overflow"]
    };
    let last_phase = 0.3 * mu * 4.0;
    let after = remote(&end) - remote(&settled);
    eprintln!("after the burst: {after} of {last_phase:.0} windows remote");
    assert!(
        (after as f64) < 0.02 * last_phase,
        "still offloading after the burst: {after} windows remote; {end:?}"
    );
    let status = gw
        .listener
        .wait_until(secs(5.0), |c| {
            c.status
                .as_ref()
                .and_then(|s| s.offload.as_ref())
                .is_some_and(|o| !o.spilling)
        })
        .await;
    assert!(status, "the status still says spilling");
    let counters = gw.counters();
    assert!(counters["routed_remote_forecast"] > 0, "{counters:?}");
    assert_eq!(counters["windows_shed"], 0, "{counters:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_mid_burst_costs_no_window() -> anyhow::Result<()> {
    let _turn = ONE_AT_A_TIME.lock().await;
    let Some(mut rig) = rig("kill", 2)? else {
        return Ok(());
    };
    let offload = rig
        .certs
        .offload_section("predictive", &rig.replica_addrs(), "");
    let gw = rig.gateway("gw-kill", &offload).await?;
    let (mu, mut sent) = gw.calibrate(100.0, secs(3.0)).await?;
    sent.extend(gw.drive(&[(3.0 * mu, secs(3.0))]).await?);
    rig.replicas[0].kill();
    sent.extend(
        gw.drive(&[(3.0 * mu, secs(4.0)), (0.5 * mu, secs(3.0))])
            .await?,
    );
    let report = gw.collect(&sent, secs(60.0)).await;
    assert_every_window_answered_once(&report, &gw);
    assert!(report.remote > 0);
    let counters = gw.counters();
    assert_eq!(counters["windows_shed"], 0, "{counters:?}");
    assert!(
        counters["replica_disconnects"] + counters["replica_ejections"] > 0,
        "{counters:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_replica_is_ejected_and_its_work_falls_back_in_time() -> anyhow::Result<()> {
    let _turn = ONE_AT_A_TIME.lock().await;
    let Some(rig) = rig("stall", 2)? else {
        return Ok(());
    };
    let offload = rig
        .certs
        .offload_section("predictive", &rig.replica_addrs(), "");
    let gw = rig.gateway("gw-stall", &offload).await?;
    let (mu, mut sent) = gw.calibrate(100.0, secs(3.0)).await?;
    sent.extend(gw.drive(&[(3.0 * mu, secs(3.0))]).await?);
    rig.replicas[0].stall()?;
    sent.extend(
        gw.drive(&[(3.0 * mu, secs(4.0)), (0.5 * mu, secs(3.0))])
            .await?,
    );
    let report = gw.collect(&sent, secs(60.0)).await;
    rig.replicas[0].resume()?;
    assert_every_window_answered_once(&report, &gw);
    let counters = gw.counters();
    assert!(counters["remote_timeouts"] > 0, "{counters:?}");
    assert!(counters["replica_ejections"] > 0, "{counters:?}");
    assert_eq!(counters["windows_shed"], 0, "{counters:?}");
    eprintln!(
        "stall: p99 {:.0} ms, over SLO {:.2} %",
        report.quantile(0.99) * 1e3,
        report.over(SLO) * 100.0
    );
    assert!(
        report.over(SLO) < 0.05,
        "fallbacks should land inside the deadline: {:.1} % over {SLO:?}",
        report.over(SLO) * 100.0
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offload_works_through_a_slow_lossy_link_and_stands_down_when_it_stops_paying()
-> anyhow::Result<()> {
    let _turn = ONE_AT_A_TIME.lock().await;
    let Some(rig) = rig("relay", 2)? else {
        return Ok(());
    };
    let lossy = Shaping {
        delay_min: Duration::from_millis(10),
        delay_max: Duration::from_millis(25),
        loss: std::env::var("RELAY_LOSS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.01),
    };
    let mut relays = Vec::new();
    for addr in rig.replica_addrs() {
        relays.push(UdpRelay::start(addr, lossy).await?);
    }
    let addrs: Vec<_> = relays.iter().map(UdpRelay::addr).collect();
    let offload = rig.certs.offload_section("predictive", &addrs, "");
    let gw = rig.gateway("gw-relay", &offload).await?;
    let (mu, mut sent) = gw.calibrate(100.0, secs(3.0)).await?;
    sent.extend(
        gw.drive(&[(3.0 * mu, secs(5.0)), (0.5 * mu, secs(3.0))])
            .await?,
    );
    let report = gw.collect(&sent, secs(60.0)).await;
    assert_every_window_answered_once(&report, &gw);
    eprintln!(
        "lossy link: {} of {} remote, p50 {:.0} ms, p99 {:.0} ms, {:.1} % over the SLO",
        report.remote,
        report.sent,
        report.quantile(0.5) * 1e3,
        report.quantile(0.99) * 1e3,
        report.over(SLO) * 100.0
    );
    assert!(
        report.remote as f64 > 0.3 * report.sent as f64,
        "offload should carry the burst over a 20–50 ms, 3 % loss link: {} of {}; {:?}",
        report.remote,
        report.sent,
        gw.counters()
    );
    assert!(
        report.over(SLO) < 0.05,
        "{:.1} % over the SLO; counters {:?}",
        report.over(SLO) * 100.0,
        gw.counters()
    );
    assert_eq!(gw.counters()["windows_shed"], 0);

    // Now the link is slower than the SLO: the cloud no longer pays, and work stays local.
    for relay in &relays {
        relay.set(Shaping {
            delay_min: Duration::from_millis(400),
            delay_max: Duration::from_millis(450),
            loss: 0.0,
        });
    }
    tokio::time::sleep(secs(4.0)).await;
    let before = gw.counters();
    let sent = gw
        .drive(&[(1.5 * mu, secs(4.0)), (0.3 * mu, secs(3.0))])
        .await?;
    let report = gw.collect(&sent, secs(60.0)).await;
    let after = gw.counters();
    assert_eq!(report.duplicates, 0);
    assert_eq!(report.wrong, 0);
    let delta = |k: &str| after[k] - before[k];
    assert!(delta("local_remote_too_slow") > 0, "{after:?}");
    assert!(
        delta("remote_results") < report.sent as u64 / 20,
        "still offloading over a link slower than the SLO: {} remote",
        delta("remote_results")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_without_a_fleet_certificate_are_refused() -> anyhow::Result<()> {
    use protocol::frame::Message;
    let certs = Certs::new()?;
    let replica = ReplicaProcess::start(&certs, "vibration-ae", 1, &[])?;
    let addr = replica.addr();
    let query = |config: quinn::ClientConfig| async move {
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
        endpoint.set_default_client_config(config);
        let conn = tokio::time::timeout(secs(5.0), endpoint.connect(addr, "localhost")?).await??;
        let answer = tokio::time::timeout(
            secs(5.0),
            edge_agent::offload::exchange(&conn, &Message::LoadQuery),
        )
        .await??;
        anyhow::Ok(answer)
    };

    // A fleet member is served.
    let good = edge_agent::offload::client_config(
        &certs.path("ca.pem"),
        &certs.path("agent.pem"),
        &certs.path("agent.key"),
    )?;
    match query(good).await? {
        Message::Load(load) => assert_eq!(load.model, "vibration-ae"),
        other => panic!("expected a load report, got {other:?}"),
    }

    // A certificate from another CA (that trusts our replica's CA) is refused.
    let foreign = Certs::new()?;
    let forged = edge_agent::offload::client_config(
        &certs.path("ca.pem"),
        &foreign.path("agent.pem"),
        &foreign.path("agent.key"),
    )?;
    assert!(
        query(forged).await.is_err(),
        "a foreign certificate was accepted"
    );

    // No certificate at all is refused.
    let mut roots = rustls::RootCertStore::empty();
    {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        for ca in CertificateDer::pem_file_iter(certs.path("ca.pem"))? {
            roots.add(ca?)?;
        }
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![protocol::frame::ALPN.to_vec()];
    let anonymous = quinn::ClientConfig::new(std::sync::Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls)?,
    ));
    assert!(
        query(anonymous).await.is_err(),
        "a client without a certificate was accepted"
    );

    // And an agent that does not trust the replica's CA refuses the replica.
    let distrustful = edge_agent::offload::client_config(
        &foreign.path("ca.pem"),
        &certs.path("agent.pem"),
        &certs.path("agent.key"),
    )?;
    assert!(
        query(distrustful).await.is_err(),
        "a replica from another CA was trusted"
    );
    let log = replica.log();
    assert!(log.contains("handshake failed"), "replica log:\n{log}");
    Ok(())
}

/// Connects to `replica` as an agent of the fleet, from an endpoint of its own (keep it while
/// the connection is used).
async fn connect_as_agent(
    certs: &Certs,
    replica: &ReplicaProcess,
) -> anyhow::Result<(quinn::Endpoint, quinn::Connection)> {
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    endpoint.set_default_client_config(edge_agent::offload::client_config(
        &certs.path("ca.pem"),
        &certs.path("agent.pem"),
        &certs.path("agent.key"),
    )?);
    let conn = endpoint.connect(replica.addr(), "localhost")?.await?;
    Ok((endpoint, conn))
}

/// Asserts that `response` answers request `i` with onnxruntime's score for the reference
/// window the request carried.
fn assert_answers(
    response: &protocol::frame::InferResponse,
    i: usize,
    reference: &spillway_tests::Reference,
) {
    assert_eq!(response.id, protocol::frame::RequestId(i as u64));
    let score = response
        .outputs
        .iter()
        .find(|t| t.name == "score")
        .expect("a score output")
        .data[0];
    let want = reference.scores[i % reference.scores.len()];
    assert!(
        (score - want).abs() <= 1e-4 * want.abs().max(1.0),
        "request {i}: score {score}, onnxruntime says {want}"
    );
}

/// Requests that arrive together share an inference call on the replica, and each still gets
/// the answer for its own window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_served_in_one_call_each_get_their_own_windows_answer() -> anyhow::Result<()> {
    use protocol::frame::{InferRequest, Message, RequestId};
    const REQUESTS: usize = 2_000;
    let _turn = ONE_AT_A_TIME.lock().await;
    let certs = Certs::new()?;
    let replica = ReplicaProcess::start(&certs, "vibration-ae", 1, &["--queue", "4096"])?;
    let reference = spillway_tests::reference("vibration-ae")?;
    let shape: Vec<u32> = models::zoo::VIBRATION_AE
        .input_shape
        .iter()
        .map(|&d| d as u32)
        .collect();

    let (_endpoint, conn) = connect_as_agent(&certs, &replica).await?;
    // All at once, so the replica's single thread finds many waiting each time it looks.
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..REQUESTS {
        let conn = conn.clone();
        let request = Message::InferRequest(InferRequest {
            id: RequestId(i as u64),
            model: "vibration-ae".into(),
            shape: shape.clone(),
            data: reference.windows[i % reference.windows.len()].clone(),
            deadline_ms: 60_000,
        });
        calls.spawn(async move {
            let answer = edge_agent::offload::exchange(&conn, &request).await;
            (i, answer)
        });
    }
    let mut answered = vec![false; REQUESTS];
    while let Some(joined) = calls.join_next().await {
        let (i, answer) = joined?;
        let Message::InferResponse(response) = answer? else {
            panic!("request {i} was not answered with a result");
        };
        assert_answers(&response, i, &reference);
        answered[i] = true;
    }
    assert!(answered.iter().all(|&a| a));
    // The calibration kept batched plans, so the calls above could share them.
    let log = replica.log();
    assert!(
        log.contains("batches=[1, 2"),
        "no batch size paid on this machine:\n{log}"
    );
    Ok(())
}

/// One agent keeping a replica's queue full neither starves another agent nor makes it wait
/// behind its backlog: the replica serves a lane per connection in turn, and when full turns
/// away the agent holding the most.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bursting_agent_neither_starves_nor_delays_another_at_a_replica() -> anyhow::Result<()> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use protocol::frame::{ErrorCode, InferRequest, Message, RequestId};

    /// Requests the bursting agent keeps open: twice the replica's queue.
    const BURST: usize = 512;
    const QUIET: usize = 150;
    let _turn = ONE_AT_A_TIME.lock().await;
    let certs = Certs::new()?;
    let replica = ReplicaProcess::start(
        &certs,
        "bearing-cnn",
        1,
        &["--queue", "256", "--max-batch", "1"],
    )?;
    let reference = Arc::new(spillway_tests::reference("bearing-cnn")?);
    let shape: Vec<u32> = models::zoo::BEARING_CNN
        .input_shape
        .iter()
        .map(|&d| d as u32)
        .collect();
    let request = {
        let reference = Arc::clone(&reference);
        move |i: usize| {
            Message::InferRequest(InferRequest {
                id: RequestId(i as u64),
                model: "bearing-cnn".into(),
                shape: shape.clone(),
                data: reference.windows[i % reference.windows.len()].clone(),
                deadline_ms: 60_000,
            })
        }
    };
    // Two agents: a connection each, from endpoints of their own.
    let (_burst_endpoint, burst_conn) = connect_as_agent(&certs, &replica).await?;
    let (_quiet_endpoint, quiet_conn) = connect_as_agent(&certs, &replica).await?;

    // Waits are the replica's own (`server_time_us`: arrival to answer), free of this test
    // client's scheduling, which the burst's tasks crowd.
    let waited =
        |response: &protocol::frame::InferResponse| Duration::from_micros(response.server_time_us);
    // The bursting agent: every request answered or turned away is sent again, after a
    // pause when turned away (its agent would run that window itself).
    let stop = Arc::new(AtomicBool::new(false));
    let mut burst = tokio::task::JoinSet::new();
    for task in 0..BURST {
        let (conn, stop, request) = (burst_conn.clone(), Arc::clone(&stop), request.clone());
        burst.spawn(async move {
            let (mut served, mut refused) = (Vec::new(), 0u64);
            let mut i = task;
            while !stop.load(Ordering::Relaxed) {
                match edge_agent::offload::exchange(&conn, &request(i)).await {
                    Ok(Message::InferResponse(response)) => served.push(waited(&response)),
                    Ok(Message::Error(e)) if e.code == ErrorCode::Overloaded => {
                        refused += 1;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    other => panic!("bursting agent's request {i}: {other:?}"),
                }
                i += BURST;
            }
            (served, refused)
        });
    }
    // Let the burst fill the queue, then the quiet agent sends one request every 10 ms.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut quiet = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    for i in 0..QUIET {
        tick.tick().await;
        let answer = edge_agent::offload::exchange(&quiet_conn, &request(i)).await?;
        let Message::InferResponse(response) = answer else {
            panic!("the quiet agent's request {i} was not served: {answer:?}");
        };
        assert_answers(&response, i, &reference);
        quiet.push(waited(&response));
    }
    stop.store(true, Ordering::Relaxed);
    let (mut burst_served, mut burst_refused) = (Vec::new(), 0);
    while let Some(joined) = burst.join_next().await {
        let (served, refused) = joined?;
        burst_served.extend(served);
        burst_refused += refused;
    }

    let pct = |v: &mut Vec<Duration>, p: f64| {
        v.sort();
        v[((v.len() - 1) as f64 * p) as usize]
    };
    let quiet_p95 = pct(&mut quiet, 0.95);
    let quiet_p50 = pct(&mut quiet, 0.5);
    let burst_p50 = pct(&mut burst_served, 0.5);
    eprintln!(
        "quiet agent: {} of {QUIET} served, p50 {quiet_p50:?}, p95 {quiet_p95:?}; bursting \
         agent: {} served (p50 {burst_p50:?}), {burst_refused} turned away",
        quiet.len(),
        burst_served.len()
    );
    // The queue was full: the bursting agent was turned away, and often.
    assert!(
        burst_refused > BURST as u64,
        "the burst never filled the queue"
    );
    // The quiet agent's requests waited behind a few of the burst's, not behind its backlog.
    assert!(
        quiet_p95 * 3 < burst_p50,
        "quiet agent's p95 {quiet_p95:?} against the bursting agent's median {burst_p50:?}"
    );
    Ok(())
}
