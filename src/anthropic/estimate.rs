//! The input-token estimate of a request and its prompt-cache breakpoints: the rules
//! (documented on [`RequestMeta::scan`](super::RequestMeta::scan)) and the counters the
//! scanner ([`super::scan`]) feeds as it walks the body.

use xxhash_rust::xxh3::Xxh3Default;

/// A prompt-cache breakpoint of a request: the prefix the API caches up to a block marked with
/// `cache_control` (tools first, then system, then messages, whatever the member order of the
/// body).
///
/// ```
/// use tower_claude::anthropic::{CacheTtl, RequestMeta};
///
/// let body = br#"{"model":"claude-opus-4-7","max_tokens":10,
///   "system":[{"type":"text","text":"Long instructions...","cache_control":{"type":"ephemeral","ttl":"1h"}}],
///   "messages":[{"role":"user","content":[{"type":"text","text":"Hi","cache_control":{"type":"ephemeral"}}]}]}"#;
/// let meta = RequestMeta::scan(body).unwrap();
/// let [system, messages] = &meta.cache_breakpoints[..] else { panic!() };
/// assert_eq!(system.ttl, CacheTtl::OneHour);
/// assert_eq!(messages.ttl, CacheTtl::FiveMinutes);
/// // The messages prefix contains the system prefix.
/// assert!(messages.tokens > system.tokens && messages.tokens < meta.input_tokens);
/// assert_ne!(system.prefix, messages.prefix);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct CacheBreakpoint {
    /// A 128-bit hash (XXH3) of the prefix bytes (the `tools` array up to here, or all of it, then
    /// the `system` value likewise, then `messages`): equal prefixes, byte for byte, hash
    /// alike.
    pub prefix: u128,
    /// The estimated input tokens of the prefix (same rules as
    /// [`RequestMeta::input_tokens`](super::RequestMeta::input_tokens), without the per-request overhead).
    pub tokens: u64,
    /// How long the API keeps the prefix cached.
    pub ttl: CacheTtl,
}

/// The lifetime of a prompt-cache entry, refreshed each time it is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum CacheTtl {
    /// 5 minutes (the default).
    #[default]
    FiveMinutes,
    /// 1 hour (`"cache_control":{"type":"ephemeral","ttl":"1h"}`).
    OneHour,
}

impl CacheTtl {
    /// The duration.
    ///
    /// ```
    /// use tower_claude::anthropic::CacheTtl;
    ///
    /// assert_eq!(CacheTtl::OneHour.duration().as_secs(), 3_600);
    /// ```
    pub fn duration(self) -> std::time::Duration {
        match self {
            Self::FiveMinutes => std::time::Duration::from_secs(300),
            Self::OneHour => std::time::Duration::from_secs(3_600),
        }
    }
}

// Token-estimate constants; documented on `RequestMeta::scan`.
pub(super) const BASE_TOKENS: u64 = 8;
pub(super) const MESSAGE_TOKENS: u64 = 8;
pub(super) const BLOCK_TOKENS: u64 = 4;
pub(super) const TOOL_TOKENS: u64 = 32;
pub(super) const TOOL_PROMPT_TOKENS: u64 = 400;
pub(super) const IMAGE_TOKENS: u64 = 1_600;
pub(super) const PDF_PAGE_TOKENS: u64 = 3_000;
pub(super) const PDF_PAGE_BYTES: u64 = 50_000;
pub(super) const PDF_MAX_PAGES: u64 = 600;
pub(super) const EXTERNAL_DOCUMENT_TOKENS: u64 = 10 * PDF_PAGE_TOKENS;
pub(super) const TEXT_BYTES_PER_TOKEN: u64 = 3;

/// The most prompt-cache breakpoints recorded per request (the API rejects more than four).
pub const MAX_BREAKPOINTS: usize = 8;

/// Top-level members that carry no prompt text.
pub(super) const UNCOUNTED: &[&[u8]] = &[
    b"metadata",
    b"stop_sequences",
    b"top_k",
    b"top_p",
    b"service_tier",
    b"thinking",
    b"container",
    b"inference_geo",
];

/// What an object is, for the structural overhead of the estimate.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Role {
    Plain,
    Message,
    Block,
    Tool,
}

/// The `type` of an object, as far as the estimate cares.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Tag {
    Other,
    Base64,
    Url,
    File,
    Image,
}

/// An object that is a media source (`{"type":"base64",...}`, `url`, `file`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Source {
    /// Base64 image data.
    Image,
    /// Base64 document data of this many (encoded) bytes.
    Document(usize),
    /// A `url` or `file` reference.
    External,
}

/// The three members whose prefixes the API caches, in cache order.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Section {
    Tools = 0,
    System = 1,
    Messages = 2,
}

/// Where a section's value lies and what it counted.
#[derive(Clone, Copy, Default)]
pub(super) struct SectionSpan {
    pub(super) start: usize,
    pub(super) end: usize,
    /// Counters when the section started and ended: (text units, fixed tokens).
    pub(super) at_start: (u64, u64),
    pub(super) at_end: (u64, u64),
    pub(super) seen: bool,
}

/// A breakpoint found by the scan, before hashing.
#[derive(Clone, Copy)]
pub(super) struct RawBreakpoint {
    pub(super) section: Section,
    /// Byte offset just after the block with `cache_control`.
    pub(super) end: usize,
    /// Counters at that point.
    pub(super) at: (u64, u64),
    pub(super) ttl: CacheTtl,
}

/// What the scan has counted so far: text units, fixed tokens, the prompt-cache sections and
/// their breakpoints. The scanner adds to it as it walks the body; [`Estimate::input_tokens`]
/// and [`Estimate::hash_breakpoints`] give the results.
pub(super) struct Estimate {
    pub(super) text_units: u64,
    pub(super) fixed_tokens: u64,
    pub(super) saw_tool: bool,
    /// The prompt-cache section being scanned, if any.
    pub(super) section: Option<Section>,
    pub(super) sections: [SectionSpan; 3],
    pub(super) breakpoints: Vec<RawBreakpoint>,
}

impl Estimate {
    pub(super) fn new() -> Self {
        Self {
            text_units: 0,
            fixed_tokens: 0,
            saw_tool: false,
            section: None,
            sections: [SectionSpan::default(); 3],
            breakpoints: Vec::new(),
        }
    }

    /// The estimate of the whole request: the per-request overhead, the text, the fixed
    /// costs and the tool-use system prompt.
    pub(super) fn input_tokens(&self) -> u64 {
        let text = self.text_units.div_ceil(TEXT_BYTES_PER_TOKEN);
        let tools = if self.saw_tool { TOOL_PROMPT_TOKENS } else { 0 };
        BASE_TOKENS
            .saturating_add(text)
            .saturating_add(self.fixed_tokens)
            .saturating_add(tools)
    }

    /// The fixed overhead of an object that is a `role` (a message, a block, a tool).
    pub(super) fn object(&mut self, role: Role) {
        self.fixed_tokens += match role {
            Role::Plain => 0,
            Role::Message => MESSAGE_TOKENS,
            Role::Block => BLOCK_TOKENS,
            Role::Tool => {
                self.saw_tool = true;
                TOOL_TOKENS
            }
        };
    }

    /// Adds the cost of a media source found inside an object whose `type` is `block`.
    pub(super) fn charge(&mut self, src: Option<Source>, block: Tag) {
        let Some(src) = src else { return };
        let tokens = match src {
            Source::Image => IMAGE_TOKENS,
            Source::Document(encoded) => {
                let decoded = (encoded as u64).saturating_mul(3) / 4;
                decoded.div_ceil(PDF_PAGE_BYTES).clamp(1, PDF_MAX_PAGES) * PDF_PAGE_TOKENS
            }
            Source::External if block == Tag::Image => IMAGE_TOKENS,
            Source::External => EXTERNAL_DOCUMENT_TOKENS,
        };
        self.fixed_tokens = self.fixed_tokens.saturating_add(tokens);
    }

    /// Hashes the prefix of every breakpoint, in cache order: tools, system, messages. A
    /// prefix hash covers the whole of each earlier section and the part of its own section
    /// up to the breakpoint; its tokens count the same parts.
    pub(super) fn hash_breakpoints(&mut self, b: &[u8]) -> Vec<CacheBreakpoint> {
        let mut raw = std::mem::take(&mut self.breakpoints);
        raw.sort_by_key(|bp| (bp.section as u8, bp.end));
        let mut out = Vec::with_capacity(raw.len());
        // The hash state and counters of the sections before the current one.
        let mut before = Xxh3Default::new();
        let mut before_units = 0u64;
        let mut before_fixed = 0u64;
        let mut before_tool = false;
        for section in [Section::Tools, Section::System, Section::Messages] {
            let span = self.sections[section as usize];
            let mut hasher = before.clone();
            // A marker per section keeps `tools:[a] system:b` apart from `system:[a] b`.
            hasher.update(&[section as u8 + 1]);
            let mut hashed = span.start;
            for bp in raw.iter().filter(|bp| bp.section == section) {
                if !span.seen || bp.end < hashed || bp.end > span.end {
                    continue;
                }
                hasher.update(&b[hashed..bp.end]);
                hashed = bp.end;
                let units = before_units + (bp.at.0 - span.at_start.0);
                let fixed = before_fixed + (bp.at.1 - span.at_start.1);
                let tool_prompt = if before_tool || section == Section::Tools {
                    TOOL_PROMPT_TOKENS
                } else {
                    0
                };
                out.push(CacheBreakpoint {
                    prefix: hasher.digest128(),
                    tokens: units
                        .div_ceil(TEXT_BYTES_PER_TOKEN)
                        .saturating_add(fixed)
                        .saturating_add(tool_prompt),
                    ttl: bp.ttl,
                });
            }
            if span.seen {
                if out.len() == raw.len() {
                    break;
                }
                hasher.update(&b[hashed..span.end]);
                before_units += span.at_end.0 - span.at_start.0;
                before_fixed += span.at_end.1 - span.at_start.1;
                before_tool |= section == Section::Tools && self.saw_tool;
            }
            before = hasher;
        }
        out
    }
}

/// The TTL of a `cache_control` object given as its raw bytes: one hour when it has a `ttl`
/// member of `"1h"`, else five minutes.
pub(super) fn ttl_of(raw: &[u8]) -> CacheTtl {
    let has = |needle: &[u8]| raw.windows(needle.len()).any(|w| w == needle);
    if has(b"\"ttl\"") && has(b"\"1h\"") {
        CacheTtl::OneHour
    } else {
        CacheTtl::FiveMinutes
    }
}
