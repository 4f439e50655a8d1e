//! A simulated agent: a real gRPC client that registers, follows its peer stream and keeps
//! the peer set it would program. Used by the controller's integration tests and benchmark.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tonic::Request;
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};
use wgmesh_proto as pb;
use wgmesh_proto::mesh_service_client::MeshServiceClient;

/// A TLS channel to a controller.
pub async fn channel(url: &str, ca_pem: &str) -> Result<Channel> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("localhost");
    Ok(Channel::from_shared(url.to_owned())?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await?)
}

pub struct SimAgent {
    pub node: String,
    pub mesh: String,
    pub token: String,
    pub public_key: [u8; 32],
    client: MeshServiceClient<Channel>,
    stream: Option<tonic::Streaming<pb::PeerUpdate>>,
    /// The peer set as applied so far, by public key.
    pub peers: BTreeMap<Vec<u8>, pb::Peer>,
    pub tunnel_addresses: Vec<String>,
    /// The last snapshot's departure (why the node is not a member).
    pub departure: i32,
    pub settings: Option<pb::MeshSettings>,
    /// Every update received, in order.
    pub updates: Vec<pb::PeerUpdate>,
    pub epoch: String,
    pub revision: u64,
    /// Asks for changes of allowed IPs (as the real agent does); off by default, as agents
    /// before them.
    pub accepts_allowed_ips_changes: bool,
}

impl SimAgent {
    pub fn new(
        channel: Channel,
        node: &str,
        mesh: &str,
        token: &str,
        public_key: [u8; 32],
    ) -> Self {
        SimAgent {
            node: node.into(),
            mesh: mesh.into(),
            token: token.into(),
            public_key,
            client: MeshServiceClient::new(channel),
            stream: None,
            peers: BTreeMap::new(),
            tunnel_addresses: Vec::new(),
            departure: 0,
            settings: None,
            updates: Vec::new(),
            epoch: String::new(),
            revision: 0,
            accepts_allowed_ips_changes: false,
        }
    }

    /// Points the agent at another controller (after a restart or failover), keeping state.
    pub fn reconnect(&mut self, channel: Channel) {
        self.client = MeshServiceClient::new(channel);
        self.stream = None;
    }

    fn request<T>(&self, body: T) -> Request<T> {
        let mut req = Request::new(body);
        if !self.token.is_empty() {
            let value: MetadataValue<_> = format!("Bearer {}", self.token)
                .parse()
                .expect("a token is valid metadata");
            req.metadata_mut().insert("authorization", value);
        }
        req
    }

    pub async fn register(
        &mut self,
        endpoint: &str,
    ) -> Result<pb::RegisterResponse, tonic::Status> {
        let req = self.request(pb::RegisterRequest {
            node: self.node.clone(),
            mesh: self.mesh.clone(),
            public_key: self.public_key.to_vec(),
            endpoint_addresses: vec![endpoint.to_owned()],
            listen_port: 51820,
            backend: pb::Backend::Userspace as i32,
            agent_version: "sim".into(),
        });
        let response = self.client.register(req).await?.into_inner();
        self.tunnel_addresses = response.tunnel_addresses.clone();
        Ok(response)
    }

    /// Opens the peer stream, resuming from the last applied revision.
    pub async fn watch(&mut self) -> Result<(), tonic::Status> {
        let req = self.request(pb::WatchPeersRequest {
            node: self.node.clone(),
            mesh: self.mesh.clone(),
            resume_epoch: self.epoch.clone(),
            resume_revision: self.revision,
            // As agents before parts: every update whole (the real agent takes parts).
            accepts_parts: false,
            accepts_allowed_ips_changes: self.accepts_allowed_ips_changes,
        });
        self.stream = Some(self.client.watch_peers(req).await?.into_inner());
        Ok(())
    }

    pub async fn report(&mut self, peers: Vec<pb::PeerStatus>) -> Result<(), tonic::Status> {
        let req = self.request(pb::ReportStatusRequest {
            node: self.node.clone(),
            mesh: self.mesh.clone(),
            peers,
            ..Default::default()
        });
        self.client.report_status(req).await?;
        Ok(())
    }

    /// Reports `peers` one by one and `live` node peers with a live session, as agents
    /// report in a mesh too large for per-node detail.
    pub async fn report_sessions(
        &mut self,
        peers: Vec<pb::PeerStatus>,
        live: u32,
    ) -> Result<(), tonic::Status> {
        let req = self.request(pb::ReportStatusRequest {
            node: self.node.clone(),
            mesh: self.mesh.clone(),
            peers,
            live_node_sessions: Some(live),
            ..Default::default()
        });
        self.client.report_status(req).await?;
        Ok(())
    }

    /// Says what the agent has done: programmed `revision` (0: nothing yet), refused an
    /// update (non-empty), as a real agent's report carries it.
    pub async fn report_state(
        &mut self,
        revision: u64,
        refused_update: &str,
    ) -> Result<(), tonic::Status> {
        let req = self.request(pb::ReportStatusRequest {
            node: self.node.clone(),
            mesh: self.mesh.clone(),
            programmed_epoch: self.epoch.clone(),
            programmed_revision: revision,
            refused_update: refused_update.to_owned(),
            ..Default::default()
        });
        self.client.report_status(req).await?;
        Ok(())
    }

    /// Says the agent left the deleted mesh (removed its data path), as a real agent does.
    pub async fn report_left_deleted_mesh(&mut self) -> Result<(), tonic::Status> {
        let req = self.request(pb::ReportStatusRequest {
            node: self.node.clone(),
            mesh: self.mesh.clone(),
            departed: pb::Departure::MeshDeleted as i32,
            ..Default::default()
        });
        self.client.report_status(req).await?;
        Ok(())
    }

    /// Receives and applies one update, or `None` when none arrives within `timeout`.
    pub async fn next_update(&mut self, timeout: Duration) -> Result<Option<pb::PeerUpdate>> {
        let stream = self.stream.as_mut().context("not watching")?;
        let update = match tokio::time::timeout(timeout, stream.message()).await {
            Err(_) => return Ok(None),
            Ok(r) => r?.context("the controller closed the stream")?,
        };
        self.apply(&update);
        Ok(Some(update))
    }

    fn apply(&mut self, update: &pb::PeerUpdate) {
        self.epoch = update.epoch.clone();
        self.revision = update.revision;
        match &update.update {
            Some(pb::peer_update::Update::Snapshot(s)) => {
                self.peers = s
                    .peers
                    .iter()
                    .map(|p| (p.public_key.clone(), p.clone()))
                    .collect();
                self.settings = s.mesh.clone();
                self.tunnel_addresses = s.tunnel_addresses.clone();
                self.departure = s.departure;
            }
            Some(pb::peer_update::Update::Delta(d)) => {
                for p in &d.upserted {
                    self.peers.insert(p.public_key.clone(), p.clone());
                }
                for k in &d.removed {
                    self.peers.remove(k);
                }
                for c in &d.changed_allowed_ips {
                    if let Some(p) = self.peers.get_mut(&c.public_key) {
                        p.allowed_ips.retain(|ip| !c.removed.contains(ip));
                        p.allowed_ips.extend(c.added.iter().cloned());
                        // In the controller's order, as a whole peer would carry them.
                        p.allowed_ips
                            .sort_by_key(|ip| ip.parse::<wgmesh_core::Cidr>().ok());
                    }
                }
                if d.mesh.is_some() {
                    self.settings = d.mesh.clone();
                }
                if !d.tunnel_addresses.is_empty() {
                    self.tunnel_addresses = d.tunnel_addresses.clone();
                }
            }
            None => {}
        }
        self.updates.push(update.clone());
    }

    /// Applies updates until `done` holds, failing after `timeout` with what it has.
    pub async fn wait_until(
        &mut self,
        timeout: Duration,
        what: &str,
        done: impl Fn(&SimAgent) -> bool,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while !done(self) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!(
                    "{}: timed out waiting for {what}; it has peers {:?}",
                    self.node,
                    self.peer_names()
                );
            }
            self.next_update(left).await?;
        }
        Ok(())
    }

    /// Names of the peers applied so far, sorted.
    pub fn peer_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.peers.values().map(|p| p.name.clone()).collect();
        names.sort();
        names
    }

    pub fn peer(&self, name: &str) -> Option<&pb::Peer> {
        self.peers.values().find(|p| p.name == name)
    }
}
