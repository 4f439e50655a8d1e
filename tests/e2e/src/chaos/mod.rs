//! Chaos on a running [`TestMesh`]: faults injected one at a time while a TCP stream and
//! pings run between pods on different nodes and a watcher counts plaintext pod packets on
//! every node's underlay link. Each fault gives a [`FaultReport`]; the promise (issue #14) is
//! that every report shows zero plaintext packets, no broken TCP connection, and traffic
//! flowing again afterwards. Used by `tests/chaos.rs` and `cargo xtask bench disruption`.

pub mod meter;
pub mod watcher;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::rbac::v1::RoleBinding;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;

use crate::cluster;
use crate::mesh::{NetworkMode, TestMesh};
pub use meter::Meter;
pub use watcher::Watcher;

/// Pod CIDRs (10.244.<node>.0/24) and the mesh's tunnel addresses: a packet between two of
/// these on the underlay is pod traffic in the clear.
pub const PROTECTED: [&str; 2] = ["10.244.0.0/16", "10.250.0.0/16"];
/// Where the chart reads preshared-key Secrets (`peerSecrets.namespace`).
const SECRETS_NAMESPACE: &str = "wgmesh-secrets";
const PSK_SECRET: &str = "chaos-mesh-psk";
const EXTERNAL_PEER: &str = "chaos-laptop";
/// The Role binding that lets the controller read Secrets in [`SECRETS_NAMESPACE`].
const SECRETS_BINDING: &str = "wgmesh-controller-secrets";
/// Stream messages that must arrive after a fault for the stream to count as flowing again.
const FLOWING: u64 = 50;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// SIGTERM to node-1's agent (the stream's sender's node), down for a while, started again.
    AgentTerm,
    /// SIGKILL to node-1's agent, down for a while, started again.
    AgentKill,
    /// The controller killed, down for a while, started again.
    ControllerRestart,
    /// The API server and etcd stopped for the outage duration, then started again.
    ControlPlaneOutage,
    /// A new node joins (its agent and pod started).
    NodeJoin,
    /// The node that joined leaves: its Node deleted, then the machine gone.
    NodeLeave,
    /// node-2 (the stream's receiver) rotates its key (`wgmesh.io/rotate-key`).
    KeyRotation,
    /// The external peer every node has is deleted.
    ExternalPeerDeleted,
    /// The controller loses the right to read Secrets (its RoleBinding deleted) and restarts;
    /// the mesh has a preshared key from a Secret.
    SecretsDenied,
}

impl Fault {
    /// Every fault, in an order where each one's preconditions hold (a node joins before it
    /// leaves).
    pub const ALL: [Fault; 9] = [
        Fault::AgentTerm,
        Fault::AgentKill,
        Fault::ControllerRestart,
        Fault::ControlPlaneOutage,
        Fault::NodeJoin,
        Fault::KeyRotation,
        Fault::NodeLeave,
        Fault::ExternalPeerDeleted,
        Fault::SecretsDenied,
    ];

    pub fn name(&self) -> &'static str {
        match self {
            Fault::AgentTerm => "agent_sigterm_restart",
            Fault::AgentKill => "agent_sigkill_restart",
            Fault::ControllerRestart => "controller_killed_restarted",
            Fault::ControlPlaneOutage => "apiserver_etcd_outage",
            Fault::NodeJoin => "node_joins",
            Fault::NodeLeave => "node_leaves",
            Fault::KeyRotation => "key_rotation",
            Fault::ExternalPeerDeleted => "external_peer_deleted",
            Fault::SecretsDenied => "controller_denied_secrets",
        }
    }
}

/// How a chaos mesh is set up and how long faults last.
#[derive(Debug, Clone)]
pub struct Options {
    pub mode: NetworkMode,
    /// Nodes at the start (at least 2: the stream goes from the first to the second, pings
    /// to the third if there is one).
    pub nodes: usize,
    /// How long an agent or the controller stays down.
    pub down: Duration,
    /// How long the API server and etcd stay down.
    pub outage: Duration,
    /// How long the controller runs without Secret access before it gets it back.
    pub secrets_denied: Duration,
    /// The mesh's `spec.strict`.
    pub strict: bool,
    /// A mesh preshared key from a Secret (needed by [`Fault::SecretsDenied`]).
    pub preshared_key: bool,
    /// An external peer on every node (needed by [`Fault::ExternalPeerDeleted`]).
    pub external_peer: bool,
    /// The mesh's `spec.clusterCIDRs` (all pod CIDRs, 10.244.0.0/16), as a strict user sets
    /// them: a joining node's pod addresses are protected before its peer is known.
    pub cluster_cidrs: bool,
}

impl Options {
    /// Everything on, with short outages (for tests).
    pub fn full(mode: NetworkMode) -> Self {
        Options {
            mode,
            nodes: 3,
            down: Duration::from_secs(3),
            outage: Duration::from_secs(15),
            secrets_denied: Duration::from_secs(10),
            strict: true,
            preshared_key: true,
            external_peer: true,
            cluster_cidrs: true,
        }
    }
}

/// What one fault did to the traffic.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FaultReport {
    pub fault: String,
    /// From the fault's start until traffic flowed again (or the wait gave up).
    pub duration_ms: u64,
    /// The longest time without a stream message arriving.
    pub longest_stall_ms: u64,
    pub pings_sent: u64,
    pub pings_lost: u64,
    /// Plaintext pod packets seen on any node's underlay during the fault.
    pub plaintext_packets: u64,
    pub plaintext_by_node: BTreeMap<String, u64>,
    pub plaintext_examples: Vec<String>,
    /// The TCP connection broke (reset or otherwise ended) during the fault.
    pub tcp_reset: bool,
    pub tcp_breaks: Vec<String>,
    /// Stream messages and ping replies arrived after the fault.
    pub stream_continued: bool,
    /// The fault could not be carried out, or the mesh did not recover as it should.
    pub error: Option<String>,
    /// What the harness did as a kubelet would (a process that exited restarted).
    pub notes: Vec<String>,
    /// Agent restarts: from the new agent process's start until the first ping (from a pod on
    /// that node, every 20 ms) that was answered: the restart's own stall, without the time
    /// the node had no agent.
    pub recovered_after_start_ms: Option<u64>,
}

impl FaultReport {
    /// The promise: no plaintext, no broken connection, traffic flowing again, and the mesh
    /// recovered.
    pub fn kept_the_promise(&self) -> bool {
        self.plaintext_packets == 0
            && !self.tcp_reset
            && self.stream_continued
            && self.error.is_none()
    }

    /// One line for people.
    pub fn summary(&self) -> String {
        format!(
            "{:<28} {:<4} stall {:>6} ms  pings lost {:>4}/{:<5} plaintext {:>5}  reset {:<5} continued {:<5} {}{}{}",
            self.fault,
            if self.kept_the_promise() {
                "ok"
            } else {
                "FAIL"
            },
            self.longest_stall_ms,
            self.pings_lost,
            self.pings_sent,
            self.plaintext_packets,
            self.tcp_reset,
            self.stream_continued,
            self.recovered_after_start_ms
                .map(|ms| format!("back {ms} ms after start "))
                .unwrap_or_default(),
            self.error
                .as_deref()
                .map(|e| format!("error: {e}"))
                .unwrap_or_default(),
            if self.plaintext_examples.is_empty() {
                String::new()
            } else {
                format!(" e.g. {}", self.plaintext_examples.join(", "))
            },
        )
    }
}

/// A table of reports, for test output and failure messages.
pub fn table(reports: &[FaultReport]) -> String {
    reports
        .iter()
        .map(FaultReport::summary)
        .collect::<Vec<_>>()
        .join("\n")
}

/// A mesh under watch, with traffic running.
pub struct Chaos {
    // Drop order: traffic and captures stop before the mesh goes.
    pub meter: Meter,
    pub watcher: Watcher,
    pub mesh: TestMesh,
    pub options: Options,
    /// External peers every node has.
    external_peers: usize,
    /// The node that joined (by name), for [`Fault::NodeLeave`].
    joined: Option<String>,
    /// When the last restarted agent was started (meter ms).
    agent_started_at: Option<u64>,
}

impl Chaos {
    /// Starts the mesh, configures it as `options` say, and starts the watcher and the traffic;
    /// returns once traffic flows over the mesh.
    pub async fn start(options: Options) -> Result<Self> {
        if options.nodes < 2 {
            bail!("a chaos mesh needs at least 2 nodes");
        }
        let mesh = TestMesh::start_in(options.nodes, options.mode).await?;
        let mut spec = json!({"strict": options.strict});
        if options.cluster_cidrs {
            spec["clusterCIDRs"] = json!([PROTECTED[0]]);
        }
        if options.preshared_key {
            let secrets: Api<Secret> = Api::namespaced(mesh.client.clone(), SECRETS_NAMESPACE);
            let secret: Secret = serde_json::from_value(json!({
                "metadata": {"name": PSK_SECRET},
                "stringData": {"presharedKey": "a mesh secret for the chaos suite"},
            }))?;
            secrets.create(&PostParams::default(), &secret).await?;
            spec["presharedKey"] = json!({"namespace": SECRETS_NAMESPACE, "name": PSK_SECRET});
        }
        mesh.patch_mesh_spec(spec).await?;
        let mut external_peers = 0;
        if options.external_peer {
            let peers: Api<wgmesh_api::WireGuardPeer> = Api::all(mesh.client.clone());
            let body = json!({
                "apiVersion": "wgmesh.io/v1alpha1", "kind": "WireGuardPeer",
                "metadata": {"name": EXTERNAL_PEER},
                "spec": {
                    "publicKey": wgmesh_core::PublicKey::from_bytes([0x5a; 32]).to_base64(),
                },
            });
            peers
                .patch(
                    EXTERNAL_PEER,
                    &PatchParams::apply("chaos").force(),
                    &Patch::Apply(&body),
                )
                .await?;
            external_peers = 1;
        }
        mesh.wait_peer_counts(options.nodes - 1 + external_peers, Duration::from_secs(90))
            .await?;
        if options.preshared_key {
            wait_until("preshared keys on every node's node peers", 60, || {
                Ok((0..mesh.nodes.len()).all(|i| {
                    mesh.wg_dump(i).is_ok_and(|d| {
                        d.lines()
                            .skip(1)
                            .filter(|l| l.contains("10.244."))
                            .all(|l| l.split('\t').nth(1) != Some("(none)"))
                    })
                }))
            })
            .await?;
        }

        let mut watcher = Watcher::new(mesh.dir(), &PROTECTED)?;
        for pos in 0..mesh.nodes.len() {
            watcher.watch(&mesh.nodes[pos].name, &mesh.underlay_link(pos))?;
        }
        let n = &mesh.nodes;
        let ping_to = n.get(2).unwrap_or(&n[1]);
        let meter = Meter::start(
            &n[0].pod,
            (&n[1].pod, &n[1].pod_ip),
            (&ping_to.pod, &ping_to.pod_ip),
        )?;
        meter
            .wait_flowing(0, FLOWING, Duration::from_secs(60))
            .await
            .with_context(|| mesh.agent_logs(20))?;
        Ok(Chaos {
            meter,
            watcher,
            mesh,
            options,
            external_peers,
            joined: None,
            agent_started_at: None,
        })
    }

    /// The peers every node should have.
    fn expected_peers(&self) -> usize {
        self.mesh.nodes.len() - 1 + self.external_peers
    }

    /// Injects `fault`, waits for the mesh to recover and the traffic to flow again, and
    /// reports what the traffic went through.
    pub async fn run(&mut self, fault: Fault) -> Result<FaultReport> {
        let started = Instant::now();
        let from = self.meter.now_ms();
        self.watcher.clear_examples()?;
        let before = self.watcher.poll()?;
        self.agent_started_at = None;
        let outcome = self.inject(fault).await;
        let notes = self.kubelet().await?;
        let flowing = self
            .meter
            .wait_flowing(self.meter.now_ms(), FLOWING, Duration::from_secs(60))
            .await;
        let to = self.meter.now_ms();
        // What was sent until now reaches the capture files.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let after = self.watcher.poll()?;
        let window = self.meter.window(from, to);

        let mut by_node = BTreeMap::new();
        let mut examples = Vec::new();
        for a in &after {
            let b = before
                .iter()
                .find(|b| b.node == a.node)
                .map_or(0, |b| b.plaintext);
            if a.plaintext > b {
                by_node.insert(a.node.clone(), a.plaintext - b);
            }
            examples.extend(a.examples.iter().cloned());
        }
        let plaintext: u64 = by_node.values().sum();
        if plaintext == 0 {
            examples.clear();
        }
        let mut error = outcome.err().map(|e| format!("{e:#}"));
        if let Err(e) = &flowing
            && error.is_none()
        {
            error = Some(format!("{e:#}\n{}", self.mesh.agent_logs(15)));
        }
        if let Some(e) = &mut error
            && let Some(c) = &self.mesh.controller
        {
            e.push_str(&format!("\n--- controller ---\n{}", c.log_tail(30)));
        }
        Ok(FaultReport {
            fault: fault.name().to_owned(),
            duration_ms: started.elapsed().as_millis() as u64,
            longest_stall_ms: window.longest_stall_ms,
            pings_sent: window.pings_sent,
            pings_lost: window.pings_lost,
            plaintext_packets: plaintext,
            plaintext_by_node: by_node,
            plaintext_examples: examples,
            tcp_reset: !window.breaks.is_empty(),
            tcp_breaks: window.breaks,
            stream_continued: flowing.is_ok(),
            error,
            notes,
            recovered_after_start_ms: self
                .agent_started_at
                .and_then(|t| Some(self.meter.first_answered_ping(t)? - t)),
        })
    }

    /// Restarts agents and the controller that exited by themselves, as their kubelet would
    /// (restartPolicy Always); says which.
    async fn kubelet(&mut self) -> Result<Vec<String>> {
        let mut notes = Vec::new();
        for pos in 0..self.mesh.nodes.len() {
            let exited = self.mesh.nodes[pos]
                .agent
                .as_mut()
                .is_some_and(|a| !a.is_running());
            if exited {
                notes.push(format!(
                    "{}'s agent exited; restarted",
                    self.mesh.nodes[pos].name
                ));
                self.mesh.nodes[pos].agent = None;
                self.mesh.start_agent(pos)?;
            }
        }
        if let Some(c) = self.mesh.controller.as_mut()
            && !c.is_running()
        {
            notes.push("the controller exited; restarted".into());
            c.restart().await?;
        }
        Ok(notes)
    }

    async fn inject(&mut self, fault: Fault) -> Result<()> {
        let o = self.options.clone();
        match fault {
            Fault::AgentTerm | Fault::AgentKill => {
                if fault == Fault::AgentTerm {
                    self.mesh.stop_agent(0);
                } else {
                    self.mesh.kill_agent(0);
                }
                tokio::time::sleep(o.down).await;
                self.agent_started_at = Some(self.meter.now_ms());
                self.mesh.start_agent(0)?;
                self.mesh
                    .wait_peer_counts(self.expected_peers(), Duration::from_secs(90))
                    .await
            }
            Fault::ControllerRestart => {
                let c = self.mesh.controller.as_mut().context("no controller")?;
                c.kill();
                tokio::time::sleep(o.down).await;
                c.restart().await
            }
            Fault::ControlPlaneOutage => {
                self.mesh.cp.stop();
                tokio::time::sleep(o.outage).await;
                self.mesh.cp.start_again().await?;
                self.mesh
                    .wait_peer_counts(self.expected_peers(), Duration::from_secs(90))
                    .await
            }
            Fault::NodeJoin => {
                let pos = self.mesh.add_joining_node().await?;
                let name = self.mesh.nodes[pos].name.clone();
                self.watcher.watch(&name, &self.mesh.underlay_link(pos))?;
                self.joined = Some(name);
                // The risk of a join: traffic to the new node's pods before every node has
                // its peer. From the node's first pod address (host-local hands out .2 first)
                // until the mesh has converged, node-1's pod sends to it.
                let target = first_pod_address(&self.mesh.nodes[pos].pod_cidr)?;
                let _spray = meter::Spray::start(&self.mesh.nodes[0].pod, target)?;
                self.mesh.start_joining_node(pos).await?;
                self.mesh
                    .wait_peer_counts(self.expected_peers(), Duration::from_secs(90))
                    .await
            }
            Fault::NodeLeave => {
                let name = self
                    .joined
                    .take()
                    .context("no node joined: run NodeJoin first")?;
                cluster::delete_node(&self.mesh.client, &name).await?;
                let want = self.expected_peers() - 1;
                let mesh = &self.mesh;
                wait_until(&format!("{name} gone from the other nodes"), 60, || {
                    Ok(mesh
                        .nodes
                        .iter()
                        .enumerate()
                        .filter(|(_, n)| n.name != name)
                        .all(|(i, _)| mesh.wg_peers(i).is_ok_and(|p| p.len() == want)))
                })
                .await?;
                self.watcher.unwatch(&name)?;
                let pos = self
                    .mesh
                    .nodes
                    .iter()
                    .position(|n| n.name == name)
                    .context("the joined node")?;
                self.mesh.remove_node(pos)
            }
            Fault::KeyRotation => {
                let old = self.mesh.public_key(1)?;
                let nodes: Api<k8s_openapi::api::core::v1::Node> =
                    Api::all(self.mesh.client.clone());
                let stamp = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)?
                    .as_secs()
                    .to_string();
                let patch = json!({"metadata": {"annotations": {"wgmesh.io/rotate-key": stamp}}});
                nodes
                    .patch(
                        &self.mesh.nodes[1].name,
                        &PatchParams::default(),
                        &Patch::Merge(&patch),
                    )
                    .await?;
                let mesh = &self.mesh;
                wait_until("node-2's new key on every other node", 60, || {
                    let new = mesh.public_key(1)?;
                    Ok(new != old
                        && (0..mesh.nodes.len()).filter(|&i| i != 1).all(|i| {
                            mesh.wg_peers(i)
                                .is_ok_and(|p| p.iter().any(|(k, _)| *k == new))
                        }))
                })
                .await
            }
            Fault::ExternalPeerDeleted => {
                if self.external_peers == 0 {
                    bail!("no external peer: set Options::external_peer");
                }
                let peers: Api<wgmesh_api::WireGuardPeer> = Api::all(self.mesh.client.clone());
                peers
                    .delete(EXTERNAL_PEER, &DeleteParams::default())
                    .await?;
                self.external_peers -= 1;
                self.mesh
                    .wait_peer_counts(self.expected_peers(), Duration::from_secs(60))
                    .await
            }
            Fault::SecretsDenied => {
                if !o.preshared_key {
                    bail!("no mesh preshared key: set Options::preshared_key");
                }
                let bindings: Api<RoleBinding> =
                    Api::namespaced(self.mesh.client.clone(), SECRETS_NAMESPACE);
                let mut binding = bindings.get(SECRETS_BINDING).await?;
                let before = data_planes(&self.mesh)?;
                bindings
                    .delete(SECRETS_BINDING, &DeleteParams::default())
                    .await?;
                // A fresh controller has no Secret in its cache: it must read them again.
                let c = self.mesh.controller.as_mut().context("no controller")?;
                c.restart().await?;
                tokio::time::sleep(o.secrets_denied).await;
                let after = data_planes(&self.mesh)?;
                binding.metadata.resource_version = None;
                binding.metadata.uid = None;
                binding.metadata.creation_timestamp = None;
                binding.metadata.managed_fields = None;
                bindings.create(&PostParams::default(), &binding).await?;
                if before != after {
                    bail!(
                        "the data plane changed while the controller could not read Secrets:\nbefore {before:?}\nafter {after:?}"
                    );
                }
                Ok(())
            }
        }
    }
}

/// The address host-local gives the first pod of `cidr` (`10.244.4.0/24` -> `10.244.4.2`;
/// `.1` is the bridge's).
fn first_pod_address(cidr: &str) -> Result<std::net::Ipv4Addr> {
    let net: std::net::Ipv4Addr = cidr.split('/').next().unwrap_or_default().parse()?;
    Ok((u32::from(net) + 2).into())
}

/// Every node's peers as (public key, preshared key, allowed IPs), sorted: what a wiping
/// update would change.
fn data_planes(mesh: &TestMesh) -> Result<Vec<Vec<String>>> {
    (0..mesh.nodes.len())
        .map(|i| {
            let mut peers: Vec<String> = mesh
                .wg_dump(i)?
                .lines()
                .skip(1)
                .map(|l| {
                    let f: Vec<&str> = l.split('\t').collect();
                    [0, 1, 3]
                        .iter()
                        .map(|&k| f.get(k).copied().unwrap_or(""))
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .collect();
            peers.sort();
            Ok(peers)
        })
        .collect()
}

/// Waits up to `secs` for `f` to hold.
async fn wait_until(what: &str, secs: u64, f: impl Fn() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if f()? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out after {secs} s waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_pod_address_of_a_node_cidr() {
        assert_eq!(
            first_pod_address("10.244.4.0/24").unwrap(),
            std::net::Ipv4Addr::new(10, 244, 4, 2)
        );
        assert!(first_pod_address("nonsense").is_err());
    }

    #[test]
    fn the_promise_needs_everything() {
        let ok = FaultReport {
            fault: "x".into(),
            duration_ms: 1,
            longest_stall_ms: 5000,
            pings_sent: 10,
            pings_lost: 10,
            plaintext_packets: 0,
            plaintext_by_node: BTreeMap::new(),
            plaintext_examples: vec![],
            tcp_reset: false,
            tcp_breaks: vec![],
            stream_continued: true,
            error: None,
            notes: vec![],
            recovered_after_start_ms: None,
        };
        // Stalls and lost pings are reported, not judged.
        assert!(ok.kept_the_promise());
        for broken in [
            FaultReport {
                plaintext_packets: 1,
                ..ok.clone()
            },
            FaultReport {
                tcp_reset: true,
                ..ok.clone()
            },
            FaultReport {
                stream_continued: false,
                ..ok.clone()
            },
            FaultReport {
                error: Some("no recovery".into()),
                ..ok.clone()
            },
        ] {
            assert!(!broken.kept_the_promise(), "{broken:?}");
        }
    }
}
