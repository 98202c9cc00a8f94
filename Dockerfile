# node-manager image: multi-stage. The build stage installs the same toolchain as
# `cargo xtask setup` (Debian's rustc-web + rust-web-src + llvm-22-dev, bpf-linker 0.10.0) and
# runs the same build command as `cargo xtask build --release`. The eBPF object is built once,
# inside the agent's build (aya-build), and embedded in the binary.
# Multi-arch manifests and the arm64 cross-build are tracked in the deploy issue.
FROM debian:bookworm AS build
# Only Debian packages and crates.io: Debian's cargo/rustc 1.96 build both the agent and, with
# the library source of rust-web-src, the eBPF crate (NM_EBPF_TOOLCHAIN=bpf-debian makes
# build.rs enable -Z build-std and LLVM 22 for bpf-linker; without rustup, aya-build uses
# this cargo directly).
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates gcc libc6-dev \
      rustc-web cargo-web rust-web-src llvm-22-dev \
 && rm -rf /var/lib/apt/lists/*
ENV PATH=/root/.cargo/bin:/usr/lib/llvm-22/bin:$PATH \
    NM_EBPF_TOOLCHAIN=bpf-debian
RUN cargo install bpf-linker@0.10.0 --locked
WORKDIR /src
COPY . .
RUN cargo build --release --package node-manager \
 && install -m 0755 target/release/node-manager /node-manager

FROM debian:bookworm-slim
# nftables/iptables: the fallbacks of the conntrack-INVALID drop on kernels < 6.4.
RUN apt-get update \
 && apt-get install -y --no-install-recommends nftables iptables \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /node-manager /usr/local/bin/node-manager
ENTRYPOINT ["/usr/local/bin/node-manager"]
CMD ["run"]
