//! Crafted Ethernet frames with correct checksums, and checksum verification.
#![allow(dead_code)]
use std::net::IpAddr;

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const ICMP: u8 = 1;
pub const ICMPV6: u8 = 58;

#[derive(Clone, Debug)]
pub struct Spec {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    /// For ICMP: (type, code, id).
    pub icmp: (u8, u8, u16),
    pub payload: Vec<u8>,
}

impl Spec {
    pub fn tcp(src: &str, sport: u16, dst: &str, dport: u16) -> Spec {
        Spec {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            proto: TCP,
            sport,
            dport,
            icmp: (0, 0, 0),
            payload: b"hello".to_vec(),
        }
    }
    pub fn udp(src: &str, sport: u16, dst: &str, dport: u16) -> Spec {
        Spec { proto: UDP, ..Spec::tcp(src, sport, dst, dport) }
    }
    pub fn echo(src: &str, dst: &str, ty: u8, id: u16) -> Spec {
        let s = Spec::tcp(src, 0, dst, 0);
        let proto = if s.src.is_ipv4() { ICMP } else { ICMPV6 };
        Spec { proto, icmp: (ty, 0, id), ..s }
    }
}

pub fn csum_add(mut sum: u32, bytes: &[u8]) -> u32 {
    let mut chunks = bytes.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    sum
}

pub fn csum_fold(mut sum: u32) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn addr_bytes(a: IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

fn pseudo_sum(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> u32 {
    let mut s = csum_add(0, &addr_bytes(src));
    s = csum_add(s, &addr_bytes(dst));
    if src.is_ipv4() {
        csum_add(s, &[0, proto, (len >> 8) as u8, len as u8])
    } else {
        csum_add(s, &[(len >> 24) as u8, (len >> 16) as u8, (len >> 8) as u8, len as u8, 0, 0, 0, proto])
    }
}

/// The L4 segment with its checksum filled in.
pub fn l4(spec: &Spec) -> Vec<u8> {
    let mut seg = match spec.proto {
        TCP => {
            let mut h = vec![0u8; 20];
            h[0..2].copy_from_slice(&spec.sport.to_be_bytes());
            h[2..4].copy_from_slice(&spec.dport.to_be_bytes());
            h[4..8].copy_from_slice(&1000u32.to_be_bytes());
            h[12] = 5 << 4;
            h[13] = 0x18; // PSH|ACK
            h[14..16].copy_from_slice(&64240u16.to_be_bytes());
            h
        }
        UDP => {
            let mut h = vec![0u8; 8];
            h[0..2].copy_from_slice(&spec.sport.to_be_bytes());
            h[2..4].copy_from_slice(&spec.dport.to_be_bytes());
            h[4..6].copy_from_slice(&((8 + spec.payload.len()) as u16).to_be_bytes());
            h
        }
        _ => {
            let mut h = vec![0u8; 8];
            h[0] = spec.icmp.0;
            h[1] = spec.icmp.1;
            h[4..6].copy_from_slice(&spec.icmp.2.to_be_bytes());
            h[6..8].copy_from_slice(&7u16.to_be_bytes());
            h
        }
    };
    seg.extend_from_slice(&spec.payload);
    let csum_off = match spec.proto {
        TCP => 16,
        UDP => 6,
        _ => 2,
    };
    let sum = if spec.proto == ICMP {
        csum_add(0, &seg)
    } else {
        csum_add(pseudo_sum(spec.src, spec.dst, spec.proto, seg.len()), &seg)
    };
    let mut c = csum_fold(sum);
    if spec.proto == UDP && c == 0 {
        c = 0xffff;
    }
    seg[csum_off..csum_off + 2].copy_from_slice(&c.to_be_bytes());
    seg
}

pub fn eth(ethertype: u16) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02];
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

/// A full Ethernet frame for the spec.
pub fn frame(spec: &Spec) -> Vec<u8> {
    let seg = l4(spec);
    match (spec.src, spec.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut f = eth(0x0800);
            let mut ip = vec![0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, spec.proto, 0, 0];
            ip[2..4].copy_from_slice(&((20 + seg.len()) as u16).to_be_bytes());
            ip.extend_from_slice(&s.octets());
            ip.extend_from_slice(&d.octets());
            let c = csum_fold(csum_add(0, &ip));
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            f.extend_from_slice(&ip);
            f.extend_from_slice(&seg);
            f
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut f = eth(0x86dd);
            let mut ip = vec![0x60, 0, 0, 0, 0, 0, spec.proto, 64];
            ip[4..6].copy_from_slice(&(seg.len() as u16).to_be_bytes());
            ip.extend_from_slice(&s.octets());
            ip.extend_from_slice(&d.octets());
            f.extend_from_slice(&ip);
            f.extend_from_slice(&seg);
            f
        }
        _ => panic!("mixed families"),
    }
}

/// Checks the IPv4 header checksum (if IPv4) and the L4 checksum of a frame built by
/// `frame` (no options, no extension headers). Returns a description of the first problem.
pub fn verify_checksums(f: &[u8]) -> Result<(), String> {
    let ethertype = u16::from_be_bytes([f[12], f[13]]);
    let (src, dst, proto, l4_off, l4_len) = if ethertype == 0x0800 {
        let ip = &f[14..34];
        if csum_fold(csum_add(0, ip)) != 0 {
            return Err("bad IPv4 header checksum".into());
        }
        let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
        (
            IpAddr::from([ip[12], ip[13], ip[14], ip[15]]),
            IpAddr::from([ip[16], ip[17], ip[18], ip[19]]),
            ip[9],
            34,
            total - 20,
        )
    } else {
        let ip = &f[14..54];
        let s: [u8; 16] = ip[8..24].try_into().unwrap();
        let d: [u8; 16] = ip[24..40].try_into().unwrap();
        (IpAddr::from(s), IpAddr::from(d), ip[6], 54, u16::from_be_bytes([ip[4], ip[5]]) as usize)
    };
    let seg = &f[l4_off..l4_off + l4_len];
    let sum = if proto == ICMP { csum_add(0, seg) } else { csum_add(pseudo_sum(src, dst, proto, seg.len()), seg) };
    if csum_fold(sum) != 0 {
        return Err(format!("bad L4 checksum for protocol {proto}"));
    }
    Ok(())
}

/// Recomputes the IPv4 header checksum of an Ethernet frame.
pub fn fix_ipv4_csum(f: &mut [u8]) {
    let ihl = usize::from(f[14] & 0x0f) * 4;
    if ihl < 20 || f.len() < 14 + ihl {
        return;
    }
    f[24..26].copy_from_slice(&[0, 0]);
    let c = csum_fold(csum_add(0, &f[14..14 + ihl]));
    f[24..26].copy_from_slice(&c.to_be_bytes());
}

/// Turns a frame into the shape of a BIG TCP aggregate (what a GSO skb over 64 KiB carries):
/// IP length 0 (IPv4 `tot_len`, header checksum fixed; IPv6 `payload_len`), and for `jumbo`
/// (IPv6 before the kernel dropped it) a hop-by-hop header with only the Jumbo Payload option
/// holding the real length. The L4 checksum is left as it was: it covers the real length.
pub fn big_tcp(f: &mut Vec<u8>, jumbo: bool) {
    if f[12..14] == [0x86, 0xdd] {
        f[18..20].copy_from_slice(&[0, 0]);
        if jumbo {
            let length = (f.len() - 14 - 40 + 8) as u32;
            let mut hop = vec![f[20], 0, 0xc2, 4];
            hop.extend_from_slice(&length.to_be_bytes());
            f.splice(54..54, hop);
            f[20] = 0;
        }
    } else {
        f[16..18].copy_from_slice(&[0, 0]);
        fix_ipv4_csum(f);
    }
}
