//! `cargo xtask bench ...`: benchmarks that compare and report medians, never timed tests.

mod control_plane;
mod dataplane;
mod stats;

use anyhow::Result;
use clap::Subcommand;

#[derive(Subcommand)]
pub enum Bench {
    /// Join latency, bytes per agent per change, controller RSS and quiet writes with N
    /// simulated agents against the real local control plane.
    ControlPlane(control_plane::Args),
    /// Throughput, latency and CPU per GB of our userspace device against the raw veth,
    /// Debian's and upstream wireguard-go, between two network namespaces (root).
    Dataplane(dataplane::Args),
}

pub fn run(bench: Bench) -> Result<()> {
    match bench {
        Bench::ControlPlane(args) => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(control_plane::run(args))
        }
        Bench::Dataplane(args) => dataplane::run(args),
    }
}
