//! Fixtures and the basic parse/render cases; `parse` holds the tables of accepted and
//! refused input, `round_trip` the generated and mutated configs.

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

mod parse;
mod round_trip;

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
