//! Frontend lookup: which pod packets are addressed to a Service's external/LB IP, and the
//! cluster IP they go to instead. Filled by the agent from the Services it watches.
use aya_ebpf::{
    btf_maps::{Array, HashMap, LpmTrie, lpm_trie::Key},
    macros::btf_map,
};
use node_manager_common::{
    DatapathConfig, FRONTENDS_MAX, Frontend, FrontendKey, OWNERS_MAX, Owner, POD_CIDRS_MAX, PROTO_ICMP, PROTO_ICMPV6,
};

use crate::helpers::parse::Packet;

#[btf_map]
static NM_FRONTENDS: HashMap<FrontendKey, Frontend, { FRONTENDS_MAX as usize }> = HashMap::new();

/// The Service behind each frontend, for `inspect` and `bpftool map dump`; no program reads it.
/// Declared here so the map is created, typed (BTF) and pinned with the others.
/// Flags 1 = BPF_F_NO_PREALLOC: memory only for the frontends that exist.
#[btf_map]
static NM_OWNERS: HashMap<FrontendKey, Owner, { OWNERS_MAX as usize }, 1> = HashMap::new();

/// This node's pod CIDRs (IPv4-mapped for IPv4); the value is unused.
#[btf_map]
static NM_POD_CIDRS: LpmTrie<[u8; 16], u8, { POD_CIDRS_MAX as usize }> = LpmTrie::new();

#[btf_map]
static NM_CONFIG: Array<DatapathConfig, 1> = Array::new();

#[inline(always)]
pub fn from_local_pod(pkt: &Packet) -> bool {
    NM_POD_CIDRS.get(&Key::new(128, pkt.saddr)).is_some()
}

/// The cluster address for the packet's (destination, port, protocol), if it is a frontend.
#[inline(always)]
pub fn frontend(pkt: &Packet) -> Option<[u8; 16]> {
    frontend_of(pkt.daddr, pkt.dport, pkt.proto)
}

/// The cluster address for (address, port in network byte order, protocol), if it is a
/// frontend. The one lookup both the TC and the socket hooks use.
#[inline(always)]
pub fn frontend_of(addr: [u8; 16], port: u16, proto: u8) -> Option<[u8; 16]> {
    let key = FrontendKey { addr, port, proto, pad: 0 };
    // SAFETY: the value is copied out immediately; a concurrent update can at worst give the
    // previous or the next cluster address, both valid.
    unsafe { NM_FRONTENDS.get(key) }.map(|f| f.cluster_addr)
}

/// Whether the packet's destination is an external address we serve (every one has its ICMP
/// echo frontend).
#[inline(always)]
pub fn is_external_addr(pkt: &Packet) -> bool {
    let icmp = if pkt.v6 { PROTO_ICMPV6 } else { PROTO_ICMP };
    frontend_of(pkt.daddr, 0, icmp).is_some()
}

#[inline(always)]
pub fn masquerade_mark() -> u32 {
    NM_CONFIG.get(0).map_or(0, |c| c.masquerade_mark)
}
