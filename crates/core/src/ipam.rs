//! Tunnel address allocation (IPAM): one address per pool (IPv4 and/or IPv6) for every node and
//! external peer.
//!
//! Allocations are kept in each peer's status, so this is a pure function of the pools, what is
//! already allocated, and who needs an address: stable across controller restarts (an existing
//! address is kept), never duplicated (the first holder in the given order keeps a contested
//! address), and reused after deletion (the lowest free address is taken).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::Cidr;

/// The result of one allocation round.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allocation {
    /// Every requester's addresses after this round, one per pool (pool order). A requester
    /// missing from a pool that is full has fewer addresses than pools.
    pub addresses: BTreeMap<String, Vec<IpAddr>>,
    /// Requesters that got no address in some pool, with a message saying which pool is full.
    pub exhausted: BTreeMap<String, String>,
}

/// Allocates addresses for `requesters`, each with the addresses it holds now, in priority
/// order (earlier ones keep contested addresses), from `pools`, keeping what a requester
/// holds where it is still valid.
pub fn allocate<'a>(
    pools: &[Cidr],
    requesters: impl IntoIterator<Item = (&'a str, &'a [IpAddr])>,
) -> Allocation {
    allocate_withholding(pools, requesters, |_| false)
}

/// [`allocate`], except that a requester for which `withheld` is true keeps what it holds
/// and is given no new address (a refused peer, which must not take one from another).
pub fn allocate_withholding<'a>(
    pools: &[Cidr],
    requesters: impl IntoIterator<Item = (&'a str, &'a [IpAddr])>,
    withheld: impl Fn(&str) -> bool,
) -> Allocation {
    let requesters: Vec<(&str, &[IpAddr])> = requesters.into_iter().collect();
    let mut used: Vec<BTreeSet<IpAddr>> = vec![BTreeSet::new(); pools.len()];
    let mut result = Allocation::default();

    // First pass: keep valid existing addresses, in priority order so a duplicate goes to the
    // first holder.
    let mut kept: Vec<Vec<Option<IpAddr>>> = Vec::with_capacity(requesters.len());
    for (_, held) in &requesters {
        let mut slots = vec![None; pools.len()];
        for addr in held.iter() {
            if let Some(i) = pools.iter().position(|p| usable(p, *addr))
                && slots[i].is_none()
                && used[i].insert(*addr)
            {
                slots[i] = Some(*addr);
            }
        }
        kept.push(slots);
    }

    // Second pass: fill the gaps with the lowest free address of each pool. Addresses are
    // only taken in this pass, so the lowest free one never moves down: each pool's search
    // resumes where the last one ended (many joining at once cost O(n), not O(n^2)).
    let mut searched_to: Vec<u128> = vec![1; pools.len()];
    for ((name, _), slots) in requesters.iter().zip(&mut kept) {
        if withheld(name) {
            result
                .addresses
                .insert(name.to_string(), slots.iter().flatten().copied().collect());
            continue;
        }
        let mut missing = Vec::new();
        for (i, pool) in pools.iter().enumerate() {
            if slots[i].is_none() {
                match lowest_free(pool, &used[i], &mut searched_to[i]) {
                    Some(addr) => {
                        used[i].insert(addr);
                        slots[i] = Some(addr);
                    }
                    None => missing.push(format!("{pool} ({} in use)", used[i].len())),
                }
            }
        }
        if !missing.is_empty() {
            result.exhausted.insert(
                name.to_string(),
                format!("tunnel pool {} has no free address", missing.join(", ")),
            );
        }
        result
            .addresses
            .insert(name.to_string(), slots.iter().flatten().copied().collect());
    }
    result
}

/// Number of assignable addresses in a pool (saturating for large IPv6 pools).
pub fn capacity(pool: &Cidr) -> u128 {
    let host_bits = match pool.addr() {
        IpAddr::V4(_) => 32 - u32::from(pool.prefix_len()),
        IpAddr::V6(_) => 128 - u32::from(pool.prefix_len()),
    };
    let total = if host_bits >= 128 {
        u128::MAX
    } else {
        1u128 << host_bits
    };
    // The network address is never assigned; in IPv4 pools larger than /31 neither is the
    // broadcast address.
    match pool.addr() {
        IpAddr::V4(_) if host_bits >= 2 => total - 2,
        _ => total.saturating_sub(1),
    }
}

/// Whether `addr` may be assigned from `pool`.
fn usable(pool: &Cidr, addr: IpAddr) -> bool {
    if !pool.contains_addr(addr) || addr == pool.addr() {
        return false;
    }
    match (pool.net(), addr) {
        (ipnet::IpNet::V4(net), IpAddr::V4(a)) if net.prefix_len() <= 30 => a != net.broadcast(),
        _ => true,
    }
}

/// The lowest free address of `pool` at an offset of at least `from`, which moves to it.
fn lowest_free(pool: &Cidr, used: &BTreeSet<IpAddr>, from: &mut u128) -> Option<IpAddr> {
    let cap = capacity(pool);
    // `used` holds only addresses of this pool, so the first used.len() + 1 offsets hold a
    // free one if the pool has one.
    let limit = (used.len() as u128 + 1).min(cap);
    let offset = (*from..=limit).find(|o| {
        let a = nth(pool, *o);
        !used.contains(&a) && usable(pool, a)
    })?;
    *from = offset;
    Some(nth(pool, offset))
}

fn nth(pool: &Cidr, offset: u128) -> IpAddr {
    match pool.addr() {
        IpAddr::V4(base) => IpAddr::V4(Ipv4Addr::from(u32::from(base).wrapping_add(offset as u32))),
        IpAddr::V6(base) => IpAddr::V6(Ipv6Addr::from(u128::from(base).wrapping_add(offset))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pools(list: &[&str]) -> Vec<Cidr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn current(list: &[(&str, &[&str])]) -> BTreeMap<String, Vec<IpAddr>> {
        list.iter()
            .map(|(n, a)| {
                (
                    n.to_string(),
                    a.iter().map(|s| s.parse().unwrap()).collect(),
                )
            })
            .collect()
    }

    fn addrs(alloc: &Allocation, name: &str) -> Vec<String> {
        alloc.addresses[name]
            .iter()
            .map(|a| a.to_string())
            .collect()
    }

    #[test]
    fn allocation_table() {
        struct Case {
            name: &'static str,
            pools: &'static [&'static str],
            current: &'static [(&'static str, &'static [&'static str])],
            requesters: &'static [&'static str],
            want: &'static [(&'static str, &'static [&'static str])],
            exhausted: &'static [&'static str],
        }
        let cases = [
            Case {
                name: "fresh pool starts after the network address",
                pools: &["10.250.0.0/16"],
                current: &[],
                requesters: &["a", "b"],
                want: &[("a", &["10.250.0.1"]), ("b", &["10.250.0.2"])],
                exhausted: &[],
            },
            Case {
                name: "existing addresses are kept (stable across restarts)",
                pools: &["10.250.0.0/16"],
                current: &[("a", &["10.250.0.9"]), ("b", &["10.250.0.3"])],
                requesters: &["a", "b", "c"],
                want: &[
                    ("a", &["10.250.0.9"]),
                    ("b", &["10.250.0.3"]),
                    ("c", &["10.250.0.1"]),
                ],
                exhausted: &[],
            },
            Case {
                name: "a freed address is reused",
                pools: &["10.250.0.0/16"],
                current: &[("a", &["10.250.0.1"]), ("c", &["10.250.0.3"])],
                requesters: &["a", "c", "d"],
                want: &[
                    ("a", &["10.250.0.1"]),
                    ("c", &["10.250.0.3"]),
                    ("d", &["10.250.0.2"]),
                ],
                exhausted: &[],
            },
            Case {
                name: "a duplicated address stays with the first holder",
                pools: &["10.250.0.0/16"],
                current: &[("a", &["10.250.0.5"]), ("b", &["10.250.0.5"])],
                requesters: &["a", "b"],
                want: &[("a", &["10.250.0.5"]), ("b", &["10.250.0.1"])],
                exhausted: &[],
            },
            Case {
                name: "an address outside the pool (pool changed) is replaced",
                pools: &["10.251.0.0/24"],
                current: &[("a", &["10.250.0.5"])],
                requesters: &["a"],
                want: &[("a", &["10.251.0.1"])],
                exhausted: &[],
            },
            Case {
                name: "dual stack gives one address per pool",
                pools: &["10.250.0.0/16", "fd00::/64"],
                current: &[("a", &["fd00::7"])],
                requesters: &["a", "b"],
                want: &[
                    ("a", &["10.250.0.1", "fd00::7"]),
                    ("b", &["10.250.0.2", "fd00::1"]),
                ],
                exhausted: &[],
            },
            Case {
                name: "a /30 has two usable addresses; the third requester is refused",
                pools: &["10.250.0.0/30"],
                current: &[],
                requesters: &["a", "b", "c"],
                want: &[("a", &["10.250.0.1"]), ("b", &["10.250.0.2"]), ("c", &[])],
                exhausted: &["c"],
            },
            Case {
                name: "network and broadcast addresses held in status are not kept",
                pools: &["10.250.0.0/30"],
                current: &[("a", &["10.250.0.0"]), ("b", &["10.250.0.3"])],
                requesters: &["a", "b"],
                want: &[("a", &["10.250.0.1"]), ("b", &["10.250.0.2"])],
                exhausted: &[],
            },
        ];
        for case in cases {
            let current = current(case.current);
            let alloc = allocate(
                &pools(case.pools),
                case.requesters
                    .iter()
                    .map(|n| (*n, current.get(*n).map_or(&[][..], Vec::as_slice))),
            );
            for (name, want) in case.want {
                assert_eq!(addrs(&alloc, name), *want, "{}: {name}", case.name);
            }
            let exhausted: Vec<&str> = alloc.exhausted.keys().map(String::as_str).collect();
            assert_eq!(exhausted, case.exhausted, "{}", case.name);
        }
    }

    #[test]
    fn exhausted_message_names_the_pool() {
        // A /31 has one assignable address (the network address is never handed out).
        let alloc = allocate(
            &pools(&["10.250.0.0/31"]),
            ["a", "b", "c"].map(|n| (n, &[][..])),
        );
        assert_eq!(alloc.exhausted.len(), 2);
        let msg = &alloc.exhausted["c"];
        assert!(msg.contains("10.250.0.0/31"), "{msg}");
    }

    #[test]
    fn capacity_table() {
        for (pool, want) in [
            ("10.0.0.0/24", 254u128),
            ("10.0.0.0/30", 2),
            ("10.0.0.0/31", 1),
            ("10.0.0.1/32", 0),
            ("fd00::/120", 255),
        ] {
            let pool = Cidr::parse_masked(pool).unwrap();
            assert_eq!(capacity(&pool), want, "{pool}");
        }
    }
}
