//! Condition types and reasons used in the status of wgmesh objects.

pub use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

/// The one condition every object carries: whether it is programmed into the mesh.
pub const READY: &str = "Ready";

/// Reasons of the `Ready` condition: core's one list, so controller and CLI agree on them.
pub use wgmesh_core::reason::{Reason, UnknownReason};
