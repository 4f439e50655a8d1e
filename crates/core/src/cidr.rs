//! CIDR parsing and overlap checks, over IPv4 and IPv6 alike.

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
