//! The encrypted side: one UDP socket per address family on the same port.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::time::Duration;

use nix::sys::socket::{setsockopt, sockopt};
use socket2::{Domain, Protocol, Socket, Type};

use crate::device::DeviceError;

/// Socket buffer size asked for. Default buffers drop bursts (dataplane.md: ~14% receive
/// drops at default sizes, twice the throughput at 4 MiB).
const SOCKET_BUFFER: usize = 7 << 20;

/// How long a blocking receive waits before its thread checks whether it should stop.
pub(crate) const RECV_TIMEOUT: Duration = Duration::from_millis(250);

#[derive(Debug)]
pub(crate) struct Sockets {
    pub port: u16,
    pub v4: UdpSocket,
    /// None where the host has no IPv6.
    pub v6: Option<UdpSocket>,
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
    pub(crate) fn bind(port: u16, fwmark: u32) -> Result<Sockets, DeviceError> {
        let attempts = if port == 0 { 8 } else { 1 };
        let mut last_err = None;
        for _ in 0..attempts {
            let v4 = socket(Domain::IPV4, port, fwmark)
                .map_err(|source| DeviceError::Bind { port, source })?;
            let bound = v4.local_addr()?.port();
            match socket(Domain::IPV6, bound, fwmark) {
                Ok(v6) => {
                    return Ok(Sockets {
                        port: bound,
                        v4,
                        v6: Some(v6),
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
                    });
                }
            }
        }
        Err(DeviceError::Bind {
            port,
            source: last_err.unwrap_or_else(|| io::Error::from(io::ErrorKind::AddrInUse)),
        })
    }

    pub(crate) fn send_to(&self, buf: &[u8], to: SocketAddr) -> io::Result<usize> {
        match to {
            SocketAddr::V4(_) => self.v4.send_to(buf, to),
            SocketAddr::V6(a) => match a.ip().to_ipv4_mapped() {
                Some(v4) => self.v4.send_to(buf, SocketAddr::new(v4.into(), a.port())),
                None => match &self.v6 {
                    Some(v6) => v6.send_to(buf, to),
                    None => Err(io::Error::from(io::ErrorKind::AddrNotAvailable)),
                },
            },
        }
    }

    pub(crate) fn set_fwmark(&self, fwmark: u32) -> io::Result<()> {
        socket2::SockRef::from(&self.v4).set_mark(fwmark)?;
        if let Some(v6) = &self.v6 {
            socket2::SockRef::from(v6).set_mark(fwmark)?;
        }
        Ok(())
    }
}
