//! Checks of the Dockerfile, which cannot be built here (no Docker engine): every command its
//! build runs is one the tests run too. Its `cargo xtask` commands parse with xtask's own
//! argument parser and are the two `cargo xtask test` runs for the image (`ebpf-object`, then
//! `cross`: `test::cross_build_and_check`); its `cargo install` is setup's bpf-linker; its
//! Debian packages are ones `cargo xtask setup` installs. hadolint lints it (`cargo xtask lint`).

use std::collections::BTreeSet;

use clap::Parser as _;

use crate::{
    Cli, Task,
    cmd::workspace_root,
    cross::Arch,
    setup::DEBIAN_PACKAGES,
    toolchain::{BPF_LINKER_VERSION, BPF_TOOLCHAIN},
};

/// The Dockerfile's instructions, continuation lines joined, comments dropped.
fn instructions(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part.trim());
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                out.push(std::mem::take(&mut current));
            }
        }
    }
    out
}

/// The shell commands of the RUN instructions, split at `&&`.
fn run_commands(instructions: &[String]) -> Vec<String> {
    instructions
        .iter()
        .filter_map(|i| i.strip_prefix("RUN "))
        .flat_map(|run| run.split("&&").map(|c| c.split_whitespace().collect::<Vec<_>>().join(" ")))
        .collect()
}

/// Debian package names in a command: after `apt-get install` and its options, and inside the
/// `cross="..."` assignments of the toolchain stage.
fn packages(command: &str) -> Vec<String> {
    let mut found = Vec::new();
    if let Some(rest) = command.split_once("apt-get install").map(|(_, r)| r) {
        found.extend(rest.split_whitespace().filter(|w| !w.starts_with('-') && !w.starts_with('$')).map(str::to_owned));
    }
    for part in command.split("cross=\"").skip(1) {
        found.extend(part.split('"').next().unwrap_or("").split_whitespace().map(str::to_owned));
    }
    found
}

fn dockerfile() -> String {
    std::fs::read_to_string(workspace_root().join("Dockerfile")).expect("reading the Dockerfile")
}

#[test]
fn every_cargo_command_is_an_xtask_command_the_tests_run() {
    let commands = run_commands(&instructions(&dockerfile()));
    let mut xtask = BTreeSet::new();
    for command in commands.iter().filter(|c| c.starts_with("cargo ")) {
        if command.starts_with("cargo install ") {
            assert_eq!(
                command,
                &format!("cargo install bpf-linker@{BPF_LINKER_VERSION} --locked"),
                "setup's bpf-linker"
            );
            continue;
        }
        let args = command.strip_prefix("cargo xtask ").unwrap_or_else(|| panic!("not an xtask command: {command}"));
        for arch in ["amd64", "arm64"] {
            let words = args.replace("\"$TARGETARCH\"", arch).replace("$TARGETARCH", arch);
            let argv = std::iter::once("cargo xtask").chain(words.split_whitespace());
            let cli = Cli::try_parse_from(argv).unwrap_or_else(|e| panic!("`{command}` does not parse: {e}"));
            match cli.task {
                Task::EbpfObject { .. } => xtask.insert("ebpf-object"),
                Task::Cross(cross) => {
                    assert!(
                        cross.release && cross.ebpf_object.is_some() && cross.out.is_some() && cross.strip,
                        "{command}"
                    );
                    assert_eq!(format!("{:?}", cross.arch).to_ascii_lowercase(), arch);
                    xtask.insert("cross")
                }
                _ => panic!("`{command}`: `cargo xtask test` does not run this for the image"),
            };
        }
    }
    assert_eq!(xtask, BTreeSet::from(["ebpf-object", "cross"]), "{commands:#?}");
}

#[test]
fn its_packages_and_toolchain_are_setups() {
    let text = dockerfile();
    let commands = run_commands(&instructions(&text));
    let mut setup: BTreeSet<&str> = DEBIAN_PACKAGES.iter().copied().collect();
    setup.extend([Arch::Amd64, Arch::Arm64].into_iter().flat_map(Arch::cross_packages));
    let installed: Vec<String> = commands.iter().flat_map(|c| packages(c)).collect();
    for must in ["rustc-web", "rust-web-src", "llvm-22-dev", "gcc-aarch64-linux-gnu", "nftables", "iptables"] {
        assert!(installed.iter().any(|p| p == must), "{must} not found in {installed:?}");
    }
    for package in &installed {
        assert!(
            setup.contains(package.as_str()),
            "the Dockerfile installs {package}, which `cargo xtask setup` does not"
        );
    }
    assert!(
        text.contains(&format!("NM_EBPF_TOOLCHAIN={BPF_TOOLCHAIN}")),
        "the image builds the eBPF crate with {BPF_TOOLCHAIN}"
    );
}

#[test]
fn the_parser_reads_continuations_and_commands() {
    let text = "# c\nFROM x AS a\nRUN a \\\n  && apt-get install -y --no-install-recommends p1 \\\n      p2 $cross \\\n && rm -rf y\n\
                RUN case \"$B\" in amd64) cross=\"c1 c2\" ;; esac\n";
    let i = instructions(text);
    assert_eq!(i.len(), 3, "{i:?}");
    let commands = run_commands(&i);
    assert_eq!(commands[1], "apt-get install -y --no-install-recommends p1 p2 $cross");
    assert_eq!(packages(&commands[1]), ["p1", "p2"]);
    assert_eq!(packages(&commands[3]), ["c1", "c2"]);
}
