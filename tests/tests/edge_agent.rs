//! The edge agent end to end: mosquitto, the `edge-agent` process, independent MQTT clients.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use anyhow::Context;

use protocol::payload::{encode_plain_json, encode_senml_cbor};
use spillway_tests::{
    Agent, Broker, Listener, Publisher, SAMPLE_PERIOD, agent_config, data_topic, free_port,
    reference, require_mosquitto, window_payload as payload,
};

/// The two cores, as the tests of this file share them: a test that asserts latencies takes
/// them alone (`write`); the others, each with an agent of its own, share them (`read`). Run
/// beside another test and its agent, the flooding test's quiet windows waited for a core, not
/// for the queue (quiet p95 10-36 ms against 4-6 ms alone).
static CORES: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// Starts an agent for `gateway` and a listener on its topics, waits until the listener has
/// the agent's status, and connects a publisher.
async fn online(
    port: u16,
    gateway: &str,
    config: &str,
    env: &[(&str, &str)],
) -> anyhow::Result<(Agent, Listener, Publisher)> {
    let agent = Agent::start(config, env)?;
    let listener = Listener::start(port, "test", gateway).await?;
    listener
        .wait_for_status()
        .await
        .with_context(|| format!("gateway {gateway}"))?;
    let publisher = Publisher::connect(port).await?;
    Ok((agent, listener, publisher))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_window_in_every_format_yields_exactly_one_correct_result() -> anyhow::Result<()> {
    let _cores = CORES.read().await;
    let Some(mosquitto) = require_mosquitto() else {
        return Ok(());
    };
    let broker = Broker::shared_or_start(&mosquitto)?;
    let gateway = "gw-all";
    let (_agent, listener, publisher) = online(
        broker.port(),
        gateway,
        &agent_config(broker.port(), gateway, "queue_capacity = 16384"),
        &[],
    )
    .await?;
    let reference = reference("vibration-ae")?;

    const WINDOWS: usize = 10_000;
    const SENSORS: usize = 20;
    let mut expected: HashMap<(String, u64), f32> = HashMap::new();
    for i in 0..WINDOWS {
        let sensor = format!("s{:02}", i % SENSORS);
        let probe = i % reference.windows.len();
        let (ts, bytes) = payload(i, &reference.windows[probe]);
        expected.insert((sensor.clone(), ts as u64), reference.scores[probe]);
        publisher
            .publish(&data_topic(gateway, &sensor), bytes)
            .await?;
    }
    let complete = listener
        .wait_until(Duration::from_secs(120), |c| c.results.len() >= WINDOWS)
        .await;
    // Give duplicates, if any, a moment to show up.
    tokio::time::sleep(Duration::from_millis(500)).await;

    listener.with(|c| {
        assert_eq!(c.unparsable, 0);
        let mut seen: HashMap<(String, u64), usize> = HashMap::new();
        for r in &c.results {
            let key = (r.sensor.clone(), r.ts as u64);
            let want = expected
                .get(&key)
                .unwrap_or_else(|| panic!("result for a window never sent: {key:?}"));
            assert!(
                (r.score - want).abs() <= 1e-4,
                "{key:?}: agent {} vs onnxruntime {want}",
                r.score
            );
            assert_eq!(r.model, "vibration-ae");
            assert_eq!(r.outputs["score"], vec![r.score]);
            *seen.entry(key).or_default() += 1;
        }
        let duplicates: usize = seen.values().filter(|n| **n > 1).count();
        let missing = expected.len() - seen.len();
        assert!(complete && missing == 0, "{missing} windows got no result");
        assert_eq!(duplicates, 0, "windows answered more than once");
    });
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_payloads_and_batched_results_answer_every_window_once() -> anyhow::Result<()> {
    let _cores = CORES.read().await;
    let Some(mosquitto) = require_mosquitto() else {
        return Ok(());
    };
    let broker = Broker::shared_or_start(&mosquitto)?;
    let gateway = "gw-batch";
    let (_agent, listener, publisher) = online(
        broker.port(),
        gateway,
        &agent_config(broker.port(), gateway, "queue_capacity = 16384"),
        &[
            ("SPILLWAY__MQTT__RESULT_BATCH", "16"),
            ("SPILLWAY__MQTT__RESULT_LINGER_MS", "5"),
        ],
    )
    .await?;
    let reference = reference("vibration-ae")?;

    // Each payload carries four back-to-back windows of one sensor, as plain JSON or SenML
    // CBOR; its windows share the payload's time stamp and are told apart by their order.
    const PAYLOADS: usize = 2_000;
    const PER_PAYLOAD: usize = 4;
    const SENSORS: usize = 10;
    let mut expected: HashMap<(String, u64), Vec<f32>> = HashMap::new();
    for p in 0..PAYLOADS {
        let sensor = format!("s{:02}", p % SENSORS);
        let ts = 1_800_000_000.0 + p as f64;
        let probes: Vec<usize> = (0..PER_PAYLOAD)
            .map(|k| (p * PER_PAYLOAD + k) % reference.windows.len())
            .collect();
        let samples: Vec<f32> = probes
            .iter()
            .flat_map(|&i| reference.windows[i].iter().copied())
            .collect();
        let bytes = if p % 2 == 0 {
            encode_plain_json(&samples, ts)
        } else {
            encode_senml_cbor(&samples, ts, SAMPLE_PERIOD)
        };
        let scores = probes.iter().map(|&i| reference.scores[i]).collect();
        expected.insert((sensor.clone(), ts as u64), scores);
        publisher
            .publish(&data_topic(gateway, &sensor), bytes)
            .await?;
    }
    let windows = PAYLOADS * PER_PAYLOAD;
    let complete = listener
        .wait_until(Duration::from_secs(120), |c| c.results.len() >= windows)
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    listener.with(|c| {
        assert_eq!(c.unparsable, 0);
        assert!(complete, "{} of {windows} results arrived", c.results.len());
        assert_eq!(c.results.len(), windows, "windows answered more than once");
        // Results of one payload, in the order the agent numbered its windows.
        let mut got: BTreeMap<(String, u64), Vec<(u64, f32)>> = BTreeMap::new();
        for r in &c.results {
            got.entry((r.sensor.clone(), r.ts as u64))
                .or_default()
                .push((r.id, r.score));
        }
        for (key, want) in &expected {
            let mut results = got.remove(key).unwrap_or_default();
            results.sort_by_key(|(id, _)| *id);
            let scores: Vec<f32> = results.iter().map(|(_, s)| *s).collect();
            assert_eq!(scores.len(), want.len(), "{key:?}: {scores:?}");
            for (s, w) in scores.iter().zip(want) {
                assert!(
                    (s - w).abs() <= 1e-4,
                    "{key:?}: agent {s} vs onnxruntime {w}"
                );
            }
        }
        assert!(
            got.is_empty(),
            "results for windows never sent: {:?}",
            got.keys()
        );
        assert!(
            c.messages * 2 <= windows,
            "{} result messages for {windows} windows: not batched",
            c.messages
        );
        eprintln!("{windows} windows answered in {} messages", c.messages);
    });
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_third_party_client_is_served() -> anyhow::Result<()> {
    let _cores = CORES.read().await;
    let Some(mosquitto) = require_mosquitto() else {
        return Ok(());
    };
    let Some(mosquitto_pub) = ["/usr/bin/mosquitto_pub"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
    else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must have mosquitto_pub"
        );
        eprintln!("SKIPPED: mosquitto_pub is not installed");
        return Ok(());
    };
    let broker = Broker::shared_or_start(&mosquitto)?;
    let gateway = "gw-interop";
    let _agent = Agent::start(&agent_config(broker.port(), gateway, ""), &[])?;
    let listener = Listener::start(broker.port(), "test", gateway).await?;
    listener.wait_for_status().await?;
    let reference = reference("vibration-ae")?;
    // One JSON payload per line, as `mosquitto_pub -l` reads them.
    let lines: String = (0..30)
        .map(|i| {
            let (_, bytes) = payload(i * 3 + (i % 2), &reference.windows[i]);
            String::from_utf8(bytes).expect("JSON is text") + "\n"
        })
        .collect();
    let mut child = std::process::Command::new(mosquitto_pub)
        .args([
            "-p",
            &broker.port().to_string(),
            "-q",
            "1",
            "-l",
            "-t",
            &data_topic(gateway, "pump"),
        ])
        .stdin(std::process::Stdio::piped())
        .spawn()?;
    std::io::Write::write_all(child.stdin.as_mut().expect("stdin"), lines.as_bytes())?;
    drop(child.stdin.take());
    assert!(child.wait()?.success());
    assert!(
        listener
            .wait_until(Duration::from_secs(20), |c| c.results.len() >= 30)
            .await
    );
    listener.with(|c| {
        for r in &c.results {
            let i = ((r.ts - 1_800_000_000.0) as usize) / 3;
            assert!((r.score - reference.scores[i]).abs() <= 1e-4);
        }
    });
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_counted_and_other_sensors_keep_flowing() -> anyhow::Result<()> {
    let _cores = CORES.read().await;
    let Some(mosquitto) = require_mosquitto() else {
        return Ok(());
    };
    let broker = Broker::shared_or_start(&mosquitto)?;
    let gateway = "gw-bad";
    // Sensors are assigned explicitly, so an unlisted one is unknown.
    let config = agent_config(broker.port(), gateway, "max_payload_bytes = 16384").replace(
        "default_model = \"vibration-ae\"",
        "assign = { good1 = \"vibration-ae\", good2 = \"vibration-ae\", bad = \"vibration-ae\" }",
    );
    let (agent, listener, publisher) = online(broker.port(), gateway, &config, &[]).await?;
    let reference = reference("vibration-ae")?;

    let bad_topic = data_topic(gateway, "bad");
    let bad: Vec<(&str, String, Vec<u8>)> = vec![
        (
            "bad_malformed",
            bad_topic.clone(),
            b"{\"values\": [1, 2,".to_vec(),
        ),
        ("bad_malformed", bad_topic.clone(), vec![0xff, 0xfe, 0x00]),
        (
            "bad_sample_count",
            bad_topic.clone(),
            b"{\"values\": []}".to_vec(),
        ),
        (
            "bad_sample_count",
            bad_topic.clone(),
            encode_plain_json(&[0.5; 2000], 0.0),
        ),
        (
            "bad_non_finite",
            bad_topic.clone(),
            encode_senml_cbor(&[1.0, f32::NAN, 2.0], 0.0, 0.1),
        ),
        (
            "bad_non_finite",
            bad_topic.clone(),
            b"{\"values\": [1e39]}".to_vec(),
        ),
        ("bad_too_large", bad_topic.clone(), vec![b' '; 40_000]),
        (
            "bad_unknown_sensor",
            data_topic(gateway, "stranger"),
            encode_plain_json(&[0.1; 128], 0.0),
        ),
    ];
    let rounds = 40;
    let mut want: BTreeMap<&str, u64> = BTreeMap::new();
    for round in 0..rounds {
        // Interleave good windows with every kind of bad input.
        for sensor in ["good1", "good2"] {
            let (_, bytes) = payload(round, &reference.windows[round % reference.windows.len()]);
            publisher
                .publish(&data_topic(gateway, sensor), bytes)
                .await?;
        }
        for (counter, topic, bytes) in &bad {
            publisher.publish(topic, bytes.clone()).await?;
            *want.entry(counter).or_default() += 1;
        }
    }
    let status = listener
        .wait_for_counters(Duration::from_secs(30), |c| {
            want.iter().all(|(k, v)| c.get(*k) == Some(v))
        })
        .await;
    let got = listener.with(|c| c.status.as_ref().map(|s| s.counters.clone()));
    assert!(
        status.is_some(),
        "counters never reached {want:?}; last: {got:?}"
    );
    assert!(
        listener
            .wait_until(Duration::from_secs(20), |c| c.results.len() >= 2 * rounds)
            .await
    );
    listener.with(|c| {
        assert_eq!(
            c.results.len(),
            2 * rounds,
            "exactly the good windows are answered"
        );
        assert!(c.results.iter().all(|r| r.sensor.starts_with("good")));
    });
    let log = agent.log();
    let refusals = log.matches("refused input").count();
    assert!(refusals >= 5, "each kind is logged: {log}");
    assert!(
        refusals < bad.len() * rounds / 2,
        "refusals are rate-limited, got {refusals} lines"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_shed_and_counted_and_memory_stays_bounded() -> anyhow::Result<()> {
    let _cores = CORES.read().await;
    let Some(mosquitto) = require_mosquitto() else {
        return Ok(());
    };
    let broker = Broker::shared_or_start(&mosquitto)?;
    let gateway = "gw-overload";
    // The heavier model on one worker with a short queue: input far faster than inference.
    let config = agent_config(broker.port(), gateway, "queue_capacity = 8")
        .replace("workers = 2", "workers = 1")
        .replace(
            "zoo = \"vibration-ae\"",
            "zoo = \"bearing-cnn\"\nstride = 8",
        );
    let (_agent, listener, publisher) = online(broker.port(), gateway, &config, &[]).await?;
    let reference = reference("bearing-cnn")?;
    // With a stride of 8, each 1,024-sample message completes 128 windows.
    const SENSORS: usize = 4;
    const PER_SENSOR: u64 = 100;
    const WINDOWS: u64 = SENSORS as u64 * (1 + (PER_SENSOR - 1) * 1024 / 8);
    for i in 0..SENSORS * PER_SENSOR as usize {
        let (_, bytes) = payload(i, &reference.windows[i % reference.windows.len()]);
        publisher
            .publish(&data_topic(gateway, &format!("m{}", i % SENSORS)), bytes)
            .await?;
    }
    let status = listener
        .wait_for_counters(Duration::from_secs(60), |c| {
            c["windows_enqueued"] == WINDOWS
                && c["results_published"] + c["windows_shed"] == WINDOWS
        })
        .await;
    let last = listener.with(|c| c.status.as_ref().map(|s| s.counters.clone()));
    let status =
        status.unwrap_or_else(|| panic!("every window is served or shed, and counted: {last:?}"));
    let c = &status.counters;
    assert!(c["windows_shed"] > 0, "overload must shed: {c:?}");
    assert!(
        listener
            .wait_until(Duration::from_secs(10), |l| l.results.len() as u64
                == c["results_published"])
            .await
    );
    assert!(
        status.rss_bytes < 200 << 20,
        "RSS {} bytes under overload",
        status.rss_bytes
    );
    Ok(())
}

/// The `q`-th quantile of `values` (sorted in place).
fn quantile(values: &mut [u64], q: f64) -> u64 {
    values.sort_unstable();
    values[((values.len() - 1) as f64 * q).round() as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_sensor_neither_starves_nor_delays_the_others() -> anyhow::Result<()> {
    let _cores = CORES.write().await;
    let Some(mosquitto) = require_mosquitto() else {
        return Ok(());
    };
    let broker = Broker::shared_or_start(&mosquitto)?;
    let gateway = "gw-flood";
    // One worker; the flooding sensor feeds the CNN 128 windows a message, about twice what
    // the worker serves, while four quiet sensors send one autoencoder window every 50 ms.
    let config = format!(
        "{}\n[sensors.assign]\nflood = \"bearing-cnn\"\n\n[[models]]\nname = \"bearing-cnn\"\nzoo = \"bearing-cnn\"\nstride = 8\n",
        agent_config(broker.port(), gateway, "queue_capacity = 1024")
            .replace("workers = 2", "workers = 1")
    );
    let (_agent, listener, publisher) = online(broker.port(), gateway, &config, &[]).await?;
    let cnn = reference("bearing-cnn")?;
    let ae = reference("vibration-ae")?;
    let publisher = std::sync::Arc::new(publisher);

    let flood = {
        let publisher = std::sync::Arc::clone(&publisher);
        let topic = data_topic(gateway, "flood");
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            for i in 0..400 {
                tick.tick().await;
                let window = &cnn.windows[i % cnn.windows.len()];
                let bytes = encode_senml_cbor(window, i as f64, SAMPLE_PERIOD);
                publisher.publish(&topic, bytes).await?;
            }
            anyhow::Ok(())
        })
    };
    // Let the flood fill the queue first.
    tokio::time::sleep(Duration::from_millis(500)).await;
    const QUIET: usize = 4;
    const ROUNDS: usize = 60;
    let mut expected: HashMap<(String, u64), f32> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    for round in 0..ROUNDS {
        tick.tick().await;
        for q in 0..QUIET {
            let sensor = format!("quiet{q}");
            let probe = (round * QUIET + q) % ae.windows.len();
            let ts = 1_800_000_000.0 + round as f64;
            expected.insert((sensor.clone(), ts as u64), ae.scores[probe]);
            publisher
                .publish(
                    &data_topic(gateway, &sensor),
                    encode_plain_json(&ae.windows[probe], ts),
                )
                .await?;
        }
    }
    flood.await??;
    let quiet_done = listener
        .wait_until(Duration::from_secs(60), |c| {
            c.results.iter().filter(|r| r.sensor != "flood").count() >= expected.len()
        })
        .await;
    let status = listener
        .wait_for_counters(Duration::from_secs(60), |c| {
            c["results_published"] + c["windows_shed"] == c["windows_enqueued"]
                && c["windows_enqueued"] >= 1 + 399 * 128 + expected.len() as u64
        })
        .await
        .context("every window is served or shed")?;
    let c = &status.counters;
    assert!(c["windows_shed"] > 1000, "the flood must overload: {c:?}");
    assert_eq!(
        status.shed_by_sensor,
        BTreeMap::from([("flood".to_owned(), c["windows_shed"])]),
        "the status says whose windows were shed"
    );

    listener.with(|collected| {
        let mut quiet_latency = Vec::new();
        let mut flood_latency = Vec::new();
        let mut seen: HashMap<(String, u64), usize> = HashMap::new();
        for r in &collected.results {
            if r.sensor == "flood" {
                flood_latency.push(r.latency_us);
                continue;
            }
            let key = (r.sensor.clone(), r.ts as u64);
            let want = expected[&key];
            assert!(
                (r.score - want).abs() <= 1e-4,
                "{key:?}: {} vs {want}",
                r.score
            );
            *seen.entry(key).or_default() += 1;
            quiet_latency.push(r.latency_us);
        }
        assert!(
            quiet_done && seen.len() == expected.len() && seen.values().all(|&n| n == 1),
            "every quiet window is answered once: {} of {} answered, shed {}",
            seen.len(),
            expected.len(),
            c["windows_shed"]
        );
        let flood_p50 = quantile(&mut flood_latency, 0.5);
        let quiet_p50 = quantile(&mut quiet_latency, 0.5);
        let quiet_p95 = quantile(&mut quiet_latency, 0.95);
        println!(
            "latency: flood p50 {flood_p50} µs; quiet p50 {quiet_p50} µs, p95 {quiet_p95} µs; \
             {} flood windows shed",
            c["windows_shed"]
        );
        // A quiet window waits for the one being served and its turn in the rotation, not
        // for the flood's backlog of a thousand windows.
        assert!(
            quiet_p95 * 3 < flood_p50,
            "quiet p95 {quiet_p95} µs against flood p50 {flood_p50} µs"
        );
    });
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_work_and_leaves_an_offline_status() -> anyhow::Result<()> {
    let _cores = CORES.read().await;
    let Some(mosquitto) = require_mosquitto() else {
        return Ok(());
    };
    let broker = Broker::shared_or_start(&mosquitto)?;
    let gateway = "gw-stop";
    let config = agent_config(broker.port(), gateway, "queue_capacity = 4096")
        .replace("zoo = \"vibration-ae\"", "zoo = \"bearing-cnn\"");
    let (mut agent, listener, publisher) = online(broker.port(), gateway, &config, &[]).await?;
    let reference = reference("bearing-cnn")?;
    for i in 0..600 {
        let (_, bytes) = payload(i, &reference.windows[i % reference.windows.len()]);
        publisher
            .publish(&data_topic(gateway, "spindle"), bytes)
            .await?;
    }
    // Stop while the queue still holds work.
    listener
        .wait_until(Duration::from_secs(20), |c| c.results.len() >= 20)
        .await;
    assert!(
        agent.terminate(Duration::from_secs(20))?,
        "clean exit; log:\n{}",
        agent.log()
    );
    let status = listener
        .final_status(Duration::from_secs(5))
        .await
        .expect("the retained status says offline after a clean stop");
    let enqueued = status.counters["windows_enqueued"];
    assert!(enqueued > 20 && status.counters["windows_shed"] == 0);
    assert!(
        listener
            .wait_until(Duration::from_secs(5), |c| c.results.len() as u64
                == enqueued)
            .await,
        "every enqueued window was answered before exit: {} of {enqueued}",
        listener.result_count()
    );
    let log = agent.log();
    assert!(log.contains("drained=true"), "{log}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_on_the_gateway_is_reached_over_its_unix_socket() -> anyhow::Result<()> {
    let _cores = CORES.read().await;
    let Some(mosquitto) = require_mosquitto() else {
        return Ok(());
    };
    // A broker of this test's own: the shared one has no socket.
    let broker = Broker::start(&mosquitto)?;
    let gateway = "gw-unix";
    // Nothing listens on the configured port: the results can only come through the socket.
    let config = agent_config(free_port()?, gateway, "");
    let socket = broker.unix_socket();
    let env = [(
        "SPILLWAY__MQTT__UNIX_SOCKET",
        socket.to_str().context("temporary path is UTF-8")?,
    )];
    let (mut agent, listener, publisher) = online(broker.port(), gateway, &config, &env).await?;
    let reference = reference("vibration-ae")?;
    const WINDOWS: usize = 1_000;
    let mut expected = HashMap::new();
    for i in 0..WINDOWS {
        let probe = i % reference.windows.len();
        let (ts, bytes) = payload(i, &reference.windows[probe]);
        expected.insert(ts as u64, reference.scores[probe]);
        publisher
            .publish(&data_topic(gateway, "bearing"), bytes)
            .await?;
    }
    assert!(
        listener
            .wait_until(Duration::from_secs(30), |c| c.results.len() >= WINDOWS)
            .await,
        "{} of {WINDOWS} windows answered; log:\n{}",
        listener.result_count(),
        agent.log()
    );
    listener.with(|c| {
        for r in &c.results {
            let want = expected[&(r.ts as u64)];
            assert!((r.score - want).abs() <= 1e-4, "{} vs {want}", r.score);
        }
    });
    assert!(agent.terminate(Duration::from_secs(10))?);
    let log = agent.log();
    assert!(
        log.contains(&format!("broker=unix:{}", socket.display())),
        "the agent says where it connected: {log}"
    );
    Ok(())
}

/// Reads notifications from systemd's side of the socket (100 ms read timeout) until `want`
/// arrives or `quiet` reads in a row find nothing.
fn wait_for_notice(
    socket: &std::os::unix::net::UnixDatagram,
    seen: &mut Vec<String>,
    want: &str,
    quiet: usize,
) -> bool {
    let mut buf = [0u8; 512];
    let mut empty = 0;
    while empty < quiet {
        match socket.recv(&mut buf) {
            Ok(n) => {
                let notice = String::from_utf8_lossy(&buf[..n]).trim().to_owned();
                seen.push(notice.clone());
                if notice == want {
                    return true;
                }
            }
            Err(_) => empty += 1,
        }
    }
    false
}

#[test]
fn under_systemd_the_agent_says_ready_pings_the_watchdog_and_says_stopping() -> anyhow::Result<()> {
    let _cores = CORES.blocking_read();
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("notify");
    let socket = std::os::unix::net::UnixDatagram::bind(&path)?;
    socket.set_read_timeout(Some(Duration::from_millis(100)))?;
    // No broker listens: readiness is about the agent itself, which retries the broker.
    // (Its status messages then wait for acknowledgements until the drain timeout.)
    let port = spillway_tests::free_port()?;
    let mut agent = Agent::start(
        &agent_config(port, "gw-systemd", "drain_timeout_ms = 1000"),
        &[
            ("NOTIFY_SOCKET", path.to_str().expect("temp path is UTF-8")),
            ("WATCHDOG_USEC", "300000"),
        ],
    )?;
    let mut seen = Vec::new();
    assert!(
        wait_for_notice(&socket, &mut seen, "READY=1", 200),
        "no READY=1; got {seen:?}; log:\n{}",
        agent.log()
    );
    // A 300 ms watchdog wants a ping every 150 ms: expect several within a second.
    seen.clear();
    std::thread::sleep(Duration::from_secs(1));
    socket.set_nonblocking(true)?;
    wait_for_notice(&socket, &mut seen, "", 1);
    socket.set_nonblocking(false)?;
    let pings = seen.iter().filter(|n| *n == "WATCHDOG=1").count();
    assert!(pings >= 4, "{pings} watchdog pings in 1 s: {seen:?}");
    assert!(agent.terminate(Duration::from_secs(20))?, "unclean exit");
    assert!(
        wait_for_notice(&socket, &mut seen, "STOPPING=1", 10),
        "no STOPPING=1; got {seen:?}"
    );
    Ok(())
}
