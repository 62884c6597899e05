# syntax=docker/dockerfile:1
#
# The one image of Tradeeon Connect: `tradeeon` with a subcommand (serve, api, worker, migrate,
# rewrap, ...). ECS runs it twice, with the commands `api` and `worker` (infra/tradeeon.yaml).
#
#   docker build -t tradeeon .
#   docker run --rm -p 8000:8000 -v tradeeon-data:/var/lib/tradeeon tradeeon        # serve, SQLite
#   docker run --rm --env-file prod.env tradeeon migrate
#
# The binary's debug info is split off into its own artifact, to symbolize a crash address later:
#
#   docker build --target debug-info --output type=local,dest=target/debug-info .
#
# Checked statically by infra/check_dockerfile.py (there is no container engine in CI).

# Both stages use the same Debian release (trixie is Debian 13), so the binary finds the glibc it
# was linked against.
ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=trixie
ARG DEBIAN_VERSION=13

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
# mount, so the binary is copied out of it within the same step. The release profile keeps line
# tables (backtraces and profiles of local builds); the image's binary goes without them and
# without its symbol table (~190 MB -> ~30 MB): both move to tradeeon.debug, which the binary
# names (gnu-debuglink) for gdb and addr2line. A panic still names its source line (that is in
# the message); a backtrace's frames need the debug file.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/build/target,sharing=locked \
    cargo build --release --locked --bin tradeeon \
 && install -D -m 0755 target/release/tradeeon /out/tradeeon \
 && cd /out \
 && objcopy --only-keep-debug --compress-debug-sections=zlib tradeeon tradeeon.debug \
 && objcopy --strip-all --add-gnu-debuglink=tradeeon.debug tradeeon \
 && install -d -m 0700 /out/data

# --- debug-info: only the split-off debug file, for `docker build --target debug-info --output ...` ---
FROM scratch AS debug-info
COPY --from=build /out/tradeeon.debug /tradeeon.debug

# --- rds-ca: the certificate authorities of Amazon RDS (every region), for DATABASE_URL's
# sslmode=verify-full&sslrootcert=/etc/ssl/certs/rds-global-bundle.pem (docs/operations.md,
# "Database TLS"). Fetched from AWS over HTTPS at build time, so a rebuilt image carries the
# authorities AWS adds. ---
FROM scratch AS rds-ca
ADD --chmod=0444 https://truststore.pki.rds.amazonaws.com/global/global-bundle.pem /rds-global-bundle.pem

# --- runtime: the binary on distroless/cc (glibc, libgcc_s, CA certificates, tzdata; no shell, no
# package manager), as an unprivileged user; no compiler, no sources ---
FROM gcr.io/distroless/cc-debian${DEBIAN_VERSION} AS runtime
COPY --from=build /out/tradeeon /usr/local/bin/tradeeon
COPY --from=rds-ca /rds-global-bundle.pem /etc/ssl/certs/rds-global-bundle.pem
# The data directory, owned by the user the process runs as (uid 10001, as in earlier images, so
# existing volumes stay writable; it needs no entry in /etc/passwd).
COPY --from=build --chown=10001:10001 /out/data /var/lib/tradeeon
USER 10001:10001
# The embedded default keeps ./data/tradeeon.db (and its generated key) here; mount a volume to
# keep them. With PostgreSQL nothing is written, and ECS runs the root filesystem read-only.
WORKDIR /var/lib/tradeeon
ENV API_HOST=0.0.0.0 \
    API_PORT=8000
# Only the API: the metrics listener (API_METRICS_PORT, 9101) is for scrapers on the same
# network, not for publishing with the API.
EXPOSE 8000
# GET /health on the local API. Meaningful for `serve` and `api`; a `worker` container has no
# API, so run it with --no-healthcheck (ECS ignores this instruction: the task definition has
# its own health check).
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["/usr/local/bin/tradeeon", "healthcheck"]
# Exec form: tradeeon is PID 1 and receives SIGTERM itself (it drains, then exits).
ENTRYPOINT ["/usr/local/bin/tradeeon"]
CMD ["serve"]
