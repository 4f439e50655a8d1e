//! Serves the UAPI text protocol on `/var/run/wireguard/<name>.sock`, so that `wg` and other
//! tools see the device as they see wireguard-go.

use std::fs::{self, DirBuilder, Permissions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::Inner;
use super::datapath::TICK;
use super::tun::wait_readable;
use crate::device::DeviceError;

pub(crate) const SOCKET_DIR: &str = "/var/run/wireguard";

/// Bounds on what one client may send, so a stuck or hostile client cannot exhaust memory.
const MAX_LINE: u64 = 4096;
const MAX_REQUEST: usize = 1 << 20;
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// Creates the socket, refusing if a live process already serves this name.
pub(crate) fn bind(name: &str) -> Result<(UnixListener, PathBuf), DeviceError> {
    let dir = Path::new(SOCKET_DIR);
    let path = dir.join(format!("{name}.sock"));
    let err = |source| DeviceError::Uapi {
        path: path.display().to_string(),
        source,
    };
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(err)?;
    if UnixStream::connect(&path).is_ok() {
        return Err(err(io::Error::new(
            io::ErrorKind::AddrInUse,
            "another process serves this interface",
        )));
    }
    match fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let listener = UnixListener::bind(&path).map_err(err)?;
    fs::set_permissions(&path, Permissions::from_mode(0o600)).map_err(err)?;
    listener.set_nonblocking(true).map_err(err)?;
    Ok((listener, path))
}

/// Accepts clients one at a time until the device stops.
pub(crate) fn serve(inner: &Inner, listener: &UnixListener) {
    while !inner.stopping() {
        match listener.accept() {
            Ok((stream, _)) => {
                if let Err(e) = handle_connection(inner, stream) {
                    tracing::debug!(error = %e, "UAPI client");
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if wait_readable(&listener, TICK).is_err() {
                    std::thread::sleep(TICK);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::warn!(error = %e, "UAPI accept");
                std::thread::sleep(TICK);
            }
        }
    }
}

/// Serves requests on one connection until the client closes it.
fn handle_connection(inner: &Inner, stream: UnixStream) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let mut reader = BufReader::new(&stream);
    let mut writer = &stream;
    let mut request = String::new();
    let mut line = String::new();
    loop {
        request.clear();
        // A request is lines up to a blank line.
        loop {
            line.clear();
            let n = (&mut reader).take(MAX_LINE).read_line(&mut line)?;
            if n == 0 {
                return Ok(());
            }
            if line == "\n" {
                break;
            }
            if !line.ends_with('\n') || request.len() + line.len() > MAX_REQUEST {
                writer
                    .write_all(super::uapi::render_errno(super::uapi::ERRNO_PROTOCOL).as_bytes())?;
                return Ok(());
            }
            request.push_str(&line);
        }
        writer.write_all(inner.handle_uapi(&request).as_bytes())?;
    }
}
