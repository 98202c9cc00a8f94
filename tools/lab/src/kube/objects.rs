//! The lab's objects in the real apiserver, written as YAML by hand and applied with the real
//! kubectl: Nodes, Namespaces, selector-less LoadBalancer Services and the EndpointSlices the
//! lab writes for them.
//!
//! EndpointSlices are written by the lab for selector-less Services (a supported pattern,
//! label `kubernetes.io/service-name`), not by kube-controller-manager: its EndpointSlice
//! controller lists only Pods a kubelet reported ready, and the lab runs no kubelet, so Pod
//! statuses would have to be written by hand anyway.
use anyhow::Result;

use super::Cluster;

impl Cluster {
    /// A Node with `spec.podCIDRs` and `status.addresses` (InternalIP; kube-proxy waits for
    /// them), the status written through its subresource as the kubelet does.
    pub fn create_node(&self, name: &str, pod_cidrs: &[&str], addresses: &[&str]) -> Result<()> {
        let yaml = format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{name: {name}, labels: {{kubernetes.io/hostname: {name}}}}}\n\
             spec: {{podCIDR: '{}', podCIDRs: [{}]}}\n",
            pod_cidrs.first().copied().unwrap_or_default(),
            quoted(pod_cidrs)
        );
        self.apply(&yaml)?;
        let addresses: Vec<String> =
            addresses.iter().map(|a| format!("{{\"type\":\"InternalIP\",\"address\":\"{a}\"}}")).collect();
        let patch = format!("{{\"status\":{{\"addresses\":[{}]}}}}", addresses.join(","));
        self.kubectl_ok(&["patch", "node", name, "--subresource=status", "--type=merge", "-p", &patch])?;
        Ok(())
    }

    pub fn create_namespace(&self, namespace: &str) -> Result<()> {
        self.apply(&format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {namespace}}}\n"))?;
        Ok(())
    }

    /// Sets a Service's LoadBalancer ingress IPs through the status subresource, as a
    /// load-balancer controller does.
    pub fn set_lb_ips(&self, namespace: &str, service: &str, ips: &[&str]) -> Result<()> {
        let ingress: Vec<String> = ips.iter().map(|ip| format!("{{\"ip\":\"{ip}\",\"ipMode\":\"VIP\"}}")).collect();
        let patch = format!("{{\"status\":{{\"loadBalancer\":{{\"ingress\":[{}]}}}}}}", ingress.join(","));
        self.kubectl_ok(&[
            "patch",
            "svc",
            service,
            "-n",
            namespace,
            "--subresource=status",
            "--type=merge",
            "-p",
            &patch,
        ])?;
        Ok(())
    }
}

/// A selector-less LoadBalancer Service, `externalTrafficPolicy: Local`, TCP and UDP on each
/// port, with the given cluster IPs (their families make it single- or dual-stack).
pub fn service_yaml(namespace: &str, name: &str, cluster_ips: &[&str], ports: &[u16]) -> String {
    let families: Vec<&str> = cluster_ips.iter().map(|ip| family(ip)).collect();
    let policy = if cluster_ips.len() > 1 { "RequireDualStack" } else { "SingleStack" };
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec:\n  type: LoadBalancer\n  \
         externalTrafficPolicy: Local\n  ipFamilyPolicy: {policy}\n  ipFamilies: [{}]\n  clusterIP: '{}'\n  \
         clusterIPs: [{}]\n  ports:\n{}",
        families.join(", "),
        cluster_ips.first().copied().unwrap_or_default(),
        quoted(cluster_ips),
        port_lines(ports, true)
    )
}

/// A selector-less single-stack ClusterIP Service with one TCP port.
pub fn cluster_ip_service_yaml(namespace: &str, name: &str, cluster_ip: &str, port: u16) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec:\n  \
         ipFamilyPolicy: SingleStack\n  clusterIP: '{cluster_ip}'\n  ports:\n  - {{name: tcp-{port}, port: {port}, \
         protocol: TCP, targetPort: {port}}}\n"
    )
}

/// The EndpointSlices of a selector-less Service: one slice per endpoint address (its family),
/// the endpoint ready and on `node`, for every port of [`service_yaml`].
pub fn endpoint_slices_yaml(namespace: &str, service: &str, endpoints: &[&str], ports: &[u16], node: &str) -> String {
    let docs: Vec<String> = endpoints
        .iter()
        .map(|ep| {
            let family = family(ep);
            format!(
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {service}-{}\n  namespace: {namespace}\n  \
                 labels: {{kubernetes.io/service-name: {service}, endpointslice.kubernetes.io/managed-by: nml-lab}}\n\
                 addressType: {family}\nendpoints:\n  - addresses: ['{ep}']\n    conditions: {{ready: true, serving: true, \
                 terminating: false}}\n    nodeName: {node}\nports:\n{}",
                family.to_lowercase(),
                port_lines(ports, false)
            )
        })
        .collect();
    docs.join("---\n")
}

fn family(ip: &str) -> &'static str {
    if ip.contains(':') { "IPv6" } else { "IPv4" }
}

fn quoted(items: &[&str]) -> String {
    items.iter().map(|c| format!("'{c}'")).collect::<Vec<_>>().join(", ")
}

/// `- {name: tcp-80, port: 80, protocol: TCP[, targetPort: 80]}` for TCP and UDP of each port.
fn port_lines(ports: &[u16], target_port: bool) -> String {
    let mut out = String::new();
    for p in ports {
        for proto in ["TCP", "UDP"] {
            let target = if target_port { format!(", targetPort: {p}") } else { String::new() };
            out.push_str(&format!(
                "  - {{name: {}-{p}, port: {p}, protocol: {proto}{target}}}\n",
                proto.to_lowercase()
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dual_stack_service_names_both_families_and_every_port_twice() {
        let yaml = service_yaml("shop", "web", &["198.51.100.10", "2001:db8:5::10"], &[8080]);
        assert!(yaml.contains("ipFamilyPolicy: RequireDualStack"), "{yaml}");
        assert!(yaml.contains("ipFamilies: [IPv4, IPv6]"), "{yaml}");
        assert!(yaml.contains("clusterIPs: ['198.51.100.10', '2001:db8:5::10']"), "{yaml}");
        assert!(yaml.contains("{name: tcp-8080, port: 8080, protocol: TCP, targetPort: 8080}"), "{yaml}");
        assert!(yaml.contains("{name: udp-8080, port: 8080, protocol: UDP, targetPort: 8080}"), "{yaml}");
    }

    #[test]
    fn one_slice_per_endpoint_family_on_the_given_node() {
        let yaml = endpoint_slices_yaml("shop", "web", &["192.0.2.130", "2001:db8:2::2"], &[8080], "node-b");
        let docs: Vec<&str> = yaml.split("---\n").collect();
        assert_eq!(docs.len(), 2);
        assert!(docs[0].contains("name: web-ipv4") && docs[0].contains("addressType: IPv4"), "{yaml}");
        assert!(docs[1].contains("name: web-ipv6") && docs[1].contains("addressType: IPv6"), "{yaml}");
        assert!(docs.iter().all(|d| d.contains("nodeName: node-b") && !d.contains("targetPort")), "{yaml}");
    }
}
