#!/usr/bin/env bash
# Side-by-side proxy benchmark: claude-proxy against nginx as a reverse proxy, in one run.
#
#   scripts/bench-proxy.sh                 # build the release proxy, run every target
#   DURATION=5 CONNS="1 32" scripts/bench-proxy.sh
#   PROXY_BIN=/tmp/old/claude-proxy scripts/bench-proxy.sh     # an older build, same script
#   PROXY_CONFIGS="nocache:--cache false" scripts/bench-proxy.sh
#   PROXY_CONFIGS="old@/tmp/old/claude-proxy:--cache-mode off;new:--cache-mode off" \
#     scripts/bench-proxy.sh      # NAME@BINARY runs that configuration with another build
#
# What runs, all on 127.0.0.1 with free ports, stopped by pid when the script ends:
#   upstream  nginx answering POST /v1/messages at once with a static Anthropic answer and
#             `anthropic-ratelimit-*` headers (limits that never bind);
#   direct    wrk straight at the upstream (the floor);
#   nginx     nginx as a reverse proxy in front of the upstream (keep-alive to the upstream);
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

need() { command -v "$1" >/dev/null 2>&1; }
if ! need nginx || ! need wrk; then
  echo "installing nginx and wrk (Debian packages)" >&2
  apt-get update -qq && apt-get install -y -qq nginx wrk >/dev/null
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

up_port=$(free_port)
ngx_port=$(free_port)
{
  nginx_http_head "$work/nginx"
  echo "  upstream claude { server 127.0.0.1:$up_port; keepalive 64; }"
  upstream_server "$up_port"
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
} >"$work/nginx.conf"
nginx -c "$work/nginx.conf" -g 'daemon off;' &
pids+=($!)
wait_port "$up_port"
wait_port "$ngx_port"

# A 2 KB request with a prompt distinct on every request (thread id + counter).
cat >"$work/post.lua" <<'EOF'
local counter = 0
local tid = 0
local pad = string.rep("lorem ipsum dolor sit amet ", 70)
function setup(thread)
  thread:set("tid", math.random(1, 1000000000))
end
function init(args)
  tid = tid or 0
end
request = function()
  counter = counter + 1
  local body = '{"model":"claude-sonnet-4-6","max_tokens":256,"messages":[{"role":"user","content":"task '
    .. tid .. "-" .. counter .. " " .. pad .. '"}]}'
  return wrk.format("POST", "/v1/messages", {
    ["content-type"] = "application/json",
    ["anthropic-version"] = "2023-06-01",
    ["x-api-key"] = "sk-bench",
  }, body)
end
done = function(summary, latency, requests)
  local errors = summary.errors.status + summary.errors.connect + summary.errors.read
    + summary.errors.write + summary.errors.timeout
  io.write(string.format("RESULT %.1f %.4f %.4f %d\n",
    summary.requests / (summary.duration / 1e6),
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, errors))
end
EOF

names=(direct nginx)
ports=("$up_port" "$ngx_port")
if [ "$FLOOR" = 1 ]; then
  floor_port=$(free_port)
  "$(realpath "$FLOOR_BIN")" --listen "127.0.0.1:$floor_port" --upstream "http://127.0.0.1:$up_port" \
    >"$work/floor.log" 2>&1 &
  pids+=($!)
  wait_port "$floor_port"
  names+=(floor)
  ports+=("$floor_port")
fi
IFS=';' read -r -a configs <<<"$PROXY_CONFIGS"
for entry in "${configs[@]}"; do
  parse_config "$entry"
  port=$(free_port)
  dir="$work/proxy-$name"
  mkdir -p "$dir"
  # shellcheck disable=SC2086
  (cd "$dir" && exec env -u ANTHROPIC_API_KEY -u ANTHROPIC_API_KEYS RUST_LOG="${PROXY_LOG:-warn}" \
      "$bin" --listen "127.0.0.1:$port" --upstream "http://127.0.0.1:$up_port" $flags \
      >"$dir/log" 2>&1) &
  pids+=($!)
  wait_port "$port"
  names+=("proxy:$name")
  ports+=("$port")
done

echo "claude-proxy: $PROXY_BIN"
echo "wrk ${DURATION}s per row, $THREADS thread(s); $(nproc) cores; load average $(cut -d' ' -f1-3 /proc/loadavg)"
for c in $CONNS; do
  t=$THREADS
  [ "$t" -gt "$c" ] && t=$c
  declare -A rps=() p50=() p99=() errs=()
  for i in "${!names[@]}"; do
    out=$(wrk -t"$t" -c"$c" -d"${DURATION}s" -s "$work/post.lua" "http://127.0.0.1:${ports[$i]}" | grep '^RESULT')
    read -r _ r l50 l99 e <<<"$out"
    rps[$i]=$r; p50[$i]=$l50; p99[$i]=$l99; errs[$i]=$e
  done
  echo
  echo "== $c connection(s)"
  printf '%-18s %10s %9s %9s %10s %9s %7s\n' target req/s p50_ms p99_ms added_p50 x_nginx errors
  for i in "${!names[@]}"; do
    added="—"
    [ "$i" -gt 0 ] && added=$(awk -v a="${p50[$i]}" -v b="${p50[0]}" 'BEGIN{printf "%+.3f", a-b}')
    ratio=$(awk -v a="${rps[$i]}" -v b="${rps[1]}" 'BEGIN{printf "%.2f", a/b}')
    printf '%-18s %10.0f %9.3f %9.3f %10s %9s %7s\n' "${names[$i]}" "${rps[$i]}" "${p50[$i]}" "${p99[$i]}" "$added" "$ratio" "${errs[$i]}"
  done
  unset rps p50 p99 errs
done
