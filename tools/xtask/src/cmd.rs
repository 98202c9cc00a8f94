//! Running commands: each is printed before it runs, and a failure names the command and how
//! it ended.

use std::{
    ffi::OsString,
    fmt::Write as _,
    io::ErrorKind,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

/// The workspace root (this crate lives in `tools/xtask`).
pub fn workspace_root() -> &'static Path {
    let xtask_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    xtask_dir.ancestors().nth(2).unwrap_or(xtask_dir)
}

/// Prints a progress line.
pub fn step(msg: impl AsRef<str>) {
    println!("==> {}", msg.as_ref());
}

/// Prints a note that is not a failure.
pub fn note(msg: impl AsRef<str>) {
    println!("    note: {}", msg.as_ref());
}

/// "1m02s" / "3.4s".
pub fn elapsed(since: Instant) -> String {
    let d = since.elapsed();
    let secs = d.as_secs();
    if secs >= 60 { format!("{}m{:02}s", secs / 60, secs % 60) } else { format!("{:.1}s", d.as_secs_f64()) }
}

/// A command to run, with a printable form.
pub struct Cmd {
    program: String,
    args: Vec<String>,
    /// (name, value, how to print it)
    envs: Vec<(String, OsString, String)>,
    cwd: PathBuf,
}

impl Cmd {
    /// A command run in the workspace root.
    pub fn new(program: impl Into<String>) -> Self {
        Cmd { program: program.into(), args: Vec::new(), envs: Vec::new(), cwd: workspace_root().to_path_buf() }
    }

    /// `cargo` (rustup's proxy, so `+toolchain` works).
    pub fn cargo() -> Self {
        Cmd::new("cargo")
    }

    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets an environment variable, printed as `NAME=value`.
    pub fn env(self, name: &str, value: impl Into<OsString>) -> Self {
        let value = value.into();
        let shown = value.to_string_lossy().into_owned();
        self.env_shown(name, value, &shown)
    }

    /// Sets an environment variable, printed as `NAME=shown` (e.g. `PATH=/x:$PATH`).
    pub fn env_shown(mut self, name: &str, value: impl Into<OsString>, shown: &str) -> Self {
        self.envs.push((name.to_owned(), value.into(), shown.to_owned()));
        self
    }

    /// Runs the command in `dir` instead of the workspace root.
    pub fn in_dir(mut self, dir: &Path) -> Self {
        self.cwd = dir.to_path_buf();
        self
    }

    fn command(&self) -> Command {
        let mut c = Command::new(&self.program);
        c.args(&self.args).current_dir(&self.cwd);
        for (name, value, _) in &self.envs {
            c.env(name, value);
        }
        c
    }

    fn spawn_error(&self, e: std::io::Error) -> anyhow::Error {
        if e.kind() == ErrorKind::NotFound && self.program.contains('/') {
            anyhow::anyhow!("could not run `{self}`: `{}` does not exist", self.program)
        } else if e.kind() == ErrorKind::NotFound {
            anyhow::anyhow!("could not run `{self}`: `{}` not found on PATH", self.program)
        } else {
            anyhow::anyhow!("could not run `{self}`: {e}")
        }
    }

    /// Prints the command, runs it with this process's stdin/stdout/stderr, and fails if it
    /// does not exit 0.
    pub fn run(&self) -> Result<()> {
        println!("    $ {self}");
        let started = Instant::now();
        let status = self.command().status().map_err(|e| self.spawn_error(e))?;
        if !status.success() {
            bail!("`{self}` failed ({status}) after {}", elapsed(started));
        }
        Ok(())
    }

    /// Prints the command, runs it with this process's stdin/stdout/stderr, and returns how it
    /// ended (for commands whose exit code means something).
    pub fn status(&self) -> Result<std::process::ExitStatus> {
        println!("    $ {self}");
        self.command().status().map_err(|e| self.spawn_error(e))
    }

    /// Prints the command and runs it like [`Cmd::run`], but returns its stdout (stderr still
    /// goes to this process's).
    pub fn run_stdout(&self) -> Result<String> {
        println!("    $ {self}");
        let started = Instant::now();
        let out =
            self.command().stdin(Stdio::null()).stderr(Stdio::inherit()).output().map_err(|e| self.spawn_error(e))?;
        if !out.status.success() {
            bail!("`{self}` failed ({}) after {}", out.status, elapsed(started));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs the command without printing it, capturing its output (a probe). Fails only if
    /// it cannot be started.
    pub fn output(&self) -> Result<Output> {
        self.command().stdin(Stdio::null()).output().map_err(|e| self.spawn_error(e))
    }

    /// A probe's stdout when it exits 0; `None` when it cannot start or fails.
    pub fn stdout_if_ok(&self) -> Option<String> {
        match self.output() {
            Ok(out) if out.status.success() => Some(String::from_utf8_lossy(&out.stdout).into()),
            _ => None,
        }
    }

    /// Runs the command like [`Cmd::run`], retrying a few times after a pause when it fails.
    pub fn run_with_retries(&self, attempts: u32, pause: Duration, why: &str) -> Result<()> {
        let mut attempt = 1;
        loop {
            match self.run() {
                Ok(()) => return Ok(()),
                Err(e) if attempt < attempts => {
                    println!(
                        "    attempt {attempt}/{attempts} failed: {e:#}; retrying in {}s ({why})",
                        pause.as_secs()
                    );
                    std::thread::sleep(pause);
                    attempt += 1;
                }
                Err(e) => return Err(e).context(format!("{attempts} attempts failed")),
            }
        }
    }
}

impl std::fmt::Display for Cmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut s = String::new();
        for (name, _, shown) in &self.envs {
            let _ = write!(s, "{name}={} ", quote(shown));
        }
        s.push_str(&quote(&self.program));
        for a in &self.args {
            s.push(' ');
            s.push_str(&quote(a));
        }
        f.write_str(&s)
    }
}

/// Quotes a word for display when it holds characters a shell would split on.
fn quote(word: &str) -> String {
    let plain = !word.is_empty() && word.chars().all(|c| c.is_ascii_alphanumeric() || "-_./:=+@,%$".contains(c));
    if plain { word.to_owned() } else { format!("'{}'", word.replace('\'', r"'\''")) }
}

/// Whether a program can be found on PATH (or is a path to an executable file).
pub fn on_path(program: &str) -> bool {
    let is_exec = |p: &Path| {
        use std::os::unix::fs::PermissionsExt as _;
        p.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        return is_exec(Path::new(program));
    }
    std::env::var_os("PATH").is_some_and(|path| std::env::split_paths(&path).any(|dir| is_exec(&dir.join(program))))
}

/// Whether this process runs as root (effective uid 0), from /proc/self/status.
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::{Cmd, quote};

    #[test]
    fn displays_commands_shell_style() {
        let cmd = Cmd::cargo().env_shown("PATH", "/x:/y", "/x:$PATH").env("A", "b c").args([
            "test",
            "--",
            "--test-threads=1",
            "it's",
        ]);
        assert_eq!(cmd.to_string(), r"PATH=/x:$PATH A='b c' cargo test -- --test-threads=1 'it'\''s'");
        assert_eq!(quote(""), "''");
    }

    #[test]
    fn reports_failures_with_the_command_and_status() {
        let e = Cmd::new("false").run().err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.starts_with("`false` failed (exit status: 1)"), "{e}");
        let e = Cmd::new("xtask-no-such-program").run().err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("not found on PATH"), "{e}");
    }
}
