//! A whole test mesh on one machine: the local control plane, the real controller, and N
//! "nodes" (network namespaces on a shared underlay bridge), each with a real `wgmesh-agent`
//! and a "pod" attached by the real CNI bridge plugin.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::ControlPlane;
use crate::binaries::workspace_binary;
use crate::cluster;
use crate::controller::{Controller, ControllerTls};
use crate::install::install_default_mesh;
use crate::netns::{Netns, RootLink, bridge, cni_add_pod, veth_to_bridge};
use crate::process::ChildGuard;

static MESHES: AtomicU32 = AtomicU32::new(0);

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
    _veth: RootLink,
    state_dir: PathBuf,
    token_file: PathBuf,
}

pub struct TestMesh {
    pub nodes: Vec<TestNode>,
    pub controller: Option<Controller>,
    pub tls: ControllerTls,
    pub client: kube::Client,
    /// The underlay's /24 prefix, such as `192.168.101`.
    pub underlay: String,
    pub id: String,
    agent_binary: PathBuf,
    _bridge: RootLink,
    pub cp: ControlPlane,
    dir: tempfile::TempDir,
}

impl TestMesh {
    /// The control plane, the controller, and `n` nodes with agents and pods.
    pub async fn start(n: usize) -> Result<Self> {
        let seq = MESHES.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}{}", std::process::id() % 1000, seq);
        let underlay = format!("192.168.{}", 100 + (std::process::id() + seq) % 100);
        let cp = ControlPlane::start().await?;
        install_default_mesh(&cp)?;
        let client = cp.client().await?;
        let tls = ControllerTls::issue(&cp)?;
        let bridge = bridge(&format!("wgm{id}br"), &format!("{underlay}.254/24"))?;
        let controller = Controller::start(&cp, &tls, "c1", &[("WGMESH_BIND_ALL", "1")]).await?;
        let agent_binary = workspace_binary("wgmesh-node-agent", "wgmesh-agent")?;
        let dir = tempfile::Builder::new().prefix("wgmesh-mesh-").tempdir()?;
        let mut mesh = TestMesh {
            nodes: Vec::new(),
            controller: Some(controller),
            tls,
            client,
            underlay,
            id,
            agent_binary,
            _bridge: bridge,
            cp,
            dir,
        };
        for i in 1..=n {
            mesh.add_node(i).await?;
        }
        for i in 0..n {
            mesh.start_agent(i)?;
        }
        Ok(mesh)
    }

    async fn add_node(&mut self, i: usize) -> Result<()> {
        let name = format!("node-{i}");
        let ns = Netns::create(&format!("wgm{}n{i}", self.id))?;
        let pod = Netns::create(&format!("wgm{}p{i}", self.id))?;
        let node_ip = format!("{}.{i}", self.underlay);
        let veth = veth_to_bridge(
            &format!("wgm{}br", self.id),
            &format!("wgm{}v{i}", self.id),
            &ns,
            "eth0",
            &format!("{node_ip}/24"),
        )?;
        ns.sysctl("net.ipv4.ip_forward", "1")?;
        let pod_cidr = format!("10.244.{i}.0/24");
        let ipam_dir = self.dir.path().join(format!("ipam-{i}"));
        let pod_ip = cni_add_pod(&ns, &pod, &pod_cidr, &ipam_dir)?;
        cluster::create_node(&self.client, &name, &[&pod_cidr], &node_ip, &[]).await?;
        let token = cluster::agent_token(&self.client, &name).await?;
        let state_dir = self.dir.path().join(format!("state-{i}"));
        let token_file = self.dir.path().join(format!("token-{i}"));
        std::fs::write(&token_file, token)?;
        self.nodes.push(TestNode {
            name,
            index: i,
            node_ip,
            pod_cidr,
            pod_ip,
            agent: None,
            pod,
            ns,
            _veth: veth,
            state_dir,
            token_file,
        });
        Ok(())
    }

    /// The controller URL as seen from the nodes.
    pub fn controller_url(&self) -> String {
        let port = self.controller.as_ref().map(|c| c.grpc_port).unwrap_or(0);
        format!("https://{}.254:{port}", self.underlay)
    }

    /// Starts node `i`'s agent inside its namespace, with a private /var/run/wireguard (one per
    /// node, as on a real machine).
    pub fn start_agent(&mut self, i: usize) -> Result<()> {
        let url = self.controller_url();
        let ca = self.tls.ca.clone();
        let node = &mut self.nodes[i];
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &node.ns.name, "unshare", "--mount", "--propagation", "private", "sh", "-c"])
            .arg("mkdir -p /var/run/wireguard && mount -t tmpfs tmpfs /var/run/wireguard && exec \"$0\" \"$@\"")
            .arg(&self.agent_binary)
            .args(["--node", &node.name, "--controller", &url, "--tls-server-name", "localhost"])
            .arg("--ca-file")
            .arg(&ca)
            .arg("--token-file")
            .arg(&node.token_file)
            .arg("--state-dir")
            .arg(&node.state_dir)
            .args(["--endpoint-address", &node.node_ip, "--backend", "userspace", "--report-interval", "2"])
            .env("WGMESH_LOG", "info,wgmesh_agent=debug");
        let log = self.dir.path().join(format!("agent-{}.log", node.index));
        node.agent = Some(ChildGuard::spawn(
            &format!("agent {}", node.name),
            cmd,
            &log,
        )?);
        Ok(())
    }

    /// Stops node `i`'s agent (SIGTERM).
    pub fn stop_agent(&mut self, i: usize) {
        if let Some(mut agent) = self.nodes[i].agent.take() {
            agent.stop(Duration::from_secs(10));
        }
    }

    /// `wg show wgmesh0 dump` inside node `i` (its network and mount namespaces).
    pub fn wg_dump(&self, i: usize) -> Result<String> {
        let pid = self.nodes[i]
            .agent
            .as_ref()
            .and_then(|a| a.pid())
            .context("the agent is not running")?;
        crate::netns::sh(
            "nsenter",
            &[
                "-t",
                &pid.to_string(),
                "-m",
                "-n",
                "wg",
                "show",
                "wgmesh0",
                "dump",
            ],
        )
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
        Ok(
            std::fs::read_to_string(self.nodes[i].state_dir.join("default/private.key"))?
                .trim()
                .to_owned(),
        )
    }

    /// Node `i`'s public key, from its key file.
    pub fn public_key(&self, i: usize) -> Result<String> {
        let text = std::fs::read_to_string(self.nodes[i].state_dir.join("default/private.key"))?;
        let key: wgmesh_core::PrivateKey = text.parse()?;
        Ok(key.public_key().to_base64())
    }

    /// Routes of node `i`'s main table.
    pub fn routes(&self, i: usize) -> Result<String> {
        self.nodes[i].ns.ip(&["route", "show"])
    }
}
