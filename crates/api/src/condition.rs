//! Condition types and reasons used in the status of wgmesh objects.

pub use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

/// The one condition every object carries: whether it is programmed into the mesh.
pub const READY: &str = "Ready";

/// Reasons of the `Ready` condition, in `UpperCamelCase` as Kubernetes conventions ask.
pub mod reason {
    pub const PROGRAMMED: &str = "Programmed";
    pub const ALLOWED_IPS_OVERLAP: &str = "AllowedIPsOverlap";
    pub const DUPLICATE_PUBLIC_KEY: &str = "DuplicatePublicKey";
    pub const PRESHARED_KEY_MISSING: &str = "PresharedKeySecretMissing";
    pub const POOL_EXHAUSTED: &str = "TunnelPoolExhausted";
    pub const MESH_NOT_FOUND: &str = "MeshNotFound";
    pub const DISABLED: &str = "Disabled";
    pub const NO_GATEWAY: &str = "NoGateway";
    pub const RESERVED_RANGE: &str = "ReservedRange";
    pub const NODE_NOT_OWNED: &str = "NodePeerNotOwned";
}
