//! Baseline A: network-node-manager's iptables rules in a lab's node namespace, with either
//! iptables backend, applied its way (one `iptables` exec per rule, `-C` before `-A`) or the
//! fastest way iptables offers (`iptables-restore`).

use std::{
    path::PathBuf,
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use lab::{Lab, Ns};

use crate::{interrupt, services};

/// network-node-manager's flags on every invocation (`runIptables`: wait up to 5 s for the
/// xtables lock, polling every 100 ms).
const NNM_FLAGS: [&str; 4] = ["-w", "5", "-W", "100000"];

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Backend {
    Legacy,
    Nft,
}

impl Backend {
    pub const ALL: [Backend; 2] = [Backend::Legacy, Backend::Nft];

    pub fn iptables(self) -> &'static str {
        match self {
            Backend::Legacy => "iptables-legacy",
            Backend::Nft => "iptables-nft",
        }
    }

    fn restore(self) -> &'static str {
        match self {
            Backend::Legacy => "iptables-legacy-restore",
            Backend::Nft => "iptables-nft-restore",
        }
    }
}

/// How far applying Services one rule at a time got within its time budget.
#[derive(Clone, Debug)]
pub struct PerRule {
    /// Services applied (4 rules each, each checked with `-C` first).
    pub done: usize,
    /// Services asked for.
    pub of: usize,
    pub elapsed: Duration,
    /// Mean time per Service over the last tenth of those applied (at least one).
    pub per_service_at_end: Duration,
}

impl PerRule {
    pub fn completed(&self) -> bool {
        self.done == self.of
    }

    /// The measured time if all were applied; otherwise the elapsed time plus the remaining
    /// Services at the last measured pace: a lower bound, since each exec gets slower as
    /// the table grows.
    pub fn total_or_lower_bound(&self) -> Duration {
        self.elapsed + self.per_service_at_end * (self.of - self.done) as u32
    }
}

/// network-node-manager's rules in one lab's node namespace.
pub struct Baseline<'a> {
    lab: &'a Lab,
    pub backend: Backend,
    netns: PathBuf,
}

impl<'a> Baseline<'a> {
    pub fn new(lab: &'a Lab, backend: Backend) -> Baseline<'a> {
        Baseline { lab, backend, netns: lab.netns_path(Ns::Node) }
    }

    /// Runs `program args` in the node namespace (spawned from a thread inside it, so the
    /// time is that of the program alone, without an nsenter exec).
    fn exec(&self, program: &str, args: &[String], stdin: Option<&str>) -> Result<Output> {
        lab::in_netns(&self.netns, || {
            let mut child = Command::new(program)
                .args(args)
                .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .with_context(|| format!("running {program} (is the iptables package installed?)"))?;
            if let Some(text) = stdin {
                use std::io::Write as _;
                child.stdin.take().expect("piped").write_all(text.as_bytes())?;
            }
            Ok(child.wait_with_output()?)
        })
    }

    /// `iptables-restore` (`--noflush`: add to the table instead of replacing it); its time.
    pub fn restore(&self, table: &str, noflush: bool) -> Result<Duration> {
        let args: Vec<String> = if noflush { vec!["--noflush".into()] } else { Vec::new() };
        let started = Instant::now();
        let out = self.exec(self.backend.restore(), &args, Some(table))?;
        let took = started.elapsed();
        if !out.status.success() {
            bail!(
                "netns {}: {} failed ({}): {}",
                self.lab.ns_name(Ns::Node),
                self.backend.restore(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(took)
    }

    /// Empties the nat table (every rule and user chain).
    pub fn reset(&self) -> Result<()> {
        self.restore(services::EMPTY_NAT, false).map(drop)
    }

    /// From an empty table, network-node-manager's chains and every Service's rules in one
    /// `iptables-restore`; returns the time of that restore.
    pub fn load(&self, svcs: &[services::Svc]) -> Result<Duration> {
        self.reset()?;
        let table = services::full_ruleset(svcs);
        self.restore(&table, false)
    }

    /// network-node-manager's way for one Service: for each of its 4 rules, `iptables -C`
    /// and, when that says the rule is missing, `iptables -A`. Fails if a rule was present.
    pub fn apply_per_rule(&self, svc: &services::Svc) -> Result<()> {
        for (check, append) in svc.nnm_rules("-C").into_iter().zip(svc.nnm_rules("-A")) {
            let out = self.iptables(&check)?;
            if out.status.success() {
                bail!("rule already present: {}", check.join(" "));
            }
            let out = self.iptables(&append)?;
            if !out.status.success() {
                bail!(
                    "{} {} failed ({}): {}",
                    self.backend.iptables(),
                    append.join(" "),
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
        }
        Ok(())
    }

    fn iptables(&self, args: &[String]) -> Result<Output> {
        let mut full: Vec<String> = NNM_FLAGS.iter().map(|s| s.to_string()).collect();
        full.extend(["-t".into(), "nat".into()]);
        full.extend_from_slice(args);
        self.exec(self.backend.iptables(), &full, None)
    }

    /// From a table holding only network-node-manager's chains, applies `svcs` its way, one
    /// Service after another, until done or `budget` is spent (checked between Services).
    pub fn apply_all_per_rule(&self, svcs: &[services::Svc], budget: Duration) -> Result<PerRule> {
        self.reset()?;
        self.restore(&format!("{}COMMIT\n", services::base_ruleset()), false)?;
        let started = Instant::now();
        let mut ends = Vec::with_capacity(svcs.len());
        for svc in svcs {
            if started.elapsed() >= budget {
                break;
            }
            interrupt::check()?;
            self.apply_per_rule(svc)?;
            ends.push(started.elapsed());
        }
        let done = ends.len();
        let tail = (done / 10).max(1).min(done);
        let per_service_at_end = if done == 0 {
            Duration::ZERO
        } else {
            let from = if done > tail { ends[done - tail - 1] } else { Duration::ZERO };
            (ends[done - 1] - from) / tail as u32
        };
        Ok(PerRule { done, of: svcs.len(), elapsed: ends.last().copied().unwrap_or_default(), per_service_at_end })
    }

    /// New connections that entered network-node-manager's per-Service chain: the packet
    /// counter of the jump to it (the nat table sees the first packet of each connection only).
    pub fn chain_entries(&self) -> Result<u64> {
        let args: Vec<String> =
            ["-t", "nat", "-L", services::NM_PREROUTING, "1", "-v", "-x", "-n"].map(String::from).into();
        let out = self.exec(self.backend.iptables(), &args, None)?;
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() || !text.contains(services::EX_CLUS_PREROUTING) {
            bail!(
                "{}: rule 1 of {} is not the jump to {}: {}{}",
                self.backend.iptables(),
                services::NM_PREROUTING,
                services::EX_CLUS_PREROUTING,
                text.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        text.split_whitespace().next().and_then(|p| p.parse().ok()).context("no packet counter in the listing")
    }

    /// Packets counted by the DNAT rule of the target (the last-listed Service) in `chain`
    /// (`EX_CLUS_PREROUTING` for pods, `EX_CLUS_OUTPUT` for node processes), which shows that
    /// the connections went through these rules.
    pub fn target_dnat_packets(&self, n_services: usize, chain: &str) -> Result<u64> {
        // The target's rules are the last two of the chain: mark, then DNAT.
        let rulenum = (2 * n_services).to_string();
        let args: Vec<String> = ["-t", "nat", "-L", chain, &rulenum, "-v", "-x", "-n"].map(String::from).into();
        let out = self.exec(self.backend.iptables(), &args, None)?;
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() || !text.contains("DNAT") {
            bail!(
                "{}: rule {rulenum} of {chain} is not the target's DNAT: {}{}",
                self.backend.iptables(),
                text.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        text.split_whitespace().next().and_then(|p| p.parse().ok()).context("no packet counter in the listing")
    }
}
