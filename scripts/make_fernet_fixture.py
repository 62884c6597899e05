#!/usr/bin/env python3
"""Generate shared/tests/fixtures/fernet/python_tokens.json.

The fixture proves that tokens written by the old Python service
(``cryptography.fernet.Fernet.encrypt(value.encode()).decode()``, stored as-is in
a TEXT column) decrypt with the Rust vault (``tradeeon_shared::vault::Keyring``).

Fernet tokens embed a random IV, so re-running this script produces a different
(but equally valid) file. The key is a throwaway test key, never used anywhere
else.

The tokens are stamped with a fixed time in the past (``FIXED_TIMESTAMP``)
instead of "now": the Rust ``fernet`` crate rejects tokens whose timestamp is
more than 60 seconds in the future, so a fixture written on a machine with a
fast clock would fail on every other machine.

Usage (needs the ``cryptography`` package):

    python3 -m venv /tmp/fernet-venv
    /tmp/fernet-venv/bin/pip install cryptography
    /tmp/fernet-venv/bin/python scripts/make_fernet_fixture.py
"""

from __future__ import annotations

import json
import pathlib

import cryptography
from cryptography.fernet import Fernet

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "shared" / "tests" / "fixtures" / "fernet" / "python_tokens.json"

# A PEM-like multi-line value (the shape of an RSA/Ed25519 API private key).
# The body is filler text, not a real key.
PEM_LIKE = (
    "-----BEGIN PRIVATE KEY-----\n"
    + "\n".join(
        ("MC4CAQAwBQYDK2VwBCIEI" + f"{i:02d}" + "FAKEFAKEFAKEFAKEFAKEFAKEFAKEFAKEFAKEFAKE")[:64]
        for i in range(12)
    )
    + "\n-----END PRIVATE KEY-----\n"
)

# 2023-11-14T22:13:20Z. Any past time works; see the module docstring.
FIXED_TIMESTAMP = 1_700_000_000

PLAINTEXTS = [
    # Typical exchange credentials.
    "vmPUZE6mv9SD5VNHk4HlWFsOr6aKE2zvsw0MuIgwCIPy6utIco14y7Ju91duEh8A",
    "NhqPtmdSJYdKjVHjA7PZj4Mge3R5YNiP1e3UZjInClVN65XAbvqqM6A7H5fATj0j",
    "my-passphrase",
    # Edge cases.
    "",
    " leading and trailing spaces ",
    "exactly16bytes!!",  # one full AES block: PKCS#7 adds a whole padding block
    "unicode: pässwörd ключ 鍵 🔑",
    "quotes \" and backslash \\ and tab\t",
    PEM_LIKE,
]


def main() -> None:
    key = Fernet.generate_key()
    f = Fernet(key)
    cases = [{"plaintext": p, "token": f.encrypt_at_time(p.encode("utf-8"), FIXED_TIMESTAMP).decode("ascii")} for p in PLAINTEXTS]
    # Sanity check in Python itself before writing.
    for case in cases:
        assert f.decrypt(case["token"].encode("ascii")).decode("utf-8") == case["plaintext"]
    doc = {
        "generator": "scripts/make_fernet_fixture.py",
        "cryptography_version": cryptography.__version__,
        "timestamp": FIXED_TIMESTAMP,
        "key": key.decode("ascii"),
        "cases": cases,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {len(cases)} cases to {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
