#!/usr/bin/env bash
# API benchmark (not a test): POST /connections/test and GET /jobs/{id} at N concurrent clients on
# PostgreSQL, beside a baseline measured in the same run on the same server: pgbench running a
# one-row INSERT transaction at the same concurrency. See bench/README.md.
#
#   bench/api.sh                 # 32 clients, 10 s per phase, pool of 10 connections
#   CLIENTS=64 SECONDS_PER_PHASE=20 POOL=16 bench/api.sh
set -euo pipefail

ADMIN_URL=${TEST_DATABASE_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}
CLIENTS=${CLIENTS:-32}
SECONDS_PER_PHASE=${SECONDS_PER_PHASE:-10}
POOL=${POOL:-10}
cd "$(dirname "$0")/.."

DB="tradeeon_bench_$(date +%s)_$$"
# Keep any query string (e.g. ?sslmode=disable) on the benchmark database's URL.
ADMIN_BASE=${ADMIN_URL%%\?*}
QUERY=${ADMIN_URL#"$ADMIN_BASE"}
DB_URL="${ADMIN_BASE%/*}/$DB$QUERY"
WORK=$(mktemp -d)
cleanup() {
    psql -q "$ADMIN_URL" -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT

echo "building the load generator (release)…"
[ "${SKIP_BUILD:-0}" = 1 ] || cargo build --release -q -p tradeeon-api --example bench_api

psql -q "$ADMIN_URL" -c "CREATE DATABASE $DB"
psql -q "$DB_URL" -c "CREATE TABLE bench_insert (id bigserial PRIMARY KEY, payload text NOT NULL, created_at timestamptz NOT NULL DEFAULT now())"
echo "INSERT INTO bench_insert (payload) VALUES ('gAAAAABbaselinepayloadofafernettokensizedvalue');" > "$WORK/insert.sql"

echo "== baseline: pgbench, one-row INSERT per transaction, $CLIENTS clients, ${SECONDS_PER_PHASE} s"
pgbench -n -c "$CLIENTS" -j 2 -T "$SECONDS_PER_PHASE" -r -f "$WORK/insert.sql" "$DB_URL" | tee "$WORK/pgbench.txt" | grep -E "tps|latency|number of transactions actually processed"
BASE_TPS=$(awk '/^tps = /{print $3; exit}' "$WORK/pgbench.txt")

echo "== API (in-process server, loopback HTTP)"
target/release/examples/bench_api "$DB_URL" "$CLIENTS" "$SECONDS_PER_PHASE" "$POOL" | tee "$WORK/api.txt"
API_RPS=$(awk -F'= ' '/^POST \/connections\/test/{split($2, a, " "); print a[1]; exit}' "$WORK/api.txt")
P99=$(sed -n 's/^POST \/connections\/test:.*p99 \([0-9.]*\) ms.*/\1/p' "$WORK/api.txt")
GET_RPS=$(awk -F'= ' '/^GET \/jobs/{split($2, a, " "); print a[1]; exit}' "$WORK/api.txt")

echo "== summary"
awk -v api="$API_RPS" -v base="$BASE_TPS" -v p99="$P99" -v get="$GET_RPS" 'BEGIN {
    ratio = api / base
    printf "POST /connections/test: %.0f req/s = %.2f x baseline (%.0f tps)  [goal >= 0.60]  %s\n", api, ratio, base, (ratio >= 0.6 ? "MET" : "NOT MET")
    printf "POST /connections/test p99: %.2f ms  [goal < 25 ms]  %s\n", p99, (p99 < 25 ? "MET" : "NOT MET")
    printf "GET /jobs/{id}: %.0f req/s  [goal >= 10000]  %s\n", get, (get >= 10000 ? "MET" : "NOT MET")
}'
