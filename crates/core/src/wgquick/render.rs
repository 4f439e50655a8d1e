//! Writing wg-quick text in canonical form.

use super::{Peer, WgQuickConfig, is_forbidden_control, name_tag};

/// Renders a config in canonical wg-quick form: `[Interface]` first, then each `[Peer]` after a
/// blank line (preceded by `# comment` when it has one), `Key = value` lines, lists joined with
/// `", "`, empty lists and unset options left out, and a trailing newline.
///
/// The output contains the private key. Control characters in free-text fields (which
/// [`parse`](super::parse) never produces) are replaced by spaces so that no field can inject
/// extra lines.
pub fn render(cfg: &WgQuickConfig) -> String {
    let mut out = String::new();
    let i = &cfg.interface;
    out.push_str("[Interface]\n");
    if let Some(key) = &i.private_key {
        key_value(&mut out, "PrivateKey", &key.expose_base64());
    }
    list(
        &mut out,
        "Address",
        i.addresses.iter().map(ToString::to_string),
    );
    if let Some(port) = i.listen_port {
        key_value(&mut out, "ListenPort", &port.to_string());
    }
    if let Some(mark) = i.fwmark {
        key_value(&mut out, "FwMark", &format!("{mark:#x}"));
    }
    list(&mut out, "DNS", i.dns.iter().map(|d| one_line(d)));
    if let Some(mtu) = i.mtu {
        key_value(&mut out, "MTU", &mtu.to_string());
    }
    if let Some(table) = &i.table {
        key_value(&mut out, "Table", &one_line(table));
    }
    for (key, value) in &i.extra {
        key_value(&mut out, &one_line(key), &one_line(value));
    }
    for peer in &cfg.peers {
        out.push('\n');
        out.push_str(&render_peer(peer));
    }
    out
}

/// Renders one `[Peer]` section (with its `# comment` line), as [`render`] writes it: what a
/// node or a remote site hands to the other side of a tunnel. Holds no private key.
pub fn render_peer(peer: &Peer) -> String {
    let mut out = String::new();
    if let Some(comment) = &peer.comment {
        let comment = one_line(comment);
        let comment = comment.trim();
        if !comment.is_empty() {
            // A comment that itself reads as a name tag is wrapped in one, so that it
            // parses back unchanged.
            if name_tag(comment).is_some() {
                out.push_str("# Name = ");
            } else {
                out.push_str("# ");
            }
            out.push_str(comment);
            out.push('\n');
        }
    }
    out.push_str("[Peer]\n");
    key_value(&mut out, "PublicKey", &peer.public_key.to_base64());
    if let Some(psk) = &peer.preshared_key {
        key_value(&mut out, "PresharedKey", &psk.to_base64());
    }
    list(
        &mut out,
        "AllowedIPs",
        peer.allowed_ips.iter().map(ToString::to_string),
    );
    if let Some(endpoint) = &peer.endpoint {
        key_value(&mut out, "Endpoint", &one_line(endpoint));
    }
    if let Some(keepalive) = peer.persistent_keepalive {
        key_value(&mut out, "PersistentKeepalive", &keepalive.to_string());
    }
    out
}

fn key_value(out: &mut String, key: &str, value: &str) {
    out.push_str(key);
    if value.is_empty() {
        out.push_str(" =\n");
    } else {
        out.push_str(" = ");
        out.push_str(value);
        out.push('\n');
    }
}

fn list(out: &mut String, key: &str, items: impl Iterator<Item = String>) {
    let items: Vec<String> = items.collect();
    if !items.is_empty() {
        key_value(out, key, &items.join(", "));
    }
}

fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if is_forbidden_control(c) { ' ' } else { c })
        .collect()
}
