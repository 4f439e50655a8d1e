//! `wgmesh-controller`: reconciles Nodes and wgmesh.io objects into per-node peer sets and
//! serves them to node agents over gRPC.

use clap::Parser;

#[derive(Parser)]
#[command(name = "wgmesh-controller", version, about)]
struct Args {}

fn main() -> anyhow::Result<()> {
    let _args = Args::parse();
    anyhow::bail!("wgmesh-controller is not implemented yet (see the controller issue)")
}
