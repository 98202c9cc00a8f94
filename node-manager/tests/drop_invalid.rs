//! kubernetes#74839 reproduced in network namespaces, and fixed by each mode of the
//! conntrack-INVALID drop: a pod's masqueraded connection to an outside server; the server side
//! injects segments conntrack marks INVALID (far beyond the window). Without the feature the node
//! answers them with an RST and the connection dies; with it, no RST leaves the node and the
//! connection keeps carrying data. Runs the real agent binary in the lab's node namespace.
mod common;

use std::{
    net::{SocketAddr, TcpListener},
    time::Duration,
};

use common::agent::{Agent, Scratch, wait_for, write};
use lab::{
    Lab, Ns, in_netns,
    reset::{self, ResetScenario},
};

const INJECTED: u32 = 3;

fn services_file(scratch: &Scratch) -> String {
    let path = scratch.file("services.yaml");
    write(&path, "apiVersion: v1\nkind: List\nitems: []\n");
    path.display().to_string()
}

fn drop_state(scratch: &Scratch) -> serde_json::Value {
    scratch.inspect()["drop_invalid"].clone()
}

/// Injects and returns (node RSTs, connection alive after, INVALID packets counted by conntrack).
fn provoke(lab: &Lab, v6: bool) -> (usize, bool, u64) {
    let mut scenario = ResetScenario::start(lab, v6).expect("pod connects to the outside server");
    let before = reset::invalid_counter(lab).unwrap();
    scenario.inject_out_of_window(INJECTED).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let alive = scenario.exchange(b"after the injection");
    std::thread::sleep(Duration::from_millis(100));
    (scenario.node_resets(), alive, reset::invalid_counter(lab).unwrap() - before)
}

fn dropped(state: &serde_json::Value, family: &str) -> u64 {
    state["counters"][format!("dropped_{family}")][0].as_u64().unwrap_or(0)
}

#[test]
fn without_the_feature_the_node_resets_the_pods_connection() {
    let lab = Lab::new().unwrap();
    for v6 in [false, true] {
        let (resets, alive, invalid) = provoke(&lab, v6);
        assert!(invalid >= u64::from(INJECTED), "v6={v6}: conntrack marked {invalid} INVALID");
        assert!(resets >= 1, "v6={v6}: the node sent no RST");
        assert!(!alive, "v6={v6}: the connection survived without the fix");
    }
}

/// Valid traffic addressed to the node itself (ICMP echo, TCP) and forwarded through it.
fn valid_traffic_passes(lab: &Lab) {
    for gw in ["192.0.2.1", "2001:db8:1::1"] {
        let out = lab.command(Ns::Pod, "ping").args(["-c", "2", "-i", "0.2", "-W", "2", gw]).output().unwrap();
        assert!(out.status.success(), "ping {gw}: {}", String::from_utf8_lossy(&out.stdout));
    }
    for addr in ["192.0.2.1:7000", "[2001:db8:1::1]:7000"] {
        let addr: SocketAddr = addr.parse().unwrap();
        let listener = in_netns(lab.netns_path(Ns::Node), || Ok(TcpListener::bind(addr)?)).unwrap();
        let server = std::thread::spawn(move || {
            use std::io::{Read as _, Write as _};
            let (mut c, _) = listener.accept().unwrap();
            let mut buf = [0u8; 5];
            c.read_exact(&mut buf).unwrap();
            c.write_all(&buf).unwrap();
        });
        let reply = in_netns(lab.netns_path(Ns::Pod), || {
            use std::io::{Read as _, Write as _};
            let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
            s.write_all(b"hello")?;
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf)?;
            Ok(buf)
        })
        .unwrap();
        assert_eq!(&reply, b"hello", "TCP to the node at {addr}");
        server.join().unwrap();
    }
    for ip in [lab::ENDPOINT_V4.into(), std::net::IpAddr::from(lab::ENDPOINT_V6)] {
        let to = SocketAddr::new(ip, lab::SERVICE_PORT);
        lab.tcp_request(Ns::Pod, to, b"x", Duration::from_secs(3)).unwrap();
        lab.udp_request(Ns::Pod, to, b"x", Duration::from_secs(3), false).unwrap();
    }
}

#[test]
fn bpf_mode_drops_exactly_the_invalid_packets_and_the_connection_survives() {
    let lab = Lab::new().unwrap();
    let scratch = Scratch::new(&lab);
    if !common::kernel::has_netfilter_links() {
        // Before Linux 6.4: asked for explicitly, bpf mode is a configuration error naming what
        // the kernel lacks (auto falls back instead: see the test below).
        let out =
            scratch.nm(&["run", "--services-file", &services_file(&scratch), "--drop-invalid-mode", "bpf"]).output();
        let out = out.unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains("--drop-invalid-mode bpf is not possible") && stderr.contains("no BPF netfilter links"),
            "{stderr}"
        );
        return;
    }
    let agent = Agent::start(&scratch, &["--services-file", &services_file(&scratch), "--drop-invalid-mode", "bpf"]);
    wait_for("two netfilter links and conntrack seen on both families", Duration::from_secs(15), || {
        let d = drop_state(&scratch);
        d["netfilter_links"].as_array().is_some_and(|l| l.len() == 2)
            && d["conntrack_seen_v4_ms_ago"].as_u64().is_some_and(|ms| ms < 3000)
            && d["conntrack_seen_v6_ms_ago"].as_u64().is_some_and(|ms| ms < 3000)
    });
    let d = drop_state(&scratch);
    assert_eq!(d["mode"], "bpf");
    assert_eq!(d["why"], "bpf requested with --drop-invalid-mode");
    assert!(d["netfilter_links"][0].as_str().unwrap().contains("LOCAL_IN priority -"), "{d}");

    valid_traffic_passes(&lab);
    assert_eq!(dropped(&drop_state(&scratch), "v4") + dropped(&drop_state(&scratch), "v6"), 0);

    for (v6, family) in [(false, "v4"), (true, "v6")] {
        let (resets, alive, invalid) = provoke(&lab, v6);
        assert_eq!(invalid, u64::from(INJECTED), "{family}: conntrack's INVALID count");
        assert_eq!(resets, 0, "{family}: the node sent an RST");
        assert!(alive, "{family}: the connection died");
        assert_eq!(dropped(&drop_state(&scratch), family), u64::from(INJECTED), "{family}: drop counter");
    }
    valid_traffic_passes(&lab);
    assert_eq!(dropped(&drop_state(&scratch), "v4"), u64::from(INJECTED));

    // Links removed behind the agent's back come back at the next rescan.
    let links = scratch.bpffs.join("node-manager/v1/links");
    let _ = scratch.nm(&["cleanup"]).output(); // a bigger hammer than bpftool: links and pins gone
    assert!(!links.join("netfilter_ipv4").exists());
    drop(agent);

    // A restarted agent replaces the links of the previous one (never two of ours).
    let first = Agent::start(&scratch, &["--services-file", &services_file(&scratch)]);
    wait_for("links", Duration::from_secs(15), || {
        drop_state(&scratch)["netfilter_links"].as_array().is_some_and(|l| l.len() == 2)
    });
    let before = drop_state(&scratch)["netfilter_links"].clone();
    drop(first);
    let second = Agent::start(&scratch, &["--services-file", &services_file(&scratch)]);
    for _ in 0..150 {
        let now = drop_state(&scratch)["netfilter_links"].clone();
        if now.as_array().is_some_and(|l| l.len() == 2) && now != before {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let now = drop_state(&scratch)["netfilter_links"].clone();
    assert!(now.as_array().is_some_and(|l| l.len() == 2) && now != before, "{before} -> {now}\n{}", second.log());
    assert_eq!(ours_in_bpftool(), 2, "exactly one netfilter link per family");
    assert!(second.log().contains("auto: this kernel has BPF netfilter links"), "{}", second.log());

    // Turning the feature off removes it.
    drop(second);
    let off = Agent::start(&scratch, &["--services-file", &services_file(&scratch), "--drop-invalid-input", "false"]);
    wait_for("links removed", Duration::from_secs(15), || !links.join("netfilter_ipv4").exists());
    assert_eq!(ours_in_bpftool(), 0);
    drop(off);
    let out = scratch.cleanup();
    assert!(out.status.success());
    let (resets, alive, _) = provoke(&lab, false);
    assert!(resets >= 1 && !alive, "after cleanup the bug is back: nothing of ours is left");
}

/// Netfilter links of our programs on the whole machine.
fn ours_in_bpftool() -> usize {
    let out = std::process::Command::new("bpftool").args(["-j", "link", "show"]).output().unwrap();
    let links: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let progs = std::process::Command::new("bpftool").args(["-j", "prog", "show"]).output().unwrap();
    let progs: serde_json::Value = serde_json::from_slice(&progs.stdout).unwrap_or_default();
    let ours: Vec<u64> = progs
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["name"].as_str().is_some_and(|n| n.starts_with("nm_drop_invalid")))
        .filter_map(|p| p["id"].as_u64())
        .collect();
    links
        .as_array()
        .into_iter()
        .flatten()
        // bpftool 7.1 (Debian 12) prints the link type it does not know by number (10).
        .filter(|l| {
            (l["type"] == "netfilter" || l["type"] == 10) && l["prog_id"].as_u64().is_some_and(|id| ours.contains(&id))
        })
        .count()
}

/// What `auto` picks on this kernel: bpf with BPF netfilter links (Linux ≥ 6.4), nftables before;
/// either way kubernetes#74839 is fixed.
#[test]
fn auto_mode_uses_the_best_mechanism_this_kernel_has_and_fixes_the_reset() {
    let lab = Lab::new().unwrap();
    let scratch = Scratch::new(&lab);
    let agent = Agent::start(&scratch, &["--services-file", &services_file(&scratch)]);
    let bpf = common::kernel::has_netfilter_links();
    wait_for("the mode installed", Duration::from_secs(30), || {
        let d = drop_state(&scratch);
        if bpf {
            d["netfilter_links"].as_array().is_some_and(|l| l.len() == 2)
                && d["conntrack_seen_v4_ms_ago"].as_u64().is_some_and(|ms| ms < 3000)
                && d["conntrack_seen_v6_ms_ago"].as_u64().is_some_and(|ms| ms < 3000)
        } else {
            d["nftables_table"] == true
        }
    });
    let d = drop_state(&scratch);
    assert_eq!(d["mode"], if bpf { "bpf" } else { "nftables" }, "{d}");
    let why = d["why"].as_str().unwrap();
    if bpf {
        assert_eq!(why, "auto: this kernel has BPF netfilter links");
    } else {
        assert!(why.contains("nftables fallback"), "{why}");
        assert!(agent.log().contains("no BPF netfilter links"), "the log says why:\n{}", agent.log());
    }
    for (v6, family) in [(false, "v4"), (true, "v6")] {
        let (resets, alive, invalid) = provoke(&lab, v6);
        assert_eq!(invalid, u64::from(INJECTED), "{family}");
        assert_eq!(resets, 0, "{family}: the node sent an RST");
        assert!(alive, "{family}: the connection died");
        assert_eq!(dropped(&drop_state(&scratch), family), u64::from(INJECTED), "{family}: drop counter");
    }
    valid_traffic_passes(&lab);
    drop(agent);
    assert!(scratch.cleanup().status.success());
    let d = drop_state(&scratch);
    assert_eq!((d["nftables_table"].clone(), d["netfilter_links"].as_array().map(Vec::len)), (false.into(), Some(0)));
}

#[test]
fn iptables_mode_drops_and_cleanup_removes_the_rules() {
    let lab = Lab::new().unwrap();
    let scratch = Scratch::new(&lab);
    let rules = |bin: &str| {
        let out = lab.command(Ns::Node, bin).args(["-w", "5", "-S", "INPUT"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).matches(node_manager::features::drop_invalid::iptables::COMMENT).count()
    };
    let agent =
        Agent::start(&scratch, &["--services-file", &services_file(&scratch), "--drop-invalid-mode", "iptables"]);
    wait_for("the iptables rules", Duration::from_secs(30), || rules("iptables") == 1 && rules("ip6tables") == 1);
    assert_eq!(drop_state(&scratch)["mode"], "iptables");
    for (v6, family) in [(false, "v4"), (true, "v6")] {
        let (resets, alive, invalid) = provoke(&lab, v6);
        assert_eq!(invalid, u64::from(INJECTED), "{family}");
        assert_eq!(resets, 0, "{family}: the node sent an RST");
        assert!(alive, "{family}: the connection died");
        assert_eq!(dropped(&drop_state(&scratch), family), u64::from(INJECTED), "{family}: rule counter");
    }
    valid_traffic_passes(&lab);
    drop(agent);
    assert!(scratch.cleanup().status.success());
    assert_eq!((rules("iptables"), rules("ip6tables")), (0, 0), "cleanup removes both rules");
    assert!(scratch.cleanup().status.success(), "idempotent");
}

#[test]
fn nftables_mode_drops_and_cleanup_removes_the_table() {
    let lab = Lab::new().unwrap();
    let scratch = Scratch::new(&lab);
    let agent =
        Agent::start(&scratch, &["--services-file", &services_file(&scratch), "--drop-invalid-mode", "nftables"]);
    wait_for("the nftables table", Duration::from_secs(15), || drop_state(&scratch)["nftables_table"] == true);
    for (v6, family) in [(false, "v4"), (true, "v6")] {
        let (resets, alive, invalid) = provoke(&lab, v6);
        assert_eq!(invalid, u64::from(INJECTED), "{family}");
        assert_eq!(resets, 0, "{family}: the node sent an RST");
        assert!(alive, "{family}: the connection died");
        assert_eq!(dropped(&drop_state(&scratch), family), u64::from(INJECTED), "{family}: nft counter");
    }
    valid_traffic_passes(&lab);
    assert_eq!(drop_state(&scratch)["netfilter_links"].as_array().map(Vec::len), Some(0));
    drop(agent);
    assert!(scratch.cleanup().status.success());
    assert_eq!(drop_state(&scratch)["nftables_table"], false);
    assert!(scratch.cleanup().status.success(), "idempotent");
}

#[test]
fn liberal_mode_lets_the_pod_handle_the_segment_and_cleanup_restores_the_sysctl() {
    let lab = Lab::new().unwrap();
    let scratch = Scratch::new(&lab);
    let sysctl = || {
        let out =
            lab.command(Ns::Node, "cat").arg("/proc/sys/net/netfilter/nf_conntrack_tcp_be_liberal").output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    ResetScenario::start(&lab, false).unwrap(); // loads conntrack in the namespace
    assert_eq!(sysctl(), "0");
    let agent =
        Agent::start(&scratch, &["--services-file", &services_file(&scratch), "--drop-invalid-mode", "liberal"]);
    wait_for("be_liberal=1", Duration::from_secs(15), || sysctl() == "1");
    let (resets, alive, invalid) = provoke(&lab, false);
    assert_eq!(invalid, 0, "liberal conntrack marks nothing INVALID");
    assert_eq!(resets, 0);
    assert!(alive);
    assert_eq!(drop_state(&scratch)["mode"], "liberal");
    drop(agent);
    // A restart must not record its own 1 as the value to restore.
    let again =
        Agent::start(&scratch, &["--services-file", &services_file(&scratch), "--drop-invalid-mode", "liberal"]);
    wait_for("mode recorded", Duration::from_secs(15), || again.log().contains("drop-invalid: mode chosen"));
    drop(again);
    assert!(scratch.cleanup().status.success());
    assert_eq!(sysctl(), "0", "cleanup restores the value found");
}

#[test]
fn an_impossible_or_unknown_mode_exits_2_naming_what_is_missing() {
    let lab = Lab::new().unwrap();
    let scratch = Scratch::new(&lab);
    let file = services_file(&scratch);
    let out = scratch.nm(&["run", "--services-file", &file, "--drop-invalid-mode", "xdp"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("DROP_INVALID_MODE"), "{out:?}");
    // No nft on PATH: nftables asked for explicitly is an error, not a silent fallback...
    let nsenter = std::env::split_paths(&std::env::var_os("PATH").unwrap())
        .map(|dir| dir.join("nsenter"))
        .find(|p| p.exists())
        .expect("nsenter on PATH");
    let out = std::process::Command::new(nsenter)
        .arg(format!("--net={}", lab.netns_path(Ns::Node).display()))
        .args(["--", common::agent::BIN, "run", "--services-file", &file, "--drop-invalid-mode", "nftables", "--bpffs"])
        .arg(&scratch.bpffs)
        .env("PATH", "/nonexistent")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--drop-invalid-mode nftables is not possible") && stderr.contains("nft"), "{stderr}");
    assert_eq!(drop_state(&scratch)["netfilter_links"].as_array().map(Vec::len), Some(0));
}

/// kube-proxy's tables (here the lab's stand-in NAT) are what hook conntrack into the node's
/// network namespace; when they go (`kube-proxy --cleanup`, a proxy replaced, a flush) the
/// kernel unhooks conntrack at once and every packet reaches LOCAL_IN untracked, looking
/// exactly like an INVALID one. The bpf mode's guard must not drop the host's own traffic then.
#[test]
fn bpf_mode_passes_the_hosts_traffic_when_conntrack_unhooks() {
    if !common::kernel::has_netfilter_links() {
        return; // bpf mode needs Linux ≥ 6.4; the other modes are nftables/iptables rules, which hold conntrack
    }
    let lab = Lab::new().unwrap();
    let scratch = Scratch::new(&lab);
    let agent = Agent::start(&scratch, &["--services-file", &services_file(&scratch), "--drop-invalid-mode", "bpf"]);
    wait_for("the netfilter links and conntrack seen", Duration::from_secs(15), || {
        let d = drop_state(&scratch);
        d["netfilter_links"].as_array().is_some_and(|l| l.len() == 2)
            && d["conntrack_seen_v4_ms_ago"].as_u64().is_some_and(|ms| ms < 3000)
    });
    valid_traffic_passes(&lab);
    wait_for("the conntrack holder", Duration::from_secs(15), || drop_state(&scratch)["conntrack_holder"] == true);
    // Every conntrack user of the namespace but node-manager's goes: the lab's NAT tables (as
    // `kube-proxy --cleanup` removes kube-proxy's).
    let tables = lab.command(Ns::Node, "nft").args(["list", "tables"]).output().unwrap();
    let tables = String::from_utf8_lossy(&tables.stdout).into_owned();
    let theirs: Vec<&str> = tables.lines().filter(|t| !t.contains(" node_manager")).collect();
    assert!(!theirs.is_empty(), "the lab's NAT tables: {tables}");
    for table in &theirs {
        let args: Vec<&str> = table.split_whitespace().skip(1).collect(); // "table inet x" → ["inet", "x"]
        let out = lab.command(Ns::Node, "nft").arg("delete").arg("table").args(&args).output().unwrap();
        assert!(out.status.success(), "nft delete {table}: {}", String::from_utf8_lossy(&out.stderr));
    }
    // At once, within the guard's window: the host's own traffic still passes.
    for gw in ["192.0.2.1", "2001:db8:1::1"] {
        let out = lab.command(Ns::Pod, "ping").args(["-c", "3", "-i", "0.2", "-W", "1", gw]).output().unwrap();
        assert!(
            out.status.success(),
            "ping {gw} right after conntrack's users went: {}\n{:#}",
            String::from_utf8_lossy(&out.stdout),
            drop_state(&scratch)
        );
    }
    let d = drop_state(&scratch);
    assert_eq!(dropped(&d, "v4") + dropped(&d, "v6"), 0, "nothing dropped: {d:#}");
    drop(agent);
}
