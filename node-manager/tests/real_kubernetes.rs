//! node-manager against the real Kubernetes components (`cargo xtask kube` builds them):
//! etcd and kube-apiserver on loopback (RBAC and Node authorization), the deploy/ manifests
//! applied with the real kubectl, the agent started as the DaemonSet's pod from the applied
//! object (see `common::pod`), and the real kube-proxy in nftables and iptables mode in the
//! lab's node namespace. A component that cannot start fails the test; nothing is skipped.
//!
//! kube-proxy's IPVS mode needs the ip_vs modules this host kernel lacks; it runs in the QEMU
//! guest (see docs/real-kubernetes.md).
mod common;

use std::{
    process::Command,
    time::{Duration, Instant},
};

use common::{
    agent::{Agent, Scratch},
    kube::*,
    pod::DaemonSetPod,
};
use lab::{
    Lab, Ns,
    kube::{ApiBridge, Cluster, Options, ProxyMode},
};
use serde_json::Value;

#[test]
fn the_daemonset_runs_from_the_applied_manifest_with_its_token_rbac_and_capabilities() {
    let mut cluster = Cluster::start(&Options::default()).unwrap();
    let lab = Lab::for_real_kube_proxy().unwrap();
    let _bridge = ApiBridge::into_netns(&lab.netns_path(Ns::Node), cluster.apiserver_port).unwrap();
    let scratch = Scratch::new(&lab);
    cluster.kubectl_ok(&["apply", "--validate=strict", "-f", &manifest("node-manager.yaml")]).unwrap();
    create_nodes(&cluster);
    create_web_service(&cluster);

    // RBAC: the ServiceAccount's own token may read Services and Nodes, nothing else.
    let token = node_manager_token(&cluster, "nm-token-1");
    let sa = cluster.write_kubeconfig("sa.kubeconfig", &token).unwrap();
    let as_sa = |args: &[&str]| {
        let out = Command::new(cluster.bin.join("kubectl"))
            .arg(format!("--kubeconfig={}", sa.display()))
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, text) = as_sa(&["get", "services", "-A"]);
    assert!(ok && text.contains("web"), "listing Services: {text}");
    for denied in [
        vec!["get", "secrets", "-n", "kube-system"],
        vec!["get", "endpointslices", "-A"],
        vec!["delete", "svc", "web", "-n", "shop"],
        vec!["label", "node", NODE_A, "x=y"],
    ] {
        let (ok, text) = as_sa(&denied);
        assert!(!ok && text.contains("Forbidden"), "{denied:?} must be Forbidden for node-manager: {text}");
    }

    // The pod, as the iptables/nftables manifest runs it: the INVALID drop on, the rewrite off.
    let ds = daemonset(&cluster);
    let env = common::pod::env_of(&ds, NODE_A);
    assert!(env.contains(&("NODE_NAME".into(), NODE_A.into())), "{env:?}");
    assert!(env.contains(&("CGROUP_PATH".into(), "/host/sys/fs/cgroup".into())), "{env:?}");
    let ca = cluster.ca_path();
    let mut pod =
        DaemonSetPod::start(&scratch, &lab.netns_path(Ns::Node), &ds, NODE_A, &token, &ca, cluster.apiserver_port);
    wait_pod_cidrs(&scratch, &["192.0.2.0/25", "2001:db8:1::/64"], || pod.log());
    let log = pod.log();
    // The hybrid host: CGROUP_PATH names the v1 tmpfs; the agent uses the cgroup2 mount below it.
    assert!(log.contains("using the cgroup2 mount below it"), "{log}");
    let state = scratch.inspect();
    // The rewrite is off: the maps are filled (ready for a switch), but nothing is attached.
    assert!(state["interfaces"].as_array().unwrap().is_empty(), "no TC program: {state:#}");
    assert!(state["cgroup_hooks"].as_array().unwrap().is_empty(), "no socket hook: {state:#}");
    assert_eq!(state["features"][1]["active"], false, "{:#}", state["features"]);
    assert_eq!(state["features"][2]["active"], false, "{:#}", state["features"]);
    assert!(state["drop_invalid"]["mode"].is_string(), "the INVALID drop is on: {:#}", state["drop_invalid"]);
    pod.stop();

    // The IPVS manifest turns the rewrite on: a rollout replaces the pod with the new env.
    cluster.kubectl_ok(&["apply", "--validate=strict", "-f", &manifest("node-manager-ipvs.yaml")]).unwrap();
    let ds = daemonset(&cluster);
    assert!(common::pod::env_of(&ds, NODE_A).contains(&("RULE_EXTERNAL_CLUSTER_ENABLE".into(), "true".into())));
    let mut pod =
        DaemonSetPod::start(&scratch, &lab.netns_path(Ns::Node), &ds, NODE_A, &token, &ca, cluster.apiserver_port);
    let web = lab_frontends("8080", (LB_V4, CLUSTER_V4), (LB_V6, CLUSTER_V6));
    let want: Vec<(&str, &str)> = web.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    wait_frontends(&scratch, "the IPVS manifest's pod", Duration::from_secs(30), &want, || pod.log());
    // The socket hooks land on the test cgroup (mounted where the manifest's CGROUP_PATH says,
    // below the v1 tmpfs), the TC programs on the pod's veth.
    wait_attached(&scratch, 1, || pod.log());
    let cg_id = std::fs::metadata(&scratch.cgroup.path).map(|m| std::os::unix::fs::MetadataExt::ino(&m)).unwrap();
    for hook in scratch.inspect()["cgroup_hooks"].as_array().unwrap() {
        assert_eq!(hook["cgroup_id"].as_u64(), Some(cg_id), "{hook}");
    }

    // Token rotation: a new token in the file, the old one revoked (its Secret deleted), the
    // apiserver restarted so every watch must authenticate again. (TokenRequest will not issue
    // tokens shorter than 10 minutes; revoking the old one has the effect of its expiry.)
    let token2 = node_manager_token(&cluster, "nm-token-2");
    pod.rotate_token(&token2);
    cluster.kubectl_ok(&["delete", "secret", "nm-token-1", "-n", "kube-system"]).unwrap();
    // The apiserver caches a token's successful authentication for up to 10 s.
    wait("the old token revoked", 30, || {
        let (ok, text) = as_sa(&["get", "services", "-A"]);
        !ok && (text.contains("Unauthorized") || text.contains("provide credentials"))
    });
    cluster.stop_apiserver();
    std::thread::sleep(Duration::from_secs(1));
    cluster.start_apiserver().unwrap();
    create_api_service(&cluster);
    let mut with_api = web.clone();
    with_api.extend(lab_frontends("9090", ("203.0.113.20", "198.51.100.20"), ("2001:db8:e::20", "2001:db8:5::20")));
    with_api.sort();
    let want: Vec<(&str, &str)> = with_api.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    // Bounded by kube-rs rereading the token file once a minute; when the new token works, the
    // probe of `/version` succeeds and the watches start again at once instead of after their
    // backoff, grown to 30 s during the 401s (before that: up to 240 s).
    let rotated = std::time::Instant::now();
    wait_frontends(&scratch, "a Service created after the rotation", Duration::from_secs(150), &want, || {
        format!(
            "{}\nServices:\n{}\napiserver:\n{}",
            pod.log(),
            cluster.kubectl_ok(&["get", "svc", "-A", "-o", "wide"]).unwrap_or_default(),
            agent_requests(&cluster).join("\n")
        )
    });
    println!("recovered from the token rotation in {:.1?}", rotated.elapsed());
    assert!(pod.running(), "the agent kept running through the rotation:\n{}", pod.log());
    pod.stop();
    cluster.quiet();
}

/// The agent's requests as the audit log has them: "verb code URI" (for failure messages).
fn agent_requests(c: &Cluster) -> Vec<String> {
    c.audit_lines()
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["user"]["username"] == "system:serviceaccount:kube-system:node-manager")
        .filter(|e| e["stage"] == "ResponseComplete" || e["stage"] == "ResponseStarted")
        .map(|e| {
            format!(
                "{} {} {} {} {}",
                e["stageTimestamp"].as_str().unwrap_or(""),
                e["stage"].as_str().unwrap_or(""),
                e["verb"].as_str().unwrap_or(""),
                e["responseStatus"]["code"],
                e["requestURI"].as_str().unwrap_or("")
            )
        })
        .collect()
}

fn create_api_service(c: &Cluster) {
    c.apply(&service_yaml("shop", "api", &["198.51.100.20", "2001:db8:5::20"], &[9090])).unwrap();
    set_lb_ips(c, "shop", "api", &["203.0.113.20", "2001:db8:e::20"]);
}

#[test]
fn kube_proxy_nftables_mode_keeps_working_with_node_manager() {
    kube_proxy_story(ProxyMode::Nftables);
}

#[test]
fn kube_proxy_iptables_mode_keeps_working_with_node_manager() {
    kube_proxy_story(ProxyMode::Iptables);
}

/// The controller's cases against the real apiserver, the agent in the test's namespace
/// (maps only) with the ServiceAccount's token: live updates and deletions, a Service deleted
/// while the agent was down, the Node replaced with new pod CIDRs, the apiserver killed and
/// restarted mid-watch (the maps keep their state meanwhile), objects the apiserver accepts
/// but node-manager refuses (each reported once), and a watch resumed from a compacted
/// revision (410 Gone, then a new list).
#[test]
fn the_controller_follows_the_real_apiserver_through_changes_outages_and_compaction() {
    // Services' watches go straight to etcd (no watch cache), and the apiserver compacts etcd
    // every 2 s: a watch resumed from an old revision gets 410 Gone.
    let opts = Options {
        compaction_interval: Some(Duration::from_secs(2)),
        watch_cache_sizes: Some("services#0".into()),
        ..Options::default()
    };
    let mut cluster = Cluster::start(&opts).unwrap();
    cluster.kubectl_ok(&["apply", "--validate=strict", "-f", &manifest("node-manager-ipvs.yaml")]).unwrap();
    create_nodes(&cluster);
    create_web_service(&cluster);
    let token = node_manager_token(&cluster, "nm-token");
    let kubeconfig = cluster.write_kubeconfig("agent.kubeconfig", &token).unwrap();
    let scratch = Scratch::host();
    let kc = kubeconfig.to_str().unwrap().to_owned();
    let start_agent =
        || Agent::start(&scratch, &["--kubeconfig", &kc, "--node-name", NODE_A, "--external-cluster", "true"]);
    let web = lab_frontends("8080", (LB_V4, CLUSTER_V4), (LB_V6, CLUSTER_V6));
    let as_refs = |v: &[(String, String)]| -> Vec<(String, String)> {
        let mut v = v.to_vec();
        v.sort();
        v
    };
    let wait_exact = |what: &str, want: &[(String, String)], agent: &Agent| {
        let want: Vec<(&str, &str)> = want.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        wait_frontends(&scratch, what, Duration::from_secs(30), &want, || agent.log());
    };

    let agent = start_agent();
    wait_exact("initial list", &web, &agent);
    wait_pod_cidrs(&scratch, &["192.0.2.0/25", "2001:db8:1::/64"], || agent.log());

    // Live: a new Service, a changed LB IP, a deletion.
    create_api_service(&cluster);
    let api = lab_frontends("9090", ("203.0.113.20", "198.51.100.20"), ("2001:db8:e::20", "2001:db8:5::20"));
    wait_exact("created", &as_refs(&[web.clone(), api.clone()].concat()), &agent);
    set_lb_ips(&cluster, "shop", "api", &["203.0.113.21", "2001:db8:e::20"]);
    let api2 = lab_frontends("9090", ("203.0.113.21", "198.51.100.20"), ("2001:db8:e::20", "2001:db8:5::20"));
    wait_exact("LB IP changed", &as_refs(&[web.clone(), api2.clone()].concat()), &agent);
    cluster.kubectl_ok(&["delete", "svc", "api", "-n", "shop"]).unwrap();
    wait_exact("deleted", &web, &agent);

    // Objects the apiserver accepts and node-manager refuses, each reported once by name: an
    // SCTP port, an IPv6 LB IP on an IPv4-only Service, an LB IP:port already claimed (the
    // Service whose name sorts first keeps it: shop/web before shop/yclash).
    create_refused_services(&cluster);
    let accepted = lab_frontends("7070", ("203.0.113.40", "198.51.100.40"), ("2001:db8:e::40", "2001:db8:5::40"));
    let mut want = as_refs(&[web.clone(), accepted].concat());
    want.push(("203.0.113.41:0/ICMP".into(), "198.51.100.41".into()));
    want.push(("203.0.113.41:7070/TCP".into(), "198.51.100.41".into()));
    want.sort();
    wait_exact("refused objects", &want, &agent);
    std::thread::sleep(Duration::from_secs(2));
    let log = agent.log();
    for needle in [
        "shop/sctp: port 7070 protocol SCTP",
        "shop/v4only: external address 2001:db8:e::41",
        "frontend 203.0.113.10:8080/TCP is also claimed",
    ] {
        assert_eq!(log.matches(needle).count(), 1, "{needle:?} reported once:\n{log}");
    }
    cluster.kubectl_ok(&["delete", "svc", "sctp", "v4only", "yclash", "-n", "shop"]).unwrap();
    wait_exact("refused objects deleted", &web, &agent);

    // The apiserver killed mid-watch: the maps keep their state; after the restart, changes
    // are followed again.
    cluster.stop_apiserver();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(frontends(&scratch).len(), web.len(), "entries stay in force while the API is down");
    cluster.start_apiserver().unwrap();
    create_api_service(&cluster);
    wait_exact("after the restart", &as_refs(&[web.clone(), api.clone()].concat()), &agent);

    // Down while a Service is deleted, and the apiserver down too when the agent starts again:
    // it adopts the pinned maps and serves them as they are (not ready: /readyz 503); once the
    // apiserver is back, its list sweeps the deleted Service's entries.
    assert!(agent.stop(), "the agent stops cleanly on SIGTERM");
    cluster.kubectl_ok(&["delete", "svc", "api", "-n", "shop"]).unwrap();
    cluster.stop_apiserver();
    let agent = Agent::start(
        &scratch,
        &["--kubeconfig", &kc, "--node-name", NODE_A, "--external-cluster", "true", "--metrics-addr", "127.0.0.1:0"],
    );
    wait("the agent reports the API unreachable", 30, || agent.log().contains("Kubernetes API: not ready"));
    assert_eq!(frontends(&scratch).len(), web.len() + api.len(), "nothing is flushed before a list completes");
    let metrics = common::agent::metrics_addr(&agent.log()).expect("the metrics address in the log");
    assert_eq!(common::agent::http_get(metrics, "/readyz").unwrap().0, 503, "not ready without a list");
    cluster.start_apiserver().unwrap();
    wait_exact("deleted while down", &web, &agent);
    wait("ready", 30, || common::agent::http_get(metrics, "/readyz").is_ok_and(|(code, _)| code == 200));
    let (_, body) = common::agent::http_get(metrics, "/metrics").unwrap();
    assert!(
        body.lines().any(|l| l.starts_with(r#"node_manager_watch_restarts_total{resource="Service"}"#)),
        "failed watches are counted:\n{body}"
    );

    // More shapes of Service: externalIPs of a ClusterIP Service count; a headless Service
    // adds nothing.
    let ext = "apiVersion: v1\nkind: Service\nmetadata: {name: ext, namespace: shop}\nspec:\n  clusterIP: '198.51.100.50'\n  \
               externalIPs: ['203.0.113.50']\n  ports:\n  - {name: dns, port: 53, protocol: UDP}\n";
    cluster.apply(ext).unwrap();
    let headless = "apiVersion: v1\nkind: Service\nmetadata: {name: headless, namespace: shop}\nspec:\n  clusterIP: None\n  \
                    externalIPs: ['203.0.113.51']\n  ports:\n  - {name: h, port: 80, protocol: TCP}\n";
    cluster.apply(headless).unwrap();
    let mut want = web.clone();
    want.push(("203.0.113.50:0/ICMP".into(), "198.51.100.50".into()));
    want.push(("203.0.113.50:53/UDP".into(), "198.51.100.50".into()));
    want.sort();
    wait_exact("externalIPs and headless", &want, &agent);
    cluster.kubectl_ok(&["delete", "svc", "ext", "headless", "-n", "shop"]).unwrap();
    wait_exact("externalIPs deleted", &web, &agent);

    // The Node replaced with other pod CIDRs (spec.podCIDRs cannot change in place).
    cluster.kubectl_ok(&["delete", "node", NODE_A]).unwrap();
    create_node(&cluster, NODE_A, &["192.0.2.64/26", "2001:db8:1:1::/64"], &["192.0.2.129", "2001:db8:2::1"]);
    wait_pod_cidrs(&scratch, &["192.0.2.64/26", "2001:db8:1:1::/64"], || agent.log());

    // 410 Gone: the agent frozen, its watch cut by an apiserver restart, the revisions it knew
    // compacted away; resumed, it must list again and end with the right state.
    let pid = agent.child.id() as i32;
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    cluster.stop_apiserver();
    cluster.start_apiserver().unwrap();
    create_api_service(&cluster);
    for i in 0..5 {
        cluster
            .kubectl_ok(&["annotate", "svc", "web", "-n", "shop", "--overwrite", &format!("nml/round={i}")])
            .unwrap();
    }
    std::thread::sleep(Duration::from_secs(5)); // at least two compactions
    let log_before = agent.log().len();
    let requests_before = agent_requests(&cluster).len();
    unsafe { libc::kill(pid, libc::SIGCONT) };
    wait_exact("after 410 Gone", &as_refs(&[web.clone(), api.clone()].concat()), &agent);
    let resumed = agent.log()[log_before..].to_owned();
    assert!(resumed.contains("too old") && resumed.contains("Expired"), "the watch got 410 Gone:\n{resumed}");
    // ... and the agent listed the Services again (the audit log has the request).
    let after = agent_requests(&cluster)[requests_before..].to_vec();
    assert!(
        after.iter().any(|r| r.contains(" list 200 /api/v1/services") && !r.contains("watch=true")),
        "a new list after the 410:\n{}",
        after.join("\n")
    );
    // Every watch asked for bookmarks (kube-rs' watcher does; they keep a quiet watch's
    // resourceVersion fresh, so fewer 410s).
    let watches: Vec<String> = agent_requests(&cluster).into_iter().filter(|r| r.contains("watch=true")).collect();
    assert!(!watches.is_empty() && watches.iter().all(|w| w.contains("allowWatchBookmarks=true")), "{watches:#?}");
    // The Node is asked for by name (a field selector), never the whole list.
    let node_requests: Vec<String> =
        agent_requests(&cluster).into_iter().filter(|r| r.contains("/api/v1/nodes")).collect();
    assert!(
        !node_requests.is_empty() && node_requests.iter().all(|r| r.contains("fieldSelector=metadata.name%3Dnode-a")),
        "{node_requests:#?}"
    );
    cluster.quiet();
}

fn create_refused_services(c: &Cluster) {
    let sctp = "apiVersion: v1\nkind: Service\nmetadata: {name: sctp, namespace: shop}\nspec:\n  type: LoadBalancer\n  \
                externalTrafficPolicy: Local\n  ipFamilyPolicy: RequireDualStack\n  clusterIP: '198.51.100.40'\n  clusterIPs: ['198.51.100.40', '2001:db8:5::40']\n  \
                ports:\n  - {name: t, port: 7070, protocol: TCP}\n  - {name: u, port: 7070, protocol: UDP}\n  - {name: s, port: 7070, protocol: SCTP}\n";
    c.apply(sctp).unwrap();
    set_lb_ips(c, "shop", "sctp", &["203.0.113.40", "2001:db8:e::40"]);
    let v4only = "apiVersion: v1\nkind: Service\nmetadata: {name: v4only, namespace: shop}\nspec:\n  type: LoadBalancer\n  \
                  externalTrafficPolicy: Local\n  clusterIP: '198.51.100.41'\n  ports:\n  - {name: t, port: 7070, protocol: TCP}\n";
    c.apply(v4only).unwrap();
    set_lb_ips(c, "shop", "v4only", &["203.0.113.41", "2001:db8:e::41"]);
    let clash = "apiVersion: v1\nkind: Service\nmetadata: {name: yclash, namespace: shop}\nspec:\n  type: LoadBalancer\n  \
                 externalTrafficPolicy: Local\n  clusterIP: '198.51.100.42'\n  ports:\n  - {name: t, port: 8080, protocol: TCP}\n";
    c.apply(clash).unwrap();
    set_lb_ips(c, "shop", "yclash", &[LB_V4]);
}

/// 10,000 Services applied to the real apiserver (IPv6-only: the IPv4 documentation range
/// holds only 254 cluster IPs), each with an external IP; the agent, started after, must have
/// every one of them in the map. The time from the agent's start to the last entry is printed
/// (a figure, measured properly by `cargo xtask bench`; not a limit here).
#[test]
fn ten_thousand_services_from_the_real_apiserver_reach_the_map() {
    let mut cluster = Cluster::start(&Options::default()).unwrap();
    cluster.kubectl_ok(&["apply", "--validate=strict", "-f", &manifest("node-manager-ipvs.yaml")]).unwrap();
    create_nodes(&cluster);
    create_namespace(&cluster, "scale");
    const N: u32 = 10_000;
    const CHUNKS: u32 = 4;
    let mut lists = vec![String::new(); CHUNKS as usize];
    for i in 0..N {
        lists[(i % CHUNKS) as usize].push_str(&format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: scale}}\nspec:\n  \
             ipFamilies: [IPv6]\n  externalIPs: ['2001:db8:e::1:{i:x}']\n  ports:\n  - {{name: t, port: 8080, protocol: TCP}}\n"
        ));
    }
    let applied = Instant::now();
    let inputs: Vec<&str> = lists.iter().map(String::as_str).collect();
    cluster.kubectl_stdin_parallel(&["create", "-f", "-", "-o", "name"], &inputs).unwrap();
    println!("created {N} Services with kubectl in {:?}", applied.elapsed());
    let token = node_manager_token(&cluster, "nm-token");
    let kubeconfig = cluster.write_kubeconfig("agent.kubeconfig", &token).unwrap();
    let scratch = Scratch::host();
    let started = Instant::now();
    let agent = Agent::start(
        &scratch,
        &["--kubeconfig", kubeconfig.to_str().unwrap(), "--node-name", NODE_A, "--external-cluster", "true"],
    );
    // Each Service gives a TCP entry and an ICMP echo entry.
    let want = 2 * N as usize;
    let mut have = 0;
    while have != want {
        assert!(started.elapsed() < Duration::from_secs(120), "{have} of {want} entries after 120 s:\n{}", agent.log());
        std::thread::sleep(Duration::from_millis(100));
        have = frontends(&scratch).len();
    }
    println!("agent start to {want} map entries from the real apiserver: {:?}", started.elapsed());
    let sample = frontends(&scratch);
    assert!(sample.keys().any(|k| k == "[2001:db8:e::1:270f]:8080/TCP"), "the last Service is in the map");
    cluster.quiet();
}
