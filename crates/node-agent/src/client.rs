//! The connection to the controller: TLS, the projected token on every call.

use std::time::Duration;

use tonic::Request;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Uri};
use wgmesh_proto as pb;
use wgmesh_proto::mesh_service_client::MeshServiceClient;

use crate::config::RunArgs;
use crate::error::{Error, Result};

/// The largest message the agent takes from the controller.
const MAX_UPDATE_BYTES: usize = 64 * 1024 * 1024;

pub struct ControllerClient {
    inner: MeshServiceClient<Channel>,
    /// The projected token as last read: the kubelet replaces the file before the token
    /// expires, so every call reads it again (a session outlives the token it began with).
    token: std::sync::Mutex<String>,
    token_file: std::path::PathBuf,
}

impl ControllerClient {
    /// `mark`: the firewall mark on the connection's packets ([`controller_mark`]).
    pub async fn connect(args: &RunArgs, mark: Option<u32>) -> Result<Self> {
        // The agent checked this at start-up; never connect without TLS regardless.
        crate::config::check_controller_url(&args.controller).map_err(Error::Config)?;
        let ca = std::fs::read(&args.ca_file).map_err(|source| Error::Read {
            path: args.ca_file.display().to_string(),
            source,
        })?;
        // Read now so that a missing token fails the connection, not its first call.
        let token = read_token(&args.token_file)?;
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
        if let Some(name) = &args.tls_server_name {
            tls = tls.domain_name(name.clone());
        }
        let endpoint = Channel::from_shared(args.controller.clone())
            .map_err(|e| Error::Config(format!("controller URL {}: {e}", args.controller)))?
            .tls_config(tls)?
            .connect_timeout(Duration::from_secs(5))
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(10));
        let channel = match mark {
            None => endpoint.connect().await?,
            Some(mark) => {
                let connector = tower::service_fn(move |uri: Uri| async move {
                    connect_marked(&uri, mark)
                        .await
                        .map(hyper_util::rt::TokioIo::new)
                });
                endpoint.connect_with_connector(connector).await?
            }
        };
        Ok(ControllerClient {
            // Updates come in parts of a few dozen peers, but one peer can be large: the
            // active gateway, as the other nodes see it, carries every external peer's
            // allowed IPs. Above tonic's 4 MiB default the stream would fail forever.
            inner: MeshServiceClient::new(channel).max_decoding_message_size(MAX_UPDATE_BYTES),
            token: std::sync::Mutex::new(token),
            token_file: args.token_file.clone(),
        })
    }

    /// A call carrying the current token (the last one read, if the file cannot be read now).
    pub fn request<T>(&self, body: T) -> Request<T> {
        let token = self.current_token();
        let mut req = Request::new(body);
        if let Ok(value) = format!("Bearer {token}").parse() {
            req.metadata_mut().insert("authorization", value);
        }
        req
    }

    /// The token the next call carries: the file's, or the last one read.
    pub fn current_token(&self) -> String {
        let mut token = self.token.lock().unwrap_or_else(|e| e.into_inner());
        refresh_token(&mut token, &self.token_file);
        token.clone()
    }

    pub fn grpc(&mut self) -> &mut MeshServiceClient<Channel> {
        &mut self.inner
    }
}

/// `token` as the file now holds it; the last one read if the file cannot be read or is
/// empty (the kubelet replaces it whole, but a call is better made with the last token than
/// with none).
fn refresh_token(token: &mut String, path: &std::path::Path) {
    match read_token(path) {
        Ok(fresh) if !fresh.is_empty() => *token = fresh,
        Ok(_) => tracing::debug!("the token file is empty; using the last token"),
        Err(e) => tracing::debug!(error = %e, "reading the token again failed; using the last one"),
    }
}

fn read_token(path: &std::path::Path) -> Result<String> {
    let token = std::fs::read_to_string(path).map_err(|source| Error::Read {
        path: path.display().to_string(),
        source,
    })?;
    Ok(token.trim().to_owned())
}

/// The mark an agent's connections to the controller carry: the mesh's fwmark when it encrypts
/// host traffic. Every other node's address is then routed into the tunnel, and a node whose
/// tunnels are stale (a preshared key or a peer key it missed while down) could not reach the
/// controller, on the host network of another node, to learn the new ones. Marked, the
/// connection crosses the underlay as the tunnel's own packets do; TLS protects it, as it
/// does the API server's traffic, which the mesh keeps out of the tunnel too. The controller's
/// node marks its replies to match, and every node restores the mark after kube-proxy's NAT
/// (`netfilter::ControllerConnections`).
///
/// A controller on the pod network (`host_network` false) is reached at a pod address, which
/// the tunnel carries like any pod traffic: no mark.
pub fn controller_mark(settings: &pb::MeshSettings, host_network: bool) -> Option<u32> {
    (host_network && settings.host_encryption && settings.fwmark != 0).then_some(settings.fwmark)
}

/// The controller's port, from its URL: the Service's port, which the chart makes the
/// controller's own.
pub fn controller_port(url: &str) -> u16 {
    url.parse::<Uri>()
        .ok()
        .and_then(|u| host_and_port(&u).map(|(_, port)| port))
        .unwrap_or(443)
}

/// A URI's host (an IPv6 address without its brackets) and port (443 unless it names one).
pub fn host_and_port(uri: &Uri) -> Option<(&str, u16)> {
    let host = uri.host()?.trim_start_matches('[').trim_end_matches(']');
    Some((host, uri.port_u16().unwrap_or(443)))
}

/// A TCP connection to `uri`'s host and port whose packets carry `mark` (`SO_MARK`, which
/// needs `CAP_NET_ADMIN`, as the agent has): the first address that answers.
async fn connect_marked(uri: &Uri, mark: u32) -> std::io::Result<tokio::net::TcpStream> {
    let (host, port) = host_and_port(uri).unwrap_or_default();
    let mut last = std::io::Error::new(
        std::io::ErrorKind::NotFound,
        format!("{host} has no address"),
    );
    for addr in tokio::net::lookup_host((host, port)).await? {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        socket.set_mark(mark)?;
        socket.set_nonblocking(true)?;
        let socket = tokio::net::TcpSocket::from_std_stream(socket.into());
        match socket.connect(addr).await {
            Ok(stream) => {
                stream.set_nodelay(true)?;
                return Ok(stream);
            }
            Err(e) => last = e,
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A session outlives the token it began with (an hour): every call reads the file the
    /// kubelet keeps fresh, and keeps the last token while the file is missing or empty.
    #[test]
    fn calls_carry_the_token_the_file_holds_now() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        let mut token = String::from("first");
        let steps: &[(Option<&str>, &str)] = &[
            (Some("second\n"), "second"),
            (Some(""), "second"),
            (Some("  third  "), "third"),
            (None, "third"),
            (Some("fourth"), "fourth"),
        ];
        for (file, want) in steps {
            match file {
                Some(text) => std::fs::write(&path, text).unwrap(),
                None => std::fs::remove_file(&path).unwrap(),
            }
            refresh_token(&mut token, &path);
            assert_eq!(token, *want, "file {file:?}");
        }
    }

    #[test]
    fn the_mark_and_port_of_the_controller_connection() {
        let settings = |host_encryption, fwmark| pb::MeshSettings {
            host_encryption,
            fwmark,
            ..Default::default()
        };
        // host encryption, fwmark, the controller on the host network, the mark
        for (encrypts_hosts, fwmark, host_network, want) in [
            (true, 0x5157, true, Some(0x5157)),
            (false, 0x5157, true, None), // hosts talk over the underlay anyway
            (true, 0, true, None),       // no mark to give (the API server refuses it)
            (true, 0x5157, false, None), // a pod address: through the tunnel
        ] {
            assert_eq!(
                controller_mark(&settings(encrypts_hosts, fwmark), host_network),
                want,
                "{encrypts_hosts} {fwmark} {host_network}"
            );
        }
        assert_eq!(controller_port("https://[10.96.0.10]:9443"), 9443);
        assert_eq!(controller_port("https://[fd00::10]:8443"), 8443);
        assert_eq!(
            controller_port("https://wgmesh-controller.wgmesh-system.svc"),
            443
        );
        assert_eq!(controller_port("not a url"), 443);
    }
}
