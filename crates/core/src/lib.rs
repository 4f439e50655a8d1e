//! Pure domain logic of wgmesh: WireGuard keys, CIDR sets, tunnel address allocation, the
//! desired mesh and peer-set diffs. Nothing here does I/O or knows about Kubernetes or gRPC, so
//! every decision can be tested with plain tables.
#![forbid(unsafe_code)]

pub mod agent_config;
pub mod cidr;
pub mod desired;
pub mod device;
pub mod diff;
pub mod export;
pub mod gateway;
pub mod ipam;
pub mod key;
pub mod mesh_conflicts;
pub mod node_config;
pub mod reason;
#[cfg(test)]
mod redaction_tests;
pub mod report;
pub mod validate;
pub mod wgquick;

pub use cidr::{Cidr, CidrError, CidrSet};
pub use key::{Key, KeyError, PrivateKey, PublicKey};
pub use reason::Reason;
