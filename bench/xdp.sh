#!/usr/bin/env bash
# bench/xdp.sh: the XDP fast path against the user-space relays, over a veth pair.
#
# Topology (built here, deleted on exit): loadgen (clients and echo peers) in one network
# namespace, the relay in another, joined by a veth pair; addresses from the benchmarking
# range 198.18.0.0/15 (relay 198.18.0.1, clients 198.18.1.1-16, peers 198.18.2.1). The
# loadgen-side veth runs an XDP_PASS program (a veth delivers XDP_TX'd frames only to a peer
# with XDP) and both ends have tx checksum offload off (else frames carry partial checksums
# that XDP's incremental update cannot fix). GRO is on at the relay end and NAPI is threaded on
# both ends, so that a veth's receive work runs in a NAPI thread, pinned with the side it
# serves: the relay's on the relay CPU, the loadgen side's on the loadgen CPU. Without GRO or
# XDP on the relay end the veth would deliver in the sender's softirq, on the loadgen CPU.
#
# Configurations (each started fresh, pinned with taskset to the relay CPU):
#   coturn        turnserver, --relay-threads 1
#   bare          loadgen's bare recvmmsg/sendmmsg forwarder (loadgen --mode raw)
#   turnpike      turnpike --shards 1 (user space only)
#   turnpike-xdp  turnpike --shards 1 --xdp <relay veth> (native XDP on the veth)
#   turnpike-nogso     turnpike --no-udp-gso (each datagram its own sendmsg)
#   turnpike-mmsg      turnpike --io-backend mmsg (GSO, no GRO)
#   turnpike-gro       turnpike --io-backend mmsg --udp-gro (GSO and GRO)
# With --burst N loadgen sends N packets back to back per channel (a video frame): what GSO
# and GRO are for. The relay end's GRO (on here) coalesces a burst for a UDP_GRO socket.
# For each: loadgen --rate max (delivered packets/s, relay CPU per packet), then loadgen at a
# fixed rate, half of the first configuration's max (RTT percentiles at equal offered load).
#
# Relay CPU: the relay CPU's busy time during the traffic phase, from its cpuidle residency
# (/sys/devices/system/cpu/cpuN/cpuidle/state*/time, microseconds), which counts everything
# that ran there: the relay process, the NAPI thread (XDP runs there), softirqs. Without
# cpuidle it falls back to /proc/stat's idle column (jiffies: 10 ms steps, and tick-sampled on
# some kernels; the report says so). Anything else scheduled on the relay CPU counts too: run
# on a quiet machine (check `uptime`). With --perf, one more max run per configuration under
# `perf record -C <relay CPU>` gives the busy share by samples and the top symbols.
#
# Every loop is bounded; every run has a timeout; only processes started here are stopped
# (by PID). Needs root, iproute2 (with libbpf), ethtool, clang, python3; coturn for 'coturn'.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: bench/xdp.sh [options]
  --duration S        traffic seconds per run (default 5)
  --channels N        channels (default 1000)
  --per-alloc K       channels per allocation (default 1)
  --size B            payload bytes (default 100)
  --window W          loadgen --window for max runs (default 128)
  --burst N           loadgen --burst: packets per channel back to back (default 1)
  --tx-csum on|off    tx checksum offload on the veths (default off, which XDP needs: its
                      incremental checksum updates cannot fix partial checksums); `on` is
                      the NIC-like case for the user-space relays (GSO without software
                      checksums), not valid with turnpike-xdp
  --threads T         loadgen worker threads (default 1)
  --servers LIST      comma list, run in this order (default coturn,bare,turnpike,turnpike-xdp);
                      the first one's max sets the half-load rate
  --half-rate PPS     half-load rate instead (packets/s client -> relay)
  --relay-cpu N       CPU of the relay and its NAPI thread (default 1)
  --loadgen-cpu N     CPU of loadgen and its NAPI thread (default 0)
  --perf              one more max run per configuration under perf record -C
  --skip-build        use the binaries already in $CARGO_TARGET_DIR/release (or target/release)
  --out FILE          also write the report (markdown) there
  --logdir DIR        logs and JSON (default /tmp/turnpike-xdp-bench)
EOF
}

DURATION=5 CHANNELS=1000 PER_ALLOC=1 SIZE=100 WINDOW=128 THREADS=1 BURST=1 TX_CSUM=off
SERVERS=coturn,bare,turnpike,turnpike-xdp HALF_RATE="" RELAY_CPU=1 LOADGEN_CPU=0
PERF=0 SKIP_BUILD=0 OUT="" LOGDIR=/tmp/turnpike-xdp-bench
while [ $# -gt 0 ]; do
  case "$1" in
    --duration) DURATION=$2; shift 2 ;;
    --channels) CHANNELS=$2; shift 2 ;;
    --per-alloc) PER_ALLOC=$2; shift 2 ;;
    --size) SIZE=$2; shift 2 ;;
    --window) WINDOW=$2; shift 2 ;;
    --burst) BURST=$2; shift 2 ;;
    --tx-csum) TX_CSUM=$2; shift 2 ;;
    --threads) THREADS=$2; shift 2 ;;
    --servers) SERVERS=$2; shift 2 ;;
    --half-rate) HALF_RATE=$2; shift 2 ;;
    --relay-cpu) RELAY_CPU=$2; shift 2 ;;
    --loadgen-cpu) LOADGEN_CPU=$2; shift 2 ;;
    --perf) PERF=1; shift ;;
    --skip-build) SKIP_BUILD=1; shift ;;
    --out) OUT=$2; shift 2 ;;
    --logdir) LOGDIR=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
done

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release
log() { echo "$@" >&2; }

[ "$(id -u)" = 0 ] || { log "bench/xdp.sh needs root (network namespaces, XDP)"; exit 1; }
for t in ip ethtool clang python3 taskset timeout; do
  command -v "$t" >/dev/null || { log "$t is missing"; exit 1; }
done
case ",$SERVERS," in *,coturn,*) command -v turnserver >/dev/null || { log "turnserver (coturn) is missing"; exit 1; } ;; esac
if [ "$PERF" = 1 ] && ! command -v perf >/dev/null; then log "--perf: perf is missing"; exit 1; fi

if [ "$SKIP_BUILD" = 0 ]; then
  log "== cargo build --release -p turnpike --features turnpike/xdp -p loadgen"
  (cd "$ROOT" && cargo build --release -p turnpike --features turnpike/xdp -p loadgen)
fi
for b in turnpike loadgen bare-forwarder; do
  [ -x "$BIN/$b" ] || { log "$BIN/$b is missing (build, or set CARGO_TARGET_DIR)"; exit 1; }
done
mkdir -p "$LOGDIR"

# Names: namespaces with this shell's PID; device names of 4 characters, so that the NAPI
# threads' names (napi/DEV-ID, 15 characters at most) keep the whole device name.
TAG=$(printf '%03x' $(($$ % 4096)))
NH="tpxb$$-h" NR="tpxb$$-r" DH="h$TAG" DR="r$TAG"
RELAY=198.18.0.1 PORT=3478
CLIENT_IPS=198.18.1.1-198.18.1.16 PEER_IP=198.18.2.1
USER=alice PASSWORD=secret REALM=turnpike

SERVER_PID=""
cleanup() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$SERVER_PID" 2>/dev/null || true
  fi
  ip netns del "$NR" 2>/dev/null || true
  ip netns del "$NH" 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log "== topology: $NH ($DH, loadgen) <-> $NR ($DR, relay)"
ip netns add "$NH"
ip netns add "$NR"
ip -n "$NH" link add "$DH" type veth peer name "$DR" netns "$NR"
ip -n "$NH" link set lo up
ip -n "$NR" link set lo up
ip -n "$NR" addr add "$RELAY/15" dev "$DR"
for i in $(seq 1 16); do ip -n "$NH" addr add "198.18.1.$i/15" dev "$DH"; done
ip -n "$NH" addr add "$PEER_IP/15" dev "$DH"
case "$TX_CSUM" in on|off) ;; *) log "--tx-csum must be on or off"; exit 2 ;; esac
case "$TX_CSUM,$SERVERS," in on,*turnpike-xdp,*) log "--tx-csum on is not valid with turnpike-xdp"; exit 2 ;; esac
ip netns exec "$NH" ethtool -K "$DH" tx "$TX_CSUM" >/dev/null
ip netns exec "$NR" ethtool -K "$DR" tx "$TX_CSUM" gro on >/dev/null
cat >"$LOGDIR/pass.bpf.c" <<'EOF'
#include <linux/bpf.h>
__attribute__((section("xdp"), used)) int xdp_pass(struct xdp_md *ctx) { return XDP_PASS; }
char _license[] __attribute__((section("license"), used)) = "GPL";
EOF
clang -O2 -g -target bpf -I/usr/include/x86_64-linux-gnu -c "$LOGDIR/pass.bpf.c" -o "$LOGDIR/pass.bpf.o"
ip -n "$NH" link set dev "$DH" xdpdrv obj "$LOGDIR/pass.bpf.o" sec xdp
ip -n "$NH" link set "$DH" up
ip -n "$NR" link set "$DR" up
ip netns exec "$NH" sh -c "echo 1 > /sys/class/net/$DH/threaded"
ip netns exec "$NR" sh -c "echo 1 > /sys/class/net/$DR/threaded"

# Pins each NAPI thread with the side it serves (again after each start: attaching XDP
# can re-create the relay end's NAPI).
pin_napi() {
  local n=0 pid comm
  while read -r pid comm; do
    case "$comm" in
      "napi/$DR-"*) taskset -pc "$RELAY_CPU" "$pid" >/dev/null; n=$((n + 1)) ;;
      "napi/$DH-"*) taskset -pc "$LOADGEN_CPU" "$pid" >/dev/null; n=$((n + 1)) ;;
    esac
  done < <(ps -e -o pid=,comm=)
  log "   pinned $n NAPI thread(s)"
}

stun_ping() {
  ip netns exec "$NH" python3 - "$RELAY" "$PORT" <<'EOF'
import os, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(0.3)
s.sendto(bytes.fromhex("000100002112a442") + os.urandom(12), (sys.argv[1], int(sys.argv[2])))
try:
    s.recvfrom(2048)
except OSError:
    sys.exit(1)
EOF
}

server_argv() {
  case "$1" in
    coturn)
      echo turnserver -n --no-cli --listening-ip "$RELAY" --listening-port "$PORT" --relay-ip "$RELAY" \
        --min-port 49152 --max-port 65535 --user "$USER:$PASSWORD" --realm "$REALM" --lt-cred-mech \
        --allowed-peer-ip=198.18.0.0-198.19.255.255 --no-tls --no-dtls --no-tcp --no-tcp-relay \
        --relay-threads 1 --total-quota 0 --user-quota 0 --max-bps 0 --no-software-attribute \
        --log-file stdout --simple-log --pidfile "$LOGDIR/turnserver.pid" ;;
    bare)
      echo "$BIN/bare-forwarder" --listen "$RELAY:$PORT" ;;
    turnpike|turnpike-*)
      local a="$BIN/turnpike --listen $RELAY:$PORT --relay-ip $RELAY --allowed-peer-ip 198.18.0.0/15"
      a="$a --user $USER:$PASSWORD --realm $REALM --user-quota 0 --shards 1 --no-tcp"
      a="$a --challenge-rate 0 --request-rate 0 --log-level info"
      case "$1" in
        turnpike) ;;
        turnpike-xdp) a="$a --xdp $DR" ;;
        turnpike-nogso) a="$a --no-udp-gso" ;;
        turnpike-mmsg) a="$a --io-backend mmsg" ;;
        turnpike-gro) a="$a --io-backend mmsg --udp-gro" ;;
        *) log "unknown server $1"; exit 2 ;;
      esac
      echo "$a" ;;
    *) log "unknown server $1"; exit 2 ;;
  esac
}

start_server() {
  local name=$1 logf="$LOGDIR/$1.log"
  # shellcheck disable=SC2046
  ip netns exec "$NR" taskset -c "$RELAY_CPU" $(server_argv "$name") >"$logf" 2>&1 </dev/null &
  SERVER_PID=$!
  local ok=0
  for _ in $(seq 100); do
    kill -0 "$SERVER_PID" 2>/dev/null || { log "$name exited at start:"; tail -5 "$logf" >&2; exit 1; }
    if [ "$name" = bare ]; then grep -q "listening on udp" "$logf" && ok=1; else stun_ping && ok=1; fi
    [ $ok = 1 ] && break
    sleep 0.1
  done
  [ $ok = 1 ] || { log "$name did not become ready, see $logf"; exit 1; }
  if [ "$name" = turnpike-xdp ]; then
    grep -q "xdp: attached to $DR in native mode" "$logf" || { log "XDP not attached natively:"; grep xdp "$logf" >&2; exit 1; }
  fi
  pin_napi
}

stop_server() {
  kill -TERM "$SERVER_PID" 2>/dev/null || true
  for _ in $(seq 150); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$SERVER_PID" 2>/dev/null || true
  wait "$SERVER_PID" 2>/dev/null || true
  SERVER_PID=""
}

# Samples the relay CPU's idle time every 50 ms (pinned to the loadgen CPU) until stopped.
start_sampler() {
  taskset -c "$LOADGEN_CPU" python3 - "$RELAY_CPU" >"$1" <<'EOF' &
import glob, os, sys, time
cpu = sys.argv[1]
states = sorted(glob.glob(f"/sys/devices/system/cpu/cpu{cpu}/cpuidle/state*/time"))
hz = os.sysconf("SC_CLK_TCK")
deadline = time.monotonic() + 900
print("source", "cpuidle" if states else "procstat", flush=True)
while time.monotonic() < deadline:
    if states:
        idle = sum(int(open(p).read()) for p in states) / 1e6
    else:
        for line in open("/proc/stat"):
            f = line.split()
            if f[0] == f"cpu{cpu}":
                idle = (int(f[4]) + int(f[5])) / hz
    print(f"{time.monotonic():.6f} {idle:.6f}", flush=True)
    time.sleep(0.05)
EOF
  SAMPLER_PID=$!
}

# Runs loadgen in the loadgen namespace; JSON to $1. Extra arguments follow.
run_loadgen() {
  local json=$1 name=$2; shift 2
  local argv=("$BIN/loadgen" --server "$RELAY:$PORT" --channels "$CHANNELS" --channels-per-allocation "$PER_ALLOC"
    --peers "$((PER_ALLOC > 4 ? PER_ALLOC : 4))" --size "$SIZE" --duration "$DURATION" --threads "$THREADS" --burst "$BURST"
    --user "$USER:$PASSWORD" --setup-rate 100000 --json --quiet --local-ip "$CLIENT_IPS" --peer-ip "$PEER_IP"
    --server-pid "$SERVER_PID" "$@")
  [ "$name" = bare ] && argv+=(--mode raw)
  log "   \$ ${argv[*]}"
  local t0
  t0=$(python3 -c 'import time; print(f"{time.monotonic():.6f}")')
  if ! timeout 300 ip netns exec "$NH" taskset -c "$LOADGEN_CPU" "${argv[@]}" >"$json" 2>"$json.err"; then
    log "loadgen failed against $name:"; tail -5 "$json.err" >&2; exit 1
  fi
  echo "$t0" >"$json.t0"
}

measure() {
  local name=$1 kind=$2; shift 2
  local json="$LOGDIR/$name-$kind.json" samples="$LOGDIR/$name-$kind.cpu"
  start_sampler "$samples"
  run_loadgen "$json" "$name" "$@"
  kill "$SAMPLER_PID" 2>/dev/null || true
  wait "$SAMPLER_PID" 2>/dev/null || true
}

IFS=, read -r -a LIST <<<"$SERVERS"
log "== $(uptime)"
for name in "${LIST[@]}"; do
  log "== $name"
  start_server "$name"
  measure "$name" max --rate max --window "$WINDOW"
  if [ -z "$HALF_RATE" ]; then
    HALF_RATE=$(python3 -c 'import json,sys; print(int(json.load(open(sys.argv[1]))["traffic"]["relayed_pps"] / 4))' \
      "$LOGDIR/$name-max.json")
    # relayed_pps counts both directions; loadgen's --rate is client -> relay: half of the
    # max round trips is a quarter of the relayed packets.
    log "   half-load rate: $HALF_RATE packets/s client -> relay (half of $name's max)"
  fi
  measure "$name" half --rate "$HALF_RATE"
  if [ "$PERF" = 1 ]; then
    perf record -C "$RELAY_CPU" -F 999 -g -o "$LOGDIR/$name.perf.data" -- sleep 600 >/dev/null 2>&1 &
    PERF_PID=$!
    measure "$name" perf --rate max --window "$WINDOW"
    kill -INT "$PERF_PID" 2>/dev/null || true
    wait "$PERF_PID" 2>/dev/null || true
    # Samples by command first (what else ran on the relay CPU: swapper is idle), then symbols.
    { perf report -i "$LOGDIR/$name.perf.data" --no-children --sort comm -g none --stdio 2>/dev/null |
        grep -v '^#' | grep -v '^$' | head -8
      echo
      perf report -i "$LOGDIR/$name.perf.data" --no-children --sort comm,sym -g none --stdio 2>/dev/null |
        grep -v '^#' | grep -v '^$' | head -15; } >"$LOGDIR/$name.perf.top" || true
  fi
  stop_server
done

log "== report"
BENCH_SHAPE="$CHANNELS channels, $SIZE-byte payloads, bursts of $BURST, $DURATION s per run, tx checksum offload $TX_CSUM" \
python3 - "$LOGDIR" "$RELAY_CPU" "$PERF" "$OUT" "$(uptime)" "${LIST[@]}" <<'EOF'
import json, os, sys
logdir, cpu, perf, out, load, names = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4], sys.argv[5], sys.argv[6:]

def busy(name, kind, report):
    """Relay CPU busy seconds in the traffic phase (trimmed by 0.2 s at each end) and the
    packets relayed in that window."""
    lines = open(f"{logdir}/{name}-{kind}.cpu").read().split("\n")
    source = lines[0].split()[1]
    pts = [tuple(map(float, l.split())) for l in lines[1:] if l.strip()]
    t0 = float(open(f"{logdir}/{name}-{kind}.json.t0").read())
    start = t0 + report["setup"]["seconds"] + 0.2
    end = t0 + report["setup"]["seconds"] + report["traffic"]["seconds"] - 0.2
    inside = [p for p in pts if start <= p[0] <= end]
    if len(inside) < 2:
        return None, source
    (ta, ia), (tb, ib) = inside[0], inside[-1]
    wall = tb - ta
    return (wall - (ib - ia), wall), source

rows, sources = [], set()
for n in names:
    r = {}
    for kind in ("max", "half"):
        try:
            r[kind] = json.load(open(f"{logdir}/{n}-{kind}.json"))
        except (OSError, ValueError):
            r[kind] = None
    m, h = r["max"], r["half"]
    pps = m["traffic"]["relayed_pps"] if m else None
    cpu_s, src = busy(n, "max", m) if m else (None, "-")
    sources.add(src)
    per_pkt = None
    if cpu_s and pps:
        b, wall = cpu_s
        per_pkt = b / (pps * wall) * 1e9  # ns of relay CPU per relayed packet
        util = b / wall
    else:
        util = None
    proc = (m or {}).get("server_process") or {}
    rtt = h["rtt_us"] if h else None
    loss_m = m["traffic"]["loss_ratio"] if m else None
    loss_h = h["traffic"]["loss_ratio"] if h else None
    rows.append((n, pps, util, per_pkt, proc.get("cpu_seconds"), rtt, loss_m, loss_h,
                 m["traffic"]["loadgen_saturated"] if m else None, h["traffic"]["send_rate_pps"] if h else None))

base = {r[0]: r for r in rows}
def ratio(a, b):
    return f"{a / b:.2f}x" if a and b else "-"
bare_eff = None
if "bare" in base and base["bare"][3]:
    bare_eff = 1e9 / base["bare"][3]
L = []
L.append(f"Machine: {load.strip()}; relay CPU {cpu} (relay + its NAPI thread), loadgen and its NAPI thread on the other.")
L.append(f"Traffic: {os.environ.get('BENCH_SHAPE', '')}.")
L.append("")
L.append("| relay | delivered pkt/s (max) | relay CPU busy | relay CPU ns/pkt | pkt per relay CPU-s | vs bare | process CPU s | loss max / half | half-load rate | RTT p50 / p90 / p99 / p99.9 µs | loadgen saturated |")
L.append("|---|---|---|---|---|---|---|---|---|---|---|")
for n, pps, util, per_pkt, pcpu, rtt, lm, lh, sat, hr in rows:
    eff = 1e9 / per_pkt if per_pkt else None
    f = lambda v, fmt: (fmt.format(v) if v is not None else "-")
    rtts = f"{rtt['p50']:.0f} / {rtt['p90']:.0f} / {rtt['p99']:.0f} / {rtt['p999']:.0f}" if rtt else "-"
    L.append(f"| {n} | {f(pps, '{:,.0f}')} | {f(util and util * 100, '{:.0f} %')} | {f(per_pkt, '{:,.0f}')} | "
             f"{f(eff, '{:,.0f}')} | {ratio(eff, bare_eff)} | {f(pcpu, '{:.2f}')} | "
             f"{f(lm, '{:.4f}')} / {f(lh, '{:.4f}')} | {f(hr, '{:,.0f}')} | {rtts} | {sat} |")
L.append("")
if "procstat" in sources:
    L.append("Relay CPU from /proc/stat's idle column (no cpuidle here): 10 ms steps, tick-sampled; treat ns/pkt as rough.")
else:
    L.append("Relay CPU from the relay CPU's cpuidle residency (µs): everything that ran there, the NAPI thread (XDP) included.")
L.append("'process CPU s' is the relay process alone (loadgen --server-pid), without the NAPI thread's work.")
if perf:
    for n in names:
        try:
            top = open(f"{logdir}/{n}.perf.top").read().strip()
        except OSError:
            continue
        L.append("")
        L.append(f"perf record -C {cpu}, {n} (max run): samples by command, then top symbols")
        L.append("```")
        L.append(top)
        L.append("```")
text = "\n".join(L)
print(text)
if out:
    open(out, "w").write(text + "\n")
EOF
