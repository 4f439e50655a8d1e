//! Compiles proto/wgmesh/v1/mesh.proto with protox (pure Rust), so no `protoc` is needed.
//!
//! Twice: once for everyone (`v1`: clients, agents, tests), and once for the controller's
//! server (`served`), where `Peer` in the stream's updates is `crate::encoded::EncodedPeer`
//! (each peer encoded once and its bytes shared by every stream) and every other message but
//! the three that hold peers is `v1`'s own type.

/// The messages generated again for the server: they hold `Peer`s.
const HOLDING_PEERS: &[&str] = &["PeerUpdate", "PeerSnapshot", "PeerDelta"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/wgmesh/v1/mesh.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    let file = fds
        .file
        .iter()
        .find(|f| f.package() == "wgmesh.v1")
        .ok_or("no wgmesh.v1 package")?;
    let top_level: Vec<String> = file
        .message_type
        .iter()
        .map(|m| m.name().to_owned())
        .chain(file.enum_type.iter().map(|e| e.name().to_owned()))
        .collect();

    tonic_prost_build::configure()
        .build_server(false)
        .build_client(true)
        // Peer carries a preshared key: its Debug is written by hand (src/lib.rs), redacted.
        .skip_debug([".wgmesh.v1.Peer"])
        .compile_fds(fds.clone())?;

    let served = std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("served");
    std::fs::create_dir_all(&served)?;
    let mut server = tonic_prost_build::configure()
        .build_server(true)
        .build_client(false)
        .out_dir(&served)
        .extern_path(".wgmesh.v1.Peer", "crate::encoded::EncodedPeer");
    for name in &top_level {
        if name != "Peer" && !HOLDING_PEERS.contains(&name.as_str()) {
            server = server.extern_path(format!(".wgmesh.v1.{name}"), format!("crate::v1::{name}"));
        }
    }
    server.compile_fds(fds)?;
    Ok(())
}
