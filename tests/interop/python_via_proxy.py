#!/usr/bin/env python3
"""Interop check: the official Anthropic Python SDK through claude-proxy.

Run by `tests/sdk_via_proxy.rs`, which serves a simulator on loopback, starts the proxy in
front of it and sets:

  ANTHROPIC_BASE_URL, ANTHROPIC_API_KEY  the proxy, and the key the client sends
  INTEROP_MODEL                          model of the single calls (generous limits)
  INTEROP_BURST_MODEL                    model of the burst (a quota smaller than the burst)
  INTEROP_BURST                          number of concurrent requests in the burst
  INTEROP_OUTPUT_TOKENS                  output tokens per answer of the simulator

The SDK runs with `max_retries=0`: every 429 the simulator answers must be absorbed by the
proxy, or this script fails. The first Messages call meets a scripted 429 upstream.

Prints one `result {...}` JSON line and `ok` and exits 0 when every check passed; prints the
first failed check and exits 1 otherwise; exits 77 (skip) when `anthropic` is not installed.
"""

import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

try:
    import anthropic
    from anthropic.types import Message, TextBlock
except ImportError as e:
    print(f"the anthropic module is not installed: {e}", file=sys.stderr)
    sys.exit(77)

MODEL = os.environ["INTEROP_MODEL"]
BURST_MODEL = os.environ["INTEROP_BURST_MODEL"]
BURST = int(os.environ["INTEROP_BURST"])
OUTPUT_TOKENS = int(os.environ["INTEROP_OUTPUT_TOKENS"])
# Far above the time the proxy may wait for quota during the burst.
TIMEOUT = 60.0


def check(condition, what):
    if not condition:
        raise AssertionError(what)


def prompt(label):
    # Every request is distinct, so that the proxy's cache serves none of them.
    return [{"role": "user", "content": f"python interop: {label}"}]


def check_message(msg, model, max_tokens):
    expected_output = min(OUTPUT_TOKENS, max_tokens)
    check(isinstance(msg, Message), f"not a Message: {type(msg)}")
    check(msg.id.startswith("msg_"), f"id {msg.id}")
    check(msg.type == "message" and msg.role == "assistant", "type / role")
    check(msg.model == model, f"model {msg.model}, asked for {model}")
    check(msg.stop_reason in ("end_turn", "max_tokens"), f"stop_reason {msg.stop_reason}")
    check(len(msg.content) == 1 and isinstance(msg.content[0], TextBlock), "one text block")
    check(msg.usage.output_tokens == expected_output, f"output tokens {msg.usage.output_tokens}")
    check(msg.usage.input_tokens > 0, "input tokens")


def single_calls(client):
    """create (after a scripted upstream 429), headers, stream, count_tokens, a 400."""
    messages = prompt("create")
    msg = client.messages.create(model=MODEL, max_tokens=256, messages=messages)
    check_message(msg, MODEL, 256)
    check(msg._request_id is not None and msg._request_id.startswith("req_"), "request id")

    count = client.messages.count_tokens(model=MODEL, messages=messages)
    check(count.input_tokens == msg.usage.input_tokens,
          f"count_tokens {count.input_tokens} != charged input {msg.usage.input_tokens}")

    # The upstream rate-limit headers reach the client unchanged.
    raw = client.messages.with_raw_response.create(
        model=MODEL, max_tokens=256, messages=prompt("raw"))
    for bucket in ("requests", "tokens", "input-tokens", "output-tokens"):
        for part in ("limit", "remaining", "reset"):
            name = f"anthropic-ratelimit-{bucket}-{part}"
            check(raw.headers.get(name), f"header {name} missing")
    check(raw.headers.get("request-id", "").startswith("req_"), "request-id header")
    check_message(raw.parse(), MODEL, 256)

    with client.messages.stream(model=MODEL, max_tokens=256, messages=prompt("stream")) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    check(len(pieces) > 1, f"{len(pieces)} text delta(s)")
    check("".join(pieces) == final.content[0].text, "deltas add up to the final text")
    check_message(final, MODEL, 256)

    # Client errors pass through as the API's own envelope.
    try:
        client.messages.create(model=MODEL, max_tokens=16, messages=[])
        check(False, "empty messages accepted")
    except anthropic.BadRequestError as e:
        check(e.status_code == 400, f"status {e.status_code}")
        check(e.body["error"]["type"] == "invalid_request_error", f"{e.body}")
    return 3


def one_burst_request(client, i):
    """One request of the burst: every fourth one streams. Returns None or the error."""
    messages = prompt(f"burst {i}")
    try:
        if i % 4 == 0:
            with client.messages.stream(
                    model=BURST_MODEL, max_tokens=16, messages=messages) as stream:
                msg = stream.get_final_message()
        else:
            msg = client.messages.create(model=BURST_MODEL, max_tokens=16, messages=messages)
        check_message(msg, BURST_MODEL, 16)
        return None
    except Exception as e:  # noqa: BLE001 - every failure is reported
        return f"request {i}: {type(e).__name__}: {e}"


def burst(client):
    """BURST concurrent requests against a quota smaller than BURST: no error may reach us."""
    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=BURST) as pool:
        errors = [e for e in pool.map(lambda i: one_burst_request(client, i), range(BURST)) if e]
    elapsed = time.monotonic() - start
    check(not errors, f"{len(errors)} of {BURST} burst requests failed: {errors[:3]}")
    return elapsed


def main():
    client = anthropic.Anthropic(max_retries=0, timeout=TIMEOUT)
    print(f"anthropic {anthropic.__version__} via {client.base_url}")
    try:
        single = single_calls(client)
        elapsed = burst(client)
    except AssertionError as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    except anthropic.APIError as e:
        print(f"FAILED: an error reached the SDK: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print("result " + json.dumps({
        "sdk": "python",
        "version": anthropic.__version__,
        "messages_ok": single + BURST,
        "burst": BURST,
        "burst_seconds": round(elapsed, 3),
    }))
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
