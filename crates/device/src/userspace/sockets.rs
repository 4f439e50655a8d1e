//! The encrypted side: one UDP socket per address family on the same port.

use std::io::{self, IoSlice, IoSliceMut};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::socket::{
    ControlMessage, ControlMessageOwned, MsgFlags, MultiHeaders, SockaddrLike, SockaddrStorage,
    recvmmsg, sendmsg, setsockopt, sockopt,
};
use socket2::{Domain, Protocol, Socket, Type};

use crate::Error;

/// Socket buffer size asked for. Default buffers drop bursts (dataplane.md: ~14% receive
/// drops at default sizes, twice the throughput at 4 MiB).
const SOCKET_BUFFER: usize = 7 << 20;

/// How long a blocking receive waits before its thread checks whether it should stop.
pub(crate) const RECV_TIMEOUT: Duration = Duration::from_millis(250);

/// Most datagrams one UDP GSO send may carry (the kernel's UDP_MAX_SEGMENTS is 64 on older
/// kernels, 128 on newer ones).
pub(crate) const MAX_GSO_SEGMENTS: usize = 64;
/// Most bytes one UDP GSO send may carry: the payload of one maximal IPv4 UDP datagram.
pub(crate) const MAX_GSO_BYTES: usize = 65_507;

#[derive(Debug)]
pub(crate) struct Sockets {
    pub port: u16,
    pub v4: UdpSocket,
    /// None where the host has no IPv6.
    pub v6: Option<UdpSocket>,
    /// UDP GSO works until a send says otherwise (a route through a device without checksum
    /// offload answers EIO); then we send datagram by datagram.
    gso: AtomicBool,
}

/// Reads one `BatchReceiver::recv` asks for: with GRO each may hold a run of up to 64
/// datagrams from one sender, so a few cover bursts from several senders at once.
pub(crate) const RECV_BATCH: usize = 8;

/// A receive: which of the buffers it is in, bytes, sender, and the size of each datagram
/// when the kernel coalesced several (UDP GRO) into one buffer.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Received {
    pub slot: usize,
    pub len: usize,
    pub from: SocketAddr,
    pub segment: Option<usize>,
}

fn socket(domain: Domain, port: u16, fwmark: u32) -> io::Result<UdpSocket> {
    let s = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    let addr: SocketAddr = if domain == Domain::IPV6 {
        s.set_only_v6(true)?;
        SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0).into()
    } else {
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port).into()
    };
    if fwmark != 0 {
        s.set_mark(fwmark)?;
    }
    size_buffers(&s);
    // UDP GRO: a burst from one sender arrives as one buffer of equal-sized datagrams. Old
    // kernels lack it; receives then carry one datagram each.
    let _ = setsockopt(&s, sockopt::UdpGroSegment, &true);
    s.bind(&addr.into())?;
    s.set_read_timeout(Some(RECV_TIMEOUT))?;
    Ok(s.into())
}

/// Raises the buffers past `net.core.{r,w}mem_max` where we may (CAP_NET_ADMIN), else as
/// far as the limits allow.
fn size_buffers(s: &Socket) {
    if setsockopt(s, sockopt::RcvBufForce, &SOCKET_BUFFER).is_err() {
        let _ = s.set_recv_buffer_size(SOCKET_BUFFER);
    }
    if setsockopt(s, sockopt::SndBufForce, &SOCKET_BUFFER).is_err() {
        let _ = s.set_send_buffer_size(SOCKET_BUFFER);
    }
}

impl Sockets {
    /// Binds IPv4 and IPv6 on `port`; with port 0 both get the same OS-chosen port.
    pub(crate) fn bind(port: u16, fwmark: u32) -> Result<Sockets, Error> {
        let attempts = if port == 0 { 8 } else { 1 };
        let mut last_err = None;
        for _ in 0..attempts {
            let v4 = socket(Domain::IPV4, port, fwmark)
                .map_err(|source| Error::Bind { port, source })?;
            let bound = v4.local_addr()?.port();
            match socket(Domain::IPV6, bound, fwmark) {
                Ok(v6) => {
                    return Ok(Sockets {
                        port: bound,
                        v4,
                        v6: Some(v6),
                        gso: AtomicBool::new(true),
                    });
                }
                // The OS gave us an IPv4 port that is taken for IPv6: try another.
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => last_err = Some(e),
                Err(e) => {
                    tracing::warn!(port = bound, error = %e, "no IPv6 UDP socket; IPv4 only");
                    return Ok(Sockets {
                        port: bound,
                        v4,
                        v6: None,
                        gso: AtomicBool::new(true),
                    });
                }
            }
        }
        Err(Error::Bind {
            port,
            source: last_err.unwrap_or_else(|| io::Error::from(io::ErrorKind::AddrInUse)),
        })
    }

    /// The socket and address to reach `to` with (IPv4-mapped addresses go over IPv4).
    fn route(&self, to: SocketAddr) -> io::Result<(&UdpSocket, SocketAddr)> {
        match to {
            SocketAddr::V4(_) => Ok((&self.v4, to)),
            SocketAddr::V6(a) => match a.ip().to_ipv4_mapped() {
                Some(v4) => Ok((&self.v4, SocketAddr::new(v4.into(), a.port()))),
                None => match &self.v6 {
                    Some(v6) => Ok((v6, to)),
                    None => Err(io::Error::from(io::ErrorKind::AddrNotAvailable)),
                },
            },
        }
    }

    pub(crate) fn send_to(&self, buf: &[u8], to: SocketAddr) -> io::Result<usize> {
        let (socket, to) = self.route(to)?;
        socket.send_to(buf, to)
    }

    /// Sends `buf`, datagrams of `segment` bytes back to back (the last may be shorter), to
    /// `to`: with UDP GSO one syscall and one trip through the stack for all of them, at most
    /// `MAX_GSO_SEGMENTS` and `MAX_GSO_BYTES`.
    pub(crate) fn send_segments(
        &self,
        buf: &[u8],
        segment: usize,
        to: SocketAddr,
    ) -> io::Result<usize> {
        let (socket, to) = self.route(to)?;
        if buf.len() > segment && self.gso.load(Ordering::Relaxed) {
            let size = u16::try_from(segment).unwrap_or(u16::MAX);
            let addr = SockaddrStorage::from(to);
            match sendmsg(
                socket.as_raw_fd(),
                &[IoSlice::new(buf)],
                &[ControlMessage::UdpGsoSegments(&size)],
                MsgFlags::empty(),
                Some(&addr),
            ) {
                Ok(n) => return Ok(n),
                Err(Errno::EIO | Errno::EINVAL | Errno::ENOPROTOOPT | Errno::EOPNOTSUPP) => {
                    tracing::info!("UDP GSO refused; sending datagrams one by one");
                    self.gso.store(false, Ordering::Relaxed);
                }
                Err(e) => return Err(e.into()),
            }
        }
        let mut sent = 0;
        for d in buf.chunks(segment.max(1)) {
            sent += socket.send_to(d, to)?;
        }
        Ok(sent)
    }

    pub(crate) fn set_fwmark(&self, fwmark: u32) -> io::Result<()> {
        socket2::SockRef::from(&self.v4).set_mark(fwmark)?;
        if let Some(v6) = &self.v6 {
            socket2::SockRef::from(v6).set_mark(fwmark)?;
        }
        Ok(())
    }
}

/// Receives with `recvmmsg`: up to `RECV_BATCH` reads (a datagram, or a GRO run of them)
/// per syscall.
pub(crate) struct BatchReceiver {
    headers: MultiHeaders<SockaddrStorage>,
    /// Whether every header still has room for the GRO control message. The kernel shrinks
    /// `msg_controllen` to what it wrote and nix does not restore it, so after a read without
    /// the message (a lone datagram) the headers are rebuilt: reused, they would truncate a
    /// later read's GRO size, and its datagrams would read as one. (`msg_namelen` shrinks
    /// too, but each socket only ever receives its own family's address size.)
    whole: bool,
}

impl BatchReceiver {
    pub(crate) fn new() -> BatchReceiver {
        BatchReceiver {
            headers: Self::headers(),
            whole: true,
        }
    }

    fn headers() -> MultiHeaders<SockaddrStorage> {
        MultiHeaders::preallocate(RECV_BATCH, Some(gro_cmsg_space()))
    }

    /// Receives into `bufs`, waiting up to `RECV_TIMEOUT` for the first read (with `wait`;
    /// else `WouldBlock` when nothing is waiting); `got` gets one entry per read, in order,
    /// saying which buffer holds it. A read whose datagrams or control message did not fit is
    /// dropped, never misread.
    pub(crate) fn recv(
        &mut self,
        socket: &UdpSocket,
        bufs: &mut [Vec<u8>; RECV_BATCH],
        got: &mut Vec<Received>,
        wait: bool,
    ) -> io::Result<()> {
        got.clear();
        if !self.whole {
            self.headers = Self::headers();
            self.whole = true;
        }
        let mut iovs = bufs.each_mut().map(|b| [IoSliceMut::new(b)]);
        let reads = recvmmsg(
            socket.as_raw_fd(),
            &mut self.headers,
            iovs.iter_mut(),
            if wait {
                MsgFlags::MSG_WAITFORONE
            } else {
                MsgFlags::MSG_DONTWAIT
            },
            None,
        )?;
        let mut whole = true;
        for (slot, msg) in reads.enumerate() {
            // With a truncated control message the GRO size is unknown; with truncated data
            // datagrams are missing. Either way the read cannot be cut safely.
            if msg
                .flags
                .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC)
            {
                tracing::trace!("dropping a truncated UDP read");
                whole = false;
                continue;
            }
            let Ok(cmsgs) = msg.cmsgs() else {
                whole = false;
                continue;
            };
            let segment = cmsgs
                .filter_map(|c| match c {
                    ControlMessageOwned::UdpGroSegments(size) => usize::try_from(size).ok(),
                    _ => None,
                })
                .find(|&s| s > 0);
            whole &= segment.is_some();
            let Some(from) = msg.address.as_ref().and_then(socket_addr) else {
                continue;
            };
            got.push(Received {
                slot,
                len: msg.bytes,
                from,
                segment,
            });
        }
        self.whole = whole;
        Ok(())
    }
}

/// Space for the one control message a receive asks for.
fn gro_cmsg_space() -> Vec<u8> {
    nix::cmsg_space!(libc::c_int)
}

fn socket_addr(a: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = a.as_sockaddr_in() {
        return Some(SocketAddr::V4(SocketAddrV4::from(*v4)));
    }
    a.as_sockaddr_in6()
        .map(|v6| SocketAddr::V6(SocketAddrV6::from(*v6)))
        .filter(|_| a.family().is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Receives until `bytes` have come, returning each read's length and GRO size.
    fn receive(
        receiver: &mut BatchReceiver,
        socket: &UdpSocket,
        bufs: &mut [Vec<u8>; RECV_BATCH],
        bytes: usize,
    ) -> Vec<(usize, Option<usize>)> {
        let mut reads = Vec::new();
        let mut got = Vec::new();
        while reads.iter().map(|&(len, _)| len).sum::<usize>() < bytes {
            receiver
                .recv(socket, bufs, &mut got, true)
                .expect("a read within the receive timeout");
            for (k, r) in got.iter().enumerate() {
                assert!(r.slot >= k && r.slot < RECV_BATCH, "{r:?}");
            }
            reads.extend(got.iter().map(|r| (r.len, r.segment)));
        }
        reads
    }

    /// A GSO send over loopback arrives as one GRO read (or, on a kernel that does not
    /// coalesce there, as single datagrams): either way every datagram keeps its size, also
    /// after a lone datagram has shrunk a receive header's control length.
    #[test]
    fn gro_reads_keep_their_segment_size_after_lone_datagrams() {
        let rx = Sockets::bind(0, 0).expect("bind the receiver");
        let tx = Sockets::bind(0, 0).expect("bind the sender");
        let to = SocketAddr::from((Ipv4Addr::LOCALHOST, rx.port));
        let mut receiver = BatchReceiver::new();
        let mut bufs: [Vec<u8>; RECV_BATCH] = std::array::from_fn(|_| vec![0u8; 1 << 16]);
        for _ in 0..3 {
            tx.send_segments(&[1u8; 300], 100, to).expect("GSO send");
            for (len, segment) in receive(&mut receiver, &rx.v4, &mut bufs, 300) {
                assert_eq!(segment.unwrap_or(len), 100, "a read of {len} bytes");
            }
            tx.send_to(&[2u8; 50], to).expect("send");
            let lone = receive(&mut receiver, &rx.v4, &mut bufs, 50);
            assert_eq!(lone, vec![(50, None)]);
        }
    }

    /// A read dropped for truncation leaves a gap: the next read says which buffer it is in.
    #[test]
    fn a_dropped_read_does_not_shift_the_others() {
        let rx = Sockets::bind(0, 0).expect("bind the receiver");
        let tx = Sockets::bind(0, 0).expect("bind the sender");
        let to = SocketAddr::from((Ipv4Addr::LOCALHOST, rx.port));
        tx.send_to(&[1u8; 200], to).expect("send");
        tx.send_to(&[2u8; 50], to).expect("send");
        // Both are queued before the one call that reads them; the first does not fit.
        std::thread::sleep(Duration::from_millis(50));
        let mut receiver = BatchReceiver::new();
        let mut bufs: [Vec<u8>; RECV_BATCH] = std::array::from_fn(|_| vec![0u8; 100]);
        let mut got = Vec::new();
        receiver
            .recv(&rx.v4, &mut bufs, &mut got, true)
            .expect("receive");
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!((got[0].slot, got[0].len), (1, 50));
        assert_eq!(bufs[1][..50], [2u8; 50]);
    }
}
