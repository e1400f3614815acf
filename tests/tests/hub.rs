//! The hub end to end: `cloud-hub serve`, `edge-agent` processes that enrol and report to it,
//! mosquitto, the HTTP API, the metrics (checked by promtool) and the dashboard (loaded in
//! headless Chromium). Tools that are not installed are skipped with a printed reason.

use std::process::Command;
use std::time::Duration;

use spillway_tests::hub::{HubProcess, hub_agent_config};
use spillway_tests::{Agent, Broker, require_mosquitto, workspace_binary};

const FAST: &[&str] = &[
    "--heartbeat-ms",
    "300",
    "--offline-after-ms",
    "1200",
    "--tick-ms",
    "500",
];

struct Member {
    agent: Agent,
    state: tempfile::TempDir,
}

fn start_agent(
    broker: &Broker,
    hub: &HubProcess,
    name: &str,
    token: Option<&str>,
    state: Option<tempfile::TempDir>,
) -> anyhow::Result<Member> {
    let state = match state {
        Some(s) => s,
        None => tempfile::tempdir()?,
    };
    let config = hub_agent_config(broker.port(), name, hub.control, state.path(), "");
    let env: Vec<(&str, &str)> = token
        .map(|t| vec![("SPILLWAY__HUB__TOKEN", t)])
        .unwrap_or_default();
    Ok(Member {
        agent: Agent::start(&config, &env)?,
        state,
    })
}

#[test]
fn agents_enrol_report_and_go_offline_when_silent() -> anyhow::Result<()> {
    let Some(mosquitto) = require_mosquitto() else {
        return Ok(());
    };
    let broker = Broker::shared_or_start(&mosquitto)?;
    let hub = HubProcess::start(FAST)?;
    let mut members = Vec::new();
    for name in ["gw-1", "gw-2", "gw-3"] {
        let token = hub.enroll(name, 600)?;
        members.push((name, start_agent(&broker, &hub, name, Some(&token), None)?));
    }
    let all_online = hub.wait(Duration::from_secs(20), |h| {
        members.iter().all(|(name, _)| h.online(name))
    });
    assert!(
        all_online.is_some(),
        "agents did not come online; hub log:\n{}\nagent log:\n{}",
        hub.log(),
        members[0].1.agent.log()
    );
    for (name, member) in &members {
        let view = hub.agent(name).expect("known");
        assert_eq!(view["site"], "test");
        assert_eq!(view["models"], "bearing-cnn@1");
        assert!(view["enrolled_at"].is_i64(), "{view}");
        assert!(
            view["load"]["capacity"].as_f64().unwrap_or(0.0) > 0.0,
            "{view}"
        );
        let key = member.state.path().join("agent.key");
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key)?.permissions());
        assert_eq!(mode & 0o777, 0o600, "the agent's key is private");
    }
    // The operator's view from the command line.
    let out = Command::new(workspace_binary("cloud-hub")?)
        .args(["fleet", "ls", "--hub", &hub.http])
        .output()?;
    let table = String::from_utf8(out.stdout)?;
    for (name, _) in &members {
        assert!(
            table
                .lines()
                .any(|l| l.starts_with(name) && l.contains("online")),
            "{table}"
        );
    }

    // gw-2 vanishes without a word: offline within the configured 1.2 s (plus a sweep).
    let (_, gone) = members.remove(1);
    let state = gone.state;
    drop(gone.agent);
    let took = hub.wait(Duration::from_secs(10), |h| !h.online("gw-2"));
    let took = took.expect("gw-2 never went offline");
    assert!(took < Duration::from_secs(3), "offline after {took:?}");
    assert!(hub.online("gw-1") && hub.online("gw-3"));
    // It comes back with the certificate it stored, no token needed.
    let back = start_agent(&broker, &hub, "gw-2", None, Some(state))?;
    assert!(
        hub.wait(Duration::from_secs(20), |h| h.online("gw-2"))
            .is_some(),
        "gw-2 did not come back; log:\n{}",
        back.agent.log()
    );
    let metrics = hub.get_text("/metrics")?;
    assert!(
        metrics.contains("spillway_hub_agents_online 3"),
        "{metrics}"
    );
    assert!(
        metrics.contains("spillway_hub_agents_went_offline_total 1"),
        "{metrics}"
    );

    // gw-3 stops as asked: it says goodbye, which is neither a bad frame nor an error.
    let (_, mut stopping) = members.pop().expect("gw-3");
    assert!(stopping.agent.terminate(Duration::from_secs(10))?);
    assert!(
        hub.wait(Duration::from_secs(5), |h| !h.online("gw-3"))
            .is_some(),
        "gw-3 still online after stopping"
    );
    let metrics = hub.get_text("/metrics")?;
    assert_eq!(metric(&metrics, "spillway_hub_bad_frames_total"), 0.0);
    let log = hub.log();
    assert!(!log.contains("session ended"), "hub log:\n{log}");
    Ok(())
}

#[test]
fn enrolment_refuses_forged_expired_reused_tokens_and_foreign_certificates() -> anyhow::Result<()> {
    let Some(mosquitto) = require_mosquitto() else {
        return Ok(());
    };
    let broker = Broker::shared_or_start(&mosquitto)?;
    let hub = HubProcess::start(FAST)?;
    let good = hub.enroll("gw-ok", 600)?;
    let (_, pin) = good.split_once('.').expect("SECRET.PIN");

    let ok = start_agent(&broker, &hub, "gw-ok", Some(&good), None)?;
    assert!(
        hub.wait(Duration::from_secs(20), |h| h.online("gw-ok"))
            .is_some()
    );

    // Forged: a secret the hub never issued, with the right pin.
    let forged = format!("{}.{pin}", "ab".repeat(24));
    let f = start_agent(&broker, &hub, "gw-forged", Some(&forged), None)?;
    // Reused: gw-ok's token a second time.
    let r = start_agent(&broker, &hub, "gw-reused", Some(&good), None)?;
    // Expired: valid for no time at all.
    let expired = hub.enroll("gw-expired", 0)?;
    let e = start_agent(&broker, &hub, "gw-expired", Some(&expired), None)?;
    // A hub whose CA is not the one the token pins (a man in the middle, say).
    let real = hub.enroll("gw-pinned", 600)?;
    let (secret, _) = real.split_once('.').expect("SECRET.PIN");
    let wrong_pin = format!("{secret}.{}", "00".repeat(32));
    let p = start_agent(&broker, &hub, "gw-pinned", Some(&wrong_pin), None)?;
    // A certificate from another CA.
    let foreign = foreign_identity(&hub, "gw-foreign")?;
    let x = start_agent(&broker, &hub, "gw-foreign", None, Some(foreign))?;

    let refused = |m: &Member, needle: &str| {
        hub.wait(Duration::from_secs(15), |_| m.agent.log().contains(needle))
            .is_some()
    };
    assert!(refused(&f, "unknown enrolment token"), "{}", f.agent.log());
    assert!(refused(&r, "already used"), "{}", r.agent.log());
    assert!(refused(&e, "expired"), "{}", e.agent.log());
    assert!(refused(&p, "pin"), "{}", p.agent.log());
    assert!(refused(&x, "hub session"), "{}", x.agent.log());
    for (m, name) in [
        (&f, "gw-forged"),
        (&r, "gw-reused"),
        (&e, "gw-expired"),
        (&p, "gw-pinned"),
        (&x, "gw-foreign"),
    ] {
        assert!(!m.state.path().join("agent.pem").exists() || name == "gw-foreign");
        assert!(!hub.online(name), "{name} must not be online");
    }
    let metrics = hub.get_text("/metrics")?;
    for line in [
        "spillway_hub_enrolments_total{result=\"unknown_token\"} 1",
        "spillway_hub_enrolments_total{result=\"used_token\"} 1",
        "spillway_hub_enrolments_total{result=\"expired_token\"} 1",
        "spillway_hub_enrolments_total{result=\"enrolled\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} missing:\n{metrics}");
    }
    let failures = metric(&metrics, "spillway_hub_handshake_failures_total");
    assert!(
        failures >= 1.0,
        "the foreign certificate and the wrong pin fail the handshake:\n{metrics}"
    );
    // The pinned token was never spent: the real hub still accepts it.
    let later = start_agent(&broker, &hub, "gw-pinned", Some(&real), None)?;
    assert!(
        hub.wait(Duration::from_secs(20), |h| h.online("gw-pinned"))
            .is_some(),
        "{}",
        later.agent.log()
    );
    drop(ok);
    Ok(())
}

/// A state folder with a certificate from another CA (and the hub's CA as the root, so only
/// the hub's side can refuse it).
fn foreign_identity(hub: &HubProcess, name: &str) -> anyhow::Result<tempfile::TempDir> {
    let other = tempfile::tempdir()?;
    let state = tempfile::tempdir()?;
    let exe = workspace_binary("cloud-hub")?;
    let dir = other.path().to_str().expect("utf-8");
    for args in [
        vec!["ca", "init", "--dir", dir],
        vec!["ca", "issue", "--dir", dir, "--agent", name],
    ] {
        assert!(Command::new(&exe).args(&args).status()?.success());
    }
    std::fs::copy(
        other.path().join(format!("{name}.pem")),
        state.path().join("agent.pem"),
    )?;
    std::fs::copy(
        other.path().join(format!("{name}.key")),
        state.path().join("agent.key"),
    )?;
    std::fs::copy(hub.dir.path().join("ca.pem"), state.path().join("ca.pem"))?;
    Ok(state)
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(f64::NAN)
}

#[test]
fn a_hub_restart_keeps_the_registry_and_agents_reconnect() -> anyhow::Result<()> {
    let Some(mosquitto) = require_mosquitto() else {
        return Ok(());
    };
    let broker = Broker::shared_or_start(&mosquitto)?;
    let mut hub = HubProcess::start(FAST)?;
    let mut members = Vec::new();
    for name in ["gw-a", "gw-b"] {
        let token = hub.enroll(name, 600)?;
        members.push(start_agent(&broker, &hub, name, Some(&token), None)?);
    }
    assert!(
        hub.wait(Duration::from_secs(20), |h| h.online("gw-a")
            && h.online("gw-b"))
            .is_some()
    );
    let before = hub.get("/api/v1/agents")?;
    hub.restart()?;
    // Straight after the restart the registry answers from disk, before anyone reconnects.
    let after = hub.get("/api/v1/agents")?;
    let names = |v: &serde_json::Value| -> Vec<(String, i64, i64)> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .map(|x| {
                        (
                            x["name"].as_str().unwrap_or_default().to_owned(),
                            x["first_seen"].as_i64().unwrap_or(0),
                            x["enrolled_at"].as_i64().unwrap_or(0),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(
        names(&before),
        names(&after),
        "the registry survives the restart"
    );
    assert!(
        hub.wait(Duration::from_secs(20), |h| h.online("gw-a")
            && h.online("gw-b"))
            .is_some(),
        "agents did not reconnect; log:\n{}",
        members[0].agent.log()
    );
    let log = members[0].agent.log();
    assert!(log.matches("connected to the hub").count() >= 2, "{log}");
    Ok(())
}

#[test]
fn the_dashboard_shows_a_registered_agent_and_the_metrics_pass_promtool() -> anyhow::Result<()> {
    let Some(mosquitto) = require_mosquitto() else {
        return Ok(());
    };
    let broker = Broker::shared_or_start(&mosquitto)?;
    let hub = HubProcess::start(FAST)?;
    let token = hub.enroll("gw-dash", 600)?;
    let member = start_agent(&broker, &hub, "gw-dash", Some(&token), None)?;
    assert!(
        hub.wait(Duration::from_secs(20), |h| h.online("gw-dash"))
            .is_some(),
        "{}",
        member.agent.log()
    );
    for path in [
        "/healthz",
        "/api/v1/replicas",
        "/api/v1/models",
        "/api/v1/decisions",
    ] {
        hub.get_text(path)?;
    }
    assert!(
        hub.get("/api/v1/agents/nobody").is_err(),
        "unknown agents are 404"
    );

    let metrics = hub.get_text("/metrics")?;
    match which("promtool") {
        Some(promtool) => {
            let mut child = Command::new(promtool)
                .args(["check", "metrics"])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()?;
            use std::io::Write;
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(metrics.as_bytes())?;
            let out = child.wait_with_output()?;
            assert!(
                out.status.success(),
                "promtool: {}{}\n{metrics}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        None => eprintln!("skipped promtool: not installed (Debian package prometheus)"),
    }

    let Some(chromium) = which("chromium").or_else(|| which("chromium-browser")) else {
        eprintln!("skipped the browser check: chromium is not installed");
        return Ok(());
    };
    let artifacts =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-artifacts");
    std::fs::create_dir_all(&artifacts)?;
    let profile = tempfile::tempdir()?;
    let url = format!("{}/", hub.http);
    let browser = |extra: &[&str]| -> anyhow::Result<std::process::Output> {
        Ok(Command::new(&chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .args(["--virtual-time-budget=5000", "--window-size=1280,1400"])
            .args(extra)
            .arg(&url)
            .output()?)
    };
    let dom = browser(&["--dump-dom"])?;
    let dom_text = String::from_utf8_lossy(&dom.stdout);
    assert!(
        dom_text.contains("gw-dash") && dom_text.contains("online"),
        "the dashboard does not show the agent; chromium said:\n{}\n{dom_text}",
        String::from_utf8_lossy(&dom.stderr)
    );
    let shot = artifacts.join("dashboard.png");
    browser(&[&format!("--screenshot={}", shot.display())])?;
    assert!(
        std::fs::metadata(&shot)
            .map(|m| m.len() > 10_000)
            .unwrap_or(false)
    );
    eprintln!("dashboard screenshot: {}", shot.display());
    Ok(())
}

fn which(name: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}

#[test]
fn a_crashed_replica_is_replaced() -> anyhow::Result<()> {
    let hub = HubProcess::start(&[
        "--model",
        "bearing-cnn",
        "--min-replicas",
        "1",
        "--tick-ms",
        "300",
    ])?;
    let ready = |h: &HubProcess| -> Option<(u64, u64)> {
        let r = h.get("/api/v1/replicas").ok()?;
        let r = r.as_array()?.first()?.clone();
        (r["state"] == "ready")
            .then(|| r["pid"].as_u64())
            .flatten()
            .map(|pid| (pid, 0))
    };
    assert!(
        hub.wait(Duration::from_secs(20), |h| ready(h).is_some())
            .is_some(),
        "min-replicas 1 never got a ready replica:\n{}",
        hub.log()
    );
    let (pid, _) = ready(&hub).expect("ready");
    assert!(
        Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()?
            .success()
    );
    let replaced = hub.wait(Duration::from_secs(20), |h| {
        ready(h).is_some_and(|(p, _)| p != pid)
    });
    assert!(
        replaced.is_some(),
        "the crashed replica was not replaced:\n{}",
        hub.log()
    );
    let models = hub.get("/api/v1/models")?;
    assert_eq!(models[0]["restarts"], 1, "{models}");
    let metrics = hub.get_text("/metrics")?;
    assert!(
        metrics.contains("spillway_hub_replica_restarts_total 1"),
        "{metrics}"
    );
    Ok(())
}
