#!/usr/bin/env bash
# The whole test suite, on a fresh machine: installs what the tests need (Debian's coturn
# for turnutils_uclient/turnutils_peer, aioice from PyPI, cargo-nextest), then runs every
# unit, property, integration and doc test.
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

if ! cargo nextest --version >/dev/null 2>&1; then
  echo "== installing cargo-nextest"
  cargo install --locked cargo-nextest
fi

echo "== cargo nextest"
cargo nextest run --workspace --no-fail-fast
echo "== doc tests"
cargo test --workspace --doc
