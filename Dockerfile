# syntax=docker/dockerfile:1
# node-manager's image for linux/amd64 and linux/arm64:
#   docker buildx build --platform linux/amd64,linux/arm64 -t REGISTRY/node-manager:0.1.0 --push .
# Only Debian packages and crates.io. Every build step is an xtask command that `cargo xtask
# test` runs too (tools/xtask/src/dockerfile.rs checks it); see deploy/README.md, "The image".

# The toolchain runs on the build machine's platform and cross-compiles for the other one:
# what `cargo xtask setup` installs for building (Debian's rustc/cargo 1.96 with their library
# source, LLVM 22 for bpf-linker, C compiler and libc of both architectures) and bpf-linker.
FROM --platform=$BUILDPLATFORM debian:bookworm AS toolchain
ARG BUILDARCH
# Versions are not pinned: rustc-web and its library source come from bookworm-security and
# must move together.
# hadolint ignore=DL3008,SC2086
RUN case "$BUILDARCH" in \
      amd64) cross="gcc-aarch64-linux-gnu libc6-dev-arm64-cross" ;; \
      arm64) cross="gcc-x86-64-linux-gnu libc6-dev-amd64-cross" ;; \
      *) echo "building on $BUILDARCH is not supported (amd64 or arm64)" >&2; exit 1 ;; \
    esac \
 && apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates gcc libc6-dev \
      rustc-web cargo-web rust-web-src llvm-22-dev $cross \
 && rm -rf /var/lib/apt/lists/*
# No rustup in the image: the cargo on PATH is Debian's, and node-manager's build.rs builds the
# eBPF crate with it (NM_EBPF_TOOLCHAIN=bpf-debian: -Z build-std=core, LLVM 22).
ENV PATH=/root/.cargo/bin:/usr/lib/llvm-22/bin:$PATH \
    NM_EBPF_TOOLCHAIN=bpf-debian \
    CARGO_TERM_COLOR=never
RUN cargo install bpf-linker@0.10.0 --locked
WORKDIR /src

# The eBPF object, once for every target platform (it uses no TARGETARCH, so BuildKit shares
# this stage): the object depends on the byte order only.
FROM toolchain AS ebpf
COPY . .
RUN cargo xtask ebpf-object --out /out/node-manager.bpf.o

# The agent for the target platform, with that object embedded.
FROM toolchain AS agent
ARG TARGETARCH
COPY . .
COPY --from=ebpf /out/node-manager.bpf.o /out/node-manager.bpf.o
RUN cargo xtask cross --arch "$TARGETARCH" --release --ebpf-object /out/node-manager.bpf.o \
      --out /out/node-manager --strip

# The runtime: the binary, and nftables and iptables (nf_tables variant) for the INVALID drop's
# fallbacks on kernels without BPF netfilter links. The root filesystem may be read-only.
FROM debian:bookworm-slim
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends nftables iptables \
 && rm -rf /var/lib/apt/lists/*
COPY --from=agent /out/node-manager /usr/local/bin/node-manager
ENTRYPOINT ["/usr/local/bin/node-manager"]
CMD ["run"]
