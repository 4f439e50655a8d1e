//! TUN offloads done in userspace. The TUN is opened with a virtio-net header in front of
//! every packet and with TSO and checksum offload on, so the kernel hands us TCP
//! super-packets of up to 64 KiB (one read instead of ~45) with checksums left to us. Here we
//! parse that header, finish partial checksums, and split super-packets into wire-sized
//! segments, exactly as a NIC would before encryption. On the way in, consecutive segments of
//! one TCP flow are coalesced back into a super-packet (GRO), so the kernel's TCP stack and
//! the TUN see one packet and one write instead of dozens.
//!
//! Input comes from the local kernel, but nothing here trusts it: every offset is checked and
//! a malformed packet is an error, never a panic.

/// `struct virtio_net_hdr` (without `num_buffers`): what TUN puts before each packet.
use std::io::IoSlice;

/// PLACEHOLDER
pub(crate) const VNET_HDR_LEN: usize = 10;

const F_NEEDS_CSUM: u8 = 1;
const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;
const GSO_ECN: u8 = 0x80;

const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;
const TCP_CWR: u8 = 0x80;
const PROTO_TCP: u8 = 6;

/// The virtio-net header of one TUN read. Its 16-bit fields are in host byte order (a TUN
/// without TUNSETVNETLE/BE uses the legacy, native order).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VnetHdr {
    pub(crate) fn parse(b: &[u8]) -> Option<VnetHdr> {
        let b = b.get(..VNET_HDR_LEN)?;
        let u16_at = |i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
        Some(VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
        })
    }

    pub(crate) fn write(&self, b: &mut [u8; VNET_HDR_LEN]) {
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_ne_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_ne_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_ne_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_ne_bytes());
    }
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum OffloadError {
    /// Offsets in the header or the packet do not fit the packet.
    Malformed,
    /// A GSO type we did not enable (UDP segmentation).
    Unsupported(u8),
}

/// One's complement sum of `data` as big-endian 16-bit words (odd tail padded with zero),
/// added to `acc`, not folded.
///
/// The bytes are summed in the host's order and the folded result swapped once (RFC 1071,
/// "byte order independence": the sum of byte-swapped words is the byte-swapped sum), 8 bytes
/// per load into four independent accumulators, which the compiler can vectorise; a
/// big-endian loop needs a byte swap per word and one long chain of additions.
pub(crate) fn sum(data: &[u8], acc: u64) -> u64 {
    let mut lanes = [0u64; 4];
    let mut blocks = data.chunks_exact(32);
    for block in &mut blocks {
        for (lane, word) in lanes.iter_mut().zip(block.chunks_exact(8)) {
            let w = u64::from_le_bytes([
                word[0], word[1], word[2], word[3], word[4], word[5], word[6], word[7],
            ]);
            // Both halves, so that a lane cannot overflow (2^33 per block).
            *lane += (w & 0xffff_ffff) + (w >> 32);
        }
    }
    let mut words = blocks.remainder().chunks_exact(4);
    let mut le = lanes.iter().sum::<u64>();
    for w in &mut words {
        le += u64::from(u32::from_le_bytes([w[0], w[1], w[2], w[3]]));
    }
    let rest = words.remainder();
    let mut tail = [0u8; 4];
    tail[..rest.len()].copy_from_slice(rest);
    le += u64::from(u32::from_le_bytes(tail));
    // Little-endian words summed: folded, swapped, it is the big-endian sum.
    let le = if cfg!(target_endian = "little") {
        fold(le).swap_bytes()
    } else {
        fold(le)
    };
    acc + u64::from(le)
}

/// Folds a sum to 16 bits (not complemented).
pub(crate) fn fold(mut acc: u64) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The pseudo-header sum of TCP/UDP over IPv4 or IPv6 for an L4 length, not folded.
fn pseudo_sum(packet: &[u8], l4_len: usize) -> Option<u64> {
    let len = l4_len as u64;
    match packet.first()? >> 4 {
        4 => Some(sum(packet.get(12..20)?, u64::from(PROTO_TCP) + len)),
        6 => Some(sum(packet.get(8..40)?, u64::from(PROTO_TCP) + len)),
        _ => None,
    }
}

/// Finishes the checksum the kernel left for us (`F_NEEDS_CSUM`): the field at
/// `csum_start + csum_offset` holds the pseudo-header sum; the sum runs from `csum_start`.
pub(crate) fn finish_checksum(hdr: &VnetHdr, packet: &mut [u8]) -> Result<(), OffloadError> {
    if hdr.flags & F_NEEDS_CSUM == 0 {
        return Ok(());
    }
    let start = usize::from(hdr.csum_start);
    let at = start + usize::from(hdr.csum_offset);
    if at + 2 > packet.len() {
        return Err(OffloadError::Malformed);
    }
    let c = !fold(sum(&packet[start..], 0));
    // As the kernel does: a computed 0 goes out as 0xffff (0 means "none" for UDP).
    let c = if c == 0 { 0xffff } else { c };
    packet[at..at + 2].copy_from_slice(&c.to_be_bytes());
    Ok(())
}

/// What a TUN read holds: one packet ready to encrypt, or a TCP super-packet to split.
#[derive(Clone, Copy, Debug)]
pub(crate) enum TunPacket {
    Single,
    Tcp(TcpSplit),
}

/// How to split a TCP super-packet into segments.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TcpSplit {
    v6: bool,
    /// Offset of the TCP header (= IP header length).
    l4: usize,
    /// IP + TCP header length: what every segment repeats.
    hdr_len: usize,
    mss: usize,
}

impl TcpSplit {
    /// How many segments the packet makes.
    pub(crate) fn count(&self, packet_len: usize) -> usize {
        packet_len.saturating_sub(self.hdr_len).div_ceil(self.mss)
    }

    /// Writes segment `i` of `packet` into `out` with its headers fixed up (lengths, IPv4 id
    /// and checksum, TCP sequence, flags and checksum). Returns its length, or `None` past the
    /// last segment or when `out` is too small.
    pub(crate) fn segment(&self, packet: &[u8], i: usize, out: &mut [u8]) -> Option<usize> {
        let payload = packet.get(self.hdr_len..)?;
        let off = i.checked_mul(self.mss)?;
        if off >= payload.len() {
            return None;
        }
        let chunk = &payload[off..payload.len().min(off + self.mss)];
        let len = self.hdr_len + chunk.len();
        let seg = out.get_mut(..len)?;
        seg[..self.hdr_len].copy_from_slice(&packet[..self.hdr_len]);
        seg[self.hdr_len..].copy_from_slice(chunk);
        self.fix_up(seg, i, off, off + chunk.len() == payload.len())?;
        Some(len)
    }

    /// Splits `packet` where it lies, handing each segment, headers fixed up, to `each` in
    /// order: segment `i`'s headers are written just before its payload, over the end of
    /// what earlier segments carried, which `each` is done with by then. So no payload is
    /// copied (the copy [`TcpSplit::segment`] makes is a pass over every byte sent), and
    /// `packet` is garbage afterwards. `saved` keeps the original headers; `None` when they
    /// do not fit it.
    pub(crate) fn split_in_place(
        &self,
        packet: &mut [u8],
        saved: &mut [u8],
        mut each: impl FnMut(&[u8]),
    ) -> Option<()> {
        let h = self.hdr_len;
        let saved = saved.get_mut(..h)?;
        saved.copy_from_slice(packet.get(..h)?);
        let payload_len = packet.len() - h;
        for i in 0..self.count(packet.len()) {
            let off = i * self.mss;
            let chunk = self.mss.min(payload_len - off);
            // The headers go to `off..off + h`, all before this segment's payload (at
            // `h + off`): bytes of earlier segments only.
            let seg = &mut packet[off..h + off + chunk];
            if i > 0 {
                seg[..h].copy_from_slice(saved);
            }
            self.fix_up(seg, i, off, off + chunk == payload_len)?;
            each(seg);
        }
        Some(())
    }

    /// Fixes up the headers of segment `i` (`seg`: the super-packet's headers, then the
    /// payload from `off`): lengths, IPv4 id and checksum, TCP sequence, flags and checksum.
    fn fix_up(&self, seg: &mut [u8], i: usize, off: usize, last: bool) -> Option<()> {
        let len = seg.len();
        let l4 = self.l4;
        if self.v6 {
            let plen = u16::try_from(len - 40).ok()?;
            seg[4..6].copy_from_slice(&plen.to_be_bytes());
        } else {
            let total = u16::try_from(len).ok()?;
            seg[2..4].copy_from_slice(&total.to_be_bytes());
            let id = u16::from_be_bytes([seg[4], seg[5]]).wrapping_add(i as u16);
            seg[4..6].copy_from_slice(&id.to_be_bytes());
            seg[10..12].copy_from_slice(&[0, 0]);
            let c = !fold(sum(&seg[..l4], 0));
            seg[10..12].copy_from_slice(&c.to_be_bytes());
        }
        let seq = u32::from_be_bytes([seg[l4 + 4], seg[l4 + 5], seg[l4 + 6], seg[l4 + 7]])
            .wrapping_add(off as u32);
        seg[l4 + 4..l4 + 8].copy_from_slice(&seq.to_be_bytes());
        if !last {
            seg[l4 + 13] &= !(TCP_FIN | TCP_PSH);
        }
        if i != 0 {
            seg[l4 + 13] &= !TCP_CWR;
        }
        seg[l4 + 16..l4 + 18].copy_from_slice(&[0, 0]);
        let c = !fold(sum(&seg[l4..], pseudo_sum(seg, len - l4)?));
        seg[l4 + 16..l4 + 18].copy_from_slice(&c.to_be_bytes());
        Some(())
    }
}

/// Looks at a TUN read (`packet` is what follows the header): a single packet gets its
/// checksum finished in place; a TCP super-packet is checked and described for splitting.
pub(crate) fn classify(hdr: &VnetHdr, packet: &mut [u8]) -> Result<TunPacket, OffloadError> {
    let gso = hdr.gso_type & !GSO_ECN;
    if gso == GSO_NONE {
        finish_checksum(hdr, packet)?;
        return Ok(TunPacket::Single);
    }
    let v6 = match (gso, packet.first().map(|b| b >> 4)) {
        (GSO_TCPV4, Some(4)) => false,
        (GSO_TCPV6, Some(6)) => true,
        (GSO_TCPV4 | GSO_TCPV6, _) => return Err(OffloadError::Malformed),
        (other, _) => return Err(OffloadError::Unsupported(other)),
    };
    let l4 = if v6 {
        // Extension headers may sit between IPv6 and TCP: the kernel says where TCP starts.
        usize::from(hdr.csum_start)
    } else {
        usize::from(packet[0] & 0x0f) * 4
    };
    let min_ip = if v6 { 40 } else { 20 };
    if l4 < min_ip || (!v6 && packet.get(9) != Some(&PROTO_TCP)) {
        return Err(OffloadError::Malformed);
    }
    let tcp_hlen = usize::from(packet.get(l4 + 12).ok_or(OffloadError::Malformed)? >> 4) * 4;
    let hdr_len = l4 + tcp_hlen;
    let mss = usize::from(hdr.gso_size);
    if tcp_hlen < 20 || hdr_len > packet.len() || mss == 0 {
        return Err(OffloadError::Malformed);
    }
    Ok(TunPacket::Tcp(TcpSplit {
        v6,
        l4,
        hdr_len,
        mss,
    }))
}

/// What coalescing needs to know about a decrypted TCP packet.
#[derive(Clone, Copy, Debug)]
struct TcpMeta {
    v6: bool,
    l4: usize,
    hdr_len: usize,
    seq: u32,
    flags: u8,
}

/// A TCP packet that may join a super-packet: unfragmented, no IPv6 extension headers, only
/// ACK (and PSH) set, carrying data, lengths consistent with the buffer.
fn coalescable(p: &[u8]) -> Option<TcpMeta> {
    let (v6, l4) = match p.first()? >> 4 {
        4 => {
            let l4 = usize::from(p[0] & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([*p.get(2)?, *p.get(3)?]));
            // More-fragments or an offset: a fragment is never merged.
            let fragment = u16::from_be_bytes([*p.get(6)?, *p.get(7)?]) & 0x3fff != 0;
            if l4 < 20 || total != p.len() || fragment || *p.get(9)? != PROTO_TCP {
                return None;
            }
            (false, l4)
        }
        6 => {
            let plen = usize::from(u16::from_be_bytes([*p.get(4)?, *p.get(5)?]));
            if plen + 40 != p.len() || *p.get(6)? != PROTO_TCP {
                return None;
            }
            (true, 40)
        }
        _ => return None,
    };
    let hdr_len = l4 + usize::from(*p.get(l4 + 12)? >> 4) * 4;
    let flags = *p.get(l4 + 13)?;
    if hdr_len < l4 + 20 || hdr_len >= p.len() || flags & !TCP_PSH != TCP_ACK {
        return None;
    }
    let seq = u32::from_be_bytes([p[l4 + 4], p[l4 + 5], p[l4 + 6], p[l4 + 7]]);
    Some(TcpMeta {
        v6,
        l4,
        hdr_len,
        seq,
        flags,
    })
}

/// Whether two headers of the same shape agree on everything but the fields that differ
/// between segments of one super-packet (IP length, id, checksum; TCP sequence, checksum,
/// PSH).
fn same_flow(a: &[u8], b: &[u8], m: &TcpMeta) -> bool {
    let l4 = m.l4;
    let ip_same = if m.v6 {
        a[..4] == b[..4] && a[6..40] == b[6..40]
    } else {
        a[..2] == b[..2] && a[6..10] == b[6..10] && a[12..l4] == b[12..l4]
    };
    ip_same
        && a[l4..l4 + 4] == b[l4..l4 + 4]
        && a[l4 + 8..l4 + 13] == b[l4 + 8..l4 + 13]
        && a[l4 + 13] & !TCP_PSH == b[l4 + 13] & !TCP_PSH
        && a[l4 + 14..l4 + 16] == b[l4 + 14..l4 + 16]
        && a[l4 + 18..m.hdr_len] == b[l4 + 18..m.hdr_len]
}

/// The super-packet being built, in the batch's buffer: the first packet where it was
/// decrypted, and the payloads of the others where they were.
#[derive(Clone, Copy, Debug)]
struct Held {
    meta: TcpMeta,
    /// Where the first packet (headers and payload) lies in the buffer, and its length.
    at: usize,
    len: usize,
    /// The IP length of the super-packet so far.
    total: usize,
    /// Payload bytes of every segment but the last (which may be shorter).
    mss: usize,
    next_seq: u32,
    /// A short segment or PSH ends a super-packet, as in the kernel's GRO.
    closed: bool,
}

/// The most segments one super-packet takes (the kernel's GRO stops at 64 too); one `iovec`
/// each.
const MAX_SEGMENTS: usize = 64;

/// GRO for TUN writes: consecutive in-order segments of one TCP flow become one super-packet
/// with a virtio-net header asking the kernel for nothing but the final checksum (which the
/// kernel then does not verify: the AEAD already authenticated every byte).
///
/// Nothing is copied: the packets stay where they were decrypted, the first one's headers
/// are fixed up in place, and the super-packet goes to the kernel as one `writev` of the
/// header, the first packet and the later payloads.
pub(crate) struct Coalescer {
    held: Option<Held>,
    /// The later segments' payloads: where each lies in the buffer, and its length.
    tails: Vec<(usize, usize)>,
}

/// The largest IP packet a super-packet may become (16-bit length fields).
const MAX_SUPER: usize = 65_535;

impl Coalescer {
    pub(crate) fn new() -> Coalescer {
        Coalescer {
            held: None,
            tails: Vec::with_capacity(MAX_SEGMENTS),
        }
    }

    /// Forgets anything held: what a batch that ended early (a panic caught in a worker)
    /// left lies in a buffer the next batch writes over.
    pub(crate) fn reset(&mut self) {
        self.held = None;
        self.tails.clear();
    }

    /// Takes one decrypted packet, `buf[at..at + len]`; `buf` is the same for every packet
    /// until the next [`Coalescer::flush`], and what was pushed stays there unchanged.
    /// Whatever cannot join the held super-packet first flushes it through `write`, so
    /// packets reach the kernel in the order they came.
    pub(crate) fn push(
        &mut self,
        buf: &mut [u8],
        at: usize,
        len: usize,
        write: &mut impl FnMut(&[IoSlice<'_>]),
    ) {
        let Some(packet) = at.checked_add(len).and_then(|end| buf.get(at..end)) else {
            return;
        };
        let meta = coalescable(packet);
        if let (Some(h), Some(m)) = (self.held.as_mut(), meta) {
            let payload = packet.len() - m.hdr_len;
            let held = &buf[h.at..h.at + h.len];
            if !h.closed
                && m.v6 == h.meta.v6
                && m.hdr_len == h.meta.hdr_len
                && m.seq == h.next_seq
                && payload <= h.mss
                && h.total + payload <= MAX_SUPER
                && self.tails.len() + 1 < MAX_SEGMENTS
                && same_flow(held, packet, &h.meta)
            {
                self.tails.push((at + m.hdr_len, payload));
                h.total += payload;
                h.next_seq = h.next_seq.wrapping_add(payload as u32);
                h.closed = payload < h.mss || m.flags & TCP_PSH != 0;
                if m.flags & TCP_PSH != 0 {
                    buf[h.at + h.meta.l4 + 13] |= TCP_PSH;
                }
                return;
            }
        }
        self.flush(buf, write);
        match meta {
            Some(m) => {
                let payload = len - m.hdr_len;
                self.held = Some(Held {
                    meta: m,
                    at,
                    len,
                    total: len,
                    mss: payload,
                    next_seq: m.seq.wrapping_add(payload as u32),
                    closed: m.flags & TCP_PSH != 0,
                });
            }
            None => write(&[IoSlice::new(&NO_OFFLOAD), IoSlice::new(&buf[at..at + len])]),
        }
    }

    /// Writes what is held, if anything.
    pub(crate) fn flush(&mut self, buf: &mut [u8], write: &mut impl FnMut(&[IoSlice<'_>])) {
        let Some(h) = self.held.take() else {
            return;
        };
        let Some(first) = buf.get_mut(h.at..h.at + h.len) else {
            self.tails.clear();
            return;
        };
        if self.tails.is_empty() {
            write(&[IoSlice::new(&NO_OFFLOAD), IoSlice::new(first)]);
            return;
        }
        let m = h.meta;
        if m.v6 {
            first[4..6].copy_from_slice(&((h.total - 40) as u16).to_be_bytes());
        } else {
            first[2..4].copy_from_slice(&(h.total as u16).to_be_bytes());
            first[10..12].copy_from_slice(&[0, 0]);
            let c = !fold(sum(&first[..m.l4], 0));
            first[10..12].copy_from_slice(&c.to_be_bytes());
        }
        // CHECKSUM_PARTIAL: the field holds the pseudo-header sum, not complemented.
        let partial = pseudo_sum(first, h.total - m.l4).map_or(0, fold);
        first[m.l4 + 16..m.l4 + 18].copy_from_slice(&partial.to_be_bytes());
        let mut hdr = [0u8; VNET_HDR_LEN];
        VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: if m.v6 { GSO_TCPV6 } else { GSO_TCPV4 },
            hdr_len: m.hdr_len as u16,
            gso_size: h.mss as u16,
            csum_start: m.l4 as u16,
            csum_offset: 16,
        }
        .write(&mut hdr);
        let mut iov = [IoSlice::new(&[]); MAX_SEGMENTS + 1];
        iov[0] = IoSlice::new(&hdr);
        iov[1] = IoSlice::new(&buf[h.at..h.at + h.len]);
        let mut n = 2;
        for &(at, len) in &self.tails {
            if let Some(payload) = buf.get(at..at + len) {
                iov[n] = IoSlice::new(payload);
                n += 1;
            }
        }
        write(&iov[..n]);
        self.tails.clear();
    }
}

/// The virtio-net header of a packet that needs nothing from the kernel.
const NO_OFFLOAD: [u8; VNET_HDR_LEN] = [0; VNET_HDR_LEN];

#[cfg(test)]
mod tests {
    use super::*;

    /// A TCP/IPv4 packet from 10.0.0.1:1000 to 10.0.0.2:2000 with `payload` and flags.
    fn tcp4(payload: &[u8], seq: u32, flags: u8) -> Vec<u8> {
        let total = 40 + payload.len();
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[4..6].copy_from_slice(&7u16.to_be_bytes());
        p[8] = 64;
        p[9] = PROTO_TCP;
        p[12..16].copy_from_slice(&[10, 0, 0, 1]);
        p[16..20].copy_from_slice(&[10, 0, 0, 2]);
        let c = !fold(sum(&p[..20], 0));
        p[10..12].copy_from_slice(&c.to_be_bytes());
        p[20..22].copy_from_slice(&1000u16.to_be_bytes());
        p[22..24].copy_from_slice(&2000u16.to_be_bytes());
        p[24..28].copy_from_slice(&seq.to_be_bytes());
        p[32] = 5 << 4;
        p[33] = flags;
        p[40..].copy_from_slice(payload);
        let c = !fold(sum(&p[20..], pseudo_sum(&p, total - 20).unwrap()));
        p[36..38].copy_from_slice(&c.to_be_bytes());
        p
    }

    fn tcp6(payload: &[u8], seq: u32, flags: u8) -> Vec<u8> {
        let total = 60 + payload.len();
        let mut p = vec![0u8; total];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&((total - 40) as u16).to_be_bytes());
        p[6] = PROTO_TCP;
        p[7] = 64;
        p[8..24].copy_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        p[24..40].copy_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        p[44..48].copy_from_slice(&seq.to_be_bytes());
        p[52] = 5 << 4;
        p[53] = flags;
        p[60..].copy_from_slice(payload);
        let c = !fold(sum(&p[40..], pseudo_sum(&p, total - 40).unwrap()));
        p[56..58].copy_from_slice(&c.to_be_bytes());
        p
    }

    fn checksum_ok(p: &[u8]) -> bool {
        let (l4, ip_ok) = if p[0] >> 4 == 4 {
            (20, fold(sum(&p[..20], 0)) == 0xffff)
        } else {
            (40, true)
        };
        ip_ok && fold(sum(&p[l4..], pseudo_sum(p, p.len() - l4).unwrap())) == 0xffff
    }

    fn gso(gso_type: u8, mss: u16, csum_start: u16) -> VnetHdr {
        VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type,
            hdr_len: 0,
            gso_size: mss,
            csum_start,
            csum_offset: 16,
        }
    }

    #[test]
    fn checksum_matches_rfc1071_example() {
        // RFC 1071 section 3: the words 0001 f203 f4f5 f6f7 sum to ddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(sum(&data, 0)), 0xddf2);
        assert_eq!(
            fold(sum(&data[..7], 0)),
            fold(sum(&[0, 1, 0xf2, 3, 0xf4, 0xf5, 0xf6], 0))
        );
        assert_eq!(fold(sum(&[0xab], 0)), 0xab00);
    }

    /// The sum word by word, big-endian, as RFC 1071 defines it.
    fn reference_sum(data: &[u8]) -> u16 {
        let mut acc = 0u64;
        for w in data.chunks(2) {
            acc += u64::from(u16::from_be_bytes([w[0], w.get(1).copied().unwrap_or(0)]));
        }
        fold(acc)
    }

    #[test]
    fn checksum_matches_the_word_by_word_sum_at_every_length_and_offset() {
        let data: Vec<u8> = (0..1600u32).map(|i| (i * 131 + i / 7) as u8).collect();
        let ones = vec![0xffu8; 1600];
        for buf in [&data, &ones] {
            for start in 0..9 {
                for len in (0..200).chain([1387, 1388, 1499, 1591]) {
                    let d = &buf[start..start + len];
                    let got = fold(sum(d, 0));
                    let want = reference_sum(d);
                    // 0 and 0xffff are the same one's complement number; only an all-zero
                    // input sums to 0.
                    assert!(
                        got == want || (got ^ want == 0xffff && got & want == 0),
                        "{start} {len}"
                    );
                    assert_eq!(fold(sum(d, 0x1_2345)), fold(u64::from(want) + 0x1_2345));
                }
            }
        }
    }

    #[test]
    fn header_round_trips() {
        let h = VnetHdr {
            flags: 1,
            gso_type: GSO_TCPV4,
            hdr_len: 54,
            gso_size: 1368,
            csum_start: 20,
            csum_offset: 16,
        };
        let mut b = [0u8; VNET_HDR_LEN];
        h.write(&mut b);
        assert_eq!(VnetHdr::parse(&b), Some(h));
        assert_eq!(VnetHdr::parse(&b[..9]), None);
    }

    fn split_all(hdr: &VnetHdr, packet: &mut [u8]) -> Vec<Vec<u8>> {
        let TunPacket::Tcp(split) = classify(hdr, packet).unwrap() else {
            panic!("not split");
        };
        let mut out = vec![0u8; 65536];
        let segs: Vec<Vec<u8>> = (0..split.count(packet.len()))
            .map(|i| {
                let n = split.segment(packet, i, &mut out).unwrap();
                out[..n].to_vec()
            })
            .collect();
        assert!(split.segment(packet, segs.len(), &mut out).is_none());
        // Split where it lies, the segments are the same.
        let mut garbled = packet.to_vec();
        let mut saved = [0u8; 120];
        let mut in_place = Vec::new();
        split
            .split_in_place(&mut garbled, &mut saved, |s| in_place.push(s.to_vec()))
            .unwrap();
        assert_eq!(in_place, segs);
        segs
    }

    #[test]
    fn splits_in_place_whatever_the_segment_size() {
        let payload: Vec<u8> = (0..3001u32).map(|i| (i * 13) as u8).collect();
        // Segments smaller than the headers too: their headers go over older segments' bytes.
        for mss in [1, 7, 39, 40, 41, 536, 1000, 1448, 3000, 3001, 9000] {
            let mut sp = tcp4(&payload, 77, TCP_PSH | TCP_ACK);
            let segs = split_all(&gso(GSO_TCPV4, mss, 20), &mut sp);
            assert_eq!(segs.len(), 3001usize.div_ceil(usize::from(mss)), "{mss}");
            let carried: Vec<u8> = segs.iter().flat_map(|s| s[40..].to_vec()).collect();
            assert_eq!(carried, payload, "{mss}");
            assert!(segs.iter().all(|s| checksum_ok(s)), "{mss}");
            let mut sp6 = tcp6(&payload, 77, TCP_ACK);
            let segs = split_all(&gso(GSO_TCPV6, mss, 40), &mut sp6);
            let carried: Vec<u8> = segs.iter().flat_map(|s| s[60..].to_vec()).collect();
            assert_eq!(carried, payload, "{mss}");
        }
        // Headers that do not fit what keeps them: nothing is handed over.
        let mut sp = tcp4(&payload, 0, TCP_ACK);
        let TunPacket::Tcp(split) = classify(&gso(GSO_TCPV4, 1000, 20), &mut sp).unwrap() else {
            panic!("not split");
        };
        let mut n = 0;
        assert!(
            split
                .split_in_place(&mut sp, &mut [0u8; 39], |_| n += 1)
                .is_none()
        );
        assert_eq!(n, 0);
    }

    #[test]
    fn splits_tcp4_like_the_kernel_would_have_sent_it() {
        let payload: Vec<u8> = (0..2500u32).map(|i| i as u8).collect();
        let mut sp = tcp4(&payload, 0xffff_fff0, TCP_PSH | TCP_FIN | TCP_CWR | 0x10);
        let segs = split_all(&gso(GSO_TCPV4 | GSO_ECN, 1000, 20), &mut sp);
        assert_eq!(segs.len(), 3);
        for (i, s) in segs.iter().enumerate() {
            let len = if i < 2 { 1000 } else { 500 };
            let seq = 0xffff_fff0u32.wrapping_add(1000 * i as u32);
            let want = tcp4(&payload[1000 * i..1000 * i + len], seq, s[33]);
            assert_eq!(s[20..], want[20..]);
            assert_eq!(s[2..4], want[2..4]);
            assert_eq!(u16::from_be_bytes([s[4], s[5]]), 7 + i as u16);
            assert!(checksum_ok(s));
        }
        assert_eq!(segs[0][33], TCP_CWR | 0x10);
        assert_eq!(segs[1][33], 0x10);
        assert_eq!(segs[2][33], TCP_PSH | TCP_FIN | 0x10);
    }

    #[test]
    fn splits_tcp6() {
        let payload = vec![0x5a; 3000];
        let mut sp = tcp6(&payload, 1, TCP_PSH | 0x10);
        let segs = split_all(&gso(GSO_TCPV6, 1440, 40), &mut sp);
        assert_eq!(segs.len(), 3);
        assert_eq!(segs[2].len(), 60 + 120);
        for s in &segs {
            assert_eq!(usize::from(u16::from_be_bytes([s[4], s[5]])), s.len() - 40);
            assert!(checksum_ok(s));
        }
    }

    #[test]
    fn finishes_a_partial_checksum() {
        let mut p = tcp4(b"hello, world!", 5, 0x18);
        let want = p.clone();
        // What the kernel leaves: the folded pseudo-header sum, not complemented.
        let partial = fold(pseudo_sum(&p, p.len() - 20).unwrap());
        p[36..38].copy_from_slice(&partial.to_be_bytes());
        let hdr = VnetHdr {
            flags: F_NEEDS_CSUM,
            csum_start: 20,
            csum_offset: 16,
            ..VnetHdr::default()
        };
        assert!(matches!(classify(&hdr, &mut p), Ok(TunPacket::Single)));
        assert_eq!(p, want);
    }

    #[test]
    fn rejects_what_does_not_fit_without_panicking() {
        let mut p = tcp4(&[1; 100], 0, 0x10);
        let bad_csum = VnetHdr {
            flags: F_NEEDS_CSUM,
            csum_start: 130,
            csum_offset: 16,
            ..VnetHdr::default()
        };
        assert_eq!(
            classify(&bad_csum, &mut p).err(),
            Some(OffloadError::Malformed)
        );
        assert!(classify(&gso(GSO_TCPV6, 100, 40), &mut p).is_err());
        assert!(classify(&gso(GSO_TCPV4, 0, 20), &mut p).is_err());
        assert_eq!(
            classify(&gso(5, 100, 20), &mut p).err(),
            Some(OffloadError::Unsupported(5))
        );
        for n in 0..p.len() {
            let mut short = p[..n].to_vec();
            if let Ok(TunPacket::Tcp(s)) = classify(&gso(GSO_TCPV4, 30, 20), &mut short) {
                let mut out = [0u8; 200];
                for i in 0..s.count(n) + 1 {
                    let _ = s.segment(&short, i, &mut out);
                }
                let _ = s.split_in_place(&mut short, &mut out, |_| {});
            }
        }
        let mut v6 = tcp6(&[1; 50], 0, 0x10);
        assert!(classify(&gso(GSO_TCPV6, 10, 500), &mut v6).is_err());
        assert!(classify(&gso(GSO_TCPV6, 10, 4), &mut v6).is_err());
    }

    /// What a write hands the kernel, as one buffer.
    fn joined(iov: &[IoSlice<'_>]) -> Vec<u8> {
        iov.iter().flat_map(|s| s.iter().copied()).collect()
    }

    /// The packets back to back in one buffer (as decrypted), pushed, flushed: the writes.
    fn coalesce(packets: &[Vec<u8>]) -> Vec<Vec<u8>> {
        let mut buf: Vec<u8> = packets.concat();
        let mut c = Coalescer::new();
        let mut written = Vec::new();
        let mut at = 0;
        for p in packets {
            c.push(&mut buf, at, p.len(), &mut |b| written.push(joined(b)));
            at += p.len();
        }
        c.flush(&mut buf, &mut |b| written.push(joined(b)));
        written
    }

    /// Undoes what the kernel would: segments a written super-packet again.
    fn resegment(written: &[u8]) -> Vec<Vec<u8>> {
        let hdr = VnetHdr::parse(written).unwrap();
        let mut p = written[VNET_HDR_LEN..].to_vec();
        if hdr.gso_type == GSO_NONE {
            assert_eq!(hdr, VnetHdr::default());
            return vec![p];
        }
        assert_eq!(hdr.flags, F_NEEDS_CSUM);
        assert_eq!(usize::from(hdr.hdr_len), usize::from(hdr.csum_start) + 20);
        split_all(&hdr, &mut p)
    }

    #[test]
    fn coalesces_what_it_split_and_the_kernel_gets_the_same_segments() {
        for v6 in [false, true] {
            let payload: Vec<u8> = (0..5000u32).map(|i| (i * 7) as u8).collect();
            let (mut sp, hdr) = if v6 {
                (
                    tcp6(&payload, 9, TCP_PSH | TCP_ACK),
                    gso(GSO_TCPV6, 1300, 40),
                )
            } else {
                (
                    tcp4(&payload, 9, TCP_PSH | TCP_ACK),
                    gso(GSO_TCPV4, 1300, 20),
                )
            };
            let segs = split_all(&hdr, &mut sp);
            let written = coalesce(&segs);
            assert_eq!(written.len(), 1);
            let w = VnetHdr::parse(&written[0]).unwrap();
            assert_eq!(w.gso_size, 1300);
            assert_eq!(w.gso_type, if v6 { GSO_TCPV6 } else { GSO_TCPV4 });
            assert_eq!(resegment(&written[0]), segs);
        }
    }

    #[test]
    fn keeps_order_and_breaks_runs_where_the_kernel_would() {
        let payload = vec![3u8; 4000];
        let mut sp = tcp4(&payload, 100, TCP_ACK);
        let segs = split_all(&gso(GSO_TCPV4, 1000, 20), &mut sp);
        let other_flow = {
            let mut p = tcp4(&[1; 1000], 5000, TCP_ACK);
            p[20..22].copy_from_slice(&1001u16.to_be_bytes());
            p
        };
        let udp = {
            let mut p = tcp4(&[9; 30], 0, 0);
            p[9] = 17;
            p
        };
        let syn = tcp4(&[], 1, 0x02);
        // In order: 0 1 | udp | 2 | other | 3, then a gap (segment 1 again), a SYN.
        let input = vec![
            segs[0].clone(),
            segs[1].clone(),
            udp.clone(),
            segs[2].clone(),
            other_flow.clone(),
            segs[3].clone(),
            segs[1].clone(),
            syn.clone(),
        ];
        let out: Vec<Vec<Vec<u8>>> = coalesce(&input).iter().map(|w| resegment(w)).collect();
        let want: Vec<Vec<Vec<u8>>> = vec![
            vec![segs[0].clone(), segs[1].clone()],
            vec![udp],
            vec![segs[2].clone()],
            vec![other_flow],
            vec![segs[3].clone()],
            vec![segs[1].clone()],
            vec![syn],
        ];
        assert_eq!(out, want);
    }

    #[test]
    fn a_short_segment_or_push_ends_a_super_packet() {
        let mut a = tcp4(&[1; 1000], 0, TCP_ACK);
        let b = tcp4(&[2; 500], 1000, TCP_ACK);
        let c = tcp4(&[3; 500], 1500, TCP_ACK);
        assert_eq!(coalesce(&[a.clone(), b.clone(), c.clone()]).len(), 2);
        a[33] |= TCP_PSH;
        assert_eq!(coalesce(&[a, b]).len(), 2);
    }

    #[test]
    fn coalescer_survives_garbage() {
        let mut c = Coalescer::new();
        let mut n = 0;
        let good = tcp4(&[5; 200], 0, TCP_ACK);
        for len in 0..good.len() {
            for flip in [0usize, 2, 3, 9, 32, 46] {
                let mut p = good[..len].to_vec();
                if let Some(b) = p.get_mut(flip) {
                    *b ^= 0xff;
                }
                c.push(&mut p, 0, len, &mut |_| n += 1);
                c.flush(&mut p, &mut |_| n += 1);
            }
        }
        let mut big = vec![0x45; 70_000];
        c.push(&mut big, 0, 70_000, &mut |_| n += 1);
        c.push(&mut big, 69_000, 2_000, &mut |_| n += 1);
        c.push(&mut big, usize::MAX, 2, &mut |_| n += 1);
        c.flush(&mut big, &mut |_| n += 1);
        assert!(n > 0);
    }

    #[test]
    fn a_super_packet_stops_at_64_segments() {
        let segs: Vec<Vec<u8>> = (0..100u32)
            .map(|i| tcp4(&[i as u8; 100], 1 + 100 * i, TCP_ACK))
            .collect();
        let written = coalesce(&segs);
        assert_eq!(written.len(), 2);
        let back: Vec<Vec<u8>> = written.iter().flat_map(|w| resegment(w)).collect();
        assert_eq!(resegment(&written[0]).len(), MAX_SEGMENTS);
        assert_eq!(back.len(), segs.len());
        // The same segments (IPv4 ids aside, which resegmenting numbers anew).
        for (b, s) in back.iter().zip(&segs) {
            assert!(b[..4] == s[..4] && b[12..] == s[12..] && checksum_ok(b));
        }
    }
}
