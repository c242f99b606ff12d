//! Deterministic ids, generated text, and the JSON / SSE renderings of an answer.

use bytes::Bytes;
use serde_json::json;

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
}

fn usage(input: u64, output: u64) -> serde_json::Value {
    json!({
        "input_tokens": input,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": output,
    })
}

/// The non-streaming JSON answer.
pub(crate) fn message_json(answer: &Answer<'_>, text: &str) -> Bytes {
    let value = json!({
        "id": answer.id,
        "type": "message",
        "role": "assistant",
        "model": answer.model,
        "content": [{"type": "text", "text": text}],
        "stop_reason": answer.stop_reason,
        "stop_sequence": null,
        "usage": usage(answer.input_tokens, answer.output_tokens),
    });
    Bytes::from(value.to_string())
}

fn event(name: &str, data: &serde_json::Value) -> Bytes {
    Bytes::from(format!("event: {name}\ndata: {data}\n\n"))
}

/// `message_start`: empty content, input usage, one output token (as the real API reports).
pub(crate) fn sse_message_start(answer: &Answer<'_>) -> Bytes {
    event(
        "message_start",
        &json!({
            "type": "message_start",
            "message": {
                "id": answer.id,
                "type": "message",
                "role": "assistant",
                "model": answer.model,
                "content": [],
                "stop_reason": null,
                "stop_sequence": null,
                "usage": usage(answer.input_tokens, answer.output_tokens.min(1)),
            }
        }),
    )
}

pub(crate) fn sse_content_block_start() -> Bytes {
    event(
        "content_block_start",
        &json!({"type": "content_block_start", "index": 0,
                "content_block": {"type": "text", "text": ""}}),
    )
}

pub(crate) fn sse_ping() -> Bytes {
    event("ping", &json!({"type": "ping"}))
}

pub(crate) fn sse_text_delta(text: &str) -> Bytes {
    event(
        "content_block_delta",
        &json!({"type": "content_block_delta", "index": 0,
                "delta": {"type": "text_delta", "text": text}}),
    )
}

pub(crate) fn sse_content_block_stop() -> Bytes {
    event(
        "content_block_stop",
        &json!({"type": "content_block_stop", "index": 0}),
    )
}

/// `message_delta` with the stop reason and the cumulative usage.
pub(crate) fn sse_message_delta(answer: &Answer<'_>) -> Bytes {
    event(
        "message_delta",
        &json!({
            "type": "message_delta",
            "delta": {"stop_reason": answer.stop_reason, "stop_sequence": null},
            "usage": usage(answer.input_tokens, answer.output_tokens),
        }),
    )
}

pub(crate) fn sse_message_stop() -> Bytes {
    event("message_stop", &json!({"type": "message_stop"}))
}

/// An `event: error` carrying an error envelope.
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
        };
        let start = sse_message_start(&answer);
        assert!(start.starts_with(b"event: message_start\ndata: {"));
        assert!(start.ends_with(b"}\n\n"));
        let delta = String::from_utf8(sse_message_delta(&answer).to_vec()).unwrap();
        assert!(delta.contains(r#""output_tokens":4"#));
        assert!(delta.contains(r#""stop_reason":"end_turn""#));
        assert_eq!(&sse_error(b"{}")[..], b"event: error\ndata: {}\n\n");
    }
}
