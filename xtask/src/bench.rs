//! `cargo xtask bench`: the datapath benchmark, once node-manager has one.

use anyhow::Result;

use crate::cmd::{Cmd, step, workspace_root};

const EXAMPLE: &str = "bench_datapath";

pub fn run(quick: bool) -> Result<()> {
    let source = workspace_root().join(format!("node-manager/examples/{EXAMPLE}.rs"));
    if !source.is_file() {
        println!("bench: no benchmarks yet");
        return Ok(());
    }
    step(format!("bench: {EXAMPLE}{} (release build)", if quick { " --quick" } else { "" }));
    let mut cmd = Cmd::cargo().args(["run", "--release", "-p", "node-manager", "--example", EXAMPLE, "--"]);
    if quick {
        cmd = cmd.arg("--quick");
    }
    cmd.run()
}
