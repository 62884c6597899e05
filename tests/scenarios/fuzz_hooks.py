"""Schemathesis hooks of tests/scenarios/fuzz-api.sh (issue 7, scenario 6).

Random UUIDs and ULIDs almost never name a row, so left alone the fuzzer would only ever see
404s from the `{id}` routes, and random credentials only ever 422s. For schema-valid (positive)
cases, this swaps in, for about two cases in three, the ids of the rows that `fuzz_api.py seed`
created (FUZZ_SEED_FILE) and the simulator's working Binance key, so that the handlers' success
paths (202 with a real job, 409 while a job runs, 200 with permissions) are fuzzed too.

Negative cases are never touched: their violation is the point, and swapping a valid value in
could make them valid. Nor is the stateful phase, whose ids come from the API's answers. The choice is a hash of the generated case, so a run is reproducible
from its seed.
"""

from __future__ import annotations

import hashlib
import json
import os

import schemathesis

with open(os.environ["FUZZ_SEED_FILE"], encoding="utf-8") as _file:
    SEEDED = json.load(_file)

CONNECTION_IDS = SEEDED["connections"] + SEEDED["revoked"]
JOB_IDS = SEEDED["jobs"]
BINANCE = SEEDED["credentials"]["binance"]


def _is_positive_and_stateless(case) -> bool:
    """A schema-valid case of the examples, coverage or fuzzing phase. The stateful phase gets
    its ids from the API's own answers (the document's links) and is left alone."""
    meta = getattr(case, "meta", None)
    mode = getattr(getattr(meta, "generation", None), "mode", None)
    phase = getattr(getattr(meta, "phase", None), "name", None)
    return str(mode) == "positive" and str(phase) in ("examples", "coverage", "fuzzing")


def _draw(case, salt: str) -> int:
    """A number from 0 to 2^32 that depends only on the generated case."""
    material = repr((salt, case.path_parameters, case.query, case.body)).encode()
    return int.from_bytes(hashlib.sha256(material).digest()[:4], "big")


@schemathesis.hook
def map_case(ctx, case):
    if not _is_positive_and_stateless(case):
        return case
    path = case.operation.path
    n = _draw(case, path)
    params = case.path_parameters
    if isinstance(params, dict) and "id" in params and n % 3:
        pool = JOB_IDS if path.startswith("/jobs/") else CONNECTION_IDS
        params["id"] = pool[n % len(pool)]
    body = case.body
    if isinstance(body, dict) and (n >> 8) % 2 and {"api_key", "api_secret"} <= body.keys():
        if path in ("/connections", "/connections/test"):
            body["exchange"] = "binance"
            body.pop("passphrase", None)
            body["api_key"], body["api_secret"] = BINANCE["api_key"], BINANCE["api_secret"]
        elif path == "/connections/{id}/rotate":
            body.pop("passphrase", None)
            body["api_key"], body["api_secret"] = BINANCE["api_key"], BINANCE["api_secret"]
    return case
