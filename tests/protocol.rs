//! Property tests for the protocol parsers in `tower_claude::anthropic`:
//!
//! * `SseParser` / `StreamTracker` give the same events, usage, completion and error however a
//!   realistic Messages API SSE stream is cut into chunks (inside multi-byte UTF-8 characters,
//!   between `\r` and `\n`, ...), with `\n`, `\r\n` or `\r` line endings;
//! * `RequestMeta::scan` never panics, agrees with `serde_json` on what is valid JSON, reads the
//!   same fields as `serde_json`, and never estimates fewer tokens than a third of the prompt's
//!   bytes;
//! * `RequestMeta`'s prompt-cache breakpoints do not depend on the member order of the body nor
//!   on what follows the last breakpoint;
//! * `rewrite_model` changes the top-level `model` value and no other byte.

use proptest::prelude::*;
use proptest::sample::Index;
use serde_json::{Value, json};
use tower_claude::anthropic::{
    ApiErrorKind, MAX_BREAKPOINTS, MetaErrorKind, RequestMeta, SseEvent, SseParser, StreamTracker,
    Usage, rewrite_model,
};

// ---------------------------------------------------------------------------------------------
// SSE streams
// ---------------------------------------------------------------------------------------------

/// One piece of a stream: a named event with its data, or a comment line.
#[derive(Debug, Clone)]
enum Piece {
    Event(String, String),
    Comment(String),
}

/// Noise inserted before a content block.
#[derive(Debug, Clone, Copy)]
enum Noise {
    None,
    Ping,
    Comment,
    Unknown,
}

#[derive(Debug, Clone)]
struct Block {
    noise: Noise,
    tool: bool,
    deltas: Vec<String>,
}

#[derive(Debug, Clone, Copy)]
enum Ending {
    /// `message_delta` then `message_stop`.
    Complete,
    /// Like `Complete`, without the final blank line (dispatched by `finish`).
    CompleteNoBlankLine,
    /// `message_delta` then `event: error`.
    DeltaThenError,
    /// `event: error` right after the content.
    Error,
    /// The connection drops after the content.
    Truncated,
}

#[derive(Debug, Clone)]
struct Stream {
    start: Usage,
    blocks: Vec<Block>,
    delta_output: u64,
    delta_input: Option<u64>,
    ending: Ending,
    /// 0: `\n`, 1: `\r\n`, 2: `\r`, 3: `\n` or `\r\n` chosen per line.
    eol: u8,
    eol_choices: Vec<bool>,
    space_after_colon: bool,
}

/// What a correct tracker reports for a stream.
#[derive(Debug, Clone, PartialEq)]
struct Expected {
    usage: Usage,
    content_started: bool,
    complete: bool,
    error: Option<ApiErrorKind>,
}

fn text() -> impl Strategy<Value = String> {
    // ASCII, 2-, 3- and 4-byte UTF-8, and characters JSON escapes.
    proptest::string::string_regex("[a-zA-Z .,é€日本語😀🦀\"\\\\\\n\\t]{0,16}").unwrap()
}

fn block() -> impl Strategy<Value = Block> {
    (0u8..4, any::<bool>(), prop::collection::vec(text(), 0..5)).prop_map(|(n, tool, deltas)| {
        let noise = match n {
            0 => Noise::None,
            1 => Noise::Ping,
            2 => Noise::Comment,
            _ => Noise::Unknown,
        };
        Block {
            noise,
            tool,
            deltas,
        }
    })
}

fn stream() -> impl Strategy<Value = Stream> {
    (
        (0u64..200_000, 0u64..50_000, 0u64..500_000, 0u64..5),
        prop::collection::vec(block(), 0..5),
        (1u64..64_000, prop::option::of(0u64..200_000)),
        0u8..5,
        0u8..4,
        prop::collection::vec(any::<bool>(), 64),
        any::<bool>(),
    )
        .prop_map(
            |(
                (input, creation, read, output),
                blocks,
                (delta_output, delta_input),
                end,
                eol,
                eol_choices,
                space,
            )| {
                let ending = match end {
                    0 => Ending::Complete,
                    1 => Ending::CompleteNoBlankLine,
                    2 => Ending::DeltaThenError,
                    3 => Ending::Error,
                    _ => Ending::Truncated,
                };
                Stream {
                    start: Usage {
                        input_tokens: input,
                        output_tokens: output,
                        cache_creation_input_tokens: creation,
                        cache_read_input_tokens: read,
                        cache_creation_1h_input_tokens: 0,
                    },
                    blocks,
                    delta_output,
                    delta_input,
                    ending,
                    eol,
                    eol_choices,
                    space_after_colon: space,
                }
            },
        )
}

fn event(name: &str, data: Value) -> Piece {
    Piece::Event(name.to_owned(), data.to_string())
}

const OVERLOADED: &str =
    r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;

impl Stream {
    fn pieces(&self) -> Vec<Piece> {
        let mut out = vec![event(
            "message_start",
            json!({"type":"message_start","message":{
                "id":"msg_01","type":"message","role":"assistant","content":[],
                "model":"claude-opus-4-7","stop_reason":null,"stop_sequence":null,
                "usage":{
                    "input_tokens": self.start.input_tokens,
                    "cache_creation_input_tokens": self.start.cache_creation_input_tokens,
                    "cache_read_input_tokens": self.start.cache_read_input_tokens,
                    "output_tokens": self.start.output_tokens,
                    "service_tier":"standard"}}}),
        )];
        for (index, block) in self.blocks.iter().enumerate() {
            match block.noise {
                Noise::None => {}
                Noise::Ping => out.push(event("ping", json!({"type":"ping"}))),
                Noise::Comment => out.push(Piece::Comment("keep-alive é".to_owned())),
                Noise::Unknown => out.push(event(
                    "future_event",
                    json!({"type":"future_event","x":[1,2]}),
                )),
            }
            let start = if block.tool {
                json!({"type":"tool_use","id":"toolu_01","name":"get_weather","input":{}})
            } else {
                json!({"type":"text","text":""})
            };
            out.push(event(
                "content_block_start",
                json!({"type":"content_block_start","index":index,"content_block":start}),
            ));
            for delta in &block.deltas {
                let delta = if block.tool {
                    json!({"type":"input_json_delta","partial_json":delta})
                } else {
                    json!({"type":"text_delta","text":delta})
                };
                out.push(event(
                    "content_block_delta",
                    json!({"type":"content_block_delta","index":index,"delta":delta}),
                ));
            }
            out.push(event(
                "content_block_stop",
                json!({"type":"content_block_stop","index":index}),
            ));
        }
        let mut usage = json!({"output_tokens": self.delta_output});
        if let Some(input) = self.delta_input {
            usage["input_tokens"] = json!(input);
        }
        let delta = event(
            "message_delta",
            json!({"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":usage}),
        );
        let error = Piece::Event("error".to_owned(), OVERLOADED.to_owned());
        match self.ending {
            Ending::Complete | Ending::CompleteNoBlankLine => {
                out.push(delta);
                out.push(event("message_stop", json!({"type":"message_stop"})));
            }
            Ending::DeltaThenError => {
                out.push(delta);
                out.push(error);
            }
            Ending::Error => out.push(error),
            Ending::Truncated => {}
        }
        out
    }

    /// The events a parser yields (comments dropped).
    fn events(&self) -> Vec<SseEvent> {
        self.pieces()
            .into_iter()
            .filter_map(|p| match p {
                Piece::Event(name, data) => Some(SseEvent {
                    event: Some(name),
                    data,
                }),
                Piece::Comment(_) => None,
            })
            .collect()
    }

    fn bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut line = 0usize;
        let mut eol = |out: &mut Vec<u8>| {
            let choice = self.eol_choices[line % self.eol_choices.len()];
            line += 1;
            out.extend_from_slice(match (self.eol, choice) {
                (0, _) | (3, false) => b"\n",
                (1, _) | (3, true) => b"\r\n",
                _ => b"\r",
            });
        };
        let sep: &[u8] = if self.space_after_colon { b": " } else { b":" };
        for piece in self.pieces() {
            match piece {
                Piece::Event(name, data) => {
                    out.extend_from_slice(b"event");
                    out.extend_from_slice(sep);
                    out.extend_from_slice(name.as_bytes());
                    eol(&mut out);
                    out.extend_from_slice(b"data");
                    out.extend_from_slice(sep);
                    out.extend_from_slice(data.as_bytes());
                    eol(&mut out);
                    eol(&mut out);
                }
                Piece::Comment(text) => {
                    out.push(b':');
                    out.extend_from_slice(text.as_bytes());
                    eol(&mut out);
                }
            }
        }
        if matches!(self.ending, Ending::CompleteNoBlankLine) {
            // Drop the blank line after the last event.
            let cut = if out.ends_with(b"\r\n") { 2 } else { 1 };
            out.truncate(out.len() - cut);
        }
        out
    }

    fn expected(&self) -> Expected {
        let mut usage = self.start;
        let content_started;
        let mut complete = false;
        let mut error = None;
        match self.ending {
            Ending::Complete | Ending::CompleteNoBlankLine | Ending::DeltaThenError => {
                usage.output_tokens = self.delta_output;
                if let Some(input) = self.delta_input {
                    usage.input_tokens = input;
                }
                content_started = true;
                if matches!(self.ending, Ending::DeltaThenError) {
                    error = Some(ApiErrorKind::Overloaded);
                } else {
                    complete = true;
                }
            }
            Ending::Error | Ending::Truncated => {
                content_started = !self.blocks.is_empty();
                if matches!(self.ending, Ending::Error) {
                    error = Some(ApiErrorKind::Overloaded);
                }
            }
        }
        Expected {
            usage,
            content_started,
            complete,
            error,
        }
    }
}

/// Splits `bytes` at the given cut points.
fn chunks<'a>(bytes: &'a [u8], cuts: &[Index]) -> Vec<&'a [u8]> {
    let mut points: Vec<usize> = cuts.iter().map(|c| c.index(bytes.len() + 1)).collect();
    points.sort_unstable();
    points.dedup();
    let mut out = Vec::new();
    let mut at = 0;
    for p in points {
        out.push(&bytes[at..p]);
        at = p;
    }
    out.push(&bytes[at..]);
    out
}

fn parse(chunks: &[&[u8]]) -> Vec<SseEvent> {
    let mut parser = SseParser::new();
    let mut out = Vec::new();
    for chunk in chunks {
        parser.push(chunk, &mut out);
    }
    parser.finish(&mut out);
    out
}

fn track(chunks: &[&[u8]]) -> Expected {
    let mut tracker = StreamTracker::new();
    for chunk in chunks {
        tracker.feed(chunk);
    }
    tracker.finish();
    Expected {
        usage: tracker.usage(),
        content_started: tracker.content_started(),
        complete: tracker.is_complete(),
        error: tracker.error().map(|e| e.kind()),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn sse_events_do_not_depend_on_chunking(
        stream in stream(),
        cuts in prop::collection::vec(any::<Index>(), 0..40),
    ) {
        let bytes = stream.bytes();
        let whole = parse(&[&bytes]);
        prop_assert_eq!(&whole, &stream.events());
        let chunked = parse(&chunks(&bytes, &cuts));
        prop_assert_eq!(&chunked, &whole);
        // One byte at a time: every UTF-8 character and every `\r\n` is split.
        let bytewise: Vec<&[u8]> = bytes.chunks(1).collect();
        prop_assert_eq!(parse(&bytewise), whole);
    }

    #[test]
    fn tracker_state_does_not_depend_on_chunking(
        stream in stream(),
        cuts in prop::collection::vec(any::<Index>(), 0..40),
    ) {
        let bytes = stream.bytes();
        let expected = stream.expected();
        prop_assert_eq!(&track(&[&bytes]), &expected);
        prop_assert_eq!(&track(&chunks(&bytes, &cuts)), &expected);
        let bytewise: Vec<&[u8]> = bytes.chunks(1).collect();
        prop_assert_eq!(&track(&bytewise), &expected);
    }
}

// ---------------------------------------------------------------------------------------------
// Request bodies
// ---------------------------------------------------------------------------------------------

/// A realistic Messages API request body as top-level (name, JSON value) members.
#[derive(Debug, Clone)]
struct Request {
    members: Vec<(String, Value)>,
    /// Whitespace around `:` and `,` at the top level, and whether values are pretty-printed.
    ws: Vec<&'static str>,
    pretty: bool,
}

fn content_block() -> impl Strategy<Value = Value> {
    prop_oneof![
        text().prop_map(|t| json!({"type":"text","text":t})),
        text().prop_map(|t| json!({"type":"text","text":t,"cache_control":{"type":"ephemeral"}})),
        (text(), 0u32..100).prop_map(|(t, n)| json!({"type":"tool_use","id":format!("toolu_{n}"),
            "name":"lookup","input":{"query":t,"model":"nested-model","limit":n}})),
        text().prop_map(|t| json!({"type":"tool_result","tool_use_id":"toolu_1",
            "content":[{"type":"text","text":t}],"is_error":false})),
    ]
}

fn message() -> impl Strategy<Value = Value> {
    (
        any::<bool>(),
        prop_oneof![
            text().prop_map(Value::from),
            prop::collection::vec(content_block(), 1..4).prop_map(Value::from),
        ],
    )
        .prop_map(|(user, content)| {
            json!({"role": if user { "user" } else { "assistant" }, "content": content})
        })
}

fn tool() -> impl Strategy<Value = Value> {
    (text(), text()).prop_map(|(name, description)| {
        json!({"name": name, "description": description, "input_schema": {
            "type":"object",
            "properties":{"model":{"type":"string","description":"a nested model key"},
                          "count":{"type":"integer","minimum":0}},
            "required":["model"]}})
    })
}

fn request() -> impl Strategy<Value = Request> {
    let model = prop_oneof![
        Just(Some("claude-opus-4-7".to_owned())),
        Just(Some("claude-haiku-4-5-20251001".to_owned())),
        text().prop_map(Some),
        Just(None),
    ];
    (
        model,
        0u64..200_000,
        prop::option::of(any::<bool>()),
        prop::option::of(0.0f64..1.0),
        prop::option::of(prop_oneof![
            text().prop_map(Value::from),
            prop::collection::vec(text().prop_map(|t| json!({"type":"text","text":t})), 1..3)
                .prop_map(Value::from),
        ]),
        prop::collection::vec(message(), 1..6),
        prop::collection::vec(tool(), 0..3),
        prop::collection::vec(
            prop::sample::select(vec!["", " ", "\n", "\t", "\r\n  "]),
            64,
        ),
        any::<bool>(),
    )
        .prop_flat_map(
            |(model, max_tokens, stream, temperature, system, messages, tools, ws, pretty)| {
                let mut members: Vec<(String, Value)> = vec![
                    ("max_tokens".to_owned(), json!(max_tokens)),
                    ("messages".to_owned(), Value::from(messages)),
                    (
                        "metadata".to_owned(),
                        json!({"user_id":"u-1","model":"metadata-model"}),
                    ),
                ];
                if let Some(model) = model {
                    members.push(("model".to_owned(), Value::from(model)));
                }
                if let Some(stream) = stream {
                    members.push(("stream".to_owned(), json!(stream)));
                }
                if let Some(t) = temperature {
                    members.push(("temperature".to_owned(), json!(t)));
                }
                if let Some(system) = system {
                    members.push(("system".to_owned(), system));
                }
                if !tools.is_empty() {
                    members.push(("tools".to_owned(), Value::from(tools)));
                }
                (Just(members).prop_shuffle(), Just(ws), Just(pretty))
            },
        )
        .prop_map(|(members, ws, pretty)| Request {
            members,
            ws,
            pretty,
        })
}

impl Request {
    /// The body and, when present, the byte span of the top-level `model` value.
    fn render(&self) -> (Vec<u8>, Option<(usize, usize)>) {
        let mut out = Vec::new();
        let mut span = None;
        let mut ws = self.ws.iter().cycle();
        out.extend_from_slice(ws.next().unwrap().as_bytes());
        out.push(b'{');
        for (i, (name, value)) in self.members.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(ws.next().unwrap().as_bytes());
            out.extend_from_slice(serde_json::to_string(name).unwrap().as_bytes());
            out.extend_from_slice(ws.next().unwrap().as_bytes());
            out.push(b':');
            out.extend_from_slice(ws.next().unwrap().as_bytes());
            let start = out.len();
            let value = if self.pretty {
                serde_json::to_vec_pretty(value).unwrap()
            } else {
                serde_json::to_vec(value).unwrap()
            };
            out.extend_from_slice(&value);
            if name == "model" {
                span = Some((start, out.len()));
            }
            out.extend_from_slice(ws.next().unwrap().as_bytes());
        }
        out.push(b'}');
        out.extend_from_slice(ws.next().unwrap().as_bytes());
        (out, span)
    }

    fn get(&self, name: &str) -> Option<&Value> {
        self.members.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    /// Bytes of every decoded string (keys and values) in the prompt-bearing members.
    fn prompt_bytes(&self) -> u64 {
        fn walk(v: &Value) -> u64 {
            match v {
                Value::String(s) => s.len() as u64,
                Value::Array(a) => a.iter().map(walk).sum(),
                Value::Object(o) => o.iter().map(|(k, v)| k.len() as u64 + walk(v)).sum(),
                _ => 0,
            }
        }
        ["system", "messages", "tools"]
            .iter()
            .filter_map(|n| self.get(n))
            .map(walk)
            .sum()
    }
}

/// Whether `serde_json` accepts `bytes` as one JSON document; `None` for lone UTF-16
/// surrogates in `\u` escapes, which serde_json rejects and the scanner (which checks syntax,
/// not what escapes decode to) accepts.
fn serde_valid(bytes: &[u8]) -> Option<bool> {
    // `Value` (not `IgnoredAny`) so that strings are decoded and their UTF-8 checked.
    match serde_json::from_slice::<Value>(bytes) {
        Ok(_) => Some(true),
        Err(e) if e.to_string().contains("surrogate") => None,
        Err(_) => Some(false),
    }
}

fn top_is_object(bytes: &[u8]) -> bool {
    bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{')
}

/// `scan` must agree with serde_json about validity, and never panic.
fn check_scan_agrees(bytes: &[u8]) -> Result<(), TestCaseError> {
    let result = RequestMeta::scan(bytes);
    if let Err(e) = &result {
        prop_assert!(e.offset() <= bytes.len());
    }
    let kind = result.as_ref().err().map(|e| e.kind());
    let Some(valid) = serde_valid(bytes) else {
        return Ok(());
    };
    if valid {
        if top_is_object(bytes) {
            prop_assert!(
                matches!(kind, None | Some(MetaErrorKind::InvalidField)),
                "valid JSON rejected: {:?} {:?}",
                result,
                String::from_utf8_lossy(bytes)
            );
        } else {
            prop_assert_eq!(kind, Some(MetaErrorKind::NotAnObject));
        }
    } else {
        prop_assert!(
            matches!(
                kind,
                Some(MetaErrorKind::InvalidJson | MetaErrorKind::NotAnObject)
            ),
            "invalid JSON accepted: {:?} {:?}",
            result,
            String::from_utf8_lossy(bytes)
        );
        if kind == Some(MetaErrorKind::NotAnObject) {
            prop_assert!(!top_is_object(bytes));
        }
    }
    Ok(())
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(Index, u8),
    Insert(Index, u8),
    Delete(Index),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let byte = prop_oneof![
        prop::sample::select(b"{}[]\":,\\ 0-.eEtfnu\n\x01".to_vec()),
        any::<u8>(),
    ];
    prop_oneof![
        (any::<Index>(), byte.clone()).prop_map(|(i, b)| Mutation::Flip(i, b)),
        (any::<Index>(), byte).prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<Index>().prop_map(Mutation::Delete),
    ]
}

fn mutate(bytes: &mut Vec<u8>, m: &Mutation) {
    match m {
        Mutation::Flip(i, b) => {
            let i = i.index(bytes.len());
            bytes[i] = *b;
        }
        Mutation::Insert(i, b) => bytes.insert(i.index(bytes.len() + 1), *b),
        Mutation::Delete(i) => {
            bytes.remove(i.index(bytes.len()));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn scan_never_panics_on_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        check_scan_agrees(&bytes)?;
        let _ = rewrite_model(&bytes, "claude-haiku-4-5");
    }

    #[test]
    fn scan_agrees_with_serde_json_on_json_like_text(
        text in "[ {}\\[\\]\":,0-9a-z\\\\.eE+-]{0,64}",
    ) {
        check_scan_agrees(text.as_bytes())?;
    }

    #[test]
    fn scan_reads_what_serde_json_reads(request in request()) {
        let (body, _) = request.render();
        let meta = RequestMeta::scan(&body).unwrap();
        prop_assert_eq!(meta.model.as_deref(), request.get("model").and_then(Value::as_str));
        prop_assert_eq!(meta.max_tokens, request.get("max_tokens").and_then(Value::as_u64));
        prop_assert_eq!(meta.stream, request.get("stream").and_then(Value::as_bool).unwrap_or(false));
        prop_assert_eq!(meta.temperature, request.get("temperature").and_then(Value::as_f64));
        // Conservative: at least one token per three bytes of prompt text.
        prop_assert!(meta.input_tokens * 3 >= request.prompt_bytes());
    }

    #[test]
    fn scan_rejects_every_truncation_and_survives_mutations(
        request in request(),
        cut in any::<Index>(),
        mutations in prop::collection::vec(mutation(), 1..4),
    ) {
        let (body, _) = request.render();
        let end = body.iter().rposition(|&b| b == b'}').unwrap();
        let prefix = &body[..cut.index(end + 1)];
        let err = RequestMeta::scan(prefix).unwrap_err();
        prop_assert_eq!(err.kind(), MetaErrorKind::InvalidJson);
        prop_assert!(err.offset() <= prefix.len());

        let mut mutated = body.clone();
        for m in &mutations {
            mutate(&mut mutated, m);
        }
        check_scan_agrees(&mutated)?;
    }

    #[test]
    fn cache_breakpoints_ignore_member_order_and_what_follows(request in request(), tail in text()) {
        let (body, _) = request.render();
        let meta = RequestMeta::scan(&body).unwrap();
        // One breakpoint per content block with `cache_control` (the generator puts them on
        // message text blocks only), in cache order, each prefix within the whole estimate.
        let marked = request
            .get("messages")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|m| m["content"].as_array())
            .flatten()
            .filter(|b| b.get("cache_control").is_some())
            .count();
        prop_assert_eq!(meta.cache_breakpoints.len(), marked.min(MAX_BREAKPOINTS));
        for pair in meta.cache_breakpoints.windows(2) {
            prop_assert!(pair[0].tokens <= pair[1].tokens);
        }
        for bp in &meta.cache_breakpoints {
            prop_assert!(bp.tokens <= meta.input_tokens);
        }
        // Another member order and one more message at the end: the same prefixes.
        let mut other = request.clone();
        other.members.reverse();
        if let Some((_, Value::Array(messages))) =
            other.members.iter_mut().find(|(n, _)| n == "messages")
        {
            messages.push(json!({"role": "user", "content": tail}));
        }
        let again = RequestMeta::scan(&other.render().0).unwrap();
        prop_assert_eq!(&meta.cache_breakpoints, &again.cache_breakpoints);
    }

    #[test]
    fn rewrite_model_changes_no_other_byte(request in request(), model in text()) {
        let (body, span) = request.render();
        let out = rewrite_model(&body, &model).unwrap();
        let meta = RequestMeta::scan(&out).unwrap();
        prop_assert_eq!(meta.model.as_deref(), Some(model.as_str()));
        match span {
            Some((start, end)) => {
                prop_assert_eq!(&out[..start], &body[..start]);
                let tail = body.len() - end;
                prop_assert_eq!(&out[out.len() - tail..], &body[end..]);
                let value: String = serde_json::from_slice(&out[start..out.len() - tail]).unwrap();
                prop_assert_eq!(value, model.clone());
            }
            None => {
                // Inserted right after the opening brace; the rest is untouched.
                let brace = body.iter().position(|&b| b == b'{').unwrap();
                prop_assert_eq!(&out[..=brace], &body[..=brace]);
                prop_assert_eq!(&out[out.len() - (body.len() - brace - 1)..], &body[brace + 1..]);
            }
        }
        // Semantically: the same document with `model` replaced.
        let mut expected: serde_json::Map<String, Value> = serde_json::from_slice(&body).unwrap();
        expected.insert("model".to_owned(), Value::from(model));
        let actual: serde_json::Map<String, Value> = serde_json::from_slice(&out).unwrap();
        prop_assert_eq!(actual, expected);
        // The token estimate does not depend on the model.
        prop_assert_eq!(meta.input_tokens, RequestMeta::scan(&body).unwrap().input_tokens);
    }
}
