//! Checking and reading single values of wg-quick keys (lists, addresses, fwmarks, DNS
//! entries) and describing bad keys without leaking them.

use std::net::IpAddr;

use ipnet::IpNet;

use super::{ParseError, error};
use crate::validate::{is_host_name, looks_numeric, parse_digits, show};

/// Splits a comma-separated list; an empty value is an empty list, an empty entry an error.
pub(super) fn list_items<'a>(
    n: usize,
    key: &str,
    value: &'a str,
) -> Result<Vec<&'a str>, ParseError> {
    if value.is_empty() {
        return Ok(Vec::new());
    }
    let items: Vec<&str> = value.split(',').map(str::trim).collect();
    if items.iter().any(|item| item.is_empty()) {
        return Err(error(
            n,
            format!("empty entry in {key} list {}", show(value)),
        ));
    }
    Ok(items)
}

pub(super) fn parse_address(s: &str) -> Option<IpNet> {
    if s.contains('/') {
        s.parse::<IpNet>().ok()
    } else {
        s.parse::<IpAddr>().ok().map(IpNet::from)
    }
}

/// `off` is `Some(None)`; a decimal or `0x` hex number is `Some(Some(mark))`.
pub(super) fn parse_fwmark(s: &str) -> Option<Option<u32>> {
    if s.eq_ignore_ascii_case("off") {
        return Some(None);
    }
    let hex = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X"));
    match hex {
        Some(hex) if !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()) => {
            u32::from_str_radix(hex, 16).ok().map(Some)
        }
        Some(_) => None,
        None => parse_digits::<u32>(s).map(Some),
    }
}

pub(super) fn check_dns(s: &str) -> Result<(), String> {
    if s.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    if s.contains(':') || looks_numeric(s) {
        return Err(format!("invalid DNS server {}: not an IP address", show(s)));
    }
    if is_host_name(s) {
        return Ok(());
    }
    Err(format!(
        "invalid DNS entry {}: expected a name server IP or a search domain",
        show(s)
    ))
}

/// What is wrong with a secret key, without any of its characters (the base64 decoder's
/// message names the offending symbol and offset).
pub(super) fn redacted(e: &crate::KeyError) -> String {
    match e {
        crate::KeyError::Length(n) => {
            format!(
                "a key is {} characters of base64, got {n}",
                crate::key::KEY_BASE64_LEN
            )
        }
        crate::KeyError::Base64(_) => "not valid base64".to_owned(),
    }
}
