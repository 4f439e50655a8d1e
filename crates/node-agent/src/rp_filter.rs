//! Strict reverse-path filtering against host encryption. With `hostEncryption` the other
//! nodes' addresses are routed into the tunnel; the kernel's reverse-path check of what
//! arrives on the underlay from those addresses (ARP requests among them) then finds a route
//! into the tunnel, not the link it came in on, and strict checking (`rp_filter=1`, RHEL's
//! default) drops it: the nodes stop reaching each other's underlay, and the tunnels with
//! it. Loose checking (2) or none (0) works. The agent cannot change host sysctls (they are
//! read-only in its container), so it says what to set.

use std::path::Path;

/// The effective `rp_filter` of a link: the larger of `all` and the link's own.
pub fn effective(all: u8, link: u8) -> u8 {
    all.max(link)
}

/// The links among `links` whose reverse-path filtering is strict, read under `conf`
/// (`/proc/sys/net/ipv4/conf`). A value that cannot be read counts as not strict.
pub fn strict_links(conf: &Path, links: &[String]) -> Vec<String> {
    let read = |name: &str| -> Option<u8> {
        std::fs::read_to_string(conf.join(name).join("rp_filter"))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    let all = read("all").unwrap_or(0);
    links
        .iter()
        .filter(|l| read(l).is_some_and(|v| effective(all, v) == 1))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strict_is_the_larger_of_all_and_the_link_being_one() {
        // (all, link, strict)
        let cases = [
            (0, 0, false),
            (0, 1, true),
            (1, 0, true),
            (1, 2, false),
            (2, 1, false),
            (2, 2, false),
        ];
        for (all, link, strict) in cases {
            assert_eq!(effective(all, link) == 1, strict, "all {all}, link {link}");
        }
    }

    #[test]
    fn reads_the_links_values() {
        let dir = tempfile::tempdir().unwrap();
        for (name, value) in [("all", "0"), ("eth0", "1"), ("eth1", "2")] {
            std::fs::create_dir_all(dir.path().join(name)).unwrap();
            std::fs::write(
                dir.path().join(name).join("rp_filter"),
                format!("{value}\n"),
            )
            .unwrap();
        }
        let links = ["eth0", "eth1", "gone0"].map(String::from);
        assert_eq!(strict_links(dir.path(), &links), ["eth0"]);
    }
}
