//! Token usage from JSON responses and from SSE streams.

use super::ApiError;

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
    pub fn from_json(body: &[u8]) -> Option<Usage> {
        todo!()
    }

    /// Input tokens that count toward the input-tokens-per-minute limit:
    /// `input_tokens + cache_creation_input_tokens` (cache reads do not count).
    pub fn counted_input_tokens(&self) -> u64 {
        self.input_tokens + self.cache_creation_input_tokens
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
#[derive(Debug, Default)]
pub struct SseParser {
    buf: Vec<u8>,
}

impl SseParser {
    /// A new parser.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds a chunk; complete events are appended to `out`.
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<SseEvent>) {
        todo!()
    }

    /// Ends the stream: a final event not followed by a blank line is dispatched.
    pub fn finish(&mut self, out: &mut Vec<SseEvent>) {
        todo!()
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
}

impl StreamTracker {
    /// A new tracker.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds a chunk of the stream.
    pub fn feed(&mut self, chunk: &[u8]) {
        todo!()
    }

    /// Ends the stream (dispatches a trailing event without blank line).
    pub fn finish(&mut self) {
        todo!()
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
}
