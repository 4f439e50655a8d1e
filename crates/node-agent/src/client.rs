//! The connection to the controller: TLS, the projected token on every call.

use std::time::Duration;

use tonic::Request;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};
use wgmesh_proto::mesh_service_client::MeshServiceClient;

use crate::config::RunArgs;
use crate::error::{Error, Result};

/// The largest message the agent takes from the controller.
const MAX_UPDATE_BYTES: usize = 64 * 1024 * 1024;

pub struct ControllerClient {
    inner: MeshServiceClient<Channel>,
    token: String,
}

impl ControllerClient {
    pub async fn connect(args: &RunArgs) -> Result<Self> {
        // The agent checked this at start-up; never connect without TLS regardless.
        crate::config::check_controller_url(&args.controller).map_err(Error::Config)?;
        let ca = std::fs::read(&args.ca_file).map_err(|source| Error::Read {
            path: args.ca_file.display().to_string(),
            source,
        })?;
        // Projected tokens are rotated by the kubelet: read the file on every connection.
        let token = std::fs::read_to_string(&args.token_file)
            .map_err(|source| Error::Read {
                path: args.token_file.display().to_string(),
                source,
            })?
            .trim()
            .to_owned();
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
        if let Some(name) = &args.tls_server_name {
            tls = tls.domain_name(name.clone());
        }
        let channel = Channel::from_shared(args.controller.clone())
            .map_err(|e| Error::Config(format!("controller URL {}: {e}", args.controller)))?
            .tls_config(tls)?
            .connect_timeout(Duration::from_secs(5))
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(10))
            .connect()
            .await?;
        Ok(ControllerClient {
            // Updates come in parts of a few dozen peers, but one peer can be large: the
            // active gateway, as the other nodes see it, carries every external peer's
            // allowed IPs. Above tonic's 4 MiB default the stream would fail forever.
            inner: MeshServiceClient::new(channel).max_decoding_message_size(MAX_UPDATE_BYTES),
            token,
        })
    }

    pub fn request<T>(&self, body: T) -> Request<T> {
        let mut req = Request::new(body);
        if let Ok(value) = format!("Bearer {}", self.token).parse() {
            req.metadata_mut().insert("authorization", value);
        }
        req
    }

    pub fn grpc(&mut self) -> &mut MeshServiceClient<Channel> {
        &mut self.inner
    }
}
