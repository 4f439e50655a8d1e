//! The `wgmesh.v1` gRPC API between the controller and the node agents, generated from
//! `proto/wgmesh/v1/mesh.proto` (read it for what every message and field means).

/// Generated code of package `wgmesh.v1`.
pub mod v1 {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("wgmesh.v1");
}

pub use v1::*;

pub mod checked;
