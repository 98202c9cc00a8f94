//! `cargo xtask bench`: node-manager (B) side by side with network-node-manager's iptables
//! rules (A, iptables-legacy and iptables-nft) and with no rewrite (C), in the lab, at several
//! numbers of Services; writes BENCHMARKS.md and PNG charts. Needs root.
//!
//! Fails only on a broken measurement (a figure missing or nonsensical), never on how fast
//! anything was: the machines it runs on are shared and noisy.

mod agent;
mod baseline;
mod bed;
mod bpf_stats;
mod conn;
mod etcd_fill;
mod host;
mod interrupt;
mod iperf;
mod machine;
mod nftmap;
mod plot;
mod prog_cost;
mod report;
mod results;
mod sanity;
mod services;
mod stats;

use std::{path::PathBuf, process::ExitCode, time::Instant};

use anyhow::{Context as _, Result, bail};
use clap::Parser;

#[derive(Parser)]
#[command(name = "bench", about = "node-manager vs network-node-manager's iptables rules vs no rewrite, in the lab")]
struct Args {
    /// Small N, short runs, few rounds (the CI smoke run).
    #[arg(long)]
    quick: bool,
    /// Directory for BENCHMARKS.md (charts go to <out>/docs/bench/).
    #[arg(long)]
    out: PathBuf,
    /// The node-manager binary to run as the agent (a release build).
    #[arg(long)]
    node_manager: PathBuf,
    /// The command to name in the report as the one that produced it.
    #[arg(long, default_value = "bench")]
    command: String,
    /// Override the N of the side-by-side figures (comma-separated).
    #[arg(long, value_delimiter = ',')]
    ns: Option<Vec<usize>>,
    /// Override the N measured for node-manager alone (comma-separated; empty for none).
    #[arg(long, value_delimiter = ',')]
    map_only: Option<Vec<usize>>,
    /// Measure only the per-packet cost (no labs, no report): for comparing eBPF builds.
    #[arg(long)]
    per_packet_only: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    interrupt::install();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the benchmark builds network namespaces and loads BPF programs: run it as root");
    }
    if !args.node_manager.is_file() {
        bail!("{}: no such file; build it with `cargo build --release -p node-manager`", args.node_manager.display());
    }
    let started = Instant::now();
    let mut plan = results::Plan::new(args.quick);
    if let Some(ns) = &args.ns {
        plan.ns = ns.clone();
    }
    if let Some(ns) = &args.map_only {
        plan.map_only = ns.clone();
    }
    if plan.all_ns().contains(&0) {
        bail!("N must be at least 1 (the target Service)");
    }
    let mut r = results::Results { machine: machine::Machine::probe(), ..Default::default() };
    println!("bench: {plan:?}");

    println!("\nper-packet cost (BPF_PROG_TEST_RUN)");
    r.prog = prog_cost::measure_all(&plan.all_ns(), plan.prog_repeat, plan.prog_rounds)?;
    for (n, c) in &r.prog {
        println!(
            "  {n:>7} frontends: hit {:.1} ns, miss {:.1} ns, empty program {:.1} ns, not a pod {:.1} ns",
            c.hit.median, c.miss.median, c.empty.median, c.not_pod.median
        );
    }

    if args.per_packet_only {
        return Ok(());
    }
    {
        let labs = bed::Labs::new().context("building the labs")?;
        let mut bed = bed::Bed::new(&labs, &args.node_manager)?;
        for &n in &plan.ns {
            bed.measure(n, &plan, &mut r)?;
        }
        for &n in &plan.map_only {
            bed.measure_agent_only(n, &plan, &mut r)?;
        }
    }
    r.machine.load_after = machine::loadavg();

    let meta = report::Meta { command: &args.command, took: started.elapsed() };
    report::write(&args.out, &plan, &r, &meta)?;
    let problems = sanity::problems(&plan, &r);
    if !problems.is_empty() {
        bail!("broken measurement:\n  {}", problems.join("\n  "));
    }
    println!("bench: every figure measured and sane ({:.0} s)", started.elapsed().as_secs_f64());
    Ok(())
}
