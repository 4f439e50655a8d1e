//! Test harness of wgmesh: a real local Kubernetes control plane (etcd and kube-apiserver as
//! plain processes on loopback, like controller-runtime's envtest), the Go tools it needs, and
//! helpers shared by the integration and end-to-end tests, the benchmarks and `cargo xtask demo`.

pub mod agent_sim;
pub mod binaries;
pub mod chaos;
pub mod cli;
pub mod cluster;
pub mod control_plane;
pub mod controller;
pub mod foreign;
pub mod helm;
pub mod install;
pub mod mesh;
pub mod netns;
pub mod pki;
pub mod pods;
pub mod process;
pub mod real_cluster;
pub mod scratch;
pub mod tokens;
pub mod tools;
pub mod versions;
pub mod vm;

pub use control_plane::ControlPlane;
