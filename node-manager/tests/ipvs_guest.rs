//! kube-proxy in IPVS mode, the real one (v1.34), with node-manager as the IPVS manifest runs
//! it: the same story as the nftables and iptables modes in `real_kubernetes.rs`. kube-proxy
//! binds the LB IP on kube-ipvs0 (what made kubernetes#75262 black-hole in-cluster traffic to
//! it); measured here, it serves pods and node processes anyway (its proxier sends in-cluster
//! clients to all endpoints when the node has no local one, kubernetes PR #97081), and
//! node-manager must not change that.
//!
//! Needs the ip_vs modules, which this host's kernel lacks: `cargo xtask test` runs it in the
//! Debian 6.12 guest (`cargo xtask vm --kernel 6.12 --suite ipvs_guest --include-ignored`).
mod common;

use common::kube::kube_proxy_story;
use lab::kube::ProxyMode;

#[test]
#[ignore = "needs the ip_vs modules: cargo xtask test runs it in the 6.12 guest (cargo xtask vm --kernel 6.12 --suite ipvs_guest --include-ignored)"]
fn kube_proxy_ipvs_mode_keeps_working_with_node_manager() {
    kube_proxy_story(ProxyMode::Ipvs);
}
