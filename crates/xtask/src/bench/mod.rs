//! `cargo xtask bench ...`: benchmarks that compare and report medians, never timed tests.

mod agent;
mod control_plane;
mod dataplane;
mod disruption;
mod fan_out;
mod heap;
mod procfs;
mod real_agent;
mod stats;

use std::process::Command;

use anyhow::{Context, Result};
use clap::Subcommand;

use crate::setup::{repo_root, step};

#[derive(Subcommand)]
pub enum Bench {
    /// What a node's agent spends at N peers: programming them into our device and Debian's
    /// wireguard-go (`wg setconf`, side by side) and through the agent's apply, one changed
    /// peer, and the routing work of a join and of the repair tick (root).
    Agent(agent::Args),
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
    /// What one change costs the controller to send to every node (a node joining behind
    /// NAT, an external peer coming), for agents that take changes of allowed IPs and for
    /// agents that take peers whole, side by side; in process, no API server.
    FanOut(fan_out::Args),
}

pub fn run(bench: Bench) -> Result<()> {
    match bench {
        // Both time our own code: measured in a release build.
        Bench::Agent(_) | Bench::ControlPlane(_) | Bench::FanOut(_) if cfg!(debug_assertions) => {
            run_in_release()
        }
        Bench::Agent(args) => agent::run(args),
        Bench::ControlPlane(args) => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(control_plane::run(args))
        }
        Bench::Dataplane(args) => dataplane::run(args),
        Bench::FanOut(args) => fan_out::run(args),
        Bench::Disruption(args) => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(disruption::run(args))
        }
    }
}

/// Runs this benchmark again from a release build of xtask, with the same arguments: the
/// agent benchmark times our code in-process, and in the control-plane one the simulated
/// agents share the machine's cores with the controller and the API server (in a debug
/// build decoding 25 million peer entries, 5,000 snapshots of 5,000 peers after a restart,
/// would cost the machine more than the controller sending them; real agents decode on
/// their own nodes, and here their CPU is reported apart).
pub fn run_in_release() -> Result<()> {
    step("building the benchmark (release) and running it");
    let status = Command::new(env!("CARGO"))
        .current_dir(repo_root())
        .args(["run", "--release", "--quiet", "-p", "xtask", "--"])
        .args(std::env::args_os().skip(1))
        .status()
        .context("running the release build of xtask")?;
    anyhow::ensure!(status.success(), "the benchmark failed ({status})");
    Ok(())
}
