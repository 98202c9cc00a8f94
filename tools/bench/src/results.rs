//! What one run measured, and the plan it followed.

use std::{collections::BTreeMap, time::Duration};

use crate::{
    agent::{Change, Start},
    baseline::{Backend, PerRule},
    machine::Machine,
    prog_cost::ProgCost,
    services::Family,
    stats::{Summary, Unit, ratios},
};

/// The three sides: A (network-node-manager's rules, per iptables backend), B (node-manager),
/// C (the floor: the pod talks to the cluster IP directly, nothing rewritten); and C′, the
/// floor with masquerading, which A and B do (KUBE-MARK-MASQ) and C does not: B/C′ is the
/// cost of the eBPF rewrite alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Variant {
    C,
    CMasq,
    A(Backend),
    /// A′: one nftables set and map (`nftmap.rs`), the O(1) peer.
    NftMap,
    B,
}

impl Variant {
    pub const ALL: [Variant; 6] = [
        Variant::C,
        Variant::CMasq,
        Variant::A(Backend::Legacy),
        Variant::A(Backend::Nft),
        Variant::NftMap,
        Variant::B,
    ];

    /// The sides whose pod → cluster IP connections are measured besides C's own: a cluster
    /// IP needs no rewrite, but every new connection still passes A's chain or B's programs.
    pub const TO_CLUSTER: [Variant; 4] =
        [Variant::A(Backend::Legacy), Variant::A(Backend::Nft), Variant::NftMap, Variant::B];

    /// The sides of the host-network client table (a node process → EXT:port): C′ is left out,
    /// nothing masquerades a node process's connection to a cluster IP.
    pub const HOST: [Variant; 5] =
        [Variant::C, Variant::A(Backend::Legacy), Variant::A(Backend::Nft), Variant::NftMap, Variant::B];

    /// The sides whose pod → EXT:port connections are also measured on IPv6 (network-node-manager
    /// writes IPv4 rules only; its IPv6 would be ip6tables, not part of this comparison).
    pub const V6: [Variant; 4] = [Variant::C, Variant::CMasq, Variant::NftMap, Variant::B];

    /// The families this side's pod → EXT:port connections are measured in.
    pub fn families(self) -> &'static [Family] {
        if Variant::V6.contains(&self) { &Family::ALL } else { &[Family::V4] }
    }

    pub fn label(self) -> &'static str {
        match self {
            Variant::C => "C: no rewrite",
            Variant::CMasq => "C′: no rewrite, masqueraded",
            Variant::A(Backend::Legacy) => "A: nnm, iptables-legacy",
            Variant::A(Backend::Nft) => "A: nnm, iptables-nft",
            Variant::NftMap => "A′: nftables set + map",
            Variant::B => "B: node-manager",
        }
    }
}

/// The sizes, durations and repetitions of a run.
#[derive(Clone, Debug)]
pub struct Plan {
    pub quick: bool,
    /// N for the side-by-side figures.
    pub ns: Vec<usize>,
    /// Further N for node-manager alone (apply, memory, per-packet cost).
    pub map_only: Vec<usize>,
    /// Rounds of the connection loop (every side once per round).
    pub rounds: usize,
    pub conn_time: Duration,
    /// Rounds of iperf3 (every side once per round).
    pub iperf_rounds: usize,
    pub iperf_secs: u32,
    pub iperf_omit: u32,
    pub per_rule_budget: Duration,
    pub apply_rounds: usize,
    pub agent_changes: usize,
    pub iptables_changes: usize,
    pub prog_repeat: u32,
    pub prog_rounds: usize,
}

impl Plan {
    pub fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                quick,
                ns: vec![1, 1_000],
                map_only: vec![10_000],
                rounds: 2,
                conn_time: Duration::from_millis(500),
                iperf_rounds: 2,
                iperf_secs: 1,
                iperf_omit: 0,
                per_rule_budget: Duration::from_secs(3),
                apply_rounds: 2,
                agent_changes: 5,
                iptables_changes: 2,
                prog_repeat: 20_000,
                prog_rounds: 3,
            }
        } else {
            Plan {
                quick,
                ns: vec![1, 1_000, 10_000],
                map_only: vec![100_000],
                // Many short rounds rather than a few long ones: each round compares the sides
                // within a few seconds of each other, before the machine's load changes much.
                rounds: 15,
                conn_time: Duration::from_secs(1),
                iperf_rounds: 7,
                iperf_secs: 2,
                iperf_omit: 1,
                per_rule_budget: Duration::from_secs(60),
                apply_rounds: 5,
                agent_changes: 20,
                iptables_changes: 3,
                prog_repeat: 1_000_000,
                prog_rounds: 7,
            }
        }
    }

    /// Fillers numbered below this are created through the API; node-manager-only phases
    /// beyond the side-by-side N write the rest straight to etcd (see [`crate::etcd_fill`]: the
    /// apiserver's own creates cost O(N) each).
    pub fn api_fillers(&self) -> usize {
        self.ns.iter().copied().max().unwrap_or(1).max(1)
    }

    /// Every N the agent and the per-packet cost are measured at.
    pub fn all_ns(&self) -> Vec<usize> {
        self.ns.iter().chain(&self.map_only).copied().collect()
    }
}

/// One round of the connection loop.
#[derive(Clone, Copy, Debug)]
pub struct ConnSample {
    pub rate: f64,
    pub median_us: f64,
    pub p99_us: f64,
    pub connections: u64,
    /// Failed connects (a run with more than a thousandth is an error).
    pub errors: u64,
}

impl ConnSample {
    pub fn of(run: &crate::conn::ConnRun) -> ConnSample {
        ConnSample {
            rate: run.rate(),
            median_us: run.median_us(),
            p99_us: run.p99_us(),
            connections: run.connections,
            errors: run.errors,
        }
    }
}

#[derive(Default)]
pub struct Results {
    pub machine: Machine,
    /// (N, variant) → one sample per round, rounds in order.
    pub conn: BTreeMap<(usize, Variant), Vec<ConnSample>>,
    /// (N, variant) → one sample per round of pod → cluster IP connections, for the sides in
    /// [`Variant::TO_CLUSTER`] (C's are in `conn`), measured right after the side's own run.
    pub conn_cluster: BTreeMap<(usize, Variant), Vec<ConnSample>>,
    /// (N, variant) → one sample per round of node process → EXT:port connections (the
    /// cluster IP for C), for the sides in [`Variant::HOST`].
    pub conn_host: BTreeMap<(usize, Variant), Vec<ConnSample>>,
    /// (N, variant) → one sample per round of pod → EXT:port connections over IPv6 (the
    /// cluster IPv6 address for C and C′), for the sides in [`Variant::V6`], measured right
    /// after the side's IPv4 run.
    pub conn_v6: BTreeMap<(usize, Variant), Vec<ConnSample>>,
    /// (N, variant) → bit/s per round.
    pub iperf: BTreeMap<(usize, Variant), Vec<f64>>,
    /// N → one sample per round of pod → EXT:port connections from a pod process below B's
    /// hooked cgroup (the DaemonSet's default: every pod's processes are below the cgroup root
    /// it hooks), served at `connect()` by the socket hook; measured right after B's own run.
    pub conn_socket: BTreeMap<usize, Vec<ConnSample>>,
    /// N → bit/s per round of the same pod's iperf3 stream from below B's hooked cgroup.
    pub iperf_socket: BTreeMap<usize, Vec<f64>>,
    /// N → packets the pod ingress program rewrote while the pod ran below the hooked cgroup
    /// (0 when those connections took the socket path only).
    pub socket_tc_rewrites: BTreeMap<usize, u64>,
    pub restore_apply: BTreeMap<(usize, Backend), Vec<Duration>>,
    pub per_rule_apply: BTreeMap<(usize, Backend), PerRule>,
    pub agent_start: BTreeMap<usize, Vec<Start>>,
    pub restore_change: BTreeMap<(usize, Backend), Vec<Duration>>,
    pub per_rule_change: BTreeMap<(usize, Backend), Vec<Duration>>,
    pub agent_change: BTreeMap<usize, Vec<Change>>,
    /// N → per B round: node-manager's TC program runs and their time per connection (the
    /// kernel's BPF run-time statistics).
    pub bpf: BTreeMap<usize, Vec<crate::bpf_stats::PerConnection>>,
    /// N → per B stream (iperf3) round: the TC programs' runs, time per run and CPU share.
    pub bpf_stream: BTreeMap<usize, Vec<crate::bpf_stats::StreamShare>>,
    /// A′: `nft -f` of the whole table, and one `add element` transaction, per N and family.
    pub nft_apply: BTreeMap<(usize, Family), Vec<Duration>>,
    pub nft_change: BTreeMap<(usize, Family), Vec<Duration>>,
    pub prog: BTreeMap<usize, ProgCost>,
    /// Evidence that each side's traffic took the path it claims, one line each.
    pub path_checks: Vec<String>,
}

impl Results {
    /// Pod → EXT:port connection samples of `family` (IPv4 in `conn`, IPv6 in `conn_v6`).
    pub fn pod_samples(&self, family: Family) -> &BTreeMap<(usize, Variant), Vec<ConnSample>> {
        match family {
            Family::V4 => &self.conn,
            Family::V6 => &self.conn_v6,
        }
    }

    pub fn pod_samples_mut(&mut self, family: Family) -> &mut BTreeMap<(usize, Variant), Vec<ConnSample>> {
        match family {
            Family::V4 => &mut self.conn,
            Family::V6 => &mut self.conn_v6,
        }
    }

    pub fn conn_rates(&self, n: usize, v: Variant) -> Vec<f64> {
        self.conn.get(&(n, v)).map(|s| s.iter().map(|c| c.rate).collect()).unwrap_or_default()
    }

    pub fn conn_summary(&self, n: usize, v: Variant, f: impl Fn(&ConnSample) -> f64) -> Option<Summary> {
        Summary::of(&self.conn.get(&(n, v))?.iter().map(f).collect::<Vec<_>>())
    }

    /// Pod → cluster IP connection samples: C's own runs, or those measured in `v`'s lab.
    pub fn cluster_samples(&self, n: usize, v: Variant) -> Option<&Vec<ConnSample>> {
        if v == Variant::C { self.conn.get(&(n, v)) } else { self.conn_cluster.get(&(n, v)) }
    }

    pub fn cluster_summary(&self, n: usize, v: Variant, f: impl Fn(&ConnSample) -> f64) -> Option<Summary> {
        summary_of(self.cluster_samples(n, v), f)
    }

    /// Per-round ratio of pod → cluster IP connections per second in `a`'s lab to `b`'s.
    pub fn cluster_ratio(&self, n: usize, a: Variant, b: Variant) -> Option<Summary> {
        rate_ratio(self.cluster_samples(n, a), self.cluster_samples(n, b))
    }

    pub fn host_summary(&self, n: usize, v: Variant, f: impl Fn(&ConnSample) -> f64) -> Option<Summary> {
        summary_of(self.conn_host.get(&(n, v)), f)
    }

    /// Per-round ratio of host-client connections per second of `a` to `b`.
    pub fn host_ratio(&self, n: usize, a: Variant, b: Variant) -> Option<Summary> {
        rate_ratio(self.conn_host.get(&(n, a)), self.conn_host.get(&(n, b)))
    }

    pub fn socket_summary(&self, n: usize, f: impl Fn(&ConnSample) -> f64) -> Option<Summary> {
        summary_of(self.conn_socket.get(&n), f)
    }

    /// Per-round ratio of the socket-served pod's connections per second to `b`'s pod →
    /// EXT:port (C and C′: → the cluster IP) in the same round.
    pub fn socket_ratio(&self, n: usize, b: Variant) -> Option<Summary> {
        rate_ratio(self.conn_socket.get(&n), self.conn.get(&(n, b)))
    }

    pub fn socket_iperf_gbit(&self, n: usize) -> Vec<f64> {
        self.iperf_socket.get(&n).map(|s| s.iter().map(|b| b / 1e9).collect()).unwrap_or_default()
    }

    /// Per-round ratio of the socket-served pod's stream to `b`'s.
    pub fn socket_iperf_ratio(&self, n: usize, b: Variant) -> Option<Summary> {
        Summary::of(&ratios(&self.socket_iperf_gbit(n), &self.iperf_gbit(n, b)))
    }

    pub fn v6_summary(&self, n: usize, v: Variant, f: impl Fn(&ConnSample) -> f64) -> Option<Summary> {
        summary_of(self.conn_v6.get(&(n, v)), f)
    }

    /// Per-round ratio of IPv6 pod connections per second of `a` to `b`.
    pub fn v6_ratio(&self, n: usize, a: Variant, b: Variant) -> Option<Summary> {
        rate_ratio(self.conn_v6.get(&(n, a)), self.conn_v6.get(&(n, b)))
    }

    pub fn iperf_gbit(&self, n: usize, v: Variant) -> Vec<f64> {
        self.iperf.get(&(n, v)).map(|s| s.iter().map(|b| b / 1e9).collect()).unwrap_or_default()
    }

    /// Per-round ratio of `a` to `b` (same round, back to back) of connections per second.
    pub fn conn_ratio(&self, n: usize, a: Variant, b: Variant) -> Option<Summary> {
        Summary::of(&ratios(&self.conn_rates(n, a), &self.conn_rates(n, b)))
    }

    /// Per-round ratio of `a`'s median connect time to `b`'s.
    pub fn latency_ratio(&self, n: usize, a: Variant, b: Variant) -> Option<Summary> {
        let medians = |v| -> Vec<f64> {
            self.conn.get(&(n, v)).map(|s| s.iter().map(|c| c.median_us).collect()).unwrap_or_default()
        };
        Summary::of(&ratios(&medians(a), &medians(b)))
    }

    pub fn iperf_ratio(&self, n: usize, a: Variant, b: Variant) -> Option<Summary> {
        Summary::of(&ratios(&self.iperf_gbit(n, a), &self.iperf_gbit(n, b)))
    }

    pub fn agent_start_summary(&self, n: usize, f: impl Fn(&Start) -> Duration, unit: Unit) -> Option<Summary> {
        Summary::of_durations(&self.agent_start.get(&n)?.iter().map(f).collect::<Vec<_>>(), unit)
    }

    pub fn agent_change_summary(&self, n: usize, f: impl Fn(&Change) -> Duration, unit: Unit) -> Option<Summary> {
        Summary::of_durations(&self.agent_change.get(&n)?.iter().map(f).collect::<Vec<_>>(), unit)
    }

    pub fn rss_mib(&self, n: usize) -> Option<Summary> {
        Summary::of(&self.agent_start.get(&n)?.iter().map(|s| s.rss_kib as f64 / 1024.0).collect::<Vec<_>>())
    }
}

fn summary_of(samples: Option<&Vec<ConnSample>>, f: impl Fn(&ConnSample) -> f64) -> Option<Summary> {
    Summary::of(&samples?.iter().map(f).collect::<Vec<_>>())
}

/// Per-round ratio of `a`'s connections per second to `b`'s (rounds in order, back to back).
fn rate_ratio(a: Option<&Vec<ConnSample>>, b: Option<&Vec<ConnSample>>) -> Option<Summary> {
    let rates =
        |s: Option<&Vec<ConnSample>>| -> Vec<f64> { s.map(|s| s.iter().map(|c| c.rate).collect()).unwrap_or_default() };
    Summary::of(&ratios(&rates(a), &rates(b)))
}
