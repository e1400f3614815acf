//! Model updates end to end: `cloud-hub model publish` and `rollout start` against a hub
//! process, `edge-agent` processes that enrol, download, verify, swap and roll back, and
//! windows flowing through mosquitto the whole time.
//!
//! The later versions are real ONNX files (`tests/fixtures/make_variants.py`): v2 nudges the
//! classifier weights by 0.1 % (scores move by ~1e-3), the "drift" build inverts the score.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use protocol::payload::encode_plain_json;
use spillway_tests::hub::{HubProcess, hub_agent_config, pad_model};
use spillway_tests::{Agent, Broker, Listener, Publisher, reference, require_mosquitto};

const FAST: &[&str] = &[
    "--heartbeat-ms",
    "300",
    "--offline-after-ms",
    "3000",
    "--tick-ms",
    "500",
];
const MODEL: &str = "bearing-cnn";

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

struct Member {
    name: String,
    agent: Agent,
    state: tempfile::TempDir,
    listener: Listener,
}

/// Starts one agent per name; those in `nnef` fetch the NNEF files of updates, as a gateway
/// build without ONNX does.
async fn start_members(
    broker: &Broker,
    hub: &HubProcess,
    names: &[&str],
    nnef: &[&str],
) -> anyhow::Result<Vec<Member>> {
    let mut members = Vec::new();
    for name in names {
        let token = hub.enroll(name, 600)?;
        let state = tempfile::tempdir()?;
        let extra = if nnef.contains(name) {
            "shadow_every = 5\nmodel_format = \"nnef\""
        } else {
            "shadow_every = 5"
        };
        let config = hub_agent_config(broker.port(), name, hub.control, state.path(), extra);
        let agent = Agent::start(&config, &[("SPILLWAY__HUB__TOKEN", &token)])?;
        let listener = Listener::start(broker.port(), "test", name).await?;
        members.push(Member {
            name: name.to_string(),
            agent,
            state,
            listener,
        });
    }
    let online = hub.wait(Duration::from_secs(30), |h| {
        members
            .iter()
            .all(|m| h.model_version(&m.name, MODEL) == Some(1))
    });
    anyhow::ensure!(
        online.is_some(),
        "agents did not report {MODEL}@1; hub log:\n{}\nagent log:\n{}",
        hub.log(),
        members[0].agent.log()
    );
    Ok(members)
}

/// Publishes the reference windows round-robin to every gateway at `rate` windows per second
/// each until `stop`; counts what it sent per gateway.
fn drive(
    publisher: Arc<Publisher>,
    gateways: Vec<String>,
    rate: f64,
    stop: Arc<AtomicBool>,
) -> (
    tokio::task::JoinHandle<anyhow::Result<()>>,
    Arc<HashMap<String, AtomicUsize>>,
) {
    let sent: Arc<HashMap<String, AtomicUsize>> = Arc::new(
        gateways
            .iter()
            .map(|g| (g.clone(), AtomicUsize::new(0)))
            .collect(),
    );
    let counts = Arc::clone(&sent);
    let task = tokio::spawn(async move {
        let reference = reference(MODEL)?;
        let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
        let mut i = 0usize;
        while !stop.load(Ordering::Relaxed) {
            ticker.tick().await;
            let window = &reference.windows[i % reference.windows.len()];
            for g in &gateways {
                let payload = encode_plain_json(window, 1_800_000_000.0 + i as f64);
                publisher
                    .publish(&format!("spillway/test/{g}/s{}/data", i % 2), payload)
                    .await?;
                counts[g].fetch_add(1, Ordering::Relaxed);
            }
            i += 1;
        }
        Ok(())
    });
    (task, sent)
}

fn wait_stage(hub: &HubProcess, id: u64, stage: &str, limit: Duration) -> serde_json::Value {
    hub.wait(limit, |h| {
        h.rollout(id).is_some_and(|r| r["stage"] == stage)
    });
    let r = hub.rollout(id).unwrap_or_default();
    assert_eq!(
        r["stage"],
        stage,
        "rollout {id} did not reach {stage}: {r:#}\nhub log:\n{}",
        hub.log()
    );
    r
}

fn start_rollout(hub: &HubProcess, version: u32, canary: &str, bake: &str) -> anyhow::Result<u64> {
    hub.start_rollout(MODEL, version, canary, bake)
}

fn publish(hub: &HubProcess, file: &Path, version: u32) -> anyhow::Result<String> {
    hub.cli(&[
        "model",
        "publish",
        &file.display().to_string(),
        "--name",
        MODEL,
        "--version",
        &version.to_string(),
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_then_everyone_and_a_drifting_version_goes_back() -> anyhow::Result<()> {
    let Some(mosquitto) = require_mosquitto() else {
        return Ok(());
    };
    let broker = Broker::shared_or_start(&mosquitto)?;
    // One replica always runs, to show it moves to the new version with the agents.
    let mut args = FAST.to_vec();
    args.extend(["--min-replicas", "1"]);
    let hub = HubProcess::start(&args)?;
    let members = start_members(&broker, &hub, &["ro-1", "ro-2", "ro-3"], &["ro-3"]).await?;
    let publisher = Arc::new(Publisher::connect(broker.port()).await?);
    let stop = Arc::new(AtomicBool::new(false));
    let names: Vec<String> = members.iter().map(|m| m.name.clone()).collect();
    let (driver, sent) = drive(
        Arc::clone(&publisher),
        names.clone(),
        40.0,
        Arc::clone(&stop),
    );

    // v2: one canary, a bake, then everyone.
    let out = publish(&hub, &fixture("bearing-cnn-v2.onnx"), 2)?;
    assert!(out.contains("published bearing-cnn v2"), "{out}");
    assert!(hub.cli(&["model", "ls"])?.contains("v2"));
    let id = start_rollout(&hub, 2, "30%", "4s")?;
    let baking = hub.wait(Duration::from_secs(30), |h| {
        h.rollout(id).is_some_and(|r| r["baked_from"].is_i64())
    });
    assert!(
        baking.is_some(),
        "the canary never ran v2; hub log:\n{}",
        hub.log()
    );
    let on_v2 = |h: &HubProcess| {
        names
            .iter()
            .filter(|n| h.model_version(n, MODEL) == Some(2))
            .count()
    };
    assert_eq!(on_v2(&hub), 1, "only the canary runs v2 while it bakes");
    let done = wait_stage(&hub, id, "done", Duration::from_secs(40));
    let canary_v2 = done["canary"][0].as_str().unwrap_or_default().to_owned();
    hub.wait(Duration::from_secs(10), |h| on_v2(h) == 3);
    assert_eq!(on_v2(&hub), 3, "every agent ends on v2");
    let replicas_on = |h: &HubProcess, version: u64| {
        h.get("/api/v1/replicas").ok().is_some_and(|r| {
            r.as_array().is_some_and(|a| {
                !a.is_empty()
                    && a.iter()
                        .all(|x| x["version"] == version && x["state"] == "ready")
            })
        })
    };
    assert!(
        hub.wait(Duration::from_secs(30), |h| replicas_on(h, 2))
            .is_some(),
        "the replicas moved to v2: {:?}",
        hub.get("/api/v1/replicas")
    );

    // v3 drifts: stopped at the canary and rolled back there.
    publish(&hub, &fixture("bearing-cnn-drift.onnx"), 3)?;
    // Only the drift gate is under test here: a loaded machine can slow the canary's p99 past
    // the default ×2 as well, and that gate, checked first, would name another reason.
    let id = hub.start_rollout_with(MODEL, 3, "30%", "60s", &["--max-p99-ratio", "100"])?;
    let stopped = wait_stage(&hub, id, "rolled_back", Duration::from_secs(40));
    let reason = stopped["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("drift") || reason.contains("anomaly decision"),
        "{reason}"
    );
    let canary_v3 = stopped["canary"][0].as_str().unwrap_or_default().to_owned();
    hub.wait(Duration::from_secs(15), |h| on_v2(h) == 3);
    assert_eq!(on_v2(&hub), 3, "the canary went back to v2");
    assert!(replicas_on(&hub, 2), "replicas never saw v3");

    // Windows kept flowing through every swap: each one answered exactly once, none failed.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    driver.await??;
    for m in &members {
        let want = sent[&m.name].load(Ordering::Relaxed);
        let all = m
            .listener
            .wait_until(Duration::from_secs(20), |c| c.results.len() >= want)
            .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (count, versions) = m.listener.with(|c| {
            let mut versions: BTreeMap<u32, usize> = BTreeMap::new();
            for r in &c.results {
                *versions.entry(r.version).or_default() += 1;
            }
            (c.results.len(), versions)
        });
        assert!(
            all && count == want,
            "{}: {want} windows sent, {count} results",
            m.name
        );
        let counters = m
            .listener
            .wait_for_counters(Duration::from_secs(5), |_| true)
            .await
            .map(|s| s.counters)
            .unwrap_or_default();
        assert_eq!(counters.get("inference_errors"), Some(&0), "{}", m.name);
        assert_eq!(counters.get("windows_shed"), Some(&0), "{}", m.name);
        assert!(versions.contains_key(&2), "{}: {versions:?}", m.name);
        if m.name == canary_v3 {
            assert_eq!(counters.get("model_rollbacks"), Some(&1), "{}", m.name);
        } else {
            assert!(
                !versions.contains_key(&3),
                "{} never ran v3: {versions:?}",
                m.name
            );
        }
        // Each fetched the format it asked for: the hub's NNEF conversion for ro-3.
        let kept: Vec<String> = std::fs::read_dir(m.state.path().join("models"))?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect();
        let count = |suffix: &str| kept.iter().filter(|f| f.ends_with(suffix)).count();
        let (wanted, other) = if m.name == "ro-3" {
            (".nnef.tar", ".onnx")
        } else {
            (".onnx", ".nnef.tar")
        };
        assert!(
            count(wanted) >= 1 && count(other) == 0,
            "{}: {kept:?}",
            m.name
        );
        if m.name == canary_v2 || m.name == canary_v3 {
            continue;
        }
        // The previous version stays on disk for rollback; the state survives restarts.
        let installed = std::fs::read_to_string(m.state.path().join("models/installed.json"))?;
        assert!(installed.contains("\"version\": 2"), "{installed}");
    }
    Ok(())
}

/// A rollout does not wait for the next heartbeat: the hub acts on a new rollout at once, and
/// an agent reports a finished install at once. With heartbeats a minute apart, a rollout that
/// waited for them would take a minute or more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_moves_on_as_soon_as_an_install_is_done_not_at_the_next_heartbeat()
-> anyhow::Result<()> {
    let Some(mosquitto) = require_mosquitto() else {
        return Ok(());
    };
    let broker = Broker::shared_or_start(&mosquitto)?;
    let hub = HubProcess::start(&["--heartbeat-ms", "60000", "--offline-after-ms", "300000"])?;
    let members = start_members(&broker, &hub, &["prompt-1", "prompt-2"], &[]).await?;
    publish(&hub, &fixture("bearing-cnn-v2.onnx"), 2)?;
    let id = start_rollout(&hub, 2, "50%", "0s")?;
    wait_stage(&hub, id, "done", Duration::from_secs(30));
    for m in &members {
        assert_eq!(hub.model_version(&m.name, MODEL), Some(2), "{}", m.name);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_updates_are_refused_and_the_old_model_keeps_serving() -> anyhow::Result<()> {
    let Some(mosquitto) = require_mosquitto() else {
        return Ok(());
    };
    let broker = Broker::shared_or_start(&mosquitto)?;
    let hub = HubProcess::start(FAST)?;
    let members = start_members(&broker, &hub, &["bad-1"], &[]).await?;
    let member = &members[0];

    // Corrupted bytes: the stored file no longer matches the signed digest.
    publish(&hub, &fixture("bearing-cnn-v2.onnx"), 2)?;
    let stored = std::fs::read_dir(hub.dir.path().join("models"))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "onnx"))
        .expect("a stored model");
    let mut bytes = std::fs::read(&stored)?;
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&stored, &bytes)?;
    let id = start_rollout(&hub, 2, "100%", "0s")?;
    let r = wait_stage(&hub, id, "rolled_back", Duration::from_secs(30));
    assert!(
        r["reason"].as_str().unwrap_or("").contains("SHA-256"),
        "{r:#}"
    );

    // A manifest signed by another key.
    let other = tempfile::tempdir()?;
    let other_hub = cloud_hub::state::HubDir::new(other.path());
    other_hub.init(
        &[],
        std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
    )?;
    let other_registry = cloud_hub::registry::Registry::open(&other_hub.database())?;
    let v2 = std::fs::read(fixture("bearing-cnn-v2.onnx"))?;
    let forged = cloud_hub::store::publish(
        &other_hub,
        &other_registry,
        &cloud_hub::store::Publication {
            bytes: &v2,
            name: MODEL,
            version: Some(3),
            input_shape: None,
            min_agent_version: "0.1.0",
            now: 1,
        },
    )?;
    std::fs::copy(
        cloud_hub::store::blob_path(&other_hub, &forged.manifest.sha256),
        hub.dir
            .path()
            .join(format!("models/{}.onnx", forged.manifest.sha256)),
    )?;
    cloud_hub::registry::Registry::open(&hub.dir.path().join("fleet.db"))?.add_model(&forged)?;
    let id = start_rollout(&hub, 3, "100%", "0s")?;
    let r = wait_stage(&hub, id, "rolled_back", Duration::from_secs(30));
    assert!(
        r["reason"]
            .as_str()
            .unwrap_or("")
            .contains("not signed by the pinned hub key"),
        "{r:#}"
    );

    // A model whose input does not fit the windows.
    let ae = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/zoo/vibration-ae.onnx");
    hub.cli(&[
        "model",
        "publish",
        &ae.display().to_string(),
        "--name",
        MODEL,
        "--version",
        "4",
        "--input-shape",
        "1,128",
    ])?;
    let id = start_rollout(&hub, 4, "100%", "0s")?;
    let r = wait_stage(&hub, id, "rolled_back", Duration::from_secs(30));
    assert!(
        r["reason"]
            .as_str()
            .unwrap_or("")
            .contains("windows hold 1024"),
        "{r:#}"
    );

    // Through all of it, v1 served every window.
    assert_eq!(hub.model_version(&member.name, MODEL), Some(1));
    let publisher = Publisher::connect(broker.port()).await?;
    let reference = reference(MODEL)?;
    for (i, w) in reference.windows.iter().cycle().take(20).enumerate() {
        publisher
            .publish(
                &format!("spillway/test/{}/s0/data", member.name),
                encode_plain_json(w, 1_800_000_000.0 + i as f64),
            )
            .await?;
    }
    let answered = member
        .listener
        .wait_until(Duration::from_secs(20), |c| c.results.len() >= 20)
        .await;
    assert!(
        answered,
        "{} results; agent log:\n{}",
        member.listener.result_count(),
        member.agent.log()
    );
    member.listener.with(|c| {
        assert!(c.results.iter().all(|r| r.version == 1));
    });
    let counters = member
        .listener
        .wait_for_counters(Duration::from_secs(5), |c| {
            c.get("model_update_failures") == Some(&3)
        })
        .await;
    assert!(
        counters.is_some(),
        "three refusals counted; log:\n{}",
        member.agent.log()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_cut_by_a_hub_restart_resumes_where_it_stopped() -> anyhow::Result<()> {
    let Some(mosquitto) = require_mosquitto() else {
        return Ok(());
    };
    let broker = Broker::shared_or_start(&mosquitto)?;
    // 1 MB/s, so a 3 MB model is still coming when the hub goes down.
    let mut args = FAST.to_vec();
    args.extend(["--download-rate", "1000000"]);
    let mut hub = HubProcess::start(&args)?;
    let mut members = start_members(&broker, &hub, &["dl-1"], &[]).await?;
    let member = &mut members[0];

    // v2 grown to 3 MB, so the download is still running when the hub goes down.
    let bytes = pad_model(std::fs::read(fixture("bearing-cnn-v2.onnx"))?, 3 << 20);
    let big = hub.dir.path().join("big.onnx");
    std::fs::write(&big, &bytes)?;
    publish(&hub, &big, 2)?;
    let id = start_rollout(&hub, 2, "100%", "0s")?;

    let models = member.state.path().join("models");
    let part_size = || {
        std::fs::read_dir(&models)
            .ok()
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .filter(|e| e.path().extension().is_some_and(|x| x == "part"))
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .next()
            .unwrap_or(0)
    };
    let halfway = hub.wait(Duration::from_secs(30), |_| part_size() > 1 << 20);
    assert!(
        halfway.is_some(),
        "the download never started; log:\n{}",
        member.agent.log()
    );
    hub.stop()?;
    // Let the agent write what reached it before the connection closed.
    std::thread::sleep(Duration::from_millis(500));
    let cut_at = part_size();
    hub.restart()?;
    assert!(cut_at < bytes.len() as u64, "the download was still going");

    let done = hub.wait(Duration::from_secs(40), |h| {
        h.model_version(&member.name, MODEL) == Some(2)
    });
    assert!(
        done.is_some(),
        "the agent never reached v2; hub log:\n{}\nagent log:\n{}",
        hub.log(),
        member.agent.log()
    );
    // After the restart the hub sent only what was missing.
    let metrics = hub.get_text("/metrics")?;
    let resent: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("spillway_hub_model_download_bytes_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(u64::MAX);
    assert_eq!(
        resent,
        bytes.len() as u64 - cut_at,
        "bytes sent after the restart"
    );
    let status = member
        .listener
        .wait_for_counters(Duration::from_secs(10), |c| {
            c.get("model_download_resumes") == Some(&1) && c.get("model_updates") == Some(&1)
        })
        .await;
    assert!(status.is_some(), "one resumed download, one update");

    // A restarted agent comes back on v2 from its own disk: nothing is fetched again.
    member.agent.terminate(Duration::from_secs(20))?;
    let config = hub_agent_config(
        broker.port(),
        &member.name,
        hub.control,
        member.state.path(),
        "shadow_every = 5",
    );
    member.agent = Agent::start(&config, &[])?;
    let restarted = member
        .listener
        .wait_for_counters(Duration::from_secs(20), |c| {
            c.get("hub_connects") == Some(&1) && c.get("hub_enrolments") == Some(&0)
        })
        .await
        .map(|s| s.counters)
        .unwrap_or_default();
    assert_eq!(restarted.get("model_updates"), Some(&0), "{restarted:?}");
    assert_eq!(hub.model_version(&member.name, MODEL), Some(2));
    let downloads = hub
        .get_text("/metrics")?
        .lines()
        .find_map(|l| l.strip_prefix("spillway_hub_model_downloads_total "))
        .map(|v| v.trim().to_owned());
    assert_eq!(
        downloads.as_deref(),
        Some("1"),
        "no download after the agent's restart"
    );

    // Aborted: the agent goes back to the config's v1, and stays there across a restart.
    hub.cli(&["rollout", "abort", &id.to_string()])?;
    let back = hub.wait(Duration::from_secs(20), |h| {
        h.model_version(&member.name, MODEL) == Some(1)
    });
    assert!(back.is_some(), "the abort sent the agent back to v1");
    member.agent.terminate(Duration::from_secs(20))?;
    member.agent = Agent::start(&config, &[])?;
    // The new process, connected to the hub (it has rolled nothing back itself).
    let connected = member
        .listener
        .wait_for_counters(Duration::from_secs(20), |c| {
            c.get("hub_connects") == Some(&1) && c.get("model_rollbacks") == Some(&0)
        })
        .await;
    assert!(connected.is_some(), "the agent came back");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        hub.model_version(&member.name, MODEL),
        Some(1),
        "a restart does not bring back the version rolled back from"
    );
    let counters = member
        .listener
        .wait_for_counters(Duration::from_secs(5), |_| true)
        .await
        .map(|s| s.counters)
        .unwrap_or_default();
    assert_eq!(counters.get("model_rollbacks"), Some(&0), "{counters:?}");
    Ok(())
}
