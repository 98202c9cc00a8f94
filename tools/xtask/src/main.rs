//! `cargo xtask`: the project's developer and CI commands.
//!
//! `cargo xtask test` is the project's test command (and what `.ci/run` calls after `setup`).
//! Each subcommand prints `==> ...` progress lines and every command it runs (`    $ ...`).

mod bench;
mod build;
mod cmd;
mod cross;
mod demo;
#[cfg(test)]
mod dockerfile;
mod ebpf_object;
mod hadolint;
mod kube;
mod lint;
mod setup;
mod test;
mod toolchain;
mod vm;

use std::{path::PathBuf, process::ExitCode, time::Instant};

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", bin_name = "cargo xtask", about = "node-manager's build, lint, test and setup tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need (Debian packages, the bpf-debian toolchain,
    /// bpf-linker, clippy and rustfmt); checks first, so a second run installs nothing.
    Setup,
    /// Build the workspace (node-manager's build.rs builds the eBPF object).
    Build {
        /// Build with the release profile.
        #[arg(long)]
        release: bool,
    },
    /// Build the eBPF object once (host build) and copy it to PATH, for `cross --ebpf-object`
    /// and the Dockerfile: the object is the same for every little-endian architecture.
    EbpfObject {
        /// Where to put the object.
        #[arg(long, value_name = "PATH")]
        out: PathBuf,
    },
    /// Build node-manager for another architecture (default arm64) with Debian's compiler,
    /// `-Z build-std` and Debian's cross gcc; `--check` runs it under qemu-user.
    Cross(cross::CrossArgs),
    /// rustfmt check, clippy on the host crates and on the eBPF crate, hadolint on the Dockerfile.
    Lint,
    /// The project's test command: setup, lint, all tests (as root, one at a time), bench
    /// smoke, and a check that no test left namespaces or pinned BPF objects behind.
    Test(test::TestArgs),
    /// The side-by-side benchmark (node-manager vs network-node-manager's iptables rules vs
    /// no rewrite, in the lab): writes BENCHMARKS.md and docs/bench/*.png. Needs root.
    Bench {
        /// A short run for CI (writes under target/bench-quick/; fails only on a broken
        /// measurement, never on a threshold).
        #[arg(long)]
        quick: bool,
    },
    /// The demo: set up, build, and show both Kubernetes bugs failing without the agent and
    /// fixed with it, in a node built from network namespaces; cleans up (also on Ctrl-C).
    Demo {
        /// Do not pause between steps (also implied by CI=true or a stdin that is not a terminal).
        #[arg(long, short = 'y')]
        yes: bool,
        /// Run it on the real Kubernetes components (kube-apiserver, etcd, kube-proxy in this mode),
        /// built first by `cargo xtask kube` (several minutes once, then cached).
        #[arg(long, value_name = "MODE", value_parser = ["nftables", "iptables"])]
        kube_proxy: Option<String>,
    },
    /// Build the lab's real Kubernetes (kube-apiserver, kube-proxy, kubectl, kube-controller-manager
    /// at one pinned version, etcd at one pinned version) from their Go modules into target/kube/;
    /// rebuilt only when a pin changes. `--check` validates deploy/ against a loopback apiserver.
    Kube {
        /// Also start etcd and kube-apiserver on 127.0.0.1 and `kubectl apply --dry-run=server`
        /// deploy/'s manifests against them (stopped and removed afterwards).
        #[arg(long)]
        check: bool,
    },
    /// The kernel matrix: boot Debian's 5.10, 6.1, 6.12 or newest kernel under QEMU (TCG) and
    /// run the kernel-facing tests inside; `--matrix` runs them all and prints the table.
    Vm(vm::VmArgs),
    /// Inside a guest: the test runner its /init starts (not for direct use).
    #[command(hide = true)]
    VmGuest {
        #[arg(long)]
        plan: PathBuf,
        /// Prepare the guest first (module autoloader, loopback).
        #[arg(long)]
        init: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let started = Instant::now();
    let (name, result) = match cli.task {
        Task::Setup => ("setup", setup::run()),
        Task::Build { release } => ("build", build::run(release)),
        Task::EbpfObject { out } => ("ebpf-object", ebpf_object::run(&out)),
        Task::Cross(args) => ("cross", cross::run(&args)),
        Task::Lint => ("lint", lint::run()),
        Task::Test(args) => ("test", test::run(&args)),
        Task::Bench { quick } => ("bench", bench::run(quick)),
        Task::Demo { yes, kube_proxy } => ("demo", demo::run(yes, kube_proxy.as_deref())),
        Task::Kube { check } => ("kube", kube::run(check)),
        Task::Vm(args) => ("vm", vm::run(&args)),
        Task::VmGuest { plan, init } => ("vm-guest", vm::run_guest(&plan, init)),
    };
    let took = cmd::elapsed(started);
    match result {
        Ok(()) => {
            println!("==> xtask {name}: ok ({took})");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("==> xtask {name}: FAILED after {took}");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
