//! Compiles proto/wgmesh/v1/mesh.proto with protox (pure Rust), so no `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/wgmesh/v1/mesh.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // Peer carries a preshared key: its Debug is written by hand (src/lib.rs), redacted.
        .skip_debug([".wgmesh.v1.Peer"])
        .compile_fds(fds)?;
    Ok(())
}
