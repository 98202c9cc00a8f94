//! `cargo xtask bench`: node-manager's benchmark examples that exist, in release builds.
//! `bench_kubernetes` runs the agent binary, which is built first and passed to it.

use anyhow::Result;

use crate::cmd::{Cmd, step, workspace_root};

const EXAMPLES: [&str; 2] = ["bench_datapath", "bench_kubernetes"];

pub fn run(quick: bool) -> Result<()> {
    let examples: Vec<&str> = EXAMPLES
        .into_iter()
        .filter(|e| workspace_root().join(format!("node-manager/examples/{e}.rs")).is_file())
        .collect();
    if examples.is_empty() {
        println!("bench: no benchmarks yet");
        return Ok(());
    }
    Cmd::cargo().args(["build", "--release", "-p", "node-manager", "--bin", "node-manager"]).run()?;
    let bin = workspace_root().join("target/release/node-manager");
    for example in examples {
        step(format!("bench: {example}{} (release build)", if quick { " --quick" } else { "" }));
        let mut cmd = Cmd::cargo()
            .args(["run", "--release", "-p", "node-manager", "--example", example, "--"])
            .env("NODE_MANAGER_BIN", &bin);
        if quick {
            cmd = cmd.arg("--quick");
        }
        cmd.run()?;
    }
    Ok(())
}
