//! A real Kubernetes control plane on loopback: etcd and kube-apiserver as child processes,
//! with RBAC, generated certificates and service-account signing keys (so TokenRequest and
//! TokenReview work as they do in a cluster). Dropping it stops exactly the processes it
//! started and removes its directory, also when a test panics.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::pki::{TestCa, signing_key_pair_pem};
use crate::process::{ChildGuard, free_port};
use crate::scratch::ScratchDir;
use crate::tools::{ControlPlaneBinaries, control_plane_binaries};

/// How long the API server may take to answer `/readyz` (a cold start on 2 busy cores).
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// What a cluster with kubelets needs of its control plane beyond what the tests on plain
/// namespaces do.
#[derive(Clone, Debug, Default)]
pub struct ControlPlaneOptions {
    /// More names and addresses for the API server's serving certificate: the `kubernetes`
    /// Service's ClusterIP (pods' in-cluster clients connect to it) and the address the nodes
    /// reach it at.
    pub serving_names: Vec<String>,
    /// ServiceAccount admission: pods get their account's token mounted, as in every cluster.
    /// Off by default: without a controller manager no namespace has its `default` account,
    /// and this admission would refuse every pod object the stand-in tests create.
    pub service_account_admission: bool,
    /// An IPv6-only cluster's API server: it serves on `[::1]` (the URL, the advertised
    /// address, the certificate) and gives Services IPv6 cluster IPs. Its etcd, which only
    /// the API server talks to, stays on `127.0.0.1`.
    pub ipv6: bool,
}

/// A running etcd + kube-apiserver pair.
pub struct ControlPlane {
    // Field order is drop order: the API server stops before its store.
    apiserver: ChildGuard,
    etcd: ChildGuard,
    /// The processes' arguments, to start them again exactly so after [`ControlPlane::stop`].
    etcd_args: Vec<String>,
    apiserver_args: Vec<String>,
    binaries: ControlPlaneBinaries,
    kubeconfig: PathBuf,
    url: String,
    ca: TestCa,
    // Removed last, after both processes have exited.
    dir: ScratchDir,
}

impl ControlPlane {
    /// Finds or builds the binaries, starts etcd and the API server on free loopback ports, and
    /// waits until the API server is ready.
    pub async fn start() -> Result<Self> {
        Self::start_with(ControlPlaneOptions::default()).await
    }

    /// [`ControlPlane::start`] with options. A port taken between its choice and the bind
    /// (another program's listener) means another try with new ports.
    pub async fn start_with(options: ControlPlaneOptions) -> Result<Self> {
        let mut tries = 0;
        loop {
            tries += 1;
            match Self::start_once(&options).await {
                Err(e) if tries < 3 && format!("{e:#}").contains("address already in use") => {
                    eprintln!("[wgmesh] control plane: a port was taken, trying others: {e:#}");
                }
                result => return result,
            }
        }
    }

    async fn start_once(options: &ControlPlaneOptions) -> Result<Self> {
        let binaries = tokio::task::spawn_blocking(control_plane_binaries).await??;
        let dir = ScratchDir::new("wgmesh-control-plane-")?;
        let d = dir.path();

        let ca = TestCa::new("wgmesh-test-ca")?;
        let loopback = if options.ipv6 { "::1" } else { "127.0.0.1" };
        let mut serving_names = vec![loopback, "localhost"];
        serving_names.extend(options.serving_names.iter().map(String::as_str));
        let serving = ca.server_cert("kube-apiserver", &serving_names)?;
        let admin = ca.client_cert("wgmesh-admin", Some("system:masters"))?;
        write(d, "ca.crt", ca.cert_pem())?;
        write(d, "apiserver.crt", &serving.cert_pem)?;
        write(d, "apiserver.key", &serving.key_pem)?;
        // The API server's identity to kubelets (exec, logs, port-forward).
        let kubelet_client =
            ca.client_cert("kube-apiserver-kubelet-client", Some("system:masters"))?;
        write(d, "kubelet-client.crt", &kubelet_client.cert_pem)?;
        write(d, "kubelet-client.key", &kubelet_client.key_pem)?;
        write(d, "admin.crt", &admin.cert_pem)?;
        write(d, "admin.key", &admin.key_pem)?;
        let (sa_key, sa_pub) = signing_key_pair_pem()?;
        write(d, "sa.key", &sa_key)?;
        write(d, "sa.pub", &sa_pub)?;

        let etcd_port = free_port()?;
        let etcd_peer_port = free_port()?;
        let api_port = free_port()?;
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let url = format!(
            "https://{}",
            std::net::SocketAddr::new(loopback.parse()?, api_port)
        );
        // IPv6 Services in an IPv6-only cluster (the API server wants its advertised
        // address's family first); /112 is as large as it allows.
        let service_range = if options.ipv6 {
            "fd00:10:96::/112"
        } else {
            "10.96.0.0/16"
        };

        let etcd_args: Vec<String> = vec![
            format!("--data-dir={}", d.join("etcd").display()),
            format!("--listen-client-urls={etcd_url}"),
            format!("--advertise-client-urls={etcd_url}"),
            format!("--listen-peer-urls=http://127.0.0.1:{etcd_peer_port}"),
            format!("--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer_port}"),
            format!("--initial-cluster=default=http://127.0.0.1:{etcd_peer_port}"),
            "--unsafe-no-fsync".into(),
            "--log-level=warn".into(),
        ];
        let mut etcd_cmd = Command::new(&binaries.etcd);
        etcd_cmd.args(&etcd_args);
        let etcd = ChildGuard::spawn("etcd", etcd_cmd, &d.join("etcd.log"))?;

        let p = |name: &str| d.join(name).display().to_string();
        let admission = if options.service_account_admission {
            "--enable-admission-plugins=ServiceAccount"
        } else {
            "--disable-admission-plugins=ServiceAccount"
        };
        let apiserver_args: Vec<String> = vec![
            format!("--etcd-servers={etcd_url}"),
            format!("--bind-address={loopback}"),
            format!("--advertise-address={loopback}"),
            format!("--secure-port={api_port}"),
            format!("--cert-dir={}", p("apiserver-certs")),
            format!("--tls-cert-file={}", p("apiserver.crt")),
            format!("--tls-private-key-file={}", p("apiserver.key")),
            format!("--client-ca-file={}", p("ca.crt")),
            "--authorization-mode=RBAC".into(),
            format!("--kubelet-client-certificate={}", p("kubelet-client.crt")),
            format!("--kubelet-client-key={}", p("kubelet-client.key")),
            // Nodes are reached at their address: their names resolve nowhere (kubeadm's order).
            "--kubelet-preferred-address-types=InternalIP,Hostname".into(),
            format!("--service-account-issuer={url}"),
            format!("--service-account-key-file={}", p("sa.pub")),
            format!("--service-account-signing-key-file={}", p("sa.key")),
            "--api-audiences=https://kubernetes.default.svc,wgmesh".into(),
            format!("--service-cluster-ip-range={service_range}"),
            admission.into(),
            "--allow-privileged=true".into(),
            "--endpoint-reconciler-type=none".into(),
            "--enable-priority-and-fairness=false".into(),
            "--v=0".into(),
        ];
        let mut api_cmd = Command::new(&binaries.kube_apiserver);
        api_cmd.args(&apiserver_args);
        let apiserver = ChildGuard::spawn("kube-apiserver", api_cmd, &d.join("apiserver.log"))?;

        let kubeconfig = d.join("kubeconfig");
        write(
            d,
            "kubeconfig",
            &kubeconfig_yaml(&url, ca.cert_pem(), &admin.cert_pem, &admin.key_pem),
        )?;

        let mut cp = ControlPlane {
            apiserver,
            etcd,
            etcd_args,
            apiserver_args,
            binaries,
            kubeconfig,
            url,
            ca,
            dir,
        };
        cp.wait_ready().await?;
        Ok(cp)
    }

    /// Stops the API server and etcd (SIGTERM, as an outage or an upgrade would), keeping
    /// their data: [`ControlPlane::start_again`] brings them back with the same state, ports
    /// and certificates.
    pub fn stop(&mut self) {
        self.apiserver.stop(Duration::from_secs(10));
        self.etcd.stop(Duration::from_secs(10));
    }

    /// Starts etcd and the API server again after [`ControlPlane::stop`], and waits until the
    /// API server is ready.
    pub async fn start_again(&mut self) -> Result<()> {
        let d = self.dir.path().to_owned();
        let mut etcd = Command::new(&self.binaries.etcd);
        etcd.args(&self.etcd_args);
        self.etcd = ChildGuard::spawn("etcd", etcd, &d.join("etcd.log"))?;
        let mut api = Command::new(&self.binaries.kube_apiserver);
        api.args(&self.apiserver_args);
        self.apiserver = ChildGuard::spawn("kube-apiserver", api, &d.join("apiserver.log"))?;
        self.wait_ready().await
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let client = self.client().await?;
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last_err = String::new();
        while Instant::now() < deadline {
            if !self.apiserver.is_running() {
                bail!(
                    "kube-apiserver exited during start-up; its log ends with:\n{}",
                    self.apiserver.log_tail(30)
                );
            }
            if !self.etcd.is_running() {
                bail!(
                    "etcd exited during start-up; its log ends with:\n{}",
                    self.etcd.log_tail(30)
                );
            }
            let req = http::Request::get("/readyz").body(Vec::new())?;
            match client.request_text(req).await {
                Ok(body) if body.trim() == "ok" => return Ok(()),
                Ok(body) => last_err = body,
                Err(e) => last_err = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        bail!(
            "kube-apiserver was not ready after {READY_TIMEOUT:?} ({last_err}); its log ends with:\n{}",
            self.apiserver.log_tail(30)
        )
    }

    /// A client with cluster-admin rights.
    pub async fn client(&self) -> Result<kube::Client> {
        let kubeconfig = Kubeconfig::read_from(&self.kubeconfig)?;
        let config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
        Ok(kube::Client::try_from(config)?)
    }

    /// A client acting as `user` (impersonated by the admin, as `kubectl --as`): RBAC and
    /// admission see that user, with the groups the API server gives it.
    pub async fn client_as(&self, user: &str) -> Result<kube::Client> {
        let kubeconfig = Kubeconfig::read_from(&self.kubeconfig)?;
        let mut config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
        config.auth_info.impersonate = Some(user.to_owned());
        Ok(kube::Client::try_from(config)?)
    }

    /// The admin kubeconfig file, for kubectl and for programs under test.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The API server's URL (`https://127.0.0.1:PORT`, or `https://[::1]:PORT`).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The CA that signed the API server's certificate; tests may issue more certificates.
    pub fn ca(&self) -> &TestCa {
        &self.ca
    }

    /// The directory this control plane keeps its files in (removed on drop).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The PIDs of etcd and the API server (for resource measurements).
    pub fn pids(&self) -> Vec<u32> {
        [&self.etcd, &self.apiserver]
            .into_iter()
            .filter_map(ChildGuard::pid)
            .collect()
    }

    pub fn binaries(&self) -> &ControlPlaneBinaries {
        &self.binaries
    }

    /// Runs kubectl against this control plane.
    pub fn kubectl(&self, args: &[&str]) -> Result<Output> {
        Command::new(&self.binaries.kubectl)
            .arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .args(args)
            .output()
            .with_context(|| format!("running kubectl {}", args.join(" ")))
    }

    /// Runs kubectl and returns its stdout, failing with its stderr when it fails.
    pub fn kubectl_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.kubectl(args)?;
        if !out.status.success() {
            bail!(
                "kubectl {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

fn write(dir: &Path, name: &str, contents: &str) -> Result<()> {
    let path = dir.join(name);
    std::fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))
}

/// A kubeconfig for `url` with a client certificate (`url`'s host must be in the API server's
/// certificate: see [`ControlPlaneOptions::serving_names`]).
pub fn kubeconfig_yaml(url: &str, ca: &str, cert: &str, key: &str) -> String {
    use base64::Engine as _;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: wgmesh-local
  cluster:
    server: {url}
    certificate-authority-data: {ca}
users:
- name: wgmesh-admin
  user:
    client-certificate-data: {cert}
    client-key-data: {key}
contexts:
- name: wgmesh-local
  context:
    cluster: wgmesh-local
    user: wgmesh-admin
current-context: wgmesh-local
",
        ca = b64(ca),
        cert = b64(cert),
        key = b64(key),
    )
}
