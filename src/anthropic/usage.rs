//! Token usage from JSON responses and from SSE streams.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use super::answer::{UsageCounts, scan_answer};
use super::{ApiError, ApiErrorKind};

/// Token usage of one response.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Usage {
    /// `usage.input_tokens`.
    pub input_tokens: u64,
    /// `usage.output_tokens`.
    pub output_tokens: u64,
    /// `usage.cache_creation_input_tokens`.
    pub cache_creation_input_tokens: u64,
    /// `usage.cache_read_input_tokens`.
    pub cache_read_input_tokens: u64,
    /// Of `cache_creation_input_tokens`, those written with the 1-hour TTL
    /// (`usage.cache_creation.ephemeral_1h_input_tokens`; priced higher than 5-minute writes).
    /// 0 when the response has no `cache_creation` split: every write is then a 5-minute one.
    pub cache_creation_1h_input_tokens: u64,
}

impl Usage {
    /// Reads `usage` from a (non-streaming) Messages API JSON response.
    ///
    /// ```
    /// use tower_claude::anthropic::Usage;
    ///
    /// let body = br#"{"id":"msg_1","type":"message","usage":{"input_tokens":12,"output_tokens":30,
    ///   "cache_creation_input_tokens":100,"cache_read_input_tokens":2000}}"#;
    /// let usage = Usage::from_json(body).unwrap();
    /// assert_eq!(usage.counted_input_tokens(), 112);
    /// assert_eq!(usage.output_tokens, 30);
    /// ```
    ///
    /// `None` when the body is not JSON or has no top-level `usage` object; missing (or `null`)
    /// fields are 0. Only `usage` is decoded: the rest of the document is validated and skipped
    /// without building a tree.
    pub fn from_json(body: &[u8]) -> Option<Usage> {
        match scan_answer(body) {
            Some(answer) => answer.usage.map(Self::of_counts),
            None => Self::from_json_with_model(body).0,
        }
    }

    /// The usage a `usage` block says.
    fn of_counts(counts: UsageCounts) -> Usage {
        let mut usage = Usage::default();
        usage.apply(&counts);
        usage
    }

    /// [`from_json`](Self::from_json), and the answer's top-level `model`, in one parse.
    fn from_json_with_model(body: &[u8]) -> (Option<Usage>, Option<String>) {
        #[derive(serde::Deserialize)]
        struct Response {
            usage: Option<UsageFields>,
            model: Option<String>,
        }
        let Ok(response) = serde_json::from_slice::<Response>(body) else {
            return (None, None);
        };
        let usage = response.usage.map(|fields| Self::of_counts(fields.into()));
        (usage, response.model)
    }

    /// One pass over a whole JSON answer for everything the layers read from it: its usage
    /// and top-level `model` ([`from_json_with_model`](Self::from_json_with_model)) and
    /// whether it is a JSON object with a string `type`
    /// ([`is_typed_object`](super::error::is_typed_object), retry's test of a 200 body).
    /// A body the combined read refuses (not an object, a duplicate or mistyped member) is
    /// read by each of the two, so every answer is exactly theirs. The last element says
    /// whether `type` is `"message"` (a Messages API answer: the cache's completeness test),
    /// `None` when the combined read refused the body.
    ///
    /// Read with [`scan_answer`] (one pass, no allocation but the `model` copied), and with
    /// `serde_json` when that reader cannot decide (see there): the same answer for every
    /// body.
    fn read_json_answer(body: &[u8]) -> (Option<Usage>, Option<String>, bool, Option<bool>) {
        match scan_answer(body) {
            Some(answer) => (
                answer.usage.map(Self::of_counts),
                answer.model.map(str::to_owned),
                answer.ty.is_some(),
                Some(answer.ty == Some(&b"message"[..])),
            ),
            None => Self::read_json_answer_serde(body),
        }
    }

    /// [`read_json_answer`](Self::read_json_answer) with `serde_json`.
    fn read_json_answer_serde(body: &[u8]) -> (Option<Usage>, Option<String>, bool, Option<bool>) {
        // Borrowed strings: `type` is only tested, `model` copied once.
        #[derive(serde::Deserialize)]
        struct Response<'a> {
            #[serde(rename = "type", borrow)]
            ty: Option<std::borrow::Cow<'a, str>>,
            usage: Option<UsageFields>,
            #[serde(borrow)]
            model: Option<std::borrow::Cow<'a, str>>,
        }
        let object = body.trim_ascii_start().first() == Some(&b'{');
        // UTF-8 checked once for the whole body: read from a `str`, serde_json does not check
        // each string again (from bytes it does: a third of this read). A body that is not
        // UTF-8 is read from its bytes, which fails the same way.
        let parsed = match std::str::from_utf8(body) {
            Ok(text) => serde_json::from_str::<Response<'_>>(text),
            Err(_) => serde_json::from_slice::<Response<'_>>(body),
        };
        match parsed {
            Ok(response) if object => {
                let usage = response.usage.map(|fields| Self::of_counts(fields.into()));
                let model = response.model.map(std::borrow::Cow::into_owned);
                let message = response.ty.as_deref() == Some("message");
                (usage, model, response.ty.is_some(), Some(message))
            }
            _ => {
                let (usage, model) = Self::from_json_with_model(body);
                (usage, model, super::error::is_typed_object(body), None)
            }
        }
    }

    /// The most tokens one field of a `usage` block is taken to say (10^8: a hundred times
    /// the largest context window). A larger value (a broken or hostile upstream sending
    /// `u64::MAX`) is read as this, so that settling it cannot drain a bucket for centuries.
    pub const MAX_TOKENS: u64 = 100_000_000;

    /// Overrides the fields present in `fields`, each clamped to [`Usage::MAX_TOKENS`].
    fn apply(&mut self, fields: &UsageCounts) {
        let clamp = |v: u64| v.min(Self::MAX_TOKENS);
        if let Some(v) = fields.input_tokens {
            self.input_tokens = clamp(v);
        }
        if let Some(v) = fields.output_tokens {
            self.output_tokens = clamp(v);
        }
        if let Some(v) = fields.cache_creation_input_tokens {
            self.cache_creation_input_tokens = clamp(v);
        }
        if let Some(v) = fields.cache_read_input_tokens {
            self.cache_read_input_tokens = clamp(v);
        }
        if let Some([five, hour]) = fields.cache_creation {
            let five = five.map(clamp);
            let hour = hour.map(clamp);
            if let Some(v) = hour {
                self.cache_creation_1h_input_tokens = v;
            }
            // A split without the total (not sent by the API today) still counts its writes.
            if fields.cache_creation_input_tokens.is_none() && (five.is_some() || hour.is_some()) {
                self.cache_creation_input_tokens =
                    five.unwrap_or(0).saturating_add(hour.unwrap_or(0));
            }
        }
        // The 1-hour part never exceeds the total.
        self.cache_creation_1h_input_tokens = self
            .cache_creation_1h_input_tokens
            .min(self.cache_creation_input_tokens);
    }

    /// Of `cache_creation_input_tokens`, those written with the 5-minute TTL: all of them but
    /// the 1-hour ones.
    ///
    /// ```
    /// use tower_claude::anthropic::Usage;
    ///
    /// let body = br#"{"usage":{"input_tokens":3,"output_tokens":1,"cache_creation_input_tokens":300,
    ///   "cache_creation":{"ephemeral_5m_input_tokens":100,"ephemeral_1h_input_tokens":200}}}"#;
    /// let usage = Usage::from_json(body).unwrap();
    /// assert_eq!(usage.cache_creation_1h_input_tokens, 200);
    /// assert_eq!(usage.cache_creation_5m_input_tokens(), 100);
    /// ```
    pub fn cache_creation_5m_input_tokens(&self) -> u64 {
        self.cache_creation_input_tokens
            .saturating_sub(self.cache_creation_1h_input_tokens)
    }

    /// Input tokens that count toward the input-tokens-per-minute limit:
    /// `input_tokens + cache_creation_input_tokens` (cache reads do not count).
    pub fn counted_input_tokens(&self) -> u64 {
        self.input_tokens
            .saturating_add(self.cache_creation_input_tokens)
    }
}

/// A `usage` object as sent: every field optional (`message_delta` carries only some).
#[derive(serde::Deserialize, Default)]
struct UsageFields {
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
    #[serde(default)]
    cache_creation_input_tokens: Option<u64>,
    #[serde(default)]
    cache_read_input_tokens: Option<u64>,
    #[serde(default)]
    cache_creation: Option<CacheCreationFields>,
}

/// `usage.cache_creation`: the cache writes split by TTL.
#[derive(serde::Deserialize, Default)]
struct CacheCreationFields {
    #[serde(default)]
    ephemeral_5m_input_tokens: Option<u64>,
    #[serde(default)]
    ephemeral_1h_input_tokens: Option<u64>,
}

impl From<UsageFields> for UsageCounts {
    fn from(fields: UsageFields) -> Self {
        Self {
            input_tokens: fields.input_tokens,
            output_tokens: fields.output_tokens,
            cache_creation_input_tokens: fields.cache_creation_input_tokens,
            cache_read_input_tokens: fields.cache_read_input_tokens,
            cache_creation: fields
                .cache_creation
                .map(|c| [c.ephemeral_5m_input_tokens, c.ephemeral_1h_input_tokens]),
        }
    }
}

/// One server-sent event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event:` field, when present.
    pub event: Option<String>,
    /// The `data:` lines, joined with `\n`.
    pub data: String,
}

/// An incremental SSE parser: feed it chunks cut anywhere, get whole events.
///
/// ```
/// use tower_claude::anthropic::SseParser;
///
/// let mut parser = SseParser::new();
/// let mut events = Vec::new();
/// parser.push(b"event: ping\nda", &mut events);
/// parser.push(b"ta: {}\n\n", &mut events);
/// assert_eq!(events.len(), 1);
/// assert_eq!(events[0].event.as_deref(), Some("ping"));
/// ```
///
/// It follows the [WHATWG event-stream rules](https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation):
/// lines end with `\r\n`, `\n` or `\r`; `field: value` with one optional space after the
/// colon; lines starting with `:` are comments; `data` lines are joined with `\n`; a blank line
/// dispatches the event, and an event without any `data` line is dropped; `id`, `retry` and
/// unknown fields are ignored; a leading byte-order mark is skipped; invalid UTF-8 is replaced
/// with U+FFFD. Memory is bounded: a line longer than [`SseParser::MAX_LINE`] is skipped, and
/// an event whose data outgrows [`SseParser::MAX_EVENT`] is dropped (a broken or hostile
/// upstream cannot make the parser grow without end; Messages API events are a few hundred
/// bytes).
///
/// ```
/// use tower_claude::anthropic::SseParser;
///
/// let mut p = SseParser::new();
/// let mut out = Vec::new();
/// p.push(&vec![b'x'; SseParser::MAX_LINE + 1], &mut out); // skipped, not buffered
/// p.push(b"\nevent: ping\ndata: {}\n\n", &mut out);
/// assert_eq!(out.len(), 1);
/// assert_eq!(out[0].event.as_deref(), Some("ping"));
/// ```
#[derive(Debug, Default)]
pub struct SseParser {
    /// The current, incomplete line.
    buf: Vec<u8>,
    /// The current line is longer than `MAX_LINE`: skip it to its end.
    skipping: bool,
    /// The event being built outgrew `MAX_EVENT`: drop it at its end.
    oversized: bool,
    /// The `event` field of the event being built.
    event: Option<String>,
    /// The data buffer of the event being built: each `data` line followed by `\n`.
    data: String,
    /// The previous chunk ended with `\r`: a `\n` starting the next chunk belongs to it.
    pending_cr: bool,
    /// The first line has been seen (byte-order mark handled).
    started: bool,
}

impl SseParser {
    /// The longest line kept (1 MiB); a longer one is skipped.
    pub const MAX_LINE: usize = 1 << 20;

    /// The most data one event may carry (4 MiB); a larger event is dropped.
    pub const MAX_EVENT: usize = 4 << 20;

    /// A new parser.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds a chunk; complete events are appended to `out`.
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<SseEvent>) {
        let mut rest = chunk;
        if self.pending_cr && !rest.is_empty() {
            self.pending_cr = false;
            if rest[0] == b'\n' {
                rest = &rest[1..];
            }
        }
        while let Some(pos) = rest.iter().position(|&b| b == b'\n' || b == b'\r') {
            if std::mem::take(&mut self.skipping) || self.buf.len() + pos > Self::MAX_LINE {
                // The end of an overlong line: dropped.
                self.buf.clear();
            } else if self.buf.is_empty() {
                self.line(&rest[..pos], out);
            } else {
                let mut line = std::mem::take(&mut self.buf);
                line.extend_from_slice(&rest[..pos]);
                self.line(&line, out);
                line.clear();
                self.buf = line;
            }
            let cr = rest[pos] == b'\r';
            rest = &rest[pos + 1..];
            if cr {
                match rest.first() {
                    Some(b'\n') => rest = &rest[1..],
                    Some(_) => {}
                    None => self.pending_cr = true,
                }
            }
        }
        if self.skipping {
            return;
        }
        if self.buf.len() + rest.len() > Self::MAX_LINE {
            self.buf = Vec::new();
            self.skipping = true;
        } else {
            self.buf.extend_from_slice(rest);
        }
    }

    /// Ends the stream: a final event not followed by a blank line is dispatched.
    ///
    /// The parser is reset and can be used for a new stream.
    pub fn finish(&mut self, out: &mut Vec<SseEvent>) {
        if !self.buf.is_empty() {
            let line = std::mem::take(&mut self.buf);
            self.line(&line, out);
        }
        self.dispatch(out);
        *self = Self::default();
    }

    fn line(&mut self, mut line: &[u8], out: &mut Vec<SseEvent>) {
        if !self.started {
            self.started = true;
            line = line.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(line);
        }
        if line.is_empty() {
            self.dispatch(out);
            return;
        }
        if line[0] == b':' {
            return;
        }
        let (name, value) = match line.iter().position(|&b| b == b':') {
            Some(colon) => {
                let value = &line[colon + 1..];
                (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &[][..]),
        };
        match name {
            b"event" => self.event = Some(String::from_utf8_lossy(value).into_owned()),
            b"data" => {
                if self.oversized || self.data.len() + value.len() + 1 > Self::MAX_EVENT {
                    self.oversized = true;
                    self.data = String::new();
                } else {
                    self.data.push_str(&String::from_utf8_lossy(value));
                    self.data.push('\n');
                }
            }
            _ => {}
        }
    }

    fn dispatch(&mut self, out: &mut Vec<SseEvent>) {
        let event = self.event.take().filter(|e| !e.is_empty());
        if std::mem::take(&mut self.oversized) {
            self.data.clear();
            return;
        }
        if self.data.is_empty() {
            return;
        }
        let mut data = std::mem::take(&mut self.data);
        data.pop(); // the `\n` after the last data line
        out.push(SseEvent { event, data });
    }
}

/// Follows a Messages API SSE stream: usage from `message_start` and the cumulative
/// `message_delta`, whether content started, whether `message_stop` arrived, and a mid-stream
/// `event: error`. `ping` and unknown events are ignored.
///
/// ```
/// use tower_claude::anthropic::StreamTracker;
///
/// let mut t = StreamTracker::new();
/// t.feed(b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":10,\"output_tokens\":1}}}\n\n");
/// t.feed(b"event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":42}}\n\n");
/// t.feed(b"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n");
/// assert_eq!(t.usage().input_tokens, 10);
/// assert_eq!(t.usage().output_tokens, 42);
/// assert!(t.is_complete());
/// assert!(t.error().is_none());
/// ```
#[derive(Debug, Default)]
pub struct StreamTracker {
    parser: SseParser,
    events: Vec<SseEvent>,
    usage: Usage,
    content_started: bool,
    complete: bool,
    error: Option<ApiError>,
    /// The `model` of `message_start`.
    model: Option<String>,
}

impl StreamTracker {
    /// A new tracker.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds a chunk of the stream.
    pub fn feed(&mut self, chunk: &[u8]) {
        self.parser.push(chunk, &mut self.events);
        self.handle_events();
    }

    /// Ends the stream (dispatches a trailing event without blank line).
    pub fn finish(&mut self) {
        self.parser.finish(&mut self.events);
        self.handle_events();
    }

    fn handle_events(&mut self) {
        let mut events = std::mem::take(&mut self.events);
        for event in events.drain(..) {
            self.handle(&event);
        }
        self.events = events;
    }

    fn handle(&mut self, event: &SseEvent) {
        #[derive(serde::Deserialize)]
        struct Data {
            #[serde(rename = "type")]
            ty: Option<String>,
            message: Option<MessagePart>,
            usage: Option<UsageFields>,
        }
        #[derive(serde::Deserialize)]
        struct MessagePart {
            usage: Option<UsageFields>,
            model: Option<String>,
        }

        let from_data;
        let name = match event.event.as_deref() {
            Some(name) => name,
            None => {
                // Unnamed event: fall back to the payload's `type`.
                from_data = serde_json::from_str::<Data>(&event.data)
                    .ok()
                    .and_then(|d| d.ty);
                from_data.as_deref().unwrap_or("")
            }
        };
        match name {
            "message_start" => {
                if let Ok(Data {
                    message: Some(MessagePart { usage, model }),
                    ..
                }) = serde_json::from_str::<Data>(&event.data)
                {
                    if let Some(u) = usage {
                        self.usage.apply(&u.into());
                    }
                    self.model = model.or(self.model.take());
                }
            }
            "message_delta" => {
                self.content_started = true;
                if let Ok(Data { usage: Some(u), .. }) = serde_json::from_str::<Data>(&event.data) {
                    self.usage.apply(&u.into());
                }
            }
            "content_block_start" | "content_block_delta" | "content_block_stop" => {
                self.content_started = true;
            }
            "message_stop" => {
                self.content_started = true;
                self.complete = true;
            }
            // The first error is kept.
            "error" if self.error.is_none() => {
                let error = ApiError::from_sse_data(event.data.as_bytes()).unwrap_or_else(|| {
                    ApiError::new(
                        ApiErrorKind::Api,
                        format!("malformed error event: {}", truncate(&event.data)),
                    )
                });
                self.error = Some(error);
            }
            _ => {} // ping and unknown events
        }
    }

    /// Usage so far (output tokens are cumulative: the latest `message_delta` wins).
    pub fn usage(&self) -> Usage {
        self.usage
    }

    /// Whether a `content_block_start` (or any event after `message_start` other than `ping`
    /// and `error`) has been seen: from then on the caller has received content.
    pub fn content_started(&self) -> bool {
        self.content_started
    }

    /// Whether `message_stop` has been seen.
    pub fn is_complete(&self) -> bool {
        self.complete
    }

    /// A mid-stream `event: error`, if one was seen.
    pub fn error(&self) -> Option<&ApiError> {
        self.error.as_ref()
    }

    /// The model that wrote the stream (the `model` of `message_start`), once seen.
    pub fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }
}

/// Reads the usage of a response body as it passes through a body wrapper: a copy of a JSON
/// body (up to a size limit, read with [`Usage::from_json`] at the end) or a [`StreamTracker`]
/// for an SSE stream. What a [`UsageTracker`] holds.
#[derive(Debug)]
enum UsageWatch {
    /// The JSON body so far (the most it may hold is the tracker's
    /// [`json_limit`](Shared::json_limit), which readers raise without the lock).
    Json(JsonCopy),
    /// The JSON body outgrew its limit: its usage is unknown.
    Overflow,
    /// An SSE stream.
    Sse(Box<StreamTracker>),
}

impl UsageWatch {
    /// A watch for an SSE stream (`sse`) or a JSON body.
    fn new(sse: bool) -> Self {
        if sse {
            Self::Sse(Box::default())
        } else {
            Self::Json(JsonCopy::Empty)
        }
    }

    /// Feeds a chunk of the body (`shared`: the same bytes, shared, when the caller has
    /// them so: a body that is one chunk is then kept without a copy); a JSON copy holds at
    /// most `limit` bytes.
    fn feed(&mut self, chunk: &[u8], shared: Option<&Bytes>, limit: usize) {
        match self {
            Self::Json(copy) => {
                if copy.len() + chunk.len() > limit {
                    *self = Self::Overflow;
                } else {
                    copy.push(chunk, shared);
                }
            }
            Self::Overflow => {}
            Self::Sse(tracker) => tracker.feed(chunk),
        }
    }

    /// The usage seen: a JSON document that parses (complete whether or not its end was
    /// polled), or a stream's usage so far (`complete`: the body ended, a trailing event is
    /// dispatched first). `None` for a JSON body that does not parse or outgrew its limit.
    fn usage(&mut self, complete: bool) -> Option<Usage> {
        match self {
            Self::Json(copy) => Usage::from_json(copy.as_slice()),
            Self::Overflow => None,
            Self::Sse(tracker) => {
                if complete {
                    tracker.finish();
                }
                Some(tracker.usage())
            }
        }
    }
}

/// A JSON body as it was read: nothing yet, its first chunk shared (most answers are one
/// chunk: no copy), or a copy of several chunks.
#[derive(Debug)]
enum JsonCopy {
    Empty,
    One(Bytes),
    Many(Vec<u8>),
}

impl JsonCopy {
    fn len(&self) -> usize {
        self.as_slice().len()
    }

    fn as_slice(&self) -> &[u8] {
        match self {
            Self::Empty => &[],
            Self::One(bytes) => bytes,
            Self::Many(buf) => buf,
        }
    }

    fn push(&mut self, chunk: &[u8], shared: Option<&Bytes>) {
        match self {
            Self::Empty => {
                *self = match shared {
                    Some(bytes) => Self::One(bytes.clone()),
                    None => Self::Many(chunk.to_vec()),
                }
            }
            Self::One(first) => {
                let mut buf = Vec::with_capacity(first.len() + chunk.len());
                buf.extend_from_slice(first);
                buf.extend_from_slice(chunk);
                *self = Self::Many(buf);
            }
            Self::Many(buf) => buf.extend_from_slice(chunk),
        }
    }
}

/// How far a response body got, as the [`UsageTracker`] saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BodyState {
    /// Still flowing (or dropped before its end).
    Open,
    /// A stream that reached `message_stop`, or a JSON body that ended.
    Complete,
    /// A stream that ended without `message_stop` (and without an `event: error`).
    Truncated,
    /// A stream that carried an `event: error`, or a body whose read failed.
    Failed,
}

/// The one usage tracker of an answer: what its body said about usage (the final usage of a
/// JSON answer, the running usage of a stream), how far it got ([`BodyState`]) and the model
/// that served it, shared by every layer that needs it.
///
/// The innermost layer that reads an answer's usage (in [`ClaudeStack`](crate::stack::ClaudeStack),
/// the rate limiter) wraps the body once and publishes this handle as a response extension;
/// retry, the cache (its completeness check), metrics and the rate limiter read it instead of
/// parsing the stream or copying the JSON body again: one SSE parse per stream, one JSON usage
/// read per body. Layers above the one that wrapped the body see every frame after it did,
/// so the handle is up to date whenever a frame reaches them.
///
/// ```
/// use tower_claude::anthropic::{BodyState, UsageTracker};
///
/// let t = UsageTracker::new(true, 0);
/// t.feed(b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":10,\"output_tokens\":1}}}\n\n");
/// assert_eq!(t.state(), BodyState::Open);
/// t.end(false);
/// assert_eq!(t.state(), BodyState::Truncated);
/// assert_eq!(t.usage().unwrap().input_tokens, 10);
///
/// let t = UsageTracker::new(false, 1 << 20);
/// t.feed(br#"{"type":"message","model":"claude-haiku-4-5","usage":{"input_tokens":3,"output_tokens":4}}"#);
/// t.end(false);
/// assert_eq!(t.state(), BodyState::Complete);
/// assert_eq!(t.model().as_deref(), Some("claude-haiku-4-5"));
/// ```
#[derive(Clone)]
pub struct UsageTracker(Arc<Shared>);

#[derive(Debug)]
struct Shared {
    tracked: Mutex<Tracked>,
    /// What [`UsageTracker::settled_within`] reads without taking the lock, on every chunk of
    /// a stream: the bytes fed when `message_stop` was first seen (`u64::MAX`: not yet) and
    /// whether an `event: error` was seen.
    complete_at: AtomicU64,
    errored: AtomicBool,
    /// Whether the answer is an event stream: fixed when the tracker is made, read without
    /// the lock.
    sse: bool,
    /// The most bytes of a JSON body copied to read its usage: raised by readers above the
    /// publisher ([`UsageTracker::want_json`]) without the lock, read by every feed under it.
    json_limit: AtomicUsize,
    /// A JSON body's reading, published once when the body ends (see [`Ended`]): what every
    /// reader asks after the end (the usage, twice an answer; whether it was typed) is read
    /// without the lock, two locked instructions a question less.
    ended: Ended,
}

/// What the end of a JSON body (or of one that outgrew its copy) read, written once by
/// [`UsageTracker::end`] under the tracker's lock and published by a release store of its
/// flags; read with an acquire load of the flags, then the counts. Never written again once
/// published (`end` reads a body once), so a reader that sees [`Ended::PUBLISHED`] sees the
/// counts written before it.
#[derive(Debug, Default)]
struct Ended {
    flags: AtomicU8,
    /// The [`Usage`] fields, in declaration order.
    usage: [AtomicU64; 5],
}

impl Ended {
    /// The reading is published (a JSON body, or one that outgrew its copy, ended).
    const PUBLISHED: u8 = 1;
    /// The body's read failed.
    const FAILED: u8 = 1 << 1;
    /// The body had a usage that parsed.
    const USAGE: u8 = 1 << 2;
    /// `typed` is known, and its value.
    const TYPED_KNOWN: u8 = 1 << 3;
    const TYPED: u8 = 1 << 4;
    /// `message` is known, and its value.
    const MESSAGE_KNOWN: u8 = 1 << 5;
    const MESSAGE: u8 = 1 << 6;

    /// Publishes a JSON body's reading (once).
    fn publish(
        &self,
        failed: bool,
        usage: Option<Usage>,
        typed: Option<bool>,
        message: Option<bool>,
    ) {
        let mut flags = Self::PUBLISHED;
        let bit = |on: bool, flag: u8| if on { flag } else { 0 };
        flags |= bit(failed, Self::FAILED);
        if let Some(u) = usage {
            flags |= Self::USAGE;
            let counts = [
                u.input_tokens,
                u.output_tokens,
                u.cache_creation_input_tokens,
                u.cache_read_input_tokens,
                u.cache_creation_1h_input_tokens,
            ];
            for (cell, count) in self.usage.iter().zip(counts) {
                cell.store(count, Ordering::Relaxed);
            }
        }
        if let Some(typed) = typed {
            flags |= Self::TYPED_KNOWN | bit(typed, Self::TYPED);
        }
        if let Some(message) = message {
            flags |= Self::MESSAGE_KNOWN | bit(message, Self::MESSAGE);
        }
        self.flags.store(flags, Ordering::Release);
    }

    /// The published flags (`None`: nothing published yet, or a stream).
    fn flags(&self) -> Option<u8> {
        let flags = self.flags.load(Ordering::Acquire);
        (flags & Self::PUBLISHED != 0).then_some(flags)
    }

    /// The published usage, given the published `flags`.
    fn usage(&self, flags: u8) -> Option<Usage> {
        if flags & Self::USAGE == 0 {
            return None;
        }
        let [input, output, creation, read, creation_1h] =
            [0, 1, 2, 3, 4].map(|i| self.usage[i].load(Ordering::Relaxed));
        Some(Usage {
            input_tokens: input,
            output_tokens: output,
            cache_creation_input_tokens: creation,
            cache_read_input_tokens: read,
            cache_creation_1h_input_tokens: creation_1h,
        })
    }

    /// A known flag pair of the published `flags` of a body read without failure: `None`
    /// when failed or not known.
    fn known(flags: u8, known: u8, value: u8) -> Option<bool> {
        (flags & Self::FAILED == 0 && flags & known != 0).then_some(flags & value != 0)
    }
}

#[derive(Debug)]
struct Tracked {
    watch: UsageWatch,
    /// Data bytes fed.
    seen: u64,
    /// Bytes fed when `message_stop` was first seen.
    complete_at: Option<u64>,
    ended: bool,
    failed: bool,
    /// A JSON body's `model`, read with its usage. Whether it was a typed object and a
    /// whole message is published in [`Shared::ended`].
    model: Option<String>,
}

impl UsageTracker {
    /// A tracker for an event stream (`sse`) or a JSON body of which at most `json_limit`
    /// bytes are copied to read its usage.
    pub fn new(sse: bool, json_limit: usize) -> Self {
        Self(Arc::new(Shared {
            tracked: Mutex::new(Tracked {
                watch: UsageWatch::new(sse),
                seen: 0,
                complete_at: None,
                ended: false,
                failed: false,
                model: None,
            }),
            complete_at: AtomicU64::new(u64::MAX),
            errored: AtomicBool::new(false),
            sse,
            json_limit: AtomicUsize::new(json_limit),
            ended: Ended::default(),
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tracked> {
        // A panic while holding the lock leaves consistent counters: keep going.
        self.0
            .tracked
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A reader above the layer that published the tracker wants a JSON body's usage read
    /// up to `json_limit` bytes: the copy's limit becomes the largest any reader asked for
    /// (one copy serves them all). Called when the answer's head passes, before its body
    /// is read.
    pub(crate) fn want_json(&self, json_limit: usize) {
        // Read first: the readers of one stack mostly ask for the same limit, and a load is
        // not a locked instruction. A copy that already outgrew its limit stays unread.
        let limit = &self.0.json_limit;
        if json_limit > limit.load(Ordering::Relaxed) {
            limit.fetch_max(json_limit, Ordering::Relaxed);
        }
    }

    /// Feeds a chunk of the body, as it is read.
    pub fn feed(&self, chunk: &[u8]) {
        self.feed_chunk(chunk, None);
    }

    /// [`feed`](Self::feed) with a chunk the caller holds as [`Bytes`]: a JSON answer read
    /// in one chunk is kept shared instead of copied.
    pub(crate) fn feed_bytes(&self, chunk: &Bytes) {
        self.feed_chunk(chunk, Some(chunk));
    }

    fn feed_chunk(&self, chunk: &[u8], shared: Option<&Bytes>) {
        let mut t = self.lock();
        self.feed_locked(&mut t, chunk, shared);
    }

    /// The body's last chunk: [`feed_bytes`](Self::feed_bytes) then [`end`](Self::end)
    /// (`failed`: its read failed), under one lock (a JSON answer read in one chunk took the
    /// lock twice, back to back).
    pub(crate) fn feed_last(&self, chunk: &Bytes, failed: bool) {
        let mut t = self.lock();
        self.feed_locked(&mut t, chunk, Some(chunk));
        self.end_locked(&mut t, failed);
    }

    /// [`feed_chunk`](Self::feed_chunk) under the lock `t` holds.
    fn feed_locked(&self, t: &mut Tracked, chunk: &[u8], shared: Option<&Bytes>) {
        t.seen = t.seen.saturating_add(chunk.len() as u64);
        let limit = self.0.json_limit.load(Ordering::Relaxed);
        t.watch.feed(chunk, shared, limit);
        if t.complete_at.is_none() {
            if let UsageWatch::Sse(tracker) = &t.watch {
                if tracker.error().is_some() {
                    self.0.errored.store(true, Ordering::Release);
                }
                if tracker.is_complete() {
                    t.complete_at = Some(t.seen);
                    self.0.complete_at.store(t.seen, Ordering::Release);
                }
            }
        }
    }

    /// The body ended (`failed`: its read failed). A trailing event without a blank line is
    /// dispatched; a JSON body's usage is read.
    pub fn end(&self, failed: bool) {
        let mut t = self.lock();
        self.end_locked(&mut t, failed);
    }

    /// [`end`](Self::end) under the lock `t` holds.
    fn end_locked(&self, t: &mut Tracked, failed: bool) {
        if t.ended {
            return;
        }
        t.ended = true;
        t.failed = failed;
        if !failed {
            if let UsageWatch::Sse(tracker) = &mut t.watch {
                tracker.finish();
                if tracker.error().is_some() {
                    self.0.errored.store(true, Ordering::Release);
                }
                if tracker.is_complete() && t.complete_at.is_none() {
                    t.complete_at = Some(t.seen);
                    self.0.complete_at.store(t.seen, Ordering::Release);
                }
            }
        }
        let read = match &t.watch {
            UsageWatch::Sse(_) => None,
            UsageWatch::Json(copy) => {
                let (usage, model, typed, message) = Usage::read_json_answer(copy.as_slice());
                Some((usage, model, Some(typed), message))
            }
            UsageWatch::Overflow => Some((None, None, None, None)),
        };
        if let Some((usage, model, typed, message)) = read {
            t.model = model;
            // The copy is no longer needed.
            t.watch = UsageWatch::Overflow;
            self.0.ended.publish(failed, usage, typed, message);
        }
    }

    /// Whether a JSON answer read to its end without error is a JSON object with a string
    /// `type` (every Messages API answer is), as read with its usage: the retry layer's test
    /// of a 200 body, without a second parse. `None` before the end, for a stream, a failed
    /// read or a body larger than the copy limit.
    pub(crate) fn typed_json(&self) -> Option<bool> {
        // Known only once a JSON body's end published it (a stream's is never known).
        let flags = self.0.ended.flags()?;
        Ended::known(flags, Ended::TYPED_KNOWN, Ended::TYPED)
    }

    /// Whether a JSON answer read to its end without error is a JSON object whose `type` is
    /// `"message"` (a whole Messages API answer), as read with its usage: the response
    /// cache's test of what it may store, without a second parse. `None` when not known:
    /// before the end, for a stream, a failed read, a body larger than the copy limit, or a
    /// body the one read did not take (the cache then parses it itself).
    pub(crate) fn message_json(&self) -> Option<bool> {
        let flags = self.0.ended.flags()?;
        Ended::known(flags, Ended::MESSAGE_KNOWN, Ended::MESSAGE)
    }

    /// Whether the answer is an event stream.
    pub fn is_stream(&self) -> bool {
        self.0.sse
    }

    /// The usage: a stream's so far (output tokens are cumulative), a JSON body's once it
    /// parses (before its end, the copy so far is read). `None` for a JSON body that does not
    /// parse or outgrew its copy limit.
    pub fn usage(&self) -> Option<Usage> {
        if let Some(flags) = self.0.ended.flags() {
            return self.0.ended.usage(flags);
        }
        let mut t = self.lock();
        // Ended while this waited for the lock: the body's usage is the published one (the
        // copy is gone).
        if let Some(flags) = self.0.ended.flags() {
            return self.0.ended.usage(flags);
        }
        t.watch.usage(false)
    }

    /// How far the body got.
    pub fn state(&self) -> BodyState {
        // A JSON body that ended: complete unless its read failed (it never has a
        // `message_stop`, nor an `event: error`).
        if let Some(flags) = self.0.ended.flags() {
            return if flags & Ended::FAILED != 0 {
                BodyState::Failed
            } else {
                BodyState::Complete
            };
        }
        let t = self.lock();
        match &t.watch {
            UsageWatch::Sse(tracker) if tracker.error().is_some() => BodyState::Failed,
            _ if t.complete_at.is_some() => BodyState::Complete,
            _ if t.failed => BodyState::Failed,
            UsageWatch::Sse(_) if t.ended => BodyState::Truncated,
            _ if t.ended => BodyState::Complete,
            _ => BodyState::Open,
        }
    }

    /// Whether the caller has received content of a stream (see
    /// [`StreamTracker::content_started`]).
    pub fn content_started(&self) -> bool {
        match &self.lock().watch {
            UsageWatch::Sse(tracker) => tracker.content_started(),
            _ => false,
        }
    }

    /// A stream's mid-stream `event: error`, if one was seen.
    pub fn error(&self) -> Option<ApiError> {
        match &self.lock().watch {
            UsageWatch::Sse(tracker) => tracker.error().cloned(),
            _ => None,
        }
    }

    /// The model that wrote the answer, as the answer says (a stream's `message_start`, a JSON
    /// body's `model`, read once it ended).
    pub fn model(&self) -> Option<String> {
        let t = self.lock();
        match &t.watch {
            UsageWatch::Sse(tracker) => tracker.model().map(str::to_owned),
            _ => t.model.clone(),
        }
    }

    /// What a layer that has forwarded (or recorded) the first `bytes` bytes of a stream knows
    /// of it, in one look: `Some(false)` once it carried an `event: error`, `Some(true)` once
    /// its `message_stop` is within those bytes (the layer has seen the whole answer), `None`
    /// while neither.
    pub(crate) fn settled_within(&self, bytes: u64) -> Option<bool> {
        if self.0.errored.load(Ordering::Acquire) {
            return Some(false);
        }
        (self.0.complete_at.load(Ordering::Acquire) <= bytes).then_some(true)
    }
}

impl std::fmt::Debug for UsageTracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let t = self.lock();
        f.debug_struct("UsageTracker")
            .field("stream", &matches!(t.watch, UsageWatch::Sse(_)))
            .field("seen", &t.seen)
            .field("ended", &t.ended)
            .field("failed", &t.failed)
            .finish_non_exhaustive()
    }
}

/// At most 200 bytes of `s`, cut at a character boundary.
fn truncate(s: &str) -> &str {
    let mut end = s.len().min(200);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The one pass over a JSON answer says what the two readers it replaces would say.
    fn same_as_two_readers(body: &[u8]) {
        let (usage, model) = Usage::from_json_with_model(body);
        let typed = crate::anthropic::is_typed_object(body);
        let (u, m, t, message) = Usage::read_json_answer(body);
        assert_eq!(
            (u, m, t),
            (usage, model, typed),
            "{:?}",
            String::from_utf8_lossy(body)
        );
        if let Some(message) = message {
            let value: serde_json::Value = serde_json::from_slice(body).unwrap();
            assert_eq!(message, value["type"] == "message");
        }
    }

    /// The scanner's read of a JSON answer (with serde_json behind it where it cannot decide)
    /// says what serde_json alone says: the combined read, and `from_json`.
    fn fast_read_is_serdes(body: &[u8]) {
        let shown = String::from_utf8_lossy(body);
        assert_eq!(
            Usage::read_json_answer(body),
            Usage::read_json_answer_serde(body),
            "{shown:?}"
        );
        assert_eq!(
            Usage::from_json(body),
            Usage::from_json_with_model(body).0,
            "{shown:?}"
        );
    }

    /// Answers as the API sends them (text, tool use, escapes, cache writes split by TTL,
    /// `null`s, spacing), which the scanner reads without serde_json.
    const REAL_ANSWERS: &[&str] = &[
        r#"{"id":"msg_01XFDUDYJgAACzvnptvVoYEL","type":"message","role":"assistant","model":"claude-sonnet-4-6","content":[{"type":"text","text":"Hello! How can I help you today?"}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":12,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":11,"service_tier":"standard"}}"#,
        r#"{"id":"msg_2","type":"message","role":"assistant","model":"claude-opus-4-7","content":[{"type":"text","text":"Line one\nline \"two\" \u00e9 \ud83e\udd80 and a path C:\\tmp"},{"type":"tool_use","id":"toolu_1","name":"get_weather","input":{"location":"Paris","units":["c",1.5e3,-0.25,true,null]}}],"stop_reason":"tool_use","stop_sequence":null,"usage":{"input_tokens":2095,"cache_creation_input_tokens":1500,"cache_read_input_tokens":20000,"cache_creation":{"ephemeral_5m_input_tokens":500,"ephemeral_1h_input_tokens":1000},"output_tokens":503,"server_tool_use":{"web_search_requests":0}}}"#,
        "{\n  \"type\" : \"message\",\n  \"model\" : \"claude-haiku-4-5\",\n  \"content\" : [ ],\n  \"usage\" : { \"input_tokens\" : 3 , \"output_tokens\" : null ,\n \"cache_creation\" : null }\n}\n",
        r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
        r#"{"type":"message","usage":{"input_tokens":18446744073709551,"output_tokens":0,"cache_creation":{}}}"#,
        r#"{}"#,
        r#" {"usage":null,"model":null,"type":null} "#,
    ];

    /// Every count form the one-loop count read must take or refuse (leading zeros, signs,
    /// fractions, exponents, 19 and 20 digits, what may follow the digits), in each of the
    /// count members: the read says what serde_json says.
    #[test]
    fn counts_read_as_serde_json_reads_them() {
        let counts = [
            "0",
            "7",
            "00",
            "01",
            "-0",
            "-1",
            "+1",
            "0.5",
            "1.0",
            "1.",
            "1e2",
            "1E2",
            "1e+2",
            "0e0",
            "12",
            "512",
            "9999999999999999999",
            "10000000000000000000",
            "18446744073709551615",
            "18446744073709551616",
            "99999999999999999999",
            "1 ",
            " 1",
            "1\n",
            "1x",
            "1,",
            "1}",
            "1]",
            "null",
            "nul",
            "true",
            "\"1\"",
        ];
        for count in counts {
            for member in ["input_tokens", "cache_read_input_tokens"] {
                let body = format!(r#"{{"type":"message","usage":{{"{member}":{count}}}}}"#);
                fast_read_is_serdes(body.as_bytes());
                let body = format!(
                    r#"{{"usage":{{"output_tokens":1,"{member}":{count},"x":2}},"model":"m"}}"#
                );
                fast_read_is_serdes(body.as_bytes());
            }
            let body = format!(
                r#"{{"usage":{{"cache_creation":{{"ephemeral_1h_input_tokens":{count}}}}}}}"#
            );
            fast_read_is_serdes(body.as_bytes());
        }
    }

    #[test]
    fn the_scanner_reads_real_answers_as_serde_json_does() {
        for answer in REAL_ANSWERS {
            assert!(
                super::scan_answer(answer.as_bytes()).is_some(),
                "the fast path did not decide {answer}"
            );
            fast_read_is_serdes(answer.as_bytes());
            // Every truncation, and every byte replaced by a few that matter to JSON.
            let bytes = answer.as_bytes();
            for cut in 0..bytes.len() {
                fast_read_is_serdes(&bytes[..cut]);
            }
            for at in 0..bytes.len() {
                for b in [b'"', b'\\', b'}', b',', b'0', b'-', 0x01, 0xFF] {
                    let mut changed = bytes.to_vec();
                    changed[at] = b;
                    fast_read_is_serdes(&changed);
                }
            }
        }
        // The read itself.
        let (usage, model, typed, message) = Usage::read_json_answer(REAL_ANSWERS[1].as_bytes());
        let usage = usage.unwrap();
        assert_eq!(
            (
                usage.input_tokens,
                usage.cache_creation_1h_input_tokens,
                usage.output_tokens
            ),
            (2095, 1000, 503)
        );
        assert_eq!(model.as_deref(), Some("claude-opus-4-7"));
        assert_eq!((typed, message), (true, Some(true)));
    }

    #[test]
    fn the_scanner_leaves_to_serde_json_what_it_cannot_decide() {
        for body in [
            // An escaped member name or value, duplicates, numbers no `u64` reads as such.
            &br#"{"ty\u0070e":"message","usage":{"input_tokens":1}}"#[..],
            br#"{"type":"mess\u0061ge","usage":{"input_tokens":1}}"#,
            br#"{"model":"a\"b","usage":{"input_tokens":1}}"#,
            br#"{"usage":{"input_tokens":1,"input_tokens":2}}"#,
            br#"{"usage":{"cache_creation":{"ephemeral_1h_input_tokens":1,"ephemeral_1h_input_tokens":2}}}"#,
            br#"{"usage":{"input_tokens":-0}}"#,
            br#"{"usage":{"input_tokens":1.0}}"#,
            br#"{"usage":{"input_tokens":1e2}}"#,
            br#"{"usage":{"input_tokens":18446744073709551615}}"#,
            br#"{"usage":{"input_tokens":18446744073709551616}}"#,
            br#"{"usage":[1,2,3]}"#,
            br#"{"type":"message","type":"message"}"#,
            br#"["message",null,null]"#,
            b"{\"type\":\"message\",\"x\":\"\xff\"}",
        ] {
            assert!(
                super::scan_answer(body).is_none(),
                "{}",
                String::from_utf8_lossy(body)
            );
            fast_read_is_serdes(body);
        }
        // Nesting around the reader's bound and deeper, which serde_json skips.
        for n in [64, 65, 66] {
            let nested = format!(
                r#"{{"type":"message","x":{}{},"usage":{{"input_tokens":5}}}}"#,
                "[".repeat(n),
                "]".repeat(n)
            );
            // The innermost `[]` is never open: 65 deep holds 64 open at once.
            assert_eq!(
                super::scan_answer(nested.as_bytes()).is_some(),
                n <= 65,
                "{n}"
            );
            fast_read_is_serdes(nested.as_bytes());
        }
        let deep = format!(
            r#"{{"type":"message","x":{}{},"usage":{{"input_tokens":5}}}}"#,
            "[".repeat(300),
            "]".repeat(300)
        );
        assert!(super::scan_answer(deep.as_bytes()).is_none());
        fast_read_is_serdes(deep.as_bytes());
        assert_eq!(Usage::from_json(deep.as_bytes()).unwrap().input_tokens, 5);
    }

    /// JSON-ish text: valid values most of the time, with the tokens that trip readers
    /// (escapes, out-of-range and malformed numbers, control characters, duplicates).
    fn json_text() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let keys = prop_oneof![
            Just("type"),
            Just("model"),
            Just("usage"),
            Just("input_tokens"),
            Just("output_tokens"),
            Just("cache_creation_input_tokens"),
            Just("cache_read_input_tokens"),
            Just("cache_creation"),
            Just("ephemeral_5m_input_tokens"),
            Just("ephemeral_1h_input_tokens"),
            Just("id"),
            Just("content"),
            Just("stop_reason"),
            Just("ty\\u0070e"),
            Just("usage\\n"),
        ];
        let leaf = prop_oneof![
            Just("null".to_owned()),
            Just("true".to_owned()),
            Just("false".to_owned()),
            prop_oneof![
                Just("0"),
                Just("7"),
                Just("100000000"),
                Just("-0"),
                Just("-1"),
                Just("01"),
                Just("1.0"),
                Just("1e2"),
                Just("9999999999999999999"),
                Just("18446744073709551615"),
                Just("18446744073709551616"),
                Just("1E400"),
                Just("-"),
                Just("1."),
                Just(".5"),
                Just("+1"),
            ]
            .prop_map(str::to_owned),
            any::<u64>().prop_map(|n| n.to_string()),
            prop_oneof![
                Just(r#""message""#),
                Just(r#""claude-opus-4-7""#),
                Just(r#""""#),
                Just(r#""a\"b""#),
                Just(r#""\u0041\n""#),
                Just(r#""\ud800""#),
                Just(r#""\x""#),
                Just("\"tab\there\""),
                Just("\"caf\u{e9} \u{1f980}\""),
                Just(r#""unterminated"#),
            ]
            .prop_map(str::to_owned),
        ];
        let ws = prop_oneof![Just(""), Just(""), Just(" "), Just("\n "), Just("\t")];
        leaf.prop_recursive(4, 48, 6, move |inner| {
            prop_oneof![
                proptest::collection::vec((inner.clone(), ws.clone()), 0..5).prop_map(|items| {
                    let items: Vec<String> = items
                        .into_iter()
                        .map(|(v, w)| format!("{w}{v}{w}"))
                        .collect();
                    format!("[{}]", items.join(","))
                }),
                proptest::collection::vec((keys.clone(), inner, ws.clone()), 0..7).prop_map(
                    |members| {
                        let members: Vec<String> = members
                            .into_iter()
                            .map(|(k, v, w)| format!("{w}\"{k}\"{w}:{w}{v}"))
                            .collect();
                        format!("{{{}}}", members.join(","))
                    }
                ),
            ]
        })
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(3000))]

        /// Generated documents, whole, truncated or with a byte changed.
        #[test]
        fn the_scanner_reads_generated_answers_as_serde_json_does(
            text in json_text(),
            cut in proptest::prelude::any::<proptest::sample::Index>(),
            edit in proptest::option::of((
                proptest::prelude::any::<proptest::sample::Index>(),
                proptest::prelude::any::<u8>(),
            )),
        ) {
            let bytes = text.as_bytes();
            fast_read_is_serdes(bytes);
            if !bytes.is_empty() {
                fast_read_is_serdes(&bytes[..cut.index(bytes.len())]);
                if let Some((at, b)) = edit {
                    let mut changed = bytes.to_vec();
                    changed[at.index(bytes.len())] = b;
                    fast_read_is_serdes(&changed);
                }
            }
        }
    }

    #[test]
    fn one_json_read_equals_the_usage_and_type_readers() {
        for body in [
            &br#"{"type":"message","model":"m","usage":{"input_tokens":3,"output_tokens":1}}"#[..],
            br#" {"usage":{"input_tokens":3}}"#,
            br#"{"type":null,"usage":{"input_tokens":3}}"#,
            br#"{"type":7,"usage":{"input_tokens":3},"model":"m"}"#,
            br#"{"type":"a","type":"b","usage":{"input_tokens":3}}"#,
            br#"{"type":"message","usage":"none","model":"m"}"#,
            br#"{"type":"message","usage":{},"usage":{}}"#,
            br#"{"type":"message","model":1}"#,
            br#"["message",null,null]"#,
            br#"["message"]"#,
            b"<html>bad gateway</html>",
            b"",
            br#"{"type":"message""#,
        ] {
            same_as_two_readers(body);
        }
    }

    #[test]
    fn the_tracker_says_whether_a_json_answer_is_typed_only_once_read_whole() {
        let ended = |sse: bool, limit: usize, chunks: &[&[u8]], failed: bool| {
            let t = UsageTracker::new(sse, limit);
            for c in chunks {
                t.feed(c);
            }
            let before = (t.typed_json(), t.message_json());
            t.end(failed);
            assert_eq!(before, (None, None));
            // A body typed `message` only when it is typed at all.
            assert!(t.message_json() <= t.typed_json());
            (before.0, t.typed_json())
        };
        let answer: &[u8] = br#"{"type":"message","usage":{"input_tokens":3,"output_tokens":1}}"#;
        assert_eq!(
            ended(false, 1024, &[&answer[..9], &answer[9..]], false),
            (None, Some(true))
        );
        assert_eq!(
            ended(false, 1024, &[b"<html>502</html>"], false),
            (None, Some(false))
        );
        assert_eq!(
            ended(false, 1024, &[br#"{"usage":{}}"#], false),
            (None, Some(false))
        );
        // Unknown: a failed read, a body over the copy limit, a stream.
        assert_eq!(ended(false, 1024, &[answer], true), (None, None));
        assert_eq!(ended(false, 8, &[answer], false), (None, None));
        assert_eq!(ended(true, 1024, &[answer], false), (None, None));
    }

    /// What a JSON body's end publishes for readers without the lock is what the body's one
    /// read said: every usage field in its place (five different counts), no usage for a
    /// body without one, whether it was typed and a message, and its state; a failed read
    /// keeps its usage but knows neither; a stream publishes nothing and keeps its own
    /// answers.
    #[test]
    fn the_published_end_is_the_read() {
        let full: &[u8] =
            br#"{"type":"message","model":"m","usage":{"input_tokens":11,"output_tokens":22,
            "cache_creation_input_tokens":333,"cache_read_input_tokens":44,
            "cache_creation":{"ephemeral_5m_input_tokens":300,"ephemeral_1h_input_tokens":33}}}"#;
        let bodies: [&[u8]; 5] = [
            full,
            br#"{"type":"error","error":{"type":"api_error","message":"x"}}"#,
            br#"{"usage":{"input_tokens":1}}"#,
            b"<html>502</html>",
            b"",
        ];
        for body in bodies {
            for failed in [false, true] {
                let (usage, model, typed, message) = Usage::read_json_answer(body);
                let t = UsageTracker::new(false, 1 << 20);
                t.feed(body);
                t.end(failed);
                assert_eq!(t.usage(), usage, "{body:?}");
                assert_eq!(t.model(), model);
                let known = |v: Option<bool>| if failed { None } else { v };
                assert_eq!(t.typed_json(), known(Some(typed)), "{body:?} {failed}");
                assert_eq!(t.message_json(), known(message), "{body:?} {failed}");
                let state = if failed {
                    BodyState::Failed
                } else {
                    BodyState::Complete
                };
                assert_eq!(t.state(), state);
                assert!(!t.is_stream());
            }
        }
        let usage = UsageTracker::new(false, 1 << 20);
        usage.feed(full);
        usage.end(false);
        assert_eq!(
            usage.usage(),
            Some(Usage {
                input_tokens: 11,
                output_tokens: 22,
                cache_creation_input_tokens: 333,
                cache_read_input_tokens: 44,
                cache_creation_1h_input_tokens: 33,
            })
        );
        // Over the copy limit: no usage, nothing known, complete.
        let over = UsageTracker::new(false, 8);
        over.feed(full);
        over.end(false);
        assert_eq!((over.usage(), over.typed_json()), (None, None));
        assert_eq!(over.state(), BodyState::Complete);
        // A stream: its usage so far, its own state.
        let stream = UsageTracker::new(true, 0);
        stream.feed(b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":5}}}\n\n");
        stream.end(false);
        assert!(stream.is_stream());
        assert_eq!(stream.usage().map(|u| u.input_tokens), Some(5));
        assert_eq!(stream.state(), BodyState::Truncated);
        assert_eq!((stream.typed_json(), stream.message_json()), (None, None));
    }

    /// The last chunk and the end under one lock (`feed_last`) leave the tracker as
    /// `feed_bytes` then `end` did: for JSON bodies (whole, an error, partial usage, HTML,
    /// empty, over the copy limit) and streams (complete, cut, with an `event: error`), fed
    /// in one chunk or two, read whole or failed. Fails if `feed_last` skips or reorders
    /// either half.
    #[test]
    fn the_last_chunk_and_the_end_together_are_the_two_apart() {
        let json: [&[u8]; 5] = [
            br#"{"type":"message","model":"m","usage":{"input_tokens":11,"output_tokens":22,"cache_read_input_tokens":4}}"#,
            br#"{"type":"error","error":{"type":"api_error","message":"x"}}"#,
            br#"{"usage":{"input_tokens":1}}"#,
            b"<html>502</html>",
            b"",
        ];
        let sse: [&[u8]; 3] = [
            b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":5}}}\n\nevent: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"hi\"}}\n\nevent: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":7}}\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
            b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":5}}}\n\n",
            b"event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"o\"}}\n\n",
        ];
        let cases = json
            .iter()
            .flat_map(|b| [(false, *b, 1 << 20), (false, *b, 8)])
            .chain(sse.iter().map(|b| (true, *b, 0)));
        for (stream, body, limit) in cases {
            for split in [0, body.len() / 2] {
                for failed in [false, true] {
                    let (head, last) = body.split_at(split);
                    let apart = UsageTracker::new(stream, limit);
                    let together = UsageTracker::new(stream, limit);
                    for t in [&apart, &together] {
                        if !head.is_empty() {
                            t.feed_bytes(&Bytes::copy_from_slice(head));
                        }
                    }
                    let last = Bytes::copy_from_slice(last);
                    apart.feed_bytes(&last);
                    apart.end(failed);
                    together.feed_last(&last, failed);
                    let what = format!("{body:?} split {split} failed {failed} limit {limit}");
                    assert_eq!(together.usage(), apart.usage(), "{what}");
                    assert_eq!(together.model(), apart.model(), "{what}");
                    assert_eq!(together.typed_json(), apart.typed_json(), "{what}");
                    assert_eq!(together.message_json(), apart.message_json(), "{what}");
                    assert_eq!(together.state(), apart.state(), "{what}");
                    assert_eq!(together.error(), apart.error(), "{what}");
                    assert_eq!(
                        together.content_started(),
                        apart.content_started(),
                        "{what}"
                    );
                    for bytes in [0, split as u64, body.len() as u64, u64::MAX] {
                        assert_eq!(
                            together.settled_within(bytes),
                            apart.settled_within(bytes),
                            "{what} within {bytes}"
                        );
                    }
                }
            }
        }
    }

    /// A reader's JSON limit raises the copy's, never lowers it, also when asked between
    /// chunks; a copy that outgrew its limit stays unread.
    #[test]
    fn json_limits_only_rise() {
        let body: &[u8] = br#"{"type":"message","usage":{"input_tokens":3,"output_tokens":1}}"#;
        let read = |limit: usize, wanted: &[usize], split: usize| {
            let t = UsageTracker::new(false, limit);
            t.feed(&body[..split]);
            for &w in wanted {
                t.want_json(w);
            }
            t.feed(&body[split..]);
            t.end(false);
            t.usage().map(|u| u.input_tokens)
        };
        assert_eq!(read(1024, &[8], 0), Some(3));
        assert_eq!(read(8, &[1024], 0), Some(3));
        assert_eq!(read(8, &[1024, 4], 4), Some(3));
        assert_eq!(read(8, &[16], 0), None);
        // Outgrown before the raise: unread.
        assert_eq!(read(8, &[1024], 10), None);
    }

    proptest::proptest! {
        #[test]
        fn one_json_read_equals_the_two_readers_on_any_member_mix(
            members in proptest::collection::vec(
                proptest::sample::select(vec![
                    r#""type":"message""#, r#""type":1"#, r#""type":null"#,
                    r#""usage":{"input_tokens":2,"output_tokens":5}"#, r#""usage":[]"#,
                    r#""usage":null"#, r#""model":"claude-haiku-4-5""#, r#""model":false"#,
                    r#""id":"msg_1""#, r#""content":[{"type":"text","text":"hi"}]"#,
                ]),
                0..6,
            ),
            array in proptest::bool::ANY,
        ) {
            let body = if array {
                format!("[{}]", members.join(","))
            } else {
                format!("{{{}}}", members.join(","))
            };
            same_as_two_readers(body.as_bytes());
        }
    }

    /// A JSON answer fed as shared chunks reads as one fed as copies: one chunk, several
    /// chunks, and past the limit.
    #[test]
    fn shared_chunks_read_as_copied_ones() {
        let json = br#"{"type":"message","model":"claude-haiku-4-5","usage":{"input_tokens":3,"output_tokens":4}}"#;
        for cut in [0, 1, 20, json.len() - 1, json.len()] {
            let (a, b) = json.split_at(cut);
            let shared = UsageTracker::new(false, 1024);
            let copied = UsageTracker::new(false, 1024);
            for part in [a, b].into_iter().filter(|p| !p.is_empty()) {
                shared.feed_bytes(&Bytes::copy_from_slice(part));
                copied.feed(part);
            }
            shared.end(false);
            copied.end(false);
            assert_eq!(shared.usage(), copied.usage(), "cut at {cut}");
            assert_eq!(shared.usage().unwrap().output_tokens, 4);
            assert_eq!(shared.model(), copied.model());
            assert_eq!(shared.typed_json(), Some(true));
        }
        let small = UsageTracker::new(false, json.len() - 1);
        small.feed_bytes(&Bytes::from_static(json));
        small.end(false);
        assert_eq!(small.usage(), None, "past the limit nothing is read");
    }

    #[test]
    fn absurd_usage_is_clamped() {
        let body = br#"{"usage":{"input_tokens":18446744073709551615,"output_tokens":5,"cache_creation_input_tokens":100000001}}"#;
        let u = Usage::from_json(body).unwrap();
        assert_eq!(u.input_tokens, Usage::MAX_TOKENS);
        assert_eq!(u.output_tokens, 5);
        assert_eq!(u.counted_input_tokens(), 2 * Usage::MAX_TOKENS);
        let mut t = StreamTracker::new();
        t.feed(b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":18446744073709551615}}}\n\n");
        t.feed(b"event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":18446744073709551615}}\n\n");
        assert_eq!(t.usage().input_tokens, Usage::MAX_TOKENS);
        assert_eq!(t.usage().output_tokens, Usage::MAX_TOKENS);
    }

    fn parse_all(chunks: &[&[u8]]) -> Vec<SseEvent> {
        let mut parser = SseParser::new();
        let mut out = Vec::new();
        for chunk in chunks {
            parser.push(chunk, &mut out);
        }
        parser.finish(&mut out);
        out
    }

    fn ev(event: Option<&str>, data: &str) -> SseEvent {
        SseEvent {
            event: event.map(str::to_owned),
            data: data.to_owned(),
        }
    }

    #[test]
    fn usage_from_json() {
        let body = br#"{"id":"msg","content":[{"type":"text","text":"hi"}],"usage":{"input_tokens":5,"output_tokens":7,"cache_creation_input_tokens":null,"cache_creation":{"ephemeral_5m_input_tokens":0},"service_tier":"standard"}}"#;
        let usage = Usage::from_json(body).unwrap();
        assert_eq!(
            usage,
            Usage {
                input_tokens: 5,
                output_tokens: 7,
                cache_creation_input_tokens: 0,
                cache_read_input_tokens: 0,
                cache_creation_1h_input_tokens: 0,
            }
        );
        assert_eq!(Usage::from_json(br#"{"usage":{}}"#), Some(Usage::default()));
        assert_eq!(Usage::from_json(br#"{"id":"msg"}"#), None);
        assert_eq!(Usage::from_json(br#"{"usage":{"input_tokens":1}"#), None);
        assert_eq!(Usage::from_json(b"garbage"), None);
        assert_eq!(Usage::from_json(br#"{"usage":{"input_tokens":-1}}"#), None);
    }

    #[test]
    fn cache_writes_split_by_ttl() {
        let body = br#"{"usage":{"input_tokens":5,"output_tokens":7,"cache_creation_input_tokens":300,"cache_creation":{"ephemeral_5m_input_tokens":100,"ephemeral_1h_input_tokens":200}}}"#;
        let u = Usage::from_json(body).unwrap();
        assert_eq!(
            (
                u.cache_creation_5m_input_tokens(),
                u.cache_creation_1h_input_tokens
            ),
            (100, 200)
        );
        // The split alone still counts its writes; a 1-hour part above the total is clamped.
        let u =
            Usage::from_json(br#"{"usage":{"cache_creation":{"ephemeral_1h_input_tokens":40}}}"#)
                .unwrap();
        assert_eq!(
            (
                u.cache_creation_input_tokens,
                u.cache_creation_1h_input_tokens
            ),
            (40, 40)
        );
        let u = Usage::from_json(br#"{"usage":{"cache_creation_input_tokens":10,"cache_creation":{"ephemeral_1h_input_tokens":40}}}"#)
            .unwrap();
        assert_eq!(
            (
                u.cache_creation_5m_input_tokens(),
                u.cache_creation_1h_input_tokens
            ),
            (0, 10)
        );
        // Streams: `message_start` carries the split.
        let mut t = StreamTracker::new();
        t.feed(b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":1,\"cache_creation_input_tokens\":50,\"cache_creation\":{\"ephemeral_5m_input_tokens\":20,\"ephemeral_1h_input_tokens\":30}}}}\n\n");
        t.feed(b"event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":9}}\n\n");
        assert_eq!(t.usage().cache_creation_1h_input_tokens, 30);
        assert_eq!(t.usage().cache_creation_5m_input_tokens(), 20);
        assert_eq!(t.usage().output_tokens, 9);
    }

    #[test]
    fn counted_input_tokens_excludes_cache_reads() {
        let usage = Usage {
            input_tokens: 10,
            output_tokens: 1,
            cache_creation_input_tokens: 100,
            cache_read_input_tokens: 1_000,
            cache_creation_1h_input_tokens: 0,
        };
        assert_eq!(usage.counted_input_tokens(), 110);
    }

    #[test]
    fn sse_fields_comments_and_line_endings() {
        let events = parse_all(&[
            b": comment\r\nevent: a\r\ndata: 1\r\ndata:2\r\n\r\n",
            b"event:b\rdata:  x\r\rdata\n\nid: 5\nretry: 10\nfoo: bar\ndata: y\n\n",
        ]);
        assert_eq!(
            events,
            [
                ev(Some("a"), "1\n2"),
                ev(Some("b"), " x"),
                ev(None, ""),
                ev(None, "y")
            ]
        );
    }

    #[test]
    fn sse_events_without_data_are_dropped_and_names_reset() {
        let events = parse_all(&[b"event: ping\n\nevent: x\nevent: y\ndata: d\n\ndata: e\n\n"]);
        assert_eq!(events, [ev(Some("y"), "d"), ev(None, "e")]);
        assert_eq!(parse_all(&[b"event: lonely\n\n\n\n"]), []);
    }

    #[test]
    fn overlong_lines_and_events_are_dropped_however_they_are_chunked() {
        let long = vec![b'x'; SseParser::MAX_LINE + 10];
        let mut stream = b"data: a\n\n".to_vec();
        stream.extend_from_slice(b"data: ");
        stream.extend_from_slice(&long);
        stream.extend_from_slice(b"\nevent: ping\ndata: b\n\n");
        for size in [7, 4096, 1 << 19, stream.len()] {
            let chunks: Vec<&[u8]> = stream.chunks(size).collect();
            let events = parse_all(&chunks);
            // The overlong data line is skipped: its event keeps only what else it has.
            assert_eq!(
                events,
                vec![ev(None, "a"), ev(Some("ping"), "b")],
                "chunk size {size}"
            );
        }
        // An event made of many lines, each short, but too much data in all: dropped whole.
        let line = format!("data: {}\n", "y".repeat(1000));
        let mut big = line.repeat(SseParser::MAX_EVENT / 1000 + 10);
        big.push_str("\nevent: after\ndata: c\n\n");
        let events = parse_all(&[big.as_bytes()]);
        assert_eq!(events, vec![ev(Some("after"), "c")]);
    }

    #[test]
    fn sse_crlf_split_between_chunks_is_one_line_end() {
        let events = parse_all(&[b"data: a\r", b"\n", b"\r", b"\ndata: b\r", b"\r"]);
        assert_eq!(events, [ev(None, "a"), ev(None, "b")]);
    }

    #[test]
    fn sse_finish_dispatches_a_trailing_event_and_resets() {
        let mut parser = SseParser::new();
        let mut out = Vec::new();
        parser.push(b"event: e\ndata: tail", &mut out);
        assert!(out.is_empty());
        parser.finish(&mut out);
        assert_eq!(out, [ev(Some("e"), "tail")]);
        parser.push(b"data: again\n\n", &mut out);
        assert_eq!(out[1], ev(None, "again"));
    }

    #[test]
    fn sse_bom_and_invalid_utf8() {
        let events = parse_all(&[b"\xEF\xBB\xBFdata: \xE2\x82", b"\xAC \xff\n\n"]);
        assert_eq!(events, [ev(None, "€ \u{FFFD}")]);
    }

    const STREAM: &str = "event: message_start\n\
data: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"model\":\"claude-opus-4-7\",\"stop_reason\":null,\"usage\":{\"input_tokens\":25,\"cache_creation_input_tokens\":100,\"cache_read_input_tokens\":2000,\"output_tokens\":1}}}\n\n\
event: content_block_start\n\
data: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n\
event: ping\n\
data: {\"type\": \"ping\"}\n\n\
event: content_block_delta\n\
data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hello\"}}\n\n\
event: content_block_stop\n\
data: {\"type\":\"content_block_stop\",\"index\":0}\n\n\
event: message_delta\n\
data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":15}}\n\n\
event: message_stop\n\
data: {\"type\":\"message_stop\"}\n\n";

    #[test]
    fn tracker_follows_a_complete_stream() {
        let mut t = StreamTracker::new();
        t.feed(STREAM.as_bytes());
        t.finish();
        assert_eq!(
            t.usage(),
            Usage {
                input_tokens: 25,
                output_tokens: 15,
                cache_creation_input_tokens: 100,
                cache_read_input_tokens: 2000,
                cache_creation_1h_input_tokens: 0,
            }
        );
        assert!(t.content_started());
        assert!(t.is_complete());
        assert!(t.error().is_none());
        assert!(t.events.is_empty());
    }

    #[test]
    fn tracker_states_along_the_stream() {
        let mut t = StreamTracker::new();
        let (start, rest) = STREAM.split_at(STREAM.find("event: content_block_start").unwrap());
        t.feed(start.as_bytes());
        assert_eq!(t.usage().input_tokens, 25);
        assert_eq!(t.usage().output_tokens, 1);
        assert!(!t.content_started());
        t.feed(b"event: ping\ndata: {\"type\":\"ping\"}\n\nevent: brand_new\ndata: {}\n\n");
        assert!(!t.content_started());
        t.feed(rest.as_bytes());
        assert!(t.content_started());
        assert!(t.is_complete());
    }

    #[test]
    fn message_delta_overrides_only_the_fields_it_has() {
        let mut t = StreamTracker::new();
        t.feed(b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":10,\"output_tokens\":1}}}\n\n");
        t.feed(b"event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":5}}\n\n");
        t.feed(b"event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"input_tokens\":12,\"output_tokens\":9,\"cache_read_input_tokens\":null}}\n\n");
        assert_eq!(
            t.usage(),
            Usage {
                input_tokens: 12,
                output_tokens: 9,
                ..Default::default()
            }
        );
    }

    #[test]
    fn tracker_reports_a_mid_stream_error() {
        let mut t = StreamTracker::new();
        let (head, _) = STREAM.split_at(STREAM.find("event: message_delta").unwrap());
        t.feed(head.as_bytes());
        t.feed(b"event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n");
        let err = t.error().unwrap();
        assert_eq!(err.kind(), ApiErrorKind::Overloaded);
        assert_eq!(err.message(), "Overloaded");
        assert!(t.content_started());
        assert!(!t.is_complete());
        let mut t = StreamTracker::new();
        t.feed(b"event: error\ndata: oops\n\n");
        assert_eq!(t.error().unwrap().kind(), ApiErrorKind::Api);
        assert!(!t.content_started());
    }

    #[test]
    fn unnamed_events_fall_back_to_the_payload_type() {
        let mut t = StreamTracker::new();
        t.feed(
            b"data: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":3}}}\n\n",
        );
        t.feed(b"data: {\"type\":\"message_stop\"}\n\n");
        assert_eq!(t.usage().input_tokens, 3);
        assert!(t.is_complete());
    }
}
