"""Helpers of tests/scenarios/fuzz-api.sh (issue 7, scenario 6). Standard library only.

  fuzz_api.py token               print a Supabase-style HS256 access token for a new user
  fuzz_api.py seed BASE LOG OUT   create real rows through the API, write their ids to OUT (JSON)
  fuzz_api.py probe BASE SEEDED   send what schemathesis does not generate (ids that are not
                                  UTF-8, broken bodies and encodings, odd headers and tokens) to
                                  every documented operation; exit 1 unless each answer is a
                                  documented status, never 5xx, with the JSON error body
  fuzz_api.py summary METRICS LOG print the server's own count of answers by status (from its
                                  metrics listener, METRICS = http://HOST:PORT/metrics); exit 1
                                  on any 5xx or a panic in LOG

The JWT secret and the token travel in the environment (FUZZ_JWT_SECRET, FUZZ_TOKEN), never in
argv, where `ps` would show them.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import json
import os
import re
import sys
import time
import urllib.error
import urllib.request
import uuid


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def mint_token(secret: str, audience: str, lifetime_s: int = 6 * 3600) -> str:
    """The claims Supabase puts in an access token and api/src/auth.rs checks: `exp`, `aud`
    (JWT_AUDIENCE), a UUID `sub`, plus `email` (kept as the user's profile email)."""
    now = int(time.time())
    user = uuid.uuid4()
    header = {"alg": "HS256", "typ": "JWT"}
    claims = {
        "sub": str(user),
        "aud": audience,
        "role": "authenticated",
        "email": f"fuzz-{user.hex[:12]}@example.com",
        "iat": now,
        "nbf": now - 5,
        "exp": now + lifetime_s,
    }
    signing_input = ".".join(b64url(json.dumps(part, separators=(",", ":")).encode()) for part in (header, claims))
    signature = hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


def call(base: str, method: str, path: str, body: object | None = None) -> tuple[int, object | None]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base + path, data=data, method=method)
    request.add_header("Authorization", "Bearer " + os.environ["FUZZ_TOKEN"])
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, None


def expect(what: str, got: tuple[int, object | None], status: int) -> dict:
    if got[0] != status:
        raise SystemExit(f"seed: {what} answered {got[0]} (expected {status}): {got[1]}")
    return got[1]  # type: ignore[return-value]


def simulator_keys(log_path: str) -> dict[str, tuple[str, str]]:
    """The first seeded key/secret of Binance and Kraken that `serve --simulate` printed."""
    text = open(log_path, encoding="utf-8", errors="replace").read()
    keys = {}
    for name, heading in (("binance", "Binance ("), ("kraken", "Kraken (")):
        section = text[text.index(heading) :]
        key = re.search(r"^\s+key:\s+(\S+)$", section, re.M)
        secret = re.search(r"^\s+secret:\s+(\S+)$", section, re.M)
        if not key or not secret:
            raise SystemExit(f"seed: no {name} test key in {log_path}")
        keys[name] = (key.group(1), secret.group(1))
    return keys


def seed(base: str, log_path: str, out_path: str) -> None:
    """Real rows for the fuzzer to hit: a connection that passed its check (permissions set), one
    whose check failed, a revoked one, a Zerodha login with its session job, a test job."""
    keys = simulator_keys(log_path)
    connections: list[str] = []
    jobs: list[str] = []

    def connect(exchange: str, api_key: str, api_secret: str, passphrase: str | None = None) -> dict:
        body = {"exchange": exchange, "api_key": api_key, "api_secret": api_secret, "nickname": f"fuzz {exchange}"}
        if passphrase is not None:
            body["passphrase"] = passphrase
        accepted = expect(f"POST /connections ({exchange})", call(base, "POST", "/connections", body), 202)
        connections.append(accepted["connection"]["id"])
        jobs.append(accepted["job"]["id"])
        return accepted

    connect("binance", *keys["binance"])
    # A well-formed Kraken key the simulator does not know: its verify job settles with a failed check.
    connect("kraken", "FuzzUnknownKrakenKey", base64.b64encode(b"not a key the simulator knows").decode())
    # A Coinbase Exchange key (key + base64 secret + passphrase), revoked below.
    connect("coinbase", "fuzz-exchange-key", base64.b64encode(b"fuzz secret").decode(), "fuzz passphrase")
    tested = expect(
        "POST /connections/test",
        call(base, "POST", "/connections/test", {"exchange": "binance", "api_key": keys["binance"][0], "api_secret": "wrong"}),
        202,
    )
    jobs.append(tested["job"]["id"])
    login = expect(
        "POST /connections/zerodha/login",
        call(base, "POST", "/connections/zerodha/login", {"api_key": "fuzzkiteapp", "api_secret": "fuzzkitesecret"}),
        200,
    )
    session = expect(
        "POST /connections/zerodha/session",
        call(base, "POST", "/connections/zerodha/session", {"request_token": "fuzzrequesttoken", "state": login["state"]}),
        202,
    )
    jobs.append(session["job"]["id"])

    # Let the worker settle the jobs, so that GET /jobs/{id} shows `done` with a result.
    deadline = time.monotonic() + 30
    pending = set(jobs)
    while pending and time.monotonic() < deadline:
        for job in list(pending):
            status, body = call(base, "GET", f"/jobs/{job}")
            if status == 200 and body["status"] in ("done", "failed"):
                pending.discard(job)
        time.sleep(0.2)
    if pending:
        print(f"seed: {len(pending)} job(s) still unsettled after 30 s; fuzzing anyway", file=sys.stderr)

    # Revoke the last static-key connection: its id then answers 404 everywhere.
    expect("DELETE /connections/{id}", call(base, "DELETE", f"/connections/{connections[-1]}"), 200)

    listed = expect("GET /connections", call(base, "GET", "/connections"), 200)
    seeded = {
        "connections": [c["id"] for c in listed],
        "revoked": [connections[-1]],
        "jobs": jobs,
        "credentials": {name: {"api_key": k, "api_secret": s} for name, (k, s) in keys.items()},
    }
    with open(out_path, "w", encoding="utf-8") as out:
        json.dump(seeded, out)
    print(
        f"seeded {len(seeded['connections'])} active connection(s) "
        f"({', '.join(c['exchange'] + ':' + c['status'] for c in listed)}), 1 revoked, {len(jobs)} job(s)"
    )


# Label values hold route templates with braces (`/jobs/{id}`): match whole `name="value"` pairs.
def raw_request(base: str, method: str, path: str, headers: dict[str, bytes | str], body: bytes | None):
    """One request with exactly these bytes: no client-side encoding or validation of the path."""
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=20)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for name, value in headers.items():
            conn.putheader(name, value)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type") or "", response.read()
    finally:
        conn.close()


def probe(base: str, seeded_path: str) -> int:
    """Requests outside what schemathesis generates from the document: it draws valid UTF-8
    strings, well-formed JSON and the documented content type. Every answer must be a status the
    document lists for the operation (or 404/405 for a path or method that is not one), never
    5xx, and an error must carry the JSON error body."""
    with urllib.request.urlopen(base + "/openapi.json", timeout=10) as response:
        doc = json.load(response)
    seeded = json.load(open(seeded_path, encoding="utf-8"))
    token = os.environ["FUZZ_TOKEN"]
    binance = seeded["credentials"]["binance"]
    bodies = {
        "/connections": {"exchange": "binance", **binance},
        "/connections/test": {"exchange": "binance", **binance},
        "/connections/{id}/rotate": dict(binance),
        "/connections/zerodha/login": {"api_key": "probekiteapp", "api_secret": "probekitesecret"},
        "/connections/zerodha/session": {"request_token": "probetoken", "state": "probe.state"},
    }
    odd_ids = ["%FF", "%C0%80", "%ED%A0%80", "%00", "%20", "%2F", "..%2F..", "%25", "a" * 3000,
               seeded["connections"][0] + "%00", seeded["jobs"][0].lower(), "{" + seeded["connections"][0] + "}"]
    odd_queries = ["limit=%FF", "limit=-1", "limit=1e3", "limit=%2B5", "limit=1&limit=2", "before=%00",
                   "before=" + "9" * 30 + "." + "0" * 32, "before=-1.00000000000000000000000000000000",
                   "%FF=1", "limit", "&&&", "before=" + "%FF" * 100]
    auth = {"Authorization": "Bearer " + token}
    failures: list[str] = []
    sent = 0

    def check(method: str, template: str, op: dict, path: str, headers: dict, body: bytes | None) -> None:
        nonlocal sent
        sent += 1
        try:
            status, content_type, raw = raw_request(base, method, path, headers, body)
        except Exception as err:  # a dropped connection is as bad as a 5xx
            failures.append(f"{method} {path[:80]}: no answer ({err})")
            return
        where = f"{method} {path[:80]} {sorted(headers)} body={None if body is None else body[:60]!r}"
        if status >= 500:
            failures.append(f"{where}: {status}")
        elif str(status) not in op["responses"] and status not in (404, 405):
            failures.append(f"{where}: undocumented {status}")
        elif status >= 400:
            try:
                error = json.loads(raw)["error"]
                assert content_type.startswith("application/json")
                assert isinstance(error["code"], str) and isinstance(error["message"], str)
            except Exception:
                failures.append(f"{where}: {status} without the JSON error body ({content_type}: {raw[:80]!r})")

    for template, ops in doc["paths"].items():
        for method, op in ops.items():
            method = method.upper()
            secured = bool(op.get("security"))
            headers = dict(auth) if secured else {}
            body = bodies.get(template) if method == "POST" else None
            encoded = None if body is None else json.dumps(body).encode()
            json_headers = {**headers, "Content-Type": "application/json"} if encoded is not None else headers
            real_id = seeded["jobs"][0] if template.startswith("/jobs/") else seeded["connections"][0]
            ids = odd_ids if "{id}" in template else [None]
            for odd in ids:
                odd_path = template if odd is None else template.replace("{id}", odd)
                check(method, template, op, odd_path, json_headers, encoded)
            path = template.replace("{id}", real_id)
            if template == "/connections/audit":
                for query in odd_queries:
                    check(method, template, op, f"{path}?{query}", headers, None)
            if encoded is not None:
                broken = [
                    ({}, encoded),
                    ({"Content-Type": "text/plain"}, encoded),
                    ({"Content-Type": "application/json; charset=latin-1"}, encoded),
                    ({"Content-Type": "application/json"}, b""),
                    ({"Content-Type": "application/json"}, b"{"),
                    ({"Content-Type": "application/json"}, b"null"),
                    ({"Content-Type": "application/json"}, b"[]"),
                    ({"Content-Type": "application/json"}, b"\xef\xbb\xbf" + encoded),
                    ({"Content-Type": "application/json"}, encoded.replace(b'"}', b'\xff"}', 1)),
                    ({"Content-Type": "application/json"}, b'{"a":' * 300 + b"1" + b"}" * 300),
                    ({"Content-Type": "application/json"}, encoded[:-1] + b',"api_key":"dup"}'),
                    ({"Content-Type": "application/json"}, encoded[:-1] + b',"nickname":1e999}'),
                    ({"Content-Type": "application/json"}, b" " * (70 * 1024) + encoded),
                    ({"Content-Type": "application/json"},
                     json.dumps({k: v + "\u0000" for k, v in body.items()}).encode()),
                    ({"Content-Type": "application/json"},
                     json.dumps({k: "\ud800" if k != "exchange" else v for k, v in body.items()}).encode()),
                ]
                for extra, payload in broken:
                    check(method, template, op, path, {**headers, **extra}, payload)
            if secured:
                for value in [b"Bearer " + b"a" * 9000, b"Bearer a.b.c", b"Basic Zm9vOmJhcg==", b"Bearer",
                              b"Bearer \xff\xfe", ("bearer " + token).encode(), b"Bearer " + token.encode() + b"x"]:
                    check(method, template, op, path, {**json_headers, "Authorization": value}, encoded)
            for name, value in [("User-Agent", b"\x80\xffprobe"), ("User-Agent", b"x" * 6000),
                                ("X-Forwarded-For", b"not an address, ::1, 999.1.1.1"), ("Accept", b"text/html")]:
                check(method, template, op, path, {**json_headers, name: value}, encoded)
    print(f"probe: {sent} requests outside the generated cases, {len(failures)} failure(s)")
    for failure in failures[:40]:
        print("  " + failure)
    return 1 if failures else 0


METRIC = re.compile(r'^tradeeon_http_requests_total\{(?P<labels>(?:\w+="(?:[^"\\]|\\.)*",?)*)\}\s+(?P<value>\d+)', re.M)
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def summary(metrics_url: str, log_path: str) -> int:
    """Prints what the server itself counted (independent of schemathesis' own bookkeeping)."""
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    by_status: dict[str, int] = {}
    server_errors: list[str] = []
    total = 0
    for match in METRIC.finditer(text):
        labels = dict(LABEL.findall(match["labels"]))
        count = int(match["value"])
        total += count
        by_status[labels["status"]] = by_status.get(labels["status"], 0) + count
        if labels["status"].startswith("5") and count:
            server_errors.append(f"{labels['method']} {labels['route']} -> {labels['status']}: {count}")
    print(f"server answered {total} requests; by status: " + ", ".join(f"{s}: {n}" for s, n in sorted(by_status.items())))
    log = open(log_path, encoding="utf-8", errors="replace").read()
    panics = len(re.findall(r"panicked at", log))
    failed = False
    if server_errors:
        print("5xx answers (see the server log):\n  " + "\n  ".join(server_errors))
        failed = True
    if panics:
        print(f"{panics} panic(s) in the server log")
        failed = True
    return 1 if failed else 0


def main(argv: list[str]) -> int:
    if len(argv) >= 1 and argv[0] == "token":
        print(mint_token(os.environ["FUZZ_JWT_SECRET"], os.environ.get("JWT_AUDIENCE") or "authenticated"))
        return 0
    if len(argv) == 4 and argv[0] == "seed":
        seed(*argv[1:])
        return 0
    if len(argv) == 3 and argv[0] == "probe":
        return probe(*argv[1:])
    if len(argv) == 3 and argv[0] == "summary":
        return summary(*argv[1:])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
