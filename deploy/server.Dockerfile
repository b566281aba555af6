# syntax=docker/dockerfile:1
# The faultline server image: `faultline-server` on a distroless base, as a non-root user.
#
# Build from the workspace root (the context is the whole workspace):
#   docker build -f deploy/server.Dockerfile -t faultline-server:0.1.0 .
# Run (see deploy/README.md for TLS, tokens and S3):
#   docker run --rm faultline-server:0.1.0 serve --help
#
# Checked by scripts/check-deploy.sh: hadolint, non-root USER, binaries and flags.

# ---- build: the release binary, with the toolchain the workspace asks for ----
# Debian 12 (bookworm), like the distroless runtime below: the binary needs its C library.
FROM rust:1.95-bookworm AS build
# libclang: bindgen (the userfaultfd crate's bindings) runs at build time.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libclang-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# BuildKit caches: the registry and the target directory survive between builds.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p faultline-server --bin faultline-server \
    && install -D -m 0755 target/release/faultline-server /out/faultline-server

# ---- run: glibc and libgcc only (what the binary links), no shell, no package manager ----
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/faultline-server /usr/local/bin/faultline-server
# distroless's "nonroot" user, numerically, so that Kubernetes' runAsNonRoot can check it.
USER 65532:65532
# gRPC, metrics and health probes.
EXPOSE 7070 9100
# A local store lives here when no s3:// store is given (mount a volume).
WORKDIR /var/lib/faultline
ENTRYPOINT ["/usr/local/bin/faultline-server"]
CMD ["serve", "--help"]
