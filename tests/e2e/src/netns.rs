//! Network namespaces as test hosts: creation and removal (also on panic), veth links, the CNI
//! plugins, and running code inside a namespace.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// Runs a command, failing with its stderr.
pub fn sh(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    check(program, args, out)
}

/// Runs `cmd` with `input` on its stdin, failing with its stderr; its stdout.
pub fn sh_with_input(mut cmd: Command, input: &[u8]) -> Result<String> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let args: Vec<String> = cmd
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("running {program}"))?;
    child.stdin.take().context("stdin")?.write_all(input)?;
    let out = child.wait_with_output()?;
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    check(&program, &args, out)
}

fn check(program: &str, args: &[&str], out: Output) -> Result<String> {
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn create(name: &str) -> Result<Self> {
        let _ = sh("ip", &["netns", "del", name]);
        sh("ip", &["netns", "add", name])?;
        let ns = Netns { name: name.into() };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Names the network namespace process `pid` is in (`ip netns attach`), such as a pod's
    /// that a CNI plugin created; dropping it removes the name, not the namespace.
    pub fn attach(name: &str, pid: u32) -> Result<Self> {
        let _ = sh("ip", &["netns", "del", name]);
        sh("ip", &["netns", "attach", name, &pid.to_string()])?;
        Ok(Netns { name: name.into() })
    }

    /// `ip -n <ns> ...`
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        sh("ip", &full)
    }

    /// Runs a program inside the namespace.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String> {
        let mut full = vec!["netns", "exec", &self.name, program];
        full.extend_from_slice(args);
        sh("ip", &full)
    }

    pub fn path(&self) -> String {
        format!("/var/run/netns/{}", self.name)
    }

    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.exec("sysctl", &["-qw", &format!("{key}={value}")])?;
        Ok(())
    }

    /// Runs `f` on a thread that has entered this namespace (sockets it opens live there).
    pub fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let path = self.path();
        std::thread::spawn(move || -> Result<T> {
            let file = File::open(&path).with_context(|| format!("opening {path}"))?;
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("entering {path}"))?;
            f()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("a thread in {} panicked", self.name))?
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = sh("ip", &["netns", "del", &self.name]);
    }
}

/// A link in the root namespace, deleted on drop (a bridge, or the root end of a veth pair).
pub struct RootLink {
    pub name: String,
}

impl Drop for RootLink {
    fn drop(&mut self) {
        let _ = sh("ip", &["link", "del", &self.name]);
    }
}

/// A bridge in the root namespace with an address: the test's underlay.
pub fn bridge(name: &str, address: &str) -> Result<RootLink> {
    let _ = sh("ip", &["link", "del", name]);
    sh("ip", &["link", "add", name, "type", "bridge"])?;
    let link = RootLink { name: name.into() };
    sh("ip", &["addr", "add", address, "dev", name])?;
    sh("ip", &["link", "set", name, "up"])?;
    Ok(link)
}

/// The root-namespace links of an underlay made by [`underlay_router`]: the router's link, then
/// the bridge, deleted on drop in that order (after the router's namespace).
pub struct UnderlayLinks {
    _router_link: RootLink,
    _bridge: RootLink,
}

/// A test underlay `<prefix>.0/24` named after `id`: a bridge `wgm<id>br` at `<prefix>.254`
/// (the host's address on it) and a router namespace `wgm<id>r` at `<prefix>.<router_octet>`
/// that forwards, as every node's default gateway.
pub fn underlay_router(id: &str, prefix: &str, router_octet: u8) -> Result<(Netns, UnderlayLinks)> {
    let bridge = bridge(&format!("wgm{id}br"), &format!("{prefix}.254/24"))?;
    let router = Netns::create(&format!("wgm{id}r"))?;
    let router_link = veth_to_bridge(
        &format!("wgm{id}br"),
        &format!("wgm{id}vr"),
        &router,
        "eth0",
        &format!("{prefix}.{router_octet}/24"),
    )?;
    router.sysctl("net.ipv4.ip_forward", "1")?;
    // It forwards back out of the interface a packet came in on: no redirects, so the nodes
    // keep sending through it as they would through a real gateway.
    router.sysctl("net.ipv4.conf.all.send_redirects", "0")?;
    router.sysctl("net.ipv4.conf.eth0.send_redirects", "0")?;
    let links = UnderlayLinks {
        _router_link: router_link,
        _bridge: bridge,
    };
    Ok((router, links))
}

/// A veth pair: `root_end` attached to `bridge`, the other end inside `ns` as `inner_name`
/// with `address`.
pub fn veth_to_bridge(
    bridge: &str,
    root_end: &str,
    ns: &Netns,
    inner_name: &str,
    address: &str,
) -> Result<RootLink> {
    let _ = sh("ip", &["link", "del", root_end]);
    sh(
        "ip",
        &[
            "link", "add", root_end, "type", "veth", "peer", "name", "wgmtmp0", "netns", &ns.name,
        ],
    )?;
    let link = RootLink {
        name: root_end.into(),
    };
    sh("ip", &["link", "set", root_end, "master", bridge, "up"])?;
    ns.ip(&["link", "set", "wgmtmp0", "name", inner_name])?;
    // An IPv6 address is usable at once, without duplicate address detection's wait.
    let mut add = vec!["addr", "add", address, "dev", inner_name];
    if address.contains(':') {
        add.push("nodad");
    }
    ns.ip(&add)?;
    ns.ip(&["link", "set", inner_name, "up"])?;
    Ok(link)
}

/// A veth pair between two namespaces.
pub fn veth_between(
    a: &Netns,
    a_name: &str,
    a_addr: &str,
    b: &Netns,
    b_name: &str,
    b_addr: &str,
) -> Result<()> {
    a.ip(&[
        "link", "add", a_name, "type", "veth", "peer", "name", b_name, "netns", &b.name,
    ])?;
    a.ip(&["addr", "add", a_addr, "dev", a_name])?;
    a.ip(&["link", "set", a_name, "up"])?;
    b.ip(&["addr", "add", b_addr, "dev", b_name])?;
    b.ip(&["link", "set", b_name, "up"])?;
    Ok(())
}

/// Directory of the Debian CNI plugins.
pub const CNI_PATH: &str = "/usr/lib/cni";

/// Attaches `pod` to `node` with the real CNI `bridge` + `host-local` plugins, as a kubelet
/// would, and returns the pod's address.
pub fn cni_add_pod(
    node: &Netns,
    pod: &Netns,
    pod_cidr: &str,
    data_dir: &std::path::Path,
) -> Result<String> {
    let conf = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "wgmesh-test",
        "type": "bridge",
        "bridge": "cni0",
        "isGateway": true,
        "isDefaultGateway": true,
        "ipMasq": false,
        "ipam": {"type": "host-local", "ranges": [[{"subnet": pod_cidr}]], "dataDir": data_dir},
    });
    let result = run_cni_plugin(node, pod, CNI_PATH, &conf)?;
    first_address(&result)
}

/// Runs one CNI plugin's ADD for `pod` from inside `node`, with `conf` on its stdin; returns
/// its result.
fn run_cni_plugin(
    node: &Netns,
    pod: &Netns,
    plugin_dir: &str,
    conf: &serde_json::Value,
) -> Result<serde_json::Value> {
    let kind = conf["type"].as_str().context("a plugin without type")?;
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &node.name, &format!("{plugin_dir}/{kind}")])
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", &pod.name)
        .env("CNI_NETNS", pod.path())
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", plugin_dir);
    let result = sh_with_input(cmd, conf.to_string().as_bytes())?;
    Ok(serde_json::from_str(&result)?)
}

/// The first address of a CNI result, without its prefix length.
fn first_address(result: &serde_json::Value) -> Result<String> {
    let address = result["ips"][0]["address"]
        .as_str()
        .context("the CNI result has no address")?;
    Ok(address.split('/').next().unwrap_or(address).to_owned())
}

/// Attaches `pod` by running the plugins of the conflist at `conflist` from `plugin_dir` in
/// order, as a container runtime does (each gets the previous one's result), with the node's
/// host-local state under `data_dir` (the node's /var/lib/cni/networks). Returns the pod's
/// first address.
pub fn cni_add_conflist(
    node: &Netns,
    pod: &Netns,
    conflist: &std::path::Path,
    plugin_dir: &std::path::Path,
    data_dir: &std::path::Path,
) -> Result<String> {
    let plugin_dir = plugin_dir.to_str().context("plugin directory")?;
    let list: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(conflist)?)?;
    let plugins = list["plugins"]
        .as_array()
        .context("the conflist has no plugins")?;
    let mut prev: Option<serde_json::Value> = None;
    for plugin in plugins {
        let mut conf = plugin.clone();
        conf["cniVersion"] = list["cniVersion"].clone();
        conf["name"] = list["name"].clone();
        if conf["ipam"]["type"] == "host-local" {
            conf["ipam"]["dataDir"] = serde_json::json!(data_dir);
        }
        if let Some(p) = &prev {
            conf["prevResult"] = p.clone();
        }
        prev = Some(run_cni_plugin(node, pod, plugin_dir, &conf)?);
    }
    first_address(&prev.context("the conflist has no plugins")?)
}

/// Starts a TCP echo server inside `ns` on `addr`; it answers `n` connections, then stops.
pub fn echo_server(
    ns: &Netns,
    addr: SocketAddr,
    connections: usize,
) -> Result<std::thread::JoinHandle<()>> {
    let path = ns.path();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let handle = std::thread::spawn(move || {
        let entered = File::open(&path)
            .map_err(anyhow::Error::from)
            .and_then(|f| Ok(nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)?));
        let listener = match entered.and_then(|()| Ok(TcpListener::bind(addr)?)) {
            Ok(l) => l,
            Err(e) => {
                let _ = ready_tx.send(Err(e));
                return;
            }
        };
        let _ = ready_tx.send(Ok(()));
        for stream in listener.incoming().take(connections) {
            let Ok(mut stream) = stream else { continue };
            let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
            let mut buf = [0u8; 65536];
            while let Ok(n) = stream.read(&mut buf) {
                if n == 0 || stream.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    });
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .context("the echo server did not start")??;
    Ok(handle)
}

/// Connects from inside `ns` to `addr`, sends `payload` and checks it comes back.
pub fn echo_roundtrip(
    ns: &Netns,
    addr: SocketAddr,
    payload: Vec<u8>,
    timeout: Duration,
) -> Result<()> {
    ns.run(move || {
        let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        // Write from another thread while reading here: a payload larger than both ends'
        // buffers would otherwise deadlock against the echo.
        let mut writer = stream.try_clone()?;
        let payload = std::sync::Arc::new(payload);
        let sent = std::sync::Arc::clone(&payload);
        let writing = std::thread::spawn(move || writer.write_all(&sent));
        let mut back = vec![0u8; payload.len()];
        let read = stream.read_exact(&mut back);
        if read.is_err() {
            // A stalled path: the writer may block for good; closing the socket ends it.
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
        writing
            .join()
            .map_err(|_| anyhow::anyhow!("the writer panicked"))??;
        read?;
        if back != *payload {
            bail!("the echo differs");
        }
        Ok(())
    })
}

/// A plain HTTP/1.0 GET from inside `ns` (the agents' metrics port is node-local).
pub fn http_get_in(ns: &Netns, port: u16, path: &str) -> Result<String> {
    http_get_at(ns, SocketAddr::from(([127, 0, 0, 1], port)), path)
}

/// `GET path` from namespace `ns` to `addr` (as a scraper elsewhere on the network would),
/// returning the body of a 200.
pub fn http_get_at(ns: &Netns, addr: SocketAddr, path: &str) -> Result<String> {
    let path = path.to_owned();
    ns.run(move || {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
        if !head.contains(" 200 ") {
            bail!("GET {path}: {}", head.lines().next().unwrap_or_default());
        }
        Ok(body.to_owned())
    })
}

/// Runs `action` while tcpdump listens on `interface` (inside `ns`, or in the root namespace)
/// for packets matching `filter` (a pcap filter; `direction` is tcpdump's `-Q`: `in`, `out`
/// or `inout`), and returns the first one as tcpdump prints it, or an empty string if none
/// came within 10 s. The action's own result is returned first.
pub fn first_packet(
    ns: Option<&Netns>,
    interface: &str,
    direction: &str,
    filter: &str,
    action: impl FnOnce() -> Result<()>,
) -> Result<String> {
    let mut cmd = Command::new("timeout");
    cmd.arg("10");
    if let Some(ns) = ns {
        cmd.args(["ip", "netns", "exec", &ns.name]);
    }
    cmd.args([
        "tcpdump", "-i", interface, "-Q", direction, "-n", "-l", "-c", "1",
    ])
    .args(filter.split_whitespace())
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::null());
    let tcpdump = cmd.spawn().context("starting tcpdump")?;
    // tcpdump needs a moment to attach before the first packet.
    std::thread::sleep(Duration::from_millis(700));
    let acted = action();
    let out = tcpdump.wait_with_output()?;
    acted?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
