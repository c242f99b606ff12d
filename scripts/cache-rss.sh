#!/usr/bin/env bash
# Resident size of claude-proxy after N distinct requests (issue 13: the cache's memory bound).
#
#   scripts/cache-rss.sh                                   # 1M requests, memory store
#   N=1000000 FLAGS="--cache-mode all" scripts/cache-rss.sh # the disk store (file size too)
#   PROXY_BIN=/tmp/old/claude-proxy scripts/cache-rss.sh   # another build
#
# What runs, on 127.0.0.1 with free ports, stopped by pid when the script ends: the nginx
# upstream of scripts/bench-upstream.sh (a static 580-byte answer) and the proxy with FLAGS in
# an empty directory. 200 requests at 4 connections first (the base), then N distinct ~2 KB
# requests at 32 connections from the load generator; RSS (VmRSS, VmHWM from /proc/PID/status)
# after each, and the size of the disk cache file if there is one.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/bench-upstream.sh
. scripts/bench-upstream.sh

N="${N:-1000000}"
FLAGS="${FLAGS:---cache-mode all --cache-path memory}"
TARGET_DIR="${CARGO_TARGET_DIR:-target}"
PROXY_BIN="${PROXY_BIN:-}"
proxy_bin
cargo build -q --release --features proxy --example loadgen
LOADGEN="$(realpath "$TARGET_DIR/release/examples/loadgen")"

bench_setup
start_upstream

port=$(free_port)
mkdir -p "$work/proxy"
# shellcheck disable=SC2086
(cd "$work/proxy" && exec env -u ANTHROPIC_API_KEY -u ANTHROPIC_API_KEYS RUST_LOG=warn \
    "$PROXY_BIN" --listen "127.0.0.1:$port" --upstream "http://127.0.0.1:$up_port" $FLAGS \
    >"$work/proxy/log" 2>&1) &
pid=$!
pids+=("$pid")
wait_port "$port"

rss() { grep -E 'VmRSS|VmHWM' "/proc/$pid/status" | tr -s ' \t' ' ' | tr '\n' ' '; }
"$LOADGEN" run --url "http://127.0.0.1:$port" -c 4 -n 200 -d 60s --warmup 0s --prompt-bytes 2000 >/dev/null
sleep 1
echo "claude-proxy $FLAGS: $PROXY_BIN"
echo "base: $(rss)"
"$LOADGEN" run --url "http://127.0.0.1:$port" -c 32 -n "$N" -d 1800s --warmup 0s --prompt-bytes 2000
sleep 3
echo "after $N requests: $(rss)"
find "$work/proxy" -name '*.redb' -printf 'cache file %p: %s bytes\n'
