//! A Kubernetes node built from network namespaces, for tests, the demo and benchmarks.
//!
//! [`Lab::new`] builds three namespaces with `ip` (iproute2) and `nft` (nftables):
//!
//! ```text
//!  pod ns                     node ns                                     ep ns
//!  eth0 192.0.2.10/32  <-->  veth<id> 192.0.2.1/32                        (the Service endpoint)
//!       2001:db8:1::10/128           2001:db8:1::1/128
//!                            kube-ipvs0 203.0.113.10/32, 2001:db8:e::10/128
//!                            eth0 192.0.2.129/26        <-->  eth0 192.0.2.130/26
//!                                 2001:db8:2::1/64                  2001:db8:2::2/64
//!                            nft table inet nml_kubeproxy:          TCP + UDP echo servers
//!                              198.51.100.10:8080 -> 192.0.2.130:8080     on :8080 (both families)
//!                              [2001:db8:5::10]:8080 -> [2001:db8:2::2]:8080
//! ```
//!
//! * The **pod** reaches everything through the host-side veth (`veth*`, see [`Lab::pod_host_if`]),
//!   which is where node-manager attaches its TC programs.
//! * The **node** routes and forwards (forwarding is enabled in that namespace only), does
//!   kube-proxy-like DNAT of the cluster IPs ([`CLUSTER_V4`], [`CLUSTER_V6`]) to the endpoint in
//!   a prerouting hook (pod traffic) and an output hook (node processes), and masquerades what
//!   carries mark `0x4000/0x4000` (KUBE-MARK-MASQ; node-originated traffic to a cluster IP gets it,
//!   as kube-proxy does for sources outside the cluster CIDR). The external/LoadBalancer IPs
//!   ([`EXTERNAL_V4`], [`EXTERNAL_V6`]) are bound on `kube-ipvs0` with nothing listening — what
//!   kube-proxy IPVS does for `externalTrafficPolicy: Local` on a node without a local endpoint —
//!   so without the agent, TCP from the pod to them is refused and UDP gets no echo.
//!   Like kube-proxy's, `kube-ipvs0` is left down (local routes exist anyway); it is a `dummy`
//!   device, or an `ifb` device on kernels built without the dummy driver.
//! * Duplicate address detection is off in every lab namespace (`accept_dad=0`), so IPv6 works
//!   as soon as [`Lab::new`] returns.
//! * The **ep** namespace plays the endpoint on another node. It runs in-process echo servers
//!   (threads of this process): TCP reads the request until the client half-closes, answers
//!   `b"echo:" + request` and closes; UDP answers every datagram with `b"echo:" + datagram`.
//!
//! Everything is removed when the [`Lab`] is dropped (also when [`Lab::new`] fails half-way).
//! Only documentation address ranges are used and nothing is configured in the caller's own
//! network namespace. Needs root (CAP_SYS_ADMIN + CAP_NET_ADMIN).

pub mod clients;
pub mod echo;
pub mod kube;
pub mod netns;
pub mod reset;
mod run;
pub mod topology;

use std::net::{Ipv4Addr, Ipv6Addr};

pub use clients::{TcpReply, UdpReply, tcp_request_in, udp_request_in};
pub use netns::{in_netns, leftovers, remove_stale_leftovers};
pub use topology::{Lab, Ns};

/// The pod's IPv4 address (on `eth0` in the pod namespace).
pub const POD_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
/// The pod's IPv6 address (on `eth0` in the pod namespace).
pub const POD_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x10);
/// IPv4 pod CIDR of the node (kube-proxy's cluster CIDR as far as masquerading goes).
pub const POD_CIDR_V4: &str = "192.0.2.0/25";
/// IPv6 pod CIDR of the node.
pub const POD_CIDR_V6: &str = "2001:db8:1::/64";
/// IPv4 cluster IP of the Service (DNATed by the node's nftables, bound nowhere).
pub const CLUSTER_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
/// IPv6 cluster IP of the Service.
pub const CLUSTER_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 5, 0, 0, 0, 0, 0x10);
/// IPv4 external/LoadBalancer IP of the Service (bound on the node's `kube-ipvs0`).
pub const EXTERNAL_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// IPv6 external/LoadBalancer IP of the Service (bound on the node's `kube-ipvs0`).
pub const EXTERNAL_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xe, 0, 0, 0, 0, 0x10);
/// IPv4 address of the Service endpoint (in the ep namespace).
pub const ENDPOINT_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 130);
/// IPv6 address of the Service endpoint (in the ep namespace).
pub const ENDPOINT_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 2);
/// Service port, TCP and UDP, on the cluster IPs, the external IPs and the endpoint.
pub const SERVICE_PORT: u16 = 8080;
/// IPv4 address of the first pod added with [`Lab::add_extra_pod`]; the n-th (0-based) gets
/// this plus n in the last octet.
pub const EXTRA_POD_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 11);
/// IPv6 address of the first pod added with [`Lab::add_extra_pod`]; the n-th (0-based) gets
/// this plus n.
pub const EXTRA_POD_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x11);
/// Name of the kube-proxy nftables table in the node namespace (family `inet`).
pub const NFT_TABLE: &str = "nml_kubeproxy";
/// Name, in the node namespace, of the interface towards the endpoint (the node's "uplink").
/// It does not match `veth*`.
pub const NODE_UPLINK_IF: &str = "eth0";
/// Prefix of every network namespace a lab creates (see [`leftovers`]).
pub const NETNS_PREFIX: &str = "nml-";

pub(crate) const NODE_POD_GW_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
pub(crate) const NODE_POD_GW_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);
/// The node's address on its uplink (what the endpoint sees of masqueraded traffic).
pub const NODE_UPLINK_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 129);
pub(crate) const NODE_UPLINK_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 1);
