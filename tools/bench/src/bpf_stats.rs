//! The kernel's BPF run-time statistics around B's connection rounds: how often node-manager's
//! TC programs ran and for how long, so the report can say how much of a connection's time is
//! theirs. Statistics are on only while the `BPF_ENABLE_STATS` fd is open (no sysctl to
//! restore); the counters are read from `bpftool -j prog show` (`run_time_ns`, `run_cnt`).
use std::{
    os::fd::{FromRawFd as _, OwnedFd},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

/// Run-time statistics switched on until dropped.
pub struct Enabled(#[allow(dead_code)] OwnedFd);

/// Turns on the kernel's BPF run-time statistics (`BPF_ENABLE_STATS`, Linux ≥ 5.8).
pub fn enable() -> Result<Enabled> {
    const BPF_ENABLE_STATS: libc::c_long = 32;
    let mut attr = [0u8; 16]; // enable_stats.type = BPF_STATS_RUN_TIME (0)
    // SAFETY: bpf(2) with a zeroed attr of the size the command reads.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_ENABLE_STATS, attr.as_mut_ptr(), attr.len()) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("BPF_ENABLE_STATS");
    }
    // SAFETY: a new fd from the kernel, owned here.
    Ok(Enabled(unsafe { OwnedFd::from_raw_fd(fd as i32) }))
}

/// Total run time (ns) and runs of the programs named `nm_pod_*` (the TC programs).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Totals {
    pub run_time_ns: u64,
    pub runs: u64,
}

pub fn pod_programs() -> Result<Totals> {
    let out = Command::new("bpftool").args(["-j", "prog", "show"]).output().context("running bpftool prog show")?;
    if !out.status.success() {
        bail!("bpftool prog show: {}", String::from_utf8_lossy(&out.stderr));
    }
    let progs: serde_json::Value = serde_json::from_slice(&out.stdout).context("bpftool's JSON")?;
    let mut t = Totals::default();
    for p in progs.as_array().into_iter().flatten() {
        if p["name"].as_str().is_some_and(|n| n.starts_with("nm_pod_")) {
            t.run_time_ns += p["run_time_ns"].as_u64().unwrap_or(0);
            t.runs += p["run_cnt"].as_u64().unwrap_or(0);
        }
    }
    Ok(t)
}

/// What one B round cost in BPF: program runs and their time, per connection.
#[derive(Clone, Copy, Debug)]
pub struct PerConnection {
    pub runs: f64,
    pub ns: f64,
}

impl PerConnection {
    pub fn between(before: Totals, after: Totals, connections: u64) -> Option<PerConnection> {
        let (runs, ns) = (after.runs.checked_sub(before.runs)?, after.run_time_ns.checked_sub(before.run_time_ns)?);
        (connections > 0 && runs > 0)
            .then(|| PerConnection { runs: runs as f64 / connections as f64, ns: ns as f64 / connections as f64 })
    }
}
