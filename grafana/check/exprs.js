#!/usr/bin/env node
// Prints every PromQL expression of a Grafana dashboard, one per line, ready to
// be sent as-is to a Prometheus /api/v1/query:
//   - every panel target's `expr` (rows' nested panels too), annotation exprs;
//   - every query variable's query: label_values(METRIC, LABEL) -> METRIC,
//     query_result(EXPR) -> EXPR, label_values(LABEL) (no selector) skipped;
//   - Grafana variables substituted: $__rate_interval, $__interval -> 1m,
//     $__range -> 1h, $instance / ${instance} / ${instance:...} / [[instance]]
//     -> .* (every use is instance=~"$instance", so that matches any instance).
// Usage: node exprs.js [DASHBOARD.json]   (default: ../turnpike.json)
//        node exprs.js --check [DASHBOARD.json]
//   --check prints nothing on success; it fails (exit 1) if a panel or target
//   has a datasource other than {type: prometheus, uid: ${datasource}}, or an
//   expression names a turnpike_* metric that turnpike does not serve.
'use strict';
const fs = require('fs');
const path = require('path');

const args = process.argv.slice(2);
const check = args[0] === '--check';
if (check) args.shift();
const file = args[0] || path.join(__dirname, '..', 'turnpike.json');
const dash = JSON.parse(fs.readFileSync(file, 'utf8'));

// The metric families turnpike serves (the spec of the metrics work); a
// histogram's series are NAME_bucket, NAME_sum and NAME_count.
const COUNTERS = [
  'datagrams_received', 'relayed_packets', 'relayed_bytes', 'stun_requests', 'stun_responses',
  'drops', 'auth_failures', 'allocations_created', 'allocations_closed', 'allocation_refusals',
  'control_queue_overflows', 'handovers', 'handover_overflows',
  'kernel_udp_receive_buffer_errors', 'kernel_udp_send_buffer_errors', 'shard_busy_seconds',
  'config_reloads', 'realm_relayed_bytes', 'udp_gso_sends', 'udp_gso_datagrams', 'udp_gso_fallbacks',
  'udp_gro_receives', 'udp_gro_datagrams',
].map((n) => `turnpike_${n}_total`);
const GAUGES = ['allocations', 'permissions', 'channels', 'relay_ports', 'reservations', 'draining', 'build_info']
  .map((n) => `turnpike_${n}`);
const HISTOGRAMS = ['allocation_setup_seconds', 'allocation_lifetime_seconds']
  .flatMap((n) => ['bucket', 'sum', 'count'].map((s) => `turnpike_${n}_${s}`));
const KNOWN = new Set([...COUNTERS, ...GAUGES, ...HISTOGRAMS]);

function substitute(expr) {
  return expr
    .replace(/\$__rate_interval|\$\{__rate_interval\}/g, '1m')
    .replace(/\$__interval_ms|\$\{__interval_ms\}/g, '60000')
    .replace(/\$__interval|\$\{__interval\}/g, '1m')
    .replace(/\$__range|\$\{__range\}/g, '1h')
    .replace(/\$\{instance(:[a-z]+)?\}|\$instance\b|\[\[instance\]\]/g, '.*')
    .replace(/\s+/g, ' ')
    .trim();
}

const exprs = [];
const problems = [];

function checkDs(ds, where) {
  if (!ds || ds.type !== 'prometheus' || ds.uid !== '${datasource}') {
    problems.push(`${where}: datasource ${JSON.stringify(ds)} is not {type: "prometheus", uid: "\${datasource}"}`);
  }
}

function walk(panels) {
  for (const p of panels || []) {
    const where = `panel ${p.id} "${p.title}"`;
    if (p.type === 'row') {
      walk(p.panels);
      continue;
    }
    checkDs(p.datasource, where);
    if (!p.targets || p.targets.length === 0) problems.push(`${where}: no targets`);
    for (const t of p.targets || []) {
      checkDs(t.datasource, `${where} target ${t.refId}`);
      if (typeof t.expr !== 'string' || t.expr.trim() === '') problems.push(`${where} target ${t.refId}: no expr`);
      else exprs.push({ where: `${where} target ${t.refId}`, expr: substitute(t.expr) });
    }
  }
}
walk(dash.panels);

for (const a of (dash.annotations && dash.annotations.list) || []) {
  const e = a.expr || (a.target && a.target.expr);
  if (e) exprs.push({ where: `annotation "${a.name}"`, expr: substitute(e) });
}

for (const v of (dash.templating && dash.templating.list) || []) {
  if (v.type !== 'query') continue;
  checkDs(v.datasource, `variable ${v.name}`);
  let q = typeof v.query === 'string' ? v.query : v.query && v.query.query;
  if (!q) continue;
  q = q.trim();
  let m;
  if ((m = /^label_values\((.+),\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\)$/.exec(q))) q = m[1];
  else if (/^label_values\(\s*[a-zA-Z_][a-zA-Z0-9_]*\s*\)$/.test(q) || /^(label_names|metrics)\(/.test(q)) continue;
  else if ((m = /^query_result\((.+)\)$/.exec(q))) q = m[1];
  exprs.push({ where: `variable ${v.name}`, expr: substitute(q) });
}

if (check) {
  for (const { where, expr } of exprs) {
    for (const name of expr.match(/\bturnpike_[a-zA-Z0-9_]+/g) || []) {
      if (!KNOWN.has(name)) problems.push(`${where}: unknown metric ${name} in: ${expr}`);
    }
    if (!/\bturnpike_/.test(expr)) problems.push(`${where}: names no turnpike_ metric: ${expr}`);
    if (/\$/.test(expr)) problems.push(`${where}: unsubstituted variable in: ${expr}`);
  }
  if (problems.length) {
    for (const p of problems) console.error(`${file}: ${p}`);
    process.exit(1);
  }
} else {
  for (const { expr } of exprs) console.log(expr);
}
