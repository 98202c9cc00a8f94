//! Many Services: as JSON objects for `fake-apiserver` (`valid_service`, the stand-in that
//! serves objects the real apiserver would refuse, in `bad_services.rs`) and as YAML for the
//! real apiserver (`real_service_yaml`); and reading the pinned frontends map directly (faster
//! than `inspect --json` with 10,000 entries).
use std::{collections::BTreeMap, path::Path};

use aya::maps::{HashMap, Map, MapData};
use node_manager_common::{Frontend, FrontendKey, v4_mapped};
use serde_json::{Value, json};

pub const NODE: &str = "node-a";

/// The n-th valid Service `ok/sNNNNN`: LoadBalancer, TCP port 10000 + n, external address
/// 203.0.113.(1 + n % 250), cluster IP 198.51.100.(1 + n % 250).
pub fn valid_service(n: u32) -> Value {
    let (ext, cluster) = valid_addrs(n);
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": "ok", "name": format!("s{n:05}")},
        "spec": {"type": "LoadBalancer", "clusterIP": cluster, "clusterIPs": [cluster], "ipFamilies": ["IPv4"],
                 "externalTrafficPolicy": "Local",
                 "ports": [{"port": 10000 + n, "protocol": "TCP", "targetPort": 8080}]},
        "status": {"loadBalancer": {"ingress": [{"ip": ext, "ipMode": "VIP"}]}},
    })
}

fn valid_addrs(n: u32) -> (String, String) {
    let host = 1 + n % 250;
    (format!("203.0.113.{host}"), format!("198.51.100.{host}"))
}

/// The frontends map `valid_service(0..count)` must produce: one TCP entry each, and one ICMP
/// echo entry per external address.
pub fn valid_frontends(count: u32) -> BTreeMap<FrontendKey, Frontend> {
    let mut out = BTreeMap::new();
    for n in 0..count {
        let (ext, cluster) = valid_addrs(n);
        let addr = |s: &str| v4_mapped(s.parse::<std::net::Ipv4Addr>().unwrap().octets());
        let value = Frontend { cluster_addr: addr(&cluster) };
        let port = u16::try_from(10000 + n).unwrap();
        out.insert(FrontendKey { addr: addr(&ext), port: port.to_be(), proto: 6, pad: 0 }, value);
        out.entry(FrontendKey { addr: addr(&ext), port: 0, proto: 1, pad: 0 }).or_insert(value);
    }
    out
}

pub fn node(pod_cidrs: &[&str]) -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE},
           "spec": {"podCIDR": pod_cidrs.first(), "podCIDRs": pod_cidrs}})
}

/// The pinned frontends map under `bpffs`, or an empty map while it is not pinned yet.
pub fn pinned_frontends(bpffs: &Path) -> BTreeMap<FrontendKey, Frontend> {
    let pin = bpffs.join("node-manager/v1/maps/NM_FRONTENDS");
    let Ok(data) = MapData::from_pin(&pin) else { return BTreeMap::new() };
    let Ok(map) = HashMap::<_, FrontendKey, Frontend>::try_from(Map::HashMap(data)) else { return BTreeMap::new() };
    map.iter().filter_map(Result::ok).collect()
}

/// The n-th Service for the real apiserver, `ok/sNNNNN`: IPv6 (the /112 Service range has room
/// for 10,000 cluster IPs, the IPv4 /24 has not), cluster IP 2001:db8:5::(0x100 + n), external IP
/// 2001:db8:e::1:n, TCP port 10000 + n. As one YAML document.
pub fn real_service_yaml(n: u32) -> String {
    let (ext, cluster) = real_addrs(n);
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: s{n:05}, namespace: ok}}\nspec:\n  ipFamilies: [IPv6]\n  \
         clusterIP: '{cluster}'\n  externalIPs: ['{ext}']\n  ports:\n  - {{name: t, port: {}, protocol: TCP, targetPort: 8080}}\n",
        10000 + n
    )
}

fn real_addrs(n: u32) -> (std::net::Ipv6Addr, std::net::Ipv6Addr) {
    let ext = std::net::Ipv6Addr::new(0x2001, 0xdb8, 0xe, 0, 0, 0, 1, u16::try_from(n).unwrap());
    let cluster = std::net::Ipv6Addr::new(0x2001, 0xdb8, 5, 0, 0, 0, 0, u16::try_from(0x100 + n).unwrap());
    (ext, cluster)
}

/// The frontends map `real_service_yaml(range)` must produce: a TCP entry and an ICMPv6 echo
/// entry each.
pub fn real_frontends(range: std::ops::Range<u32>) -> BTreeMap<FrontendKey, Frontend> {
    let mut out = BTreeMap::new();
    for n in range {
        let (ext, cluster) = real_addrs(n);
        let value = Frontend { cluster_addr: cluster.octets() };
        let port = u16::try_from(10000 + n).unwrap();
        out.insert(FrontendKey { addr: ext.octets(), port: port.to_be(), proto: 6, pad: 0 }, value);
        out.insert(FrontendKey { addr: ext.octets(), port: 0, proto: 58, pad: 0 }, value);
    }
    out
}
