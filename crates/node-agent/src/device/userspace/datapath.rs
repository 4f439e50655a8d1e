//! The packet loops: TUN to UDP (encrypt), UDP to TUN (decrypt), and the timer tick.
//!
//! Each loop owns its buffers and reuses them for every packet. A peer's `Tunn` is locked only
//! while it encrypts or decrypts into such a buffer; every syscall happens after the lock is
//! released. The peer table is an immutable snapshot loaded once per packet.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::{Packet, Tunn, TunnResult};
use wgmesh_core::PublicKey;

use super::Inner;
use super::peers::{Peer, PeerTable};
use super::sockets::Sockets;

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

/// The TUN reader: packets the kernel routes to the interface, encrypted to their peer.
pub(crate) fn run_tun_reader(inner: &Inner) {
    let mut packet = vec![0u8; BUF_LEN];
    let mut out = vec![0u8; BUF_LEN];
    while !inner.stopping() {
        match inner.tun.read(&mut packet) {
            Ok(n) => handle_tun_packet(inner, &packet[..n], &mut out),
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

fn handle_tun_packet(inner: &Inner, packet: &[u8], out: &mut [u8]) {
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
    match peer.encapsulate(packet, out) {
        TunnResult::WriteToNetwork(buf) => send(inner, peer, buf, endpoint),
        TunnResult::Err(e) => tracing::trace!(error = ?e, "encapsulate"),
        _ => {}
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
    while !inner.stopping() && Arc::ptr_eq(&inner.sockets.load(), &sockets) {
        match socket.recv_from(&mut datagram) {
            Ok((n, src)) => handle_datagram(inner, &datagram[..n], canonical(src), &mut out),
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

fn handle_datagram(inner: &Inner, datagram: &[u8], src: SocketAddr, out: &mut [u8]) {
    let Some(msg_type) = le_u32(datagram, 0) else {
        return;
    };
    let table = inner.table.load();
    let Some(peer) = find_peer(inner, &table, msg_type, datagram, src, out) else {
        return;
    };
    let now = inner.now_ms();
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
            deliver(inner, &table, peer, packet, IpAddr::V4(inner_src));
        }
        TunnResult::WriteToTunnelV6(packet, inner_src) => {
            authenticated(peer);
            deliver(inner, &table, peer, packet, IpAddr::V6(inner_src));
        }
        // A keepalive: authenticated, carries nothing.
        TunnResult::Done if msg_type == DATA => authenticated(peer),
        TunnResult::Done => {}
        TunnResult::Err(e) => tracing::trace!(error = ?e, %src, "decapsulate"),
    }
}

/// Hands a decrypted packet to the kernel if its source is one the peer may use.
fn deliver(inner: &Inner, table: &PeerTable, peer: &Peer, packet: &[u8], inner_src: IpAddr) {
    if !table.routes_to(inner_src, peer) {
        tracing::trace!(%inner_src, peer = %peer.public_key, "source not in allowed IPs");
        return;
    }
    if let Err(e) = inner.tun.write(packet) {
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
