//! A whole test mesh on one machine: the local control plane with the Helm chart installed,
//! the chart's controller, and N "nodes" (network namespaces on a shared underlay bridge),
//! each running the chart's agent, with a "pod" attached by the real CNI plugins.
//!
//! The controller and agents run with exactly the command, arguments and environment of the
//! installed Deployment and DaemonSet (see [`crate::pods`]); only the chart's values differ
//! from a user's (free ports, one controller replica, debug logs, short report interval).
//!
//! Nodes are like real ones in one respect that matters for leaks: each has a default route
//! through an underlay router (a namespace on the bridge, forwarding, with routes back to
//! every node's pod CIDR, as a cloud's VPC routes have). So a packet no more specific route
//! takes leaves the node in plaintext and reaches its destination, instead of failing as
//! unreachable, and a leak test cannot pass for the wrong reason.
//!
//! Two network modes, as the chart has them:
//! - [`NetworkMode::Cni`]: the agents write the nodes' conflist, and pods are attached
//!   by running the plugins of that very file;
//! - [`NetworkMode::Addon`]: a pre-existing routed "CNI", as kindnet installs it (a bridge per
//!   node, and plain routes to the other nodes' pod CIDRs via their node addresses), under
//!   agents in add-on mode.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::ControlPlane;
use crate::cluster;
use crate::controller::Controller;
use crate::helm::{Helm, NAMESPACE};
use crate::netns::sh;
use crate::netns::{
    Netns, RootLink, UnderlayLinks, cni_add_conflist, cni_add_pod, underlay_router, veth_to_bridge,
};
use crate::pods::{self, Installed, Launch, VolumeSources};
use crate::process::{ChildGuard, free_port};
use crate::scratch::ScratchDir;

/// The conflist the agent writes in CNI mode, relative to a node's root.
const CONFLIST: &str = "etc/cni/net.d/05-wgmesh.conflist";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetworkMode {
    Cni,
    Addon,
}

pub struct TestNode {
    pub name: String,
    pub index: usize,
    pub node_ip: String,
    pub pod_cidr: String,
    pub pod_ip: String,
    // Drop order: the agent first, then the pod and node namespaces, then the root link.
    pub agent: Option<ChildGuard>,
    pub pod: Netns,
    pub ns: Netns,
    /// The node's NAT router ([`MeshOptions::behind_nat`]), between it and the underlay.
    pub nat: Option<Netns>,
    _veth: RootLink,
    /// The node's "host" filesystem (hostPath volumes).
    pub host_root: PathBuf,
    launch: Option<Launch>,
}

/// A node's namespaces and links, wired to the underlay, before its pod is attached and its
/// Node created ([`TestMesh::register_node`]).
struct WiredNode {
    ns: Netns,
    pod: Netns,
    nat: Option<Netns>,
    veth: RootLink,
    /// The first is the one the pod is attached from.
    pod_cidrs: Vec<String>,
    /// The Node's InternalIPs; the first is the node IP.
    addresses: Vec<String>,
}

pub struct TestMesh {
    pub nodes: Vec<TestNode>,
    pub controller: Option<Controller>,
    pub mode: NetworkMode,
    /// Dual-stack and IPv6-only meshes: the underlay's IPv6 /64 prefix (`fd00:<octet>:`), whose `::<i>` is
    /// node `i`, `::fd` the router and `::fe` the host.
    pub underlay6: Option<String>,
    /// An IPv6-only cluster ([`MeshOptions::ipv6_only`]).
    pub ipv6_only: bool,
    pub client: kube::Client,
    /// The underlay's /24 prefix, such as `192.168.101`.
    pub underlay: String,
    pub id: String,
    pub installed: Installed,
    /// Where the controller listens (`address:port`) when it runs on a node
    /// ([`MeshOptions::controller_on_node`]), behind [`SERVICE_IP`].
    controller_host: Option<String>,
    /// The API server's loopback, forwarded into the controller's node.
    _api_forwarder: Option<crate::real_cluster::proxy::TcpForwarder>,
    /// The underlay router, at `<underlay>.253`: every node's default gateway.
    pub router: Netns,
    _underlay_links: UnderlayLinks,
    pub cp: ControlPlane,
    dir: ScratchDir,
    /// Holds the underlay's /24 for this mesh (see [`reserve_underlay`]); released last.
    _underlay_lock: File,
}

/// How a test mesh is made; `Default` is [`TestMesh::start`]'s.
#[derive(Debug, Clone)]
pub struct MeshOptions {
    pub mode: NetworkMode,
    /// Chart values merged over the test's (objects key by key), as a user's `--values`
    /// file would add them.
    pub values: serde_json::Value,
    /// Nodes, pods and the underlay get IPv6 addresses too: each Node has an IPv6 InternalIP
    /// and pod CIDR `fd00:10:244:<i>::/64` after the IPv4 ones, and the underlay router
    /// routes those back as it does the IPv4 ones.
    pub dual_stack: bool,
    /// An IPv6-only cluster: the nodes' underlay links have IPv6 addresses only (`::<i>` of
    /// the underlay's /64, default route through the router's `::fd`), Nodes list only IPv6
    /// InternalIPs and pod CIDRs (`fd00:10:244:<i>::/64`), the API server serves on `[::1]`
    /// with IPv6 Services, and the controller's pod IP (the host's `::fe`, which the agents'
    /// Service environment names) is IPv6: every control connection runs over IPv6. The
    /// mesh's pools are the test's to make IPv6 (`values`).
    pub ipv6_only: bool,
    /// Nodes (by index, from 1) each behind its own NAT router, as a home or office network
    /// puts a machine: the node has a private address (`172.16.<i>.2/24`, its InternalIP)
    /// on a link to its router (`172.16.<i>.1`, its default gateway), and the router's
    /// outside is on the underlay at `<underlay>.<150 + i>`, masquerading what the node sends
    /// (iptables MASQUERADE) and routing out through the underlay router. Nothing routes
    /// back to the node or its pods but the NAT's own connection tracking, and its Node is
    /// annotated `wgmesh.io/behind-nat: "true"`. IPv4 only.
    pub behind_nat: Vec<usize>,
    /// The controller runs on node `k`'s host network (by index, from 1), as the chart's
    /// `hostNetwork: true` places it on a real cluster, rather than on the host: the agents
    /// reach it through a Service IP ([`SERVICE_IP`]) that every node translates to node
    /// `k`'s address (kube-proxy's iptables rules: the masquerade mark, DNAT, masquerade), and it
    /// reaches the API server through a forwarder on the node's loopback. Nodes that join
    /// get the same translation; node `k` must not be removed. IPv4 only.
    pub controller_on_node: Option<usize>,
}

/// The controller Service's cluster IP when the controller runs on a node
/// ([`MeshOptions::controller_on_node`]).
pub const SERVICE_IP: &str = "10.96.200.10";

/// The underlay address of node `i`'s NAT router: `<underlay>.<NAT_ROUTER_OCTET + i>`.
pub const NAT_ROUTER_OCTET: usize = 150;

impl Default for MeshOptions {
    fn default() -> Self {
        MeshOptions {
            mode: NetworkMode::Cni,
            values: serde_json::json!({}),
            dual_stack: false,
            ipv6_only: false,
            behind_nat: Vec::new(),
            controller_on_node: None,
        }
    }
}

/// The IPv6 underlay prefix of the mesh whose IPv4 underlay is `192.168.<octet>`.
fn underlay6(octet: u8) -> String {
    format!("fd00:{octet}:")
}

/// The controller's pod IP: the host's address on the underlay, `<underlay>.254`, or in an
/// IPv6-only cluster `<underlay6>:fe`.
fn controller_ip(underlay: &str, ipv6_only: Option<String>) -> String {
    match ipv6_only {
        Some(prefix) => format!("{prefix}:fe"),
        None => format!("{underlay}.254"),
    }
}

/// The underlay router's last octet.
pub const ROUTER_OCTET: u8 = 253;

/// Picks a free underlay /24 `192.168.X` (X in 100..200) for a new mesh: one that no address
/// of the root namespace is on (meshes of other processes, whichever harness version made
/// them) and whose lock file no live mesh holds (this process's and others'). The lock is
/// held as long as the returned file is open. Starting from a pid-derived X keeps concurrent
/// processes from contending for the same one first.
pub fn reserve_underlay() -> Result<(u8, File)> {
    let dir = std::env::temp_dir().join("wgmesh-underlays");
    std::fs::create_dir_all(&dir)?;
    let start = std::process::id() % 100;
    for k in 0..100 {
        let octet = (100 + (start + k) % 100) as u8;
        let used = crate::netns::sh("ip", &["-o", "-4", "addr", "show"])?;
        if used.contains(&format!(" 192.168.{octet}.")) {
            continue;
        }
        let file = File::create(dir.join(format!("192.168.{octet}.lock")))?;
        if file.try_lock().is_ok() {
            return Ok((octet, file));
        }
    }
    bail!("no free underlay /24 in 192.168.100-199.0/24")
}

/// `over` merged into `base`: objects key by key, anything else replaced.
fn merge_values(base: serde_json::Value, over: serde_json::Value) -> serde_json::Value {
    match (base, over) {
        (serde_json::Value::Object(mut base), serde_json::Value::Object(over)) => {
            for (key, value) in over {
                let merged = match base.remove(&key) {
                    Some(old) => merge_values(old, value),
                    None => value,
                };
                base.insert(key, merged);
            }
            serde_json::Value::Object(base)
        }
        (_, over) => over,
    }
}

impl TestMesh {
    /// A mesh in CNI mode: the control plane, the chart, the controller, and `n` nodes with
    /// agents and pods.
    pub async fn start(n: usize) -> Result<Self> {
        Self::start_in(n, NetworkMode::Cni).await
    }

    pub async fn start_in(n: usize, mode: NetworkMode) -> Result<Self> {
        Self::start_with(
            n,
            MeshOptions {
                mode,
                ..Default::default()
            },
        )
        .await
    }

    pub async fn start_with(n: usize, options: MeshOptions) -> Result<Self> {
        let MeshOptions {
            mode,
            values: extra,
            dual_stack,
            ipv6_only,
            behind_nat,
            controller_on_node,
        } = options;
        if !behind_nat.is_empty() && (dual_stack || ipv6_only) {
            bail!("nodes behind NAT are IPv4 only here");
        }
        if let Some(k) = controller_on_node
            && (dual_stack || ipv6_only || behind_nat.contains(&k) || k == 0)
        {
            bail!("the controller runs on an IPv4 node of the underlay, not behind NAT");
        }
        let (octet, underlay_lock) = reserve_underlay()?;
        // Unique while the lock is held; the letter keeps it apart from the numeric ids of
        // older harnesses (process id and sequence).
        let id = format!("u{octet}");
        let underlay = format!("192.168.{octet}");
        let cp = ControlPlane::start_with(crate::control_plane::ControlPlaneOptions {
            ipv6: ipv6_only,
            ..Default::default()
        })
        .await?;
        let client = cp.client().await?;
        let dir = ScratchDir::new("wgmesh-mesh-")?;
        let (router, underlay_links) = underlay_router(&id, &underlay, ROUTER_OCTET)?;

        // The chart, with the values a test needs.
        let (grpc_port, metrics_port) = (free_port()?, free_port()?);
        // JSON is YAML: Helm reads it as a values file.
        let values = dir.path().join("values.json");
        let values_json = serde_json::json!({
            "cni": {"enabled": mode == NetworkMode::Cni},
            "controller": {
                "replicas": 1,
                "grpcPort": grpc_port,
                "metricsPort": metrics_port,
                "logLevel": "info,wgmesh_controller=debug,kube_lease_manager=warn",
            },
            "agent": {"reportInterval": 2, "logLevel": "info,wgmesh_agent=debug"},
        });
        let values_json = merge_values(values_json, extra);
        if dual_stack || ipv6_only {
            // The underlay carries IPv6 too: the host, the router and (in add_node) every node
            // (which in an IPv6-only cluster has no IPv4 address; the host and the router keep
            // theirs, unused by the nodes).
            let v6 = |host: u8| format!("{}:{host:x}", underlay6(octet));
            sh(
                "ip",
                &[
                    "-6",
                    "addr",
                    "add",
                    &format!("{}/64", v6(254)),
                    "dev",
                    &format!("wgm{id}br"),
                    "nodad",
                ],
            )?;
            router.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{}/64", v6(ROUTER_OCTET)),
                "dev",
                "eth0",
                "nodad",
            ])?;
            router.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        }
        std::fs::write(&values, values_json.to_string())?;
        Helm::new()?.install(&cp, &["--values", &values.display().to_string()])?;
        let installed = Installed::read(&client).await?;

        // The controller, as its Deployment says, on the host (root) network namespace, or on a
        // node's.
        let controller_ip = match controller_on_node {
            Some(k) => format!("{underlay}.{k}"),
            None => controller_ip(&underlay, ipv6_only.then(|| underlay6(octet))),
        };
        let controller_node = format!("node-{}", controller_on_node.unwrap_or(1));
        let pod = cluster::agent_pod(
            &client,
            "wgmesh-controller-0",
            &controller_node,
            "wgmesh-controller",
        )
        .await?;
        let spec = installed.controller_pod()?.clone();
        let container = spec.containers.first().context("no container")?.clone();
        let fields: pods::Fields = BTreeMap::from([
            ("metadata.name", "wgmesh-controller-0".to_owned()),
            ("metadata.namespace", NAMESPACE.to_owned()),
            ("status.podIP", controller_ip.clone()),
        ]);
        let api: http::Uri = cp.url().parse()?;
        let api_host = api.host().context("the API server URL has no host")?;
        let api_port = api.port_u16().context("the API server URL has no port")?;
        // As Kubernetes sets it: the address without brackets.
        let mut services = vec![
            (
                "KUBERNETES_SERVICE_HOST".to_owned(),
                api_host
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_owned(),
            ),
            ("KUBERNETES_SERVICE_PORT".to_owned(), api_port.to_string()),
        ];
        services.extend(installed.service_env(&controller_ip));
        let mut env = pods::container_env(&container, &fields, &services)?;
        // One peer per message: every update of more than one peer reaches the agents in
        // parts, so the whole suite exercises joining them (a real mesh splits at 50).
        env.push(("WGMESH_PEERS_PER_PART".to_owned(), "1".to_owned()));
        let controller_dir = dir.path().join("controller");
        let launch = pods::prepare(
            &spec,
            &container,
            env,
            &VolumeSources {
                client: &client,
                pod: &pod,
                host_root: &controller_dir.join("host"),
                volume_dir: &controller_dir.join("volumes"),
                api_ca: cp.ca().cert_pem(),
            },
        )
        .await?;
        let log = dir.path().join("controller.log");
        let controller_ns = controller_on_node.map(|k| format!("wgm{id}n{k}"));
        let launch = std::sync::Arc::new(launch);
        let controller_command = move || launch.command(controller_ns.as_deref());
        let controller = match controller_on_node {
            None => Some(
                Controller::spawn(
                    "wgmesh-controller-0",
                    controller_command.clone(),
                    &log,
                    grpc_port,
                    metrics_port,
                )
                .await?,
            ),
            // Once its node exists.
            Some(_) => None,
        };

        let mut mesh = TestMesh {
            nodes: Vec::new(),
            controller,
            controller_host: controller_on_node.map(|_| format!("{controller_ip}:{grpc_port}")),
            _api_forwarder: None,
            mode,
            underlay6: (dual_stack || ipv6_only).then(|| underlay6(octet)),
            ipv6_only,
            client,
            underlay,
            id,
            installed,
            router,
            _underlay_links: underlay_links,
            cp,
            dir,
            _underlay_lock: underlay_lock,
        };
        for i in 1..=n {
            if behind_nat.contains(&i) {
                mesh.add_node_behind_nat(i).await?;
            } else {
                mesh.add_node(i).await?;
            }
        }
        if mode == NetworkMode::Addon {
            mesh.install_plain_routes()?;
        }
        if let Some(k) = controller_on_node {
            let host = &mesh.nodes[k - 1];
            let api: std::net::SocketAddr =
                (api_host.parse::<std::net::IpAddr>()?, api_port).into();
            mesh._api_forwarder = Some(crate::real_cluster::proxy::TcpForwarder::start(
                &host.ns, api, api,
            )?);
            for node in &mesh.nodes {
                mesh.translate_service(&node.ns)?;
            }
            mesh.controller = Some(
                Controller::spawn_reached_at(
                    "wgmesh-controller-0",
                    controller_command,
                    &log,
                    grpc_port,
                    metrics_port,
                    host.node_ip.parse()?,
                )
                .await?,
            );
        }
        for i in 0..n {
            mesh.prepare_agent(i).await?;
            mesh.start_agent(i)?;
        }
        if mode == NetworkMode::Cni {
            for i in 0..n {
                mesh.attach_pod_from_agent_conflist(i).await?;
            }
        }
        Ok(mesh)
    }

    async fn add_node(&mut self, i: usize) -> Result<()> {
        let ns = Netns::create(&format!("wgm{}n{i}", self.id))?;
        let pod = Netns::create(&format!("wgm{}p{i}", self.id))?;
        if self.ipv6_only {
            return self.add_ipv6_only_node(i, ns, pod).await;
        }
        let node_ip = format!("{}.{i}", self.underlay);
        let veth = veth_to_bridge(
            &format!("wgm{}br", self.id),
            &format!("wgm{}v{i}", self.id),
            &ns,
            "eth0",
            &format!("{node_ip}/24"),
        )?;
        ns.sysctl("net.ipv4.ip_forward", "1")?;
        // Like every real node: a default route through the underlay's router, which routes
        // the node's pod CIDR back to it.
        let router_ip = format!("{}.{ROUTER_OCTET}", self.underlay);
        ns.ip(&["route", "add", "default", "via", &router_ip])?;
        let pod_cidr = format!("10.244.{i}.0/24");
        self.router
            .ip(&["route", "replace", &pod_cidr, "via", &node_ip])?;
        let mut pod_cidrs = vec![pod_cidr.clone()];
        let mut addresses = vec![node_ip.clone()];
        if let Some(prefix) = &self.underlay6 {
            let node_ip6 = format!("{prefix}:{i:x}");
            let pod_cidr6 = format!("fd00:10:244:{i:x}::/64");
            ns.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{node_ip6}/64"),
                "dev",
                "eth0",
                "nodad",
            ])?;
            ns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
            ns.ip(&[
                "-6",
                "route",
                "add",
                "default",
                "via",
                &format!("{prefix}:{ROUTER_OCTET:x}"),
            ])?;
            self.router
                .ip(&["-6", "route", "replace", &pod_cidr6, "via", &node_ip6])?;
            pod_cidrs.push(pod_cidr6);
            addresses.push(node_ip6);
        }
        self.register_node(
            i,
            WiredNode {
                ns,
                pod,
                nat: None,
                veth,
                pod_cidrs,
                addresses,
            },
        )
        .await
    }

    /// Attaches the pod of a node `add_node*` wired, creates its Node (named `node-<i>`,
    /// InternalIPs `addresses`, the first one its node IP) and keeps it in `self.nodes`.
    async fn register_node(&mut self, i: usize, wired: WiredNode) -> Result<()> {
        let WiredNode {
            ns,
            pod,
            nat,
            veth,
            pod_cidrs,
            addresses,
        } = wired;
        let name = format!("node-{i}");
        let pod_cidr = pod_cidrs.first().context("a node has a pod CIDR")?.clone();
        let node_ip = addresses.first().context("a node has an address")?.clone();
        let pod_ip = self.pod_ip_before_agent(i, &ns, &pod, &pod_cidr)?;
        let pod_cidrs: Vec<&str> = pod_cidrs.iter().map(String::as_str).collect();
        let addresses: Vec<&str> = addresses.iter().map(String::as_str).collect();
        cluster::create_node_with_addresses(&self.client, &name, &pod_cidrs, &addresses, &[])
            .await?;
        self.nodes.push(TestNode {
            name,
            index: i,
            node_ip,
            pod_cidr,
            pod_ip,
            agent: None,
            pod,
            ns,
            nat,
            _veth: veth,
            host_root: self.dir.path().join(format!("node-{i}")).join("host"),
            launch: None,
        });
        Ok(())
    }

    /// The pod's address before any agent runs: in add-on mode the other CNI's bridge
    /// attaches it now; in CNI mode it is attached once the agent has written the conflist.
    fn pod_ip_before_agent(
        &self,
        i: usize,
        ns: &Netns,
        pod: &Netns,
        pod_cidr: &str,
    ) -> Result<String> {
        match self.mode {
            NetworkMode::Addon => {
                let ipam_dir = self.dir.path().join(format!("ipam-{i}"));
                cni_add_pod(ns, pod, pod_cidr, &ipam_dir)
            }
            NetworkMode::Cni => Ok(String::new()),
        }
    }

    /// [`TestMesh::add_node`] for a node behind its own NAT router
    /// ([`MeshOptions::behind_nat`]).
    async fn add_node_behind_nat(&mut self, i: usize) -> Result<()> {
        let name = format!("node-{i}");
        let ns = Netns::create(&format!("wgm{}n{i}", self.id))?;
        let pod = Netns::create(&format!("wgm{}p{i}", self.id))?;
        let nat = Netns::create(&format!("wgm{}t{i}", self.id))?;
        // The router's outside on the underlay: the link captures watch.
        let outside = format!("{}.{}", self.underlay, NAT_ROUTER_OCTET + i);
        let veth = veth_to_bridge(
            &format!("wgm{}br", self.id),
            &format!("wgm{}v{i}", self.id),
            &nat,
            "eth0",
            &format!("{outside}/24"),
        )?;
        let (inside, node_ip) = (format!("172.16.{i}.1"), format!("172.16.{i}.2"));
        crate::netns::veth_between(
            &nat,
            "lan0",
            &format!("{inside}/24"),
            &ns,
            "eth0",
            &format!("{node_ip}/24"),
        )?;
        nat.sysctl("net.ipv4.ip_forward", "1")?;
        nat.ip(&[
            "route",
            "add",
            "default",
            "via",
            &format!("{}.{ROUTER_OCTET}", self.underlay),
        ])?;
        // The rule lives in the router's namespace and goes with it.
        nat.exec(
            "iptables",
            &[
                "-t",
                "nat",
                "-A",
                "POSTROUTING",
                "-o",
                "eth0",
                "-j",
                "MASQUERADE",
            ],
        )?;
        ns.sysctl("net.ipv4.ip_forward", "1")?;
        ns.ip(&["route", "add", "default", "via", &inside])?;
        // No route back to the pod CIDR anywhere: behind a NAT, nothing outside can reach it.
        self.register_node(
            i,
            WiredNode {
                ns,
                pod,
                nat: Some(nat),
                veth,
                pod_cidrs: vec![format!("10.244.{i}.0/24")],
                addresses: vec![node_ip],
            },
        )
        .await?;
        let nodes: kube::Api<k8s_openapi::api::core::v1::Node> =
            kube::Api::all(self.client.clone());
        let annotate =
            serde_json::json!({"metadata": {"annotations": {"wgmesh.io/behind-nat": "true"}}});
        nodes
            .patch(
                &name,
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(&annotate),
            )
            .await?;
        Ok(())
    }

    /// [`TestMesh::add_node`] in an IPv6-only cluster: the node's underlay link has only its
    /// IPv6 address, its default route is IPv6 through the router (which routes the node's
    /// IPv6 pod CIDR back to it), and its Node lists only IPv6.
    async fn add_ipv6_only_node(&mut self, i: usize, ns: Netns, pod: Netns) -> Result<()> {
        let prefix = self
            .underlay6
            .clone()
            .context("an IPv6-only mesh has an IPv6 underlay")?;
        let node_ip = format!("{prefix}:{i:x}");
        let veth = veth_to_bridge(
            &format!("wgm{}br", self.id),
            &format!("wgm{}v{i}", self.id),
            &ns,
            "eth0",
            &format!("{node_ip}/64"),
        )?;
        ns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        ns.ip(&[
            "-6",
            "route",
            "add",
            "default",
            "via",
            &format!("{prefix}:{ROUTER_OCTET:x}"),
        ])?;
        let pod_cidr = format!("fd00:10:244:{i:x}::/64");
        self.router
            .ip(&["-6", "route", "replace", &pod_cidr, "via", &node_ip])?;
        self.register_node(
            i,
            WiredNode {
                ns,
                pod,
                nat: None,
                veth,
                pod_cidrs: vec![pod_cidr],
                addresses: vec![node_ip],
            },
        )
        .await
    }

    /// Add-on mode's pre-existing CNI routes: each node routes the other nodes' pod CIDRs in
    /// plaintext via their node addresses, as kindnet does.
    fn install_plain_routes(&self) -> Result<()> {
        for node in &self.nodes {
            for other in self.nodes.iter().filter(|o| o.index != node.index) {
                node.ns
                    .ip(&["route", "add", &other.pod_cidr, "via", &other.node_ip])?;
            }
        }
        Ok(())
    }

    /// Node `i`'s agent pod as its DaemonSet says: the pod object (its token is bound to it),
    /// the volumes and the environment.
    async fn prepare_agent(&mut self, i: usize) -> Result<()> {
        let controller_ip = self.controller_ip();
        let node = &self.nodes[i];
        let pod = cluster::agent_pod(
            &self.client,
            &format!("wgmesh-agent-{}", node.name),
            &node.name,
            cluster::AGENT_SERVICE_ACCOUNT,
        )
        .await?;
        let spec = self.installed.agent_pod()?.clone();
        let fields: pods::Fields = BTreeMap::from([
            ("spec.nodeName", node.name.clone()),
            ("status.hostIP", node.node_ip.clone()),
            ("metadata.namespace", NAMESPACE.to_owned()),
        ]);
        let services = self.installed.service_env(&controller_ip);
        let sources = VolumeSources {
            client: &self.client,
            pod: &pod,
            host_root: &node.host_root,
            volume_dir: &self
                .dir
                .path()
                .join(format!("node-{}", node.index))
                .join("volumes"),
            api_ca: self.cp.ca().cert_pem(),
        };
        // Init containers run to completion first, as the kubelet runs them.
        for init in spec.init_containers.iter().flatten() {
            let env = pods::container_env(init, &fields, &services)?;
            let launch = pods::prepare(&spec, init, env, &sources).await?;
            let out = launch.command(Some(&node.ns.name)).output()?;
            if !out.status.success() {
                bail!(
                    "init container {} failed: {}",
                    init.name,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        let container = spec.containers.first().context("no container")?;
        let env = pods::container_env(container, &fields, &services)?;
        let launch = pods::prepare(&spec, container, env, &sources).await?;
        self.nodes[i].launch = Some(launch);
        Ok(())
    }

    /// CNI mode: waits for the conflist node `i`'s agent writes, then attaches the pod by
    /// running that conflist's plugins.
    async fn attach_pod_from_agent_conflist(&mut self, i: usize) -> Result<()> {
        let host_root = self.nodes[i].host_root.clone();
        let link = host_root.join(CONFLIST);
        // The agent links the conflist to its content in /run; the node's /run is under its
        // root here.
        let content = || {
            std::fs::read_link(&link)
                .ok()
                .map(|to| host_root.join(to.strip_prefix("/").unwrap_or(&to)))
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        let path = loop {
            if let Some(p) = content().filter(|p| p.exists()) {
                break p;
            }
            if Instant::now() > deadline {
                bail!(
                    "node {i}'s agent linked no {} to a conflist\n{}",
                    link.display(),
                    self.agent_logs(30)
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let node = &self.nodes[i];
        let data_dir = node.host_root.join("var/lib/cni/networks");
        // The plugins the agent's init container installed on the node.
        let plugin_dir = node.host_root.join("opt/cni/bin");
        let ip = cni_add_conflist(&node.ns, &node.pod, &path, &plugin_dir, &data_dir)?;
        self.nodes[i].pod_ip = ip;
        Ok(())
    }

    /// Merges `spec` into the chart's mesh (`default`), as `kubectl patch --type merge` would.
    pub async fn patch_mesh_spec(&self, spec: serde_json::Value) -> Result<()> {
        use kube::api::{Api, Patch, PatchParams};
        let meshes: Api<wgmesh_api::WireGuardMesh> = Api::all(self.client.clone());
        meshes
            .patch(
                "default",
                &PatchParams::default(),
                &Patch::Merge(&serde_json::json!({ "spec": spec })),
            )
            .await
            .with_context(|| format!("patching the mesh's spec with {spec}"))?;
        Ok(())
    }

    /// Every pod reaches every other pod's TCP echo server on `port` within `timeout`; on
    /// failure, the N x N matrix is printed.
    pub fn pod_matrix(&self, port: u16, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut failures = Vec::new();
            let mut table = String::from("from\\to");
            for n in &self.nodes {
                table += &format!("\t{}", n.name);
            }
            for (i, from) in self.nodes.iter().enumerate() {
                table += &format!("\n{}", from.name);
                for (j, to) in self.nodes.iter().enumerate() {
                    if i == j {
                        table += "\t-";
                        continue;
                    }
                    let to_addr = std::net::SocketAddr::new(
                        to.pod_ip.parse().context("a pod address")?,
                        port,
                    );
                    let r = crate::netns::echo_roundtrip(
                        &from.pod,
                        to_addr,
                        b"ping".to_vec(),
                        Duration::from_secs(2),
                    );
                    table += if r.is_ok() { "\tok" } else { "\tFAIL" };
                    if let Err(e) = r {
                        failures.push(format!("{} -> {}: {e}", from.name, to.name));
                    }
                }
            }
            if failures.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "pod-to-pod matrix:\n{table}\n{}\n{}",
                    failures.join("\n"),
                    self.agent_logs(15)
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Starts node `i`'s agent inside its namespace.
    pub fn start_agent(&mut self, i: usize) -> Result<()> {
        let node = &mut self.nodes[i];
        let launch = node.launch.as_ref().context("the agent was not prepared")?;
        let cmd = launch.command(Some(&node.ns.name));
        let log = self.dir.path().join(format!("agent-{}.log", node.index));
        node.agent = Some(ChildGuard::spawn(
            &format!("agent {}", node.name),
            cmd,
            &log,
        )?);
        Ok(())
    }

    /// A new node joins: its Node object, namespaces and pod, and its agent started; in add-on
    /// mode, the other CNI's plain routes to and from it. Returns its position in `nodes`.
    pub async fn join_node(&mut self) -> Result<usize> {
        let pos = self.add_joining_node().await?;
        self.start_joining_node(pos).await?;
        Ok(pos)
    }

    /// The first half of [`TestMesh::join_node`]: the machine and its Node object, without
    /// its agent (and, in CNI mode, without its pod, which needs the agent's conflist).
    pub async fn add_joining_node(&mut self) -> Result<usize> {
        let i = self.nodes.iter().map(|n| n.index).max().unwrap_or(0) + 1;
        self.add_node(i).await?;
        let pos = self.nodes.len() - 1;
        self.translate_service(&self.nodes[pos].ns)?;
        if self.mode == NetworkMode::Addon {
            let new = &self.nodes[pos];
            for other in &self.nodes[..pos] {
                other
                    .ns
                    .ip(&["route", "add", &new.pod_cidr, "via", &new.node_ip])?;
                new.ns
                    .ip(&["route", "add", &other.pod_cidr, "via", &other.node_ip])?;
            }
        }
        Ok(pos)
    }

    /// The second half of [`TestMesh::join_node`]: the agent started (and the pod attached,
    /// in CNI mode).
    pub async fn start_joining_node(&mut self, pos: usize) -> Result<()> {
        self.prepare_agent(pos).await?;
        self.start_agent(pos)?;
        if self.mode == NetworkMode::Cni {
            self.attach_pod_from_agent_conflist(pos).await?;
        }
        Ok(())
    }

    /// The node at `pos` is gone, as a machine is once deleted: its agent stopped (SIGTERM),
    /// its namespaces and underlay link removed, the routes to it on the router and (add-on
    /// mode) on the other nodes removed. The Node object is the caller's to delete first.
    pub fn remove_node(&mut self, pos: usize) -> Result<()> {
        self.stop_agent(pos);
        let node = self.nodes.remove(pos);
        let _ = self.router.ip(&["route", "del", &node.pod_cidr]);
        if self.mode == NetworkMode::Addon {
            for other in &self.nodes {
                let _ = other.ns.ip(&["route", "del", &node.pod_cidr]);
            }
        }
        drop(node);
        Ok(())
    }

    /// Kills node `pos`'s agent at once (SIGKILL), as a crash would.
    pub fn kill_agent(&mut self, pos: usize) {
        if let Some(mut agent) = self.nodes[pos].agent.take() {
            agent.kill();
        }
    }

    /// The root-namespace end of node `pos`'s underlay link: everything the node sends on
    /// the underlay crosses it (captures see the node's side as direction "in").
    pub fn underlay_link(&self, pos: usize) -> String {
        format!("wgm{}v{}", self.id, self.nodes[pos].index)
    }

    /// What kube-proxy (iptables mode) writes on a node for the controller's Service IP, when
    /// the controller runs on a node ([`MeshOptions::controller_on_node`]): host-sourced
    /// traffic to it is marked for masquerading (the mark ORed with `0x4000`), translated to
    /// the controller's node address, and masqueraded on its way out.
    fn translate_service(&self, ns: &Netns) -> Result<()> {
        let Some(to) = &self.controller_host else {
            return Ok(());
        };
        let port = to.rsplit(':').next().unwrap_or_default();
        let to_service = ["-d", SERVICE_IP, "-p", "tcp", "--dport", port];
        let rules: [Vec<&str>; 3] = [
            [
                &["-t", "nat", "-A", "OUTPUT"][..],
                &to_service[..],
                &["-j", "MARK", "--or-mark", "0x4000"],
            ]
            .concat(),
            [
                &["-t", "nat", "-A", "OUTPUT"][..],
                &to_service[..],
                &["-j", "DNAT", "--to-destination", to],
            ]
            .concat(),
            vec![
                "-t",
                "nat",
                "-A",
                "POSTROUTING",
                "-m",
                "mark",
                "--mark",
                "0x4000/0x4000",
                "-j",
                "MASQUERADE",
            ],
        ];
        for rule in rules {
            ns.exec("iptables", &rule)?;
        }
        Ok(())
    }

    /// Where the agents reach the controller: its pod IP, the host's address on the underlay
    /// (IPv6 in an IPv6-only cluster), or its Service IP when it runs on a node.
    pub fn controller_ip(&self) -> String {
        if self.controller_host.is_some() {
            return SERVICE_IP.to_owned();
        }
        controller_ip(
            &self.underlay,
            self.ipv6_only.then(|| self.underlay6.clone()).flatten(),
        )
    }

    /// The value of `name` in node `i`'s agent environment, as the kubelet would compute it
    /// (once the agent was prepared).
    pub fn agent_env(&self, i: usize, name: &str) -> Option<String> {
        self.nodes[i]
            .launch
            .as_ref()?
            .env_value(name)
            .map(str::to_owned)
    }

    /// The mesh's scratch directory (logs, captures); removed on drop.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// A host outside the cluster on the nodes' underlay (a laptop, a site's router): the
    /// namespace `wgm<id><tag>` with `eth0` at `<underlay>.<octet>/24` (in an IPv6-only
    /// cluster `<underlay6>:<octet in hex>/64` only), and its bridge port.
    pub fn outside_host(&self, tag: &str, octet: u8) -> Result<(Netns, RootLink)> {
        let address = match (&self.underlay6, self.ipv6_only) {
            (Some(prefix), true) => format!("{prefix}:{octet:x}/64"),
            _ => format!("{}.{octet}/24", self.underlay),
        };
        let ns = Netns::create(&format!("wgm{}{tag}", self.id))?;
        let link = veth_to_bridge(
            &format!("wgm{}br", self.id),
            &format!("wgm{}v{tag}", self.id),
            &ns,
            "eth0",
            &address,
        )?;
        Ok((ns, link))
    }

    /// Stops node `i`'s agent (SIGTERM).
    pub fn stop_agent(&mut self, i: usize) {
        if let Some(mut agent) = self.nodes[i].agent.take() {
            agent.stop(Duration::from_secs(10));
        }
    }

    /// `wg show wgmesh0` inside node `i`, for people (the private key shows as hidden).
    pub fn wg_show(&self, i: usize) -> Result<String> {
        self.wg_in_node(i, &["show", "wgmesh0"])
    }

    /// `wg show wgmesh0 dump` inside node `i`.
    pub fn wg_dump(&self, i: usize) -> Result<String> {
        self.wg_in_node(i, &["show", "wgmesh0", "dump"])
    }

    /// `wg ARGS` in node `i`'s network and mount namespaces (the agent's, where the
    /// userspace device's UAPI socket is).
    fn wg_in_node(&self, i: usize, args: &[&str]) -> Result<String> {
        let pid = self.nodes[i]
            .agent
            .as_ref()
            .and_then(|a| a.pid())
            .context("the agent is not running")?
            .to_string();
        let mut all = vec!["-t", &pid, "-m", "-n", "wg"];
        all.extend_from_slice(args);
        crate::netns::sh("nsenter", &all)
    }

    /// Peers of node `i` as `wg` sees them: (public key, latest handshake unix seconds).
    pub fn wg_peers(&self, i: usize) -> Result<Vec<(String, u64)>> {
        let dump = self.wg_dump(i)?;
        Ok(dump
            .lines()
            .skip(1)
            .filter_map(|l| {
                let f: Vec<&str> = l.split('\t').collect();
                Some((f.first()?.to_string(), f.get(4)?.parse().ok()?))
            })
            .collect())
    }

    /// Waits until every running agent's device has `want` peers.
    pub async fn wait_peer_counts(&self, want: usize, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut counts = Vec::new();
            for (i, node) in self.nodes.iter().enumerate() {
                if node.agent.is_some() {
                    counts.push((
                        node.name.clone(),
                        self.wg_peers(i).map(|p| p.len()).unwrap_or(0),
                    ));
                }
            }
            if counts.iter().all(|(_, c)| *c == want) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "peer counts {counts:?}, want {want} each\n{}",
                    self.agent_logs(20)
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Renews node `i`'s agent token as the kubelet does at 80% of its life: a new token of
    /// its pod, written over the projected one (a new file renamed into place).
    pub async fn renew_agent_token(&self, i: usize) -> Result<()> {
        let node = &self.nodes[i];
        let token = cluster::running_agent_token(&self.client, &node.name).await?;
        let dir = self
            .dir
            .path()
            .join(format!("node-{}", node.index))
            .join("volumes")
            .join("token");
        let fresh = dir.join(".token.new");
        std::fs::write(&fresh, token)?;
        std::fs::rename(&fresh, dir.join("token"))?;
        Ok(())
    }

    /// The tail of every agent's log, for failure messages.
    pub fn agent_logs(&self, lines: usize) -> String {
        self.nodes
            .iter()
            .filter_map(|n| {
                n.agent
                    .as_ref()
                    .map(|a| format!("--- {} ---\n{}", n.name, a.log_tail(lines)))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Node `i`'s whole agent log (across restarts).
    pub fn agent_log(&self, i: usize) -> Result<String> {
        Ok(std::fs::read_to_string(
            self.dir
                .path()
                .join(format!("agent-{}.log", self.nodes[i].index)),
        )?)
    }

    /// Node `i`'s private key in base64, from its key file (to check it never leaks).
    pub fn private_key(&self, i: usize) -> Result<String> {
        Ok(std::fs::read_to_string(self.key_file(i))?.trim().to_owned())
    }

    /// Node `i`'s public key, from its key file.
    pub fn public_key(&self, i: usize) -> Result<String> {
        let text = std::fs::read_to_string(self.key_file(i))?;
        let key: wgmesh_core::PrivateKey = text.parse()?;
        Ok(key.public_key().to_base64())
    }

    /// Node `i`'s key file (the agent's hostPath state directory).
    pub fn key_file(&self, i: usize) -> PathBuf {
        self.nodes[i]
            .host_root
            .join("var/lib/wgmesh/default/private.key")
    }

    /// Routes of the table the mesh's routes are in: main in CNI mode, the agent's own in
    /// add-on mode.
    pub fn routes(&self, i: usize) -> Result<String> {
        let table = match self.mode {
            NetworkMode::Cni => "main".to_owned(),
            NetworkMode::Addon => self.nodes[i]
                .launch
                .as_ref()
                .and_then(|l| l.env_value("WGMESH_ROUTE_TABLE"))
                .unwrap_or("51820")
                .to_owned(),
        };
        self.nodes[i].ns.ip(&["route", "show", "table", &table])
    }
}
