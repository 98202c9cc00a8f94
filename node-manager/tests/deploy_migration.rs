//! `deploy/remove-network-node-manager-rules.sh`, the migration step for network-node-manager
//! users: in a network namespace of its own, network-node-manager's chains and rules (every
//! version's, exactly as it created them: shared/reference/prior-art-seeds.md §1.5, §2.3) are
//! installed with iptables-legacy (IPv4 and IPv6) and iptables-nft, next to kube-proxy's
//! KUBE-MARK-MASQ chain and an unrelated rule; the script must remove all of theirs, keep the
//! rest, and find nothing on a second run. Needs root.
mod common;

use std::process::{Command, Output};

use common::deploy::deploy_dir;

/// A named network namespace (`nml-` prefix: `cargo xtask test` reports leftovers), deleted on
/// drop.
struct Netns(String);

impl Netns {
    fn new() -> Netns {
        let name = format!("nml-migr-{}", std::process::id());
        let ok = Command::new("ip").args(["netns", "add", &name]).status().unwrap().success();
        assert!(ok, "ip netns add {name}");
        Netns(name)
    }

    fn run(&self, program: &str, args: &[&str]) -> Output {
        Command::new("ip").args(["netns", "exec", &self.0, program]).args(args).output().unwrap()
    }

    fn ok(&self, program: &str, args: &[&str]) {
        let out = self.run(program, args);
        assert!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    fn save(&self, ipt: &str) -> String {
        let out = self.run(&format!("{ipt}-save"), &[]);
        assert!(out.status.success(), "{ipt}-save: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// network-node-manager's rules (v1.0–v1.3 in filter and nat, v1.1.0's raw DNS rules,
/// ipvs-node-controller's nat chains), for one iptables binary.
fn install_theirs(ns: &Netns, ipt: &str, v6: bool) {
    let (pod, ext, cluster) = if v6 {
        ("2001:db8:1::/64", "2001:db8:e::10", "2001:db8:5::10")
    } else {
        ("192.0.2.0/25", "203.0.113.10", "198.51.100.10")
    };
    let w = |table: &str, args: &str| {
        let mut full = vec!["-w", "5", "-t", table];
        full.extend(args.split_whitespace());
        ns.ok(ipt, &full);
    };
    // kube-proxy's chain and a rule of someone else: both must stay.
    w("nat", "-N KUBE-MARK-MASQ");
    w("nat", "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000");
    w("filter", "-A INPUT -p tcp --dport 22 -j ACCEPT");
    // Base chains and their jumps.
    w("filter", "-N NMANAGER_INPUT");
    w("filter", "-I INPUT 1 -j NMANAGER_INPUT");
    w("nat", "-N NMANAGER_PREROUTING");
    w("nat", "-I PREROUTING 1 -j NMANAGER_PREROUTING");
    w("nat", "-N NMANAGER_OUTPUT");
    w("nat", "-I OUTPUT 1 -j NMANAGER_OUTPUT");
    // Drop invalid in INPUT.
    w("filter", "-N NMANAGER_DROP_INVALID_INPUT");
    w("filter", "-I NMANAGER_DROP_INVALID_INPUT 1 -m conntrack --ctstate INVALID -j DROP");
    w("filter", "-I NMANAGER_INPUT 1 -j NMANAGER_DROP_INVALID_INPUT");
    // External -> cluster IP.
    w("nat", "-N NMANAGER_EX_CLUS_PREROUTING");
    w("nat", "-N NMANAGER_EX_CLUS_OUTPUT");
    w("nat", "-I NMANAGER_PREROUTING 1 -j NMANAGER_EX_CLUS_PREROUTING");
    w("nat", "-I NMANAGER_OUTPUT 1 -j NMANAGER_EX_CLUS_OUTPUT");
    for target in ["-j KUBE-MARK-MASQ".to_owned(), format!("-j DNAT --to-destination {cluster}")] {
        w("nat", &format!("-m comment --comment default/lb -A NMANAGER_EX_CLUS_PREROUTING -s {pod} -d {ext} {target}"));
        w(
            "nat",
            &format!(
                "-m comment --comment default/lb -A NMANAGER_EX_CLUS_OUTPUT -m addrtype --src-type LOCAL -d {ext} {target}"
            ),
        );
    }
    // v1.1.0's DNS NOTRACK rules in raw.
    w("raw", "-N NMANAGER_PREROUTING");
    w("raw", "-I PREROUTING 1 -j NMANAGER_PREROUTING");
    w("raw", "-N NMANAGER_OUTPUT");
    w("raw", "-I OUTPUT 1 -j NMANAGER_OUTPUT");
    w("raw", "-N NMANAGER_NOT_DNS_PREROUTING");
    w("raw", "-A NMANAGER_NOT_DNS_PREROUTING -p udp -m udp --sport 53 -j CT --notrack");
    w("raw", "-I NMANAGER_PREROUTING 1 -j NMANAGER_NOT_DNS_PREROUTING");
    w("raw", "-N NMANAGER_NOT_DNS_OUTPUT");
    w("raw", "-A NMANAGER_NOT_DNS_OUTPUT -p udp -m udp --dport 53 -j CT --notrack");
    w("raw", "-I NMANAGER_OUTPUT 1 -j NMANAGER_NOT_DNS_OUTPUT");
    // ipvs-node-controller.
    w("nat", "-N IPVS_PREROUTING");
    w("nat", "-N IPVS_OUTPUT");
    w("nat", "-I PREROUTING 1 -j IPVS_PREROUTING");
    w("nat", "-I OUTPUT 1 -j IPVS_OUTPUT");
    w("nat", &format!("-A IPVS_PREROUTING -s {pod} -d {ext} -j DNAT --to-destination {cluster}"));
}

fn theirs_in(saved: &str) -> Vec<&str> {
    saved.lines().filter(|l| l.contains("NMANAGER") || l.contains("IPVS_")).collect()
}

#[test]
fn the_migration_script_removes_every_chain_network_node_manager_left_and_nothing_else() {
    let ns = Netns::new();
    let variants = [("iptables-legacy", false), ("ip6tables-legacy", true), ("iptables-nft", false)];
    for (ipt, v6) in variants {
        install_theirs(&ns, ipt, v6);
        assert!(theirs_in(&ns.save(ipt)).len() > 20, "{ipt}: rules not installed");
    }

    let script = deploy_dir().join("remove-network-node-manager-rules.sh");
    let out = ns.run("sh", &[script.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "script failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    for (ipt, _) in variants {
        let saved = ns.save(ipt);
        assert!(theirs_in(&saved).is_empty(), "{ipt} still has:\n{}", theirs_in(&saved).join("\n"));
        assert!(saved.contains(":KUBE-MARK-MASQ"), "{ipt}: kube-proxy's chain was removed");
        assert!(saved.contains("-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT"), "{ipt}: an unrelated rule was removed");
        // 7 jumps and 12 chains per variant.
        assert!(
            stdout.lines().filter(|l| l.starts_with(&format!("{ipt} ")) && l.contains(" -X ")).count() == 12,
            "{stdout}"
        );
    }
    assert!(stdout.contains("removed 57 chain(s) and jump(s)"), "{stdout}");

    let again = ns.run("sh", &[script.to_str().unwrap()]);
    assert!(again.status.success());
    assert_eq!(String::from_utf8_lossy(&again.stdout).trim(), "removed 0 chain(s) and jump(s) of network-node-manager");
}
