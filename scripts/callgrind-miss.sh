#!/usr/bin/env bash
# Instructions per request of claude-proxy on cache misses, counted by callgrind: the reliable
# before/after comparison on a shared machine (wall clock is not; see docs/benchmarks.md,
# "Cache misses and cache memory", third pass).
#
#   scripts/callgrind-miss.sh                      # build the release proxy, default configs
#   PROXY_CONFIGS="off:--cache-mode off;old-off@/tmp/old/claude-proxy:--cache-mode off" \
#     scripts/callgrind-miss.sh                    # NAME@BINARY: that config with another build
#   WARMUP=300 COUNT=2000 KEEP_WORK=1 scripts/callgrind-miss.sh
#   FLOOR=1 scripts/callgrind-miss.sh              # and a last row: examples/hyper_floor.rs,
#                                                  # the bare hyper proxy (FLOOR_BIN=PATH: a build)
#   SIM=1 scripts/callgrind-miss.sh                # also each row's footprint (below)
#   SIM=1 TOP=20 scripts/callgrind-miss.sh         # and the functions with the most of it
#   WORKERS=auto scripts/callgrind-miss.sh         # each proxy with its default thread count
#
# WORKERS (default 1, as scripts/bench-proxy.sh): `--worker-threads WORKERS` for each proxy whose
# binary has the option (TOKIO_WORKER_THREADS for older builds and for the floor); one worker
# thread runs Tokio's current-thread scheduler, so one thread serves every request. `auto`:
# Tokio's default threads (the setting's absence). Callgrind counts each thread apart
# (`--separate-threads=yes`): the row's headline is the busiest thread (the serving thread, with
# WORKERS=1), then the other threads together (the disk store's writer, Tokio's blocking pool)
# and the whole process.
#
# What runs, on 127.0.0.1 with free ports, stopped by pid when the script ends:
#   upstream  nginx answering POST /v1/messages at once with the static answer and the
#             `anthropic-ratelimit-*` headers of scripts/bench-proxy.sh;
#   proxy     each configuration in turn, under `valgrind --tool=callgrind`, in an empty
#             directory (the disk cache file is created there).
# For each configuration, benches/proxy/drive.py sends WARMUP distinct ~2 KB requests over one
# keep-alive connection, the counters are zeroed (`callgrind_control -z`), COUNT more distinct
# requests follow, the script waits SETTLE seconds (the write-behind task commits what is queued,
# so background writes are counted) and dumps the counters (`callgrind_control -d`), then stops
# the proxy. Printed: instructions per request (counted from the zeroing to the dump, / COUNT:
# steady state, start-up and shut-down excluded) of the busiest thread, the ratio of that to the
# first row's, the other threads' and the whole process's.
#
# SIM=1 runs each configuration under callgrind's cache and branch simulation instead (one run
# per row: the instruction counts are the same events, but the simulated proxy runs about
# twice as slowly, so the disk store's batches are smaller and its row moves, see
# docs/benchmarks.md, "Where a disk-store miss goes") and prints under each row, per request
# (the busiest thread from the zeroing to the dump, / COUNT: the background writer's and other
# threads' misses are not in it): I1 misses, D1 read and write misses, mispredicted conditional and
# indirect branches, and the locked read-modify-write instructions executed (of the binary's
# own code: `Arc` clones and drops, mutexes, atomics, wake-ups; scripts/callgrind-footprint.py,
# whose meaning scripts/callgrind-stack.sh's header explains). With TOP=N, the N functions with
# the most locked instructions and the most I1 / D1 misses per request follow. The machine's
# cache sizes as valgrind detects them; compare rows, not absolute cycles.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/bench-upstream.sh
. scripts/bench-upstream.sh

WARMUP="${WARMUP:-300}"
COUNT="${COUNT:-2000}"
SETTLE="${SETTLE:-2}"
TARGET_DIR="${CARGO_TARGET_DIR:-target}"
PROXY_BIN="${PROXY_BIN:-}"
PROXY_CONFIGS="${PROXY_CONFIGS:-off:--cache-mode off;memory-all:--cache-mode all --cache-path memory;disk-all:--cache-mode all}"
WORKERS="${WORKERS:-1}"
if [ "$WORKERS" != auto ] && ! [[ "$WORKERS" =~ ^[1-9][0-9]*$ ]]; then
  echo "WORKERS must be a positive number or auto, not \`$WORKERS\`" >&2
  exit 2
fi

TOP="${TOP:-0}"
SIM_FLAGS=()
need_tools nginx valgrind callgrind_control python3
if [ -n "${SIM:-}" ]; then
  need_tools objdump callgrind_annotate
  SIM_FLAGS=(--cache-sim=yes --branch-sim=yes --dump-instr=yes --compress-pos=no)
fi
proxy_bin
if [ "${FLOOR:-0}" = 1 ]; then
  if [ -z "${FLOOR_BIN:-}" ]; then
    cargo build -q --release --features proxy --example hyper_floor
    FLOOR_BIN="$TARGET_DIR/release/examples/hyper_floor"
  fi
  # The floor takes --listen and --upstream, as the proxy; no flags.
  PROXY_CONFIGS="$PROXY_CONFIGS;floor@$FLOOR_BIN:"
fi
DRIVE="$(realpath benches/proxy/drive.py)"

bench_setup

start_upstream 1200

echo "claude-proxy: $PROXY_BIN; $WARMUP warm-up + $COUNT counted distinct requests per row"
if [ "$WORKERS" = auto ]; then
  echo "WORKERS=auto: Tokio's default threads"
else
  echo "WORKERS=$WORKERS: --worker-threads $WORKERS (TOKIO_WORKER_THREADS=$WORKERS without the option)"
fi
echo "instructions per request: the busiest thread (x_first: / the first row's), the others, the process"
printf '%-24s %14s %10s %12s %14s %8s\n' config busiest x_first others process threads
first=""
IFS=';' read -r -a configs <<<"$PROXY_CONFIGS"
for entry in "${configs[@]}"; do
  parse_config "$entry"
  port=$(free_port)
  dir="$work/proxy-$name"
  mkdir -p "$dir"
  # Its threads, as scripts/bench-proxy.sh sets them: --worker-threads WORKERS, or
  # TOKIO_WORKER_THREADS for a build without the option (the floor); none with `auto` or when
  # its flags set --worker-threads themselves.
  opt_threads=()
  thread_env=(-u TOKIO_WORKER_THREADS)
  if [ "$WORKERS" != auto ] && [[ " $flags " != *" --worker-threads "* ]]; then
    if "$bin" --help 2>/dev/null | grep -q -- '--worker-threads'; then
      opt_threads=(--worker-threads "$WORKERS")
    else
      thread_env=(TOKIO_WORKER_THREADS="$WORKERS")
    fi
  fi
  # shellcheck disable=SC2086
  (cd "$dir" && exec env -u ANTHROPIC_API_KEY -u ANTHROPIC_API_KEYS "${thread_env[@]}" RUST_LOG=warn \
      valgrind --tool=callgrind --separate-threads=yes "${SIM_FLAGS[@]}" \
      --callgrind-out-file="$dir/callgrind.out" \
      "$bin" --listen "127.0.0.1:$port" --upstream "http://127.0.0.1:$up_port" \
      "${opt_threads[@]}" $flags >"$dir/log" 2>&1) &
  pid=$!
  pids+=("$pid")
  wait_port "$port" 1200
  python3 "$DRIVE" "$port" "$WARMUP" 0
  callgrind_control -z "$pid" >/dev/null 2>&1
  python3 "$DRIVE" "$port" "$COUNT" "$WARMUP"
  # Let the background writer commit its last batches (its linger is milliseconds), then
  # dump: steady state, without the shut-down (closing a redb file costs a fixed ~20M).
  sleep "$SETTLE"
  callgrind_control -d "$pid" >/dev/null 2>&1
  kill -TERM "$pid"
  wait "$pid" || true
  # One file per thread for the dump (callgrind.out.N-TT); the busiest is the headline.
  busiest=0 all=0 threads=0 dump=""
  for f in "$dir"/callgrind.out.*; do
    [ -e "$f" ] || continue
    t=$(sed -n 's/^summary: *\([0-9]*\).*/\1/p' "$f" | tail -1)
    [ -n "$t" ] || t=$(sed -n 's/^totals: *\([0-9]*\).*/\1/p' "$f" | tail -1)
    [ -n "$t" ] || continue
    all=$((all + t))
    threads=$((threads + 1))
    if [ "$t" -gt "$busiest" ]; then busiest=$t dump=$f; fi
  done
  if [ "$threads" = 0 ]; then
    echo "$name: no callgrind dump in $dir" >&2
    exit 1
  fi
  per=$((busiest / COUNT))
  [ -z "$first" ] && first=$per
  printf '%-24s %14d %10s %12d %14d %8d\n' "$name" "$per" \
    "$(awk -v a="$per" -v b="$first" 'BEGIN{printf "%.3f", a/b}')" \
    $(((all - busiest) / COUNT)) $((all / COUNT)) "$threads"
  if [ -n "${SIM:-}" ]; then
    python3 scripts/callgrind-footprint.py "$dump" "$bin" "$COUNT" "$TOP"
    if [ "$TOP" -gt 0 ]; then
      # Exclusive counts; the threads' entry functions (`clone`, `start_thread`, ...), which
      # callgrind_annotate charges with their callees' misses in a dump made by
      # `callgrind_control -d`, are left out (rows above half of the total).
      for ev in I1mr D1mw D1mr; do
        echo "    by $ev, per request (exclusive):"
        callgrind_annotate --inclusive=no --threshold=100 --show="$ev" --sort="$ev" "$dump" 2>/dev/null |
          awk -v n="$COUNT" -v top="$TOP" '
            /^-+$/ { sep++; next }
            sep >= 4 && $1 ~ /^[0-9,]+$/ && shown < top {
              pct = $0; sub(/^[^(]*\( */, "", pct); sub(/%.*/, "", pct)
              if (pct + 0 > 50) next
              v = $1; gsub(",", "", v); $1 = ""; sub(/^ +\([^)]*\) +/, ""); sub(/^ +/, "")
              printf "    %8.1f  %s\n", v / n, substr($0, 1, 140); shown++
            }'
      done
    fi
  fi
done
