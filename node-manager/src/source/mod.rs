//! Where Services (and this node's pod CIDRs) come from. A source publishes complete
//! snapshots — level-triggered, never deltas — so the reconciler can always rebuild the full
//! desired state. The services file is one source; the Kubernetes API is the other.
pub mod file;
pub mod kubernetes;

use std::sync::Arc;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Service;

#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Shared with the source's store: publishing a snapshot of 10,000 Services copies
    /// pointers, not Services.
    pub services: Vec<Arc<Service>>,
    /// The Node's spec.podCIDRs, when the source knows them.
    pub node_pod_cidrs: Option<Vec<IpNet>>,
    /// Per-object problems found while reading (each names the object).
    pub warnings: Vec<String>,
}
