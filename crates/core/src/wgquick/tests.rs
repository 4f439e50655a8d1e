use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::*;

const PRIV: &str = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";
const PUB_A: &str = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=";
const PUB_B: &str = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=";
const PSK: &str = "AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI=";

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn cidr(s: &str) -> Cidr {
    Cidr::parse_masked(s).unwrap()
}

fn pk(s: &str) -> PublicKey {
    s.parse().unwrap()
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// Asserts that `cfg` survives render -> parse and that rendering is a fixed point.
fn assert_round_trip(cfg: &WgQuickConfig) {
    let text = render(cfg);
    let back =
        parse(&text).unwrap_or_else(|e| panic!("rendered config does not parse: {e}\n{text}"));
    assert_eq!(&back, cfg, "round trip changed the config:\n{text}");
    assert_eq!(render(&back), text, "render is not a fixed point");
}

fn road_warrior_text() -> String {
    [
        "# wg0: road warrior, written by hand",
        "[interface]   # section names are case-insensitive",
        &format!("privatekey = {PRIV}"),
        "Address = 10.8.0.2/24",
        "  ADDRESS=fd00:8::2/64 ,10.9.0.2   ",
        "DNS = 1.1.1.1, 2606:4700:4700::1111",
        "dns = corp.example.com",
        "ListenPort = 51820",
        "MTU = 1420",
        "FwMark = 0x1234",
        "Table = off",
        "PostUp = iptables -A FORWARD -i %i -j ACCEPT; iptables -t nat -A POSTROUTING -o eth0 -j MASQUERADE",
        "PostDown = iptables -D FORWARD -i %i -j ACCEPT   # comment after the value",
        "SaveConfig = false",
        "",
        "# office gateway",
        "[PEER]",
        &format!("PublicKey = {PUB_A}"),
        &format!("PresharedKey = {PSK}"),
        "AllowedIPs = 10.8.0.0/24, 192.168.10.1/24",
        "\tAllowedIPs = fd00:8::/64",
        "Endpoint = vpn.example.com:51820",
        "PersistentKeepalive = 25",
        "",
        "[Peer]",
        "# Name = phone",
        &format!("publickey = {PUB_B}"),
        "allowedips = 10.8.0.3",
        "endpoint = [2001:db8::1]:51820",
        "persistentkeepalive = off",
        "",
    ]
    .join("\r\n")
}

fn road_warrior() -> WgQuickConfig {
    WgQuickConfig {
        interface: Interface {
            private_key: Some(PRIV.parse().unwrap()),
            addresses: vec![
                net("10.8.0.2/24"),
                net("fd00:8::2/64"),
                net("10.9.0.2/32"),
            ],
            listen_port: Some(51820),
            dns: strings(&["1.1.1.1", "2606:4700:4700::1111", "corp.example.com"]),
            mtu: Some(1420),
            fwmark: Some(0x1234),
            table: Some("off".into()),
            extra: vec![
                (
                    "PostUp".into(),
                    "iptables -A FORWARD -i %i -j ACCEPT; iptables -t nat -A POSTROUTING -o eth0 -j MASQUERADE".into(),
                ),
                (
                    "PostDown".into(),
                    "iptables -D FORWARD -i %i -j ACCEPT".into(),
                ),
                ("SaveConfig".into(), "false".into()),
            ],
        },
        peers: vec![
            Peer {
                public_key: pk(PUB_A),
                preshared_key: Some(PSK.parse().unwrap()),
                allowed_ips: vec![
                    cidr("10.8.0.0/24"),
                    cidr("192.168.10.0/24"),
                    cidr("fd00:8::/64"),
                ],
                endpoint: Some("vpn.example.com:51820".into()),
                persistent_keepalive: Some(25),
                comment: Some("office gateway".into()),
            },
            Peer {
                public_key: pk(PUB_B),
                preshared_key: None,
                allowed_ips: vec![cidr("10.8.0.3/32")],
                endpoint: Some("[2001:db8::1]:51820".into()),
                persistent_keepalive: None,
                comment: Some("phone".into()),
            },
        ],
    }
}

#[test]
fn parses_road_warrior() {
    let text = road_warrior_text();
    assert!(text.contains("\r\n"));
    let cfg = parse(&text).unwrap();
    assert_eq!(cfg, road_warrior());
    // With a byte order mark (Windows editors), too.
    assert_eq!(parse(&format!("\u{feff}{text}")).unwrap(), road_warrior());
    assert_round_trip(&cfg);
}

#[test]
fn renders_canonical_text() {
    let want = format!(
        "[Interface]
PrivateKey = {PRIV}
Address = 10.8.0.2/24, fd00:8::2/64, 10.9.0.2/32
ListenPort = 51820
FwMark = 0x1234
DNS = 1.1.1.1, 2606:4700:4700::1111, corp.example.com
MTU = 1420
Table = off
PostUp = iptables -A FORWARD -i %i -j ACCEPT; iptables -t nat -A POSTROUTING -o eth0 -j MASQUERADE
PostDown = iptables -D FORWARD -i %i -j ACCEPT
SaveConfig = false

# office gateway
[Peer]
PublicKey = {PUB_A}
PresharedKey = {PSK}
AllowedIPs = 10.8.0.0/24, 192.168.10.0/24, fd00:8::/64
Endpoint = vpn.example.com:51820
PersistentKeepalive = 25

# phone
[Peer]
PublicKey = {PUB_B}
AllowedIPs = 10.8.0.3/32
Endpoint = [2001:db8::1]:51820
"
    );
    assert_eq!(render(&road_warrior()), want);
    assert_eq!(render(&WgQuickConfig::default()), "[Interface]\n");
}

#[test]
fn accepted_forms_table() {
    // (input, what to check about the result)
    type Check = fn(&WgQuickConfig) -> bool;
    let cases: &[(&str, Check)] = &[
        ("[Interface]", |c| *c == WgQuickConfig::default()),
        ("\n\n  [ Interface ]  \n\n", |c| {
            *c == WgQuickConfig::default()
        }),
        ("[Interface]\nFwMark = off", |c| {
            c.interface.fwmark.is_none()
        }),
        ("[Interface]\nFwMark = 51820", |c| {
            c.interface.fwmark == Some(51820)
        }),
        ("[Interface]\nFwMark = 0XfF", |c| {
            c.interface.fwmark == Some(255)
        }),
        ("[Interface]\nFwMark = 0xffffffff", |c| {
            c.interface.fwmark == Some(u32::MAX)
        }),
        ("[Interface]\nListenPort = 0", |c| {
            c.interface.listen_port == Some(0)
        }),
        ("[Interface]\nListenPort = 65535", |c| {
            c.interface.listen_port == Some(65535)
        }),
        ("[Interface]\nAddress =", |c| {
            c.interface.addresses.is_empty()
        }),
        ("[Interface]\nAddress = fd00::1", |c| {
            c.interface.addresses == [net("fd00::1/128")]
        }),
        ("[Interface]\nPostUp =\nPostUp = echo a=b", |c| {
            c.interface.extra
                == [
                    ("PostUp".to_string(), String::new()),
                    ("PostUp".to_string(), "echo a=b".to_string()),
                ]
        }),
        (
            "[Interface]\nDNS = example.org., 10.0.0.53, my_search.lan",
            |c| c.interface.dns == strings(&["example.org.", "10.0.0.53", "my_search.lan"]),
        ),
        ("[Interface]\nTable = 1234", |c| {
            c.interface.table.as_deref() == Some("1234")
        }),
        // `;` is not a comment character in wg-quick.
        ("[Interface]\nPostUp = a; b", |c| {
            c.interface.extra == [("PostUp".to_string(), "a; b".to_string())]
        }),
        // Peers may come before the interface.
        (
            "[Peer]\nPublicKey = HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=\n[Interface]",
            |c| c.peers.len() == 1,
        ),
        (
            "[Interface]\n[Peer]\nPublicKey=HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=#x\nPersistentKeepalive = 0\nEndpoint = [fe80::1%eth0]:1",
            |c| {
                c.peers[0].persistent_keepalive == Some(0)
                    && c.peers[0].endpoint.as_deref() == Some("[fe80::1%eth0]:1")
                    && c.peers[0].comment.is_none()
            },
        ),
        (
            "[Interface]\n[Peer]\nPublicKey = HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=\nEndpoint = 192.0.2.1:65535\nAllowedIPs = 0.0.0.0/0, ::/0",
            |c| c.peers[0].allowed_ips == [cidr("0.0.0.0/0"), cidr("::/0")],
        ),
    ];
    for (input, check) in cases {
        let cfg = parse(input).unwrap_or_else(|e| panic!("{input:?}: {e}"));
        assert!(check(&cfg), "{input:?} parsed as {cfg:?}");
        assert_round_trip(&cfg);
    }
}

#[test]
fn peer_comment_table() {
    let peer = |lines: &[&str]| {
        let mut text = String::from("[Interface]\n");
        for line in lines {
            text.push_str(line);
            text.push('\n');
        }
        let cfg = parse(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
        assert_round_trip(&cfg);
        cfg.peers.into_iter().map(|p| p.comment).collect::<Vec<_>>()
    };
    let a = format!("PublicKey = {PUB_A}");
    let b = format!("PublicKey = {PUB_B}");
    let cases: Vec<(Vec<&str>, Vec<Option<&str>>)> = vec![
        (vec!["# laptop", "[Peer]", &a], vec![Some("laptop")]),
        (
            vec!["### Client laptop", "[Peer]", &a],
            vec![Some("Client laptop")],
        ),
        // wireguard-ui writes a block of tags above the peer.
        (
            vec![
                "# ID: 42",
                "# Name: laptop",
                "# Email: x@example.com",
                "[Peer]",
                &a,
            ],
            vec![Some("laptop")],
        ),
        // Only the block's last line counts when there is no name tag.
        (
            vec!["# first", "# second", "[Peer]", &a],
            vec![Some("second")],
        ),
        // A blank line detaches the comment.
        (vec!["# stray", "", "[Peer]", &a], vec![None]),
        (vec!["[Peer]", "# Name = phone", &a], vec![Some("phone")]),
        (vec!["[Peer]", &a, "#name:phone"], vec![Some("phone")]),
        // In-section tag beats the comment above.
        (
            vec!["# above", "[Peer]", &a, "# Name = inside"],
            vec![Some("inside")],
        ),
        // A plain comment inside a section is not a name.
        (vec!["[Peer]", "# just a note", &a], vec![None]),
        // A tag directly above the next [Peer] belongs to that next peer.
        (
            vec!["[Peer]", &a, "# Name = second", "[Peer]", &b],
            vec![None, Some("second")],
        ),
        (vec!["#", "[Peer]", &a], vec![None]),
        (vec!["# # double", "[Peer]", &a], vec![Some("# double")]),
        (vec!["# Name =", "[Peer]", &a], vec![Some("Name =")]),
        (
            vec!["# Name = Name: x", "[Peer]", &a],
            vec![Some("Name: x")],
        ),
    ];
    for (lines, want) in cases {
        let want: Vec<Option<String>> = want.into_iter().map(|w| w.map(String::from)).collect();
        assert_eq!(peer(&lines), want, "{lines:?}");
    }
}

#[test]
fn error_table() {
    let iface = "[Interface]\n";
    let peer_a = format!("[Peer]\nPublicKey = {PUB_A}\n");
    let long = format!("[Interface]\nPostUp = {}\n", "x".repeat(MAX_LINE_LEN));
    let cases: Vec<(String, usize, &str)> = vec![
        (
            format!("PrivateKey = {PRIV}\n[Interface]"),
            1,
            "PrivateKey outside of a section",
        ),
        ("# hello\n\n[Interfaces]".into(), 3, "unknown section"),
        ("[Interface".into(), 1, "malformed section header"),
        ("[Interface] x".into(), 1, "malformed section header"),
        (format!("{iface}ListenPort 51820"), 2, "missing '='"),
        (format!("{iface} = 1"), 2, "missing key name"),
        (format!("{iface}Listen Port = 1"), 2, "invalid key name"),
        (
            format!("{iface}PrivateKey = {PRIV}\nprivatekey = {PRIV}"),
            3,
            "duplicate PrivateKey (already set at line 2)",
        ),
        (
            format!("{iface}PrivateKey = {}", &PRIV[..43]),
            2,
            "invalid PrivateKey",
        ),
        (
            format!("{iface}PrivateKey = yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBm!="),
            2,
            "invalid PrivateKey",
        ),
        (format!("{iface}PrivateKey ="), 2, "invalid PrivateKey"),
        (
            format!("{iface}Address = 10.0.0.300/24"),
            2,
            "invalid Address",
        ),
        (
            format!("{iface}Address = 10.0.0.1/24,"),
            2,
            "empty entry in Address list",
        ),
        (
            format!("{iface}ListenPort = 65536"),
            2,
            "invalid ListenPort",
        ),
        (format!("{iface}ListenPort = +80"), 2, "invalid ListenPort"),
        (
            format!("{iface}ListenPort = 1\nListenPort = 2"),
            3,
            "duplicate ListenPort",
        ),
        (format!("{iface}MTU = 0"), 2, "invalid MTU"),
        (format!("{iface}FwMark = 0x1ffffffff"), 2, "invalid FwMark"),
        (format!("{iface}FwMark = 0x"), 2, "invalid FwMark"),
        (format!("{iface}FwMark = -1"), 2, "invalid FwMark"),
        (format!("{iface}Table ="), 2, "invalid Table"),
        (format!("{iface}DNS = 1.1.1"), 2, "invalid DNS server"),
        (format!("{iface}DNS = fd00::zz"), 2, "invalid DNS server"),
        (format!("{iface}DNS = exa mple.com"), 2, "invalid DNS entry"),
        (
            format!("{iface}PublicKey = {PUB_A}"),
            2,
            "PublicKey is a [Peer] key",
        ),
        (
            format!("{iface}\n[Interface]"),
            3,
            "second [Interface] section (the first is at line 1)",
        ),
        ("".into(), 0, "no [Interface] section"),
        (peer_a.clone(), 0, "no [Interface] section"),
        (
            format!("{iface}[Peer]\nAllowedIPs = 10.0.0.0/8\n[Peer]\nPublicKey = {PUB_A}"),
            2,
            "[Peer] has no PublicKey",
        ),
        (format!("{iface}[Peer]\n"), 2, "[Peer] has no PublicKey"),
        (
            format!("{iface}{peer_a}AllowedIP = 10.0.0.0/8"),
            4,
            "unknown key AllowedIP in [Peer]",
        ),
        (
            format!("{iface}{peer_a}Address = 10.0.0.1/24"),
            4,
            "Address is an [Interface] key",
        ),
        (
            format!("{iface}{peer_a}PostUp = true"),
            4,
            "PostUp is an [Interface] key",
        ),
        (
            format!("{iface}{peer_a}PublicKey = {PUB_B}"),
            4,
            "duplicate PublicKey",
        ),
        (
            format!("{iface}{peer_a}{peer_a}"),
            5,
            "already defined (PublicKey at line 3)",
        ),
        (
            format!("{iface}[Peer]\nPublicKey = {PUB_A}x"),
            3,
            "invalid PublicKey",
        ),
        (
            format!("{iface}{peer_a}PresharedKey = {PUB_A}="),
            4,
            "invalid PresharedKey",
        ),
        (
            format!("{iface}{peer_a}AllowedIPs = 10.0.0.0/33"),
            4,
            "invalid AllowedIPs entry \"10.0.0.0/33\"",
        ),
        (
            format!("{iface}{peer_a}AllowedIPs = example.com/24"),
            4,
            "invalid AllowedIPs entry",
        ),
        (
            format!("{iface}{peer_a}AllowedIPs = 10.0.0.0/8,,10.1.0.0/16"),
            4,
            "empty entry in AllowedIPs list",
        ),
        (
            format!("{iface}{peer_a}Endpoint = vpn.example.com"),
            4,
            "has no port",
        ),
        (
            format!("{iface}{peer_a}Endpoint = [2001:db8::1]"),
            4,
            "has no port",
        ),
        (
            format!("{iface}{peer_a}Endpoint = 2001:db8::1:51820"),
            4,
            "[address]:port",
        ),
        (
            format!("{iface}{peer_a}Endpoint = [2001:db8::1:51820"),
            4,
            "unclosed '['",
        ),
        (
            format!("{iface}{peer_a}Endpoint = [10.0.0.1]:1"),
            4,
            "not an IPv6 address",
        ),
        (
            format!("{iface}{peer_a}Endpoint = 1.2.3.4:0"),
            4,
            "port \"0\" is not 1-65535",
        ),
        (
            format!("{iface}{peer_a}Endpoint = 1.2.3.4:99999"),
            4,
            "is not 1-65535",
        ),
        (
            format!("{iface}{peer_a}Endpoint = 1.2.3:51820"),
            4,
            "is not an IP address or host name",
        ),
        (
            format!("{iface}{peer_a}Endpoint = bad_host!:51820"),
            4,
            "is not an IP address or host name",
        ),
        (
            format!("{iface}{peer_a}Endpoint = :51820"),
            4,
            "is not an IP address or host name",
        ),
        (format!("{iface}{peer_a}Endpoint ="), 4, "empty Endpoint"),
        (
            format!("{iface}{peer_a}Endpoint = a:1\nEndpoint = b:2"),
            5,
            "duplicate Endpoint (already set at line 4)",
        ),
        (
            format!("{iface}{peer_a}PersistentKeepalive = 65536"),
            4,
            "invalid PersistentKeepalive",
        ),
        (
            format!("{iface}{peer_a}PersistentKeepalive = never"),
            4,
            "invalid PersistentKeepalive",
        ),
        (
            format!("{iface}PostUp = a\rb"),
            2,
            "control character U+000D",
        ),
        (
            format!("{iface}# nul \0 here"),
            2,
            "control character U+0000",
        ),
        (long, 2, "at most 4096"),
        ("x".repeat(MAX_INPUT_LEN + 1), 0, "at most 1048576 bytes"),
    ];
    assert!(cases.len() >= 15);
    for (input, line, fragment) in &cases {
        let short: String = input.chars().take(120).collect();
        match parse(input) {
            Ok(cfg) => panic!("{short:?} should fail, parsed as {cfg:?}"),
            Err(e) => {
                assert_eq!(e.line, *line, "{short:?}: {e}");
                assert!(
                    e.message.contains(fragment),
                    "{short:?}: {e:?} lacks {fragment:?}"
                );
            }
        }
    }
}

#[test]
fn errors_never_echo_secrets() {
    let bad_private = format!("{}A", &PRIV[..43]);
    for text in [
        format!("[Interface]\nPrivateKey = {bad_private}"),
        format!("[Interface]\n[Peer]\nPublicKey = {PUB_A}\nPresharedKey = {bad_private}"),
    ] {
        let e = parse(&text).unwrap_err();
        assert!(!e.to_string().contains(&bad_private[..20]), "{e}");
    }
    let cfg = parse(&road_warrior_text()).unwrap();
    assert!(!format!("{cfg:?}").contains(PRIV));
}

#[test]
fn display_of_errors() {
    let e = parse("[Interface]\nMTU = 1").unwrap_err();
    assert_eq!(
        e.to_string(),
        "line 2: invalid MTU \"1\": expected a number 68-65535"
    );
    assert_eq!(parse("").unwrap_err().to_string(), "no [Interface] section");
}

#[test]
fn render_cannot_inject_lines() {
    let mut peer = Peer::new(pk(PUB_A));
    peer.comment = Some("evil\n[Peer]\nPublicKey = x".into());
    peer.endpoint = Some("a:1\nPostUp = rm -rf /".into());
    let cfg = WgQuickConfig {
        interface: Interface {
            extra: vec![("PostUp".into(), "ok\r\nPostDown = boom".into())],
            ..Interface::default()
        },
        peers: vec![peer],
    };
    let text = render(&cfg);
    assert_eq!(text.matches("[Peer]").count(), 1 + 1, "{text}"); // the header and the comment
    assert_eq!(
        text.lines().filter(|l| l.starts_with("[Peer]")).count(),
        1,
        "{text}"
    );
    assert!(
        !text
            .lines()
            .any(|l| l.starts_with("PostDown") || l.starts_with("PostUp = rm"))
    );
}

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
