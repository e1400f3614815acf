//! `cloud-hub fleet ls` and `cloud-hub replicas ls`: tables from a running hub's API.

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
