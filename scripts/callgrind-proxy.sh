#!/usr/bin/env bash
# Instructions per request of claude-proxy, with callgrind: the proxy runs under
# `valgrind --tool=callgrind` in front of the nginx upstream of `scripts/bench-proxy.sh`
# (a static Anthropic answer with `anthropic-ratelimit-*` headers, at once), and a Python
# client sends WARMUP + REQUESTS distinct 2 KB prompts over one keep-alive connection.
#
#   scripts/callgrind-proxy.sh                                  # release build, --cache-mode off
#   PROXY_BIN=/tmp/old/claude-proxy scripts/callgrind-proxy.sh  # another build
#   PROXY_ARGS="--cache-mode all --cache-path memory" scripts/callgrind-proxy.sh
#   TOP=40 KEEP_WORK=1 scripts/callgrind-proxy.sh               # more functions, keep the output
#   PROXY_BIN=target/release/examples/hyper_floor PROXY_ARGS= scripts/callgrind-proxy.sh
#                          # the floor: the bare hyper proxy of examples/hyper_floor.rs (build it
#                          # with cargo build --release --features proxy --example hyper_floor)
#
# Prints the whole process's instructions (start-up and shut-down included, as in
# docs/benchmarks.md) divided by the number of requests sent, then the functions with the most
# inclusive instructions per request (`callgrind_annotate --inclusive=yes`). Instruction counts
# do not depend on the machine's load, unlike wall time: compare builds with them.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/bench-upstream.sh
. scripts/bench-upstream.sh

WARMUP="${WARMUP:-300}"
REQUESTS="${REQUESTS:-2000}"
TOP="${TOP:-25}"
PROXY_ARGS="${PROXY_ARGS:---cache-mode off}"
TARGET_DIR="${CARGO_TARGET_DIR:-target}"
PROXY_BIN="${PROXY_BIN:-}"

need_tools nginx valgrind callgrind_annotate python3
proxy_bin

bench_setup

start_upstream

port=$(free_port)
# shellcheck disable=SC2086
(cd "$work" && exec env -u ANTHROPIC_API_KEY -u ANTHROPIC_API_KEYS RUST_LOG="${PROXY_LOG:-warn}" \
  valgrind --tool=callgrind --callgrind-out-file="$work/callgrind.out" \
  "$PROXY_BIN" --listen "127.0.0.1:$port" --upstream "http://127.0.0.1:$up_port" $PROXY_ARGS \
  >"$work/proxy.log" 2>&1) &
proxy=$!
pids+=($proxy)
wait_port "$port" 600

# One keep-alive connection, distinct 2 KB prompts (the wrk script's body, bench-proxy.sh).
python3 - "$port" "$WARMUP" "$REQUESTS" <<'EOF'
import http.client, json, sys
port, warmup, count = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
pad = "lorem ipsum dolor sit amet " * 70
headers = {"content-type": "application/json", "anthropic-version": "2023-06-01",
           "x-api-key": "sk-bench"}
for i in range(warmup + count):
    body = json.dumps({"model": "claude-sonnet-4-6", "max_tokens": 256,
                       "messages": [{"role": "user", "content": f"task {i} {pad}"}]})
    conn.request("POST", "/v1/messages", body, headers)
    resp = conn.getresponse()
    resp.read()
    if resp.status != 200:
        sys.exit(f"request {i}: status {resp.status}")
EOF

# Graceful shutdown: callgrind writes its output when the proxy exits.
kill -TERM "$proxy"
wait "$proxy" || true
total=$(callgrind_annotate "$work/callgrind.out" 2>/dev/null | awk '/PROGRAM TOTALS/ && !done {gsub(",", "", $1); print $1; done = 1}')
sent=$((WARMUP + REQUESTS))
echo "claude-proxy: $PROXY_BIN $PROXY_ARGS"
echo "instructions: $total for $sent requests = $((total / sent)) per request (whole process)"
echo
echo "inclusive instructions per request, top $TOP:"
callgrind_annotate --inclusive=yes --threshold=100 "$work/callgrind.out" 2>/dev/null |
  awk -v n="$sent" -v top="$TOP" '
    /^-+$/ { sep++; next }
    sep >= 4 && $1 ~ /^[0-9,]+$/ && shown < top {
      ir = $1; gsub(",", "", ir); $1 = ""; sub(/^ +\([^)]*\) +/, ""); sub(/^ +/, "")
      printf "%10.0f  %s\n", ir / n, substr($0, 1, 150); shown++
    }'
