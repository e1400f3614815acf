//! `cloud-hub fleet ls`, `replicas ls`, `rollout …` and `model ls`: tables from a running
//! hub's API (or its registry), and the requests that change rollouts.

use serde_json::Value;

fn get(hub: &str, path: &str) -> anyhow::Result<Value> {
    let url = format!("{}{path}", hub.trim_end_matches('/'));
    let body = ureq::get(&url)
        .call()
        .map_err(|e| anyhow::anyhow!("GET {url}: {e}"))?
        .body_mut()
        .read_to_string()
        .map_err(|e| anyhow::anyhow!("reading {url}: {e}"))?;
    serde_json::from_str(&body).map_err(|e| anyhow::anyhow!("{url} did not answer JSON: {e}"))
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() => format!("{f:.1}"),
            _ => n.to_string(),
        },
        other => other.to_string(),
    }
}

/// Prints rows as an aligned table.
fn table(header: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    println!("{}", line(header.iter().map(|h| h.to_string()).collect()));
    for row in rows {
        println!("{}", line(row));
    }
}

/// `cloud-hub fleet ls`.
pub fn fleet_ls(hub: &str, json: bool) -> anyhow::Result<()> {
    let agents = get(hub, "/api/v1/agents")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&agents)?);
        return Ok(());
    }
    let rows = agents
        .as_array()
        .map(|a| a.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|a| {
            let load = &a["load"];
            vec![
                cell(&a["name"]),
                cell(&a["site"]),
                if a["online"].as_bool() == Some(true) {
                    "online"
                } else {
                    "offline"
                }
                .into(),
                cell(&load["arrival_rate"]),
                cell(&load["capacity"]),
                cell(&load["forecast"]),
                load["offload_share"]
                    .as_f64()
                    .map_or("-".into(), |s| format!("{:.0}%", s * 100.0)),
                cell(&a["models"]),
                cell(&a["agent_version"]),
            ]
        })
        .collect();
    table(
        &[
            "AGENT",
            "SITE",
            "STATE",
            "ARRIVALS/S",
            "CAPACITY/S",
            "FORECAST/S",
            "OFFLOAD",
            "MODELS",
            "VERSION",
        ],
        rows,
    );
    Ok(())
}

/// `cloud-hub replicas ls`.
pub fn replicas_ls(hub: &str, json: bool) -> anyhow::Result<()> {
    let replicas = get(hub, "/api/v1/replicas")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&replicas)?);
        return Ok(());
    }
    let rows = replicas
        .as_array()
        .map(|a| a.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|r| {
            vec![
                cell(&r["id"]),
                cell(&r["model"]),
                cell(&r["state"]),
                cell(&r["endpoint"]),
                cell(&r["rate"]),
                cell(&r["load"]["in_flight"]),
                cell(&r["startup_secs"]),
            ]
        })
        .collect();
    table(
        &[
            "REPLICA",
            "MODEL",
            "STATE",
            "ENDPOINT",
            "REQ/S",
            "IN FLIGHT",
            "START-UP S",
        ],
        rows,
    );
    Ok(())
}

fn post(hub: &str, path: &str, body: &Value) -> anyhow::Result<Value> {
    let url = format!("{}{path}", hub.trim_end_matches('/'));
    let mut response = ureq::post(&url)
        .config()
        .http_status_as_error(false)
        .build()
        .send_json(body)
        .map_err(|e| anyhow::anyhow!("POST {url}: {e}"))?;
    let status = response.status();
    let text = response
        .body_mut()
        .read_to_string()
        .map_err(|e| anyhow::anyhow!("reading {url}: {e}"))?;
    anyhow::ensure!(status.is_success(), "{}", text.trim());
    serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{url} did not answer JSON: {e}"))
}

/// `10%` or `0.1` as a share.
pub fn parse_share(s: &str) -> anyhow::Result<f64> {
    let share = match s.trim().strip_suffix('%') {
        Some(p) => p.trim().parse::<f64>()? / 100.0,
        None => s.trim().parse::<f64>()?,
    };
    anyhow::ensure!(
        (0.0..=1.0).contains(&share),
        "a share is 0–100 %, not {s:?}"
    );
    Ok(share)
}

/// `300`, `90s`, `5m` or `1h` as seconds.
pub fn parse_secs(s: &str) -> anyhow::Result<f64> {
    let s = s.trim();
    let (number, unit) = match s.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let n: f64 = number
        .parse()
        .map_err(|_| anyhow::anyhow!("{s:?} is not a duration like 90s, 5m or 1h"))?;
    let factor = match unit {
        "ms" => 0.001,
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => anyhow::bail!("{s:?}: the unit is ms, s, m or h"),
    };
    Ok(n * factor)
}

/// `cloud-hub rollout start`.
pub fn rollout_start(hub: &str, ask: &Value) -> anyhow::Result<()> {
    let r = post(hub, "/api/v1/rollouts", ask)?;
    println!(
        "rollout {} started: {} v{}, canary {}",
        cell(&r["id"]),
        cell(&r["model"]),
        cell(&r["version"]),
        r["canary"]
            .as_array()
            .map(|c| c.iter().map(cell).collect::<Vec<_>>().join(", "))
            .unwrap_or_default()
    );
    Ok(())
}

/// `cloud-hub rollout pause|resume|abort`.
pub fn rollout_action(hub: &str, id: u64, action: &str) -> anyhow::Result<()> {
    let r = post(
        hub,
        &format!("/api/v1/rollouts/{id}/{action}"),
        &Value::Null,
    )?;
    println!(
        "rollout {id}: {}{}",
        cell(&r["stage"]),
        if r["paused"] == Value::Bool(true) {
            ", paused"
        } else {
            ""
        }
    );
    Ok(())
}

/// `cloud-hub rollout status`.
pub fn rollout_status(hub: &str, json: bool) -> anyhow::Result<()> {
    let list = get(hub, "/api/v1/rollouts")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    let rows = list
        .as_array()
        .map(|a| {
            a.iter()
                .map(|r| {
                    vec![
                        cell(&r["id"]),
                        cell(&r["model"]),
                        format!("v{}", cell(&r["version"])),
                        format!(
                            "{}{}",
                            cell(&r["stage"]),
                            if r["paused"] == Value::Bool(true) {
                                " (paused)"
                            } else {
                                ""
                            }
                        ),
                        r["canary"].as_array().map_or(0, Vec::len).to_string(),
                        r["reason"].as_str().unwrap_or("-").to_owned(),
                        r["events"]
                            .as_array()
                            .and_then(|e| e.last())
                            .and_then(|e| e[1].as_str())
                            .unwrap_or("-")
                            .to_owned(),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    table(
        &[
            "ID",
            "MODEL",
            "VERSION",
            "STAGE",
            "CANARY",
            "REASON",
            "LAST EVENT",
        ],
        rows,
    );
    Ok(())
}

/// `cloud-hub model ls`.
pub fn print_published(list: &[protocol::manifest::SignedManifest]) {
    let rows = list
        .iter()
        .map(|s| {
            let m = &s.manifest;
            vec![
                m.name.clone(),
                format!("v{}", m.version),
                m.size.to_string(),
                m.sha256[..12.min(m.sha256.len())].to_owned(),
                format!("{:?}", m.input_shape),
                m.min_agent_version.clone(),
            ]
        })
        .collect();
    table(
        &["MODEL", "VERSION", "BYTES", "SHA256", "INPUT", "MIN AGENT"],
        rows,
    );
}
