//! Reading the manifests in `deploy/` and the capabilities `deploy/README.md` documents.
#![allow(dead_code)]
use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use serde::Deserialize as _;
use serde_json::Value;

pub fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().join("deploy")
}

pub fn read(name: &str) -> String {
    let path = deploy_dir().join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// The documents of a multi-document YAML text, as JSON.
pub fn documents(text: &str, what: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|doc| {
            let yaml = serde_yaml::Value::deserialize(doc).unwrap_or_else(|e| panic!("{what}: not YAML: {e}"));
            serde_json::to_value(yaml).unwrap_or_else(|e| panic!("{what}: not representable as JSON: {e}"))
        })
        .filter(|doc| !doc.is_null())
        .collect()
}

/// The DaemonSet's container in manifest `name`.
pub fn container(name: &str) -> k8s_openapi::api::core::v1::Container {
    let docs = documents(&read(name), name);
    let ds = docs.iter().find(|d| d["kind"] == "DaemonSet").unwrap_or_else(|| panic!("{name}: no DaemonSet"));
    serde_json::from_value(ds["spec"]["template"]["spec"]["containers"][0].clone()).unwrap()
}

/// The capabilities `deploy/README.md` documents (the rows of its table between the
/// `capabilities` markers), without the `CAP_` prefix, as Kubernetes spells them.
pub fn documented_capabilities() -> BTreeSet<String> {
    let readme = read("README.md");
    let section = readme
        .split("<!-- capabilities -->")
        .nth(1)
        .and_then(|rest| rest.split("<!-- /capabilities -->").next())
        .expect("deploy/README.md has a <!-- capabilities --> ... <!-- /capabilities --> table");
    section
        .lines()
        .filter_map(|l| l.strip_prefix("| `CAP_"))
        .filter_map(|l| l.split('`').next())
        .map(str::to_owned)
        .collect()
}
