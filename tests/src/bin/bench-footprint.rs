//! Footprint benchmark: how small and how quick the agent is on a gateway.
//!
//! For every `edge-agent` build it finds (`target/{release,gateway,gateway-small}/` and the same under
//! `target/aarch64-unknown-linux-gnu/`, `target/armv7-unknown-linux-gnueabihf/` and
//! `target/x86_64-unknown-linux-musl/`):
//! - the stripped binary size (stripped with the target's own `strip`);
//! - for builds that run here (x86_64), with mosquitto on loopback and the sample model
//!   (`vibration-ae`): time from spawning the process to the first inference result on MQTT
//!   (a retained window waits for it), resident memory idle with the model loaded, and peak
//!   resident memory and the agent's CPU time per window under a steady load of ten 12.8 kHz
//!   vibration sensors (1,000 windows/s).
//!
//! Medians over `--runs` (default 5) starts of each build, builds interleaved so that a noisy
//! neighbour hits them alike. Build first, e.g.
//! `cargo build --release --workspace --bins && cargo build --profile gateway -p edge-agent`
//! (and `cross/footprint.sh` for every target and profile), then `target/release/bench-footprint`.
//! `--also LABEL=PATH` adds another x86_64 build to the memory and start-up table, e.g. one of
//! the `cross/footprint.sh settings` variants. `--symbols PATH` names the unstripped binary
//! whose symbols are summed by crate (default `target/release/edge-agent`), e.g. a gateway
//! build with `--config profile.gateway.strip=false`.

#![allow(clippy::disallowed_methods)] // a benchmark reads the clock

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use protocol::payload::encode_plain_json;
use spillway_tests::{
    Agent, Broker, Listener, Publisher,
    load::{cpu_secs, median, rss_bytes},
    mosquitto_path, reference,
};

/// Gateway targets with the `strip` that reads their binaries.
const TARGETS: [(&str, &str, &str); 4] = [
    ("x86_64", "", "strip"),
    (
        "x86_64, static (musl)",
        "x86_64-unknown-linux-musl",
        "strip",
    ),
    (
        "aarch64",
        "aarch64-unknown-linux-gnu",
        "aarch64-linux-gnu-strip",
    ),
    (
        "armv7",
        "armv7-unknown-linux-gnueabihf",
        "arm-linux-gnueabihf-strip",
    ),
];
const PROFILES: [&str; 3] = ["release", "gateway", "gateway-small"];
const SENSORS: usize = 10;
const RATE: usize = 1_000;
const LOAD_SECS: u64 = 10;

/// What one start of a build measured.
#[derive(Debug, Clone, Copy)]
struct Start {
    first_ms: f64,
    idle_mb: f64,
    loaded_mb: f64,
    /// The agent's CPU time (user + system) per window of the steady load.
    cpu_us: f64,
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let runs = args
        .iter()
        .position(|a| a == "--runs")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(5usize);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));

    println!("### Binary size (stripped)\n");
    println!("| target | release | gateway | gateway-small |");
    println!("| --- | --- | --- | --- |");
    let mut native = Vec::new();
    for (arch, triple, strip) in TARGETS {
        let mut cells = Vec::new();
        for profile in PROFILES {
            let binary = target_dir.join(triple).join(profile).join("edge-agent");
            if !binary.exists() {
                cells.push("not built".to_owned());
                continue;
            }
            cells.push(match stripped_size(&binary, strip) {
                Ok(bytes) => format!("{:.2} MB", bytes as f64 / 1e6),
                Err(e) => format!("({e})"),
            });
            if triple.is_empty() || triple.starts_with("x86_64") {
                native.push((format!("{arch}, {profile}"), binary));
            }
        }
        println!("| {arch} | {} |", cells.join(" | "));
    }
    for pair in args
        .windows(2)
        .filter(|w| w[0] == "--also")
        .map(|w| w[1].as_str())
    {
        let (label, path) = pair
            .split_once('=')
            .with_context(|| format!("--also wants LABEL=PATH, not {pair:?}"))?;
        let binary = PathBuf::from(path);
        anyhow::ensure!(binary.exists(), "{path} does not exist");
        let size = stripped_size(&binary, "strip")?;
        println!("| {label} (stripped) | {:.2} MB | | |", size as f64 / 1e6);
        native.push((label.to_owned(), binary));
    }
    println!(
        "\nGoal: ≤ 8 MB on aarch64. Anchors: a Rust + ONNX Runtime Greengrass sample agent \
         22 MB; KubeEdge edgecore about 70 MB.\n"
    );
    let symbols = args
        .iter()
        .position(|a| a == "--symbols")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir.join("release").join("edge-agent"));
    match crate_sizes(&symbols) {
        Ok(crates) => {
            let total: u64 = crates.iter().map(|(_, size)| size).sum();
            println!(
                "### What {} holds (code and data symbols by crate)\n",
                symbols.display()
            );
            println!("| crate | size | share |");
            println!("| --- | --- | --- |");
            for (name, size) in crates.iter().take(12) {
                println!(
                    "| {name} | {:.2} MB | {:.0} % |",
                    *size as f64 / 1e6,
                    100.0 * *size as f64 / total as f64
                );
            }
            println!(
                "| all {} | {:.2} MB | |\n",
                crates.len(),
                total as f64 / 1e6
            );
        }
        Err(e) => println!("(no symbol table of {symbols:?}: {e})\n"),
    }

    let mosquitto = mosquitto_path().context("mosquitto is needed (apt-get install mosquitto)")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut starts: Vec<Vec<Start>> = vec![Vec::new(); native.len()];
    runtime.block_on(async {
        let broker = Broker::start(&mosquitto)?;
        for run in 0..runs {
            for (i, (label, binary)) in native.iter().enumerate() {
                let start = measure(&broker, binary, &format!("fp-{i}-{run}")).await?;
                eprintln!("{label} run {run}: {start:?}");
                starts[i].push(start);
            }
        }
        anyhow::Ok(())
    })?;

    println!(
        "### Memory and start-up on this x86_64 machine, `vibration-ae` (median of {runs} starts)\n"
    );
    println!(
        "| build | start to first inference (median / slowest) | RSS idle, model loaded | peak RSS at {RATE} windows/s | agent CPU per window |"
    );
    println!("| --- | --- | --- | --- | --- |");
    for ((label, _), runs) in native.iter().zip(&starts) {
        let mut first: Vec<f64> = runs.iter().map(|s| s.first_ms).collect();
        let mut idle: Vec<f64> = runs.iter().map(|s| s.idle_mb).collect();
        let mut loaded: Vec<f64> = runs.iter().map(|s| s.loaded_mb).collect();
        let mut cpu: Vec<f64> = runs.iter().map(|s| s.cpu_us).collect();
        println!(
            "| {label} | {:.0} / {:.0} ms | {:.1} MB | {:.1} MB | {:.0} µs |",
            median(&mut first),
            first.iter().copied().fold(0.0, f64::max),
            median(&mut idle),
            median(&mut loaded),
            median(&mut cpu)
        );
    }
    println!(
        "\nGoals: ≤ 150 ms to first inference, RSS ≤ 20 MB. Anchors: the Greengrass sample agent \
         22 MB RSS; Greengrass nucleus needs ≥ 96 MB of RAM."
    );
    Ok(())
}

/// Strips a copy of `binary` with `strip` and returns its size.
fn stripped_size(binary: &Path, strip: &str) -> anyhow::Result<u64> {
    let copy = tempfile::NamedTempFile::new()?;
    std::fs::copy(binary, copy.path())?;
    let status = Command::new(strip)
        .arg(copy.path())
        .status()
        .with_context(|| format!("no {strip}"))?;
    anyhow::ensure!(status.success(), "{strip} failed");
    Ok(std::fs::metadata(copy.path())?.len())
}

/// Symbol sizes of an unstripped binary summed by the crate that names them (`nm -S -C`;
/// the first `crate::` path in a demangled name), largest first.
fn crate_sizes(binary: &Path) -> anyhow::Result<Vec<(String, u64)>> {
    let out = Command::new("nm")
        .args(["-S", "--size-sort", "-C"])
        .arg(binary)
        .output()
        .context("no nm")?;
    anyhow::ensure!(out.status.success(), "nm failed");
    let mut sizes = std::collections::HashMap::<String, u64>::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let mut fields = line.splitn(4, ' ');
        let (Some(_), Some(size), Some(kind), Some(name)) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if !matches!(kind, "t" | "T" | "r" | "R" | "d" | "D") {
            continue;
        }
        let Ok(size) = u64::from_str_radix(size, 16) else {
            continue;
        };
        *sizes.entry(crate_of(name).to_owned()).or_default() += size;
    }
    let mut sizes: Vec<_> = sizes.into_iter().collect();
    sizes.sort_by_key(|(_, size)| std::cmp::Reverse(*size));
    Ok(sizes)
}

/// The crate a demangled symbol belongs to: the first identifier followed by `::`
/// (`<tract_core::ops::… as …>::eval` → `tract_core`); `?` for C and assembly symbols.
fn crate_of(symbol: &str) -> &str {
    let bytes = symbol.as_bytes();
    let mut start = None;
    for (i, &b) in bytes.iter().enumerate() {
        let ident = b.is_ascii_alphanumeric() || b == b'_';
        match (start, ident) {
            (None, true) if !b.is_ascii_digit() => start = Some(i),
            (Some(s), false) => {
                if symbol[i..].starts_with("::") {
                    return &symbol[s..i];
                }
                start = None;
            }
            _ => {}
        }
    }
    "?"
}

/// One start of `binary`: first inference, idle memory, memory under load.
async fn measure(broker: &Broker, binary: &Path, gateway: &str) -> anyhow::Result<Start> {
    let windows = reference("vibration-ae")?.windows;
    let topic = |sensor: usize| format!("spillway/bench/{gateway}/vib-{sensor}/data");
    let publisher = Publisher::connect(broker.port()).await?;
    let listener = Listener::start(broker.port(), "bench", gateway).await?;
    publisher
        .publish_retained(&topic(0), encode_plain_json(&windows[0], unix_now()))
        .await?;
    // Let the broker store the retained window before the agent subscribes.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let config = format!(
        r#"
[agent]
site = "bench"
gateway = "{gateway}"

[mqtt]
port = {port}

[[models]]
name = "vibration-ae"
zoo = "vibration-ae"

[sensors]
default_model = "vibration-ae"
"#,
        port = broker.port()
    );
    let spawned = unix_now();
    let mut agent = Agent::start_binary(binary, &config, &[])?;
    if !listener
        .wait_until(Duration::from_secs(10), |c| !c.results.is_empty())
        .await
    {
        bail!("no first result; log:\n{}", agent.log());
    }
    let first_ms = listener.with(|c| c.received[0] - spawned) * 1e3;
    publisher.publish_retained(&topic(0), Vec::new()).await?;

    tokio::time::sleep(Duration::from_secs(3)).await;
    let pid = agent.pid().context("agent exited")?;
    let idle_mb = rss_bytes(pid)? as f64 / 1e6;

    let period = Duration::from_secs_f64(SENSORS as f64 / RATE as f64);
    let mut ticks = tokio::time::interval(period);
    let mut loaded_mb = idle_mb;
    let cpu_before = cpu_secs(pid)?;
    let begin = Instant::now();
    let mut sent = 0;
    while begin.elapsed() < Duration::from_secs(LOAD_SECS) {
        ticks.tick().await;
        for sensor in 0..SENSORS {
            let window = &windows[sent % windows.len()];
            publisher
                .publish(&topic(sensor), encode_plain_json(window, unix_now()))
                .await?;
            sent += 1;
        }
        if sent % 100 == 0 {
            loaded_mb = loaded_mb.max(rss_bytes(pid)? as f64 / 1e6);
        }
    }
    // The retained window's result, then one per window of the load.
    if !listener
        .wait_until(Duration::from_secs(10), |c| c.results.len() > sent)
        .await
    {
        bail!("results missing after the load; log:\n{}", agent.log());
    }
    let cpu_us = (cpu_secs(pid)? - cpu_before) / sent as f64 * 1e6;
    anyhow::ensure!(
        agent.terminate(Duration::from_secs(10))?,
        "agent did not stop cleanly"
    );
    Ok(Start {
        first_ms,
        idle_mb,
        loaded_mb,
        cpu_us,
    })
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::crate_of;

    #[test]
    fn a_symbol_belongs_to_the_first_crate_its_name_mentions() {
        assert_eq!(
            crate_of("<tract_core::ops::nn::Softmax as tract_core::ops::EvalOp>::eval"),
            "tract_core"
        );
        assert_eq!(
            crate_of("core::ptr::drop_in_place<quinn_proto::Connection>"),
            "core"
        );
        assert_eq!(
            crate_of("edge_agent::agent::run::{{closure}}"),
            "edge_agent"
        );
        assert_eq!(crate_of("sha256_block_data_order"), "?");
    }
}
