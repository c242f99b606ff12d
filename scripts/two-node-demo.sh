#!/usr/bin/env bash
# Two claude-proxy nodes sharing one quota through Redis, in front of one Claude simulator
# that allows 20 requests a minute. 40 requests are sent at once, alternating between the
# nodes; every node waits for quota for at most 3 s (CLAUDE_PROXY_DEADLINE), then answers an
# Anthropic-style 429 with retry-after. Needs redis-server on the PATH; everything binds to
# 127.0.0.1 and stops by itself.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q --release --features proxy --bin claude-proxy --example mock_server
B=${CARGO_TARGET_DIR:-target}/release
D=$(mktemp -d)
REDIS_PORT=${REDIS_PORT:-6391}
cleanup() {
  [ -f "$D/pids" ] && kill $(cat "$D/pids") 2>/dev/null || true
  [ -f "$D/redis.pid" ] && kill "$(cat "$D/redis.pid")" 2>/dev/null || true
}
trap cleanup EXIT

redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
  --daemonize yes --pidfile "$D/redis.pid" >/dev/null
"$B/examples/mock_server" --listen 127.0.0.1:9011 --rpm 20 --seconds 60 2> "$D/mock.log" &
MOCK=$!
for port in 8791 8792; do
  REDIS_URL=redis://127.0.0.1:$REDIS_PORT/ CLAUDE_PROXY_NODES=2 ANTHROPIC_API_KEY=sk-demo \
  CLAUDE_PROXY_DEADLINE=3s "$B/claude-proxy" --listen 127.0.0.1:$port \
    --upstream http://127.0.0.1:9011 --cache false --fallback false 2> "$D/node$port.log" &
  echo $! >> "$D/pids"
done
sleep 1.5

: > "$D/curls"
for i in $(seq 1 40); do
  port=$((8791 + i % 2))
  curl -s -o /dev/null -w "%{http_code}\n" --max-time 15 "http://127.0.0.1:$port/v1/messages" \
    -H 'anthropic-version: 2023-06-01' -H 'content-type: application/json' \
    -d "{\"model\":\"claude-haiku-4-5\",\"max_tokens\":16,\"messages\":[{\"role\":\"user\",\"content\":\"task $i\"}]}" \
    >> "$D/codes" &
  echo $! >> "$D/curls"
done
for c in $(cat "$D/curls"); do wait "$c" || true; done
echo "clients: $(grep -c '^200' "$D/codes") answered 200, $(grep -c '^429' "$D/codes") told to come back later (429 from the proxies)"
curl -s http://127.0.0.1:8792/v1/proxy/status | python3 -c \
  'import json,sys; q=json.load(sys.stdin)["quota"][0]; print("node 8792 sees", q["group"], "requests", q["requests"]["remaining"], "of", q["requests"]["limit"], "left")'
kill -INT "$MOCK"; wait "$MOCK" 2>/dev/null || true
sed -n 's/^served/upstream simulator: served/p' "$D/mock.log"
