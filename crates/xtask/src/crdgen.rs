//! `cargo xtask crdgen`: crds/*.yaml from the Rust types, the same files in the Helm chart's
//! crds/ (Helm installs CRDs only from there), and the chart's schema for `mesh.spec`
//! (values.schema.json), taken from the WireGuardMesh CRD.

use std::fs;

use anyhow::{Context, Result, bail};
use serde_json::{Map, Value};

use crate::setup::repo_root;

pub fn run(check: bool) -> Result<()> {
    let mut stale = Vec::new();
    for dir in [
        repo_root().join("crds"),
        repo_root().join("deploy/helm/wgmesh/crds"),
    ] {
        fs::create_dir_all(&dir)?;
        write_dir(&dir, check, &mut stale)?;
    }
    write_values_schema(check, &mut stale)?;
    if !stale.is_empty() {
        bail!(
            "these files differ from the Rust types; run `cargo xtask crdgen`: {}",
            stale.join(", ")
        );
    }
    Ok(())
}

fn write_dir(dir: &std::path::Path, check: bool, stale: &mut Vec<String>) -> Result<()> {
    for (file, crd) in wgmesh_api::crds() {
        let path = dir.join(file);
        let have = fs::read_to_string(&path).unwrap_or_default();
        write_if_changed(&path, &have, &wgmesh_api::crd_yaml(&crd), check, stale)?;
    }
    Ok(())
}

/// Writes `want` to `path` unless it holds it (`have`); with `check`, names it stale instead.
fn write_if_changed(
    path: &std::path::Path,
    have: &str,
    want: &str,
    check: bool,
    stale: &mut Vec<String>,
) -> Result<()> {
    if have == want {
        return Ok(());
    }
    if check {
        stale.push(path.display().to_string());
    } else {
        fs::write(path, want).with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

fn values_schema_path() -> std::path::PathBuf {
    repo_root().join("deploy/helm/wgmesh/values.schema.json")
}

/// Puts the WireGuardMesh spec's schema under `mesh.spec` in the chart's values.schema.json
/// (the rest of that file is written by hand).
fn write_values_schema(check: bool, stale: &mut Vec<String>) -> Result<()> {
    let path = values_schema_path();
    let have = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let want = splice_mesh_spec(&have, &values_spec_schema(&mesh_spec_schema()?))?;
    write_if_changed(&path, &have, &want, check, stale)
}

/// The WireGuardMesh CRD's schema of `spec`.
fn mesh_spec_schema() -> Result<Value> {
    use kube::CustomResourceExt;
    let crd = wgmesh_api::WireGuardMesh::crd();
    let spec = crd
        .spec
        .versions
        .first()
        .and_then(|v| v.schema.as_ref())
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .and_then(|s| s.properties.as_ref())
        .and_then(|p| p.get("spec"))
        .context("the WireGuardMesh CRD has no schema for spec")?;
    Ok(serde_json::to_value(spec)?)
}

/// The CRD's schema for a spec as Helm's JSON Schema validator should read it, so that
/// `helm install` refuses what the API server would refuse or silently drop, naming the value:
/// - an unknown field (a typo) is refused: the API server would prune it without an error;
/// - `nullable` becomes a `null` type, which JSON Schema has in its place;
/// - Kubernetes' extensions (CEL rules, list types) and OpenAPI formats (`int32`), which JSON
///   Schema does not know, are left to the API server.
pub(crate) fn values_spec_schema(crd: &Value) -> Value {
    match crd {
        Value::Object(map) => {
            let mut out = Map::new();
            for (key, value) in map {
                if key.starts_with("x-kubernetes-") || key == "nullable" || key == "format" {
                    continue;
                }
                let value = if key == "properties" {
                    // Its keys are field names, not keywords: only their schemas are read.
                    match value {
                        Value::Object(fields) => Value::Object(
                            fields
                                .iter()
                                .map(|(k, v)| (k.clone(), values_spec_schema(v)))
                                .collect(),
                        ),
                        other => other.clone(),
                    }
                } else {
                    values_spec_schema(value)
                };
                out.insert(key.clone(), value);
            }
            if map.get("nullable") == Some(&Value::Bool(true))
                && let Some(Value::String(t)) = out.get("type").cloned()
            {
                out.insert("type".into(), Value::from(vec![t, "null".to_owned()]));
            }
            if map.contains_key("properties") && !map.contains_key("additionalProperties") {
                out.insert("additionalProperties".into(), Value::Bool(false));
            }
            Value::Object(out)
        }
        Value::Array(items) => Value::Array(items.iter().map(values_spec_schema).collect()),
        other => other.clone(),
    }
}

/// `file` with the value of `properties.mesh.properties.spec` replaced by `spec`, the rest
/// byte for byte as it was.
fn splice_mesh_spec(file: &str, spec: &Value) -> Result<String> {
    const MESH: &str = "\n    \"mesh\": {\n";
    const SPEC: &str = "\n        \"spec\": ";
    let mesh = file
        .find(MESH)
        .context("values.schema.json has no top-level \"mesh\" property")?;
    let start = mesh
        + file[mesh..]
            .find(SPEC)
            .context("values.schema.json has no \"mesh.spec\" property")?
        + SPEC.len();
    // The value ends at the first line closing at its own indentation.
    let end = start
        + file[start..]
            .find("\n        }")
            .context("values.schema.json: mesh.spec does not close")?
        + "\n        }".len();
    let text = serde_json::to_string_pretty(spec)?.replace('\n', "\n        ");
    Ok(format!("{}{text}{}", &file[..start], &file[end..]))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn the_values_schema_of_a_spec_table() {
        let cases = [
            (
                "an object with fields refuses others",
                json!({"type": "object", "properties": {"a": {"type": "string"}}}),
                json!({"type": "object", "additionalProperties": false,
                       "properties": {"a": {"type": "string"}}}),
            ),
            (
                "a map keeps its value schema",
                json!({"type": "object", "additionalProperties": {"type": "string"}}),
                json!({"type": "object", "additionalProperties": {"type": "string"}}),
            ),
            (
                "nullable becomes a null type",
                json!({"type": "integer", "format": "int32", "nullable": true, "minimum": 0}),
                json!({"type": ["integer", "null"], "minimum": 0}),
            ),
            (
                "Kubernetes' extensions go, nested too",
                json!({"type": "array", "x-kubernetes-list-type": "set", "items": {
                    "type": "object", "x-kubernetes-validations": [{"rule": "true"}],
                    "properties": {"nullable": {"type": "boolean"}}}}),
                json!({"type": "array", "items": {"type": "object",
                       "additionalProperties": false,
                       "properties": {"nullable": {"type": "boolean"}}}}),
            ),
        ];
        for (name, crd, want) in cases {
            assert_eq!(values_spec_schema(&crd), want, "{name}");
        }
    }

    #[test]
    fn the_spec_is_spliced_in_and_nothing_else_moves() {
        let file = "{\n  \"properties\": {\n    \"mesh\": {\n      \"properties\": {\n        \"spec\": {\n          \"type\": \"object\"\n        }\n      }\n    },\n    \"x\": {\n        \"spec\": 1\n    }\n  }\n}\n";
        let spliced =
            splice_mesh_spec(file, &json!({"type": "object", "required": ["a"]})).unwrap();
        let want = file.replace(
            "\"spec\": {\n          \"type\": \"object\"\n        }",
            "\"spec\": {\n          \"required\": [\n            \"a\"\n          ],\n          \"type\": \"object\"\n        }",
        );
        assert_eq!(spliced, want);
        // Splicing again changes nothing.
        assert_eq!(
            splice_mesh_spec(&spliced, &json!({"type": "object", "required": ["a"]})).unwrap(),
            spliced
        );
        assert!(splice_mesh_spec("{}", &json!({})).is_err());
    }
}
