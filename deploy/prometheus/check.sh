#!/usr/bin/env bash
# Checks turnpike's Prometheus alerting rules: `promtool check config` of the
# example prometheus.yml (which loads the rules), `promtool check rules` (syntax,
# PromQL, templates) and `promtool test rules` (turnpike-rules.test.yml: each
# alert fires on its firing case and stays quiet on the others).
# Needs promtool: `apt-get install -y prometheus` (Debian; the package's
# service is not needed) or PROMTOOL=/path/to/promtool.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
promtool="${PROMTOOL:-promtool}"
if ! command -v "$promtool" >/dev/null 2>&1; then
  echo "deploy/prometheus/check.sh: promtool not found (apt-get install -y prometheus, or set PROMTOOL)" >&2
  exit 1
fi
cd "$here"
"$promtool" check config prometheus.yml
"$promtool" check rules turnpike-rules.yml
"$promtool" test rules turnpike-rules.test.yml
