//! What the host hands the guest (the plan, a JSON file the guest reads over the shared root)
//! and what comes back (one JSON line per test in the output directory).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Plan {
    /// The kernel series, for the report.
    pub kernel: String,
    /// Where results go (shared read-write with the host).
    pub out_dir: PathBuf,
    /// The guest's module autoloader hook (`/proc/sys/kernel/modprobe`); `None` on the host.
    pub modprobe_hook: Option<PathBuf>,
    /// The agent binary: its kernel-feature report is part of the results.
    pub agent: PathBuf,
    pub suites: Vec<Suite>,
    /// Only tests whose names contain one of these (all when empty).
    pub filters: Vec<String>,
    pub test_timeout_secs: u64,
    /// Instead of the tests: a shell command to run in the guest (for investigating a kernel).
    #[serde(default)]
    pub exec: Option<String>,
    /// Also run the tests marked `#[ignore]` (those that need what only a guest has, such as
    /// kube-proxy's IPVS mode).
    #[serde(default)]
    pub include_ignored: bool,
}

/// One test binary.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Suite {
    pub name: String,
    pub binary: PathBuf,
    /// The package directory (cargo runs integration tests there).
    pub cwd: PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Passed,
    Failed,
    TimedOut,
}

impl Status {
    pub fn word(self) -> &'static str {
        match self {
            Status::Passed => "ok",
            Status::Failed => "FAILED",
            Status::TimedOut => "TIMED OUT",
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TestResult {
    pub suite: String,
    pub test: String,
    pub status: Status,
    pub secs: f64,
    /// The test's output, relative to the output directory.
    pub log: String,
}

/// File names in the output directory.
pub const RESULTS: &str = "results.jsonl";
pub const FEATURES: &str = "features.json";
pub const KERNEL_RELEASE: &str = "kernel-release";
pub const DONE: &str = "done";
