use std::process::ExitCode;

use clap::Parser as _;
use node_manager::{
    agent, cleanup,
    config::{Cli, Command, Config, LogFormat, bpffs_or_default},
    inspect, state,
};

/// The configured paths checked against the filesystem (a bad one is a configuration error);
/// a hybrid host's cgroup v1 tmpfs is replaced by the cgroup2 mount below it.
fn check_paths(mut cfg: Config) -> anyhow::Result<Config> {
    if let Some(path) = &cfg.cgroup_path {
        cfg.cgroup_path = Some(node_manager::kernel::cgroup::resolve(path)?);
    }
    Ok(cfg)
}

/// Exit code for bad configuration or input (as clap uses for usage errors).
const EXIT_USAGE: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let log_format = match LogFormat::parse(cli.log_format.as_deref()) {
        Ok(format) => format,
        Err(e) => {
            eprintln!("node-manager: invalid configuration: {e:#}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    init_logging(log_format);
    match cli.command {
        Command::Run(args) => {
            let checked = Config::from_run_args(*args).and_then(check_paths);
            let cfg = match checked {
                Ok(cfg) => cfg,
                Err(e) => {
                    eprintln!("node-manager: invalid configuration: {e:#}");
                    return ExitCode::from(EXIT_USAGE);
                }
            };
            let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("node-manager: starting the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(agent::run(cfg)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) if e.downcast_ref::<node_manager::features::drop_invalid::NotPossible>().is_some() => {
                    eprintln!("node-manager: invalid configuration: {e:#}");
                    ExitCode::from(EXIT_USAGE)
                }
                Err(e) => {
                    tracing::error!("{e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Cleanup(args) => match cleanup::cleanup(
            &bpffs_or_default(args.bpffs),
            // As `run` resolves it (a hybrid host's v1 tmpfs: the cgroup2 mount below it).
            args.cgroup_path
                .filter(|p| !p.as_os_str().is_empty())
                .map(|p| node_manager::kernel::cgroup::resolve(&p).unwrap_or(p))
                .as_deref(),
        ) {
            Ok(report) => {
                println!(
                    "cleanup: {} link(s) released, pins {}",
                    report.links_removed,
                    if report.pins_removed { "removed" } else { "absent" }
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("node-manager cleanup: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Inspect(args) => match state::read(&bpffs_or_default(args.bpffs)) {
            Ok(state) => {
                if args.json {
                    println!("{}", serde_json::to_string_pretty(&state).unwrap_or_default());
                } else {
                    print!("{}", inspect::render(&state));
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("node-manager inspect: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

/// Logs to stderr, filtered by RUST_LOG (default `info`); a bad RUST_LOG is reported, not fatal.
fn init_logging(format: LogFormat) {
    let (filter, bad) = match tracing_subscriber::EnvFilter::try_from_default_env() {
        Ok(filter) => (filter, None),
        Err(e) => (
            "info".into(),
            std::env::var("RUST_LOG").ok().filter(|v| !v.is_empty()).map(|v| format!("RUST_LOG={v:?}: {e}")),
        ),
    };
    // Colours only on a terminal: `kubectl logs` and files get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).init(),
    }
    if let Some(bad) = bad {
        tracing::warn!("{bad}; logging at info");
    }
}
