# syntax=docker/dockerfile:1
#
# keyward's container image: build with `docker build -t keyward:dev .`
#
# Two stages: a Rust builder compiles the release binary, and a distroless
# runtime (glibc, libgcc, CA certificates; no shell, no package manager) runs
# it as the unprivileged user 65532. keyward writes nothing to disk, so the
# image runs with a read-only root filesystem.
#
# Build arguments: RUST_VERSION (the builder image), and VERSION, REVISION
# and CREATED for the OCI labels, e.g.
#   docker build --build-arg VERSION=0.1.0 --build-arg REVISION="$(git rev-parse HEAD)" \
#     --build-arg CREATED="$(date -u +%Y-%m-%dT%H:%M:%SZ)" -t keyward:0.1.0 .

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS builder
# The commit, for keyward_build_info (.git is not in the build context).
ARG REVISION=unknown
ENV KEYWARD_GIT_SHA=${REVISION}
WORKDIR /src
# Protos compile with protox (pure Rust, see build.rs): the builder needs no
# protoc, and mimalloc's C sources build with the image's cc.
COPY . .
# BuildKit cache mounts keep the crates.io downloads and the compiled
# dependencies between builds, so a source change rebuilds only keyward itself.
# The target directory is a cache mount, so the binary is copied out of it in
# the same step. --locked: exactly the versions in Cargo.lock.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked --bin keyward \
    && install -D -m 0755 target/release/keyward /out/keyward

# Same Debian release as the builder (bookworm = Debian 12), so the binary's
# glibc matches. The :nonroot variant's default user is 65532.
FROM gcr.io/distroless/cc-debian12:nonroot

ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="keyward" \
      org.opencontainers.image.description="API-key authorization service: mint, rotate and revoke keys; answer Envoy ext_authz checks from memory" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.base.name="gcr.io/distroless/cc-debian12:nonroot"

COPY --from=builder /out/keyward /usr/local/bin/keyward

# Numeric, so Kubernetes' runAsNonRoot can verify it without /etc/passwd.
USER 65532:65532
# 50051: gRPC (Check, ext_authz, admin, health, reflection); 9090: /metrics, /livez, /readyz.
EXPOSE 50051 9090
ENTRYPOINT ["keyward"]
CMD ["serve"]
