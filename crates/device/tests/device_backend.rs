//! Backend selection against the real kernel, in a fresh network namespace: the kernel
//! WireGuard probe must agree with `ip link add .. type wireguard`, `Requested::Kernel` must
//! fail clearly without the module, and `Requested::Auto` must fall back to the userspace
//! device with one log line saying why. Where the module exists, the kernel device itself is
//! exercised too. Needs root and `ip`.

use std::io::Write;
use std::sync::{Arc, Mutex};

use wgmesh_core::{Cidr, Key, PrivateKey};
use wgmesh_device::{
    BackendKind, Device, DeviceChange, Error, InterfaceConfig, KernelSupport, PeerConfig,
    Requested, kernel_wireguard_available,
};

mod common;

use common::{HeldTun, Netns, NsCmd, is_root};

fn ip(ns: &str, args: &[&str]) -> (bool, String) {
    NsCmd(ns.to_owned()).try_ip(args)
}

/// Log output captured from the test thread.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Capture {
    type Writer = Capture;
    fn make_writer(&'a self) -> Capture {
        self.clone()
    }
}

fn config(name: &str, key: &PrivateKey) -> InterfaceConfig {
    InterfaceConfig {
        name: name.to_owned(),
        private_key: key.clone(),
        listen_port: 0,
        fwmark: 0,
    }
}

fn peer(n: u8, psk: Option<Key>) -> PeerConfig {
    PeerConfig {
        public_key: PrivateKey::from_bytes([n; 32]).public_key(),
        endpoint: Some(([192, 0, 2, n], 51820).into()),
        allowed_ips: vec![Cidr::from(
            format!("10.77.{n}.0/24").parse::<ipnet::IpNet>().unwrap(),
        )],
        persistent_keepalive: 25,
        preshared_key: psk,
    }
}

#[test]
fn backend_selection_follows_the_kernel() {
    if !is_root("device backend") {
        return;
    }
    let ns = Netns::new(format!("wgdb-{}-sel", std::process::id()));
    // Ground truth from iproute2.
    let (kernel_has_wg, _) = ip(&ns.name, &["link", "add", "wgx", "type", "wireguard"]);
    if kernel_has_wg {
        ip(&ns.name, &["link", "del", "wgx"]);
    }
    let ns_name = ns.name.clone();
    let ifname = format!("wgb{}", std::process::id() % 100_000);
    ns.run(move || async move {
        let support = kernel_wireguard_available().await.expect("the probe runs");
        match (&support, kernel_has_wg) {
            (KernelSupport::Available, true) => {}
            (KernelSupport::Unavailable(reason), false) => {
                assert!(!reason.is_empty());
                eprintln!("kernel WireGuard unavailable: {reason}");
            }
            (support, _) => panic!("probe says {support:?}, ip says {kernel_has_wg}"),
        }
        let (_, links) = ip(&ns_name, &["link", "show"]);
        assert!(
            !links.contains("wgprobe"),
            "the probe link is gone: {links}"
        );

        let key = PrivateKey::generate();
        let requested_kernel = Device::open(Requested::Kernel, config(&ifname, &key)).await;
        match requested_kernel {
            Err(Error::KernelUnavailable(reason)) if !kernel_has_wg => {
                let msg = Error::KernelUnavailable(reason).to_string();
                assert!(msg.contains("kernel WireGuard is unavailable"), "{msg}");
            }
            Ok(device) if kernel_has_wg => exercise_kernel_device(device, &ns_name).await,
            Err(e) => panic!("kernel backend: unexpected error {e}"),
            Ok(_) => panic!("kernel backend opened although ip cannot create the link"),
        }

        let logs = Capture::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(logs.clone())
            .with_ansi(false)
            .finish();
        let guard = tracing::subscriber::set_default(subscriber);
        let device = Device::open(Requested::Auto, config(&ifname, &key))
            .await
            .expect("auto opens a device");
        drop(guard);
        let logs = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
        let want = if kernel_has_wg {
            BackendKind::Kernel
        } else {
            BackendKind::Userspace
        };
        assert_eq!(device.backend(), want);
        assert_eq!(device.name(), ifname);
        let fallback_lines = logs
            .lines()
            .filter(|l| l.contains("kernel WireGuard unavailable ("))
            .count();
        if kernel_has_wg {
            assert_eq!(fallback_lines, 0, "{logs}");
        } else {
            assert_eq!(fallback_lines, 1, "{logs}");
            assert!(logs.contains("using the userspace device"), "{logs}");
        }
        assert!(
            !logs.contains(&key.expose_base64()),
            "no private key in logs"
        );

        // The same API whatever the backend.
        device
            .apply(&[DeviceChange::UpsertPeer(peer(1, None))])
            .await
            .unwrap();
        let state = device.observe().await.unwrap();
        assert_eq!(state.public_key, key.public_key());
        assert_eq!(state.peers.len(), 1);
        assert_eq!(state.peers[0].config.allowed_ips, peer(1, None).allowed_ips);
        device.delete().await.unwrap();
    });
}

/// Runs only where the kernel has WireGuard.
async fn exercise_kernel_device(device: Device, ns: &str) {
    assert_eq!(device.backend(), BackendKind::Kernel);
    let psk = Key::from_bytes([3; 32]);
    device
        .apply(&[
            DeviceChange::SetListenPort(51999),
            DeviceChange::SetFwmark(0x77),
            DeviceChange::UpsertPeer(peer(1, Some(psk))),
            DeviceChange::UpsertPeer(peer(2, None)),
        ])
        .await
        .unwrap();
    let state = device.observe().await.unwrap();
    assert_eq!((state.listen_port, state.fwmark), (51999, 0x77));
    assert_eq!(state.peers.len(), 2);
    let p1 = &state.peers[0];
    assert_eq!(p1.config.preshared_key, Some(psk));
    assert_eq!(p1.config.persistent_keepalive, 25);
    assert_eq!(p1.last_handshake, None);
    assert_eq!(p1.config.allowed_ips, peer(1, None).allowed_ips);

    // Dropping the preshared key clears it; removal removes; allowed IPs are added.
    let mut p1_new = peer(1, None);
    p1_new
        .allowed_ips
        .push(Cidr::from("10.78.0.0/16".parse::<ipnet::IpNet>().unwrap()));
    device
        .apply(&[
            DeviceChange::UpsertPeer(p1_new.clone()),
            DeviceChange::RemovePeer(peer(2, None).public_key),
        ])
        .await
        .unwrap();
    let state = device.observe().await.unwrap();
    assert_eq!(state.peers.len(), 1);
    assert_eq!(state.peers[0].config.preshared_key, None);
    assert_eq!(state.peers[0].config.allowed_ips, p1_new.allowed_ips);
    // Above, the allowed IPs only grew (sent without the replace flag); here one goes.
    device
        .apply(&[DeviceChange::UpsertPeer(peer(1, None))])
        .await
        .unwrap();
    let state = device.observe().await.unwrap();
    assert_eq!(state.peers[0].config.allowed_ips, peer(1, None).allowed_ips);

    let name = device.name().to_owned();
    let (_, shown) = ip(ns, &["link", "show", &name]);
    assert!(shown.contains("alias wgmesh"), "marked as ours: {shown}");
    device.delete().await.unwrap();
    let (exists, _) = ip(ns, &["link", "show", &name]);
    assert!(!exists, "the kernel link is deleted");
    another_tools_link_is_never_taken_over(ns).await;
}

/// `wg` inside the namespace: whether it succeeded, and its output.
fn wg(ns: &str, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", ns, "wg"])
        .args(args)
        .output()
        .expect("running wg");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// A WireGuard link `name` made as another tool (or an older agent) makes one: `ip link add`,
/// then `wg set` with `key` and `more` (peers).
fn wireguard_link(ns: &str, name: &str, key: &PrivateKey, more: &[&str]) {
    let (made, out) = ip(ns, &["link", "add", name, "type", "wireguard"]);
    assert!(made, "{out}");
    let key_file = std::env::temp_dir().join(format!("{name}-{}.key", std::process::id()));
    std::fs::write(&key_file, key.expose_base64()).unwrap();
    let set: Vec<&str> = ["set", name, "private-key", key_file.to_str().unwrap()]
        .into_iter()
        .chain(more.iter().copied())
        .collect();
    let (done, out) = wg(ns, &set);
    std::fs::remove_file(&key_file).unwrap();
    assert!(done, "{out}");
}

/// A WireGuard link of the mesh's name made by another tool (wg-quick's `wg0`) is neither
/// adopted (its peers would be replaced) nor deleted to make room for the userspace device:
/// both refuse, saying what to do, and the link keeps its key and peers. A bare link (no
/// key yet) is adopted and marked.
async fn another_tools_link_is_never_taken_over(ns: &str) {
    let foreign = "wgforeign";
    let their_peer = PrivateKey::from_bytes([8; 32]).public_key().to_base64();
    wireguard_link(
        ns,
        foreign,
        &PrivateKey::from_bytes([9; 32]),
        &["peer", &their_peer, "allowed-ips", "10.99.0.0/24"],
    );
    let (_, before) = wg(ns, &["show", foreign, "dump"]);

    let ours = PrivateKey::generate();
    for requested in [Requested::Kernel, Requested::Userspace, Requested::Auto] {
        match Device::open(requested, config(foreign, &ours)).await {
            Err(Error::InvalidConfig(message)) => {
                assert!(
                    message.contains("not wgmesh's") && message.contains("interfaceName"),
                    "{message}"
                );
            }
            Err(e) => panic!("{requested:?}: another error than a refusal: {e}"),
            Ok(_) => panic!("{requested:?}: another tool's link was taken"),
        }
    }
    let (_, after) = wg(ns, &["show", foreign, "dump"]);
    assert_eq!(after, before, "the other tool's link is untouched");
    // Claimed only on its own evidence: neither our key nor a peer our saved state lists is
    // there (a saved state naming the interface is not enough: wg-quick may have made the
    // link since a reboot).
    let unrelated = PrivateKey::from_bytes([7; 32]).public_key();
    let claimed =
        wgmesh_device::kernel::claim_link(foreign, Some(&ours.public_key()), &[unrelated])
            .await
            .unwrap();
    assert!(!claimed, "another tool's link is not claimed");
    let (_, shown) = ip(ns, &["link", "show", foreign]);
    assert!(!shown.contains("alias"), "{shown}");
    // An older agent's link under a key rotated since carries the saved peers: claimed, then
    // adopted.
    let their_peer_key = PrivateKey::from_bytes([8; 32]).public_key();
    let claimed = wgmesh_device::kernel::claim_link(foreign, None, &[their_peer_key])
        .await
        .unwrap();
    assert!(claimed, "a link carrying the saved peers is ours");
    let (_, shown) = ip(ns, &["link", "show", foreign]);
    assert!(shown.contains("alias wgmesh"), "marked as ours: {shown}");
    let device = Device::open(Requested::Kernel, config(foreign, &ours))
        .await
        .expect("a claimed link is adopted");
    device.delete().await.unwrap();

    // An older agent's link (no alias, the node's key) is adopted and marked; the userspace
    // device, asked for, replaces it.
    let old = "wgold";
    wireguard_link(ns, old, &ours, &[]);
    let device = Device::open(Requested::Kernel, config(old, &ours))
        .await
        .expect("an older agent's link is adopted");
    let (_, shown) = ip(ns, &["link", "show", old]);
    assert!(shown.contains("alias wgmesh"), "marked as ours: {shown}");
    drop(device);
    let device = Device::open(Requested::Userspace, config(old, &ours))
        .await
        .expect("the userspace device replaces our kernel link");
    assert_eq!(device.backend(), BackendKind::Userspace);
    device.delete().await.unwrap();

    let bare = "wgbare";
    let (made, out) = ip(ns, &["link", "add", bare, "type", "wireguard"]);
    assert!(made, "{out}");
    let device = Device::open(Requested::Kernel, config(bare, &ours))
        .await
        .expect("a link without a key is adopted");
    let (_, shown) = ip(ns, &["link", "show", bare]);
    assert!(shown.contains("alias wgmesh"), "marked as ours: {shown}");
    device.delete().await.unwrap();
}

/// A userspace device made persistent outlives the process's hold on it: its interface, its
/// address and the routes through it stay (a crashed or upgrading agent leaves no gap for
/// plaintext), the next device attaches to the same interface, and `delete` removes it.
#[test]
fn a_persistent_userspace_device_outlives_its_process() {
    if !is_root("device backend") {
        return;
    }
    let ns = Netns::new("wgm-dev-persist");
    let cmd = ns.cmd();
    ns.run(move || async move {
        let key = PrivateKey::generate();
        let device = Device::open(Requested::Userspace, config("wgp0", &key))
            .await
            .expect("userspace device");
        device.keep_after_exit(true).expect("persistent");
        cmd.ip(&["address", "add", "10.250.0.1/16", "dev", "wgp0"]);
        cmd.ip(&["link", "set", "wgp0", "up"]);
        cmd.ip(&["route", "add", "10.244.2.0/24", "dev", "wgp0"]);
        let index = cmd.ip(&["-o", "link", "show", "wgp0"]);
        device.shutdown();

        let (exists, _) = cmd.try_ip(&["link", "show", "wgp0"]);
        assert!(exists, "the persistent interface stays after shutdown");
        let routes = cmd.ip(&["route", "show", "10.244.2.0/24"]);
        assert!(routes.contains("dev wgp0"), "its routes stay: {routes}");

        let again = Device::open(Requested::Userspace, config("wgp0", &key))
            .await
            .expect("attaching to the persistent interface");
        let index_again = cmd.ip(&["-o", "link", "show", "wgp0"]);
        assert_eq!(
            index.split(':').next(),
            index_again.split(':').next(),
            "the same interface (ifindex)"
        );
        assert!(
            cmd.ip(&["address", "show", "dev", "wgp0"])
                .contains("10.250.0.1/16"),
            "its address kept"
        );
        again.delete().await.expect("delete");
        let (exists, _) = cmd.try_ip(&["link", "show", "wgp0"]);
        assert!(!exists, "delete removes a persistent interface");
    });
}

/// A TUN of the mesh's name that another program holds open (wireguard-go's `wg0`) is neither
/// attached to by the userspace device nor deleted to make room for a kernel link, whatever
/// the backend asked for: each refuses, saying what to do, and the program keeps its
/// interface. A persistent TUN nobody holds (an older agent's) is taken and marked; ours,
/// marked, is told from another program's while we hold it.
#[test]
fn a_tun_another_program_holds_is_never_taken_over() {
    if !is_root("device backend") {
        return;
    }
    let ns = Netns::new(format!("wgdb-{}-tun", std::process::id()));
    let ns_name = ns.name.clone();
    let mut held = HeldTun::start(&ns.name, "wgheld");
    let (_, before) = ip(&ns.name, &["-o", "link", "show", "wgheld"]);
    let ns_inner = ns_name.clone();
    ns.run(move || async move {
        let ns = ns_inner;
        let key = PrivateKey::generate();
        for requested in [Requested::Kernel, Requested::Userspace, Requested::Auto] {
            match Device::open(requested, config("wgheld", &key)).await {
                Err(Error::InvalidConfig(message)) => assert!(
                    message.contains("held open by another program")
                        && message.contains("interfaceName"),
                    "{message}"
                ),
                Err(e) => panic!("{requested:?}: another error than a refusal: {e}"),
                Ok(_) => panic!("{requested:?}: another program's TUN was taken"),
            }
        }

        // An older agent's persistent TUN, which nobody holds: taken and marked.
        let (made, out) = ip(&ns, &["tuntap", "add", "mode", "tun", "name", "wgleft"]);
        assert!(made, "{out}");
        let device = Device::open(Requested::Userspace, config("wgleft", &key))
            .await
            .expect("a TUN nobody holds is taken");
        let (_, shown) = ip(&ns, &["link", "show", "wgleft"]);
        assert!(shown.contains("alias wgmesh"), "marked as ours: {shown}");
        // Held by us and marked: ours, whichever backend is asked for next.
        assert_eq!(
            wgmesh_device::kernel::existing_link("wgleft")
                .await
                .unwrap(),
            Some(wgmesh_device::kernel::ExistingLink::Tun)
        );
        device.delete().await.unwrap();
        assert_eq!(
            wgmesh_device::kernel::existing_link("wgheld")
                .await
                .unwrap(),
            Some(wgmesh_device::kernel::ExistingLink::ForeignTun)
        );
    });
    assert!(held.running(), "wireguard-go still runs");
    let (_, after) = ip(&ns_name, &["-o", "link", "show", "wgheld"]);
    assert_eq!(
        after.split(':').next(),
        before.split(':').next(),
        "the same interface (ifindex)"
    );
    assert!(!after.contains("alias"), "left unmarked: {after}");
}
