#!/usr/bin/env python3
"""Writes copies of infra/tradeeon.yaml whose parameter defaults select the other branches.

checkov resolves `Condition:`s with the parameters' default values, so a plain scan of the
template never sees the resources of the non-default choices (the RDS database and its secrets,
the second NAT gateway, DNS records...). infra/check.sh scans these copies too, so every
configuration is held to zero failed checks.

Usage: python3 infra/variants.py OUTPUT_DIR
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parent / "tradeeon.yaml"

# Every optional feature switched on, the non-default database and NAT layout.
VARIANTS = {
    "rds-per-az-all-options": {
        "DatabaseMode": "rds",
        "DatabaseUrlSecretArn": '""',
        "NatGatewayMode": "per-az",
        "FrontendWebAclArn": "arn:aws:wafv2:us-east-1:123456789012:global/webacl/portal/0000",
        "HostedZoneId": "Z0123456789EXAMPLE",
        "AlarmEmail": "oncall@example.com",
        "SecretsKmsKeyArn": "arn:aws:kms:eu-west-1:123456789012:key/00000000-0000-0000-0000-000000000000",
    },
}


def with_defaults(text: str, defaults: dict[str, str]) -> str:
    """The template text with these parameters' `Default:` lines replaced (or added)."""
    lines = text.splitlines()
    start = lines.index("Parameters:")
    for name, value in defaults.items():
        try:
            at = lines.index(f"  {name}:", start)
        except ValueError:
            sys.exit(f"variants.py: parameter {name} not found in {TEMPLATE.name}")
        end = at + 1
        while end < len(lines) and (lines[end].startswith("    ") or not lines[end].strip()):
            end += 1
        block = lines[at + 1 : end]
        defaults_at = [i for i, line in enumerate(block) if re.match(r"    Default:", line)]
        if defaults_at:
            block[defaults_at[0]] = f"    Default: {value}"
        else:
            block.insert(1, f"    Default: {value}")
        lines[at + 1 : end] = block
    return "\n".join(lines) + "\n"


def main() -> int:
    if len(sys.argv) != 2:
        sys.exit(__doc__.strip().splitlines()[-1])
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    text = TEMPLATE.read_text(encoding="utf-8")
    for name, defaults in VARIANTS.items():
        (out / f"tradeeon-{name}.yaml").write_text(with_defaults(text, defaults), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
