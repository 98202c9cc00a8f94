//! BENCHMARKS.md and its charts, from one run's results.

use std::{fmt::Write as _, fs, path::Path, time::Duration};

use anyhow::{Context as _, Result};

use crate::{
    baseline::Backend,
    plot::{self, Chart, Point, Series},
    results::{Plan, Results, Variant},
    services,
    stats::{Summary, Unit},
};

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

fn markdown(plan: &Plan, r: &Results, meta: &Meta, charts: &[(&str, String)]) -> String {
    let m = &r.machine;
    let mut o = String::new();
    let w = &mut o;
    let _ = writeln!(w, "# Benchmarks\n");
    if plan.quick {
        let _ = writeln!(
            w,
            "> **Quick mode** (`--quick`, the CI smoke run): small N, short runs, few rounds. It checks that \
             every figure is measured and sane; the numbers are not the record.\n"
        );
    }
    let _ = writeln!(
        w,
        "node-manager's eBPF datapath (**B**) side by side with kakao's network-node-manager's iptables rules \
         (**A**, on both iptables backends) and with no rewrite at all (**C**, the floor), measured in one run \
         on the same machine and the same lab.\n"
    );
    let _ = writeln!(
        w,
        "- Produced by: `{}` ({} min, {}, commit `{}`)",
        meta.command,
        num(meta.took.as_secs_f64() / 60.0),
        m.date,
        m.commit
    );
    let _ = writeln!(
        w,
        "- Machine: {}, {} cores, {} GiB RAM, Linux {}; {} / {}; {}",
        m.cpu,
        m.cores,
        num(m.memory_gib),
        m.kernel,
        m.iptables_legacy,
        m.iptables_nft,
        m.iperf3
    );
    let _ = writeln!(
        w,
        "- **The machine was shared**: other builds and tests ran at the same time (load average {} at the \
         start, {} at the end, on {} cores). Absolute numbers are noisy; the ratios compare sides measured \
         back to back within each round and are the figures to read.\n",
        m.load_before, m.load_after, m.cores
    );
    targets(w, plan, r);
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
    let _ = writeln!(
        w,
        "## Charts\n\nMedians with min–max bars; N on a log axis, values on a log axis too unless they span less than a decade (then linear). A hollow marker is a lower bound (extrapolated).\n"
    );
    for (file, title) in charts {
        let _ = writeln!(w, "![{title}]({CHARTS_DIR}/{file})\n");
    }
    o
}

fn targets(w: &mut String, plan: &Plan, r: &Results) {
    let Some(&n) = plan.ns.iter().max() else { return };
    let n_all = plan.all_ns().into_iter().max().unwrap_or(n);
    let n_min = plan.all_ns().into_iter().min().unwrap_or(1);
    let _ = writeln!(w, "## Targets (from the issue), at N = {}\n", int(n));
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
    let sync = r.agent_start_summary(n, |s| s.sync, Unit::Millis);
    let _ = writeln!(
        w,
        "| B applies {} Services from nothing in < 1 s | agent start → all entries in the map: {} ms (model + map writes: {} ms) | {} |",
        int(n),
        range(e2e),
        range(sync),
        yes(e2e.is_some_and(|s| s.median < 1000.0))
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
    let _ = writeln!(w);
}

fn method(w: &mut String, plan: &Plan) {
    let secs = plan.conn_time.as_secs_f64();
    let _ = writeln!(
        w,
        "## How it was measured\n\n\
- **The lab** (`lab` crate): network namespaces for a pod, the node and the Service endpoint. The node \
  routes, masquerades what carries mark 0x4000, and binds the LoadBalancer IP {ext} on `kube-ipvs0` as \
  kube-proxy IPVS does. It is IPVS-like on the benchmark's ports: IPVS keeps its own connection table and \
  leaves netfilter's NAT alone, so nothing in netfilter translates the cluster IP {cluster}; there is no \
  IPVS module here, so the node routes the cluster IP to the endpoint, which holds it (as IPVS's \
  direct-routing mode delivers). Every side thus pays the same path to the endpoint (conntrack, \
  forwarding, masquerading where marked) and differs only in how {ext} becomes {cluster}. Each side gets \
  its own identical lab (so no side's rules or programs are in another's path); the endpoint runs a \
  connection sink (a dedicated accept loop) and `iperf3 -s`.\n\
- **N Services**: N − 1 filler LoadBalancer Services and, last, the target ({ext} → {cluster}). Fillers \
  spread over {ips} LB IPs of 203.0.113.0/24 and distinct ports (documentation ranges hold too few IPv4 \
  addresses for one each). network-node-manager matches the IP only, so it has its 4 rules per Service \
  either way; the target's rules are the last of its chains.\n\
- **A, network-node-manager**: its exact rules (`NMANAGER_EX_CLUS_PREROUTING`/`_OUTPUT`, 4 per Service, \
  jumped from `NMANAGER_PREROUTING`/`_OUTPUT` at position 1 of nat PREROUTING/OUTPUT, with kube-proxy's \
  `KUBE-MARK-MASQ`) in the node's nat table, loaded with `iptables-legacy-restore` or \
  `iptables-nft-restore`; the pod connects to {ext}, which its DNAT turns into {cluster}.\n\
- **B, node-manager**: the release agent binary in the node namespace with `--external-cluster true \
  --drop-invalid-input false`, on the pod's host-side veth, fed by `fake-apiserver` (the Kubernetes \
  source, list + watch over HTTP) holding the N Services and the Node; the pod connects to {ext}.\n\
- **C, the floor**: no rules, no agent; the pod connects to the cluster IP {cluster}.\n\
- **Every connection, to a cluster IP**: in A's and B's labs, with the rules or the agent in place, the \
  same loop also connects to the cluster IP right after the side's own run: nothing is rewritten, but \
  every new connection passes A's chain (its jump's packet counter is checked) or B's programs (a miss).\n\
- **C′, the floor with masquerading**: as C, plus kube-proxy's masquerade mark on every connection to \
  the cluster IP. A and B masquerade the rewritten connections (KUBE-MARK-MASQ, so that replies come \
  back through this node), C does not: B/C′ is the cost of node-manager's rewrite alone, B/C also \
  includes the masquerading.\n\
- **Connections/s and first-packet latency**: a Rust loop in the pod's namespace (`bench/src/conn.rs`): \
  socket, `connect` (timed: SYN → SYN-ACK, the SYN being the packet that walks the NAT rules), close with \
  RST (`SO_LINGER` 0, so neither ports nor conntrack entries pile up), for {secs} s per side per round, \
  {rounds} rounds, the order of the sides rotated each round. The latency columns are the medians over \
  rounds of each round's median and 99th percentile.\n\
- **Throughput**: `iperf3 -c` from the pod, one TCP stream, {ip} s after omitting {omit} s, {irounds} rounds.\n\
- **Ratios** (B/A, B/C) are taken per round between sides measured back to back, then summarised \
  (median [min–max]).\n\
- **Apply from nothing**: A *network-node-manager's way*: from its empty chains, per Service, for each \
  of the 4 rules `iptables -w 5 -W 100000 -t nat -C …` (fails: missing) then `… -A …`, one exec each, as \
  its `runIptables` does — stopped after a time-out of {budget} s. When it did not finish, two \
  extrapolations are given, both labelled: **≥** elapsed time + remaining Services × the pace of the \
  last tenth applied (a lower bound: each exec reads, and `-A` rewrites, the whole table, so it gets \
  slower as the table grows), and **≈** an estimate with the per-Service time rising linearly from that \
  pace to the per-Service time measured at N (the *one change at N* figure below). Both omit the chain \
  checks network-node-manager repeats on every reconcile, so they flatter A. A *iptables-restore*: the whole table in one `iptables-restore` from an \
  empty table ({apply} rounds). B: agent start (no pins) → its log reports all entries written, and the \
  agent's own measurement of the model + map writes (`elapsed_us` of its `frontends synced` line); \
  {apply} rounds.\n\
- **One change at N**: one more Service. A per rule: its 4 × (`-C`, `-A`) execs ({ipt} samples); \
  A restore: `iptables-restore --noflush` of its 4 rules; B: the Service written to the API server → its \
  entry in the pinned map (polled every 0.2 ms), and the agent's `elapsed_us` for that sync ({chg} samples, \
  further apart than the agent's 50 ms event coalescing).\n\
- **Per-packet cost**: the pod ingress program run by the kernel on a crafted TCP frame \
  (BPF_PROG_TEST_RUN, {rep} repetitions × {prounds} rounds) for a hit and a miss (known IP, unknown port) \
  with N frontends in the map, next to an empty TC program (`r0 = -1; exit`).\n\
- **Memory**: the agent's VmRSS right after its first sync of N Services.\n",
        cluster = lab::CLUSTER_V4,
        ext = lab::EXTERNAL_V4,
        ips = services::FILLER_IPS,
        rounds = plan.rounds,
        ip = plan.iperf_secs,
        irounds = plan.iperf_rounds,
        omit = plan.iperf_omit,
        budget = plan.per_rule_budget.as_secs(),
        apply = plan.apply_rounds,
        ipt = plan.iptables_changes,
        chg = plan.agent_changes,
        rep = num(plan.prog_repeat as f64),
        prounds = plan.prog_rounds,
    );
}

fn tables(w: &mut String, plan: &Plan, r: &Results) {
    let sides = Variant::ALL;
    let header = |extra: &str| {
        let names: Vec<&str> = sides.iter().map(|v| v.label()).collect();
        let cols = sides.len() + extra.matches('|').count();
        format!("| N | {} |{extra}\n|---:|{}", names.join(" | "), "---:|".repeat(cols))
    };
    let _ = writeln!(w, "## New TCP connections per second (pod → EXT:port of the last-listed Service)\n");
    let _ = writeln!(w, "{}", header(" B/A legacy | B/A nft | B/C | B/C′ |"));
    for &n in &plan.ns {
        let cells: Vec<String> = sides.iter().map(|&v| range(r.conn_summary(n, v, |s| s.rate))).collect();
        let _ = writeln!(
            w,
            "| {} | {} | {} | {} | {} | {} |",
            int(n),
            cells.join(" | "),
            ratio(r.conn_ratio(n, Variant::B, A_LEGACY)),
            ratio(r.conn_ratio(n, Variant::B, A_NFT)),
            ratio(r.conn_ratio(n, Variant::B, Variant::C)),
            ratio(r.conn_ratio(n, Variant::B, Variant::CMasq))
        );
    }
    let _ = writeln!(
        w,
        "\n## Every new connection pays A's chain: pod → cluster IP, connections per second (connect median, µs)\n"
    );
    let to_cluster = [Variant::C, A_LEGACY, A_NFT, Variant::B];
    let names: Vec<&str> = to_cluster.iter().map(|v| v.label()).collect();
    let _ = writeln!(
        w,
        "| N | {} | B/A legacy | B/A nft | B/C |\n|---:|{}",
        names.join(" | "),
        "---:|".repeat(to_cluster.len() + 3)
    );
    for &n in &plan.ns {
        let cells: Vec<String> = to_cluster
            .iter()
            .map(|&v| {
                let med = r.cluster_summary(n, v, |s| s.median_us).map_or("—".into(), |s| num(s.median));
                format!("{} ({med})", range(r.cluster_summary(n, v, |s| s.rate)))
            })
            .collect();
        let _ = writeln!(
            w,
            "| {} | {} | {} | {} | {} |",
            int(n),
            cells.join(" | "),
            ratio(r.cluster_ratio(n, Variant::B, A_LEGACY)),
            ratio(r.cluster_ratio(n, Variant::B, A_NFT)),
            ratio(r.cluster_ratio(n, Variant::B, Variant::C))
        );
    }
    let _ = writeln!(w, "\n## First-packet latency (`connect` time, µs: median / p99)\n");
    let _ = writeln!(w, "{}", header(" A legacy / B | A nft / B |"));
    for &n in &plan.ns {
        let cells: Vec<String> = sides
            .iter()
            .map(|&v| {
                let med = r.conn_summary(n, v, |s| s.median_us).map_or("—".into(), |s| num(s.median));
                let p99 = r.conn_summary(n, v, |s| s.p99_us).map_or("—".into(), |s| num(s.median));
                format!("{med} / {p99}")
            })
            .collect();
        let _ = writeln!(
            w,
            "| {} | {} | {} | {} |",
            int(n),
            cells.join(" | "),
            ratio(r.latency_ratio(n, A_LEGACY, Variant::B)),
            ratio(r.latency_ratio(n, A_NFT, Variant::B))
        );
    }
    let _ = writeln!(w, "\n## Throughput of one established TCP stream (iperf3, Gbit/s)\n");
    let _ = writeln!(w, "{}", header(" B/C | B/C′ | B/A legacy | B/A nft |"));
    for &n in &plan.ns {
        let cells: Vec<String> = sides.iter().map(|&v| range(Summary::of(&r.iperf_gbit(n, v)))).collect();
        let _ = writeln!(
            w,
            "| {} | {} | {} | {} | {} | {} |",
            int(n),
            cells.join(" | "),
            ratio(r.iperf_ratio(n, Variant::B, Variant::C)),
            ratio(r.iperf_ratio(n, Variant::B, Variant::CMasq)),
            ratio(r.iperf_ratio(n, Variant::B, A_LEGACY)),
            ratio(r.iperf_ratio(n, Variant::B, A_NFT))
        );
    }
    let _ = writeln!(w, "\n## Time to apply N Services from nothing (ms unless marked)\n");
    let _ = writeln!(
        w,
        "| N | A legacy, one exec per rule (nnm's way) | A nft, one exec per rule | A legacy, iptables-restore | A nft, iptables-restore | B: model + map writes | B: agent start → all in map |\n|---:|---:|---:|---:|---:|---:|---:|"
    );
    for n in plan.all_ns() {
        let _ = writeln!(
            w,
            "| {} | {} | {} | {} | {} | {} | {} |",
            int(n),
            per_rule_cell(r, n, Backend::Legacy),
            per_rule_cell(r, n, Backend::Nft),
            range(ms(r.restore_apply.get(&(n, Backend::Legacy)))),
            range(ms(r.restore_apply.get(&(n, Backend::Nft)))),
            range(r.agent_start_summary(n, |s| s.sync, Unit::Millis)),
            range(r.agent_start_summary(n, |s| s.end_to_end, Unit::Millis)),
        );
    }
    let _ = writeln!(w, "\n## One change at N: one more Service (ms)\n");
    let _ = writeln!(
        w,
        "| N | A legacy, per rule | A nft, per rule | A legacy, restore --noflush | A nft, restore --noflush | B: model + map diff | B: API write → entry in map |\n|---:|---:|---:|---:|---:|---:|---:|"
    );
    for n in plan.all_ns() {
        let _ = writeln!(
            w,
            "| {} | {} | {} | {} | {} | {} | {} |",
            int(n),
            range(ms(r.per_rule_change.get(&(n, Backend::Legacy)))),
            range(ms(r.per_rule_change.get(&(n, Backend::Nft)))),
            range(ms(r.restore_change.get(&(n, Backend::Legacy)))),
            range(ms(r.restore_change.get(&(n, Backend::Nft)))),
            range(r.agent_change_summary(n, |c| c.sync, Unit::Millis)),
            range(r.agent_change_summary(n, |c| c.end_to_end, Unit::Millis)),
        );
    }
    let _ = writeln!(w, "\n## Per-packet cost of the pod ingress program (BPF_PROG_TEST_RUN, ns/packet)\n");
    let _ = writeln!(w, "| frontends | hit | miss | empty program | hit / empty |\n|---:|---:|---:|---:|---:|");
    for (n, c) in &r.prog {
        let _ = writeln!(
            w,
            "| {} | {} | {} | {} | {:.1} |",
            int(*n),
            range(Some(c.hit)),
            range(Some(c.miss)),
            range(Some(c.empty)),
            c.hit.median / c.empty.median
        );
    }
    let _ = writeln!(w, "\n## Agent memory (VmRSS after the first sync, MiB)\n");
    let _ = writeln!(w, "| N | node-manager |\n|---:|---:|");
    for n in plan.all_ns() {
        let _ = writeln!(w, "| {} | {} |", int(n), range(r.rss_mib(n)));
    }
    let _ = writeln!(w);
}

fn series(name: &str, color: plotters::style::RGBColor, points: Vec<Point>) -> Series {
    Series { name: name.into(), color, points }
}

fn pt(x: usize, y: Option<Summary>) -> Option<Point> {
    Some(Point { x: x as f64, y: y?, lower_bound: false })
}

fn charts(plan: &Plan, r: &Results) -> Vec<(&'static str, Chart<'static>)> {
    let colors = [
        (Variant::C, plot::GREEN),
        (Variant::CMasq, plot::GREY),
        (A_LEGACY, plot::RED),
        (A_NFT, plot::ORANGE),
        (Variant::B, plot::BLUE),
    ];
    let per_variant = |f: &dyn Fn(usize, Variant) -> Option<Summary>| -> Vec<Series> {
        colors
            .iter()
            .map(|&(v, c)| series(v.label(), c, plan.ns.iter().filter_map(|&n| pt(n, f(n, v))).collect()))
            .collect()
    };
    let mut out = vec![
        (
            "connections.png",
            Chart {
                title: "New TCP connections per second, pod → EXT:port",
                x_label: "Services (N)",
                y_label: "connections / s",
                series: per_variant(&|n, v| r.conn_summary(n, v, |s| s.rate)),
            },
        ),
        (
            "connections_cluster_ip.png",
            Chart {
                title: "Every new connection: pod → cluster IP, with each side in place",
                x_label: "Services (N)",
                y_label: "connections / s",
                series: colors
                    .iter()
                    .filter(|(v, _)| *v == Variant::C || Variant::TO_CLUSTER.contains(v))
                    .map(|&(v, c)| {
                        series(
                            v.label(),
                            c,
                            plan.ns.iter().filter_map(|&n| pt(n, r.cluster_summary(n, v, |s| s.rate))).collect(),
                        )
                    })
                    .collect(),
            },
        ),
        (
            "latency.png",
            Chart {
                title: "First-packet latency (connect time, median)",
                x_label: "Services (N)",
                y_label: "µs",
                series: per_variant(&|n, v| r.conn_summary(n, v, |s| s.median_us)),
            },
        ),
        (
            "throughput.png",
            Chart {
                title: "One established TCP stream (iperf3)",
                x_label: "Services (N)",
                y_label: "Gbit/s",
                series: per_variant(&|n, v| Summary::of(&r.iperf_gbit(n, v))),
            },
        ),
    ];
    let per_rule = |b: Backend| -> Vec<Point> {
        plan.ns
            .iter()
            .filter_map(|&n| {
                let p = r.per_rule_apply.get(&(n, b)).filter(|p| p.done > 0)?;
                let s = p.total_or_lower_bound().as_secs_f64() * 1e3;
                Some(Point {
                    x: n as f64,
                    y: Summary { median: s, min: s, max: s, count: 1 },
                    lower_bound: !p.completed(),
                })
            })
            .collect()
    };
    let ms_points = |m: &std::collections::BTreeMap<(usize, Backend), Vec<Duration>>, b: Backend| -> Vec<Point> {
        plan.ns.iter().filter_map(|&n| pt(n, ms(m.get(&(n, b))))).collect()
    };
    let all = plan.all_ns();
    out.push((
        "apply.png",
        Chart {
            title: "Time to apply N Services from nothing",
            x_label: "Services (N)",
            y_label: "ms",
            series: vec![
                series("A legacy, one exec per rule", plot::RED, per_rule(Backend::Legacy)),
                series("A nft, one exec per rule", plot::ORANGE, per_rule(Backend::Nft)),
                series("A legacy, iptables-restore", plot::PURPLE, ms_points(&r.restore_apply, Backend::Legacy)),
                series("A nft, iptables-restore", plot::BROWN, ms_points(&r.restore_apply, Backend::Nft)),
                series(
                    "B, agent start → all in map",
                    plot::TEAL,
                    all.iter()
                        .filter_map(|&n| pt(n, r.agent_start_summary(n, |s| s.end_to_end, Unit::Millis)))
                        .collect(),
                ),
                series(
                    "B, model + map writes",
                    plot::BLUE,
                    all.iter().filter_map(|&n| pt(n, r.agent_start_summary(n, |s| s.sync, Unit::Millis))).collect(),
                ),
            ],
        },
    ));
    out.push((
        "change.png",
        Chart {
            title: "One change at N: one more Service",
            x_label: "Services (N)",
            y_label: "ms",
            series: vec![
                series("A legacy, one exec per rule", plot::RED, ms_points(&r.per_rule_change, Backend::Legacy)),
                series("A nft, one exec per rule", plot::ORANGE, ms_points(&r.per_rule_change, Backend::Nft)),
                series(
                    "A legacy, iptables-restore --noflush",
                    plot::PURPLE,
                    ms_points(&r.restore_change, Backend::Legacy),
                ),
                series("A nft, iptables-restore --noflush", plot::BROWN, ms_points(&r.restore_change, Backend::Nft)),
                series(
                    "B, API write → entry in map",
                    plot::TEAL,
                    all.iter()
                        .filter_map(|&n| pt(n, r.agent_change_summary(n, |c| c.end_to_end, Unit::Millis)))
                        .collect(),
                ),
                series(
                    "B, model + map diff",
                    plot::BLUE,
                    all.iter().filter_map(|&n| pt(n, r.agent_change_summary(n, |c| c.sync, Unit::Millis))).collect(),
                ),
            ],
        },
    ));
    let prog = |f: fn(&crate::prog_cost::ProgCost) -> Summary| -> Vec<Point> {
        r.prog.iter().filter_map(|(&n, c)| pt(n, Some(f(c)))).collect()
    };
    out.push((
        "per_packet.png",
        Chart {
            title: "Per-packet cost of the pod ingress program",
            x_label: "frontends in the map (N)",
            y_label: "ns / packet",
            series: vec![
                series("B hit", plot::BLUE, prog(|c| c.hit)),
                series("B miss", plot::TEAL, prog(|c| c.miss)),
                series("empty program", plot::GREY, prog(|c| c.empty)),
            ],
        },
    ));
    out.push((
        "memory.png",
        Chart {
            title: "Agent memory after the first sync",
            x_label: "Services (N)",
            y_label: "VmRSS, MiB",
            series: vec![series(
                "B: node-manager",
                plot::BLUE,
                all.iter().filter_map(|&n| pt(n, r.rss_mib(n))).collect(),
            )],
        },
    ));
    out
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
