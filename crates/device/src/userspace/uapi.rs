//! The cross-platform WireGuard configuration protocol (<https://www.wireguard.com/xplatform/>)
//! as pure functions: parse a request, turn a `set` into device changes, render a `get`.
//! Nothing here does I/O or panics on any input.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::UNIX_EPOCH;

use wgmesh_core::{Cidr, Key, PrivateKey, PublicKey};

use crate::{DeviceChange, DeviceState, Error, PeerConfig};

/// errno values as the UAPI reports them (negated, as wireguard-go does and `wg` expects).
pub(crate) const ERRNO_IO: i32 = -libc::EIO;
pub(crate) const ERRNO_PROTOCOL: i32 = -libc::EPROTO;
pub(crate) const ERRNO_INVALID: i32 = -libc::EINVAL;
pub(crate) const ERRNO_PORT_IN_USE: i32 = -libc::EADDRINUSE;

/// A parsed request.
#[derive(Debug)]
pub(crate) enum Request {
    Get,
    Set(SetRequest),
}

/// A `set=1` transaction. Fields left `None` are unchanged.
#[derive(Debug, Default)]
pub(crate) struct SetRequest {
    pub private_key: Option<PrivateKey>,
    pub listen_port: Option<u16>,
    pub fwmark: Option<u32>,
    pub replace_peers: bool,
    pub peers: Vec<PeerUpdate>,
}

/// One `public_key=` section. Every section starts from these defaults, so nothing leaks from
/// one peer to the next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PeerUpdate {
    pub public_key: PublicKey,
    pub remove: bool,
    pub update_only: bool,
    /// `Some(None)` clears the key (all-zero key on the wire).
    pub preshared_key: Option<Option<Key>>,
    pub endpoint: Option<SocketAddr>,
    pub persistent_keepalive: Option<u16>,
    pub replace_allowed_ips: bool,
    pub allowed_ips: Vec<Cidr>,
}

impl PeerUpdate {
    fn new(public_key: PublicKey) -> Self {
        PeerUpdate {
            public_key,
            remove: false,
            update_only: false,
            preshared_key: None,
            endpoint: None,
            persistent_keepalive: None,
            replace_allowed_ips: false,
            allowed_ips: Vec::new(),
        }
    }
}

fn protocol(msg: impl Into<String>) -> Error {
    Error::UapiProtocol(msg.into())
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::InvalidConfig(msg.into())
}

/// The errno to report for an error.
pub(crate) fn errno(err: &Error) -> i32 {
    match err {
        Error::UapiProtocol(_) => ERRNO_PROTOCOL,
        Error::InvalidConfig(_) => ERRNO_INVALID,
        Error::Bind { source, .. } if source.kind() == std::io::ErrorKind::AddrInUse => {
            ERRNO_PORT_IN_USE
        }
        _ => ERRNO_IO,
    }
}

pub(crate) fn parse_hex_key(value: &str) -> Result<[u8; 32], Error> {
    let b = value.as_bytes();
    if b.len() != 64 {
        return Err(invalid(format!("a key is 64 hex digits, got {}", b.len())));
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    let mut out = [0u8; 32];
    for (i, pair) in b.chunks_exact(2).enumerate() {
        match (nibble(pair[0]), nibble(pair[1])) {
            (Some(hi), Some(lo)) => out[i] = hi << 4 | lo,
            _ => return Err(invalid("a key must be hex")),
        }
    }
    Ok(out)
}

pub(crate) fn hex(bytes: &[u8; 32]) -> String {
    let mut s = String::with_capacity(64);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

fn parse_true(key: &str, value: &str) -> Result<bool, Error> {
    match value {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(invalid(format!("{key} must be true or false"))),
    }
}

fn parse_num<T: std::str::FromStr>(key: &str, value: &str) -> Result<T, Error> {
    value
        .parse()
        .map_err(|_| invalid(format!("{key}={value:?} is not a valid number")))
}

/// Parses one request: its lines up to, not including, the blank line that ends it.
pub(crate) fn parse_request(text: &str) -> Result<Request, Error> {
    let mut lines = text.split('\n').filter(|l| !l.is_empty());
    match lines.next() {
        Some("get=1") => match lines.next() {
            None => Ok(Request::Get),
            Some(_) => Err(protocol("get=1 takes no arguments")),
        },
        Some("set=1") => parse_set(lines).map(Request::Set),
        Some(other) => Err(protocol(format!(
            "unknown operation {:?}",
            other.chars().take(32).collect::<String>()
        ))),
        None => Err(protocol("empty request")),
    }
}

fn parse_set<'a>(lines: impl Iterator<Item = &'a str>) -> Result<SetRequest, Error> {
    let mut req = SetRequest::default();
    for line in lines {
        let (key, value) = line
            .split_once('=')
            .ok_or_else(|| protocol("a line is key=value"))?;
        if key == "public_key" {
            let key = PublicKey::from_bytes(parse_hex_key(value)?);
            req.peers.push(PeerUpdate::new(key));
            continue;
        }
        match req.peers.last_mut() {
            None => match key {
                "private_key" => {
                    let k = parse_hex_key(value)?;
                    // wg(8) sends zeros to remove the key; the device always has one (the
                    // agent's), and zeros would be a key everyone knows.
                    if k == [0; 32] {
                        return Err(invalid("the device's private key cannot be removed"));
                    }
                    req.private_key = Some(PrivateKey::from_bytes(k));
                }
                "listen_port" => req.listen_port = Some(parse_num(key, value)?),
                "fwmark" if value.is_empty() => req.fwmark = Some(0),
                "fwmark" => req.fwmark = Some(parse_num(key, value)?),
                "replace_peers" => req.replace_peers = parse_true(key, value)?,
                _ => return Err(invalid(format!("unknown device key {key:?}"))),
            },
            Some(peer) => match key {
                "remove" => peer.remove = parse_true(key, value)?,
                "update_only" => peer.update_only = parse_true(key, value)?,
                "preshared_key" => {
                    let k = parse_hex_key(value)?;
                    peer.preshared_key = Some((k != [0; 32]).then(|| Key::from_bytes(k)));
                }
                "endpoint" => {
                    peer.endpoint = Some(value.parse().map_err(|_| {
                        invalid("endpoint must be an address and port, e.g. 192.0.2.1:51820")
                    })?);
                }
                "persistent_keepalive_interval" => {
                    peer.persistent_keepalive = Some(parse_num(key, value)?);
                }
                "replace_allowed_ips" => peer.replace_allowed_ips = parse_true(key, value)?,
                "allowed_ip" => peer.allowed_ips.push(
                    Cidr::parse_masked(value)
                        .map_err(|_| invalid(format!("allowed_ip={value:?} is not a CIDR")))?,
                ),
                "protocol_version" if value == "1" => {}
                "protocol_version" => return Err(invalid("only protocol_version=1 exists")),
                _ => return Err(invalid(format!("unknown peer key {key:?}"))),
            },
        }
    }
    Ok(req)
}

/// A device change, and whether an endpoint in it was set explicitly (and so must replace a
/// roamed endpoint even when it equals the configured one).
pub(crate) type Op = (DeviceChange, bool);

/// A peer this transaction touched, as the transaction leaves it so far.
struct Touched {
    cfg: PeerConfig,
    /// Still there (not removed by a later section).
    present: bool,
    /// An endpoint was set explicitly since it was last added.
    explicit_endpoint: bool,
}

/// Turns a `set` into the changes it makes to a device whose key is `device_key` and whose
/// peers are `current`.
///
/// Later sections see the effect of earlier ones (remove then re-add, replace_peers then
/// add, an allowed IP taken by a later peer), as in wireguard-go and the kernel; the result
/// is one removal for each peer removed and one upsert with the final configuration for
/// each peer changed. The cost is linear in the request and the device's peers: a request
/// naming one peer thousands of times does not copy its configuration thousands of times.
/// A section for the device's own key (the one this request sets, or else `device_key`) is
/// ignored whole, as the kernel does: it takes no allowed IP from anyone.
pub(crate) fn set_to_ops<'a>(
    req: SetRequest,
    device_key: &PublicKey,
    current: impl IntoIterator<Item = &'a PeerConfig>,
) -> Vec<Op> {
    let own = req
        .private_key
        .as_ref()
        .map_or(*device_key, PrivateKey::public_key);
    let mut ops = Vec::new();
    if let Some(k) = req.private_key {
        ops.push((DeviceChange::SetPrivateKey(k), false));
    }
    if let Some(p) = req.listen_port {
        ops.push((DeviceChange::SetListenPort(p), false));
    }
    if let Some(m) = req.fwmark {
        ops.push((DeviceChange::SetFwmark(m), false));
    }
    let mut on_device: HashMap<PublicKey, &PeerConfig> = HashMap::new();
    // Which peer each allowed IP belongs to now: a peer's list may still hold IPs taken
    // from it since; they are dropped when its final configuration is built.
    let mut owner: HashMap<Cidr, PublicKey> = HashMap::new();
    for p in current {
        on_device.insert(p.public_key, p);
        for c in &p.allowed_ips {
            owner.insert(*c, p.public_key);
        }
    }
    let mut removed: Vec<PublicKey> = Vec::new();
    let mut removed_set: HashSet<PublicKey> = HashSet::new();
    let mut remove = |key: PublicKey| {
        if removed_set.insert(key) {
            removed.push(key);
        }
    };
    if req.replace_peers {
        for &key in on_device.keys() {
            remove(key);
        }
        owner.clear();
    }
    let mut touched: HashMap<PublicKey, Touched> = HashMap::new();
    let mut order: Vec<PublicKey> = Vec::new();
    // The touched entry of a peer still on the device, made from its configuration there.
    let touch =
        |key: PublicKey, touched: &mut HashMap<PublicKey, Touched>, order: &mut Vec<PublicKey>| {
            touched.entry(key).or_insert_with(|| {
                order.push(key);
                let on = (!req.replace_peers).then(|| on_device.get(&key)).flatten();
                Touched {
                    cfg: on.map_or_else(|| empty_peer(key), |p| (*p).clone()),
                    present: on.is_some(),
                    explicit_endpoint: false,
                }
            });
        };
    for u in req.peers {
        let key = u.public_key;
        if key == own {
            continue;
        }
        touch(key, &mut touched, &mut order);
        let Some(t) = touched.get_mut(&key) else {
            continue;
        };
        if u.remove {
            if t.present {
                t.present = false;
                for c in t.cfg.allowed_ips.drain(..) {
                    if owner.get(&c) == Some(&key) {
                        owner.remove(&c);
                    }
                }
                if on_device.contains_key(&key) {
                    remove(key);
                }
            }
            continue;
        }
        if u.update_only && !t.present {
            continue;
        }
        if !t.present {
            // Added, or added again after a removal: it starts from nothing.
            *t = Touched {
                cfg: empty_peer(key),
                present: true,
                explicit_endpoint: false,
            };
        }
        if let Some(psk) = u.preshared_key {
            t.cfg.preshared_key = psk;
        }
        if let Some(ep) = u.endpoint {
            t.cfg.endpoint = Some(ep);
            t.explicit_endpoint = true;
        }
        if let Some(ka) = u.persistent_keepalive {
            t.cfg.persistent_keepalive = ka;
        }
        if u.replace_allowed_ips {
            for c in t.cfg.allowed_ips.drain(..) {
                if owner.get(&c) == Some(&key) {
                    owner.remove(&c);
                }
            }
        }
        let mut losers = Vec::new();
        for c in u.allowed_ips {
            // An allowed IP belongs to one peer: the latest assignment takes it from the
            // others, and a peer that loses one is changed too.
            match owner.insert(c, key) {
                Some(from) if from == key => {}
                Some(from) => {
                    losers.push(from);
                    t.cfg.allowed_ips.push(c);
                }
                None => t.cfg.allowed_ips.push(c),
            }
        }
        for from in losers {
            touch(from, &mut touched, &mut order);
        }
    }
    for key in removed {
        ops.push((DeviceChange::RemovePeer(key), false));
    }
    for key in order {
        let Some(mut t) = touched.remove(&key) else {
            continue;
        };
        if !t.present {
            continue;
        }
        let mut seen = HashSet::new();
        t.cfg
            .allowed_ips
            .retain(|c| owner.get(c) == Some(&key) && seen.insert(*c));
        ops.push((DeviceChange::UpsertPeer(t.cfg), t.explicit_endpoint));
    }
    ops
}

fn empty_peer(public_key: PublicKey) -> PeerConfig {
    PeerConfig {
        public_key,
        endpoint: None,
        allowed_ips: Vec::new(),
        persistent_keepalive: 0,
        preshared_key: None,
    }
}

/// Renders the answer to `get=1`, including the closing `errno=0` and blank line.
pub(crate) fn render_get(private_key: &PrivateKey, state: &DeviceState) -> String {
    let mut s = String::with_capacity(256 + 256 * state.peers.len());
    let _ = writeln!(s, "private_key={}", hex(&private_key.to_bytes()));
    let _ = writeln!(s, "listen_port={}", state.listen_port);
    if state.fwmark != 0 {
        let _ = writeln!(s, "fwmark={}", state.fwmark);
    }
    for p in &state.peers {
        let _ = writeln!(s, "public_key={}", hex(p.config.public_key.as_bytes()));
        let psk = p
            .config
            .preshared_key
            .map(|k| *k.as_bytes())
            .unwrap_or([0; 32]);
        let _ = writeln!(s, "preshared_key={}", hex(&psk));
        if let Some(ep) = p.current_endpoint {
            let _ = writeln!(s, "endpoint={ep}");
        }
        for c in &p.config.allowed_ips {
            let _ = writeln!(s, "allowed_ip={c}");
        }
        let _ = writeln!(
            s,
            "persistent_keepalive_interval={}",
            p.config.persistent_keepalive
        );
        let since = p
            .last_handshake
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .unwrap_or_default();
        let _ = writeln!(s, "last_handshake_time_sec={}", since.as_secs());
        let _ = writeln!(s, "last_handshake_time_nsec={}", since.subsec_nanos());
        let _ = writeln!(s, "rx_bytes={}", p.rx_bytes);
        let _ = writeln!(s, "tx_bytes={}", p.tx_bytes);
        let _ = writeln!(s, "protocol_version=1");
    }
    s.push_str("errno=0\n\n");
    s
}

/// The reply to a `set=1`.
pub(crate) fn render_errno(errno: i32) -> String {
    format!("errno={errno}\n\n")
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::PeerState;

    fn key(b: u8) -> PublicKey {
        PublicKey::from_bytes([b; 32])
    }

    fn cidr(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    fn set(text: &str) -> SetRequest {
        match parse_request(text) {
            Ok(Request::Set(s)) => s,
            other => panic!("{text:?} parsed as {other:?}"),
        }
    }

    #[test]
    fn hex_round_trip() {
        let bytes: [u8; 32] = std::array::from_fn(|i| (i * 7) as u8);
        assert_eq!(parse_hex_key(&hex(&bytes)).unwrap(), bytes);
        assert_eq!(
            parse_hex_key(&hex(&bytes).to_uppercase()).unwrap(),
            bytes,
            "upper case is accepted"
        );
    }

    #[test]
    fn parses_wg_set_transaction() {
        let a = hex(&[1; 32]);
        let b = hex(&[2; 32]);
        let psk = hex(&[9; 32]);
        let zero = hex(&[0; 32]);
        let text = format!(
            "set=1\nprivate_key={}\nlisten_port=51820\nfwmark=0x0\n",
            hex(&[5; 32])
        );
        // fwmark must be decimal.
        assert!(matches!(parse_request(&text), Err(Error::InvalidConfig(_))));

        let text = format!(
            "set=1\nprivate_key={}\nlisten_port=51820\nfwmark=7\nreplace_peers=true\n\
             public_key={a}\npreshared_key={psk}\nendpoint=[fd00::1]:51820\n\
             persistent_keepalive_interval=25\nreplace_allowed_ips=true\n\
             allowed_ip=10.0.0.1/24\nallowed_ip=fd00::/64\nprotocol_version=1\n\
             public_key={b}\nremove=true\n\
             public_key={b}\nupdate_only=true\npreshared_key={zero}\nendpoint=192.0.2.1:1\n",
            hex(&[5; 32])
        );
        let req = set(&text);
        assert_eq!(
            req.private_key.unwrap().to_bytes(),
            PrivateKey::from_bytes([5; 32]).to_bytes()
        );
        assert_eq!(req.listen_port, Some(51820));
        assert_eq!(req.fwmark, Some(7));
        assert!(req.replace_peers);
        assert_eq!(req.peers.len(), 3);
        let p = &req.peers[0];
        assert_eq!(p.public_key, key(1));
        assert_eq!(p.preshared_key, Some(Some(Key::from_bytes([9; 32]))));
        assert_eq!(p.endpoint, Some("[fd00::1]:51820".parse().unwrap()));
        assert_eq!(p.persistent_keepalive, Some(25));
        assert!(p.replace_allowed_ips);
        assert_eq!(p.allowed_ips, vec![cidr("10.0.0.0/24"), cidr("fd00::/64")]);
        // Per-peer fields do not carry over from one section to the next.
        let removed = &req.peers[1];
        assert_eq!(
            removed,
            &PeerUpdate {
                remove: true,
                ..PeerUpdate::new(key(2))
            }
        );
        let readded = &req.peers[2];
        assert!(!readded.remove, "remove must reset between sections");
        assert!(readded.update_only);
        assert_eq!(readded.preshared_key, Some(None), "zero key clears");
        assert!(readded.allowed_ips.is_empty());
    }

    #[test]
    fn garbage_is_an_error_never_a_panic() {
        let k = hex(&[1; 32]);
        let cases: Vec<String> = vec![
            String::new(),
            "\n".into(),
            "get=2".into(),
            "get=1\nprivate_key=00".into(),
            "set=1\nnonsense".into(),
            "set=1\n=".into(),
            "set=1\nlisten_port=65536".into(),
            "set=1\nlisten_port=-1".into(),
            "set=1\nprivate_key=zz".into(),
            format!("set=1\nprivate_key={}", "g".repeat(64)),
            format!("set=1\nprivate_key={}", "é".repeat(32)),
            "set=1\nreplace_peers=yes".into(),
            format!("set=1\nprivate_key={}", "0".repeat(64)),
            "set=1\nremove=true".into(),
            format!("set=1\npublic_key={k}\nendpoint=host:1"),
            format!("set=1\npublic_key={k}\nendpoint=1.2.3.4"),
            format!("set=1\npublic_key={k}\nallowed_ip=10.0.0.0/33"),
            format!("set=1\npublic_key={k}\npersistent_keepalive_interval=70000"),
            format!("set=1\npublic_key={k}\nlisten_port=1"),
            format!("set=1\npublic_key={k}\nprotocol_version=2"),
            "\u{0}\u{ffff}=\u{1}".into(),
            "set=1\n\u{0}=\u{0}".into(),
        ];
        for text in &cases {
            assert!(parse_request(text).is_err(), "{text:?} should be rejected");
        }
        // Pseudo-random soup of protocol fragments behind valid prefixes.
        const SOUP: &[&str] = &[
            "\n",
            "=",
            "true",
            "1",
            "-",
            "/",
            ":",
            "[",
            "]",
            "fd00::",
            "10.0.0.1",
            "999999",
            "public_key",
            "allowed_ip",
            "endpoint",
            "remove",
            "listen_port",
            "fwmark",
            "preshared_key",
            "update_only",
            "replace_peers",
            "private_key",
            "\u{0}",
            "é",
        ];
        let prefixes = [
            "",
            "set=1\n",
            "get=1\n",
            &*format!("set=1\npublic_key={k}\n"),
        ];
        let mut x: u32 = 12345;
        let mut next = move || {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            (x >> 16) as usize
        };
        for _ in 0..5000 {
            let mut text = prefixes[next() % prefixes.len()].to_string();
            for _ in 0..next() % 24 {
                text.push_str(SOUP[next() % SOUP.len()]);
                if next() % 3 == 0 {
                    text.push_str(&k[..next() % 65]);
                }
            }
            let _ = parse_request(&text);
        }
    }

    #[test]
    fn errno_mapping() {
        assert_eq!(errno(&protocol("x")), -libc::EPROTO);
        assert_eq!(errno(&invalid("x")), -libc::EINVAL);
        let in_use = Error::Bind {
            port: 1,
            source: std::io::ErrorKind::AddrInUse.into(),
        };
        assert_eq!(errno(&in_use), -libc::EADDRINUSE);
        assert_eq!(render_errno(0), "errno=0\n\n");
    }

    /// The device's own key in these tests.
    const DEVICE: PublicKey = PublicKey::from_bytes([0xdd; 32]);

    /// `set_to_ops` on a device whose key is [`DEVICE`].
    fn set_to_ops<'a>(
        req: SetRequest,
        current: impl IntoIterator<Item = &'a PeerConfig>,
    ) -> Vec<Op> {
        super::set_to_ops(req, &DEVICE, current)
    }

    #[test]
    fn a_section_for_the_devices_own_key_is_ignored() {
        let current = vec![peer(1, &["10.0.0.0/24"])];
        let ours = PrivateKey::from_bytes([7; 32]);
        let cases = [
            ("the device's key", DEVICE, String::new()),
            (
                "the key this request sets",
                ours.public_key(),
                format!("private_key={}\n", hex(&[7; 32])),
            ),
        ];
        for (case, own, device_lines) in cases {
            let text = format!(
                "set=1\n{device_lines}public_key={}\nallowed_ip=10.0.0.0/24\n",
                hex(own.as_bytes())
            );
            let ops = set_to_ops(set(&text), &current);
            assert!(
                ops.iter()
                    .all(|(op, _)| matches!(op, DeviceChange::SetPrivateKey(_))),
                "{case}: {ops:?}"
            );
        }
    }

    fn peer(b: u8, ips: &[&str]) -> PeerConfig {
        PeerConfig {
            public_key: key(b),
            endpoint: Some("192.0.2.1:51820".parse().unwrap()),
            allowed_ips: ips.iter().map(|s| cidr(s)).collect(),
            persistent_keepalive: 0,
            preshared_key: None,
        }
    }

    #[test]
    fn set_to_ops_table() {
        let current = vec![peer(1, &["10.0.1.0/24"]), peer(2, &["10.0.2.0/24"])];
        let a = hex(&[1; 32]);
        let b = hex(&[2; 32]);
        let c = hex(&[3; 32]);

        // Appends allowed IPs by default, replaces on request.
        let ops = set_to_ops(
            set(&format!("set=1\npublic_key={a}\nallowed_ip=10.9.0.0/16")),
            &current,
        );
        let [(DeviceChange::UpsertPeer(cfg), false)] = ops.as_slice() else {
            panic!("{ops:?}")
        };
        assert_eq!(
            cfg.allowed_ips,
            vec![cidr("10.0.1.0/24"), cidr("10.9.0.0/16")]
        );
        assert_eq!(cfg.endpoint, current[0].endpoint, "kept");

        let ops = set_to_ops(
            set(&format!(
                "set=1\npublic_key={a}\nreplace_allowed_ips=true\nallowed_ip=10.9.0.0/16\n\
                 endpoint=192.0.2.9:1"
            )),
            &current,
        );
        let [(DeviceChange::UpsertPeer(cfg), true)] = ops.as_slice() else {
            panic!("{ops:?}")
        };
        assert_eq!(cfg.allowed_ips, vec![cidr("10.9.0.0/16")]);

        // update_only skips unknown peers; remove of an unknown peer is a no-op.
        let ops = set_to_ops(
            set(&format!(
                "set=1\npublic_key={c}\nupdate_only=true\nallowed_ip=10.3.0.0/16\n\
                 public_key={c}\nremove=true"
            )),
            &current,
        );
        assert!(ops.is_empty(), "{ops:?}");

        // Remove and re-add in one transaction: the peer comes back with only the new fields.
        let ops = set_to_ops(
            set(&format!(
                "set=1\npublic_key={b}\nremove=true\npublic_key={b}\nallowed_ip=10.7.0.0/16"
            )),
            &current,
        );
        assert_eq!(ops.len(), 2, "{ops:?}");
        assert!(matches!(&ops[0], (DeviceChange::RemovePeer(k), _) if *k == key(2)));
        let (DeviceChange::UpsertPeer(cfg), _) = &ops[1] else {
            panic!("{ops:?}")
        };
        assert_eq!(cfg.allowed_ips, vec![cidr("10.7.0.0/16")]);
        assert_eq!(cfg.endpoint, None);

        // replace_peers removes everyone first.
        let ops = set_to_ops(
            set(&format!("set=1\nreplace_peers=true\npublic_key={c}")),
            &current,
        );
        assert_eq!(ops.len(), 3, "{ops:?}");
    }

    /// A `set` as wg(8) describes it: each section in turn, over a plain list of peers.
    /// Quadratic and obviously right; `set_to_ops` must come to the same peers.
    fn sequential(req: SetRequest, current: &[PeerConfig]) -> Vec<PeerConfig> {
        let mut work: Vec<PeerConfig> = if req.replace_peers {
            Vec::new()
        } else {
            current.to_vec()
        };
        for u in req.peers {
            let pos = work.iter().position(|p| p.public_key == u.public_key);
            if u.remove {
                if let Some(i) = pos {
                    work.remove(i);
                }
                continue;
            }
            if u.update_only && pos.is_none() {
                continue;
            }
            let mut cfg = pos.map_or_else(|| empty_peer(u.public_key), |i| work[i].clone());
            if let Some(psk) = u.preshared_key {
                cfg.preshared_key = psk;
            }
            if let Some(ep) = u.endpoint {
                cfg.endpoint = Some(ep);
            }
            if let Some(ka) = u.persistent_keepalive {
                cfg.persistent_keepalive = ka;
            }
            if u.replace_allowed_ips {
                cfg.allowed_ips.clear();
            }
            for c in u.allowed_ips {
                if !cfg.allowed_ips.contains(&c) {
                    cfg.allowed_ips.push(c);
                }
            }
            for other in work.iter_mut().filter(|p| p.public_key != cfg.public_key) {
                other.allowed_ips.retain(|c| !cfg.allowed_ips.contains(c));
            }
            match pos {
                Some(i) => work[i] = cfg,
                None => work.push(cfg),
            }
        }
        work
    }

    /// Ops applied as the device applies them (`PeerEdit`): an upsert takes its allowed IPs
    /// from every other peer.
    fn applied(ops: &[Op], current: &[PeerConfig]) -> Vec<PeerConfig> {
        let mut peers = current.to_vec();
        for (op, _) in ops {
            match op {
                DeviceChange::UpsertPeer(cfg) => {
                    for p in peers.iter_mut().filter(|p| p.public_key != cfg.public_key) {
                        p.allowed_ips.retain(|c| !cfg.allowed_ips.contains(c));
                    }
                    match peers.iter_mut().find(|p| p.public_key == cfg.public_key) {
                        Some(p) => *p = cfg.clone(),
                        None => peers.push(cfg.clone()),
                    }
                }
                DeviceChange::RemovePeer(k) => peers.retain(|p| p.public_key != *k),
                other => panic!("unexpected {other:?}"),
            }
        }
        peers
    }

    fn canonical(mut peers: Vec<PeerConfig>) -> Vec<PeerConfig> {
        for p in &mut peers {
            p.allowed_ips.sort();
        }
        peers.sort_by_key(|p| p.public_key);
        peers
    }

    #[test]
    fn set_to_ops_comes_to_what_each_section_in_turn_does() {
        // A small xorshift: thousands of transactions over four keys and six prefixes, so
        // that removals, re-adds, replace_peers and taken allowed IPs meet in every order.
        let mut state = 0x9E37_79B9_7F4A_7C15_u64;
        let mut next = |n: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % n
        };
        let prefixes = [
            "10.0.0.0/24",
            "10.0.1.0/24",
            "10.0.0.0/16",
            "10.9.0.1/32",
            "fd00::/64",
            "0.0.0.0/0",
        ];
        for round in 0..5000 {
            let mut current = Vec::new();
            for b in 1..=4u8 {
                if next(3) > 0 {
                    let ips: Vec<&str> =
                        prefixes.iter().copied().filter(|_| next(4) == 0).collect();
                    current.push(peer(b, &ips));
                }
            }
            // What the device holds never has an IP twice.
            current = applied(
                &current
                    .into_iter()
                    .map(|c| (DeviceChange::UpsertPeer(c), false))
                    .collect::<Vec<_>>(),
                &[],
            );
            let mut text = String::from("set=1\n");
            if next(6) == 0 {
                text.push_str("replace_peers=true\n");
            }
            for _ in 0..next(12) {
                let line = match next(9) {
                    0..=2 => format!("public_key={}", hex(&[next(4) as u8 + 1; 32])),
                    3 => format!("allowed_ip={}", prefixes[next(6) as usize]),
                    4 => "remove=true".to_owned(),
                    5 => "update_only=true".to_owned(),
                    6 => "replace_allowed_ips=true".to_owned(),
                    7 => format!("endpoint=192.0.2.{}:51820", next(3)),
                    _ => format!("persistent_keepalive_interval={}", next(3)),
                };
                // Peer keys only inside a peer section.
                if !text.contains("public_key=") && !line.starts_with("public_key=") {
                    continue;
                }
                text.push_str(&line);
                text.push('\n');
            }
            let ops = set_to_ops(set(&text), &current);
            let want = canonical(sequential(set(&text), &current));
            let got = canonical(applied(&ops, &current));
            assert_eq!(
                got, want,
                "round {round}: {text}\non {current:?}\nops {ops:?}"
            );
            let mut named = HashSet::new();
            for (op, _) in &ops {
                let key = match op {
                    DeviceChange::UpsertPeer(c) => (c.public_key, true),
                    DeviceChange::RemovePeer(k) => (*k, false),
                    other => panic!("unexpected {other:?}"),
                };
                assert!(named.insert(key), "round {round}: one op each: {ops:?}");
            }
        }
    }

    #[test]
    fn a_peer_named_many_times_is_one_upsert() {
        // A peer holding 5,000 prefixes, named again in 5,000 sections of one request: one
        // upsert carrying its 5,001 prefixes, not 5,000 copies of them.
        let big: Vec<String> = (0..5000)
            .map(|i| format!("10.{}.{}.0/24", i / 256, i % 256))
            .collect();
        let current = vec![peer(1, &big.iter().map(String::as_str).collect::<Vec<_>>())];
        let a = hex(&[1; 32]);
        let mut text = String::from("set=1\n");
        for _ in 0..5000 {
            text.push_str(&format!(
                "public_key={a}\npersistent_keepalive_interval=25\n"
            ));
        }
        text.push_str("allowed_ip=10.200.0.0/16\n");
        let ops = set_to_ops(set(&text), &current);
        let [(DeviceChange::UpsertPeer(cfg), false)] = ops.as_slice() else {
            panic!("{} ops", ops.len())
        };
        assert_eq!(cfg.allowed_ips.len(), 5001);
        assert_eq!(cfg.persistent_keepalive, 25);
    }

    #[test]
    fn renders_get() {
        let private = PrivateKey::from_bytes([7; 32]);
        let when = SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 42);
        let state = DeviceState {
            public_key: private.public_key(),
            listen_port: 51820,
            fwmark: 0,
            peers: vec![
                PeerState {
                    config: PeerConfig {
                        preshared_key: Some(Key::from_bytes([3; 32])),
                        ..peer(1, &["10.0.1.0/24", "fd00::/64"])
                    },
                    current_endpoint: Some("[fd00::9]:1234".parse().unwrap()),
                    last_handshake: Some(when),
                    rx_bytes: 10,
                    tx_bytes: 20,
                },
                PeerState {
                    config: peer(2, &[]),
                    current_endpoint: None,
                    last_handshake: None,
                    rx_bytes: 0,
                    tx_bytes: 0,
                },
            ],
        };
        let text = render_get(&private, &state);
        let want = format!(
            "private_key={}\nlisten_port=51820\n\
             public_key={}\npreshared_key={}\nendpoint=[fd00::9]:1234\n\
             allowed_ip=10.0.1.0/24\nallowed_ip=fd00::/64\npersistent_keepalive_interval=0\n\
             last_handshake_time_sec=1700000000\nlast_handshake_time_nsec=42\n\
             rx_bytes=10\ntx_bytes=20\nprotocol_version=1\n\
             public_key={}\npreshared_key={}\npersistent_keepalive_interval=0\n\
             last_handshake_time_sec=0\nlast_handshake_time_nsec=0\n\
             rx_bytes=0\ntx_bytes=0\nprotocol_version=1\nerrno=0\n\n",
            hex(&[7; 32]),
            hex(&[1; 32]),
            hex(&[3; 32]),
            hex(&[2; 32]),
            hex(&[0; 32]),
        );
        assert_eq!(text, want);
    }
}
