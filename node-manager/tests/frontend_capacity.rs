//! The frontends map at its capacity (`FRONTENDS_MAX` entries), with the agent and real traffic
//! in the lab: a sync on a full map removes first, so renumbered Services move instead of
//! keeping their old entries, and the lab's Service, moved onto the lab's external address,
//! answers the pod; Services beyond the capacity are reported once by name and counted
//! (`frontends_not_applied`), the rest keeps syncing, and they are applied once room is made.
//! Needs root.
mod common;

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use common::{
    agent::{Agent, Scratch, http_get, lab_agent_args, wait_for, write},
    scale::pinned_frontends,
};
use lab::{Lab, Ns};
use node_manager_common::{FRONTENDS_MAX, FrontendKey, v4_mapped};
use serde_json::{Value, json};

/// Ports per filler Service: with its ICMPv6 echo entry, 128 entries each.
const FILLER_PORTS: u16 = 127;
const WAIT: Duration = Duration::from_secs(60);

/// Filler `i`: an IPv6 LoadBalancer Service at 2001:db8:e:<net>::<i> with `ports` TCP ports.
fn filler(i: u32, net: u16, ports: u16) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": "fill", "name": format!("f{i:04}")},
        "spec": {"type": "LoadBalancer", "clusterIP": format!("2001:db8:5::{:x}", 0x1000 + i),
                 "ipFamilies": ["IPv6"],
                 "ports": (1..=ports).map(|p| json!({"name": format!("p{p}"), "port": p, "protocol": "TCP"})).collect::<Vec<_>>()},
        "status": {"loadBalancer": {"ingress": [{"ip": format!("2001:db8:e:{net:x}::{i:x}")}]}},
    })
}

/// The lab's Service (TCP and UDP 8080, both families: 6 entries) at these LB IPs.
fn web(v4: &str, v6: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": "lab", "name": "web"},
        "spec": {"type": "LoadBalancer", "clusterIP": lab::CLUSTER_V4.to_string(),
                 "clusterIPs": [lab::CLUSTER_V4.to_string(), lab::CLUSTER_V6.to_string()], "ipFamilies": ["IPv4", "IPv6"],
                 "ports": [{"name": "tcp", "port": 8080, "protocol": "TCP"}, {"name": "udp", "port": 8080, "protocol": "UDP"}]},
        "status": {"loadBalancer": {"ingress": [{"ip": v4}, {"ip": v6}]}},
    })
}

/// 1,023 fillers of 128 entries, one of 122, and the lab's Service: exactly `FRONTENDS_MAX`.
fn full_set(renumbered: &[u32], web_service: Value) -> Vec<Value> {
    let mut items: Vec<Value> =
        (0..1023).map(|i| filler(i, if renumbered.contains(&i) { 2 } else { 1 }, FILLER_PORTS)).collect();
    items.push(filler(1023, 1, 121));
    items.push(web_service);
    items
}

fn list(items: &[Value]) -> String {
    json!({"apiVersion": "v1", "kind": "List", "items": items}).to_string()
}

fn has_addr(map: &BTreeMap<FrontendKey, node_manager_common::Frontend>, addr: [u8; 16]) -> bool {
    map.keys().any(|k| k.addr == addr)
}

fn ipv6(s: &str) -> [u8; 16] {
    s.parse::<std::net::Ipv6Addr>().unwrap().octets()
}

/// A gauge from the agent's `/metrics` (it listens in the node namespace).
fn metric(lab: &Lab, addr: SocketAddr, name: &str) -> Option<f64> {
    let (_, body) = lab::in_netns(lab.netns_path(Ns::Node), || Ok(http_get(addr, "/metrics"))).ok()?.ok()?;
    body.lines().find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
}

#[test]
fn a_full_frontends_map_still_moves_renumbered_services_and_reports_what_does_not_fit() {
    assert_eq!(FRONTENDS_MAX, 1023 * 128 + 122 + 6, "the fill below assumes this capacity");
    let lab = Lab::new().unwrap();
    let scratch = Scratch::new(&lab);
    let services = scratch.file("services.json");
    // The lab's Service starts at other LB IPs: the lab's external address is not rewritten.
    write(&services, &list(&full_set(&[], web("203.0.113.99", "2001:db8:e::99"))));
    let mut args = lab_agent_args(services.to_str().unwrap());
    args.extend(["--metrics-addr", "127.0.0.1:9617", "--resync-period", "1h"]);
    let agent = Agent::start(&scratch, &args);
    wait_for("the full map", WAIT, || pinned_frontends(&scratch.bpffs).len() == FRONTENDS_MAX as usize);
    let to = SocketAddr::from((lab::EXTERNAL_V4, lab::SERVICE_PORT));
    assert!(lab.tcp_request(Ns::Pod, to, b"x", Duration::from_secs(1)).is_err(), "not the lab's LB IP yet");

    // Renumber 10 fillers (new LB IPs) and move the lab's Service onto the lab's address, on
    // the full map: the sync must remove the old entries before it adds the new ones.
    let renumbered: Vec<u32> = (100..110).collect();
    write(&services, &list(&full_set(&renumbered, web(&lab::EXTERNAL_V4.to_string(), &lab::EXTERNAL_V6.to_string()))));
    let stale_v4 = v4_mapped([203, 0, 113, 99]);
    wait_for("the renumbered Services moved", WAIT, || {
        let map = pinned_frontends(&scratch.bpffs);
        map.len() == FRONTENDS_MAX as usize
            && !has_addr(&map, stale_v4)
            && renumbered.iter().all(|i| {
                !has_addr(&map, ipv6(&format!("2001:db8:e:1::{i:x}")))
                    && has_addr(&map, ipv6(&format!("2001:db8:e:2::{i:x}")))
            })
    });
    for ip in [std::net::IpAddr::from(lab::EXTERNAL_V4), lab::EXTERNAL_V6.into()] {
        let to = SocketAddr::new(ip, lab::SERVICE_PORT);
        let reply = lab
            .tcp_request(Ns::Pod, to, b"moved", Duration::from_secs(2))
            .unwrap_or_else(|e| panic!("TCP to {to} after the move: {e:#}\n{}", agent.log()));
        assert_eq!(reply.data, b"echo:moved");
    }
    let metrics: SocketAddr = "127.0.0.1:9617".parse().unwrap();
    assert_eq!(metric(&lab, metrics, "node_manager_frontends_not_applied"), Some(0.0));

    // Three more Services than fit: reported once by name, counted; the rest is applied.
    let mut over = full_set(&renumbered, web(&lab::EXTERNAL_V4.to_string(), &lab::EXTERNAL_V6.to_string()));
    over.extend((2000..2003).map(|i| filler(i, 3, FILLER_PORTS)));
    write(&services, &list(&over));
    wait_for("the warning naming the Services that do not fit", WAIT, || agent.log().contains("fill/f2000"));
    let log = agent.log();
    let warning = log.lines().find(|l| l.contains("do not fit")).unwrap_or_else(|| panic!("no warning:\n{log}"));
    for name in ["fill/f2000", "fill/f2001", "fill/f2002", "384 frontends"] {
        assert!(warning.contains(name), "{name} not in {warning}");
    }
    assert_eq!(metric(&lab, metrics, "node_manager_frontends_not_applied"), Some(384.0));
    assert_eq!(pinned_frontends(&scratch.bpffs).len(), FRONTENDS_MAX as usize);
    assert!(lab.tcp_request(Ns::Pod, to, b"x", Duration::from_secs(2)).is_ok(), "the rest keeps working");

    // Room made (three fillers deleted): the waiting Services are applied by the next sync.
    over.retain(|s| !["f0000", "f0001", "f0002"].contains(&s["metadata"]["name"].as_str().unwrap()));
    write(&services, &list(&over));
    wait_for("the waiting Services applied", WAIT, || {
        let map = pinned_frontends(&scratch.bpffs);
        (2000..2003).all(|i: u32| has_addr(&map, ipv6(&format!("2001:db8:e:3::{i:x}"))))
            && !has_addr(&map, ipv6("2001:db8:e:1::0"))
    });
    assert_eq!(metric(&lab, metrics, "node_manager_frontends_not_applied"), Some(0.0));
    assert_eq!(log.matches("do not fit").count(), 1, "reported once:\n{log}");
    drop(agent);
}
