//! The real Kubernetes control plane for the lab: etcd and kube-apiserver (built by
//! `cargo xtask kube` into `target/kube/<version>/bin`), on loopback, with RBAC and Node
//! authorization, a ServiceAccount issuer and keys, and a serving certificate of the lab's own
//! CA (so clients verify it, as a pod does with its `ca.crt`).
//!
//! * [`Cluster::start`] writes the CA, certificates and keys into a scratch directory
//!   (`/tmp/nm-kube-<pid>-<n>`), starts etcd and kube-apiserver and waits for `/readyz`.
//! * [`Cluster::kubectl`] runs the real kubectl as the lab's administrator.
//! * [`ApiBridge`] makes the apiserver reachable at `127.0.0.1:<its port>` inside a lab
//!   namespace (a process there cannot reach the caller's loopback): a listener created in the
//!   namespace, each connection copied to the apiserver by threads of this process.
//! * [`KubeProxy`] runs the real kube-proxy inside a lab's node namespace in nftables or
//!   iptables mode, and `kube-proxy --cleanup` when dropped.
//!
//! Every child process gets `PR_SET_PDEATHSIG = SIGKILL`: if the test process is killed, its
//! control plane dies with it, and [`remove_stale_dirs`] removes the scratch directories of
//! dead processes (the etcd data among them). Dropping a [`Cluster`] kills, waits for and
//! removes everything it started. Addresses: Service cluster IPs come from 198.51.100.0/24 and
//! 2001:db8:5::/112 (documentation ranges).

use std::{
    fs,
    io::{self, Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::netns::in_netns;

pub mod objects;

/// Prefix of the scratch directories (under the temp dir) of the lab's control planes.
pub const DIR_PREFIX: &str = "nm-kube-";
/// The Service cluster IP ranges given to kube-apiserver (documentation ranges; IPv6 /108 is
/// the largest the apiserver allocates from: room for the benchmark's 100,000 Services, which
/// the IPv4 /24 has not).
pub const SERVICE_CIDRS: &str = "198.51.100.0/24,2001:db8:5::/108";
/// The ServiceAccount token issuer.
pub const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// Where the components are: `$NM_KUBE_BIN` (set by `cargo xtask test`), else the one
/// `target/kube/<version>/bin` of the workspace that holds a kube-apiserver.
pub fn bin_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("NM_KUBE_BIN").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/kube");
    let target = target.canonicalize().unwrap_or(target);
    let found: Vec<PathBuf> = fs::read_dir(&target)
        .map(|d| {
            d.filter_map(|e| Some(e.ok()?.path().join("bin"))).filter(|b| b.join("kube-apiserver").is_file()).collect()
        })
        .unwrap_or_default();
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!(
            "no Kubernetes components built under {}: run `cargo xtask kube` (it builds kube-apiserver, \
             kube-proxy, kubectl and etcd at the pinned versions), or set NM_KUBE_BIN",
            target.display()
        ),
        many => bail!("several Kubernetes builds under {}: {many:?}; set NM_KUBE_BIN to one", target.display()),
    }
}

/// Kills a child with SIGKILL when the thread that started it ends (test process killed).
fn die_with_parent(cmd: &mut Command) -> &mut Command {
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// A free TCP port on 127.0.0.1 (the kernel's choice; taken again right away by the caller).
fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn run_ok(cmd: &mut Command, what: &str) -> Result<Output> {
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("{what}: cannot start"))?;
    if !out.status.success() {
        bail!("{what} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(out)
}

/// `<component> --version` of a binary in `bin` (kube-proxy: "Kubernetes v1.34.4" → "v1.34.4").
pub fn component_version(bin: &Path, component: &str) -> Result<String> {
    let out = run_ok(Command::new(bin.join(component)).arg("--version"), &format!("{component} --version"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .find(|w| w.starts_with('v') && w[1..].starts_with(|c: char| c.is_ascii_digit()))
        .map(str::to_owned)
        .with_context(|| format!("no version in `{component} --version`: {text:?}"))
}

/// Removes `/tmp/nm-kube-<pid>-*` of processes that no longer exist; returns what it removed.
pub fn remove_stale_dirs() -> Vec<PathBuf> {
    let mut removed = Vec::new();
    for dir in leftover_dirs() {
        let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let pid = name[DIR_PREFIX.len()..].split('-').next().unwrap_or("");
        if pid.is_empty() || Path::new("/proc").join(pid).exists() {
            continue;
        }
        if fs::remove_dir_all(&dir).is_ok() {
            removed.push(dir);
        }
    }
    removed
}

/// Every `nm-kube-*` directory in the temp dir (any process).
pub fn leftover_dirs() -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else { return Vec::new() };
    let mut dirs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_str().is_some_and(|n| n.starts_with(DIR_PREFIX)))
        .map(|e| e.path())
        .collect();
    dirs.sort();
    dirs
}

/// What [`Cluster::start`] can vary.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// `--etcd-compaction-interval` (the apiserver compacts etcd this often; `None`: its default).
    pub compaction_interval: Option<Duration>,
    /// `--watch-cache-sizes`: for example `services#0` sends watches of Services straight to
    /// etcd, so a watch from a compacted revision gets 410 Gone.
    pub watch_cache_sizes: Option<String>,
    /// A second kube-apiserver on the same etcd, as in a highly available control plane:
    /// while the first is stopped, [`Cluster::kubectl`] writes through this one.
    pub standby_apiserver: bool,
}

struct Proc {
    name: &'static str,
    program: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
}

/// etcd and kube-apiserver on loopback, and the scratch directory with their data, keys and
/// logs; all of it removed on drop.
pub struct Cluster {
    pub dir: PathBuf,
    pub bin: PathBuf,
    pub apiserver_port: u16,
    /// etcd's client URL (plain HTTP on loopback).
    pub etcd_url: String,
    etcd: Proc,
    apiserver: Proc,
    /// The second apiserver ([`Options::standby_apiserver`]) and its port.
    standby: Option<(Proc, u16)>,
    /// Print the logs' last lines on drop (cleared by a test that succeeded, see [`Cluster::quiet`]).
    loud_drop: bool,
}

static NEXT: AtomicU32 = AtomicU32::new(0);

impl Cluster {
    /// Certificates, etcd, kube-apiserver, `/readyz`. Fails (never skips) when a component is
    /// missing or does not start, with its log's last lines.
    pub fn start(opts: &Options) -> Result<Cluster> {
        Self::start_with(&bin_dir()?, opts)
    }

    /// [`Cluster::start`] with the components in `bin` (for `cargo xtask kube --check`, which
    /// has just built them).
    pub fn start_with(bin: &Path, opts: &Options) -> Result<Cluster> {
        remove_stale_dirs();
        let bin = bin.to_owned();
        for c in ["etcd", "kube-apiserver", "kubectl"] {
            if !bin.join(c).is_file() {
                bail!("{} is missing: run `cargo xtask kube`", bin.join(c).display());
            }
        }
        let dir = std::env::temp_dir().join(format!(
            "{DIR_PREFIX}{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let (etcd_client, etcd_peer, apiserver_port) = (free_port()?, free_port()?, free_port()?);
        let admin_token = format!("nml-admin-{:x}", fastrand_u64());
        let d = |p: &str| dir.join(p).display().to_string();
        let etcd_url = format!("http://127.0.0.1:{etcd_client}");
        let mut cluster = Cluster {
            dir: dir.clone(),
            bin: bin.clone(),
            apiserver_port,
            etcd_url: etcd_url.clone(),
            etcd: Proc {
                name: "etcd",
                program: bin.join("etcd"),
                args: vec![
                    format!("--data-dir={}", d("etcd")),
                    format!("--listen-client-urls={etcd_url}"),
                    format!("--advertise-client-urls={etcd_url}"),
                    format!("--listen-peer-urls=http://127.0.0.1:{etcd_peer}"),
                    format!("--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}"),
                    format!("--initial-cluster=default=http://127.0.0.1:{etcd_peer}"),
                    "--listen-metrics-urls=".to_owned(),
                    "--log-level=warn".to_owned(),
                    // A scratch cluster: no fsync per write (otherwise the disk, not the
                    // apiserver, sets the pace: about 12 Service creations a second here).
                    "--unsafe-no-fsync".to_owned(),
                ],
                child: None,
            },
            apiserver: Proc {
                name: "kube-apiserver",
                program: bin.join("kube-apiserver"),
                args: Vec::new(),
                child: None,
            },
            standby: None,
            loud_drop: true,
        };
        write_pki(&dir)?;
        fs::write(
            dir.join("audit-policy.yaml"),
            "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\nrules:\n- level: Metadata\n",
        )?;
        fs::write(dir.join("tokens.csv"), format!("{admin_token},lab-admin,lab-admin,system:masters\n"))?;
        let mut args = vec![
            format!("--etcd-servers={etcd_url}"),
            "--bind-address=127.0.0.1".to_owned(),
            "--advertise-address=127.0.0.1".to_owned(),
            format!("--secure-port={apiserver_port}"),
            format!("--tls-cert-file={}", d("apiserver.crt")),
            format!("--tls-private-key-file={}", d("apiserver.key")),
            format!("--client-ca-file={}", d("ca.crt")),
            format!("--token-auth-file={}", d("tokens.csv")),
            "--authorization-mode=Node,RBAC".to_owned(),
            format!("--service-account-issuer={ISSUER}"),
            format!("--service-account-key-file={}", d("sa.pub")),
            format!("--service-account-signing-key-file={}", d("sa.key")),
            format!("--service-cluster-ip-range={SERVICE_CIDRS}"),
            // No controller manager keeps the `kubernetes` Service's endpoints; loopback ones
            // would only confuse kube-proxy.
            "--endpoint-reconciler-type=none".to_owned(),
            "--allow-privileged=true".to_owned(),
            "--profiling=false".to_owned(),
            // Every request, with its URI, user, agent and response code, for tests that check
            // how a client talks to the API (watch parameters, relists, rejected tokens).
            format!("--audit-policy-file={}", d("audit-policy.yaml")),
            format!("--audit-log-path={}", d("audit.log")),
            "--audit-log-format=json".to_owned(),
        ];
        if let Some(i) = opts.compaction_interval {
            args.push(format!("--etcd-compaction-interval={}s", i.as_secs().max(1)));
        }
        if let Some(sizes) = &opts.watch_cache_sizes {
            args.push(format!("--watch-cache-sizes={sizes}"));
        }
        if opts.standby_apiserver {
            let port = free_port()?;
            let standby_args = args
                .iter()
                .map(|a| match a {
                    a if a.starts_with("--secure-port=") => format!("--secure-port={port}"),
                    a if a.starts_with("--audit-log-path=") => format!("--audit-log-path={}", d("audit-standby.log")),
                    a => a.clone(),
                })
                .collect();
            let program = bin.join("kube-apiserver");
            cluster.standby =
                Some((Proc { name: "kube-apiserver-standby", program, args: standby_args, child: None }, port));
        }
        cluster.apiserver.args = args;
        cluster.write_kubeconfig("admin.kubeconfig", &admin_token)?;
        cluster.spawn_etcd()?;
        cluster.start_apiserver()?;
        if let Some((standby, port)) = cluster.standby.as_mut() {
            let port = *port;
            Self::spawn(&dir, standby)?;
            let started = Instant::now();
            let ready = |c: &Cluster| {
                c.kubectl(&[&format!("--server=https://127.0.0.1:{port}"), "get", "--raw=/readyz"])
                    .output()
                    .is_ok_and(|o| o.status.success())
            };
            while !ready(&cluster) {
                if started.elapsed() > Duration::from_secs(90) {
                    bail!(
                        "the standby kube-apiserver is not ready after 90 s:\n{}",
                        cluster.log_tail("kube-apiserver-standby", 20)
                    );
                }
                std::thread::sleep(Duration::from_millis(250));
            }
        }
        Ok(cluster)
    }

    fn spawn(dir: &Path, p: &mut Proc) -> Result<()> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(format!("{}.log", p.name)))
            .with_context(|| format!("{}: log file", p.name))?;
        let child = die_with_parent(
            Command::new(&p.program).args(&p.args).stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log),
        )
        .spawn()
        .with_context(|| format!("starting {}", p.program.display()))?;
        p.child = Some(child);
        Ok(())
    }

    fn spawn_etcd(&mut self) -> Result<()> {
        Self::spawn(&self.dir, &mut self.etcd)
    }

    /// Starts kube-apiserver (again, with the same flags and port) and waits for `/readyz`.
    pub fn start_apiserver(&mut self) -> Result<()> {
        Self::spawn(&self.dir, &mut self.apiserver)?;
        let started = Instant::now();
        loop {
            for p in [&mut self.etcd, &mut self.apiserver] {
                if let Some(status) = p.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                    bail!(
                        "{} exited ({status}) while starting:\n{}",
                        p.name,
                        tail(&self.dir.join(format!("{}.log", p.name)), 20)
                    );
                }
            }
            if self.kubectl(&["get", "--raw=/readyz"]).output().is_ok_and(|o| o.status.success()) {
                return Ok(());
            }
            if started.elapsed() > Duration::from_secs(90) {
                bail!("kube-apiserver not ready after 90 s:\n{}", tail(&self.dir.join("kube-apiserver.log"), 20));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Kills kube-apiserver (SIGKILL, as a crash would) and waits for it.
    pub fn stop_apiserver(&mut self) {
        if let Some(mut c) = self.apiserver.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The apiserver's URL from the caller's namespace (and, through an [`ApiBridge`], from a
    /// lab namespace).
    pub fn server(&self) -> String {
        format!("https://127.0.0.1:{}", self.apiserver_port)
    }

    pub fn ca_path(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// Writes a kubeconfig for `token` (server, the lab CA) in the scratch directory.
    pub fn write_kubeconfig(&self, name: &str, token: &str) -> Result<PathBuf> {
        let path = self.dir.join(name);
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: lab\n  cluster:\n    server: {}\n    \
             certificate-authority: {}\nusers:\n- name: u\n  user:\n    token: {token}\ncontexts:\n- name: c\n  \
             context:\n    cluster: lab\n    user: u\ncurrent-context: c\n",
            self.server(),
            self.ca_path().display()
        );
        fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    pub fn admin_kubeconfig(&self) -> PathBuf {
        self.dir.join("admin.kubeconfig")
    }

    /// The real kubectl as the lab's administrator (system:masters), through the standby
    /// apiserver while the first one is stopped.
    pub fn kubectl(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(self.bin.join("kubectl"));
        cmd.arg(format!("--kubeconfig={}", self.admin_kubeconfig().display()));
        if let (None, Some((_, port))) = (&self.apiserver.child, &self.standby) {
            cmd.arg(format!("--server=https://127.0.0.1:{port}"));
        }
        cmd.args(args).stdin(Stdio::null());
        cmd
    }

    /// kubectl; its stdout, or an error with its stderr.
    pub fn kubectl_ok(&self, args: &[&str]) -> Result<String> {
        let out = run_ok(&mut self.kubectl(args), &format!("kubectl {}", args.join(" ")))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `kubectl <verb> -f -` with `input` on stdin (apply, create, replace).
    pub fn kubectl_stdin(&self, args: &[&str], input: &str) -> Result<String> {
        self.kubectl_stdin_parallel(args, &[input]).map(|mut outs| outs.remove(0))
    }

    /// One kubectl per input, all at once (kubectl sends one request at a time; several
    /// processes keep the apiserver busy). Fails with the first failure's stderr.
    pub fn kubectl_stdin_parallel(&self, args: &[&str], inputs: &[&str]) -> Result<Vec<String>> {
        let mut children = Vec::new();
        for input in inputs {
            let mut child = self
                .kubectl(args)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .context("starting kubectl")?;
            let mut stdin = child.stdin.take().context("kubectl stdin")?;
            let text = input.to_string();
            // Written from a thread: a large input must not block while kubectl's output fills.
            let writer = std::thread::spawn(move || stdin.write_all(text.as_bytes()));
            children.push((child, writer));
        }
        let mut outs = Vec::new();
        for (child, writer) in children {
            let out = child.wait_with_output()?;
            let _ = writer.join();
            if !out.status.success() {
                bail!(
                    "kubectl {} failed ({}): {}",
                    args.join(" "),
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            outs.push(String::from_utf8_lossy(&out.stdout).into_owned());
        }
        Ok(outs)
    }

    /// `kubectl apply --validate=strict -f -` of YAML or JSON text (one object, several
    /// YAML documents, or a `v1/List`).
    pub fn apply(&self, text: &str) -> Result<String> {
        self.kubectl_stdin(&["apply", "--validate=strict", "-f", "-"], text)
    }

    /// A ServiceAccount token from the TokenRequest API (`kubectl create token`), optionally
    /// bound to a Secret (deleting the Secret invalidates the token).
    pub fn token(&self, namespace: &str, sa: &str, duration: &str, bound_secret: Option<&str>) -> Result<String> {
        let mut args = vec!["create", "token", sa, "-n", namespace, "--duration", duration];
        if let Some(s) = bound_secret {
            args.extend(["--bound-object-kind", "Secret", "--bound-object-name", s]);
        }
        Ok(self.kubectl_ok(&args)?.trim().to_owned())
    }

    /// The apiserver's version (`gitVersion` of `/version`).
    pub fn version(&self) -> Result<String> {
        let text = self.kubectl_ok(&["get", "--raw=/version"])?;
        let key = "\"gitVersion\": \"";
        let start = text.find(key).context("no gitVersion in /version")? + key.len();
        Ok(text[start..].split('"').next().unwrap_or_default().to_owned())
    }

    /// Keep quiet on drop (the test passed; the logs are not worth printing).
    pub fn quiet(&mut self) {
        self.loud_drop = false;
    }

    /// The audit log's events (one JSON object per line, as text): `requestURI`, `verb`,
    /// `user.username`, `userAgent`, `responseStatus.code`, ...
    pub fn audit_lines(&self) -> Vec<String> {
        fs::read_to_string(self.dir.join("audit.log")).unwrap_or_default().lines().map(str::to_owned).collect()
    }

    pub fn log_tail(&self, name: &str, lines: usize) -> String {
        tail(&self.dir.join(format!("{name}.log")), lines)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let loud = self.loud_drop || std::thread::panicking();
        let standby = self.standby.as_mut().map(|(p, _)| p);
        for p in standby.into_iter().chain([&mut self.apiserver, &mut self.etcd]) {
            if let Some(mut c) = p.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
            if loud {
                eprintln!(
                    "--- last lines of {}.log ---\n{}",
                    p.name,
                    tail(&self.dir.join(format!("{}.log", p.name)), 15)
                );
            }
        }
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            eprintln!("lab kube: removing {}: {e}", self.dir.display());
        }
    }
}

/// The last `n` lines of a log file.
pub fn tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn fastrand_u64() -> u64 {
    let mut b = [0u8; 8];
    if let Ok(mut f) = fs::File::open("/dev/urandom") {
        let _ = f.read_exact(&mut b);
    }
    u64::from_ne_bytes(b) ^ u64::from(std::process::id())
}

/// The lab CA, the apiserver's serving certificate (SANs: 127.0.0.1, the `kubernetes`
/// Service's cluster IP 198.51.100.1, kubernetes.default.svc) and the ServiceAccount keys.
fn write_pki(dir: &Path) -> Result<()> {
    let d = |p: &str| dir.join(p);
    let openssl = |args: &[&str], what: &str| -> Result<()> {
        run_ok(Command::new("openssl").args(args).current_dir(dir), &format!("openssl ({what})")).map(|_| ())
    };
    openssl(
        &["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2"]
            .into_iter()
            .chain(["-subj", "/CN=nml-lab-ca"])
            .collect::<Vec<_>>(),
        "CA",
    )?;
    fs::write(
        d("serving.ext"),
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n\
         subjectAltName=IP:127.0.0.1,IP:198.51.100.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,\
         DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\n",
    )?;
    openssl(
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "apiserver.key",
            "-out",
            "apiserver.csr",
            "-subj",
            "/CN=kube-apiserver",
        ],
        "serving key",
    )?;
    openssl(
        &[
            "x509",
            "-req",
            "-in",
            "apiserver.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "apiserver.crt",
            "-days",
            "2",
            "-extfile",
            "serving.ext",
        ],
        "serving certificate",
    )?;
    openssl(&["genrsa", "-out", "sa.key", "2048"], "ServiceAccount key")?;
    openssl(&["rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub"], "ServiceAccount public key")?;
    Ok(())
}

/// The apiserver reachable at `127.0.0.1:<port>` inside a network namespace: a listener made
/// there, each accepted connection copied to and from the apiserver on the caller's loopback.
/// Stopped (listener closed, threads joined) on drop.
pub struct ApiBridge {
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl ApiBridge {
    pub fn into_netns(netns: &Path, port: u16) -> Result<ApiBridge> {
        let listener = in_netns(netns, || {
            TcpListener::bind(("127.0.0.1", port)).with_context(|| format!("binding 127.0.0.1:{port}"))
        })?;
        // Loopback must be up in the namespace (it is in every lab namespace).
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let target = SocketAddr::from(([127, 0, 0, 1], port));
        let accept = std::thread::Builder::new().name(format!("api-bridge-{port}")).spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((inner, _)) => {
                        let _ = inner.set_nonblocking(false);
                        if let Ok(outer) = TcpStream::connect_timeout(&target, Duration::from_secs(2)) {
                            pipe(inner, outer);
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(20)),
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        })?;
        Ok(ApiBridge { stop, accept: Some(accept) })
    }
}

/// Copies both ways until either side closes (two detached threads; they end with the
/// connection).
fn pipe(a: TcpStream, b: TcpStream) {
    // Small writes (watch events) must not wait for the peer's delayed ACK (Nagle).
    let _ = a.set_nodelay(true);
    let _ = b.set_nodelay(true);
    let (a2, b2) = match (a.try_clone(), b.try_clone()) {
        (Ok(a2), Ok(b2)) => (a2, b2),
        _ => return,
    };
    let one = move |mut from: TcpStream, mut to: TcpStream| {
        let _ = io::copy(&mut from, &mut to);
        let _ = to.shutdown(Shutdown::Write);
        let _ = from.shutdown(Shutdown::Read);
    };
    std::thread::spawn(move || one(a, b));
    std::thread::spawn(move || one(b2, a2));
}

impl Drop for ApiBridge {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

/// kube-proxy's mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyMode {
    Nftables,
    Iptables,
    /// Needs the ip_vs modules and the `ipset` tool (the QEMU guest has both; this host kernel
    /// has no ip_vs).
    Ipvs,
}

impl ProxyMode {
    pub fn name(self) -> &'static str {
        match self {
            ProxyMode::Nftables => "nftables",
            ProxyMode::Iptables => "iptables",
            ProxyMode::Ipvs => "ipvs",
        }
    }
}

/// The real kube-proxy in a lab node namespace, its kubeconfig pointing at an [`ApiBridge`]
/// there. Dropping it kills it and runs `kube-proxy --proxy-mode=<mode> --cleanup` in the
/// namespace (which removes its nft tables, KUBE-* chains, IPVS services, ipsets and
/// kube-ipvs0).
pub struct KubeProxy {
    child: Option<Child>,
    netns: PathBuf,
    bin: PathBuf,
    pub mode: ProxyMode,
    pub log: PathBuf,
}

impl KubeProxy {
    /// Starts kube-proxy as node `node_name`, with the ServiceAccount `kube-proxy` (bound to
    /// the built-in ClusterRole `system:node-proxier`, created here if missing), and waits
    /// until it reports healthy (its `/healthz` inside the namespace).
    pub fn start(
        cluster: &Cluster,
        netns: &Path,
        node_name: &str,
        mode: ProxyMode,
        cluster_cidr: &str,
    ) -> Result<KubeProxy> {
        let rbac = "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: kube-proxy, namespace: kube-system}\n---\n\
                    apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata: {name: lab-kube-proxy}\n\
                    roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: 'system:node-proxier'}\n\
                    subjects: [{kind: ServiceAccount, name: kube-proxy, namespace: kube-system}]\n";
        cluster.kubectl_stdin(&["apply", "-f", "-"], rbac)?;
        let token = cluster.token("kube-system", "kube-proxy", "1h", None)?;
        let kubeconfig = cluster.write_kubeconfig(&format!("kube-proxy-{node_name}.kubeconfig"), &token)?;
        let log = cluster.dir.join(format!("kube-proxy-{node_name}-{}.log", mode.name()));
        let logf = fs::File::create(&log)?;
        let bin = cluster.bin.join("kube-proxy");
        let mut cmd = crate::netns::nsenter_command(netns, bin.as_os_str());
        cmd.args([
            format!("--kubeconfig={}", kubeconfig.display()),
            format!("--hostname-override={node_name}"),
            format!("--proxy-mode={}", mode.name()),
            format!("--cluster-cidr={cluster_cidr}"),
            // Leave the machine-wide conntrack table size alone.
            "--conntrack-max-per-core=0".to_owned(),
            "--metrics-bind-address=127.0.0.1:10249".to_owned(),
            "--healthz-bind-address=127.0.0.1:10256".to_owned(),
            "--v=2".to_owned(),
        ]);
        let child = die_with_parent(cmd.stdin(Stdio::null()).stdout(logf.try_clone()?).stderr(logf))
            .spawn()
            .context("starting kube-proxy")?;
        let mut kp = KubeProxy { child: Some(child), netns: netns.to_owned(), bin, mode, log };
        kp.wait_ready()?;
        Ok(kp)
    }

    /// `/proxyMode` of kube-proxy's metrics server answers with the mode once it runs.
    fn wait_ready(&mut self) -> Result<()> {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!("kube-proxy exited ({status}):\n{}", tail(&self.log, 25));
            }
            let mode = in_netns(&self.netns, || Ok(http_get("127.0.0.1:10249", "/proxyMode")))?;
            if mode.as_deref().map(str::trim) == Some(self.mode.name()) {
                // Synced once: its healthz says so.
                if in_netns(&self.netns, || Ok(http_get("127.0.0.1:10256", "/healthz")))?.is_some() {
                    return Ok(());
                }
            }
            if started.elapsed() > Duration::from_secs(60) {
                bail!("kube-proxy ({}) not healthy after 60 s:\n{}", self.mode.name(), tail(&self.log, 25));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// kube-proxy's own answer to which mode it runs (`/proxyMode`), from inside its namespace.
    pub fn reported_mode(&self) -> Result<String> {
        in_netns(&self.netns, || Ok(http_get("127.0.0.1:10249", "/proxyMode")))?
            .map(|s| s.trim().to_owned())
            .context("kube-proxy's /proxyMode did not answer")
    }
}

impl Drop for KubeProxy {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // A second pass: with iptables-nft, IPVS mode's cleanup can fail to delete a chain
        // still referenced by one it removes in the same pass ("CHAIN_DEL failed ... busy").
        for attempt in 1..=2 {
            let mut cmd = crate::netns::nsenter_command(&self.netns, self.bin.as_os_str());
            cmd.args([format!("--proxy-mode={}", self.mode.name()), "--cleanup".to_owned()]);
            match cmd.stdin(Stdio::null()).output() {
                Ok(o) if o.status.success() => break,
                Ok(o) if attempt == 2 => {
                    eprintln!("kube-proxy --cleanup: {}: {}", o.status, String::from_utf8_lossy(&o.stderr).trim())
                }
                Ok(_) => {}
                Err(e) => {
                    eprintln!("kube-proxy --cleanup: {e}");
                    break;
                }
            }
        }
    }
}

/// A plain HTTP/1.0 GET on the calling thread's namespace; the body if the status is 200.
fn http_get(addr: &str, path: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr.parse().ok()?, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.").then_some(())?;
    head.split_whitespace().nth(1).filter(|c| *c == "200")?;
    Some(body.to_owned())
}
