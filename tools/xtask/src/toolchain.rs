//! Where the eBPF toolchain lives (see shared/ebpf-toolchain.md): Debian's rustc 1.96 linked
//! into rustup as `bpf-debian`, LLVM 22 for bpf-linker.

use std::{env, ffi::OsString, path::PathBuf};

use crate::cmd::Cmd;

/// The rustup name `cargo xtask setup` links Debian's compiler under.
pub const BPF_TOOLCHAIN: &str = "bpf-debian";
/// Where Debian's compiler lives (its sysroot).
pub const BPF_TOOLCHAIN_DIR: &str = "/usr";
/// The library source `-Z build-std=core` needs (Debian package rust-web-src).
pub const BPF_LIBRARY_SRC: &str = "/usr/lib/rustlib/src/rust/library";
/// LLVM 22's tools; bpf-linker must find this LLVM, not Debian's default one (set once, in
/// `.cargo/config.toml`, for this and node-manager's build.rs).
pub const LLVM_BIN: &str = env!("NM_LLVM_BIN");
pub const BPF_LINKER_VERSION: &str = "0.10.0";
pub const BPF_TARGET: &str = "bpfel-unknown-none";

/// `$CARGO_HOME/bin` (where `cargo install` puts bpf-linker).
pub fn cargo_bin_dir() -> Option<PathBuf> {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .map(|home| home.join("bin"))
}

/// PATH with LLVM 22's tools and cargo's bin directory in front.
fn bpf_path() -> OsString {
    let mut dirs = vec![PathBuf::from(LLVM_BIN)];
    dirs.extend(cargo_bin_dir());
    if let Some(path) = env::var_os("PATH") {
        dirs.extend(env::split_paths(&path));
    }
    env::join_paths(dirs).unwrap_or_else(|_| env::var_os("PATH").unwrap_or_default())
}

impl Cmd {
    /// Puts LLVM 22 (and cargo's bin directory) first on the command's PATH.
    pub fn with_llvm_path(self) -> Self {
        let shown = match cargo_bin_dir() {
            Some(bin) => format!("{LLVM_BIN}:{}:$PATH", bin.display()),
            None => format!("{LLVM_BIN}:$PATH"),
        };
        self.env_shown("PATH", bpf_path(), &shown)
    }
}

/// The rustup toolchains installed, by name.
pub fn rustup_toolchains() -> Option<Vec<String>> {
    Cmd::new("rustup")
        .args(["toolchain", "list"])
        .stdout_if_ok()
        .map(|out| out.lines().filter_map(|l| l.split_whitespace().next().map(str::to_owned)).collect())
}

/// The toolchain that builds the eBPF crate, chosen as node-manager's build.rs does:
/// `NM_EBPF_TOOLCHAIN`, else `bpf-debian` when rustup has it, else `nightly`.
pub fn ebpf_toolchain() -> String {
    match env::var("NM_EBPF_TOOLCHAIN") {
        Ok(name) if !name.is_empty() => name,
        _ if rustup_toolchains().is_some_and(|t| t.iter().any(|n| n == BPF_TOOLCHAIN)) => BPF_TOOLCHAIN.to_owned(),
        _ => "nightly".to_owned(),
    }
}
