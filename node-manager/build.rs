//! Builds the eBPF object (node-manager-ebpf) with aya-build and embeds it in the agent.
//!
//! The eBPF crate needs a compiler that can `-Z build-std=core` for `bpfel-unknown-none`. The
//! toolchain is `NM_EBPF_TOOLCHAIN` when set; otherwise `bpf-debian` (Debian's rustc 1.96 with
//! its library source, linked by `cargo xtask setup`) when that exists, else `nightly` (which
//! then needs the `rust-src` component).
//!
//! `NM_EBPF_OBJECT=<path>` embeds an object built before instead (`cargo xtask cross` and the
//! Dockerfile build it once for every target architecture: the programs do not depend on the
//! CPU architecture, only on its byte order, and both targets are little-endian).
use std::{env, path::Path, process::Command};

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=NM_EBPF_TOOLCHAIN");
    println!("cargo:rerun-if-env-changed=NM_EBPF_OBJECT");
    println!("cargo:rerun-if-env-changed=NM_LLVM_BIN");
    if let Some(object) = env::var_os("NM_EBPF_OBJECT").filter(|v| !v.is_empty()) {
        return embed_prebuilt(Path::new(&object));
    }
    let toolchain = match env::var("NM_EBPF_TOOLCHAIN") {
        Ok(name) if !name.is_empty() => name,
        _ if has_rustup_toolchain("bpf-debian") => "bpf-debian".to_owned(),
        _ => "nightly".to_owned(),
    };
    if toolchain == "bpf-debian" {
        // Debian's compiler is a stable release: let it take -Z build-std, and make bpf-linker
        // find the LLVM 22 it was built against (not Debian's default LLVM).
        // SAFETY: build scripts are single-threaded at this point.
        unsafe {
            env::set_var("RUSTC_BOOTSTRAP", "1");
            let llvm = env::var("NM_LLVM_BIN").unwrap_or_default();
            if !llvm.is_empty() && Path::new(&llvm).is_dir() {
                let path = env::var("PATH").unwrap_or_default();
                env::set_var("PATH", format!("{llvm}:{path}"));
            }
        }
    }
    let manifest_dir = env::var("CARGO_MANIFEST_DIR")?;
    let ebpf_dir = Path::new(&manifest_dir)
        .parent()
        .ok_or_else(|| anyhow!("no workspace root above {manifest_dir}"))?
        .join("node-manager-ebpf");
    let ebpf_dir = ebpf_dir.to_str().context("non-UTF-8 path")?;
    aya_build::build_ebpf(
        [Package { name: "node-manager-ebpf", root_dir: ebpf_dir, ..Default::default() }],
        Toolchain::Custom(&toolchain),
    )
    .with_context(|| format!("building the eBPF programs with toolchain {toolchain:?} (run `cargo xtask setup` first)"))
}

/// Copies a prebuilt eBPF object to where `datapath::OBJECT` includes it from.
fn embed_prebuilt(object: &Path) -> anyhow::Result<()> {
    if env::var("CARGO_CFG_TARGET_ENDIAN").as_deref() != Ok("little") {
        anyhow::bail!("NM_EBPF_OBJECT is a little-endian (bpfel) object; this target is big-endian: unset it");
    }
    println!("cargo:rerun-if-changed={}", object.display());
    let bytes = std::fs::read(object).with_context(|| format!("NM_EBPF_OBJECT: reading {}", object.display()))?;
    // ELF, little-endian (EI_DATA = 1), e_machine EM_BPF (247).
    let is_bpfel = bytes.len() > 20 && bytes.starts_with(b"\x7fELF") && bytes[5] == 1 && bytes[18..20] == [247, 0];
    if !is_bpfel {
        anyhow::bail!(
            "NM_EBPF_OBJECT: {} is not a little-endian BPF ELF object (build it with `cargo xtask ebpf-object`)",
            object.display()
        );
    }
    let out = Path::new(&env::var("OUT_DIR")?).join("node-manager");
    std::fs::write(&out, bytes).with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}

fn has_rustup_toolchain(name: &str) -> bool {
    Command::new("rustup")
        .args(["toolchain", "list"])
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).lines().any(|l| l.starts_with(name)))
}
