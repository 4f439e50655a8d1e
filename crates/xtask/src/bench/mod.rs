//! `cargo xtask bench ...`: benchmarks that compare and report medians, never timed tests.

mod control_plane;

use anyhow::{Result, bail};
use clap::Subcommand;

#[derive(Subcommand)]
pub enum Bench {
    /// Join latency, bytes per agent per change, controller RSS and quiet writes with N
    /// simulated agents against the real local control plane.
    ControlPlane(control_plane::Args),
    /// Userspace data plane throughput against wireguard-go (not implemented yet).
    Dataplane,
}

pub fn run(bench: Bench) -> Result<()> {
    match bench {
        Bench::ControlPlane(args) => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(control_plane::run(args))
        }
        Bench::Dataplane => {
            bail!("the data plane benchmark comes with the data plane performance issue")
        }
    }
}
