//! The agent's one error type.

use crate::keys::KeyError;
use wgmesh_device::Error as DeviceError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("connecting to the controller: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("controller: {0}")]
    Rpc(#[from] tonic::Status),
    #[error("device: {0}")]
    Device(#[from] DeviceError),
    #[error("routing: {0}")]
    Routing(#[from] crate::routing::RoutingError),
    #[error("key: {0}")]
    Key(#[from] KeyError),
    #[error("{0}")]
    Config(String),
    #[error("the controller sent a malformed update: {0}")]
    Update(#[from] wgmesh_proto::decode::DecodeError),
    #[error("writing {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("netfilter: {0}")]
    Netfilter(#[from] crate::netfilter::NetfilterError),
    #[error("the controller closed the peer stream")]
    StreamClosed,
    #[error(
        "the controller sent a delta (epoch {epoch:?}, revision {revision}) that does not follow the state we have; asking for a snapshot"
    )]
    OutOfOrder { epoch: String, revision: u64 },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
