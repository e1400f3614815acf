//! Replicas scaled by the hub from the agents' own forecasts: mosquitto, `cloud-hub serve`
//! with its process backend, three `edge-agent` processes, one of them a slow gateway (its
//! inference thread held to a tenth of a core by a cgroup, so it needs root; without it the
//! test prints why and passes without running).

#![allow(clippy::disallowed_methods)] // the test times the replicas as a user would see them

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use spillway_tests::fleet::{CpuLimit, Gateway};
use spillway_tests::hub::{HubProcess, hub_agent_config};
use spillway_tests::{Broker, require_mosquitto};

const SLO: Duration = Duration::from_millis(500);

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

/// What the hub showed while the burst ran, sampled every 100 ms.
#[derive(Debug, Default)]
struct Watch {
    /// (seconds since the burst started, replicas ready, replicas existing).
    samples: Vec<(f64, u64, u64)>,
}

fn models(hub: &HubProcess) -> (u64, u64) {
    hub.get("/api/v1/models")
        .ok()
        .and_then(|m| {
            let m = m.as_array()?.first()?.clone();
            Some((m["ready"].as_u64()?, m["replicas"].as_u64()?))
        })
        .unwrap_or((0, 0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_scales_replicas_from_zero_and_back_to_zero() -> anyhow::Result<()> {
    let Some(mosquitto) = require_mosquitto() else {
        return Ok(());
    };
    let limit = match CpuLimit::new("spillway-hub-burst", 0.1) {
        Ok(limit) => limit,
        Err(reason) => {
            eprintln!("skipped: a slow gateway cannot be made here: {reason}");
            return Ok(());
        }
    };
    let broker = Broker::shared_or_start(&mosquitto)?;
    let hub = Arc::new(HubProcess::start(&[
        "--model",
        "bearing-cnn",
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
    assert_eq!(models(&hub), (0, 0), "no replica before any demand");

    let offload = format!(
        "[offload]\nmode = \"predictive\"\nslo_ms = {}\n",
        SLO.as_millis()
    );
    let mut gateways = Vec::new();
    let mut states = Vec::new();
    for (name, limited) in [
        ("gw-burst", true),
        ("gw-calm-1", false),
        ("gw-calm-2", false),
    ] {
        let token = hub.enroll(name, 600)?;
        let state = tempfile::tempdir()?;
        let config = hub_agent_config(broker.port(), name, hub.control, state.path(), &offload);
        let gw = Gateway::start(
            broker.port(),
            limited.then_some(&limit),
            name,
            &config,
            &[("SPILLWAY__HUB__TOKEN", token.as_str())],
        )
        .await?;
        gateways.push(gw);
        states.push(state);
    }
    let all_online = {
        let hub = Arc::clone(&hub);
        tokio::task::spawn_blocking(move || {
            hub.wait(secs(20.0), |h| {
                ["gw-burst", "gw-calm-1", "gw-calm-2"]
                    .iter()
                    .all(|n| h.online(n))
            })
        })
        .await?
    };
    assert!(
        all_online.is_some(),
        "agents did not come online:\n{}",
        hub.log()
    );

    let burst = &gateways[0];
    let (mu, warm) = burst.calibrate(40.0, secs(3.0)).await?;
    eprintln!("slow gateway capacity {mu:.0} windows/s");
    assert!(mu > 20.0, "implausible capacity {mu}");
    assert_eq!(
        models(&hub),
        (0, 0),
        "steady load below capacity starts no replica"
    );

    // Watch the hub while the burst runs.
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let hub = Arc::clone(&hub);
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let start = Instant::now();
            let mut watch = Watch::default();
            while !stop.load(Ordering::Relaxed) {
                let (ready, replicas) = models(&hub);
                watch
                    .samples
                    .push((start.elapsed().as_secs_f64(), ready, replicas));
                std::thread::sleep(Duration::from_millis(100));
            }
            watch
        })
    };
    // A ramp the forecaster can see coming: 0.3 μ to 2.5 μ over 8 s, 8 s at 2.5 μ, then calm.
    let mut profile = vec![(0.3 * mu, secs(2.0))];
    for step in 1..=16 {
        profile.push(((0.3 + 2.2 * f64::from(step) / 16.0) * mu, secs(0.5)));
    }
    profile.push((2.5 * mu, secs(8.0)));
    profile.push((0.2 * mu, secs(3.0)));
    let calm = [(20.0, secs(21.0))];
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
    stop.store(true, Ordering::Relaxed);
    let watch = watcher.join().expect("watcher");

    assert_eq!(
        report.missing,
        0,
        "windows without a result; counters {:?}",
        burst.counters()
    );
    assert_eq!(report.duplicates, 0, "windows answered twice");
    assert_eq!(report.wrong, 0, "scores differ from onnxruntime's");
    let first_ready = watch.samples.iter().find(|s| s.1 > 0).map(|s| s.0);
    let peak = watch.samples.iter().map(|s| s.1).max().unwrap_or(0);
    let p99 = report.quantile(0.99);
    eprintln!(
        "sent {}, remote {} ({:.1} %), p50 {:.0} ms, p99 {:.0} ms, over SLO {:.2} %, first replica ready at {first_ready:?} s, peak {peak} ready",
        report.sent,
        report.remote,
        100.0 * report.remote as f64 / report.sent as f64,
        report.quantile(0.5) * 1e3,
        p99 * 1e3,
        100.0 * report.over(SLO)
    );
    let first_ready = first_ready.expect("no replica ever became ready");
    // The ramp passes the gateway's capacity 2 + 8·(0.7/2.2) ≈ 4.5 s in and peaks at 10 s:
    // replicas warmed on the forecast are ready around the crossing, long before the peak.
    assert!(
        first_ready < 6.0,
        "first replica ready only at {first_ready:.1} s"
    );
    assert!(
        report.remote > report.sent / 4,
        "the offload did not flow: {} of {}",
        report.remote,
        report.sent
    );
    assert!(
        p99 < SLO.as_secs_f64(),
        "p99 {:.0} ms over the {} ms SLO",
        p99 * 1e3,
        SLO.as_millis()
    );
    let decisions = hub.get("/api/v1/decisions")?;
    assert!(
        decisions
            .as_array()
            .is_some_and(|d| d.iter().any(|x| x["decision"]["reason"]
                .as_str()
                .is_some_and(|r| r.contains("forecast")))),
        "no decision was taken on the agents' forecast: {decisions}"
    );

    // After the burst: back to zero within the stable window + idle time (+ ticks).
    let back = {
        let hub = Arc::clone(&hub);
        tokio::task::spawn_blocking(move || hub.wait(secs(30.0), |h| models(h) == (0, 0))).await?
    };
    assert!(
        back.is_some(),
        "replicas did not go back to zero: {:?}\n{}",
        models(&hub),
        hub.log()
    );
    Ok(())
}
