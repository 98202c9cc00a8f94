//! Services (all namespaces) and this node's Node from the Kubernetes API, with kube-runtime
//! watchers. Each watcher's events are folded into a store keyed by `namespace/name`; a
//! snapshot is published only once both initial lists are complete (so the agent never sweeps
//! map entries on a partial list), then after every change, at most once per `coalesce`.
//!
//! Services are watched as [`WatchedService`]s (their names, and their spec and status as JSON
//! values) and decoded one by one: a Service the typed client could not decode would otherwise
//! fail the whole list, and with it every other Service. The Node is watched as a
//! `DynamicObject`, for the same reason.
//! A relist (after 410 Gone or a restarted API server) fills a buffer that replaces the store
//! only when complete, so entries stay in force meanwhile.
use std::{
    collections::BTreeMap,
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, Result};
use futures::StreamExt as _;
use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Node, Service};
use kube::{
    Api, Client, Resource,
    api::{ApiResource, DynamicObject, ObjectMeta},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt as _, watcher},
};
use serde::Deserialize as _;
use tokio::{sync::watch, time::Instant};

use super::Snapshot;
use crate::model::ServiceInfo;

/// Bursts of events are published at most this often; a lone event goes out at once.
pub const COALESCE: Duration = Duration::from_millis(50);
/// While the API server is not known to be reachable, probe `/version` this often (a resumed
/// watch that sees no change produces no event that would tell us it is back).
const PROBE_PERIOD: Duration = Duration::from_secs(2);
/// The watches start again when the probe finds the API server back after a failure, at most
/// this often: as seldom as the watch backoff's longest wait, so a watch that keeps failing while
/// `/version` answers (RBAC, say) costs no more requests than the backoff alone.
const RESTART_MIN_INTERVAL: Duration = Duration::from_secs(30);

/// A client from `kubeconfig`, or else the environment (`KUBECONFIG`, `~/.kube/config`, the
/// in-cluster service account), as `kube::Config::infer` finds it.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc =
                Kubeconfig::read_from(path).with_context(|| format!("--kubeconfig: reading {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("--kubeconfig: {} is not a usable kubeconfig", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("no --kubeconfig / KUBECONFIG given and no in-cluster configuration found")?,
    };
    Client::try_from(config).context("building the Kubernetes client")
}

/// Whether the agent's view of the API is complete and live (served on /readyz later).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReadyState {
    /// The initial lists are not complete yet; the maps keep what they held.
    Starting,
    Ready,
    /// The last request failed; the maps keep the last known state.
    Unreachable(String),
}

#[derive(Clone, Debug)]
pub struct Readiness(Arc<Mutex<ReadyState>>);

impl Default for Readiness {
    fn default() -> Self {
        Readiness(Arc::new(Mutex::new(ReadyState::Starting)))
    }
}

impl Readiness {
    pub fn get(&self) -> ReadyState {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn is_ready(&self) -> bool {
        self.get() == ReadyState::Ready
    }

    /// Sets the state, logging transitions (not repeats).
    fn set(&self, state: ReadyState) {
        let mut current = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if *current == state {
            return;
        }
        match &state {
            ReadyState::Ready => tracing::info!("Kubernetes API: ready (initial lists complete, watches running)"),
            ReadyState::Unreachable(e) if matches!(*current, ReadyState::Unreachable(_)) => {
                tracing::debug!(error = %e, "Kubernetes API: still failing")
            }
            ReadyState::Unreachable(e) => tracing::warn!(
                error = %e,
                "Kubernetes API: not ready; the datapath keeps its last state and the watch retries with backoff"
            ),
            ReadyState::Starting => {}
        }
        *current = state;
    }
}

/// One decoded object, or why it could not be; a malformed update keeps the last good value.
#[derive(Clone, Debug)]
struct Entry<T> {
    value: Option<T>,
    warning: Option<String>,
}

/// The watcher events of one kind (objects `O`) folded into the current set of objects.
#[derive(Debug)]
struct Fold<O, T> {
    current: BTreeMap<String, Entry<T>>,
    /// Objects of a list in progress (between `Init` and `InitDone`).
    relist: Option<BTreeMap<String, Entry<T>>>,
    synced: bool,
    decode: fn(&O, &str) -> Result<T, String>,
}

impl<O: Resource<DynamicType = impl Sized>, T: Clone> Fold<O, T> {
    fn new(decode: fn(&O, &str) -> Result<T, String>) -> Self {
        Fold { current: BTreeMap::new(), relist: None, synced: false, decode }
    }

    fn entry(&self, obj: &O, previous: Option<&Entry<T>>) -> (String, Entry<T>) {
        let key = object_key(obj);
        let entry = match (self.decode)(obj, &key) {
            Ok(value) => Entry { value: Some(value), warning: None },
            Err(why) => match previous.and_then(|p| p.value.clone()) {
                Some(last) => {
                    Entry { value: Some(last), warning: Some(format!("{why}; keeping its last good version")) }
                }
                None => Entry { value: None, warning: Some(format!("{why}; skipped")) },
            },
        };
        (key, entry)
    }

    /// Applies one event; returns whether the published state may have changed.
    fn apply(&mut self, event: watcher::Event<O>) -> bool {
        match event {
            watcher::Event::Init => {
                self.relist = Some(BTreeMap::new());
                false
            }
            watcher::Event::InitApply(obj) => {
                let key = object_key(&obj);
                let (key, entry) = self.entry(&obj, self.current.get(&key));
                self.relist.get_or_insert_default().insert(key, entry);
                false
            }
            watcher::Event::InitDone => {
                // Objects missing from the new list were deleted while we were not watching.
                self.current = self.relist.take().unwrap_or_default();
                self.synced = true;
                true
            }
            watcher::Event::Apply(obj) => {
                let key = object_key(&obj);
                let (key, entry) = self.entry(&obj, self.current.get(&key));
                self.current.insert(key, entry);
                true
            }
            watcher::Event::Delete(obj) => self.current.remove(&object_key(&obj)).is_some(),
        }
    }

    fn values(&self) -> impl Iterator<Item = &T> {
        self.current.values().filter_map(|e| e.value.as_ref())
    }

    fn warnings(&self) -> impl Iterator<Item = &String> {
        self.current.values().filter_map(|e| e.warning.as_ref())
    }
}

fn object_key<O: Resource>(obj: &O) -> String {
    let meta = obj.meta();
    match &meta.namespace {
        Some(ns) => format!("{ns}/{}", meta.name.as_deref().unwrap_or("<unnamed>")),
        None => meta.name.clone().unwrap_or_else(|| "<unnamed>".into()),
    }
}

/// A Service as the watcher decodes it: of its metadata the name, namespace and resource
/// version (not the managed fields, labels, annotations, ...), and its spec and status as JSON
/// values, each decoded later by [`decode_service`]. Whole objects (as `DynamicObject`s) were
/// short-lived trees of every field, managed fields included, scattered between the long-lived
/// entries the agent keeps (VmRSS after the first sync at 100,000: 128 → 126 MiB without them).
/// (Not `RawValue`: a watch event is an internally buffered, tagged enum, which `RawValue`
/// cannot come from.)
#[derive(Clone, Debug, serde::Deserialize)]
pub struct WatchedService {
    #[serde(deserialize_with = "names_only")]
    metadata: ObjectMeta,
    #[serde(default)]
    spec: serde_json::Value,
    #[serde(default)]
    status: serde_json::Value,
}

/// Served where k8s-openapi's `Service` is.
impl Resource for WatchedService {
    type DynamicType = ();
    type Scope = k8s_openapi::NamespaceResourceScope;

    fn kind(_: &()) -> std::borrow::Cow<'_, str> {
        <Service as k8s_openapi::Resource>::KIND.into()
    }
    fn group(_: &()) -> std::borrow::Cow<'_, str> {
        <Service as k8s_openapi::Resource>::GROUP.into()
    }
    fn version(_: &()) -> std::borrow::Cow<'_, str> {
        <Service as k8s_openapi::Resource>::VERSION.into()
    }
    fn plural(_: &()) -> std::borrow::Cow<'_, str> {
        <Service as k8s_openapi::Resource>::URL_PATH_SEGMENT.into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// The metadata fields the agent and the watcher read; the others are skipped unparsed.
fn names_only<'de, D: serde::Deserializer<'de>>(d: D) -> Result<ObjectMeta, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Names {
        name: Option<String>,
        namespace: Option<String>,
        resource_version: Option<String>,
    }
    let names = Option::<Names>::deserialize(d)?;
    Ok(names.map_or_else(ObjectMeta::default, |n| ObjectMeta {
        name: n.name,
        namespace: n.namespace,
        resource_version: n.resource_version,
        ..ObjectMeta::default()
    }))
}

/// Of a Service's spec, its ports and its load-balancer ingress entries, the fields the model
/// reads ([`ServiceInfo`]); the others are skipped unparsed. A read field of the wrong shape
/// fails the decode of that Service, naming it.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct SpecFields {
    #[serde(rename = "type")]
    type_: Option<String>,
    #[serde(rename = "clusterIP")]
    cluster_ip: Option<String>,
    #[serde(rename = "clusterIPs")]
    cluster_ips: Option<Vec<String>>,
    #[serde(rename = "externalIPs")]
    external_ips: Option<Vec<String>>,
    ports: Option<Vec<PortFields>>,
}

#[derive(serde::Deserialize)]
struct PortFields {
    port: i32,
    protocol: Option<String>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct StatusFields {
    load_balancer: Option<LoadBalancerFields>,
}

#[derive(serde::Deserialize)]
struct LoadBalancerFields {
    ingress: Option<Vec<IngressFields>>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct IngressFields {
    ip: Option<String>,
    ip_mode: Option<String>,
}

/// A watched Service as a k8s-openapi `Service` holding only what the model reads (the name,
/// and the fields of [`SpecFields`] and [`StatusFields`]), so that one conversion
/// (`ServiceInfo::from`) serves every source.
pub fn decode_service(obj: &WatchedService, key: &str) -> Result<Service, String> {
    use k8s_openapi::api::core::v1 as core;
    fn present(v: &serde_json::Value) -> Option<&serde_json::Value> {
        Some(v).filter(|v| !v.is_null())
    }
    let spec = present(&obj.spec)
        .map(SpecFields::deserialize)
        .transpose()
        .map_err(|e| format!("Service {key}: malformed spec ({e})"))?;
    let status = present(&obj.status)
        .map(StatusFields::deserialize)
        .transpose()
        .map_err(|e| format!("Service {key}: malformed status ({e})"))?;
    if obj.metadata.name.is_none() {
        return Err(format!("Service {key}: no metadata.name"));
    }
    let metadata =
        ObjectMeta { name: obj.metadata.name.clone(), namespace: obj.metadata.namespace.clone(), ..Default::default() };
    let spec = spec.map(|s| core::ServiceSpec {
        type_: s.type_,
        cluster_ip: s.cluster_ip,
        cluster_ips: s.cluster_ips,
        external_ips: s.external_ips,
        ports: s.ports.map(|ports| {
            ports
                .into_iter()
                .map(|p| core::ServicePort { port: p.port, protocol: p.protocol, ..Default::default() })
                .collect()
        }),
        ..Default::default()
    });
    let status = status.map(|s| core::ServiceStatus {
        load_balancer: s.load_balancer.map(|lb| core::LoadBalancerStatus {
            ingress: lb.ingress.map(|ingress| {
                ingress
                    .into_iter()
                    .map(|i| core::LoadBalancerIngress { ip: i.ip, ip_mode: i.ip_mode, ..Default::default() })
                    .collect()
            }),
        }),
        ..Default::default()
    });
    Ok(Service { metadata, spec, status })
}

/// The Node's pod CIDRs: `spec.podCIDRs`, or the older single `spec.podCIDR`.
pub fn decode_node_pod_cidrs(obj: &DynamicObject, key: &str) -> Result<Vec<IpNet>, String> {
    let spec = obj.data.get("spec").filter(|v| !v.is_null()).cloned().unwrap_or_default();
    let node: Node = serde_json::from_value(serde_json::json!({ "spec": spec }))
        .map_err(|e| format!("Node {key}: malformed spec ({e})"))?;
    let spec = node.spec.unwrap_or_default();
    let texts = spec.pod_cidrs.filter(|c| !c.is_empty()).or_else(|| spec.pod_cidr.map(|c| vec![c])).unwrap_or_default();
    texts
        .iter()
        .map(|t| t.parse::<IpNet>().map(|n| n.trunc()).map_err(|_| format!("Node {key}: pod CIDR {t:?} is not a CIDR")))
        .collect()
}

/// Services and the Node folded together; pure, so the tests can drive it with events.
pub struct State {
    node_name: String,
    services: Fold<WatchedService, Arc<ServiceInfo>>,
    node: Fold<DynamicObject, Vec<IpNet>>,
}

impl State {
    pub fn new(node_name: &str) -> State {
        State {
            node_name: node_name.to_owned(),
            services: Fold::new(|o, key| decode_service(o, key).map(|svc| Arc::new(ServiceInfo::from(&svc)))),
            node: Fold::new(decode_node_pod_cidrs),
        }
    }

    pub fn apply_service(&mut self, event: watcher::Event<WatchedService>) -> bool {
        self.services.apply(event)
    }

    pub fn apply_node(&mut self, event: watcher::Event<DynamicObject>) -> bool {
        // The field selector should only ever yield our Node; a server ignoring it must not
        // make another node's CIDRs ours.
        if let watcher::Event::Apply(o) | watcher::Event::InitApply(o) | watcher::Event::Delete(o) = &event
            && o.metadata.name.as_deref() != Some(&self.node_name)
        {
            return false;
        }
        self.node.apply(event)
    }

    /// Both initial lists are complete.
    pub fn synced(&self) -> bool {
        self.services.synced && self.node.synced
    }

    pub fn snapshot(&self) -> Snapshot {
        let mut warnings: Vec<String> = self.services.warnings().chain(self.node.warnings()).cloned().collect();
        let node_pod_cidrs = self.node.values().next().cloned();
        if node_pod_cidrs.is_none() && self.node.synced {
            warnings.push(format!(
                "Node {}: not found; its pod CIDRs are unknown (check --node-name / NODE_NAME)",
                self.node_name
            ));
        }
        Snapshot { services: self.services.values().cloned().collect(), node_pod_cidrs, warnings }
    }
}

enum Kind {
    Service(watcher::Result<watcher::Event<WatchedService>>),
    Node(watcher::Result<watcher::Event<DynamicObject>>),
}

/// The Service and Node watchers, merged. Lists are consistent reads (resourceVersion unset),
/// not `any_semantic` (resourceVersion=0, whatever the apiserver's watch cache holds): after a
/// 410 Gone or an apiserver restart a cache-served list can be older than what the agent had
/// already seen, and a relist then loses Services created meanwhile (client-go's reflector
/// relists consistently for the same reason). Seen in the real-apiserver test as a Service that
/// never reached the map.
fn watch_streams(client: &Client, node_name: &str) -> futures::stream::BoxStream<'static, Kind> {
    let services: Api<WatchedService> = Api::all(client.clone());
    let nodes: Api<DynamicObject> = Api::all_with(client.clone(), &ApiResource::erase::<Node>(&()));
    let strip = |o: &mut DynamicObject| o.metadata.managed_fields = None;
    let service_events = watcher(services, watcher::Config::default()).default_backoff().map(Kind::Service);
    let node_events = watcher(nodes, watcher::Config::default().fields(&format!("metadata.name={node_name}")))
        .default_backoff()
        .map(move |e| Kind::Node(e.map(|e| e.modify(strip))));
    futures::stream::select(service_events.boxed(), node_events.boxed()).boxed()
}

/// Watches until the process ends, publishing snapshots on `tx`.
pub async fn watch(
    client: Client,
    node_name: String,
    tx: watch::Sender<Option<Snapshot>>,
    readiness: Readiness,
    telemetry: std::sync::Arc<crate::metrics::Telemetry>,
) {
    let mut events = watch_streams(&client, &node_name);
    // A watch that failed since the streams were (re)started; when the probe finds the API
    // server back, the streams start again (a relist now) instead of waiting out a backoff
    // grown during the outage (up to 30 s), at most once per RESTART_MIN_INTERVAL.
    let mut watch_failed = false;
    let mut last_restart: Option<Instant> = None;
    let mut state = State::new(&node_name);
    let mut dirty = false;
    let mut last_publish: Option<Instant> = None;
    let mut probe = tokio::time::interval(PROBE_PERIOD);
    let mut logged_sync = false;
    loop {
        let publish_at = last_publish.map_or_else(Instant::now, |t| t + COALESCE);
        tokio::select! {
            event = events.next() => {
                let Some(event) = event else { return };
                let (kind, result) = match event {
                    Kind::Service(r) => ("Service", r.map(|e| state.apply_service(e))),
                    Kind::Node(r) => ("Node", r.map(|e| state.apply_node(e))),
                };
                match result {
                    Ok(changed) => {
                        dirty |= changed;
                        if state.synced() { readiness.set(ReadyState::Ready) }
                    }
                    Err(e) => {
                        tracing::warn!(kind, error = %e, "watch failed; retrying with backoff, entries stay in force");
                        telemetry.watch_restarted(kind);
                        watch_failed = true;
                        readiness.set(ReadyState::Unreachable(format!("{kind} watch: {e}")));
                    }
                }
            }
            _ = tokio::time::sleep_until(publish_at), if dirty && state.synced() => {
                let snapshot = state.snapshot();
                if !logged_sync {
                    tracing::info!(services = snapshot.services.len(), "initial Service and Node lists complete");
                    logged_sync = true;
                }
                tx.send_replace(Some(snapshot));
                dirty = false;
                last_publish = Some(Instant::now());
            }
            _ = probe.tick(), if state.synced() && !readiness.is_ready() => {
                // Bounded: a black-holed API server must not stall the event loop.
                if let Ok(Ok(_)) = tokio::time::timeout(PROBE_PERIOD, client.apiserver_version()).await {
                    readiness.set(ReadyState::Ready);
                    if watch_failed && last_restart.is_none_or(|t| t.elapsed() >= RESTART_MIN_INTERVAL) {
                        tracing::info!("Kubernetes API: back; listing again now instead of after the watch backoff");
                        events = watch_streams(&client, &node_name);
                        watch_failed = false;
                        last_restart = Some(Instant::now());
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use watcher::Event;

    fn obj(v: serde_json::Value) -> DynamicObject {
        serde_json::from_value(v).unwrap()
    }

    fn watched(v: serde_json::Value) -> WatchedService {
        serde_json::from_value(v).unwrap()
    }

    fn svc(ns: &str, name: &str, ip: &str) -> WatchedService {
        watched(svc_json(ns, name, ip))
    }

    fn svc_json(ns: &str, name: &str, ip: &str) -> serde_json::Value {
        json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"namespace": ns, "name": name, "resourceVersion": "1",
                         "managedFields": [{"manager": "kubectl"}], "annotations": {"a": "b"}},
            "spec": {"type": "LoadBalancer", "clusterIP": "198.51.100.1", "ports": [{"port": 80}]},
            "status": {"loadBalancer": {"ingress": [{"ip": ip}]}}})
    }

    fn node(name: &str, cidrs: serde_json::Value) -> DynamicObject {
        obj(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}, "spec": {"podCIDRs": cidrs}}))
    }

    fn names(s: &Snapshot) -> Vec<String> {
        s.services.iter().map(|s| s.name.to_string()).collect()
    }

    fn synced_state() -> State {
        let mut st = State::new("n1");
        for e in [Event::Init, Event::InitApply(svc("a", "x", "203.0.113.1")), Event::InitDone] {
            st.apply_service(e);
        }
        assert!(!st.synced(), "the Node list is not complete yet");
        for e in
            [Event::Init, Event::InitApply(node("n1", json!(["192.0.2.0/25", "2001:db8:1::/64"]))), Event::InitDone]
        {
            st.apply_node(e);
        }
        st
    }

    #[test]
    fn snapshot_waits_for_both_lists_and_carries_pod_cidrs() {
        let st = synced_state();
        assert!(st.synced());
        let s = st.snapshot();
        assert_eq!(names(&s), vec!["a/x"]);
        assert_eq!(s.node_pod_cidrs.unwrap().len(), 2);
        assert!(s.warnings.is_empty(), "{:?}", s.warnings);
        // Only what the model reads is kept.
        let kept = &s.services[0];
        assert_eq!(
            (kept.cluster_ips.as_slice(), kept.ingress_ips.as_slice()),
            (&["198.51.100.1".into()][..], &["203.0.113.1".into()][..])
        );
    }

    #[test]
    fn relist_replaces_the_store_only_when_complete() {
        let mut st = synced_state();
        st.apply_service(Event::Apply(svc("a", "y", "203.0.113.2")));
        assert_eq!(names(&st.snapshot()), vec!["a/x", "a/y"]);
        // 410 → relist: while it runs the old objects stay; at InitDone a/x (deleted while we
        // were not watching) goes away.
        assert!(!st.apply_service(Event::Init));
        assert!(!st.apply_service(Event::InitApply(svc("a", "y", "203.0.113.2"))));
        assert_eq!(names(&st.snapshot()), vec!["a/x", "a/y"]);
        assert!(st.apply_service(Event::InitDone));
        assert_eq!(names(&st.snapshot()), vec!["a/y"]);
        assert!(st.apply_service(Event::Delete(svc("a", "y", "203.0.113.2"))));
        assert!(st.snapshot().services.is_empty());
    }

    #[test]
    fn decoding_keeps_what_the_model_reads_and_nothing_else() {
        let full = json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"namespace": "a", "name": "x", "labels": {"app": "x"}, "uid": "u-1"},
            "spec": {"type": "LoadBalancer", "clusterIP": "198.51.100.1", "clusterIPs": ["198.51.100.1", "2001:db8:5::1"],
                     "externalIPs": ["203.0.113.9"], "selector": {"app": "x"}, "sessionAffinity": "None",
                     "ipFamilies": ["IPv4", "IPv6"], "externalTrafficPolicy": "Local",
                     "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080, "nodePort": 30080},
                               {"port": 53, "protocol": "UDP"}]},
            "status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.1", "ipMode": "VIP", "ports": [{"port": 80, "protocol": "TCP"}]},
                                                    {"ip": "203.0.113.2", "ipMode": "Proxy"}, {"hostname": "lb.example"}]},
                       "conditions": [{"type": "x", "status": "True", "reason": "r", "message": "m", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}});
        let decoded = decode_service(&watched(full.clone()), "a/x").unwrap();
        let whole: Service = serde_json::from_value(full).unwrap();
        let opts = crate::model::Options::all();
        assert_eq!(
            crate::model::desired(&[ServiceInfo::from(&decoded)], &opts),
            crate::model::desired(&[ServiceInfo::from(&whole)], &opts)
        );
        let spec = decoded.spec.unwrap();
        assert!(spec.selector.is_none() && spec.session_affinity.is_none() && spec.external_traffic_policy.is_none());
        assert!(
            spec.ports.unwrap().iter().all(|p| p.name.is_none() && p.target_port.is_none() && p.node_port.is_none())
        );
        let status = decoded.status.unwrap();
        assert!(status.conditions.is_none());
        let ingress = status.load_balancer.unwrap().ingress.unwrap();
        assert_eq!(ingress.len(), 3);
        assert!(ingress.iter().all(|i| i.ports.is_none() && i.hostname.is_none()));
        assert!(decoded.metadata.labels.is_none() && decoded.metadata.uid.is_none());
    }

    /// A list page decodes whatever shape a Service's spec or status has (each is checked when
    /// its Service is decoded), and never parses the fields the agent does not read.
    #[test]
    fn a_list_page_decodes_with_malformed_services_in_it() {
        let mut bad_spec = svc_json("a", "bad-spec", "203.0.113.2");
        bad_spec["spec"] = json!({"ports": "8080", "selector": 7});
        let mut bad_status = svc_json("a", "bad-status", "203.0.113.3");
        bad_status["status"] = json!("nope");
        let mut odd_meta = svc_json("a", "odd-meta", "203.0.113.4");
        odd_meta["metadata"]["labels"] = json!(["not", "a", "map"]);
        odd_meta["metadata"]["managedFields"] = json!({"not": "a list"});
        let page = json!({"apiVersion": "v1", "kind": "ServiceList", "metadata": {"resourceVersion": "9"},
            "items": [svc_json("a", "good", "203.0.113.1"), bad_spec, bad_status, odd_meta]});
        let list: kube::core::ObjectList<WatchedService> = serde_json::from_value(page).unwrap();
        let decoded: Vec<Result<Service, String>> =
            list.items.iter().map(|s| decode_service(s, &object_key(s))).collect();
        assert!(decoded[0].is_ok() && decoded[3].is_ok(), "{decoded:?}");
        assert!(decoded[1].as_ref().is_err_and(|e| e.contains("a/bad-spec") && e.contains("spec")), "{decoded:?}");
        assert!(decoded[2].as_ref().is_err_and(|e| e.contains("a/bad-status") && e.contains("status")), "{decoded:?}");
        assert_eq!(list.items[3].metadata.resource_version.as_deref(), Some("1"));
        // A watch event (a tagged enum, decoded from a buffer) carries the same objects.
        let event = json!({"type": "MODIFIED", "object": list.items.len().to_string()});
        assert!(serde_json::from_value::<kube::core::WatchEvent<WatchedService>>(event).is_err());
        let event = json!({"type": "MODIFIED", "object": svc_json("a", "bad-spec", "203.0.113.2")
            .as_object().cloned().map(|mut o| { o["spec"] = json!({"ports": "8080"}); o })});
        match serde_json::from_value::<kube::core::WatchEvent<WatchedService>>(event).unwrap() {
            kube::core::WatchEvent::Modified(s) => assert!(decode_service(&s, "a/bad-spec").is_err()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn malformed_objects_are_skipped_or_keep_their_last_good_version_with_a_warning() {
        let mut st = synced_state();
        let mut bad = svc_json("a", "x", "203.0.113.1");
        bad["spec"]["ports"] = json!([{"port": "eighty"}]);
        st.apply_service(Event::Apply(watched(bad.clone())));
        let s = st.snapshot();
        assert_eq!(names(&s), vec!["a/x"], "the last good version stays");
        assert!(s.warnings[0].contains("a/x") && s.warnings[0].contains("last good"), "{:?}", s.warnings);
        bad["metadata"]["name"] = json!("new");
        st.apply_service(Event::Apply(watched(bad)));
        let s = st.snapshot();
        assert_eq!(names(&s), vec!["a/x"]);
        assert!(s.warnings.iter().any(|w| w.contains("a/new") && w.ends_with("skipped")), "{:?}", s.warnings);
        // A status of the wrong shape, and a Node whose CIDR is garbage.
        let mut odd = svc_json("b", "z", "203.0.113.3");
        odd["status"] = json!({"loadBalancer": {"ingress": "nope"}});
        st.apply_service(Event::Apply(watched(odd)));
        st.apply_node(Event::Apply(node("n1", json!(["not-a-cidr"]))));
        let s = st.snapshot();
        assert!(s.warnings.iter().any(|w| w.contains("b/z") && w.contains("status")), "{:?}", s.warnings);
        assert!(s.warnings.iter().any(|w| w.contains("Node n1") && w.contains("not-a-cidr")), "{:?}", s.warnings);
        assert_eq!(s.node_pod_cidrs.unwrap().len(), 2, "the Node's last good CIDRs stay");
    }

    #[test]
    fn node_changes_apply_and_other_nodes_are_ignored() {
        let mut st = synced_state();
        assert!(!st.apply_node(Event::Apply(node("n2", json!(["192.0.2.128/25"])))));
        st.apply_node(Event::Apply(node("n1", json!(["192.0.2.0/26"]))));
        assert_eq!(st.snapshot().node_pod_cidrs.unwrap(), vec!["192.0.2.0/26".parse::<IpNet>().unwrap()]);
        st.apply_node(Event::Delete(node("n1", json!([]))));
        let s = st.snapshot();
        assert!(s.node_pod_cidrs.is_none());
        assert!(s.warnings.iter().any(|w| w.contains("Node n1: not found")), "{:?}", s.warnings);
        // The single podCIDR field of older clusters.
        let old = obj(json!({"metadata": {"name": "n1"}, "spec": {"podCIDR": "192.0.2.7/25"}}));
        assert_eq!(decode_node_pod_cidrs(&old, "n1").unwrap(), vec!["192.0.2.0/25".parse::<IpNet>().unwrap()]);
    }
}
