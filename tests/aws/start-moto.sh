#!/usr/bin/env bash
# Starts the local AWS emulator the CloudWatch tests use: moto's server and, in front of it, the
# CBOR proxy (cbor_proxy.py), each on a free loopback port. Once both answer it writes ENV_FILE:
#
#   TRADEEON_TEST_MOTO_URL=http://127.0.0.1:PORT          (moto itself: query/JSON protocols)
#   TRADEEON_TEST_CLOUDWATCH_URL=http://127.0.0.1:PORT    (the proxy: what the Rust SDK calls)
#
# prints the same lines, and stays in the foreground until it is killed (or, with --watch-pid, until
# that process is gone), stopping both servers on the way out.
#
# Usage: tests/aws/start-moto.sh ENV_FILE [--watch-pid PID]
# PYTHON (default: .venv/bin/python) must have tests/aws/requirements.txt installed.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
env_file=${1:?usage: start-moto.sh ENV_FILE [--watch-pid PID]}
watch_pid=
if [ "${2:-}" = "--watch-pid" ]; then watch_pid=${3:?--watch-pid needs a PID}; fi
py=${PYTHON:-$root/.venv/bin/python}
[ -x "$py" ] || { echo "start-moto.sh: no Python at $py (set PYTHON or create .venv)" >&2; exit 1; }

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 143' TERM INT HUP

# Waits until FILE holds a URL whose port accepts connections, while PID lives.
wait_for_url() {
  local file=$1 pid=$2 what=$3 url port
  for _ in $(seq 1 240); do
    if [ -s "$file" ]; then
      url=$(cat "$file")
      port=${url##*:}
      if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        return 0
      fi
    fi
    kill -0 "$pid" 2>/dev/null || { echo "start-moto.sh: $what exited before it listened" >&2; return 1; }
    sleep 0.25
  done
  echo "start-moto.sh: $what did not listen within 60 s" >&2
  return 1
}

# moto's server (the same one `moto_server` runs), in its own process on a free port.
"$py" - "$work/moto.url" <<'PY' &
import os
import sys
import time

from moto.server import ThreadedMotoServer

server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
host, port = server.get_host_and_port()
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(f"http://{host}:{port}\n")
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
while True:
    time.sleep(3600)
PY
pids+=($!)
wait_for_url "$work/moto.url" "${pids[0]}" moto
moto_url=$(cat "$work/moto.url")

"$py" "$here/cbor_proxy.py" --upstream "$moto_url" --url-file "$work/proxy.url" &
pids+=($!)
wait_for_url "$work/proxy.url" "${pids[1]}" "the CBOR proxy"
proxy_url=$(cat "$work/proxy.url")

printf 'TRADEEON_TEST_MOTO_URL=%s\nTRADEEON_TEST_CLOUDWATCH_URL=%s\n' "$moto_url" "$proxy_url" >"$env_file.tmp"
mv "$env_file.tmp" "$env_file"
cat "$env_file"

while :; do
  if [ -n "$watch_pid" ] && ! kill -0 "$watch_pid" 2>/dev/null; then exit 0; fi
  for pid in "${pids[@]}"; do
    kill -0 "$pid" 2>/dev/null || { echo "start-moto.sh: a server exited unexpectedly" >&2; exit 1; }
  done
  sleep 1 &
  wait $! || true
done
