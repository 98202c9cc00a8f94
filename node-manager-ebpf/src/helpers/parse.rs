//! Packet parsing. Every read goes through `bpf_skb_load_bytes` (`TcContext::load`), which
//! bounds-checks against the skb and works on non-linear skbs, so there is no direct packet
//! access to prove to the verifier. Anything we cannot rewrite safely is reported as
//! `Unparsed` and passed untouched: IPv4 options and fragments, IPv6 extension headers,
//! IPv6 packets with IPv4-mapped addresses, protocols other than TCP/UDP/ICMP echo,
//! truncated headers.
use aya_ebpf::programs::TcContext;
use node_manager_common::{PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, v4_mapped};

pub const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
pub const IPV4_HLEN: usize = 20;
pub const IPV6_HLEN: usize = 40;

const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMPV6_ECHO_REQUEST: u8 = 128;
const ICMPV6_ECHO_REPLY: u8 = 129;

/// Which side of the pod interface: from the pod (requests) or to the pod (replies).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    FromPod,
    ToPod,
}

pub struct Packet {
    pub v6: bool,
    pub proto: u8,
    pub l4_off: usize,
    /// IPv4-mapped for IPv4.
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// Ports in network byte order. For ICMP echo the identifier stands in for the pod's port
    /// (source of a request, destination of a reply) and the other port is 0.
    pub sport: u16,
    pub dport: u16,
}

pub enum Parsed {
    NotIp,
    Unparsed,
    Ip(Packet),
}

#[inline(always)]
pub fn parse(ctx: &TcContext, direction: Direction) -> Parsed {
    let Ok(ethertype) = ctx.load::<u16>(12) else {
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
    let Ok(hdr) = ctx.load::<[u8; IPV4_HLEN]>(ETH_HLEN) else {
        return Parsed::Unparsed;
    };
    // Version 4, no options (IHL 5).
    if hdr[0] != 0x45 {
        return Parsed::Unparsed;
    }
    // Any fragment (MF set or non-zero offset): only the first carries ports; rewriting part of
    // a datagram would break it, so fragments pass untouched.
    if u16::from_be_bytes([hdr[6], hdr[7]]) & 0x3fff != 0 {
        return Parsed::Unparsed;
    }
    let total_len = u16::from_be_bytes([hdr[2], hdr[3]]) as usize;
    if total_len < IPV4_HLEN || ETH_HLEN + total_len > ctx.len() as usize {
        return Parsed::Unparsed;
    }
    let proto = hdr[9];
    let l4_off = ETH_HLEN + IPV4_HLEN;
    let saddr = v4_mapped([hdr[12], hdr[13], hdr[14], hdr[15]]);
    let daddr = v4_mapped([hdr[16], hdr[17], hdr[18], hdr[19]]);
    let echo_type = match direction {
        Direction::FromPod => ICMP_ECHO_REQUEST,
        Direction::ToPod => ICMP_ECHO_REPLY,
    };
    parse_l4(ctx, direction, false, proto, PROTO_ICMP, echo_type, l4_off, total_len - IPV4_HLEN, saddr, daddr)
}

#[inline(always)]
fn parse_ipv6(ctx: &TcContext, direction: Direction) -> Parsed {
    let Ok(hdr) = ctx.load::<[u8; IPV6_HLEN]>(ETH_HLEN) else {
        return Parsed::Unparsed;
    };
    if hdr[0] >> 4 != 6 {
        return Parsed::Unparsed;
    }
    let payload_len = u16::from_be_bytes([hdr[4], hdr[5]]) as usize;
    if ETH_HLEN + IPV6_HLEN + payload_len > ctx.len() as usize {
        return Parsed::Unparsed;
    }
    // The next header must be the transport header itself: extension headers pass untouched.
    let proto = hdr[6];
    let mut saddr = [0u8; 16];
    let mut daddr = [0u8; 16];
    saddr.copy_from_slice(&hdr[8..24]);
    daddr.copy_from_slice(&hdr[24..40]);
    // IPv4 entries are stored IPv4-mapped (::ffff:a.b.c.d): an IPv6 packet carrying such an
    // address (which has no place on the wire, RFC 4291 2.5.5.2) must not match them.
    if is_v4_mapped(&saddr) || is_v4_mapped(&daddr) {
        return Parsed::Unparsed;
    }
    let echo_type = match direction {
        Direction::FromPod => ICMPV6_ECHO_REQUEST,
        Direction::ToPod => ICMPV6_ECHO_REPLY,
    };
    parse_l4(ctx, direction, true, proto, PROTO_ICMPV6, echo_type, ETH_HLEN + IPV6_HLEN, payload_len, saddr, daddr)
}

#[inline(always)]
fn is_v4_mapped(a: &[u8; 16]) -> bool {
    u64::from_ne_bytes([a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]]) == 0
        && a[8] == 0
        && a[9] == 0
        && a[10] == 0xff
        && a[11] == 0xff
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn parse_l4(
    ctx: &TcContext,
    direction: Direction,
    v6: bool,
    proto: u8,
    icmp_proto: u8,
    echo_type: u8,
    l4_off: usize,
    l4_len: usize,
    saddr: [u8; 16],
    daddr: [u8; 16],
) -> Parsed {
    // The whole header the rewrite touches must be inside the IP payload and the skb.
    let (min_len, sport, dport) = if proto == PROTO_TCP || proto == PROTO_UDP {
        let min_len = if proto == PROTO_TCP { 20 } else { 8 };
        let Ok(ports) = ctx.load::<[u16; 2]>(l4_off) else {
            return Parsed::Unparsed;
        };
        (min_len, ports[0], ports[1])
    } else if proto == icmp_proto {
        let Ok(icmp) = ctx.load::<[u8; 8]>(l4_off) else {
            return Parsed::Unparsed;
        };
        if icmp[0] != echo_type || icmp[1] != 0 {
            return Parsed::Unparsed;
        }
        let id = u16::from_ne_bytes([icmp[4], icmp[5]]);
        match direction {
            Direction::FromPod => (8, id, 0),
            Direction::ToPod => (8, 0, id),
        }
    } else {
        return Parsed::Unparsed;
    };
    if l4_len < min_len {
        return Parsed::Unparsed;
    }
    Parsed::Ip(Packet { v6, proto, l4_off, saddr, daddr, sport, dport })
}
