//! The wgmesh node agent: the node's key, the connection to the controller, the WireGuard
//! device (kernel or userspace) and the routes, kept equal to what the controller wants.

pub mod agent;
pub mod client;
pub mod cni;
pub mod config;
pub mod device;
pub mod error;
pub mod keys;
pub mod metrics;
pub mod routing;
pub mod state;
