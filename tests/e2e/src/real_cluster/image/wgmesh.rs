//! The chart's image, [`WGMESH_IMAGE`], built from our release binaries and laid out as
//! `deploy/Dockerfile`'s final stage. Its base there (distroless cc) cannot be pulled here, so
//! the root filesystem gets what that base gives the binaries: the shared libraries `ldd`
//! lists, `/etc/passwd` and `/etc/group` with the nonroot user, CA certificates and `/tmp`.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use super::{ImageSpec, write_oci_archive};
use crate::binaries::release_binaries;
use crate::netns::sh;

/// The image `deploy/kind/cni.values.yaml` names (repository and tag); its pull policy is
/// `Never`.
pub const WGMESH_IMAGE: &str = "ghcr.io/wgmesh/wgmesh:dev";

const CONTROLLER: &str = "/usr/local/bin/wgmesh-controller";
const AGENT: &str = "/usr/local/bin/wgmesh-agent";
/// The plugins CNI mode installs on nodes, from Debian's containernetworking-plugins.
const CNI_PLUGINS: [&str; 4] = ["bridge", "host-local", "portmap", "loopback"];
const HOST_CNI_DIR: &str = "/usr/lib/cni";
/// distroless's nonroot user.
const USER: &str = "65532:65532";
const CA_CERTIFICATES: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Builds the release binaries and writes [`WGMESH_IMAGE`] as an OCI archive in `dir`.
pub fn wgmesh_image(dir: &Path) -> Result<PathBuf> {
    let binaries = release_binaries(&[
        ("wgmesh-controller", "wgmesh-controller"),
        ("wgmesh-node-agent", "wgmesh-agent"),
    ])?;
    let (controller, agent) = (&binaries[0], &binaries[1]);
    let rootfs = dir.join("wgmesh-rootfs");
    if rootfs.exists() {
        std::fs::remove_dir_all(&rootfs)?;
    }
    copy_into(&rootfs, controller, CONTROLLER)?;
    copy_into(&rootfs, agent, AGENT)?;
    for plugin in CNI_PLUGINS {
        let from = Path::new(HOST_CNI_DIR).join(plugin);
        copy_into(&rootfs, &from, &format!("/usr/lib/cni/{plugin}"))
            .context("the CNI plugins come from Debian's containernetworking-plugins")?;
    }
    base_files(&rootfs, &[controller, agent])?;
    let archive = dir.join("wgmesh.oci.tar");
    write_oci_archive(
        &ImageSpec {
            name: WGMESH_IMAGE,
            rootfs: &rootfs,
            entrypoint: &[CONTROLLER],
            cmd: &[],
            user: USER,
        },
        &archive,
    )?;
    Ok(archive)
}

/// Copies `from` (following symlinks, keeping its mode) to the absolute path `to` in `rootfs`.
fn copy_into(rootfs: &Path, from: &Path, to: &str) -> Result<()> {
    let dest = rootfs.join(to.trim_start_matches('/'));
    std::fs::create_dir_all(dest.parent().context("a destination's directory")?)?;
    std::fs::copy(from, &dest).with_context(|| format!("copying {} to {to}", from.display()))?;
    Ok(())
}

/// What distroless cc would give `binaries`.
fn base_files(rootfs: &Path, binaries: &[&Path]) -> Result<()> {
    let mut libraries = BTreeSet::new();
    for binary in binaries {
        let listed = sh("ldd", &[binary.to_str().context("a non-UTF-8 path")?])?;
        libraries.extend(parse_ldd(&listed)?);
    }
    for library in &libraries {
        // At the path ldd names, so the loader the binaries ask for is where they look.
        copy_into(rootfs, Path::new(library), library)?;
    }
    let etc = rootfs.join("etc");
    std::fs::create_dir_all(&etc)?;
    std::fs::write(
        etc.join("passwd"),
        "root:x:0:0:root:/root:/sbin/nologin\n\
         nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n",
    )?;
    std::fs::write(etc.join("group"), "root:x:0:\nnonroot:x:65532:\n")?;
    // Owned by root like every file of the layer; nothing writes there.
    std::fs::create_dir_all(rootfs.join("home/nonroot"))?;
    if Path::new(CA_CERTIFICATES).is_file() {
        copy_into(rootfs, Path::new(CA_CERTIFICATES), CA_CERTIFICATES)?;
    }
    let tmp = rootfs.join("tmp");
    std::fs::create_dir_all(&tmp)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o1777))?;
    Ok(())
}

/// The absolute paths in `ldd`'s output: the libraries and the dynamic loader (the vDSO has
/// none).
fn parse_ldd(out: &str) -> Result<Vec<String>> {
    let mut paths = Vec::new();
    for line in out.lines().map(str::trim) {
        if line.contains("not found") {
            bail!("ldd: {line}");
        }
        let resolved = line.split_once("=>").map_or(line, |(_, r)| r.trim());
        if let Some(path) = resolved.split_whitespace().next()
            && path.starts_with('/')
        {
            paths.push(path.to_owned());
        }
    }
    Ok(paths)
}

/// Reading `deploy/Dockerfile`, for the test that the image built here agrees with it.
#[cfg(test)]
mod dockerfile {
    use anyhow::{Context, Result, bail};

    /// What a Dockerfile's final stage (after its last `FROM`) puts in its image.
    #[derive(Debug, PartialEq, Eq)]
    pub struct FinalStage {
        /// The absolute paths its `COPY` (or `ADD`) instructions write, in order; each source is
        /// taken to name a file.
        pub files: Vec<String>,
        pub user: Option<String>,
        pub entrypoint: Vec<String>,
    }

    /// Parses `dockerfile`'s final stage. Handles what `deploy/Dockerfile` uses: comments, line
    /// continuations, flags such as `--from=`, `COPY` in both forms, `ENTRYPOINT` in JSON form.
    pub fn final_stage(dockerfile: &str) -> Result<FinalStage> {
        let instructions = instructions(dockerfile);
        let from = instructions
            .iter()
            .rposition(|(keyword, _)| keyword == "FROM")
            .context("the Dockerfile has no FROM")?;
        let mut stage = FinalStage {
            files: Vec::new(),
            user: None,
            entrypoint: Vec::new(),
        };
        for (keyword, args) in &instructions[from + 1..] {
            match keyword.as_str() {
                "COPY" | "ADD" => stage.files.extend(copied_files(args)?),
                "USER" => stage.user = Some(args.clone()),
                // The shell form needs /bin/sh, which the image lacks.
                "ENTRYPOINT" => {
                    stage.entrypoint = serde_json::from_str(args)
                        .with_context(|| format!("ENTRYPOINT {args} is not in JSON form"))?;
                }
                _ => {}
            }
        }
        Ok(stage)
    }

    /// `(KEYWORD, arguments)` per instruction: continuation lines joined, comments and blank
    /// lines dropped (inside a continuation too, as Docker does).
    fn instructions(dockerfile: &str) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let mut current = String::new();
        let mut finish = |current: &mut String| {
            let line = std::mem::take(current);
            let (keyword, args) = line.split_once(char::is_whitespace).unwrap_or((&line, ""));
            out.push((keyword.to_ascii_uppercase(), args.trim().to_owned()));
        };
        for line in dockerfile.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            match line.strip_suffix('\\') {
                Some(head) => {
                    current.push_str(head);
                    current.push(' ');
                }
                None => {
                    current.push_str(line);
                    finish(&mut current);
                }
            }
        }
        if !current.trim().is_empty() {
            finish(&mut current);
        }
        out
    }

    /// The files one `COPY` writes: into a destination directory (ending in `/`) under each
    /// source's name, or to the destination itself for a single source.
    fn copied_files(args: &str) -> Result<Vec<String>> {
        let mut rest = args.trim_start();
        while rest.starts_with("--") {
            rest = rest
                .split_once(char::is_whitespace)
                .map_or("", |(_, r)| r)
                .trim_start();
        }
        let words: Vec<String> = if rest.starts_with('[') {
            serde_json::from_str(rest).with_context(|| format!("COPY {args}"))?
        } else {
            rest.split_whitespace().map(str::to_owned).collect()
        };
        let Some((dest, sources)) = words.split_last() else {
            bail!("COPY {args}: no destination");
        };
        if sources.is_empty() {
            bail!("COPY {args}: no source");
        }
        if !dest.starts_with('/') {
            bail!("COPY {args}: a relative destination depends on WORKDIR");
        }
        if let Some(glob) = sources.iter().find(|s| s.contains(['*', '?', '['])) {
            bail!("COPY {args}: the wildcard {glob} names no file in particular");
        }
        if !dest.ends_with('/') {
            if sources.len() > 1 {
                bail!("COPY {args}: several sources need a destination ending in /");
            }
            return Ok(vec![dest.clone()]);
        }
        Ok(sources
            .iter()
            .map(|s| {
                let name = s.trim_end_matches('/').rsplit('/').next().unwrap_or(s);
                format!("{dest}{name}")
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::dockerfile::{FinalStage, final_stage};
    use super::*;
    use crate::install::repo_root;

    fn strings(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn final_stage_parses_dockerfiles() {
        let cases: &[(&str, &str, Option<FinalStage>)] = &[
            (
                "multi-stage: only the last stage counts",
                "FROM rust AS build\nCOPY . /src/\nUSER 1\nENTRYPOINT [\"/old\"]\n\
                 FROM debian AS cni\nCOPY x /y\n\
                 FROM distroless\n\
                 COPY --from=build /out/a /out/b /usr/local/bin/\n\
                 USER 65532:65532\n\
                 ENTRYPOINT [\"/usr/local/bin/a\", \"--flag\"]\n",
                Some(FinalStage {
                    files: strings(&["/usr/local/bin/a", "/usr/local/bin/b"]),
                    user: Some("65532:65532".into()),
                    entrypoint: strings(&["/usr/local/bin/a", "--flag"]),
                }),
            ),
            (
                "lowercase, continuations, comments inside them, several flags",
                "from scratch\n# a comment\ncopy --from=x --chmod=755 \\\n  a \\\n\
                 # dropped\n  dir/b/ \\\n  /opt/dir/\nentrypoint [\"/opt/dir/a\"]\n",
                Some(FinalStage {
                    files: strings(&["/opt/dir/a", "/opt/dir/b"]),
                    user: None,
                    entrypoint: strings(&["/opt/dir/a"]),
                }),
            ),
            (
                "a single source to a file path, and the JSON form",
                "FROM scratch\nCOPY --chown=1:1 tool /bin/renamed\n\
                 COPY [\"a b\", \"/data/\"]\nUSER nonroot\nENTRYPOINT [\"/bin/renamed\"]\n",
                Some(FinalStage {
                    files: strings(&["/bin/renamed", "/data/a b"]),
                    user: Some("nonroot".into()),
                    entrypoint: strings(&["/bin/renamed"]),
                }),
            ),
            (
                "ENTRYPOINT in shell form",
                "FROM scratch\nENTRYPOINT /bin/a --flag\n",
                None,
            ),
            ("no FROM", "COPY a /b\n", None),
            (
                "several sources into a file",
                "FROM scratch\nCOPY a b /bin/c\n",
                None,
            ),
            (
                "a relative destination",
                "FROM scratch\nCOPY a bin/\n",
                None,
            ),
            ("a wildcard", "FROM scratch\nCOPY *.so /lib/\n", None),
        ];
        for (name, dockerfile, want) in cases {
            match (final_stage(dockerfile), want) {
                (Ok(got), Some(want)) => assert_eq!(&got, want, "{name}"),
                (Err(_), None) => {}
                (got, want) => panic!("{name}: got {got:?}, want {want:?}"),
            }
        }
    }

    /// The archive's image name, its configuration and its layer unpacked in `into`.
    fn unpack(archive: &Path, into: &Path) -> (String, serde_json::Value, PathBuf) {
        let layout = into.join("layout");
        let rootfs = into.join("rootfs");
        std::fs::create_dir_all(&layout).unwrap();
        std::fs::create_dir_all(&rootfs).unwrap();
        let untar = |tar: &Path, to: &Path| {
            sh(
                "tar",
                &["-C", to.to_str().unwrap(), "-xpf", tar.to_str().unwrap()],
            )
            .unwrap();
        };
        untar(archive, &layout);
        let blob = |digest: &serde_json::Value| {
            let hex = digest.as_str().unwrap().strip_prefix("sha256:").unwrap();
            layout.join("blobs/sha256").join(hex)
        };
        let json = |path: PathBuf| -> serde_json::Value {
            serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
        };
        let index = json(layout.join("index.json"));
        let desc = &index["manifests"][0];
        let name = desc["annotations"]["io.containerd.image.name"]
            .as_str()
            .unwrap()
            .to_owned();
        let manifest = json(blob(&desc["digest"]));
        let config = json(blob(&manifest["config"]["digest"]));
        untar(&blob(&manifest["layers"][0]["digest"]), &rootfs);
        (name, config, rootfs)
    }

    /// The image built here has what `deploy/Dockerfile`'s final stage puts in the released
    /// one (the same files at the same paths, executable, and nothing else beside them; the
    /// same user and entrypoint), and its binaries run on the libraries it carries.
    #[test]
    fn the_image_agrees_with_the_dockerfile() {
        let dockerfile = std::fs::read_to_string(repo_root().join("deploy/Dockerfile")).unwrap();
        let stage = final_stage(&dockerfile).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let archive = wgmesh_image(dir.path()).unwrap();
        eprintln!(
            "{WGMESH_IMAGE}: {} bytes",
            std::fs::metadata(&archive).unwrap().len()
        );
        let (name, config, rootfs) = unpack(&archive, &dir.path().join("unpacked"));
        assert_eq!(name, WGMESH_IMAGE);

        let user = stage.user.as_deref().expect("the Dockerfile sets USER");
        assert_eq!(config["config"]["User"], user);
        assert_eq!(
            config["config"]["Entrypoint"],
            serde_json::json!(stage.entrypoint)
        );

        let mut dirs = BTreeSet::new();
        for file in &stage.files {
            let meta = std::fs::symlink_metadata(rootfs.join(&file[1..]))
                .unwrap_or_else(|e| panic!("{file}: {e}"));
            assert!(meta.is_file(), "{file} is a regular file");
            // Owned by root, so the image's user runs it as "other".
            assert_eq!(meta.permissions().mode() & 0o005, 0o005, "{file} runs");
            dirs.insert(file.rsplit_once('/').unwrap().0.to_owned());
        }
        for d in &dirs {
            let mut beside: Vec<String> = std::fs::read_dir(rootfs.join(&d[1..]))
                .unwrap()
                .map(|e| format!("{d}/{}", e.unwrap().file_name().to_string_lossy()))
                .collect();
            beside.sort();
            let mut want: Vec<String> = stage
                .files
                .iter()
                .filter(|f| f.rsplit_once('/').unwrap().0 == d)
                .cloned()
                .collect();
            want.sort();
            assert_eq!(beside, want, "the files in {d}");
        }
        assert!(
            stage.files.iter().any(|f| f == AGENT) && stage.entrypoint == [CONTROLLER],
            "the Dockerfile still has the binaries the chart runs: {stage:?}"
        );
        let tmp = std::fs::metadata(rootfs.join("tmp")).unwrap();
        assert_eq!(tmp.permissions().mode() & 0o7777, 0o1777, "/tmp");
        let uid = user.split(':').next().unwrap();
        let passwd = std::fs::read_to_string(rootfs.join("etc/passwd")).unwrap();
        assert!(
            passwd.lines().any(|l| l.split(':').nth(2) == Some(uid)),
            "/etc/passwd has the user {uid}"
        );

        // chroot, so the loader and libraries are the image's, as the image's user.
        for binary in stage
            .files
            .iter()
            .filter(|f| f.starts_with("/usr/local/bin/"))
        {
            let out = std::process::Command::new("chroot")
                .arg(format!("--userspec={user}"))
                .arg(&rootfs)
                .args([binary, "--version"])
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "{binary} --version: {}; {stdout}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
            let name = binary.rsplit('/').next().unwrap();
            assert!(stdout.starts_with(name), "{binary} --version: {stdout}");
        }
    }
}
