// Temporary wiring of the engine's commands (the integrator owns this file).
mod cmd_eval;
mod cmd_train;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "peftdb", version)]
struct Cli {
    /// Print machine-readable JSON.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    Train(cmd_train::TrainArgs),
    Eval(cmd_eval::EvalArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Train(a) => cmd_train::run(a, cli.json),
        Cmd::Eval(a) => cmd_eval::run(a, cli.json),
    }
}
