//! Temporary shell for trying `peftdb nearest` on the `index` branch (the integrator's main replaces it).
mod cmd_nearest;

use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(name = "peftdb")]
struct Cli {
    #[arg(
        long,
        global = true,
        env = "PEFTDB_PATH",
        default_value = "peftdb.redb"
    )]
    db: PathBuf,
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Tasks nearest to a task, an object or an adapter folder.
    Nearest(cmd_nearest::NearestArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let r = match &cli.cmd {
        Cmd::Nearest(a) => cmd_nearest::run(&cli.db, a, cli.json),
    };
    match r {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}
