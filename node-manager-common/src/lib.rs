//! Map keys and values shared by the eBPF programs and the agent.
//!
//! Every type is `#[repr(C)]` and free of padding: the kernel hashes keys as raw bytes, so a
//! padding byte would make two equal keys differ. IPv4 addresses are stored IPv4-mapped
//! (`::ffff:a.b.c.d`) in 16 bytes, so one map and one code path serve both families. All
//! addresses and ports are in network byte order, as they sit in the packet.
#![no_std]

mod counters;
pub use counters::{COUNTERS_LEN, CT_COUNTERS_LEN, CounterIndex, CounterKind, CtCounterIndex};

/// Version of the pinned layout. Bumped whenever a map's key, value or size changes; pins live
/// under `<bpffs>/node-manager/v<LAYOUT_VERSION>/`.
pub const LAYOUT_VERSION: u32 = 1;

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;

/// Map names, as they appear in the object file, in `bpftool map show` and as pin file names.
pub mod map_names {
    pub const FRONTENDS: &str = "NM_FRONTENDS";
    pub const POD_CIDRS: &str = "NM_POD_CIDRS";
    /// The same pod CIDRs as the programs test them (see [`super::PodNets`]).
    pub const POD_NETS: &str = "NM_POD_NETS";
    /// Rewritten TCP flows, and UDP/ICMP echo ones apart (so that a flood of short datagram
    /// flows cannot evict an idle TCP connection's entry).
    pub const FLOWS: &str = "NM_FLOWS";
    pub const FLOWS_DGRAM: &str = "NM_FLOWS_DGRAM";
    /// Fragmented datagrams of rewritten flows: what their first fragment was rewritten to.
    pub const FRAGS: &str = "NM_FRAGS";
    pub const CONFIG: &str = "NM_CONFIG";
    pub const COUNTERS: &str = "NM_COUNTERS";
    /// Conntrack-INVALID drop: settings, per-family liveness of conntrack, per-CPU counters.
    pub const CT_CONFIG: &str = "NM_CT_CONFIG";
    pub const CT_SEEN: &str = "NM_CT_SEEN";
    pub const CT_COUNTERS: &str = "NM_CT_COUNTERS";
    pub const SOCK_REV: &str = "NM_SOCK_REV";
    /// Which Service each frontend belongs to: written by the agent for `inspect` and
    /// `bpftool`, never read by the programs.
    pub const OWNERS: &str = "NM_OWNERS";
    /// Programs the TC programs tail-call (a BPF_MAP_TYPE_PROG_ARRAY, filled by the agent at
    /// load): slot [`super::TAIL_CALL_ICMP_ERROR`].
    pub const TAIL_CALLS: &str = "NM_TAIL_CALLS";
    pub const ALL: [&str; 14] = [
        FRONTENDS,
        POD_CIDRS,
        POD_NETS,
        FLOWS,
        FLOWS_DGRAM,
        FRAGS,
        CONFIG,
        COUNTERS,
        SOCK_REV,
        CT_CONFIG,
        CT_SEEN,
        CT_COUNTERS,
        OWNERS,
        TAIL_CALLS,
    ];
}

/// The slot of `nm_pod_icmp_error` in [`map_names::TAIL_CALLS`], and the map's size.
pub const TAIL_CALL_ICMP_ERROR: u32 = 0;
pub const TAIL_CALLS_LEN: u32 = 1;

/// Program names in the object file.
pub mod program_names {
    pub const POD_INGRESS: &str = "nm_pod_ingress";
    pub const POD_EGRESS: &str = "nm_pod_egress";
    /// ICMP errors to pods, tail-called by the egress program (never attached itself).
    pub const POD_ICMP_ERROR: &str = "nm_pod_icmp_error";
    /// BPF_PROG_TYPE_NETFILTER programs on LOCAL_IN (loaded by the agent's own bpf(2) shim:
    /// aya 0.14 has no netfilter program type).
    pub const DROP_INVALID_V4: &str = "nm_drop_invalid4";
    pub const DROP_INVALID_V6: &str = "nm_drop_invalid6";
    pub const SOCK_CONNECT4: &str = "nm_sock_connect4";
    pub const SOCK_CONNECT6: &str = "nm_sock_connect6";
    pub const SOCK_SENDMSG4: &str = "nm_sock_sendmsg4";
    pub const SOCK_SENDMSG6: &str = "nm_sock_sendmsg6";
    pub const SOCK_RECVMSG4: &str = "nm_sock_recvmsg4";
    pub const SOCK_RECVMSG6: &str = "nm_sock_recvmsg6";
    pub const SOCK_GETPEERNAME4: &str = "nm_sock_getpeername4";
    pub const SOCK_GETPEERNAME6: &str = "nm_sock_getpeername6";
    /// A `cgroup_sock` program (`cgroup/sock_release`), unlike the others above.
    pub const SOCK_RELEASE: &str = "nm_sock_release";
}

/// Capacities. The frontend map holds one entry per (external address, port, protocol) plus one
/// ICMP entry per external address; 131072 leaves room for 100,000 Services' ports.
pub const FRONTENDS_MAX: u32 = 131_072;
pub const POD_CIDRS_MAX: u32 = 64;
/// One owner per frontend (allocated on write: BPF_F_NO_PREALLOC).
pub const OWNERS_MAX: u32 = FRONTENDS_MAX;
/// Live pod→external TCP flows remembered for the reverse rewrite (LRU: the oldest idle flow is
/// evicted first when full; a flow ends at a TCP RST).
pub const FLOWS_MAX: u32 = 262_144;
/// The same for UDP and ICMP echo flows, in their own LRU map: datagram flows are short and
/// many (one per source port), and sharing a map with TCP let them evict idle connections.
pub const FLOWS_DGRAM_MAX: u32 = 65_536;
/// Fragmented datagrams in flight (LRU: a datagram's fragments arrive within moments of each
/// other, so only recent ones matter).
pub const FRAGS_MAX: u32 = 8_192;
/// Sockets of host processes that dialled a frontend, remembered so that `getpeername` and
/// `recvmsg` show the external address (LRU: closed sockets' entries age out).
pub const SOCK_REV_MAX: u32 = 65_536;

/// A Service frontend as the pod dials it: (external address, port, protocol).
/// For ICMP echo the port is 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FrontendKey {
    pub addr: [u8; 16],
    /// Destination port, network byte order.
    pub port: u16,
    pub proto: u8,
    pub pad: u8,
}

/// Where a frontend is rewritten to: the Service's cluster IP of the same family.
/// The port is kept (a Service's port is the same on its cluster IP and its external IPs).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Frontend {
    pub cluster_addr: [u8; 16],
}

/// The Service that owns a frontend, as `namespace/name` (each at most 63 characters), NUL-padded.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Owner {
    pub service: [u8; 128],
}

impl Owner {
    /// `namespace/name`, cut at 127 bytes on a character boundary (Kubernetes names fit).
    pub fn new(service: &str) -> Owner {
        let mut end = service.len().min(127);
        while !service.is_char_boundary(end) {
            end -= 1;
        }
        let mut out = Owner { service: [0; 128] };
        out.service[..end].copy_from_slice(&service.as_bytes()[..end]);
        out
    }

    /// The name's bytes, up to the first NUL.
    pub fn name_bytes(&self) -> &[u8] {
        let len = self.service.iter().position(|&b| b == 0).unwrap_or(self.service.len());
        &self.service[..len]
    }

    /// The name up to the first NUL; `None` if it is not UTF-8.
    pub fn as_str(&self) -> Option<&str> {
        core::str::from_utf8(self.name_bytes()).ok()
    }
}

/// A rewritten flow as its replies are seen on the pod interface's egress:
/// from the cluster IP (`remote_*`) back to the pod (`pod_*`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub pod_addr: [u8; 16],
    pub remote_addr: [u8; 16],
    /// Pod's source port (ICMP echo: the echo identifier), network byte order.
    pub pod_port: u16,
    /// Service port (ICMP echo: 0), network byte order.
    pub remote_port: u16,
    pub proto: u8,
    pub pad: [u8; 3],
}

/// The external address the pod dialled, restored as the reply's source.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Flow {
    pub external_addr: [u8; 16],
}

/// A fragmented datagram as its fragments carry it: source, destination, identification and
/// protocol (RFC 791 / RFC 8200 reassembly key), as seen before the rewrite.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub id: u32,
    pub proto: u8,
    pub pad: [u8; 3],
}

/// The address the datagram's first fragment was rewritten to (destination from the pod,
/// source to it), given to its later fragments.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FragTarget {
    pub addr: [u8; 16],
}

/// A host socket's view of a rewritten peer: the socket (`bpf_get_socket_cookie`) and the
/// cluster address and port it was redirected to, as `getpeername`/`recvmsg` report them.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockRevKey {
    pub cookie: u64,
    /// IPv4-mapped for IPv4.
    pub cluster_addr: [u8; 16],
    /// Network byte order.
    pub port: u16,
    pub pad: [u8; 6],
}

/// The external address the socket dialled, shown in place of the cluster address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockRev {
    pub external_addr: [u8; 16],
}

/// This node's pod CIDRs as the TC programs test a pod packet's source: up to
/// [`POD_NETS_INLINE`] prefixes as (network, mask) pairs compared in a loop, which costs less
/// than a walk of the `NM_POD_CIDRS` trie; with more prefixes than that, `count` is
/// [`POD_NETS_USE_TRIE`] and the programs walk the trie (which the agent keeps filled either way).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PodNets {
    pub count: u32,
    pub pad: u32,
    pub nets: [PodNet; POD_NETS_INLINE],
}

/// A prefix as two halves of its 16-byte (IPv4-mapped for IPv4) network address and mask, each
/// half the native-endian `u64` of its 8 bytes as they lie in the packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PodNet {
    pub addr: [u64; 2],
    pub mask: [u64; 2],
}

pub const POD_NETS_INLINE: usize = 8;
pub const POD_NETS_USE_TRIE: u32 = u32::MAX;

/// Runtime settings of the datapath, in a one-entry array so the agent can change them live.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DatapathConfig {
    /// OR-ed into skb->mark of rewritten pod packets (kube-proxy's KUBE-MARK-MASQ is 0x4000);
    /// 0 disables.
    pub masquerade_mark: u32,
}

/// A packet and byte count (per CPU in the counters map).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

/// Settings of the conntrack-INVALID drop (one-entry array, written by the agent before it links
/// the netfilter programs).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CtConfig {
    /// Byte offset of `_nfct` in the running kernel's `struct sk_buff`, read from its BTF.
    /// 0 = unknown: never drop.
    pub nfct_offset: u32,
    /// Byte offset of `len` in `struct sk_buff` (for byte counters).
    pub len_offset: u32,
    /// Drop only while conntrack tracked a packet on the same family's hook within this many
    /// milliseconds. `_nfct == 0` means INVALID only if conntrack looked at the packet, and
    /// conntrack hooks a network namespace only while some rule needs it; without this guard an
    /// idle conntrack would turn the program into "drop everything addressed to the host".
    pub tracked_window_ms: u32,
    /// The agent's bookkeeping, not read by the programs: the mode in force and why (codes of
    /// the agent's `invalid::Mode` and `invalid::Reason`, for `inspect` and `cleanup`), and the
    /// value of `net.netfilter.nf_conntrack_tcp_be_liberal` to restore on cleanup plus one
    /// (0 = the agent did not change it).
    pub mode: u32,
    pub reason: u32,
    pub liberal_restore: u32,
}

/// Index into `NM_CT_SEEN` (last time conntrack was seen tracking, per family) and the base of
/// the per-family counters.
pub const CT_FAMILY_V4: u32 = 0;
pub const CT_FAMILY_V6: u32 = 1;

/// Whether a 16-byte address is IPv4-mapped (`::ffff:a.b.c.d`).
#[inline(always)]
pub const fn is_v4_mapped(a: &[u8; 16]) -> bool {
    u64::from_ne_bytes([a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]]) == 0
        && a[8] == 0
        && a[9] == 0
        && a[10] == 0xff
        && a[11] == 0xff
}

/// IPv4-mapped form of an IPv4 address (network byte order octets).
pub const fn v4_mapped(octets: [u8; 4]) -> [u8; 16] {
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, octets[0], octets[1], octets[2], octets[3]]
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: all of these are #[repr(C)], plain old data, and have no padding (checked below).
    unsafe impl aya::Pod for FrontendKey {}
    unsafe impl aya::Pod for Frontend {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for Flow {}
    unsafe impl aya::Pod for FragKey {}
    unsafe impl aya::Pod for FragTarget {}
    unsafe impl aya::Pod for DatapathConfig {}
    unsafe impl aya::Pod for PodNets {}
    unsafe impl aya::Pod for SockRevKey {}
    unsafe impl aya::Pod for SockRev {}
    unsafe impl aya::Pod for Counter {}
    unsafe impl aya::Pod for CtConfig {}
    unsafe impl aya::Pod for Owner {}
}

// Padding-free layouts: the sum of the fields equals the size.
const _: () = assert!(core::mem::size_of::<FrontendKey>() == 16 + 2 + 1 + 1);
const _: () = assert!(core::mem::size_of::<Frontend>() == 16);
const _: () = assert!(core::mem::size_of::<FlowKey>() == 16 + 16 + 2 + 2 + 1 + 3);
const _: () = assert!(core::mem::size_of::<Flow>() == 16);
const _: () = assert!(core::mem::size_of::<FragKey>() == 16 + 16 + 4 + 1 + 3);
const _: () = assert!(core::mem::size_of::<FragTarget>() == 16);
const _: () = assert!(core::mem::size_of::<DatapathConfig>() == 4);
const _: () = assert!(core::mem::size_of::<PodNets>() == 4 + 4 + POD_NETS_INLINE * 32);
const _: () = assert!(core::mem::size_of::<SockRevKey>() == 8 + 16 + 2 + 6);
const _: () = assert!(core::mem::size_of::<SockRev>() == 16);
const _: () = assert!(core::mem::size_of::<Counter>() == 16);
const _: () = assert!(core::mem::size_of::<CtConfig>() == 24);
const _: () = assert!(core::mem::size_of::<Owner>() == 128);
