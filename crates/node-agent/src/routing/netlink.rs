//! The I/O half of routing: reads addresses, routes, rules and links over rtnetlink, and
//! applies what [`super::plan`] decided.

use std::collections::HashSet;
use std::io;
use std::net::IpAddr;

use futures::{StreamExt, TryStreamExt};
use ipnet::IpNet;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkMessage};
use rtnetlink::packet_route::route::{
    RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleFlags, RuleMessage};
use rtnetlink::{IpVersion, LinkUnspec, RouteMessageBuilder};
use wgmesh_device::kernel::link_kind;

use super::plan::*;

#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    #[error("opening an rtnetlink socket: {0}")]
    Socket(#[source] io::Error),
    #[error("the interface {0} does not exist")]
    NoInterface(String),
    #[error("{op}: {source}")]
    Netlink {
        op: String,
        #[source]
        source: io::Error,
    },
    #[error("invalid routing configuration: {0}")]
    Invalid(String),
}

fn netlink(op: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> RoutingError {
    let op = op.into();
    move |e| RoutingError::Netlink {
        op,
        source: rtnl_io(e),
    }
}

fn rtnl_io(e: rtnetlink::Error) -> io::Error {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.to_io(),
        other => io::Error::other(other.to_string()),
    }
}

/// The changes the kernel refused during a sync. A refused guard or rule is the sync's
/// error (the first of them; the node is not fully protected); the others are reported
/// with its changes.
#[derive(Default)]
struct Refused {
    /// The first refused guard or rule.
    unguarded: Option<RoutingError>,
    /// Every refusal, as text.
    all: Vec<String>,
    /// Whether the refusals noted now concern guards or rules.
    guarding: bool,
}

impl Refused {
    fn refuse(&mut self, e: RoutingError) {
        self.all.push(e.to_string());
        if self.guarding && self.unguarded.is_none() {
            self.unguarded = Some(e);
        }
    }

    /// The value of `r`, or None with its error noted.
    fn keep<T>(&mut self, r: Result<T, RoutingError>) -> Option<T> {
        r.map_err(|e| self.refuse(e)).ok()
    }

    /// Whether `r` succeeded; its error noted if not.
    fn note<T>(&mut self, r: Result<T, RoutingError>) -> bool {
        self.keep(r).is_some()
    }
}

fn is_errno(e: &RoutingError, errno: i32) -> bool {
    matches!(e, RoutingError::Netlink { source, .. } if source.raw_os_error() == Some(errno))
}

// ---------------------------------------------------------------------------------------
// Reading kernel messages.

fn route_table(m: &RouteMessage) -> u32 {
    m.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(m.header.table))
}

/// Whether `m` is a default route of `table`: the underlay's way out.
fn is_default_in(m: &RouteMessage, table: u32) -> bool {
    m.header.destination_prefix_length == 0
        && m.header.kind == RouteType::Unicast
        && route_table(m) == table
}

/// Whether `m` is a default route of the main table.
fn is_main_default(m: &RouteMessage) -> bool {
    is_default_in(m, MAIN_TABLE)
}

fn link_name(l: &LinkMessage) -> Option<&str> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

fn route_oif(m: &RouteMessage) -> Option<u32> {
    m.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(i) => Some(*i),
        RouteAttribute::MultiPath(hops) => hops.first().map(|h| h.interface_index),
        _ => None,
    })
}

fn route_priority(m: &RouteMessage) -> u32 {
    m.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Priority(p) => Some(*p),
            _ => None,
        })
        .unwrap_or(0)
}

fn route_gateway(m: &RouteMessage) -> Option<IpAddr> {
    m.attributes.iter().find_map(|a| match a {
        RouteAttribute::Gateway(rtnetlink::packet_route::route::RouteAddress::Inet(a)) => {
            Some(IpAddr::V4(*a))
        }
        RouteAttribute::Gateway(rtnetlink::packet_route::route::RouteAddress::Inet6(a)) => {
            Some(IpAddr::V6(*a))
        }
        _ => None,
    })
}

fn route_dst(m: &RouteMessage) -> Option<IpNet> {
    let len = m.header.destination_prefix_length;
    let addr = m.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(d) => match d {
            rtnetlink::packet_route::route::RouteAddress::Inet(a) => Some(IpAddr::V4(*a)),
            rtnetlink::packet_route::route::RouteAddress::Inet6(a) => Some(IpAddr::V6(*a)),
            _ => None,
        },
        _ => None,
    });
    let addr = match (addr, m.header.address_family) {
        (Some(a), _) => a,
        (None, AddressFamily::Inet) => IpAddr::from([0u8; 4]),
        (None, AddressFamily::Inet6) => IpAddr::from([0u8; 16]),
        _ => return None,
    };
    IpNet::new(addr, len).ok()
}

fn address_net(m: &AddressMessage) -> Option<IpNet> {
    let local = m.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(a) => Some(*a),
        _ => None,
    });
    let addr = local.or_else(|| {
        m.attributes.iter().find_map(|a| match a {
            AddressAttribute::Address(a) => Some(*a),
            _ => None,
        })
    })?;
    IpNet::new(addr, m.header.prefix_len).ok()
}

fn observed_rule(m: &RuleMessage) -> Option<ObservedRule> {
    let family = match m.header.family {
        AddressFamily::Inet => Family::V4,
        AddressFamily::Inet6 => Family::V6,
        _ => return None,
    };
    let mut rule = ObservedRule {
        family,
        priority: 0,
        fwmark: 0,
        table: u32::from(m.header.table),
        invert: m.header.flags.contains(RuleFlags::Invert),
        to_table: m.header.action == RuleAction::ToTable,
        protocol: 0,
        other_selectors: m.header.src_len != 0 || m.header.dst_len != 0 || m.header.tos != 0,
    };
    for a in &m.attributes {
        match a {
            RuleAttribute::Priority(p) => rule.priority = *p,
            RuleAttribute::FwMark(f) => rule.fwmark = *f,
            RuleAttribute::Table(t) => rule.table = *t,
            RuleAttribute::Protocol(p) => rule.protocol = u8::from(*p),
            // The kernel reports the full mask with every mark, and -1 for what is unset.
            RuleAttribute::FwMask(u32::MAX)
            | RuleAttribute::SuppressPrefixLen(u32::MAX)
            | RuleAttribute::SuppressIfGroup(u32::MAX) => {}
            RuleAttribute::Iifname(_)
            | RuleAttribute::Oifname(_)
            | RuleAttribute::FwMask(_)
            | RuleAttribute::SuppressPrefixLen(_)
            | RuleAttribute::SuppressIfGroup(_)
            | RuleAttribute::IpProtocol(_)
            | RuleAttribute::SourcePortRange(_)
            | RuleAttribute::DestinationPortRange(_)
            | RuleAttribute::UidRange(_)
            | RuleAttribute::Source(_)
            | RuleAttribute::Destination(_)
            | RuleAttribute::TunId(_)
            | RuleAttribute::L3MDev(_) => rule.other_selectors = true,
            _ => {}
        }
    }
    Some(rule)
}

fn link_mtu(link: &LinkMessage) -> Option<u32> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Mtu(m) => Some(*m),
        _ => None,
    })
}

// ---------------------------------------------------------------------------------------
// The I/O shell.

/// The node's routes, every table and both families, as one dump read them. One
/// reconciliation reads the routing table once and derives from it the underlay (its
/// default routes, their gateways and links' MTU) and what a sync compares: at 5,000 peers
/// a dump is some 20,000 routes, and each reading costs more than the change it serves.
pub struct RouteSnapshot {
    routes: Vec<RouteMessage>,
}

/// Programs the mesh interface's addresses, MTU, routes and rule. Its netlink socket lives in
/// the network namespace of the thread that called [`Routing::new`].
pub struct Routing {
    handle: rtnetlink::Handle,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Routing {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Routing {
    /// Opens an rtnetlink socket; call from within a tokio runtime.
    pub async fn new() -> Result<Routing, RoutingError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(RoutingError::Socket)?;
        let task = tokio::spawn(conn);
        Ok(Routing { handle, task })
    }

    /// Adds the missing guards, makes the rule exist exactly once per address family in use,
    /// brings the interface up, sets its MTU if it differs, then adds missing addresses and
    /// removes the others (IPv6 link-local excepted), adds missing routes via the interface in
    /// `cfg.table` (protocol [`ROUTE_PROTOCOL`]) and deletes our routes that are no longer
    /// wanted, and removes the guards no longer wanted.
    ///
    /// Guards come first and go last: a network is guarded before it is routed into the
    /// interface and unguarded only after that route went, so at no point in between does it
    /// fall back to another route. They and the rule that selects their table are put in
    /// place even when the interface is missing or a route cannot be added.
    ///
    /// A change the kernel refuses (an IPv6 route on a node with IPv6 disabled, say) does not
    /// stop the others. A refused guard or rule is returned as the error once everything else
    /// was applied (the node is not fully protected: nothing may start relying on it); other
    /// refusals are in [`RouteChanges::refused`], their traffic dropped by the guards.
    pub async fn sync(&self, cfg: &RoutingConfig) -> Result<RouteChanges, RoutingError> {
        let snapshot = self.snapshot().await?;
        self.sync_from(cfg, &snapshot).await
    }

    /// [`Routing::sync`], comparing with `snapshot` (taken just before, as the caller read
    /// the underlay from it) rather than reading the routes again.
    pub async fn sync_from(
        &self,
        cfg: &RoutingConfig,
        snapshot: &RouteSnapshot,
    ) -> Result<RouteChanges, RoutingError> {
        let table = normalize_table(cfg.table);
        let mut changes = RouteChanges::default();
        let mut refused = Refused {
            guarding: true,
            ..Refused::default()
        };
        let specials = specials_in(snapshot);
        let plain: Vec<ObservedSpecial> = specials.iter().map(|(r, _)| r.clone()).collect();
        let special_plan = plan_specials(&plain, &wanted_specials(cfg), table);
        for (dst, kind) in &special_plan.add {
            if refused.note(self.add_special(*dst, *kind, table).await) {
                changes.guards_added += 1;
            }
        }

        // The rules right after the guards: the table they select drops what it cannot
        // route yet.
        let rules = self.rules().await?;
        let plain: Vec<ObservedRule> = rules.iter().map(|(r, _)| r.clone()).collect();
        let plan = plan_rules(&plain, &cfg.rules, &rule_families(cfg));
        // The new rules first: between deleting a rule and adding its replacement (a new
        // fwmark or table) nothing would send mesh traffic to the table, and its guards
        // with it. The kernel takes a rule that differs from an old one only in `not` for
        // the same rule (EEXIST): that one is added once the old one is gone.
        // An old rule stays while a new one of its family could not be added: it may be the
        // only one leading to the guards.
        let mut after_delete = Vec::new();
        let mut unreplaced = HashSet::new();
        for (w, family) in plan.add {
            match self.add_rule(&cfg.rules[w], family).await {
                Ok(()) => changes.rules_added += 1,
                Err(RoutingError::Netlink { source, .. })
                    if source.kind() == io::ErrorKind::AlreadyExists =>
                {
                    after_delete.push((w, family));
                }
                Err(e) => {
                    unreplaced.insert(family);
                    refused.refuse(e);
                }
            }
        }
        for i in plan.delete {
            if unreplaced.contains(&rules[i].0.family) {
                continue;
            }
            if refused.note(self.delete_rule(&rules[i].1).await) {
                changes.rules_removed += 1;
            }
        }
        for (w, family) in after_delete {
            if refused.note(self.add_rule(&cfg.rules[w], family).await) {
                changes.rules_added += 1;
            }
        }

        refused.guarding = false;
        let Some(link) = self.link_by_name(&cfg.interface).await? else {
            return Err(refused
                .unguarded
                .unwrap_or_else(|| RoutingError::NoInterface(cfg.interface.clone())));
        };
        let ifindex = link.header.index;

        // Link state and MTU.
        let want_mtu = match cfg.mtu {
            Some(m) => m,
            None => auto_mtu(
                self.underlay_mtu_in(snapshot, Some(ifindex), cfg.marked_packets_table())
                    .await?,
            ),
        };
        let link_plan = plan_link(
            link.header.flags.contains(LinkFlags::Up),
            link_mtu(&link),
            want_mtu,
        );
        if link_plan != LinkPlan::default() {
            let mut msg = LinkUnspec::new_with_index(ifindex);
            if link_plan.set_up {
                msg = msg.up();
            }
            if let Some(mtu) = link_plan.mtu {
                msg = msg.mtu(mtu);
            }
            let set = self
                .handle
                .link()
                .set(msg.build())
                .execute()
                .await
                .map_err(netlink(format!("setting up {}", cfg.interface)));
            if refused.note(set) {
                changes.link_set_up = link_plan.set_up;
                changes.mtu = link_plan.mtu;
            }
        }

        // Addresses: new ones first, so that the interface keeps an IPv4 address throughout
        // when one replaces another in a different subnet (removing the last one makes the
        // kernel drop every IPv4 route via the interface).
        let observed_addrs = self.addresses(ifindex, &cfg.interface).await?;
        let nets: Vec<IpNet> = observed_addrs.iter().map(|(n, _)| *n).collect();
        let plan = plan_addresses(&nets, &cfg.addresses);
        let mut added = HashSet::new();
        // An old address stays while a new one of its family could not be added: removing
        // the last IPv4 address takes every IPv4 route via the interface with it.
        let mut unreplaced = HashSet::new();
        for net in plan.add {
            match refused.keep(self.add_address(ifindex, net, &cfg.interface).await) {
                Some(true) => {
                    added.insert(net);
                }
                Some(false) => {}
                None => {
                    unreplaced.insert(net.addr().is_ipv4());
                }
            }
        }
        for &i in &plan.delete {
            let (net, msg) = &observed_addrs[i];
            if unreplaced.contains(&net.addr().is_ipv4()) {
                continue;
            }
            match self
                .handle
                .address()
                .del(msg.clone())
                .execute()
                .await
                .map_err(netlink(format!("removing {net} from {}", cfg.interface)))
            {
                Ok(()) => changes.addresses_removed += 1,
                // Already gone (a secondary removed with its primary).
                Err(e) if is_errno(&e, libc::EADDRNOTAVAIL) || is_errno(&e, libc::ENOENT) => {}
                Err(e) => refused.refuse(e),
            }
        }
        if !plan.delete.is_empty() {
            // Removing a primary IPv4 address also removes its secondaries (unless
            // promote_secondaries is set): put back what went with it.
            let now: Vec<IpNet> = self
                .addresses(ifindex, &cfg.interface)
                .await?
                .into_iter()
                .map(|(n, _)| n)
                .collect();
            for net in plan_addresses(&now, &cfg.addresses).add {
                if let Some(true) =
                    refused.keep(self.add_address(ifindex, net, &cfg.interface).await)
                {
                    added.insert(net);
                }
            }
        }
        changes.addresses_added = added.len();

        // Routes (after the addresses, whose prefix routes count as present: read again
        // when addresses or the link's state or MTU changed, which add and remove such
        // routes; an MTU below 1280 takes the link's IPv6 ones).
        let reread;
        let relinked = changes.link_set_up || changes.mtu.is_some();
        let current = if changes.addresses_added + changes.addresses_removed > 0 || relinked {
            reread = self.snapshot().await?;
            &reread
        } else {
            snapshot
        };
        let observed = routes_via_in(current, ifindex);
        let plain: Vec<ObservedRoute> = observed.iter().map(|(r, _)| r.clone()).collect();
        let plan = plan_routes(&plain, &cfg.routes, table);
        // New routes first: when the table moves (a new fwmark), the rules already lead to
        // the new one, whose guards would drop the traffic between deleting a route from the
        // old table and adding it to the new. An added route never collides with a deleted
        // one (it is for a destination without a route in its table).
        for dst in plan.add {
            if let Some(true) =
                refused.keep(self.add_route(dst, ifindex, table, &cfg.interface).await)
            {
                changes.routes_added += 1;
            }
        }
        for i in plan.delete {
            if refused.note(self.delete_route(&observed[i].1, &observed[i].0).await) {
                changes.routes_removed += 1;
            }
        }

        for i in special_plan.delete {
            let (observed, msg) = &specials[i];
            match self.delete_special(msg, observed).await {
                Ok(()) => changes.guards_removed += 1,
                Err(e) if is_errno(&e, libc::ESRCH) => changes.guards_removed += 1,
                Err(e) => refused.refuse(e),
            }
        }
        changes.refused = refused.all;
        if !changes.is_empty() {
            tracing::debug!(interface = %cfg.interface, ?changes, "routing synced");
        }
        match refused.unguarded {
            // Everything else is applied, but the node is not fully protected.
            Some(e) => Err(e),
            None => Ok(changes),
        }
    }

    /// The MTU of the interface holding the default route (IPv4, else IPv6), else the
    /// largest MTU among the up links other than loopback, WireGuard and TUN links; 1500 if
    /// there is none.
    pub async fn underlay_mtu(&self) -> Result<u32, RoutingError> {
        self.underlay_mtu_in(&self.snapshot().await?, None, None)
            .await
    }

    /// The routes now: [`RouteSnapshot`].
    pub async fn snapshot(&self) -> Result<RouteSnapshot, RoutingError> {
        let mut routes = self.dump_routes(AddressFamily::Inet, "the node").await?;
        routes.extend(self.dump_routes(AddressFamily::Inet6, "the node").await?);
        Ok(RouteSnapshot { routes })
    }

    /// The names of the links holding the node's IPv4 default routes (main table).
    pub async fn underlay_links(&self) -> Result<Vec<String>, RoutingError> {
        let mut indices = HashSet::new();
        for msg in self.dump_routes(AddressFamily::Inet, "the node").await? {
            if is_main_default(&msg) {
                indices.extend(route_oif(&msg));
            }
        }
        let mut names: Vec<String> = self
            .links()
            .await?
            .iter()
            .filter(|l| indices.contains(&l.header.index))
            .filter_map(|l| link_name(l).map(str::to_owned))
            .collect();
        names.sort();
        Ok(names)
    }

    /// Addresses the node must keep reaching over the underlay whatever the mesh says: the
    /// gateways of its default routes and the addresses of the interfaces holding them.
    pub async fn underlay_addresses(&self) -> Result<Vec<IpAddr>, RoutingError> {
        self.underlay_addresses_in(&self.snapshot().await?).await
    }

    /// [`Routing::underlay_addresses`], from the default routes in `snapshot`.
    pub async fn underlay_addresses_in(
        &self,
        snapshot: &RouteSnapshot,
    ) -> Result<Vec<IpAddr>, RoutingError> {
        let mut gateways = Vec::new();
        let mut links = HashSet::new();
        for msg in snapshot.routes.iter().filter(|m| is_main_default(m)) {
            gateways.extend(route_gateway(msg));
            links.extend(route_oif(msg));
        }
        let mut addrs = gateways;
        let mut all = self.handle.address().get().execute();
        while let Some(msg) = all
            .try_next()
            .await
            .map_err(netlink("listing the node's addresses"))?
        {
            if links.contains(&msg.header.index)
                && let Some(net) = address_net(&msg)
            {
                addrs.push(net.addr());
            }
        }
        addrs.sort();
        addrs.dedup();
        Ok(addrs)
    }

    /// Removes our routes (protocol [`ROUTE_PROTOCOL`]) via the interface or in `table` (when
    /// it is a dedicated one), our guard and throw routes in `table` and the main table, our
    /// rules and any rule identical to one of `rules`, then the interface.
    pub async fn cleanup(
        &self,
        interface: &str,
        table: u32,
        rules: &[RuleConfig],
    ) -> Result<(), RoutingError> {
        let table = normalize_table(table);
        let link = self.link_by_name(interface).await?;
        let ifindex = link.as_ref().map(|l| l.header.index);
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            for msg in self.dump_routes(family, interface).await? {
                let via_interface = ifindex.is_some() && route_oif(&msg) == ifindex;
                let protocol = u8::from(msg.header.protocol);
                if cleaned_up(protocol, via_interface, route_table(&msg), table)
                    && let Some(dst) = route_dst(&msg)
                {
                    let observed = ObservedRoute {
                        dst,
                        table: route_table(&msg),
                        protocol: ROUTE_PROTOCOL,
                    };
                    match self.delete_route(&msg, &observed).await {
                        Err(e) if is_errno(&e, libc::ESRCH) => {}
                        other => other?,
                    }
                }
            }
        }
        for (observed, msg) in specials_in(&self.snapshot().await?) {
            // CNI mode keeps its guards in the main table, add-on mode in its own.
            if observed.table == table || observed.table == MAIN_TABLE {
                match self.delete_special(&msg, &observed).await {
                    Err(e) if is_errno(&e, libc::ESRCH) => {}
                    other => other?,
                }
            }
        }
        for (observed, msg) in self.rules().await? {
            let identical = rules.iter().any(|r| observed.matches(observed.family, r));
            if observed.protocol == ROUTE_PROTOCOL || identical {
                self.delete_rule(&msg).await?;
            }
        }
        // Only a link the device makes (WireGuard, or the userspace device's TUN) is ours to
        // delete: a mesh whose interface is named after a host link (`eth0`, `cni0`) must
        // never take that link down when it leaves, nor another tool's tunnel that the device
        // refused to take (ours carry the alias; a TUN nobody holds open is a leftover).
        let ours = link.as_ref().is_some_and(|l| match link_kind(l) {
            Some(InfoKind::Tun) => wgmesh_device::kernel::tun_is_ours(l),
            Some(InfoKind::Wireguard) => {
                wgmesh_device::kernel::link_alias(l) == Some(wgmesh_device::kernel::LINK_ALIAS)
            }
            _ => false,
        });
        if !ours && ifindex.is_some() {
            tracing::warn!(
                interface,
                "not deleting the link: it is not a TUN device or a WireGuard link marked as wgmesh's (alias \"wgmesh\")"
            );
        }
        if let Some(index) = ifindex.filter(|_| ours) {
            match self
                .handle
                .link()
                .del(index)
                .execute()
                .await
                .map_err(netlink(format!("deleting the link {interface}")))
            {
                Err(e) if is_errno(&e, libc::ENODEV) => {}
                other => other?,
            }
        }
        Ok(())
    }

    /// Deletes the bridge `name` (CNI mode's, made by the bridge plugin our configuration
    /// named) if no interface is attached to it any more. Returns whether it was deleted;
    /// a bridge pods still use is kept.
    pub async fn remove_bridge_if_unused(&self, name: &str) -> Result<bool, RoutingError> {
        let Some(bridge) = self.link_by_name(name).await? else {
            return Ok(false);
        };
        let index = bridge.header.index;
        let mut links = self.handle.link().get().execute();
        while let Some(link) = links.next().await {
            let link = link.map_err(netlink("listing links".to_owned()))?;
            if link
                .attributes
                .iter()
                .any(|a| matches!(a, LinkAttribute::Controller(c) if *c == index))
            {
                return Ok(false);
            }
        }
        match self
            .handle
            .link()
            .del(index)
            .execute()
            .await
            .map_err(netlink(format!("deleting the bridge {name}")))
        {
            Err(e) if is_errno(&e, libc::ENODEV) => Ok(false),
            Err(e) => Err(e),
            Ok(()) => Ok(true),
        }
    }

    async fn link_by_name(&self, name: &str) -> Result<Option<LinkMessage>, RoutingError> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute();
        match links.next().await {
            Some(Ok(link)) => Ok(Some(link)),
            Some(Err(e)) => {
                let e = netlink(format!("looking up the link {name}"))(e);
                if is_errno(&e, libc::ENODEV) {
                    Ok(None)
                } else {
                    Err(e)
                }
            }
            None => Ok(None),
        }
    }

    async fn addresses(
        &self,
        ifindex: u32,
        interface: &str,
    ) -> Result<Vec<(IpNet, AddressMessage)>, RoutingError> {
        Ok(self
            .handle
            .address()
            .get()
            .set_link_index_filter(ifindex)
            .execute()
            .try_collect::<Vec<_>>()
            .await
            .map_err(netlink(format!("listing the addresses of {interface}")))?
            .into_iter()
            .filter(|m| m.header.index == ifindex)
            .filter_map(|m| address_net(&m).map(|n| (n, m)))
            .collect())
    }

    /// Adds an address; false if it is already there.
    async fn add_address(
        &self,
        ifindex: u32,
        net: IpNet,
        interface: &str,
    ) -> Result<bool, RoutingError> {
        match self
            .handle
            .address()
            .add(ifindex, net.addr(), net.prefix_len())
            .execute()
            .await
            .map_err(netlink(format!("adding {net} to {interface}")))
        {
            Ok(()) => Ok(true),
            Err(e) if is_errno(&e, libc::EEXIST) => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn links(&self) -> Result<Vec<LinkMessage>, RoutingError> {
        self.handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(netlink("listing links"))
    }

    /// [`Routing::underlay_mtu`] from the default routes in `snapshot`, leaving out the
    /// link `exclude` (the mesh's own). `marked_table`: the table the tunnel's packets are
    /// looked up in ahead of the main table (the mesh's fwmark table), whose default route
    /// is then their way out.
    pub async fn underlay_mtu_in(
        &self,
        snapshot: &RouteSnapshot,
        exclude: Option<u32>,
        marked_table: Option<u32>,
    ) -> Result<u32, RoutingError> {
        let links = self.links().await?;
        let mtu_of = |index: u32| {
            links
                .iter()
                .find(|l| l.header.index == index)
                .and_then(link_mtu)
        };
        let tables = marked_table.into_iter().chain([MAIN_TABLE]);
        for (table, family) in
            tables.flat_map(|t| [(t, AddressFamily::Inet), (t, AddressFamily::Inet6)])
        {
            let default = snapshot
                .routes
                .iter()
                .filter(|m| m.header.address_family == family && is_default_in(m, table))
                .filter_map(|m| route_oif(m).map(|oif| (route_priority(m), oif)))
                .filter(|(_, oif)| Some(*oif) != exclude)
                .min();
            if let Some(mtu) = default.and_then(|(_, oif)| mtu_of(oif)) {
                return Ok(mtu);
            }
        }
        let largest = links
            .iter()
            .filter(|l| {
                let flags = l.header.flags;
                flags.contains(LinkFlags::Up)
                    && !flags.contains(LinkFlags::Loopback)
                    && Some(l.header.index) != exclude
                    && !matches!(link_kind(l), Some(InfoKind::Wireguard | InfoKind::Tun))
            })
            .filter_map(link_mtu)
            .max();
        Ok(largest.unwrap_or(1500))
    }

    async fn dump_routes(
        &self,
        family: AddressFamily,
        what: &str,
    ) -> Result<Vec<RouteMessage>, RoutingError> {
        let mut request = RouteMessage::default();
        request.header.address_family = family;
        self.handle
            .route()
            .get(request)
            .execute()
            .try_collect()
            .await
            .map_err(netlink(format!("listing the routes of {what}")))
    }

    /// Adds a route; false if an identical one appeared meanwhile or another interface
    /// already holds this destination (logged, not an error: that route is not ours).
    async fn add_route(
        &self,
        dst: IpNet,
        ifindex: u32,
        table: u32,
        interface: &str,
    ) -> Result<bool, RoutingError> {
        let scope = if dst.addr().is_ipv4() {
            RouteScope::Link
        } else {
            RouteScope::Universe
        };
        let msg = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(dst.addr(), dst.prefix_len())
            .map_err(|e| RoutingError::Invalid(format!("route to {dst}: {e}")))?
            .output_interface(ifindex)
            .table_id(table)
            .protocol(RouteProtocol::from(ROUTE_PROTOCOL))
            .scope(scope)
            .build();
        let res = self
            .handle
            .route()
            .add(msg)
            .execute()
            .await
            .map_err(netlink(format!(
                "adding the route {dst} dev {interface} table {table}"
            )));
        match res {
            Ok(()) => Ok(true),
            Err(e) if is_errno(&e, libc::EEXIST) => {
                tracing::warn!(
                    route = %dst, table, interface,
                    "a route to this destination already exists in this table, not via the mesh interface; leaving it"
                );
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    async fn add_special(
        &self,
        dst: IpNet,
        kind: SpecialKind,
        table: u32,
    ) -> Result<(), RoutingError> {
        let (kind, metric) = match kind {
            SpecialKind::Blackhole => (RouteType::BlackHole, GUARD_METRIC),
            SpecialKind::Throw => (RouteType::Throw, 0),
        };
        let msg = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(dst.addr(), dst.prefix_len())
            .map_err(|e| RoutingError::Invalid(format!("route to {dst}: {e}")))?
            .kind(kind)
            .table_id(table)
            .priority(metric)
            .protocol(RouteProtocol::from(ROUTE_PROTOCOL))
            .scope(RouteScope::Universe)
            .build();
        match self
            .handle
            .route()
            .add(msg)
            .execute()
            .await
            .map_err(netlink(format!(
                "adding the {kind:?} route {dst} table {table}"
            ))) {
            Err(e) if is_errno(&e, libc::EEXIST) => Ok(()),
            other => other,
        }
    }

    async fn delete_special(
        &self,
        msg: &RouteMessage,
        observed: &ObservedSpecial,
    ) -> Result<(), RoutingError> {
        let mut del = RouteMessage::default();
        del.header = msg.header.clone();
        del.attributes = msg
            .attributes
            .iter()
            .filter(|a| {
                matches!(
                    a,
                    RouteAttribute::Destination(_)
                        | RouteAttribute::Table(_)
                        | RouteAttribute::Priority(_)
                )
            })
            .cloned()
            .collect();
        self.handle
            .route()
            .del(del)
            .execute()
            .await
            .map_err(netlink(format!(
                "deleting the {:?} route {} table {}",
                observed.kind, observed.dst, observed.table
            )))
    }

    async fn delete_route(
        &self,
        msg: &RouteMessage,
        observed: &ObservedRoute,
    ) -> Result<(), RoutingError> {
        let mut del = RouteMessage::default();
        del.header = msg.header.clone();
        del.attributes = msg
            .attributes
            .iter()
            .filter(|a| {
                matches!(
                    a,
                    RouteAttribute::Destination(_)
                        | RouteAttribute::Table(_)
                        | RouteAttribute::Oif(_)
                        | RouteAttribute::Priority(_)
                )
            })
            .cloned()
            .collect();
        self.handle
            .route()
            .del(del)
            .execute()
            .await
            .map_err(netlink(format!(
                "deleting the route {} table {}",
                observed.dst, observed.table
            )))
    }

    async fn rules(&self) -> Result<Vec<(ObservedRule, RuleMessage)>, RoutingError> {
        let mut out = Vec::new();
        for version in [IpVersion::V4, IpVersion::V6] {
            let msgs: Vec<RuleMessage> = self
                .handle
                .rule()
                .get(version)
                .execute()
                .try_collect()
                .await
                .map_err(netlink("listing the policy rules"))?;
            out.extend(
                msgs.into_iter()
                    .filter_map(|m| observed_rule(&m).map(|r| (r, m))),
            );
        }
        Ok(out)
    }

    async fn add_rule(&self, rule: &RuleConfig, family: Family) -> Result<(), RoutingError> {
        let mut request = self
            .handle
            .rule()
            .add()
            .priority(rule.priority)
            .table_id(normalize_table(rule.table))
            .action(RuleAction::ToTable);
        if rule.fwmark != 0 {
            request = request.fw_mark(rule.fwmark);
        }
        let describe = format!(
            "adding the rule {}fwmark {:#x} lookup {} priority {}",
            if rule.invert { "not " } else { "" },
            rule.fwmark,
            rule.table,
            rule.priority
        );
        let finish = |m: &mut RuleMessage| {
            if rule.invert {
                m.header.flags |= RuleFlags::Invert;
            }
            m.attributes
                .push(RuleAttribute::Protocol(RouteProtocol::from(ROUTE_PROTOCOL)));
        };
        match family {
            Family::V4 => {
                let mut r = request.v4();
                finish(r.message_mut());
                r.execute().await
            }
            Family::V6 => {
                let mut r = request.v6();
                finish(r.message_mut());
                r.execute().await
            }
        }
        .map_err(netlink(describe))
    }

    async fn delete_rule(&self, msg: &RuleMessage) -> Result<(), RoutingError> {
        match self
            .handle
            .rule()
            .del(msg.clone())
            .execute()
            .await
            .map_err(netlink("deleting a policy rule"))
        {
            Err(e) if is_errno(&e, libc::ENOENT) => Ok(()),
            other => other,
        }
    }
}

/// Unicast routes via the interface, in every table.
fn routes_via_in(snapshot: &RouteSnapshot, ifindex: u32) -> Vec<(ObservedRoute, RouteMessage)> {
    snapshot
        .routes
        .iter()
        .filter(|m| m.header.kind == RouteType::Unicast && route_oif(m) == Some(ifindex))
        .filter_map(|m| {
            let observed = ObservedRoute {
                dst: route_dst(m)?,
                table: route_table(m),
                protocol: u8::from(m.header.protocol),
            };
            Some((observed, m.clone()))
        })
        .collect()
}

/// Our blackhole and throw routes, in every table.
fn specials_in(snapshot: &RouteSnapshot) -> Vec<(ObservedSpecial, RouteMessage)> {
    snapshot
        .routes
        .iter()
        .filter(|m| m.header.protocol == RouteProtocol::from(ROUTE_PROTOCOL))
        .filter_map(|m| {
            let kind = match m.header.kind {
                RouteType::BlackHole => SpecialKind::Blackhole,
                RouteType::Throw => SpecialKind::Throw,
                _ => return None,
            };
            let observed = ObservedSpecial {
                dst: route_dst(m)?,
                table: route_table(m),
                kind,
                metric: route_priority(m),
            };
            Some((observed, m.clone()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The agent spawns these on a multi-threaded runtime: they must be `Send`.
    #[allow(dead_code)]
    fn futures_are_send(routing: &Routing, cfg: &RoutingConfig) {
        fn is_send<T: Send>(_: T) {}
        is_send(Routing::new());
        is_send(routing.sync(cfg));
        is_send(routing.underlay_mtu());
        is_send(routing.cleanup("wgmesh0", 0, &[]));
    }
}
