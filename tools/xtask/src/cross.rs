//! `cargo xtask cross`: node-manager for another CPU architecture, from Debian packages and
//! crates.io only. rustup cannot add targets here, so a foreign target's standard library is
//! built from source (`-Z build-std`) by Debian's compiler (`bpf-debian`, which has its library
//! source, `rust-web-src`), and Debian's cross gcc links. The eBPF object is the host build's
//! (see `ebpf_object`). `--check` runs the result under qemu-user and compares its command line
//! with the host binary's. Installs nothing: `cargo xtask setup` does.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use anyhow::{Context as _, Result, bail};
use clap::{Args, ValueEnum};

use crate::{
    cmd::{Cmd, on_path, step},
    ebpf_object,
    toolchain::{BPF_TOOLCHAIN, rustup_toolchains},
};

/// A target architecture, by Docker's name for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Arch {
    Amd64,
    Arm64,
}

impl Arch {
    pub fn host() -> Option<Arch> {
        match std::env::consts::ARCH {
            "x86_64" => Some(Arch::Amd64),
            "aarch64" => Some(Arch::Arm64),
            _ => None,
        }
    }

    /// The architecture the tests cross-build for: the one the host is not.
    pub fn other() -> Option<Arch> {
        Arch::host().map(|h| if h == Arch::Amd64 { Arch::Arm64 } else { Arch::Amd64 })
    }

    pub fn triple(self) -> &'static str {
        match self {
            Arch::Amd64 => "x86_64-unknown-linux-gnu",
            Arch::Arm64 => "aarch64-unknown-linux-gnu",
        }
    }

    /// The GNU triple of Debian's cross tools and of the libc they link against.
    fn gnu(self) -> &'static str {
        match self {
            Arch::Amd64 => "x86_64-linux-gnu",
            Arch::Arm64 => "aarch64-linux-gnu",
        }
    }

    /// ELF `e_machine`: EM_X86_64, EM_AARCH64.
    fn elf_machine(self) -> u16 {
        match self {
            Arch::Amd64 => 62,
            Arch::Arm64 => 183,
        }
    }

    fn qemu(self) -> &'static str {
        match self {
            Arch::Amd64 => "qemu-x86_64",
            Arch::Arm64 => "qemu-aarch64",
        }
    }

    /// Debian packages that build for this architecture on another and run the result.
    pub fn cross_packages(self) -> [&'static str; 3] {
        match self {
            Arch::Amd64 => ["gcc-x86-64-linux-gnu", "libc6-dev-amd64-cross", "qemu-user"],
            Arch::Arm64 => ["gcc-aarch64-linux-gnu", "libc6-dev-arm64-cross", "qemu-user"],
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Arch::Amd64 => "amd64",
            Arch::Arm64 => "arm64",
        }
    }
}

#[derive(Args, Debug)]
pub struct CrossArgs {
    /// Target architecture.
    #[arg(long, value_enum, default_value_t = Arch::Arm64)]
    pub arch: Arch,
    /// Build with the release profile.
    #[arg(long)]
    pub release: bool,
    /// The eBPF object to embed (default: the one the host build made).
    #[arg(long, value_name = "PATH")]
    pub ebpf_object: Option<PathBuf>,
    /// Copy the binary here.
    #[arg(long, value_name = "PATH")]
    pub out: Option<PathBuf>,
    /// Strip debug information from the copy (`--out`), keeping the symbols for backtraces
    /// (`<gnu triple>-strip --strip-debug`, from Debian's binutils).
    #[arg(long, requires = "out")]
    pub strip: bool,
    /// Run the binary (under qemu-user for a foreign architecture) and compare its help,
    /// version and a configuration error with the host build's.
    #[arg(long)]
    pub check: bool,
}

pub fn run(args: &CrossArgs) -> Result<()> {
    let Some(host) = Arch::host() else {
        bail!("cargo xtask cross runs on x86_64 or aarch64 hosts, not {}", std::env::consts::ARCH);
    };
    let native = args.arch == host;
    let cargo = if native { Cmd::cargo() } else { cross_cargo(args.arch)? };
    if args.check && !native && !on_path(args.arch.qemu()) {
        bail!("{} not found (Debian package qemu-user): run `cargo xtask setup`", args.arch.qemu());
    }
    let host_build = match (&args.ebpf_object, args.check) {
        (Some(_), false) => None,
        _ => Some(ebpf_object::host_build()?),
    };
    let object = match (&args.ebpf_object, &host_build) {
        (Some(path), _) => path.clone(),
        (None, Some(built)) => built.object.clone(),
        (None, None) => unreachable!("host_build runs when no object is given"),
    };

    step(format!(
        "cross: node-manager for {} ({}, {} profile, eBPF object {})",
        args.arch.name(),
        args.arch.triple(),
        if args.release { "release" } else { "dev" },
        object.display()
    ));
    let object = fs::canonicalize(&object).with_context(|| format!("eBPF object {}", object.display()))?;
    let mut build = cargo
        .args(["build", "--package", "node-manager", "--bin", "node-manager", "--target", args.arch.triple()])
        .arg("--message-format=json-render-diagnostics")
        .env("NM_EBPF_OBJECT", object);
    if args.release {
        build = build.arg("--release");
    }
    if !native {
        build = with_cross_env(build, args.arch);
    }
    let messages = build.run_stdout()?;
    let mut binary = executable(&messages).context("cargo did not report the node-manager binary")?;
    println!("    built {} ({} bytes)", binary.display(), fs::metadata(&binary)?.len());

    if let Some(out) = &args.out {
        if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        fs::copy(&binary, out).with_context(|| format!("copying {} to {}", binary.display(), out.display()))?;
        if args.strip {
            Cmd::new(format!("{}-strip", args.arch.gnu())).arg("--strip-debug").arg(out.display().to_string()).run()?;
        }
        println!("    copied to {} ({} bytes)", out.display(), fs::metadata(out)?.len());
        binary = out.clone();
    }
    check_elf(&binary, args.arch)?;
    if let (true, Some(built)) = (args.check, &host_build) {
        let runner = if native { Vec::new() } else { qemu_runner(args.arch)? };
        compare_cli(&built.binary, &runner, &binary)?;
    }
    Ok(())
}

/// Debian's compiler, which has its library source for `-Z build-std`: through rustup as
/// `bpf-debian`, or the `cargo` on PATH where there is no rustup (the Dockerfile).
fn cross_cargo(arch: Arch) -> Result<Cmd> {
    let (cargo, rustc) = match rustup_toolchains() {
        Some(toolchains) if toolchains.iter().any(|t| t == BPF_TOOLCHAIN) => {
            (Cmd::cargo().arg(format!("+{BPF_TOOLCHAIN}")), Cmd::new("rustc").arg(format!("+{BPF_TOOLCHAIN}")))
        }
        Some(_) => bail!(
            "rustup has no {BPF_TOOLCHAIN} toolchain (Debian's rustc with its library source): run `cargo xtask setup`"
        ),
        None => (Cmd::cargo(), Cmd::new("rustc")),
    };
    let sysroot = rustc.args(["--print", "sysroot"]).stdout_if_ok().context("running rustc --print sysroot")?;
    let library = Path::new(sysroot.trim()).join("lib/rustlib/src/rust/library/std");
    if !library.is_dir() {
        bail!(
            "{} is missing: building the standard library for {} needs the compiler's library source \
             (Debian package rust-web-src): run `cargo xtask setup`",
            library.display(),
            arch.triple()
        );
    }
    let gcc = format!("{}-gcc", arch.gnu());
    if !on_path(&gcc) {
        bail!("{gcc} not found (Debian packages {}): run `cargo xtask setup`", arch.cross_packages()[..2].join(", "));
    }
    Ok(cargo)
}

/// Linker, C compiler and archiver for the target (ring, for one, compiles C), and
/// `-Z build-std` (Debian's compiler is a stable release, hence RUSTC_BOOTSTRAP).
fn with_cross_env(cmd: Cmd, arch: Arch) -> Cmd {
    let triple_env = arch.triple().replace('-', "_");
    let gnu = arch.gnu();
    cmd.args(["-Z", "build-std=std,panic_abort"])
        .env("RUSTC_BOOTSTRAP", "1")
        .env(&format!("CARGO_TARGET_{}_LINKER", triple_env.to_ascii_uppercase()), format!("{gnu}-gcc"))
        .env(&format!("CC_{triple_env}"), format!("{gnu}-gcc"))
        .env(&format!("AR_{triple_env}"), format!("{gnu}-ar"))
}

/// The `node-manager` executable in cargo's JSON messages.
fn executable(messages: &str) -> Option<PathBuf> {
    messages
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "node-manager")
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
}

/// The binary is a 64-bit little-endian ELF for `arch`.
fn check_elf(binary: &Path, arch: Arch) -> Result<()> {
    let bytes = fs::read(binary).with_context(|| format!("reading {}", binary.display()))?;
    let header = bytes.get(..20).context("shorter than an ELF header")?;
    let machine = u16::from_le_bytes([header[18], header[19]]);
    if !header.starts_with(b"\x7fELF") || header[4] != 2 || header[5] != 1 || machine != arch.elf_machine() {
        bail!("{} is not a 64-bit little-endian ELF for {} (e_machine {machine})", binary.display(), arch.name());
    }
    Ok(())
}

/// `qemu-<arch> -L <the cross libc>`: the dynamic loader and libc of Debian's cross packages.
fn qemu_runner(arch: Arch) -> Result<Vec<String>> {
    let sysroot = format!("/usr/{}", arch.gnu());
    if !Path::new(&sysroot).join("lib").is_dir() {
        bail!("{sysroot}/lib is missing (Debian package {}): run `cargo xtask setup`", arch.cross_packages()[1]);
    }
    Ok(vec![arch.qemu().to_owned(), "-L".to_owned(), sysroot])
}

/// Command lines whose output must be the same for both builds; the last one is a
/// configuration error (exit 2, naming the variable).
const SAME_OUTPUT: [&[&str]; 6] = [
    &["--help"],
    &["--version"],
    &["run", "--help"],
    &["cleanup", "--help"],
    &["inspect", "--help"],
    &["run", "--drop-invalid-input", "maybe"],
];

fn run_captured(program: &[String], binary: &Path, args: &[&str]) -> Result<Output> {
    let (first, rest) = match program.split_first() {
        Some((first, rest)) => (first.as_str(), rest),
        None => (binary.to_str().context("non-UTF-8 path")?, &[][..]),
    };
    let mut cmd = Command::new(first);
    cmd.args(rest);
    if !program.is_empty() {
        cmd.arg(binary);
    }
    // A clean environment: the flags' variables must not leak into the help text.
    cmd.args(args).env_clear().output().with_context(|| format!("running {first}"))
}

fn compare_cli(host: &Path, runner: &[String], target: &Path) -> Result<()> {
    step(format!(
        "cross: checking {} against the host build{}",
        target.display(),
        if runner.is_empty() { String::new() } else { format!(" under {}", runner.join(" ")) }
    ));
    for args in SAME_OUTPUT {
        let expected = run_captured(&[], host, args)?;
        let got = run_captured(runner, target, args)?;
        let shown = format!("node-manager {}", args.join(" "));
        if (got.status.code(), &got.stdout, &got.stderr) != (expected.status.code(), &expected.stdout, &expected.stderr)
        {
            bail!(
                "`{shown}` differs: host exit {:?}, stdout {:?}, stderr {:?}; target exit {:?}, stdout {:?}, stderr {:?}",
                expected.status.code(),
                String::from_utf8_lossy(&expected.stdout),
                String::from_utf8_lossy(&expected.stderr),
                got.status.code(),
                String::from_utf8_lossy(&got.stdout),
                String::from_utf8_lossy(&got.stderr)
            );
        }
        println!(
            "    same output as the host build: {shown} (exit {:?}, {} bytes)",
            got.status.code(),
            got.stdout.len() + got.stderr.len()
        );
    }
    // The configuration error is the one meant, not some other failure.
    let error = run_captured(runner, target, SAME_OUTPUT[5])?;
    let stderr = String::from_utf8_lossy(&error.stderr);
    if error.status.code() != Some(2) || !stderr.contains("RULE_DROP_INVALID_INPUT_ENABLE") {
        bail!("`node-manager run --drop-invalid-input maybe`: exit {:?}, {stderr}", error.status.code());
    }
    let help = String::from_utf8_lossy(&run_captured(runner, target, &["--help"])?.stdout).into_owned();
    if !["Usage: node-manager", "run", "cleanup", "inspect"].iter().all(|w| help.contains(w)) {
        bail!("unexpected --help output:\n{help}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_executable_in_cargo_messages() {
        let messages = r#"{"reason":"compiler-artifact","target":{"name":"node_manager"},"executable":null}
{"reason":"compiler-artifact","target":{"name":"node-manager"},"executable":"/t/aarch64-unknown-linux-gnu/debug/node-manager"}"#;
        assert_eq!(executable(messages), Some(PathBuf::from("/t/aarch64-unknown-linux-gnu/debug/node-manager")));
        assert_eq!(executable("{}"), None);
    }

    #[test]
    fn cross_environment_names_the_target() {
        let cmd = with_cross_env(Cmd::cargo().arg("build"), Arch::Arm64).to_string();
        assert!(cmd.contains("CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc"), "{cmd}");
        assert!(cmd.contains("CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc"), "{cmd}");
        assert!(cmd.contains("RUSTC_BOOTSTRAP=1") && cmd.ends_with("build -Z build-std=std,panic_abort"), "{cmd}");
    }

    #[test]
    fn the_elf_check_tells_architectures_apart() {
        // This test binary is an ELF for the host.
        let me = std::env::current_exe().unwrap();
        let host = Arch::host().unwrap();
        check_elf(&me, host).unwrap();
        let other = Arch::other().unwrap();
        assert!(check_elf(&me, other).unwrap_err().to_string().contains("is not a 64-bit little-endian ELF"));
    }
}
