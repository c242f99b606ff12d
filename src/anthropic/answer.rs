//! The reader of a whole JSON answer's `type`, `model` and `usage`: one pass over the bytes
//! that validates the document and skips everything else, without allocating.
//!
//! Why not the request [scanner](super::scan): it counts text units and records the canonical
//! form on every string, work an answer does not need: on the 250-byte answer of the proxy
//! benchmarks it took ~5.6k instructions (callgrind), this reader ~4.3k. Both share the
//! eight-byte test of plain ASCII text, which also finds the first byte to stop at
//! ([`special_bytes`]), and the table of bytes that end a string's
//! fast path.

use super::scan::{STRING_SPECIAL, special_bytes};

/// The `usage` block of an answer as sent: every field optional (`message_delta` carries only
/// some), `None` also for `null`. `cache_creation` is `[ephemeral_5m, ephemeral_1h]`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct UsageCounts {
    pub(super) input_tokens: Option<u64>,
    pub(super) output_tokens: Option<u64>,
    pub(super) cache_creation_input_tokens: Option<u64>,
    pub(super) cache_read_input_tokens: Option<u64>,
    pub(super) cache_creation: Option<[Option<u64>; 2]>,
}

/// What the layers read from a whole JSON answer: its top-level `type`, `model` and `usage`
/// (each `None` when absent or `null`). `type` as the bytes of a string without escapes (it is
/// only compared: no UTF-8 check of its own), `model` as text.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct AnswerFields<'a> {
    pub(super) ty: Option<&'a [u8]>,
    pub(super) model: Option<&'a str>,
    pub(super) usage: Option<UsageCounts>,
}

/// Containers open at once while skipping a value; deeper documents are left to `serde_json`.
const MAX_SKIP_DEPTH: u32 = 64;

/// Reads the `type`, `model` and `usage` of a JSON answer.
///
/// `None` when this reader cannot decide, and the caller reads the body with `serde_json`
/// instead: anything but a valid JSON object, a member name with an escape, a duplicate
/// `type`, `model` or `usage` (or a duplicate known member inside `usage`), a `type` or
/// `model` that is neither a string without escapes nor `null`, a `usage` or
/// `usage.cache_creation` that is neither an object nor `null`, a token count that is not a
/// plain integer of at most 19 digits or `null`, nesting deeper than [`MAX_SKIP_DEPTH`]. So
/// when it answers, the answer is the one `serde_json` gives for the same body (the tests in
/// `usage.rs` compare the two on generated and real answers).
///
/// UTF-8 is checked only when the answer has a byte that is not ASCII (every such byte is in a
/// string: anywhere else the reader refuses it), then for the whole body, as before; the
/// `model`, when there is one, is checked as it is taken (callgrind: the whole-body check was
/// ~140 instructions for the 150-byte answer of `benches/rate_limit.rs`, which has no model).
pub(super) fn scan_answer(body: &[u8]) -> Option<AnswerFields<'_>> {
    let mut c = Cursor {
        b: body,
        i: 0,
        wide: 0,
    };
    c.ws();
    c.eat(b'{')?;
    let mut out = AnswerFields::default();
    let mut model = None;
    c.members(|c, name| {
        Some(match name {
            b"type" => {
                out.ty = c.plain_str_or_null()?;
                1
            }
            b"model" => {
                model = c.plain_str_or_null()?;
                2
            }
            b"usage" => {
                out.usage = c.usage_counts()?;
                4
            }
            _ => {
                c.skip_value()?;
                0
            }
        })
    })?;
    c.ws();
    if c.i != body.len() || (c.wide >= 0x80 && std::str::from_utf8(body).is_err()) {
        return None;
    }
    if let Some(model) = model {
        out.model = Some(std::str::from_utf8(model).ok()?);
    }
    Some(out)
}

/// The position past the escape at `b[j]` (a backslash), `None` when it is not one of
/// JSON's. Out of line: the string reader is in line in five places, and answers rarely
/// have escapes (the code read on every string stays short).
#[cold]
#[inline(never)]
fn escape_end(b: &[u8], j: usize) -> Option<usize> {
    match *b.get(j + 1)? {
        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => Some(j + 2),
        b'u' => {
            let hex = b.get(j + 2..j + 6)?;
            hex.iter().all(u8::is_ascii_hexdigit).then_some(j + 6)
        }
        _ => None,
    }
}

/// A position in a document.
struct Cursor<'a> {
    b: &'a [u8],
    i: usize,
    /// The bytes of strings read one by one, or-ed: `0x80` set when one is not ASCII (then
    /// [`scan_answer`] checks the body's UTF-8).
    wide: u8,
}

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.i += 1;
        }
    }

    /// The byte `byte` here (no whitespace skipped).
    fn eat(&mut self, byte: u8) -> Option<()> {
        if self.peek() == Some(byte) {
            self.i += 1;
            Some(())
        } else {
            None
        }
    }

    /// After an object member: `true` past the closing `}`, `false` past a `,`.
    fn object_ends(&mut self) -> Option<bool> {
        self.ws();
        match self.peek()? {
            b',' => {
                self.i += 1;
                Some(false)
            }
            b'}' => {
                self.i += 1;
                Some(true)
            }
            _ => None,
        }
    }

    /// The string starting at the current `"`: the span of its contents and whether it has
    /// escapes; leaves the position after the closing quote. In line in its callers: its
    /// answer then stays in registers (a short name was ~75 instructions through memory).
    ///
    /// Eight bytes at a time while eight are left; a word with a byte to stop at gives its
    /// first such byte exactly ([`special_bytes`]), which is then looked at once: the closing
    /// quote (most strings of an answer end a few bytes into their first word), an escape, a
    /// control character, or a non-ASCII byte, after which the words go on. The last bytes
    /// of the body are read one by one. (The word's byte was tested again in a byte loop
    /// before, and each word checked `j + 8` for overflow: ~10 instructions a string.)
    #[inline(always)]
    fn string(&mut self) -> Option<(usize, usize, bool)> {
        let b = self.b;
        let start = self.i + 1;
        let mut j = start;
        let mut escaped = false;
        loop {
            let c = if let Some(word) = b.get(j..).and_then(|rest| rest.first_chunk::<8>()) {
                let special = special_bytes(u64::from_le_bytes(*word));
                if special == 0 {
                    j += 8;
                    continue;
                }
                let at = (special.trailing_zeros() / 8) as usize;
                j += at;
                word[at]
            } else {
                let c = *b.get(j)?;
                if !STRING_SPECIAL[usize::from(c)] {
                    self.wide |= c;
                    j += 1;
                    continue;
                }
                c
            };
            // `b[j]` is `c`: a quote, a backslash, a control character, or (from a word)
            // a byte that is not ASCII.
            match c {
                b'"' => {
                    self.i = j + 1;
                    return Some((start, j, escaped));
                }
                b'\\' => {
                    escaped = true;
                    j = escape_end(b, j)?;
                }
                0x80.. => {
                    self.wide |= c;
                    j += 1;
                }
                // A control character.
                _ => return None,
            }
        }
    }

    /// A member name without escapes and the `:` after it, leaving the position at its value.
    /// In line in [`members`](Self::members), its one caller: a call saved and restored six
    /// registers and loaded five constants per name (ten names per answer).
    #[inline(always)]
    fn member_name(&mut self) -> Option<&'a [u8]> {
        self.ws();
        if self.peek() != Some(b'"') {
            return None;
        }
        let (start, end, escaped) = self.string()?;
        if escaped {
            return None;
        }
        // Compact JSON: the `:` right after the name.
        if self.peek() == Some(b':') {
            self.i += 1;
        } else {
            self.ws();
            self.eat(b':')?;
        }
        self.ws();
        Some(&self.b[start..end])
    }

    /// A number (JSON's grammar); leaves the position after it.
    fn number(&mut self) -> Option<()> {
        let _ = self.eat(b'-');
        match self.peek()? {
            b'0' => self.i += 1,
            b'1'..=b'9' => self.digits(),
            _ => return None,
        }
        if self.eat(b'.').is_some() {
            if !self.peek()?.is_ascii_digit() {
                return None;
            }
            self.digits();
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.i += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.i += 1;
            }
            if !self.peek()?.is_ascii_digit() {
                return None;
            }
            self.digits();
        }
        Some(())
    }

    fn digits(&mut self) {
        while let Some(b'0'..=b'9') = self.peek() {
            self.i += 1;
        }
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        if self.b.get(self.i..)?.starts_with(word) {
            self.i += word.len();
            Some(())
        } else {
            None
        }
    }

    /// Any value, validated and skipped: containers with a stack of bits (1: object), no
    /// recursion. In line in its three callers, as [`member_name`](Self::member_name): five
    /// values skipped per answer.
    #[inline(always)]
    fn skip_value(&mut self) -> Option<()> {
        let mut stack = 0u64;
        let mut depth = 0u32;
        loop {
            // At a value.
            match self.peek()? {
                open @ (b'{' | b'[') => {
                    self.i += 1;
                    self.ws();
                    let close = if open == b'{' { b'}' } else { b']' };
                    if self.eat(close).is_none() {
                        depth += 1;
                        if depth > MAX_SKIP_DEPTH {
                            return None;
                        }
                        stack = (stack << 1) | u64::from(open == b'{');
                        if open == b'{' {
                            self.member_name_any()?;
                        }
                        continue;
                    }
                }
                b'"' => {
                    self.string()?;
                }
                b'-' | b'0'..=b'9' => self.number()?,
                b't' => self.literal(b"true")?,
                b'f' => self.literal(b"false")?,
                b'n' => self.literal(b"null")?,
                _ => return None,
            }
            // After a value: close what ends here, or go on to the next element.
            loop {
                if depth == 0 {
                    return Some(());
                }
                self.ws();
                let object = stack & 1 == 1;
                match self.peek()? {
                    b',' => {
                        self.i += 1;
                        self.ws();
                        if object {
                            self.member_name_any()?;
                        }
                        break;
                    }
                    b'}' if object => {}
                    b']' if !object => {}
                    _ => return None,
                }
                self.i += 1;
                stack >>= 1;
                depth -= 1;
            }
        }
    }

    /// [`skip_value`](Self::skip_value) out of line, for the members of `usage` and
    /// `usage.cache_creation` this reader does not take (rare: the usage block is mostly
    /// its counts): one copy of the skipping code less in line in the reader.
    #[inline(never)]
    fn skip_other_value(&mut self) -> Option<()> {
        self.skip_value()
    }

    /// Any member name (escapes allowed) and the `:` after it, leaving the position at its
    /// value. In line in [`skip_value`](Self::skip_value), as [`member_name`](Self::member_name)
    /// in `members`: the names of a skipped object (a content block's `type` and `text`) were a
    /// call each (~85 instructions).
    #[inline(always)]
    fn member_name_any(&mut self) -> Option<()> {
        if self.peek() != Some(b'"') {
            return None;
        }
        self.string()?;
        self.ws();
        self.eat(b':')?;
        self.ws();
        Some(())
    }

    /// `null` (`Some(None)`) or a string without escapes (`Some(Some(bytes))`, its contents);
    /// `None` for anything else. In line in its caller (`type` and `model`).
    #[inline(always)]
    fn plain_str_or_null(&mut self) -> Option<Option<&'a [u8]>> {
        match self.peek()? {
            b'n' => {
                self.literal(b"null")?;
                Some(None)
            }
            b'"' => {
                let (start, end, escaped) = self.string()?;
                if escaped {
                    return None;
                }
                Some(Some(&self.b[start..end]))
            }
            _ => None,
        }
    }

    /// `null` or a plain integer of at most 19 digits (no sign, fraction, exponent or leading
    /// zero: exactly a `u64`); `None` for anything else. In line in its caller.
    #[inline(always)]
    fn count_or_null(&mut self) -> Option<Option<u64>> {
        match self.peek()? {
            b'n' => {
                self.literal(b"null")?;
                Some(None)
            }
            b'0'..=b'9' => {
                // The digits read and summed in one loop (no second pass over them after
                // `number`: callgrind ~150 instructions per count, ~60 now); anything after
                // them that would make a number but not a plain count is refused here, and
                // anything else is left to the caller (which refuses what is not `,` or `}`).
                let b = self.b;
                let start = self.i;
                let mut j = start;
                let mut v = 0u64;
                while let Some(&d @ b'0'..=b'9') = b.get(j) {
                    v = v.wrapping_mul(10).wrapping_add(u64::from(d - b'0'));
                    j += 1;
                }
                let len = j - start;
                let plain = len <= 19
                    && (len == 1 || b[start] != b'0')
                    && !matches!(b.get(j), Some(b'.' | b'e' | b'E'));
                if !plain {
                    return None;
                }
                self.i = j;
                Some(Some(v))
            }
            _ => None,
        }
    }

    /// An object member's value that is `null` (`Some(false)`) or an object (`Some(true)`,
    /// the position past its `{`).
    fn null_or_open(&mut self) -> Option<bool> {
        match self.peek()? {
            b'n' => {
                self.literal(b"null")?;
                Some(false)
            }
            b'{' => {
                self.i += 1;
                Some(true)
            }
            _ => None,
        }
    }

    /// The `usage` member's value: `null` or an object.
    fn usage_counts(&mut self) -> Option<Option<UsageCounts>> {
        if !self.null_or_open()? {
            return Some(None);
        }
        let mut counts = UsageCounts::default();
        self.members(|c, name| {
            Some(match name {
                b"input_tokens" => {
                    counts.input_tokens = c.count_or_null()?;
                    1
                }
                b"output_tokens" => {
                    counts.output_tokens = c.count_or_null()?;
                    2
                }
                b"cache_creation_input_tokens" => {
                    counts.cache_creation_input_tokens = c.count_or_null()?;
                    4
                }
                b"cache_read_input_tokens" => {
                    counts.cache_read_input_tokens = c.count_or_null()?;
                    8
                }
                b"cache_creation" => {
                    counts.cache_creation = c.cache_creation()?;
                    16
                }
                _ => {
                    c.skip_other_value()?;
                    0
                }
            })
        })?;
        Some(Some(counts))
    }

    /// `usage.cache_creation`: `null` or an object; `[5m, 1h]`.
    fn cache_creation(&mut self) -> Option<Option<[Option<u64>; 2]>> {
        if !self.null_or_open()? {
            return Some(None);
        }
        let mut split = [None; 2];
        self.members(|c, name| {
            Some(match name {
                b"ephemeral_5m_input_tokens" => {
                    split[0] = c.count_or_null()?;
                    1
                }
                b"ephemeral_1h_input_tokens" => {
                    split[1] = c.count_or_null()?;
                    2
                }
                _ => {
                    c.skip_other_value()?;
                    0
                }
            })
        })?;
        Some(Some(split))
    }

    /// The members of an object whose `{` was read, up to and including its `}`: `member`
    /// reads each value after its name and returns the member's bit (0 for a member it
    /// skipped); `None` when a bit comes twice (a duplicate known member: `serde_json`
    /// decides those) or the object is not valid JSON.
    fn members(&mut self, mut member: impl FnMut(&mut Self, &'a [u8]) -> Option<u8>) -> Option<()> {
        let mut seen = 0u8;
        self.ws();
        if self.eat(b'}').is_some() {
            return Some(());
        }
        loop {
            let name = self.member_name()?;
            let bit = member(self, name)?;
            if seen & bit != 0 {
                return None;
            }
            seen |= bit;
            if self.object_ends()? {
                return Some(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::special_bytes;
    use crate::anthropic::scan::plain_ascii;

    /// An answer that is not UTF-8 is refused wherever its bad bytes are (a string, a name, a
    /// value skipped, the model, between tokens), as when the whole body was checked up
    /// front; one that is UTF-8 with non-ASCII text is read, its model as it is.
    #[test]
    fn an_answer_is_refused_if_and_only_if_it_is_not_utf8_or_not_read() {
        let answer = "{\"id\":\"msg_1\",\"type\":\"message\",\"model\":\"modèle-日本\",\
            \"content\":[{\"type\":\"text\",\"text\":\"é 🦀\"}],\"usage\":{\"input_tokens\":25,\
            \"output_tokens\":12}}";
        let read = super::scan_answer(answer.as_bytes()).unwrap();
        assert_eq!(read.model, Some("modèle-日本"));
        assert_eq!(read.ty, Some(&b"message"[..]));
        let bad: [&[u8]; 5] = [b"\xff", b"\x80", b"\xc3", b"\xe6\x97", b"\xed\xa0\x80"];
        for at in 0..=answer.len() {
            for piece in bad {
                let mut doc = answer.as_bytes().to_vec();
                doc.splice(at..at, piece.iter().copied());
                assert!(
                    super::scan_answer(&doc).is_none(),
                    "{at} {piece:?} {:?}",
                    String::from_utf8_lossy(&doc)
                );
            }
        }
    }

    #[test]
    fn the_first_special_byte_is_found_exactly() {
        // Every word made of eight bytes drawn from the classes that matter, in every order
        // of a few seeds: the first flagged byte is the first byte that is not plain ASCII.
        let class = [
            b'a', b'"', b'\\', 0x1f, 0x20, 0x7f, 0x80, 0xe2, b'!', b'#', b'[', b']',
        ];
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        for _ in 0..200_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let bytes: [u8; 8] =
                std::array::from_fn(|i| class[((seed >> (i * 5)) % class.len() as u64) as usize]);
            let w = u64::from_le_bytes(bytes);
            let special = special_bytes(w);
            assert_eq!(special == 0, plain_ascii(w), "{bytes:?}");
            let first = bytes
                .iter()
                .position(|&b| b == b'"' || b == b'\\' || !(0x20..0x80).contains(&b));
            let found = (special != 0).then(|| (special.trailing_zeros() / 8) as usize);
            assert_eq!(found, first, "{bytes:?}");
        }
    }
}
