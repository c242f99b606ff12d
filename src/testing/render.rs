//! Deterministic ids, generated text, and the JSON / SSE renderings of an answer.

use bytes::Bytes;
use serde::Serialize;

const BASE62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// The words of generated answers; each word is one output token.
#[rustfmt::skip]
const WORDS: &[&str] = &[
    "The", "simulator", "answers", "every", "request", "with", "a", "steady", "stream", "of",
    "plain", "words", "so", "that", "tests", "can", "count", "tokens", "and", "check", "each",
    "byte", "it", "sends", "back", "to", "the", "caller", "without", "surprises",
];

/// Salt of `request-id` values.
pub(crate) const SALT_REQUEST_ID: u64 = 1;
/// Salt of message ids.
pub(crate) const SALT_MESSAGE_ID: u64 = 2;

/// Output tokens carried by one `content_block_delta`.
pub(crate) const TOKENS_PER_DELTA: u64 = 5;

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// `prefix` + `01` + 22 base-62 digits derived from (seed, seq, salt): the shape of the real
/// API's ids, deterministic for a seed and a request number.
pub(crate) fn make_id(prefix: &str, seed: u64, seq: u64, salt: u64) -> String {
    let mut state = splitmix64(seed ^ splitmix64(seq.wrapping_add(salt.rotate_left(32))));
    let mut id = String::with_capacity(prefix.len() + 24);
    id.push_str(prefix);
    id.push_str("01");
    for i in 0..22 {
        if i % 10 == 0 {
            state = splitmix64(state);
        }
        let digit = (state >> ((i % 10) * 6)) & 63;
        id.push(BASE62[(digit % 62) as usize] as char);
    }
    id
}

/// The text of `tokens` output tokens for request `seq`, as the pieces sent by successive
/// deltas with their token counts (the concatenation of the pieces is the whole text).
pub(crate) fn text_pieces(seq: u64, tokens: u64) -> Vec<(String, u64)> {
    let mut pieces = Vec::new();
    let mut current = String::new();
    let mut in_current = 0;
    for i in 0..tokens {
        if i > 0 {
            current.push(' ');
        }
        current.push_str(WORDS[((seq + i) % WORDS.len() as u64) as usize]);
        in_current += 1;
        if in_current == TOKENS_PER_DELTA || i + 1 == tokens {
            pieces.push((std::mem::take(&mut current), in_current));
            in_current = 0;
        }
    }
    pieces
}

/// What an answer says, shared by both renderings.
pub(crate) struct Answer<'a> {
    pub(crate) id: &'a str,
    pub(crate) model: &'a str,
    pub(crate) input_tokens: u64,
    pub(crate) output_tokens: u64,
    pub(crate) stop_reason: &'static str,
    /// `cache_creation_input_tokens` and `cache_read_input_tokens`.
    pub(crate) cache: (u64, u64),
    /// Of the cache writes, those with the 1-hour TTL (`cache_creation.ephemeral_1h_input_tokens`).
    pub(crate) cache_1h: u64,
}

/// `usage`, with the fields in the real API's order.
#[derive(Serialize)]
struct UsageJson {
    input_tokens: u64,
    cache_creation_input_tokens: u64,
    cache_read_input_tokens: u64,
    cache_creation: CacheCreationJson,
    output_tokens: u64,
}

/// `usage.cache_creation`: the cache writes by TTL.
#[derive(Serialize)]
struct CacheCreationJson {
    ephemeral_5m_input_tokens: u64,
    ephemeral_1h_input_tokens: u64,
}

fn usage(answer: &Answer<'_>, output: u64) -> UsageJson {
    UsageJson {
        input_tokens: answer.input_tokens,
        cache_creation_input_tokens: answer.cache.0,
        cache_read_input_tokens: answer.cache.1,
        cache_creation: CacheCreationJson {
            ephemeral_5m_input_tokens: answer.cache.0.saturating_sub(answer.cache_1h),
            ephemeral_1h_input_tokens: answer.cache_1h.min(answer.cache.0),
        },
        output_tokens: output,
    }
}

#[derive(Serialize)]
struct TextBlock<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    text: &'a str,
}

/// A message object, with the fields in the real API's order (`id`, `type`, ...).
#[derive(Serialize)]
struct MessageJson<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    role: &'static str,
    model: &'a str,
    content: Vec<TextBlock<'a>>,
    stop_reason: Option<&'static str>,
    stop_sequence: Option<&'static str>,
    usage: UsageJson,
}

fn to_json<T: Serialize>(value: &T) -> String {
    // Serializing these plain structs cannot fail.
    serde_json::to_string(value).unwrap_or_default()
}

/// The non-streaming JSON answer.
pub(crate) fn message_json(answer: &Answer<'_>, text: &str) -> Bytes {
    Bytes::from(to_json(&MessageJson {
        id: answer.id,
        kind: "message",
        role: "assistant",
        model: answer.model,
        content: vec![TextBlock { kind: "text", text }],
        stop_reason: Some(answer.stop_reason),
        stop_sequence: None,
        usage: usage(answer, answer.output_tokens),
    }))
}

fn event(name: &str, data: &str) -> Bytes {
    Bytes::from(format!("event: {name}\ndata: {data}\n\n"))
}

/// `message_start`: empty content, input usage, one output token (as the real API reports).
pub(crate) fn sse_message_start(answer: &Answer<'_>) -> Bytes {
    let message = to_json(&MessageJson {
        id: answer.id,
        kind: "message",
        role: "assistant",
        model: answer.model,
        content: Vec::new(),
        stop_reason: None,
        stop_sequence: None,
        usage: usage(answer, answer.output_tokens.min(1)),
    });
    event(
        "message_start",
        &format!(r#"{{"type":"message_start","message":{message}}}"#),
    )
}

pub(crate) fn sse_content_block_start() -> Bytes {
    event(
        "content_block_start",
        r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
    )
}

pub(crate) fn sse_ping() -> Bytes {
    event("ping", r#"{"type": "ping"}"#)
}

pub(crate) fn sse_text_delta(text: &str) -> Bytes {
    let text = to_json(&text);
    event(
        "content_block_delta",
        &format!(
            r#"{{"type":"content_block_delta","index":0,"delta":{{"type":"text_delta","text":{text}}}}}"#
        ),
    )
}

pub(crate) fn sse_content_block_stop() -> Bytes {
    event(
        "content_block_stop",
        r#"{"type":"content_block_stop","index":0}"#,
    )
}

/// `message_delta` with the stop reason and the cumulative usage.
pub(crate) fn sse_message_delta(answer: &Answer<'_>) -> Bytes {
    let usage = to_json(&usage(answer, answer.output_tokens));
    let stop_reason = answer.stop_reason;
    event(
        "message_delta",
        &format!(
            r#"{{"type":"message_delta","delta":{{"stop_reason":"{stop_reason}","stop_sequence":null}},"usage":{usage}}}"#
        ),
    )
}

pub(crate) fn sse_message_stop() -> Bytes {
    event("message_stop", r#"{"type":"message_stop"}"#)
}

/// An `event: error` carrying an error envelope (raw bytes: the simulator may send a broken
/// one; [`ApiError::to_sse_event`](crate::anthropic::ApiError::to_sse_event) writes a
/// well-formed one).
pub(crate) fn sse_error(envelope: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(envelope.len() + 24);
    out.extend_from_slice(b"event: error\ndata: ");
    out.extend_from_slice(envelope);
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_deterministic_and_distinct() {
        let a = make_id("msg_", 7, 1, 0);
        assert_eq!(a, make_id("msg_", 7, 1, 0));
        assert_ne!(a, make_id("msg_", 7, 2, 0));
        assert_ne!(a, make_id("msg_", 8, 1, 0));
        assert_eq!(a.len(), 4 + 24);
        assert!(a.starts_with("msg_01"));
        assert!(a[4..].bytes().all(|b| b.is_ascii_alphanumeric()));
    }

    #[test]
    fn text_has_one_word_per_token_split_in_deltas() {
        let pieces = text_pieces(3, 12);
        let counts: Vec<u64> = pieces.iter().map(|p| p.1).collect();
        assert_eq!(counts, [5, 5, 2]);
        let text: String = pieces.into_iter().map(|p| p.0).collect();
        assert_eq!(text.split(' ').count(), 12);
        assert!(text_pieces(3, 0).is_empty());
        assert_eq!(text_pieces(0, 1), vec![("The".to_string(), 1)]);
    }

    #[test]
    fn sse_events_are_framed() {
        let answer = Answer {
            id: "msg_1",
            model: "m",
            input_tokens: 3,
            output_tokens: 4,
            stop_reason: "end_turn",
            cache: (0, 0),
            cache_1h: 0,
        };
        let start = sse_message_start(&answer);
        assert!(start.starts_with(b"event: message_start\ndata: {\"type\":\"message_start\""));
        assert!(start.ends_with(b"}\n\n"));
        let json = message_json(&answer, "a \"quoted\" word");
        assert!(json.starts_with(br#"{"id":"msg_1","type":"message","role":"assistant""#));
        let parsed: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(parsed["content"][0]["text"], "a \"quoted\" word");
        let delta: serde_json::Value = serde_json::from_slice(
            sse_text_delta("x\ny")
                .strip_prefix(b"event: content_block_delta\ndata: ".as_slice())
                .unwrap(),
        )
        .unwrap();
        assert_eq!(delta["delta"]["text"], "x\ny");
        let delta = String::from_utf8(sse_message_delta(&answer).to_vec()).unwrap();
        assert!(delta.contains(r#""output_tokens":4"#));
        assert!(delta.contains(r#""stop_reason":"end_turn""#));
        assert_eq!(&sse_error(b"{}")[..], b"event: error\ndata: {}\n\n");
    }
}
