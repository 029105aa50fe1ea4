//! Packaging facts that drift silently: Cargo.toml's `rust-version` must be at least
//! the `rust-version` of every package in the locked dependency graph, or a user with
//! the toolchain we claim gets a build error from a dependency instead of cargo's
//! clear "requires rustc X" message.
//!
//! The graph is `cargo metadata --locked`'s `resolve`, filtered by cargo to the
//! platforms the gateway builds for (`--filter-platform`, one per target below).
//! Unfiltered, `resolve` also holds packages no build ever compiles: those behind a
//! target `cfg` of no real platform, such as `cfg(loom)` (left-right's model checker,
//! which pulls in generator and windows-core, both declaring 1.95).
//!
//! Needs the crates' manifests: `cargo metadata` downloads any that are not in
//! cargo's cache yet (crates.io must be reachable the first time).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use serde_json::Value;

/// The targets whose dependency graphs count: Linux, macOS and Windows on x86-64 and
/// ARM64. `cargo metadata --filter-platform` evaluates each dependency's target `cfg`
/// against them with rustc's own target definitions; no toolchain for them is needed.
const PLATFORMS: &[&str] = &[
    "x86_64-unknown-linux-gnu",
    "aarch64-unknown-linux-gnu",
    "x86_64-unknown-linux-musl",
    "aarch64-unknown-linux-musl",
    "x86_64-apple-darwin",
    "aarch64-apple-darwin",
    "x86_64-pc-windows-msvc",
    "aarch64-pc-windows-msvc",
];

/// `1.91`, `1.88.0` -> (1, 91, 0). Cargo accepts two or three numeric parts.
fn parse_version(v: &str) -> (u64, u64, u64) {
    let parts: Vec<u64> = v
        .split('.')
        .map(|p| {
            p.parse()
                .unwrap_or_else(|_| panic!("rust-version {v:?} is not numeric"))
        })
        .collect();
    assert!(
        (2..=3).contains(&parts.len()),
        "rust-version {v:?} has 2 or 3 parts"
    );
    (parts[0], parts[1], parts.get(2).copied().unwrap_or(0))
}

fn show((major, minor, patch): (u64, u64, u64)) -> String {
    if patch == 0 {
        format!("{major}.{minor}")
    } else {
        format!("{major}.{minor}.{patch}")
    }
}

/// `cargo metadata --locked --format-version 1 --filter-platform ...` of this package.
fn metadata() -> Value {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
    let mut cmd = Command::new(&cargo);
    cmd.args([
        "metadata",
        "--locked",
        "--format-version",
        "1",
        "--manifest-path",
    ])
    .arg(&manifest);
    for p in PLATFORMS {
        cmd.args(["--filter-platform", p]);
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("run {cargo:?} metadata: {e}"));
    assert!(
        out.status.success(),
        "cargo metadata --locked failed (is Cargo.lock up to date?):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("cargo metadata prints JSON")
}

#[test]
fn rust_version_covers_every_locked_dependency() {
    let meta = metadata();
    let in_resolve: BTreeSet<&str> = meta["resolve"]["nodes"]
        .as_array()
        .expect("resolve.nodes")
        .iter()
        .map(|n| n["id"].as_str().expect("node id"))
        .collect();
    let members: BTreeSet<&str> = meta["workspace_members"]
        .as_array()
        .expect("workspace_members")
        .iter()
        .map(|m| m.as_str().expect("member id"))
        .collect();
    let packages = meta["packages"].as_array().expect("packages");

    let ours = packages
        .iter()
        .find(|p| p["name"] == env!("CARGO_PKG_NAME"))
        .expect("this package in cargo metadata");
    let declared_text = ours["rust_version"]
        .as_str()
        .expect("Cargo.toml declares a rust-version");
    let declared = parse_version(declared_text);

    // Every dependency in the resolved graph that declares a rust-version.
    let mut needs: BTreeMap<(u64, u64, u64), Vec<String>> = BTreeMap::new();
    let mut resolved = 0;
    for p in packages {
        let id = p["id"].as_str().expect("package id");
        if !in_resolve.contains(id) || members.contains(id) {
            continue;
        }
        resolved += 1;
        if let Some(v) = p["rust_version"].as_str() {
            needs.entry(parse_version(v)).or_default().push(format!(
                "{} {}",
                p["name"].as_str().unwrap(),
                p["version"].as_str().unwrap()
            ));
        }
    }
    assert!(
        resolved > 50,
        "the graph looks empty ({resolved} packages): is the filter right?"
    );
    let (&highest, _) = needs
        .last_key_value()
        .expect("some dependency declares a rust-version");

    let too_new: Vec<String> = needs
        .range((declared.0, declared.1, declared.2 + 1)..)
        .rev()
        .flat_map(|(v, pkgs)| {
            pkgs.iter()
                .map(move |p| format!("  {p} needs {}", show(*v)))
        })
        .collect();
    assert!(
        too_new.is_empty(),
        "Cargo.toml says rust-version = \"{declared_text}\", but the locked dependencies need \
         a newer Rust:\n{}\nSet `rust-version = \"{}\"` in Cargo.toml (the highest rust-version \
         in the resolved graph), or lock older versions of those crates \
         (`cargo update -p <crate> --precise <version>`).",
        too_new.join("\n"),
        show(highest),
    );
}

#[test]
fn versions_parse_and_order() {
    assert_eq!(parse_version("1.91"), (1, 91, 0));
    assert_eq!(parse_version("1.88.0"), (1, 88, 0));
    assert!(parse_version("1.91") > parse_version("1.88.0"));
    assert!(parse_version("1.100") > parse_version("1.99.9"));
    assert_eq!(show((1, 91, 0)), "1.91");
    assert_eq!(show((1, 74, 1)), "1.74.1");
}
