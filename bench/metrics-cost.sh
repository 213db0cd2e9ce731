#!/usr/bin/env bash
# The cost of the metrics endpoint: CPU time of the turnpike process per relayed packet at a
# fixed offered load (loadgen, 40,000 round trips/s = 80,000 relayed packets/s, 1,000 channels),
# without and with --metrics-listen scraped once a second, `perf stat -e task-clock` over 8 s of
# traffic; six pairs, the order alternating. Server on CPU 1, loadgen on CPU 0; loopback only; needs
# perf, curl and release builds (cargo build --release -p turnpike -p loadgen).
set -euo pipefail
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd "$(dirname "$0")/.."
run() {
  local extra="$1" scrape="$2"
  taskset -c 1 target/release/turnpike --listen 127.0.0.1:3478 --relay-ip 127.0.0.1 --user alice:secret \
    --allowed-peer-ip 127.0.0.0/8 --user-quota 0 --shards 1 --log-level warn $extra > /dev/null 2>&1 &
  local pid=$!
  sleep 0.5
  local sp=""
  if [ "$scrape" = 1 ]; then
    ( for i in $(seq 1 30); do curl -s -o /dev/null http://127.0.0.1:9641/metrics; sleep 1; done ) & sp=$!
  fi
  ( sleep 2; perf stat -x, -e task-clock -p $pid -- sleep 8 2> "$tmp/perf.out" ) & local pp=$!
  taskset -c 0 target/release/loadgen --server 127.0.0.1:3478 --channels 1000 --channels-per-allocation 1 --peers 4 \
    --rate 40000 --duration 12 --user alice:secret --setup-rate 100000 --json --quiet --local-ip 127.1.0.1-127.1.0.254 \
    --size 100 > "$tmp/lg.json"
  wait $pp
  [ -n "$sp" ] && kill $sp 2>/dev/null || true
  kill -TERM $pid; wait $pid 2>/dev/null || true
  local pps=$(python3 -c "import json;print(json.load(open('$tmp/lg.json'))['traffic']['relayed_pps'])")

  local ms=$(grep task-clock "$tmp/perf.out" | cut -d, -f1)
  python3 -c "pps=$pps; ms=$ms; n=pps*8; print(f'{\"metrics\" if \"$scrape\"==\"1\" else \"plain  \"} relayed {pps:.0f}/s  CPU us/packet {ms*1000/n:.3f}')"
}
# The order alternates from pair to pair, so that drift in the machine's speed during the
# run does not favour one side.
for i in 1 2 3 4 5 6; do
  if [ $((i % 2)) = 1 ]; then
    run "" 0
    run "--metrics-listen 127.0.0.1:9641" 1
  else
    run "--metrics-listen 127.0.0.1:9641" 1
    run "" 0
  fi
done
