//! One real agent among the simulated ones: the release `wgmesh-agent` with our userspace
//! device, in a network namespace on a bridge to the host, where the controller listens. It
//! is one more node of the mesh, so it gets every other node as a peer: the time it takes to
//! program them all into its device and routes, and its memory at that size, are its share
//! of the figure (#19).

use std::fs::File;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::procfs;
use wgmesh_e2e::mesh::reserve_underlay;
use wgmesh_e2e::netns::{Netns, RootLink, bridge, http_get_in, veth_to_bridge};
use wgmesh_e2e::process::ChildGuard;
use wgmesh_e2e::scratch::ScratchDir;

/// The agent's metrics port inside its namespace.
const METRICS_PORT: u16 = 9091;

/// The namespace and its link to the host, made before the controller starts.
pub struct AgentNetwork {
    ns: Netns,
    /// The node's address on the bridge.
    pub node_ip: String,
    /// The host's address on the bridge, where the controller listens.
    pub host_ip: String,
    _veth: RootLink,
    _bridge: RootLink,
    _lock: File,
}

impl AgentNetwork {
    pub fn create() -> Result<Self> {
        let (octet, lock) = reserve_underlay()?;
        let prefix = format!("192.168.{octet}");
        let bridge = bridge(&format!("wgmb{octet}br"), &format!("{prefix}.254/24"))?;
        let ns = Netns::create(&format!("wgmb{octet}n"))?;
        let veth = veth_to_bridge(
            &format!("wgmb{octet}br"),
            &format!("wgmb{octet}v"),
            &ns,
            "eth0",
            &format!("{prefix}.1/24"),
        )?;
        ns.ip(&["link", "set", "lo", "up"])?;
        // A node's default route goes through the underlay.
        ns.ip(&["route", "add", "default", "via", &format!("{prefix}.254")])?;
        Ok(AgentNetwork {
            ns,
            node_ip: format!("{prefix}.1"),
            host_ip: format!("{prefix}.254"),
            _veth: veth,
            _bridge: bridge,
            _lock: lock,
        })
    }
}

pub struct RealAgent {
    process: ChildGuard,
    started: Instant,
    // Declared after the process: dropped (the process stopped) first.
    network: AgentNetwork,
    _dir: ScratchDir,
}

/// What the agent's own metrics and `/proc` say of it.
pub struct AgentFigures {
    pub peers: u64,
    pub rss_bytes: u64,
    pub peak_rss_bytes: u64,
    pub cpu_seconds: f64,
    pub metrics_bytes: usize,
}

impl RealAgent {
    pub fn start(
        binary: &Path,
        network: AgentNetwork,
        node: &str,
        controller_url: &str,
        ca_pem: &str,
        token: &str,
    ) -> Result<Self> {
        let dir = ScratchDir::new("wgmesh-bench-agent-")?;
        let ca = dir.path().join("ca.crt");
        std::fs::write(&ca, ca_pem)?;
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, token)?;
        let state = dir.path().join("state");
        let mut cmd = std::process::Command::new("ip");
        cmd.args(["netns", "exec", &network.ns.name])
            .arg(binary)
            .args(["--node", node, "--controller", controller_url])
            .arg("--ca-file")
            .arg(&ca)
            .args(["--tls-server-name", "localhost"])
            .arg("--token-file")
            .arg(&token_file)
            .arg("--state-dir")
            .arg(&state)
            // Its own CNI directories: the machine's are not the test's.
            .arg("--cni-conf-dir")
            .arg(dir.path().join("cni"))
            .arg("--cni-run-dir")
            .arg(dir.path().join("cni-run"))
            .args(["--backend", "userspace"])
            .args(["--endpoint-address", &network.node_ip])
            .args(["--metrics-addr", &format!("127.0.0.1:{METRICS_PORT}")])
            .env("WGMESH_LOG", "warn");
        let log = dir.path().join("agent.log");
        let started = Instant::now();
        let process = ChildGuard::spawn("real agent", cmd, &log)?;
        Ok(RealAgent {
            process,
            started,
            network,
            _dir: dir,
        })
    }

    /// Waits until the agent's device holds `want` peers; returns how long after the agent
    /// started that was.
    pub async fn wait_for_peers(&mut self, want: u64, timeout: Duration) -> Result<Duration> {
        let deadline = Instant::now() + timeout;
        loop {
            if !self.process.is_running() {
                bail!("the agent exited:\n{}", self.process.log_tail(30));
            }
            if let Ok(figures) = self.figures()
                && figures.peers >= want
            {
                return Ok(self.started.elapsed());
            }
            if Instant::now() > deadline {
                bail!(
                    "the agent did not program {want} peers in {timeout:?}:\n{}",
                    self.process.log_tail(30)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn figures(&self) -> Result<AgentFigures> {
        let metrics = http_get_in(&self.network.ns, METRICS_PORT, "/metrics")?;
        let peers = metrics
            .lines()
            .find_map(|l| l.strip_prefix("wgmesh_agent_peers "))
            .context("no wgmesh_agent_peers in the agent's metrics")?
            .trim()
            .parse::<f64>()? as u64;
        let pid = self.process.pid().context("the agent's pid")?;
        Ok(AgentFigures {
            peers,
            rss_bytes: procfs::status_kb(pid, "VmRSS:")? * 1024,
            peak_rss_bytes: procfs::status_kb(pid, "VmHWM:")? * 1024,
            cpu_seconds: procfs::cpu_seconds(&[pid], procfs::clock_ticks())?,
            metrics_bytes: metrics.len(),
        })
    }
}
