//! CNI mode: the node's conflist, so that a cluster created without a CNI gets pod
//! networking from the standard plugins, with wgmesh carrying cross-node pod traffic.
//!
//! The conflist is a pure function of the node's pod CIDRs and the tunnel's MTU; writing it is
//! atomic and only happens when its content changes, so the container runtime never reads a
//! half-written file and an agent restart touches nothing.

use std::io;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde_json::{Value, json};

/// File name: sorts before other CNIs' usual `10-<name>.conflist`, since the runtime uses the
/// first conflist in the directory.
pub const CONFLIST_FILE: &str = "05-wgmesh.conflist";

/// The network name pods are attached to.
pub const NETWORK_NAME: &str = "wgmesh";

/// The node's conflist: `bridge` (the node's gateway, pods' MTU equal to the tunnel's so
/// cross-node packets fit without fragmentation) with `host-local` over every pod CIDR of
/// the node (one range set per CIDR, so dual-stack nodes get an address of each family),
/// then `portmap` for hostPort and `loopback`. No masquerading: pod addresses are kept
/// across nodes.
pub fn conflist(pod_cidrs: &[IpNet], mtu: u32, bridge: &str) -> Value {
    let ranges: Vec<Value> = pod_cidrs
        .iter()
        .map(|c| json!([{ "subnet": c.trunc().to_string() }]))
        .collect();
    let routes: Vec<Value> = pod_cidrs
        .iter()
        .map(|c| match c {
            IpNet::V4(_) => json!({ "dst": "0.0.0.0/0" }),
            IpNet::V6(_) => json!({ "dst": "::/0" }),
        })
        .collect();
    json!({
        "cniVersion": "1.0.0",
        "name": NETWORK_NAME,
        "plugins": [
            {
                "type": "bridge",
                "bridge": bridge,
                "isGateway": true,
                "ipMasq": false,
                "hairpinMode": true,
                "mtu": mtu,
                "ipam": {
                    "type": "host-local",
                    "ranges": ranges,
                    "routes": routes,
                },
            },
            { "type": "portmap", "capabilities": { "portMappings": true } },
            { "type": "loopback" },
        ],
    })
}

/// Writes `content` to `dir/CONFLIST_FILE` through a temporary file and a rename, unless the
/// file already holds it. Returns whether it wrote.
pub fn write_conflist(dir: &Path, content: &Value) -> io::Result<bool> {
    let path = conflist_path(dir);
    let text = serde_json::to_string_pretty(content).map_err(io::Error::other)? + "\n";
    if std::fs::read_to_string(&path).is_ok_and(|old| old == text) {
        return Ok(false);
    }
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{CONFLIST_FILE}.tmp"));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, &path)?;
    Ok(true)
}

pub fn conflist_path(dir: &Path) -> PathBuf {
    dir.join(CONFLIST_FILE)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn conflist_per_family() {
        struct Case {
            cidrs: &'static [&'static str],
            ranges: Value,
            routes: Value,
        }
        let cases = [
            Case {
                cidrs: &["10.244.1.0/24"],
                ranges: json!([[{"subnet": "10.244.1.0/24"}]]),
                routes: json!([{"dst": "0.0.0.0/0"}]),
            },
            Case {
                cidrs: &["10.244.1.0/24", "fd00:10:244:1::/64"],
                ranges: json!([[{"subnet": "10.244.1.0/24"}], [{"subnet": "fd00:10:244:1::/64"}]]),
                routes: json!([{"dst": "0.0.0.0/0"}, {"dst": "::/0"}]),
            },
        ];
        for case in cases {
            let c = conflist(&nets(case.cidrs), 1420, "wgmesh-br0");
            let bridge = &c["plugins"][0];
            assert_eq!(bridge["type"], "bridge");
            assert_eq!(bridge["mtu"], 1420);
            assert_eq!(bridge["ipMasq"], false);
            assert_eq!(bridge["ipam"]["ranges"], case.ranges, "{:?}", case.cidrs);
            assert_eq!(bridge["ipam"]["routes"], case.routes, "{:?}", case.cidrs);
            let types: Vec<&str> = c["plugins"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["type"].as_str().unwrap())
                .collect();
            assert_eq!(types, ["bridge", "portmap", "loopback"]);
        }
    }

    #[test]
    fn writes_only_on_change() {
        let dir = tempfile::tempdir().unwrap();
        let a = conflist(&nets(&["10.244.1.0/24"]), 1420, "br");
        assert!(write_conflist(dir.path(), &a).unwrap());
        assert!(!write_conflist(dir.path(), &a).unwrap());
        let b = conflist(&nets(&["10.244.1.0/24"]), 1380, "br");
        assert!(write_conflist(dir.path(), &b).unwrap());
        let read: Value =
            serde_json::from_str(&std::fs::read_to_string(conflist_path(dir.path())).unwrap())
                .unwrap();
        assert_eq!(read, b);
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "no temporary file left");
    }
}
