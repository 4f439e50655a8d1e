//! The desired mesh: from a mesh, its nodes and its peers, every node's peer set and every
//! peer's verdict (programmed, or why not).
//!
//! This is the one place where a peer's tunnel addresses, allowed IPs, endpoint, keepalive and
//! preshared key are decided ([`allowed_ips_of`], [`gateway_allowed_ips`] and [`compute`],
//! which allocates tunnel addresses with [`crate::ipam`]), and where conflicts between peers
//! are judged. With host encryption, [`compute`] adds each node's own addresses
//! to its node peer's allowed IPs (`encrypted_host_addresses`: not a claim, so not judged, but
//! never an address another Node lists or a reserved one).
//!
//! External peers attach to gateway nodes only (every member node unless the mesh narrows it
//! with a gateway selector). Gateways program every peer; the other members ("interior"
//! nodes) program only node peers, and reach external peers through the active gateway (the
//! first by name until its agent goes silent: [`crate::gateway`]), whose allowed IPs on
//! interior nodes also carry every external peer's networks. The exported client config
//! mirrors this ([`crate::export`]): each gateway's pods straight to that gateway, everything
//! else through the active gateway.
//! Conflicts are resolved deterministically: node peers first (their pod CIDRs are facts of the
//! cluster, not claims), then external peers, each group oldest first (creation time, then
//! name); a peer that conflicts with one already accepted is refused and never programmed, and
//! the rest of the mesh is unaffected.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use blake2::{Blake2s256, Digest};

use crate::agent_config::Departure;
use crate::cidr::OverlapIndex;
use crate::reason::Reason;
use crate::validate::check_mesh_endpoint;
use crate::{Cidr, CidrSet, Key, PublicKey};

/// The mesh-level inputs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MeshInput {
    pub name: String,
    /// Pools tunnel addresses come from (at most one per address family).
    pub tunnel_pools: Vec<Cidr>,
    /// Keepalive for peers that set none; 0 is off.
    pub persistent_keepalive: u16,
    /// The mesh-wide secret node-to-node preshared keys are derived from: any value, as a
    /// passphrase (a `wg genpsk` output, damaged or not, is one too). Only the agents use
    /// what is derived from it, so no value can be wrong; refusing one would refuse every
    /// node peer of the mesh.
    pub preshared_key: Option<SecretInput>,
    /// Ranges no peer may claim beyond [`FIXED_RESERVED`] and the nodes' own addresses
    /// (which [`compute`] adds from [`NodeInput::addresses`]): the Service CIDRs, the API
    /// server's addresses, what the operator configured.
    pub reserved: Vec<ReservedRange>,
    /// The gateway carrying the traffic between external peers and interior nodes, as the
    /// status writer last chose it ([`crate::gateway::choose_active`]); `None`, or a node that
    /// is no gateway now, means the first gateway.
    pub active_gateway: Option<String>,
    /// Whether node peers' allowed IPs carry their nodes' own addresses
    /// ([`NodeInput::host_addresses`]), so traffic between the hosts is encrypted too.
    pub host_encryption: bool,
    /// Whether the tunnel's packets are marked (`spec.fwmark`): the agents' rule then lets
    /// them skip the routes into the tunnel, so a peer's allowed IPs may cover its endpoint.
    pub marks_tunnel_packets: bool,
}

/// A range no peer may claim as allowed IPs: routed into the tunnel on every node, it would
/// cut nodes off from what they need (the underlay, the API server, cloud metadata).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReservedRange {
    pub cidr: Cidr,
    /// What the range is, for the refusal's message ("the Service CIDR").
    pub what: String,
}

impl ReservedRange {
    pub fn new(cidr: Cidr, what: impl Into<String>) -> Self {
        ReservedRange {
            cidr,
            what: what.into(),
        }
    }
}

/// Ranges reserved on every node whatever the cluster: (network, what it is).
pub const FIXED_RESERVED: &[(&str, &str)] = &[
    ("0.0.0.0/8", "\"this network\" (0.0.0.0/8)"),
    ("127.0.0.0/8", "IPv4 loopback"),
    (
        "169.254.0.0/16",
        "IPv4 link-local, cloud metadata included (169.254.169.254)",
    ),
    ("224.0.0.0/4", "IPv4 multicast"),
    ("255.255.255.255/32", "the IPv4 broadcast address"),
    ("::/128", "the IPv6 unspecified address"),
    ("::1/128", "IPv6 loopback"),
    ("::ffff:0:0/96", "IPv4-mapped IPv6 addresses"),
    ("fe80::/10", "IPv6 link-local"),
    ("ff00::/8", "IPv6 multicast"),
];

/// [`FIXED_RESERVED`], parsed.
pub fn fixed_reserved() -> Vec<ReservedRange> {
    FIXED_RESERVED
        .iter()
        .map(|(cidr, what)| {
            let cidr = cidr.parse().expect("FIXED_RESERVED holds valid CIDRs");
            ReservedRange::new(cidr, *what)
        })
        .collect()
}

/// A Secret value the controller looked up, or the reason it could not. `Debug` shows the
/// length of a present value, never its bytes.
#[derive(Clone, PartialEq, Eq)]
pub enum SecretInput {
    Present(Vec<u8>),
    /// Missing Secret or key, or unusable content; the message names the reference.
    Missing(String),
}

impl std::fmt::Debug for SecretInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SecretInput::Present(bytes) => {
                write!(f, "Present(<redacted, {} bytes>)", bytes.len())
            }
            SecretInput::Missing(why) => f.debug_tuple("Missing").field(why).finish(),
        }
    }
}

/// A Node as far as the mesh is concerned.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeInput {
    pub name: String,
    /// The Node's UID: only a peer owned by this very Node object may claim to be it.
    pub uid: String,
    /// The Node's addresses (InternalIP, ExternalIP): reserved, no peer may claim them.
    pub addresses: Vec<IpAddr>,
    /// The addresses the host itself holds (its InternalIPs; an ExternalIP may be a NAT's):
    /// what host encryption routes into the tunnel.
    pub host_addresses: Vec<IpAddr>,
    /// Whether the node matches the mesh's node selector.
    pub selected: bool,
    /// `spec.podCIDRs` (falling back to `spec.podCIDR`).
    pub pod_cidrs: Vec<Cidr>,
    /// The value of the Node's key rotation annotation, if any.
    pub rotate_key_request: Option<String>,
    /// Whether the node matches the mesh's gateway selector (true when there is none):
    /// external peers attach to gateway nodes only.
    pub gateway: bool,
    /// Where the other members reach the node.
    pub endpoint: NodeEndpoint,
    /// The Node says it is behind NAT (`wgmesh.io/behind-nat`): it is published at the
    /// endpoint the relay observed, keeps every session alive, and reaches the other nodes
    /// behind NAT through the relay ([`DesiredMesh::nat_peers`]).
    pub behind_nat: bool,
}

/// Where the other members reach a node, as its Node and the mesh choose.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum NodeEndpoint {
    /// The address its agent registered (the Node's InternalIP unless the agent says
    /// otherwise) while it is one of the Node's addresses, else the Node's first address;
    /// with the registered port either way.
    #[default]
    Registered,
    /// One of the Node's addresses, picked by the mesh's `endpointAddressTypes`.
    Address(IpAddr),
    /// The Node's `wgmesh.io/endpoint` annotation: an address or a DNS name (agents resolve
    /// it again periodically), and its port if it names one.
    Named { host: String, port: Option<u16> },
}

/// A node's endpoint: the choice of its Node and mesh, with the port the node registered
/// where the choice names none. `None` until the node has registered (no port is known).
pub fn node_endpoint(choice: &NodeEndpoint, registered: Option<&str>) -> Option<String> {
    let registered_port = || {
        registered?
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse::<u16>().ok())
    };
    let host_port = |host: &str, port: u16| match host.parse::<IpAddr>() {
        Ok(ip) => std::net::SocketAddr::new(ip, port).to_string(),
        // Not an address an agent could use either way ([`compute`] drops what agents would
        // refuse), but never an IPv6-looking host without its brackets.
        Err(_) if host.contains(':') => format!("[{host}]:{port}"),
        Err(_) => format!("{host}:{port}"),
    };
    match choice {
        NodeEndpoint::Registered => registered.map(str::to_owned),
        NodeEndpoint::Address(ip) => Some(host_port(&ip.to_string(), registered_port()?)),
        NodeEndpoint::Named { host, port } => Some(host_port(host, port.or_else(registered_port)?)),
    }
}

/// A `WireGuardPeer` as far as the mesh is concerned, already parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInput {
    pub name: String,
    /// Creation time in seconds since the epoch: the older peer wins a conflict.
    pub created: i64,
    /// Whether the peer was programmed when last judged (its Ready condition). Creation
    /// times have one-second resolution; among peers created in the same second, the one
    /// already programmed keeps its place, so a verdict never flips on a controller restart.
    pub previously_programmed: bool,
    /// Among peers created in the same second and equally programmed: lower is older (the
    /// controller uses the order in which it first saw them).
    pub seniority: u64,
    pub public_key: PublicKey,
    /// `spec.allowedIPs`, host bits masked.
    pub allowed_ips: Vec<Cidr>,
    /// `spec.endpoint`. An external peer is refused when its endpoint is an address no
    /// gateway may be sent to ([`FIXED_RESERVED`], the tunnel pools, a Node's addresses); a
    /// DNS name is resolved by the agents and cannot be judged here. For a node peer, what
    /// its agent registered (`wgmesh.io/registered-endpoint`), trusted only at one of its
    /// Node's addresses ([`NodeEndpoint::Registered`]).
    pub endpoint: Option<String>,
    /// `status.endpoint`: where the peer's packets last came from. For the node peer of a
    /// node behind NAT, only what the relay observed (the status writer sees to it).
    pub last_seen_endpoint: Option<String>,
    pub persistent_keepalive: Option<u16>,
    /// The peer's own preshared key Secret, when it references one.
    pub preshared_key: Option<SecretInput>,
    pub responder: bool,
    pub disabled: bool,
    /// Set on node peers: the Node this peer is.
    pub node: Option<String>,
    /// The UID in the object's ownerReference to the Node named by `node`, if it has one.
    /// The controller creates node peers with it; a `spec.node` without it is not trusted.
    pub node_owner_uid: Option<String>,
    /// Tunnel addresses the peer holds, one per pool: its `status.addresses`, and what an
    /// earlier computation allocated it and is not written there yet.
    pub tunnel_addresses: Vec<IpAddr>,
}

/// Which preshared key a peer uses.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PresharedKey {
    None,
    /// The peer's own key, from its Secret.
    Static(Key),
    /// Node-to-node: derived per pair from the mesh secret ([`pair_preshared_key`]).
    DerivedFromMesh,
}

/// A peer as every node (but itself) should program it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DesiredPeer {
    /// Name of the `WireGuardPeer`.
    pub name: String,
    pub public_key: PublicKey,
    pub endpoint: Option<String>,
    /// Sorted, de-duplicated.
    pub allowed_ips: Vec<Cidr>,
    pub persistent_keepalive: u16,
    pub preshared_key: PresharedKey,
    /// The Node this peer is, for node peers.
    pub node: Option<String>,
    /// The peer's fields as the wire carries them, made once and shared by every stream.
    pub encoding: EncodingMemo,
    /// How its allowed IPs differ from the version streams sent before, worked out once and
    /// shared by every stream that sends the change.
    pub allowed_ips_diff: AllowedIpsDiffMemo,
}

/// A peer's wire encoding, made by the first stream that sends the peer and then shared by
/// every stream that sends it: after a controller restart every node gets every peer, 25
/// million entries at 5,000 nodes, and encoding each once instead of once per node is most
/// of the controller's work saved. Core keeps the bytes; `wgmesh-proto` makes them from the
/// fields above. Build a new peer rather than change one that may have been sent: a clone
/// starts empty (so a clone whose fields then change never carries stale bytes), and the
/// memo takes no part in comparing or hashing peers.
#[derive(Default)]
pub struct EncodingMemo(std::sync::OnceLock<Arc<[u8]>>);

impl EncodingMemo {
    /// The memoized bytes, made by `encode` the first time.
    pub fn get_or_init(&self, encode: impl FnOnce() -> Vec<u8>) -> Arc<[u8]> {
        self.0.get_or_init(|| encode().into()).clone()
    }
}

impl Clone for EncodingMemo {
    fn clone(&self) -> Self {
        EncodingMemo::default()
    }
}

impl PartialEq for EncodingMemo {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for EncodingMemo {}

impl std::hash::Hash for EncodingMemo {
    fn hash<H: std::hash::Hasher>(&self, _: &mut H) {}
}

impl std::fmt::Debug for EncodingMemo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The bytes hold no secret (a pair's preshared key is added per stream, never
        // memoized), but they say nothing the fields do not.
        f.write_str(if self.0.get().is_some() {
            "encoded"
        } else {
            "not encoded"
        })
    }
}

/// The difference of a peer's allowed IPs from an earlier version of the same peer, (added,
/// removed) as [`crate::diff::sorted_difference`] gives them: the relay between the nodes
/// behind NAT and the active gateway hold lists as long as the mesh, and a change of one
/// entry goes to every node holding them; each stream taking the difference again would
/// cost O(nodes x list). Kept for the first earlier version asked about (the one most
/// streams sent); another is worked out uncached. Like [`EncodingMemo`], a clone starts
/// empty and the memo takes no part in comparing or hashing peers.
#[derive(Default)]
pub struct AllowedIpsDiffMemo(std::sync::OnceLock<(std::sync::Weak<DesiredPeer>, Arc<IpsDiff>)>);

/// Allowed IPs added and removed, each sorted.
pub type IpsDiff = (Vec<Cidr>, Vec<Cidr>);

impl AllowedIpsDiffMemo {
    /// How `new` (the peer holding this memo) differs from `old`.
    pub fn get_or_init(&self, new: &DesiredPeer, old: &Arc<DesiredPeer>) -> Arc<IpsDiff> {
        let compute = || {
            Arc::new(crate::diff::sorted_difference(
                &old.allowed_ips,
                &new.allowed_ips,
            ))
        };
        let (from, diff) = self.0.get_or_init(|| (Arc::downgrade(old), compute()));
        // The weak reference keeps `old`'s allocation, so no other peer can be at its address.
        if std::ptr::eq(from.as_ptr(), Arc::as_ptr(old)) {
            diff.clone()
        } else {
            compute()
        }
    }
}

impl Clone for AllowedIpsDiffMemo {
    fn clone(&self) -> Self {
        AllowedIpsDiffMemo::default()
    }
}

impl PartialEq for AllowedIpsDiffMemo {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for AllowedIpsDiffMemo {}

impl std::hash::Hash for AllowedIpsDiffMemo {
    fn hash<H: std::hash::Hasher>(&self, _: &mut H) {}
}

impl std::fmt::Debug for AllowedIpsDiffMemo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.get().is_some() {
            "diffed"
        } else {
            "not diffed"
        })
    }
}

/// Why a peer is or is not programmed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Programmed on every member node.
    Programmed,
    /// Not programmed; `reason` is the `Ready=False` condition reason, `message` says what
    /// to fix.
    Refused { reason: Reason, message: String },
}

/// A member node: a selected Node whose agent registered and whose peer is programmed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Member {
    pub public_key: PublicKey,
    /// Interface addresses: each tunnel address with its pool's prefix length (host bits
    /// set, as on an `Address` line).
    pub interface_addresses: Vec<ipnet::IpNet>,
    /// Whether node-to-node preshared keys are derived from a mesh secret.
    pub mesh_secret: Option<Key>,
    /// A request to the node's agent for a new key (the Node's rotation annotation).
    pub rotate_key_request: Option<String>,
    /// The Node's pod CIDRs, which an agent in CNI mode hands to its pods.
    pub pod_cidrs: Vec<Cidr>,
    /// Whether external peers attach to this node. Gateways see [`DesiredMesh::peers`], the
    /// others [`DesiredMesh::interior_peers`] (or [`DesiredMesh::nat_peers`] behind NAT).
    pub gateway: bool,
    /// Whether the node is behind NAT (never a gateway then: external peers could not reach
    /// it either).
    pub behind_nat: bool,
}

/// The result: what every node should have, and every peer's verdict.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DesiredMesh {
    /// Member nodes by Node name.
    pub members: BTreeMap<String, Member>,
    /// Every programmed peer (nodes and external), by public key. A node's peer set is this
    /// map without its own key.
    pub peers: BTreeMap<PublicKey, Arc<DesiredPeer>>,
    /// What non-gateway members program (without their own key): the node peers only, the
    /// active gateway's allowed IPs extended by every external peer's ([`gateway_allowed_ips`]).
    /// Shared by all interior nodes, like `peers` by all gateways.
    pub interior_peers: BTreeMap<PublicKey, Arc<DesiredPeer>>,
    /// Gateway members by Node name, sorted.
    pub gateways: Vec<String>,
    /// The gateway that carries the traffic between external peers and interior nodes:
    /// [`MeshInput::active_gateway`] while it is a gateway, else the first one.
    pub active_gateway: Option<String>,
    /// What members behind NAT program (without their own key): the interior view without
    /// the other nodes behind NAT, whose networks the relay carries instead, and every peer
    /// with a persistent keepalive so the NAT's mappings stay open. Shared by every node
    /// behind NAT; empty when there is none.
    pub nat_peers: BTreeMap<PublicKey, Arc<DesiredPeer>>,
    /// The reachable member that relays between nodes behind NAT ([`relay_of`]): the active
    /// gateway (which fails over with it), else the oldest member not behind NAT.
    pub relay: Option<String>,
    /// Every peer object's verdict, by object name.
    pub verdicts: BTreeMap<String, Verdict>,
    /// Every peer object's name by precedence: node peers first, then external peers; each
    /// oldest first (created, already programmed, seniority, name). Claims are judged in this
    /// order, and tunnel addresses are allocated in it.
    pub precedence: Vec<String>,
    /// Every peer object's tunnel addresses, one per pool, by object name: what it holds
    /// ([`PeerInput::tunnel_addresses`]) where still valid, else the lowest free address
    /// ([`crate::ipam::allocate`], in precedence order). Members and peers are programmed
    /// with these; the status writer persists them.
    pub tunnel_addresses: BTreeMap<String, Vec<IpAddr>>,
    /// Why each known Node that is not a member is not one: not selected, or not registered
    /// (yet). A Node missing here and from `members` does not exist.
    pub non_members: BTreeMap<String, Departure>,
}

impl DesiredMesh {
    /// How many node peers each member has: every other member.
    pub fn node_peers_per_member(&self) -> usize {
        self.members.len().saturating_sub(1)
    }

    /// The shared peer set a member filters its own key out of: every peer for gateways, the
    /// interior view for the others.
    pub fn visible_to(&self, member: &Member) -> &BTreeMap<PublicKey, Arc<DesiredPeer>> {
        match View::of(member) {
            View::Gateway => &self.peers,
            View::Interior => &self.interior_peers,
            View::Nat => &self.nat_peers,
        }
    }
}

/// Which shared peer set a member sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    Gateway,
    Interior,
    Nat,
}

impl View {
    pub fn of(member: &Member) -> View {
        if member.behind_nat {
            View::Nat
        } else if member.gateway {
            View::Gateway
        } else {
            View::Interior
        }
    }
}

/// The keepalive members behind NAT use when the mesh sets none: what WireGuard suggests,
/// well under the 30 s after which common NATs drop an idle UDP mapping.
pub const NAT_KEEPALIVE_SECONDS: u16 = 25;

/// The allowed IPs of a peer: its tunnel addresses as host routes, plus its node's pod CIDRs
/// (node peers) or its own `allowedIPs` (external peers).
pub fn allowed_ips_of(peer: &PeerInput, node: Option<&NodeInput>) -> Vec<Cidr> {
    with_tunnel_addresses(&peer.tunnel_addresses, claimed_networks(peer, node))
}

/// A node peer's allowed IPs from its tunnel addresses and its Node's pod CIDRs (what the
/// controller also writes into the node peer's `spec.allowedIPs`, for people to read).
pub fn node_allowed_ips(tunnel_addresses: &[IpAddr], pod_cidrs: &[Cidr]) -> Vec<Cidr> {
    with_tunnel_addresses(tunnel_addresses, pod_cidrs.to_vec())
}

/// Tunnel addresses as host routes plus `networks`, sorted and without overlaps.
fn with_tunnel_addresses(tunnel_addresses: &[IpAddr], networks: Vec<Cidr>) -> Vec<Cidr> {
    let hosts = tunnel_addresses.iter().map(|a| Cidr::host(*a));
    CidrSet::new(hosts.chain(networks))
        .iter()
        .copied()
        .collect()
}

/// The allowed IPs interior (non-gateway) nodes give the active gateway: its own, plus every
/// programmed external peer's, so traffic to external peers goes through that gateway.
pub fn gateway_allowed_ips<'a>(
    gateway: &DesiredPeer,
    external: impl IntoIterator<Item = &'a DesiredPeer>,
) -> Vec<Cidr> {
    let routed = external
        .into_iter()
        .flat_map(|p| p.allowed_ips.iter().copied());
    CidrSet::new(gateway.allowed_ips.iter().copied().chain(routed))
        .iter()
        .copied()
        .collect()
}

/// The networks a peer claims beyond its tunnel addresses; what conflicts are judged on.
fn claimed_networks(peer: &PeerInput, node: Option<&NodeInput>) -> Vec<Cidr> {
    match (peer.node.as_ref(), node) {
        (Some(_), Some(node)) => node.pod_cidrs.clone(),
        (Some(_), None) => Vec::new(),
        (None, _) => peer.allowed_ips.clone(),
    }
}

/// The per-pair preshared key of two nodes, derived from the mesh secret: both ends compute
/// the same key (the pair is ordered), and no two pairs share one.
pub fn pair_preshared_key(mesh_secret: &Key, a: &PublicKey, b: &PublicKey) -> Key {
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    let mut h = Blake2s256::new();
    h.update(b"wgmesh pair psk v1");
    h.update(mesh_secret.as_bytes());
    h.update(lo.as_bytes());
    h.update(hi.as_bytes());
    Key::from_bytes(h.finalize().into())
}

/// A peer's preshared key from its Secret: the `wg genpsk` text (base64, surrounding
/// whitespace ignored), 32 raw bytes, or else a passphrase condensed to a key (which the other
/// side can only know by computing the same, as `kubectl wgmesh peer export` does).
///
/// Text that looks like a key (43 or 45 characters of the base64 alphabet, or 44 ending in `=`, surrounding
/// whitespace ignored) but does not decode to one, such as `wg genpsk` output that lost its
/// `=` or has a typo, is an error, never condensed: the peer would be programmed with a key
/// its other side does not have, and never complete a handshake. The error never quotes the
/// value.
pub fn peer_preshared_key(bytes: &[u8]) -> Result<Key, String> {
    let text = std::str::from_utf8(bytes).ok().map(str::trim);
    if let Some(key) = text.and_then(|t| t.parse::<Key>().ok()) {
        return Ok(key);
    }
    if let Ok(raw) = <[u8; crate::key::KEY_LEN]>::try_from(bytes) {
        return Ok(Key::from_bytes(raw));
    }
    if let Some(t) = text.filter(|t| looks_like_a_key(t)) {
        let why = match t.len() {
            crate::key::KEY_BASE64_LEN => "does not decode to 32 bytes".to_owned(),
            n => format!("is {n} characters long"),
        };
        return Err(format!(
            "the Secret's value looks like a WireGuard key but {why}: a key is {} characters \
             of base64 ending in '=', as `wg genpsk` writes it",
            crate::key::KEY_BASE64_LEN
        ));
    }
    Ok(mesh_secret_key(bytes))
}

/// 43 or 45 characters of the standard base64 alphabet, or 44 ending in `=`: meant as a key (one `=` too few or
/// too many, a typo), however it decodes.
fn looks_like_a_key(text: &str) -> bool {
    let len = text.len();
    let base64 = text
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/' || b == b'=');
    // A key is 44 characters ending in '=' (`wg genpsk`): one lost or added, or a typo
    // before the '='. 44 without it is a passphrase (`openssl rand -base64 33`), as before.
    base64
        && (len == crate::key::KEY_BASE64_LEN - 1
            || len == crate::key::KEY_BASE64_LEN + 1
            || (len == crate::key::KEY_BASE64_LEN && text.ends_with('=')))
}

/// A mesh secret of any length, condensed to a key. Any value is taken as it is, the text of a
/// key included (never decoded): every node derives its pairs' keys from the same bytes and
/// nothing outside the mesh needs to match them, so a value that looks like a damaged key
/// is no mistake here, unlike a peer's ([`peer_preshared_key`]).
fn mesh_secret_key(secret: &[u8]) -> Key {
    let mut h = Blake2s256::new();
    h.update(b"wgmesh mesh secret v1");
    h.update(secret);
    Key::from_bytes(h.finalize().into())
}

/// Computes the desired mesh. Pure: same inputs, same output.
///
/// A refused peer keeps the tunnel addresses it holds (fixing its spec brings it back with
/// them) but is given none: every peer is allocated one before it is judged, so a refused
/// peer's new address is taken back from the result, and when the pool is full the mesh is
/// computed once more without giving refused peers any, so that a bad peer never keeps a
/// good one from the last free address.
pub fn compute(mesh: &MeshInput, nodes: &[NodeInput], peers: &[PeerInput]) -> DesiredMesh {
    let first = compute_withholding(mesh, nodes, peers, &BTreeSet::new());
    if refused_with_new_addresses(&first, peers).is_empty() {
        return first;
    }
    let mut out = if first.verdicts.values().any(is_exhausted) {
        // Every peer refused for another reason is withheld, not only those that took an
        // address: one that found the pool full would take what the others free.
        let withheld: BTreeSet<String> = first
            .verdicts
            .iter()
            .filter(|(_, v)| matches!(v, Verdict::Refused { .. }) && !is_exhausted(v))
            .map(|(name, _)| name.clone())
            .collect();
        // Judged the same way (`judge` says a full pool last), they keep their reasons.
        compute_withholding(mesh, nodes, peers, &withheld)
    } else {
        first
    };
    // Peers refused in the last computation (one exhausted in the first may now hold an
    // address, and its claims refuse another) keep only what they held.
    let held: BTreeMap<&str, &[IpAddr]> = peers
        .iter()
        .map(|p| (p.name.as_str(), p.tunnel_addresses.as_slice()))
        .collect();
    for name in refused_with_new_addresses(&out, peers) {
        if let Some(addresses) = out.tunnel_addresses.get_mut(&name) {
            let kept = held.get(name.as_str()).copied().unwrap_or_default();
            addresses.retain(|a| kept.contains(a));
        }
    }
    out
}

fn is_exhausted(v: &Verdict) -> bool {
    matches!(v, Verdict::Refused { reason, .. } if *reason == Reason::TunnelPoolExhausted)
}

/// The peers refused in `d` (not for want of an address) that were given an address they
/// did not hold in `peers`. O(peers) to find none, which is the usual answer.
fn refused_with_new_addresses(d: &DesiredMesh, peers: &[PeerInput]) -> BTreeSet<String> {
    let refused: Vec<&String> = d
        .verdicts
        .iter()
        .filter(|(_, v)| matches!(v, Verdict::Refused { .. }) && !is_exhausted(v))
        .map(|(name, _)| name)
        .collect();
    if refused.is_empty() {
        return BTreeSet::new();
    }
    let held: BTreeMap<&str, &[IpAddr]> = peers
        .iter()
        .map(|p| (p.name.as_str(), p.tunnel_addresses.as_slice()))
        .collect();
    refused
        .into_iter()
        .filter(|name| {
            let held = held.get(name.as_str()).copied().unwrap_or_default();
            d.tunnel_addresses
                .get(*name)
                .is_some_and(|a| a.iter().any(|a| !held.contains(a)))
        })
        .cloned()
        .collect()
}

fn compute_withholding(
    mesh: &MeshInput,
    nodes: &[NodeInput],
    peers: &[PeerInput],
    withheld: &BTreeSet<String>,
) -> DesiredMesh {
    let nodes_by_name: BTreeMap<&str, &NodeInput> =
        nodes.iter().map(|n| (n.name.as_str(), n)).collect();

    // Node peers first, then external peers; each oldest first.
    let mut order: Vec<&PeerInput> = peers.iter().collect();
    order.sort_by(|a, b| {
        let key = |p: &PeerInput| {
            (
                p.node.is_none(),
                p.created,
                !p.previously_programmed,
                p.seniority,
            )
        };
        key(a).cmp(&key(b)).then_with(|| a.name.cmp(&b.name))
    });

    // Tunnel addresses, in precedence order: what a peer holds it keeps, a peer without one
    // gets the lowest free one now, and is judged and programmed with it in this same
    // computation (a joining node is published without waiting for the status write).
    let allocation = crate::ipam::allocate_withholding(
        &mesh.tunnel_pools,
        order
            .iter()
            .map(|p| (p.name.as_str(), p.tunnel_addresses.as_slice())),
        |name| withheld.contains(name),
    );
    let allocated: Vec<Cow<'_, PeerInput>> = order
        .iter()
        .map(|&p| match allocation.addresses.get(&p.name) {
            Some(addresses) if *addresses != p.tunnel_addresses => Cow::Owned(PeerInput {
                tunnel_addresses: addresses.clone(),
                ..p.clone()
            }),
            _ => Cow::Borrowed(p),
        })
        .collect();
    let order: Vec<&PeerInput> = allocated.iter().map(|p| p.as_ref()).collect();

    let mut out = DesiredMesh {
        precedence: order.iter().map(|p| p.name.clone()).collect(),
        tunnel_addresses: allocation.addresses,
        ..DesiredMesh::default()
    };
    let key_owners = key_owners(peers);
    let reserved = reserved_ranges(mesh, nodes);
    let mut reserved_index = OverlapIndex::default();
    for r in &reserved {
        reserved_index.insert(r.cidr, r.what.as_str());
    }
    let mut claims: OverlapIndex<String> = OverlapIndex::default();
    // The literal endpoints of the external peers programmed so far: without a fwmark no
    // later claim may cover one.
    let mut endpoints: OverlapIndex<String> = OverlapIndex::default();
    let mesh_secret = match &mesh.preshared_key {
        Some(SecretInput::Present(bytes)) => Some(mesh_secret_key(bytes)),
        _ => None,
    };
    let mut node_pod_cidrs = OverlapIndex::default();
    for n in nodes {
        for c in &n.pod_cidrs {
            node_pod_cidrs.insert(*c, n.name.as_str());
        }
    }
    let node_addresses = node_addresses(nodes);
    let fixed = fixed_reserved();
    let judged = Judged {
        key_owners: &key_owners,
        reserved: &reserved_index,
        node_pod_cidrs: &node_pod_cidrs,
        fixed_reserved: &fixed,
    };
    let nat_reserved = mesh_reserved(mesh);
    let nat_judged = NatJudged {
        mesh,
        reserved: &nat_reserved,
        node_addresses: &node_addresses,
    };
    let host_routes = if mesh.host_encryption {
        encrypted_host_addresses(mesh, nodes)
    } else {
        BTreeMap::new()
    };

    for &peer in &order {
        let node = peer
            .node
            .as_deref()
            .and_then(|n| nodes_by_name.get(n).copied());
        let mut verdict = judge(mesh, peer, node, &judged, &claims, &endpoints);
        // Node peers come first, so every gateway is known by the time external peers are
        // judged; an external peer with no gateway to attach to is programmed nowhere.
        if verdict == Verdict::Programmed
            && peer.node.is_none()
            && !out.members.values().any(|m| m.gateway)
        {
            verdict = Verdict::Refused {
                reason: Reason::NoGateway,
                message: format!(
                    "no member node of mesh {} is a gateway (see its gatewaySelector)",
                    mesh.name
                ),
            };
        }
        if verdict == Verdict::Programmed {
            let owner = match &peer.node {
                Some(n) => format!("the pod CIDR of node {n}"),
                None => format!("WireGuardPeer {}", peer.name),
            };
            for c in claimed_networks(peer, node) {
                claims.insert(c, owner.clone());
            }
            // A responder's endpoint is never sent to: nothing routes to it.
            if peer.node.is_none()
                && !peer.responder
                && let Some(ip) = peer.endpoint.as_deref().and_then(endpoint_address)
            {
                endpoints.insert(
                    Cidr::host(ip),
                    format!("the endpoint of WireGuardPeer {}", peer.name),
                );
            }
            let mut desired = desired_peer(mesh, peer, node);
            if let Some(n) = node.filter(|n| n.behind_nat) {
                desired.endpoint = peer
                    .last_seen_endpoint
                    .as_deref()
                    .and_then(|e| observed_endpoint(e, Some(n), &nat_judged).ok());
            } else if peer.node.is_none()
                && !peer.responder
                && peer.endpoint.is_none()
                && let Some(seen) = &peer.last_seen_endpoint
            {
                // A roaming external peer: where one gateway's agent saw it last, which no
                // agent may point at a node, a reserved range or the tunnel pools.
                desired.endpoint = observed_endpoint(seen, None, &nat_judged).ok();
            }
            // Agents refuse a whole message with an endpoint they cannot parse: never send one.
            if desired
                .endpoint
                .as_deref()
                .is_some_and(|e| check_mesh_endpoint(e).is_err())
            {
                desired.endpoint = None;
            }
            if let Some(hosts) = node.and_then(|n| host_routes.get(n.name.as_str())) {
                desired.allowed_ips =
                    CidrSet::new(desired.allowed_ips.into_iter().chain(hosts.iter().copied()))
                        .iter()
                        .copied()
                        .collect();
            }
            if let Some(node_name) = &peer.node {
                out.members.insert(
                    node_name.clone(),
                    Member {
                        public_key: peer.public_key,
                        interface_addresses: interface_addresses(mesh, peer),
                        mesh_secret,
                        rotate_key_request: node.and_then(|n| n.rotate_key_request.clone()),
                        pod_cidrs: node.map(|n| n.pod_cidrs.clone()).unwrap_or_default(),
                        gateway: node.is_some_and(|n| n.gateway && !n.behind_nat),
                        behind_nat: node.is_some_and(|n| n.behind_nat),
                    },
                );
            }
            out.peers.insert(peer.public_key, Arc::new(desired));
        }
        out.verdicts.insert(peer.name.clone(), verdict);
    }
    out.non_members = nodes
        .iter()
        .filter(|n| !out.members.contains_key(&n.name))
        .map(|n| {
            let why = if n.selected {
                Departure::NotRegistered
            } else {
                Departure::NodeNotSelected
            };
            (n.name.clone(), why)
        })
        .collect();
    out.gateways = out
        .members
        .iter()
        .filter(|(_, m)| m.gateway)
        .map(|(n, _)| n.clone())
        .collect();
    out.active_gateway = mesh
        .active_gateway
        .as_ref()
        .filter(|g| out.gateways.contains(g))
        .or(out.gateways.first())
        .cloned();
    out.interior_peers = interior_peers(&out);
    out.relay = relay_of(&out, &order);
    out.nat_peers = nat_peers(mesh, &out);
    out
}

/// The relay between members behind NAT: the active gateway (never behind NAT, and moved to
/// the next live gateway when its agent goes silent), else the oldest member not behind NAT;
/// none when every member is behind NAT. `order` is the precedence, oldest first.
pub fn relay_of(d: &DesiredMesh, order: &[&PeerInput]) -> Option<String> {
    let reachable = |n: &String| d.members.get(n).is_some_and(|m| !m.behind_nat);
    d.active_gateway.clone().filter(reachable).or_else(|| {
        order
            .iter()
            .filter_map(|p| p.node.as_ref())
            .find(|n| reachable(n))
            .cloned()
    })
}

/// The view of members behind NAT: the interior view without the other members behind NAT
/// (MASQUERADE lets no one reach them first, and two of them cannot reach each other at
/// all), whose networks the relay carries instead; every peer kept alive from this side.
/// The relay's allowed IPs hold every node behind NAT's, the viewer's own included: the
/// stream leaves the viewer's own out when it sends them ([`crate::node_config`]).
fn nat_peers(mesh: &MeshInput, d: &DesiredMesh) -> BTreeMap<PublicKey, Arc<DesiredPeer>> {
    let natted: BTreeSet<PublicKey> = d
        .members
        .values()
        .filter(|m| m.behind_nat)
        .map(|m| m.public_key)
        .collect();
    if natted.is_empty() {
        return BTreeMap::new();
    }
    let relay = d
        .relay
        .as_ref()
        .and_then(|r| d.members.get(r))
        .map(|m| m.public_key);
    let keepalive = match mesh.persistent_keepalive {
        0 => NAT_KEEPALIVE_SECONDS,
        k => k,
    };
    d.interior_peers
        .iter()
        // Without a relay, direct sessions are all there is.
        .filter(|(k, _)| relay.is_none() || !natted.contains(*k))
        .map(|(k, p)| {
            let mut kept = (**p).clone();
            if kept.persistent_keepalive == 0 {
                kept.persistent_keepalive = keepalive;
            }
            if Some(*k) == relay {
                // A plain union, no aggregation: each node behind NAT's own entries must be
                // found again to leave them out of its own copy.
                let relayed: BTreeSet<Cidr> = kept
                    .allowed_ips
                    .iter()
                    .copied()
                    .chain(
                        natted
                            .iter()
                            .filter_map(|n| d.peers.get(n))
                            .flat_map(|n| n.allowed_ips.iter().copied()),
                    )
                    .collect();
                kept.allowed_ips = relayed.into_iter().collect();
            }
            (*k, Arc::new(kept))
        })
        .collect()
}

/// The relay's allowed IPs as member `me` (behind NAT) programs them: without any that
/// overlap its own networks (its node peer's allowed IPs, pod CIDRs, tunnel addresses), which
/// would route its own pods into the tunnel.
pub fn without_own_networks(
    relay: &DesiredPeer,
    me: &Member,
    mine: Option<&DesiredPeer>,
) -> Vec<Cidr> {
    let own = own_networks(me, mine);
    relay
        .allowed_ips
        .iter()
        .filter(|c| !overlaps_any(&own, c))
        .copied()
        .collect()
}

/// Member `me`'s own networks, which it never routes into the tunnel: its node peer's allowed
/// IPs (`mine`), its pod CIDRs and its tunnel addresses.
pub fn own_networks(me: &Member, mine: Option<&DesiredPeer>) -> Vec<Cidr> {
    mine.map(|p| p.allowed_ips.clone())
        .unwrap_or_default()
        .into_iter()
        .chain(me.pod_cidrs.iter().copied())
        .chain(me.interface_addresses.iter().map(|a| Cidr::host(a.addr())))
        .collect()
}

/// Whether `c` overlaps any of `networks`.
pub fn overlaps_any(networks: &[Cidr], c: &Cidr) -> bool {
    networks.iter().any(|o| o.overlaps(c))
}

/// What an endpoint an agent observed (for a node behind NAT, a roaming external peer) is
/// judged against.
struct NatJudged<'a> {
    mesh: &'a MeshInput,
    /// The fixed and the mesh's reserved ranges (the Nodes' addresses are judged apart).
    reserved: &'a [ReservedRange],
    node_addresses: &'a NodeAddresses<'a>,
}

/// Every Node's addresses ([`NodeInput::addresses`] and [`NodeInput::host_addresses`]),
/// members or not, each with the Nodes that list it.
type NodeAddresses<'a> = BTreeMap<IpAddr, Vec<&'a str>>;

fn node_addresses(nodes: &[NodeInput]) -> NodeAddresses<'_> {
    let mut out: NodeAddresses<'_> = BTreeMap::new();
    for n in nodes {
        for a in n.addresses.iter().chain(&n.host_addresses) {
            let listed = out.entry(*a).or_default();
            if !listed.contains(&n.name.as_str()) {
                listed.push(n.name.as_str());
            }
        }
    }
    out
}

/// What an endpoint address points at that no endpoint may.
enum Forbidden<'a> {
    Reserved(&'a ReservedRange),
    TunnelPool(Cidr),
    /// An address of this Node.
    Node(&'a str),
}

impl Forbidden<'_> {
    fn describe(&self, ip: IpAddr) -> String {
        match self {
            Forbidden::Reserved(r) => format!("{ip} is in {}, {}", r.cidr, r.what),
            Forbidden::TunnelPool(pool) => format!("{ip} is in the tunnel pool {pool}"),
            Forbidden::Node(node) => format!("{ip} is an address of node {node}"),
        }
    }
}

/// Where the mesh may not send a peer's handshakes, the one rule for observed endpoints
/// ([`observed_endpoint`]) and external peers' literal ones ([`judge`]): an address in one of
/// `reserved`, in a tunnel pool (every node routes the pools into the tunnel), or listed by a
/// Node other than `own` (the node whose endpoint this is, if any).
fn forbidden_endpoint<'a>(
    ip: IpAddr,
    reserved: &'a [ReservedRange],
    pools: &[Cidr],
    node_addresses: &NodeAddresses<'a>,
    own: Option<&str>,
) -> Option<Forbidden<'a>> {
    let host = Cidr::host(ip);
    if let Some(r) = reserved.iter().find(|r| r.cidr.overlaps(&host)) {
        return Some(Forbidden::Reserved(r));
    }
    if let Some(pool) = pools.iter().find(|p| p.contains_addr(ip)) {
        return Some(Forbidden::TunnelPool(*pool));
    }
    node_addresses
        .get(&ip)
        .and_then(|listed| listed.iter().find(|n| Some(**n) != own))
        .map(|n| Forbidden::Node(n))
}

/// The endpoint published from what an agent observed (the relay, for `node` behind NAT; a
/// gateway, for a roaming external peer: `node` is `None`), judged like any claim: an
/// `address:port` (no name to resolve), outside every reserved range and the tunnel pools,
/// and no address another Node lists (a node's own may: a NAT's address is often its
/// ExternalIP). The error says why it is not published.
fn observed_endpoint(
    observed: &str,
    node: Option<&NodeInput>,
    judged: &NatJudged<'_>,
) -> Result<String, String> {
    let addr: std::net::SocketAddr = observed
        .parse()
        .map_err(|_| format!("{observed} is no address:port"))?;
    let ip = addr.ip();
    if addr.port() == 0 {
        return Err(format!("{observed} has port 0"));
    }
    if let Some(forbidden) = forbidden_endpoint(
        ip,
        judged.reserved,
        &judged.mesh.tunnel_pools,
        judged.node_addresses,
        node.map(|n| n.name.as_str()),
    ) {
        return Err(forbidden.describe(ip));
    }
    Ok(addr.to_string())
}

/// With host encryption, each node's host addresses that go into its peer's allowed IPs: its
/// InternalIPs that no other Node lists (a Node's addresses are its kubelet's word, and two
/// peers cannot share an allowed IP), outside every reserved range but the nodes' own (the
/// API server, the Service CIDRs, loopback and link-local stay direct) and the tunnel pools.
fn encrypted_host_addresses<'a>(
    mesh: &MeshInput,
    nodes: &'a [NodeInput],
) -> BTreeMap<&'a str, Vec<Cidr>> {
    let mut listed: BTreeMap<IpAddr, usize> = BTreeMap::new();
    for n in nodes {
        for a in n
            .addresses
            .iter()
            .chain(&n.host_addresses)
            .collect::<BTreeSet<_>>()
        {
            *listed.entry(*a).or_default() += 1;
        }
    }
    let direct: Vec<Cidr> = mesh_reserved(mesh)
        .into_iter()
        .map(|r| r.cidr)
        .chain(mesh.tunnel_pools.iter().copied())
        .collect();
    nodes
        .iter()
        .map(|n| {
            let hosts = n
                .host_addresses
                .iter()
                .filter(|a| listed.get(*a) == Some(&1))
                .map(|a| Cidr::host(*a))
                .filter(|c| !direct.iter().any(|d| d.overlaps(c)))
                .collect();
            (n.name.as_str(), hosts)
        })
        .collect()
}

/// The interior view: node peers, with the active gateway routing every external network.
fn interior_peers(d: &DesiredMesh) -> BTreeMap<PublicKey, Arc<DesiredPeer>> {
    let active = d
        .active_gateway
        .as_ref()
        .and_then(|g| d.members.get(g))
        .map(|m| m.public_key);
    let external: Vec<&DesiredPeer> = d
        .peers
        .values()
        .filter(|p| p.node.is_none())
        .map(|p| &**p)
        .collect();
    d.peers
        .iter()
        .filter(|(_, p)| p.node.is_some())
        .map(|(k, p)| {
            if Some(*k) == active && !external.is_empty() {
                let mut routed = (**p).clone();
                routed.allowed_ips = gateway_allowed_ips(p, external.iter().copied());
                (*k, Arc::new(routed))
            } else {
                (*k, p.clone())
            }
        })
        .collect()
}

/// Which peer holds each public key: the oldest one claiming it that is not disabled,
/// whether a node or external peer. Age, not kind, decides, so a node cannot take over an
/// external peer's key (nor a newer node's) by registering it.
fn key_owners(peers: &[PeerInput]) -> BTreeMap<PublicKey, &str> {
    let mut by_age: Vec<&PeerInput> = peers.iter().filter(|p| !p.disabled).collect();
    by_age.sort_by(|a, b| {
        let key = |p: &PeerInput| (p.created, !p.previously_programmed, p.seniority);
        key(a).cmp(&key(b)).then_with(|| a.name.cmp(&b.name))
    });
    let mut owners = BTreeMap::new();
    for p in by_age {
        owners.entry(p.public_key).or_insert(p.name.as_str());
    }
    owners
}

/// Every range no peer may claim in this mesh: the fixed ones, every Node's addresses, and the
/// mesh's own (Service CIDRs, the API server).
pub fn reserved_ranges(mesh: &MeshInput, nodes: &[NodeInput]) -> Vec<ReservedRange> {
    let node_addresses = nodes.iter().flat_map(|n| {
        n.addresses.iter().map(move |a| {
            ReservedRange::new(Cidr::host(*a), format!("an address of node {}", n.name))
        })
    });
    mesh_reserved(mesh)
        .into_iter()
        .chain(node_addresses)
        .collect()
}

/// The fixed reserved ranges and the mesh's own (Service CIDRs, the API server): what no
/// claim, observed endpoint or tunnel pool may overlap, whatever the nodes.
fn mesh_reserved(mesh: &MeshInput) -> Vec<ReservedRange> {
    fixed_reserved()
        .into_iter()
        .chain(mesh.reserved.iter().cloned())
        .collect()
}

/// Whether the mesh's tunnel pools can be programmed on its nodes: each at least a /30
/// (IPv4) or /126 (IPv6), so that two nodes fit, and clear of every reserved range (loopback,
/// link-local, multicast, the Service CIDRs, the API server ...), of every Node's addresses
/// and of every Node's pod CIDRs (members or not). Every node adds its address with the
/// pool's prefix, and so a route for the whole pool into the tunnel: a pool over
/// `127.0.0.0/8`, `::/0` or the underlay's addresses would cut the node off, and one over
/// pod CIDRs would take those pods' traffic (and [`compute`] would refuse every node peer
/// whose pods it covers, evicting those nodes). The error says which pool and what it
/// overlaps; the controller then holds the mesh as it is (`InvalidTunnelPool`).
pub fn check_tunnel_pools(mesh: &MeshInput, nodes: &[NodeInput]) -> Result<(), String> {
    let reserved = mesh_reserved(mesh);
    // One pool per family (as the CRD says): each node gets one address from each, and two
    // pools over each other would hand one address to two nodes.
    for (i, pool) in mesh.tunnel_pools.iter().enumerate() {
        if let Some(other) = mesh.tunnel_pools[..i]
            .iter()
            .find(|o| o.is_ipv4() == pool.is_ipv4())
        {
            return Err(format!(
                "tunnel pools {other} and {pool} are of one address family: a mesh has one \
                 IPv4 pool and one IPv6 pool at most"
            ));
        }
    }
    for pool in &mesh.tunnel_pools {
        let smallest = if pool.is_ipv4() { 30 } else { 126 };
        if pool.prefix_len() > smallest {
            return Err(format!(
                "tunnel pool {pool} is too small: a pool needs room for two nodes at least \
                 (/{smallest} or larger)"
            ));
        }
        if let Some(r) = reserved.iter().find(|r| r.cidr.overlaps(pool)) {
            return Err(format!(
                "tunnel pool {pool} overlaps {}, {}: every node routes its pool into the tunnel",
                r.cidr, r.what
            ));
        }
        let address = nodes.iter().find_map(|n| {
            n.addresses
                .iter()
                .chain(&n.host_addresses)
                .find(|a| pool.contains_addr(**a))
                .map(|a| (n, a))
        });
        if let Some((node, a)) = address {
            return Err(format!(
                "tunnel pool {pool} holds {a}, an address of node {}: every node routes its pool \
                 into the tunnel, and would reach that node through it",
                node.name
            ));
        }
        let pods = nodes.iter().find_map(|n| {
            n.pod_cidrs
                .iter()
                .find(|c| c.overlaps(pool))
                .map(|c| (n, c))
        });
        if let Some((node, c)) = pods {
            return Err(format!(
                "tunnel pool {pool} overlaps {c}, the pod CIDR of node {}: every node routes its \
                 pool into the tunnel, and would send those pods' traffic there",
                node.name
            ));
        }
    }
    Ok(())
}

/// What every peer of a mesh is judged against, computed once per mesh.
struct Judged<'a> {
    key_owners: &'a BTreeMap<PublicKey, &'a str>,
    /// Reserved ranges and what each is.
    reserved: &'a OverlapIndex<&'a str>,
    /// Every Node's pod CIDRs, members or not, by node name: no external peer may claim them
    /// (a Node that is not a member yet, or not selected, still owns its pods' addresses).
    node_pod_cidrs: &'a OverlapIndex<&'a str>,
    /// [`fixed_reserved`]: where no external peer's literal endpoint may point.
    fixed_reserved: &'a [ReservedRange],
}

fn judge(
    mesh: &MeshInput,
    peer: &PeerInput,
    node: Option<&NodeInput>,
    judged: &Judged<'_>,
    claims: &OverlapIndex<String>,
    endpoints: &OverlapIndex<String>,
) -> Verdict {
    let refuse = |reason, message: String| Verdict::Refused { reason, message };
    if peer.disabled {
        return refuse(Reason::Disabled, "spec.disabled is true".into());
    }
    if let Some(node_name) = &peer.node {
        match node {
            None => {
                return refuse(
                    Reason::NodeNotInMesh,
                    format!("node {node_name} does not exist"),
                );
            }
            Some(n) if !n.selected => {
                return refuse(
                    Reason::NodeNotInMesh,
                    format!(
                        "node {node_name} does not match the nodeSelector of mesh {}",
                        mesh.name
                    ),
                );
            }
            Some(n) if peer.node_owner_uid.as_deref() != Some(n.uid.as_str()) => {
                return refuse(
                    Reason::NodePeerNotOwned,
                    format!(
                        "spec.node names node {node_name}, which only the controller's own peer \
                         of that Node (owned by it) may; remove spec.node to make this an \
                         external peer"
                    ),
                );
            }
            Some(_) => {}
        }
    }
    if let Some(other) = judged
        .key_owners
        .get(&peer.public_key)
        .filter(|owner| **owner != peer.name)
    {
        return refuse(
            Reason::DuplicatePublicKey,
            format!(
                "public key {} is already used by WireGuardPeer {other}",
                peer.public_key
            ),
        );
    }
    if let Some(SecretInput::Missing(why)) = &peer.preshared_key {
        return refuse(Reason::PresharedKeySecretMissing, why.clone());
    }
    if let Some(SecretInput::Present(bytes)) = &peer.preshared_key
        && let Err(why) = peer_preshared_key(bytes)
    {
        return refuse(
            Reason::InvalidSpec,
            format!("spec.presharedKeySecretRef: {why}"),
        );
    }
    if peer.node.is_some()
        && let Some(SecretInput::Missing(why)) = &mesh.preshared_key
    {
        return refuse(
            Reason::PresharedKeySecretMissing,
            format!("mesh {}: {why}", mesh.name),
        );
    }
    for cidr in claimed_networks(peer, node) {
        if let Some((range, what)) = judged.reserved.first_overlap(&cidr) {
            return refuse(
                Reason::ReservedRange,
                format!(
                    "{cidr} overlaps {range}, {what}: routing it into the mesh would cut nodes off"
                ),
            );
        }
        if let Some(pool) = mesh.tunnel_pools.iter().find(|p| p.overlaps(&cidr)) {
            return refuse(
                Reason::AllowedIpsOverlap,
                format!(
                    "{cidr} overlaps the tunnel pool {pool} of mesh {}",
                    mesh.name
                ),
            );
        }
        if let Some((theirs, owner)) = claims.first_overlap(&cidr) {
            return refuse(
                Reason::AllowedIpsOverlap,
                format!("{cidr} overlaps {theirs}, {owner}"),
            );
        }
        if peer.node.is_none()
            && let Some((theirs, node)) = judged.node_pod_cidrs.first_overlap(&cidr)
        {
            return refuse(
                Reason::AllowedIpsOverlap,
                format!("{cidr} overlaps {theirs}, the pod CIDR of node {node}"),
            );
        }
        // Without a fwmark the tunnel's packets to another peer's endpoint inside this claim
        // would be routed into the tunnel: that peer could never be reached.
        if !mesh.marks_tunnel_packets
            && let Some((ip, owner)) = endpoints.first_overlap(&cidr)
        {
            return refuse(
                Reason::AllowedIpsOverlap,
                format!(
                    "{cidr} covers {}, {owner}: without a mesh fwmark the tunnel's packets to \
                     it would be routed into the tunnel",
                    ip.addr()
                ),
            );
        }
    }
    if peer.node.is_none()
        && let Some(endpoint) = &peer.endpoint
    {
        if let Err(why) = check_mesh_endpoint(endpoint) {
            return refuse(Reason::InvalidSpec, format!("spec.endpoint: {why}"));
        }
        // Every gateway sends its handshakes to a literal address from the host: not to
        // loopback, link-local (cloud metadata), multicast or the unspecified address (the
        // fixed reserved ranges) or the tunnel pools, targets `observed_endpoint` also
        // refuses. Not the rest of the reserved ranges: the Service CIDRs and the API server
        // are reserved for routing and reachable from any pod anyway, and an operator's
        // `reservedCIDRs` (say, a corporate network) may well hold a remote site's endpoint.
        // Nor a Node's address: a site behind the nodes' own NAT address, or a WireGuard
        // server on a node's host, is reached there, and what the gateways send there is
        // sealed for the peer's key, which only the peer can open (an observed endpoint may
        // not be a Node's: there it would move a node's own tunnel). The reasons are the
        // ones the same ranges get as allowed IPs: `ReservedRange` for the fixed ranges,
        // `AllowedIPsOverlap` for a tunnel pool. A DNS name is resolved by the agents, which
        // use none of its addresses in the fixed ranges.
        if let Some(ip) = endpoint_address(endpoint)
            && let Some(forbidden) = forbidden_endpoint(
                ip,
                judged.fixed_reserved,
                &mesh.tunnel_pools,
                &NodeAddresses::new(),
                None,
            )
        {
            let reason = match forbidden {
                Forbidden::TunnelPool(_) => Reason::AllowedIpsOverlap,
                Forbidden::Reserved(_) | Forbidden::Node(_) => Reason::ReservedRange,
            };
            return refuse(
                reason,
                format!(
                    "spec.endpoint: {}: every gateway would send its handshakes there",
                    forbidden.describe(ip)
                ),
            );
        }
        // Without a fwmark the tunnel's own packets to the endpoint would be routed into the
        // tunnel: the peer could never be reached.
        if !mesh.marks_tunnel_packets
            && let Some(ip) = endpoint_address(endpoint)
            && let Some(cidr) = claimed_networks(peer, node)
                .into_iter()
                .find(|c| c.contains_addr(ip))
        {
            return refuse(
                Reason::AllowedIpsOverlap,
                format!(
                    "{cidr} covers the peer's own endpoint {ip}: without a mesh fwmark the \
                     tunnel's packets to it would be routed into the tunnel"
                ),
            );
        }
        // ...nor inside what another peer claims (its tunnel would carry them). A responder's
        // endpoint is never sent to.
        if !mesh.marks_tunnel_packets
            && !peer.responder
            && let Some(ip) = endpoint_address(endpoint)
            && let Some((theirs, owner)) = claims.first_overlap(&Cidr::host(ip))
        {
            return refuse(
                Reason::AllowedIpsOverlap,
                format!(
                    "spec.endpoint {ip} is inside {theirs}, {owner}: without a mesh fwmark the \
                     tunnel's packets to it would be routed into that tunnel"
                ),
            );
        }
    }
    // Last, so that what is wrong with the spec is said first, and a refused peer given no
    // address (`compute`) reads as refused for it. Every address that could be allocated
    // was: a pool the peer has none from is full.
    for pool in &mesh.tunnel_pools {
        if !peer.tunnel_addresses.iter().any(|a| pool.contains_addr(*a)) {
            return refuse(
                Reason::TunnelPoolExhausted,
                format!(
                    "tunnel pool {pool} of mesh {} has no free address",
                    mesh.name
                ),
            );
        }
    }
    Verdict::Programmed
}

/// The address of an endpoint given as one (a host name is resolved by the agents).
fn endpoint_address(endpoint: &str) -> Option<std::net::IpAddr> {
    crate::validate::parse_endpoint_host(endpoint)
        .ok()
        .and_then(|(host, _)| host.parse().ok())
}

fn desired_peer(mesh: &MeshInput, peer: &PeerInput, node: Option<&NodeInput>) -> DesiredPeer {
    let endpoint = if peer.node.is_some() {
        // A node peer without its Node is refused (`judge`): never published.
        node.and_then(|node| {
            let registered = registered_endpoint(node, peer.endpoint.as_deref());
            node_endpoint(&node.endpoint, registered.as_deref())
        })
    } else if peer.responder {
        None
    } else {
        peer.endpoint
            .clone()
            .or_else(|| peer.last_seen_endpoint.clone())
    };
    let preshared_key = match (&peer.preshared_key, &peer.node, &mesh.preshared_key) {
        // A value that is no key was refused (`judge`).
        (Some(SecretInput::Present(bytes)), _, _) => match peer_preshared_key(bytes) {
            Ok(key) => PresharedKey::Static(key),
            Err(_) => PresharedKey::None,
        },
        (None, Some(_), Some(SecretInput::Present(_))) => PresharedKey::DerivedFromMesh,
        _ => PresharedKey::None,
    };
    DesiredPeer {
        name: peer.name.clone(),
        public_key: peer.public_key,
        endpoint,
        allowed_ips: allowed_ips_of(peer, node),
        persistent_keepalive: peer
            .persistent_keepalive
            .unwrap_or(mesh.persistent_keepalive),
        preshared_key,
        node: peer.node.clone(),
        encoding: EncodingMemo::default(),
        allowed_ips_diff: AllowedIpsDiffMemo::default(),
    }
}

/// What a node's agent registered (its node peer's [`PeerInput::endpoint`], from an annotation
/// that anyone who may patch WireGuardPeers can rewrite), as far as it is the node's: an
/// `address:port` at one of the Node's addresses, all Register ever writes, is kept; at any
/// other address (another node's, cloud metadata ...) the Node's first address takes its
/// place, with the registered port: what Register would choose, so a node whose address
/// changed since it registered is still reached. A DNS name, a port alone or port 0 is no
/// registration, and neither is anything of a Node that lists no address: none.
fn registered_endpoint(node: &NodeInput, registered: Option<&str>) -> Option<String> {
    let addr: std::net::SocketAddr = registered?.trim().parse().ok()?;
    if addr.port() == 0 {
        return None;
    }
    let ip = addr.ip();
    let ip = if node.addresses.contains(&ip) || node.host_addresses.contains(&ip) {
        ip
    } else {
        *node.addresses.first().or(node.host_addresses.first())?
    };
    Some(std::net::SocketAddr::new(ip, addr.port()).to_string())
}

/// Each tunnel address with its pool's prefix, so the interface route covers the pool.
fn interface_addresses(mesh: &MeshInput, peer: &PeerInput) -> Vec<ipnet::IpNet> {
    peer.tunnel_addresses
        .iter()
        .filter_map(|a| {
            let pool = mesh.tunnel_pools.iter().find(|p| p.contains_addr(*a))?;
            ipnet::IpNet::new(*a, pool.prefix_len()).ok()
        })
        .collect()
}

#[cfg(test)]
#[path = "desired_tests.rs"]
pub(crate) mod tests;
