//! ICMP errors about rewritten flows. An error about a pod's packet to an external address
//! (fragmentation needed / packet too big from a hop with a smaller MTU, an unreachable port, a
//! time exceeded) reaches the node about the packet as it left, and conntrack translates the
//! quoted packet back to what the pod's connection looked like after our rewrite: source the
//! pod, destination the cluster IP. The pod's socket is connected to the external address, so
//! the kernel matches the error to no socket and drops it: path MTU discovery never completes
//! and a TCP connection over a smaller-MTU hop stalls. The quoted destination gets the external
//! address back (the flow of the quoted tuple says which), with the quoted IPv4 header checksum
//! and the quoted L4 checksum (when quoted whole) updated, and the error's own checksum made to
//! match; an error whose source is the cluster IP (sent by the Service side, un-DNATed by
//! conntrack) gets the external address as its source too, like any reply.
//!
//! The work runs in a program of its own, `nm_pod_icmp_error`, which `nm_pod_egress` tail-calls
//! through `NM_TAIL_CALLS` (the agent puts it there at load), handing it where the error's
//! header is in the skb's control block: the egress program's stack leaves no room for it.
//!
//! Every changed 16-bit word is balanced by a checksum in the same ICMP message, so a
//! CHECKSUM_COMPLETE skb->csum stays right without being touched.
use aya_ebpf::{
    bindings::BPF_F_MARK_MANGLED_0, btf_maps::ProgramArray, helpers::bpf_csum_diff, macros::btf_map,
    programs::TcContext,
};
use node_manager_common::{
    FlowKey, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, TAIL_CALL_ICMP_ERROR, TAIL_CALLS_LEN, is_v4_mapped,
    v4_mapped,
};

use crate::helpers::{
    flow,
    headers::{
        ETH_HLEN, ICMP_CSUM_OFF, ICMP_ECHO_ID_OFF, ICMP_ECHO_REQUEST, ICMP_HLEN, ICMPV6_ECHO_REQUEST, IPV4_CSUM_OFF,
        IPV4_DADDR_OFF, IPV4_FRAG_OFF, IPV4_FRAG_OFFSET_MASK, IPV4_HLEN, IPV4_PROTO_OFF, IPV4_SADDR_OFF,
        IPV4_VER_IHL_NO_OPTIONS, IPV6_DADDR_OFF, IPV6_HLEN, IPV6_NEXTHDR_OFF, IPV6_SADDR_OFF, TCP_CSUM_OFF,
        UDP_CSUM_OFF,
    },
    parse::Packet,
    rewrite::{Which, replace_addr},
};

/// Programs tail-called by the TC programs: [`TAIL_CALL_ICMP_ERROR`] is `nm_pod_icmp_error`.
#[btf_map]
static NM_TAIL_CALLS: ProgramArray<{ TAIL_CALLS_LEN as usize }> = ProgramArray::new();

/// The quoted transport bytes the parse needs: ports, or the echo type, code and identifier.
const QUOTED_L4: usize = 8;

/// skb->cb slots from `nm_pod_egress` to `nm_pod_icmp_error`: the family, where the ICMP
/// header starts and where the error's bytes end.
const CB_V6: usize = 0;
const CB_ICMP_OFF: usize = 1;
const CB_END: usize = 2;

/// Continues in `nm_pod_icmp_error` with the ICMP error `error` (its header at `l4_off`, its
/// bytes up to `end`); returns only if that program is not in the map.
#[inline(always)]
pub fn tail_call(ctx: &mut TcContext, error: &Packet, end: usize) {
    // SAFETY: the control block of the skb this program runs on, scratch space of TC programs
    // kept across tail calls.
    unsafe {
        let cb = &mut (*ctx.skb.skb).cb;
        cb[CB_V6] = u32::from(error.v6);
        cb[CB_ICMP_OFF] = error.l4_off as u32;
        cb[CB_END] = end as u32;
    }
    // SAFETY: a tail call with the program's own context; on failure control comes back.
    unsafe { NM_TAIL_CALLS.tail_call(ctx, TAIL_CALL_ICMP_ERROR) };
}

/// What became of an ICMP error.
pub enum Outcome {
    /// It quotes a packet of a rewritten flow, and now its external address.
    Translated,
    /// It quotes a packet of no rewritten flow: untouched.
    NoFlow,
    /// It quotes what is not parsed (IPv4 options, IPv6 extension headers, a later fragment,
    /// another protocol, too short): untouched.
    Unparsed,
    /// A helper failed (possibly after changing some bytes).
    Failed,
}

/// The quoted packet: as the pod sent it after the rewrite (source the pod, destination the
/// cluster address), with the ports a packet from the pod has (ICMP echo: identifier as the
/// source port).
struct Quoted {
    key: FlowKey,
    /// Where its IP header and its transport header start.
    ip_off: usize,
    l4_off: usize,
}

/// Translates the ICMP error the egress program handed over (see [`tail_call`]).
#[inline(always)]
pub fn translate(ctx: &mut TcContext) -> Outcome {
    // SAFETY: reading the control block `tail_call` wrote.
    let (v6, icmp_off, end) = unsafe {
        let cb = &(*ctx.skb.skb).cb;
        (cb[CB_V6] != 0, cb[CB_ICMP_OFF] as usize, cb[CB_END] as usize)
    };
    // Bounds the verifier can follow (the offsets came through memory).
    if icmp_off > 1024 || end > 0xffff {
        return Outcome::Unparsed;
    }
    let Some(quoted) = parse_quoted(ctx, v6, icmp_off, end) else {
        return Outcome::Unparsed;
    };
    let Some(external) = flow::external_addr(&quoted.key) else {
        return Outcome::NoFlow;
    };
    match rewrite(ctx, v6, icmp_off, end, &quoted, &external) {
        Ok(()) => Outcome::Translated,
        Err(_) => Outcome::Failed,
    }
}

/// Parses the quoted packet: IPv4 without options and not a later fragment, or IPv6 without
/// extension headers; TCP, UDP or an echo request.
#[inline(always)]
fn parse_quoted(ctx: &TcContext, v6: bool, icmp_off: usize, end: usize) -> Option<Quoted> {
    let ip_off = icmp_off + ICMP_HLEN;
    let mut key = flow::key([0; 16], [0; 16], 0, 0, 0);
    let (l4_off, icmp, echo_request) = if v6 {
        let l4_off = ip_off + IPV6_HLEN;
        if l4_off + QUOTED_L4 > end {
            return None;
        }
        if ctx.load::<u8>(ip_off).ok()? >> 4 != 6 {
            return None;
        }
        key.pod_addr = ctx.load::<[u8; 16]>(ip_off + IPV6_SADDR_OFF).ok()?;
        key.remote_addr = ctx.load::<[u8; 16]>(ip_off + IPV6_DADDR_OFF).ok()?;
        if is_v4_mapped(&key.pod_addr) || is_v4_mapped(&key.remote_addr) {
            return None;
        }
        key.proto = ctx.load::<u8>(ip_off + IPV6_NEXTHDR_OFF).ok()?;
        (l4_off, PROTO_ICMPV6, ICMPV6_ECHO_REQUEST)
    } else {
        let l4_off = ip_off + IPV4_HLEN;
        if l4_off + QUOTED_L4 > end {
            return None;
        }
        let hdr = ctx.load::<[u8; IPV4_HLEN]>(ip_off).ok()?;
        let frag_field = u16::from_be_bytes([hdr[IPV4_FRAG_OFF], hdr[IPV4_FRAG_OFF + 1]]);
        if hdr[0] != IPV4_VER_IHL_NO_OPTIONS || frag_field & IPV4_FRAG_OFFSET_MASK != 0 {
            return None;
        }
        let (s, d) = (IPV4_SADDR_OFF, IPV4_DADDR_OFF);
        key.pod_addr = v4_mapped([hdr[s], hdr[s + 1], hdr[s + 2], hdr[s + 3]]);
        key.remote_addr = v4_mapped([hdr[d], hdr[d + 1], hdr[d + 2], hdr[d + 3]]);
        key.proto = hdr[IPV4_PROTO_OFF];
        (l4_off, PROTO_ICMP, ICMP_ECHO_REQUEST)
    };
    let l4 = ctx.load::<[u8; QUOTED_L4]>(l4_off).ok()?;
    if key.proto == PROTO_TCP || key.proto == PROTO_UDP {
        key.pod_port = u16::from_ne_bytes([l4[0], l4[1]]);
        key.remote_port = u16::from_ne_bytes([l4[2], l4[3]]);
    } else if key.proto == icmp && l4[0] == echo_request && l4[1] == 0 {
        key.pod_port = u16::from_ne_bytes([l4[ICMP_ECHO_ID_OFF], l4[ICMP_ECHO_ID_OFF + 1]]);
    } else {
        return None;
    }
    Some(Quoted { key, ip_off, l4_off })
}

/// Gives the quoted destination (the cluster address) `external` back, and the error's
/// source too when it is the cluster address.
#[inline(always)]
fn rewrite(
    ctx: &mut TcContext,
    v6: bool,
    icmp_off: usize,
    end: usize,
    quoted: &Quoted,
    external: &[u8; 16],
) -> Result<(), i64> {
    let cluster = &quoted.key.remote_addr;
    let icmp_csum = icmp_off + ICMP_CSUM_OFF;
    let l4_csum = quoted_l4_csum(ctx, quoted, end);
    if v6 {
        // SAFETY: two 16-byte buffers, sizes given in bytes; the helper only reads them.
        let diff = unsafe { bpf_csum_diff(cluster.as_ptr() as *mut u32, 16, external.as_ptr() as *mut u32, 16, 0) };
        if diff < 0 {
            return Err(diff);
        }
        ctx.store(quoted.ip_off + IPV6_DADDR_OFF, external, 0)?;
        // The quoted checksum balances the quoted address (its pseudo header): the ICMPv6
        // sum is unchanged. Cut off (or a UDP "none"), the ICMPv6 checksum takes it.
        match l4_csum {
            Some((off, flags)) => ctx.l4_csum_replace(off, 0, diff as u64, flags)?,
            None => ctx.l4_csum_replace(icmp_csum, 0, diff as u64, 0)?,
        }
    } else {
        let from = u32::from_ne_bytes([cluster[12], cluster[13], cluster[14], cluster[15]]);
        let to = u32::from_ne_bytes([external[12], external[13], external[14], external[15]]);
        ctx.store(quoted.ip_off + IPV4_DADDR_OFF, &to, 0)?;
        // The quoted IP header checksum balances the quoted address; the quoted L4
        // checksum's own change must be balanced by the ICMP checksum (ICMPv4 has no
        // pseudo header).
        ctx.l3_csum_replace(quoted.ip_off + IPV4_CSUM_OFF, from as u64, to as u64, 4)?;
        if let Some((off, flags)) = l4_csum {
            let old = ctx.load::<u16>(off)?;
            ctx.l4_csum_replace(off, from as u64, to as u64, flags | 4)?;
            let new = ctx.load::<u16>(off)?;
            ctx.l4_csum_replace(icmp_csum, u64::from(old), u64::from(new), 4)?;
        }
    }
    // The error's own source: the cluster address when the Service side sent it.
    let source_is_cluster = if v6 {
        ctx.load::<[u8; 16]>(ETH_HLEN + IPV6_SADDR_OFF)? == *cluster
    } else {
        ctx.load::<[u8; 4]>(ETH_HLEN + IPV4_SADDR_OFF)? == [cluster[12], cluster[13], cluster[14], cluster[15]]
    };
    if source_is_cluster {
        // ICMPv6's checksum covers the source (pseudo header); ICMPv4's does not.
        let l4 = if v6 { Some((icmp_csum, aya_ebpf::bindings::BPF_F_PSEUDO_HDR as u64)) } else { None };
        replace_addr(ctx, v6, l4, Which::Source, cluster, external)?;
    }
    Ok(())
}

/// The quoted L4 checksum that covers the quoted addresses, if it is quoted whole and set:
/// its offset and the `bpf_l4_csum_replace` flags (no pseudo-header flag: the addresses it
/// covers are inside the ICMP message, not the error's own header).
#[inline(always)]
fn quoted_l4_csum(ctx: &TcContext, quoted: &Quoted, end: usize) -> Option<(usize, u64)> {
    let off = match quoted.key.proto {
        PROTO_TCP => quoted.l4_off + TCP_CSUM_OFF,
        PROTO_UDP => quoted.l4_off + UDP_CSUM_OFF,
        // ICMPv6 covers a pseudo header; ICMPv4 does not.
        PROTO_ICMPV6 => quoted.l4_off + ICMP_CSUM_OFF,
        _ => return None,
    };
    if off + 2 > end {
        return None;
    }
    if quoted.key.proto == PROTO_UDP {
        // A zero UDP checksum is "none" (IPv4): nothing to balance.
        return match ctx.load::<u16>(off) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some((off, BPF_F_MARK_MANGLED_0 as u64)),
        };
    }
    Some((off, 0))
}
