//! Pure domain logic of wgmesh: WireGuard keys, CIDR sets, and (in later modules) the desired
//! mesh, diffs and the wg-quick format. Nothing here does I/O or knows about Kubernetes or gRPC,
//! so every decision can be tested with plain tables.
#![forbid(unsafe_code)]

pub mod cidr;
pub mod key;

pub use cidr::{Cidr, CidrError, CidrSet};
pub use key::{Key, KeyError, PrivateKey, PublicKey};
