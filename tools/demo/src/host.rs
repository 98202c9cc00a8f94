//! A host-network client: `socat` run in the node's network namespace from inside the demo
//! cgroup (a shell moves itself into the cgroup, then execs nsenter and socat), as a process on
//! a real node or a `hostNetwork: true` pod would be. socat sends a line, half-closes, and
//! prints what the Service's echo server answers.
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};

const SCRIPT: &str =
    r#"echo $$ > "$1/cgroup.procs" && exec nsenter --net="$2" -- socat -t 3 -T 5 - "TCP:$3,connect-timeout=3""#;
const LIMIT: Duration = Duration::from_secs(10);

pub struct HostReply {
    /// What socat printed (the echo), trimmed.
    pub stdout: String,
    /// Why it failed, from socat's error line ("Connection refused"), when it did.
    pub error: Option<String>,
}

/// How the command looks to a user.
pub fn shown(cgroup: &Path, netns: &Path, to: SocketAddr, payload: &str) -> String {
    format!(
        "echo {payload} | sh -c 'echo $$ > {}/cgroup.procs && exec nsenter --net={} socat - TCP:{to}'",
        cgroup.display(),
        netns.display()
    )
}

pub fn request(cgroup: &Path, netns: &Path, to: SocketAddr, payload: &str) -> Result<HostReply> {
    let mut child = Command::new("sh")
        .args(["-c", SCRIPT, "sh"])
        .arg(cgroup)
        .arg(netns)
        .arg(to.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running sh (for socat in the demo cgroup)")?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = writeln!(stdin, "{payload}");
    }
    let deadline = Instant::now() + LIMIT;
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    if stderr.contains("socat: not found") || stderr.contains("No such file or directory") && stderr.contains("socat") {
        anyhow::bail!("socat is not installed (Debian package socat; `cargo xtask setup` installs it): {stderr}");
    }
    let error = (!out.status.success() || stdout.is_empty()).then(|| socat_error(&stderr, out.status));
    Ok(HostReply { stdout, error })
}

/// "... E connect(5, AF=2 203.0.113.10:8080, 16): Connection refused" -> "connection refused".
fn socat_error(stderr: &str, status: std::process::ExitStatus) -> String {
    let line = stderr.lines().find(|l| l.contains(" E ")).or_else(|| stderr.lines().last()).unwrap_or("");
    match line.rsplit_once("): ") {
        Some((_, why)) => why.to_ascii_lowercase(),
        None if line.is_empty() => format!("no answer ({status})"),
        None => line.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt as _;

    #[test]
    fn socat_errors_are_shortened() {
        let err = "2026/01/01 12:00:00 socat[42] E connect(5, AF=2 203.0.113.10:8080, 16): Connection refused";
        assert_eq!(super::socat_error(err, std::process::ExitStatus::from_raw(256)), "connection refused");
        assert_eq!(super::socat_error("", std::process::ExitStatus::from_raw(0)), "no answer (exit status: 0)");
    }
}
