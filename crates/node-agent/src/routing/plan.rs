//! The pure half of routing: what the mesh interface's addresses, routes and rules should be,
//! and the changes that get the kernel there from what it reports.

use std::collections::HashSet;
use std::net::IpAddr;

use ipnet::IpNet;

/// `rtm_protocol` (and `FRA_PROTOCOL`) of the routes and rules we create: "wgmesh". Routes
/// and rules with another protocol are never modified or deleted.
pub const ROUTE_PROTOCOL: u8 = 0x57;

/// The main routing table.
pub const MAIN_TABLE: u32 = 254;

/// Bytes WireGuard adds to a packet in the worst case (IPv6 outer header): 40 + 8 + 32.
pub const WIREGUARD_OVERHEAD: u32 = 80;

/// The smallest MTU we configure automatically (the IPv6 minimum).
pub const MIN_AUTO_MTU: u32 = 1280;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutingConfig {
    pub interface: String,
    /// Addresses of the interface, such as `10.250.0.3/16`.
    pub addresses: Vec<IpNet>,
    /// `None`: the underlay MTU minus [`WIREGUARD_OVERHEAD`] (at least [`MIN_AUTO_MTU`]).
    pub mtu: Option<u32>,
    /// Every peer's allowed IPs, routed via the interface.
    pub routes: Vec<IpNet>,
    /// 0 or 254: the main table; anything else is a dedicated table.
    pub table: u32,
    pub rules: Vec<RuleConfig>,
    /// Fail-closed fallbacks in `table`: a `blackhole` route (metric [`GUARD_METRIC`], behind
    /// the routes via the interface) per protected network. They do not depend on the
    /// interface, so whatever happens to it (the agent stopped or crashed, a peer not
    /// programmed yet) traffic for the mesh is dropped there, never routed elsewhere in
    /// plaintext. Empty when the mesh allows plaintext fallback.
    pub guards: Vec<IpNet>,
    /// Networks that stay local although a guard covers them (the node's own pod CIDRs inside
    /// the cluster's): a `throw` route in a dedicated table, so their lookup goes on to the
    /// main table. Unused with the main table, where the local routes are more specific.
    pub local: Vec<IpNet>,
}

impl RoutingConfig {
    /// The table the rule `fwmark M lookup T` sends the tunnel's own packets to, ahead of
    /// the main table, if there is such a rule.
    pub fn marked_packets_table(&self) -> Option<u32> {
        self.rules
            .iter()
            .find(|r| r.fwmark != 0 && !r.invert)
            .map(|r| r.table)
    }
}

/// A policy rule: `[not] fwmark M lookup T` at priority P, or `lookup T` when the mark is 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleConfig {
    pub priority: u32,
    /// 0: every packet (no fwmark selector).
    pub fwmark: u32,
    pub table: u32,
    /// `not fwmark M lookup T` when true, `fwmark M lookup T` when false.
    pub invert: bool,
}

/// The metric of the guard routes: far behind any route via the interface (metric 0), so
/// they only matter once that route is gone.
pub const GUARD_METRIC: u32 = 1_000_000;

/// The kinds of route we use besides unicast via the interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SpecialKind {
    /// Drops the packet: the fail-closed fallback.
    Blackhole,
    /// Ends the lookup in this table, so the next rule's table decides.
    Throw,
}

/// One of our special routes, as the kernel reports it (protocol [`ROUTE_PROTOCOL`] only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedSpecial {
    pub dst: IpNet,
    pub table: u32,
    pub kind: SpecialKind,
    pub metric: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecialPlan {
    pub add: Vec<(IpNet, SpecialKind)>,
    /// Indices into the observed special routes.
    pub delete: Vec<usize>,
}

/// The wanted special routes of `cfg`: its guards, and its local exceptions when the table is
/// a dedicated one. Host bits masked, duplicates dropped.
pub fn wanted_specials(cfg: &RoutingConfig) -> Vec<(IpNet, SpecialKind)> {
    let mut wanted: Vec<(IpNet, SpecialKind)> = cfg
        .guards
        .iter()
        .map(|n| (n.trunc(), SpecialKind::Blackhole))
        .collect();
    if normalize_table(cfg.table) != MAIN_TABLE && !cfg.guards.is_empty() {
        wanted.extend(cfg.local.iter().map(|n| (n.trunc(), SpecialKind::Throw)));
    }
    wanted.sort();
    wanted.dedup();
    wanted
}

/// Keeps each wanted special route that exists in `table` (kind and metric alike), adds the
/// missing ones, and deletes every other one of ours (another table, kind, metric, or no
/// longer wanted).
pub fn plan_specials(
    observed: &[ObservedSpecial],
    wanted: &[(IpNet, SpecialKind)],
    table: u32,
) -> SpecialPlan {
    let table = normalize_table(table);
    let want: HashSet<(IpNet, SpecialKind)> = wanted.iter().copied().collect();
    let mut present: HashSet<(IpNet, SpecialKind)> = HashSet::new();
    let mut plan = SpecialPlan::default();
    for (i, r) in observed.iter().enumerate() {
        let key = (r.dst, r.kind);
        let metric = match r.kind {
            SpecialKind::Blackhole => GUARD_METRIC,
            SpecialKind::Throw => 0,
        };
        if r.table == table && r.metric == metric && want.contains(&key) && present.insert(key) {
            continue;
        }
        plan.delete.push(i);
    }
    plan.add = wanted
        .iter()
        .copied()
        .filter(|k| !present.contains(k))
        .collect();
    plan
}

/// Splits `nets` into those that may be routed into the mesh (or guarded) and those that
/// contain an address the node must keep reaching over the underlay (its own underlay
/// addresses, its gateways, the API server, the controller): whatever a peer or a mesh
/// claims, those are never taken into the tunnel or blackholed.
pub fn sparing(nets: &[IpNet], keep_reachable: &[IpAddr]) -> (Vec<IpNet>, Vec<IpNet>) {
    nets.iter()
        .partition(|n| !keep_reachable.iter().any(|a| n.contains(a)))
}

/// What to change on the interface's link: bring it up, and set its MTU when it differs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkPlan {
    pub set_up: bool,
    pub mtu: Option<u32>,
}

/// The link plan for a link that is `up` with `mtu` (unknown: `None`), wanted at `want_mtu`.
pub fn plan_link(up: bool, mtu: Option<u32>, want_mtu: u32) -> LinkPlan {
    LinkPlan {
        set_up: !up,
        mtu: (mtu != Some(want_mtu)).then_some(want_mtu),
    }
}

/// Whether a cleanup removes this unicast route: only ours (protocol [`ROUTE_PROTOCOL`]),
/// via the interface (any table), or anywhere in the dedicated `table` (the interface may be
/// gone already).
pub fn cleaned_up(protocol: u8, via_interface: bool, route_table: u32, table: u32) -> bool {
    let table = normalize_table(table);
    protocol == ROUTE_PROTOCOL && (via_interface || (table != MAIN_TABLE && route_table == table))
}

/// What a sync changed, for logs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteChanges {
    pub link_set_up: bool,
    /// The new MTU, when it changed.
    pub mtu: Option<u32>,
    pub addresses_added: usize,
    pub addresses_removed: usize,
    pub routes_added: usize,
    pub routes_removed: usize,
    pub rules_added: usize,
    pub rules_removed: usize,
    pub guards_added: usize,
    pub guards_removed: usize,
    /// Changes the kernel refused besides the guards and rules (an address, a route, the
    /// link's state): what they would have carried is dropped by the guards meanwhile.
    pub refused: Vec<String>,
}

impl RouteChanges {
    /// Whether nothing changed (refusals are no change).
    pub fn is_empty(&self) -> bool {
        RouteChanges {
            refused: Vec::new(),
            ..self.clone()
        } == RouteChanges::default()
    }
}

/// 0 and 254 both mean the main table.
pub fn normalize_table(table: u32) -> u32 {
    if table == 0 { MAIN_TABLE } else { table }
}

/// A unicast route via the mesh interface, as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedRoute {
    pub dst: IpNet,
    pub table: u32,
    pub protocol: u8,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoutePlan {
    /// Destinations to route via the interface in the wanted table.
    pub add: Vec<IpNet>,
    /// Indices into the observed routes.
    pub delete: Vec<usize>,
}

/// Given the unicast routes via the interface (all tables, all protocols) and the wanted
/// destinations: add each wanted destination (host bits masked, duplicates dropped) that has
/// no route in `table` yet, whoever created it; delete our routes (protocol
/// [`ROUTE_PROTOCOL`]) that are not wanted, are in another table, or duplicate one kept.
pub fn plan_routes(observed: &[ObservedRoute], wanted: &[IpNet], table: u32) -> RoutePlan {
    let table = normalize_table(table);
    let mut wanted_set: Vec<IpNet> = wanted.iter().map(IpNet::trunc).collect();
    wanted_set.sort();
    wanted_set.dedup();
    let wanted_lookup: HashSet<IpNet> = wanted_set.iter().copied().collect();

    let mut present: HashSet<IpNet> = HashSet::new();
    let mut plan = RoutePlan::default();
    // Others' routes first, so that a duplicate of ours is the one deleted.
    let mut order: Vec<usize> = (0..observed.len()).collect();
    order.sort_by_key(|&i| observed[i].protocol == ROUTE_PROTOCOL);
    for i in order {
        let r = &observed[i];
        let ours = r.protocol == ROUTE_PROTOCOL;
        let in_table = r.table == table;
        if in_table && wanted_lookup.contains(&r.dst) && present.insert(r.dst) {
            continue;
        }
        if ours {
            plan.delete.push(i);
        }
    }
    plan.delete.sort_unstable();
    plan.add = wanted_set
        .into_iter()
        .filter(|d| !present.contains(d))
        .collect();
    plan
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AddressPlan {
    pub add: Vec<IpNet>,
    /// Indices into the observed addresses.
    pub delete: Vec<usize>,
}

/// The interface is ours: every address on it that is not wanted goes, except IPv6
/// link-local addresses (`fe80::/10`, which the kernel manages).
pub fn plan_addresses(observed: &[IpNet], wanted: &[IpNet]) -> AddressPlan {
    let mut wanted_set: Vec<IpNet> = wanted.to_vec();
    wanted_set.sort();
    wanted_set.dedup();
    let observed_set: HashSet<IpNet> = observed.iter().copied().collect();
    let delete = observed
        .iter()
        .enumerate()
        .filter(|(_, a)| !wanted_set.contains(a) && !is_link_local_v6(a))
        .map(|(i, _)| i)
        .collect();
    let add = wanted_set
        .into_iter()
        .filter(|a| !observed_set.contains(a))
        .collect();
    AddressPlan { add, delete }
}

fn is_link_local_v6(net: &IpNet) -> bool {
    matches!(net.addr(), IpAddr::V6(a) if (a.segments()[0] & 0xffc0) == 0xfe80)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn of(net: &IpNet) -> Family {
        match net {
            IpNet::V4(_) => Family::V4,
            IpNet::V6(_) => Family::V6,
        }
    }
}

/// A policy rule as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedRule {
    pub family: Family,
    pub priority: u32,
    /// 0 when the rule has no fwmark.
    pub fwmark: u32,
    pub table: u32,
    pub invert: bool,
    /// Whether the action is "lookup table".
    pub to_table: bool,
    pub protocol: u8,
    /// Whether the rule selects by something besides the mark too (addresses, interfaces,
    /// ports): then it is not ours, whatever its table.
    pub other_selectors: bool,
}

impl ObservedRule {
    /// Whether this kernel rule is exactly the wanted rule `cfg` for `family`.
    pub(super) fn matches(&self, family: Family, cfg: &RuleConfig) -> bool {
        self.family == family
            && self.to_table
            && self.priority == cfg.priority
            && self.fwmark == cfg.fwmark
            && self.table == normalize_table(cfg.table)
            && self.invert == cfg.invert
            && !self.other_selectors
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RulePlan {
    /// Rules to add: (index into the wanted rules, family).
    pub add: Vec<(usize, Family)>,
    /// Indices into the observed rules.
    pub delete: Vec<usize>,
}

/// Each wanted rule must exist exactly once in each of `families`; our other rules go (a
/// changed rule, duplicates, a family no longer used, or every one of ours when nothing is
/// wanted). An identical rule someone else created counts as present and is never deleted.
pub fn plan_rules(
    observed: &[ObservedRule],
    wanted: &[RuleConfig],
    families: &[Family],
) -> RulePlan {
    let mut plan = RulePlan::default();
    let mut kept: HashSet<(usize, Family)> = HashSet::new();
    let mut order: Vec<usize> = (0..observed.len()).collect();
    order.sort_by_key(|&i| observed[i].protocol == ROUTE_PROTOCOL);
    for i in order {
        let r = &observed[i];
        let slot = if families.contains(&r.family) {
            (0..wanted.len())
                .find(|&w| r.matches(r.family, &wanted[w]) && !kept.contains(&(w, r.family)))
        } else {
            None
        };
        if let Some(w) = slot {
            kept.insert((w, r.family));
            continue;
        }
        if r.protocol == ROUTE_PROTOCOL {
            plan.delete.push(i);
        }
    }
    plan.delete.sort_unstable();
    let mut fams: Vec<Family> = families.to_vec();
    fams.sort();
    fams.dedup();
    for w in 0..wanted.len() {
        for &f in &fams {
            if !kept.contains(&(w, f)) {
                plan.add.push((w, f));
            }
        }
    }
    plan
}

/// The address families the rule is needed in: those of the routes, addresses and guards
/// (a guard no rule leads to guards nothing), IPv4 when there are none.
pub fn rule_families(cfg: &RoutingConfig) -> Vec<Family> {
    let mut fams: Vec<Family> = cfg
        .routes
        .iter()
        .chain(&cfg.addresses)
        .chain(&cfg.guards)
        .chain(&cfg.local)
        .map(Family::of)
        .collect();
    fams.sort();
    fams.dedup();
    if fams.is_empty() {
        fams.push(Family::V4);
    }
    fams
}

/// The MTU to configure when none is given.
pub fn auto_mtu(underlay: u32) -> u32 {
    underlay
        .saturating_sub(WIREGUARD_OVERHEAD)
        .max(MIN_AUTO_MTU)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn route(dst: &str, table: u32, protocol: u8) -> ObservedRoute {
        ObservedRoute {
            dst: net(dst),
            table,
            protocol,
        }
    }

    const OURS: u8 = ROUTE_PROTOCOL;
    const KERNEL: u8 = 2;
    const STATIC: u8 = 4;

    #[test]
    fn plan_routes_table() {
        struct Case {
            name: &'static str,
            observed: Vec<ObservedRoute>,
            wanted: Vec<&'static str>,
            table: u32,
            add: Vec<&'static str>,
            delete: Vec<usize>,
        }
        let cases = vec![
            Case {
                name: "empty",
                observed: vec![],
                wanted: vec![],
                table: 0,
                add: vec![],
                delete: vec![],
            },
            Case {
                name: "all new, host bits masked, duplicates dropped",
                observed: vec![],
                wanted: vec!["10.1.0.0/24", "10.2.0.7/16", "10.1.0.0/24", "fd00::1/64"],
                table: 0,
                add: vec!["10.1.0.0/24", "10.2.0.0/16", "fd00::/64"],
                delete: vec![],
            },
            Case {
                name: "in sync",
                observed: vec![
                    route("10.1.0.0/24", 254, OURS),
                    route("fd00::/64", 254, OURS),
                ],
                wanted: vec!["10.1.0.0/24", "fd00::/64"],
                table: 254,
                add: vec![],
                delete: vec![],
            },
            Case {
                name: "one removed, one added, others' routes untouched",
                observed: vec![
                    route("10.1.0.0/24", 254, OURS),
                    route("10.2.0.0/24", 254, OURS),
                    route("10.9.0.0/24", 254, STATIC),
                    route("10.250.0.0/16", 254, KERNEL),
                ],
                wanted: vec!["10.1.0.0/24", "10.3.0.0/24"],
                table: 0,
                add: vec!["10.3.0.0/24"],
                delete: vec![1],
            },
            Case {
                name: "someone else's route to a wanted destination counts as present",
                observed: vec![route("10.250.0.0/16", 254, KERNEL)],
                wanted: vec!["10.250.0.0/16"],
                table: 254,
                add: vec![],
                delete: vec![],
            },
            Case {
                name: "ours duplicating someone else's is deleted",
                observed: vec![
                    route("10.250.0.0/16", 254, OURS),
                    route("10.250.0.0/16", 254, KERNEL),
                ],
                wanted: vec!["10.250.0.0/16"],
                table: 254,
                add: vec![],
                delete: vec![0],
            },
            Case {
                name: "table changed: ours in the old table go, the new table is filled",
                observed: vec![
                    route("10.1.0.0/24", 254, OURS),
                    route("10.1.0.0/24", 51820, OURS),
                    route("10.5.0.0/24", 100, STATIC),
                ],
                wanted: vec!["10.1.0.0/24", "10.2.0.0/24"],
                table: 51820,
                add: vec!["10.2.0.0/24"],
                delete: vec![0],
            },
            Case {
                name: "nothing wanted: all of ours go",
                observed: vec![
                    route("10.1.0.0/24", 254, OURS),
                    route("10.9.0.0/24", 254, STATIC),
                    route("fd00::/64", 7, OURS),
                ],
                wanted: vec![],
                table: 0,
                add: vec![],
                delete: vec![0, 2],
            },
        ];
        for case in cases {
            let wanted: Vec<IpNet> = case.wanted.iter().map(|s| net(s)).collect();
            let plan = plan_routes(&case.observed, &wanted, case.table);
            let add: Vec<IpNet> = case.add.iter().map(|s| net(s)).collect();
            assert_eq!(plan.add, add, "case {:?}: add", case.name);
            assert_eq!(plan.delete, case.delete, "case {:?}: delete", case.name);
        }
    }

    #[test]
    fn plan_addresses_table() {
        /// Name, observed, wanted, to add, to delete.
        type Case = (
            &'static str,
            Vec<&'static str>,
            Vec<&'static str>,
            Vec<&'static str>,
            Vec<usize>,
        );
        let cases: Vec<Case> = vec![
            ("empty", vec![], vec![], vec![], vec![]),
            (
                "new",
                vec![],
                vec!["10.250.0.3/16", "fd00::3/64"],
                vec!["10.250.0.3/16", "fd00::3/64"],
                vec![],
            ),
            (
                "in sync, link-local kept",
                vec!["10.250.0.3/16", "fe80::1/64"],
                vec!["10.250.0.3/16"],
                vec![],
                vec![],
            ),
            (
                "prefix changed: the old one goes",
                vec!["10.250.0.3/24", "10.9.9.9/32"],
                vec!["10.250.0.3/16"],
                vec!["10.250.0.3/16"],
                vec![0, 1],
            ),
        ];
        for (name, observed, wanted, add, delete) in cases {
            let observed: Vec<IpNet> = observed.iter().map(|s| net(s)).collect();
            let wanted: Vec<IpNet> = wanted.iter().map(|s| net(s)).collect();
            let plan = plan_addresses(&observed, &wanted);
            let add: Vec<IpNet> = add.iter().map(|s| net(s)).collect();
            assert_eq!(plan.add, add, "case {name:?}");
            assert_eq!(plan.delete, delete, "case {name:?}");
        }
    }

    fn rule(family: Family, priority: u32, protocol: u8) -> ObservedRule {
        ObservedRule {
            family,
            priority,
            fwmark: 0x51820,
            table: 51820,
            invert: true,
            to_table: true,
            protocol,
            other_selectors: false,
        }
    }

    #[test]
    fn plan_rules_table() {
        let cfg = RuleConfig {
            priority: 100,
            fwmark: 0x51820,
            table: 51820,
            invert: true,
        };
        let main_rule = ObservedRule {
            family: Family::V4,
            priority: 32766,
            fwmark: 0,
            table: 254,
            invert: false,
            to_table: true,
            protocol: 0,
            other_selectors: false,
        };
        struct Case {
            name: &'static str,
            observed: Vec<ObservedRule>,
            wanted: Vec<RuleConfig>,
            families: Vec<Family>,
            add: Vec<(usize, Family)>,
            delete: Vec<usize>,
        }
        let cases = vec![
            Case {
                name: "missing",
                observed: vec![main_rule.clone()],
                wanted: vec![cfg.clone()],
                families: vec![Family::V4, Family::V6],
                add: vec![(0, Family::V4), (0, Family::V6)],
                delete: vec![],
            },
            Case {
                name: "present once",
                observed: vec![main_rule.clone(), rule(Family::V4, 100, OURS)],
                wanted: vec![cfg.clone()],
                families: vec![Family::V4],
                add: vec![],
                delete: vec![],
            },
            Case {
                name: "duplicates of ours go",
                observed: vec![rule(Family::V4, 100, OURS), rule(Family::V4, 100, OURS)],
                wanted: vec![cfg.clone()],
                families: vec![Family::V4],
                add: vec![],
                delete: vec![1],
            },
            Case {
                name: "an identical rule of someone else's counts, ours duplicating it goes",
                observed: vec![rule(Family::V4, 100, OURS), rule(Family::V4, 100, 0)],
                wanted: vec![cfg.clone()],
                families: vec![Family::V4],
                add: vec![],
                delete: vec![0],
            },
            Case {
                name: "priority changed",
                observed: vec![rule(Family::V4, 99, OURS)],
                wanted: vec![cfg.clone()],
                families: vec![Family::V4],
                add: vec![(0, Family::V4)],
                delete: vec![0],
            },
            Case {
                name: "inversion changed",
                observed: vec![ObservedRule {
                    invert: false,
                    ..rule(Family::V4, 100, OURS)
                }],
                wanted: vec![cfg.clone()],
                families: vec![Family::V4],
                add: vec![(0, Family::V4)],
                delete: vec![0],
            },
            Case {
                name: "ours with another selector is another rule",
                observed: vec![ObservedRule {
                    other_selectors: true,
                    ..rule(Family::V4, 100, OURS)
                }],
                wanted: vec![cfg.clone()],
                families: vec![Family::V4],
                add: vec![(0, Family::V4)],
                delete: vec![0],
            },
            Case {
                name: "someone else's rule with a selector is not ours, and stays",
                observed: vec![ObservedRule {
                    other_selectors: true,
                    ..rule(Family::V4, 100, 0)
                }],
                wanted: vec![cfg.clone()],
                families: vec![Family::V4],
                add: vec![(0, Family::V4)],
                delete: vec![],
            },
            Case {
                name: "family no longer used",
                observed: vec![rule(Family::V4, 100, OURS), rule(Family::V6, 100, OURS)],
                wanted: vec![cfg.clone()],
                families: vec![Family::V4],
                add: vec![],
                delete: vec![1],
            },
            Case {
                name: "no rule wanted: ours go, others stay",
                observed: vec![
                    main_rule.clone(),
                    rule(Family::V4, 100, OURS),
                    rule(Family::V6, 100, 0),
                ],
                wanted: vec![],
                families: vec![Family::V4, Family::V6],
                add: vec![],
                delete: vec![1],
            },
        ];
        for case in cases {
            let plan = plan_rules(&case.observed, &case.wanted, &case.families);
            assert_eq!(plan.add, case.add, "case {:?}: add", case.name);
            assert_eq!(plan.delete, case.delete, "case {:?}: delete", case.name);
        }
    }

    #[test]
    fn families_and_mtu() {
        let mut cfg = RoutingConfig {
            interface: "wgmesh0".into(),
            addresses: vec![],
            mtu: None,
            routes: vec![],
            table: 0,
            rules: vec![],
            guards: vec![],
            local: vec![],
        };
        assert_eq!(rule_families(&cfg), vec![Family::V4]);
        cfg.routes = vec![net("fd00::/64")];
        assert_eq!(rule_families(&cfg), vec![Family::V6]);
        cfg.addresses = vec![net("10.0.0.1/16")];
        assert_eq!(rule_families(&cfg), vec![Family::V4, Family::V6]);
        // An IPv4 mesh guarding an IPv6 cluster range before any IPv6 route exists.
        cfg.routes = vec![];
        cfg.guards = vec![net("fd10::/48")];
        assert_eq!(rule_families(&cfg), vec![Family::V4, Family::V6]);
        assert_eq!(auto_mtu(1500), 1420);
        assert_eq!(auto_mtu(9000), 8920);
        assert_eq!(auto_mtu(1300), MIN_AUTO_MTU);
        assert_eq!(normalize_table(0), 254);
        assert_eq!(normalize_table(7), 7);
    }

    fn special(dst: &str, table: u32, kind: SpecialKind, metric: u32) -> ObservedSpecial {
        ObservedSpecial {
            dst: net(dst),
            table,
            kind,
            metric,
        }
    }

    #[test]
    fn plan_specials_table() {
        use SpecialKind::{Blackhole as B, Throw as T};
        const G: u32 = GUARD_METRIC;
        // name, observed, wanted, table, add, delete
        type Case = (
            &'static str,
            Vec<ObservedSpecial>,
            Vec<(&'static str, SpecialKind)>,
            u32,
            Vec<(&'static str, SpecialKind)>,
            Vec<usize>,
        );
        let cases: Vec<Case> = vec![
            ("nothing", vec![], vec![], 254, vec![], vec![]),
            (
                "all new",
                vec![],
                vec![("10.244.0.0/16", B), ("10.244.1.0/24", T)],
                51820,
                vec![("10.244.0.0/16", B), ("10.244.1.0/24", T)],
                vec![],
            ),
            (
                "in sync",
                vec![
                    special("10.244.0.0/16", 51820, B, G),
                    special("10.244.1.0/24", 51820, T, 0),
                ],
                vec![("10.244.0.0/16", B), ("10.244.1.0/24", T)],
                51820,
                vec![],
                vec![],
            ),
            (
                "a removed peer's guard goes, a new one comes",
                vec![
                    special("10.244.2.0/24", 254, B, G),
                    special("10.244.3.0/24", 254, B, G),
                ],
                vec![("10.244.3.0/24", B), ("10.244.4.0/24", B)],
                0,
                vec![("10.244.4.0/24", B)],
                vec![0],
            ),
            (
                "another table, metric or kind is replaced; duplicates go",
                vec![
                    special("10.244.2.0/24", 51820, B, G),
                    special("10.244.3.0/24", 254, B, 5),
                    special("10.244.4.0/24", 254, T, 0),
                    special("10.244.5.0/24", 254, B, G),
                    special("10.244.5.0/24", 254, B, G),
                ],
                vec![
                    ("10.244.2.0/24", B),
                    ("10.244.3.0/24", B),
                    ("10.244.4.0/24", B),
                    ("10.244.5.0/24", B),
                ],
                254,
                vec![
                    ("10.244.2.0/24", B),
                    ("10.244.3.0/24", B),
                    ("10.244.4.0/24", B),
                ],
                vec![0, 1, 2, 4],
            ),
        ];
        for (name, observed, wanted, table, add, delete) in cases {
            let wanted: Vec<(IpNet, SpecialKind)> =
                wanted.into_iter().map(|(n, k)| (net(n), k)).collect();
            let plan = plan_specials(&observed, &wanted, table);
            let add: Vec<(IpNet, SpecialKind)> =
                add.into_iter().map(|(n, k)| (net(n), k)).collect();
            assert_eq!(plan, SpecialPlan { add, delete }, "{name}");
        }
    }

    #[test]
    fn wanted_specials_per_table() {
        let cfg = |table: u32, guards: &[&str], local: &[&str]| RoutingConfig {
            interface: "wgmesh0".into(),
            addresses: vec![],
            mtu: None,
            routes: vec![],
            table,
            rules: vec![],
            guards: guards.iter().map(|g| net(g)).collect(),
            local: local.iter().map(|l| net(l)).collect(),
        };
        use SpecialKind::{Blackhole as B, Throw as T};
        assert_eq!(
            wanted_specials(&cfg(51820, &["10.244.0.7/16"], &["10.244.1.0/24"])),
            vec![(net("10.244.0.0/16"), B), (net("10.244.1.0/24"), T)],
            "a dedicated table: guards, and throws for what stays local"
        );
        assert_eq!(
            wanted_specials(&cfg(0, &["10.244.0.0/16"], &["10.244.1.0/24"])),
            vec![(net("10.244.0.0/16"), B)],
            "the main table: the local routes are more specific already"
        );
        assert_eq!(
            wanted_specials(&cfg(51820, &[], &["10.244.1.0/24"])),
            vec![],
            "no guards (plaintext fallback allowed): nothing to make an exception to"
        );
    }

    #[test]
    fn sparing_keeps_the_underlay_reachable() {
        let nets: Vec<IpNet> = ["10.244.0.0/16", "192.168.0.0/16", "0.0.0.0/0", "fd00::/64"]
            .iter()
            .map(|n| net(n))
            .collect();
        let keep: Vec<IpAddr> = vec!["192.168.1.10".parse().unwrap(), "fd01::1".parse().unwrap()];
        let (kept, refused) = sparing(&nets, &keep);
        assert_eq!(kept, vec![net("10.244.0.0/16"), net("fd00::/64")]);
        assert_eq!(refused, vec![net("192.168.0.0/16"), net("0.0.0.0/0")]);
        assert_eq!(sparing(&nets, &[]).0, nets, "nothing to spare");
    }

    #[test]
    fn link_and_cleanup_decisions() {
        assert_eq!(plan_link(true, Some(1420), 1420), LinkPlan::default());
        assert_eq!(
            plan_link(false, Some(1500), 1420),
            LinkPlan {
                set_up: true,
                mtu: Some(1420)
            }
        );
        assert_eq!(plan_link(true, None, 1420).mtu, Some(1420), "unknown MTU");
        // protocol, via interface, route's table, cleanup table, removed
        for (protocol, via, rt, table, want) in [
            (OURS, true, 254, 0, true),
            (OURS, false, 254, 0, false),
            (OURS, false, 51820, 51820, true),
            (OURS, false, 254, 51820, false),
            (STATIC, true, 254, 0, false),
            (KERNEL, false, 51820, 51820, false),
        ] {
            assert_eq!(
                cleaned_up(protocol, via, rt, table),
                want,
                "{protocol} {via} {rt} {table}"
            );
        }
    }
}
