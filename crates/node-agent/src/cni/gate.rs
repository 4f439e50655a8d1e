//! Add-on mode's gate for pods after a reboot. The other CNI's configuration stays on the
//! disk through a reboot, while our routes, rules and guards (kernel state) do not: the
//! kubelet would start pods, and they would reach other nodes' pods over the other CNI's
//! plain routes, before the agent has programmed the node again.
//!
//! So the agent keeps a copy of the configuration the runtime would read (the other CNI's)
//! under a name that sorts before it, linked to its content in `/run` ([`super::linked`]): while
//! the node is programmed the runtime reads the copy, the same network; after a reboot the
//! link dangles, containerd has no pod network and the kubelet starts no pod until the agent
//! has programmed the node and written the copy again. The copy follows the original (the
//! agent compares them every repair) and goes when the original goes or the node leaves the
//! mesh. A mesh with `strict: false` (plaintext while an agent is down) has no gate.

use std::io;
use std::path::Path;

use serde_json::{Value, json};

use super::linked;

/// The gate's file name: before the usual `10-<name>.conflist` of other CNIs.
pub const GATE_FILE: &str = "00-wgmesh-gate.conflist";

/// Extensions of the files the runtime reads in its configuration directory (libcni's).
const CONFIG_EXTENSIONS: [&str; 3] = ["conf", "conflist", "json"];

/// The configuration the runtime would read without ours: the first of `names` (a
/// directory's entries) by name with a CNI extension, ours left out.
pub fn other_config<'a>(names: &[&'a str]) -> Option<&'a str> {
    names
        .iter()
        .copied()
        .filter(|n| *n != GATE_FILE && *n != super::CONFLIST_FILE)
        .filter(|n| {
            Path::new(n)
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| CONFIG_EXTENSIONS.contains(&e))
        })
        .min()
}

/// The gate's content from the other CNI's configuration `text` in the file `name`: a list
/// as it is, a single network (`.conf`, `.json`) made a list of one, as libcni reads it.
pub fn gate_content(name: &str, text: &str) -> Result<Value, String> {
    let config: Value =
        serde_json::from_str(text).map_err(|e| format!("{name} is not JSON: {e}"))?;
    let object = config
        .as_object()
        .ok_or_else(|| format!("{name} is not a JSON object"))?;
    let network = object
        .get("name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| format!("{name} names no network"))?
        .to_owned();
    if name.ends_with(".conflist") {
        let plugins = object.get("plugins").and_then(Value::as_array);
        if plugins.is_none_or(|p| p.is_empty()) {
            return Err(format!("{name} lists no plugin"));
        }
        return Ok(config);
    }
    if object.get("type").and_then(Value::as_str).is_none() {
        return Err(format!("{name} has no plugin type"));
    }
    let mut list = json!({ "name": network, "plugins": [config.clone()] });
    if let Some(version) = object.get("cniVersion") {
        list["cniVersion"] = version.clone();
    }
    Ok(list)
}

/// What [`sync`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The gate already matched `from`.
    Unchanged { from: String },
    /// The gate was written from `from`.
    Written { from: String },
    /// No gate is wanted (no other configuration, or none asked for); `removed` if one was
    /// there.
    Absent { removed: bool },
    /// The other configuration cannot be read as one: the gate is left as it was.
    Unreadable { error: String },
    /// The runtime reads `from` before the gate would be: a gate there would protect
    /// nothing, and a meta-plugin that delegates to the next file (Multus) would take it for
    /// its master and fail to read through the link. None is kept; `removed` if one was.
    Shadowed { from: String, removed: bool },
}

/// Makes the gate in `conf_dir` (content in `run_dir`) the copy of the configuration the
/// runtime would read without it, or removes it when there is none or `wanted` is false.
pub fn sync(conf_dir: &Path, run_dir: &Path, wanted: bool) -> io::Result<Outcome> {
    let absent = || -> io::Result<Outcome> {
        Ok(Outcome::Absent {
            removed: linked::remove(conf_dir, run_dir, GATE_FILE)?,
        })
    };
    if !wanted {
        return absent();
    }
    let entries = match std::fs::read_dir(conf_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return absent(),
        Err(e) => return Err(e),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            continue;
        }
        if let Some(name) = entry.file_name().to_str() {
            names.push(name.to_owned());
        }
    }
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let Some(from) = other_config(&refs) else {
        return absent();
    };
    if from < GATE_FILE {
        return Ok(Outcome::Shadowed {
            from: from.to_owned(),
            removed: linked::remove(conf_dir, run_dir, GATE_FILE)?,
        });
    }
    let source = conf_dir.join(from);
    let text = match std::fs::read_to_string(&source) {
        Ok(t) => t,
        // A link of the other CNI's that dangles: it has no network either.
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Ok(Outcome::Unreadable {
                error: format!("{from}: {e}"),
            });
        }
        Err(e) => return Err(e),
    };
    match gate_content(from, &text) {
        Ok(content) => {
            let from = from.to_owned();
            let written = linked::write(conf_dir, run_dir, GATE_FILE, &content)?;
            // The copy is readable by whom the original is, no more.
            let mode = std::fs::metadata(&source)?.permissions();
            std::fs::set_permissions(run_dir.join(GATE_FILE), mode)?;
            Ok(if written {
                Outcome::Written { from }
            } else {
                Outcome::Unchanged { from }
            })
        }
        Err(error) => Ok(Outcome::Unreadable { error }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_runtime_would_read_the_first_other_config() {
        let cases: &[(&str, &[&str], Option<&str>)] = &[
            ("none", &[], None),
            ("only ours", &[GATE_FILE, "05-wgmesh.conflist"], None),
            (
                "first by name",
                &["20-b.conflist", "10-kindnet.conflist", GATE_FILE],
                Some("10-kindnet.conflist"),
            ),
            (
                "single networks count",
                &["99-a.conflist", "87-podman.conf"],
                Some("87-podman.conf"),
            ),
            ("json counts", &["10-x.json"], Some("10-x.json")),
            (
                "other extensions do not",
                &[
                    "10-a.conflist.bak",
                    ".00-wgmesh-gate.conflist.tmp",
                    "README",
                ],
                None,
            ),
            (
                "one before ours",
                &["00-multus.conf", "10-calico.conflist"],
                Some("00-multus.conf"),
            ),
        ];
        for (what, names, want) in cases {
            assert_eq!(other_config(names), *want, "{what}");
        }
    }

    #[test]
    fn gate_content_reads_as_libcni_does() {
        let list = r#"{"cniVersion":"1.0.0","name":"kindnet","plugins":[{"type":"ptp"}]}"#;
        assert_eq!(
            gate_content("10-kindnet.conflist", list).unwrap(),
            serde_json::from_str::<Value>(list).unwrap()
        );
        let single = r#"{"cniVersion":"0.4.0","name":"podman","type":"bridge","bridge":"cni0"}"#;
        assert_eq!(
            gate_content("87-podman.conf", single).unwrap(),
            json!({
                "cniVersion": "0.4.0",
                "name": "podman",
                "plugins": [serde_json::from_str::<Value>(single).unwrap()],
            })
        );
        let refused: &[(&str, &str, &str)] = &[
            ("10-a.conflist", "{", "not JSON"),
            ("10-a.conflist", "[]", "not a JSON object"),
            (
                "10-a.conflist",
                r#"{"plugins":[{"type":"x"}]}"#,
                "names no network",
            ),
            (
                "10-a.conflist",
                r#"{"name":"a","plugins":[]}"#,
                "lists no plugin",
            ),
            ("10-a.conf", r#"{"name":"a"}"#, "no plugin type"),
        ];
        for (name, text, why) in refused {
            let err = gate_content(name, text).unwrap_err();
            assert!(err.contains(why), "{name} {text}: {err}");
        }
    }

    #[test]
    fn the_gate_follows_the_other_config() {
        let conf = tempfile::tempdir().unwrap();
        let run = tempfile::tempdir().unwrap();
        let (conf, run) = (conf.path(), run.path());
        let gate = conf.join(GATE_FILE);
        let read =
            || -> Value { serde_json::from_str(&std::fs::read_to_string(&gate).unwrap()).unwrap() };

        assert_eq!(
            sync(conf, run, true).unwrap(),
            Outcome::Absent { removed: false }
        );
        let v1 = json!({"cniVersion": "1.0.0", "name": "net", "plugins": [{"type": "bridge"}]});
        std::fs::write(conf.join("10-net.conflist"), v1.to_string()).unwrap();
        let from = "10-net.conflist".to_owned();
        assert_eq!(
            sync(conf, run, true).unwrap(),
            Outcome::Written { from: from.clone() }
        );
        assert_eq!(read(), v1);
        assert_eq!(
            sync(conf, run, true).unwrap(),
            Outcome::Unchanged { from: from.clone() }
        );

        // The other CNI changes its configuration: the copy follows.
        let v2 = json!({"cniVersion": "1.0.0", "name": "net", "plugins": [{"type": "ptp"}]});
        std::fs::write(conf.join("10-net.conflist"), v2.to_string()).unwrap();
        assert_eq!(
            sync(conf, run, true).unwrap(),
            Outcome::Written { from: from.clone() }
        );
        assert_eq!(read(), v2);

        // Half-written: the gate stays as it was.
        std::fs::write(conf.join("10-net.conflist"), "{\"name\"").unwrap();
        assert!(matches!(
            sync(conf, run, true).unwrap(),
            Outcome::Unreadable { .. }
        ));
        assert_eq!(read(), v2);

        // A reboot: the content is gone; the next sync writes it again.
        std::fs::write(conf.join("10-net.conflist"), v2.to_string()).unwrap();
        std::fs::remove_file(run.join(GATE_FILE)).unwrap();
        assert_eq!(
            sync(conf, run, true).unwrap(),
            Outcome::Written { from: from.clone() }
        );
        assert_eq!(read(), v2);

        // Not wanted (strict: false), or the other CNI gone: no gate.
        assert_eq!(
            sync(conf, run, false).unwrap(),
            Outcome::Absent { removed: true }
        );
        assert_eq!(sync(conf, run, true).unwrap(), Outcome::Written { from });
        std::fs::remove_file(conf.join("10-net.conflist")).unwrap();
        assert_eq!(
            sync(conf, run, true).unwrap(),
            Outcome::Absent { removed: true }
        );
        assert!(std::fs::read_dir(conf).unwrap().next().is_none());
        assert!(std::fs::read_dir(run).unwrap().next().is_none());
    }

    #[test]
    fn no_gate_behind_a_config_that_sorts_before_it() {
        use std::os::unix::fs::PermissionsExt;
        let conf = tempfile::tempdir().unwrap();
        let run = tempfile::tempdir().unwrap();
        let (conf, run) = (conf.path(), run.path());
        let calico = conf.join("10-calico.conflist");
        std::fs::write(
            &calico,
            r#"{"name":"k8s-pod-network","plugins":[{"type":"calico"}]}"#,
        )
        .unwrap();
        std::fs::set_permissions(&calico, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            sync(conf, run, true).unwrap(),
            Outcome::Written { .. }
        ));
        let mode = std::fs::metadata(run.join(GATE_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "the copy keeps the original's mode");

        // Multus arrives: its configuration is read first; the gate goes.
        std::fs::write(
            conf.join("00-multus.conf"),
            r#"{"name":"multus","type":"multus"}"#,
        )
        .unwrap();
        assert_eq!(
            sync(conf, run, true).unwrap(),
            Outcome::Shadowed {
                from: "00-multus.conf".into(),
                removed: true
            }
        );
        assert!(std::fs::symlink_metadata(conf.join(GATE_FILE)).is_err());
        assert_eq!(
            sync(conf, run, true).unwrap(),
            Outcome::Shadowed {
                from: "00-multus.conf".into(),
                removed: false
            }
        );
    }
}
