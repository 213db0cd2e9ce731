#!/usr/bin/env bash
# System calls per relayed packet: starts a relay (its argv follows NAME), attaches
# `strace -c -f` to it, drives it with loadgen at a fixed rate on loopback, and prints loadgen's
# packet counts and strace's syscall table. strace slows the relay: the counts matter, not the
# times. NAME `bare` runs loadgen in --mode raw (for loadgen's bare-forwarder).
#
#   bench/syscalls.sh bare target/release/bare-forwarder --listen 127.0.0.1:34780
#   bench/syscalls.sh uring target/release/turnpike --listen 127.0.0.1:34780 --relay-ip 127.0.0.1 \
#     --user alice:secret --realm r --shards 1 --no-tcp --user-quota 0 \
#     --allowed-peer-ip 127.0.0.0/8 --challenge-rate 0 --request-rate 0 --io-backend io-uring
#
# The relay must listen on 127.0.0.1:34780. Environment: RATE (40000 packets/s), CHANNELS (200),
# SIZE (200 bytes), DURATION (3 s), LOADGEN (target/release/loadgen). Needs strace.
set -euo pipefail
[ $# -ge 2 ] || { sed -n 2,14p "$0"; exit 2; }
name=$1; shift
command -v strace >/dev/null || { echo "strace is missing" >&2; exit 1; }
LOADGEN=${LOADGEN:-target/release/loadgen}
out=$(mktemp -d)
"$@" >"$out/server.log" 2>&1 &
pid=$!
cleanup() { kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -rf "$out"; }
trap cleanup EXIT
sleep 0.7
kill -0 "$pid" || { cat "$out/server.log" >&2; exit 1; }
strace -c -f -p "$pid" -o "$out/strace" 2>/dev/null &
spid=$!
sleep 0.5
mode=()
[ "$name" = bare ] && mode=(--mode raw)
timeout 60 "$LOADGEN" --server 127.0.0.1:34780 --channels "${CHANNELS:-200}" --rate "${RATE:-40000}" \
  --size "${SIZE:-200}" --duration "${DURATION:-3}" --quiet "${mode[@]}" | grep -E "sent|loss" || true
kill -INT "$spid"
wait "$spid" 2>/dev/null || true
echo "== $name: strace -c -f"
head -14 "$out/strace"
