# syntax=docker/dockerfile:1
# The coordinator: `coordinator serve` on a slim Debian. Build from the repository root:
#
#   docker build -f deploy/docker/coordinator.Dockerfile -t prunesweep-coordinator .
#
# coordinator.Dockerfile.dockerignore (next to this file; BuildKit reads it) keeps target/ and
# results/ out of the build context.

# --- build --------------------------------------------------------------------------------------
# sqlx 0.9 needs Rust 1.94 (coordinator/Cargo.toml); bookworm, so the runtime's glibc matches.
ARG RUST_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim
FROM ${RUST_IMAGE} AS build
WORKDIR /src
# The whole workspace: cargo resolves every member (proto, worker) even for one package.
# protox compiles the .proto files in Rust, so no protoc is needed; SQLite is bundled by sqlx.
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p prunesweep-coordinator \
    && install -D -m 0755 target/release/coordinator /out/coordinator

# --- runtime ------------------------------------------------------------------------------------
FROM ${RUNTIME_IMAGE}
# ca-certificates: the system roots, for https:// coordinators without --ca and for Postgres TLS.
# Unpinned: the distribution's current package (pinning breaks as soon as Debian updates it).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 prunesweep \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/prunesweep --create-home \
        --shell /usr/sbin/nologin prunesweep
COPY --from=build /out/coordinator /usr/local/bin/coordinator
USER 10001:10001
WORKDIR /home/prunesweep
# gRPC: SweepService, WorkerService and grpc.health.v1.Health, all on one port.
EXPOSE 50051
# `serve` without --listen binds 127.0.0.1, unreachable from outside the container: pass
# `serve --listen 0.0.0.0:50051 --database postgres://... --token-file ... --worker-token-file ...`
# (or PRUNESWEEP_LISTEN). Client commands work too: `docker run IMAGE status --coordinator URL`.
ENTRYPOINT ["/usr/local/bin/coordinator"]
CMD ["--help"]
