//! The report's charts: what each one plots.

use std::time::Duration;

use super::{A_LEGACY, A_NFT, ms};
use crate::{
    baseline::Backend,
    plot::{self, Chart, Point, Series},
    results::{Plan, Results, Variant},
    services::Family,
    stats::{Summary, Unit},
};

fn series(name: &str, color: plotters::style::RGBColor, points: Vec<Point>) -> Series {
    Series { name: name.into(), color, points }
}

fn pt(x: usize, y: Option<Summary>) -> Option<Point> {
    Some(Point { x: x as f64, y: y?, lower_bound: false })
}

pub(super) fn charts(plan: &Plan, r: &Results) -> Vec<(&'static str, Chart<'static>)> {
    let colors = [
        (Variant::C, plot::GREEN),
        (Variant::CMasq, plot::GREY),
        (A_LEGACY, plot::RED),
        (A_NFT, plot::ORANGE),
        (Variant::NftMap, plot::PURPLE),
        (Variant::B, plot::BLUE),
    ];
    // The sides of `among` (all when None), each with its colour.
    let per_variant_of = |among: Option<&[Variant]>, f: &dyn Fn(usize, Variant) -> Option<Summary>| -> Vec<Series> {
        colors
            .iter()
            .filter(|(v, _)| among.is_none_or(|a| a.contains(v)))
            .map(|&(v, c)| series(v.label(), c, plan.ns.iter().filter_map(|&n| pt(n, f(n, v))).collect()))
            .collect()
    };
    let per_variant = |f: &dyn Fn(usize, Variant) -> Option<Summary>| per_variant_of(None, f);
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
            "connections_ipv6.png",
            Chart {
                title: "IPv6: new TCP connections per second, pod → [EXT_V6]:port",
                x_label: "Services (N)",
                y_label: "connections / s",
                series: per_variant_of(Some(&Variant::V6), &|n, v| r.v6_summary(n, v, |s| s.rate)),
            },
        ),
        (
            "connections_host.png",
            Chart {
                title: "Host-network clients: a node process → EXT:port",
                x_label: "Services (N)",
                y_label: "connections / s",
                series: per_variant_of(Some(&Variant::HOST), &|n, v| r.host_summary(n, v, |s| s.rate)),
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
    let nft_points = |m: &std::collections::BTreeMap<(usize, Family), Vec<Duration>>, f: Family| -> Vec<Point> {
        plan.ns.iter().filter_map(|&n| pt(n, ms(m.get(&(n, f))))).collect()
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
                series("A′, nft -f of the set + map", plot::GREEN, nft_points(&r.nft_apply, Family::V4)),
                series("A′, the same, IPv6 table", plot::GREY, nft_points(&r.nft_apply, Family::V6)),
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
                series("A′, one add-element transaction", plot::GREEN, nft_points(&r.nft_change, Family::V4)),
                series("A′, the same, IPv6 table", plot::GREY, nft_points(&r.nft_change, Family::V6)),
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
