//! Services from a file: a YAML or JSON `List`, a single object, or multi-document YAML.
//! Re-read when its content changes. A file that cannot be read or parsed as a whole leaves
//! the previous state in force; an object that fails to parse is skipped with a warning naming
//! it, and if an earlier version of it was good, that version stays in force.
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use k8s_openapi::api::core::v1::Service;
use serde::Deserialize as _;
use tokio::sync::watch;

use super::Snapshot;
use crate::model::ServiceInfo;

/// Parses the file content. `last_good` maps `namespace/name` to the last version of each
/// object that parsed, and is updated.
pub fn parse(text: &str, last_good: &mut HashMap<String, Service>) -> Result<Snapshot> {
    let mut items = Vec::new();
    for document in serde_yaml::Deserializer::from_str(text) {
        let value = serde_yaml::Value::deserialize(document).context("not valid YAML/JSON")?;
        match value {
            serde_yaml::Value::Null => {}
            serde_yaml::Value::Mapping(ref m)
                if m.get("items").is_some()
                    || m.get("kind").and_then(|k| k.as_str()).is_some_and(|k| k.ends_with("List")) =>
            {
                match m.get("items") {
                    Some(serde_yaml::Value::Sequence(seq)) => items.extend(seq.iter().cloned()),
                    Some(serde_yaml::Value::Null) | None => {}
                    Some(_) => bail!("`items` of the List is not a sequence"),
                }
            }
            other => items.push(other),
        }
    }
    let mut snapshot = Snapshot::default();
    let mut seen = std::collections::HashSet::new();
    for (index, item) in items.into_iter().enumerate() {
        let name = object_name(&item).unwrap_or_else(|| format!("item #{index}"));
        if let Some(kind) = item.get("kind").and_then(|k| k.as_str())
            && kind != "Service"
        {
            snapshot.warnings.push(format!("{name}: kind {kind} is not a Service; skipped"));
            continue;
        }
        match serde_yaml::from_value::<Service>(item) {
            Ok(mut svc) => {
                svc.metadata.managed_fields = None;
                if svc.metadata.namespace.is_none() {
                    svc.metadata.namespace = Some("default".into());
                }
                let key = crate::model::service_name(&svc);
                if !seen.insert(key.clone()) {
                    snapshot.warnings.push(format!("{key}: listed twice; the later copy is used"));
                    snapshot.services.retain(|s| s.name != key);
                }
                snapshot.services.push(Arc::new(ServiceInfo::from(&svc)));
                last_good.insert(key, svc);
            }
            Err(e) => match last_good.get(&name) {
                Some(previous) if seen.insert(name.clone()) => {
                    snapshot.warnings.push(format!("{name}: malformed ({e}); keeping its last good version"));
                    snapshot.services.push(Arc::new(ServiceInfo::from(previous)));
                }
                _ => snapshot.warnings.push(format!("{name}: malformed ({e}); skipped")),
            },
        }
    }
    // Forget last-good copies of objects no longer in the file (deleted Services).
    last_good.retain(|k, _| seen.contains(k));
    Ok(snapshot)
}

/// `namespace/name` of a raw object, if its metadata is readable.
fn object_name(item: &serde_yaml::Value) -> Option<String> {
    let meta = item.get("metadata")?;
    let name = meta.get("name")?.as_str()?;
    let ns = meta.get("namespace").and_then(|n| n.as_str()).unwrap_or("default");
    Some(format!("{ns}/{name}"))
}

/// Polls the file and publishes a snapshot whenever its content changes and parses.
/// Polling (not inotify) follows ConfigMap-style symlink swaps and recreated files alike.
pub async fn watch(path: PathBuf, tx: watch::Sender<Option<Snapshot>>, interval: Duration) {
    let mut last_good = HashMap::new();
    let mut last_text: Option<String> = None;
    let mut last_error: Option<String> = None;
    loop {
        match read(&path).await {
            Ok(text) if last_text.as_deref() != Some(&text) => {
                match parse(&text, &mut last_good) {
                    Ok(snapshot) => {
                        tracing::info!(file = %path.display(), services = snapshot.services.len(), "services file read");
                        tx.send_replace(Some(snapshot));
                        last_error = None;
                    }
                    Err(e) => {
                        tracing::error!(file = %path.display(), error = format!("{e:#}"), "services file is invalid; keeping the previous state. Fix the file; it is re-read when it changes");
                    }
                }
                last_text = Some(text);
            }
            Ok(_) => {}
            Err(e) => {
                let msg = format!("{e:#}");
                if last_error.as_deref() != Some(&msg) {
                    tracing::error!(file = %path.display(), error = %msg, "services file unreadable; keeping the previous state");
                    last_error = Some(msg);
                }
                last_text = None;
            }
        }
        tokio::time::sleep(interval).await;
    }
}

async fn read(path: &Path) -> Result<String> {
    tokio::task::spawn_blocking({
        let path = path.to_owned();
        move || std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
    })
    .await?
}

#[cfg(test)]
mod tests {
    use super::*;

    const SVC_A: &str = r#"
apiVersion: v1
kind: Service
metadata: {namespace: ns, name: a}
spec: {type: LoadBalancer, clusterIP: 10.96.0.1, ports: [{port: 80}]}
status: {loadBalancer: {ingress: [{ip: 203.0.113.1}]}}
"#;

    fn names(s: &Snapshot) -> Vec<String> {
        s.services.iter().map(|s| s.name.to_string()).collect()
    }

    #[test]
    fn multi_document_yaml_list_and_json_all_parse() {
        let mut good = HashMap::new();
        let multi = format!("{SVC_A}\n---\n{}", SVC_A.replace("name: a", "name: b"));
        assert_eq!(names(&parse(&multi, &mut good).unwrap()), vec!["ns/a", "ns/b"]);
        let list = r#"{"apiVersion":"v1","kind":"List","items":[{"kind":"Service","metadata":{"name":"c"},"spec":{"clusterIP":"10.96.0.3"}}]}"#;
        assert_eq!(names(&parse(list, &mut good).unwrap()), vec!["default/c"]);
        assert!(parse("", &mut good).unwrap().services.is_empty());
    }

    #[test]
    fn a_malformed_object_keeps_its_last_good_version_and_others_apply() {
        let mut good = HashMap::new();
        parse(SVC_A, &mut good).unwrap();
        let broken = SVC_A.replace("ports: [{port: 80}]", "ports: [{port: eighty}]");
        let other = SVC_A.replace("name: a", "name: b");
        let s = parse(&format!("{broken}\n---\n{other}"), &mut good).unwrap();
        assert_eq!(names(&s), vec!["ns/a", "ns/b"]);
        assert_eq!(s.warnings.len(), 1);
        assert!(
            s.warnings[0].starts_with("ns/a: malformed") && s.warnings[0].contains("last good"),
            "{:?}",
            s.warnings
        );
        // A new object that never parsed is just skipped.
        let s = parse(&broken.replace("name: a", "name: new"), &mut HashMap::new()).unwrap();
        assert!(s.services.is_empty() && s.warnings[0].starts_with("ns/new: malformed"));
    }

    #[test]
    fn syntax_errors_fail_the_whole_file_and_other_kinds_are_skipped() {
        let mut good = HashMap::new();
        assert!(parse("kind: Service\n  bad: [indent", &mut good).is_err());
        let s = parse("kind: ConfigMap\nmetadata: {name: x}\n", &mut good).unwrap();
        assert!(s.services.is_empty());
        assert!(s.warnings[0].contains("ConfigMap"));
    }
}
