# syntax=docker/dockerfile:1
#
# The one image of Tradeeon Connect: `tradeeon` with a subcommand (serve, api, worker, migrate,
# rewrap, ...). ECS runs it twice, with the commands `api` and `worker` (infra/tradeeon.yaml).
#
#   docker build -t tradeeon .
#   docker run --rm -p 8000:8000 -v tradeeon-data:/var/lib/tradeeon tradeeon        # serve, SQLite
#   docker run --rm --env-file prod.env tradeeon migrate
#
# Checked statically by infra/check_dockerfile.py (there is no container engine in CI).

# Both stages use the same Debian release, so the binary finds the glibc it was linked against.
ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=trixie

# --- build: the Rust workspace (migrations are embedded at compile time by sqlx::migrate!) ---
FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS build
WORKDIR /build
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY shared ./shared
COPY api ./api
COPY worker ./worker
COPY simulator ./simulator
COPY migrations ./migrations
# The web UI's assets are embedded in the binary (api/src/ui.rs).
COPY web ./web
# The caches keep downloaded crates and compiled dependencies between builds. target/ is a cache
# mount, so the binary is copied out of it within the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/build/target,sharing=locked \
    cargo build --release --locked --bin tradeeon \
 && install -D -m 0755 target/release/tradeeon /out/tradeeon

# --- runtime: the binary, CA certificates and an unprivileged user; no compiler, no sources ---
FROM debian:${DEBIAN_RELEASE}-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 tradeeon \
 && useradd --system --uid 10001 --gid tradeeon --home-dir /var/lib/tradeeon --create-home \
      --shell /usr/sbin/nologin tradeeon
COPY --from=build /out/tradeeon /usr/local/bin/tradeeon
USER 10001:10001
# The embedded default keeps ./data/tradeeon.db (and its generated key) here; mount a volume to
# keep them. With PostgreSQL nothing is written, and ECS runs the root filesystem read-only.
WORKDIR /var/lib/tradeeon
ENV API_HOST=0.0.0.0 \
    API_PORT=8000
EXPOSE 8000
# GET /health on the local API. Meaningful for `serve` and `api`; a `worker` container has no
# API, so run it with --no-healthcheck (ECS ignores this instruction: the task definition has
# its own health check).
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["/usr/local/bin/tradeeon", "healthcheck"]
# Exec form: tradeeon is PID 1 and receives SIGTERM itself (it drains, then exits).
ENTRYPOINT ["/usr/local/bin/tradeeon"]
CMD ["serve"]
