//! The readers: TUN to workers (to encrypt), UDP to workers (to decrypt), handshakes, and
//! the timer tick. The TUN and the IPv4 socket are read by one I/O thread in turns
//! (`run_io`), the IPv6 socket by its own.
//!
//! Each reader owns its buffers and reuses them. A reader fetches packets and decides whose
//! they are; the encryption or decryption, and the syscalls that finish the job, happen in
//! `workers`: on the peer's worker, or in the reader itself (small batches, and every batch
//! while the node has no idle core). Handshake messages are rare and handled by the UDP
//! reader itself. The peer table is an immutable snapshot loaded once per read.
//!
//! Bulk TCP is batched at both ends: a TUN read returns a TCP super-packet (TSO), split here
//! into segments that are encrypted under one lock and sent with one UDP GSO syscall; a UDP
//! receive returns runs of coalesced datagrams (GRO, several runs per `recvmmsg`), whose
//! decrypted TCP segments are coalesced again into super-packets, one TUN write each.

use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::{Packet, Tunn, TunnResult};
use wgmesh_core::PublicKey;

use super::Inner;
use super::limits::{BUF_LEN, TICK};
use super::offload::{self, TunPacket, VNET_HDR_LEN, VnetHdr};
use super::peers::{Peer, PeerTable};
use super::sockets::{BatchReceiver, RECV_BATCH, Received, Sockets};
use super::workers::{Direction, Scratch, open, seal};

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
    let started = inner.now_ms();
    match inner.sockets.load().send_to(buf, to) {
        Ok(n) => peer.count_tx(n, started, inner.now_ms()),
        Err(e) => tracing::trace!(error = %e, %to, "send failed"),
    }
}

/// TUN reads taken per wake-up at most. After a small packet the reader takes what else is
/// waiting, so that a burst of small packets (ACKs, request/response traffic of many flows)
/// is sealed under one lock per peer and leaves in GSO runs, not one `sendto` each.
const TUN_READS: usize = 8;

/// What the TUN reader reuses for every wake-up.
struct TunReader {
    /// TUN reads (virtio-net header and packet each), and how long each is.
    reads: Vec<Vec<u8>>,
    lens: Vec<usize>,
    /// One segment of a super-packet the reader encrypts itself.
    segment: Vec<u8>,
    scratch: Scratch,
}

impl TunReader {
    fn new() -> TunReader {
        TunReader {
            reads: (0..TUN_READS).map(|_| vec![0u8; BUF_LEN]).collect(),
            lens: Vec::with_capacity(TUN_READS),
            segment: vec![0u8; BUF_LEN],
            scratch: Scratch::new(),
        }
    }

    /// One wake-up's TUN reads (a super-packet, or up to `TUN_READS` small packets), each
    /// encrypted to its peer (on its worker, or here; see `workers`). False when nothing was
    /// waiting.
    fn step(&mut self, inner: &Inner) -> bool {
        self.lens.clear();
        match inner.tun.read(&mut self.reads[0]) {
            Ok(n) => {
                self.lens.push(n);
                // A super-packet is a batch already.
                let small = VnetHdr::parse(&self.reads[0][..n]).is_some_and(|h| h.gso_type == 0);
                while small && self.lens.len() < TUN_READS {
                    let k = self.lens.len();
                    match inner.tun.read(&mut self.reads[k]) {
                        Ok(n) => self.lens.push(n),
                        // Nothing more waiting (or an error the next wake-up will see).
                        Err(_) => break,
                    }
                }
                handle_tun_reads(inner, self);
                true
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => true,
            Err(e) => {
                // The interface may have been deleted under us; do not spin.
                tracing::warn!(error = %e, "reading the TUN device");
                std::thread::sleep(TICK);
                false
            }
        }
    }
}

/// The device's I/O thread: packets the kernel routes to the interface, encrypted to their
/// peer, and datagrams on the IPv4 socket, decrypted to the kernel, in one loop that takes
/// turns and sleeps only when neither has anything waiting.
///
/// One thread for both directions, not one per file descriptor: in bulk TCP each direction
/// carries the other's ACKs, and a thread per descriptor was woken for nearly every one of
/// them (a wake-up, two context switches, and contention for the peer's session with the
/// thread busy in the other direction), which cost more than the ACKs themselves. The
/// turn-taking loop finds them without sleeping. Parallelism where cores are free comes from
/// the crypto workers; the IPv6 socket keeps its own reader.
pub(crate) fn run_io(inner: &Inner) {
    let mut tun = TunReader::new();
    let mut udp = UdpReader::new(inner);
    while !inner.stopping() {
        let sockets = inner.sockets.load_full();
        let sent = tun.step(inner);
        let received = udp.step(inner, &sockets.v4, false);
        if !sent
            && !received
            && let Err(e) = inner.tun.wait_readable_or(&sockets.v4, TICK)
        {
            tracing::warn!(error = %e, "waiting on the TUN device and the socket");
            std::thread::sleep(TICK);
        }
    }
}

/// Where one TUN read goes.
#[derive(Clone, Copy)]
struct Outgoing<'t> {
    peer: SamePeer<'t>,
    endpoint: SocketAddr,
    kind: TunPacket,
    /// Packets it makes (segments of a super-packet).
    count: usize,
}

/// Finishes a TUN read's checksum or checks its super-packet, and finds its peer. `None`:
/// dropped (malformed, no peer, or no endpoint to send to, not even a handshake).
fn outgoing<'t>(table: &'t PeerTable, read: &mut [u8]) -> Option<Outgoing<'t>> {
    let hdr = VnetHdr::parse(read)?;
    let packet = read.get_mut(VNET_HDR_LEN..)?;
    let kind = match offload::classify(&hdr, packet) {
        Ok(kind) => kind,
        Err(e) => {
            tracing::trace!(error = ?e, ?hdr, "dropping a TUN packet");
            return None;
        }
    };
    let dst = Tunn::dst_address(packet)?;
    let Some(peer) = table.by_allowed_ip(dst) else {
        tracing::trace!(%dst, "no peer for destination");
        return None;
    };
    let count = match &kind {
        TunPacket::Single => 1,
        TunPacket::Tcp(split) => split.count(packet.len()),
    };
    Some(Outgoing {
        peer: SamePeer(peer),
        endpoint: peer.endpoint()?,
        kind,
        count,
    })
}

/// The reads of one wake-up, in order; consecutive reads for one peer go as one batch.
fn handle_tun_reads(inner: &Inner, r: &mut TunReader) {
    let table = inner.table.load();
    let mut out: [Option<Outgoing>; TUN_READS] = [None; TUN_READS];
    for (k, &n) in r.lens.iter().enumerate() {
        out[k] = r.reads[k]
            .get_mut(..n)
            .and_then(|read| outgoing(&table, read));
    }
    let reads = r.lens.len();
    let mut k = 0;
    while k < reads {
        let Some(first) = out[k] else {
            k += 1;
            continue;
        };
        let mut end = k + 1;
        while end < reads
            && out[end].is_some_and(|o| o.peer == first.peer && o.endpoint == first.endpoint)
        {
            end += 1;
        }
        send_reads(inner, r, &out[k..end], k);
        k = end;
    }
}

/// Encrypts and sends reads `first..` (all for one peer, described by `group`): here, or on
/// the peer's worker in batches.
fn send_reads(inner: &Inner, r: &mut TunReader, group: &[Option<Outgoing>], first: usize) {
    let Some(Some(head)) = group.first() else {
        return;
    };
    let (peer, endpoint) = (head.peer.0, head.endpoint);
    let count = group.iter().flatten().map(|o| o.count).sum();
    let TunReader {
        reads,
        lens,
        segment,
        scratch,
    } = r;
    let workers = &inner.workers;
    let Some(worker) = workers.take(peer, Direction::Encrypt, count) else {
        // Here, super-packets are split where they lie: the sealer copies each segment out
        // before the next one's headers go over the end of its payload.
        seal(inner, scratch, peer, endpoint, |sealer| {
            for (o, k) in group.iter().flatten().zip(first..) {
                let packet = &mut reads[k][VNET_HDR_LEN..lens[k]];
                match o.kind {
                    TunPacket::Single => sealer.push(packet),
                    TunPacket::Tcp(split) => {
                        if split
                            .split_in_place(packet, segment, |s| sealer.push(s))
                            .is_none()
                        {
                            tracing::trace!("dropping a super-packet that does not split");
                        }
                    }
                }
            }
        });
        return;
    };
    let packets = group
        .iter()
        .flatten()
        .zip(first..)
        .map(|(o, k)| (o.kind, o.count, &reads[k][VNET_HDR_LEN..lens[k]]));
    // For the worker: the packets, and the super-packets' segments, into batches.
    let mut batch = workers.batch();
    let mut used = 0;
    for (kind, count, packet) in packets {
        for i in 0..count {
            let fill = |buf: &mut [u8]| match kind {
                TunPacket::Single => buf.get_mut(..packet.len()).map(|b| {
                    b.copy_from_slice(packet);
                    packet.len()
                }),
                TunPacket::Tcp(split) => split.segment(packet, i, buf),
            };
            let len = match fill(&mut batch.buf[used..]) {
                Some(len) => len,
                // Full: what is in it goes, the rest follows in the next batch.
                None if used > 0 => {
                    worker.encrypt(
                        peer,
                        endpoint,
                        std::mem::replace(&mut batch, workers.batch()),
                    );
                    used = 0;
                    match fill(&mut batch.buf) {
                        Some(len) => len,
                        None => continue,
                    }
                }
                None => continue,
            };
            used += len;
            batch.lens.push(len);
        }
    }
    if !batch.lens.is_empty() {
        worker.encrypt(peer, endpoint, batch);
    }
}

/// What a UDP reader reuses for every receive.
struct UdpReader {
    bufs: [Vec<u8>; RECV_BATCH],
    receiver: BatchReceiver,
    got: Vec<Received>,
    out: Vec<u8>,
    scratch: Scratch,
}

impl UdpReader {
    fn new(inner: &Inner) -> UdpReader {
        UdpReader {
            bufs: std::array::from_fn(|_| inner.workers.batch().buf),
            receiver: BatchReceiver::new(),
            got: Vec::with_capacity(RECV_BATCH),
            out: vec![0u8; BUF_LEN],
            scratch: Scratch::new(),
        }
    }

    /// One `recvmmsg` on `socket` (waiting for the first read with `wait`) and what it
    /// brought: transport data handed to the peer's worker or decrypted here, handshakes
    /// answered here. False when nothing came.
    fn step(&mut self, inner: &Inner, socket: &UdpSocket, wait: bool) -> bool {
        match self
            .receiver
            .recv(socket, &mut self.bufs, &mut self.got, wait)
        {
            Ok(()) => {
                // One table snapshot for everything this call received.
                let table = inner.table.load();
                for r in &self.got {
                    let Some(buf) = self.bufs.get_mut(r.slot) else {
                        continue;
                    };
                    handle_read(inner, &table, buf, r, &mut self.out, &mut self.scratch);
                }
                true
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                false
            }
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
                true
            }
        }
    }
}

/// A reader for the IPv6 socket of `sockets` (the IPv4 one is the I/O thread's, see
/// [`run_io`]): several reads per `recvmmsg`, transport data handed to the peer's worker,
/// handshakes answered here. It ends when the device stops or the sockets are replaced
/// (listen port change).
pub(crate) fn run_udp6_reader(inner: &Inner, sockets: Arc<Sockets>) {
    let Some(socket) = &sockets.v6 else {
        return;
    };
    let mut udp = UdpReader::new(inner);
    while !inner.stopping() && Arc::ptr_eq(&inner.sockets.load(), &sockets) {
        udp.step(inner, socket, true);
    }
}

/// What a read is: its length, the size of its datagrams, and their sender.
struct Read {
    len: usize,
    segment: usize,
    src: SocketAddr,
}

/// One read: a datagram, or a GRO run of datagrams of `r.segment` bytes (the last shorter)
/// from one sender. Transport data is opened in runs of one peer (almost always the whole
/// read), on the peer's worker or here; anything else is handled here, in order.
fn handle_read(
    inner: &Inner,
    table: &PeerTable,
    buf: &mut Vec<u8>,
    r: &Received,
    out: &mut [u8],
    scratch: &mut Scratch,
) {
    let len = r.len.min(buf.len());
    let read = Read {
        len,
        segment: r.segment.unwrap_or(len).max(1),
        src: canonical(r.from),
    };
    let data_peer = |d: &[u8]| {
        (le_u32(d, 0) == Some(DATA))
            .then(|| table.by_receiver_index(le_u32(d, 4)?).map(SamePeer))
            .flatten()
    };
    let mut pieces = Pieces::new(read.len, read.segment);
    while let Some(piece) = pieces.next(buf, data_peer) {
        match piece {
            Piece::Data(SamePeer(peer), range) => {
                open_run(inner, buf, &read, range, peer, scratch);
            }
            Piece::Other(range) => handle_control(inner, table, &buf[range], read.src, out),
        }
    }
}

/// A peer compared by identity, so that runs of one peer's datagrams can be found.
#[derive(Clone, Copy)]
struct SamePeer<'t>(&'t Arc<Peer>);

impl PartialEq for SamePeer<'_> {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(self.0, other.0)
    }
}

/// A piece of a read: a run of consecutive transport-data datagrams of one peer, or one other
/// datagram; ranges are byte ranges of the read.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Piece<K> {
    Data(K, std::ops::Range<usize>),
    Other(std::ops::Range<usize>),
}

/// Cuts a read of `len` bytes, a datagram every `segment` bytes (the last may be shorter),
/// into pieces, in order. Not an `Iterator`: the caller may move the buffer between pieces
/// (a whole-read run is always the last piece).
struct Pieces {
    len: usize,
    segment: usize,
    at: usize,
}

impl Pieces {
    fn new(len: usize, segment: usize) -> Pieces {
        Pieces {
            len,
            segment: segment.max(1),
            at: 0,
        }
    }

    /// The next piece of `buf`; `peer_of` says whose transport data a datagram is (`None`:
    /// anything else).
    fn next<K: Copy + PartialEq>(
        &mut self,
        buf: &[u8],
        peer_of: impl Fn(&[u8]) -> Option<K>,
    ) -> Option<Piece<K>> {
        let len = self.len.min(buf.len());
        let end_of = |at: usize| (at + self.segment).min(len);
        let start = self.at;
        if start >= len {
            return None;
        }
        let mut end = end_of(start);
        let piece = match peer_of(&buf[start..end]) {
            None => Piece::Other(start..end),
            Some(peer) => {
                while end < len && peer_of(&buf[end..end_of(end)]) == Some(peer) {
                    end = end_of(end);
                }
                Piece::Data(peer, start..end)
            }
        };
        self.at = end;
        Some(piece)
    }
}

/// Opens the datagrams in `buf[range]` (cut every `segment` bytes), all `peer`'s: here, or on
/// its worker, to which the buffer moves when the run is the whole read (no copy).
fn open_run(
    inner: &Inner,
    buf: &mut Vec<u8>,
    read: &Read,
    range: std::ops::Range<usize>,
    peer: &Arc<Peer>,
    scratch: &mut Scratch,
) {
    let (segment, src) = (read.segment, read.src);
    let run = &buf[range.clone()];
    let count = run.len().div_ceil(segment);
    let workers = &inner.workers;
    let Some(worker) = workers.take(peer, Direction::Decrypt, count) else {
        open(inner, scratch, peer, src, run.chunks(segment));
        return;
    };
    let mut batch = workers.batch();
    if range == (0..read.len) {
        std::mem::swap(buf, &mut batch.buf);
    } else {
        batch.buf[..run.len()].copy_from_slice(run);
    }
    batch.lens.extend(received_lens(range.len(), segment));
    worker.decrypt(peer, src, batch);
}

/// The lengths of the datagrams in a read of `len` bytes cut every `segment` bytes.
fn received_lens(len: usize, segment: usize) -> impl Iterator<Item = usize> {
    (0..len)
        .step_by(segment)
        .map(move |at| segment.min(len - at))
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
                Ok(Packet::HandshakeInit(_))
                    if !inner.handshake_sources.allow(src.ip(), inner.now_ms()) =>
                {
                    tracing::trace!(%src, "handshake initiations from this address too fast");
                    None
                }
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

/// A datagram that is not transport data of a known peer: handshake messages and cookie
/// replies go through the peer's session here; anything else is dropped.
fn handle_control(
    inner: &Inner,
    table: &PeerTable,
    datagram: &[u8],
    src: SocketAddr,
    out: &mut [u8],
) {
    let Some(msg_type) = le_u32(datagram, 0) else {
        return;
    };
    if msg_type == DATA {
        return;
    }
    let Some(peer) = find_peer(inner, table, msg_type, datagram, src, out) else {
        return;
    };
    match peer.decapsulate(Some(src.ip()), datagram, out) {
        TunnResult::WriteToNetwork(reply) => {
            let reply_type = le_u32(reply, 0).unwrap_or(0);
            if reply_type == COOKIE_REPLY {
                // Our answer to a handshake while under load: the sender is not yet proven.
                let _ = inner.sockets.load().send_to(reply, src);
                return;
            }
            // Roaming and counters follow only packets that authenticate as this peer.
            peer.set_endpoint(src);
            peer.count_rx(datagram.len(), inner.now_ms());
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
        TunnResult::Err(e) => tracing::trace!(error = ?e, %src, "decapsulate"),
        _ => {}
    }
}

/// A handshake initiation to each of `peers` that has an endpoint, unless one is under way
/// already (boringtun retransmits it until answered).
pub(crate) fn initiate_handshakes<'p>(
    inner: &Inner,
    peers: impl IntoIterator<Item = &'p Arc<Peer>>,
    out: &mut [u8],
) {
    for peer in peers {
        initiate_handshake(inner, peer, false, out);
    }
}

/// A handshake initiation to `peer`, if it has an endpoint. `force`: even if one is under
/// way (boringtun still accepts the answer to the one it replaces, not to older ones).
pub(crate) fn initiate_handshake(inner: &Inner, peer: &Peer, force: bool, out: &mut [u8]) {
    let Some(endpoint) = peer.endpoint() else {
        return;
    };
    let initiation = peer.tunn().format_handshake_initiation(out, force);
    if let TunnResult::WriteToNetwork(buf) = initiation {
        send(inner, peer, buf, endpoint);
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
        // Passive keepalive as the kernel does it: data came in and nothing went back for
        // KEEPALIVE_TIMEOUT. Persistent keepalive as well: when nothing authenticated went
        // either way for the interval. Without a session either starts a handshake.
        let interval = u64::from(peer.keepalive()) * 1000;
        let passive = peer.take_due_keepalive(now);
        if let Some(ep) = endpoint
            && (passive || interval > 0 && now.saturating_sub(peer.last_activity_ms()) >= interval)
        {
            peer.touch(now);
            if let TunnResult::WriteToNetwork(buf) = peer.encapsulate(&[], out) {
                send(inner, peer, buf, ep);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Cuts `datagrams` (laid back to back; the first byte says whose data each is, 0 for
    /// anything else) as a read with `segment`-byte datagrams.
    fn cut(datagrams: &[&[u8]], segment: usize) -> Vec<Piece<u8>> {
        let buf: Vec<u8> = datagrams.concat();
        let mut pieces = Pieces::new(buf.len(), segment);
        let mut out = Vec::new();
        while let Some(p) = pieces.next(&buf, |d| d.first().copied().filter(|&b| b != 0)) {
            out.push(p);
        }
        out
    }

    /// A case: its name, the datagrams, the segment size, and the pieces wanted.
    type Case<'a> = (&'a str, &'a [&'a [u8]], usize, Vec<Piece<u8>>);

    #[test]
    fn a_read_is_cut_into_runs_of_one_peer_and_single_others() {
        use Piece::{Data, Other};
        let cases: &[Case] = &[
            ("empty", &[], 4, vec![]),
            ("one datagram", &[&[7, 0, 0]], 3, vec![Data(7, 0..3)]),
            (
                "one peer, last shorter",
                &[&[7, 0, 0, 0], &[7, 0, 0, 0], &[7, 0]],
                4,
                vec![Data(7, 0..10)],
            ),
            (
                "two peers",
                &[&[7, 0], &[7, 0], &[8, 0], &[7, 0]],
                2,
                vec![Data(7, 0..4), Data(8, 4..6), Data(7, 6..8)],
            ),
            (
                "others stand alone and split runs",
                &[&[0, 1], &[0, 2], &[7, 0], &[0, 3], &[7, 0]],
                2,
                vec![
                    Other(0..2),
                    Other(2..4),
                    Data(7, 4..6),
                    Other(6..8),
                    Data(7, 8..10),
                ],
            ),
            (
                "no GRO: the segment is the read",
                &[&[7, 1, 2, 3, 4]],
                5,
                vec![Data(7, 0..5)],
            ),
            (
                "a zero segment is one byte",
                &[&[7], &[7]],
                0,
                vec![Data(7, 0..2)],
            ),
        ];
        for (name, datagrams, segment, want) in cases {
            assert_eq!(&cut(datagrams, *segment), want, "{name}");
        }
    }

    #[test]
    fn pieces_never_reach_past_the_buffer() {
        // A length the buffer does not have (it cannot happen; it must not panic either).
        let buf = [7u8; 5];
        let mut pieces = Pieces::new(64, 4);
        let mut got = Vec::new();
        while let Some(p) = pieces.next(&buf, |d| d.first().copied()) {
            got.push(p);
        }
        assert_eq!(got, vec![Piece::Data(7, 0..5)]);
    }
}
