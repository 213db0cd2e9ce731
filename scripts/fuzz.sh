#!/usr/bin/env bash
# Runs the cargo-fuzz targets on the stable toolchain (RUSTC_BOOTSTRAP=1, as rustls does) for a
# bounded time each; fails on the first crash. See fuzz/README.md.
#
# usage: scripts/fuzz.sh [SECONDS_PER_TARGET (default 60)] [TARGET...]
#
# FUZZ_SANITIZER=address runs under AddressSanitizer (about 5 times slower on server_input);
# the default is none: turnpike has no unsafe code, and overflow checks and debug assertions
# are on either way.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

secs="${1:-60}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(stun_decode channel_data server_input stream_framing)
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "== installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

export RUSTC_BOOTSTRAP=1
sanitizer="${FUZZ_SANITIZER:-none}"
echo "== cargo fuzz build (sanitizer: $sanitizer)"
cargo fuzz build -O -s "$sanitizer"
for t in "${targets[@]}"; do
  echo "== fuzz $t for ${secs}s"
  mkdir -p "corpus-work/$t"
  # New inputs go to corpus-work/ (ignored by git); corpus/ is the committed seed corpus.
  set +e
  cargo fuzz run -O -s "$sanitizer" "$t" "corpus-work/$t" "corpus/$t" -- \
    -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 2>&1 \
    | grep -E '^(#[0-9]+[[:space:]]+(INITED|DONE)|stat::(number_of_executed_units|average_exec_per_sec|peak_rss_mb)|==[0-9]+==|SUMMARY|thread .* panicked|Test unit written|Done [0-9]+ runs)'
  rc=${PIPESTATUS[0]}
  set -e
  if [ "$rc" != 0 ]; then
    echo "fuzz target $t failed (exit $rc); the input is in fuzz/artifacts/$t/" >&2
    exit "$rc"
  fi
done
