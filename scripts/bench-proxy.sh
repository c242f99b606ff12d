#!/usr/bin/env bash
# Side-by-side proxy benchmark: claude-proxy against nginx as a reverse proxy, in one run.
#
#   scripts/bench-proxy.sh                 # build the release proxy, run every target
#   DURATION=5 CONNS="1 32" scripts/bench-proxy.sh
#   ROUNDS=10 BASE=proxy:off PROXY_CONFIGS="off:--cache-mode off;disk:--cache-mode all" \
#     scripts/bench-proxy.sh      # ten rounds over the same processes, then medians, and each
#                                 # target against BASE round by round (x_base, p50-base)
#   PROXY_BIN=/tmp/old/claude-proxy scripts/bench-proxy.sh     # an older build, same script
#   PGO=1 scripts/bench-proxy.sh   # the profile-guided build (scripts/pgo-build.sh, ~10 min)
#   PROXY_CONFIGS="lto:--cache-mode off;pgo@target/pgo/claude-proxy:--cache-mode off" \
#     scripts/bench-proxy.sh      # both builds side by side (after scripts/pgo-build.sh)
#   PROXY_CONFIGS="nocache:--cache false" scripts/bench-proxy.sh
#   PROXY_CONFIGS="old@/tmp/old/claude-proxy:--cache-mode off;new:--cache-mode off" \
#     scripts/bench-proxy.sh      # NAME@BINARY runs that configuration with another build
#   PROXY_CONFIGS="off:--cache-mode off;floor-same-task@target/release/examples/hyper_floor:--same-task" \
#     scripts/bench-proxy.sh      # the floor with each upstream connection driven by its
#                                 # downstream connection's task (examples/hyper_floor.rs)
#   CPU=1 ROUNDS=4 FLOOR=0 CONNS=32 PROXY_CONFIGS="off:--cache-mode off;memory:--cache-mode all \
#     --cache-path memory;disk:--cache-mode all" scripts/bench-proxy.sh
#                                 # also the CPU each proxy (and the floor) spent per 1,000
#                                 # requests of each row (below)
#   WORKERS=auto scripts/bench-proxy.sh   # every target with its default thread count
#
# WORKERS (default 1): the threads of every target under test, the same for all of them:
# nginx's `worker_processes`, `--worker-threads` for each proxy whose binary has the option
# (older builds get TOKIO_WORKER_THREADS, which their `#[tokio::main]` runtime reads) and
# TOKIO_WORKER_THREADS for the floor. `WORKERS=auto`: nginx's `worker_processes auto` and
# Tokio's default (one per core, or TOKIO_WORKER_THREADS when exported), as the proxies and
# the floor ran before the setting. The upstream is one nginx worker in its own process in
# every case. On a small host shared by wrk, the upstream and the target, one thread each
# keeps the rows about what a request costs each target, not about how a target's extra
# threads fare against wrk and the upstream for the cores (docs/benchmarks.md, "Equal threads
# (issue 14)").
#
# What runs, all on 127.0.0.1 with free ports, stopped by pid when the script ends:
#   upstream  nginx (its own process, one worker) answering POST /v1/messages at once with a
#             static Anthropic answer and `anthropic-ratelimit-*` headers (limits that never
#             bind);
#   direct    wrk straight at the upstream (the floor);
#   nginx     nginx as a reverse proxy in front of the upstream (keep-alive to the upstream),
#             in a process of its own with WORKERS workers (before the WORKERS setting, one
#             nginx worker served both the reverse proxy and the upstream);
#   floor     examples/hyper_floor.rs: a bare hyper reverse proxy with no layers (the same
#             hyper-util server and client, allocator and runtime as claude-proxy): what the
#             proxy would cost if its layers were free (FLOOR=0 leaves it out, FLOOR_BIN=PATH
#             runs another build of it);
#   proxy:*   claude-proxy in each configuration of PROXY_CONFIGS, same upstream.
# The load is wrk with a Lua script that sends a 2 KB body with a distinct prompt on every
# request (a caching proxy serves none from its cache). For every target and connection count
# it prints req/s, p50 and p99 latency, the p50 the target adds to the direct one, and the
# throughput as a ratio of nginx's. The proxy's own cost is its distance to the floor row.
#
# CPU=1 (needs perf): during each wrk run of a proxy or the floor, `perf stat -p PID` counts
# the process's software events (all its threads): printed per 1,000 requests, the CPU time
# (task-clock, ms; user and system from /proc/PID/stat's ticks), minor page faults and context
# switches. A measure of what a request costs the proxy that, unlike req/s, hardly depends
# on what else the machine runs (a loaded host still slows each instruction a little).
#
# These machines are shared and noisy: compare rows of one run, not runs of different days.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/bench-upstream.sh
. scripts/bench-upstream.sh

DURATION="${DURATION:-10}"
CONNS="${CONNS:-1 32}"
THREADS="${THREADS:-1}"
TARGET_DIR="${CARGO_TARGET_DIR:-target}"
PROXY_BIN="${PROXY_BIN:-}"
FLOOR="${FLOOR:-1}"
FLOOR_BIN="${FLOOR_BIN:-}"
ROUNDS="${ROUNDS:-1}"
BASE="${BASE:-}"
CPU="${CPU:-0}"
WORKERS="${WORKERS:-1}"
if [ "$WORKERS" != auto ] && ! [[ "$WORKERS" =~ ^[1-9][0-9]*$ ]]; then
  echo "WORKERS must be a positive number or auto, not \`$WORKERS\`" >&2
  exit 1
fi

need() { command -v "$1" >/dev/null 2>&1; }
if ! need nginx || ! need wrk; then
  echo "installing nginx and wrk (Debian packages)" >&2
  apt-get update -qq && apt-get install -y -qq nginx wrk >/dev/null
fi
if [ "$CPU" = 1 ] && ! need perf; then
  echo "CPU=1 needs perf" >&2
  exit 1
fi
proxy_bin
if [ "$FLOOR" = 1 ] && [ -z "$FLOOR_BIN" ]; then
  cargo build -q --release --features proxy --example hyper_floor
  FLOOR_BIN="$TARGET_DIR/release/examples/hyper_floor"
fi

if [ -z "${PROXY_CONFIGS:-}" ]; then
  # Configurations by name:flags, separated by `;`. Cache modes where the binary has them.
  if "$PROXY_BIN" --help | grep -q -- '--cache-mode'; then
    PROXY_CONFIGS="nocache:--cache-mode off;memory-all:--cache-mode all --cache-path memory;disk-all:--cache-mode all;defaults:"
  else
    PROXY_CONFIGS="nocache:--cache false;memory:--cache-path memory;defaults:"
  fi
fi

bench_setup

# The upstream: one nginx worker in a process of its own, whatever WORKERS is.
start_upstream
# nginx as a reverse proxy: WORKERS workers.
ngx_port=$(free_port)
{
  nginx_http_head "$work/nginx-proxy" "$WORKERS"
  echo "  upstream claude { server 127.0.0.1:$up_port; keepalive 64; }"
  cat <<EOF
  server {
    listen 127.0.0.1:$ngx_port;
    client_body_buffer_size 64k;
    location / {
      proxy_pass http://claude;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
EOF
} >"$work/nginx-proxy.conf"
nginx -c "$work/nginx-proxy.conf" -g 'daemon off;' &
pids+=($!)
wait_port "$ngx_port"

# A 2 KB request with a prompt distinct on every request: the run's nonce (NONCE, distinct for
# every wrk run), the thread's number and a counter. (The script before issue 13's sixth pass
# built its prompts from a chunk-level `local tid`, which `thread:set("tid", ..)` does not
# reach, and a counter: every wrk run sent the same prompts, so a caching proxy served every
# row after its first, the 32-connection row after the 1-connection one included, partly
# from its cache.)
cat >"$work/post.lua" <<'EOF'
local counter = 0
local threads = 0
local nonce = os.getenv("NONCE") or tostring(os.time())
local pad = string.rep("lorem ipsum dolor sit amet ", 70)
function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end
request = function()
  counter = counter + 1
  local body = '{"model":"claude-sonnet-4-6","max_tokens":256,"messages":[{"role":"user","content":"task '
    .. nonce .. "-" .. tostring(tid) .. "-" .. counter .. " " .. pad .. '"}]}'
  return wrk.format("POST", "/v1/messages", {
    ["content-type"] = "application/json",
    ["anthropic-version"] = "2023-06-01",
    ["x-api-key"] = "sk-bench",
  }, body)
end
done = function(summary, latency, requests)
  local errors = summary.errors.status + summary.errors.connect + summary.errors.read
    + summary.errors.write + summary.errors.timeout
  io.write(string.format("RESULT %.1f %.4f %.4f %d %d\n",
    summary.requests / (summary.duration / 1e6),
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, errors, summary.requests))
end
EOF

names=(direct nginx)
ports=("$up_port" "$ngx_port")
# The process of each target (none for direct and nginx): CPU=1 measures it.
tpids=("" "")
# The environment of the floor and of proxies without `--worker-threads`: TOKIO_WORKER_THREADS
# when WORKERS is a number (with `auto`, whatever the caller's environment says).
tokio_env=()
if [ "$WORKERS" != auto ]; then tokio_env=(TOKIO_WORKER_THREADS="$WORKERS"); fi
threads_of=()
if [ "$FLOOR" = 1 ]; then
  floor_port=$(free_port)
  env "${tokio_env[@]}" "$(realpath "$FLOOR_BIN")" --listen "127.0.0.1:$floor_port" --upstream "http://127.0.0.1:$up_port" \
    >"$work/floor.log" 2>&1 &
  pids+=($!)
  wait_port "$floor_port"
  tpids+=($!)
  names+=(floor)
  ports+=("$floor_port")
  if [ "$WORKERS" = auto ]; then threads_of+=("floor: Tokio's default"); else threads_of+=("floor: ${tokio_env[*]}"); fi
fi
IFS=';' read -r -a configs <<<"$PROXY_CONFIGS"
for entry in "${configs[@]}"; do
  parse_config "$entry"
  port=$(free_port)
  dir="$work/proxy-$name"
  mkdir -p "$dir"
  # Its threads: --worker-threads WORKERS, or TOKIO_WORKER_THREADS for a binary without the
  # option; none with `auto` or when its flags set --worker-threads themselves.
  env_threads=()
  opt_threads=()
  how="Tokio's default"
  if [[ " $flags " == *" --worker-threads "* ]]; then
    how="its own --worker-threads"
  elif [ "$WORKERS" != auto ]; then
    if "$bin" --help | grep -q -- '--worker-threads'; then
      opt_threads=(--worker-threads "$WORKERS")
      how="--worker-threads $WORKERS"
    else
      env_threads=("${tokio_env[@]}")
      how="TOKIO_WORKER_THREADS=$WORKERS (no --worker-threads)"
    fi
  fi
  threads_of+=("proxy:$name: $how")
  # shellcheck disable=SC2086
  (cd "$dir" && exec env -u ANTHROPIC_API_KEY -u ANTHROPIC_API_KEYS RUST_LOG="${PROXY_LOG:-warn}" \
      "${env_threads[@]}" "$bin" --listen "127.0.0.1:$port" --upstream "http://127.0.0.1:$up_port" \
      "${opt_threads[@]}" $flags >"$dir/log" 2>&1) &
  pids+=($!)
  tpids+=($!)
  wait_port "$port"
  names+=("proxy:$name")
  ports+=("$port")
done

echo "claude-proxy: $PROXY_BIN"
if [ "$WORKERS" = auto ]; then
  echo "WORKERS=auto: nginx worker_processes auto, Tokio's default threads; the upstream: one nginx worker"
else
  echo "WORKERS=$WORKERS: nginx worker_processes $WORKERS, $WORKERS runtime thread(s) per proxy and floor; the upstream: one nginx worker"
fi
printf '  %s\n' "${threads_of[@]}"
echo "wrk ${DURATION}s per row, $THREADS thread(s); $(nproc) cores; load average $(cut -d' ' -f1-3 /proc/loadavg)"
results="$work/results.tsv"
: >"$results"
cpu_results="$work/cpu.tsv"
: >"$cpu_results"

# ticks PID: the process's user and system clock ticks (all threads), from /proc/PID/stat.
ticks() {
  awk '{ sub(/^.*\) /, ""); print $12, $13 }' "/proc/$1/stat"
}
n=${#names[@]}
for round in $(seq 1 "$ROUNDS"); do
  for c in $CONNS; do
    t=$THREADS
    [ "$t" -gt "$c" ] && t=$c
    declare -A rps=() p50=() p99=() errs=()
    # Round r measures the targets in an order rotated by r - 1 (direct and nginx included),
    # so that no target is always measured first or right after another.
    for k in $(seq 0 $((n - 1))); do
      i=$(((k + round - 1) % n))
      tp="${tpids[$i]}"
      if [ "$CPU" = 1 ] && [ -n "$tp" ]; then
        perf stat -x, -o "$work/perf.$i" -e task-clock,page-faults,context-switches -p "$tp" 2>/dev/null &
        perf_pid=$!
        pids+=("$perf_pid")
        read -r u0 s0 <<<"$(ticks "$tp")"
      fi
      out=$(NONCE="$$-$round-$c-$i-$(date +%s%N)" wrk -t"$t" -c"$c" -d"${DURATION}s" -s "$work/post.lua" "http://127.0.0.1:${ports[$i]}" | grep '^RESULT')
      read -r _ r l50 l99 e nreq <<<"$out"
      rps[$i]=$r; p50[$i]=$l50; p99[$i]=$l99; errs[$i]=$e
      if [ "$CPU" = 1 ] && [ -n "$tp" ]; then
        read -r u1 s1 <<<"$(ticks "$tp")"
        kill -INT "$perf_pid" 2>/dev/null || true
        wait "$perf_pid" 2>/dev/null || true
        # task-clock (ms), page-faults, context-switches: the first field of their lines.
        read -r clock faults switches <<<"$(awk -F, '
          $3 == "task-clock" { c = $1 } $3 == "page-faults" { f = $1 } $3 == "context-switches" { s = $1 }
          END { print c, f, s }' "$work/perf.$i")"
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$c" "${names[$i]}" "$nreq" \
          "$clock" "$((u1 - u0))" "$((s1 - s0))" "$faults" "$switches" >>"$cpu_results"
      fi
    done
    echo
    if [ "$ROUNDS" -gt 1 ]; then
      echo "== $c connection(s), round $round of $ROUNDS; load average $(cut -d' ' -f1-3 /proc/loadavg)"
    else
      echo "== $c connection(s)"
    fi
    printf '%-18s %10s %9s %9s %10s %9s %7s\n' target req/s p50_ms p99_ms added_p50 x_nginx errors
    for i in "${!names[@]}"; do
      added="—"
      [ "$i" -gt 0 ] && added=$(awk -v a="${p50[$i]}" -v b="${p50[0]}" 'BEGIN{printf "%+.3f", a-b}')
      ratio=$(awk -v a="${rps[$i]}" -v b="${rps[1]}" 'BEGIN{printf "%.2f", a/b}')
      printf '%-18s %10.0f %9.3f %9.3f %10s %9s %7s\n' "${names[$i]}" "${rps[$i]}" "${p50[$i]}" "${p99[$i]}" "$added" "$ratio" "${errs[$i]}"
      printf '%s\t%s\t%s\t%s\t%s\n' "$round" "$c" "${names[$i]}" "${rps[$i]}" "${p50[$i]}" >>"$results"
    done
    if [ "$CPU" = 1 ]; then
      hz=$(getconf CLK_TCK)
      printf '%-18s %10s %9s %9s %9s %9s %9s  (per 1,000 requests)\n' target requests cpu_ms user_ms sys_ms faults switches
      awk -F'\t' -v r="$round" -v c="$c" -v hz="$hz" '$1 == r && $2 == c {
        k = 1000 / $4
        printf "%-18s %10d %9.1f %9.1f %9.1f %9.1f %9.1f\n", $3, $4, $5 * k, $6 * 1000 / hz * k, $7 * 1000 / hz * k, $8 * k, $9 * k
      }' "$cpu_results"
    fi
    unset rps p50 p99 errs
  done
done

# Several rounds: medians over the rounds, and each target against BASE paired round by
# round (the machine's state drifts between rounds more than between neighbouring rows).
if [ "$ROUNDS" -gt 1 ]; then
  python3 - "$results" "$BASE" <<'PY'
import collections, statistics, sys
rows = collections.defaultdict(dict)  # (conns, target) -> round -> (rps, p50)
order = []
for line in open(sys.argv[1]):
    r, c, name, rps, p50 = line.split("\t")
    if (c, name) not in rows:
        order.append((c, name))
    rows[(c, name)][r] = (float(rps), float(p50))
base = sys.argv[2]
med = statistics.median
for conns in dict.fromkeys(c for c, _ in order):
    print(f"\n== {conns} connection(s), medians of {len(rows[(conns, 'direct')])} rounds"
          + (f"; vs {base}: per round ratio of req/s and difference of p50, then their median" if base else ""))
    print(f"{'target':18} {'req/s':>10} {'p50_ms':>9} {'added_p50':>10}"
          + (f" {'x_base':>8} {'p50-base':>9}  rounds: x_base; p50-base" if base else ""))
    direct = rows[(conns, "direct")]
    b = rows.get((conns, base), {})
    for c, name in order:
        if c != conns:
            continue
        d = rows[(c, name)]
        added = med(d[r][1] - direct[r][1] for r in d)
        line = f"{name:18} {med(v[0] for v in d.values()):10.0f} {med(v[1] for v in d.values()):9.3f} {added:+10.3f}"
        if b:
            ratios = [d[r][0] / b[r][0] for r in d]
            diffs = [d[r][1] - b[r][1] for r in d]
            line += (f" {med(ratios):8.2f} {med(diffs):+9.3f}  " + ",".join(f"{x:.2f}" for x in ratios)
                     + "; " + ",".join(f"{x:+.3f}" for x in diffs))
        print(line)
PY
fi

if [ "$CPU" = 1 ] && [ "$ROUNDS" -gt 1 ]; then
  python3 - "$cpu_results" "$(getconf CLK_TCK)" <<'PY'
import collections, statistics, sys
rows = collections.defaultdict(list)  # (conns, target) -> per round (cpu, user, sys, faults, switches) per 1,000
for line in open(sys.argv[1]):
    r, c, name, n, clock, user, system, faults, switches = line.rstrip("\n").split("\t")
    k, hz = 1000 / float(n), float(sys.argv[2])
    rows[(c, name)].append((float(clock) * k, float(user) * 1000 / hz * k, float(system) * 1000 / hz * k,
                            float(faults) * k, float(switches) * k))
med = statistics.median
for conns in dict.fromkeys(c for c, _ in rows):
    print(f"\n== {conns} connection(s), CPU per 1,000 requests, medians of the rounds (cpu_ms per round)")
    print(f"{'target':18} {'cpu_ms':>9} {'user_ms':>9} {'sys_ms':>9} {'faults':>9} {'switches':>9}  rounds")
    for (c, name), v in rows.items():
        if c != conns:
            continue
        cols = [med(x[j] for x in v) for j in range(5)]
        print(f"{name:18} {cols[0]:9.1f} {cols[1]:9.1f} {cols[2]:9.1f} {cols[3]:9.1f} {cols[4]:9.1f}  "
              + ",".join(f"{x[0]:.0f}" for x in v))
PY
fi
