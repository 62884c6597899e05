#!/usr/bin/env python3
"""Checks that the operator and user docs keep up with the code:
  * docs/troubleshooting.md has an entry (a `### `code`` heading) for every result code and
    every warning the exchange clients can produce (read from shared/src/exchanges/mod.rs);
  * docs/exchanges/ has a guide for every supported exchange (shared/src/domain.rs);
  * every relative link in docs/ and infra/README.md points at an existing file, and every
    `#fragment` at an existing heading or `<a id>` anchor.

Usage: python3 infra/check_docs.py
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

failures: list[str] = []


def check(condition: bool, message: str) -> None:
    if not condition:
        failures.append(message)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"<[^>]+>", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = path.read_text(encoding="utf-8")
    found = set(re.findall(r'<a id="([^"]+)"', text))
    seen: dict[str, int] = {}
    in_code = False
    for line in text.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if in_code:
            continue
        match = re.match(r"#+\s+(.*)", line)
        if match:
            base = slug(match.group(1))
            count = seen.get(base, 0)
            found.add(base if count == 0 else f"{base}-{count}")
            seen[base] = count + 1
    return found


def check_links(files: list[Path]) -> None:
    for path in files:
        text = path.read_text(encoding="utf-8")
        text = re.sub(r"```.*?```", "", text, flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            file_part, _, fragment = target.partition("#")
            destination = (path.parent / file_part).resolve() if file_part else path
            where = f"{path.relative_to(ROOT)}: link {target!r}"
            if not destination.exists():
                failures.append(f"{where} points at a missing file")
                continue
            if fragment and destination.suffix == ".md":
                check(fragment in anchors(destination), f"{where}: no such anchor in {destination.relative_to(ROOT)}")


def main() -> int:
    exchanges_rs = (ROOT / "shared/src/exchanges/mod.rs").read_text(encoding="utf-8")
    codes = re.findall(r'CheckCode::\w+ => "(\w+)"', exchanges_rs)
    warnings = re.findall(r'pub const \w+: &str = "(\w+)";', exchanges_rs.split("pub mod warnings", 1)[-1].split("}", 1)[0])
    check(len(codes) >= 12, f"found only {len(codes)} result codes in shared/src/exchanges/mod.rs; has the mapping moved?")
    check(len(warnings) >= 3, "found no warnings in shared/src/exchanges/mod.rs; has the warnings module moved?")
    troubleshooting = (DOCS / "troubleshooting.md").read_text(encoding="utf-8")
    for code in codes + warnings:
        check(f"### `{code}`" in troubleshooting, f"docs/troubleshooting.md has no entry (### `{code}`) for {code}")

    domain = (ROOT / "shared/src/domain.rs").read_text(encoding="utf-8")
    exchange_block = domain.split("Exchange, \"exchange\"", 1)[-1].split("}", 1)[0]
    for exchange in re.findall(r'=> "(\w+)"', exchange_block):
        check((DOCS / "exchanges" / f"{exchange}.md").exists(), f"docs/exchanges/{exchange}.md is missing")

    check_links(sorted(DOCS.rglob("*.md")) + [ROOT / "infra" / "README.md"])

    if failures:
        print("docs check failed:", file=sys.stderr)
        for failure in failures:
            print(f"  - {failure}", file=sys.stderr)
        return 1
    print(f"docs: {len(codes)} result codes and {len(warnings)} warnings documented, links resolve")
    return 0


if __name__ == "__main__":
    sys.exit(main())
