//! A private bpffs for tests that pin maps without an agent.
use std::{
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A private bpffs, unmounted (with everything pinned in it) on drop.
pub struct Bpffs(pub PathBuf);

impl Bpffs {
    pub fn new() -> Bpffs {
        let dir = std::env::temp_dir().join(format!(
            "nm-bpffs-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        assert!(Command::new("mount").args(["-t", "bpf", "bpffs"]).arg(&dir).status().unwrap().success());
        Bpffs(dir)
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}
