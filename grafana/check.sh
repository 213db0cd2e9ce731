#!/usr/bin/env bash
# Checks grafana/turnpike.json:
#   1. type-checks it against Grafana's published dashboard schema
#      (@grafana/schema; grafana/check/check.ts): a misspelt or unknown key,
#      a missing required field or a wrongly typed value fails;
#   2. node check/exprs.js --check: every panel and target uses the
#      ${datasource} Prometheus data source and only turnpike's metric names;
#   3. where promtool is installed, every PromQL expression parses
#      (each is wrapped in a recording rule and run through `promtool check rules`).
# Usage: grafana/check.sh            run the checks
#        grafana/check.sh --exprs    print the dashboard's PromQL, one per line
#                                    ($__rate_interval -> 1m, $instance -> .*)
# Needs node >= 18 and npm; installs grafana/check/node_modules with `npm ci`.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
check="$here/check"

if [ "${1:-}" = "--exprs" ]; then
  exec node "$check/exprs.js" "$here/turnpike.json"
fi

# npm ci when node_modules is missing or older than the lockfile.
stamp="$check/node_modules/.package-lock.json"
if [ ! -f "$stamp" ] || [ "$check/package-lock.json" -nt "$stamp" ]; then
  (cd "$check" && npm ci --no-audit --no-fund --loglevel=error)
fi

echo "grafana: tsc against @grafana/schema"
(cd "$check" && npx --no-install tsc --noEmit -p .)

echo "grafana: datasources and metric names"
node "$check/exprs.js" --check "$here/turnpike.json"

if command -v promtool >/dev/null 2>&1; then
  echo "grafana: PromQL syntax (promtool)"
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  node "$check/exprs.js" "$here/turnpike.json" | node -e '
    const lines = require("fs").readFileSync(0, "utf8").split("\n").filter(Boolean);
    let out = "groups:\n  - name: dashboard_exprs\n    rules:\n";
    lines.forEach((e, i) => { out += `      - record: dashboard:expr_${i}\n        expr: ${JSON.stringify(e)}\n`; });
    process.stdout.write(out);' > "$tmp/exprs.rules.yml"
  promtool check rules "$tmp/exprs.rules.yml" >/dev/null || { promtool check rules "$tmp/exprs.rules.yml"; exit 1; }
else
  echo "grafana: promtool not installed, PromQL syntax not checked"
fi
echo "grafana: OK ($(node "$check/exprs.js" "$here/turnpike.json" | wc -l) expressions)"
