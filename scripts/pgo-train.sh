#!/usr/bin/env bash
# The training load of scripts/pgo-build.sh: PROXY (a claude-proxy binary) in each cache mode,
# with two keys, in front of the built-in simulator served over HTTP (LOADGEN mock, no
# latency), driven by LOADGEN run: 2 KB and 200-byte prompts, one and 32 connections, JSON
# and SSE answers, misses and hits, two models; then with a tenants file (two teams at once)
# and, when redis-server is installed, with the quota and the cache in Redis. Every request
# must succeed and every proxy must shut down cleanly on SIGINT (an instrumented binary writes
# its profile at exit).
#
#   scripts/pgo-train.sh PROXY LOADGEN
#
# Environment: TRAIN_SECONDS (per load, default 2); LLVM_PROFILE_FILE is passed on to the
# proxy. CI runs it against the debug builds (TRAIN_SECONDS=1) so that the training cannot
# break unnoticed.
set -euo pipefail
proxy_bin=$(realpath "${1:?usage: scripts/pgo-train.sh PROXY LOADGEN}")
loadgen=$(realpath "${2:?usage: scripts/pgo-train.sh PROXY LOADGEN}")
d="${TRAIN_SECONDS:-2}s"

cd "$(dirname "$0")/.."
# shellcheck source=scripts/bench-upstream.sh
. scripts/bench-upstream.sh
bench_setup

mport=$(free_port)
"$loadgen" mock --listen "127.0.0.1:$mport" --output-tokens 40 > "$work/mock.log" 2>&1 &
pids+=($!)
wait_port "$mport" 400
# Two teams sharing the quota (the fair queue, budgets): clients send their tokens.
cat > "$work/tenants.toml" << 'TOML'
[[tenant]]
name = "web"
tokens = ["tok-train-web"]
weight = 3
[tenant.budget]
usd_per_day = 1000000.0

[[tenant]]
name = "batch"
tokens = ["tok-train-batch"]
priority = "batch"
TOML
# One thread runs Tokio's current-thread scheduler, more its multi-threaded one (src/bin/
# claude-proxy/main.rs): both are trained, or the one left out is laid out as cold code.
configs=("--cache-mode off" "--cache-mode off --worker-threads 1"
  "--cache-mode all --cache-path memory" "--cache-mode all --cache-path $work/cache1.redb --worker-threads 1"
  "--cache-mode all --cache-path $work/cache.redb" "--cache-mode deterministic --cache-path $work/cache.redb"
  "--cache-mode deterministic --cache-path memory --tenants-file $work/tenants.toml")
# Quota and cache in Redis, when a redis-server is there to start (a path left out of the
# training is laid out as cold code).
if command -v redis-server > /dev/null; then
  rport=$(free_port)
  redis-server --port "$rport" --bind 127.0.0.1 --save '' --appendonly no > "$work/redis.log" 2>&1 &
  pids+=($!)
  wait_port "$rport" 400
  configs+=("--cache-mode all --redis-url redis://127.0.0.1:$rport/ --expected-nodes 2")
else
  echo "pgo-train: no redis-server: the Redis quota and cache are left out of the training" >&2
fi
for flags in "${configs[@]}"; do
  port=$(free_port)
  # shellcheck disable=SC2086 # the flags are words
  env -u ANTHROPIC_API_KEY RUST_LOG=warn "$proxy_bin" \
    --listen "127.0.0.1:$port" --upstream "http://127.0.0.1:$mport" \
    --api-keys sk-ant-train-1,sk-ant-train-2 $flags > "$work/proxy.log" 2>&1 &
  proxy=$!
  pids+=("$proxy")
  wait_port "$port" 400
  url="http://127.0.0.1:$port"
  key=sk-ant-train
  [[ "$flags" == *--tenants-file* ]] && key=tok-train-web
  run() {
    if ! "$loadgen" run --url "$url" --warmup 0s -d "$d" --json --api-key "$key" "$@" > "$work/run.json" 2>&1; then
      echo "pgo-train: loadgen run $* through claude-proxy $flags failed:" >&2
      cat "$work/run.json" >&2
      tail -20 "$work/proxy.log" >&2
      exit 1
    fi
  }
  run -c 1 --prompt-bytes 2000
  run -c 32 --prompt-bytes 2000
  run -c 32 --prompt-bytes 200 --model claude-sonnet-4-5 --temperature 0
  run -c 8 --stream --prompt-bytes 2000
  run -c 8 --same-body --temperature 0 --prompt-bytes 2000
  run -c 8 --same-body --temperature 0 --stream
  if [[ "$flags" == *--tenants-file* ]]; then
    # Both teams at once: the batch team's requests wait behind the web team's.
    (key=tok-train-batch run -c 16 --prompt-bytes 2000) &
    batch=$!
    run -c 16 --prompt-bytes 2000
    wait "$batch"
  fi
  # SIGINT: a graceful shutdown, so an instrumented proxy writes its profile at exit.
  kill -INT "$proxy"
  if ! wait "$proxy"; then
    echo "pgo-train: claude-proxy $flags did not exit cleanly on SIGINT:" >&2
    tail -20 "$work/proxy.log" >&2
    exit 1
  fi
  echo "pgo-train: trained with $flags" >&2
done
