//! Serves the UAPI text protocol on `/var/run/wireguard/<name>.sock`, so that `wg` and other
//! tools see the device as they see wireguard-go.

use std::fs::{self, DirBuilder, Permissions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::Inner;
use super::limits::TICK;
use super::tun::wait_readable;
use crate::Error;

pub(crate) const SOCKET_DIR: &str = "/var/run/wireguard";

/// Bounds on what one client may send, so a stuck or hostile client cannot exhaust memory.
const MAX_LINE: u64 = 4096;
const MAX_REQUEST: usize = 1 << 20;
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// Creates the socket, refusing if a live process already serves this name.
///
/// The socket reads and sets keys, so only root may reach it, whatever the umask, with no
/// moment where it is reachable by anyone else (issue #12): the directory is made (or
/// made again) 0700 and ours; the socket is bound inside a staging directory of our own
/// (0700), made 0600 there, and only then renamed to its name, which atomically replaces a
/// stale socket a crashed device left.
pub(crate) fn bind(name: &str) -> Result<(UnixListener, PathBuf), Error> {
    let dir = Path::new(SOCKET_DIR);
    let path = dir.join(format!("{name}.sock"));
    let err = |source| Error::Uapi {
        path: path.display().to_string(),
        source,
    };
    private_dir(dir).map_err(err)?;
    if UnixStream::connect(&path).is_ok() {
        return Err(err(io::Error::new(
            io::ErrorKind::AddrInUse,
            "another process serves this interface",
        )));
    }
    let staging = dir.join(format!(".{name}.sock.{}.tmp", std::process::id()));
    // Left by a crashed device of an earlier process with our PID: ours to remove.
    let _ = fs::remove_dir_all(&staging);
    let bound = DirBuilder::new()
        .mode(0o700)
        .create(&staging)
        .and_then(|()| {
            fs::set_permissions(&staging, Permissions::from_mode(0o700))?;
            let tmp = staging.join("sock");
            let listener = UnixListener::bind(&tmp)?;
            fs::set_permissions(&tmp, Permissions::from_mode(0o600))?;
            fs::rename(&tmp, &path)?;
            Ok(listener)
        });
    let _ = fs::remove_dir_all(&staging);
    let listener = bound.map_err(err)?;
    listener.set_nonblocking(true).map_err(err)?;
    Ok((listener, path))
}

/// Makes `dir` a directory of ours with mode 0700: created so if missing, its mode
/// tightened if looser (wireguard-go, for one, creates it 0755); a symlink or a directory
/// of another user is refused.
fn private_dir(dir: &Path) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    let meta = fs::symlink_metadata(dir)?;
    if !meta.file_type().is_dir() {
        return Err(io::Error::other(format!(
            "{} is not a directory",
            dir.display()
        )));
    }
    let euid = nix::unistd::geteuid().as_raw();
    if meta.uid() != euid {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("{} belongs to uid {}, not to us", dir.display(), meta.uid()),
        ));
    }
    if meta.mode() & 0o7777 != 0o700 {
        fs::set_permissions(dir, Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// The longest one client is served (wg(8) needs milliseconds).
const CONNECTION_DEADLINE: Duration = Duration::from_secs(30);

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
                if wait_readable([listener.as_fd()], TICK).is_err() {
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
    // Clients are served one at a time: one that trickles lines holds the socket (and the
    // device's stop) for this long at most.
    let deadline = std::time::Instant::now() + CONNECTION_DEADLINE;
    loop {
        request.clear();
        // A request is lines up to a blank line.
        loop {
            if std::time::Instant::now() > deadline || inner.stopping() {
                return Ok(());
            }
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
