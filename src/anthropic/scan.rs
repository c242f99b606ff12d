//! The request-body scanner: one pass over the bytes of a JSON body that validates it and
//! reads what [`RequestMeta`](super::RequestMeta) holds (feeding the token
//! [estimate](super::estimate)), and the canonical writer the response cache hashes.

use super::estimate::{
    CacheBreakpoint, CacheTtl, Estimate, MAX_BREAKPOINTS, RawBreakpoint, Role, Section,
    SectionSpan, Source, Tag, UNCOUNTED, ttl_of,
};

/// Deepest nesting accepted (objects and arrays); deeper documents are rejected instead of
/// recursing further.
const MAX_DEPTH: u32 = 256;

/// Bytes that end the fast path of a string: `"`, `\` and control characters.
pub(super) static STRING_SPECIAL: [bool; 256] = {
    let mut table = [false; 256];
    let mut i = 0;
    while i < 0x20 {
        table[i] = true;
        i += 1;
    }
    table[b'"' as usize] = true;
    table[b'\\' as usize] = true;
    table
};

/// What a scan read: the fields of a [`RequestMeta`](super::RequestMeta), and where the
/// top-level `model` values lie (for [`rewrite_model`](super::rewrite_model)).
#[derive(Default)]
pub(super) struct Scan {
    pub(super) model: Option<String>,
    pub(super) max_tokens: Option<u64>,
    pub(super) stream: bool,
    pub(super) temperature: Option<f64>,
    pub(super) input_tokens: u64,
    pub(super) cache_breakpoints: Vec<CacheBreakpoint>,
    /// Spans of the top-level `model` values (recorded only by a scanner
    /// [`with_spans`](Scanner::with_spans)).
    pub(super) model_spans: Vec<(usize, usize)>,
    pub(super) open_brace: usize,
    pub(super) has_members: bool,
    /// How the body differs from its canonical form (recorded by [`RequestMeta::scan`](super::RequestMeta::scan) only).
    pub(super) canonical: CanonicalHints,
}

// Why a hand-written scanner: the stack needs four top-level fields and a token estimate from
// every Messages API request, and bodies routinely carry 100 KB+ of prompt and megabytes of
// base64 images. Building a `serde_json::Value` tree would allocate a `String` per string and a
// map per object only to throw it away, and a typed `Deserialize` model of the whole API would
// break on every new content-block type. This scanner validates the JSON syntax (and the
// UTF-8 of the strings that are not ASCII), reads the fields and computes the estimate in a
// single pass over the bytes, allocating nothing but the `model` string (and the span list
// `rewrite_model` needs); serde_json only decodes the `model` token when it has escapes. On realistic bodies it
// runs at about 1.1-1.2 GB/s, 1.6-5x faster than parsing into a `serde_json::Value`
// (`benches/meta.rs`).
pub(super) struct Scanner<'a> {
    b: &'a [u8],
    i: usize,
    check_fields: bool,
    /// Whether [`run`](Self::run) records the spans of the top-level `model` values
    /// ([`Scan::model_spans`], for [`rewrite_model`](super::rewrite_model) only: a scan of
    /// [`RequestMeta`](super::RequestMeta) would allocate the list for nothing).
    want_spans: bool,
    /// The first wrong field type found; reported only once the whole document is known to be
    /// valid JSON (a syntax error anywhere wins: the body is not JSON at all).
    field_error: Option<MetaError>,
    /// The token estimate and prompt-cache breakpoints counted so far.
    est: Estimate,
    /// What the canonical form of the body needs (see [`CanonicalHints`]).
    canon: CanonRecorder,
}

type Res<T> = Result<T, MetaError>;

impl<'a> Scanner<'a> {
    pub(super) fn new(b: &'a [u8], check_fields: bool) -> Self {
        Self {
            b,
            i: 0,
            check_fields,
            want_spans: false,
            field_error: None,
            est: Estimate::new(),
            canon: CanonRecorder::default(),
        }
    }

    /// A scanner that records the spans of the top-level `model` values
    /// ([`Scan::model_spans`]), without checking the fields' types.
    pub(super) fn with_spans(b: &'a [u8]) -> Self {
        let mut s = Self::new(b, false);
        s.want_spans = true;
        s
    }

    /// A scanner that also records [`CanonicalHints`] (the scan of
    /// [`RequestMeta`](super::RequestMeta)).
    ///
    /// `held`: the body as a [`Bytes`](bytes::Bytes) (the very bytes `b` points into), which
    /// the hints then hold instead of fingerprinting the body (see [`CanonicalHints`]).
    pub(super) fn recording(b: &'a [u8], held: Option<&bytes::Bytes>) -> Self {
        let mut s = Self::new(b, true);
        s.canon.held = held
            .filter(|h| h.as_ptr() == b.as_ptr() && h.len() == b.len())
            .cloned();
        // Spans are `u32`: a larger body (never a Messages API request) gets no hints.
        s.canon.on = u32::try_from(b.len()).is_ok();
        // This thread's member stack of its last recording (no allocation per scan); room
        // for a typical request's nesting without growing the first time.
        s.canon.stack = STACK
            .try_with(std::cell::Cell::take)
            .ok()
            .filter(|stack| stack.capacity() > 0)
            .unwrap_or_else(|| Vec::with_capacity(16));
        s
    }

    fn err(&self, detail: &'static str) -> MetaError {
        MetaError::new(MetaErrorKind::InvalidJson, self.i, detail)
    }

    fn field_err(at: usize, detail: &'static str) -> MetaError {
        MetaError::new(MetaErrorKind::InvalidField, at, detail)
    }

    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn ws(&mut self) {
        let start = self.i;
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.i += 1;
        }
        if self.i != start {
            // Insignificant whitespace: not in the canonical form.
            self.canon.clean = false;
        }
    }

    /// After an object member: `true` past the closing `}`, `false` past a `,`.
    fn object_ends(&mut self) -> Res<bool> {
        self.ws();
        match self.peek() {
            Some(b',') => {
                self.i += 1;
                Ok(false)
            }
            Some(b'}') => {
                self.i += 1;
                Ok(true)
            }
            _ => Err(self.err("expected ',' or '}'")),
        }
    }

    fn expect(&mut self, byte: u8, detail: &'static str) -> Res<()> {
        self.ws();
        if self.peek() == Some(byte) {
            self.i += 1;
            Ok(())
        } else {
            Err(self.err(detail))
        }
    }

    /// Scans the document: validates it (UTF-8, JSON syntax, nesting) and reads it.
    ///
    /// UTF-8 is checked where the document can hold anything but ASCII, inside strings:
    /// [`string`](Self::string) checks each string that has a non-ASCII byte, and everywhere
    /// else the grammar takes only ASCII bytes (so a document the scan accepts is UTF-8). A
    /// document it refuses is checked whole before the error is given, so that one that is
    /// not UTF-8 gets the error a check of the whole document up front gave (the byte where
    /// it stops being UTF-8), whatever else is wrong with it. Before, every body paid for
    /// that check up front (`from_utf8`, ~1.2 instructions a byte).
    pub(super) fn run(self) -> Res<Scan> {
        let b = self.b;
        self.run_unchecked()
            .map_err(|err| match std::str::from_utf8(b) {
                Ok(_) => err,
                Err(e) => {
                    MetaError::new(MetaErrorKind::InvalidJson, e.valid_up_to(), "invalid UTF-8")
                }
            })
    }

    /// [`run`](Self::run) but for the error of a document that is not UTF-8.
    fn run_unchecked(mut self) -> Res<Scan> {
        self.ws();
        match self.peek() {
            Some(b'{') => {}
            Some(b'[' | b'"' | b'-' | b'0'..=b'9' | b't' | b'f' | b'n') => {
                return Err(MetaError::new(
                    MetaErrorKind::NotAnObject,
                    self.i,
                    "the top-level value is not an object",
                ));
            }
            Some(_) => return Err(self.err("expected a JSON object")),
            None => return Err(self.err("empty body")),
        }
        let open_brace = self.i;
        self.i += 1;
        let mut meta = Scan::default();
        let mut model_spans = Vec::new();
        self.ws();
        let has_members = self.peek() != Some(b'}');
        let mark = self.canon.stack.len();
        let mut unsorted = false;
        if has_members {
            loop {
                self.ws();
                if self.peek() != Some(b'"') {
                    return Err(self.err("expected a member name"));
                }
                let (ks, ke, _, kesc) = self.string()?;
                self.expect(b':', "expected ':'")?;
                self.ws();
                let key = &self.b[ks..ke];
                let start = self.i;
                match key {
                    b"model" => {
                        if self.peek() == Some(b'"') {
                            // The string read here: whether it has escapes is known without
                            // looking at it again.
                            let (vs, ve, _, escaped) = self.string()?;
                            meta.model = Some(match self.str_of(vs, ve) {
                                Some(model) if !escaped => model.to_owned(),
                                _ => self.decode_string(start, self.i)?,
                            });
                        } else {
                            self.value(false, Role::Plain, Role::Plain, 1)?;
                        }
                        if self.want_spans {
                            model_spans.push((start, self.i));
                        }
                        if self.b[start] != b'"' && self.check_fields {
                            let err = Self::field_err(start, "`model` is not a string");
                            self.field_error.get_or_insert(err);
                        }
                    }
                    b"max_tokens" => {
                        self.value(false, Role::Plain, Role::Plain, 1)?;
                        let token = &self.b[start..self.i];
                        let parsed = if !token.iter().all(u8::is_ascii_digit) {
                            None
                        } else if token.len() <= 19 {
                            // At most 19 digits always fit a `u64`: summed as they are tested.
                            Some(token.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')))
                        } else {
                            self.str_of(start, self.i)
                                .and_then(|t| t.parse::<u64>().ok())
                        };
                        match parsed {
                            Some(v) => meta.max_tokens = Some(v),
                            None if self.check_fields => {
                                let err = Self::field_err(
                                    start,
                                    "`max_tokens` is not a non-negative integer",
                                );
                                self.field_error.get_or_insert(err);
                            }
                            None => {}
                        }
                    }
                    b"stream" => {
                        self.value(false, Role::Plain, Role::Plain, 1)?;
                        match &self.b[start..self.i] {
                            b"true" => meta.stream = true,
                            b"false" => meta.stream = false,
                            _ if self.check_fields => {
                                let err = Self::field_err(start, "`stream` is not a boolean");
                                self.field_error.get_or_insert(err);
                            }
                            _ => {}
                        }
                    }
                    b"temperature" => {
                        self.value(false, Role::Plain, Role::Plain, 1)?;
                        let parsed = match self.b[start] {
                            b'-' | b'0'..=b'9' => self
                                .str_of(start, self.i)
                                .and_then(|t| t.parse::<f64>().ok())
                                // `1e999` parses as infinity: out of range, like serde_json.
                                .filter(|v| v.is_finite()),
                            _ => None,
                        };
                        match parsed {
                            Some(v) => meta.temperature = Some(v),
                            None if self.check_fields => {
                                let err = Self::field_err(start, "`temperature` is not a number");
                                self.field_error.get_or_insert(err);
                            }
                            None => {}
                        }
                    }
                    b"messages" => {
                        self.section(Section::Messages, Role::Message)?;
                    }
                    b"system" => {
                        self.section(Section::System, Role::Block)?;
                    }
                    b"tools" => {
                        self.section(Section::Tools, Role::Tool)?;
                    }
                    key if UNCOUNTED.contains(&key) => {
                        self.value(false, Role::Plain, Role::Plain, 1)?;
                    }
                    _ => {
                        let src = self.value(true, Role::Plain, Role::Plain, 1)?;
                        self.est.charge(src, Tag::Other);
                    }
                }
                unsorted |= self.canon.member(self.b, mark, (ks, ke), kesc, self.i);
                self.ws();
                match self.peek() {
                    Some(b',') => self.i += 1,
                    Some(b'}') => break,
                    _ => return Err(self.err("expected ',' or '}'")),
                }
            }
        }
        self.i += 1; // the closing brace
        self.canon
            .end_object(self.b, mark, unsorted, open_brace, self.i);
        self.ws();
        if self.i != self.b.len() {
            return Err(self.err("trailing characters after the object"));
        }
        if let Some(err) = self.field_error.take() {
            return Err(err);
        }
        meta.input_tokens = self.est.input_tokens();
        if !self.est.breakpoints.is_empty() {
            meta.cache_breakpoints = self.est.hash_breakpoints(self.b);
        }
        meta.model_spans = model_spans;
        meta.open_brace = open_brace;
        meta.has_members = has_members;
        if self.canon.on {
            meta.canonical = std::mem::take(&mut self.canon).finish(self.b);
        }
        Ok(meta)
    }

    /// The value of a `tools`, `system` or `messages` member: scanned like any counted value,
    /// its span and counters recorded for the prompt-cache prefixes. A duplicate member
    /// replaces the earlier one (the last one wins, as for the other fields).
    fn section(&mut self, section: Section, elems: Role) -> Res<()> {
        let start = self.i;
        let at_start = (self.est.text_units, self.est.fixed_tokens);
        let outer = self.est.section.replace(section);
        let kept = self.est.breakpoints.len();
        let src = self.value(true, Role::Plain, elems, 1);
        self.est.section = outer;
        let src = src?;
        self.est.charge(src, Tag::Other);
        // Breakpoints of an earlier duplicate of this member are void.
        let mut idx = 0;
        self.est.breakpoints.retain(|bp| {
            idx += 1;
            idx > kept || bp.section != section
        });
        self.est.sections[section as usize] = SectionSpan {
            start,
            end: self.i,
            at_start,
            at_end: (self.est.text_units, self.est.fixed_tokens),
            seen: true,
        };
        Ok(())
    }

    /// `b[start..end]` as text (`None` if it is not UTF-8).
    fn str_of(&self, start: usize, end: usize) -> Option<&'a str> {
        std::str::from_utf8(self.b.get(start..end)?).ok()
    }

    /// Decodes the string token `b[start..end]` (quotes included).
    fn decode_string(&self, start: usize, end: usize) -> Res<String> {
        let inner = &self.b[start + 1..end - 1];
        if !inner.contains(&b'\\') {
            if let Some(s) = self.str_of(start + 1, end - 1) {
                return Ok(s.to_owned());
            }
        }
        serde_json::from_slice::<String>(&self.b[start..end])
            .map_err(|_| MetaError::new(MetaErrorKind::InvalidJson, start, "invalid string"))
    }

    /// One value. `role` is what the value is when it is an object; `elems` what the elements
    /// are when it is an array. Returns the media source the value is, if any (for the caller
    /// to charge).
    fn value(&mut self, count: bool, role: Role, elems: Role, depth: u32) -> Res<Option<Source>> {
        match self.peek() {
            Some(b'{') => self.object(count, role, depth + 1),
            Some(b'[') => {
                self.array(count, elems, depth + 1)?;
                Ok(None)
            }
            Some(b'"') => {
                let (_, _, units, _) = self.string()?;
                if count {
                    self.est.text_units += units;
                }
                Ok(None)
            }
            Some(b'-' | b'0'..=b'9') => {
                let start = self.i;
                self.number()?;
                if count {
                    self.est.text_units += (self.i - start) as u64;
                }
                Ok(None)
            }
            Some(b't') => self.literal(b"true", count),
            Some(b'f') => self.literal(b"false", count),
            Some(b'n') => self.literal(b"null", count),
            Some(_) => Err(self.err("expected a value")),
            None => Err(self.err("unexpected end of input")),
        }
    }

    fn literal(&mut self, word: &'static [u8], count: bool) -> Res<Option<Source>> {
        if self.b[self.i..].starts_with(word) {
            self.i += word.len();
            if count {
                self.est.text_units += word.len() as u64;
            }
            Ok(None)
        } else {
            Err(self.err("invalid literal"))
        }
    }

    fn number(&mut self) -> Res<()> {
        let start = self.i;
        // A non-negative integer of at most 19 digits is its own canonical form.
        let mut plain = true;
        if self.peek() == Some(b'-') {
            self.i += 1;
            plain = false;
        }
        match self.peek() {
            Some(b'0') => self.i += 1,
            Some(b'1'..=b'9') => self.digits(),
            _ => return Err(self.err("invalid number")),
        }
        if self.peek() == Some(b'.') {
            self.i += 1;
            plain = false;
            if !matches!(self.peek(), Some(b'0'..=b'9')) {
                return Err(self.err("invalid number"));
            }
            self.digits();
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.i += 1;
            plain = false;
            if let Some(b'+' | b'-') = self.peek() {
                self.i += 1;
            }
            if !matches!(self.peek(), Some(b'0'..=b'9')) {
                return Err(self.err("invalid number"));
            }
            self.digits();
        }
        if !plain || self.i - start > 19 {
            self.canon.number(start, self.i);
        }
        Ok(())
    }

    fn digits(&mut self) {
        while let Some(b'0'..=b'9') = self.peek() {
            self.i += 1;
        }
    }

    /// A string starting at the current `"`. Returns the span of its contents (without the
    /// quotes), its text units (bytes plus one per non-ASCII character) and whether it has
    /// escapes; leaves the position after the closing quote.
    ///
    /// In line: a string whose first sixteen bytes hold its closing quote and nothing else to
    /// stop at (a member name or a short value: `role`, `user`, `content`, `messages`,
    /// `max_tokens`) is read here, from one or two words; any other is
    /// [`long_string`](Self::long_string)'s (callgrind: a call was ~120 instructions for such
    /// a string, its prologue, epilogue and answer through memory included).
    #[inline(always)]
    fn string(&mut self) -> Res<(usize, usize, u64, bool)> {
        let start = self.i + 1;
        let mut j = start;
        for _ in 0..2 {
            let Some(word) = self.b.get(j..).and_then(<[u8]>::first_chunk::<8>) else {
                break;
            };
            let special = special_bytes(u64::from_le_bytes(*word));
            if special == 0 {
                j += 8;
                continue;
            }
            let at = (special.trailing_zeros() / 8) as usize;
            if word[at] == b'"' {
                let end = j + at;
                self.i = end + 1;
                return Ok((start, end, (end - start) as u64, false));
            }
            break;
        }
        self.long_string()
    }

    /// [`string`](Self::string) for a string that is not short plain ASCII.
    #[inline(never)]
    fn long_string(&mut self) -> Res<(usize, usize, u64, bool)> {
        let b = self.b;
        let start = self.i + 1;
        let mut j = start;
        let mut non_ascii = 0u64;
        // Whether a byte is not ASCII: then the string's contents are checked as UTF-8 (see
        // `run`).
        let mut wide = false;
        let mut escaped = false;
        // Eight bytes at a time while they are plain ASCII text (no quote, backslash, control
        // or non-ASCII byte): prompts are mostly that. At the string's fourth plain word, a
        // block at a time: a fixed-size block folded without an early exit, which the
        // compiler turns into vector compares (callgrind: the 2 KB prompt of the proxy
        // benchmarks, 8.6k instructions per scan with words alone, 5.9k with blocks). Short
        // strings never pay for a block test, a long one tries blocks once: prose whose
        // escapes and non-ASCII letters come every few words fails it (the 1 KB and 10 KB
        // bodies of `benches/meta.rs`: +3 % and +5 %).
        // A word with a byte to stop at moves `j` straight to that byte (the first flagged
        // byte of `special_bytes` is exact): the byte loop below then starts on it instead of
        // testing the plain bytes before it one by one (callgrind: the eight strings of the
        // 150-byte request of `benches/rate_limit.rs`, ~140 instructions each before).
        let mut plain_words = 0u32;
        loop {
            while let Some(word) = b.get(j..).and_then(<[u8]>::first_chunk::<8>) {
                let special = special_bytes(u64::from_le_bytes(*word));
                if special != 0 {
                    j += (special.trailing_zeros() / 8) as usize;
                    break;
                }
                j += 8;
                plain_words += 1;
                if plain_words == 4 {
                    j = skip_plain_blocks(b, j);
                }
            }
            while let Some(&c) = b.get(j) {
                if STRING_SPECIAL[c as usize] {
                    break;
                }
                non_ascii += u64::from(c >= 0xC0);
                wide |= c >= 0x80;
                j += 1;
            }
            match b.get(j) {
                Some(b'"') => break,
                Some(b'\\') => {
                    escaped = true;
                    j += 1;
                    match b.get(j) {
                        Some(b'"' | b'\\' | b'b' | b'f' | b'n' | b'r' | b't') => j += 1,
                        Some(b'/') => {
                            // `serde_json` writes `/` unescaped.
                            self.canon.clean = false;
                            j += 1;
                        }
                        Some(b'u') => {
                            let hex = b.get(j + 1..j + 5);
                            let Some(hex) = hex.filter(|h| h.iter().all(u8::is_ascii_hexdigit))
                            else {
                                self.i = j;
                                return Err(self.err("invalid \\u escape"));
                            };
                            if !canonical_u_escape(hex) {
                                self.canon.clean = false;
                            }
                            j += 5;
                        }
                        _ => {
                            self.i = j;
                            return Err(self.err("invalid escape"));
                        }
                    }
                }
                Some(_) => {
                    self.i = j;
                    return Err(self.err("control character in string"));
                }
                None => {
                    self.i = j;
                    return Err(self.err("unterminated string"));
                }
            }
        }
        if wide {
            if let Err(e) = std::str::from_utf8(&b[start..j]) {
                self.i = start + e.valid_up_to();
                return Err(self.err("invalid UTF-8"));
            }
        }
        self.i = j + 1;
        Ok((start, j, (j - start) as u64 + non_ascii, escaped))
    }

    fn array(&mut self, count: bool, elems: Role, depth: u32) -> Res<()> {
        if depth > MAX_DEPTH {
            return Err(self.err("nesting too deep"));
        }
        self.i += 1;
        self.ws();
        if self.peek() == Some(b']') {
            self.i += 1;
            return Ok(());
        }
        loop {
            self.ws();
            let src = self.value(count, elems, Role::Plain, depth)?;
            if count {
                self.est.charge(src, Tag::Other);
            }
            self.ws();
            match self.peek() {
                Some(b',') => self.i += 1,
                Some(b']') => {
                    self.i += 1;
                    return Ok(());
                }
                _ => return Err(self.err("expected ',' or ']'")),
            }
        }
    }

    fn object(&mut self, count: bool, role: Role, depth: u32) -> Res<Option<Source>> {
        if depth > MAX_DEPTH {
            return Err(self.err("nesting too deep"));
        }
        self.i += 1;
        if count {
            self.est.object(role);
        }
        let mut tag = Tag::Other;
        let mut image_media = false;
        // The `data` member: (text units, encoded length); counted as text unless this object
        // turns out to be a base64 source.
        let mut data: Option<(u64, usize)> = None;
        let mut source: Option<Source> = None;
        // A `cache_control` object member of a tool or block: `Some(ttl)`.
        let mut cache_ttl: Option<CacheTtl> = None;
        let open_brace = self.i - 1;
        self.ws();
        if self.peek() == Some(b'}') {
            self.i += 1;
            return Ok(None);
        }
        let mark = self.canon.stack.len();
        let mut unsorted = false;
        loop {
            self.ws();
            if self.peek() != Some(b'"') {
                return Err(self.err("expected a member name"));
            }
            let (ks, ke, kunits, kesc) = self.string()?;
            if count {
                self.est.text_units += kunits;
            }
            self.expect(b':', "expected ':'")?;
            self.ws();
            let key = &self.b[ks..ke];
            let is_string = self.peek() == Some(b'"');
            match key {
                b"type" | b"media_type" if is_string => {
                    let (vs, ve, units, _) = self.string()?;
                    if count {
                        self.est.text_units += units;
                    }
                    let v = &self.b[vs..ve];
                    if key == b"type" {
                        tag = match v {
                            b"base64" => Tag::Base64,
                            b"url" => Tag::Url,
                            b"file" => Tag::File,
                            b"image" => Tag::Image,
                            _ => Tag::Other,
                        };
                    } else {
                        image_media = v.starts_with(b"image/");
                    }
                }
                b"data" if is_string => {
                    let (vs, ve, units, _) = self.string()?;
                    data = Some((units, ve - vs));
                }
                b"source" => {
                    source = self.value(count, Role::Plain, Role::Plain, depth)?;
                }
                b"cache_control"
                    if self.peek() == Some(b'{')
                        && matches!(role, Role::Block | Role::Tool)
                        && self.est.section.is_some() =>
                {
                    let start = self.i;
                    let src = self.value(count, Role::Plain, Role::Plain, depth)?;
                    if count {
                        self.est.charge(src, Tag::Other);
                    }
                    cache_ttl = Some(ttl_of(&self.b[start..self.i]));
                }
                b"content" => {
                    let src = self.value(count, Role::Plain, Role::Block, depth)?;
                    if count {
                        self.est.charge(src, Tag::Other);
                    }
                }
                _ => {
                    let src = self.value(count, Role::Plain, Role::Plain, depth)?;
                    if count {
                        self.est.charge(src, Tag::Other);
                    }
                }
            }
            unsorted |= self.canon.member(self.b, mark, (ks, ke), kesc, self.i);
            if self.object_ends()? {
                break;
            }
        }
        self.canon
            .end_object(self.b, mark, unsorted, open_brace, self.i);
        if !count {
            return Ok(None);
        }
        let this = match tag {
            Tag::Base64 if image_media => Some(Source::Image),
            Tag::Base64 => Some(Source::Document(data.map_or(0, |(_, len)| len))),
            Tag::Url | Tag::File => Some(Source::External),
            Tag::Other | Tag::Image => None,
        };
        if tag != Tag::Base64 {
            if let Some((units, _)) = data {
                self.est.text_units += units;
            }
        }
        self.est.charge(source, tag);
        if let (Some(ttl), Some(section)) = (cache_ttl, self.est.section) {
            if self.est.breakpoints.len() < MAX_BREAKPOINTS {
                self.est.breakpoints.push(RawBreakpoint {
                    section,
                    end: self.i,
                    at: (self.est.text_units, self.est.fixed_tokens),
                    ttl,
                });
            }
        }
        Ok(this)
    }
}

/// Bytes in a block of [`Scanner::string`]'s fast path.
const BLOCK: usize = 64;

/// `j` moved past the whole blocks of plain string bytes from `j` on (see
/// [`plain_block`]). Not inlined: the vector constants would otherwise stay in registers
/// through [`Scanner::string`]'s byte loop (callgrind: a 1 KB body of short strings and
/// non-ASCII prose +10 % inlined).
#[inline(never)]
fn skip_plain_blocks(b: &[u8], mut j: usize) -> usize {
    while let Some(block) = b.get(j..).and_then(<[u8]>::first_chunk::<BLOCK>) {
        if !plain_block(block) {
            break;
        }
        j += BLOCK;
    }
    j
}

/// Whether a block of string bytes is all printable ASCII other than `"` and `\` (nothing
/// to stop at, nothing to count).
fn plain_block(block: &[u8; BLOCK]) -> bool {
    let mut odd = false;
    for &c in block {
        // As a signed byte, below 0x20 is a control character or a non-ASCII byte: one
        // compare for both.
        odd |= ((c as i8) < 0x20) | (c == b'"') | (c == b'\\');
    }
    !odd
}

/// Whether the eight bytes of `w` are all printable ASCII other than `"` and `\` (the bytes a
/// string's fast path may skip: no escape, no end, no control character, nothing to count as
/// non-ASCII). Exact: the classic "has a zero / has less than" word tricks (Bit Twiddling
/// Hacks) have no false negatives for whether such a byte exists. (The tests' statement of
/// what [`special_bytes`] flags: the scanners themselves use the bytes it flags.)
#[cfg(test)]
pub(super) fn plain_ascii(w: u64) -> bool {
    special_bytes(w) == 0
}

/// The bytes of `w` (little-endian: the lowest is the first) that a string's fast path must
/// not skip — `"`, `\\`, control characters, non-ASCII — each as its high bit (the request
/// scanner's and the answer reader's skip to the first special byte); the lowest set bit is
/// exact (the word tricks may also flag bytes after a true one, never before), so
/// `trailing_zeros() / 8` is the index of the first such byte. Zero when all eight bytes are
/// printable ASCII other than `"` and `\\`.
#[inline]
pub(super) fn special_bytes(w: u64) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let has_zero = |v: u64| v.wrapping_sub(ONES) & !v & HIGH;
    let control = w.wrapping_sub(ONES * 0x20) & !w & HIGH;
    let quote = has_zero(w ^ (ONES * u64::from(b'"')));
    let backslash = has_zero(w ^ (ONES * u64::from(b'\\')));
    control | quote | backslash | (w & HIGH)
}

/// Writes the canonical form of a JSON request body to `out`: object members sorted by the
/// bytes of their (unescaped) names, recursively, the last of duplicate members kept, no
/// insignificant whitespace, strings escaped as `serde_json` writes them, numbers written
/// from their value (an integer that fits `u64` / `i64` as such, any other number as the
/// shortest `f64` that round-trips, with a `.0` or an exponent). Two bodies with the same
/// JSON value (as `serde_json::Value` sees it) write the same bytes; the response cache
/// hashes them into its key.
///
/// It walks the bytes with the scanner of [`RequestMeta::scan`](super::RequestMeta::scan) (no JSON tree): strings
/// without escapes, the bulk of a prompt, are copied as they are. `body` should be one that
/// `RequestMeta::scan` accepted (valid UTF-8 is not checked again); malformed JSON or a
/// top-level value that is not an object gives an error and leaves `out` unspecified.
pub(crate) fn write_canonical(body: &[u8], out: &mut Vec<u8>) -> Result<(), MetaError> {
    let mut scanner = Scanner::new(body, false);
    scanner.ws();
    if scanner.peek() != Some(b'{') {
        return Err(MetaError::new(
            MetaErrorKind::NotAnObject,
            scanner.i,
            "the top-level value is not an object",
        ));
    }
    scanner.canonical(out, 0)?;
    scanner.ws();
    if scanner.i != body.len() {
        return Err(scanner.err("trailing characters after the object"));
    }
    Ok(())
}

/// Writes a number canonically: from its value, an integer that fits `u64` / `i64` as such,
/// anything else as the shortest `f64` that round-trips (`{:?}` keeps a `.0` or an exponent,
/// so a float never looks like an integer).
pub(crate) fn write_canonical_number(
    n: &serde_json::Number,
    w: &mut impl std::io::Write,
) -> std::io::Result<()> {
    if let Some(u) = n.as_u64() {
        write!(w, "{u}")
    } else if let Some(i) = n.as_i64() {
        write!(w, "{i}")
    } else if let Some(f) = n.as_f64() {
        write!(w, "{f:?}")
    } else {
        write!(w, "{n}")
    }
}

/// A member of an object being written canonically: its name (unescaped) and where its
/// `"name":value` lies in the output.
struct CanonicalMember<'a> {
    name: std::borrow::Cow<'a, [u8]>,
    start: usize,
    end: usize,
}

impl<'a> Scanner<'a> {
    /// Writes the value at the current position canonically (see [`write_canonical`]).
    fn canonical(&mut self, out: &mut Vec<u8>, depth: u32) -> Res<()> {
        self.ws();
        match self.peek() {
            Some(b'{') => self.canonical_object(out, depth + 1),
            Some(b'[') => {
                if depth + 1 > MAX_DEPTH {
                    return Err(self.err("nesting too deep"));
                }
                self.i += 1;
                out.push(b'[');
                self.ws();
                if self.peek() == Some(b']') {
                    self.i += 1;
                } else {
                    loop {
                        self.canonical(out, depth + 1)?;
                        self.ws();
                        match self.peek() {
                            Some(b',') => {
                                self.i += 1;
                                out.push(b',');
                            }
                            Some(b']') => {
                                self.i += 1;
                                break;
                            }
                            _ => return Err(self.err("expected ',' or ']'")),
                        }
                    }
                }
                out.push(b']');
                Ok(())
            }
            Some(b'"') => {
                let start = self.i;
                let (_, _, _, escaped) = self.string()?;
                self.canonical_string(start, escaped, out)
            }
            Some(b'-' | b'0'..=b'9') => {
                let start = self.i;
                self.number()?;
                self.canonical_number(start, out)
            }
            Some(b't') => self.canonical_literal(b"true", out),
            Some(b'f') => self.canonical_literal(b"false", out),
            Some(b'n') => self.canonical_literal(b"null", out),
            Some(_) => Err(self.err("expected a value")),
            None => Err(self.err("unexpected end of input")),
        }
    }

    fn canonical_literal(&mut self, word: &'static [u8], out: &mut Vec<u8>) -> Res<()> {
        self.literal(word, false)?;
        out.extend_from_slice(word);
        Ok(())
    }

    /// The string token starting at `start` (scanned up to `self.i`): as it is without
    /// escapes, else unescaped and escaped again the way `serde_json` writes strings.
    fn canonical_string(&self, start: usize, escaped: bool, out: &mut Vec<u8>) -> Res<()> {
        let token = &self.b[start..self.i];
        if !escaped {
            out.extend_from_slice(token);
            return Ok(());
        }
        let decoded = self.decode_string(start, self.i)?;
        serde_json::to_writer(&mut *out, &decoded)
            .map_err(|_| MetaError::new(MetaErrorKind::InvalidJson, start, "invalid string"))
    }

    /// The number token starting at `start` (scanned up to `self.i`), from its value.
    fn canonical_number(&self, start: usize, out: &mut Vec<u8>) -> Res<()> {
        let token = &self.b[start..self.i];
        // A non-negative integer that fits `u64` is written as it is (no leading zeros: the
        // syntax has none); anything else is read as `serde_json` reads it.
        if token.len() <= 19 && token.iter().all(u8::is_ascii_digit) {
            out.extend_from_slice(token);
            return Ok(());
        }
        let n: serde_json::Number = serde_json::from_slice(token)
            .map_err(|_| MetaError::new(MetaErrorKind::InvalidJson, start, "invalid number"))?;
        // Writing into a `Vec` cannot fail.
        let _ = write_canonical_number(&n, out);
        Ok(())
    }

    /// An object: its members written as they come, then put in order (and the earlier of
    /// duplicates dropped) when they did not come sorted.
    fn canonical_object(&mut self, out: &mut Vec<u8>, depth: u32) -> Res<()> {
        if depth > MAX_DEPTH {
            return Err(self.err("nesting too deep"));
        }
        self.i += 1;
        out.push(b'{');
        let body_start = out.len();
        let mut members: Vec<CanonicalMember<'a>> = Vec::new();
        self.ws();
        if self.peek() == Some(b'}') {
            self.i += 1;
            out.push(b'}');
            return Ok(());
        }
        let mut sorted = true;
        loop {
            self.ws();
            if self.peek() != Some(b'"') {
                return Err(self.err("expected a member name"));
            }
            if !members.is_empty() {
                out.push(b',');
            }
            let member_start = out.len();
            let key_start = self.i;
            let (ks, ke, _, escaped) = self.string()?;
            let name = if escaped {
                std::borrow::Cow::Owned(self.decode_string(key_start, self.i)?.into_bytes())
            } else {
                std::borrow::Cow::Borrowed(&self.b[ks..ke])
            };
            self.canonical_string(key_start, escaped, out)?;
            self.expect(b':', "expected ':'")?;
            out.push(b':');
            self.canonical(out, depth)?;
            if members.last().is_some_and(|last| last.name >= name) {
                sorted = false;
            }
            members.push(CanonicalMember {
                name,
                start: member_start,
                end: out.len(),
            });
            if self.object_ends()? {
                break;
            }
        }
        if !sorted {
            // Stable: of members with the same name, the last one written stays last.
            members.sort_by(|a, b| a.name.cmp(&b.name));
            let written = out.split_off(body_start);
            let mut first = true;
            for (i, m) in members.iter().enumerate() {
                if members.get(i + 1).is_some_and(|next| next.name == m.name) {
                    continue;
                }
                if !first {
                    out.push(b',');
                }
                first = false;
                out.extend_from_slice(&written[m.start - body_start..m.end - body_start]);
            }
        }
        out.push(b'}');
        Ok(())
    }
}

/// Whether a response cache that keys on the canonical body was built in this process
/// ([`want_canonical_hints`]): only then does the scan of [`RequestMeta`](super::RequestMeta)
/// record [`CanonicalHints`] (about 1.5k instructions for a 2 KB body with two objects to
/// reorder, a few small allocations), which a process without one would never read.
static HINTS_WANTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// From now on, the scans of [`RequestMeta`](super::RequestMeta) in this process record
/// [`CanonicalHints`] (called when a response cache is built). Only a cost: hints are checked
/// against the body they are used for, and a scan without them changes nothing but speed.
pub(crate) fn want_canonical_hints() {
    HINTS_WANTED.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Whether scans record [`CanonicalHints`] (see [`want_canonical_hints`]).
pub(super) fn canonical_hints_wanted() -> bool {
    HINTS_WANTED.load(std::sync::atomic::Ordering::Relaxed)
}

/// Whether the four hex digits of a `\u` escape are the escape `serde_json` writes for that
/// character: `\u00XX` in lower case for a control character other than the five with a
/// short escape (`\b`, `\t`, `\n`, `\f`, `\r`). Any other `\u` escape is written differently
/// in the canonical form.
fn canonical_u_escape(hex: &[u8]) -> bool {
    let lower = |d: u8| d.is_ascii_digit() || (b'a'..=b'f').contains(&d);
    match hex {
        [b'0', b'0', h @ (b'0' | b'1'), l] if lower(*l) => {
            let v = (h - b'0') * 16
                + if l.is_ascii_digit() {
                    l - b'0'
                } else {
                    l - b'a' + 10
                };
            !matches!(v, 0x08 | 0x09 | 0x0a | 0x0c | 0x0d)
        }
        _ => false,
    }
}

/// An object member as the scan found it: the span of its name (without quotes) and of the
/// whole `"name":value`.
#[derive(Debug, Clone, Copy)]
struct MemberSpan {
    name: (u32, u32),
    start: u32,
    end: u32,
}

/// An object whose members are not in canonical order (or repeat a name): its span, and its
/// members already in canonical order (sorted by name, the last of duplicates kept), as
/// `members[first..first + count]` of the [`Layout`].
#[derive(Debug, Clone, Copy)]
struct Reordered {
    start: u32,
    end: u32,
    first: u32,
    count: u32,
}

/// At most this many numbers not trivially canonical (negative, fractional, with an exponent
/// or of more than 19 digits) are remembered for the key to check; a body with more gets no
/// hints.
const MAX_ODD_NUMBERS: usize = 4;

/// What the scan of [`RequestMeta`](super::RequestMeta) records for the canonical form of the
/// body (see [`CanonicalHints`]), as it goes.
struct CanonRecorder {
    /// Recording at all (the scan of `RequestMeta`, a body whose offsets fit `u32`).
    on: bool,
    /// Whether the body is still known to differ from its canonical form only by the order of
    /// object members: no whitespace between tokens, no escape `serde_json` would write
    /// otherwise, no escape in a member name. Starts `true`.
    clean: bool,
    /// The members of the objects being scanned, innermost last.
    stack: Vec<MemberSpan>,
    /// The members of the objects to reorder, each object's in canonical order.
    kept: Vec<MemberSpan>,
    /// The objects to reorder, in the order they end.
    objects: Vec<Reordered>,
    /// Numbers whose canonical form the key checks.
    numbers: [(u32, u32); MAX_ODD_NUMBERS],
    odd_numbers: u8,
    /// The scanned body itself, when the scan was given it as `Bytes` (see [`Seen`]).
    held: Option<bytes::Bytes>,
}

impl CanonRecorder {
    /// A member ended at `end`; `mark` is where its object's members start on the stack.
    /// Returns whether it is out of order (or a duplicate) after the previous member.
    ///
    /// In line (with [`end_object`](Self::end_object)): a scan that records nothing, every
    /// one but the response cache's, tests the flag in place instead of calling (callgrind:
    /// ~20 instructions a call, five calls and an end for the request of
    /// `benches/rate_limit.rs`).
    #[inline]
    fn member(
        &mut self,
        b: &[u8],
        mark: usize,
        name: (usize, usize),
        escaped_name: bool,
        end: usize,
    ) -> bool {
        self.on && self.record_member(b, mark, name, escaped_name, end)
    }

    /// [`member`](Self::member) when recording.
    #[inline(never)]
    fn record_member(
        &mut self,
        b: &[u8],
        mark: usize,
        (ks, ke): (usize, usize),
        escaped_name: bool,
        end: usize,
    ) -> bool {
        if escaped_name {
            // Names are compared by their raw bytes below: an escape would change the order.
            self.clean = false;
        }
        let name = (ks as u32, ke as u32);
        let unsorted = self.stack.len() > mark
            && self.stack.last().is_some_and(|prev| {
                name_cmp(&b[prev.name.0 as usize..prev.name.1 as usize], &b[ks..ke]).is_ge()
            });
        self.stack.push(MemberSpan {
            name,
            start: ks as u32 - 1,
            end: end as u32,
        });
        unsorted
    }

    /// An object spanning `start..end` ended; its members are `stack[mark..]`.
    #[inline]
    fn end_object(&mut self, b: &[u8], mark: usize, unsorted: bool, start: usize, end: usize) {
        if self.on {
            self.record_end_object(b, mark, unsorted, start, end);
        }
    }

    /// [`end_object`](Self::end_object) when recording.
    #[inline(never)]
    fn record_end_object(
        &mut self,
        b: &[u8],
        mark: usize,
        unsorted: bool,
        start: usize,
        end: usize,
    ) {
        if unsorted && self.clean {
            let members = &mut self.stack[mark..];
            let name = |m: &MemberSpan| &b[m.name.0 as usize..m.name.1 as usize];
            // Stable: of members with the same name, the last one stays last.
            members.sort_by(|x, y| name_cmp(name(x), name(y)));
            let first = self.kept.len() as u32;
            if self.objects.capacity() == 0 {
                // The vectors of hints dropped on this thread (`Layout`'s `Drop`), or new ones
                // (issue 13, mq13: two allocations and frees fewer per miss). A typical
                // request reorders a few small objects: no growing afterwards.
                (self.kept, self.objects) =
                    SPANS.try_with(std::cell::Cell::take).unwrap_or_default();
                self.objects.reserve(8);
                self.kept.reserve(members.len().max(16));
            }
            for (i, m) in members.iter().enumerate() {
                if members
                    .get(i + 1)
                    .is_some_and(|next| name_cmp(name(next), name(m)).is_eq())
                {
                    continue;
                }
                self.kept.push(*m);
            }
            self.objects.push(Reordered {
                start: start as u32,
                end: end as u32,
                first,
                count: self.kept.len() as u32 - first,
            });
        }
        self.stack.truncate(mark);
    }

    /// A number at `start..end` that may not be canonical.
    fn number(&mut self, start: usize, end: usize) {
        let n = usize::from(self.odd_numbers);
        if n < MAX_ODD_NUMBERS {
            self.numbers[n] = (start as u32, end as u32);
            self.odd_numbers += 1;
        } else {
            self.clean = false;
        }
    }

    /// The hints for the body `b`, scanned whole.
    fn finish(mut self, b: &[u8]) -> CanonicalHints {
        if !self.on || !self.clean {
            return CanonicalHints::default();
        }
        // Ended innermost first: in the order they start, an object's nested ones follow it.
        self.objects.sort_unstable_by_key(|o| o.start);
        CanonicalHints(Some(std::sync::Arc::new(Layout {
            body: (b.as_ptr() as usize, b.len()),
            seen: match self.held.take() {
                Some(held) => Seen::Held(held),
                None => Seen::Fingerprint(xxhash_rust::xxh3::xxh3_64(b)),
            },
            objects: std::mem::take(&mut self.objects),
            members: std::mem::take(&mut self.kept),
            numbers: self.numbers,
            odd_numbers: self.odd_numbers,
        })))
    }
}

/// Orders two member names as their byte slices order (member names are short and differ
/// early, "max_tokens" from "messages" at their second byte: a byte loop in place, not a
/// `memcmp` call per comparison).
#[inline(always)]
fn name_cmp(x: &[u8], y: &[u8]) -> std::cmp::Ordering {
    for (a, b) in x.iter().zip(y) {
        if a != b {
            return a.cmp(b);
        }
    }
    x.len().cmp(&y.len())
}

thread_local! {
    /// The member stack of this thread's last recording, kept for the next one.
    static STACK: std::cell::Cell<Vec<MemberSpan>> = const { std::cell::Cell::new(Vec::new()) };
}

/// The largest member stack kept for the next recording.
const KEPT_STACK: usize = 1024;

impl Drop for CanonRecorder {
    fn drop(&mut self) {
        if !self.on {
            // Not recording (no cache in the process): no hints' vectors to keep.
            return;
        }
        if self.stack.capacity() <= KEPT_STACK {
            let mut stack = std::mem::take(&mut self.stack);
            stack.clear();
            let _ = STACK.try_with(|c| c.set(stack));
        }
        // Hints not made (a body with whitespace): their vectors are kept too.
        give_back_spans(&mut self.kept, &mut self.objects);
    }
}

thread_local! {
    /// The vectors of the last hints dropped on this thread, empty, for the next recording.
    #[allow(clippy::type_complexity)]
    static SPANS: std::cell::Cell<(Vec<MemberSpan>, Vec<Reordered>)> =
        const { std::cell::Cell::new((Vec::new(), Vec::new())) };
}

/// Keeps `kept` and `objects` (emptied) for this thread's next recording, unless they are
/// large or were never allocated.
fn give_back_spans(kept: &mut Vec<MemberSpan>, objects: &mut Vec<Reordered>) {
    if objects.capacity() > 0 && objects.capacity() <= KEPT_STACK && kept.capacity() <= KEPT_STACK {
        let mut spans = (std::mem::take(kept), std::mem::take(objects));
        spans.0.clear();
        spans.1.clear();
        let _ = SPANS.try_with(|c| c.set(spans));
    }
}

impl Drop for Layout {
    fn drop(&mut self) {
        give_back_spans(&mut self.members, &mut self.objects);
    }
}

impl Default for CanonRecorder {
    fn default() -> Self {
        Self {
            on: false,
            clean: true,
            stack: Vec::new(),
            kept: Vec::new(),
            objects: Vec::new(),
            numbers: [(0, 0); MAX_ODD_NUMBERS],
            odd_numbers: 0,
            held: None,
        }
    }
}

/// How a request body differs from its canonical form ([`write_canonical`]), recorded by the
/// one scan of [`RequestMeta`](super::RequestMeta) so that the response cache writes the
/// canonical form without walking the body again (read once): for a body whose tokens are
/// already canonical (no whitespace between them, strings escaped as `serde_json` escapes
/// them, which compact JSON from the SDKs is), the canonical form is the body with the
/// members of some objects put in order, which [`CanonicalHints::write`] copies span by span.
/// Empty (`write` declines) for a body with whitespace or other escapes: the cache then
/// runs [`write_canonical`].
///
/// It remembers the address and the length of the body it was read from, and either holds
/// that body (a `Bytes`, when the scan had one: [`RequestMeta::get_or_scan`] of a
/// [`RequestBody`](crate::body::RequestBody)) or an XXH3-64 fingerprint of it: a body replaced
/// without scanning it again (fallback's rewritten copies carry a clone of the original's
/// `RequestMeta`; an application may reuse a buffer for another body) is not described by it,
/// and `write` declines. The address alone is not enough: a freed body's address can be reused
/// by another body of the same length, and hints applied to bytes they do not describe would
/// write a different document (and so another request's key). Held, the body can be neither
/// freed nor changed (`Bytes` are immutable) while the hints live, so its address and length
/// say it is the same body, and the body is not read a second time for a fingerprint (two
/// XXH3 passes over a 2 KB body were ~2.9k instructions of a cache miss).
///
/// [`RequestMeta::get_or_scan`]: super::RequestMeta::get_or_scan
#[derive(Clone, Default)]
pub(crate) struct CanonicalHints(Option<std::sync::Arc<Layout>>);

struct Layout {
    /// The address and length of the body scanned.
    body: (usize, usize),
    /// How `write` knows a body at that address is the one scanned.
    seen: Seen,
    /// The objects to reorder, by where they start.
    objects: Vec<Reordered>,
    members: Vec<MemberSpan>,
    numbers: [(u32, u32); MAX_ODD_NUMBERS],
    odd_numbers: u8,
}

/// How [`CanonicalHints`] recognise the body they were recorded from, besides its address and
/// length.
enum Seen {
    /// The body itself, kept alive and unchanged by this reference (never read: holding it
    /// is the point).
    Held(#[allow(dead_code)] bytes::Bytes),
    /// XXH3-64 of the body scanned (~1.5k instructions for a 2 KB body, against a walk of the
    /// body by the canonical writer), for a scan of borrowed bytes.
    Fingerprint(u64),
}

impl std::fmt::Debug for CanonicalHints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some(l) => write!(f, "CanonicalHints({} objects to reorder)", l.objects.len()),
            None => f.write_str("CanonicalHints(none)"),
        }
    }
}

/// Hints are derived from the body, not part of what [`RequestMeta`](super::RequestMeta)
/// says about it: two metas are equal whatever their hints.
impl PartialEq for CanonicalHints {
    fn eq(&self, _other: &Self) -> bool {
        true
    }
}

impl CanonicalHints {
    /// Writes the canonical form of `body` (the very bytes these hints were recorded from)
    /// to `out`, exactly what [`write_canonical`] writes, and returns `true`; returns `false`
    /// (and leaves `out` unspecified) when the hints cannot say: none recorded, another body,
    /// or a number whose canonical form differs from its text.
    pub(crate) fn write(&self, body: &[u8], out: &mut Vec<u8>) -> bool {
        let Some(layout) = &self.0 else {
            return false;
        };
        if layout.body != (body.as_ptr() as usize, body.len()) {
            return false;
        }
        if let Seen::Fingerprint(fingerprint) = layout.seen
            && fingerprint != xxhash_rust::xxh3::xxh3_64(body)
        {
            return false;
        }
        let mut scratch = Vec::new();
        for &(start, end) in &layout.numbers[..usize::from(layout.odd_numbers)] {
            let token = &body[start as usize..end as usize];
            let Ok(n) = serde_json::from_slice::<serde_json::Number>(token) else {
                return false;
            };
            scratch.clear();
            let _ = write_canonical_number(&n, &mut scratch);
            if scratch != token {
                return false;
            }
        }
        layout.emit(body, 0, body.len(), &layout.objects, out);
        true
    }
}

impl Layout {
    /// Writes `body[lo..hi]` with the objects of `objects` (those starting in `lo..hi`, by
    /// start) reordered.
    fn emit(&self, body: &[u8], lo: usize, hi: usize, objects: &[Reordered], out: &mut Vec<u8>) {
        let mut at = lo;
        let mut i = 0;
        while let Some(o) = objects.get(i) {
            let (start, end) = (o.start as usize, o.end as usize);
            out.extend_from_slice(&body[at..start]);
            // The objects nested in this one follow it.
            let nested = &objects[i + 1..];
            let nested = &nested[..nested.partition_point(|n| n.start < o.end)];
            out.push(b'{');
            let members = &self.members[o.first as usize..(o.first + o.count) as usize];
            for (k, m) in members.iter().enumerate() {
                if k > 0 {
                    out.push(b',');
                }
                let (m_start, m_end) = (m.start as usize, m.end as usize);
                // A member with no object to reorder inside is copied as it is (most
                // members: no search, no call).
                let from = nested.partition_point(|n| n.start < m.start);
                let inside = nested[from..].partition_point(|n| n.start < m.end);
                if inside == 0 {
                    out.extend_from_slice(&body[m_start..m_end]);
                } else {
                    self.emit(body, m_start, m_end, &nested[from..from + inside], out);
                }
            }
            out.push(b'}');
            at = end;
            i += 1 + nested.len();
        }
        out.extend_from_slice(&body[at..hi]);
    }
}

/// What went wrong reading a request body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum MetaErrorKind {
    /// The body is not valid JSON (or is truncated).
    InvalidJson,
    /// The top-level value is not an object.
    NotAnObject,
    /// A known field has the wrong type (e.g. `max_tokens` is a string).
    InvalidField,
}

/// A request body could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaError {
    kind: MetaErrorKind,
    offset: usize,
    detail: &'static str,
}

impl MetaError {
    pub(crate) fn new(kind: MetaErrorKind, offset: usize, detail: &'static str) -> Self {
        Self {
            kind,
            offset,
            detail,
        }
    }

    /// The kind of error.
    pub fn kind(&self) -> MetaErrorKind {
        self.kind
    }

    /// The byte offset in the body where the problem was found.
    pub fn offset(&self) -> usize {
        self.offset
    }
}

impl std::fmt::Display for MetaError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "invalid request body at byte {}: {}",
            self.offset, self.detail
        )
    }
}

impl std::error::Error for MetaError {}

#[cfg(test)]
mod tests {
    use super::*;

    /// The string fast path (blocks, then words, then bytes) says what a byte-by-byte read
    /// says, with the byte that ends it or must be counted at every offset of strings of
    /// every length around the block and word sizes, at the end of the input and followed by
    /// more of the document (where the words run up to the closing quote and jump to it).
    #[test]
    fn string_blocks_agree_with_a_byte_by_byte_read() {
        // (contents, whether valid, units, escaped) by a plain walk.
        fn reference(contents: &[u8]) -> (bool, u64, bool) {
            let mut units = 0;
            let mut escaped = false;
            let mut i = 0;
            while i < contents.len() {
                let c = contents[i];
                if c < 0x20 {
                    return (false, 0, false);
                }
                if c == b'\\' {
                    escaped = true;
                    units += 2;
                    i += 2;
                    continue;
                }
                units += 1 + u64::from(c >= 0xC0);
                i += 1;
            }
            (true, units, escaped)
        }
        let odd: [&[u8]; 7] = [
            b"\x01",
            b"\x1f",
            b"\\n",
            b"\\\"",
            "é".as_bytes(),
            "日".as_bytes(),
            "🦀".as_bytes(),
        ];
        for rest in [&b""[..], b",\"next\":\"\\u00e9\xc3\xa9\"}"] {
            for len in 0..160 {
                for at in 0..=len {
                    for piece in odd {
                        let mut contents = vec![b'a'; len];
                        contents.splice(at..at, piece.iter().copied());
                        let mut doc = vec![b'"'];
                        doc.extend_from_slice(&contents);
                        doc.extend_from_slice(b"\"");
                        let end = doc.len();
                        doc.extend_from_slice(rest);
                        let mut s = Scanner::new(&doc, false);
                        let got = s.string();
                        let (valid, units, escaped) = reference(&contents);
                        match got {
                            Ok((start, e_end, u, e)) => {
                                assert!(valid, "{len} {at} {piece:?}");
                                assert_eq!((start, e_end, u, e), (1, end - 1, units, escaped));
                                assert_eq!(s.i, end);
                            }
                            Err(_) => assert!(!valid, "{len} {at} {piece:?}"),
                        }
                    }
                }
            }
        }
    }

    /// A body that is not UTF-8 gets the error a check of the whole body up front gives (the
    /// byte where it stops being UTF-8), wherever the bad bytes are (in a string, a name, between
    /// tokens, after a syntax error, in a body with a field of the wrong type), and a body
    /// that is UTF-8 is read as before: the scan checks only its strings that are not ASCII.
    #[test]
    fn a_body_that_is_not_utf8_gets_the_error_of_a_check_up_front() {
        let bad: [&[u8]; 7] = [
            b"\xff",
            b"\x80",
            b"\xc3",
            b"\xe6\x97",
            b"\xc0\xaf",
            b"\xed\xa0\x80",
            b"\xf4\x90\x80\x80",
        ];
        let bodies: [&[u8]; 4] = [
            br#"{"model":"claude-sonnet-4-6","max_tokens":1024,"messages":[{"role":"user","content":"Write a haiku about Rust and rate limits, please."}]}"#,
            "{\"system\":\"日本語のテキスト\",\"messages\":[{\"content\":[{\"type\":\"text\",\"text\":\"é\\n\"}]}]}".as_bytes(),
            br#"{"max_tokens":"x","a":[1,2,],"b":01}"#,
            br#"[{"a":"b"}]"#,
        ];
        // A model name read as it is: ASCII, non-ASCII, escaped.
        for (body, model) in [
            (r#"{"model":"claude-sonnet-4-6"}"#, "claude-sonnet-4-6"),
            (r#"{"model":"modèle-日本-🦀"}"#, "modèle-日本-🦀"),
            (r#"{"model":"mod\u00e8le-é"}"#, "modèle-é"),
            (r#"{"model":""}"#, ""),
        ] {
            let meta = super::super::RequestMeta::scan(body.as_bytes()).unwrap();
            assert_eq!(meta.model.as_deref(), Some(model), "{body}");
        }
        for body in bodies {
            let whole = super::super::RequestMeta::scan(body);
            if let Ok(meta) = &whole {
                // Valid UTF-8: the same read as a scan of the text.
                assert_eq!(std::str::from_utf8(body).map(|_| ()), Ok(()));
                assert!(meta.input_tokens > 0);
            }
            for at in 0..=body.len() {
                for piece in bad {
                    let mut doc = body.to_vec();
                    doc.splice(at..at, piece.iter().copied());
                    let up_to = std::str::from_utf8(&doc).unwrap_err().valid_up_to();
                    let err = super::super::RequestMeta::scan(&doc).unwrap_err();
                    assert_eq!(
                        (
                            err.kind(),
                            err.offset(),
                            err.to_string().contains("invalid UTF-8")
                        ),
                        (MetaErrorKind::InvalidJson, up_to, true),
                        "{at} {piece:?} {:?}",
                        String::from_utf8_lossy(&doc)
                    );
                }
            }
        }
    }

    /// The canonical form from the hints of the scan, `None` when they decline; when they do
    /// not, it is the canonical writer's.
    fn hinted(body: &str) -> Option<String> {
        let scan = Scanner::recording(body.as_bytes(), None).run().unwrap();
        let mut out = Vec::new();
        if !scan.canonical.write(body.as_bytes(), &mut out) {
            return None;
        }
        let mut expected = Vec::new();
        write_canonical(body.as_bytes(), &mut expected).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out),
            String::from_utf8_lossy(&expected),
            "{body}"
        );
        Some(String::from_utf8(out).unwrap())
    }

    #[test]
    fn hints_write_the_canonical_form_of_compact_bodies() {
        for (body, canonical) in [
            (r#"{}"#, r#"{}"#),
            (r#"{"a":1,"b":[]}"#, r#"{"a":1,"b":[]}"#),
            (
                r#"{"model":"m","max_tokens":100,"messages":[{"role":"user","content":"hi"}]}"#,
                r#"{"max_tokens":100,"messages":[{"content":"hi","role":"user"}],"model":"m"}"#,
            ),
            // Nested objects to reorder inside one to reorder, duplicates (the last kept),
            // canonical escapes, odd numbers that are canonical already.
            (
                r#"{"z":{"y":{"b":1,"a":2},"x":[{"d":{},"c":"q\"\\\n\u001f"}]},"a":1,"a":-2.5,"t":0.7}"#,
                r#"{"a":-2.5,"t":0.7,"z":{"x":[{"c":"q\"\\\n\u001f","d":{}}],"y":{"a":2,"b":1}}}"#,
            ),
            (
                r#"{"b":{"k":[1,{"q":0,"p":0}]},"a":true}"#,
                r#"{"a":true,"b":{"k":[1,{"p":0,"q":0}]}}"#,
            ),
        ] {
            assert_eq!(hinted(body).as_deref(), Some(canonical), "{body}");
        }
    }

    /// The byte loop that orders member names is the slices' order.
    #[test]
    fn names_compare_as_their_bytes() {
        let names = [
            "",
            "a",
            "ab",
            "abc",
            "b",
            "role",
            "model",
            "max_tokens",
            "messages",
            "metadata",
            "metadat",
            "metadatb",
            "metadata_x",
            "stop",
            "stop_sequences",
            "~",
            "é",
            "e",
        ];
        for x in names {
            for y in names {
                assert_eq!(
                    name_cmp(x.as_bytes(), y.as_bytes()),
                    x.as_bytes().cmp(y.as_bytes()),
                    "{x:?} {y:?}"
                );
            }
        }
    }

    #[test]
    fn hints_decline_what_they_cannot_copy() {
        for body in [
            r#" {"a":1}"#,
            r#"{"a": 1}"#,
            r#"{"a":"\/"}"#,
            r#"{"a":"\u0041"}"#,
            r#"{"a":"\u000A"}"#,
            r#"{"a":"\u000a"}"#,
            r#"{"a":"\u001F"}"#,
            r#"{"\u0061":1}"#,
            r#"{"a":1e3}"#,
            r#"{"a":-0}"#,
            r#"{"a":[0.5,0.5,0.5,0.5,0.5]}"#,
        ] {
            assert_eq!(hinted(body), None, "{body}");
        }
        // Another body (a copy, or fallback's rewrite) than the one scanned.
        let body = br#"{"b":1,"a":2}"#;
        let scan = Scanner::recording(body, None).run().unwrap();
        let copy = body.to_vec();
        assert!(!scan.canonical.write(&copy, &mut Vec::new()));
        assert!(scan.canonical.write(body, &mut Vec::new()));
        // Scanners other than `RequestMeta`'s record nothing.
        let scan = Scanner::new(body, true).run().unwrap();
        assert!(!scan.canonical.write(body, &mut Vec::new()));
        // A buffer reused for another body of the same length (the same address): the hints
        // of the first body would reorder the second one's bytes into another document.
        let mut buf = br#"{"b":[1,2],"a":3}"#.to_vec();
        let scan = Scanner::recording(&buf, None).run().unwrap();
        buf.copy_from_slice(br#"{"b":1,"a":[2,3]}"#);
        let mut out = Vec::new();
        assert!(
            !scan.canonical.write(&buf, &mut out),
            "{:?}",
            String::from_utf8_lossy(&out)
        );
    }

    /// Hints that hold the scanned `Bytes` know their body by address and length alone (no
    /// fingerprint: the body is read once); bytes elsewhere are still declined, and `Bytes`
    /// that are not the scanned bytes are not held (the hints fingerprint the body instead).
    #[test]
    fn hints_that_hold_the_body_know_it_without_a_fingerprint() {
        let seen = |hints: &CanonicalHints| match hints.0.as_deref().map(|l| &l.seen) {
            Some(Seen::Held(_)) => "held",
            Some(Seen::Fingerprint(_)) => "fingerprint",
            None => "none",
        };
        let body = bytes::Bytes::copy_from_slice(br#"{"b":1,"a":2}"#);
        let scan = Scanner::recording(&body, Some(&body)).run().unwrap();
        assert_eq!(seen(&scan.canonical), "held");
        let mut out = Vec::new();
        assert!(scan.canonical.write(&body.clone(), &mut out));
        assert_eq!(out, br#"{"a":2,"b":1}"#);
        // The same bytes elsewhere: declined (the address says it is another body).
        let copy = body.to_vec();
        assert!(!scan.canonical.write(&copy, &mut Vec::new()));
        let other = bytes::Bytes::copy_from_slice(&body);
        let scan = Scanner::recording(&body, Some(&other)).run().unwrap();
        assert_eq!(seen(&scan.canonical), "fingerprint");
        assert!(scan.canonical.write(&body, &mut Vec::new()));
        // `RequestMeta::get_or_scan` of a `RequestBody` holds it.
        want_canonical_hints();
        let mut req = http::Request::new(crate::body::RequestBody::from(body.clone()));
        let meta = super::super::RequestMeta::get_or_scan(&mut req).unwrap();
        assert_eq!(seen(&meta.canonical), "held");
        let meta = super::super::RequestMeta::scan(&body).unwrap();
        assert_eq!(seen(&meta.canonical), "fingerprint");
    }

    #[test]
    fn the_eight_byte_fast_path_stops_at_every_byte_it_must_not_skip() {
        for b in 0..=255u8 {
            let plain = (0x20..0x80).contains(&b) && b != b'"' && b != b'\\';
            for at in 0..8 {
                let mut word = [b'a'; 8];
                word[at] = b;
                assert_eq!(
                    plain_ascii(u64::from_le_bytes(word)),
                    plain,
                    "{b:#x} at {at}"
                );
            }
        }
    }
}
