//! The workload: N LoadBalancer Services, as objects for the real kube-apiserver (for
//! node-manager) and as network-node-manager's iptables rules (4 per external IP, §1.5.3 of the
//! prior-art inventory). The last-listed Service is the one the pod talks to: its rules come
//! last in network-node-manager's chains.
//!
//! The apiserver gives every Service its own cluster IP, and the documentation ranges hold only
//! 256 IPv4 ones: in the API the fillers are IPv6 (cluster IPs from 2001:db8:5::/108, one
//! external IP each of 240 in 2001:db8:e:1::/64, shared as the IPv4 ones are, with its own
//! port), the target dual-stack (the lab's IPv4 and IPv6
//! addresses), so the IPv6 sides talk to the same Service. node-manager keeps both families
//! in one hash map with 16-byte keys, so the map it looks the target up in has N Services'
//! entries either way; network-node-manager's chains get the IPv4 rules below, the nftables
//! peer a table per family.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The port of the target Service that the connection-rate client uses.
pub const CONN_PORT: u16 = 9000;
/// The port of the target Service that iperf3 uses.
pub const IPERF_PORT: u16 = 5201;
/// The Node the agent runs as.
pub const NODE: &str = "bench-node";
/// Filler Services spread their LB addresses over this many IPs of 203.0.113.0/24 (.11 up)
/// and their ports over the rest (documentation ranges hold too few IPv4 addresses for one
/// per Service). network-node-manager matches the IP only, so it still has 4 rules per
/// Service; node-manager keys by (IP, port, protocol), so it has one entry per Service.
pub const FILLER_IPS: usize = 240;
const FILLER_FIRST_PORT: usize = 1000;

/// network-node-manager's chains (nat table) and kube-proxy's masquerade-mark chain.
pub const KUBE_MARK_MASQ: &str = "KUBE-MARK-MASQ";
pub const NM_PREROUTING: &str = "NMANAGER_PREROUTING";
pub const NM_OUTPUT: &str = "NMANAGER_OUTPUT";
pub const EX_CLUS_PREROUTING: &str = "NMANAGER_EX_CLUS_PREROUTING";
pub const EX_CLUS_OUTPUT: &str = "NMANAGER_EX_CLUS_OUTPUT";

/// An address family of the benchmark's traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    pub fn label(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }
    /// nftables' name of the family (its table family and address-match keyword).
    pub fn nft(self) -> &'static str {
        match self {
            Family::V4 => "ip",
            Family::V6 => "ip6",
        }
    }
}

/// One LoadBalancer Service with one ingress IP per family.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Svc {
    pub namespace: String,
    pub name: String,
    pub lb: Ipv4Addr,
    pub cluster: Ipv4Addr,
    pub ports: Vec<u16>,
    /// The filler's number (`None` for the target).
    pub index: Option<usize>,
}

/// The target: the lab's Service, on the two benchmark ports.
pub fn target() -> Svc {
    Svc {
        namespace: "bench".into(),
        name: "target".into(),
        lb: lab::EXTERNAL_V4,
        cluster: lab::CLUSTER_V4,
        ports: vec![CONN_PORT, IPERF_PORT],
        index: None,
    }
}

/// The `i`-th filler Service (never the target's address).
pub fn filler(i: usize) -> Svc {
    let last = 11 + (i % FILLER_IPS) as u8;
    let port = FILLER_FIRST_PORT + i / FILLER_IPS;
    Svc {
        namespace: format!("ns{}", i % 50),
        name: format!("svc-{i:06}"),
        lb: Ipv4Addr::new(203, 0, 113, last),
        cluster: Ipv4Addr::new(198, 51, 100, last),
        ports: vec![u16::try_from(port).expect("at most ~15 million fillers")],
        index: Some(i),
    }
}

/// `n` Services: `n - 1` fillers, then the target.
pub fn services(n: usize) -> Vec<Svc> {
    assert!(n >= 1, "at least the target Service");
    (0..n - 1).map(filler).chain([target()]).collect()
}

/// Entries node-manager writes for `n` Services as the API holds them: a filler's (IP, port,
/// TCP), an ICMP echo entry per filler IP (shared by the fillers on it); per family of the
/// target, its two ports and its echo entry.
pub fn expected_frontends(n: usize) -> usize {
    (n - 1) + (n - 1).min(FILLER_IPS) + target().api_families().len() * (target().ports.len() + 1)
}

impl Svc {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The families the API holds the Service in: the target both, a filler IPv6.
    pub fn api_families(&self) -> &'static [Family] {
        match self.index {
            None => &Family::ALL,
            Some(_) => &[Family::V6],
        }
    }

    /// (cluster IP, external IP) of `family`: IPv4 the addresses network-node-manager's rules
    /// use, IPv6 the target's lab addresses or a filler's own ones from the API.
    pub fn addrs(&self, family: Family) -> (IpAddr, IpAddr) {
        match (family, self.index) {
            (Family::V4, _) => (self.cluster.into(), self.lb.into()),
            (Family::V6, None) => (lab::CLUSTER_V6.into(), lab::EXTERNAL_V6.into()),
            (Family::V6, Some(i)) => {
                let i = u128::try_from(i).expect("usize fits u128");
                let cluster = u128::from(Ipv6Addr::new(0x2001, 0xdb8, 5, 0, 0, 0, 0, 0x100)) + i;
                // The external IPs are shared as the IPv4 ones are (the port tells the
                // fillers apart), so the map holds N + 245 entries, not 2N: at 100,000 a
                // distinct address each would need 200,004, past FRONTENDS_MAX (131,072).
                let shared = i % u128::try_from(FILLER_IPS).expect("usize fits u128");
                let ext = u128::from(Ipv6Addr::new(0x2001, 0xdb8, 0xe, 1, 0, 0, 0, 0)) + shared;
                (Ipv6Addr::from(cluster).into(), Ipv6Addr::from(ext).into())
            }
        }
    }

    /// The external IPs the API holds, one per family of [`Svc::api_families`].
    pub fn api_external_ips(&self) -> Vec<IpAddr> {
        self.api_families().iter().map(|&f| self.addrs(f).1).collect()
    }

    /// The Service as YAML for `kubectl create`: the target a dual-stack LoadBalancer Service
    /// (its ingress IPs set through the status subresource afterwards), a filler a ClusterIP
    /// Service with an external IP (no status write per Service).
    pub fn to_api_yaml(&self) -> String {
        let families = self.api_families();
        let clusters: Vec<String> = families.iter().map(|&f| format!("'{}'", self.addrs(f).0)).collect();
        let labels: Vec<&str> = families.iter().map(|f| f.label()).collect();
        let policy = if families.len() > 1 { "RequireDualStack" } else { "SingleStack" };
        let ports: String = self
            .ports
            .iter()
            .enumerate()
            .map(|(k, p)| format!("  - {{name: p{k}, port: {p}, protocol: TCP, targetPort: {p}}}\n"))
            .collect();
        let (kind, external) = match self.index {
            None => ("LoadBalancer\n  externalTrafficPolicy: Local", String::new()),
            Some(_) => ("ClusterIP", format!("  externalIPs: ['{}']\n", self.addrs(Family::V6).1)),
        };
        format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {}, namespace: {}}}\nspec:\n  type: {kind}\n  \
             ipFamilyPolicy: {policy}\n  ipFamilies: [{}]\n  clusterIP: {}\n  clusterIPs: [{}]\n{external}  selector: {{app: {}}}\n  ports:\n{ports}",
            self.name,
            self.namespace,
            labels.join(", "),
            clusters[0],
            clusters.join(", "),
            self.name
        )
    }

    /// network-node-manager's 4 rules for this Service's IP, as the arguments it passes after
    /// `iptables -w 5 -W 100000 -t nat` (`op` is `-A`, `-C` or `-D`), in its order:
    /// `-m comment --comment <ns>/<name> <op> <chain> <match> -j <target>`.
    pub fn nnm_rules(&self, op: &str) -> Vec<Vec<String>> {
        let (lb, cluster, comment) = (self.lb.to_string(), self.cluster.to_string(), self.key());
        let pod = ["-s", lab::POD_CIDR_V4, "-d", &lb];
        let local = ["-m", "addrtype", "--src-type", "LOCAL", "-d", &lb];
        let mark = ["-j", KUBE_MARK_MASQ];
        let dnat = ["-j", "DNAT", "--to-destination", &cluster];
        let rule = |chain: &str, matches: &[&str], target: &[&str]| -> Vec<String> {
            let mut args = vec!["-m", "comment", "--comment", &comment, op, chain];
            args.extend_from_slice(matches);
            args.extend_from_slice(target);
            args.into_iter().map(str::to_owned).collect()
        };
        vec![
            rule(EX_CLUS_PREROUTING, &pod, &mark),
            rule(EX_CLUS_PREROUTING, &pod, &dnat),
            rule(EX_CLUS_OUTPUT, &local, &mark),
            rule(EX_CLUS_OUTPUT, &local, &dnat),
        ]
    }

    /// The same rules as `iptables-restore` lines (`-A <chain> ...`).
    pub fn restore_lines(&self) -> Vec<String> {
        self.nnm_rules("-A")
            .into_iter()
            .map(|args| {
                // Move "-A <chain>" to the front, as iptables-save prints it.
                let (op, rest): (Vec<_>, Vec<_>) = args.iter().enumerate().partition(|(k, _)| *k == 4 || *k == 5);
                op.into_iter().chain(rest).map(|(_, a)| a.as_str()).collect::<Vec<_>>().join(" ")
            })
            .collect()
    }
}

/// The nat table network-node-manager finds and makes before adding per-Service rules:
/// kube-proxy's `KUBE-MARK-MASQ`, its base chains jumped from PREROUTING/OUTPUT at position
/// 1, and the external-cluster chains jumped from them. As an `iptables-restore` table.
pub fn base_ruleset() -> String {
    let mut t = String::from("*nat\n");
    for chain in [KUBE_MARK_MASQ, NM_PREROUTING, NM_OUTPUT, EX_CLUS_PREROUTING, EX_CLUS_OUTPUT] {
        t.push_str(&format!(":{chain} - [0:0]\n"));
    }
    t.push_str(&format!("-A {KUBE_MARK_MASQ} -j MARK --or-mark 0x4000\n"));
    t.push_str(&format!("-A PREROUTING -j {NM_PREROUTING}\n-A OUTPUT -j {NM_OUTPUT}\n"));
    t.push_str(&format!("-A {NM_PREROUTING} -j {EX_CLUS_PREROUTING}\n-A {NM_OUTPUT} -j {EX_CLUS_OUTPUT}\n"));
    t
}

/// The whole nat table for `svcs`, for `iptables-restore` (which replaces the table).
pub fn full_ruleset(svcs: &[Svc]) -> String {
    let mut t = base_ruleset();
    for svc in svcs {
        for line in svc.restore_lines() {
            t.push_str(&line);
            t.push('\n');
        }
    }
    t.push_str("COMMIT\n");
    t
}

/// An empty nat table (restoring it removes every rule and user chain).
pub const EMPTY_NAT: &str = "*nat\nCOMMIT\n";

/// The rules of `svc` appended to the live table (`iptables-restore --noflush`).
pub fn append_ruleset(svc: &Svc) -> String {
    let mut t = String::from("*nat\n");
    for line in svc.restore_lines() {
        t.push_str(&line);
        t.push('\n');
    }
    t.push_str("COMMIT\n");
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_is_last_and_fillers_avoid_its_address() {
        let s = services(1000);
        assert_eq!(s.len(), 1000);
        assert_eq!(s.last(), Some(&target()));
        assert!(s[..999].iter().all(|f| f.lb != lab::EXTERNAL_V4 && f.ports.len() == 1));
        let keys: std::collections::BTreeSet<_> = s.iter().map(|f| (f.lb, f.ports[0])).collect();
        assert_eq!(keys.len(), 1000, "every filler has its own (IP, port)");
        assert_eq!(services(1), [target()]);
    }

    #[test]
    fn expected_frontends_counts_icmp_per_address() {
        assert_eq!(expected_frontends(1), 6);
        assert_eq!(expected_frontends(2), 8);
        assert_eq!(expected_frontends(241), 2 * 240 + 2 * (2 + 1));
        assert_eq!(expected_frontends(10_000), 9_999 + 240 + 2 * (2 + 1));
    }

    #[test]
    fn fillers_in_the_api_are_ipv6_with_their_own_cluster_ips_and_the_target_dual_stack() {
        let (c0, e0) = filler(0).addrs(Family::V6);
        assert_eq!((c0.to_string(), e0.to_string()), ("2001:db8:5::100".into(), "2001:db8:e:1::".into()));
        let (c, e) = filler(99_999).addrs(Family::V6);
        assert_eq!((c.to_string(), e.to_string()), ("2001:db8:5::1:879f".into(), "2001:db8:e:1::9f".into()));
        let yaml = filler(7).to_api_yaml();
        assert!(yaml.contains("type: ClusterIP") && yaml.contains("externalIPs: ['2001:db8:e:1::7']"), "{yaml}");
        assert!(yaml.contains("{name: p0, port: 1000, protocol: TCP, targetPort: 1000}"), "{yaml}");
        assert!(yaml.contains("ipFamilyPolicy: SingleStack\n  ipFamilies: [IPv6]\n  clusterIP: '2001:db8:5::107'"));
        let yaml = target().to_api_yaml();
        assert!(yaml.contains("type: LoadBalancer"), "{yaml}");
        assert!(
            yaml.contains("ipFamilyPolicy: RequireDualStack\n  ipFamilies: [IPv4, IPv6]\n  clusterIP: '198.51.100.10'\n  clusterIPs: ['198.51.100.10', '2001:db8:5::10']"),
            "{yaml}"
        );
        assert!(!yaml.contains("externalIPs"), "{yaml}");
        assert_eq!(filler(7).api_external_ips(), [filler(7).addrs(Family::V6).1]);
        let ext: Vec<String> = target().api_external_ips().iter().map(ToString::to_string).collect();
        assert_eq!(ext, ["203.0.113.10", "2001:db8:e::10"]);
    }

    #[test]
    fn rules_are_network_node_managers() {
        let svc = filler(0);
        let rules = svc.nnm_rules("-C");
        assert_eq!(
            rules[1].join(" "),
            "-m comment --comment ns0/svc-000000 -C NMANAGER_EX_CLUS_PREROUTING -s 192.0.2.0/25 -d 203.0.113.11 -j DNAT --to-destination 198.51.100.11"
        );
        assert_eq!(
            svc.restore_lines()[2],
            "-A NMANAGER_EX_CLUS_OUTPUT -m comment --comment ns0/svc-000000 -m addrtype --src-type LOCAL -d 203.0.113.11 -j KUBE-MARK-MASQ"
        );
        let table = full_ruleset(&services(3));
        assert_eq!(table.lines().filter(|l| l.starts_with("-A NMANAGER_EX_CLUS_")).count(), 12);
        assert!(table.ends_with("COMMIT\n"));
    }
}
