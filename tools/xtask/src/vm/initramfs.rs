//! The guest's first stage: a small initramfs with busybox, the modules that mount the host's
//! root over 9p (virtio), and an `/init` that builds the guest's file system and switches to it:
//!
//! - `/`: the host's root, read-only (the test binaries, tools and libraries at their own
//!   paths, so nothing is copied and every path baked into a test binary still holds);
//! - the run's output directory: read-write (a second 9p share), where results land;
//! - `/tmp`, `/run`, `/dev/shm`: the guest's own tmpfs; `/proc`, `/sys`, `/dev`, bpffs at
//!   `/sys/fs/bpf` and cgroup2 at `/sys/fs/cgroup`: the guest kernel's.
//!
//! `/init` runs as PID 1 and hands PID 1 over with `switch_root`, so the kernel's module
//! autoloader (which runs in PID 1's root) sees the host root and the guest's `modprobe` hook.

use std::{
    fs,
    io::Write as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};

use super::kernel::Kernel;
use crate::cmd::Cmd;

/// Mount tags of the 9p shares.
pub const ROOT_TAG: &str = "hostroot";
pub const OUT_TAG: &str = "out";
const BUSYBOX: &str = "/bin/busybox";
/// Modules for the 9p root (their dependencies are added by modprobe --show-depends).
const ROOT_MODULES: [&str; 3] = ["virtio_pci", "9pnet_virtio", "9p"];

/// What `/init` runs once the guest's root is in place (as PID 1, after `switch_root`).
pub struct Stage2 {
    pub out_dir: PathBuf,
    /// A shell command line (run by the host's /bin/sh).
    pub command: String,
}

/// Writes the initramfs for `kernel` to `path` (an uncompressed newc archive).
pub fn build(kernel: &Kernel, stage2: &Stage2, path: &Path) -> Result<()> {
    if !Path::new(BUSYBOX).is_file() {
        bail!("{BUSYBOX} is missing: install the Debian package busybox-static (cargo xtask setup does)");
    }
    let mut archive = Newc::default();
    for dir in ["bin", "dev", "proc", "sys", "newroot", "modules"] {
        archive.dir(dir);
    }
    archive.file("bin/busybox", &fs::read(BUSYBOX)?, 0o755);
    let mut order = String::new();
    for module in root_modules(kernel)? {
        let name = module.file_name().context("module path")?.to_string_lossy().trim_end_matches(".xz").to_owned();
        archive.file(&format!("modules/{name}"), &module_bytes(&module)?, 0o644);
        order.push_str(&name);
        order.push('\n');
    }
    archive.file("modules/order", order.as_bytes(), 0o644);
    archive.file("init", init_script(stage2).as_bytes(), 0o755);
    fs::write(path, archive.finish()).with_context(|| format!("writing {}", path.display()))
}

/// The modules to insert, in order, for the 9p root (built-in ones are skipped).
fn root_modules(kernel: &Kernel) -> Result<Vec<PathBuf>> {
    let mut paths: Vec<PathBuf> = Vec::new();
    for module in ROOT_MODULES {
        let out = Cmd::new("modprobe")
            .args(["-d", &kernel.root.display().to_string(), "-S", &kernel.release, "--show-depends", module])
            .output()?;
        if !out.status.success() {
            bail!(
                "modprobe --show-depends {module} for {}: {}",
                kernel.release,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some(path) = line.strip_prefix("insmod ") {
                let path = PathBuf::from(path.trim());
                if !paths.contains(&path) {
                    paths.push(path);
                }
            }
        }
    }
    Ok(paths)
}

/// A module's bytes, decompressed (busybox's insmod takes plain ELF).
fn module_bytes(path: &Path) -> Result<Vec<u8>> {
    if path.extension().is_some_and(|e| e == "xz") {
        let out = Cmd::new("xz").args(["-dc", &path.display().to_string()]).output()?;
        if !out.status.success() {
            bail!("xz -dc {}: {}", path.display(), String::from_utf8_lossy(&out.stderr).trim());
        }
        return Ok(out.stdout);
    }
    fs::read(path).with_context(|| format!("reading {}", path.display()))
}

fn init_script(stage2: &Stage2) -> String {
    let out = stage2.out_dir.display();
    format!(
        r#"#!/bin/busybox sh
# node-manager guest, stage 1: mount the host's root read-only over 9p and switch to it.
/bin/busybox --install -s /bin
fail() {{ echo "guest init: $*"; echo o > /proc/sysrq-trigger; sleep 30; }}
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules/order); do insmod /modules/$m || fail "insmod $m failed"; done
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=512000 {ROOT_TAG} /newroot || fail "mounting the host root (9p) failed"
mount -t 9p -o trans=virtio,version=9p2000.L,rw,msize=512000 {OUT_TAG} "/newroot{out}" || fail "mounting the output share failed"
for d in tmp run; do mount -t tmpfs -o mode=1777 tmpfs /newroot/$d || fail "tmpfs on /$d"; done
mount -t proc proc /newroot/proc
mount -t sysfs sys /newroot/sys
mount -t devtmpfs dev /newroot/dev
mkdir -p /newroot/dev/shm /newroot/dev/pts
mount -t tmpfs -o mode=1777 tmpfs /newroot/dev/shm
mount -t devpts devpts /newroot/dev/pts
mount -t bpf bpffs /newroot/sys/fs/bpf || fail "mounting bpffs"
mount -t cgroup2 cgroup2 /newroot/sys/fs/cgroup || fail "mounting cgroup2"
mount -t debugfs debugfs /newroot/sys/kernel/debug 2>/dev/null
exec switch_root /newroot /bin/sh -c '{command}; echo o > /proc/sysrq-trigger; sleep 30'
"#,
        command = stage2.command.replace('\'', r"'\''"),
    )
}

/// A newc ("070701") cpio archive, the format the kernel unpacks as an initramfs.
#[derive(Default)]
struct Newc {
    data: Vec<u8>,
    inode: u32,
}

impl Newc {
    fn entry(&mut self, name: &str, mode: u32, body: &[u8]) {
        self.inode += 1;
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.inode,
            mode,
            0, // uid
            0, // gid
            1, // nlink
            0, // mtime
            body.len(),
            0, // devmajor
            0, // devminor
            0, // rdevmajor
            0, // rdevminor
            name.len() + 1,
            0, // check
        );
        self.data.extend_from_slice(header.as_bytes());
        self.data.extend_from_slice(name.as_bytes());
        self.data.push(0);
        self.pad();
        self.data.extend_from_slice(body);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.data.len().is_multiple_of(4) {
            self.data.push(0);
        }
    }

    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040_755, &[]);
    }

    fn file(&mut self, name: &str, body: &[u8], perm: u32) {
        self.entry(name, 0o100_000 | perm, body);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        let mut out = self.data;
        // Archives are conventionally padded to 512 bytes.
        let _ = out.write_all(&vec![0; (512 - out.len() % 512) % 512]);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_entries_are_aligned_and_terminated() {
        let mut a = Newc::default();
        a.dir("bin");
        a.file("init", b"#!/bin/sh\n", 0o755);
        let bytes = a.finish();
        assert!(bytes.starts_with(b"070701"));
        assert_eq!(bytes.len() % 512, 0);
        let text = String::from_utf8_lossy(&bytes);
        // "init": mode 0100755 and a 10-byte body.
        let init = text.find("init\0").unwrap();
        let header = &text[init - 110..init];
        assert_eq!(&header[14..22], "000081ed");
        assert_eq!(&header[54..62], "0000000a");
        assert!(text.contains("TRAILER!!!"));
        // Every header starts on a 4-byte boundary.
        for (at, _) in text.match_indices("070701") {
            assert_eq!(at % 4, 0);
        }
    }

    #[test]
    fn the_init_script_quotes_the_stage2_command() {
        let script = init_script(&Stage2 { out_dir: "/t/out".into(), command: "echo 'hi'".into() });
        assert!(script.contains(r#"/bin/sh -c 'echo '\''hi'\''; echo o"#), "{script}");
        assert!(script.contains("\"/newroot/t/out\""));
    }
}
