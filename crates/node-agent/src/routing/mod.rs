//! Addresses, MTU, routes and the policy rule of the mesh interface, through rtnetlink,
//! always as diffs: nothing is flushed, and routes and rules are only ever removed when they
//! carry our protocol number ([`ROUTE_PROTOCOL`]), so what others configured is left alone.
//!
//! Two halves: [`plan`] decides (what to add, what to delete: pure functions, table-tested),
//! [`netlink`] reads the kernel and applies the plan ([`Routing`], the thin I/O shell).

pub mod netlink;
pub mod plan;

pub use netlink::{RouteSnapshot, Routing, RoutingError};
pub use plan::*;
