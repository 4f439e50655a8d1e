//! CIDR parsing and overlap checks, over IPv4 and IPv6 alike.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    #[error("{input:?} is not a CIDR (expected address/prefix, such as 10.0.0.0/24 or fd00::/64)")]
    Syntax { input: String },
    #[error("{input:?} has host bits set; the network is {network}")]
    HostBits { input: String, network: IpNet },
}

/// A network in canonical form (no host bits set), such as `10.244.1.0/24`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr(IpNet);

impl Cidr {
    /// Parses a CIDR and refuses host bits (`10.0.0.1/24`): in a pool or a route they are
    /// almost always a typo, and silently masking them would hide it.
    pub fn parse_strict(s: &str) -> Result<Self, CidrError> {
        let net = parse_net(s)?;
        if net.trunc() != net {
            return Err(CidrError::HostBits {
                input: s.to_owned(),
                network: net.trunc(),
            });
        }
        Ok(Cidr(net))
    }

    /// Parses a CIDR and masks host bits, as `wg` does for allowed IPs. A bare address is a
    /// host route (`/32` or `/128`).
    pub fn parse_masked(s: &str) -> Result<Self, CidrError> {
        Ok(Cidr(parse_net(s)?.trunc()))
    }

    pub fn host(addr: IpAddr) -> Self {
        Cidr(IpNet::from(addr))
    }

    pub fn net(&self) -> IpNet {
        self.0
    }

    pub fn addr(&self) -> IpAddr {
        self.0.addr()
    }

    pub fn prefix_len(&self) -> u8 {
        self.0.prefix_len()
    }

    pub fn is_ipv4(&self) -> bool {
        matches!(self.0, IpNet::V4(_))
    }

    pub fn contains_addr(&self, addr: IpAddr) -> bool {
        self.0.contains(&addr)
    }

    /// Whether the two networks share any address. Two CIDRs overlap exactly when one
    /// contains the other.
    pub fn overlaps(&self, other: &Cidr) -> bool {
        self.0.contains(&other.0) || other.0.contains(&self.0)
    }
}

fn parse_net(s: &str) -> Result<IpNet, CidrError> {
    let t = s.trim();
    let syntax = || CidrError::Syntax {
        input: s.to_owned(),
    };
    if t.contains('/') {
        t.parse::<IpNet>().map_err(|_| syntax())
    } else {
        t.parse::<IpAddr>().map(IpNet::from).map_err(|_| syntax())
    }
}

impl FromStr for Cidr {
    type Err = CidrError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Cidr::parse_strict(s)
    }
}

impl From<IpNet> for Cidr {
    fn from(net: IpNet) -> Self {
        Cidr(net.trunc())
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Debug for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Cidr({})", self.0)
    }
}

/// A sorted, de-duplicated set of CIDRs with overlap queries.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct CidrSet(Vec<Cidr>);

impl CidrSet {
    pub fn new(cidrs: impl IntoIterator<Item = Cidr>) -> Self {
        let mut v: Vec<Cidr> = cidrs.into_iter().collect();
        v.sort();
        v.dedup();
        CidrSet(v)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Cidr> {
        self.0.iter()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn contains_addr(&self, addr: IpAddr) -> bool {
        self.0.iter().any(|c| c.contains_addr(addr))
    }

    /// The first pair `(ours, theirs)` that overlaps, if any.
    pub fn first_overlap(&self, other: &CidrSet) -> Option<(Cidr, Cidr)> {
        self.0
            .iter()
            .find_map(|a| other.0.iter().find(|b| a.overlaps(b)).map(|b| (*a, *b)))
    }

    /// The first pair of members of this set that overlap each other.
    pub fn first_self_overlap(&self) -> Option<(Cidr, Cidr)> {
        self.0.iter().enumerate().find_map(|(i, a)| {
            self.0[i + 1..]
                .iter()
                .find(|b| a.overlaps(b))
                .map(|b| (*a, *b))
        })
    }
}

impl FromIterator<Cidr> for CidrSet {
    fn from_iter<T: IntoIterator<Item = Cidr>>(iter: T) -> Self {
        CidrSet::new(iter)
    }
}

/// Networks, each with a value, that answer "which of you overlaps this network first" (in
/// insertion order) without scanning them all: claims and reserved ranges are checked for
/// every peer of a mesh, and a scan made that O(nodes^2). Two CIDRs overlap exactly when one
/// contains the other, so the stored networks containing a query are found by truncating it
/// to each stored prefix length, and those inside it by a range over network addresses.
#[derive(Debug, Clone)]
pub struct OverlapIndex<T> {
    entries: Vec<(Cidr, T)>,
    /// (IPv6?, network bits, prefix length) -> positions in `entries`.
    by_network: BTreeMap<(bool, u128, u8), Vec<usize>>,
    /// The (IPv6?, prefix length) pairs stored.
    prefix_lens: BTreeSet<(bool, u8)>,
}

impl<T> Default for OverlapIndex<T> {
    fn default() -> Self {
        OverlapIndex {
            entries: Vec::new(),
            by_network: BTreeMap::new(),
            prefix_lens: BTreeSet::new(),
        }
    }
}

impl<T> OverlapIndex<T> {
    pub fn insert(&mut self, cidr: Cidr, value: T) {
        let (v6, bits) = network_bits(&cidr);
        let at = self.entries.len();
        self.entries.push((cidr, value));
        self.by_network
            .entry((v6, bits, cidr.prefix_len()))
            .or_default()
            .push(at);
        self.prefix_lens.insert((v6, cidr.prefix_len()));
    }

    /// The earliest inserted network overlapping `cidr`, with its value.
    pub fn first_overlap(&self, cidr: &Cidr) -> Option<&(Cidr, T)> {
        let (v6, start) = network_bits(cidr);
        let width: u8 = if v6 { 128 } else { 32 };
        let mut first: Option<usize> = None;
        let mut consider = |at: usize| first = Some(first.map_or(at, |f| f.min(at)));
        // Stored networks that contain it: its own network truncated to their length.
        for &(_, len) in self.prefix_lens.range((v6, 0)..=(v6, cidr.prefix_len())) {
            let truncated = start & !host_mask(width, len);
            if let Some(found) = self.by_network.get(&(v6, truncated, len)) {
                found.iter().copied().for_each(&mut consider);
            }
        }
        // Stored networks inside it: their network address falls within it.
        let end = start | host_mask(width, cidr.prefix_len());
        for found in self
            .by_network
            .range((v6, start, 0)..=(v6, end, u8::MAX))
            .map(|(_, v)| v)
        {
            found.iter().copied().for_each(&mut consider);
        }
        first.map(|at| &self.entries[at])
    }
}

/// The family and the network address of `cidr` as a number.
fn network_bits(cidr: &Cidr) -> (bool, u128) {
    match cidr.0 {
        IpNet::V4(n) => (false, u128::from(n.network().to_bits())),
        IpNet::V6(n) => (true, n.network().to_bits()),
    }
}

/// The host bits of a prefix of `len` in an address of `width` bits.
fn host_mask(width: u8, len: u8) -> u128 {
    let host = u32::from(width.saturating_sub(len));
    if host >= 128 {
        u128::MAX
    } else {
        (1u128 << host) - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_strict_table() {
        let cases: &[(&str, Option<&str>)] = &[
            ("10.0.0.0/8", Some("10.0.0.0/8")),
            (" 10.244.1.0/24 ", Some("10.244.1.0/24")),
            ("fd00::/64", Some("fd00::/64")),
            ("0.0.0.0/0", Some("0.0.0.0/0")),
            ("::/0", Some("::/0")),
            ("10.1.2.3", Some("10.1.2.3/32")),
            ("fd00::1", Some("fd00::1/128")),
            ("10.0.0.1/24", None),
            ("10.0.0.0/33", None),
            ("fd00::/129", None),
            ("10.0.0/24", None),
            ("300.0.0.0/8", None),
            ("", None),
            ("/24", None),
            ("example.com/24", None),
        ];
        for (input, want) in cases {
            let got = Cidr::parse_strict(input).ok().map(|c| c.to_string());
            assert_eq!(got.as_deref(), *want, "input {input:?}");
        }
    }

    #[test]
    fn parse_masked_keeps_network() {
        assert_eq!(
            Cidr::parse_masked("10.0.0.1/24").unwrap().to_string(),
            "10.0.0.0/24"
        );
        assert!(matches!(
            Cidr::parse_strict("10.0.0.1/24"),
            Err(CidrError::HostBits { .. })
        ));
    }

    /// The index finds what a scan in insertion order finds, over many networks of both
    /// families and every prefix length (a fixed pseudo-random sequence).
    #[test]
    fn overlap_index_agrees_with_a_scan() {
        let mut state: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut random_cidr = || {
            let r = next();
            if r % 3 == 0 {
                // A few top bits vary, so that networks nest often.
                let addr =
                    std::net::Ipv6Addr::from((u128::from(next() % 16) << 124) | u128::from(next()));
                Cidr::from(IpNet::from(ipnet::Ipv6Net::new(addr, (r % 129) as u8).unwrap()).trunc())
            } else {
                let addr =
                    std::net::Ipv4Addr::from(((next() % 8) as u32) << 29 | (next() as u32 >> 8));
                Cidr::from(IpNet::from(ipnet::Ipv4Net::new(addr, (r % 33) as u8).unwrap()).trunc())
            }
        };
        let mut index = OverlapIndex::default();
        let mut stored: Vec<Cidr> = Vec::new();
        for round in 0..400 {
            let query = random_cidr();
            let scan = stored.iter().position(|c| c.overlaps(&query));
            let found = index
                .first_overlap(&query)
                .map(|(c, at): &(Cidr, usize)| (*c, *at));
            assert_eq!(
                found,
                scan.map(|at| (stored[at], at)),
                "round {round}: {query}"
            );
            let c = random_cidr();
            index.insert(c, stored.len());
            stored.push(c);
        }
        let none: OverlapIndex<()> = OverlapIndex::default();
        assert!(none.first_overlap(&"0.0.0.0/0".parse().unwrap()).is_none());
    }

    #[test]
    fn overlap_table() {
        let cases: &[(&str, &str, bool)] = &[
            ("10.0.0.0/8", "10.1.0.0/16", true),
            ("10.1.0.0/16", "10.0.0.0/8", true),
            ("10.0.0.0/24", "10.0.1.0/24", false),
            ("10.0.0.0/24", "10.0.0.0/24", true),
            ("10.0.0.0/8", "fd00::/8", false),
            ("0.0.0.0/0", "192.168.1.1/32", true),
            ("fd00::/64", "fd00::1/128", true),
            ("fd00::/64", "fd00:0:0:1::/64", false),
        ];
        for (a, b, want) in cases {
            let a: Cidr = a.parse().unwrap();
            let b: Cidr = b.parse().unwrap();
            assert_eq!(a.overlaps(&b), *want, "{a} vs {b}");
        }
    }

    #[test]
    fn set_overlaps() {
        let set: CidrSet = ["10.0.0.0/24", "10.0.1.0/24", "10.0.0.0/24"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(set.len(), 2, "duplicates are removed");
        assert_eq!(set.first_self_overlap(), None);
        let other: CidrSet = ["192.168.0.0/16", "10.0.1.128/25"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let (ours, theirs) = set.first_overlap(&other).unwrap();
        assert_eq!(ours.to_string(), "10.0.1.0/24");
        assert_eq!(theirs.to_string(), "10.0.1.128/25");
        let nested: CidrSet = ["10.0.0.0/8", "10.2.0.0/16"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert!(nested.first_self_overlap().is_some());
        assert!(set.contains_addr("10.0.1.7".parse().unwrap()));
    }
}
