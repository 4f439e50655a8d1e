//! CNI mode: the node's conflist, so that a cluster created without a CNI gets pod
//! networking from the standard plugins, with wgmesh carrying cross-node pod traffic.
//!
//! The conflist is a pure function of the node's pod CIDRs and the tunnel's MTU; writing it is
//! atomic and only happens when its content changes, so the container runtime never reads a
//! half-written file and an agent restart touches nothing.
//!
//! Its content lives in a directory that does not survive a reboot (`/run`), and the CNI
//! configuration directory holds a symbolic link to it. After a reboot the link dangles, and
//! the runtime (containerd) has no pod network until the agent has programmed the tunnel,
//! routes and guards again and written the content: the kubelet starts no pod with a pod
//! network before then, so no pod can reach another node's pods over the node's plain
//! routes (a regular file in `/etc/cni/net.d` outlives the reboot and lets pods start at
//! once). The same holds in add-on mode for a copy of the other CNI's configuration: see
//! [`gate`].

pub mod gate;
pub mod linked;

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

pub fn conflist_path(dir: &Path) -> PathBuf {
    dir.join(CONFLIST_FILE)
}

/// CNI mode: writes the node's conflist ([`linked::write`]); true if it wrote.
pub fn write_conflist(conf_dir: &Path, run_dir: &Path, content: &Value) -> io::Result<bool> {
    linked::write(conf_dir, run_dir, CONFLIST_FILE, content)
}

/// CNI mode: removes the node's conflist ([`linked::remove`]); true if it was there.
pub fn remove_conflist(conf_dir: &Path, run_dir: &Path) -> io::Result<bool> {
    linked::remove(conf_dir, run_dir, CONFLIST_FILE)
}

/// The plugins the conflist uses.
pub const PLUGINS: [&str; 4] = ["bridge", "host-local", "portmap", "loopback"];

/// Copies each of [`PLUGINS`] from `from` to `to` where `to` has none (a plugin already
/// there, maybe another version other pods depend on, is never replaced). Each copy is
/// written to a temporary name and renamed, so the runtime never runs a partial binary.
/// Returns the names copied.
pub fn install_plugins(from: &Path, to: &Path) -> io::Result<Vec<&'static str>> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(to)?;
    let mut copied = Vec::new();
    for name in PLUGINS {
        let target = to.join(name);
        if target.exists() {
            continue;
        }
        let source = from.join(name);
        let tmp = to.join(format!(".{name}.wgmesh-tmp"));
        std::fs::copy(&source, &tmp)
            .map_err(|e| io::Error::new(e.kind(), format!("copying {}: {e}", source.display())))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
        std::fs::rename(&tmp, &target)?;
        copied.push(name);
    }
    Ok(copied)
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
    fn installs_only_missing_plugins() {
        let from = tempfile::tempdir().unwrap();
        let to = tempfile::tempdir().unwrap();
        for name in PLUGINS {
            std::fs::write(from.path().join(name), format!("ours {name}")).unwrap();
        }
        std::fs::write(to.path().join("loopback"), "theirs").unwrap();
        let copied = install_plugins(from.path(), to.path()).unwrap();
        assert_eq!(copied, ["bridge", "host-local", "portmap"]);
        assert_eq!(
            std::fs::read_to_string(to.path().join("loopback")).unwrap(),
            "theirs",
            "an existing plugin is kept"
        );
        assert!(install_plugins(from.path(), to.path()).unwrap().is_empty());
        let missing = tempfile::tempdir().unwrap();
        let err = install_plugins(from.path().join("nope").as_path(), missing.path()).unwrap_err();
        assert!(err.to_string().contains("bridge"), "{err}");
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn writes_only_on_change() {
        let conf = tempfile::tempdir().unwrap();
        let run = tempfile::tempdir().unwrap();
        let (conf, run) = (conf.path(), run.path());
        let a = conflist(&nets(&["10.244.1.0/24"]), 1420, "br");
        assert!(write_conflist(conf, run, &a).unwrap());
        assert!(!write_conflist(conf, run, &a).unwrap());
        let b = conflist(&nets(&["10.244.1.0/24"]), 1380, "br");
        assert!(write_conflist(conf, run, &b).unwrap());
        let read: Value =
            serde_json::from_str(&std::fs::read_to_string(conflist_path(conf)).unwrap()).unwrap();
        assert_eq!(read, b, "read through the link");
        assert_eq!(
            std::fs::read_link(conflist_path(conf)).unwrap(),
            run.join(CONFLIST_FILE)
        );
        assert_eq!(entries(conf), [CONFLIST_FILE], "no temporary file left");
        assert_eq!(entries(run), [CONFLIST_FILE], "no temporary file left");
    }

    /// What the node looks like to the agent in each case, and whether it writes.
    #[test]
    fn links_again_after_a_reboot_and_over_an_old_file() {
        let a = conflist(&nets(&["10.244.1.0/24"]), 1420, "br");
        let conf = tempfile::tempdir().unwrap();
        let run = tempfile::tempdir().unwrap();
        let (conf, run) = (conf.path(), run.path());

        // An agent from before the link wrote a regular file: replaced by the link.
        std::fs::write(conflist_path(conf), "{}").unwrap();
        assert!(write_conflist(conf, run, &a).unwrap());
        assert!(
            std::fs::symlink_metadata(conflist_path(conf))
                .unwrap()
                .is_symlink()
        );

        // A reboot empties `run`: the link dangles (the runtime has no network) until the
        // agent writes the content again, and links again so the runtime hears of it.
        std::fs::remove_file(run.join(CONFLIST_FILE)).unwrap();
        assert!(std::fs::read_to_string(conflist_path(conf)).is_err());
        assert!(write_conflist(conf, run, &a).unwrap());
        let read: Value =
            serde_json::from_str(&std::fs::read_to_string(conflist_path(conf)).unwrap()).unwrap();
        assert_eq!(read, a);

        // A link pointing elsewhere (another run directory) is made again.
        let other = tempfile::tempdir().unwrap();
        assert!(write_conflist(conf, other.path(), &a).unwrap());
        assert_eq!(
            std::fs::read_link(conflist_path(conf)).unwrap(),
            other.path().join(CONFLIST_FILE)
        );

        // Leaving removes both; removing again finds nothing.
        assert!(remove_conflist(conf, other.path()).unwrap());
        assert!(entries(conf).is_empty());
        assert!(entries(other.path()).is_empty());
        assert!(!remove_conflist(conf, other.path()).unwrap());
    }
}
