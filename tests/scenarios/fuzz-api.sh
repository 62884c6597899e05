#!/usr/bin/env bash
# Scenario 6 of issue 7: fuzz the HTTP API with schemathesis against its own /openapi.json, with
# a valid token. Passes only with zero 5xx answers, zero answers that break the document (status
# codes, content types, headers, body schemas) and every schema-violating request refused.
#
# It starts `target/debug/tradeeon serve --simulate` (API + workers + the exchange simulator) on a
# free loopback port against a throw-away PostgreSQL database created on TEST_DATABASE_ADMIN_URL
# and dropped on exit, seeds real rows through the API (tests/scenarios/fuzz_api.py seed) so that
# the `{id}` routes reach real connections and jobs, runs schemathesis (all four phases: examples,
# coverage, fuzzing, stateful), then sends what schemathesis never generates (`fuzz_api.py probe`:
# ids that are not UTF-8, broken bodies and encodings, odd headers and tokens), and prints
# schemathesis' report and the server's own count of answers by status.
#
# Usage: tests/scenarios/fuzz-api.sh        (after `cargo build`; scripts/test runs it)
#   FUZZ_MAX_EXAMPLES  test cases per operation and phase (default 50: 25–60 s on 2 cores)
#   FUZZ_SEED          schemathesis seed (default 6, so CI runs are reproducible); `random` for a
#                      fresh one, printed so a failure can be replayed
#   FUZZ_WORKERS       schemathesis workers (default 1)
#   FUZZ_REPORT_DIR    also write JUnit and NDJSON reports there
#   TEST_DATABASE_ADMIN_URL  default postgres://postgres@127.0.0.1:5432/postgres
#   PYTHON             default .venv/bin/python (tests/scenarios/requirements-fuzz.txt installed)
# Release run (longer, a fresh seed):
#   FUZZ_MAX_EXAMPLES=1000 FUZZ_SEED=random tests/scenarios/fuzz-api.sh
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
py=${PYTHON:-$root/.venv/bin/python}
st=$(dirname "$py")/st
bin=$root/target/debug/tradeeon
admin_url=${TEST_DATABASE_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}
max_examples=${FUZZ_MAX_EXAMPLES:-50}
seed=${FUZZ_SEED:-6}
if [ "$seed" = random ]; then seed=$(od -An -N4 -tu4 /dev/urandom | tr -d ' '); fi
workers=${FUZZ_WORKERS:-1}

say() { printf 'fuzz-api: %s\n' "$*"; }
die() { printf 'fuzz-api: %s\n' "$*" >&2; exit 1; }
[ -x "$bin" ] || die "no $bin: run cargo build first"
[ -x "$st" ] || die "no schemathesis at $st: pip install -r tests/scenarios/requirements-fuzz.txt into .venv"
command -v psql >/dev/null || die "psql is needed to create the throw-away database"
[[ "$max_examples" =~ ^[1-9][0-9]*$ ]] || die "FUZZ_MAX_EXAMPLES must be a positive integer"
[[ "$seed" =~ ^[0-9]+$ ]] || die "FUZZ_SEED must be a non-negative integer or 'random'"

work=$(mktemp -d)
db=tradeeon_fuzz_$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')
server_pid=
cleanup() {
  local rc=$?
  if [ -n "$server_pid" ]; then
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  psql -q -X "$admin_url" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 ||
    echo "fuzz-api: could not drop database $db" >&2
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 143' TERM INT HUP

psql -q -X -v ON_ERROR_STOP=1 "$admin_url" -c "CREATE DATABASE $db" >/dev/null
db_url=$("$py" -c 'import sys, urllib.parse as u; p = u.urlsplit(sys.argv[1]); print(u.urlunsplit(p._replace(path="/" + sys.argv[2])))' "$admin_url" "$db")

# Two free loopback ports (the API's and its metrics listener's): bind port 0 twice, read them
# back, release them for the server.
read -r port metrics_port < <("$py" -c 'import socket; s = [socket.socket() for _ in range(2)]; [x.bind(("127.0.0.1", 0)) for x in s]; print(*(x.getsockname()[1] for x in s))')
base=http://127.0.0.1:$port
export FUZZ_JWT_SECRET
FUZZ_JWT_SECRET=$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')
encryption_key=$("$bin" keygen)

say "starting tradeeon serve --simulate on $base (database $db)"
# env -i: nothing from the caller's environment (or a .env file: the working directory is the
# scratch directory) changes the server under test. A write budget far above what the fuzzer
# sends, or nearly every write would be a 429.
(
  cd "$work"
  exec env -i PATH="$PATH" HOME="$work" \
    DATABASE_URL="$db_url" DATABASE_MAX_CONNECTIONS=10 \
    ENCRYPTION_KEY="$encryption_key" SUPABASE_JWT_SECRET="$FUZZ_JWT_SECRET" \
    API_HOST=127.0.0.1 API_PORT="$port" API_METRICS_PORT="$metrics_port" API_USER_RATE_LIMIT_PER_MINUTE=1000000 \
    METRICS_PUBLISHER=none HEALTH_SWEEP_INTERVAL=1h LOG_FORMAT=json RUST_LOG=warn \
    "$bin" serve --simulate
) >"$work/server.log" 2>&1 &
server_pid=$!
for _ in $(seq 1 120); do
  curl -fsS "$base/ready" >/dev/null 2>&1 && break
  kill -0 "$server_pid" 2>/dev/null || { tail -n 30 "$work/server.log" >&2; die "the server exited during startup"; }
  sleep 0.25
done
curl -fsS "$base/ready" >/dev/null || { tail -n 30 "$work/server.log" >&2; die "the server is not ready after 30 s"; }

export FUZZ_TOKEN FUZZ_SEED_FILE=$work/seeded.json
FUZZ_TOKEN=$("$py" "$here/fuzz_api.py" token)
"$py" "$here/fuzz_api.py" seed "$base" "$work/server.log" "$FUZZ_SEED_FILE"

report_args=()
if [ -n "${FUZZ_REPORT_DIR:-}" ]; then
  mkdir -p "$FUZZ_REPORT_DIR"
  report_args=(--report junit,ndjson --report-dir "$FUZZ_REPORT_DIR")
fi
say "schemathesis $("$st" --version | awk '{print $NF}'): $max_examples examples per operation and phase, seed $seed"
started=$(date +%s)
st_status=0
# From the scratch directory and without bytecode files, so that nothing lands in the checkout.
(
  cd "$work"
  PYTHONDONTWRITEBYTECODE=1 PYTHONPATH="$here" "$st" --config-file "$here/fuzz-schemathesis.toml" --no-color run "$base/openapi.json" \
    --max-examples "$max_examples" --seed "$seed" --workers "$workers" "${report_args[@]}"
) || st_status=$?
say "schemathesis finished in $(($(date +%s) - started)) s (exit $st_status)"

probe_status=0
"$py" "$here/fuzz_api.py" probe "$base" "$FUZZ_SEED_FILE" || probe_status=$?
summary_status=0
"$py" "$here/fuzz_api.py" summary "http://127.0.0.1:$metrics_port/metrics" "$work/server.log" || summary_status=$?
if [ "$st_status" -ne 0 ] || [ "$probe_status" -ne 0 ] || [ "$summary_status" -ne 0 ]; then
  echo "fuzz-api: FAILED; replay with FUZZ_SEED=$seed FUZZ_MAX_EXAMPLES=$max_examples $0" >&2
  echo "--- the server's last warnings and errors ---" >&2
  grep -E '"level":"(WARN|ERROR)"|panicked' "$work/server.log" | tail -n 40 >&2 || true
  exit 1
fi
say "passed: no 5xx, no answer outside the document, seed $seed"
