//! Operating the agent: restarts, upgrades and a layout migration under live traffic, cleanup
//! checked with the kernel's own tools, BTF-typed maps in bpftool, metrics and health, and
//! clear errors for a missing bpffs or capability. Runs the real agent binary in the lab's node
//! namespace. Needs root.
mod common;

use std::{
    collections::BTreeSet,
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use common::agent::{Agent, BIN, Scratch, lab_agent_args, lab_service_yaml, tcx_programs, wait_for, write};
use lab::{Lab, Ns, in_netns};

/// A port only this test's streams use (the lab's kube-proxy rules cover 8080; the test adds
/// DNAT for this one).
const STREAM_PORT: u16 = 9000;
const T: Duration = Duration::from_secs(2);

fn base_args(services: &Path) -> Vec<String> {
    lab_agent_args(services.to_str().unwrap()).into_iter().map(str::to_owned).collect()
}

fn start(scratch: &Scratch, bin: &Path, args: &[String], log_name: &str) -> Agent {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Agent::start_bin(scratch, bin, &args, log_name)
}

/// The Service with the lab's port 8080 plus the stream port, and DNAT for the stream port.
fn stream_service(lab: &Lab, services: &Path) {
    let yaml = lab_service_yaml("web").replace(
        "  - {name: udp, port: 8080, protocol: UDP}",
        &format!(
            "  - {{name: udp, port: 8080, protocol: UDP}}\n  - {{name: stcp, port: {STREAM_PORT}, protocol: TCP}}\n  - {{name: sudp, port: {STREAM_PORT}, protocol: UDP}}"
        ),
    );
    write(services, &yaml);
    let rules = format!(
        "add rule inet {t} services ip daddr {c4} meta l4proto {{ tcp, udp }} th dport {p} dnat ip to {e4}:{p}\n\
         add rule inet {t} services ip6 daddr {c6} meta l4proto {{ tcp, udp }} th dport {p} dnat ip6 to [{e6}]:{p}\n",
        t = lab::NFT_TABLE,
        c4 = lab::CLUSTER_V4,
        c6 = lab::CLUSTER_V6,
        e4 = lab::ENDPOINT_V4,
        e6 = lab::ENDPOINT_V6,
        p = STREAM_PORT,
    );
    let mut nft = lab.command(Ns::Node, "nft").args(["-f", "-"]).stdin(std::process::Stdio::piped()).spawn().unwrap();
    nft.stdin.take().unwrap().write_all(rules.as_bytes()).unwrap();
    assert!(nft.wait().unwrap().success(), "adding the stream port's DNAT");
}

/// Echo servers for the streams in the endpoint namespace: TCP echoes every byte back on the
/// same connection, UDP every datagram.
struct StreamServers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl StreamServers {
    fn start(lab: &Lab) -> StreamServers {
        let (tcp, udp4, udp6) = in_netns(lab.netns_path(Ns::Ep), || {
            Ok((
                TcpListener::bind((lab::ENDPOINT_V4, STREAM_PORT))?,
                UdpSocket::bind((lab::ENDPOINT_V4, STREAM_PORT))?,
                UdpSocket::bind((lab::ENDPOINT_V6, STREAM_PORT))?,
            ))
        })
        .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let s = stop.clone();
        threads.push(std::thread::spawn(move || lab::echo::tcp_echo_server(tcp, &s)));
        for socket in [udp4, udp6] {
            let s = stop.clone();
            threads.push(std::thread::spawn(move || lab::echo::udp_echo_server(socket, &s)));
        }
        StreamServers { stop, threads }
    }
}

impl Drop for StreamServers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// What a stream saw.
#[derive(Debug, Default)]
struct StreamReport {
    sent: u64,
    received: u64,
    /// The first error (TCP: any; UDP: none possible but a wrong echo).
    error: Option<String>,
}

/// A TCP connection and UDP flows (IPv4, IPv6) from the pod to EXT:STREAM_PORT, each sending a
/// sequence number every 10 ms and checking every echo, until stopped.
struct Streams {
    stop: Arc<AtomicBool>,
    threads: Vec<(String, JoinHandle<StreamReport>)>,
}

impl Streams {
    fn start(lab: &Lab) -> Streams {
        let ext4 = SocketAddr::new(lab::EXTERNAL_V4.into(), STREAM_PORT);
        let ext6 = SocketAddr::new(lab::EXTERNAL_V6.into(), STREAM_PORT);
        let (tcp, udp4, udp6) = in_netns(lab.netns_path(Ns::Pod), || {
            let tcp = TcpStream::connect_timeout(&ext4, T)?;
            let udp4 = UdpSocket::bind((IpAddr::from(lab::POD_V4), 0))?;
            udp4.connect(ext4)?;
            let udp6 = UdpSocket::bind((IpAddr::from(lab::POD_V6), 0))?;
            udp6.connect(ext6)?;
            Ok((tcp, udp4, udp6))
        })
        .expect("the pod's streams connect through the agent");
        assert_eq!(tcp.peer_addr().unwrap(), ext4, "the pod sees the external address as its peer");
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let s = stop.clone();
        threads.push(("tcp/ipv4".to_owned(), std::thread::spawn(move || tcp_stream(tcp, &s))));
        for (name, socket) in [("udp/ipv4", udp4), ("udp/ipv6", udp6)] {
            let s = stop.clone();
            threads.push((name.to_owned(), std::thread::spawn(move || udp_stream(socket, &s))));
        }
        Streams { stop, threads }
    }

    fn finish(mut self) -> Vec<(String, StreamReport)> {
        self.stop.store(true, Ordering::Relaxed);
        self.threads.drain(..).map(|(name, t)| (name, t.join().unwrap())).collect()
    }
}

impl Drop for Streams {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn tcp_stream(mut conn: TcpStream, stop: &AtomicBool) -> StreamReport {
    let mut report = StreamReport::default();
    conn.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    while !stop.load(Ordering::Relaxed) {
        let seq = report.sent.to_be_bytes();
        if let Err(e) = conn.write_all(&seq) {
            report.error = Some(format!("send #{}: {e}", report.sent));
            return report;
        }
        report.sent += 1;
        let mut echo = [0u8; 8];
        if let Err(e) = conn.read_exact(&mut echo) {
            report.error = Some(format!("echo of #{}: {e}", report.sent - 1));
            return report;
        }
        if echo != seq {
            report.error = Some(format!("echo of #{} was {}", report.sent - 1, u64::from_be_bytes(echo)));
            return report;
        }
        report.received += 1;
        std::thread::sleep(Duration::from_millis(10));
    }
    report
}

fn udp_stream(socket: UdpSocket, stop: &AtomicBool) -> StreamReport {
    let socket = Arc::new(socket);
    socket.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let seen = Arc::new(Mutex::new(BTreeSet::new()));
    let done = Arc::new(AtomicBool::new(false));
    let receiver = {
        let (socket, seen, done) = (socket.clone(), seen.clone(), done.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 16];
            while !done.load(Ordering::Relaxed) {
                if let Ok(8) = socket.recv(&mut buf) {
                    seen.lock().unwrap().insert(u64::from_be_bytes(buf[..8].try_into().unwrap()));
                }
            }
        })
    };
    let sent = AtomicU64::new(0);
    while !stop.load(Ordering::Relaxed) {
        let n = sent.fetch_add(1, Ordering::Relaxed);
        let _ = socket.send(&n.to_be_bytes());
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(500)); // the last echoes
    done.store(true, Ordering::Relaxed);
    receiver.join().unwrap();
    let seen = seen.lock().unwrap();
    let sent = sent.load(Ordering::Relaxed);
    let lost: Vec<u64> = (0..sent).filter(|n| !seen.contains(n)).collect();
    StreamReport {
        sent,
        received: seen.len() as u64,
        error: (!lost.is_empty()).then(|| format!("{} lost, first {:?}", lost.len(), &lost[..lost.len().min(10)])),
    }
}

/// The binary to upgrade to: `NM_UPGRADE_BIN` (`cargo xtask test` builds the release binary
/// for it), else a copy of the test binary (a new file, a new process and new programs).
fn upgrade_binary(scratch: &Scratch) -> PathBuf {
    match std::env::var_os("NM_UPGRADE_BIN").map(PathBuf::from) {
        Some(bin) => {
            assert!(bin.exists(), "NM_UPGRADE_BIN={} does not exist", bin.display());
            bin
        }
        None => {
            eprintln!("NM_UPGRADE_BIN not set: upgrading to a copy of the same build");
            let copy = scratch.file("node-manager-upgraded");
            std::fs::copy(BIN, &copy).unwrap();
            copy
        }
    }
}

/// IDs of the programs currently in our TCX links, cgroup hooks and netfilter links.
fn our_program_ids(scratch: &Scratch) -> BTreeSet<u64> {
    let links = scratch.bpffs.join("node-manager/v1/links");
    std::fs::read_dir(&links)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|pin| bpftool_json(&["link", "show", "pinned", pin.path().to_str().unwrap()]).ok())
        .filter_map(|link| link["prog_id"].as_u64())
        .collect()
}

fn bpftool_json(args: &[&str]) -> Result<serde_json::Value, String> {
    let out = Command::new("bpftool").arg("-j").args(args).output().unwrap();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
}

/// Waits until a newly started agent has replaced the programs (new program IDs in our links)
/// and serves, with the streams still running.
fn wait_taken_over(scratch: &Scratch, agent: &Agent, before: &BTreeSet<u64>, what: &str) {
    wait_for(what, Duration::from_secs(20), || {
        let now = our_program_ids(scratch);
        now.len() >= before.len() && now.is_disjoint(before) && agent.log().contains("socket hooks attached")
    });
}

#[test]
fn restarts_an_upgrade_and_layout_migrations_lose_no_packet_and_no_flow() {
    let lab = Lab::new().unwrap();
    let scratch = Scratch::new(&lab);
    let services = scratch.file("services.yaml");
    stream_service(&lab, &services);
    let _servers = StreamServers::start(&lab);
    let args = base_args(&services);
    let bin = PathBuf::from(BIN);

    let first = start(&scratch, &bin, &args, "agent-1.log");
    wait_for("the first agent serves", Duration::from_secs(20), || {
        first.log().contains("socket hooks attached") && our_program_ids(&scratch).len() >= 10
    });
    let streams = Streams::start(&lab);
    std::thread::sleep(Duration::from_millis(500));

    // 1. SIGKILL, a pause with no agent at all, and a restart of the same binary.
    let ids = our_program_ids(&scratch);
    drop(first);
    std::thread::sleep(Duration::from_millis(500));
    let second = start(&scratch, &bin, &args, "agent-2.log");
    wait_taken_over(&scratch, &second, &ids, "the restarted agent replaced the programs");
    assert!(!second.log().contains("creating map"), "maps must be adopted:\n{}", second.log());
    std::thread::sleep(Duration::from_millis(500));

    // 2. Upgrade: SIGTERM (leaves the datapath), then a different build takes over.
    let ids = our_program_ids(&scratch);
    assert!(second.stop(), "SIGTERM ends the agent cleanly");
    let upgraded = upgrade_binary(&scratch);
    let third = start(&scratch, &upgraded, &args, "agent-3.log");
    wait_taken_over(&scratch, &third, &ids, "the upgraded agent replaced the programs");
    std::thread::sleep(Duration::from_millis(500));

    // 3. A foreign layout behind the frontends pin (what an agent with another map layout
    // leaves): refused, a new map filled, and only then the programs swapped.
    let ids = our_program_ids(&scratch);
    drop(third);
    let pin = scratch.bpffs.join("node-manager/v1/maps/NM_FRONTENDS");
    std::fs::remove_file(&pin).unwrap();
    let made = Command::new("bpftool")
        .args(["map", "create", pin.to_str().unwrap(), "type", "hash", "key", "20", "value", "8", "entries", "16"])
        .args(["name", "NM_FRONTENDS"])
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let fourth = start(&scratch, &upgraded, &args, "agent-4.log");
    wait_taken_over(&scratch, &fourth, &ids, "the agent migrated the foreign map");
    let log = fourth.log();
    assert!(log.contains("foreign layout") && log.contains("attached after the first sync"), "{log}");
    std::thread::sleep(Duration::from_millis(500));

    // 4. Pins of another layout version (as an agent of another version leaves them): maps of
    // the same layout are adopted (the flows survive), its links are released after ours
    // are attached, and its directory goes.
    let ids = our_program_ids(&scratch);
    drop(fourth);
    let v1 = scratch.bpffs.join("node-manager/v1");
    let v0 = scratch.bpffs.join("node-manager/v0");
    std::fs::rename(&v1, &v0).unwrap();
    let fifth = start(&scratch, &upgraded, &args, "agent-5.log");
    wait_for("the old version's pins are retired", Duration::from_secs(20), || !v0.exists());
    wait_taken_over(&scratch, &fifth, &ids, "the new agent serves alone");
    let log = fifth.log();
    assert!(log.contains("adopting an older version's pinned map"), "{log}");
    assert!(!log.contains("creating map"), "{log}");
    assert_eq!(tcx_programs(&lab, "ingress"), ["nm_pod_ingress"], "exactly one program of ours on TCX ingress");
    assert_eq!(tcx_programs(&lab, "egress"), ["nm_pod_egress"]);
    std::thread::sleep(Duration::from_millis(500));

    for (name, report) in streams.finish() {
        assert!(report.error.is_none(), "{name}: {report:?}");
        assert!(report.sent > 100 && report.received == report.sent, "{name}: {report:?}");
        eprintln!("{name}: {} sent, {} echoed, none lost", report.sent, report.received);
    }
    assert!(fifth.stop());
}

/// After `cleanup`, nothing of ours in the kernel: asserted with bpftool, tc, nft, iptables and
/// the sysctl, for every INVALID-drop mode.
#[test]
fn cleanup_leaves_nothing_that_bpftool_tc_nft_or_sysctl_can_see() {
    let lab = Lab::new().unwrap();
    let scratch = Scratch::new(&lab);
    let services = scratch.file("services.yaml");
    write(&services, &lab_service_yaml("web"));
    let liberal_before = sysctl(&lab);
    for mode in ["bpf", "nftables", "iptables", "liberal"] {
        let mut args = base_args(&services);
        args.extend(["--drop-invalid-mode".to_owned(), mode.to_owned()]);
        let agent = start(&scratch, Path::new(BIN), &args, &format!("agent-{mode}.log"));
        wait_for("the agent serves", Duration::from_secs(20), || {
            agent.log().contains("socket hooks attached") && our_program_ids(&scratch).len() >= 10
        });
        let progs = our_program_ids(&scratch);
        let links: BTreeSet<u64> = bpftool_links_of(&scratch);
        let maps: BTreeSet<u64> = std::fs::read_dir(scratch.bpffs.join("node-manager/v1/maps"))
            .unwrap()
            .flatten()
            .filter_map(|pin| bpftool_json(&["map", "show", "pinned", pin.path().to_str().unwrap()]).ok())
            .filter_map(|m| m["id"].as_u64())
            .collect();
        assert!(maps.len() >= 10, "{mode}: maps {maps:?}");
        assert!(agent.stop());
        let out = scratch.cleanup();
        assert!(out.status.success(), "{mode}: {}", String::from_utf8_lossy(&out.stderr));

        // bpffs: our directory is gone.
        assert!(!scratch.bpffs.join("node-manager").exists(), "{mode}: pins left");
        // bpftool: none of the programs, links or maps exist any more (freeing is deferred
        // by the kernel: give it a moment).
        wait_for("the kernel to free our objects", Duration::from_secs(10), || {
            let live = |what: &str, key: &str| -> BTreeSet<u64> {
                bpftool_json(&[what, "show"])
                    .unwrap()
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter_map(|o| o[key].as_u64())
                    .collect()
            };
            live("prog", "id").is_disjoint(&progs)
                && live("link", "id").is_disjoint(&links)
                && live("map", "id").is_disjoint(&maps)
        });
        // tc: no filter, no qdisc, no TCX program on the pod interface.
        for args in [
            ["filter", "show", "dev", lab.pod_host_if(), "ingress"],
            ["filter", "show", "dev", lab.pod_host_if(), "egress"],
        ] {
            let out = lab.command(Ns::Node, "tc").args(args).output().unwrap();
            assert!(String::from_utf8_lossy(&out.stdout).trim().is_empty(), "{mode}: tc {args:?}");
        }
        let qdisc = lab.command(Ns::Node, "tc").args(["qdisc", "show", "dev", lab.pod_host_if()]).output().unwrap();
        assert!(!String::from_utf8_lossy(&qdisc.stdout).contains("clsact"), "{mode}");
        assert!(tcx_programs(&lab, "ingress").is_empty() && tcx_programs(&lab, "egress").is_empty(), "{mode}");
        // nftables and iptables: nothing of ours.
        let nft = lab.command(Ns::Node, "nft").args(["list", "ruleset"]).output().unwrap();
        let nft = String::from_utf8_lossy(&nft.stdout);
        assert!(!nft.contains("node_manager"), "{mode}: nft ruleset still has ours:\n{nft}");
        for save in ["iptables-save", "ip6tables-save"] {
            let out = lab.command(Ns::Node, save).output().unwrap();
            let out = String::from_utf8_lossy(&out.stdout);
            assert!(!out.contains("node-manager"), "{mode}: {save}:\n{out}");
        }
        // The conntrack sysctl is what it was.
        assert_eq!(sysctl(&lab), liberal_before, "{mode}: nf_conntrack_tcp_be_liberal");
        // Idempotent.
        let again = scratch.cleanup();
        assert!(again.status.success());
        assert!(String::from_utf8_lossy(&again.stdout).contains("0 link(s)"), "{mode}");
    }
}

fn bpftool_links_of(scratch: &Scratch) -> BTreeSet<u64> {
    let links = scratch.bpffs.join("node-manager/v1/links");
    std::fs::read_dir(&links)
        .unwrap()
        .flatten()
        .filter_map(|pin| bpftool_json(&["link", "show", "pinned", pin.path().to_str().unwrap()]).ok())
        .filter_map(|l| l["id"].as_u64())
        .collect()
}

fn sysctl(lab: &Lab) -> String {
    let out =
        lab.command(Ns::Node, "sysctl").args(["-n", "net.netfilter.nf_conntrack_tcp_be_liberal"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// `bpftool map dump pinned` decodes our maps with named fields (BTF), owners included.
#[test]
fn bpftool_shows_named_fields_and_the_owning_service() {
    let lab = Lab::new().unwrap();
    let scratch = Scratch::new(&lab);
    let services = scratch.file("services.yaml");
    write(&services, &lab_service_yaml("web"));
    let agent = start(&scratch, Path::new(BIN), &base_args(&services), "agent.log");
    wait_for("frontends written", Duration::from_secs(20), || {
        scratch.try_inspect().is_ok_and(|s| s["frontends"].as_array().is_some_and(|f| f.len() == 6))
    });
    let maps = scratch.bpffs.join("node-manager/v1/maps");
    let dump = |name: &str| bpftool_json(&["map", "dump", "pinned", maps.join(name).to_str().unwrap()]).unwrap();
    let frontends = dump("NM_FRONTENDS");
    let entry = &frontends[0]["formatted"];
    for field in ["addr", "port", "proto"] {
        assert!(entry["key"].get(field).is_some(), "key field {field}: {frontends:#}");
    }
    assert!(entry["value"].get("cluster_addr").is_some(), "{frontends:#}");
    let owners = dump("NM_OWNERS");
    assert_eq!(owners.as_array().unwrap().len(), 6, "{owners:#}");
    assert!(owners[0]["formatted"]["value"].get("service").is_some(), "{owners:#}");
    // inspect names the Service of every frontend.
    let state = scratch.inspect();
    for f in state["frontends"].as_array().unwrap() {
        assert_eq!(f["service"], "lab/web", "{f}");
    }
    let text = scratch.nm(&["inspect"]).output().unwrap();
    assert!(String::from_utf8_lossy(&text.stdout).contains("lab/web"));
    assert!(agent.stop());
}

/// A plain HTTP/1.1 GET from inside the node namespace: (status, body).
fn http_get(lab: &Lab, addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let path = path.to_owned();
    in_netns(lab.netns_path(Ns::Node), move || {
        let mut conn = TcpStream::connect_timeout(&addr, T)?;
        conn.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(conn, "GET {path} HTTP/1.1\r\nHost: node\r\nConnection: close\r\n\r\n")?;
        let mut response = String::new();
        conn.read_to_string(&mut response)?;
        Ok(response)
    })
    .map_err(|e| format!("{e:#}"))
    .and_then(|response| {
        let status = response.split(' ').nth(1).and_then(|s| s.parse().ok()).ok_or("no status line")?;
        let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
        Ok((status, body))
    })
}

/// The value of one sample (`name{labels}`) in a Prometheus text body.
fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

#[test]
fn metrics_count_the_packets_sent_and_readyz_waits_for_the_first_sync() {
    let lab = Lab::new().unwrap();
    let scratch = Scratch::new(&lab);
    let services = scratch.file("services.yaml"); // absent for now: no sync possible
    let addr: SocketAddr = "127.0.0.1:9617".parse().unwrap();
    let mut args = base_args(&services);
    args.extend(["--metrics-addr".to_owned(), addr.to_string(), "--log-format".to_owned(), "json".to_owned()]);
    let agent = start(&scratch, Path::new(BIN), &args, "agent.log");

    wait_for("/healthz answers", Duration::from_secs(20), || http_get(&lab, addr, "/healthz").is_ok());
    assert_eq!(http_get(&lab, addr, "/healthz").unwrap().0, 200);
    let (status, body) = http_get(&lab, addr, "/readyz").unwrap();
    assert_eq!(status, 503, "not ready before the first sync: {body}");
    assert!(body.contains("initial sync"), "{body}");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(http_get(&lab, addr, "/readyz").unwrap().0, 503, "still no Services file, still not ready");

    write(&services, &lab_service_yaml("web"));
    wait_for("/readyz turns ready after the sync", Duration::from_secs(20), || {
        http_get(&lab, addr, "/readyz").is_ok_and(|(s, _)| s == 200)
    });

    let metrics = || http_get(&lab, addr, "/metrics").unwrap().1;
    let requests_v4 = r#"node_manager_rewritten_packets_total{direction="request",family="ipv4"}"#;
    let replies_v4 = r#"node_manager_rewritten_packets_total{direction="reply",family="ipv4"}"#;
    let requests_v6 = r#"node_manager_rewritten_packets_total{direction="request",family="ipv6"}"#;
    let before = metrics();
    const SENT: u32 = 7;
    for i in 0..SENT {
        let to = SocketAddr::new(lab::EXTERNAL_V4.into(), lab::SERVICE_PORT);
        let reply = lab.udp_request(Ns::Pod, to, format!("m{i}").as_bytes(), T, true).unwrap();
        assert_eq!(reply.from, to);
    }
    let after = metrics();
    let delta = |series: &str| sample(&after, series).unwrap() - sample(&before, series).unwrap();
    assert_eq!(delta(requests_v4), f64::from(SENT), "{after}");
    assert_eq!(delta(replies_v4), f64::from(SENT), "{after}");
    assert_eq!(delta(requests_v6), 0.0);
    // The rest of the figures the issue asks for, present and sane.
    for series in [
        r#"node_manager_frontends"#,
        r#"node_manager_map_fill_ratio{map="NM_FRONTENDS"}"#,
        r#"node_manager_map_entries{map="NM_FLOWS"}"#,
        r#"node_manager_attached_interfaces"#,
        r#"node_manager_drop_invalid_mode{mode="bpf"}"#,
        r#"node_manager_ready"#,
        r#"node_manager_reconcile_duration_seconds_count{step="maps"}"#,
        r#"node_manager_invalid_dropped_packets_total{family="ipv4",mode="bpf"}"#,
    ] {
        assert!(sample(&after, series).is_some(), "{series} missing:\n{after}");
    }
    assert_eq!(sample(&after, "node_manager_frontends"), Some(6.0));
    assert_eq!(sample(&after, "node_manager_attached_interfaces"), Some(1.0));
    assert_eq!(sample(&after, r#"node_manager_drop_invalid_mode{mode="bpf"}"#), Some(1.0));
    assert_eq!(sample(&after, "node_manager_ready"), Some(1.0));
    let flows = sample(&after, r#"node_manager_map_entries{map="NM_FLOWS"}"#).unwrap()
        + sample(&after, r#"node_manager_map_entries{map="NM_FLOWS_DGRAM"}"#).unwrap();
    assert!(flows >= 1.0, "{after}");
    assert!(after.contains("node_manager_build_info{"), "{after}");
    assert_eq!(http_get(&lab, addr, "/nope").unwrap().0, 404);

    // JSON logs: every line is an object with a level and a message.
    let log = agent.log();
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(v.get("level").is_some() && v.get("message").is_some(), "{line}");
    }
    assert!(agent.stop());
}

#[test]
fn cleanup_on_exit_removes_the_datapath_when_the_agent_stops() {
    let lab = Lab::new().unwrap();
    let scratch = Scratch::new(&lab);
    let services = scratch.file("services.yaml");
    write(&services, &lab_service_yaml("web"));
    let mut args = base_args(&services);
    args.extend(["--cleanup-on-exit".to_owned(), "true".to_owned()]);
    let agent = start(&scratch, Path::new(BIN), &args, "agent.log");
    wait_for("the agent serves", Duration::from_secs(20), || agent.log().contains("socket hooks attached"));
    let to = SocketAddr::new(lab::EXTERNAL_V4.into(), lab::SERVICE_PORT);
    lab.udp_request(Ns::Pod, to, b"x", T, true).unwrap();
    let log = agent.log.clone();
    assert!(agent.stop());
    let log = std::fs::read_to_string(log).unwrap();
    assert!(log.contains("datapath removed"), "{log}");
    assert!(!scratch.bpffs.join("node-manager").exists());
    assert!(tcx_programs(&lab, "ingress").is_empty());
    assert!(lab.udp_request(Ns::Pod, to, b"x", T, true).is_err(), "the rewrite is gone");
}

#[test]
fn a_missing_bpffs_or_capability_is_named_with_what_to_do() {
    let lab = Lab::new().unwrap();
    let scratch = Scratch::new(&lab);
    let services = scratch.file("services.yaml");
    write(&services, "apiVersion: v1\nkind: List\nitems: []\n");
    let services = services.to_str().unwrap();
    // Not a directory at all: says so and what to pass.
    let out = Command::new(BIN)
        .args(["run", "--services-file", services, "--bpffs", "/nonexistent/bpffs", "--drop-invalid-input", "false"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("/nonexistent/bpffs") && err.contains("--bpffs") && !err.contains("panicked"), "{err}");

    // Capabilities dropped from the bounding set (so even root cannot have them), in the
    // lab's node namespace and with a time-out, so a missed check could not touch the machine
    // or hang the test.
    let without = |caps: &str, extra: &[&str]| {
        let wrapper = ["timeout", "-s", "KILL", "10", "setpriv", "--bounding-set", caps, "--inh-caps", "-all", "--"];
        let mut args = vec!["run", "--services-file", services];
        args.extend_from_slice(extra);
        let out = scratch.nm_with(Path::new(BIN), &wrapper, &args).output().unwrap();
        assert!(!out.status.success(), "{caps}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    // Without CAP_BPF (and CAP_SYS_ADMIN, which stands in for it): named before anything is
    // touched.
    let err = without("-bpf,-sys_admin,-perfmon", &["--drop-invalid-input", "false"]);
    assert!(err.contains("missing capabilities: CAP_BPF"), "{err}");
    assert!(!err.contains("CAP_NET_ADMIN") && !err.contains("panicked"), "{err}");
    assert!(!scratch.bpffs.join("node-manager").exists(), "nothing was created");
    // Without CAP_PERFMON, the INVALID drop's bpf mode is named, with the way around it.
    let err = without("-sys_admin,-perfmon", &["--drop-invalid-mode", "bpf"]);
    assert!(err.contains("CAP_PERFMON") && err.contains("DROP_INVALID_MODE=nftables"), "{err}");
    // Without CAP_NET_ADMIN, attaching is named.
    let err = without("-sys_admin,-net_admin", &["--external-cluster", "true"]);
    assert!(err.contains("CAP_NET_ADMIN") && !err.contains("CAP_BPF"), "{err}");
    assert!(!scratch.bpffs.join("node-manager").exists(), "nothing was created");
}
