//! The TC programs run by the kernel on crafted frames (BPF_PROG_TEST_RUN): hits, misses,
//! checksums, the reverse rewrite, the masquerade mark, and malformed frames. Needs root.
mod common;

use std::collections::{BTreeMap, BTreeSet};

use aya::programs::{TestRun as _, TestRunOptions};
use common::frames::{self, Spec, frame, verify_checksums};
use node_manager::{
    kernel::Datapath,
    model::{FrontendAddr, Protocol, Target},
};
use node_manager_common::{DatapathConfig, program_names};

const CONTINUE: u32 = u32::MAX; // TC_ACT_UNSPEC (-1) == TCX_NEXT
const POD4: &str = "192.0.2.10";
const POD6: &str = "2001:db8:1::10";
const EXT4: &str = "203.0.113.10";
const EXT6: &str = "2001:db8:e::10";
const CLUSTER4: &str = "198.51.100.10";
const CLUSTER6: &str = "2001:db8:5::10";
/// `struct __sk_buff` on Linux ≥ 5.16; `mark` is at offset 8.
const SKB_CTX_LEN: usize = 192;

struct Run {
    ret: u32,
    out: Vec<u8>,
    mark: u32,
}

fn datapath() -> Datapath {
    let mut dp = Datapath::load_unpinned().expect("load the eBPF object (run as root)");
    dp.pod_tc_loaded().unwrap_or_else(|why| panic!("the verifier refused the TC programs: {why}"));
    let mut fe = BTreeMap::new();
    for (ext, cluster) in [(EXT4, CLUSTER4), (EXT6, CLUSTER6)] {
        for (port, protocol) in [(8080, Protocol::Tcp), (8080, Protocol::Udp), (0, Protocol::IcmpEcho)] {
            fe.insert(
                FrontendAddr { addr: ext.parse().unwrap(), port, protocol },
                Target { cluster_ip: cluster.parse().unwrap(), owner: "lab/web".into() },
            );
        }
    }
    dp.sync_frontends(&fe).unwrap();
    let cidrs: BTreeSet<ipnet::IpNet> =
        ["192.0.2.0/25", "2001:db8:1::/64"].iter().map(|c| c.parse().unwrap()).collect();
    dp.sync_pod_cidrs(&cidrs).unwrap();
    dp.set_config(DatapathConfig { masquerade_mark: 0x4000 }).unwrap();
    dp
}

fn run(dp: &mut Datapath, program: &str, input: &[u8]) -> Run {
    try_run(dp, program, input).unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN on {} bytes: {e}", input.len()))
}

fn try_run(dp: &mut Datapath, program: &str, input: &[u8]) -> Result<Run, aya::programs::ProgramError> {
    try_run_gso(dp, program, input, 0)
}

/// `struct __sk_buff.gso_size`, which the test runner copies into the skb.
const SKB_GSO_SIZE_OFF: usize = 176;

/// [`try_run`] on an skb with `gso_size` set (non-zero: a GSO aggregate).
fn try_run_gso(
    dp: &mut Datapath,
    program: &str,
    input: &[u8],
    gso_size: u32,
) -> Result<Run, aya::programs::ProgramError> {
    let mut out = vec![0u8; input.len() + 256];
    let mut ctx_in = [0u8; SKB_CTX_LEN];
    ctx_in[SKB_GSO_SIZE_OFF..SKB_GSO_SIZE_OFF + 4].copy_from_slice(&gso_size.to_ne_bytes());
    let mut ctx_out = [0u8; SKB_CTX_LEN];
    let result = dp.program(program).unwrap().test_run(TestRunOptions {
        data_in: Some(input),
        data_out: Some(&mut out),
        ctx_in: Some(&ctx_in),
        ctx_out: Some(&mut ctx_out),
        ..Default::default()
    })?;
    out.truncate(result.data_size_out as usize);
    Ok(Run { ret: result.return_value, out, mark: u32::from_ne_bytes(ctx_out[8..12].try_into().unwrap()) })
}

fn ingress(dp: &mut Datapath, input: &[u8]) -> Run {
    run(dp, program_names::POD_INGRESS, input)
}

fn egress(dp: &mut Datapath, input: &[u8]) -> Run {
    run(dp, program_names::POD_EGRESS, input)
}

/// The frame the kernel should produce: same spec, new addresses, checksums recomputed.
fn expect(spec: &Spec, src: &str, dst: &str) -> Vec<u8> {
    frame(&Spec { src: src.parse().unwrap(), dst: dst.parse().unwrap(), ..spec.clone() })
}

fn assert_untouched(r: &Run, input: &[u8], what: &str) {
    assert_eq!(r.ret, CONTINUE, "{what}: must continue, not drop");
    assert_eq!(r.out, input, "{what}: must pass untouched");
    assert_eq!(r.mark, 0, "{what}: must not be marked");
}

#[test]
fn pod_to_frontend_is_rewritten_to_the_cluster_ip_with_valid_checksums_then_the_reply_back() {
    let mut dp = datapath();
    let cases = [
        (Spec::tcp(POD4, 40000, EXT4, 8080), EXT4, CLUSTER4),
        (Spec::udp(POD4, 40001, EXT4, 8080), EXT4, CLUSTER4),
        (Spec::echo(POD4, EXT4, 8, 0x1234), EXT4, CLUSTER4),
        (Spec::tcp(POD6, 40000, EXT6, 8080), EXT6, CLUSTER6),
        (Spec::udp(POD6, 40001, EXT6, 8080), EXT6, CLUSTER6),
        (Spec::echo(POD6, EXT6, 128, 0x1234), EXT6, CLUSTER6),
    ];
    for (spec, ext, cluster) in cases {
        let pod = spec.src.to_string();
        let what = format!("{}→{ext} proto {}", pod, spec.proto);
        let input = frame(&spec);
        let r = ingress(&mut dp, &input);
        assert_eq!(r.ret, CONTINUE, "{what}");
        assert_eq!(r.out, expect(&spec, &pod, cluster), "{what}: destination rewritten to the cluster IP");
        verify_checksums(&r.out).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(r.mark & 0x4000, 0x4000, "{what}: masquerade mark set");

        // The reply from the cluster IP gets the external address back as its source.
        let reply = match spec.proto {
            frames::TCP | frames::UDP => Spec {
                src: cluster.parse().unwrap(),
                dst: spec.src,
                sport: spec.dport,
                dport: spec.sport,
                ..spec.clone()
            },
            _ => Spec {
                src: cluster.parse().unwrap(),
                dst: spec.src,
                icmp: (if spec.proto == frames::ICMP { 0 } else { 129 }, 0, spec.icmp.2),
                ..spec.clone()
            },
        };
        let r = egress(&mut dp, &frame(&reply));
        assert_eq!(r.ret, CONTINUE, "{what} reply");
        assert_eq!(r.out, expect(&reply, ext, &pod), "{what}: reply source restored to the external IP");
        verify_checksums(&r.out).unwrap_or_else(|e| panic!("{what} reply: {e}"));
    }
    let counters: BTreeMap<_, _> = dp.counters().unwrap().into_iter().collect();
    assert_eq!(counters["rewrite_ingress_v4"].packets, 3);
    assert_eq!(counters["rewrite_ingress_v6"].packets, 3);
    assert_eq!(counters["rewrite_egress_v4"].packets, 3);
    assert_eq!(counters["rewrite_egress_v6"].packets, 3);
    assert_eq!(dp.flow_count().unwrap(), 6);
}

#[test]
fn udp_without_checksum_stays_without_checksum() {
    let mut dp = datapath();
    let mut input = frame(&Spec::udp(POD4, 40002, EXT4, 8080));
    input[14 + 20 + 6..14 + 20 + 8].copy_from_slice(&[0, 0]);
    let r = ingress(&mut dp, &input);
    assert_eq!(&r.out[30..34], &[198, 51, 100, 10]);
    assert_eq!(&r.out[40..42], &[0, 0], "a zero UDP checksum means none and must stay zero");
}

#[test]
fn masquerade_mark_zero_leaves_the_mark_alone() {
    let mut dp = datapath();
    dp.set_config(DatapathConfig { masquerade_mark: 0 }).unwrap();
    let r = ingress(&mut dp, &frame(&Spec::tcp(POD4, 40003, EXT4, 8080)));
    assert_eq!(&r.out[30..34], &[198, 51, 100, 10]);
    assert_eq!(r.mark, 0);
}

#[test]
fn misses_pass_untouched() {
    let mut dp = datapath();
    let cases = [
        ("wrong port", Spec::tcp(POD4, 40000, EXT4, 8081)),
        ("wrong port v6", Spec::udp(POD6, 40000, EXT6, 9999)),
        ("unknown address", Spec::tcp(POD4, 40000, "203.0.113.99", 8080)),
        ("cluster IP itself", Spec::tcp(POD4, 40000, CLUSTER4, 8080)),
        ("source outside the pod CIDR", Spec::tcp("192.0.2.200", 40000, EXT4, 8080)),
        ("source outside the pod CIDR v6", Spec::tcp("2001:db8:2::10", 40000, EXT6, 8080)),
        ("ICMP echo reply from a pod", Spec::echo(POD4, EXT4, 0, 1)),
        ("ICMP destination unreachable", Spec::echo(POD4, EXT4, 3, 1)),
        ("ICMPv6 echo reply from a pod", Spec::echo(POD6, EXT6, 129, 1)),
        // IPv4 entries are stored IPv4-mapped; an IPv6 packet with such addresses must not
        // match them (found by tests/fuzz.rs).
        ("IPv6 with IPv4-mapped addresses", Spec::tcp("::ffff:192.0.2.10", 40000, "::ffff:203.0.113.10", 8080)),
        ("IPv6 with an IPv4-mapped source", Spec::tcp("::ffff:192.0.2.10", 40000, EXT6, 8080)),
    ];
    for (what, spec) in cases {
        let input = frame(&spec);
        assert_untouched(&ingress(&mut dp, &input), &input, what);
    }
    // Wrong protocol on a known address and port: SCTP (132) is not a frontend.
    let mut sctp = frame(&Spec::tcp(POD4, 40000, EXT4, 8080));
    sctp[23] = 132;
    assert_untouched(&ingress(&mut dp, &sctp), &sctp, "SCTP to a TCP frontend");
    // Egress: a packet of no remembered flow.
    let stray = frame(&Spec::tcp(CLUSTER4, 8080, POD4, 45555));
    assert_untouched(&egress(&mut dp, &stray), &stray, "egress without a flow");
}

#[test]
fn malformed_fragmented_and_unusual_frames_pass_untouched() {
    let mut dp = datapath();
    let good4 = frame(&Spec::tcp(POD4, 40000, EXT4, 8080));
    let good6 = frame(&Spec::udp(POD6, 40000, EXT6, 8080));
    let mut cases: Vec<(String, Vec<u8>)> = Vec::new();
    // Truncated at every length: headers cut short, or IP length beyond the frame.
    for len in 0..good4.len() {
        cases.push((format!("IPv4 truncated to {len}"), good4[..len].to_vec()));
    }
    for len in 0..good6.len() {
        cases.push((format!("IPv6 truncated to {len}"), good6[..len].to_vec()));
    }
    // A later fragment of a datagram whose first fragment was never seen (fragments are
    // otherwise translated: `fragments_are_translated_by_the_first_fragments_memory`).
    let mut later_fragment = good4.clone();
    later_fragment[18..20].copy_from_slice(&0x7777u16.to_be_bytes()); // an ID no first had
    later_fragment[21] = 0x10; // offset
    frames::fix_ipv4_csum(&mut later_fragment);
    cases.push(("IPv4 later fragment without its first".into(), later_fragment));
    let mut options = good4.clone();
    options[14] = 0x46; // IHL 6: one word of options
    cases.push(("IPv4 with options".into(), options));
    let mut ext_header = good6.clone();
    ext_header[14 + 6] = 0; // hop-by-hop options header
    cases.push(("IPv6 extension header".into(), ext_header));
    let mut vlan = good4[..12].to_vec();
    vlan.extend_from_slice(&[0x81, 0x00, 0x00, 0x05]);
    vlan.extend_from_slice(&good4[12..]);
    cases.push(("802.1Q VLAN-tagged".into(), vlan));
    let mut arp = frames::eth(0x0806);
    arp.extend_from_slice(&[0u8; 28]);
    cases.push(("ARP".into(), arp));
    let mut short_tcp = good4.clone();
    short_tcp[16..18].copy_from_slice(&(20u16 + 10).to_be_bytes()); // IP length leaves 10 bytes of TCP
    cases.push(("IPv4 length shorter than a TCP header".into(), short_tcp));
    let mut wrong_version = good4.clone();
    wrong_version[14] = 0x65;
    cases.push(("IPv4 ethertype with version 6".into(), wrong_version));

    let mut ran = 0;
    for (what, input) in &cases {
        for program in [program_names::POD_INGRESS, program_names::POD_EGRESS] {
            match try_run(&mut dp, program, input) {
                Ok(r) => {
                    assert_untouched(&r, input, &format!("{what} ({program})"));
                    ran += 1;
                }
                // The kernel's test runner refuses frames too short to hold the headers it
                // parses itself (EINVAL) — such a frame never reaches a TC program. Anything
                // holding the Ethernet and the IP header must run.
                Err(_) if input.len() < min_kernel_len(input) => {}
                Err(e) => panic!("{what}: BPF_PROG_TEST_RUN failed: {e}"),
            }
        }
    }
    assert!(ran >= 2 * (cases.len() - 34 - 54), "only {ran} of {} runs happened", 2 * cases.len());
    let counters: BTreeMap<_, _> = dp.counters().unwrap().into_iter().collect();
    assert_eq!(counters["rewrite_ingress_v4"].packets + counters["rewrite_ingress_v6"].packets, 0);
    assert!(counters["pass_unparsed"].packets > 0 && counters["pass_not_ip"].packets > 0);
}

/// An ICMP error about a rewritten flow reaches the pod's veth quoting the packet as conntrack
/// gave it back: pod → cluster IP. It is translated to quote the external address the pod's
/// socket is connected to (inner IPv4 header checksum and inner L4 checksum updated, the
/// error's checksum made to match): the quote becomes byte for byte what the pod sent. From the
/// Service side (source the cluster IP) the error's source becomes the external address too;
/// from a hop on the way it keeps its own. Quotes cut after 8 bytes of L4 header (the minimum
/// an IPv4 router sends: no TCP checksum) too. Also under CHECKSUM_COMPLETE (skb->csum checked
/// by the runner where it can). Errors about other packets pass untouched.
#[test]
fn icmp_errors_about_a_rewritten_flow_quote_the_external_address() {
    let mut dp = datapath();
    let mut translated = 0;
    for (pod, ext, cluster, hop) in [(POD4, EXT4, CLUSTER4, "192.0.2.129"), (POD6, EXT6, CLUSTER6, "2001:db8:2::1")] {
        let v6 = pod.contains(':');
        let ip_len = if v6 { 40 } else { 20 };
        let (echo_request, errors): (u8, &[(u8, u8)]) = if v6 {
            // Destination unreachable (port), packet too big, time exceeded, parameter problem.
            (128, &[(1, 4), (2, 0), (3, 0), (4, 0)])
        } else {
            // Port unreachable, fragmentation needed, time exceeded, parameter problem.
            (8, &[(3, 3), (3, 4), (11, 0), (12, 0)])
        };
        let requests = [
            Spec::tcp(pod, 40100, ext, 8080),
            Spec { payload: vec![0x5a; 300], ..Spec::udp(pod, 40101, ext, 8080) },
            Spec::echo(pod, ext, echo_request, 0x4242),
        ];
        for request in &requests {
            let sent = frame(request);
            let rewritten = ingress(&mut dp, &sent).out;
            assert_ne!(rewritten, sent, "{request:?} must be rewritten first");
            for &(ty, code) in errors {
                for quoted_l4 in [None, Some(8)] {
                    let cut = |f: &[u8]| match quoted_l4 {
                        Some(n) => f[14..14 + ip_len + n].to_vec(),
                        None => f[14..].to_vec(),
                    };
                    for source in [hop, cluster] {
                        let what = format!(
                            "ICMP {ty}/{code} from {source} about {}→{ext} proto {} (quote: {})",
                            request.src,
                            request.proto,
                            quoted_l4.map_or("whole".to_owned(), |n| format!("{n} bytes of L4"))
                        );
                        let error =
                            Spec { payload: cut(&rewritten), icmp: (ty, code, 0), ..Spec::echo(source, pod, 0, 0) };
                        let want_source = if source == cluster { ext } else { source };
                        let want =
                            frame(&Spec { src: want_source.parse().unwrap(), payload: cut(&sent), ..error.clone() });
                        let input = frame(&error);
                        let r = egress(&mut dp, &input);
                        assert_eq!(r.ret, CONTINUE, "{what}");
                        assert_eq!(r.out, want, "{what}: the quote must be what the pod sent");
                        verify_checksums(&r.out).unwrap_or_else(|e| panic!("{what}: {e}"));
                        assert_eq!(r.mark, 0, "{what}: not marked");
                        translated += 1 + u64::from(assert_skb_csum_kept(&mut dp, &input, &want, &what));
                    }
                }
            }
            // The same error about another pod port (ICMP echo: identifier): no flow, untouched.
            let mut quote = rewritten[14..].to_vec();
            quote[ip_len + if request.proto == frames::TCP || request.proto == frames::UDP { 0 } else { 4 }] ^= 0x80;
            let input =
                frame(&Spec { payload: quote, icmp: (errors[0].0, errors[0].1, 0), ..Spec::echo(hop, pod, 0, 0) });
            assert_untouched(&egress(&mut dp, &input), &input, &format!("an error about no flow ({request:?})"));
        }
    }
    let counters: BTreeMap<_, _> = dp.counters().unwrap().into_iter().collect();
    assert_eq!(counters["icmp_error_translated"].packets, translated, "every translated error counted");
}

/// Runs `input` through the egress program with BPF_F_TEST_SKB_CHECKSUM_COMPLETE (the runner
/// fails with EBADMSG when skb->csum no longer matches the packet); skipped where the runner
/// lacks the flag. Whether it ran.
fn assert_skb_csum_kept(dp: &mut Datapath, input: &[u8], want: &[u8], what: &str) -> bool {
    use std::os::fd::AsFd as _;

    use node_manager::kernel::sys;
    let fd = dp.program(program_names::POD_EGRESS).unwrap().fd().unwrap().as_fd().try_clone_to_owned().unwrap();
    let mut out = vec![0u8; input.len() + 256];
    match sys::prog_test_run_with(
        fd.as_fd(),
        input,
        Some(&mut out),
        &[0u8; SKB_CTX_LEN],
        sys::BPF_F_TEST_SKB_CHECKSUM_COMPLETE,
    ) {
        Ok((ret, len)) => {
            assert_eq!(ret, CONTINUE, "{what} (CHECKSUM_COMPLETE)");
            assert_eq!(out[..len], want[..], "{what} (CHECKSUM_COMPLETE)");
            true
        }
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) && !test_runner_knows_checksum_complete(&fd) => false,
        Err(e) => panic!("{what}: skb->csum after the translation: {e}"),
    }
}

#[test]
fn frontend_removal_by_diff_stops_the_rewrite() {
    let mut dp = datapath();
    let input = frame(&Spec::tcp(POD4, 40000, EXT4, 8080));
    assert_ne!(ingress(&mut dp, &input).out, input);
    let stats = dp.sync_frontends(&BTreeMap::new()).unwrap();
    assert_eq!(stats.stats.removed, 6);
    assert_untouched(&ingress(&mut dp, &input), &input, "after the frontend was removed");
}

/// The agent's event path: `Model::update` names the frontends one Service change touched,
/// and `sync_frontend_changes` writes those and nothing else (an entry removed behind the
/// agent's back stays removed until the full resync, which reads the map and repairs it).
#[test]
fn a_service_change_writes_only_its_frontends_and_the_full_sync_repairs_the_rest() {
    use std::sync::Arc;

    use node_manager::model::{Model, Options, ServiceInfo};
    let svc = |name: &str, ext: &str, cluster: &str, port: i32| {
        Arc::new(ServiceInfo {
            name: name.into(),
            cluster_ips: vec![cluster.into()],
            ingress_ips: vec![ext.into()],
            ports: vec![(port, None)],
            ..ServiceInfo::default()
        })
    };
    let mut dp = Datapath::load_unpinned().expect("load the eBPF object (run as root)");
    dp.sync_pod_cidrs(&["192.0.2.0/25".parse().unwrap()].into()).unwrap();
    let web = svc("lab/web", EXT4, CLUSTER4, 8080);
    let other = svc("lab/other", "203.0.113.11", "198.51.100.11", 80);
    let mut model = Model::new(Options::all());
    model.rebuild(&[web.clone(), other.clone()]);
    dp.sync_frontends(model.frontends()).unwrap();
    assert_eq!(model.frontends().len(), 4, "a port and an echo entry each");

    // Behind the agent's back: web's echo entry goes.
    let fd = dp.map_fd(node_manager_common::map_names::FRONTENDS).unwrap();
    let mut map: aya::maps::HashMap<_, node_manager_common::FrontendKey, node_manager_common::Frontend> =
        aya::maps::HashMap::try_from(aya::maps::Map::HashMap(aya::maps::MapData::from_fd(fd).unwrap())).unwrap();
    let echo = node_manager::kernel::maps::frontend_key(&FrontendAddr {
        addr: EXT4.parse().unwrap(),
        port: 0,
        protocol: Protocol::IcmpEcho,
    });
    map.remove(&echo).unwrap();

    // other moves to another address: its two old entries go, two new ones come.
    let moved = svc("lab/other", "203.0.113.12", "198.51.100.11", 80);
    let update = model.update(&[web.clone(), moved.clone()]);
    assert_eq!(update.changed.len(), 4, "{update:?}");
    let synced = dp.sync_frontend_changes(&update.changed, model.frontends()).unwrap();
    assert_eq!((synced.stats.added, synced.stats.removed, synced.stats.changed), (2, 2, 0));
    let to_new = frame(&Spec::tcp(POD4, 40000, "203.0.113.12", 80));
    assert_eq!(
        ingress(&mut dp, &to_new).out,
        expect(&Spec::tcp(POD4, 40000, "203.0.113.12", 80), POD4, "198.51.100.11")
    );
    let to_old = frame(&Spec::tcp(POD4, 40000, "203.0.113.11", 80));
    assert_untouched(&ingress(&mut dp, &to_old), &to_old, "the moved Service's old address");
    assert!(map.get(&echo, 0).is_err(), "the event path wrote an entry it was not told about");

    // The full resync reads the map and puts web's echo entry back.
    let repaired = dp.sync_frontends(model.frontends()).unwrap();
    assert_eq!((repaired.stats.added, repaired.stats.unchanged), (1, 3));
    assert!(map.get(&echo, 0).is_ok());
}

/// The owner entries follow the frontend's winner through the event path (the agent remembers
/// them as digests, not bytes), and a full sync repairs one changed behind the agent's back.
#[test]
fn owner_entries_follow_the_winner_and_the_full_sync_repairs_a_changed_one() {
    use std::sync::Arc;

    use node_manager::model::{Model, Options, ServiceInfo};
    use node_manager_common::{FrontendKey, Owner, map_names};
    let svc = |name: &str, cluster: &str| {
        Arc::new(ServiceInfo {
            name: name.into(),
            cluster_ips: vec![cluster.into()],
            ingress_ips: vec![EXT4.into()],
            ports: vec![(8080, None)],
            ..ServiceInfo::default()
        })
    };
    let mut dp = Datapath::load_unpinned().expect("load the eBPF object (run as root)");
    dp.sync_pod_cidrs(&["192.0.2.0/25".parse().unwrap()].into()).unwrap();
    let fd = dp.map_fd(map_names::OWNERS).unwrap();
    let mut owners: aya::maps::HashMap<_, FrontendKey, Owner> =
        aya::maps::HashMap::try_from(aya::maps::Map::HashMap(aya::maps::MapData::from_fd(fd).unwrap())).unwrap();
    let key = node_manager::kernel::maps::frontend_key(&FrontendAddr {
        addr: EXT4.parse().unwrap(),
        port: 8080,
        protocol: Protocol::Tcp,
    });
    let owner_of = |owners: &aya::maps::HashMap<_, FrontendKey, Owner>| {
        owners.get(&key, 0).map(|o| o.as_str().unwrap_or("<not UTF-8>").to_owned()).ok()
    };

    let web = svc("lab/web", CLUSTER4);
    let mut model = Model::new(Options::all());
    model.rebuild(std::slice::from_ref(&web));
    dp.sync_frontends(model.frontends()).unwrap();
    assert_eq!(owner_of(&owners).as_deref(), Some("lab/web"));

    // A Service whose name sorts first claims the same frontend: it wins, both entries change.
    let first = svc("lab/a-web", "198.51.100.20");
    let update = model.update(&[web.clone(), first.clone()]);
    let synced = dp.sync_frontend_changes(&update.changed, model.frontends()).unwrap();
    assert_eq!(synced.stats.changed, 2, "the port and the echo entry: {synced:?}");
    assert_eq!(owner_of(&owners).as_deref(), Some("lab/a-web"));
    let to_ext = frame(&Spec::tcp(POD4, 40000, EXT4, 8080));
    assert_eq!(ingress(&mut dp, &to_ext).out, expect(&Spec::tcp(POD4, 40000, EXT4, 8080), POD4, "198.51.100.20"));

    // It goes again: the owner entry returns to the runner-up.
    let update = model.update(std::slice::from_ref(&web));
    dp.sync_frontend_changes(&update.changed, model.frontends()).unwrap();
    assert_eq!(owner_of(&owners).as_deref(), Some("lab/web"));

    // Behind the agent's back the owner entry changes; the full sync reads it and writes it back.
    owners.insert(key, Owner::new("someone/else"), 0).unwrap();
    dp.sync_frontends(model.frontends()).unwrap();
    assert_eq!(owner_of(&owners).as_deref(), Some("lab/web"));
}

/// The programs tell a pod's packet by its source: up to `POD_NETS_INLINE` CIDRs by a loop over
/// `NM_POD_NETS`, more by the `NM_POD_CIDRS` trie; both ways give the same answer, at every
/// prefix length, in both families, and follow a change of the CIDRs.
#[test]
fn pod_sources_are_told_by_the_loop_and_by_the_trie_alike() {
    use node_manager_common::{POD_NETS_INLINE, POD_NETS_USE_TRIE, PodNets, map_names};
    let mut dp = datapath();
    let fd = dp.map_fd(map_names::POD_NETS).unwrap();
    let nets: aya::maps::Array<_, PodNets> =
        aya::maps::Array::try_from(aya::maps::Map::Array(aya::maps::MapData::from_fd(fd).unwrap())).unwrap();
    let rewritten = |dp: &mut Datapath, src: &str| {
        let (ext, cluster) = if src.contains(':') { (EXT6, CLUSTER6) } else { (EXT4, CLUSTER4) };
        let spec = Spec::tcp(src, 40000, ext, 8080);
        let r = ingress(dp, &frame(&spec));
        if r.out == expect(&spec, src, cluster) {
            true
        } else {
            assert_untouched(&r, &frame(&spec), &format!("from {src}"));
            false
        }
    };
    // Sources and whether they are pods' under `few` (the /25, a /32, the IPv6 /64, a /0 of
    // nothing else).
    let few: BTreeSet<ipnet::IpNet> =
        ["192.0.2.0/25", "192.0.2.200/32", "2001:db8:1::/64"].iter().map(|c| c.parse().unwrap()).collect();
    let cases = [
        (POD4, true),
        ("192.0.2.127", true),
        ("192.0.2.128", false),
        ("192.0.2.200", true),
        ("192.0.2.201", false),
        ("198.51.100.7", false),
        (POD6, true),
        ("2001:db8:1:0:ffff:ffff:ffff:ffff", true),
        ("2001:db8:2::10", false),
        // The IPv4-mapped form of a pod's address, sent as IPv6, is not that pod.
        ("::ffff:192.0.2.10", false),
    ];
    // The same CIDRs plus enough others that the loop's form cannot hold them.
    let mut many = few.clone();
    for i in 0..POD_NETS_INLINE {
        many.insert(format!("2001:db8:10{i}::/48").parse().unwrap());
    }
    for (cidrs, inline) in [(&few, true), (&many, false), (&few, true)] {
        dp.sync_pod_cidrs(cidrs).unwrap();
        let count = nets.get(&0, 0).unwrap().count;
        assert_eq!(count == POD_NETS_USE_TRIE, !inline, "{} CIDRs: count {count}", cidrs.len());
        for (src, pod) in cases {
            assert_eq!(rewritten(&mut dp, src), pod, "{src} with {} CIDRs", cidrs.len());
        }
    }
    // Every IPv4 address is a pod's under 0.0.0.0/0, no IPv6 one; no CIDR: nothing is.
    dp.sync_pod_cidrs(&["0.0.0.0/0".parse().unwrap()].into()).unwrap();
    assert!(rewritten(&mut dp, "198.51.100.7") && !rewritten(&mut dp, POD6));
    dp.sync_pod_cidrs(&BTreeSet::new()).unwrap();
    assert!(!rewritten(&mut dp, POD4) && !rewritten(&mut dp, POD6));
}

/// Shortest frame BPF_PROG_TEST_RUN accepts: Ethernet plus the IP header of its ethertype.
fn min_kernel_len(frame: &[u8]) -> usize {
    match frame.get(12..14) {
        Some([0x08, 0x00]) => 14 + 20,
        Some([0x86, 0xdd]) => 14 + 40,
        _ => 15,
    }
}

/// Under CHECKSUM_COMPLETE (what a NIC that sums whole packets hands the stack) skb->csum must
/// still match the packet after a rewrite, or the stack reports "hw csum failure" and checks the
/// packet in software. The kernel's test runner seeds skb->csum from the input and fails the run
/// with EBADMSG when the program leaves it wrong (BPF_F_TEST_SKB_CHECKSUM_COMPLETE, Linux ≥ 6.11).
/// IPv6 is the case that needs care: without BPF_F_IPV6 (or `bpf_csum_update` where the kernel
/// lacks the flag) its rewrites failed here.
#[test]
fn rewrites_keep_skb_csum_right_under_checksum_complete() {
    use std::os::fd::AsFd as _;

    use node_manager::kernel::sys;
    let mut dp = datapath();
    let cases = [
        Spec::tcp(POD4, 41000, EXT4, 8080),
        Spec::udp(POD4, 41001, EXT4, 8080),
        Spec::echo(POD4, EXT4, 8, 0x4321),
        Spec::tcp(POD6, 41000, EXT6, 8080),
        Spec::udp(POD6, 41001, EXT6, 8080),
        Spec::echo(POD6, EXT6, 128, 0x4321),
    ];
    let ctx = [0u8; SKB_CTX_LEN];
    for spec in cases {
        let what = format!("{}→{} proto {}", spec.src, spec.dst, spec.proto);
        let reply = match spec.proto {
            frames::TCP | frames::UDP => {
                Spec { src: spec.dst, dst: spec.src, sport: spec.dport, dport: spec.sport, ..spec.clone() }
            }
            _ => Spec {
                src: spec.dst,
                dst: spec.src,
                icmp: (if spec.proto == frames::ICMP { 0 } else { 129 }, 0, spec.icmp.2),
                ..spec.clone()
            },
        };
        let cluster = if spec.src.is_ipv4() { CLUSTER4 } else { CLUSTER6 };
        let reply = Spec { src: cluster.parse().unwrap(), ..reply };
        for (program, input) in [(program_names::POD_INGRESS, frame(&spec)), (program_names::POD_EGRESS, frame(&reply))]
        {
            let fd = dp.program(program).unwrap().fd().unwrap().as_fd().try_clone_to_owned().unwrap();
            let mut out = vec![0u8; input.len() + 256];
            let (ret, len) = match sys::prog_test_run_with(
                fd.as_fd(),
                &input,
                Some(&mut out),
                &ctx,
                sys::BPF_F_TEST_SKB_CHECKSUM_COMPLETE,
            ) {
                Ok(run) => run,
                // Older test runners (the 5.10 guest's) refuse the flag: nothing to check there.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) && !test_runner_knows_checksum_complete(&fd) => {
                    eprintln!(
                        "skipped: this kernel's BPF_PROG_TEST_RUN has no BPF_F_TEST_SKB_CHECKSUM_COMPLETE (Linux ≥ 6.11)"
                    );
                    return;
                }
                Err(e) => panic!("{what} ({program}): skb->csum after the rewrite: {e}"),
            };
            assert_eq!(ret, CONTINUE, "{what} ({program})");
            assert_ne!(out[..len], input[..], "{what} ({program}): the frame must have been rewritten");
            verify_checksums(&out[..len]).unwrap_or_else(|e| panic!("{what} ({program}): {e}"));
        }
    }
}

/// Whether the kernel's test runner takes BPF_F_TEST_SKB_CHECKSUM_COMPLETE: a frame the program
/// passes untouched (ARP) runs with it.
fn test_runner_knows_checksum_complete(prog: &std::os::fd::OwnedFd) -> bool {
    use std::os::fd::AsFd as _;
    let mut arp = frames::eth(0x0806);
    arp.extend_from_slice(&[0u8; 28]);
    node_manager::kernel::sys::prog_test_run_with(
        prog.as_fd(),
        &arp,
        None,
        &[0u8; SKB_CTX_LEN],
        node_manager::kernel::sys::BPF_F_TEST_SKB_CHECKSUM_COMPLETE,
    )
    .is_ok()
}

/// BIG TCP aggregates (GSO skbs over 64 KiB: IP length 0, on IPv6 perhaps a Jumbo Payload
/// hop-by-hop header) are rewritten like any other TCP packet of the flow, in both directions;
/// the same shapes without GSO are malformed and pass untouched.
#[test]
fn big_tcp_aggregates_are_rewritten_and_zero_lengths_without_gso_are_not() {
    let mut dp = datapath();
    for (spec, ext, cluster) in
        [(Spec::tcp(POD4, 42000, EXT4, 8080), EXT4, CLUSTER4), (Spec::tcp(POD6, 42000, EXT6, 8080), EXT6, CLUSTER6)]
    {
        let pod = spec.src.to_string();
        let reply = reply_from(&spec, cluster);
        let jumbo_forms: &[bool] = if spec.src.is_ipv4() { &[false] } else { &[false, true] };
        for &jumbo in jumbo_forms {
            let what = format!("{pod}→{ext} BIG TCP{}", if jumbo { " with a Jumbo Payload header" } else { "" });
            let big = |mut f: Vec<u8>| {
                frames::big_tcp(&mut f, jumbo);
                f
            };
            let input = big(frame(&spec));
            let r = run_gso(&mut dp, program_names::POD_INGRESS, &input, 1448);
            assert_eq!(r.out, big(expect(&spec, &pod, cluster)), "{what}: destination rewritten");
            assert_eq!(r.mark & 0x4000, 0x4000, "{what}: masquerade mark set");
            let r = run_gso(&mut dp, program_names::POD_EGRESS, &big(frame(&reply)), 1448);
            assert_eq!(r.out, big(expect(&reply, ext, &pod)), "{what}: reply source restored");
            // Not a GSO skb: a zero length is malformed.
            let r = run_gso(&mut dp, program_names::POD_INGRESS, &input, 0);
            assert_untouched(&r, &input, &format!("{what} without GSO"));
        }
    }
}

fn run_gso(dp: &mut Datapath, program: &str, input: &[u8], gso_size: u32) -> Run {
    try_run_gso(dp, program, input, gso_size)
        .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN with gso_size {gso_size}: {e}"))
}

/// The first fragment of a datagram to a frontend is rewritten as any packet; later fragments
/// of the same datagram (same source, destination, ID and protocol) get the same address,
/// with only the IPv4 header checksum to update; the reply's fragments likewise. A later
/// fragment of another datagram passes untouched and counts as `frag_unmatched`.
#[test]
fn fragments_are_translated_by_the_first_fragments_memory() {
    let mut dp = datapath();
    for (spec, ext, cluster) in
        [(Spec::udp(POD4, 43000, EXT4, 8080), EXT4, CLUSTER4), (Spec::udp(POD6, 43000, EXT6, 8080), EXT6, CLUSTER6)]
    {
        let pod = spec.src.to_string();
        let v6 = spec.src.is_ipv6();
        let reply = reply_from(&spec, cluster);
        for (program, request, from, to, which) in [
            (program_names::POD_INGRESS, &spec, ext, cluster, "destination"),
            (program_names::POD_EGRESS, &reply, cluster, ext, "source"),
        ] {
            let what = format!("{} fragments ({program})", if v6 { "IPv6" } else { "IPv4" });
            let (first, later) = fragment_pair(&frame(request), v6, 0x5151);
            let (want_first, want_later) = {
                let rewritten = match which {
                    "destination" => expect(request, &pod, to),
                    _ => expect(request, to, &pod),
                };
                fragment_pair(&rewritten, v6, 0x5151)
            };
            let r = run(&mut dp, program, &first);
            assert_eq!(r.out, want_first, "{what}: the first fragment's {which} rewritten");
            let r = run(&mut dp, program, &later);
            assert_eq!(r.out, want_later, "{what}: the later fragment's {which} rewritten, {from} → {to}");
            if program == program_names::POD_INGRESS {
                assert_eq!(r.mark & 0x4000, 0x4000, "{what}: the later fragment is marked as the first was");
            }
            // Another datagram's later fragment: untouched.
            let (_, stray) = fragment_pair(&frame(request), v6, 0x5152);
            assert_untouched(&run(&mut dp, program, &stray), &stray, &format!("{what}: a stray later fragment"));
        }
    }
    let counters: BTreeMap<_, _> = dp.counters().unwrap().into_iter().collect();
    assert_eq!(counters["frag_translated"].packets, 8, "first and later fragments, both ways, both families");
    assert_eq!(counters["frag_unmatched"].packets, 2, "the stray later fragments to the external address");
}

/// A whole frame's first fragment (MF; IPv6: a Fragment header with offset 0 and M) and a later
/// fragment of the same datagram (offset 16 bytes, last; 24 bytes of data), with ID `id`.
fn fragment_pair(whole: &[u8], v6: bool, id: u32) -> (Vec<u8>, Vec<u8>) {
    let mut first = whole.to_vec();
    let mut later = whole[..14].to_vec();
    let data = [0xabu8; 24];
    if v6 {
        let next = first[20];
        let idb = id.to_be_bytes();
        first.splice(54..54, [next, 0, 0, 1, idb[0], idb[1], idb[2], idb[3]]);
        first[20] = 44;
        let len = u16::from_be_bytes([first[18], first[19]]) + 8;
        first[18..20].copy_from_slice(&len.to_be_bytes());
        later.extend_from_slice(&first[14..54]);
        later[18..20].copy_from_slice(&((8 + data.len()) as u16).to_be_bytes());
        later.extend_from_slice(&[next, 0, 0, 2 << 3, idb[0], idb[1], idb[2], idb[3]]);
    } else {
        first[18..20].copy_from_slice(&(id as u16).to_be_bytes());
        first[20] |= 0x20; // MF
        frames::fix_ipv4_csum(&mut first);
        later.extend_from_slice(&first[14..34]);
        later[20..22].copy_from_slice(&2u16.to_be_bytes()); // offset 2 × 8 bytes, last
        later[16..18].copy_from_slice(&((20 + data.len()) as u16).to_be_bytes());
        frames::fix_ipv4_csum(&mut later);
    }
    later.extend_from_slice(&data);
    (first, later)
}

/// The TCP or UDP reply to `spec` from `src` (the ports swapped).
fn reply_from(spec: &Spec, src: &str) -> Spec {
    Spec { src: src.parse().unwrap(), dst: spec.src, sport: spec.dport, dport: spec.sport, ..spec.clone() }
}
