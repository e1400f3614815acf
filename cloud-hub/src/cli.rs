//! The `replica` command line, shared by `cloud-hub` and any binary that the hub's process
//! backend may start as a replica (the factory demo is its own replica executable).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args as ClapArgs;
use tokio_util::sync::CancellationToken;

use crate::replica::{ModelSource, Replica, ReplicaConfig};
use crate::tls::TlsFiles;

/// Logs to stderr at `RUST_LOG` (default `info`), coloured only on a terminal.
pub fn logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// `replica`: serve one model to agents over QUIC (mutual TLS against the fleet CA).
#[derive(Debug, ClapArgs)]
pub struct ReplicaArgs {
    /// UDP address to listen on; port 0 picks a free one (printed at start).
    #[arg(long, default_value = "127.0.0.1:4433")]
    pub listen: SocketAddr,
    /// A sample model to serve.
    #[arg(long, conflicts_with = "model", required_unless_present = "model")]
    pub zoo: Option<String>,
    /// An ONNX file to serve.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// The model name agents ask for (default: the zoo name or the file stem).
    #[arg(long)]
    pub name: Option<String>,
    /// Model version reported in responses.
    #[arg(long, default_value_t = 1)]
    pub version: u32,
    /// Input shape, comma-separated, where the model leaves dimensions open.
    #[arg(long, value_delimiter = ',')]
    pub input_shape: Vec<usize>,
    /// Inference threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub workers: usize,
    /// Requests that may wait for a thread.
    #[arg(long, default_value_t = 256)]
    pub queue: usize,
    /// Most queued requests one inference call may serve (1..=256; kept only where it pays).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub max_batch: u16,
    /// Most simultaneous connections.
    #[arg(long, default_value_t = 1024)]
    pub max_connections: usize,
    /// Largest request frame, bytes.
    #[arg(long, default_value_t = protocol::frame::DEFAULT_MAX_FRAME)]
    pub max_frame: usize,
    /// How long a shutdown waits for open requests, ms.
    #[arg(long, default_value_t = 5000)]
    pub drain_ms: u64,
    /// The fleet CA certificate.
    #[arg(long, default_value = "spillway-ca/ca.pem")]
    pub ca: PathBuf,
    /// This replica's certificate.
    #[arg(long, default_value = "spillway-ca/replica.pem")]
    pub cert: PathBuf,
    /// This replica's key.
    #[arg(long, default_value = "spillway-ca/replica.key")]
    pub key: PathBuf,
}

/// Runs a replica until SIGTERM or Ctrl-C.
pub fn replica(args: ReplicaArgs) -> anyhow::Result<()> {
    logs();
    let workers = match args.workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let config = ReplicaConfig {
        listen: args.listen,
        model: match (args.zoo, args.model) {
            (Some(zoo), _) => ModelSource::Zoo(zoo),
            (None, Some(path)) => ModelSource::Path(path),
            (None, None) => anyhow::bail!("say --zoo NAME or --model FILE"),
        },
        name: args.name,
        version: args.version,
        input_shape: (!args.input_shape.is_empty()).then_some(args.input_shape),
        workers,
        queue: args.queue,
        max_batch: usize::from(args.max_batch),
        max_connections: args.max_connections,
        max_frame: args.max_frame,
        drain: Duration::from_millis(args.drain_ms),
        tls: TlsFiles {
            ca: args.ca,
            cert: args.cert,
            key: args.key,
        },
    };
    // One thread moves the packets; inference has threads of its own. Fewer cross-thread
    // wake-ups per request than a multi-threaded runtime.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let replica = Replica::bind(&config)?;
        let addr = replica.local_addr()?;
        // One line on stdout, for scripts and test harnesses that asked for port 0.
        println!("listening on {addr} model {}", replica.model_name());
        tracing::info!(%addr, model = replica.model_name(), workers, "replica serving");
        let shutdown = CancellationToken::new();
        tokio::spawn(stop_on_signal(shutdown.clone()));
        let summary = replica.serve(shutdown).await?;
        tracing::info!(?summary, "replica stopped");
        anyhow::Ok(())
    })
}

/// Cancels `shutdown` on SIGTERM or Ctrl-C.
pub async fn stop_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    shutdown.cancel();
}
