#!/usr/bin/env bash
# Where one connection's time goes, request by request: the proxy's request side, the
# upstream's turn, the answer side and the client's turn, from the timestamps of the proxy's
# own system calls (perf tracepoints: far less overhead than strace). With SCHED=1 also which
# process held each CPU in each window (sched_switch on every CPU: idle time there is wake-up
# latency, not work). Linux `perf` needed (Debian: linux-perf) and permission to trace.
#
#   scripts/latency-split.sh                                   # release proxy, --cache-mode off
#   CONFIGS="off:--cache-mode off;floor@target/release/examples/hyper_floor:--own-pool" \
#     PROXY_BIN=/tmp/x/claude-proxy SCHED=1 DURATION=2 scripts/latency-split.sh
#
# Each configuration in turn: the nginx upstream of scripts/bench-proxy.sh, the proxy on a free
# loopback port, `wrk -t1 -c1` with distinct ~2 KB prompts (benches/proxy/distinct.lua) for
# DURATION seconds after a one-second warm-up, recorded by `perf record`; then
# benches/proxy/latency_split.py prints the median of each window (docs/benchmarks.md, "One
# connection, window by window").
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/bench-upstream.sh
. scripts/bench-upstream.sh

DURATION="${DURATION:-2}"
CONFIGS="${CONFIGS:-off:--cache-mode off}"
need_tools nginx wrk perf python3
proxy_bin
bench_setup
start_upstream
events="syscalls:sys_enter_recvfrom,syscalls:sys_exit_recvfrom,syscalls:sys_enter_writev"
IFS=';' read -ra entries <<<"$CONFIGS"
for entry in "${entries[@]}"; do
  parse_config "$entry"
  port=$(free_port)
  # shellcheck disable=SC2086 # flags are words
  env -u ANTHROPIC_API_KEY RUST_LOG=warn "$bin" --listen "127.0.0.1:$port" --upstream "http://127.0.0.1:$up_port" \
    $flags >"$work/$name.log" 2>&1 &
  pid=$!
  pids+=("$pid")
  wait_port "$port"
  url="http://127.0.0.1:$port/v1/messages"
  wrk -t1 -c1 -d1s -s benches/proxy/distinct.lua "$url" >/dev/null
  if [ -n "${SCHED:-}" ]; then
    perf record -q -a -e "sched:sched_switch,$events" -o "$work/$name.data" >/dev/null 2>&1 &
  else
    perf record -q -e "$events" -p "$pid" -o "$work/$name.data" >/dev/null 2>&1 &
  fi
  rec=$!
  sleep 0.5
  wrk -t1 -c1 -d"${DURATION}s" -s benches/proxy/distinct.lua "$url" | awk '/Latency/ {print "  wrk latency avg " $2}'
  kill -INT "$rec"
  wait "$rec" || true
  kill "$pid"
  wait "$pid" 2>/dev/null || true
  perf script -i "$work/$name.data" >"$work/$name.txt" 2>/dev/null
  python3 benches/proxy/latency_split.py "$work/$name.txt" "$name" ${SCHED:+--sched}
done
