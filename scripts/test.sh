#!/usr/bin/env bash
# The whole test suite, on a fresh machine: installs what the tests need (Debian's coturn
# for turnutils_uclient/turnutils_peer, aioice from PyPI, clang/llvm/libbpf-dev for the XDP
# program, cargo-nextest), then runs every unit, property, integration and doc test.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null; then SUDO=sudo; fi

if ! command -v turnutils_uclient >/dev/null || ! command -v turnutils_peer >/dev/null; then
  echo "== installing coturn (turnutils_uclient, turnutils_peer)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq coturn >/dev/null
fi
# The Debian package may start a turnserver on 3478; the tests own that port.
$SUDO systemctl stop coturn >/dev/null 2>&1 || true
$SUDO pkill -x turnserver >/dev/null 2>&1 || true

if ! python3 -c "import aioice" >/dev/null 2>&1; then
  echo "== installing aioice"
  python3 -m pip install -q "aioice==0.13.0" || python3 -m pip install -q --break-system-packages "aioice==0.13.0"
fi

# The browser test (tests/it/browser.rs) needs Debian's chromium and playwright-core from npm
# (never a downloaded browser); the NAT lab (tests/it/natlab.rs) needs iproute2, iptables and
# conntrack, and root for network namespaces.
missing=""
command -v chromium >/dev/null || missing="$missing chromium"
command -v ip >/dev/null || missing="$missing iproute2"
command -v iptables >/dev/null || missing="$missing iptables"
command -v conntrack >/dev/null || missing="$missing conntrack"
command -v node >/dev/null || missing="$missing nodejs npm"
# The metrics test (tests/it/metrics.rs) starts Debian's prometheus as a plain process and
# checks the exposition with promtool.
command -v prometheus >/dev/null && command -v promtool >/dev/null || missing="$missing prometheus"
command -v curl >/dev/null || missing="$missing curl"
# The transport tests (tests/it/transports.rs) make a test CA with openssl and trust it in
# Chromium through an NSS database made with certutil (libnss3-tools).
command -v openssl >/dev/null || missing="$missing openssl"
command -v certutil >/dev/null || missing="$missing libnss3-tools"
if [ -n "$missing" ]; then
  echo "== installing$missing"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
fi
# The Debian package may start a prometheus of its own; the tests start theirs.
$SUDO systemctl stop prometheus prometheus-node-exporter >/dev/null 2>&1 || true
if [ ! -f tests/browser/node_modules/playwright-core/package.json ] ||
   [ tests/browser/package-lock.json -nt tests/browser/node_modules/.package-lock.json ]; then
  echo "== npm ci (tests/browser: playwright-core)"
  (cd tests/browser && npm ci --no-audit --no-fund --loglevel=error)
fi

# The XDP fast path (feature `xdp`, src/xdp) is built with clang against libbpf's headers.
missing=""
command -v clang >/dev/null || missing="$missing clang"
command -v llvm-objdump >/dev/null || missing="$missing llvm"
[ -f /usr/include/bpf/bpf_helpers.h ] || missing="$missing libbpf-dev"
# The XDP lab (tests/it/xdp_lab.rs) turns tx checksum offload off on its veth pair.
command -v ethtool >/dev/null || missing="$missing ethtool"
if [ -n "$missing" ]; then
  echo "== installing$missing"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
fi

if ! cargo nextest --version >/dev/null 2>&1; then
  echo "== installing cargo-nextest"
  cargo install --locked cargo-nextest
fi

echo "== cargo nextest"
cargo nextest run --workspace --no-fail-fast
# The run above uses the default data plane (io_uring when the probe passes, one shard
# per core). Run the real-client tests again on the other configurations.
for cfg in "--io-backend io-uring --shards 1" "--io-backend mmsg --shards 1" "--io-backend mmsg --shards 2"; do
  echo "== integration tests with $cfg"
  TURNPIKE_TEST_SERVER_ARGS="$cfg" cargo nextest run --test integration --no-fail-fast \
    -E 'test(real_clients) | test(own_client) | (test(transports) - test(/chromium|hostile/)) | test(tcp_relay) | test(wildcard)'
done
# The XDP program in the kernel (BPF_PROG_TEST_RUN, and attaching in a network namespace):
# needs root; without it each test prints why it skips.
echo "== XDP tests (--features xdp)"
cargo nextest run -p turnpike --lib --features xdp --no-fail-fast -E 'test(/^xdp::/)'
# The XDP lab: turnpike --xdp on a veth pair between two network namespaces, coturn's uclient
# and turnpike's own client through it, checksums verified, offload correctness (root).
echo "== XDP lab (--features xdp)"
cargo nextest run --test integration --features xdp --no-fail-fast -E 'test(/^xdp_lab::/)'
echo "== doc tests"
cargo test --workspace --doc
# Operations files: the Grafana dashboard against Grafana's schema (npm @grafana/schema +
# TypeScript), the Prometheus alerting rules with promtool unit tests, the systemd unit,
# sysctl file and Kubernetes base (systemd-analyze, kubectl kustomize | kubernetes-validate).
echo "== grafana/check.sh"
grafana/check.sh
echo "== deploy/prometheus/check.sh"
deploy/prometheus/check.sh
echo "== deploy/check.sh"
deploy/check.sh
