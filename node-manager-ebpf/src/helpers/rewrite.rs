//! Address rewrite with incremental IP and L4 checksum updates through the kernel helpers,
//! which also handle CHECKSUM_PARTIAL skbs from veth offload and UDP's "no checksum" zero.
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    helpers::bpf_csum_diff,
    programs::TcContext,
};
use node_manager_common::{PROTO_ICMPV6, PROTO_TCP, PROTO_UDP};

use crate::helpers::{
    headers::{
        ETH_HLEN, ICMP_CSUM_OFF, IPV4_CSUM_OFF, IPV4_DADDR_OFF, IPV4_SADDR_OFF, IPV6_DADDR_OFF, IPV6_SADDR_OFF,
        TCP_CSUM_OFF, UDP_CSUM_OFF,
    },
    parse::Packet,
};

#[derive(Clone, Copy)]
pub enum Which {
    Source,
    Destination,
}

/// Offset of the L4 checksum that covers the pseudo header (None for ICMPv4, whose checksum
/// does not cover the addresses), and the flags for `bpf_l4_csum_replace`.
#[inline(always)]
fn l4_csum(pkt: &Packet) -> Option<(usize, u64)> {
    match pkt.proto {
        PROTO_TCP => Some((pkt.l4_off + TCP_CSUM_OFF, BPF_F_PSEUDO_HDR as u64)),
        // A zero UDP checksum (IPv4: "none") stays zero; a result of zero is written as 0xffff.
        PROTO_UDP => Some((pkt.l4_off + UDP_CSUM_OFF, (BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0) as u64)),
        PROTO_ICMPV6 => Some((pkt.l4_off + ICMP_CSUM_OFF, BPF_F_PSEUDO_HDR as u64)),
        _ => None,
    }
}

/// Replaces the packet's source or destination address (`old` as parsed) with `new`
/// (IPv4-mapped for IPv4; the family was checked by the caller).
#[inline(always)]
pub fn set_addr(ctx: &mut TcContext, pkt: &Packet, which: Which, old: &[u8; 16], new: &[u8; 16]) -> Result<(), i64> {
    let l4 = l4_csum(pkt);
    if pkt.v6 {
        let off = match which {
            Which::Source => ETH_HLEN + IPV6_SADDR_OFF,
            Which::Destination => ETH_HLEN + IPV6_DADDR_OFF,
        };
        // IPv6 has no header checksum; the pseudo header's 16-byte addresses change the L4 sum
        // by their difference.
        let mut from = *old;
        let mut to = *new;
        // SAFETY: both buffers are 16 bytes on the stack, sizes given in bytes.
        let diff = unsafe { bpf_csum_diff(from.as_mut_ptr().cast(), 16, to.as_mut_ptr().cast(), 16, 0) };
        if diff < 0 {
            return Err(diff);
        }
        ctx.store(off, new, 0)?;
        if let Some((csum_off, flags)) = l4 {
            ctx.l4_csum_replace(csum_off, 0, diff as u64, flags)?;
        }
    } else {
        let off = match which {
            Which::Source => ETH_HLEN + IPV4_SADDR_OFF,
            Which::Destination => ETH_HLEN + IPV4_DADDR_OFF,
        };
        let from = u32::from_ne_bytes([old[12], old[13], old[14], old[15]]);
        let to = u32::from_ne_bytes([new[12], new[13], new[14], new[15]]);
        ctx.store(off, &to, 0)?;
        ctx.l3_csum_replace(ETH_HLEN + IPV4_CSUM_OFF, from as u64, to as u64, 4)?;
        if let Some((csum_off, flags)) = l4 {
            ctx.l4_csum_replace(csum_off, from as u64, to as u64, flags | 4)?;
        }
    }
    Ok(())
}
