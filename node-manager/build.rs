//! Builds the eBPF object (node-manager-ebpf) with aya-build and embeds it in the agent.
//!
//! The eBPF crate needs a compiler that can `-Z build-std=core` for `bpfel-unknown-none`. The
//! toolchain is `NM_EBPF_TOOLCHAIN` when set; otherwise `bpf-debian` (Debian's rustc 1.96 with
//! its library source, linked by `cargo xtask setup`) when that exists, else `nightly` (which
//! then needs the `rust-src` component).
use std::{env, path::Path, process::Command};

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=NM_EBPF_TOOLCHAIN");
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
            let llvm = "/usr/lib/llvm-22/bin";
            if Path::new(llvm).is_dir() {
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

fn has_rustup_toolchain(name: &str) -> bool {
    Command::new("rustup")
        .args(["toolchain", "list"])
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).lines().any(|l| l.starts_with(name)))
}
