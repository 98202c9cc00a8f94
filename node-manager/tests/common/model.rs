//! A reference model of the pod TC programs (`nm_pod_ingress`, `nm_pod_egress`) in plain
//! Rust, written from their specification rather than from their code: it parses a frame as a
//! byte slice, looks the packet up in its own tables, and rewrites it with the checksum
//! arithmetic the kernel's helpers use (RFC 1624). `tests/fuzz.rs` runs the same frames
//! through both and compares verdict, output bytes, skb mark, counters and the flow map.
//!
//! Only the map key layouts, protocol numbers and counter indices are shared with the
//! datapath (`node-manager-common`): the eBPF parser reads through `bpf_skb_load_bytes` and
//! cannot run on a slice, and a model that shared the parser would agree with its bugs.
#![allow(dead_code)]
use std::{
    collections::HashMap,
    net::{IpAddr, Ipv6Addr},
};

use node_manager_common::{COUNTERS_LEN, Counter, CounterIndex, FlowKey};

/// TC_ACT_UNSPEC (-1) == TCX_NEXT, as the test runner returns it.
pub const CONTINUE: u32 = u32::MAX;

const ETH_HLEN: usize = 14;
const ETH_P_IP: [u8; 2] = [0x08, 0x00];
const ETH_P_IPV6: [u8; 2] = [0x86, 0xdd];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Program {
    /// Host-side ingress: packets from the pod.
    Ingress,
    /// Host-side egress: packets to the pod.
    Egress,
}

/// What the model predicts for one run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub verdict: u32,
    pub out: Vec<u8>,
    pub mark: u32,
    /// The counter that says what happened to the packet.
    pub counter: CounterIndex,
    /// Further counters the run increments (flow bookkeeping).
    pub also: Vec<CounterIndex>,
}

/// Where a packet stands in a fragmented datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Frag {
    Whole,
    First,
    /// No transport header: no ports, no L4 checksum.
    Later,
}

/// A parsed packet: addresses in 16-byte form (IPv4-mapped for IPv4), ports as the two bytes
/// on the wire.
#[derive(Clone, Copy, Debug)]
struct Packet {
    v6: bool,
    frag: Frag,
    frag_id: u32,
    proto: u8,
    l4_off: usize,
    saddr: [u8; 16],
    daddr: [u8; 16],
    sport: [u8; 2],
    dport: [u8; 2],
}

enum Parsed {
    NotIp,
    Unparsed,
    Ip(Packet),
    /// An ICMP error to the pod and the packet it quotes.
    IcmpError(IcmpError),
}

/// An ICMP error to the pod (not fragmented) quoting a packet the model can parse: IPv4
/// without options and not a later fragment, or IPv6 without extension headers; TCP, UDP or
/// an echo request of the error's family.
#[derive(Clone, Copy, Debug)]
struct IcmpError {
    /// The error: its addresses, and where its ICMP header is.
    outer: Packet,
    /// Where the error's bytes end (the IP length's end).
    end: usize,
    /// Where the quoted IP header starts.
    quoted_ip_off: usize,
    /// The quoted packet, as a packet from the pod: its ports (echo: identifier as the source
    /// port), `l4_off` at its transport header.
    quoted: Packet,
}

/// The datapath's tables and settings as the model holds them.
#[derive(Clone, Debug, Default)]
pub struct Model {
    /// (external address, port bytes, protocol) → cluster address.
    pub frontends: HashMap<([u8; 16], [u8; 2], u8), [u8; 16]>,
    /// Pod CIDRs as (16-byte network, prefix length in the 16-byte space).
    pub pod_cidrs: Vec<([u8; 16], u32)>,
    pub masquerade_mark: u32,
    /// Reply flow (as seen on egress) → external address to restore.
    pub flows: HashMap<FlowKey, [u8; 16]>,
    /// Fragmented datagrams whose first fragment was rewritten: (source, destination,
    /// identification, protocol) as they arrived → the address the first fragment got.
    pub frags: HashMap<FragKey, [u8; 16]>,
    pub counters: Vec<Counter>,
}

pub fn addr16(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    }
}

fn is_v4_mapped(a: &[u8; 16]) -> bool {
    Ipv6Addr::from(*a).to_ipv4_mapped().is_some()
}

impl Model {
    pub fn new() -> Model {
        Model { counters: vec![Counter::default(); COUNTERS_LEN as usize], ..Default::default() }
    }

    pub fn add_frontend(&mut self, external: IpAddr, port: u16, proto: u8, cluster: IpAddr) {
        self.frontends.insert((addr16(external), port.to_be_bytes(), proto), addr16(cluster));
    }

    pub fn add_pod_cidr(&mut self, net: ipnet::IpNet) {
        let extra = if net.addr().is_ipv4() { 96 } else { 0 };
        self.pod_cidrs.push((addr16(net.network()), extra + u32::from(net.prefix_len())));
    }

    fn in_pod_cidr(&self, a: &[u8; 16]) -> bool {
        self.pod_cidrs.iter().any(|(net, len)| {
            let (a, n) = (u128::from_be_bytes(*a), u128::from_be_bytes(*net));
            *len == 0 || (a ^ n) >> (128 - len) == 0
        })
    }

    /// Runs one frame through the program. `mark` is the skb mark before the run; `gso`: the
    /// skb is a GSO aggregate (`gso_size` set).
    pub fn run(&mut self, program: Program, frame: &[u8], mark: u32, gso: bool) -> Outcome {
        let outcome = match program {
            Program::Ingress => self.ingress(frame, mark, gso),
            Program::Egress => self.egress(frame, mark, gso),
        };
        for index in std::iter::once(&outcome.counter).chain(&outcome.also) {
            let c = &mut self.counters[*index as usize];
            c.packets += 1;
            c.bytes += frame.len() as u64;
        }
        outcome
    }

    fn ingress(&mut self, frame: &[u8], mark: u32, gso: bool) -> Outcome {
        let untouched = |counter| Outcome { verdict: CONTINUE, out: frame.to_vec(), mark, counter, also: vec![] };
        let pkt = match parse(frame, Program::Ingress, gso) {
            Parsed::NotIp => return untouched(CounterIndex::PassNotIp),
            Parsed::Unparsed | Parsed::IcmpError(_) => return untouched(CounterIndex::PassUnparsed),
            Parsed::Ip(pkt) => pkt,
        };
        if pkt.frag == Frag::Later {
            return self.later_fragment(frame, mark, &pkt, Side::Destination);
        }
        let Some(&cluster) = self.frontends.get(&(pkt.daddr, pkt.dport, pkt.proto)) else {
            // The pod talks to a cluster address directly on a remembered flow's tuple: that
            // flow is over (TCP: at a SYN without ACK; UDP and ICMP echo: at any packet).
            // Not if the mark says another program of ours rewrote the packet already.
            let rewritten_before = self.masquerade_mark != 0 && mark & self.masquerade_mark == self.masquerade_mark;
            let opens = !rewritten_before && (pkt.proto != 6 || frame[pkt.l4_off + 13] & 0x12 == 0x02);
            let also = if opens && self.flows.remove(&request_flow_key(&pkt, pkt.daddr)).is_some() {
                vec![CounterIndex::FlowDirectReuse]
            } else {
                vec![]
            };
            return Outcome { also, ..untouched(CounterIndex::PassNoFrontend) };
        };
        if !self.in_pod_cidr(&pkt.saddr) {
            return untouched(CounterIndex::PassNotPod);
        }
        let mut out = frame.to_vec();
        rewrite(&mut out, &pkt, Side::Destination, &cluster);
        let key = request_flow_key(&pkt, cluster);
        let counter = if pkt.v6 { CounterIndex::RewriteIngressV6 } else { CounterIndex::RewriteIngressV4 };
        let mut also = Vec::new();
        if pkt.frag == Frag::First {
            self.frags.insert(frag_key(&pkt), cluster);
            also.push(CounterIndex::FragTranslated);
        }
        // A TCP RST ends the flow: forgotten, not remembered.
        if is_rst(frame, &pkt) {
            self.flows.remove(&key);
            return Outcome { verdict: CONTINUE, out, mark: mark | self.masquerade_mark, counter, also };
        }
        if self.flows.insert(key, pkt.daddr).is_none() {
            also.push(CounterIndex::FlowCreated);
            // A TCP segment other than a SYN opening a flow: the connection's entry was lost.
            if pkt.proto == 6 && frame[pkt.l4_off + 13] & 0x02 == 0 {
                also.push(CounterIndex::FlowLost);
            }
        }
        Outcome { verdict: CONTINUE, out, mark: mark | self.masquerade_mark, counter, also }
    }

    fn egress(&mut self, frame: &[u8], mark: u32, gso: bool) -> Outcome {
        let untouched = |counter| Outcome { verdict: CONTINUE, out: frame.to_vec(), mark, counter, also: vec![] };
        let pkt = match parse(frame, Program::Egress, gso) {
            Parsed::NotIp => return untouched(CounterIndex::PassNotIp),
            Parsed::Unparsed => return untouched(CounterIndex::PassUnparsed),
            Parsed::IcmpError(error) => return self.icmp_error(frame, mark, &error),
            Parsed::Ip(pkt) => pkt,
        };
        if pkt.frag == Frag::Later {
            return self.later_fragment(frame, mark, &pkt, Side::Source);
        }
        let key = reply_flow_key(&pkt);
        let Some(&external) = self.flows.get(&key) else {
            return untouched(CounterIndex::PassNoFlow);
        };
        let mut out = frame.to_vec();
        rewrite(&mut out, &pkt, Side::Source, &external);
        let mut also = Vec::new();
        if pkt.frag == Frag::First {
            self.frags.insert(frag_key(&pkt), external);
            also.push(CounterIndex::FragTranslated);
        }
        if is_rst(frame, &pkt) {
            self.flows.remove(&key);
        }
        let counter = if pkt.v6 { CounterIndex::RewriteEgressV6 } else { CounterIndex::RewriteEgressV4 };
        Outcome { verdict: CONTINUE, out, mark, counter, also }
    }

    /// An ICMP error quoting a packet of a remembered flow quotes the external address instead of
    /// the cluster address: the quoted destination replaced, the quoted IPv4 header checksum
    /// and the quoted L4 checksum covering it (if quoted whole and not UDP's "none") updated,
    /// and the error's checksum balanced where the quote's own checksums do not (ICMPv4: the
    /// quoted L4 checksum's change; ICMPv6: nothing, unless the quoted L4 checksum is missing).
    /// An error from the cluster address gets the external address as its source, as a reply.
    fn icmp_error(&mut self, frame: &[u8], mark: u32, error: &IcmpError) -> Outcome {
        let untouched = |counter| Outcome { verdict: CONTINUE, out: frame.to_vec(), mark, counter, also: vec![] };
        let q = &error.quoted;
        let Some(&external) = self.flows.get(&request_flow_key(q, q.daddr)) else {
            return untouched(CounterIndex::PassNoFlow);
        };
        let mut out = frame.to_vec();
        let icmp_csum = error.outer.l4_off + 2;
        let l4_csum = match q.proto {
            6 => Some(q.l4_off + 16),
            17 => Some(q.l4_off + 6),
            58 => Some(q.l4_off + 2),
            _ => None,
        }
        .filter(|&off| off + 2 <= error.end && !(q.proto == 17 && out[off..off + 2] == [0, 0]));
        let mangled_zero = |out: &mut [u8], off: usize| {
            if q.proto == 17 && out[off..off + 2] == [0, 0] {
                out[off..off + 2].copy_from_slice(&[0xff, 0xff]);
            }
        };
        if q.v6 {
            let (old, new) = (q.daddr, external);
            out[error.quoted_ip_off + 24..error.quoted_ip_off + 40].copy_from_slice(&new);
            match l4_csum {
                Some(off) => {
                    update_csum(&mut out, off, &old, &new);
                    mangled_zero(&mut out, off);
                }
                None => update_csum(&mut out, icmp_csum, &old, &new),
            }
        } else {
            let (old, new) = (&q.daddr[12..], &external[12..]);
            out[error.quoted_ip_off + 16..error.quoted_ip_off + 20].copy_from_slice(new);
            update_csum(&mut out, error.quoted_ip_off + 10, old, new);
            if let Some(off) = l4_csum {
                let before = [out[off], out[off + 1]];
                update_csum(&mut out, off, old, new);
                mangled_zero(&mut out, off);
                let after = [out[off], out[off + 1]];
                update_csum(&mut out, icmp_csum, &before, &after);
            }
        }
        if error.outer.saddr == q.daddr {
            rewrite(&mut out, &error.outer, Side::Source, &external);
        }
        Outcome { verdict: CONTINUE, out, mark, counter: CounterIndex::IcmpErrorTranslated, also: vec![] }
    }

    /// A later fragment gets the address its datagram's first fragment got; from the pod, with
    /// the masquerade mark. Without one: lost if it is addressed to an external address.
    fn later_fragment(&mut self, frame: &[u8], mark: u32, pkt: &Packet, side: Side) -> Outcome {
        let untouched = |counter| Outcome { verdict: CONTINUE, out: frame.to_vec(), mark, counter, also: vec![] };
        let Some(&new) = self.frags.get(&frag_key(pkt)) else {
            let icmp = if pkt.v6 { 58 } else { 1 };
            return untouched(match side {
                Side::Destination if self.frontends.contains_key(&(pkt.daddr, [0, 0], icmp)) => {
                    CounterIndex::FragUnmatched
                }
                Side::Destination => CounterIndex::PassUnparsed,
                Side::Source => CounterIndex::PassNoFlow,
            });
        };
        let mut out = frame.to_vec();
        rewrite(&mut out, pkt, side, &new);
        let mark = match side {
            Side::Destination => mark | self.masquerade_mark,
            Side::Source => mark,
        };
        Outcome { verdict: CONTINUE, out, mark, counter: CounterIndex::FragTranslated, also: vec![] }
    }

    /// The flow key a reply frame belongs to, if the frame is one the egress program parses.
    pub fn reply_key(frame: &[u8]) -> Option<FlowKey> {
        match parse(frame, Program::Egress, false) {
            Parsed::Ip(pkt) => Some(reply_flow_key(&pkt)),
            _ => None,
        }
    }

    /// The flow an ingress run on `frame` would remember (whether or not it is a hit).
    pub fn request_key(&self, frame: &[u8], gso: bool) -> Option<(FlowKey, [u8; 16])> {
        let Parsed::Ip(pkt) = parse(frame, Program::Ingress, gso) else { return None };
        let cluster = self.frontends.get(&(pkt.daddr, pkt.dport, pkt.proto))?;
        Some((request_flow_key(&pkt, *cluster), pkt.daddr))
    }
}

/// A fragmented datagram's reassembly key: source, destination, identification, protocol.
type FragKey = ([u8; 16], [u8; 16], u32, u8);

fn frag_key(pkt: &Packet) -> FragKey {
    (pkt.saddr, pkt.daddr, pkt.frag_id, pkt.proto)
}

/// A TCP segment with RST set (its flags byte inside the frame).
fn is_rst(frame: &[u8], pkt: &Packet) -> bool {
    pkt.proto == 6 && frame.get(pkt.l4_off + 13).is_some_and(|flags| flags & 0x04 != 0)
}

/// The flow key of a packet from the pod towards `remote` (the cluster address it is, or is
/// rewritten to).
fn request_flow_key(pkt: &Packet, remote: [u8; 16]) -> FlowKey {
    FlowKey {
        pod_addr: pkt.saddr,
        remote_addr: remote,
        pod_port: u16::from_ne_bytes(pkt.sport),
        remote_port: u16::from_ne_bytes(pkt.dport),
        proto: pkt.proto,
        pad: [0; 3],
    }
}

fn reply_flow_key(pkt: &Packet) -> FlowKey {
    FlowKey {
        pod_addr: pkt.daddr,
        remote_addr: pkt.saddr,
        pod_port: u16::from_ne_bytes(pkt.dport),
        remote_port: u16::from_ne_bytes(pkt.sport),
        proto: pkt.proto,
        pad: [0; 3],
    }
}

/// The specification of what the programs accept for rewriting: Ethernet II (no VLAN tag)
/// carrying IPv4 without options and not a fragment, or IPv6 without extension headers; the
/// IP length within the frame; TCP (≥ 20 bytes), UDP (≥ 8) or an ICMP/ICMPv6 echo (request
/// from the pod, reply to it, code 0, ≥ 8 bytes). IPv6 packets with IPv4-mapped addresses are
/// not IPv6 traffic a pod sends (RFC 4291 §2.5.5.2) and must not match IPv4 entries.
/// BIG TCP: a GSO skb's TCP packet with IP length 0 is as long as the frame (IPv4 and IPv6),
/// and on IPv6 may carry a hop-by-hop header holding only the Jumbo Payload option.
fn parse(f: &[u8], program: Program, gso: bool) -> Parsed {
    let Some(ethertype) = f.get(12..14) else { return Parsed::NotIp };
    let (v6, ip_hlen) = match [ethertype[0], ethertype[1]] {
        ETH_P_IP => (false, 20),
        ETH_P_IPV6 => (true, 40),
        _ => return Parsed::NotIp,
    };
    let Some(ip) = f.get(ETH_HLEN..ETH_HLEN + ip_hlen) else { return Parsed::Unparsed };
    let mut l4_off = ETH_HLEN + ip_hlen;
    let (mut frag, mut frag_id) = (Frag::Whole, 0u32);
    let (proto, l4_len, saddr, daddr) = if v6 {
        if ip[0] >> 4 != 6 {
            return Parsed::Unparsed;
        }
        let mut payload_len = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
        let mut proto = ip[6];
        if payload_len == 0 && gso {
            let after_header = f.len() - (ETH_HLEN + 40);
            if proto == 6 {
                payload_len = after_header;
            } else if proto == 0 {
                let Some(hop) = f.get(l4_off..l4_off + 8) else { return Parsed::Unparsed };
                if hop[..4] == [6, 0, 0xc2, 4] {
                    proto = 6;
                    l4_off += 8;
                    payload_len = after_header.saturating_sub(8);
                }
            }
        }
        if l4_off + payload_len > f.len() {
            return Parsed::Unparsed;
        }
        // The Fragment header: the first fragment is parsed as any packet, a later one by its
        // identification only (an atomic fragment, offset 0 without M, is a whole datagram).
        if proto == 44 {
            let Some(fh) = f.get(l4_off..l4_off + 8) else { return Parsed::Unparsed };
            if payload_len < 8 {
                return Parsed::Unparsed;
            }
            let offset_m = u16::from_be_bytes([fh[2], fh[3]]);
            frag = if offset_m >> 3 != 0 {
                Frag::Later
            } else if offset_m & 1 != 0 {
                Frag::First
            } else {
                Frag::Whole
            };
            frag_id = u32::from_be_bytes([fh[4], fh[5], fh[6], fh[7]]);
            proto = fh[0];
            l4_off += 8;
            payload_len -= 8;
        }
        let saddr: [u8; 16] = ip[8..24].try_into().unwrap();
        let daddr: [u8; 16] = ip[24..40].try_into().unwrap();
        if is_v4_mapped(&saddr) || is_v4_mapped(&daddr) {
            return Parsed::Unparsed;
        }
        (proto, payload_len, saddr, daddr)
    } else {
        if ip[0] != 0x45 {
            return Parsed::Unparsed;
        }
        let field = u16::from_be_bytes([ip[6], ip[7]]);
        frag = if field & 0x1fff != 0 {
            Frag::Later
        } else if field & 0x2000 != 0 {
            Frag::First
        } else {
            Frag::Whole
        };
        frag_id = u32::from(u16::from_be_bytes([ip[4], ip[5]]));
        let mut total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
        if total == 0 && ip[9] == 6 && gso {
            total = f.len() - ETH_HLEN;
        }
        if total < 20 || ETH_HLEN + total > f.len() {
            return Parsed::Unparsed;
        }
        let s = addr16(IpAddr::from([ip[12], ip[13], ip[14], ip[15]]));
        let d = addr16(IpAddr::from([ip[16], ip[17], ip[18], ip[19]]));
        (ip[9], total - 20, s, d)
    };
    let (icmp_proto, echo_type) = match (v6, program) {
        (false, Program::Ingress) => (1, 8),
        (false, Program::Egress) => (1, 0),
        (true, Program::Ingress) => (58, 128),
        (true, Program::Egress) => (58, 129),
    };
    if frag == Frag::Later {
        if proto != 6 && proto != 17 && proto != icmp_proto {
            return Parsed::Unparsed;
        }
        return Parsed::Ip(Packet { v6, frag, frag_id, proto, l4_off, saddr, daddr, sport: [0; 2], dport: [0; 2] });
    }
    let (min_len, sport, dport) = match proto {
        6 | 17 => {
            let Some(ports) = f.get(l4_off..l4_off + 4) else { return Parsed::Unparsed };
            (if proto == 6 { 20 } else { 8 }, [ports[0], ports[1]], [ports[2], ports[3]])
        }
        p if p == icmp_proto => {
            let Some(icmp) = f.get(l4_off..l4_off + 8) else { return Parsed::Unparsed };
            if icmp[0] != echo_type || icmp[1] != 0 {
                let error_types: &[u8] = if v6 { &[1, 2, 3, 4] } else { &[3, 11, 12] };
                if program == Program::Egress && frag == Frag::Whole && error_types.contains(&icmp[0]) {
                    let outer = Packet { v6, frag, frag_id, proto, l4_off, saddr, daddr, sport: [0; 2], dport: [0; 2] };
                    return parse_quoted(f, outer, l4_off + l4_len);
                }
                return Parsed::Unparsed;
            }
            // The echo identifier stands for the pod's port; the Service side's port is 0.
            let id = [icmp[4], icmp[5]];
            match program {
                Program::Ingress => (8, id, [0, 0]),
                Program::Egress => (8, [0, 0], id),
            }
        }
        _ => return Parsed::Unparsed,
    };
    if l4_len < min_len {
        return Parsed::Unparsed;
    }
    Parsed::Ip(Packet { v6, frag, frag_id, proto, l4_off, saddr, daddr, sport, dport })
}

/// The packet an ICMP error (`outer`, its bytes up to `end`) quotes after its 8-byte header;
/// `Unparsed` unless IP header and 8 bytes of transport header are inside the error.
fn parse_quoted(f: &[u8], outer: Packet, end: usize) -> Parsed {
    let ip_off = outer.l4_off + 8;
    let ip_len = if outer.v6 { 40 } else { 20 };
    let l4_off = ip_off + ip_len;
    if l4_off + 8 > end {
        return Parsed::Unparsed;
    }
    let ip = &f[ip_off..l4_off];
    let (proto, saddr, daddr, echo_request) = if outer.v6 {
        let saddr: [u8; 16] = ip[8..24].try_into().unwrap();
        let daddr: [u8; 16] = ip[24..40].try_into().unwrap();
        if ip[0] >> 4 != 6 || is_v4_mapped(&saddr) || is_v4_mapped(&daddr) {
            return Parsed::Unparsed;
        }
        (ip[6], saddr, daddr, 128)
    } else {
        if ip[0] != 0x45 || u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff != 0 {
            return Parsed::Unparsed;
        }
        let s = addr16(IpAddr::from([ip[12], ip[13], ip[14], ip[15]]));
        let d = addr16(IpAddr::from([ip[16], ip[17], ip[18], ip[19]]));
        (ip[9], s, d, 8)
    };
    let l4 = &f[l4_off..l4_off + 8];
    let (sport, dport) = match proto {
        6 | 17 => ([l4[0], l4[1]], [l4[2], l4[3]]),
        p if p == outer.proto && l4[0] == echo_request && l4[1] == 0 => ([l4[4], l4[5]], [0, 0]),
        _ => return Parsed::Unparsed,
    };
    let quoted = Packet { v6: outer.v6, frag: Frag::Whole, frag_id: 0, proto, l4_off, saddr, daddr, sport, dport };
    Parsed::IcmpError(IcmpError { outer, end, quoted_ip_off: ip_off, quoted })
}

#[derive(Clone, Copy)]
enum Side {
    Source,
    Destination,
}

/// Replaces the source or destination address and updates the IPv4 header checksum and the
/// L4 checksum that covers the pseudo header (TCP, UDP, ICMPv6; not ICMPv4), incrementally,
/// so that a checksum that was wrong stays wrong by the same amount. A zero UDP checksum
/// ("none") stays zero, and a computed zero is written as 0xffff.
fn rewrite(out: &mut [u8], pkt: &Packet, side: Side, new: &[u8; 16]) {
    let (old, new): (Vec<u8>, Vec<u8>) = if pkt.v6 {
        let old = match side {
            Side::Source => pkt.saddr,
            Side::Destination => pkt.daddr,
        };
        (old.to_vec(), new.to_vec())
    } else {
        let old = match side {
            Side::Source => pkt.saddr,
            Side::Destination => pkt.daddr,
        };
        (old[12..].to_vec(), new[12..].to_vec())
    };
    let addr_off = match (pkt.v6, side) {
        (false, Side::Source) => ETH_HLEN + 12,
        (false, Side::Destination) => ETH_HLEN + 16,
        (true, Side::Source) => ETH_HLEN + 8,
        (true, Side::Destination) => ETH_HLEN + 24,
    };
    out[addr_off..addr_off + new.len()].copy_from_slice(&new);
    if !pkt.v6 {
        update_csum(out, ETH_HLEN + 10, &old, &new);
    }
    let l4_csum = match pkt.proto {
        // A later fragment has no transport header.
        _ if pkt.frag == Frag::Later => None,
        6 => Some(pkt.l4_off + 16),
        17 => Some(pkt.l4_off + 6),
        58 => Some(pkt.l4_off + 2),
        _ => None,
    };
    if let Some(off) = l4_csum {
        let field = u16::from_be_bytes([out[off], out[off + 1]]);
        if pkt.proto == 17 && field == 0 {
            return;
        }
        update_csum(out, off, &old, &new);
        if pkt.proto == 17 && out[off..off + 2] == [0, 0] {
            out[off..off + 2].copy_from_slice(&[0xff, 0xff]);
        }
    }
}

/// RFC 1624 eqn. 3, HC' = ~(~HC + ~m + m'), over the 16-bit words of the old and new bytes,
/// with the kernel's representation of the ones'-complement sum: the kernel's running sum
/// is never zero (it starts from ~HC widened to 32 bits), so a sum ≡ 0 (mod 0xffff) is 0xffff
/// and the checksum written is then 0x0000, never 0xffff.
fn update_csum(out: &mut [u8], off: usize, old: &[u8], new: &[u8]) {
    let word = |w: &[u8]| u64::from(u16::from_be_bytes([w[0], w[1]]));
    let mut sum = u64::from(!u16::from_be_bytes([out[off], out[off + 1]]));
    for w in old.chunks_exact(2) {
        sum += 0xffff - word(w);
    }
    for w in new.chunks_exact(2) {
        sum += word(w);
    }
    let folded = match sum % 0xffff {
        0 => 0xffff,
        r => r as u16,
    };
    out[off..off + 2].copy_from_slice(&(!folded).to_be_bytes());
}

/// Whether BPF_PROG_TEST_RUN runs a TC program on this frame at all: it refuses frames
/// shorter than an Ethernet header, and IPv4/IPv6 frames too short for their IP header (such
/// frames never reach a TC program on a real device either). Longer than a page minus the
/// runner's head- and tailroom is refused too.
pub fn test_runner_accepts(frame: &[u8]) -> bool {
    let min = match frame.get(12..14) {
        Some([0x08, 0x00]) => ETH_HLEN + 20,
        Some([0x86, 0xdd]) => ETH_HLEN + 40,
        _ => ETH_HLEN,
    };
    frame.len() >= min && frame.len() <= MAX_TEST_FRAME
}

/// Frames up to this size are always accepted by the test runner (4 KiB page minus its
/// headroom and the skb's shared info).
pub const MAX_TEST_FRAME: usize = 3000;
