//! The agent's `userspace-device` subcommand (the userspace device as its own process, which
//! the data-plane benchmark runs): its UAPI socket is root's only. Needs root, `ip`, `wg`,
//! `setpriv` and python3. The device itself is tested in the `wgmesh-device` crate.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

// The namespace helpers are the device crate's: one copy for both crates.
#[path = "../../device/tests/common/mod.rs"]
mod common;

use common::{Netns, is_root, run};

const WAIT: Duration = Duration::from_secs(20);

/// What the test created, undone on drop: the device process (by PID), then its namespace.
struct Lab {
    if_a: String,
    dir: tempfile::TempDir,
    children: Vec<Child>,
    netns: Netns,
}

impl Lab {
    fn new() -> Lab {
        let pid = std::process::id();
        Lab {
            if_a: format!("wgs{pid}a"),
            dir: tempfile::tempdir().expect("temp dir"),
            children: Vec::new(),
            netns: Netns::new(format!("wgsd-{pid}-a")),
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for child in &mut self.children {
            // `ip netns exec` execs the command, so this PID is the agent itself.
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn uapi_path(ifname: &str) -> PathBuf {
    Path::new("/var/run/wireguard").join(format!("{ifname}.sock"))
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Mode bits and owner of `path` (not following a symlink).
fn mode_and_owner(path: &Path) -> (u32, u32) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (m.mode() & 0o7777, m.uid())
}

/// Connects to the unix socket at `path` as uid/gid `uid` (no supplementary groups);
/// whether that worked, and what the probe said.
fn connects_as(uid: u32, path: &Path) -> (bool, String) {
    let probe = "import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])";
    let mut cmd = Command::new("setpriv");
    cmd.args([
        &format!("--reuid={uid}"),
        &format!("--regid={uid}"),
        "--clear-groups",
        "/usr/bin/python3",
        "-c",
        probe,
    ])
    .arg(path);
    let out = cmd.output().expect("setpriv and /usr/bin/python3");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Issue #12's check "an unprivileged local user tries the UAPI socket": the socket reads
/// and sets keys, so only root may connect. The device runs as its own process under umask
/// 000, with the socket directory left 0755 beforehand (as wireguard-go creates it): the
/// directory ends up 0700 and the socket 0600, uid 65534 is refused, root's `wg` works.
#[test]
fn only_root_reaches_the_uapi_socket() {
    if !is_root("userspace device") {
        return;
    }
    let mut lab = Lab::new();
    let ns = lab.netns.name.clone();
    let dir = Path::new("/var/run/wireguard");
    std::fs::create_dir_all(dir).unwrap();
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();

    let log = File::create(lab.dir.path().join("device.log")).unwrap();
    let child = Command::new("sh")
        .args([
            "-c",
            "umask 000; exec ip netns exec \"$1\" \"$2\" userspace-device --interface \"$3\" --workers 0",
            "sh",
            &ns,
            env!("CARGO_BIN_EXE_wgmesh-agent"),
            &lab.if_a,
        ])
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("run wgmesh-agent userspace-device");
    // Stopped (SIGTERM, by PID) and waited for when the lab drops.
    lab.children.push(child);
    let sock = uapi_path(&lab.if_a);
    wait_for("the device's UAPI socket", || sock.exists());
    // The UAPI answers once the device is up.
    wait_for("wg show as root", || {
        Command::new("ip")
            .args(["netns", "exec", &ns, "wg", "show", &lab.if_a])
            .output()
            .is_ok_and(|o| o.status.success())
    });

    assert_eq!(mode_and_owner(dir), (0o700, 0), "{}", dir.display());
    assert_eq!(mode_and_owner(&sock), (0o600, 0), "{}", sock.display());
    let leftovers: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(&lab.if_a) && *n != format!("{}.sock", lab.if_a))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    let (ok, said) = connects_as(65534, &sock);
    assert!(!ok, "uid 65534 connected to the UAPI socket");
    assert!(said.contains("PermissionError"), "{said}");
    let (ok, said) = connects_as(0, &sock);
    assert!(ok, "control: root connects with the same probe: {said}");
    let shown = run(&["ip", "netns", "exec", &ns, "wg", "show", &lab.if_a]);
    assert!(shown.contains("public key"), "{shown}");
}
