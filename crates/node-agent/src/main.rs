//! `wgmesh-agent`: owns the node's WireGuard key and programs the node's interface from the
//! peer set the controller streams.

use clap::Parser;

#[derive(Parser)]
#[command(name = "wgmesh-agent", version, about)]
struct Args {}

fn main() -> anyhow::Result<()> {
    let _args = Args::parse();
    anyhow::bail!("wgmesh-agent is not implemented yet (see the node agent issue)")
}
