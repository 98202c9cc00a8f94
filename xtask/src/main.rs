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

use std::{process::ExitCode, time::Instant};

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
    /// The side-by-side benchmark (node-manager vs network-node-manager's iptables rules vs
    /// no rewrite, in the lab): writes BENCHMARKS.md and docs/bench/*.png. Needs root.
    Bench {
        /// A short run for CI (writes under target/bench-quick/; fails only on a broken
        /// measurement, never on a threshold).
        #[arg(long)]
        quick: bool,
    },
    /// Set up, build, and run the demo (not yet implemented).
    Demo,
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
