//! `cargo xtask lint`: rustfmt, clippy on the host crates, clippy on the eBPF crate, hadolint on
//! the Dockerfile. All run; the failures are reported together.

use anyhow::{Result, bail};

use crate::{
    cmd::{Cmd, step},
    toolchain::{BPF_TARGET, ebpf_toolchain},
};

pub fn run() -> Result<()> {
    let mut failures = Vec::new();

    step("lint: rustfmt check (all crates)");
    if let Err(e) = Cmd::cargo().args(["fmt", "--all", "--", "--check"]).run() {
        failures.push(e);
    }

    step("lint: clippy on the host crates");
    if let Err(e) = Cmd::cargo()
        .args(["clippy", "--workspace", "--exclude", "node-manager-ebpf", "--all-targets"])
        .args(["--", "-D", "warnings"])
        .run()
    {
        failures.push(e);
    }

    // The eBPF crate only builds for the BPF target, with -Z build-std=core: Debian's
    // compiler (a stable release, hence RUSTC_BOOTSTRAP=1) and its clippy (rust-web-clippy).
    let toolchain = ebpf_toolchain();
    step(format!("lint: clippy on the eBPF crate (toolchain {toolchain}, target {BPF_TARGET})"));
    if let Err(e) = Cmd::cargo()
        .arg(format!("+{toolchain}"))
        .args(["clippy", "-p", "node-manager-ebpf", "--target", BPF_TARGET])
        .args(["-Z", "build-std=core", "--", "-D", "warnings"])
        .env("RUSTC_BOOTSTRAP", "1")
        .with_llvm_path()
        .run()
    {
        failures.push(e);
    }

    step("lint: hadolint on the Dockerfile");
    if let Err(e) = crate::hadolint::lint_dockerfile() {
        failures.push(e);
    }

    match failures.len() {
        0 => Ok(()),
        n => {
            let list: Vec<String> = failures.iter().map(|e| format!("  - {e:#}")).collect();
            bail!("{n} lint step(s) failed:\n{}", list.join("\n"))
        }
    }
}
