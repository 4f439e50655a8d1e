//! Longest-prefix match from an address to a value, for IPv4 and IPv6.
//!
//! The table is built once per configuration change and then only read by the data path, so
//! it favours a simple immutable layout: one hash map per prefix length present, searched from
//! the longest length down. A mesh has few distinct prefix lengths (host routes, pod CIDRs,
//! maybe a default route), so a lookup is a handful of hash probes and allocates nothing.

use std::collections::HashMap;
use std::net::IpAddr;

use ipnet::IpNet;

#[derive(Debug, Clone)]
pub(crate) struct AllowedIps<T> {
    /// Sorted by prefix length, longest first.
    v4: Vec<(u8, HashMap<u32, T>)>,
    v6: Vec<(u8, HashMap<u128, T>)>,
}

impl<T> Default for AllowedIps<T> {
    fn default() -> Self {
        AllowedIps {
            v4: Vec::new(),
            v6: Vec::new(),
        }
    }
}

fn mask4(addr: u32, len: u8) -> u32 {
    match len {
        0 => 0,
        l if l >= 32 => addr,
        l => addr & (u32::MAX << (32 - l)),
    }
}

fn mask6(addr: u128, len: u8) -> u128 {
    match len {
        0 => 0,
        l if l >= 128 => addr,
        l => addr & (u128::MAX << (128 - l)),
    }
}

fn level<K, T>(levels: &mut Vec<(u8, HashMap<K, T>)>, len: u8) -> &mut HashMap<K, T> {
    let pos = match levels.binary_search_by(|(l, _)| len.cmp(l)) {
        Ok(pos) => pos,
        Err(pos) => {
            levels.insert(pos, (len, HashMap::new()));
            pos
        }
    };
    &mut levels[pos].1
}

impl<T> AllowedIps<T> {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Maps `net` (host bits are ignored) to `value`, replacing what it mapped to before.
    pub(crate) fn insert(&mut self, net: IpNet, value: T) {
        match net {
            IpNet::V4(n) => {
                let len = n.prefix_len();
                let key = mask4(u32::from(n.addr()), len);
                level(&mut self.v4, len).insert(key, value);
            }
            IpNet::V6(n) => {
                let len = n.prefix_len();
                let key = mask6(u128::from(n.addr()), len);
                level(&mut self.v6, len).insert(key, value);
            }
        }
    }

    /// The value of the longest prefix containing `addr`.
    pub(crate) fn lookup(&self, addr: IpAddr) -> Option<&T> {
        match addr {
            IpAddr::V4(a) => {
                let a = u32::from(a);
                self.v4
                    .iter()
                    .find_map(|(len, map)| map.get(&mask4(a, *len)))
            }
            IpAddr::V6(a) => {
                let a = u128::from(a);
                self.v6
                    .iter()
                    .find_map(|(len, map)| map.get(&mask6(a, *len)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(entries: &[(&str, u32)]) -> AllowedIps<u32> {
        let mut t = AllowedIps::new();
        for (net, v) in entries {
            t.insert(net.parse().unwrap(), *v);
        }
        t
    }

    #[test]
    fn longest_prefix_wins() {
        let t = table(&[
            ("0.0.0.0/0", 1),
            ("10.0.0.0/8", 2),
            ("10.1.0.0/16", 3),
            ("10.1.2.3/32", 4),
            ("192.168.0.0/24", 5),
            ("::/0", 10),
            ("fd00::/8", 11),
            ("fd00:1::/32", 12),
            ("fd00:1::1/128", 13),
        ]);
        let cases: &[(&str, Option<u32>)] = &[
            ("10.1.2.3", Some(4)),
            ("10.1.2.4", Some(3)),
            ("10.2.0.1", Some(2)),
            ("11.0.0.1", Some(1)),
            ("192.168.0.255", Some(5)),
            ("192.168.1.0", Some(1)),
            ("fd00:1::1", Some(13)),
            ("fd00:1::2", Some(12)),
            ("fd00:2::1", Some(11)),
            ("2001:db8::1", Some(10)),
        ];
        for (addr, want) in cases {
            assert_eq!(
                t.lookup(addr.parse().unwrap()).copied(),
                *want,
                "lookup {addr}"
            );
        }
    }

    #[test]
    fn no_default_means_no_match() {
        let t = table(&[("10.0.0.0/24", 1), ("fd00::/64", 2)]);
        let cases: &[(&str, Option<u32>)] = &[
            ("10.0.0.7", Some(1)),
            ("10.0.1.7", None),
            ("fd00::7", Some(2)),
            ("fd00:0:0:1::7", None),
            // An IPv4-mapped IPv6 address is IPv6 for the table: families never mix.
            ("::ffff:10.0.0.7", None),
        ];
        for (addr, want) in cases {
            assert_eq!(
                t.lookup(addr.parse().unwrap()).copied(),
                *want,
                "lookup {addr}"
            );
        }
        assert_eq!(
            AllowedIps::<u32>::new().lookup("1.2.3.4".parse().unwrap()),
            None
        );
    }

    #[test]
    fn insert_replaces_and_masks_host_bits() {
        let mut t = table(&[("10.0.0.0/24", 1)]);
        t.insert("10.0.0.99/24".parse().unwrap(), 2);
        assert_eq!(t.lookup("10.0.0.1".parse().unwrap()), Some(&2));
        t.insert("fd00::1:2:3/48".parse().unwrap(), 3);
        assert_eq!(t.lookup("fd00::ffff".parse().unwrap()), Some(&3));
    }
}
