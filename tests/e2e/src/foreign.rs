//! Foreign WireGuard peers, implementations we did not write: Debian's `wireguard-go`, set up
//! from a wg-quick config the way `wg-quick up` would, with `wg` from `wireguard-tools`.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use crate::netns::Netns;
use crate::process::ChildGuard;

/// What a wg-quick config gives a host that `wg setconf` does not take.
pub struct QuickParts {
    pub addresses: Vec<String>,
    pub routes: Vec<String>,
    /// The config without wg-quick's own keys, as `wg-quick strip` prints it.
    pub stripped: String,
}

pub fn quick_parts(config: &str) -> QuickParts {
    const WG_QUICK_ONLY: [&str; 9] = [
        "address",
        "dns",
        "mtu",
        "table",
        "preup",
        "postup",
        "predown",
        "postdown",
        "saveconfig",
    ];
    let mut parts = QuickParts {
        addresses: Vec::new(),
        routes: Vec::new(),
        stripped: String::new(),
    };
    for line in config.lines() {
        let content = line.split('#').next().unwrap_or_default().trim();
        if let Some((k, v)) = content.split_once('=') {
            let key = k.trim().to_ascii_lowercase();
            let values = v
                .split(',')
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty());
            match key.as_str() {
                "address" => parts.addresses.extend(values),
                "allowedips" => parts.routes.extend(values),
                _ => {}
            }
            if WG_QUICK_ONLY.contains(&key.as_str()) {
                continue;
            }
        }
        parts.stripped.push_str(line);
        parts.stripped.push('\n');
    }
    parts
}

/// A wireguard-go interface inside `ns`, set up from a wg-quick config the way wg-quick would
/// (addresses, `wg setconf`, link up, a route per allowed IP).
pub fn wireguard_go_from_config(
    ns: &Netns,
    iface: &str,
    config: &str,
    dir: &Path,
) -> Result<ChildGuard> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.name, "wireguard-go", "-f", iface])
        .env("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1");
    let child = ChildGuard::spawn(
        &format!("wireguard-go {iface}"),
        cmd,
        &dir.join(format!("{iface}.log")),
    )?;
    let socket = format!("/var/run/wireguard/{iface}.sock");
    // Generous: Go starts slowly under emulation (the kernel VM lane).
    let deadline = Instant::now() + Duration::from_secs(30);
    while !Path::new(&socket).exists() {
        if Instant::now() > deadline {
            bail!("wireguard-go made no socket: {}", child.log_tail(20));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let parts = quick_parts(config);
    let file = dir.join(format!("{iface}.setconf"));
    std::fs::write(&file, &parts.stripped)?;
    ns.exec("wg", &["setconf", iface, file.to_str().unwrap()])?;
    for a in &parts.addresses {
        ns.ip(&["addr", "add", a, "dev", iface])?;
    }
    ns.ip(&["link", "set", iface, "mtu", "1420", "up"])?;
    for r in &parts.routes {
        ns.ip(&["route", "replace", r, "dev", iface])?;
    }
    Ok(child)
}
