//! `cargo xtask bench ...`: benchmarks that compare and report medians, never timed tests.

mod control_plane;
mod dataplane;
mod disruption;
mod heap;
mod procfs;
mod real_agent;
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
    /// What each fault (agent, controller and API server restarts, nodes joining and leaving,
    /// key rotation, peer deletion, Secrets denied) costs pod traffic on a local mesh: the
    /// longest stall, pings lost, plaintext packets seen, TCP resets (root).
    Disruption(disruption::Args),
}

pub fn run(bench: Bench) -> Result<()> {
    match bench {
        Bench::ControlPlane(args) => {
            if cfg!(debug_assertions) {
                return control_plane::run_in_release();
            }
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(control_plane::run(args))
        }
        Bench::Dataplane(args) => dataplane::run(args),
        Bench::Disruption(args) => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(disruption::run(args))
        }
    }
}
