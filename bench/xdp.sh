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
# --generator live-frames: the same configurations, driven by NIC-like frames instead of
# loadgen's sockets. loadgen sets up the allocations and channels (the bare forwarder's routes),
# writes them to a file and holds them open (--flows-out, --hold) while loadgen's xdp-gen
# (feature loadgen/xdp) injects Ethernet frames with BPF_PROG_RUN in live-frames mode on the
# loadgen-side veth: XDP_TX there sends each frame over the veth, and it reaches the relay's end
# as an xdp_frame (no skb, no copy: as from a NIC's driver). One direction (--gen-direction,
# default client -> peer). xdp-gen paces the frames in the kernel (--gen-burst: back to back in
# bursts), and its XDP program on the loadgen-side veth counts and drops what the relay delivers
# (no echo: the delivered rate is one direction). Its generating program is also attached to a
# veth pair left down (--anchor), which spares each BPF_PROG_RUN call two RCU grace periods. Runs per configuration: the equal offered load (--gen-rate, the same for
# all), a ramp of higher rates (--gen-ramp, until the loss passes --gen-max-loss), and an
# open-loop run at the generator's maximum (overload: the user-space relays livelock there).
# The loadgen-side veth has GRO on instead of the XDP_PASS program (xdp-gen attaches its own for
# each run; GRO keeps the veth's NAPI thread, pinned, across attach and detach); that NAPI
# thread runs as SCHED_FIFO so that it drains the relay's output at once. Frames reach
# the relay's veth only while it has GRO or XDP (it has GRO on), and the relay's XDP_TX output
# reaches the loadgen side only while xdp-gen's program is attached there.
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
  --perf              one more max run per configuration under perf record -C (live-frames:
                      one more run at the equal load)
  --generator G       loadgen (sockets, default) or live-frames (xdp-gen: BPF_PROG_RUN frames)
  --gen-rate PPS      live-frames: the equal offered load, frames/s (default 100000)
  --gen-ramp LIST     live-frames: factors of --gen-rate tried after it, in order, until the
                      loss passes --gen-max-loss (default 1.5,2,3,4,6,8,12,16,24,32; none: no ramp)
  --gen-max-loss R    live-frames: loss ratio that ends the ramp (default 0.05)
  --gen-direction D   live-frames: client (ChannelData / raw datagrams to the relay, default),
                      peer (datagrams to the relayed addresses), or both (alternating)
  --gen-burst LIST    live-frames: frames sent back to back, bursts spaced to keep the rate;
                      one equal-load run per value (default 1,16,64: evenly spaced, and as a
                      NIC's interrupt coalescing or a busy queue hands them over); the ramp and
                      the --perf run use the last value
  --skip-build        use the binaries already in $CARGO_TARGET_DIR/release (or target/release)
  --out FILE          also write the report (markdown) there
  --logdir DIR        logs and JSON (default /tmp/turnpike-xdp-bench)
EOF
}

DURATION=5 CHANNELS=1000 PER_ALLOC=1 SIZE=100 WINDOW=128 THREADS=1 BURST=1 TX_CSUM=off
SERVERS=coturn,bare,turnpike,turnpike-xdp HALF_RATE="" RELAY_CPU=1 LOADGEN_CPU=0
PERF=0 SKIP_BUILD=0 OUT="" LOGDIR=/tmp/turnpike-xdp-bench
GENERATOR=loadgen GEN_RATE=100000 GEN_RAMP=1.5,2,3,4,6,8,12,16,24,32 GEN_MAX_LOSS=0.05 GEN_DIRECTION=client
GEN_BURST=1,16,64
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
    --generator) GENERATOR=$2; shift 2 ;;
    --gen-rate) GEN_RATE=$2; shift 2 ;;
    --gen-ramp) GEN_RAMP=$2; shift 2 ;;
    --gen-max-loss) GEN_MAX_LOSS=$2; shift 2 ;;
    --gen-direction) GEN_DIRECTION=$2; shift 2 ;;
    --gen-burst) GEN_BURST=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
done

case "$GENERATOR" in loadgen|live-frames) ;; *) echo "--generator: loadgen or live-frames" >&2; exit 2 ;; esac
[ "$GEN_RAMP" = none ] && GEN_RAMP=""

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release
log() { echo "$@" >&2; }

[ "$(id -u)" = 0 ] || { log "bench/xdp.sh needs root (network namespaces, XDP)"; exit 1; }
for t in ip ethtool clang python3 taskset timeout chrt; do
  command -v "$t" >/dev/null || { log "$t is missing"; exit 1; }
done
case ",$SERVERS," in *,coturn,*) command -v turnserver >/dev/null || { log "turnserver (coturn) is missing"; exit 1; } ;; esac
if [ "$PERF" = 1 ] && ! command -v perf >/dev/null; then log "--perf: perf is missing"; exit 1; fi

if [ "$SKIP_BUILD" = 0 ]; then
  log "== cargo build --release -p turnpike --features turnpike/xdp,loadgen/xdp -p loadgen"
  (cd "$ROOT" && cargo build --release -p turnpike --features turnpike/xdp,loadgen/xdp -p loadgen)
fi
NEEDED="turnpike loadgen bare-forwarder"
[ "$GENERATOR" = live-frames ] && NEEDED="$NEEDED xdp-gen"
for b in $NEEDED; do
  [ -x "$BIN/$b" ] || { log "$BIN/$b is missing (build, or set CARGO_TARGET_DIR)"; exit 1; }
done
mkdir -p "$LOGDIR"

# Names: namespaces with this shell's PID; device names of 4 characters, so that the NAPI
# threads' names (napi/DEV-ID, 15 characters at most) keep the whole device name.
TAG=$(printf '%03x' $(($$ % 4096)))
NH="tpxb$$-h" NR="tpxb$$-r" DH="h$TAG" DR="r$TAG" DA="a$TAG"
RELAY=198.18.0.1 PORT=3478
CLIENT_IPS=198.18.1.1-198.18.1.16 PEER_IP=198.18.2.1
USER=alice PASSWORD=secret REALM=turnpike

SERVER_PID="" HOLD_PID=""
cleanup() {
  if [ -n "$HOLD_PID" ] && kill -0 "$HOLD_PID" 2>/dev/null; then
    kill -TERM "$HOLD_PID" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$HOLD_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$HOLD_PID" 2>/dev/null || true
  fi
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
ip netns exec "$NR" ethtool -K "$DR" tx "$TX_CSUM" gro on >/dev/null
if [ "$GENERATOR" = live-frames ]; then
  # xdp-gen attaches its program for each run; GRO keeps the NAPI thread in between. Its
  # anchor: a veth pair that stays down.
  ip netns exec "$NH" ethtool -K "$DH" tx "$TX_CSUM" gro on >/dev/null
  ip -n "$NH" link add "$DA" type veth peer name "b$TAG"
else
  ip netns exec "$NH" ethtool -K "$DH" tx "$TX_CSUM" >/dev/null
  cat >"$LOGDIR/pass.bpf.c" <<'EOF'
#include <linux/bpf.h>
__attribute__((section("xdp"), used)) int xdp_pass(struct xdp_md *ctx) { return XDP_PASS; }
char _license[] __attribute__((section("license"), used)) = "GPL";
EOF
  clang -O2 -g -target bpf -I/usr/include/x86_64-linux-gnu -c "$LOGDIR/pass.bpf.c" -o "$LOGDIR/pass.bpf.o"
  ip -n "$NH" link set dev "$DH" xdpdrv obj "$LOGDIR/pass.bpf.o" sec xdp
fi
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
      "napi/$DH-"*)
        taskset -pc "$LOADGEN_CPU" "$pid" >/dev/null; n=$((n + 1))
        # live-frames: the loadgen side's NAPI thread (xdp-gen's sink) must drain the relay's
        # output at once, whatever else runs on that CPU, or its ring overflows.
        if [ "$GENERATOR" = live-frames ]; then chrt -f -p 50 "$pid"; fi
        ;;
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

# --- live-frames ---------------------------------------------------------------------------

# loadgen sets up the allocations against $1, writes the flows and holds them open until
# stop_hold.
start_hold() {
  local name=$1 flows="$LOGDIR/$1.flows.json"
  rm -f "$flows"
  local argv=("$BIN/loadgen" --server "$RELAY:$PORT" --channels "$CHANNELS" --channels-per-allocation "$PER_ALLOC"
    --peers "$((PER_ALLOC > 4 ? PER_ALLOC : 4))" --size "$SIZE" --duration 0 --threads "$THREADS"
    --user "$USER:$PASSWORD" --setup-rate 100000 --json --quiet --local-ip "$CLIENT_IPS" --peer-ip "$PEER_IP"
    --flows-out "$flows" --hold 3600)
  [ "$name" = bare ] && argv+=(--mode raw)
  log "   \$ ${argv[*]}"
  timeout 4000 ip netns exec "$NH" taskset -c "$LOADGEN_CPU" "${argv[@]}" >"$LOGDIR/$name-hold.json" 2>"$LOGDIR/$name-hold.err" &
  HOLD_PID=$!
  for _ in $(seq 1200); do
    [ -s "$flows" ] && break
    kill -0 "$HOLD_PID" 2>/dev/null || { log "loadgen (setup) exited:"; tail -5 "$LOGDIR/$name-hold.err" >&2; exit 1; }
    sleep 0.1
  done
  [ -s "$flows" ] || { log "no flows from loadgen after 120 s"; exit 1; }
  local n
  n=$(python3 -c 'import json,sys; print(len(json.load(open(sys.argv[1]))["flows"]))' "$flows")
  [ "$n" -gt 0 ] || { log "loadgen set up no flow against $name"; exit 1; }
  log "   $n flows set up and held"
}

# Ends the hold: loadgen releases the allocations and exits.
stop_hold() {
  kill -TERM "$HOLD_PID" 2>/dev/null || true
  for _ in $(seq 300); do kill -0 "$HOLD_PID" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$HOLD_PID" 2>/dev/null || true
  wait "$HOLD_PID" 2>/dev/null || true
  HOLD_PID=""
}

# The veths' counters (ethtool -S) of both ends and the relay namespace's UDP counters
# (/proc/net/snmp) to $1, as "side.name value" lines.
veth_stats() {
  { ip netns exec "$NH" ethtool -S "$DH" | sed -n 's/^ *\([a-z_0-9]*\): \([0-9]*\)$/gen.\1 \2/p'
    ip netns exec "$NR" ethtool -S "$DR" | sed -n 's/^ *\([a-z_0-9]*\): \([0-9]*\)$/relay.\1 \2/p'
    ip netns exec "$NR" awk '$1 == "Udp:" { if (n++ == 0) split($0, k); else for (i = 2; i <= NF; i++) print "relay.udp_" k[i], $i }' /proc/net/snmp
  } >"$1"
}

# CPU time (ns, schedstat) of the relay's threads and of its veth's NAPI thread: the relay's own
# work, without what else ran on its CPU (but without interrupt and wake-up costs either).
relay_thread_ns() {
  local p
  for p in "$SERVER_PID" $(ps -e -o pid=,comm= | awk -v n="napi/$DR-" 'index($2, n) == 1 { print $1 }'); do
    cat /proc/"$p"/task/*/schedstat 2>/dev/null || true
  done | awk '{ s += $1 } END { printf "%.0f\n", s }'
}

# One xdp-gen run against $1, tagged $2, at rate $3 (frames/s or max) in bursts of $4, the
# relay CPU sampled; JSON to $LOGDIR/$1-gen-$2.json.
measure_gen() {
  local name=$1 kind=$2 rate=$3 burst=$4 base="$LOGDIR/$1-gen-$2"
  local argv=("$BIN/xdp-gen" --flows "$LOGDIR/$name.flows.json" --iface "$DH" --anchor "$DA" --dst-mac "$RELAY_MAC"
    --rate "$rate" --burst "$burst" --duration "$DURATION" --direction "$GEN_DIRECTION" --json)
  log "   \$ ${argv[*]}"
  veth_stats "$base.veth0"
  relay_thread_ns >"$base.threads0"
  start_sampler "$base.cpu"
  if ! timeout $((${DURATION%.*} + 60)) ip netns exec "$NH" taskset -c "$LOADGEN_CPU" "${argv[@]}" >"$base.json" 2>"$base.err"; then
    kill "$SAMPLER_PID" 2>/dev/null || true
    log "xdp-gen failed against $name:"; tail -5 "$base.err" >&2; exit 1
  fi
  kill "$SAMPLER_PID" 2>/dev/null || true
  wait "$SAMPLER_PID" 2>/dev/null || true
  veth_stats "$base.veth1"
  relay_thread_ns >"$base.threads1"
  python3 -c 'import json, sys
r = json.load(open(sys.argv[1]))
print("   offered {:,.0f}/s, delivered {:,.0f}/s, loss {:.4f}".format(r["offered_pps"], r["delivered_pps"], r["loss_ratio"]))' "$base.json" >&2
}

# Whether the ramp ends at run $1/$2: loss above --gen-max-loss, or the offered rate 5 % short
# of the request (the generator's limit).
gen_ramp_done() {
  python3 -c 'import json, sys
r = json.load(open(sys.argv[1]))
short = r["rate_requested_pps"] and r["offered_pps"] < 0.95 * r["rate_requested_pps"]
sys.exit(0 if r["loss_ratio"] > float(sys.argv[2]) or short else 1)' "$LOGDIR/$1-gen-$2.json" "$GEN_MAX_LOSS"
}

# All live-frames runs against server $1 (started): the equal load in each burst size, the
# ramp (last burst size), the open-loop maximum.
run_live_frames() {
  local name=$1 steps="" f rate b last=""
  start_hold "$name"
  IFS=, read -r -a BURSTS <<<"$GEN_BURST"
  for b in "${BURSTS[@]}"; do
    measure_gen "$name" "equal-b$b" "$GEN_RATE" "$b"
    last=$b
  done
  if [ -n "$GEN_RAMP" ] && ! gen_ramp_done "$name" "equal-b$last"; then
    IFS=, read -r -a FACTORS <<<"$GEN_RAMP"
    for f in "${FACTORS[@]}"; do
      rate=$(python3 -c 'import sys; print(int(float(sys.argv[1]) * float(sys.argv[2])))' "$GEN_RATE" "$f")
      measure_gen "$name" "ramp$rate" "$rate" "$last"
      steps="$steps ramp$rate"
      gen_ramp_done "$name" "ramp$rate" && break
    done
  fi
  echo "equal-b$last $steps" >"$LOGDIR/$name-gen-steps"
  measure_gen "$name" max max 1
  if [ "$PERF" = 1 ]; then
    perf record -C "$RELAY_CPU" -F 999 -g -o "$LOGDIR/$name.perf.data" -- sleep 600 >/dev/null 2>&1 &
    PERF_PID=$!
    measure_gen "$name" perf "$GEN_RATE" "$last"
    kill -INT "$PERF_PID" 2>/dev/null || true
    wait "$PERF_PID" 2>/dev/null || true
    perf_top "$name"
  fi
  stop_hold
}

# perf report of $LOGDIR/$1.perf.data: samples by command first (what else ran on the relay
# CPU: swapper is idle), then symbols.
perf_top() {
  { perf report -i "$LOGDIR/$1.perf.data" --no-children --sort comm -g none --stdio 2>/dev/null |
      grep -v '^#' | grep -v '^$' | head -8
    echo
    perf report -i "$LOGDIR/$1.perf.data" --no-children --sort comm,sym -g none --stdio 2>/dev/null |
      grep -v '^#' | grep -v '^$' | head -15; } >"$LOGDIR/$1.perf.top" || true
}

RELAY_MAC=$(ip netns exec "$NR" cat "/sys/class/net/$DR/address")

IFS=, read -r -a LIST <<<"$SERVERS"
log "== $(uptime)"
for name in "${LIST[@]}"; do
  log "== $name"
  start_server "$name"
  if [ "$GENERATOR" = live-frames ]; then
    run_live_frames "$name"
    stop_server
    continue
  fi
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
    perf_top "$name"
  fi
  stop_server
done

log "== report"
if [ "$GENERATOR" = live-frames ]; then
  python3 - "$LOGDIR" "$RELAY_CPU" "$PERF" "$OUT" "$(uptime)" "$GEN_RATE" "$GEN_MAX_LOSS" "$GEN_DIRECTION" "$GEN_BURST" "${LIST[@]}" <<'EOF'
import json, sys
logdir, cpu, perf, out, load = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4], sys.argv[5]
gen_rate, max_loss, direction, names = float(sys.argv[6]), float(sys.argv[7]), sys.argv[8], sys.argv[10:]
bursts = sys.argv[9].split(",")

def stats(path):
    d = {}
    for line in open(path):
        k, v = line.split()
        d[k] = int(v)
    return d

def load_run(name, kind):
    """xdp-gen's report of a run, with the relay CPU's busy share over the sending window
    (trimmed by 0.2 s at each end), ns of relay CPU per delivered packet, and veth counters."""
    base = f"{logdir}/{name}-gen-{kind}"
    try:
        r = json.load(open(f"{base}.json"))
    except (OSError, ValueError):
        return None
    lines = open(f"{base}.cpu").read().split("\n")
    r["cpu_source"] = lines[0].split()[1]
    pts = [tuple(map(float, l.split())) for l in lines[1:] if l.strip()]
    inside = [p for p in pts if r["t_start"] + 0.2 <= p[0] <= r["t_end"] - 0.2]
    r["busy"] = r["ns_per_pkt"] = None
    if len(inside) >= 2:
        (ta, ia), (tb, ib) = inside[0], inside[-1]
        wall = tb - ta
        r["busy"] = (wall - (ib - ia)) / wall
        if r["delivered_pps"]:
            r["ns_per_pkt"] = r["busy"] * 1e9 / r["delivered_pps"]
    try:
        # Over the whole run (the generator's seconds), not the trimmed window.
        t = int(open(f"{base}.threads1").read()) - int(open(f"{base}.threads0").read())
        r["thread_ns_per_pkt"] = t / r["delivered_frames"] if r["delivered_frames"] else None
    except (OSError, ValueError):
        r["thread_ns_per_pkt"] = None
    try:
        a, b = stats(f"{base}.veth0"), stats(f"{base}.veth1")
        d = lambda k: b.get(k, 0) - a.get(k, 0)
        r["relay_rx"] = d("relay.rx_queue_0_xdp_packets")
        # Where frames were lost: into the relay (its veth's ring full), in the relay's sockets
        # (receive buffer full), and out of it (send buffer full; XDP_TX into a full ring on
        # the loadgen side).
        r["drops"] = (d("gen.tx_queue_0_xdp_xmit_errors"), d("relay.udp_RcvbufErrors"),
                      d("relay.udp_SndbufErrors") + d("relay.rx_queue_0_xdp_tx_errors"))
    except (OSError, ValueError):
        r["relay_rx"] = r["drops"] = None
    return r

rows, sources = [], set()
for n in names:
    eqs = {b: load_run(n, f"equal-b{b}") for b in bursts}
    mx = load_run(n, "max")
    try:
        steps = open(f"{logdir}/{n}-gen-steps").read().split()
    except OSError:
        steps = []
    ramp = [r for r in (load_run(n, s) for s in steps) if r]
    ok = [r for r in ramp if r["loss_ratio"] <= max_loss]
    best = max(ok, key=lambda r: r["delivered_pps"]) if ok else None
    sources.update(r["cpu_source"] for r in ramp + [mx] + list(eqs.values()) if r)
    rows.append((n, eqs, mx, best))

def eff(r):
    return 1e9 / r["ns_per_pkt"] if r and r.get("ns_per_pkt") else None

bare = next((r for r in rows if r[0] == "bare"), None)
bare_eq = {b: eff(bare[1][b]) for b in bursts} if bare else {}
bare_thr = {b: bare[1][b] and bare[1][b]["thread_ns_per_pkt"] for b in bursts} if bare else {}
bare_best = eff(bare[3]) if bare else None
def f(v, fmt):
    return fmt.format(v) if v is not None else "-"
def pct(v):
    return f(v * 100 if v is not None else None, "{:.1f} %")
def ratio(a, b):
    return f"{a / b:.2f}x" if a and b else "-"
def drops(r):
    return " / ".join(f"{v:,}" for v in r["drops"]) if r and r.get("drops") else "-"

L = [f"Machine: {load.strip()}; relay CPU {cpu} (relay + its veth's NAPI thread), xdp-gen and the loadgen side's NAPI thread on the other.",
     f"NIC-like frames (BPF_PROG_RUN live frames, XDP_TX over the veth), direction {direction}; delivered = frames back at the loadgen side (one direction).",
     "",
     f"Equal offered load, {gen_rate:,.0f} frames/s, sent in bursts of B frames back to back (B = 1: evenly spaced):",
     "",
     "| relay | B | offered pkt/s | delivered pkt/s | loss | relay CPU busy | relay CPU ns/pkt | pkt per relay CPU-s | vs bare | relay threads ns/pkt (vs bare) | frames into relay veth | drops in / rcvbuf / out |",
     "|---|---|---|---|---|---|---|---|---|---|---|---|"]
for b in bursts:
    for n, eqs, mx, best in rows:
        eq = eqs[b]
        if not eq:
            L.append(f"| {n} | {b} | - | - | - | - | - | - | - | - | - | - |")
            continue
        L.append(f"| {n} | {b} | {eq['offered_pps']:,.0f} | {eq['delivered_pps']:,.0f} | {eq['loss_ratio']:.4f} | {pct(eq['busy'])} | "
                 f"{f(eq['ns_per_pkt'], '{:,.0f}')} | {f(eff(eq), '{:,.0f}')} | {ratio(eff(eq), bare_eq.get(b))} | "
                 f"{f(eq['thread_ns_per_pkt'], '{:,.0f}')} ({ratio(bare_thr.get(b), eq['thread_ns_per_pkt'])}) | "
                 f"{f(eq['relay_rx'], '{:,}')} | {drops(eq)} |")
L += ["",
      f"Highest delivered rate with loss <= {max_loss} over the ramp of offered rates (bursts of {bursts[-1]}), and the open-loop run (generator flat out: overload):",
      "",
      "| relay | max delivered pkt/s (loss <= limit) | offered | loss | relay CPU busy | relay CPU ns/pkt (cpuidle / threads) | pkt per relay CPU-s vs bare | drops in / rcvbuf / out | open loop: offered pkt/s | delivered pkt/s | loss | relay CPU busy | ns/pkt (cpuidle / threads) |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
def both(r):
    return f"{f(r.get('ns_per_pkt'), '{:,.0f}')} / {f(r.get('thread_ns_per_pkt'), '{:,.0f}')}"
for n, eqs, mx, best in rows:
    b, m = best or {}, mx or {}
    L.append(f"| {n} | {f(b.get('delivered_pps'), '{:,.0f}')} | {f(b.get('offered_pps'), '{:,.0f}')} | {f(b.get('loss_ratio'), '{:.4f}')} | "
             f"{pct(b.get('busy'))} | {both(b)} | {ratio(eff(best), bare_best)} | {drops(best)} | "
             f"{f(m.get('offered_pps'), '{:,.0f}')} | {f(m.get('delivered_pps'), '{:,.0f}')} | {f(m.get('loss_ratio'), '{:.4f}')} | "
             f"{pct(m.get('busy'))} | {both(m)} |")
L.append("")
if "procstat" in sources:
    L.append("Relay CPU from /proc/stat's idle column (no cpuidle here): 10 ms steps, tick-sampled; treat ns/pkt as rough.")
else:
    L.append("Relay CPU: the relay CPU's busy time from its cpuidle residency over the sending window: everything that ran there "
             "(relay process, its veth's NAPI thread with XDP, softirqs, wake-ups), per delivered packet.")
L.append("'relay threads ns/pkt': run time (schedstat) of the relay's threads and its veth's NAPI thread per delivered packet: "
         "robust to other load on the machine, but blind to interrupt and idle-exit costs.")
L.append("Drops: 'in' = frames the relay veth's 256-entry ring refused (xdp_xmit errors at the sending end), 'rcvbuf' = "
         "datagrams the relay's sockets had no room for, 'out' = the relay's send-buffer failures plus XDP_TX into the loadgen "
         "side's full ring. The ramp stops at the first rate with more loss than the limit, or where the generator falls 5 % short.")
if perf:
    for n in names:
        try:
            top = open(f"{logdir}/{n}.perf.top").read().strip()
        except OSError:
            continue
        L += ["", f"perf record -C {cpu}, {n} (equal load): samples by command, then top symbols", "```", top, "```"]
text = "\n".join(L)
print(text)
if out:
    open(out, "w").write(text + "\n")
EOF
  exit 0
fi
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
