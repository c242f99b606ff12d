#!/usr/bin/env python3
"""Interop check: the official Anthropic Python SDK against tower-claude's MockClaude simulator.

Run by `tests/python_sdk.rs`, which serves two simulators on loopback and sets:

  ANTHROPIC_BASE_URL, ANTHROPIC_API_KEY  the main simulator (generous limits)
  MOCK_OUTPUT_TOKENS                     output tokens per answer of the main simulator
  MOCK_LIMITED_BASE_URL                  a simulator with 60 requests per minute and two
                                         scripted 429s (retry-after: 1) queued

Exits 0 when every check passed; prints the first failed check and exits 1 otherwise; exits
77 (skip) when the `anthropic` module is not installed.
"""

import os
import sys
import time

try:
    import anthropic
    from anthropic.types import Message, TextBlock
except ImportError as e:
    print(f"the anthropic module is not installed: {e}", file=sys.stderr)
    sys.exit(77)

MODEL = "claude-sonnet-4-6"
MESSAGES = [{"role": "user", "content": "Tell me about token buckets."}]
OUTPUT_TOKENS = int(os.environ["MOCK_OUTPUT_TOKENS"])


def check(condition, what):
    if not condition:
        raise AssertionError(what)


def check_message(msg, max_tokens):
    expected_output = min(OUTPUT_TOKENS, max_tokens)
    check(isinstance(msg, Message), f"not a Message: {type(msg)}")
    check(msg.id.startswith("msg_"), f"id {msg.id}")
    check(msg.type == "message" and msg.role == "assistant", "type / role")
    check(msg.model == MODEL, f"model {msg.model}")
    expected_stop = "max_tokens" if OUTPUT_TOKENS > max_tokens else "end_turn"
    check(msg.stop_reason == expected_stop, f"stop_reason {msg.stop_reason}")
    check(len(msg.content) == 1 and isinstance(msg.content[0], TextBlock), "one text block")
    check(len(msg.content[0].text.split()) == expected_output, "one word per output token")
    check(msg.usage.output_tokens == expected_output, f"output tokens {msg.usage.output_tokens}")
    check(msg.usage.input_tokens > 0, "input tokens")
    check(msg.usage.cache_read_input_tokens == 0, "cache read tokens")


def main_simulator():
    client = anthropic.Anthropic(max_retries=0, timeout=10.0)

    msg = client.messages.create(model=MODEL, max_tokens=256, messages=MESSAGES)
    check_message(msg, 256)
    check(msg._request_id is not None and msg._request_id.startswith("req_"), "request id")

    short = client.messages.create(model=MODEL, max_tokens=3, messages=MESSAGES)
    check_message(short, 3)

    count = client.messages.count_tokens(model=MODEL, messages=MESSAGES)
    check(count.input_tokens == msg.usage.input_tokens, "count_tokens == charged input")

    raw = client.messages.with_raw_response.create(model=MODEL, max_tokens=256, messages=MESSAGES)
    for bucket in ("requests", "tokens", "input-tokens", "output-tokens"):
        for part in ("limit", "remaining", "reset"):
            name = f"anthropic-ratelimit-{bucket}-{part}"
            check(raw.headers.get(name), f"header {name}")
    check(int(raw.headers["anthropic-ratelimit-input-tokens-remaining"]) % 1000 == 0, "rounded")
    check_message(raw.parse(), 256)

    with client.messages.stream(model=MODEL, max_tokens=256, messages=MESSAGES) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    check(len(pieces) > 1, "several text deltas")
    check("".join(pieces) == final.content[0].text, "deltas add up to the final text")
    check_message(final, 256)
    check(final.usage.input_tokens == msg.usage.input_tokens, "stream input usage")

    events = [e.type for e in client.messages.create(
        model=MODEL, max_tokens=256, messages=MESSAGES, stream=True)]
    check(events[:2] == ["message_start", "content_block_start"], f"events {events}")
    check(events[-3:] == ["content_block_stop", "message_delta", "message_stop"], f"{events}")
    check("content_block_delta" in events, "deltas")

    try:
        client.messages.create(model=MODEL, max_tokens=16, messages=[])
        check(False, "empty messages accepted")
    except anthropic.BadRequestError as e:
        check(e.status_code == 400, "400")
        check(e.body["error"]["type"] == "invalid_request_error", f"{e.body}")


def limited_simulator():
    base_url = os.environ["MOCK_LIMITED_BASE_URL"]
    client = anthropic.Anthropic(base_url=base_url, max_retries=1, timeout=10.0)

    # Two scripted 429s with retry-after: 1: the SDK waits 1 s, retries once, and gives up.
    start = time.monotonic()
    try:
        client.messages.create(model=MODEL, max_tokens=16, messages=MESSAGES)
        check(False, "scripted 429s were not returned")
    except anthropic.RateLimitError as e:
        waited = time.monotonic() - start
        check(e.status_code == 429, "429")
        check(e.response.headers.get("retry-after") == "1", "retry-after 1")
        check(waited >= 0.9, f"the SDK did not honour retry-after: {waited:.2f} s")

    # 60 requests per minute: a burst is admitted 60 (+ what refills meanwhile) times.
    burst = client.with_options(max_retries=0)
    admitted = 0
    while True:
        try:
            burst.messages.create(model=MODEL, max_tokens=16, messages=MESSAGES)
            admitted += 1
            check(admitted <= 70, "no rate limit after 70 requests")
        except anthropic.RateLimitError as e:
            error = e
            break
    check(60 <= admitted <= 63, f"admitted {admitted}")
    check(error.body["error"]["type"] == "rate_limit_error", f"{error.body}")
    check(error.response.headers["anthropic-ratelimit-requests-remaining"] == "0", "remaining")
    # One request comes back every second: the announced wait is at most 1 s.
    check(error.response.headers["retry-after"] == "1", "retry-after")

    # A patient client (the SDK honouring retry-after) gets through.
    start = time.monotonic()
    msg = client.with_options(max_retries=2).messages.create(
        model=MODEL, max_tokens=16, messages=MESSAGES)
    check(isinstance(msg, Message), "patient request served")
    print(f"limited: {admitted} admitted in the burst, patient request after "
          f"{time.monotonic() - start:.2f} s")


def main():
    print(f"anthropic {anthropic.__version__}")
    try:
        main_simulator()
        limited_simulator()
    except AssertionError as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
