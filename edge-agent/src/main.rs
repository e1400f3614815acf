//! `edge-agent`: parse the command line, load the config, run until SIGINT/SIGTERM.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use edge_agent::AgentConfig;
use tokio_util::sync::CancellationToken;
use tracing::Level;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Spillway edge agent: MQTT sensor windows in, ONNX inference results out.
#[derive(Debug, Parser)]
#[command(version = concat!(
    env!("CARGO_PKG_VERSION"), " (", env!("SPILLWAY_REVISION"), ", ", env!("SPILLWAY_TARGET"),
    ", reads ", env!("SPILLWAY_FORMATS"), ")"
))]
struct Args {
    /// Configuration file (TOML); `SPILLWAY__SECTION__KEY` variables override it.
    #[arg(short, long, default_value = "/etc/spillway/agent.toml")]
    config: PathBuf,
    /// Validate the configuration (load the models, open the outbox), then exit.
    #[arg(long)]
    check_config: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let (filter, bad_filter) = log_filter(std::env::var("RUST_LOG").ok().as_deref());
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(std::io::stderr().is_terminal())
                .with_writer(std::io::stderr),
        )
        .with(filter)
        .init();
    if let Some(error) = bad_filter {
        tracing::warn!(%error, "RUST_LOG is not a list of target=level directives; logging at info");
    }
    let config = AgentConfig::load(&args.config, std::env::vars())
        .with_context(|| format!("loading {:?}", args.config))?;
    if args.check_config {
        let models = edge_agent::serving::ServedModel::load_all(&config)?;
        println!(
            "{}: configuration and models are valid",
            args.config.display()
        );
        // What the file and the environment came to, as the agent would run it.
        let topics = config.topics();
        println!(
            "broker {} as {}, reading {}",
            config.mqtt.broker(),
            config.client_id(),
            topics.data_filter()
        );
        for m in &models {
            println!(
                "model {} v{}: window {}, stride {}, {:.0} µs a window at load",
                m.name,
                m.version,
                m.window,
                m.stride,
                m.probe_time.as_secs_f64() * 1e6
            );
        }
        // Opening it (creating it if needed) proves this user can write there.
        if let Some(path) = &config.mqtt.outbox_path {
            let (outbox, set_aside) =
                edge_agent::outbox::Outbox::open(path, config.mqtt.outbox_max_bytes)?;
            if let Some(why) = set_aside {
                println!("outbox was unreadable: {why}");
            }
            println!(
                "outbox {}: {} result messages waiting",
                path.display(),
                outbox.len()
            );
        }
        return Ok(());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        tokio::spawn(cancel_on_signal(shutdown.clone()));
        edge_agent::run(config, shutdown).await
    })?;
    Ok(())
}

/// The log filter from `RUST_LOG`: comma-separated `level` and `target=level` directives
/// (`info`, `warn,edge_agent=debug`), `info` when unset. Span and field filters, which need a
/// regular-expression engine the gateway binary does without, are not supported; a value that
/// does not parse yields `info` and the reason.
fn log_filter(value: Option<&str>) -> (Targets, Option<String>) {
    let info = || Targets::new().with_default(Level::INFO);
    match value.map(str::trim) {
        None | Some("") => (info(), None),
        Some(value) => match value.parse::<Targets>() {
            Ok(targets) => (targets, None),
            Err(error) => (info(), Some(error.to_string())),
        },
    }
}

async fn cancel_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = int.recv() => tracing::info!("SIGINT"),
    }
    shutdown.cancel();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rust_log_sets_levels_per_target_and_a_bad_value_falls_back_to_info() {
        let (filter, bad) = log_filter(Some("warn,edge_agent::offload=debug"));
        assert!(bad.is_none());
        assert!(filter.would_enable("edge_agent::offload", &Level::DEBUG));
        assert!(!filter.would_enable("edge_agent::ingest", &Level::INFO));
        assert!(filter.would_enable("rumqttc", &Level::WARN));

        let (filter, bad) = log_filter(None);
        assert!(bad.is_none());
        assert!(filter.would_enable("edge_agent", &Level::INFO));
        assert!(!filter.would_enable("edge_agent", &Level::DEBUG));

        let (filter, bad) = log_filter(Some("edge_agent=loud"));
        assert!(bad.is_some());
        assert!(filter.would_enable("edge_agent", &Level::INFO));
    }
}
