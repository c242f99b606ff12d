#!/usr/bin/env python3
"""Sends distinct ~2 KB Messages API requests over ONE keep-alive HTTP/1.1 connection.

Usage: drive.py PORT COUNT [START]

Each body is like benches/proxy/distinct.lua's (model claude-haiku-4-5, or $MODEL; a
1,920-byte padding; "temperature" when $TEMPERATURE is set), with a prompt made distinct by a
per-run nonce and the request number counted from START, so every request is a cache miss.
Exits non-zero on any answer but 200.
Used by scripts/callgrind-miss.sh; standard library only.
"""
import http.client
import os
import sys


def main() -> int:
    port, count = int(sys.argv[1]), int(sys.argv[2])
    start = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    temperature = os.environ.get("TEMPERATURE")
    model = os.environ.get("MODEL", "claude-haiku-4-5")
    nonce = os.urandom(8).hex()
    pad = "lorem ipsum " * 160
    t = f'"temperature":{temperature},' if temperature else ""
    headers = {
        "content-type": "application/json",
        "x-api-key": "sk-ant-bench",
        "anthropic-version": "2023-06-01",
    }
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    for i in range(start, start + count):
        body = (
            '{"model":"' + model + '","max_tokens":100,' + t
            + '"messages":[{"role":"user","content":"' + nonce + " #" + str(i) + " " + pad + '"}]}'
        )
        conn.request("POST", "/v1/messages", body=body.encode(), headers=headers)
        res = conn.getresponse()
        res.read()
        if res.status != 200:
            print(f"request {i}: status {res.status}", file=sys.stderr)
            return 1
    conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
