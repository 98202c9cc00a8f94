//! The lab's real control plane: etcd and kube-apiserver start, answer with the pinned
//! version over TLS verified against the lab CA, are reachable from a lab namespace through
//! the bridge, serve the real kube-proxy there, and leave nothing behind. Needs root and
//! `cargo xtask kube`.
use std::time::Duration;

use lab::{
    Lab, Ns,
    kube::{ApiBridge, Cluster, KubeProxy, Options, ProxyMode, leftover_dirs},
};

#[test]
fn control_plane_bridge_and_kube_proxy_start_and_clean_up() {
    let dir;
    {
        let mut cluster = Cluster::start(&Options::default()).unwrap();
        dir = cluster.dir.clone();
        assert!(cluster.version().unwrap().starts_with("v1."), "{}", cluster.version().unwrap());
        // RBAC is on: an unknown token is refused.
        let kc = cluster.write_kubeconfig("bad.kubeconfig", "not-a-token").unwrap();
        let out = std::process::Command::new(cluster.bin.join("kubectl"))
            .arg(format!("--kubeconfig={}", kc.display()))
            .args(["get", "ns"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && (err.contains("Unauthorized") || err.contains("provide credentials")),
            "{err}"
        );

        let lab = Lab::for_real_kube_proxy().unwrap();
        let node = lab.netns_path(Ns::Node);
        let _bridge = ApiBridge::into_netns(&node, cluster.apiserver_port).unwrap();
        // curl-free check from inside the namespace: kubectl there, verifying the lab CA.
        let out = lab
            .command(Ns::Node, cluster.bin.join("kubectl"))
            .arg(format!("--kubeconfig={}", cluster.admin_kubeconfig().display()))
            .args(["get", "--raw=/readyz"])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok", "{}", String::from_utf8_lossy(&out.stderr));

        cluster
            .apply("apiVersion: v1\nkind: Node\nmetadata: {name: node-a}\nspec: {podCIDRs: ['192.0.2.0/25']}\n")
            .unwrap();
        cluster
            .kubectl_ok(&[
                "patch",
                "node",
                "node-a",
                "--subresource=status",
                "--type=merge",
                "-p",
                r#"{"status":{"addresses":[{"type":"InternalIP","address":"192.0.2.129"}]}}"#,
            ])
            .unwrap();
        for mode in [ProxyMode::Nftables, ProxyMode::Iptables] {
            let kp = KubeProxy::start(&cluster, &node, "node-a", mode, "192.0.2.0/25").unwrap();
            assert_eq!(kp.reported_mode().unwrap(), mode.name());
            drop(kp);
        }
        let tables = lab.command(Ns::Node, "nft").args(["list", "tables"]).output().unwrap();
        assert!(!String::from_utf8_lossy(&tables.stdout).contains("kube-proxy"), "kube-proxy --cleanup ran");
        cluster.stop_apiserver();
        std::thread::sleep(Duration::from_millis(200));
        cluster.start_apiserver().unwrap();
        cluster.quiet();
    }
    assert!(!dir.exists(), "{} removed", dir.display());
    assert!(!leftover_dirs().iter().any(|d| d == &dir));
}
