//! Booting a guest: `qemu-system-x86_64 -accel tcg` (KVM does not work on these hosts: they are
//! nested PVM guests, and stock kernels hang under it), the host's root shared read-only over
//! virtio-9p, the run's output directory read-write, the console on the first serial port. The
//! console is echoed as it arrives (guest lines are what the runner prints) and kept in a file.

use std::{
    fs,
    io::{Read as _, Seek as _, SeekFrom, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use super::initramfs::{OUT_TAG, ROOT_TAG};
use crate::cmd::on_path;

pub const QEMU: &str = "qemu-system-x86_64";

pub struct Boot<'a> {
    pub vmlinuz: &'a Path,
    pub initramfs: &'a Path,
    pub out_dir: &'a Path,
    pub console: PathBuf,
    pub memory_mib: u32,
    pub cpus: u32,
    pub timeout: Duration,
}

pub fn args(boot: &Boot<'_>) -> Vec<String> {
    let mut args: Vec<String> =
        ["-accel", "tcg", "-nodefaults", "-no-user-config", "-nographic", "-no-reboot", "-display", "none"]
            .map(str::to_owned)
            .to_vec();
    args.extend([
        "-m".to_owned(),
        boot.memory_mib.to_string(),
        "-smp".to_owned(),
        boot.cpus.to_string(),
        "-serial".to_owned(),
        format!("file:{}", boot.console.display()),
        "-kernel".to_owned(),
        boot.vmlinuz.display().to_string(),
        "-initrd".to_owned(),
        boot.initramfs.display().to_string(),
        "-append".to_owned(),
        "console=ttyS0 panic=-1 quiet loglevel=4".to_owned(),
        "-virtfs".to_owned(),
        format!("local,path=/,mount_tag={ROOT_TAG},security_model=none,readonly=on"),
        "-virtfs".to_owned(),
        format!("local,path={},mount_tag={OUT_TAG},security_model=none", boot.out_dir.display()),
    ]);
    args
}

/// Boots and waits for the guest to power off (or kills it at the time limit). Returns whether
/// it powered off by itself.
pub fn boot(boot: &Boot<'_>) -> Result<bool> {
    if !on_path(QEMU) {
        bail!("{QEMU} not found: install the Debian package qemu-system-x86 (cargo xtask setup does)");
    }
    fs::write(&boot.console, "")?;
    let args = args(boot);
    println!("    $ {QEMU} {}", args.join(" "));
    let mut child = Command::new(QEMU)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {QEMU}"))?;
    let stop = Arc::new(AtomicBool::new(false));
    let echo = {
        let (path, stop) = (boot.console.clone(), stop.clone());
        std::thread::spawn(move || echo_console(&path, &stop))
    };
    let started = Instant::now();
    let finished = loop {
        if let Some(status) = child.try_wait()? {
            if !status.success() {
                let mut err = String::new();
                let _ = child.stderr.take().map(|mut e| e.read_to_string(&mut err));
                stop.store(true, Ordering::Relaxed);
                let _ = echo.join();
                bail!("{QEMU} failed ({status}): {}", err.trim());
            }
            break true;
        }
        if started.elapsed() > boot.timeout {
            println!("    the guest is still running after {:?}: stopping it", boot.timeout);
            child.kill().context("stopping qemu")?;
            child.wait()?;
            break false;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    stop.store(true, Ordering::Relaxed);
    let _ = echo.join();
    Ok(finished)
}

/// Prints the console file's new lines until `stop`, without terminal escape sequences (the
/// firmware's screen clearing).
fn echo_console(path: &Path, stop: &AtomicBool) {
    let Ok(mut file) = fs::File::open(path) else { return };
    let mut pending = Vec::new();
    let mut pos = 0;
    loop {
        let done = stop.load(Ordering::Relaxed);
        let mut chunk = Vec::new();
        if file.seek(SeekFrom::Start(pos)).is_ok() && file.read_to_end(&mut chunk).is_ok() {
            pos += chunk.len() as u64;
            pending.extend_from_slice(&chunk);
        }
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let text = strip_escapes(&String::from_utf8_lossy(&line));
            let text = text.trim_end();
            if !text.is_empty() {
                println!("    | {text}");
            }
        }
        let _ = std::io::stdout().flush();
        if done {
            return;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn strip_escapes(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => {
                // CSI: ESC [ params final-byte; other escapes: ESC + one char.
                if chars.peek() == Some(&'[') {
                    chars.next();
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                } else {
                    chars.next();
                }
            }
            '\r' => {}
            c if c.is_control() && c != '\t' && c != '\n' => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_terminal_escapes_from_the_console() {
        assert_eq!(strip_escapes("\u{1b}c\u{1b}[?7l\u{1b}[2JSeaBIOS (version 1)\r"), "SeaBIOS (version 1)");
        assert_eq!(strip_escapes("[guest] a ... ok"), "[guest] a ... ok");
    }

    #[test]
    fn boots_with_tcg_and_both_shares() {
        let b = Boot {
            vmlinuz: Path::new("/k/vmlinuz"),
            initramfs: Path::new("/r/initramfs"),
            out_dir: Path::new("/r/out"),
            console: "/r/console.log".into(),
            memory_mib: 1536,
            cpus: 2,
            timeout: Duration::from_secs(1),
        };
        let a = args(&b).join(" ");
        assert!(a.contains("-accel tcg"), "{a}");
        assert!(a.contains("local,path=/,mount_tag=hostroot,security_model=none,readonly=on"), "{a}");
        assert!(a.contains("local,path=/r/out,mount_tag=out,security_model=none"), "{a}");
        assert!(!a.contains("kvm"), "{a}");
    }
}
