//! `cargo xtask`: the project's developer and CI commands.
//!
//! `cargo xtask test` is the project's test command (and what `.ci/run` calls after `setup`).
//! Each subcommand prints `==> ...` progress lines and every command it runs (`    $ ...`).

mod bench;
mod build;
mod cmd;
mod demo;
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
    /// rustfmt check, clippy on the host crates and clippy on the eBPF crate.
    Lint,
    /// The project's test command: setup, lint, all tests (as root, one at a time), bench
    /// smoke, and a check that no test left namespaces or pinned BPF objects behind.
    Test(test::TestArgs),
    /// Run the datapath benchmark (node-manager's `bench_datapath` example) if there is one.
    Bench {
        /// A short run, for CI smoke testing.
        #[arg(long)]
        quick: bool,
    },
    /// Set up, build, and run the demo (not yet implemented).
    Demo,
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
        Task::Lint => ("lint", lint::run()),
        Task::Test(args) => ("test", test::run(&args)),
        Task::Bench { quick } => ("bench", bench::run(quick)),
        Task::Demo => ("demo", demo::run()),
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
