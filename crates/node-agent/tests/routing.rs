//! `Routing` against the real kernel, each test in its own network namespace with veth
//! links standing in for the mesh interface and the underlay (this kernel has no `dummy`
//! module). Needs root and `ip`.
//!
//! The test body runs on a thread that joined the namespace (`setns`) before creating its
//! tokio runtime, so the rtnetlink socket opened by `Routing::new` lives there. A `Netns`
//! guard deletes the namespace on drop, also when the test panics.

use ipnet::IpNet;
use wgmesh_agent::routing::{RouteChanges, Routing, RoutingConfig, RuleConfig};

// The namespace helpers are the device crate's: one copy for both crates.
#[path = "../../device/tests/common/mod.rs"]
mod common;

use common::{HeldTun, Netns, NsCmd, is_root};

/// A veth pair `<name>` / `<name>p` in `ns` with this MTU; the peer end up when `peer_up` (so
/// that `<name>` gets a carrier once it is up).
fn veth(ns: &Netns, name: &str, mtu: u32, peer_up: bool) {
    let peer = format!("{name}p");
    let mtu = mtu.to_string();
    ns.ip(&[
        "link", "add", name, "mtu", &mtu, "type", "veth", "peer", "name", &peer, "mtu", &mtu,
    ]);
    if peer_up {
        ns.ip(&["link", "set", &peer, "up"]);
    }
}

fn netns(tag: &str) -> Netns {
    Netns::new(format!("wgrt-{}-{tag}", std::process::id()))
}
fn nets(list: &[&str]) -> Vec<IpNet> {
    list.iter().map(|s| s.parse().unwrap()).collect()
}

#[test]
fn sync_applies_only_the_diff() {
    if !is_root("routing") {
        return;
    }
    let ns = netns("diff");
    veth(&ns, "wgt0", 1500, true);
    let cmd = ns.cmd();
    ns.run(move || async move {
        let ns = cmd;
        let routing = Routing::new().await.unwrap();
        let mut cfg = RoutingConfig {
            interface: "wgt0".into(),
            addresses: nets(&["10.250.0.3/16", "fd00:250::3/64"]),
            mtu: Some(1400),
            routes: nets(&["10.251.1.0/24", "10.251.2.0/24", "fd00:251::/64"]),
            table: 0,
            rules: vec![],
            guards: vec![],
            local: vec![],
        };
        let changes = routing.sync(&cfg).await.unwrap();
        assert_eq!(
            changes,
            RouteChanges {
                link_set_up: true,
                mtu: Some(1400),
                addresses_added: 2,
                routes_added: 3,
                ..RouteChanges::default()
            }
        );
        let link = ns.ip(&["link", "show", "wgt0"]);
        assert!(link.contains("mtu 1400") && link.contains(",UP"), "{link}");
        let addrs = ns.ip(&["addr", "show", "dev", "wgt0"]);
        assert!(addrs.contains("inet 10.250.0.3/16"), "{addrs}");
        assert!(addrs.contains("inet6 fd00:250::3/64"), "{addrs}");
        for (family, dst) in [
            ("-4", "10.251.1.0/24"),
            ("-4", "10.251.2.0/24"),
            ("-6", "fd00:251::/64"),
        ] {
            let found = ns.routes(family, "wgt0", dst);
            assert_eq!(found.len(), 1, "{dst}: {found:?}");
            assert!(found[0].contains("proto 87"), "{dst}: {found:?}");
            assert!(!found[0].contains("table"), "main table: {found:?}");
        }

        // A route via the interface that we did not create.
        ns.ip(&["route", "add", "10.252.0.0/24", "dev", "wgt0"]);

        cfg.routes = nets(&["10.251.1.0/24", "10.251.3.0/24", "fd00:251::/64"]);
        let changes = routing.sync(&cfg).await.unwrap();
        assert_eq!(
            changes,
            RouteChanges {
                routes_added: 1,
                routes_removed: 1,
                ..RouteChanges::default()
            }
        );
        assert!(ns.routes("-4", "wgt0", "10.251.2.0/24").is_empty());
        assert_eq!(ns.routes("-4", "wgt0", "10.251.3.0/24").len(), 1);
        assert_eq!(ns.routes("-4", "wgt0", "10.251.1.0/24").len(), 1);
        assert_eq!(ns.routes("-6", "wgt0", "fd00:251::/64").len(), 1);
        let manual = ns.routes("-4", "wgt0", "10.252.0.0/24");
        assert_eq!(manual.len(), 1, "the foreign route stays: {manual:?}");
        // The address's own prefix route (proto kernel) is still there.
        assert_eq!(ns.routes("-4", "wgt0", "10.250.0.0/16").len(), 1);

        // In sync: nothing to do.
        assert!(routing.sync(&cfg).await.unwrap().is_empty());

        // New address in another subnet: added before the old ones go (not the IPv6
        // link-local), so the interface never loses its routes.
        cfg.addresses = nets(&["10.249.0.4/16"]);
        let changes = routing.sync(&cfg).await.unwrap();
        assert_eq!(
            changes,
            RouteChanges {
                addresses_added: 1,
                addresses_removed: 2,
                ..RouteChanges::default()
            }
        );
        let addrs = ns.ip(&["addr", "show", "dev", "wgt0"]);
        assert!(addrs.contains("inet 10.249.0.4/16"), "{addrs}");
        assert!(!addrs.contains("10.250.0.3"), "{addrs}");
        assert!(!addrs.contains("fd00:250::3"), "{addrs}");
        assert!(addrs.contains("inet6 fe80::"), "link-local kept: {addrs}");
        assert_eq!(ns.routes("-4", "wgt0", "10.251.1.0/24").len(), 1);
        assert_eq!(ns.routes("-6", "wgt0", "fd00:251::/64").len(), 1);
        assert_eq!(ns.routes("-4", "wgt0", "10.252.0.0/24").len(), 1);

        // Same subnet: the new address is a secondary of the old, and the kernel removes it
        // (and every IPv4 route via the interface) with the old primary; one sync converges.
        cfg.addresses = nets(&["10.249.0.5/16"]);
        let changes = routing.sync(&cfg).await.unwrap();
        assert_eq!((changes.addresses_added, changes.addresses_removed), (1, 1));
        let addrs = ns.ip(&["addr", "show", "dev", "wgt0"]);
        assert!(addrs.contains("inet 10.249.0.5/16"), "{addrs}");
        assert!(!addrs.contains("10.249.0.4"), "{addrs}");
        assert_eq!(ns.routes("-4", "wgt0", "10.251.1.0/24").len(), 1);
        assert_eq!(ns.routes("-4", "wgt0", "10.251.3.0/24").len(), 1);
        assert!(routing.sync(&cfg).await.unwrap().is_empty());
        // The foreign route went with the kernel's flush (if it did flush): re-add it.
        if ns.routes("-4", "wgt0", "10.252.0.0/24").is_empty() {
            ns.ip(&["route", "add", "10.252.0.0/24", "dev", "wgt0"]);
        }

        // No routes wanted: ours go, the foreign one stays.
        cfg.routes.clear();
        let changes = routing.sync(&cfg).await.unwrap();
        assert_eq!(changes.routes_removed, 3);
        let left = ns.ip(&["route", "show", "table", "all", "proto", "87"]);
        assert!(left.trim().is_empty(), "{left}");
        assert_eq!(ns.routes("-4", "wgt0", "10.252.0.0/24").len(), 1);
    });
}

#[test]
fn dedicated_table_rule_and_cleanup() {
    if !is_root("routing") {
        return;
    }
    let ns = netns("rule");
    // A TUN, as the userspace device's: a link the agent may delete at cleanup.
    ns.ip(&["tuntap", "add", "dev", "wgt1", "mode", "tun"]);
    veth(&ns, "other0", 1500, true);
    ns.ip(&["link", "set", "other0", "up"]);
    ns.ip(&[
        "route",
        "add",
        "10.99.0.0/24",
        "dev",
        "other0",
        "proto",
        "static",
    ]);
    let cmd = ns.cmd();
    ns.run(move || async move {
        let ns = cmd;
        let routing = Routing::new().await.unwrap();
        let rule = RuleConfig {
            priority: 100,
            fwmark: 0x51820,
            table: 51820,
            invert: true,
        };
        let cfg = RoutingConfig {
            interface: "wgt1".into(),
            addresses: nets(&["10.250.0.5/16"]),
            mtu: Some(1420),
            routes: nets(&["10.251.1.0/24", "10.251.9.9/32"]),
            table: 51820,
            rules: vec![rule.clone()],
            guards: vec![],
            local: vec![],
        };
        let first = routing.sync(&cfg).await.unwrap();
        assert_eq!(first.routes_added, 2);
        assert_eq!(first.rules_added, 1, "IPv4 only: {first:?}");
        let second = routing.sync(&cfg).await.unwrap();
        assert!(second.is_empty(), "{second:?}");

        let rules = ns.ip(&["rule", "show"]);
        let ours: Vec<&str> = rules.lines().filter(|l| l.contains("0x51820")).collect();
        assert_eq!(ours.len(), 1, "{rules}");
        assert!(
            ours[0].starts_with("100:")
                && ours[0].contains("not from all fwmark 0x51820 lookup 51820"),
            "{rules}"
        );
        let rules6 = ns.ip(&["-6", "rule", "show"]);
        assert!(!rules6.contains("0x51820"), "{rules6}");

        let table = ns.ip(&["route", "show", "table", "51820"]);
        assert!(table.contains("10.251.1.0/24 dev wgt1 proto 87"), "{table}");
        assert!(table.contains("10.251.9.9 dev wgt1 proto 87"), "{table}");
        let main = ns.ip(&["route", "show", "table", "main", "dev", "wgt1"]);
        assert!(
            !main.contains("proto 87"),
            "nothing of ours in main: {main}"
        );

        // The rule flips to "fwmark M lookup T": replaced, still once.
        let mut flipped = cfg.clone();
        flipped.rules = vec![RuleConfig {
            invert: false,
            ..rule.clone()
        }];
        let changes = routing.sync(&flipped).await.unwrap();
        assert_eq!((changes.rules_added, changes.rules_removed), (1, 1));
        let rules = ns.ip(&["rule", "show"]);
        let ours: Vec<&str> = rules.lines().filter(|l| l.contains("0x51820")).collect();
        assert_eq!(ours.len(), 1, "{rules}");
        assert!(!ours[0].contains("not"), "{rules}");

        routing
            .cleanup("wgt1", 51820, &flipped.rules)
            .await
            .unwrap();
        let rules = ns.ip(&["rule", "show"]);
        assert!(!rules.contains("0x51820"), "{rules}");
        let table = ns.ip(&["route", "show", "table", "51820"]);
        assert!(table.trim().is_empty(), "{table}");
        assert!(!ns.ip_ok(&["link", "show", "wgt1"]), "the link is gone");
        // Someone else's route on another link is untouched.
        let other = ns.ip(&["route", "show", "dev", "other0"]);
        assert!(other.contains("10.99.0.0/24"), "{other}");
        // Cleaning up again is harmless.
        routing
            .cleanup("wgt1", 51820, &flipped.rules)
            .await
            .unwrap();
    });
}

#[test]
fn underlay_mtu_and_auto_mtu() {
    if !is_root("routing") {
        return;
    }
    let ns = netns("mtu");
    for (dev, mtu) in [("ul0", 1420), ("ul1", 9000), ("wgt2", 1500)] {
        veth(&ns, dev, mtu, false);
    }
    let cmd = ns.cmd();
    ns.run(move || async move {
        let ns = cmd;
        let routing = Routing::new().await.unwrap();
        // Nothing up: the default.
        assert_eq!(routing.underlay_mtu().await.unwrap(), 1500);
        for dev in ["ul0", "ul0p", "ul1", "ul1p"] {
            ns.ip(&["link", "set", dev, "up"]);
        }
        // No default route: the largest MTU among the up links.
        assert_eq!(routing.underlay_mtu().await.unwrap(), 9000);
        ns.ip(&["addr", "add", "192.168.77.2/24", "dev", "ul0"]);
        ns.ip(&[
            "route",
            "add",
            "default",
            "via",
            "192.168.77.1",
            "dev",
            "ul0",
        ]);
        // The link holding the default route.
        assert_eq!(routing.underlay_mtu().await.unwrap(), 1420);
        // A mesh whose packets are marked into a table of their own (fwmark.table) leaves
        // through that table's default route, where it has one: the path its packets take.
        ns.ip(&["addr", "add", "192.168.88.2/24", "dev", "ul1"]);
        ns.ip(&[
            "route",
            "add",
            "default",
            "via",
            "192.168.88.1",
            "dev",
            "ul1",
            "table",
            "51821",
        ]);
        let snapshot = routing.snapshot().await.unwrap();
        for (marked_table, want) in [(None, 1420), (Some(51821), 9000), (Some(7), 1420)] {
            assert_eq!(
                routing
                    .underlay_mtu_in(&snapshot, None, marked_table)
                    .await
                    .unwrap(),
                want,
                "{marked_table:?}"
            );
        }

        let cfg = RoutingConfig {
            interface: "wgt2".into(),
            addresses: nets(&["10.250.0.6/16"]),
            mtu: None,
            routes: vec![],
            table: 0,
            rules: vec![],
            guards: vec![],
            local: vec![],
        };
        let changes = routing.sync(&cfg).await.unwrap();
        assert_eq!(changes.mtu, Some(1340));
        let link = ns.ip(&["link", "show", "wgt2"]);
        assert!(link.contains("mtu 1340"), "{link}");
        assert!(routing.sync(&cfg).await.unwrap().is_empty());

        // A missing interface is a clear error.
        let missing = RoutingConfig {
            interface: "nope0".into(),
            ..cfg
        };
        let err = routing.sync(&missing).await.unwrap_err();
        assert!(err.to_string().contains("nope0"), "{err}");
    });
}

/// `ip -n <ns>` from inside the test body (the body owns no guard: the outer `Netns` does).
/// What the routing tests ask of `ip` beyond the shared helpers.
trait Routes {
    fn routes(&self, family: &str, dev: &str, dst: &str) -> Vec<String>;
}

impl Routes for NsCmd {
    /// Lines of `ip <family> route show table all dev <dev>` for destination `dst`.
    fn routes(&self, family: &str, dev: &str, dst: &str) -> Vec<String> {
        self.ip(&[family, "route", "show", "table", "all", "dev", dev])
            .lines()
            .filter(|l| l.starts_with(&format!("{dst} ")))
            .map(str::to_owned)
            .collect()
    }
}

/// Guards: a blackhole behind every protected network, in the routes' table, that stays when
/// the interface goes, so that the node's default route through the underlay never carries
/// mesh traffic; the node's own pod CIDRs are thrown back to the main table in a dedicated
/// table; a removed network's guard goes after its route.
#[test]
fn guards_outlive_the_interface_and_follow_the_mesh() {
    if !is_root("routing") {
        return;
    }
    let ns = netns("guards");
    veth(&ns, "wgt0", 1420, true);
    veth(&ns, "und0", 1500, true);
    ns.ip(&["link", "set", "und0", "up"]);
    ns.ip(&["addr", "add", "192.168.50.1/24", "dev", "und0"]);
    ns.ip(&["route", "add", "default", "via", "192.168.50.254"]);
    let cmd = ns.cmd();
    ns.run(move || async move {
        let ns = cmd;
        let routing = Routing::new().await.unwrap();
        let underlay = routing.underlay_addresses().await.unwrap();
        for addr in ["192.168.50.1", "192.168.50.254"] {
            assert!(
                underlay.contains(&addr.parse().unwrap()),
                "the default route's gateway and its interface's addresses: {underlay:?}"
            );
        }
        assert!(
            !underlay.contains(&"10.250.0.3".parse().unwrap()),
            "not the mesh's"
        );
        let mut cfg = RoutingConfig {
            interface: "wgt0".into(),
            addresses: nets(&["10.250.0.3/16"]),
            mtu: Some(1420),
            routes: nets(&["10.251.2.0/24", "10.251.3.0/24"]),
            table: 0,
            rules: vec![],
            guards: nets(&["10.251.2.0/24", "10.251.3.0/24", "10.250.0.0/16"]),
            local: nets(&["10.251.1.0/24"]),
        };
        let changes = routing.sync(&cfg).await.unwrap();
        assert_eq!(changes.guards_added, 3, "{changes:?}");
        let via_underlay = |dst: &str| ns.try_ip(&["-4", "route", "get", dst]).1.contains("und0");
        assert!(
            ns.try_ip(&["-4", "route", "get", "10.251.2.5"])
                .1
                .contains("wgt0")
        );

        // The interface goes (an agent crashed with a non-persistent device): its routes go
        // with it, the guards stay, and nothing protected falls to the default route.
        ns.ip(&["link", "del", "wgt0"]);
        for dst in ["10.251.2.5", "10.251.3.5", "10.250.0.9"] {
            assert!(
                !via_underlay(dst),
                "{dst} must not leave through the underlay"
            );
        }
        assert!(via_underlay("8.8.8.8"), "the rest still does");
        let blackholes = ns.ip(&["-4", "route", "show", "type", "blackhole"]);
        assert_eq!(blackholes.lines().count(), 3, "{blackholes}");
        assert!(blackholes.contains("metric 1000000"), "{blackholes}");

        // Back, and a peer removed: its route and guard go; it routes like any address.
        ns.ip(&[
            "link", "add", "wgt0", "type", "veth", "peer", "name", "wgt0p",
        ]);
        ns.ip(&["link", "set", "wgt0p", "up"]);
        cfg.routes = nets(&["10.251.3.0/24"]);
        cfg.guards = nets(&["10.251.3.0/24", "10.250.0.0/16"]);
        let changes = routing.sync(&cfg).await.unwrap();
        assert_eq!(changes.guards_removed, 1, "{changes:?}");
        assert!(via_underlay("10.251.2.5"));
        assert!(!via_underlay("10.251.3.5"));

        // A dedicated table (add-on mode): guards there, and the node's own pod CIDR thrown
        // back to the main table.
        cfg.table = 51820;
        cfg.guards = nets(&["10.251.0.0/16"]);
        routing.sync(&cfg).await.unwrap();
        let table = ns.ip(&["-4", "route", "show", "table", "51820"]);
        assert!(table.contains("blackhole 10.251.0.0/16"), "{table}");
        assert!(table.contains("throw 10.251.1.0/24"), "{table}");
        let main = ns.ip(&["-4", "route", "show", "type", "blackhole"]);
        assert!(main.is_empty(), "the main table's guards went: {main}");

        // Cleanup removes every guard and throw, in the dedicated table and the main one.
        routing.cleanup("wgt0", 51820, &[]).await.unwrap();
        let left = ns.ip(&["-4", "route", "show", "table", "all", "proto", "87"]);
        assert!(left.is_empty(), "{left}");
        // A link the device could not have made (a veth, as `eth0` is on kind) is never
        // deleted, whatever the mesh's interface is called.
        assert!(ns.ip_ok(&["link", "show", "wgt0"]), "a veth was deleted");
    });
}

/// A route moving to another table (the mesh's fwmark set: add-on mode's dedicated table) is
/// added there before it leaves the old one: the rules already lead to the new table, whose
/// guard would drop the traffic in between. `ip monitor` sees the kernel's order.
#[test]
fn a_route_moving_to_another_table_is_added_there_first() {
    if !is_root("routing") {
        return;
    }
    let ns = netns("move");
    veth(&ns, "wgt0", 1420, true);
    let cmd = ns.cmd();
    ns.run(move || async move {
        let ns = cmd;
        let routing = Routing::new().await.unwrap();
        let mut cfg = RoutingConfig {
            interface: "wgt0".into(),
            addresses: nets(&["10.250.0.3/16"]),
            mtu: Some(1420),
            routes: nets(&["10.251.2.0/24"]),
            table: 0,
            rules: vec![],
            guards: nets(&["10.251.0.0/16"]),
            local: vec![],
        };
        routing.sync(&cfg).await.unwrap();
        /// The monitor goes with the test, also when it fails.
        struct Monitor(std::process::Child);
        impl Drop for Monitor {
            fn drop(&mut self) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
        let mut monitor = std::process::Command::new("ip")
            // Line-buffered: into a pipe, `ip monitor` would hold its lines back.
            .args([
                "netns", "exec", &ns.0, "stdbuf", "-oL", "ip", "-o", "-4", "monitor", "route",
            ])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .map(Monitor)
            .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let stdout = monitor.0.stdout.take().unwrap();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                let _ = tx.send(line);
            }
        });
        // Listening once it reports a route of its own making (added and deleted each time:
        // the kernel says nothing of a route replaced by the same).
        let listening = std::time::Instant::now();
        loop {
            ns.ip(&["route", "add", "10.99.0.0/24", "dev", "wgt0"]);
            ns.ip(&["route", "del", "10.99.0.0/24", "dev", "wgt0"]);
            let line = rx.recv_timeout(std::time::Duration::from_millis(500));
            if line.is_ok_and(|l| l.contains("10.99.0.0/24")) {
                break;
            }
            assert!(listening.elapsed().as_secs() < 20, "ip monitor is silent");
        }
        cfg.table = 51820;
        routing.sync(&cfg).await.unwrap();
        let mut events = String::new();
        while let Ok(line) = rx.recv_timeout(std::time::Duration::from_secs(1)) {
            events.push_str(&line);
            events.push('\n');
        }
        drop(monitor);
        let position = |what: &dyn Fn(&str) -> bool| {
            events
                .lines()
                .position(|l| l.contains("10.251.2.0/24 dev wgt0") && what(l))
        };
        let added = position(&|l: &str| !l.starts_with("Deleted") && l.contains("table 51820"));
        let deleted = position(&|l: &str| l.starts_with("Deleted") && !l.contains("table"));
        assert!(
            matches!((added, deleted), (Some(a), Some(d)) if a < d),
            "added to the new table before leaving the main one:\n{events}"
        );
    });
}

/// A TUN of the mesh's name that another program holds open (Debian's wireguard-go: the
/// device refused to take it) is not deleted when the mesh leaves the node; a persistent TUN
/// nobody holds (a crashed userspace device's) is.
#[test]
fn cleanup_leaves_a_tun_another_program_holds() {
    if !is_root("routing") {
        return;
    }
    let ns = netns("heldtun");
    let mut held = HeldTun::start(&ns.name, "wgt9");
    ns.ip(&["tuntap", "add", "dev", "wgt8", "mode", "tun"]);
    let cmd = ns.cmd();
    ns.run(move || async move {
        let routing = Routing::new().await.unwrap();
        routing.cleanup("wgt9", 51820, &[]).await.unwrap();
        assert!(
            cmd.ip_ok(&["link", "show", "wgt9"]),
            "another program's TUN was deleted"
        );
        routing.cleanup("wgt8", 51820, &[]).await.unwrap();
        assert!(
            !cmd.ip_ok(&["link", "show", "wgt8"]),
            "a leftover TUN stays"
        );
    });
    assert!(held.running(), "wireguard-go still runs");
}

/// A node with IPv6 disabled in a dual-stack mesh: the kernel refuses the IPv6 address and
/// route. The sync reports them, but everything else is in place: the guards of both families,
/// the rules that select their table (beside another one's rule that looks like it), the
/// IPv4 address and route. (Before, the first refusal
/// ended the sync with no rule: in add-on mode pod traffic followed the other CNI's routes,
/// in plaintext.)
#[test]
fn a_refused_change_leaves_the_others_applied() {
    if !is_root("routing") {
        return;
    }
    let ns = netns("refused");
    let name = ns.name.clone();
    for key in ["all", "default"] {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &name, "sysctl", "-qw"])
            .arg(format!("net.ipv6.conf.{key}.disable_ipv6=1"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }
    ns.ip(&["tuntap", "add", "dev", "wgt6", "mode", "tun"]);
    // Someone else's rule at the same priority into the same table, for some sources only:
    // not ours, so ours is still made (and theirs stays).
    ns.ip(&[
        "rule",
        "add",
        "from",
        "10.9.0.0/16",
        "lookup",
        "51820",
        "pref",
        "100",
    ]);
    let cmd = ns.cmd();
    ns.run(move || async move {
        let ns = cmd;
        let routing = Routing::new().await.unwrap();
        let cfg = RoutingConfig {
            interface: "wgt6".into(),
            addresses: nets(&["fd00:250::3/64", "10.250.0.3/16"]),
            mtu: Some(1420),
            routes: nets(&["fd00:251::/64", "10.251.1.0/24"]),
            table: 51820,
            rules: vec![RuleConfig {
                priority: 100,
                fwmark: 0,
                table: 51820,
                invert: false,
            }],
            guards: nets(&["fd00:251::/48", "10.251.0.0/16"]),
            local: vec![],
        };
        let changes = routing.sync(&cfg).await.unwrap();
        assert!(
            !changes.refused.is_empty() && changes.refused.iter().all(|r| r.contains("fd00:")),
            "the IPv6 address and route are refused, nothing else: {changes:?}"
        );

        let table4 = ns.ip(&["-4", "route", "show", "table", "51820"]);
        assert!(table4.contains("10.251.1.0/24 dev wgt6"), "{table4}");
        assert!(table4.contains("blackhole 10.251.0.0/16"), "{table4}");
        let table6 = ns.ip(&["-6", "route", "show", "table", "51820"]);
        assert!(table6.contains("blackhole fd00:251::/48"), "{table6}");
        for family in ["-4", "-6"] {
            let rules = ns.ip(&[family, "rule", "show"]);
            assert!(
                rules.contains("100:\tfrom all lookup 51820"),
                "{family}: {rules}"
            );
        }
        let addrs = ns.ip(&["addr", "show", "dev", "wgt6"]);
        assert!(addrs.contains("inet 10.250.0.3/16"), "{addrs}");

        // The next sync finds the same refusals and changes nothing else.
        let again = routing.sync(&cfg).await.unwrap();
        assert!(again.is_empty() && !again.refused.is_empty(), "{again:?}");
        let rules = ns.ip(&["-4", "rule", "show"]);
        assert_eq!(rules.matches("from all lookup 51820").count(), 1, "{rules}");
        assert!(rules.contains("from 10.9.0.0/16 lookup 51820"), "{rules}");
        routing.cleanup("wgt6", 51820, &cfg.rules).await.unwrap();
    });
}
