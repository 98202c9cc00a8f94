//! Where Services (and this node's pod CIDRs) come from. A source publishes complete
//! snapshots — level-triggered, never deltas — so the reconciler can always rebuild the full
//! desired state. The services file is one source; the Kubernetes API is the other.
pub mod file;
pub mod kubernetes;

use std::sync::Arc;

use ipnet::IpNet;

use crate::model::ServiceInfo;

#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Shared with the source's store: publishing a snapshot of 10,000 Services copies
    /// pointers, not Services. Each holds only what the model reads.
    pub services: Vec<Arc<ServiceInfo>>,
    /// The Node's spec.podCIDRs, when the source knows them.
    pub node_pod_cidrs: Option<Vec<IpNet>>,
    /// Per-object problems found while reading (each names the object).
    pub warnings: Vec<String>,
}
