//! Issue #12, item 12: no `Debug` of a type holding a secret (private key, preshared key,
//! mesh secret) shows it, so that a `?value` in a log line cannot leak it. Public keys still
//! show.

use crate::desired::{DesiredPeer, Member, PresharedKey, SecretInput};
use crate::export::ClientInput;
use crate::wgquick::{Interface, Peer, WgQuickConfig};
use crate::{Key, PrivateKey, PublicKey};

/// A key with bytes 101..=132, easy to spot in any rendering.
const SECRET: [u8; 32] = {
    let mut b = [0u8; 32];
    let mut i = 0;
    while i < 32 {
        b[i] = 101 + i as u8;
        i += 1;
    }
    b
};

/// Renderings of the secret that must not appear: base64, the byte array as `Debug` prints
/// it (whole, and any run of four bytes), hex.
fn leaks(debug: &str) -> Option<String> {
    let key = Key::from_bytes(SECRET);
    let mut needles = vec![key.to_base64(), format!("{SECRET:?}")];
    needles.extend(
        SECRET
            .windows(4)
            .map(|w| w.iter().map(u8::to_string).collect::<Vec<_>>().join(", ")),
    );
    needles.push(SECRET.iter().map(|b| format!("{b:02x}")).collect());
    needles.into_iter().find(|n| debug.contains(n.as_str()))
}

#[test]
fn debug_never_shows_a_secret() {
    let key = Key::from_bytes(SECRET);
    let private = PrivateKey::from_bytes(SECRET);
    let public = PrivateKey::generate().public_key();
    let member = Member {
        public_key: public,
        interface_addresses: Vec::new(),
        mesh_secret: Some(key),
        rotate_key_request: None,
        pod_cidrs: Vec::new(),
        gateway: false,
        behind_nat: false,
    };
    let desired_peer = DesiredPeer {
        name: "p".into(),
        public_key: public,
        endpoint: None,
        allowed_ips: Vec::new(),
        persistent_keepalive: 0,
        preshared_key: PresharedKey::Static(key),
        node: None,
        encoding: Default::default(),
        allowed_ips_diff: Default::default(),
    };
    let mut wg_peer = Peer::new(public);
    wg_peer.preshared_key = Some(key);
    let wg_config = WgQuickConfig {
        interface: Interface {
            private_key: Some(private.clone()),
            ..Interface::default()
        },
        peers: vec![wg_peer.clone()],
    };
    let cases: Vec<(&str, String)> = vec![
        ("Key", format!("{key:?}")),
        ("Key pretty", format!("{key:#?}")),
        ("Option<Key>", format!("{:?}", Some(key))),
        ("PrivateKey", format!("{private:?}")),
        (
            "SecretInput",
            format!("{:?}", SecretInput::Present(SECRET.to_vec())),
        ),
        (
            "SecretInput pretty",
            format!("{:#?}", SecretInput::Present(SECRET.to_vec())),
        ),
        ("Member", format!("{member:?}")),
        ("DesiredPeer", format!("{desired_peer:?}")),
        ("PresharedKey", format!("{:?}", PresharedKey::Static(key))),
        ("wgquick::Peer", format!("{wg_peer:?}")),
        ("WgQuickConfig", format!("{wg_config:?}")),
        (
            "ClientInput",
            format!(
                "{:?}",
                ClientInput {
                    private_key: Some(private.clone()),
                    preshared_key: Some(key),
                    ..ClientInput::default()
                }
            ),
        ),
    ];
    for (what, debug) in &cases {
        assert_eq!(leaks(debug), None, "{what} shows the secret: {debug}");
    }
    // What stays visible: public keys, and a missing Secret's reason.
    assert!(format!("{member:?}").contains(&public.to_base64()));
    assert_eq!(
        format!("{:?}", PublicKey::from_bytes(SECRET)),
        format!("PublicKey({})", key.to_base64())
    );
    let missing = SecretInput::Missing("Secret wgmesh-system/psk has no key psk".into());
    assert!(format!("{missing:?}").contains("has no key psk"));
}
