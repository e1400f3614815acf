//! `cloud-hub`: operator commands.

#![allow(clippy::disallowed_methods)] // times the comparison it reports

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use clap::{Args as ClapArgs, Parser, Subcommand};
use cloud_hub::autoscale::ScalerSettings;
use cloud_hub::ca::{self, Role};
use cloud_hub::hub::HubSettings;
use cloud_hub::replica::ModelSource;
use cloud_hub::replicas::ModelSpec;
use cloud_hub::simulate::{self, PolicyKind, Scenario};
use cloud_hub::state::HubDir;
use models::sim::SimConfig;
use tokio_util::sync::CancellationToken;

/// Spillway cloud hub.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a hub state folder: fleet CA, hub certificates, model-signing key, database.
    Init {
        /// The state folder.
        #[arg(long, default_value = "spillway-hub")]
        dir: PathBuf,
        /// Extra names and addresses agents reach the hub by (repeatable).
        #[arg(long = "host")]
        hosts: Vec<String>,
    },
    /// Run the hub: agent sessions, replicas, API, metrics and dashboard.
    Serve(ServeArgs),
    /// Print a one-time token that enrols an agent (valid for --ttl-secs).
    Enroll {
        /// The state folder.
        #[arg(long, default_value = "spillway-hub")]
        dir: PathBuf,
        /// The agent's name (its gateway name).
        #[arg(long)]
        agent: String,
        /// How long the token stays valid.
        #[arg(long, default_value_t = 86_400)]
        ttl_secs: u64,
    },
    /// The fleet, from a running hub's API.
    Fleet {
        #[command(subcommand)]
        command: ListCommand,
    },
    /// The replicas, from a running hub's API.
    Replicas {
        #[command(subcommand)]
        command: ListCommand,
    },
    /// Published models: publish a version (checked, stored, signed), list, show.
    Model {
        #[command(subcommand)]
        command: ModelCommand,
    },
    /// Roll a published version out (canary, bake, all), watch it, pause, resume, abort.
    Rollout {
        #[command(subcommand)]
        command: RolloutCommand,
    },
    /// The fleet's certificate authority.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Serve one model to agents over QUIC (mutual TLS against the fleet CA).
    Replica(cloud_hub::cli::ReplicaArgs),
    /// Load and run every sample model, and list them.
    Zoo,
    /// Compare scaling policies on synthetic and replayed workloads in the simulator.
    Simulate {
        /// Folder with the shared `*_hourly.csv` series (skipped when absent).
        #[arg(long, default_value = "../shared/data/workloads")]
        data: PathBuf,
        /// Seeds per policy and workload.
        #[arg(long, default_value_t = 5)]
        seeds: u64,
        /// Policies, comma-separated (HPA, KPA, threshold, Q-learning, predictive, clairvoyant).
        #[arg(long, value_delimiter = ',')]
        policies: Vec<String>,
        /// Where the plots go (one SVG per workload).
        #[arg(long, default_value = "target/simulate")]
        out: PathBuf,
        /// A `ts,value` CSV to replay as well (repeatable); named by its file stem.
        #[arg(long)]
        csv: Vec<PathBuf>,
        /// Simulated seconds one row of a `--csv` series lasts.
        #[arg(long, default_value_t = simulate::SECS_PER_ROW)]
        secs_per_row: usize,
        /// Rows of a `--csv` series replayed: the last ones.
        #[arg(long, default_value_t = simulate::ROWS)]
        rows: usize,
        /// Requests per second the largest replayed value becomes.
        #[arg(long, default_value_t = 400.0)]
        peak: f64,
        /// Season of a `--csv` series in rows (0: none).
        #[arg(long, default_value_t = 24)]
        season_rows: usize,
        /// The predictive policy clears a backlog, projected to the end of the warm-up or
        /// waiting, within this many seconds (0: it does not size for the backlog).
        #[arg(long, default_value_t = models::policy::DEFAULT_DRAIN_SECS)]
        drain_secs: f64,
        /// The predictive policy holds the replicas its forecast asks for this many seconds
        /// (0: it follows the forecast down at once).
        #[arg(long, default_value_t = models::policy::DEFAULT_HOLD_SECS)]
        hold_secs: f64,
    },
    /// Score forecasters on the shared series at the replicas' warm-up horizon.
    ForecastEval {
        /// Folder with the shared `*_hourly.csv` series (skipped when absent).
        #[arg(long, default_value = "../shared/data/workloads")]
        data: PathBuf,
        /// A `ts,value` CSV to score as well (repeatable); named by its file stem.
        #[arg(long)]
        csv: Vec<PathBuf>,
        /// Season in rows.
        #[arg(long, default_value_t = 24)]
        season_rows: usize,
        /// Horizon in rows (default: the replicas' warm-up at the replay's seconds per row).
        #[arg(long)]
        horizon: Option<usize>,
        /// Where the plots go (one SVG per series: its last 14 seasons).
        #[arg(long, default_value = "target/forecast-eval")]
        out: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum CaCommand {
    /// Create the CA (`ca.pem`, `ca.key`) in a folder.
    Init {
        /// The CA folder.
        #[arg(long, default_value = "spillway-ca")]
        dir: PathBuf,
        /// The CA's common name.
        #[arg(long, default_value = "Spillway fleet CA")]
        name: String,
    },
    /// Issue a certificate for an agent (client) or a replica/hub (server).
    Issue {
        /// The CA folder.
        #[arg(long, default_value = "spillway-ca")]
        dir: PathBuf,
        /// Where the certificate and key go (default: the CA folder).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Issue an agent certificate with this name.
        #[arg(long, conflicts_with = "server", required_unless_present = "server")]
        agent: Option<String>,
        /// Issue a server certificate with this name.
        #[arg(long)]
        server: Option<String>,
        /// Host names and addresses of a server (repeatable; default: its name).
        #[arg(long = "host", requires = "server")]
        hosts: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
enum ModelCommand {
    /// Check that the model loads and runs with tract, store it by digest, sign its manifest.
    Publish {
        /// The ONNX file.
        file: PathBuf,
        /// Model name (as agents and replicas call it).
        #[arg(long)]
        name: String,
        /// Version (default: one above the newest published).
        #[arg(long)]
        version: Option<u32>,
        /// Input shape where the model leaves dimensions open, e.g. 1,1,1024.
        #[arg(long, value_delimiter = ',')]
        input_shape: Option<Vec<usize>>,
        /// The oldest agent version that may run it.
        #[arg(long, default_value = env!("CARGO_PKG_VERSION"))]
        min_agent_version: String,
        /// The state folder.
        #[arg(long, default_value = "spillway-hub")]
        dir: PathBuf,
    },
    /// Convert an ONNX file to NNEF, checked as publication checks it (gateway agents built
    /// without ONNX read NNEF; `publish` does this itself).
    Convert {
        /// The ONNX file.
        file: PathBuf,
        /// Input shape where the model leaves dimensions open, e.g. 1,1,1024.
        #[arg(long, value_delimiter = ',')]
        input_shape: Option<Vec<usize>>,
        /// Where to write the NNEF archive (an uncompressed tar).
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Every published version.
    Ls {
        /// The state folder.
        #[arg(long, default_value = "spillway-hub")]
        dir: PathBuf,
    },
    /// One model's versions with their manifests.
    Show {
        /// Model name.
        name: String,
        /// The state folder.
        #[arg(long, default_value = "spillway-hub")]
        dir: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum RolloutCommand {
    /// Start rolling a published version out.
    Start {
        /// Model name.
        model: String,
        /// The version to roll out.
        #[arg(long)]
        version: u32,
        /// Share of the agents that get it first: `10%` or `0.1`.
        #[arg(long, default_value = "10%")]
        canary: String,
        /// How long the canary runs it before everyone gets it: `300`, `90s`, `5m`, `1h`.
        #[arg(long, default_value = "5m")]
        bake: String,
        /// Highest mean absolute score difference from the previous version.
        #[arg(long)]
        max_drift: Option<f32>,
        /// Highest share of windows where the anomaly decision differs.
        #[arg(long)]
        max_flip_share: Option<f64>,
        /// Highest p99 inference time of the new version, as a multiple of the old one's.
        #[arg(long)]
        max_p99_ratio: Option<f64>,
        /// The hub's HTTP address.
        #[arg(long, default_value = "http://127.0.0.1:8080", env = "SPILLWAY_HUB")]
        hub: String,
    },
    /// Every rollout with its stage and events.
    Status {
        /// The hub's HTTP address.
        #[arg(long, default_value = "http://127.0.0.1:8080", env = "SPILLWAY_HUB")]
        hub: String,
        /// Print the API's JSON instead.
        #[arg(long)]
        json: bool,
    },
    /// Hold new updates of rollout ID.
    Pause(RolloutId),
    /// Let rollout ID go on.
    Resume(RolloutId),
    /// Stop rollout ID and send every updated agent back.
    Abort(RolloutId),
}

#[derive(Debug, ClapArgs)]
struct RolloutId {
    /// The rollout's id (`rollout status`).
    id: u64,
    /// The hub's HTTP address.
    #[arg(long, default_value = "http://127.0.0.1:8080", env = "SPILLWAY_HUB")]
    hub: String,
}

#[derive(Debug, Subcommand)]
enum ListCommand {
    /// List as a table.
    Ls {
        /// The hub's HTTP address.
        #[arg(long, default_value = "http://127.0.0.1:8080", env = "SPILLWAY_HUB")]
        hub: String,
        /// Print the API's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, ClapArgs)]
struct ServeArgs {
    /// The state folder (`cloud-hub init`).
    #[arg(long, default_value = "spillway-hub")]
    dir: PathBuf,
    /// UDP address of the agents' control endpoint.
    #[arg(long, default_value = "0.0.0.0:4430")]
    listen: SocketAddr,
    /// TCP address of the API, metrics and dashboard.
    #[arg(long, default_value = "127.0.0.1:8080")]
    http: SocketAddr,
    /// A model served by replicas: a zoo name, or NAME=FILE.onnx (repeatable).
    #[arg(long = "model", default_value = "bearing-cnn")]
    models: Vec<String>,
    /// Fewest replicas per model (0 scales to zero).
    #[arg(long, default_value_t = 0)]
    min_replicas: usize,
    /// Most replicas per model.
    #[arg(long, default_value_t = 8)]
    max_replicas: usize,
    /// The autoscaler's stable window, seconds.
    #[arg(long, default_value_t = 60.0)]
    stable_secs: f64,
    /// Seconds without demand after the stable window before the last replica stops.
    #[arg(long, default_value_t = 30.0)]
    idle_secs: f64,
    /// Requests per second one replica serves until measured.
    #[arg(long, default_value_t = 200.0)]
    replica_capacity: f64,
    /// Inference threads per replica.
    #[arg(long, default_value_t = 1)]
    replica_workers: usize,
    /// `predictive`: replicas for the agents' forecast demand too; `reactive`: for the load
    /// the replicas and the agents see now.
    #[arg(long, default_value = "predictive", value_parser = ["predictive", "reactive"])]
    scaling: String,
    /// Heartbeat period asked of agents, ms.
    #[arg(long, default_value_t = 1000)]
    heartbeat_ms: u32,
    /// An agent silent this long is marked offline, ms.
    #[arg(long, default_value_t = 3000)]
    offline_after_ms: u64,
    /// Most agent connections.
    #[arg(long, default_value_t = 20_000)]
    max_sessions: usize,
    /// The replica manager's tick, ms.
    #[arg(long, default_value_t = 1000)]
    tick_ms: u64,
    /// Model download rate per agent, bytes per second (0: unlimited).
    #[arg(long, default_value_t = 0)]
    download_rate: u64,
    /// Model downloads served at once; more wait their turn.
    #[arg(long, default_value_t = 64)]
    max_downloads: usize,
}

fn main() -> anyhow::Result<()> {
    match Args::parse().command {
        Command::Init { dir, hosts } => {
            let hub = HubDir::new(&dir);
            if hub.init(&hosts, SystemTime::now())? {
                println!("hub state created in {}", dir.display());
            } else {
                println!("hub state in {} already complete", dir.display());
            }
            println!("fleet CA: {}", hub.ca_cert().display());
        }
        Command::Serve(args) => serve(args)?,
        Command::Enroll {
            dir,
            agent,
            ttl_secs,
        } => {
            cloud_hub::ca::check_name(&agent)?;
            let hub = HubDir::new(&dir);
            anyhow::ensure!(
                hub.exists(),
                "{} is not a hub state folder: run `cloud-hub init` first",
                dir.display()
            );
            let registry = cloud_hub::registry::Registry::open(&hub.database())?;
            let now = cloud_hub::replicas::unix_ms();
            let secret = registry.issue_token(&agent, now, now + (ttl_secs * 1000) as i64)?;
            // The agent learns which CA to trust from the token itself.
            println!("{secret}.{}", ca::fingerprint(hub.ca_dir())?);
            eprintln!(
                "one-time token for {agent}, valid {ttl_secs} s: start the agent with [hub] token = \"…\" or SPILLWAY__HUB__TOKEN"
            );
        }
        Command::Fleet {
            command: ListCommand::Ls { hub, json },
        } => cloud_hub::client::fleet_ls(&hub, json)?,
        Command::Replicas {
            command: ListCommand::Ls { hub, json },
        } => cloud_hub::client::replicas_ls(&hub, json)?,
        Command::Model { command } => model(command)?,
        Command::Rollout { command } => match command {
            RolloutCommand::Start {
                model,
                version,
                canary,
                bake,
                max_drift,
                max_flip_share,
                max_p99_ratio,
                hub,
            } => {
                let mut ask = serde_json::json!({
                    "model": model,
                    "version": version,
                    "canary_share": cloud_hub::client::parse_share(&canary)?,
                    "bake_secs": cloud_hub::client::parse_secs(&bake)?,
                });
                if let Some(d) = max_drift {
                    ask["max_drift"] = d.into();
                }
                if let Some(f) = max_flip_share {
                    ask["max_flip_share"] = f.into();
                }
                if let Some(r) = max_p99_ratio {
                    ask["max_p99_ratio"] = r.into();
                }
                cloud_hub::client::rollout_start(&hub, &ask)?;
            }
            RolloutCommand::Status { hub, json } => cloud_hub::client::rollout_status(&hub, json)?,
            RolloutCommand::Pause(r) => cloud_hub::client::rollout_action(&r.hub, r.id, "pause")?,
            RolloutCommand::Resume(r) => {
                cloud_hub::client::rollout_action(&r.hub, r.id, "resume")?;
            }
            RolloutCommand::Abort(r) => cloud_hub::client::rollout_action(&r.hub, r.id, "abort")?,
        },
        Command::Ca { command } => match command {
            CaCommand::Init { dir, name } => {
                let paths = ca::init(&dir, &name, SystemTime::now())?;
                println!("CA certificate: {}", paths.cert.display());
                println!("CA key:         {} (keep it secret)", paths.key.display());
            }
            CaCommand::Issue {
                dir,
                out,
                agent,
                server,
                hosts,
            } => {
                let (name, role) = match (agent, server) {
                    (Some(name), _) => (name, Role::Agent),
                    (None, Some(name)) => (name, Role::Server),
                    (None, None) => anyhow::bail!("say --agent NAME or --server NAME"),
                };
                let out = out.unwrap_or_else(|| dir.clone());
                let paths = ca::issue(&dir, &out, &name, role, &hosts, SystemTime::now())?;
                println!("certificate: {}", paths.cert.display());
                println!("key:         {}", paths.key.display());
            }
        },
        Command::Replica(args) => cloud_hub::cli::replica(args)?,
        Command::Zoo => {
            println!("| model | input shape | outputs | score of a zero window |");
            println!("| --- | --- | --- | --- |");
            for m in cloud_hub::check_zoo()? {
                println!(
                    "| {} | {:?} | {} | {:.5} |",
                    m.name,
                    m.input_shape,
                    m.outputs.join(", "),
                    m.zero_score
                );
            }
        }
        Command::Simulate {
            data,
            seeds,
            policies,
            out,
            csv,
            secs_per_row,
            rows,
            peak,
            season_rows,
            drain_secs,
            hold_secs,
        } => {
            for (flag, secs) in [("--drain-secs", drain_secs), ("--hold-secs", hold_secs)] {
                anyhow::ensure!(
                    secs.is_finite() && secs >= 0.0,
                    "{flag} must be a number of seconds, at least 0"
                );
            }
            let options = simulate::PolicyOptions {
                drain_secs,
                hold_secs,
            };
            let kinds: Vec<PolicyKind> = if policies.is_empty() {
                PolicyKind::ALL.to_vec()
            } else {
                policies
                    .iter()
                    .map(|p| {
                        PolicyKind::parse(p).ok_or_else(|| anyhow::anyhow!("unknown policy {p:?}"))
                    })
                    .collect::<anyhow::Result<_>>()?
            };
            let config = SimConfig::default();
            let mut scenarios: Vec<Scenario> = simulate::synthetic();
            match simulate::shared(&data) {
                Ok(shared) => scenarios.extend(shared),
                Err(e) => eprintln!("shared series skipped: {e:#}"),
            }
            let replay = simulate::Replay {
                secs_per_row,
                rows,
                peak,
                season_rows: (season_rows > 0).then_some(season_rows),
            };
            for path in &csv {
                scenarios.push(simulate::from_csv(
                    path,
                    &simulate::series_name(path),
                    &replay,
                )?);
            }
            let start = Instant::now();
            let synthetic = simulate::run_matrix(&scenarios[..6], &kinds, seeds, &config, &options);
            let synthetic_secs = start.elapsed().as_secs_f64();
            let shared_cells =
                simulate::run_matrix(&scenarios[6..], &kinds, seeds, &config, &options);
            let total_secs = start.elapsed().as_secs_f64();
            let cells: Vec<_> = synthetic.into_iter().chain(shared_cells).collect();
            println!(
                "Simulator: tick 1 s, replica capacity {} req/s, warm-up {} s, SLO {} s; {} seeds; mean ± 95 % CI.\n",
                config.capacity, config.warmup_secs, config.slo_secs, seeds
            );
            println!("{}", simulate::markdown(&cells));
            println!(
                "Predictive against KPA:\n\n{}",
                simulate::goal_table(&cells)
            );
            if kinds.contains(&PolicyKind::QLearning) {
                println!(
                    "Q-learning trained on the first 70 %, frozen, on the last 30 %:\n\n{}",
                    simulate::q_holdout(&scenarios, seeds, &config)
                );
            }
            println!(
                "Time: {} policies × 6 synthetic workloads × {seeds} seeds in {synthetic_secs:.1} s; with the replayed series {total_secs:.1} s ({} cores).",
                kinds.len(),
                std::thread::available_parallelism().map_or(1, |n| n.get())
            );
            std::fs::create_dir_all(&out)?;
            for scenario in &scenarios {
                let path = out.join(format!("{}.svg", scenario.name));
                simulate::plot(scenario, &cells, &path)?;
            }
            println!("Plots: {}/<workload>.svg", out.display());
        }
        Command::ForecastEval {
            data,
            csv,
            season_rows,
            horizon,
            out,
        } => {
            anyhow::ensure!(season_rows >= 1, "--season-rows must be at least 1");
            let mut series = Vec::new();
            for name in ["bikesharing", "traffic_volume"] {
                match simulate::read_series(&data.join(format!("{name}_hourly.csv"))) {
                    Ok(values) => series.push((name.to_owned(), values)),
                    Err(e) => eprintln!("shared series skipped: {e:#}"),
                }
            }
            for path in &csv {
                series.push((simulate::series_name(path), simulate::read_series(path)?));
            }
            anyhow::ensure!(!series.is_empty(), "no series to score");
            let warmup = SimConfig::default().warmup_secs;
            let horizon = horizon
                .unwrap_or_else(|| warmup.div_ceil(simulate::SECS_PER_ROW))
                .max(1);
            println!(
                "Rolling-origin forecasts, horizon {horizon} rows ({warmup} s of warm-up at {} s per row by default), season {season_rows}; MASE against seasonal naive.\n",
                simulate::SECS_PER_ROW
            );
            println!(
                "{}",
                simulate::forecast_table(&series, season_rows, horizon)
            );
            std::fs::create_dir_all(&out)?;
            for (name, values) in &series {
                let path = out.join(format!("{name}.svg"));
                simulate::plot_forecasts(
                    name,
                    values,
                    season_rows,
                    horizon,
                    14 * season_rows,
                    &path,
                )?;
            }
            println!("Plots: {}/<series>.svg", out.display());
        }
    }
    Ok(())
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    cloud_hub::cli::logs();
    let scaler = ScalerSettings {
        min: args.min_replicas,
        max: args.max_replicas,
        stable_secs: args.stable_secs,
        idle_secs: args.idle_secs,
        default_capacity: args.replica_capacity,
        predictive: args.scaling == "predictive",
        ..ScalerSettings::default()
    };
    let models = args
        .models
        .iter()
        .map(|m| {
            let (name, source) = match m.split_once('=') {
                Some((name, path)) => (name.to_owned(), ModelSource::Path(path.into())),
                None => {
                    anyhow::ensure!(
                        models::zoo::ALL.iter().any(|z| z.name == m),
                        "{m:?} is not a sample model; say NAME=FILE.onnx for a file"
                    );
                    (m.clone(), ModelSource::Zoo(m.clone()))
                }
            };
            Ok(ModelSpec {
                name,
                source,
                version: 1,
                input_shape: None,
                scaler: scaler.clone(),
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let settings = HubSettings {
        dir: HubDir::new(&args.dir),
        listen: args.listen,
        http: args.http,
        heartbeat_ms: args.heartbeat_ms,
        offline_after_ms: args.offline_after_ms,
        max_sessions: args.max_sessions,
        models,
        replica_workers: args.replica_workers,
        tick: Duration::from_millis(args.tick_ms),
        exe: std::env::current_exe()?,
        download_rate: args.download_rate,
        max_downloads: args.max_downloads,
    };
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        tokio::spawn(cloud_hub::cli::stop_on_signal(shutdown.clone()));
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let hub = tokio::spawn(cloud_hub::hub::run(settings, ready_tx, shutdown.clone()));
        if let Ok(bound) = ready_rx.await {
            // Lines on stdout, for scripts and test harnesses that asked for port 0.
            println!("control on {}", bound.control);
            println!("dashboard on http://{}/", bound.http);
        }
        hub.await?
    })
}

fn model(command: ModelCommand) -> anyhow::Result<()> {
    let open = |dir: &PathBuf| -> anyhow::Result<(HubDir, cloud_hub::registry::Registry)> {
        let hub = HubDir::new(dir);
        anyhow::ensure!(
            hub.exists(),
            "{} is not a hub state folder: run `cloud-hub init` first",
            dir.display()
        );
        let registry = cloud_hub::registry::Registry::open(&hub.database())?;
        Ok((hub, registry))
    };
    match command {
        ModelCommand::Publish {
            file,
            name,
            version,
            input_shape,
            min_agent_version,
            dir,
        } => {
            let (hub, registry) = open(&dir)?;
            let bytes =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let signed = cloud_hub::store::publish(
                &hub,
                &registry,
                &cloud_hub::store::Publication {
                    bytes: &bytes,
                    name: &name,
                    version,
                    input_shape: input_shape.as_deref(),
                    min_agent_version: &min_agent_version,
                    now: cloud_hub::replicas::unix_ms(),
                },
            )?;
            let m = &signed.manifest;
            println!(
                "published {} v{}: {} bytes, sha256 {}, input {:?}, outputs {}; {}",
                m.name,
                m.version,
                m.size,
                m.sha256,
                m.input_shape,
                m.outputs.join(", "),
                m.nnef.as_ref().map_or_else(
                    || "no NNEF conversion (see the warning)".to_owned(),
                    |n| format!("NNEF {} bytes, sha256 {}", n.size, n.sha256)
                )
            );
        }
        ModelCommand::Convert {
            file,
            input_shape,
            output,
        } => {
            let bytes =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let runner = models::LoadedModel::from_bytes(&bytes)
                .and_then(|m| m.optimize(input_shape.as_deref()))
                .with_context(|| format!("{} does not load", file.display()))?;
            let nnef = cloud_hub::store::to_checked_nnef(&bytes, &runner)
                .with_context(|| format!("converting {}", file.display()))?;
            std::fs::write(&output, &nnef)
                .with_context(|| format!("writing {}", output.display()))?;
            println!(
                "{}: NNEF, {} bytes, input {:?}, outputs {}",
                output.display(),
                nnef.len(),
                runner.input_shape(),
                runner.output_names().join(", ")
            );
        }
        ModelCommand::Ls { dir } => {
            let (_, registry) = open(&dir)?;
            cloud_hub::client::print_published(&registry.models(None)?);
        }
        ModelCommand::Show { name, dir } => {
            let (_, registry) = open(&dir)?;
            let versions = registry.models(Some(&name))?;
            anyhow::ensure!(!versions.is_empty(), "no published model {name:?}");
            println!("{}", serde_json::to_string_pretty(&versions)?);
        }
    }
    Ok(())
}
