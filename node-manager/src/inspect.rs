//! `node-manager inspect`: the state read by `crate::state`, printed for people (JSON for jq is
//! the state serialized as it is).
use crate::state::{DropInvalidState, State};

pub fn render(state: &State) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(out, "node-manager datapath at {}", state.pins);
    let _ = writeln!(out, "features:");
    for f in &state.features {
        let _ = writeln!(out, "  {:<32} {:<8} {}", f.name, if f.active { "active" } else { "inactive" }, f.mechanism);
    }
    render_drop_invalid(&mut out, &state.drop_invalid);
    if let Some(report) = &state.kernel_features {
        out.push_str(&report.to_string());
    }
    if !state.installed {
        let _ = writeln!(out, "  not installed (no pinned maps)");
        return out;
    }
    let _ = writeln!(out, "interfaces ({}):", state.interfaces.len());
    for i in &state.interfaces {
        if !i.present {
            let _ = writeln!(out, "  ifindex {} — gone, pin is stale", i.ifindex);
            continue;
        }
        let (hook, ingress, egress) = if i.tc_ingress.is_empty() && i.tc_egress.is_empty() {
            ("tcx", &i.tcx_ingress, &i.tcx_egress)
        } else {
            ("tc", &i.tc_ingress, &i.tc_egress)
        };
        let _ = writeln!(
            out,
            "  {} (ifindex {})  {hook} ingress: [{}]  {hook} egress: [{}]",
            i.name,
            i.ifindex,
            ingress.join(", "),
            egress.join(", ")
        );
    }
    let _ = writeln!(out, "cgroup socket hooks ({}):", state.cgroup_hooks.len());
    for h in &state.cgroup_hooks {
        let _ = writeln!(
            out,
            "  {:<13} {:<25} {} (id {})  program {} (id {})  link {}",
            h.hook,
            h.attach_type,
            h.cgroup_path.as_deref().unwrap_or("?"),
            h.cgroup_id,
            h.program,
            h.prog_id,
            h.link_id
        );
    }
    let _ = writeln!(
        out,
        "pod CIDRs: {}",
        if state.pod_cidrs.is_empty() { "(none)".to_owned() } else { state.pod_cidrs.join(", ") }
    );
    let _ = writeln!(out, "masquerade mark: {}", state.masquerade_mark.as_deref().unwrap_or("?"));
    let _ = writeln!(out, "frontends ({}):", state.frontends.len());
    for f in &state.frontends {
        let _ = writeln!(out, "  {:<40} -> {:<26} {}", f.frontend, f.cluster_ip, f.service.as_deref().unwrap_or("?"));
    }
    let _ = writeln!(out, "flows: {} TCP, {} UDP/ICMP remembered", state.flows, state.datagram_flows);
    let _ = writeln!(out, "host sockets: {} remembered", state.sockets);
    let _ = writeln!(
        out,
        "rewrites to cluster IPs: {} by the socket hooks (endpoint sees the client), {} packet(s) by TC (masqueraded)",
        state.served_by.socket, state.served_by.tc
    );
    let _ = writeln!(out, "counters:{:>28}{:>16}  path", "packets", "bytes");
    for c in &state.counters {
        let _ = writeln!(out, "  {:<24}{:>12}{:>16}  {}", c.name, c.packets, c.bytes, c.path);
    }
    out
}

fn render_drop_invalid(out: &mut String, d: &DropInvalidState) {
    use std::fmt::Write as _;
    let _ = writeln!(out, "drop-invalid: {}", d.mode.map_or("off".to_owned(), |m| m.to_string()));
    for link in &d.netfilter_links {
        let _ = writeln!(out, "  netfilter {link}");
    }
    for (family, ago) in [("ipv4", d.conntrack_seen_v4_ms_ago), ("ipv6", d.conntrack_seen_v6_ms_ago)] {
        if let Some(ms) = ago {
            let _ = writeln!(out, "  conntrack seen active on {family} {ms} ms ago");
        }
    }
    if d.nftables_table {
        let _ = writeln!(out, "  nftables table inet {} present", crate::features::drop_invalid::nft::TABLE);
    }
    if d.conntrack_holder {
        let _ = writeln!(
            out,
            "  nftables table inet {} present (keeps conntrack hooked)",
            crate::features::drop_invalid::nft::HOLDER_TABLE
        );
    }
    let c = &d.counters;
    for (name, value) in [("dropped_v4", c.dropped_v4), ("dropped_v6", c.dropped_v6)] {
        if let Some((packets, bytes)) = value {
            let _ = writeln!(out, "  {name:<22}{packets:>14}{bytes:>16}");
        }
    }
    for (name, value) in [("unverified_v4", c.unverified_v4), ("unverified_v6", c.unverified_v6)] {
        if let Some(packets) = value {
            let _ = writeln!(out, "  {name:<22}{packets:>14}");
        }
    }
    if let Some(n) = c.conntrack_invalid {
        let _ = writeln!(out, "  conntrack INVALID seen {n:>10}  (kernel statistics, this network namespace)");
    }
}
