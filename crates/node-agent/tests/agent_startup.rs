//! The agent binary's start-up checks, run as a process. Needs root (a network namespace).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

// The namespace helpers are the device crate's: one copy for both crates.
#[path = "../../device/tests/common/mod.rs"]
mod common;

use common::{Netns, is_root};

/// Issue #12, item 9: a controller URL that is not https:// would send the node's token and
/// take its peers in plaintext. The agent refuses it before it does anything: no key, no
/// state directory, no interface.
#[test]
fn a_plain_http_controller_url_is_refused_before_anything_happens() {
    if !is_root("agent start-up") {
        return;
    }
    let ns = Netns::new(format!("wgas-{}", std::process::id()));
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let links_before = ns.ip(&["-o", "link", "show"]);
    for url in [
        "http://wgmesh-controller.wgmesh-system.svc:9443",
        "HTTP://10.0.0.1:9443",
    ] {
        let mut child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns.name,
                env!("CARGO_BIN_EXE_wgmesh-agent"),
            ])
            .args(["--node", "node-a", "--controller", url, "--state-dir"])
            .arg(&state)
            .args(["--ca-file", "/nonexistent/ca.crt"])
            .args(["--token-file", "/nonexistent/token"])
            .args(["--backend", "userspace"])
            .env_remove("WGMESH_CONTROLLER")
            .env("WGMESH_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run wgmesh-agent");
        // An agent that accepted the URL would retry the controller forever.
        let deadline = Instant::now() + Duration::from_secs(10);
        while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let exited = child.try_wait().unwrap().is_some();
        if !exited {
            let _ = child.kill();
        }
        let out = child.wait_with_output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(exited, "the agent kept running with {url}: {text}");
        assert!(
            !out.status.success(),
            "exit status {:?}: {text}",
            out.status
        );
        assert!(text.contains("https"), "message names https: {text}");
        assert!(
            !state.exists(),
            "nothing may be written before the URL is checked: {} exists",
            state.display()
        );
        assert_eq!(
            ns.ip(&["-o", "link", "show"]),
            links_before,
            "no interface may be created"
        );
    }
}
