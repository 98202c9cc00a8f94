//! `cargo xtask test`: the project's test command.

use std::{path::Path, time::Instant};

use anyhow::{Result, bail};
use clap::Args;

use crate::cmd::{Cmd, elapsed, is_root, step};

/// Network namespaces the tests create start with this.
const NETNS_PREFIX: &str = "nml-";
/// Where the agent pins its BPF objects.
const BPF_PIN_DIR: &str = "/sys/fs/bpf/node-manager";

#[derive(Args)]
pub struct TestArgs {
    /// Skip `cargo xtask setup` (for quick local runs).
    #[arg(long)]
    no_setup: bool,
    /// Skip `cargo xtask lint` (for quick local runs).
    #[arg(long)]
    no_lint: bool,
    /// Skip the benchmark smoke run.
    #[arg(long)]
    no_bench: bool,
    /// Skip the cross build for the other architecture and its check under qemu-user.
    #[arg(long)]
    no_cross: bool,
    /// Skip the guests: kernel 5.10 (`cargo xtask vm --kernel 5.10`, several minutes under TCG)
    /// and the IPVS guest (kernel 6.12, kube-proxy in IPVS mode).
    #[arg(long)]
    no_vm: bool,
    /// Extra arguments for the test harness, after `--` (e.g. a test name filter).
    #[arg(last = true)]
    harness_args: Vec<String>,
}

pub fn run(args: &TestArgs) -> Result<()> {
    if !is_root() {
        bail!(
            "the tests need root: they create network namespaces and load and attach BPF \
             programs; run `cargo xtask test` as root"
        );
    }
    if args.no_setup {
        step("test: skipping setup (--no-setup)");
    } else {
        crate::setup::run()?;
    }
    // A lint failure does not stop the tests: CI then shows both, and fails at the end.
    let lint = if args.no_lint {
        step("test: skipping lint (--no-lint)");
        Ok(())
    } else {
        crate::lint::run()
    };

    if let Err(e) = check_leftovers() {
        println!(
            "    warning: these were there before the tests ran, so the check after them will \
             fail too: {e:#}"
        );
    }
    // The real-Kubernetes suite needs the components; a failed build fails the run (the tests
    // that need them would fail anyway, each naming the missing binary).
    let kube = crate::kube::ensure();
    // The upgrade test replaces the test build of the agent with a different build of it.
    step("test: building the release agent (the upgrade test's \"new version\"; the benchmarks use it too)");
    let upgrade = Cmd::cargo().args(["build", "--release", "-p", "node-manager", "--bin", "node-manager"]).run();
    step("test: cargo test, one test at a time (network-namespace tests must not overlap)");
    let started = Instant::now();
    let mut tests = Cmd::cargo();
    if upgrade.is_ok() {
        tests = tests.env("NM_UPGRADE_BIN", crate::cmd::workspace_root().join("target/release/node-manager"));
    }
    if let Ok(bins) = &kube {
        tests = tests.env("NM_KUBE_BIN", &bins.bin);
    }
    let tests = tests
        .args(["test", "--workspace", "--exclude", "node-manager-ebpf", "--all-targets"])
        .args(["--", "--test-threads=1"])
        .args(args.harness_args.iter().cloned())
        .run();
    let leftovers = check_leftovers();
    let mut failures = Vec::new();
    if let Err(e) = lint {
        failures.push(format!("lint: {e:#}"));
    }
    if let Err(e) = upgrade {
        failures.push(format!("release build: {e:#}"));
    }
    if let Err(e) = kube {
        failures.push(format!("the lab's Kubernetes components (cargo xtask kube): {e:#}"));
    }
    match (tests, leftovers) {
        (Ok(()), Ok(())) => step(format!("test: tests passed, nothing left behind ({})", elapsed(started))),
        (tests, leftovers) => {
            if let Err(e) = tests {
                failures.push(format!("tests: {e:#}"));
            }
            if let Err(e) = leftovers {
                failures.push(format!("left behind after the tests: {e:#}"));
            }
        }
    }

    if args.no_cross {
        step("test: skipping the cross build (--no-cross)");
    } else if let Err(e) = cross_build_and_check() {
        failures.push(format!("cross build: {e:#}"));
    }

    if !failures.is_empty() {
        step("test: skipping the benchmark smoke run (something failed above)");
    } else if args.no_bench {
        step("test: skipping the benchmark smoke run (--no-bench)");
    } else {
        step("test: benchmark smoke run (cargo xtask bench --quick)");
        if let Err(e) = crate::bench::run(true).and_then(|()| check_leftovers()) {
            failures.push(format!("benchmark smoke run: {e:#}"));
        }
    }
    // The oldest supported kernel, in a guest: the fallbacks (netlink cls_bpf, nftables and
    // iptables instead of BPF netfilter links) run only there.
    if !failures.is_empty() {
        step(format!("test: skipping the kernel {} guest (something failed above)", crate::vm::CI_KERNEL));
    } else if args.no_vm {
        step(format!("test: skipping the kernel {} guest (--no-vm)", crate::vm::CI_KERNEL));
    } else {
        step(format!("test: the tests on kernel {} in a guest (cargo xtask vm --kernel {0})", crate::vm::CI_KERNEL));
        if let Err(e) = crate::vm::run(&crate::vm::VmArgs::ci()) {
            failures.push(format!("kernel {} guest: {e:#}", crate::vm::CI_KERNEL));
        }
    }
    // kube-proxy's IPVS mode needs ip_vs, which the host kernel lacks: the real control plane
    // and kube-proxy in the Debian 6.12 guest.
    if !failures.is_empty() {
        step(format!("test: skipping the IPVS guest (kernel {}): something failed above", crate::vm::IPVS_KERNEL));
    } else if args.no_vm {
        step("test: skipping the IPVS guest (--no-vm)");
    } else {
        step(format!(
            "test: kube-proxy IPVS mode with node-manager in the kernel {} guest (cargo xtask vm --kernel {0} \
             --suite ipvs_guest --include-ignored)",
            crate::vm::IPVS_KERNEL
        ));
        if let Err(e) = crate::vm::run(&crate::vm::VmArgs::ipvs()) {
            failures.push(format!("IPVS guest (kernel {}): {e:#}", crate::vm::IPVS_KERNEL));
        }
    }
    if !failures.is_empty() {
        bail!("{} part(s) failed:\n{}", failures.len(), failures.join("\n"));
    }
    println!(
        "xtask test: lint, tests, bench smoke, leftover check, the kernel {} guest and the IPVS guest all passed",
        crate::vm::CI_KERNEL
    );
    Ok(())
}

/// The Dockerfile's two build steps, as it runs them (`ebpf-object`, then `cross` with that
/// object, copied and stripped; dev profile here, release there), for the architecture the
/// host is not, and the result checked under qemu-user against the host build.
fn cross_build_and_check() -> Result<()> {
    let Some(arch) = crate::cross::Arch::other() else {
        bail!("no cross target for a {} host", std::env::consts::ARCH);
    };
    step(format!("test: the image's build steps for {}: ebpf-object, cross --strip --check", arch.name()));
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| crate::cmd::workspace_root().join("target"));
    let object = target.join("xtask").join("node-manager.bpf.o");
    crate::ebpf_object::run(&object)?;
    crate::cross::run(&crate::cross::CrossArgs {
        arch,
        release: false,
        ebpf_object: Some(object),
        // Named as the image names it: clap prints the file name in its usage lines.
        out: Some(target.join("xtask").join(arch.name()).join("node-manager")),
        strip: true,
        check: true,
    })
}

/// Fails, naming them, if network namespaces `nml-*`, test or demo cgroups `nml-test-*`,
/// `nml-demo-*` (directly under the cgroup v2 mount), the demo's scratch directories, the lab
/// control planes' directories or processes, or the agent's BPF pin directory exist.
fn check_leftovers() -> Result<()> {
    step(format!("test: checking for leftovers (network namespaces {NETNS_PREFIX}*, {BPF_PIN_DIR})"));
    let out = Cmd::new("ip").args(["netns", "list"]).output()?;
    if !out.status.success() {
        bail!("`ip netns list` failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let namespaces = leftover_namespaces(&stdout);
    let mut problems = Vec::new();
    if !namespaces.is_empty() {
        problems.push(format!("network namespaces {} (remove with `ip netns del NAME`)", namespaces.join(", ")));
    }
    for cgroup in leftover_cgroups() {
        problems.push(format!("test cgroup {cgroup} (remove with `rmdir {cgroup}`)"));
    }
    for dir in temp_dirs_with_prefix("nm-demo-") {
        problems.push(format!("demo directory {dir} (`umount {dir}/bpffs; rm -r {dir}`)"));
    }
    for dir in temp_dirs_with_prefix("nm-kube-") {
        problems.push(format!("lab control-plane directory {dir} with etcd data (`rm -r {dir}`)"));
    }
    for (pid, exe) in leftover_kube_processes() {
        problems.push(format!("lab Kubernetes process {pid} {exe} still running (`kill {pid}`)"));
    }
    if Path::new(BPF_PIN_DIR).exists() {
        problems.push(format!("pinned BPF objects in {BPF_PIN_DIR} (remove with `rm -r {BPF_PIN_DIR}`)"));
    }
    // The agent's nftables tables in this machine's own namespace (tests run agents there too).
    if let Ok(out) = Cmd::new("nft").args(["list", "tables"]).output() {
        for table in String::from_utf8_lossy(&out.stdout).lines().filter(|t| t.contains(" node_manager")) {
            problems.push(format!("nftables {table} in the host namespace (`nft delete {table}`)"));
        }
    }
    if problems.is_empty() {
        println!("    no leftovers");
        Ok(())
    } else {
        for p in &problems {
            eprintln!("LEFTOVER: {p}");
        }
        bail!("leftovers: {}", problems.join("; "))
    }
}

/// Entries of the temp directory whose name starts with `prefix`, as full paths, sorted: the
/// demo's scratch directories (`nm-demo-*`) and the lab control planes' (`nm-kube-*`: etcd
/// data, keys, logs).
fn temp_dirs_with_prefix(prefix: &str) -> Vec<String> {
    let mut found: Vec<String> = std::fs::read_dir(std::env::temp_dir())
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .map(|e| e.path().display().to_string())
        .collect();
    found.sort();
    found
}

/// Processes whose executable is one of the lab's Kubernetes components (under target/kube).
fn leftover_kube_processes() -> Vec<(u32, String)> {
    let kube_dir = crate::cmd::workspace_root().join("target/kube");
    let mut found: Vec<(u32, String)> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let exe = std::fs::read_link(e.path().join("exe")).ok()?;
            exe.starts_with(&kube_dir).then(|| (pid, exe.display().to_string()))
        })
        .collect();
    found.sort();
    found
}

/// Test and demo cgroups (`nml-test-*`, `nml-demo-*`) under the cgroup v2 mount, as full paths.
fn leftover_cgroups() -> Vec<String> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let Some(root) = mountinfo.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        let f: Vec<&str> = pre.split_whitespace().collect();
        (post.starts_with("cgroup2 ") && f.get(3) == Some(&"/")).then(|| f.get(4).map(|m| m.to_string()))?
    }) else {
        return Vec::new();
    };
    let mut found: Vec<String> = std::fs::read_dir(&root)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.starts_with("nml-test-") || name.starts_with("nml-demo-")
        })
        .map(|e| e.path().display().to_string())
        .collect();
    found.sort();
    found
}

/// The test namespaces in `ip netns list` output (lines like `nml-pod (id: 3)`).
fn leftover_namespaces(ip_netns_list: &str) -> Vec<&str> {
    ip_netns_list.lines().filter_map(|l| l.split_whitespace().next()).filter(|n| n.starts_with(NETNS_PREFIX)).collect()
}

#[cfg(test)]
mod tests {
    use super::leftover_namespaces;

    #[test]
    fn finds_only_test_namespaces() {
        let out = "nml-pod (id: 3)\nother\nnml-node\n\ncni-1234 (id: 0)\n";
        assert_eq!(leftover_namespaces(out), ["nml-pod", "nml-node"]);
        assert!(leftover_namespaces("").is_empty());
    }
}
