//! Bad Service objects at scale: the agent (real binary, kube-rs) lists 11,000 Services from
//! `fake-apiserver`, 10,000 valid and 1,000 malformed in five ways (spec or status that does
//! not decode, a load-balancer address that is no IP, a port out of range, a type that is no
//! string). Every valid Service must be applied — the pinned map holds exactly their entries —
//! and each malformed one reported exactly once by name, also after events and resyncs; a
//! malformed update of a valid Service keeps its last good version. Needs root (bpffs).
//!
//! `fake-apiserver` is a stand-in here, for the one case the real apiserver cannot produce: it
//! validates every Service it stores, so it never serves objects that do not decode (a
//! conversion webhook, an aggregated API or an etcd written behind its back could). Objects the
//! real apiserver accepts but node-manager must refuse are tested against it in
//! `real_kubernetes.rs`.
mod common;

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use common::{
    agent::{Agent, Scratch},
    scale::{NODE, node, pinned_frontends, valid_frontends, valid_service},
};
use fake_apiserver::FakeApiServer;
use serde_json::{Value, json};

const VALID: u32 = 10_000;
const MALFORMED: u32 = 1_000;

/// The n-th malformed Service `bad/mNNNN`, with exactly one defect.
fn malformed_service(n: u32) -> Value {
    let mut svc = valid_service(50_000 + n);
    svc["metadata"] = json!({"namespace": "bad", "name": format!("m{n:04}")});
    match n % 5 {
        0 => svc["spec"]["ports"] = json!("8080"),
        1 => svc["status"]["loadBalancer"]["ingress"] = json!({"ip": "203.0.113.1"}),
        2 => svc["status"]["loadBalancer"]["ingress"][0]["ip"] = json!("not-an-ip"),
        3 => svc["spec"]["ports"][0]["port"] = json!(70000),
        _ => svc["spec"]["type"] = json!(42),
    }
    svc
}

fn malformed_name(n: u32) -> String {
    format!("bad/m{n:04}:")
}

/// Log lines at WARN level (ANSI colours and all).
fn warnings(log: &str) -> Vec<&str> {
    log.lines().filter(|l| l.contains("WARN")).collect()
}

#[test]
fn ten_thousand_valid_services_apply_and_each_of_a_thousand_malformed_ones_is_reported_once() {
    let server = FakeApiServer::start().unwrap();
    let scratch = Scratch::host();
    let kubeconfig: PathBuf = scratch.file("kubeconfig");
    std::fs::write(&kubeconfig, server.kubeconfig()).unwrap();
    server.apply(node(&["192.0.2.0/25"]));
    // Interleaved, so that the list's pages mix both kinds.
    for n in 0..VALID {
        server.apply(valid_service(n));
        if n.is_multiple_of(10) {
            server.apply(malformed_service(n / 10));
        }
    }
    assert_eq!(server.count("services"), (VALID + MALFORMED) as usize);

    let started = Instant::now();
    let agent = Agent::start(
        &scratch,
        &["--kubeconfig", kubeconfig.to_str().unwrap(), "--node-name", NODE, "--resync-period", "2s"],
    );
    let want = valid_frontends(VALID);
    let mut have = pinned_frontends(&scratch.bpffs);
    while have != want {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "frontends: {} entries, want {}\nagent log (tail):\n{}",
            have.len(),
            want.len(),
            tail(&agent.log())
        );
        std::thread::sleep(Duration::from_millis(100));
        have = pinned_frontends(&scratch.bpffs);
    }
    eprintln!("{} entries of {VALID} valid Services applied {:.1?} after start", want.len(), started.elapsed());

    // An event (one more valid Service) and two resyncs later, still one report each.
    server.apply(valid_service(VALID));
    let want = valid_frontends(VALID + 1);
    let deadline = Instant::now() + Duration::from_secs(15);
    while pinned_frontends(&scratch.bpffs) != want {
        assert!(Instant::now() < deadline, "the Service added by an event was not applied");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(5));
    let log = agent.log();
    assert!(
        log.matches("frontends synced").count() >= 3,
        "expected an initial sync, an event and resyncs:\n{}",
        tail(&log)
    );
    let warned = warnings(&log);
    for n in 0..MALFORMED {
        let name = malformed_name(n);
        let lines: Vec<&&str> = warned.iter().filter(|l| l.contains(&name)).collect();
        assert_eq!(lines.len(), 1, "{name} must be reported exactly once, found {lines:#?}");
    }
    assert!(!warned.iter().any(|l| l.contains("ok/s")), "a valid Service was warned about");

    // A malformed update of a valid Service keeps its last good version (reported once); a
    // corrected malformed one is applied.
    let mut broken = valid_service(7);
    broken["spec"]["ports"] = json!("oops");
    server.apply(broken);
    let mut fixed = valid_service(VALID + 1);
    fixed["metadata"] = json!({"namespace": "bad", "name": "m0000"});
    server.apply(fixed);
    let want = valid_frontends(VALID + 2);
    let deadline = Instant::now() + Duration::from_secs(15);
    while pinned_frontends(&scratch.bpffs) != want {
        assert!(
            Instant::now() < deadline,
            "the corrected Service was not applied, or the broken one's entry was lost:\n{}",
            tail(&agent.log())
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(3));
    let log = agent.log();
    let kept: Vec<&str> = warnings(&log).into_iter().filter(|l| l.contains("ok/s00007:")).collect();
    assert_eq!(kept.len(), 1, "{kept:#?}");
    assert!(kept[0].contains("keeping its last good version"), "{}", kept[0]);
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}
