//! Many Services for `fake-apiserver`, and reading the pinned frontends map directly (faster
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
