//! A real Kubernetes cluster on one machine: the local control plane ([`ControlPlane`]) plus
//! kube-scheduler and kube-controller-manager (allocating pod CIDRs to Nodes), and N nodes,
//! each a network namespace on an underlay bridge with a default route through an underlay
//! router, a private mount namespace, and its own containerd, kubelet and kube-proxy (see
//! [`node`]).
//!
//! kind's idea without containers as nodes: there is no container engine or registry here,
//! so the nodes are namespaces and every image is built on this machine ([`image`]).
//!
//! Dropping the cluster stops every process it started, by PID, removes the nodes' cgroups
//! and namespaces and the underlay, and puts back the kernel settings the kubelets changed,
//! also when a test fails.

pub mod chart;
pub mod host;
pub mod idle;
pub mod image;
pub mod lifecycle;
pub mod node;
pub mod proxy;
pub mod sweep;

use std::fs::File;
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams};

use crate::ControlPlane;
use crate::control_plane::{ControlPlaneOptions, kubeconfig_yaml};
use crate::netns::{Netns, RootLink, UnderlayLinks, underlay_router, veth_to_bridge};
use crate::process::{ChildGuard, free_port};
use crate::scratch::ScratchDir;
use crate::tools::{ClusterBinaries, cluster_binaries};

use self::image::{BUSYBOX_IMAGE, ClusterImages};
use self::node::{NodeParams, RealNode};
use self::proxy::TcpForwarder;
use self::sweep::Ledger;

/// The pods' address range, split into one /24 per Node by the controller manager.
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
/// The Services' range, as the API server has it.
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
/// The image docs/kind.md's test pods run (`kubectl run --image=busybox:1.36`), as
/// containerd names it.
pub const DOCS_BUSYBOX_IMAGE: &str = "docker.io/library/busybox:1.36";
/// The `kubernetes` Service's ClusterIP: the first address of [`SERVICE_CIDR`].
pub const API_SERVICE_IP: &str = "10.96.0.1";
/// The underlay router's last octet (every node's default gateway).
const ROUTER_OCTET: u8 = 253;

/// The pod network a cluster starts with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodNetwork {
    /// None: the nodes stay NotReady until a CNI is installed (wgmesh in CNI mode).
    None,
    /// A plain one, as another CNI would set up (kindnet's design): Debian's bridge and
    /// host-local plugins on each node over its pod CIDR, and on every node and the underlay
    /// router a route to each node's pod CIDR via that node's address.
    Bridge,
}

pub struct RealCluster {
    // Field order is drop order: the nodes first, then the cluster's controllers, the path to
    // the API server, the underlay, the control plane, and the directory last.
    pub nodes: Vec<RealNode>,
    scheduler: ChildGuard,
    controller_manager: ChildGuard,
    api_forwarder: TcpForwarder,
    pub router: Netns,
    _underlay_links: UnderlayLinks,
    _kernel: host::KernelSettings,
    pub cp: ControlPlane,
    /// The underlay's /24 prefix, such as `192.168.101`.
    pub underlay: String,
    pub id: String,
    pod_network: PodNetwork,
    binaries: ClusterBinaries,
    images: ClusterImages,
    dir: ScratchDir,
    _underlay_lock: File,
}

impl RealCluster {
    /// The control plane, the scheduler and controller manager, and `n` nodes whose kubelets
    /// have registered their Nodes (not yet Ready: see [`RealCluster::wait_nodes_ready`]).
    pub async fn start(n: usize, pod_network: PodNetwork) -> Result<Self> {
        host::ensure_packages()?;
        let binaries = tokio::task::spawn_blocking(cluster_binaries).await??;
        let (octet, underlay_lock) = crate::mesh::reserve_underlay()?;
        let id = format!("k{octet}");
        let underlay = format!("192.168.{octet}");
        sweep::sweep_abandoned();
        let dir = ScratchDir::new(sweep::DIR_PREFIX)?;
        let d = dir.path().to_owned();
        let ledger = Ledger::new(&d);
        // Pods reach the API server as in every cluster: through the `kubernetes` Service's
        // ClusterIP (kube-proxy) to the address the nodes reach it at, with their account's
        // token mounted by ServiceAccount admission.
        let cp = ControlPlane::start_with(ControlPlaneOptions {
            serving_names: vec![API_SERVICE_IP.into(), format!("{underlay}.{ROUTER_OCTET}")],
            service_account_admission: true,
            ..Default::default()
        })
        .await?;
        for pid in cp.pids() {
            ledger.process(Some(pid));
        }
        let images = ClusterImages::build(&d.join("images"))?;

        ledger.link(&format!("wgm{id}br"));
        ledger.link(&format!("wgm{id}vr"));
        ledger.netns(&format!("wgm{id}r"));
        let (router, underlay_links) = underlay_router(&id, &underlay, ROUTER_OCTET)?;

        // The API server listens on loopback; the nodes reach it on the underlay's bridge.
        let api_port: u16 = cp
            .url()
            .rsplit(':')
            .next()
            .context("the API server URL has no port")?
            .parse()?;
        let api_forwarder = TcpForwarder::start(
            &router,
            format!("{underlay}.{ROUTER_OCTET}:0").parse()?,
            SocketAddr::from(([127, 0, 0, 1], api_port)),
        )?;

        publish_api_endpoints(&cp, api_forwarder.addr())?;

        let cp_dir = cp.dir().to_owned();
        let kubeconfig = cp.kubeconfig().display().to_string();
        let p = |name: &str| cp_dir.join(name).display().to_string();

        let sched_port = free_port()?;
        let mut scheduler = Command::new(&binaries.kube_scheduler);
        scheduler.args([
            format!("--kubeconfig={kubeconfig}"),
            "--leader-elect=false".into(),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={sched_port}"),
            format!("--cert-dir={}", d.join("scheduler-certs").display()),
            "--v=1".into(),
        ]);
        let scheduler = ChildGuard::spawn("kube-scheduler", scheduler, &d.join("scheduler.log"))?;
        ledger.process(scheduler.pid());

        let kcm_port = free_port()?;
        let mut kcm = Command::new(&binaries.kube_controller_manager);
        kcm.args([
            format!("--kubeconfig={kubeconfig}"),
            "--leader-elect=false".into(),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={kcm_port}"),
            format!("--cert-dir={}", d.join("kcm-certs").display()),
            "--allocate-node-cidrs=true".into(),
            format!("--cluster-cidr={CLUSTER_CIDR}"),
            "--node-cidr-mask-size=24".into(),
            format!("--service-cluster-ip-range={SERVICE_CIDR}"),
            format!("--root-ca-file={}", p("ca.crt")),
            format!("--service-account-private-key-file={}", p("sa.key")),
            "--use-service-account-credentials=false".into(),
            "--v=1".into(),
        ]);
        let controller_manager =
            ChildGuard::spawn("kube-controller-manager", kcm, &d.join("kcm.log"))?;
        ledger.process(controller_manager.pid());

        // Kubelets authenticate as system:node:<name> in system:nodes. Without the Node
        // authorizer (the API server runs RBAC only), the group gets the system:node role,
        // as kubeadm once bound it.
        cp.kubectl_ok(&[
            "create",
            "clusterrolebinding",
            "wgmesh-test-nodes",
            "--clusterrole=system:node",
            "--group=system:nodes",
        ])?;

        let mut cluster = RealCluster {
            nodes: Vec::new(),
            scheduler,
            controller_manager,
            api_forwarder,
            router,
            _underlay_links: underlay_links,
            _kernel: host::KernelSettings::save(&d),
            cp,
            underlay,
            id,
            pod_network,
            binaries,
            images,
            dir,
            _underlay_lock: underlay_lock,
        };
        for i in 1..=n {
            cluster.add_node(i)?;
        }
        cluster
            .wait_nodes_registered(Duration::from_secs(120))
            .await?;
        Ok(cluster)
    }

    /// Waits until every node's kubelet has registered its Node, as `kind create cluster`
    /// does before it returns: a DaemonSet installed then covers every node.
    pub async fn wait_nodes_registered(&mut self, timeout: Duration) -> Result<()> {
        let api: Api<Node> = Api::all(self.cp.client().await?);
        let deadline = Instant::now() + timeout;
        loop {
            self.check_running()?;
            let names: Vec<String> = api
                .list(&ListParams::default())
                .await?
                .items
                .into_iter()
                .filter_map(|n| n.metadata.name)
                .collect();
            let missing: Vec<&str> = self
                .nodes
                .iter()
                .map(|n| n.name.as_str())
                .filter(|n| !names.iter().any(|m| m == n))
                .collect();
            if missing.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("nodes not registered after {timeout:?}: {missing:?}");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Starts node `i` (`node-i`, at `<underlay>.i`).
    pub fn add_node(&mut self, i: usize) -> Result<()> {
        let node = self.boot_node(i, &self.images.archives.clone(), None)?;
        // docs/kind.md's pods run busybox:1.36 (pulled there): here it is the busybox built
        // here, so the documented commands run as written.
        node.tag_image(BUSYBOX_IMAGE, DOCS_BUSYBOX_IMAGE)?;
        self.nodes.push(node);
        Ok(())
    }

    /// Reboots node `name` as a machine reboots: it shuts down as in
    /// [`RealCluster::remove_node`] (its kernel state goes with its network namespace), what
    /// a real machine keeps in memory is emptied (`/run`, containerd's state), and it starts
    /// again from its disk: its images, the kubelet's and containerd's state, its CNI
    /// configuration and wgmesh's state are as they were. The kubelet then starts the
    /// node's pods again. `link_up` is called with the node's new underlay link before
    /// containerd and the kubelet start.
    pub fn reboot_node(&mut self, name: &str, link_up: node::LinkUp<'_>) -> Result<()> {
        let k = self
            .nodes
            .iter()
            .position(|n| n.name == name)
            .with_context(|| format!("no node {name}"))?;
        let node = self.nodes.remove(k);
        let (i, root) = (node.index, node.root.clone());
        drop(node);
        RealNode::forget_memory(&root)?;
        let node = self.boot_node(i, &[], Some(link_up))?;
        if self.pod_network == PodNetwork::Bridge {
            // The other network's routes to the other nodes' pods, put back as its daemon
            // (kindnet) does when it starts again.
            let cidrs = self.cp.kubectl_ok(&[
                "get",
                "nodes",
                "-o",
                r#"jsonpath={range .items[*]}{.metadata.name} {.spec.podCIDR}{"\n"}{end}"#,
            ])?;
            for line in cidrs.lines() {
                let mut f = line.split_whitespace();
                let (Some(other), Some(cidr)) = (f.next(), f.next()) else {
                    continue;
                };
                if let Some(via) = self.nodes.iter().find(|n| n.name == other) {
                    node.ns
                        .ip(&["route", "replace", cidr, "via", &via.node_ip])?;
                }
            }
        }
        self.nodes.insert(k, node);
        Ok(())
    }

    /// Starts node `i` from its directory (created when missing), importing `images`.
    fn boot_node(
        &self,
        i: usize,
        images: &[std::path::PathBuf],
        link_up: Option<node::LinkUp<'_>>,
    ) -> Result<RealNode> {
        let name = format!("node-{i}");
        let cert = self
            .cp
            .ca()
            .client_cert(&format!("system:node:{name}"), Some("system:nodes"))?;
        let kubeconfig = kubeconfig_yaml(
            &format!("https://{}", self.api_forwarder.addr()),
            self.cp.ca().cert_pem(),
            &cert.cert_pem,
            &cert.key_pem,
        );
        let proxy_cert = self.cp.ca().client_cert("system:kube-proxy", None)?;
        let proxy_kubeconfig = kubeconfig_yaml(
            &format!("https://{}", self.api_forwarder.addr()),
            self.cp.ca().cert_pem(),
            &proxy_cert.cert_pem,
            &proxy_cert.key_pem,
        );
        let root = self.dir.path().join(&name);
        std::fs::create_dir_all(&root)?;
        let ca_file = self.cp.dir().join("ca.crt");
        RealNode::start(
            NodeParams {
                name: name.clone(),
                index: i,
                netns: format!("wgm{}n{i}", self.id),
                node_ip: format!("{}.{i}", self.underlay),
                gateway: format!("{}.{ROUTER_OCTET}", self.underlay),
                bridge: format!("wgm{}br", self.id),
                root_link: self.underlay_link(i),
                root,
                kubeconfig,
                ca_file: &ca_file,
                kubelet: &self.binaries.kubelet,
                kube_proxy: &self.binaries.kube_proxy,
                proxy_kubeconfig,
                images,
                cgroup_root: format!("/wgmesh-{}-{name}", self.id),
                ledger: &Ledger::new(self.dir.path()),
            },
            link_up,
        )
        .with_context(|| format!("starting {name}"))
    }

    /// Shuts node `name` down, as when its machine is turned off: its kubelet, kube-proxy,
    /// containerd and pods stop, and its namespaces and underlay link go. The Node object
    /// stays until it is deleted.
    pub fn remove_node(&mut self, name: &str) -> Result<()> {
        let k = self
            .nodes
            .iter()
            .position(|n| n.name == name)
            .with_context(|| format!("no node {name}"))?;
        drop(self.nodes.remove(k));
        Ok(())
    }

    /// The node named `name`.
    pub fn node(&self, name: &str) -> Result<&RealNode> {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .with_context(|| format!("no node {name}"))
    }

    /// A host on the underlay that is no node (a laptop, a router to a remote site): a
    /// namespace at `<underlay>.<octet>` with the underlay router as its default gateway.
    pub fn outside_host(&self, tag: &str, octet: u8) -> Result<(Netns, RootLink)> {
        let ledger = Ledger::new(self.dir.path());
        ledger.netns(&format!("wgm{}{tag}", self.id));
        ledger.link(&format!("wgm{}v{tag}", self.id));
        let ns = Netns::create(&format!("wgm{}{tag}", self.id))?;
        let link = veth_to_bridge(
            &format!("wgm{}br", self.id),
            &format!("wgm{}v{tag}", self.id),
            &ns,
            "eth0",
            &format!("{}.{octet}/24", self.underlay),
        )?;
        ns.ip(&[
            "route",
            "add",
            "default",
            "via",
            &format!("{}.{ROUTER_OCTET}", self.underlay),
        ])?;
        Ok((ns, link))
    }

    /// Waits until every node is Ready. With [`PodNetwork::Bridge`], as the controller
    /// manager gives a Node its pod CIDR, installs that node's bridge network and routes the
    /// CIDR on the underlay router.
    pub async fn wait_nodes_ready(&mut self, timeout: Duration) -> Result<()> {
        let client = self.cp.client().await?;
        let api: Api<Node> = Api::all(client);
        let deadline = Instant::now() + timeout;
        let mut configured: Vec<Option<String>> = vec![None; self.nodes.len()];
        let last = loop {
            self.check_running()?;
            let list = api.list(&ListParams::default()).await?;
            let mut ready = 0;
            let mut new_cidr = false;
            for (k, node) in self.nodes.iter().enumerate() {
                let Some(obj) = list
                    .items
                    .iter()
                    .find(|o| o.metadata.name.as_deref() == Some(&node.name))
                else {
                    continue;
                };
                if self.pod_network == PodNetwork::Bridge
                    && configured[k].is_none()
                    && let Some(cidr) = obj.spec.as_ref().and_then(|s| s.pod_cidr.clone())
                {
                    node.install_bridge_cni(&cidr)?;
                    self.router
                        .ip(&["route", "replace", &cidr, "via", &node.node_ip])?;
                    configured[k] = Some(cidr);
                    new_cidr = true;
                }
                if is_ready(obj) {
                    ready += 1;
                }
            }
            // As kindnet does: every node routes each other node's pod CIDR via its address.
            if new_cidr {
                for (a, cidr) in self.nodes.iter().zip(&configured) {
                    let Some(cidr) = cidr else { continue };
                    for b in self.nodes.iter().filter(|b| b.name != a.name) {
                        b.ns.ip(&["route", "replace", cidr, "via", &a.node_ip])?;
                    }
                }
            }
            if ready == self.nodes.len() {
                return Ok(());
            }
            if Instant::now() > deadline {
                break format!("{ready} of {} nodes Ready", self.nodes.len());
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        let logs: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("--- {} kubelet:\n{}", n.name, n.kubelet_log_tail(15)))
            .collect();
        bail!(
            "nodes not Ready after {timeout:?} ({last}):\n{}",
            logs.join("\n")
        )
    }

    /// Fails with the end of its log if a process of the cluster has exited.
    pub fn check_running(&mut self) -> Result<()> {
        for guard in [&mut self.scheduler, &mut self.controller_manager] {
            if !guard.is_running() {
                bail!(
                    "{} exited; its log ends with:\n{}",
                    guard.name().to_owned(),
                    guard.log_tail(30)
                );
            }
        }
        for node in &mut self.nodes {
            node.check_running()?;
        }
        Ok(())
    }

    /// PIDs of every process of the cluster: control plane, controllers and nodes (for
    /// resource measurements).
    pub fn pids(&self) -> Vec<u32> {
        let mut pids: Vec<u32> = [&self.scheduler, &self.controller_manager]
            .into_iter()
            .filter_map(ChildGuard::pid)
            .collect();
        pids.extend(self.cp.pids());
        for node in &self.nodes {
            pids.extend(node.pids());
        }
        pids
    }

    /// The root-namespace end of node `index`'s underlay link (captures watch it).
    pub fn underlay_link(&self, index: usize) -> String {
        format!("wgm{}v{index}", self.id)
    }

    /// The cluster's scratch directory (logs, node directories); removed on drop.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }
}

/// `WGMESH_REAL_CLUSTER_LOGS=DIR` keeps the cluster's logs and configuration files in DIR
/// when it is dropped: the control plane's, the controllers', and each node's.
impl Drop for RealCluster {
    fn drop(&mut self) {
        let Some(keep) = std::env::var_os("WGMESH_REAL_CLUSTER_LOGS") else {
            return;
        };
        let keep = std::path::PathBuf::from(keep);
        copy_logs(self.dir.path(), &keep.join("cluster"));
        copy_logs(self.cp.dir(), &keep.join("control-plane"));
        eprintln!("[wgmesh] real cluster: logs kept in {}", keep.display());
    }
}

/// Copies the logs and configuration files under `from` to `to`, leaving out the runtimes'
/// state (images, snapshots, pods' volumes).
fn copy_logs(from: &std::path::Path, to: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(from) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Ok(kind) = e.file_type() else { continue };
        if kind.is_dir() && !matches!(name.as_str(), "containerd" | "root" | "images") {
            copy_logs(&e.path(), &to.join(&name));
        } else if kind.is_file()
            && [".log", ".yaml", ".toml", ".conflist"]
                .iter()
                .any(|ext| name.ends_with(ext))
        {
            let _ = std::fs::create_dir_all(to);
            let _ = std::fs::copy(e.path(), to.join(&name));
        }
    }
}

fn is_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The `kubernetes` Service's endpoints: the API server runs with no endpoint reconciler (it
/// listens on loopback, which is no address for a Service), so its address on the underlay
/// (the forwarder) is published here, as the API server would publish its advertised address.
fn publish_api_endpoints(cp: &ControlPlane, addr: SocketAddr) -> Result<()> {
    let (ip, port) = (addr.ip().to_string(), addr.port());
    let objects = serde_json::json!({
        "apiVersion": "v1",
        "kind": "List",
        "items": [{
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": "kubernetes",
                "namespace": "default",
                "labels": {"kubernetes.io/service-name": "kubernetes"},
            },
            "addressType": "IPv4",
            "endpoints": [{"addresses": [ip], "conditions": {"ready": true}}],
            "ports": [{"name": "https", "port": port, "protocol": "TCP"}],
        }, {
            "apiVersion": "v1",
            "kind": "Endpoints",
            "metadata": {
                "name": "kubernetes",
                "namespace": "default",
                // The slice above is the one kube-proxy reads: no mirrored copy.
                "labels": {"endpointslice.kubernetes.io/skip-mirror": "true"},
            },
            "subsets": [{
                "addresses": [{"ip": ip}],
                "ports": [{"name": "https", "port": port, "protocol": "TCP"}],
            }],
        }],
    });
    let file = cp.dir().join("kubernetes-endpoints.json");
    std::fs::write(&file, objects.to_string())?;
    cp.kubectl_ok(&["apply", "-f", &file.display().to_string()])?;
    Ok(())
}
