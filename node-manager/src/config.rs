//! Command line and environment, per the interface contract (`shared/design.md`): every flag
//! also reads an environment variable, with network-node-manager's names. Values are taken as
//! strings by clap and validated here, so that an empty variable means "default" and a bad one
//! is an error naming the flag, the variable and what is accepted.
use std::{net::IpAddr, path::PathBuf, time::Duration};

use anyhow::{Context as _, Result, bail};
use clap::{Args, Parser, Subcommand};
use ipnet::IpNet;

/// Default globs for host-side pod interfaces of common CNIs.
/// Default globs for the host side of pod interfaces: bridge/ptp CNIs and kindnet (veth*),
/// Calico (cali*), Cilium (lxc*), GKE (gke*), AWS VPC CNI (eni*), Azure CNI (azv*).
/// Bridges and tunnels are deliberately absent: pod traffic is seen on the pod veth first.
pub const DEFAULT_POD_INTERFACES: &str = "veth*,cali*,lxc*,gke*,eni*,azv*";
pub const DEFAULT_MASQUERADE_MARK: u32 = 0x4000;
pub const DEFAULT_RESYNC_PERIOD: Duration = Duration::from_secs(60);
pub const DEFAULT_FLOW_SWEEP_PERIOD: Duration = Duration::from_secs(60);

#[derive(Debug, Parser)]
#[command(name = "node-manager", version, about = "Node-level Kubernetes networking fixer (eBPF).")]
pub struct Cli {
    /// Log format: human (default) or json (one object per line). The level filter is RUST_LOG
    /// (for example `info`, `node_manager=debug`); the default is info.
    #[arg(long, global = true, env = "LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

/// How log lines are written (stderr).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Human,
    Json,
}

impl LogFormat {
    pub fn parse(value: Option<&str>) -> Result<LogFormat> {
        match value.map(str::trim) {
            None | Some("") => Ok(LogFormat::Human),
            Some(v) if v.eq_ignore_ascii_case("human") || v.eq_ignore_ascii_case("text") => Ok(LogFormat::Human),
            Some(v) if v.eq_ignore_ascii_case("json") => Ok(LogFormat::Json),
            Some(v) => bail!("--log-format / LOG_FORMAT: {v:?} is not a log format; use human or json"),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent: load and attach the datapath and keep its maps equal to the Services.
    Run(Box<RunArgs>),
    /// Remove every program, link and pin the agent made, whether or not an agent is running.
    Cleanup(CleanupArgs),
    /// Print the live datapath state: features, interfaces, frontends, pod CIDRs, counters.
    Inspect(InspectArgs),
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// API server to watch (default: in-cluster config).
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Read v1 Service objects from this file (a List, or multi-document YAML) instead of the
    /// API server; re-read when it changes.
    #[arg(long, env = "SERVICES_FILE")]
    pub services_file: Option<PathBuf>,
    /// This node's name (default: the hostname).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// Local IPv4 pod CIDR(s), comma-separated (default: from the Node's spec.podCIDRs).
    #[arg(long, env = "POD_CIDR_IPV4")]
    pub pod_cidr_ipv4: Option<String>,
    /// Local IPv6 pod CIDR(s), comma-separated.
    #[arg(long, env = "POD_CIDR_IPV6")]
    pub pod_cidr_ipv6: Option<String>,
    /// Drop packets conntrack marks INVALID before the host answers them (true/false).
    #[arg(long, env = "RULE_DROP_INVALID_INPUT_ENABLE")]
    pub drop_invalid_input: Option<String>,
    /// How INVALID packets are dropped: auto (bpf, else nftables, else iptables), bpf, nftables,
    /// iptables, or liberal (sets nf_conntrack_tcp_be_liberal=1 instead).
    #[arg(long, env = "DROP_INVALID_MODE", value_name = "MODE")]
    pub drop_invalid_mode: Option<String>,
    /// Rewrite external/LB IPs to cluster IPs for local pods and host processes (true/false).
    #[arg(long, env = "RULE_EXTERNAL_CLUSTER_ENABLE")]
    pub external_cluster: Option<String>,
    /// Host-side pod interface globs, comma-separated; new matching interfaces are attached as
    /// they appear.
    #[arg(long, env = "POD_INTERFACES")]
    pub pod_interfaces: Option<String>,
    /// cgroup v2 directory for the socket hooks that serve host-network clients (default: the
    /// cgroup v2 root, i.e. every process of the node; mounted at /sys/fs/cgroup if the host has
    /// none mounted and that directory is empty).
    #[arg(long, env = "CGROUP_PATH")]
    pub cgroup_path: Option<PathBuf>,
    /// bpffs mount; pins live under <bpffs>/node-manager/.
    #[arg(long, env = "BPFFS")]
    pub bpffs: Option<PathBuf>,
    /// Mark OR-ed into rewritten pod packets so kube-proxy masquerades them (0 disables).
    #[arg(long, env = "MASQUERADE_MARK")]
    pub masquerade_mark: Option<String>,
    /// Only external addresses inside these CIDRs are rewritten (comma-separated; default: all).
    /// Guards against CVE-2020-8554-style hijacking through spec.externalIPs.
    #[arg(long, env = "EXTERNAL_IP_ALLOW")]
    pub external_ip_allow: Option<String>,
    /// How often the maps are rewritten from the full desired state by diff, repairing drift
    /// (for example `60s`, `5m`, `1h30m`; default 60s).
    #[arg(long, env = "RESYNC_PERIOD")]
    pub resync_period: Option<String>,
    /// How often rewritten flows whose conntrack entry is gone are removed from the flow maps
    /// (a flow goes at the second sweep that finds it untracked; default 60s; `off`: flows end
    /// only by LRU eviction and TCP RST).
    #[arg(long, env = "FLOW_SWEEP_PERIOD")]
    pub flow_sweep_period: Option<String>,
    /// Serve Prometheus metrics on /metrics and health on /healthz and /readyz at this address
    /// (for example `0.0.0.0:9617`; empty: off).
    #[arg(long, env = "METRICS_ADDR", value_name = "ADDR")]
    pub metrics_addr: Option<String>,
    /// Remove the datapath when the agent stops (SIGTERM/SIGINT) instead of leaving it serving
    /// (true/false; default false: restarts and upgrades lose no packets).
    #[arg(long, env = "CLEANUP_ON_EXIT")]
    pub cleanup_on_exit: Option<String>,
}

#[derive(Debug, Args)]
pub struct CleanupArgs {
    #[arg(long, env = "BPFFS")]
    pub bpffs: Option<PathBuf>,
    /// Also detach our socket hooks from this cgroup where they have no pin (pinned ones are
    /// detached wherever they are).
    #[arg(long, env = "CGROUP_PATH")]
    pub cgroup_path: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    #[arg(long, env = "BPFFS")]
    pub bpffs: Option<PathBuf>,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

/// Where Services come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceConfig {
    File(PathBuf),
    Kubernetes { kubeconfig: Option<PathBuf> },
}

/// Validated agent configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub source: SourceConfig,
    pub node_name: String,
    /// Pod CIDRs given on the command line or environment; `None`: take them from the Node.
    pub pod_cidrs_override: Option<Vec<IpNet>>,
    pub drop_invalid_input: bool,
    pub drop_invalid_mode: crate::features::drop_invalid::Requested,
    pub external_cluster: bool,
    pub pod_interfaces: Vec<String>,
    /// Where the socket hooks attach; `None`: the cgroup v2 root (found when needed).
    pub cgroup_path: Option<PathBuf>,
    pub bpffs: PathBuf,
    pub masquerade_mark: u32,
    pub external_ip_allow: Option<Vec<IpNet>>,
    /// Address families enabled (legacy NET_STACK); both by default.
    pub ipv4: bool,
    pub ipv6: bool,
    pub resync_period: Duration,
    /// `None`: the flow sweep is off.
    pub flow_sweep_period: Option<Duration>,
    pub metrics_addr: Option<std::net::SocketAddr>,
    pub cleanup_on_exit: bool,
    /// Deprecation notices to log once logging is up.
    pub warnings: Vec<String>,
}

pub fn bpffs_or_default(bpffs: Option<PathBuf>) -> PathBuf {
    bpffs.filter(|p| !p.as_os_str().is_empty()).unwrap_or_else(|| PathBuf::from("/sys/fs/bpf"))
}

/// Reads an environment variable, treating "unset" and "empty" alike.
fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn nonempty(value: Option<String>) -> Option<String> {
    value.filter(|v| !v.trim().is_empty())
}

/// `true`/`false` in any case; empty means the default.
pub fn parse_bool(value: Option<&str>, default: bool, what: &str) -> Result<bool> {
    match value.map(str::trim) {
        None | Some("") => Ok(default),
        Some(v) if v.eq_ignore_ascii_case("true") => Ok(true),
        Some(v) if v.eq_ignore_ascii_case("false") => Ok(false),
        Some(v) => bail!("{what}: {v:?} is not a boolean; use true or false"),
    }
}

/// Comma-separated CIDRs, of one family when `v4` is given (`Some(true)`: IPv4). Host bits
/// are cleared (`10.0.0.1/8` means `10.0.0.0/8`), as network-node-manager's users write them
/// loosely; a bare address means a single host.
pub fn parse_cidrs(value: &str, v4: Option<bool>, what: &str) -> Result<Vec<IpNet>> {
    let mut out = Vec::new();
    for part in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let net: IpNet = part.parse().or_else(|_| part.parse::<IpAddr>().map(IpNet::from)).with_context(|| {
            format!(
                "{what}: {part:?} is not a CIDR (for example {})",
                if v4 == Some(false) { "fd00:10:244:1::/64" } else { "10.244.1.0/24" }
            )
        })?;
        if let Some(v4) = v4
            && matches!(net, IpNet::V4(_)) != v4
        {
            bail!("{what}: {part:?} is not an {} CIDR", if v4 { "IPv4" } else { "IPv6" });
        }
        out.push(net.trunc());
    }
    Ok(out)
}

/// A humane duration: `500ms`, `45s`, `5m`, `1h30m`, or bare seconds (`60`). Zero is refused:
/// a resync loop without a pause would spin.
/// `--flow-sweep-period`: a duration, or `off`/`0` for none; default 60s.
fn parse_sweep_period(value: Option<String>) -> Result<Option<Duration>> {
    match nonempty(value).as_deref().map(str::trim) {
        None => Ok(Some(DEFAULT_FLOW_SWEEP_PERIOD)),
        Some("off" | "0") => Ok(None),
        Some(v) => {
            let period = parse_duration(v, "--flow-sweep-period / FLOW_SWEEP_PERIOD")?;
            if period < Duration::from_secs(1) {
                bail!(
                    "--flow-sweep-period / FLOW_SWEEP_PERIOD: {v:?} is shorter than 1s (each sweep dumps the conntrack table; `off` disables it)"
                );
            }
            Ok(Some(period))
        }
    }
}

pub fn parse_duration(value: &str, what: &str) -> Result<Duration> {
    let v = value.trim();
    let bad = || anyhow::anyhow!("{what}: {v:?} is not a duration (for example 60s, 5m, 1h30m)");
    let mut total = Duration::ZERO;
    if let Ok(secs) = v.parse::<u64>() {
        total = Duration::from_secs(secs);
    } else {
        let mut rest = v;
        if rest.is_empty() {
            return Err(bad());
        }
        while !rest.is_empty() {
            let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
            let number: u64 = rest[..digits].parse().map_err(|_| bad())?;
            let unit_len = rest[digits..].find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len() - digits);
            let unit = &rest[digits..digits + unit_len];
            let part = match unit {
                "ms" => Duration::from_millis(number),
                "s" => Duration::from_secs(number),
                "m" => Duration::from_secs(number.checked_mul(60).ok_or_else(bad)?),
                "h" => Duration::from_secs(number.checked_mul(3600).ok_or_else(bad)?),
                _ => return Err(bad()),
            };
            total = total.checked_add(part).ok_or_else(bad)?;
            rest = &rest[digits + unit_len..];
        }
    }
    if total.is_zero() {
        bail!("{what}: {v:?} must be longer than zero");
    }
    Ok(total)
}

/// `host:port`, `[v6]:port` or `:port` (all addresses).
fn parse_listen_addr(value: &str) -> Result<std::net::SocketAddr> {
    let v = value.trim();
    let full = if v.starts_with(':') { format!("0.0.0.0{v}") } else { v.to_owned() };
    full.parse().map_err(|_| {
        anyhow::anyhow!(
            "--metrics-addr / METRICS_ADDR: {v:?} is not an address:port (for example 0.0.0.0:9617, \
             [::]:9617 or :9617; empty turns metrics off)"
        )
    })
}

fn parse_mark(value: Option<&str>) -> Result<u32> {
    let Some(v) = value.map(str::trim).filter(|v| !v.is_empty()) else {
        return Ok(DEFAULT_MASQUERADE_MARK);
    };
    let parsed = match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => v.parse(),
    };
    parsed.with_context(|| {
        format!(
            "--masquerade-mark / MASQUERADE_MARK: {v:?} is not a 32-bit number (for example 0x4000, or 0 to disable)"
        )
    })
}

impl Config {
    /// Validates `run`'s arguments. Legacy variables of older network-node-manager releases
    /// are honoured with a deprecation warning when the current name is not set.
    pub fn from_run_args(args: RunArgs) -> Result<Config> {
        let mut warnings = Vec::new();
        let mut legacy_bool = |current: Option<String>, legacy: &str, current_name: &str| {
            nonempty(current).or_else(|| {
                let v = env_nonempty(legacy)?;
                warnings.push(format!("{legacy} is deprecated; use {current_name}"));
                Some(v)
            })
        };
        let drop_invalid =
            legacy_bool(args.drop_invalid_input, "RULE_DROP_INVALID_INPUT", "RULE_DROP_INVALID_INPUT_ENABLE");
        let external_cluster =
            legacy_bool(args.external_cluster, "RULE_EXTERNAL_CLUSTER", "RULE_EXTERNAL_CLUSTER_ENABLE");
        let drop_invalid_input =
            parse_bool(drop_invalid.as_deref(), true, "--drop-invalid-input / RULE_DROP_INVALID_INPUT_ENABLE")?;
        let external_cluster =
            parse_bool(external_cluster.as_deref(), false, "--external-cluster / RULE_EXTERNAL_CLUSTER_ENABLE")?;

        let (mut ipv4, mut ipv6) = (true, true);
        if let Some(stack) = env_nonempty("NET_STACK") {
            warnings.push("NET_STACK is deprecated; both families are served, limited by the pod CIDRs".into());
            (ipv4, ipv6) = (false, false);
            for family in stack.split(',').map(|s| s.trim().to_ascii_lowercase()) {
                match family.as_str() {
                    "ipv4" => ipv4 = true,
                    "ipv6" => ipv6 = true,
                    "" => {}
                    other => bail!("NET_STACK: unknown family {other:?}; use ipv4, ipv6 or ipv4,ipv6"),
                }
            }
        }

        let v4 = nonempty(args.pod_cidr_ipv4)
            .map(|v| parse_cidrs(&v, Some(true), "--pod-cidr-ipv4 / POD_CIDR_IPV4"))
            .transpose()?;
        let v6 = nonempty(args.pod_cidr_ipv6)
            .map(|v| parse_cidrs(&v, Some(false), "--pod-cidr-ipv6 / POD_CIDR_IPV6"))
            .transpose()?;
        let pod_cidrs_override = match (v4, v6) {
            (None, None) => None,
            (a, b) => Some(a.into_iter().flatten().chain(b.into_iter().flatten()).collect()),
        };

        let source = match (nonempty_path(args.services_file), nonempty_path(args.kubeconfig)) {
            (Some(file), _) => SourceConfig::File(file),
            (None, kubeconfig) => SourceConfig::Kubernetes { kubeconfig },
        };
        // POD_NODE_NAME: network-node-manager's very first releases.
        let node_name = nonempty(args.node_name)
            .or_else(|| {
                let v = env_nonempty("POD_NODE_NAME")?;
                warnings.push("POD_NODE_NAME is deprecated; use NODE_NAME".into());
                Some(v)
            })
            .unwrap_or_else(hostname);
        let pod_interfaces = nonempty(args.pod_interfaces)
            .unwrap_or_else(|| DEFAULT_POD_INTERFACES.to_owned())
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect::<Vec<_>>();
        for pattern in &pod_interfaces {
            glob::Pattern::new(pattern)
                .with_context(|| format!("--pod-interfaces / POD_INTERFACES: {pattern:?} is not a glob"))?;
        }
        // Checked against the filesystem by `check_paths`: parsing does no I/O.
        let cgroup_path = nonempty_path(args.cgroup_path);
        let external_ip_allow = nonempty(args.external_ip_allow)
            .map(|v| parse_cidrs(&v, None, "--external-ip-allow / EXTERNAL_IP_ALLOW"))
            .transpose()?;
        Ok(Config {
            source,
            node_name,
            pod_cidrs_override,
            drop_invalid_input,
            drop_invalid_mode: nonempty(args.drop_invalid_mode)
                .map(|m| m.parse().map_err(|e| anyhow::anyhow!("--drop-invalid-mode / DROP_INVALID_MODE: {e}")))
                .transpose()?
                .unwrap_or(crate::features::drop_invalid::Requested::Auto),
            external_cluster,
            pod_interfaces,
            cgroup_path,
            bpffs: bpffs_or_default(args.bpffs),
            masquerade_mark: parse_mark(args.masquerade_mark.as_deref())?,
            external_ip_allow,
            ipv4,
            ipv6,
            resync_period: nonempty(args.resync_period)
                .map(|v| parse_duration(&v, "--resync-period / RESYNC_PERIOD"))
                .transpose()?
                .unwrap_or(DEFAULT_RESYNC_PERIOD),
            flow_sweep_period: parse_sweep_period(args.flow_sweep_period)?,
            metrics_addr: nonempty(args.metrics_addr).map(|v| parse_listen_addr(&v)).transpose()?,
            cleanup_on_exit: parse_bool(args.cleanup_on_exit.as_deref(), false, "--cleanup-on-exit / CLEANUP_ON_EXIT")?,
            warnings,
        })
    }
}

fn nonempty_path(path: Option<PathBuf>) -> Option<PathBuf> {
    path.filter(|p| !p.as_os_str().is_empty())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_owned()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn booleans_are_strict_and_case_insensitive() {
        assert!(parse_bool(Some("TRUE"), false, "x").unwrap());
        assert!(!parse_bool(Some("False"), true, "x").unwrap());
        assert!(parse_bool(Some(""), true, "x").unwrap());
        assert!(!parse_bool(None, false, "x").unwrap());
        let err = parse_bool(Some("yes"), false, "--external-cluster").unwrap_err().to_string();
        assert!(err.contains("--external-cluster") && err.contains("\"yes\""), "{err}");
    }

    #[test]
    fn cidrs_are_validated_per_family_and_normalised() {
        let nets = parse_cidrs("10.244.1.7/24, 10.245.0.0/16", Some(true), "v4").unwrap();
        assert_eq!(nets, vec!["10.244.1.0/24".parse::<IpNet>().unwrap(), "10.245.0.0/16".parse().unwrap()]);
        // network-node-manager's README example, which its own cleanup failed to match.
        assert_eq!(parse_cidrs("fdbb::0/64", Some(false), "v6").unwrap(), vec!["fdbb::/64".parse::<IpNet>().unwrap()]);
        assert!(parse_cidrs("fdbb::/64", Some(true), "v4").unwrap_err().to_string().contains("not an IPv4"));
        assert!(
            parse_cidrs("10.0.0.0/33", Some(true), "POD_CIDR_IPV4").unwrap_err().to_string().contains("POD_CIDR_IPV4")
        );
    }

    #[test]
    fn durations_are_humane_and_bad_ones_name_the_setting() {
        let d = |v| parse_duration(v, "RESYNC_PERIOD");
        assert_eq!(d("60s").unwrap(), Duration::from_secs(60));
        assert_eq!(d("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(d("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(d("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(d(" 90 ").unwrap(), Duration::from_secs(90));
        for bad in ["", "s", "5x", "m5", "1.5s", "-1s", "0s", "99999999999999999999h"] {
            let err = d(bad).unwrap_err().to_string();
            assert!(err.contains("RESYNC_PERIOD"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn the_flow_sweep_period_is_a_duration_or_off() {
        assert_eq!(parse_sweep_period(None).unwrap(), Some(DEFAULT_FLOW_SWEEP_PERIOD));
        assert_eq!(parse_sweep_period(Some(String::new())).unwrap(), Some(DEFAULT_FLOW_SWEEP_PERIOD));
        assert_eq!(parse_sweep_period(Some("10s".into())).unwrap(), Some(Duration::from_secs(10)));
        assert_eq!(parse_sweep_period(Some("off".into())).unwrap(), None);
        assert_eq!(parse_sweep_period(Some("0".into())).unwrap(), None);
        for bad in ["500ms", "soon", "-1"] {
            let err = parse_sweep_period(Some(bad.into())).unwrap_err().to_string();
            assert!(err.contains("FLOW_SWEEP_PERIOD"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn masquerade_mark_accepts_hex_decimal_and_zero() {
        assert_eq!(parse_mark(None).unwrap(), 0x4000);
        assert_eq!(parse_mark(Some("0x8000")).unwrap(), 0x8000);
        assert_eq!(parse_mark(Some("0")).unwrap(), 0);
        assert!(parse_mark(Some("lots")).is_err());
    }

    #[test]
    fn metrics_addr_and_log_format() {
        assert_eq!(parse_listen_addr(":9617").unwrap(), "0.0.0.0:9617".parse().unwrap());
        assert_eq!(parse_listen_addr("[::1]:9617").unwrap(), "[::1]:9617".parse().unwrap());
        for bad in ["9617", "localhost:x", "0.0.0.0"] {
            assert!(parse_listen_addr(bad).unwrap_err().to_string().contains("METRICS_ADDR"), "{bad}");
        }
        assert_eq!(LogFormat::parse(None).unwrap(), LogFormat::Human);
        assert_eq!(LogFormat::parse(Some("JSON")).unwrap(), LogFormat::Json);
        assert!(LogFormat::parse(Some("xml")).unwrap_err().to_string().contains("LOG_FORMAT"));
    }
}
