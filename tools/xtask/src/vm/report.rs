//! Printing a kernel's results and the matrix table.

use std::fs;

use super::{KernelRun, plan::Status, took, vm_dir};
use crate::cmd::step;

/// Lines of a failed test's log shown inline.
const LOG_TAIL: usize = 40;

pub fn print_run(run: &KernelRun) {
    let release = run.release.as_deref().unwrap_or("?");
    step(format!(
        "vm: {} ({release}): {} tests, {} failed, {}",
        run.series,
        run.results.len(),
        run.failed(),
        took(run.took)
    ));
    if let Some(package) = &run.package {
        println!("    booted {package}");
    }
    for (feature, mechanism) in features(run) {
        println!("    {feature:<36} {mechanism}");
    }
    for r in &run.results {
        println!("    {:<10} {:>6.1}s  {}::{}", r.status.word(), r.secs, r.suite, r.test);
    }
    let out_dir = vm_dir().join("runs").join(&run.series).join("out");
    for r in run.results.iter().filter(|r| r.status != Status::Passed) {
        let log = fs::read_to_string(out_dir.join(&r.log)).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        println!(
            "---- {}::{} ({}), last lines of {}:",
            r.suite,
            r.test,
            r.status.word(),
            out_dir.join(&r.log).display()
        );
        for line in &lines[lines.len().saturating_sub(LOG_TAIL)..] {
            println!("    {line}");
        }
    }
    if let Some(problem) = &run.problem {
        println!("    PROBLEM: {problem}");
    }
}

/// (feature, mechanism) pairs of the agent's kernel-feature report.
fn features(run: &KernelRun) -> Vec<(String, String)> {
    let Some(list) = run.features.as_ref().and_then(|f| f["kernel_features"]["features"].as_array()) else {
        return Vec::new();
    };
    list.iter().filter_map(|f| Some((f["feature"].as_str()?.to_owned(), f["mechanism"].as_str()?.to_owned()))).collect()
}

/// The matrix as a Markdown table: one row per kernel, one column per feature (the mechanism the
/// agent uses there), and the tests.
pub fn matrix(runs: &[KernelRun]) -> String {
    let mut columns: Vec<String> = Vec::new();
    for run in runs {
        for (feature, _) in features(run) {
            if !columns.contains(&feature) {
                columns.push(feature);
            }
        }
    }
    let mut out = String::new();
    let header: Vec<String> =
        ["kernel".to_owned()].into_iter().chain(columns.iter().cloned()).chain(["tests".to_owned()]).collect();
    out.push_str(&format!("| {} |\n", header.join(" | ")));
    out.push_str(&format!("|{}\n", "---|".repeat(header.len())));
    for run in runs {
        let features = features(run);
        let kernel = match (&run.release, &run.package) {
            (Some(release), Some(package)) => format!("{} (`{release}`, {})", run.series, package_version(package)),
            (Some(release), None) => format!("{} (`{release}`)", run.series),
            (None, _) => run.series.clone(),
        };
        let mut row = vec![kernel];
        for column in &columns {
            row.push(features.iter().find(|(f, _)| f == column).map_or("?".to_owned(), |(_, m)| m.clone()));
        }
        let passed = run.results.len() - run.failed();
        let mut tests = format!("{passed}/{} passed", run.results.len());
        if let Some(problem) = &run.problem {
            tests.push_str(&format!(" — incomplete: {problem}"));
        }
        row.push(tests);
        out.push_str(&format!("| {} |\n", row.join(" | ").replace('\n', " ")));
    }
    out
}

/// "linux-image-5.10.0-46-amd64 5.10.262-1" → "5.10.262-1".
fn package_version(package: &str) -> &str {
    package.rsplit(' ').next().unwrap_or(package)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::vm::plan::TestResult;

    fn run(series: &str, features: serde_json::Value, statuses: &[Status]) -> KernelRun {
        KernelRun {
            series: series.into(),
            release: Some(format!("{series}.0-1-amd64")),
            package: Some(format!("linux-image-{series}.0-1-amd64 {series}.9-1")),
            results: statuses
                .iter()
                .enumerate()
                .map(|(i, s)| TestResult {
                    suite: "s".into(),
                    test: format!("t{i}"),
                    status: *s,
                    secs: 1.0,
                    log: String::new(),
                })
                .collect(),
            features: Some(serde_json::json!({ "kernel_features": { "features": features } })),
            problem: None,
            took: Duration::ZERO,
        }
    }

    #[test]
    fn the_matrix_has_a_column_per_feature_and_counts_tests() {
        let old = run(
            "5.10",
            serde_json::json!([{"feature": "pod datapath", "mechanism": "netlink cls_bpf"}]),
            &[Status::Passed, Status::Failed],
        );
        let new = run(
            "6.12",
            serde_json::json!([{"feature": "pod datapath", "mechanism": "tcx"}, {"feature": "INVALID drop", "mechanism": "bpf"}]),
            &[Status::Passed],
        );
        let table = matrix(&[old, new]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines[0], "| kernel | pod datapath | INVALID drop | tests |");
        assert_eq!(lines[1], "|---|---|---|---|");
        assert_eq!(lines[2], "| 5.10 (`5.10.0-1-amd64`, 5.10.9-1) | netlink cls_bpf | ? | 1/2 passed |");
        assert_eq!(lines[3], "| 6.12 (`6.12.0-1-amd64`, 6.12.9-1) | tcx | bpf | 1/1 passed |");
    }
}
