//! The pure model: Services (+ the node's pod CIDRs) → the frontends the datapath should hold.
//! No I/O: everything here is decided from its inputs and tested exhaustively.
//!
//! Follows network-node-manager ≥ 1.2.1 (every `status.loadBalancer.ingress[].ip` and every
//! `spec.externalIPs[]`, of any Service type, to the cluster IP of the same family) and fixes its
//! known bugs: frontends are keyed by (address, port, protocol) so Services sharing an LB IP on
//! different ports each get theirs; headless, ExternalName, `ipMode: Proxy` and hostname-only
//! ingress are skipped; malformed addresses are reported and skipped, not passed on.
use std::{
    collections::{BTreeMap, btree_map::Entry},
    fmt,
    net::IpAddr,
};

use compact_str::CompactString;
use ipnet::IpNet;
use k8s_openapi::api::core::v1::Service;

mod incremental;
pub use incremental::{Model, Update};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    /// ICMP echo (ICMPv6 echo for IPv6 addresses); port 0.
    IcmpEcho,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::IcmpEcho => "ICMP",
        })
    }
}

/// An external address as a pod dials it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FrontendAddr {
    pub addr: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

impl fmt::Display for FrontendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.addr {
            IpAddr::V4(a) => write!(f, "{a}:{}/{}", self.port, self.protocol),
            IpAddr::V6(a) => write!(f, "[{a}]:{}/{}", self.port, self.protocol),
        }
    }
}

/// Where a frontend goes, and which Service asked for it (`namespace/name`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub cluster_ip: IpAddr,
    /// `namespace/name` (held inline up to 24 bytes: one per frontend, and every agent holds
    /// every frontend of the cluster).
    pub owner: CompactString,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub frontends: BTreeMap<FrontendAddr, Target>,
    /// One line per problem, naming the Service: logged by the caller.
    pub warnings: Vec<String>,
}

#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Only external addresses inside these networks are served (None: all).
    pub external_ip_allow: Option<Vec<IpNet>>,
    pub ipv4: bool,
    pub ipv6: bool,
}

impl Options {
    pub fn all() -> Options {
        Options { external_ip_allow: None, ipv4: true, ipv6: true }
    }
}

/// A Service as the model reads it, and nothing more. The sources convert each Service version
/// once, when it arrives: k8s-openapi's `Service` is about 840 bytes inline however few of its
/// fields are set, and the agent holds every Service of the cluster.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceInfo {
    /// `namespace/name`.
    pub name: CompactString,
    /// No spec, or `type: ExternalName`: no frontends.
    pub no_frontends: bool,
    /// `spec.clusterIPs` (dual-stack), or else `spec.clusterIP`, as written. (Texts are
    /// `CompactString`s: an address, a protocol or a short name is held inline, not in a heap
    /// allocation of its own; at 100,000 Services those were about a third of their memory.)
    pub cluster_ips: Vec<CompactString>,
    /// `spec.externalIPs`, as written.
    pub external_ips: Vec<CompactString>,
    /// `status.loadBalancer.ingress[].ip`, as written, of the entries the model serves: an
    /// entry in `ipMode: Proxy` must reach the load balancer (PROXY protocol, TLS, ...), and
    /// kube-proxy does not short-circuit it either; a hostname-only entry (e.g. AWS ELB) has
    /// nothing to rewrite.
    pub ingress_ips: Vec<CompactString>,
    /// `spec.ports[]`: the port and the protocol as written (none means TCP).
    pub ports: Vec<(i32, Option<CompactString>)>,
}

impl From<&Service> for ServiceInfo {
    fn from(svc: &Service) -> ServiceInfo {
        let name = service_name(svc).into();
        let Some(spec) = svc.spec.as_ref().filter(|spec| spec.type_.as_deref() != Some("ExternalName")) else {
            return ServiceInfo { name, no_frontends: true, ..ServiceInfo::default() };
        };
        let texts = |list: &[String]| list.iter().map(CompactString::from).collect::<Vec<_>>();
        let cluster_ips = match (&spec.cluster_ips, &spec.cluster_ip) {
            (Some(ips), _) if !ips.is_empty() => texts(ips),
            (_, Some(ip)) => vec![ip.into()],
            _ => Vec::new(),
        };
        let ingress = svc.status.as_ref().and_then(|s| s.load_balancer.as_ref()).and_then(|lb| lb.ingress.as_ref());
        ServiceInfo {
            name,
            no_frontends: false,
            cluster_ips,
            external_ips: spec.external_ips.as_deref().map(texts).unwrap_or_default(),
            ingress_ips: ingress
                .into_iter()
                .flatten()
                .filter(|entry| entry.ip_mode.as_deref() != Some("Proxy"))
                .filter_map(|entry| entry.ip.as_deref().filter(|ip| !ip.is_empty()).map(CompactString::from))
                .collect(),
            ports: spec
                .ports
                .iter()
                .flatten()
                .map(|p| (p.port, p.protocol.as_deref().map(CompactString::from)))
                .collect(),
        }
    }
}

pub fn service_name(svc: &Service) -> String {
    format!(
        "{}/{}",
        svc.metadata.namespace.as_deref().unwrap_or("default"),
        svc.metadata.name.as_deref().unwrap_or("<unnamed>")
    )
}

/// Computes the desired frontends. Conflicts (two Services claiming the same address, port
/// and protocol) go to the Service whose `namespace/name` sorts first, with a warning naming
/// both, so every agent in the cluster picks the same winner.
pub fn desired<S: std::borrow::Borrow<ServiceInfo>>(services: &[S], opts: &Options) -> Desired {
    let mut out = Desired::default();
    let mut sorted: Vec<&ServiceInfo> = services.iter().map(|s| s.borrow()).collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    for svc in sorted {
        let owner = &svc.name;
        for (frontend, cluster_ip) in service_frontends(svc, opts, &mut out.warnings) {
            match out.frontends.entry(frontend) {
                Entry::Vacant(v) => {
                    v.insert(Target { cluster_ip, owner: owner.clone() });
                }
                Entry::Occupied(o) => {
                    let winner = &o.get().owner;
                    // Several Services sharing one LB IP on different ports is normal (MetalLB's
                    // allow-shared-ip); only the echo entry overlaps then, so it is not a conflict.
                    if frontend.protocol != Protocol::IcmpEcho && winner != owner {
                        out.warnings.push(format!(
                            "{owner}: frontend {frontend} is also claimed by {winner}; {winner} wins (sorts first)"
                        ));
                    }
                }
            }
        }
    }
    out
}

/// The frontends of one Service, with the cluster IP of each one's family.
fn service_frontends(svc: &ServiceInfo, opts: &Options, warnings: &mut Vec<String>) -> Vec<(FrontendAddr, IpAddr)> {
    let owner = &svc.name;
    if svc.no_frontends {
        return Vec::new();
    }
    // Cluster IPs by family.
    let mut cluster_v4 = None;
    let mut cluster_v6 = None;
    let cluster_ips = &svc.cluster_ips;
    if cluster_ips.is_empty() || cluster_ips.iter().any(|ip| ip == "None" || ip.is_empty()) {
        return Vec::new(); // headless, or not allocated yet
    }
    for text in cluster_ips {
        match text.parse::<IpAddr>() {
            Ok(ip @ IpAddr::V4(_)) => {
                cluster_v4.get_or_insert(ip);
            }
            Ok(ip @ IpAddr::V6(_)) => {
                cluster_v6.get_or_insert(ip);
            }
            Err(_) => warnings.push(format!("{owner}: cluster IP {text:?} is not an IP address; ignored")),
        }
    }

    let mut externals: Vec<IpAddr> = Vec::new();
    let mut add_external = |text: &str, origin: &str, warnings: &mut Vec<String>| match text.trim().parse::<IpAddr>() {
        Ok(ip) => {
            if !externals.contains(&ip) {
                externals.push(ip);
            }
        }
        Err(_) => warnings.push(format!("{owner}: {origin} {text:?} is not an IP address; skipped")),
    };
    for ip in &svc.external_ips {
        add_external(ip, "spec.externalIPs entry", warnings);
    }
    for ip in &svc.ingress_ips {
        add_external(ip, "status.loadBalancer.ingress ip", warnings);
    }

    let mut ports: Vec<(u16, Protocol)> = Vec::new();
    for &(port, ref protocol) in &svc.ports {
        let protocol = match protocol.as_deref().unwrap_or("TCP") {
            "TCP" => Protocol::Tcp,
            "UDP" => Protocol::Udp,
            other => {
                warnings
                    .push(format!("{owner}: port {port} protocol {other} is not supported by the datapath; skipped"));
                continue;
            }
        };
        match u16::try_from(port) {
            Ok(p) if p != 0 => ports.push((p, protocol)),
            _ => warnings.push(format!("{owner}: port {port} is out of range; skipped")),
        }
    }

    let mut out = Vec::new();
    for ext in externals {
        let (enabled, cluster) = match ext {
            IpAddr::V4(_) => (opts.ipv4, cluster_v4),
            IpAddr::V6(_) => (opts.ipv6, cluster_v6),
        };
        if !enabled {
            continue;
        }
        if let Some(allow) = &opts.external_ip_allow
            && !allow.iter().any(|net| net.contains(&ext))
        {
            warnings.push(format!("{owner}: external address {ext} is outside --external-ip-allow; not rewritten"));
            continue;
        }
        let Some(cluster_ip) = cluster else {
            warnings.push(format!(
                "{owner}: external address {ext} has no cluster IP of its family (clusterIPs {cluster_ips:?}); skipped"
            ));
            continue;
        };
        for &(port, protocol) in &ports {
            out.push((FrontendAddr { addr: ext, port, protocol }, cluster_ip));
        }
        if !ports.is_empty() {
            out.push((FrontendAddr { addr: ext, port: 0, protocol: Protocol::IcmpEcho }, cluster_ip));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn svc(v: serde_json::Value) -> ServiceInfo {
        ServiceInfo::from(&serde_json::from_value::<Service>(v).expect("valid Service JSON"))
    }

    fn lb(ns: &str, name: &str, cluster: &[&str], ingress: &[&str], ports: &[(u16, &str)]) -> ServiceInfo {
        svc(json!({
            "metadata": {"namespace": ns, "name": name},
            "spec": {
                "type": "LoadBalancer",
                "clusterIP": cluster[0],
                "clusterIPs": cluster,
                "externalTrafficPolicy": "Local",
                "ports": ports.iter().map(|(p, proto)| json!({"port": p, "protocol": proto})).collect::<Vec<_>>(),
            },
            "status": {"loadBalancer": {"ingress": ingress.iter().map(|ip| json!({"ip": ip})).collect::<Vec<_>>()}},
        }))
    }

    fn fe(addr: &str, port: u16, protocol: Protocol) -> FrontendAddr {
        FrontendAddr { addr: addr.parse().unwrap(), port, protocol }
    }

    fn targets(d: &Desired) -> Vec<(String, String, String)> {
        d.frontends.iter().map(|(k, t)| (k.to_string(), t.cluster_ip.to_string(), t.owner.to_string())).collect()
    }

    #[test]
    fn load_balancer_ip_maps_each_port_and_echo_to_the_cluster_ip() {
        let d = desired(
            &[lb("default", "web", &["10.96.0.10"], &["203.0.113.10"], &[(80, "TCP"), (53, "UDP")])],
            &Options::all(),
        );
        assert!(d.warnings.is_empty(), "{:?}", d.warnings);
        assert_eq!(
            targets(&d),
            vec![
                ("203.0.113.10:0/ICMP".into(), "10.96.0.10".into(), "default/web".into()),
                ("203.0.113.10:53/UDP".into(), "10.96.0.10".into(), "default/web".into()),
                ("203.0.113.10:80/TCP".into(), "10.96.0.10".into(), "default/web".into()),
            ]
        );
    }

    #[test]
    fn external_ips_of_any_type_are_included() {
        let s = svc(json!({
            "metadata": {"namespace": "a", "name": "ext"},
            "spec": {"type": "ClusterIP", "clusterIP": "10.96.0.11", "externalIPs": ["198.51.100.7"], "ports": [{"port": 443}]},
        }));
        let d = desired(&[s], &Options::all());
        assert_eq!(d.frontends[&fe("198.51.100.7", 443, Protocol::Tcp)].cluster_ip.to_string(), "10.96.0.11");
    }

    #[test]
    fn dual_stack_picks_the_cluster_ip_of_the_same_family() {
        let s = lb("ns", "dual", &["fd00::10", "10.96.0.12"], &["203.0.113.20", "2001:db8::20"], &[(80, "TCP")]);
        let d = desired(&[s], &Options::all());
        assert_eq!(d.frontends[&fe("203.0.113.20", 80, Protocol::Tcp)].cluster_ip.to_string(), "10.96.0.12");
        assert_eq!(d.frontends[&fe("2001:db8::20", 80, Protocol::Tcp)].cluster_ip.to_string(), "fd00::10");
    }

    #[test]
    fn single_stack_service_with_other_family_address_warns_and_skips_it() {
        let s = lb("ns", "v4only", &["10.96.0.13"], &["203.0.113.21", "2001:db8::21"], &[(80, "TCP")]);
        let d = desired(&[s], &Options::all());
        assert!(d.frontends.contains_key(&fe("203.0.113.21", 80, Protocol::Tcp)));
        assert!(!d.frontends.keys().any(|k| k.addr.is_ipv6()));
        assert_eq!(d.warnings.len(), 1);
        assert!(d.warnings[0].contains("ns/v4only") && d.warnings[0].contains("2001:db8::21"), "{:?}", d.warnings);
    }

    #[test]
    fn shared_ip_on_different_ports_gives_each_service_its_own_frontend() {
        let a = lb("ns", "a", &["10.96.0.1"], &["203.0.113.30"], &[(80, "TCP")]);
        let b = lb("ns", "b", &["10.96.0.2"], &["203.0.113.30"], &[(443, "TCP")]);
        let d = desired(&[b, a], &Options::all());
        assert!(d.warnings.is_empty(), "{:?}", d.warnings);
        assert_eq!(d.frontends[&fe("203.0.113.30", 80, Protocol::Tcp)].owner, "ns/a");
        assert_eq!(d.frontends[&fe("203.0.113.30", 443, Protocol::Tcp)].owner, "ns/b");
        // Echo goes to the first Service by name, deterministically.
        assert_eq!(d.frontends[&fe("203.0.113.30", 0, Protocol::IcmpEcho)].owner, "ns/a");
    }

    #[test]
    fn duplicate_claim_has_a_deterministic_winner_and_a_warning_naming_both() {
        let a = lb("ns", "a", &["10.96.0.1"], &["203.0.113.31"], &[(80, "TCP")]);
        let z = lb("ns", "z", &["10.96.0.2"], &["203.0.113.31"], &[(80, "TCP")]);
        for order in [vec![a.clone(), z.clone()], vec![z, a]] {
            let d = desired(&order, &Options::all());
            assert_eq!(d.frontends[&fe("203.0.113.31", 80, Protocol::Tcp)].owner, "ns/a");
            assert_eq!(d.warnings.len(), 1, "{:?}", d.warnings);
            assert!(d.warnings[0].contains("ns/a") && d.warnings[0].contains("ns/z"));
        }
    }

    #[test]
    fn headless_external_name_proxy_mode_and_hostname_only_are_skipped() {
        let headless = lb("ns", "headless", &["None"], &["203.0.113.40"], &[(80, "TCP")]);
        let external_name = svc(json!({"metadata": {"namespace": "ns", "name": "en"},
            "spec": {"type": "ExternalName", "externalName": "example.org", "externalIPs": ["203.0.113.41"], "ports": [{"port": 80}]}}));
        let proxy = svc(json!({"metadata": {"namespace": "ns", "name": "proxy"},
            "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.3", "ports": [{"port": 80}]},
            "status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.42", "ipMode": "Proxy"}, {"ip": "203.0.113.43", "ipMode": "VIP"}]}}}));
        let hostname = svc(json!({"metadata": {"namespace": "ns", "name": "elb"},
            "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.4", "ports": [{"port": 80}]},
            "status": {"loadBalancer": {"ingress": [{"hostname": "abc.elb.example"}]}}}));
        let d = desired(&[headless, external_name, proxy, hostname], &Options::all());
        assert!(d.warnings.is_empty(), "{:?}", d.warnings);
        let addrs: Vec<String> = d.frontends.keys().map(|k| k.addr.to_string()).collect();
        assert_eq!(addrs, vec!["203.0.113.43", "203.0.113.43"]); // TCP 80 + echo, VIP mode only
    }

    #[test]
    fn malformed_addresses_warn_naming_the_service_and_the_rest_applies() {
        let s = svc(json!({"metadata": {"namespace": "ns", "name": "bad"},
            "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.5", "externalIPs": ["not-an-ip", "203.0.113.50"], "ports": [{"port": 80}, {"port": 99999}, {"port": 9, "protocol": "SCTP"}]},
            "status": {"loadBalancer": {"ingress": [{"ip": "300.1.1.1"}]}}}));
        let d = desired(&[s], &Options::all());
        assert_eq!(d.frontends.len(), 2, "{:?}", d.frontends); // 203.0.113.50:80 + echo
        assert_eq!(d.warnings.len(), 4, "{:?}", d.warnings);
        assert!(d.warnings.iter().all(|w| w.starts_with("ns/bad:")));
    }

    #[test]
    fn allow_list_rejects_addresses_outside_it() {
        let s = lb("ns", "hijack", &["10.96.0.6"], &["203.0.113.60", "8.8.8.8"], &[(53, "UDP")]);
        let opts = Options { external_ip_allow: Some(vec!["203.0.113.0/24".parse().unwrap()]), ..Options::all() };
        let d = desired(&[s], &opts);
        assert!(d.frontends.keys().all(|k| k.addr.to_string() == "203.0.113.60"));
        assert!(d.warnings.iter().any(|w| w.contains("8.8.8.8") && w.contains("--external-ip-allow")));
    }

    #[test]
    fn service_without_ports_or_spec_yields_nothing() {
        let no_ports = lb("ns", "noports", &["10.96.0.7"], &["203.0.113.70"], &[]);
        let no_spec = svc(json!({"metadata": {"namespace": "ns", "name": "nospec"}}));
        let d = desired(&[no_ports, no_spec], &Options::all());
        assert!(d.frontends.is_empty() && d.warnings.is_empty());
    }

    #[test]
    fn family_switches_limit_frontends() {
        let s = lb("ns", "dual", &["10.96.0.8", "fd00::8"], &["203.0.113.80", "2001:db8::80"], &[(80, "TCP")]);
        let d = desired(&[s], &Options { ipv6: false, ..Options::all() });
        assert!(d.frontends.keys().all(|k| k.addr.is_ipv4()));
    }
}
