//! Differential fuzzing of the pod TC programs against the reference model
//! (`tests/common/model.rs`): seeded random frames — valid, truncated, fragmented, with IPv4
//! options, IPv6 extension headers, VLAN tags, bad checksums, any protocol, random bytes —
//! run through BPF_PROG_TEST_RUN and through the model; verdict, output bytes and skb mark
//! must be equal for every frame, and the counters and the flow map must be equal throughout.
//!
//! `NM_FUZZ_CASES` (default 100,000) sets the number of frames, `NM_FUZZ_SEED` replays a run
//! (every run prints its seed; a failure names it). Long run: `NM_FUZZ_CASES=10000000 cargo
//! test -p node-manager --release --test fuzz`. Needs root.
mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv6Addr},
    time::Instant,
};

use aya::programs::{TestRun as _, TestRunOptions};
use common::{
    frames::{self, Spec, frame, verify_checksums},
    model::{self, Model, Program},
};
use node_manager::{
    kernel::Datapath,
    model::{FrontendAddr, Protocol, Target},
};
use node_manager_common::{CounterIndex, CounterKind, DatapathConfig, FlowKey, program_names};

const DEFAULT_CASES: u64 = 300_000;
/// The masquerade mark and the frontends change every this many cases.
const EPOCH: u64 = 10_000;
/// `struct __sk_buff` on Linux ≥ 5.16; `mark` is at offset 8.
const SKB_CTX_LEN: usize = 192;
/// `struct __sk_buff.gso_size` (Linux ≥ 5.7; the test runner copies it into the skb).
const SKB_GSO_SIZE_OFF: usize = 176;

/// (external, port, protocol, cluster). Shared external addresses, one external port on two
/// protocols to different cluster IPs, two external addresses on one cluster IP:port (so a pod
/// port's flow can change its external address), ICMP on some addresses only.
const FRONTENDS: &[(&str, u16, Protocol, &str)] = &[
    ("203.0.113.10", 80, Protocol::Tcp, "198.51.100.10"),
    ("203.0.113.10", 443, Protocol::Tcp, "198.51.100.10"),
    ("203.0.113.10", 8080, Protocol::Tcp, "198.51.100.10"),
    ("203.0.113.10", 8080, Protocol::Udp, "198.51.100.12"),
    ("203.0.113.10", 53, Protocol::Udp, "198.51.100.10"),
    ("203.0.113.10", 0, Protocol::IcmpEcho, "198.51.100.10"),
    ("203.0.113.11", 8080, Protocol::Tcp, "198.51.100.10"),
    ("203.0.113.11", 53, Protocol::Udp, "198.51.100.11"),
    ("203.0.113.11", 65535, Protocol::Tcp, "198.51.100.11"),
    ("2001:db8:e::10", 80, Protocol::Tcp, "2001:db8:5::10"),
    ("2001:db8:e::10", 443, Protocol::Tcp, "2001:db8:5::10"),
    ("2001:db8:e::10", 8080, Protocol::Tcp, "2001:db8:5::10"),
    ("2001:db8:e::10", 8080, Protocol::Udp, "2001:db8:5::12"),
    ("2001:db8:e::10", 53, Protocol::Udp, "2001:db8:5::10"),
    ("2001:db8:e::10", 0, Protocol::IcmpEcho, "2001:db8:5::10"),
    ("2001:db8:e::11", 8080, Protocol::Tcp, "2001:db8:5::10"),
    ("2001:db8:e::11", 53, Protocol::Udp, "2001:db8:5::11"),
    ("2001:db8:e::11", 65535, Protocol::Tcp, "2001:db8:5::11"),
];
const POD_CIDRS: &[&str] = &["192.0.2.0/25", "192.0.2.200/32", "2001:db8:1::/64", "2001:db8:7::/48"];

/// Sources: mostly inside the pod CIDRs (edges included), some outside, some of the wrong
/// kind (a cluster IP, an IPv4-mapped IPv6 address).
const SRC4: &[&str] = &[
    "192.0.2.10",
    "192.0.2.11",
    "192.0.2.0",
    "192.0.2.127",
    "192.0.2.200",
    "192.0.2.128",
    "192.0.2.201",
    "198.51.100.10",
];
const SRC6: &[&str] = &[
    "2001:db8:1::10",
    "2001:db8:1::11",
    "2001:db8:1:0:ffff:ffff:ffff:ffff",
    "2001:db8:7:ffff::1",
    "2001:db8:2::10",
    "2001:db8:8::1",
    "::ffff:192.0.2.10",
];
/// Destinations of requests: frontends, a non-frontend external, cluster IPs, IPv4-mapped.
const DST4: &[&str] = &["203.0.113.10", "203.0.113.11", "203.0.113.12", "198.51.100.10", "192.0.2.130"];
const DST6: &[&str] = &["2001:db8:e::10", "2001:db8:e::11", "2001:db8:e::12", "2001:db8:5::10", "::ffff:203.0.113.10"];
const PORTS: &[u16] = &[80, 443, 8080, 53, 65535, 0, 8081];

struct Run {
    ret: u32,
    out: Vec<u8>,
    mark: u32,
}

fn kernel_run(dp: &mut Datapath, program: Program, input: &[u8], mark: u32, gso_size: u32) -> Result<Run, String> {
    let name = match program {
        Program::Ingress => program_names::POD_INGRESS,
        Program::Egress => program_names::POD_EGRESS,
    };
    let mut out = vec![0u8; input.len() + 256];
    let mut ctx_in = [0u8; SKB_CTX_LEN];
    ctx_in[8..12].copy_from_slice(&mark.to_ne_bytes());
    ctx_in[SKB_GSO_SIZE_OFF..SKB_GSO_SIZE_OFF + 4].copy_from_slice(&gso_size.to_ne_bytes());
    let mut ctx_out = [0u8; SKB_CTX_LEN];
    let result = dp
        .program(name)
        .map_err(|e| e.to_string())?
        .test_run(TestRunOptions {
            data_in: Some(input),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx_in),
            ctx_out: Some(&mut ctx_out),
            ..Default::default()
        })
        .map_err(|e| e.to_string())?;
    out.truncate(result.data_size_out as usize);
    Ok(Run { ret: result.return_value, out, mark: u32::from_ne_bytes(ctx_out[8..12].try_into().unwrap()) })
}

/// One generated frame, with what was done to it (for failure messages and statistics).
struct Case {
    program: Program,
    frame: Vec<u8>,
    mark: u32,
    /// skb->gso_size (non-zero: a GSO aggregate, which BIG TCP frames are).
    gso_size: u32,
    what: String,
    /// Checksums valid and no change that makes the model's output unverifiable.
    checksums_valid: bool,
}

struct Gen {
    rng: fastrand::Rng,
    /// Flows the pods opened (keys as seen on egress), to build replies from.
    known: Vec<(FlowKey, [u8; 16])>,
    /// The address change the frame just generated is meant to get (old, new), if any.
    meant: Option<([u8; 16], [u8; 16])>,
    /// A later fragment of the datagram whose first fragment the last case was: the next case.
    pending: Option<Case>,
}

fn parse_ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn ip_of16(a: [u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(a);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

fn port_of(wire: u16) -> u16 {
    u16::from_be_bytes(wire.to_ne_bytes())
}

impl Gen {
    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.rng.usize(..items.len())]
    }

    fn payload(&mut self) -> Vec<u8> {
        let len = match self.rng.u8(..10) {
            0 => 0,
            1 => self.rng.usize(200..1400),
            _ => self.rng.usize(1..64),
        };
        (0..len).map(|_| self.rng.u8(..)).collect()
    }

    fn case(&mut self) -> Case {
        if let Some(later) = self.pending.take() {
            return later;
        }
        // A few frames of pure noise.
        if self.rng.u8(..100) < 3 {
            let len = self.rng.usize(0..120);
            let mut f: Vec<u8> = (0..len).map(|_| self.rng.u8(..)).collect();
            if f.len() >= 14 && self.rng.bool() {
                let et = self.pick(&[[0x08, 0x00], [0x86, 0xdd]]);
                f[12..14].copy_from_slice(&et);
            }
            let program = if self.rng.bool() { Program::Ingress } else { Program::Egress };
            return Case {
                program,
                frame: f,
                mark: 0,
                gso_size: 0,
                what: "random bytes".into(),
                checksums_valid: false,
            };
        }
        let (program, spec, mut what) = if self.rng.bool() {
            let (s, w) = self.request();
            (Program::Ingress, s, w)
        } else {
            let (s, w) = self.reply();
            (Program::Egress, s, w)
        };
        let v6 = spec.src.is_ipv6();
        let mut f = frame(&spec);
        if spec.proto == frames::TCP && self.rng.bool() {
            // SYN, SYN|ACK, ACK, FIN|ACK, RST (the builder's default is PSH|ACK).
            let flags = self.pick(&[0x02u8, 0x12, 0x10, 0x11, 0x04]);
            set_tcp_flags(&mut f, v6, flags);
            what.push_str(&format!(", TCP flags {flags:#04x}"));
        }
        let mut checksums_valid = true;
        let gso_size = self.big_tcp(&mut f, v6, spec.proto, &mut what, &mut checksums_valid);
        if let Some((old, new)) = self.meant.take()
            && self.rng.u8(..8) == 0
        {
            what.push_str(", ");
            what.push_str(&self.edge_checksum(&mut f, v6, old, new));
            checksums_valid = false;
        }
        let mutations = match self.rng.u8(..10) {
            0..=3 => 0,
            4..=7 => 1,
            _ => 2,
        };
        for _ in 0..mutations {
            let (m, keeps_valid) = self.mutate(&mut f, v6);
            what.push_str(", ");
            what.push_str(&m);
            checksums_valid &= keeps_valid;
        }
        // Now and then the frame becomes the first fragment of a datagram whose later fragment
        // is the next case (a later fragment reuses the first's addresses, protocol and ID).
        if mutations == 0 && self.rng.u8(..5) == 0 {
            let later = self.fragment(&mut f, v6);
            what.push_str(", first fragment");
            checksums_valid = false;
            self.pending = Some(Case {
                program,
                frame: later,
                mark: 0,
                gso_size: 0,
                what: format!("the later fragment of: {what}"),
                checksums_valid: false,
            });
        }
        let mark = match self.rng.u8(..4) {
            0 => self.rng.u32(..),
            1 => 0x4000,
            _ => 0,
        };
        Case { program, frame: f, mark, gso_size, what, checksums_valid }
    }

    /// A TCP, UDP or ICMP segment; `choice` < 20 picks the kind (see the match), otherwise at
    /// random.
    fn l4(
        &mut self,
        src: IpAddr,
        dst: IpAddr,
        sport: u16,
        dport: u16,
        echo_type: u8,
        choice: Option<u8>,
    ) -> (Spec, String) {
        let payload = self.payload();
        let (s, d) = (src.to_string(), dst.to_string());
        let spec = match choice.unwrap_or_else(|| self.rng.u8(..20)) {
            0..=7 => Spec { payload, ..Spec::tcp(&s, sport, &d, dport) },
            8..=15 => Spec { payload, ..Spec::udp(&s, sport, &d, dport) },
            16..=18 => Spec { payload, ..Spec::echo(&s, &d, echo_type, sport) },
            _ => {
                // ICMP of another type (an error, the other echo direction) or code.
                let ty = self.pick(&[0u8, 3, 8, 11, 1, 128, 129, 135]);
                let mut spec = Spec { payload, ..Spec::echo(&s, &d, ty, sport) };
                spec.icmp.1 = if self.rng.bool() { 0 } else { self.rng.u8(..) };
                spec
            }
        };
        let what =
            format!("{} {s}:{sport} -> {d}:{dport} proto {} icmp {:?}", spec.payload.len(), spec.proto, spec.icmp);
        (spec, what)
    }

    fn request(&mut self) -> (Spec, String) {
        if !self.known.is_empty() && self.rng.u8(..10) == 0 {
            // The pod talks to a cluster address directly on a remembered flow's tuple.
            let (key, _) = self.known[self.rng.usize(..self.known.len())];
            let (pod, remote) = (ip_of16(key.pod_addr), ip_of16(key.remote_addr));
            let (sport, dport) = (port_of(key.pod_port), port_of(key.remote_port));
            let payload = self.payload();
            let (p, r) = (pod.to_string(), remote.to_string());
            let spec = match key.proto {
                6 => Spec { payload, ..Spec::tcp(&p, sport, &r, dport) },
                17 => Spec { payload, ..Spec::udp(&p, sport, &r, dport) },
                _ => Spec { payload, ..Spec::echo(&p, &r, if pod.is_ipv4() { 8 } else { 128 }, sport) },
            };
            return (spec, format!("direct to the cluster address on a known flow's tuple {p}:{sport} -> {r}:{dport}"));
        }
        if self.rng.bool() {
            // Aimed at a frontend from a pod (more often a hit than chance would give).
            let (ext, port, protocol, cluster) = self.pick(FRONTENDS);
            self.meant = Some((model::addr16(parse_ip(ext)), model::addr16(parse_ip(cluster))));
            let dst = parse_ip(ext);
            // Mostly from a pod; one in eight from outside the pod CIDRs (must stay untouched).
            let outside = self.rng.u8(..8) == 0;
            let src = parse_ip(match (dst.is_ipv6(), outside) {
                (true, false) => self.pick(&SRC6[..4]),
                (true, true) => self.pick(&SRC6[4..]),
                (false, false) => self.pick(&SRC4[..5]),
                (false, true) => self.pick(&SRC4[5..]),
            });
            let (choice, echo) = match (protocol, dst.is_ipv6()) {
                (Protocol::Tcp, _) => (0, 0),
                (Protocol::Udp, _) => (8, 0),
                (Protocol::IcmpEcho, false) => (16, 8),
                (Protocol::IcmpEcho, true) => (16, 128),
            };
            let sport = 40000 + self.rng.u16(..64);
            let (spec, what) = self.l4(src, dst, sport, port, echo, Some(choice));
            return (spec, format!("request to a frontend {what}"));
        }
        let v6 = self.rng.bool();
        let src = parse_ip(if v6 { self.pick(SRC6) } else { self.pick(SRC4) });
        let dst = match (self.rng.u8(..10), v6) {
            (0, false) => IpAddr::from(self.rng.u32(..).to_be_bytes()),
            (0, true) => IpAddr::from(self.rng.u128(..).to_be_bytes()),
            (_, false) => parse_ip(self.pick(DST4)),
            (_, true) => parse_ip(self.pick(DST6)),
        };
        // Pod ports from a small pool, so that flows repeat and replies find them.
        let sport = if self.rng.u8(..10) == 0 { self.rng.u16(..) } else { 40000 + self.rng.u16(..64) };
        let dport = if self.rng.u8(..10) == 0 { self.rng.u16(..) } else { self.pick(PORTS) };
        let echo = if v6 { 128 } else { 8 };
        let (spec, what) = self.l4(src, dst, sport, dport, echo, None);
        (spec, format!("request {what}"))
    }

    fn reply(&mut self) -> (Spec, String) {
        if !self.known.is_empty() && self.rng.u8(..10) == 0 {
            return self.icmp_error();
        }
        if !self.known.is_empty() && self.rng.u8(..10) < 7 {
            let (key, external) = self.known[self.rng.usize(..self.known.len())];
            self.meant = Some((key.remote_addr, external));
            let (remote, pod) = (ip_of16(key.remote_addr), ip_of16(key.pod_addr));
            let (sport, dport) = (port_of(key.remote_port), port_of(key.pod_port));
            let payload = self.payload();
            let (r, p) = (remote.to_string(), pod.to_string());
            let spec = match key.proto {
                6 => Spec { payload, ..Spec::tcp(&r, sport, &p, dport) },
                17 => Spec { payload, ..Spec::udp(&r, sport, &p, dport) },
                _ => Spec { payload, ..Spec::echo(&r, &p, if remote.is_ipv4() { 0 } else { 129 }, dport) },
            };
            return (spec, format!("reply of a known flow {r}:{sport} -> {p}:{dport} proto {}", key.proto));
        }
        // Anything else towards a pod: from a cluster IP on a port no flow has, from elsewhere.
        let (spec, what) = self.request();
        let swapped = Spec { src: spec.dst, dst: spec.src, sport: spec.dport, dport: spec.sport, ..spec };
        let swapped = if swapped.proto == frames::ICMP || swapped.proto == frames::ICMPV6 {
            let reply_type = if swapped.src.is_ipv4() { 0 } else { 129 };
            let ty = if self.rng.u8(..4) == 0 { swapped.icmp.0 } else { reply_type };
            Spec { icmp: (ty, swapped.icmp.1, swapped.icmp.2), ..swapped }
        } else {
            swapped
        };
        (swapped, format!("stray reply ({what})"))
    }

    /// An ICMP error to the pod of a known flow quoting its packet as conntrack hands it on
    /// (pod → cluster address): an error type of the family (or another ICMP type now and
    /// then), from the cluster address or a hop on the way, quoting the packet whole, its IP
    /// header and 8 bytes, or cut anywhere.
    fn icmp_error(&mut self) -> (Spec, String) {
        let (key, _) = self.known[self.rng.usize(..self.known.len())];
        let (pod, cluster) = (ip_of16(key.pod_addr), ip_of16(key.remote_addr));
        let v6 = pod.is_ipv6();
        let (p, c) = (pod.to_string(), cluster.to_string());
        let (sport, dport) = (port_of(key.pod_port), port_of(key.remote_port));
        let payload = self.payload();
        let quoted = match key.proto {
            6 => Spec { payload, ..Spec::tcp(&p, sport, &c, dport) },
            17 => Spec { payload, ..Spec::udp(&p, sport, &c, dport) },
            _ => Spec { payload, ..Spec::echo(&p, &c, if v6 { 128 } else { 8 }, sport) },
        };
        let mut sent = frame(&quoted);
        if key.proto == 6 && self.rng.bool() {
            set_tcp_flags(&mut sent, v6, self.pick(&[0x02u8, 0x10, 0x11]));
        }
        let mut quote = sent[14..].to_vec();
        let ip_len = if v6 { 40 } else { 20 };
        let cut = match self.rng.u8(..4) {
            0 => ip_len + 8,
            1 => self.rng.usize(..=quote.len()),
            _ => quote.len(),
        };
        quote.truncate(cut);
        let ty = match (v6, self.rng.u8(..10)) {
            (_, 0) => self.rng.u8(..),
            (true, _) => self.pick(&[1u8, 2, 3, 4]),
            (false, _) => self.pick(&[3u8, 11, 12]),
        };
        let code = if self.rng.bool() { 0 } else { self.rng.u8(..16) };
        let source = match self.rng.u8(..3) {
            0 => c.clone(),
            _ if v6 => "2001:db8:2::1".to_owned(),
            _ => "192.0.2.129".to_owned(),
        };
        let spec = Spec { payload: quote, icmp: (ty, code, 0), ..Spec::echo(&source, &p, 0, 0) };
        (
            spec,
            format!(
                "ICMP {ty}/{code} from {source} quoting {cut} bytes of {p}:{sport} -> {c}:{dport} proto {}",
                key.proto
            ),
        )
    }

    /// Sets the IPv4 header checksum or the L4 checksum to the value whose incremental update
    /// for the address change old → new sums to exactly zero: the ones'-complement corner
    /// (0x0000 vs 0xffff, and UDP's "computed zero is written as 0xffff").
    fn edge_checksum(&mut self, f: &mut [u8], v6: bool, old: [u8; 16], new: [u8; 16]) -> String {
        let (old, new) = if v6 { (&old[..], &new[..]) } else { (&old[12..], &new[12..]) };
        let word = |w: &[u8]| u64::from(u16::from_be_bytes([w[0], w[1]]));
        let d: u64 = old.chunks(2).map(|w| 0xffff - word(w)).sum::<u64>() + new.chunks(2).map(word).sum::<u64>();
        let t = d % 0xffff;
        let not_hc = if t == 0 { self.pick(&[0u16, 0xffff]) } else { (0xffff - t) as u16 };
        let ip_len = if v6 { 40 } else { 20 };
        let off = match f[if v6 { 20 } else { 23 }] {
            _ if !v6 && self.rng.bool() => 24,
            6 => 14 + ip_len + 16,
            17 => 14 + ip_len + 6,
            58 => 14 + ip_len + 2,
            _ => 24,
        };
        f[off..off + 2].copy_from_slice(&(!not_hc).to_be_bytes());
        format!("checksum at {off} set to the zero-sum edge {:#06x}", !not_hc)
    }

    /// Applies one mutation; returns its description and whether checksums stay valid and
    /// verifiable afterwards.
    /// Makes `f` (a whole packet) the first fragment of a datagram and returns a later fragment
    /// of it: IPv4 with MF set (the builder's ID), IPv6 with a Fragment header (offset 0, M,
    /// an ID from a pool of 16, so that long runs stay far below NM_FRAGS' capacity: the model
    /// has no LRU, and an entry the kernel evicted would read as a difference); the later one carries the same header fields, an offset of 8 bytes or more
    /// and random bytes.
    fn fragment(&mut self, f: &mut Vec<u8>, v6: bool) -> Vec<u8> {
        let data: Vec<u8> = (0..self.rng.usize(8..64)).map(|_| self.rng.u8(..)).collect();
        let mut later = f[..14].to_vec();
        if v6 {
            let id = (0x5a5a_0000 | self.rng.u32(..16)).to_be_bytes();
            let proto = f[20];
            let first = [proto, 0, 0x00, 0x01, id[0], id[1], id[2], id[3]];
            f.splice(54..54, first);
            f[20] = 44;
            let len = u16::from_be_bytes([f[18], f[19]]).wrapping_add(8);
            f[18..20].copy_from_slice(&len.to_be_bytes());
            let offset_m = (self.rng.u16(1..0x1fff) << 3) | u16::from(self.rng.bool());
            later.extend_from_slice(&f[14..54]);
            later[18..20].copy_from_slice(&((8 + data.len()) as u16).to_be_bytes());
            let [hi, lo] = offset_m.to_be_bytes();
            later.extend_from_slice(&[proto, 0, hi, lo, id[0], id[1], id[2], id[3]]);
        } else {
            f[20] |= 0x20; // MF
            frames::fix_ipv4_csum(f);
            later.extend_from_slice(&f[14..34]);
            let field = self.rng.u16(1..0x2000) | if self.rng.bool() { 0x2000 } else { 0 };
            later[20..22].copy_from_slice(&field.to_be_bytes());
            later[16..18].copy_from_slice(&((20 + data.len()) as u16).to_be_bytes());
            frames::fix_ipv4_csum(&mut later);
        }
        // Half the time another datagram's later fragment: its first was never seen.
        if self.rng.bool() {
            let id = if v6 { 58..62 } else { 18..20 };
            let other: Vec<u8> = later[id.clone()].iter().map(|b| b ^ 0x5a).collect();
            later[id].copy_from_slice(&other);
            if !v6 {
                frames::fix_ipv4_csum(&mut later);
            }
        }
        later.extend_from_slice(&data);
        later
    }

    /// Sometimes makes the frame a GSO skb (returns its gso_size), and some of those BIG TCP
    /// aggregates: IP length 0, and on IPv6 perhaps the Jumbo Payload hop-by-hop header. Also
    /// zero lengths without GSO, which are malformed and must pass untouched.
    fn big_tcp(&mut self, f: &mut Vec<u8>, v6: bool, proto: u8, what: &mut String, valid: &mut bool) -> u32 {
        let gso_size = if self.rng.u8(..6) == 0 { 1448 } else { 0 };
        if gso_size != 0 {
            what.push_str(", GSO skb");
        }
        // Zero lengths in half the GSO TCP frames, and rarely elsewhere (unparsed there), so
        // the generator's other outcomes keep their share.
        if self.rng.u8(..if proto == frames::TCP && gso_size != 0 { 2 } else { 48 }) != 0 {
            return gso_size;
        }
        let jumbo = v6 && self.rng.bool();
        frames::big_tcp(f, jumbo);
        what.push_str(match (v6, jumbo) {
            (false, _) => ", IPv4 total length 0",
            (true, false) => ", IPv6 payload length 0",
            (true, true) => ", IPv6 payload length 0 with a Jumbo Payload header",
        });
        // The checksum verifier reads the lengths from the headers.
        *valid = false;
        gso_size
    }

    fn mutate(&mut self, f: &mut Vec<u8>, v6: bool) -> (String, bool) {
        let ip_len = if v6 { 40 } else { 20 };
        match self.rng.u8(..16) {
            0 if !f.is_empty() => {
                let len = self.rng.usize(0..f.len());
                f.truncate(len);
                (format!("truncated to {len}"), false)
            }
            1 => {
                let n = self.rng.usize(1..40);
                f.extend((0..n).map(|_| self.rng.u8(..)));
                (format!("{n} bytes of trailing padding"), true)
            }
            2 if !v6 && f.len() >= 34 => {
                let (flags, what) = match self.rng.u8(..4) {
                    0 => (0x2000, "first fragment (MF)"),
                    1 => (self.rng.u16(1..0x2000), "later fragment"),
                    2 => (0x2000 | self.rng.u16(1..0x2000), "middle fragment"),
                    _ => (0x4000, "DF set"),
                };
                f[20..22].copy_from_slice(&flags.to_be_bytes());
                frames::fix_ipv4_csum(f);
                (what.into(), flags == 0x4000)
            }
            3 if !v6 && f.len() >= 34 => {
                let words = self.rng.usize(1..=10);
                let opts: Vec<u8> = (0..words * 4).map(|_| self.pick(&[1u8, 0, 7, 68, 148, 4])).collect();
                f.splice(34..34, opts);
                f[14] = 0x40 | (5 + words as u8);
                let total = u16::from_be_bytes([f[16], f[17]]).wrapping_add(4 * words as u16);
                f[16..18].copy_from_slice(&total.to_be_bytes());
                frames::fix_ipv4_csum(f);
                (format!("{words} words of IPv4 options"), false)
            }
            4 if v6 && f.len() >= 54 => {
                let ext = self.pick(&[0u8, 43, 44, 60, 51, 135]);
                let mut hdr = vec![f[20], 0, 0, 0, 0, 0, 0, 0];
                if ext == 44 {
                    hdr[2..4].copy_from_slice(&self.rng.u16(..).to_be_bytes());
                }
                f.splice(54..54, hdr);
                f[20] = ext;
                let len = u16::from_be_bytes([f[18], f[19]]).wrapping_add(8);
                f[18..20].copy_from_slice(&len.to_be_bytes());
                (format!("IPv6 extension header {ext}"), false)
            }
            5 if f.len() >= 14 => {
                let tpid = self.pick(&[[0x81u8, 0x00], [0x88, 0xa8]]);
                let tci = self.rng.u16(..).to_be_bytes();
                f.splice(12..12, [tpid[0], tpid[1], tci[0], tci[1]]);
                (format!("VLAN tag {:02x}{:02x}", tpid[0], tpid[1]), false)
            }
            6 if !v6 && f.len() >= 34 => {
                let c = self.rng.u16(..).to_be_bytes();
                f[24..26].copy_from_slice(&c);
                ("bad IPv4 header checksum".into(), false)
            }
            7 if f.len() >= 14 + ip_len + 8 => {
                let off = match f[if v6 { 20 } else { 23 }] {
                    6 if f.len() >= 14 + ip_len + 18 => 14 + ip_len + 16,
                    17 => 14 + ip_len + 6,
                    _ => 14 + ip_len + 2,
                };
                let random = self.rng.u16(..);
                let c = self.pick(&[0u16, 0xffff, random]);
                f[off..off + 2].copy_from_slice(&c.to_be_bytes());
                (format!("L4 checksum set to {c:#06x}"), false)
            }
            8 if f.len() >= 14 + ip_len => {
                let len_off = if v6 { 18 } else { 16 };
                let len = match self.rng.u8(..3) {
                    0 => 0,
                    1 => self.rng.u16(..),
                    _ => u16::from_be_bytes([f[len_off], f[len_off + 1]])
                        .wrapping_add(self.rng.u16(..16))
                        .wrapping_sub(8),
                };
                f[len_off..len_off + 2].copy_from_slice(&len.to_be_bytes());
                if !v6 {
                    frames::fix_ipv4_csum(f);
                }
                (format!("IP length set to {len}"), false)
            }
            9 if f.len() >= 15 => {
                f[14] = self.rng.u8(..);
                if !v6 && f.len() >= 34 {
                    frames::fix_ipv4_csum(f);
                }
                (format!("version/IHL byte {:#04x}", f[14]), false)
            }
            10 if f.len() >= 14 + ip_len => {
                let random = self.rng.u8(..);
                let p = self.pick(&[0u8, 1, 2, 6, 17, 41, 47, 50, 58, 132, 136, 255, random]);
                f[if v6 { 20 } else { 23 }] = p;
                if !v6 {
                    frames::fix_ipv4_csum(f);
                }
                (format!("protocol {p}"), false)
            }
            11 if f.len() >= 14 => {
                let et = self.pick(&[[0x08u8, 0x06], [0x86, 0xdd], [0x08, 0x00], [0x88, 0x47], [0, 0]]);
                f[12..14].copy_from_slice(&et);
                (format!("ethertype {:02x}{:02x}", et[0], et[1]), false)
            }
            12 if f.len() >= 14 + ip_len + 2 => {
                let off = 14 + ip_len;
                f[off] = self.rng.u8(..);
                f[off + 1] = if self.rng.bool() { 0 } else { self.rng.u8(..) };
                (format!("L4 first bytes {:02x}{:02x}", f[off], f[off + 1]), false)
            }
            13 if f.len() >= 14 + ip_len + 8 && f[if v6 { 20 } else { 23 }] == 17 => {
                f[14 + ip_len + 6..14 + ip_len + 8].copy_from_slice(&[0, 0]);
                ("UDP checksum 0 (none)".into(), false)
            }
            _ if !f.is_empty() => {
                let n = self.rng.usize(1..=4);
                let mut at = Vec::new();
                for _ in 0..n {
                    let i = self.rng.usize(..f.len());
                    f[i] ^= 1 << self.rng.u8(..8);
                    at.push(i);
                }
                (format!("bits flipped at {at:?}"), false)
            }
            _ => ("nothing (empty)".into(), true),
        }
    }
}

/// Sets the TCP flags of a frame built by `frames::frame` and recomputes its checksum.
fn set_tcp_flags(f: &mut [u8], v6: bool, flags: u8) {
    let l4 = 14 + if v6 { 40 } else { 20 };
    let (old, new) = (u16::from_be_bytes([f[l4 + 12], f[l4 + 13]]), u16::from_be_bytes([f[l4 + 12], flags]));
    f[l4 + 13] = flags;
    let csum = u16::from_be_bytes([f[l4 + 16], f[l4 + 17]]);
    // RFC 1624: HC' = ~(~HC + ~m + m').
    let sum = u32::from(!csum) + u32::from(!old) + u32::from(new);
    let folded = (sum & 0xffff) + (sum >> 16);
    let folded = (folded & 0xffff) + (folded >> 16);
    f[l4 + 16..l4 + 18].copy_from_slice(&(!(folded as u16)).to_be_bytes());
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn first_difference(a: &[u8], b: &[u8]) -> String {
    match a.iter().zip(b).position(|(x, y)| x != y) {
        Some(i) => format!("first difference at byte {i}"),
        None => format!("lengths {} vs {}", a.len(), b.len()),
    }
}

fn seed() -> u64 {
    match std::env::var("NM_FUZZ_SEED") {
        Ok(s) if !s.is_empty() => s.parse().unwrap_or_else(|_| panic!("NM_FUZZ_SEED={s:?} is not a u64")),
        _ => {
            let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
            t.as_nanos() as u64 ^ (u64::from(std::process::id()) << 32)
        }
    }
}

fn cases() -> u64 {
    match std::env::var("NM_FUZZ_CASES") {
        Ok(s) if !s.is_empty() => s.parse().unwrap_or_else(|_| panic!("NM_FUZZ_CASES={s:?} is not a number")),
        _ => DEFAULT_CASES,
    }
}

fn setup(dp: &mut Datapath, model: &mut Model) {
    let mut fe = BTreeMap::new();
    for &(ext, port, protocol, cluster) in FRONTENDS {
        fe.insert(
            FrontendAddr { addr: parse_ip(ext), port, protocol },
            Target { cluster_ip: parse_ip(cluster), owner: "fuzz/svc".into() },
        );
        let proto = match (protocol, parse_ip(ext)) {
            (Protocol::Tcp, _) => 6,
            (Protocol::Udp, _) => 17,
            (Protocol::IcmpEcho, IpAddr::V4(_)) => 1,
            (Protocol::IcmpEcho, IpAddr::V6(_)) => 58,
        };
        model.add_frontend(parse_ip(ext), port, proto, parse_ip(cluster));
    }
    dp.sync_frontends(&fe).unwrap();
    let cidrs: BTreeSet<ipnet::IpNet> = POD_CIDRS.iter().map(|c| c.parse().unwrap()).collect();
    for c in &cidrs {
        model.add_pod_cidr(*c);
    }
    dp.sync_pod_cidrs(&cidrs).unwrap();
}

fn compare_state(dp: &Datapath, model: &Model, seed: u64, at: u64) {
    let kernel: BTreeMap<&str, _> = dp.counters().unwrap().into_iter().collect();
    for index in CounterIndex::ALL {
        let (k, m) = (kernel[index.name()], model.counters[index as usize]);
        assert_eq!(k, m, "seed {seed}, after {at} cases: counter {} kernel {k:?} model {m:?}", index.name());
    }
    let flows = dp.flows().unwrap();
    assert_eq!(flows.len(), model.flows.len(), "seed {seed}, after {at} cases: number of flows");
    for (key, external) in &model.flows {
        let got = flows.get(key).map(|f| f.external_addr);
        assert_eq!(got, Some(*external), "seed {seed}, after {at} cases: flow {key:?}");
    }
}

#[test]
fn tc_programs_match_the_reference_model_on_random_and_mutated_frames() {
    let seed = seed();
    let total = cases();
    eprintln!("fuzz: {total} cases, seed {seed} (replay with NM_FUZZ_SEED={seed})");
    let mut dp = Datapath::load_unpinned().expect("load the eBPF object (run as root)");
    let mut model = Model::new();
    setup(&mut dp, &mut model);
    let mut generator = Gen { rng: fastrand::Rng::with_seed(seed), known: Vec::new(), meant: None, pending: None };
    let started = Instant::now();
    let (mut refused, mut verified_rewrites) = (0u64, 0u64);
    for i in 0..total {
        if i % EPOCH == 0 {
            if i > 0 {
                compare_state(&dp, &model, seed, i);
            }
            let random = generator.rng.u32(..);
            let mark = generator.pick(&[0u32, 0x4000, 0x4000, random]);
            dp.set_config(DatapathConfig { masquerade_mark: mark }).unwrap();
            model.masquerade_mark = mark;
        }
        let case = generator.case();
        macro_rules! fail {
            ($($arg:tt)*) => {
                panic!(
                    "seed {seed} case {i} ({:?}, mark {:#x}): {}\n  case:  {}\n  input  {}\n(replay with NM_FUZZ_SEED={seed})",
                    case.program,
                    case.mark,
                    format!($($arg)*),
                    case.what,
                    hex(&case.frame)
                )
            };
        }
        let accepts = model::test_runner_accepts(&case.frame);
        let got = match kernel_run(&mut dp, case.program, &case.frame, case.mark, case.gso_size) {
            Ok(r) if accepts => r,
            Ok(_) => fail!("the test runner ran a frame the model expects it to refuse"),
            Err(_) if !accepts => {
                refused += 1;
                continue;
            }
            Err(e) => fail!("BPF_PROG_TEST_RUN failed: {e}"),
        };
        let gso = case.gso_size != 0;
        let request = model.request_key(&case.frame, gso);
        let want = model.run(case.program, &case.frame, case.mark, gso);
        if got.ret != want.verdict {
            fail!("verdict {:#x}, model {:#x}", got.ret, want.verdict);
        }
        if got.out != want.out {
            fail!(
                "output differs ({}; model counter {})\n  kernel {}\n  model  {}",
                first_difference(&got.out, &want.out),
                want.counter.name(),
                hex(&got.out),
                hex(&want.out)
            );
        }
        if got.mark != want.mark {
            fail!("mark {:#x}, model {:#x}", got.mark, want.mark);
        }
        let rewritten = got.out != case.frame;
        if rewritten && case.checksums_valid {
            // The model's arithmetic checked against a checksum computed from scratch.
            verify_checksums(&want.out).unwrap_or_else(|e| fail!("rewritten frame: {e}"));
            verified_rewrites += 1;
        }
        if matches!(want.counter, CounterIndex::RewriteIngressV4 | CounterIndex::RewriteIngressV6) {
            let (key, external) = request.expect("a rewritten request has a flow key");
            // Remembered, unless the request was a TCP RST (which ends the flow).
            let remembered = model.flows.contains_key(&key);
            match dp.flow(&key).unwrap() {
                Some(flow) if remembered && flow.external_addr == external => {}
                None if !remembered => {}
                other => fail!("flow {key:?} after the rewrite: {other:?} (model: remembered {remembered})"),
            }
            if remembered {
                generator.known.push((key, external));
            }
        }
    }
    compare_state(&dp, &model, seed, total);
    let counters: BTreeMap<&str, u64> =
        model.counters.iter().zip(CounterIndex::ALL).map(|(c, i)| (i.name(), c.packets)).collect();
    eprintln!(
        "fuzz: {total} cases in {:.1?}: {refused} refused by the test runner as too short, {} flows, {verified_rewrites} \
         rewrites checked against recomputed checksums; outcomes {counters:?}",
        started.elapsed(),
        model.flows.len()
    );
    // The generator must keep reaching every outcome, or the comparison proves little.
    if total >= DEFAULT_CASES {
        // Every TC outcome the counters table lists (its failures are checked below).
        for index in CounterIndex::ALL.into_iter().filter(|i| i.kind() == CounterKind::Tc) {
            // Flows saturate (the generator's key space is small on purpose): at most 2,000.
            assert!(
                counters[index.name()] >= (total / 100).min(2_000),
                "seed {seed}: only {} of {}",
                counters[index.name()],
                index.name()
            );
        }
        assert!(verified_rewrites >= total / 50, "seed {seed}: only {verified_rewrites} verified rewrites");
        assert_eq!(counters["rewrite_failed"] + counters["flow_insert_failed"], 0);
    }
}
