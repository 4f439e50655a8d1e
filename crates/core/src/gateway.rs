//! Which gateway carries the traffic between external peers and interior nodes.
//!
//! Interior nodes give one gateway (the active one) every external peer's networks, and
//! external peers' configs send everything but the gateways' own pods through it. When its
//! agent goes silent the status writer moves that role to the next live gateway; it stays
//! there when the old one comes back, since every move changes every external peer's config.

use std::collections::BTreeSet;

/// The active gateway: `current` while it is a gateway and not down, else the first live
/// gateway in order. With every gateway down nothing is better, so the role stays (or goes
/// to the first gateway, if `current` is none).
pub fn choose_active(
    gateways: &[String],
    current: Option<&str>,
    down: &BTreeSet<String>,
) -> Option<String> {
    let current = current.filter(|c| gateways.iter().any(|g| g == c));
    if let Some(c) = current
        && !down.contains(c)
    {
        return Some(c.to_owned());
    }
    gateways
        .iter()
        .find(|g| !down.contains(*g))
        .map(String::as_str)
        .or(current)
        .or(gateways.first().map(String::as_str))
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choose_active_table() {
        type Case<'a> = (
            &'a str,
            &'a [&'a str],
            Option<&'a str>,
            &'a [&'a str],
            Option<&'a str>,
        );
        let cases: &[Case] = &[
            ("no gateway: none", &[], Some("a"), &[], None),
            (
                "nothing chosen yet: the first",
                &["a", "b"],
                None,
                &[],
                Some("a"),
            ),
            (
                "the first is down: the next",
                &["a", "b", "c"],
                None,
                &["a"],
                Some("b"),
            ),
            (
                "the current one stays",
                &["a", "b"],
                Some("b"),
                &[],
                Some("b"),
            ),
            (
                "the current one is down: the first live",
                &["a", "b", "c"],
                Some("b"),
                &["b"],
                Some("a"),
            ),
            (
                "no longer a gateway: the first live",
                &["a", "c"],
                Some("b"),
                &["a"],
                Some("c"),
            ),
            (
                "all down: the current one stays",
                &["a", "b"],
                Some("b"),
                &["a", "b"],
                Some("b"),
            ),
            (
                "all down, none chosen: the first",
                &["a", "b"],
                None,
                &["a", "b"],
                Some("a"),
            ),
        ];
        for (name, gateways, current, down, want) in cases {
            let gateways: Vec<String> = gateways.iter().map(|g| g.to_string()).collect();
            let down: BTreeSet<String> = down.iter().map(|g| g.to_string()).collect();
            assert_eq!(
                choose_active(&gateways, *current, &down).as_deref(),
                *want,
                "{name}"
            );
        }
    }
}
