//! `cargo xtask demo`: installs what is missing (`cargo xtask setup`), builds the agent and the
//! demo with cargo's own progress, and runs the demo (the `demo` crate's `node-manager-demo`).
//! `--yes`, or CI=true, runs it without pauses; `--kube-proxy MODE` builds (or reuses) the real
//! Kubernetes components first and runs the story on them. Ctrl-C reaches the demo, which removes what it
//! made and exits 130; this process waits for it meanwhile.

use std::{path::PathBuf, time::Instant};

use anyhow::{Result, bail};

use crate::cmd::{Cmd, elapsed, is_root, step, workspace_root};

/// The demo's exit code after Ctrl-C (`demo::EXIT_INTERRUPTED`).
const EXIT_INTERRUPTED: i32 = 130;

pub fn run(yes: bool, kube_proxy: Option<&str>) -> Result<()> {
    if !is_root() {
        bail!(
            "the demo needs root: it creates network namespaces and a cgroup and loads BPF programs; \
             run `cargo xtask demo` as root"
        );
    }
    step("demo 1/3: setup (installs what is missing; nothing when everything is present)");
    crate::setup::run()?;

    step(
        "demo 2/3: building the workspace (the first build takes several minutes: it also compiles the eBPF programs)",
    );
    let started = Instant::now();
    crate::build::run(false)?;
    println!("    built in {}", elapsed(started));

    let kube_bin = match kube_proxy {
        Some(_) => {
            step("demo: the real Kubernetes components (`cargo xtask kube`: built once, then reused)");
            Some(crate::kube::ensure()?.bin)
        }
        None => None,
    };

    step("demo 3/3: running the demo");
    let bin = target_dir().join("debug");
    let mut demo = Cmd::new(bin.join("node-manager-demo").display().to_string())
        .arg("--agent")
        .arg(bin.join("node-manager").display().to_string());
    if yes {
        demo = demo.arg("--yes");
    }
    if let (Some(mode), Some(bin)) = (kube_proxy, kube_bin) {
        demo = demo.arg("--kube-proxy").arg(mode).arg("--kube-bin").arg(bin.display().to_string());
    }
    let status = {
        let _waiting = SigintDeferred::install();
        demo.status()?
    };
    match status.code() {
        Some(0) => Ok(()),
        Some(EXIT_INTERRUPTED) => bail!("interrupted; the demo removed what it made (see its last lines)"),
        _ => bail!("the demo ended with {status}: see its output above"),
    }
}

/// cargo's target directory: CARGO_TARGET_DIR, else `target/` in the workspace.
fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => workspace_root().join("target"),
    }
}

/// While alive, SIGINT does nothing to this process (a no-op handler, not SIG_IGN, so that the
/// demo does not inherit an ignored SIGINT): the terminal's Ctrl-C goes to the demo as well,
/// and this process must wait for its cleanup instead of returning to the shell mid-way.
struct SigintDeferred;

extern "C" fn ignore_signal(_: libc::c_int) {}

impl SigintDeferred {
    fn install() -> SigintDeferred {
        // SAFETY: a zeroed sigaction with a handler that does nothing.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = ignore_signal as *const () as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(libc::SIGINT, &action, std::ptr::null_mut());
        }
        SigintDeferred
    }
}

impl Drop for SigintDeferred {
    fn drop(&mut self) {
        // SAFETY: restores the default disposition.
        unsafe { libc::signal(libc::SIGINT, libc::SIG_DFL) };
    }
}
