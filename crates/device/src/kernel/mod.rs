//! The kernel WireGuard backend: the link is created with rtnetlink (kind `wireguard`) and
//! configured through the `wireguard` generic netlink family. Changes are sent as diffs
//! (`WG_CMD_SET_DEVICE` without `WGDEVICE_F_REPLACE_PEERS`), so sessions of untouched peers
//! survive; the message building is pure and lives in [`messages`].

pub mod messages;

use std::collections::HashSet;
use std::io;
use std::sync::{Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use genetlink::GenetlinkHandle;
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload, Nla,
};
use netlink_packet_generic::GenlMessage;
use netlink_packet_wireguard::WireguardMessage;
use rtnetlink::packet_route::link::{InfoData, InfoKind, LinkAttribute, LinkInfo, LinkMessage};

use rtnetlink::{LinkUnspec, LinkWireguard};
use wgmesh_core::PublicKey;

use super::{DeviceChange, DeviceState, Error, InterfaceConfig, validate_name};

/// The alias (`ip link set DEV alias ..`) on the WireGuard links this backend made or adopted:
/// what tells them from another tool's tunnel of the same name.
pub const LINK_ALIAS: &str = "wgmesh";

/// A link's alias, if it has one.
pub fn link_alias(link: &LinkMessage) -> Option<&str> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfAlias(alias) => Some(alias.as_str()),
        _ => None,
    })
}

/// Whether an existing WireGuard link may be taken as the device: one marked ours
/// ([`LINK_ALIAS`]), one without a private key or peers (nothing to lose), or one with this
/// node's key (an agent older than the alias made it). Anything else is another tool's
/// tunnel, whose peers adopting it would replace: refused, with what to do instead.
pub fn may_adopt(
    name: &str,
    alias: Option<&str>,
    link_key: &PublicKey,
    link_peers: usize,
    ours: &PublicKey,
) -> Result<(), Error> {
    // Our links get their key before any peer.
    let unkeyed = link_key.as_bytes() == &[0; 32] && link_peers == 0;
    if alias == Some(LINK_ALIAS) || unkeyed || link_key == ours {
        return Ok(());
    }
    Err(Error::InvalidConfig(format!(
        "the WireGuard link {name} exists and is not wgmesh's (another private key, {}): \
         another tool's tunnel is never taken over; give the mesh another interfaceName, or \
         delete the link if it is a leftover",
        match alias {
            Some(a) => format!("alias {a:?}"),
            None => "no alias".to_owned(),
        }
    )))
}

/// Whether an existing TUN of the mesh's name may be taken as the userspace device (or
/// replaced by the kernel backend's link): one marked ours ([`LINK_ALIAS`]), or one nobody
/// holds open (a persistent TUN without a process attached: an agent older than the alias
/// left it; whatever is routed into it is dropped anyway). A TUN a running program holds
/// (wireguard-go's `wg0`, a VPN client's) is another tool's tunnel.
pub fn tun_may_be_taken(alias: Option<&str>, held_open: bool) -> bool {
    alias == Some(LINK_ALIAS) || !held_open
}

/// The refusal for a TUN that [`tun_may_be_taken`] says is another tool's, with what to do.
pub fn foreign_tun(name: &str) -> Error {
    Error::InvalidConfig(format!(
        "the TUN device {name} exists, is held open by another program and is not wgmesh's: \
         another tool's tunnel (wireguard-go's, for one) is never taken over; give the mesh \
         another interfaceName"
    ))
}

/// Whether a program holds the TUN `link` open: the kernel removes a TUN that is not
/// persistent when its last descriptor closes, and gives a persistent one carrier only while
/// one is attached. Kernels before 4.15 do not say whether a TUN is persistent: carrier
/// alone decides there.
pub fn tun_held_open(link: &LinkMessage) -> bool {
    const IFLA_TUN_PERSIST: u16 = 6;
    let persistent = link.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
            LinkInfo::Data(InfoData::Tun(nlas)) => nlas.iter().find_map(|nla| {
                let mut value = vec![0; nla.value_len()];
                nla.emit_value(&mut value);
                (nla.kind() == IFLA_TUN_PERSIST).then(|| value.first().is_some_and(|v| *v != 0))
            }),
            _ => None,
        }),
        _ => None,
    });
    let carrier = link
        .attributes
        .iter()
        .any(|a| matches!(a, LinkAttribute::Carrier(c) if *c != 0));
    persistent == Some(false) || carrier
}

/// Whether the link is a TUN that is wgmesh's to take or delete ([`tun_may_be_taken`]).
pub fn tun_is_ours(link: &LinkMessage) -> bool {
    link_kind(link) == Some(&InfoKind::Tun)
        && tun_may_be_taken(link_alias(link), tun_held_open(link))
}

/// The `kind` of a link (`wireguard`, `tun`, ...), as `ip -d link` shows it.
pub fn link_kind(link: &LinkMessage) -> Option<&InfoKind> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
            LinkInfo::Kind(k) => Some(k),
            _ => None,
        }),
        _ => None,
    })
}

/// The WireGuard device already behind an interface name: a kernel link or the userspace
/// device's persistent TUN (a previous run's), or something else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExistingLink {
    Wireguard,
    /// A TUN that is ours to take ([`may_take_tun`]).
    Tun,
    /// A TUN another program holds open.
    ForeignTun,
    Other,
}

/// What `name` is now, if it exists.
pub async fn existing_link(name: &str) -> Result<Option<ExistingLink>, Error> {
    let (rtnl, task) = rtnl_connection()?;
    let _abort = AbortOnDrop(task);
    let link = link_by_name(&rtnl, name)
        .await
        .map_err(|e| netlink_err(format!("looking up the link {name}"), e))?;
    Ok(link.map(|l| match link_kind(&l) {
        Some(InfoKind::Wireguard) => ExistingLink::Wireguard,
        Some(InfoKind::Tun) if tun_is_ours(&l) => ExistingLink::Tun,
        Some(InfoKind::Tun) => ExistingLink::ForeignTun,
        _ => ExistingLink::Other,
    }))
}

/// Marks the userspace device's TUN `name` as wgmesh's ([`LINK_ALIAS`]), unless it is already.
pub async fn mark_tun(name: &str) -> Result<(), Error> {
    let (rtnl, task) = rtnl_connection()?;
    let _abort = AbortOnDrop(task);
    match link_by_name(&rtnl, name)
        .await
        .map_err(|e| netlink_err(format!("looking up the link {name}"), e))?
    {
        Some(link) if link_alias(&link) != Some(LINK_ALIAS) => {
            set_alias(&rtnl, link.header.index, name).await
        }
        _ => Ok(()),
    }
}

/// Deletes the link `name` (only ever one [`existing_link`] found to be a WireGuard device
/// of the other kind).
pub async fn delete_link(name: &str) -> Result<(), Error> {
    let (rtnl, task) = rtnl_connection()?;
    let _abort = AbortOnDrop(task);
    delete_link_by_name(&rtnl, name)
        .await
        .map_err(|e| netlink_err(format!("deleting the link {name}"), e))
}

/// Whether this kernel can host WireGuard links.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelSupport {
    Available,
    /// Why not, as the kernel put it (such as "Operation not supported", which `ip` shows as
    /// "Unknown device type").
    Unavailable(String),
}

/// A WireGuard link of the kernel module. Dropping it leaves the link in place (traffic keeps
/// flowing while the agent restarts); [`KernelDevice::delete`] removes it.
pub struct KernelDevice {
    name: String,
    ifindex: u32,
    genl: GenetlinkHandle,
    rtnl: rtnetlink::Handle,
    /// What the device holds of its peers (as of the last dump, and the changes since): only
    /// peers known to have a preshared key get a zero key to clear it, and allowed IPs are
    /// sent only when they differ from the known ones.
    known: Mutex<messages::Known>,
    /// Serialises `apply` so that the messages of two calls never interleave.
    apply_lock: tokio::sync::Mutex<()>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for KernelDevice {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

fn netlink_err(op: impl Into<String>, source: io::Error) -> Error {
    Error::Netlink {
        op: op.into(),
        source,
    }
}

/// The errno of an rtnetlink error, as an `io::Error`.
fn rtnl_io(e: rtnetlink::Error) -> io::Error {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.to_io(),
        other => io::Error::other(other.to_string()),
    }
}

fn genl_io(e: genetlink::GenetlinkError) -> io::Error {
    match e {
        genetlink::GenetlinkError::NetlinkError(e) => e,
        other => io::Error::other(other.to_string()),
    }
}

fn rtnl_connection() -> Result<(rtnetlink::Handle, tokio::task::JoinHandle<()>), Error> {
    let (conn, handle, _) =
        rtnetlink::new_connection().map_err(|e| netlink_err("opening an rtnetlink socket", e))?;
    Ok((handle, tokio::spawn(conn)))
}

/// Whether a kernel refusal to create a link means "no such link kind here".
fn is_unsupported_kind(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::ENODEV | libc::EINVAL | libc::EAFNOSUPPORT)
    )
}

async fn link_by_name(
    rtnl: &rtnetlink::Handle,
    name: &str,
) -> Result<Option<LinkMessage>, io::Error> {
    let mut links = rtnl.link().get().match_name(name.to_owned()).execute();
    match links.next().await {
        Some(Ok(link)) => Ok(Some(link)),
        Some(Err(e)) => {
            let e = rtnl_io(e);
            if e.raw_os_error() == Some(libc::ENODEV) {
                Ok(None)
            } else {
                Err(e)
            }
        }
        None => Ok(None),
    }
}

async fn delete_link_by_name(rtnl: &rtnetlink::Handle, name: &str) -> Result<(), io::Error> {
    rtnl.link()
        .del_with_message(LinkUnspec::new_with_name(name).build())
        .execute()
        .await
        .map_err(rtnl_io)
}

/// Probes the kernel by creating a WireGuard link with a random name and deleting it again,
/// in the calling thread's network namespace. A refusal meaning "unknown link kind"
/// (`EOPNOTSUPP`, `ENODEV`, `EINVAL`, `EAFNOSUPPORT`) is [`KernelSupport::Unavailable`];
/// other failures (such as `EPERM` without `CAP_NET_ADMIN`) are errors.
pub async fn kernel_wireguard_available() -> Result<KernelSupport, Error> {
    let (rtnl, task) = rtnl_connection()?;
    let _abort = AbortOnDrop(task);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let name = format!("wgprobe{:08x}", nanos ^ std::process::id().rotate_left(16));
    match rtnl
        .link()
        .add(LinkWireguard::new(&name).build())
        .execute()
        .await
    {
        Ok(()) => {
            delete_link_by_name(&rtnl, &name)
                .await
                .map_err(|e| netlink_err(format!("deleting the probe link {name}"), e))?;
            Ok(KernelSupport::Available)
        }
        Err(e) => {
            let e = rtnl_io(e);
            if is_unsupported_kind(&e) {
                Ok(KernelSupport::Unavailable(format!(
                    "no wireguard link type: {e}"
                )))
            } else {
                Err(netlink_err("creating a probe WireGuard link", e))
            }
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl KernelDevice {
    /// Creates the WireGuard link `config.name` if it is missing (an existing WireGuard link
    /// is adopted with its peers; a link of another kind is an error), then sets the private
    /// key, fwmark and listen port (unless 0, which keeps the kernel's choice). The link is
    /// not brought up nor given addresses: routing does that. Netlink sockets are opened in
    /// the calling thread's network namespace; call from within a tokio runtime.
    pub async fn create(config: InterfaceConfig) -> Result<KernelDevice, Error> {
        validate_name(&config.name)?;
        let name = config.name.clone();
        let (rtnl, rtnl_task) = rtnl_connection()?;
        let (genl_conn, genl, _) = genetlink::new_connection()
            .map_err(|e| netlink_err("opening a generic netlink socket", e))?;
        let genl_task = tokio::spawn(genl_conn);
        // From here on, dropping `device` (an early return) stops both connections.
        let mut device = KernelDevice {
            name: name.clone(),
            ifindex: 0,
            genl,
            rtnl,
            known: Mutex::new(messages::Known::default()),
            apply_lock: tokio::sync::Mutex::new(()),
            tasks: vec![rtnl_task, genl_task],
        };

        let link = match link_by_name(&device.rtnl, &name)
            .await
            .map_err(|e| netlink_err(format!("looking up the link {name}"), e))?
        {
            Some(link) => {
                if link_kind(&link) != Some(&InfoKind::Wireguard) {
                    return Err(Error::InvalidConfig(format!(
                        "the link {name} exists and is not a WireGuard link ({:?})",
                        link_kind(&link)
                    )));
                }
                link
            }
            None => {
                if let Err(e) = device
                    .rtnl
                    .link()
                    .add(LinkWireguard::new(&name).build())
                    .execute()
                    .await
                {
                    let e = rtnl_io(e);
                    return Err(if is_unsupported_kind(&e) {
                        Error::KernelUnavailable(format!("no wireguard link type: {e}"))
                    } else {
                        netlink_err(format!("creating the WireGuard link {name}"), e)
                    });
                }
                link_by_name(&device.rtnl, &name)
                    .await
                    .map_err(|e| netlink_err(format!("looking up the link {name}"), e))?
                    .ok_or_else(|| {
                        netlink_err(
                            format!("looking up the link {name}"),
                            io::Error::from_raw_os_error(libc::ENODEV),
                        )
                    })?
            }
        };
        device.ifindex = link.header.index;

        // Learn what the existing peers (of an adopted link) hold, and whose
        // link it is.
        let found = device.observe().await?;
        let alias = link_alias(&link);
        may_adopt(
            &name,
            alias,
            &found.public_key,
            found.peers.len(),
            &config.private_key.public_key(),
        )?;
        if alias != Some(LINK_ALIAS) {
            set_alias(&device.rtnl, device.ifindex, &name).await?;
        }
        // An unchanged private key does not reset sessions. A listen port of 0 ("any") is
        // not sent: on an adopted link it would move the port the peers know.
        let mut settings = vec![
            DeviceChange::SetPrivateKey(config.private_key.clone()),
            DeviceChange::SetFwmark(config.fwmark),
        ];
        if config.listen_port != 0 {
            settings.push(DeviceChange::SetListenPort(config.listen_port));
        }
        device.apply(&settings).await?;
        tracing::info!(
            interface = %name,
            ifindex = device.ifindex,
            listen_port = config.listen_port,
            public_key = %config.private_key.public_key(),
            "kernel WireGuard device ready"
        );
        Ok(device)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// The device as the kernel reports it (`WG_CMD_GET_DEVICE` dump). The kernel keeps a
    /// single endpoint per peer, reported as both the configured and the current endpoint.
    pub async fn observe(&self) -> Result<DeviceState, Error> {
        let messages = self
            .request(messages::get_device_message(self.ifindex), NLM_F_DUMP)
            .await
            .map_err(|e| netlink_err(format!("reading the WireGuard device {}", self.name), e))?;
        let state = messages::parse_device(&messages)?;
        *self.known.lock().unwrap_or_else(PoisonError::into_inner) = messages::Known::of(&state);
        Ok(state)
    }

    /// Applies `changes` in order, as diffs, in as many messages as the size budget needs. On
    /// error, the messages before the failing one stay applied.
    pub async fn apply(&self, changes: &[DeviceChange]) -> Result<(), Error> {
        let _serial = self.apply_lock.lock().await;
        let batch = {
            let mut known = self.known.lock().unwrap_or_else(PoisonError::into_inner);
            messages::set_device_messages(
                self.ifindex,
                changes,
                &mut known,
                messages::MESSAGE_BUDGET,
            )
        };
        let total = batch.len();
        for (i, message) in batch.into_iter().enumerate() {
            if let Err(e) = self.request(message, NLM_F_ACK).await {
                // Relearn the peers' preshared keys and allowed IPs, as only part was applied.
                let _ = self.observe().await;
                return Err(netlink_err(
                    format!(
                        "configuring the WireGuard device {} (message {} of {total})",
                        self.name,
                        i + 1
                    ),
                    e,
                ));
            }
        }
        Ok(())
    }

    /// Deletes the link (and with it every peer and session).
    pub async fn delete(self) -> Result<(), Error> {
        self.rtnl
            .link()
            .del(self.ifindex)
            .execute()
            .await
            .map_err(|e| netlink_err(format!("deleting the link {}", self.name), rtnl_io(e)))
    }

    /// Sends one request and collects the messages of the answer; an error message fails it.
    async fn request(
        &self,
        message: WireguardMessage,
        flags: u16,
    ) -> Result<Vec<WireguardMessage>, io::Error> {
        genl_request(&self.genl, message, flags).await
    }
}

/// One generic netlink request to the `wireguard` family; an error message fails it.
async fn genl_request(
    genl: &GenetlinkHandle,
    message: WireguardMessage,
    flags: u16,
) -> Result<Vec<WireguardMessage>, io::Error> {
    let mut nl = NetlinkMessage::from(GenlMessage::from_payload(message));
    nl.header.flags = NLM_F_REQUEST | flags;
    let mut genl = genl.clone();
    let mut answers = genl.request(nl).await.map_err(genl_io)?;
    let mut out = Vec::new();
    while let Some(answer) = answers.next().await {
        let answer = answer.map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        match answer.payload {
            NetlinkPayload::InnerMessage(genl) => out.push(genl.payload),
            NetlinkPayload::Error(e) if e.code.is_some() => return Err(e.to_io()),
            _ => {}
        }
    }
    Ok(out)
}

/// Marks the WireGuard link `name` as wgmesh's ([`LINK_ALIAS`]) when it has no alias yet and
/// the link itself shows an agent older than the alias made it: it holds the node's key
/// `ours`, or among its peers is one of `known_peers` (the mesh's peers the node's saved state
/// lists: the link of a key rotated since still carries them). Then it is adopted, and cleaned
/// up, like the links made since. Another tool's link of the same name (wg-quick's, made after
/// a reboot) shows neither. Returns whether it marked one.
pub async fn claim_link(
    name: &str,
    ours: Option<&PublicKey>,
    known_peers: &[PublicKey],
) -> Result<bool, Error> {
    let (rtnl, task) = rtnl_connection()?;
    let _abort = AbortOnDrop(task);
    let Some(link) = link_by_name(&rtnl, name)
        .await
        .map_err(|e| netlink_err(format!("looking up the link {name}"), e))?
    else {
        return Ok(false);
    };
    if link_kind(&link) != Some(&InfoKind::Wireguard) || link_alias(&link).is_some() {
        return Ok(false);
    }
    let ifindex = link.header.index;
    let (conn, genl, _) = genetlink::new_connection()
        .map_err(|e| netlink_err("opening a generic netlink socket", e))?;
    let _genl_task = AbortOnDrop(tokio::spawn(conn));
    let messages = genl_request(&genl, messages::get_device_message(ifindex), NLM_F_DUMP)
        .await
        .map_err(|e| netlink_err(format!("reading the WireGuard device {name}"), e))?;
    let state = messages::parse_device(&messages)?;
    let holds_ours = ours.is_some_and(|k| *k == state.public_key);
    let known: HashSet<&PublicKey> = known_peers.iter().collect();
    let knows_ours = state
        .peers
        .iter()
        .any(|p| known.contains(&p.config.public_key));
    if !holds_ours && !knows_ours {
        return Ok(false);
    }
    set_alias(&rtnl, ifindex, name).await?;
    Ok(true)
}

async fn set_alias(rtnl: &rtnetlink::Handle, ifindex: u32, name: &str) -> Result<(), Error> {
    rtnl.link()
        .set(
            LinkUnspec::new_with_index(ifindex)
                .alias(LINK_ALIAS)
                .build(),
        )
        .execute()
        .await
        .map_err(|e| netlink_err(format!("marking the link {name} as wgmesh's"), rtnl_io(e)))
}

#[cfg(test)]
mod ownership_tests {
    use super::*;
    use wgmesh_core::PrivateKey;

    #[test]
    fn only_a_link_that_is_not_another_tools_is_adopted() {
        let ours = PrivateKey::from_bytes([1; 32]).public_key();
        let theirs = PrivateKey::from_bytes([2; 32]).public_key();
        let none = PublicKey::from_bytes([0; 32]);
        // alias, the link's key and peers, adopted
        for (alias, key, peers, adopted) in [
            (Some(LINK_ALIAS), theirs, 3, true), // ours, since rotated to a key not saved yet
            (Some(LINK_ALIAS), ours, 0, true),
            (None, none, 0, true),    // `ip link add` and nothing else
            (None, none, 2, false),   // peers, its key file missing (networkd's)
            (None, ours, 5, true),    // an older agent's
            (None, theirs, 0, false), // wg-quick's
            (Some("vpn"), theirs, 1, false),
            (Some("vpn"), ours, 1, true),
            (Some("wgmesh2"), theirs, 0, false),
        ] {
            let got = may_adopt("wg0", alias, &key, peers, &ours);
            assert_eq!(got.is_ok(), adopted, "{alias:?} {key} {peers}: {got:?}");
            if let Err(e) = got {
                let text = e.to_string();
                assert!(
                    text.contains("wg0") && text.contains("interfaceName"),
                    "{text}"
                );
                assert!(!text.contains(&theirs.to_base64()), "no key quoted: {text}");
            }
        }
    }

    /// A TUN link as the kernel reports it: persistent or not, with carrier (a program
    /// attached) or not, and its alias.
    fn tun(persistent: bool, carrier: bool, alias: Option<&str>) -> LinkMessage {
        use netlink_packet_core::DefaultNla;
        use rtnetlink::packet_route::link::InfoTun;
        let mut link = LinkMessage::default();
        link.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Tun),
            LinkInfo::Data(InfoData::Tun(vec![
                InfoTun::Other(DefaultNla::new(3, vec![1])), // IFLA_TUN_TYPE
                InfoTun::Other(DefaultNla::new(6, vec![u8::from(persistent)])),
            ])),
        ]));
        link.attributes
            .push(LinkAttribute::Carrier(u8::from(carrier)));
        if let Some(alias) = alias {
            link.attributes
                .push(LinkAttribute::IfAlias(alias.to_owned()));
        }
        link
    }

    #[test]
    fn only_a_tun_no_other_program_holds_is_ours() {
        // persistent, carrier, alias: ours
        for (persistent, carrier, alias, ours) in [
            (true, false, None, true), // an older agent's, left by its process
            (true, false, Some(LINK_ALIAS), true), // ours, left by a crashed agent
            (true, true, Some(LINK_ALIAS), true), // ours, while we run
            (false, true, Some(LINK_ALIAS), true), // ours, not made persistent
            (false, true, None, false), // wireguard-go's: exists only while it runs
            (true, true, None, false), // a VPN client attached to its persistent TUN
            (true, true, Some("vpn"), false),
            (true, false, Some("vpn"), true), // nobody holds it: a leftover
        ] {
            let link = tun(persistent, carrier, alias);
            assert_eq!(
                tun_is_ours(&link),
                ours,
                "persistent {persistent}, carrier {carrier}, alias {alias:?}"
            );
        }
        // A kernel before 4.15: no persistence attribute, carrier decides.
        for (carrier, ours) in [(false, true), (true, false)] {
            let mut old_kernel = tun(true, carrier, None);
            old_kernel.attributes[0] = LinkAttribute::LinkInfo(vec![LinkInfo::Kind(InfoKind::Tun)]);
            assert_eq!(
                tun_is_ours(&old_kernel),
                ours,
                "no persist attribute, carrier {carrier}"
            );
        }
        let mut wireguard = tun(true, false, None);
        wireguard.attributes[0] =
            LinkAttribute::LinkInfo(vec![LinkInfo::Kind(InfoKind::Wireguard)]);
        assert!(!tun_is_ours(&wireguard), "not a TUN");
        let text = foreign_tun("wg0").to_string();
        assert!(
            text.contains("wg0") && text.contains("interfaceName"),
            "{text}"
        );
    }
}
