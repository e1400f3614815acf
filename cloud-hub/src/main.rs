//! `cloud-hub`: operator commands.

use clap::{Parser, Subcommand};

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
    }
    Ok(())
}
