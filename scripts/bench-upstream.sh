# Shared by scripts/bench-proxy.sh, scripts/cache-rss.sh, scripts/callgrind-proxy.sh,
# scripts/callgrind-miss.sh, scripts/latency-split.sh, scripts/machine-split.sh and
# scripts/pgo-train.sh (sourced, not run): free loopback ports, waiting for a listener, and the
# nginx upstream that answers POST /v1/messages at once with a static Anthropic answer and
# `anthropic-ratelimit-*` headers (limits that never bind).

# need_tools TOOL...: stops the script with "needs TOOL" when a tool is not on PATH.
need_tools() {
  for tool in "$@"; do
    command -v "$tool" >/dev/null 2>&1 || { echo "needs $tool" >&2; exit 1; }
  done
}

# bench_setup: a work dir in $work (removed at exit; KEEP_WORK=1 keeps it) and a list $pids
# of processes stopped at exit.
bench_setup() {
  work="$(mktemp -d)"
  pids=()
  trap bench_cleanup EXIT INT TERM
}

bench_cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ -n "${KEEP_WORK:-}" ]; then echo "work dir kept: $work" >&2; else rm -rf "$work"; fi
}

# parse_config "NAME:FLAGS" or "NAME@BINARY:FLAGS": sets $name, $flags and $bin (BINARY, or
# $PROXY_BIN when none is given), for the PROXY_CONFIGS lists of the bench scripts.
parse_config() {
  name="${1%%:*}"
  flags="${1#*:}"
  bin="$PROXY_BIN"
  if [[ "$name" == *@* ]]; then
    bin="$(realpath "${name#*@}")"
    name="${name%%@*}"
  fi
}

# config_dir "NAME:FLAGS" (or "NAME@BINARY:FLAGS"): parse_config, then a free port in $port and
# an empty directory $dir ($work/proxy-NAME, after bench_setup) to start that proxy in.
config_dir() {
  parse_config "$1"
  port=$(free_port)
  dir="$work/proxy-$name"
  mkdir -p "$dir"
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# wait_port PORT [TRIES of 0.05 s, 100 by default]
wait_port() {
  for _ in $(seq 1 "${2:-100}"); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.05
  done
  echo "nothing listens on port $1" >&2
  return 1
}

# The model is the one the load drivers ask for (benches/proxy/distinct.lua, drive.py), so a
# caching proxy stores the answer under the requested model, as with a real upstream.
bench_answer='{"id":"msg_bench","type":"message","role":"assistant","model":"claude-haiku-4-5","content":[{"type":"text","text":"fn main() { println!(hello); }"}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":512,"output_tokens":24}}'

# upstream_server PORT: the upstream's `server { }` block, for an nginx `http { }` block.
upstream_server() {
  cat <<EOF
  server {
    listen 127.0.0.1:$1;
    client_body_buffer_size 64k;
    location / {
      default_type application/json;
      add_header request-id req_bench always;
      add_header anthropic-ratelimit-requests-limit 1000000000 always;
      add_header anthropic-ratelimit-requests-remaining 999999999 always;
      add_header anthropic-ratelimit-requests-reset 2030-01-01T00:00:00Z always;
      add_header anthropic-ratelimit-input-tokens-limit 1000000000000 always;
      add_header anthropic-ratelimit-input-tokens-remaining 999999999000 always;
      add_header anthropic-ratelimit-input-tokens-reset 2030-01-01T00:00:00Z always;
      add_header anthropic-ratelimit-output-tokens-limit 1000000000000 always;
      add_header anthropic-ratelimit-output-tokens-remaining 999999999000 always;
      add_header anthropic-ratelimit-output-tokens-reset 2030-01-01T00:00:00Z always;
      return 200 '$bench_answer';
    }
  }
EOF
}

# nginx_http_head DIR [WORKERS]: the start of an nginx.conf (WORKERS worker processes, a number
# or `auto`, one by default; temp paths under DIR), up to and including the `http {` line's
# common settings.
nginx_http_head() {
  mkdir -p "$1"
  cat <<EOF
worker_processes ${2:-1};
pid $1/nginx.pid;
error_log $1/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $1/body;
  proxy_temp_path $1/proxy;
  fastcgi_temp_path $1/fastcgi;
  uwsgi_temp_path $1/uwsgi;
  scgi_temp_path $1/scgi;
  keepalive_requests 1000000;
EOF
}

# write_upstream_conf DIR PORT: a whole nginx.conf with the upstream alone.
write_upstream_conf() {
  nginx_http_head "$1"
  upstream_server "$2"
  echo "}"
}

# proxy_bin: sets PROXY_BIN to the absolute path of the proxy to measure: the given one, or a
# release build of this tree (built here); with PGO=1, the profile-guided build of
# scripts/pgo-build.sh (built here unless NO_BUILD=1 and one exists in target/pgo).
proxy_bin() {
  if [ -z "${PROXY_BIN:-}" ] && [ "${PGO:-0}" = 1 ]; then
    PROXY_BIN="${PGO_DIR:-target/pgo}/claude-proxy"
    if [ -z "${NO_BUILD:-}" ] || [ ! -x "$PROXY_BIN" ]; then
      scripts/pgo-build.sh > /dev/null
    fi
  fi
  if [ -z "${PROXY_BIN:-}" ]; then
    cargo build -q --release --features proxy --bin claude-proxy
    PROXY_BIN="${CARGO_TARGET_DIR:-target}/release/claude-proxy"
  fi
  PROXY_BIN="$(realpath "$PROXY_BIN")"
}

# start_upstream [TRIES]: the nginx upstream alone on a free port (after bench_setup), stopped
# with the other pids; sets up_port. TRIES: how long to wait for it (wait_port's steps).
start_upstream() {
  up_port=$(free_port)
  write_upstream_conf "$work/nginx" "$up_port" >"$work/nginx.conf"
  nginx -c "$work/nginx.conf" -g 'daemon off;' &
  pids+=($!)
  wait_port "$up_port" "${1:-100}"
}
