//! Address rewrite with incremental checksum updates. The L4 checksum goes through the kernel's
//! helper, which alone knows the skb's checksum state (a CHECKSUM_PARTIAL skb from veth
//! offload holds the pseudo header's sum there, not the segment's) and UDP's "no checksum"
//! zero; the IPv4 header checksum, always a plain one, is updated here.
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_F_RECOMPUTE_CSUM},
    helpers::{bpf_csum_diff, bpf_csum_update},
    programs::TcContext,
};
use node_manager_common::{PROTO_ICMPV6, PROTO_TCP, PROTO_UDP};

use crate::helpers::{
    bytes::read,
    headers::{
        ETH_HLEN, ICMP_CSUM_OFF, IPV4_CSUM_OFF, IPV4_DADDR_OFF, IPV4_SADDR_OFF, IPV6_DADDR_OFF, IPV6_SADDR_OFF,
        TCP_CSUM_OFF, UDP_CSUM_OFF,
    },
    parse::{Frag, Packet},
};

/// `bpf_l4_csum_replace` flag (Linux 6.16, backported to stable): the L4 checksum of an IPv6
/// packet, whose pseudo-header change is not balanced by an IP header checksum, so the helper
/// must leave a CHECKSUM_COMPLETE skb->csum alone. Not in aya-ebpf's bindings yet.
const BPF_F_IPV6: u64 = 1 << 7;
/// What `bpf_l4_csum_replace` returns for a flag the kernel does not know.
const EINVAL: i64 = 22;
/// Returned when the header to rewrite is no longer in the packet (as the helpers would).
const EFAULT: i64 = 14;
/// The IPv4 header checksum and both addresses, contiguous from [`IPV4_CSUM_OFF`].
const IPV4_CSUM_ADDRS_LEN: usize = IPV4_DADDR_OFF + 4 - IPV4_CSUM_OFF;

#[derive(Clone, Copy)]
pub enum Which {
    Source,
    Destination,
}

/// Offset of the L4 checksum that covers the pseudo header (None for ICMPv4, whose checksum
/// does not cover the addresses, and for later fragments, which carry no transport header:
/// the first fragment's checksum covers the whole datagram), and the flags for
/// `bpf_l4_csum_replace`.
#[inline(always)]
fn l4_csum(pkt: &Packet) -> Option<(usize, u64)> {
    if pkt.frag == Frag::Later {
        return None;
    }
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
    replace_addr(ctx, pkt.v6, l4_csum(pkt), which, old, new)
}

/// [`set_addr`] for a packet of family `v6` whose L4 checksum covering the addresses is at
/// `l4` (offset, `bpf_l4_csum_replace` flags), if it has one.
#[inline(always)]
pub fn replace_addr(
    ctx: &mut TcContext,
    v6: bool,
    l4: Option<(usize, u64)>,
    which: Which,
    old: &[u8; 16],
    new: &[u8; 16],
) -> Result<(), i64> {
    if v6 {
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
        match l4 {
            Some((csum_off, flags)) => {
                ctx.store(off, new, 0)?;
                l4_csum_replace_v6(ctx, csum_off, diff, flags)?;
            }
            // No checksum to balance the new address (a later fragment): a CHECKSUM_COMPLETE
            // skb->csum takes the bytes' difference.
            None => ctx.store(off, new, BPF_F_RECOMPUTE_CSUM as u64)?,
        }
    } else {
        // The header checksum and the two addresses are 10 contiguous bytes: changed here (the
        // checksum by RFC 1624) and written back by one store, not a store and a
        // `bpf_l3_csum_replace`. Under CHECKSUM_COMPLETE skb->csum stays: the new address
        // and the new header checksum cancel out.
        let Some(mut span) = read::<[u8; IPV4_CSUM_ADDRS_LEN]>(ctx, ETH_HLEN + IPV4_CSUM_OFF) else {
            return Err(-EFAULT);
        };
        let (from, to) = ([old[12], old[13], old[14], old[15]], [new[12], new[13], new[14], new[15]]);
        let at = match which {
            Which::Source => IPV4_SADDR_OFF - IPV4_CSUM_OFF,
            Which::Destination => IPV4_DADDR_OFF - IPV4_CSUM_OFF,
        };
        span[at..at + 4].copy_from_slice(&to);
        let csum = csum_replace4(u16::from_ne_bytes([span[0], span[1]]), from, to);
        span[..2].copy_from_slice(&csum.to_ne_bytes());
        ctx.store(ETH_HLEN + IPV4_CSUM_OFF, &span, 0)?;
        if let Some((csum_off, flags)) = l4 {
            ctx.l4_csum_replace(csum_off, u32::from_ne_bytes(from) as u64, u32::from_ne_bytes(to) as u64, flags | 4)?;
        }
    }
    Ok(())
}

/// RFC 1624's incremental update of a ones'-complement checksum (HC' = ~(~HC + ~m + m')) for a
/// 4-byte field going from `from` to `to`, all as they lie in the packet: a ones'-complement
/// sum of 16-bit words does not depend on their byte order. The kernel's `csum_replace4`.
#[inline(always)]
fn csum_replace4(csum: u16, from: [u8; 4], to: [u8; 4]) -> u16 {
    let word = |b: [u8; 4], i: usize| u32::from(u16::from_ne_bytes([b[i], b[i + 1]]));
    // At most five 16-bit terms: two folds bring any carry back in.
    let mut sum = u32::from(!csum) + (0xffff - word(from, 0)) + (0xffff - word(from, 2)) + word(to, 0) + word(to, 2);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// The IPv6 L4 checksum update by the addresses' difference. Under CHECKSUM_COMPLETE the
/// packet's sum does not change (the new addresses and the new L4 checksum cancel out), but
/// without `BPF_F_IPV6` the helper adjusts skb->csum as for IPv4 and the stack later reports a
/// checksum failure and verifies the packet in software. A kernel that does not know the flag
/// refuses it (EINVAL, checked before anything is written): then the update runs without it and
/// `bpf_csum_update` adds the difference back (it only acts on CHECKSUM_COMPLETE skbs).
#[inline(always)]
fn l4_csum_replace_v6(ctx: &TcContext, csum_off: usize, diff: i64, flags: u64) -> Result<(), i64> {
    match ctx.l4_csum_replace(csum_off, 0, diff as u64, flags | BPF_F_IPV6) {
        Err(e) if e == -EINVAL => {
            ctx.l4_csum_replace(csum_off, 0, diff as u64, flags)?;
            // SAFETY: the skb this program runs on; the result (the new csum, or an error for
            // skbs without CHECKSUM_COMPLETE) needs no handling.
            unsafe { bpf_csum_update(ctx.skb.skb, diff as u32) };
            Ok(())
        }
        other => other,
    }
}
