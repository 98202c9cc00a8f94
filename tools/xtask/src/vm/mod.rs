//! `cargo xtask vm`: the kernel matrix. For each kernel series it fetches Debian's kernel image
//! (`kernel.rs`), builds a small initramfs (`initramfs.rs`), boots it under QEMU's TCG
//! (`qemu.rs`) with the host's root shared read-only, and runs the kernel-facing test binaries
//! inside (`guest.rs`), one test at a time; results come back through a shared directory.
//! `host` runs the same tests on this machine's kernel, without a VM. `--matrix` runs every
//! series and prints the table of kernel × feature → mechanism and tests passed.

mod guest;
mod initramfs;
mod kernel;
mod plan;
mod qemu;
mod report;

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use clap::Args;

use self::plan::{Plan, Suite};
use crate::cmd::{Cmd, elapsed, is_root, step, workspace_root};

pub use self::guest::run as run_guest;

/// The test binaries run in every kernel (integration tests of node-manager and lab).
const SUITES: [&str; 8] =
    ["kernel_features", "test_run", "netfilter", "netns", "cgroup", "drop_invalid", "flow_lifetime", "lab"];
/// Test binaries only a guest runs (named with `--suite`; not part of the default set).
const GUEST_ONLY_SUITES: [&str; 1] = ["ipvs_guest"];
/// The kernel the IPVS guest boots: Debian trixie's, which ships ip_vs.
pub const IPVS_KERNEL: &str = "6.12";
/// The matrix, in order; `host` is this machine's kernel.
pub const MATRIX: [&str; 5] = ["5.10", "6.1", "6.12", "sid", "host"];
/// What CI boots (`cargo xtask test`): the oldest supported kernel.
pub const CI_KERNEL: &str = "5.10";

#[derive(Args, Clone, Debug, Default)]
pub struct VmArgs {
    /// Kernel series: 5.10 (bullseye), 6.1 (bookworm), 6.12 (trixie), sid (Debian's newest), or
    /// host (this machine's kernel, no VM). Repeatable.
    #[arg(long = "kernel", value_name = "SERIES")]
    pub kernels: Vec<String>,
    /// Every series (5.10, 6.1, 6.12, sid, host), then the kernel × feature table.
    #[arg(long, conflicts_with = "kernels")]
    pub matrix: bool,
    /// Only these test binaries (kernel_features, test_run, netfilter, netns, cgroup, drop_invalid, flow_lifetime,
    /// lab).
    #[arg(long = "suite", value_name = "NAME")]
    pub suites: Vec<String>,
    /// Only tests whose name contains this. Repeatable.
    #[arg(long = "filter", value_name = "TEXT")]
    pub filters: Vec<String>,
    /// Time limit of one test, in seconds.
    #[arg(long, default_value_t = TEST_TIMEOUT)]
    pub test_timeout: u64,
    /// Time limit of one guest (boot, tests and power-off), in seconds.
    #[arg(long, default_value_t = GUEST_TIMEOUT)]
    pub guest_timeout: u64,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = MEMORY_MIB)]
    pub memory: u32,
    /// Guest CPUs (TCG runs one host thread per CPU).
    #[arg(long, default_value_t = CPUS)]
    pub cpus: u32,
    /// Run this shell command in the guest instead of the tests (its output on the console), to
    /// investigate a kernel: `--exec 'bpftool feature probe kernel'`.
    #[arg(long, value_name = "COMMAND", conflicts_with = "matrix")]
    pub exec: Option<String>,
    /// Also write the matrix table (Markdown) to this file.
    #[arg(long, value_name = "PATH")]
    pub table: Option<PathBuf>,
    /// Also run the tests marked `#[ignore]` (those that need a guest, such as `--suite ipvs_guest`).
    #[arg(long)]
    pub include_ignored: bool,
}

const TEST_TIMEOUT: u64 = 300;
const GUEST_TIMEOUT: u64 = 1800;
const MEMORY_MIB: u32 = 1536;
const CPUS: u32 = 2;
/// CI's budget for the whole guest (boot, tests, power-off) on a 2-core machine.
const CI_GUEST_TIMEOUT: u64 = 900;

impl VmArgs {
    /// What `cargo xtask test` runs for kube-proxy's IPVS mode: the real control plane and
    /// kube-proxy in the 6.12 guest (more memory: etcd, kube-apiserver and kube-proxy run there).
    pub fn ipvs() -> VmArgs {
        VmArgs {
            kernels: vec![IPVS_KERNEL.to_owned()],
            suites: vec!["ipvs_guest".to_owned()],
            include_ignored: true,
            test_timeout: 900,
            guest_timeout: 1200,
            memory: 4096,
            cpus: CPUS,
            ..VmArgs::default()
        }
    }

    /// What `cargo xtask test` runs: the CI kernel, within CI's budget.
    pub fn ci() -> VmArgs {
        VmArgs {
            kernels: vec![CI_KERNEL.to_owned()],
            test_timeout: TEST_TIMEOUT,
            guest_timeout: CI_GUEST_TIMEOUT,
            memory: MEMORY_MIB,
            cpus: CPUS,
            ..VmArgs::default()
        }
    }
}

/// One kernel's run, as the report needs it.
pub struct KernelRun {
    pub series: String,
    pub release: Option<String>,
    /// The Debian package booted (`None` for the host).
    pub package: Option<String>,
    pub results: Vec<plan::TestResult>,
    pub features: Option<serde_json::Value>,
    /// Why the run is incomplete, if it is.
    pub problem: Option<String>,
    pub took: Duration,
}

impl KernelRun {
    pub fn failed(&self) -> usize {
        self.results.iter().filter(|r| r.status != plan::Status::Passed).count()
    }

    pub fn ok(&self) -> bool {
        self.problem.is_none() && self.failed() == 0
    }
}

pub fn run(args: &VmArgs) -> Result<()> {
    if !is_root() {
        bail!("`cargo xtask vm` needs root: the tests inside load BPF programs (and the host run builds namespaces)");
    }
    let kernels: Vec<String> = if args.matrix {
        MATRIX.iter().map(|s| (*s).to_owned()).collect()
    } else if args.kernels.is_empty() {
        bail!("name a kernel (--kernel 5.10, 6.1, 6.12, sid or host) or use --matrix");
    } else {
        args.kernels.clone()
    };
    // Check every name before the long part starts.
    for name in kernels.iter().filter(|k| *k != "host") {
        kernel::series(name)?;
    }
    let (suites, agent) = build_suites(&args.suites)?;
    let mut runs = Vec::new();
    for name in &kernels {
        let started = Instant::now();
        let mut run = match run_one(name, &suites, &agent, args) {
            Ok(run) => run,
            Err(e) => KernelRun {
                series: name.clone(),
                release: None,
                package: None,
                results: Vec::new(),
                features: None,
                problem: Some(format!("{e:#}")),
                took: Duration::ZERO,
            },
        };
        run.took = started.elapsed();
        report::print_run(&run);
        runs.push(run);
    }
    if runs.len() > 1 || args.matrix {
        let table = report::matrix(&runs);
        step("vm: kernel matrix");
        println!("{table}");
        let path = args.table.clone().unwrap_or_else(|| vm_dir().join("matrix.md"));
        fs::write(&path, &table).with_context(|| format!("writing {}", path.display()))?;
        println!("    (also written to {})", path.display());
    }
    let bad: Vec<String> = runs
        .iter()
        .filter(|r| !r.ok())
        .map(|r| match &r.problem {
            Some(p) => format!("{}: {p}", r.series),
            None => format!("{}: {} of {} tests failed", r.series, r.failed(), r.results.len()),
        })
        .collect();
    if !bad.is_empty() {
        bail!("{}", bad.join("; "));
    }
    Ok(())
}

/// `CARGO_TARGET_DIR` or the workspace's `target`.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| workspace_root().join("target"))
}

fn vm_dir() -> PathBuf {
    target_dir().join("vm")
}

/// Builds the test binaries (and the agent they run) with the very command `cargo xtask test`
/// builds them with (so nothing is rebuilt after it), and returns those of `SUITES` and the agent,
/// from cargo's JSON messages.
fn build_suites(only: &[String]) -> Result<(Vec<Suite>, PathBuf)> {
    let known: Vec<&str> = SUITES.iter().chain(GUEST_ONLY_SUITES.iter()).copied().collect();
    if let Some(unknown) = only.iter().find(|s| !known.contains(&s.as_str())) {
        bail!("unknown test binary {unknown:?}: use one of {}", known.join(", "));
    }
    step("vm: building the test binaries (cargo test --no-run)");
    let cmd = Cmd::cargo().args([
        "test",
        "--workspace",
        "--exclude",
        "node-manager-ebpf",
        "--all-targets",
        "--no-run",
        "--message-format=json",
    ]);
    println!("    $ {cmd}");
    let out = cmd.output()?;
    if !out.status.success() {
        bail!("building the test binaries failed:\n{}", String::from_utf8_lossy(&out.stderr));
    }
    let json = String::from_utf8_lossy(&out.stdout);
    let wanted: Vec<&str> = if only.is_empty() {
        SUITES.to_vec()
    } else {
        known.into_iter().filter(|t| only.iter().any(|o| o == t)).collect()
    };
    let agent = artifact(&json, "bin", "node-manager").context("cargo built no node-manager binary")?;
    Ok((test_executables(&json, &wanted)?, agent.binary))
}

/// The executable of the target `name` of kind `kind` in cargo's `--message-format=json` output.
fn artifact(json_lines: &str, kind: &str, name: &str) -> Option<Suite> {
    json_lines.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()).find_map(|msg| {
        let exe = msg["executable"].as_str()?;
        let is_kind = msg["target"]["kind"].as_array().is_some_and(|k| k.iter().any(|k| k == kind));
        // `--all-targets` also builds a binary's unit-test harness (kind "bin", profile.test).
        let harness = msg["profile"]["test"] == true;
        let is_kind = is_kind && harness == (kind == "test");
        let cwd = Path::new(msg["manifest_path"].as_str()?).parent()?;
        (is_kind && msg["target"]["name"] == name).then(|| Suite {
            name: name.to_owned(),
            binary: exe.into(),
            cwd: cwd.to_owned(),
        })
    })
}

/// The integration-test executables in cargo's JSON output, in `targets`' order.
fn test_executables(json_lines: &str, targets: &[&str]) -> Result<Vec<Suite>> {
    targets
        .iter()
        .map(|t| artifact(json_lines, "test", t).with_context(|| format!("cargo built no test binary {t}")))
        .collect()
}

fn run_one(name: &str, suites: &[Suite], agent: &Path, args: &VmArgs) -> Result<KernelRun> {
    let run_dir = vm_dir().join("runs").join(name);
    let out_dir = run_dir.join("out");
    if out_dir.exists() {
        fs::remove_dir_all(&out_dir).with_context(|| format!("clearing {}", out_dir.display()))?;
    }
    fs::create_dir_all(&out_dir)?;
    let mut plan = Plan {
        kernel: name.to_owned(),
        out_dir: out_dir.clone(),
        modprobe_hook: None,
        agent: agent.to_owned(),
        suites: suites.to_vec(),
        filters: args.filters.clone(),
        test_timeout_secs: args.test_timeout,
        exec: args.exec.clone(),
        include_ignored: args.include_ignored,
    };
    let plan_path = run_dir.join("plan.json");
    let mut package = None;
    let finished = if name == "host" {
        step("vm: host kernel: running the tests on this machine (no VM)");
        fs::write(&plan_path, serde_json::to_string_pretty(&plan)?)?;
        run_guest(&plan_path, false).map(|()| true)?
    } else {
        let series = kernel::series(name)?;
        let kernel = kernel::fetch(&vm_dir(), &series)?;
        package = Some(format!("linux-image-{} {}", kernel.release, kernel.package_version));
        let hook = run_dir.join("modprobe");
        // The kernel's module autoloader runs this; modprobe reads the unpacked modules.
        fs::write(&hook, format!("#!/bin/sh\nexec /usr/sbin/modprobe -d '{}' \"$@\"\n", kernel.root.display()))?;
        set_executable(&hook)?;
        plan.modprobe_hook = Some(hook);
        fs::write(&plan_path, serde_json::to_string_pretty(&plan)?)?;
        // A copy of this very binary: cargo may rebuild target/debug/xtask while we run (the
        // test build unifies features differently), leaving only a deleted file behind;
        // /proc/self/exe still reads the running one.
        let xtask = run_dir.join("xtask-guest");
        fs::copy("/proc/self/exe", &xtask).context("copying the running xtask binary for the guest")?;
        set_executable(&xtask)?;
        let stage2 = initramfs::Stage2 {
            out_dir: out_dir.clone(),
            command: format!(
                "cd / && PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
                 '{}' vm-guest --plan '{}' --init",
                xtask.display(),
                plan_path.display()
            ),
        };
        let initramfs = run_dir.join("initramfs.cpio");
        initramfs::build(&kernel, &stage2, &initramfs)?;
        step(format!(
            "vm: booting {} ({}) under QEMU TCG; {} test binaries",
            kernel.release,
            series.distribution,
            suites.len()
        ));
        qemu::boot(&qemu::Boot {
            vmlinuz: &kernel.vmlinuz(),
            initramfs: &initramfs,
            out_dir: &out_dir,
            console: run_dir.join("console.log"),
            memory_mib: args.memory,
            cpus: args.cpus,
            timeout: Duration::from_secs(args.guest_timeout),
        })?
    };
    let release = fs::read_to_string(out_dir.join(plan::KERNEL_RELEASE)).ok().map(|s| s.trim().to_owned());
    let results = read_results(&out_dir.join(plan::RESULTS));
    let features = fs::read(out_dir.join(plan::FEATURES)).ok().and_then(|b| serde_json::from_slice(&b).ok());
    let problem = if !finished {
        Some(format!(
            "the guest did not power off within {}s (console: {})",
            args.guest_timeout,
            run_dir.join("console.log").display()
        ))
    } else if !out_dir.join(plan::DONE).exists() {
        Some(format!("the test runner did not finish (console: {})", run_dir.join("console.log").display()))
    } else if args.exec.is_some() {
        None
    } else if results.is_empty() {
        Some("no test ran (check --suite/--filter)".to_owned())
    } else {
        None
    };
    Ok(KernelRun { series: name.to_owned(), release, package, results, features, problem, took: Duration::ZERO })
}

fn read_results(path: &Path) -> Vec<plan::TestResult> {
    fs::read_to_string(path).unwrap_or_default().lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

fn set_executable(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).with_context(|| format!("chmod {}", path.display()))
}

/// `elapsed` for a duration already measured.
pub fn took(d: Duration) -> String {
    let now = Instant::now();
    elapsed(now.checked_sub(d).unwrap_or(now))
}

#[cfg(test)]
mod tests {
    use super::{artifact, test_executables};

    #[test]
    fn finds_integration_test_executables_in_cargo_json() {
        let json = r#"{"reason":"compiler-artifact","target":{"kind":["bin"],"name":"node-manager"},"profile":{"test":true},"executable":"/t/debug/deps/node_manager-123","manifest_path":"/w/node-manager/Cargo.toml"}
{"reason":"compiler-artifact","target":{"kind":["bin"],"name":"node-manager"},"profile":{"test":false},"executable":"/t/debug/node-manager","manifest_path":"/w/node-manager/Cargo.toml"}
{"reason":"compiler-artifact","target":{"kind":["test"],"name":"netns"},"profile":{"test":true},"executable":"/t/debug/deps/netns-abc","manifest_path":"/w/node-manager/Cargo.toml"}
{"reason":"build-finished","success":true}"#;
        let suites = test_executables(json, &["netns"]).unwrap();
        assert_eq!(suites[0].binary.to_str(), Some("/t/debug/deps/netns-abc"));
        assert_eq!(suites[0].cwd.to_str(), Some("/w/node-manager"));
        assert!(test_executables(json, &["cgroup"]).unwrap_err().to_string().contains("cgroup"));
        let agent = artifact(json, "bin", "node-manager").unwrap();
        assert_eq!(agent.binary.to_str(), Some("/t/debug/node-manager"), "the binary, not its test harness");
    }
}
