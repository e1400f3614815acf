//! `cloud-hub`: operator commands.

#![allow(clippy::disallowed_methods)] // times the comparison it reports

use std::path::PathBuf;
use std::time::Instant;

use clap::{Parser, Subcommand};
use cloud_hub::simulate::{self, PolicyKind, Scenario};
use models::sim::SimConfig;

/// Spillway cloud hub.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Load and run every sample model, and list them.
    Zoo,
    /// Compare scaling policies on synthetic and shared workloads in the simulator.
    Simulate {
        /// Folder with the shared `*_hourly.csv` series (skipped when absent).
        #[arg(long, default_value = "../shared/data/workloads")]
        data: PathBuf,
        /// Seeds per policy and workload.
        #[arg(long, default_value_t = 5)]
        seeds: u64,
        /// Policies, comma-separated (HPA, KPA, threshold, Q-learning, predictive).
        #[arg(long, value_delimiter = ',')]
        policies: Vec<String>,
        /// Where the plots go (one SVG per workload).
        #[arg(long, default_value = "target/simulate")]
        out: PathBuf,
    },
    /// Score forecasters on the shared series at the replicas' warm-up horizon.
    ForecastEval {
        /// Folder with the shared `*_hourly.csv` series.
        #[arg(long, default_value = "../shared/data/workloads")]
        data: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    match Args::parse().command {
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
        } => {
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
            let start = Instant::now();
            let synthetic = simulate::run_matrix(&scenarios[..6], &kinds, seeds, &config);
            let synthetic_secs = start.elapsed().as_secs_f64();
            let shared_cells = simulate::run_matrix(&scenarios[6..], &kinds, seeds, &config);
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
            println!(
                "Q-learning trained on the first 70 %, frozen, on the last 30 %:\n\n{}",
                simulate::q_holdout(&scenarios, seeds, &config)
            );
            println!(
                "Time: {} policies × 6 synthetic workloads × {seeds} seeds in {synthetic_secs:.1} s; with the shared series {total_secs:.1} s ({} cores).",
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
        Command::ForecastEval { data } => {
            let mut series = Vec::new();
            for file in ["bikesharing_hourly.csv", "traffic_volume_hourly.csv"] {
                let values = simulate::read_series(&data.join(file))?;
                series.push((file.trim_end_matches("_hourly.csv").to_owned(), values));
            }
            let horizon = SimConfig::default()
                .warmup_secs
                .div_ceil(simulate::SECS_PER_ROW);
            println!(
                "Rolling-origin forecasts, horizon {horizon} rows (the {} s warm-up at {} s per hourly row), season 24; MASE against seasonal naive.\n",
                SimConfig::default().warmup_secs,
                simulate::SECS_PER_ROW
            );
            println!("{}", simulate::forecast_table(&series, 24, horizon));
        }
    }
    Ok(())
}
