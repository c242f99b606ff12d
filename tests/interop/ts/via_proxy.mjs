// Interop check: the official Anthropic TypeScript SDK (`@anthropic-ai/sdk`) through claude-proxy.
//
// Run by `tests/sdk_via_proxy.rs` (`node tests/interop/ts/via_proxy.mjs`, after `npm install` in
// this folder), which serves a simulator on loopback, starts the proxy in front of it and sets:
//
//   ANTHROPIC_BASE_URL, ANTHROPIC_API_KEY  the proxy, and the key the client sends
//   INTEROP_MODEL                          model of the single calls (generous limits)
//   INTEROP_BURST_MODEL                    model of the burst (a quota smaller than the burst)
//   INTEROP_BURST                          number of concurrent requests in the burst
//   INTEROP_OUTPUT_TOKENS                  output tokens per answer of the simulator
//
// The SDK runs with `maxRetries: 0`: every 429 the simulator answers must be absorbed by the
// proxy, or this script fails. The first Messages call meets a scripted 429 upstream.
//
// Prints one `result {...}` JSON line and `ok` and exits 0 when every check passed; prints the
// first failed check and exits 1 otherwise; exits 77 (skip) when the SDK is not installed.

let Anthropic;
let VERSION;
try {
  ({ default: Anthropic } = await import('@anthropic-ai/sdk'));
  ({ VERSION } = await import('@anthropic-ai/sdk/version'));
} catch (e) {
  console.error(`@anthropic-ai/sdk is not installed (npm install in tests/interop/ts): ${e}`);
  process.exit(77);
}

const env = (name) => {
  const v = process.env[name];
  if (v === undefined || v === '') throw new Error(`${name} is not set`);
  return v;
};
const MODEL = env('INTEROP_MODEL');
const BURST_MODEL = env('INTEROP_BURST_MODEL');
const BURST = Number(env('INTEROP_BURST'));
const OUTPUT_TOKENS = Number(env('INTEROP_OUTPUT_TOKENS'));
// Far above the time the proxy may wait for quota during the burst.
const TIMEOUT_MS = 60_000;

class CheckFailed extends Error {}

function check(condition, what) {
  if (!condition) throw new CheckFailed(what);
}

// Every request is distinct, so that the proxy's cache serves none of them.
const prompt = (label) => [{ role: 'user', content: `typescript interop: ${label}` }];

function checkMessage(msg, model, maxTokens) {
  const expectedOutput = Math.min(OUTPUT_TOKENS, maxTokens);
  check(msg.id.startsWith('msg_'), `id ${msg.id}`);
  check(msg.type === 'message' && msg.role === 'assistant', 'type / role');
  check(msg.model === model, `model ${msg.model}, asked for ${model}`);
  check(['end_turn', 'max_tokens'].includes(msg.stop_reason), `stop_reason ${msg.stop_reason}`);
  check(msg.content.length === 1 && msg.content[0].type === 'text', 'one text block');
  check(msg.usage.output_tokens === expectedOutput, `output tokens ${msg.usage.output_tokens}`);
  check(msg.usage.input_tokens > 0, 'input tokens');
}

// create (after a scripted upstream 429), headers, stream, count_tokens, a 400.
async function singleCalls(client) {
  const messages = prompt('create');
  const msg = await client.messages.create({ model: MODEL, max_tokens: 256, messages });
  checkMessage(msg, MODEL, 256);
  check(msg._request_id?.startsWith('req_'), `request id ${msg._request_id}`);

  const count = await client.messages.countTokens({ model: MODEL, messages });
  check(
    count.input_tokens === msg.usage.input_tokens,
    `count_tokens ${count.input_tokens} != charged input ${msg.usage.input_tokens}`,
  );

  // The upstream rate-limit headers reach the client unchanged.
  const { data, response } = await client.messages
    .create({ model: MODEL, max_tokens: 256, messages: prompt('raw') })
    .withResponse();
  for (const bucket of ['requests', 'tokens', 'input-tokens', 'output-tokens']) {
    for (const part of ['limit', 'remaining', 'reset']) {
      const name = `anthropic-ratelimit-${bucket}-${part}`;
      check(response.headers.get(name), `header ${name} missing`);
    }
  }
  check(response.headers.get('request-id')?.startsWith('req_'), 'request-id header');
  checkMessage(data, MODEL, 256);

  const stream = client.messages.stream({ model: MODEL, max_tokens: 256, messages: prompt('stream') });
  const pieces = [];
  stream.on('text', (text) => pieces.push(text));
  const final = await stream.finalMessage();
  check(pieces.length > 1, `${pieces.length} text delta(s)`);
  check(pieces.join('') === final.content[0].text, 'deltas add up to the final text');
  checkMessage(final, MODEL, 256);

  // Client errors pass through as the API's own envelope.
  try {
    await client.messages.create({ model: MODEL, max_tokens: 16, messages: [] });
    check(false, 'empty messages accepted');
  } catch (e) {
    if (e instanceof CheckFailed) throw e;
    check(e instanceof Anthropic.BadRequestError, `not a BadRequestError: ${e}`);
    check(e.status === 400, `status ${e.status}`);
    check(e.error?.error?.type === 'invalid_request_error', JSON.stringify(e.error));
  }
  return 3;
}

// One request of the burst: every fourth one streams. Resolves to null or the error.
async function oneBurstRequest(client, i) {
  const params = { model: BURST_MODEL, max_tokens: 16, messages: prompt(`burst ${i}`) };
  try {
    const msg =
      i % 4 === 0
        ? await client.messages.stream(params).finalMessage()
        : await client.messages.create(params);
    checkMessage(msg, BURST_MODEL, 16);
    return null;
  } catch (e) {
    return `request ${i}: ${e?.constructor?.name}: ${e?.message ?? e}`;
  }
}

// BURST concurrent requests against a quota smaller than BURST: no error may reach us.
async function burst(client) {
  const start = performance.now();
  const results = await Promise.all(
    Array.from({ length: BURST }, (_, i) => oneBurstRequest(client, i)),
  );
  const elapsed = (performance.now() - start) / 1000;
  const errors = results.filter((r) => r !== null);
  check(errors.length === 0, `${errors.length} of ${BURST} burst requests failed: ${errors.slice(0, 3)}`);
  return elapsed;
}

async function main() {
  const client = new Anthropic({ maxRetries: 0, timeout: TIMEOUT_MS });
  console.log(`@anthropic-ai/sdk ${VERSION} via ${client.baseURL}`);
  let single;
  let elapsed;
  try {
    single = await singleCalls(client);
    elapsed = await burst(client);
  } catch (e) {
    const what = e instanceof CheckFailed ? e.message : `an error reached the SDK: ${e?.stack ?? e}`;
    console.error(`FAILED: ${what}`);
    return 1;
  }
  const result = {
    sdk: 'typescript',
    version: VERSION,
    messages_ok: single + BURST,
    burst: BURST,
    burst_seconds: Math.round(elapsed * 1000) / 1000,
  };
  console.log(`result ${JSON.stringify(result)}`);
  console.log('ok');
  return 0;
}

process.exitCode = await main();
