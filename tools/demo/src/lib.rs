//! The node-manager demo: a Kubernetes node built from network namespaces (the `lab` crate)
//! shows kubernetes#75262 and #74839 failing without the agent and fixed with it, with the
//! packets counted, then removes everything it made (also on Ctrl-C).
//!
//! [`main`] is the whole program (the `node-manager-demo` binary only calls it), so a test can
//! run it in a child process. Besides the narration it prints one machine-readable line per
//! case: `verdict <case> <without-agent|with-agent|-> <OK|FAILED> <detail>`, and a final
//! `verdict cleanup - OK|FAILED ...`. Exit codes: 0 when every case came out as it should and
//! nothing was left behind, 1 otherwise or on error, 2 for bad arguments, 130 on Ctrl-C.
mod host;
mod interrupt;
mod real;
mod say;
mod stage;
mod stale;
mod story;

use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::{Context as _, Result, bail};
use clap::Parser as _;

pub use stage::{CGROUP_PREFIX, DIR_PREFIX};
pub use story::{HOST_CASE, POD_CASE, RESET_CASE};

/// Exit code after Ctrl-C (128 + SIGINT), as shells report it.
pub const EXIT_INTERRUPTED: u8 = 130;

#[derive(clap::Parser, Debug)]
#[command(
    name = "node-manager-demo",
    about = "Shows kubernetes#75262 and #74839 in a node built from network namespaces: failing without \
             node-manager, fixed with it. Needs root. Removes everything it made, also on Ctrl-C."
)]
struct Options {
    /// The node-manager binary to run as the agent [default: `node-manager` next to this program].
    #[arg(long, env = "NODE_MANAGER_BIN")]
    agent: Option<PathBuf>,
    /// Do not pause between steps. Also implied by CI=true or when stdin is not a terminal.
    #[arg(long, short = 'y')]
    yes: bool,
    /// Run the story on the real Kubernetes components: etcd, kube-apiserver and kube-proxy in
    /// this mode (built by `cargo xtask kube`), the Service from the apiserver, node-manager as
    /// deploy/node-manager.yaml runs it. Without it, the lab's stand-ins show the IPVS black
    /// hole of kube-proxy releases before kubernetes PR #97081.
    #[arg(long, value_name = "MODE", value_parser = ["nftables", "iptables"])]
    kube_proxy: Option<String>,
    /// Where the components are [default: the one target/kube/<version>/bin of the workspace].
    #[arg(long, env = "NM_KUBE_BIN", value_name = "DIR")]
    kube_bin: Option<PathBuf>,
}

/// Runs the demo with these command-line arguments (the first is the program name) and returns
/// the exit code.
pub fn main<I, T>(args: I) -> u8
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let opts = match Options::try_parse_from(args) {
        Ok(o) => o,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    match run(&opts) {
        Ok(true) => 0,
        Ok(false) => 1,
        // A Ctrl-C also reaches the demo's short-lived children (socat, say), so a step may fail
        // because of it rather than return `Interrupted`.
        Err(e) if e.downcast_ref::<interrupt::Interrupted>().is_some() || interrupt::requested() => {
            println!("==> demo interrupted; everything it made was removed (see above)");
            EXIT_INTERRUPTED
        }
        Err(e) => {
            println!("==> demo FAILED: {e:#}");
            1
        }
    }
}

fn run(opts: &Options) -> Result<bool> {
    let agent = agent_binary(opts.agent.clone())?;
    if !is_root() {
        bail!("the demo needs root: it creates network namespaces and a cgroup and loads BPF programs");
    }
    interrupt::install()?;
    let say = say::Say::new(opts.yes);
    let kube = kube(opts)?;
    let (verdicts, clean) = story::run(&agent, &kube, &say)?;

    println!();
    match &kube {
        story::Kube::StandIn => {
            println!("==> verdicts (expected: every case FAILED without node-manager and OK with it)")
        }
        story::Kube::Real { mode, .. } => println!(
            "==> verdicts (expected with kube-proxy {}: the LoadBalancer IP OK without node-manager and unchanged with \
             it; the pod's connection FAILED without node-manager and OK with it)",
            mode.name()
        ),
    }
    let mut as_expected = true;
    for v in &verdicts {
        let phase = if v.with_agent { "with-agent" } else { "without-agent" };
        println!("verdict {} {phase} {} {}", v.case, if v.ok { "OK" } else { "FAILED" }, v.detail);
        as_expected &= v.ok == v.expected;
    }
    let cleanup = if clean { "OK nothing left behind" } else { "FAILED something was left behind (see above)" };
    println!("verdict cleanup - {cleanup}");
    if as_expected && clean {
        match kube {
            story::Kube::StandIn => {
                println!("==> demo done: both bugs shown without node-manager and fixed with it; nothing left behind")
            }
            story::Kube::Real { .. } => println!(
                "==> demo done: the LoadBalancer IP served by kube-proxy and untouched by node-manager; the reset \
                 shown without node-manager and fixed with it; nothing left behind"
            ),
        }
        Ok(true)
    } else {
        println!("==> demo did NOT show what it should (see the verdicts above)");
        Ok(false)
    }
}

/// The stand-ins, or the real components of `--kube-proxy` (which must have been built).
fn kube(opts: &Options) -> Result<story::Kube> {
    let Some(mode) = &opts.kube_proxy else { return Ok(story::Kube::StandIn) };
    let mode = match mode.as_str() {
        "iptables" => lab::kube::ProxyMode::Iptables,
        _ => lab::kube::ProxyMode::Nftables,
    };
    let bin = match &opts.kube_bin {
        Some(dir) => dir.clone(),
        None => lab::kube::bin_dir().context("--kube-proxy needs the components: run `cargo xtask kube` first")?,
    };
    for component in ["etcd", "kube-apiserver", "kube-proxy", "kubectl"] {
        if !bin.join(component).is_file() {
            bail!(
                "{} does not exist: build the components with `cargo xtask kube` (`cargo xtask demo --kube-proxy {}` \
                 does it), or give --kube-bin DIR",
                bin.join(component).display(),
                mode.name()
            );
        }
    }
    Ok(story::Kube::Real { mode, bin })
}

/// `--agent`, else `node-manager` next to this program.
fn agent_binary(given: Option<PathBuf>) -> Result<PathBuf> {
    let path = match given {
        Some(p) => p,
        None => std::env::current_exe().context("locating this program")?.with_file_name("node-manager"),
    };
    if !path.is_file() {
        bail!(
            "the agent binary {} does not exist: build it (`cargo build -p node-manager`) or give --agent PATH \
             (`cargo xtask demo` does both)",
            path.display()
        );
    }
    Ok(path)
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
