//! The Kubernetes manifests in `deploy/`: every document is checked against the Kubernetes
//! schema (k8s-openapi's v1.33 types: it must deserialize, and serializing it back must give
//! the same document, so a misspelt or misplaced field cannot hide), the RBAC and the container
//! are least privilege (capabilities only from the list documented in `deploy/README.md`), and
//! every environment variable they set is one the binary reads.
//!
//! `least_privilege.rs` runs the agent with the manifest's capabilities.
mod common;

use std::{collections::BTreeSet, process::Command};

use common::deploy::{documented_capabilities, documents, read};

use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{Container, EnvVar, PodSpec, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;

/// The manifests, and whether each turns the external→cluster rewrite on.
const MANIFESTS: [(&str, bool); 2] = [("node-manager.yaml", false), ("node-manager-ipvs.yaml", true)];

/// Read by tracing's log filter, not by clap.
const LOG_FILTER: &str = "RUST_LOG";
/// network-node-manager's older names, read outside clap with a deprecation warning (README,
/// Configuration); the manifests must not use them.
const LEGACY: [&str; 4] = ["RULE_DROP_INVALID_INPUT", "RULE_EXTERNAL_CLUSTER", "NET_STACK", "POD_NODE_NAME"];

struct Manifest {
    name: &'static str,
    external_cluster: bool,
    /// Every document as JSON, in file order.
    documents: Vec<Value>,
    service_account: ServiceAccount,
    role: ClusterRole,
    binding: ClusterRoleBinding,
    daemonset: DaemonSet,
}

impl Manifest {
    fn pod(&self) -> &PodSpec {
        self.daemonset.spec.as_ref().unwrap().template.spec.as_ref().unwrap()
    }

    fn container(&self) -> &Container {
        let containers = &self.pod().containers;
        assert_eq!(containers.len(), 1, "{}: one container expected", self.name);
        &containers[0]
    }

    fn env(&self, name: &str) -> &EnvVar {
        let env = self.container().env.as_deref().unwrap_or_default();
        env.iter().find(|e| e.name == name).unwrap_or_else(|| panic!("{}: no env {name}", self.name))
    }

    fn env_value(&self, name: &str) -> &str {
        self.env(name).value.as_deref().unwrap_or_else(|| panic!("{}: env {name} has no value", self.name))
    }
}

/// The first place where `doc` has something `back` lacks or differs in, as a path.
fn first_difference(doc: &Value, back: &Value, path: &str) -> Option<String> {
    match (doc, back) {
        (Value::Object(a), Value::Object(b)) => a.iter().find_map(|(k, v)| match b.get(k) {
            None => Some(format!("{path}.{k}")),
            Some(w) => first_difference(v, w, &format!("{path}.{k}")),
        }),
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            a.iter().zip(b).enumerate().find_map(|(i, (v, w))| first_difference(v, w, &format!("{path}[{i}]")))
        }
        (a, b) if a == b => None,
        _ => Some(path.to_owned()),
    }
}

/// `doc` as the Kubernetes type `T`: it must deserialize, and nothing may be lost on the way
/// back (k8s-openapi skips fields it does not know).
fn strict<T: DeserializeOwned + Serialize>(doc: &Value, what: &str) -> Result<T, String> {
    let typed: T =
        serde_json::from_value(doc.clone()).map_err(|e| format!("{what}: does not match the schema: {e}"))?;
    let back = serde_json::to_value(&typed).map_err(|e| e.to_string())?;
    match first_difference(doc, &back, "") {
        None => Ok(typed),
        Some(path) => Err(format!("{what}: field {path} is not in the Kubernetes schema or has the wrong shape")),
    }
}

fn parse_manifest(name: &'static str, external_cluster: bool, text: &str) -> Result<Manifest, String> {
    let documents = documents(text, name);
    let (mut sa, mut role, mut binding, mut ds) = (None, None, None, None);
    for (i, doc) in documents.iter().enumerate() {
        let kind = doc["kind"].as_str().unwrap_or("");
        let what = format!("{name} document {i} ({kind})");
        let seen = match kind {
            "ServiceAccount" => sa.replace(strict::<ServiceAccount>(doc, &what)?).is_some(),
            "ClusterRole" => role.replace(strict::<ClusterRole>(doc, &what)?).is_some(),
            "ClusterRoleBinding" => binding.replace(strict::<ClusterRoleBinding>(doc, &what)?).is_some(),
            "DaemonSet" => ds.replace(strict::<DaemonSet>(doc, &what)?).is_some(),
            other => return Err(format!("{what}: unexpected kind {other:?}")),
        };
        if seen {
            return Err(format!("{what}: a second {kind}"));
        }
    }
    let missing = |what: &str| format!("{name}: no {what}");
    Ok(Manifest {
        name,
        external_cluster,
        documents,
        service_account: sa.ok_or_else(|| missing("ServiceAccount"))?,
        role: role.ok_or_else(|| missing("ClusterRole"))?,
        binding: binding.ok_or_else(|| missing("ClusterRoleBinding"))?,
        daemonset: ds.ok_or_else(|| missing("DaemonSet"))?,
    })
}

fn manifests() -> Vec<Manifest> {
    MANIFESTS
        .iter()
        .map(|&(name, ext)| parse_manifest(name, ext, &read(name)).unwrap_or_else(|e| panic!("{e}")))
        .collect()
}

/// Every environment variable name `node-manager <sub> --help` lists (`[env: NAME=]`).
fn binary_env_names() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for sub in ["run", "cleanup", "inspect"] {
        let out = Command::new(common::agent::BIN).args([sub, "--help"]).env_clear().output().unwrap();
        assert!(out.status.success(), "node-manager {sub} --help failed");
        let text = String::from_utf8_lossy(&out.stdout).split_whitespace().collect::<Vec<_>>().join(" ");
        for part in text.split("[env: ").skip(1) {
            let name: String =
                part.chars().take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_').collect();
            assert!(part[name.len()..].starts_with('='), "unexpected `[env: {part:.40}` in {sub} --help");
            names.insert(name);
        }
    }
    names
}

fn quantity_in_base_units(q: &str) -> f64 {
    let units = [("Ki", 1024.0), ("Mi", 1024.0 * 1024.0), ("Gi", 1024.0 * 1024.0 * 1024.0), ("m", 0.001)];
    for (suffix, factor) in units {
        if let Some(n) = q.strip_suffix(suffix) {
            return n.parse::<f64>().unwrap_or_else(|_| panic!("quantity {q:?}")) * factor;
        }
    }
    q.parse().unwrap_or_else(|_| panic!("quantity {q:?}"))
}

#[test]
fn every_manifest_matches_the_kubernetes_schema() {
    for m in manifests() {
        assert_eq!(m.documents.len(), 4, "{}: ServiceAccount, ClusterRole, ClusterRoleBinding, DaemonSet", m.name);
        for doc in &m.documents {
            let name = doc["metadata"]["name"].as_str();
            assert_eq!(name, Some("node-manager"), "{}: {} named {name:?}", m.name, doc["kind"]);
        }
    }
}

#[test]
fn the_schema_check_catches_misspelt_fields_and_wrong_types() {
    let text = read("node-manager.yaml");
    for (from, to, expect) in [
        (
            "readOnlyRootFilesystem",
            "readOnlyRootFileSystem",
            "field .spec.template.spec.containers[0].securityContext.readOnlyRootFileSystem",
        ),
        ("priorityClassName", "priorityClass", "field .spec.template.spec.priorityClass"),
        ("containerPort: 9617", "containerPort: metrics", "does not match the schema"),
        ("verbs: [get, list, watch]", "verb: [get, list, watch]", "field .rules[0].verb"),
    ] {
        assert!(text.contains(from), "{from:?} not in the manifest");
        let err = parse_manifest("edited", false, &text.replacen(from, to, 1)).err();
        assert!(err.as_deref().is_some_and(|e| e.contains(expect)), "{from} -> {to}: got {err:?}");
    }
}

#[test]
fn rbac_reads_services_and_nodes_and_nothing_else() {
    for m in manifests() {
        let rules = m.role.rules.as_deref().unwrap_or_default();
        let mut resources = BTreeSet::new();
        for rule in rules {
            assert_eq!(rule.api_groups.as_deref(), Some(&[String::new()][..]), "{}: core API group only", m.name);
            for verb in &rule.verbs {
                assert!(["get", "list", "watch"].contains(&verb.as_str()), "{}: verb {verb}", m.name);
            }
            assert!(rule.resource_names.is_none() && rule.non_resource_urls.is_none(), "{}: {rule:?}", m.name);
            resources.extend(rule.resources.iter().flatten().cloned());
        }
        assert_eq!(resources, BTreeSet::from(["nodes".to_owned(), "services".to_owned()]), "{}", m.name);
        assert!(m.role.aggregation_rule.is_none(), "{}: aggregation would widen the role", m.name);

        let sa = &m.service_account.metadata;
        assert_eq!(sa.namespace.as_deref(), Some("kube-system"), "{}", m.name);
        assert_eq!(m.daemonset.metadata.namespace.as_deref(), Some("kube-system"), "{}", m.name);
        assert_eq!(m.pod().service_account_name, sa.name, "{}: the DaemonSet runs as the ServiceAccount", m.name);
        assert_eq!(m.binding.role_ref.kind, "ClusterRole", "{}", m.name);
        assert_eq!(Some(&m.binding.role_ref.name), m.role.metadata.name.as_ref(), "{}", m.name);
        let subjects = m.binding.subjects.as_deref().unwrap_or_default();
        assert_eq!(subjects.len(), 1, "{}: one subject", m.name);
        assert_eq!(
            (subjects[0].kind.as_str(), Some(&subjects[0].name), subjects[0].namespace.as_ref()),
            ("ServiceAccount", sa.name.as_ref(), sa.namespace.as_ref()),
            "{}",
            m.name
        );
    }
}

#[test]
fn the_pod_is_least_privilege_with_only_documented_capabilities() {
    let documented = documented_capabilities();
    assert!(!documented.is_empty() && !documented.contains("SYS_ADMIN"), "documented: {documented:?}");
    for m in manifests() {
        let pod = m.pod();
        assert_eq!(pod.host_network, Some(true), "{}", m.name);
        assert!(pod.host_pid != Some(true) && pod.host_ipc != Some(true), "{}: host PID/IPC namespaces", m.name);
        assert_eq!(pod.priority_class_name.as_deref(), Some("system-node-critical"), "{}", m.name);
        let tolerations = pod.tolerations.as_deref().unwrap_or_default();
        assert!(
            tolerations
                .iter()
                .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none() && t.effect.is_none()),
            "{}: must tolerate every taint (control-plane nodes included): {tolerations:?}",
            m.name
        );
        assert!(pod.init_containers.is_none() && pod.ephemeral_containers.is_none(), "{}", m.name);
        let pod_seccomp = pod.security_context.as_ref().and_then(|s| s.seccomp_profile.as_ref());
        let c = m.container();
        let sc = c.security_context.as_ref().unwrap_or_else(|| panic!("{}: no securityContext", m.name));
        let seccomp = sc.seccomp_profile.as_ref().or(pod_seccomp).map(|p| p.type_.as_str());
        assert_eq!(seccomp, Some("RuntimeDefault"), "{}", m.name);
        assert_ne!(sc.privileged, Some(true), "{}: privileged", m.name);
        assert_eq!(sc.allow_privilege_escalation, Some(false), "{}", m.name);
        assert_eq!(sc.read_only_root_filesystem, Some(true), "{}", m.name);
        assert!(sc.proc_mount.is_none() && sc.windows_options.is_none(), "{}", m.name);
        let caps = sc.capabilities.as_ref().unwrap_or_else(|| panic!("{}: no capabilities", m.name));
        assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_owned()][..]), "{}: drop ALL first", m.name);
        let added: BTreeSet<String> = caps.add.iter().flatten().cloned().collect();
        let undocumented: Vec<&String> = added.difference(&documented).collect();
        assert!(
            undocumented.is_empty(),
            "{}: capabilities not documented in deploy/README.md: {undocumented:?}",
            m.name
        );

        // Only the two host directories the agent needs, the cgroup root read-only.
        let volumes = pod.volumes.as_deref().unwrap_or_default();
        let host_paths: BTreeSet<&str> =
            volumes.iter().map(|v| v.host_path.as_ref().map_or("(not hostPath)", |h| h.path.as_str())).collect();
        assert_eq!(host_paths, BTreeSet::from(["/sys/fs/bpf", "/sys/fs/cgroup"]), "{}", m.name);
        for mount in c.volume_mounts.iter().flatten() {
            let volume = volumes.iter().find(|v| v.name == mount.name);
            let host = volume.and_then(|v| v.host_path.as_ref()).map(|h| h.path.as_str());
            match host {
                Some("/sys/fs/bpf") => assert_eq!(mount.mount_path, m.env_value("BPFFS"), "{}: BPFFS", m.name),
                Some("/sys/fs/cgroup") => {
                    assert_eq!(mount.mount_path, m.env_value("CGROUP_PATH"), "{}: CGROUP_PATH", m.name);
                    assert_eq!(mount.read_only, Some(true), "{}: the cgroup root is only opened", m.name);
                }
                other => panic!("{}: mount {} of {other:?}", m.name, mount.name),
            }
        }
    }
}

#[test]
fn every_env_name_in_the_manifests_is_read_by_the_binary() {
    let accepted = binary_env_names();
    for name in ["NODE_NAME", "KUBECONFIG", "RULE_EXTERNAL_CLUSTER_ENABLE", "BPFFS", "CGROUP_PATH", "METRICS_ADDR"] {
        assert!(accepted.contains(name), "parsing --help found {accepted:?}, not {name}");
    }
    for m in manifests() {
        for env in m.container().env.iter().flatten() {
            let name = env.name.as_str();
            assert!(!LEGACY.contains(&name), "{}: {name} is a deprecated name", m.name);
            assert!(
                accepted.contains(name) || name == LOG_FILTER,
                "{}: env {name} is not read by node-manager (it reads {accepted:?} and {LOG_FILTER})",
                m.name
            );
        }
        let node = m.env("NODE_NAME").value_from.as_ref().and_then(|v| v.field_ref.as_ref());
        assert_eq!(
            node.map(|f| f.field_path.as_str()),
            Some("spec.nodeName"),
            "{}: NODE_NAME from the downward API",
            m.name
        );
    }
}

#[test]
fn the_variants_differ_only_in_the_external_cluster_rewrite() {
    let all = manifests();
    for m in &all {
        let ext = node_manager::config::parse_bool(Some(m.env_value("RULE_EXTERNAL_CLUSTER_ENABLE")), false, "ext");
        assert_eq!(ext.unwrap(), m.external_cluster, "{}", m.name);
        let drop = node_manager::config::parse_bool(Some(m.env_value("RULE_DROP_INVALID_INPUT_ENABLE")), false, "drop");
        assert!(drop.unwrap(), "{}: the INVALID drop is on in every variant", m.name);
        let mode = m.env_value("DROP_INVALID_MODE").parse::<node_manager::features::drop_invalid::Requested>();
        assert!(mode.is_ok(), "{}: {mode:?}", m.name);
    }
    // With that one value swapped, the documents are the same.
    let normalised = |m: &Manifest| {
        let mut docs = m.documents.clone();
        let ds = docs.iter_mut().find(|d| d["kind"] == "DaemonSet").unwrap();
        for env in ds["spec"]["template"]["spec"]["containers"][0]["env"].as_array_mut().unwrap() {
            if env["name"] == "RULE_EXTERNAL_CLUSTER_ENABLE" {
                env["value"] = Value::Null;
            }
        }
        docs
    };
    assert_eq!(normalised(&all[0]), normalised(&all[1]), "the variants differ elsewhere too");
}

#[test]
fn metrics_port_probes_and_scrape_annotations_agree() {
    for m in manifests() {
        let c = m.container();
        let ports = c.ports.as_deref().unwrap_or_default();
        let metrics = ports.iter().find(|p| p.name.as_deref() == Some("metrics")).expect("a port named metrics");
        let addr: std::net::SocketAddr = m.env_value("METRICS_ADDR").parse().expect("METRICS_ADDR is host:port");
        assert_eq!(i32::from(addr.port()), metrics.container_port, "{}: METRICS_ADDR vs containerPort", m.name);
        for (probe, path) in [(&c.liveness_probe, "/healthz"), (&c.readiness_probe, "/readyz")] {
            let get =
                probe.as_ref().and_then(|p| p.http_get.as_ref()).unwrap_or_else(|| panic!("{}: {path} probe", m.name));
            assert_eq!(get.path.as_deref(), Some(path), "{}", m.name);
            assert_eq!(get.port, IntOrString::String("metrics".into()), "{}", m.name);
        }
        let template = &m.daemonset.spec.as_ref().unwrap().template;
        let annotations = template.metadata.as_ref().and_then(|md| md.annotations.clone()).unwrap_or_default();
        assert_eq!(annotations.get("prometheus.io/scrape").map(String::as_str), Some("true"), "{}", m.name);
        assert_eq!(annotations.get("prometheus.io/port"), Some(&metrics.container_port.to_string()), "{}", m.name);
        assert_eq!(annotations.get("prometheus.io/path").map(String::as_str), Some("/metrics"), "{}", m.name);
        // The selector picks the template's pods.
        let selector = m.daemonset.spec.as_ref().unwrap().selector.match_labels.clone().unwrap_or_default();
        let labels = template.metadata.as_ref().and_then(|md| md.labels.clone()).unwrap_or_default();
        assert!(!selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v)), "{}", m.name);
    }
}

#[test]
fn requests_and_limits_are_set_and_modest() {
    const MIB: f64 = 1024.0 * 1024.0;
    for m in manifests() {
        let r = m.container().resources.as_ref().expect("resources");
        let get = |set: &Option<
            std::collections::BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>,
        >,
                   key: &str| {
            let q = set.as_ref().and_then(|s| s.get(key)).unwrap_or_else(|| panic!("{}: no {key}", m.name));
            quantity_in_base_units(&q.0)
        };
        let (req_cpu, req_mem) = (get(&r.requests, "cpu"), get(&r.requests, "memory"));
        let (lim_cpu, lim_mem) = (get(&r.limits, "cpu"), get(&r.limits, "memory"));
        assert!(req_cpu <= 0.1 && lim_cpu <= 1.0 && req_cpu <= lim_cpu, "{}: cpu {req_cpu}/{lim_cpu}", m.name);
        // The agent's RSS with 10,000 Services was 42 MiB (README, Benchmarks).
        assert!(req_mem >= 42.0 * MIB && lim_mem >= 2.0 * 42.0 * MIB, "{}: memory below the measured RSS", m.name);
        assert!(lim_mem <= 512.0 * MIB && req_mem <= lim_mem, "{}: memory {req_mem}/{lim_mem}", m.name);
    }
}
