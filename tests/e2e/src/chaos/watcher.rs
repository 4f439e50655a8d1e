//! The plaintext watcher: a capture on every node's underlay link (tcpdump writing pcap, read
//! back here as it grows), counting IPv4 and IPv6 packets whose source and destination are both in
//! the protected ranges (pod CIDRs, tunnel addresses). Encrypted mesh traffic is UDP between
//! node addresses, which are never in those ranges, so every such packet is pod traffic in
//! the clear.
//!
//! Only what a node sends is counted (direction "in" on the root end of its link): a leaked
//! packet forwarded by the underlay router to another node is counted once, on its sender.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::process::ChildGuard;

/// An IPv4 or IPv6 network, such as `10.244.0.0/16` or `fd00:10:244::/48`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    len: u8,
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        fn masked(bits: u128, width: u8, len: u8) -> u128 {
            if len == 0 { 0 } else { bits >> (width - len) }
        }
        match (self.net, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                masked(u32::from(n).into(), 32, self.len)
                    == masked(u32::from(a).into(), 32, self.len)
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                masked(n.into(), 128, self.len) == masked(a.into(), 128, self.len)
            }
            _ => false,
        }
    }
}

impl FromStr for Cidr {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let (ip, len) = s.split_once('/').context("a CIDR needs a prefix length")?;
        let ip: IpAddr = ip.parse()?;
        let len: u8 = len.parse()?;
        let width = if ip.is_ipv4() { 32 } else { 128 };
        if len > width {
            bail!("prefix length {len} > {width}");
        }
        Ok(Cidr { net: ip, len })
    }
}

/// An IP packet's source, destination and protocol (IPv6: the first next header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpHeader {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub protocol: u8,
}

/// The IPv4 or IPv6 header of an Ethernet frame (802.1Q tags skipped); `None` for anything
/// else.
pub fn ip_of_frame(frame: &[u8]) -> Option<IpHeader> {
    let mut at = 12;
    let mut ethertype = u16::from_be_bytes(frame.get(at..at + 2)?.try_into().ok()?);
    while ethertype == 0x8100 || ethertype == 0x88a8 {
        at += 4;
        ethertype = u16::from_be_bytes(frame.get(at..at + 2)?.try_into().ok()?);
    }
    let ip = frame.get(at + 2..)?;
    match ethertype {
        0x0800 if ip.len() >= 20 && ip[0] >> 4 == 4 => {
            let addr = |o: usize| Some(IpAddr::from(<[u8; 4]>::try_from(&ip[o..o + 4]).ok()?));
            Some(IpHeader {
                src: addr(12)?,
                dst: addr(16)?,
                protocol: ip[9],
            })
        }
        0x86dd if ip.len() >= 40 && ip[0] >> 4 == 6 => {
            let addr = |o: usize| Some(IpAddr::from(<[u8; 16]>::try_from(&ip[o..o + 16]).ok()?));
            Some(IpHeader {
                src: addr(8)?,
                dst: addr(24)?,
                protocol: ip[6],
            })
        }
        _ => None,
    }
}

/// Whether a packet is pod traffic in the clear: both ends in the protected ranges.
pub fn is_plaintext(header: &IpHeader, protected: &[Cidr]) -> bool {
    let inside = |ip| protected.iter().any(|c| c.contains(ip));
    inside(header.src) && inside(header.dst)
}

/// Whether either end of a packet is in `protected`.
pub fn touches(header: &IpHeader, protected: &[Cidr]) -> bool {
    let inside = |ip| protected.iter().any(|c| c.contains(ip));
    inside(header.src) || inside(header.dst)
}

/// Byte order and link type of a pcap file, from its 24-byte global header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PcapHeader {
    swapped: bool,
    pub linktype: u32,
}

const PCAP_HEADER_LEN: usize = 24;
const RECORD_HEADER_LEN: usize = 16;

/// Parses a pcap global header (microsecond or nanosecond, either byte order).
pub fn pcap_header(buf: &[u8]) -> Result<Option<PcapHeader>> {
    let Some(h) = buf.get(..PCAP_HEADER_LEN) else {
        return Ok(None);
    };
    let magic = u32::from_le_bytes(h[..4].try_into()?);
    let swapped = match magic {
        0xa1b2_c3d4 | 0xa1b2_3c4d => false,
        0xd4c3_b2a1 | 0x4d3c_b2a1 => true,
        other => bail!("not a pcap file (magic {other:#x})"),
    };
    let word = |o: usize| {
        let b: [u8; 4] = h[o..o + 4].try_into().expect("4 bytes");
        if swapped {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        }
    };
    Ok(Some(PcapHeader {
        swapped,
        linktype: word(20),
    }))
}

/// The complete records in `buf` (after the global header): each record's captured bytes,
/// and how many bytes of `buf` they take. A record still being written is left for later.
pub fn pcap_records<'a>(buf: &'a [u8], header: &PcapHeader) -> (Vec<&'a [u8]>, usize) {
    let mut records = Vec::new();
    let mut at = 0;
    while let Some(rh) = buf.get(at..at + RECORD_HEADER_LEN) {
        let b: [u8; 4] = rh[8..12].try_into().expect("4 bytes");
        let incl = if header.swapped {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        } as usize;
        let Some(data) = buf.get(at + RECORD_HEADER_LEN..at + RECORD_HEADER_LEN + incl) else {
            break;
        };
        records.push(data);
        at += RECORD_HEADER_LEN + incl;
    }
    (records, at)
}

/// Plaintext seen on one node's link so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TapCount {
    pub node: String,
    pub packets: u64,
    pub plaintext: u64,
    /// The first few plaintext packets since [`Watcher::clear_examples`], for failure
    /// messages.
    pub examples: Vec<String>,
}

const EXAMPLES: usize = 5;
/// Bytes of each packet captured: Ethernet, IPv4 and the transport header's ports.
const SNAPLEN: &str = "96";

struct Tap {
    count: TapCount,
    file: PathBuf,
    /// Bytes of the file consumed so far.
    offset: usize,
    header: Option<PcapHeader>,
    tcpdump: Option<ChildGuard>,
}

/// Captures on nodes' underlay links; [`Watcher::poll`] reads what was captured so far.
pub struct Watcher {
    dir: PathBuf,
    protected: Vec<Cidr>,
    /// Counts a packet with either end protected, not only both ([`Watcher::either_end`]).
    either_end: bool,
    taps: Vec<Tap>,
}

impl Watcher {
    /// A watcher counting packets between `protected` ranges; captures go to `dir`.
    pub fn new(dir: &Path, protected: &[&str]) -> Result<Self> {
        Ok(Watcher {
            dir: dir.to_owned(),
            protected: protected.iter().map(|c| c.parse()).collect::<Result<_>>()?,
            either_end: false,
            taps: Vec::new(),
        })
    }

    /// A watcher counting packets with either end in `protected`: behind a NAT a leaked pod
    /// packet leaves with the NAT's address as its source, so only its destination tells.
    pub fn either_end(dir: &Path, protected: &[&str]) -> Result<Self> {
        Ok(Watcher {
            either_end: true,
            ..Watcher::new(dir, protected)?
        })
    }

    /// Starts capturing what node `node` sends on the root-namespace link `link`; returns once
    /// tcpdump is listening.
    pub fn watch(&mut self, node: &str, link: &str) -> Result<()> {
        // Numbered: a link made again (a node rebooted) gets a capture of its own.
        let n = self.taps.len();
        let file = self.dir.join(format!("underlay-{link}-{n}.pcap"));
        let log = self.dir.join(format!("tcpdump-{link}-{n}.log"));
        let mut cmd = Command::new("tcpdump");
        // -Z root: some builds drop to a tcpdump user that cannot write the test's directory.
        cmd.args(["-i", link, "-Q", "in", "-n", "-U", "--immediate-mode"])
            .args(["-s", SNAPLEN, "-Z", "root", "-w"])
            .arg(&file);
        let mut tcpdump = ChildGuard::spawn(&format!("tcpdump {link}"), cmd, &log)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("listening on")
        {
            if !tcpdump.is_running() || Instant::now() > deadline {
                bail!("tcpdump on {link} did not start: {}", tcpdump.log_tail(10));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.taps.push(Tap {
            count: TapCount {
                node: node.to_owned(),
                ..Default::default()
            },
            file,
            offset: 0,
            header: None,
            tcpdump: Some(tcpdump),
        });
        Ok(())
    }

    /// Reads what was captured since the last poll; the counts so far, per link.
    pub fn poll(&mut self) -> Result<Vec<TapCount>> {
        for tap in &mut self.taps {
            let Ok(bytes) = std::fs::read(&tap.file) else {
                continue;
            };
            let header = match tap.header {
                Some(h) => h,
                None => match pcap_header(&bytes)? {
                    Some(h) => {
                        tap.offset = PCAP_HEADER_LEN;
                        tap.header = Some(h);
                        h
                    }
                    None => continue,
                },
            };
            if header.linktype != 1 {
                bail!(
                    "{}: link type {} is not Ethernet",
                    tap.count.node,
                    header.linktype
                );
            }
            let (records, used) = pcap_records(&bytes[tap.offset..], &header);
            tap.offset += used;
            for frame in records {
                tap.count.packets += 1;
                if let Some(h) = ip_of_frame(frame)
                    && (is_plaintext(&h, &self.protected)
                        || self.either_end && touches(&h, &self.protected))
                {
                    tap.count.plaintext += 1;
                    if tap.count.examples.len() < EXAMPLES {
                        tap.count
                            .examples
                            .push(format!("{} > {} proto {}", h.src, h.dst, h.protocol));
                    }
                }
            }
        }
        Ok(self.taps.iter().map(|t| t.count.clone()).collect())
    }

    /// Reads what was captured so far, then forgets the examples of plaintext packets (the
    /// counts stay): the next ones are collected afresh.
    pub fn clear_examples(&mut self) -> Result<()> {
        self.poll()?;
        for tap in &mut self.taps {
            tap.count.examples.clear();
        }
        Ok(())
    }

    /// Plaintext packets seen so far on all links.
    pub fn plaintext(&mut self) -> Result<u64> {
        Ok(self.poll()?.iter().map(|c| c.plaintext).sum())
    }

    /// Stops capturing on `node`'s link (its counts are kept), before the link goes away.
    pub fn unwatch(&mut self, node: &str) -> Result<()> {
        // What it captured until now is still counted.
        self.poll()?;
        for tap in self.taps.iter_mut().filter(|t| t.count.node == node) {
            if let Some(mut t) = tap.tcpdump.take() {
                t.stop(Duration::from_secs(5));
            }
        }
        self.poll()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidrs(list: &[&str]) -> Vec<Cidr> {
        list.iter().map(|c| c.parse().unwrap()).collect()
    }

    /// An Ethernet frame carrying an IPv4 header from `src` to `dst`.
    fn frame(src: [u8; 4], dst: [u8; 4], protocol: u8, vlan: bool) -> Vec<u8> {
        let mut f = vec![0u8; 12];
        if vlan {
            f.extend_from_slice(&[0x81, 0x00, 0x00, 0x05]);
        }
        f.extend_from_slice(&[0x08, 0x00]);
        let mut ip = vec![0x45, 0, 0, 40, 0, 0, 0, 0, 64, protocol, 0, 0];
        ip.extend_from_slice(&src);
        ip.extend_from_slice(&dst);
        f.extend_from_slice(&ip);
        f
    }

    #[test]
    fn cidr_membership() {
        let c: Cidr = "10.244.0.0/16".parse().unwrap();
        assert!(c.contains("10.244.3.7".parse().unwrap()));
        assert!(!c.contains("10.245.0.1".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("192.168.1.1".parse().unwrap()));
        let host: Cidr = "10.250.0.1/32".parse().unwrap();
        assert!(host.contains("10.250.0.1".parse().unwrap()));
        assert!(!host.contains("10.250.0.2".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        let v6: Cidr = "fd00:10:244::/48".parse().unwrap();
        assert!(v6.contains("fd00:10:244:7::2".parse().unwrap()));
        assert!(!v6.contains("fd00:10:245::2".parse().unwrap()));
        assert!(!v6.contains("10.244.0.1".parse().unwrap()));
        assert!("::/129".parse::<Cidr>().is_err());
        assert!("10.0.0.0".parse::<Cidr>().is_err());
    }

    #[test]
    fn classifies_pod_packets_in_the_clear_and_nothing_else() {
        let protected = cidrs(&["10.244.0.0/16", "10.250.0.0/16"]);
        let plain = |src, dst, proto, vlan| {
            ip_of_frame(&frame(src, dst, proto, vlan)).is_some_and(|h| is_plaintext(&h, &protected))
        };
        // Pod to pod, tunnel address to pod, over TCP, UDP or ICMP, tagged or not.
        assert!(plain([10, 244, 1, 2], [10, 244, 2, 2], 6, false));
        assert!(plain([10, 250, 0, 1], [10, 244, 2, 2], 17, false));
        assert!(plain([10, 244, 1, 2], [10, 244, 2, 2], 1, true));
        // WireGuard between node addresses; a pod to the outside world (SNAT'd or not); the
        // controller's gRPC.
        assert!(!plain([192, 168, 1, 1], [192, 168, 1, 2], 17, false));
        assert!(!plain([10, 244, 1, 2], [8, 8, 8, 8], 6, false));
        assert!(!plain([192, 168, 1, 1], [192, 168, 1, 254], 6, false));
        // Not IPv4 at all: ARP, and a truncated frame.
        let mut arp = frame([10, 244, 1, 2], [10, 244, 2, 2], 0, false);
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert_eq!(ip_of_frame(&arp), None);
        assert_eq!(ip_of_frame(&[0u8; 20]), None);
    }

    /// An Ethernet frame carrying an IPv6 header from `src` to `dst`.
    fn frame6(src: &str, dst: &str, next_header: u8) -> Vec<u8> {
        let mut f = vec![0u8; 12];
        f.extend_from_slice(&[0x86, 0xdd]);
        f.extend_from_slice(&[0x60, 0, 0, 0, 0, 20, next_header, 64]);
        f.extend_from_slice(&src.parse::<std::net::Ipv6Addr>().unwrap().octets());
        f.extend_from_slice(&dst.parse::<std::net::Ipv6Addr>().unwrap().octets());
        f
    }

    #[test]
    fn classifies_ipv6_pod_packets_too() {
        let protected = cidrs(&["10.244.0.0/16", "fd00:10:244::/48", "fd00:250::/64"]);
        let plain = |src, dst| {
            ip_of_frame(&frame6(src, dst, 6)).is_some_and(|h| is_plaintext(&h, &protected))
        };
        assert!(plain("fd00:10:244:1::2", "fd00:10:244:2::2"));
        assert!(plain("fd00:250::1", "fd00:10:244:2::2"));
        // WireGuard between node addresses, a pod to the world, a v4 range never matches v6.
        assert!(!plain("fd00:116::1", "fd00:116::2"));
        assert!(!plain("fd00:10:244:1::2", "2001:db8::1"));
        assert!(!plain("::ffff:10.244.1.2", "::ffff:10.244.2.2"));
        let h = ip_of_frame(&frame6("fd00::1", "fd00::2", 58)).unwrap();
        assert_eq!(h.protocol, 58);
        assert_eq!(ip_of_frame(&frame6("fd00::1", "fd00::2", 6)[..40]), None);
    }

    fn pcap(records: &[Vec<u8>], big_endian: bool) -> Vec<u8> {
        let w = |v: u32| {
            if big_endian {
                v.to_be_bytes()
            } else {
                v.to_le_bytes()
            }
        };
        let mut out = Vec::new();
        out.extend_from_slice(&w(0xa1b2_c3d4));
        out.extend_from_slice(&[2, 0, 4, 0].map(|b| b as u8));
        out.extend_from_slice(&[0; 8]);
        out.extend_from_slice(&w(96));
        out.extend_from_slice(&w(1));
        for r in records {
            out.extend_from_slice(&w(1));
            out.extend_from_slice(&w(2));
            out.extend_from_slice(&w(r.len() as u32));
            out.extend_from_slice(&w(1500));
            out.extend_from_slice(r);
        }
        out
    }

    #[test]
    fn reads_complete_pcap_records_and_leaves_a_partial_one() {
        for big_endian in [false, true] {
            let a = frame([10, 244, 1, 2], [10, 244, 2, 2], 6, false);
            let b = frame([192, 168, 1, 1], [192, 168, 1, 2], 17, false);
            let file = pcap(&[a.clone(), b.clone()], big_endian);
            let header = pcap_header(&file).unwrap().unwrap();
            assert_eq!(header.linktype, 1);
            let body = &file[PCAP_HEADER_LEN..];
            let (records, used) = pcap_records(body, &header);
            assert_eq!(records, vec![&a[..], &b[..]]);
            assert_eq!(used, body.len());
            // Cut inside the second record: only the first is read, and reading resumes
            // at the second once it is complete.
            let cut = &body[..body.len() - 3];
            let (records, used) = pcap_records(cut, &header);
            assert_eq!(records, vec![&a[..]]);
            let (rest, _) = pcap_records(&body[used..], &header);
            assert_eq!(rest, vec![&b[..]]);
        }
        assert_eq!(pcap_header(&[0xd4, 0xc3]).unwrap(), None);
        assert!(pcap_header(&[0u8; 24]).is_err());
    }
}
