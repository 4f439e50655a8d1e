//! The wgmesh node agent: the node's key, the connection to the controller, the routes and
//! the CNI configuration, kept equal to what the controller wants, on top of the WireGuard
//! device (kernel or userspace) of the `wgmesh-device` crate.

#![forbid(unsafe_code)]

pub mod agent;
pub mod client;
pub mod cni;
pub mod config;
pub mod endpoints;
pub mod error;
pub mod http;
pub mod keys;
pub mod metrics;
pub mod netfilter;
pub mod routing;
pub mod rp_filter;
pub mod saved;
pub mod state;
