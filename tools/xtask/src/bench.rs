//! `cargo xtask bench [--quick]`: builds the agent and the `bench` crate in release and runs
//! the side-by-side benchmark (needs root). The full run writes `BENCHMARKS.md` and
//! `docs/bench/*.png` in the repository; `--quick` (the CI smoke run) writes them under
//! `target/bench-quick/` and checks only that every figure was measured and is sane. B's
//! Services come from the real kube-apiserver (`cargo xtask kube` builds it first if needed).

use anyhow::Result;

use crate::cmd::{Cmd, step, workspace_root};

pub fn run(quick: bool) -> Result<()> {
    // B is fed by the real kube-apiserver.
    let kube = crate::kube::ensure()?;
    step("bench: building the agent and the benchmark (release)");
    Cmd::cargo().args(["build", "--release", "-p", "node-manager", "-p", "bench", "--bins"]).run()?;
    let root = workspace_root();
    let out = if quick { root.join("target/bench-quick") } else { root.to_path_buf() };
    let command = if quick { "cargo xtask bench --quick" } else { "cargo xtask bench" };
    step(format!("bench: {command}"));
    let mut cmd = Cmd::new(root.join("target/release/bench").display().to_string())
        .arg("--out")
        .arg(out.display().to_string())
        .arg("--node-manager")
        .arg(root.join("target/release/node-manager").display().to_string())
        .args(["--command", command])
        .env("NM_KUBE_BIN", &kube.bin);
    if quick {
        cmd = cmd.arg("--quick");
    }
    cmd.run()
}
