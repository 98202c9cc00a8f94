//! The agent started the way the DaemonSet's pod runs it, from the DaemonSet object the real
//! apiserver holds: its `args` and `env` (with `NODE_NAME` from `spec.nodeName`), the
//! in-cluster configuration (a TokenRequest token and the CA at
//! /var/run/secrets/kubernetes.io/serviceaccount, `KUBERNETES_SERVICE_HOST/PORT`), its volume
//! mounts (bpffs at /sys/fs/bpf; the host's cgroup tree at /host/sys/fs/cgroup, read-only), a
//! read-only root filesystem, and only the capabilities its securityContext adds (all others
//! dropped, no new privileges).
//!
//! The container is a mount namespace (`unshare --mount`) with a tmpfs root (/usr of the host
//! bound read-only, /proc, the node namespace's /sys) entered with `chroot`, in the node's
//! network namespace (hostNetwork). Two stand-ins, named: the "host's cgroup tree" is this
//! machine's layout (a tmpfs with cgroup2 at `unified/`, as a hybrid host has it) but with the
//! test's own cgroup bound at `unified/` (tests never hook the machine's root cgroup), and the
//! apiserver is reached at 127.0.0.1 through [`lab::kube::ApiBridge`] instead of the
//! `kubernetes` Service's cluster IP (no kube-proxy routes to a loopback apiserver). Seccomp's
//! RuntimeDefault profile is not applied (no container runtime here).
#![allow(dead_code)]
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use serde_json::Value;

use super::agent::{BIN, Scratch};

pub const SA_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// The container of the DaemonSet object `ds` (as `kubectl get ds -o json` prints it).
pub fn container(ds: &Value) -> &Value {
    &ds["spec"]["template"]["spec"]["containers"][0]
}

/// `NAME=value` for every `env` entry of the container; `fieldRef: spec.nodeName` resolves to
/// `node_name`. Any other `valueFrom` is an error (the lab could not resolve it truthfully).
pub fn env_of(ds: &Value, node_name: &str) -> Vec<(String, String)> {
    container(ds)["env"]
        .as_array()
        .expect("the container has env")
        .iter()
        .map(|e| {
            let name = e["name"].as_str().unwrap().to_owned();
            if let Some(v) = e.get("value") {
                return (name, v.as_str().unwrap_or_default().to_owned());
            }
            let field = e["valueFrom"]["fieldRef"]["fieldPath"].as_str();
            assert_eq!(field, Some("spec.nodeName"), "env {name}: cannot resolve {e}");
            (name, node_name.to_owned())
        })
        .collect()
}

/// The capabilities the container's securityContext adds (drop must be `[ALL]`).
pub fn added_capabilities(ds: &Value) -> Vec<String> {
    let caps = &container(ds)["securityContext"]["capabilities"];
    assert_eq!(caps["drop"], serde_json::json!(["ALL"]), "the manifest drops every capability first");
    caps["add"].as_array().unwrap().iter().map(|c| c.as_str().unwrap().to_lowercase()).collect()
}

/// One pod of the DaemonSet: the agent process (killed on drop) and its log.
pub struct DaemonSetPod {
    child: Option<Child>,
    pub log: PathBuf,
    pub token_file: PathBuf,
    root: PathBuf,
}

const CONTAINER_SCRIPT: &str = r#"
set -eu
R="$NM_ROOT"
mount -t tmpfs -o mode=755 nml-pod-root "$R"
mkdir -p "$R/usr" "$R/proc" "$R/sys" "$R/dev" "$R/app" "$R$NM_SA_DIR" "$R/host/sys/fs/cgroup"
for l in bin sbin lib lib64; do
  if [ -L "/$l" ]; then ln -s "$(readlink "/$l")" "$R/$l"; elif [ -d "/$l" ]; then mkdir "$R/$l"; mount --rbind "/$l" "$R/$l"; fi
done
mount --rbind /usr "$R/usr"; mount -o remount,bind,ro "$R/usr"
mount -t proc proc "$R/proc"
mount -t sysfs sysfs "$R/sys"
mount --bind "$NM_BPFFS" "$R/sys/fs/bpf"
mount --rbind /dev "$R/dev"
# hostPath /sys/fs/cgroup, readOnly: this host's hybrid layout (tmpfs, cgroup2 at unified/),
# with the test's cgroup in place of the machine's root.
mount -t tmpfs -o mode=755 nml-host-cgroup "$R/host/sys/fs/cgroup"
mkdir "$R/host/sys/fs/cgroup/unified"
mount --bind "$NM_CGROUP" "$R/host/sys/fs/cgroup/unified"
mount -o remount,bind,ro "$R/host/sys/fs/cgroup/unified"
mount -o remount,ro "$R/host/sys/fs/cgroup"
mount --bind "$NM_SA" "$R$NM_SA_DIR"; mount -o remount,bind,ro "$R$NM_SA_DIR"
touch "$R/app/node-manager"; mount --bind "$NM_BIN" "$R/app/node-manager"
mount -o remount,ro "$R"
exec chroot "$R" /usr/bin/setpriv --no-new-privs --bounding-set="$NM_CAPS" --inh-caps="$NM_CAPS" \
  -- /usr/bin/env -i $NM_ENV /app/node-manager "$@"
"#;

impl DaemonSetPod {
    /// Starts the agent in `netns` (the node's) as the DaemonSet object `ds` says, with
    /// `token` as its ServiceAccount token, `ca` as its `ca.crt`, the apiserver at
    /// `127.0.0.1:port`. `scratch` gives the bpffs (mounted at /sys/fs/bpf) and the cgroup
    /// (at /host/sys/fs/cgroup/unified).
    pub fn start(
        scratch: &Scratch,
        netns: &Path,
        ds: &Value,
        node_name: &str,
        token: &str,
        ca: &Path,
        port: u16,
    ) -> Self {
        let root = scratch.file(&format!("pod-root-{node_name}"));
        let sa = scratch.file(&format!("sa-{node_name}"));
        fs::create_dir_all(&root).unwrap();
        fs::create_dir_all(&sa).unwrap();
        let token_file = sa.join("token");
        fs::write(&token_file, token).unwrap();
        fs::copy(ca, sa.join("ca.crt")).unwrap();
        fs::write(sa.join("namespace"), "kube-system").unwrap();
        let mut env = env_of(ds, node_name);
        env.push(("KUBERNETES_SERVICE_HOST".into(), "127.0.0.1".into()));
        env.push(("KUBERNETES_SERVICE_PORT".into(), port.to_string()));
        for (k, v) in &env {
            assert!(!v.contains(char::is_whitespace), "env {k}={v:?}: the lab passes values without spaces");
        }
        let env_words: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let caps: Vec<String> = added_capabilities(ds).iter().map(|c| format!("+{c}")).collect();
        let caps = format!("-all,{}", caps.join(","));
        let args: Vec<String> =
            container(ds)["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap().to_owned()).collect();
        let log = scratch.file(&format!("pod-{node_name}.log"));
        let logf = fs::File::create(&log).unwrap();
        let child = Command::new("nsenter")
            .arg(format!("--net={}", netns.display()))
            .args(["--", "unshare", "--mount", "--propagation", "private", "--", "sh", "-c", CONTAINER_SCRIPT, "sh"])
            .args(&args)
            .env("NM_ROOT", &root)
            .env("NM_SA_DIR", SA_DIR)
            .env("NM_SA", &sa)
            .env("NM_BPFFS", &scratch.bpffs)
            .env("NM_CGROUP", &scratch.cgroup.path)
            .env("NM_BIN", BIN)
            .env("NM_CAPS", caps)
            .env("NM_ENV", env_words.join(" "))
            .stdin(Stdio::null())
            .stdout(logf.try_clone().unwrap())
            .stderr(logf)
            .spawn()
            .expect("starting the DaemonSet pod");
        DaemonSetPod { child: Some(child), log, token_file, root }
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether the agent is still running.
    pub fn running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// Replaces the token file atomically, as the kubelet does when it rotates a projected token.
    pub fn rotate_token(&self, token: &str) {
        let tmp = self.token_file.with_extension("new");
        fs::write(&tmp, token).unwrap();
        fs::rename(&tmp, &self.token_file).unwrap();
    }

    /// SIGTERM, then wait (the agent leaves its pins; `Scratch` cleans up).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SIGTERM to the agent: it is the only process left in the chain after the execs.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while c.try_wait().ok().flatten().is_none() && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
            // The chain nsenter → unshare → sh → chroot → setpriv → env → agent only execs, so
            // the child's pid is the agent's: nothing of the pod may outlive it.
            // SAFETY: signal 0 only checks for existence.
            assert!(unsafe { libc::kill(c.id() as i32, 0) } != 0, "the pod's agent (pid {}) is gone", c.id());
        }
    }
}

impl Drop for DaemonSetPod {
    fn drop(&mut self) {
        self.stop();
        // The mounts lived in the pod's own mount namespace and went with it.
        let _ = fs::remove_dir(&self.root);
    }
}
