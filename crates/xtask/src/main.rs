//! `cargo xtask`: the project's automation, in Rust so it runs wherever cargo does.
//!
//! - `crdgen [--check]`: write `crds/*.yaml` from the Rust types (or fail on drift);
//! - `manifests [--check]`: render `deploy/manifests/wgmesh.yaml` from the Helm chart;
//! - `test`: everything CI checks: fmt, clippy, unit, integration and end-to-end tests;
//! - `demo`: a local control plane with wgmesh installed, to look at and play with;
//! - `bench`: benchmarks (see the subcommands);
//! - `vm`: the kernel VM lane by hand (prepare it, run a command in it).

mod bench;
mod crdgen;
mod demo;
mod disk;
mod kernel_lane;
mod manifests;
mod setup;
mod test;
mod vm;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "wgmesh project automation")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Write crds/*.yaml from the Rust types in crates/api.
    Crdgen {
        /// Fail instead of writing when crds/ differs from the types.
        #[arg(long)]
        check: bool,
    },
    /// Render deploy/manifests/wgmesh.yaml from the Helm chart (helm is built and cached
    /// on first use).
    Manifests {
        /// Fail instead of writing when the file differs from the chart.
        #[arg(long)]
        check: bool,
    },
    /// Run everything CI runs: fmt, clippy, unit, integration and end-to-end tests.
    Test(test::Opts),
    /// Benchmarks (medians and ratios from one run; see `cargo xtask bench --help`).
    #[command(subcommand)]
    Bench(bench::Bench),
    /// Start a local control plane with wgmesh installed and show it.
    Demo {
        /// Exit after showing the objects instead of waiting for Ctrl-C.
        #[arg(long)]
        no_wait: bool,
    },
    /// The kernel VM (Debian's kernel, with WireGuard, under QEMU): prepare it, run in it.
    #[command(subcommand)]
    Vm(vm::Vm),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Crdgen { check } => crdgen::run(check),
        Cmd::Manifests { check } => manifests::run(check),
        Cmd::Test(opts) => test::run(&opts),
        Cmd::Demo { no_wait } => demo::run(no_wait),
        Cmd::Bench(b) => bench::run(b),
        Cmd::Vm(v) => vm::run(v),
    }
}
