//! Reading a dhat heap profile (`dhat-heap-<pid>.json`, dhat-rs's format): which allocation
//! sites held the most bytes when the heap was at its largest (dhat's "t-gmax"), each named by
//! its innermost frames in our own crates.

use std::path::Path;

use anyhow::{Context, Result};
use serde_json::Value;

struct Profile {
    /// Allocation sites ("program points").
    pps: Vec<ProgramPoint>,
    /// Frame descriptions, indexed by `ProgramPoint::fs`.
    ftbl: Vec<String>,
}

struct ProgramPoint {
    /// Bytes live at the global peak.
    gb: u64,
    /// Blocks live at the global peak.
    gbk: u64,
    /// Frames, innermost first.
    fs: Vec<usize>,
}

/// The `top` sites by bytes live at the peak, with their share of it, as a Markdown table.
pub fn summary(path: &Path, top: usize) -> Result<String> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let json: Value = serde_json::from_str(&text).context("parsing the dhat profile")?;
    let profile = parse(&json).context("not a dhat heap profile")?;
    Ok(render(&profile, top, &path.display().to_string()))
}

fn parse(json: &Value) -> Option<Profile> {
    let pps = json["pps"]
        .as_array()?
        .iter()
        .map(|pp| {
            Some(ProgramPoint {
                gb: pp["gb"].as_u64()?,
                gbk: pp["gbk"].as_u64()?,
                fs: pp["fs"]
                    .as_array()?
                    .iter()
                    .filter_map(|f| f.as_u64().map(|f| f as usize))
                    .collect(),
            })
        })
        .collect::<Option<Vec<_>>>()?;
    let ftbl = json["ftbl"]
        .as_array()?
        .iter()
        .map(|f| f.as_str().map(str::to_owned))
        .collect::<Option<Vec<_>>>()?;
    Some(Profile { pps, ftbl })
}

fn render(profile: &Profile, top: usize, name: &str) -> String {
    let total: u64 = profile.pps.iter().map(|p| p.gb).sum();
    let mut sites: Vec<&ProgramPoint> = profile.pps.iter().filter(|p| p.gb > 0).collect();
    sites.sort_by_key(|p| std::cmp::Reverse(p.gb));
    let mut out = format!(
        "heap at its peak ({name}): {:.1} MiB\n| MiB | share | blocks | where (innermost frames of ours) |\n|---|---|---|---|\n",
        total as f64 / 1048576.0
    );
    for site in sites.into_iter().take(top) {
        out += &format!(
            "| {:.1} | {:.0}% | {} | {} |\n",
            site.gb as f64 / 1048576.0,
            100.0 * site.gb as f64 / total.max(1) as f64,
            site.gbk,
            ours(profile, site, 3)
        );
    }
    out
}

/// Up to `n` frames of the site in wgmesh's crates (the allocator's own frames and the
/// standard library's say little), shortened to the function and line.
fn ours(profile: &Profile, site: &ProgramPoint, n: usize) -> String {
    let frames: Vec<String> = site
        .fs
        .iter()
        .filter_map(|&i| profile.ftbl.get(i))
        .filter(|f| f.contains("wgmesh"))
        .take(n)
        .map(|f| short(f))
        .collect();
    if frames.is_empty() {
        "(no wgmesh frame)".to_owned()
    } else {
        frames.join(" < ")
    }
}

/// `0x1234: wgmesh_controller::grpc::PeerStream::run::{{closure}} (crates/controller/src/grpc.rs:520:21)`
/// becomes `grpc::PeerStream::run (grpc.rs:520)`.
fn short(frame: &str) -> String {
    let body = frame.split_once(": ").map_or(frame, |(_, b)| b);
    let (func, place) = match body.rsplit_once(" (") {
        Some((f, p)) => (f, p.trim_end_matches(')')),
        None => (body, ""),
    };
    let func = func
        .trim_start_matches('<')
        .split("::")
        .filter(|part| !part.starts_with("wgmesh_") && !part.starts_with("{{closure"))
        .collect::<Vec<_>>()
        .join("::");
    let place = place
        .rsplit('/')
        .next()
        .unwrap_or(place)
        .rsplitn(2, ':')
        .last()
        .unwrap_or(place);
    if place.is_empty() {
        func
    } else {
        format!("{func} ({place})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_biggest_sites_first_named_by_our_frames() {
        let profile = Profile {
            ftbl: vec![
                "[root]".into(),
                "0x1: alloc::vec::Vec<T>::push (library/alloc/src/vec/mod.rs:10:5)".into(),
                "0x2: wgmesh_controller::grpc::PeerStream::run::{{closure}} (crates/controller/src/grpc.rs:520:21)".into(),
                "0x3: wgmesh_core::desired::compute (crates/core/src/desired.rs:400:9)".into(),
            ],
            pps: vec![
                ProgramPoint { gb: 1 << 20, gbk: 10, fs: vec![1, 3] },
                ProgramPoint { gb: 3 << 20, gbk: 30, fs: vec![1, 2, 3] },
                ProgramPoint { gb: 0, gbk: 0, fs: vec![1] },
            ],
        };
        let table = render(&profile, 5, "p.json");
        let rows: Vec<&str> = table.lines().skip(3).collect();
        assert_eq!(
            rows,
            [
                "| 3.0 | 75% | 30 | grpc::PeerStream::run (grpc.rs:520) < desired::compute (desired.rs:400) |",
                "| 1.0 | 25% | 10 | desired::compute (desired.rs:400) |",
            ]
        );
        assert!(table.starts_with("heap at its peak (p.json): 4.0 MiB"));
    }
}
