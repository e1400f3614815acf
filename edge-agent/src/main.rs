//! `edge-agent`: parse the command line, load the config, run until SIGINT/SIGTERM.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use edge_agent::AgentConfig;
use tokio_util::sync::CancellationToken;

/// Spillway edge agent: MQTT sensor windows in, ONNX inference results out.
#[derive(Debug, Parser)]
#[command(version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("SPILLWAY_REVISION"), ", ", env!("SPILLWAY_TARGET"), ")"))]
struct Args {
    /// Configuration file (TOML); `SPILLWAY__SECTION__KEY` variables override it.
    #[arg(short, long, default_value = "/etc/spillway/agent.toml")]
    config: PathBuf,
    /// Validate the configuration (and load the models), then exit.
    #[arg(long)]
    check_config: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    let config = AgentConfig::load(&args.config, std::env::vars())
        .with_context(|| format!("loading {:?}", args.config))?;
    if args.check_config {
        edge_agent::serving::ServedModel::load_all(&config)?;
        println!(
            "{}: configuration and models are valid",
            args.config.display()
        );
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
