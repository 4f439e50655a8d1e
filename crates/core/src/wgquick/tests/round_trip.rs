//! Round trips of fixed and generated configs, and parsing of mutated input without panics.

use super::*;

/// A tiny deterministic generator (PCG-style LCG step, high bits out).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
    fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        for b in &mut out {
            *b = self.next() as u8;
        }
        out
    }
    fn net(&mut self) -> IpNet {
        if self.chance(50) {
            let addr = Ipv4Addr::from(self.bytes::<4>());
            IpNet::V4(Ipv4Net::new(addr, self.below(33) as u8).unwrap())
        } else {
            let addr = Ipv6Addr::from(self.bytes::<16>());
            IpNet::V6(Ipv6Net::new(addr, self.below(129) as u8).unwrap())
        }
    }
}

fn generate(rng: &mut Lcg) -> WgQuickConfig {
    const DNS: &[&str] = &[
        "1.1.1.1",
        "2606:4700:4700::1111",
        "corp.example.com",
        "example.",
        "search_domain.lan",
        "fd00::53",
    ];
    const TABLES: &[&str] = &["off", "auto", "1234", "main", "wg.table-1"];
    const EXTRA_KEYS: &[&str] = &["PostUp", "PreDown", "SaveConfig", "x-custom.key", "postup"];
    const EXTRA_VALUES: &[&str] = &[
        "iptables -A FORWARD -i %i -j ACCEPT; echo a=b",
        "",
        "true",
        "echo \"quoted\" 'x' ; ls [x]",
        "tab\tinside",
        "ünïcödé = yes",
    ];
    const ENDPOINTS: &[&str] = &[
        "vpn.example.com:51820",
        "[2001:db8::1]:1",
        "192.0.2.1:65535",
        "[fe80::1%eth0]:51820",
        "host_1.example.:443",
    ];
    const COMMENTS: &[&str] = &[
        "laptop",
        "Name: phone",
        "name = x",
        "NAME=",
        "#hash",
        "a # b",
        "ünïcödé",
        "tab\tin",
        "[Peer]",
        "PublicKey = not a key",
    ];
    let mut cfg = WgQuickConfig::default();
    let i = &mut cfg.interface;
    if rng.chance(60) {
        i.private_key = Some(PrivateKey::from_bytes(rng.bytes::<32>()));
    }
    for _ in 0..rng.below(4) {
        let n = rng.net();
        i.addresses.push(n);
    }
    if rng.chance(50) {
        i.listen_port = Some(rng.next() as u16);
    }
    for _ in 0..rng.below(4) {
        i.dns.push(rng.pick(DNS).to_string());
    }
    if rng.chance(40) {
        i.mtu = Some(68 + rng.below(65536 - 68) as u16);
    }
    if rng.chance(40) {
        i.fwmark = Some(rng.next() as u32 ^ (rng.next() as u32) << 16);
    }
    if rng.chance(40) {
        i.table = Some(rng.pick(TABLES).to_string());
    }
    for _ in 0..rng.below(4) {
        let key = rng.pick(EXTRA_KEYS).to_string();
        let value = rng.pick(EXTRA_VALUES).to_string();
        i.extra.push((key, value));
    }
    for index in 0..rng.below(5) {
        let mut key = rng.bytes::<32>();
        key[0] = index as u8; // distinct keys
        let mut peer = Peer::new(PublicKey::from_bytes(key));
        if rng.chance(50) {
            peer.preshared_key = Some(Key::from_bytes(rng.bytes::<32>()));
        }
        for _ in 0..rng.below(4) {
            let n = rng.net();
            peer.allowed_ips.push(Cidr::from(n));
        }
        if rng.chance(50) {
            peer.endpoint = Some(rng.pick(ENDPOINTS).to_string());
        }
        if rng.chance(50) {
            peer.persistent_keepalive = Some(rng.next() as u16);
        }
        if rng.chance(50) {
            peer.comment = Some(rng.pick(COMMENTS).to_string());
        }
        cfg.peers.push(peer);
    }
    cfg
}

#[test]
fn round_trip_fixed_configs() {
    let mut minimal_peer = Peer::new(pk(PUB_A));
    minimal_peer.persistent_keepalive = Some(0);
    for cfg in [
        WgQuickConfig::default(),
        road_warrior(),
        WgQuickConfig {
            interface: Interface {
                fwmark: Some(0),
                ..Interface::default()
            },
            peers: vec![minimal_peer],
        },
        parse(&road_warrior_text()).unwrap(),
    ] {
        assert_round_trip(&cfg);
    }
}

#[test]
fn round_trip_generated_configs() {
    let mut rng = Lcg(0x5eed);
    for _ in 0..2000 {
        let cfg = generate(&mut rng);
        assert_round_trip(&cfg);
    }
}

/// Parses `text` and, if that succeeds, checks the round trip; panics only on a broken
/// invariant.
fn check_no_panic(text: &str) {
    if let Ok(cfg) = parse(text) {
        let rendered = render(&cfg);
        assert_eq!(
            parse(&rendered).as_ref(),
            Ok(&cfg),
            "input {text:?} rendered as {rendered:?}"
        );
    }
}

#[test]
fn no_panic_on_mutated_inputs() {
    let mut rng = Lcg(42);
    let mut seeds = vec![road_warrior_text(), render(&road_warrior())];
    for _ in 0..3 {
        seeds.push(render(&generate(&mut rng)));
    }
    let mut tried = 0usize;
    for seed in &seeds {
        let bytes = seed.as_bytes();
        // Every truncation.
        for end in 0..=bytes.len() {
            check_no_panic(&String::from_utf8_lossy(&bytes[..end]));
            tried += 1;
        }
        // Byte flips and replacements at every position.
        for pos in 0..bytes.len() {
            for replacement in [
                bytes[pos] ^ 0x01,
                bytes[pos] ^ 0x20,
                b'#',
                b'=',
                b',',
                b'\n',
                b'[',
                b':',
                0,
                0xff,
            ] {
                let mut mutated = bytes.to_vec();
                mutated[pos] = replacement;
                check_no_panic(&String::from_utf8_lossy(&mutated));
                tried += 1;
            }
        }
        // Line deletions, duplications and swaps.
        let lines: Vec<&str> = seed.split('\n').collect();
        for i in 0..lines.len() {
            let mut deleted = lines.clone();
            deleted.remove(i);
            check_no_panic(&deleted.join("\n"));
            let mut duplicated = lines.clone();
            duplicated.insert(i, lines[i]);
            check_no_panic(&duplicated.join("\n"));
            let mut swapped = lines.clone();
            swapped.swap(i, (i + 1) % lines.len());
            check_no_panic(&swapped.join("\n"));
            tried += 3;
        }
    }
    // Random bytes.
    for _ in 0..3000 {
        let len = rng.below(300) as usize;
        let bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        check_no_panic(&String::from_utf8_lossy(&bytes));
        tried += 1;
    }
    // Random token soup, which reaches deeper than random bytes.
    const TOKENS: &[&str] = &[
        "[Interface]",
        "[interface]",
        "[Peer]",
        "[",
        "]",
        "\n",
        "\r\n",
        "\r",
        " ",
        "\t",
        "=",
        "#",
        ",",
        ":",
        "%",
        "PrivateKey",
        "PublicKey",
        "PresharedKey",
        "Address",
        "AllowedIPs",
        "DNS",
        "Endpoint",
        "ListenPort",
        "MTU",
        "FwMark",
        "Table",
        "PersistentKeepalive",
        "PostUp",
        "Name",
        "off",
        "0x",
        "0",
        "65535",
        "65536",
        "10.0.0.1",
        "/24",
        "/129",
        "fd00::",
        "::",
        PRIV,
        PUB_A,
        PUB_B,
        "ü",
        "\u{feff}",
        "\u{2028}",
        "example.com",
    ];
    for _ in 0..20000 {
        let mut text = String::new();
        for _ in 0..rng.below(40) {
            let token: &str = rng.pick::<&str>(TOKENS);
            text.push_str(token);
        }
        check_no_panic(&text);
        tried += 1;
    }
    // Size limits.
    check_no_panic(&"[Interface]\n".repeat(MAX_INPUT_LEN / 12 + 1));
    check_no_panic(&"#".repeat(MAX_INPUT_LEN));
    check_no_panic(&"\n".repeat(MAX_INPUT_LEN));
    check_no_panic(&"é".repeat(MAX_LINE_LEN));
    assert!(tried > 50_000, "only {tried} inputs");
}

#[test]
fn many_peers_parse_quickly() {
    // Near the size limit with thousands of peers; duplicate detection must not be quadratic.
    let mut cfg = WgQuickConfig::default();
    for i in 0..12_000u32 {
        let mut key = [0u8; 32];
        key[..4].copy_from_slice(&i.to_be_bytes());
        cfg.peers.push(Peer::new(PublicKey::from_bytes(key)));
    }
    let text = render(&cfg);
    assert!(text.len() < MAX_INPUT_LEN);
    assert_eq!(parse(&text).unwrap(), cfg);
}
