#!/usr/bin/env bash
# API benchmark (not a test): POST /connections/test and GET /jobs/{id} at N concurrent clients on
# PostgreSQL, beside a baseline measured in the same run on the same server: pgbench running a
# one-row INSERT transaction at the same concurrency. See bench/README.md.
#
#   bench/api.sh                 # 3 rounds; 32 clients, 10 s per phase, pool of 10 connections
#   ROUNDS=5 CLIENTS=64 SECONDS_PER_PHASE=20 POOL=16 bench/api.sh
set -euo pipefail

ADMIN_URL=${TEST_DATABASE_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}
CLIENTS=${CLIENTS:-32}
SECONDS_PER_PHASE=${SECONDS_PER_PHASE:-10}
POOL=${POOL:-10}
ROUNDS=${ROUNDS:-3}
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

baseline() {
    echo "== round $1: baseline: pgbench, one-row INSERT per transaction, $CLIENTS clients, ${SECONDS_PER_PHASE} s"
    pgbench -n -c "$CLIENTS" -j 2 -T "$SECONDS_PER_PHASE" -r -f "$WORK/insert.sql" "$DB_URL" | tee "$WORK/pgbench.txt" | grep -E "^tps|latency average"
    awk '/^tps = /{print $3; exit}' "$WORK/pgbench.txt" >> "$WORK/base_tps"
}
api() {
    echo "== round $1: API (in-process server, loopback HTTP), $2"
    target/release/examples/bench_api "$DB_URL" "$CLIENTS" "$SECONDS_PER_PHASE" "$POOL" "$2" | tee "$WORK/api.txt"
    awk -F'= ' '/^POST \/connections\/test/{split($2, a, " "); print a[1]; exit}' "$WORK/api.txt" >> "$WORK/api_rps"
    sed -n 's/^POST \/connections\/test:.*p99 \([0-9.]*\) ms.*/\1/p' "$WORK/api.txt" >> "$WORK/api_p99"
}

# Rounds alternate which side goes first, so a drift in the machine's speed during the run
# (other tenants, the disk) does not always favour the same side; the last round also runs
# the GET phase. The verdict is the median of the rounds' ratios.
for round in $(seq 1 "$ROUNDS"); do
    phases=post
    [ "$round" = "$ROUNDS" ] && phases=all
    if [ $((round % 2)) = 1 ]; then baseline "$round"; api "$round" "$phases"; else api "$round" "$phases"; baseline "$round"; fi
done
GET_RPS=$(awk -F'= ' '/^GET \/jobs/{split($2, a, " "); print a[1]; exit}' "$WORK/api.txt")

echo "== summary"
paste "$WORK/base_tps" "$WORK/api_rps" "$WORK/api_p99" | awk -v get="$GET_RPS" '{
    base[NR] = $1; api[NR] = $2; p99[NR] = $3; ratio[NR] = $2 / $1
    printf "round %d: POST /connections/test %.0f req/s, baseline %.0f tps: ratio %.2f; p99 %.2f ms\n", NR, $2, $1, ratio[NR], $3
}
END {
    n = NR
    for (i = 1; i <= n; i++) { r[i] = ratio[i]; q[i] = p99[i] }
    for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) {
        if (r[j] < r[i]) { t = r[i]; r[i] = r[j]; r[j] = t }
        if (q[j] < q[i]) { t = q[i]; q[i] = q[j]; q[j] = t }
    }
    ratio_median = (n % 2) ? r[(n + 1) / 2] : (r[n / 2] + r[n / 2 + 1]) / 2
    worst_p99 = q[n]
    printf "POST /connections/test: median ratio over %d rounds %.2f x baseline  [goal >= 0.60]  %s\n", n, ratio_median, (ratio_median >= 0.6 ? "MET" : "NOT MET")
    printf "POST /connections/test p99: worst round %.2f ms  [goal < 25 ms]  %s\n", worst_p99, (worst_p99 < 25 ? "MET" : "NOT MET")
    printf "GET /jobs/{id}: %.0f req/s  [goal >= 10000]  %s\n", get, (get >= 10000 ? "MET" : "NOT MET")
}'
