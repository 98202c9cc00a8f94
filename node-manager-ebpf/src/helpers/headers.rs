//! Header layouts: lengths, field offsets and values, declared once for the parser and the
//! rewrite. IP field offsets are relative to the IP header, which starts at [`ETH_HLEN`].

pub const ETH_HLEN: usize = 14;
/// Offset of the ethertype in the Ethernet header.
pub const ETH_TYPE_OFF: usize = 12;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;

pub const IPV4_HLEN: usize = 20;
/// Version and IHL byte; [`IPV4_VER_IHL_NO_OPTIONS`] is version 4 without options.
pub const IPV4_VER_IHL_OFF: usize = 0;
pub const IPV4_VER_IHL_NO_OPTIONS: u8 = 0x45;
pub const IPV4_TOT_LEN_OFF: usize = 2;
/// Flags and fragment offset: MF, and the offset in 8-byte units.
pub const IPV4_FRAG_OFF: usize = 6;
pub const IPV4_FRAG_OFFSET_MASK: u16 = 0x1fff;
pub const IPV4_MORE_FRAGMENTS: u16 = 0x2000;
pub const IPV4_ID_OFF: usize = 4;
pub const IPV4_PROTO_OFF: usize = 9;
pub const IPV4_CSUM_OFF: usize = 10;
pub const IPV4_SADDR_OFF: usize = 12;
pub const IPV4_DADDR_OFF: usize = 16;

pub const IPV6_HLEN: usize = 40;
pub const IPV6_PAYLOAD_LEN_OFF: usize = 4;
pub const IPV6_NEXTHDR_OFF: usize = 6;
pub const IPV6_SADDR_OFF: usize = 8;
pub const IPV6_DADDR_OFF: usize = 24;
/// Hop-by-hop options header (next header 0), and BIG TCP's: the Jumbo Payload option only.
pub const IPV6_NEXTHDR_HOP: u8 = 0;
/// The Fragment header (next header 44): next header, reserved, offset and M, identification.
pub const IPV6_NEXTHDR_FRAGMENT: u8 = 44;
pub const IPV6_FRAG_HLEN: usize = 8;
pub const IPV6_JUMBO_HOP_LEN: usize = 8;
pub const IPV6_TLV_JUMBO: u8 = 0xc2;

pub const TCP_HLEN: usize = 20;
pub const TCP_FLAGS_OFF: usize = 13;
pub const TCP_CSUM_OFF: usize = 16;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;
pub const TCP_RST: u8 = 0x04;

pub const UDP_HLEN: usize = 8;
pub const UDP_CSUM_OFF: usize = 6;

pub const ICMP_HLEN: usize = 8;
pub const ICMP_CSUM_OFF: usize = 2;
/// Offset of the echo identifier.
pub const ICMP_ECHO_ID_OFF: usize = 4;
pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_ECHO_REQUEST: u8 = 8;
pub const ICMPV6_ECHO_REQUEST: u8 = 128;
pub const ICMPV6_ECHO_REPLY: u8 = 129;
/// ICMP errors, which quote the packet they are about after their 8-byte header: IPv4
/// destination unreachable (fragmentation needed among them), time exceeded, parameter problem;
/// ICMPv6 destination unreachable, packet too big, time exceeded, parameter problem.
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_TIME_EXCEEDED: u8 = 11;
pub const ICMP_PARAMETER_PROB: u8 = 12;
pub const ICMPV6_DEST_UNREACH: u8 = 1;
pub const ICMPV6_PARAM_PROB: u8 = 4;
