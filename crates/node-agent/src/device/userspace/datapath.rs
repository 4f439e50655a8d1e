//! The packet loops: TUN to UDP (encrypt), UDP to TUN (decrypt), and the timer tick.
//!
//! Each loop owns its buffers and reuses them for every packet. A peer's `Tunn` is locked only
//! while it encrypts or decrypts into such a buffer; every syscall happens after the lock is
//! released. The peer table is an immutable snapshot loaded once per read.
//!
//! Bulk TCP is batched at both ends: a TUN read returns a TCP super-packet (TSO), split here
//! into segments that are encrypted under one lock into one buffer and sent with one UDP GSO
//! syscall; a UDP read returns a run of coalesced datagrams (GRO), whose decrypted TCP
//! segments are coalesced again into super-packets, one TUN write each.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::{Packet, Tunn, TunnResult};
use wgmesh_core::PublicKey;

use super::Inner;
use super::offload::{self, Coalescer, TunPacket, VNET_HDR_LEN, VnetHdr};
use super::peers::{Peer, PeerTable};
use super::sockets::{self, MAX_GSO_BYTES, MAX_GSO_SEGMENTS, Sockets};

/// Large enough for any IP packet plus WireGuard's overhead, and for any UDP datagram.
pub(crate) const BUF_LEN: usize = 65536 + 256;

/// How often boringtun's timers run (its documentation asks for about 250 ms), and how
/// often blocked loops look at the stop flag.
pub(crate) const TICK: Duration = Duration::from_millis(250);

const HANDSHAKE_INIT: u32 = 1;
const HANDSHAKE_RESP: u32 = 2;
const COOKIE_REPLY: u32 = 3;
const DATA: u32 = 4;

fn le_u32(b: &[u8], at: usize) -> Option<u32> {
    let bytes = b.get(at..at + 4)?;
    Some(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
}

/// Sends to the peer and counts it; failures are the network's business (WireGuard is
/// unreliable by design), so they are only traced.
fn send(inner: &Inner, peer: &Peer, buf: &[u8], to: SocketAddr) {
    match inner.sockets.load().send_to(buf, to) {
        Ok(n) => peer.count_tx(n, inner.now_ms()),
        Err(e) => tracing::trace!(error = %e, %to, "send failed"),
    }
}

/// What the TUN reader reuses for every read.
struct TxBuffers {
    /// One TUN read: virtio-net header and packet.
    read: Vec<u8>,
    /// One segment of a super-packet, before encryption.
    segment: Vec<u8>,
    /// Encrypted datagrams back to back, and their lengths.
    out: Vec<u8>,
    lens: Vec<usize>,
}

/// Room `out` must have for one more encrypted packet of `len` bytes (boringtun wants
/// `len + 32`, and 148 for a handshake initiation).
fn room_for(len: usize) -> usize {
    (len + 32).max(148)
}

/// The TUN reader: packets the kernel routes to the interface, encrypted to their peer.
pub(crate) fn run_tun_reader(inner: &Inner) {
    let mut b = TxBuffers {
        read: vec![0u8; BUF_LEN],
        segment: vec![0u8; BUF_LEN],
        // A 64 KiB super-packet grows by 32 bytes per segment; twice that is always enough
        // for one super-packet at a sensible MSS (a tiny one is sent in several batches).
        out: vec![0u8; 2 * BUF_LEN],
        lens: Vec::with_capacity(256),
    };
    while !inner.stopping() {
        match inner.tun.read(&mut b.read) {
            Ok(n) => handle_tun_read(inner, n, &mut b),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if let Err(e) = inner.tun.wait_readable(TICK) {
                    tracing::warn!(error = %e, "waiting on the TUN device");
                    std::thread::sleep(TICK);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                // The interface may have been deleted under us; do not spin.
                tracing::warn!(error = %e, "reading the TUN device");
                std::thread::sleep(TICK);
            }
        }
    }
}

fn handle_tun_read(inner: &Inner, n: usize, b: &mut TxBuffers) {
    let Some(read) = b.read.get_mut(..n) else {
        return;
    };
    let Some(hdr) = VnetHdr::parse(read) else {
        return;
    };
    let packet = &mut read[VNET_HDR_LEN..];
    let kind = match offload::classify(&hdr, packet) {
        Ok(kind) => kind,
        Err(e) => {
            tracing::trace!(error = ?e, ?hdr, "dropping a TUN packet");
            return;
        }
    };
    let packet = &*packet;
    let Some(dst) = Tunn::dst_address(packet) else {
        return;
    };
    let table = inner.table.load();
    let Some(peer) = table.by_allowed_ip(dst) else {
        tracing::trace!(%dst, "no peer for destination");
        return;
    };
    // Without an endpoint there is nowhere to send, not even a handshake.
    let Some(endpoint) = peer.endpoint() else {
        return;
    };
    match kind {
        TunPacket::Single => match peer.encapsulate(packet, &mut b.out) {
            TunnResult::WriteToNetwork(buf) => send(inner, peer, buf, endpoint),
            TunnResult::Err(e) => tracing::trace!(error = ?e, "encapsulate"),
            _ => {}
        },
        TunPacket::Tcp(split) => {
            let count = split.count(packet.len());
            let mut i = 0;
            while i < count {
                b.lens.clear();
                let mut used = 0;
                {
                    let mut tunn = peer.tunn();
                    while i < count {
                        let Some(len) = split.segment(packet, i, &mut b.segment) else {
                            i = count;
                            break;
                        };
                        if b.out.len() - used < room_for(len) {
                            break;
                        }
                        i += 1;
                        match tunn.encapsulate(&b.segment[..len], &mut b.out[used..]) {
                            TunnResult::WriteToNetwork(buf) => {
                                used += buf.len();
                                b.lens.push(buf.len());
                            }
                            TunnResult::Err(e) => tracing::trace!(error = ?e, "encapsulate"),
                            _ => {}
                        }
                    }
                }
                send_batch(inner, peer, &b.out[..used], &b.lens, endpoint);
            }
        }
    }
}

/// Sends datagrams that lie back to back in `buf` with lengths `lens`: each run of equal
/// lengths (the run's last may be shorter) in one GSO send.
fn send_batch(inner: &Inner, peer: &Peer, buf: &[u8], lens: &[usize], to: SocketAddr) {
    let sockets = inner.sockets.load();
    let mut start = 0;
    let mut i = 0;
    while i < lens.len() {
        let segment = lens[i];
        let mut bytes = 0;
        let mut j = i;
        while j < lens.len()
            && j - i < MAX_GSO_SEGMENTS
            && bytes + lens[j] <= MAX_GSO_BYTES
            && (lens[j] == segment || (lens[j] < segment && j > i))
        {
            bytes += lens[j];
            j += 1;
            if lens[j - 1] < segment {
                break;
            }
        }
        let Some(run) = buf.get(start..start + bytes) else {
            return;
        };
        match sockets.send_segments(run, segment, to) {
            Ok(n) => peer.count_tx(n, inner.now_ms()),
            Err(e) => tracing::trace!(error = %e, %to, "send failed"),
        }
        start += bytes;
        i = j;
    }
}

/// A UDP reader for one socket of `sockets`. It ends when the device stops or the sockets are
/// replaced (listen port change).
pub(crate) fn run_udp_reader(inner: &Inner, sockets: Arc<Sockets>, v6: bool) {
    let socket = if v6 {
        match &sockets.v6 {
            Some(s) => s,
            None => return,
        }
    } else {
        &sockets.v4
    };
    let mut datagram = vec![0u8; BUF_LEN];
    let mut out = vec![0u8; BUF_LEN];
    let mut cmsg = sockets::gro_cmsg_space();
    let mut rx = Coalescer::new();
    while !inner.stopping() && Arc::ptr_eq(&inner.sockets.load(), &sockets) {
        match sockets::recv(socket, &mut datagram, &mut cmsg) {
            Ok(r) => {
                let src = canonical(r.from);
                let received = &datagram[..r.len.min(datagram.len())];
                // With GRO the buffer holds datagrams of `segment` bytes (the last shorter).
                // One table snapshot and one clock read for the whole run of datagrams.
                let table = inner.table.load();
                let now = inner.now_ms();
                for d in received.chunks(r.segment.unwrap_or(r.len).max(1)) {
                    handle_datagram(inner, &table, now, d, src, &mut out, &mut rx);
                }
                rx.flush(&mut |b| write_tun(inner, b));
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => {
                tracing::trace!(error = %e, "UDP receive");
                // ICMP errors surface here as ECONNREFUSED and the like: keep going, slowly
                // only if the socket is truly broken.
                if !matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionReset
                ) {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }
}

fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(a) => match a.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), a.port()),
            None => addr,
        },
        v4 => v4,
    }
}

/// Finds the peer a datagram is for, without locking anything.
fn find_peer<'t>(
    inner: &Inner,
    table: &'t PeerTable,
    msg_type: u32,
    datagram: &[u8],
    src: SocketAddr,
    out: &mut [u8],
) -> Option<&'t Arc<Peer>> {
    match msg_type {
        HANDSHAKE_INIT => {
            // MAC1 and load check before the Diffie-Hellman that finds the sender, so that
            // unauthenticated floods cost little and get cookies under load.
            let id = &table.identity;
            match id.rate_limiter.verify_packet(Some(src.ip()), datagram, out) {
                Ok(Packet::HandshakeInit(init)) => {
                    match parse_handshake_anon(&id.secret, &id.public, &init) {
                        Ok(half) => table
                            .by_key(&PublicKey::from_bytes(half.peer_static_public))
                            .map(|e| &e.peer),
                        Err(e) => {
                            tracing::trace!(error = ?e, %src, "handshake from unknown key");
                            None
                        }
                    }
                }
                Err(TunnResult::WriteToNetwork(cookie)) => {
                    let _ = inner.sockets.load().send_to(cookie, src);
                    None
                }
                _ => None,
            }
        }
        HANDSHAKE_RESP => table.by_receiver_index(le_u32(datagram, 8)?),
        COOKIE_REPLY | DATA => table.by_receiver_index(le_u32(datagram, 4)?),
        _ => None,
    }
}

fn handle_datagram(
    inner: &Inner,
    table: &PeerTable,
    now: u64,
    datagram: &[u8],
    src: SocketAddr,
    out: &mut [u8],
    rx: &mut Coalescer,
) {
    let Some(msg_type) = le_u32(datagram, 0) else {
        return;
    };
    // Decrypted packets land after room for the virtio-net header the TUN wants.
    let Some(out) = out.get_mut(VNET_HDR_LEN..) else {
        return;
    };
    let Some(peer) = find_peer(inner, table, msg_type, datagram, src, out) else {
        return;
    };
    // Roaming and counters follow only packets that authenticate as this peer.
    let authenticated = |peer: &Peer| {
        peer.set_endpoint(src);
        peer.count_rx(datagram.len(), now);
    };
    match peer.decapsulate(Some(src.ip()), datagram, out) {
        TunnResult::WriteToNetwork(reply) => {
            let reply_type = le_u32(reply, 0).unwrap_or(0);
            if reply_type == COOKIE_REPLY {
                // Our answer to a handshake while under load: the sender is not yet proven.
                let _ = inner.sockets.load().send_to(reply, src);
                return;
            }
            authenticated(peer);
            // A response sent (we are responder) or a response received (we are initiator)
            // is a completed handshake: the moment boringtun starts the new session.
            if (msg_type == HANDSHAKE_INIT && reply_type == HANDSHAKE_RESP)
                || msg_type == HANDSHAKE_RESP
            {
                peer.handshake_completed(SystemTime::now());
            }
            send(inner, peer, reply, src);
            // Packets queued while the handshake was pending go out now.
            while let TunnResult::WriteToNetwork(queued) = peer.decapsulate(None, &[], out) {
                send(inner, peer, queued, src);
            }
        }
        TunnResult::WriteToTunnelV4(packet, inner_src) => {
            authenticated(peer);
            deliver(inner, table, peer, packet, IpAddr::V4(inner_src), rx);
        }
        TunnResult::WriteToTunnelV6(packet, inner_src) => {
            authenticated(peer);
            deliver(inner, table, peer, packet, IpAddr::V6(inner_src), rx);
        }
        // A keepalive: authenticated, carries nothing.
        TunnResult::Done if msg_type == DATA => authenticated(peer),
        TunnResult::Done => {}
        TunnResult::Err(e) => tracing::trace!(error = ?e, %src, "decapsulate"),
    }
}

/// Hands a decrypted packet to the kernel, through the coalescer, if its source is one the
/// peer may use.
fn deliver(
    inner: &Inner,
    table: &PeerTable,
    peer: &Peer,
    packet: &[u8],
    inner_src: IpAddr,
    rx: &mut Coalescer,
) {
    if !table.routes_to(inner_src, peer) {
        tracing::trace!(%inner_src, peer = %peer.public_key, "source not in allowed IPs");
        return;
    }
    rx.push(packet, &mut |b| write_tun(inner, b));
}

/// One virtio-net header and its packet to the kernel.
fn write_tun(inner: &Inner, buf: &[u8]) {
    if let Err(e) = inner.tun.write(buf) {
        tracing::trace!(error = %e, "TUN write");
    }
}

/// One round of timers for every peer: retransmits, rekeys, keepalives, expiry.
pub(crate) fn timer_tick(inner: &Inner, out: &mut [u8]) {
    let table = inner.table.load();
    table.identity.rate_limiter.reset_count();
    let now = inner.now_ms();
    for entry in &table.entries {
        let peer = &entry.peer;
        let endpoint = peer.endpoint();
        match peer.update_timers(out) {
            TunnResult::WriteToNetwork(buf) => {
                if let Some(ep) = endpoint {
                    send(inner, peer, buf, ep);
                }
            }
            TunnResult::Err(WireGuardError::ConnectionExpired) | TunnResult::Done => {}
            TunnResult::Err(e) => tracing::trace!(error = ?e, "timers"),
            _ => {}
        }
        // Persistent keepalive as the kernel does it: when nothing authenticated went either
        // way for the interval. Without a session this starts a handshake.
        let interval = u64::from(peer.keepalive()) * 1000;
        if let Some(ep) = endpoint
            && interval > 0
            && now.saturating_sub(peer.last_activity_ms()) >= interval
        {
            peer.touch(now);
            if let TunnResult::WriteToNetwork(buf) = peer.encapsulate(&[], out) {
                send(inner, peer, buf, ep);
            }
        }
    }
}
