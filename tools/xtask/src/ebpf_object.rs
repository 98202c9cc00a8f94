//! `cargo xtask ebpf-object`: the eBPF object node-manager embeds, built once and reused for
//! every target architecture (`cargo xtask cross`, the Dockerfile).
//!
//! The object depends on the byte order only: built with aya's `bpf_target_arch` set to
//! `x86_64` and to `aarch64`, the program sections, relocations, maps and symbols are
//! byte-identical (deploy/README.md). That holds while the eBPF crate uses nothing
//! architecture-specific, which [`arch_specific_uses`] checks before an object is reused.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use crate::cmd::{Cmd, step, workspace_root};

/// What the host build of the workspace produced.
pub struct HostBuild {
    /// The eBPF object node-manager's build.rs built (its `OUT_DIR/node-manager`).
    pub object: PathBuf,
    /// The host's `node-manager` binary.
    pub binary: PathBuf,
}

/// `cargo xtask ebpf-object --out PATH`.
pub fn run(out: &Path) -> Result<()> {
    let built = host_build()?;
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    fs::copy(&built.object, out).with_context(|| format!("copying {} to {}", built.object.display(), out.display()))?;
    let size = fs::metadata(out)?.len();
    println!("    eBPF object: {} ({size} bytes, from {})", out.display(), built.object.display());
    Ok(())
}

/// Builds the workspace for the host (what `cargo xtask build` builds; nothing to do when the
/// tests built it) and finds the eBPF object and the agent binary in cargo's messages.
pub fn host_build() -> Result<HostBuild> {
    refuse_arch_specific()?;
    step("ebpf-object: host build of the workspace (node-manager's build.rs builds the eBPF object)");
    let messages = Cmd::cargo()
        .args(["build", "--workspace", "--exclude", "node-manager-ebpf", "--message-format=json-render-diagnostics"])
        .run_stdout()?;
    let found = scan_messages(&messages);
    let object = found.out_dir.map(|d| d.join("node-manager")).filter(|p| p.is_file());
    match (object, found.binary) {
        (Some(object), Some(binary)) => Ok(HostBuild { object, binary }),
        (None, _) => bail!("cargo did not report node-manager's build script output (OUT_DIR/node-manager)"),
        (_, None) => bail!("cargo did not report the node-manager binary"),
    }
}

#[derive(Default, Debug, PartialEq)]
struct Found {
    out_dir: Option<PathBuf>,
    binary: Option<PathBuf>,
}

/// node-manager's build-script `out_dir` and its `node-manager` executable, from cargo's JSON
/// messages (one per line).
fn scan_messages(messages: &str) -> Found {
    let mut found = Found::default();
    for msg in messages.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()) {
        if !package_id_is(msg["package_id"].as_str().unwrap_or(""), "node-manager") {
            continue;
        }
        match msg["reason"].as_str() {
            Some("build-script-executed") => found.out_dir = msg["out_dir"].as_str().map(PathBuf::from),
            Some("compiler-artifact") if msg["target"]["name"] == "node-manager" => {
                if let Some(exe) = msg["executable"].as_str() {
                    found.binary = Some(PathBuf::from(exe));
                }
            }
            _ => {}
        }
    }
    found
}

/// Whether a cargo package id names package `name`: `path+file:///x/name#0.1.0`,
/// `path+file:///x/dir#name@0.1.0`, or the older `name 0.1.0 (path+file:///x/name)`.
fn package_id_is(id: &str, name: &str) -> bool {
    if let Some((url, fragment)) = id.split_once('#') {
        return match fragment.split_once('@') {
            Some((package, _)) => package == name,
            None => url.rsplit('/').next() == Some(name),
        };
    }
    id.split_once(' ').is_some_and(|(package, _)| package == name)
}

/// Words that mark architecture-specific eBPF code (aya's per-architecture `pt_regs` accessors,
/// or code compiled per `bpf_target_arch`).
const ARCH_SPECIFIC: [&str; 5] = ["bpf_target_arch", "pt_regs", "PtRegs", "ProbeContext", "RetProbeContext"];

/// Files of `dir` (recursively, `.rs` only) that use one of [`ARCH_SPECIFIC`], with the word.
pub fn arch_specific_uses(dir: &Path) -> Result<Vec<String>> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            found.extend(arch_specific_uses(&path)?);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let text = fs::read_to_string(&path)?;
            found
                .extend(ARCH_SPECIFIC.iter().filter(|w| text.contains(*w)).map(|w| format!("{}: {w}", path.display())));
        }
    }
    Ok(found)
}

fn refuse_arch_specific() -> Result<()> {
    let uses = arch_specific_uses(&workspace_root().join("node-manager-ebpf").join("src"))?;
    if !uses.is_empty() {
        bail!(
            "the eBPF crate uses architecture-specific parts ({}), so one object no longer serves every \
             architecture: build it per target (drop NM_EBPF_OBJECT from `cargo xtask cross` and the Dockerfile)",
            uses.join(", ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_package_ids() {
        assert!(package_id_is("path+file:///work/wt7/node-manager#0.1.0", "node-manager"));
        assert!(package_id_is("path+file:///work/agent#node-manager@0.1.0", "node-manager"));
        assert!(package_id_is("node-manager 0.1.0 (path+file:///work/node-manager)", "node-manager"));
        assert!(!package_id_is("path+file:///work/wt7/node-manager-ebpf#0.1.0", "node-manager"));
        assert!(!package_id_is("registry+https://github.com/rust-lang/crates.io-index#clap@4.5.0", "node-manager"));
        assert!(!package_id_is("node-manager-common 0.1.0 (path+file:///x)", "node-manager"));
    }

    #[test]
    fn finds_the_object_directory_and_the_binary_in_cargo_messages() {
        let messages = r#"{"reason":"build-script-executed","package_id":"path+file:///w/node-manager-ebpf#0.1.0","out_dir":"/t/build/node-manager-ebpf-1/out"}
{"reason":"build-script-executed","package_id":"path+file:///w/node-manager#0.1.0","out_dir":"/t/build/node-manager-2/out"}
{"reason":"compiler-artifact","package_id":"path+file:///w/node-manager#0.1.0","target":{"name":"node_manager"},"executable":null}
{"reason":"compiler-artifact","package_id":"path+file:///w/node-manager#0.1.0","target":{"name":"node-manager"},"executable":"/t/debug/node-manager"}
not json
{"reason":"build-finished","success":true}"#;
        assert_eq!(
            scan_messages(messages),
            Found {
                out_dir: Some(PathBuf::from("/t/build/node-manager-2/out")),
                binary: Some(PathBuf::from("/t/debug/node-manager"))
            }
        );
    }

    #[test]
    fn the_ebpf_crate_has_no_architecture_specific_code_and_the_scan_would_see_some() {
        let src = workspace_root().join("node-manager-ebpf").join("src");
        assert_eq!(arch_specific_uses(&src).unwrap(), Vec::<String>::new());
        let dir = std::env::temp_dir().join(format!("xtask-arch-scan-{}", std::process::id()));
        fs::create_dir_all(dir.join("sub")).unwrap();
        fs::write(dir.join("sub/probe.rs"), "fn f(ctx: ProbeContext) {}").unwrap();
        let found = arch_specific_uses(&dir);
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(found.unwrap(), [format!("{}: ProbeContext", dir.join("sub/probe.rs").display())]);
    }
}
