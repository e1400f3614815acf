//! Results delivered at least once through connection faults: a broker restart, a link that
//! goes dark and resets, a broker out of reach across an agent's restart. Real mosquitto
//! (persisting sessions where the test says so), a TCP relay between agent and broker, the
//! `edge-agent` process, independent MQTT clients.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use anyhow::Context;

use spillway_tests::tcp_relay::TcpRelay;
use spillway_tests::{
    Agent, Broker, Collected, Listener, Publisher, agent_config, data_topic, reference,
    require_mosquitto, window_payload as payload,
};

/// Distinct results collected, by sensor and time stamp (a result sent twice counts once).
fn distinct(collected: &Collected) -> u64 {
    collected
        .results
        .iter()
        .map(|r| (r.sensor.clone(), r.ts as u64))
        .collect::<HashSet<_>>()
        .len() as u64
}

/// What a run through a broker restart delivered.
struct ThroughRestart {
    /// (sensor, time stamp) of every window published.
    published: Vec<(String, u64)>,
    /// How many results the listener received, duplicates included.
    received: usize,
    /// The distinct results: (sensor, time stamp) → agent's request id.
    answered: HashMap<(String, u64), u64>,
    /// The agent's counters at its clean stop.
    counters: BTreeMap<String, u64>,
}

/// Streams about 1,000 windows/s to an agent on a persistent mosquitto, restarts the broker
/// cleanly a second into the stream, waits until the agent answers again, publishes 1,000
/// more, then stops the agent and collects everything. The publisher and the listener keep
/// their sessions, so the broker loses nothing of theirs: what is missing is the agent's.
async fn stream_through_a_broker_restart(
    gateway: &str,
    env: &[(&str, &str)],
) -> anyhow::Result<Option<ThroughRestart>> {
    let Some(mosquitto) = require_mosquitto() else {
        return Ok(None);
    };
    let mut broker = Broker::start_persistent(&mosquitto)?;
    let mut agent = Agent::start(
        &agent_config(broker.port(), gateway, "queue_capacity = 4096"),
        env,
    )?;
    let reference = std::sync::Arc::new(reference("vibration-ae")?);
    let listener = Listener::start_persistent(broker.port(), "test", gateway).await?;
    listener.wait_for_status().await?;
    let publisher = std::sync::Arc::new(Publisher::connect_persistent(broker.port()).await?);
    let published = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    // Publishes window `i` (the reference's `window`) for `sensor` and records it.
    let send = {
        let (publisher, reference, published) =
            (publisher.clone(), reference.clone(), published.clone());
        let gateway = gateway.to_owned();
        move |i: usize, sensor: String, window: usize| {
            let (publisher, reference, published) =
                (publisher.clone(), reference.clone(), published.clone());
            let topic = data_topic(&gateway, &sensor);
            async move {
                let (ts, bytes) = payload(i, &reference.windows[window]);
                let _ = publisher.publish(&topic, bytes).await;
                published
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push((sensor, ts as u64));
            }
        }
    };

    // A steady stream of ~1,000 windows/s; the broker restarts a second into it.
    let stream = {
        let send = send.clone();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(Duration::from_millis(1));
            for i in 0..3_000 {
                ticks.tick().await;
                send(i, format!("s{}", i % 5), i % 64).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    broker.restart_cleanly()?;
    stream.await?;

    // Once the agent is back, everything published is answered.
    let mut i = 3_000;
    let before = listener.result_count();
    let back = loop {
        send(i, "probe".into(), 0).await;
        i += 1;
        if listener
            .wait_until(Duration::from_millis(500), |c| c.results.len() > before)
            .await
            || i > 3_040
        {
            break listener.result_count() > before;
        }
    };
    assert!(
        back,
        "the agent did not resubscribe after the restart; log:\n{}",
        agent.log()
    );
    let settled = listener.result_count();
    for j in 0..1_000 {
        send(i + j, "after".into(), j % 64).await;
    }
    assert!(
        listener
            .wait_until(Duration::from_secs(30), |c| c.results.len()
                >= settled + 1_000)
            .await,
        "every window published after the agent is back is answered"
    );

    assert!(agent.terminate(Duration::from_secs(20))?);
    let status = listener
        .final_status(Duration::from_secs(5))
        .await
        .expect("final status");
    let counters = status.counters;
    // Acknowledged by the broker before the agent stopped, so on the listener's queue.
    listener
        .wait_until(Duration::from_secs(10), |c| {
            c.results.len() as u64 >= counters["inferences_ok"]
        })
        .await;
    let published = std::mem::take(
        &mut *published
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    let (received, answered) = listener.with(|c| {
        let answered = c
            .results
            .iter()
            .map(|r| ((r.sensor.clone(), r.ts as u64), r.id))
            .collect::<HashMap<_, _>>();
        (c.results.len(), answered)
    });
    assert!(counters["mqtt_connects"] >= 2, "reconnected: {counters:?}");
    assert!(
        counters["mqtt_subscriptions"] >= 2,
        "resubscribed: {counters:?}"
    );
    assert_eq!(counters["mqtt_subscriptions_refused"], 0, "{counters:?}");
    println!(
        "broker restart mid-stream: {} windows published, {} reached the agent, {} results \
         computed, {} distinct results delivered ({received} with duplicates), {} publishes sent \
         again after the restart",
        published.len(),
        counters["windows_enqueued"],
        counters["inferences_ok"],
        answered.len(),
        counters["mqtt_republished"],
    );
    Ok(Some(ThroughRestart {
        published,
        received,
        answered,
        counters,
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_loses_no_result_the_agent_computed() -> anyhow::Result<()> {
    let Some(run) = stream_through_a_broker_restart("gw-restart", &[]).await? else {
        return Ok(());
    };
    let c = &run.counters;
    assert_eq!(c["windows_shed"] + c["inference_errors"], 0, "{c:?}");
    // Each result the agent computed reached the subscriber, some perhaps twice (a publish
    // whose acknowledgement the restart cut off is sent again).
    assert_eq!(
        run.answered.len() as u64,
        c["inferences_ok"],
        "results computed but never delivered: {c:?}"
    );
    assert!(run.received >= run.answered.len());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_persistent_session_a_broker_restart_loses_no_window() -> anyhow::Result<()> {
    let Some(run) = stream_through_a_broker_restart(
        "gw-restart-kept",
        &[("SPILLWAY__MQTT__PERSISTENT_SESSION", "true")],
    )
    .await?
    else {
        return Ok(());
    };
    // The broker kept the agent's subscription through the restart and queued the windows
    // published before the agent was back: every one is answered.
    let missing: Vec<_> = run
        .published
        .iter()
        .filter(|w| !run.answered.contains_key(*w))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} windows unanswered, e.g. {:?}; counters {:?}",
        missing.len(),
        run.published.len(),
        &missing[..missing.len().min(5)],
        run.counters
    );
    Ok(())
}

/// Windows in the burst of the dark-link and outbox tests.
const BURST: usize = 20_000;

/// Publishes [`BURST`] windows to five sensors of `gateway` at once (more than the agent
/// serves in a few seconds) and waits until its first 500 results are out. Returns the
/// publisher, which may still be sending: dropping it would stop it.
async fn burst_until_first_results(
    port: u16,
    listener: &Listener,
    agent: &Agent,
    gateway: &str,
) -> anyhow::Result<Publisher> {
    let publisher = Publisher::connect(port).await?;
    let reference = reference("vibration-ae")?;
    for i in 0..BURST {
        let (_, bytes) = payload(i, &reference.windows[i % 64]);
        publisher
            .publish(&data_topic(gateway, &format!("s{}", i % 5)), bytes)
            .await?;
    }
    anyhow::ensure!(
        listener
            .wait_until(Duration::from_secs(30), |l| l.results.len() >= 500)
            .await,
        "no results before the fault; log:\n{}",
        agent.log()
    );
    Ok(publisher)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_that_goes_dark_and_drops_loses_no_result() -> anyhow::Result<()> {
    let Some(mosquitto) = require_mosquitto() else {
        return Ok(());
    };
    let broker = Broker::shared_or_start(&mosquitto)?;
    // The agent reaches the broker through the relay; the test's clients do not.
    let relay = TcpRelay::start(([127, 0, 0, 1], broker.port()).into()).await?;
    let gateway = "gw-dark";
    let mut agent = Agent::start(
        &agent_config(relay.port(), gateway, "queue_capacity = 32768"),
        &[],
    )?;
    let listener = Listener::start(broker.port(), "test", gateway).await?;
    listener.wait_for_status().await?;
    // Once the first results of a burst are out, the link goes dark for half a second while
    // the agent works through the rest (its results and the broker's acknowledgements are
    // held), then drops, and the agent connects again.
    let _publisher = burst_until_first_results(broker.port(), &listener, &agent, gateway).await?;
    relay.go_dark();
    tokio::time::sleep(Duration::from_millis(500)).await;
    relay.cut();
    // Done when the agent has answered every window it got.
    let idle = listener
        .wait_for_counters(Duration::from_secs(60), |c| {
            c["mqtt_connects"] >= 2 && c["windows_enqueued"] == c["results_published"]
        })
        .await;
    assert!(
        idle.is_some(),
        "the agent did not come back; log:\n{}",
        agent.log()
    );

    assert!(agent.terminate(Duration::from_secs(20))?);
    let status = listener
        .final_status(Duration::from_secs(5))
        .await
        .expect("final status");
    let c = status.counters;
    listener
        .wait_until(Duration::from_secs(10), |l| {
            distinct(l) >= c["inferences_ok"]
        })
        .await;
    let (received, delivered) = listener.with(|l| (l.results.len(), distinct(l)));
    println!(
        "link dark for 0.5 s, then cut: {BURST} windows published, {} reached the agent, {} results computed, \
         {} publishes sent again on the new connection, {delivered} distinct results delivered \
         ({received} with duplicates)",
        c["windows_enqueued"], c["inferences_ok"], c["mqtt_republished"]
    );
    assert!(c["mqtt_connects"] >= 2, "reconnected: {c:?}");
    // The fault caught publishes in flight, or this test tested nothing.
    assert!(c["mqtt_republished"] > 0, "{c:?}");
    assert_eq!(c["windows_shed"] + c["inference_errors"], 0, "{c:?}");
    assert_eq!(
        delivered, c["inferences_ok"],
        "results computed but never delivered: {c:?}"
    );
    Ok(())
}

/// The counters an agent logs when it stops (`stopped counters={"name": n, ...}`).
fn logged_counters(log: &str) -> BTreeMap<String, u64> {
    let Some(line) = log.lines().rev().find(|l| l.contains("stopped")) else {
        return BTreeMap::new();
    };
    let Some(start) = line.find("counters={") else {
        return BTreeMap::new();
    };
    let rest = &line[start + "counters={".len()..];
    let body = &rest[..rest.find('}').unwrap_or(rest.len())];
    body.split(", ")
        .filter_map(|pair| {
            let (name, value) = pair.split_once(": ")?;
            Some((name.trim_matches('"').to_owned(), value.parse().ok()?))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_wait_in_the_outbox_through_an_outage_and_a_restart() -> anyhow::Result<()> {
    let Some(mosquitto) = require_mosquitto() else {
        return Ok(());
    };
    let broker = Broker::shared_or_start(&mosquitto)?;
    let relay = TcpRelay::start(([127, 0, 0, 1], broker.port()).into()).await?;
    let state = tempfile::tempdir()?;
    let outbox = state.path().join("outbox");
    let outbox_env = outbox.to_str().context("temporary path is UTF-8")?;
    let gateway = "gw-outbox";
    let config = agent_config(
        relay.port(),
        gateway,
        "queue_capacity = 32768\ndrain_timeout_ms = 1000",
    );
    // A small client channel, so the results of the outage go to the outbox as they come,
    // not only what the client holds at the stop.
    let env = [
        ("SPILLWAY__MQTT__OUTBOX_PATH", outbox_env),
        ("SPILLWAY__MQTT__REQUEST_CAPACITY", "16"),
    ];
    let mut first = Agent::start(&config, &env)?;
    let listener = Listener::start(broker.port(), "test", gateway).await?;
    listener.wait_for_status().await?;
    // Once the first results of a burst are out, the broker goes out of the agent's reach,
    // and the agent is stopped before it comes back.
    let _publisher = burst_until_first_results(broker.port(), &listener, &first, gateway).await?;
    relay.go_down();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(first.terminate(Duration::from_secs(60))?);
    let before = logged_counters(&first.log());
    let delivered_before = listener.result_count();

    // The next start, with the broker back, publishes what the first one kept.
    relay.come_up();
    let mut second = Agent::start(&config, &env)?;
    listener
        .wait_until(Duration::from_secs(30), |l| {
            distinct(l) >= before["inferences_ok"]
        })
        .await;
    assert!(second.terminate(Duration::from_secs(20))?);
    let after = listener
        .final_status(Duration::from_secs(5))
        .await
        .expect("final status")
        .counters;
    let (received, delivered) = listener.with(|l| (l.results.len(), distinct(l)));
    println!(
        "outage, stop, start: {} windows reached the first agent, {} results computed, {} \
         delivered before the outage, {} written to the outbox; the next start sent {} from \
         it; {delivered} distinct results delivered ({received} with duplicates)",
        before["windows_enqueued"],
        before["inferences_ok"],
        delivered_before,
        before["outbox_written"],
        after["outbox_sent"],
    );
    // The outage caught results, or this test tested nothing.
    assert!(before["outbox_written"] > 0, "{before:?}");
    assert_eq!(
        before["outbox_dropped"] + before["windows_shed"],
        0,
        "{before:?}"
    );
    assert_eq!(
        delivered, before["inferences_ok"],
        "results computed but never delivered: first {before:?}, second {after:?}"
    );
    Ok(())
}
