# syntax=docker/dockerfile:1
# The faultline client tools image: `faultline` (restore, fetch, probe, fc-handler) on a
# distroless base, as a non-root user.
#
# Build from the workspace root:
#   docker build -f deploy/client.Dockerfile -t faultline:0.1.0 .
# userfaultfd in a container: see deploy/README.md (the default seccomp profile and
# vm.unprivileged_userfaultfd decide whether a non-root process may open one).
#
# Checked by scripts/check-deploy.sh: hadolint, non-root USER, binaries and flags.

# Debian 12 (bookworm), like the distroless runtime below: the binary needs its C library.
FROM rust:1.95-bookworm AS build
# libclang: bindgen (the userfaultfd crate's bindings) runs at build time.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libclang-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p faultline-client --bin faultline \
    && install -D -m 0755 target/release/faultline /out/faultline

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/faultline /usr/local/bin/faultline
USER 65532:65532
WORKDIR /home/nonroot
ENTRYPOINT ["/usr/local/bin/faultline"]
CMD ["--help"]
