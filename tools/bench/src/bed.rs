//! The test bed: one identical lab per side, so no side's rules or programs are in another's
//! path, and the measurements at one N, interleaved round by round.
//!
//! The labs are IPVS-like for the benchmark's ports: kube-proxy IPVS keeps its own connection
//! table and leaves netfilter's NAT to others, so nothing in netfilter translates the cluster
//! IP. There is no IPVS module here, so the node routes the cluster IP to the endpoint, which
//! holds it (the way IPVS's direct-routing mode delivers). Every side therefore pays the same
//! path to the endpoint — conntrack, forwarding, masquerading where marked — and differs only
//! in how the external IP becomes the cluster IP: A's DNAT after walking its chain, B's TC
//! rewrite, C not at all. The endpoint namespace runs a connection sink per family measured
//! there and an iperf3 server. The sides in [`Variant::V6`] are measured on IPv6 too, with the
//! lab's IPv6 addresses, in the same rounds.
//! (The lab's own nftables DNAT stays on its test port 8080, which the benchmark does not use.)

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use lab::{Lab, Ns};

use crate::{
    agent::AgentSide,
    baseline::{Backend, Baseline},
    bpf_stats,
    conn::{self, Sink},
    host::{InCgroup, PlainCgroup},
    interrupt,
    iperf::{self, IperfServer},
    nftmap::NftMap,
    report::int,
    results::{ConnSample, Plan, Results, Variant},
    services::{self, CONN_PORT, EX_CLUS_OUTPUT, EX_CLUS_PREROUTING, Family, IPERF_PORT},
};

/// The servers of one lab's endpoint: a connection sink per family, and iperf3.
struct Servers {
    sinks: BTreeMap<Family, Sink>,
    _iperf: IperfServer,
}

/// One lab per side, with its servers.
pub struct Labs {
    // Servers before labs: they stop before their namespaces go.
    servers: BTreeMap<Variant, Servers>,
    labs: BTreeMap<Variant, Lab>,
}

impl Labs {
    pub fn new() -> Result<Labs> {
        let mut labs = BTreeMap::new();
        let mut servers = BTreeMap::new();
        for v in Variant::ALL {
            let lab = Lab::new().with_context(|| format!("building the lab for {}", v.label()))?;
            let ep = lab.netns_path(Ns::Ep);
            let mut sinks = BTreeMap::new();
            for &family in v.families() {
                let (cluster, _) = services::target().addrs(family);
                // No DNAT for the benchmark's ports: the node already routes the cluster
                // ranges to the endpoint; binding the cluster IP there (a host address) makes it
                // the destination itself.
                let out =
                    lab.command(Ns::Ep, "ip").args(["addr", "add", &cluster.to_string(), "dev", "lo"]).output()?;
                anyhow::ensure!(out.status.success(), "binding the cluster IP {cluster} at the endpoint: {out:?}");
                if v == Variant::CMasq {
                    // kube-proxy's KUBE-MARK-MASQ for every connection to the cluster IP, before its DNAT.
                    let rule = format!("{} daddr {cluster} meta mark set meta mark | 0x4000", family.nft());
                    let out = lab
                        .command(Ns::Node, "nft")
                        .args(["insert", "rule", "inet", lab::NFT_TABLE, "services"])
                        .args(rule.split(' '))
                        .output()?;
                    anyhow::ensure!(
                        out.status.success(),
                        "adding the masquerade mark for C′ ({}): {out:?}",
                        family.label()
                    );
                }
                let any: IpAddr = match family {
                    Family::V4 => Ipv4Addr::UNSPECIFIED.into(),
                    Family::V6 => Ipv6Addr::UNSPECIFIED.into(),
                };
                sinks.insert(family, Sink::start(&ep, SocketAddr::new(any, CONN_PORT))?);
            }
            servers.insert(v, Servers { sinks, _iperf: IperfServer::start(&ep, IPERF_PORT)? });
            labs.insert(v, lab);
        }
        Ok(Labs { servers, labs })
    }

    fn get(&self, v: Variant) -> &Lab {
        &self.labs[&v]
    }

    /// Connections of `family` the sink of `v`'s lab has accepted so far.
    fn accepted(&self, v: Variant, family: Family) -> u64 {
        self.servers[&v].sinks.get(&family).map_or(0, Sink::accepted)
    }
}

/// Where the pod connects over `family`: the target's cluster IP for C and C′, its external IP
/// otherwise.
fn target(v: Variant, family: Family, port: u16) -> SocketAddr {
    let (cluster, ext) = services::target().addrs(family);
    let ip = match v {
        Variant::C | Variant::CMasq => cluster,
        Variant::A(_) | Variant::NftMap | Variant::B => ext,
    };
    SocketAddr::new(ip, port)
}

/// The order of the sides in round `round`: rotated, so none is always first or last.
fn order(round: usize) -> Vec<Variant> {
    let mut vs = Variant::ALL.to_vec();
    let by = round % vs.len();
    vs.rotate_left(by);
    vs
}

pub struct Bed<'a> {
    labs: &'a Labs,
    agent: AgentSide<'a>,
    /// Where the host-network clients of the sides without socket hooks run.
    plain: PlainCgroup,
}

impl<'a> Bed<'a> {
    pub fn new(labs: &'a Labs, bin: &Path) -> Result<Bed<'a>> {
        Ok(Bed { labs, agent: AgentSide::new(labs.get(Variant::B), bin)?, plain: PlainCgroup::new()? })
    }

    fn baseline(&self, backend: Backend) -> Baseline<'a> {
        Baseline::new(self.labs.get(Variant::A(backend)), backend)
    }

    fn nft_map(&self, family: Family) -> NftMap<'a> {
        NftMap::new(self.labs.get(Variant::NftMap), family)
    }

    /// Every side-by-side figure at `n`.
    pub fn measure(&mut self, n: usize, plan: &Plan, r: &mut Results) -> Result<()> {
        let svcs = services::services(n);
        println!("\nN = {n}");
        for backend in Backend::ALL {
            let a = self.baseline(backend);
            let times = (0..plan.apply_rounds).map(|_| a.load(&svcs)).collect::<Result<Vec<_>>>()?;
            println!("  apply {n}, iptables-restore ({}): {}", backend.iptables(), show_ms(&times));
            r.restore_apply.insert((n, backend), times);
        }
        for family in Family::ALL {
            let peer = self.nft_map(family);
            let times = (0..plan.apply_rounds).map(|_| peer.load(&svcs)).collect::<Result<Vec<_>>>()?;
            println!("  apply {n}, nftables set + map, {} (nft -f): {}", family.label(), show_ms(&times));
            r.nft_apply.insert((n, family), times);
        }
        self.agent_starts(n, &svcs, usize::MAX, plan, r)?;
        self.traffic(n, plan, r)?;
        self.check_paths(n, r)?;
        self.changes(n, plan, r)?;
        for backend in Backend::ALL {
            let per_rule = self.baseline(backend).apply_all_per_rule(&svcs, plan.per_rule_budget)?;
            println!(
                "  apply {n}, one iptables exec per rule ({}): {} of {n} Services in {:.2} s",
                backend.iptables(),
                per_rule.done,
                per_rule.elapsed.as_secs_f64()
            );
            r.per_rule_apply.insert((n, backend), per_rule);
        }
        Ok(())
    }

    /// node-manager alone at `n` (apply, one change, memory).
    pub fn measure_agent_only(&mut self, n: usize, plan: &Plan, r: &mut Results) -> Result<()> {
        println!("\nN = {n} (node-manager only)");
        let svcs = services::services(n);
        self.agent_starts(n, &svcs, plan.api_fillers(), plan, r)?;
        self.agent_changes(n, plan, r)
    }

    /// The agent's first sync from nothing, `plan.apply_rounds` times, with `svcs` in the API
    /// (fillers from `api_fillers` up written to etcd, see [`AgentSide::serve`]).
    fn agent_starts(
        &mut self,
        n: usize,
        svcs: &[services::Svc],
        api_fillers: usize,
        plan: &Plan,
        r: &mut Results,
    ) -> Result<()> {
        self.agent.serve(svcs, api_fillers)?;
        let want = services::expected_frontends(n);
        let starts = (0..plan.apply_rounds).map(|_| self.agent.start_from_nothing(want)).collect::<Result<Vec<_>>>()?;
        let e2e: Vec<Duration> = starts.iter().map(|s| s.end_to_end).collect();
        let sync: Vec<Duration> = starts.iter().map(|s| s.sync).collect();
        let first: Vec<Duration> = starts.iter().map(|s| s.from_first_event).collect();
        let listing: Vec<Duration> = starts.iter().map(|s| s.listing).collect();
        println!(
            "  apply {n}, node-manager: start → synced {}, first Service list answered → synced {}, of which the list's {} pages {} and model + map writes {}; RSS {} MiB",
            show_ms(&e2e),
            show_ms(&first),
            starts.last().map_or(0, |s| s.list_pages),
            show_ms(&listing),
            show_ms(&sync),
            starts.last().map_or(0, |s| s.rss_kib / 1024)
        );
        r.agent_start.insert(n, starts);
        Ok(())
    }

    /// Connection loops, then iperf3, every side once per round.
    fn traffic(&self, n: usize, plan: &Plan, r: &mut Results) -> Result<()> {
        for round in 0..plan.rounds {
            for v in order(round) {
                interrupt::check()?;
                let pod = self.labs.get(v).netns_path(Ns::Pod);
                for &family in v.families() {
                    // B's IPv4 rounds run with the kernel's BPF run-time statistics on (they
                    // cost a clock read per program run, so only B pays them, and only then).
                    let stats = (v == Variant::B && family == Family::V4).then(bpf_stats::enable).transpose()?;
                    let before = stats.as_ref().map(|_| bpf_stats::pod_programs()).transpose()?;
                    let run = conn::connect_loop(&pod, target(v, family, CONN_PORT), plan.conn_time)
                        .with_context(|| format!("N = {n}, {}{}", v.label(), over(family)))?;
                    if let Some(before) = before {
                        let after = bpf_stats::pod_programs()?;
                        if let Some(per) = bpf_stats::PerConnection::between(before, after, run.connections) {
                            r.bpf.entry(n).or_default().push(per);
                        }
                    }
                    drop(stats);
                    println!(
                        "  round {round} {:<24} {:>8.0} conn/s  connect median {:>6.1} µs  p99 {:>7.1} µs  ({} failed){}",
                        v.label(),
                        run.rate(),
                        run.median_us(),
                        run.p99_us(),
                        run.errors,
                        over(family)
                    );
                    r.pod_samples_mut(family).entry((n, v)).or_default().push(ConnSample::of(&run));
                }
                if v == Variant::B {
                    // The same pod, its process below B's hooked cgroup: served at `connect()`.
                    let run = self
                        .at_the_socket(n, r, || {
                            conn::connect_loop(&pod, target(v, Family::V4, CONN_PORT), plan.conn_time)
                        })
                        .with_context(|| format!("N = {n}, {}, at the socket", v.label()))?;
                    println!(
                        "  round {round} {:<24} {:>8.0} conn/s  connect median {:>6.1} µs  (pod below the hooked cgroup)",
                        v.label(),
                        run.rate(),
                        run.median_us()
                    );
                    r.conn_socket.entry(n).or_default().push(ConnSample::of(&run));
                }
                if Variant::TO_CLUSTER.contains(&v) {
                    let run = conn::connect_loop(&pod, target(Variant::C, Family::V4, CONN_PORT), plan.conn_time)
                        .with_context(|| format!("N = {n}, {}, to the cluster IP", v.label()))?;
                    println!(
                        "  round {round} {:<24} {:>8.0} conn/s  connect median {:>6.1} µs  (to the cluster IP)",
                        v.label(),
                        run.rate(),
                        run.median_us()
                    );
                    r.conn_cluster.entry((n, v)).or_default().push(ConnSample::of(&run));
                }
                if Variant::HOST.contains(&v) {
                    // A node process: in B's hooked cgroup for B, an empty one for the others.
                    let cgroup = if v == Variant::B { self.agent.cgroup() } else { &self.plain.path };
                    let node = self.labs.get(v).netns_path(Ns::Node);
                    let run = connect_in(cgroup, &node, target(v, Family::V4, CONN_PORT), plan)
                        .with_context(|| format!("N = {n}, {}, from a node process", v.label()))?;
                    println!(
                        "  round {round} {:<24} {:>8.0} conn/s  connect median {:>6.1} µs  (node process)",
                        v.label(),
                        run.rate(),
                        run.median_us()
                    );
                    r.conn_host.entry((n, v)).or_default().push(ConnSample::of(&run));
                }
            }
        }
        for round in 0..plan.iperf_rounds {
            for v in order(round) {
                interrupt::check()?;
                let pod = self.labs.get(v).netns_path(Ns::Pod);
                // As in the connection rounds: B's streams run with the BPF statistics on.
                let stats = (v == Variant::B).then(bpf_stats::enable).transpose()?;
                let before = stats.as_ref().map(|_| bpf_stats::pod_programs()).transpose()?;
                let started = Instant::now();
                let bps = iperf::run(&pod, target(v, Family::V4, IPERF_PORT), plan.iperf_secs, plan.iperf_omit)
                    .with_context(|| format!("N = {n}, {}", v.label()))?;
                if let Some(before) = before
                    && let Some(share) =
                        bpf_stats::StreamShare::between(before, bpf_stats::pod_programs()?, started.elapsed())
                {
                    r.bpf_stream.entry(n).or_default().push(share);
                }
                println!("  round {round} {:<24} {:>8.2} Gbit/s", v.label(), bps / 1e9);
                r.iperf.entry((n, v)).or_default().push(bps);
                if v == Variant::B {
                    let bps = self
                        .at_the_socket(n, r, || {
                            iperf::run(&pod, target(v, Family::V4, IPERF_PORT), plan.iperf_secs, plan.iperf_omit)
                        })
                        .with_context(|| format!("N = {n}, {}, at the socket", v.label()))?;
                    println!(
                        "  round {round} {:<24} {:>8.2} Gbit/s  (pod below the hooked cgroup)",
                        v.label(),
                        bps / 1e9
                    );
                    r.iperf_socket.entry(n).or_default().push(bps);
                }
            }
        }
        Ok(())
    }

    /// Runs `traffic` from B's pod with this process below B's hooked cgroup (the socket path),
    /// and adds to `socket_tc_rewrites` what the pod ingress program rewrote meanwhile.
    fn at_the_socket<T>(&self, n: usize, r: &mut Results, traffic: impl FnOnce() -> Result<T>) -> Result<T> {
        let before = self.agent.rewrites(Family::V4)?;
        let out = {
            let _inside = InCgroup::enter(self.agent.cgroup())?;
            traffic()?
        };
        *r.socket_tc_rewrites.entry(n).or_default() += self.agent.rewrites(Family::V4)? - before;
        Ok(out)
    }

    /// Evidence that A's connections went through its rules and B's through the agent, and
    /// that every side's reached the endpoint.
    fn check_paths(&self, n: usize, r: &mut Results) -> Result<()> {
        let at = int(n);
        for v in Variant::ALL {
            for &family in v.families() {
                let samples = &r.pod_samples(family)[&(n, v)];
                let made: u64 = samples.iter().map(|c| c.connections).sum();
                let failed: u64 = samples.iter().map(|c| c.errors).sum();
                let accepted = self.labs.accepted(v, family);
                let line = format!(
                    "N = {at}, {}{}: {} connections made, {failed} failed; the endpoint's sink has accepted {} in all",
                    v.label(),
                    over(family),
                    int(made as usize),
                    int(accepted as usize)
                );
                path_check(r, line, accepted > 0)?;
            }
        }
        for backend in Backend::ALL {
            let (a, ipt) = (self.baseline(backend), backend.iptables());
            let packets = a.target_dnat_packets(n, EX_CLUS_PREROUTING)?;
            let conns: u64 = r.conn[&(n, Variant::A(backend))].iter().map(|c| c.connections).sum();
            let line = format!(
                "N = {at}, {ipt}: the target's DNAT rule counted {} new connections (the loop made {}, plus iperf3's)",
                int(packets as usize),
                int(conns as usize)
            );
            path_check(r, line, packets >= conns)?;
            let entered = a.chain_entries()?;
            let to_cluster: u64 =
                r.conn_cluster.get(&(n, Variant::A(backend))).map_or(0, |s| s.iter().map(|c| c.connections).sum());
            let line = format!(
                "N = {at}, {ipt}: {} new connections entered its chain (the loops made {} to the LB IP and {} to the cluster IP, plus iperf3's)",
                int(entered as usize),
                int(conns as usize),
                int(to_cluster as usize)
            );
            path_check(r, line, entered >= conns + to_cluster)?;
            let packets = a.target_dnat_packets(n, EX_CLUS_OUTPUT)?;
            let conns = host_connections(r, n, Variant::A(backend));
            let line = format!(
                "N = {at}, {ipt}: the target's OUTPUT DNAT rule counted {} new connections (node processes made {})",
                int(packets as usize),
                int(conns as usize)
            );
            path_check(r, line, packets >= conns)?;
        }
        let peer_out = self.nft_map(Family::V4).dnat_packets("out")?;
        let conns = host_connections(r, n, Variant::NftMap);
        let line = format!(
            "N = {at}, nftables set + map: its output DNAT rule counted {} new connections (node processes made {})",
            int(peer_out as usize),
            int(conns as usize)
        );
        path_check(r, line, peer_out >= conns)?;
        let hooked = self.agent.counter("sock_connect_v4")?;
        let conns = host_connections(r, n, Variant::B);
        let socket_conns: u64 = r.conn_socket.get(&n).map_or(0, |s| s.iter().map(|c| c.connections).sum());
        let line = format!(
            "N = {at}, node-manager: its connect4 socket hook rewrote {} connects (node processes made {}, the pod below the hooked cgroup {}, plus iperf3's)",
            int(hooked as usize),
            int(conns as usize),
            int(socket_conns as usize)
        );
        path_check(r, line, hooked >= conns + socket_conns)?;
        let in_flight = r.socket_tc_rewrites.get(&n).copied().unwrap_or(0);
        let line = format!(
            "N = {at}, node-manager: while the pod ran below the hooked cgroup, the pod ingress program rewrote {in_flight} packets (its connections left the pod addressed to the cluster IP)"
        );
        path_check(r, line, in_flight == 0)?;
        for family in Family::ALL {
            // iperf3 runs on IPv4 only.
            let iperf = if family == Family::V4 { ", plus iperf3's" } else { "" };
            let peer = self.nft_map(family).dnat_packets("pre")?;
            let conns = pod_connections(r, n, Variant::NftMap, family);
            let line = format!(
                "N = {at}, nftables set + map{}: its DNAT rule counted {} new connections (the loop made {}{iperf})",
                over(family),
                int(peer as usize),
                int(conns as usize)
            );
            path_check(r, line, peer >= conns)?;
            let rewrites = self.agent.rewrites(family)?;
            let conns = pod_connections(r, n, Variant::B, family);
            let line = format!(
                "N = {at}, node-manager{}: the pod ingress program rewrote {} packets (the loop made {} connections of 3 packets each{iperf})",
                over(family),
                int(rewrites as usize),
                int(conns as usize)
            );
            path_check(r, line, rewrites >= 3 * conns)?;
        }
        Ok(())
    }

    /// One more Service at N: network-node-manager's way and iptables-restore on each
    /// backend, and node-manager.
    fn changes(&mut self, n: usize, plan: &Plan, r: &mut Results) -> Result<()> {
        // Fillers past the N - 1 in place: new names, new (IP, port) pairs.
        let mut next = n - 1;
        for backend in Backend::ALL {
            let a = self.baseline(backend);
            let mut per_rule = Vec::new();
            let mut restore = Vec::new();
            for _ in 0..plan.iptables_changes {
                interrupt::check()?;
                let started = Instant::now();
                a.apply_per_rule(&services::filler(next))?;
                per_rule.push(started.elapsed());
                restore.push(a.restore(&services::append_ruleset(&services::filler(next + 1)), true)?);
                next += 2;
            }
            println!(
                "  one change at {n} ({}): per rule {}, iptables-restore --noflush {}",
                backend.iptables(),
                show_ms(&per_rule),
                show_ms(&restore)
            );
            r.per_rule_change.insert((n, backend), per_rule);
            r.restore_change.insert((n, backend), restore);
        }
        for family in Family::ALL {
            let peer = self.nft_map(family);
            let mut added = Vec::new();
            for _ in 0..plan.iptables_changes {
                interrupt::check()?;
                added.push(peer.add(&services::filler(next))?);
                next += 1;
            }
            println!(
                "  one change at {n} (nftables set + map, {}): one add-element transaction {}",
                family.label(),
                show_ms(&added)
            );
            r.nft_change.insert((n, family), added);
        }
        self.agent_changes(n, plan, r)
    }

    fn agent_changes(&mut self, n: usize, plan: &Plan, r: &mut Results) -> Result<()> {
        let mut changes = Vec::new();
        for k in 0..plan.agent_changes {
            interrupt::check()?;
            changes.push(self.agent.change(&services::filler(n - 1 + k))?);
        }
        let e2e: Vec<Duration> = changes.iter().map(|c| c.end_to_end).collect();
        let sync: Vec<Duration> = changes.iter().map(|c| c.sync).collect();
        let apiserver: Vec<Duration> = changes.iter().map(|c| c.apiserver).collect();
        println!(
            "  one change at {n} (node-manager): API write received → map {}, of which the apiserver's handling {}, model + map diff {}",
            show_ms(&e2e),
            show_ms(&apiserver),
            show_ms(&sync)
        );
        r.agent_change.insert(n, changes);
        Ok(())
    }
}

/// The connection loop from `netns` to `to`, with this process in `cgroup` for its duration
/// (cgroup v2 places whole processes: the socket hooks see the cgroup of the socket's creator).
fn connect_in(cgroup: &Path, netns: &Path, to: SocketAddr, plan: &Plan) -> Result<conn::ConnRun> {
    let _inside = InCgroup::enter(cgroup)?;
    conn::connect_loop(netns, to, plan.conn_time)
}

/// Records a path check's line for the report; fails the run with it when `ok` is false (the
/// traffic did not take the path its side is meant to measure).
fn path_check(r: &mut Results, line: String, ok: bool) -> Result<()> {
    if !ok {
        anyhow::bail!("path check failed: {line}");
    }
    r.path_checks.push(line);
    Ok(())
}

/// " (IPv6)" after the names of IPv6 figures; IPv4 ones go unmarked, as before IPv6 was measured.
fn over(family: Family) -> &'static str {
    match family {
        Family::V4 => "",
        Family::V6 => " (IPv6)",
    }
}

/// Connections the pod made to EXT:port over `family` in `v`'s lab at `n`, over all rounds.
fn pod_connections(r: &Results, n: usize, v: Variant, family: Family) -> u64 {
    r.pod_samples(family).get(&(n, v)).map_or(0, |s| s.iter().map(|c| c.connections).sum())
}

/// Connections node processes made in `v`'s lab at `n`, over all rounds.
fn host_connections(r: &Results, n: usize, v: Variant) -> u64 {
    r.conn_host.get(&(n, v)).map_or(0, |s| s.iter().map(|c| c.connections).sum())
}

/// "median [min–max] ms".
fn show_ms(times: &[Duration]) -> String {
    match crate::stats::Summary::of_durations(times, crate::stats::Unit::Millis) {
        Some(s) => format!("{:.1} ms [{:.1}–{:.1}]", s.median, s.min, s.max),
        None => "-".into(),
    }
}
