#!/usr/bin/env bash
# Static checks of the AWS deployment, for CI (no AWS account and no container engine needed):
#   - the dashboard embedded in infra/tradeeon.yaml matches dashboards/cloudwatch.json;
#   - cfn-lint finds nothing (errors, warnings or informational);
#   - checkov fails no check, on the template as is and on a copy with every non-default branch
#     switched on (RDS, a NAT gateway per AZ, DNS, ...), and every skip in the template has a
#     reason and suppresses a real finding;
#   - the template keeps the architecture's promises (infra/check_template.py);
#   - the Dockerfile and .dockerignore pass a static review (infra/check_dockerfile.py);
#   - docs/ covers every alarm, result code, warning and exchange, and its links resolve.
# Creates .venv-cfn and .venv-checkov at the repository root on first use. Exits non-zero on any
# failure.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '==> infra: %s\n' "$*"; }

# Separate venvs: checkov pins an old botocore, which the CloudWatch tests' moto (in .venv) and
# cfn-lint must not inherit.
ensure_venv() {
  local dir=$1 requirements=$2
  if [ ! -x "$dir/bin/python" ]; then
    log "creating $dir"
    python3 -m venv "$dir"
  fi
  "$dir/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements"
}
ensure_venv .venv-cfn infra/requirements-cfn.txt
ensure_venv .venv-checkov infra/requirements-checkov.txt
python=.venv-cfn/bin/python

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

log "embedded dashboard is current"
"$python" infra/build.py --check

log "cfn-lint $(.venv-cfn/bin/cfn-lint --version | awk '{print $2}')"
.venv-cfn/bin/cfn-lint --non-zero-exit-code informational -- infra/tradeeon.yaml
# The example parameters must be a valid deployment of the template (names, patterns, values).
.venv-cfn/bin/cfn-lint --non-zero-exit-code informational \
  --parameter-files infra/parameters.example.json -- infra/tradeeon.yaml
echo "cfn-lint: no findings (template, and template with infra/parameters.example.json)"

# checkov resolves Conditions with the parameters' defaults; the variant copies make it see the
# other branches. --skip-download: no calls to the vendor's platform (CI has no internet).
log "checkov $(.venv-checkov/bin/checkov --version)"
"$python" infra/variants.py "$work/variants"
checkov() {
  .venv-checkov/bin/checkov --framework cloudformation --skip-download -o json "$@" 2>"$work/checkov.log" || true
}
checkov -d infra >"$work/checkov-default.json"
checkov -d "$work/variants" >"$work/checkov-variants.json"
for report in "$work"/checkov-*.json; do
  if ! "$python" -c 'import json, sys; json.load(open(sys.argv[1]))' "$report" 2>/dev/null; then
    echo "checkov did not produce a report:" >&2
    cat "$work/checkov.log" >&2
    exit 1
  fi
done

log "architecture checks"
"$python" infra/check_template.py \
  --checkov-report "$work/checkov-default.json" \
  --checkov-report "$work/checkov-variants.json"

log "Dockerfile review"
"$python" infra/check_dockerfile.py

log "docs"
"$python" infra/check_docs.py

log "all infra checks passed"
