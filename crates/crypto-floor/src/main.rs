//! `wgmesh-crypto-floor [PACKETS]`: seals and opens PACKETS (default 300000) 1420-byte packets
//! on this thread and prints one JSON line: `{"packets": N, "cpu_s": S}`.

#![forbid(unsafe_code)]

use anyhow::{Context, Result};

fn main() -> Result<()> {
    let packets = match std::env::args().nth(1) {
        Some(n) => n.parse().context("PACKETS must be a number")?,
        None => 300_000,
    };
    let f = wgmesh_crypto_floor::measure(packets)?;
    println!("{{\"packets\": {}, \"cpu_s\": {}}}", f.packets, f.cpu_s);
    Ok(())
}
