//! What makes a run a broken measurement: a figure missing or nonsensical. Never a threshold
//! on how fast anything is (the machines are shared and noisy).

use crate::{
    baseline::Backend,
    results::{Plan, Results, Variant},
    services::Family,
    stats::{Summary, Unit},
};

/// Every problem found, one line each; empty for a sound run.
pub fn problems(plan: &Plan, r: &Results) -> Vec<String> {
    let mut p = Problems::default();
    for &n in &plan.ns {
        for v in Variant::ALL {
            let label = v.label();
            let rounds = r.conn.get(&(n, v)).map_or(0, Vec::len);
            if rounds != plan.rounds {
                p.push(format!("N = {n}, {label}: {rounds} connection rounds of {}", plan.rounds));
            }
            p.need(format!("N = {n}, {label}: connections/s"), r.conn_summary(n, v, |c| c.rate));
            p.need(format!("N = {n}, {label}: connect median"), r.conn_summary(n, v, |c| c.median_us));
            p.need(format!("N = {n}, {label}: connect p99"), r.conn_summary(n, v, |c| c.p99_us));
            p.need(format!("N = {n}, {label}: throughput"), Summary::of(&r.iperf_gbit(n, v)));
            let iperf_rounds = r.iperf.get(&(n, v)).map_or(0, Vec::len);
            if iperf_rounds != plan.iperf_rounds {
                p.push(format!("N = {n}, {label}: {iperf_rounds} iperf3 rounds of {}", plan.iperf_rounds));
            }
        }
        // B's rounds ran with the BPF statistics on: where its time goes needs them.
        if r.bpf.get(&n).is_none_or(Vec::is_empty) {
            p.push(format!("N = {n}, node-manager: no BPF statistics from its connection rounds"));
        }
        if r.bpf_stream.get(&n).is_none_or(Vec::is_empty) {
            p.push(format!("N = {n}, node-manager: no BPF statistics from its stream rounds"));
        }
        for v in Variant::TO_CLUSTER {
            let label = v.label();
            let rounds = r.conn_cluster.get(&(n, v)).map_or(0, Vec::len);
            if rounds != plan.rounds {
                p.push(format!("N = {n}, {label}: {rounds} rounds to the cluster IP of {}", plan.rounds));
            }
            p.need(format!("N = {n}, {label}: connections/s to the cluster IP"), r.cluster_summary(n, v, |c| c.rate));
        }
        for v in Variant::HOST {
            let label = v.label();
            let rounds = r.conn_host.get(&(n, v)).map_or(0, Vec::len);
            if rounds != plan.rounds {
                p.push(format!("N = {n}, {label}: {rounds} rounds from a node process of {}", plan.rounds));
            }
            p.need(format!("N = {n}, {label}: connections/s from a node process"), r.host_summary(n, v, |c| c.rate));
        }
        // B's pod again, below its hooked cgroup: served at the socket.
        let rounds = r.conn_socket.get(&n).map_or(0, Vec::len);
        if rounds != plan.rounds {
            p.push(format!(
                "N = {n}, node-manager: {rounds} rounds of the pod below the hooked cgroup of {}",
                plan.rounds
            ));
        }
        p.need(format!("N = {n}, node-manager: connections/s at the socket"), r.socket_summary(n, |c| c.rate));
        let rounds = r.iperf_socket.get(&n).map_or(0, Vec::len);
        if rounds != plan.iperf_rounds {
            p.push(format!(
                "N = {n}, node-manager: {rounds} iperf3 rounds of the pod below the hooked cgroup of {}",
                plan.iperf_rounds
            ));
        }
        p.need(format!("N = {n}, node-manager: throughput at the socket"), Summary::of(&r.socket_iperf_gbit(n)));
        for v in Variant::V6 {
            let label = v.label();
            let rounds = r.conn_v6.get(&(n, v)).map_or(0, Vec::len);
            if rounds != plan.rounds {
                p.push(format!("N = {n}, {label}: {rounds} IPv6 rounds of {}", plan.rounds));
            }
            p.need(format!("N = {n}, {label}: IPv6 connections/s"), r.v6_summary(n, v, |c| c.rate));
            p.need(format!("N = {n}, {label}: IPv6 connect median"), r.v6_summary(n, v, |c| c.median_us));
        }
        for family in Family::ALL {
            for (what, m) in [("nft -f apply", &r.nft_apply), ("add element", &r.nft_change)] {
                p.need(
                    format!("N = {n}, nftables set + map, {}: {what}", family.label()),
                    m.get(&(n, family)).and_then(|t| Summary::of_durations(t, Unit::Millis)),
                );
            }
        }
        for backend in Backend::ALL {
            let b = backend.iptables();
            let restore = r.restore_apply.get(&(n, backend)).and_then(|t| Summary::of_durations(t, Unit::Millis));
            p.need(format!("N = {n}, {b}: iptables-restore apply"), restore);
            let per_rule = r.per_rule_apply.get(&(n, backend));
            let per_rule_s = per_rule.filter(|a| a.done > 0).map(|a| a.elapsed.as_secs_f64());
            p.need(format!("N = {n}, {b}: per-rule apply"), per_rule_s.and_then(|s| Summary::of(&[s])));
            for (what, m) in [("per-rule change", &r.per_rule_change), ("restore change", &r.restore_change)] {
                p.need(
                    format!("N = {n}, {b}: {what}"),
                    m.get(&(n, backend)).and_then(|t| Summary::of_durations(t, Unit::Millis)),
                );
            }
        }
    }
    for n in plan.all_ns() {
        p.need(
            format!("N = {n}, node-manager: start → synced"),
            r.agent_start_summary(n, |s| s.end_to_end, Unit::Millis),
        );
        p.need(format!("N = {n}, node-manager: sync"), r.agent_start_summary(n, |s| s.sync, Unit::Millis));
        p.need(
            format!("N = {n}, node-manager: first Service list → synced"),
            r.agent_start_summary(n, |s| s.from_first_event, Unit::Millis),
        );
        p.need(
            format!("N = {n}, node-manager: change → map"),
            r.agent_change_summary(n, |c| c.end_to_end, Unit::Millis),
        );
        p.need(format!("N = {n}, node-manager: change sync"), r.agent_change_summary(n, |c| c.sync, Unit::Millis));
        p.need(format!("N = {n}, node-manager: RSS"), r.rss_mib(n));
        match r.prog.get(&n) {
            None => p.push(format!("N = {n}: per-packet cost missing")),
            Some(c) => {
                p.need(format!("N = {n}: per-packet hit"), Some(c.hit));
                p.need(format!("N = {n}: per-packet miss"), Some(c.miss));
                p.need(format!("N = {n}: per-packet empty program"), Some(c.empty));
                p.need(format!("N = {n}: per-packet hit from outside the pod CIDRs"), Some(c.not_pod));
                if c.hit.median < c.miss.median || c.miss.median < c.empty.median {
                    p.push(format!("N = {n}: per-packet hit < miss or miss < empty program ({c:?})"));
                }
            }
        }
    }
    if let Some(start) = r.agent_start.values().flatten().find(|s| s.sync > s.end_to_end) {
        p.push(format!("node-manager: its sync took longer than start → synced ({start:?})"));
    }
    p.0
}

#[derive(Default)]
struct Problems(Vec<String>);

impl Problems {
    fn push(&mut self, what: String) {
        self.0.push(what);
    }

    /// The figure must exist and be positive and finite.
    fn need(&mut self, what: String, s: Option<Summary>) {
        match s {
            None => self.push(format!("{what}: missing")),
            Some(s) if !s.is_sane() => self.push(format!("{what}: not positive and finite ({s:?})")),
            Some(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{
        agent::{Change, Start},
        baseline::PerRule,
        bpf_stats::{PerConnection, StreamShare},
        prog_cost::ProgCost,
        results::ConnSample,
    };

    fn plan() -> Plan {
        Plan { ns: vec![1], map_only: vec![10], ..Plan::new(true) }
    }

    fn s(v: f64) -> Summary {
        Summary { median: v, min: v, max: v, count: 1 }
    }

    /// Every figure of `plan`, sane.
    fn complete(plan: &Plan) -> Results {
        let mut r = Results::default();
        let ms = Duration::from_millis(5);
        for &n in &plan.ns {
            for v in Variant::ALL {
                let c = ConnSample { rate: 1e4, median_us: 40.0, p99_us: 80.0, connections: 5000, errors: 0 };
                r.conn.insert((n, v), vec![c; plan.rounds]);
                r.iperf.insert((n, v), vec![1e10; plan.iperf_rounds]);
                if Variant::TO_CLUSTER.contains(&v) {
                    r.conn_cluster.insert((n, v), vec![c; plan.rounds]);
                }
                if Variant::HOST.contains(&v) {
                    r.conn_host.insert((n, v), vec![c; plan.rounds]);
                }
                if Variant::V6.contains(&v) {
                    r.conn_v6.insert((n, v), vec![c; plan.rounds]);
                }
            }
            let c = ConnSample { rate: 1e4, median_us: 40.0, p99_us: 80.0, connections: 5000, errors: 0 };
            r.conn_socket.insert(n, vec![c; plan.rounds]);
            r.iperf_socket.insert(n, vec![1e10; plan.iperf_rounds]);
            r.bpf.insert(n, vec![PerConnection { runs: 4.0, ns: 2_000.0 }]);
            r.bpf_stream.insert(n, vec![StreamShare { runs_per_s: 100_000.0, ns_per_run: 300.0, cpu: 0.03 }]);
            for family in Family::ALL {
                r.nft_apply.insert((n, family), vec![ms]);
                r.nft_change.insert((n, family), vec![ms]);
            }
            for b in Backend::ALL {
                r.restore_apply.insert((n, b), vec![ms]);
                r.per_rule_apply.insert((n, b), PerRule { done: n, of: n, elapsed: ms, per_service_at_end: ms });
                r.per_rule_change.insert((n, b), vec![ms]);
                r.restore_change.insert((n, b), vec![ms]);
            }
        }
        for n in plan.all_ns() {
            r.agent_start.insert(
                n,
                vec![Start {
                    end_to_end: ms * 10,
                    sync: ms,
                    from_first_event: ms * 2,
                    listing: ms,
                    list_pages: 2,
                    rss_kib: 20_000,
                }],
            );
            r.agent_change.insert(n, vec![Change { end_to_end: ms, sync: ms / 2, apiserver: ms / 4 }]);
            r.prog.insert(n, ProgCost { hit: s(300.0), miss: s(140.0), empty: s(40.0), not_pod: s(200.0) });
        }
        r
    }

    #[test]
    fn a_complete_run_is_sound() {
        let plan = plan();
        assert_eq!(problems(&plan, &complete(&plan)), Vec::<String>::new());
    }

    #[test]
    fn missing_or_nonsensical_figures_are_named() {
        let plan = plan();
        let mut r = complete(&plan);
        r.iperf.remove(&(1, Variant::B));
        r.conn.get_mut(&(1, Variant::C)).unwrap()[0].rate = f64::NAN;
        r.prog.get_mut(&10).unwrap().hit = s(100.0);
        r.agent_start.get_mut(&10).unwrap()[0].rss_kib = 0;
        r.conn_cluster.get_mut(&(1, Variant::B)).unwrap().pop();
        r.conn_host.remove(&(1, Variant::NftMap));
        r.conn_v6.get_mut(&(1, Variant::B)).unwrap()[1].rate = 0.0;
        r.conn_v6.remove(&(1, Variant::CMasq));
        r.nft_change.remove(&(1, Family::V6));
        r.bpf_stream.remove(&1);
        r.conn_socket.get_mut(&1).unwrap().pop();
        r.iperf_socket.remove(&1);
        let p = problems(&plan, &r);
        assert!(p.iter().any(|l| l == "N = 1, node-manager: no BPF statistics from its stream rounds"), "{p:#?}");
        assert!(p.iter().any(|l| l == "N = 1, B: node-manager: throughput: missing"), "{p:#?}");
        assert!(p.iter().any(|l| l == "N = 1, C: no rewrite: connections/s: missing"), "{p:#?}");
        assert!(p.iter().any(|l| l.starts_with("N = 10: per-packet hit < miss")), "{p:#?}");
        assert!(p.iter().any(|l| l.starts_with("N = 10, node-manager: RSS: not positive")), "{p:#?}");
        assert!(p.iter().any(|l| l == "N = 1, B: node-manager: 0 iperf3 rounds of 2"), "{p:#?}");
        assert!(p.iter().any(|l| l == "N = 1, B: node-manager: 1 rounds to the cluster IP of 2"), "{p:#?}");
        assert!(p.iter().any(|l| l == "N = 1, A′: nftables set + map: 0 rounds from a node process of 2"), "{p:#?}");
        assert!(
            p.iter().any(|l| l == "N = 1, A′: nftables set + map: connections/s from a node process: missing"),
            "{p:#?}"
        );
        assert!(p.iter().any(|l| l.starts_with("N = 1, B: node-manager: IPv6 connections/s: not positive")), "{p:#?}");
        assert!(p.iter().any(|l| l == "N = 1, C′: no rewrite, masqueraded: 0 IPv6 rounds of 2"), "{p:#?}");
        assert!(p.iter().any(|l| l == "N = 1, C′: no rewrite, masqueraded: IPv6 connections/s: missing"), "{p:#?}");
        assert!(p.iter().any(|l| l == "N = 1, C′: no rewrite, masqueraded: IPv6 connect median: missing"), "{p:#?}");
        assert!(p.iter().any(|l| l == "N = 1, nftables set + map, IPv6: add element: missing"), "{p:#?}");
        assert!(
            p.iter().any(|l| l == "N = 1, node-manager: 1 rounds of the pod below the hooked cgroup of 2"),
            "{p:#?}"
        );
        assert!(
            p.iter().any(|l| l == "N = 1, node-manager: 0 iperf3 rounds of the pod below the hooked cgroup of 2"),
            "{p:#?}"
        );
        assert!(p.iter().any(|l| l == "N = 1, node-manager: throughput at the socket: missing"), "{p:#?}");
        assert_eq!(p.len(), 17, "{p:#?}");
    }
}
