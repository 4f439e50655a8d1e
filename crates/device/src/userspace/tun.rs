//! The TUN interface: the only place in the device that needs `unsafe` (three ioctls).

#![allow(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

/// `struct ifreq` as TUNSETIFF uses it: the name and the `ifr_flags` member of the union,
/// padded so the kernel never reads past our buffer.
#[repr(C)]
struct IfReqFlags {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 64],
}

const _: () = assert!(std::mem::size_of::<IfReqFlags>() >= std::mem::size_of::<libc::ifreq>());

/// An open layer-3 TUN interface without packet information headers, but with a virtio-net
/// header before every packet read or written (see `offload`). The interface exists as long
/// as this value (its file descriptor) lives, unless it is made persistent.
#[derive(Debug)]
pub(crate) struct Tun {
    file: File,
}

impl Tun {
    /// Creates (or attaches to) the TUN interface `name` in the calling thread's network
    /// namespace. The descriptor is non-blocking: the I/O thread waits with
    /// [`Tun::wait_readable_or`].
    pub(crate) fn create(name: &str) -> io::Result<Tun> {
        let bytes = name.as_bytes();
        if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "an interface name is 1 to 15 bytes without NUL",
            ));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/net/tun")?;

        let mut req = IfReqFlags {
            name: [0; libc::IFNAMSIZ],
            flags: (libc::IFF_TUN | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
            _pad: [0; 64],
        };
        for (dst, src) in req.name.iter_mut().zip(bytes) {
            *dst = *src as libc::c_char;
        }
        // SAFETY: the descriptor is open and owned by `file`, which outlives the call.
        // TUNSETIFF reads and writes one `struct ifreq`; `req` is a fully initialised, aligned
        // `repr(C)` value at least that large (checked at compile time above), borrowed
        // mutably and exclusively for the duration of the call.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        // Checksum offload and TSO: the kernel skips segmenting and checksumming TCP, and we
        // read up to 64 KiB per syscall. Without it (an old kernel) packets still come one by
        // one behind a header that says so.
        let features = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6;
        // SAFETY: the descriptor is open and owned by `file`. TUNSETOFFLOAD takes its argument
        // by value (an unsigned long of feature bits) and touches no memory of ours.
        let rc = unsafe {
            libc::ioctl(
                file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(features),
            )
        };
        if rc != 0 {
            tracing::warn!(
                error = %io::Error::last_os_error(),
                "TUN offloads unavailable; reading packets one by one"
            );
        }
        Ok(Tun { file })
    }

    /// Whether the interface outlives its last descriptor. A persistent TUN keeps its
    /// addresses and the routes through it after our process exits (crashed, upgraded): the
    /// kernel then drops what is routed to it, so mesh traffic never falls back to another
    /// route in plaintext, and the next process attaches to it by name.
    pub(crate) fn set_persistent(&self, persistent: bool) -> io::Result<()> {
        // SAFETY: the descriptor is open and owned by `self.file`. TUNSETPERSIST takes its
        // argument by value (0 or 1) and touches no memory of ours.
        let rc = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETPERSIST,
                libc::c_ulong::from(persistent),
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Reads one virtio-net header and its packet; `WouldBlock` when none is waiting.
    pub(crate) fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buf)
    }

    /// Writes one virtio-net header and its packet, given in pieces (one `writev`: a TUN
    /// write is one packet whatever the pieces).
    pub(crate) fn write_vectored(&self, iov: &[io::IoSlice<'_>]) -> io::Result<usize> {
        (&self.file).write_vectored(iov)
    }

    /// Waits until a packet can be read here or from `other`, or `timeout` passes.
    pub(crate) fn wait_readable_or(&self, other: &impl AsFd, timeout: Duration) -> io::Result<()> {
        wait_readable([self.file.as_fd(), other.as_fd()], timeout).map(|_| ())
    }
}

/// Waits until one of `fds` is readable or `timeout` passes. Returns whether one is.
pub(crate) fn wait_readable<const N: usize>(
    fds: [BorrowedFd<'_>; N],
    timeout: Duration,
) -> io::Result<bool> {
    let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
    let mut fds = fds.map(|fd| PollFd::new(fd, PollFlags::POLLIN));
    match poll(&mut fds, PollTimeout::from(ms)) {
        Ok(n) => Ok(n > 0),
        Err(nix::errno::Errno::EINTR) => Ok(false),
        Err(e) => Err(io::Error::from(e)),
    }
}
