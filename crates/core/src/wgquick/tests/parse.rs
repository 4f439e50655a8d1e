//! Tables of what the parser accepts and refuses, and how it words errors.

use super::*;

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
    // A damaged line that holds a key: no '=', a ':' for '=', a stray character, a bare key
    // (as a private-key file), each alone or in a section.
    let truncated = &PRIV[..40];
    for line in [
        format!("PrivateKey: {PRIV}"),
        format!("PrivateKey {PRIV}"),
        format!("PrivateKey = {PRIV}!"),
        PRIV.to_string(),
        truncated.to_owned(),
        format!("{}=", &PRIV[..43]),
        format!("[{PRIV}]"),
    ] {
        for text in [
            line.clone(),
            format!("[Interface]\n{line}"),
            format!("[Peer]\n{line}"),
        ] {
            let Err(e) = parse(&text) else {
                continue;
            };
            let shown = e.to_string();
            for piece in PRIV.as_bytes().windows(12) {
                let piece = std::str::from_utf8(piece).unwrap();
                assert!(!shown.contains(piece), "{line:?} -> {shown}");
            }
        }
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
