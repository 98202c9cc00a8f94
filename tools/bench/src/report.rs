//! BENCHMARKS.md and its charts, from one run's results.

use std::{fmt::Write as _, fs, path::Path, time::Duration};

use anyhow::{Context as _, Result};

use crate::{
    baseline::Backend,
    results::{Plan, Results, Variant},
    services,
    stats::{Summary, Unit},
};

mod charts;
mod tables;

use charts::charts;
use tables::tables;

/// Where the charts go, relative to the report.
pub const CHARTS_DIR: &str = "docs/bench";

const A_LEGACY: Variant = Variant::A(Backend::Legacy);
const A_NFT: Variant = Variant::A(Backend::Nft);

pub struct Meta<'a> {
    pub command: &'a str,
    pub took: Duration,
}

/// Writes `<out>/BENCHMARKS.md` and the PNG charts under `<out>/docs/bench/`.
pub fn write(out: &Path, plan: &Plan, r: &Results, meta: &Meta) -> Result<()> {
    let charts_dir = out.join(CHARTS_DIR);
    fs::create_dir_all(&charts_dir).with_context(|| format!("creating {}", charts_dir.display()))?;
    let mut drawn = Vec::new();
    for (file, chart) in charts(plan, r) {
        let path = charts_dir.join(file);
        chart.draw(&path).with_context(|| format!("drawing {}", path.display()))?;
        drawn.push((file, chart.title.to_owned()));
    }
    let md = markdown(plan, r, meta, &drawn);
    let path = out.join("BENCHMARKS.md");
    fs::write(&path, md).with_context(|| format!("writing {}", path.display()))?;
    println!("\nbench: wrote {} and {} charts in {}", path.display(), drawn.len(), charts_dir.display());
    Ok(())
}

/// 12,345 / 12.3 / 0.123, with thousands separators.
pub fn num(v: f64) -> String {
    let decimals = if v.abs() >= 100.0 {
        0
    } else if v.abs() >= 10.0 {
        1
    } else if v.abs() >= 1.0 {
        2
    } else {
        3
    };
    let s = format!("{v:.decimals$}");
    let (int, frac) = s.split_once('.').map_or((s.as_str(), None), |(i, f)| (i, Some(f)));
    let (sign, digits) = int.strip_prefix('-').map_or(("", int), |d| ("-", d));
    let mut grouped = String::new();
    for (k, c) in digits.chars().enumerate() {
        if k > 0 && (digits.len() - k) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(c);
    }
    match frac {
        Some(f) => format!("{sign}{grouped}.{f}"),
        None => format!("{sign}{grouped}"),
    }
}

/// An integer with thousands separators.
pub fn int(n: usize) -> String {
    num(n as f64).split('.').next().unwrap_or_default().to_owned()
}

/// "median [min–max]".
fn range(s: Option<Summary>) -> String {
    match s {
        Some(s) if s.count > 1 => format!("{} [{}–{}]", num(s.median), num(s.min), num(s.max)),
        Some(s) => num(s.median),
        None => "—".into(),
    }
}

fn ratio(s: Option<Summary>) -> String {
    match s {
        Some(s) => format!("**{:.2}×** [{:.2}–{:.2}]", s.median, s.min, s.max),
        None => "—".into(),
    }
}

fn ms(times: Option<&Vec<Duration>>) -> Option<Summary> {
    Summary::of_durations(times?, Unit::Millis)
}

/// network-node-manager's way, when it did not finish: the elapsed time plus the remaining
/// Services at a per-Service time rising linearly from the pace at the time-out to the
/// per-Service time measured at N ("one change at N"). An estimate, labelled as such.
fn per_rule_estimate(r: &Results, n: usize, b: Backend) -> Option<Duration> {
    let p = r.per_rule_apply.get(&(n, b)).filter(|p| !p.completed() && p.done > 0)?;
    let at_n = ms(r.per_rule_change.get(&(n, b)))?.median / 1e3;
    let mean = (p.per_service_at_end.as_secs_f64() + at_n.max(p.per_service_at_end.as_secs_f64())) / 2.0;
    Some(p.elapsed + Duration::from_secs_f64(mean * (p.of - p.done) as f64))
}

/// 75 s / 12.5 min / 3.4 h.
fn human(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s >= 3600.0 {
        format!("{} h", num(s / 3600.0))
    } else if s >= 120.0 {
        format!("{} min", num(s / 60.0))
    } else {
        format!("{} s", num(s))
    }
}

fn per_rule_cell(r: &Results, n: usize, b: Backend) -> String {
    match r.per_rule_apply.get(&(n, b)) {
        None => "—".into(),
        Some(p) if p.completed() => format!("{} s", num(p.elapsed.as_secs_f64())),
        Some(p) => {
            let estimate = per_rule_estimate(r, n, b).map_or(String::new(), |e| format!(", ≈ {} estimated", human(e)));
            format!(
                "**≥ {}**{estimate} *(time-out: {} of {} Services in {} s, the last at {} ms each)*",
                human(p.total_or_lower_bound()),
                int(p.done),
                int(p.of),
                num(p.elapsed.as_secs_f64()),
                num(p.per_service_at_end.as_secs_f64() * 1e3)
            )
        }
    }
}

/// B's list pages at `n`: the time from the first answered to the last, and how many there
/// were (the last round's count; every round lists the same N).
fn pages_cell(r: &Results, n: usize) -> String {
    let pages = r.agent_start.get(&n).and_then(|s| s.last()).map(|s| s.list_pages);
    match (r.agent_start_summary(n, |s| s.listing, Unit::Millis), pages) {
        (Some(listing), Some(pages)) => {
            format!("{} ({} page{})", range(Some(listing)), int(pages), if pages == 1 { "" } else { "s" })
        }
        _ => "—".into(),
    }
}

/// `template` with every `{key}` replaced by its value.
fn fill(template: &str, values: &[(&str, String)]) -> String {
    values.iter().fold(template.to_owned(), |text, (key, value)| text.replace(&format!("{{{key}}}"), value))
}

fn markdown(plan: &Plan, r: &Results, meta: &Meta, charts: &[(&str, String)]) -> String {
    let m = &r.machine;
    let mut o = fill(
        include_str!("report/header.md"),
        &[
            ("quick", if plan.quick { include_str!("report/quick.md") } else { "" }.to_owned()),
            ("command", meta.command.to_owned()),
            ("minutes", num(meta.took.as_secs_f64() / 60.0)),
            ("date", m.date.to_string()),
            ("commit", m.commit.to_string()),
            ("cpu", m.cpu.to_string()),
            ("cores", m.cores.to_string()),
            ("memory", num(m.memory_gib)),
            ("kernel", m.kernel.to_string()),
            ("iptables_legacy", m.iptables_legacy.to_string()),
            ("iptables_nft", m.iptables_nft.to_string()),
            ("iperf3", m.iperf3.to_string()),
            ("load_before", m.load_before.to_string()),
            ("load_after", m.load_after.to_string()),
        ],
    );
    let w = &mut o;
    targets(w, plan, r);
    peer_targets(w, plan, r);
    reading(w, plan, r);
    method(w, plan);
    tables(w, plan, r);
    if !r.path_checks.is_empty() {
        let _ = writeln!(w, "## Path checks\n\nEach side's traffic took the path it is named for:\n");
        for c in &r.path_checks {
            let _ = writeln!(w, "- {c}");
        }
        let _ = writeln!(w);
    }
    w.push_str(include_str!("report/per_packet_changes.md"));
    w.push_str(include_str!("report/agent_costs.md"));
    w.push_str(include_str!("report/charts.md"));
    for (file, title) in charts {
        let _ = writeln!(w, "![{title}]({CHARTS_DIR}/{file})\n");
    }
    o
}

fn targets(w: &mut String, plan: &Plan, r: &Results) {
    let Some(&n) = plan.ns.iter().max() else { return };
    let n_all = plan.all_ns().into_iter().max().unwrap_or(n);
    let n_min = plan.all_ns().into_iter().min().unwrap_or(1);
    let _ = writeln!(w, "## Targets, at N = {}\n", int(n));
    let _ = writeln!(w, "| target | measured (median [min–max] over rounds) | met |\n|---|---|---|");
    let yes = |ok: bool| if ok { "yes" } else { "**no**" };
    let bl = r.conn_ratio(n, Variant::B, A_LEGACY);
    let bn = r.conn_ratio(n, Variant::B, A_NFT);
    let ok = matches!((bl, bn), (Some(a), Some(b)) if a.median >= 5.0 && b.median >= 5.0);
    let _ = writeln!(
        w,
        "| new connections/s of B ≥ 5× A | B/A: {} (iptables-legacy), {} (iptables-nft) | {} |",
        ratio(bl),
        ratio(bn),
        yes(ok)
    );
    let _ = writeln!(
        w,
        "| (not a target) the ceiling of that ratio: the floor C against A — no datapath can open connections faster than no rewrite at all | C/A: {} (iptables-legacy), {} (iptables-nft) | |",
        ratio(r.conn_ratio(n, Variant::C, A_LEGACY)),
        ratio(r.conn_ratio(n, Variant::C, A_NFT))
    );
    let bc = r.conn_ratio(n, Variant::B, Variant::C);
    let _ = writeln!(
        w,
        "| B within 10% of C on connections/s | B/C: {} | {} |",
        ratio(bc),
        yes(bc.is_some_and(|s| s.median >= 0.9))
    );
    let ba = r.conn_ratio(n, Variant::B, Variant::NftMap);
    let _ = writeln!(
        w,
        "| B ≥ 1.25× the nftables set + map (A′, the O(1) peer) on connections/s | B/A′: {} | {} |",
        ratio(ba),
        yes(ba.is_some_and(|s| s.median >= 1.25))
    );
    let bcm = r.conn_ratio(n, Variant::B, Variant::CMasq);
    let _ = writeln!(
        w,
        "| (not a target) B against the floor with masquerading, C′, on connections/s | B/C′: {} | |",
        ratio(bcm)
    );
    let tc = r.iperf_ratio(n, Variant::B, Variant::C);
    let _ = writeln!(
        w,
        "| B within 3% of C on stream throughput | B/C: {} | {} |",
        ratio(tc),
        yes(tc.is_some_and(|s| s.median >= 0.97))
    );
    let e2e = r.agent_start_summary(n, |s| s.end_to_end, Unit::Millis);
    let first = r.agent_start_summary(n, |s| s.from_first_event, Unit::Millis);
    let sync = r.agent_start_summary(n, |s| s.sync, Unit::Millis);
    let _ = writeln!(
        w,
        "| B applies {} Services from nothing in < 100 ms, from the first Service event to the last entry in the map | first Service list answered (apiserver audit log) → all entries in the map: {} ms, of which the list's pages, first → last answered: {} (agent start → all in the map: {} ms; model + map writes: {} ms) | {} |",
        int(n),
        range(first),
        pages_cell(r, n),
        range(e2e),
        range(sync),
        yes(first.is_some_and(|s| s.median < 100.0))
    );
    let change = r.agent_change_summary(n, |c| c.end_to_end, Unit::Millis);
    let apiserver = r.agent_change_summary(n, |c| c.apiserver, Unit::Millis);
    let after = r.agent_change_summary(n, |c| c.end_to_end.saturating_sub(c.apiserver), Unit::Millis);
    let _ = writeln!(
        w,
        "| B: one Service change, API write → map entry, < 5 ms | the apiserver answered the create → the entry in the pinned map: {} ms (from the request received, audit log: {} ms, of which the apiserver's own handling {} ms) | {} |",
        range(after),
        range(change),
        range(apiserver),
        yes(after.is_some_and(|s| s.median < 5.0))
    );
    let _ = writeln!(
        w,
        "| A's per-rule way takes minutes (measured with a time-out, then extrapolated) | iptables-legacy: {}; iptables-nft: {} | {} |",
        per_rule_cell(r, n, Backend::Legacy),
        per_rule_cell(r, n, Backend::Nft),
        yes(Backend::ALL.iter().all(|b| r
            .per_rule_apply
            .get(&(n, *b))
            .is_some_and(|p| p.total_or_lower_bound() >= Duration::from_secs(60))))
    );
    if let (Some(lo), Some(hi)) = (r.prog.get(&n_min), r.prog.get(&n_all)) {
        let (h, mi) = (hi.hit.median / lo.hit.median, hi.miss.median / lo.miss.median);
        let _ = writeln!(
            w,
            "| per-packet cost flat in N ({} vs {} frontends within 10%) | hit {:.3}×, miss {:.3}× | {} |",
            int(n_min),
            int(n_all),
            h,
            mi,
            yes((0.9..=1.1).contains(&h) && (0.9..=1.1).contains(&mi))
        );
    }
    let _ = writeln!(w);
}

/// The targets of the comparison with the strongest peer (the nftables map) and the floor,
/// each for both ways node-manager serves a pod: in flight by the TC programs (a pod outside
/// the hooked cgroup) and at the socket (below it: the DaemonSet's default).
fn peer_targets(w: &mut String, plan: &Plan, r: &Results) {
    let Some(&n) = plan.ns.iter().max() else { return };
    let yes = |ok: bool| if ok { "yes" } else { "**no**" };
    let at_least = |s: Option<Summary>, floor: f64| s.is_some_and(|s| s.median >= floor);
    let _ = writeln!(
        w,
        "## Targets against the nftables map and the floors, at N = {}
",
        int(n)
    );
    let _ = writeln!(
        w,
        "Each figure for both of node-manager's pod paths: **TC** (the pod's process outside the hooked cgroup: rewritten in flight, masqueraded, as network-node-manager's rules did) and **socket** (below it, as every pod is under the DaemonSet's default `--cgroup-path`: rewritten at `connect()`, not masqueraded). Per-round ratios, median [min–max].\n"
    );
    let _ = writeln!(w, "| target | TC path | met | socket path | met |\n|---|---|---|---|---|");
    let ceiling = r.conn_ratio(n, Variant::C, Variant::NftMap);
    // (what, TC path, socket path, the target's floor; None: shown for reference only)
    let rows = [
        (
            "new connections, B / C′ (the floor with masquerading) ≥ 0.99×",
            r.conn_ratio(n, Variant::B, Variant::CMasq),
            r.socket_ratio(n, Variant::CMasq),
            Some(0.99),
        ),
        (
            "new connections, B / A′ (the nftables map) ≥ 1.25×",
            r.conn_ratio(n, Variant::B, Variant::NftMap),
            r.socket_ratio(n, Variant::NftMap),
            Some(1.25),
        ),
        (
            "(not a target) the ceiling of that ratio: C / A′ — no path opens connections faster than no rewrite and no masquerading",
            ceiling,
            ceiling,
            None,
        ),
        (
            "(not a target) new connections, B / C (the floor without masquerading)",
            r.conn_ratio(n, Variant::B, Variant::C),
            r.socket_ratio(n, Variant::C),
            None,
        ),
        (
            "one stream, B / C′ ≥ 0.99×",
            r.iperf_ratio(n, Variant::B, Variant::CMasq),
            r.socket_iperf_ratio(n, Variant::CMasq),
            Some(0.99),
        ),
    ];
    for (label, tc, socket, floor) in rows {
        let met = |s: Option<Summary>| floor.map_or("", |f| yes(at_least(s, f)));
        let _ = writeln!(w, "| {label} | {} | {} | {} | {} |", ratio(tc), met(tc), ratio(socket), met(socket));
    }
    let cluster = r.cluster_ratio(n, Variant::B, Variant::C);
    let _ = writeln!(
        w,
        "| every connection to a cluster IP (the miss path), B / C ≥ 0.99× | {} | {} | the same programs (a pod's packets to a cluster IP are misses on either path) | |",
        ratio(cluster),
        yes(at_least(cluster, 0.99))
    );
    let ns = plan.all_ns();
    let costs: Vec<&crate::prog_cost::ProgCost> = ns.iter().filter_map(|n| r.prog.get(n)).collect();
    if let (Some(lo), Some(hi)) =
        (costs.iter().map(|c| c.hit.median).reduce(f64::min), costs.iter().map(|c| c.hit.median).reduce(f64::max))
    {
        let hits: Vec<String> = costs.iter().map(|c| format!("{:.0}", c.hit.median)).collect();
        let misses: Vec<String> = costs.iter().map(|c| format!("{:.0}", c.miss.median)).collect();
        let spread = hi / lo - 1.0;
        let miss_max = costs.iter().map(|c| c.miss.median).fold(0.0, f64::max);
        let _ = writeln!(
            w,
            "| per-packet, pod ingress, frontend hit ≤ 150 ns, flat {} → {} within 5 % | {} ns (spread {:.1} %) | {} | not per packet: one `connect4` run per connection | |",
            int(ns[0]),
            int(*ns.last().unwrap_or(&ns[0])),
            hits.join(" / "),
            spread * 100.0,
            yes(hi <= 150.0 && spread <= 0.05)
        );
        let _ = writeln!(
            w,
            "| per-packet, miss ≤ 80 ns | {} ns | {} | the same program | |",
            misses.join(" / "),
            yes(miss_max <= 80.0)
        );
    }
    let n_big = ns.iter().copied().max().unwrap_or(n);
    let (rss, rss_big) = (r.rss_mib(n), r.rss_mib(n_big));
    let _ = writeln!(
        w,
        "| agent VmRSS after the first sync < 48 MiB at {} and < 128 MiB at {} | {} MiB / {} MiB | {} | the same agent | |\n",
        int(n),
        int(n_big),
        range(rss),
        range(rss_big),
        yes(rss.is_some_and(|s| s.median < 48.0) && rss_big.is_some_and(|s| s.median < 128.0))
    );
}

/// Where B's connection time goes: its programs' share, from the kernel's BPF run-time
/// statistics during B's rounds, against the time per connection of B and of C′.
fn bpf_time(w: &mut String, n: usize, r: &Results) {
    let Some(samples) = r.bpf.get(&n) else { return };
    let (Some(runs), Some(ns)) = (
        Summary::of(&samples.iter().map(|s| s.runs).collect::<Vec<_>>()),
        Summary::of(&samples.iter().map(|s| s.ns).collect::<Vec<_>>()),
    ) else {
        return;
    };
    let per_conn_us = |v| r.conn_summary(n, v, |s| 1e6 / s.rate).map(|s| s.median);
    let (Some(b), Some(c)) = (per_conn_us(Variant::B), per_conn_us(Variant::CMasq)) else { return };
    let _ = writeln!(
        w,
        "- Where B's connection time goes (the kernel's BPF run-time statistics during B's rounds at N = {}): \
         node-manager's TC programs ran {:.1} times per connection for {} ns in all ({} ns per run); a B \
         connection took {} µs, a C′ one {} µs, so the programs are {} µs of the {} µs difference{}.",
        int(n),
        runs.median,
        num(ns.median),
        num(ns.median / runs.median),
        num(b),
        num(c),
        num(ns.median / 1e3),
        num(b - c),
        if b - c > ns.median / 1e3 {
            "; the rest is outside them (the TC hook itself, the rewritten skb's path through conntrack and NAT, noise)"
        } else {
            ": all of it is the programs' own time"
        }
    );
}

/// Where B's stream time goes: the programs' share of one CPU during B's iperf3 rounds, against
/// how much slower B's stream was than C′'s (one TCP stream is bound by one CPU here).
fn bpf_stream_time(w: &mut String, n: usize, r: &Results) {
    let Some(samples) = r.bpf_stream.get(&n) else { return };
    let of = |f: fn(&crate::bpf_stats::StreamShare) -> f64| Summary::of(&samples.iter().map(f).collect::<Vec<_>>());
    let (Some(runs), Some(per_run), Some(cpu)) = (of(|s| s.runs_per_s), of(|s| s.ns_per_run), of(|s| s.cpu)) else {
        return;
    };
    let Some(ratio) = r.iperf_ratio(n, Variant::B, Variant::CMasq) else { return };
    let _ = writeln!(
        w,
        "- Where B's stream time goes (the kernel's BPF run-time statistics during B's iperf3 rounds at N = {}): \
         node-manager's TC programs ran {} times a second, {} ns per run, {} % of one CPU; B's stream ran at {}× \
         C′'s ({} % {}). One TCP stream is bound by one CPU here, so the programs' share is about what they can \
         cost it; {}.",
        int(n),
        num(runs.median),
        num(per_run.median),
        num(cpu.median * 100.0),
        num(ratio.median),
        num((1.0 - ratio.median).abs() * 100.0),
        if ratio.median < 1.0 { "slower" } else { "faster" },
        if 1.0 - ratio.median > cpu.median * 1.5 {
            "the rest of the gap is outside them (the rewritten skb's conntrack and NAT, masquerading) or noise"
        } else {
            "the gap is within what the programs take, or within noise"
        }
    );
}

/// What the figures say, computed from them.
fn reading(w: &mut String, plan: &Plan, r: &Results) {
    let (Some(&lo), Some(&hi)) = (plan.ns.iter().min(), plan.ns.iter().max()) else { return };
    let lat = |n, v| r.conn_summary(n, v, |s| s.median_us).map(|s| s.median);
    let _ = writeln!(w, "## Reading the results\n");
    if let Some(floor) = lat(hi, Variant::CMasq) {
        for b in Backend::ALL {
            if let Some(a) = lat(hi, Variant::A(b)) {
                let _ = writeln!(
                    w,
                    "- At N = {}, network-node-manager's chain ({} rules in nat PREROUTING) adds {} µs to the first \
                     packet of each new connection on {} (median connect time {} µs against {} µs for the \
                     masqueraded floor C′): about {} ns per rule walked.",
                    int(hi),
                    int(2 * hi),
                    num(a - floor),
                    b.iptables(),
                    num(a),
                    num(floor),
                    num((a - floor) * 1e3 / (2 * hi) as f64)
                );
            }
        }
    }
    if let (Some(b_lo), Some(b_hi)) = (lat(lo, Variant::B), lat(hi, Variant::B)) {
        let _ = writeln!(
            w,
            "- node-manager's first packet takes {} µs at N = {} and {} µs at N = {}; its lookup is a hash lookup \
             (the per-packet cost below does not grow with N).",
            num(b_lo),
            int(lo),
            num(b_hi),
            int(hi)
        );
    }
    bpf_time(w, hi, r);
    bpf_stream_time(w, hi, r);
    let _ = writeln!(
        w,
        "- Connection rates compare whole connections — the socket, the handshake, the close — most of \
         which costs the same on every side; the first-packet latency isolates the packet that walks the \
         rules, so its ratio (A/B) shows the difference more sharply than the rates' (B/A)."
    );
    for b in Backend::ALL {
        let (Some(ceiling), Some(b_a)) =
            (r.conn_ratio(hi, Variant::C, Variant::A(b)), r.conn_ratio(hi, Variant::B, Variant::A(b)))
        else {
            continue;
        };
        let _ = writeln!(
            w,
            "- The ceiling on {}: a datapath that cost nothing would open connections at the floor's rate, \
             {:.2}× A's at N = {} (C/A); node-manager reached {:.2}× ({:.0}% of that ceiling).{}",
            b.iptables(),
            ceiling.median,
            int(hi),
            b_a.median,
            100.0 * b_a.median / ceiling.median,
            if ceiling.median < 5.0 {
                " A 5× target is above the ceiling on this machine: A's chain costs less than 4× the rest of a connection here."
            } else {
                ""
            }
        );
    }
    for b in Backend::ALL {
        let (Some(c), Some(a), Some(ratio_b)) = (
            r.cluster_summary(hi, Variant::C, |s| s.rate),
            r.cluster_summary(hi, Variant::A(b), |s| s.rate),
            r.cluster_ratio(hi, Variant::B, Variant::A(b)),
        ) else {
            continue;
        };
        let _ = writeln!(
            w,
            "- network-node-manager's chain is jumped at position 1 of nat PREROUTING, so **every** new connection \
             from a pod walks it, not only those to LoadBalancer IPs: at N = {}, connections to the cluster IP, which \
             need no rewrite, fell to {} /s on {} (the floor: {} /s), where node-manager's lab kept {}× of A's rate.",
            int(hi),
            num(a.median),
            b.iptables(),
            num(c.median),
            format_args!("{:.2}", ratio_b.median)
        );
    }
    if let (Some(b_c), Some(b_peer)) =
        (r.host_ratio(hi, Variant::B, Variant::C), r.host_ratio(hi, Variant::B, Variant::NftMap))
    {
        let verdict = if b_c.min > 1.0 {
            "faster than the floor in every round"
        } else if b_c.median > 1.0 {
            "faster than the floor in the median round, not in every round"
        } else {
            "not faster than the floor"
        };
        let _ = writeln!(
            w,
            "- Node processes (host-network clients) at N = {}: node-manager's socket hook opened connections at {:.2}× [{:.2}–{:.2}] the floor's rate (a node process → the cluster IP directly) and {:.2}× the nftables map's in the output hook: {verdict}. The socket path does no NAT and makes no conntrack NAT binding for the rewrite; the floor's connections pass the same conntrack without NAT, so only a ratio above 1 in every round would show the socket path beating the floor.",
            int(hi),
            b_c.median,
            b_c.min,
            b_c.max,
            b_peer.median
        );
    }
    ipv6_reading(w, hi, r);
    let _ = writeln!(w);
}

/// IPv6 against IPv4 at `n`: the same ratios, so a family-specific cost shows.
fn ipv6_reading(w: &mut String, n: usize, r: &Results) {
    let (Some(c6), Some(peer6), Some(c4), Some(peer4)) = (
        r.v6_ratio(n, Variant::B, Variant::C),
        r.v6_ratio(n, Variant::B, Variant::NftMap),
        r.conn_ratio(n, Variant::B, Variant::C),
        r.conn_ratio(n, Variant::B, Variant::NftMap),
    ) else {
        return;
    };
    let _ = writeln!(
        w,
        "- On IPv6 at N = {}, node-manager opened connections at {:.2}× [{:.2}–{:.2}] the floor's rate and {:.2}× [{:.2}–{:.2}] the nftables map's (its `ip6` table); on IPv4 in the same rounds {:.2}× and {:.2}×. The IPv6 floor's own rate: {} /s against {} /s on IPv4.",
        int(n),
        c6.median,
        c6.min,
        c6.max,
        peer6.median,
        peer6.min,
        peer6.max,
        c4.median,
        peer4.median,
        r.v6_summary(n, Variant::C, |s| s.rate).map_or("—".into(), |s| num(s.median)),
        r.conn_summary(n, Variant::C, |s| s.rate).map_or("—".into(), |s| num(s.median))
    );
}

/// The method, from `report/method.md`.
fn method(w: &mut String, plan: &Plan) {
    let text = fill(
        include_str!("report/method.md"),
        &[
            ("cluster", lab::CLUSTER_V4.to_string()),
            ("ext", lab::EXTERNAL_V4.to_string()),
            ("cluster6", lab::CLUSTER_V6.to_string()),
            ("ext6", lab::EXTERNAL_V6.to_string()),
            ("pods6", lab::POD_CIDR_V6.to_string()),
            ("ips", services::FILLER_IPS.to_string()),
            ("secs", plan.conn_time.as_secs_f64().to_string()),
            ("rounds", plan.rounds.to_string()),
            ("ip", plan.iperf_secs.to_string()),
            ("irounds", plan.iperf_rounds.to_string()),
            ("omit", plan.iperf_omit.to_string()),
            ("budget", plan.per_rule_budget.as_secs().to_string()),
            ("apply", plan.apply_rounds.to_string()),
            ("ipt", plan.iptables_changes.to_string()),
            ("chg", plan.agent_changes.to_string()),
            ("rep", num(plan.prog_repeat as f64)),
            ("prounds", plan.prog_rounds.to_string()),
        ],
    );
    w.push_str(&text);
    w.push('\n');
}

#[cfg(test)]
mod tests {
    use super::num;

    #[test]
    fn numbers_are_grouped() {
        assert_eq!(num(23_456.4), "23,456");
        assert_eq!(num(1_234_567.0), "1,234,567");
        assert_eq!(num(12.345), "12.3");
        assert_eq!(num(1.5), "1.50");
        assert_eq!(num(0.0123), "0.012");
        assert_eq!(num(-1234.0), "-1,234");
        assert_eq!(num(100.0), "100");
        assert_eq!(super::int(1), "1");
        assert_eq!(super::int(100_000), "100,000");
    }
}
