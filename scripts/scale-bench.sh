#!/usr/bin/env bash
# Scale scenario (issue 12): the simulator served over HTTP in real time with per-key limits
# (RPM 120 / ITPM 40k / OTPM 8k per key and model family), N claude-proxy nodes (release
# build) holding M keys, a redis-server on a free loopback port when N > 1, and K client
# fleets of 16 concurrent Opus tasks (100-500 input tokens, ~60 output, max_tokens
# 300-1500). Prints, per configuration: tasks ok / failed, upstream 429s, elapsed against the
# ideal computed from the limits, and each fleet's finish time.
#
#   scripts/scale-bench.sh                 # every configuration
#   ONLY="1n2k 2n2k" scripts/scale-bench.sh
#   PROXY_BIN=/tmp/claude-proxy-old scripts/scale-bench.sh   # another proxy binary
#   LATENCY=0ms ONLY=1n1k scripts/scale-bench.sh  # answers at once (default: 500 ms)
#   STALL=5:0.4 ONLY=2n2k scripts/scale-bench.sh  # Redis stalls 0.4 s, 5 s into the run
#                                                 # (DEBUG SLEEP: every node's calls time out)
#
# The ideal printed is the request limit's: (tasks - keys x 120) / (keys x 2/s). The output
# bucket (max_tokens reserved against 8k a minute) binds too: a client that knew the server's
# buckets exactly and served in arrival order would need about 41 s where this ideal says 40
# (scripts/fifo-bound.py; with `--harness`, for the exact tasks these fleets send: 41.24 s
# with 2 keys; the proxy ~0.5 s more, in process too: docs/benchmarks.md, fifth pass). The same
# scenario runs in process on a paused clock in `examples/scale_sim.rs` (deterministic;
# `tests/scale.rs`).
#
# `raise` also prints the time from the first answer that carries the raised limits (the
# simulator logs when it admitted the first request under them) against an exact client's.
#
# With RUST_LOG=info,tower_claude::rate_limit=debug the nodes log every admission, and each
# configuration with several fleets also prints the first 40 admissions by node and the
# largest lead of one node over another after them (the logs stay in the directory printed
# at the end).
#
# Everything binds 127.0.0.1, runs bounded in time and is stopped by pid.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${NO_BUILD:-}" ]; then
  cargo build -q --release --features proxy --bin claude-proxy --example loadgen
fi
B=${CARGO_TARGET_DIR:-target}/release
PROXY_BIN=${PROXY_BIN:-$B/claude-proxy}
LOADGEN=${LOADGEN:-$B/examples/loadgen}
ONLY=${ONLY:-"1n1k 1n2k 2n2k 4n4k raise"}
TASKS=${TASKS:-200}          # per fleet
LATENCY=${LATENCY:-500ms}    # upstream answer time
STALL=${STALL:-}             # AT_S:SLEEP_S: redis-cli DEBUG SLEEP SLEEP_S, AT_S into the run
D=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  [ -f "$D/redis.pid" ] && kill "$(cat "$D/redis.pid")" 2>/dev/null || true
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }
wait_port() { for _ in $(seq 1 100); do (echo > /dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 not up" >&2; return 1; }

echo "proxy: $PROXY_BIN"
printf '%-6s %6s %5s %6s %6s %9s %9s %6s  %s\n' config tasks ok failed 429s elapsed ideal ratio "fleets (s)"

# run NAME NODES KEYS FLEETS [RAISE_AFTER_S]
run() {
  local name=$1 nodes=$2 keys=$3 fleets=$4 raise=${5:-}
  local mport; mport=$(free_port)
  local limits="120,40000,8000" rpm=120 cap2=0
  local mock_args=(mock --listen 127.0.0.1:$mport --output-tokens 60 --latency "$LATENCY")
  if [ -n "$raise" ]; then
    limits="60,40000,8000"; rpm=60; cap2=240
    mock_args+=(--raise-after "${raise}s" --raise-to "240,160000,32000")
  fi
  mock_args+=(--limits "$limits")
  "$LOADGEN" "${mock_args[@]}" 2> "$D/$name.mock.log" &
  local mock=$!; PIDS+=("$mock")
  wait_port "$mport"
  local redis_args=() rport=
  if [ "$nodes" -gt 1 ]; then
    rport=$(free_port)
    redis-server --port "$rport" --bind 127.0.0.1 --save '' --appendonly no --enable-debug-command local \
      --daemonize yes --pidfile "$D/redis.pid" > /dev/null
    wait_port "$rport"
    redis_args=(--redis-url "redis://127.0.0.1:$rport/" --expected-nodes "$nodes")
  fi
  local keylist; keylist=$(seq -f "sk-ant-scale-%g" 1 "$keys" | paste -sd, -)
  local ports=() nodepids=()
  for n in $(seq 1 "$nodes"); do
    local p; p=$(free_port)
    "$PROXY_BIN" --listen 127.0.0.1:$p --upstream http://127.0.0.1:$mport \
      --api-keys "$keylist" --cache false --fallback false "${redis_args[@]}" \
      2> "$D/$name.node$n.log" &
    nodepids+=($!); PIDS+=($!)
    ports+=("$p")
  done
  for p in "${ports[@]}"; do wait_port "$p"; done
  local start_ms=$(( $(date +%s%3N) + 1000 ))
  local fpids=()
  for f in $(seq 1 "$fleets"); do
    local p=${ports[$(( (f - 1) % nodes ))]}
    "$LOADGEN" fleet --url "http://127.0.0.1:$p" --tasks "$TASKS" -c 16 \
      --start-at-ms "$start_ms" --seed "$f" --label "f$f" > "$D/$name.fleet$f.json" &
    fpids+=($!)
  done
  if [ -n "$STALL" ] && [ -n "$rport" ]; then
    # A stalled Redis (a loaded machine, a slow command): every node's calls time out.
    ( sleep "$(python3 -c "print(max(0, $start_ms / 1000 + ${STALL%%:*} - $(date +%s%3N) / 1000))")"
      redis-cli -p "$rport" DEBUG SLEEP "${STALL##*:}" > /dev/null ) &
  fi
  for p in "${fpids[@]}"; do wait "$p" || true; done
  for p in "${nodepids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  kill -INT "$mock" 2>/dev/null || true; wait "$mock" 2>/dev/null || true
  if [ -f "$D/redis.pid" ]; then kill "$(cat "$D/redis.pid")" 2>/dev/null || true; rm -f "$D/redis.pid"; sleep 0.2; fi
  python3 - "$D" "$name" "$fleets" "$keys" "$rpm" "$TASKS" "${raise:-0}" "$cap2" "$LATENCY" <<'PY'
import json, re, sys
d, name, fleets, keys, rpm, tasks, raise_s, cap2, latency = sys.argv[1:]
fleets, keys, rpm, tasks, raise_s, cap2 = int(fleets), int(keys), int(rpm), int(tasks), float(raise_s), int(cap2)
rows = [json.load(open(f"{d}/{name}.fleet{f}.json")) for f in range(1, fleets + 1)]
ok = sum(r["ok"] for r in rows); failed = sum(r["failed"] for r in rows)
n = fleets * tasks
log = open(f"{d}/{name}.mock.log").read()
m = re.search(r"(\d+) refused with 429", log)
r429 = int(m.group(1)) if m else -1
elapsed = max(r["elapsed_s"] for r in rows)
if cap2:
    # rpm per minute until the raise (from a full bucket), then cap2 with the extra
    # capacity available at once.
    done_before = rpm + raise_s * rpm / 60
    ideal = raise_s + max(0.0, n - done_before - (cap2 - rpm)) / (cap2 / 60)
else:
    ideal = max(0.0, n - keys * rpm) / (keys * rpm / 60)
finish = " ".join(f"{r['elapsed_s']:.1f}" for r in rows)
extra = ""
if cap2:
    extra = f"  after the raise: {elapsed - raise_s:.1f} s vs {ideal - raise_s:.1f} s ideal ({(elapsed - raise_s) / (ideal - raise_s):.2f}x)"
    # The target counts from the first answer that carries the raise: the first request the
    # simulator admitted under the new limits, answered a latency later. No client can use
    # the raise before; an exact one still ends its admissions at the ideal (the extra
    # quota waits in the bucket), and its last answer comes a latency after that.
    m = re.search(r"first request under the raised limits admitted ([0-9.]+) s", log)
    lat = float(re.sub(r"ms$", "", latency)) / 1000 if latency.endswith("ms") else float(latency.rstrip("s"))
    if m:
        first = raise_s + float(m.group(1)) + lat
        extra += (f"; from the first answer carrying it ({first:.1f} s): {elapsed - first:.1f} s"
                  f" vs {ideal + lat - first:.1f} s for an exact client ({(elapsed - first) / (ideal + lat - first):.3f}x)")
if fleets > 1:
    ts = [r["elapsed_s"] for r in rows]
    extra += f"  fleet spread {100 * (max(ts) - min(ts)) / max(ts):.1f} %"
import glob
outages = sum(open(f).read().count("Redis unreachable") for f in glob.glob(f"{d}/{name}.node*.log"))
if outages:
    extra += f"  Redis outages seen by the nodes: {outages}"
# With the debug log (RUST_LOG=info,tower_claude::rate_limit=debug) each node logs one line
# per admission: the first 40 admissions by node (the node that learns the limits used to
# take more) and the largest lead of one node over another after them.
adm = []
for f in glob.glob(f"{d}/{name}.node*.log"):
    node = int(re.search(r"node(\d+)", f).group(1))
    adm += [(line[:27], node) for line in open(f) if "admitted with the quota the key pool took" in line]
if adm and fleets > 1:
    adm.sort()
    nodes = sorted({a[1] for a in adm})
    first = [sum(1 for a in adm[:40] if a[1] == n) for n in nodes]
    count, lead = {n: 0 for n in nodes}, 0
    for i, (_, node) in enumerate(adm):
        count[node] += 1
        if i >= 40:
            lead = max(lead, max(count.values()) - min(count.values()))
    extra += f"  first 40 by node {'/'.join(map(str, first))}, lead after them {lead}"
print(f"{name:<6} {n:>6} {ok:>5} {failed:>6} {r429:>6} {elapsed:>8.1f}s {ideal:>8.1f}s {elapsed / ideal:>5.2f}x  {finish}{extra}")
PY
}

for c in $ONLY; do
  case $c in
    1n1k) run 1n1k 1 1 1 ;;
    1n2k) run 1n2k 1 2 2 ;;
    2n2k) run 2n2k 2 2 2 ;;
    4n4k) run 4n4k 4 4 4 ;;
    raise) TASKS=${RAISE_TASKS:-300} run raise 1 1 1 10 ;;
    *) echo "unknown configuration $c" >&2 ;;
  esac
done
echo "logs: $D"
