//! The demo on the real Kubernetes components (`--kube-proxy MODE`): etcd and kube-apiserver
//! on loopback (`lab::kube::Cluster`, reachable from the node namespace through an
//! `ApiBridge`), the real kube-proxy in the node namespace, the Service and this node's Node
//! created with the real kubectl, and node-manager's own manifest applied, its agent run with
//! the ServiceAccount token and the env of the DaemonSet object the apiserver holds.
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use lab::kube::{ApiBridge, Cluster, KubeProxy, Options, ProxyMode, component_version, objects};
use lab::{Lab, Ns};
use serde_json::Value;

/// The Service of kubernetes#74839's case: the pod reaches the "outside" server through this
/// cluster IP, so kube-proxy's DNAT is the NAT whose INVALID reply the node would answer.
pub const RESET_CLUSTER_V4: std::net::Ipv4Addr = std::net::Ipv4Addr::new(198, 51, 100, 30);
/// The node that runs the Service's only endpoint (the lab's endpoint namespace).
const ENDPOINT_NODE: &str = "demo-endpoint-node";
/// node-manager's default manifest, as `kubectl apply` gets it.
const MANIFEST: &str = include_str!("../../../deploy/node-manager.yaml");
/// The settings of the manifest's container that the demo gives otherwise (its own bpffs and
/// cgroup, no metrics listener) or that come from the pod (the node's name).
const DEMO_OWN_ENV: [&str; 4] = ["NODE_NAME", "BPFFS", "CGROUP_PATH", "METRICS_ADDR"];

/// The components, stopped in order on drop: kube-proxy first (its `--cleanup` needs the
/// node namespace), then the bridge, then the apiserver and etcd with their data.
pub struct RealKube {
    kube_proxy: Option<KubeProxy>,
    bridge: Option<ApiBridge>,
    cluster: Option<Cluster>,
    pub mode: ProxyMode,
    pub apiserver_version: String,
    pub kube_proxy_version: String,
    /// The agent's kubeconfig: node-manager's ServiceAccount token, the lab CA.
    pub kubeconfig: PathBuf,
    /// The env of the applied DaemonSet's container that the demo's agent runs with.
    pub manifest_env: Vec<(String, String)>,
}

impl RealKube {
    pub fn start(lab: &Lab, bin: &Path, mode: ProxyMode, node: &str) -> Result<RealKube> {
        let kube_proxy_version = component_version(bin, "kube-proxy")?;
        // Declared in the order they are to be dropped in reverse, should a step fail.
        let mut c = Cluster::start_with(bin, &Options::default()).context("starting etcd and kube-apiserver")?;
        let apiserver_version = c.version()?;
        let bridge = ApiBridge::into_netns(&lab.netns_path(Ns::Node), c.apiserver_port)?;
        c.create_node(node, &[lab::POD_CIDR_V4, lab::POD_CIDR_V6], &[&lab::NODE_UPLINK_V4.to_string()])?;
        c.create_node(ENDPOINT_NODE, &["192.0.2.192/26"], &[&lab::ENDPOINT_V4.to_string()])?;
        c.create_namespace("demo")?;
        let (cluster4, cluster6) = (lab::CLUSTER_V4.to_string(), lab::CLUSTER_V6.to_string());
        let (lb4, lb6) = (lab::EXTERNAL_V4.to_string(), lab::EXTERNAL_V6.to_string());
        let (ep4, ep6) = (lab::ENDPOINT_V4.to_string(), lab::ENDPOINT_V6.to_string());
        c.apply(&objects::service_yaml("demo", "web", &[&cluster4, &cluster6], &[lab::SERVICE_PORT]))?;
        c.set_lb_ips("demo", "web", &[&lb4, &lb6])?;
        c.apply(&objects::endpoint_slices_yaml("demo", "web", &[&ep4, &ep6], &[lab::SERVICE_PORT], ENDPOINT_NODE))?;
        let reset_port = lab::reset::OUTSIDE_PORT;
        c.apply(&objects::cluster_ip_service_yaml("demo", "outside", &RESET_CLUSTER_V4.to_string(), reset_port))?;
        c.apply(&objects::endpoint_slices_yaml("demo", "outside", &[&ep4], &[reset_port], ENDPOINT_NODE))?;

        c.apply(MANIFEST).context("kubectl apply of deploy/node-manager.yaml")?;
        let token = c.token("kube-system", "node-manager", "1h", None)?;
        let kubeconfig = c.write_kubeconfig("node-manager.kubeconfig", &token)?;
        let daemonset = c.kubectl_ok(&["get", "daemonset", "node-manager", "-n", "kube-system", "-o", "json"])?;
        let manifest_env = manifest_env(&serde_json::from_str(&daemonset)?);

        let pod_cidrs = format!("{},{}", lab::POD_CIDR_V4, lab::POD_CIDR_V6);
        let kube_proxy = KubeProxy::start(&c, &lab.netns_path(Ns::Node), node, mode, &pod_cidrs)
            .with_context(|| format!("starting kube-proxy in {} mode", mode.name()))?;
        // Started: its logs are not printed when it stops (they stay for a failed step above).
        c.quiet();
        Ok(RealKube {
            kube_proxy: Some(kube_proxy),
            bridge: Some(bridge),
            cluster: Some(c),
            mode,
            apiserver_version,
            kube_proxy_version,
            kubeconfig,
            manifest_env,
        })
    }

    fn cluster(&self) -> &Cluster {
        self.cluster.as_ref().expect("the cluster runs until teardown")
    }

    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        self.cluster().kubectl_ok(args)
    }

    /// How `kubectl` looks to a user (the lab's admin kubeconfig).
    pub fn kubectl_shown(&self, args: &str) -> String {
        format!("kubectl --kubeconfig {} {args}", self.cluster().admin_kubeconfig().display())
    }

    pub fn reset_via() -> SocketAddr {
        SocketAddr::from((RESET_CLUSTER_V4, lab::reset::OUTSIDE_PORT))
    }

    /// Stops everything, one line per component removed.
    pub fn stop(&mut self) -> Vec<String> {
        let mut said = Vec::new();
        if let Some(kp) = self.kube_proxy.take() {
            drop(kp);
            said.push(format!(
                "kube-proxy {} ({} mode; `kube-proxy --cleanup` removed its rules)",
                self.kube_proxy_version,
                self.mode.name()
            ));
        }
        self.bridge.take();
        if let Some(c) = self.cluster.take() {
            let dir = c.dir.clone();
            drop(c);
            said.push(format!(
                "kube-apiserver {} and etcd, with their data in {}",
                self.apiserver_version,
                dir.display()
            ));
        }
        said
    }
}

impl Drop for RealKube {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The `value` env of the DaemonSet's first container, less [`DEMO_OWN_ENV`].
fn manifest_env(daemonset: &Value) -> Vec<(String, String)> {
    daemonset["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| Some((e["name"].as_str()?.to_owned(), e["value"].as_str()?.to_owned())))
        .filter(|(name, _)| !DEMO_OWN_ENV.contains(&name.as_str()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agent_gets_the_manifests_settings_but_not_the_demos_own() {
        let ds = serde_json::json!({"spec": {"template": {"spec": {"containers": [{"env": [
            {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
            {"name": "RULE_DROP_INVALID_INPUT_ENABLE", "value": "true"},
            {"name": "BPFFS", "value": "/sys/fs/bpf"},
            {"name": "METRICS_ADDR", "value": "0.0.0.0:9617"},
        ]}]}}}});
        assert_eq!(manifest_env(&ds), [("RULE_DROP_INVALID_INPUT_ENABLE".to_owned(), "true".to_owned())]);
    }
}
