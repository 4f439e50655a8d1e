//! The namespaces the controller reads Secrets in (`--secret-namespaces`). Meshes and peers
//! name their preshared-key Secrets by namespace, and anyone who may write a WireGuardPeer
//! chooses that namespace: without a limit, a peer could point at a Secret the controller can
//! read for other reasons (its own TLS key in its namespace). A reference elsewhere is never
//! read; the object gets `Ready=False` with a message naming the allowed namespaces.

use std::collections::BTreeSet;

use wgmesh_api::mesh::SecretKeyRef;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SecretNamespaces(BTreeSet<String>);

impl SecretNamespaces {
    /// The allowed namespaces; empty entries (as from `a,,b` or an empty variable) are dropped.
    pub fn new<I: IntoIterator<Item = S>, S: AsRef<str>>(namespaces: I) -> Self {
        SecretNamespaces(
            namespaces
                .into_iter()
                .map(|n| n.as_ref().trim().to_owned())
                .filter(|n| !n.is_empty())
                .collect(),
        )
    }

    /// `Ok` when the Secret may be read, or why not.
    pub fn check(&self, r: &SecretKeyRef) -> Result<(), String> {
        if self.0.contains(&r.namespace) {
            return Ok(());
        }
        let allowed = if self.0.is_empty() {
            "none".to_owned()
        } else {
            self.0.iter().cloned().collect::<Vec<_>>().join(", ")
        };
        Err(format!(
            "Secret {}/{} was not read: the controller reads preshared keys only in the \
             namespaces {allowed} (--secret-namespaces; the chart's peerSecrets.namespace and \
             rbac.secretNamespaces)",
            r.namespace, r.name.0
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(namespace: &str) -> SecretKeyRef {
        SecretKeyRef {
            namespace: namespace.into(),
            name: "psk".to_owned().into(),
            key: "presharedKey".into(),
        }
    }

    #[test]
    fn only_listed_namespaces_are_read() {
        let chart = SecretNamespaces::new(["wgmesh-secrets", "team-a"]);
        let cases: &[(&str, &SecretNamespaces, &str, bool)] = &[
            ("the peer Secrets namespace", &chart, "wgmesh-secrets", true),
            ("a further namespace", &chart, "team-a", true),
            ("the controller's namespace", &chart, "wgmesh-system", false),
            ("kube-system", &chart, "kube-system", false),
            ("a prefix is not a match", &chart, "wgmesh-secrets-2", false),
            ("case matters", &chart, "Team-A", false),
        ];
        for (what, allowed, ns, want) in cases {
            assert_eq!(allowed.check(&r(ns)).is_ok(), *want, "{what}");
        }
    }

    #[test]
    fn empty_entries_are_dropped_and_nothing_allows_nothing() {
        let none = SecretNamespaces::new(["", " "]);
        assert_eq!(none, SecretNamespaces::default());
        let why = none.check(&r("")).unwrap_err();
        assert!(why.contains("namespaces none"), "{why}");
    }

    #[test]
    fn the_refusal_names_the_secret_and_the_allowed_namespaces() {
        let allowed = SecretNamespaces::new(["b", "a"]);
        let why = allowed.check(&r("wgmesh-system")).unwrap_err();
        assert!(
            why.starts_with("Secret wgmesh-system/psk was not read"),
            "{why}"
        );
        assert!(why.contains("namespaces a, b "), "{why}");
    }
}
