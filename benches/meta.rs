//! `RequestMeta::scan` and `rewrite_model` on realistic Messages API bodies of about 1 KB,
//! 10 KB and 100 KB (system prompt, tool definitions, multi-turn messages with text, tool use
//! and tool results).
//!
//! Run: `cargo bench --bench meta -- --warm-up-time 1 --measurement-time 3`

use criterion::{BenchmarkId, Criterion, Throughput, black_box, criterion_group, criterion_main};
use serde_json::{Value, json};
use tower_claude::anthropic::{RequestMeta, Usage, rewrite_model};

const WORDS: &[&str] = &[
    "the",
    "request",
    "rate",
    "limit",
    "token",
    "bucket",
    "model",
    "Claude",
    "answer",
    "stream",
    "retry",
    "because",
    "function",
    "returns",
    "value",
    "error",
    "café",
    "naïve",
    "résumé",
    "and",
    "of",
    "to",
    "in",
    "is",
    "that",
    "for",
    "with",
    "this",
    "“quoted”",
    "line\nbreak",
    "tab\there",
    "{braces}",
    "[brackets]",
    "\"quotes\"",
    "path\\to\\file",
    "日本語",
    "🦀",
];

/// Deterministic pseudo-random prose of about `bytes` bytes.
fn prose(seed: &mut u64, bytes: usize) -> String {
    let mut out = String::with_capacity(bytes + 16);
    while out.len() < bytes {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let word = WORDS[(*seed >> 33) as usize % WORDS.len()];
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(word);
    }
    out
}

fn tools(seed: &mut u64) -> Value {
    let tool = |name: &str, seed: &mut u64| {
        json!({
            "name": name,
            "description": prose(seed, 120),
            "input_schema": {
                "type": "object",
                "properties": {
                    "query": {"type": "string", "description": prose(seed, 40)},
                    "limit": {"type": "integer", "minimum": 1, "maximum": 100},
                    "filters": {"type": "array", "items": {"type": "string"}}
                },
                "required": ["query"]
            }
        })
    };
    json!([
        tool("search_docs", seed),
        tool("get_weather", seed),
        tool("run_sql", seed)
    ])
}

/// A realistic body of at least `target` bytes.
fn body(target: usize) -> Vec<u8> {
    let mut seed = target as u64;
    let system_len = (target / 8).clamp(100, 4_000);
    let mut request = json!({
        "model": "claude-opus-4-7",
        "max_tokens": 4096,
        "stream": true,
        "temperature": 0.7,
        "system": [{"type": "text", "text": prose(&mut seed, system_len),
                    "cache_control": {"type": "ephemeral"}}],
        "metadata": {"user_id": "user-123"},
        "messages": [],
    });
    if target >= 4_000 {
        request["tools"] = tools(&mut seed);
    }
    let turn_len = (target / 10).clamp(60, 3_000);
    let mut turn = 0u32;
    loop {
        let len = serde_json::to_vec(&request).map_or(0, |b| b.len());
        if len >= target {
            break;
        }
        let message = match turn % 4 {
            0 => json!({"role": "user", "content": prose(&mut seed, turn_len)}),
            1 => json!({"role": "assistant", "content": [
                {"type": "text", "text": prose(&mut seed, turn_len / 2)},
                {"type": "tool_use", "id": format!("toolu_{turn:04}"), "name": "search_docs",
                 "input": {"query": prose(&mut seed, 30), "limit": 10}}
            ]}),
            2 => json!({"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": format!("toolu_{:04}", turn - 1),
                 "content": [{"type": "text", "text": prose(&mut seed, turn_len)}]}
            ]}),
            _ => json!({"role": "assistant", "content": [
                {"type": "text", "text": prose(&mut seed, turn_len)}
            ]}),
        };
        if let Some(messages) = request["messages"].as_array_mut() {
            messages.push(message);
        }
        turn += 1;
    }
    // The last message must be from the user.
    if let Some(messages) = request["messages"].as_array_mut() {
        messages.push(json!({"role": "user", "content": "Please continue."}));
    }
    serde_json::to_vec(&request).unwrap_or_default()
}

/// `body` with a cached block as its last message (the breakpoint an agent moves forward each
/// turn).
fn agent_turn(body: &[u8]) -> Vec<u8> {
    let mut request: Value = serde_json::from_slice(body).unwrap_or_default();
    if let Some(messages) = request["messages"].as_array_mut() {
        messages.pop();
        messages.push(json!({"role": "user", "content": [
            {"type": "text", "text": "Please continue.", "cache_control": {"type": "ephemeral"}}
        ]}));
    }
    let out = serde_json::to_vec(&request).unwrap_or_default();
    assert_eq!(
        RequestMeta::scan(&out)
            .map(|m| m.cache_breakpoints.len())
            .ok(),
        Some(2)
    );
    out
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("meta");
    for (name, target) in [("1KB", 1_000), ("10KB", 10_000), ("100KB", 100_000)] {
        let body = body(target);
        assert!(RequestMeta::scan(&body).is_ok());
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_with_input(BenchmarkId::new("scan", name), &body, |b, body| {
            b.iter(|| RequestMeta::scan(black_box(body)))
        });
        // An agent turn: `cache_control` on the last message too, so the prefix hashed for
        // the prompt-cache estimate is nearly the whole body.
        let agent = agent_turn(&body);
        group.bench_with_input(BenchmarkId::new("scan_agent", name), &agent, |b, body| {
            b.iter(|| RequestMeta::scan(black_box(body)))
        });
        group.bench_with_input(BenchmarkId::new("rewrite_model", name), &body, |b, body| {
            b.iter(|| rewrite_model(black_box(body), black_box("claude-sonnet-4-6")))
        });
        group.bench_with_input(
            BenchmarkId::new("serde_json_value", name),
            &body,
            |b, body| b.iter(|| serde_json::from_slice::<Value>(black_box(body))),
        );
    }
    // The proxy benchmarks' request (`benches/proxy/drive.py`): one ~2 KB ASCII prompt.
    let proxy = format!(
        r#"{{"model":"claude-haiku-4-5","max_tokens":100,"messages":[{{"role":"user","content":"0123456789abcdef #1 {}"}}]}}"#,
        "lorem ipsum ".repeat(160)
    );
    assert!(RequestMeta::scan(proxy.as_bytes()).is_ok());
    group.throughput(Throughput::Bytes(proxy.len() as u64));
    group.bench_with_input(BenchmarkId::new("scan", "proxy_2KB"), &proxy, |b, body| {
        b.iter(|| RequestMeta::scan(black_box(body.as_bytes())))
    });
    // The answer of the proxy benchmarks' upstream (`scripts/bench-upstream.sh`): its usage,
    // as the usage tracker reads it at the end of a JSON answer.
    let answer = br#"{"id":"msg_bench","type":"message","role":"assistant","model":"claude-haiku-4-5","content":[{"type":"text","text":"fn main() { println!(hello); }"}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":512,"output_tokens":24}}"#;
    assert!(Usage::from_json(answer).is_some());
    group.throughput(Throughput::Bytes(answer.len() as u64));
    group.bench_function("usage_from_json/answer", |b| {
        b.iter(|| Usage::from_json(black_box(answer)))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
