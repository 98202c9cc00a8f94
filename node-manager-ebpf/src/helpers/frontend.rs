//! Frontend lookup: which pod packets are addressed to a Service's external/LB IP, and the
//! cluster IP they go to instead. Filled by the agent from the Services it watches.
use aya_ebpf::{
    btf_maps::{Array, HashMap, LpmTrie, lpm_trie::Key},
    macros::btf_map,
};
use node_manager_common::{
    DatapathConfig, FRONTENDS_MAX, Frontend, FrontendKey, OWNERS_MAX, Owner, POD_CIDRS_MAX, POD_NETS_INLINE,
    PROTO_ICMP, PROTO_ICMPV6, PodNets,
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

/// The pod CIDRs again, as the loop in `from_local_pod` reads them.
#[btf_map]
static NM_POD_NETS: Array<PodNets, 1> = Array::new();

#[btf_map]
static NM_CONFIG: Array<DatapathConfig, 1> = Array::new();

/// Whether the packet's source is in one of this node's pod CIDRs: up to `POD_NETS_INLINE`
/// masked comparisons (about 10 ns less than the trie walk on a frontend hit), else the trie.
/// Unrolled, each at a constant offset: a loader without CAP_PERFMON may not add an index that
/// differs between paths to a map value pointer (the verifier's Spectre v1 rule).
#[inline(always)]
pub fn from_local_pod(pkt: &Packet) -> bool {
    let nets = match NM_POD_NETS.get(0) {
        Some(nets) if nets.count as usize <= POD_NETS_INLINE => nets,
        _ => return NM_POD_CIDRS.get(&Key::new(128, pkt.saddr)).is_some(),
    };
    let a = &pkt.saddr;
    let hi = u64::from_ne_bytes([a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]]);
    let lo = u64::from_ne_bytes([a[8], a[9], a[10], a[11], a[12], a[13], a[14], a[15]]);
    let count = nets.count as usize;
    macro_rules! in_net {
        ($($i:literal)*) => {
            $(if $i < count && hi & nets.nets[$i].mask[0] == nets.nets[$i].addr[0]
                && lo & nets.nets[$i].mask[1] == nets.nets[$i].addr[1] {
                return true;
            })*
        };
    }
    in_net!(0 1 2 3 4 5 6 7);
    false
}

const _: () = assert!(POD_NETS_INLINE == 8, "in_net! above tests 8 slots");

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
