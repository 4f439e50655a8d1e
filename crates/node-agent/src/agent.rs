//! The agent's main loop: register, follow the peer stream, and keep the device and routes
//! equal to what the controller wants. When the controller is unreachable the data plane stays
//! exactly as it is while the agent retries with jittered exponential backoff.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use wgmesh_core::{PrivateKey, PublicKey};
use wgmesh_proto as pb;

use crate::client::ControllerClient;
use crate::config::{NetworkArgs, NetworkMode, RunArgs};
use crate::endpoints::{Lookups, Resolutions, is_dns_endpoint};
use crate::error::{Error, Result};
use crate::keys;
use crate::metrics::{Metrics, PeerSample};
use crate::netfilter::{ControllerConnections, Egress, MssClamp, NodeRules};
use crate::routing::{RouteSnapshot, Routing, RoutingConfig, RuleConfig, sparing};
use crate::saved;
use crate::state::{
    DEFAULT_LISTEN_PORT, Desired, listen_port, peer_config, requested_backend, wire_backend,
};
use wgmesh_core::agent_config::{AgentUpdate, Departure, Verdict, verdict};
use wgmesh_device::Device;
use wgmesh_device::{DeviceChange, DeviceState, InterfaceConfig, PeerConfig, device_changes};

const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How often an agent that is not (or no longer) a member registers again.
const REREGISTER: Duration = Duration::from_secs(5);
/// How often what is programmed on the node (routes, guards, rules, the nftables table) is
/// checked and put back where something else removed it: systemd-networkd removes routing
/// rules and routes it did not make when it restarts, and `nft flush ruleset` takes our
/// table. A removed guard or rule would let pod traffic out in plaintext until the next
/// change of the mesh.
const REPAIR_EVERY: Duration = Duration::from_secs(10);
/// A handshake this recent says a peer answers where it is (sessions rekey every 2 minutes).
const RECENT_HANDSHAKE: Duration = Duration::from_secs(180);
/// Priority of the rule that sends marked (encrypted) packets to the fwmark table; ahead of
/// the add-on mode's rule, so encrypted packets never loop into the tunnel.
const FWMARK_RULE_PRIORITY: u32 = 5200;

pub struct Agent {
    args: RunArgs,
    key: PrivateKey,
    device: Option<Device>,
    routing: Routing,
    /// The mesh as the controller last described it (what stream resumption builds on).
    desired: Desired,
    /// What is programmed on the node: `desired`, unless the agent refused it.
    programmed: Desired,
    /// The peers as last applied to the device (endpoints as asked), to tell a roamed
    /// endpoint from one the controller changed.
    last_wanted: Vec<PeerConfig>,
    /// What the peers' DNS endpoints resolved to last.
    resolutions: Resolutions,
    /// Why the last update was not programmed; empty once one is.
    refused: String,
    /// The netfilter rules as last applied by this process (pod egress, MSS clamping).
    node_rules: Option<NodeRules>,
    /// Set once the node left the mesh as it said, until it is a member again.
    departed: Departure,
    /// Addresses of the controller and the API server, kept reachable over the underlay
    /// whatever the mesh says.
    controller_addresses: Vec<std::net::IpAddr>,
    metrics: Metrics,
    /// The last report sent, to report only meaningful changes.
    last_report: Option<pb::ReportStatusRequest>,
    /// The UDP port the controller last accepted a registration with (0: none yet): the
    /// endpoint the other members are told.
    registered_port: u32,
    healthy: Arc<watch::Sender<bool>>,
    /// Underlay links last found filtering reverse paths strictly (warned about once).
    strict_rp_filter: Vec<String>,
    /// The CNI configuration last found sorting before the pods' gate (warned about once).
    gate_shadowed_by: Option<String>,
}

impl Agent {
    pub async fn new(
        args: RunArgs,
        key: PrivateKey,
        metrics: Metrics,
        healthy: Arc<watch::Sender<bool>>,
    ) -> Result<Self> {
        Ok(Agent {
            args,
            key,
            device: None,
            routing: Routing::new().await?,
            desired: Desired::default(),
            programmed: Desired::default(),
            last_wanted: Vec::new(),
            resolutions: Resolutions::default(),
            node_rules: None,
            refused: String::new(),
            departed: Departure::Unspecified,
            controller_addresses: Vec::new(),
            metrics,
            last_report: None,
            registered_port: 0,
            healthy,
            strict_rp_filter: Vec::new(),
            gate_shadowed_by: None,
        })
    }

    /// Runs until the process is told to stop. Never touches the data plane on errors, and
    /// never on stopping: the interface, its routes and the guards stay (a SIGTERM cannot be
    /// told from an upgrade); only the mesh ends a node's membership.
    pub async fn run(mut self) -> Result<()> {
        // The API server as pods see it (the kubelet sets this in every container).
        self.controller_addresses.extend(
            std::env::var("KUBERNETES_SERVICE_HOST")
                .ok()
                .and_then(|h| h.parse::<std::net::IpAddr>().ok()),
        );
        // Tunnels first: resolving the controller's name may need DNS, which may need them.
        self.restore().await;
        self.controller_addresses
            .extend(controller_addresses(&self.args.controller).await);
        let mut backoff = BACKOFF_MIN;
        loop {
            let started = std::time::Instant::now();
            let result = self.session().await;
            self.metrics.set_connected(false);
            match &result {
                // The controller ends a stream when the token it was opened with expires:
                // routine, and the next session carries the kubelet's newer token.
                Err(Error::Rpc(status))
                    if status.code() == tonic::Code::Unauthenticated
                        && status.message().contains("expired")
                        && started.elapsed() > BACKOFF_MAX =>
                {
                    tracing::info!(
                        reason = status.message(),
                        "the controller ended the session; connecting again with the current token"
                    );
                }
                // The controller gone, or what it sent could not be programmed (such as another
                // tool's WireGuard link of the mesh's interface name): the error says which.
                Err(e) => {
                    tracing::warn!(error = %e, "the session with the controller ended; the data plane stays as it is, retrying");
                }
                Ok(()) => {}
            }
            // A session that lasted a while was healthy: start the backoff again.
            if started.elapsed() > BACKOFF_MAX {
                backoff = BACKOFF_MIN;
            }
            self.wait_observing(jitter(backoff)).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// One connection: register, then apply the stream and report until it breaks.
    async fn session(&mut self) -> Result<()> {
        let mark = self
            .desired
            .settings
            .as_ref()
            .and_then(|s| crate::client::controller_mark(s, self.args.controller_host_network));
        let mut client = ControllerClient::connect(&self.args, mark).await?;
        // A new session may reach another replica (or a restarted controller) that has heard
        // nothing: the first report is sent whole, whatever was sent before.
        self.last_report = None;
        let port = listen_port(&self.desired);
        match self.register(&mut client, port).await {
            Ok(response) => {
                let settings = response.mesh.clone().unwrap_or_default();
                if settings.listen_port != 0 && settings.listen_port != port {
                    // First start: we only now know the mesh's port; say it again so our
                    // endpoint is right.
                    self.register(&mut client, settings.listen_port).await?;
                }
                if self.desired.settings.is_none() {
                    // Only for the port we register with until the stream's first message.
                    self.desired.settings = response.mesh;
                }
                tracing::info!(node = %self.args.node, mesh = %self.args.mesh, public_key = %self.key.public_key(), "registered");
            }
            // The mesh or the Node is gone, or the Node is not selected: not a member, but the
            // stream still says whether that ends what this node has programmed.
            Err(Error::Rpc(status))
                if matches!(
                    status.code(),
                    tonic::Code::NotFound | tonic::Code::FailedPrecondition
                ) =>
            {
                tracing::info!(
                    reason = status.message(),
                    "not registered; following the mesh for whether to leave"
                );
            }
            Err(e) => return Err(e),
        }
        // Nothing is programmed from the registration alone: the stream's first message is
        // the whole view, and until it arrives what is programmed (or was saved) stays.

        // The token the stream is opened with: the controller ends the stream when it
        // expires, so a renewed token opens the next one first.
        let mut stream_token = client.current_token();
        let mut stream = self.watch(&mut client).await?;
        // Large updates come in parts; nothing is applied before the last one.
        let mut parts = wgmesh_proto::decode::PartsJoiner::default();
        self.metrics.set_connected(true);
        let mut tick = tokio::time::interval(Duration::from_secs(self.args.report_interval.max(1)));
        let mut membership = tokio::time::interval(REREGISTER);
        let refresh_every = self.args.endpoint_refresh_seconds;
        let mut refresh = tokio::time::interval(Duration::from_secs(refresh_every.max(1)));
        let mut repair = tokio::time::interval(REPAIR_EVERY);
        repair.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = refresh.tick(), if refresh_every > 0 => self.refresh_endpoints().await,
                _ = repair.tick() => self.repair().await,
                _ = membership.tick() => {
                    // The kubelet renewed the token (at 80% of its life): a new stream with
                    // it takes over from this one (the controller ends the older stream of a
                    // node), resuming where this one is, before the controller would end it
                    // at its token's expiry. Never a gap in which the node looks down.
                    let token = client.current_token();
                    if token != stream_token {
                        match self.watch(&mut client).await {
                            Ok(next) => {
                                tracing::info!("the token was renewed; the peer stream moved to the new one");
                                stream = next;
                                stream_token = token;
                                parts = wgmesh_proto::decode::PartsJoiner::default();
                            }
                            Err(e) => tracing::debug!(error = %e, "opening a stream with the renewed token failed; keeping this one"),
                        }
                    }
                    // Registration pending (or refused): say we are here again. A node the
                    // mesh said left (deleted, deselected, mesh gone) waits for the stream to
                    // say it may register again (its departure turns NotRegistered), rather
                    // than asking every few seconds.
                    if self.registration_due() || self.port_moved() {
                        let port = listen_port(&self.desired);
                        if let Err(e) = self.register(&mut client, port).await {
                            tracing::debug!(error = %e, "not a member of the mesh yet");
                        }
                    }
                }
                message = stream.message() => {
                    let part = message?.ok_or(Error::StreamClosed)?;
                    let Some(message) = parts.push(part)? else {
                        continue;
                    };
                    // Checked whole before anything changes: a malformed message is refused.
                    let update = AgentUpdate::try_from(&message)?;
                    if !self.desired.follows(&update) {
                        // Not a change of what we have: start over from a snapshot.
                        self.desired.epoch.clear();
                        return Err(Error::OutOfOrder {
                            epoch: update.epoch,
                            revision: update.revision,
                        });
                    }
                    let rotation = update.rotate_key_request.clone();
                    let was_due = self.registration_due();
                    self.desired.apply(update);
                    if let Some(request) = rotation
                        && keys::handled_rotation(&self.args.mesh_state_dir()).as_deref()
                            != Some(request.as_str())
                    {
                        self.rotate_key(&mut client, &request).await?;
                    }
                    self.metrics.update_received();
                    match verdict(&self.programmed, &self.desired) {
                        Verdict::Program => self.program(self.desired.clone()).await?,
                        Verdict::Leave(reason) => self.leave(reason).await?,
                        Verdict::Refuse(why) => {
                            if why != self.refused {
                                tracing::warn!(reason = %why, "refusing an update that would wipe the data plane; keeping what is programmed");
                                self.metrics.update_refused();
                            }
                            self.refused = why;
                        }
                    }
                    if self.port_moved() {
                        let port = listen_port(&self.desired);
                        // The mesh moved to another port (the device listens there now):
                        // the other members must be told the endpoint with it.
                        tracing::info!(from = self.registered_port, to = port, "the mesh's listen port changed; registering the new endpoint");
                        if let Err(e) = self.register(&mut client, port).await {
                            tracing::warn!(error = %e, "registering the new listen port failed; retrying at the next membership check");
                        }
                    }
                    if self.registration_due() && !was_due {
                        // The mesh has us again (Node back, selected again, mesh re-created).
                        let port = listen_port(&self.desired);
                        if let Err(e) = self.register(&mut client, port).await {
                            tracing::debug!(error = %e, "not a member of the mesh yet");
                        }
                    }
                    // Said now rather than at the next tick; a refused report is not worth
                    // the stream.
                    if let Err(e) = self.report(&mut client).await {
                        tracing::debug!(error = %e, "reporting after an update failed");
                    }
                }
                _ = tick.tick() => self.report(&mut client).await?,
            }
        }
    }

    /// Opens the peer stream, resuming from what this agent has.
    async fn watch(
        &self,
        client: &mut ControllerClient,
    ) -> Result<tonic::Streaming<pb::PeerUpdate>> {
        let req = client.request(pb::WatchPeersRequest {
            node: self.args.node.clone(),
            mesh: self.args.mesh.clone(),
            resume_epoch: self.desired.epoch.clone(),
            resume_revision: self.desired.revision,
            accepts_parts: true,
            accepts_allowed_ips_changes: true,
        });
        Ok(client.grpc().watch_peers(req).await?.into_inner())
    }

    /// Resolves the programmed peers' DNS endpoints again and moves a peer whose name now
    /// resolves elsewhere (a node or site that changed address). Nothing else changes: the
    /// device diff sees only the endpoints that moved.
    async fn refresh_endpoints(&mut self) {
        let named = self
            .programmed
            .peers
            .values()
            .any(|p| p.endpoint.as_deref().is_some_and(is_dns_endpoint));
        if !named || self.device.is_none() {
            return;
        }
        let programmed = self.programmed.clone();
        if let Err(e) = self.reconcile(&programmed, Lookups::All).await {
            tracing::warn!(error = %e, "re-resolving peer endpoints failed");
        }
    }

    /// Whether to (re)register: not a member, and not told by the mesh that this node left it.
    fn registration_due(&self) -> bool {
        !self.desired.is_member() && !self.desired.departure.ends_membership()
    }

    /// Whether the mesh's listen port moved since this member registered (the device listens
    /// on the new one; the other members must be told).
    fn port_moved(&self) -> bool {
        self.registered_port != 0
            && self.registered_port != listen_port(&self.desired)
            && self.desired.is_member()
    }

    /// A new private key, as the Node's rotation annotation asked: kept on disk first, then on
    /// the device, then registered so the mesh learns the new public key.
    async fn rotate_key(&mut self, client: &mut ControllerClient, request: &str) -> Result<()> {
        let dir = self.args.mesh_state_dir();
        let (key, _) = keys::load_or_create(&dir, true)?;
        keys::record_rotation(&dir, request)?;
        self.key = key.clone();
        if let Some(device) = &self.device {
            device.apply(&[DeviceChange::SetPrivateKey(key)]).await?;
        }
        let port = listen_port(&self.desired);
        self.register(client, port).await?;
        tracing::info!(public_key = %self.key.public_key(), "rotated the private key as the Node's annotation asked");
        Ok(())
    }

    async fn register(
        &mut self,
        client: &mut ControllerClient,
        port: u32,
    ) -> Result<pb::RegisterResponse> {
        let named: Vec<String> = self
            .args
            .endpoint_address
            .iter()
            .map(ToString::to_string)
            .collect();
        let response = match self.register_at(client, port, named.clone()).await {
            // The address we were started with is no longer the Node's (its InternalIP
            // changed since, and the environment still has the old one): let the controller
            // take the Node's own address rather than stay out of the mesh.
            Err(Error::Rpc(status))
                if status.code() == tonic::Code::PermissionDenied && !named.is_empty() =>
            {
                tracing::warn!(addresses = ?named, reason = status.message(), "the endpoint address we were given is not the Node's; registering with the Node's own address");
                self.register_at(client, port, Vec::new()).await?
            }
            other => other?,
        };
        self.registered_port = port;
        Ok(response)
    }

    async fn register_at(
        &self,
        client: &mut ControllerClient,
        port: u32,
        endpoint_addresses: Vec<String>,
    ) -> Result<pb::RegisterResponse> {
        let req = client.request(pb::RegisterRequest {
            node: self.args.node.clone(),
            mesh: self.args.mesh.clone(),
            public_key: self.key.public_key().as_bytes().to_vec(),
            endpoint_addresses,
            listen_port: port,
            backend: wire_backend(self.device.as_ref().map(Device::backend)) as i32,
            agent_version: env!("CARGO_PKG_VERSION").into(),
        });
        Ok(client.grpc().register(req).await?.into_inner())
    }

    /// Programs the saved configuration of the last run, before the controller is reached:
    /// a restarted userspace device gets its tunnels back (a kernel one still has them) even
    /// while the controller is down. Failures are logged; the controller's view follows.
    async fn restore(&mut self) {
        let Some(saved) = saved::load(&self.args.mesh_state_dir()) else {
            return;
        };
        tracing::info!(
            peers = saved.peers.len(),
            revision = saved.revision,
            "programming the configuration saved by the last run"
        );
        self.desired = saved.clone();
        // What the last run asked the device for, as far as it is known without DNS: a
        // persistent (kernel) device kept its peers, and a peer that roamed since (behind
        // NAT) keeps its roamed endpoint instead of being sent back to the configured one.
        self.last_wanted = saved
            .peers
            .values()
            .map(|p| {
                let literal = p.endpoint.as_deref().and_then(|e| e.parse().ok());
                peer_config(p, literal)
            })
            .collect();
        if let Err(e) = self.program(saved).await {
            tracing::warn!(error = %e, "could not program the saved configuration; waiting for the controller");
        } else if let Some(device) = &self.device {
            device.renew_sessions();
        }
    }

    /// Makes the node what `next` describes (device, routes and guards, CNI configuration),
    /// then remembers and saves it as programmed.
    async fn program(&mut self, next: Desired) -> Result<()> {
        if next.settings.as_ref().is_some_and(|s| s.disabled) {
            tracing::info!("the mesh is disabled: keeping the interface as it is");
            return Ok(());
        }
        self.ensure_device(next.settings.as_ref()).await?;
        // Without a refresh timer, every change of the mesh is when names are followed.
        let lookups = if self.args.endpoint_refresh_seconds == 0 {
            Lookups::All
        } else {
            Lookups::New
        };
        self.reconcile(&next, lookups).await?;
        self.refused.clear();
        let dir = self.args.mesh_state_dir();
        if next.is_member() {
            if self.departed == Departure::MeshDeleted {
                // The mesh came back while this agent ran: its key is the node's again.
                crate::keys::store(&dir, &self.key)?;
            }
            self.departed = Departure::Unspecified;
        }
        saved::save(&dir, &next).map_err(|source| Error::Write {
            path: saved::path(&dir).display().to_string(),
            source,
        })?;
        self.programmed = next;
        Ok(())
    }

    /// The mesh ended this node's membership: removes the device, our routes, guards and
    /// rules, the CNI configuration (and the pods' bridge once no pod uses it) and the saved
    /// configuration. The key stays for a later return, unless the mesh itself was deleted
    /// (`helm uninstall`): then the mesh's state directory goes too.
    async fn leave(&mut self, reason: Departure) -> Result<()> {
        if self.departed == reason && self.device.is_none() {
            return Ok(());
        }
        tracing::info!(
            reason = reason.as_str(),
            "the mesh ended this node's membership; removing its data path"
        );
        let settings = self
            .programmed
            .settings
            .clone()
            .or_else(|| self.desired.settings.clone())
            .unwrap_or_default();
        let interface = if settings.interface_name.is_empty() {
            wgmesh_api_default_interface()
        } else {
            settings.interface_name.clone()
        };
        if let Some(device) = self.device.take() {
            device.delete().await?;
        }
        self.last_wanted.clear();
        self.resolutions = Resolutions::default();
        let routing = routing_config(
            &self.args.network,
            &settings,
            &interface,
            &Desired::default(),
            &[],
        );
        self.routing
            .cleanup(&interface, self.args.network.route_table, &routing.rules)
            .await?;
        let net = &self.args.network;
        crate::cni::gate::sync(&net.cni_conf_dir, &net.cni_run_dir, false).map_err(|source| {
            Error::Write {
                path: net
                    .cni_conf_dir
                    .join(crate::cni::gate::GATE_FILE)
                    .display()
                    .to_string(),
                source,
            }
        })?;
        if self.args.network.network_mode == NetworkMode::Cni {
            let dir = &self.args.network.cni_conf_dir;
            crate::cni::remove_conflist(dir, &self.args.network.cni_run_dir).map_err(|source| {
                Error::Write {
                    path: crate::cni::conflist_path(dir).display().to_string(),
                    source,
                }
            })?;
            // Best effort: a bridge left behind must not keep the node from saying it left.
            let bridge = &self.args.network.cni_bridge;
            match self.routing.remove_bridge_if_unused(bridge).await {
                Ok(true) => {
                    tracing::info!(bridge = %bridge, "removed the pods' bridge (no pod uses it)")
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(bridge = %bridge, error = %e, "could not remove the pods' bridge")
                }
            }
        }
        // Best effort, as for the bridge: a kernel without nf_tables must not keep the node
        // from saying it left.
        if let Err(e) = crate::netfilter::apply(None).await {
            tracing::warn!(error = %e, "could not remove the nftables table inet wgmesh");
        }
        self.node_rules = None;
        let dir = self.args.mesh_state_dir();
        saved::remove(&dir).map_err(|source| Error::Write {
            path: saved::path(&dir).display().to_string(),
            source,
        })?;
        if reason == Departure::MeshDeleted {
            crate::keys::forget(&dir)?;
            tracing::info!(dir = %dir.display(), "the mesh is deleted: removed its key and state");
        }
        self.programmed = Desired {
            departure: reason,
            ..Desired::default()
        };
        self.refused.clear();
        self.departed = reason;
        self.metrics.set_peers(0);
        Ok(())
    }

    /// Creates the device on first use with the mesh's interface settings.
    async fn ensure_device(&mut self, settings: Option<&pb::MeshSettings>) -> Result<()> {
        let Some(settings) = settings.cloned() else {
            return Ok(());
        };
        if let Some(device) = &self.device {
            if device.name() != settings.interface_name {
                tracing::warn!(
                    have = device.name(),
                    want = %settings.interface_name,
                    "the mesh's interface name changed; restart the agent to rename the interface"
                );
            }
            return Ok(());
        }
        let requested = requested_backend(self.args.backend, settings.backend());
        let config = InterfaceConfig {
            name: settings.interface_name.clone(),
            private_key: self.key.clone(),
            listen_port: u16::try_from(settings.listen_port).unwrap_or(DEFAULT_LISTEN_PORT as u16),
            fwmark: settings.fwmark,
        };
        // A link an agent older than the ownership alias made, under a key since rotated: it
        // still carries the peers the saved state lists (another tool's is refused below).
        let known = saved::peers_on(&self.args.mesh_state_dir(), &config.name);
        if !known.is_empty() {
            match wgmesh_device::kernel::claim_link(&config.name, None, &known).await {
                Ok(true) => {
                    tracing::info!(interface = %config.name, "marked the WireGuard link carrying this node's saved peers as wgmesh's")
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "could not check whose the interface is"),
            }
        }
        let device = Device::open(requested, config).await?;
        tracing::info!(interface = device.name(), backend = %device.backend(), "device ready");
        self.device = Some(device);
        Ok(())
    }

    /// Applies the difference between the device and `desired`, then the routes and guards;
    /// `lookups` says which peers' DNS names are looked up again.
    async fn reconcile(&mut self, desired: &Desired, lookups: Lookups) -> Result<()> {
        let Some(device) = &self.device else {
            return Ok(());
        };
        let settings = desired.settings.clone().unwrap_or_default();
        // Strict: the interface and its routes outlive this process (a crash or an upgrade
        // leaves them dropping traffic, not sending it in plaintext). Plaintext fallback: a
        // userspace interface goes with the process, and the node's other routes take over.
        device.keep_after_exit(!settings.plaintext_fallback)?;
        let observed = device.observe().await?;
        // What each name resolved to last time is kept while the name still resolves to it
        // and the peer answers there: a name with several addresses (round robin) must not
        // move a working peer every refresh, nor keep one on a dead address.
        let answering: std::collections::HashSet<&PublicKey> = observed
            .peers
            .iter()
            .filter(|p| {
                p.last_handshake
                    .and_then(|at| SystemTime::now().duration_since(at).ok())
                    .is_some_and(|age| age < RECENT_HANDSHAKE)
            })
            .map(|p| &p.config.public_key)
            .collect();
        let before: std::collections::HashMap<&PublicKey, SocketAddr> = self
            .last_wanted
            .iter()
            .filter(|p| answering.contains(&p.public_key))
            .filter_map(|p| Some((&p.public_key, p.endpoint?)))
            .collect();
        let named: Vec<(PublicKey, Option<&str>)> = desired
            .peers
            .values()
            .map(|p| (p.public_key, p.endpoint.as_deref()))
            .collect();
        let endpoints = self.resolutions.endpoints(&named, lookups, &before).await;
        let wanted: Vec<PeerConfig> = desired
            .peers
            .values()
            .zip(endpoints)
            .map(|(peer, endpoint)| peer_config(peer, endpoint))
            .collect();
        let port = u16::try_from(settings.listen_port).unwrap_or(0);
        let changes = device_changes(&observed, &wanted, &self.last_wanted, port, settings.fwmark);
        if !changes.is_empty() {
            tracing::info!(
                changes = changes.len(),
                peers = wanted.len(),
                revision = desired.revision,
                "updating the device"
            );
            device.apply(&changes).await?;
        }
        let peers = wanted.len();
        self.last_wanted = wanted;
        let device_name = device.name().to_owned();
        // The routing table is read once for the underlay, the sync and the MTU.
        let snapshot = self.routing.snapshot().await?;
        let routing = self.routing_of(desired, &device_name, &snapshot).await?;
        // A refused guard or rule is an error here: nothing (no CNI configuration, no gate)
        // may let pods start on a node whose protection is not in place.
        let changed = self.routing.sync_from(&routing, &snapshot).await?;
        if !changed.is_empty() {
            tracing::info!(?changed, "routes updated");
        }
        if !changed.refused.is_empty() {
            tracing::warn!(refused = ?changed.refused, "the kernel refused routing changes; the guards drop what they would carry, the rest is in place");
        }
        let mtu = self.tunnel_mtu(&settings, &snapshot).await?;
        drop(snapshot);
        self.write_pod_network(desired, mtu).await?;
        let net = &self.args.network;
        let rules = NodeRules {
            egress: (net.masquerades() && !desired.pod_cidrs.is_empty()).then(|| Egress {
                pod_cidrs: desired.pod_cidrs.clone(),
                keep_source_via: vec![device_name.clone(), net.cni_bridge.clone()],
            }),
            mss_clamp: net.clamp_mss.then(|| MssClamp {
                interface: device_name.clone(),
                mtu,
            }),
            controller_connections: crate::client::controller_mark(
                &settings,
                self.args.controller_host_network,
            )
            .map(|mark| ControllerConnections {
                port: crate::client::controller_port(&self.args.controller),
                mark,
                tunnel: device_name.clone(),
            }),
        };
        if self.node_rules.as_ref() != Some(&rules) {
            // Egress and MSS clamping improve the mesh; encryption does not depend on them, so
            // a kernel without nf_tables gets the tunnels anyway (and a retry next time).
            match crate::netfilter::apply(Some(&rules)).await {
                Ok(()) => {
                    tracing::info!(
                        masquerade = ?rules.egress.as_ref().map(|e| &e.pod_cidrs),
                        mss_clamp_mtu = rules.mss_clamp.as_ref().map(|c| c.mtu),
                        "node rules applied (nftables table inet wgmesh)"
                    );
                    self.node_rules = Some(rules);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not apply the node's nftables rules (pod egress, MSS clamping, the control connection under host encryption); the tunnels do not depend on them")
                }
            }
        }
        self.check_reverse_path_filter(&settings).await;
        self.metrics.set_peers(peers);
        // Ready only once everything asked for is in place.
        self.healthy.send_replace(changed.refused.is_empty());
        Ok(())
    }

    /// The routes, guards and rules `desired` asks for on interface `interface`.
    async fn routing_of(
        &self,
        desired: &Desired,
        interface: &str,
        snapshot: &RouteSnapshot,
    ) -> Result<RoutingConfig> {
        let settings = desired.settings.clone().unwrap_or_default();
        let mut keep_reachable = self.routing.underlay_addresses_in(snapshot).await?;
        keep_reachable.extend(self.args.endpoint_address.iter().copied());
        keep_reachable.extend(self.controller_addresses.iter().copied());
        Ok(routing_config(
            &self.args.network,
            &settings,
            interface,
            desired,
            &keep_reachable,
        ))
    }

    /// Puts back what is programmed where something else removed it ([`REPAIR_EVERY`]):
    /// routes, guards and rules are diffed against the kernel's (nothing changes when all
    /// is there), and the nftables table is written again (one atomic batch).
    async fn repair(&mut self) {
        let Some(device) = &self.device else {
            return;
        };
        if !self.programmed.is_member()
            || self
                .programmed
                .settings
                .as_ref()
                .is_some_and(|s| s.disabled)
        {
            return;
        }
        let programmed = self.programmed.clone();
        let name = device.name().to_owned();
        let snapshot = match self.routing.snapshot().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "checking the node's routes failed");
                return;
            }
        };
        let routing = match self.routing_of(&programmed, &name, &snapshot).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "checking the node's routes failed");
                return;
            }
        };
        let routed = match self.routing.sync_from(&routing, &snapshot).await {
            Ok(changed) => {
                if !changed.is_empty() {
                    self.metrics.repaired();
                    tracing::warn!(
                        ?changed,
                        "routes, guards or rules of the mesh were removed by something else; put back"
                    );
                }
                if !changed.refused.is_empty() {
                    tracing::debug!(refused = ?changed.refused, "the kernel still refuses routing changes");
                }
                self.healthy.send_replace(changed.refused.is_empty());
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "putting the node's routes back failed");
                false
            }
        };
        // The CNI configuration (its content in /run) is written again only over routes and
        // guards in place.
        // (CNI mode without pod CIDRs has nothing to write, and says so when programming.)
        let settings = programmed.settings.clone().unwrap_or_default();
        let cni_without_pods =
            self.args.network.network_mode == NetworkMode::Cni && programmed.pod_cidrs.is_empty();
        if routed && !cni_without_pods {
            // Add-on mode writes its gate only: no MTU to read for it.
            let mtu = match self.args.network.network_mode {
                NetworkMode::Cni => self.tunnel_mtu(&settings, &snapshot).await,
                NetworkMode::Addon => Ok(0),
            };
            let written = match mtu {
                Ok(mtu) => self.write_pod_network(&programmed, mtu).await,
                Err(e) => Err(e),
            };
            if let Err(e) = written {
                tracing::warn!(error = %e, "writing the pods' CNI configuration again failed");
            }
        }
        if let Some(rules) = &self.node_rules
            && let Err(e) = crate::netfilter::apply(Some(rules)).await
        {
            tracing::warn!(error = %e, "writing the node's nftables rules again failed");
        }
        self.check_reverse_path_filter(&settings).await;
    }

    /// With host encryption, says (once per change) which underlay links filter reverse
    /// paths strictly, which cuts the nodes' underlay off (`crate::rp_filter`).
    async fn check_reverse_path_filter(&mut self, settings: &pb::MeshSettings) {
        if !settings.host_encryption || settings.fwmark == 0 {
            return;
        }
        let links = match self.routing.underlay_links().await {
            Ok(l) => l,
            Err(e) => {
                tracing::debug!(error = %e, "listing the underlay's links failed");
                return;
            }
        };
        let strict =
            crate::rp_filter::strict_links(std::path::Path::new("/proc/sys/net/ipv4/conf"), &links);
        if strict != self.strict_rp_filter {
            if !strict.is_empty() {
                tracing::warn!(
                    links = ?strict,
                    "hostEncryption with strict reverse-path filtering (rp_filter=1) on the underlay: the kernel drops what other nodes send from addresses routed into the tunnel (ARP included), so nodes lose each other; set net.ipv4.conf.all.rp_filter and net.ipv4.conf.<link>.rp_filter to 2 (loose) on every node"
                );
            }
            self.strict_rp_filter = strict;
        }
    }

    /// The tunnel's MTU: the mesh's, or the underlay's less WireGuard's overhead.
    async fn tunnel_mtu(
        &self,
        settings: &pb::MeshSettings,
        snapshot: &RouteSnapshot,
    ) -> Result<u32> {
        Ok(match settings.mtu {
            0 => crate::routing::auto_mtu(
                self.routing
                    .underlay_mtu_in(
                        snapshot,
                        None,
                        marked_packets_table(&self.args.network, settings),
                    )
                    .await?,
            ),
            m => m,
        })
    }

    /// CNI mode: the node's conflist (pods get the tunnel's `mtu`), once the controller has
    /// told us the pod CIDRs.
    async fn write_cni_config(&self, mtu: u32, desired: &Desired) -> Result<()> {
        if desired.pod_cidrs.is_empty() {
            tracing::warn!(node = %self.args.node, "CNI mode, but the Node has no pod CIDRs yet: no CNI configuration written");
            return Ok(());
        }
        let net = &self.args.network;
        let conflist = crate::cni::conflist(&desired.pod_cidrs, mtu, &net.cni_bridge);
        let path = crate::cni::conflist_path(&net.cni_conf_dir);
        let written = crate::cni::write_conflist(&net.cni_conf_dir, &net.cni_run_dir, &conflist)
            .map_err(|source| Error::Write {
                path: path.display().to_string(),
                source,
            })?;
        if written {
            tracing::info!(path = %path.display(), content = %net.cni_run_dir.display(), pod_cidrs = ?desired.pod_cidrs, mtu, "CNI configuration written");
        }
        Ok(())
    }

    /// What the container runtime reads for pods, written over routes and guards in place:
    /// CNI mode's conflist (pods get the tunnel's MTU, `mtu`) or add-on mode's gate; each
    /// mode removes the other's, which would sort before its own.
    async fn write_pod_network(&mut self, desired: &Desired, mtu: u32) -> Result<()> {
        match self.args.network.network_mode {
            NetworkMode::Cni => {
                self.write_cni_config(mtu, desired).await?;
                self.sync_pod_gate(false);
            }
            NetworkMode::Addon => {
                let strict = !desired
                    .settings
                    .as_ref()
                    .is_some_and(|s| s.plaintext_fallback);
                self.sync_pod_gate(strict);
                self.remove_cni_mode_conflist();
            }
        }
        Ok(())
    }

    /// Add-on mode: the copy of the other CNI's configuration that keeps pods from starting
    /// after a reboot before the node is programmed (`cni::gate`), when `wanted` (a strict
    /// mesh); removed when not. A failure is logged: the tunnels do not depend on it.
    fn sync_pod_gate(&mut self, wanted: bool) {
        use crate::cni::gate::{self, Outcome};
        let net = &self.args.network;
        match gate::sync(&net.cni_conf_dir, &net.cni_run_dir, wanted) {
            Ok(outcome) => {
                let shadowed_by = match &outcome {
                    Outcome::Shadowed { from, .. } => Some(from.clone()),
                    _ => None,
                };
                if shadowed_by != self.gate_shadowed_by {
                    if let Some(from) = &shadowed_by {
                        tracing::warn!(%from, gate = gate::GATE_FILE, "another CNI configuration sorts before the pods' gate, so none is kept: after a reboot, pods may start before the node is programmed");
                    }
                    self.gate_shadowed_by = shadowed_by;
                }
                match outcome {
                    Outcome::Written { from } => {
                        tracing::info!(%from, gate = gate::GATE_FILE, "pods' gate written: a copy of the pod network's configuration, gone on a reboot until the node is programmed")
                    }
                    Outcome::Absent { removed: true } => {
                        tracing::info!(gate = gate::GATE_FILE, wanted, "pods' gate removed")
                    }
                    Outcome::Unreadable { error } => {
                        tracing::warn!(%error, "the pod network's configuration cannot be read; the pods' gate stays as it was")
                    }
                    Outcome::Unchanged { .. }
                    | Outcome::Absent { removed: false }
                    | Outcome::Shadowed { .. } => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, dir = %net.cni_conf_dir.display(), "could not write the pods' gate")
            }
        }
    }

    /// Add-on mode: CNI mode's conflist, left by an agent of that mode, goes (it would give
    /// pods our bridge instead of the other CNI's network). A failure is logged.
    fn remove_cni_mode_conflist(&self) {
        let net = &self.args.network;
        match crate::cni::remove_conflist(&net.cni_conf_dir, &net.cni_run_dir) {
            Ok(true) => tracing::info!(
                path = %crate::cni::conflist_path(&net.cni_conf_dir).display(),
                "removed CNI mode's configuration (the agent is in add-on mode)"
            ),
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "could not remove CNI mode's configuration"),
        }
    }

    /// Waits `wait` between two attempts to reach the controller, keeping the per-peer
    /// metrics current meanwhile: the tunnels carry traffic without the controller, and a
    /// scrape should show it.
    async fn wait_observing(&mut self, wait: Duration) {
        let until = tokio::time::Instant::now() + wait;
        let mut tick = tokio::time::interval(Duration::from_secs(self.args.report_interval.max(1)));
        let mut repair =
            tokio::time::interval_at(tokio::time::Instant::now() + REPAIR_EVERY, REPAIR_EVERY);
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(until) => return,
                _ = repair.tick() => self.repair().await,
                _ = tick.tick() => {
                    if let Err(e) = self.observe().await {
                        tracing::debug!(error = %e, "reading the device for metrics failed");
                    }
                }
            }
        }
    }

    /// Reads the device's per-peer state and updates the metrics with it.
    async fn observe(&self) -> Result<Option<DeviceState>> {
        let state = match &self.device {
            Some(device) => Some(device.observe().await?),
            None => None,
        };
        let samples: Vec<PeerSample> = state
            .iter()
            .flat_map(|s| s.peers.iter())
            .map(|p| {
                let desired = self.desired.peers.get(&p.config.public_key);
                PeerSample {
                    name: desired.map_or("unknown", |d| d.name.as_str()).to_owned(),
                    node: desired.is_some_and(|d| d.node.is_some()),
                    public_key: p.config.public_key.to_string(),
                    rx_bytes: p.rx_bytes,
                    tx_bytes: p.tx_bytes,
                    last_handshake: p.last_handshake,
                    endpoint: p.current_endpoint,
                }
            })
            .collect();
        self.metrics.observe_peers(&samples, SystemTime::now());
        Ok(state)
    }

    /// Reports per-peer observations when they changed meaningfully (handshake, endpoint or
    /// traffic); a quiet mesh sends nothing.
    async fn report(&mut self, client: &mut ControllerClient) -> Result<()> {
        // The controller takes reports from members only, and from a node that left a
        // deleted mesh (the mesh's deletion waits for that).
        if !self.desired.is_member() && self.departed != Departure::MeshDeleted {
            return Ok(());
        }
        let state = self.observe().await?;
        let observed: &[wgmesh_core::device::PeerState] =
            state.as_ref().map_or(&[], |s| s.peers.as_slice());
        // Node peers one by one only in a small mesh; above, their count of live sessions.
        let (reported, live_node_sessions) = wgmesh_core::report::select(
            observed,
            |key| {
                self.desired
                    .peers
                    .get(key)
                    .is_some_and(|p| p.node.is_some())
            },
            wgmesh_core::report::NODE_PEER_DETAIL_LIMIT,
            SystemTime::now(),
        );
        let peers: Vec<pb::PeerStatus> = reported
            .into_iter()
            .map(|p| pb::PeerStatus {
                public_key: p.config.public_key.as_bytes().to_vec(),
                last_handshake: p.last_handshake.map(prost_types::Timestamp::from),
                rx_bytes: p.rx_bytes,
                tx_bytes: p.tx_bytes,
                endpoint: p
                    .current_endpoint
                    .map(|e| e.to_string())
                    .unwrap_or_default(),
            })
            .collect();
        let report = pb::ReportStatusRequest {
            node: self.args.node.clone(),
            mesh: self.args.mesh.clone(),
            peers,
            programmed_epoch: self.programmed.epoch.clone(),
            programmed_revision: self.programmed.revision,
            departed: wgmesh_proto::decode::wire_departure(self.departed) as i32,
            refused_update: self.refused.clone(),
            live_node_sessions: Some(live_node_sessions),
        };
        if !worth_reporting(self.last_report.as_ref(), &report) {
            return Ok(());
        }
        let req = client.request(report.clone());
        client.grpc().report_status(req).await?;
        self.last_report = Some(report);
        Ok(())
    }
}

/// Whether a report says something new: peers observed differently, a refusal or a departure
/// changed, or the node got its first programmed configuration from this controller. A new
/// revision alone is not news (thousands of agents would answer every change).
fn worth_reporting(last: Option<&pb::ReportStatusRequest>, now: &pb::ReportStatusRequest) -> bool {
    let Some(last) = last else {
        return true;
    };
    last.peers != now.peers
        || last.live_node_sessions != now.live_node_sessions
        || last.departed != now.departed
        || last.refused_update != now.refused_update
        || last.programmed_epoch != now.programmed_epoch
        || (last.programmed_revision == 0) != (now.programmed_revision == 0)
}

/// The controller's addresses, from its URL (resolved if it is a name), so that routing never
/// takes them into the mesh or blackholes them.
async fn controller_addresses(url: &str) -> Vec<std::net::IpAddr> {
    let Ok(uri) = url.parse::<tonic::transport::Uri>() else {
        return Vec::new();
    };
    let Some((host, port)) = crate::client::host_and_port(&uri) else {
        return Vec::new();
    };
    if let Ok(ip) = host.parse() {
        return vec![ip];
    }
    match tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::lookup_host((host, port)),
    )
    .await
    {
        Ok(Ok(addrs)) => addrs.map(|a| a.ip()).collect(),
        _ => Vec::new(),
    }
}

/// The interface name when nothing better is known.
fn wgmesh_api_default_interface() -> String {
    "wgmesh0".to_owned()
}

/// Up to ±25% around `d`, so agents restarted together do not retry in lockstep.
fn jitter(d: Duration) -> Duration {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|t| t.subsec_nanos())
        .unwrap_or(0);
    let factor = 0.75 + f64::from(nanos % 1000) / 2000.0;
    d.mul_f64(factor)
}

/// Whether the routes to peers go in a table of our own ([`routing_config`]).
fn dedicated_table(net: &NetworkArgs, settings: &pb::MeshSettings) -> bool {
    net.network_mode == NetworkMode::Addon || settings.fwmark != 0
}

/// The routing table the mesh's encrypted (marked) packets are looked up in ahead of the
/// main table: the mesh's fwmark table, unless it is the agent's own route table, where
/// they would be routed back into the tunnel. `None`: the main table.
fn marked_packets_table(net: &NetworkArgs, settings: &pb::MeshSettings) -> Option<u32> {
    let into_ours = dedicated_table(net, settings) && settings.fwmark_table == net.route_table;
    (settings.fwmark != 0 && settings.fwmark_table != 0 && !into_ours)
        .then_some(settings.fwmark_table)
}

/// Where the routes to peers go, and the rules that select them. CNI mode: the main table
/// (nothing else routes pods), unless the mesh marks its packets (`fwmark`, which host
/// encryption needs). Add-on mode, and a marking mesh: a table of our own, looked up ahead
/// of the main table, where the other CNI's plaintext routes to the same pod CIDRs are; when
/// the mesh marks its encrypted packets, they are exempt (`not fwmark`), which keeps a peer
/// whose allowed IPs cover its own endpoint from looping.
///
/// Strict meshes (the default) also get guards: a blackhole behind every network the mesh
/// protects (peers' allowed IPs, the tunnel pools, the cluster's pod networks), so that
/// whatever happens to the interface that traffic is dropped rather than sent elsewhere in
/// plaintext; the node's own pod CIDRs stay local. Nothing containing an address in
/// `keep_reachable` (the underlay, the controller) is ever routed into the mesh or guarded.
pub fn routing_config(
    net: &NetworkArgs,
    settings: &pb::MeshSettings,
    interface: &str,
    desired: &Desired,
    keep_reachable: &[std::net::IpAddr],
) -> RoutingConfig {
    let mut rules = Vec::new();
    // A mesh that marks its packets has its routes in our table behind `not fwmark` in
    // every mode: the marked packets skip them, so a peer whose allowed IPs cover its own
    // endpoint (which the controller then accepts) does not loop.
    let dedicated = dedicated_table(net, settings);
    if dedicated && settings.fwmark_table == net.route_table {
        tracing::warn!(
            table = net.route_table,
            "the mesh's fwmark table is the agent's route table: marked packets use the main table instead"
        );
    }
    if let Some(table) = marked_packets_table(net, settings) {
        rules.push(RuleConfig {
            priority: FWMARK_RULE_PRIORITY,
            fwmark: settings.fwmark,
            table,
            invert: false,
        });
    }
    // Host encryption routes the other nodes' own addresses into the interface: the main
    // table cannot hold those routes (the tunnel's packets to the same addresses would loop),
    // so they go in our table, which the tunnel's marked packets skip.
    let table = if dedicated {
        rules.push(RuleConfig {
            priority: net.route_rule_priority,
            fwmark: settings.fwmark,
            table: net.route_table,
            invert: settings.fwmark != 0,
        });
        net.route_table
    } else {
        0
    };
    let (routes, refused) = sparing(&desired.routes(), keep_reachable);
    if !refused.is_empty() {
        tracing::warn!(
            ?refused,
            "not routing into the mesh what covers the underlay or the controller"
        );
    }
    let guards = if settings.plaintext_fallback || !desired.is_member() {
        Vec::new()
    } else {
        let mut protected = routes.clone();
        protected.extend(
            settings
                .tunnel_cidrs
                .iter()
                .chain(&settings.cluster_cidrs)
                .filter_map(|c| c.parse::<ipnet::IpNet>().ok())
                .map(|n| n.trunc()),
        );
        let (guards, refused) = sparing(&protected, keep_reachable);
        if !refused.is_empty() {
            tracing::warn!(
                ?refused,
                "not guarding what covers the underlay or the controller"
            );
        }
        guards
    };
    RoutingConfig {
        interface: interface.to_owned(),
        addresses: desired.addresses.clone(),
        mtu: (settings.mtu != 0).then_some(settings.mtu),
        routes,
        table,
        rules,
        guards,
        local: desired.pod_cidrs.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn net(mode: &str) -> NetworkArgs {
        crate::config::Cli::parse_from(["wgmesh-agent", "--network-mode", mode])
            .run
            .network
    }

    #[test]
    fn routing_per_network_mode() {
        #[derive(Debug)]
        struct Case {
            mode: &'static str,
            fwmark: (u32, u32),
            host_encryption: bool,
            table: u32,
            rules: Vec<(u32, u32, u32, bool)>,
        }
        let cases = [
            Case {
                mode: "cni",
                fwmark: (0, 0),
                host_encryption: false,
                table: 0,
                rules: vec![],
            },
            Case {
                mode: "cni",
                fwmark: (0x57, 100),
                host_encryption: false,
                table: 51820,
                rules: vec![(5200, 0x57, 100, false), (5210, 0x57, 51820, true)],
            },
            Case {
                mode: "cni",
                fwmark: (0x57, 0),
                host_encryption: false,
                table: 51820,
                rules: vec![(5210, 0x57, 51820, true)],
            },
            Case {
                mode: "cni",
                fwmark: (0x57, 0),
                host_encryption: true,
                table: 51820,
                rules: vec![(5210, 0x57, 51820, true)],
            },
            Case {
                // Without a mark the tunnel's packets would loop: host encryption is off.
                mode: "cni",
                fwmark: (0, 0),
                host_encryption: true,
                table: 0,
                rules: vec![],
            },
            Case {
                mode: "addon",
                fwmark: (0, 0),
                host_encryption: false,
                table: 51820,
                rules: vec![(5210, 0, 51820, false)],
            },
            Case {
                mode: "addon",
                fwmark: (0x57, 100),
                host_encryption: false,
                table: 51820,
                rules: vec![(5200, 0x57, 100, false), (5210, 0x57, 51820, true)],
            },
            Case {
                mode: "addon",
                fwmark: (0x57, 51820),
                host_encryption: false,
                table: 51820,
                rules: vec![(5210, 0x57, 51820, true)],
            },
            Case {
                mode: "addon",
                fwmark: (0x57, 100),
                host_encryption: true,
                table: 51820,
                rules: vec![(5200, 0x57, 100, false), (5210, 0x57, 51820, true)],
            },
        ];
        for case in cases {
            let settings = pb::MeshSettings {
                fwmark: case.fwmark.0,
                fwmark_table: case.fwmark.1,
                host_encryption: case.host_encryption,
                ..Default::default()
            };
            let cfg = routing_config(
                &net(case.mode),
                &settings,
                "wgmesh0",
                &Desired::default(),
                &[],
            );
            assert_eq!(cfg.table, case.table, "{} {:?}", case.mode, case.fwmark);
            let rules: Vec<_> = cfg
                .rules
                .iter()
                .map(|r| (r.priority, r.fwmark, r.table, r.invert))
                .collect();
            assert_eq!(rules, case.rules, "{} {:?}", case.mode, case.fwmark);
            // The underlay MTU is read where the marked packets go: the agent's reading and
            // the routing's agree.
            let marked = case.rules.iter().find(|r| r.1 != 0 && !r.3).map(|r| r.2);
            assert_eq!(cfg.marked_packets_table(), marked, "{case:?}");
            assert_eq!(
                marked_packets_table(&net(case.mode), &settings),
                marked,
                "{case:?}"
            );
        }
    }

    #[test]
    fn guards_follow_strictness_membership_and_the_underlay() {
        let nets = |list: &[&str]| -> Vec<ipnet::IpNet> {
            list.iter().map(|n| n.parse().unwrap()).collect()
        };
        let member = Desired {
            addresses: nets(&["10.250.0.1/16"]),
            pod_cidrs: nets(&["10.244.1.0/24"]),
            peers: [(
                PublicKey::from_bytes([2; 32]),
                wgmesh_core::agent_config::AgentPeer {
                    public_key: PublicKey::from_bytes([2; 32]),
                    name: "node-2".into(),
                    endpoint: None,
                    allowed_ips: ["10.244.2.0/24", "192.168.9.0/24"]
                        .iter()
                        .map(|c| wgmesh_core::Cidr::parse_strict(c).unwrap())
                        .collect(),
                    persistent_keepalive: 0,
                    preshared_key: None,
                    node: Some("node-2".into()),
                },
            )]
            .into_iter()
            .collect(),
            ..Default::default()
        };
        let strict = pb::MeshSettings {
            tunnel_cidrs: vec!["10.250.0.0/16".into()],
            cluster_cidrs: vec!["10.244.0.0/16".into(), "192.168.0.0/16".into()],
            ..Default::default()
        };
        let lax = pb::MeshSettings {
            plaintext_fallback: true,
            ..strict.clone()
        };
        let underlay: Vec<std::net::IpAddr> = vec!["192.168.9.7".parse().unwrap()];
        // name, mode, settings, view, routes, guards
        type Case<'a> = (
            &'a str,
            &'a str,
            &'a pb::MeshSettings,
            Desired,
            Vec<&'a str>,
            Vec<&'a str>,
        );
        let cases: Vec<Case> = vec![
            (
                "strict member: peers, pools and the cluster guarded; the underlay spared",
                "cni",
                &strict,
                member.clone(),
                vec!["10.244.2.0/24"],
                vec!["10.244.2.0/24", "10.250.0.0/16", "10.244.0.0/16"],
            ),
            (
                "plaintext fallback: no guards",
                "addon",
                &lax,
                member.clone(),
                vec!["10.244.2.0/24"],
                vec![],
            ),
            (
                "not a member: nothing to protect yet",
                "cni",
                &strict,
                Desired::default(),
                vec![],
                vec![],
            ),
        ];
        for (name, mode, settings, view, routes, guards) in cases {
            let cfg = routing_config(&net(mode), settings, "wgmesh0", &view, &underlay);
            assert_eq!(cfg.routes, nets(&routes), "{name}: routes");
            assert_eq!(cfg.guards, nets(&guards), "{name}: guards");
            assert_eq!(cfg.local, view.pod_cidrs, "{name}: local");
        }
    }
}
