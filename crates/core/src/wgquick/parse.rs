//! Reading wg-quick text: a line-by-line state machine over sections, keys and comments.

use std::collections::HashMap;

use super::validate::{check_dns, list_items, parse_address, parse_fwmark, redacted};
use super::{
    Interface, MAX_INPUT_LEN, MAX_LINE_LEN, ParseError, Peer, WgQuickConfig, error,
    is_forbidden_control, name_tag,
};
use crate::validate::{check_endpoint, is_name_byte, parse_digits, show};
use crate::{Cidr, Key, PrivateKey, PublicKey};

/// Parses a wg-quick config. See the module documentation for what is accepted.
pub fn parse(text: &str) -> Result<WgQuickConfig, ParseError> {
    if text.len() > MAX_INPUT_LEN {
        return Err(error(
            0,
            format!(
                "input is {} bytes; a wg-quick config may be at most {MAX_INPUT_LEN} bytes",
                text.len()
            ),
        ));
    }
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut parser = Parser::default();
    for (index, raw) in text.split('\n').enumerate() {
        parser.line(index + 1, raw)?;
    }
    parser.finish()
}

#[derive(Default, Clone, Copy, PartialEq, Eq)]
enum Section {
    #[default]
    None,
    Interface,
    Peer,
}

/// Single-valued keys already seen in a section, with their lines.
#[derive(Default)]
struct Seen(Vec<(&'static str, usize)>);

impl Seen {
    fn once(&mut self, key: &'static str, line: usize) -> Result<(), ParseError> {
        if let Some((_, first)) = self.0.iter().find(|(k, _)| *k == key) {
            return Err(error(
                line,
                format!("duplicate {key} (already set at line {first})"),
            ));
        }
        self.0.push((key, line));
        Ok(())
    }
}

struct PeerBuilder {
    line: usize,
    public_key: Option<PublicKey>,
    preshared_key: Option<Key>,
    allowed_ips: Vec<Cidr>,
    endpoint: Option<String>,
    persistent_keepalive: Option<u16>,
    above_comment: Option<String>,
    name_tag: Option<String>,
    seen: Seen,
}

/// The comment lines since the last non-comment line.
#[derive(Default)]
struct CommentBlock {
    first_name_tag: Option<String>,
    last_nonempty: Option<String>,
}

#[derive(Default)]
struct Parser {
    section: Section,
    /// The interface and the line of its header.
    interface: Option<(usize, Interface, Seen)>,
    peer: Option<PeerBuilder>,
    peers: Vec<Peer>,
    /// Public keys of all peers so far, with the line they were set on.
    peer_keys: HashMap<PublicKey, usize>,
    comments: CommentBlock,
}

const INTERFACE_KEYS: &[&str] = &[
    "privatekey",
    "address",
    "listenport",
    "dns",
    "mtu",
    "fwmark",
    "table",
    "preup",
    "postup",
    "predown",
    "postdown",
    "saveconfig",
];
const PEER_KEYS: &[&str] = &[
    "publickey",
    "presharedkey",
    "allowedips",
    "endpoint",
    "persistentkeepalive",
];

impl Parser {
    fn line(&mut self, n: usize, raw: &str) -> Result<(), ParseError> {
        if raw.len() > MAX_LINE_LEN {
            return Err(error(
                n,
                format!(
                    "line is {} bytes long; at most {MAX_LINE_LEN} are allowed",
                    raw.len()
                ),
            ));
        }
        let raw = raw.strip_suffix('\r').unwrap_or(raw);
        if let Some(c) = raw.chars().find(|c| is_forbidden_control(*c)) {
            return Err(error(
                n,
                format!("control character U+{:04X} in line", u32::from(c)),
            ));
        }
        let (content, comment) = match raw.split_once('#') {
            Some((content, comment)) => (content.trim(), Some(comment)),
            None => (raw.trim(), None),
        };
        if content.is_empty() {
            match comment {
                Some(comment) => self.comment_line(comment),
                None => self.flush_comments(),
            }
            return Ok(());
        }
        if content.starts_with('[') {
            self.section_line(n, content)
        } else {
            self.flush_comments();
            self.key_line(n, content)
        }
    }

    fn comment_line(&mut self, comment: &str) {
        let text = comment.trim_start_matches('#').trim();
        if text.is_empty() {
            return;
        }
        if self.comments.first_name_tag.is_none() {
            self.comments.first_name_tag = name_tag(text).map(str::to_owned);
        }
        self.comments.last_nonempty = Some(text.to_owned());
    }

    /// Ends a comment block that is not directly above a `[Peer]`: a name tag in it names the
    /// peer whose section it is in.
    fn flush_comments(&mut self) {
        let block = std::mem::take(&mut self.comments);
        if let (Section::Peer, Some(peer)) = (self.section, self.peer.as_mut())
            && peer.name_tag.is_none()
        {
            peer.name_tag = block.first_name_tag;
        }
    }

    fn section_line(&mut self, n: usize, content: &str) -> Result<(), ParseError> {
        let Some(inner) = content
            .strip_prefix('[')
            .and_then(|rest| rest.strip_suffix(']'))
        else {
            return Err(error(
                n,
                format!(
                    "malformed section header {}: expected [Interface] or [Peer]",
                    show(content)
                ),
            ));
        };
        let name = inner.trim();
        if name.eq_ignore_ascii_case("interface") {
            self.flush_comments();
            self.finish_peer()?;
            if let Some((first, _, _)) = &self.interface {
                return Err(error(
                    n,
                    format!(
                        "second [Interface] section (the first is at line {first}); a config has exactly one"
                    ),
                ));
            }
            self.interface = Some((n, Interface::default(), Seen::default()));
            self.section = Section::Interface;
            Ok(())
        } else if name.eq_ignore_ascii_case("peer") {
            let block = std::mem::take(&mut self.comments);
            self.finish_peer()?;
            self.peer = Some(PeerBuilder {
                line: n,
                public_key: None,
                preshared_key: None,
                allowed_ips: Vec::new(),
                endpoint: None,
                persistent_keepalive: None,
                above_comment: block.first_name_tag.or(block.last_nonempty),
                name_tag: None,
                seen: Seen::default(),
            });
            self.section = Section::Peer;
            Ok(())
        } else {
            Err(error(
                n,
                format!(
                    "unknown section {}: expected [Interface] or [Peer]",
                    show(content)
                ),
            ))
        }
    }

    fn key_line(&mut self, n: usize, content: &str) -> Result<(), ParseError> {
        let Some((key, value)) = content.split_once('=') else {
            return Err(error(
                n,
                format!("missing '=' in {}: expected Key = Value", show(content)),
            ));
        };
        let (key, value) = (key.trim(), value.trim());
        if key.is_empty() {
            return Err(error(n, "missing key name before '='"));
        }
        if !key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
        {
            return Err(error(
                n,
                format!(
                    "invalid key name {}: key names are letters, digits, '_', '-' and '.'",
                    show(key)
                ),
            ));
        }
        let lower = key.to_ascii_lowercase();
        match self.section {
            Section::None => Err(error(
                n,
                format!("{key} outside of a section: put it under [Interface] or [Peer]"),
            )),
            Section::Interface => self.interface_key(n, key, &lower, value),
            Section::Peer => self.peer_key(n, key, &lower, value),
        }
    }

    fn interface_key(
        &mut self,
        n: usize,
        key: &str,
        lower: &str,
        value: &str,
    ) -> Result<(), ParseError> {
        let Some((_, iface, seen)) = self.interface.as_mut() else {
            return Err(error(n, format!("{key} outside of [Interface]")));
        };
        let fail = |message: String| Err(error(n, message));
        match lower {
            "privatekey" => {
                seen.once("PrivateKey", n)?;
                // The value is a secret: never echo it.
                match value.parse::<PrivateKey>() {
                    Ok(k) => iface.private_key = Some(k),
                    Err(e) => return fail(format!("invalid PrivateKey: {}", redacted(&e))),
                }
            }
            "address" => {
                for item in list_items(n, "Address", value)? {
                    match parse_address(item) {
                        Some(net) => iface.addresses.push(net),
                        None => {
                            return fail(format!(
                                "invalid Address {}: expected an IP address with optional /prefix, such as 10.0.0.2/24 or fd00::2/64",
                                show(item)
                            ));
                        }
                    }
                }
            }
            "listenport" => {
                seen.once("ListenPort", n)?;
                match parse_digits::<u16>(value) {
                    Some(port) => iface.listen_port = Some(port),
                    None => {
                        return fail(format!(
                            "invalid ListenPort {}: expected a port number 0-65535",
                            show(value)
                        ));
                    }
                }
            }
            "dns" => {
                for item in list_items(n, "DNS", value)? {
                    check_dns(item).or_else(fail)?;
                    iface.dns.push(item.to_owned());
                }
            }
            "mtu" => {
                seen.once("MTU", n)?;
                match parse_digits::<u16>(value) {
                    Some(mtu) if mtu >= 68 => iface.mtu = Some(mtu),
                    _ => {
                        return fail(format!(
                            "invalid MTU {}: expected a number 68-65535",
                            show(value)
                        ));
                    }
                }
            }
            "fwmark" => {
                seen.once("FwMark", n)?;
                match parse_fwmark(value) {
                    Some(mark) => iface.fwmark = mark,
                    None => {
                        return fail(format!(
                            "invalid FwMark {}: expected off, a decimal number or 0x hex (32 bits)",
                            show(value)
                        ));
                    }
                }
            }
            "table" => {
                seen.once("Table", n)?;
                if value.is_empty() || !value.bytes().all(is_name_byte) {
                    return fail(format!(
                        "invalid Table {}: expected off, auto, a table number or name",
                        show(value)
                    ));
                }
                iface.table = Some(value.to_owned());
            }
            _ if PEER_KEYS.contains(&lower) => {
                return fail(format!(
                    "{key} is a [Peer] key; it is not allowed in [Interface]"
                ));
            }
            _ => iface.extra.push((key.to_owned(), value.to_owned())),
        }
        Ok(())
    }

    fn peer_key(
        &mut self,
        n: usize,
        key: &str,
        lower: &str,
        value: &str,
    ) -> Result<(), ParseError> {
        let Some(peer) = self.peer.as_mut() else {
            return Err(error(n, format!("{key} outside of [Peer]")));
        };
        let fail = |message: String| Err(error(n, message));
        match lower {
            "publickey" => {
                peer.seen.once("PublicKey", n)?;
                let key = match value.parse::<PublicKey>() {
                    Ok(k) => k,
                    Err(e) => return fail(format!("invalid PublicKey {}: {e}", show(value))),
                };
                if let Some(first) = self.peer_keys.get(&key) {
                    return fail(format!(
                        "peer {key} is already defined (PublicKey at line {first})"
                    ));
                }
                self.peer_keys.insert(key, n);
                peer.public_key = Some(key);
            }
            "presharedkey" => {
                peer.seen.once("PresharedKey", n)?;
                // A secret: never echo it.
                match value.parse::<Key>() {
                    Ok(k) => peer.preshared_key = Some(k),
                    Err(e) => return fail(format!("invalid PresharedKey: {}", redacted(&e))),
                }
            }
            "allowedips" => {
                for item in list_items(n, "AllowedIPs", value)? {
                    match Cidr::parse_masked(item) {
                        Ok(cidr) => peer.allowed_ips.push(cidr),
                        Err(_) => {
                            return fail(format!(
                                "invalid AllowedIPs entry {}: expected a CIDR such as 10.0.0.0/24 or fd00::/64",
                                show(item)
                            ));
                        }
                    }
                }
            }
            "endpoint" => {
                peer.seen.once("Endpoint", n)?;
                check_endpoint(value).or_else(fail)?;
                peer.endpoint = Some(value.to_owned());
            }
            "persistentkeepalive" => {
                peer.seen.once("PersistentKeepalive", n)?;
                if value.eq_ignore_ascii_case("off") {
                    peer.persistent_keepalive = None;
                } else {
                    match parse_digits::<u16>(value) {
                        Some(secs) => peer.persistent_keepalive = Some(secs),
                        None => {
                            return fail(format!(
                                "invalid PersistentKeepalive {}: expected off or seconds 0-65535",
                                show(value)
                            ));
                        }
                    }
                }
            }
            _ if INTERFACE_KEYS.contains(&lower) => {
                return fail(format!(
                    "{key} is an [Interface] key; it is not allowed in [Peer]"
                ));
            }
            _ => {
                return fail(format!(
                    "unknown key {key} in [Peer] (expected PublicKey, PresharedKey, AllowedIPs, Endpoint or PersistentKeepalive)"
                ));
            }
        }
        Ok(())
    }

    fn finish_peer(&mut self) -> Result<(), ParseError> {
        let Some(peer) = self.peer.take() else {
            return Ok(());
        };
        let Some(public_key) = peer.public_key else {
            return Err(error(peer.line, "[Peer] has no PublicKey"));
        };
        self.peers.push(Peer {
            public_key,
            preshared_key: peer.preshared_key,
            allowed_ips: peer.allowed_ips,
            endpoint: peer.endpoint,
            persistent_keepalive: peer.persistent_keepalive,
            comment: peer.name_tag.or(peer.above_comment),
        });
        Ok(())
    }

    fn finish(mut self) -> Result<WgQuickConfig, ParseError> {
        self.flush_comments();
        self.finish_peer()?;
        let Some((_, interface, _)) = self.interface else {
            return Err(error(0, "no [Interface] section"));
        };
        Ok(WgQuickConfig {
            interface,
            peers: self.peers,
        })
    }
}
