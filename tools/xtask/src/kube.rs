//! `cargo xtask kube`: the lab's real Kubernetes components (kube-apiserver, kube-proxy, kubectl,
//! kube-controller-manager and etcd), built from their Go modules at pinned versions into a cache
//! under `target/kube/`, rebuilt only when a pin changes. `--check` starts etcd and kube-apiserver
//! on loopback and validates deploy/ against them with `kubectl apply --dry-run=server`.
//!
//! Go builds the lab's Kubernetes only; no Go enters the product or its image.

use std::{
    fs,
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

use crate::cmd::{self, Cmd};

/// The Kubernetes pin. v1.34.x is the newest release line that still has kube-proxy's IPVS mode
/// (deprecated after it) and that builds here (verified on this machine kind, see
/// ../shared/real-kubernetes.md); v1.34.4 is its newest patch release when pinned.
pub const KUBERNETES_VERSION: &str = "v1.34.4";

/// The etcd pin. etcd 3.6 is the line Kubernetes 1.34 is tested with (Debian's 3.4 works but the
/// apiserver logs "Cache consistency check error" every few seconds); 3.6.6 is its newest patch.
pub const ETCD_VERSION: &str = "v3.6.6";

/// The oldest Go that builds Kubernetes 1.34 (its go.mod says `go 1.24.0`).
const MIN_GO_MINOR: u32 = 24;
/// The toolchain asked for when the Go found is older (Go >= 1.21 fetches it from the module proxy).
const FALLBACK_TOOLCHAIN: &str = "go1.24.0";

/// The staging modules of k8s.io/kubernetes (its go.mod replaces each with `./staging/src/...`,
/// so a scratch module must replace each with its published `v0.X.Y`).
pub const STAGING_MODULES: &[&str] = &[
    "api",
    "apiextensions-apiserver",
    "apimachinery",
    "apiserver",
    "cli-runtime",
    "client-go",
    "cloud-provider",
    "cluster-bootstrap",
    "code-generator",
    "component-base",
    "component-helpers",
    "controller-manager",
    "cri-api",
    "cri-client",
    "csi-translation-lib",
    "dynamic-resource-allocation",
    "endpointslice",
    "externaljwt",
    "kms",
    "kube-aggregator",
    "kube-controller-manager",
    "kube-proxy",
    "kube-scheduler",
    "kubectl",
    "kubelet",
    "metrics",
    "mount-utils",
    "pod-security-admission",
    "sample-apiserver",
    "sample-cli-plugin",
    "sample-controller",
];

/// The Kubernetes commands built (package `k8s.io/kubernetes/cmd/<name>`).
pub const KUBE_COMMANDS: &[&str] = &["kube-apiserver", "kube-proxy", "kubectl", "kube-controller-manager"];

/// Where the built components are.
pub struct KubeBins {
    pub bin: PathBuf,
}

impl KubeBins {
    pub fn path(&self, name: &str) -> PathBuf {
        self.bin.join(name)
    }
}

/// `(major, minor, patch)` of a `vX.Y.Z` version.
fn parse_version(v: &str) -> Option<(u32, u32, u32)> {
    let mut it = v.strip_prefix('v')?.split('.');
    let major = it.next()?.parse().ok()?;
    let minor = it.next()?.parse().ok()?;
    let patch = it.next()?.split(['-', '+']).next()?.parse().ok()?;
    Some((major, minor, patch))
}

/// The published staging version for a Kubernetes version: v1.34.4 -> v0.34.4.
pub fn staging_version(kubernetes: &str) -> Result<String> {
    let (_, minor, patch) = parse_version(kubernetes).with_context(|| format!("bad version {kubernetes}"))?;
    Ok(format!("v0.{minor}.{patch}"))
}

/// The scratch module's go.mod for building Kubernetes `version`.
pub fn kubernetes_go_mod(version: &str) -> Result<String> {
    let staging = staging_version(version)?;
    let mut s = format!("module lab/kubernetes\n\ngo 1.24.0\n\nrequire k8s.io/kubernetes {version}\n\nreplace (\n");
    for m in STAGING_MODULES {
        s.push_str(&format!("\tk8s.io/{m} => k8s.io/{m} {staging}\n"));
    }
    s.push_str(")\n");
    Ok(s)
}

/// The scratch module's tools.go: imports keep the commands' packages in go.mod after tidy.
pub fn kubernetes_tools_go() -> String {
    let mut s = String::from("//go:build tools\n\npackage tools\n\nimport (\n");
    for c in KUBE_COMMANDS {
        s.push_str(&format!("\t_ \"k8s.io/kubernetes/cmd/{c}\"\n"));
    }
    s.push_str(")\n");
    s
}

fn etcd_go_mod(version: &str) -> String {
    format!("module lab/etcd\n\ngo 1.24.0\n\nrequire go.etcd.io/etcd/server/v3 {version}\n")
}

fn etcd_tools_go() -> String {
    "//go:build tools\n\npackage tools\n\nimport _ \"go.etcd.io/etcd/server/v3\"\n".to_owned()
}

/// The `-ldflags` that stamp the version (without them the binaries say `v0.0.0-master`).
pub fn kubernetes_ldflags(version: &str) -> Result<String> {
    let (major, minor, _) = parse_version(version).with_context(|| format!("bad version {version}"))?;
    let p = "k8s.io/component-base/version";
    Ok(format!("-X {p}.gitVersion={version} -X {p}.gitMajor={major} -X {p}.gitMinor={minor} -X {p}.gitTreeState=clean"))
}

/// What a component's stamp file holds: every input that, changed, must rebuild it.
pub fn stamp_text(component: &str, version: &str, extra: &str) -> String {
    format!("{component} {version}\n{extra}\n")
}

/// Whether a component must be (re)built: its stamp differs from what is wanted or a binary is missing.
pub fn needs_build(existing_stamp: Option<&str>, wanted_stamp: &str, binaries_present: bool) -> bool {
    !binaries_present || existing_stamp != Some(wanted_stamp)
}

/// `go1.26.8` from `go version go1.26.8 linux/amd64` -> (1, 26).
fn parse_go_version(out: &str) -> Option<(u32, u32)> {
    let word = out.split_whitespace().find(|w| w.starts_with("go1"))?;
    let mut it = word.strip_prefix("go")?.split(|c: char| !c.is_ascii_digit());
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

const GO_INSTALL_HINT: &str = "install Go >= 1.24: download https://go.dev/dl/go1.24.x.linux-amd64.tar.gz (or newer) \
     and unpack it with `tar -C /usr/local -xzf go1.24.*.linux-amd64.tar.gz` so /usr/local/go/bin/go exists \
     (Debian bookworm's `golang` package is 1.19, too old; bookworm-backports' `golang-1.24`/`golang-1.25` \
     also work, put its bin/ on PATH)";

/// The Go to use and the GOTOOLCHAIN it needs (if it is too old but can fetch a newer one).
fn find_go() -> Result<(String, Option<&'static str>)> {
    let go = if cmd::on_path("go") {
        "go".to_owned()
    } else if cmd::on_path("/usr/local/go/bin/go") {
        "/usr/local/go/bin/go".to_owned()
    } else {
        bail!("no Go toolchain (`go` on PATH or /usr/local/go/bin/go); {GO_INSTALL_HINT}");
    };
    let out = Cmd::new(&go).arg("version").env("GOTOOLCHAIN", "local").stdout_if_ok().unwrap_or_default();
    let Some((major, minor)) = parse_go_version(&out) else {
        bail!("`{go} version` said {out:?}, not a Go version; {GO_INSTALL_HINT}");
    };
    println!("    using {go}: {}", out.trim());
    if major == 1 && minor < MIN_GO_MINOR {
        if minor >= 21 {
            cmd::note(format!(
                "Go 1.{minor} is older than 1.{MIN_GO_MINOR}: using GOTOOLCHAIN={FALLBACK_TOOLCHAIN} (fetched from the module proxy)"
            ));
            return Ok((go, Some(FALLBACK_TOOLCHAIN)));
        }
        bail!(
            "Go 1.{minor} is too old to build Kubernetes {KUBERNETES_VERSION} and cannot fetch a newer toolchain; {GO_INSTALL_HINT}"
        );
    }
    Ok((go, None))
}

/// target/kube
fn kube_dir() -> PathBuf {
    cmd::workspace_root().join("target/kube")
}

/// The cache's bin directory for the pins.
pub fn bin_dir() -> PathBuf {
    kube_dir().join(KUBERNETES_VERSION).join("bin")
}

/// A `go` command with its caches under target/kube (nothing goes to $HOME); GOPROXY is left as
/// the environment has it.
fn go_cmd(go: &str, toolchain: Option<&str>, dir: &Path) -> Cmd {
    let k = kube_dir();
    let mut c = Cmd::new(go)
        .in_dir(dir)
        .env("GOPATH", k.join("gopath"))
        .env("GOMODCACHE", k.join("gopath/pkg/mod"))
        .env("GOCACHE", k.join("gocache"))
        // -modcacherw: the module cache stays deletable (`cargo clean`, `rm -rf target`).
        .env("GOFLAGS", "-mod=mod -modcacherw")
        .env("CGO_ENABLED", "0");
    if let Some(t) = toolchain {
        c = c.env("GOTOOLCHAIN", t);
    }
    c
}

fn write_if_changed(path: &Path, text: &str) -> Result<()> {
    if fs::read_to_string(path).ok().as_deref() != Some(text) {
        fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Builds what is missing or stale and returns where the binaries are.
pub fn ensure() -> Result<KubeBins> {
    let bin = bin_dir();
    fs::create_dir_all(&bin).with_context(|| format!("creating {}", bin.display()))?;
    let ldflags = kubernetes_ldflags(KUBERNETES_VERSION)?;
    let kube_stamp =
        stamp_text("kubernetes", KUBERNETES_VERSION, &format!("{}\nldflags {ldflags}", KUBE_COMMANDS.join(" ")));
    let etcd_stamp = stamp_text("etcd", ETCD_VERSION, "");
    let kube_stamp_path = bin.join(".kubernetes.stamp");
    let etcd_stamp_path = bin.join(".etcd.stamp");
    let kube_present = KUBE_COMMANDS.iter().all(|c| bin.join(c).is_file());
    let build_kube = needs_build(fs::read_to_string(&kube_stamp_path).ok().as_deref(), &kube_stamp, kube_present);
    let build_etcd =
        needs_build(fs::read_to_string(&etcd_stamp_path).ok().as_deref(), &etcd_stamp, bin.join("etcd").is_file());
    if !build_kube && !build_etcd {
        cmd::step(format!(
            "Kubernetes {KUBERNETES_VERSION} and etcd {ETCD_VERSION} are built already in {} (pins unchanged): nothing to build",
            bin.display()
        ));
        return Ok(KubeBins { bin });
    }
    let (go, toolchain) = find_go()?;
    let goproxy = Cmd::new(&go).args(["env", "GOPROXY"]).stdout_if_ok().unwrap_or_default();
    println!("    GOPROXY={} (as the environment has it)", goproxy.trim());
    if build_kube {
        let started = Instant::now();
        cmd::step(format!(
            "building {} {KUBERNETES_VERSION} into {} (the first build takes about 7 minutes on 2 cores; \
             ~1 GB module cache and ~3 GB build cache under target/kube)",
            KUBE_COMMANDS.join(", "),
            bin.display()
        ));
        let src = kube_dir().join("src/kubernetes");
        fs::create_dir_all(&src)?;
        let _ = fs::remove_file(&kube_stamp_path);
        let go_mod = kubernetes_go_mod(KUBERNETES_VERSION)?;
        // A changed pin starts from the written go.mod (tidy adds the rest).
        let go_mod_path = src.join("go.mod");
        let marker = src.join(".go.mod.written");
        if fs::read_to_string(&marker).ok().as_deref() != Some(go_mod.as_str()) {
            fs::write(&go_mod_path, &go_mod)?;
            let _ = fs::remove_file(src.join("go.sum"));
            fs::write(&marker, &go_mod)?;
        }
        write_if_changed(&src.join("tools.go"), &kubernetes_tools_go())?;
        go_cmd(&go, toolchain, &src).args(["mod", "tidy"]).run()?;
        let pkgs: Vec<String> = KUBE_COMMANDS.iter().map(|c| format!("k8s.io/kubernetes/cmd/{c}")).collect();
        go_cmd(&go, toolchain, &src)
            .args(["build", "-trimpath", "-ldflags", &ldflags, "-o"])
            .arg(format!("{}/", bin.display()))
            .args(pkgs)
            .run()?;
        fs::write(&kube_stamp_path, &kube_stamp)?;
        cmd::step(format!("Kubernetes {KUBERNETES_VERSION} built in {}", cmd::elapsed(started)));
    } else {
        cmd::step(format!("Kubernetes {KUBERNETES_VERSION}: built already (pin unchanged)"));
    }
    if build_etcd {
        let started = Instant::now();
        cmd::step(format!("building etcd {ETCD_VERSION} into {} (about 1 minute)", bin.display()));
        let src = kube_dir().join("src/etcd");
        fs::create_dir_all(&src)?;
        let _ = fs::remove_file(&etcd_stamp_path);
        let go_mod = etcd_go_mod(ETCD_VERSION);
        let marker = src.join(".go.mod.written");
        if fs::read_to_string(&marker).ok().as_deref() != Some(go_mod.as_str()) {
            fs::write(src.join("go.mod"), &go_mod)?;
            let _ = fs::remove_file(src.join("go.sum"));
            fs::write(&marker, &go_mod)?;
        }
        write_if_changed(&src.join("tools.go"), &etcd_tools_go())?;
        go_cmd(&go, toolchain, &src).args(["mod", "tidy"]).run()?;
        go_cmd(&go, toolchain, &src)
            .args(["build", "-trimpath", "-o"])
            .arg(bin.join("etcd").display().to_string())
            .arg("go.etcd.io/etcd/server/v3")
            .run()?;
        fs::write(&etcd_stamp_path, &etcd_stamp)?;
        cmd::step(format!("etcd {ETCD_VERSION} built in {}", cmd::elapsed(started)));
    } else {
        cmd::step(format!("etcd {ETCD_VERSION}: built already (pin unchanged)"));
    }
    Ok(KubeBins { bin })
}

fn print_versions(bins: &KubeBins) -> Result<()> {
    cmd::step(format!("binaries in {}", bins.bin.display()));
    let probes: &[(&str, &[&str])] = &[
        ("kube-apiserver", &["--version"]),
        ("kube-proxy", &["--version"]),
        ("kube-controller-manager", &["--version"]),
        ("kubectl", &["version", "--client"]),
        ("etcd", &["--version"]),
    ];
    for (name, args) in probes {
        let path = bins.path(name);
        let out = Cmd::new(path.display().to_string()).args(args.iter().copied()).output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let first = text.lines().next().unwrap_or("").trim().to_owned();
        println!("    {name}: {first}");
        if !out.status.success() {
            bail!("`{} {}` failed ({})", path.display(), args.join(" "), out.status);
        }
    }
    Ok(())
}

/// `cargo xtask kube [--check]`.
pub fn run(check: bool) -> Result<()> {
    let bins = ensure()?;
    print_versions(&bins)?;
    if check {
        smoke_check(&bins)?;
    }
    Ok(())
}

/// etcd and kube-apiserver as the tests start them (`lab::kube::Cluster`: loopback, RBAC and
/// Node authorization, the lab CA; removed on drop, also on failure), then deploy/ validated
/// by the real apiserver.
fn smoke_check(bins: &KubeBins) -> Result<()> {
    let started = Instant::now();
    cmd::step("smoke check: etcd and kube-apiserver on 127.0.0.1, kubectl apply --dry-run=server of deploy/");
    let mut cluster = lab::kube::Cluster::start_with(&bins.bin, &lab::kube::Options::default())?;
    println!("    {}/readyz: ok after {} (apiserver {})", cluster.server(), cmd::elapsed(started), cluster.version()?);
    let root = cmd::workspace_root();
    let out = cluster.kubectl_ok(&[
        "apply",
        "--dry-run=server",
        "--validate=strict",
        "-f",
        &root.join("deploy/node-manager.yaml").display().to_string(),
        "-f",
        &root.join("deploy/node-manager-ipvs.yaml").display().to_string(),
    ])?;
    for l in out.lines() {
        println!("    {l}");
    }
    cluster.quiet();
    drop(cluster);
    cmd::step(format!("smoke check passed in {}", cmd::elapsed(started)));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_mod_replaces_every_staging_module_once_with_the_pin() -> Result<()> {
        let text = kubernetes_go_mod(KUBERNETES_VERSION)?;
        assert!(text.contains("require k8s.io/kubernetes v1.34.4\n"), "{text}");
        for m in STAGING_MODULES {
            let line = format!("\tk8s.io/{m} => k8s.io/{m} v0.34.4\n");
            assert_eq!(text.matches(&line).count(), 1, "{m}: {text}");
            assert_eq!(text.matches(&format!("\tk8s.io/{m} =>")).count(), 1, "{m}: {text}");
        }
        assert_eq!(text.matches(" => ").count(), STAGING_MODULES.len());
        Ok(())
    }

    #[test]
    fn staging_version_follows_the_kubernetes_pin() -> Result<()> {
        assert_eq!(staging_version("v1.34.4")?, "v0.34.4");
        assert_eq!(staging_version("v1.35.0")?, "v0.35.0");
        assert!(staging_version("1.34").is_err());
        Ok(())
    }

    #[test]
    fn ldflags_stamp_the_version() -> Result<()> {
        assert_eq!(
            kubernetes_ldflags("v1.34.4")?,
            "-X k8s.io/component-base/version.gitVersion=v1.34.4 -X k8s.io/component-base/version.gitMajor=1 \
             -X k8s.io/component-base/version.gitMinor=34 -X k8s.io/component-base/version.gitTreeState=clean"
        );
        Ok(())
    }

    #[test]
    fn stamp_rebuilds_only_when_a_pin_changes() {
        let old = stamp_text("kubernetes", "v1.34.4", "x");
        let same = stamp_text("kubernetes", "v1.34.4", "x");
        let new = stamp_text("kubernetes", "v1.34.5", "x");
        assert!(!needs_build(Some(&old), &same, true), "same pin: skip");
        assert!(needs_build(Some(&old), &new, true), "changed pin: rebuild");
        assert!(needs_build(None, &same, true), "no stamp: build");
        assert!(needs_build(Some(&old), &same, false), "binary missing: build");
        let etcd = stamp_text("etcd", "v3.6.6", "");
        assert!(needs_build(Some(&etcd), &stamp_text("etcd", "v3.6.7", ""), true));
    }

    #[test]
    fn tools_go_imports_every_command() {
        let text = kubernetes_tools_go();
        assert!(text.starts_with("//go:build tools\n"));
        for c in KUBE_COMMANDS {
            assert!(text.contains(&format!("\"k8s.io/kubernetes/cmd/{c}\"")), "{text}");
        }
    }

    #[test]
    fn parses_go_versions() {
        assert_eq!(parse_go_version("go version go1.26.8 linux/amd64"), Some((1, 26)));
        assert_eq!(parse_go_version("go version go1.24rc1 linux/amd64"), Some((1, 24)));
        assert_eq!(parse_go_version("go version go1.19 linux/amd64"), Some((1, 19)));
        assert_eq!(parse_go_version("nonsense"), None);
    }
}
