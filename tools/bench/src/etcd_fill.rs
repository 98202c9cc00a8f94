//! Filler Services written straight into the lab's etcd, for N beyond what the real
//! kube-apiserver can create in a session.
//!
//! Why: kube-apiserver 1.34 allocates a Service's cluster IP by creating an IPAddress object,
//! and after each one its allocator refreshes its metrics with `Used()`, which lists every
//! IPAddress of the family from its informer cache (profiled here: 74 % of the apiserver's CPU
//! at 10,000 Services). Each create costs O(N), so filling 100,000 Services through the API
//! would take hours on this machine. The Services and their IPAddress objects are written as
//! the apiserver stores them (JSON, which its storage decoder reads as it reads protobuf);
//! the apiserver's watch on etcd then serves them to the agent's list and watch like any other.
//! [`check_same_as_api`] compares one written Service, read back through the API, with one the
//! API created.

use std::time::Instant;

use anyhow::{Context as _, Result, bail};
use base64::{Engine as _, engine::general_purpose::STANDARD as B64};
use serde_json::{Value, json};

use crate::services::{Family, Svc};

/// etcd's default `--max-txn-ops`.
const OPS_PER_TXN: usize = 128;
const SERVICES_PREFIX: &str = "/registry/services/specs/";
const IPADDRESSES_PREFIX: &str = "/registry/ipaddresses/";

/// Writes `svcs` (fillers: single-stack IPv6 ClusterIP Services with one external IP) and
/// their IPAddress objects into etcd at `etcd_url`.
pub fn write(etcd_url: &str, svcs: &[&Svc]) -> Result<()> {
    if svcs.iter().any(|s| s.index.is_none()) {
        bail!("only fillers are written to etcd; the target goes through the API");
    }
    // The apiserver has written IPAddress objects under this prefix already (the target's, the
    // fillers it created): if not, the layout is not the one assumed here.
    if count(etcd_url, IPADDRESSES_PREFIX)? == 0 {
        bail!("etcd holds no key under {IPADDRESSES_PREFIX}: the apiserver stores IPAddress objects elsewhere");
    }
    let started = Instant::now();
    let now = jiff::Timestamp::now().round(jiff::Unit::Second)?.to_string();
    let mut puts = Vec::with_capacity(OPS_PER_TXN);
    for svc in svcs {
        let (cluster, _) = svc.addrs(Family::V6);
        let index = svc.index.expect("checked above");
        puts.push((format!("{SERVICES_PREFIX}{}/{}", svc.namespace, svc.name), service(svc, &now)));
        puts.push((format!("{IPADDRESSES_PREFIX}{cluster}"), ip_address(svc, index, &now)));
        if puts.len() + 2 > OPS_PER_TXN {
            txn(etcd_url, &puts)?;
            puts.clear();
        }
    }
    if !puts.is_empty() {
        txn(etcd_url, &puts)?;
    }
    println!("  wrote {} filler Services to etcd in {:.1} s", svcs.len(), started.elapsed().as_secs_f64());
    Ok(())
}

/// A filler as kube-apiserver stores it after `kubectl create` of [`Svc::to_api_yaml`] (the
/// defaults it fills in included).
fn service(svc: &Svc, now: &str) -> Value {
    let (cluster, external) = svc.addrs(Family::V6);
    let ports: Vec<Value> = svc
        .ports
        .iter()
        .enumerate()
        .map(|(k, p)| json!({"name": format!("p{k}"), "protocol": "TCP", "port": p, "targetPort": p}))
        .collect();
    json!({
        "kind": "Service",
        "apiVersion": "v1",
        "metadata": {
            "name": svc.name,
            "namespace": svc.namespace,
            "uid": uid(0x5e, svc.index.unwrap_or(0)),
            "creationTimestamp": now,
        },
        "spec": {
            "ports": ports,
            "selector": {"app": svc.name},
            "clusterIP": cluster.to_string(),
            "clusterIPs": [cluster.to_string()],
            "type": "ClusterIP",
            "externalIPs": [external.to_string()],
            "sessionAffinity": "None",
            "ipFamilies": ["IPv6"],
            "ipFamilyPolicy": "SingleStack",
            "internalTrafficPolicy": "Cluster",
        },
        "status": {"loadBalancer": {}},
    })
}

/// The IPAddress object the apiserver's allocator creates for the filler's cluster IP.
fn ip_address(svc: &Svc, index: usize, now: &str) -> Value {
    let (cluster, _) = svc.addrs(Family::V6);
    json!({
        "kind": "IPAddress",
        "apiVersion": "networking.k8s.io/v1",
        "metadata": {
            "name": cluster.to_string(),
            "uid": uid(0x1a, index),
            "creationTimestamp": now,
            "labels": {
                "ipaddress.kubernetes.io/ip-family": "IPv6",
                "ipaddress.kubernetes.io/managed-by": "ipallocator.k8s.io",
            },
        },
        "spec": {"parentRef": {"group": "", "resource": "services", "namespace": svc.namespace, "name": svc.name}},
    })
}

/// A version-4-shaped UUID, unique per (kind, index).
fn uid(kind: u8, index: usize) -> String {
    format!("00000000-00{kind:02x}-4000-8000-{index:012x}")
}

/// One etcd transaction putting every (key, object).
fn txn(etcd_url: &str, puts: &[(String, Value)]) -> Result<()> {
    let success: Vec<Value> = puts
        .iter()
        .map(|(k, v)| json!({"requestPut": {"key": B64.encode(k), "value": B64.encode(v.to_string())}}))
        .collect();
    let answer = post(etcd_url, "/v3/kv/txn", &json!({"success": success}))?;
    if answer.get("succeeded").and_then(Value::as_bool) != Some(true) {
        bail!("etcd refused a transaction of {} puts: {answer}", puts.len());
    }
    Ok(())
}

/// Keys under `prefix`.
fn count(etcd_url: &str, prefix: &str) -> Result<u64> {
    let mut end = prefix.as_bytes().to_vec();
    *end.last_mut().context("empty prefix")? += 1;
    let answer = post(
        etcd_url,
        "/v3/kv/range",
        &json!({"key": B64.encode(prefix), "range_end": B64.encode(end), "count_only": true}),
    )?;
    // The gateway encodes int64 as a JSON string and leaves zero fields out.
    Ok(answer.get("count").and_then(Value::as_str).map_or(Ok(0), str::parse)?)
}

fn post(etcd_url: &str, path: &str, body: &Value) -> Result<Value> {
    let url = format!("{etcd_url}{path}");
    let mut response = ureq::post(&url)
        .header("Content-Type", "application/json")
        .send(body.to_string())
        .with_context(|| format!("POST {url}"))?;
    let text = response.body_mut().read_to_string().with_context(|| format!("reading the answer to POST {url}"))?;
    serde_json::from_str(&text).with_context(|| format!("POST {url} answered {text}"))
}

/// Fails unless `written` (a Service from [`write`]) and `created` (one `kubectl create`d),
/// both as `kubectl get -o json` shows them, differ only in what makes each Service itself.
pub fn check_same_as_api(written: &Value, created: &Value) -> Result<()> {
    let (a, b) = (comparable(written), comparable(created));
    if a != b {
        bail!(
            "a filler written to etcd reads back unlike one the API created:\n  written: {a}\n  created: {b}\n\
             update etcd_fill::service to store what the apiserver stores"
        );
    }
    Ok(())
}

/// The object without its name, uid, timestamps, resource version, managed fields, addresses
/// and ports (which differ between any two fillers).
fn comparable(svc: &Value) -> Value {
    let mut svc = svc.clone();
    if let Some(meta) = svc.get_mut("metadata").and_then(Value::as_object_mut) {
        for field in ["name", "namespace", "uid", "creationTimestamp", "resourceVersion", "managedFields"] {
            meta.remove(field);
        }
    }
    if let Some(spec) = svc.get_mut("spec").and_then(Value::as_object_mut) {
        for field in ["clusterIP", "clusterIPs", "externalIPs", "selector"] {
            spec.remove(field);
        }
        for port in spec.get_mut("ports").and_then(Value::as_array_mut).into_iter().flatten() {
            if let Some(port) = port.as_object_mut() {
                port.remove("port");
                port.remove("targetPort");
            }
        }
    }
    svc
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::filler;

    #[test]
    fn a_written_filler_has_its_own_name_addresses_and_uid() {
        let svc = filler(123_456);
        let obj = service(&svc, "2026-12-07T00:00:00Z");
        assert_eq!(obj["metadata"]["name"], "svc-123456");
        assert_eq!(obj["metadata"]["namespace"], svc.namespace);
        assert_eq!(obj["spec"]["clusterIP"], svc.addrs(Family::V6).0.to_string());
        assert_eq!(obj["spec"]["externalIPs"][0], svc.addrs(Family::V6).1.to_string());
        assert_eq!(obj["spec"]["ports"][0]["port"], u64::from(svc.ports[0]));
        assert_ne!(obj["metadata"]["uid"], service(&filler(123_457), "")["metadata"]["uid"]);
        let ip = ip_address(&svc, 123_456, "");
        assert_eq!(ip["metadata"]["name"], obj["spec"]["clusterIP"]);
        assert_eq!(ip["spec"]["parentRef"]["name"], "svc-123456");
        assert_ne!(ip["metadata"]["uid"], obj["metadata"]["uid"]);
    }

    #[test]
    fn the_comparison_ignores_identity_and_sees_everything_else() {
        let a = service(&filler(1), "2026-12-07T00:00:00Z");
        let b = service(&filler(2), "2026-12-07T00:00:01Z");
        check_same_as_api(&a, &b).unwrap();
        let mut c = b.clone();
        c["spec"]["sessionAffinity"] = json!("ClientIP");
        assert!(check_same_as_api(&a, &c).is_err());
        let mut d = b;
        d["spec"]["ports"][0]["protocol"] = json!("UDP");
        assert!(check_same_as_api(&a, &d).is_err());
    }
}
