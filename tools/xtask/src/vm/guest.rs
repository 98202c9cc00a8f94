//! The test runner: inside a guest (started by its `/init` as `xtask vm-guest --plan P --init`)
//! or on the host itself (the matrix's host column). It prepares the guest (module autoloader
//! hook, loopback), records the kernel and the agent's kernel-feature report, then runs every
//! test of the plan in its own process — one at a time, each with a time limit, in its own
//! process group so that a test killed on timeout takes its agents and helpers with it — and
//! writes one result line per test as it finishes, so a guest that dies mid-run still reports
//! what it did.

use std::{
    fs,
    io::Write as _,
    os::unix::process::CommandExt as _,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use super::plan::{self, Plan, Status, TestResult};

pub fn run(plan_path: &Path, as_init: bool) -> Result<()> {
    let text = fs::read_to_string(plan_path).with_context(|| format!("reading {}", plan_path.display()))?;
    let plan: Plan = serde_json::from_str(&text).with_context(|| format!("parsing {}", plan_path.display()))?;
    let out = &plan.out_dir;
    fs::create_dir_all(out.join("logs"))?;
    if as_init {
        prepare_guest(&plan)?;
    }
    let who = if as_init { "[guest]" } else { "[host]" };
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_owned();
    fs::write(out.join(plan::KERNEL_RELEASE), format!("{release}\n"))?;
    if let Some(command) = &plan.exec {
        println!("{who} kernel {release}: $ {command}");
        let status = Command::new("/bin/sh").args(["-c", command]).status().context("running /bin/sh")?;
        println!("{who} {status}");
        fs::write(out.join(plan::DONE), format!("{status}\n"))?;
        return Ok(());
    }
    println!("{who} kernel {release}: running {} test binaries", plan.suites.len());
    feature_report(&plan, who);

    let mut results = fs::File::create(out.join(plan::RESULTS))?;
    let (mut passed, mut failed) = (0, 0);
    for suite in &plan.suites {
        let tests = list_tests(suite, plan.include_ignored)?;
        for test in tests.iter().filter(|t| plan.filters.is_empty() || plan.filters.iter().any(|f| t.contains(f))) {
            let result = run_test(&plan, suite, test)?;
            println!("{who} {}::{} ... {} ({:.1}s)", suite.name, test, result.status.word(), result.secs);
            if result.status == Status::Passed {
                passed += 1
            } else {
                failed += 1
            }
            writeln!(results, "{}", serde_json::to_string(&result)?)?;
            results.sync_all()?;
        }
    }
    println!("{who} kernel {release}: {passed} passed, {failed} failed");
    fs::write(out.join(plan::DONE), format!("{passed} {failed}\n"))?;
    Ok(())
}

/// What a fresh node has and a bare guest lacks: module autoloading through the unpacked
/// kernel's modules, and loopback up.
fn prepare_guest(plan: &Plan) -> Result<()> {
    if let Some(hook) = &plan.modprobe_hook {
        fs::write("/proc/sys/kernel/modprobe", hook.display().to_string())
            .context("setting /proc/sys/kernel/modprobe")?;
    }
    let up = Command::new("ip").args(["link", "set", "lo", "up"]).status().context("running ip")?;
    if !up.success() {
        bail!("ip link set lo up: {up}");
    }
    Ok(())
}

/// `node-manager inspect --json` with nothing installed: the kernel features as the agent probes
/// them (programs trial-loaded, nothing attached).
fn feature_report(plan: &Plan, who: &str) {
    let nowhere = format!("/tmp/nm-vm-features-{}", std::process::id());
    let report = Command::new(&plan.agent)
        .args(["inspect", "--json", "--bpffs", &nowhere])
        .stderr(Stdio::null())
        .output()
        .with_context(|| format!("running {}", plan.agent.display()))
        .and_then(|out| {
            if out.status.success() { Ok(out.stdout) } else { bail!("node-manager inspect --json: {}", out.status) }
        });
    match report {
        Ok(json) => {
            let _ = fs::write(plan.out_dir.join(plan::FEATURES), json);
        }
        Err(e) => println!("{who} no feature report: {e:#}"),
    }
}

/// The test names of a libtest binary (`--list --format=terse`: `name: test`).
fn list_tests(suite: &plan::Suite, include_ignored: bool) -> Result<Vec<String>> {
    let out = Command::new(&suite.binary)
        .args(["--list", "--format=terse"])
        .args(include_ignored.then_some("--include-ignored"))
        .current_dir(&suite.cwd)
        .output()
        .with_context(|| format!("listing the tests of {}", suite.binary.display()))?;
    if !out.status.success() {
        bail!("{} --list: {}", suite.binary.display(), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(parse_test_list(&String::from_utf8_lossy(&out.stdout)))
}

fn parse_test_list(listing: &str) -> Vec<String> {
    listing.lines().filter_map(|l| l.strip_suffix(": test")).map(str::to_owned).collect()
}

fn run_test(plan: &Plan, suite: &plan::Suite, test: &str) -> Result<TestResult> {
    let log_rel = format!("logs/{}.{}.log", suite.name, test.replace("::", "."));
    let log = fs::File::create(plan.out_dir.join(&log_rel))?;
    let started = Instant::now();
    let mut child = Command::new(&suite.binary)
        .args(["--exact", test, "--test-threads=1", "--nocapture"])
        .args(plan.include_ignored.then_some("--include-ignored"))
        .current_dir(&suite.cwd)
        .env("RUST_BACKTRACE", "1")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .with_context(|| format!("running {}", suite.binary.display()))?;
    let limit = Duration::from_secs(plan.test_timeout_secs);
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break if status.success() { Status::Passed } else { Status::Failed };
        }
        if started.elapsed() > limit {
            // The whole process group: the test and the agents and helpers it started.
            let _ = Command::new("kill").args(["-KILL", "--", &format!("-{}", child.id())]).status();
            let _ = child.wait();
            break Status::TimedOut;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    Ok(TestResult {
        suite: suite.name.clone(),
        test: test.to_owned(),
        status,
        secs: started.elapsed().as_secs_f64(),
        log: log_rel,
    })
}

#[cfg(test)]
mod tests {
    use super::parse_test_list;

    #[test]
    fn reads_libtest_terse_listings() {
        let listing = "a_test: test\nmod_a::b: test\nbench_x: bench\n";
        assert_eq!(parse_test_list(listing), ["a_test", "mod_a::b"]);
        assert!(parse_test_list("").is_empty());
    }
}
