//! A real `wgmesh-controller` process against a test control plane.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use crate::ControlPlane;
use crate::binaries::workspace_binary;
use crate::cluster::{AGENT_NAMESPACE, ensure_agent_identity};
use crate::process::{ChildGuard, free_port};

/// TLS files for the controller's gRPC server, issued by the control plane's CA.
#[derive(Clone)]
pub struct ControllerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The CA file replicas authenticate each other with.
    pub ca: PathBuf,
    /// The CA agents trust.
    pub ca_pem: String,
}

impl ControllerTls {
    pub fn issue(cp: &ControlPlane) -> Result<Self> {
        let cert = cp
            .ca()
            .server_cert("wgmesh-controller", &["localhost", "127.0.0.1"])?;
        let dir = cp.dir();
        let (cert_path, key_path) = (dir.join("controller.crt"), dir.join("controller.key"));
        let ca_path = dir.join("controller-ca.crt");
        std::fs::write(&cert_path, cert.cert_pem)?;
        std::fs::write(&key_path, cert.key_pem)?;
        std::fs::write(&ca_path, cp.ca().cert_pem())?;
        Ok(ControllerTls {
            cert: cert_path,
            key: key_path,
            ca: ca_path,
            ca_pem: cp.ca().cert_pem().to_owned(),
        })
    }
}

/// A running controller. Dropping it stops the process.
pub struct Controller {
    process: ChildGuard,
    /// Builds the command it was started with, to start it again exactly so.
    command: Box<dyn Fn() -> Command + Send + Sync>,
    log: PathBuf,
    pub identity: String,
    pub grpc_port: u16,
    pub metrics_port: u16,
    /// Where its metrics port is reached from this process: loopback, or the address of the
    /// node whose network it runs in.
    metrics_host: std::net::IpAddr,
}

impl Controller {
    /// Starts a controller replica named `identity` with the given extra environment.
    pub async fn start(
        cp: &ControlPlane,
        tls: &ControllerTls,
        identity: &str,
        env: &[(&str, &str)],
    ) -> Result<Self> {
        let binary = workspace_binary("wgmesh-controller", "wgmesh-controller")?;
        Self::start_binary(cp, tls, identity, env, &binary).await
    }

    /// Like [`Controller::start`], with a given binary (a release build for benchmarks).
    pub async fn start_binary(
        cp: &ControlPlane,
        tls: &ControllerTls,
        identity: &str,
        env: &[(&str, &str)],
        binary: &Path,
    ) -> Result<Self> {
        let client = cp.client().await?;
        ensure_agent_identity(&client).await?;
        let grpc_port = free_port()?;
        let metrics_port = free_port()?;
        let binary = binary.to_owned();
        let grpc_addr = grpc_bind(env, grpc_port);
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let (kubeconfig, tls) = (cp.kubeconfig().to_owned(), tls.clone());
        let identity_env = identity.to_owned();
        let command = move || {
            let mut cmd = Command::new(&binary);
            cmd.env("KUBECONFIG", &kubeconfig)
                .env("POD_NAMESPACE", AGENT_NAMESPACE)
                .env("POD_NAME", &identity_env)
                .env("WGMESH_GRPC_ADDR", &grpc_addr)
                .env("WGMESH_METRICS_ADDR", format!("127.0.0.1:{metrics_port}"))
                .env("WGMESH_TLS_CERT", &tls.cert)
                .env("WGMESH_TLS_KEY", &tls.key)
                .env("WGMESH_TLS_CA", &tls.ca)
                .env("WGMESH_ADVERTISE_ADDR", format!("127.0.0.1:{grpc_port}"))
                .env("WGMESH_PEER_SERVER_NAME", "localhost")
                .env(
                    "WGMESH_LOG",
                    "info,wgmesh_controller=debug,kube_lease_manager=warn",
                );
            cmd.envs(env.iter().map(|(k, v)| (k, v)));
            cmd
        };
        let log = cp.dir().join(format!("controller-{identity}.log"));
        Self::spawn(identity, command, &log, grpc_port, metrics_port).await
    }

    /// Starts the command `command` builds (a controller however launched, listening on the
    /// given ports) and waits until it is ready. [`Controller::restart`] builds and runs it
    /// again.
    pub async fn spawn(
        identity: &str,
        command: impl Fn() -> Command + Send + Sync + 'static,
        log: &Path,
        grpc_port: u16,
        metrics_port: u16,
    ) -> Result<Self> {
        let loopback = std::net::Ipv4Addr::LOCALHOST.into();
        Self::spawn_reached_at(identity, command, log, grpc_port, metrics_port, loopback).await
    }

    /// Like [`Controller::spawn`], for a controller in another network namespace whose
    /// metrics port this process reaches at `metrics_host`.
    pub async fn spawn_reached_at(
        identity: &str,
        command: impl Fn() -> Command + Send + Sync + 'static,
        log: &Path,
        grpc_port: u16,
        metrics_port: u16,
        metrics_host: std::net::IpAddr,
    ) -> Result<Self> {
        let process = ChildGuard::spawn(&format!("controller {identity}"), command(), log)?;
        let mut controller = Controller {
            process,
            command: Box::new(command),
            log: log.to_owned(),
            identity: identity.to_owned(),
            grpc_port,
            metrics_port,
            metrics_host,
        };
        controller.wait_ready().await?;
        Ok(controller)
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if !self.process.is_running() {
                bail!(
                    "the controller exited during start-up:\n{}",
                    self.process.log_tail(40)
                );
            }
            if http_get_at(self.metrics_host, self.metrics_port, "/readyz")
                .await
                .is_ok_and(|b| b == "ok")
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!(
            "the controller was not ready in 60 s:\n{}",
            self.process.log_tail(40)
        )
    }

    pub fn grpc_url(&self) -> String {
        format!("https://localhost:{}", self.grpc_port)
    }

    /// `/metrics` text.
    pub async fn metrics(&self) -> Result<String> {
        http_get_at(self.metrics_host, self.metrics_port, "/metrics").await
    }

    /// Starts the controller again, same ports and identity, after a kill or stop.
    pub async fn restart(&mut self) -> Result<()> {
        self.process.kill();
        self.process = ChildGuard::spawn(
            &format!("controller {}", self.identity),
            (self.command)(),
            &self.log,
        )?;
        self.wait_ready().await
    }

    /// Whether the process is still running (false once it exited or was stopped).
    pub fn is_running(&mut self) -> bool {
        self.process.is_running()
    }

    /// SIGKILL, as a crash.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// SIGTERM and wait.
    pub fn stop(&mut self) {
        self.process.stop(Duration::from_secs(10));
    }

    pub fn log_tail(&self, lines: usize) -> String {
        self.process.log_tail(lines)
    }

    pub fn log_path(&self) -> &Path {
        self.process.log_path()
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }
}

/// Loopback only, unless the test's nodes (network namespaces) must reach the controller over
/// the test bridge (`WGMESH_BIND_ALL` in `env`).
fn grpc_bind(env: &[(&str, &str)], port: u16) -> String {
    if env.iter().any(|(k, _)| *k == "WGMESH_BIND_ALL") {
        format!("0.0.0.0:{port}")
    } else {
        format!("127.0.0.1:{port}")
    }
}

/// A minimal HTTP/1.0 GET on loopback (no client library needed for three endpoints).
pub async fn http_get(port: u16, path: &str) -> Result<String> {
    http_get_at(std::net::Ipv4Addr::LOCALHOST.into(), port, path).await
}

/// The same at `host`.
pub async fn http_get_at(host: std::net::IpAddr, port: u16, path: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect((host, port)).await?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        bail!("GET {path}: {}", head.lines().next().unwrap_or_default());
    }
    Ok(body.to_owned())
}
