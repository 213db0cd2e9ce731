#!/usr/bin/env bash
# Checks the deployment files under deploy/ without building or running turnpike:
#   systemd   systemd-analyze verify (any output is a failure), systemd-analyze security,
#             the effective SystemCallFilter against the syscalls turnpike makes,
#             systemd-sysusers --dry-run, stop timeout vs drain timeout
#   sysctl    sysctl --dry-run -p, every key exists under /proc/sys, the ephemeral port range
#             clear of the relay ports, buffer maxima >= --socket-buffer
#   kubernetes kubectl kustomize | kubernetes-validate --strict (any output is a failure);
#             the PodMonitor (a CRD kubernetes-validate has no schema for) against
#             deploy/schemas/podmonitor-v1.schema.json; selectors, named ports, the drain
#             hook, config keys against src/config.rs
#   Dockerfile agreement with the manifests (user, ports, paths); it is not built here
# Installs what is missing (apt: systemd, procps, kubectl or kubernetes-client; pip:
# kubernetes-validate) unless --no-install. Exits non-zero if any check fails.
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEPLOY="$ROOT/deploy"
INSTALL=1
[ "${1:-}" = "--no-install" ] && INSTALL=0
KV_VERSION=1.37.0              # kubernetes-validate from PyPI
K8S_VERSIONS="1.30.0 1.37.0"   # API versions the manifests must validate against

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
PASSED=0
FAILED=0
ok() { PASSED=$((PASSED + 1)); echo "ok   $*"; }
bad() { FAILED=$((FAILED + 1)); echo "FAIL $*"; }

# ---- tools ---------------------------------------------------------------------------
SUDO=
[ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && SUDO=sudo
APT_UPDATED=0
apt_install() {
    [ "$INSTALL" = 1 ] || return 1
    if [ "$APT_UPDATED" = 0 ]; then $SUDO apt-get update -qq >/dev/null && APT_UPDATED=1; fi
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null
}
command -v systemd-analyze >/dev/null || apt_install systemd
command -v sysctl >/dev/null || apt_install procps
# kubectl: the machine image's kubectl package where present, else Debian's
# kubernetes-client (kubectl 1.20, whose built-in kustomize is enough for this base).
command -v kubectl >/dev/null || apt_install kubernetes-client
PY=$(command -v python3)
if ! "$PY" -c 'import kubernetes_validate, jsonschema, yaml' 2>/dev/null; then
    [ "$INSTALL" = 1 ] && "$PY" -m pip install -q "kubernetes-validate==$KV_VERSION" >/dev/null 2>&1
fi
for t in systemd-analyze systemd-sysusers sysctl kubectl; do
    command -v "$t" >/dev/null || { bad "tool $t missing (run without --no-install, as root)"; }
done
"$PY" -c 'import kubernetes_validate, jsonschema, yaml' 2>/dev/null \
    || bad "python modules kubernetes_validate/jsonschema/yaml missing (pip install kubernetes-validate==$KV_VERSION)"
KV=("$PY" -m kubernetes_validate)

# Runs "$@"; passes when it exits 0 and prints nothing on stdout or stderr.
quiet_ok() {
    local name=$1; shift
    local out rc
    out=$("$@" 2>&1); rc=$?
    if [ $rc -eq 0 ] && [ -z "$out" ]; then ok "$name"; else bad "$name (exit $rc)"; [ -n "$out" ] && printf '%s\n' "$out" | sed 's/^/     /'; fi
}

# Runs a Python check from stdin; passes when it exits 0. Its output is the reasons.
py_check() {
    local name=$1 out rc
    out=$("$PY" - 2>&1); rc=$?
    if [ $rc -eq 0 ]; then ok "$name"; else bad "$name"; [ -n "$out" ] && printf '%s\n' "$out"; fi
}

# ---- systemd -------------------------------------------------------------------------
UNIT="$DEPLOY/systemd/turnpike.service"
# verify insists that ExecStart's binary exists and is executable. Rather than install
# one at /usr/local/bin, check a copy of the unit that differs only in that path, which
# points at an executable stub; the substitution is checked to have happened once.
mkdir -p "$WORK/unit"
printf '#!/bin/sh\nexit 0\n' >"$WORK/turnpike-stub"
chmod +x "$WORK/turnpike-stub"
sed "s#^ExecStart=/usr/local/bin/turnpike #ExecStart=$WORK/turnpike-stub #" "$UNIT" >"$WORK/unit/turnpike.service"
if [ "$(diff "$UNIT" "$WORK/unit/turnpike.service" | grep -c '^>')" = 1 ]; then
    ok "systemd: ExecStart=/usr/local/bin/turnpike found and stubbed for verify"
else
    bad "systemd: expected exactly one 'ExecStart=/usr/local/bin/turnpike ' line"
fi
quiet_ok "systemd: systemd-analyze verify (no output)" systemd-analyze verify "$WORK/unit/turnpike.service"
# Exposure score 0.0 (best) .. 10.0; this unit scores 1.7 on systemd 252.
quiet_ok "systemd: systemd-analyze security exposure <= 2.0" \
    sh -c "systemd-analyze security --offline=yes --threshold=20 '$WORK/unit/turnpike.service' >/dev/null"
mkdir -p "$WORK/sysroot/etc"
: >"$WORK/sysroot/etc/passwd"
: >"$WORK/sysroot/etc/group"
out=$(systemd-sysusers --root="$WORK/sysroot" --dry-run "$DEPLOY/systemd/turnpike.sysusers" 2>&1)
rc=$?
if [ $rc -eq 0 ] && ! grep -qiE 'ignoring|unknown|fail|error|invalid' <<<"$out" \
    && grep -q "Creating user 'turnpike'" <<<"$out"; then
    ok "systemd: turnpike.sysusers creates user turnpike (systemd-sysusers --dry-run)"
else
    bad "systemd: turnpike.sysusers"; printf '%s\n' "$out" | sed 's/^/     /'
fi
UNIT="$UNIT" py_check "systemd: SystemCallFilter allows turnpike's syscalls; stop drains; hardening keys" <<'EOF'
import os, re, subprocess, sys
unit = open(os.environ["UNIT"]).read()
settings = {}
for line in unit.splitlines():
    m = re.match(r"^([A-Za-z]+)=(.*)$", line)
    if m:
        settings.setdefault(m.group(1), []).append(m.group(2).strip())
# Groups as this systemd defines them.
out = subprocess.run(["systemd-analyze", "syscall-filter"], capture_output=True, text=True).stdout
groups, cur = {}, None
for line in out.splitlines():
    s = line.strip()
    if line.startswith("@"):
        cur = s; groups[cur] = []
    elif s and not s.startswith("#") and cur:
        groups[cur].append(s)
def expand(names):
    r = set()
    for n in names:
        r |= expand(groups[n]) if n.startswith("@") else {n}
    return r
# systemd's semantics: the first entry decides allow- or deny-list; later entries add to
# the allow-list or (with ~) take from it, in order.
allowed, mode = set(), None
for entry in settings.get("SystemCallFilter", []):
    deny = entry.startswith("~")
    names = expand(entry.lstrip("~").split())
    if mode is None:
        mode = "deny" if deny else "allow"
    if mode == "allow":
        allowed = allowed - names if deny else allowed | names
errors = []
if mode != "allow":
    errors.append("SystemCallFilter must start with an allow-list")
# What turnpike calls: io_uring backend, recvmmsg/sendmmsg+epoll backend, shard pinning,
# RLIMIT_NOFILE, sockets, threads, signals, timers.
needed = """io_uring_setup io_uring_enter io_uring_register recvmmsg sendmmsg sendmsg recvmsg
sendto recvfrom socket bind connect setsockopt getsockopt getsockname listen accept4
epoll_create1 epoll_ctl epoll_wait epoll_pwait eventfd2 sched_setaffinity sched_getaffinity
getrlimit setrlimit prlimit64 gettid clone clone3 futex mmap munmap mprotect madvise
rt_sigaction rt_sigprocmask sigaltstack openat read write close clock_nanosleep
exit_group""".split()
missing = [s for s in needed if s not in allowed]
if missing:
    errors.append("SystemCallFilter refuses: " + " ".join(missing))
def one(key):
    v = settings.get(key, [])
    return v[-1] if v else None
if one("KillSignal") != "SIGUSR1":
    errors.append("KillSignal must be SIGUSR1 (stop = drain)")
import tomllib
# TimeoutStopSec must outlast the drain: drain-timeout of the shipped config, else 3600.
drain = tomllib.load(open(os.path.join(os.path.dirname(os.environ["UNIT"]), "..", "turnpike.toml"), "rb")).get("drain-timeout", 3600)
t = one("TimeoutStopSec") or ""
if not t.isdigit() or int(t) <= drain:
    errors.append(f"TimeoutStopSec={t} must be plain seconds > drain-timeout {drain}")
if one("ExecReload") != "/bin/kill -HUP $MAINPID":
    errors.append("ExecReload must send SIGHUP")
for key, want in [("NoNewPrivileges", "yes"), ("CapabilityBoundingSet", "CAP_NET_BIND_SERVICE"),
                  ("AmbientCapabilities", "CAP_NET_BIND_SERVICE"), ("LimitNOFILE", "1048576"),
                  ("MemoryDenyWriteExecute", "yes"), ("Restart", "on-failure")]:
    if one(key) != want:
        errors.append(f"{key}={one(key)}, expected {want}")
for e in errors:
    print("     " + e)
sys.exit(1 if errors else 0)
EOF

# ---- sysctl --------------------------------------------------------------------------
CONF="$DEPLOY/sysctl.d/60-turnpike.conf"
out=$(sysctl --dry-run -p "$CONF" 2>&1)
rc=$?
nkeys=$(grep -cvE '^\s*([#;]|$)' "$CONF")
if [ $rc -eq 0 ] && [ "$(wc -l <<<"$out")" = "$nkeys" ] && ! grep -qiE 'cannot|error|invalid|unknown' <<<"$out"; then
    ok "sysctl: sysctl --dry-run -p accepts all $nkeys settings"
else
    bad "sysctl: sysctl --dry-run -p (exit $rc)"; printf '%s\n' "$out" | sed 's/^/     /'
fi
CONF="$CONF" DEPLOY="$DEPLOY" py_check "sysctl: keys exist, port range clear of relay ports, buffers >= socket-buffer" <<'EOF'
import os, re, sys, tomllib
errors, values = [], {}
for n, line in enumerate(open(os.environ["CONF"]), 1):
    s = line.strip()
    if not s or s[0] in "#;":
        continue
    m = re.fullmatch(r"([a-z0-9_.]+)\s*=\s*(\d+(?:[ \t]+\d+)*)", s)
    if not m:
        errors.append(f"line {n}: not 'key = number(s)': {s}"); continue
    key, val = m.group(1), m.group(2).split()
    if not os.path.exists("/proc/sys/" + key.replace(".", "/")):
        errors.append(f"line {n}: no /proc/sys entry for {key}")
    if key in values:
        errors.append(f"line {n}: {key} set twice")
    values[key] = [int(v) for v in val]
for toml in ["turnpike.toml", "kubernetes/turnpike.toml"]:
    cfg = tomllib.load(open(os.path.join(os.environ["DEPLOY"], toml), "rb"))
    lo, hi = cfg.get("min-port", 49152), cfg.get("max-port", 65535)
    r = values.get("net.ipv4.ip_local_port_range")
    if not r or len(r) != 2 or not (r[1] < lo or r[0] > hi):
        errors.append(f"ip_local_port_range {r} overlaps relay ports {lo}-{hi} of {toml}")
    for key in ["socket-buffer", "relay-socket-buffer"]:
        want = cfg.get(key, {"socket-buffer": 4194304, "relay-socket-buffer": 524288}[key])
        for sk in ["net.core.rmem_max", "net.core.wmem_max"]:
            if values.get(sk, [0])[0] < want:
                errors.append(f"{sk} {values.get(sk)} < {key} {want} of {toml}")
for e in errors:
    print("     " + e)
sys.exit(1 if errors else 0)
EOF

# ---- kubernetes ----------------------------------------------------------------------
if kubectl kustomize "$DEPLOY/kubernetes" >"$WORK/all.yaml" 2>"$WORK/kustomize.err" && [ ! -s "$WORK/kustomize.err" ]; then
    ok "kubernetes: kubectl kustomize builds ($(grep -c '^kind:' "$WORK/all.yaml") objects)"
else
    bad "kubernetes: kubectl kustomize"; sed 's/^/     /' "$WORK/kustomize.err"
fi
# kubernetes-validate has schemas for built-in kinds only; for any other kind it prints a
# WARN and exits 0. So: built-in kinds go to it and any output fails; the one CRD kind,
# PodMonitor, is checked against our own strict schema; any other kind fails.
WORK="$WORK" py_check "kubernetes: kustomize output split into built-in kinds and CRDs" <<'EOF'
import os, yaml
docs = [d for d in yaml.safe_load_all(open(os.environ["WORK"] + "/all.yaml")) if d]
if not docs:
    raise SystemExit("     no objects to validate")
core = [d for d in docs if d.get("apiVersion") != "monitoring.coreos.com/v1"]
crd = [d for d in docs if d.get("apiVersion") == "monitoring.coreos.com/v1"]
yaml.safe_dump_all(core, open(os.environ["WORK"] + "/core.yaml", "w"))
yaml.safe_dump_all(crd, open(os.environ["WORK"] + "/crd.yaml", "w"))
EOF
for v in $K8S_VERSIONS; do
    quiet_ok "kubernetes: kubernetes-validate --strict, Kubernetes $v (no output)" \
        "${KV[@]}" --strict --quiet -k "$v" "$WORK/core.yaml"
done
WORK="$WORK" DEPLOY="$DEPLOY" ROOT="$ROOT" py_check "kubernetes: PodMonitor schema; selectors, ports, drain hook, config keys, Dockerfile agree" <<'EOF'
import json, os, re, sys, tomllib, yaml, jsonschema
W, D = os.environ["WORK"], os.environ["DEPLOY"]
errors = []
docs = [d for d in yaml.safe_load_all(open(W + "/all.yaml")) if d]
crd = [d for d in yaml.safe_load_all(open(W + "/crd.yaml")) if d]
schema = json.load(open(D + "/schemas/podmonitor-v1.schema.json"))
validator = jsonschema.Draft202012Validator(schema)
for d in crd:
    if d.get("kind") != "PodMonitor":
        errors.append(f"no schema for {d.get('apiVersion')} {d.get('kind')}")
        continue
    for e in validator.iter_errors(d):
        errors.append(f"podmonitor/{d['metadata'].get('name')}: {'.'.join(map(str, e.path))}: {e.message}")
kinds = {d["kind"]: d for d in docs}
for k in ["Namespace", "ConfigMap", "Secret", "DaemonSet", "PodDisruptionBudget", "PodMonitor"]:
    if k not in kinds:
        errors.append(f"kustomize output has no {k}")
ds = kinds.get("DaemonSet")
if ds:
    pod = ds["spec"]["template"]
    labels = pod["metadata"].get("labels", {})
    def selects(sel, what):
        ml = sel.get("matchLabels", {})
        if not ml or any(labels.get(k) != v for k, v in ml.items()):
            errors.append(f"{what} selector {ml} does not select the DaemonSet's pods {labels}")
    selects(ds["spec"]["selector"], "DaemonSet")
    if "PodDisruptionBudget" in kinds:
        selects(kinds["PodDisruptionBudget"]["spec"]["selector"], "PodDisruptionBudget")
    spec = pod["spec"]
    c = spec["containers"][0]
    ports = {p["name"]: p for p in c.get("ports", [])}
    if "PodMonitor" in kinds:
        pm = kinds["PodMonitor"]
        selects(pm["spec"]["selector"], "PodMonitor")
        for ep in pm["spec"]["podMetricsEndpoints"]:
            if ep.get("port") not in ports:
                errors.append(f"PodMonitor port {ep.get('port')} is not a container port name")
    for probe, path in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")]:
        g = c.get(probe, {}).get("httpGet", {})
        if g.get("path") != path or ports.get(g.get("port"), {}).get("containerPort") != 9641:
            errors.append(f"{probe} must GET {path} on the metrics port 9641")
    if not spec.get("hostNetwork") or spec.get("dnsPolicy") != "ClusterFirstWithHostNet":
        errors.append("hostNetwork with dnsPolicy ClusterFirstWithHostNet expected")
    pre = " ".join(c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", []))
    if "kill -USR1 1" not in pre or "while kill -0 1" not in pre:
        errors.append("preStop must send SIGUSR1 to PID 1 and wait for it to exit")
    cmk = next((d for d in docs if d["kind"] == "ConfigMap"), None)
    drain = tomllib.loads(cmk["data"]["turnpike.toml"]).get("drain-timeout", 3600) if cmk else 3600
    if spec.get("terminationGracePeriodSeconds", 30) <= drain:
        errors.append(f"terminationGracePeriodSeconds must outlast drain-timeout ({drain})")
    args = c.get("args", [])
    env = {e["name"] for e in c.get("env", [])}
    for ref in re.findall(r"\$\((\w+)\)", " ".join(args)):
        if ref not in env:
            errors.append(f"args use $({ref}) but no env {ref}")
    # Every secretKeyRef / configMap reference names an object kustomize generated.
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for e in c.get("env", []):
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        if ref and ("Secret", ref["name"]) not in names:
            errors.append(f"env {e['name']}: no Secret {ref['name']}")
        elif ref and ref["key"] not in next(d for d in docs if d["metadata"]["name"] == ref["name"])["data"]:
            errors.append(f"env {e['name']}: Secret {ref['name']} has no key {ref['key']}")
    for v in spec.get("volumes", []):
        if "configMap" in v and ("ConfigMap", v["configMap"]["name"]) not in names:
            errors.append(f"volume {v['name']}: no ConfigMap {v['configMap']['name']}")
    sc, psc = c.get("securityContext", {}), spec.get("securityContext", {})
    if not psc.get("runAsNonRoot") or sc.get("allowPrivilegeEscalation") is not False \
            or not sc.get("readOnlyRootFilesystem") or sc.get("capabilities", {}).get("drop") != ["ALL"]:
        errors.append("securityContext: runAsNonRoot, no privilege escalation, read-only root, drop ALL")
    # The image must run as the DaemonSet's user and expose its ports.
    df = open(D + "/Dockerfile").read()
    if f"USER {psc.get('runAsUser')}:" not in df and f"USER {psc.get('runAsUser')}\n" not in df:
        errors.append(f"Dockerfile USER is not runAsUser {psc.get('runAsUser')}")
    for p in c.get("ports", []):
        if f"{p['containerPort']}/{p['protocol'].lower()}" not in df:
            errors.append(f"Dockerfile does not EXPOSE {p['containerPort']}/{p['protocol'].lower()}")
    if "--config" in args and args[args.index("--config") + 1] != "/etc/turnpike/turnpike.toml":
        errors.append("--config is not the mounted /etc/turnpike/turnpike.toml")
# Config keys (file and flags) exist in turnpike's Settings (src/config.rs): a key turnpike
# does not know makes it refuse to start (serde deny_unknown_fields).
src = open(os.environ["ROOT"] + "/src/config.rs").read()
body = src[src.index("pub struct Settings"):]
body = body[:body.index("\n}\n")]
known = {f.replace("_", "-") for f in re.findall(r"pub (\w+):", body)}
known |= set(re.findall(r'#\[serde\(rename = "([\w-]+)"\)\]', body))
known |= set(re.findall(r'#\[arg\(long = "([\w-]+)"\)\]', body))
cm = next((d for d in docs if d["kind"] == "ConfigMap"), None)
if cm:
    cfg = tomllib.loads(cm["data"]["turnpike.toml"])
    for key in cfg:
        if key not in known:
            errors.append(f"ConfigMap turnpike.toml: key {key} unknown to src/config.rs")
if ds:
    for a in ds["spec"]["template"]["spec"]["containers"][0].get("args", []):
        if a.startswith("--") and a[2:] not in known:
            errors.append(f"DaemonSet flag {a} unknown to src/config.rs")
for e in errors:
    print("     " + e)
sys.exit(1 if errors else 0)
EOF

echo
echo "$PASSED passed, $FAILED failed"
[ "$FAILED" -eq 0 ]
