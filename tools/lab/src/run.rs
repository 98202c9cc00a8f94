//! Running `ip`, `nft`, `sysctl` and the like, with their errors in the message.

use std::io::Write;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, anyhow};

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

pub(crate) fn run(cmd: &mut Command, ns: &str) -> Result<()> {
    let what = describe(cmd);
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("netns {ns}: cannot run `{what}`"))?;
    check(&out, ns, &what)
}

pub(crate) fn run_with_stdin(cmd: &mut Command, ns: &str, input: &str) -> Result<()> {
    let what = describe(cmd);
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("netns {ns}: cannot run `{what}`"))?;
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let written = stdin.write_all(input.as_bytes());
    drop(stdin);
    let out = child.wait_with_output().with_context(|| format!("netns {ns}: waiting for `{what}`"))?;
    check(&out, ns, &what)?;
    written.with_context(|| format!("netns {ns}: writing the input of `{what}`"))
}

fn check(out: &std::process::Output, ns: &str, what: &str) -> Result<()> {
    if out.status.success() {
        return Ok(());
    }
    let mut msg = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    if msg.is_empty() {
        msg = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    }
    Err(anyhow!("netns {ns}: `{what}` failed ({}): {msg}", out.status))
}
