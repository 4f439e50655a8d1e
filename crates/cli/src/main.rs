//! `kubectl-wgmesh`: the kubectl plugin of wgmesh (`kubectl wgmesh ...`).

mod keys;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "kubectl wgmesh",
    version,
    about = "Manage a wgmesh WireGuard mesh"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print a new private key (like `wg genkey`).
    Genkey,
    /// Read a private key on stdin and print its public key (like `wg pubkey`).
    Pubkey,
    /// Print a new preshared key (like `wg genpsk`).
    Genpsk,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Genkey => keys::genkey(),
        Cmd::Pubkey => keys::pubkey(std::io::stdin().lock()),
        Cmd::Genpsk => keys::genpsk(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
