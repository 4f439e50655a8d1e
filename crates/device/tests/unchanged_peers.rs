//! The mesh's changes, as the agent makes them (`device_changes` from what the device reports,
//! what is wanted and what was asked last), leave the sessions of the peers they do not
//! concern alone: our userspace device in namespace A with two wireguard-go peers, B and C,
//! each in its own namespace; C never changes, and after every change its handshake and
//! counters on both ends are the ones it had, and pings through it are never lost.
//! Needs root, `ip`, `ping`, `wg` and `wireguard-go`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use wgmesh_core::{Cidr, Key, PrivateKey};
use wgmesh_device::userspace::UserspaceDevice;
use wgmesh_device::{DeviceChange, InterfaceConfig, PeerConfig, device_changes};

mod common;

use common::{Netns, in_netns, is_root, run};

fn underlay(link: u8, host: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 210, link, host))
}

fn tunnel(host: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 211, 0, host))
}

/// wireguard-go processes, stopped by PID on drop (before the namespaces go).
struct Gos(Vec<Child>);

impl Drop for Gos {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline && !matches!(child.try_wait(), Ok(Some(_))) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

struct Remote {
    ns: String,
    ifname: String,
    key: PrivateKey,
    port: u16,
    host: u8,
}

impl Remote {
    fn wg(&self, args: &[&str]) -> String {
        let mut full = vec!["ip", "netns", "exec", &self.ns, "wg"];
        full.extend_from_slice(args);
        run(&full)
    }

    /// (latest handshake, rx, tx) of its one peer (us), as wireguard-go reports them.
    fn view(&self) -> (u64, u64, u64) {
        let dump = self.wg(&["show", &self.ifname, "dump"]);
        let line: Vec<&str> = dump.lines().nth(1).expect("a peer").split('\t').collect();
        (
            line[4].parse().unwrap(),
            line[5].parse().unwrap(),
            line[6].parse().unwrap(),
        )
    }

    fn wanted(&self, psk: Option<Key>) -> PeerConfig {
        PeerConfig {
            public_key: self.key.public_key(),
            endpoint: Some(SocketAddr::new(underlay(self.host, 2), self.port)),
            allowed_ips: vec![Cidr::host(tunnel(self.host + 1))],
            persistent_keepalive: 0,
            preshared_key: psk,
        }
    }
}

/// `count` pings from `ns` to `to`, 10 ms apart: how many were lost.
fn ping_losses(ns: &str, to: IpAddr, count: u32) -> u32 {
    let out = Command::new("ip")
        .args([
            "netns", "exec", ns, "ping", "-q", "-n", "-i", "0.01", "-W", "1",
        ])
        .args(["-c", &count.to_string(), &to.to_string()])
        .output()
        .expect("ping");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("received"))
        .unwrap_or_else(|| panic!("ping said: {text}"));
    let nums: Vec<u32> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|s| s.parse().ok())
        .collect();
    nums[0] - nums[1]
}

#[test]
fn mesh_changes_leave_unchanged_peers_sessions_alone() {
    if !is_root("unchanged peers") {
        return;
    }
    let pid = std::process::id();
    let ns_a = format!("da-{pid}-a");
    let mut namespaces = vec![Netns::new(&ns_a)];
    let mut gos = Gos(Vec::new());
    let mut remotes = Vec::new();
    let dir = tempfile::tempdir().unwrap();
    for (host, name) in [(1u8, "b"), (2u8, "c")] {
        let ns = format!("da-{pid}-{name}");
        namespaces.push(Netns::new(&ns));
        let (va, vb) = (format!("dv{pid}{name}a"), format!("dv{pid}{name}b"));
        run(&[
            "ip", "link", "add", &va, "netns", &ns_a, "type", "veth", "peer", "name", &vb, "netns",
            &ns,
        ]);
        for (n, dev, h) in [(&ns_a, &va, 1), (&ns, &vb, 2)] {
            run(&[
                "ip",
                "-n",
                n,
                "addr",
                "add",
                &format!("{}/24", underlay(host, h)),
                "dev",
                dev,
            ]);
            run(&["ip", "-n", n, "link", "set", dev, "up"]);
        }
        let ifname = format!("dw{pid}{name}");
        gos.0.push(
            Command::new("ip")
                .args(["netns", "exec", &ns, "wireguard-go", "-f", &ifname])
                .env("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("wireguard-go"),
        );
        let sock = format!("/var/run/wireguard/{ifname}.sock");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !std::path::Path::new(&sock).exists() {
            assert!(Instant::now() < deadline, "wireguard-go's socket");
            std::thread::sleep(Duration::from_millis(20));
        }
        remotes.push(Remote {
            ns,
            ifname,
            key: PrivateKey::generate(),
            port: 51000 + u16::from(host),
            host,
        });
    }
    let ifname = format!("dw{pid}a");
    let our_key = PrivateKey::generate();
    let device = {
        let (name, key) = (ifname.clone(), our_key.clone());
        in_netns(&ns_a, move || {
            UserspaceDevice::create(InterfaceConfig {
                name,
                private_key: key,
                listen_port: 51820,
                fwmark: 0,
            })
            .expect("device")
        })
    };
    run(&[
        "ip",
        "-n",
        &ns_a,
        "addr",
        "add",
        "10.211.0.1/24",
        "dev",
        &ifname,
    ]);
    run(&[
        "ip", "-n", &ns_a, "link", "set", &ifname, "mtu", "1420", "up",
    ]);
    for (i, r) in remotes.iter().enumerate() {
        let key = dir.path().join(format!("k{i}"));
        std::fs::write(&key, r.key.expose_base64() + "\n").unwrap();
        let our_endpoint = SocketAddr::new(underlay(r.host, 1), 51820).to_string();
        r.wg(&[
            "set",
            &r.ifname,
            "private-key",
            &key.display().to_string(),
            "listen-port",
            &r.port.to_string(),
            "peer",
            &our_key.public_key().to_base64(),
            "allowed-ips",
            "10.211.0.1/32",
            "endpoint",
            &our_endpoint,
        ]);
        let addr = format!("{}/24", tunnel(r.host + 1));
        run(&["ip", "-n", &r.ns, "addr", "add", &addr, "dev", &r.ifname]);
        run(&[
            "ip", "-n", &r.ns, "link", "set", &r.ifname, "mtu", "1420", "up",
        ]);
    }
    let (b, c) = (&remotes[0], &remotes[1]);
    // Tunnel addresses: B is .2, C is .3.
    let (b_ip, c_ip) = (tunnel(2), tunnel(3));
    let b_want = b.wanted(None);
    let c_want = c.wanted(None);

    // The agent's step: observe, diff against what is wanted and what was asked, apply.
    let mut asked: Vec<PeerConfig> = Vec::new();
    let mut step = |wanted: Vec<PeerConfig>, port: u16, fwmark: u32| -> Vec<DeviceChange> {
        let changes = device_changes(&device.observe(), &wanted, &asked, port, fwmark);
        device.apply(&changes).expect("apply");
        asked = wanted;
        changes
    };
    let changes = step(vec![b_want.clone(), c_want.clone()], 51820, 0);
    assert_eq!(changes.len(), 2);
    for ip in [b_ip, c_ip] {
        let deadline = Instant::now() + Duration::from_secs(20);
        while ping_losses(&ns_a, ip, 1) != 0 {
            assert!(Instant::now() < deadline, "no tunnel to {ip}");
        }
    }
    let handshake_of = |key| {
        device
            .observe()
            .peers
            .into_iter()
            .find(|p| p.config.public_key == key)
            .and_then(|p| p.last_handshake)
            .expect("a handshake")
    };
    let c_key = c.key.public_key();
    let b_key = b.key.public_key();
    let c_ours = handshake_of(c_key);
    let c_theirs = c.view().0;
    let b_ours = handshake_of(b_key);
    eprintln!("C: ours {c_ours:?}, theirs {c_theirs}");

    let d = PeerConfig {
        public_key: PrivateKey::generate().public_key(),
        endpoint: Some("10.210.9.9:51820".parse().unwrap()),
        allowed_ips: vec!["10.211.0.4/32".parse().unwrap()],
        persistent_keepalive: 25,
        preshared_key: None,
    };
    let mut b_wider = b_want.clone();
    b_wider.allowed_ips.push("10.212.0.0/24".parse().unwrap());
    let mut b_keepalive = b_wider.clone();
    b_keepalive.persistent_keepalive = 15;
    // B gets a second address; its endpoint moves there.
    run(&[
        "ip",
        "-n",
        &b.ns,
        "addr",
        "add",
        "10.210.1.3/24",
        "dev",
        &format!("dv{pid}bb"),
    ]);
    let mut b_moved = b_keepalive.clone();
    b_moved.endpoint = Some(SocketAddr::new("10.210.1.3".parse().unwrap(), b.port));

    type Event = (&'static str, Vec<PeerConfig>, u16, u32, usize);
    let events: Vec<Event> = vec![
        (
            "identical snapshot",
            vec![b_want.clone(), c_want.clone()],
            51820,
            0,
            0,
        ),
        (
            "a node joins",
            vec![b_want.clone(), c_want.clone(), d.clone()],
            51820,
            0,
            1,
        ),
        (
            "identical again",
            vec![b_want.clone(), c_want.clone(), d.clone()],
            51820,
            0,
            0,
        ),
        (
            "B's allowed IPs",
            vec![b_wider.clone(), c_want.clone(), d.clone()],
            51820,
            0,
            1,
        ),
        (
            "B's keepalive",
            vec![b_keepalive.clone(), c_want.clone(), d.clone()],
            51820,
            0,
            1,
        ),
        (
            "B's endpoint",
            vec![b_moved.clone(), c_want.clone(), d.clone()],
            51820,
            0,
            1,
        ),
        (
            "the node leaves",
            vec![b_moved.clone(), c_want.clone()],
            51820,
            0,
            1,
        ),
        (
            "fwmark",
            vec![b_moved.clone(), c_want.clone()],
            51820,
            0x57,
            1,
        ),
        (
            "fwmark off",
            vec![b_moved.clone(), c_want.clone()],
            51820,
            0,
            1,
        ),
    ];
    for (name, wanted, port, fwmark, n) in events {
        // Traffic through C while the change is applied.
        let ns = c.ns.clone();
        let pinger = std::thread::spawn(move || ping_losses(&ns, tunnel(1), 60));
        std::thread::sleep(Duration::from_millis(200));
        let changes = step(wanted, port, fwmark);
        assert_eq!(changes.len(), n, "{name}: {changes:?}");
        assert_eq!(pinger.join().unwrap(), 0, "{name}: pings through C lost");
        assert_eq!(ping_losses(&ns_a, b_ip, 5), 0, "{name}: B reachable");
        assert_eq!(handshake_of(c_key), c_ours, "{name}: C's session (ours)");
        assert_eq!(c.view().0, c_theirs, "{name}: C's session (theirs)");
        assert_eq!(handshake_of(b_key), b_ours, "{name}: B's session");
        eprintln!("{name}: {} change(s), C untouched", changes.len());
    }

    // The listen port: C's session stays; C learns the port from our next packet.
    let ns = c.ns.clone();
    let pinger = std::thread::spawn(move || ping_losses(&ns, tunnel(1), 60));
    std::thread::sleep(Duration::from_millis(200));
    let changes = step(vec![b_moved.clone(), c_want.clone()], 51900, 0);
    assert_eq!(changes.len(), 1);
    eprintln!("listen port: pings from C lost {}", pinger.join().unwrap());
    assert_eq!(handshake_of(c_key), c_ours, "listen port: C's session");

    drop(device);
    drop(gos);
    namespaces.clear();
}
