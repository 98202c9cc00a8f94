//! The report's tables, one section each.

use std::fmt::Write as _;

use super::{A_LEGACY, A_NFT, int, ms, num, pages_cell, per_rule_cell, range, ratio};
use crate::{
    baseline::Backend,
    results::{Plan, Results, Variant},
    services::Family,
    stats::{Summary, Unit},
};

pub(super) fn tables(w: &mut String, plan: &Plan, r: &Results) {
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
    v6_table(w, plan, r);
    socket_table(w, plan, r);
    host_table(w, plan, r);
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
        "| N | A legacy, one exec per rule (nnm's way) | A nft, one exec per rule | A legacy, iptables-restore | A nft, iptables-restore | A′: nft -f of the set + map | A′: the same, IPv6 table | B: model + map writes | B: first Service list answered → all in map | B: of which the list's pages, first → last answered | B: agent start → all in map |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for n in plan.all_ns() {
        let _ = writeln!(
            w,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            int(n),
            per_rule_cell(r, n, Backend::Legacy),
            per_rule_cell(r, n, Backend::Nft),
            range(ms(r.restore_apply.get(&(n, Backend::Legacy)))),
            range(ms(r.restore_apply.get(&(n, Backend::Nft)))),
            range(ms(r.nft_apply.get(&(n, Family::V4)))),
            range(ms(r.nft_apply.get(&(n, Family::V6)))),
            range(r.agent_start_summary(n, |s| s.sync, Unit::Millis)),
            range(r.agent_start_summary(n, |s| s.from_first_event, Unit::Millis)),
            pages_cell(r, n),
            range(r.agent_start_summary(n, |s| s.end_to_end, Unit::Millis)),
        );
    }
    let _ = writeln!(w, "\n## One change at N: one more Service (ms)\n");
    let _ = writeln!(
        w,
        "| N | A legacy, per rule | A nft, per rule | A legacy, restore --noflush | A nft, restore --noflush | A′: one add-element transaction | A′: the same, IPv6 table | B: model + map diff | B: the apiserver's handling of the create | B: API write received → entry in map |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for n in plan.all_ns() {
        let _ = writeln!(
            w,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            int(n),
            range(ms(r.per_rule_change.get(&(n, Backend::Legacy)))),
            range(ms(r.per_rule_change.get(&(n, Backend::Nft)))),
            range(ms(r.restore_change.get(&(n, Backend::Legacy)))),
            range(ms(r.restore_change.get(&(n, Backend::Nft)))),
            range(ms(r.nft_change.get(&(n, Family::V4)))),
            range(ms(r.nft_change.get(&(n, Family::V6)))),
            range(r.agent_change_summary(n, |c| c.sync, Unit::Millis)),
            range(r.agent_change_summary(n, |c| c.apiserver, Unit::Millis)),
            range(r.agent_change_summary(n, |c| c.end_to_end, Unit::Millis)),
        );
    }
    let _ = writeln!(w, "\n## Per-packet cost of the pod ingress program (BPF_PROG_TEST_RUN, ns/packet)\n");
    let _ = writeln!(
        w,
        "| frontends | hit | miss | empty program | hit from outside the pod CIDRs | hit / empty |\n|---:|---:|---:|---:|---:|---:|"
    );
    for (n, c) in &r.prog {
        let _ = writeln!(
            w,
            "| {} | {} | {} | {} | {} | {:.1} |",
            int(*n),
            range(Some(c.hit)),
            range(Some(c.miss)),
            range(Some(c.empty)),
            range(Some(c.not_pod)),
            c.hit.median / c.empty.median
        );
    }
    if let Some((n, c)) = r.prog.iter().next_back() {
        let _ = writeln!(
            w,
            "\nWhere a hit's {} ns go at N = {} (differences of the medians above):\n",
            num(c.hit.median),
            int(*n)
        );
        for (what, ns) in c.breakdown() {
            let _ = writeln!(w, "- {what}: {} ns ({:.0} %)", num(ns), 100.0 * ns / c.hit.median);
        }
    }
    let _ = writeln!(w, "\n## Agent memory (VmRSS after the first sync, MiB)\n");
    let _ = writeln!(w, "| N | node-manager |\n|---:|---:|");
    for n in plan.all_ns() {
        let _ = writeln!(w, "| {} | {} |", int(n), range(r.rss_mib(n)));
    }
    let _ = writeln!(w);
}

/// Pod → [EXT_V6]:port, for the sides measured on IPv6 too (the floors → the cluster IPv6
/// address), with B's per-round ratios to them.
fn v6_table(w: &mut String, plan: &Plan, r: &Results) {
    if r.conn_v6.is_empty() {
        return;
    }
    let _ = writeln!(
        w,
        "\n## IPv6: pod → [{}]:port of the last-listed Service, new TCP connections per second (connect median, µs)\n",
        lab::EXTERNAL_V6
    );
    let _ = writeln!(
        w,
        "The same rounds as the IPv4 table, each side's IPv6 run right after its IPv4 one; C and C′ connect to the cluster IP [{}], A′ DNATs in its `ip6` table, B rewrites in the same programs and map. network-node-manager writes IPv4 rules only.\n",
        lab::CLUSTER_V6
    );
    let sides = Variant::V6;
    let names: Vec<&str> = sides.iter().map(|v| v.label()).collect();
    let _ = writeln!(w, "| N | {} | B/C | B/C′ | B/A′ |\n|---:|{}", names.join(" | "), "---:|".repeat(sides.len() + 3));
    for &n in &plan.ns {
        let cells: Vec<String> = sides
            .iter()
            .map(|&v| {
                let med = r.v6_summary(n, v, |s| s.median_us).map_or("—".into(), |s| num(s.median));
                format!("{} ({med})", range(r.v6_summary(n, v, |s| s.rate)))
            })
            .collect();
        let _ = writeln!(
            w,
            "| {} | {} | {} | {} | {} |",
            int(n),
            cells.join(" | "),
            ratio(r.v6_ratio(n, Variant::B, Variant::C)),
            ratio(r.v6_ratio(n, Variant::B, Variant::CMasq)),
            ratio(r.v6_ratio(n, Variant::B, Variant::NftMap))
        );
    }
}

/// Node processes → EXT:port: B's socket hook against the nat OUTPUT rules of A and A′ and the
/// floor (a node process → the cluster IP).
/// B's pod with its process below the hooked cgroup, as every pod is under the DaemonSet's
/// default `--cgroup-path` (the cgroup root): served at `connect()`, against the same round's
/// pod sides.
fn socket_table(w: &mut String, plan: &Plan, r: &Results) {
    if r.conn_socket.is_empty() {
        return;
    }
    let _ = writeln!(
        w,
        "\n## Pods served at the socket (the DaemonSet's default): pod → EXT:port, new TCP connections per second (connect median, µs) and one stream (Gbit/s)\n"
    );
    let _ = writeln!(
        w,
        "The same pod as B's above, its process moved below B's hooked cgroup for a run right after B's own in each round: the cgroup `connect4` hook puts the cluster IP in, the pod's packets leave it addressed to the cluster IP (the TC programs see a miss), nothing masquerades them and no flow is remembered — the path every pod takes under the DaemonSet's default `--cgroup-path` (the cgroup root). The backend sees the pod's own address, as C's does (C′ and A′ masquerade, as B's TC path does). Ratios per round against the sides' pod runs of the same round.\n"
    );
    let sides = [Variant::C, Variant::CMasq, Variant::NftMap, Variant::B];
    let names: Vec<&str> = sides.iter().map(|v| v.label()).collect();
    let _ = writeln!(
        w,
        "| N | {} | B at the socket | B at the socket / C | / C′ | / A′ | stream: B at the socket | stream / C | stream / C′ |\n|---:|{}",
        names.join(" | "),
        "---:|".repeat(sides.len() + 7)
    );
    for &n in &plan.ns {
        let cell = |rate: Option<Summary>, median: Option<Summary>| {
            format!("{} ({})", range(rate), median.map_or("—".into(), |s| num(s.median)))
        };
        let cells: Vec<String> = sides
            .iter()
            .map(|&v| cell(r.conn_summary(n, v, |s| s.rate), r.conn_summary(n, v, |s| s.median_us)))
            .collect();
        let _ = writeln!(
            w,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            int(n),
            cells.join(" | "),
            cell(r.socket_summary(n, |s| s.rate), r.socket_summary(n, |s| s.median_us)),
            ratio(r.socket_ratio(n, Variant::C)),
            ratio(r.socket_ratio(n, Variant::CMasq)),
            ratio(r.socket_ratio(n, Variant::NftMap)),
            range(Summary::of(&r.socket_iperf_gbit(n))),
            ratio(r.socket_iperf_ratio(n, Variant::C)),
            ratio(r.socket_iperf_ratio(n, Variant::CMasq))
        );
    }
}

fn host_table(w: &mut String, plan: &Plan, r: &Results) {
    if r.conn_host.is_empty() {
        return;
    }
    let _ = writeln!(
        w,
        "\n## Host-network clients: a node process → EXT:port, new TCP connections per second (connect median, µs)\n"
    );
    let _ = writeln!(
        w,
        "B rewrites at `connect()` (cgroup hook: no NAT, no conntrack entry for the rewrite); A and A′ DNAT in the nat OUTPUT hook; C connects to the cluster IP.\n"
    );
    let sides = Variant::HOST;
    let names: Vec<&str> = sides.iter().map(|v| v.label()).collect();
    let _ = writeln!(
        w,
        "| N | {} | B/C | B/A′ | B/A legacy | B/A nft |\n|---:|{}",
        names.join(" | "),
        "---:|".repeat(sides.len() + 4)
    );
    for &n in &plan.ns {
        let cells: Vec<String> = sides
            .iter()
            .map(|&v| {
                let med = r.host_summary(n, v, |s| s.median_us).map_or("—".into(), |s| num(s.median));
                format!("{} ({med})", range(r.host_summary(n, v, |s| s.rate)))
            })
            .collect();
        let _ = writeln!(
            w,
            "| {} | {} | {} | {} | {} | {} |",
            int(n),
            cells.join(" | "),
            ratio(r.host_ratio(n, Variant::B, Variant::C)),
            ratio(r.host_ratio(n, Variant::B, Variant::NftMap)),
            ratio(r.host_ratio(n, Variant::B, A_LEGACY)),
            ratio(r.host_ratio(n, Variant::B, A_NFT))
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::results::ConnSample;

    fn sample(rate: f64) -> ConnSample {
        ConnSample { rate, median_us: 50.0, p99_us: 90.0, connections: 1000, errors: 0 }
    }

    #[test]
    fn the_ipv6_table_has_a_row_per_n_with_bs_per_round_ratios() {
        let plan = Plan { ns: vec![1_000], ..Plan::new(true) };
        let mut r = Results::default();
        let mut w = String::new();
        v6_table(&mut w, &plan, &r);
        assert_eq!(w, "", "no IPv6 figures, no table");
        for (v, rates) in [
            (Variant::C, [10_000.0, 8_000.0]),
            (Variant::CMasq, [8_000.0, 8_000.0]),
            (Variant::NftMap, [5_000.0, 4_000.0]),
            (Variant::B, [7_000.0, 6_000.0]),
        ] {
            r.conn_v6.insert((1_000, v), rates.iter().map(|&x| sample(x)).collect());
        }
        v6_table(&mut w, &plan, &r);
        assert!(w.contains("## IPv6: pod → [2001:db8:e::10]:port"), "{w}");
        assert!(
            w.contains("| N | C: no rewrite | C′: no rewrite, masqueraded | A′: nftables set + map | B: node-manager | B/C | B/C′ | B/A′ |\n|---:|---:|---:|---:|---:|---:|---:|---:|\n"),
            "{w}"
        );
        assert!(
            w.contains("| 1,000 | 9,000 [8,000–10,000] (50.0) | 8,000 [8,000–8,000] (50.0) | 4,500 [4,000–5,000] (50.0) | 6,500 [6,000–7,000] (50.0) | **0.72×** [0.70–0.75] | **0.81×** [0.75–0.88] | **1.45×** [1.40–1.50] |"),
            "{w}"
        );
    }
}
