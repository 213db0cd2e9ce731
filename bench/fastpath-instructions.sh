#!/usr/bin/env bash
# Instructions per forwarded packet on the sans-IO fast path, counted by callgrind (exact and
# deterministic, so usable on a busy machine where wall-clock benchmarks are noise).
#
#   bench/fastpath-instructions.sh [CARGO_TARGET_DIR]    # default: $CARGO_TARGET_DIR, else target
#
# Builds examples/fastpath_instructions in release mode, runs each mode (channel-data, peer,
# send) under callgrind for N1 and N2 packets, and prints (Ir(N2) - Ir(N1)) / (N2 - N1) per
# mode: the setup (allocation, channel binding, process start) cancels out. N1 and N2 default to
# 200000 and 400000 (override with the environment variables of those names). Needs valgrind.
set -euo pipefail

# A target directory given as argument or in the environment is relative to the caller's
# directory; the default, target, is the repository's.
target_dir="${1:-${CARGO_TARGET_DIR:-}}"
if [ -n "$target_dir" ] && [ "${target_dir#/}" = "$target_dir" ]; then target_dir="$PWD/$target_dir"; fi
cd "$(dirname "$0")/.."
target_dir="${target_dir:-$PWD/target}"
n1="${N1:-200000}"
n2="${N2:-400000}"
modes=(channel-data peer send)

if ! command -v valgrind >/dev/null; then
  echo "valgrind not found (apt-get install -y valgrind)" >&2
  exit 1
fi
if [ "$n2" -le "$n1" ]; then
  echo "N2 ($n2) must be larger than N1 ($n1)" >&2
  exit 1
fi

echo "== building (release, CARGO_TARGET_DIR=$target_dir)" >&2
CARGO_TARGET_DIR="$target_dir" cargo build --release --example fastpath_instructions >&2
bin="$target_dir/release/examples/fastpath_instructions"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# Total instructions (Ir) of one run, from the callgrind output file's summary line.
instructions() {
  local mode="$1" packets="$2" out="$tmp/cg.$1.$2"
  local printed
  printed="$(valgrind --tool=callgrind --callgrind-out-file="$out" "$bin" "$mode" "$packets" 2>"$tmp/log")" || {
    cat "$tmp/log" >&2
    echo "callgrind run failed: $mode $packets" >&2
    exit 1
  }
  if [ "$printed" != "$packets" ]; then
    echo "unexpected output from $mode $packets: $printed" >&2
    exit 1
  fi
  awk '/^summary:/ { print $2; found = 1 } END { exit !found }' "$out"
}

if head="$(git rev-parse --short HEAD 2>/dev/null)"; then
  rev="$head"
  git diff --quiet HEAD || rev="$rev (with uncommitted changes)"
else
  rev="not a git checkout"
fi
echo "== $(valgrind --version), $rev" >&2
printf '%-14s %14s %14s %12s\n' mode "Ir($n1)" "Ir($n2)" "Ir/packet"
for mode in "${modes[@]}"; do
  a="$(instructions "$mode" "$n1")"
  b="$(instructions "$mode" "$n2")"
  per="$(awk -v a="$a" -v b="$b" -v n="$((n2 - n1))" 'BEGIN { printf "%.1f", (b - a) / n }')"
  printf '%-14s %14s %14s %12s\n' "$mode" "$a" "$b" "$per"
done
