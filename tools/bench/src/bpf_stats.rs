//! The kernel's BPF run-time statistics around B's connection and stream rounds: how often
//! node-manager's TC programs ran and for how long, so the report can say how much of a
//! connection's time, and of a stream's CPU, is theirs. Statistics are on only while the `BPF_ENABLE_STATS` fd is open (no sysctl to
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

/// What B's programs cost during one stream (iperf3): how often they ran, for how long each
/// time, and the share of one CPU that was.
#[derive(Clone, Copy, Debug)]
pub struct StreamShare {
    pub runs_per_s: f64,
    pub ns_per_run: f64,
    /// Program time / wall time of the stream.
    pub cpu: f64,
}

impl StreamShare {
    pub fn between(before: Totals, after: Totals, wall: std::time::Duration) -> Option<StreamShare> {
        let (runs, ns) = (after.runs.checked_sub(before.runs)?, after.run_time_ns.checked_sub(before.run_time_ns)?);
        let secs = wall.as_secs_f64();
        (runs > 0 && secs > 0.0).then(|| StreamShare {
            runs_per_s: runs as f64 / secs,
            ns_per_run: ns as f64 / runs as f64,
            cpu: ns as f64 / 1e9 / secs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_are_per_run_and_per_second_of_wall_time() {
        let before = Totals { run_time_ns: 1_000, runs: 10 };
        let after = Totals { run_time_ns: 50_001_000, runs: 100_010 };
        let s = StreamShare::between(before, after, std::time::Duration::from_secs(2)).unwrap();
        assert_eq!((s.runs_per_s, s.ns_per_run), (50_000.0, 500.0));
        assert!((s.cpu - 0.025).abs() < 1e-12);
        assert!(StreamShare::between(after, before, std::time::Duration::from_secs(2)).is_none(), "counters went back");
        assert!(StreamShare::between(before, before, std::time::Duration::from_secs(2)).is_none(), "no run");
        let c = PerConnection::between(before, after, 1_000).unwrap();
        assert_eq!((c.runs, c.ns), (100.0, 50_000.0));
    }
}
