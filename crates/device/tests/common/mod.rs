//! What the device's and the agent's integration tests share (the agent includes this file
//! with `#[path]`): network namespaces that are deleted on drop
//! (also when a test panics), `ip` inside them, and running code inside them.

// Every test file compiles its own copy and uses a part of it.
#![allow(dead_code)]

use std::fs::File;
use std::future::Future;
use std::process::Command;
use std::thread::JoinHandle;

use nix::sched::{CloneFlags, setns};

/// Runs a command, which must succeed; its output.
pub fn run(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("running {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether we may create namespaces; says why the suite is skipped when not.
pub fn is_root(suite: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    eprintln!("skipping: the {suite} tests need root");
    false
}

/// A named network namespace with its loopback up, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// Creates `name` (deleting one a crashed earlier run may have left under it).
    pub fn new(name: impl Into<String>) -> Netns {
        let name = name.into();
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .expect("running ip");
        assert!(
            out.status.success(),
            "ip netns add {name} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip` in this namespace, for use where the guard cannot go (inside a test body).
    pub fn cmd(&self) -> NsCmd {
        NsCmd(self.name.clone())
    }

    /// `ip -n <ns> ...`, which must succeed; its output.
    pub fn ip(&self, args: &[&str]) -> String {
        self.cmd().ip(args)
    }

    /// Runs the async `body` to completion on a thread inside the namespace, with its own
    /// runtime (so sockets it opens, netlink ones included, live there); a panic in it is
    /// re-raised here.
    pub fn run<F, Fut>(&self, body: F)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()>,
    {
        in_netns(&self.name, move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime")
                .block_on(body())
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// `ip` in a namespace, by name.
#[derive(Clone, Debug)]
pub struct NsCmd(pub String);

impl NsCmd {
    /// `ip -n <ns> ...`: whether it succeeded, and its output.
    pub fn try_ip(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new("ip")
            .args(["-n", &self.0])
            .args(args)
            .output()
            .expect("running ip");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }

    /// `ip -n <ns> ...`, which must succeed; its output.
    pub fn ip(&self, args: &[&str]) -> String {
        let out = Command::new("ip")
            .args(["-n", &self.0])
            .args(args)
            .output()
            .expect("running ip");
        assert!(
            out.status.success(),
            "ip -n {} {args:?} failed: {}",
            self.0,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn ip_ok(&self, args: &[&str]) -> bool {
        self.try_ip(args).0
    }
}

/// Runs `f` on a new thread inside the named network namespace.
pub fn spawn_in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> JoinHandle<T> {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let fd = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        setns(&fd, CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
}

/// Runs `f` inside the named network namespace and returns what it returns; a panic in it is
/// re-raised here.
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    match spawn_in_netns(ns, f).join() {
        Ok(v) => v,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// A program we did not write holding a TUN open (Debian's wireguard-go, in the foreground),
/// stopped on drop.
pub struct HeldTun(std::process::Child);

impl HeldTun {
    pub fn start(ns: &str, name: &str) -> HeldTun {
        let child = std::process::Command::new("ip")
            .args(["netns", "exec", ns, "wireguard-go", "-f", name])
            .env("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("wireguard-go (apt-get install wireguard-go)");
        let held = HeldTun(child);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !NsCmd(ns.to_owned()).ip_ok(&["link", "show", name]) {
            assert!(
                std::time::Instant::now() < deadline,
                "wireguard-go made no {name}"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        held
    }

    pub fn running(&mut self) -> bool {
        matches!(self.0.try_wait(), Ok(None))
    }
}

impl Drop for HeldTun {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
