//! Packet parsing. Every read goes through [`read`]: in place when the header is in the skb's
//! linear area, else `bpf_skb_load_bytes`, so non-linear skbs parse as linear ones. Anything
//! we cannot rewrite safely is reported as `Unparsed` and passed untouched: IPv4 options,
//! IPv6 extension headers (but the Fragment header and BIG TCP's Jumbo Payload hop-by-hop
//! header), IPv6 packets with IPv4-mapped addresses, protocols other than TCP/UDP/ICMP echo,
//! truncated headers.
//!
//! Fragments (IPv4 MF or offset, the IPv6 Fragment header): the first carries the transport
//! header and is parsed as any packet; a later one has none, so it is reported with its
//! datagram's identification and no ports, and translated by what the first left in
//! [`super::frag`].
//!
//! ICMP errors to the pod (destination unreachable, fragmentation needed / packet too big, time
//! exceeded, parameter problem) are parsed with the packet they quote: see [`super::icmp_error`].
//!
//! BIG TCP (IPv6 since Linux 5.19, IPv4 since 6.3, once an admin raises `gso_max_size` /
//! `gro_max_size` above 64 KiB): a TCP GSO aggregate longer than an IP length field holds
//! carries length 0 (IPv4 `tot_len`, IPv6 `payload_len`), and on IPv6 before the kernel dropped
//! it a hop-by-hop header with only the Jumbo Payload option. Its length is then the skb's, as
//! the kernel's own `iph_totlen()` / `ipv6_payload_len()` read it.
use aya_ebpf::programs::TcContext;
use node_manager_common::{PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, is_v4_mapped, v4_mapped};

use crate::helpers::{
    bytes::{load, read},
    headers::*,
};

/// Whether the skb is a GSO aggregate (the kernel segments it later): only those may carry a
/// zero IP length.
#[inline(always)]
fn is_gso(ctx: &TcContext) -> bool {
    // SAFETY: reading a field of the skb this program runs on.
    unsafe { (*ctx.skb.skb).gso_size != 0 }
}

/// Which side of the pod interface: from the pod (requests) or to the pod (replies).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    FromPod,
    ToPod,
}

/// Where a packet stands in a fragmented datagram.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Frag {
    /// Not fragmented.
    Whole,
    /// The first fragment (offset 0, more to come): transport header present.
    First,
    /// A later fragment: no transport header; `sport`, `dport` and `tcp_flags` are 0.
    Later,
}

pub struct Packet {
    pub v6: bool,
    pub frag: Frag,
    /// The datagram's identification (IPv4: 16 bits; IPv6: the Fragment header's 32), for
    /// fragments.
    pub frag_id: u32,
    pub proto: u8,
    pub l4_off: usize,
    /// IPv4-mapped for IPv4.
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// Ports in network byte order. For ICMP echo the identifier stands in for the pod's port
    /// (source of a request, destination of a reply) and the other port is 0.
    pub sport: u16,
    pub dport: u16,
    /// TCP flags (0 for UDP and ICMP), read with the ports: one load instead of two.
    pub tcp_flags: u8,
}

pub enum Parsed {
    NotIp,
    Unparsed,
    Ip(Packet),
    /// An ICMP error to the pod, unfragmented: the error (its ICMP header at `l4_off`) and
    /// where its bytes end. The packet it quotes is parsed by [`super::icmp_error`], off the
    /// hot path.
    IcmpError {
        error: Packet,
        end: usize,
    },
}

#[inline(always)]
pub fn parse(ctx: &TcContext, direction: Direction) -> Parsed {
    let Some(ethertype) = read::<u16>(ctx, ETH_TYPE_OFF) else {
        return Parsed::NotIp;
    };
    match u16::from_be(ethertype) {
        ETH_P_IP => parse_ipv4(ctx, direction),
        ETH_P_IPV6 => parse_ipv6(ctx, direction),
        // VLAN tags still in the frame, ARP, everything else: not ours.
        _ => Parsed::NotIp,
    }
}

#[inline(always)]
fn parse_ipv4(ctx: &TcContext, direction: Direction) -> Parsed {
    let Some(hdr) = read::<[u8; IPV4_HLEN]>(ctx, ETH_HLEN) else {
        return Parsed::Unparsed;
    };
    // Version 4, no options (IHL 5).
    if hdr[IPV4_VER_IHL_OFF] != IPV4_VER_IHL_NO_OPTIONS {
        return Parsed::Unparsed;
    }
    let frag_field = be16(&hdr, IPV4_FRAG_OFF);
    let frag = if frag_field & IPV4_FRAG_OFFSET_MASK != 0 {
        Frag::Later
    } else if frag_field & IPV4_MORE_FRAGMENTS != 0 {
        Frag::First
    } else {
        Frag::Whole
    };
    let mut total_len = be16(&hdr, IPV4_TOT_LEN_OFF) as usize;
    if total_len == 0 && hdr[IPV4_PROTO_OFF] == PROTO_TCP && is_gso(ctx) {
        total_len = (ctx.len() as usize).saturating_sub(ETH_HLEN);
    }
    if total_len < IPV4_HLEN || ETH_HLEN + total_len > ctx.len() as usize {
        return Parsed::Unparsed;
    }
    let s = IPV4_SADDR_OFF;
    let d = IPV4_DADDR_OFF;
    parse_l4(
        ctx,
        direction,
        L4 {
            v6: false,
            frag,
            frag_id: u32::from(be16(&hdr, IPV4_ID_OFF)),
            proto: hdr[IPV4_PROTO_OFF],
            icmp_proto: PROTO_ICMP,
            echo_type: match direction {
                Direction::FromPod => ICMP_ECHO_REQUEST,
                Direction::ToPod => ICMP_ECHO_REPLY,
            },
            off: ETH_HLEN + IPV4_HLEN,
            len: total_len - IPV4_HLEN,
            saddr: v4_mapped([hdr[s], hdr[s + 1], hdr[s + 2], hdr[s + 3]]),
            daddr: v4_mapped([hdr[d], hdr[d + 1], hdr[d + 2], hdr[d + 3]]),
        },
    )
}

#[inline(always)]
fn parse_ipv6(ctx: &TcContext, direction: Direction) -> Parsed {
    let Some(hdr) = read::<[u8; IPV6_HLEN]>(ctx, ETH_HLEN) else {
        return Parsed::Unparsed;
    };
    if hdr[0] >> 4 != 6 {
        return Parsed::Unparsed;
    }
    let mut payload_len = be16(&hdr, IPV6_PAYLOAD_LEN_OFF) as usize;
    // The next header must be the transport header itself: extension headers pass untouched,
    // but for BIG TCP's jumbo header.
    let mut proto = hdr[IPV6_NEXTHDR_OFF];
    let mut l4_off = ETH_HLEN + IPV6_HLEN;
    if payload_len == 0 && is_gso(ctx) {
        let after_header = (ctx.len() as usize).saturating_sub(ETH_HLEN + IPV6_HLEN);
        if proto == PROTO_TCP {
            payload_len = after_header;
        } else if proto == IPV6_NEXTHDR_HOP {
            let Some(hop) = read::<[u8; IPV6_JUMBO_HOP_LEN]>(ctx, ETH_HLEN + IPV6_HLEN) else {
                return Parsed::Unparsed;
            };
            // Next header TCP, header length 0 (8 bytes), the Jumbo Payload option (type 0xC2,
            // 4 bytes of length) and nothing else: the kernel's ipv6_has_hopopt_jumbo() shape.
            if hop[0] == PROTO_TCP && hop[1] == 0 && hop[2] == IPV6_TLV_JUMBO && hop[3] == 4 {
                proto = PROTO_TCP;
                l4_off += IPV6_JUMBO_HOP_LEN;
                payload_len = after_header.saturating_sub(IPV6_JUMBO_HOP_LEN);
            }
        }
    }
    if l4_off + payload_len > ctx.len() as usize {
        return Parsed::Unparsed;
    }
    let (mut frag, mut frag_id) = (Frag::Whole, 0);
    if proto == IPV6_NEXTHDR_FRAGMENT {
        let Some(fh) = load::<[u8; IPV6_FRAG_HLEN]>(ctx, l4_off) else {
            return Parsed::Unparsed;
        };
        if payload_len < IPV6_FRAG_HLEN {
            return Parsed::Unparsed;
        }
        // Offset in the upper 13 bits of bytes 2–3, M in the lowest.
        let offset_m = u16::from_be_bytes([fh[2], fh[3]]);
        frag = if offset_m >> 3 != 0 {
            Frag::Later
        } else if offset_m & 1 != 0 {
            Frag::First
        } else {
            // An atomic fragment (RFC 6946): a whole datagram behind a Fragment header.
            Frag::Whole
        };
        frag_id = u32::from_be_bytes([fh[4], fh[5], fh[6], fh[7]]);
        proto = fh[0];
        l4_off += IPV6_FRAG_HLEN;
        payload_len -= IPV6_FRAG_HLEN;
    }
    let mut saddr = [0u8; 16];
    let mut daddr = [0u8; 16];
    saddr.copy_from_slice(&hdr[IPV6_SADDR_OFF..IPV6_SADDR_OFF + 16]);
    daddr.copy_from_slice(&hdr[IPV6_DADDR_OFF..IPV6_DADDR_OFF + 16]);
    // IPv4 entries are stored IPv4-mapped (::ffff:a.b.c.d): an IPv6 packet carrying such an
    // address (which has no place on the wire, RFC 4291 2.5.5.2) must not match them.
    if is_v4_mapped(&saddr) || is_v4_mapped(&daddr) {
        return Parsed::Unparsed;
    }
    parse_l4(
        ctx,
        direction,
        L4 {
            v6: true,
            frag,
            frag_id,
            proto,
            icmp_proto: PROTO_ICMPV6,
            echo_type: match direction {
                Direction::FromPod => ICMPV6_ECHO_REQUEST,
                Direction::ToPod => ICMPV6_ECHO_REPLY,
            },
            off: l4_off,
            len: payload_len,
            saddr,
            daddr,
        },
    )
}

/// Whether an ICMP type (of the family's ICMP) is an error quoting a packet.
#[inline(always)]
fn is_error(v6: bool, icmp_type: u8) -> bool {
    if v6 {
        (ICMPV6_DEST_UNREACH..=ICMPV6_PARAM_PROB).contains(&icmp_type)
    } else {
        matches!(icmp_type, ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROB)
    }
}

#[inline(always)]
fn be16(hdr: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([hdr[off], hdr[off + 1]])
}

/// What the IP header says about the transport header that follows it.
struct L4 {
    v6: bool,
    frag: Frag,
    frag_id: u32,
    /// The IP header's protocol (next header).
    proto: u8,
    /// The family's ICMP protocol, and the echo type expected in this direction.
    icmp_proto: u8,
    echo_type: u8,
    /// Offset of the transport header in the packet, and the IP payload's length.
    off: usize,
    len: usize,
    saddr: [u8; 16],
    daddr: [u8; 16],
}

/// The transport header's first bytes: read in place for IPv4, whose transport header is always
/// at the same offset (no options are parsed), and through [`load`] for IPv6, whose offset
/// depends on the extension headers.
#[inline(always)]
fn transport<T: Copy>(ctx: &TcContext, v6: bool, l4_off: usize) -> Option<T> {
    if v6 { load::<T>(ctx, l4_off) } else { read::<T>(ctx, ETH_HLEN + IPV4_HLEN) }
}

#[inline(always)]
fn parse_l4(ctx: &TcContext, direction: Direction, l4: L4) -> Parsed {
    let L4 { v6, frag, frag_id, proto, icmp_proto, echo_type, off: l4_off, len: l4_len, saddr, daddr } = l4;
    // A later fragment: no transport header to read; the protocol must still be one we
    // rewrite (its first fragment was parsed as such).
    if frag == Frag::Later {
        if proto != PROTO_TCP && proto != PROTO_UDP && proto != icmp_proto {
            return Parsed::Unparsed;
        }
        let (sport, dport, tcp_flags) = (0, 0, 0);
        return Parsed::Ip(Packet { v6, frag, frag_id, proto, l4_off, saddr, daddr, sport, dport, tcp_flags });
    }
    // The whole header the rewrite touches must be inside the IP payload and the skb.
    let (min_len, sport, dport, tcp_flags) = if proto == PROTO_TCP {
        // Ports through the flags byte.
        let Some(head) = transport::<[u8; TCP_FLAGS_OFF + 1]>(ctx, v6, l4_off) else {
            return Parsed::Unparsed;
        };
        let (sport, dport) = (u16::from_ne_bytes([head[0], head[1]]), u16::from_ne_bytes([head[2], head[3]]));
        (TCP_HLEN, sport, dport, head[TCP_FLAGS_OFF])
    } else if proto == PROTO_UDP {
        let Some(ports) = transport::<[u16; 2]>(ctx, v6, l4_off) else {
            return Parsed::Unparsed;
        };
        (UDP_HLEN, ports[0], ports[1], 0)
    } else if proto == icmp_proto {
        let Some(icmp) = transport::<[u8; ICMP_HLEN]>(ctx, v6, l4_off) else {
            return Parsed::Unparsed;
        };
        if icmp[0] != echo_type || icmp[1] != 0 {
            // Off the echo path: the hit path's only cost is this type check.
            if direction == Direction::ToPod && frag == Frag::Whole && is_error(v6, icmp[0]) {
                let error = Packet { v6, frag, frag_id, proto, l4_off, saddr, daddr, sport: 0, dport: 0, tcp_flags: 0 };
                return Parsed::IcmpError { error, end: l4_off + l4_len };
            }
            return Parsed::Unparsed;
        }
        let id = u16::from_ne_bytes([icmp[ICMP_ECHO_ID_OFF], icmp[ICMP_ECHO_ID_OFF + 1]]);
        match direction {
            Direction::FromPod => (ICMP_HLEN, id, 0, 0),
            Direction::ToPod => (ICMP_HLEN, 0, id, 0),
        }
    } else {
        return Parsed::Unparsed;
    };
    if l4_len < min_len {
        return Parsed::Unparsed;
    }
    Parsed::Ip(Packet { v6, frag, frag_id, proto, l4_off, saddr, daddr, sport, dport, tcp_flags })
}
