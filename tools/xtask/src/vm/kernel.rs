//! Debian's kernel images for the matrix: resolved, downloaded and unpacked with a private apt
//! configuration under `target/vm/apt` (the machine's own apt configuration is never touched),
//! from Debian's registry only.
//!
//! Only what a guest needs is unpacked: the image, and the modules the tests load (networking,
//! netfilter, 9p and virtio for the shared root, and their library dependencies); `depmod`
//! then indexes them so the guest's `modprobe -d` finds them.

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, Result, bail};

use crate::cmd::{Cmd, step};

/// A kernel series of the matrix and where Debian ships it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Series {
    /// What `--kernel` takes.
    pub name: &'static str,
    /// Package versions of `linux-image-amd64` start with this (`None`: the newest of `suites`).
    pub version_prefix: Option<&'static str>,
    /// Debian suites searched, on deb.debian.org (`*-security` on its security archive).
    pub suites: &'static [&'static str],
    /// The Debian release that ships it, for the report.
    pub distribution: &'static str,
}

pub const SERIES: [Series; 4] = [
    Series {
        name: "5.10",
        version_prefix: Some("5.10."),
        suites: &["bullseye", "bullseye-security"],
        distribution: "Debian 11 bullseye",
    },
    Series {
        name: "6.1",
        version_prefix: Some("6.1."),
        suites: &["bookworm", "bookworm-security"],
        distribution: "Debian 12 bookworm",
    },
    Series {
        name: "6.12",
        version_prefix: Some("6.12."),
        suites: &["trixie", "trixie-security"],
        distribution: "Debian 13 trixie",
    },
    Series { name: "sid", version_prefix: None, suites: &["sid"], distribution: "Debian sid (newest)" },
];

pub fn series(name: &str) -> Result<Series> {
    SERIES.iter().find(|s| s.name == name).copied().with_context(|| {
        let known: Vec<&str> = SERIES.iter().map(|s| s.name).collect();
        format!("unknown kernel series {name:?}: use one of {}, or host", known.join(", "))
    })
}

/// An unpacked kernel, ready to boot.
#[derive(Clone, Debug)]
pub struct Kernel {
    /// `uname -r` in the guest, e.g. `5.10.0-46-amd64`.
    pub release: String,
    /// The Debian package version, e.g. `5.10.262-1`.
    pub package_version: String,
    /// Holds `boot/vmlinuz-<release>` and `lib/modules/<release>`.
    pub root: PathBuf,
}

impl Kernel {
    /// `boot/vmlinuz-<release>`, or `lib/modules/<release>/vmlinuz` where newer packages put it.
    pub fn vmlinuz(&self) -> PathBuf {
        let boot = self.root.join(format!("boot/vmlinuz-{}", self.release));
        if boot.exists() { boot } else { self.root.join(format!("lib/modules/{}/vmlinuz", self.release)) }
    }
}

/// Modules unpacked (paths below `lib/modules/<release>/`, matched as prefixes).
const MODULE_PREFIXES: &[&str] = &[
    "modules.",
    "kernel/net/",
    "kernel/lib/",
    "kernel/crypto/",
    "kernel/arch/x86/crypto/",
    "kernel/fs/9p/",
    "kernel/fs/netfs/",
    "kernel/fs/fscache/",
    "kernel/drivers/virtio/",
    "kernel/drivers/net/veth.ko",
    "kernel/drivers/net/dummy.ko",
];

/// Lists older than this are refreshed.
const LISTS_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

struct Apt {
    dir: PathBuf,
}

impl Apt {
    /// A private apt configuration for `suites`: its own sources, lists, cache and (empty)
    /// dpkg status, so downloading never depends on or changes the machine's apt state.
    fn new(vm_dir: &Path, series: &Series) -> Result<Apt> {
        let dir = vm_dir.join("apt").join(series.name);
        for sub in ["lists/partial", "cache/archives/partial", "sources.list.d", "preferences.d"] {
            fs::create_dir_all(dir.join(sub)).with_context(|| format!("creating {}", dir.join(sub).display()))?;
        }
        let keyring = "/usr/share/keyrings/debian-archive-keyring.gpg";
        let sources: String = series
            .suites
            .iter()
            .map(|suite| {
                let archive = if suite.ends_with("-security") { "debian-security" } else { "debian" };
                format!("deb [signed-by={keyring}] http://deb.debian.org/{archive} {suite} main\n")
            })
            .collect();
        write_if_changed(&dir.join("sources.list"), &sources)?;
        let d = dir.display();
        let conf = format!(
            "Dir::Etc::SourceList \"{d}/sources.list\";\nDir::Etc::SourceParts \"{d}/sources.list.d\";\n\
             Dir::Etc::Preferences \"{d}/preferences\";\nDir::Etc::PreferencesParts \"{d}/preferences.d\";\n\
             Dir::State::Lists \"{d}/lists\";\nDir::State::status \"{d}/status\";\nDir::Cache \"{d}/cache\";\n\
             APT::Architecture \"amd64\";\nAcquire::Languages \"none\";\n\
             Acquire::IndexTargets::deb::DEP-11::DefaultEnabled \"false\";\n\
             Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled \"false\";\n\
             Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled \"false\";\n"
        );
        write_if_changed(&dir.join("apt.conf"), &conf)?;
        for empty in ["status", "preferences"] {
            if !dir.join(empty).exists() {
                fs::write(dir.join(empty), "")?;
            }
        }
        if !keyring_present(keyring) {
            bail!("{keyring} is missing: install the Debian package debian-archive-keyring");
        }
        Ok(Apt { dir })
    }

    fn cmd(&self, program: &str) -> Cmd {
        Cmd::new(program).env("APT_CONFIG", self.dir.join("apt.conf"))
    }

    /// `apt-get update` unless the lists are fresh (and the sources unchanged).
    fn update(&self, force: bool) -> Result<()> {
        let stamp = self.dir.join("lists/.updated");
        let sources_time = fs::metadata(self.dir.join("sources.list")).and_then(|m| m.modified()).ok();
        let fresh = fs::metadata(&stamp).and_then(|m| m.modified()).is_ok_and(|t| {
            SystemTime::now().duration_since(t).is_ok_and(|age| age < LISTS_MAX_AGE)
                && sources_time.is_none_or(|s| s <= t)
        });
        if fresh && !force {
            return Ok(());
        }
        self.cmd("apt-get").args(["-q", "update"]).run_with_retries(
            3,
            Duration::from_secs(10),
            "the mirror may be unreachable for a moment",
        )?;
        fs::write(&stamp, "")?;
        Ok(())
    }

    fn show(&self, package: &str) -> Result<String> {
        let out = self.cmd("apt-cache").args(["show", package]).output()?;
        if !out.status.success() {
            bail!("apt-cache show {package}: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

fn keyring_present(path: &str) -> bool {
    Path::new(path).is_file()
}

fn write_if_changed(path: &Path, text: &str) -> Result<()> {
    if fs::read_to_string(path).ok().as_deref() != Some(text) {
        fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// One stanza of `apt-cache show`: its fields.
fn stanzas(text: &str) -> Vec<Vec<(&str, &str)>> {
    text.split("\n\n")
        .map(|stanza| {
            stanza.lines().filter(|l| !l.starts_with(' ')).filter_map(|l| l.split_once(": ")).collect::<Vec<_>>()
        })
        .filter(|fields| !fields.is_empty())
        .collect()
}

fn field<'a>(stanza: &[(&'a str, &'a str)], name: &str) -> Option<&'a str> {
    stanza.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
}

/// Package names in a Depends line (alternatives and version constraints dropped).
fn depends(line: &str) -> Vec<&str> {
    line.split(',').filter_map(|d| d.split('|').next()?.split_whitespace().next()).collect()
}

/// Compares Debian versions well enough for kernel packages (`5.10.262-1`, `6.12.95-1~bpo12+1`):
/// numeric runs compare as numbers, `~` sorts before anything.
pub fn version_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    fn parts(v: &str) -> Vec<(u8, u64, String)> {
        let mut out = Vec::new();
        let mut chars = v.chars().peekable();
        while let Some(&c) = chars.peek() {
            if c.is_ascii_digit() {
                let mut n = String::new();
                while let Some(&d) = chars.peek().filter(|d| d.is_ascii_digit()) {
                    n.push(d);
                    chars.next();
                }
                out.push((2, n.parse().unwrap_or(u64::MAX), String::new()));
            } else {
                chars.next();
                out.push((if c == '~' { 0 } else { 1 }, 0, c.to_string()));
            }
        }
        out
    }
    let (pa, pb) = (parts(a), parts(b));
    for i in 0..pa.len().max(pb.len()) {
        // A shorter version is older, unless the longer one continues with `~`.
        let end = (1, 0, String::new());
        let (x, y) = (pa.get(i).unwrap_or(&end), pb.get(i).unwrap_or(&end));
        match x.cmp(y) {
            std::cmp::Ordering::Equal => {}
            other => return other,
        }
    }
    std::cmp::Ordering::Equal
}

/// The `linux-image-amd64` metapackage version to use and the image package it depends on.
fn resolve(series: &Series, show_metapackage: &str) -> Result<(String, String)> {
    let mut candidates: Vec<(String, String)> = stanzas(show_metapackage)
        .iter()
        .filter_map(|s| {
            let version = field(s, "Version")?;
            let image = depends(field(s, "Depends")?).into_iter().find(|d| d.starts_with("linux-image-"))?;
            Some((version.to_owned(), image.to_owned()))
        })
        .filter(|(v, _)| series.version_prefix.is_none_or(|p| v.starts_with(p)))
        .collect();
    candidates.sort_by(|a, b| version_cmp(&a.0, &b.0));
    candidates.pop().with_context(|| {
        format!("no linux-image-amd64 of series {} in Debian {}", series.name, series.suites.join(", "))
    })
}

/// Resolves, downloads and unpacks the newest kernel of `series` (reused when already unpacked).
pub fn fetch(vm_dir: &Path, series: &Series) -> Result<Kernel> {
    step(format!("vm: kernel {}: resolving the newest Debian package ({})", series.name, series.distribution));
    let apt = Apt::new(vm_dir, series)?;
    apt.update(false)?;
    let (version, image) = match apt.show("linux-image-amd64").and_then(|s| resolve(series, &s)) {
        Ok(found) => found,
        // Stale lists may name a package the mirror no longer has, or miss a new one.
        Err(_) => {
            apt.update(true)?;
            resolve(series, &apt.show("linux-image-amd64")?)?
        }
    };
    let release = image.strip_prefix("linux-image-").unwrap_or(&image).to_owned();
    let root = vm_dir.join("kernels").join(&release);
    let kernel = Kernel { release, package_version: version.clone(), root };
    let done = kernel.root.join(".unpacked");
    if done.exists() && kernel.vmlinuz().exists() {
        println!("    {image} {version}: unpacked in {}", kernel.root.display());
        return Ok(kernel);
    }
    // Newer Debian kernels split the image: the package pulls the image (`linux-binary-*`), the
    // modules (`linux-modules-*`) and their indexes (`linux-base-<release>`) of the same version.
    let stanza_text = apt.show(&format!("{image}={version}"))?;
    let stanza = stanzas(&stanza_text).into_iter().next().context("empty apt-cache show")?;
    let mut packages = vec![image.clone()];
    if let Some(deps) = field(&stanza, "Depends") {
        packages.extend(
            depends(deps)
                .into_iter()
                .filter(|d| {
                    d.starts_with("linux-binary-")
                        || d.starts_with("linux-modules-")
                        || d.strip_prefix("linux-base-").is_some_and(|rest| rest == kernel.release)
                })
                .map(str::to_owned),
        );
    }
    let debs = vm_dir.join("debs");
    fs::create_dir_all(&debs)?;
    step(format!("vm: downloading {} {version} from deb.debian.org", packages.join(" ")));
    apt.cmd("apt-get")
        .args(["-q", "download"])
        .args(packages.iter().map(|p| format!("{p}={version}")))
        .in_dir(&debs)
        .run_with_retries(3, Duration::from_secs(10), "the mirror may be unreachable for a moment")?;
    if kernel.root.exists() {
        fs::remove_dir_all(&kernel.root)?;
    }
    fs::create_dir_all(&kernel.root)?;
    for package in &packages {
        let deb = find_deb(&debs, package, &version)?;
        unpack(&deb, &kernel)?;
        // The unpacked tree is what is kept; the package can be fetched again in seconds.
        fs::remove_file(&deb)?;
    }
    if !kernel.vmlinuz().exists() {
        bail!("{} has no kernel image ({})", packages.join(" + "), kernel.vmlinuz().display());
    }
    Cmd::new("depmod")
        .args(["-b", &kernel.root.display().to_string(), &kernel.release])
        .run()
        .context("depmod (Debian package kmod)")?;
    fs::write(&done, format!("{image} {version}\n"))?;
    Ok(kernel)
}

fn find_deb(dir: &Path, package: &str, version: &str) -> Result<PathBuf> {
    // apt-get download names files <package>_<version with ':' escaped>_<arch>.deb.
    let prefix = format!("{package}_{}_", version.replace(':', "%3a"));
    fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(&prefix)))
        .with_context(|| format!("apt-get download left no {prefix}*.deb in {}", dir.display()))
}

/// Whether an archive member (as `tar -t` lists it) is wanted; merged-/usr packages keep their
/// modules under `usr/lib/modules`, which is unpacked as `lib/modules`.
fn wanted(member: &str) -> bool {
    let path = member.trim_start_matches("./");
    let path = path.strip_prefix("usr/").unwrap_or(path);
    if let Some(rest) = path.strip_prefix("boot/") {
        return rest.starts_with("vmlinuz-") || rest.starts_with("config-");
    }
    let Some(rest) = path.strip_prefix("lib/modules/") else { return false };
    let Some((_, inside)) = rest.split_once('/') else { return false };
    inside == "vmlinuz" || (!inside.ends_with('/') && MODULE_PREFIXES.iter().any(|p| inside.starts_with(p)))
}

fn unpack(deb: &Path, kernel: &Kernel) -> Result<()> {
    step(format!("vm: unpacking the image and the modules the tests need from {}", deb.display()));
    let tar = |args: &[&str]| -> Result<std::process::Output> {
        let script = format!(
            "dpkg-deb --fsys-tarfile \"$0\" | tar {}",
            args.iter().map(|a| format!("'{a}'")).collect::<Vec<_>>().join(" ")
        );
        let out = Cmd::new("sh").args(["-c", &script, &deb.display().to_string()]).output()?;
        if !out.status.success() {
            bail!("unpacking {}: {}", deb.display(), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(out)
    };
    let listing = tar(&["-t"])?;
    let members: Vec<&str> = std::str::from_utf8(&listing.stdout)?.lines().filter(|m| wanted(m)).collect();
    if members.is_empty() {
        return Ok(()); // a package with nothing we need (the split image's metapackage part)
    }
    let list = kernel.root.join(".members");
    fs::write(&list, members.join("\n") + "\n")?;
    let dest = kernel.root.display().to_string();
    let list_arg = list.display().to_string();
    tar(&["-x", "-C", &dest, "--transform", "s,^\\./usr/lib/,./lib/,", "-T", &list_arg])?;
    fs::remove_file(&list)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::cmp::Ordering;

    use super::*;

    #[test]
    fn debian_versions_order_like_dpkg_for_kernel_packages() {
        assert_eq!(version_cmp("5.10.262-1", "5.10.223-1"), Ordering::Greater);
        assert_eq!(version_cmp("6.12.95-1~bpo12+1", "6.12.95-1"), Ordering::Less);
        assert_eq!(version_cmp("6.12.117-1", "6.12.107-1"), Ordering::Greater);
        assert_eq!(version_cmp("6.1.192-2", "6.1.192-2"), Ordering::Equal);
        assert_eq!(version_cmp("6.1.9-1", "6.1.10-1"), Ordering::Less);
    }

    #[test]
    fn resolves_the_newest_image_of_a_series() {
        let show = "Package: linux-image-amd64\nVersion: 6.12.117-1\nDepends: linux-image-6.12.117+deb13-amd64 (= 6.12.117-1)\n\n\
                    Package: linux-image-amd64\nVersion: 5.10.262-1\nDepends: linux-image-5.10.0-46-amd64 (= 5.10.262-1)\n\n\
                    Package: linux-image-amd64\nVersion: 5.10.223-1\nDepends: linux-image-5.10.0-32-amd64 (= 5.10.223-1)\n";
        let (v, image) = resolve(&series("5.10").unwrap(), show).unwrap();
        assert_eq!((v.as_str(), image.as_str()), ("5.10.262-1", "linux-image-5.10.0-46-amd64"));
        let (v, _) = resolve(&series("sid").unwrap(), show).unwrap();
        assert_eq!(v, "6.12.117-1");
        assert!(resolve(&series("6.1").unwrap(), show).unwrap_err().to_string().contains("series 6.1"));
        assert!(series("5.15").unwrap_err().to_string().contains("5.10, 6.1, 6.12, sid"));
    }

    #[test]
    fn unpacks_the_image_and_the_needed_modules_only() {
        assert!(wanted("./boot/vmlinuz-5.10.0-46-amd64"));
        assert!(!wanted("./boot/System.map-5.10.0-46-amd64"));
        assert!(wanted("./lib/modules/5.10.0-46-amd64/kernel/net/netfilter/nf_tables.ko"));
        assert!(wanted("./usr/lib/modules/6.12.117+deb13-amd64/kernel/drivers/net/veth.ko.xz"));
        assert!(wanted("./lib/modules/6.1.0-56-amd64/modules.builtin"));
        assert!(!wanted("./lib/modules/6.1.0-56-amd64/kernel/drivers/gpu/drm/i915/i915.ko"));
        assert!(!wanted("./lib/modules/6.1.0-56-amd64/kernel/net/"));
        assert!(!wanted("./usr/share/doc/linux-image/changelog.gz"));
        // Newer packages keep the image next to the modules.
        assert!(wanted("./usr/lib/modules/7.2.13+deb14-amd64/vmlinuz"));
    }
}
