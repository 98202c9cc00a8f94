//! `cargo xtask build`.

use anyhow::Result;

use crate::cmd::{Cmd, step};

/// Builds the workspace. The eBPF crate is not built for the host: node-manager's build.rs
/// builds it for the BPF target with aya-build and embeds the object.
pub fn run(release: bool) -> Result<()> {
    step(format!(
        "build: cargo build ({} profile; node-manager's build.rs builds the eBPF object)",
        if release { "release" } else { "dev" }
    ));
    let mut cmd = Cmd::cargo().args(["build", "--workspace", "--exclude", "node-manager-ebpf"]);
    if release {
        cmd = cmd.arg("--release");
    }
    cmd.run()
}
